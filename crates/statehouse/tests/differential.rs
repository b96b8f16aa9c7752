//! Differential property test: random sequences of (advance the clock, check with a cost, peek,
//! reset, check several limits at once) over random policies give identical decisions on the
//! embedded store, Redis standalone and Redis Cluster, and on the pure reference
//! (`statehouse_core::algorithm::decide`).

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::{Deployment, Embedded, Redis};
use proptest::prelude::*;
use statehouse::{Algorithm, LimitCheck, ManualClock, Mode, Policy, RateLimitStore};
use statehouse_testkit::ratelimit_suite::{Reference, StoreFactory};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

#[derive(Debug, Clone)]
enum Op {
    Advance(u64),
    Check {
        policy: usize,
        key: usize,
        cost: u64,
    },
    Peek {
        policy: usize,
        key: usize,
    },
    Reset {
        policy: usize,
        key: usize,
    },
    /// Two limits at once; the policies must differ in (algorithm, period) or key.
    Pair {
        a: usize,
        b: usize,
        key_a: usize,
        key_b: usize,
    },
}

const KEYS: [&str; 3] = ["alice", "bob {x}", "carol\nnewline"];

fn policy_strategy() -> impl Strategy<Value = Policy> {
    (
        prop::sample::select(Algorithm::ALL.to_vec()),
        1u64..=8,
        prop_oneof![1u64..=50, 50u64..=5_000, 5_000u64..=120_000],
        1u64..=8,
        0u64..=4_000,
    )
        .prop_map(|(alg, limit, period_ms, burst, delay_ms)| {
            let mut p = Policy::new(alg, limit, Duration::from_millis(period_ms)).expect("policy");
            if alg.has_burst() {
                p = p.with_burst(burst).expect("burst");
            }
            if alg == Algorithm::LeakyBucket {
                p = p
                    .with_max_delay(Duration::from_millis(delay_ms))
                    .expect("delay");
            }
            p
        })
}

fn op_strategy(n_policies: usize) -> impl Strategy<Value = Op> {
    let p = 0..n_policies;
    let k = 0..KEYS.len();
    prop_oneof![
        2 => prop_oneof![0u64..2_000, 0u64..200_000, 0u64..30_000_000].prop_map(Op::Advance),
        6 => (p.clone(), k.clone(), 1u64..=3).prop_map(|(policy, key, cost)| Op::Check { policy, key, cost }),
        1 => (p.clone(), k.clone()).prop_map(|(policy, key)| Op::Peek { policy, key }),
        1 => (p.clone(), k.clone()).prop_map(|(policy, key)| Op::Reset { policy, key }),
        2 => (p.clone(), p, k.clone(), k).prop_map(|(a, b, key_a, key_b)| Op::Pair { a, b, key_a, key_b }),
    ]
}

fn scenario() -> impl Strategy<Value = (Vec<Policy>, Vec<Op>)> {
    prop::collection::vec(policy_strategy(), 1..=4).prop_flat_map(|policies| {
        let n = policies.len();
        (Just(policies), prop::collection::vec(op_strategy(n), 1..60))
    })
}

async fn run(policies: &[Policy], ops: &[Op]) -> Result<(), TestCaseError> {
    let clock = ManualClock::starting_now();
    let standalone = Redis::new(Deployment::Standalone);
    let cluster = Redis::new(Deployment::Cluster);
    let stores: Vec<(&str, Arc<dyn RateLimitStore>)> = vec![
        ("embedded", Embedded.make(&clock).await),
        ("redis", standalone.make(&clock).await),
        ("cluster", cluster.make(&clock).await),
    ];
    let mut reference = Reference::default();
    for op in ops {
        let (checks, mode): (Vec<LimitCheck<'_>>, Mode) = match *op {
            Op::Advance(us) => {
                clock.advance(Duration::from_micros(us));
                continue;
            }
            Op::Reset { policy, key } => {
                for (name, s) in &stores {
                    s.reset(KEYS[key], &policies[policy])
                        .await
                        .map_err(|e| TestCaseError::fail(format!("{name} reset: {e}")))?;
                }
                reference.reset(KEYS[key], &policies[policy]);
                continue;
            }
            Op::Check { policy, key, cost } => {
                let p = &policies[policy];
                (
                    vec![LimitCheck::new(KEYS[key], p, cost.min(p.capacity()))],
                    Mode::Consume,
                )
            }
            Op::Peek { policy, key } => (
                vec![LimitCheck::new(KEYS[key], &policies[policy], 1)],
                Mode::Peek,
            ),
            Op::Pair { a, b, key_a, key_b } => {
                let (pa, pb) = (&policies[a], &policies[b]);
                let same_state = KEYS[key_a] == KEYS[key_b]
                    && pa.algorithm() == pb.algorithm()
                    && pa.period() == pb.period();
                if same_state {
                    continue;
                }
                (
                    vec![
                        LimitCheck::new(KEYS[key_a], pa, 1),
                        LimitCheck::new(KEYS[key_b], pb, 1),
                    ],
                    Mode::Consume,
                )
            }
        };
        let want = reference.check(&clock, &checks, mode);
        for (name, s) in &stores {
            let got = s
                .check(&checks, mode)
                .await
                .map_err(|e| TestCaseError::fail(format!("{name}: {e} on {checks:?}")))?;
            prop_assert_eq!(
                &got,
                &want,
                "{} disagrees on {:?} ({:?})",
                name,
                checks,
                mode
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("regressions"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn embedded_redis_and_cluster_decide_identically((policies, ops) in scenario()) {
        runtime().block_on(run(&policies, &ops))?;
    }
}
