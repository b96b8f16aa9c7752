//! [`EmbeddedCacheStore`]: the shared cache tier ([`CacheStore`]) in process memory, bounded in
//! bytes, with leases, tag versions, prefix purges and a synchronous invalidation channel.
//!
//! # Semantics
//!
//! Every operation reads the store's clock once, under the lock of the shard it works on.
//!
//! - **Values** live until `now + ttl` by the store's clock: at `expires_at` they read as
//!   absent. A zero TTL is invalid input (a cache write that could never be read back is a
//!   caller's mistake).
//! - **Leases** follow the protocol of [`statehouse_core::cache`], as the Redis store does. A
//!   lease lasts `ttl` from its acquisition **by the store's clock** (Redis: the lease key's
//!   `PX`): a fill (`set` with `Some(token)`) succeeds only while `token` is the key's lease
//!   and that time has not passed, and consumes it; an expired lease is reclaimed by the
//!   store's clock. Whether another caller may take the lease over compares its `now` with the
//!   holder's `now + ttl` (both callers' clocks: the Redis script stores the same). So a
//!   caller whose clock differs from the store's (the facade's default `SystemClock` against
//!   this store's `MonotonicClock` after the wall clock was stepped) still fills. A write
//!   (`set` with `None`), a delete and a purge void the lease. A zero lease TTL is invalid
//!   input.
//! - **Tag versions** are 53-bit (exact in a double, like Redis's Lua numbers) and never zero. A
//!   tag never seen (or evicted) gets a random starting version from the operating system's
//!   CSPRNG, so it cannot come back to a version an old entry recorded; a bump adds one.
//! - **Purges** remove every key starting with the prefix (compared as bytes, no pattern
//!   characters; the empty prefix matches every key) with their leases, and count the keys
//!   whose value was live.
//! - **Invalidations**: every write, fill, delete, bump and purge calls every subscriber's
//!   [`on_invalidation`](InvalidationSink::on_invalidation) synchronously, after the store's
//!   locks are released and before the call returns, so a caller's own near cache is never
//!   behind its writes. A refused fill changes nothing and sends nothing. A delete sends its
//!   message even when the key was absent (a near cache may still hold it).
//!
//! # Memory
//!
//! The bound `max_bytes` covers the key and value bytes of every entry plus
//! [`ENTRY_OVERHEAD_BYTES`] of bookkeeping each; a lease costs its 32-byte token, a tag its key
//! and 8 bytes: **tags and leases count toward the same bound as values** and are evicted like
//! them. Evicting a tag only makes its entries miss (it comes back with a new random version),
//! and evicting a lease only refuses its fill, so neither can serve stale data.
//!
//! The store holds a power-of-two number of shards, each with `max_bytes / shards` bytes. A
//! write that takes its shard over budget first reclaims the shard's expired values and leases
//! (exactly, oldest expiry first, from a min-heap of expiry times), then evicts entries chosen
//! by the CLOCK algorithm (second chance: a read marks an entry, the sweeping hand spares a
//! marked entry once and unmarks it), an approximation of least recently used that costs O(1)
//! per read. Evictions are counted ([`CacheStats::evictions`]). The entry being written is never
//! the victim, so the largest entry the store can hold is one shard's budget
//! ([`EmbeddedCacheStore::max_entry_bytes`]); a larger value is dropped at once (as if written
//! and evicted, which a cache may do at any time): the write still removes the old value, voids
//! the lease, notifies, counts one eviction and returns `true`.
//!
//! Expired entries are also reclaimed without pressure: every operation on a shard first pops
//! the entries whose time has come off that shard's heap (amortised O(log n) each), and a read
//! of an expired value removes it. [`EmbeddedCacheStore::purge_expired`] does it for every shard.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use hashbrown::HashTable;
use statehouse_core::cache::{
    CacheStore, Invalidation, InvalidationSink, InvalidationSubscription, LeaseOutcome, LeaseToken,
    validate_cache_key, validate_tag,
};
use statehouse_core::{Clock, Error, Result, Timestamp};

use crate::clock::MonotonicClock;
use crate::store::MAX_SHARDS;

/// The default bound on the cache's memory: 256 MiB.
pub const DEFAULT_MAX_BYTES: usize = 256 * 1024 * 1024;

/// The default number of cache shards (lowered for a small `max_bytes`, see
/// [`EmbeddedCacheStoreBuilder::shards`]).
pub const DEFAULT_CACHE_SHARDS: usize = 64;

/// The bookkeeping counted for every entry on top of its key and value bytes: the entry record,
/// its place in the hash table and its expiry-heap records, rounded up.
pub const ENTRY_OVERHEAD_BYTES: usize = 128;

/// Shards are lowered until each has at least this many bytes (or the whole bound), so that
/// values up to 1 MiB fit under any bound of 1 MiB or more.
const MIN_SHARD_BYTES: usize = 1024 * 1024;

/// A lease's cost on top of its entry: the token.
const LEASE_BYTES: usize = 32;

/// A tag's cost on top of its entry: the version.
const TAG_BYTES: usize = 8;

/// An in-process [`CacheStore`]: sharded, bounded in bytes, and notifying its subscribers
/// synchronously. Clones share the same cache.
///
/// See the [module docs](crate::cache) for the precise semantics and the memory bound.
///
/// ```
/// use std::time::Duration;
/// use futures::executor::block_on;
/// use statehouse_core::cache::{CacheStore, LeaseOutcome};
/// use statehouse_core::{Clock, ManualClock};
/// use statehouse_embedded::EmbeddedCacheStore;
///
/// let clock = ManualClock::starting_now();
/// let cache = EmbeddedCacheStore::builder()
///     .clock(clock.clone())
///     .max_bytes(64 * 1024 * 1024)
///     .build()?;
/// block_on(async {
///     // A reader misses, takes the lease, loads, and fills.
///     assert_eq!(cache.get("user:42").await?, None);
///     let LeaseOutcome::Acquired(lease) =
///         cache.acquire_lease("user:42", clock.now(), Duration::from_secs(5)).await?
///     else {
///         unreachable!("nobody else holds it")
///     };
///     assert!(cache.set("user:42", b"alice", Duration::from_secs(60), Some(&lease)).await?);
///     assert_eq!(cache.get("user:42").await?.as_deref(), Some(&b"alice"[..]));
///
///     clock.advance(Duration::from_secs(60));
///     assert_eq!(cache.get("user:42").await?, None, "expired");
///     Ok::<(), statehouse_core::Error>(())
/// })?;
/// # Ok::<(), statehouse_core::Error>(())
/// ```
#[derive(Clone)]
pub struct EmbeddedCacheStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// A std `Mutex` per shard: held only for one synchronous lookup-and-write (or a purge's
    /// pass over the shard), never across an `.await` and never while a subscriber is called,
    /// so an async mutex would only add cost. Padded so neighbouring locks do not share a
    /// cache line.
    shards: Box<[CachePadded<Mutex<CacheShard>>]>,
    /// `shards.len() - 1`; the shard count is a power of two.
    shard_mask: usize,
    /// Each shard's byte budget; also the largest entry the store can hold.
    shard_bytes: usize,
    /// Seeded randomly per store, so another process cannot precompute keys that crowd a shard.
    hasher: foldhash::fast::RandomState,
    clock: Arc<dyn Clock>,
    /// Entries evicted to keep the bound (not expired ones), over the store's life.
    evictions: AtomicU64,
    subscribers: Arc<Subscribers>,
}

/// Keeps each shard's lock on its own cache lines (128 bytes covers adjacent-line prefetching).
#[repr(align(128))]
struct CachePadded<T>(T);

/// The registered sinks.
struct Subscribers {
    /// A std `RwLock` around an immutable snapshot: a notification takes the read lock just
    /// long enough to clone the `Arc` (so writers to different shards never wait on each
    /// other) and calls the sinks with no lock held; subscribing and unsubscribing, which are
    /// rare, replace the snapshot under the write lock. Never held across an `.await`.
    sinks: RwLock<Arc<[Subscriber]>>,
    next_id: AtomicU64,
}

#[derive(Clone)]
struct Subscriber {
    id: u64,
    sink: Arc<dyn InvalidationSink>,
}

impl Subscribers {
    fn snapshot(&self) -> Arc<[Subscriber]> {
        self.sinks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn add(&self, sink: Arc<dyn InvalidationSink>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut sinks = self.sinks.write().unwrap_or_else(PoisonError::into_inner);
        let mut next: Vec<Subscriber> = sinks.iter().cloned().collect();
        next.push(Subscriber { id, sink });
        *sinks = next.into();
        id
    }

    fn remove(&self, id: u64) {
        let mut sinks = self.sinks.write().unwrap_or_else(PoisonError::into_inner);
        let next: Vec<Subscriber> = sinks.iter().filter(|s| s.id != id).cloned().collect();
        *sinks = next.into();
    }

    fn publish(&self, message: &Invalidation) {
        for subscriber in self.snapshot().iter() {
            subscriber.sink.on_invalidation(message);
        }
    }
}

/// Unregisters its sink when the [`InvalidationSubscription`] holding it is dropped. Holds the
/// registry weakly: a subscription that outlives its store keeps nothing alive.
struct Unsubscribe {
    subscribers: Weak<Subscribers>,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        if let Some(subscribers) = self.subscribers.upgrade() {
            subscribers.remove(self.id);
        }
    }
}

/// What the store knows about its memory and its evictions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Entries held: keys with a value or a lease (or both), and tags. Expired ones not yet
    /// reclaimed included.
    pub entries: usize,
    /// Bytes counted against the bound (see the [module docs](crate::cache#memory)).
    pub bytes: usize,
    /// The bound actually enforced: the per-shard budget times the shard count.
    pub max_bytes: usize,
    /// Entries evicted to keep the bound over the store's life (expired entries reclaimed are
    /// not evictions).
    pub evictions: u64,
}

/// Whether a slot is a cache key or a tag: they live in separate namespaces (a tag may be
/// named like a key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Key,
    Tag,
}

#[derive(Debug)]
struct Value {
    /// Shared, so a read copies it out after the shard's lock is released.
    bytes: Arc<[u8]>,
    expires_at: Timestamp,
}

#[derive(Debug)]
struct Lease {
    token: LeaseToken,
    /// When the lease expires by the store's clock (`store now + ttl`, as Redis's `PX`): what a
    /// fill and the reclaiming of expired state go by.
    expires_at: Timestamp,
    /// When it expires by the clock of the caller that took it (`caller now + ttl`): what
    /// another caller's acquisition is compared with, as the Redis script does.
    held_until: Timestamp,
}

#[derive(Debug)]
enum Body {
    /// A cache key: a value, a lease, or both (never neither: such a slot is removed).
    Key {
        value: Option<Value>,
        lease: Option<Lease>,
    },
    Tag {
        version: u64,
    },
}

#[derive(Debug)]
struct Slot {
    key: Box<str>,
    /// The full hash of `(kind, key)`, kept to find the slot's table record and to rehash.
    hash: u64,
    /// Unique in the shard over its life: tells an expiry-heap record of this slot from one of
    /// an earlier slot of the same key.
    id: u64,
    /// CLOCK's reference mark: set by every read or rewrite, cleared once by the sweeping hand.
    referenced: bool,
    body: Body,
}

impl Slot {
    fn kind(&self) -> Kind {
        match self.body {
            Body::Key { .. } => Kind::Key,
            Body::Tag { .. } => Kind::Tag,
        }
    }

    fn cost(&self) -> usize {
        let body = match &self.body {
            Body::Key { value, lease } => {
                value.as_ref().map_or(0, |v| v.bytes.len())
                    + lease.as_ref().map_or(0, |_| LEASE_BYTES)
            }
            Body::Tag { .. } => TAG_BYTES,
        };
        ENTRY_OVERHEAD_BYTES + self.key.len() + body
    }

    fn is_empty(&self) -> bool {
        matches!(
            self.body,
            Body::Key {
                value: None,
                lease: None
            }
        )
    }
}

/// One shard: an index (hash table of positions) over a dense vector of slots, which is what
/// the CLOCK hand sweeps, and a min-heap of expiry times. Always used under its `Mutex`.
#[derive(Debug)]
struct CacheShard {
    table: HashTable<usize>,
    slots: Vec<Slot>,
    /// `(expires_at, slot id, slot hash)` of every value and lease written; records of slots
    /// since removed or rewritten are skipped when popped, and the heap is rebuilt when they
    /// outnumber the live ones.
    expiries: BinaryHeap<Reverse<(Timestamp, u64, u64)>>,
    /// CLOCK's hand: the position in `slots` it looks at next.
    hand: usize,
    next_id: u64,
    bytes: usize,
    budget: usize,
}

/// What a set did, decided under the shard's lock.
enum SetResult {
    Stored,
    /// Larger than a shard's budget: the old value and lease are gone, nothing is stored.
    DroppedAtOnce,
    Refused,
}

impl CacheShard {
    fn new(budget: usize) -> Self {
        CacheShard {
            table: HashTable::new(),
            slots: Vec::new(),
            expiries: BinaryHeap::new(),
            hand: 0,
            next_id: 0,
            bytes: 0,
            budget,
        }
    }

    fn find(&self, hash: u64, kind: Kind, key: &str) -> Option<usize> {
        let slots = &self.slots;
        self.table
            .find(hash, |&i| slots[i].kind() == kind && &*slots[i].key == key)
            .copied()
    }

    /// Adds a slot (the key is known absent) and returns its position.
    fn insert(&mut self, key: &str, hash: u64, body: Body) -> usize {
        let index = self.slots.len();
        let id = self.next_id;
        self.next_id += 1;
        let slot = Slot {
            key: key.into(),
            hash,
            id,
            // Unmarked: an entry never read again goes at the hand's first visit (a scan of
            // one-off keys cannot push out the entries being read).
            referenced: false,
            body,
        };
        self.bytes += slot.cost();
        self.slots.push(slot);
        let slots = &self.slots;
        self.table.insert_unique(hash, index, |&i| slots[i].hash);
        index
    }

    /// Removes the slot at `index`; the last slot moves into its place.
    fn remove(&mut self, index: usize) -> Slot {
        let hash = self.slots[index].hash;
        if let Ok(entry) = self.table.find_entry(hash, |&i| i == index) {
            entry.remove();
        }
        let slot = self.slots.swap_remove(index);
        self.bytes -= slot.cost();
        let moved_from = self.slots.len();
        if index < moved_from {
            let moved_hash = self.slots[index].hash;
            if let Some(position) = self.table.find_mut(moved_hash, |&i| i == moved_from) {
                *position = index;
            }
        }
        slot
    }

    /// Changes the slot at `index` through `change`, keeping `bytes` right.
    fn modify<R>(&mut self, index: usize, change: impl FnOnce(&mut Slot) -> R) -> R {
        let slot = &mut self.slots[index];
        let before = slot.cost();
        let result = change(slot);
        let after = slot.cost();
        self.bytes = self.bytes - before + after;
        result
    }

    fn note_expiry(&mut self, index: usize, expires_at: Timestamp) {
        let slot = &self.slots[index];
        self.expiries
            .push(Reverse((expires_at, slot.id, slot.hash)));
        // Rewrites leave stale records behind; rebuild once they outnumber the live ones, so
        // the heap stays within a small multiple of the entries (amortised O(1) per write).
        if self.expiries.len() > 2 * (self.slots.len() * 2 + 16) {
            self.rebuild_expiries();
        }
    }

    fn rebuild_expiries(&mut self) {
        let mut records = Vec::with_capacity(self.slots.len() * 2);
        for slot in &self.slots {
            if let Body::Key { value, lease } = &slot.body {
                if let Some(v) = value {
                    records.push(Reverse((v.expires_at, slot.id, slot.hash)));
                }
                if let Some(l) = lease {
                    records.push(Reverse((l.expires_at, slot.id, slot.hash)));
                }
            }
        }
        self.expiries = BinaryHeap::from(records);
    }

    /// Drops the value and the lease of the slot at `index` if they expired by `now`, and the
    /// slot itself if nothing is left. Returns whether the slot was removed.
    fn expire_slot(&mut self, index: usize, now: Timestamp) -> bool {
        self.modify(index, |slot| {
            if let Body::Key { value, lease } = &mut slot.body {
                if value.as_ref().is_some_and(|v| v.expires_at <= now) {
                    *value = None;
                }
                if lease.as_ref().is_some_and(|l| l.expires_at <= now) {
                    *lease = None;
                }
            }
        });
        if self.slots[index].is_empty() {
            self.remove(index);
            true
        } else {
            false
        }
    }

    /// Reclaims every value and lease that expired by `now`, oldest first. Returns how many
    /// slots it removed.
    fn reclaim_expired(&mut self, now: Timestamp) -> usize {
        let mut removed = 0;
        while let Some(&Reverse((expires_at, id, hash))) = self.expiries.peek() {
            if expires_at > now {
                break;
            }
            self.expiries.pop();
            let slots = &self.slots;
            if let Some(&index) = self.table.find(hash, |&i| slots[i].id == id)
                && self.expire_slot(index, now)
            {
                removed += 1;
            }
        }
        removed
    }

    /// Brings the shard back within its budget: expired entries first, then CLOCK's victims.
    /// The slot with id `protect` (the one just written) goes last, only if it alone exceeds
    /// the budget (as if written and evicted at once). Returns how many it evicted.
    fn make_room(&mut self, now: Timestamp, protect: u64) -> u64 {
        if self.bytes <= self.budget {
            return 0;
        }
        self.reclaim_expired(now);
        let mut evicted = 0;
        while self.bytes > self.budget && !self.slots.is_empty() {
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let alone = self.slots.len() == 1;
            let slot = &mut self.slots[self.hand];
            if slot.id == protect && !alone {
                self.hand += 1;
            } else if slot.referenced && slot.id != protect {
                slot.referenced = false;
                self.hand += 1;
            } else {
                // The last slot moves into the hand's place. The hand passes over it: the last
                // slots are the newest, and this way a newcomer is first looked at a whole
                // revolution later, as if it had been inserted just behind the hand.
                self.remove(self.hand);
                self.hand += 1;
                evicted += 1;
            }
        }
        evicted
    }

    /// The live value at `key`, marking it used; an expired one is removed.
    fn get(&mut self, hash: u64, key: &str, now: Timestamp) -> Option<Arc<[u8]>> {
        let index = self.find(hash, Kind::Key, key)?;
        let slot = &mut self.slots[index];
        let Body::Key { value, .. } = &slot.body else {
            return None;
        };
        match value {
            Some(v) if v.expires_at > now => {
                let bytes = Arc::clone(&v.bytes);
                slot.referenced = true;
                Some(bytes)
            }
            Some(_) => {
                self.expire_slot(index, now);
                None
            }
            None => None,
        }
    }

    /// Writes (or with `lease`, fills) `key`. `value` is `None` when it is larger than a shard's
    /// budget (the caller checked, to spare copying it).
    fn set(
        &mut self,
        hash: u64,
        key: &str,
        value: Option<Arc<[u8]>>,
        expires_at: Timestamp,
        lease: Option<&LeaseToken>,
        now: Timestamp,
    ) -> (SetResult, u64) {
        let existing = self.find(hash, Kind::Key, key);
        if let Some(token) = lease {
            let holds = existing.is_some_and(|i| {
                matches!(
                    &self.slots[i].body,
                    Body::Key { lease: Some(l), .. } if l.token == *token && l.expires_at > now
                )
            });
            if !holds {
                return (SetResult::Refused, 0);
            }
        }
        let Some(bytes) = value else {
            if let Some(index) = existing {
                self.remove(index);
            }
            return (SetResult::DroppedAtOnce, 1);
        };
        let stored = Value { bytes, expires_at };
        let index = match existing {
            Some(index) => {
                self.modify(index, |slot| {
                    // Writing voids any lease; a fill consumes its own.
                    slot.body = Body::Key {
                        value: Some(stored),
                        lease: None,
                    };
                    slot.referenced = true;
                });
                index
            }
            None => self.insert(
                key,
                hash,
                Body::Key {
                    value: Some(stored),
                    lease: None,
                },
            ),
        };
        let id = self.slots[index].id;
        self.note_expiry(index, expires_at);
        (SetResult::Stored, self.make_room(now, id))
    }

    /// Removes `key`'s value and lease; whether a live value was there.
    fn delete(&mut self, hash: u64, key: &str, now: Timestamp) -> bool {
        let Some(index) = self.find(hash, Kind::Key, key) else {
            return false;
        };
        let slot = self.remove(index);
        matches!(slot.body, Body::Key { value: Some(v), .. } if v.expires_at > now)
    }

    fn acquire_lease(
        &mut self,
        hash: u64,
        key: &str,
        caller_now: Timestamp,
        ttl: Duration,
        now: Timestamp,
    ) -> Result<(LeaseOutcome, u64)> {
        let existing = self.find(hash, Kind::Key, key);
        if let Some(index) = existing
            && matches!(
                &self.slots[index].body,
                Body::Key { lease: Some(l), .. } if l.held_until > caller_now
            )
        {
            return Ok((LeaseOutcome::HeldElsewhere, 0));
        }
        let token = LeaseToken::generate()?;
        let expires_at = now.saturating_add(ttl);
        let lease = Lease {
            token: token.clone(),
            expires_at,
            held_until: caller_now.saturating_add(ttl),
        };
        let index = match existing {
            Some(index) => {
                self.modify(index, |slot| {
                    if let Body::Key { lease: held, .. } = &mut slot.body {
                        *held = Some(lease);
                    }
                    slot.referenced = true;
                });
                index
            }
            None => self.insert(
                key,
                hash,
                Body::Key {
                    value: None,
                    lease: Some(lease),
                },
            ),
        };
        let id = self.slots[index].id;
        self.note_expiry(index, expires_at);
        let evicted = self.make_room(now, id);
        Ok((LeaseOutcome::Acquired(token), evicted))
    }

    fn release_lease(&mut self, hash: u64, key: &str, token: &LeaseToken, now: Timestamp) -> bool {
        let Some(index) = self.find(hash, Kind::Key, key) else {
            return false;
        };
        let released = self.modify(index, |slot| match &mut slot.body {
            Body::Key { lease, .. }
                if lease
                    .as_ref()
                    .is_some_and(|l| l.token == *token && l.expires_at > now) =>
            {
                *lease = None;
                true
            }
            _ => false,
        });
        if self.slots[index].is_empty() {
            self.remove(index);
        }
        released
    }

    /// The version of `tag`, drawing (and storing) a random one for a tag not held.
    fn tag_version(&mut self, hash: u64, tag: &str, now: Timestamp) -> Result<(u64, u64)> {
        if let Some(index) = self.find(hash, Kind::Tag, tag) {
            let slot = &mut self.slots[index];
            slot.referenced = true;
            if let Body::Tag { version } = slot.body {
                return Ok((version, 0));
            }
        }
        let version = random_version()?;
        let index = self.insert(tag, hash, Body::Tag { version });
        let id = self.slots[index].id;
        Ok((version, self.make_room(now, id)))
    }

    fn bump_tag(&mut self, hash: u64, tag: &str, now: Timestamp) -> Result<(u64, u64)> {
        if let Some(index) = self.find(hash, Kind::Tag, tag) {
            let slot = &mut self.slots[index];
            slot.referenced = true;
            if let Body::Tag { version } = &mut slot.body {
                *version = next_version(*version);
                return Ok((*version, 0));
            }
        }
        let version = next_version(random_version()?);
        let index = self.insert(tag, hash, Body::Tag { version });
        let id = self.slots[index].id;
        Ok((version, self.make_room(now, id)))
    }

    /// Removes every key starting with `prefix` (and its lease); counts the live values.
    fn purge_prefix(&mut self, prefix: &str, now: Timestamp) -> u64 {
        let mut purged = 0;
        let mut index = 0;
        while index < self.slots.len() {
            let slot = &self.slots[index];
            if slot.kind() == Kind::Key && slot.key.starts_with(prefix) {
                let removed = self.remove(index);
                if matches!(removed.body, Body::Key { value: Some(v), .. } if v.expires_at > now) {
                    purged += 1;
                }
                // The last slot moved here: look at this position again.
            } else {
                index += 1;
            }
        }
        purged
    }
}

/// Tag versions stay below 2^53, exact in a double (what Redis's Lua numbers are), so both
/// backends could share the range; 53 random bits still make a repeat after an eviction
/// vanishingly unlikely.
const VERSION_MASK: u64 = (1 << 53) - 1;

fn random_version() -> Result<u64> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| Error::Backend {
        message: format!("the operating system's random source failed: {e}"),
        source: None,
    })?;
    Ok((u64::from_le_bytes(bytes) & VERSION_MASK).max(1))
}

/// The version after `v`: one more, wrapping within the range and skipping zero.
fn next_version(v: u64) -> u64 {
    match (v + 1) & VERSION_MASK {
        0 => 1,
        n => n,
    }
}

fn nonzero_ttl(ttl: Duration, what: &str) -> Result<()> {
    if ttl.is_zero() {
        return Err(Error::InvalidInput(format!(
            "a cache {what} TTL must not be zero"
        )));
    }
    Ok(())
}

impl EmbeddedCacheStore {
    /// A store with the defaults: the [`MonotonicClock`], at most [`DEFAULT_MAX_BYTES`] and
    /// [`DEFAULT_CACHE_SHARDS`] shards.
    ///
    /// ```
    /// let cache = statehouse_embedded::EmbeddedCacheStore::new();
    /// assert_eq!(cache.stats().entries, 0);
    /// ```
    pub fn new() -> Self {
        EmbeddedCacheStoreBuilder::default().assemble()
    }

    /// A builder to set the clock, the byte bound and the shard count.
    ///
    /// ```
    /// use statehouse_core::ManualClock;
    /// use statehouse_embedded::EmbeddedCacheStore;
    /// let cache = EmbeddedCacheStore::builder()
    ///     .clock(ManualClock::starting_now())
    ///     .max_bytes(16 * 1024 * 1024)
    ///     .shards(4)
    ///     .build()?;
    /// assert_eq!(cache.shards(), 4);
    /// assert_eq!(cache.max_bytes(), 16 * 1024 * 1024);
    /// assert_eq!(cache.max_entry_bytes(), 4 * 1024 * 1024);
    /// # Ok::<(), statehouse_core::Error>(())
    /// ```
    pub fn builder() -> EmbeddedCacheStoreBuilder {
        EmbeddedCacheStoreBuilder::default()
    }

    /// The bound on bytes actually enforced: the per-shard budget times the shard count.
    pub fn max_bytes(&self) -> usize {
        self.inner.shard_bytes * self.inner.shards.len()
    }

    /// The largest entry the store can hold (one shard's budget), counted like the bound: key
    /// and value bytes plus [`ENTRY_OVERHEAD_BYTES`]. A larger value is dropped at once.
    pub fn max_entry_bytes(&self) -> usize {
        self.inner.shard_bytes
    }

    /// The number of shards.
    pub fn shards(&self) -> usize {
        self.inner.shards.len()
    }

    /// Entries evicted to keep the bound, over the store's life.
    ///
    /// ```
    /// assert_eq!(statehouse_embedded::EmbeddedCacheStore::new().evictions(), 0);
    /// ```
    pub fn evictions(&self) -> u64 {
        self.inner.evictions.load(Ordering::Relaxed)
    }

    /// Entries, bytes, bound and evictions. Shards are counted one after another, so under
    /// concurrent use the totals are an approximation (each shard's own is exact).
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::executor::block_on;
    /// use statehouse_core::cache::CacheStore;
    /// use statehouse_embedded::{ENTRY_OVERHEAD_BYTES, EmbeddedCacheStore};
    ///
    /// let cache = EmbeddedCacheStore::new();
    /// block_on(cache.set("k", b"value", Duration::from_secs(60), None))?;
    /// let stats = cache.stats();
    /// assert_eq!(stats.entries, 1);
    /// assert_eq!(stats.bytes, ENTRY_OVERHEAD_BYTES + 1 + 5);
    /// # Ok::<(), statehouse_core::Error>(())
    /// ```
    pub fn stats(&self) -> CacheStats {
        let (entries, bytes) = (0..self.inner.shards.len()).fold((0, 0), |(e, b), i| {
            let shard = self.lock(i);
            (e + shard.slots.len(), b + shard.bytes)
        });
        CacheStats {
            entries,
            bytes,
            max_bytes: self.max_bytes(),
            evictions: self.evictions(),
        }
    }

    /// Reclaims every expired value and lease now, shard by shard, and returns how many entries
    /// it removed. Never needed for correctness (expired values read as absent) nor for the
    /// bound (a shard over budget reclaims them first), but frees their memory sooner.
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::executor::block_on;
    /// use statehouse_core::cache::CacheStore;
    /// use statehouse_core::ManualClock;
    /// use statehouse_embedded::EmbeddedCacheStore;
    ///
    /// let clock = ManualClock::starting_now();
    /// let cache = EmbeddedCacheStore::builder().clock(clock.clone()).build()?;
    /// block_on(cache.set("k", b"v", Duration::from_secs(1), None))?;
    /// clock.advance(Duration::from_secs(1));
    /// assert_eq!(cache.purge_expired(), 1);
    /// assert_eq!(cache.stats().entries, 0);
    /// # Ok::<(), statehouse_core::Error>(())
    /// ```
    pub fn purge_expired(&self) -> usize {
        (0..self.inner.shards.len())
            .map(|i| {
                let mut shard = self.lock(i);
                shard.reclaim_expired(self.inner.clock.now())
            })
            .sum()
    }

    /// Tells every subscriber the channel went down, then that it is up again: what a
    /// subscriber of a Redis store sees when its Pub/Sub connection is lost and re-established.
    /// Lets tests of a near cache exercise its reconnect path on the embedded store. Nothing is
    /// lost here (delivery is synchronous), so a near cache merely flushes.
    ///
    /// ```
    /// # use statehouse_core::cache::{Invalidation, InvalidationSink};
    /// # use std::sync::{Arc, Mutex};
    /// use futures::executor::block_on;
    /// use statehouse_core::cache::CacheStore;
    /// use statehouse_embedded::EmbeddedCacheStore;
    ///
    /// #[derive(Default)]
    /// struct Log(Mutex<Vec<&'static str>>);
    /// impl InvalidationSink for Log {
    ///     fn on_invalidation(&self, _: &Invalidation) {}
    ///     fn on_channel_down(&self) { self.0.lock().unwrap().push("down") }
    ///     fn on_channel_up(&self) { self.0.lock().unwrap().push("up") }
    /// }
    ///
    /// let cache = EmbeddedCacheStore::new();
    /// let log = Arc::new(Log::default());
    /// let _subscription = block_on(cache.subscribe(log.clone()))?;
    /// cache.reset_channel();
    /// assert_eq!(*log.0.lock().unwrap(), ["up", "down", "up"]);
    /// # Ok::<(), statehouse_core::Error>(())
    /// ```
    pub fn reset_channel(&self) {
        let sinks = self.inner.subscribers.snapshot();
        for subscriber in sinks.iter() {
            subscriber.sink.on_channel_down();
        }
        for subscriber in sinks.iter() {
            subscriber.sink.on_channel_up();
        }
    }

    /// The number of live subscriptions.
    pub fn subscribers(&self) -> usize {
        self.inner.subscribers.snapshot().len()
    }

    fn hash(&self, kind: Kind, key: &str) -> u64 {
        self.inner.hasher.hash_one((kind, key))
    }

    fn shard(&self, hash: u64) -> MutexGuard<'_, CacheShard> {
        self.lock(((hash >> 32) as usize) & self.inner.shard_mask)
    }

    fn lock(&self, index: usize) -> MutexGuard<'_, CacheShard> {
        // A poisoned shard is still consistent: a slot is changed only through `modify`,
        // `insert` and `remove`, each of which leaves the table, the slots and `bytes` agreeing
        // before anything that could panic runs.
        self.inner.shards[index]
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn count_evictions(&self, evicted: u64) {
        if evicted > 0 {
            self.inner.evictions.fetch_add(evicted, Ordering::Relaxed);
        }
    }

    fn set_sync(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        lease: Option<&LeaseToken>,
    ) -> Result<bool> {
        validate_cache_key(key)?;
        nonzero_ttl(ttl, "value")?;
        let hash = self.hash(Kind::Key, key);
        // Copied before taking the lock; not at all if it can never be stored.
        let cost = ENTRY_OVERHEAD_BYTES + key.len() + value.len();
        let value = (cost <= self.inner.shard_bytes).then(|| Arc::<[u8]>::from(value));
        let (result, evicted) = {
            let mut shard = self.shard(hash);
            let now = self.inner.clock.now();
            shard.reclaim_expired(now);
            shard.set(hash, key, value, now.saturating_add(ttl), lease, now)
        };
        self.count_evictions(evicted);
        match result {
            SetResult::Refused => Ok(false),
            SetResult::Stored | SetResult::DroppedAtOnce => {
                self.inner
                    .subscribers
                    .publish(&Invalidation::Keys(vec![key.to_owned()]));
                Ok(true)
            }
        }
    }

    fn tag_versions_sync(&self, tags: &[String]) -> Result<Vec<u64>> {
        for tag in tags {
            validate_tag(tag)?;
        }
        let mut versions = Vec::with_capacity(tags.len());
        for tag in tags {
            let hash = self.hash(Kind::Tag, tag);
            let (version, evicted) = {
                let mut shard = self.shard(hash);
                let now = self.inner.clock.now();
                shard.reclaim_expired(now);
                shard.tag_version(hash, tag, now)?
            };
            self.count_evictions(evicted);
            versions.push(version);
        }
        Ok(versions)
    }
}

impl Default for EmbeddedCacheStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for EmbeddedCacheStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedCacheStore")
            .field("shards", &self.shards())
            .field("max_bytes", &self.max_bytes())
            .field("evictions", &self.evictions())
            .field("clock", &self.inner.clock)
            .finish_non_exhaustive()
    }
}

/// Every method completes without waiting: the futures are ready when first polled.
#[async_trait]
impl CacheStore for EmbeddedCacheStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        validate_cache_key(key)?;
        let hash = self.hash(Kind::Key, key);
        let shared = {
            let mut shard = self.shard(hash);
            let now = self.inner.clock.now();
            shard.reclaim_expired(now);
            shard.get(hash, key, now)
        };
        Ok(shared.map(|bytes| bytes.to_vec()))
    }

    async fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        lease: Option<&LeaseToken>,
    ) -> Result<bool> {
        self.set_sync(key, value, ttl, lease)
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        validate_cache_key(key)?;
        let hash = self.hash(Kind::Key, key);
        let existed = {
            let mut shard = self.shard(hash);
            let now = self.inner.clock.now();
            shard.reclaim_expired(now);
            shard.delete(hash, key, now)
        };
        self.inner
            .subscribers
            .publish(&Invalidation::Keys(vec![key.to_owned()]));
        Ok(existed)
    }

    async fn acquire_lease(
        &self,
        key: &str,
        now: Timestamp,
        ttl: Duration,
    ) -> Result<LeaseOutcome> {
        validate_cache_key(key)?;
        nonzero_ttl(ttl, "lease")?;
        let hash = self.hash(Kind::Key, key);
        let (outcome, evicted) = {
            let mut shard = self.shard(hash);
            let store_now = self.inner.clock.now();
            shard.reclaim_expired(store_now);
            shard.acquire_lease(hash, key, now, ttl, store_now)?
        };
        self.count_evictions(evicted);
        Ok(outcome)
    }

    async fn release_lease(&self, key: &str, token: &LeaseToken) -> Result<bool> {
        validate_cache_key(key)?;
        let hash = self.hash(Kind::Key, key);
        let mut shard = self.shard(hash);
        let now = self.inner.clock.now();
        shard.reclaim_expired(now);
        Ok(shard.release_lease(hash, key, token, now))
    }

    async fn tag_versions(&self, tags: &[String]) -> Result<Vec<u64>> {
        self.tag_versions_sync(tags)
    }

    async fn bump_tag(&self, tag: &str) -> Result<u64> {
        validate_tag(tag)?;
        let hash = self.hash(Kind::Tag, tag);
        let (version, evicted) = {
            let mut shard = self.shard(hash);
            let now = self.inner.clock.now();
            shard.reclaim_expired(now);
            shard.bump_tag(hash, tag, now)?
        };
        self.count_evictions(evicted);
        self.inner
            .subscribers
            .publish(&Invalidation::Tag(tag.to_owned()));
        Ok(version)
    }

    /// Passes over every shard in turn, holding one lock at a time: a key written to a shard
    /// already passed survives, as on Redis, where `SCAN` runs alongside writes.
    async fn purge_prefix(&self, prefix: &str) -> Result<u64> {
        let mut purged = 0;
        for index in 0..self.inner.shards.len() {
            let mut shard = self.lock(index);
            let now = self.inner.clock.now();
            shard.reclaim_expired(now);
            purged += shard.purge_prefix(prefix, now);
        }
        self.inner
            .subscribers
            .publish(&Invalidation::Prefix(prefix.to_owned()));
        Ok(purged)
    }

    /// Registers `sink`, then calls its `on_channel_up` at once: every message published after
    /// this returns reaches it (one published meanwhile may arrive just before the `up`).
    async fn subscribe(&self, sink: Arc<dyn InvalidationSink>) -> Result<InvalidationSubscription> {
        let id = self.inner.subscribers.add(sink.clone());
        sink.on_channel_up();
        Ok(InvalidationSubscription::new(Unsubscribe {
            subscribers: Arc::downgrade(&self.inner.subscribers),
            id,
        }))
    }
}

/// Configures an [`EmbeddedCacheStore`]; from [`EmbeddedCacheStore::builder`].
///
/// ```
/// use statehouse_embedded::EmbeddedCacheStore;
/// assert!(EmbeddedCacheStore::builder().max_bytes(0).build().is_err());
/// assert!(EmbeddedCacheStore::builder().shards(0).build().is_err());
/// ```
#[derive(Debug, Clone)]
pub struct EmbeddedCacheStoreBuilder {
    clock: Arc<dyn Clock>,
    max_bytes: usize,
    shards: usize,
}

impl Default for EmbeddedCacheStoreBuilder {
    fn default() -> Self {
        EmbeddedCacheStoreBuilder {
            clock: Arc::new(MonotonicClock::new()),
            max_bytes: DEFAULT_MAX_BYTES,
            shards: DEFAULT_CACHE_SHARDS,
        }
    }
}

impl EmbeddedCacheStoreBuilder {
    /// The clock that values expire by; [`MonotonicClock`] by default. Pass a clone of a
    /// [`ManualClock`](statehouse_core::ManualClock) in tests, or an `Arc<dyn Clock>` shared with
    /// the rest of the application (the facade's lease times should come from the same clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The bound on memory in bytes ([`DEFAULT_MAX_BYTES`] by default), counted as the
    /// [module docs](crate::cache#memory) say.
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// The number of shards ([`DEFAULT_CACHE_SHARDS`] by default), rounded up to a power of
    /// two, at most [`MAX_SHARDS`]. It is then lowered (to a power of two, at least 1) until
    /// each shard has at least 1 MiB or the whole bound, because one shard's budget is the
    /// largest entry the store can hold.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards;
        self
    }

    /// Builds the store, or fails with [`Error::InvalidInput`] naming the field for a zero
    /// `max_bytes` or `shards`, or more than [`MAX_SHARDS`] shards.
    pub fn build(self) -> Result<EmbeddedCacheStore> {
        if self.max_bytes == 0 {
            return Err(Error::InvalidInput(
                "embedded cache `max_bytes` must be at least 1".into(),
            ));
        }
        if self.shards == 0 {
            return Err(Error::InvalidInput(
                "embedded cache `shards` must be at least 1".into(),
            ));
        }
        if self.shards > MAX_SHARDS {
            return Err(Error::InvalidInput(format!(
                "embedded cache `shards` is {}; the maximum is {MAX_SHARDS}",
                self.shards
            )));
        }
        Ok(self.assemble())
    }

    /// The store, for settings already checked.
    fn assemble(self) -> EmbeddedCacheStore {
        let mut shards = self.shards.next_power_of_two();
        let fitting = (self.max_bytes / MIN_SHARD_BYTES).max(1);
        if shards > fitting {
            // The largest power of two not above `fitting` (>= 1).
            shards = 1 << fitting.ilog2();
        }
        let shard_bytes = self.max_bytes / shards;
        let slots: Box<[_]> = (0..shards)
            .map(|_| CachePadded(Mutex::new(CacheShard::new(shard_bytes))))
            .collect();
        EmbeddedCacheStore {
            inner: Arc::new(Inner {
                shard_mask: shards - 1,
                shard_bytes,
                shards: slots,
                hasher: foldhash::fast::RandomState::default(),
                clock: self.clock,
                evictions: AtomicU64::new(0),
                subscribers: Arc::new(Subscribers {
                    sinks: RwLock::new(Arc::from(Vec::new())),
                    next_id: AtomicU64::new(0),
                }),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_wrap_within_the_range_and_skip_zero() {
        assert_eq!(next_version(1), 2);
        assert_eq!(next_version(VERSION_MASK - 1), VERSION_MASK);
        assert_eq!(next_version(VERSION_MASK), 1);
        for _ in 0..100 {
            let v = random_version().expect("random");
            assert!(v != 0 && v <= VERSION_MASK);
        }
    }

    #[test]
    fn removing_a_slot_keeps_the_index_consistent() {
        let mut shard = CacheShard::new(1 << 20);
        let hasher = foldhash::fast::RandomState::default();
        let keys: Vec<String> = (0..50).map(|i| format!("k{i}")).collect();
        let now = Timestamp::from_micros(1);
        let later = Timestamp::from_micros(1_000);
        for key in &keys {
            let hash = hasher.hash_one((Kind::Key, key.as_str()));
            shard.set(hash, key, Some(key.as_bytes().into()), later, None, now);
        }
        for key in keys.iter().step_by(3) {
            let hash = hasher.hash_one((Kind::Key, key.as_str()));
            assert!(shard.delete(hash, key, now));
        }
        for (i, key) in keys.iter().enumerate() {
            let hash = hasher.hash_one((Kind::Key, key.as_str()));
            let expected = (i % 3 != 0).then(|| key.as_bytes().to_vec());
            assert_eq!(
                shard.get(hash, key, now).map(|v| v.to_vec()),
                expected,
                "{key}"
            );
        }
        let counted: usize = shard.slots.iter().map(Slot::cost).sum();
        assert_eq!(shard.bytes, counted);
        assert_eq!(shard.table.len(), shard.slots.len());
    }

    #[test]
    fn the_expiry_heap_stays_bounded_under_rewrites() {
        let mut shard = CacheShard::new(1 << 20);
        let hasher = foldhash::fast::RandomState::default();
        let hash = hasher.hash_one((Kind::Key, "k"));
        let now = Timestamp::from_micros(1);
        for i in 0..10_000u64 {
            shard.set(
                hash,
                "k",
                Some(Arc::from(&b"v"[..])),
                Timestamp::from_micros(1_000_000 + i),
                None,
                now,
            );
        }
        assert_eq!(shard.slots.len(), 1);
        assert!(
            shard.expiries.len() <= 2 * (2 + 16) + 1,
            "{}",
            shard.expiries.len()
        );
    }
}
