//! A Redis Cluster whose slot moves while the store works on it: the source answers `ASK` for
//! the keys it handed over and `TRYAGAIN` for a call on several keys of the slot, some moved
//! and some not, and `MOVED` once the move is done. Each test has a private 3-master cluster
//! (the shared one keeps its slots where they are for the other tests).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use statehouse_core::cache::CacheStore;
use statehouse_core::session::{NewSession, SessionConfig, SessionStore, SessionToken};
use statehouse_core::{Algorithm, LimitCheck, Mode, Policy, RateLimitStore};
use statehouse_redis::{RedisSessionStore, RedisStore, RedisTopology, hash_slot};
use statehouse_testkit::{RedisCluster, SlotMove, TlsOptions, raw_command, test_certificates};

use common::{admitted_at_once, store_prefix};

/// Keys of the test whose storage keys (under `store` and `policy`) all fall in one slot, and
/// that slot: the first slot that `wanted` keys of the form `user:<n>` share.
fn keys_in_one_slot(store: &RedisStore, policy: &Policy, wanted: usize) -> (u16, Vec<String>) {
    let mut by_slot: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for n in 0.. {
        let key = format!("user:{n}");
        let storage = store.storage_key(&key, policy).expect("storage key");
        let slot = hash_slot(storage.as_bytes());
        let keys = by_slot.entry(slot).or_default();
        keys.push(key);
        if keys.len() == wanted {
            return (slot, keys.clone());
        }
    }
    unreachable!("the loop returns")
}

/// A private 3-master cluster (the shared one keeps its slots where they are).
async fn private_cluster() -> Arc<RedisCluster> {
    Arc::new(
        tokio::task::spawn_blocking(|| RedisCluster::start(3))
            .await
            .expect("join")
            .expect("start a private cluster"),
    )
}

/// Moves `slot` to node `to` in a blocking task: one key at a time with pauses of 20 ms (so that
/// the calls under test meet every stage: `ASK` for moved keys, `TRYAGAIN` for calls on moved
/// and unmoved keys together, then `MOVED`). The flag is true until the move is finished.
fn move_slot_in_background(
    cluster: &Arc<RedisCluster>,
    slot: u16,
    to: usize,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let moving = Arc::new(AtomicBool::new(true));
    let mover = {
        let (cluster, moving) = (cluster.clone(), moving.clone());
        tokio::task::spawn_blocking(move || {
            let slot_move = cluster.start_moving_slot(slot, to).expect("start the move");
            loop {
                std::thread::sleep(Duration::from_millis(20));
                if slot_move.move_keys(1).expect("MIGRATE") == 0 {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
            slot_move.finish().expect("finish the move");
            moving.store(false, Ordering::SeqCst);
        })
    };
    (moving, mover)
}

/// Eight keys of one slot take checks from 32 concurrent tasks (so the store coalesces them
/// into script calls on several keys of the slot) while the slot moves to another node, key by
/// key: every check is answered (no error, none degraded), and each key admits exactly its
/// allowance over the whole run: a check applied on both nodes, or on the node that no longer
/// holds the key's state, would admit more; one applied twice, fewer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_stay_exact_while_their_slot_moves() {
    let cluster = private_cluster().await;
    let store = RedisStore::builder(RedisTopology::Cluster(cluster.urls()))
        .prefix(&store_prefix("reshard"))
        // Correctness under redirections is under test, not latency: a slow moment of the
        // shared machine must not turn a retried call into a timeout.
        .call_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect");
    for algorithm in [
        Algorithm::Gcra,
        Algorithm::FixedWindow,
        Algorithm::SlidingWindowLog,
    ] {
        let policy = Policy::new(algorithm, 300, Duration::from_secs(3600)).expect("policy");
        let allowance = admitted_at_once(&policy);
        let (slot, keys) = keys_in_one_slot(&store, &policy, 8);
        let from = cluster.owner_of(slot).expect("owner");
        let to = (from + 1) % 3;

        // Some state on the source before the move starts.
        for key in &keys {
            let check = [LimitCheck::new(key, &policy, 1)];
            let verdict = store.check(&check, Mode::Consume).await.expect("check");
            assert!(verdict.allowed());
        }

        let (moving, mover) = move_slot_in_background(&cluster, slot, to);
        let admitted: Arc<Vec<AtomicU64>> =
            Arc::new(keys.iter().map(|_| AtomicU64::new(1)).collect());
        let checks = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..32)
            .map(|t| {
                let (store, policy, keys) = (store.clone(), policy.clone(), keys.clone());
                let (moving, admitted, checks) = (moving.clone(), admitted.clone(), checks.clone());
                tokio::spawn(async move {
                    let i = t % keys.len();
                    while moving.load(Ordering::SeqCst) {
                        let check = [LimitCheck::new(&keys[i], &policy, 1)];
                        let verdict = store.check(&check, Mode::Consume).await;
                        let verdict = verdict.unwrap_or_else(|e| {
                            panic!(
                                "{algorithm:?} {}: a check failed during the move: {e}",
                                keys[i]
                            )
                        });
                        assert!(!verdict.decisions[0].degraded);
                        if verdict.allowed() {
                            admitted[i].fetch_add(1, Ordering::SeqCst);
                        }
                        checks.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        mover.await.expect("the mover");
        for task in tasks {
            task.await.expect("a checking task");
        }
        assert_eq!(cluster.owner_of(slot).expect("owner"), to);
        assert!(
            checks.load(Ordering::SeqCst) > 0,
            "checks ran while the slot moved"
        );

        // After the move: whatever is left of each allowance, then a denial.
        for (i, key) in keys.iter().enumerate() {
            let check = [LimitCheck::new(key, &policy, 1)];
            loop {
                let verdict = store.check(&check, Mode::Consume).await.expect("check");
                if !verdict.allowed() {
                    break;
                }
                admitted[i].fetch_add(1, Ordering::SeqCst);
            }
            assert_eq!(
                admitted[i].load(Ordering::SeqCst),
                allowance,
                "{algorithm:?} {key}: admitted over the whole run"
            );
        }
    }
}

/// Cache writes (a script on the value and its lease key) and coalesced reads (`MGET`s of
/// several keys of the slot) of eight keys of one slot, while the slot moves: every call is
/// answered, every read finds its key, and each writer reads its own last write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_reads_and_writes_carry_on_while_their_slot_moves() {
    let cluster = private_cluster().await;
    let store = RedisStore::builder(RedisTopology::Cluster(cluster.urls()))
        .prefix(&store_prefix("reshard-cache"))
        .call_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect")
        .cache_store();
    let mut by_slot: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    let (slot, keys) = (0..)
        .find_map(|n| {
            let key = format!("product:{n}");
            let data_key = store.data_key(&key).expect("data key");
            let keys = by_slot.entry(hash_slot(data_key.as_bytes())).or_default();
            keys.push(key);
            (keys.len() == 8).then(|| (hash_slot(data_key.as_bytes()), keys.clone()))
        })
        .expect("eight keys of one slot");
    let ttl = Duration::from_secs(3600);
    for key in &keys {
        store.set(key, b"v0", ttl, None).await.expect("set");
    }
    let to = (cluster.owner_of(slot).expect("owner") + 1) % 3;

    let (moving, mover) = move_slot_in_background(&cluster, slot, to);
    let last_written: Arc<Vec<AtomicU64>> =
        Arc::new(keys.iter().map(|_| AtomicU64::new(0)).collect());
    let tasks: Vec<_> = (0..32)
        .map(|t| {
            let (store, keys, moving) = (store.clone(), keys.clone(), moving.clone());
            let last_written = last_written.clone();
            tokio::spawn(async move {
                let i = t % keys.len();
                let mut version = 0;
                while moving.load(Ordering::SeqCst) {
                    if t < keys.len() {
                        // The one writer of key i.
                        version += 1;
                        let value = format!("v{version}");
                        let stored = store.set(&keys[i], value.as_bytes(), ttl, None).await;
                        assert!(stored.expect("a write during the move"));
                        last_written[i].store(version, Ordering::SeqCst);
                        let read = store.get(&keys[i]).await.expect("a read during the move");
                        assert_eq!(read.as_deref(), Some(value.as_bytes()), "{}", keys[i]);
                    } else {
                        let read = store.get(&keys[i]).await.expect("a read during the move");
                        assert!(read.is_some(), "{}: missing during the move", keys[i]);
                    }
                }
            })
        })
        .collect();
    mover.await.expect("the mover");
    for task in tasks {
        task.await.expect("a reading or writing task");
    }
    assert_eq!(cluster.owner_of(slot).expect("owner"), to);
    for (i, key) in keys.iter().enumerate() {
        let version = last_written[i].load(Ordering::SeqCst);
        assert!(version > 0, "{key}: written during the move");
        let value = store.get(key).await.expect("get").expect("present");
        assert_eq!(value, format!("v{version}").as_bytes(), "{key}");
    }
}

/// Session loads (the coalesced read-only fast path, and the script that refreshes a session
/// and its user's index, two keys of the slot) of eight users of one slot, while the slot
/// moves: every load finds its session, and none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_loads_carry_on_while_their_slot_moves() {
    let cluster = private_cluster().await;
    for share in [(1, 4), (0, 1)] {
        let (store, slot, users, tokens) =
            sessions_of_one_slot(&cluster, share, "reshard-session", 8).await;
        let to = (cluster.owner_of(slot).expect("owner") + 1) % 3;

        let (moving, mover) = move_slot_in_background(&cluster, slot, to);
        let loads = Arc::new(AtomicU64::new(0));
        let tokens = Arc::new(tokens);
        let tasks: Vec<_> = (0..32)
            .map(|t| {
                let (store, tokens, moving) = (store.clone(), tokens.clone(), moving.clone());
                let (users, loads) = (users.clone(), loads.clone());
                tokio::spawn(async move {
                    let i = t % tokens.len();
                    while moving.load(Ordering::SeqCst) {
                        let loaded = store
                            .load(&tokens[i])
                            .await
                            .unwrap_or_else(|e| panic!("{}: a load failed: {e}", users[i]));
                        let loaded = loaded.unwrap_or_else(|| panic!("{}: no session", users[i]));
                        assert_eq!(loaded.record.user_id, users[i]);
                        loads.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        mover.await.expect("the mover");
        for task in tasks {
            task.await.expect("a loading task");
        }
        assert_eq!(cluster.owner_of(slot).expect("owner"), to);
        assert!(loads.load(Ordering::SeqCst) > 0);
        for (token, user) in tokens.iter().zip(&users) {
            let loaded = store.load(token).await.expect("load").expect("present");
            assert_eq!(&loaded.record.user_id, user);
        }
    }
}

/// Starts moving `slot` to the next node and moves `keys` of its keys: a slot caught half
/// moved, both nodes marked.
async fn half_move(cluster: &Arc<RedisCluster>, slot: u16, keys: usize) -> SlotMove {
    let cluster = cluster.clone();
    tokio::task::spawn_blocking(move || {
        let to = (cluster.owner_of(slot).expect("owner") + 1) % 3;
        let slot_move = cluster.start_moving_slot(slot, to).expect("start the move");
        assert_eq!(slot_move.move_keys(keys).expect("MIGRATE"), keys);
        slot_move
    })
    .await
    .expect("join")
}

/// Ends a move [`half_move`] started.
async fn finish(slot_move: SlotMove) {
    tokio::task::spawn_blocking(move || slot_move.finish().expect("finish"))
        .await
        .expect("join");
}

/// Clears the flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// `count` cache keys `<name>:<n>` whose data keys (under `store`) share one slot, and the slot.
fn cache_keys_in_one_slot(
    store: &statehouse_redis::RedisCacheStore,
    name: &str,
    count: usize,
) -> (u16, Vec<String>) {
    let mut by_slot: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    (0..)
        .find_map(|n| {
            let key = format!("{name}:{n}");
            let slot = hash_slot(store.data_key(&key).expect("data key").as_bytes());
            let keys = by_slot.entry(slot).or_default();
            keys.push(key);
            (keys.len() == count).then(|| (slot, keys.clone()))
        })
        .expect("keys of one slot")
}

/// A slot caught half-moved (some keys on the source, some on the target, both marked): a
/// prefix purge deletes every key under the prefix on both, counts each once, and leaves the
/// other prefixes' keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_deletes_the_keys_of_a_half_moved_slot() {
    purge_half_moved_slot(false).await;
}

/// The same over TLS, where the nodes name their TLS ports in `CLUSTER NODES`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_deletes_the_keys_of_a_half_moved_slot_over_tls() {
    purge_half_moved_slot(true).await;
}

async fn purge_half_moved_slot(tls: bool) {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(move || {
            if tls {
                RedisCluster::start_tls(3, TlsOptions::default())
            } else {
                RedisCluster::start(3)
            }
        })
        .await
        .expect("join")
        .expect("start a private cluster"),
    );
    let urls = if tls {
        cluster.tls_urls()
    } else {
        cluster.urls()
    };
    let mut builder = RedisStore::builder(RedisTopology::Cluster(urls))
        .prefix(&store_prefix("reshard-purge"))
        .call_timeout(Duration::from_secs(10));
    if tls {
        builder = builder.tls_root_certificates(test_certificates().ca_pem());
    }
    let store = builder.connect().await.expect("connect").cache_store();
    let (slot, keys) = cache_keys_in_one_slot(&store, "page", 12);
    let ttl = Duration::from_secs(3600);
    for key in &keys {
        store.set(key, b"v", ttl, None).await.expect("set");
    }
    // Keys elsewhere, under the prefix and not.
    for n in 0..20 {
        store
            .set(&format!("page:x{n}"), b"v", ttl, None)
            .await
            .expect("set");
        store
            .set(&format!("post:{n}"), b"v", ttl, None)
            .await
            .expect("set");
    }
    let slot_move = half_move(&cluster, slot, 5).await;
    assert_eq!(store.purge_prefix("page:").await.expect("purge"), 12 + 20);
    for key in &keys {
        assert_eq!(store.get(key).await.expect("get"), None, "{key}");
    }
    assert_eq!(
        store.get("post:3").await.expect("get").as_deref(),
        Some(&b"v"[..])
    );
    finish(slot_move).await;
    assert_eq!(store.purge_prefix("post:").await.expect("purge"), 20);
}

/// Purges while a slot keeps moving between two masters, key by key, back and forth: after
/// every purge, no key written before it is left, wherever it was moving to, and each was
/// counted once. (A `SCAN` of each master alone misses a key that moves from a master not yet
/// scanned to one already scanned: without the recheck of the moving slots this test fails
/// within a few dozen rounds.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_leave_nothing_while_a_slot_keeps_moving() {
    let cluster = private_cluster().await;
    let store = RedisStore::builder(RedisTopology::Cluster(cluster.urls()))
        .prefix(&store_prefix("reshard-purges"))
        .call_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect")
        .cache_store();
    let (slot, keys) = cache_keys_in_one_slot(&store, "item", 16);
    // Other keys, so that each master's scan takes several `SCAN` calls: the window in which a
    // key can move past it.
    let ttl = Duration::from_secs(3600);
    let fillers: Vec<_> = (0..16)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for n in 0..1_250 {
                    let key = format!("other:{t}:{n}");
                    store.set(&key, b"v", ttl, None).await.expect("set");
                }
            })
        })
        .collect();
    for filler in fillers {
        filler.await.expect("a filler");
    }
    let home = cluster.owner_of(slot).expect("owner");
    let away = (home + 1) % 3;
    let moving = Arc::new(AtomicBool::new(true));
    // Stops the mover also when an assertion fails (the runtime waits for it on the way out).
    let _stop = StopOnDrop(moving.clone());
    let mover = {
        let (cluster, moving) = (cluster.clone(), moving.clone());
        tokio::task::spawn_blocking(move || {
            let mut to = away;
            while moving.load(Ordering::SeqCst) {
                // A node can still see the old owner for a moment after a move (gossip): tried again.
                let started = std::time::Instant::now();
                let slot_move = loop {
                    match cluster.start_moving_slot(slot, to) {
                        Ok(slot_move) => break slot_move,
                        Err(err) => {
                            assert!(
                                started.elapsed() < Duration::from_secs(10),
                                "start the move: {err}"
                            );
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                };
                while slot_move.move_keys(1).expect("MIGRATE") > 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                slot_move.finish().expect("finish the move");
                // The nodes' gossip settles the new owner before the slot moves back (a move
                // started at once can meet a node that still sees the old owner).
                std::thread::sleep(Duration::from_millis(100));
                let started = std::time::Instant::now();
                while cluster.owner_of(slot).ok() != Some(to) {
                    assert!(
                        started.elapsed() < Duration::from_secs(10),
                        "the move never settled"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
                to = if to == away { home } else { away };
            }
        })
    };
    for round in 0..60 {
        for key in &keys {
            assert!(
                store.set(key, b"v", ttl, None).await.expect("set"),
                "{key} stored"
            );
        }
        for key in &keys {
            assert!(
                store.get(key).await.expect("get").is_some(),
                "round {round}: {key} written"
            );
        }
        let deleted = store.purge_prefix("item:").await.expect("purge");
        for key in &keys {
            assert_eq!(
                store.get(key).await.expect("get"),
                None,
                "round {round}: {key} outlived the purge"
            );
        }
        // Each key counted once, wherever it was found.
        assert_eq!(deleted, 16, "round {round}");
    }
    moving.store(false, Ordering::SeqCst);
    mover.await.expect("the mover");
}

/// Two single checks of two keys of one slot, coalesced into one script call while the slot is
/// half moved (one key on each node): the call is refused with `TRYAGAIN` for as long as the
/// keys stay apart, so the batch is split, each key's checks going on their own (a call on one
/// key follows `ASK`), and both are answered at once, correctly, without waiting for the move
/// to end (here it never does).
#[tokio::test]
async fn coalesced_checks_of_a_half_moved_slot_are_answered_at_once() {
    let cluster = private_cluster().await;
    let store = RedisStore::builder(RedisTopology::Cluster(cluster.urls()))
        .prefix(&store_prefix("reshard-split"))
        .call_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect");
    let policy = Policy::new(Algorithm::Gcra, 5, Duration::from_secs(3600)).expect("policy");
    let (slot, keys) = keys_in_one_slot(&store, &policy, 2);
    for key in &keys {
        let check = [LimitCheck::new(key, &policy, 1)];
        assert!(
            store
                .check(&check, Mode::Consume)
                .await
                .expect("check")
                .allowed()
        );
    }
    let slot_move = half_move(&cluster, slot, 1).await;
    // Both queued before the batching task runs (one thread): one call of two keys.
    let (a, b) = (
        [LimitCheck::new(&keys[0], &policy, 1)],
        [LimitCheck::new(&keys[1], &policy, 1)],
    );
    let (first, second) = tokio::join!(
        store.check(&a, Mode::Consume),
        store.check(&b, Mode::Consume)
    );
    for verdict in [first, second] {
        let verdict = verdict.expect("answered while the keys are apart");
        assert!(verdict.allowed());
        // The second of five, on either node.
        assert_eq!(verdict.decisions[0].remaining, 3);
    }
    finish(slot_move).await;
}

/// Two cache reads of two keys of one slot, coalesced into one `MGET` while the slot is half
/// moved: refused with `TRYAGAIN` while the keys are apart, the read is split by key, and both
/// find their values without waiting for the move to end (here it never does).
#[tokio::test]
async fn coalesced_reads_of_a_half_moved_slot_are_answered_at_once() {
    let cluster = private_cluster().await;
    let store = RedisStore::builder(RedisTopology::Cluster(cluster.urls()))
        .prefix(&store_prefix("reshard-split-get"))
        .call_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect")
        .cache_store();
    let (slot, keys) = cache_keys_in_one_slot(&store, "page", 2);
    let ttl = Duration::from_secs(3600);
    for key in &keys {
        store
            .set(key, key.as_bytes(), ttl, None)
            .await
            .expect("set");
    }
    let slot_move = half_move(&cluster, slot, 1).await;
    // Both queued before the batching task runs (one thread): one `MGET` of two keys.
    let (first, second) = tokio::join!(store.get(&keys[0]), store.get(&keys[1]));
    for (key, value) in keys.iter().zip([first, second]) {
        let value = value.expect("answered while the keys are apart");
        assert_eq!(value.as_deref(), Some(key.as_bytes()), "{key}");
    }
    finish(slot_move).await;
}

/// Starts moving `slot` to the next node and moves exactly `keys` (each with `MIGRATE`): a slot
/// caught half moved, both nodes marked, with a known set of keys on each side.
async fn half_move_keys(cluster: &Arc<RedisCluster>, slot: u16, keys: Vec<String>) -> SlotMove {
    let slot_move = half_move(cluster, slot, 0).await;
    let cluster = cluster.clone();
    tokio::task::spawn_blocking(move || {
        let from = cluster.owner_of(slot).expect("owner");
        let ports = cluster.ports();
        let to_port = ports[(from + 1) % 3].to_string();
        let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
        args.extend(keys.iter().map(String::as_str));
        let reply = raw_command(ports[from], &args).expect("MIGRATE");
        assert_eq!(reply, "OK", "MIGRATE {keys:?}");
    })
    .await
    .expect("join");
    slot_move
}

/// A session store on `cluster` refreshing at `share` of the idle timeout, and `n` users
/// whose keys share one slot, each with a session: (store, slot, users, their tokens).
async fn sessions_of_one_slot(
    cluster: &RedisCluster,
    share: (u32, u32),
    prefix: &str,
    n: usize,
) -> (RedisSessionStore, u16, Vec<String>, Vec<SessionToken>) {
    let config = SessionConfig::builder()
        .touch_after_share(share.0, share.1)
        .build()
        .expect("config");
    let store = RedisSessionStore::builder(RedisTopology::Cluster(cluster.urls()))
        .prefix(&store_prefix(prefix))
        .call_timeout(Duration::from_secs(10))
        .config(config)
        .connect()
        .await
        .expect("connect");
    let mut by_slot: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    let (slot, users) = (0..)
        .find_map(|i| {
            let user = format!("member-{i}");
            let slot = hash_slot(store.index_key(&user).as_bytes());
            let users = by_slot.entry(slot).or_default();
            users.push(user);
            (users.len() == n).then(|| (slot, users.clone()))
        })
        .expect("n users of one slot");
    let mut tokens = Vec::new();
    for user in &users {
        let (token, _) = store
            .create(&NewSession::for_user(user.as_str()))
            .await
            .expect("create");
        tokens.push(token);
    }
    (store, slot, users, tokens)
}

/// Loads the four sessions of `tokens` concurrently, queued before the batching task runs.
async fn load_at_once(
    store: &RedisSessionStore,
    tokens: &[SessionToken],
) -> [statehouse_core::Result<Option<statehouse_core::session::LoadedSession>>; 4] {
    let loads = tokio::join!(
        store.load(&tokens[0]),
        store.load(&tokens[1]),
        store.load(&tokens[2]),
        store.load(&tokens[3]),
    );
    [loads.0, loads.1, loads.2, loads.3]
}

/// Four users of one slot, each with a session, while the slot is half moved: the first and
/// third users' keys (session and index) on the target, the others' on the source, each user's
/// keys together. Loads of the four, queued before the batching task runs (one thread), go out
/// as one coalesced call on keys of both nodes, refused with `TRYAGAIN` for as long as they
/// stay apart; split by user, every load is answered at once, without waiting for the move to
/// end (here it never does). `touched` tells which path answered: the script (it refreshes)
/// or the read-only fast path.
async fn session_loads_of_a_half_moved_slot(share: (u32, u32), touched: bool) {
    let cluster = private_cluster().await;
    let (store, slot, users, tokens) =
        sessions_of_one_slot(&cluster, share, "reshard-split-load", 4).await;
    let moved = [0, 2]
        .into_iter()
        .flat_map(|i| [store.session_key(&tokens[i]), store.index_key(&users[i])])
        .collect();
    let slot_move = half_move_keys(&cluster, slot, moved).await;
    for (user, loaded) in users.iter().zip(load_at_once(&store, &tokens).await) {
        let loaded = loaded
            .unwrap_or_else(|e| panic!("{user}: not answered while the keys are apart: {e}"))
            .unwrap_or_else(|| panic!("{user}: no session"));
        assert_eq!(&loaded.record.user_id, user);
        assert_eq!(loaded.touched, touched, "{user}");
    }
    finish(slot_move).await;
    // Once more, the move done, on nodes that lost their scripts: one call of the four, whose
    // `EVALSHA` (`NOSCRIPT`) loads the script and runs again.
    let cluster_ports = cluster.ports();
    tokio::task::spawn_blocking(move || {
        for port in cluster_ports {
            assert_eq!(
                raw_command(port, &["SCRIPT", "FLUSH"]).expect("flush"),
                "OK"
            );
        }
    })
    .await
    .expect("join");
    for (user, loaded) in users.iter().zip(load_at_once(&store, &tokens).await) {
        let loaded = loaded.expect("load").expect("present");
        assert_eq!(&loaded.record.user_id, user);
    }
}

/// Session loads that need the script (here every load refreshes: `touch_after` zero), of
/// users whose keys are on both nodes of a half-moved slot, coalesced into one `load_many` call:
/// split by user, each answered at once. Regression: the whole call was tried again until the
/// move ended or the call gave up, so every load of the batch failed for as long as the move
/// lasted, though each alone would have been answered in a millisecond.
#[tokio::test]
async fn coalesced_session_loads_of_a_half_moved_slot_are_answered_at_once() {
    session_loads_of_a_half_moved_slot((0, 1), true).await;
}

/// The same for the read-only fast path (one `MGET` of the session keys), which shares the
/// cache reads' split.
#[tokio::test]
async fn coalesced_session_reads_of_a_half_moved_slot_are_answered_at_once() {
    session_loads_of_a_half_moved_slot((1, 4), false).await;
}
