//! Three replicas of a service share one cache through Redis (or one embedded store).
//!
//! Each replica is a `Cache` on its own `RedisStore` connection, as separate processes would
//! be. 300 concurrent requests for one cold key across the replicas run the "database" loader
//! once; a write through one replica then reaches the near caches of the other two through
//! the invalidation channel, and the time it took is printed.
//!
//! ```text
//! cargo run -p statehouse --example cache                          # redis://127.0.0.1:6379
//! cargo run -p statehouse --example cache -- redis://10.0.0.5:6379
//! cargo run -p statehouse --example cache -- --embedded            # one shared store
//! ```

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use statehouse::{Cache, CachePolicy, CacheStore, EmbeddedCacheStore, RedisStore};
use tokio::task::JoinSet;

const REPLICAS: usize = 3;
const REQUESTS: usize = 300;
const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

#[tokio::main]
async fn main() -> ExitCode {
    let mut embedded = false;
    let mut url = None;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--embedded" => embedded = true,
            "-h" | "--help" => {
                println!("usage: cache [REDIS_URL] [--embedded]   (default: {DEFAULT_URL})");
                return ExitCode::SUCCESS;
            }
            _ if arg.starts_with('-') => {
                eprintln!("cache: unknown option {arg:?} (try --help)");
                return ExitCode::from(2);
            }
            _ => url = Some(arg),
        }
    }
    let stores = if embedded {
        let store: Arc<dyn CacheStore> = Arc::new(EmbeddedCacheStore::new());
        vec![store; REPLICAS]
    } else {
        let url = url.unwrap_or_else(|| DEFAULT_URL.to_owned());
        match redis_stores(&url).await {
            Ok(stores) => stores,
            Err(e) => {
                eprintln!(
                    "cache: cannot reach Redis at {url}: {e}\n\
                     Start one (redis-server) or pass its URL; or run with --embedded."
                );
                return ExitCode::FAILURE;
            }
        }
    };
    match run(stores).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cache: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One cache store per replica, each on its own Redis connection.
async fn redis_stores(url: &str) -> Result<Vec<Arc<dyn CacheStore>>, String> {
    let mut stores: Vec<Arc<dyn CacheStore>> = Vec::with_capacity(REPLICAS);
    for _ in 0..REPLICAS {
        let store = tokio::time::timeout(Duration::from_secs(5), RedisStore::connect(url))
            .await
            .map_err(|_| "no answer within 5 s".to_owned())?
            .map_err(|e| e.to_string())?;
        stores.push(Arc::new(store.cache_store()));
    }
    Ok(stores)
}

async fn run(stores: Vec<Arc<dyn CacheStore>>) -> Result<(), Box<dyn std::error::Error>> {
    // A namespace of its own for every run, so runs do not see each other's entries.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let namespace = format!("cache-example-{}-{nanos}", std::process::id());
    let policy = CachePolicy::builder(Duration::from_secs(60))
        .stale_while_revalidate(Duration::from_secs(30))
        .build()?;
    let mut replicas = Vec::with_capacity(REPLICAS);
    for store in stores {
        replicas.push(
            Cache::<String>::builder(store, &namespace)
                .policy(policy.clone())
                .deadline(Duration::from_secs(2))
                .build()
                .await?,
        );
    }

    // A stampede on one cold key: the "database" is asked once.
    let database_reads = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for i in 0..REQUESTS {
        let cache = replicas[i % REPLICAS].clone();
        let reads = database_reads.clone();
        tasks.spawn(async move {
            cache
                .get_or_load("product:7", move || async move {
                    reads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await; // a slow query
                    Ok::<_, std::io::Error>(Some("Lamp, 40 W".to_string()))
                })
                .await
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    println!(
        "{REQUESTS} concurrent requests over {REPLICAS} replicas: {} database read(s)",
        database_reads.load(Ordering::SeqCst)
    );

    // Every replica now answers from its near cache.
    for cache in &replicas {
        cache.get("product:7").await?;
    }
    // A write through replica 0 reaches the others' near caches.
    let began = Instant::now();
    replicas[0]
        .set("product:7", &"Lamp, 60 W".to_string())
        .await?;
    loop {
        let mut seen = 0;
        for cache in &replicas {
            if cache.get("product:7").await?.value().map(|v| v.as_str()) == Some("Lamp, 60 W") {
                seen += 1;
            }
        }
        if seen == REPLICAS {
            break;
        }
        if began.elapsed() > Duration::from_secs(5) {
            return Err("the write did not reach every replica within 5 s".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    println!(
        "a write through replica 0 was seen by all {REPLICAS} replicas after {:?}",
        began.elapsed()
    );
    for (i, cache) in replicas.iter().enumerate() {
        let s = cache.stats();
        println!(
            "replica {i}: near hits {}, store hits {}, loads {}, coalesced {}, lease waits {}, \
             invalidations received {}",
            s.l1_hits,
            s.l2_hits,
            s.loads,
            s.coalesced_waiters,
            s.lease_waits,
            s.invalidations_received
        );
    }
    replicas[0].invalidate_namespace().await?;
    Ok(())
}
