//! Odd and invalid input: errors where the input is wrong, correct answers otherwise, and no
//! panic either way.

use std::time::Duration;

use futures::executor::block_on;
use statehouse_core::key::MAX_KEY_LEN;
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

fn one_per_minute() -> Policy {
    Policy::fixed_window(1, Duration::from_secs(60)).expect("policy")
}

#[test]
fn an_empty_key_is_rejected_everywhere() {
    let store = store();
    let p = one_per_minute();
    let err = store
        .check_one("", &p, 1, Mode::Consume)
        .expect_err("empty");
    assert!(matches!(err, Error::InvalidKey { .. }), "{err}");
    let err = block_on(store.check(&[LimitCheck::new("", &p, 1)], Mode::Peek)).expect_err("empty");
    assert!(matches!(err, Error::InvalidKey { .. }), "{err}");
    let err = block_on(store.reset("", &p)).expect_err("empty");
    assert!(matches!(err, Error::InvalidKey { .. }), "{err}");
    assert!(store.is_empty());
}

#[test]
fn a_key_of_64_kib_works_and_one_byte_more_is_rejected() {
    let store = store();
    let p = one_per_minute();
    let longest = "k".repeat(MAX_KEY_LEN);
    assert_eq!(longest.len(), 64 * 1024);
    assert!(
        store
            .check_one(&longest, &p, 1, Mode::Consume)
            .expect("64 KiB")
            .allowed
    );
    assert!(
        !store
            .check_one(&longest, &p, 1, Mode::Consume)
            .expect("64 KiB")
            .allowed
    );
    // A long key is stored by its digest: a different long key is a different state.
    let other = format!("{}j", "k".repeat(MAX_KEY_LEN - 1));
    assert!(
        store
            .check_one(&other, &p, 1, Mode::Consume)
            .expect("64 KiB")
            .allowed
    );

    let too_long = "k".repeat(MAX_KEY_LEN + 1);
    let err = store
        .check_one(&too_long, &p, 1, Mode::Consume)
        .expect_err("too long");
    assert!(matches!(err, Error::InvalidKey { .. }), "{err}");
    let err = block_on(store.reset(&too_long, &p)).expect_err("too long");
    assert!(matches!(err, Error::InvalidKey { .. }), "{err}");
    block_on(store.reset(&longest, &p)).expect("reset");
    assert!(
        store
            .check_one(&longest, &p, 1, Mode::Consume)
            .expect("again")
            .allowed
    );
}

#[test]
fn keys_with_spaces_newlines_braces_and_tildes_work_and_stay_distinct() {
    let store = store();
    let p = one_per_minute();
    let boundary = "b".repeat(200);
    let past_boundary = "b".repeat(201);
    let keys = [
        "a",
        "a b",
        "a\nb",
        "a\r\nb",
        "a\tb",
        " ",
        "\n",
        "{",
        "}",
        "{}",
        "a{b}",
        "a{b}c",
        "{a}b",
        "~",
        "~a",
        "a~",
        "ключ",
        "🦀",
        "a\0b",
        boundary.as_str(),
        past_boundary.as_str(),
    ];
    for key in keys {
        let d = store
            .check_one(key, &p, 1, Mode::Consume)
            .expect("valid key");
        assert!(d.allowed, "{key:?} is a fresh key, not another's state");
    }
    for key in keys {
        let d = store
            .check_one(key, &p, 1, Mode::Consume)
            .expect("valid key");
        assert!(!d.allowed, "{key:?} kept its own state");
    }
    assert_eq!(store.len(), keys.len());
}

#[test]
fn a_zero_cost_or_a_cost_above_capacity_is_rejected() {
    let store = store();
    let gcra = Policy::gcra(10, Duration::from_secs(1))
        .expect("policy")
        .with_burst(3)
        .expect("burst");
    for (policy, capacity) in [(&gcra, 3), (&one_per_minute(), 1)] {
        for cost in [0, capacity + 1, u64::MAX] {
            for mode in [Mode::Consume, Mode::Peek] {
                let err = store
                    .check_one("k", policy, cost, mode)
                    .expect_err("bad cost");
                assert!(matches!(err, Error::InvalidCost { .. }), "{err}");
            }
        }
        assert!(
            store
                .check_one("k", policy, capacity, Mode::Consume)
                .expect("ok")
                .allowed
        );
    }
}

#[test]
fn extreme_times_and_costs_do_not_panic() {
    let p = Policy::gcra(1_000_000, Duration::from_secs(3600))
        .expect("policy")
        .with_burst(1_000_000)
        .expect("burst");
    for start in [0, 1, 1_700_000_000_000_000, (1 << 53) - 1] {
        let clock = ManualClock::new(Timestamp::from_micros(start));
        let store = EmbeddedStore::builder()
            .clock(clock.clone())
            .build()
            .expect("store");
        for _ in 0..3 {
            store
                .check_one("k", &p, 1_000_000, Mode::Consume)
                .expect("check");
            clock.advance(Duration::from_secs(1));
        }
        // The clock stepping back is tolerated.
        clock.set(Timestamp::from_micros(start / 2));
        store.check_one("k", &p, 1, Mode::Consume).expect("check");
    }
}
