//! The HTTP cache layer in an axum app on a real socket, over the embedded store, and over Redis
//! (standalone, from `statehouse-testkit`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::response::IntoResponse;
use axum::routing::get;
use http::header::{AGE, CACHE_CONTROL, HOST};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use statehouse::statehouse_core::cache::CacheStore;
use statehouse::{Clock, EmbeddedCacheStore, ManualClock, RedisStore, RedisTopology};
use statehouse_testkit::{shared_standalone, unique_prefix};
use statehouse_tower::cache::HttpCacheLayer;
use tower::ServiceExt;

/// An app whose one route counts its calls and may be cached for 60 s.
fn app(
    store: Arc<dyn CacheStore>,
    clock: &ManualClock,
) -> (Router, Arc<AtomicUsize>, HttpCacheLayer) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let layer = HttpCacheLayer::builder(store)
        .clock(Arc::new(clock.clone()) as Arc<dyn Clock>)
        .build()
        .expect("layer");
    let router = Router::new()
        .route(
            "/article",
            get(move || {
                let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    (
                        [(CACHE_CONTROL, "public, max-age=60")],
                        format!("article {n}"),
                    )
                        .into_response()
                }
            }),
        )
        .layer(layer.clone());
    (router, calls, layer)
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let server = tokio::spawn(async move {
        axum::serve(listener, router).await.expect("serve");
    });
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let fetch = || async {
        let req = Request::get(format!("http://{addr}/article"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let res = client.request(req).await.expect("HTTP request");
        let (parts, body) = res.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (parts, String::from_utf8_lossy(&body).into_owned())
    };

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
