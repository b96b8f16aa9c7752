//! [`HttpCache`]: the middleware itself.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    AGE, AUTHORIZATION, CONTENT_LENGTH, ETAG, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE,
    IF_UNMODIFIED_SINCE, LAST_MODIFIED, RANGE, SET_COOKIE,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use statehouse::Timestamp;
use statehouse::statehouse_core::cache::{LeaseOutcome, LeaseToken, validate_tag};
use tower_service::Service;

use super::assess::{Plan, assess};
use super::body::{CacheBody, Collected, collect};
use super::conditional::{NOT_MODIFIED_FIELDS, not_modified};
use super::control::RequestDirectives;
use super::flight::{FlightGuard, Join, Outcome, wait};
use super::future::ResponseFuture;
use super::key::{host_conflict, primary_key, variant_digest, variant_key};
use super::layer::Shared;
use super::stats::NotStoredReason;
use super::stored::{Record, StoredResponse, VarySpec, decode};

/// How long a vary spec is kept at least: it is tiny, and when it expires before its variants
/// they become unreachable (a new spec has a new generation).
const MIN_SPEC_TTL: Duration = Duration::from_secs(3600);

/// How many times a request looks its key up again after a coalesced wait did not give it a
/// usable response (the leader was cancelled, or its response varies on other values).
const MAX_ATTEMPTS: usize = 3;

/// The service of an [`HttpCacheLayer`](super::HttpCacheLayer): answers GET and HEAD from
/// the store when it may, forwards (and stores) otherwise, invalidates on successful unsafe
/// methods, and adds `Cache-Status` to every response.
///
/// Ready when the inner service is; clones share the store, the counters and the coalescing.
/// A store that fails or is slow never fails a request: it goes to the inner service.
pub struct HttpCache<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: Clone> Clone for HttpCache<S> {
    fn clone(&self) -> Self {
        HttpCache {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for HttpCache<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCache")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .finish()
    }
}

impl<S> HttpCache<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        HttpCache { inner, shared }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for HttpCache<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send + 'static,
{
    type Response = Response<CacheBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // The service that was polled ready handles this request; the clone stays for the next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        ResponseFuture::new(Box::pin(async move {
            let mut run = Run {
                shared,
                inner,
                _request: PhantomData,
            };
            if req.method() == Method::GET || req.method() == Method::HEAD {
                run.cacheable(req).await
            } else {
                run.other_method(req).await
            }
        }))
    }
}

/// Why a request went to the origin (RFC 9211 `fwd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fwd {
    Bypass,
    Method,
    UriMiss,
    VaryMiss,
    Request,
    Stale,
}

impl Fwd {
    fn as_str(self) -> &'static str {
        match self {
            Fwd::Bypass => "bypass",
            Fwd::Method => "method",
            Fwd::UriMiss => "uri-miss",
            Fwd::VaryMiss => "vary-miss",
            Fwd::Request => "request",
            Fwd::Stale => "stale",
        }
    }
}

/// One `Cache-Status` member (RFC 9211).
#[derive(Debug, Clone, Default)]
struct CacheStatus {
    hit: bool,
    fwd: Option<Fwd>,
    fwd_status: Option<u16>,
    ttl: Option<i64>,
    stored: bool,
    collapsed: bool,
    detail: Option<&'static str>,
}

impl CacheStatus {
    fn hit(ttl: i64) -> Self {
        CacheStatus {
            hit: true,
            ttl: Some(ttl),
            ..Default::default()
        }
    }

    fn fwd(fwd: Fwd, status: Option<StatusCode>) -> Self {
        CacheStatus {
            fwd: Some(fwd),
            fwd_status: status.map(|s| s.as_u16()),
            ..Default::default()
        }
    }

    fn detail(mut self, detail: &'static str) -> Self {
        self.detail = Some(detail);
        self
    }

    fn render(&self, name: &str) -> Option<HeaderValue> {
        let mut s = String::from(name);
        if self.hit {
            s.push_str("; hit");
        }
        if let Some(fwd) = self.fwd {
            s.push_str("; fwd=");
            s.push_str(fwd.as_str());
        }
        if let Some(status) = self.fwd_status {
            s.push_str(&format!("; fwd-status={status}"));
        }
        if let Some(ttl) = self.ttl {
            s.push_str(&format!("; ttl={ttl}"));
        }
        if self.stored {
            s.push_str("; stored");
        }
        if self.collapsed {
            s.push_str("; collapsed");
        }
        if let Some(detail) = self.detail {
            s.push_str("; detail=");
            s.push_str(detail);
        }
        HeaderValue::from_str(&s).ok()
    }
}

/// Whole seconds from `now` until `until`, negative when past.
fn seconds_until(until: Timestamp, now: Timestamp) -> i64 {
    let diff = i128::from(until.as_micros()) - i128::from(now.as_micros());
    i64::try_from(diff.div_euclid(1_000_000)).unwrap_or(i64::MAX)
}

/// What the store holds for a request.
enum Lookup {
    /// A decoded response (tags still valid) under `fill_key`.
    Found {
        response: StoredResponse,
        fill_key: String,
        spec: Option<VarySpec>,
    },
    /// Nothing usable; a response would be filled under `fill_key`.
    Missing {
        fill_key: String,
        spec: Option<VarySpec>,
    },
    /// The store failed or did not answer in time.
    StoreDown,
}

/// What a leader's store write got.
type Stored = Result<(), NotStoredReason>;

/// The state of one request's handling.
struct Run<S, ReqBody> {
    shared: Arc<Shared>,
    inner: S,
    // Ties the request body type to the methods that forward it.
    _request: PhantomData<fn(ReqBody)>,
}

impl Shared {
    /// Adds this cache's `Cache-Status` member, and strips the tag header when configured.
    fn finish<B>(&self, mut res: Response<B>, status: CacheStatus) -> Response<B> {
        let config = &self.config;
        if config.strip_tag_header {
            res.headers_mut().remove(&config.tag_header);
        }
        if let Some(value) = status.render(&config.name) {
            res.headers_mut().append("cache-status", value);
        }
        res
    }

    /// Gives a lease back, best effort (it also expires by itself).
    async fn release(&self, key: &str, token: &LeaseToken) {
        let _ = self.call(key, self.store.release_lease(key, token)).await;
    }

    /// Looks the request up: the primary key, then the variant if a vary spec is there, then
    /// the entry's tag versions if it has tags.
    async fn lookup(&self, primary: &str, request: &HeaderMap) -> Lookup {
        let shared = self;
        let Ok(bytes) = shared.call(primary, shared.store.get(primary)).await else {
            return Lookup::StoreDown;
        };
        let missing = |fill_key: &str, spec| Lookup::Missing {
            fill_key: fill_key.to_owned(),
            spec,
        };
        let (response, fill_key, spec) = match bytes.map(|b| decode(&b)) {
            None => return missing(primary, None),
            Some(Err(e)) => {
                shared.stats.count_decode_error();
                tracing::debug!(error = %e, key = primary, "statehouse: undecodable HTTP cache entry");
                return missing(primary, None);
            }
            Some(Ok(Record::Response(r))) => (r, primary.to_owned(), None),
            Some(Ok(Record::VarySpec(spec))) => {
                let digest = variant_digest(&spec.names, request);
                let vkey = variant_key(primary, spec.generation, &digest);
                let Ok(bytes) = shared.call(&vkey, shared.store.get(&vkey)).await else {
                    return Lookup::StoreDown;
                };
                match bytes.map(|b| decode(&b)) {
                    None => return missing(&vkey, Some(spec)),
                    Some(Ok(Record::Response(r))) => (r, vkey, Some(spec)),
                    Some(_) => {
                        shared.stats.count_decode_error();
                        return missing(&vkey, Some(spec));
                    }
                }
            }
        };
        if !response.tags.is_empty() {
            let names: Vec<String> = response.tags.iter().map(|(n, _)| n.clone()).collect();
            let Ok(versions) = shared
                .call(
                    names.first().map_or("", String::as_str),
                    shared.store.tag_versions(&names),
                )
                .await
            else {
                return Lookup::StoreDown;
            };
            let current = response
                .tags
                .iter()
                .map(|(_, v)| *v)
                .eq(versions.iter().copied());
            if !current {
                return missing(&fill_key, spec); // purged by tag
            }
        }
        Lookup::Found {
            response,
            fill_key,
            spec,
        }
    }

    /// A leader's response that is not stored: the lease goes back, waiters go upstream
    /// themselves, and the client gets `res`, to a request the origin answered `origin_status`
    /// (a revalidation's 304 for the stored response it refreshed; otherwise `res` is the
    /// origin's response as it came, whatever the client's own conditions).
    async fn not_stored<B: Body>(
        &self,
        fill: Fill<'_>,
        lease: Result<LeaseToken, NotStoredReason>,
        reason: NotStoredReason,
        res: Response<CacheBody<B>>,
        origin_status: StatusCode,
    ) -> Response<CacheBody<B>> {
        if let Ok(token) = &lease {
            self.release(&fill.fill_key, token).await;
        }
        fill.guard.finish(Outcome::NotShareable);
        self.stats.count_not_stored(reason);
        let status = CacheStatus::fwd(fill.fwd, Some(origin_status)).detail(reason.as_str());
        self.finish(res, status)
    }

    /// Writes a leader's response under its lease: the tag versions (and the epoch, unchanged
    /// since before the origin was asked), then the entry, and for a new `Vary` the variant and
    /// the spec.
    async fn store_fill(
        &self,
        fill: &Fill<'_>,
        token: &LeaseToken,
        epoch: u64,
        plan: &Plan,
        mut stored: StoredResponse,
        digest: &[u8; 32],
    ) -> Stored {
        let shared = self;
        let store = &shared.store;
        let mut names: Vec<String> = plan.tags.iter().map(|t| shared.tag_key(t)).collect();
        if names.iter().any(|n| validate_tag(n).is_err()) {
            return Err(NotStoredReason::Tags);
        }
        names.push(shared.epoch_tag());
        let versions = shared
            .call(
                names.first().map_or("", String::as_str),
                store.tag_versions(&names),
            )
            .await
            .map_err(|_| NotStoredReason::StoreUnavailable)?;
        if versions.len() != names.len() {
            return Err(NotStoredReason::StoreUnavailable);
        }
        if versions.last() != Some(&epoch) {
            return Err(NotStoredReason::PurgedDuringFill);
        }
        names.pop();
        stored.tags = names.into_iter().zip(versions).collect();

        let now = shared.clock.now();
        let ttl = stored
            .keep_until(shared.config.revalidate_window, shared.config.max_ttl)
            .saturating_duration_since(now);
        if ttl.is_zero() {
            return Err(NotStoredReason::StaleOnArrival);
        }
        let bytes = stored.encode().map_err(|_| NotStoredReason::TooLarge)?;
        let filled = |ok: statehouse::Result<bool>| match ok {
            Ok(true) => Ok(()),
            Ok(false) => Err(NotStoredReason::PurgedDuringFill),
            Err(_) => Err(NotStoredReason::StoreUnavailable),
        };
        match &fill.spec {
            // Under an existing spec: the fill key is the variant's, and the lease is on it.
            Some(spec) if plan.vary.is_empty() || plan.vary == spec.names => {
                if fill.new_variant {
                    self.count_variant(fill.primary, spec.generation, ttl, now)
                        .await?;
                }
                filled(
                    shared
                        .call(
                            &fill.fill_key,
                            store.set(&fill.fill_key, &bytes, ttl, Some(token)),
                        )
                        .await,
                )
            }
            Some(_) => {
                // The origin now varies on other fields: drop the spec, so the next miss
                // writes one for the new Vary.
                let _ = shared.call(fill.primary, store.delete(fill.primary)).await;
                Err(NotStoredReason::VaryChanged)
            }
            None if plan.vary.is_empty() => filled(
                shared
                    .call(
                        fill.primary,
                        store.set(fill.primary, &bytes, ttl, Some(token)),
                    )
                    .await,
            ),
            None => {
                // A new spec: the variant first, under a fresh generation nobody else knows,
                // then the spec under the primary key's lease. If the lease was voided (a
                // purge), the spec is not written and the variant is unreachable.
                let generation = getrandom::u64().map_err(|_| NotStoredReason::StoreUnavailable)?;
                let vkey = variant_key(fill.primary, generation, digest);
                shared
                    .call(&vkey, store.set(&vkey, &bytes, ttl, None))
                    .await
                    .map_err(|_| NotStoredReason::StoreUnavailable)?;
                let spec_ttl = ttl.max(MIN_SPEC_TTL);
                let spec = VarySpec {
                    generation,
                    variants: 1,
                    names: plan.vary.clone(),
                    until: now.saturating_add(spec_ttl),
                };
                let spec_bytes = spec.encode().map_err(|_| NotStoredReason::TooManyVary)?;
                filled(
                    shared
                        .call(
                            fill.primary,
                            store.set(fill.primary, &spec_bytes, spec_ttl, Some(token)),
                        )
                        .await,
                )
            }
        }
    }

    /// Counts one more variant in the spec of generation `generation`, under the primary
    /// key's lease: refused when the spec is gone or replaced (a purge), when another filler
    /// holds the lease, or when the spec already has `max_variants` variants. Refusing when
    /// the count cannot be taken keeps the bound strict across replicas.
    async fn count_variant(
        &self,
        primary: &str,
        generation: u64,
        ttl: Duration,
        now: Timestamp,
    ) -> Stored {
        let lease_ttl = self.config.lease_ttl;
        let token = match self
            .call(primary, self.store.acquire_lease(primary, now, lease_ttl))
            .await
        {
            Ok(LeaseOutcome::Acquired(token)) => token,
            Ok(LeaseOutcome::HeldElsewhere) => return Err(NotStoredReason::LeaseHeld),
            Err(_) => return Err(NotStoredReason::StoreUnavailable),
        };
        let counted = async {
            let current = match self.call(primary, self.store.get(primary)).await {
                Err(_) => return Err(NotStoredReason::StoreUnavailable),
                Ok(None) => return Err(NotStoredReason::PurgedDuringFill),
                Ok(Some(bytes)) => match decode(&bytes) {
                    Ok(Record::VarySpec(spec)) if spec.generation == generation => spec,
                    _ => return Err(NotStoredReason::PurgedDuringFill),
                },
            };
            if usize::from(current.variants) >= self.config.max_variants {
                return Err(NotStoredReason::TooManyVariants);
            }
            let until = current.until.max(now.saturating_add(ttl.max(MIN_SPEC_TTL)));
            let updated = VarySpec {
                variants: current.variants.saturating_add(1),
                until,
                ..current
            };
            let bytes = updated.encode().map_err(|_| NotStoredReason::TooManyVary)?;
            let spec_ttl = until.saturating_duration_since(now);
            match self
                .call(
                    primary,
                    self.store.set(primary, &bytes, spec_ttl, Some(&token)),
                )
                .await
            {
                Ok(true) => Ok(()),
                Ok(false) => Err(NotStoredReason::PurgedDuringFill),
                Err(_) => Err(NotStoredReason::StoreUnavailable),
            }
        }
        .await;
        if counted.is_err() {
            self.release(primary, &token).await;
        }
        counted
    }
}

impl<S, ReqBody, ResBody> Run<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send + 'static,
{
    /// The inner service's response, untouched.
    async fn forward(
        &mut self,
        req: Request<ReqBody>,
    ) -> Result<Response<CacheBody<ResBody>>, S::Error> {
        Ok(self.inner.call(req).await?.map(CacheBody::stream))
    }

    /// Forwards without the cache's help (and without storing), with `status`.
    async fn forward_alone(
        &mut self,
        req: Request<ReqBody>,
        fwd: Fwd,
        reason: NotStoredReason,
    ) -> Result<Response<CacheBody<ResBody>>, S::Error> {
        self.shared.stats.count_miss();
        self.shared.stats.count_not_stored(reason);
        let res = self.forward(req).await?;
        let status = CacheStatus::fwd(fwd, Some(res.status())).detail(reason.as_str());
        Ok(self.shared.finish(res, status))
    }

    /// Methods other than GET and HEAD: forwarded; an unsafe one that succeeds drops the
    /// stored entry of its target (RFC 9111 §4.4).
    async fn other_method(
        &mut self,
        req: Request<ReqBody>,
    ) -> Result<Response<CacheBody<ResBody>>, S::Error> {
        let safe = matches!(*req.method(), Method::OPTIONS | Method::TRACE);
        let config = &self.shared.config;
        let target = if safe {
            None
        } else {
            primary_key(
                &config.key_prefix,
                &config.default_scheme,
                req.uri(),
                req.headers(),
            )
        };
        let res = self.forward(req).await?;
        if let Some(key) = target
            && (res.status().is_success() || res.status().is_redirection())
        {
            let shared = &self.shared;
            if let Ok(true) = shared.call(&key, shared.store.delete(&key)).await {
                shared.stats.count_invalidation();
            }
        }
        let status = CacheStatus::fwd(Fwd::Method, Some(res.status()));
        Ok(self.shared.finish(res, status))
    }

    /// GET and HEAD.
    async fn cacheable(
        &mut self,
        req: Request<ReqBody>,
    ) -> Result<Response<CacheBody<ResBody>>, S::Error> {
        let cc = RequestDirectives::parse(req.headers());
        let head = req.method() == Method::HEAD;
        let authorized = req.headers().contains_key(AUTHORIZATION);
        let config = &self.shared.config;
        // Preconditions other than `If-None-Match` / `If-Modified-Since` make the origin's
        // answer (a 412, a 206) one for this client alone: it goes as it is, and is neither
        // stored nor shared.
        let precondition = [IF_MATCH, IF_UNMODIFIED_SINCE, IF_RANGE]
            .iter()
            .any(|name| req.headers().contains_key(name));
        let bypass = if cc.no_store {
            Some("no-store")
        } else if req.headers().contains_key(RANGE) {
            Some("range")
        } else if precondition {
            Some("precondition")
        } else if authorized && !config.cache_authorized {
            Some("authorization")
        } else if host_conflict(&config.default_scheme, req.uri(), req.headers()) {
            Some("host-mismatch")
        } else {
            None
        };
        let primary = match bypass {
            Some(_) => None,
            None => primary_key(
                &config.key_prefix,
                &config.default_scheme,
                req.uri(),
                req.headers(),
            ),
        };
        let Some(primary) = primary else {
            self.shared.stats.count_bypassed();
            let res = self.forward(req).await?;
            let status = CacheStatus::fwd(Fwd::Bypass, Some(res.status()))
                .detail(bypass.unwrap_or("no-host"));
            return Ok(self.shared.finish(res, status));
        };

        for _ in 0..MAX_ATTEMPTS {
            let found = self.shared.lookup(&primary, req.headers()).await;
            let now = self.shared.clock.now();
            let (fwd, fill_key, spec, prior) = match found {
                Lookup::StoreDown => {
                    return self
                        .forward_alone(req, Fwd::UriMiss, NotStoredReason::StoreUnavailable)
                        .await;
                }
                Lookup::Found {
                    response,
                    fill_key,
                    spec,
                } => {
                    let fresh = now < response.fresh_until;
                    let age = response.current_age(now);
                    let remaining = response.fresh_until.saturating_duration_since(now);
                    let acceptable = fresh
                        && !cc.refuses_stored()
                        && cc.max_age.is_none_or(|m| age <= Duration::from_secs(m))
                        && cc
                            .min_fresh
                            .is_none_or(|m| remaining >= Duration::from_secs(m));
                    if acceptable {
                        self.shared.stats.count_hit();
                        let res = serve_stored_to(&req, &response, now);
                        let ttl = seconds_until(response.fresh_until, now);
                        return Ok(self.shared.finish(res, CacheStatus::hit(ttl)));
                    }
                    // RFC 5861 stale-while-revalidate: the stale response now, the refresh in
                    // the background.
                    let config = &self.shared.config;
                    if !fresh
                        && !head
                        && config.stale_while_revalidate
                        && !cc.refuses_stored()
                        && cc.max_age.is_none()
                        && cc.min_fresh.is_none()
                        && now < response.revalidate_until(config.max_ttl)
                    {
                        let stale = Stale {
                            response,
                            fill_key,
                            spec,
                            authorized,
                        };
                        return Ok(self.while_revalidating(req, &primary, stale, now));
                    }
                    // Kept to be served on an origin error (a stale one within its
                    // stale-if-error window) or to be revalidated (one with a validator).
                    let serve_on_error = !fresh && now < response.stale_until;
                    let fwd = if fresh { Fwd::Request } else { Fwd::Stale };
                    let prior = (serve_on_error || response.has_validator()).then(|| Prior {
                        response,
                        serve_on_error,
                    });
                    (fwd, fill_key, spec, prior)
                }
                Lookup::Missing { fill_key, spec } => {
                    let fwd = if spec.is_some() {
                        Fwd::VaryMiss
                    } else {
                        Fwd::UriMiss
                    };
                    (fwd, fill_key, spec, None)
                }
            };
            if cc.only_if_cached {
                // RFC 9111 §5.2.1.7: a 504 rather than going to the origin.
                let mut res = Response::new(CacheBody::empty());
                *res.status_mut() = StatusCode::GATEWAY_TIMEOUT;
                let status = CacheStatus::fwd(fwd, None).detail("only-if-cached");
                return Ok(self.shared.finish(res, status));
            }
            if head {
                // Its response has no body to store; only a GET fills the entry.
                return self.forward_alone(req, fwd, NotStoredReason::Head).await;
            }
            match self.shared.flights.join(&fill_key, !cc.refuses_stored()) {
                Join::Busy => {
                    return self
                        .forward_alone(req, fwd, NotStoredReason::LeaseHeld)
                        .await;
                }
                Join::Waiter(slot) => match wait(slot).await.as_deref() {
                    Some(Outcome::Shared { response, vary }) => {
                        let matches = vary.as_ref().is_none_or(|(names, digest)| {
                            variant_digest(names, req.headers()) == *digest
                        });
                        if matches {
                            self.shared.stats.count_coalesced();
                            let now = self.shared.clock.now();
                            let res = serve_stored_to(&req, response, now);
                            let mut status = CacheStatus::fwd(fwd, Some(response.status));
                            status.collapsed = true;
                            return Ok(self.shared.finish(res, status));
                        }
                        // Another variant: look up again (the spec is stored by now).
                    }
                    Some(Outcome::NotShareable) => {
                        self.shared.stats.count_miss();
                        let res = self.forward(req).await?;
                        let status = CacheStatus::fwd(fwd, Some(res.status()));
                        return Ok(self.shared.finish(res, status));
                    }
                    None => {} // the leader was cancelled: look up again
                },
                Join::Leader(guard) => {
                    let fill = Fill {
                        guard,
                        primary: &primary,
                        fill_key,
                        spec,
                        fwd,
                        prior,
                        authorized,
                        new_variant: fwd == Fwd::VaryMiss,
                        background: false,
                    };
                    return self.lead(req, fill).await;
                }
            }
        }
        self.forward_alone(req, Fwd::UriMiss, NotStoredReason::LeaseHeld)
            .await
    }

    /// Answers a GET from a stale response within its `stale-while-revalidate` window
    /// (RFC 5861 §3) and revalidates it in the background: the request itself goes on to the
    /// origin from a task of its own, as the leader of the key's flight, unless another
    /// request of this process already leads one (then nothing more is sent), or no tokio
    /// runtime is current. The client's own conditions are answered from the stale response.
    fn while_revalidating(
        &mut self,
        req: Request<ReqBody>,
        primary: &str,
        stale: Stale,
        now: Timestamp,
    ) -> Response<CacheBody<ResBody>> {
        let shared = self.shared.clone();
        shared.stats.count_hit();
        shared.stats.count_stale_while_revalidate();
        let res = serve_stored_to(&req, &stale.response, now);
        let status = CacheStatus::hit(seconds_until(stale.response.fresh_until, now))
            .detail("stale-while-revalidate");
        let res = shared.finish(res, status);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return res;
        };
        let Join::Leader(guard) = shared.flights.join(&stale.fill_key, false) else {
            return res;
        };
        // The service this request was polled ready for goes to the background request.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let mut run = Run {
            shared: shared.clone(),
            inner,
            _request: PhantomData,
        };
        let primary = primary.to_owned();
        runtime.spawn(async move {
            let serve_on_error = now < stale.response.stale_until;
            let fill = Fill {
                guard,
                primary: &primary,
                fill_key: stale.fill_key,
                spec: stale.spec,
                fwd: Fwd::Stale,
                prior: Some(Prior {
                    response: stale.response,
                    serve_on_error,
                }),
                authorized: stale.authorized,
                new_variant: false,
                background: true,
            };
            // Nobody waits for this response: storing it was the point. An origin error
            // leaves the stale entry in place until its window ends.
            drop(run.lead(req, fill).await);
        });
        res
    }

    /// The leader of a flight: takes the store lease, forwards, stores, shares.
    async fn lead(
        &mut self,
        req: Request<ReqBody>,
        mut fill: Fill<'_>,
    ) -> Result<Response<CacheBody<ResBody>>, S::Error> {
        let shared = self.shared.clone();
        let stats = &shared.stats;
        stats.count_miss();
        let now = shared.clock.now();
        let lease = match shared
            .call(
                &fill.fill_key,
                shared
                    .store
                    .acquire_lease(&fill.fill_key, now, shared.config.lease_ttl),
            )
            .await
        {
            Ok(LeaseOutcome::Acquired(token)) => Ok(token),
            Ok(LeaseOutcome::HeldElsewhere) => Err(NotStoredReason::LeaseHeld),
            Err(_) => Err(NotStoredReason::StoreUnavailable),
        };
        // Given back in the background if this future is dropped (its client went away)
        // before the lease is used or released, so the key does not wait out the lease. Set
        // up before anything else is awaited.
        let mut held = HeldLease {
            shared: shared.clone(),
            key: fill.fill_key.clone(),
            token: lease.as_ref().ok().cloned(),
        };
        if fill.background && lease.is_err() {
            // A background revalidation that cannot store (another replica refreshes the key,
            // or the store is down) does not ask the origin; its client was answered already,
            // and this response goes nowhere.
            return Ok(Response::new(CacheBody::empty()));
        }
        // The tag epoch before the origin is asked (see `purge.rs`).
        let epoch = match &lease {
            Ok(_) => match shared
                .call(
                    &shared.epoch_tag(),
                    shared.store.tag_versions(&[shared.epoch_tag()]),
                )
                .await
            {
                Ok(v) if v.len() == 1 => Ok(v[0]),
                _ => Err(NotStoredReason::StoreUnavailable),
            },
            Err(reason) => Err(*reason),
        };
        let request_headers = req.headers().clone();
        let mut req = req;
        // A client's own conditions (`If-None-Match`, `If-Modified-Since`: a browser that holds
        // a copy) are kept from the origin when this fill may store, so that the origin sends
        // the whole response and the cache fills (a 304 for the client's copy could not be
        // stored); the client's conditions are then answered from what the origin sent
        // (`answer_conditions`). Without the lease, nothing will be stored: they go as they are.
        // A response that turns out not storable goes to the client as the origin sent it (a
        // 200 answers a conditional GET too): the cache answers conditions only for what it
        // stores, never dropping, say, the `Set-Cookie` of a response it does not keep.
        let client_conditions = req.headers().contains_key(IF_NONE_MATCH)
            || req.headers().contains_key(IF_MODIFIED_SINCE);
        let answering = client_conditions && lease.is_ok() && epoch.is_ok();
        if answering {
            let headers = req.headers_mut();
            headers.remove(IF_NONE_MATCH);
            headers.remove(IF_MODIFIED_SINCE);
        }
        // A stored response with a validator is revalidated (RFC 9111 §4.3.1): the origin gets
        // its validators, unless the client's own conditions went to it (the origin's answer
        // then speaks to those, and passes through as it comes).
        let revalidating = match &fill.prior {
            Some(prior)
                if prior.response.has_validator()
                    && !req.headers().contains_key(IF_NONE_MATCH)
                    && !req.headers().contains_key(IF_MODIFIED_SINCE) =>
            {
                let headers = req.headers_mut();
                if let Some(etag) = prior.response.headers.get(ETAG) {
                    headers.insert(IF_NONE_MATCH, etag.clone());
                }
                if let Some(modified) = prior.response.headers.get(LAST_MODIFIED) {
                    headers.insert(IF_MODIFIED_SINCE, modified.clone());
                }
                true
            }
            _ => false,
        };
        let request_time = shared.clock.now();
        let result = self.inner.call(req).await;
        let response_time = shared.clock.now();

        let serve_on_error = fill.prior.as_ref().is_some_and(|p| p.serve_on_error);
        let res = match result {
            Ok(res) if !(serve_on_error && is_origin_error(res.status())) => res,
            other => {
                if let Ok(token) = &lease {
                    self.shared.release(&fill.fill_key, token).await;
                }
                // Dropping the guard abandons the flight: waiters look up again, one at a time
                // leading, rather than all hitting a failing origin at once.
                held.disarm();
                drop(fill.guard);
                let Some(Prior {
                    response: stale, ..
                }) = fill.prior.filter(|p| p.serve_on_error)
                else {
                    return other.map(|res| res.map(CacheBody::stream));
                };
                // RFC 5861 stale-if-error, within the response's window.
                stats.count_stale_served();
                let now = shared.clock.now();
                let mut status =
                    CacheStatus::fwd(Fwd::Stale, other.as_ref().ok().map(|r| r.status()))
                        .detail("stale-if-error");
                status.ttl = Some(seconds_until(stale.fresh_until, now));
                let res = serve_stored(&stale, false, now);
                return Ok(self.shared.finish(res, status));
            }
        };

        let (parts, body) = res.into_parts();
        if revalidating
            && parts.status == StatusCode::NOT_MODIFIED
            && let Some(prior) = fill.prior.take()
        {
            drop(body);
            let times = (request_time, response_time);
            return Ok(shared
                .revalidated(
                    fill,
                    prior,
                    lease,
                    epoch,
                    &mut held,
                    &parts.headers,
                    &request_headers,
                    times,
                )
                .await);
        }
        let plan = match assess(
            parts.status,
            &parts.headers,
            fill.authorized,
            &shared.config,
            request_time,
            response_time,
        ) {
            Ok(plan) => plan,
            Err(reason) => {
                let origin_status = parts.status;
                let res = Response::from_parts(parts, CacheBody::stream(body));
                let res = shared
                    .not_stored(fill, lease, reason, res, origin_status)
                    .await;
                held.disarm();
                return Ok(res);
            }
        };
        let body = match collect(body, shared.config.max_body_bytes).await {
            Collected::Complete(bytes) => bytes,
            Collected::Partial(body, reason) => {
                let origin_status = parts.status;
                let res = Response::from_parts(parts, body);
                let res = shared
                    .not_stored(fill, lease, reason, res, origin_status)
                    .await;
                held.disarm();
                return Ok(res);
            }
        };
        let status = parts.status;
        let (written, _) = shared
            .store_and_share(
                fill.fwd,
                fill,
                lease,
                epoch,
                &mut held,
                (status, &plan, body.clone()),
                &request_headers,
                response_time,
            )
            .await;
        let mut res = Response::from_parts(parts, CacheBody::full(body));
        if answering {
            res = answer_conditions(&request_headers, res);
        }
        Ok(self.shared.finish(res, written))
    }
}

/// A stored response's fields with its `Content-Length`: the length is known once the body
/// is, and a HEAD answered from the entry reports it too.
fn with_length(headers: &HeaderMap, status: StatusCode, len: usize) -> HeaderMap {
    let mut headers = headers.clone();
    let may_have_length = !(status.is_informational() || status == StatusCode::NO_CONTENT);
    if may_have_length && !headers.contains_key(CONTENT_LENGTH) {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    headers
}

/// A response built from a stored one, with its `Age` (RFC 9111 §5.1).
fn serve_stored<B: Body>(
    stored: &StoredResponse,
    head: bool,
    now: Timestamp,
) -> Response<CacheBody<B>> {
    let body = if head {
        CacheBody::empty()
    } else {
        CacheBody::full(stored.body.clone())
    };
    let mut res = Response::new(body);
    *res.status_mut() = stored.status;
    *res.headers_mut() = stored.headers.clone();
    res.headers_mut()
        .insert(AGE, HeaderValue::from(stored.current_age(now).as_secs()));
    res
}

/// [`serve_stored`] for `req`, or a `304 Not Modified` when the request's preconditions say
/// the client's copy is current (RFC 9111 §4.3.2): the fields a 304 carries, `Age`, no body.
fn serve_stored_to<ReqBody, B: Body>(
    req: &Request<ReqBody>,
    stored: &StoredResponse,
    now: Timestamp,
) -> Response<CacheBody<B>> {
    serve_stored_for(req.method(), req.headers(), stored, now)
}

/// [`serve_stored_to`] for a request's method and fields.
fn serve_stored_for<B: Body>(
    method: &Method,
    request: &HeaderMap,
    stored: &StoredResponse,
    now: Timestamp,
) -> Response<CacheBody<B>> {
    if !not_modified(method, request, stored.status, &stored.headers) {
        return serve_stored(stored, method == Method::HEAD, now);
    }
    let mut res = not_modified_from(&stored.headers);
    res.headers_mut()
        .insert(AGE, HeaderValue::from(stored.current_age(now).as_secs()));
    res
}

/// A `304 Not Modified` carrying the fields of `NOT_MODIFIED_FIELDS` from `headers` (those of
/// the `200` the client's copy matches), and no body.
fn not_modified_from<B: Body>(headers: &HeaderMap) -> Response<CacheBody<B>> {
    let mut res = Response::new(CacheBody::empty());
    *res.status_mut() = StatusCode::NOT_MODIFIED;
    let out = res.headers_mut();
    for name in NOT_MODIFIED_FIELDS {
        for value in headers.get_all(&name) {
            out.append(name.clone(), value.clone());
        }
    }
    res
}

/// A leader's storable response to a GET whose client conditions were kept from the origin:
/// a `304 Not Modified` when the conditions (`client`) say the client's copy of this `200` is
/// current, else the response as it is. The body of a response turned into a 304 is dropped;
/// its `Age` and `Set-Cookie` (the origin's, for this client: a 304 may set cookies too) are
/// kept. Never for a response that is not stored: that one goes as it came.
fn answer_conditions<B: Body>(
    client: &HeaderMap,
    res: Response<CacheBody<B>>,
) -> Response<CacheBody<B>> {
    if !not_modified(&Method::GET, client, res.status(), res.headers()) {
        return res;
    }
    let mut not_modified = not_modified_from(res.headers());
    if let Some(age) = res.headers().get(AGE) {
        not_modified.headers_mut().insert(AGE, age.clone());
    }
    for cookie in res.headers().get_all(SET_COOKIE) {
        not_modified
            .headers_mut()
            .append(SET_COOKIE, cookie.clone());
    }
    not_modified
}

/// A status that lets a stale-if-error response be served instead (RFC 5861 §4).
fn is_origin_error(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

/// A leader's fill lease, given back by a background task if the leader is dropped while it
/// still holds it.
struct HeldLease {
    shared: Arc<Shared>,
    key: String,
    token: Option<LeaseToken>,
}

impl HeldLease {
    /// The lease was used or given back: nothing left to do.
    fn disarm(&mut self) {
        self.token = None;
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        let Some(token) = self.token.take() else {
            return;
        };
        // Without a runtime (it is shutting down) the lease simply expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let shared = self.shared.clone();
            let key = std::mem::take(&mut self.key);
            runtime.spawn(async move { shared.release(&key, &token).await });
        }
    }
}

/// What a leader knows about the fill it leads.
struct Fill<'a> {
    guard: FlightGuard,
    primary: &'a str,
    fill_key: String,
    spec: Option<VarySpec>,
    fwd: Fwd,
    /// The stored response the request found, when it may still serve (see [`Prior`]).
    prior: Option<Prior>,
    authorized: bool,
    /// The key has a vary spec but no entry for this variant: storing adds a variant.
    new_variant: bool,
    /// A `stale-while-revalidate` refresh, whose client was answered already: it asks the
    /// origin only when it holds the store's lease.
    background: bool,
}

/// A stale response served within its `stale-while-revalidate` window, and what its
/// background revalidation needs.
struct Stale {
    response: StoredResponse,
    fill_key: String,
    spec: Option<VarySpec>,
    authorized: bool,
}

/// A stored response a leader found but could not serve as it was (stale, or refused by the
/// request's own directives), kept for two uses: served if the origin fails within its
/// `stale-if-error` window (`serve_on_error`), and revalidated when it has a validator.
struct Prior {
    response: StoredResponse,
    serve_on_error: bool,
}

impl Shared {
    /// The origin answered a revalidation `304 Not Modified`: the prior response, its fields
    /// updated from the 304's (RFC 9111 §3.2, `Content-Length` excepted) and its freshness
    /// judged again on them, is stored and shared under the fill, and the client gets it
    /// whole. If the updated response may not be stored (the 304 now says `no-store`, say),
    /// the client still gets it, and nothing is stored.
    #[allow(clippy::too_many_arguments)]
    async fn revalidated<B: Body>(
        &self,
        fill: Fill<'_>,
        Prior {
            response: prior, ..
        }: Prior,
        lease: Result<LeaseToken, NotStoredReason>,
        epoch: Result<u64, NotStoredReason>,
        held: &mut HeldLease,
        not_modified: &HeaderMap,
        request_headers: &HeaderMap,
        (request_time, response_time): (Timestamp, Timestamp),
    ) -> Response<CacheBody<B>> {
        let shared = self;
        let mut headers = prior.headers.clone();
        for name in not_modified.keys() {
            if name == CONTENT_LENGTH {
                continue;
            }
            headers.remove(name);
            for value in not_modified.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        let plan = match assess(
            prior.status,
            &headers,
            fill.authorized,
            &shared.config,
            request_time,
            response_time,
        ) {
            Ok(plan) => plan,
            Err(reason) => {
                let mut res = Response::new(CacheBody::full(prior.body.clone()));
                *res.status_mut() = prior.status;
                *res.headers_mut() = headers;
                res.headers_mut().remove(AGE);
                let res = shared
                    .not_stored(fill, lease, reason, res, StatusCode::NOT_MODIFIED)
                    .await;
                held.disarm();
                return res;
            }
        };
        let (mut status, stored) = self
            .store_and_share(
                fill.fwd,
                fill,
                lease,
                epoch,
                held,
                (prior.status, &plan, prior.body),
                request_headers,
                response_time,
            )
            .await;
        status.fwd_status = Some(StatusCode::NOT_MODIFIED.as_u16());
        // The client's own conditions, if it sent any, are answered from the refreshed entry.
        let res = serve_stored_for(&Method::GET, request_headers, &stored, shared.clock.now());
        shared.finish(res, status)
    }

    /// Stores a leader's response under its lease and shares it with the flight's waiters;
    /// the `Cache-Status` of the leader's own response, and the response as stored.
    #[allow(clippy::too_many_arguments)]
    async fn store_and_share(
        &self,
        fwd: Fwd,
        fill: Fill<'_>,
        lease: Result<LeaseToken, NotStoredReason>,
        epoch: Result<u64, NotStoredReason>,
        held: &mut HeldLease,
        (status, plan, body): (StatusCode, &Plan, Bytes),
        request_headers: &HeaderMap,
        response_time: Timestamp,
    ) -> (CacheStatus, Arc<StoredResponse>) {
        let shared = self;
        let stored = StoredResponse {
            status,
            headers: with_length(&plan.headers, status, body.len()),
            body,
            response_time,
            initial_age: plan.initial_age,
            fresh_until: plan.fresh_until,
            stale_until: plan.stale_until,
            tags: Vec::new(),
        };
        let digest = variant_digest(&plan.vary, request_headers);
        let written = match (lease, epoch) {
            (Ok(token), Ok(epoch)) => {
                let written = shared
                    .store_fill(&fill, &token, epoch, plan, stored.clone(), &digest)
                    .await;
                if written.is_err() {
                    shared.release(&fill.fill_key, &token).await;
                }
                written
            }
            (Ok(token), Err(reason)) => {
                shared.release(&fill.fill_key, &token).await;
                Err(reason)
            }
            (Err(reason), _) => Err(reason),
        };
        held.disarm();
        let vary = (!plan.vary.is_empty()).then(|| (plan.vary.clone(), digest));
        let stored = Arc::new(stored);
        fill.guard.finish(Outcome::Shared {
            response: stored.clone(),
            vary,
        });

        let mut cache_status = CacheStatus::fwd(fwd, Some(status));
        match written {
            Ok(()) => {
                shared.stats.count_stored();
                cache_status.stored = true;
            }
            Err(reason) => {
                shared.stats.count_not_stored(reason);
                cache_status.detail = Some(reason.as_str());
            }
        }
        (cache_status, stored)
    }
}
