//! The typed cache's in-process behaviour on the embedded store: single flight (a cancelled
//! leader, a shared error), the loader's choices, compression, the near cache's bounds and the
//! store deadline. The cross-replica scenarios on every backend are in `cache_scenarios.rs`.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use statehouse::{
    BreakerState, Cache, CachePolicy, CacheStore, CircuitBreakerConfig, EmbeddedCacheStore, Loaded,
    Lookup, ManualClock, NearCacheConfig, SetOptions, Source, Tier, Timestamp,
};
use statehouse_core::cache::Envelope;
use statehouse_testkit::cache_intercept::{Intercept, Intercepted};
use tokio::sync::watch;

const EVENT_WAIT: Duration = Duration::from_secs(10);

fn clock() -> ManualClock {
    ManualClock::new(Timestamp::from_micros(1_800_000_000_000_000))
}

fn store(clock: &ManualClock) -> Arc<EmbeddedCacheStore> {
    Arc::new(
        EmbeddedCacheStore::builder()
            .clock(clock.clone())
            .build()
            .expect("store"),
    )
}

fn policy(secs: u64) -> CachePolicy {
    CachePolicy::builder(Duration::from_secs(secs))
        .jitter(0.0)
        .build()
        .expect("policy")
}

async fn cache(store: Arc<dyn CacheStore>, clock: &ManualClock) -> Cache<String> {
    Cache::<String>::builder(store, "t")
        .policy(policy(60))
        .clock(Arc::new(clock.clone()))
        .build()
        .await
        .expect("cache")
}

async fn poll<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let began = Instant::now();
    while !done().await {
        assert!(began.elapsed() < EVENT_WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

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
        let _ = self.0.subscribe().wait_for(|o| *o).await;
    }
}

/// A leader whose future is dropped hands the load to a waiter, which loads with its own
/// loader instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_takes_over_from_a_cancelled_leader() {
    let clock = clock();
    let cache = cache(store(&clock), &clock).await;
    let leader = {
        let c = cache.clone();
        tokio::spawn(async move {
            c.get_or_load("k", || async {
                std::future::pending::<()>().await;
                Ok::<_, io::Error>(Some("leader".to_string()))
            })
            .await
        })
    };
    poll("the leader's load", || {
        let c = cache.clone();
        async move { c.stats().loads == 1 }
    })
    .await;
    let waiter = {
        let c = cache.clone();
        tokio::spawn(async move {
            c.get_or_load_with("k", || async {
                Ok::<_, io::Error>(Loaded::found("waiter".to_string()))
            })
            .await
        })
    };
    poll("the waiter", || {
        let c = cache.clone();
        async move { c.stats().coalesced_waiters == 1 }
    })
    .await;
    leader.abort();
    let fetched = tokio::time::timeout(EVENT_WAIT, waiter)
        .await
        .expect("the waiter took over")
        .expect("task")
        .expect("load");
    assert_eq!(fetched.source, Source::Loaded);
    assert_eq!(fetched.value.as_deref().map(String::as_str), Some("waiter"));
    assert_eq!(cache.stats().loads, 2);
}

/// One failed load answers every caller that waited for it: the loader runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_share_the_leaders_error() {
    let clock = clock();
    let cache = cache(store(&clock), &clock).await;
    let gate = Gate::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let c = cache.clone();
        let gate = gate.clone();
        let calls = calls.clone();
        tasks.push(tokio::spawn(async move {
            c.get_or_load("k", move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                gate.wait().await;
                Err::<Option<String>, _>(io::Error::other("boom"))
            })
            .await
        }));
    }
    poll("the waiters", || {
        let c = cache.clone();
        async move { c.stats().coalesced_waiters == 19 }
    })
    .await;
    gate.open();
    for t in tasks {
        let err = t.await.expect("task").expect_err("error");
        assert_eq!(
            err.load_error().map(|e| e.to_string()).as_deref(),
            Some("boom")
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().load_errors, 1);
}

/// A caller that waits for a background refresh which then fails gets the stale-if-error
/// value, as the caller who ran the failed load would: not the loader's error. Both with the
/// stale value in this replica's near cache and only in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_a_failed_refresh_is_served_stale_if_error() {
    for near in [true, false] {
        let clock = clock();
        let builder = Cache::<String>::builder(store(&clock), "t")
            .policy(
                CachePolicy::builder(Duration::from_secs(10))
                    .jitter(0.0)
                    .stale_while_revalidate(Duration::from_secs(1))
                    .stale_if_error(Duration::from_secs(3600))
                    .build()
                    .expect("policy"),
            )
            .clock(Arc::new(clock.clone()));
        let cache = if near {
            builder
        } else {
            builder.without_near_cache()
        }
        .build()
        .await
        .expect("cache");
        cache.set("k", &"v1".to_string()).await.expect("set");
        // Within stale-while-revalidate: served stale, and a refresh starts in the background;
        // the backend hangs, then fails.
        clock.advance(Duration::from_millis(10_500));
        let gate = Gate::new();
        let first = {
            let gate = gate.clone();
            cache
                .get_or_load_with("k", move || async move {
                    gate.wait().await;
                    Err::<Loaded<String>, _>(io::Error::other("backend down"))
                })
                .await
                .expect("stale")
        };
        assert_eq!(first.source, Source::Stale, "near cache: {near}");
        // Past stale-while-revalidate: a new caller joins the refresh and waits for it.
        clock.advance(Duration::from_secs(1));
        let waiter = {
            let c = cache.clone();
            tokio::spawn(async move {
                c.get_or_load_with("k", || async {
                    Err::<Loaded<String>, _>(io::Error::other("not called"))
                })
                .await
            })
        };
        poll("the waiter", || {
            let c = cache.clone();
            async move { c.stats().coalesced_waiters == 1 }
        })
        .await;
        gate.open();
        let fetched = tokio::time::timeout(EVENT_WAIT, waiter)
            .await
            .expect("answered")
            .expect("task")
            .unwrap_or_else(|e| panic!("near cache {near}: the refresh's error, not stale: {e}"));
        assert_eq!(fetched.source, Source::StaleIfError, "near cache: {near}");
        assert_eq!(fetched.value.as_deref().map(String::as_str), Some("v1"));
        assert_eq!(cache.stats().loads, 1, "the waiter did not load again");
    }
}

/// The loader decides: its own TTL, tags, or no caching at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loader_chooses_ttl_tags_and_whether_to_store() {
    let clock = clock();
    let cache = cache(store(&clock), &clock).await;
    let f = cache
        .get_or_load_with("private", || async {
            Ok::<_, io::Error>(Loaded::found("p".to_string()).do_not_store())
        })
        .await
        .expect("load");
    assert_eq!(f.source, Source::Loaded);
    assert!(cache.get("private").await.expect("get").is_miss());

    cache
        .get_or_load_with("short", || async {
            Ok::<_, io::Error>(
                Loaded::found("s".to_string())
                    .ttl(Duration::from_secs(2))
                    .tag("group:1"),
            )
        })
        .await
        .expect("load");
    assert!(cache.get("short").await.expect("get").is_hit());
    cache.invalidate_tag("group:1").await.expect("bump");
    assert!(cache.get("short").await.expect("get").is_miss());

    cache
        .get_or_load_with("short2", || async {
            Ok::<_, io::Error>(Loaded::found("s".to_string()).ttl(Duration::from_secs(2)))
        })
        .await
        .expect("load");
    clock.advance(Duration::from_secs(2) - Duration::from_micros(1));
    assert!(cache.get("short2").await.expect("get").is_hit());
    clock.advance(Duration::from_micros(1));
    assert!(cache.get("short2").await.expect("get").is_miss());
}

/// Large values are stored LZ4-compressed and read back; small and incompressible ones as
/// they are; compression off stores everything plain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_are_compressed() {
    let clock = clock();
    let s = store(&clock);
    let cache = cache(s.clone(), &clock).await;
    let big = "statehouse ".repeat(1000);
    cache.set("big", &big).await.expect("set");
    cache.set("small", &"tiny".to_string()).await.expect("set");
    let raw = |key: &'static str| {
        let s = s.clone();
        let c = cache.clone();
        async move {
            let bytes = s
                .get(&c.store_key(key))
                .await
                .expect("get")
                .expect("stored");
            Envelope::decode(&bytes).expect("envelope")
        }
    };
    let e = raw("big").await;
    assert!(e.flags.compressed);
    assert!(e.payload.len() < big.len() / 5, "{}", e.payload.len());
    assert!(!raw("small").await.flags.compressed);
    // A fresh replica (empty near cache) decompresses.
    let other = Cache::<String>::builder(s.clone(), "t")
        .clock(Arc::new(clock.clone()))
        .without_compression()
        .build()
        .await
        .expect("cache");
    assert_eq!(
        other
            .get("big")
            .await
            .expect("get")
            .value()
            .map(|v| v.len()),
        Some(big.len())
    );
    other.set("big", &big).await.expect("set");
    assert!(!raw("big").await.flags.compressed);
}

/// The near cache stays within its byte bound, counts evictions, and keeps nothing longer
/// than its `max_ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_near_cache_is_bounded_in_bytes_and_time() {
    let clock = clock();
    let s = store(&clock);
    let cache = Cache::<String>::builder(s, "t")
        .policy(policy(600))
        .clock(Arc::new(clock.clone()))
        .near_cache(NearCacheConfig {
            max_bytes: 64 * 1024,
            max_ttl: Duration::from_secs(5),
        })
        .build()
        .await
        .expect("cache");
    let value = "x".repeat(500);
    for i in 0..1000 {
        let key = format!("k{i}");
        cache.set(&key, &value).await.expect("set");
        cache.get(&key).await.expect("get");
    }
    let held = cache.near_cache_len();
    // About 640 bytes an entry: at most about 100 fit in 64 KiB.
    assert!(held > 20 && held <= 110, "{held}");
    assert!(cache.stats().l1_evictions >= 890);
    let near = |key: &'static str| {
        let c = cache.clone();
        async move { c.get(key).await.expect("get").tier() == Some(Tier::Near) }
    };
    cache.get("k999").await.expect("get");
    assert!(near("k999").await);
    clock.advance(Duration::from_secs(5));
    // Past the near cache's max_ttl: read from the store again (still fresh there).
    assert!(!near("k999").await);
}

/// A near-cache entry never outlives the stored entry it copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_cache_entry_ends_with_its_stored_entry() {
    let clock = clock();
    let cache = cache(store(&clock), &clock).await;
    cache
        .set_with(
            "k",
            &"v".to_string(),
            &SetOptions::default().ttl(Duration::from_secs(3)),
        )
        .await
        .expect("set");
    cache.get("k").await.expect("get");
    assert!(matches!(
        cache.get("k").await.expect("get"),
        Lookup::Hit {
            tier: Tier::Near,
            ..
        }
    ));
    clock.advance(Duration::from_secs(3));
    assert!(cache.get("k").await.expect("get").is_miss());
}

/// A store that keeps missing the deadline opens the breaker after `failure_threshold` calls:
/// from then on no call reaches it (`get` fails at once, `get_or_load` goes straight to the
/// loader, near-cache hits go on), until `open_for` has passed on the cache's clock and one
/// call probes it; a successful probe closes the breaker.
#[tokio::test(start_paused = true)]
async fn a_failing_store_opens_the_breaker_until_a_probe_succeeds() {
    let clock = clock();
    let slow = counted_store(&clock, false);
    let cache = Cache::<String>::builder(slow.clone(), "t")
        .clock(Arc::new(clock.clone()))
        .deadline(Duration::from_millis(50))
        .circuit_breaker(CircuitBreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(5),
        })
        .build()
        .await
        .expect("cache");
    cache.set("near", &"in L1".to_string()).await.expect("set");
    // A read fills the near cache.
    assert!(cache.get("near").await.expect("get").is_hit());
    assert_eq!(cache.near_cache_len(), 1);
    let calls_before = slow.intercept.calls.load(Ordering::SeqCst);
    slow.intercept.slow.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let err = cache.get("k").await.expect_err("deadline");
        assert!(err.is_unavailable(), "{err}");
    }
    assert_eq!(
        slow.intercept.calls.load(Ordering::SeqCst),
        calls_before + 3
    );
    let stats = cache.stats();
    assert_eq!(stats.breaker_state, BreakerState::Open, "{stats:?}");
    assert_eq!(stats.breaker_opened, 1);

    // Open: the store is not called.
    store_is_out(&cache).await;
    let near = cache.get("near").await.expect("a near-cache hit");
    assert_eq!(near.value().map(|v| v.as_str()), Some("in L1"));
    assert_eq!(
        slow.intercept.calls.load(Ordering::SeqCst),
        calls_before + 3,
        "store not called"
    );

    // After `open_for`, one probe; the store answers again, so the breaker closes.
    slow.intercept.slow.store(false, Ordering::SeqCst);
    clock.advance(Duration::from_secs(5));
    assert!(cache.get("k").await.expect("probe").is_miss());
    assert_eq!(
        slow.intercept.calls.load(Ordering::SeqCst),
        calls_before + 4
    );
    assert_eq!(cache.stats().breaker_state, BreakerState::Closed);
    assert!(cache.get("k").await.expect("get").is_miss());
    assert_eq!(
        slow.intercept.calls.load(Ordering::SeqCst),
        calls_before + 5
    );
}

/// The store is out of the picture: `get` of `k` fails as unavailable, and `get_or_load` of
/// `k` serves its loader's value uncached.
async fn store_is_out(cache: &Cache<String>) {
    let err = cache.get("k").await.expect_err("the store is out");
    assert!(err.is_unavailable(), "{err}");
    let f = cache
        .get_or_load_with("k", || async {
            Ok::<_, io::Error>(Loaded::found("db".to_string()))
        })
        .await
        .expect("bypassed");
    assert_eq!(f.source, Source::Bypassed);
}

/// An embedded store behind [`Counted`], slow from the start when `slow`.
fn counted_store(clock: &ManualClock, slow: bool) -> Arc<Intercepted<Counted>> {
    Arc::new(Intercepted {
        inner: store(clock),
        intercept: Counted {
            slow: AtomicBool::new(slow),
            calls: AtomicUsize::new(0),
        },
    })
}

/// A store that answers `get` only after a long time while `slow` (the cache's deadline cuts
/// it), counting the reads that reach it.
#[derive(Debug)]
struct Counted {
    slow: AtomicBool,
    calls: AtomicUsize,
}

#[async_trait]
impl Intercept for Counted {
    async fn get(&self, inner: &dyn CacheStore, key: &str) -> statehouse::Result<Option<Vec<u8>>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.slow.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        inner.get(key).await
    }
}

/// A store slower than the deadline is an outage: `get` reports it, `get_or_load` serves the
/// loader's value uncached.
#[tokio::test(start_paused = true)]
async fn a_store_past_the_deadline_is_bypassed() {
    let clock = clock();
    let slow = counted_store(&clock, true);
    let cache = Cache::<String>::builder(slow.clone(), "t")
        .clock(Arc::new(clock.clone()))
        .deadline(Duration::from_millis(50))
        .build()
        .await
        .expect("cache");
    store_is_out(&cache).await;
    assert_eq!(cache.stats().store_errors, 2);
    slow.slow.store(false, Ordering::SeqCst);
    assert!(
        cache.get("k").await.expect("get").is_miss(),
        "cached while bypassed"
    );
}

/// Stats count what happened, tier by tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_each_tier() {
    let clock = clock();
    let s = store(&clock);
    let a = cache(s.clone(), &clock).await;
    a.set("k", &"v".to_string()).await.expect("set");
    assert!(a.get("missing").await.expect("get").is_miss());
    assert_eq!(a.get("k").await.expect("get").tier(), Some(Tier::Remote));
    assert_eq!(a.get("k").await.expect("get").tier(), Some(Tier::Near));
    let st = a.stats();
    assert_eq!((st.l2_hits, st.l2_misses), (1, 1));
    assert_eq!((st.l1_hits, st.l1_misses), (1, 2));
    assert_eq!(st.invalidations_sent, 1);
    assert!(st.invalidations_received >= 1);
    // Own writes are dropped from the near cache before returning; the message does it again.
    s.delete(&a.store_key("k")).await.expect("raw delete");
    assert!(a.get("k").await.expect("get").is_miss());
}
