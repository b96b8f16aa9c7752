//! One shard: a hash table of rate-limit states with expiry, a size cap and approximated
//! eviction.
//!
//! The table is a `hashbrown::HashTable` of [`Slot`]s rather than a `HashMap`: the store hashes a
//! key once (that hash also picks the shard), and the table takes that hash as given, looks up
//! with a borrowed [`EntryId`] (no allocation for a key already present), and lets eviction
//! sample buckets by index, which a `HashMap` cannot do without iterating from its start.

use std::mem;

use hashbrown::HashTable;
use statehouse_core::algorithm::{State, decide};
use statehouse_core::{Algorithm, Decision, Mode, Policy, Timestamp};

/// How many entries an eviction compares to pick the one closest to expiry. Redis samples 5 by
/// default (`maxmemory-samples`); a few more costs little here and picks better.
const EVICTION_SAMPLE: usize = 8;

/// A state left in a slot while `decide` runs on the taken-out one. If `decide` ever panicked
/// (it does not) the slot would keep this: `Tat(0)` reads as "no state" for every algorithm
/// (GCRA and the leaky bucket take `max(tat, now)`, the others ignore a foreign variant), so a
/// poisoned shard stays usable and is at worst more permissive for that one key.
const PLACEHOLDER: State = State::Tat(0);

/// The identity of one stored state, borrowed: the encoded key, the algorithm and the period
/// (the same identity as the Redis store's key), with its precomputed hash.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EntryId<'a> {
    pub(crate) hash: u64,
    pub(crate) key: &'a str,
    pub(crate) algorithm: Algorithm,
    pub(crate) period_us: u64,
}

/// One stored state and its identity.
#[derive(Debug)]
struct Slot {
    /// The full hash, kept so the table can grow without rehashing keys.
    hash: u64,
    key: StoredKey,
    algorithm: Algorithm,
    period_us: u64,
    /// From this time (µs) the state decides exactly like no state, and reads as absent.
    expires_at: u64,
    state: State,
}

impl Slot {
    fn is(&self, id: &EntryId<'_>) -> bool {
        self.hash == id.hash
            && self.period_us == id.period_us
            && self.algorithm == id.algorithm
            && self.key.as_bytes() == id.key.as_bytes()
    }

    fn is_expired(&self, now_us: u64) -> bool {
        self.expires_at <= now_us
    }
}

/// The longest encoded key kept inside its slot. With the length byte and the enum's tag, 38
/// bytes make a 40-byte `StoredKey` (a boxed slice with its tag would take 24), and cover the
/// digest form of hashed keys (`~` and 32 hex digits), IPv4 addresses and short user ids.
const INLINE_KEY_LEN: usize = 38;

/// An encoded key as stored. Short keys live inside the slot: comparing a key on lookup then
/// reads the cache lines the slot is already on, instead of following a pointer to a separate
/// allocation (profiling the governor comparison put a tenth of the time in that compare). The
/// key is only ever compared, never handed back, so bytes are enough.
#[derive(Debug)]
enum StoredKey {
    Inline {
        len: u8,
        bytes: [u8; INLINE_KEY_LEN],
    },
    Heap(Box<[u8]>),
}

impl StoredKey {
    fn new(key: &str) -> Self {
        let key = key.as_bytes();
        if key.len() <= INLINE_KEY_LEN {
            let mut bytes = [0; INLINE_KEY_LEN];
            bytes[..key.len()].copy_from_slice(key);
            StoredKey::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            StoredKey::Heap(key.into())
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            StoredKey::Inline { len, bytes } => &bytes[..usize::from(*len)],
            StoredKey::Heap(bytes) => bytes,
        }
    }
}

/// One shard of the store. Always used under its `Mutex`.
#[derive(Debug)]
pub(crate) struct Shard {
    table: HashTable<Slot>,
    /// The most entries this shard holds.
    cap: usize,
    /// xorshift64 state for picking eviction samples; never zero.
    rng: u64,
}

impl Shard {
    pub(crate) fn new(cap: usize, seed: u64) -> Self {
        Shard {
            table: HashTable::new(),
            cap,
            rng: seed | 1,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    /// Decides one check and applies its outcome: the fast path of a single-check call.
    ///
    /// A present but expired entry reads as absent, as the Redis key would have expired; it is
    /// overwritten in place if the check consumes, removed otherwise.
    pub(crate) fn apply(
        &mut self,
        id: &EntryId<'_>,
        policy: &Policy,
        cost: u64,
        mode: Mode,
        now: Timestamp,
    ) -> Decision {
        let now_us = now.as_micros();
        match self.table.find_entry(id.hash, |slot| slot.is(id)) {
            Ok(mut occupied) => {
                let slot = occupied.get_mut();
                let live = !slot.is_expired(now_us);
                // Taken out rather than cloned: a sliding log may hold up to 100 000 entries.
                let state = live.then(|| mem::replace(&mut slot.state, PLACEHOLDER));
                let step = decide(policy, state, now, cost, mode);
                match step.state {
                    Some(state) if step.changed => {
                        slot.state = state;
                        slot.expires_at = step.expires_at.as_micros();
                    }
                    // Unchanged (denied or peeked): the input state, a sliding log possibly
                    // pruned of entries that no longer count, which decides identically.
                    Some(state) if live => slot.state = state,
                    _ => {
                        occupied.remove();
                    }
                }
                step.decision
            }
            Err(_) => {
                let step = decide(policy, None, now, cost, mode);
                if step.changed
                    && let Some(state) = step.state
                {
                    self.insert_new(id, state, step.expires_at.as_micros(), now_us);
                }
                step.decision
            }
        }
    }

    /// The state stored for `id`, unless absent or expired at `now`.
    pub(crate) fn live_state(&self, id: &EntryId<'_>, now: Timestamp) -> Option<&State> {
        self.table
            .find(id.hash, |slot| slot.is(id))
            .filter(|slot| !slot.is_expired(now.as_micros()))
            .map(|slot| &slot.state)
    }

    /// Stores `state` for `id` until `expires_at`, replacing any state it had.
    pub(crate) fn write(
        &mut self,
        id: &EntryId<'_>,
        state: State,
        expires_at: Timestamp,
        now: Timestamp,
    ) {
        let expires_at = expires_at.as_micros();
        if let Some(slot) = self.table.find_mut(id.hash, |slot| slot.is(id)) {
            slot.state = state;
            slot.expires_at = expires_at;
        } else {
            self.insert_new(id, state, expires_at, now.as_micros());
        }
    }

    /// Removes the state of `id`; true if there was one.
    pub(crate) fn remove(&mut self, id: &EntryId<'_>) -> bool {
        match self.table.find_entry(id.hash, |slot| slot.is(id)) {
            Ok(occupied) => {
                occupied.remove();
                true
            }
            Err(_) => false,
        }
    }

    /// Removes every entry expired at `now`; returns how many.
    pub(crate) fn purge_expired(&mut self, now: Timestamp) -> usize {
        let before = self.table.len();
        let now_us = now.as_micros();
        self.table.retain(|slot| !slot.is_expired(now_us));
        before - self.table.len()
    }

    /// Inserts an entry known to be absent, first making room if the shard is full or its table
    /// is about to grow.
    ///
    /// Expired entries are reclaimed when they would cost memory, not sooner: a first version
    /// also swept a few buckets on every insert, but then a key whose state had expired between
    /// two of its requests (GCRA at 1000/s hit every few milliseconds, say) was removed and came
    /// back as a fresh insert and a fresh allocation; the benchmark against governor lost about
    /// a tenth of its throughput to that churn, and memory gained nothing, as the table never
    /// shrinks. An expired entry left in place is overwritten in place when its key returns.
    fn insert_new(&mut self, id: &EntryId<'_>, state: State, expires_at: u64, now_us: u64) {
        if self.table.len() >= self.cap {
            self.make_room(now_us);
        } else if self.table.len() == self.table.capacity() {
            // The insert would reallocate (or rehash in place): an O(capacity) step either way,
            // so a sweep of expired entries first costs no more, amortised, and may spare the
            // growth.
            self.table.retain(|slot| !slot.is_expired(now_us));
        }
        let slot = Slot {
            hash: id.hash,
            key: StoredKey::new(id.key),
            algorithm: id.algorithm,
            period_us: id.period_us,
            expires_at,
            state,
        };
        self.table.insert_unique(id.hash, slot, |slot| slot.hash);
    }

    /// Frees at least one place in a full shard, the way Redis's approximated eviction does:
    /// look at a sample of entries, drop the expired ones, and if none was expired, evict the one
    /// whose `expires_at` is earliest.
    ///
    /// Losing a state makes the limiter forget what that one key consumed (more permissive for
    /// it alone, never for other keys), and the entry closest to expiry is the one whose state
    /// was about to stop mattering anyway: it has the least left to forget.
    fn make_room(&mut self, now_us: u64) {
        let buckets = self.table.num_buckets();
        if buckets == 0 {
            return;
        }
        // The first EVICTION_SAMPLE occupied buckets from a random start. Bucket order is hash
        // order, so neighbouring buckets hold unrelated keys: a random sample in effect. When the
        // shard holds EVICTION_SAMPLE entries or fewer, the walk sees all of them, so the choice
        // is exact (and deterministic, which the tests rely on).
        let mut sample = [(0usize, 0u64); EVICTION_SAMPLE];
        let mut sampled = 0;
        let start = (self.next_random() % buckets as u64) as usize;
        for offset in 0..buckets {
            if sampled == EVICTION_SAMPLE {
                break;
            }
            let index = (start + offset) % buckets;
            if let Some(slot) = self.table.get_bucket(index) {
                sample[sampled] = (index, slot.expires_at);
                sampled += 1;
            }
        }
        let sample = &sample[..sampled];
        // Removing an entry leaves every other bucket index valid (hashbrown only marks the
        // bucket), so the remaining sampled indices can still be used.
        let mut freed = false;
        for &(index, expires_at) in sample {
            if expires_at <= now_us
                && let Ok(occupied) = self.table.get_bucket_entry(index)
            {
                occupied.remove();
                freed = true;
            }
        }
        if !freed
            && let Some(&(index, _)) = sample.iter().min_by_key(|&&(_, expires_at)| expires_at)
            && let Ok(occupied) = self.table.get_bucket_entry(index)
        {
            occupied.remove();
        }
    }

    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const T0: u64 = 1_700_000_000_000_000;

    /// Spreads test hashes like a real hasher would (splitmix64's finaliser).
    fn mix(i: u64) -> u64 {
        let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn id(key: &str, i: u64) -> EntryId<'_> {
        EntryId {
            hash: mix(i),
            key,
            algorithm: Algorithm::Gcra,
            period_us: 1_000_000,
        }
    }

    /// A million entries is the default bound: each byte of a slot is a megabyte of memory,
    /// and slots are what a lookup misses the cache on.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_slot_stays_small() {
        assert!(
            size_of::<Slot>() <= 104,
            "Slot is {} bytes",
            size_of::<Slot>()
        );
    }

    #[test]
    fn the_placeholder_decides_like_no_state_for_every_algorithm() {
        for algorithm in Algorithm::ALL {
            let policy = Policy::new(algorithm, 5, Duration::from_secs(1)).expect("policy");
            for mode in [Mode::Consume, Mode::Peek] {
                let now = Timestamp::from_micros(T0);
                let with = decide(&policy, Some(PLACEHOLDER), now, 2, mode);
                let without = decide(&policy, None, now, 2, mode);
                assert_eq!(with.decision, without.decision, "{algorithm}");
                assert_eq!(with.expires_at, without.expires_at, "{algorithm}");
            }
        }
    }

    #[test]
    fn sampled_eviction_prefers_entries_close_to_expiry() {
        let mut shard = Shard::new(1000, 7);
        let keys: Vec<String> = (0..1100).map(|i| format!("k{i}")).collect();
        let now = Timestamp::from_micros(T0);
        // Entry i expires i µs after T0 + 1 s: the rank of its expiry is i.
        for (i, key) in keys.iter().enumerate().take(1000) {
            let expires_at = Timestamp::from_micros(T0 + 1_000_000 + i as u64);
            shard.write(&id(key, i as u64), State::Tat(0), expires_at, now);
        }
        assert_eq!(shard.len(), 1000);
        let late = Timestamp::from_micros(T0 + 10_000_000);
        for (i, key) in keys.iter().enumerate().skip(1000) {
            shard.write(&id(key, i as u64), State::Tat(0), late, now);
        }
        assert_eq!(shard.len(), 1000);
        let evicted: Vec<usize> = (0..1000)
            .filter(|&i| shard.live_state(&id(&keys[i], i as u64), now).is_none())
            .collect();
        assert_eq!(evicted.len(), 100);
        // The minimum of 8 samples lies in the earliest half with probability 1 - 2^-8.
        let early = evicted.iter().filter(|&&i| i < 500).count();
        assert!(
            early >= 95,
            "only {early} of 100 evictions in the earliest half"
        );
    }

    #[test]
    fn a_table_about_to_grow_first_drops_expired_entries() {
        let mut shard = Shard::new(1_000_000, 7);
        let keys: Vec<String> = (0..2000).map(|i| format!("k{i}")).collect();
        let now = Timestamp::from_micros(T0);
        let soon = Timestamp::from_micros(T0 + 1);
        shard.write(&id(&keys[0], 0), State::Tat(0), soon, now);
        let mut i = 1;
        while shard.len() < shard.table.capacity() {
            shard.write(&id(&keys[i], i as u64), State::Tat(0), soon, now);
            i += 1;
        }
        let buckets = shard.table.num_buckets();
        let later = Timestamp::from_micros(T0 + 1);
        shard.write(&id(&keys[i], i as u64), State::Tat(0), soon, later);
        assert_eq!(
            shard.len(),
            1,
            "the expired entries were swept instead of growing"
        );
        assert_eq!(shard.table.num_buckets(), buckets);
    }
}
