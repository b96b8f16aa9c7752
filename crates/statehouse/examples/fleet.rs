//! Three replicas of a service share one limit through Redis.
//!
//! Each replica is a `RateLimiter` on its own `RedisStore` connection, as separate processes
//! would be. 64 concurrent tasks per replica each try once against one GCRA limit of 100 with a
//! burst of 100; the replicas admit 100 between them, exactly.
//!
//! ```text
//! cargo run -p statehouse --example fleet                          # redis://127.0.0.1:6379
//! cargo run -p statehouse --example fleet -- redis://10.0.0.5:6379
//! REDIS_URL=redis://127.0.0.1:6380 cargo run -p statehouse --example fleet
//! cargo run -p statehouse --example fleet -- --embedded            # one shared EmbeddedStore
//! ```

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use statehouse::{DegradedPolicy, EmbeddedStore, Policy, RateLimiter, RedisStore};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

const REPLICAS: usize = 3;
const TASKS_PER_REPLICA: usize = 64;
const LIMIT: u64 = 100;
const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

#[tokio::main]
async fn main() -> ExitCode {
    let mut embedded = false;
    let mut url = None;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--embedded" => embedded = true,
            "-h" | "--help" => {
                println!(
                    "usage: fleet [REDIS_URL] [--embedded]   (default: $REDIS_URL or {DEFAULT_URL})"
                );
                return ExitCode::SUCCESS;
            }
            _ if arg.starts_with('-') => {
                eprintln!("fleet: unknown option {arg:?} (try --help)");
                return ExitCode::from(2);
            }
            _ => url = Some(arg),
        }
    }

    let limiters = if embedded {
        match embedded_replicas() {
            Ok(limiters) => limiters,
            Err(e) => {
                eprintln!("fleet: cannot build the limiters: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        let url = url
            .or_else(|| std::env::var("REDIS_URL").ok())
            .unwrap_or_else(|| DEFAULT_URL.to_owned());
        match redis_replicas(&url).await {
            Ok(limiters) => limiters,
            Err(e) => {
                eprintln!(
                    "fleet: cannot reach Redis at {url}: {e}\n\
                     Start one (redis-server) or pass its URL as the first argument or in \
                     REDIS_URL; or run with --embedded."
                );
                return ExitCode::FAILURE;
            }
        }
    };
    run(limiters, if embedded { "embedded store" } else { "Redis" }).await
}

/// Three limiters, each on its own Redis connection.
async fn redis_replicas(url: &str) -> Result<Vec<RateLimiter>, String> {
    let mut limiters = Vec::with_capacity(REPLICAS);
    for _ in 0..REPLICAS {
        // Bound the connection attempt: an unroutable address would otherwise wait for the
        // operating system's connect timeout.
        let store = tokio::time::timeout(Duration::from_secs(5), RedisStore::connect(url))
            .await
            .map_err(|_| "no answer within 5 s".to_owned())?
            .map_err(|e| e.to_string())?;
        limiters.push(replica(RateLimiter::builder(store)).map_err(|e| e.to_string())?);
    }
    Ok(limiters)
}

/// Three limiters sharing one in-process store (replicas in one process).
fn embedded_replicas() -> Result<Vec<RateLimiter>, statehouse::Error> {
    let store = EmbeddedStore::new();
    (0..REPLICAS)
        .map(|_| replica(RateLimiter::builder(store.clone())))
        .collect()
}

fn replica(builder: statehouse::RateLimiterBuilder) -> Result<RateLimiter, statehouse::Error> {
    builder
        // This example shows exactness, so an outage must not admit anything: report errors
        // instead of failing open, and give a busy machine ample time for 192 concurrent calls.
        .on_store_failure(DegradedPolicy::ReturnError)
        .deadline(Duration::from_secs(2))
        .build()
}

async fn run(limiters: Vec<RateLimiter>, store_name: &str) -> ExitCode {
    // A burst of 100 admitted at once, then one every 36 s: the run takes far less, so exactly
    // the burst is admitted. (At 100 per minute, a run slower than 600 ms would rightly admit a
    // 101st request as the first one's share is refilled.)
    let policy =
        match Policy::gcra(LIMIT, Duration::from_secs(3600)).and_then(|p| p.with_burst(LIMIT)) {
            Ok(policy) => Arc::new(policy),
            Err(e) => {
                eprintln!("fleet: invalid policy: {e}");
                return ExitCode::FAILURE;
            }
        };
    // A key of its own for every run, so repeated runs do not see each other's counts.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let key: Arc<str> = format!("fleet-example:{}:{nanos}", std::process::id()).into();

    println!(
        "{REPLICAS} replicas × {TASKS_PER_REPLICA} concurrent tasks on {store_name}, one try each, \
         against {} {} per {:?} (burst {}) on key {key}",
        policy.algorithm(),
        policy.limit(),
        policy.period(),
        policy.burst()
    );

    let start = Arc::new(Barrier::new(REPLICAS * TASKS_PER_REPLICA));
    let mut tasks = JoinSet::new();
    for (replica, limiter) in limiters.iter().enumerate() {
        for _ in 0..TASKS_PER_REPLICA {
            let (limiter, policy, key, start) =
                (limiter.clone(), policy.clone(), key.clone(), start.clone());
            tasks.spawn(async move {
                start.wait().await;
                (replica, limiter.check(&key, &policy).await)
            });
        }
    }

    let mut admitted = [0u64; REPLICAS];
    let mut errors = 0u64;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((replica, Ok(decision))) => {
                if decision.allowed {
                    admitted[replica] += 1;
                }
            }
            Ok((replica, Err(e))) => {
                errors += 1;
                eprintln!("replica {}: error: {e}", replica + 1);
            }
            Err(e) => {
                errors += 1;
                eprintln!("a task failed: {e}");
            }
        }
    }

    for (replica, count) in admitted.iter().enumerate() {
        println!(
            "replica {}: admitted {count:>3} of {TASKS_PER_REPLICA}",
            replica + 1
        );
    }
    let total: u64 = admitted.iter().sum();
    println!(
        "total:     admitted {total:>3} of {} (limit {LIMIT})",
        REPLICAS * TASKS_PER_REPLICA
    );
    if errors > 0 {
        eprintln!("{errors} checks failed; the total is not meaningful");
        return ExitCode::FAILURE;
    }
    if total != LIMIT {
        eprintln!("the fleet admitted {total}, not the limit of {LIMIT}");
        return ExitCode::FAILURE;
    }
    println!("the fleet admitted exactly the limit");
    ExitCode::SUCCESS
}
