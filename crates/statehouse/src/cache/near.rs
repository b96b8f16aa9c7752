//! The near cache ("L1"): this replica's copy of recently read entries, bounded in bytes, kept
//! honest by the store's invalidation channel.
//!
//! Sharded `std` mutexes (never held across an `.await`) over `hashbrown` tables keyed by a
//! precomputed hash, so a hit costs one hash, one shard lock, one clock read and an `Arc`
//! clone. Eviction is CLOCK (second chance): an approximation of LRU that needs only a bit per
//! entry on the hit path instead of relinking a list. A sharded LRU crate (moka, quick_cache)
//! was rejected: the near cache needs the invalidation tickets below inside the same lock as
//! the insert, which no off-the-shelf cache exposes.
//!
//! ## The late-fill race
//!
//! A reader that read the store *before* an invalidation must not put that old value into the
//! near cache *after* it. Every reader takes a ticket (the invalidation sequence number) before
//! its store read; every invalidation takes a new sequence number and records it in a slot
//! chosen by the key's hash (or in the "broad" slot for tags, prefixes, flushes and channel
//! changes) *before* it removes the entry under the shard lock. An insert, under the same lock,
//! goes ahead only if neither the key's slot nor the broad slot moved past its ticket. Hash
//! collisions between slots only refuse a few harmless inserts.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use hashbrown::HashTable;
use statehouse_core::Timestamp;
use statehouse_core::cache::{Invalidation, InvalidationSink};

use super::flight::Flights;
use super::stats::CacheCounters;

/// Estimated bookkeeping bytes of one entry beyond its key, payload and tags (the slot, the
/// `Arc`, the ring position, the decoded value's own header).
const ENTRY_OVERHEAD: usize = 128;

/// Slots of the per-key invalidation sequence (a power of two).
const KEY_SLOTS: usize = 4096;

/// Forget every known tag version past this many (a bound on memory, costing one store read).
const MAX_KNOWN_TAGS: usize = 65_536;

/// One cached entry as the near cache hands it out.
#[derive(Debug)]
pub(crate) struct NearEntry<V> {
    /// `None`: known absent (a negative entry).
    pub(crate) value: Option<Arc<V>>,
    pub(crate) fresh_until: Timestamp,
    pub(crate) stale_until: Timestamp,
    pub(crate) load_micros: u32,
    /// The entry's tags beyond its namespace, with the versions it was validated against.
    pub(crate) tags: Box<[(String, u64)]>,
}

impl<V> Clone for NearEntry<V> {
    fn clone(&self) -> Self {
        NearEntry {
            value: self.value.clone(),
            fresh_until: self.fresh_until,
            stale_until: self.stale_until,
            load_micros: self.load_micros,
            tags: self.tags.clone(),
        }
    }
}

/// What a lookup returns: the entry without its tags (checked already).
#[derive(Debug)]
pub(crate) struct NearHit<V> {
    pub(crate) value: Option<Arc<V>>,
    pub(crate) fresh_until: Timestamp,
    pub(crate) stale_until: Timestamp,
    pub(crate) load_micros: u32,
}

struct Slot<V> {
    key: Box<str>,
    hash: u64,
    id: u64,
    entry: NearEntry<V>,
    expires_at: Timestamp,
    size: usize,
    referenced: bool,
}

struct Shard<V> {
    table: HashTable<Slot<V>>,
    /// Insertion order for CLOCK: `(hash, id)`; positions of removed entries are skipped.
    ring: VecDeque<(u64, u64)>,
    bytes: usize,
    next_id: u64,
}

impl<V> Shard<V> {
    fn new() -> Self {
        Shard {
            table: HashTable::new(),
            ring: VecDeque::new(),
            bytes: 0,
            next_id: 0,
        }
    }

    fn remove(&mut self, hash: u64, key: &str) -> bool {
        match self.table.find_entry(hash, |s| &*s.key == key) {
            Ok(found) => {
                let (slot, _) = found.remove();
                self.bytes -= slot.size;
                true
            }
            Err(_) => false,
        }
    }

    fn clear(&mut self) {
        self.table.clear();
        self.ring.clear();
        self.bytes = 0;
    }

    fn retain(&mut self, mut keep: impl FnMut(&Slot<V>) -> bool) {
        let mut freed = 0;
        self.table.retain(|s| {
            let k = keep(s);
            if !k {
                freed += s.size;
            }
            k
        });
        self.bytes -= freed;
    }

    /// Evicts with CLOCK until `bytes ≤ budget`; returns how many entries went.
    fn evict_to(&mut self, budget: usize) -> u64 {
        let mut evicted = 0;
        while self.bytes > budget {
            let Some((hash, id)) = self.ring.pop_front() else {
                break;
            };
            let Ok(found) = self.table.find_entry(hash, |s| s.id == id) else {
                continue; // removed or replaced since
            };
            if found.get().referenced {
                let mut found = found;
                found.get_mut().referenced = false;
                self.ring.push_back((hash, id));
                continue;
            }
            let (slot, _) = found.remove();
            self.bytes -= slot.size;
            evicted += 1;
        }
        // Removed entries leave positions behind; rebuild the ring before it grows unbounded.
        if self.ring.len() > 2 * self.table.len() + 64 {
            self.ring = self.table.iter().map(|s| (s.hash, s.id)).collect();
        }
        evicted
    }
}

/// The near cache of one [`Cache`](crate::Cache), and its invalidation sink.
pub(crate) struct NearCache<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    shard_shift: u32,
    shard_budget: usize,
    max_ttl: Duration,
    hasher: foldhash::fast::RandomState,
    /// `"<namespace>:"`: the store-key prefix of this cache's keys.
    key_prefix: String,
    /// `"ns:<namespace>"`: the namespace's tag.
    namespace_tag: String,
    /// Whether the invalidation channel is live: the near cache is neither read nor filled
    /// while it is not.
    live: AtomicBool,
    /// The invalidation sequence; see the module docs.
    sequence: AtomicU64,
    key_slots: Box<[AtomicU64]>,
    broad: AtomicU64,
    /// The sequence number of the last tag invalidation (any tag), guarding `tags`.
    tag_changed: AtomicU64,
    /// Tag versions learned from the store, trusted while the channel is live and forgotten on
    /// each tag's invalidation. A `RwLock`: read on every tagged hit, written on a store read.
    /// Hashed with foldhash like the entries: it is looked up on every read of a namespace.
    /// Each with when it was learned: trusted for [`TAG_TRUST`] only.
    tags: RwLock<HashMap<String, (u64, Timestamp), foldhash::fast::RandomState>>,
    counters: Arc<CacheCounters>,
    /// The cache's single flights: every invalidation detaches the flights it concerns, so a
    /// caller after a change never joins a load that began before it.
    flights: Arc<Flights<V>>,
}

impl<V> std::fmt::Debug for NearCache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearCache")
            .field("namespace_tag", &self.namespace_tag)
            .field("shards", &self.shards.len())
            .field("shard_budget", &self.shard_budget)
            .field("max_ttl", &self.max_ttl)
            .field("live", &self.live.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a shard lock cannot leave a shard inconsistent in a way that
    // matters more than losing the cache; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<V: Send + Sync + 'static> NearCache<V> {
    pub(crate) fn new(
        namespace: &str,
        max_bytes: usize,
        max_ttl: Duration,
        counters: Arc<CacheCounters>,
        flights: Arc<Flights<V>>,
    ) -> Self {
        let parallelism = std::thread::available_parallelism().map_or(4, |n| n.get());
        let shards = (parallelism * 4).next_power_of_two().clamp(4, 64);
        NearCache {
            shards: (0..shards).map(|_| Mutex::new(Shard::new())).collect(),
            shard_shift: 64 - shards.trailing_zeros(),
            shard_budget: max_bytes / shards,
            max_ttl,
            hasher: foldhash::fast::RandomState::default(),
            key_prefix: format!("{namespace}:"),
            namespace_tag: format!("ns:{namespace}"),
            live: AtomicBool::new(false),
            sequence: AtomicU64::new(0),
            key_slots: (0..KEY_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            broad: AtomicU64::new(0),
            tag_changed: AtomicU64::new(0),
            tags: RwLock::new(HashMap::default()),
            counters,
            flights,
        }
    }

    pub(crate) fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    fn shard(&self, hash: u64) -> &Mutex<Shard<V>> {
        &self.shards[(hash >> self.shard_shift) as usize & (self.shards.len() - 1)]
    }

    fn key_slot(&self, hash: u64) -> &AtomicU64 {
        &self.key_slots[hash as usize & (KEY_SLOTS - 1)]
    }

    /// Whether the channel is live (the near cache in use).
    pub(crate) fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// A ticket to take before reading the store; see the module docs.
    pub(crate) fn ticket(&self) -> u64 {
        self.sequence.load(Ordering::SeqCst)
    }

    /// The entry at `key`, if present, not past its near-cache lifetime, and its tags current.
    pub(crate) fn get(&self, key: &str, hash: u64, now: Timestamp) -> Option<NearHit<V>> {
        if !self.is_live() {
            return None;
        }
        let mut shard = lock(self.shard(hash));
        let slot = shard.table.find_mut(hash, |s| &*s.key == key)?;
        if slot.expires_at <= now {
            shard.remove(hash, key);
            return None;
        }
        if !slot.entry.tags.is_empty() && !self.tags_current(&slot.entry.tags, now) {
            return None;
        }
        slot.referenced = true;
        let e = &slot.entry;
        Some(NearHit {
            value: e.value.clone(),
            fresh_until: e.fresh_until,
            stale_until: e.stale_until,
            load_micros: e.load_micros,
        })
    }

    fn tags_current(&self, tags: &[(String, u64)], now: Timestamp) -> bool {
        let known = self.tags.read().unwrap_or_else(|p| p.into_inner());
        tags.iter().all(|(t, v)| {
            known
                .get(t.as_str())
                .is_some_and(|&(k, learned)| k == *v && trusted(learned, now))
        })
    }

    /// Inserts `entry` unless an invalidation of `key` (or a broad one) arrived after `ticket`.
    /// `payload_len` is the encoded size, for the byte bound.
    pub(crate) fn insert(
        &self,
        ticket: u64,
        key: &str,
        hash: u64,
        entry: NearEntry<V>,
        payload_len: usize,
        now: Timestamp,
    ) {
        if !self.is_live() {
            return;
        }
        let expires_at = now.saturating_add(self.max_ttl).min(entry.stale_until);
        if expires_at <= now {
            return;
        }
        let tag_bytes: usize = entry.tags.iter().map(|(t, _)| t.len() + 8).sum();
        let size = key.len() + payload_len + tag_bytes + ENTRY_OVERHEAD;
        if size > self.shard_budget {
            return;
        }
        let mut shard = lock(self.shard(hash));
        if self.key_slot(hash).load(Ordering::SeqCst) > ticket
            || self.broad.load(Ordering::SeqCst) > ticket
            || !self.is_live()
        {
            return;
        }
        shard.remove(hash, key);
        let id = shard.next_id;
        shard.next_id += 1;
        shard.table.insert_unique(
            hash,
            Slot {
                key: key.into(),
                hash,
                id,
                entry,
                expires_at,
                size,
                referenced: false,
            },
            |s| s.hash,
        );
        shard.ring.push_back((hash, id));
        shard.bytes += size;
        let evicted = shard.evict_to(self.shard_budget);
        drop(shard);
        if evicted > 0 {
            self.counters
                .l1_evictions
                .fetch_add(evicted, Ordering::Relaxed);
        }
    }

    fn next_sequence(&self) -> u64 {
        self.sequence.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Drops `key` (a user key) and refuses late fills of it.
    pub(crate) fn invalidate_key(&self, key: &str) {
        let hash = self.hash(key);
        let s = self.next_sequence();
        self.key_slot(hash).fetch_max(s, Ordering::SeqCst);
        lock(self.shard(hash)).remove(hash, key);
        self.flights.detach(key);
    }

    /// Drops every entry and every known tag version, and refuses late fills.
    pub(crate) fn flush(&self) {
        let s = self.next_sequence();
        self.broad.fetch_max(s, Ordering::SeqCst);
        self.tag_changed.fetch_max(s, Ordering::SeqCst);
        self.tags.write().unwrap_or_else(|p| p.into_inner()).clear();
        for shard in self.shards.iter() {
            lock(shard).clear();
        }
        self.flights.detach_prefix("");
        CacheCounters::bump(&self.counters.l1_flushes);
    }

    fn invalidate_prefix(&self, user_prefix: &str) {
        let s = self.next_sequence();
        self.broad.fetch_max(s, Ordering::SeqCst);
        for shard in self.shards.iter() {
            lock(shard).retain(|slot| !slot.key.starts_with(user_prefix));
        }
        self.flights.detach_prefix(user_prefix);
    }

    fn forget_tag(&self, tag: &str) {
        let s = self.next_sequence();
        self.tag_changed.fetch_max(s, Ordering::SeqCst);
        self.tags
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tag);
        self.flights.detach_prefix("");
    }

    /// Whether a tag or namespace invalidation arrived (or the channel was lost, which may have
    /// hidden one) since `ticket` was taken.
    pub(crate) fn tag_changed_since(&self, ticket: u64) -> bool {
        self.tag_changed.load(Ordering::SeqCst) > ticket
    }

    /// The locally known version of `tag`, if the channel is live, it is known, and it was
    /// learned less than [`TAG_TRUST`] ago.
    pub(crate) fn known_tag(&self, tag: &str, now: Timestamp) -> Option<u64> {
        if !self.is_live() {
            return None;
        }
        self.tags
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tag)
            .filter(|&&(_, learned)| trusted(learned, now))
            .map(|&(v, _)| v)
    }

    /// Records tag versions read from the store after `ticket`, unless a tag changed since.
    pub(crate) fn learn_tags(
        &self,
        ticket: u64,
        tags: &[String],
        versions: &[u64],
        now: Timestamp,
    ) {
        if !self.is_live() {
            return;
        }
        let mut known = self.tags.write().unwrap_or_else(|p| p.into_inner());
        if self.tag_changed.load(Ordering::SeqCst) > ticket {
            return;
        }
        if known.len() + tags.len() > MAX_KNOWN_TAGS {
            known.clear();
        }
        for (t, v) in tags.iter().zip(versions) {
            known.insert(t.clone(), (*v, now));
        }
    }

    /// How many entries the near cache holds (tests, diagnostics).
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).table.len()).sum()
    }
}

/// How long a tag version learned from the store is trusted without asking again. The channel
/// reports every bump, so this is not about staleness: reading the store now and then renews
/// the tag's expiry there (a tag key that expired, or that an LRU evicted as idle because every
/// replica knew its version, comes back with a new random version, and replicas still trusting
/// the old one would void each other's fills until a flush).
pub(crate) const TAG_TRUST: std::time::Duration = std::time::Duration::from_secs(3600);

/// Whether a tag version learned at `learned` is still trusted at `now` (a clock stepped back
/// keeps it).
fn trusted(learned: Timestamp, now: Timestamp) -> bool {
    now < learned.saturating_add(TAG_TRUST)
}

impl<V: Send + Sync + 'static> InvalidationSink for NearCache<V> {
    fn on_invalidation(&self, message: &Invalidation) {
        CacheCounters::bump(&self.counters.invalidations_received);
        match message {
            Invalidation::Keys(keys) => {
                for key in keys {
                    if let Some(user_key) = key.strip_prefix(&self.key_prefix) {
                        self.invalidate_key(user_key);
                    }
                }
            }
            Invalidation::Tag(tag) if *tag == self.namespace_tag => self.flush(),
            Invalidation::Tag(tag) => self.forget_tag(tag),
            Invalidation::Prefix(prefix) => {
                if let Some(user_prefix) = prefix.strip_prefix(&self.key_prefix) {
                    self.invalidate_prefix(user_prefix);
                } else if self.key_prefix.starts_with(prefix.as_str()) {
                    self.flush();
                }
            }
            // `All` and any kind added later: drop everything rather than guess.
            _ => self.flush(),
        }
    }

    fn on_channel_down(&self) {
        self.live.store(false, Ordering::SeqCst);
        self.flush();
        tracing::warn!(
            namespace = %self.namespace_tag,
            "statehouse: cache invalidation channel lost; near cache flushed and bypassed"
        );
    }

    fn on_channel_up(&self) {
        self.flush();
        self.live.store(true, Ordering::SeqCst);
        tracing::debug!(
            namespace = %self.namespace_tag,
            "statehouse: cache invalidation channel live; near cache in use"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(v: u32, until: u64) -> NearEntry<u32> {
        NearEntry {
            value: Some(Arc::new(v)),
            fresh_until: Timestamp::from_micros(until),
            stale_until: Timestamp::from_micros(until),
            load_micros: 0,
            tags: Box::new([]),
        }
    }

    fn near(max_bytes: usize) -> NearCache<u32> {
        let n = NearCache::new(
            "ns",
            max_bytes,
            Duration::from_secs(60),
            Arc::default(),
            Arc::new(Flights::new()),
        );
        n.on_channel_up();
        n
    }

    const NOW: Timestamp = Timestamp::from_micros(1_000);

    #[test]
    fn a_fill_that_read_before_an_invalidation_is_refused() {
        let n = near(1 << 20);
        let h = n.hash("k");
        let ticket = n.ticket();
        n.on_invalidation(&Invalidation::Keys(vec!["ns:k".into()]));
        n.insert(ticket, "k", h, entry(1, 10_000), 1, NOW);
        assert!(n.get("k", h, NOW).is_none());
        let ticket = n.ticket();
        n.insert(ticket, "k", h, entry(2, 10_000), 1, NOW);
        assert_eq!(
            n.get("k", h, NOW).and_then(|e| e.value).as_deref(),
            Some(&2)
        );
    }

    #[test]
    fn entries_end_with_the_remote_entry_and_other_namespaces_are_ignored() {
        let n = near(1 << 20);
        let h = n.hash("k");
        n.insert(n.ticket(), "k", h, entry(1, 2_000), 1, NOW);
        assert!(n.get("k", h, Timestamp::from_micros(1_999)).is_some());
        assert!(n.get("k", h, Timestamp::from_micros(2_000)).is_none());
        n.insert(n.ticket(), "k", h, entry(1, 5_000), 1, NOW);
        n.on_invalidation(&Invalidation::Keys(vec!["other:k".into()]));
        assert!(n.get("k", h, NOW).is_some());
        n.on_invalidation(&Invalidation::Prefix("n".into()));
        assert!(n.get("k", h, NOW).is_none());
    }

    #[test]
    fn the_byte_bound_holds_and_evictions_are_counted() {
        let counters = Arc::new(CacheCounters::default());
        let n = NearCache::new(
            "ns",
            64 * 1024,
            Duration::from_secs(60),
            counters.clone(),
            Arc::new(Flights::new()),
        );
        n.on_channel_up();
        for i in 0..10_000u32 {
            let k = format!("key{i}");
            n.insert(n.ticket(), &k, n.hash(&k), entry(i, 10_000), 100, NOW);
        }
        let held: usize = n.shards.iter().map(|s| lock(s).bytes).sum();
        assert!(held <= 64 * 1024, "{held}");
        assert!(n.len() > 100);
        assert_eq!(
            counters.l1_evictions.load(Ordering::Relaxed) as usize + n.len(),
            10_000
        );
    }

    #[test]
    fn nothing_is_used_or_filled_while_the_channel_is_down() {
        let n = near(1 << 20);
        let h = n.hash("k");
        n.insert(n.ticket(), "k", h, entry(1, 10_000), 1, NOW);
        n.on_channel_down();
        assert!(n.get("k", h, NOW).is_none());
        n.insert(n.ticket(), "k", h, entry(1, 10_000), 1, NOW);
        n.on_channel_up();
        assert_eq!(n.len(), 0);
    }

    #[test]
    fn tagged_entries_need_their_tag_versions() {
        let n = near(1 << 20);
        let h = n.hash("k");
        let t = n.ticket();
        n.learn_tags(t, &["team".into()], &[7], NOW);
        let mut e = entry(1, 10_000);
        e.tags = Box::new([("team".into(), 7)]);
        n.insert(t, "k", h, e, 1, NOW);
        assert!(n.get("k", h, NOW).is_some());
        n.on_invalidation(&Invalidation::Tag("team".into()));
        assert!(n.get("k", h, NOW).is_none());
        // A version read before the bump is not learned after it.
        n.learn_tags(t, &["team".into()], &[7], NOW);
        assert_eq!(n.known_tag("team", NOW), None);
    }

    #[test]
    fn a_learned_tag_version_is_trusted_for_an_hour_only() {
        // A near-cache lifetime longer than the trust, to see the entry outlive it.
        let n = NearCache::new(
            "ns",
            1 << 20,
            Duration::from_secs(7200),
            Arc::default(),
            Arc::new(Flights::new()),
        );
        n.on_channel_up();
        let h = n.hash("k");
        n.learn_tags(n.ticket(), &["team".into()], &[7], NOW);
        let mut e = entry(1, 10_000_000_000);
        e.tags = Box::new([("team".into(), 7)]);
        n.insert(n.ticket(), "k", h, e, 1, NOW);
        let almost = NOW.saturating_add(TAG_TRUST - Duration::from_micros(1));
        assert_eq!(n.known_tag("team", almost), Some(7));
        assert!(n.get("k", h, almost).is_some());
        // Past the trust: asked of the store again (which renews the tag there).
        let past = NOW.saturating_add(TAG_TRUST);
        assert_eq!(n.known_tag("team", past), None);
        assert!(n.get("k", h, past).is_none());
        n.learn_tags(n.ticket(), &["team".into()], &[7], past);
        assert_eq!(n.known_tag("team", past), Some(7));
    }
}
