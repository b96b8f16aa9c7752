//! The deadline and the circuit breaker, driven by a fault-injecting store: Tokio's paused clock
//! for the deadline and store latency, a `ManualClock` for the breaker's `open_for`. Nothing
//! here waits in real time.

#![cfg(feature = "embedded")]

mod fault_injection;

use std::sync::Arc;
use std::time::Duration;

use fault_injection::{Fault, FaultyStore, manual_clock};
use statehouse::{
    BreakerState, CircuitBreakerConfig, Decision, DegradedPolicy, ManualClock, Policy, RateLimiter,
};
use tokio::task::JoinSet;
use tokio::time::Instant;

const DEADLINE: Duration = Duration::from_millis(50);
const OPEN_FOR: Duration = Duration::from_secs(1);
const THRESHOLD: u32 = 3;

fn limiter() -> (RateLimiter, FaultyStore, ManualClock) {
    let clock = manual_clock();
    let store = FaultyStore::new(&clock);
    let limiter = RateLimiter::builder(store.clone())
        .on_store_failure(DegradedPolicy::FailOpen)
        .deadline(DEADLINE)
        .circuit_breaker(CircuitBreakerConfig {
            failure_threshold: THRESHOLD,
            open_for: OPEN_FOR,
        })
        .clock(Arc::new(clock.clone()))
        .build()
        .expect("valid limiter");
    (limiter, store, clock)
}

fn policy() -> Policy {
    Policy::gcra(1_000, Duration::from_secs(1)).expect("valid policy")
}

async fn check(limiter: &RateLimiter) -> Decision {
    limiter.check("k", &policy()).await.expect("a decision")
}

/// Fails `THRESHOLD` calls so that the breaker opens.
async fn open_breaker(limiter: &RateLimiter, store: &FaultyStore, fault: Fault) {
    store.set_fault(fault);
    for _ in 0..THRESHOLD {
        assert!(check(limiter).await.degraded);
    }
    assert_eq!(limiter.stats().breaker_state, BreakerState::Open);
}

/// `n` concurrent checks, each on its own task.
async fn concurrent_checks(limiter: &RateLimiter, n: usize) -> Vec<Decision> {
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let limiter = limiter.clone();
        tasks.spawn(async move { check(&limiter).await });
    }
    tasks.join_all().await
}

#[tokio::test(start_paused = true)]
async fn a_hanging_store_is_cut_at_the_deadline() {
    let (limiter, store, _clock) = limiter();
    store.set_fault(Fault::Hang);
    let start = Instant::now();
    let d = check(&limiter).await;
    assert!(d.allowed && d.degraded);
    assert_eq!(start.elapsed(), DEADLINE, "cut at the deadline, not later");
    let stats = limiter.stats();
    assert_eq!(stats.timeouts, 1);
    assert_eq!(stats.store_failures, 1);
    assert_eq!(stats.degraded_decisions, 1);
}

#[tokio::test(start_paused = true)]
async fn a_slow_answer_within_the_deadline_is_not_a_failure() {
    let (limiter, store, _clock) = limiter();
    store.set_latency(DEADLINE - Duration::from_millis(1));
    let d = check(&limiter).await;
    assert!(d.allowed && !d.degraded);
    assert_eq!(limiter.stats().store_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn the_open_breaker_stops_calling_the_store() {
    let (limiter, store, _clock) = limiter();
    open_breaker(&limiter, &store, Fault::Hang).await;
    assert_eq!(store.calls(), u64::from(THRESHOLD));
    let start = Instant::now();
    for _ in 0..100 {
        let d = check(&limiter).await;
        assert!(d.allowed && d.degraded);
    }
    assert_eq!(
        store.calls(),
        u64::from(THRESHOLD),
        "the store was not called"
    );
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "no call waited for the deadline"
    );
    let stats = limiter.stats();
    assert_eq!(stats.breaker_opened, 1);
    assert_eq!(stats.timeouts, u64::from(THRESHOLD));
    assert_eq!(stats.degraded_decisions, 100 + u64::from(THRESHOLD));
}

#[tokio::test(start_paused = true)]
async fn failures_must_be_consecutive_to_open_the_breaker() {
    let (limiter, store, _clock) = limiter();
    for _ in 0..5 {
        store.set_fault(Fault::Unavailable);
        for _ in 0..THRESHOLD - 1 {
            check(&limiter).await;
        }
        store.set_fault(Fault::Healthy);
        assert!(!check(&limiter).await.degraded);
    }
    assert_eq!(limiter.stats().breaker_state, BreakerState::Closed);
    assert_eq!(limiter.stats().breaker_opened, 0);
}

#[tokio::test(start_paused = true)]
async fn half_open_lets_exactly_one_probe_through_a_crowd() {
    let (limiter, store, clock) = limiter();
    open_breaker(&limiter, &store, Fault::Hang).await;
    clock.advance(OPEN_FOR);
    assert_eq!(limiter.stats().breaker_state, BreakerState::HalfOpen);

    let before = store.calls();
    let decisions = concurrent_checks(&limiter, 64).await;
    assert_eq!(store.calls(), before + 1, "exactly one probe");
    assert!(decisions.iter().all(|d| d.allowed && d.degraded));
    // The probe hung and was cut at the deadline: open again for another `open_for`.
    assert_eq!(limiter.stats().breaker_state, BreakerState::Open);
    assert_eq!(
        limiter.stats().breaker_opened,
        1,
        "a re-open is not a new opening"
    );
    check(&limiter).await;
    assert_eq!(store.calls(), before + 1);
}

#[tokio::test(start_paused = true)]
async fn a_successful_probe_closes_the_breaker() {
    let (limiter, store, clock) = limiter();
    open_breaker(&limiter, &store, Fault::Unavailable).await;
    // The store is back, and slow enough that the crowd arrives while the probe is out.
    store.set_fault(Fault::Healthy);
    store.set_latency(Duration::from_millis(10));
    clock.advance(OPEN_FOR);

    let before = store.calls();
    let decisions = concurrent_checks(&limiter, 64).await;
    assert_eq!(store.calls(), before + 1, "exactly one probe");
    let from_store = decisions.iter().filter(|d| !d.degraded).count();
    assert_eq!(from_store, 1, "only the probe was decided by the store");
    assert_eq!(limiter.stats().breaker_state, BreakerState::Closed);

    // Closed: every call goes to the store again.
    let d = check(&limiter).await;
    assert!(!d.degraded);
    assert_eq!(store.calls(), before + 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_for_another_open_for() {
    let (limiter, store, clock) = limiter();
    open_breaker(&limiter, &store, Fault::Unavailable).await;
    let opened_calls = store.calls();
    clock.advance(OPEN_FOR);
    assert!(check(&limiter).await.degraded); // the probe, failing
    assert_eq!(store.calls(), opened_calls + 1);
    assert_eq!(limiter.stats().breaker_state, BreakerState::Open);
    clock.advance(OPEN_FOR - Duration::from_millis(1));
    check(&limiter).await;
    assert_eq!(store.calls(), opened_calls + 1, "still open");
    clock.advance(Duration::from_millis(1));
    store.set_fault(Fault::Healthy);
    assert!(!check(&limiter).await.degraded, "the next probe closes it");
    assert_eq!(limiter.stats().breaker_state, BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_probe_hands_its_turn_back() {
    let (limiter, store, clock) = limiter();
    open_breaker(&limiter, &store, Fault::Hang).await;
    clock.advance(OPEN_FOR);
    let before = store.calls();
    // The caller gives up on the probe before the deadline (a client went away).
    let gave_up = tokio::time::timeout(Duration::from_millis(1), check(&limiter)).await;
    assert!(gave_up.is_err());
    assert_eq!(store.calls(), before + 1);
    // Without the hand-back the breaker would stay half-open with no probe, forever.
    store.set_fault(Fault::Healthy);
    assert!(!check(&limiter).await.degraded);
    assert_eq!(store.calls(), before + 2);
    assert_eq!(limiter.stats().breaker_state, BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn recovery_is_automatic_through_repeated_outages() {
    let (limiter, store, clock) = limiter();
    for round in 1..=3 {
        open_breaker(&limiter, &store, Fault::Unavailable).await;
        store.set_fault(Fault::Healthy);
        clock.advance(OPEN_FOR);
        assert!(!check(&limiter).await.degraded);
        assert_eq!(limiter.stats().breaker_opened, round);
        assert_eq!(limiter.stats().breaker_state, BreakerState::Closed);
    }
}
