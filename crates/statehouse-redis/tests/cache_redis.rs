//! RedisCacheStore on the shared standalone server and the shared 3-master cluster: the storage
//! layout (a TTL on every key, a key and its lease in one slot), the purge across every master,
//! invalidations across connections and nodes, foreign values and malformed messages. The
//! behaviour contract itself is the cache conformance suite (tests/cache_conformance.rs).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use statehouse_core::cache::{CacheStore, Invalidation, LeaseOutcome, LeaseToken};
use statehouse_core::{Clock, ManualClock};
use statehouse_redis::{RedisCacheStore, RedisStore, RedisTopology, hash_slot};
use statehouse_testkit::cache_suite::{RecordingSink, SinkEvent};
use statehouse_testkit::{raw_command, shared_cluster, shared_standalone};

use common::{cluster_command, store_prefix};

const TTL: Duration = Duration::from_secs(600);
const WAIT: Duration = Duration::from_secs(5);

fn standalone() -> RedisTopology {
    RedisTopology::Standalone(shared_standalone().url())
}

fn cluster() -> RedisTopology {
    RedisTopology::Cluster(shared_cluster().urls())
}

async fn cache(topology: RedisTopology, prefix: &str) -> RedisCacheStore {
    RedisStore::builder(topology)
        .prefix(prefix)
        .connect()
        .await
        .expect("connect")
        .cache_store()
}

/// A command on the standalone server, or on the cluster node owning the key it names.
fn raw(on_cluster: bool, args: &[&str]) -> String {
    if on_cluster {
        cluster_command(shared_cluster(), args)
    } else {
        raw_command(shared_standalone().port(), args).expect("redis answers")
    }
}

fn acquired(outcome: LeaseOutcome) -> LeaseToken {
    match outcome {
        LeaseOutcome::Acquired(token) => token,
        LeaseOutcome::HeldElsewhere => panic!("the lease was held elsewhere"),
    }
}

async fn every_key_written_has_a_ttl(topology: RedisTopology, on_cluster: bool) {
    let prefix = store_prefix("ttl");
    let cache = cache(topology, &prefix).await;
    let now = ManualClock::starting_now().now();
    cache.set("plain", b"v", TTL, None).await.expect("set");
    let token = acquired(
        cache
            .acquire_lease("filled", now, Duration::from_secs(10))
            .await
            .expect("lease"),
    );
    assert!(
        cache
            .set("filled", b"v", TTL, Some(&token))
            .await
            .expect("fill")
    );
    cache
        .acquire_lease("leased", now, Duration::from_secs(10))
        .await
        .expect("lease");
    let fresh_tags = ["fresh".to_owned()];
    cache.tag_versions(&fresh_tags).await.expect("tag versions");
    cache.bump_tag("bumped").await.expect("bump");

    let keys = [
        cache.data_key("plain").expect("a valid key"),
        cache.data_key("filled").expect("a valid key"),
        cache.lease_key("leased").expect("a valid key"),
        cache.tag_key("fresh").expect("a valid key"),
        cache.tag_key("bumped").expect("a valid key"),
    ];
    for key in &keys {
        let pttl: i64 = raw(on_cluster, &["PTTL", key]).parse().expect("PTTL");
        assert!(pttl > 0, "{key} has PTTL {pttl}");
    }
    // The lease expires with the lease TTL, the tags after about 30 days.
    let lease: i64 = raw(on_cluster, &["PTTL", &keys[2]])
        .parse()
        .expect("an integer");
    assert!(lease <= 10_000, "{lease}");
    let tag: i64 = raw(on_cluster, &["PTTL", &keys[3]])
        .parse()
        .expect("an integer");
    assert!(tag > 29 * 24 * 3600 * 1000, "{tag}");
    // The fill consumed its lease, and nothing else lies under the prefix.
    assert_eq!(
        raw(
            on_cluster,
            &["EXISTS", &cache.lease_key("filled").expect("a valid key")]
        ),
        "0"
    );
    if !on_cluster {
        let listed = raw(false, &["KEYS", &format!("{prefix}*")]);
        let found: BTreeSet<&str> = listed.lines().collect();
        let expected: BTreeSet<&str> = keys.iter().map(String::as_str).collect();
        assert_eq!(found, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_written_has_a_ttl_standalone() {
    every_key_written_has_a_ttl(standalone(), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_written_has_a_ttl_cluster() {
    every_key_written_has_a_ttl(cluster(), true).await;
}

/// Keys holding braces anywhere (a key starting with `}` would leave an empty hash tag with a
/// naive layout) keep their value and lease in one slot, and the lease protocol works on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_and_its_lease_share_a_slot_on_the_cluster() {
    let cache = cache(cluster(), &store_prefix("slots")).await;
    let now = ManualClock::starting_now().now();
    let port = shared_cluster().ports()[0];
    for key in ["}", "}x{y}", "{", "{}", "a}b", "x{y}z", "{{}}", "}\n{"] {
        let data = cache.data_key(key).expect("a valid key");
        let lease = cache.lease_key(key).expect("a valid key");
        let slot = |k: &str| raw_command(port, &["CLUSTER", "KEYSLOT", k]).expect("KEYSLOT");
        assert_eq!(slot(&data), slot(&lease), "{key:?}");
        assert_eq!(
            slot(&data),
            hash_slot(data.as_bytes()).to_string(),
            "{key:?}"
        );

        let token = acquired(
            cache
                .acquire_lease(key, now, Duration::from_secs(10))
                .await
                .expect("lease"),
        );
        assert!(
            cache
                .set(key, b"filled", TTL, Some(&token))
                .await
                .expect("fill"),
            "{key:?}"
        );
        assert_eq!(
            cache.get(key).await.expect("get").as_deref(),
            Some(&b"filled"[..])
        );
        assert!(cache.delete(key).await.expect("delete"));
    }
}

/// A purge on the cluster scans all three masters, with glob characters in both the store's
/// prefix and the purged one, and leaves a store whose prefix the glob would match unescaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_reaches_every_master_and_only_its_prefix() {
    let base = store_prefix("purge");
    let globby = format!("*?[x]\\{base}");
    let lookalike = format!("zz?[x]\\{base}");
    let target = cache(cluster(), &globby).await;
    let other = cache(cluster(), &lookalike).await;
    let masters = shared_cluster().ports().len() as u16;
    let mut thirds = BTreeSet::new();
    let keys: Vec<String> = (0..60).map(|i| format!("p*[{i}]")).collect();
    for key in &keys {
        target.set(key, b"v", TTL, None).await.expect("set");
        other.set(key, b"v", TTL, None).await.expect("set");
        thirds.insert(
            hash_slot(target.data_key(key).expect("a valid key").as_bytes())
                / (16384 / masters + 1),
        );
    }
    assert_eq!(thirds.len(), masters as usize, "the keys span every master");
    target.set("q", b"v", TTL, None).await.expect("set");
    target.set("p", b"v", TTL, None).await.expect("set");
    // A lease alone is deleted but not counted.
    let now = ManualClock::starting_now().now();
    target
        .acquire_lease("p*[lease-only]", now, Duration::from_secs(10))
        .await
        .expect("lease");

    assert_eq!(target.purge_prefix("p*[").await.expect("purge"), 60);
    for key in &keys {
        assert_eq!(target.get(key).await.expect("get"), None, "{key:?}");
        assert!(
            other.get(key).await.expect("get").is_some(),
            "{key:?} survives"
        );
    }
    assert!(target.get("q").await.expect("get").is_some());
    assert!(target.get("p").await.expect("get").is_some());
    assert_eq!(
        cluster_command(
            shared_cluster(),
            &[
                "EXISTS",
                &target.lease_key("p*[lease-only]").expect("a valid key")
            ]
        ),
        "0"
    );
    assert_eq!(target.purge_prefix("p*[").await.expect("purge"), 0);
    // An empty prefix purges the whole store, and only it.
    assert_eq!(target.purge_prefix("").await.expect("purge"), 2);
    assert!(other.get(&keys[0]).await.expect("get").is_some());
}

async fn invalidations_cross_connections(topology: RedisTopology, on_cluster: bool) {
    let prefix = store_prefix("channel");
    let writer = cache(topology.clone(), &prefix).await;
    let listener = cache(topology, &prefix).await;
    let sink = RecordingSink::new();
    let _subscription = listener.subscribe(sink.clone()).await.expect("subscribe");
    assert_eq!(
        sink.events(),
        [SinkEvent::Up],
        "up before subscribe returns"
    );
    // Keys in many slots (every master of a cluster): one subscribed node hears them all.
    let keys: Vec<String> = (0..30).map(|i| format!("key:{i}")).collect();
    for key in &keys {
        writer.set(key, b"v", TTL, None).await.expect("set");
    }
    for key in &keys {
        sink.wait_for(&Invalidation::Keys(vec![key.clone()])).await;
    }
    // Another prefix is another channel.
    let stranger = cache(
        if on_cluster { cluster() } else { standalone() },
        &store_prefix("stranger"),
    )
    .await;
    stranger.set("key:0", b"v", TTL, None).await.expect("set");
    writer.bump_tag("barrier").await.expect("bump");
    sink.wait_for(&Invalidation::Tag("barrier".into())).await;
    let key0 = SinkEvent::Message(Invalidation::Keys(vec!["key:0".into()]));
    assert_eq!(sink.events().iter().filter(|e| **e == key0).count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_cross_connections_standalone() {
    invalidations_cross_connections(standalone(), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_cross_connections_and_nodes_on_the_cluster() {
    invalidations_cross_connections(cluster(), true).await;
}

/// Bytes another program wrote at a data key come back as they are (the facade, not the
/// store, decides they are not an envelope); a key of another type is refused, not misread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_values_are_returned_as_is() {
    let cache = cache(standalone(), &store_prefix("foreign")).await;
    let port = shared_standalone().port();
    let key = cache.data_key("written elsewhere").expect("a valid key");
    assert_eq!(
        raw_command(port, &["SET", &key, "not an envelope", "EX", "60"]).expect("test step"),
        "OK"
    );
    assert_eq!(
        cache
            .get("written elsewhere")
            .await
            .expect("get")
            .as_deref(),
        Some(&b"not an envelope"[..])
    );
    let hash = cache.data_key("a hash").expect("a valid key");
    raw_command(port, &["HSET", &hash, "f", "v"]).expect("test step");
    raw_command(port, &["EXPIRE", &hash, "60"]).expect("test step");
    let err = cache.get("a hash").await.expect_err("WRONGTYPE");
    assert!(!err.is_unavailable() && !err.is_invalid_input(), "{err:?}");
}

/// Concurrent reads are coalesced (one MGET per batch) and each caller gets its own value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_each_get_their_own_value() {
    for topology in [standalone(), cluster()] {
        let cache = Arc::new(cache(topology, &store_prefix("reads")).await);
        for i in 0..200 {
            if i % 3 != 0 {
                cache
                    .set(&format!("k{i}"), format!("v{i}").as_bytes(), TTL, None)
                    .await
                    .expect("set");
            }
        }
        let reads = (0..200).map(|i| {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { (i, cache.get(&format!("k{i}")).await.expect("get")) })
        });
        for read in futures::future::join_all(reads).await {
            let (i, value) = read.expect("task");
            let expected = (i % 3 != 0).then(|| format!("v{i}").into_bytes());
            assert_eq!(value, expected, "k{i}");
        }
    }
}

/// A message on the channel that is not an invalidation is skipped and counted; the listener
/// keeps going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_skipped_and_counted() {
    let cache = cache(standalone(), &store_prefix("malformed")).await;
    let sink = RecordingSink::new();
    let _subscription = cache.subscribe(sink.clone()).await.expect("subscribe");
    let port = shared_standalone().port();
    for garbage in ["", "zzz", "k3:ab", "a-not-empty"] {
        raw_command(port, &["PUBLISH", cache.channel(), garbage]).expect("publish");
    }
    cache.set("after", b"v", TTL, None).await.expect("set");
    sink.wait_for(&Invalidation::Keys(vec!["after".into()]))
        .await;
    let started = Instant::now();
    while cache.malformed_invalidations() < 4 {
        assert!(
            started.elapsed() < WAIT,
            "{}",
            cache.malformed_invalidations()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(cache.malformed_invalidations(), 4);
    assert_eq!(
        sink.events(),
        [
            SinkEvent::Up,
            SinkEvent::Message(Invalidation::Keys(vec!["after".into()]))
        ]
    );
}

/// The cluster's memory settings come from each of its three masters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_settings_cover_every_cluster_master() {
    let cache = cache(cluster(), &store_prefix("memory")).await;
    let settings = cache.memory_settings().await.expect("memory settings");
    let mut expected: Vec<String> = shared_cluster()
        .ports()
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    expected.sort();
    let nodes: Vec<String> = settings.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(nodes, expected);
    for (node, s) in &settings {
        assert!(s.maxmemory.is_some(), "{node}: {s:?}");
        assert!(s.maxmemory_policy.is_some(), "{node}: {s:?}");
        assert!(s.used_memory.is_some_and(|u| u > 0), "{node}: {s:?}");
        assert!(s.evicted_keys.is_some(), "{node}: {s:?}");
        assert!(s.appendonly.is_some() && s.save.is_some(), "{node}: {s:?}");
    }
}
