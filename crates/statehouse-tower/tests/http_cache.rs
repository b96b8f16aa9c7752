//! The HTTP cache layer, rule by rule (RFC 9111, RFC 9211), over the real embedded store and a
//! `ManualClock`, through `tower::ServiceExt::oneshot` against a counting origin.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use axum::body::{Body, Bytes};
use http::header::{
    ACCEPT_ENCODING, AGE, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, DATE, ETAG, HOST, IF_MATCH,
    IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE, LAST_MODIFIED, RANGE,
    SET_COOKIE, VARY,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use statehouse::statehouse_core::cache::{
    CacheStore, Envelope, EnvelopeFlags, InvalidationSink, InvalidationSubscription, LeaseOutcome,
    LeaseToken,
};
use statehouse::{BreakerState, Clock, EmbeddedCacheStore, ManualClock, Timestamp};
use statehouse_testkit::cache_intercept::{Intercept, Intercepted};
use statehouse_tower::cache::{CacheBody, HttpCacheLayer, HttpCacheLayerBuilder, NotStoredReason};
use tokio::sync::Semaphore;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

const HOST_NAME: &str = "example.com";

/// The origin's answer to the n-th call (from 1).
type Respond = dyn Fn(&Request<Body>, usize, Timestamp) -> Response<Body> + Send + Sync;

type Cached = BoxCloneSyncService<Request<Body>, Response<CacheBody<Body>>, Infallible>;

struct Harness {
    clock: ManualClock,
    store: Arc<dyn CacheStore>,
    calls: Arc<AtomicUsize>,
    layer: HttpCacheLayer,
    svc: Cached,
    /// When set, the origin waits for a permit before answering.
    gate: Option<Arc<Semaphore>>,
}

struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Got {
    fn cache_status(&self) -> &str {
        self.headers
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("<none>")
    }
    fn age(&self) -> Option<u64> {
        self.headers
            .get(AGE)
            .and_then(|v| v.to_str().ok()?.parse().ok())
    }
}

fn start() -> ManualClock {
    ManualClock::new(Timestamp::from_micros(1_000_000_000 * 1_000_000))
}

fn http_date(t: Timestamp) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_micros(t.as_micros()))
}

fn embedded(clock: &ManualClock) -> Arc<dyn CacheStore> {
    Arc::new(
        EmbeddedCacheStore::builder()
            .clock(clock.clone())
            .build()
            .expect("embedded cache store"),
    )
}

fn harness_with(
    store: Option<Arc<dyn CacheStore>>,
    gated: bool,
    configure: impl FnOnce(HttpCacheLayerBuilder) -> HttpCacheLayerBuilder,
    respond: impl Fn(&Request<Body>, usize, Timestamp) -> Response<Body> + Send + Sync + 'static,
) -> Harness {
    let clock = start();
    let store = store.unwrap_or_else(|| embedded(&clock));
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = gated.then(|| Arc::new(Semaphore::new(0)));
    let respond: Arc<Respond> = Arc::new(respond);
    let origin = {
        let (calls, gate, clock) = (calls.clone(), gate.clone(), clock.clone());
        tower::service_fn(move |req: Request<Body>| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let (respond, gate, clock) = (respond.clone(), gate.clone(), clock.clone());
            async move {
                if let Some(gate) = gate {
                    gate.acquire().await.expect("gate open").forget();
                }
                Ok::<_, Infallible>(respond(&req, n, clock.now()))
            }
        })
    };
    let layer = configure(
        HttpCacheLayer::builder(store.clone()).clock(Arc::new(clock.clone()) as Arc<dyn Clock>),
    )
    .build()
    .expect("valid layer");
    let svc = BoxCloneSyncService::new(layer.layer(origin));
    Harness {
        clock,
        store,
        calls,
        layer,
        svc,
        gate,
    }
}

fn harness(
    respond: impl Fn(&Request<Body>, usize, Timestamp) -> Response<Body> + Send + Sync + 'static,
) -> Harness {
    harness_with(None, false, |b| b, respond)
}

/// A 200 with `Cache-Control: cc` (when not empty), a `Date`, and the call number as body.
fn ok(cc: &str, n: usize, now: Timestamp) -> Response<Body> {
    let mut b = Response::builder().header(DATE, http_date(now));
    if !cc.is_empty() {
        b = b.header(CACHE_CONTROL, cc);
    }
    b.body(Body::from(format!("response {n}")))
        .expect("response")
}

fn get(path: &str) -> Request<Body> {
    request(Method::GET, path)
}

fn request(method: Method, path: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, HOST_NAME)
        .body(Body::empty())
        .expect("request")
}

fn with(mut req: Request<Body>, name: http::HeaderName, value: &str) -> Request<Body> {
    req.headers_mut()
        .append(name, value.parse().expect("header value"));
    req
}

impl Harness {
    async fn send(&self, req: Request<Body>) -> Got {
        let res = self.svc.clone().oneshot(req).await.expect("infallible");
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        Got {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    async fn get(&self, path: &str) -> Got {
        self.send(get(path)).await
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn advance(&self, secs: u64) {
        self.clock.advance(Duration::from_secs(secs));
    }
}

#[tokio::test]
async fn a_stored_response_is_a_hit_with_age_and_cache_status() {
    let h = harness(|_, n, now| ok("max-age=60", n, now));
    let first = h.get("/a").await;
    assert_eq!(first.body, "response 1");
    assert_eq!(
        first.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; stored"
    );
    assert_eq!(
        first.age(),
        None,
        "a forwarded response keeps the origin's Age"
    );

    h.advance(12);
    let second = h.get("/a").await;
    assert_eq!(second.body, "response 1");
    assert_eq!(second.cache_status(), "statehouse; hit; ttl=48");
    assert_eq!(second.age(), Some(12));
    assert_eq!(h.calls(), 1);

    let stats = h.layer.stats();
    assert_eq!((stats.hits(), stats.misses(), stats.stored()), (1, 1, 1));

    // The query is part of the key, exactly.
    let other = h.get("/a?x=1").await;
    assert_eq!(other.body, "response 2");
}

#[tokio::test]
async fn max_age_expires_with_the_clock() {
    let h = harness(|_, n, now| ok("max-age=60", n, now));
    h.get("/a").await;
    h.advance(59);
    assert_eq!(h.get("/a").await.cache_status(), "statehouse; hit; ttl=1");
    h.advance(2);
    let after = h.get("/a").await;
    assert_eq!(after.body, "response 2");
    assert!(
        after.cache_status().starts_with("statehouse; fwd=uri-miss"),
        "{}",
        after.cache_status()
    );
    assert_eq!(h.calls(), 2);
}

#[tokio::test]
async fn s_maxage_wins_over_max_age_in_a_shared_cache() {
    let h = harness(|_, n, now| ok("max-age=600, s-maxage=10", n, now));
    h.get("/a").await;
    assert_eq!(h.get("/a").await.cache_status(), "statehouse; hit; ttl=10");
    h.advance(11);
    assert_eq!(h.get("/a").await.body, "response 2");
}

#[tokio::test]
async fn an_upstream_age_counts() {
    let h = harness(|_, n, now| {
        let mut res = ok("max-age=60", n, now);
        res.headers_mut().insert(AGE, "20".parse().unwrap());
        res
    });
    h.get("/a").await;
    let hit = h.get("/a").await;
    assert_eq!(hit.cache_status(), "statehouse; hit; ttl=40");
    assert_eq!(hit.age(), Some(20));
}

#[tokio::test]
async fn expires_minus_date_is_explicit_freshness() {
    let h = harness(|_, n, now| {
        Response::builder()
            .header(DATE, http_date(now))
            .header(
                "expires",
                http_date(now.saturating_add(Duration::from_secs(30))),
            )
            .body(Body::from(format!("response {n}")))
            .unwrap()
    });
    h.get("/a").await;
    assert_eq!(h.get("/a").await.cache_status(), "statehouse; hit; ttl=30");
}

#[tokio::test]
async fn without_explicit_freshness_nothing_is_stored() {
    let h = harness(|_, n, now| ok("public", n, now));
    let first = h.get("/a").await;
    assert_eq!(
        first.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; detail=no-freshness"
    );
    h.get("/a").await;
    assert_eq!(h.calls(), 2);
}

#[tokio::test]
async fn no_store_on_the_response_is_not_stored() {
    let h = harness(|_, n, now| ok("max-age=60, no-store", n, now));
    assert_eq!(
        h.get("/a").await.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; detail=no-store"
    );
    assert_eq!(h.get("/a").await.body, "response 2");
    assert_eq!(h.layer.stats().not_stored(NotStoredReason::NoStore), 2);
}

#[tokio::test]
async fn no_store_on_the_request_bypasses_the_cache() {
    let h = harness(|_, n, now| ok("max-age=60", n, now));
    h.get("/a").await;
    let bypass = h.send(with(get("/a"), CACHE_CONTROL, "no-store")).await;
    assert_eq!(bypass.body, "response 2");
    assert_eq!(
        bypass.cache_status(),
        "statehouse; fwd=bypass; fwd-status=200; detail=no-store"
    );
    // Nor was it stored: the first response is still the one served.
    assert_eq!(h.get("/a").await.body, "response 1");
    assert_eq!(h.layer.stats().bypassed(), 1);
}

#[tokio::test]
async fn private_is_not_stored_by_a_shared_cache() {
    let h = harness(|_, n, now| ok("private, max-age=60", n, now));
    assert_eq!(
        h.get("/a").await.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; detail=private"
    );
    h.get("/a").await;
    assert_eq!(h.calls(), 2);
}

#[tokio::test]
async fn no_cache_response_goes_to_the_origin_every_time() {
    let h = harness(|_, n, now| ok("no-cache, max-age=60", n, now));
    assert_eq!(
        h.get("/a").await.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; detail=no-cache"
    );
    assert_eq!(h.get("/a").await.body, "response 2");
}

/// A `no-cache` response with a validator is stored, but every use is revalidated first
/// (RFC 9111 §5.2.2.4): each request costs the origin a conditional request, answered by a
/// 304 without the body; it is never served stale, not even on an origin error.
#[tokio::test]
async fn a_no_cache_response_with_a_validator_is_revalidated_on_every_use() {
    let h = harness(|req, n, now| match n {
        1 => validated("no-cache, stale-if-error=600", "v1", n, now),
        _ if !conditional_on_v1(req) => ok("max-age=10", n, now),
        2 | 3 => not_modified("no-cache", now),
        _ => Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body(Body::from("down"))
            .expect("response"),
    });
    assert_eq!(
        h.get("/a").await.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; stored"
    );
    for calls in [2, 3] {
        let got = h.get("/a").await;
        assert_eq!(
            (got.status, got.body.as_str()),
            (StatusCode::OK, "response 1")
        );
        assert_eq!(
            got.cache_status(),
            "statehouse; fwd=stale; fwd-status=304; stored"
        );
        assert_eq!(h.calls(), calls);
    }
    let down = h.get("/a").await;
    assert_eq!(
        down.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "never served stale"
    );
    assert_eq!(h.layer.stats().hits(), 0);
}

#[tokio::test]
async fn no_cache_or_max_age_zero_request_forwards_and_stores_the_new_response() {
    let h = harness(|_, n, now| ok("max-age=60", n, now));
    h.get("/a").await;
    let forced = h.send(with(get("/a"), CACHE_CONTROL, "no-cache")).await;
    assert_eq!(forced.body, "response 2");
    assert_eq!(
        forced.cache_status(),
        "statehouse; fwd=request; fwd-status=200; stored"
    );
    assert_eq!(h.get("/a").await.body, "response 2");

    let zero = h.send(with(get("/a"), CACHE_CONTROL, "max-age=0")).await;
    assert_eq!(zero.body, "response 3");
    assert!(zero.cache_status().starts_with("statehouse; fwd=request"));

    // max-age=N accepts a response up to N seconds old; min-fresh asks for remaining life.
    h.advance(30);
    let young_enough = h.send(with(get("/a"), CACHE_CONTROL, "max-age=40")).await;
    assert_eq!(young_enough.body, "response 3");
    let too_old = h.send(with(get("/a"), CACHE_CONTROL, "max-age=20")).await;
    assert_eq!(too_old.body, "response 4");
    h.advance(30);
    let min_fresh = h.send(with(get("/a"), CACHE_CONTROL, "min-fresh=50")).await;
    assert_eq!(min_fresh.body, "response 5");
    assert_eq!(h.calls(), 5);
}

#[tokio::test]
async fn set_cookie_is_refused_by_default() {
    let h = harness(|_, n, now| {
        let mut res = ok("max-age=60", n, now);
        res.headers_mut()
            .insert(SET_COOKIE, "id=secret".parse().unwrap());
        res
    });
    let first = h.get("/a").await;
    assert_eq!(
        first.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; detail=set-cookie"
    );
    assert_eq!(first.headers[SET_COOKIE], "id=secret");
    assert_eq!(h.get("/a").await.body, "response 2");
    assert_eq!(h.layer.stats().not_stored(NotStoredReason::SetCookie), 2);
}

#[tokio::test]
async fn set_cookie_is_stored_when_configured() {
    let h = harness_with(
        None,
        false,
        |b| b.store_set_cookie(true),
        |_, n, now| {
            let mut res = ok("max-age=60", n, now);
            res.headers_mut()
                .insert(SET_COOKIE, "theme=dark".parse().unwrap());
            res
        },
    );
    h.get("/a").await;
    let hit = h.get("/a").await;
    assert_eq!(hit.cache_status(), "statehouse; hit; ttl=60");
    assert_eq!(hit.headers[SET_COOKIE], "theme=dark");
}

#[tokio::test]
async fn a_qualified_private_stores_the_rest() {
    let h = harness(|_, n, now| {
        let mut res = ok("max-age=60, private=\"Set-Cookie\"", n, now);
        res.headers_mut()
            .insert(SET_COOKIE, "id=secret".parse().unwrap());
        res
    });
    assert_eq!(h.get("/a").await.headers[SET_COOKIE], "id=secret");
    let hit = h.get("/a").await;
    assert_eq!(hit.cache_status(), "statehouse; hit; ttl=60");
    assert!(hit.headers.get(SET_COOKIE).is_none());
}

#[tokio::test]
async fn authorization_bypasses_unless_configured() {
    let h = harness(|_, n, now| ok("public, max-age=60", n, now));
    h.get("/a").await;
    let authed = h.send(with(get("/a"), AUTHORIZATION, "Bearer alice")).await;
    assert_eq!(authed.body, "response 2", "never served from the cache");
    assert_eq!(
        authed.cache_status(),
        "statehouse; fwd=bypass; fwd-status=200; detail=authorization"
    );
    assert_eq!(h.calls(), 2);
}

#[tokio::test]
async fn authorized_responses_need_public_s_maxage_or_must_revalidate() {
    let h = harness_with(
        None,
        false,
        |b| b.cache_authorized(true),
        |req, n, now| match req.uri().path() {
            "/plain" => ok("max-age=60", n, now),
            "/public" => ok("public, max-age=60", n, now),
            "/shared" => ok("s-maxage=60", n, now),
            _ => ok("must-revalidate, max-age=60", n, now),
        },
    );
    let authed = |path| with(get(path), AUTHORIZATION, "Bearer alice");
    assert_eq!(
        h.send(authed("/plain")).await.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; detail=authorization"
    );
    assert_eq!(h.send(authed("/plain")).await.body, "response 2");
    for path in ["/public", "/shared", "/revalidate"] {
        h.send(authed(path)).await;
        let hit = h.send(authed(path)).await;
        assert!(
            hit.cache_status().contains("; hit"),
            "{path}: {}",
            hit.cache_status()
        );
    }
    assert_eq!(h.calls(), 5);
}

#[tokio::test]
async fn vary_stores_one_variant_per_value() {
    let h = harness(|req, n, now| {
        let mut res = ok("max-age=60", n, now);
        res.headers_mut()
            .insert(VARY, "Accept-Encoding".parse().unwrap());
        let enc = req
            .headers()
            .get(ACCEPT_ENCODING)
            .map_or("none", |v| v.to_str().unwrap());
        *res.body_mut() = Body::from(format!("response {n} for {enc}"));
        res
    });
    let gzip = || with(get("/a"), ACCEPT_ENCODING, "gzip");
    let br = || with(get("/a"), ACCEPT_ENCODING, "br");
    let first = h.send(gzip()).await;
    assert_eq!(
        first.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; stored"
    );
    let second = h.send(br()).await;
    assert_eq!(second.body, "response 2 for br");
    assert_eq!(
        second.cache_status(),
        "statehouse; fwd=vary-miss; fwd-status=200; stored"
    );
    assert_eq!(h.send(gzip()).await.body, "response 1 for gzip");
    assert_eq!(h.send(br()).await.body, "response 2 for br");
    // No Accept-Encoding at all is a third variant.
    assert_eq!(h.get("/a").await.body, "response 3 for none");
    assert_eq!(h.get("/a").await.body, "response 3 for none");
    assert_eq!(h.calls(), 3);
}

#[tokio::test]
async fn vary_star_and_too_many_vary_names_are_never_stored() {
    let h = harness(|req, n, now| {
        let mut res = ok("max-age=60", n, now);
        let vary = if req.uri().path() == "/star" {
            "Accept, *"
        } else {
            "a, b, c, d, e, f, g, h, i"
        };
        res.headers_mut().insert(VARY, vary.parse().unwrap());
        res
    });
    assert_eq!(
        h.get("/star").await.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; detail=vary-star"
    );
    assert_eq!(h.get("/star").await.body, "response 2");
    assert_eq!(
        h.get("/many").await.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; detail=too-many-vary"
    );
}

#[tokio::test]
async fn head_is_answered_from_a_stored_get() {
    let h = harness(|_, n, now| ok("max-age=60", n, now));
    // A HEAD miss goes to the origin as HEAD and stores nothing.
    let miss = h.send(request(Method::HEAD, "/a")).await;
    assert_eq!(
        miss.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; detail=head"
    );
    h.get("/a").await;
    let head = h.send(request(Method::HEAD, "/a")).await;
    assert_eq!(head.cache_status(), "statehouse; hit; ttl=60");
    assert_eq!(head.body, "");
    assert_eq!(
        head.headers[CONTENT_LENGTH], "10",
        "the stored GET's length"
    );
    assert_eq!(h.calls(), 2);
}

/// A client that holds the stored representation (`If-None-Match` with its `ETag`, or
/// `If-Modified-Since` at or after its `Last-Modified`) gets a `304 Not Modified` from the
/// cache, without the body and without an origin call (RFC 9111 §4.3.2).
#[tokio::test]
async fn a_conditional_request_for_a_stored_response_gets_304() {
    let h = harness(|_, n, now| {
        Response::builder()
            .header(DATE, http_date(now))
            .header(CACHE_CONTROL, "max-age=60")
            .header(ETAG, "\"v1\"")
            .header(LAST_MODIFIED, "Sun, 06 Nov 1994 08:49:37 GMT")
            .header("x-other", "kept out of a 304")
            .body(Body::from(format!("response {n}")))
            .expect("response")
    });
    assert_eq!(h.get("/a").await.body, "response 1");
    h.advance(5);
    for matching in ["\"v1\"", "W/\"v1\"", "\"zzz\", \"v1\"", "*"] {
        let got = h.send(with(get("/a"), IF_NONE_MATCH, matching)).await;
        assert_eq!(got.status, StatusCode::NOT_MODIFIED, "{matching}");
        assert_eq!(got.body, "", "{matching}");
        assert_eq!(got.headers[ETAG], "\"v1\"");
        assert_eq!(got.headers[CACHE_CONTROL], "max-age=60");
        assert_eq!(got.age(), Some(5));
        assert!(!got.headers.contains_key("x-other"));
        assert!(!got.headers.contains_key(CONTENT_LENGTH));
        assert_eq!(got.cache_status(), "statehouse; hit; ttl=55");
    }
    let head = h
        .send(with(request(Method::HEAD, "/a"), IF_NONE_MATCH, "\"v1\""))
        .await;
    assert_eq!(head.status, StatusCode::NOT_MODIFIED);
    let since = h
        .send(with(
            get("/a"),
            IF_MODIFIED_SINCE,
            "Sun, 06 Nov 1994 08:49:37 GMT",
        ))
        .await;
    assert_eq!(since.status, StatusCode::NOT_MODIFIED);
    // Another tag, an older date, or an If-None-Match that does not match (which wins over a
    // matching If-Modified-Since): the whole stored response.
    let other = h.send(with(get("/a"), IF_NONE_MATCH, "\"v2\"")).await;
    assert_eq!(
        (other.status, other.body.as_str()),
        (StatusCode::OK, "response 1")
    );
    let older = h
        .send(with(
            get("/a"),
            IF_MODIFIED_SINCE,
            "Sat, 05 Nov 1994 08:49:37 GMT",
        ))
        .await;
    assert_eq!(
        (older.status, older.body.as_str()),
        (StatusCode::OK, "response 1")
    );
    let both = with(
        with(get("/a"), IF_NONE_MATCH, "\"v2\""),
        IF_MODIFIED_SINCE,
        "Sun, 06 Nov 1994 08:49:37 GMT",
    );
    assert_eq!(h.send(both).await.status, StatusCode::OK);
    assert_eq!(h.calls(), 1, "every answer came from the stored response");
    assert_eq!(h.layer.stats().hits(), 9);
}

const LAST_MOD: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

/// A 200 with `cc`, a `Date`, `ETag: "<etag>"`, `Last-Modified` and the call number as body.
fn validated(cc: &str, etag: &str, n: usize, now: Timestamp) -> Response<Body> {
    Response::builder()
        .header(DATE, http_date(now))
        .header(CACHE_CONTROL, cc)
        .header(ETAG, format!("\"{etag}\""))
        .header(LAST_MODIFIED, LAST_MOD)
        .body(Body::from(format!("response {n}")))
        .expect("response")
}

/// A 304 with `cc` and a `Date`.
fn not_modified(cc: &str, now: Timestamp) -> Response<Body> {
    Response::builder()
        .status(StatusCode::NOT_MODIFIED)
        .header(DATE, http_date(now))
        .header(CACHE_CONTROL, cc)
        .body(Body::empty())
        .expect("response")
}

/// Whether the origin got the stored response's validators.
fn conditional_on_v1(req: &Request<Body>) -> bool {
    req.headers()
        .get(IF_NONE_MATCH)
        .is_some_and(|v| v == "\"v1\"")
        && req
            .headers()
            .get(IF_MODIFIED_SINCE)
            .is_some_and(|v| v == LAST_MOD)
}

/// A stale response with a validator is revalidated: the origin gets a conditional request
/// with the stored `ETag` and `Last-Modified`, and its `304` refreshes the stored response
/// (fields updated from the 304, body kept), which the client gets whole (RFC 9111 §4.3).
#[tokio::test]
async fn a_stale_response_with_a_validator_is_revalidated_by_a_304() {
    let h = harness(|req, n, now| match n {
        1 => validated("max-age=10", "v1", n, now),
        _ if conditional_on_v1(req) => not_modified("max-age=30", now),
        _ => ok("max-age=10", n, now),
    });
    assert_eq!(h.get("/a").await.body, "response 1");
    h.advance(15);
    let revalidated = h.get("/a").await;
    assert_eq!(revalidated.status, StatusCode::OK);
    assert_eq!(revalidated.body, "response 1", "the stored body, kept");
    assert_eq!(
        revalidated.cache_status(),
        "statehouse; fwd=stale; fwd-status=304; stored"
    );
    assert_eq!(revalidated.headers[CACHE_CONTROL], "max-age=30", "updated");
    assert_eq!(revalidated.headers[ETAG], "\"v1\"");
    assert_eq!(revalidated.headers[CONTENT_LENGTH], "10");
    assert_eq!(h.calls(), 2);
    // Fresh again for the 304's 30 s.
    h.advance(20);
    let hit = h.get("/a").await;
    assert_eq!(
        (hit.body.as_str(), hit.cache_status()),
        ("response 1", "statehouse; hit; ttl=10")
    );
    assert_eq!(h.calls(), 2);
    let stats = h.layer.stats();
    assert_eq!((stats.hits(), stats.stored()), (1, 2));
}

/// A revalidation the origin answers with a new `200` replaces the stored response.
#[tokio::test]
async fn a_revalidation_answered_200_replaces_the_response() {
    let h = harness(|req, n, now| match n {
        1 => validated("max-age=10", "v1", n, now),
        _ if conditional_on_v1(req) => validated("max-age=10", "v2", n, now),
        _ => ok("max-age=10", n, now),
    });
    h.get("/a").await;
    h.advance(15);
    let replaced = h.get("/a").await;
    assert_eq!(replaced.body, "response 2");
    assert_eq!(
        replaced.cache_status(),
        "statehouse; fwd=stale; fwd-status=200; stored"
    );
    let hit = h.get("/a").await;
    assert_eq!(hit.body, "response 2");
    assert_eq!(hit.headers[ETAG], "\"v2\"");
    assert_eq!(h.calls(), 2);
}

/// A client's own conditions (a browser that holds a copy) are kept from the origin while the
/// cache may store: the origin sends the whole response, which fills the cache, and the
/// client's conditions are answered from it: a `304` when its copy is current, else the whole
/// response. On a stale entry the origin gets the stored validators instead, and the client's
/// conditions are answered from the refreshed entry. A response that may not be stored goes
/// to the client as the origin sent it (a 200 answers a conditional GET too).
#[tokio::test]
async fn client_conditions_are_answered_by_the_cache_which_fills() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let h = {
        let seen = seen.clone();
        harness(move |req, n, now| {
            let tag = req.headers().get(IF_NONE_MATCH).cloned();
            let since = req.headers().get(IF_MODIFIED_SINCE).cloned();
            seen.lock().expect("lock").push((tag, since));
            if req.uri().path() == "/unstored" {
                validated("no-store", "v1", n, now)
            } else if conditional_on_v1(req) {
                not_modified("max-age=30", now)
            } else {
                validated("max-age=10", "v1", n, now)
            }
        })
    };
    // A cold key, and the client's copy is current: a 304, and the cache holds the response.
    let current = h.send(with(get("/a"), IF_NONE_MATCH, "\"v1\"")).await;
    assert_eq!(
        (current.status, current.body.as_str()),
        (StatusCode::NOT_MODIFIED, "")
    );
    assert_eq!(current.headers[ETAG], "\"v1\"");
    assert!(!current.headers.contains_key(CONTENT_LENGTH));
    assert_eq!(
        current.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; stored"
    );
    let hit = h.get("/a").await;
    assert_eq!(
        (hit.status, hit.body.as_str()),
        (StatusCode::OK, "response 1")
    );
    assert_eq!(hit.cache_status(), "statehouse; hit; ttl=10");
    // The client holds another copy: the whole response, stored.
    let other = h.send(with(get("/b"), IF_NONE_MATCH, "\"mine\"")).await;
    assert_eq!(
        (other.status, other.body.as_str()),
        (StatusCode::OK, "response 2")
    );
    assert_eq!(
        other.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; stored"
    );
    let since = h.send(with(get("/c"), IF_MODIFIED_SINCE, LAST_MOD)).await;
    assert_eq!(since.status, StatusCode::NOT_MODIFIED);
    // Not storable: what the origin sent, as it came.
    let unstored = h
        .send(with(get("/unstored"), IF_NONE_MATCH, "\"v1\""))
        .await;
    assert_eq!(
        (unstored.status, unstored.body.as_str()),
        (StatusCode::OK, "response 4")
    );
    assert_eq!(
        unstored.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; detail=no-store"
    );
    // Stale: revalidated with the stored validators; the client's conditions are answered
    // from the refreshed entry.
    h.advance(15);
    let revalidated = h.send(with(get("/a"), IF_NONE_MATCH, "\"v1\"")).await;
    assert_eq!(revalidated.status, StatusCode::NOT_MODIFIED);
    assert_eq!(
        revalidated.cache_status(),
        "statehouse; fwd=stale; fwd-status=304; stored"
    );
    let whole = h.send(with(get("/b"), IF_NONE_MATCH, "\"mine\"")).await;
    assert_eq!(
        (whole.status, whole.body.as_str()),
        (StatusCode::OK, "response 2"),
        "the refreshed entry, whole"
    );
    assert_eq!(h.calls(), 6);
    // The origin never saw a client's own condition: only the stored validators, when it
    // revalidated.
    let stored_validators = (
        Some(HeaderValue::from_static("\"v1\"")),
        Some(HeaderValue::from_static(LAST_MOD)),
    );
    assert_eq!(
        *seen.lock().expect("lock"),
        vec![
            (None, None),
            (None, None),
            (None, None),
            (None, None),
            stored_validators.clone(),
            stored_validators,
        ]
    );
}

/// A `304` that forbids storing still gives the client the updated response; with no
/// revalidation window a stale response is gone.
#[tokio::test]
async fn revalidation_leaves_no_store_alone() {
    let h = harness(|req, n, now| {
        if conditional_on_v1(req) {
            not_modified("no-store", now)
        } else {
            validated("max-age=10", "v1", n, now)
        }
    });
    h.get("/a").await;
    h.advance(15);
    let refused = h.get("/a").await;
    assert_eq!(
        (refused.status, refused.body.as_str()),
        (StatusCode::OK, "response 1")
    );
    assert_eq!(refused.headers[CACHE_CONTROL], "no-store");
    assert_eq!(
        refused.cache_status(),
        "statehouse; fwd=stale; fwd-status=304; detail=no-store"
    );
    assert_eq!(h.calls(), 2);

    let h = harness_with(
        None,
        false,
        |b| b.revalidate_window(Duration::ZERO),
        |req, n, now| {
            if req.headers().contains_key(IF_NONE_MATCH) {
                not_modified("max-age=30", now)
            } else {
                validated("max-age=10", "v1", n, now)
            }
        },
    );
    h.get("/gone").await;
    h.advance(15);
    let again = h.get("/gone").await;
    assert_eq!(again.body, "response 2", "fetched whole, unconditionally");
    assert!(again.cache_status().starts_with("statehouse; fwd=uri-miss"));
}

#[tokio::test]
async fn a_successful_unsafe_method_invalidates_its_uri() {
    let h = harness(|req, n, now| match *req.method() {
        Method::GET => ok("max-age=60", n, now),
        Method::PUT => Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Body::empty())
            .unwrap(),
        _ => Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(Body::empty())
            .unwrap(),
    });
    h.get("/a").await;
    // A failed unsafe request changes nothing.
    let put = h.send(request(Method::PUT, "/a")).await;
    assert_eq!(put.cache_status(), "statehouse; fwd=method; fwd-status=500");
    assert_eq!(h.get("/a").await.body, "response 1");

    let post = h.send(request(Method::POST, "/a")).await;
    assert_eq!(
        post.cache_status(),
        "statehouse; fwd=method; fwd-status=204"
    );
    assert_eq!(h.get("/a").await.body, "response 4");
    assert_eq!(h.layer.stats().invalidations(), 1);
    // OPTIONS is safe: nothing invalidated.
    h.send(request(Method::OPTIONS, "/a")).await;
    assert_eq!(h.get("/a").await.body, "response 4");
}

#[tokio::test]
async fn purge_by_uri_drops_every_variant() {
    let h = harness(|req, n, now| {
        let mut res = ok("max-age=60", n, now);
        if req.uri().path() == "/v" {
            res.headers_mut()
                .insert(VARY, "Accept-Encoding".parse().unwrap());
        }
        res
    });
    h.get("/a").await;
    h.send(with(get("/v"), ACCEPT_ENCODING, "gzip")).await;
    h.send(with(get("/v"), ACCEPT_ENCODING, "br")).await;
    assert_eq!(h.calls(), 3);

    let purger = h.layer.purger();
    let uri: http::Uri = "http://Example.com:80/a".parse().unwrap();
    assert!(purger.purge(&uri).await.unwrap());
    assert!(purger.purge_path(HOST_NAME, "/v").await.unwrap());
    assert!(!purger.purge_path(HOST_NAME, "/never").await.unwrap());
    assert!(purger.purge_path("bad host", "/a").await.is_err());
    assert!(purger.purge(&"/relative".parse().unwrap()).await.is_err());

    assert_eq!(h.get("/a").await.body, "response 4");
    assert_eq!(
        h.send(with(get("/v"), ACCEPT_ENCODING, "gzip")).await.body,
        "response 5"
    );
    assert_eq!(
        h.send(with(get("/v"), ACCEPT_ENCODING, "br")).await.body,
        "response 6"
    );
    assert_eq!(h.layer.stats().purges(), 3);
}

#[tokio::test]
async fn purge_by_tag_drops_every_tagged_response() {
    let h = harness(|req, n, now| {
        let mut res = ok("max-age=60", n, now);
        let tags = match req.uri().path() {
            "/one" => "product-1, list",
            "/two" => "product-2,list",
            _ => "other",
        };
        res.headers_mut().insert("cache-tag", tags.parse().unwrap());
        res
    });
    let first = h.get("/one").await;
    assert!(
        first.headers.get("cache-tag").is_none(),
        "stripped by default"
    );
    h.get("/two").await;
    h.get("/three").await;
    assert!(h.get("/one").await.cache_status().contains("; hit"));

    h.layer.purger().purge_tag("list").await.unwrap();
    assert_eq!(h.get("/one").await.body, "response 4");
    assert_eq!(h.get("/two").await.body, "response 5");
    let untouched = h.get("/three").await;
    assert_eq!(untouched.body, "response 3");
    assert!(untouched.cache_status().contains("; hit"));
    // The refilled entries carry the new version: hits again.
    assert!(h.get("/one").await.cache_status().contains("; hit"));
    assert!(h.layer.purger().purge_tag("").await.is_err());
}

#[tokio::test]
async fn the_tag_header_is_kept_when_configured() {
    let h = harness_with(
        None,
        false,
        |b| {
            b.strip_tag_header(false)
                .tag_header("surrogate-key".parse().unwrap())
        },
        |_, n, now| {
            let mut res = ok("max-age=60", n, now);
            res.headers_mut()
                .insert("surrogate-key", "k1 k2".parse().unwrap());
            res
        },
    );
    assert_eq!(h.get("/a").await.headers["surrogate-key"], "k1 k2");
    let hit = h.get("/a").await;
    assert!(hit.cache_status().contains("; hit"));
    assert_eq!(hit.headers["surrogate-key"], "k1 k2");
}

/// Lets every spawned task run until it blocks (single-threaded runtime).
async fn settle() {
    for _ in 0..200 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn concurrent_misses_make_one_upstream_call() {
    let h = Arc::new(harness_with(
        None,
        true,
        |b| b,
        |_, n, now| ok("max-age=60", n, now),
    ));
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { h.get("/a").await })
        })
        .collect();
    settle().await;
    assert_eq!(h.calls(), 1, "one leader at the origin, nine waiting");
    h.gate.as_ref().unwrap().add_permits(100);
    let mut collapsed = 0;
    for t in tasks {
        let got = t.await.unwrap();
        assert_eq!(got.body, "response 1");
        if got.cache_status() == "statehouse; fwd=uri-miss; fwd-status=200; collapsed" {
            collapsed += 1;
        } else {
            assert_eq!(
                got.cache_status(),
                "statehouse; fwd=uri-miss; fwd-status=200; stored"
            );
        }
    }
    assert_eq!(collapsed, 9);
    assert_eq!(h.calls(), 1);
    assert_eq!(h.layer.stats().coalesced(), 9);
}

#[tokio::test(flavor = "current_thread")]
async fn waiters_go_upstream_themselves_when_the_response_is_not_storable() {
    let h = Arc::new(harness_with(
        None,
        true,
        |b| b,
        |_, n, now| ok("no-store", n, now),
    ));
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { h.get("/a").await })
        })
        .collect();
    settle().await;
    assert_eq!(h.calls(), 1);
    h.gate.as_ref().unwrap().add_permits(100);
    let mut bodies: Vec<String> = Vec::new();
    for t in tasks {
        bodies.push(t.await.unwrap().body);
    }
    bodies.sort();
    assert_eq!(bodies, ["response 1", "response 2", "response 3"]);
}

#[tokio::test(flavor = "current_thread")]
async fn a_purge_during_a_fill_keeps_the_old_response_out() {
    let h = Arc::new(harness_with(
        None,
        true,
        |b| b,
        |_, n, now| {
            let mut res = ok("max-age=60", n, now);
            res.headers_mut().insert("cache-tag", "t".parse().unwrap());
            res
        },
    ));
    // By URI: the purge voids the filler's lease.
    let filling = {
        let h = h.clone();
        tokio::spawn(async move { h.get("/a").await })
    };
    settle().await;
    h.layer.purger().purge_path(HOST_NAME, "/a").await.unwrap();
    h.gate.as_ref().unwrap().add_permits(1);
    let got = filling.await.unwrap();
    assert_eq!(
        got.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; detail=purged-during-fill"
    );
    h.gate.as_ref().unwrap().add_permits(1);
    assert_eq!(h.get("/a").await.body, "response 2");

    // By tag: the epoch moved while the response was on its way.
    let filling = {
        let h = h.clone();
        tokio::spawn(async move { h.get("/b").await })
    };
    settle().await;
    h.layer.purger().purge_tag("t").await.unwrap();
    h.gate.as_ref().unwrap().add_permits(1);
    assert!(
        filling
            .await
            .unwrap()
            .cache_status()
            .ends_with("detail=purged-during-fill")
    );
    h.gate.as_ref().unwrap().add_permits(1);
    assert_eq!(h.get("/b").await.body, "response 4");
    assert!(h.get("/b").await.cache_status().contains("; hit"));
}

/// A body of several chunks and no length: only reading it tells its size.
struct Chunks(VecDeque<Bytes>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::new()
    }
}

#[tokio::test]
async fn an_oversized_body_streams_through_unstored() {
    let h = harness_with(
        None,
        false,
        |b| b.max_body_bytes(1000),
        |req, n, now| {
            let mut res = ok("max-age=60", n, now);
            let chunk = Bytes::from(vec![b'x'; 300]);
            *res.body_mut() = match req.uri().path() {
                "/known" => Body::from(vec![b'y'; 5000]),
                "/small" => Body::new(Chunks(VecDeque::from(vec![chunk.clone(); 3]))),
                _ => Body::new(Chunks(VecDeque::from(vec![chunk; 10]))),
            };
            res
        },
    );
    let known = h.get("/known").await;
    assert_eq!(known.body.len(), 5000);
    assert_eq!(
        known.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; detail=too-large"
    );
    let streamed = h.get("/streamed").await;
    assert_eq!(streamed.body, "x".repeat(3000), "every byte, in order");
    assert!(streamed.cache_status().ends_with("detail=too-large"));
    h.get("/streamed").await;
    assert_eq!(h.calls(), 3);
    assert_eq!(h.layer.stats().not_stored(NotStoredReason::TooLarge), 3);

    // Within the limit, a chunked body is stored whole.
    h.get("/small").await;
    let hit = h.get("/small").await;
    assert_eq!(hit.body, "x".repeat(900));
    assert_eq!(hit.headers[CONTENT_LENGTH], "900");
}

#[tokio::test]
async fn garbage_in_the_store_is_a_counted_miss() {
    let h = harness(|_, n, now| ok("max-age=60", n, now));
    let key = "http:http://example.com/a";
    for garbage in [&b"garbage"[..], b"", &[1u8; 40][..]] {
        h.store
            .set(key, garbage, Duration::from_secs(60), None)
            .await
            .unwrap();
        let got = h.get("/a").await;
        assert_eq!(got.status, StatusCode::OK);
        assert!(got.cache_status().starts_with("statehouse; fwd=uri-miss"));
        h.store.delete(key).await.unwrap();
    }
    assert_eq!(h.layer.stats().decode_errors(), 3);
    h.get("/a").await;
    assert!(h.get("/a").await.cache_status().contains("; hit"));
}

#[tokio::test]
async fn only_if_cached_gets_a_504_on_a_miss() {
    let h = harness(|_, n, now| ok("max-age=60", n, now));
    let miss = h
        .send(with(get("/a"), CACHE_CONTROL, "only-if-cached"))
        .await;
    assert_eq!(miss.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(h.calls(), 0);
    h.get("/a").await;
    let hit = h
        .send(with(get("/a"), CACHE_CONTROL, "only-if-cached"))
        .await;
    assert_eq!(hit.status, StatusCode::OK);
}

#[tokio::test]
async fn stale_if_error_serves_the_stale_entry_when_the_origin_fails() {
    let h = harness(|req, n, now| {
        if n > 2 {
            return Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .body(Body::from("down"))
                .unwrap();
        }
        match req.uri().path() {
            "/strict" => ok("max-age=10, stale-if-error=60, must-revalidate", n, now),
            _ => ok("max-age=10, stale-if-error=60", n, now),
        }
    });
    h.get("/lenient").await;
    h.get("/strict").await;
    h.advance(20);
    let stale = h.get("/lenient").await;
    assert_eq!(stale.body, "response 1");
    assert_eq!(
        stale.cache_status(),
        "statehouse; fwd=stale; fwd-status=503; ttl=-10; detail=stale-if-error"
    );
    assert_eq!(stale.age(), Some(20));
    let strict = h.get("/strict").await;
    assert_eq!(strict.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        strict
            .cache_status()
            .starts_with("statehouse; fwd=uri-miss")
    );
    assert_eq!(h.layer.stats().stale_served(), 1);
}

/// A store that fails every call, or never answers.
#[derive(Debug)]
struct BrokenStore {
    hang: bool,
    calls: AtomicUsize,
}

impl BrokenStore {
    async fn fail<T>(&self) -> statehouse::Result<T> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.hang {
            std::future::pending::<()>().await;
        }
        Err(statehouse::Error::Unavailable {
            message: "connection refused".into(),
            source: None,
        })
    }
}

#[async_trait]
impl CacheStore for BrokenStore {
    async fn get(&self, _: &str) -> statehouse::Result<Option<Vec<u8>>> {
        self.fail().await
    }
    async fn set(
        &self,
        _: &str,
        _: &[u8],
        _: Duration,
        _: Option<&LeaseToken>,
    ) -> statehouse::Result<bool> {
        self.fail().await
    }
    async fn delete(&self, _: &str) -> statehouse::Result<bool> {
        self.fail().await
    }
    async fn acquire_lease(
        &self,
        _: &str,
        _: Timestamp,
        _: Duration,
    ) -> statehouse::Result<LeaseOutcome> {
        self.fail().await
    }
    async fn release_lease(&self, _: &str, _: &LeaseToken) -> statehouse::Result<bool> {
        self.fail().await
    }
    async fn tag_versions(&self, _: &[String]) -> statehouse::Result<Vec<u64>> {
        self.fail().await
    }
    async fn bump_tag(&self, _: &str) -> statehouse::Result<u64> {
        self.fail().await
    }
    async fn purge_prefix(&self, _: &str) -> statehouse::Result<u64> {
        self.fail().await
    }
    async fn subscribe(
        &self,
        _: Arc<dyn InvalidationSink>,
    ) -> statehouse::Result<InvalidationSubscription> {
        self.fail().await
    }
}

async fn store_down(hang: bool) {
    let store = Arc::new(BrokenStore {
        hang,
        calls: AtomicUsize::new(0),
    });
    let h = harness_with(
        Some(store.clone()),
        false,
        |b| b.store_deadline(Duration::from_millis(50)),
        |_, n, now| ok("max-age=60", n, now),
    );
    for i in 1..=3 {
        let got = h.get("/a").await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.body, format!("response {i}"));
        assert_eq!(
            got.cache_status(),
            "statehouse; fwd=uri-miss; fwd-status=200; detail=store-unavailable"
        );
    }
    // Three failures in a row opened the circuit breaker: the POST's invalidation and the purge
    // fail at once, without a store call (and without a deadline).
    let post = h.send(request(Method::POST, "/a")).await;
    assert_eq!(post.status, StatusCode::OK);
    assert_eq!(h.layer.stats().store_errors(), 4);
    assert_eq!(store.calls.load(Ordering::SeqCst), 3);
    assert_eq!(h.layer.breaker_state(), (BreakerState::Open, 1));
    let purge = h.layer.purger().purge_path(HOST_NAME, "/a").await;
    assert!(purge.expect_err("the store is down").is_unavailable());
    assert_eq!(store.calls.load(Ordering::SeqCst), 3);
    // After `open_for` (1 s), one request probes the store, finds it still down, and is
    // answered by the origin all the same.
    h.advance(1);
    let got = h.get("/a").await;
    assert_eq!(
        (got.status, got.body.as_str()),
        (StatusCode::OK, "response 5")
    );
    assert_eq!(store.calls.load(Ordering::SeqCst), 4);
    assert_eq!(h.layer.breaker_state(), (BreakerState::Open, 1));
}

#[tokio::test]
async fn a_failing_store_never_fails_a_request() {
    store_down(false).await;
}

#[tokio::test(start_paused = true)]
async fn a_store_that_never_answers_costs_one_deadline() {
    store_down(true).await;
}

#[tokio::test]
async fn invalid_configuration_names_the_field() {
    let clock = start();
    let store = embedded(&clock);
    let field = |b: HttpCacheLayerBuilder| match b.build() {
        Err(statehouse::Error::InvalidPolicy { field, .. }) => field,
        other => panic!("expected a rejected field, got {other:?}"),
    };
    let b = || HttpCacheLayer::builder(store.clone());
    assert_eq!(field(b().cache_name("two words")), "cache_name");
    assert_eq!(field(b().default_scheme("ftp")), "default_scheme");
    assert_eq!(field(b().max_body_bytes(0)), "max_body_bytes");
    assert_eq!(field(b().store_deadline(Duration::ZERO)), "store_deadline");
    assert_eq!(field(b().lease_ttl(Duration::ZERO)), "lease_ttl");
    assert_eq!(field(b().max_vary_headers(0)), "max_vary_headers");
    assert_eq!(field(b().max_variants(0)), "max_variants");
    assert_eq!(field(b().max_ttl(Duration::ZERO)), "max_ttl");
    assert!(
        b().cache_name("edge-1")
            .default_scheme("HTTPS")
            .build()
            .is_ok()
    );
}

#[tokio::test]
async fn the_cache_name_is_configurable() {
    let h = harness_with(
        None,
        false,
        |b| b.cache_name("edge"),
        |_, n, now| ok("max-age=60", n, now),
    );
    h.get("/a").await;
    assert_eq!(h.get("/a").await.cache_status(), "edge; hit; ttl=60");
    // A member from an upstream cache stays first.
    let h = harness(|_, n, now| {
        let mut res = ok("max-age=60", n, now);
        res.headers_mut()
            .insert("cache-status", "origin-cache; hit".parse().unwrap());
        res
    });
    let got = h.get("/a").await;
    let members: Vec<_> = got
        .headers
        .get_all("cache-status")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        members,
        [
            "origin-cache; hit",
            "statehouse; fwd=uri-miss; fwd-status=200; stored"
        ]
    );
    // The stored copy does not repeat the upstream member.
    let hit = h.get("/a").await;
    assert_eq!(hit.headers.get_all("cache-status").iter().count(), 1);
}

#[tokio::test]
async fn the_number_of_variants_is_bounded() {
    let h = harness_with(
        None,
        false,
        |b| b.max_variants(2),
        |_, n, now| {
            let mut res = ok("max-age=60", n, now);
            res.headers_mut()
                .insert(VARY, "Accept-Language".parse().unwrap());
            res
        },
    );
    let lang = |l: &str| with(get("/a"), http::header::ACCEPT_LANGUAGE, l);
    assert!(h.send(lang("en")).await.cache_status().ends_with("stored"));
    assert!(h.send(lang("fr")).await.cache_status().ends_with("stored"));
    let third = h.send(lang("de")).await;
    assert_eq!(
        third.cache_status(),
        "statehouse; fwd=vary-miss; fwd-status=200; detail=too-many-variants"
    );
    assert_eq!(h.send(lang("de")).await.body, "response 4");
    // The two stored variants still hit.
    assert_eq!(h.send(lang("en")).await.body, "response 1");
    assert_eq!(h.send(lang("fr")).await.body, "response 2");
    // A purge starts a new spec, and a new count.
    h.layer.purger().purge_path(HOST_NAME, "/a").await.unwrap();
    assert!(h.send(lang("de")).await.cache_status().ends_with("stored"));
    assert_eq!(h.send(lang("de")).await.body, "response 5");
}

#[tokio::test]
async fn any_http_body_works_not_only_axums() {
    let clock = start();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let origin = tower::service_fn(move |_req: Request<http_body_util::Empty<Bytes>>| {
        let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let res = Response::builder()
                .header(CACHE_CONTROL, "max-age=60")
                .body(http_body_util::Full::new(Bytes::from(format!("plain {n}"))))
                .unwrap();
            Ok::<_, Infallible>(res)
        }
    });
    let layer = HttpCacheLayer::builder(embedded(&clock))
        .clock(Arc::new(clock.clone()) as Arc<dyn Clock>)
        .build()
        .unwrap();
    let svc = layer.layer(origin);
    for _ in 0..2 {
        let req = Request::get("/x")
            .header(HOST, HOST_NAME)
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"plain 1");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn a_cancelled_filler_gives_its_lease_and_its_flight_back() {
    let h = Arc::new(harness_with(
        None,
        true,
        |b| b,
        |_, n, now| ok("max-age=60", n, now),
    ));
    // The lease: without it given back, the next fill would be refused as `lease-held`.
    let filler = {
        let h = h.clone();
        tokio::spawn(async move { h.get("/a").await })
    };
    settle().await;
    assert_eq!(h.calls(), 1);
    filler.abort();
    settle().await;
    h.gate.as_ref().unwrap().add_permits(1);
    let next = h.get("/a").await;
    assert_eq!(next.body, "response 2");
    assert_eq!(
        next.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; stored"
    );

    // The flight: a waiter of a cancelled leader goes on and gets an answer.
    let leader = {
        let h = h.clone();
        tokio::spawn(async move { h.get("/b").await })
    };
    settle().await;
    let waiter = {
        let h = h.clone();
        tokio::spawn(async move { h.get("/b").await })
    };
    settle().await;
    assert_eq!(h.calls(), 3, "the waiter waits");
    leader.abort();
    settle().await;
    h.gate.as_ref().unwrap().add_permits(1);
    assert_eq!(waiter.await.unwrap().body, "response 4");
}

/// RFC 5861 `stale-while-revalidate`: within the window after freshness, a GET is answered
/// from the stale entry at once, and the request goes on to the origin in the background,
/// whose response replaces the entry; past the window, a request waits for the origin again.
#[tokio::test(flavor = "current_thread")]
async fn stale_while_revalidate_answers_at_once_and_refreshes_in_the_background() {
    let h = harness(|_, n, now| ok("max-age=10, stale-while-revalidate=30", n, now));
    assert_eq!(h.get("/a").await.body, "response 1");
    h.advance(15);
    let stale = h.get("/a").await;
    assert_eq!(
        (stale.status, stale.body.as_str()),
        (StatusCode::OK, "response 1")
    );
    assert_eq!(stale.age(), Some(15));
    assert_eq!(
        stale.cache_status(),
        "statehouse; hit; ttl=-5; detail=stale-while-revalidate"
    );
    settle().await;
    assert_eq!(h.calls(), 2, "the background request went to the origin");
    let refreshed = h.get("/a").await;
    assert_eq!(refreshed.body, "response 2");
    assert_eq!(refreshed.cache_status(), "statehouse; hit; ttl=10");
    // At the window's last second the stale entry still answers; past it, the origin does.
    h.advance(39);
    assert_eq!(h.get("/a").await.body, "response 2");
    settle().await;
    assert_eq!(h.get("/a").await.body, "response 3");
    h.advance(41);
    let past = h.get("/a").await;
    assert_eq!(past.body, "response 4");
    assert!(past.cache_status().starts_with("statehouse; fwd="));
    assert_eq!(h.calls(), 4);
    assert_eq!(h.layer.stats().stale_while_revalidate(), 2);
}

/// While one background revalidation is on its way, other requests for the key get the stale
/// entry without another origin call; the client's own conditions are answered from it.
#[tokio::test(flavor = "current_thread")]
async fn one_background_revalidation_per_key_at_a_time() {
    let h = harness_with(
        None,
        true,
        |b| b,
        |_, n, now| validated("max-age=10, stale-while-revalidate=60", "v1", n, now),
    );
    h.gate.as_ref().unwrap().add_permits(1);
    h.get("/a").await;
    h.advance(15);
    // The origin answers nothing until the gate opens: a request that waited for it would
    // hang, so each is bounded (a guard against a regression, not a measurement).
    let at_once = |req| {
        let answer = h.send(req);
        async move {
            tokio::time::timeout(Duration::from_secs(30), answer)
                .await
                .expect("answered from the stale entry, without waiting for the origin")
        }
    };
    for _ in 0..5 {
        let stale = at_once(get("/a")).await;
        assert_eq!(stale.body, "response 1");
    }
    let conditional = at_once(with(get("/a"), IF_NONE_MATCH, "\"v1\"")).await;
    assert_eq!(conditional.status, StatusCode::NOT_MODIFIED);
    settle().await;
    assert_eq!(
        h.calls(),
        2,
        "one background request, waiting at the origin"
    );
    h.gate.as_ref().unwrap().add_permits(1);
    settle().await;
    assert_eq!(h.get("/a").await.body, "response 2");
    assert_eq!(h.layer.stats().stale_while_revalidate(), 6);
}

/// A response that must not be served stale (`must-revalidate`, `s-maxage`, `no-cache`), a
/// request that refuses a stored or old response, a HEAD, and a layer built with
/// `stale_while_revalidate(false)` all wait for the origin.
#[tokio::test(flavor = "current_thread")]
async fn stale_while_revalidate_only_where_allowed() {
    let h = harness(|req, n, now| match req.uri().path() {
        "/must" => ok(
            "max-age=10, stale-while-revalidate=60, must-revalidate",
            n,
            now,
        ),
        "/shared" => ok("s-maxage=10, stale-while-revalidate=60", n, now),
        "/no-cache" => validated("no-cache, stale-while-revalidate=60", "v1", n, now),
        _ => ok("max-age=10, stale-while-revalidate=60", n, now),
    });
    for path in ["/must", "/shared", "/no-cache", "/a", "/b", "/c"] {
        h.get(path).await;
    }
    h.advance(15);
    for path in ["/must", "/shared", "/no-cache"] {
        let got = h.get(path).await;
        assert!(
            got.cache_status().starts_with("statehouse; fwd="),
            "{path}: {}",
            got.cache_status()
        );
    }
    let refused = h.send(with(get("/a"), CACHE_CONTROL, "no-cache")).await;
    assert!(refused.cache_status().starts_with("statehouse; fwd=stale"));
    let too_old = h.send(with(get("/b"), CACHE_CONTROL, "max-age=12")).await;
    assert!(too_old.cache_status().starts_with("statehouse; fwd=stale"));
    let head = h.send(request(Method::HEAD, "/c")).await;
    assert!(head.cache_status().starts_with("statehouse; fwd=stale"));
    settle().await;
    assert_eq!(
        h.calls(),
        6 + 6,
        "each waited for the origin, none in the background"
    );
    assert_eq!(h.layer.stats().stale_while_revalidate(), 0);

    let h = harness_with(
        None,
        false,
        |b| b.stale_while_revalidate(false),
        |_, n, now| ok("max-age=10, stale-while-revalidate=60", n, now),
    );
    h.get("/a").await;
    h.advance(15);
    let got = h.get("/a").await;
    assert_eq!(got.body, "response 2");
    assert!(got.cache_status().starts_with("statehouse; fwd="));
}

/// A background revalidation asks the origin only when it takes the key's fill lease: while
/// another replica fills the key, a replica answers from the stale entry and sends nothing.
#[tokio::test(flavor = "current_thread")]
async fn a_background_revalidation_leaves_a_key_another_replica_fills() {
    let a = harness(|_, n, now| ok("max-age=10, stale-while-revalidate=60", n, now));
    let b = Arc::new(harness_with(
        Some(a.store.clone()),
        true,
        |b| b,
        |_, n, now| ok("max-age=10, stale-while-revalidate=60", n + 100, now),
    ));
    a.get("/a").await;
    a.advance(15);
    b.advance(15);
    // Replica b refuses the stale entry, so it leads a fill and holds the lease, at its origin.
    let filling = {
        let b = b.clone();
        tokio::spawn(async move { b.send(with(get("/a"), CACHE_CONTROL, "no-cache")).await })
    };
    settle().await;
    assert_eq!(b.calls(), 1);
    let stale = a.get("/a").await;
    assert_eq!(stale.body, "response 1");
    settle().await;
    assert_eq!(
        a.calls(),
        1,
        "no background request while b holds the lease"
    );
    b.gate.as_ref().unwrap().add_permits(1);
    assert_eq!(filling.await.unwrap().body, "response 101");
    assert_eq!(a.get("/a").await.body, "response 101");
}

/// A request in absolute form whose `Host` names another host is not cached: an application
/// that builds links from `Host` would render the attacker's host into a page stored under
/// the URI's, for every later visitor. The same host spelled differently (case, default
/// port), or a URI authority without `Host` (HTTP/2's `:authority`), is cached as usual.
#[tokio::test]
async fn an_absolute_uri_naming_another_host_than_host_is_not_cached() {
    let h = harness(|req, n, now| {
        let host = req
            .headers()
            .get(HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let mut res = ok("public, max-age=60", n, now);
        *res.body_mut() = Body::from(format!("response {n} links to {host}"));
        res
    });
    let absolute = |host: Option<&str>| {
        let mut req = Request::get("http://example.com/page");
        if let Some(host) = host {
            req = req.header(HOST, host);
        }
        req.body(Body::empty()).expect("request")
    };
    let attack = h.send(absolute(Some("evil.test"))).await;
    assert_eq!(attack.body, "response 1 links to evil.test");
    assert_eq!(
        attack.cache_status(),
        "statehouse; fwd=bypass; fwd-status=200; detail=host-mismatch"
    );
    assert_eq!(h.layer.stats().bypassed(), 1);
    let visitor = h.get("/page").await;
    assert_eq!(visitor.body, "response 2 links to example.com");
    assert_eq!(
        visitor.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; stored"
    );
    for host in [Some("EXAMPLE.com:80"), Some("example.com"), None] {
        let same = h.send(absolute(host)).await;
        assert_eq!(same.body, "response 2 links to example.com", "{host:?}");
        assert!(same.cache_status().contains("; hit"), "{host:?}");
    }
    let port = h.send(absolute(Some("example.com:8080"))).await;
    assert!(port.cache_status().ends_with("detail=host-mismatch"));
    assert_eq!(h.calls(), 3);
}

/// `If-Match`, `If-Unmodified-Since`, `If-Range` (and `Range`) make the origin's answer one
/// for this client: forwarded with its conditions, not stored, so one client's `412` is never
/// served to the next.
#[tokio::test]
async fn other_preconditions_and_ranges_bypass_the_cache() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let h = {
        let seen = seen.clone();
        harness(move |req, n, now| {
            let conditions: Vec<String> = [IF_MATCH, IF_UNMODIFIED_SINCE, IF_RANGE, RANGE]
                .iter()
                .filter(|name| req.headers().contains_key(*name))
                .map(|name| name.to_string())
                .collect();
            let mut res = validated("public, max-age=60", "v1", n, now);
            if !conditions.is_empty() {
                *res.status_mut() = StatusCode::PRECONDITION_FAILED;
            }
            seen.lock().expect("lock").push(conditions);
            res
        })
    };
    let cases = [
        ("/match", vec![(IF_MATCH, "\"other\"")]),
        ("/since", vec![(IF_UNMODIFIED_SINCE, LAST_MOD)]),
        ("/if-range", vec![(IF_RANGE, "\"other\"")]),
        (
            "/range",
            vec![(RANGE, "bytes=0-1"), (IF_RANGE, "\"other\"")],
        ),
    ];
    for (path, fields) in &cases {
        let mut req = get(path);
        for (name, value) in fields {
            req = with(req, name.clone(), value);
        }
        let got = h.send(req).await;
        assert_eq!(got.status, StatusCode::PRECONDITION_FAILED, "{path}");
        let detail = if *path == "/range" {
            "range"
        } else {
            "precondition"
        };
        assert_eq!(
            got.cache_status(),
            format!("statehouse; fwd=bypass; fwd-status=412; detail={detail}"),
            "{path}"
        );
        let plain = h.get(path).await;
        assert_eq!(plain.status, StatusCode::OK, "{path}");
        assert_eq!(
            plain.cache_status(),
            "statehouse; fwd=uri-miss; fwd-status=200; stored",
            "{path}"
        );
    }
    let seen = seen.lock().expect("lock").clone();
    let expected: Vec<Vec<String>> = cases
        .iter()
        .flat_map(|(_, fields)| {
            let mut names: Vec<String> = fields.iter().map(|(n, _)| n.to_string()).collect();
            names.sort_by_key(|n| {
                ["if-match", "if-unmodified-since", "if-range", "range"]
                    .iter()
                    .position(|o| o == n)
            });
            [names, Vec::new()]
        })
        .collect();
    assert_eq!(seen, expected, "the conditions reached the origin as sent");
}

/// A conditional GET whose fill is not stored (here: `Set-Cookie`) gets the origin's `200`
/// as it came, `Set-Cookie` and every other field included, rather than a `304` built from a
/// few of them. A stored one is answered `304`, and keeps the origin's `Set-Cookie` (made for
/// this client) when the cache stores such responses.
#[tokio::test]
async fn a_conditional_get_whose_response_is_not_stored_gets_it_as_it_came() {
    let respond = |cc: &'static str| {
        move |_: &Request<Body>, n: usize, now: Timestamp| {
            let mut res = validated(cc, "v1", n, now);
            let headers = res.headers_mut();
            headers.insert(SET_COOKIE, HeaderValue::from_static("session=s1"));
            headers.insert("x-other", HeaderValue::from_static("kept"));
            res
        }
    };
    for cc in ["max-age=60", "no-cache"] {
        let h = harness(respond(cc));
        let got = h.send(with(get("/a"), IF_NONE_MATCH, "\"v1\"")).await;
        assert_eq!(
            (got.status, got.body.as_str()),
            (StatusCode::OK, "response 1")
        );
        assert_eq!(got.headers[SET_COOKIE], "session=s1", "{cc}");
        assert_eq!(got.headers["x-other"], "kept", "{cc}");
        assert_eq!(got.headers[ETAG], "\"v1\"", "{cc}");
        assert_eq!(
            got.cache_status(),
            "statehouse; fwd=uri-miss; fwd-status=200; detail=set-cookie"
        );
    }
    let h = harness_with(
        None,
        false,
        |b| b.store_set_cookie(true),
        respond("max-age=60"),
    );
    let got = h.send(with(get("/a"), IF_NONE_MATCH, "\"v1\"")).await;
    assert_eq!(got.status, StatusCode::NOT_MODIFIED);
    assert_eq!(got.headers[SET_COOKIE], "session=s1");
    assert!(!got.headers.contains_key("x-other"));
    assert_eq!(
        got.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; stored"
    );
}

fn cache_control_bytes(mut req_or_res: HeaderMap, line: &[u8]) -> HeaderMap {
    req_or_res.append(
        CACHE_CONTROL,
        HeaderValue::from_bytes(line).expect("header value"),
    );
    req_or_res
}

/// A `Cache-Control` line holding bytes outside ASCII (in a quoted argument) is honoured
/// whole: its `private` keeps the response out of the store, its `no-store` on a request
/// bypasses the cache. A line that does not parse at all reads as `no-store`.
#[tokio::test]
async fn a_cache_control_line_with_bytes_outside_ascii_is_honoured() {
    let h = harness(|req, n, now| {
        let mut res = ok("max-age=60", n, now);
        let line: &[u8] = match req.uri().path() {
            "/private" => b"private, x-note=\"caf\xc3\xa9\"",
            "/unparsable" => b"caf\xc3\xa9=1, public",
            _ => b"x-note=\"caf\xc3\xa9\"",
        };
        *res.headers_mut() = cache_control_bytes(res.headers().clone(), line);
        res
    });
    for (path, detail) in [("/private", "private"), ("/unparsable", "no-store")] {
        let first = h.get(path).await;
        assert_eq!(
            first.cache_status(),
            format!("statehouse; fwd=uri-miss; fwd-status=200; detail={detail}")
        );
        let second = h.get(path).await;
        assert!(!second.cache_status().contains("; hit"), "{path}");
    }
    assert_eq!(h.calls(), 4);
    // The same bytes in a line saying nothing a cache acts on: stored as usual.
    h.get("/note").await;
    assert!(h.get("/note").await.cache_status().contains("; hit"));

    for line in [&b"no-store, x=\"\xe9\""[..], b"caf\xc3\xa9, max-age=60"] {
        let mut req = get("/note");
        *req.headers_mut() = cache_control_bytes(req.headers().clone(), line);
        let got = h.send(req).await;
        assert_eq!(
            got.cache_status(),
            "statehouse; fwd=bypass; fwd-status=200; detail=no-store",
            "{line:?}"
        );
    }
    assert_eq!(h.calls(), 7);
}

/// A store entry claiming more header lines than its bytes hold (or than a `HeaderMap` can)
/// is undecodable: a counted miss, never a panic.
#[tokio::test]
async fn an_entry_claiming_too_many_header_lines_is_a_counted_miss() {
    let h = harness(|_, n, now| ok("max-age=60", n, now));
    let key = "http:http://example.com/a";
    let one_line = b"\x00\x01a\x00\x00\x00\x00";
    for lines in [Vec::new(), one_line.repeat(40_000)] {
        let mut payload = vec![1u8];
        payload.extend_from_slice(&200u16.to_be_bytes());
        payload.extend_from_slice(&[0; 16]);
        payload.extend_from_slice(&40_000u16.to_be_bytes());
        payload.extend_from_slice(&lines);
        payload.extend_from_slice(&0u64.to_be_bytes());
        let later = h.clock.now().saturating_add(Duration::from_secs(60));
        let entry = Envelope {
            flags: EnvelopeFlags {
                negative: false,
                compressed: false,
                codec: 2,
            },
            fresh_until: later,
            stale_until: later,
            load_micros: 0,
            tags: vec![],
            payload,
        };
        h.store
            .set(
                key,
                &entry.encode().expect("envelope"),
                Duration::from_secs(60),
                None,
            )
            .await
            .unwrap();
        let got = h.get("/a").await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(
            got.cache_status(),
            "statehouse; fwd=uri-miss; fwd-status=200; stored"
        );
    }
    assert_eq!(h.layer.stats().decode_errors(), 2);
    assert!(h.get("/a").await.cache_status().contains("; hit"));
}

/// The real store's calls, except that the first `tag_versions` call (a filler's epoch read,
/// right after it took the lease) never answers.
#[derive(Debug)]
struct StallingEpoch {
    stall: std::sync::atomic::AtomicBool,
    stalled: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Intercept for StallingEpoch {
    async fn tag_versions(
        &self,
        inner: &dyn CacheStore,
        tags: &[String],
    ) -> statehouse::Result<Vec<u64>> {
        if self.stall.swap(false, Ordering::SeqCst) {
            self.stalled.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        inner.tag_versions(tags).await
    }
}

/// A filler whose client goes away between taking the lease and asking the origin (here,
/// while it reads the tag epoch) gives the lease back: the next request fills the key
/// instead of being refused as `lease-held` until the lease expires.
#[tokio::test(flavor = "current_thread")]
async fn a_filler_cancelled_before_asking_the_origin_gives_its_lease_back() {
    let clock = start();
    let store = Arc::new(Intercepted {
        inner: embedded(&clock),
        intercept: StallingEpoch {
            stall: true.into(),
            stalled: false.into(),
        },
    });
    let h = Arc::new(harness_with(
        Some(store.clone()),
        false,
        // Long enough that the stalled read does not time out during the test.
        |b| b.store_deadline(Duration::from_secs(60)),
        |_, n, now| ok("max-age=60", n, now),
    ));
    let filler = {
        let h = h.clone();
        tokio::spawn(async move { h.get("/a").await })
    };
    settle().await;
    assert!(
        store.stalled.load(Ordering::SeqCst),
        "stalled in the epoch read"
    );
    assert_eq!(h.calls(), 0);
    filler.abort();
    settle().await;
    let next = h.get("/a").await;
    assert_eq!(next.body, "response 1");
    assert_eq!(
        next.cache_status(),
        "statehouse; fwd=uri-miss; fwd-status=200; stored"
    );
}
