//! Concurrent writers on one embedded session: field-level updates never lose each other's
//! fields, even with every thread writing at once.

use std::sync::Barrier;

use futures::executor::block_on;
use statehouse_core::ManualClock;
use statehouse_core::session::{NewSession, SessionChanges, SessionConfig, SessionStore, Updated};
use statehouse_embedded::EmbeddedSessionStore;

const THREADS: usize = 8;
const ROUNDS: usize = 200;

#[test]
fn eight_threads_updating_different_fields_lose_nothing() {
    let clock = ManualClock::starting_now();
    let store = EmbeddedSessionStore::builder()
        .clock(clock)
        .build()
        .unwrap();
    let (token, _) = block_on(store.create(&NewSession::for_user("alice"))).unwrap();
    let barrier = Barrier::new(THREADS);
    std::thread::scope(|s| {
        for thread in 0..THREADS {
            let (store, token, barrier) = (&store, &token, &barrier);
            s.spawn(move || {
                barrier.wait();
                for round in 0..ROUNDS {
                    let mut changes = SessionChanges::default();
                    changes
                        .set
                        .insert(format!("field-{thread}"), round.to_string().into_bytes());
                    // A field of its own that comes and goes, to mix removals in.
                    if round % 2 == 0 {
                        changes.set.insert(format!("scratch-{thread}"), vec![1]);
                    } else {
                        changes.remove.insert(format!("scratch-{thread}"));
                    }
                    assert_eq!(
                        block_on(store.update(token, &changes)).unwrap(),
                        Updated::Written
                    );
                    assert!(block_on(store.load(token)).unwrap().is_some());
                }
            });
        }
    });
    let record = block_on(store.load(&token)).unwrap().unwrap().record;
    for thread in 0..THREADS {
        assert_eq!(
            record.data.get(&format!("field-{thread}")),
            Some(&(ROUNDS - 1).to_string().into_bytes()),
            "thread {thread}'s last write"
        );
        assert!(!record.data.contains_key(&format!("scratch-{thread}")));
    }
    assert_eq!(record.data.len(), THREADS);
    assert_eq!(store.len(), 1);
}

#[test]
fn concurrent_creates_for_one_user_are_all_listed() {
    let config = SessionConfig::builder()
        .max_sessions_per_user(THREADS as u32 * 50)
        .build()
        .unwrap();
    let store = EmbeddedSessionStore::builder()
        .config(config)
        .build()
        .unwrap();
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                for _ in 0..50 {
                    block_on(store.create(&NewSession::for_user("alice"))).unwrap();
                }
            });
        }
    });
    let list = block_on(store.list_for_user("alice")).unwrap();
    assert_eq!(list.len(), THREADS * 50);
    assert!(
        list.windows(2)
            .all(|w| (w[0].created_at, &w[0].id) < (w[1].created_at, &w[1].id))
    );
}
