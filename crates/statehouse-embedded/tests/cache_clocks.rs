//! Leases when the caller's clock and the store's differ: the facade defaults to
//! `SystemClock`, this store to `MonotonicClock` (anchored to the wall clock once), so a wall
//! clock stepped by NTP puts them apart. A lease lasts its TTL by the store's clock, as a
//! Redis lease key's `PX` does, so fills keep working; who may take a lease over is decided
//! on the callers' clocks, as the Redis script does.

#![allow(clippy::unwrap_used)] // a test panics to fail

use std::time::Duration;

use futures::executor::block_on;
use statehouse_core::cache::{CacheStore, LeaseOutcome};
use statehouse_core::{Clock, ManualClock, Timestamp};
use statehouse_embedded::EmbeddedCacheStore;

const TTL: Duration = Duration::from_secs(5);

fn store(clock: &ManualClock) -> EmbeddedCacheStore {
    EmbeddedCacheStore::builder()
        .clock(clock.clone())
        .build()
        .unwrap()
}

fn lease(store: &EmbeddedCacheStore, key: &str, now: Timestamp) -> Option<String> {
    match block_on(store.acquire_lease(key, now, TTL)).unwrap() {
        LeaseOutcome::Acquired(token) => Some(token.as_str().to_owned()),
        LeaseOutcome::HeldElsewhere => None,
    }
}

#[test]
fn a_caller_behind_the_store_still_fills() {
    let store_clock = ManualClock::new(Timestamp::from_micros(1_800_000_000_000_000));
    let store = store(&store_clock);
    // The caller's wall clock was stepped back 10 s (twice the lease TTL).
    let caller = ManualClock::new(Timestamp::from_micros(1_800_000_000_000_000 - 10_000_000));
    let LeaseOutcome::Acquired(token) =
        block_on(store.acquire_lease("k", caller.now(), TTL)).unwrap()
    else {
        panic!("no lease on a fresh key");
    };
    assert!(
        block_on(store.set("k", b"v", Duration::from_secs(60), Some(&token))).unwrap(),
        "the fill is refused: the lease was judged expired on the wrong clock"
    );
    assert_eq!(
        block_on(store.get("k")).unwrap().as_deref(),
        Some(&b"v"[..])
    );
}

#[test]
fn a_lease_lasts_its_ttl_by_the_store_clock() {
    let store_clock = ManualClock::new(Timestamp::from_micros(1_800_000_000_000_000));
    let store = store(&store_clock);
    // The caller is 10 s ahead of the store.
    let caller = ManualClock::new(Timestamp::from_micros(1_800_000_000_000_000 + 10_000_000));
    let LeaseOutcome::Acquired(token) =
        block_on(store.acquire_lease("k", caller.now(), TTL)).unwrap()
    else {
        panic!("no lease on a fresh key");
    };
    // Held for another caller on the same clock until the holder's TTL has passed.
    assert_eq!(lease(&store, "k", caller.now()), None);
    store_clock.advance(TTL);
    caller.advance(TTL);
    // Expired by the store's clock: the fill is refused, and the key is free again.
    assert!(!block_on(store.set("k", b"late", Duration::from_secs(60), Some(&token))).unwrap());
    assert!(lease(&store, "k", caller.now()).is_some());
}
