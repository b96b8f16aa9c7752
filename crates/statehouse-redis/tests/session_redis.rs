//! RedisSessionStore on the shared standalone server and the shared 3-master cluster: the
//! storage layout (one slot per user, a TTL on every key, no token at rest), corrupt data,
//! connection sharing and server time. The behaviour contract itself is the session
//! conformance suite (crates/statehouse/tests/session_conformance.rs).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use statehouse_core::session::{
    NewSession, SessionChanges, SessionConfig, SessionStore, SessionToken, Updated,
};
use statehouse_core::{Clock, Error, ManualClock};
use statehouse_redis::{RedisSessionStore, RedisStore, RedisTopology, TimeSource};
use statehouse_testkit::{raw_command, shared_cluster, shared_standalone};

use common::{cluster_command, store_prefix};

fn config() -> SessionConfig {
    SessionConfig::builder()
        .idle_timeout(Duration::from_secs(60))
        .absolute_lifetime(Duration::from_secs(600))
        .rotation_grace(Duration::from_secs(5))
        .build()
        .expect("config")
}

async fn store(topology: RedisTopology, name: &str, clock: &ManualClock) -> RedisSessionStore {
    let clock: Arc<dyn Clock> = Arc::new(clock.clone());
    RedisSessionStore::builder(topology)
        .prefix(&store_prefix(name))
        .time_source(TimeSource::Caller(clock))
        .config(config())
        .connect()
        .await
        .expect("connect")
}

fn standalone() -> RedisTopology {
    RedisTopology::Standalone(shared_standalone().url())
}

fn cluster() -> RedisTopology {
    RedisTopology::Cluster(shared_cluster().urls())
}

fn new_session(user: &str) -> NewSession {
    NewSession {
        user_id: user.into(),
        roles: vec!["admin".into(), "user".into()],
        data: BTreeMap::from([
            ("cart".to_owned(), b"{\"items\":3}".to_vec()),
            ("blob".to_owned(), vec![0, 1, 2, 254, 255, b'\n', b'\r']),
        ]),
        ip: Some("203.0.113.9".into()),
        user_agent: Some("test-agent/1.0".into()),
    }
}

/// A command on whichever node holds the key (or the standalone server).
type Raw = dyn Fn(&[&str]) -> String;

/// Creates sessions for two users, rotates, updates and loads some, then checks every key under
/// the store's prefix: one slot per user, a TTL everywhere, no token text in keys or values.
async fn layout_is_safe(topology: RedisTopology, ports: Vec<u16>, raw: &Raw, on_cluster: bool) {
    let clock = ManualClock::starting_now();
    let store = store(topology, "layout", &clock).await;
    let mut tokens: Vec<SessionToken> = Vec::new();
    for user in ["alice", "bob"] {
        for _ in 0..3 {
            let (token, _) = store.create(&new_session(user)).await.expect("create");
            tokens.push(token);
        }
    }
    let (rotated, _) = store
        .rotate(&tokens[0])
        .await
        .expect("rotate")
        .expect("alive");
    tokens.push(rotated.clone());
    let changes = SessionChanges {
        set: BTreeMap::from([("theme".to_owned(), b"dark".to_vec())]),
        ..SessionChanges::default()
    };
    assert_eq!(
        store.update(&rotated, &changes).await.expect("update"),
        Updated::Written
    );
    clock.advance(Duration::from_secs(30));
    assert!(
        store
            .load(&tokens[1])
            .await
            .expect("load")
            .expect("alive")
            .touched
    );

    // SCAN every node (never KEYS).
    let mut keys = Vec::new();
    for port in ports {
        let mut cursor = "0".to_owned();
        loop {
            let reply = raw_command(
                port,
                &[
                    "SCAN",
                    &cursor,
                    "MATCH",
                    &format!("{}*", store.prefix()),
                    "COUNT",
                    "1000",
                ],
            )
            .expect("scan");
            let mut lines = reply.lines();
            cursor = lines.next().expect("cursor").to_owned();
            keys.extend(lines.map(str::to_owned));
            if cursor == "0" {
                break;
            }
        }
    }
    keys.sort();
    keys.dedup();
    // 6 sessions + 1 alias + 2 indexes.
    assert_eq!(keys.len(), 9, "{keys:#?}");

    let mut dump = String::new();
    for key in &keys {
        let pttl: i64 = raw(&["PTTL", key]).parse().expect("pttl");
        assert!(pttl > 0, "{key} has no TTL ({pttl})");
        let kind = raw(&["TYPE", key]);
        let value = match kind.as_str() {
            // Sessions and rotation aliases: one compact record each.
            "string" => raw(&["GET", key]),
            "zset" => raw(&["ZRANGE", key, "0", "-1", "WITHSCORES"]),
            other => panic!("{key} is a {other}"),
        };
        dump.push_str(key);
        dump.push('\n');
        dump.push_str(&value);
        dump.push('\n');
    }
    for token in &tokens {
        let text = token.encode();
        assert!(!dump.contains(&text), "token text found at rest");
        // Nor any long piece of it.
        assert!(
            !dump.contains(&text[10..40]),
            "part of a token found at rest"
        );
    }
    if on_cluster {
        for user in ["alice", "bob"] {
            let index = store.index_key(user);
            let tag = &index[index.find('{').expect("tag")..=index.find('}').expect("tag")];
            let slot = raw(&["CLUSTER", "KEYSLOT", &index]);
            for key in keys.iter().filter(|k| k.contains(tag)) {
                assert_eq!(raw(&["CLUSTER", "KEYSLOT", key]), slot, "{key}");
            }
        }
    }
    // Listing and revoking everything work on the same slot (no CROSSSLOT).
    assert_eq!(store.list_for_user("alice").await.expect("list").len(), 3);
    assert_eq!(
        store
            .revoke_all_for_user("alice", None)
            .await
            .expect("revoke all")
            .len(),
        3
    );
    assert_eq!(
        store
            .revoke_all_for_user("bob", None)
            .await
            .expect("revoke all")
            .len(),
        3
    );
}

#[tokio::test]
async fn standalone_layout_is_one_tag_per_user_with_ttls_and_no_tokens() {
    let port = shared_standalone().port();
    let raw = move |args: &[&str]| raw_command(port, args).expect("raw command");
    layout_is_safe(standalone(), vec![port], &raw, false).await;
}

#[tokio::test]
async fn cluster_layout_is_one_slot_per_user_with_ttls_and_no_tokens() {
    let cluster_ref = shared_cluster();
    let raw = move |args: &[&str]| cluster_command(cluster_ref, args);
    layout_is_safe(cluster(), cluster_ref.ports(), &raw, true).await;
}

#[tokio::test]
async fn the_whole_life_of_a_session_on_the_cluster() {
    let clock = ManualClock::starting_now();
    let store = store(cluster(), "life", &clock).await;
    let new = new_session("carol");
    let (token, record) = store.create(&new).await.expect("create");
    assert_eq!(record.data, new.data);
    let loaded = store.load(&token).await.expect("load").expect("alive");
    assert_eq!(loaded.record, record);
    assert!(!loaded.touched);

    let mut changes = SessionChanges::default();
    changes.remove.insert("cart".into());
    changes.roles = Some(vec!["user".into()]);
    assert_eq!(
        store.update(&token, &changes).await.expect("update"),
        Updated::Written
    );
    let (new_token, rotated) = store.rotate(&token).await.expect("rotate").expect("alive");
    assert_eq!(rotated.created_at, record.created_at);
    assert_eq!(rotated.roles, vec!["user".to_owned()]);
    assert!(!rotated.data.contains_key("cart"));
    assert_eq!(rotated.data["blob"], new.data["blob"]);

    let via_alias = store.load(&token).await.expect("load").expect("in grace");
    assert!(via_alias.via_rotation_alias);
    assert_eq!(via_alias.record.id, new_token.id());
    clock.advance(Duration::from_secs(6));
    assert!(store.load(&token).await.expect("load").is_none());
    assert!(store.load(&new_token).await.expect("load").is_some());

    let listed = store.list_for_user("carol").await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, new_token.id());
    assert!(store.revoke(&new_token).await.expect("revoke"));
    assert_eq!(
        store.update(&new_token, &changes).await.expect("update"),
        Updated::Gone
    );
    assert!(store.load(&new_token).await.expect("load").is_none());
}

#[tokio::test]
async fn corrupt_session_data_is_a_backend_error() {
    let clock = ManualClock::starting_now();
    let store = store(standalone(), "corrupt", &clock).await;
    let port = shared_standalone().port();
    let raw = |args: &[&str]| raw_command(port, args).expect("raw command");

    let (token, _) = store.create(&new_session("dave")).await.expect("create");
    let key = store.session_key(&token);
    // last_seen (bytes 17..33 of the record) is no longer 16 digits.
    raw(&["SETRANGE", &key, "17", "yesterday"]);
    let err = store.load(&token).await.expect_err("corrupt last_seen");
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");
    assert!(!err.is_unavailable());
    let err = store
        .list_for_user("dave")
        .await
        .expect_err("corrupt last_seen");
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");

    raw(&["DEL", &key]);
    raw(&["SET", &key, "not a session record at all"]);
    for err in [
        store.load(&token).await.expect_err("wrong type"),
        store
            .update(&token, &SessionChanges::default())
            .await
            .expect_err("wrong type"),
        store.rotate(&token).await.expect_err("wrong type"),
    ] {
        assert!(matches!(err, Error::Backend { .. }), "{err:?}");
    }

    // A record with a good header but no user id.
    let now = format!("{:016}", clock.now().as_micros());
    raw(&["SET", &key, &format!("S{now}{now}")]);
    let err = store.load(&token).await.expect_err("no user");
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");
    // A field cut short.
    raw(&["SET", &key, &format!("S{now}{now}u\0\0")]);
    let err = store.load(&token).await.expect_err("cut short");
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");

    // A HASH, as sessions were stored before the compact records: corrupt data too.
    raw(&["DEL", &key]);
    raw(&["HSET", &key, "u", "dave", "c", "1", "s", "1"]);
    for err in [
        store.load(&token).await.expect_err("a hash"),
        store
            .update(&token, &SessionChanges::default())
            .await
            .expect_err("a hash"),
        store.rotate(&token).await.expect_err("a hash"),
        store.revoke(&token).await.expect_err("a hash"),
    ] {
        assert!(matches!(err, Error::Backend { .. }), "{err:?}");
    }

    let index = store.index_key("dave");
    raw(&["DEL", &index]);
    raw(&["SET", &index, "x"]);
    let err = store
        .list_for_user("dave")
        .await
        .expect_err("index of the wrong type");
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");
    raw(&["DEL", &index, &key]);
}

/// A create at the per-user bound reads the user's sessions before it writes anything, so
/// corrupt data among them fails it with nothing written: no orphaned record, no eviction.
#[tokio::test]
async fn create_at_the_bound_over_corrupt_data_writes_nothing() {
    let clock = ManualClock::starting_now();
    let config = SessionConfig::builder()
        .max_sessions_per_user(2)
        .build()
        .expect("config");
    let store = RedisSessionStore::builder(standalone())
        .prefix(&store_prefix("bound-corrupt"))
        .time_source(TimeSource::Caller(Arc::new(clock.clone())))
        .config(config)
        .connect()
        .await
        .expect("connect");
    let port = shared_standalone().port();
    let raw = |args: &[&str]| raw_command(port, args).expect("raw command");
    let (a, _) = store.create(&new_session("erin")).await.expect("create");
    clock.advance(Duration::from_secs(1));
    let (b, _) = store.create(&new_session("erin")).await.expect("create");
    let b_key = store.session_key(&b);
    raw(&["SETRANGE", &b_key, "17", "yesterday"]);
    let user_keys = || {
        let base = b_key.trim_end_matches(b.id().as_str());
        let mut keys: Vec<String> =
            raw(&["SCAN", "0", "MATCH", &format!("{base}*"), "COUNT", "1000"])
                .lines()
                .skip(1)
                .map(str::to_owned)
                .collect();
        keys.sort();
        keys
    };
    let before = user_keys();
    assert_eq!(before.len(), 3, "two sessions and the index: {before:?}");

    let err = store
        .create(&new_session("erin"))
        .await
        .expect_err("corrupt data at the bound");
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");
    assert_eq!(user_keys(), before, "nothing written");
    assert_eq!(raw(&["ZCARD", &store.index_key("erin")]), "2");
    assert!(
        store.load(&a).await.expect("load").is_some(),
        "nothing evicted"
    );
    raw(&[
        "DEL",
        &b_key,
        &store.index_key("erin"),
        &store.session_key(&a),
    ]);
}

#[tokio::test]
async fn invalid_input_is_refused_before_any_io() {
    // A server that is then killed: any I/O would fail as unavailable, not as invalid input.
    let mut server =
        tokio::task::spawn_blocking(|| statehouse_testkit::RedisServer::start().expect("redis"))
            .await
            .expect("start task");
    let store = RedisStore::builder(RedisTopology::Standalone(server.url()))
        .connect()
        .await
        .expect("connect")
        .session_store(config());
    tokio::task::spawn_blocking(move || server.kill())
        .await
        .expect("kill task");
    let mut bad = NewSession::for_user("eve");
    bad.roles.push(String::new());
    assert!(matches!(
        store.create(&bad).await,
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        store.create(&NewSession::for_user("")).await,
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        store.list_for_user("").await,
        Err(Error::InvalidInput(_))
    ));
    let mut changes = SessionChanges::default();
    changes.set.insert(
        "x".into(),
        vec![0; statehouse_core::session::MAX_VALUE_LEN + 1],
    );
    let token =
        SessionToken::generate(statehouse_core::session::UserTag::for_user("eve")).expect("token");
    assert!(matches!(
        store.update(&token, &changes).await,
        Err(Error::InvalidInput(_))
    ));
}

#[tokio::test]
async fn a_session_store_can_share_a_rate_limit_store_connection_and_use_server_time() {
    let limits = RedisStore::builder(standalone())
        .prefix(&store_prefix("shared-rl"))
        .connect()
        .await
        .expect("connect");
    let sessions = limits
        .session_store(SessionConfig::default())
        .with_prefix(&store_prefix("shared-s"))
        .expect("prefix");
    let (token, record) = sessions
        .create(&new_session("frank"))
        .await
        .expect("create");
    // Server time: created now, give or take the test machine's clock.
    let now = statehouse_core::SystemClock.now();
    let diff = now.as_micros().abs_diff(record.created_at.as_micros());
    assert!(
        diff < 60_000_000,
        "server time {:?} vs {now:?}",
        record.created_at
    );
    let loaded = sessions.load(&token).await.expect("load").expect("alive");
    assert_eq!(loaded.record.id, token.id());
    assert!(!loaded.touched);
    assert!(sessions.revoke(&token).await.expect("revoke"));
    assert!(!sessions.revoke(&token).await.expect("revoke again"));
}

#[tokio::test]
async fn a_large_session_round_trips() {
    let clock = ManualClock::starting_now();
    let store = store(standalone(), "large", &clock).await;
    let mut new = NewSession::for_user("gina");
    for i in 0..2_000 {
        new.data
            .insert(format!("field-{i}"), vec![(i % 256) as u8; 100]);
    }
    new.roles = (0..64).map(|i| format!("role-{i}")).collect();
    let (token, record) = store.create(&new).await.expect("create");
    let loaded = store.load(&token).await.expect("load").expect("alive");
    assert_eq!(loaded.record, record);
    let changes = SessionChanges {
        remove: new.data.keys().take(1_500).cloned().collect(),
        ..SessionChanges::default()
    };
    assert_eq!(
        store.update(&token, &changes).await.expect("update"),
        Updated::Written
    );
    let (_, rotated) = store.rotate(&token).await.expect("rotate").expect("alive");
    assert_eq!(rotated.data.len(), 500);
    assert_eq!(rotated.roles.len(), 64);
}

/// Records every event.
#[derive(Debug, Default)]
struct Recorder(std::sync::Mutex<Vec<statehouse_core::session::SessionEvent>>);

impl statehouse_core::session::SessionHooks for Recorder {
    fn on_event(&self, event: &statehouse_core::session::SessionEvent) {
        self.0.lock().expect("lock").push(event.clone());
    }
}

#[tokio::test]
async fn hooks_hear_every_confirmed_change() {
    use statehouse_core::session::SessionEvent;

    let clock = ManualClock::starting_now();
    let recorder = Arc::new(Recorder::default());
    let store = store(standalone(), "hooks", &clock)
        .await
        .with_hooks(recorder.clone());
    let (a, ra) = store
        .create(&NewSession::for_user("hal"))
        .await
        .expect("create");
    let (b, rb) = store.rotate(&a).await.expect("rotate").expect("alive");
    assert!(store.revoke(&b).await.expect("revoke"));
    let (c, rc) = store
        .create(&NewSession::for_user("hal"))
        .await
        .expect("create");
    clock.advance(Duration::from_secs(60));
    assert!(store.load(&c).await.expect("load").is_none());
    let user = Some("hal".to_owned());
    assert_eq!(
        *recorder.0.lock().expect("lock"),
        vec![
            SessionEvent::Created {
                id: ra.id.clone(),
                user_id: "hal".into()
            },
            SessionEvent::Rotated {
                from: ra.id,
                to: rb.id.clone(),
                user_id: "hal".into()
            },
            SessionEvent::Revoked {
                id: rb.id,
                user_id: user.clone()
            },
            SessionEvent::Created {
                id: rc.id.clone(),
                user_id: "hal".into()
            },
            SessionEvent::Expired {
                id: rc.id,
                user_id: user
            },
        ]
    );
    let _ = (b, c);
}

/// Concurrent loads are coalesced into one script call per slot: each still answers as a load
/// of its own, and one corrupt session fails only its own load.
async fn concurrent_loads_answer_each_caller(topology: RedisTopology, raw: &Raw) {
    let clock = ManualClock::starting_now();
    let store = store(topology, "batched", &clock).await;
    let mut tokens = Vec::new();
    for i in 0..40 {
        tokens.push(
            store
                .create(&new_session(&format!("user-{i}")))
                .await
                .expect("create")
                .0,
        );
    }
    let corrupt = tokens[7].clone();
    // created_at (bytes 1..17 of the record) is no longer 16 digits.
    raw(&["SETRANGE", &store.session_key(&corrupt), "1", "not a time"]);
    let revoked = tokens[11].clone();
    assert!(store.revoke(&revoked).await.expect("revoke"));
    clock.advance(Duration::from_secs(20));

    let handles: Vec<_> = tokens
        .iter()
        .map(|t| {
            let (store, t) = (store.clone(), t.clone());
            tokio::spawn(async move { store.load(&t).await })
        })
        .collect();
    for (token, handle) in tokens.iter().zip(handles) {
        let result = handle.await.expect("task");
        if *token == corrupt {
            let err = result.expect_err("corrupt");
            assert!(matches!(err, Error::Backend { .. }), "{err:?}");
        } else if *token == revoked {
            assert!(result.expect("load").is_none());
        } else {
            let loaded = result.expect("load").expect("alive");
            assert_eq!(loaded.record.id, token.id());
            assert!(loaded.touched, "past touch_after: refreshed");
        }
    }
    raw(&["DEL", &store.session_key(&corrupt)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_loads_answer_each_caller_on_standalone() {
    let port = shared_standalone().port();
    let raw = move |args: &[&str]| raw_command(port, args).expect("raw command");
    concurrent_loads_answer_each_caller(standalone(), &raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_loads_answer_each_caller_on_the_cluster() {
    let cluster_ref = shared_cluster();
    let raw = move |args: &[&str]| cluster_command(cluster_ref, args);
    concurrent_loads_answer_each_caller(cluster(), &raw).await;
}

/// With server time, the read-only fast path (a plain `GET`, local clock with a margin)
/// answers loads of fresh sessions, and a due refresh still goes to the script and is written.
#[tokio::test]
async fn server_time_loads_use_the_fast_path_and_still_refresh_when_due() {
    for (topology, name) in [(standalone(), "fast-s"), (cluster(), "fast-c")] {
        for (share, expect_touch) in [((1, 4), false), ((0, 1), true)] {
            let config = SessionConfig::builder()
                .idle_timeout(Duration::from_secs(60))
                .touch_after_share(share.0, share.1)
                .build()
                .expect("config");
            let store = RedisSessionStore::builder(topology.clone())
                .prefix(&store_prefix(name))
                .config(config)
                .connect()
                .await
                .expect("connect");
            let (token, created) = store.create(&new_session("fast")).await.expect("create");
            for _ in 0..3 {
                let loaded = store.load(&token).await.expect("load").expect("alive");
                assert_eq!(loaded.touched, expect_touch, "share {share:?}");
                assert!(!loaded.via_rotation_alias);
                assert_eq!(loaded.record.user_id, created.user_id);
                assert_eq!(loaded.record.roles, created.roles);
                assert_eq!(loaded.record.data, created.data);
                assert_eq!(loaded.record.ip, created.ip);
                assert_eq!(loaded.record.user_agent, created.user_agent);
                assert_eq!(loaded.record.created_at, created.created_at);
                if !expect_touch {
                    assert_eq!(loaded.record.last_seen, created.last_seen);
                }
            }
            // A revoked session is gone for the fast path too.
            assert!(store.revoke(&token).await.expect("revoke"));
            assert!(store.load(&token).await.expect("load").is_none());
        }
    }
}

/// Updates decode, change and re-encode the record inside the script: concurrent updates of
/// different fields all survive, binary values come back intact, and a field of a kind this
/// version does not know (written by a newer one) is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_updates_of_different_fields_are_all_kept() {
    for (topology, name, on_cluster) in [
        (standalone(), "merge-s", false),
        (cluster(), "merge-c", true),
    ] {
        let clock = ManualClock::starting_now();
        let store = store(topology, name, &clock).await;
        let (token, created) = store.create(&new_session("erin")).await.expect("create");
        let key = store.session_key(&token);
        let unknown = "z\u{0}\u{0}\u{0}\u{2}hi";
        let raw = |args: &[&str]| {
            if on_cluster {
                cluster_command(shared_cluster(), args)
            } else {
                raw_command(shared_standalone().port(), args).expect("raw command")
            }
        };
        raw(&["APPEND", &key, unknown]);

        let handles: Vec<_> = (0..24)
            .map(|i| {
                let (store, token) = (store.clone(), token.clone());
                tokio::spawn(async move {
                    let mut changes = SessionChanges::default();
                    changes
                        .set
                        .insert(format!("field-{i}"), vec![i as u8, 0, 255, b'\n']);
                    if i == 5 {
                        changes.remove.insert("cart".into());
                    }
                    store.update(&token, &changes).await
                })
            })
            .collect();
        for handle in handles {
            assert_eq!(
                handle.await.expect("task").expect("update"),
                Updated::Written
            );
        }
        let loaded = store.load(&token).await.expect("load").expect("alive");
        for i in 0..24 {
            assert_eq!(
                loaded.record.data[&format!("field-{i}")],
                vec![i as u8, 0, 255, b'\n'],
                "field-{i}"
            );
        }
        assert!(!loaded.record.data.contains_key("cart"));
        assert_eq!(loaded.record.data["blob"], created.data["blob"]);
        assert_eq!(loaded.record.roles, created.roles);
        assert_eq!(loaded.record.ip, created.ip);
        assert_eq!(loaded.record.user_agent, created.user_agent);
        assert_eq!(loaded.record.data.len(), 25);
        let tail = raw(&["GETRANGE", &key, "-7", "-1"]);
        assert_eq!(tail, unknown, "the unknown field is kept at the end");
        assert!(store.revoke(&token).await.expect("revoke"));
    }
}
