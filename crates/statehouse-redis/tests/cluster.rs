//! RedisStore on a Redis Cluster (the shared 3-master test cluster).

mod common;

use std::time::Duration;

use statehouse_core::{
    Algorithm, Decision, Error, LimitCheck, ManualClock, Mode, Policy, RateLimitStore,
};
use statehouse_redis::{RedisStore, RedisTopology, hash_slot};
use statehouse_testkit::{raw_command, shared_cluster};

use common::{
    admitted_at_once, assert_matches_decide, caller_time_store, cluster_command, hourly_policies,
    store_prefix,
};

fn topology() -> RedisTopology {
    RedisTopology::Cluster(shared_cluster().urls())
}

async fn store(name: &str) -> RedisStore {
    RedisStore::builder(topology())
        .prefix(&store_prefix(name))
        // Correctness, not latency, is under test here: a cost-100 000 sliding log on a machine
        // whose two cores are shared with other work took more than the 1 s default.
        .call_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect")
}

async fn consume(store: &RedisStore, key: &str, policy: &Policy) -> Decision {
    let verdict = store
        .check(&[LimitCheck::new(key, policy, 1)], Mode::Consume)
        .await
        .expect("check");
    verdict.decisions[0].clone()
}

async fn peek(store: &RedisStore, key: &str, policy: &Policy) -> Decision {
    let verdict = store
        .check(&[LimitCheck::new(key, policy, 1)], Mode::Peek)
        .await
        .expect("peek");
    verdict.decisions[0].clone()
}

/// Two keys whose storage keys fall in different slots (and on the 3-master cluster, most
/// likely on different nodes).
fn keys_in_different_slots() -> (&'static str, &'static str) {
    let (a, b) = ("user:1", "tenant:9");
    assert_ne!(hash_slot(a.as_bytes()), hash_slot(b.as_bytes()));
    (a, b)
}

#[test]
fn hash_slot_agrees_with_cluster_keyslot() {
    let port = shared_cluster().ports()[0];
    for key in [
        "foo",
        "123456789",
        "sh:rl:{user:1}:gcra:60000000",
        "a{}b",
        "{{x}}",
        "x{",
        "ünï",
    ] {
        let slot = raw_command(port, &["CLUSTER", "KEYSLOT", key]).expect("KEYSLOT");
        assert_eq!(slot, hash_slot(key.as_bytes()).to_string(), "{key}");
    }
}

#[tokio::test]
async fn each_algorithm_admits_its_allowance_then_denies() {
    let store = store("basic").await;
    for key in ["user:1", "user:2", "user:3"] {
        for policy in hourly_policies(3) {
            for _ in 0..admitted_at_once(&policy) {
                assert!(consume(&store, key, &policy).await.allowed);
            }
            let d = consume(&store, key, &policy).await;
            assert!(!d.allowed, "{}", policy.algorithm());
            assert!(d.retry_after.is_some());
        }
    }
}

#[tokio::test]
async fn every_written_key_has_a_ttl() {
    let store = store("ttl").await;
    let cluster = shared_cluster();
    for policy in hourly_policies(5) {
        assert!(consume(&store, "ttl-key", &policy).await.allowed);
        let key = store.storage_key("ttl-key", &policy).expect("key");
        let pttl: i64 = cluster_command(cluster, &["PTTL", &key])
            .parse()
            .expect("integer");
        assert!(pttl > 0, "{}: PTTL {pttl}", policy.algorithm());
    }
}

#[tokio::test]
async fn limits_on_one_key_share_a_slot_and_one_atomic_script() {
    let store = store("one-slot").await;
    let per_second = Policy::fixed_window(5, Duration::from_secs(1)).expect("policy");
    let per_hour = Policy::gcra(1, Duration::from_secs(3600)).expect("policy");
    let a = store.storage_key("user:1", &per_second).expect("key");
    let b = store.storage_key("user:1", &per_hour).expect("key");
    assert_eq!(hash_slot(a.as_bytes()), hash_slot(b.as_bytes()));
    let batch = [
        LimitCheck::new("user:1", &per_second, 1),
        LimitCheck::new("user:1", &per_hour, 1),
    ];
    assert!(
        store
            .check(&batch, Mode::Consume)
            .await
            .expect("check")
            .allowed()
    );
    let v = store.check(&batch, Mode::Consume).await.expect("check");
    assert!(!v.allowed());
    assert!(v.decisions[0].allowed);
}

/// A cross-slot batch: the denial leaves every other limit unconsumed, whichever slot is
/// consumed first, and for every algorithm's refund.
#[tokio::test]
async fn a_cross_slot_batch_is_all_or_nothing() {
    let store = store("cross-slot").await;
    let (roomy_key, tight_key) = keys_in_different_slots();
    let tight = Policy::gcra(1, Duration::from_secs(3600)).expect("policy");
    for roomy in hourly_policies(5) {
        let tight_key = format!("{tight_key}:{}", roomy.algorithm());
        let roomy_key = format!("{roomy_key}:{}", roomy.algorithm());
        if hash_slot(roomy_key.as_bytes()) == hash_slot(tight_key.as_bytes()) {
            continue;
        }
        // The roomy limit first (consumed, then refunded) and last (never consumed).
        let orders = [
            [
                LimitCheck::new(&roomy_key, &roomy, 1),
                LimitCheck::new(&tight_key, &tight, 1),
            ],
            [
                LimitCheck::new(&tight_key, &tight, 1),
                LimitCheck::new(&roomy_key, &roomy, 1),
            ],
        ];
        let first = store.check(&orders[0], Mode::Consume).await.expect("check");
        assert!(first.allowed(), "{}", roomy.algorithm());
        let before = peek(&store, &roomy_key, &roomy).await;
        for batch in &orders {
            let v = store.check(batch, Mode::Consume).await.expect("check");
            assert!(!v.allowed(), "{}", roomy.algorithm());
            assert_eq!(v.decisions.iter().filter(|d| d.allowed).count(), 1);
            let after = peek(&store, &roomy_key, &roomy).await;
            assert_eq!(after.remaining, before.remaining, "{}", roomy.algorithm());
        }
        // Peek across slots changes nothing either.
        let v = store.check(&orders[0], Mode::Peek).await.expect("peek");
        assert!(!v.allowed());
        assert_eq!(
            peek(&store, &roomy_key, &roomy).await.remaining,
            before.remaining
        );
    }
}

#[tokio::test]
async fn a_cross_slot_batch_that_admits_consumes_every_slot() {
    let store = store("cross-slot-ok").await;
    let policy = Policy::fixed_window(3, Duration::from_secs(3600)).expect("policy");
    let keys = ["a", "b", "c", "d", "e", "f"];
    let checks: Vec<_> = keys
        .iter()
        .map(|k| LimitCheck::new(k, &policy, 1))
        .collect();
    let v = store.check(&checks, Mode::Consume).await.expect("check");
    assert!(v.allowed());
    assert!(v.decisions.iter().all(|d| d.remaining == 2));
    for key in keys {
        assert_eq!(peek(&store, key, &policy).await.remaining, 1, "{key}");
    }
}

#[tokio::test]
async fn corrupt_state_is_a_backend_error() {
    let store = store("corrupt").await;
    let cluster = shared_cluster();
    let gcra = Policy::gcra(3, Duration::from_secs(3600)).expect("policy");
    let fixed = Policy::fixed_window(3, Duration::from_secs(3600)).expect("policy");
    let key = store.storage_key("garbage", &gcra).expect("key");
    assert_eq!(cluster_command(cluster, &["SET", &key, "garbage"]), "OK");
    let key = store.storage_key("garbage", &fixed).expect("key");
    cluster_command(cluster, &["HSET", &key, "w", "x", "c", "1"]);
    for policy in [&gcra, &fixed] {
        let err = store
            .check(&[LimitCheck::new("garbage", policy, 1)], Mode::Consume)
            .await
            .expect_err("corrupt");
        assert!(matches!(err, Error::Backend { .. }), "{err:?}");
    }
}

#[tokio::test]
async fn odd_keys_work() {
    let store = store("odd").await;
    let policy = Policy::sliding_log(1, Duration::from_secs(3600)).expect("policy");
    let long = "é".repeat(32 * 1024);
    for key in ["with space", "new\nline", "{braces}", "a}b{c", &long] {
        assert!(consume(&store, key, &policy).await.allowed);
        assert!(!consume(&store, key, &policy).await.allowed);
    }
    let per_key = Policy::gcra(1, Duration::from_secs(3600)).expect("policy");
    // Odd keys in a cross-slot batch too.
    let checks: Vec<_> = ["with space", "new\nline", "{braces}", &long]
        .into_iter()
        .map(|k| LimitCheck::new(k, &per_key, 1))
        .collect();
    assert!(
        store
            .check(&checks, Mode::Consume)
            .await
            .expect("check")
            .allowed()
    );
    assert!(
        !store
            .check(&checks, Mode::Consume)
            .await
            .expect("check")
            .allowed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cross_slot_batches_never_exceed_any_limit() {
    let store = store("concurrent").await;
    let per_user = Policy::gcra(10, Duration::from_secs(3600)).expect("policy");
    let global = Policy::fixed_window(25, Duration::from_secs(3600)).expect("policy");
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let store = store.clone();
            let (per_user, global) = (per_user.clone(), global.clone());
            tokio::spawn(async move {
                let user = format!("user:{}", i % 3);
                let checks = [
                    LimitCheck::new(&user, &per_user, 1),
                    LimitCheck::new("global", &global, 1),
                ];
                store
                    .check(&checks, Mode::Consume)
                    .await
                    .expect("check")
                    .allowed()
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        if task.await.expect("task") {
            admitted += 1;
        }
    }
    // 3 users × 10 would admit 30; the global limit caps at 25. The global limit is the last
    // slot consumed, so a refund (of a user's consumption) only happens once it is exhausted,
    // and cannot cost an admission here.
    assert_eq!(admitted, 25);
}

#[tokio::test]
async fn decisions_match_the_pure_algorithm() {
    // STATEHOUSE_REDIS_DIFF_SEEDS=500 runs a longer search.
    let seeds: u64 = std::env::var("STATEHOUSE_REDIS_DIFF_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    for seed in 1..=seeds {
        let clock = ManualClock::starting_now();
        let store = caller_time_store(topology(), &store_prefix("differential"), &clock).await;
        assert_matches_decide(&store, &clock, seed * 104_729, 120).await;
    }
}

#[test]
fn the_algorithm_list_is_complete() {
    // The cluster tests above loop over `hourly_policies`; make sure it covers every algorithm.
    assert_eq!(hourly_policies(1).len(), Algorithm::ALL.len());
}

#[tokio::test]
async fn a_sliding_log_of_the_largest_cost_is_consumed_and_refunded_whole() {
    let store = store("big-log").await;
    let cluster = shared_cluster();
    let limit = statehouse_core::MAX_SLIDING_LOG_LIMIT;
    let log = Policy::sliding_log(limit, Duration::from_secs(3600)).expect("policy");
    let tight = Policy::gcra(1, Duration::from_secs(3600)).expect("policy");
    let (log_key, tight_key) = keys_in_different_slots();
    assert!(consume(&store, tight_key, &tight).await.allowed);
    let batch = [
        LimitCheck::new(log_key, &log, limit),
        LimitCheck::new(tight_key, &tight, 1),
    ];
    let v = store.check(&batch, Mode::Consume).await.expect("check");
    assert!(v.decisions[0].allowed && !v.decisions[1].allowed);
    let storage_key = store.storage_key(log_key, &log).expect("key");
    // Consumed in full, then refunded in full: the emptied log is gone.
    assert_eq!(cluster_command(cluster, &["EXISTS", &storage_key]), "0");
    let v = store
        .check(&[LimitCheck::new(log_key, &log, limit)], Mode::Consume)
        .await
        .expect("check");
    assert!(v.allowed());
    assert_eq!(
        cluster_command(cluster, &["ZCARD", &storage_key]),
        limit.to_string()
    );
    assert!(!consume(&store, log_key, &log).await.allowed);
}

/// A store on plain `redis://` seeds installs no rustls crypto provider: that stays the
/// application's choice (`install_default` fails once one is installed). No test of this binary
/// uses TLS.
#[tokio::test]
async fn a_plain_cluster_leaves_the_rustls_provider_alone() {
    let store = store("no-tls").await;
    let policy = Policy::gcra(10, Duration::from_secs(60)).expect("policy");
    store
        .check(&[LimitCheck::new("k", &policy, 1)], Mode::Consume)
        .await
        .expect("check");
    assert!(rustls::crypto::CryptoProvider::get_default().is_none());
}
