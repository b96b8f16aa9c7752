//! The rate-limit layer in an axum app: through `oneshot` on the embedded store with a manual
//! clock, with Redis down, and on real sockets as three replicas sharing one Redis.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::routing::get;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderName, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use statehouse::{
    DegradedPolicy, EmbeddedStore, ManualClock, Policy, RateLimiter, RedisStore, RedisTopology,
    Timestamp,
};
use statehouse_testkit::{RedisServer, shared_standalone, unique_prefix};
use statehouse_tower::{ClientIp, RateLimitLayer, RateLimitRule, RuleKey};
use tower::ServiceExt;

fn per_ip(policy: Policy) -> RateLimitRule {
    RateLimitRule::new("per-ip", policy, RuleKey::ClientIp(ClientIp::Peer)).expect("rule")
}

/// A manual clock at a whole minute (fixed windows start there).
fn clock() -> ManualClock {
    ManualClock::new(Timestamp::from_micros(1_800_000_000_000_000))
}

/// An embedded limiter on `clock`.
fn limiter(clock: &ManualClock) -> RateLimiter {
    let store = EmbeddedStore::builder()
        .clock(clock.clone())
        .build()
        .expect("store");
    RateLimiter::builder(store)
        .clock(Arc::new(clock.clone()))
        .build()
        .expect("limiter")
}

/// A router whose one route counts its calls.
fn app(layer: RateLimitLayer) -> (Router, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let router = Router::new()
        .route(
            "/",
            get(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async { "ok" }
            }),
        )
        .layer(layer);
    (router, calls)
}

/// A GET of `/` from `ip`, with extra headers.
async fn get_from(
    app: &Router,
    ip: [u8; 4],
    headers: &[(&str, &str)],
) -> (http::response::Parts, String) {
    let mut req = Request::get("/");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let mut req = req.body(Body::empty()).expect("request");
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::from((ip, 40_000))));
    let response = app.clone().oneshot(req).await.expect("infallible");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (parts, String::from_utf8(body.to_vec()).expect("UTF-8"))
}

fn header<'a>(parts: &'a http::response::Parts, name: &str) -> Option<&'a str> {
    parts.headers.get(name).map(|v| v.to_str().expect("ASCII"))
}

#[tokio::test]
async fn a_client_over_its_limit_gets_429_until_its_tokens_come_back() {
    let clock = clock();
    let policy = Policy::token_bucket(2, Duration::from_secs(60)).expect("policy");
    let layer = RateLimitLayer::new(limiter(&clock))
        .rule(per_ip(policy))
        .expect("layer");
    let (app, calls) = app(layer);
    let a = [10, 0, 0, 1];

    let (first, body) = get_from(&app, a, &[]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(body, "ok");
    assert_eq!(
        header(&first, "ratelimit-policy"),
        Some("\"per-ip\";q=2;w=60")
    );
    assert_eq!(header(&first, "ratelimit"), Some("\"per-ip\";r=1;t=30"));
    let (second, _) = get_from(&app, a, &[]).await;
    assert_eq!(header(&second, "ratelimit"), Some("\"per-ip\";r=0;t=60"));

    let (denied, body) = get_from(&app, a, &[]).await;
    assert_eq!(denied.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&denied, RETRY_AFTER.as_str()), Some("30"));
    assert_eq!(
        header(&denied, CONTENT_TYPE.as_str()),
        Some("application/problem+json")
    );
    assert!(
        body.contains("\"violated-policies\":[\"per-ip\"]"),
        "{body}"
    );
    assert!(body.contains("quota-exceeded"), "{body}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "a denied request never reaches the app"
    );

    // Another client has its own allowance.
    let (other, _) = get_from(&app, [10, 0, 0, 2], &[]).await;
    assert_eq!(other.status, StatusCode::OK);

    // One token back after 30 s (a refill every 60 s / 2), to the microsecond.
    clock.advance(Duration::from_secs(30) - Duration::from_micros(1));
    assert_eq!(
        get_from(&app, a, &[]).await.0.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    clock.advance(Duration::from_micros(1));
    assert_eq!(get_from(&app, a, &[]).await.0.status, StatusCode::OK);
    assert_eq!(
        get_from(&app, a, &[]).await.0.status,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn a_request_denied_by_one_rule_consumes_from_none() {
    let clock = clock();
    let layer = RateLimitLayer::new(limiter(&clock))
        .rule(per_ip(
            Policy::fixed_window(3, Duration::from_secs(60)).expect("policy"),
        ))
        .expect("rule")
        .rule(
            RateLimitRule::new(
                "global",
                Policy::fixed_window(2, Duration::from_secs(60)).expect("policy"),
                RuleKey::Global,
            )
            .expect("rule"),
        )
        .expect("rule");
    let (app, calls) = app(layer);
    let a = [10, 0, 0, 1];
    assert_eq!(
        get_from(&app, [10, 0, 0, 9], &[]).await.0.status,
        StatusCode::OK
    );
    let (admitted, _) = get_from(&app, a, &[]).await;
    assert_eq!(
        header(&admitted, "ratelimit-policy"),
        Some("\"per-ip\";q=3;w=60, \"global\";q=2;w=60")
    );
    assert_eq!(
        header(&admitted, "ratelimit"),
        Some("\"per-ip\";r=2;t=60, \"global\";r=0;t=60")
    );
    // The global limit is spent: denied, and the per-ip count of `a` stays at 1.
    for _ in 0..3 {
        let (denied, body) = get_from(&app, a, &[]).await;
        assert_eq!(denied.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(
            body.contains("\"violated-policies\":[\"global\"]"),
            "{body}"
        );
        assert_eq!(
            header(&denied, "ratelimit"),
            Some("\"per-ip\";r=2;t=60, \"global\";r=0;t=60")
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // The next window: `a` still has two of its three left (the denials took nothing).
    clock.advance(Duration::from_secs(60));
    let (next, _) = get_from(&app, a, &[]).await;
    assert_eq!(
        header(&next, "ratelimit"),
        Some("\"per-ip\";r=2;t=60, \"global\";r=1;t=60")
    );
}

#[tokio::test]
async fn a_header_rule_counts_only_requests_that_carry_the_header() {
    let clock = clock();
    let per_key = RateLimitRule::new(
        "per-key",
        Policy::gcra(1, Duration::from_secs(3600)).expect("policy"),
        RuleKey::Header(HeaderName::from_static("x-api-key")),
    )
    .expect("rule");
    let layer = RateLimitLayer::new(limiter(&clock))
        .rule(per_key)
        .expect("rule");
    let (app, _) = app(layer);
    let a = [10, 0, 0, 1];
    // Without a key: no rule applies, no headers.
    for _ in 0..3 {
        let (parts, _) = get_from(&app, a, &[]).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(header(&parts, "ratelimit-policy"), None);
    }
    let key = [("x-api-key", "k-1")];
    assert_eq!(get_from(&app, a, &key).await.0.status, StatusCode::OK);
    assert_eq!(
        get_from(&app, a, &key).await.0.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // The same key from elsewhere is the same quota; another key is another.
    assert_eq!(
        get_from(&app, [10, 0, 0, 2], &key).await.0.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        get_from(&app, a, &[("x-api-key", "k-2")]).await.0.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn headers_can_be_left_off_admitted_responses_but_not_a_429() {
    let clock = clock();
    let layer = RateLimitLayer::new(limiter(&clock))
        .rule(per_ip(
            Policy::gcra(1, Duration::from_secs(10)).expect("policy"),
        ))
        .expect("rule")
        .headers(false);
    let (app, _) = app(layer);
    let (admitted, _) = get_from(&app, [10, 0, 0, 1], &[]).await;
    assert_eq!(admitted.status, StatusCode::OK);
    assert_eq!(header(&admitted, "ratelimit"), None);
    assert_eq!(header(&admitted, "ratelimit-policy"), None);
    let (denied, _) = get_from(&app, [10, 0, 0, 1], &[]).await;
    assert_eq!(denied.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&denied, "ratelimit"), Some("\"per-ip\";r=0;t=10"));
    assert_eq!(header(&denied, RETRY_AFTER.as_str()), Some("10"));
}

/// A leaky bucket of 10 per second (one request each 100 ms) that delays up to 500 ms.
fn shaper() -> Policy {
    Policy::leaky_bucket(10, Duration::from_secs(1))
        .expect("policy")
        .with_max_delay(Duration::from_millis(500))
        .expect("max delay")
}

/// A leaky bucket delays instead of rejecting: each request leaves one interval after the one
/// before, until the wait would pass `max_delay`. The limiter's clock stands still (every
/// request arrives at once); tokio's paused clock measures how long the layer held each one.
#[tokio::test(start_paused = true)]
async fn a_leaky_bucket_rule_delays_requests_to_its_rate() {
    let clock = clock();
    let layer = RateLimitLayer::new(limiter(&clock))
        .rule(per_ip(shaper()))
        .expect("rule");
    let (app, calls) = app(layer);
    for k in 0..6u64 {
        let started = tokio::time::Instant::now();
        let (parts, _) = get_from(&app, [10, 0, 0, 1], &[]).await;
        assert_eq!(parts.status, StatusCode::OK, "request {k}");
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(100 * k),
            "request {k}"
        );
    }
    // The seventh would wait 600 ms, past the 500 ms allowed: denied at once.
    let started = tokio::time::Instant::now();
    let (denied, _) = get_from(&app, [10, 0, 0, 1], &[]).await;
    assert_eq!(denied.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(calls.load(Ordering::SeqCst), 6);
}

/// An inner service that counts the readiness it has granted and not yet used: a stand-in for
/// a `ConcurrencyLimit` or `Buffer` slot.
struct Reserving {
    reserved: Arc<AtomicUsize>,
    mine: bool,
}

impl Clone for Reserving {
    fn clone(&self) -> Self {
        Reserving {
            reserved: self.reserved.clone(),
            mine: false,
        }
    }
}

impl Drop for Reserving {
    fn drop(&mut self) {
        if self.mine {
            self.reserved.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl tower::Service<Request<Body>> for Reserving {
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        if !self.mine {
            self.mine = true;
            self.reserved.fetch_add(1, Ordering::SeqCst);
        }
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Body>) -> Self::Future {
        assert!(self.mine, "called without poll_ready");
        self.mine = false;
        self.reserved.fetch_sub(1, Ordering::SeqCst);
        std::future::ready(Ok(http::Response::new(Body::empty())))
    }
}

/// A request the leaky bucket delays does not hold the inner service's reserved slot while it
/// waits: it asks for one again when its turn comes.
#[tokio::test(start_paused = true)]
async fn a_delayed_request_holds_no_inner_slot_while_it_waits() {
    use tower::Layer;
    let clock = clock();
    let layer = RateLimitLayer::new(limiter(&clock))
        .rule(per_ip(shaper()))
        .expect("rule");
    let reserved = Arc::new(AtomicUsize::new(0));
    let service = layer.layer(Reserving {
        reserved: reserved.clone(),
        mine: false,
    });
    let request = || {
        let mut req = Request::get("/").body(Body::empty()).expect("request");
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([10, 0, 0, 1], 4000))));
        req
    };
    // The first goes at once; the second waits 100 ms for its turn.
    let first = service.clone().oneshot(request()).await.expect("first");
    assert_eq!(first.status(), StatusCode::OK);
    let second = tokio::spawn(service.clone().oneshot(request()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!second.is_finished(), "still waiting for its turn");
    assert_eq!(
        reserved.load(Ordering::SeqCst),
        0,
        "no slot held while waiting"
    );
    let second = second.await.expect("task").expect("second");
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(reserved.load(Ordering::SeqCst), 0);
}

/// Redis down: the limiter's degraded policy answers within its deadline. Fail open lets the
/// request through without `RateLimit` figures (they would be guesses); `ReturnError` answers
/// 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_the_degraded_policy_answers() {
    let mut server = tokio::task::spawn_blocking(|| RedisServer::start().expect("redis"))
        .await
        .expect("task");
    let store = RedisStore::builder(RedisTopology::Standalone(server.url()))
        .prefix(&unique_prefix("tower-rl-down"))
        .connect()
        .await
        .expect("connect");
    let policy = Policy::gcra(100, Duration::from_secs(60)).expect("policy");
    let open = RateLimiter::builder(store.clone())
        .on_store_failure(DegradedPolicy::FailOpen)
        .build()
        .expect("limiter");
    let strict = RateLimiter::builder(store)
        .on_store_failure(DegradedPolicy::ReturnError)
        .build()
        .expect("limiter");
    let open_layer = RateLimitLayer::new(open)
        .rule(per_ip(policy.clone()))
        .expect("rule");
    let strict_layer = RateLimitLayer::new(strict)
        .rule(per_ip(policy))
        .expect("rule");
    let (open_app, _) = app(open_layer.clone());
    let (strict_app, strict_calls) = app(strict_layer.clone());
    let a = [10, 0, 0, 1];
    let (up, _) = get_from(&open_app, a, &[]).await;
    assert_eq!(header(&up, "ratelimit"), Some("\"per-ip\";r=99;t=1"));

    let server = tokio::task::spawn_blocking(move || {
        server.kill();
        server
    })
    .await
    .expect("task");
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let (parts, body) = get_from(&open_app, a, &[]).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(body, "ok");
        assert_eq!(
            header(&parts, "ratelimit-policy"),
            Some("\"per-ip\";q=100;w=60")
        );
        assert_eq!(header(&parts, "ratelimit"), None);
        // The limiter's 50 ms deadline, with room for a loaded machine: not seconds.
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );

        let (parts, body) = get_from(&strict_app, a, &[]).await;
        assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(header(&parts, RETRY_AFTER.as_str()), Some("1"));
        assert!(body.is_empty(), "no store message in the body: {body}");
    }
    assert_eq!(strict_calls.load(Ordering::SeqCst), 0);
    let open_stats = open_layer.stats();
    assert_eq!(open_stats.rules[0].checked, 4);
    assert_eq!(open_stats.rules[0].degraded, 3);
    assert_eq!(open_stats.store_errors, 0);
    assert_eq!(strict_layer.stats().store_errors, 3);
    drop(server);
}

/// Three replicas of an app, each with its own limiter on its own connection to one Redis, on
/// three real sockets; a real HTTP client spreads requests over them: together they admit the
/// per-client limit exactly, not three times it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_real_sockets_share_one_limit() {
    const LIMIT: u64 = 10;
    let prefix = unique_prefix("tower-rl-fleet");
    let policy = Policy::gcra(LIMIT, Duration::from_secs(3600)).expect("policy");
    let mut addrs = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..3 {
        let store = RedisStore::builder(RedisTopology::Standalone(shared_standalone().url()))
            .prefix(&prefix)
            .connect()
            .await
            .expect("connect");
        let layer = RateLimitLayer::new(RateLimiter::new(store))
            .rule(per_ip(policy.clone()))
            .expect("rule");
        let (router, _) = app(layer);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        addrs.push(listener.local_addr().expect("addr"));
        servers.push(tokio::spawn(async move {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
            .expect("serve");
        }));
    }
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut admitted = 0;
    let mut denied = 0;
    for i in 0..(3 * LIMIT as usize) {
        let uri = format!("http://{}/", addrs[i % 3]);
        let response = client
            .request(Request::get(uri).body(Full::default()).expect("request"))
            .await
            .expect("response");
        match response.status() {
            StatusCode::OK => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                denied += 1;
                let retry: u64 = response.headers()[RETRY_AFTER]
                    .to_str()
                    .expect("ASCII")
                    .parse()
                    .expect("seconds");
                // GCRA, 10 an hour: the next one in up to 6 minutes.
                assert!((1..=360).contains(&retry), "{retry}");
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(admitted, LIMIT);
    assert_eq!(denied, 2 * LIMIT);
    for server in servers {
        server.abort();
    }
}

/// Two layers, a general one outside and a stricter one on a route: each adds its own field
/// lines, and a request the inner layer denies was counted by the outer one (layers are
/// decided one after the other; the rules of one layer together).
#[tokio::test]
async fn nested_layers_report_every_rule_and_decide_outside_in() {
    let clock = clock();
    let limiter = limiter(&clock);
    let outer = RateLimitLayer::new(limiter.clone())
        .rule(per_ip(
            Policy::fixed_window(10, Duration::from_secs(60)).expect("policy"),
        ))
        .expect("rule");
    let inner = RateLimitLayer::new(limiter)
        .rule(
            RateLimitRule::new(
                "search",
                Policy::fixed_window(1, Duration::from_secs(60)).expect("policy"),
                RuleKey::ClientIp(ClientIp::Peer),
            )
            .expect("rule"),
        )
        .expect("rule");
    let app = Router::new()
        .route("/", get(|| async { "ok" }).layer(inner))
        .layer(outer);
    let lines = |parts: &http::response::Parts, name: &str| -> Vec<String> {
        parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().expect("ASCII").to_owned())
            .collect()
    };
    let (first, _) = get_from(&app, [10, 0, 0, 1], &[]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        lines(&first, "ratelimit-policy"),
        ["\"search\";q=1;w=60", "\"per-ip\";q=10;w=60"]
    );
    assert_eq!(
        lines(&first, "ratelimit"),
        ["\"search\";r=0;t=60", "\"per-ip\";r=9;t=60"]
    );
    let (second, _) = get_from(&app, [10, 0, 0, 1], &[]).await;
    assert_eq!(second.status, StatusCode::TOO_MANY_REQUESTS);
    // The outer layer admitted and counted it before the inner one denied it.
    assert_eq!(
        lines(&second, "ratelimit"),
        ["\"search\";r=0;t=60", "\"per-ip\";r=8;t=60"]
    );
}

/// A shadow rule counts and decides but never denies: requests it would deny go on and are
/// counted; the enforcing rule beside it still consumes and denies as before; the shadow rule
/// is not in the headers.
#[tokio::test]
async fn a_shadow_rule_never_denies_and_counts_what_it_would_have_denied() {
    let clock = clock();
    let shadow = RateLimitRule::new(
        "strict",
        Policy::fixed_window(1, Duration::from_secs(60)).expect("policy"),
        RuleKey::Global,
    )
    .expect("rule")
    .shadow();
    let layer = RateLimitLayer::new(limiter(&clock))
        .rule(per_ip(
            Policy::fixed_window(3, Duration::from_secs(60)).expect("policy"),
        ))
        .expect("rule")
        .rule(shadow)
        .expect("rule");
    let (router, calls) = app(layer.clone());
    let a = [10, 0, 0, 1];
    for (i, remaining) in [2, 1, 0].into_iter().enumerate() {
        let (parts, _) = get_from(&router, a, &[]).await;
        assert_eq!(parts.status, StatusCode::OK, "request {i}");
        assert_eq!(
            header(&parts, "ratelimit-policy"),
            Some("\"per-ip\";q=3;w=60")
        );
        let expected = format!("\"per-ip\";r={remaining};t=60");
        assert_eq!(header(&parts, "ratelimit"), Some(expected.as_str()));
    }
    // The shadow rule (1 a minute, for everyone) would have denied the second and third.
    let stats = layer.stats();
    assert_eq!(
        (stats.rules[1].name.as_str(), stats.rules[1].shadow),
        ("strict", true)
    );
    assert_eq!((stats.rules[1].checked, stats.rules[1].denied), (3, 2));
    assert_eq!((stats.rules[0].checked, stats.rules[0].denied), (3, 0));
    // The enforcing rule still denies; the shadow rule is not consulted for a denied request.
    let (denied, body) = get_from(&router, a, &[]).await;
    assert_eq!(denied.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(body.contains("[\"per-ip\"]"), "{body}");
    let stats = layer.stats();
    assert_eq!((stats.rules[0].checked, stats.rules[0].denied), (4, 1));
    assert_eq!((stats.rules[1].checked, stats.rules[1].denied), (3, 2));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // A request no enforcing rule applies to is still counted by the shadow rule.
    let shadow_only = RateLimitLayer::new(limiter(&clock))
        .rule(
            RateLimitRule::new(
                "strict",
                Policy::fixed_window(1, Duration::from_secs(60)).expect("policy"),
                RuleKey::Global,
            )
            .expect("rule")
            .shadow(),
        )
        .expect("rule");
    let (router, _) = app(shadow_only.clone());
    for _ in 0..3 {
        let (parts, _) = get_from(&router, a, &[]).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(header(&parts, "ratelimit"), None);
    }
    assert_eq!(shadow_only.stats().rules[0].denied, 2);
}

/// A request without a readable client address (an app served without `ConnectInfo`) is
/// counted under one shared key, never let through unlimited, and the layer counts (and once
/// logs) it so the misconfiguration shows.
#[tokio::test]
async fn requests_without_a_client_address_share_one_limit_and_are_counted() {
    let clock = clock();
    let layer = RateLimitLayer::new(limiter(&clock))
        .rule(per_ip(
            Policy::fixed_window(2, Duration::from_secs(60)).expect("policy"),
        ))
        .expect("rule");
    let (router, _) = app(layer.clone());
    let without_address = || Request::get("/").body(Body::empty()).expect("request");
    for expected in [
        StatusCode::OK,
        StatusCode::OK,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        let response = router
            .clone()
            .oneshot(without_address())
            .await
            .expect("infallible");
        assert_eq!(response.status(), expected);
    }
    assert_eq!(layer.stats().unknown_client_addresses, 3);
    // A request with an address has its own allowance and is not counted as unknown.
    assert_eq!(
        get_from(&router, [10, 0, 0, 1], &[]).await.0.status,
        StatusCode::OK
    );
    assert_eq!(layer.stats().unknown_client_addresses, 3);
}
