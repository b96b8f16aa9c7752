//! # statehouse-redis
//!
//! The [Statehouse](https://example.invalid/statehouse) rate-limit store on Redis and Redis
//! Cluster: a [`RateLimitStore`](statehouse_core::RateLimitStore) that makes exactly the
//! decisions of [`statehouse_core::algorithm::decide`], shared by every replica of a fleet.
//!
//! * **One atomic step per request.** A request's limits are decided by one Lua script
//!   (`EVALSHA`, loaded on `NOSCRIPT`) that reads every state, decides every limit, and writes
//!   only if all admit: a denied request consumes nothing, and no read-then-write ever crosses a
//!   round trip.
//! * **One clock.** By default the script reads Redis `TIME`, so replicas with skewed clocks
//!   still agree; [`TimeSource::Caller`] passes the caller's clock instead (tests, managed Redis
//!   that refuses `TIME`).
//! * **No key without a TTL.** Every write sets an expiry at the moment the state stops
//!   mattering (plus [`RedisStoreBuilder::skew_allowance`]).
//! * **Redis Cluster.** Storage keys are hash-tagged by the caller's key
//!   (`sh:rl:{user:1}:gcra:60000000`), so all limits on one key share a slot. Batches across
//!   slots are consumed in order and refunded on denial; see [`RedisStore`]. While a slot
//!   moves between nodes, calls refused with `TRYAGAIN`, `MOVED` or `ASK` (nothing ran) are
//!   tried again within their deadline, so resharding costs latency, not errors; a coalesced
//!   batch of single checks (or of cache reads, or of session loads) refused with `TRYAGAIN`
//!   is split by key (by user) at once instead.
//! * **Outages are errors, quickly.** Every call has a deadline ([`RedisStoreBuilder::call_timeout`]);
//!   connection failures and timeouts return errors for which
//!   [`Error::is_unavailable`](statehouse_core::Error::is_unavailable) is true, so the caller's
//!   degraded mode can take over, and the connection is re-established in the background. On
//!   standalone Redis a server that closes its connections (a restart, a failover behind the
//!   same address) is noticed while idle, so the first calls after it comes back succeed.
//! * **Coalescing.** Concurrent single checks, cache hits and session loads are coalesced into
//!   one call per batch (a script, or an `MGET`), several batches on the wire at once. On
//!   standalone Redis these calls use a second, lean pipelined connection of the store (a
//!   hand-written RESP2 parser; the URL's password and database); everything else uses the
//!   redis-rs connection. A store therefore holds two connections to a standalone server.
//! * **TLS.** `rediss://` URLs (the default `tls` feature: redis-rs over rustls), with the
//!   server's certificate always verified against the system's roots or the CAs given to
//!   [`RedisStoreBuilder::tls_root_certificates`], and mutual TLS through
//!   [`RedisStoreBuilder::tls_client_certificate`]. Every connection of a store uses them
//!   (commands, the batch connection, the Pub/Sub listener, every Cluster node).
//!
//! * **Sessions.** [`RedisSessionStore`] is the
//!   [`SessionStore`](statehouse_core::session::SessionStore) on the same deployments: one
//!   round trip per operation (a Lua script; most loads are a plain `GET` of the session's
//!   compact record, coalesced into `MGET`s), every key of a user in one Cluster slot, a TTL on
//!   every key, only SHA-256 ids at rest. Build it on its own
//!   ([`RedisSessionStore::builder`]) or on a rate-limit store's connection
//!   ([`RedisStore::session_store`]).
//!
//! * **Caching.** [`RedisCacheStore`] is the shared cache tier
//!   ([`CacheStore`](statehouse_core::cache::CacheStore)) on the same connection
//!   ([`RedisStore::cache_store`]): coalesced `GET`s on the hit path, one Lua script per write
//!   that also publishes the invalidation, `SCAN`+`UNLINK` purges on every master, and an
//!   invalidation listener that reports every loss of its channel.
//!
//! ```no_run
//! use std::time::Duration;
//! use statehouse_core::{LimitCheck, Mode, Policy, RateLimitStore};
//! use statehouse_redis::{RedisStore, RedisTopology};
//!
//! # async fn example() -> Result<(), statehouse_core::Error> {
//! let store = RedisStore::builder(RedisTopology::Standalone("redis://127.0.0.1:6379".into()))
//!     .prefix("api:rl:")
//!     .call_timeout(Duration::from_millis(200))
//!     .connect()
//!     .await?;
//!
//! // 100 requests per minute per user, and 1000 per minute for the whole tenant: both or neither.
//! let per_user = Policy::gcra(100, Duration::from_secs(60))?;
//! let per_tenant = Policy::sliding_counter(1000, Duration::from_secs(60))?;
//! let verdict = store
//!     .check(
//!         &[
//!             LimitCheck::new("user:42", &per_user, 1),
//!             LimitCheck::new("tenant:7", &per_tenant, 1),
//!         ],
//!         Mode::Consume,
//!     )
//!     .await?;
//! if let Some(decision) = verdict.most_restrictive() {
//!     println!("allowed: {}, remaining: {}", decision.allowed, decision.remaining);
//! }
//! # Ok(())
//! # }
//! ```

mod batch;
mod builder;
mod cache;
mod cache_get;
mod cache_nodes;
mod cache_script;
mod cache_subscribe;
mod cluster_topology;
mod coalesce;
mod connection;
mod error;
mod hash_slot;
mod limiter_script;
mod link;
mod pipe;
mod session;
mod session_batch;
mod session_record;
mod session_script;
mod store;

pub use builder::{
    DEFAULT_CALL_TIMEOUT, DEFAULT_CALLER_SKEW_ALLOWANCE, DEFAULT_PREFIX, RedisStoreBuilder,
    RedisTopology, TimeSource,
};
pub use cache::RedisCacheStore;
pub use hash_slot::{SLOT_COUNT, hash_slot};
pub use session::{
    DEFAULT_SESSION_PREFIX, RedisSessionStore, RedisSessionStoreBuilder,
    SERVER_TIME_FAST_PATH_MARGIN,
};
pub use store::{CLUSTER_FAILURE_DOMAINS, RedisStore};
