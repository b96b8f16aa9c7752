//! Helpers shared by the test binaries of statehouse-redis.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use statehouse_core::algorithm::{State, decide};
use statehouse_core::{
    Algorithm, Clock, Decision, LimitCheck, ManualClock, Mode, Policy, RateLimitStore, Timestamp,
};
use statehouse_redis::{RedisStore, RedisTopology, TimeSource};
use statehouse_testkit::{RedisCluster, raw_command, unique_prefix};

/// A per-test key prefix for a store: unique, brace-free, ending in `:`.
pub fn store_prefix(name: &str) -> String {
    let mut prefix = unique_prefix(name);
    prefix.truncate(60);
    prefix.push(':');
    prefix
}

/// One policy of every algorithm: `limit` per hour (long enough that nothing refills while a
/// test runs on server time).
pub fn hourly_policies(limit: u64) -> Vec<Policy> {
    Algorithm::ALL
        .into_iter()
        .map(|alg| Policy::new(alg, limit, Duration::from_secs(3600)).expect("valid policy"))
        .collect()
}

/// How many single-unit requests `policy` admits at one instant from a fresh state.
pub fn admitted_at_once(policy: &Policy) -> u64 {
    let now = Timestamp::from_micros(1_800_000_000_000_000);
    let mut state = None;
    let mut admitted = 0;
    loop {
        let step = decide(policy, state.take(), now, 1, Mode::Consume);
        if !step.decision.allowed {
            return admitted;
        }
        admitted += 1;
        state = step.state;
    }
}

/// Runs a command on the cluster node that owns the key it names (tries every node, skipping
/// `MOVED` redirections).
pub fn cluster_command(cluster: &RedisCluster, args: &[&str]) -> String {
    for port in cluster.ports() {
        let reply = raw_command(port, args).expect("cluster node answers");
        if !reply.starts_with("ERR MOVED") {
            return reply;
        }
    }
    panic!("no node of the cluster owns the key of {args:?}");
}

/// A small deterministic generator (xorshift64*), so a failing sequence can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Log-uniform in `1..=max`, to reach both small and huge values.
fn log_uniform(rng: &mut Rng, max: u64) -> u64 {
    let bits = 64 - max.leading_zeros() as u64;
    let v = rng.next() >> (64 - 1 - rng.below(bits));
    v.clamp(1, max)
}

/// A policy with values anywhere in the accepted ranges (limits up to 10^9, periods up to ten
/// years), where doubles and integer division are most likely to go wrong.
fn wide_policy(rng: &mut Rng) -> Policy {
    loop {
        let alg = *rng.pick(&Algorithm::ALL);
        let max_limit = if alg == Algorithm::SlidingWindowLog {
            1_000
        } else {
            statehouse_core::MAX_LIMIT
        };
        let limit = log_uniform(rng, max_limit);
        let period = Duration::from_micros(
            log_uniform(rng, statehouse_core::MAX_PERIOD.as_micros() as u64).max(1_000),
        );
        let Ok(mut policy) = Policy::new(alg, limit, period) else {
            continue;
        };
        if alg.has_burst() && rng.below(2) == 0 {
            match policy
                .clone()
                .with_burst(log_uniform(rng, statehouse_core::MAX_LIMIT))
            {
                Ok(p) => policy = p,
                Err(_) => continue,
            }
        }
        if alg == Algorithm::LeakyBucket {
            let max_delay = Duration::from_micros(log_uniform(
                rng,
                statehouse_core::MAX_PERIOD.as_micros() as u64,
            ));
            policy = policy.with_max_delay(max_delay).expect("valid max_delay");
        }
        return policy;
    }
}

fn random_policy(rng: &mut Rng) -> Policy {
    if rng.below(3) == 0 {
        return wide_policy(rng);
    }
    let periods_us = [1_000, 7_000, 100_000, 1_000_000, 13_000_000, 3_600_000_000];
    let alg = *rng.pick(&Algorithm::ALL);
    let limit = 1 + rng.below(6);
    let period = Duration::from_micros(*rng.pick(&periods_us));
    let mut policy = Policy::new(alg, limit, period).expect("valid policy");
    if alg.has_burst() && rng.below(2) == 0 {
        policy = policy.with_burst(1 + rng.below(8)).expect("valid burst");
    }
    if alg == Algorithm::LeakyBucket {
        let max_delay = match rng.below(4) {
            0 => Duration::ZERO,
            1 => period / 2,
            2 => period,
            _ => period * 2,
        };
        policy = policy.with_max_delay(max_delay).expect("valid max_delay");
    }
    policy
}

/// A store on `topology` deciding on `clock`, with a skew allowance large enough that no key
/// expires in real time while a test runs (the manual clock runs far ahead of real time).
pub async fn caller_time_store(
    topology: RedisTopology,
    prefix: &str,
    clock: &ManualClock,
) -> RedisStore {
    RedisStore::builder(topology)
        .prefix(prefix)
        .time_source(TimeSource::Caller(Arc::new(clock.clone())))
        .skew_allowance(Duration::from_secs(600))
        .connect()
        .await
        .expect("connect")
}

/// Drives `store` and the pure `algorithm::decide` through the same random sequence of batches
/// (several keys and policies, random costs, peeks, clock jumps) and asserts every decision is
/// identical.
pub async fn assert_matches_decide(
    store: &RedisStore,
    clock: &ManualClock,
    seed: u64,
    steps: usize,
) {
    let mut rng = Rng::new(seed);
    let policies: Vec<Policy> = (0..10).map(|_| random_policy(&mut rng)).collect();
    let keys = ["k0", "k1", "k2", "user {7}\n", "k4"];
    // The model's states, keyed like storage keys: (key, algorithm, period).
    let mut states: HashMap<(&str, Algorithm, u64), Option<State>> = HashMap::new();
    for step in 0..steps {
        match rng.below(10) {
            0..=2 => {}
            3..=6 => clock.advance(Duration::from_micros(rng.below(2_000))),
            7 | 8 => clock.advance(Duration::from_micros(rng.below(200_000))),
            9 if rng.below(4) == 0 => {
                clock.advance(Duration::from_micros(log_uniform(&mut rng, 1 << 48)));
            }
            _ => clock.advance(Duration::from_micros(rng.below(20_000_000))),
        }
        let mode = if rng.below(5) == 0 {
            Mode::Peek
        } else {
            Mode::Consume
        };
        let mut batch: Vec<(&str, &Policy, u64)> = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let key = *rng.pick(&keys);
            let policy = rng.pick(&policies);
            let slot = (key, policy.algorithm(), policy.period_micros());
            if batch
                .iter()
                .any(|(k, p, _)| (*k, p.algorithm(), p.period_micros()) == slot)
            {
                continue;
            }
            let cost = match rng.below(8) {
                0 | 1 => 1 + rng.below(policy.capacity()),
                2 => log_uniform(&mut rng, policy.capacity()),
                _ => 1,
            };
            batch.push((key, policy, cost));
        }
        let now = clock.now();
        let expected_steps: Vec<_> = batch
            .iter()
            .map(|(key, policy, cost)| {
                let state = states
                    .get(&(*key, policy.algorithm(), policy.period_micros()))
                    .cloned()
                    .flatten();
                decide(policy, state, now, *cost, mode)
            })
            .collect();
        let expected: Vec<Decision> = expected_steps.iter().map(|s| s.decision.clone()).collect();
        if mode == Mode::Consume && expected.iter().all(|d| d.allowed) {
            for ((key, policy, _), step) in batch.iter().zip(&expected_steps) {
                states.insert(
                    (*key, policy.algorithm(), policy.period_micros()),
                    step.state.clone(),
                );
            }
        }
        let checks: Vec<LimitCheck<'_>> = batch
            .iter()
            .map(|(key, policy, cost)| LimitCheck::new(key, policy, *cost))
            .collect();
        let verdict = store.check(&checks, mode).await.expect("check");
        assert_eq!(
            verdict.decisions, expected,
            "seed {seed}, step {step}, now {now}, {mode:?}, batch {batch:?}"
        );
    }
}
