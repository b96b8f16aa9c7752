//! The session conformance suite: one behaviour contract for every [`SessionStore`].
//!
//! Each case takes a [`SessionStoreFactory`] that makes a fresh, isolated store whose time
//! follows a [`ManualClock`] and which enforces the [`SessionConfig`] it is given, runs a
//! scenario with all time moved by the clock (no sleeps), and checks what the store answers,
//! down to the microsecond at every expiry edge. The semantics checked are those written out in
//! `statehouse_embedded::session`; the embedded store, Redis standalone and Redis Cluster must
//! all pass.
//!
//! Instantiate it with [`session_conformance!`](crate::session_conformance):
//!
//! ```ignore
//! statehouse_testkit::session_conformance!(embedded, EmbeddedSessions);
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use statehouse_core::session::{
    LoadedSession, MAX_NAME_LEN, MAX_ROLES, MAX_VALUE_LEN, NewSession, Revoked, Rotated,
    SessionChanges, SessionConfig, SessionId, SessionInfo, SessionRecord, SessionStore,
    SessionToken, Updated, UserTag,
};
use statehouse_core::{Clock, ManualClock, Timestamp};

/// Makes session stores for the suite.
#[async_trait]
pub trait SessionStoreFactory: Send + Sync {
    /// A store isolated from every other store this factory made (its own key prefix, say),
    /// whose notion of "now" follows `clock` and which enforces `config`.
    async fn make(&self, clock: &ManualClock, config: SessionConfig) -> Arc<dyn SessionStore>;

    /// A second handle on the same sessions as `store` (another connection with the same key
    /// prefix: another replica of the application), also following `clock` and enforcing
    /// `config`. Backends without separate connections return `store` itself.
    async fn another_replica(
        &self,
        store: &Arc<dyn SessionStore>,
        clock: &ManualClock,
        config: SessionConfig,
    ) -> Arc<dyn SessionStore>;
}

/// The lifetimes every case uses unless it says otherwise: 60 s idle, 10 min absolute, refresh
/// after 15 s, 5 s rotation grace.
pub fn suite_config() -> SessionConfig {
    suite_config_builder()
        .build()
        .expect("valid session config")
}

fn suite_config_builder() -> statehouse_core::session::SessionConfigBuilder {
    SessionConfig::builder()
        .idle_timeout(IDLE)
        .absolute_lifetime(ABSOLUTE)
        .touch_after_share(1, 4)
        .rotation_grace(GRACE)
}

/// [`suite_config`] with at most `n` sessions per user.
fn suite_config_with_cap(n: u32) -> SessionConfig {
    suite_config_builder()
        .max_sessions_per_user(n)
        .build()
        .expect("valid session config")
}

const IDLE: Duration = Duration::from_secs(60);
const ABSOLUTE: Duration = Duration::from_secs(600);
const TOUCH_AFTER: Duration = Duration::from_secs(15);
const GRACE: Duration = Duration::from_secs(5);
const US: Duration = Duration::from_micros(1);

/// A store, its clock and its config.
pub struct Harness {
    /// The store under test.
    pub store: Arc<dyn SessionStore>,
    /// Its clock, starting at the current system time (so a Redis store's key expiry stays sane).
    pub clock: ManualClock,
    /// What it enforces.
    pub config: SessionConfig,
}

impl Harness {
    /// A fresh store from `factory` with [`suite_config`].
    pub async fn new(factory: &dyn SessionStoreFactory) -> Harness {
        Self::with_config(factory, suite_config()).await
    }

    /// A fresh store from `factory` enforcing `config`.
    pub async fn with_config(factory: &dyn SessionStoreFactory, config: SessionConfig) -> Harness {
        let clock = ManualClock::starting_now();
        let store = factory.make(&clock, config.clone()).await;
        Harness {
            store,
            clock,
            config,
        }
    }

    /// Another replica of the store.
    pub async fn replica(&self, factory: &dyn SessionStoreFactory) -> Arc<dyn SessionStore> {
        factory
            .another_replica(&self.store, &self.clock, self.config.clone())
            .await
    }

    /// The clock's time.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Moves the clock.
    pub fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }

    /// Creates a session, which must succeed.
    pub async fn create(&self, new: &NewSession) -> (SessionToken, SessionRecord) {
        self.store
            .create(new)
            .await
            .unwrap_or_else(|e| panic!("create failed: {e}"))
    }

    /// Creates a plain session for `user_id`.
    pub async fn create_for(&self, user_id: &str) -> (SessionToken, SessionRecord) {
        self.create(&NewSession::for_user(user_id)).await
    }

    /// Loads through the main store.
    pub async fn load(&self, token: &SessionToken) -> Option<LoadedSession> {
        load(&self.store, token).await
    }

    /// Updates through the main store.
    pub async fn update(&self, token: &SessionToken, changes: &SessionChanges) -> Updated {
        update(&self.store, token, changes).await
    }

    /// Lists through the main store.
    pub async fn list(&self, user_id: &str) -> Vec<SessionInfo> {
        self.store
            .list_for_user(user_id)
            .await
            .unwrap_or_else(|e| panic!("list_for_user failed: {e}"))
    }
}

async fn load(store: &Arc<dyn SessionStore>, token: &SessionToken) -> Option<LoadedSession> {
    store
        .load(token)
        .await
        .unwrap_or_else(|e| panic!("load failed: {e}"))
}

async fn update(
    store: &Arc<dyn SessionStore>,
    token: &SessionToken,
    changes: &SessionChanges,
) -> Updated {
    store
        .update(token, changes)
        .await
        .unwrap_or_else(|e| panic!("update failed: {e}"))
}

async fn revoke(store: &Arc<dyn SessionStore>, token: &SessionToken) -> bool {
    store
        .revoke(token)
        .await
        .unwrap_or_else(|e| panic!("revoke failed: {e}"))
}

async fn rotate(
    store: &Arc<dyn SessionStore>,
    token: &SessionToken,
) -> Option<(SessionToken, SessionRecord)> {
    store
        .rotate(token)
        .await
        .unwrap_or_else(|e| panic!("rotate failed: {e}"))
}

fn set(field: &str, value: &[u8]) -> SessionChanges {
    let mut changes = SessionChanges::default();
    changes.set.insert(field.to_owned(), value.to_vec());
    changes
}

fn data(fields: &[(&str, &[u8])]) -> BTreeMap<String, Vec<u8>> {
    fields
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
        .collect()
}

fn ids(list: &[SessionInfo]) -> Vec<SessionId> {
    list.iter().map(|i| i.id.clone()).collect()
}

/// A session loads back exactly as created; its id is the token's hash (the store keys by it and
/// never needs the token); every create draws a different token; a long user agent is cut to
/// 512 bytes.
pub async fn create_then_load_round_trips(f: &dyn SessionStoreFactory) {
    let h = Harness::new(f).await;
    let new = NewSession {
        user_id: "alice".into(),
        roles: vec!["reader".into(), "writer".into()],
        data: data(&[("cart", b"[1,2]"), ("theme", b"\"dark\"")]),
        ip: Some("203.0.113.7".into()),
        user_agent: Some("Mozilla/5.0".into()),
    };
    let (token, record) = h.create(&new).await;
    assert_eq!(
        record.id,
        token.id(),
        "a session is keyed by SHA-256 of its token"
    );
    assert_eq!(token.user_tag(), UserTag::for_user("alice"));
    assert_eq!(record.user_id, "alice");
    assert_eq!(record.roles, new.roles);
    assert_eq!(record.data, new.data);
    assert_eq!(record.ip, new.ip);
    assert_eq!(record.user_agent, new.user_agent);
    assert_eq!(record.created_at, h.now());
    assert_eq!(record.last_seen, h.now());
    assert_eq!(record.expires_at(&h.config), h.now().saturating_add(IDLE));

    let loaded = h.load(&token).await.expect("a new session loads");
    assert_eq!(loaded.record, record);
    assert!(!loaded.via_rotation_alias);
    // Parsing the cookie form gives the same session.
    let reparsed = SessionToken::parse(&token.encode()).expect("token round trip");
    assert_eq!(h.load(&reparsed).await.map(|l| l.record), Some(record));

    let (other, other_record) = h.create(&new).await;
    assert_ne!(other, token, "two creates give two tokens");
    assert_ne!(other_record.id, token.id());

    let long_ua = NewSession {
        user_agent: Some("u".repeat(600)),
        ..NewSession::for_user("alice")
    };
    let (t, r) = h.create(&long_ua).await;
    assert_eq!(r.user_agent.as_deref().map(str::len), Some(512));
    assert_eq!(
        h.load(&t).await.expect("loads").record.user_agent,
        r.user_agent
    );
}

/// Idle expiry is exact: alive at `last_seen + idle - 1µs`, gone at `last_seen + idle`, and a
/// read in between moves the edge.
pub async fn idle_expiry_is_exact(f: &dyn SessionStoreFactory) {
    let h = Harness::new(f).await;
    let (a, ra) = h.create_for("alice").await;
    let (b, _) = h.create_for("alice").await;
    h.advance(IDLE - US);
    let loaded = h.load(&a).await.expect("alive 1µs before the idle edge");
    assert!(loaded.touched, "the read refreshes it");
    assert_eq!(loaded.record.created_at, ra.created_at);
    assert_eq!(
        loaded.record.expires_at(&h.config),
        h.now().saturating_add(IDLE)
    );
    h.advance(US);
    assert!(
        h.load(&b).await.is_none(),
        "gone exactly at last_seen + idle"
    );
    assert!(h.load(&a).await.is_some(), "the refreshed one lives on");
    h.advance(IDLE - US);
    assert!(h.load(&a).await.is_none(), "gone exactly at its new edge");
    assert!(h.load(&b).await.is_none(), "and stays gone");
}

/// Absolute expiry is exact and activity cannot push past it: a session read every idle/2 is
/// alive at `created_at + absolute - 1µs` and gone at `created_at + absolute`.
pub async fn absolute_expiry_is_exact_despite_activity(f: &dyn SessionStoreFactory) {
    let h = Harness::new(f).await;
    let (t, record) = h.create_for("alice").await;
    let end = record.created_at.saturating_add(ABSOLUTE);
    let step = IDLE / 2;
    while h.now().saturating_add(step) < end {
        h.advance(step);
        let loaded = h.load(&t).await.expect("kept alive by activity");
        assert!(loaded.record.expires_at(&h.config) <= end);
    }
    h.advance(end.saturating_duration_since(h.now()) - US);
    let loaded = h
        .load(&t)
        .await
        .expect("alive 1µs before the absolute edge");
    assert_eq!(loaded.record.expires_at(&h.config), end);
    assert_eq!(
        update(&h.store, &t, &set("k", b"v")).await,
        Updated::Written,
        "writes count as activity too"
    );
    h.advance(US);
    assert!(
        h.load(&t).await.is_none(),
        "gone exactly at created_at + absolute"
    );
    assert_eq!(h.update(&t, &set("k", b"v")).await, Updated::Gone);
}

/// Reads refresh `last_seen` only once `touch_after` has passed since the last refresh.
pub async fn reads_refresh_only_after_touch_after(f: &dyn SessionStoreFactory) {
    let h = Harness::new(f).await;
    let (t, record) = h.create_for("alice").await;
    let loaded = h.load(&t).await.expect("loads");
    assert!(!loaded.touched);
    h.advance(TOUCH_AFTER - US);
    let loaded = h.load(&t).await.expect("loads");
    assert!(!loaded.touched, "too soon to write a refresh");
    assert_eq!(loaded.record.last_seen, record.last_seen);
    assert_eq!(
        loaded.record.expires_at(&h.config),
        record.expires_at(&h.config)
    );
    h.advance(US);
    let loaded = h.load(&t).await.expect("loads");
    assert!(loaded.touched, "the first read at touch_after refreshes");
    assert_eq!(loaded.record.last_seen, h.now());
    assert_eq!(
        loaded.record.expires_at(&h.config),
        h.now().saturating_add(IDLE)
    );
    let again = h.load(&t).await.expect("loads");
    assert!(!again.touched, "and the next one does not");
    assert_eq!(again.record.last_seen, loaded.record.last_seen);
    // The refresh really moved the edge: alive past the creation-based one.
    h.advance(IDLE - US);
    assert!(h.load(&t).await.is_some());
}

/// Updates are field-level: a set or remove touches only its fields, roles are replaced whole,
/// an update refreshes `last_seen`, and two concurrent updates of different fields through two
/// replicas both survive.
pub async fn updates_are_field_level(f: &dyn SessionStoreFactory) {
    let h = Harness::new(f).await;
    let new = NewSession {
        roles: vec!["reader".into()],
        data: data(&[("keep", b"1"), ("drop", b"2")]),
        ..NewSession::for_user("alice")
    };
    let (t, _) = h.create(&new).await;
    let r1 = h.replica(f).await;
    let r2 = h.replica(f).await;
    h.advance(Duration::from_secs(1));
    let (set_a, set_b) = (set("a", b"from replica 1"), set("b", b"from replica 2"));
    let (a, b) = futures::join!(update(&r1, &t, &set_a), update(&r2, &t, &set_b));
    assert_eq!((a, b), (Updated::Written, Updated::Written));
    let loaded = h.load(&t).await.expect("loads");
    assert_eq!(
        loaded.record.data,
        data(&[
            ("a", b"from replica 1"),
            ("b", b"from replica 2"),
            ("drop", b"2"),
            ("keep", b"1"),
        ])
    );
    assert_eq!(loaded.record.last_seen, h.now(), "an update is activity");

    h.advance(Duration::from_secs(1));
    let mut changes = set("a", b"again");
    changes.remove.insert("drop".into());
    changes.remove.insert("never-there".into());
    changes.roles = Some(vec!["admin".into(), "auditor".into()]);
    assert_eq!(h.update(&t, &changes).await, Updated::Written);
    let record = h.load(&t).await.expect("loads").record;
    assert_eq!(
        record.data,
        data(&[("a", b"again"), ("b", b"from replica 2"), ("keep", b"1")])
    );
    assert_eq!(record.roles, vec!["admin".to_owned(), "auditor".to_owned()]);
    assert_eq!(record.last_seen, h.now());

    // A field both removed and set ends up set; no roles given leaves them as they are; an
    // empty change set is still activity.
    let mut both = set("keep", b"new");
    both.remove.insert("keep".into());
    assert_eq!(h.update(&t, &both).await, Updated::Written);
    h.advance(Duration::from_secs(1));
    assert_eq!(
        h.update(&t, &SessionChanges::default()).await,
        Updated::Written
    );
    let record = h.load(&t).await.expect("loads").record;
    assert_eq!(
        record.data.get("keep").map(Vec::as_slice),
        Some(&b"new"[..])
    );
    assert_eq!(record.roles, vec!["admin".to_owned(), "auditor".to_owned()]);
    assert_eq!(record.last_seen, h.now());
}

/// No resurrection: after a revoke or an expiry, update is `false`, writes nothing, and the
/// session stays gone (Rack CVE-2025-46336; boj/redistore #2).
pub async fn no_resurrection_after_revoke_or_expiry(f: &dyn SessionStoreFactory) {
    let h = Harness::new(f).await;
    let (t, _) = h.create_for("alice").await;
    assert!(revoke(&h.store, &t).await);
    assert!(!revoke(&h.store, &t).await, "already gone");
    assert_eq!(h.update(&t, &set("k", b"v")).await, Updated::Gone);
    assert!(h.load(&t).await.is_none());
    assert!(rotate(&h.store, &t).await.is_none());
    assert!(h.list("alice").await.is_empty());

    let (t, _) = h.create_for("bob").await;
    h.advance(IDLE);
    assert_eq!(
        h.update(&t, &set("k", b"v")).await,
        Updated::Gone,
        "expired: no write"
    );
    assert!(h.load(&t).await.is_none());
    assert!(h.list("bob").await.is_empty());
    assert!(
        !revoke(&h.store, &t).await,
        "an expired session is not revoked"
    );
}

/// A logout while a slow request still holds the session: the slow request's later update
/// fails and the session stays gone.
pub async fn logout_during_a_slow_request_stays_logged_out(f: &dyn SessionStoreFactory) {
    let h = Harness::new(f).await;
    let (t, _) = h.create_for("alice").await;
    let slow = h.replica(f).await;
    let logout = h.replica(f).await;
    assert!(load(&slow, &t).await.is_some(), "the slow request starts");
    h.advance(Duration::from_millis(300));
    assert!(revoke(&logout, &t).await, "logout on another replica");
    h.advance(Duration::from_millis(300));
    assert_eq!(
        update(&slow, &t, &set("cart", b"[3]")).await,
        Updated::Gone,
        "the slow request's write must not undo the logout"
    );
    assert!(load(&slow, &t).await.is_none());
    assert!(h.load(&t).await.is_none());
    assert!(h.list("alice").await.is_empty());
}

/// Rotation moves the session to a new token with the same data, user and `created_at`; the
/// new token loads directly; the old one loads the new session through the alias, and updates
/// through it reach the new session.
pub async fn rotation_keeps_the_session_under_a_new_token(f: &dyn SessionStoreFactory) {
    let h = Harness::new(f).await;
    let new = NewSession {
        roles: vec!["reader".into()],
        data: data(&[("cart", b"[1]")]),
        ip: Some("198.51.100.1".into()),
        user_agent: Some("curl/8".into()),
        ..NewSession::for_user("alice")
    };
    let (old, created) = h.create(&new).await;
    h.advance(Duration::from_secs(10));
    let (fresh, record) = rotate(&h.store, &old)
        .await
        .expect("a live session rotates");
    assert_ne!(fresh, old);
    assert_eq!(fresh.user_tag(), old.user_tag(), "same user, same tag");
    assert_eq!(record.id, fresh.id());
    assert_eq!(
        record.created_at, created.created_at,
        "the absolute lifetime does not restart"
    );
    assert_eq!(record.last_seen, h.now());
    assert_eq!(record.user_id, created.user_id);
    assert_eq!(record.roles, created.roles);
    assert_eq!(record.data, created.data);
    assert_eq!(record.ip, created.ip);
    assert_eq!(record.user_agent, created.user_agent);

    let direct = h.load(&fresh).await.expect("the new token loads");
    assert!(!direct.via_rotation_alias);
    assert_eq!(direct.record, record);
    let aliased = h
        .load(&old)
        .await
        .expect("the old token works in the grace");
    assert!(aliased.via_rotation_alias);
    assert_eq!(aliased.record.id, fresh.id());

    assert_eq!(
        h.update(&old, &set("from-old", b"1")).await,
        Updated::WrittenViaRotationAlias,
        "an in-flight request writes"
    );
    let record = h.load(&fresh).await.expect("loads").record;
    assert_eq!(
        record.data.get("from-old").map(Vec::as_slice),
        Some(&b"1"[..])
    );

    let list = h.list("alice").await;
    assert_eq!(ids(&list), vec![fresh.id()], "the alias is not a session");
    assert_eq!(list[0].created_at, created.created_at);
}

/// The old token stops at the grace end, exactly: works at `rotated + grace - 1µs`, not at
/// `rotated + grace`, while the new token lives on.
pub async fn old_token_stops_exactly_at_the_grace_end(f: &dyn SessionStoreFactory) {
    let h = Harness::new(f).await;
    let (old, _) = h.create_for("alice").await;
    let (fresh, _) = rotate(&h.store, &old).await.expect("rotates");
    h.advance(GRACE - US);
    let loaded = h.load(&old).await.expect("alive 1µs before the grace end");
    assert!(loaded.via_rotation_alias);
    h.advance(US);
    assert!(
        h.load(&old).await.is_none(),
        "gone exactly at the grace end"
    );
    assert_eq!(h.update(&old, &set("k", b"v")).await, Updated::Gone);
    assert!(!revoke(&h.store, &old).await);
    assert!(rotate(&h.store, &old).await.is_none());
    let loaded = h.load(&fresh).await.expect("the new token lives on");
    assert!(!loaded.via_rotation_alias);
    assert!(!loaded.record.data.contains_key("k"));
}

/// Rotation does not restart the absolute lifetime: a session rotated 2 s before its absolute
/// end is gone at that end, under its new token and its old one (still in its grace) alike.
pub async fn rotation_keeps_the_absolute_deadline(f: &dyn SessionStoreFactory) {
    let h = Harness::new(f).await;
    let (old, created) = h.create_for("alice").await;
    let end = created.created_at.saturating_add(ABSOLUTE);
    while h.now().saturating_add(IDLE / 2) < end {
        h.advance(IDLE / 2);
        assert!(h.load(&old).await.is_some());
    }
    h.advance(end.saturating_duration_since(h.now()) - Duration::from_secs(2));
    let (fresh, record) = rotate(&h.store, &old).await.expect("rotates");
    assert_eq!(record.expires_at(&h.config), end);
    h.advance(Duration::from_secs(2) - US);
    assert!(h.load(&fresh).await.is_some());
    assert!(h.load(&old).await.is_some_and(|l| l.via_rotation_alias));
    h.advance(US);
    assert!(
        h.load(&fresh).await.is_none(),
        "gone at created_at + absolute"
    );
    assert!(
        h.load(&old).await.is_none(),
        "an alias dies with its session"
    );
}

/// Every read refreshes when `touch_after` is zero (`touch_after_share(0, 1)`).
pub async fn a_zero_touch_after_refreshes_on_every_read(f: &dyn SessionStoreFactory) {
    let config = SessionConfig::builder()
        .idle_timeout(IDLE)
        .absolute_lifetime(ABSOLUTE)
        .touch_after_share(0, 1)
        .build()
        .expect("valid session config");
    let h = Harness::with_config(f, config).await;
    let (t, _) = h.create_for("alice").await;
    for _ in 0..3 {
        h.advance(US);
        let loaded = h.load(&t).await.expect("loads");
        assert!(loaded.touched);
        assert_eq!(loaded.record.last_seen, h.now());
    }
}

/// Rotating something gone gives `None`; rotating through a live alias rotates its target
/// (and the oldest token, two rotations back, is dead: aliases resolve one hop); revoking
/// through a live alias revokes the session, and every alias of a revoked session is dead.
pub async fn rotation_edge_cases(f: &dyn SessionStoreFactory) {
    let h = Harness::new(f).await;
    let unknown = SessionToken::generate(UserTag::for_user("alice")).expect("token");
    assert!(rotate(&h.store, &unknown).await.is_none());
    let (t, _) = h.create_for("alice").await;
    h.advance(IDLE);
    assert!(
        rotate(&h.store, &t).await.is_none(),
        "expired sessions do not rotate"
    );
    assert!(h.load(&t).await.is_none());

    let (t1, created) = h.create_for("alice").await;
    h.advance(Duration::from_secs(1));
    let (t2, _) = rotate(&h.store, &t1).await.expect("rotates");
    h.advance(Duration::from_secs(1));
    let Rotated {
        token: t3,
        record: r3,
        from,
    } = h
        .store
        .rotate_session(&t1)
        .await
        .expect("rotate")
        .expect("rotating the alias rotates its target");
    assert_eq!(from, t2.id(), "the session's id before, not the alias's");
    assert_eq!(r3.created_at, created.created_at);
    assert_eq!(r3.id, t3.id());
    assert!(!h.load(&t3).await.expect("loads").via_rotation_alias);
    let via = h
        .load(&t2)
        .await
        .expect("the previous token is now an alias");
    assert!(via.via_rotation_alias);
    assert_eq!(via.record.id, t3.id());
    assert!(h.load(&t1).await.is_none(), "an alias to an alias is dead");
    assert_eq!(ids(&h.list("alice").await), vec![t3.id()]);

    let revoked = h
        .store
        .revoke_session(&t2)
        .await
        .expect("revoke")
        .expect("revoking through the alias");
    assert_eq!(
        revoked,
        Revoked {
            id: t3.id(),
            user_id: "alice".into()
        },
        "the session revoked, not the alias"
    );
    assert!(h.load(&t3).await.is_none(), "revoked the session itself");
    assert!(h.load(&t2).await.is_none());
    assert!(!revoke(&h.store, &t3).await);

    let (a, _) = h.create_for("bob").await;
    let (b, _) = rotate(&h.store, &a).await.expect("rotates");
    assert!(revoke(&h.store, &b).await);
    assert!(
        h.load(&a).await.is_none(),
        "the alias of a revoked session is dead"
    );
    assert_eq!(h.update(&a, &set("k", b"v")).await, Updated::Gone);
    assert!(h.list("bob").await.is_empty());
}

/// Replicas share sessions: created on one, seen, updated, rotated and revoked through others.
pub async fn replicas_share_sessions(f: &dyn SessionStoreFactory) {
    let h = Harness::new(f).await;
    let b = h.replica(f).await;
    let c = h.replica(f).await;
    let (t, record) = h.create_for("alice").await;
    assert_eq!(load(&b, &t).await.expect("seen on b").record, record);
    assert_eq!(update(&c, &t, &set("k", b"v")).await, Updated::Written);
    let seen = load(&b, &t).await.expect("seen on b");
    assert_eq!(
        seen.record.data.get("k").map(Vec::as_slice),
        Some(&b"v"[..])
    );
    let (t2, _) = rotate(&c, &t).await.expect("rotates on c");
    assert!(
        load(&b, &t)
            .await
            .expect("alias seen on b")
            .via_rotation_alias
    );
    assert_eq!(
        ids(&b.list_for_user("alice").await.expect("list")),
        vec![t2.id()]
    );
    assert!(revoke(&b, &t2).await);
    assert!(h.load(&t2).await.is_none());
    assert!(load(&c, &t2).await.is_none());
    assert!(load(&c, &t).await.is_none());
}

/// The per-user index: list oldest first with what a "your devices" page shows, revoke one by
/// id, revoke all, revoke all but the current one; users never see or revoke each other's.
pub async fn per_user_index_lists_and_revokes(f: &dyn SessionStoreFactory) {
    let h = Harness::new(f).await;
    let device = |n: u8| NewSession {
        ip: Some(format!("192.0.2.{n}")),
        user_agent: Some(format!("device {n}")),
        ..NewSession::for_user("alice")
    };
    let (t1, r1) = h.create(&device(1)).await;
    h.advance(Duration::from_secs(1));
    let (t2, r2) = h.create(&device(2)).await;
    h.advance(Duration::from_secs(1));
    let (t3, r3) = h.create(&device(3)).await;
    let (bob, bob_record) = h.create_for("bob").await;
    h.advance(TOUCH_AFTER);
    assert!(h.load(&t1).await.expect("loads").touched);

    let list = h.list("alice").await;
    assert_eq!(
        ids(&list),
        vec![r1.id.clone(), r2.id.clone(), r3.id.clone()]
    );
    let first = &list[0];
    assert_eq!(first.created_at, r1.created_at);
    assert_eq!(first.last_seen, h.now(), "the list shows the refresh");
    assert_eq!(first.expires_at, h.now().saturating_add(IDLE));
    assert_eq!(first.ip.as_deref(), Some("192.0.2.1"));
    assert_eq!(first.user_agent.as_deref(), Some("device 1"));
    assert_eq!(list[2].last_seen, r3.created_at);
    assert_eq!(list[2].expires_at, r3.expires_at(&h.config));
    assert_eq!(ids(&h.list("bob").await), vec![bob_record.id.clone()]);
    assert!(h.list("carol").await.is_empty());

    // Listing is not activity.
    let again = h.list("alice").await;
    assert_eq!(again, list);

    assert!(
        !h.store
            .revoke_by_id("bob", &r1.id)
            .await
            .expect("revoke_by_id"),
        "not bob's"
    );
    assert!(
        h.store
            .revoke_by_id("alice", &r2.id)
            .await
            .expect("revoke_by_id")
    );
    assert!(
        !h.store
            .revoke_by_id("alice", &r2.id)
            .await
            .expect("revoke_by_id"),
        "already gone"
    );
    assert!(h.load(&t2).await.is_none());
    assert_eq!(
        ids(&h.list("alice").await),
        vec![r1.id.clone(), r3.id.clone()]
    );

    let (t4, _) = h.create_for("alice").await;
    let mut revoked = h
        .store
        .revoke_all_for_user("alice", Some(&r3.id))
        .await
        .expect("revoke all but current");
    revoked.sort();
    let mut expected = vec![t1.id(), t4.id()];
    expected.sort();
    assert_eq!(revoked, expected, "the revoked sessions' ids");
    assert_eq!(ids(&h.list("alice").await), vec![r3.id.clone()]);
    assert!(h.load(&t1).await.is_none());
    assert!(h.load(&t4).await.is_none());
    assert!(h.load(&t3).await.is_some(), "the current session stays");

    assert_eq!(
        h.store
            .revoke_all_for_user("alice", None)
            .await
            .expect("revoke all")
            .len(),
        1
    );
    assert!(h.list("alice").await.is_empty());
    assert!(h.load(&t3).await.is_none());
    assert_eq!(
        h.store
            .revoke_all_for_user("alice", None)
            .await
            .expect("revoke all")
            .len(),
        0
    );
    assert!(h.load(&bob).await.is_some(), "bob is untouched");
    assert_eq!(ids(&h.list("bob").await), vec![bob_record.id]);
}

/// "Log out my other devices" from a request that loaded its session just before a
/// concurrent rotation names the old id: within the grace, that keeps the rotated session (the
/// current device) and revokes only the others; after the grace, the old id keeps nothing.
pub async fn revoke_all_keeps_the_session_an_alias_names(f: &dyn SessionStoreFactory) {
    let h = Harness::new(f).await;
    let (old, _) = h.create_for("alice").await;
    let (other, _) = h.create_for("alice").await;
    let (fresh, _) = rotate(&h.store, &old).await.expect("rotates");
    let revoked = h
        .store
        .revoke_all_for_user("alice", Some(&old.id()))
        .await
        .expect("revoke all but current");
    assert_eq!(revoked, vec![other.id()], "only the other device");
    assert!(h.load(&fresh).await.is_some(), "the rotated session stays");
    assert!(h.load(&other).await.is_none());

    let (other, _) = h.create_for("alice").await;
    h.advance(GRACE);
    let revoked = h
        .store
        .revoke_all_for_user("alice", Some(&old.id()))
        .await
        .expect("revoke all");
    // Both last active at the same instant: the same expiry, so in id order.
    let mut expected = vec![fresh.id(), other.id()];
    expected.sort();
    assert_eq!(revoked, expected, "a dead alias keeps nothing");
}

/// A user at `max_sessions_per_user` (3 here) who logs in once more loses the least recently
/// active session (the first to expire) in the same step, reported in `evicted`; another user
/// (and an old token's alias) does not count towards the bound, and a session revoked or
/// expired makes room without any eviction.
pub async fn creating_past_the_per_user_bound_evicts_the_least_recently_active(
    f: &dyn SessionStoreFactory,
) {
    let config = suite_config_with_cap(3);
    let h = Harness::with_config(f, config).await;
    let (a, _) = h.create_for("alice").await;
    h.advance(Duration::from_secs(1));
    let (b, _) = h.create_for("alice").await;
    h.advance(Duration::from_secs(1));
    let (c, _) = h.create_for("alice").await;
    for _ in 0..3 {
        h.create_for("bob").await;
    }
    // `a` is refreshed (read after the touch threshold), so `b` is now the first to expire;
    // `c` is rotated, leaving an alias that is not a session.
    h.advance(TOUCH_AFTER);
    assert!(h.load(&a).await.expect("live").touched);
    let (c2, _) = rotate(&h.store, &c).await.expect("rotates");

    let created = h
        .store
        .create_session(&NewSession::for_user("alice"))
        .await
        .expect("create");
    assert_eq!(created.evicted, vec![b.id()], "the least recently active");
    assert!(h.load(&b).await.is_none(), "evicted");
    let mut left = ids(&h.list("alice").await);
    left.sort();
    let mut expected = vec![a.id(), c2.id(), created.token.id()];
    expected.sort();
    assert_eq!(left, expected);
    assert_eq!(h.list("bob").await.len(), 3, "bob is untouched");

    // A revoked session makes room: nothing evicted.
    assert!(revoke(&h.store, &a).await);
    let created = h
        .store
        .create_session(&NewSession::for_user("alice"))
        .await
        .expect("create");
    assert!(created.evicted.is_empty(), "{:?}", created.evicted);
    assert_eq!(h.list("alice").await.len(), 3);
    // So does an expired one: `c2` and the third were last active before the newest.
    h.advance(IDLE - Duration::from_secs(1));
    assert!(h.load(&created.token).await.is_some());
    h.advance(Duration::from_secs(2));
    let newest = h
        .store
        .create_session(&NewSession::for_user("alice"))
        .await
        .expect("create");
    assert!(newest.evicted.is_empty(), "{:?}", newest.evicted);
    assert_eq!(h.list("alice").await.len(), 2);

    // A replica configured with a lower bound (Redis) evicts as many as it takes at once, first
    // to expire first, ties (sessions last active at the same instant) by id.
    let (c1, _) = h.create_for("carl").await;
    let (c2, _) = h.create_for("carl").await;
    h.advance(Duration::from_secs(1));
    let (c3, _) = h.create_for("carl").await;
    let lower = suite_config_with_cap(1);
    let strict = f.another_replica(&h.store, &h.clock, lower).await;
    if Arc::ptr_eq(&strict, &h.store) {
        // One store, one bound (the embedded store): the bound never drops under its sessions.
        return;
    }
    let created = strict
        .create_session(&NewSession::for_user("carl"))
        .await
        .expect("create");
    let mut expected = vec![c1.id(), c2.id()];
    expected.sort();
    expected.push(c3.id());
    assert_eq!(created.evicted, expected, "three at once, in order");
    assert_eq!(ids(&h.list("carl").await), vec![created.token.id()]);
}

/// Sessions created at the same instant list by id.
pub async fn list_breaks_creation_ties_by_id(f: &dyn SessionStoreFactory) {
    let h = Harness::new(f).await;
    let mut want = Vec::new();
    for _ in 0..5 {
        want.push(h.create_for("alice").await.1.id);
    }
    want.sort();
    assert_eq!(ids(&h.list("alice").await), want);
}

/// Expired sessions drop out of the index without any event from the store: a list after some
/// expired shows only the live ones, and revoking all counts only live ones.
pub async fn the_index_prunes_expired_sessions(f: &dyn SessionStoreFactory) {
    let h = Harness::new(f).await;
    let (t1, r1) = h.create_for("alice").await;
    h.advance(Duration::from_secs(40));
    let (_t2, r2) = h.create_for("alice").await;
    let (_t3, r3) = h.create_for("alice").await;
    assert_eq!(h.list("alice").await.len(), 3);
    h.advance(Duration::from_secs(20));
    // Created at the same instant: listed by id.
    let mut live = vec![r2.id.clone(), r3.id.clone()];
    live.sort();
    assert_eq!(ids(&h.list("alice").await), live);
    assert!(h.load(&t1).await.is_none());
    assert!(
        !h.store
            .revoke_by_id("alice", &r1.id)
            .await
            .expect("revoke_by_id")
    );
    h.advance(IDLE);
    assert!(h.list("alice").await.is_empty(), "all expired");
    let (_t4, _) = h.create_for("alice").await;
    assert_eq!(
        h.store
            .revoke_all_for_user("alice", None)
            .await
            .expect("revoke all")
            .len(),
        1,
        "only the live one counts"
    );
}

/// Bad input is rejected before anything is stored; well-formed but unknown tokens and ids are
/// simply not found.
pub async fn bad_input_is_rejected_and_unknown_tokens_are_not_found(f: &dyn SessionStoreFactory) {
    let h = Harness::new(f).await;
    let too_many_roles = NewSession {
        roles: (0..=MAX_ROLES).map(|i| format!("r{i}")).collect(),
        ..NewSession::for_user("mallory")
    };
    let oversized_value = NewSession {
        data: data(&[("blob", &vec![0u8; MAX_VALUE_LEN + 1])]),
        ..NewSession::for_user("mallory")
    };
    let bad_field_name = NewSession {
        data: data(&[("", b"1")]),
        ..NewSession::for_user("mallory")
    };
    let control_in_ip = NewSession {
        ip: Some("1.2.3.4\r\nX: y".into()),
        ..NewSession::for_user("mallory")
    };
    let cases = [
        ("empty user id", NewSession::for_user("")),
        (
            "oversized user id",
            NewSession::for_user("u".repeat(MAX_NAME_LEN + 1)),
        ),
        ("control character", NewSession::for_user("mal\nlory")),
        ("too many roles", too_many_roles),
        (
            "empty role",
            NewSession {
                roles: vec![String::new()],
                ..NewSession::for_user("mallory")
            },
        ),
        ("oversized value", oversized_value),
        ("empty field name", bad_field_name),
        ("control character in ip", control_in_ip),
    ];
    for (what, new) in &cases {
        match h.store.create(new).await {
            Err(e) => assert!(e.is_invalid_input(), "{what}: {e}"),
            Ok(_) => panic!("{what}: accepted"),
        }
    }
    assert!(h.list("mallory").await.is_empty(), "nothing was stored");
    for bad_user in ["", "a\u{0}b"] {
        let e = h
            .store
            .list_for_user(bad_user)
            .await
            .expect_err("invalid user id");
        assert!(e.is_invalid_input());
    }

    let (t, _) = h.create_for("alice").await;
    let mut bad_changes = set("big", &vec![0u8; MAX_VALUE_LEN + 1]);
    bad_changes.set.insert("ok".into(), b"1".to_vec());
    let e = h
        .store
        .update(&t, &bad_changes)
        .await
        .expect_err("oversized value");
    assert!(e.is_invalid_input());
    let roles = SessionChanges {
        roles: Some((0..=MAX_ROLES).map(|i| format!("r{i}")).collect()),
        ..SessionChanges::default()
    };
    assert!(
        h.store
            .update(&t, &roles)
            .await
            .expect_err("too many roles")
            .is_invalid_input()
    );
    let record = h.load(&t).await.expect("loads").record;
    assert!(
        record.data.is_empty() && record.roles.is_empty(),
        "nothing was written"
    );

    let unknown = SessionToken::generate(UserTag::for_user("alice")).expect("token");
    assert!(h.load(&unknown).await.is_none());
    assert_eq!(h.update(&unknown, &set("k", b"v")).await, Updated::Gone);
    assert!(!revoke(&h.store, &unknown).await);
    assert!(rotate(&h.store, &unknown).await.is_none());
    let stray = SessionToken::generate(UserTag::for_user("nobody")).expect("token");
    assert!(
        !h.store
            .revoke_by_id("alice", &stray.id())
            .await
            .expect("revoke_by_id")
    );
    assert_eq!(
        h.store
            .revoke_all_for_user("nobody", None)
            .await
            .expect("revoke all")
            .len(),
        0
    );
    assert_eq!(
        h.list("alice").await.len(),
        1,
        "alice's session is untouched"
    );
}

/// Instantiates the session conformance suite for one backend: a module `$name` with one
/// `#[tokio::test]` per case, each given the factory `$factory` (an expression evaluated inside
/// the module, which sees the caller's items through `use super::*`).
///
/// ```ignore
/// statehouse_testkit::session_conformance!(embedded, EmbeddedSessions);
/// statehouse_testkit::session_conformance!(redis_cluster, RedisSessions::new(Deployment::Cluster));
/// ```
#[macro_export]
macro_rules! session_conformance {
    ($name:ident, $factory:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::session_conformance!(@cases $factory;
                create_then_load_round_trips,
                idle_expiry_is_exact,
                absolute_expiry_is_exact_despite_activity,
                reads_refresh_only_after_touch_after,
                updates_are_field_level,
                no_resurrection_after_revoke_or_expiry,
                logout_during_a_slow_request_stays_logged_out,
                rotation_keeps_the_session_under_a_new_token,
                old_token_stops_exactly_at_the_grace_end,
                rotation_keeps_the_absolute_deadline,
                rotation_edge_cases,
                a_zero_touch_after_refreshes_on_every_read,
                replicas_share_sessions,
                per_user_index_lists_and_revokes,
                revoke_all_keeps_the_session_an_alias_names,
                creating_past_the_per_user_bound_evicts_the_least_recently_active,
                list_breaks_creation_ties_by_id,
                the_index_prunes_expired_sessions,
                bad_input_is_rejected_and_unknown_tokens_are_not_found,
            );
        }
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let factory = $factory;
                $crate::session_suite::$case(&factory).await;
            }
        )*
    };
}
