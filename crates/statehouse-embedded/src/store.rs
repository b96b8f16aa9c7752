//! [`EmbeddedStore`] and its builder.

use std::fmt;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use statehouse_core::algorithm::decide;
use statehouse_core::key::encode_key;
use statehouse_core::{
    Clock, Decision, Error, LimitCheck, Mode, Policy, RateLimitStore, Result, Verdict,
    prepare_checks,
};

use crate::clock::MonotonicClock;
use crate::shard::{EntryId, Shard};

/// The default number of shards: enough that 64 concurrent tasks rarely meet on one lock.
pub const DEFAULT_SHARDS: usize = 64;

/// The default bound on stored entries. An entry takes about 100 bytes plus its key (a sliding
/// log also 8 bytes per logged unit), so a million is on the order of 100 MiB at worst.
pub const DEFAULT_MAX_ENTRIES: usize = 1_000_000;

/// The most shards a store may have.
pub const MAX_SHARDS: usize = 1 << 16;

/// An in-process [`RateLimitStore`]: sharded, bounded, and deciding exactly like
/// [`algorithm::decide`](statehouse_core::algorithm::decide) (it calls it).
///
/// Clones share the same state. See the [crate docs](crate) for the design.
///
/// ```
/// use std::time::Duration;
/// use statehouse_core::{ManualClock, Mode, Policy, Timestamp};
/// use statehouse_embedded::EmbeddedStore;
///
/// let clock = ManualClock::new(Timestamp::from_micros(1_700_000_000_000_000));
/// let store = EmbeddedStore::builder().clock(clock.clone()).build()?;
/// let policy = Policy::fixed_window(1, Duration::from_secs(1))?;
/// assert!(store.check_one("ip:1", &policy, 1, Mode::Consume)?.allowed);
/// assert!(!store.check_one("ip:1", &policy, 1, Mode::Consume)?.allowed);
/// clock.advance(Duration::from_secs(1));
/// assert!(store.check_one("ip:1", &policy, 1, Mode::Consume)?.allowed);
/// # Ok::<(), statehouse_core::Error>(())
/// ```
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// A std `Mutex` per shard: it is only ever held for one synchronous decide-and-write (or
    /// a batch of them, or a sweep), never across an `.await`, so an async mutex would only add
    /// cost. Padded to a cache line pair so that neighbouring shards' locks do not share one.
    shards: Box<[CachePadded<Mutex<Shard>>]>,
    /// `shards.len() - 1`; the shard count is a power of two.
    shard_mask: usize,
    /// The bound on entries actually enforced: per-shard cap × shards, at most `max_entries`.
    max_entries: usize,
    /// Seeded randomly per store, so another process cannot precompute colliding keys for it.
    hasher: foldhash::fast::RandomState,
    clock: Arc<dyn Clock>,
}

/// Keeps each shard's lock on its own cache lines (128 bytes covers adjacent-line prefetching).
#[repr(align(128))]
struct CachePadded<T>(T);

impl EmbeddedStore {
    /// A store with the defaults: the system clock, [`DEFAULT_SHARDS`] shards and at most
    /// [`DEFAULT_MAX_ENTRIES`] entries.
    ///
    /// ```
    /// let store = statehouse_embedded::EmbeddedStore::new();
    /// assert!(store.is_empty());
    /// ```
    pub fn new() -> Self {
        Self::from_parts(
            Arc::new(MonotonicClock::new()),
            DEFAULT_SHARDS,
            DEFAULT_MAX_ENTRIES,
        )
    }

    /// A builder to set the clock, the bound on entries and the shard count.
    ///
    /// ```
    /// use statehouse_core::ManualClock;
    /// use statehouse_embedded::EmbeddedStore;
    /// let store = EmbeddedStore::builder()
    ///     .clock(ManualClock::starting_now())
    ///     .max_entries(10_000)
    ///     .shards(16)
    ///     .build()?;
    /// assert_eq!(store.shards(), 16);
    /// assert_eq!(store.max_entries(), 10_000);
    /// # Ok::<(), statehouse_core::Error>(())
    /// ```
    pub fn builder() -> EmbeddedStoreBuilder {
        EmbeddedStoreBuilder::default()
    }

    fn from_parts(clock: Arc<dyn Clock>, shards: usize, max_entries: usize) -> Self {
        let per_shard = (max_entries / shards).max(1);
        let shards: Box<[_]> = (0..shards)
            .map(|i| {
                // Any fixed, distinct seed will do: the samples need spread, not secrecy.
                let seed = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                CachePadded(Mutex::new(Shard::new(per_shard, seed)))
            })
            .collect();
        EmbeddedStore {
            inner: Arc::new(Inner {
                shard_mask: shards.len() - 1,
                max_entries: per_shard * shards.len(),
                shards,
                hasher: foldhash::fast::RandomState::default(),
                clock,
            }),
        }
    }

    /// Decides `checks` together, like [`RateLimitStore::check`] but without a future: the
    /// store never waits, so synchronous code may call this directly.
    ///
    /// All or nothing: if every check admits and `mode` is [`Mode::Consume`], all are consumed;
    /// otherwise nothing is written.
    ///
    /// ```
    /// use std::time::Duration;
    /// use statehouse_core::{LimitCheck, Mode, Policy};
    /// use statehouse_embedded::EmbeddedStore;
    ///
    /// let store = EmbeddedStore::new();
    /// let per_sec = Policy::gcra(10, Duration::from_secs(1))?;
    /// let per_day = Policy::fixed_window(1, Duration::from_secs(86_400))?;
    /// let both = [LimitCheck::new("u:1", &per_sec, 1), LimitCheck::new("u:1", &per_day, 1)];
    /// assert!(store.check_sync(&both, Mode::Consume)?.allowed());
    /// // The daily limit denies, so the per-second one is not consumed either.
    /// let verdict = store.check_sync(&both, Mode::Consume)?;
    /// assert!(!verdict.allowed());
    /// assert_eq!(store.check_one("u:1", &per_sec, 1, Mode::Peek)?.remaining, 8);
    /// # Ok::<(), statehouse_core::Error>(())
    /// ```
    pub fn check_sync(&self, checks: &[LimitCheck<'_>], mode: Mode) -> Result<Verdict> {
        match checks {
            [] => Ok(Verdict {
                decisions: Vec::new(),
            }),
            [one] => Ok(Verdict {
                decisions: vec![self.check_one(one.key, one.policy, one.cost, mode)?],
            }),
            _ => self.check_batch(checks, mode),
        }
    }

    /// Decides a single check: the fast path, with no allocation for a key already stored
    /// (short keys are used as they are; see [`encode_key`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use statehouse_core::{Mode, Policy};
    /// use statehouse_embedded::EmbeddedStore;
    ///
    /// let store = EmbeddedStore::new();
    /// let policy = Policy::gcra(5, Duration::from_secs(1))?;
    /// let decision = store.check_one("user:42", &policy, 2, Mode::Consume)?;
    /// assert!(decision.allowed);
    /// assert_eq!(decision.remaining, 3);
    /// assert!(store.check_one("", &policy, 1, Mode::Consume).is_err());
    /// # Ok::<(), statehouse_core::Error>(())
    /// ```
    pub fn check_one(&self, key: &str, policy: &Policy, cost: u64, mode: Mode) -> Result<Decision> {
        // The same validation, in the same order, as `prepare_checks` does for a batch.
        policy.check_cost(cost)?;
        let key = encode_key(key)?;
        let id = self.entry_id(&key, policy);
        let mut shard = self.lock(self.shard_index(id.hash));
        // Read under the lock, so that one shard's decisions see non-decreasing times (with a
        // monotone clock): a check that waited for the lock never decides in the past of the
        // check before it.
        let now = self.inner.clock.now();
        Ok(shard.apply(&id, policy, cost, mode, now))
    }

    /// Forgets the state of `key` under `policy`, like [`RateLimitStore::reset`] without a
    /// future.
    ///
    /// ```
    /// use std::time::Duration;
    /// use statehouse_core::{Mode, Policy};
    /// use statehouse_embedded::EmbeddedStore;
    ///
    /// let store = EmbeddedStore::new();
    /// let policy = Policy::fixed_window(1, Duration::from_secs(60))?;
    /// store.check_one("k", &policy, 1, Mode::Consume)?;
    /// store.reset_sync("k", &policy)?;
    /// assert!(store.check_one("k", &policy, 1, Mode::Consume)?.allowed);
    /// # Ok::<(), statehouse_core::Error>(())
    /// ```
    pub fn reset_sync(&self, key: &str, policy: &Policy) -> Result<()> {
        let key = encode_key(key)?;
        let id = self.entry_id(&key, policy);
        self.lock(self.shard_index(id.hash)).remove(&id);
        Ok(())
    }

    /// Removes every expired entry, shard by shard, and returns how many.
    ///
    /// Not needed for correctness (an expired entry reads as absent) nor for the bound on
    /// memory (inserts reclaim and evict), but calling it now and then (say every minute from
    /// a timer task) frees the places of keys that were used once and never again, with any
    /// heap memory they hold (long keys, sliding logs). The tables themselves do not shrink.
    /// Each shard is locked only for its own sweep.
    ///
    /// ```
    /// use std::time::Duration;
    /// use statehouse_core::{ManualClock, Mode, Policy};
    /// use statehouse_embedded::EmbeddedStore;
    ///
    /// let clock = ManualClock::starting_now();
    /// let store = EmbeddedStore::builder().clock(clock.clone()).build()?;
    /// let policy = Policy::gcra(10, Duration::from_secs(1))?;
    /// store.check_one("k", &policy, 1, Mode::Consume)?;
    /// clock.advance(Duration::from_secs(1));
    /// assert_eq!(store.purge_expired(), 1);
    /// assert_eq!(store.len(), 0);
    /// # Ok::<(), statehouse_core::Error>(())
    /// ```
    pub fn purge_expired(&self) -> usize {
        (0..self.inner.shards.len())
            .map(|i| {
                let mut shard = self.lock(i);
                shard.purge_expired(self.inner.clock.now())
            })
            .sum()
    }

    /// How many entries are stored, counting expired ones not yet reclaimed. Never more than
    /// [`EmbeddedStore::max_entries`]. Shards are counted one after another, so under
    /// concurrent use this is an approximation.
    ///
    /// ```
    /// assert_eq!(statehouse_embedded::EmbeddedStore::new().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        (0..self.inner.shards.len())
            .map(|i| self.lock(i).len())
            .sum()
    }

    /// True when no entry is stored.
    ///
    /// ```
    /// assert!(statehouse_embedded::EmbeddedStore::new().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bound on stored entries actually enforced: the per-shard cap
    /// (`max_entries / shards`, at least 1) times the shard count.
    ///
    /// ```
    /// let store = statehouse_embedded::EmbeddedStore::builder().max_entries(1000).shards(64).build()?;
    /// assert_eq!(store.max_entries(), 960); // 15 per shard
    /// # Ok::<(), statehouse_core::Error>(())
    /// ```
    pub fn max_entries(&self) -> usize {
        self.inner.max_entries
    }

    /// The number of shards (a power of two).
    ///
    /// ```
    /// let store = statehouse_embedded::EmbeddedStore::builder().shards(48).build()?;
    /// assert_eq!(store.shards(), 64);
    /// # Ok::<(), statehouse_core::Error>(())
    /// ```
    pub fn shards(&self) -> usize {
        self.inner.shards.len()
    }

    /// The many-check path: validate, lock the shards involved in ascending index order (so two
    /// batches can never wait on each other in a cycle), decide all, write all or nothing.
    fn check_batch(&self, checks: &[LimitCheck<'_>], mode: Mode) -> Result<Verdict> {
        let prepared = prepare_checks(checks)?;
        let ids: Vec<EntryId<'_>> = prepared
            .iter()
            .map(|check| self.entry_id(&check.key, check.policy))
            .collect();
        let mut shard_indices: Vec<usize> =
            ids.iter().map(|id| self.shard_index(id.hash)).collect();
        shard_indices.sort_unstable();
        shard_indices.dedup();
        // Position of each check's shard among the locked ones.
        let positions: Vec<usize> = ids
            .iter()
            .map(|id| {
                shard_indices
                    .binary_search(&self.shard_index(id.hash))
                    .unwrap_or_else(|insert_at| insert_at)
            })
            .collect();
        let mut guards: Vec<MutexGuard<'_, Shard>> =
            shard_indices.iter().map(|&i| self.lock(i)).collect();
        let now = self.inner.clock.now();

        // States are cloned, not taken: if any check denies, every stored state must stay.
        let steps: Vec<_> = prepared
            .iter()
            .zip(&ids)
            .zip(&positions)
            .map(|((check, id), &position)| {
                let state = guards[position].live_state(id, now).cloned();
                decide(check.policy, state, now, check.cost, mode)
            })
            .collect();

        // In a full shard, inserting one check's new state may evict another's written just
        // before; like any eviction, that forgets one key's consumption and nothing else.
        let admitted = steps.iter().all(|step| step.decision.allowed);
        let mut decisions = Vec::with_capacity(steps.len());
        for ((step, id), &position) in steps.into_iter().zip(&ids).zip(&positions) {
            if admitted
                && step.changed
                && let Some(state) = step.state
            {
                guards[position].write(id, state, step.expires_at, now);
            }
            decisions.push(step.decision);
        }
        Ok(Verdict { decisions })
    }

    /// The identity of `key` (already encoded) under `policy`, with its hash.
    fn entry_id<'k>(&self, key: &'k str, policy: &Policy) -> EntryId<'k> {
        let algorithm = policy.algorithm();
        let period_us = policy.period_micros();
        EntryId {
            hash: self
                .inner
                .hasher
                .hash_one((key, algorithm.code(), period_us)),
            key,
            algorithm,
            period_us,
        }
    }

    /// The shard of a hash: bits 32 and up, which hashbrown uses for neither the bucket index
    /// (low bits) nor the control tag (top 7 bits), so keys of one shard still spread over its
    /// table.
    fn shard_index(&self, hash: u64) -> usize {
        ((hash >> 32) as usize) & self.inner.shard_mask
    }

    fn lock(&self, index: usize) -> MutexGuard<'_, Shard> {
        // A poisoned shard is still consistent: states are written only after `decide`
        // returns, and a slot caught mid-decision holds a placeholder that reads as no state.
        self.inner.shards[index]
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for EmbeddedStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("shards", &self.shards())
            .field("max_entries", &self.max_entries())
            .field("clock", &self.inner.clock)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl RateLimitStore for EmbeddedStore {
    async fn check(&self, checks: &[LimitCheck<'_>], mode: Mode) -> Result<Verdict> {
        self.check_sync(checks, mode)
    }

    /// Always answers: the embedded store never waits.
    fn check_one_now(&self, check: &LimitCheck<'_>, mode: Mode) -> Option<Result<Decision>> {
        Some(self.check_one(check.key, check.policy, check.cost, mode))
    }

    async fn reset(&self, key: &str, policy: &Policy) -> Result<()> {
        self.reset_sync(key, policy)
    }
}

/// Configures an [`EmbeddedStore`]; from [`EmbeddedStore::builder`].
///
/// ```
/// use statehouse_embedded::EmbeddedStore;
/// assert!(EmbeddedStore::builder().shards(0).build().is_err());
/// assert!(EmbeddedStore::builder().max_entries(0).build().is_err());
/// ```
#[derive(Debug, Clone)]
pub struct EmbeddedStoreBuilder {
    clock: Arc<dyn Clock>,
    max_entries: usize,
    shards: usize,
}

impl Default for EmbeddedStoreBuilder {
    fn default() -> Self {
        EmbeddedStoreBuilder {
            clock: Arc::new(MonotonicClock::new()),
            max_entries: DEFAULT_MAX_ENTRIES,
            shards: DEFAULT_SHARDS,
        }
    }
}

impl EmbeddedStoreBuilder {
    /// The clock to decide by; [`MonotonicClock`] by default (any [`Clock`] works, e.g.
    /// `SystemClock`). Pass a
    /// [`ManualClock`](statehouse_core::ManualClock) (a clone of it, which shares its time) in
    /// tests, or an `Arc<dyn Clock>` shared with other components.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The most entries the store keeps ([`DEFAULT_MAX_ENTRIES`] by default). Each shard holds
    /// at most `max_entries / shards` (at least 1); when a shard is full, an insert first drops
    /// expired entries, then evicts the sampled entry closest to expiry.
    pub fn max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries;
        self
    }

    /// The number of shards ([`DEFAULT_SHARDS`] by default), rounded up to a power of two, at
    /// most [`MAX_SHARDS`]. If that exceeds `max_entries`, it is lowered to the largest power of
    /// two not above `max_entries`, so that the bound on entries holds exactly.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards;
        self
    }

    /// Builds the store, or fails with [`Error::InvalidInput`] naming the field for a zero
    /// `shards` or `max_entries`, or more than [`MAX_SHARDS`] shards.
    pub fn build(self) -> Result<EmbeddedStore> {
        if self.max_entries == 0 {
            return Err(Error::InvalidInput(
                "embedded store `max_entries` must be at least 1".into(),
            ));
        }
        if self.shards == 0 {
            return Err(Error::InvalidInput(
                "embedded store `shards` must be at least 1".into(),
            ));
        }
        if self.shards > MAX_SHARDS {
            return Err(Error::InvalidInput(format!(
                "embedded store `shards` is {}; the maximum is {MAX_SHARDS}",
                self.shards
            )));
        }
        let mut shards = self.shards.next_power_of_two();
        if shards > self.max_entries {
            // Largest power of two not above max_entries (max_entries >= 1 here).
            shards = 1 << self.max_entries.ilog2();
        }
        Ok(EmbeddedStore::from_parts(
            self.clock,
            shards,
            self.max_entries,
        ))
    }
}
