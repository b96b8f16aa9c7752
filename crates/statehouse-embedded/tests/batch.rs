//! Several limits checked together: all or nothing.

use std::time::Duration;

use futures::executor::block_on;
use statehouse_core::{Error, LimitCheck, ManualClock, Mode, Policy, RateLimitStore, Timestamp};
use statehouse_embedded::EmbeddedStore;

fn store() -> EmbeddedStore {
    EmbeddedStore::builder()
        .clock(ManualClock::new(Timestamp::from_micros(
            1_700_000_000_000_000,
        )))
        .build()
        .expect("valid store")
}

fn remaining(store: &EmbeddedStore, key: &str, policy: &Policy) -> u64 {
    store
        .check_one(key, policy, 1, Mode::Peek)
        .expect("peek")
        .remaining
        + 1
}

#[test]
fn a_denial_on_one_limit_consumes_none_of_the_others() {
    let store = store();
    let per_sec = Policy::gcra(10, Duration::from_secs(1)).expect("policy");
    let per_min = Policy::sliding_counter(20, Duration::from_secs(60)).expect("policy");
    let daily = Policy::fixed_window(3, Duration::from_secs(86_400)).expect("policy");
    // Exhaust the daily limit of "u" alone.
    assert!(
        store
            .check_one("u", &daily, 3, Mode::Consume)
            .expect("check")
            .allowed
    );

    let checks = [
        LimitCheck::new("u", &per_sec, 2),
        LimitCheck::new("ip", &per_min, 5),
        LimitCheck::new("u", &daily, 1),
    ];
    let verdict = block_on(store.check(&checks, Mode::Consume)).expect("batch");
    assert!(!verdict.allowed());
    assert_eq!(
        verdict
            .decisions
            .iter()
            .map(|d| d.allowed)
            .collect::<Vec<_>>(),
        [true, true, false]
    );
    assert_eq!(
        remaining(&store, "u", &per_sec),
        10,
        "per-second limit untouched"
    );
    assert_eq!(
        remaining(&store, "ip", &per_min),
        20,
        "per-minute limit untouched"
    );
    assert_eq!(store.len(), 1, "nothing written but the daily state");
}

#[test]
fn an_admitted_batch_consumes_every_limit() {
    let store = store();
    let policies: Vec<Policy> = (1..=40)
        .map(|s| Policy::token_bucket(10, Duration::from_secs(s)).expect("policy"))
        .collect();
    let keys: Vec<String> = (0..40).map(|i| format!("key {i}")).collect();
    let checks: Vec<LimitCheck<'_>> = keys
        .iter()
        .zip(&policies)
        .map(|(k, p)| LimitCheck::new(k, p, 4))
        .collect();
    let verdict = store.check_sync(&checks, Mode::Consume).expect("batch");
    assert!(verdict.allowed());
    assert!(verdict.decisions.iter().all(|d| d.remaining == 6));
    for (k, p) in keys.iter().zip(&policies) {
        assert_eq!(remaining(&store, k, p), 6, "{k}");
    }
    assert_eq!(store.len(), 40);
}

#[test]
fn a_peeked_batch_writes_nothing() {
    let store = store();
    let a = Policy::sliding_log(5, Duration::from_secs(1)).expect("policy");
    let b = Policy::leaky_bucket(5, Duration::from_secs(1)).expect("policy");
    let checks = [LimitCheck::new("k", &a, 2), LimitCheck::new("k", &b, 1)];
    for _ in 0..3 {
        let verdict = store.check_sync(&checks, Mode::Peek).expect("peek");
        assert!(verdict.allowed());
    }
    assert_eq!(store.len(), 0);
    assert_eq!(remaining(&store, "k", &a), 5);
}

#[test]
fn duplicate_identity_in_a_batch_is_an_error() {
    let store = store();
    let ten = Policy::gcra(10, Duration::from_secs(1)).expect("policy");
    // Same algorithm and period, another limit: still the same stored state.
    let twenty = Policy::gcra(20, Duration::from_secs(1)).expect("policy");
    let err = store
        .check_sync(
            &[
                LimitCheck::new("k", &ten, 1),
                LimitCheck::new("k", &twenty, 1),
            ],
            Mode::Consume,
        )
        .expect_err("duplicate");
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    // Keys that encode alike are the same key.
    let err = store
        .check_sync(
            &[
                LimitCheck::new("{a}", &ten, 1),
                LimitCheck::new("x", &ten, 1),
                LimitCheck::new("{a}", &ten, 1),
            ],
            Mode::Peek,
        )
        .expect_err("duplicate");
    assert!(err.is_invalid_input());
    assert_eq!(store.len(), 0);

    // Another period or another algorithm on one key is another state: fine.
    let per_min = Policy::gcra(10, Duration::from_secs(60)).expect("policy");
    let window = Policy::fixed_window(10, Duration::from_secs(1)).expect("policy");
    let checks = [
        LimitCheck::new("k", &ten, 1),
        LimitCheck::new("k", &per_min, 1),
        LimitCheck::new("k", &window, 1),
    ];
    assert!(
        store
            .check_sync(&checks, Mode::Consume)
            .expect("batch")
            .allowed()
    );
    assert_eq!(store.len(), 3);
}

#[test]
fn an_invalid_check_fails_the_whole_batch_before_anything_is_written() {
    let store = store();
    let p = Policy::fixed_window(5, Duration::from_secs(1)).expect("policy");
    for bad in [
        [LimitCheck::new("a", &p, 1), LimitCheck::new("b", &p, 6)],
        [LimitCheck::new("a", &p, 1), LimitCheck::new("b", &p, 0)],
        [LimitCheck::new("a", &p, 1), LimitCheck::new("", &p, 1)],
    ] {
        let err = store.check_sync(&bad, Mode::Consume).expect_err("invalid");
        assert!(err.is_invalid_input(), "{err}");
    }
    assert_eq!(store.len(), 0);
}

#[test]
fn an_empty_batch_is_an_empty_verdict() {
    let verdict = store().check_sync(&[], Mode::Consume).expect("empty");
    assert!(verdict.decisions.is_empty());
}
