//! A real Redis outage: a private redis-server is killed under the example app. The configured
//! policy decides within the store deadline: 503 (`Reject503`, the default) or an anonymous
//! request (`Anonymous`); routes that never read the session keep working either way.
//!
//! The time bounds are generous (a loaded CI machine must pass) but far below the seconds a
//! client library's own timeouts would take.

mod common;

use std::time::{Duration, Instant};

use common::{Backend, Harness, Via, real_store};
use http::StatusCode;
use statehouse::{ManualClock, SessionStoreDown};
use statehouse_testkit::RedisServer;
use statehouse_tower::CookieConfig;

const DEADLINE: Duration = Duration::from_millis(200);
const BOUND: Duration = Duration::from_secs(2);

async fn app_over_private_redis(via: Via, policy: SessionStoreDown) -> (Harness, RedisServer) {
    let server = RedisServer::start().expect("a private redis-server");
    let clock = ManualClock::starting_now();
    let store = real_store(Backend::Redis, &clock, Some(server.url())).await;
    let h = Harness::over(store, clock, via, CookieConfig::default(), |b| {
        b.deadline(DEADLINE).on_store_down(policy)
    })
    .await;
    (h, server)
}

async fn reject_503(via: Via) {
    let (h, mut server) = app_over_private_redis(via, SessionStoreDown::Reject503).await;
    let mut d = h.device();
    d.login("alice").await;
    assert_eq!(d.get("/me").await.status, StatusCode::OK);

    server.kill();
    for _ in 0..5 {
        let start = Instant::now();
        let me = d.get("/me").await;
        assert_eq!(me.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(start.elapsed() < BOUND, "{:?}", start.elapsed());
        assert!(me.set_cookies().is_empty());
    }
    let start = Instant::now();
    let login = h
        .device()
        .post("/login", Some(serde_json::json!({ "user_id": "bob" })))
        .await;
    assert_eq!(login.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(login.set_cookies().is_empty());
    assert!(start.elapsed() < BOUND);
    // No session needed, no store needed.
    assert_eq!(d.get("/health").await.status, StatusCode::OK);
    // Without a cookie there is nothing to load: 401, not 503.
    assert_eq!(h.device().get("/me").await.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn reject_503_oneshot() {
    reject_503(Via::Oneshot).await;
}

#[tokio::test]
async fn reject_503_socket() {
    reject_503(Via::Socket).await;
}

#[tokio::test]
async fn anonymous_policy_treats_the_request_as_signed_out() {
    let (h, mut server) = app_over_private_redis(Via::Oneshot, SessionStoreDown::Anonymous).await;
    let mut d = h.device();
    d.login("carol").await;
    server.kill();
    let start = Instant::now();
    let me = d.get("/me").await;
    assert_eq!(
        me.status,
        StatusCode::UNAUTHORIZED,
        "anonymous: no live session"
    );
    assert!(start.elapsed() < BOUND, "{:?}", start.elapsed());
    assert!(
        me.set_cookies().is_empty(),
        "the cookie is kept for when the store is back"
    );
    assert_eq!(d.get("/health").await.status, StatusCode::OK);
    // Logging in needs the store: 503 whatever the policy.
    let login = h
        .device()
        .post("/login", Some(serde_json::json!({ "user_id": "dan" })))
        .await;
    assert_eq!(login.status, StatusCode::SERVICE_UNAVAILABLE);
}

/// Under `Reject503` the layer answers 503 even when the handler swallowed the error and
/// answered as if the request were anonymous.
#[tokio::test]
async fn reject_503_even_if_the_handler_ignores_the_error() {
    use axum::Router;
    use axum::body::Body;
    use axum::routing::{get, post};
    use http::Request;
    use http::header::{COOKIE, SET_COOKIE};
    use statehouse::Sessions;
    use statehouse_tower::{Session, SessionLayer};
    use tower::ServiceExt;

    let mut server = RedisServer::start().expect("a private redis-server");
    let clock = ManualClock::starting_now();
    let store = real_store(Backend::Redis, &clock, Some(server.url())).await;
    let sessions = Sessions::builder_shared(store)
        .deadline(DEADLINE)
        .build()
        .expect("sessions");
    let app = Router::new()
        .route(
            "/login",
            post(|s: Session| async move { s.login("erin", &[]).await }),
        )
        .route(
            "/swallow",
            get(|s: Session| async move { format!("{:?}", s.user_id().await.ok().flatten()) }),
        )
        .layer(SessionLayer::new(sessions));

    let login = app
        .clone()
        .oneshot(
            Request::post("/login")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("infallible");
    let cookie = login.headers()[SET_COOKIE]
        .to_str()
        .expect("ascii")
        .split(';')
        .next()
        .expect("pair")
        .to_owned();
    let swallow = || {
        Request::get("/swallow")
            .header(COOKIE, &cookie)
            .body(Body::empty())
            .expect("request")
    };
    let ok = app.clone().oneshot(swallow()).await.expect("infallible");
    assert_eq!(ok.status(), StatusCode::OK);

    server.kill();
    let down = app.oneshot(swallow()).await.expect("infallible");
    assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
}
