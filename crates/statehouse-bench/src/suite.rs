//! The whole benchmark, in the order that keeps each headline pair close in time: governor
//! right before the embedded GCRA run, and the Redis ceiling right before the Redis GCRA run,
//! so that a noisy neighbour is more likely to hit both sides of a ratio alike.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use statehouse_core::{Algorithm, Policy, RateLimitStore};
use statehouse_embedded::EmbeddedStore;
use statehouse_redis::{RedisStore, RedisTopology};

use crate::latency::{self, Latency};
use crate::limiters::{EmbeddedDirect, GovernorKeyed, StoreLimiter, generous_policy};
use crate::load::{self, LoadShape, Throughput};
use crate::options::Options;
use crate::redis_target::{CeilingRun, CeilingShape, RedisTarget, redis_benchmark};

/// Per-call deadline of the Redis store in the benchmark: far above any latency a healthy run
/// sees, so that a timeout means trouble rather than a busy machine.
const REDIS_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// `redis-benchmark` pipelines this many requests per connection over this many connections.
const CEILING_PIPELINE: usize = 64;

/// What the run was, for the report's header.
#[derive(Debug, Clone)]
pub struct Setup {
    /// CPUs this process may use.
    pub cores: usize,
    /// The options.
    pub options: Options,
    /// Which Redis the Redis runs used, e.g. `private redis-server 7.0.15 on redis://...`.
    pub redis: Option<String>,
}

/// One algorithm's run on one store.
#[derive(Debug, Clone)]
pub struct Row {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// The policy it ran under.
    pub policy: Policy,
    /// What was counted.
    pub throughput: Throughput,
}

/// Everything measured.
#[derive(Debug, Clone)]
pub struct Results {
    /// The setup.
    pub setup: Setup,
    /// Embedded store, through the `RateLimitStore` trait.
    pub embedded: Vec<Row>,
    /// Embedded GCRA through `check_one` (context: the store without the trait call).
    pub embedded_direct_gcra: Option<Throughput>,
    /// governor's keyed limiter.
    pub governor: Throughput,
    /// Redis store, through the `RateLimitStore` trait.
    pub redis: Vec<Row>,
    /// `redis-benchmark -c 64 -P 64`: the ceiling.
    pub ceiling: Option<CeilingRun>,
    /// `redis-benchmark -c 64 -P 1` (context: the same without pipelining).
    pub ceiling_unpipelined: Option<CeilingRun>,
    /// Single-task latencies, by subject.
    pub latencies: Vec<(String, Latency)>,
    /// What timing one call costs by itself.
    pub timer_overhead: Option<Latency>,
}

impl Results {
    /// Names of the runs in which any call failed.
    pub fn failed_runs(&self) -> Vec<String> {
        let rows = self
            .embedded
            .iter()
            .map(|r| (format!("embedded {}", r.algorithm), &r.throughput))
            .chain(
                self.redis
                    .iter()
                    .map(|r| (format!("redis {}", r.algorithm), &r.throughput)),
            )
            .chain(
                self.embedded_direct_gcra
                    .iter()
                    .map(|t| ("embedded gcra check_one".to_owned(), t)),
            );
        rows.filter(|(_, t)| t.errors > 0)
            .map(|(name, t)| {
                format!(
                    "{name} ({} errors, first: {})",
                    t.errors,
                    t.first_error.as_deref().unwrap_or("?")
                )
            })
            .collect()
    }

    /// Embedded GCRA (trait call) ÷ governor keyed.
    pub fn embedded_ratio(&self) -> Option<f64> {
        let gcra = self
            .embedded
            .iter()
            .find(|r| r.algorithm == Algorithm::Gcra)?;
        Some(gcra.throughput.per_second() / self.governor.per_second())
    }

    /// Redis GCRA ÷ the redis-benchmark ceiling.
    pub fn redis_ratio(&self) -> Option<f64> {
        let gcra = self.redis.iter().find(|r| r.algorithm == Algorithm::Gcra)?;
        Some(gcra.throughput.per_second() / self.ceiling?.per_second)
    }
}

/// Runs everything `options` asks for.
pub async fn run(options: &Options) -> anyhow::Result<Results> {
    let keys = load::keys(options.keys);
    let shape = LoadShape {
        tasks: options.tasks,
        warmup: options.warmup,
        measure: options.measure,
    };
    let no_server = || None;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "ratelimit-bench: {cores} cores, {} tasks, {} keys, {:?} warm-up + {:?} per run",
        shape.tasks, options.keys, shape.warmup, shape.measure
    );

    // In process. The algorithms in ALL order, with governor measured just before GCRA.
    let mut embedded = Vec::new();
    let mut governor = None;
    let mut embedded_direct_gcra = None;
    for &algorithm in &options.algorithms {
        let policy = generous_policy(algorithm)?;
        if algorithm == Algorithm::Gcra {
            let limiter = [Arc::new(GovernorKeyed::new())];
            let t = load::closed_loop(&limiter, &keys, shape, &no_server).await;
            progress("governor keyed", &t);
            governor = Some(t);
        }
        let store: Arc<dyn RateLimitStore> = Arc::new(EmbeddedStore::new());
        let limiter = [Arc::new(StoreLimiter::new(store, policy.clone()))];
        let throughput = load::closed_loop(&limiter, &keys, shape, &no_server).await;
        progress(&format!("embedded {algorithm}"), &throughput);
        if algorithm == Algorithm::Gcra {
            let direct = [Arc::new(EmbeddedDirect::new(
                EmbeddedStore::new(),
                policy.clone(),
            ))];
            let t = load::closed_loop(&direct, &keys, shape, &no_server).await;
            progress("embedded gcra check_one", &t);
            embedded_direct_gcra = Some(t);
        }
        embedded.push(Row {
            algorithm,
            policy,
            throughput,
        });
    }
    let governor = match governor {
        Some(t) => t,
        None => {
            let limiter = [Arc::new(GovernorKeyed::new())];
            load::closed_loop(&limiter, &keys, shape, &no_server).await
        }
    };

    // Single-task latency, in process.
    let gcra = generous_policy(Algorithm::Gcra)?;
    let mut latencies = Vec::new();
    let store: Arc<dyn RateLimitStore> = Arc::new(EmbeddedStore::new());
    let subjects: [(&str, Option<Latency>); 3] = [
        (
            "embedded gcra, RateLimitStore::check",
            latency::single_task(
                &StoreLimiter::new(store, gcra.clone()),
                &keys,
                shape.warmup,
                shape.measure,
            )
            .await,
        ),
        (
            "embedded gcra, EmbeddedStore::check_one",
            latency::single_task(
                &EmbeddedDirect::new(EmbeddedStore::new(), gcra.clone()),
                &keys,
                shape.warmup,
                shape.measure,
            )
            .await,
        ),
        (
            "governor keyed, check_key",
            latency::single_task(&GovernorKeyed::new(), &keys, shape.warmup, shape.measure).await,
        ),
    ];
    for (name, latency) in subjects {
        if let Some(latency) = latency {
            eprintln!(
                "latency {name}: p50 {} ns, p99 {} ns",
                latency.p50, latency.p99
            );
            latencies.push((name.to_owned(), latency));
        }
    }

    let mut results = Results {
        setup: Setup {
            cores,
            options: options.clone(),
            redis: None,
        },
        embedded,
        embedded_direct_gcra,
        governor,
        redis: Vec::new(),
        ceiling: None,
        ceiling_unpipelined: None,
        latencies,
        timer_overhead: latency::timer_overhead(),
    };
    if options.redis {
        run_redis(options, &keys, shape, &mut results).await?;
    }
    Ok(results)
}

/// The Redis half: the ceiling, then GCRA, then the other algorithms, the unpipelined
/// reference and GCRA's single-task latency. The server is flushed before every run.
async fn run_redis(
    options: &Options,
    keys: &Arc<[String]>,
    shape: LoadShape,
    results: &mut Results,
) -> anyhow::Result<()> {
    let target = match &options.redis_url {
        Some(url) => RedisTarget::external(url.clone(), options.flush_external)?,
        None => RedisTarget::start_private()?,
    };
    results.setup.redis = Some(format!(
        "{} redis-server {}{}",
        if target.is_private() {
            "private (hermetic)"
        } else {
            "external"
        },
        target.version(),
        if target.is_private() || options.flush_external {
            ", flushed before every run"
        } else {
            ", not flushed (a fresh key prefix per run)"
        }
    ));
    let seconds = options.measure.as_secs().max(1);
    let ceiling = redis_benchmark(
        &target,
        CeilingShape {
            // About the measured window at this machine's rate; the figure is a rate either way.
            requests: 400_000 * seconds,
            clients: options.tasks,
            pipeline: CEILING_PIPELINE,
            keys: options.keys,
        },
    )?;
    eprintln!(
        "redis-benchmark -c {} -P {CEILING_PIPELINE}: {:.0} requests/s",
        options.tasks, ceiling.per_second
    );
    results.ceiling = Some(ceiling);

    let server_cpu = || target.server_cpu();
    // GCRA first, right after the ceiling it is divided by.
    let mut order: Vec<Algorithm> = options.algorithms.clone();
    order.sort_by_key(|a| *a != Algorithm::Gcra);
    let mut rows = Vec::new();
    for (run, algorithm) in order.into_iter().enumerate() {
        let policy = generous_policy(algorithm)?;
        target.flush()?;
        let stores = connect(&target, options.connections, run).await?;
        let limiters: Vec<_> = stores
            .into_iter()
            .map(|store| Arc::new(StoreLimiter::new(store, policy.clone())))
            .collect();
        let throughput = load::closed_loop(&limiters, keys, shape, &server_cpu).await;
        progress(&format!("redis {algorithm}"), &throughput);
        rows.push(Row {
            algorithm,
            policy,
            throughput,
        });
    }
    rows.sort_by_key(|r| r.algorithm);
    results.redis = rows;

    let unpipelined = redis_benchmark(
        &target,
        CeilingShape {
            requests: 100_000 * seconds,
            clients: options.tasks,
            pipeline: 1,
            keys: options.keys,
        },
    )?;
    eprintln!(
        "redis-benchmark -c {} -P 1: {:.0} requests/s",
        options.tasks, unpipelined.per_second
    );
    results.ceiling_unpipelined = Some(unpipelined);

    target.flush()?;
    let store = connect(&target, 1, usize::MAX).await?.remove(0);
    let gcra = StoreLimiter::new(store, generous_policy(Algorithm::Gcra)?);
    if let Some(latency) = latency::single_task(&gcra, keys, shape.warmup, shape.measure).await {
        eprintln!(
            "latency redis gcra: p50 {} ns, p99 {} ns",
            latency.p50, latency.p99
        );
        results
            .latencies
            .push(("redis gcra, one task, one connection".to_owned(), latency));
    }
    Ok(())
}

/// `n` independent stores (each its own multiplexed connection). On an external server each
/// run gets its own key prefix, since it is not flushed.
async fn connect(
    target: &RedisTarget,
    n: usize,
    run: usize,
) -> anyhow::Result<Vec<Arc<dyn RateLimitStore>>> {
    let prefix = format!("shbench:{}:{run}:", std::process::id());
    let mut stores = Vec::with_capacity(n);
    for _ in 0..n {
        let mut builder = RedisStore::builder(RedisTopology::Standalone(target.url().to_owned()))
            .call_timeout(REDIS_CALL_TIMEOUT);
        if !target.is_private() {
            builder = builder.prefix(&prefix);
        }
        let store = builder.connect().await.context("connecting a RedisStore")?;
        stores.push(Arc::new(store) as Arc<dyn RateLimitStore>);
    }
    Ok(stores)
}

fn progress(name: &str, t: &Throughput) {
    eprintln!(
        "{name}: {:.0} decisions/s ({:.1}% admitted{})",
        t.per_second(),
        t.admitted_share() * 100.0,
        if t.errors > 0 {
            format!(", {} errors", t.errors)
        } else {
            String::new()
        }
    );
}
