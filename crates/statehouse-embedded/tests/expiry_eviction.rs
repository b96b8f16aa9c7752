//! Expiry, reclamation, the bound on entries, eviction and the builder's checks.

use std::time::Duration;

use statehouse_core::algorithm::decide;
use statehouse_core::{Error, ManualClock, Mode, Policy, Timestamp};
use statehouse_embedded::{EmbeddedStore, MAX_SHARDS};

const T0: u64 = 1_700_000_000_000_000;

fn store(clock: &ManualClock, shards: usize, max_entries: usize) -> EmbeddedStore {
    EmbeddedStore::builder()
        .clock(clock.clone())
        .shards(shards)
        .max_entries(max_entries)
        .build()
        .expect("valid store")
}

fn clock() -> ManualClock {
    ManualClock::new(Timestamp::from_micros(T0))
}

#[test]
fn an_entry_reads_as_absent_from_its_expiry_and_is_removed_when_read() {
    let clock = clock();
    let store = store(&clock, 4, 1000);
    // GCRA 10 per second: one unit keeps the state for 100 ms.
    let policy = Policy::gcra(10, Duration::from_secs(1)).expect("policy");
    store
        .check_one("k", &policy, 1, Mode::Consume)
        .expect("check");
    assert_eq!(store.len(), 1);

    clock.advance(Duration::from_micros(99_999));
    let d = store.check_one("k", &policy, 1, Mode::Peek).expect("peek");
    assert_eq!(
        d.remaining, 8,
        "one microsecond before expiry the state still counts"
    );
    assert_eq!(store.len(), 1);

    clock.advance(Duration::from_micros(1));
    let d = store.check_one("k", &policy, 1, Mode::Peek).expect("peek");
    let fresh = decide(
        &policy,
        None,
        Timestamp::from_micros(T0 + 100_000),
        1,
        Mode::Peek,
    );
    assert_eq!(d, fresh.decision);
    assert_eq!(store.len(), 0, "reading an expired entry reclaims it");
}

#[test]
fn purge_expired_removes_exactly_the_expired_entries() {
    let clock = clock();
    let store = store(&clock, 8, 10_000);
    let short = Policy::fixed_window(5, Duration::from_secs(1)).expect("policy");
    let long = Policy::fixed_window(5, Duration::from_secs(3600)).expect("policy");
    for i in 0..300 {
        let policy = if i % 3 == 0 { &long } else { &short };
        store
            .check_one(&format!("k{i}"), policy, 1, Mode::Consume)
            .expect("check");
    }
    assert_eq!(store.len(), 300);
    assert_eq!(store.purge_expired(), 0);
    clock.advance(Duration::from_secs(1));
    assert_eq!(store.purge_expired(), 200);
    assert_eq!(store.len(), 100);
    assert_eq!(store.purge_expired(), 0);
}

#[test]
fn inserts_reclaim_expired_entries_before_the_table_grows() {
    let clock = clock();
    let store = store(&clock, 1, 100_000);
    let short = Policy::gcra(10, Duration::from_secs(1)).expect("policy");
    let long = Policy::gcra(10, Duration::from_secs(3600)).expect("policy");
    for i in 0..200 {
        store
            .check_one(&format!("old{i}"), &short, 1, Mode::Consume)
            .expect("check");
    }
    clock.advance(Duration::from_secs(1));
    for i in 0..400 {
        store
            .check_one(&format!("new{i}"), &long, 1, Mode::Consume)
            .expect("check");
    }
    // Nothing read the old keys again: the table, grown past 224 entries, swept them first.
    assert_eq!(store.len(), 400);
    assert_eq!(store.purge_expired(), 0);
}

#[test]
fn len_stays_within_max_entries_under_ten_times_as_many_keys() {
    let clock = clock();
    let store = store(&clock, 8, 1000);
    assert_eq!(store.max_entries(), 1000);
    let policy = Policy::gcra(100, Duration::from_secs(3600)).expect("policy");
    for i in 0..10_000 {
        let d = store
            .check_one(&format!("key-{i}"), &policy, 1, Mode::Consume)
            .expect("check");
        assert!(d.allowed);
        if i % 97 == 0 {
            assert!(store.len() <= 1000, "len {} after {i} keys", store.len());
        }
        if i % 11 == 0 {
            clock.advance(Duration::from_millis(1));
        }
    }
    assert!(store.len() <= 1000);
    assert!(store.len() >= 900, "shards fill up: len {}", store.len());
}

#[test]
fn a_full_shard_evicts_the_entry_closest_to_expiry() {
    let clock = clock();
    let store = store(&clock, 1, 4);
    // GCRA 10 per 10 s: each unit of cost keeps the state one more second.
    let policy = Policy::gcra(10, Duration::from_secs(10)).expect("policy");
    for (key, cost) in [("a", 3), ("b", 1), ("c", 4), ("d", 2)] {
        store
            .check_one(key, &policy, cost, Mode::Consume)
            .expect("check");
    }
    assert_eq!(store.len(), 4);

    let remaining = |key: &str| {
        store
            .check_one(key, &policy, 1, Mode::Peek)
            .expect("peek")
            .remaining
    };
    store
        .check_one("e", &policy, 5, Mode::Consume)
        .expect("check");
    assert_eq!(store.len(), 4);
    assert_eq!(
        remaining("b"),
        9,
        "b expired soonest and was evicted: it starts afresh"
    );
    assert_eq!(
        [
            remaining("a"),
            remaining("c"),
            remaining("d"),
            remaining("e")
        ],
        [6, 5, 7, 4]
    );

    store
        .check_one("f", &policy, 6, Mode::Consume)
        .expect("check");
    assert_eq!(remaining("d"), 9, "then d");
    assert_eq!([remaining("a"), remaining("c"), remaining("e")], [6, 5, 4]);
    assert_eq!(store.len(), 4);
}

#[test]
fn a_full_shard_drops_an_expired_entry_before_evicting_a_live_one() {
    let clock = clock();
    let store = store(&clock, 1, 3);
    let brief = Policy::fixed_window(5, Duration::from_millis(10)).expect("policy");
    let long = Policy::gcra(10, Duration::from_secs(10)).expect("policy");
    // Aligned so the brief window ends 10 ms from now.
    clock.set(Timestamp::from_micros(T0 - T0 % 10_000));
    store
        .check_one("brief", &brief, 1, Mode::Consume)
        .expect("check");
    store
        .check_one("x", &long, 1, Mode::Consume)
        .expect("check");
    store
        .check_one("y", &long, 2, Mode::Consume)
        .expect("check");
    clock.advance(Duration::from_millis(10));
    store
        .check_one("z", &long, 3, Mode::Consume)
        .expect("check");
    assert_eq!(store.len(), 3);
    let remaining = |key: &str| {
        store
            .check_one(key, &long, 1, Mode::Peek)
            .expect("peek")
            .remaining
    };
    // x would expire first among the live ones; it is kept because `brief` had expired
    // (evicted, x would peek 9).
    assert_eq!([remaining("x"), remaining("y"), remaining("z")], [8, 7, 6]);
}

#[test]
fn builder_rejects_zero_and_names_the_field() {
    let err = EmbeddedStore::builder()
        .shards(0)
        .build()
        .expect_err("zero shards");
    assert!(matches!(err, Error::InvalidInput(_)));
    assert!(err.to_string().contains("`shards`"), "{err}");

    let err = EmbeddedStore::builder()
        .max_entries(0)
        .build()
        .expect_err("zero max_entries");
    assert!(matches!(err, Error::InvalidInput(_)));
    assert!(err.to_string().contains("`max_entries`"), "{err}");

    let err = EmbeddedStore::builder()
        .shards(MAX_SHARDS + 1)
        .build()
        .expect_err("too many shards");
    assert!(err.to_string().contains("`shards`"), "{err}");
    // usize::MAX would overflow next_power_of_two: rejected, not a panic.
    assert!(EmbeddedStore::builder().shards(usize::MAX).build().is_err());
}

#[test]
fn builder_rounds_shards_to_a_power_of_two_within_max_entries() {
    let build = |shards, max| {
        EmbeddedStore::builder()
            .shards(shards)
            .max_entries(max)
            .build()
            .expect("valid")
    };
    assert_eq!(build(3, 1000).shards(), 4);
    assert_eq!(build(64, 1000).shards(), 64);
    assert_eq!(build(MAX_SHARDS, 1 << 20).shards(), MAX_SHARDS);
    // Fewer entries than shards: fewer shards, so the bound holds.
    let small = build(64, 10);
    assert_eq!(small.shards(), 8);
    assert_eq!(small.max_entries(), 8);
    assert_eq!(build(64, 1).max_entries(), 1);
    let d = EmbeddedStore::default();
    assert_eq!((d.shards(), d.max_entries()), (64, 1_000_000));
}

#[test]
fn one_entry_store_keeps_the_latest_key() {
    let clock = clock();
    let store = store(&clock, 1, 1);
    let policy = Policy::fixed_window(1, Duration::from_secs(60)).expect("policy");
    assert!(
        store
            .check_one("a", &policy, 1, Mode::Consume)
            .expect("a")
            .allowed
    );
    assert!(
        store
            .check_one("b", &policy, 1, Mode::Consume)
            .expect("b")
            .allowed
    );
    assert_eq!(store.len(), 1);
    assert!(
        !store
            .check_one("b", &policy, 1, Mode::Consume)
            .expect("b")
            .allowed
    );
}
