//! The HTTP cache layer in an axum app on a real socket, over the embedded store, and over Redis
//! (standalone, from `statehouse-testkit`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::response::IntoResponse;
use axum::routing::get;
use http::header::{AGE, CACHE_CONTROL, ETAG, HOST, IF_NONE_MATCH};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use statehouse::statehouse_core::cache::CacheStore;
use statehouse::{Clock, EmbeddedCacheStore, ManualClock, RedisStore, RedisTopology};
use statehouse_testkit::{shared_cluster, shared_standalone, unique_prefix};
use statehouse_tower::cache::HttpCacheLayer;
use tower::ServiceExt;

/// The layer of these tests: every default, on `clock`.
fn layer_on(store: Arc<dyn CacheStore>, clock: &ManualClock) -> HttpCacheLayer {
    HttpCacheLayer::builder(store)
        .clock(Arc::new(clock.clone()) as Arc<dyn Clock>)
        .build()
        .expect("layer")
}

/// An app whose routes count their calls (one counter): `/article` may be cached for 60 s,
/// `/feed` for 10 s and then served stale for 60 s while it is revalidated.
fn app(
    store: Arc<dyn CacheStore>,
    clock: &ManualClock,
) -> (Router, Arc<AtomicUsize>, HttpCacheLayer) {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = layer_on(store, clock);
    let route = |cache_control: &'static str, name: &'static str| {
        let counted = calls.clone();
        get(move || {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            async move { ([(CACHE_CONTROL, cache_control)], format!("{name} {n}")).into_response() }
        })
    };
    let router = Router::new()
        .route("/article", route("public, max-age=60", "article"))
        .route(
            "/feed",
            route("max-age=10, stale-while-revalidate=60", "feed"),
        )
        .layer(layer.clone());
    (router, calls, layer)
}

/// A router served on a free loopback port, and a real HTTP client for it.
struct Served {
    addr: std::net::SocketAddr,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Served {
    /// Serves `router`; the task is the server's, to abort at the end.
    async fn start(router: Router) -> (tokio::task::JoinHandle<()>, Served) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let server = tokio::spawn(async move {
            axum::serve(listener, router).await.expect("serve");
        });
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        (server, Served { addr, client })
    }

    /// GETs `path`, with `If-None-Match` when given; the response head and body.
    async fn get(
        &self,
        path: &str,
        if_none_match: Option<&str>,
    ) -> (http::response::Parts, String) {
        let mut req = Request::get(format!("http://{}{path}", self.addr));
        if let Some(tag) = if_none_match {
            req = req.header(IF_NONE_MATCH, tag);
        }
        let req = req.body(Full::new(Bytes::new())).expect("request");
        let res = self.client.request(req).await.expect("HTTP request");
        let (parts, body) = res.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (parts, String::from_utf8_lossy(&body).into_owned())
    }
}

#[tokio::test]
async fn a_hit_over_a_real_socket() {
    let clock = ManualClock::starting_now();
    let store = Arc::new(
        EmbeddedCacheStore::builder()
            .clock(clock.clone())
            .build()
            .expect("store"),
    );
    let (router, calls, layer) = app(store, &clock);
    let (server, client) = Served::start(router).await;
    let fetch = || client.get("/article", None);

    let (first, body) = fetch().await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(body, "article 1");
    assert_eq!(
        first.headers["cache-status"],
        "statehouse; fwd=uri-miss; fwd-status=200; stored"
    );
    clock.advance(std::time::Duration::from_secs(5));
    let (second, body) = fetch().await;
    assert_eq!(body, "article 1");
    assert_eq!(second.headers["cache-status"], "statehouse; hit; ttl=55");
    assert_eq!(second.headers[AGE], "5");
    assert_eq!(second.headers["content-length"], "9");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(layer.stats().hits(), 1);
    server.abort();
}

#[tokio::test]
async fn a_hit_and_a_purge_through_redis() {
    let clock = ManualClock::starting_now();
    let store = RedisStore::builder(RedisTopology::Standalone(shared_standalone().url()))
        .prefix(&unique_prefix("http-cache"))
        .connect()
        .await
        .expect("connect to the test Redis")
        .cache_store();
    let (router, calls, layer) = app(Arc::new(store), &clock);
    let get = || {
        Request::get("/article")
            .header(HOST, "example.com")
            .body(axum::body::Body::empty())
            .expect("request")
    };
    let first = router.clone().oneshot(get()).await.expect("infallible");
    assert_eq!(
        first.headers()["cache-status"],
        "statehouse; fwd=uri-miss; fwd-status=200; stored"
    );
    let second = router.clone().oneshot(get()).await.expect("infallible");
    assert_eq!(second.headers()["cache-status"], "statehouse; hit; ttl=60");
    let body = second.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"article 1");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    assert!(
        layer
            .purger()
            .purge_path("example.com", "/article")
            .await
            .expect("purge")
    );
    let third = router.oneshot(get()).await.expect("infallible");
    let body = third.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"article 2");
    assert_eq!(layer.stats().store_errors(), 0);
}

/// An app whose `/page` carries an `ETag` and answers `If-None-Match` with a 304, counting its
/// calls and the conditional ones.
fn validating_app(
    store: Arc<dyn CacheStore>,
    clock: &ManualClock,
) -> (Router, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let conditional = Arc::new(AtomicUsize::new(0));
    let (counted, counted_conditional) = (calls.clone(), conditional.clone());
    let layer = layer_on(store, clock);
    let router = Router::new()
        .route(
            "/page",
            get(move |headers: http::HeaderMap| {
                let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
                let revalidation = headers.get(IF_NONE_MATCH).is_some_and(|v| v == "\"p1\"");
                if revalidation {
                    counted_conditional.fetch_add(1, Ordering::SeqCst);
                }
                async move {
                    let fields = [(CACHE_CONTROL, "max-age=10"), (ETAG, "\"p1\"")];
                    if revalidation {
                        (StatusCode::NOT_MODIFIED, fields).into_response()
                    } else {
                        (fields, format!("page {n}")).into_response()
                    }
                }
            }),
        )
        .layer(layer);
    (router, calls, conditional)
}

/// A cache store on the shared test Redis standalone and one on the shared test Cluster, each
/// under a fresh prefix starting with `prefix`.
async fn redis_stores(prefix: &str) -> Vec<(RedisTopology, Arc<dyn CacheStore>)> {
    let cluster = tokio::task::spawn_blocking(|| shared_cluster().urls())
        .await
        .expect("cluster");
    let mut stores = Vec::new();
    for topology in [
        RedisTopology::Standalone(shared_standalone().url()),
        RedisTopology::Cluster(cluster),
    ] {
        let store = RedisStore::builder(topology.clone())
            .prefix(&unique_prefix(prefix))
            .connect()
            .await
            .expect("connect to the test Redis")
            .cache_store();
        stores.push((topology, Arc::new(store) as Arc<dyn CacheStore>));
    }
    stores
}

/// Revalidation and conditional requests through a real HTTP client on a real socket, over
/// Redis standalone and Redis Cluster: a conditional request on a cold cache fills it and gets
/// a 304; a stale entry is revalidated with its `ETag` and refreshed by the origin's 304; a
/// client holding the representation gets a 304 from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revalidation_and_304s_over_redis_on_a_real_socket() {
    for (topology, store) in redis_stores("http-revalidate").await {
        let clock = ManualClock::starting_now();
        let (router, calls, conditional) = validating_app(store, &clock);
        let (server, client) = Served::start(router).await;
        let fetch = |if_none_match| client.get("/page", if_none_match);

        // A client that holds the page already, on a cold cache: the origin sends the whole
        // page (the client's condition kept from it), which fills the cache, and the client
        // gets a 304.
        let (first, body) = fetch(Some("\"p1\"")).await;
        assert_eq!(
            (first.status, body.as_str()),
            (StatusCode::NOT_MODIFIED, ""),
            "{topology:?}"
        );
        assert_eq!(
            first.headers["cache-status"],
            "statehouse; fwd=uri-miss; fwd-status=200; stored"
        );
        let (hit, body) = fetch(None).await;
        assert_eq!((hit.status, body.as_str()), (StatusCode::OK, "page 1"));
        assert_eq!(hit.headers["cache-status"], "statehouse; hit; ttl=10");
        clock.advance(std::time::Duration::from_secs(15));
        let (revalidated, body) = fetch(None).await;
        assert_eq!(
            (revalidated.status, body.as_str()),
            (StatusCode::OK, "page 1"),
            "{topology:?}"
        );
        assert_eq!(
            revalidated.headers["cache-status"],
            "statehouse; fwd=stale; fwd-status=304; stored"
        );
        let (not_modified, body) = fetch(Some("\"p1\"")).await;
        assert_eq!(
            not_modified.status,
            StatusCode::NOT_MODIFIED,
            "{topology:?}"
        );
        assert_eq!(body, "");
        assert_eq!(
            not_modified.headers["cache-status"],
            "statehouse; hit; ttl=10"
        );
        assert_eq!(
            (
                calls.load(Ordering::SeqCst),
                conditional.load(Ordering::SeqCst)
            ),
            (2, 1),
            "{topology:?}"
        );
        server.abort();
    }
}

/// `stale-while-revalidate` through a real HTTP client on a real socket, over Redis standalone
/// and Redis Cluster: a stale response is served at once, the background request refreshes
/// the entry in Redis, and the next request gets the new response from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_over_redis_on_a_real_socket() {
    for (topology, store) in redis_stores("http-swr").await {
        let clock = ManualClock::starting_now();
        let (router, calls, layer) = app(store, &clock);
        let (server, client) = Served::start(router).await;

        let (first, body) = client.get("/feed", None).await;
        assert_eq!((first.status, body.as_str()), (StatusCode::OK, "feed 1"));
        clock.advance(std::time::Duration::from_secs(15));
        let (stale, body) = client.get("/feed", None).await;
        assert_eq!((stale.status, body.as_str()), (StatusCode::OK, "feed 1"));
        assert_eq!(
            stale.headers["cache-status"], "statehouse; hit; ttl=-5; detail=stale-while-revalidate",
            "{topology:?}"
        );
        // The background request stores its response in Redis; until it has, the stale entry
        // answers and no second background request starts. Bounded: a guard, not a timing.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let refreshed = loop {
            let (res, body) = client.get("/feed", None).await;
            if body != "feed 1" {
                break (res, body);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{topology:?}: the background revalidation never stored its response"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        // Normally "feed 2". A poll that read the stale entry just before the background
        // request stored its response, and looked for a flight just after that request ended,
        // starts one more revalidation: then a later version, each from one origin call.
        let version: usize = refreshed
            .1
            .strip_prefix("feed ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{topology:?}: unexpected body {:?}", refreshed.1));
        assert!(version >= 2, "{topology:?}");
        assert_eq!(
            refreshed.0.headers["cache-status"],
            "statehouse; hit; ttl=10"
        );
        assert_eq!(calls.load(Ordering::SeqCst), version, "{topology:?}");
        assert!(layer.stats().stale_while_revalidate() >= 1);
        server.abort();
    }
}
