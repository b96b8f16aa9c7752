//! # statehouse-tower
//!
//! [Statehouse](https://example.invalid/statehouse) sessions as tower middleware, with axum
//! extractors: a [`SessionLayer`] that gives every request a lazy [`Session`] handle, sets the
//! session cookie with secure defaults, and follows an explicit policy when the session store
//! is down. Sessions live in a [`statehouse::SessionStore`]: the embedded store for one
//! process, Redis or Redis Cluster for a fleet.
//!
//! [`RateLimitLayer`] rate-limits HTTP requests with a [`statehouse::RateLimiter`] (see the
//! [`ratelimit`] module): rules per client IP, per header value, global or custom, decided
//! together in one atomic step, `429` with `Retry-After`, the IETF `RateLimit-Policy` and
//! `RateLimit` headers, and leaky-bucket shaping.
//!
//! It also holds [`HttpCacheLayer`], a shared HTTP response cache strict to RFC 9111 over any
//! [`CacheStore`](statehouse::CacheStore) (see the [`cache`] module): GET and HEAD only,
//! `Cache-Control` and `Vary` honoured, `Set-Cookie` responses and `Authorization` requests not
//! stored unless configured, request coalescing, `Cache-Status` (RFC 9211), purge by URI and by
//! tag.
//!
//! ## Example
//!
//! ```no_run
//! use axum::routing::{get, post};
//! use axum::{Json, Router};
//! use statehouse::{EmbeddedSessionStore, SessionConfig, Sessions};
//! use statehouse_tower::{AuthenticatedSession, CookieConfig, Error, Session, SessionLayer};
//!
//! async fn login(session: Session, Json(user): Json<String>) -> Result<&'static str, Error> {
//!     // Check the password first. Then: a new session under a new token (a session this
//!     // browser already had is rotated or revoked: no session fixation).
//!     session.login(&user, &["user"]).await?;
//!     Ok("welcome")
//! }
//!
//! async fn me(auth: AuthenticatedSession) -> Result<String, Error> {
//!     // 401 before we get here when there is no live session.
//!     let visits: u64 = auth.session.get("visits").await?.unwrap_or(0);
//!     // Written at the end of the request, field by field.
//!     auth.session.insert("visits", &(visits + 1)).await?;
//!     Ok(format!("{} ({} visits)", auth.user_id, visits + 1))
//! }
//!
//! async fn logout(session: Session) -> Result<&'static str, Error> {
//!     session.logout().await?; // revoked in the store, and a clearing cookie
//!     Ok("bye")
//! }
//!
//! async fn logout_everywhere(auth: AuthenticatedSession) -> Result<String, Error> {
//!     let n = auth.session.logout_everywhere().await?;
//!     Ok(format!("{n} sessions ended"))
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // A fleet: `RedisSessionStore::builder(RedisTopology::Standalone(url)).connect().await?`.
//!     let store = EmbeddedSessionStore::new(SessionConfig::default());
//!     let sessions = Sessions::new(store);
//!     let app = Router::new()
//!         .route("/login", post(login))
//!         .route("/me", get(me))
//!         .route("/logout", post(logout))
//!         .route("/logout-everywhere", post(logout_everywhere))
//!         .route("/health", get(|| async { "ok" })) // never touches the store
//!         .layer(SessionLayer::new(sessions).cookie(CookieConfig::default()));
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//!     axum::serve(listener, app).await?;
//!     Ok(())
//! }
//! ```
//!
//! A complete app (devices list, Redis with `--redis URL`) is `examples/sessions_app.rs`; its
//! tests drive the same Router.
//!
//! ## How a request goes
//!
//! 1. The layer reads the session cookie from the `Cookie` headers and parses it as a token
//!    (exactly 54 base64url characters). Nothing else: **no store I/O**. A missing, empty,
//!    malformed, oversized or duplicated cookie makes the request anonymous, without asking
//!    the store.
//! 2. The handler gets a [`Session`] handle (an extractor, or from the request's extensions).
//!    The first read loads the session: one store call, which also counts as activity (the
//!    store refreshes the idle timeout, at most every quarter of it). The result is cached for
//!    the rest of the request. A route that never reads the session never calls the store.
//! 3. Data changes are collected and written after the handler, as one field-level update:
//!    concurrent requests changing other fields lose nothing. Login, rotation and logout go to
//!    the store at once.
//! 4. The response gets `Set-Cookie` only when the token or its expiry changed: login,
//!    rotation, logout (a clearing cookie), and, with a persistent cookie only, a request
//!    that moved the expiry (a refreshing read or a write), once the store confirms the token
//!    is still the session's current one, at the end of the request (a concurrent rotation
//!    may have replaced it; handing the old token back would log the browser out once its
//!    grace ends). Only responses reordered on their way to the browser after that check can
//!    still do so.
//!
//! ## Store down
//!
//! Every store call has a deadline (100 ms by default, [`statehouse::SessionsBuilder::deadline`])
//! and goes through a circuit breaker. When the store cannot answer, the policy of the
//! [`Sessions`](statehouse::Sessions) decides ([`statehouse::SessionStoreDown`]):
//!
//! * `Reject503` (**default**): the response is a `503`, even if the handler ignored the error.
//!   A session is authentication; showing a signed-in user anonymous pages, or sending them to
//!   a login form that cannot work either, is worse than an honest, retryable error.
//! * `Anonymous`: the request goes on without a session ([`AuthenticatedSession`] answers 401),
//!   for sites that work for anonymous visitors anyway.
//!
//! Either way a login, or a write of session data, that fails answers 503: a change never looks
//! saved when it was not.
//!
//! ## Security defaults
//!
//! Following the OWASP Session Management Cheat Sheet:
//!
//! | default | why |
//! |---|---|
//! | cookie name `__Host-session` | the `__Host-` prefix makes browsers refuse the cookie unless it is `Secure`, has `Path=/` and no `Domain`, so a sibling subdomain or a plain-HTTP page cannot plant or overwrite it (cookie tossing, session fixation). A generic name does not fingerprint the framework |
//! | `Secure` | the token never travels over plain HTTP |
//! | `HttpOnly` | scripts cannot read it, so an XSS cannot steal the token (it can still act as the user while the page is open) |
//! | `SameSite=Lax` | not sent with cross-site subrequests and form posts (CSRF), still sent when a user follows a link to the site, so links from mail or chat arrive signed in. `Strict` also drops those: stronger, and every link from elsewhere lands signed out; opt in with [`CookieConfig`] |
//! | no `Domain` | the cookie goes to this host only, not to every subdomain |
//! | `Path=/` | one session for the whole site (and required by `__Host-`) |
//! | no `Max-Age` | a session cookie, gone when the browser closes; the server's timeouts are what really end a session |
//! | 256-bit tokens | from the operating system's CSPRNG (OWASP asks for at least 64 bits of entropy); guessing one is hopeless |
//! | hashed at rest | the store keys a session by SHA-256 of its token, so a dump of Redis holds no usable token; logs carry a prefix of that hash, never the token |
//! | rotation on login | [`Session::login`] always issues a new token, so a token planted before login is worthless after it (session fixation). Call [`Session::rotate`] on any other privilege change |
//! | idle 30 min, absolute 12 h | OWASP's 15–30 minutes of idle time for low-risk applications, and an absolute limit so a stolen token does not live forever (OWASP suggests 4–8 h for office use; 12 h covers a long day). Both enforced by the store, on every read. Set them with [`statehouse::SessionConfig`] |
//! | `Cache-Control: no-store` on responses that set the cookie | a shared cache must never store a response carrying someone's session id (OWASP asks for `no-cache="Set-Cookie"`); added only when the response has no `Cache-Control` of its own ([`SessionLayer::no_store_on_set_cookie`]) |
//!
//! | client IP from the connection's peer | a new session records its user agent and IP for device lists; `X-Forwarded-For` is read only when configured ([`ClientIp::ForwardedFor`] with the number of proxies you run), since any client can send one |
//!
//! [`CookieConfig::development`] drops the prefix and `Secure` for plain-HTTP `localhost`.
//! Invalid combinations (a `__Host-` name with a `Domain`, `SameSite=None` without `Secure`,
//! …) are rejected when the [`CookieConfig`] is built, naming the field.
//!
//! ## Features
//!
//! * `axum` (default): [`Session`] and [`AuthenticatedSession`] as extractors, and
//!   `IntoResponse` for [`Error`]. Without it the layer works with any tower stack; handlers
//!   take the [`Session`] from the request's extensions.

pub mod cache;
mod error;
pub mod ratelimit;
pub mod session;

pub use cache::{HttpCache, HttpCacheLayer, HttpCachePurger};
pub use error::Error;
pub use ratelimit::{
    RateLimitLayer, RateLimitRule, RateLimitService, RateLimitStats, RuleKey, RuleStats,
};
#[cfg(feature = "axum")]
pub use session::AuthenticatedSession;
pub use session::{
    ClientIp, CookieConfig, CookieConfigBuilder, ResponseFuture, SameSite, Session, SessionLayer,
    SessionService,
};

/// The workspace README's code blocks, compiled (and run, where not `no_run`) as doc tests here,
/// where every crate they use is available, so the README cannot drift.
#[cfg(all(doctest, feature = "axum"))]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
