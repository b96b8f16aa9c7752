//! The embedded store decides exactly like `algorithm::decide` run on a plain `Option<State>`:
//! random policies of every algorithm, random sequences of time steps, checks (consuming or
//! peeking, single or batched), resets. The model never expires anything, so this also checks
//! that dropping a state at its `expires_at` changes no decision.

use std::time::Duration;

use futures::executor::block_on;
use proptest::prelude::*;
use statehouse_core::algorithm::{State, decide};
use statehouse_core::{
    Algorithm, Clock, Decision, LimitCheck, ManualClock, Mode, Policy, RateLimitStore, Timestamp,
};
use statehouse_embedded::EmbeddedStore;

/// Keys of the three kinds `encode_key` treats differently: plain, with whitespace, hashed.
const KEYS: [&str; 3] = ["user:1", "a b\nc", "{tag}"];

#[derive(Debug, Clone)]
enum Op {
    Advance(u64),
    Check {
        key: usize,
        cost: u64,
        peek: bool,
    },
    /// One batch over keys 0 and 1.
    Batch {
        costs: [u64; 2],
        peek: bool,
    },
    Reset {
        key: usize,
    },
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        0..Algorithm::ALL.len(),
        1..=12u64,
        1..=3_000u64,
        1..=15u64,
        0..=6_000u64,
    )
        .prop_map(|(alg, limit, period_ms, burst, delay_ms)| {
            let algorithm = Algorithm::ALL[alg];
            let mut p = Policy::new(algorithm, limit, Duration::from_millis(period_ms))
                .expect("valid policy");
            if algorithm.has_burst() {
                p = p.with_burst(burst).expect("valid burst");
            }
            if algorithm == Algorithm::LeakyBucket {
                p = p
                    .with_max_delay(Duration::from_millis(delay_ms))
                    .expect("valid max delay");
            }
            p
        })
}

fn ops(policy: &Policy) -> impl Strategy<Value = Vec<Op>> + use<> {
    let period = policy.period_micros();
    // Up to one beyond capacity, and zero: invalid costs must fail and change nothing.
    let cost = 0..=policy.capacity() + 1;
    let advance = prop_oneof![Just(0u64), 1..1_000u64, 0..=period, 0..=3 * period,];
    let op = prop_oneof![
        2 => advance.prop_map(Op::Advance),
        4 => (0..KEYS.len(), cost.clone(), any::<bool>())
            .prop_map(|(key, cost, peek)| Op::Check { key, cost, peek }),
        1 => ([cost.clone(), cost], any::<bool>()).prop_map(|(costs, peek)| Op::Batch { costs, peek }),
        1 => (0..KEYS.len()).prop_map(|key| Op::Reset { key }),
    ];
    prop::collection::vec(op, 1..80)
}

fn mode(peek: bool) -> Mode {
    if peek { Mode::Peek } else { Mode::Consume }
}

fn run(policy: &Policy, ops: &[Op], start: u64, shards: usize) -> Result<(), TestCaseError> {
    let clock = ManualClock::new(Timestamp::from_micros(start));
    let store = EmbeddedStore::builder()
        .clock(clock.clone())
        .shards(shards)
        .build()
        .expect("valid store");
    let mut model: [Option<State>; 3] = Default::default();
    let valid = |cost: u64| policy.check_cost(cost).is_ok();

    for (i, op) in ops.iter().enumerate() {
        let now = clock.now();
        match *op {
            Op::Advance(us) => clock.advance(Duration::from_micros(us)),
            Op::Reset { key } => {
                block_on(store.reset(KEYS[key], policy)).expect("reset");
                model[key] = None;
            }
            Op::Check { key, cost, peek } => {
                let checks = [LimitCheck::new(KEYS[key], policy, cost)];
                let got = block_on(store.check(&checks, mode(peek)));
                if !valid(cost) {
                    prop_assert!(got.is_err(), "op {i}: cost {cost} accepted");
                    continue;
                }
                let step = decide(policy, model[key].take(), now, cost, mode(peek));
                model[key] = step.state;
                let got = got.expect("valid check").decisions;
                prop_assert_eq!(got, vec![step.decision], "op {} {:?}", i, op);
            }
            Op::Batch { costs, peek } => {
                let checks = [
                    LimitCheck::new(KEYS[0], policy, costs[0]),
                    LimitCheck::new(KEYS[1], policy, costs[1]),
                ];
                let got = block_on(store.check(&checks, mode(peek)));
                if !costs.iter().all(|&c| valid(c)) {
                    prop_assert!(got.is_err(), "op {i}: costs {costs:?} accepted");
                    continue;
                }
                let steps: Vec<_> = (0..2)
                    .map(|k| decide(policy, model[k].clone(), now, costs[k], mode(peek)))
                    .collect();
                let admitted = steps.iter().all(|s| s.decision.allowed);
                let expected: Vec<Decision> = steps.iter().map(|s| s.decision.clone()).collect();
                if admitted && !peek {
                    for (k, step) in steps.into_iter().enumerate() {
                        model[k] = step.state;
                    }
                }
                let got = got.expect("valid batch").decisions;
                prop_assert_eq!(got, expected, "op {} {:?}", i, op);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decisions_equal_the_pure_algorithm(
        (policy, ops) in policy().prop_flat_map(|p| { let o = ops(&p); (Just(p), o) }),
        start in 1_600_000_000_000_000u64..1_900_000_000_000_000,
        one_shard in any::<bool>(),
    ) {
        run(&policy, &ops, start, if one_shard { 1 } else { 64 })?;
    }
}

/// Every algorithm at least once, whatever proptest draws: a fixed scenario that crosses
/// expiry, including a state read exactly at its `expires_at`.
#[test]
fn every_algorithm_agrees_across_expiry() {
    for algorithm in Algorithm::ALL {
        let policy = Policy::new(algorithm, 3, Duration::from_millis(300)).expect("policy");
        let mut ops = Vec::new();
        for _ in 0..4 {
            ops.push(Op::Check {
                key: 0,
                cost: 1,
                peek: false,
            });
        }
        for step in [100_000, 100_000, 99_999, 1, 300_000, 600_000] {
            ops.push(Op::Advance(step));
            ops.push(Op::Check {
                key: 0,
                cost: 1,
                peek: true,
            });
            ops.push(Op::Check {
                key: 0,
                cost: 2,
                peek: false,
            });
            ops.push(Op::Batch {
                costs: [1, 1],
                peek: false,
            });
        }
        run(&policy, &ops, 1_700_000_000_000_000, 4).expect("agrees");
    }
}
