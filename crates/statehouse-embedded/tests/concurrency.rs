//! Concurrent checks at a frozen clock admit exactly what one caller checking in sequence would.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use futures::executor::block_on;
use statehouse_core::algorithm::decide;
use statehouse_core::{
    Algorithm, LimitCheck, ManualClock, Mode, Policy, RateLimitStore, Timestamp,
};
use statehouse_embedded::EmbeddedStore;

const THREADS: u64 = 8;
const CHECKS_PER_THREAD: u64 = 1_000;
const T0: u64 = 1_700_000_000_000_000;

fn frozen_store(shards: usize) -> EmbeddedStore {
    EmbeddedStore::builder()
        .clock(ManualClock::new(Timestamp::from_micros(T0)))
        .shards(shards)
        .build()
        .expect("valid store")
}

/// How many of `attempts` single-unit checks a sequential caller gets admitted at `T0`.
fn sequential_admissions(policy: &Policy, attempts: u64) -> u64 {
    let mut state = None;
    let mut admitted = 0;
    for _ in 0..attempts {
        let step = decide(
            policy,
            state.take(),
            Timestamp::from_micros(T0),
            1,
            Mode::Consume,
        );
        admitted += u64::from(step.decision.allowed);
        state = step.state;
    }
    admitted
}

#[test]
fn eight_threads_on_one_fixed_window_key_admit_exactly_the_limit() {
    let store = frozen_store(64);
    let policy = Arc::new(Policy::fixed_window(500, Duration::from_secs(60)).expect("policy"));
    let admitted = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let (store, policy, admitted) = (store.clone(), policy.clone(), admitted.clone());
            thread::spawn(move || {
                for _ in 0..CHECKS_PER_THREAD {
                    let checks = [LimitCheck::new("hot key", &policy, 1)];
                    let verdict = block_on(store.check(&checks, Mode::Consume)).expect("check");
                    if verdict.allowed() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    assert_eq!(admitted.load(Ordering::Relaxed), 500);
}

#[test]
fn every_algorithm_admits_under_contention_what_it_admits_in_sequence() {
    for algorithm in Algorithm::ALL {
        let store = frozen_store(4);
        let policy = Arc::new(Policy::new(algorithm, 300, Duration::from_secs(60)).expect("p"));
        let expected = sequential_admissions(&policy, THREADS * CHECKS_PER_THREAD);
        let admitted = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let (store, policy, admitted) = (store.clone(), policy.clone(), admitted.clone());
                thread::spawn(move || {
                    for _ in 0..CHECKS_PER_THREAD {
                        let d = store
                            .check_one("k", &policy, 1, Mode::Consume)
                            .expect("check");
                        if d.allowed {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        assert_eq!(admitted.load(Ordering::Relaxed), expected, "{algorithm}");
    }
}

/// Batches that name the same keys in different orders lock their shards in one global order,
/// so they cannot deadlock (this test would hang), and stay all-or-nothing: every key's count
/// equals the number of admitted batches that named it.
#[test]
fn overlapping_batches_in_any_order_neither_deadlock_nor_overcount() {
    let store = frozen_store(8);
    let policy = Arc::new(Policy::fixed_window(200, Duration::from_secs(60)).expect("policy"));
    let keys: Arc<Vec<String>> = Arc::new((0..6).map(|i| format!("k{i}")).collect());
    let per_key = Arc::new((0..6).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
    let handles: Vec<_> = (0..THREADS as usize)
        .map(|t| {
            let (store, policy, keys, per_key) =
                (store.clone(), policy.clone(), keys.clone(), per_key.clone());
            thread::spawn(move || {
                for n in 0..CHECKS_PER_THREAD as usize {
                    // Three distinct keys, in an order that differs by thread and iteration.
                    let picked = [(t + n) % 6, (t + 2 * n + 1) % 6, (5 * t + n + 3) % 6];
                    let mut chosen: Vec<usize> = Vec::new();
                    for k in picked {
                        if !chosen.contains(&k) {
                            chosen.push(k);
                        }
                    }
                    if t % 2 == 1 {
                        chosen.reverse();
                    }
                    let checks: Vec<_> = chosen
                        .iter()
                        .map(|&k| LimitCheck::new(&keys[k], &policy, 1))
                        .collect();
                    let verdict = store.check_sync(&checks, Mode::Consume).expect("batch");
                    if verdict.allowed() {
                        for &k in &chosen {
                            per_key[k].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    for (k, key) in keys.iter().enumerate() {
        let counted = per_key[k].load(Ordering::Relaxed);
        assert!(counted <= 200, "{key}: {counted}");
        let left = store.check_one(key, &policy, 1, Mode::Peek).expect("peek");
        let remaining = if left.allowed { left.remaining + 1 } else { 0 };
        assert_eq!(200 - remaining, counted, "{key}");
    }
}
