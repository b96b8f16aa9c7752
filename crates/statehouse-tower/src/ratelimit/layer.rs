//! [`RateLimitLayer`], its rules, and how a rule finds a request's key.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::request::Parts;
use http::{HeaderName, Request};
use sha2::{Digest, Sha256};
use statehouse::{Policy, RateLimiter};
use tower_layer::Layer;

use super::service::RateLimitService;
use crate::error::Error;
use crate::session::ClientIp;

/// The longest rule name: it goes into every storage key and every header.
pub(crate) const MAX_RULE_NAME: usize = 64;
/// The key under which requests whose client address cannot be read are counted together.
const UNKNOWN_ADDRESS: &str = "unknown";
/// Keys longer than this (from [`RuleKey::Custom`]) are stored as their SHA-256.
const MAX_PLAIN_KEY: usize = 128;

/// A function from a request's head to its key under a rule (`None`: the rule does not apply).
type KeyFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

/// What a [`RateLimitRule`] counts requests by.
#[derive(Clone)]
#[non_exhaustive]
pub enum RuleKey {
    /// The client's IP address, read as [`ClientIp`] says (the connection's peer by default:
    /// serve with `into_make_service_with_connect_info::<SocketAddr>()`). An address that
    /// cannot be read counts under the shared key `unknown`. [`ClientIp::Off`] is refused.
    ClientIp(ClientIp),
    /// The value of a request header, such as an API key, stored as its SHA-256 (never in the
    /// clear). A request without the header, or with an empty one, is not counted by the rule;
    /// several headers of the name are read as one comma-separated value.
    Header(HeaderName),
    /// One key for every request: a limit on the whole route or service.
    Global,
    /// A function of the request's head (method, URI, headers, extensions). `None` or an empty
    /// key: the rule does not apply. A key longer than 128 bytes is stored as its SHA-256.
    Custom(Arc<KeyFn>),
}

impl RuleKey {
    /// A [`RuleKey::Custom`] from a closure.
    ///
    /// ```
    /// use statehouse_tower::RuleKey;
    /// // Per tenant, from a header the authentication layer in front has checked.
    /// let by_tenant = RuleKey::custom(|parts| {
    ///     parts.headers.get("x-tenant")?.to_str().ok().map(str::to_owned)
    /// });
    /// # let _ = by_tenant;
    /// ```
    pub fn custom(key: impl Fn(&Parts) -> Option<String> + Send + Sync + 'static) -> RuleKey {
        RuleKey::Custom(Arc::new(key))
    }

    /// The request's key under this rule, or `None` when the rule does not apply to it.
    fn resolve<B>(&self, req: &Request<B>, parts: &mut Option<Parts>) -> Option<String> {
        match self {
            RuleKey::ClientIp(source) => Some(
                source
                    .resolve(req)
                    .unwrap_or_else(|| UNKNOWN_ADDRESS.to_owned()),
            ),
            RuleKey::Header(name) => {
                let mut values = req.headers().get_all(name).iter().peekable();
                values.peek()?;
                let mut hasher = Sha256::new();
                let mut empty = true;
                for (i, value) in values.enumerate() {
                    if i > 0 {
                        hasher.update(b",");
                    }
                    empty &= value.is_empty();
                    hasher.update(value.as_bytes());
                }
                (!empty).then(|| hex::encode(hasher.finalize()))
            }
            RuleKey::Global => Some(String::new()),
            RuleKey::Custom(key) => {
                let parts = parts.get_or_insert_with(|| head_of(req));
                let key = key(parts).filter(|k| !k.is_empty())?;
                if key.len() > MAX_PLAIN_KEY {
                    Some(format!(
                        "sha256:{}",
                        hex::encode(Sha256::digest(key.as_bytes()))
                    ))
                } else {
                    Some(key)
                }
            }
        }
    }
}

impl fmt::Debug for RuleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleKey::ClientIp(source) => f.debug_tuple("ClientIp").field(source).finish(),
            RuleKey::Header(name) => f.debug_tuple("Header").field(name).finish(),
            RuleKey::Global => f.write_str("Global"),
            RuleKey::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// A copy of a request's head (no body) for [`RuleKey::Custom`]: method, URI, version,
/// headers and the extensions' clonable entries (`http` clones what was inserted `Clone`).
fn head_of<B>(req: &Request<B>) -> Parts {
    let mut head = Request::new(());
    *head.method_mut() = req.method().clone();
    *head.uri_mut() = req.uri().clone();
    *head.version_mut() = req.version();
    *head.headers_mut() = req.headers().clone();
    *head.extensions_mut() = req.extensions().clone();
    head.into_parts().0
}

/// One limit: a name (reported in the headers and part of every storage key), a policy, what
/// it counts by, and what one request costs.
#[derive(Debug, Clone)]
pub struct RateLimitRule {
    pub(crate) name: String,
    pub(crate) policy: Policy,
    pub(crate) key: RuleKey,
    pub(crate) cost: u64,
    pub(crate) shadow: bool,
    /// This rule's counts in the layer it was added to (fresh for each layer).
    pub(crate) counters: Arc<RuleCounters>,
}

/// One rule's counts.
#[derive(Debug, Default)]
pub(crate) struct RuleCounters {
    pub(crate) checked: AtomicU64,
    pub(crate) denied: AtomicU64,
    pub(crate) degraded: AtomicU64,
}

impl RuleCounters {
    /// Counts one decision of the rule; `denied` when it denied (or, in shadow mode, would
    /// have denied) the request.
    pub(crate) fn count(&self, denied: bool, degraded: bool) {
        self.checked.fetch_add(1, Ordering::Relaxed);
        if denied {
            self.denied.fetch_add(1, Ordering::Relaxed);
        }
        if degraded {
            self.degraded.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What one rule of a [`RateLimitLayer`] has decided since it was added to the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RuleStats {
    /// The rule's name.
    pub name: String,
    /// Whether the rule is in [shadow mode](RateLimitRule::shadow).
    pub shadow: bool,
    /// Requests the rule was checked for (those it has a key for; a shadow rule, those the
    /// enforcing rules admitted).
    pub checked: u64,
    /// Requests the rule denied (`429`); for a shadow rule, requests it would have denied and
    /// let through.
    pub denied: u64,
    /// Decisions the store did not make: the limiter's degraded policy answered (Redis down or
    /// slow).
    pub degraded: u64,
}

/// A [`RateLimitLayer`]'s counts: per rule, and the requests answered `503`/`500` because
/// the limiter returned an error.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimitStats {
    /// One entry per rule, in the order the rules were added.
    pub rules: Vec<RuleStats>,
    /// Requests answered with an error status because the limiter failed (its degraded policy
    /// is `ReturnError` and the store was down, or an unexpected error).
    pub store_errors: u64,
    /// Client-address keys that could not be read, so counted under the one shared key
    /// `unknown` (a first one is also logged at `warn`): with [`ClientIp::Peer`], a server that
    /// does not pass the peer address; with a header source, requests that did not come
    /// through the proxy.
    pub unknown_client_addresses: u64,
}

impl RateLimitRule {
    /// A rule named `name` (1 to 64 of `A-Z a-z 0-9 - _ .`), enforcing `policy` per `key`,
    /// each request costing 1.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for an invalid name or [`ClientIp::Off`] as the key.
    ///
    /// ```
    /// use std::time::Duration;
    /// use statehouse::Policy;
    /// use statehouse_tower::{ClientIp, RateLimitRule, RuleKey};
    ///
    /// let policy = Policy::gcra(10, Duration::from_secs(1))?;
    /// let rule = RateLimitRule::new("per-ip", policy.clone(), RuleKey::ClientIp(ClientIp::Peer))?;
    /// # let _ = rule;
    /// assert!(RateLimitRule::new("per ip", policy, RuleKey::Global).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(name: &str, policy: Policy, key: RuleKey) -> Result<RateLimitRule, Error> {
        let valid = !name.is_empty()
            && name.len() <= MAX_RULE_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !valid {
            return Err(Error::InvalidConfig {
                field: "rule name",
                reason: format!(
                    "must be 1 to {MAX_RULE_NAME} of A-Z a-z 0-9 - _ . (it goes into storage keys \
                     and headers); got {name:?}"
                ),
            });
        }
        if matches!(key, RuleKey::ClientIp(ClientIp::Off)) {
            return Err(Error::InvalidConfig {
                field: "rule key",
                reason: "ClientIp::Off reads no address to count by; use RuleKey::Global for \
                         one shared limit"
                    .into(),
            });
        }
        Ok(RateLimitRule {
            name: name.to_owned(),
            policy,
            key,
            cost: 1,
            shadow: false,
            counters: Arc::default(),
        })
    }

    /// Each request costs `cost` units of the policy (default 1): a rule on expensive routes.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] with an invalid-cost error for a zero cost or one above the policy's
    /// capacity (no request could ever be admitted).
    pub fn cost(mut self, cost: u64) -> Result<RateLimitRule, Error> {
        self.policy.check_cost(cost)?;
        self.cost = cost;
        Ok(self)
    }

    /// Shadow mode (a dry run, for rolling a limit out): the rule counts and decides as it
    /// would, but never denies. A request it would deny goes on; the layer counts it
    /// ([`RuleStats::denied`] in [`RateLimitLayer::stats`]) and logs it (`tracing`, at `info`, with the rule's
    /// name). Shadow rules are decided after the enforcing ones have admitted the request (a
    /// request they deny is not counted by shadow rules), together among themselves, and are
    /// left out of the response headers: they are not the client's limits yet. A store error
    /// in a shadow check never touches the request.
    pub fn shadow(mut self) -> RateLimitRule {
        self.shadow = true;
        self
    }

    /// The rule's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The storage key of `key` under this rule: `<name>:<key>`.
    fn storage_key(&self, key: &str) -> String {
        let mut out = String::with_capacity(self.name.len() + 1 + key.len());
        out.push_str(&self.name);
        out.push(':');
        out.push_str(key);
        out
    }
}

/// The layer's shared configuration.
pub(crate) struct Config {
    pub(crate) limiter: RateLimiter,
    pub(crate) rules: Vec<RateLimitRule>,
    pub(crate) headers: bool,
    /// Requests answered with an error status because the limiter failed.
    pub(crate) store_errors: AtomicU64,
    /// Rule keys of client addresses that could not be read (counted under `unknown`).
    pub(crate) unknown_addresses: AtomicU64,
}

impl Config {
    /// The rules that apply to `req` and its storage key under each.
    pub(crate) fn applicable<B>(&self, req: &Request<B>) -> Vec<(&RateLimitRule, String)> {
        let mut parts = None;
        self.rules
            .iter()
            .filter_map(|rule| {
                let key = rule.key.resolve(req, &mut parts)?;
                if key == UNKNOWN_ADDRESS && matches!(rule.key, RuleKey::ClientIp(_)) {
                    self.unknown_address(&rule.name);
                }
                Some((rule, rule.storage_key(&key)))
            })
            .collect()
    }

    /// Counts a request whose client address could not be read, and says so once: usually the
    /// server does not pass the peer address (axum: serve with
    /// `into_make_service_with_connect_info::<SocketAddr>()`), and every client then shares one
    /// limit.
    fn unknown_address(&self, rule: &str) {
        if self.unknown_addresses.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                rule,
                "statehouse: a request without a readable client address is counted under the \
                 shared key `unknown`; with ClientIp::Peer, serve the app with \
                 `into_make_service_with_connect_info::<SocketAddr>()` (axum), or read the \
                 address from your proxy's header (ClientIp::ForwardedFor, ClientIp::Header)"
            );
        }
    }
}

/// Tower middleware enforcing [`RateLimitRule`]s with a [`RateLimiter`]; see the
/// [module docs](crate::ratelimit).
#[derive(Clone)]
pub struct RateLimitLayer {
    config: Arc<Config>,
}

impl fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("rules", &self.config.rules)
            .field("headers", &self.config.headers)
            .finish_non_exhaustive()
    }
}

impl RateLimitLayer {
    /// A layer over `limiter` with no rule yet (it admits everything until given one), the
    /// `RateLimit` headers on.
    pub fn new(limiter: RateLimiter) -> RateLimitLayer {
        RateLimitLayer {
            config: Arc::new(Config {
                limiter,
                rules: Vec::new(),
                headers: true,
                store_errors: AtomicU64::new(0),
                unknown_addresses: AtomicU64::new(0),
            }),
        }
    }

    /// Adds a rule. Every applicable rule is checked in one atomic step: a request denied by
    /// one consumes from none.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when a rule of that name is already there.
    pub fn rule(mut self, mut rule: RateLimitRule) -> Result<RateLimitLayer, Error> {
        if self.config.rules.iter().any(|r| r.name == rule.name) {
            return Err(Error::InvalidConfig {
                field: "rule name",
                reason: format!("{:?} is used by two rules", rule.name),
            });
        }
        // Counts of this layer's own, even for a rule cloned from one in another layer.
        rule.counters = Arc::default();
        self.config_mut().rules.push(rule);
        Ok(self)
    }

    /// Whether admitted responses carry `RateLimit-Policy` and `RateLimit` (default on). A
    /// `429` always carries them, with `Retry-After`.
    pub fn headers(mut self, on: bool) -> RateLimitLayer {
        self.config_mut().headers = on;
        self
    }

    /// What each rule has decided so far (shared by every service the layer made).
    pub fn stats(&self) -> RateLimitStats {
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        RateLimitStats {
            rules: self
                .config
                .rules
                .iter()
                .map(|rule| RuleStats {
                    name: rule.name.clone(),
                    shadow: rule.shadow,
                    checked: load(&rule.counters.checked),
                    denied: load(&rule.counters.denied),
                    degraded: load(&rule.counters.degraded),
                })
                .collect(),
            store_errors: load(&self.config.store_errors),
            unknown_client_addresses: load(&self.config.unknown_addresses),
        }
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::get_mut(&mut self.config).expect("the layer is configured before it is cloned")
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService::new(inner, self.config.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn rule(key: RuleKey) -> RateLimitRule {
        RateLimitRule::new("r", Policy::gcra(5, Duration::from_secs(1)).unwrap(), key).unwrap()
    }

    fn key_of(rule: &RateLimitRule, req: &Request<()>) -> Option<String> {
        rule.key
            .resolve(req, &mut None)
            .map(|k| rule.storage_key(&k))
    }

    #[test]
    fn rule_names_are_tokens_of_bounded_length() {
        let policy = Policy::gcra(5, Duration::from_secs(1)).unwrap();
        for bad in [
            "",
            "a b",
            "a\"b",
            "é",
            "a,b",
            &"x".repeat(MAX_RULE_NAME + 1),
        ] {
            let err = RateLimitRule::new(bad, policy.clone(), RuleKey::Global).unwrap_err();
            assert!(matches!(err, Error::InvalidConfig { .. }), "{bad:?}");
        }
        for good in ["a", "per-ip", "v1.user_id", &"x".repeat(MAX_RULE_NAME)] {
            RateLimitRule::new(good, policy.clone(), RuleKey::Global).unwrap();
        }
        let off = RuleKey::ClientIp(ClientIp::Off);
        assert!(RateLimitRule::new("ip", policy, off).is_err());
    }

    #[test]
    fn a_zero_or_impossible_cost_is_refused() {
        assert!(rule(RuleKey::Global).cost(0).is_err());
        assert!(rule(RuleKey::Global).cost(6).is_err());
        assert_eq!(rule(RuleKey::Global).cost(5).unwrap().cost, 5);
    }

    #[test]
    fn duplicate_rule_names_are_refused() {
        let limiter = RateLimiter::new(statehouse::EmbeddedStore::new());
        let layer = RateLimitLayer::new(limiter)
            .rule(rule(RuleKey::Global))
            .unwrap();
        assert!(layer.rule(rule(RuleKey::Global)).is_err());
    }

    #[test]
    fn header_keys_are_hashed_and_missing_or_empty_headers_do_not_count() {
        let r = rule(RuleKey::Header(HeaderName::from_static("x-api-key")));
        let req = Request::builder()
            .header("x-api-key", "secret-1")
            .body(())
            .unwrap();
        let key = key_of(&r, &req).unwrap();
        assert!(!key.contains("secret"), "{key}");
        assert_eq!(key.len(), 2 + 64);
        let other = Request::builder()
            .header("x-api-key", "secret-2")
            .body(())
            .unwrap();
        assert_ne!(key_of(&r, &other).unwrap(), key);
        assert_eq!(key_of(&r, &Request::new(())), None);
        let empty = Request::builder().header("x-api-key", "").body(()).unwrap();
        assert_eq!(key_of(&r, &empty), None);
        // Two headers of the name are one value: not the same as either alone.
        let both = Request::builder()
            .header("x-api-key", "secret-1")
            .header("x-api-key", "secret-2")
            .body(())
            .unwrap();
        let both = key_of(&r, &both).unwrap();
        assert_ne!(both, key);
        assert_ne!(both, key_of(&r, &other).unwrap());
    }

    #[test]
    fn client_ip_keys_fall_back_to_one_unknown_key() {
        let r = rule(RuleKey::ClientIp(ClientIp::ForwardedFor {
            trusted_proxies: 1,
        }));
        let req = Request::builder()
            .header("x-forwarded-for", "6.6.6.6, 10.1.2.3")
            .body(())
            .unwrap();
        assert_eq!(key_of(&r, &req).as_deref(), Some("r:10.1.2.3"));
        let garbage = Request::builder()
            .header("x-forwarded-for", "not-an-address")
            .body(())
            .unwrap();
        assert_eq!(key_of(&r, &garbage).as_deref(), Some("r:unknown"));
        let peer = rule(RuleKey::ClientIp(ClientIp::Peer));
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(std::net::SocketAddr::from(([192, 0, 2, 7], 4000)));
        assert_eq!(key_of(&peer, &req).as_deref(), Some("r:192.0.2.7"));
    }

    #[test]
    fn global_and_custom_keys() {
        assert_eq!(
            key_of(&rule(RuleKey::Global), &Request::new(())).as_deref(),
            Some("r:")
        );
        let by_path = rule(RuleKey::custom(|parts| Some(parts.uri.path().to_owned())));
        let req = Request::builder().uri("/a/b").body(()).unwrap();
        assert_eq!(key_of(&by_path, &req).as_deref(), Some("r:/a/b"));
        let root = Request::builder().uri("/").body(()).unwrap();
        assert_eq!(key_of(&by_path, &root).as_deref(), Some("r:/"));
        let long = Request::builder()
            .uri(format!("/{}", "x".repeat(MAX_PLAIN_KEY)))
            .body(())
            .unwrap();
        let hashed = key_of(&by_path, &long).unwrap();
        assert!(
            hashed.starts_with("r:sha256:") && hashed.len() == 2 + 7 + 64,
            "{hashed}"
        );
        let never = rule(RuleKey::custom(|_| Some(String::new())));
        assert_eq!(key_of(&never, &req), None);
        let none = rule(RuleKey::custom(|_| None));
        assert_eq!(key_of(&none, &req), None);
    }
}
