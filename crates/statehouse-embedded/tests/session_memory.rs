//! The embedded session store's memory bound: a full shard first reclaims dead entries, and
//! only then evicts the entry closest to expiry, never the session being written.

use std::time::Duration;

use futures::executor::block_on;
use statehouse_core::ManualClock;
use statehouse_core::session::{NewSession, SessionConfig, SessionStore, SessionToken};
use statehouse_embedded::EmbeddedSessionStore;

const IDLE: Duration = Duration::from_secs(60);

/// One shard, so that which entry goes is exact.
fn store(clock: &ManualClock, max_sessions: usize) -> EmbeddedSessionStore {
    let config = SessionConfig::builder()
        .idle_timeout(IDLE)
        .absolute_lifetime(Duration::from_secs(600))
        .rotation_grace(Duration::from_secs(5))
        .build()
        .expect("valid config");
    EmbeddedSessionStore::builder()
        .clock(clock.clone())
        .config(config)
        .max_sessions(max_sessions)
        .shards(1)
        .build()
        .expect("valid store")
}

fn create(store: &EmbeddedSessionStore, user: &str) -> SessionToken {
    block_on(store.create(&NewSession::for_user(user)))
        .expect("create")
        .0
}

fn alive(store: &EmbeddedSessionStore, token: &SessionToken) -> bool {
    block_on(store.load(token)).expect("load").is_some()
}

#[test]
fn the_bound_is_never_exceeded() {
    let clock = ManualClock::starting_now();
    let store = store(&clock, 10);
    let tokens: Vec<_> = (0..100)
        .map(|i| {
            clock.advance(Duration::from_micros(1));
            create(&store, &format!("u{i}"))
        })
        .collect();
    assert_eq!(store.len(), 10);
    assert!(
        tokens[90..].iter().all(|t| alive(&store, t)),
        "the newest stay"
    );
    assert!(tokens[..90].iter().all(|t| !alive(&store, t)));
}

#[test]
fn a_full_store_evicts_the_session_closest_to_expiry() {
    let clock = ManualClock::starting_now();
    let store = store(&clock, 3);
    let a = create(&store, "a");
    clock.advance(Duration::from_secs(1));
    let b = create(&store, "b");
    clock.advance(Duration::from_secs(1));
    let c = create(&store, "c");
    clock.advance(Duration::from_secs(20));
    // Refreshing `a` makes `b` the session closest to expiry.
    assert!(block_on(store.load(&a)).unwrap().unwrap().touched);
    let d = create(&store, "d");
    assert_eq!(store.len(), 3);
    assert!(!alive(&store, &b), "b expired soonest: evicted");
    assert!(alive(&store, &a) && alive(&store, &c) && alive(&store, &d));
}

#[test]
fn a_full_store_drops_dead_entries_before_evicting_live_ones() {
    let clock = ManualClock::starting_now();
    let store = store(&clock, 4);
    let old: Vec<_> = ["a", "b"].iter().map(|u| create(&store, u)).collect();
    clock.advance(Duration::from_secs(30));
    let live: Vec<_> = ["c", "d"].iter().map(|u| create(&store, u)).collect();
    clock.advance(Duration::from_secs(30)); // a and b are now dead, still stored.
    assert_eq!(store.len(), 4);
    let e = create(&store, "e");
    assert_eq!(store.len(), 3, "both dead entries were reclaimed at once");
    assert!(old.iter().all(|t| !alive(&store, t)));
    assert!(live.iter().all(|t| alive(&store, t)) && alive(&store, &e));
}

#[test]
fn rotation_in_a_full_store_keeps_the_rotated_session() {
    let clock = ManualClock::starting_now();
    let store = store(&clock, 2);
    let a = create(&store, "a");
    clock.advance(Duration::from_secs(1));
    let b = create(&store, "b");
    // The alias needs a place: the other session, closest to expiry, goes, never the rotated one.
    let (a2, _) = block_on(store.rotate(&a)).unwrap().unwrap();
    assert_eq!(store.len(), 2);
    assert!(alive(&store, &a2));
    assert!(
        block_on(store.load(&a))
            .unwrap()
            .unwrap()
            .via_rotation_alias
    );
    assert!(!alive(&store, &b));

    // With room for one entry only, the alias is dropped rather than the session.
    let tiny = self::store(&clock, 1);
    let t = create(&tiny, "t");
    let (t2, _) = block_on(tiny.rotate(&t)).unwrap().unwrap();
    assert_eq!(tiny.len(), 1);
    assert!(alive(&tiny, &t2));
    assert!(!alive(&tiny, &t));
}

#[test]
fn purge_expired_frees_dead_sessions_and_aliases() {
    let clock = ManualClock::starting_now();
    let store = store(&clock, 100);
    let a = create(&store, "a");
    let _ = block_on(store.rotate(&a)).unwrap().unwrap();
    let b = create(&store, "b");
    assert_eq!(store.len(), 3);
    assert!(block_on(store.revoke(&b)).unwrap());
    assert_eq!(store.len(), 2);
    clock.advance(Duration::from_secs(5));
    assert_eq!(store.purge_expired(), 1, "the alias past its grace");
    clock.advance(IDLE);
    assert_eq!(store.purge_expired(), 1, "the idle session");
    assert!(store.is_empty());
}

#[test]
fn the_bound_is_split_over_shards() {
    let store = EmbeddedSessionStore::builder()
        .max_sessions(100)
        .shards(8)
        .build()
        .unwrap();
    assert_eq!(store.max_sessions(), 96);
    let store = EmbeddedSessionStore::builder()
        .max_sessions(3)
        .shards(64)
        .build()
        .unwrap();
    assert_eq!(store.shards(), 2, "never more shards than places");
    assert_eq!(store.max_sessions(), 2);
    assert!(
        EmbeddedSessionStore::builder()
            .shards(1 << 20)
            .build()
            .is_err()
    );
}
