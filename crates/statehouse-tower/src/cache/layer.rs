//! [`HttpCacheLayer`] and its builder.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use statehouse::statehouse_core::cache::{CachePolicy, CacheStore};
use statehouse::{BreakerState, CircuitBreakerConfig, Clock, StoreBreakers, SystemClock};
use tower_layer::Layer;

use super::flight::Flights;
use super::purge::HttpCachePurger;
use super::service::HttpCache;
use super::stats::HttpCacheStats;

/// The default largest body stored: 1 MiB. Larger bodies stream through.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;
/// The default deadline of each store call.
pub const DEFAULT_STORE_DEADLINE: Duration = Duration::from_millis(50);
/// The default lifetime of a fill lease (how long another replica waits for a filler that
/// died before it may fill the key itself).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// The default most `Vary` names a stored response may have.
pub const DEFAULT_MAX_VARY_HEADERS: usize = 8;
/// The default most variants stored for one URI.
pub const DEFAULT_MAX_VARIANTS: usize = 16;
/// The default time a response with a validator (`ETag`, `Last-Modified`) is kept after it
/// went stale, to be revalidated with a conditional request instead of fetched again.
pub const DEFAULT_REVALIDATE_WINDOW: Duration = Duration::from_secs(600);

/// The layer's settings, fixed once built.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) name: String,
    pub(crate) key_prefix: String,
    pub(crate) default_scheme: String,
    pub(crate) max_body_bytes: usize,
    pub(crate) store_deadline: Duration,
    pub(crate) lease_ttl: Duration,
    pub(crate) store_set_cookie: bool,
    pub(crate) cache_authorized: bool,
    pub(crate) tag_header: HeaderName,
    pub(crate) strip_tag_header: bool,
    pub(crate) max_vary_headers: usize,
    pub(crate) max_variants: usize,
    pub(crate) max_ttl: Duration,
    pub(crate) revalidate_window: Duration,
    pub(crate) stale_while_revalidate: bool,
    pub(crate) circuit_breaker: CircuitBreakerConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: "statehouse".into(),
            key_prefix: "http:".into(),
            default_scheme: "http".into(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            store_deadline: DEFAULT_STORE_DEADLINE,
            lease_ttl: DEFAULT_LEASE_TTL,
            store_set_cookie: false,
            cache_authorized: false,
            tag_header: HeaderName::from_static("cache-tag"),
            strip_tag_header: true,
            max_vary_headers: DEFAULT_MAX_VARY_HEADERS,
            max_variants: DEFAULT_MAX_VARIANTS,
            max_ttl: CachePolicy::MAX_TTL,
            revalidate_window: DEFAULT_REVALIDATE_WINDOW,
            stale_while_revalidate: true,
            circuit_breaker: CircuitBreakerConfig::default(),
        }
    }
}

/// What every service and the purger of one layer share.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn CacheStore>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: Config,
    pub(crate) stats: Arc<HttpCacheStats>,
    pub(crate) flights: Arc<Flights>,
    /// In front of every store call, one per failure domain of the store.
    pub(crate) breakers: StoreBreakers,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCacheShared")
            .field("store", &self.store)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// One store call about `key` (the store key it reads or writes, or for several, the first:
    /// it picks the failure domain's breaker) through the breaker and within the deadline. A
    /// timeout is `Error::Timeout`, an open breaker `Error::Unavailable` without a call; every
    /// failure is counted in `store_errors`.
    pub(crate) async fn call<T>(
        &self,
        key: &str,
        f: impl Future<Output = statehouse::Result<T>>,
    ) -> statehouse::Result<T> {
        let deadline = self.config.store_deadline;
        let domain = self.store.failure_domain(key);
        let bounded = async {
            match tokio::time::timeout(deadline, f).await {
                Ok(r) => r,
                Err(_) => Err(statehouse::Error::Timeout { deadline }),
            }
        };
        let result = self.breakers.call(domain, bounded).await;
        if let Err(e) = &result {
            self.stats.count_store_error();
            tracing::debug!(error = %e, "statehouse: HTTP cache store call failed");
        }
        result
    }

    /// The store name of a response tag.
    pub(crate) fn tag_key(&self, tag: &str) -> String {
        format!("{}tag:{tag}", self.config.key_prefix)
    }

    /// The tag bumped by every tag purge, read before and after a fill (see `purge.rs`).
    pub(crate) fn epoch_tag(&self) -> String {
        format!("{}tag-epoch", self.config.key_prefix)
    }
}

/// A tower [`Layer`] that puts an RFC 9111 shared HTTP cache in front of the service it wraps
/// (see the [module docs](super)).
///
/// ```
/// use std::sync::Arc;
/// use statehouse::statehouse_core::cache::CacheStore;
/// use statehouse_tower::cache::HttpCacheLayer;
///
/// fn layer(store: Arc<dyn CacheStore>) -> statehouse::Result<HttpCacheLayer> {
///     HttpCacheLayer::builder(store)
///         .cache_name("edge")
///         .max_body_bytes(256 * 1024)
///         .store_set_cookie(false)
///         .build()
/// }
/// ```
#[derive(Clone)]
pub struct HttpCacheLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for HttpCacheLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCacheLayer")
            .field("shared", &self.shared)
            .finish()
    }
}

impl HttpCacheLayer {
    /// A layer over `store` with every default: the system clock, cache name `statehouse`,
    /// key prefix `http:`, scheme `http` for requests in origin form, bodies up to 1 MiB,
    /// 50 ms per store call, 10 s fill leases, no `Set-Cookie` responses, no requests with
    /// `Authorization`, tags from `Cache-Tag` (stripped from responses), at most 8 `Vary`
    /// names and 16 variants per URI, freshness capped at one year.
    pub fn new(store: Arc<dyn CacheStore>) -> Self {
        HttpCacheLayer::from_parts(store, Arc::new(SystemClock), Config::default())
            .unwrap_or_else(|_| unreachable!("the default circuit breaker is valid"))
    }

    /// A builder over `store` starting from the defaults of [`HttpCacheLayer::new`].
    pub fn builder(store: Arc<dyn CacheStore>) -> HttpCacheLayerBuilder {
        HttpCacheLayerBuilder {
            store,
            clock: Arc::new(SystemClock),
            config: Config::default(),
        }
    }

    fn from_parts(
        store: Arc<dyn CacheStore>,
        clock: Arc<dyn Clock>,
        config: Config,
    ) -> statehouse::Result<Self> {
        let breakers = StoreBreakers::new(
            config.circuit_breaker,
            store.failure_domains(),
            clock.clone(),
        )?;
        Ok(HttpCacheLayer {
            shared: Arc::new(Shared {
                store,
                clock,
                config,
                stats: Arc::new(HttpCacheStats::default()),
                flights: Arc::new(Flights::default()),
                breakers,
            }),
        })
    }

    /// Where the circuit breakers in front of the store stand (the one furthest from closed),
    /// and how many times one opened.
    pub fn breaker_state(&self) -> (BreakerState, u64) {
        let breakers = &self.shared.breakers;
        (breakers.state(), breakers.opened_count())
    }

    /// A purger for this layer's entries (by URI, by tag). Clones share everything.
    pub fn purger(&self) -> HttpCachePurger {
        HttpCachePurger::new(self.shared.clone())
    }

    /// The layer's counters, shared by every service it made.
    pub fn stats(&self) -> Arc<HttpCacheStats> {
        self.shared.stats.clone()
    }
}

impl<S> Layer<S> for HttpCacheLayer {
    type Service = HttpCache<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpCache::new(inner, self.shared.clone())
    }
}

/// Builds an [`HttpCacheLayer`]; [`HttpCacheLayerBuilder::build`] checks every value and
/// names the field it rejects.
pub struct HttpCacheLayerBuilder {
    store: Arc<dyn CacheStore>,
    clock: Arc<dyn Clock>,
    config: Config,
}

impl fmt::Debug for HttpCacheLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCacheLayerBuilder")
            .field("store", &self.store)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn rejected(field: &'static str, reason: impl Into<String>) -> statehouse::Error {
    statehouse::Error::InvalidPolicy {
        field,
        reason: reason.into(),
    }
}

/// An RFC 8941 token (what a `Cache-Status` cache name must be, unquoted).
fn is_sf_token(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'*')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b":/!#$%&'*+-.^_`|~".contains(&b))
}

impl HttpCacheLayerBuilder {
    /// The clock freshness and ages are computed with (tests inject a `ManualClock`).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The cache's name in `Cache-Status` (an RFC 8941 token, e.g. `edge`). Default
    /// `statehouse`.
    pub fn cache_name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    /// The prefix of every store key this layer writes (entries, vary specs, tags), so several
    /// caches can share one store. Default `http:`.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.key_prefix = prefix.into();
        self
    }

    /// The scheme put in the key of requests in origin form (`GET /path`), which do not say
    /// theirs: `http` (default) or `https` behind a TLS terminator.
    pub fn default_scheme(mut self, scheme: impl Into<String>) -> Self {
        self.config.default_scheme = scheme.into().to_ascii_lowercase();
        self
    }

    /// The largest body stored, in bytes (1 to 512 MiB; default 1 MiB). A larger body streams
    /// through unstored, and at most this much of it is held while deciding.
    pub fn max_body_bytes(mut self, max: usize) -> Self {
        self.config.max_body_bytes = max;
        self
    }

    /// The deadline of each store call (1 ms to 60 s; default 50 ms). Past it the request goes
    /// on to the origin as if the store had missed; it never fails because of the store.
    pub fn store_deadline(mut self, deadline: Duration) -> Self {
        self.config.store_deadline = deadline;
        self
    }

    /// How long a fill lease lasts (1 s to 1 h; default 10 s). Set it above the slowest
    /// origin response you want stored: a fill that outlives its lease is refused.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.config.lease_ttl = ttl;
        self
    }

    /// Whether responses carrying `Set-Cookie` may be stored and reused (default false, as in
    /// nginx and Varnish: RFC 9111 §7.3 allows it, but one visitor's cookie would be handed to
    /// the next).
    pub fn store_set_cookie(mut self, store: bool) -> Self {
        self.config.store_set_cookie = store;
        self
    }

    /// Whether requests carrying `Authorization` may use the cache (default false: they pass
    /// through). When true, such a request may be answered from the cache, and its response is
    /// stored only if it has `public`, `s-maxage` or `must-revalidate` (RFC 9111 §3.5).
    pub fn cache_authorized(mut self, allow: bool) -> Self {
        self.config.cache_authorized = allow;
        self
    }

    /// The response header listing a response's tags, comma-separated, for
    /// [`HttpCachePurger::purge_tag`]. Default `Cache-Tag`.
    pub fn tag_header(mut self, name: HeaderName) -> Self {
        self.config.tag_header = name;
        self
    }

    /// Whether the tag header is removed from responses sent to clients (default true: tags
    /// are the operator's vocabulary, not the client's, as with CDN surrogate keys).
    pub fn strip_tag_header(mut self, strip: bool) -> Self {
        self.config.strip_tag_header = strip;
        self
    }

    /// The most `Vary` names a stored response may have (1 to 32; default 8). A response
    /// varying on more is not stored.
    pub fn max_vary_headers(mut self, max: usize) -> Self {
        self.config.max_vary_headers = max;
        self
    }

    /// The most variants stored for one URI (1 to 1 024; default 16): a response varying on,
    /// say, `Accept-Language` cannot fill the store with one entry per header value a client
    /// invents. The count is kept in the vary spec, under the store lease, so it holds across
    /// replicas; it restarts when the spec is purged or expires.
    pub fn max_variants(mut self, max: usize) -> Self {
        self.config.max_variants = max;
        self
    }

    /// The longest freshness lifetime honoured (1 s to one year, the default); longer ones
    /// are cut to it.
    pub fn max_ttl(mut self, ttl: Duration) -> Self {
        self.config.max_ttl = ttl;
        self
    }

    /// How long a response with a validator (`ETag` or `Last-Modified`) is kept after it went
    /// stale (0 to one day; default [`DEFAULT_REVALIDATE_WINDOW`], 10 minutes). Within it, a
    /// request for it sends the origin a conditional request with the stored validators, and
    /// a `304 Not Modified` refreshes the stored response (its fields updated, its body kept)
    /// instead of sending the whole body again (RFC 9111 §4.3). Zero keeps a response only
    /// while fresh (or within its `stale-if-error` window), as a cache that never revalidates.
    pub fn revalidate_window(mut self, window: Duration) -> Self {
        self.config.revalidate_window = window;
        self
    }

    /// Whether a response's `stale-while-revalidate=N` (RFC 5861 §3) is honoured (default
    /// true): for N seconds after it went stale, a GET for it is answered from the store at
    /// once, and the request goes on to the origin in a background task (one per key at a
    /// time in a process, and only by the replica that takes the key's fill lease), whose
    /// response replaces the stored one. False treats such a response as any stale one.
    pub fn stale_while_revalidate(mut self, honour: bool) -> Self {
        self.config.stale_while_revalidate = honour;
        self
    }

    /// The circuit breaker in front of the store, as the `statehouse` facades': after
    /// `failure_threshold` failures in a row (unavailable or past the store deadline) the store
    /// is not called for `open_for`, so that a dead store costs a request nothing instead of a
    /// deadline (or two, on a miss); requests go to the origin as on any store failure. One
    /// per failure domain of the store (on Redis Cluster, a group of slots). Default 3
    /// failures, 1 s, on the layer's clock.
    pub fn circuit_breaker(mut self, config: CircuitBreakerConfig) -> Self {
        self.config.circuit_breaker = config;
        self
    }

    /// The layer, or [`statehouse::Error::InvalidPolicy`] naming the first invalid field.
    pub fn build(self) -> statehouse::Result<HttpCacheLayer> {
        let c = &self.config;
        if !is_sf_token(&c.name) {
            return Err(rejected(
                "cache_name",
                "must be a token: a letter or `*`, then letters, digits and :/!#$%&'*+-.^_`|~",
            ));
        }
        if c.key_prefix.len() > 1024 {
            return Err(rejected("key_prefix", "must be at most 1 024 bytes"));
        }
        if !matches!(c.default_scheme.as_str(), "http" | "https") {
            return Err(rejected("default_scheme", "must be `http` or `https`"));
        }
        if c.max_body_bytes == 0 || c.max_body_bytes > 512 << 20 {
            return Err(rejected("max_body_bytes", "must be 1 byte to 512 MiB"));
        }
        if c.store_deadline < Duration::from_millis(1) || c.store_deadline > Duration::from_secs(60)
        {
            return Err(rejected("store_deadline", "must be 1 ms to 60 s"));
        }
        if c.lease_ttl < Duration::from_secs(1) || c.lease_ttl > Duration::from_secs(3600) {
            return Err(rejected("lease_ttl", "must be 1 s to 1 h"));
        }
        if c.max_vary_headers == 0 || c.max_vary_headers > 32 {
            return Err(rejected("max_vary_headers", "must be 1 to 32"));
        }
        if c.max_variants == 0 || c.max_variants > 1024 {
            return Err(rejected("max_variants", "must be 1 to 1 024"));
        }
        if c.max_ttl < Duration::from_secs(1) || c.max_ttl > CachePolicy::MAX_TTL {
            return Err(rejected("max_ttl", "must be 1 s to one year"));
        }
        if c.revalidate_window > Duration::from_secs(86_400) {
            return Err(rejected("revalidate_window", "must be at most one day"));
        }
        HttpCacheLayer::from_parts(self.store, self.clock, self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(is_sf_token("statehouse"));
        assert!(is_sf_token("edge-1.example/x"));
        assert!(!is_sf_token(""));
        assert!(!is_sf_token("1abc"));
        assert!(!is_sf_token("a b"));
        assert!(!is_sf_token("a;b"));
    }
}
