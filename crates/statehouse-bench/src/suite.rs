//! The whole benchmark. The two headline pairs (governor and embedded GCRA; redis-benchmark's
//! ceiling and Redis GCRA) alternate in rounds, so that a noisy neighbour on this small shared
//! machine weighs on both sides of each ratio alike; the other algorithms run once each.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use statehouse_core::{Algorithm, Policy, RateLimitStore};
use statehouse_embedded::EmbeddedStore;
use statehouse_redis::{RedisStore, RedisTopology};

use crate::cli::median;
use crate::latency::{self, Latency};
use crate::limiters::{EmbeddedDirect, GovernorKeyed, StoreLimiter, generous_policy};
use crate::load::{self, LoadShape, Throughput};
use crate::options::Options;
use crate::redis_target::{
    CEILING_CALL, CeilingRun, CeilingShape, RedisTarget, ScriptCall, redis_benchmark,
};

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
    pub governor: Option<Throughput>,
    /// Redis store, through the `RateLimitStore` trait.
    pub redis: Vec<Row>,
    /// `redis-benchmark -c 64 -P 64`: the ceiling.
    pub ceiling: Option<CeilingRun>,
    /// Redis GCRA ÷ the ceiling in each round (the headline ratio is their median).
    pub redis_round_ratios: Vec<f64>,
    /// `redis-benchmark -c 64 -P 1` (context: the same without pipelining).
    pub ceiling_unpipelined: Option<CeilingRun>,
    /// `redis-benchmark -c 1 -P 64` (context: the same script with as many requests in flight
    /// as the subject's tasks, instead of the ceiling's 64 × 64).
    pub ceiling_matched: Option<CeilingRun>,
    /// `redis-benchmark -c 64 -P 64` calling Statehouse's own limiter script with the GCRA
    /// policy's arguments (context: the server's cost of the script, without our client).
    pub statehouse_script_ceiling: Option<CeilingRun>,
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
        Some(gcra.throughput.per_second() / self.governor.as_ref()?.per_second())
    }

    /// Redis GCRA ÷ the redis-benchmark ceiling: the median of the rounds' ratios (a round
    /// in which one side stalled cannot swing it), or the pooled ratio without rounds.
    pub fn redis_ratio(&self) -> Option<f64> {
        if let Some(median) = median(&self.redis_round_ratios) {
            return Some(median);
        }
        self.pooled_redis_ratio()
    }

    /// Redis GCRA ÷ the ceiling over every round together.
    pub fn pooled_redis_ratio(&self) -> Option<f64> {
        let gcra = self.redis.iter().find(|r| r.algorithm == Algorithm::Gcra)?;
        Some(gcra.throughput.per_second() / self.ceiling?.per_second())
    }
}

/// Runs everything `options` asks for.
///
/// The in-process runs use a runtime with a worker per core; the Redis runs one with
/// `--client-threads` workers (default 1), as `redis-benchmark` runs one client thread: on a
/// machine this small, a client on every core would fight redis-server for its core.
pub fn run(options: &Options) -> anyhow::Result<Results> {
    let keys = load::keys(options.keys);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "ratelimit-bench: {cores} cores, {} tasks, {} keys, {:?} warm-up + {:?} per run, \
         headline pairs in {} rounds",
        options.tasks, options.keys, options.warmup, options.measure, options.rounds
    );
    let mut results = Results {
        setup: Setup {
            cores,
            options: options.clone(),
            redis: None,
        },
        embedded: Vec::new(),
        embedded_direct_gcra: None,
        governor: None,
        redis: Vec::new(),
        ceiling: None,
        ceiling_unpipelined: None,
        ceiling_matched: None,
        redis_round_ratios: Vec::new(),
        statehouse_script_ceiling: None,
        latencies: Vec::new(),
        timer_overhead: latency::timer_overhead(),
    };
    if options.embedded {
        runtime(cores)?.block_on(run_embedded(options, &keys, &mut results))?;
    }
    if options.redis {
        runtime(options.client_threads)?.block_on(run_redis(options, &keys, &mut results))?;
    }
    Ok(results)
}

/// A multi-thread tokio runtime with `workers` worker threads.
fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?)
}

/// The full-length shape of a single run.
fn full_shape(options: &Options) -> LoadShape {
    LoadShape {
        tasks: options.tasks,
        warmup: options.warmup,
        measure: options.measure,
    }
}

/// The shape of round `round` of a headline pair: a share of the measured time, and after the
/// first round a short warm-up (the state is already there; only the tasks are new).
fn round_shape(options: &Options, round: u32) -> LoadShape {
    LoadShape {
        tasks: options.tasks,
        warmup: if round == 0 {
            options.warmup
        } else {
            options.warmup.min(ROUND_WARMUP)
        },
        measure: options.measure / options.rounds,
    }
}

/// The warm-up of every round after the first.
const ROUND_WARMUP: Duration = Duration::from_millis(250);

/// The in-process half: governor and embedded GCRA alternated, then the other algorithms,
/// then single-task latencies.
async fn run_embedded(
    options: &Options,
    keys: &Arc<[String]>,
    results: &mut Results,
) -> anyhow::Result<()> {
    let no_server = || None;
    if options.algorithms.contains(&Algorithm::Gcra) {
        let gcra = generous_policy(Algorithm::Gcra)?;
        let governor = [Arc::new(GovernorKeyed::new())];
        let store: Arc<dyn RateLimitStore> = Arc::new(EmbeddedStore::new());
        let embedded = [Arc::new(StoreLimiter::new(store, gcra.clone()))];
        let direct = [Arc::new(EmbeddedDirect::new(
            EmbeddedStore::new(),
            gcra.clone(),
        ))];
        let (mut g, mut e, mut d) = Default::default();
        for round in 0..options.rounds {
            let shape = round_shape(options, round);
            Throughput::merge(
                &mut g,
                load::closed_loop(&governor, keys, shape, &no_server).await,
            );
            Throughput::merge(
                &mut e,
                load::closed_loop(&embedded, keys, shape, &no_server).await,
            );
            Throughput::merge(
                &mut d,
                load::closed_loop(&direct, keys, shape, &no_server).await,
            );
        }
        progress("governor keyed", &g);
        progress("embedded gcra", &e);
        progress("embedded gcra check_one", &d);
        results.governor = Some(g);
        results.embedded_direct_gcra = Some(d);
        results.embedded.push(Row {
            algorithm: Algorithm::Gcra,
            policy: gcra,
            throughput: e,
        });
    }
    for &algorithm in options.algorithms.iter().filter(|&&a| a != Algorithm::Gcra) {
        let policy = generous_policy(algorithm)?;
        let store: Arc<dyn RateLimitStore> = Arc::new(EmbeddedStore::new());
        let limiter = [Arc::new(StoreLimiter::new(store, policy.clone()))];
        let throughput = load::closed_loop(&limiter, keys, full_shape(options), &no_server).await;
        progress(&format!("embedded {algorithm}"), &throughput);
        results.embedded.push(Row {
            algorithm,
            policy,
            throughput,
        });
    }
    results.embedded.sort_by_key(|r| r.algorithm);

    // Single-task latency, in process.
    let gcra = generous_policy(Algorithm::Gcra)?;
    let (warmup, measure) = (options.warmup, options.measure);
    let store: Arc<dyn RateLimitStore> = Arc::new(EmbeddedStore::new());
    let through_trait = StoreLimiter::new(store, gcra.clone());
    let direct = EmbeddedDirect::new(EmbeddedStore::new(), gcra);
    let governor = GovernorKeyed::new();
    let measured = [
        (
            "embedded gcra, RateLimitStore::check",
            latency::single_task(&through_trait, keys, warmup, measure).await,
        ),
        (
            "embedded gcra, EmbeddedStore::check_one",
            latency::single_task(&direct, keys, warmup, measure).await,
        ),
        (
            "governor keyed, check_key",
            latency::single_task(&governor, keys, warmup, measure).await,
        ),
    ];
    for (name, latency) in measured {
        if let Some(latency) = latency {
            eprintln!(
                "latency {name}: p50 {} ns, p99 {} ns",
                latency.p50, latency.p99
            );
            results.latencies.push((name.to_owned(), latency));
        }
    }
    Ok(())
}

/// The Redis half: the ceiling and Redis GCRA alternated, then the other algorithms, the two
/// context references and GCRA's single-task latency. The server is flushed before every run.
async fn run_redis(
    options: &Options,
    keys: &Arc<[String]>,
    results: &mut Results,
) -> anyhow::Result<()> {
    let target = match &options.redis_url {
        Some(url) => {
            anyhow::ensure!(!options.tls, "--tls applies to the private server only");
            RedisTarget::external(url.clone(), options.flush_external)?
        }
        None if options.tls => RedisTarget::start_private_tls()?,
        None => RedisTarget::start_private()?,
    };
    results.setup.redis = Some(format!(
        "{} redis-server {}{}{}",
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
        },
        if options.tls {
            ", over TLS (`--tls`: the store by `rediss://`, `redis-benchmark --tls`)"
        } else {
            ""
        }
    ));
    let server_cpu = || target.server_cpu();
    let ceiling_shape = |requests: u64, pipeline: usize| CeilingShape {
        requests: requests.max(MIN_CEILING_REQUESTS),
        clients: options.tasks,
        pipeline,
        keys: options.keys,
    };
    let mut run_index = 0;

    if options.algorithms.contains(&Algorithm::Gcra) {
        let gcra = generous_policy(Algorithm::Gcra)?;
        let limiters: Vec<_> = connect(&target, options.connections, run_index)
            .await?
            .into_iter()
            .map(|store| Arc::new(StoreLimiter::new(store, gcra.clone())))
            .collect();
        run_index += 1;
        let (mut ceiling, mut statehouse) = (CeilingRun::default(), Throughput::default());
        // Sized so that each redis-benchmark round lasts about as long as a Statehouse round.
        let mut ceiling_rate = FIRST_CEILING_GUESS;
        for round in 0..options.rounds {
            let shape = round_shape(options, round);
            let requests = (ceiling_rate * shape.measure.as_secs_f64()) as u64;
            let run = redis_benchmark(
                &target,
                CEILING_CALL,
                ceiling_shape(requests, CEILING_PIPELINE),
            )?;
            ceiling_rate = run.per_second();
            ceiling.merge(run);
            target.flush()?;
            let round_run = load::closed_loop(&limiters, keys, shape, &server_cpu).await;
            results
                .redis_round_ratios
                .push(round_run.per_second() / ceiling_rate);
            statehouse.merge(round_run);
        }
        eprintln!(
            "redis-benchmark -c {} -P {CEILING_PIPELINE}: {:.0} requests/s",
            options.tasks,
            ceiling.per_second()
        );
        progress("redis gcra", &statehouse);
        results.ceiling = Some(ceiling);
        results.redis.push(Row {
            algorithm: Algorithm::Gcra,
            policy: gcra,
            throughput: statehouse,
        });
    }

    for &algorithm in options.algorithms.iter().filter(|&&a| a != Algorithm::Gcra) {
        let policy = generous_policy(algorithm)?;
        target.flush()?;
        let limiters: Vec<_> = connect(&target, options.connections, run_index)
            .await?
            .into_iter()
            .map(|store| Arc::new(StoreLimiter::new(store, policy.clone())))
            .collect();
        run_index += 1;
        let throughput = load::closed_loop(&limiters, keys, full_shape(options), &server_cpu).await;
        progress(&format!("redis {algorithm}"), &throughput);
        results.redis.push(Row {
            algorithm,
            policy,
            throughput,
        });
    }
    results.redis.sort_by_key(|r| r.algorithm);

    let seconds = options.measure.as_secs_f64();
    let unpipelined = redis_benchmark(
        &target,
        CEILING_CALL,
        ceiling_shape((UNPIPELINED_GUESS * seconds) as u64, 1),
    )?;
    eprintln!(
        "redis-benchmark -c {} -P 1: {:.0} requests/s",
        options.tasks,
        unpipelined.per_second()
    );
    results.ceiling_unpipelined = Some(unpipelined);

    // The subject's concurrency: one connection with `tasks` requests in flight.
    target.flush()?;
    let matched_requests = results
        .ceiling
        .map_or(FIRST_CEILING_GUESS, |c| c.per_second() / 2.0);
    let matched = redis_benchmark(
        &target,
        CEILING_CALL,
        CeilingShape {
            requests: ((matched_requests * seconds) as u64).max(MIN_CEILING_REQUESTS),
            clients: 1,
            pipeline: options.tasks,
            keys: options.keys,
        },
    )?;
    eprintln!(
        "redis-benchmark -c 1 -P {}: {:.0} requests/s",
        options.tasks,
        matched.per_second()
    );
    results.ceiling_matched = Some(matched);

    match statehouse_script_reference(&target, options, seconds) {
        Ok(Some(run)) => {
            eprintln!(
                "redis-benchmark -c {} -P {CEILING_PIPELINE}, Statehouse's script (gcra): {:.0} requests/s",
                options.tasks,
                run.per_second()
            );
            results.statehouse_script_ceiling = Some(run);
        }
        Ok(None) => eprintln!("Statehouse's limiter.lua not found beside this crate; skipped"),
        Err(e) => eprintln!("redis-benchmark on Statehouse's script failed (skipped): {e:#}"),
    }

    target.flush()?;
    let store = connect(&target, 1, run_index).await?.remove(0);
    let gcra = StoreLimiter::new(store, generous_policy(Algorithm::Gcra)?);
    if let Some(latency) = latency::single_task(&gcra, keys, options.warmup, options.measure).await
    {
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

/// The first round's guess of the ceiling's rate, to size its request count.
const FIRST_CEILING_GUESS: f64 = 250_000.0;
/// A guess of the unpipelined rate, to size its request count.
const UNPIPELINED_GUESS: f64 = 50_000.0;
/// A guess of the rate of Statehouse's script under redis-benchmark.
const STATEHOUSE_SCRIPT_GUESS: f64 = 25_000.0;
/// Fewer requests than this and redis-benchmark's start-up weighs on its rate.
const MIN_CEILING_REQUESTS: u64 = 50_000;

/// `redis-benchmark` calling the Redis store's own script (read from the source tree beside
/// this crate) with the GCRA policy's arguments, as `statehouse-redis` lays them out
/// (`limiter_script.rs`: mode, now (`''` for the server's `TIME`), slack in ms, then per check:
/// algorithm code, the algorithm's two parameters (GCRA: burst, interval µs), cost). `None`
/// when the script is not there (the binary moved away from the workspace).
fn statehouse_script_reference(
    target: &RedisTarget,
    options: &Options,
    seconds: f64,
) -> anyhow::Result<Option<CeilingRun>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../statehouse-redis/src/limiter.lua"
    );
    let Ok(script) = std::fs::read_to_string(path) else {
        return Ok(None);
    };
    let policy = generous_policy(Algorithm::Gcra)?;
    let args: Vec<String> = ["consume".to_owned(), String::new(), "0".to_owned()]
        .into_iter()
        .chain(
            [
                u64::from(policy.algorithm().code()),
                policy.burst(),
                policy.interval_micros(),
                1,
            ]
            .map(|n| n.to_string()),
        )
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let key = format!(
        "sh:rl:{{user:__rand_int__}}:gcra:{}",
        policy.period_micros()
    );
    let call = ScriptCall {
        script: &script,
        key: &key,
        args: &args,
    };
    let run = redis_benchmark(
        target,
        call,
        CeilingShape {
            requests: ((STATEHOUSE_SCRIPT_GUESS * seconds) as u64).max(MIN_CEILING_REQUESTS),
            clients: options.tasks,
            pipeline: CEILING_PIPELINE,
            keys: options.keys,
        },
    )?;
    Ok(Some(run))
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
        if let Some(ca) = target.tls_root() {
            builder = builder.tls_root_certificates(ca);
        }
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
