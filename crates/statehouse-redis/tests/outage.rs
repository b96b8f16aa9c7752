//! RedisStore when Redis goes away and comes back. Each test runs its own server, since it
//! kills it.

mod common;

use std::time::Duration;

use statehouse_core::cache::CacheStore;
use statehouse_core::session::{NewSession, SessionConfig, SessionStore};
use statehouse_core::{LimitCheck, Mode, Policy, RateLimitStore};
use statehouse_redis::{RedisStore, RedisTopology};
use statehouse_testkit::{RedisServer, raw_command};
use tokio::time::Instant;

use common::store_prefix;

const CALL_TIMEOUT: Duration = Duration::from_millis(300);
/// Slack for a loaded CI machine: the bound being tested is "about the call timeout", not
/// "many seconds".
const MARGIN: Duration = Duration::from_millis(700);

/// A private server, started off the runtime's threads.
async fn start_server() -> RedisServer {
    tokio::task::spawn_blocking(|| RedisServer::start().expect("start redis"))
        .await
        .expect("start task")
}

/// Whether consuming `check` is admitted (the call itself must succeed).
async fn admits(store: &RedisStore, check: &[LimitCheck<'_>]) -> bool {
    store
        .check(check, Mode::Consume)
        .await
        .expect("check")
        .allowed()
}

async fn store_on(server: &RedisServer) -> RedisStore {
    RedisStore::builder(RedisTopology::Standalone(server.url()))
        .prefix(&store_prefix("outage"))
        .call_timeout(CALL_TIMEOUT)
        .connect()
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_is_unavailable_within_the_call_timeout_and_recovers() {
    let mut server = start_server().await;
    let store = store_on(&server).await;
    let policy = Policy::gcra(1_000, Duration::from_secs(60)).expect("policy");
    let check = [LimitCheck::new("user:1", &policy, 1)];
    assert!(admits(&store, &check).await);

    let server = tokio::task::spawn_blocking(move || {
        server.kill();
        server
    })
    .await
    .expect("kill task");

    // Several calls in a row: the first sees the connection drop, later ones the reconnect
    // attempts; every one fails as unavailable, within the deadline.
    for attempt in 0..5 {
        let started = Instant::now();
        let err = store
            .check(&check, Mode::Consume)
            .await
            .expect_err("Redis is down");
        let took = started.elapsed();
        assert!(err.is_unavailable(), "attempt {attempt}: {err:?}");
        assert!(
            took < CALL_TIMEOUT + MARGIN,
            "attempt {attempt} took {took:?}"
        );
        let err = store
            .reset("user:1", &policy)
            .await
            .expect_err("Redis is down");
        assert!(err.is_unavailable(), "{err:?}");
    }

    let mut server = server;
    let _server = tokio::task::spawn_blocking(move || {
        server.restart().expect("restart");
        server
    })
    .await
    .expect("restart task");

    // The connection manager reconnects by itself; the restarted server has an empty script
    // cache, which EVALSHA's NOSCRIPT fallback handles.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.check(&check, Mode::Consume).await {
            Ok(verdict) => {
                assert!(verdict.allowed());
                break;
            }
            Err(err) => {
                assert!(err.is_unavailable(), "{err:?}");
                assert!(
                    Instant::now() < deadline,
                    "no recovery after restart: {err:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stops_answering_times_out_then_recovers() {
    let server = start_server().await;
    let store = store_on(&server).await;
    let policy = Policy::fixed_window(1_000, Duration::from_secs(60)).expect("policy");
    let check = [LimitCheck::new("user:1", &policy, 1)];
    assert!(admits(&store, &check).await);

    // The connection stays up but nothing answers: a partition, a stalled server.
    let pause = Duration::from_millis(2_000);
    let reply = raw_command(
        server.port(),
        &["CLIENT", "PAUSE", &pause.as_millis().to_string(), "ALL"],
    )
    .expect("CLIENT PAUSE");
    assert_eq!(reply, "OK");
    let paused_at = Instant::now();
    let mut timeouts = 0;
    while paused_at.elapsed() + CALL_TIMEOUT + MARGIN < pause {
        let started = Instant::now();
        let err = store
            .check(&check, Mode::Consume)
            .await
            .expect_err("Redis is paused");
        assert!(err.is_unavailable(), "{err:?}");
        assert!(
            started.elapsed() < CALL_TIMEOUT + MARGIN,
            "{:?}",
            started.elapsed()
        );
        timeouts += 1;
    }
    assert!(timeouts >= 1);

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.check(&check, Mode::Consume).await {
            Ok(verdict) => {
                assert!(verdict.allowed());
                break;
            }
            Err(err) => {
                assert!(err.is_unavailable(), "{err:?}");
                assert!(Instant::now() < deadline, "no recovery: {err:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn connecting_to_nothing_is_unavailable_within_the_call_timeout() {
    let mut server = start_server().await;
    let url = server.url();
    tokio::task::spawn_blocking(move || server.kill())
        .await
        .expect("kill task");
    for topology in [
        RedisTopology::Standalone(url.clone()),
        RedisTopology::Cluster(vec![url.clone()]),
    ] {
        let started = Instant::now();
        let err = RedisStore::builder(topology.clone())
            .call_timeout(CALL_TIMEOUT)
            .connect()
            .await
            .expect_err("nothing listens");
        assert!(err.is_unavailable(), "{topology:?}: {err:?}");
        assert!(started.elapsed() < CALL_TIMEOUT + MARGIN, "{topology:?}");
    }
}

/// More callers than the coalescers can put on the wire at once (4 calls of at most 128 checks
/// or 256 reads): the rest wait in the queue, where the coalescer, not a timer per caller,
/// keeps their deadlines. Every one of them is answered within its own call timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_queued_behind_a_stalled_server_time_out_at_their_own_deadline() {
    let server = start_server().await;
    let store = store_on(&server).await;
    let cache = store.cache_store();
    let policy = Policy::gcra(1_000_000, Duration::from_secs(60)).expect("policy");
    // Warm: the script is loaded and both coalescers' connections are up.
    let check = [LimitCheck::new("warm", &policy, 1)];
    assert!(admits(&store, &check).await);
    assert_eq!(cache.get("absent").await.expect("get"), None);

    let pause = Duration::from_millis(3_000);
    let reply = raw_command(
        server.port(),
        &["CLIENT", "PAUSE", &pause.as_millis().to_string(), "ALL"],
    )
    .expect("CLIENT PAUSE");
    assert_eq!(reply, "OK");
    let mut callers = Vec::new();
    for i in 0..1_000 {
        let (store, policy) = (store.clone(), policy.clone());
        callers.push(tokio::spawn(async move {
            let started = Instant::now();
            let key = format!("user:{i}");
            let result = store
                .check(&[LimitCheck::new(&key, &policy, 1)], Mode::Consume)
                .await;
            (started.elapsed(), result.map(|_| ()))
        }));
    }
    for i in 0..2_000 {
        let cache = cache.clone();
        callers.push(tokio::spawn(async move {
            let started = Instant::now();
            let result = cache.get(&format!("k{i}")).await;
            (started.elapsed(), result.map(|_| ()))
        }));
    }
    for caller in callers {
        let (waited, result) = caller.await.expect("caller task");
        let err = result.expect_err("Redis is paused");
        assert!(err.is_unavailable(), "{err:?}");
        assert!(waited < CALL_TIMEOUT + MARGIN, "waited {waited:?}");
    }
}

/// A Redis that is full (`maxmemory` reached under `noeviction`) refuses every write with
/// `OOM`. Rate-limit checks (a single call, a coalesced batch of concurrent ones, a multi-limit
/// call), cache writes and session writes then fail as *unavailable* (so a limiter's degraded
/// policy takes over), nothing is half-applied, reads (a peek, a cache read) still work, and
/// everything works again once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_is_unavailable_for_writes_and_recovers() {
    let server = start_server().await;
    let store = store_on(&server).await;
    let cache = store.cache_store();
    let sessions = store.session_store(SessionConfig::default());
    let policy = Policy::gcra(1_000, Duration::from_secs(60)).expect("policy");
    let hourly = Policy::gcra(5_000, Duration::from_secs(3600)).expect("policy");
    let single = [LimitCheck::new("user:1", &policy, 1)];
    let multi = [
        LimitCheck::new("user:1", &policy, 1),
        LimitCheck::new("user:1", &hourly, 1),
    ];
    assert!(admits(&store, &single).await);
    assert!(
        cache
            .set("product:0", b"v0", Duration::from_secs(60), None)
            .await
            .expect("set")
    );
    let remaining_before = store
        .check(&single, Mode::Peek)
        .await
        .expect("peek")
        .decisions[0]
        .remaining;

    for (name, value) in [("maxmemory-policy", "noeviction"), ("maxmemory", "1")] {
        let reply = raw_command(server.port(), &["CONFIG", "SET", name, value]).expect("CONFIG");
        assert_eq!(reply, "OK");
    }
    let refused = store
        .check(&single, Mode::Consume)
        .await
        .expect_err("refused");
    assert!(refused.is_unavailable(), "{refused}");
    // Reads need no memory: a peek and a cache read still work.
    let peek = store
        .check(&single, Mode::Peek)
        .await
        .expect("a peek of a full Redis");
    assert_eq!(peek.decisions[0].remaining, remaining_before);
    let read = cache
        .get("product:0")
        .await
        .expect("a read of a full Redis");
    assert_eq!(read.as_deref(), Some(&b"v0"[..]));
    let refused = store
        .check(&multi, Mode::Consume)
        .await
        .expect_err("refused");
    assert!(refused.is_unavailable(), "{refused}");
    let concurrent: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            let policy = policy.clone();
            tokio::spawn(async move {
                let key = format!("user:{i}");
                store
                    .check(&[LimitCheck::new(&key, &policy, 1)], Mode::Consume)
                    .await
            })
        })
        .collect();
    for task in concurrent {
        let refused = task.await.expect("task").expect_err("refused");
        assert!(refused.is_unavailable(), "{refused}");
    }
    let refused = cache
        .set("product:1", b"v", Duration::from_secs(60), None)
        .await
        .expect_err("refused");
    assert!(refused.is_unavailable(), "{refused}");
    let refused = sessions
        .create(&NewSession::for_user("alice"))
        .await
        .expect_err("refused");
    assert!(refused.is_unavailable(), "{refused}");

    let reply = raw_command(server.port(), &["CONFIG", "SET", "maxmemory", "0"]).expect("CONFIG");
    assert_eq!(reply, "OK");
    // Nothing of the refused checks was applied: the key is where the first check left it.
    let peek = store.check(&single, Mode::Peek).await.expect("peek");
    assert_eq!(peek.decisions[0].remaining, remaining_before);
    assert!(admits(&store, &multi).await);
    assert!(
        cache
            .set("product:1", b"v", Duration::from_secs(60), None)
            .await
            .expect("set")
    );
    sessions
        .create(&NewSession::for_user("alice"))
        .await
        .expect("create");
}

/// Restarts the server off the runtime's threads, then waits until the store's batch
/// connection is back (the server lists a client besides the one asking): it reconnects by
/// itself, with a pause that doubles while the server is down.
async fn restart_and_wait_for_the_store(server: RedisServer) -> RedisServer {
    let server = tokio::task::spawn_blocking(move || {
        let mut server = server;
        server.kill();
        server.restart().expect("restart");
        server
    })
    .await
    .expect("restart task");
    wait_for_the_store(&server).await;
    server
}

/// Waits until the store's batch connection is back on `server`.
async fn wait_for_the_store(server: &RedisServer) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = raw_command(server.port(), &["CLIENT", "LIST"]).expect("CLIENT LIST");
        if list.lines().count() >= 2 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the store did not reconnect: {list}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One call of each path a store has: a single check (coalesced, batch connection), a check of
/// two limits (a script on the redis-rs connection), a cache write (redis-rs) and read (batch
/// connection), a session created (redis-rs) and loaded (batch connection).
async fn one_call_of_each_kind(store: &RedisStore, round: usize) -> Vec<(&'static str, String)> {
    let gcra = Policy::gcra(1_000, Duration::from_secs(60)).expect("policy");
    let window = Policy::fixed_window(1_000, Duration::from_secs(60)).expect("policy");
    let cache = store.cache_store();
    let sessions = store.session_store(SessionConfig::default());
    let mut failures = Vec::new();
    let mut record = |what: &'static str, result: Result<(), statehouse_core::Error>| {
        if let Err(err) = result {
            failures.push((what, err.to_string()));
        }
    };
    let single = store
        .check(&[LimitCheck::new("single", &gcra, 1)], Mode::Consume)
        .await;
    record("single check", single.map(drop));
    let multi = store
        .check(
            &[
                LimitCheck::new("multi", &gcra, 1),
                LimitCheck::new("multi", &window, 1),
            ],
            Mode::Consume,
        )
        .await;
    record("check of two limits", multi.map(drop));
    let key = format!("k{round}");
    let set = cache.set(&key, b"v", Duration::from_secs(60), None).await;
    record("cache write", set.map(drop));
    record("cache read", cache.get(&key).await.map(drop));
    match sessions.create(&NewSession::for_user("carol")).await {
        Ok((token, _)) => record("session load", sessions.load(&token).await.map(drop)),
        Err(err) => record("session create", Err(err)),
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_calls_after_a_restart_succeed() {
    let mut server = start_server().await;
    let store = store_on(&server).await;
    assert_eq!(one_call_of_each_kind(&store, 0).await, []);
    // Each round makes every kind of call first on a restarted server: the store's connections
    // to the old one are dead, which the store must notice before it sends anything on them.
    for round in 1..=3 {
        server = restart_and_wait_for_the_store(server).await;
        assert_eq!(
            one_call_of_each_kind(&store, round).await,
            [],
            "round {round}: the first calls after the restart"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_during_an_outage_do_not_fail_the_first_calls_after_it() {
    let server = start_server().await;
    let store = store_on(&server).await;
    assert_eq!(one_call_of_each_kind(&store, 0).await, []);
    let mut server = tokio::task::spawn_blocking(move || {
        let mut server = server;
        server.kill();
        server
    })
    .await
    .expect("kill task");
    // Every kind of call fails while the server is down (and leaves the store's connections
    // with a failed connection attempt behind).
    let failures = one_call_of_each_kind(&store, 1).await;
    assert_eq!(failures.len(), 5, "{failures:?}");
    // Let the redis-rs connection's own reconnection attempts (started by those failures; two
    // retries, at most 200 ms apart) give up while the server is still down, so that it holds
    // a refused attempt when the server comes back. Not a timing assertion: nothing is
    // measured.
    tokio::time::sleep(Duration::from_secs(1)).await;
    server = tokio::task::spawn_blocking(move || {
        server.restart().expect("restart");
        server
    })
    .await
    .expect("restart task");
    wait_for_the_store(&server).await;
    assert_eq!(
        one_call_of_each_kind(&store, 2).await,
        [],
        "the first calls after the outage"
    );
}

/// On Redis Cluster the node connections are redis-rs's cluster client's, which follows a
/// restarted node by itself: the first calls to it succeed too (a guard for upgrades of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_calls_to_a_restarted_cluster_node_succeed() {
    let cluster = tokio::task::spawn_blocking(|| statehouse_testkit::RedisCluster::start(3))
        .await
        .expect("start task")
        .expect("start a private cluster");
    let store = RedisStore::builder(RedisTopology::Cluster(cluster.urls()))
        .prefix(&store_prefix("node-restart"))
        .call_timeout(CALL_TIMEOUT)
        .connect()
        .await
        .expect("connect");
    let cache = store.cache_store();
    let gcra = Policy::gcra(1_000, Duration::from_secs(60)).expect("policy");
    let window = Policy::fixed_window(1_000, Duration::from_secs(60)).expect("policy");
    let on_node_0 = |key: &String| {
        let slots = [
            store.storage_key(key, &gcra).expect("key"),
            store.storage_key(key, &window).expect("key"),
            cache.data_key(key).expect("key"),
        ]
        .map(|k| statehouse_redis::hash_slot(k.as_bytes()));
        slots
            .iter()
            .all(|&slot| cluster.owner_of(slot).expect("owner") == 0)
    };
    let key = (0..)
        .map(|n| format!("user:{n}"))
        .find(on_node_0)
        .expect("a key on node 0");
    let calls = || async {
        let single = store
            .check(&[LimitCheck::new(&key, &gcra, 1)], Mode::Consume)
            .await
            .map(drop);
        let both = [
            LimitCheck::new(&key, &gcra, 1),
            LimitCheck::new(&key, &window, 1),
        ];
        let multi = store.check(&both, Mode::Consume).await.map(drop);
        let set = cache
            .set(&key, b"v", Duration::from_secs(60), None)
            .await
            .map(drop);
        let get = cache.get(&key).await.map(drop);
        [single, multi, set, get]
            .into_iter()
            .filter_map(Result::err)
            .map(|err| err.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(calls().await, Vec::<String>::new());
    let cluster = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        cluster.kill_node(0);
        cluster.restart_node(0).expect("the node rejoins");
        cluster
    })
    .await
    .expect("restart task");
    assert_eq!(
        calls().await,
        Vec::<String>::new(),
        "the first calls after node 0 restarted"
    );
    drop(cluster);
}
