//! # Statehouse
//!
//! Fleet-wide rate limiting: every replica of a service asks one shared store (Redis, Redis
//! Cluster) or an in-process one whether a request may go on, and the fleet as a whole admits
//! exactly what the policy says. Six algorithms (GCRA, the recommended default, token and leaky
//! bucket, fixed window, sliding log and sliding counter) run as one pure function in
//! `statehouse-core`; the embedded store applies it under a lock, the Redis store in one Lua
//! script with Redis's own clock, so replicas with skewed clocks agree.
//!
//! This crate is the one applications depend on. It re-exports the core types and both stores,
//! and adds [`RateLimiter`]: the store behind a per-call deadline, a circuit breaker and an
//! explicit [`DegradedPolicy`] for when the store is down, with counters ([`LimiterStats`]) and
//! `tracing` events.
//!
//! ## Quick start
//!
//! ```
//! use std::time::Duration;
//! use statehouse::{EmbeddedStore, Policy, RateLimiter};
//!
//! #[tokio::main(flavor = "current_thread")]
//! async fn main() -> Result<(), statehouse::Error> {
//!     // One process: the embedded store. A fleet: `RedisStore::connect(url).await?` instead.
//!     let limiter = RateLimiter::builder(EmbeddedStore::new()).build()?;
//!
//!     // 100 requests per minute per user, smoothed (one every 600 ms), bursts of up to 10.
//!     let policy = Policy::gcra(100, Duration::from_secs(60))?.with_burst(10)?;
//!
//!     for _ in 0..10 {
//!         assert!(limiter.check("user:42", &policy).await?.allowed);
//!     }
//!     let denied = limiter.check("user:42", &policy).await?;
//!     assert!(!denied.allowed);
//!     // What to put in `Retry-After`: at most 600 ms, when the next one is due.
//!     assert!(denied.retry_after.is_some_and(|t| t <= Duration::from_millis(600)));
//!     // Another key has its own allowance.
//!     assert!(limiter.check("user:43", &policy).await?.allowed);
//!     Ok(())
//! }
//! ```
//!
//! With Redis, every replica builds its limiter on its own connection to the same server and
//! they share the limit (see `examples/fleet.rs`):
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), statehouse::Error> {
//! use statehouse::{RateLimiter, RedisStore};
//! let limiter = RateLimiter::new(RedisStore::connect("redis://127.0.0.1:6379").await?);
//! # let _ = limiter;
//! # Ok(())
//! # }
//! ```
//!
//! ## Degraded mode
//!
//! A rate limiter that waits seconds for a dead Redis takes the service down with it
//! (envoyproxy/ratelimit #462), and one that fails open silently hides that it stopped limiting
//! (spring-cloud-gateway #248). So every [`RateLimiter`] call to the store has a hard
//! [deadline](RateLimiterBuilder::deadline) (50 ms by default), a [circuit
//! breaker](CircuitBreakerConfig) stops calling a store that keeps failing, and what happens
//! then is an explicit [`DegradedPolicy`], marked on every decision
//! ([`Decision::degraded`]) and counted ([`LimiterStats::degraded_decisions`]).
//!
//! The degraded policy applies when the store is unreachable or past the deadline
//! ([`Error::is_unavailable`]) or the breaker is open:
//!
//! | [`DegradedPolicy`] | decision while degraded | `degraded` | suits |
//! |---|---|---|---|
//! | `FailOpen` (**default**) | admitted; `remaining == limit`, no `retry_after` | `true` | protecting a service from overload, where an outage of the limiter must not become an outage of the service |
//! | `FailClosed` | denied; `retry_after` = the breaker's `open_for` | `true` | limits that guard against abuse or cost: login attempts, SMS or e-mail sending, paid quotas |
//! | `LocalFallback { replicas }` | decided by an in-process store, same algorithm, limit and burst divided by `replicas` (a limit below `replicas`: one per a longer period, so the fleet never exceeds the rate) | `true` | keeping a limit close to right through an outage, when the replica count is known |
//! | `ReturnError` | no decision: the error (`Timeout`, `Unavailable`) is returned | — | callers with their own fallback |
//!
//! Whatever the policy:
//!
//! * **Invalid input** ([`Error::is_invalid_input`]: an empty key, a zero cost, a cost above
//!   the policy's capacity) is returned as an error. It is checked before the store is called,
//!   never degraded, and never counts as a store failure.
//! * **A store error that is not an outage** ([`Error::Backend`]: a script error, a corrupt
//!   value) is returned as an error and counted in [`LimiterStats::backend_errors`]. It is not
//!   degraded, since fail-open would hide the bug, and it does not trip the breaker, since the
//!   store is up and answering.
//! * **[`reset`](RateLimiter::reset)** is never degraded: it returns the store's error.
//! * **The local fallback's counts stay local**: they are not copied back to the store when it
//!   returns (as in rate-limiter-flexible), so right after a recovery a key may be admitted up
//!   to its full limit again, on top of what the fallback admitted.
//!
//! **Why fail-open by default.** A rate limiter mostly protects a service from more traffic
//! than it can take; denying everyone while Redis is away is an outage caused by the protection
//! itself (istio #12115 answered 429 to every request while Redis was down). The systems
//! surveyed for Statehouse mostly fail open by default: Envoy's `failure_mode_deny` is false,
//! Kong's `fault_tolerant` is true, Upstash answers `success: true` on a timeout. Statehouse
//! does the same, but never silently: degraded decisions are flagged, counted, and the breaker
//! opening is logged. Pick `FailClosed` or `LocalFallback` per limiter where letting traffic
//! through is the greater risk; limiters are cheap, and several can share one store.
//!
//! ### The circuit breaker
//!
//! * **Closed**: calls go to the store. [`failure_threshold`](CircuitBreakerConfig) consecutive
//!   failures (3 by default; unavailable or past the deadline) open it.
//! * **Open**: calls skip the store, so a dead Redis costs microseconds per decision instead of
//!   a deadline, and follow the degraded policy.
//! * **Half-open**: after [`open_for`](CircuitBreakerConfig) (1 s by default, measured on the
//!   limiter's [`Clock`]) exactly one caller probes the store while the others keep degrading.
//!   Success closes the breaker, so recovery is automatic when the store returns; failure opens
//!   it for another `open_for`.
//!
//! The breaker is lock-free (a few atomics) and a cancelled probe hands its turn back.
//!
//! A store made of parts that fail apart names its **failure domains**
//! ([`RateLimitStore::failure_domains`]): on Redis Cluster, 16 groups of 1 024 hash slots
//! (`statehouse_redis::CLUSTER_FAILURE_DOMAINS`). The limiter keeps
//! one breaker per domain (at most [`MAX_BREAKERS`]), chosen by a call's first check, so a dead
//! master opens the breakers of its slots only: its keys cost microseconds, and keys on the
//! live masters are still decided by the store. With one breaker for the whole cluster, the
//! live masters' successes kept resetting the run of failures, so the breaker never opened and
//! every check of a dead master's key waited out the deadline.
//!
//! ## Several limits on one request
//!
//! [`RateLimiter::check_all`] checks several limits at once (per second and per day, per user
//! and per tenant), all or nothing: a request denied by one limit consumes none of the others.
//! The embedded store and a standalone Redis decide the whole set in one atomic step.
//!
//! On a **Redis Cluster**, a script can only touch keys of one hash slot. The Redis store puts
//! every policy of one caller key in one slot (the key is the hash tag), so limits on the same
//! key are still decided atomically. Checks on different keys may live in different slots:
//! the Redis store then **consumes in order, slot by slot, and refunds on denial**, giving back
//! what the earlier slots consumed if a later one denies. The outcome is still all or nothing
//! and never admits more than a limit allows, but it is not atomic: for a moment a concurrent
//! request may see the earlier limits charged, and be denied where it would have been admitted.
//!
//! ## Observability
//!
//! [`RateLimiter::stats`] returns a [`LimiterStats`]: plain `u64` counters read from atomics
//! (decisions, allowed, denied, degraded decisions, store failures, timeouts, breaker
//! openings) and the breaker's state. The library depends on no metrics crate; the Statehouse
//! gateway exports these counters to Prometheus. Events go through `tracing`: a `warn` when
//! the breaker opens, an `info` when it closes, `debug` for probes.
//!
//! ## Sessions
//!
//! [`Sessions`] is the session counterpart of [`RateLimiter`]: a [`SessionStore`]
//! ([`EmbeddedSessionStore`], [`RedisSessionStore`]) behind a per-call deadline and a circuit
//! breaker, with a [`SessionCodec`] for typed data (JSON by default), [`SessionEvent`]s for
//! [`SessionHooks`] and `tracing`, and a [`SessionStoreDown`] policy (503 by default) that the
//! HTTP layer in `statehouse-tower` follows. Tokens are 256-bit, hashed at rest, rotated on
//! login; sessions expire after 30 minutes idle or 12 hours in all ([`SessionConfig`]).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), statehouse::Error> {
//! use statehouse::{
//!     EmbeddedSessionStore, NewSession, SessionChanges, SessionConfig, Sessions, Updated,
//! };
//!
//! let sessions = Sessions::new(EmbeddedSessionStore::new(SessionConfig::default()));
//! let (token, _) = sessions.create(&NewSession::for_user("alice")).await?;
//! let mut changes = SessionChanges::default();
//! changes.set.insert("theme".into(), sessions.encode("dark")?);
//! assert_eq!(sessions.update(&token, &changes).await?, Updated::Written);
//! let record = sessions.load(&token).await?.expect("live").record;
//! let theme: String = sessions.decode(&record.data["theme"])?;
//! assert_eq!(theme, "dark");
//! # Ok(())
//! # }
//! ```
//!
//! ## Caching
//!
//! [`Cache`] is a typed cache of one key class over a [`CacheStore`] ([`EmbeddedCacheStore`],
//! [`RedisCacheStore`] from [`RedisStore::cache_store`]): a near cache per replica kept
//! honest by the store's invalidation channel, single flight in the process and a lease
//! across replicas (a cold key is loaded once by the whole fleet), and a [`CachePolicy`] with
//! TTL jitter, negative caching, stale-while-revalidate, stale-if-error and XFetch early
//! refresh. Its [module](cache) states the consistency guarantees and the races it closes.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use statehouse::{Cache, CachePolicy, EmbeddedCacheStore};
//!
//! let policy = CachePolicy::builder(Duration::from_secs(60))
//!     .stale_while_revalidate(Duration::from_secs(30))
//!     .negative_ttl(Duration::from_secs(5))
//!     .build()?;
//! let products = Cache::<String>::builder(Arc::new(EmbeddedCacheStore::new()), "products")
//!     .policy(policy)
//!     .build()
//!     .await?;
//! let name = products
//!     .get_or_load("7", || async { Ok::<_, std::io::Error>(Some("Lamp".to_string())) })
//!     .await?;
//! assert_eq!(name.as_deref().map(String::as_str), Some("Lamp"));
//! # Ok(())
//! # }
//! ```
//!
//! ## Features
//!
//! * `embedded` (default): [`EmbeddedStore`], [`EmbeddedSessionStore`],
//!   [`EmbeddedCacheStore`] and [`DegradedPolicy::LocalFallback`].
//! * `redis` (default): [`RedisStore`], [`RedisSessionStore`], [`RedisCacheStore`],
//!   [`RedisTopology`], [`TimeSource`]; with TLS for `rediss://` URLs
//!   ([`RedisStoreBuilder::tls_root_certificates`](statehouse_redis::RedisStoreBuilder::tls_root_certificates),
//!   statehouse-redis's default `tls` feature).
//!
//! Without either, [`RateLimiter`] works over any [`RateLimitStore`] implementation, and
//! [`Cache`] over any [`CacheStore`].

mod breaker;
pub mod cache;
mod degraded;
mod limiter;
mod session;
mod stats;

pub use breaker::{BreakerState, CircuitBreakerConfig, MAX_BREAKERS, StoreBreakers};
pub use cache::{
    Cache, CacheBuilder, CacheCodec, CacheError, CacheStats, DEFAULT_CACHE_DEADLINE,
    DEFAULT_COMPRESS_ABOVE, Fetched, Loaded, Lookup, MsgPackCodec, NearCacheConfig, RawCodec,
    SetOptions, Source, Tier,
};
pub use degraded::DegradedPolicy;
pub use limiter::{DEFAULT_DEADLINE, RateLimiter, RateLimiterBuilder};
pub use session::{
    DEFAULT_SESSION_DEADLINE, JsonCodec, SessionCodec, SessionStoreDown, Sessions, SessionsBuilder,
};
pub use stats::LimiterStats;

#[doc(no_inline)]
pub use statehouse_core::session::{
    Created, LoadedSession, NewSession, Revoked, Rotated, SessionChanges, SessionConfig,
    SessionConfigBuilder, SessionEvent, SessionHooks, SessionId, SessionInfo, SessionRecord,
    SessionStore, SessionToken, Updated, UserTag,
};

#[doc(no_inline)]
pub use statehouse_core::cache::{
    CachePolicy, CachePolicyBuilder, CacheStore, Freshness, Invalidation, InvalidationSink,
    InvalidationSubscription, LeaseOutcome, LeaseToken,
};

#[doc(no_inline)]
pub use statehouse_core::{
    Algorithm, BoxError, Clock, Decision, Error, LimitCheck, ManualClock, Mode, Policy,
    RateLimitStore, Result, SystemClock, Timestamp, Verdict,
};

/// The core crate, for what is not re-exported above: the pure
/// [`algorithm`](statehouse_core::algorithm) functions, [`key`](statehouse_core::key)
/// encoding, and the helpers a custom [`RateLimitStore`] uses.
pub use statehouse_core;

#[cfg(feature = "embedded")]
#[doc(no_inline)]
pub use statehouse_embedded::{
    EmbeddedCacheStore, EmbeddedCacheStoreBuilder, EmbeddedSessionStore, EmbeddedStore,
};

#[cfg(feature = "redis")]
#[doc(no_inline)]
pub use statehouse_redis::{
    RedisCacheStore, RedisSessionStore, RedisStore, RedisTopology, TimeSource,
};
