//! The embedded cache's invalidation channel: delivery is synchronous and after the locks are
//! released, `reset_channel` looks like a reconnect, and dropped subscriptions are forgotten.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::FutureExt;
use futures::executor::block_on;
use statehouse_core::cache::{CacheStore, Invalidation, InvalidationSink};
use statehouse_embedded::EmbeddedCacheStore;
use statehouse_testkit::cache_suite::{RecordingSink, SinkEvent};

const TTL: Duration = Duration::from_secs(60);

fn keys(k: &str) -> SinkEvent {
    SinkEvent::Message(Invalidation::Keys(vec![k.to_owned()]))
}

#[test]
fn messages_arrive_before_the_call_returns() {
    let cache = EmbeddedCacheStore::new();
    let sink = RecordingSink::new();
    let _subscription = block_on(cache.subscribe(sink.clone())).expect("subscribe");
    assert_eq!(sink.events(), [SinkEvent::Up]);

    block_on(cache.set("k", b"v", TTL, None)).expect("set");
    assert_eq!(sink.events().last(), Some(&keys("k")));
    block_on(cache.delete("absent")).expect("delete");
    assert_eq!(
        sink.events().last(),
        Some(&keys("absent")),
        "a delete always tells"
    );
    let version = block_on(cache.bump_tag("t")).expect("bump");
    assert_ne!(version, 0);
    assert_eq!(
        sink.events().last(),
        Some(&SinkEvent::Message(Invalidation::Tag("t".into())))
    );
    block_on(cache.purge_prefix("p:")).expect("purge");
    assert_eq!(
        sink.events().last(),
        Some(&SinkEvent::Message(Invalidation::Prefix("p:".into())))
    );
    // Reads, leases and refused fills change nothing and say nothing.
    let before = sink.events().len();
    block_on(cache.get("k")).expect("get");
    block_on(cache.tag_versions(&["u".into()])).expect("tags");
    let stranger = statehouse_core::cache::LeaseToken::generate().expect("token");
    assert!(!block_on(cache.set("k", b"late", TTL, Some(&stranger))).expect("fill"));
    assert_eq!(sink.events().len(), before);
}

/// A sink that reads the store from inside the notification: it would deadlock if the store
/// still held the shard's lock while notifying.
struct ReadingSink {
    cache: OnceLock<EmbeddedCacheStore>,
    seen: Mutex<Vec<Option<Vec<u8>>>>,
}

impl InvalidationSink for ReadingSink {
    fn on_invalidation(&self, message: &Invalidation) {
        if let (Invalidation::Keys(keys), Some(cache)) = (message, self.cache.get()) {
            // The embedded store's futures are ready when first polled (and a nested executor
            // is not allowed here).
            let value = cache
                .get(&keys[0])
                .now_or_never()
                .expect("ready at once")
                .expect("get");
            self.seen.lock().expect("seen").push(value);
        }
    }
    fn on_channel_down(&self) {}
    fn on_channel_up(&self) {}
}

#[test]
fn sinks_are_called_with_no_lock_held_and_see_the_change() {
    let cache = EmbeddedCacheStore::builder()
        .shards(1)
        .build()
        .expect("valid");
    let sink = Arc::new(ReadingSink {
        cache: OnceLock::new(),
        seen: Mutex::new(Vec::new()),
    });
    sink.cache.set(cache.clone()).expect("set once");
    let subscription = block_on(cache.subscribe(sink.clone())).expect("subscribe");
    block_on(cache.set("k", b"v", TTL, None)).expect("set");
    block_on(cache.delete("k")).expect("delete");
    assert_eq!(
        *sink.seen.lock().expect("seen"),
        [Some(b"v".to_vec()), None]
    );
    // Dropping the subscription breaks the cycle (the sink holds a clone of the store).
    drop(subscription);
    assert_eq!(cache.subscribers(), 0);
}

#[test]
fn reset_channel_calls_down_then_up_on_every_subscriber() {
    let cache = EmbeddedCacheStore::new();
    let a = RecordingSink::new();
    let b = RecordingSink::new();
    let sub_a = block_on(cache.subscribe(a.clone())).expect("subscribe");
    let _sub_b = block_on(cache.subscribe(b.clone())).expect("subscribe");
    assert_eq!(cache.subscribers(), 2);
    cache.reset_channel();
    for sink in [&a, &b] {
        assert_eq!(
            sink.events(),
            [SinkEvent::Up, SinkEvent::Down, SinkEvent::Up]
        );
    }
    // Messages still flow after a reset.
    block_on(cache.set("k", b"v", TTL, None)).expect("set");
    assert_eq!(b.events().last(), Some(&keys("k")));

    drop(sub_a);
    assert_eq!(cache.subscribers(), 1);
    cache.reset_channel();
    block_on(cache.set("after", b"v", TTL, None)).expect("set");
    assert_eq!(
        a.events().len(),
        4,
        "a dropped subscriber hears nothing: {:?}",
        a.events()
    );
    assert_eq!(
        b.events()[4..],
        [SinkEvent::Down, SinkEvent::Up, keys("after")]
    );
    assert_eq!(
        Arc::strong_count(&a),
        1,
        "the store let go of the dropped sink"
    );
}

#[test]
fn a_subscription_may_outlive_its_store() {
    let cache = EmbeddedCacheStore::new();
    let sink = RecordingSink::new();
    let subscription = block_on(cache.subscribe(sink.clone())).expect("subscribe");
    drop(cache);
    assert_eq!(
        Arc::strong_count(&sink),
        1,
        "the store and its registry are gone"
    );
    drop(subscription);
}
