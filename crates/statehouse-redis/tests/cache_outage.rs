//! RedisCacheStore when Redis goes away, stops answering or comes back, and its memory report.
//! Each test runs its own server, since it kills, freezes or reconfigures it.

mod common;

use std::process::Command;
use std::time::Duration;

use statehouse_core::Error;
use statehouse_core::cache::{CacheStore, Invalidation, RiskLevel};
use statehouse_redis::{RedisCacheStore, RedisStore, RedisTopology};
use statehouse_testkit::cache_suite::{RecordingSink, SinkEvent};
use statehouse_testkit::{RedisCluster, RedisServer, TlsOptions, raw_command, test_certificates};
use tokio::time::Instant;

use common::store_prefix;

const CALL_TIMEOUT: Duration = Duration::from_millis(300);
/// Slack for a loaded CI machine: the bound being tested is "about the call timeout", not
/// "many seconds".
const MARGIN: Duration = Duration::from_millis(700);
/// The real-time bound on an asynchronous event (a reconnection, a message).
const WAIT: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(600);

async fn start(args: &'static [&'static str]) -> RedisServer {
    tokio::task::spawn_blocking(move || RedisServer::start_with_args(args).expect("start redis"))
        .await
        .expect("start task")
}

async fn cache_on(server: &RedisServer) -> RedisCacheStore {
    RedisStore::builder(RedisTopology::Standalone(server.url()))
        .prefix(&store_prefix("cache-outage"))
        .call_timeout(CALL_TIMEOUT)
        .connect()
        .await
        .expect("connect")
        .cache_store()
}

async fn kill(mut server: RedisServer) -> RedisServer {
    tokio::task::spawn_blocking(move || {
        server.kill();
        server
    })
    .await
    .expect("kill task")
}

async fn restart(mut server: RedisServer) -> RedisServer {
    tokio::task::spawn_blocking(move || {
        server.restart().expect("restart");
        server
    })
    .await
    .expect("restart task")
}

fn count(sink: &RecordingSink, event: &SinkEvent) -> usize {
    sink.events().iter().filter(|e| *e == event).count()
}

/// Retries a write until the data connection is back (it reconnects on its own).
async fn set_when_back(cache: &RedisCacheStore, key: &str) {
    let started = Instant::now();
    while let Err(err) = cache.set(key, b"v", TTL, None).await {
        assert!(err.is_unavailable(), "{err:?}");
        assert!(started.elapsed() < WAIT, "Redis never came back: {err}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_channel_is_reported_and_comes_back() {
    let server = start(&[]).await;
    let cache = cache_on(&server).await;
    let sink = RecordingSink::new();
    let _subscription = cache.subscribe(sink.clone()).await.expect("subscribe");
    set_when_back(&cache, "before").await;
    sink.wait_for(&Invalidation::Keys(vec!["before".into()]))
        .await;

    let server = kill(server).await;
    sink.wait_until("on_channel_down", |e| e.contains(&SinkEvent::Down))
        .await;
    assert_eq!(count(&sink, &SinkEvent::Up), 1, "{:?}", sink.events());

    let _server = restart(server).await;
    sink.wait_until("on_channel_up again", |e| {
        e.iter().filter(|e| **e == SinkEvent::Up).count() == 2
    })
    .await;
    assert_eq!(
        sink.events().last(),
        Some(&SinkEvent::Up),
        "down, then up: {:?}",
        sink.events()
    );
    set_when_back(&cache, "after").await;
    sink.wait_for(&Invalidation::Keys(vec!["after".into()]))
        .await;
    assert_eq!(count(&sink, &SinkEvent::Down), 1, "{:?}", sink.events());
}

/// A server that stops answering without closing the connection (frozen with SIGSTOP, like a
/// partitioned network) is noticed by the listener's PING; it comes back after SIGCONT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_channel_is_noticed() {
    let server = start(&[]).await;
    let cache = cache_on(&server).await;
    let sink = RecordingSink::new();
    let _subscription = cache.subscribe(sink.clone()).await.expect("subscribe");

    let thaw = server.freeze().expect("SIGSTOP");
    sink.wait_until("on_channel_down after an unanswered PING", |e| {
        e.contains(&SinkEvent::Down)
    })
    .await;
    drop(thaw);
    sink.wait_until("on_channel_up after SIGCONT", |e| {
        e.iter().filter(|e| **e == SinkEvent::Up).count() == 2
    })
    .await;
    set_when_back(&cache, "thawed").await;
    sink.wait_for(&Invalidation::Keys(vec!["thawed".into()]))
        .await;
    drop(server);
}

fn process_id(port: u16) -> String {
    let info = raw_command(port, &["INFO", "server"]).expect("INFO");
    info.lines()
        .find_map(|l| l.trim().strip_prefix("process_id:"))
        .expect("process_id")
        .to_owned()
}

/// On a cluster, the listener moves to another node when the one it listens on dies: one
/// node is enough, since a classic PUBLISH reaches every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_listener_moves_to_another_node() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3).expect("start cluster"))
        .await
        .expect("start task");
    let cache = RedisStore::builder(RedisTopology::Cluster(cluster.urls()))
        .prefix(&store_prefix("cache-failover"))
        .call_timeout(CALL_TIMEOUT)
        .connect()
        .await
        .expect("connect")
        .cache_store();
    let sink = RecordingSink::new();
    let _subscription = cache.subscribe(sink.clone()).await.expect("subscribe");
    let ports = cluster.ports();
    // The listener is on one node; find out which by who reports the subscriber.
    let listened = ports
        .iter()
        .copied()
        .find(|&port| {
            raw_command(port, &["PUBSUB", "NUMSUB", cache.channel()])
                .expect("NUMSUB")
                .ends_with("\n1")
        })
        .expect("one node has the subscriber");
    let pid = process_id(listened);
    assert!(
        Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .expect("kill")
            .success()
    );
    sink.wait_until("on_channel_down", |e| e.contains(&SinkEvent::Down))
        .await;
    sink.wait_until("on_channel_up on another node", |e| {
        e.iter().filter(|e| **e == SinkEvent::Up).count() == 2
    })
    .await;
    // A message published on any surviving node arrives.
    let survivor = ports
        .iter()
        .copied()
        .find(|&p| p != listened)
        .expect("a survivor");
    let message = String::from_utf8(Invalidation::Tag("moved".into()).encode()).expect("UTF-8");
    raw_command(survivor, &["PUBLISH", cache.channel(), &message]).expect("publish");
    sink.wait_for(&Invalidation::Tag("moved".into())).await;
}

/// The listener follows the cluster as its nodes are replaced: configured with one node only,
/// it still subscribes somewhere once every node it knew at subscription has gone, on a node
/// that joined later and took over a master's slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_listener_follows_nodes_that_replaced_the_configured_ones() {
    follows_replaced_nodes(false).await;
}

/// The same over TLS, where the nodes the cluster describes are its TLS ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_listener_follows_replaced_nodes_over_tls() {
    follows_replaced_nodes(true).await;
}

async fn follows_replaced_nodes(tls: bool) {
    let cluster = tokio::task::spawn_blocking(move || {
        if tls {
            RedisCluster::start_tls(3, TlsOptions::default())
        } else {
            RedisCluster::start(3)
        }
        .expect("start cluster")
    })
    .await
    .expect("start task");
    let seed = if tls {
        cluster.tls_urls()[0].clone()
    } else {
        cluster.urls()[0].clone()
    };
    let mut builder = RedisStore::builder(RedisTopology::Cluster(vec![seed]))
        .prefix(&store_prefix("cache-follow"))
        .call_timeout(CALL_TIMEOUT);
    if tls {
        builder = builder.tls_root_certificates(test_certificates().ca_pem());
    }
    let cache = builder.connect().await.expect("connect").cache_store();
    let sink = RecordingSink::new();
    let _subscription = cache.subscribe(sink.clone()).await.expect("subscribe");
    let subscribers = |port: u16| {
        raw_command(port, &["PUBSUB", "NUMSUB", cache.channel()])
            .map(|reply| reply.ends_with("\n1"))
            .unwrap_or(false)
    };
    let ports = cluster.ports();
    assert!(subscribers(ports[0]), "the configured node is tried first");

    // A new node replicates master 1 and takes over its slots.
    let (mut cluster, new_node) = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        let new_node = cluster.add_replica(1).expect("add a replica");
        cluster.fail_over_to(new_node).expect("fail over");
        (cluster, new_node)
    })
    .await
    .expect("topology task");
    let new_port = cluster.ports()[new_node];

    // The configured node dies: the listener moves to another node it knew.
    cluster.kill_node(0);
    sink.wait_until("on_channel_down", |e| e.contains(&SinkEvent::Down))
        .await;
    sink.wait_until("on_channel_up on another node", |e| {
        e.iter().filter(|e| **e == SinkEvent::Up).count() == 2
    })
    .await;

    // Every node the listener knew at subscription dies: it must have learned of the new one.
    cluster.kill_node(1);
    cluster.kill_node(2);
    let started = Instant::now();
    while !subscribers(new_port) {
        assert!(
            started.elapsed() < WAIT,
            "the listener never subscribed on the node that joined: {:?}",
            sink.events()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sink.wait_until("on_channel_up on the new node", |e| {
        e.last() == Some(&SinkEvent::Up)
    })
    .await;
    let message = String::from_utf8(Invalidation::Tag("followed".into()).encode()).expect("UTF-8");
    raw_command(new_port, &["PUBLISH", cache.channel(), &message]).expect("publish");
    sink.wait_for(&Invalidation::Tag("followed".into())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_down_is_unavailable_within_the_call_timeout() {
    let server = start(&[]).await;
    let cache = cache_on(&server).await;
    cache.set("k", b"v", TTL, None).await.expect("set");
    assert!(cache.get("k").await.expect("get").is_some());
    let _server = kill(server).await;

    for attempt in 0..3 {
        let started = Instant::now();
        let err = cache.get("k").await.expect_err("Redis is down");
        let took = started.elapsed();
        assert!(err.is_unavailable(), "attempt {attempt}: {err:?}");
        assert!(
            took < CALL_TIMEOUT + MARGIN,
            "attempt {attempt} took {took:?}"
        );
    }
    let started = Instant::now();
    let err = cache.set("k", b"v", TTL, None).await.expect_err("down");
    assert!(err.is_unavailable(), "{err:?}");
    let err = cache.purge_prefix("k").await.expect_err("down");
    assert!(err.is_unavailable(), "{err:?}");
    let err = cache.tag_versions(&["t".into()]).await.expect_err("down");
    assert!(err.is_unavailable(), "{err:?}");
    let err = cache.memory_settings().await.expect_err("down");
    assert!(err.is_unavailable(), "{err:?}");
    assert!(started.elapsed() < 4 * (CALL_TIMEOUT + MARGIN));
    let sink = RecordingSink::new();
    let err = cache.subscribe(sink.clone()).await.expect_err("down");
    assert!(err.is_unavailable(), "{err:?}");
    assert!(sink.events().is_empty(), "{:?}", sink.events());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_report_flags_sessions_beside_an_evicting_cache() {
    let server = start(&[]).await;
    let cache = cache_on(&server).await;
    assert_eq!(
        raw_command(
            server.port(),
            &["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]
        )
        .expect("test step"),
        "OK"
    );
    raw_command(server.port(), &["CONFIG", "SET", "maxmemory", "100mb"]).expect("test step");
    let settings = cache.memory_settings().await.expect("settings");
    assert_eq!(settings.len(), 1);
    let (node, s) = &settings[0];
    assert_eq!(node, &format!("127.0.0.1:{}", server.port()));
    assert_eq!(s.maxmemory_policy.as_deref(), Some("allkeys-lru"));
    assert_eq!(s.maxmemory, Some(100 * 1024 * 1024));
    assert_eq!(s.appendonly, Some(false));
    assert_eq!(s.save.as_deref(), Some(""));
    assert!(s.used_memory.is_some_and(|u| u > 0));
    assert_eq!(s.evicted_keys, Some(0));

    let with_sessions = cache.memory_report(true).await.expect("report");
    let critical: Vec<_> = with_sessions
        .iter()
        .filter(|(_, r)| r.level == RiskLevel::Critical)
        .map(|(n, r)| (n.as_str(), r.code))
        .collect();
    assert_eq!(critical, [(node.as_str(), "sessions-evictable")]);
    let cache_only = cache.memory_report(false).await.expect("report");
    assert!(
        cache_only
            .iter()
            .all(|(_, r)| r.code != "sessions-evictable"),
        "{cache_only:?}"
    );
}

/// A server that refuses CONFIG (as managed services do) gives `None` settings, not an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_config_gives_unknown_settings() {
    let server = start(&["--rename-command", "CONFIG", ""]).await;
    let cache = cache_on(&server).await;
    let settings = cache.memory_settings().await.expect("settings");
    let (_, s) = &settings[0];
    assert_eq!(
        (
            s.maxmemory,
            s.maxmemory_policy.as_deref(),
            s.save.as_deref(),
            s.appendonly
        ),
        (None, None, None, None)
    );
    assert!(
        s.used_memory.is_some_and(|u| u > 0),
        "INFO still answers: {s:?}"
    );
    let codes: Vec<&str> = cache
        .memory_report(true)
        .await
        .expect("report")
        .into_iter()
        .map(|(_, r)| r.code)
        .collect();
    assert!(
        codes.contains(&"maxmemory-unknown") && codes.contains(&"policy-unknown"),
        "{codes:?}"
    );
}

/// Reads that ask for less than the call timeout (`get_within`, as the cache facade does with
/// its deadline) are answered at their own deadline by a server that stopped answering, each
/// timeout at its own (more timeouts than the store keeps queues for included), while plain
/// reads wait for the call timeout; all of them read again once the server answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_within_a_shorter_timeout_end_at_it_on_a_frozen_server() {
    const LONG_CALL: Duration = Duration::from_millis(2_500);
    let server = start(&[]).await;
    let cache = RedisStore::builder(RedisTopology::Standalone(server.url()))
        .prefix(&store_prefix("cache-within"))
        .call_timeout(LONG_CALL)
        .connect()
        .await
        .expect("connect")
        .cache_store();
    cache.set("k", b"v", TTL, None).await.expect("set");
    // Twelve timeouts: more than the store keeps a queue for (8); the others are bounded by a
    // timer of the reader's own, with the same results.
    let timeout_of = |i: usize| Duration::from_millis(50 + 5 * (i % 12) as u64);
    for i in 0..12 {
        let found = cache.get_within("k", timeout_of(i)).await.expect("bounded");
        assert_eq!(found.expect("read").as_deref(), Some(&b"v"[..]));
    }

    let thaw = server.freeze().expect("SIGSTOP");
    let timed = |timeout: Option<Duration>| {
        let cache = cache.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = match timeout {
                Some(timeout) => cache.get_within("k", timeout).await.expect("bounded"),
                None => cache.get("k").await,
            };
            (result, started.elapsed())
        })
    };
    let short: Vec<_> = (0..40).map(|i| timed(Some(timeout_of(i)))).collect();
    let plain: Vec<_> = (0..4).map(|_| timed(None)).collect();
    for (i, task) in short.into_iter().enumerate() {
        let (result, took) = task.await.expect("read task");
        let err = result.expect_err("the server is frozen");
        assert!(matches!(err, Error::Timeout { .. }), "read {i}: {err:?}");
        assert!(
            took < MARGIN,
            "read {i} took {took:?}, not its own deadline"
        );
    }
    for task in plain {
        let (result, took) = task.await.expect("read task");
        let err = result.expect_err("frozen");
        // Its own call timeout, or (when the calls of the shorter reads, which run to the call
        // timeout too, timed out first and made the store replace the silent connection) the
        // connection's replacement a moment before.
        assert!(
            matches!(err, Error::Timeout { .. }) || err.is_unavailable(),
            "{err:?}"
        );
        assert!(
            took >= LONG_CALL / 2 && took < LONG_CALL + MARGIN,
            "a plain read took {took:?}, not the call timeout"
        );
    }
    drop(thaw);
    let started = Instant::now();
    loop {
        if let Some(Ok(Some(v))) = cache.get_within("k", Duration::from_millis(50)).await {
            assert_eq!(v, b"v");
            break;
        }
        assert!(started.elapsed() < WAIT, "no read after SIGCONT");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
