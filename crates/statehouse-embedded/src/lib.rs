//! # statehouse-embedded
//!
//! [`EmbeddedStore`], Statehouse's in-process [`RateLimitStore`](statehouse_core::RateLimitStore):
//! for a single process, for tests, and as the local fallback when Redis is away. It makes
//! exactly the decisions of [`algorithm::decide`](statehouse_core::algorithm::decide), which it
//! calls, so it agrees with the Redis store check for check.
//!
//! ```
//! use std::time::Duration;
//! use futures::executor::block_on;
//! use statehouse_core::{LimitCheck, ManualClock, Mode, Policy, RateLimitStore, Timestamp};
//! use statehouse_embedded::EmbeddedStore;
//!
//! let clock = ManualClock::new(Timestamp::from_micros(1_700_000_000_000_000));
//! let store = EmbeddedStore::builder()
//!     .clock(clock.clone())
//!     .max_entries(100_000)
//!     .build()?;
//! let policy = Policy::gcra(2, Duration::from_secs(1))?;
//! let check = [LimitCheck::new("user:42", &policy, 1)];
//!
//! block_on(async {
//!     assert!(store.check(&check, Mode::Consume).await?.allowed());
//!     assert!(store.check(&check, Mode::Consume).await?.allowed());
//!     let verdict = store.check(&check, Mode::Consume).await?;
//!     assert!(!verdict.allowed());
//!     assert_eq!(verdict.decisions[0].retry_after, Some(Duration::from_millis(500)));
//!
//!     clock.advance(Duration::from_millis(500));
//!     assert!(store.check(&check, Mode::Consume).await?.allowed());
//!     Ok::<(), statehouse_core::Error>(())
//! })?;
//! # Ok::<(), statehouse_core::Error>(())
//! ```
//!
//! [`EmbeddedSessionStore`] is the in-process
//! [`SessionStore`](statehouse_core::session::SessionStore), sharded by user and bounded the
//! same way; its [module](session) states the session semantics it shares with the Redis store.
//!
//! [`EmbeddedCacheStore`] is the in-process [`CacheStore`](statehouse_core::cache::CacheStore):
//! sharded, bounded in bytes, with leases, tag versions, prefix purges and synchronous
//! invalidations; its [module](cache) states its semantics and its memory bound.
//!
//! ## Design
//!
//! - **Sharded, one lock per shard.** The store holds a power-of-two number of shards (64 by
//!   default), each a `std::sync::Mutex` around a hash table. A check hashes its identity once
//!   (the [encoded key](statehouse_core::key::encode_key), the algorithm and the period: the
//!   same identity the Redis store's keys carry), and that hash picks both the shard and the
//!   bucket. The lock is held for one `decide` and one write; nothing ever awaits under it, so
//!   the trait's async methods complete at once and [`EmbeddedStore::check_sync`] offers the
//!   same without a future. Looking up a stored key allocates nothing.
//! - **Batches are atomic.** A call with several checks locks the distinct shards involved in
//!   ascending index order (two batches can never deadlock), decides every check, and writes
//!   all new states only if every check admitted and the mode is
//!   [`Mode::Consume`](statehouse_core::Mode::Consume). A denied or peeked check writes nothing.
//! - **Expiry like Redis.** Each entry keeps the `expires_at` that `decide` returned with it
//!   ([`Step::expires_at`](statehouse_core::algorithm::Step::expires_at)); from then on it reads
//!   as absent, which decides exactly like the Redis key having expired.
//! - **Bounded memory.** Each shard holds at most `max_entries / shards` entries (one million in
//!   all by default). Expired entries are reclaimed when they would cost memory: an insert into
//!   a table about to grow first sweeps its expired entries (amortised like the growth itself),
//!   and an insert into a full shard samples a few entries, drops the expired ones, and if none
//!   was, evicts the sampled entry closest to expiry, as Redis's approximated eviction does.
//!   Losing a state makes the limiter more permissive for that one key only, and the entry
//!   closest to expiry had the least left to forget. An expired entry read again is removed,
//!   or overwritten in place if the check consumes.
//! - **No background thread.** Nothing runs between calls. Memory stays bounded without one,
//!   but an application with many one-off keys may call [`EmbeddedStore::purge_expired`]
//!   periodically (say every minute from a timer task) to free their places (and any key
//!   longer than 38 bytes or sliding log they hold on the heap) sooner.
//!
//! The hasher is foldhash, seeded randomly for each store. It is fast rather than
//! cryptographically collision-resistant; the random seed keeps keys that collide from being
//! precomputed, and the per-shard cap bounds what any flood of keys can cost.

pub mod cache;
mod clock;
pub mod session;
mod shard;
mod store;

pub use cache::{
    CacheStats, DEFAULT_CACHE_SHARDS, DEFAULT_MAX_BYTES, ENTRY_OVERHEAD_BYTES, EmbeddedCacheStore,
    EmbeddedCacheStoreBuilder,
};
pub use clock::MonotonicClock;
pub use session::{
    DEFAULT_MAX_SESSIONS, EmbeddedSessionStore, EmbeddedSessionStoreBuilder, MAX_USER_AGENT_LEN,
};
pub use store::{
    DEFAULT_MAX_ENTRIES, DEFAULT_SHARDS, EmbeddedStore, EmbeddedStoreBuilder, MAX_SHARDS,
};
