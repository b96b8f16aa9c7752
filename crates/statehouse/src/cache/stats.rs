//! Counters of what a cache did, kept in atomics and read as a plain struct.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::BreakerState;

/// A snapshot of a [`Cache`](crate::Cache)'s counters, from
/// [`Cache::stats`](crate::Cache::stats).
///
/// Every counter is monotonic since the cache was built and shared by its clones. As with
/// [`LimiterStats`](crate::LimiterStats), the library depends on no metrics crate: a caller
/// (the Statehouse gateway) reads this struct and exports it as counters.
///
/// "L1" is this replica's near cache, "L2" the shared store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CacheStats {
    /// Lookups answered by the near cache (values, negatives and stale values alike).
    pub l1_hits: u64,
    /// Lookups the near cache could not answer while it was in use.
    pub l1_misses: u64,
    /// Lookups answered by the store with a live entry.
    pub l2_hits: u64,
    /// Store reads that found nothing usable (absent, expired, void by a tag, undecodable).
    pub l2_misses: u64,
    /// Lookups answered "known absent" (negative caching), from either tier.
    pub negative_hits: u64,
    /// Stale values served: stale-while-revalidate, stale-if-error, or a lease held elsewhere.
    pub stale_served: u64,
    /// Loader calls (foreground and background).
    pub loads: u64,
    /// Loader calls that returned an error.
    pub load_errors: u64,
    /// Callers that waited for another caller's load in this process instead of loading.
    pub coalesced_waiters: u64,
    /// Times a caller found the lease held by another replica and waited for its fill.
    pub lease_waits: u64,
    /// Changes this cache sent to the store (each publishes an invalidation): sets, deletes,
    /// fills, tag bumps and purges.
    pub invalidations_sent: u64,
    /// Invalidation messages received from the store's channel (from any replica).
    pub invalidations_received: u64,
    /// Times the whole near cache was dropped (channel lost or back, namespace bumped, `All`).
    pub l1_flushes: u64,
    /// Near-cache entries evicted to stay within its byte bound.
    pub l1_evictions: u64,
    /// Stored entries that could not be read (another codec, corrupt bytes, bad compression):
    /// each treated as a miss.
    pub decode_errors: u64,
    /// Store calls that failed or passed the deadline.
    pub store_errors: u64,
    /// Where the circuit breaker in front of the store stands now.
    pub breaker_state: BreakerState,
    /// Times the breaker opened (a run of store failures).
    pub breaker_opened: u64,
}

/// The live counters behind [`CacheStats`]. Relaxed atomics: each counter is exact, a snapshot
/// taken during traffic may be a few increments apart between fields.
#[derive(Debug, Default)]
pub(crate) struct CacheCounters {
    pub(crate) l1_hits: AtomicU64,
    pub(crate) l1_misses: AtomicU64,
    pub(crate) l2_hits: AtomicU64,
    pub(crate) l2_misses: AtomicU64,
    pub(crate) negative_hits: AtomicU64,
    pub(crate) stale_served: AtomicU64,
    pub(crate) loads: AtomicU64,
    pub(crate) load_errors: AtomicU64,
    pub(crate) coalesced_waiters: AtomicU64,
    pub(crate) lease_waits: AtomicU64,
    pub(crate) invalidations_sent: AtomicU64,
    pub(crate) invalidations_received: AtomicU64,
    pub(crate) l1_flushes: AtomicU64,
    pub(crate) l1_evictions: AtomicU64,
    pub(crate) decode_errors: AtomicU64,
    pub(crate) store_errors: AtomicU64,
}

impl CacheCounters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> CacheStats {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CacheStats {
            l1_hits: read(&self.l1_hits),
            l1_misses: read(&self.l1_misses),
            l2_hits: read(&self.l2_hits),
            l2_misses: read(&self.l2_misses),
            negative_hits: read(&self.negative_hits),
            stale_served: read(&self.stale_served),
            loads: read(&self.loads),
            load_errors: read(&self.load_errors),
            coalesced_waiters: read(&self.coalesced_waiters),
            lease_waits: read(&self.lease_waits),
            invalidations_sent: read(&self.invalidations_sent),
            invalidations_received: read(&self.invalidations_received),
            l1_flushes: read(&self.l1_flushes),
            l1_evictions: read(&self.l1_evictions),
            decode_errors: read(&self.decode_errors),
            store_errors: read(&self.store_errors),
            breaker_state: BreakerState::Closed,
            breaker_opened: 0,
        }
    }
}
