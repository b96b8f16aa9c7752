//! Fleet exactness: three replicas (three limiters, each on its own Redis connection), 64
//! concurrent tasks each, against one Redis (standalone, and a 3-master Cluster). The number
//! admitted equals the limit exactly for fixed window, sliding log, token bucket and GCRA, and
//! stays within the documented bound for the sliding window counter. And replicas whose own
//! clocks are seconds apart still admit exactly the limit, because the scripts read Redis `TIME`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Deployment;
use statehouse::{
    Algorithm, Clock, DegradedPolicy, ManualClock, Policy, RateLimiter, TimeSource, Timestamp,
};
use statehouse_testkit::unique_prefix;

const REPLICAS: usize = 3;
const TASKS_PER_REPLICA: usize = 64;
const LIMIT: u64 = 100;

async fn replica(
    deployment: Deployment,
    prefix: &str,
    time: TimeSource,
    clock: ManualClock,
) -> RateLimiter {
    let store = deployment
        .store_builder()
        .prefix(prefix)
        .time_source(time)
        .call_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect");
    RateLimiter::builder(store)
        // A loaded CI machine must not turn a slow answer into a degraded decision here: any
        // store failure fails the test instead.
        .on_store_failure(DegradedPolicy::ReturnError)
        .deadline(Duration::from_secs(10))
        .clock(Arc::new(clock))
        .build()
        .expect("limiter")
}

/// Runs 3 × 64 concurrent attempts of one unit on one key; returns how many were admitted.
async fn admitted_by_fleet(limiters: &[RateLimiter], policy: &Policy, key: &str) -> u64 {
    let mut tasks = Vec::new();
    for limiter in limiters {
        for _ in 0..TASKS_PER_REPLICA {
            let limiter = limiter.clone();
            let policy = policy.clone();
            let key = key.to_owned();
            tasks.push(tokio::spawn(async move {
                limiter.check(&key, &policy).await.expect("decision")
            }));
        }
    }
    let mut admitted = 0;
    for t in tasks {
        let d = t.await.expect("task");
        assert!(!d.degraded);
        admitted += u64::from(d.allowed);
    }
    admitted
}

fn fleet_policy(alg: Algorithm) -> Policy {
    // A period so long that nothing refills or rolls over while the test runs: the only way to
    // admit more than the limit would be a race between replicas.
    Policy::new(alg, LIMIT, Duration::from_secs(30 * 86_400)).expect("policy")
}

async fn fleet_is_exact(deployment: Deployment) {
    let prefix = format!("{}:", unique_prefix("fleet"));
    let mut limiters = Vec::new();
    for _ in 0..REPLICAS {
        limiters.push(
            replica(
                deployment,
                &prefix,
                TimeSource::Server,
                ManualClock::starting_now(),
            )
            .await,
        );
    }
    for alg in [
        Algorithm::FixedWindow,
        Algorithm::SlidingWindowLog,
        Algorithm::TokenBucket,
        Algorithm::Gcra,
    ] {
        let admitted = admitted_by_fleet(&limiters, &fleet_policy(alg), "tenant:1").await;
        assert_eq!(admitted, LIMIT, "{alg} on {deployment:?}");
    }
    // The sliding window counter: exactly the limit within one aligned window; across a window
    // boundary the documented bound is 2 × limit.
    let admitted = admitted_by_fleet(
        &limiters,
        &fleet_policy(Algorithm::SlidingWindowCounter),
        "tenant:1",
    )
    .await;
    assert!(
        (LIMIT..=2 * LIMIT).contains(&admitted),
        "sliding counter admitted {admitted}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_admit_exactly_the_limit_on_redis() {
    fleet_is_exact(Deployment::Standalone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_admit_exactly_the_limit_on_redis_cluster() {
    fleet_is_exact(Deployment::Cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_admit_exactly_the_limit_over_tls() {
    fleet_is_exact(Deployment::StandaloneTls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_admit_exactly_the_limit_on_redis_cluster_over_tls() {
    fleet_is_exact(Deployment::ClusterTls).await;
}

fn skewed_clocks() -> Vec<ManualClock> {
    let now = statehouse::SystemClock.now().as_micros();
    [0i64, 60_000_000, -30_000_000]
        .into_iter()
        .map(|skew| ManualClock::new(Timestamp::from_micros(now.saturating_add_signed(skew))))
        .collect()
}

/// GCRA, 100 per 1 000 s: one unit refills every 10 s, so a replica whose clock ran 60 s
/// ahead would see 6 units refilled, if its own clock counted. Nothing refills in real time
/// while the test runs.
fn skew_policy() -> Policy {
    Policy::gcra(LIMIT, Duration::from_secs(1_000)).expect("policy")
}

/// Replica 0 uses the whole limit, then every replica (clocks 0, +60 s, −30 s) tries again.
async fn sequential_skew_run(limiters: &[RateLimiter], key: &str) -> u64 {
    let policy = skew_policy();
    let mut admitted = 0;
    for limiter in limiters {
        for _ in 0..LIMIT {
            let d = limiter.check(key, &policy).await.expect("decision");
            admitted += u64::from(d.allowed);
        }
    }
    admitted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_skewed_clocks_admit_exactly_the_limit() {
    let prefix = format!("{}:", unique_prefix("skew"));
    let mut limiters = Vec::new();
    for clock in skewed_clocks() {
        limiters.push(replica(Deployment::Standalone, &prefix, TimeSource::Server, clock).await);
    }
    assert_eq!(
        admitted_by_fleet(&limiters, &skew_policy(), "tenant:concurrent").await,
        LIMIT
    );
    assert_eq!(
        sequential_skew_run(&limiters, "tenant:sequential").await,
        LIMIT
    );
}

/// Why server time is the default: the same fleet deciding on its own skewed clocks
/// over-admits: the replica 60 s ahead refills 6 units for itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_clocks_with_skew_would_over_admit() {
    let prefix = format!("{}:", unique_prefix("skew-caller"));
    let mut limiters = Vec::new();
    for clock in skewed_clocks() {
        let source = TimeSource::Caller(Arc::new(clock.clone()));
        limiters.push(replica(Deployment::Standalone, &prefix, source, clock).await);
    }
    assert_eq!(
        sequential_skew_run(&limiters, "tenant:sequential").await,
        LIMIT + 6
    );
}
