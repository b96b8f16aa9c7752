//! Coalescing of concurrent single checks (`src/batch.rs`): checks decided together in one
//! script call are decided exactly as if each were a call of its own.

mod common;

use std::sync::Arc;
use std::time::Duration;

use statehouse_core::{Error, LimitCheck, ManualClock, Mode, Policy, RateLimitStore};
use statehouse_redis::{RedisStore, RedisTopology, TimeSource};
use statehouse_testkit::{RedisServer, raw_command, shared_cluster, shared_standalone};

use common::{admitted_at_once, hourly_policies, store_prefix};

async fn store_on(topology: RedisTopology, name: &str) -> RedisStore {
    RedisStore::builder(topology)
        .prefix(&store_prefix(name))
        .call_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect")
}

fn topologies() -> [RedisTopology; 2] {
    [
        RedisTopology::Standalone(shared_standalone().url()),
        RedisTopology::Cluster(shared_cluster().urls()),
    ]
}

/// Many concurrent single checks on one key, under every algorithm at once (so batches mix
/// policies): exactly the allowance is admitted, and each later check of the same state saw
/// the earlier ones' writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_of_one_key_admit_exactly_the_allowance() {
    for topology in topologies() {
        let store = store_on(topology, "batch-one-key").await;
        let policies = hourly_policies(40);
        let mut tasks = Vec::new();
        for round in 0..120 {
            for (index, policy) in policies.iter().enumerate() {
                let store = store.clone();
                let policy = policy.clone();
                let key = if round % 2 == 0 { "hot" } else { "hot2" };
                tasks.push(tokio::spawn(async move {
                    let allowed = store
                        .check(&[LimitCheck::new(key, &policy, 1)], Mode::Consume)
                        .await
                        .expect("check")
                        .allowed();
                    (index, allowed)
                }));
            }
        }
        let mut admitted = vec![0; policies.len()];
        for task in tasks {
            let (index, allowed) = task.await.expect("task");
            if allowed {
                admitted[index] += 1;
            }
        }
        for (policy, admitted) in policies.iter().zip(admitted) {
            assert_eq!(
                admitted,
                2 * admitted_at_once(policy),
                "{}",
                policy.algorithm()
            );
        }
    }
}

/// A corrupt key among concurrent checks fails its own callers only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_key_fails_only_its_own_checks() {
    let server = shared_standalone();
    let store = store_on(RedisTopology::Standalone(server.url()), "batch-corrupt").await;
    let policy = Policy::gcra(1_000, Duration::from_secs(60)).expect("policy");
    let bad = store.storage_key("bad", &policy).expect("key");
    assert_eq!(
        raw_command(server.port(), &["HSET", &bad, "t", "1"]).expect("HSET"),
        "1"
    );
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            let policy = policy.clone();
            tokio::spawn(async move {
                let key = if i % 10 == 0 {
                    "bad".to_owned()
                } else {
                    format!("good:{i}")
                };
                let result = store
                    .check(&[LimitCheck::new(&key, &policy, 1)], Mode::Consume)
                    .await;
                (key, result)
            })
        })
        .collect();
    for task in tasks {
        let (key, result) = task.await.expect("task");
        if key == "bad" {
            let err = result.expect_err("corrupt");
            assert!(matches!(err, Error::Backend { .. }), "{err:?}");
        } else {
            assert!(result.expect(&key).allowed(), "{key}");
        }
    }
}

/// Consumes and peeks of one key interleaved in a batch, with caller time: each check uses its
/// own time and mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peeks_and_consumes_mix_in_a_batch() {
    for topology in topologies() {
        let clock = Arc::new(ManualClock::starting_now());
        let store = RedisStore::builder(topology)
            .prefix(&store_prefix("batch-mix"))
            .time_source(TimeSource::Caller(clock.clone()))
            .connect()
            .await
            .expect("connect");
        let policy = Policy::fixed_window(50, Duration::from_secs(3600)).expect("policy");
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let store = store.clone();
                let policy = policy.clone();
                let mode = if i % 2 == 0 {
                    Mode::Consume
                } else {
                    Mode::Peek
                };
                tokio::spawn(async move {
                    let d = store
                        .check(&[LimitCheck::new("mixed", &policy, 1)], mode)
                        .await
                        .expect("check")
                        .decisions[0]
                        .clone();
                    (mode, d)
                })
            })
            .collect();
        let mut consumed = 0;
        for task in tasks {
            let (mode, d) = task.await.expect("task");
            if mode == Mode::Consume {
                assert!(d.allowed);
                consumed += 1;
            } else {
                // A peek sees the consumes decided before it, and never writes.
                assert!(d.allowed || d.remaining == 0, "{d:?}");
            }
        }
        assert_eq!(consumed, 50);
        let d = store
            .check(&[LimitCheck::new("mixed", &policy, 1)], Mode::Peek)
            .await
            .expect("peek")
            .decisions[0]
            .clone();
        assert!(!d.allowed);
        assert_eq!(d.remaining, 0);
    }
}

fn evalsha_calls(port: u16) -> u64 {
    let info = raw_command(port, &["INFO", "commandstats"]).expect("INFO");
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().expect("calls"))
}

/// Under concurrency, checks share script calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_share_script_calls() {
    let server = tokio::task::spawn_blocking(|| RedisServer::start().expect("start redis"))
        .await
        .expect("start task");
    let store = store_on(RedisTopology::Standalone(server.url()), "batch-calls").await;
    let policy = Policy::gcra(1_000_000, Duration::from_secs(3600)).expect("policy");
    // Loads the script.
    store
        .check(&[LimitCheck::new("warm", &policy, 1)], Mode::Consume)
        .await
        .expect("check");
    let before = evalsha_calls(server.port());
    let checks = 512;
    let tasks: Vec<_> = (0..checks)
        .map(|i| {
            let store = store.clone();
            let policy = policy.clone();
            tokio::spawn(async move {
                store
                    .check(
                        &[LimitCheck::new(&format!("user:{i}"), &policy, 1)],
                        Mode::Consume,
                    )
                    .await
                    .expect("check")
                    .allowed()
            })
        })
        .collect();
    for task in tasks {
        assert!(task.await.expect("task"));
    }
    let calls = evalsha_calls(server.port()) - before;
    assert!(calls < checks, "{calls} script calls for {checks} checks");
}
