//! Degraded mode: what each `DegradedPolicy` decides when the store fails, how it is counted,
//! and what is never degraded (invalid input, backend errors, resets).

#![cfg(feature = "embedded")]

mod fault_injection;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use fault_injection::{Fault, FaultyStore, manual_clock};
use statehouse::{
    BreakerState, CircuitBreakerConfig, DegradedPolicy, Error, LimitCheck, ManualClock, Policy,
    RateLimiter,
};

const OPEN_FOR: Duration = Duration::from_secs(2);

fn limiter(policy: DegradedPolicy) -> (RateLimiter, FaultyStore, ManualClock) {
    let clock = manual_clock();
    let store = FaultyStore::new(&clock);
    let limiter = RateLimiter::builder(store.clone())
        .on_store_failure(policy)
        .circuit_breaker(CircuitBreakerConfig {
            failure_threshold: 3,
            open_for: OPEN_FOR,
        })
        .clock(Arc::new(clock.clone()))
        .build()
        .expect("valid limiter");
    (limiter, store, clock)
}

fn replicas(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("non-zero")
}

fn per_minute(limit: u64) -> Policy {
    Policy::fixed_window(limit, Duration::from_secs(60)).expect("valid policy")
}

#[tokio::test]
async fn healthy_store_decides_and_nothing_is_degraded() {
    let (limiter, store, _clock) = limiter(DegradedPolicy::FailClosed);
    let policy = per_minute(2);
    assert!(limiter.check("k", &policy).await.expect("check").allowed);
    assert!(limiter.check("k", &policy).await.expect("check").allowed);
    let third = limiter.check("k", &policy).await.expect("check");
    assert!(!third.allowed);
    assert!(!third.degraded);
    assert_eq!(store.calls(), 3);
    let stats = limiter.stats();
    assert_eq!(
        (stats.decisions, stats.allowed, stats.denied),
        (3, 2, 1),
        "{stats:?}"
    );
    assert_eq!(stats.degraded_decisions, 0);
    assert_eq!(stats.store_failures, 0);
    assert_eq!(stats.breaker_state, BreakerState::Closed);
}

#[tokio::test]
async fn fail_open_admits_marked_degraded_and_counted() {
    let (limiter, store, _clock) = limiter(DegradedPolicy::FailOpen);
    store.set_fault(Fault::Unavailable);
    let policy = per_minute(5);
    let d = limiter
        .check("k", &policy)
        .await
        .expect("fail-open decides");
    assert!(d.allowed);
    assert!(d.degraded);
    assert_eq!(d.remaining, 5);
    assert_eq!(d.retry_after, None);
    let stats = limiter.stats();
    assert_eq!(stats.decisions, 1);
    assert_eq!(stats.allowed, 1);
    assert_eq!(stats.degraded_decisions, 1);
    assert_eq!(stats.store_failures, 1);
    assert_eq!(stats.timeouts, 0);
}

#[tokio::test]
async fn fail_closed_denies_with_the_breakers_open_time() {
    let (limiter, store, _clock) = limiter(DegradedPolicy::FailClosed);
    store.set_fault(Fault::Unavailable);
    let d = limiter
        .check("k", &per_minute(5))
        .await
        .expect("fail-closed decides");
    assert!(!d.allowed);
    assert!(d.degraded);
    assert_eq!(d.retry_after, Some(OPEN_FOR));
    let stats = limiter.stats();
    assert_eq!((stats.denied, stats.degraded_decisions), (1, 1));
}

#[tokio::test]
async fn return_error_propagates_the_outage_and_then_the_open_breaker() {
    let (limiter, store, _clock) = limiter(DegradedPolicy::ReturnError);
    store.set_fault(Fault::Unavailable);
    let policy = per_minute(5);
    for _ in 0..3 {
        let err = limiter.check("k", &policy).await.expect_err("an error");
        assert!(err.is_unavailable(), "{err}");
        assert!(err.to_string().contains("injected"), "{err}");
    }
    // Now the breaker is open: the error says so and the store is not called.
    let err = limiter.check("k", &policy).await.expect_err("an error");
    assert!(err.is_unavailable(), "{err}");
    assert!(err.to_string().contains("circuit breaker open"), "{err}");
    assert_eq!(store.calls(), 3);
    let stats = limiter.stats();
    assert_eq!(stats.decisions, 0, "errors are not decisions");
    assert_eq!(stats.degraded_decisions, 0);
    assert_eq!(stats.store_failures, 3);
    assert_eq!(stats.breaker_opened, 1);
}

#[tokio::test]
async fn local_fallback_enforces_the_limit_divided_by_replicas() {
    let (limiter, store, clock) = limiter(DegradedPolicy::LocalFallback {
        replicas: replicas(3),
    });
    store.set_fault(Fault::Unavailable);
    let policy = per_minute(30);
    let mut admitted = 0;
    for _ in 0..25 {
        let d = limiter.check("k", &policy).await.expect("fallback decides");
        assert!(d.degraded);
        assert_eq!(d.limit, 10, "decisions report the replica's share");
        if d.allowed {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10, "30 per minute over 3 replicas");
    let denied = limiter.check("k", &policy).await.expect("fallback decides");
    assert!(!denied.allowed);
    assert!(denied.retry_after.is_some());
    // Other keys have their own share; the fallback runs on the limiter's clock.
    assert!(
        limiter
            .check("other", &policy)
            .await
            .expect("check")
            .allowed
    );
    clock.advance(Duration::from_secs(60));
    assert!(limiter.check("k", &policy).await.expect("check").allowed);
    let stats = limiter.stats();
    assert_eq!(stats.degraded_decisions, stats.decisions);
    assert_eq!(stats.allowed, 12);
}

#[tokio::test]
async fn local_fallback_with_fewer_units_than_replicas_stretches_the_period() {
    // 2 per minute over 10 replicas: a replica cannot admit a fifth of a request, so its share
    // is 1 per 5 minutes (10 replicas: 10 per 5 minutes, the policy's rate), not 1 per minute
    // (10 per minute, five times the limit).
    let (limiter, store, clock) = limiter(DegradedPolicy::LocalFallback {
        replicas: replicas(10),
    });
    store.set_fault(Fault::Unavailable);
    let policy = Policy::gcra(2, Duration::from_secs(60)).expect("valid policy");
    let first = limiter.check("k", &policy).await.expect("fallback decides");
    assert!(first.allowed && first.degraded, "{first:?}");
    assert_eq!(first.limit, 1);
    let mut admitted = 1;
    for _ in 0..10 {
        clock.advance(Duration::from_secs(29));
        admitted += u32::from(limiter.check("k", &policy).await.expect("check").allowed);
    }
    assert_eq!(admitted, 1, "290 s after the first: still within its 300 s");
    clock.advance(Duration::from_secs(10));
    assert!(limiter.check("k", &policy).await.expect("check").allowed);
}

#[tokio::test]
async fn local_fallback_counts_are_not_copied_back_to_the_store() {
    let (limiter, store, clock) = limiter(DegradedPolicy::LocalFallback {
        replicas: replicas(2),
    });
    let policy = per_minute(4);
    store.set_fault(Fault::Unavailable);
    for _ in 0..2 {
        assert!(limiter.check("k", &policy).await.expect("check").allowed);
    }
    assert!(!limiter.check("k", &policy).await.expect("check").allowed);
    // The store returns and the breaker closes on the next probe.
    store.set_fault(Fault::Healthy);
    clock.advance(OPEN_FOR);
    for _ in 0..4 {
        let d = limiter.check("k", &policy).await.expect("check");
        assert!(d.allowed && !d.degraded, "{d:?}");
    }
    assert!(!limiter.check("k", &policy).await.expect("check").allowed);
}

#[tokio::test]
async fn local_fallback_denies_a_cost_above_one_replicas_share() {
    let (limiter, store, _clock) = limiter(DegradedPolicy::LocalFallback {
        replicas: replicas(4),
    });
    store.set_fault(Fault::Unavailable);
    let policy = per_minute(40);
    // 15 fits the policy (40) but not one replica's share (10).
    let d = limiter
        .check_cost("k", &policy, 15)
        .await
        .expect("a decision, not an error");
    assert!(!d.allowed && d.degraded);
    // Nothing was consumed.
    assert!(
        limiter
            .check_cost("k", &policy, 10)
            .await
            .expect("check")
            .allowed
    );
}

#[tokio::test]
async fn local_fallback_check_all_is_all_or_nothing() {
    let (limiter, store, _clock) = limiter(DegradedPolicy::LocalFallback {
        replicas: replicas(2),
    });
    store.set_fault(Fault::Unavailable);
    let wide = per_minute(100);
    let narrow = Policy::fixed_window(2, Duration::from_secs(3600)).expect("policy");
    let checks = [
        LimitCheck::new("user", &wide, 1),
        LimitCheck::new("user", &narrow, 1),
    ];
    let first = limiter.check_all(&checks).await.expect("verdict");
    assert!(first.allowed() && first.degraded());
    let second = limiter.check_all(&checks).await.expect("verdict");
    assert!(!second.allowed());
    assert!(second.decisions.iter().all(|d| d.degraded));
    // The wide limit (50 per replica) was charged once, not twice.
    assert_eq!(second.decisions[0].remaining, 48);
    // An over-share cost on one check denies the whole set and consumes nothing.
    let over = [
        LimitCheck::new("user2", &wide, 1),
        LimitCheck::new("user2", &narrow, 2),
    ];
    assert!(over[1].cost > 1, "narrow's share is 1");
    let verdict = limiter.check_all(&over).await.expect("verdict");
    assert!(!verdict.allowed());
    let stats = limiter.stats();
    assert_eq!((stats.decisions, stats.degraded_decisions), (3, 3));
}

#[tokio::test]
async fn fail_open_and_fail_closed_answer_check_all_and_peek() {
    let policy = per_minute(3);
    let checks = [
        LimitCheck::new("a", &policy, 1),
        LimitCheck::new("b", &policy, 2),
    ];

    let (open, store, _clock) = limiter(DegradedPolicy::FailOpen);
    store.set_fault(Fault::Unavailable);
    let verdict = open.check_all(&checks).await.expect("verdict");
    assert!(verdict.allowed() && verdict.degraded());
    assert_eq!(verdict.decisions.len(), 2);
    let peek = open.peek("a", &policy).await.expect("peek");
    assert!(peek.allowed && peek.degraded);
    assert_eq!(open.stats().decisions, 1, "a peek is not a decision");

    let (closed, store, _clock) = limiter(DegradedPolicy::FailClosed);
    store.set_fault(Fault::Unavailable);
    let verdict = closed.check_all(&checks).await.expect("verdict");
    assert!(!verdict.allowed());
    assert!(verdict.decisions.iter().all(|d| !d.allowed && d.degraded));
    let peek = closed.peek("a", &policy).await.expect("peek");
    assert!(!peek.allowed && peek.degraded);
}

#[tokio::test]
async fn invalid_input_is_an_error_and_never_degraded_or_counted() {
    for policy in [
        DegradedPolicy::FailOpen,
        DegradedPolicy::FailClosed,
        DegradedPolicy::LocalFallback {
            replicas: replicas(2),
        },
        DegradedPolicy::ReturnError,
    ] {
        let (limiter, store, _clock) = limiter(policy);
        store.set_fault(Fault::Unavailable);
        let p = per_minute(5);
        for _ in 0..10 {
            let errors = [
                limiter.check("", &p).await.expect_err("empty key"),
                limiter.check_cost("k", &p, 0).await.expect_err("zero cost"),
                limiter
                    .check_cost("k", &p, 6)
                    .await
                    .expect_err("over capacity"),
                limiter.peek("", &p).await.expect_err("empty key"),
                limiter.reset("", &p).await.expect_err("empty key"),
                limiter
                    .check_all(&[LimitCheck::new("k", &p, 1), LimitCheck::new("k", &p, 1)])
                    .await
                    .expect_err("duplicate check"),
            ];
            for e in errors {
                assert!(e.is_invalid_input(), "{policy:?}: {e}");
            }
        }
        // Checked before the store is called, so even a dead store never sees them.
        assert_eq!(store.calls(), 0, "{policy:?}");
        let stats = limiter.stats();
        assert_eq!(stats.store_failures, 0);
        assert_eq!(stats.decisions, 0);
        assert_eq!(stats.breaker_state, BreakerState::Closed);
    }
}

#[tokio::test]
async fn input_rejected_by_the_store_itself_never_opens_the_breaker() {
    let (limiter, store, _clock) = limiter(DegradedPolicy::FailOpen);
    store.set_fault(Fault::RejectInput);
    let p = per_minute(5);
    for _ in 0..10 {
        let e = limiter.check("k", &p).await.expect_err("rejected");
        assert!(e.is_invalid_input(), "{e}");
    }
    assert_eq!(store.calls(), 10, "the breaker never skipped the store");
    let stats = limiter.stats();
    assert_eq!(stats.store_failures, 0);
    assert_eq!(stats.degraded_decisions, 0);
    assert_eq!(stats.breaker_state, BreakerState::Closed);
}

#[tokio::test]
async fn backend_errors_are_returned_counted_and_do_not_open_the_breaker() {
    let (limiter, store, _clock) = limiter(DegradedPolicy::FailOpen);
    store.set_fault(Fault::Backend);
    let p = per_minute(5);
    for _ in 0..10 {
        let e = limiter.check("k", &p).await.expect_err("backend error");
        assert!(matches!(e, Error::Backend { .. }), "{e}");
    }
    assert_eq!(store.calls(), 10);
    let stats = limiter.stats();
    assert_eq!(stats.backend_errors, 10);
    assert_eq!(stats.store_failures, 0);
    assert_eq!(stats.degraded_decisions, 0);
    assert_eq!(stats.breaker_state, BreakerState::Closed);
}

#[tokio::test]
async fn reset_is_never_degraded() {
    let (limiter, store, _clock) = limiter(DegradedPolicy::FailOpen);
    let p = per_minute(1);
    store.set_fault(Fault::Unavailable);
    for _ in 0..3 {
        let e = limiter.reset("k", &p).await.expect_err("store down");
        assert!(e.is_unavailable(), "{e}");
    }
    // Resets count as store failures: the breaker is now open and resets fail fast.
    assert_eq!(limiter.stats().breaker_state, BreakerState::Open);
    let e = limiter.reset("k", &p).await.expect_err("breaker open");
    assert!(e.to_string().contains("circuit breaker open"), "{e}");
    assert_eq!(store.calls(), 3);
}

#[tokio::test]
async fn reset_clears_the_local_fallback_even_when_the_store_is_down() {
    let (limiter, store, _clock) = limiter(DegradedPolicy::LocalFallback {
        replicas: replicas(1),
    });
    let p = per_minute(1);
    store.set_fault(Fault::Unavailable);
    assert!(limiter.check("k", &p).await.expect("check").allowed);
    assert!(!limiter.check("k", &p).await.expect("check").allowed);
    // The store's reset fails (and opens the breaker), the local one is done.
    limiter.reset("k", &p).await.expect_err("store down");
    assert_eq!(limiter.stats().breaker_state, BreakerState::Open);
    let d = limiter.check("k", &p).await.expect("check");
    assert!(d.allowed && d.degraded, "{d:?}");
}

#[tokio::test(start_paused = true)]
async fn acquire_waits_out_the_shapers_delay() {
    let clock = manual_clock();
    let store = statehouse::EmbeddedStore::builder()
        .clock(clock.clone())
        .build()
        .expect("store");
    let limiter = RateLimiter::new(store);
    let shaper = Policy::leaky_bucket(10, Duration::from_secs(1))
        .and_then(|p| p.with_max_delay(Duration::from_millis(500)))
        .expect("policy");
    let start = tokio::time::Instant::now();
    let first = limiter.acquire("q", &shaper, 1).await.expect("acquire");
    assert!(first.allowed && first.delay.is_zero());
    assert_eq!(start.elapsed(), Duration::ZERO);
    let second = limiter.acquire("q", &shaper, 1).await.expect("acquire");
    assert!(second.allowed);
    assert_eq!(second.delay, Duration::from_millis(100));
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(100),
        "waited the delay"
    );
    // `check_cost` reports the delay without waiting.
    let third = limiter.check_cost("q", &shaper, 1).await.expect("check");
    assert_eq!(third.delay, Duration::from_millis(200));
    assert_eq!(start.elapsed(), Duration::from_millis(100));
}

#[test]
fn builder_rejects_invalid_configuration() {
    let clock = manual_clock();
    let store = FaultyStore::new(&clock);
    let zero_deadline = RateLimiter::builder(store.clone())
        .deadline(Duration::ZERO)
        .build()
        .expect_err("zero deadline");
    assert!(
        zero_deadline.to_string().contains("deadline"),
        "{zero_deadline}"
    );
    // "No deadline" is not offered: a dead store must cost a bounded wait (and a huge one
    // would overflow the timers' clock arithmetic).
    let endless = RateLimiter::builder(store.clone())
        .deadline(Duration::MAX)
        .build()
        .expect_err("endless deadline");
    assert!(endless.to_string().contains("one hour"), "{endless}");
    let zero_threshold = RateLimiter::builder(store.clone())
        .circuit_breaker(CircuitBreakerConfig {
            failure_threshold: 0,
            open_for: Duration::from_secs(1),
        })
        .build()
        .expect_err("zero threshold");
    assert!(
        zero_threshold.to_string().contains("failure_threshold"),
        "{zero_threshold}"
    );
    let limiter = RateLimiter::builder(store)
        .on_store_failure(DegradedPolicy::ReturnError)
        .build()
        .expect("valid");
    assert_eq!(limiter.degraded_policy(), DegradedPolicy::ReturnError);
    assert!(format!("{limiter:?}").contains("RateLimiter"));
}
