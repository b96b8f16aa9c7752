//! HTTP rate limiting as tower middleware: [`RateLimitLayer`] checks every request against one
//! or more [`RateLimitRule`]s in one atomic step of a [`statehouse::RateLimiter`] (so a request
//! denied by one rule consumes from none), answers `429 Too Many Requests` with `Retry-After`
//! when any denies, delays a request a leaky-bucket rule shapes, and reports the quotas in the
//! IETF `RateLimit-Policy` and `RateLimit` headers.
//!
//! Over a [`RedisStore`](statehouse::RedisStore) the limits are exact across every replica of
//! the service; over an [`EmbeddedStore`](statehouse::EmbeddedStore), per process.
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use std::time::Duration;
//!
//! use axum::Router;
//! use axum::routing::get;
//! use statehouse::{Policy, RateLimiter, RedisStore};
//! use statehouse_tower::{ClientIp, RateLimitLayer, RateLimitRule, RuleKey};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let limiter = RateLimiter::new(RedisStore::connect("redis://127.0.0.1:6379").await?);
//! let layer = RateLimitLayer::new(limiter)
//!     // 100 requests a minute per client address (behind one load balancer)...
//!     .rule(RateLimitRule::new(
//!         "per-ip",
//!         Policy::gcra(100, Duration::from_secs(60))?,
//!         RuleKey::ClientIp(ClientIp::ForwardedFor { trusted_proxies: 1 }),
//!     )?)?
//!     // ...and 10 000 an hour per API key, for requests that carry one.
//!     .rule(RateLimitRule::new(
//!         "per-key",
//!         Policy::gcra(10_000, Duration::from_secs(3600))?,
//!         RuleKey::Header(http::HeaderName::from_static("x-api-key")),
//!     )?)?;
//! let app = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(layer);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! ## What a response carries
//!
//! * Admitted: the inner service's response, plus (unless [`RateLimitLayer::headers`] is
//!   off) `RateLimit-Policy: "per-ip";q=100;w=60` (each applicable rule's quota `q` per window
//!   of `w` seconds) and `RateLimit: "per-ip";r=42;t=17` (`r` units remaining, `t` seconds
//!   until the quota is whole again), as in draft-ietf-httpapi-ratelimit-headers. A decision
//!   the store did not make (it was down and the limiter's degraded policy answered) is left
//!   out of `RateLimit`: its figures would be guesses.
//! * Denied: `429 Too Many Requests`, `Retry-After` in whole seconds (rounded up, at least 1),
//!   the same two headers, and an `application/problem+json` body of the draft's
//!   `quota-exceeded` type naming the rules that denied (`violated-policies`). The inner
//!   service is not called.
//! * Leaky bucket ([`Policy::leaky_bucket`](statehouse::Policy::leaky_bucket)): an admitted
//!   request that must wait is held for its [`delay`](statehouse::Decision::delay) before the
//!   inner service is called, so requests leave at the policy's rate (nginx's `limit_req`
//!   with `delay`); one that would wait longer than the policy's `max_delay` is denied.
//! * The store unreachable: the limiter's [`DegradedPolicy`](statehouse::DegradedPolicy)
//!   decides (fail open, fail closed, a local limiter), within its deadline; under
//!   `ReturnError` the response is `503 Service Unavailable` with `Retry-After: 1`.
//!
//! ## Rolling a limit out
//!
//! A rule in [shadow mode](RateLimitRule::shadow) decides and counts as it would but never
//! denies: the requests it would have denied go on, and are counted
//! ([`RateLimitLayer::stats`]) and logged with the rule's name, so a limit can be
//! watched against real traffic before it is enforced (Envoy's `shadow_mode`, nginx's
//! `limit_req_dry_run`).
//!
//! ## Counts
//!
//! [`RateLimitLayer::stats`] reports, per rule, the requests it was checked for, denied (or in
//! shadow mode would have denied) and decided degraded, and the requests answered `503`/`500`
//! because the limiter failed; the [`RateLimiter`](statehouse::RateLimiter)'s own
//! [`stats`](statehouse::RateLimiter::stats) count its decisions and circuit breaker.
//!
//! ## One layer or several
//!
//! The rules of one layer are decided together, all or nothing. Layers are decided one after
//! the other, outermost first: a request the outer layer admits is counted there even if an
//! inner layer (a stricter limit on one route) then denies it. Put rules that must be
//! all-or-nothing in one layer, and give every rule its own name: two rules of one name and key
//! share one count.
//!
//! ## Keys
//!
//! Each rule counts per key ([`RuleKey`]): the client address (the connection's peer by
//! default, a proxy header only when configured, since any client can send one), a header's
//! value (stored as its SHA-256, so API keys never reach Redis in the clear), one key for all
//! requests, or a function of the request. A request for which a rule has no key (no such
//! header) is not counted by that rule; an address that cannot be read counts under one shared
//! `unknown` key, so a malformed header cannot be used to escape the limit.

mod layer;
mod service;

pub use layer::{RateLimitLayer, RateLimitRule, RateLimitStats, RuleKey, RuleStats};
pub use service::RateLimitService;
