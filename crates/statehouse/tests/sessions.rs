//! [`Sessions`] over the real embedded store: lifecycle events reach the hooks (and only
//! confirmed changes), invalid input never reaches the store, typed data round-trips through
//! the codec, and an outage of a real Redis is an `is_unavailable` error within the deadline.

#![cfg(all(feature = "embedded", feature = "redis"))]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use statehouse::{
    EmbeddedSessionStore, JsonCodec, ManualClock, NewSession, RedisSessionStore, RedisTopology,
    SessionChanges, SessionCodec, SessionConfig, SessionEvent, SessionHooks, SessionStoreDown,
    Sessions, TimeSource, Updated,
};
use statehouse_testkit::RedisServer;

#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<SessionEvent>>);

impl SessionHooks for Recorder {
    fn on_event(&self, event: &SessionEvent) {
        self.0.lock().expect("lock").push(event.clone());
    }
}

impl Recorder {
    fn take(&self) -> Vec<SessionEvent> {
        std::mem::take(&mut *self.0.lock().expect("lock"))
    }
}

fn embedded(clock: &ManualClock) -> EmbeddedSessionStore {
    EmbeddedSessionStore::builder()
        .clock(clock.clone())
        .config(SessionConfig::default())
        .build()
        .expect("store")
}

#[tokio::test]
async fn events_follow_confirmed_changes() {
    let clock = ManualClock::starting_now();
    let hooks = Arc::new(Recorder::default());
    let sessions = Sessions::builder(embedded(&clock))
        .hooks(hooks.clone())
        .build()
        .expect("sessions");

    let (a, rec_a) = sessions
        .create(&NewSession::for_user("alice"))
        .await
        .expect("create");
    assert_eq!(
        hooks.take(),
        [SessionEvent::Created {
            id: rec_a.id.clone(),
            user_id: "alice".into()
        }]
    );

    let (a2, rec_a2) = sessions.rotate(&a).await.expect("rotate").expect("live");
    assert_eq!(
        hooks.take(),
        [SessionEvent::Rotated {
            from: rec_a.id.clone(),
            to: rec_a2.id.clone(),
            user_id: "alice".into()
        }]
    );

    let (_b, rec_b) = sessions
        .create(&NewSession::for_user("alice"))
        .await
        .expect("create");
    let (_c, rec_c) = sessions
        .create(&NewSession::for_user("alice"))
        .await
        .expect("create");
    hooks.take();
    let n = sessions
        .revoke_all_for_user("alice", Some(&rec_a2.id))
        .await
        .expect("revoke all");
    assert_eq!(n, 2);
    let mut revoked: Vec<_> = hooks
        .take()
        .into_iter()
        .map(|e| match e {
            SessionEvent::Revoked { id, user_id } => {
                assert_eq!(user_id.as_deref(), Some("alice"));
                id
            }
            other => panic!("{other:?}"),
        })
        .collect();
    revoked.sort();
    let mut expected = vec![rec_b.id, rec_c.id];
    expected.sort();
    assert_eq!(revoked, expected);

    assert!(sessions.revoke(&a2).await.expect("revoke"));
    assert_eq!(
        hooks.take(),
        [SessionEvent::Revoked {
            id: a2.id(),
            user_id: Some("alice".into())
        }]
    );
    // Nothing confirmed, nothing reported: a second revoke, a rotate of a gone session, a load
    // of an unknown token (which is never reported as `Expired`).
    assert!(!sessions.revoke(&a2).await.expect("revoke"));
    assert!(sessions.rotate(&a2).await.expect("rotate").is_none());
    assert!(sessions.load(&a2).await.expect("load").is_none());
    assert!(hooks.take().is_empty());

    // Through an old token in its grace, the events name the session acted on, not the alias.
    let (d1, _) = sessions
        .create(&NewSession::for_user("dora"))
        .await
        .expect("create");
    let (d2, _) = sessions.rotate(&d1).await.expect("rotate").expect("live");
    hooks.take();
    let (d3, _) = sessions
        .rotate(&d1)
        .await
        .expect("rotate")
        .expect("via the alias");
    assert_eq!(
        hooks.take(),
        [SessionEvent::Rotated {
            from: d2.id(),
            to: d3.id(),
            user_id: "dora".into()
        }]
    );
    assert!(sessions.revoke(&d2).await.expect("revoke"));
    assert_eq!(
        hooks.take(),
        [SessionEvent::Revoked {
            id: d3.id(),
            user_id: Some("dora".into())
        }]
    );
}

/// A login past `max_sessions_per_user` reports the session it displaced, then the new one.
#[tokio::test]
async fn eviction_past_the_per_user_bound_is_reported_as_revoked() {
    let clock = ManualClock::starting_now();
    let hooks = Arc::new(Recorder::default());
    let store = EmbeddedSessionStore::builder()
        .clock(clock.clone())
        .config(
            SessionConfig::builder()
                .max_sessions_per_user(2)
                .build()
                .expect("config"),
        )
        .build()
        .expect("store");
    let sessions = Sessions::builder(store)
        .hooks(hooks.clone())
        .build()
        .expect("sessions");
    let (first, _) = sessions
        .create(&NewSession::for_user("erin"))
        .await
        .expect("create");
    clock.advance(std::time::Duration::from_secs(1));
    sessions
        .create(&NewSession::for_user("erin"))
        .await
        .expect("create");
    hooks.take();
    let (_, third) = sessions
        .create(&NewSession::for_user("erin"))
        .await
        .expect("create");
    assert_eq!(
        hooks.take(),
        [
            SessionEvent::Revoked {
                id: first.id(),
                user_id: Some("erin".into())
            },
            SessionEvent::Created {
                id: third.id,
                user_id: "erin".into()
            }
        ]
    );
    assert!(sessions.load(&first).await.expect("load").is_none());
}

#[tokio::test]
async fn typed_data_and_invalid_input() {
    let clock = ManualClock::starting_now();
    let sessions = Sessions::new(embedded(&clock));
    assert!(
        sessions
            .create(&NewSession::for_user(""))
            .await
            .unwrap_err()
            .is_invalid_input()
    );

    let (token, _) = sessions
        .create(&NewSession::for_user("bob"))
        .await
        .expect("create");
    let mut changes = SessionChanges::default();
    changes.set.insert(
        "cart".into(),
        sessions.encode(&vec![3_u32, 4]).expect("encode"),
    );
    assert_eq!(
        sessions.update(&token, &changes).await.expect("update"),
        Updated::Written
    );
    let record = sessions
        .load(&token)
        .await
        .expect("load")
        .expect("live")
        .record;
    let cart: Vec<u32> = sessions.decode(&record.data["cart"]).expect("decode");
    assert_eq!(cart, [3, 4]);
    // The wrong type is a backend error (a corrupt or foreign value), not a panic.
    assert!(sessions.decode::<String>(&record.data["cart"]).is_err());
    assert!(JsonCodec.decode::<u8>(b"{").is_err());

    let mut bad = SessionChanges::default();
    bad.set.insert(String::new(), Vec::new());
    assert!(
        sessions
            .update(&token, &bad)
            .await
            .unwrap_err()
            .is_invalid_input()
    );
}

#[tokio::test]
async fn redis_outage_is_unavailable_within_the_deadline() {
    let mut server = RedisServer::start().expect("redis-server");
    let clock = ManualClock::starting_now();
    let store = RedisSessionStore::builder(RedisTopology::Standalone(server.url()))
        .time_source(TimeSource::Caller(Arc::new(clock.clone())))
        .connect()
        .await
        .expect("connect");
    let sessions = Sessions::builder(store)
        .deadline(Duration::from_millis(200))
        .on_store_down(SessionStoreDown::Anonymous)
        .build()
        .expect("sessions");
    assert_eq!(sessions.store_down_policy(), SessionStoreDown::Anonymous);
    let (token, _) = sessions
        .create(&NewSession::for_user("carol"))
        .await
        .expect("create");
    server.kill();
    for _ in 0..5 {
        let start = Instant::now();
        let err = sessions.load(&token).await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }
}

/// A Redis that stops answering without closing the connection (frozen with SIGSTOP): loads
/// end at the facade's deadline, far below the store's call timeout, both on the read-only
/// fast path (which the Redis store bounds itself, `SessionStore::load_within`, without a timer
/// per load) and when every load refreshes (the script path); they succeed again once the
/// server answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_ends_loads_at_the_deadline() {
    const DEADLINE: Duration = Duration::from_millis(100);
    const CALL_TIMEOUT: Duration = Duration::from_secs(3);
    let server = RedisServer::start().expect("redis-server");
    for touch_every_load in [false, true] {
        let mut config = SessionConfig::builder();
        if touch_every_load {
            config = config.touch_after_share(0, 1);
        }
        let store = RedisSessionStore::builder(RedisTopology::Standalone(server.url()))
            .prefix(&format!("frozen{}:", u8::from(touch_every_load)))
            .config(config.build().expect("config"))
            .call_timeout(CALL_TIMEOUT)
            .connect()
            .await
            .expect("connect");
        let sessions = Sessions::builder(store)
            .deadline(DEADLINE)
            .build()
            .expect("sessions");
        let (token, _) = sessions
            .create(&NewSession::for_user("dave"))
            .await
            .expect("create");
        assert!(sessions.load(&token).await.expect("load").is_some());

        let frozen = server.freeze().expect("SIGSTOP");
        let loads: Vec<_> = (0..10)
            .map(|_| {
                let (sessions, token) = (sessions.clone(), token.clone());
                tokio::spawn(async move {
                    let start = Instant::now();
                    (sessions.load(&token).await, start.elapsed())
                })
            })
            .collect();
        for load in loads {
            let (result, took) = load.await.expect("no panic");
            let err = result.expect_err("frozen");
            assert!(
                err.is_unavailable(),
                "touch every load {touch_every_load}: {err}"
            );
            assert!(
                took < Duration::from_millis(600),
                "touch every load {touch_every_load}: a load took {took:?}"
            );
        }
        drop(frozen);
        let start = Instant::now();
        loop {
            if let Ok(Some(_)) = sessions.load(&token).await {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no load after SIGCONT"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
