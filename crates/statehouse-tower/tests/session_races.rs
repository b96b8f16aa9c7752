//! Races between concurrent requests of one browser, made deterministic: a "slow" request
//! parks inside its handler (after its session load) until the test lets it go, while other
//! requests run to completion. On the embedded store and on a real Redis; time on a
//! `ManualClock`, nothing sleeps.
//!
//! * A slow request whose read refreshed the session (so, with a persistent cookie, it would
//!   re-send the cookie) must not hand the browser the pre-rotation token once a concurrent
//!   request rotated the session: the old token dies at the end of its grace, and the browser
//!   would be logged out.
//! * The same for a slow request that writes to the session.
//! * "Log out other devices" from a request whose token a concurrent request rotated must keep
//!   the current device (the rotated session), not revoke it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::routing::{get, post};
use common::{Backend, real_store};
use http::header::{COOKIE, SET_COOKIE};
use http::{Request, Response, StatusCode};
use statehouse::{ManualClock, NewSession, SessionToken, Sessions};
use statehouse_tower::{CookieConfig, Error, Session, SessionLayer};
use tokio::sync::{Notify, Semaphore};
use tower::ServiceExt;

const COOKIE_NAME: &str = "__Host-session";

/// The slow handler's rendezvous: it signals `loaded` once its session is loaded, then waits
/// for a permit on `go`.
#[derive(Clone)]
struct Gate {
    loaded: Arc<Notify>,
    go: Arc<Semaphore>,
}

impl Gate {
    fn new() -> Gate {
        Gate {
            loaded: Arc::new(Notify::new()),
            go: Arc::new(Semaphore::new(0)),
        }
    }

    async fn park(&self) {
        self.loaded.notify_one();
        self.go.acquire().await.expect("gate open").forget();
    }
}

/// Reads the session (its load refreshes it when due), then parks.
async fn slow_read(State(gate): State<Gate>, session: Session) -> Result<&'static str, Error> {
    session.user_id().await?.ok_or(Error::NoSession)?;
    gate.park().await;
    Ok("read")
}

/// Reads the session, parks, then writes a field.
async fn slow_write(State(gate): State<Gate>, session: Session) -> Result<&'static str, Error> {
    session.user_id().await?.ok_or(Error::NoSession)?;
    gate.park().await;
    session.insert("cart", &3_u32).await?;
    Ok("written")
}

/// Reads the session, parks, then revokes the user's other sessions.
async fn slow_others(State(gate): State<Gate>, session: Session) -> Result<String, Error> {
    session.user_id().await?.ok_or(Error::NoSession)?;
    gate.park().await;
    Ok(session.logout_other_devices().await?.to_string())
}

/// Rotates the session (a privilege change), parks, then writes a field.
async fn slow_rotate_write(
    State(gate): State<Gate>,
    session: Session,
) -> Result<&'static str, Error> {
    session.rotate().await?;
    gate.park().await;
    session.insert("cart", &3_u32).await?;
    Ok("rotated and written")
}

async fn rotate(session: Session) -> Result<&'static str, Error> {
    session.rotate().await?;
    Ok("rotated")
}

async fn logout(session: Session) -> Result<&'static str, Error> {
    session.logout().await?;
    Ok("out")
}

async fn me(session: Session) -> Result<String, Error> {
    session.user_id().await?.ok_or(Error::NoSession)
}

struct App {
    router: Router,
    sessions: Sessions,
    clock: ManualClock,
    gate: Gate,
}

async fn app(backend: Backend) -> App {
    let clock = ManualClock::starting_now();
    let store = real_store(backend, &clock, None).await;
    let sessions = Sessions::builder_shared(store).build().expect("sessions");
    let cookie = CookieConfig::builder()
        .max_age(Some(Duration::from_secs(30 * 60)))
        .build()
        .expect("cookie config");
    let gate = Gate::new();
    let router = Router::new()
        .route("/slow-read", get(slow_read))
        .route("/slow-write", post(slow_write))
        .route("/slow-others", post(slow_others))
        .route("/rotate", post(rotate))
        .route("/slow-rotate-write", post(slow_rotate_write))
        .route("/me", get(me))
        .route("/logout", post(logout))
        .with_state(gate.clone())
        .layer(SessionLayer::new(sessions.clone()).cookie(cookie));
    App {
        router,
        sessions,
        clock,
        gate,
    }
}

impl App {
    /// `method path` with `token`'s cookie, to completion.
    async fn send(&self, method: &str, path: &str, token: &SessionToken) -> Response<Body> {
        self.router
            .clone()
            .oneshot(request(method, path, token))
            .await
            .expect("a response")
    }
}

fn request(method: &str, path: &str, token: &SessionToken) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(COOKIE, format!("{COOKIE_NAME}={}", token.encode()))
        .body(Body::empty())
        .expect("request")
}

/// The token values of the response's `Set-Cookie` headers.
fn set_tokens(response: &Response<Body>) -> Vec<String> {
    response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| {
            let v = v.to_str().expect("ASCII");
            let pair = v.split(';').next().expect("a pair");
            pair.strip_prefix(&format!("{COOKIE_NAME}="))
                .expect("our cookie")
                .to_owned()
        })
        .collect()
}

type Pending = tokio::task::JoinHandle<Result<Response<Body>, std::convert::Infallible>>;

/// Starts `method path` and returns once its handler has loaded the session and parked.
async fn start_slow(a: &App, method: &str, path: &str, token: &SessionToken) -> Pending {
    let slow = tokio::spawn(a.router.clone().oneshot(request(method, path, token)));
    a.gate.loaded.notified().await;
    slow
}

/// Lets a parked request finish.
async fn finish_slow(a: &App, slow: Pending) -> Response<Body> {
    a.gate.go.add_permits(1);
    slow.await.expect("task").expect("slow request")
}

/// Rotates the session through another request; returns the new token's cookie value.
async fn rotate_elsewhere(a: &App, token: &SessionToken) -> String {
    let rotated = a.send("POST", "/rotate", token).await;
    assert_eq!(rotated.status(), StatusCode::OK);
    let new = set_tokens(&rotated);
    assert_eq!(new.len(), 1, "the rotation sets the new token");
    assert_ne!(new[0], token.encode());
    new[0].clone()
}

/// Runs `slow` up to its park, rotates the session through another request, then lets `slow`
/// finish. Returns the slow response and the rotated token.
async fn slow_across_a_rotation(
    a: &App,
    method: &str,
    path: &str,
    token: &SessionToken,
) -> (Response<Body>, String) {
    let slow = start_slow(a, method, path, token).await;
    let new = rotate_elsewhere(a, token).await;
    (finish_slow(a, slow).await, new)
}

async fn login(a: &App, user: &str) -> SessionToken {
    let (token, _) = a
        .sessions
        .create(&NewSession::for_user(user))
        .await
        .expect("create");
    token
}

/// Control: without a concurrent rotation, a refreshing read re-sends the cookie (the
/// persistent cookie follows the expiry), and so does a write.
async fn refresh_resends_the_cookie(backend: Backend) {
    let a = app(backend).await;
    let token = login(&a, "alice").await;
    a.clock.advance(Duration::from_secs(8 * 60)); // a refresh is due (a quarter of 30 min)
    a.gate.go.add_permits(2);
    let read = a.send("GET", "/slow-read", &token).await;
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(set_tokens(&read), vec![token.encode()], "{backend:?}");
    let write = a.send("POST", "/slow-write", &token).await;
    assert_eq!(write.status(), StatusCode::OK);
    assert_eq!(set_tokens(&write), vec![token.encode()], "{backend:?}");
}

async fn refreshing_read_does_not_resend_a_rotated_token(backend: Backend) {
    let a = app(backend).await;
    let token = login(&a, "bob").await;
    a.clock.advance(Duration::from_secs(8 * 60));
    let (slow, new) = slow_across_a_rotation(&a, "GET", "/slow-read", &token).await;
    assert_eq!(slow.status(), StatusCode::OK);
    assert!(
        set_tokens(&slow).is_empty(),
        "{backend:?}: the slow read handed back the pre-rotation token"
    );
    // The browser keeps the rotated token, which works after the old one's grace.
    a.clock.advance(Duration::from_secs(60));
    let token = SessionToken::parse(&new).expect("a token");
    let me = a.send("GET", "/me", &token).await;
    assert_eq!(me.status(), StatusCode::OK);
}

async fn write_does_not_resend_a_rotated_token(backend: Backend) {
    let a = app(backend).await;
    let token = login(&a, "carol").await;
    a.clock.advance(Duration::from_secs(60)); // no refresh due: only the write moves the expiry
    let (slow, new) = slow_across_a_rotation(&a, "POST", "/slow-write", &token).await;
    assert_eq!(slow.status(), StatusCode::OK, "written within the grace");
    assert!(
        set_tokens(&slow).is_empty(),
        "{backend:?}: the slow write handed back the pre-rotation token"
    );
    // The write reached the rotated session.
    let token = SessionToken::parse(&new).expect("a token");
    let record = a
        .sessions
        .load(&token)
        .await
        .expect("load")
        .expect("live")
        .record;
    assert!(record.data.contains_key("cart"), "{backend:?}");
}

async fn other_devices_keeps_the_rotated_current_session(backend: Backend) {
    let a = app(backend).await;
    let token = login(&a, "dave").await;
    let other = login(&a, "dave").await;
    let (slow, new) = slow_across_a_rotation(&a, "POST", "/slow-others", &token).await;
    assert_eq!(slow.status(), StatusCode::OK);
    let new = SessionToken::parse(&new).expect("a token");
    assert!(
        a.sessions.load(&new).await.expect("load").is_some(),
        "{backend:?}: the current device (rotated mid-request) was revoked"
    );
    assert!(
        a.sessions.load(&other).await.expect("load").is_none(),
        "{backend:?}: the other device survived"
    );
}

/// A slow request whose session is logged out elsewhere before its write: the write is
/// dropped (never resurrecting the session) and the response says so (401), instead of a 200
/// for a change that was not saved.
async fn write_after_a_logout_elsewhere_is_refused(backend: Backend) {
    let a = app(backend).await;
    let token = login(&a, "erin").await;
    let slow = start_slow(&a, "POST", "/slow-write", &token).await;
    let out = a.send("POST", "/logout", &token).await;
    assert_eq!(out.status(), StatusCode::OK);
    let slow = finish_slow(&a, slow).await;
    assert_eq!(slow.status(), StatusCode::UNAUTHORIZED, "{backend:?}");
    assert!(a.sessions.load(&token).await.expect("load").is_none());
}

/// A slow request on a token rotated elsewhere, whose write comes after the old token's grace:
/// the write is dropped and answered 401, and no cookie is cleared (the browser holds the new
/// token, which stays logged in).
async fn write_after_the_grace_is_refused_without_clearing_the_cookie(backend: Backend) {
    let a = app(backend).await;
    let token = login(&a, "frank").await;
    let slow = start_slow(&a, "POST", "/slow-write", &token).await;
    let new = rotate_elsewhere(&a, &token).await;
    a.clock.advance(Duration::from_secs(6)); // past the 5 s grace
    let slow = finish_slow(&a, slow).await;
    assert_eq!(slow.status(), StatusCode::UNAUTHORIZED, "{backend:?}");
    assert!(set_tokens(&slow).is_empty(), "no cookie change");
    let new = SessionToken::parse(&new).expect("a token");
    let record = a
        .sessions
        .load(&new)
        .await
        .expect("load")
        .expect("live")
        .record;
    assert!(!record.data.contains_key("cart"), "{backend:?}");
}

/// A request that rotated its session (issuing a new token) and then finds it revoked at its
/// write (log out everywhere, from another device): 401, and the cookie is cleared, not set to
/// the new token, which is dead.
async fn rotated_then_revoked_clears_the_cookie(backend: Backend) {
    let a = app(backend).await;
    let token = login(&a, "gina").await;
    let slow = start_slow(&a, "POST", "/slow-rotate-write", &token).await;
    let revoked = a
        .sessions
        .revoke_all_for_user("gina", None)
        .await
        .expect("revoke all");
    assert_eq!(revoked, 1);
    let slow = finish_slow(&a, slow).await;
    assert_eq!(slow.status(), StatusCode::UNAUTHORIZED, "{backend:?}");
    let set: Vec<&str> = slow
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().expect("ASCII"))
        .collect();
    assert_eq!(set.len(), 1, "{set:?}");
    assert!(
        set[0].starts_with(&format!("{COOKIE_NAME}=; Path=/; Max-Age=0;")),
        "{backend:?}: {set:?}"
    );
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            use super::*;
            $(#[tokio::test] async fn $name() { super::$name(Backend::Embedded).await })*
        }
        mod redis {
            use super::*;
            $(#[tokio::test] async fn $name() { super::$name(Backend::Redis).await })*
        }
    };
}

on_both_backends!(
    refresh_resends_the_cookie,
    refreshing_read_does_not_resend_a_rotated_token,
    write_does_not_resend_a_rotated_token,
    other_devices_keeps_the_rotated_current_session,
    write_after_a_logout_elsewhere_is_refused,
    write_after_the_grace_is_refused_without_clearing_the_cookie,
    rotated_then_revoked_clears_the_cookie,
);
