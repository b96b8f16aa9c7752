//! The embedded cache's memory bound: bytes never exceed it under churn, evictions are counted,
//! expired values and leases are reclaimed before anything live is evicted, recently read
//! entries outlive cold ones, and leases and tags are bounded like values.

use std::time::Duration;

use futures::executor::block_on;
use statehouse_core::cache::{CacheStore, LeaseOutcome};
use statehouse_core::{Clock, ManualClock};
use statehouse_embedded::{ENTRY_OVERHEAD_BYTES, EmbeddedCacheStore};

const MIB: usize = 1024 * 1024;
const TTL: Duration = Duration::from_secs(600);

fn store(clock: &ManualClock, max_bytes: usize, shards: usize) -> EmbeddedCacheStore {
    EmbeddedCacheStore::builder()
        .clock(clock.clone())
        .max_bytes(max_bytes)
        .shards(shards)
        .build()
        .expect("valid store")
}

/// A small deterministic generator (xorshift64*), so runs are reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn bytes_never_exceed_the_bound_under_churn() {
    let clock = ManualClock::starting_now();
    let cache = store(&clock, 4 * MIB, 4);
    assert_eq!(cache.max_bytes(), 4 * MIB);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut written = 0u64;
    for i in 0..20_000u64 {
        let key = format!("key:{i}");
        let len = rng.below(4096) as usize;
        let value = vec![(i % 251) as u8; len];
        assert!(block_on(cache.set(&key, &value, TTL, None)).expect("set"));
        written += 1;
        let stats = cache.stats();
        assert!(
            stats.bytes <= stats.max_bytes,
            "after {i} writes: {stats:?}"
        );
    }
    let stats = cache.stats();
    assert!(stats.evictions > 0, "{stats:?}");
    // Every key was new and nothing expired: each write added one entry, each eviction
    // removed one.
    assert_eq!(stats.entries as u64 + stats.evictions, written, "{stats:?}");
    // The bound was used, not just respected: the last shard fills were near the cap.
    assert!(stats.bytes > 3 * MIB, "{stats:?}");
    // What survived reads back intact; the newest key certainly survived.
    let last = block_on(cache.get("key:19999"))
        .expect("get")
        .expect("newest key");
    assert!(last.iter().all(|&b| b == (19_999 % 251) as u8));
}

#[test]
fn overwrites_and_deletes_keep_the_count_exact() {
    let clock = ManualClock::starting_now();
    let cache = store(&clock, 64 * MIB, 1);
    block_on(cache.set("k", &[0; 1000], TTL, None)).expect("set");
    assert_eq!(cache.stats().bytes, ENTRY_OVERHEAD_BYTES + 1 + 1000);
    block_on(cache.set("k", &[0; 10], TTL, None)).expect("overwrite");
    assert_eq!(cache.stats().bytes, ENTRY_OVERHEAD_BYTES + 1 + 10);
    let LeaseOutcome::Acquired(token) =
        block_on(cache.acquire_lease("k", clock.now(), TTL)).expect("lease")
    else {
        panic!("lease held")
    };
    assert_eq!(cache.stats().bytes, ENTRY_OVERHEAD_BYTES + 1 + 10 + 32);
    assert!(block_on(cache.release_lease("k", &token)).expect("release"));
    assert_eq!(cache.stats().bytes, ENTRY_OVERHEAD_BYTES + 1 + 10);
    block_on(cache.tag_versions(&["tag".into()])).expect("tags");
    assert_eq!(
        cache.stats().bytes,
        2 * ENTRY_OVERHEAD_BYTES + 1 + 10 + 3 + 8
    );
    assert!(block_on(cache.delete("k")).expect("delete"));
    assert_eq!(
        block_on(cache.purge_prefix("")).expect("purge"),
        0,
        "tags are not keys"
    );
    let stats = cache.stats();
    assert_eq!(
        (stats.entries, stats.bytes),
        (1, ENTRY_OVERHEAD_BYTES + 3 + 8)
    );
    assert_eq!(stats.evictions, 0);
}

#[test]
fn expired_entries_go_before_any_live_one_is_evicted() {
    let clock = ManualClock::starting_now();
    let cache = store(&clock, MIB, 1);
    let value = vec![7u8; 1000];
    let per_entry = ENTRY_OVERHEAD_BYTES + "short:000".len() + value.len();
    let fit = MIB / per_entry;
    for i in 0..fit {
        block_on(cache.set(
            &format!("short:{i:03}"),
            &value,
            Duration::from_secs(1),
            None,
        ))
        .expect("set");
    }
    assert_eq!(cache.evictions(), 0);
    clock.advance(Duration::from_secs(1));
    for i in 0..fit {
        block_on(cache.set(&format!("long_:{i:03}"), &value, TTL, None)).expect("set");
    }
    assert_eq!(cache.evictions(), 0, "expired entries made the room");
    for i in 0..fit {
        assert!(
            block_on(cache.get(&format!("long_:{i:03}")))
                .expect("get")
                .is_some(),
            "long_:{i:03}"
        );
    }
    assert_eq!(cache.stats().entries, fit);
}

#[test]
fn expired_values_and_leases_are_reclaimed_without_pressure() {
    let clock = ManualClock::starting_now();
    let cache = store(&clock, 64 * MIB, 1);
    for i in 0..1000 {
        block_on(cache.set(&format!("v{i}"), b"x", Duration::from_secs(1), None)).expect("set");
        let outcome =
            block_on(cache.acquire_lease(&format!("l{i}"), clock.now(), Duration::from_secs(2)))
                .expect("lease");
        assert!(matches!(outcome, LeaseOutcome::Acquired(_)));
    }
    assert_eq!(cache.stats().entries, 2000);
    clock.advance(Duration::from_secs(1));
    // Any operation on the shard reclaims what expired by then: the values, not the leases.
    assert_eq!(block_on(cache.get("unrelated")).expect("get"), None);
    assert_eq!(cache.stats().entries, 1000);
    clock.advance(Duration::from_secs(1));
    assert_eq!(cache.purge_expired(), 1000);
    let stats = cache.stats();
    assert_eq!((stats.entries, stats.bytes, stats.evictions), (0, 0, 0));
}

#[test]
fn a_lease_expired_by_the_store_clock_cannot_fill() {
    let clock = ManualClock::starting_now();
    let cache = store(&clock, 64 * MIB, 1);
    let LeaseOutcome::Acquired(token) =
        block_on(cache.acquire_lease("k", clock.now(), Duration::from_secs(5))).expect("lease")
    else {
        panic!("lease held")
    };
    clock.advance(Duration::from_secs(5) - Duration::from_micros(1));
    let LeaseOutcome::Acquired(second) =
        block_on(cache.acquire_lease("k2", clock.now(), Duration::from_secs(5))).expect("lease")
    else {
        panic!("lease held")
    };
    assert!(block_on(cache.set("k2", b"v", TTL, Some(&second))).expect("fill"));
    clock.advance(Duration::from_micros(1));
    assert!(!block_on(cache.set("k", b"v", TTL, Some(&token))).expect("fill"));
    assert!(!block_on(cache.release_lease("k", &token)).expect("release"));
    assert_eq!(block_on(cache.get("k")).expect("get"), None);
}

#[test]
fn recently_read_entries_outlive_cold_ones() {
    let clock = ManualClock::starting_now();
    let cache = store(&clock, MIB, 1);
    let value = vec![1u8; 900];
    let hot: Vec<String> = (0..20).map(|i| format!("hot:{i}")).collect();
    for key in &hot {
        block_on(cache.set(key, &value, TTL, None)).expect("set");
    }
    // Ten times the cache's capacity of cold writes, the hot keys read all along.
    for i in 0..10_000 {
        block_on(cache.set(&format!("cold:{i}"), &value, TTL, None)).expect("set");
        let key = &hot[i % hot.len()];
        assert!(
            block_on(cache.get(key)).expect("get").is_some(),
            "{key} was evicted after {i} cold writes"
        );
    }
    assert!(cache.evictions() > 9_000, "{:?}", cache.stats());
    assert_eq!(
        block_on(cache.get("cold:0")).expect("get"),
        None,
        "cold and old"
    );
}

#[test]
fn leases_and_tags_are_bounded_like_values() {
    let clock = ManualClock::starting_now();
    let cache = store(&clock, MIB, 1);
    for i in 0..20_000 {
        let outcome =
            block_on(cache.acquire_lease(&format!("lease:{i}"), clock.now(), TTL)).expect("lease");
        assert!(matches!(outcome, LeaseOutcome::Acquired(_)));
        let stats = cache.stats();
        assert!(stats.bytes <= stats.max_bytes, "{stats:?}");
    }
    let first_tag = block_on(cache.tag_versions(&["tag:0".into()])).expect("tags")[0];
    for i in 1..20_000 {
        block_on(cache.tag_versions(&[format!("tag:{i}")])).expect("tags");
        let stats = cache.stats();
        assert!(stats.bytes <= stats.max_bytes, "{stats:?}");
    }
    assert!(cache.evictions() > 20_000, "{:?}", cache.stats());
    // tag:0 was evicted long ago: it comes back with a new random version, never the old one.
    let again = block_on(cache.tag_versions(&["tag:0".into()])).expect("tags")[0];
    assert_ne!(again, first_tag);
    assert_ne!(again, 0);
}

#[test]
fn a_value_larger_than_a_shard_is_dropped_like_an_eviction() {
    let clock = ManualClock::starting_now();
    let cache = store(&clock, 4 * MIB, 4);
    assert_eq!(cache.max_entry_bytes(), MIB);
    block_on(cache.set("k", b"old", TTL, None)).expect("set");
    let LeaseOutcome::Acquired(token) =
        block_on(cache.acquire_lease("k", clock.now(), TTL)).expect("lease")
    else {
        panic!("lease held")
    };
    let fits = vec![0u8; MIB - ENTRY_OVERHEAD_BYTES - 1];
    let too_big = vec![0u8; MIB - ENTRY_OVERHEAD_BYTES];
    assert!(block_on(cache.set("k", &too_big, TTL, None)).expect("set"));
    assert_eq!(
        block_on(cache.get("k")).expect("get"),
        None,
        "the old value is gone too"
    );
    assert_eq!(cache.evictions(), 1);
    assert!(
        !block_on(cache.set("k", b"stale", TTL, Some(&token))).expect("fill"),
        "the write voided the lease"
    );
    assert!(block_on(cache.set("k", &fits, TTL, None)).expect("set"));
    assert_eq!(
        block_on(cache.get("k")).expect("get").map(|v| v.len()),
        Some(fits.len())
    );
    let stats = cache.stats();
    assert!(stats.bytes <= stats.max_bytes, "{stats:?}");
}

#[test]
fn the_builder_rejects_bad_settings_and_fits_shards_to_the_bound() {
    assert!(EmbeddedCacheStore::builder().max_bytes(0).build().is_err());
    assert!(EmbeddedCacheStore::builder().shards(0).build().is_err());
    let too_many = EmbeddedCacheStore::builder().shards(1 << 17).build();
    assert!(too_many.is_err_and(|e| e.is_invalid_input()));
    let small = EmbeddedCacheStore::builder()
        .max_bytes(3 * MIB)
        .build()
        .expect("valid");
    assert_eq!(small.shards(), 2);
    assert_eq!(small.max_entry_bytes(), 3 * MIB / 2);
    let tiny = EmbeddedCacheStore::builder()
        .max_bytes(1000)
        .build()
        .expect("valid");
    assert_eq!((tiny.shards(), tiny.max_bytes()), (1, 1000));
    let default = EmbeddedCacheStore::new();
    assert_eq!(default.shards(), 64);
    assert_eq!(default.max_bytes(), 256 * MIB);
    let odd = EmbeddedCacheStore::builder()
        .shards(5)
        .build()
        .expect("valid");
    assert_eq!(odd.shards(), 8);
}

#[test]
fn a_tiny_cache_stays_within_its_bound_and_still_answers() {
    let clock = ManualClock::starting_now();
    let cache = store(&clock, 300, 1);
    for i in 0..100 {
        assert!(block_on(cache.set(&format!("k{i}"), b"value", TTL, None)).expect("set"));
        block_on(cache.tag_versions(&["t".into()])).expect("tag");
        block_on(cache.acquire_lease(&format!("l{i}"), clock.now(), TTL)).expect("lease");
        let stats = cache.stats();
        assert!(stats.bytes <= 300, "{stats:?}");
    }
    // Two entries fit at most; the one written last is never the victim of its own write.
    assert!(cache.stats().entries <= 2);
    assert!(cache.evictions() >= 200, "{:?}", cache.stats());
    assert_eq!(
        block_on(cache.acquire_lease("l99", clock.now(), TTL)).expect("lease"),
        LeaseOutcome::HeldElsewhere
    );
}
