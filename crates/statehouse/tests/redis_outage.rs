//! A real Redis outage: a private redis-server is killed while replicas are checking, then
//! restarted. For every degraded policy: no panic, every decision is either the store's or the
//! policy's, each within the deadline plus a generous margin; once the breaker is open a
//! decision costs well under a millisecond; and after the restart the limiter recovers on its
//! own (the breaker's `open_for` elapses on a `ManualClock`).
//!
//! Times here are bounds, not benchmarks: the margins are wide so that a loaded CI machine
//! passes, while a limiter that waited for the client library's own timeouts (seconds) fails.

#![cfg(all(feature = "redis", feature = "embedded"))]

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use statehouse::{
    BreakerState, Cache, CircuitBreakerConfig, Decision, DegradedPolicy, ManualClock, NewSession,
    Policy, RateLimiter, RedisSessionStore, RedisStore, RedisTopology, Result, Sessions,
};
use statehouse_redis::{CLUSTER_FAILURE_DOMAINS, hash_slot};
use statehouse_testkit::{RedisCluster, RedisServer, raw_command, unique_prefix};

const DEADLINE: Duration = Duration::from_millis(100);
/// Scheduling slack on top of the deadline for one decision.
const MARGIN: Duration = Duration::from_millis(400);
const OPEN_FOR: Duration = Duration::from_secs(1);
const REPLICAS: u32 = 2;
const LIMIT: u64 = 20;
/// Upper bound on the checks of one load task during the kill.
const MAX_LOAD_CHECKS: usize = 50_000;

fn policy() -> Policy {
    // A burst of the whole limit and one refill an hour: no refill or window boundary can
    // change the counts during the test.
    Policy::gcra(LIMIT, Duration::from_secs(3600))
        .and_then(|p| p.with_burst(LIMIT))
        .expect("valid policy")
}

/// Whether `result` is what `degraded` prescribes for a degraded decision (or a store decision).
fn follows(degraded: DegradedPolicy, result: &Result<Decision>) -> bool {
    match (degraded, result) {
        (_, Ok(d)) if !d.degraded => true,
        (DegradedPolicy::FailOpen, Ok(d)) => d.allowed && d.remaining == LIMIT,
        (DegradedPolicy::FailClosed, Ok(d)) => !d.allowed && d.retry_after == Some(OPEN_FOR),
        (DegradedPolicy::LocalFallback { .. }, Ok(d)) => d.limit == LIMIT / u64::from(REPLICAS),
        (DegradedPolicy::ReturnError, Err(e)) => e.is_unavailable(),
        _ => false,
    }
}

/// The limiter of these tests: `DEADLINE`, a breaker opening after 3 failures for `OPEN_FOR`
/// on `clock`.
fn limiter_on(store: RedisStore, degraded: DegradedPolicy, clock: &ManualClock) -> RateLimiter {
    RateLimiter::builder(store)
        .on_store_failure(degraded)
        .deadline(DEADLINE)
        .circuit_breaker(CircuitBreakerConfig {
            failure_threshold: 3,
            open_for: OPEN_FOR,
        })
        .clock(Arc::new(clock.clone()))
        .build()
        .expect("valid limiter")
}

/// One decision and how long it took.
async fn timed_check(limiter: &RateLimiter, key: &str) -> (Result<Decision>, Duration) {
    let start = Instant::now();
    let result = limiter.check(key, &policy()).await;
    (result, start.elapsed())
}

async fn kill(server: RedisServer) -> RedisServer {
    tokio::task::spawn_blocking(move || {
        let mut server = server;
        server.kill();
        server
    })
    .await
    .expect("kill task")
}

async fn restart(server: RedisServer) -> RedisServer {
    tokio::task::spawn_blocking(move || {
        let mut server = server;
        server.restart().expect("redis-server restarts");
        server
    })
    .await
    .expect("restart task")
}

async fn outage_scenario(degraded: DegradedPolicy) {
    let server = RedisServer::start().expect("redis-server starts (is it installed?)");
    let clock = ManualClock::starting_now();
    let store = RedisStore::builder(RedisTopology::Standalone(server.url()))
        .prefix(&format!("{}:", unique_prefix("outage")))
        // The limiter's deadline is the tighter one; the store's own bounds what it retries.
        .call_timeout(Duration::from_millis(500))
        .connect()
        .await
        .expect("connect");
    let limiter = limiter_on(store, degraded, &clock);

    // Healthy: the store decides.
    for _ in 0..3 {
        let (result, _) = timed_check(&limiter, "warmup").await;
        let d = result.expect("store decides");
        assert!(d.allowed && !d.degraded, "{degraded:?}: {d:?}");
    }

    // Two replicas' worth of traffic keeps checking while the server is killed under it.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for replica in 0..2 {
        let (limiter, stop) = (limiter.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let key = format!("load-{replica}");
            let mut seen = Vec::new();
            // Bounded, and yielding: with the breaker open a check completes without ever
            // awaiting, so a loop without `yield_now` would keep its worker thread forever and
            // starve the task that sets `stop`.
            while !stop.load(Ordering::Relaxed) && seen.len() < MAX_LOAD_CHECKS {
                seen.push(timed_check(&limiter, &key).await);
                tokio::task::yield_now().await;
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let server = kill(server).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.store(true, Ordering::Relaxed);
    let mut during = Vec::new();
    for task in load {
        during.extend(task.await.expect("no panic in the load tasks"));
    }
    assert!(!during.is_empty());
    for (result, took) in &during {
        assert!(follows(degraded, result), "{degraded:?}: {result:?}");
        assert!(
            *took <= DEADLINE + MARGIN,
            "{degraded:?}: a decision took {took:?}"
        );
    }
    let degraded_seen = during
        .iter()
        .filter(|(r, _)| r.as_ref().map_or(true, |d| d.degraded))
        .count();
    assert!(degraded_seen > 0, "{degraded:?}: the outage was never seen");
    let stats = limiter.stats();
    assert_eq!(stats.breaker_state, BreakerState::Open, "{stats:?}");
    assert_eq!(stats.breaker_opened, 1, "{stats:?}");

    // Breaker open: the store is not called, and a decision is cheap.
    let failures = limiter.stats().store_failures;
    let mut times = Vec::new();
    for i in 0..200 {
        let (result, took) = timed_check(&limiter, &format!("open-{}", i % 5)).await;
        assert!(follows(degraded, &result), "{degraded:?}: {result:?}");
        assert!(result.as_ref().map_or(true, |d| d.degraded));
        times.push(took);
    }
    assert_eq!(limiter.stats().store_failures, failures, "store not called");
    let under_1ms = times
        .iter()
        .filter(|t| **t < Duration::from_millis(1))
        .count();
    // Each decision should take microseconds; allow a few scheduler hiccups, never a deadline.
    assert!(
        under_1ms >= 195,
        "{degraded:?}: only {under_1ms}/200 under 1 ms"
    );
    let slowest = times.iter().max().copied().unwrap_or_default();
    assert!(
        slowest < DEADLINE,
        "{degraded:?}: slowest open-breaker decision {slowest:?}"
    );

    // The local fallback admits one replica's share on a key, exactly.
    if let DegradedPolicy::LocalFallback { replicas } = degraded {
        let mut admitted = 0;
        for _ in 0..LIMIT {
            let (result, _) = timed_check(&limiter, "fallback-share").await;
            if result.expect("fallback decides").allowed {
                admitted += 1;
            }
        }
        assert_eq!(admitted, LIMIT / u64::from(replicas.get()));
    }

    // Redis comes back. Once the store's connection is back (it reconnects by itself; real
    // time: a socket, not time logic), the breaker's first probe is decided by the store: the
    // store noticed that its old connections died, so the probe is not lost on a dead socket
    // (which would reopen the breaker for another period).
    let server = restart(server).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while raw_command(server.port(), &["CLIENT", "LIST"])
        .expect("CLIENT LIST")
        .lines()
        .count()
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{degraded:?}: the store did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    clock.advance(OPEN_FOR);
    let (result, took) = timed_check(&limiter, "after").await;
    assert!(
        took <= DEADLINE + MARGIN,
        "{degraded:?}: the probe took {took:?}"
    );
    assert!(
        matches!(&result, Ok(d) if !d.degraded),
        "{degraded:?}: the first probe after the restart: {result:?}"
    );
    assert_eq!(limiter.stats().breaker_opened, 1, "never reopened");
    let stats = limiter.stats();
    assert_eq!(stats.breaker_state, BreakerState::Closed, "{stats:?}");
    for _ in 0..3 {
        let (result, _) = timed_check(&limiter, "after").await;
        assert!(!result.expect("store decides").degraded);
    }
    drop(server);
}

// One test running the policies one after another, rather than four tests in parallel, so the
// sub-millisecond bound is measured without three other scenarios competing for two cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_redis_mid_run_follows_each_degraded_policy_and_recovers() {
    for degraded in [
        DegradedPolicy::FailOpen,
        DegradedPolicy::FailClosed,
        DegradedPolicy::LocalFallback {
            replicas: NonZeroU32::new(REPLICAS).expect("non-zero"),
        },
        DegradedPolicy::ReturnError,
    ] {
        // A hang must fail the test, not keep it running.
        tokio::time::timeout(Duration::from_secs(60), outage_scenario(degraded))
            .await
            .unwrap_or_else(|_| panic!("{degraded:?}: the scenario did not finish in 60 s"));
    }
}

/// A server that stops answering without closing the connection (frozen with SIGSTOP): single
/// checks, which the Redis store coalesces and bounds by the limiter's deadline itself
/// (`RateLimitStore::check_within`, no timer per check), degrade at the limiter's deadline, far
/// below the store's call timeout; once the server answers again the store decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_degrades_single_checks_at_the_limiters_deadline() {
    const CALL_TIMEOUT: Duration = Duration::from_secs(3);
    let server = RedisServer::start().expect("redis-server starts (is it installed?)");
    let clock = ManualClock::starting_now();
    let store = RedisStore::builder(RedisTopology::Standalone(server.url()))
        .prefix(&format!("{}:", unique_prefix("frozen")))
        .call_timeout(CALL_TIMEOUT)
        .connect()
        .await
        .expect("connect");
    let limiter = limiter_on(store, DegradedPolicy::FailOpen, &clock);
    let (warm, _) = timed_check(&limiter, "warm").await;
    assert!(!warm.expect("store decides").degraded);

    let frozen = server.freeze().expect("SIGSTOP");

    let checks: Vec<_> = (0..20)
        .map(|i| {
            let limiter = limiter.clone();
            tokio::spawn(async move { timed_check(&limiter, &format!("frozen-{i}")).await })
        })
        .collect();
    for (i, task) in checks.into_iter().enumerate() {
        let (result, took) = task.await.expect("no panic");
        assert!(
            follows(DegradedPolicy::FailOpen, &result),
            "check {i}: {result:?}"
        );
        assert!(result.expect("fail open").degraded, "check {i}");
        assert!(
            took <= DEADLINE + MARGIN,
            "check {i} took {took:?}: not the limiter's deadline"
        );
    }
    assert!(limiter.stats().timeouts >= 1, "{:?}", limiter.stats());

    drop(frozen);
    let started = Instant::now();
    loop {
        clock.advance(OPEN_FOR);
        let (result, _) = timed_check(&limiter, "thawed").await;
        if !result.expect("fail open").degraded {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the store never decided again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A private 3-master cluster, started off the runtime's threads.
async fn start_cluster() -> RedisCluster {
    tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .expect("join")
        .expect("start a private cluster")
}

/// `cluster` with node `i` killed (off the runtime's threads).
async fn kill_node(mut cluster: RedisCluster, i: usize) -> RedisCluster {
    tokio::task::spawn_blocking(move || {
        cluster.kill_node(i);
        cluster
    })
    .await
    .expect("kill task")
}

/// `cluster` with node `i` restarted and back in a healthy cluster (off the runtime's
/// threads).
async fn restart_node(mut cluster: RedisCluster, i: usize) -> RedisCluster {
    tokio::task::spawn_blocking(move || {
        cluster.restart_node(i).expect("the node rejoins");
        cluster
    })
    .await
    .expect("restart task")
}

/// The first key `user:<n>` whose slot (`slot_of`) lies in a group of slots (a failure domain
/// of the Redis stores) wholly on `node`.
fn key_on_node(cluster: &RedisCluster, node: usize, slot_of: impl Fn(&str) -> u16) -> String {
    let size = 16_384 / CLUSTER_FAILURE_DOMAINS;
    let owner = |slot: usize| cluster.owner_of(slot as u16).expect("owner");
    (0..)
        .map(|n| format!("user:{n}"))
        .find(|key| {
            let group = usize::from(slot_of(key)) / size;
            owner(group * size) == node && owner(group * size + size - 1) == node
        })
        .expect("a key on the node")
}

/// A master of a Redis Cluster dies while checks run against keys on it and on another
/// master: every decision follows the fail-open policy (or is the store's) within the
/// deadline, none is an error or a panic; the dead master's keys degrade while the other
/// master's keys are still decided by the store (one breaker per group of slots); once the
/// node is back in the cluster, the store decides again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_cluster_master_degrades_within_the_deadline_and_recovers() {
    let mut cluster = start_cluster().await;
    let clock = ManualClock::starting_now();
    let store = RedisStore::builder(RedisTopology::Cluster(cluster.urls()))
        .prefix(&format!("{}:", unique_prefix("cluster-outage")))
        .call_timeout(Duration::from_millis(500))
        .connect()
        .await
        .expect("connect");
    // A key on node 0 (the one that dies) and a key on node 1.
    let key_on = |node: usize| {
        key_on_node(&cluster, node, |key| {
            hash_slot(store.storage_key(key, &policy()).expect("key").as_bytes())
        })
    };
    let (doomed, surviving) = (key_on(0), key_on(1));
    let limiter = limiter_on(store, DegradedPolicy::FailOpen, &clock);
    for key in [&doomed, &surviving] {
        let (result, _) = timed_check(&limiter, key).await;
        assert!(!result.expect("store decides").degraded);
    }

    cluster = kill_node(cluster, 0).await;
    let mut degraded_seen = 0;
    for i in 0..40 {
        let key = if i % 2 == 0 { &doomed } else { &surviving };
        let (result, took) = timed_check(&limiter, key).await;
        assert!(
            follows(DegradedPolicy::FailOpen, &result),
            "{key}: {result:?}"
        );
        assert!(took <= DEADLINE + MARGIN, "{key}: a decision took {took:?}");
        let degraded = result.expect("fail open").degraded;
        if key == &doomed {
            degraded_seen += usize::from(degraded);
        } else {
            // Its own breaker is closed: the dead master's opened alone. (The cluster goes on
            // serving the live masters' slots until it declares the node failed, after the
            // 5 s node timeout; these checks take well under a second.)
            assert!(!degraded, "{key}: degraded by another master's failure");
        }
    }
    assert_eq!(
        degraded_seen, 20,
        "every check of the dead master's key degraded"
    );
    let stats = limiter.stats();
    assert_eq!(stats.breaker_opened, 1, "{stats:?}");
    assert_eq!(stats.breaker_state, BreakerState::Open);

    let cluster = restart_node(cluster, 0).await;
    let started = Instant::now();
    for key in [&doomed, &surviving] {
        loop {
            clock.advance(OPEN_FOR);
            let (result, took) = timed_check(&limiter, key).await;
            assert!(took <= DEADLINE + MARGIN, "{key}: a probe took {took:?}");
            if !result.expect("fail open").degraded {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{key}: the store never decided again"
            );
            // Real time for the client to reconnect and refresh its slot map (a socket, not
            // time logic).
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    drop(cluster);
}

/// The cache's breakers on a Redis Cluster whose master dies: reads of the dead master's key
/// fail (as unavailable) and soon without calling the store, while reads of a live master's
/// key go on hitting the store; once the node is back, the dead master's key is read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_cluster_master_opens_only_its_own_cache_breaker() {
    let mut cluster = start_cluster().await;
    let clock = ManualClock::starting_now();
    let store = RedisStore::builder(RedisTopology::Cluster(cluster.urls()))
        .prefix(&format!("{}:", unique_prefix("cluster-cache")))
        .call_timeout(Duration::from_millis(500))
        .connect()
        .await
        .expect("connect")
        .cache_store();
    let cache = Cache::<String>::builder(Arc::new(store.clone()), "items")
        .without_near_cache()
        .deadline(DEADLINE)
        .clock(Arc::new(clock.clone()))
        .build()
        .await
        .expect("cache");
    let key_on = |node: usize| {
        key_on_node(&cluster, node, |key| {
            let data_key = store.data_key(&cache.store_key(key)).expect("data key");
            hash_slot(data_key.as_bytes())
        })
    };
    let (doomed, surviving) = (key_on(0), key_on(1));
    for key in [&doomed, &surviving] {
        cache
            .set(key, &format!("value of {key}"))
            .await
            .expect("set");
    }

    cluster = kill_node(cluster, 0).await;
    for _ in 0..20 {
        let (failed, took) = {
            let started = Instant::now();
            (cache.get(&doomed).await, started.elapsed())
        };
        let err = failed.expect_err("the dead master's key");
        assert!(err.is_unavailable(), "{err}");
        assert!(took <= DEADLINE + MARGIN, "a read took {took:?}");
        let found = cache.get(&surviving).await.expect("the live master's key");
        assert_eq!(
            found.value().map(|v| v.as_str().to_owned()),
            Some(format!("value of {surviving}"))
        );
    }
    let stats = cache.stats();
    assert_eq!(stats.breaker_opened, 1, "{stats:?}");
    assert_eq!(stats.breaker_state, BreakerState::Open);

    let cluster = restart_node(cluster, 0).await;
    let started = Instant::now();
    loop {
        clock.advance(OPEN_FOR);
        if cache.get(&doomed).await.is_ok() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the dead master's key was never read again"
        );
        // Real time for the client to reconnect and refresh its slot map.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(cluster);
}

/// The sessions' breakers on a Redis Cluster whose master dies: loads of a user on the dead
/// master fail (as unavailable) within the deadline, and soon without calling the store (the
/// breaker of that user's slot group opened), while loads of a user on a live master go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_cluster_master_opens_only_its_own_session_breaker() {
    let mut cluster = start_cluster().await;
    let clock = ManualClock::starting_now();
    let store = RedisSessionStore::builder(RedisTopology::Cluster(cluster.urls()))
        .prefix(&format!("{}:", unique_prefix("cluster-sessions")))
        .call_timeout(Duration::from_millis(500))
        .connect()
        .await
        .expect("connect");
    let key_on = |node: usize| {
        key_on_node(&cluster, node, |user| {
            hash_slot(store.index_key(user).as_bytes())
        })
    };
    let (doomed, surviving) = (key_on(0), key_on(1));
    let sessions = Sessions::builder(store)
        .deadline(DEADLINE)
        .clock(Arc::new(clock.clone()))
        .build()
        .expect("sessions");
    let mut tokens = Vec::new();
    for user in [&doomed, &surviving] {
        let (token, _) = sessions
            .create(&NewSession::for_user(user.as_str()))
            .await
            .expect("create");
        tokens.push(token);
    }

    cluster = kill_node(cluster, 0).await;
    let mut last_error = String::new();
    for _ in 0..20 {
        let started = Instant::now();
        let err = sessions
            .load(&tokens[0])
            .await
            .expect_err("the dead master's user");
        let took = started.elapsed();
        assert!(err.is_unavailable(), "{err}");
        assert!(took <= DEADLINE + MARGIN, "a load took {took:?}");
        last_error = err.to_string();
        let loaded = sessions
            .load(&tokens[1])
            .await
            .expect("the live master's user")
            .expect("a session");
        assert_eq!(loaded.record.user_id, surviving);
    }
    assert!(
        last_error.contains("circuit breaker open"),
        "the dead master's breaker never opened: {last_error}"
    );
    drop(cluster);
}
