//! RedisStore on a standalone Redis (the shared test server).

mod common;

use std::sync::Arc;
use std::time::Duration;

use statehouse_core::{
    Algorithm, Clock, Error, LimitCheck, ManualClock, Mode, Policy, RateLimitStore,
};
use statehouse_redis::{RedisStore, RedisTopology, TimeSource};
use statehouse_testkit::{raw_command, shared_standalone};

use common::{
    admitted_at_once, assert_matches_decide, caller_time_store, hourly_policies, store_prefix,
};

async fn store(name: &str) -> RedisStore {
    RedisStore::builder(RedisTopology::Standalone(shared_standalone().url()))
        .prefix(&store_prefix(name))
        // Correctness, not latency, is under test here: a cost-100 000 sliding log on a machine
        // whose two cores are shared with other work took more than the 1 s default.
        .call_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect")
}

fn port() -> u16 {
    shared_standalone().port()
}

async fn consume(store: &RedisStore, key: &str, policy: &Policy) -> statehouse_core::Decision {
    let verdict = store
        .check(&[LimitCheck::new(key, policy, 1)], Mode::Consume)
        .await
        .expect("check");
    verdict.decisions[0].clone()
}

#[tokio::test]
async fn each_algorithm_admits_its_allowance_then_denies() {
    let store = store("basic").await;
    for policy in hourly_policies(3) {
        let expected = admitted_at_once(&policy);
        for i in 0..expected {
            let d = consume(&store, "user:1", &policy).await;
            assert!(d.allowed, "{} request {i}", policy.algorithm());
            assert_eq!(d.retry_after, None);
        }
        let d = consume(&store, "user:1", &policy).await;
        assert!(!d.allowed, "{}", policy.algorithm());
        assert!(d.retry_after.is_some_and(|r| r > Duration::ZERO));
        assert_eq!(d.limit, policy.capacity());
    }
}

#[tokio::test]
async fn every_written_key_has_a_ttl() {
    let store = store("ttl").await;
    for policy in hourly_policies(5) {
        let d = consume(&store, "ttl-key", &policy).await;
        assert!(d.allowed);
        let key = store.storage_key("ttl-key", &policy).expect("key");
        let pttl: i64 = raw_command(port(), &["PTTL", &key])
            .expect("PTTL")
            .parse()
            .expect("integer");
        assert!(pttl > 0, "{}: PTTL {pttl}", policy.algorithm());
        // Never longer than the state matters (one or two periods) plus a margin.
        assert!(
            pttl <= 2 * 3_600_000 + 1_000,
            "{}: PTTL {pttl}",
            policy.algorithm()
        );
    }
}

#[tokio::test]
async fn storage_keys_are_hash_tagged_and_readable() {
    let store = store("keys").await;
    let policy = Policy::gcra(100, Duration::from_secs(60)).expect("policy");
    let key = store.storage_key("user:1", &policy).expect("key");
    assert_eq!(key, format!("{}{{user:1}}:gcra:60000000", store.prefix()));
    let hashed = store.storage_key("a{b}", &policy).expect("key");
    assert!(
        hashed.starts_with(&format!("{}{{~", store.prefix())),
        "{hashed}"
    );
    assert!(store.storage_key("", &policy).is_err());
    let default = RedisStore::connect(&shared_standalone().url())
        .await
        .expect("connect");
    assert!(
        default
            .storage_key("k", &policy)
            .expect("key")
            .starts_with("sh:rl:{k}")
    );
}

#[tokio::test]
async fn a_batch_is_all_or_nothing() {
    let store = store("batch").await;
    let roomy = Policy::fixed_window(5, Duration::from_secs(3600)).expect("policy");
    let tight = Policy::gcra(1, Duration::from_secs(3600)).expect("policy");
    let batch = [
        LimitCheck::new("user:1", &roomy, 1),
        LimitCheck::new("tenant:1", &tight, 1),
    ];
    let first = store.check(&batch, Mode::Consume).await.expect("check");
    assert!(first.allowed());
    assert_eq!(first.decisions[0].remaining, 4);
    let second = store.check(&batch, Mode::Consume).await.expect("check");
    assert!(!second.allowed());
    assert!(
        second.decisions[0].allowed,
        "the roomy limit alone would admit"
    );
    assert!(!second.decisions[1].allowed);
    // The denial consumed nothing from the roomy limit.
    let peek = store
        .check(&[LimitCheck::new("user:1", &roomy, 1)], Mode::Peek)
        .await
        .expect("peek");
    assert_eq!(peek.decisions[0].remaining, 3);
    let d = consume(&store, "user:1", &roomy).await;
    assert_eq!(d.remaining, 3);
}

#[tokio::test]
async fn peek_consumes_nothing() {
    let store = store("peek").await;
    for policy in hourly_policies(2) {
        for _ in 0..5 {
            let v = store
                .check(&[LimitCheck::new("p", &policy, 1)], Mode::Peek)
                .await
                .expect("peek");
            assert!(v.allowed(), "{}", policy.algorithm());
        }
        let key = store.storage_key("p", &policy).expect("key");
        assert_eq!(raw_command(port(), &["EXISTS", &key]).expect("EXISTS"), "0");
    }
}

#[tokio::test]
async fn reset_forgets_the_state() {
    let store = store("reset").await;
    let policy = Policy::gcra(1, Duration::from_secs(3600)).expect("policy");
    assert!(consume(&store, "r", &policy).await.allowed);
    assert!(!consume(&store, "r", &policy).await.allowed);
    store.reset("r", &policy).await.expect("reset");
    assert!(consume(&store, "r", &policy).await.allowed);
    // Resetting a key that was never seen is fine.
    store.reset("never-seen", &policy).await.expect("reset");
}

#[tokio::test]
async fn invalid_input_is_rejected_before_any_io() {
    let store = store("invalid").await;
    let policy = Policy::fixed_window(3, Duration::from_secs(1)).expect("policy");
    let err = store
        .check(&[LimitCheck::new("k", &policy, 0)], Mode::Consume)
        .await
        .expect_err("cost 0");
    assert!(err.is_invalid_input(), "{err}");
    let err = store
        .check(&[LimitCheck::new("k", &policy, 4)], Mode::Consume)
        .await
        .expect_err("cost above capacity");
    assert!(err.is_invalid_input(), "{err}");
    let err = store
        .check(&[LimitCheck::new("", &policy, 1)], Mode::Consume)
        .await
        .expect_err("empty key");
    assert!(err.is_invalid_input(), "{err}");
    let empty = store.check(&[], Mode::Consume).await.expect("empty batch");
    assert!(empty.decisions.is_empty());

    let err = RedisStore::builder(RedisTopology::Standalone(shared_standalone().url()))
        .prefix("bad prefix")
        .connect()
        .await
        .expect_err("prefix with a space");
    assert!(err.is_invalid_input(), "{err}");
    let err = RedisStore::builder(RedisTopology::Standalone("not a url".into()))
        .connect()
        .await
        .expect_err("bad url");
    assert!(err.is_invalid_input(), "{err}");
    // A call timeout past an hour would overflow the deadline arithmetic of every call.
    let err = RedisStore::builder(RedisTopology::Standalone(shared_standalone().url()))
        .call_timeout(Duration::MAX)
        .connect()
        .await
        .expect_err("endless call timeout");
    assert!(
        err.is_invalid_input() && err.to_string().contains("call_timeout"),
        "{err}"
    );
}

#[tokio::test]
async fn corrupt_or_foreign_state_is_a_backend_error() {
    let store = store("corrupt").await;
    let policies = hourly_policies(3);
    let by_alg = |alg: Algorithm| {
        policies
            .iter()
            .find(|p| p.algorithm() == alg)
            .expect("every algorithm")
    };
    // (algorithm, what to write at its storage key)
    let cases: Vec<(Algorithm, Vec<&str>)> = vec![
        (Algorithm::Gcra, vec!["SET", "KEY", "not a number"]),
        (Algorithm::LeakyBucket, vec!["SET", "KEY", "-5"]),
        (Algorithm::Gcra, vec!["SET", "KEY", "1e15"]),
        (Algorithm::Gcra, vec!["SET", "KEY", "99999999999999999999"]),
        (
            Algorithm::FixedWindow,
            vec!["HSET", "KEY", "w", "abc", "c", "1"],
        ),
        (Algorithm::FixedWindow, vec!["HSET", "KEY", "w", "1"]),
        (
            Algorithm::SlidingWindowCounter,
            vec!["HSET", "KEY", "w", "1", "c", "2", "p", "x"],
        ),
        (
            Algorithm::TokenBucket,
            vec!["HSET", "KEY", "t", "1.5", "l", "2"],
        ),
        (Algorithm::TokenBucket, vec!["SET", "KEY", "3"]),
        (Algorithm::Gcra, vec!["HSET", "KEY", "t", "1"]),
        (Algorithm::SlidingWindowLog, vec!["SET", "KEY", "3"]),
        (
            Algorithm::SlidingWindowLog,
            vec!["ZADD", "KEY", "+inf", "m"],
        ),
        (Algorithm::FixedWindow, vec!["RPUSH", "KEY", "1"]),
    ];
    for (i, (alg, write)) in cases.into_iter().enumerate() {
        let policy = by_alg(alg);
        let user_key = format!("corrupt-{i}");
        let key = store.storage_key(&user_key, policy).expect("key");
        let args: Vec<&str> = write
            .iter()
            .map(|a| if *a == "KEY" { key.as_str() } else { a })
            .collect();
        let reply = raw_command(port(), &args).expect("write garbage");
        assert!(!reply.starts_with("ERR"), "{reply}");
        for mode in [Mode::Consume, Mode::Peek] {
            let err = store
                .check(&[LimitCheck::new(&user_key, policy, 1)], mode)
                .await
                .expect_err(&format!("case {i}: {alg} over {write:?}"));
            assert!(
                matches!(err, Error::Backend { .. }),
                "case {i}: {alg} over {write:?}: {err:?}"
            );
            assert!(!err.is_unavailable());
        }
    }
}

#[tokio::test]
async fn server_time_is_one_clock_for_every_replica() {
    let url = shared_standalone().url();
    let prefix = store_prefix("server-time");
    // Two replicas taking turns: with server time their own clocks play no part (the skewed
    // caller-time test below shows what happens when they do).
    let replica = || async {
        RedisStore::builder(RedisTopology::Standalone(url.clone()))
            .prefix(&prefix)
            .time_source(TimeSource::Server)
            .connect()
            .await
            .expect("connect")
    };
    let (a, b) = (replica().await, replica().await);
    for policy in hourly_policies(5) {
        let mut admitted = 0;
        for i in 0..12 {
            let replica = if i % 2 == 0 { &a } else { &b };
            if consume(replica, "shared", &policy).await.allowed {
                admitted += 1;
            }
        }
        assert_eq!(
            admitted,
            admitted_at_once(&policy),
            "{}",
            policy.algorithm()
        );
    }
}

#[tokio::test]
async fn skewed_caller_clocks_would_overadmit_which_is_why_server_time_is_the_default() {
    let url = shared_standalone().url();
    let prefix = store_prefix("caller-skew");
    let start = ManualClock::starting_now();
    let ahead = ManualClock::new(start.now().saturating_add(Duration::from_secs(7200)));
    let a = caller_time_store(RedisTopology::Standalone(url.clone()), &prefix, &start).await;
    let b = caller_time_store(RedisTopology::Standalone(url), &prefix, &ahead).await;
    let policy = Policy::gcra(2, Duration::from_secs(3600)).expect("policy");
    let mut admitted = 0;
    for store in [&a, &a, &b, &b] {
        if consume(store, "skewed", &policy).await.allowed {
            admitted += 1;
        }
    }
    assert_eq!(
        admitted, 4,
        "a replica two hours ahead sees a full allowance again"
    );
}

#[tokio::test]
async fn caller_time_decides_on_the_given_clock() {
    let clock = ManualClock::starting_now();
    let store = RedisStore::builder(RedisTopology::Standalone(shared_standalone().url()))
        .prefix(&store_prefix("caller-time"))
        .time_source(TimeSource::Caller(Arc::new(clock.clone())))
        .connect()
        .await
        .expect("connect");
    let policy = Policy::gcra(2, Duration::from_secs(1)).expect("policy");
    assert!(consume(&store, "c", &policy).await.allowed);
    assert!(consume(&store, "c", &policy).await.allowed);
    let d = consume(&store, "c", &policy).await;
    assert!(!d.allowed);
    assert_eq!(d.retry_after, Some(Duration::from_millis(500)));
    clock.advance(Duration::from_micros(499_999));
    assert!(!consume(&store, "c", &policy).await.allowed);
    clock.advance(Duration::from_micros(1));
    let d = consume(&store, "c", &policy).await;
    assert!(d.allowed);
    assert_eq!(d.remaining, 0);
    // The caller-time slack (5 s by default) is in the TTL.
    let key = store.storage_key("c", &policy).expect("key");
    let pttl: i64 = raw_command(port(), &["PTTL", &key])
        .expect("PTTL")
        .parse()
        .expect("integer");
    assert!(pttl > 5_000 && pttl <= 6_000, "PTTL {pttl}");
}

#[tokio::test]
async fn the_same_microsecond_twice_keeps_every_log_entry() {
    // Caller time can repeat a microsecond; the sliding log's members must not collide.
    let clock = ManualClock::starting_now();
    let store = caller_time_store(
        RedisTopology::Standalone(shared_standalone().url()),
        &store_prefix("same-us"),
        &clock,
    )
    .await;
    let policy = Policy::sliding_log(4, Duration::from_secs(10)).expect("policy");
    for _ in 0..2 {
        let v = store
            .check(&[LimitCheck::new("log", &policy, 2)], Mode::Consume)
            .await
            .expect("check");
        assert!(v.allowed());
    }
    assert!(!consume(&store, "log", &policy).await.allowed);
    let key = store.storage_key("log", &policy).expect("key");
    assert_eq!(raw_command(port(), &["ZCARD", &key]).expect("ZCARD"), "4");
}

#[tokio::test]
async fn odd_keys_work() {
    let store = store("odd").await;
    let policy = Policy::fixed_window(1, Duration::from_secs(3600)).expect("policy");
    let long = "x".repeat(64 * 1024);
    let long_other = format!("{}y", "x".repeat(64 * 1024 - 1));
    for key in [
        "with space",
        "new\nline",
        "{braces}",
        "}{",
        "~tilde",
        "ünïcödé",
        &long,
        &long_other,
    ] {
        assert!(consume(&store, key, &policy).await.allowed, "{key:.20}");
        assert!(!consume(&store, key, &policy).await.allowed, "{key:.20}");
        let storage_key = store.storage_key(key, &policy).expect("key");
        let pttl: i64 = raw_command(port(), &["PTTL", &storage_key])
            .expect("PTTL")
            .parse()
            .expect("integer");
        assert!(pttl > 0);
    }
    let too_long = "x".repeat(64 * 1024 + 1);
    assert!(store.storage_key(&too_long, &policy).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_never_exceed_the_limit() {
    let store = store("concurrent").await;
    for policy in hourly_policies(20) {
        let policy = Arc::new(policy);
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let store = store.clone();
                let policy = Arc::clone(&policy);
                tokio::spawn(async move { consume(&store, "hot", &policy).await.allowed })
            })
            .collect();
        let mut admitted = 0;
        for task in tasks {
            if task.await.expect("task") {
                admitted += 1;
            }
        }
        assert_eq!(
            admitted,
            admitted_at_once(&policy),
            "{}",
            policy.algorithm()
        );
    }
}

#[tokio::test]
async fn decisions_match_the_pure_algorithm() {
    // STATEHOUSE_REDIS_DIFF_SEEDS=500 runs a longer search.
    let seeds: u64 = std::env::var("STATEHOUSE_REDIS_DIFF_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    for seed in 1..=seeds {
        let clock = ManualClock::starting_now();
        let store = caller_time_store(
            RedisTopology::Standalone(shared_standalone().url()),
            &store_prefix("differential"),
            &clock,
        )
        .await;
        assert_matches_decide(&store, &clock, seed * 7919, 150).await;
    }
}
