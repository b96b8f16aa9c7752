//! The example app (`examples/sessions_app.rs`) end to end, on the embedded store and on a real
//! Redis, through `oneshot` and through a real HTTP client on a real socket: log in and out,
//! log out everywhere, rotation on login with its grace, cookie attributes, Set-Cookie only
//! when the token or its expiry changes, bad cookies, and lazy loading. Time moves on a
//! `ManualClock` injected into the stores; nothing sleeps.

mod common;

use std::time::Duration;

use common::{Backend, Harness, Via};
use http::header::{CACHE_CONTROL, COOKIE};
use http::{Method, StatusCode};
use serde_json::json;
use statehouse::{SessionToken, UserTag};
use statehouse_tower::CookieConfig;

async fn harness(backend: Backend, via: Via) -> Harness {
    Harness::new(backend, via, CookieConfig::default()).await
}

/// Login → me → logout → me is 401, and the old cookie is dead on the server too.
async fn login_me_logout(backend: Backend, via: Via) {
    let h = harness(backend, via).await;
    let mut d = h.device();
    assert_eq!(d.get("/me").await.status, StatusCode::UNAUTHORIZED);

    let res = d.login("alice").await;
    assert_eq!(res.set_cookies().len(), 1);
    let cookie = d.cookie.clone().expect("a session cookie");

    let me = d.get("/me").await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.json()["user_id"], "alice");
    assert_eq!(me.json()["roles"], json!(["user"]));

    let out = d.post("/logout", None).await;
    assert_eq!(out.status, StatusCode::OK);
    assert_eq!(out.json()["revoked"], true);
    let cleared = out.set_cookies();
    assert_eq!(cleared.len(), 1);
    assert!(
        cleared[0].starts_with("__Host-session=; Path=/; Max-Age=0;"),
        "{cleared:?}"
    );
    assert!(d.cookie.is_none());

    assert_eq!(d.get("/me").await.status, StatusCode::UNAUTHORIZED);
    // A client that ignores the clearing cookie gets nothing either: revoked server-side.
    let stale = h
        .send(Method::GET, "/me", &[("cookie", &cookie)], None)
        .await;
    assert_eq!(stale.status, StatusCode::UNAUTHORIZED);
}

/// Two devices of one user; logging out everywhere from one ends both.
async fn logout_everywhere(backend: Backend, via: Via) {
    let h = harness(backend, via).await;
    let mut phone = h.device();
    let mut laptop = h.device();
    phone.login("bob").await;
    laptop.login("bob").await;
    assert_ne!(phone.cookie, laptop.cookie);
    let phone_cookie = phone.cookie.clone().expect("cookie");

    let list = phone.get("/sessions").await;
    assert_eq!(list.status, StatusCode::OK);
    let devices = list.json();
    let devices = devices.as_array().expect("a list");
    assert_eq!(devices.len(), 2);
    assert_eq!(devices.iter().filter(|d| d["current"] == true).count(), 1);
    // The client's IP comes from the connection: known over a real socket, absent through
    // `oneshot` (no connection, and no header is trusted by default).
    for device in devices {
        match via {
            Via::Socket => assert_eq!(device["ip"], "127.0.0.1", "{device}"),
            Via::Oneshot => assert!(device["ip"].is_null(), "{device}"),
        }
    }

    let out = phone.post("/logout-everywhere", None).await;
    assert_eq!(out.status, StatusCode::OK);
    assert_eq!(out.json()["revoked"], 2);
    assert!(phone.cookie.is_none(), "cleared");

    assert_eq!(laptop.get("/me").await.status, StatusCode::UNAUTHORIZED);
    let stale = h
        .send(Method::GET, "/me", &[("cookie", &phone_cookie)], None)
        .await;
    assert_eq!(stale.status, StatusCode::UNAUTHORIZED);
}

/// Logging out the other devices keeps this one; a privilege change rotates the token.
async fn other_devices_and_privilege_change(backend: Backend, via: Via) {
    let h = harness(backend, via).await;
    let mut a = h.device();
    let mut b = h.device();
    let mut c = h.device();
    for d in [&mut a, &mut b, &mut c] {
        d.login("mallory").await;
    }
    let out = a.post("/logout-other-devices", None).await;
    assert_eq!(out.status, StatusCode::OK);
    assert_eq!(out.json()["revoked"], 2);
    assert!(out.set_cookies().is_empty(), "this device keeps its cookie");
    assert_eq!(a.get("/me").await.status, StatusCode::OK);
    assert_eq!(b.get("/me").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(c.get("/me").await.status, StatusCode::UNAUTHORIZED);
    let devices = a.get("/sessions").await.json();
    assert_eq!(devices.as_array().map(Vec::len), Some(1));

    let before = a.cookie.clone();
    let up = a.post("/elevate", None).await;
    assert_eq!(up.status, StatusCode::OK);
    assert_eq!(up.set_cookies().len(), 1);
    assert_ne!(a.cookie, before, "a privilege change rotates the token");
    let me = a.get("/me").await;
    assert_eq!(me.json()["roles"], json!(["user", "admin"]));
}

/// Logging in again rotates the token (anti-fixation) and keeps the data; the old cookie keeps
/// working for the rotation grace (5 s), then stops.
async fn rotation_on_login(backend: Backend, via: Via) {
    let h = harness(backend, via).await;
    let mut d = h.device();
    d.login("carol").await;
    let old = d.cookie.clone().expect("cookie");
    let theme = d
        .send(Method::PUT, "/theme", Some(json!({ "theme": "dark" })))
        .await;
    assert_eq!(theme.status, StatusCode::OK);
    assert!(
        theme.set_cookies().is_empty(),
        "a data write does not re-send the cookie"
    );

    d.login("carol").await;
    let new = d.cookie.clone().expect("cookie");
    assert_ne!(old, new, "login rotates the token");

    let me_old = h.send(Method::GET, "/me", &[("cookie", &old)], None).await;
    assert_eq!(me_old.status, StatusCode::OK, "old token within its grace");
    assert_eq!(me_old.json()["user_id"], "carol");
    let me_new = d.get("/me").await;
    assert_eq!(me_new.status, StatusCode::OK);
    assert_eq!(me_new.json()["theme"], "dark", "rotation keeps the data");

    h.clock.advance(Duration::from_secs(6));
    let me_old = h.send(Method::GET, "/me", &[("cookie", &old)], None).await;
    assert_eq!(
        me_old.status,
        StatusCode::UNAUTHORIZED,
        "old token past its grace"
    );
    assert_eq!(d.get("/me").await.status, StatusCode::OK);

    // Another user logging in on this device replaces the session entirely.
    d.login("dave").await;
    let me = d.get("/me").await;
    assert_eq!(me.json()["user_id"], "dave");
    assert_eq!(me.json()["theme"], json!(null));
    let carol = h.send(Method::GET, "/me", &[("cookie", &new)], None).await;
    assert_eq!(
        carol.status,
        StatusCode::UNAUTHORIZED,
        "the previous user's session is revoked"
    );
}

/// Every default attribute; `Cache-Control: no-store` with Set-Cookie; no Set-Cookie on reads,
/// nor on a refresh of a session cookie (no Max-Age to follow).
async fn cookie_defaults_and_plain_reads(backend: Backend, via: Via) {
    let h = harness(backend, via).await;
    let mut d = h.device();
    let res = d.login("erin").await;
    let set = res.set_cookies();
    assert_eq!(set.len(), 1);
    let (pair, attributes) = set[0].split_once("; ").expect("attributes");
    let (name, value) = pair.split_once('=').expect("name=value");
    assert_eq!(name, "__Host-session");
    assert_eq!(value.len(), 54);
    SessionToken::parse(value).expect("a token");
    assert_eq!(attributes, "Path=/; Secure; HttpOnly; SameSite=Lax");
    assert_eq!(
        res.headers.get(CACHE_CONTROL).expect("cache-control"),
        "no-store"
    );

    for path in ["/me", "/sessions", "/health", "/me"] {
        let res = d.get(path).await;
        assert_eq!(res.status, StatusCode::OK, "{path}");
        assert!(res.set_cookies().is_empty(), "{path} must not set a cookie");
        assert!(res.headers.get(CACHE_CONTROL).is_none(), "{path}");
    }
    // Past the refresh threshold (a quarter of the 30 min idle timeout) the store writes a
    // refresh, but a session cookie has no expiry to move.
    h.clock.advance(Duration::from_secs(8 * 60));
    let res = d.get("/me").await;
    assert_eq!(res.status, StatusCode::OK);
    assert!(res.set_cookies().is_empty());
}

/// Missing, empty, malformed, oversized, non-base64, quoted, duplicated cookies: no session
/// (401 where required), no panic, and no store I/O. A well-formed unknown token: 401 after one
/// load. A cookie split over two headers (as HTTP/2 may send it) still works.
async fn bad_input(backend: Backend, via: Via) {
    let h = harness(backend, via).await;
    let mut d = h.device();
    d.login("frank").await;
    let good = d.cookie.clone().expect("cookie");
    let other = SessionToken::generate(UserTag::for_user("frank")).expect("token");

    let oversized = format!("__Host-session={}", "A".repeat(8 * 1024));
    let huge_header = format!("x={}; {good}", "y".repeat(16 * 1024));
    let non_base64 = format!("__Host-session={}", "!".repeat(54));
    let percent = format!("__Host-session={}", "%".repeat(54));
    let quoted = format!("__Host-session=\"{}\"", &good["__Host-session=".len()..]);
    let truncated = good[..good.len() - 1].to_owned();
    let other_cookie = format!("__Host-session={}", other.encode());
    let two_sessions = format!("{good}; {other_cookie}");
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec![""],
        vec!["__Host-session="],
        vec!["__Host-session"],
        vec!["__Host-session=abc"],
        vec![&oversized],
        vec![&non_base64],
        vec![&percent],
        vec![&quoted],
        vec![&truncated],
        vec![&two_sessions],
        vec![&good, &other_cookie],
        vec![";;;==; =;"],
    ];
    let before = h.calls();
    for case in &cases {
        let headers: Vec<(&str, &str)> = case.iter().map(|c| (COOKIE.as_str(), *c)).collect();
        let res = h.send(Method::GET, "/me", &headers, None).await;
        assert_eq!(res.status, StatusCode::UNAUTHORIZED, "{:.80?}", case);
        assert!(res.set_cookies().is_empty());
        let res = h.send(Method::GET, "/health", &headers, None).await;
        assert_eq!(res.status, StatusCode::OK);
    }
    assert_eq!(h.calls(), before, "no store I/O for malformed cookies");

    // Well-formed but unknown: one load, then 401.
    let res = h
        .send(Method::GET, "/me", &[("cookie", &other_cookie)], None)
        .await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert_eq!(h.calls(), before + 1);

    // The session cookie among other cookies, in one header or split over two, or sent twice
    // with the same value: fine. A large Cookie header is no problem either.
    for case in [
        vec![format!("a=1; {good}; b=2")],
        vec!["a=1".to_owned(), good.clone()],
        vec![good.clone(), good.clone()],
        vec![huge_header.clone()],
    ] {
        let headers: Vec<(&str, &str)> =
            case.iter().map(|c| (COOKIE.as_str(), c.as_str())).collect();
        let res = h.send(Method::GET, "/me", &headers, None).await;
        assert_eq!(res.status, StatusCode::OK, "{:.80?}", case);
    }
}

/// The layer does no store I/O; a route that never reads the session costs nothing, and one
/// that does loads once however often the handler reads.
async fn lazy_loading(backend: Backend, via: Via) {
    let h = harness(backend, via).await;
    let mut d = h.device();
    d.login("grace").await;
    let before = h.calls();
    for _ in 0..3 {
        assert_eq!(d.get("/health").await.status, StatusCode::OK);
    }
    assert_eq!(
        h.calls(),
        before,
        "no store call on a route that does not use the session"
    );
    let loads = h.loads();
    // `/me` reads the user (extractor), the roles and a data field: one load.
    assert_eq!(d.get("/me").await.status, StatusCode::OK);
    assert_eq!(h.loads(), loads + 1);
    assert_eq!(h.calls(), before + 1);
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        mod embedded_oneshot {
            use super::*;
            $(#[tokio::test] async fn $name() { super::$name(Backend::Embedded, Via::Oneshot).await })*
        }
        mod embedded_socket {
            use super::*;
            $(#[tokio::test] async fn $name() { super::$name(Backend::Embedded, Via::Socket).await })*
        }
        mod redis_oneshot {
            use super::*;
            $(#[tokio::test] async fn $name() { super::$name(Backend::Redis, Via::Oneshot).await })*
        }
        mod redis_socket {
            use super::*;
            $(#[tokio::test] async fn $name() { super::$name(Backend::Redis, Via::Socket).await })*
        }
    };
}

scenarios!(
    login_me_logout,
    logout_everywhere,
    other_devices_and_privilege_change,
    rotation_on_login,
    cookie_defaults_and_plain_reads,
    bad_input,
    lazy_loading,
);

/// With a persistent cookie, a read that refreshed the session re-sends the cookie (same token,
/// the Max-Age counting again); a read that did not, does not.
#[tokio::test]
async fn persistent_cookie_is_resent_only_when_the_session_is_refreshed() {
    for backend in [Backend::Embedded, Backend::Redis] {
        let cookie = CookieConfig::builder()
            .max_age(Some(Duration::from_secs(12 * 3600)))
            .build()
            .expect("config");
        let h = Harness::new(backend, Via::Oneshot, cookie).await;
        let mut d = h.device();
        let login = d.login("heidi").await;
        assert!(login.set_cookies()[0].contains("; Max-Age=43200; Secure"));
        let token = d.cookie.clone().expect("cookie");

        h.clock.advance(Duration::from_secs(60));
        assert!(
            d.get("/me").await.set_cookies().is_empty(),
            "not due for a refresh"
        );

        h.clock.advance(Duration::from_secs(8 * 60));
        let res = d.get("/me").await;
        let set = res.set_cookies();
        assert_eq!(
            set.len(),
            1,
            "{backend:?}: refreshed, so the cookie follows"
        );
        assert!(set[0].starts_with(&format!("{token}; Path=/; Max-Age=43200;")));
        assert_eq!(d.cookie.as_deref(), Some(token.as_str()), "same token");

        assert!(d.get("/me").await.set_cookies().is_empty());
    }
}

/// `CookieConfig::development()` for plain-HTTP localhost.
#[tokio::test]
async fn development_cookie() {
    let h = Harness::new(Backend::Embedded, Via::Socket, CookieConfig::development()).await;
    let mut d = h.device();
    let set = d.login("ivan").await.set_cookies();
    let (pair, attributes) = set[0].split_once("; ").expect("attributes");
    assert!(pair.starts_with("session="));
    assert_eq!(attributes, "Path=/; HttpOnly; SameSite=Lax");
    assert_eq!(d.get("/me").await.status, StatusCode::OK);
}

/// An expired session is a 401 like any other missing one (idle timeout: 30 min).
#[tokio::test]
async fn idle_session_expires() {
    for backend in [Backend::Embedded, Backend::Redis] {
        let h = Harness::new(backend, Via::Oneshot, CookieConfig::default()).await;
        let mut d = h.device();
        d.login("judy").await;
        h.clock.advance(Duration::from_secs(29 * 60));
        assert_eq!(d.get("/me").await.status, StatusCode::OK);
        h.clock.advance(Duration::from_secs(31 * 60));
        assert_eq!(
            d.get("/me").await.status,
            StatusCode::UNAUTHORIZED,
            "{backend:?}"
        );
    }
}

/// Regression: a `User-Agent` with a tab (which `HeaderValue::to_str` accepts) made the new
/// session fail validation, so the login answered 400. Control characters are now dropped.
#[tokio::test]
async fn user_agent_with_control_characters_is_cleaned() {
    let h = Harness::new(Backend::Embedded, Via::Oneshot, CookieConfig::default()).await;
    let login = h
        .send(
            Method::POST,
            "/login",
            &[("user-agent", "Mozilla/5.0\t(X11)")],
            Some(json!({ "user_id": "kim" })),
        )
        .await;
    assert_eq!(login.status, StatusCode::OK);
    let set = login.set_cookies();
    let cookie = set[0].split(';').next().expect("pair");
    let list = h
        .send(Method::GET, "/sessions", &[("cookie", cookie)], None)
        .await;
    assert_eq!(list.json()[0]["user_agent"], "Mozilla/5.0(X11)");
}

/// Regression: with a persistent cookie whose Max-Age is the idle timeout, a user whose every
/// request writes to the session (each write slides the store's expiry, so no read was ever due
/// for a refresh) never got the cookie again: the browser dropped it at Max-Age after login
/// while the session was live. A write that slides the expiry now re-sends the cookie, so the
/// browser's copy never expires before the server's session of an active user.
#[tokio::test]
async fn persistent_cookie_follows_expiry_slid_by_writes() {
    for backend in [Backend::Embedded, Backend::Redis] {
        let max_age = Duration::from_secs(30 * 60);
        let cookie = CookieConfig::builder()
            .max_age(Some(max_age))
            .build()
            .expect("config");
        let h = Harness::new(backend, Via::Oneshot, cookie).await;
        let mut d = h.device();
        d.login("olga").await;
        let token = d.cookie.clone().expect("cookie");
        // When the browser's copy of the cookie expires: Max-Age after it was last set.
        let mut browser_expiry = max_age;
        let mut elapsed = Duration::ZERO;
        for step in 0..24 {
            h.clock.advance(Duration::from_secs(5 * 60));
            elapsed += Duration::from_secs(5 * 60);
            assert!(
                elapsed < browser_expiry,
                "{backend:?}: the browser dropped the cookie of an active user at step {step}"
            );
            let res = d
                .send(
                    Method::PUT,
                    "/theme",
                    Some(json!({ "theme": format!("t{step}") })),
                )
                .await;
            assert_eq!(res.status, StatusCode::OK, "{backend:?} step {step}");
            let set = res.set_cookies();
            if let Some(set) = set.first() {
                assert!(
                    set.starts_with(&format!("{token}; Path=/; Max-Age=1800;")),
                    "{set}"
                );
                browser_expiry = elapsed + max_age;
            }
        }
        assert_eq!(d.cookie.as_deref(), Some(token.as_str()), "same token");
    }
}
