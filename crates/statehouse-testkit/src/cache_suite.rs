//! The cache conformance suite: one behaviour contract for every [`CacheStore`].
//!
//! Each case takes a [`CacheStoreFactory`] that makes a fresh, isolated store, runs a scenario
//! and checks what the store answers. Lease expiry is judged by the `now` the caller passes, so
//! it is driven by a [`ManualClock`] on every backend; key expiry follows the clock only where
//! the backend says so ([`CacheStoreFactory::ttl_follows_clock`]: the embedded store does, Redis
//! expires keys in real time). Invalidations are asynchronous on Redis (Pub/Sub), so the cases
//! that wait for one poll a recording sink with a real-time upper bound of
//! [`INVALIDATION_WAIT`]; nothing else waits on real time.
//!
//! The semantics checked are those of the [`CacheStore`] trait's documentation; the embedded
//! store, Redis standalone and Redis Cluster must all pass. Beyond it, the suite fixes three
//! choices the trait leaves open, so every backend makes the same ones:
//!
//! - a zero TTL (for a value or a lease) is invalid input, not "expire at once";
//! - a purge voids the leases of the keys it deletes, like a delete does, and counts only keys
//!   that held a value (a key holding just a lease is not counted);
//! - a set with a lease whose key never had one (or a token from another key) is refused.
//!
//! Instantiate it with [`cache_conformance!`](crate::cache_conformance):
//!
//! ```ignore
//! statehouse_testkit::cache_conformance!(embedded, super::EmbeddedCaches);
//! ```

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use statehouse_core::cache::{
    CacheStore, Invalidation, InvalidationSink, LeaseOutcome, LeaseToken, MAX_CACHE_KEY_BYTES,
};
use statehouse_core::{Clock, ManualClock, Timestamp};

/// Makes cache stores for the suite.
#[async_trait]
pub trait CacheStoreFactory: Send + Sync {
    /// A store isolated from every other store this factory made (its own key prefix and
    /// invalidation channel, say). Where the backend's key expiry can follow a clock, it
    /// follows `clock`.
    async fn make(&self, clock: &ManualClock) -> Arc<dyn CacheStore>;

    /// A second handle on the same data as `store` (another connection with the same key prefix
    /// and channel: another replica of the application). Backends without separate
    /// connections return `store` itself.
    async fn another_replica(
        &self,
        store: &Arc<dyn CacheStore>,
        clock: &ManualClock,
    ) -> Arc<dyn CacheStore>;

    /// True when the stores' key expiry follows the clock given to [`make`](Self::make) (the
    /// embedded store); false when keys expire in real time (Redis), which skips the checks of
    /// expiry at its edge.
    fn ttl_follows_clock(&self) -> bool;
}

/// How long a case waits, in real time, for an invalidation to arrive before failing.
pub const INVALIDATION_WAIT: Duration = Duration::from_secs(5);

/// The TTL of values the cases write unless they say otherwise: long enough that no value
/// expires in real time while a case runs on a backend that expires in real time.
const TTL: Duration = Duration::from_secs(600);
/// The lease lifetime the cases use.
const LEASE_TTL: Duration = Duration::from_secs(10);
const US: Duration = Duration::from_micros(1);

/// A store, a second replica of it, and their clock.
pub struct Harness {
    /// The store under test ("replica 1").
    pub store: Arc<dyn CacheStore>,
    /// Another replica of the same data ("replica 2").
    pub replica: Arc<dyn CacheStore>,
    /// The clock, starting at the current system time (so a Redis store's key expiry stays
    /// sane).
    pub clock: ManualClock,
}

impl Harness {
    /// A fresh store and a second replica of it from `factory`.
    pub async fn new(factory: &dyn CacheStoreFactory) -> Harness {
        let clock = ManualClock::starting_now();
        let store = factory.make(&clock).await;
        let replica = factory.another_replica(&store, &clock).await;
        Harness {
            store,
            replica,
            clock,
        }
    }

    /// The clock's time.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Moves the clock.
    pub fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }
}

async fn get(store: &Arc<dyn CacheStore>, key: &str) -> Option<Vec<u8>> {
    store
        .get(key)
        .await
        .unwrap_or_else(|e| panic!("get({key:?}) failed: {e}"))
}

async fn put(store: &Arc<dyn CacheStore>, key: &str, value: &[u8]) {
    let stored = store
        .set(key, value, TTL, None)
        .await
        .unwrap_or_else(|e| panic!("set({key:?}) failed: {e}"));
    assert!(stored, "a set without a lease always stores ({key:?})");
}

async fn fill(store: &Arc<dyn CacheStore>, key: &str, value: &[u8], lease: &LeaseToken) -> bool {
    store
        .set(key, value, TTL, Some(lease))
        .await
        .unwrap_or_else(|e| panic!("fill of {key:?} failed: {e}"))
}

async fn delete(store: &Arc<dyn CacheStore>, key: &str) -> bool {
    store
        .delete(key)
        .await
        .unwrap_or_else(|e| panic!("delete({key:?}) failed: {e}"))
}

async fn lease(store: &Arc<dyn CacheStore>, key: &str, now: Timestamp) -> LeaseOutcome {
    store
        .acquire_lease(key, now, LEASE_TTL)
        .await
        .unwrap_or_else(|e| panic!("acquire_lease({key:?}) failed: {e}"))
}

async fn acquired(store: &Arc<dyn CacheStore>, key: &str, now: Timestamp) -> LeaseToken {
    match lease(store, key, now).await {
        LeaseOutcome::Acquired(token) => token,
        LeaseOutcome::HeldElsewhere => panic!("expected the lease on {key:?}, it is held"),
    }
}

async fn versions(store: &Arc<dyn CacheStore>, tags: &[&str]) -> Vec<u64> {
    let tags: Vec<String> = tags.iter().map(|t| (*t).to_owned()).collect();
    store
        .tag_versions(&tags)
        .await
        .unwrap_or_else(|e| panic!("tag_versions({tags:?}) failed: {e}"))
}

async fn purge(store: &Arc<dyn CacheStore>, prefix: &str) -> u64 {
    store
        .purge_prefix(prefix)
        .await
        .unwrap_or_else(|e| panic!("purge_prefix({prefix:?}) failed: {e}"))
}

/// One thing a [`RecordingSink`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkEvent {
    /// `on_invalidation(message)`.
    Message(Invalidation),
    /// `on_channel_down()`.
    Down,
    /// `on_channel_up()`.
    Up,
}

/// An [`InvalidationSink`] that records every call, in order.
#[derive(Debug, Default)]
pub struct RecordingSink {
    // A std Mutex: held only to push or copy, never across an await.
    events: Mutex<Vec<SinkEvent>>,
}

impl RecordingSink {
    /// A new, empty sink.
    pub fn new() -> Arc<RecordingSink> {
        Arc::new(RecordingSink::default())
    }

    /// Everything seen so far, in order.
    pub fn events(&self) -> Vec<SinkEvent> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether `message` was received.
    pub fn received(&self, message: &Invalidation) -> bool {
        self.events()
            .iter()
            .any(|e| *e == SinkEvent::Message(message.clone()))
    }

    /// Waits (polling, at most [`INVALIDATION_WAIT`] of real time) until `done` holds for the
    /// events seen; panics with `what` and the events otherwise.
    pub async fn wait_until(&self, what: &str, done: impl Fn(&[SinkEvent]) -> bool) {
        let start = Instant::now();
        loop {
            let events = self.events();
            if done(&events) {
                return;
            }
            assert!(
                start.elapsed() < INVALIDATION_WAIT,
                "waited {INVALIDATION_WAIT:?} for {what}; the sink saw {events:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until `message` has been received.
    pub async fn wait_for(&self, message: &Invalidation) {
        let wanted = SinkEvent::Message(message.clone());
        self.wait_until(&format!("{message:?}"), |events| events.contains(&wanted))
            .await;
    }

    fn push(&self, event: SinkEvent) {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(event);
    }
}

impl InvalidationSink for RecordingSink {
    fn on_invalidation(&self, message: &Invalidation) {
        self.push(SinkEvent::Message(message.clone()));
    }

    fn on_channel_down(&self) {
        self.push(SinkEvent::Down);
    }

    fn on_channel_up(&self) {
        self.push(SinkEvent::Up);
    }
}

fn keys(key: &str) -> Invalidation {
    Invalidation::Keys(vec![key.to_owned()])
}

/// Set, get, overwrite and delete round-trip exactly, across replicas; binary values with every
/// byte value, an empty value and a 1 MiB value come back byte for byte.
pub async fn get_set_delete_round_trip(f: &dyn CacheStoreFactory) {
    let h = Harness::new(f).await;
    assert_eq!(get(&h.store, "k").await, None);
    assert!(!delete(&h.store, "k").await, "nothing to delete yet");

    put(&h.store, "k", b"one").await;
    assert_eq!(get(&h.store, "k").await.as_deref(), Some(&b"one"[..]));
    assert_eq!(get(&h.replica, "k").await.as_deref(), Some(&b"one"[..]));

    put(&h.replica, "k", b"two").await;
    assert_eq!(get(&h.store, "k").await.as_deref(), Some(&b"two"[..]));

    assert!(delete(&h.replica, "k").await);
    assert_eq!(get(&h.store, "k").await, None);
    assert!(!delete(&h.store, "k").await, "deleted twice");

    let every_byte: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    put(&h.store, "binary", &every_byte).await;
    assert_eq!(get(&h.replica, "binary").await, Some(every_byte));

    put(&h.store, "empty", b"").await;
    assert_eq!(
        get(&h.replica, "empty").await,
        Some(Vec::new()),
        "an empty value is a value, not a miss"
    );

    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    put(&h.store, "big", &big).await;
    assert_eq!(get(&h.replica, "big").await, Some(big));
}

/// Empty and over-long keys, empty tags and zero TTLs are invalid input on every method; a key
/// of exactly [`MAX_CACHE_KEY_BYTES`] works.
pub async fn bad_input_is_rejected(f: &dyn CacheStoreFactory) {
    let h = Harness::new(f).await;
    let long = "k".repeat(MAX_CACHE_KEY_BYTES + 1);
    let token = LeaseToken::generate().expect("token");
    let now = h.now();
    for key in ["", long.as_str()] {
        let shown = key.len();
        let invalid = |r: Result<(), statehouse_core::Error>, op: &str| match r {
            Err(e) => assert!(
                e.is_invalid_input(),
                "{op} with a {shown}-byte key: wrong error {e}"
            ),
            Ok(()) => panic!("{op} accepted a {shown}-byte key"),
        };
        invalid(h.store.get(key).await.map(drop), "get");
        invalid(h.store.set(key, b"v", TTL, None).await.map(drop), "set");
        invalid(
            h.store.set(key, b"v", TTL, Some(&token)).await.map(drop),
            "fill",
        );
        invalid(h.store.delete(key).await.map(drop), "delete");
        invalid(
            h.store.acquire_lease(key, now, LEASE_TTL).await.map(drop),
            "acquire_lease",
        );
        invalid(
            h.store.release_lease(key, &token).await.map(drop),
            "release_lease",
        );
    }

    let zero_ttl = h.store.set("k", b"v", Duration::ZERO, None).await;
    assert!(
        zero_ttl.as_ref().is_err_and(|e| e.is_invalid_input()),
        "a zero TTL: {zero_ttl:?}"
    );
    let zero_lease = h.store.acquire_lease("k", now, Duration::ZERO).await;
    assert!(
        zero_lease.as_ref().is_err_and(|e| e.is_invalid_input()),
        "a zero lease TTL: {zero_lease:?}"
    );
    assert_eq!(get(&h.store, "k").await, None, "nothing was stored");

    for tags in [vec![String::new()], vec!["ok".into(), "t".repeat(1025)]] {
        let r = h.store.tag_versions(&tags).await;
        assert!(
            r.as_ref().is_err_and(|e| e.is_invalid_input()),
            "tag_versions({:?} bytes): {r:?}",
            tags.iter().map(String::len).collect::<Vec<_>>()
        );
    }
    let r = h.store.bump_tag("").await;
    assert!(r.as_ref().is_err_and(|e| e.is_invalid_input()), "{r:?}");
    assert_eq!(
        h.store.tag_versions(&[]).await.expect("no tags"),
        Vec::<u64>::new()
    );

    let longest = "x".repeat(MAX_CACHE_KEY_BYTES);
    put(&h.store, &longest, b"edge").await;
    assert_eq!(
        get(&h.replica, &longest).await.as_deref(),
        Some(&b"edge"[..])
    );
}

/// Keys holding spaces, newlines, NUL, braces (cluster hash tags), glob characters and
/// non-ASCII text are stored verbatim and stay distinct from each other.
pub async fn unusual_keys_work_and_stay_distinct(f: &dyn CacheStoreFactory) {
    let h = Harness::new(f).await;
    let names = [
        "plain",
        "with space",
        "with\nnewline",
        "with\r\ncrlf",
        "nul\0byte",
        "{braces}",
        "{",
        "}",
        "{}",
        "a{b}c",
        "a{c}b",
        "*",
        "?",
        "[",
        "]",
        "[ab]",
        "\\",
        "a*",
        "a?",
        "a\\*",
        "plai?",
        "pla[i]n",
        "ключ",
        "鍵🔑",
        "e\u{301}",
        "\u{e9}",
    ];
    for (i, key) in names.iter().enumerate() {
        put(&h.store, key, format!("value-{i}").as_bytes()).await;
    }
    for (i, key) in names.iter().enumerate() {
        assert_eq!(
            get(&h.replica, key).await,
            Some(format!("value-{i}").into_bytes()),
            "key {key:?}"
        );
    }
    assert!(delete(&h.store, "*").await);
    assert!(delete(&h.store, "{braces}").await);
    for (i, key) in names.iter().enumerate() {
        let expected = match *key {
            "*" | "{braces}" => None,
            _ => Some(format!("value-{i}").into_bytes()),
        };
        assert_eq!(get(&h.replica, key).await, expected, "key {key:?}");
    }
}

/// A value lives until `now + ttl` by the store's clock: there one microsecond before, gone at
/// the edge; an overwrite starts a new TTL. Backends that expire in real time only check that a
/// live value is there.
pub async fn ttl_expires_at_its_edge(f: &dyn CacheStoreFactory) {
    let h = Harness::new(f).await;
    let ttl = Duration::from_secs(10);
    h.store
        .set("k", b"v", ttl, None)
        .await
        .expect("set with a TTL");
    assert_eq!(get(&h.replica, "k").await.as_deref(), Some(&b"v"[..]));
    if !f.ttl_follows_clock() {
        return;
    }
    h.advance(ttl - US);
    assert!(get(&h.store, "k").await.is_some(), "one µs before expiry");
    h.advance(US);
    assert_eq!(get(&h.store, "k").await, None, "at expiry");
    assert_eq!(get(&h.replica, "k").await, None, "at expiry, replica");
    assert!(!delete(&h.store, "k").await, "an expired value is gone");

    h.store.set("k", b"a", ttl, None).await.expect("set");
    h.advance(ttl / 2);
    h.store.set("k", b"b", ttl, None).await.expect("overwrite");
    h.advance(ttl / 2 + US);
    assert_eq!(
        get(&h.store, "k").await.as_deref(),
        Some(&b"b"[..]),
        "the overwrite's TTL counts"
    );
    h.advance(ttl / 2);
    assert_eq!(get(&h.store, "k").await, None);
}

/// The lease: one holder at a time across replicas; its fill succeeds once and stores the
/// value; a token never granted for the key cannot fill it.
pub async fn lease_grants_one_fill(f: &dyn CacheStoreFactory) {
    let h = Harness::new(f).await;
    let token = acquired(&h.store, "k", h.now()).await;
    assert_eq!(
        lease(&h.replica, "k", h.now()).await,
        LeaseOutcome::HeldElsewhere
    );
    assert_eq!(
        lease(&h.store, "k", h.now()).await,
        LeaseOutcome::HeldElsewhere
    );
    // A lease is per key.
    let other = acquired(&h.replica, "other", h.now()).await;
    assert_ne!(token, other);
    assert!(
        !fill(&h.store, "k", b"wrong", &other).await,
        "another key's token"
    );
    let stranger = LeaseToken::generate().expect("token");
    assert!(
        !fill(&h.store, "k", b"wrong", &stranger).await,
        "a token never granted"
    );
    assert_eq!(get(&h.store, "k").await, None);

    assert!(fill(&h.store, "k", b"filled", &token).await);
    assert_eq!(get(&h.replica, "k").await.as_deref(), Some(&b"filled"[..]));
    assert!(
        !fill(&h.replica, "k", b"again", &token).await,
        "a lease fills once"
    );
    assert_eq!(get(&h.replica, "k").await.as_deref(), Some(&b"filled"[..]));

    // The fill consumed the lease: a new one is granted at once.
    let next = acquired(&h.replica, "k", h.now()).await;
    assert_ne!(next, token);

    // A key with no lease at all refuses a fill.
    put(&h.store, "fresh", b"v").await;
    assert!(!fill(&h.store, "fresh", b"late", &next).await);
    assert_eq!(get(&h.store, "fresh").await.as_deref(), Some(&b"v"[..]));
}

/// The stale-set race: a reader takes the lease and loads; meanwhile a writer on another replica
/// deletes (or writes) the key; the reader's late fill is refused and the key keeps the
/// writer's state.
pub async fn a_write_or_delete_voids_the_lease(f: &dyn CacheStoreFactory) {
    let h = Harness::new(f).await;

    put(&h.store, "deleted", b"old").await;
    assert!(delete(&h.store, "deleted").await);
    let token = acquired(&h.store, "deleted", h.now()).await;
    assert!(
        !delete(&h.replica, "deleted").await,
        "no value, lease voided"
    );
    assert!(
        !fill(&h.store, "deleted", b"stale", &token).await,
        "the late fill after a delete"
    );
    assert_eq!(get(&h.replica, "deleted").await, None, "the delete holds");
    // The voided lease is not held: the next reader gets one at once.
    let again = acquired(&h.replica, "deleted", h.now()).await;
    assert!(fill(&h.replica, "deleted", b"fresh", &again).await);
    assert_eq!(
        get(&h.store, "deleted").await.as_deref(),
        Some(&b"fresh"[..])
    );

    let token = acquired(&h.store, "written", h.now()).await;
    put(&h.replica, "written", b"new").await;
    assert!(
        !fill(&h.store, "written", b"stale", &token).await,
        "the late fill after a write"
    );
    assert_eq!(
        get(&h.replica, "written").await.as_deref(),
        Some(&b"new"[..])
    );

    // A fill through one replica voids nothing but its own lease: a writer's later delete
    // still voids a lease taken after the fill.
    let token = acquired(&h.replica, "cycle", h.now()).await;
    assert!(fill(&h.replica, "cycle", b"v1", &token).await);
    let token = acquired(&h.store, "cycle", h.now()).await;
    assert!(delete(&h.replica, "cycle").await);
    assert!(!fill(&h.store, "cycle", b"stale", &token).await);
    assert_eq!(get(&h.store, "cycle").await, None);
}

/// A lease whose holder died expires by the caller's clock: held until one microsecond before
/// `now + ttl`, granted to another replica at the edge; the dead holder's token is then void.
pub async fn a_dead_holders_lease_expires(f: &dyn CacheStoreFactory) {
    let h = Harness::new(f).await;
    let start = h.now();
    let dead = acquired(&h.store, "k", start).await;
    assert_eq!(
        lease(&h.replica, "k", start.saturating_add(LEASE_TTL - US)).await,
        LeaseOutcome::HeldElsewhere,
        "one µs before the lease expires"
    );
    h.advance(LEASE_TTL);
    let successor = acquired(&h.replica, "k", h.now()).await;
    assert_ne!(successor, dead);
    assert!(
        !fill(&h.store, "k", b"from the dead", &dead).await,
        "the dead holder's token is no longer the lease"
    );
    assert!(fill(&h.replica, "k", b"v", &successor).await);
    assert_eq!(get(&h.store, "k").await.as_deref(), Some(&b"v"[..]));
}

/// Releasing a lease frees the key for the next reader; only the current token releases it.
pub async fn release_lease_frees_the_key(f: &dyn CacheStoreFactory) {
    let h = Harness::new(f).await;
    let stranger = LeaseToken::generate().expect("token");
    assert!(
        !h.store
            .release_lease("k", &stranger)
            .await
            .expect("release"),
        "no lease to release"
    );
    let token = acquired(&h.store, "k", h.now()).await;
    assert!(
        !h.replica
            .release_lease("k", &stranger)
            .await
            .expect("release"),
        "a wrong token releases nothing"
    );
    assert_eq!(
        lease(&h.replica, "k", h.now()).await,
        LeaseOutcome::HeldElsewhere
    );
    assert!(h.replica.release_lease("k", &token).await.expect("release"));
    assert!(
        !h.store.release_lease("k", &token).await.expect("release"),
        "released twice"
    );
    assert!(
        !fill(&h.store, "k", b"late", &token).await,
        "a released lease cannot fill"
    );
    assert_eq!(get(&h.store, "k").await, None);
    let next = acquired(&h.replica, "k", h.now()).await;
    assert!(fill(&h.replica, "k", b"v", &next).await);
    assert_eq!(get(&h.store, "k").await.as_deref(), Some(&b"v"[..]));
}

/// Of many callers racing for one key's lease on two replicas, exactly one gets it.
pub async fn racing_readers_get_one_lease(f: &dyn CacheStoreFactory) {
    let h = Harness::new(f).await;
    let now = h.now();
    let attempts = (0..32).map(|i| {
        let store = if i % 2 == 0 { &h.store } else { &h.replica };
        lease(store, "hot", now)
    });
    let outcomes = futures::future::join_all(attempts).await;
    let winners = outcomes
        .iter()
        .filter(|o| matches!(o, LeaseOutcome::Acquired(_)))
        .count();
    assert_eq!(winners, 1, "{outcomes:?}");
}

/// Tag versions: an unknown tag gets a nonzero version, stable across calls and replicas and
/// the same when two replicas see it first at once; a bump returns the new version, which every
/// replica then reads, and leaves other tags alone.
pub async fn tag_versions_are_stable_and_bump(f: &dyn CacheStoreFactory) {
    let h = Harness::new(f).await;
    let first = versions(&h.store, &["a", "b", "a"]).await;
    assert_eq!(first.len(), 3);
    assert!(first.iter().all(|&v| v != 0), "{first:?}");
    assert_eq!(first[0], first[2], "one tag, one version");
    assert_eq!(versions(&h.store, &["a", "b"]).await, first[..2]);
    assert_eq!(
        versions(&h.replica, &["b", "a"]).await,
        [first[1], first[0]]
    );

    let bumped = h.replica.bump_tag("a").await.expect("bump");
    assert_ne!(bumped, first[0]);
    assert_ne!(bumped, 0);
    assert_eq!(versions(&h.store, &["a", "b"]).await, [bumped, first[1]]);
    let twice = h.store.bump_tag("a").await.expect("bump");
    assert!(twice != bumped && twice != first[0] && twice != 0);
    assert_eq!(versions(&h.replica, &["a"]).await, [twice]);
    assert_eq!(
        versions(&h.replica, &["b"]).await,
        [first[1]],
        "b untouched"
    );

    // Bumping a tag never seen gives it a version too, read back everywhere.
    let new = h.store.bump_tag("never-read").await.expect("bump");
    assert_ne!(new, 0);
    assert_eq!(versions(&h.replica, &["never-read"]).await, [new]);

    // Two replicas asking for an unseen tag at once agree on its version.
    let (x, y) = futures::join!(
        versions(&h.store, &["racing", "c"]),
        versions(&h.replica, &["c", "racing"])
    );
    assert_eq!((x[0], x[1]), (y[1], y[0]));

    // Tags with unusual characters are tags like any other.
    let odd = versions(&h.store, &["{x}*?", "{x}*"]).await;
    assert!(odd.iter().all(|&v| v != 0));
    let bumped = h.store.bump_tag("{x}*?").await.expect("bump");
    assert_eq!(
        versions(&h.replica, &["{x}*?", "{x}*"]).await,
        [bumped, odd[1]]
    );
}

/// A prefix purge deletes exactly the keys starting with the prefix (glob characters in it are
/// literal), returns how many held a value, and voids their leases; every other key survives.
pub async fn purge_prefix_deletes_exactly_the_prefix(f: &dyn CacheStoreFactory) {
    let h = Harness::new(f).await;
    let doomed = ["user:1", "user:2", "user:10", "user:{7}", "user:"];
    let spared = ["users", "use", "other:user:1", "User:1", "xuser:1"];
    for key in doomed.iter().chain(&spared) {
        put(&h.store, key, key.as_bytes()).await;
    }
    let lease_on_doomed = acquired(&h.store, "user:3", h.now()).await;

    assert_eq!(purge(&h.replica, "user:").await, doomed.len() as u64);
    for key in doomed {
        assert_eq!(get(&h.store, key).await, None, "{key:?} purged");
    }
    for key in spared {
        assert_eq!(
            get(&h.store, key).await.as_deref(),
            Some(key.as_bytes()),
            "{key:?} survives"
        );
    }
    assert!(
        !fill(&h.store, "user:3", b"stale", &lease_on_doomed).await,
        "a purge voids the leases under it"
    );
    assert_eq!(get(&h.store, "user:3").await, None);
    assert_eq!(purge(&h.store, "user:").await, 0, "nothing left to purge");
    assert_eq!(purge(&h.store, "nothing-here").await, 0);

    // Glob and hash-tag characters in the prefix match only themselves.
    let globby = ["a*[?]\\{x}:1", "a*[?]\\{x}:2"];
    let lookalikes = [
        "ab[?]\\{x}:1",
        "a*[?]{x}:1",
        "a*?\\{x}:1",
        "a*[?]\\{y}:1",
        "a*",
    ];
    for key in globby.iter().chain(&lookalikes) {
        put(&h.store, key, b"v").await;
    }
    assert_eq!(purge(&h.store, "a*[?]\\{x}:").await, 2);
    for key in globby {
        assert_eq!(get(&h.replica, key).await, None, "{key:?} purged");
    }
    for key in lookalikes {
        assert!(get(&h.replica, key).await.is_some(), "{key:?} survives");
    }
    assert_eq!(purge(&h.store, "*").await, 0, "`*` is not a wildcard");
    assert!(get(&h.replica, "a*").await.is_some());
}

/// Stores from one factory are isolated: keys, leases, tags and purges do not cross.
pub async fn stores_are_isolated(f: &dyn CacheStoreFactory) {
    let a = Harness::new(f).await;
    let b = Harness::new(f).await;
    put(&a.store, "k", b"a").await;
    assert_eq!(get(&b.store, "k").await, None);
    let _held = acquired(&a.store, "k", a.now()).await;
    let _also = acquired(&b.store, "k", b.now()).await;
    put(&b.store, "k", b"b").await;
    assert_eq!(purge(&b.store, "k").await, 1);
    assert_eq!(get(&a.store, "k").await.as_deref(), Some(&b"a"[..]));
    let va = versions(&a.store, &["t"]).await;
    b.store.bump_tag("t").await.expect("bump");
    assert_eq!(versions(&a.store, &["t"]).await, va);
}

/// A sink subscribed on replica 2 sees the channel come up, then the invalidation of every set,
/// delete, bump and purge made on replica 1.
pub async fn invalidations_reach_other_replicas(f: &dyn CacheStoreFactory) {
    let h = Harness::new(f).await;
    let sink = RecordingSink::new();
    let _subscription = h.replica.subscribe(sink.clone()).await.expect("subscribe");
    sink.wait_until("on_channel_up", |e| e.contains(&SinkEvent::Up))
        .await;

    put(&h.store, "k", b"v").await;
    sink.wait_for(&keys("k")).await;

    let token = acquired(&h.store, "filled", h.now()).await;
    assert!(fill(&h.store, "filled", b"v", &token).await);
    sink.wait_for(&keys("filled")).await;

    assert!(!delete(&h.store, "{odd key}\n*").await, "nothing there yet");
    put(&h.store, "{odd key}\n*", b"v").await;
    assert!(delete(&h.store, "{odd key}\n*").await);
    sink.wait_for(&keys("{odd key}\n*")).await;

    h.store.bump_tag("t").await.expect("bump");
    sink.wait_for(&Invalidation::Tag("t".into())).await;

    purge(&h.store, "user:").await;
    sink.wait_for(&Invalidation::Prefix("user:".into())).await;

    let downs = sink
        .events()
        .iter()
        .filter(|e| **e == SinkEvent::Down)
        .count();
    assert_eq!(downs, 0, "the channel never went down: {:?}", sink.events());
}

/// A subscriber on the writing replica hears its own changes too, and several sinks on one
/// replica all hear each message.
pub async fn every_subscriber_hears_every_change(f: &dyn CacheStoreFactory) {
    let h = Harness::new(f).await;
    let local = RecordingSink::new();
    let remote_a = RecordingSink::new();
    let remote_b = RecordingSink::new();
    let _l = h.store.subscribe(local.clone()).await.expect("subscribe");
    let _a = h
        .replica
        .subscribe(remote_a.clone())
        .await
        .expect("subscribe");
    let _b = h
        .replica
        .subscribe(remote_b.clone())
        .await
        .expect("subscribe");
    for sink in [&local, &remote_a, &remote_b] {
        sink.wait_until("on_channel_up", |e| e.contains(&SinkEvent::Up))
            .await;
    }
    put(&h.store, "k", b"v").await;
    assert!(delete(&h.store, "k").await);
    for sink in [&local, &remote_a, &remote_b] {
        sink.wait_until("the set's and the delete's invalidations", |e| {
            e.iter()
                .filter(|e| **e == SinkEvent::Message(keys("k")))
                .count()
                >= 2
        })
        .await;
    }
}

/// Dropping a subscription stops delivery: a sink still subscribed on the same replica serves
/// as the barrier that proves the message went out.
pub async fn dropping_the_subscription_stops_delivery(f: &dyn CacheStoreFactory) {
    let h = Harness::new(f).await;
    let dropped = RecordingSink::new();
    let kept = RecordingSink::new();
    let subscription = h
        .replica
        .subscribe(dropped.clone())
        .await
        .expect("subscribe");
    let _kept = h.replica.subscribe(kept.clone()).await.expect("subscribe");
    for sink in [&dropped, &kept] {
        sink.wait_until("on_channel_up", |e| e.contains(&SinkEvent::Up))
            .await;
    }
    put(&h.store, "before", b"v").await;
    dropped.wait_for(&keys("before")).await;
    kept.wait_for(&keys("before")).await;

    drop(subscription);
    put(&h.store, "after", b"v").await;
    h.store.bump_tag("after").await.expect("bump");
    kept.wait_for(&keys("after")).await;
    kept.wait_for(&Invalidation::Tag("after".into())).await;
    assert!(
        !dropped.received(&keys("after")) && !dropped.received(&Invalidation::Tag("after".into())),
        "a dropped subscription still delivered: {:?}",
        dropped.events()
    );
    // The store lets go of the sink too (no leak of dropped sinks); a backend whose listener
    // task ends asynchronously gets the same real-time bound as a message.
    let start = Instant::now();
    while Arc::strong_count(&dropped) > 1 {
        assert!(
            start.elapsed() < INVALIDATION_WAIT,
            "the store still holds the dropped sink after {INVALIDATION_WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Instantiates the cache conformance suite for one backend: a module `$name` with one
/// `#[tokio::test]` per case, each given the factory `$factory` (an expression evaluated inside
/// the module, which sees the caller's items through `use super::*`).
///
/// ```ignore
/// statehouse_testkit::cache_conformance!(embedded, super::EmbeddedCaches);
/// statehouse_testkit::cache_conformance!(redis_cluster, super::RedisCaches::cluster());
/// ```
#[macro_export]
macro_rules! cache_conformance {
    ($name:ident, $factory:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::cache_conformance!(@cases $factory;
                get_set_delete_round_trip,
                bad_input_is_rejected,
                unusual_keys_work_and_stay_distinct,
                ttl_expires_at_its_edge,
                lease_grants_one_fill,
                a_write_or_delete_voids_the_lease,
                a_dead_holders_lease_expires,
                release_lease_frees_the_key,
                racing_readers_get_one_lease,
                tag_versions_are_stable_and_bump,
                purge_prefix_deletes_exactly_the_prefix,
                stores_are_isolated,
                invalidations_reach_other_replicas,
                every_subscriber_hears_every_change,
                dropping_the_subscription_stops_delivery,
            );
        }
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let factory = $factory;
                $crate::cache_suite::$case(&factory).await;
            }
        )*
    };
}
