//! Many threads on one embedded cache: values are never torn or mixed between keys, the last
//! write of each key wins, one lease per key at a time, and the byte bound holds throughout.

use std::collections::HashSet;
use std::sync::{Barrier, Mutex};
use std::time::Duration;

use futures::executor::block_on;
use statehouse_core::cache::{CacheStore, LeaseOutcome};
use statehouse_core::{Clock, ManualClock};
use statehouse_embedded::EmbeddedCacheStore;

const THREADS: usize = 8;
const ROUNDS: usize = 300;
const KEYS_PER_THREAD: usize = 16;
const TTL: Duration = Duration::from_secs(600);

/// A value that names its key and round, padded to a size that varies with the round, so a
/// torn or misplaced value is recognisable.
fn value_for(key: &str, round: usize) -> Vec<u8> {
    let mut v = format!("{key}|{round}|").into_bytes();
    v.resize(v.len() + round % 97, b'#');
    v
}

fn parse(key: &str, value: &[u8]) -> usize {
    let text = std::str::from_utf8(value).expect("UTF-8 value");
    let mut parts = text.splitn(3, '|');
    assert_eq!(
        parts.next(),
        Some(key),
        "a value under the wrong key: {text:?}"
    );
    let round: usize = parts.next().and_then(|r| r.parse().ok()).expect("round");
    let pad = parts.next().expect("padding");
    assert!(
        pad.len() == round % 97 && pad.bytes().all(|b| b == b'#'),
        "torn: {text:?}"
    );
    round
}

#[test]
fn many_threads_setting_and_getting_stay_consistent() {
    let clock = ManualClock::starting_now();
    let cache = EmbeddedCacheStore::builder()
        .clock(clock)
        .build()
        .expect("valid store");
    let barrier = Barrier::new(THREADS);
    std::thread::scope(|s| {
        for thread in 0..THREADS {
            let (cache, barrier) = (&cache, &barrier);
            s.spawn(move || {
                barrier.wait();
                // What this thread last saw of each key of its neighbour: never goes back.
                let neighbour = (thread + 1) % THREADS;
                let mut seen = [0usize; KEYS_PER_THREAD];
                for round in 1..=ROUNDS {
                    for (k, last_seen) in seen.iter_mut().enumerate() {
                        let key = format!("t{thread}:k{k}");
                        assert!(
                            block_on(cache.set(&key, &value_for(&key, round), TTL, None))
                                .expect("set")
                        );
                        let own = block_on(cache.get(&key)).expect("get").expect("own write");
                        assert_eq!(parse(&key, &own), round, "read your own write");

                        let other = format!("t{neighbour}:k{k}");
                        if let Some(v) = block_on(cache.get(&other)).expect("get") {
                            let r = parse(&other, &v);
                            assert!(r >= *last_seen, "{other} went back from {last_seen} to {r}");
                            *last_seen = r;
                        }
                        // One key everybody writes.
                        let shared = value_for("shared", thread * ROUNDS + round);
                        block_on(cache.set("shared", &shared, TTL, None)).expect("set");
                        let v = block_on(cache.get("shared")).expect("get").expect("shared");
                        parse("shared", &v);
                    }
                }
            });
        }
    });
    for thread in 0..THREADS {
        for k in 0..KEYS_PER_THREAD {
            let key = format!("t{thread}:k{k}");
            let v = block_on(cache.get(&key)).expect("get").expect("value");
            assert_eq!(parse(&key, &v), ROUNDS, "the last write wins");
        }
    }
    assert_eq!(cache.stats().entries, THREADS * KEYS_PER_THREAD + 1);
    assert_eq!(cache.evictions(), 0);
}

#[test]
fn the_bound_holds_with_every_thread_writing() {
    let clock = ManualClock::starting_now();
    let cache = EmbeddedCacheStore::builder()
        .clock(clock)
        .max_bytes(2 * 1024 * 1024)
        .shards(2)
        .build()
        .expect("valid store");
    let barrier = Barrier::new(THREADS);
    std::thread::scope(|s| {
        for thread in 0..THREADS {
            let (cache, barrier) = (&cache, &barrier);
            s.spawn(move || {
                barrier.wait();
                for i in 0..2_000 {
                    let key = format!("t{thread}:{i}");
                    block_on(cache.set(&key, &value_for(&key, i), TTL, None)).expect("set");
                    if i % 7 == 0 {
                        block_on(cache.tag_versions(&[format!("tag{i}")])).expect("tags");
                    }
                    let stats = cache.stats();
                    assert!(stats.bytes <= stats.max_bytes, "{stats:?}");
                }
            });
        }
    });
    let stats = cache.stats();
    assert!(
        stats.evictions > 0 && stats.bytes <= stats.max_bytes,
        "{stats:?}"
    );
}

#[test]
fn one_lease_per_key_across_threads() {
    let clock = ManualClock::starting_now();
    let cache = EmbeddedCacheStore::builder()
        .clock(clock.clone())
        .build()
        .expect("valid store");
    let barrier = Barrier::new(THREADS);
    let winners = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            let (cache, barrier, winners, clock) = (&cache, &barrier, &winners, &clock);
            s.spawn(move || {
                barrier.wait();
                for k in 0..500 {
                    let key = format!("k{k}");
                    if let LeaseOutcome::Acquired(token) =
                        block_on(cache.acquire_lease(&key, clock.now(), TTL)).expect("lease")
                    {
                        winners.lock().expect("winners").push((key, token));
                    }
                }
            });
        }
    });
    let winners = winners.into_inner().expect("winners");
    let keys: HashSet<&str> = winners.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys.len(), 500, "every key's lease went to someone");
    assert_eq!(winners.len(), 500, "and to exactly one thread");
    for (key, token) in &winners {
        assert!(block_on(cache.set(key, b"filled", TTL, Some(token))).expect("fill"));
    }
}
