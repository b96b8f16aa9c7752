//! Property tests of the algorithms' promises, on the pure functions.
//!
//! For random policies and random request sequences (random gaps, random costs, peeks mixed in):
//! - sliding log: no half-open interval of one period admits more than `limit`;
//! - fixed window and sliding window counter: no aligned window admits more than `limit`, and no
//!   sliding interval of one period more than `2 × limit` (the documented bound);
//! - token bucket and GCRA: no interval of one period admits more than `limit + burst`;
//! - leaky bucket: requests are released (at `now + delay`) no faster than `limit` per period,
//!   and never told to wait longer than `max_delay`;
//! - every algorithm: a denied or peeked request leaves the state unchanged, and `retry_after`
//!   is honest: the same request at `now + retry_after` is admitted.

#![allow(clippy::unwrap_used)] // a test panics to fail

use std::time::Duration;

use proptest::prelude::*;
use statehouse_core::algorithm::{State, decide};
use statehouse_core::{Algorithm, Mode, Policy, Timestamp};

const T0: u64 = 1_750_000_000_000_000;

#[derive(Debug, Clone)]
struct Op {
    gap_us: u64,
    cost: u64,
    peek: bool,
}

fn policy_strategy() -> impl Strategy<Value = Policy> {
    (
        prop::sample::select(Algorithm::ALL.to_vec()),
        1u64..=12,
        1u64..=2_000,
        1u64..=12,
        0u64..=3_000,
    )
        .prop_map(|(alg, limit, period_ms, burst, delay_ms)| {
            let mut p = Policy::new(alg, limit, Duration::from_millis(period_ms)).unwrap();
            if alg.has_burst() {
                p = p.with_burst(burst).unwrap();
            }
            if alg == Algorithm::LeakyBucket {
                p = p.with_max_delay(Duration::from_millis(delay_ms)).unwrap();
            }
            p
        })
}

fn ops_strategy(policy: &Policy) -> impl Strategy<Value = Vec<Op>> + use<> {
    let period = policy.period_micros();
    // Unit costs for the leaky bucket, whose release bound is stated per unit request.
    let max_cost = if policy.algorithm() == Algorithm::LeakyBucket {
        1
    } else {
        policy.capacity().min(4)
    };
    let gap = prop_oneof![
        3 => 0u64..=period / 4 + 1,
        1 => 0u64..=3 * period,
        1 => Just(0u64),
    ];
    prop::collection::vec(
        (gap, 1u64..=max_cost, prop::bool::weighted(0.15)).prop_map(|(gap_us, cost, peek)| Op {
            gap_us,
            cost,
            peek,
        }),
        1..200,
    )
}

/// (time, cost) of every admitted request; checks the per-step promises on the way.
fn simulate(policy: &Policy, ops: &[Op]) -> Result<Vec<(u64, u64)>, TestCaseError> {
    let mut state: Option<State> = None;
    let mut now = T0;
    let mut admitted = Vec::new();
    for op in ops {
        now += op.gap_us;
        let mode = if op.peek { Mode::Peek } else { Mode::Consume };
        let before = state.clone();
        let step = decide(
            policy,
            state.take(),
            Timestamp::from_micros(now),
            op.cost,
            mode,
        );
        let d = &step.decision;
        if !d.allowed || op.peek {
            prop_assert!(!step.changed);
            // An unchanged state decides like the input state (sliding logs may be pruned).
            let again = decide(
                policy,
                before,
                Timestamp::from_micros(now),
                op.cost,
                Mode::Peek,
            );
            prop_assert_eq!(&again.decision, d);
        }
        if !d.allowed {
            let retry = d.retry_after.expect("a denial says when to retry");
            prop_assert!(retry > Duration::ZERO);
            let later = Timestamp::from_micros(now + retry.as_micros() as u64);
            let probe = decide(policy, step.state.clone(), later, op.cost, Mode::Peek);
            prop_assert!(
                probe.decision.allowed,
                "retry_after {:?} was too short",
                retry
            );
            if retry > Duration::from_micros(1) {
                let earlier = Timestamp::from_micros(now + retry.as_micros() as u64 - 1);
                let probe = decide(policy, step.state.clone(), earlier, op.cost, Mode::Peek);
                prop_assert!(
                    !probe.decision.allowed,
                    "retry_after {:?} was too long",
                    retry
                );
            }
        } else {
            prop_assert!(
                d.delay <= policy.max_delay() || policy.algorithm() != Algorithm::LeakyBucket
            );
            if !op.peek {
                // Leaky bucket requests go on at now + delay.
                admitted.push((now + d.delay.as_micros() as u64, op.cost));
            }
        }
        state = step.state;
    }
    Ok(admitted)
}

fn max_in_sliding_interval(admitted: &[(u64, u64)], period: u64) -> u64 {
    let mut sorted = admitted.to_vec();
    sorted.sort_unstable();
    let mut best = 0;
    let mut sum = 0;
    let mut lo = 0;
    for hi in 0..sorted.len() {
        sum += sorted[hi].1;
        while sorted[hi].0 >= sorted[lo].0 + period {
            sum -= sorted[lo].1;
            lo += 1;
        }
        best = best.max(sum);
    }
    best
}

fn max_in_aligned_window(admitted: &[(u64, u64)], period: u64) -> u64 {
    let mut per_window = std::collections::HashMap::new();
    for &(t, c) in admitted {
        *per_window.entry(t / period).or_insert(0) += c;
    }
    per_window.into_values().max().unwrap_or(0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn no_interval_admits_more_than_the_policy_allows(
        (policy, ops) in policy_strategy().prop_flat_map(|p| { let ops = ops_strategy(&p); (Just(p), ops) })
    ) {
        let admitted = simulate(&policy, &ops)?;
        let period = policy.period_micros();
        let limit = policy.limit();
        let sliding = max_in_sliding_interval(&admitted, period);
        match policy.algorithm() {
            Algorithm::SlidingWindowLog | Algorithm::LeakyBucket => prop_assert!(sliding <= limit, "{} > {}", sliding, limit),
            Algorithm::FixedWindow | Algorithm::SlidingWindowCounter => {
                prop_assert!(max_in_aligned_window(&admitted, period) <= limit);
                prop_assert!(sliding <= 2 * limit);
            }
            Algorithm::TokenBucket | Algorithm::Gcra => {
                prop_assert!(sliding <= limit + policy.burst(), "{} > {} + {}", sliding, limit, policy.burst());
            }
            _ => unreachable!(),
        }
    }

    /// `replicas` replicas each enforcing `Policy::divided` never admit more than the policy's
    /// rate together, also when the limit is below the replica count (each replica's share is
    /// then one per a longer period), and a share is always a usable policy (limit ≥ 1).
    #[test]
    fn replica_shares_never_add_up_to_more_than_the_rate(
        policy in policy_strategy(),
        replicas in 1u32..=64,
    ) {
        let share = policy.divided(std::num::NonZeroU32::new(replicas).unwrap());
        prop_assert!(share.limit() >= 1 && share.burst() >= 1);
        prop_assert_eq!(share.algorithm(), policy.algorithm());
        // replicas × share.limit / share.period ≤ limit / period, in integers.
        let fleet = u128::from(replicas) * u128::from(share.limit()) * u128::from(policy.period_micros());
        let allowed = u128::from(policy.limit()) * u128::from(share.period_micros());
        prop_assert!(fleet <= allowed, "{:?} over {} replicas: {:?}", policy, replicas, share);
        // And not needlessly strict: within one unit per replica of the policy's rate.
        let slack = u128::from(replicas) * u128::from(share.period_micros());
        prop_assert!(allowed <= fleet + slack, "{:?} over {} replicas: {:?}", policy, replicas, share);
    }
}

#[test]
fn rates_above_a_thousand_per_second_are_exact() {
    // redis-cell breaks above 1000/s (its millisecond resolution); microseconds do not.
    let p = Policy::gcra(5_000, Duration::from_secs(1))
        .unwrap()
        .with_burst(1)
        .unwrap();
    let mut state = None;
    let mut admitted = 0;
    for i in 0..10_000u64 {
        // One attempt every 100 µs for one second: exactly one per 200 µs gets through.
        let step = decide(
            &p,
            state.take(),
            Timestamp::from_micros(T0 + i * 100),
            1,
            Mode::Consume,
        );
        admitted += u64::from(step.decision.allowed);
        state = step.state;
    }
    assert_eq!(admitted, 5_000);
}

#[test]
fn long_periods_and_odd_periods_work() {
    for (limit, period) in [
        (100, Duration::from_secs(90)),
        (10_000, Duration::from_secs(86_400)),
        (3, Duration::from_millis(1)),
    ] {
        for alg in Algorithm::ALL {
            let p = Policy::new(alg, limit, period)
                .unwrap_or_else(|e| panic!("{alg} {limit} per {period:?} rejected: {e}"));
            let mut state = None;
            let mut admitted = 0;
            for _ in 0..limit + 5 {
                let step = decide(
                    &p,
                    state.take(),
                    Timestamp::from_micros(T0),
                    1,
                    Mode::Consume,
                );
                admitted += u64::from(step.decision.allowed);
                state = step.state;
            }
            let expected = match alg {
                // A leaky bucket queues up to max_delay (one period by default): one request
                // per interval fits in [0, max_delay], the first one without delay.
                Algorithm::LeakyBucket => p.max_delay_micros() / p.interval_micros() + 1,
                // A fresh fixed/sliding window counter may start near a window's end, but the
                // count within one instant is exactly the limit.
                _ => limit,
            };
            assert_eq!(admitted, expected, "{alg} {limit} per {period:?}");
        }
    }
}
