//! The typed cache (`statehouse::Cache`) across replicas, on every backend: the embedded store,
//! Redis standalone and Redis Cluster. Each Redis replica has its own connection and its own
//! Pub/Sub subscription, as separate processes would.
//!
//! Time logic follows a `ManualClock`; the only real-time waits are polls for an asynchronous
//! event (an invalidation message, a spawned task) with an upper bound.

mod common;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{CacheBackend, CacheFleet, Deployment};
use statehouse::{
    BreakerState, Cache, CacheError, CachePolicy, CacheStore, Clock, Invalidation,
    InvalidationSink, InvalidationSubscription, JsonCodec, LeaseOutcome, Loaded, Lookup,
    ManualClock, SetOptions, Source, Tier, Timestamp,
};
use statehouse_core::cache::{Envelope, EnvelopeFlags};
use statehouse_testkit::cache_intercept::{Intercept, Intercepted};
use tokio::sync::watch;

/// How long a test waits, in real time, for an asynchronous event before failing.
const EVENT_WAIT: Duration = Duration::from_secs(10);

/// The bound on cross-replica invalidation through Redis Pub/Sub asserted below (measured
/// times are printed; on a loaded CI machine they stay in the low milliseconds).
const REDIS_INVALIDATION_BOUND: Duration = Duration::from_secs(1);

fn start() -> ManualClock {
    ManualClock::new(Timestamp::from_micros(1_800_000_000_000_000))
}

fn ttl_policy(secs: u64) -> CachePolicy {
    CachePolicy::builder(Duration::from_secs(secs))
        .jitter(0.0)
        .build()
        .expect("policy")
}

async fn cache_over(
    store: Arc<dyn CacheStore>,
    clock: &ManualClock,
    policy: CachePolicy,
) -> Cache<String> {
    let cache = Cache::<String>::builder(store, "items")
        .policy(policy)
        .clock(Arc::new(clock.clone()))
        // Generous: a loaded CI machine running three Redis servers and a cluster.
        .deadline(Duration::from_secs(5))
        .build()
        .await
        .expect("build cache");
    poll("near cache live", || {
        let c = cache.clone();
        async move { c.near_cache_live() }
    })
    .await;
    cache
}

async fn replicas(
    backend: CacheBackend,
    policy: CachePolicy,
    n: usize,
) -> (ManualClock, CacheFleet, Vec<Cache<String>>) {
    let clock = start();
    let fleet = backend.fleet(&clock, n).await;
    let mut caches = Vec::new();
    for store in &fleet.stores {
        caches.push(cache_over(store.clone(), &clock, policy.clone()).await);
    }
    (clock, fleet, caches)
}

/// Polls `done` until it holds; returns how long that took. Panics after [`EVENT_WAIT`].
async fn poll<F, Fut>(what: &str, mut done: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let began = Instant::now();
    loop {
        if done().await {
            return began.elapsed();
        }
        assert!(began.elapsed() < EVENT_WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn value_of(cache: &Cache<String>, key: &str) -> Option<String> {
    cache
        .get(key)
        .await
        .expect("get")
        .into_value()
        .map(|v| (*v).clone())
}

/// A gate a loader waits behind until the test opens it.
#[derive(Clone)]
struct Gate(watch::Sender<bool>);

impl Gate {
    fn new() -> Gate {
        Gate(watch::channel(false).0)
    }
    fn open(&self) {
        self.0.send_replace(true);
    }
    async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

// ----- scenarios -----

/// 1 000 concurrent `get_or_load` calls of one cold key over three replicas load it once: one
/// leader per process (single flight), one lease across processes.
async fn stampede_loads_once(backend: CacheBackend) {
    let (_clock, _fleet, caches) = replicas(backend, ttl_policy(60), 3).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Gate::new();
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let cache = caches[i % 3].clone();
        let calls = calls.clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load("hot", move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    gate.wait().await;
                    Ok::<_, io::Error>(Some("value".to_string()))
                })
                .await
        }));
    }
    // Everyone piles up: 999 wait in-process or for the other replica's lease.
    poll("all callers waiting", || {
        let caches = caches.clone();
        async move {
            let waiting: u64 = caches
                .iter()
                .map(|c| c.stats().coalesced_waiters + c.stats().lease_waits)
                .sum();
            waiting >= 999
        }
    })
    .await;
    gate.open();
    for task in tasks {
        let value = task.await.expect("task").expect("get_or_load");
        assert_eq!(value.as_deref().map(String::as_str), Some("value"));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the loader ran more than once"
    );
    let loads: u64 = caches.iter().map(|c| c.stats().loads).sum();
    assert_eq!(loads, 1);
}

/// After a write through one replica, the others stop serving the old value from their near
/// caches once the invalidation arrives; the writer sees its write at once.
async fn writes_invalidate_other_replicas(backend: CacheBackend) {
    let (_clock, _fleet, caches) = replicas(backend, ttl_policy(60), 3).await;
    caches[0].set("k", &"v1".to_string()).await.expect("set");
    for c in &caches {
        // Wait for the set's own invalidation to pass before filling the near cache.
        poll("near-cache hit of v1", || {
            let c = c.clone();
            async move {
                matches!(
                    c.get("k").await.expect("get"),
                    Lookup::Hit { tier: Tier::Near, ref value } if **value == "v1"
                )
            }
        })
        .await;
    }
    let began = Instant::now();
    caches[0].set("k", &"v2".to_string()).await.expect("set");
    // Read your writes: no wait on the writer.
    assert_eq!(value_of(&caches[0], "k").await.as_deref(), Some("v2"));
    let took = poll("every replica to see v2", || {
        let caches = caches.clone();
        async move {
            for c in &caches {
                if value_of(c, "k").await.as_deref() != Some("v2") {
                    return false;
                }
            }
            true
        }
    })
    .await;
    let took = took.max(began.elapsed());
    println!("{backend:?}: all three replicas returned v2 {took:?} after the write");
    match backend {
        CacheBackend::Embedded => {
            // Delivery is synchronous: the first poll already saw it.
            assert!(caches[1].stats().invalidations_received >= 2);
        }
        CacheBackend::Redis(_) => assert!(took < REDIS_INVALIDATION_BOUND, "{took:?}"),
    }
    for c in &caches[1..] {
        assert!(c.stats().l1_hits >= 1);
        assert!(c.stats().invalidations_received >= 1);
    }
}

/// Starts `get_or_load("k")` on `cache` with a loader that reads "old" (tagged `tag`, if any)
/// and then waits behind the returned gate; returns once the loader has started.
async fn start_gated_load(
    cache: &Cache<String>,
    tag: Option<&'static str>,
) -> (
    tokio::task::JoinHandle<Result<statehouse::Fetched<String>, CacheError<io::Error>>>,
    Gate,
) {
    let started = Arc::new(AtomicBool::new(false));
    let gate = Gate::new();
    let load = {
        let started = started.clone();
        let gate = gate.clone();
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load_with("k", move || async move {
                    // Reads the source of truth: the old value.
                    started.store(true, Ordering::SeqCst);
                    gate.wait().await;
                    let loaded = Loaded::found("old".to_string());
                    Ok::<_, io::Error>(match tag {
                        Some(tag) => loaded.tag(tag),
                        None => loaded,
                    })
                })
                .await
        })
    };
    poll("the loader to start", || {
        let s = started.clone();
        async move { s.load(Ordering::SeqCst) }
    })
    .await;
    (load, gate)
}

/// The stale-set race: a load that began before a delete must not fill the cache after it.
async fn a_fill_voided_by_a_delete_is_refused(backend: CacheBackend) {
    let (_clock, fleet, caches) = replicas(backend, ttl_policy(60), 2).await;
    let (a, b) = (caches[0].clone(), caches[1].clone());
    let (load, gate) = start_gated_load(&a, None).await;
    // Another replica changes the source of truth and deletes the key.
    b.delete("k").await.expect("delete");
    finish_uncached(&fleet, &a, &b, load, gate, "a delete").await;
}

/// Opens the gate of a load begun with [`start_gated_load`] on `a`, then checks that its caller
/// got what it loaded ("old") but that nothing was stored: `a` and `b` both miss.
async fn finish_uncached(
    fleet: &CacheFleet,
    a: &Cache<String>,
    b: &Cache<String>,
    load: tokio::task::JoinHandle<Result<statehouse::Fetched<String>, CacheError<io::Error>>>,
    gate: Gate,
    after: &str,
) {
    gate.open();
    let fetched = load.await.expect("task").expect("load");
    assert_eq!(fetched.source, Source::Loaded, "after {after}");
    assert_eq!(fetched.value.as_deref().map(String::as_str), Some("old"));
    let raw = fleet.stores[0]
        .get(&a.store_key("k"))
        .await
        .expect("raw get");
    assert!(raw.is_none(), "after {after}: the late fill was stored");
    assert!(a.get("k").await.expect("get").is_miss(), "after {after}");
    assert!(b.get("k").await.expect("get").is_miss(), "after {after}");
}

/// A tag (or the namespace) invalidated on another replica while a loader runs: the loader may
/// have read the source of truth before the change, so its value is served to its caller but
/// never cached (it was stamped with the tag's new version, and so served as fresh everywhere).
async fn a_fill_overtaken_by_a_tag_invalidation_is_not_cached(backend: CacheBackend) {
    for namespace in [false, true] {
        let (_clock, fleet, caches) = replicas(backend, ttl_policy(60), 2).await;
        let (a, b) = (caches[0].clone(), caches[1].clone());
        let (load, gate) = start_gated_load(&a, Some("group:1")).await;
        let received = a.stats().invalidations_received;
        if namespace {
            b.invalidate_namespace().await.expect("bump namespace");
        } else {
            b.invalidate_tag("group:1").await.expect("bump tag");
        }
        poll("the invalidation to reach the loading replica", || {
            let a = a.clone();
            async move { a.stats().invalidations_received > received }
        })
        .await;
        let after = if namespace {
            "a namespace invalidation"
        } else {
            "a tag invalidation"
        };
        finish_uncached(&fleet, &a, &b, load, gate, after).await;
    }
}

/// A caller that writes (deletes the key) and then reads through `get_or_load` while a load
/// that began before its write is still running on the same replica: it must not be handed
/// that load's value (read your writes); it loads again, and the old load is not cached.
async fn a_caller_after_its_own_write_does_not_join_an_older_load(backend: CacheBackend) {
    let (_clock, _fleet, caches) = replicas(backend, ttl_policy(60), 1).await;
    let a = caches[0].clone();
    let (old, gate) = start_gated_load(&a, None).await;
    a.delete("k").await.expect("delete");
    // Joining the older load would wait behind its gate, which opens only after this.
    let fetched = tokio::time::timeout(
        EVENT_WAIT,
        a.get_or_load_with("k", || async {
            Ok::<_, io::Error>(Loaded::found("new".to_string()))
        }),
    )
    .await
    .expect("joined the load that began before the delete")
    .expect("load");
    assert_eq!(fetched.value.as_deref().map(String::as_str), Some("new"));
    assert_eq!(fetched.source, Source::Loaded);
    gate.open();
    let first = old.await.expect("task").expect("load");
    assert_eq!(first.value.as_deref().map(String::as_str), Some("old"));
    assert_eq!(
        value_of(&a, "k").await.as_deref(),
        Some("new"),
        "the newer load is kept"
    );
}

/// A store wrapper whose next `get` (once armed) reads the store, then waits for the test
/// before answering: a store reply overtaken by an invalidation.
#[derive(Debug)]
struct SlowReply {
    armed: AtomicBool,
    read_done: AtomicBool,
    release: watch::Sender<bool>,
}

#[async_trait]
impl Intercept for SlowReply {
    async fn get(&self, inner: &dyn CacheStore, key: &str) -> statehouse::Result<Option<Vec<u8>>> {
        let value = inner.get(key).await?;
        if self.armed.swap(false, Ordering::SeqCst) {
            self.read_done.store(true, Ordering::SeqCst);
            let mut rx = self.release.subscribe();
            let _ = rx.wait_for(|r| *r).await;
        }
        Ok(value)
    }
}

/// The late-fill race: a store read answered after an invalidation of its key must not put
/// the old value into the near cache.
async fn a_read_overtaken_by_an_invalidation_is_not_kept(backend: CacheBackend) {
    let clock = start();
    let fleet = backend.fleet(&clock, 2).await;
    let slow = Arc::new(Intercepted {
        inner: fleet.stores[0].clone(),
        intercept: SlowReply {
            armed: AtomicBool::new(false),
            read_done: AtomicBool::new(false),
            release: watch::channel(false).0,
        },
    });
    let a = cache_over(slow.clone(), &clock, ttl_policy(60)).await;
    let b = cache_over(fleet.stores[1].clone(), &clock, ttl_policy(60)).await;
    b.set("k", &"v1".to_string()).await.expect("set");
    // Let the set's own invalidation reach `a` before the read.
    poll("v1 invalidation at a", || {
        let a = a.clone();
        async move { a.stats().invalidations_received >= 1 }
    })
    .await;
    slow.armed.store(true, Ordering::SeqCst);
    let reader = {
        let a = a.clone();
        tokio::spawn(async move { a.get("k").await })
    };
    poll("the store read", || {
        let s = slow.clone();
        async move { s.read_done.load(Ordering::SeqCst) }
    })
    .await;
    let received = a.stats().invalidations_received;
    b.set("k", &"v2".to_string()).await.expect("set");
    poll("v2 invalidation at a", || {
        let a = a.clone();
        async move { a.stats().invalidations_received > received }
    })
    .await;
    slow.release.send_replace(true);
    // The overtaken read answers its own caller with what it read...
    let old = reader.await.expect("task").expect("get");
    assert_eq!(old.value().map(|v| v.as_str()), Some("v1"));
    // ...but did not keep it.
    assert_eq!(a.near_cache_len(), 0);
    let next = a.get("k").await.expect("get");
    assert_eq!(next.value().map(|v| v.as_str()), Some("v2"));
    assert_eq!(next.tier(), Some(Tier::Remote));
}

/// A replica that took the lease and died blocks others only until the lease expires (by the
/// caller's clock); then another replica loads.
async fn a_dead_holders_lease_expires(backend: CacheBackend) {
    let policy = CachePolicy::builder(Duration::from_secs(60))
        .jitter(0.0)
        .lease_ttl(Duration::from_secs(2))
        .build()
        .expect("policy");
    let (clock, fleet, caches) = replicas(backend, policy, 2).await;
    let key = caches[0].store_key("k");
    // The holder takes the lease and dies: never fills, never releases.
    let outcome = fleet.stores[0]
        .acquire_lease(&key, clock.now(), Duration::from_secs(2))
        .await
        .expect("lease");
    assert!(matches!(outcome, LeaseOutcome::Acquired(_)));
    let calls = Arc::new(AtomicUsize::new(0));
    let waiter = {
        let b = caches[1].clone();
        let calls = calls.clone();
        tokio::spawn(async move {
            b.get_or_load("k", move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, io::Error>(Some("v".to_string()))
            })
            .await
        })
    };
    poll("the lease wait", || {
        let b = caches[1].clone();
        async move { b.stats().lease_waits == 1 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "loaded under another's lease"
    );
    clock.advance(Duration::from_secs(2));
    let value = tokio::time::timeout(EVENT_WAIT, waiter)
        .await
        .expect("loaded once the lease expired")
        .expect("task")
        .expect("get_or_load");
    assert_eq!(value.as_deref().map(String::as_str), Some("v"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A cancelled load gives its lease back: another replica loads at once, without waiting for
/// the lease to expire (the clock never moves here).
async fn a_cancelled_load_releases_its_lease(backend: CacheBackend) {
    let (clock, fleet, caches) = replicas(backend, ttl_policy(60), 2).await;
    let stuck = {
        let a = caches[0].clone();
        tokio::spawn(async move {
            a.get_or_load("k", || async {
                std::future::pending::<()>().await;
                Ok::<_, io::Error>(Some("never".to_string()))
            })
            .await
        })
    };
    poll("the stuck load", || {
        let a = caches[0].clone();
        async move { a.stats().loads == 1 }
    })
    .await;
    stuck.abort();
    assert!(stuck.await.expect_err("aborted").is_cancelled());
    let key = caches[0].store_key("k");
    poll("the lease to be released", || {
        let store = fleet.stores[1].clone();
        let key = key.clone();
        let now = clock.now();
        async move {
            match store.acquire_lease(&key, now, Duration::from_secs(5)).await {
                Ok(LeaseOutcome::Acquired(token)) => {
                    store.release_lease(&key, &token).await.expect("release");
                    true
                }
                _ => false,
            }
        }
    })
    .await;
    let value = caches[1]
        .get_or_load("k", || async { Ok::<_, io::Error>(Some("v".to_string())) })
        .await
        .expect("get_or_load");
    assert_eq!(value.as_deref().map(String::as_str), Some("v"));
    assert_eq!(caches[1].stats().lease_waits, 0);
}

/// A loader error is returned as such, distinguishable from a store error, never cached, and
/// its lease is given back at once.
async fn a_loader_error_is_returned_and_not_cached(backend: CacheBackend) {
    let (_clock, _fleet, caches) = replicas(backend, ttl_policy(60), 2).await;
    let err = caches[0]
        .get_or_load("k", || async {
            Err::<Option<String>, _>(io::Error::other("database down"))
        })
        .await
        .expect_err("loader error");
    assert_eq!(
        err.load_error().map(|e| e.to_string()).as_deref(),
        Some("database down")
    );
    assert!(err.store_error().is_none());
    assert_eq!(caches[0].stats().load_errors, 1);
    assert!(caches[0].get("k").await.expect("get").is_miss());
    let value = caches[1]
        .get_or_load("k", || async { Ok::<_, io::Error>(Some("v".to_string())) })
        .await
        .expect("get_or_load");
    assert_eq!(value.as_deref().map(String::as_str), Some("v"));
    assert_eq!(
        caches[1].stats().lease_waits,
        0,
        "the lease was not given back"
    );
}

/// Jittered TTLs of entries written together are spread within [ttl × (1 − j), ttl].
async fn ttl_jitter_spreads_expiry(backend: CacheBackend) {
    let policy = CachePolicy::builder(Duration::from_secs(100))
        .jitter(0.2)
        .build()
        .expect("policy");
    let (clock, fleet, caches) = replicas(backend, policy, 1).await;
    let now = clock.now();
    let mut ttls = Vec::new();
    for i in 0..200 {
        let key = format!("k{i}");
        caches[0].set(&key, &"v".to_string()).await.expect("set");
        let raw = fleet.stores[0]
            .get(&caches[0].store_key(&key))
            .await
            .expect("raw get")
            .expect("stored");
        let e = Envelope::decode(&raw).expect("envelope");
        ttls.push(e.fresh_until.saturating_duration_since(now));
    }
    let (min, max) = (
        ttls.iter().min().copied().unwrap_or_default(),
        ttls.iter().max().copied().unwrap_or_default(),
    );
    assert!(min >= Duration::from_secs(80), "{min:?}");
    assert!(max <= Duration::from_secs(100), "{max:?}");
    // 200 uniform draws over 20 s: a spread under 10 s has a chance of about 2^-190.
    assert!(max - min >= Duration::from_secs(10), "{min:?}..{max:?}");
    ttls.sort();
    ttls.dedup();
    assert!(ttls.len() >= 190, "only {} distinct TTLs", ttls.len());
}

/// "Not found" is remembered for the negative TTL, to the microsecond.
async fn not_found_is_cached_for_the_negative_ttl(backend: CacheBackend) {
    let policy = CachePolicy::builder(Duration::from_secs(60))
        .jitter(0.0)
        .negative_ttl(Duration::from_secs(5))
        .build()
        .expect("policy");
    let (clock, _fleet, caches) = replicas(backend, policy, 2).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let load = |cache: Cache<String>, calls: Arc<AtomicUsize>| async move {
        cache
            .get_or_load_with("ghost", move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, io::Error>(Loaded::not_found())
            })
            .await
            .expect("get_or_load")
    };
    let first = load(caches[0].clone(), calls.clone()).await;
    assert_eq!(
        (first.value.is_none(), first.source),
        (true, Source::Loaded)
    );
    clock.advance(Duration::from_secs(5) - Duration::from_micros(1));
    let other = load(caches[1].clone(), calls.clone()).await;
    assert_eq!(
        (other.value.is_none(), other.source),
        (true, Source::Remote)
    );
    assert!(matches!(
        caches[1].get("ghost").await.expect("get"),
        Lookup::Negative { .. }
    ));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(caches[1].stats().negative_hits >= 2);
    clock.advance(Duration::from_micros(1));
    assert!(caches[1].get("ghost").await.expect("get").is_miss());
    let again = load(caches[1].clone(), calls.clone()).await;
    assert_eq!(again.source, Source::Loaded);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Within stale-while-revalidate a stale value is served and exactly one background load
/// refreshes it; the window ends at its edge.
async fn stale_while_revalidate_serves_stale_and_refreshes_once(backend: CacheBackend) {
    let policy = CachePolicy::builder(Duration::from_secs(10))
        .jitter(0.0)
        .stale_while_revalidate(Duration::from_secs(5))
        .build()
        .expect("policy");
    let (clock, _fleet, caches) = replicas(backend, policy, 2).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Gate::new();
    let loader = |value: &'static str| {
        let calls = calls.clone();
        let gate = gate.clone();
        move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            gate.wait().await;
            Ok::<_, io::Error>(Loaded::found(value.to_string()))
        }
    };
    gate.open();
    caches[0]
        .get_or_load_with("k", loader("v1"))
        .await
        .expect("load");
    let gate = Gate::new();
    let loader = |value: &'static str| {
        let calls = calls.clone();
        let gate = gate.clone();
        move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            gate.wait().await;
            Ok::<_, io::Error>(Loaded::found(value.to_string()))
        }
    };
    clock.advance(Duration::from_secs(10) - Duration::from_micros(1));
    let fresh = caches[0]
        .get_or_load_with("k", loader("unused"))
        .await
        .expect("fresh");
    assert_ne!(fresh.source, Source::Stale);
    clock.advance(Duration::from_micros(1));
    for c in caches.iter().chain(caches.iter()).chain(caches.iter()) {
        let f = c.get_or_load_with("k", loader("v2")).await.expect("stale");
        assert_eq!(f.source, Source::Stale);
        assert_eq!(f.value.as_deref().map(String::as_str), Some("v1"));
    }
    poll("the background load", || {
        let calls = calls.clone();
        async move { calls.load(Ordering::SeqCst) >= 2 }
    })
    .await;
    gate.open();
    poll("the refreshed value", || {
        let c = caches[1].clone();
        async move { matches!(c.get("k").await.expect("get"), Lookup::Hit { ref value, .. } if **value == "v2") }
    })
    .await;
    // One initial load and one refresh across both replicas (the other replica's refresh
    // either waited for the lease and found the fill, or found the fill at once).
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let stale: u64 = caches.iter().map(|c| c.stats().stale_served).sum();
    assert!(stale >= 6, "{stale}");

    // The window's end, with `get` (which never refreshes).
    caches[0].set("edge", &"e".to_string()).await.expect("set");
    clock.advance(Duration::from_secs(15) - Duration::from_micros(1));
    assert!(matches!(
        caches[0].get("edge").await.expect("get"),
        Lookup::Stale { .. }
    ));
    clock.advance(Duration::from_micros(1));
    assert!(caches[0].get("edge").await.expect("get").is_miss());
}

/// Within stale-if-error a stale value is served when the loader fails, to the window's edge.
async fn stale_if_error_serves_stale_within_its_window(backend: CacheBackend) {
    let policy = CachePolicy::builder(Duration::from_secs(10))
        .jitter(0.0)
        .stale_if_error(Duration::from_secs(30))
        .build()
        .expect("policy");
    let (clock, _fleet, caches) = replicas(backend, policy, 1).await;
    let cache = &caches[0];
    cache
        .get_or_load("k", || async { Ok::<_, io::Error>(Some("v1".to_string())) })
        .await
        .expect("load");
    let failing = || async { Err::<Loaded<String>, _>(io::Error::other("down")) };
    clock.advance(Duration::from_secs(10));
    let f = cache
        .get_or_load_with("k", failing)
        .await
        .expect("stale served");
    assert_eq!(f.source, Source::StaleIfError);
    assert_eq!(f.value.as_deref().map(String::as_str), Some("v1"));
    // Not served as stale-while-revalidate: `get` says miss.
    assert!(cache.get("k").await.expect("get").is_miss());
    clock.advance(Duration::from_secs(30) - Duration::from_micros(1));
    let f = cache
        .get_or_load_with("k", failing)
        .await
        .expect("stale served");
    assert_eq!(f.source, Source::StaleIfError);
    clock.advance(Duration::from_micros(1));
    let err = cache
        .get_or_load_with("k", failing)
        .await
        .expect_err("past the window");
    assert!(matches!(err, CacheError::Load(_)));
    assert_eq!(cache.stats().load_errors, 3);
    assert_eq!(cache.stats().stale_served, 2);
}

/// XFetch refreshes before expiry as it nears, and not long before.
async fn xfetch_refreshes_early_when_due(backend: CacheBackend) {
    let policy = CachePolicy::builder(Duration::from_secs(60))
        .jitter(0.0)
        .xfetch(1.0)
        .build()
        .expect("policy");
    let (clock, fleet, caches) = replicas(backend, policy, 1).await;
    let cache = &caches[0];
    let calls = Arc::new(AtomicUsize::new(0));
    {
        let clock = clock.clone();
        let calls = calls.clone();
        cache
            .get_or_load("k", move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                // The load takes 1 s: XFetch's δ.
                clock.advance(Duration::from_secs(1));
                Ok::<_, io::Error>(Some("v1".to_string()))
            })
            .await
            .expect("load");
    }
    let raw = fleet.stores[0]
        .get(&cache.store_key("k"))
        .await
        .expect("raw get")
        .expect("stored");
    let first = Envelope::decode(&raw).expect("envelope");
    assert_eq!(first.load_micros, 1_000_000);
    let refresh = || {
        let calls = calls.clone();
        move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, io::Error>(Some("v2".to_string()))
        }
    };
    // 60 s left with δ = 1 s, β = 1: due with probability e^-60.
    for _ in 0..20 {
        cache.get_or_load("k", refresh()).await.expect("fresh");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // 1 µs left: due with probability 1 − e^-1e6·… ≈ 1.
    clock.set(Timestamp::from_micros(first.fresh_until.as_micros() - 1));
    let f = cache.get_or_load("k", refresh()).await.expect("fresh");
    assert_eq!(f.as_deref().map(String::as_str), Some("v1"));
    poll("the early refresh", || {
        let c = cache.clone();
        async move { matches!(c.get("k").await.expect("get"), Lookup::Hit { ref value, .. } if **value == "v2") }
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Bytes that are not an entry of this cache are a miss and a decode error, never an error.
async fn undecodable_entries_are_misses(backend: CacheBackend) {
    let (clock, fleet, caches) = replicas(backend, ttl_policy(60), 1).await;
    let cache = &caches[0];
    let store = &fleet.stores[0];
    let ttl = Duration::from_secs(60);
    // Another program's bytes.
    store
        .set(&cache.store_key("garbage"), b"\x01{not an entry", ttl, None)
        .await
        .expect("raw set");
    assert!(cache.get("garbage").await.expect("get").is_miss());
    assert_eq!(cache.stats().decode_errors, 1);
    // An entry written by another codec.
    let json = Cache::<String, _>::builder(store.clone(), "items")
        .codec(JsonCodec)
        .clock(Arc::new(clock.clone()))
        .build()
        .await
        .expect("json cache");
    json.set("json", &"j".to_string()).await.expect("set");
    assert!(cache.get("json").await.expect("get").is_miss());
    assert_eq!(cache.stats().decode_errors, 2);
    // A corrupt compressed payload.
    let now = clock.now();
    let versions = store
        .tag_versions(&["ns:items".to_string()])
        .await
        .expect("versions");
    let bad = Envelope {
        flags: EnvelopeFlags {
            negative: false,
            compressed: true,
            codec: 0,
        },
        fresh_until: now.saturating_add(ttl),
        stale_until: now.saturating_add(ttl),
        load_micros: 0,
        tags: vec![("ns:items".into(), versions[0])],
        payload: vec![0xff, 0xff, 0xff, 0x0f, 1, 2, 3],
    };
    store
        .set(
            &cache.store_key("lz4"),
            &bad.encode().expect("encode"),
            ttl,
            None,
        )
        .await
        .expect("raw set");
    assert!(cache.get("lz4").await.expect("get").is_miss());
    assert_eq!(cache.stats().decode_errors, 3);
    // A load replaces the garbage.
    let v = cache
        .get_or_load("garbage", || async {
            Ok::<_, io::Error>(Some("ok".to_string()))
        })
        .await
        .expect("load");
    assert_eq!(v.as_deref().map(String::as_str), Some("ok"));
    assert_eq!(value_of(cache, "garbage").await.as_deref(), Some("ok"));
}

/// Empty and oversized keys are invalid input, before the store is called.
async fn bad_keys_are_invalid_input(backend: CacheBackend) {
    let (_clock, _fleet, caches) = replicas(backend, ttl_policy(60), 1).await;
    let cache = &caches[0];
    let huge = "x".repeat(statehouse_core::cache::MAX_CACHE_KEY_BYTES);
    for key in ["", huge.as_str()] {
        assert!(
            cache
                .get(key)
                .await
                .expect_err("invalid")
                .is_invalid_input()
        );
        assert!(
            cache
                .set(key, &"v".to_string())
                .await
                .expect_err("invalid")
                .is_invalid_input()
        );
        assert!(
            cache
                .delete(key)
                .await
                .expect_err("invalid")
                .is_invalid_input()
        );
        let err = cache
            .get_or_load(key, || async { Ok::<_, io::Error>(Some("v".to_string())) })
            .await
            .expect_err("invalid");
        assert!(err.store_error().is_some_and(|e| e.is_invalid_input()));
    }
    assert!(
        cache
            .set_with(
                "k",
                &"v".to_string(),
                &SetOptions::default().tag("ns:other")
            )
            .await
            .expect_err("reserved tag")
            .is_invalid_input()
    );
    assert!(
        cache
            .invalidate_tag("")
            .await
            .expect_err("empty tag")
            .is_invalid_input()
    );
    assert_eq!(cache.stats().store_errors, 0);
}

/// Tags, namespaces and prefixes invalidate on every replica.
async fn tags_namespaces_and_prefixes_invalidate_everywhere(backend: CacheBackend) {
    let (_clock, _fleet, caches) = replicas(backend, ttl_policy(60), 2).await;
    let (a, b) = (&caches[0], &caches[1]);
    let v = "v".to_string();
    a.set_with("tagged", &v, &SetOptions::default().tag("team:7"))
        .await
        .expect("set");
    for key in ["plain", "p:1", "p:2", "q"] {
        a.set(key, &v).await.expect("set");
    }
    let near_hit = |c: Cache<String>, key: &'static str| async move {
        matches!(
            c.get(key).await.expect("get"),
            Lookup::Hit {
                tier: Tier::Near,
                ..
            }
        )
    };
    for key in ["tagged", "plain", "p:1", "p:2", "q"] {
        poll("a near-cache hit", || near_hit(b.clone(), key)).await;
    }
    a.invalidate_tag("team:7").await.expect("bump");
    assert!(a.get("tagged").await.expect("get").is_miss());
    poll("the tag invalidation", || {
        let b = b.clone();
        async move { b.get("tagged").await.expect("get").is_miss() }
    })
    .await;
    assert!(b.get("plain").await.expect("get").is_hit());

    assert_eq!(a.purge_prefix("p:").await.expect("purge"), 2);
    assert!(a.get("p:1").await.expect("get").is_miss());
    poll("the purge", || {
        let b = b.clone();
        async move {
            b.get("p:1").await.expect("get").is_miss() && b.get("p:2").await.expect("get").is_miss()
        }
    })
    .await;
    assert!(b.get("q").await.expect("get").is_hit());

    a.invalidate_namespace().await.expect("bump");
    assert!(a.get("plain").await.expect("get").is_miss());
    poll("the namespace invalidation", || {
        let b = b.clone();
        async move {
            b.get("plain").await.expect("get").is_miss() && b.get("q").await.expect("get").is_miss()
        }
    })
    .await;
    // New entries of the namespace are valid again.
    a.set("plain", &v).await.expect("set");
    assert!(b.get("plain").await.expect("get").is_hit());
}

/// A store wrapper that can drop invalidation messages on the way to its subscribers: a lost
/// Pub/Sub message.
#[derive(Debug)]
struct Lossy {
    dropping: Arc<AtomicBool>,
    dropped: Arc<AtomicUsize>,
}

struct LossySink {
    inner: Arc<dyn InvalidationSink>,
    dropping: Arc<AtomicBool>,
    dropped: Arc<AtomicUsize>,
}

impl InvalidationSink for LossySink {
    fn on_invalidation(&self, message: &Invalidation) {
        if self.dropping.load(Ordering::SeqCst) {
            self.dropped.fetch_add(1, Ordering::SeqCst);
        } else {
            self.inner.on_invalidation(message);
        }
    }
    fn on_channel_down(&self) {
        self.inner.on_channel_down();
    }
    fn on_channel_up(&self) {
        self.inner.on_channel_up();
    }
}

#[async_trait]
impl Intercept for Lossy {
    async fn subscribe(
        &self,
        inner: &dyn CacheStore,
        sink: Arc<dyn InvalidationSink>,
    ) -> statehouse::Result<InvalidationSubscription> {
        inner
            .subscribe(Arc::new(LossySink {
                inner: sink,
                dropping: self.dropping.clone(),
                dropped: self.dropped.clone(),
            }))
            .await
    }
}

/// Makes `b` (over a lossy store) hold a stale `v1` in its near cache after a lost
/// invalidation of `v2`; returns the lossy store's counters.
async fn stale_after_a_lost_message(
    clock: &ManualClock,
    stores: &[Arc<dyn CacheStore>],
) -> (Cache<String>, Cache<String>) {
    let dropping = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(AtomicUsize::new(0));
    let lossy = Arc::new(Intercepted {
        inner: stores[1].clone(),
        intercept: Lossy {
            dropping: dropping.clone(),
            dropped: dropped.clone(),
        },
    });
    let a = cache_over(stores[0].clone(), clock, ttl_policy(60)).await;
    let b = cache_over(lossy, clock, ttl_policy(60)).await;
    a.set("k", &"v1".to_string()).await.expect("set");
    poll("a near-cache hit of v1", || {
        let b = b.clone();
        async move {
            matches!(b.get("k").await.expect("get"), Lookup::Hit { tier: Tier::Near, ref value } if **value == "v1")
        }
    })
    .await;
    dropping.store(true, Ordering::SeqCst);
    a.set("k", &"v2".to_string()).await.expect("set");
    poll("the lost message", || {
        let d = dropped.clone();
        async move { d.load(Ordering::SeqCst) >= 1 }
    })
    .await;
    dropping.store(false, Ordering::SeqCst);
    // The near cache has not heard of v2.
    assert_eq!(value_of(&b, "k").await.as_deref(), Some("v1"));
    (a, b)
}

/// A lost channel flushes the near cache (down and up again), so a change whose message was
/// lost is seen afterwards. Embedded: `reset_channel`.
async fn embedded_channel_reset_flushes_the_near_cache() {
    let clock = start();
    let fleet = CacheBackend::Embedded.fleet(&clock, 2).await;
    let (_a, b) = stale_after_a_lost_message(&clock, &fleet.stores).await;
    let flushes = b.stats().l1_flushes;
    fleet.embedded.as_ref().expect("embedded").reset_channel();
    assert_eq!(b.stats().l1_flushes, flushes + 2);
    assert!(b.near_cache_live());
    assert_eq!(value_of(&b, "k").await.as_deref(), Some("v2"));
}

macro_rules! scenarios {
    ($backend:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name($backend).await
            }
        )*
    };
}

macro_rules! every_scenario {
    ($backend:expr) => {
        scenarios!($backend;
            stampede_loads_once,
            writes_invalidate_other_replicas,
            a_fill_voided_by_a_delete_is_refused,
            a_fill_overtaken_by_a_tag_invalidation_is_not_cached,
            a_caller_after_its_own_write_does_not_join_an_older_load,
            a_read_overtaken_by_an_invalidation_is_not_kept,
            a_dead_holders_lease_expires,
            a_cancelled_load_releases_its_lease,
            a_loader_error_is_returned_and_not_cached,
            ttl_jitter_spreads_expiry,
            not_found_is_cached_for_the_negative_ttl,
            stale_while_revalidate_serves_stale_and_refreshes_once,
            stale_if_error_serves_stale_within_its_window,
            xfetch_refreshes_early_when_due,
            undecodable_entries_are_misses,
            bad_keys_are_invalid_input,
            tags_namespaces_and_prefixes_invalidate_everywhere,
        );
    };
}

mod embedded {
    use super::*;
    every_scenario!(CacheBackend::Embedded);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn channel_reset_flushes_the_near_cache() {
        super::embedded_channel_reset_flushes_the_near_cache().await
    }
}

mod standalone {
    use super::*;
    every_scenario!(CacheBackend::Redis(Deployment::Standalone));
}

mod cluster {
    use super::*;
    every_scenario!(CacheBackend::Redis(Deployment::Cluster));
}

mod standalone_tls {
    use super::*;
    every_scenario!(CacheBackend::Redis(Deployment::StandaloneTls));
}

mod cluster_tls {
    use super::*;
    every_scenario!(CacheBackend::Redis(Deployment::ClusterTls));
}

/// Redis only: a killed Pub/Sub connection and a dead server.
mod redis_outages {
    use super::*;
    use statehouse::{RedisStore, RedisTopology, TimeSource};
    use statehouse_testkit::{RedisServer, raw_command};

    async fn connect(server: &RedisServer, prefix: &str, clock: &ManualClock) -> RedisStore {
        RedisStore::builder(RedisTopology::Standalone(server.url()))
            .prefix(prefix)
            .time_source(TimeSource::Caller(Arc::new(clock.clone())))
            .skew_allowance(Duration::from_secs(120))
            .call_timeout(Duration::from_millis(500))
            .connect()
            .await
            .expect("connect")
    }

    /// Killing the Pub/Sub connections makes every replica flush its near cache (down, then up
    /// once resubscribed), so a change whose message was lost is seen afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_subscription_flushes_the_near_cache() {
        let server = RedisServer::start().expect("private redis");
        let clock = start();
        let mut stores: Vec<Arc<dyn CacheStore>> = Vec::new();
        for _ in 0..2 {
            stores.push(Arc::new(
                connect(&server, "outage:", &clock).await.cache_store(),
            ));
        }
        let (a, b) = stale_after_a_lost_message(&clock, &stores).await;
        let (a_flushes, b_flushes) = (a.stats().l1_flushes, b.stats().l1_flushes);
        raw_command(server.port(), &["CLIENT", "KILL", "TYPE", "pubsub"]).expect("client kill");
        poll("both replicas to flush and resubscribe", || {
            let (a, b) = (a.clone(), b.clone());
            async move {
                a.stats().l1_flushes >= a_flushes + 2
                    && b.stats().l1_flushes >= b_flushes + 2
                    && a.near_cache_live()
                    && b.near_cache_live()
            }
        })
        .await;
        assert_eq!(value_of(&b, "k").await.as_deref(), Some("v2"));
    }

    /// With the store down, `get_or_load` still serves the loader's value (not cached, counted
    /// as a store error); `get` reports the outage; a few failures open the circuit breaker,
    /// and once Redis is back and `open_for` has passed, a probe closes it and the cache reads
    /// and writes the store again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_loader_serves_while_the_store_is_down() {
        let mut server = RedisServer::start().expect("private redis");
        let clock = start();
        let store: Arc<dyn CacheStore> =
            Arc::new(connect(&server, "down:", &clock).await.cache_store());
        let cache = Cache::<String>::builder(store, "items")
            .policy(ttl_policy(60))
            .clock(Arc::new(clock.clone()))
            .deadline(Duration::from_millis(300))
            .build()
            .await
            .expect("build");
        server.kill();
        let from_the_database = || {
            cache.get_or_load_with("k", || async {
                Ok::<_, io::Error>(Loaded::found("from the database".to_string()))
            })
        };
        let began = Instant::now();
        let f = from_the_database().await.expect("served by the loader");
        assert_eq!(f.source, Source::Bypassed);
        assert_eq!(
            f.value.as_deref().map(String::as_str),
            Some("from the database")
        );
        assert!(
            began.elapsed() < Duration::from_secs(3),
            "{:?}",
            began.elapsed()
        );
        assert!(cache.stats().store_errors >= 1);
        assert_eq!(cache.stats().loads, 1);
        let err = cache.get("k").await.expect_err("store down");
        assert!(err.is_unavailable(), "{err}");

        // A few more failures open the breaker: the store is no longer called, and the loader
        // still serves.
        for _ in 0..3 {
            let _ = cache.get("k").await;
        }
        let stats = cache.stats();
        assert_eq!(stats.breaker_state, BreakerState::Open, "{stats:?}");
        assert_eq!(stats.breaker_opened, 1);
        let f = from_the_database().await.expect("served by the loader");
        assert_eq!(f.source, Source::Bypassed);

        // Redis comes back: once `open_for` (1 s by default) has passed on the cache's clock, a
        // probe finds it and the cache uses the store again.
        let _server = tokio::task::spawn_blocking(move || {
            server.restart().expect("restart");
            server
        })
        .await
        .expect("restart task");
        poll("the cache to use the store again", || {
            clock.advance(Duration::from_secs(1));
            let cache = cache.clone();
            async move { cache.get("k").await.is_ok() }
        })
        .await;
        assert_eq!(cache.stats().breaker_state, BreakerState::Closed);
        // The write connection finds its socket broken by the restart on its first command,
        // and reconnects: a write succeeds within a few tries.
        poll("a write to succeed", || {
            let cache = cache.clone();
            async move { cache.set("k", &"cached".to_string()).await.is_ok() }
        })
        .await;
        assert_eq!(value_of(&cache, "k").await.as_deref(), Some("cached"));
    }
}
