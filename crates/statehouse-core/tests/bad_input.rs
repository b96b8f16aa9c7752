//! Bad input gets a clear error naming what is wrong, never a panic.

#![allow(clippy::unwrap_used)] // a test panics to fail

use std::time::Duration;

use statehouse_core::key::{MAX_KEY_LEN, encode_key, validate_prefix};
use statehouse_core::{Algorithm, Error, LimitCheck, Policy, prepare_checks};

fn field_of(e: Error) -> &'static str {
    match e {
        Error::InvalidPolicy { field, .. } => field,
        other => panic!("expected InvalidPolicy, got {other:?}"),
    }
}

#[test]
fn zero_and_absurd_policies_are_rejected_with_the_field() {
    for alg in Algorithm::ALL {
        assert_eq!(
            field_of(Policy::new(alg, 0, Duration::from_secs(1)).unwrap_err()),
            "limit"
        );
        assert_eq!(
            field_of(Policy::new(alg, 1, Duration::ZERO).unwrap_err()),
            "period"
        );
        assert_eq!(
            field_of(Policy::new(alg, 1, Duration::from_micros(999)).unwrap_err()),
            "period"
        );
        assert_eq!(
            field_of(Policy::new(alg, 1, Duration::from_secs(u64::MAX)).unwrap_err()),
            "period"
        );
        assert_eq!(
            field_of(Policy::new(alg, u64::MAX, Duration::from_secs(1)).unwrap_err()),
            "limit"
        );
    }
    // Faster than one per microsecond cannot be paced by the interval algorithms...
    let e = Policy::gcra(10_000, Duration::from_millis(1)).unwrap_err();
    assert!(e.to_string().contains("microsecond"), "{e}");
    // ...but can be counted.
    assert!(Policy::fixed_window(10_000, Duration::from_millis(1)).is_ok());
    // Sliding logs keep one entry per unit: bounded.
    assert_eq!(
        field_of(Policy::sliding_log(1_000_000, Duration::from_secs(1)).unwrap_err()),
        "limit"
    );
    let gcra = Policy::gcra(10, Duration::from_secs(1)).unwrap();
    assert_eq!(field_of(gcra.clone().with_burst(0).unwrap_err()), "burst");
    assert_eq!(
        field_of(gcra.clone().with_burst(u64::MAX).unwrap_err()),
        "burst"
    );
    assert_eq!(
        field_of(gcra.with_max_delay(Duration::from_secs(1)).unwrap_err()),
        "max_delay"
    );
    let fw = Policy::fixed_window(10, Duration::from_secs(1)).unwrap();
    assert_eq!(field_of(fw.with_burst(5).unwrap_err()), "burst");
    assert!("gcra ".parse::<Algorithm>().is_err());
}

#[test]
fn absurd_costs_are_rejected() {
    let p = Policy::gcra(10, Duration::from_secs(1)).unwrap();
    for cost in [0, 11, u64::MAX] {
        let e = prepare_checks(&[LimitCheck::new("k", &p, cost)]).unwrap_err();
        assert!(matches!(e, Error::InvalidCost { .. }), "{e:?}");
        assert!(e.is_invalid_input());
        assert!(!e.is_unavailable());
    }
    assert!(prepare_checks(&[LimitCheck::new("k", &p, 10)]).is_ok());
}

#[test]
fn keys_of_any_shape_are_stored_safely_and_stay_distinct() {
    let long = "x".repeat(MAX_KEY_LEN);
    let keys = [
        "a b",
        "a\nb",
        "a\r\nb",
        "{a}",
        "a}",
        "{",
        "~plain",
        "ключ",
        "\u{0}",
        long.as_str(),
    ];
    let mut seen = std::collections::HashSet::new();
    for k in keys {
        let enc = encode_key(k).unwrap();
        assert!(!enc.contains(['{', '}']), "{k:?} -> {enc}");
        assert!(enc.len() <= 200);
        assert!(seen.insert(enc.into_owned()), "collision for {k:?}");
    }
    assert!(matches!(encode_key(""), Err(Error::InvalidKey { .. })));
    let too_long = "x".repeat(MAX_KEY_LEN + 1);
    assert!(matches!(
        encode_key(&too_long),
        Err(Error::InvalidKey { .. })
    ));
    assert!(validate_prefix("sh:rl:").is_ok());
    for bad in ["a{", "a b", "x\n", &"p".repeat(65)] {
        assert!(validate_prefix(bad).is_err(), "{bad:?}");
    }
}
