//! `cache-bench`: the cost of a [`Cache`] read, against references measured in the same run on
//! the same machine. See `BENCHMARKS.md` at the repo root.
//!
//! ```text
//! cargo run --release -p statehouse-bench --bin cache-bench -- [--seconds 5] [--rounds 5]
//! ```
//!
//! * **L1 (near cache) hits**: the latency of `Cache::get` of a warm key from one task, every
//!   call timed (percentiles of sorted samples, beside the floor of the timing itself), over
//!   [`EmbeddedCacheStore`] and over [`RedisCacheStore`] (a near hit never touches the store,
//!   so the two should match); and, as context, near hits per second from many tasks.
//! * **L2 (Redis) hits**: `Cache::get` of a cache built `.without_near_cache()`, so that every
//!   read is a Redis `GET` (coalesced into `MGET`s by the store) and an envelope decode, from
//!   64 tasks on one multiplexed connection, against `redis-benchmark -c 64 -P 64 GET` over
//!   keys holding values of the same stored size: the ceiling of this machine's Redis for
//!   reads. The two alternate in rounds, so that a noisy neighbour weighs on both alike.

// The shared machinery of `ratelimit-bench`: its private hermetic server, `redis-benchmark`
// runner and CPU readers. Not every item they hold is used by this binary.
#[path = "../cli.rs"]
mod cli;
#[allow(dead_code, reason = "shared with ratelimit-bench, which uses the rest")]
#[path = "../cpu.rs"]
mod cpu;
#[allow(dead_code, reason = "shared with ratelimit-bench, which uses the rest")]
#[path = "../redis_target.rs"]
mod redis_target;

use std::fmt::Write as _;
use std::future::Future;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use cli::{Flags, grouped, median, number, positive};
use serde::{Deserialize, Serialize};
use statehouse::{
    Cache, CachePolicy, CacheStore, EmbeddedCacheStore, NearCacheConfig, RedisCacheStore,
    RedisStore, RedisTopology, Tier,
};
use tokio::runtime::Runtime;

use crate::redis_target::{CeilingRun, CeilingShape, RedisTarget, run_redis_benchmark};

/// What `--help` prints.
const USAGE: &str = "\
cache-bench: Cache near-cache (L1) hit latency, and Redis (L2) hit throughput against
redis-benchmark's GET, measured in one run on a private redis-server.

USAGE:
    cargo run --release -p statehouse-bench --bin cache-bench -- [OPTIONS]

OPTIONS:
    --seconds N         measured seconds of each throughput subject (default 5); the L2
                        subject and its reference alternate in --rounds rounds of N/rounds s
    --warmup N          warm-up seconds before each measured run (default 1)
    --rounds N          rounds of the L2 pair (default 5)
    --keys N            keys pre-filled for the L2 runs and redis-benchmark (default 10000)
    --near-keys N       warm keys of the L1 runs (default 1000)
    --tasks N           concurrent tokio tasks (default 64; also redis-benchmark's -c)
    --client-threads N  tokio worker threads of the Redis runs (default 1: like
                        redis-benchmark's single client thread, leaving the other core to
                        redis-server; the in-process L1 runs use every core)
    --samples N         timed calls of each L1 latency run (default 1000000)
    --tls               reach the private redis-server over TLS (rediss://, test
                        certificates), redis-benchmark too (--tls): the cost of TLS
    -h, --help          print this help
";

/// Requests of the pipelined `redis-benchmark` probe that sizes the measured runs.
const PROBE_REQUESTS: u64 = 200_000;

/// Near-cache hits never suspend, so without a yield one task per worker would run the whole
/// window while the others waited (as in ratelimit-bench's in-process runs).
const YIELD_EVERY: u64 = 64;

/// The cached value: a small product record, about 100 bytes encoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Product {
    id: u64,
    sku: String,
    name: String,
    price_cents: u32,
    stock: u32,
    tags: Vec<String>,
}

impl Product {
    fn sample(id: u64) -> Product {
        Product {
            id,
            sku: format!("SKU-{id:08}"),
            name: format!("Stainless steel water bottle, 750 ml, #{id:06}"),
            price_cents: 2_499,
            stock: 117,
            tags: vec!["outdoor".into(), "kitchen".into()],
        }
    }
}

#[derive(Debug, Clone)]
struct Options {
    measure: Duration,
    warmup: Duration,
    rounds: u32,
    keys: usize,
    near_keys: usize,
    tasks: usize,
    client_threads: usize,
    samples: usize,
    tls: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            measure: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            rounds: 5,
            keys: 10_000,
            near_keys: 1_000,
            tasks: 64,
            client_threads: 1,
            samples: 1_000_000,
            tls: false,
        }
    }
}

/// Parses the arguments after the program name (`--flag value` or `--flag=value`); `None` for
/// `--help`.
fn parse(args: impl IntoIterator<Item = String>) -> anyhow::Result<Option<Options>> {
    let mut o = Options::default();
    let mut flags = Flags::new(args);
    while let Some((flag, inline)) = flags.next_flag() {
        let mut value = || flags.value(&flag, &inline);
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--seconds" => o.measure = Duration::from_secs(positive(&flag, &value()?)?),
            "--warmup" => o.warmup = Duration::from_secs(number(&flag, &value()?)?),
            "--rounds" => o.rounds = positive(&flag, &value()?)?,
            "--keys" => o.keys = positive(&flag, &value()?)?,
            "--near-keys" => o.near_keys = positive(&flag, &value()?)?,
            "--tasks" => o.tasks = positive(&flag, &value()?)?,
            "--client-threads" => o.client_threads = positive(&flag, &value()?)?,
            "--samples" => o.samples = positive(&flag, &value()?)?,
            "--tls" => o.tls = true,
            other => bail!("unknown argument {other:?}; see --help"),
        }
    }
    Ok(Some(o))
}

/// Percentiles of one latency run, in nanoseconds.
#[derive(Debug, Clone, Copy)]
struct Latency {
    p50: u64,
    p99: u64,
    p999: u64,
    samples: usize,
}

impl Latency {
    fn from_samples(mut samples: Vec<u64>) -> Option<Latency> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Some(Latency {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            samples: samples.len(),
        })
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The cost of the timing itself (two `Instant::now()` reads): the floor under every latency.
fn timer_floor(samples: usize) -> Option<Latency> {
    let samples = (0..samples)
        .map(|_| {
            let started = Instant::now();
            nanos(black_box(started).elapsed())
        })
        .collect();
    Latency::from_samples(samples)
}

/// Times `samples` near-cache hits on uniformly random warm keys from one task, after a
/// warm-up. Fails if any read is not a near hit: the figure would not be what it says.
async fn near_hit_latency(
    cache: &Cache<Product>,
    keys: &[String],
    warmup: Duration,
    samples: usize,
) -> anyhow::Result<Latency> {
    let mut rng = fastrand::Rng::with_seed(0x1a7e_0c1e);
    let warm_until = Instant::now() + warmup;
    while Instant::now() < warm_until {
        for _ in 0..64 {
            black_box(cache.get(&keys[rng.usize(..keys.len())]).await?);
        }
    }
    let mut taken = Vec::with_capacity(samples);
    while taken.len() < samples {
        let key = &keys[rng.usize(..keys.len())];
        let started = Instant::now();
        let found = cache.get(key).await;
        let took = started.elapsed();
        let found = found?;
        ensure!(
            found.is_hit() && found.tier() == Some(Tier::Near),
            "{key}: expected a near-cache hit, got {found:?}"
        );
        taken.push(nanos(took));
    }
    Latency::from_samples(taken).context("no latency samples")
}

/// What one closed-loop window counted.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    ops: u64,
    elapsed: Duration,
    client_cpu: Option<Duration>,
    server_cpu: Option<Duration>,
    /// Redis `GET` and `MGET` calls the server counted within the window.
    server_calls: Option<u64>,
}

impl Window {
    fn per_second(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn micros_per_op(&self, cpu: Option<Duration>) -> Option<f64> {
        cpu.map(|c| c.as_secs_f64() * 1e6 / self.ops as f64)
    }

    fn merge(&mut self, other: Window) {
        let first = self.elapsed.is_zero();
        fn add<T: std::ops::Add<Output = T>>(first: bool, a: Option<T>, b: Option<T>) -> Option<T> {
            match (first, a, b) {
                (true, _, b) => b,
                (false, Some(a), Some(b)) => Some(a + b),
                _ => None,
            }
        }
        self.client_cpu = add(first, self.client_cpu, other.client_cpu);
        self.server_cpu = add(first, self.server_cpu, other.server_cpu);
        self.server_calls = add(first, self.server_calls, other.server_calls);
        self.ops += other.ops;
        self.elapsed += other.elapsed;
    }
}

/// The tasks' phase: warming up, measured, stopping.
const WARMING: u8 = 0;
const MEASURED: u8 = 1;
const STOPPING: u8 = 2;

/// How a closed loop runs.
#[derive(Debug, Clone, Copy)]
struct LoopShape<'a> {
    /// Concurrent tasks.
    tasks: usize,
    /// Key indexes are drawn uniformly below this.
    keys: usize,
    /// Time the tasks run before the measured window opens.
    warmup: Duration,
    /// The measured window.
    measure: Duration,
    /// The server whose CPU time and `GET`/`MGET` calls are sampled around the window.
    server: Option<&'a RedisTarget>,
    /// Calls between two yields of a task (for calls that never suspend).
    yield_every: Option<u64>,
}

/// Runs `shape.tasks` tasks on `runtime`, each calling `op` with uniformly random key indexes
/// one after another, and counts the calls completed within the measured window (after the
/// warm-up). The first failed call fails the run. Blocks the calling thread, which must not be
/// a runtime worker.
fn closed_loop<F, Fut>(runtime: &Runtime, shape: LoopShape<'_>, op: F) -> anyhow::Result<Window>
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let LoopShape {
        tasks,
        keys,
        warmup,
        measure,
        server,
        yield_every,
    } = shape;
    let phase = Arc::new(AtomicU8::new(WARMING));
    let counted = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..tasks)
        .map(|task| {
            let (phase, counted, op) = (phase.clone(), counted.clone(), op.clone());
            runtime.spawn(async move {
                let mut rng = fastrand::Rng::with_seed(task as u64 + 1);
                let (mut done, mut calls) = (0u64, 0u64);
                loop {
                    let now = phase.load(Ordering::Relaxed);
                    if now == STOPPING {
                        break;
                    }
                    op(rng.usize(..keys)).await?;
                    calls += 1;
                    if now == MEASURED && phase.load(Ordering::Relaxed) == MEASURED {
                        done += 1;
                    }
                    if yield_every.is_some_and(|every| calls % every == 0) {
                        tokio::task::yield_now().await;
                    }
                }
                counted.fetch_add(done, Ordering::Relaxed);
                anyhow::Ok(())
            })
        })
        .collect();
    let result = runtime.block_on(async {
        tokio::time::sleep(warmup).await;
        let cpu_before = cpu::process_cpu();
        let server_before = server.map(|s| (s.server_cpu(), get_calls(s)));
        let started = Instant::now();
        phase.store(MEASURED, Ordering::Relaxed);
        tokio::time::sleep(measure).await;
        phase.store(STOPPING, Ordering::Relaxed);
        let elapsed = started.elapsed();
        let cpu_after = cpu::process_cpu();
        let server_after = server.map(|s| (s.server_cpu(), get_calls(s)));
        let mut failure = None;
        for worker in workers {
            match worker.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(e) => failure = failure.or(Some(anyhow::Error::new(e))),
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        let (server_cpu, server_calls) = match (server_before, server_after) {
            (Some((cpu0, calls0)), Some((cpu1, calls1))) => (
                cpu1.zip(cpu0).map(|(b, a)| b.saturating_sub(a)),
                calls1.zip(calls0).map(|(b, a)| b.saturating_sub(a)),
            ),
            _ => (None, None),
        };
        Ok(Window {
            ops: counted.load(Ordering::Relaxed),
            elapsed,
            client_cpu: cpu_after.zip(cpu_before).map(|(b, a)| b.saturating_sub(a)),
            server_cpu,
            server_calls,
        })
    });
    let window = result?;
    ensure!(window.ops > 0, "no call completed within the window");
    Ok(window)
}

/// `GET` plus `MGET` calls the server has counted (`INFO commandstats`).
fn get_calls(target: &RedisTarget) -> Option<u64> {
    let stats = target.command(&["INFO", "commandstats"]).ok()?;
    Some(
        parse_calls(&stats, "cmdstat_get").unwrap_or(0)
            + parse_calls(&stats, "cmdstat_mget").unwrap_or(0),
    )
}

/// `calls=` of one `INFO commandstats` line, e.g. `cmdstat_get:calls=12,usec=3,...`.
fn parse_calls(stats: &str, command: &str) -> Option<u64> {
    stats.lines().find_map(|line| {
        let rest = line.trim().strip_prefix(command)?.strip_prefix(':')?;
        rest.split(',')
            .find_map(|field| field.strip_prefix("calls="))?
            .parse()
            .ok()
    })
}

/// CPU time of this process's reaped children (`cutime + cstime`): `redis-benchmark`, once
/// it has exited.
fn children_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_children_cpu(&stat)
}

fn parse_children_cpu(stat: &str) -> Option<Duration> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(13);
    let cutime: u64 = fields.next()?.parse().ok()?;
    let cstime: u64 = fields.next()?.parse().ok()?;
    // USER_HZ is 100 on every Linux architecture (see cpu.rs).
    Some(Duration::from_millis((cutime + cstime) * 10))
}

/// One `redis-benchmark` run of `GET key:__rand_int__`, with its own CPU time.
#[derive(Debug, Clone, Copy, Default)]
struct Reference {
    run: CeilingRun,
    client_cpu: Option<Duration>,
}

impl Reference {
    fn merge(&mut self, other: Reference) {
        self.client_cpu = match (self.run.requests, self.client_cpu, other.client_cpu) {
            (0, _, b) => b,
            (_, Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        self.run.merge(other.run);
    }

    fn client_micros_per_op(&self) -> Option<f64> {
        self.client_cpu
            .map(|c| c.as_secs_f64() * 1e6 / self.run.requests as f64)
    }
}

fn redis_benchmark_get(
    target: &RedisTarget,
    tasks: usize,
    pipeline: usize,
    keys: usize,
    requests: u64,
) -> anyhow::Result<Reference> {
    let before = children_cpu();
    let run = run_redis_benchmark(
        target,
        &["GET", "key:__rand_int__"],
        CeilingShape {
            requests,
            clients: tasks,
            pipeline,
            keys,
        },
    )?;
    let client_cpu = children_cpu().zip(before).map(|(b, a)| b.saturating_sub(a));
    Ok(Reference { run, client_cpu })
}

/// Requests that take `redis-benchmark` about `length` at the rate of a probe run.
fn requests_lasting(
    target: &RedisTarget,
    tasks: usize,
    pipeline: usize,
    keys: usize,
    length: Duration,
) -> anyhow::Result<u64> {
    // Unpipelined, redis-benchmark is about ten times slower: a tenth of the probe.
    let probe_requests = if pipeline > 1 {
        PROBE_REQUESTS
    } else {
        PROBE_REQUESTS / 10
    };
    let probe = redis_benchmark_get(target, tasks, pipeline, keys, probe_requests)?;
    Ok(((probe.run.per_second() * length.as_secs_f64()) as u64).max(10_000))
}

fn policy() -> anyhow::Result<CachePolicy> {
    // An hour: nothing expires or refreshes during the run.
    Ok(CachePolicy::ttl(Duration::from_secs(3_600))?)
}

fn near_config() -> NearCacheConfig {
    NearCacheConfig {
        max_bytes: 64 * 1024 * 1024,
        max_ttl: Duration::from_secs(3_600),
    }
}

fn key_names(prefix: &str, count: usize) -> Arc<[String]> {
    (0..count).map(|i| format!("{prefix}{i:06}")).collect()
}

/// Sets every key from `tasks` tasks, then reads each once (filling the near cache, if any).
async fn fill(cache: &Cache<Product>, keys: &Arc<[String]>, tasks: usize) -> anyhow::Result<()> {
    let mut filling = Vec::new();
    for task in 0..tasks {
        let (cache, keys) = (cache.clone(), keys.clone());
        filling.push(tokio::spawn(async move {
            for i in (task..keys.len()).step_by(tasks) {
                cache.set(&keys[i], &Product::sample(i as u64)).await?;
                let found = cache.get(&keys[i]).await?;
                ensure!(found.is_hit(), "{}: not found right after set", keys[i]);
            }
            anyhow::Ok(())
        }));
    }
    for task in filling {
        task.await??;
    }
    Ok(())
}

/// Near-cache hits per second from `tasks` tasks on `runtime`.
fn near_hit_throughput(
    runtime: &Runtime,
    cache: &Cache<Product>,
    keys: &Arc<[String]>,
    o: &Options,
) -> anyhow::Result<Window> {
    let (cache, keys2) = (cache.clone(), keys.clone());
    let shape = LoopShape {
        tasks: o.tasks,
        keys: keys.len(),
        warmup: o.warmup,
        measure: o.measure,
        server: None,
        yield_every: Some(YIELD_EVERY),
    };
    closed_loop(runtime, shape, move |i| {
        let (cache, keys) = (cache.clone(), keys2.clone());
        async move {
            let found = cache.get(&keys[i]).await?;
            ensure!(
                found.tier() == Some(Tier::Near),
                "expected a near hit, got {found:?}"
            );
            Ok(())
        }
    })
}

struct Results {
    cores: usize,
    load_before: String,
    load_after: String,
    redis_version: String,
    payload_bytes: usize,
    stored_bytes: usize,
    floor: Option<Latency>,
    near_embedded: Latency,
    near_redis: Latency,
    near_tput_embedded: Window,
    near_tput_redis: Window,
    l2: Window,
    reference: Reference,
    round_ratios: Vec<f64>,
    store_level: Window,
    unpipelined: Reference,
    /// `redis-benchmark -c 1 -P <tasks>`: as many requests in flight as the subject's tasks.
    matched: Reference,
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn run(o: &Options) -> anyhow::Result<Results> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_before = load_average();
    let in_process = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_all()
        .build()
        .context("building the in-process runtime")?;
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.client_threads)
        .enable_all()
        .build()
        .context("building the Redis client runtime")?;

    let floor = timer_floor(o.samples.min(1_000_000));
    let payload_bytes =
        statehouse::CacheCodec::<Product>::encode(&statehouse::MsgPackCodec, &Product::sample(0))?
            .len();

    // L1 over the embedded store.
    let near_keys = key_names("n", o.near_keys);
    let embedded: Arc<dyn CacheStore> = Arc::new(EmbeddedCacheStore::new());
    let near_embedded_cache = in_process.block_on(async {
        let cache = Cache::<Product>::builder(embedded, "near")
            .policy(policy()?)
            .near_cache(near_config())
            .build()
            .await?;
        fill(&cache, &near_keys, o.tasks).await?;
        anyhow::Ok(cache)
    })?;
    let near_embedded = in_process.block_on(near_hit_latency(
        &near_embedded_cache,
        &near_keys,
        o.warmup,
        o.samples,
    ))?;
    let near_tput_embedded = near_hit_throughput(&in_process, &near_embedded_cache, &near_keys, o)?;

    // The private server; the L1 run over Redis.
    let target = if o.tls {
        RedisTarget::start_private_tls()?
    } else {
        RedisTarget::start_private()?
    };
    let redis_version = target.version();
    let url = target.url().to_owned();
    let mut builder = RedisStore::builder(RedisTopology::Standalone(url.clone()));
    if let Some(ca) = target.tls_root() {
        builder = builder.tls_root_certificates(ca);
    }
    let store: RedisCacheStore = client
        .block_on(builder.connect())
        .context("connecting to the private redis-server")?
        .cache_store();
    let shared: Arc<dyn CacheStore> = Arc::new(store.clone());
    let near_redis_cache = client.block_on(async {
        let cache = Cache::<Product>::builder(shared.clone(), "near")
            .policy(policy()?)
            .near_cache(near_config())
            .build()
            .await?;
        fill(&cache, &near_keys, o.tasks).await?;
        anyhow::Ok(cache)
    })?;
    ensure!(
        near_redis_cache.near_cache_live(),
        "the near cache over Redis is not live (no invalidation channel)"
    );
    let near_redis = client.block_on(near_hit_latency(
        &near_redis_cache,
        &near_keys,
        o.warmup,
        o.samples,
    ))?;
    let near_tput_redis = near_hit_throughput(&in_process, &near_redis_cache, &near_keys, o)?;
    drop(near_redis_cache);

    // L2: every read goes to Redis.
    target.flush()?;
    let keys = key_names("p", o.keys);
    let l2_cache = client.block_on(async {
        let cache = Cache::<Product>::builder(shared.clone(), "bench")
            .policy(policy()?)
            .without_near_cache()
            .build()
            .await?;
        fill(&cache, &keys, o.tasks).await?;
        anyhow::Ok(cache)
    })?;
    let store_keys: Arc<[String]> = keys.iter().map(|k| l2_cache.store_key(k)).collect();
    let stored_bytes: usize = target
        .command(&["STRLEN", &store.data_key(&store_keys[0])?])?
        .trim_start_matches(':')
        .parse()
        .context("STRLEN of a stored entry")?;
    ensure!(stored_bytes > 0, "the filled entry is empty");
    // redis-benchmark's keys `key:000000000000` .. : the same count, the same stored size.
    let fill_script = "for i = 0, tonumber(ARGV[1]) - 1 do \
                       redis.call('SET', string.format('key:%012d', i), ARGV[2]) end return 1";
    target.command(&[
        "EVAL",
        fill_script,
        "0",
        &o.keys.to_string(),
        &"x".repeat(stored_bytes),
    ])?;

    let l2_get = {
        let (cache, keys) = (l2_cache.clone(), keys.clone());
        move |i: usize| {
            let (cache, keys) = (cache.clone(), keys.clone());
            async move {
                let found = cache.get(&keys[i]).await?;
                ensure!(
                    found.is_hit() && found.tier() == Some(Tier::Remote),
                    "{}: expected a Redis hit, got {found:?}",
                    keys[i]
                );
                Ok(())
            }
        }
    };
    let round = o.measure / o.rounds;
    let round_requests = requests_lasting(&target, o.tasks, 64, o.keys, round)?;
    let mut l2 = Window::default();
    let mut reference = Reference::default();
    let mut round_ratios = Vec::new();
    for r in 0..o.rounds {
        let warmup = if r == 0 {
            o.warmup
        } else {
            o.warmup.min(Duration::from_millis(250))
        };
        let shape = LoopShape {
            tasks: o.tasks,
            keys: o.keys,
            warmup,
            measure: round,
            server: Some(&target),
            yield_every: None,
        };
        let subject = || closed_loop(&client, shape, l2_get.clone());
        let reference_run = || redis_benchmark_get(&target, o.tasks, 64, o.keys, round_requests);
        // Alternate which goes first, so neither always follows the other.
        let (w, c) = if r % 2 == 0 {
            let c = reference_run()?;
            (subject()?, c)
        } else {
            let w = subject()?;
            (w, reference_run()?)
        };
        round_ratios.push(w.per_second() / c.run.per_second());
        l2.merge(w);
        reference.merge(c);
    }

    let store_level = {
        let (store, store_keys) = (shared.clone(), store_keys.clone());
        let shape = LoopShape {
            tasks: o.tasks,
            keys: o.keys,
            warmup: o.warmup,
            measure: o.measure,
            server: Some(&target),
            yield_every: None,
        };
        closed_loop(&client, shape, move |i| {
            let (store, store_keys) = (store.clone(), store_keys.clone());
            async move {
                let bytes = store.get(&store_keys[i]).await?;
                ensure!(bytes.is_some(), "{}: not in the store", store_keys[i]);
                Ok(())
            }
        })?
    };
    let unpipelined_requests = requests_lasting(&target, o.tasks, 1, o.keys, o.measure)?;
    let unpipelined = redis_benchmark_get(&target, o.tasks, 1, o.keys, unpipelined_requests)?;
    // The subject's concurrency: one connection with `tasks` requests in flight.
    let matched_requests = requests_lasting(&target, 1, o.tasks, o.keys, o.measure)?;
    let matched = redis_benchmark_get(&target, 1, o.tasks, o.keys, matched_requests)?;
    drop(l2_cache);

    Ok(Results {
        cores,
        load_before,
        load_after: load_average(),
        redis_version,
        payload_bytes,
        stored_bytes,
        floor,
        near_embedded,
        near_redis,
        near_tput_embedded,
        near_tput_redis,
        l2,
        reference,
        round_ratios,
        store_level,
        unpipelined,
        matched,
    })
}

/// Near-hit p50 target, in nanoseconds.
const NEAR_P50_TARGET: u64 = 200;
/// Cache L2 hits per second ÷ redis-benchmark GET `-P 64`.
const L2_TARGET: f64 = 0.5;

fn markdown(r: &Results, o: &Options) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    let micros = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.2}"));
    writeln!(out, "## cache-bench")?;
    writeln!(out)?;
    writeln!(out, "### Setup")?;
    writeln!(out)?;
    writeln!(
        out,
        "{} cores; load average (1, 5, 15 min) {} at the start, {} at the end. Value: a \
         `Product` struct, {} bytes as MessagePack, {} bytes stored in Redis (the envelope); \
         default policy TTL 1 h. L1: {} warm keys picked uniformly at random, {} timed calls \
         per store after {} s warm-up. L2: {} keys filled through the cache; {} tokio tasks on \
         one multiplexed connection, {} client worker thread(s) (`--client-threads`; \
         redis-benchmark runs one); `Cache` and `redis-benchmark` alternate in {} rounds of \
         {:.1} s (warm-up {} s, then 250 ms). Redis {} (private, hermetic){}.",
        r.cores,
        r.load_before,
        r.load_after,
        r.payload_bytes,
        r.stored_bytes,
        o.near_keys,
        grouped(o.samples as f64),
        o.warmup.as_secs(),
        grouped(o.keys as f64),
        o.tasks,
        o.client_threads,
        o.rounds,
        (o.measure / o.rounds).as_secs_f64(),
        o.warmup.as_secs(),
        r.redis_version,
        if o.tls {
            ", over TLS (`--tls`: the store by `rediss://`, `redis-benchmark --tls`)"
        } else {
            ""
        },
    )?;
    writeln!(out)?;

    writeln!(out, "### L1 (near cache) hit latency, one task (ns)")?;
    writeln!(out)?;
    writeln!(out, "| Subject | p50 | p99 | p99.9 | samples |")?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    for (name, l) in [
        (
            "`Cache::get` near hit, over `EmbeddedCacheStore`",
            Some(r.near_embedded),
        ),
        (
            "`Cache::get` near hit, over `RedisCacheStore`",
            Some(r.near_redis),
        ),
        ("(floor) the timing itself, two `Instant::now()`", r.floor),
    ] {
        if let Some(l) = l {
            writeln!(
                out,
                "| {name} | {} | {} | {} | {} |",
                grouped(l.p50 as f64),
                grouped(l.p99 as f64),
                grouped(l.p999 as f64),
                grouped(l.samples as f64)
            )?;
        }
    }
    writeln!(out)?;

    writeln!(
        out,
        "### L1 hit throughput, {} tasks on {} worker threads (context)",
        o.tasks, r.cores
    )?;
    writeln!(out)?;
    writeln!(out, "| Subject | gets/s | client CPU µs/get |")?;
    writeln!(out, "|---|---:|---:|")?;
    for (name, w) in [
        ("over `EmbeddedCacheStore`", r.near_tput_embedded),
        ("over `RedisCacheStore`", r.near_tput_redis),
    ] {
        writeln!(
            out,
            "| `Cache::get` near hit, {name} | {} | {} |",
            grouped(w.per_second()),
            micros(w.micros_per_op(w.client_cpu)),
        )?;
    }
    writeln!(out)?;

    writeln!(out, "### L2 (Redis) hits per second")?;
    writeln!(out)?;
    writeln!(
        out,
        "| Subject | gets/s | client CPU µs/get | server CPU µs/get | Redis calls per get |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    for (name, w) in [
        (
            format!(
                "**`Cache::get`**, `.without_near_cache()`: every read a Redis hit ({} tasks, 1 connection)",
                o.tasks
            ),
            r.l2,
        ),
        (
            "(context) `RedisCacheStore::get`: store level, no envelope decode".to_owned(),
            r.store_level,
        ),
    ] {
        writeln!(
            out,
            "| {name} | {} | {} | {} | {} |",
            grouped(w.per_second()),
            micros(w.micros_per_op(w.client_cpu)),
            micros(w.micros_per_op(w.server_cpu)),
            w.server_calls.map_or("–".to_owned(), |c| format!(
                "{:.3}",
                c as f64 / w.ops as f64
            )),
        )?;
    }
    for (name, c) in [
        (
            format!(
                "**Reference**: `redis-benchmark -c {} -P 64 -r {} GET key:__rand_int__` ({} B values)",
                o.tasks, o.keys, r.stored_bytes
            ),
            r.reference,
        ),
        (
            "(context) the same with `-P 1`: no pipelining".to_owned(),
            r.unpipelined,
        ),
        (
            format!(
                "(context) `-c 1 -P {}`: one connection with {} requests in flight, as many as \
                 the subject's tasks (the reference has {})",
                o.tasks,
                o.tasks,
                grouped((o.tasks * 64) as f64)
            ),
            r.matched,
        ),
    ] {
        writeln!(
            out,
            "| {name} | {} | {} | {} | – |",
            grouped(c.run.per_second()),
            micros(c.client_micros_per_op()),
            micros(c.run.server_micros_per_decision()),
        )?;
    }
    writeln!(out)?;

    writeln!(out, "### Ratios and targets")?;
    writeln!(out)?;
    writeln!(out, "| Measure | value | target | result |")?;
    writeln!(out, "|---|---:|---:|---|")?;
    for (name, l) in [
        ("L1 hit p50, over `EmbeddedCacheStore`", r.near_embedded),
        ("L1 hit p50, over `RedisCacheStore`", r.near_redis),
    ] {
        writeln!(
            out,
            "| {name} | {} ns | ≤ {NEAR_P50_TARGET} ns | {} |",
            l.p50,
            if l.p50 <= NEAR_P50_TARGET {
                "PASS"
            } else {
                "ABOVE"
            }
        )?;
    }
    let pooled = r.l2.per_second() / r.reference.run.per_second();
    // The median of the rounds: one round in which either side stalled cannot swing it.
    let ratio = median(&r.round_ratios).unwrap_or(pooled);
    writeln!(
        out,
        "| Cache L2 hits/s ÷ redis-benchmark GET `-P 64` (median of the rounds) | {ratio:.2} | ≥ {L2_TARGET:.1} | {} |",
        if ratio >= L2_TARGET { "PASS" } else { "BELOW" }
    )?;
    writeln!(
        out,
        "| (context) the same ratio per round; pooled over the rounds | {}; {pooled:.2} | – | – |",
        r.round_ratios
            .iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    writeln!(
        out,
        "| (context) `RedisCacheStore::get` ÷ redis-benchmark GET `-P 64` | {:.2} | – | – |",
        r.store_level.per_second() / r.reference.run.per_second()
    )?;
    writeln!(
        out,
        "| (context) Cache L2 hits/s ÷ redis-benchmark GET `-c 1 -P {}` (the same requests in flight) | {:.2} | – | – |",
        o.tasks,
        r.l2.per_second() / r.matched.run.per_second()
    )?;
    writeln!(out)?;
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let Some(options) = parse(std::env::args().skip(1))? else {
        print!("{USAGE}");
        return Ok(());
    };
    let results = run(&options)?;
    print!("{}", markdown(&results, &options)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(args: &[&str]) -> anyhow::Result<Options> {
        parse(args.iter().map(|s| (*s).to_owned()))?.context("help")
    }

    #[test]
    fn defaults_match_the_documented_workload() -> anyhow::Result<()> {
        let o = options(&[])?;
        assert_eq!((o.tasks, o.keys, o.near_keys), (64, 10_000, 1_000));
        assert_eq!((o.client_threads, o.rounds, o.samples), (1, 5, 1_000_000));
        assert_eq!(o.measure, Duration::from_secs(5));
        assert!(!o.tls);
        assert!(options(&["--tls"])?.tls);
        Ok(())
    }

    #[test]
    fn both_value_forms_parse_and_bad_input_is_rejected() -> anyhow::Result<()> {
        let o = options(&["--seconds", "2", "--keys=50", "--rounds", "3"])?;
        assert_eq!(
            (o.measure, o.keys, o.rounds),
            (Duration::from_secs(2), 50, 3)
        );
        assert!(parse(["--help".to_owned()])?.is_none());
        assert!(options(&["--tasks", "0"]).is_err());
        assert!(options(&["--seconds"]).is_err());
        assert!(options(&["--samples", "many"]).is_err());
        assert!(options(&["--bogus"]).is_err());
        Ok(())
    }

    #[test]
    fn percentiles_of_known_samples() {
        let l = Latency::from_samples((1..=1000).rev().collect()).expect("samples");
        assert_eq!((l.p50, l.p99, l.p999, l.samples), (501, 990, 999, 1000));
        assert!(Latency::from_samples(Vec::new()).is_none());
    }

    #[test]
    fn reads_commandstats_calls() {
        let stats = "# Commandstats\r\ncmdstat_mget:calls=40,usec=900,usec_per_call=22.5\r\n\
                     cmdstat_get:calls=7,usec=10,usec_per_call=1.4\r\n";
        assert_eq!(parse_calls(stats, "cmdstat_get"), Some(7));
        assert_eq!(parse_calls(stats, "cmdstat_mget"), Some(40));
        assert_eq!(parse_calls(stats, "cmdstat_set"), None);
    }

    #[test]
    fn reads_children_cpu_past_a_name_with_spaces() {
        // utime 250, stime 50, cutime 120, cstime 30 (in USER_HZ ticks).
        let stat = "42 (my (odd) bin) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 120 30 20 0 3 0";
        assert_eq!(parse_children_cpu(stat), Some(Duration::from_millis(1_500)));
    }

    #[test]
    fn merged_windows_add_up() {
        let w = |ops, secs| Window {
            ops,
            elapsed: Duration::from_secs(secs),
            client_cpu: Some(Duration::from_secs(1)),
            server_cpu: None,
            server_calls: Some(ops / 10),
        };
        let mut total = Window::default();
        total.merge(w(300, 1));
        total.merge(w(100, 1));
        assert_eq!(total.per_second(), 200.0);
        assert_eq!(total.client_cpu, Some(Duration::from_secs(2)));
        assert_eq!(total.server_cpu, None);
        assert_eq!(total.server_calls, Some(40));
    }

    #[test]
    fn the_cached_value_is_about_100_bytes() -> anyhow::Result<()> {
        let bytes = statehouse::CacheCodec::<Product>::encode(
            &statehouse::MsgPackCodec,
            &Product::sample(7),
        )?;
        assert!((80..=140).contains(&bytes.len()), "{} bytes", bytes.len());
        Ok(())
    }

    #[test]
    fn groups_thousands() {
        assert_eq!(grouped(999.0), "999");
        assert_eq!(grouped(12_345_678.9), "12,345,679");
    }
}
