//! `session-bench`: session load-and-touch throughput of `RedisSessionStore`, against
//! `redis-benchmark` running `GETEX … PX` (the least a Redis session store can do per read:
//! fetch the session and move its expiry) on the same private server, in the same run.
//!
//! ```text
//! cargo run --release -p statehouse-bench --bin session-bench -- [--seconds 5] [--sessions 10000]
//! ```
//!
//! Two session configurations are measured: `touch_after_share(0, 1)`, where every load writes
//! a refresh (`last_seen`, the key's `PEXPIREAT`, the index score and expiry: the worst case),
//! and the default 1/4, where loads of fresh sessions only read. Both run 64 concurrent tasks
//! over one multiplexed connection on one client thread (`--client-threads`);
//! `redis-benchmark` runs 64 clients pipelining 64 commands, on its one thread; as context it
//! also runs one client pipelining 64 (as many requests in flight as the 64 tasks).

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use statehouse_core::session::{NewSession, SessionConfig, SessionStore, SessionToken};
use statehouse_redis::{RedisSessionStore, RedisTopology};
use statehouse_testkit::{RedisServer, TlsOptions, raw_command, test_certificates};

const TASKS: usize = 64;

struct Options {
    seconds: u64,
    sessions: usize,
    client_threads: usize,
    tls: bool,
}

/// With `--tls`: the TLS port `redis-benchmark` runs against, and the test CA in a file for
/// its `--cacert`.
static TLS: OnceLock<(u16, PathBuf)> = OnceLock::new();

fn parse_options() -> anyhow::Result<Options> {
    let mut options = Options {
        seconds: 5,
        sessions: 10_000,
        client_threads: 1,
        tls: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--seconds" => options.seconds = value()?.parse().context("--seconds")?,
            "--sessions" => options.sessions = value()?.parse().context("--sessions")?,
            "--client-threads" => {
                options.client_threads = value()?.parse().context("--client-threads")?;
            }
            "--tls" => options.tls = true,
            "-h" | "--help" => {
                println!(
                    "session-bench [--seconds N (default 5)] [--sessions N (default 10000)] \
                     [--client-threads N (default 1: like redis-benchmark, one client thread)] \
                     [--tls (the store by rediss://, redis-benchmark --tls: the cost of TLS)]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; see --help"),
        }
    }
    ensure!(options.seconds > 0, "--seconds must be positive");
    ensure!(options.sessions > 0, "--sessions must be positive");
    ensure!(
        options.client_threads > 0,
        "--client-threads must be positive"
    );
    Ok(options)
}

fn main() -> anyhow::Result<()> {
    let options = parse_options()?;
    // The client's tasks run on `--client-threads` worker threads (default 1, as
    // `redis-benchmark` runs one): on a 2-core machine a second client thread competes with
    // redis-server for the cores and adds cross-thread wake-ups.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.client_threads)
        .enable_all()
        .build()
        .context("building the client runtime")?
        .block_on(run(options))
}

async fn run(options: Options) -> anyhow::Result<()> {
    let server = if options.tls {
        RedisServer::start_tls(TlsOptions::default())
    } else {
        RedisServer::start()
    }
    .context("starting a private redis-server")?;
    let port = server.port();
    if let Some(tls_port) = server.tls_port() {
        let ca = std::env::temp_dir().join(format!("session-bench-ca-{}.pem", std::process::id()));
        std::fs::write(&ca, test_certificates().ca_pem()).context("writing the test CA")?;
        let _ = TLS.set((tls_port, ca));
    }
    println!(
        "session-bench: private redis-server on port {port}{}, {TASKS} tasks on {} client \
         thread(s), {} sessions, {} s per run",
        if options.tls {
            " (over TLS: the store by rediss://, redis-benchmark --tls)"
        } else {
            ""
        },
        options.client_threads,
        options.sessions,
        options.seconds
    );

    let ceiling = redis_benchmark_getex(port, options.sessions, options.seconds, false, CEILING)?;
    println!("redis-benchmark GETEX PX (-P 64 -c 64):      {ceiling:>12.0} ops/s");
    let matched = redis_benchmark_getex(port, options.sessions, options.seconds, false, MATCHED)?;
    println!(
        "redis-benchmark GETEX PX (-P {TASKS} -c 1):       {matched:>12.0} ops/s  (context: as many \
         requests in flight as the {TASKS} tasks; the reference has {})",
        CEILING.clients * CEILING.pipeline
    );
    let script_ceiling =
        redis_benchmark_getex(port, options.sessions, options.seconds, true, CEILING)?;
    println!(
        "redis-benchmark minimal GET+PEXPIRE script:  {script_ceiling:>12.0} ops/s  = {:.2}x GETEX",
        script_ceiling / ceiling
    );

    let mut results = Vec::new();
    for (label, share) in [
        ("every load writes (touch 0/1)", (0, 1)),
        ("default touch 1/4", (1, 4)),
    ] {
        raw_command(port, &["FLUSHALL"]).context("FLUSHALL")?;
        let config = SessionConfig::builder()
            .touch_after_share(share.0, share.1)
            .build()?;
        let rate = session_loads(&server, config, options.sessions, options.seconds).await?;
        let stats = raw_command(port, &["INFO", "commandstats"]).context("INFO")?;
        // The script, and the load fast path's `GET`s and `MGET`s.
        for line in stats.lines().filter(|l| {
            ["cmdstat_evalsha:", "cmdstat_get:", "cmdstat_mget:"]
                .iter()
                .any(|c| l.starts_with(c))
        }) {
            println!("  server: {line}");
        }
        println!(
            "session load, {label:<30} {rate:>12.0} ops/s  = {:.2}x redis-benchmark",
            rate / ceiling
        );
        results.push((label, rate));
    }
    for (label, rate) in results {
        println!(
            "ratio [{label}]: {:.2}   (context: {:.2}x GETEX at -P {TASKS} -c 1)",
            rate / ceiling,
            rate / matched
        );
    }
    if let Some((_, ca)) = TLS.get() {
        let _ = std::fs::remove_file(ca);
    }
    Ok(())
}

/// Creates `sessions` sessions, then loads random ones from 64 tasks for `seconds`; returns
/// loads per second.
async fn session_loads(
    server: &RedisServer,
    config: SessionConfig,
    sessions: usize,
    seconds: u64,
) -> anyhow::Result<f64> {
    let (url, ca) = match server.tls_port() {
        Some(_) => (server.tls_url(), Some(test_certificates().ca_pem())),
        None => (server.url(), None),
    };
    let mut builder = RedisSessionStore::builder(RedisTopology::Standalone(url));
    if let Some(ca) = ca {
        builder = builder.tls_root_certificates(ca);
    }
    let store = builder
        .prefix("bench:s:")
        .config(config)
        .call_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let mut tokens: Vec<SessionToken> = Vec::with_capacity(sessions);
    let mut creating = Vec::new();
    for task in 0..TASKS {
        let store = store.clone();
        let count = sessions / TASKS + usize::from(task < sessions % TASKS);
        creating.push(tokio::spawn(async move {
            let mut made = Vec::with_capacity(count);
            for i in 0..count {
                let mut new = NewSession::for_user(format!("user-{task}-{i}"));
                new.roles = vec!["user".into()];
                new.data.insert("cart".into(), vec![b'x'; 96]);
                new.data.insert("theme".into(), b"\"dark\"".to_vec());
                new.ip = Some("192.0.2.1".into());
                new.user_agent = Some("session-bench/1.0".into());
                made.push(store.create(&new).await?.0);
            }
            Ok::<_, statehouse_core::Error>(made)
        }));
    }
    for task in creating {
        tokens.extend(task.await??);
    }
    let tokens = Arc::new(tokens);
    raw_command(server.port(), &["CONFIG", "RESETSTAT"]).context("CONFIG RESETSTAT")?;
    let server_cpu_before = server_cpu(server.port())?;
    let client_cpu_before = client_cpu();

    let stop = Arc::new(AtomicBool::new(false));
    let loads = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..TASKS {
        let (store, tokens, stop, loads) =
            (store.clone(), tokens.clone(), stop.clone(), loads.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::new();
            let mut done = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let token = &tokens[rng.usize(..tokens.len())];
                if store.load(token).await?.is_none() {
                    return Err(anyhow::anyhow!("a pre-created session did not load"));
                }
                done += 1;
            }
            loads.fetch_add(done, Ordering::Relaxed);
            Ok::<_, anyhow::Error>(())
        }));
    }
    // A short warm-up is counted out by measuring from a snapshot: simpler to measure the whole
    // window, which starts with the script already loaded (the creates ran it).
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let total = loads.load(Ordering::Relaxed) as f64;
    let server = (server_cpu(server.port())? - server_cpu_before) * 1e6 / total;
    let client = client_cpu()
        .zip(client_cpu_before)
        .map(|(a, b)| (a - b) * 1e6 / total);
    println!(
        "  cpu per load: server {server:.1} µs, client {} µs",
        client.map_or("?".to_owned(), |c| format!("{c:.1}"))
    );
    Ok(total / elapsed)
}

/// `used_cpu_user + used_cpu_sys` of the server, in seconds.
fn server_cpu(port: u16) -> anyhow::Result<f64> {
    let info = raw_command(port, &["INFO", "cpu"]).context("INFO cpu")?;
    let field = |name: &str| -> Option<f64> {
        info.lines()
            .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    field("used_cpu_user")
        .zip(field("used_cpu_sys"))
        .map(|(u, s)| u + s)
        .context("no used_cpu_* in INFO cpu")
}

/// User plus system CPU time of this process in seconds, from `/proc/self/stat` (`USER_HZ` is
/// 100 on Linux); `None` without `/proc`.
fn client_cpu() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// The least any script-based session read can do: fetch and move the expiry, in a script.
/// Reported as a second reference, the ceiling of every design that runs one script per load.
const MINIMAL_SCRIPT: &str =
    "local v = redis.call('GET', KEYS[1]) redis.call('PEXPIRE', KEYS[1], 1800000) return v";

/// Fills `key:<12 digits>` for `keys` keys with a session-sized value, then runs
/// `redis-benchmark … GETEX key:__rand_int__ PX 1800000` (or, with `script`, the minimal
/// script on the same keys) long enough to last about `seconds`.
fn redis_benchmark_getex(
    port: u16,
    keys: usize,
    seconds: u64,
    script: bool,
    shape: Shape,
) -> anyhow::Result<f64> {
    raw_command(port, &["FLUSHALL"]).context("FLUSHALL")?;
    let fill = "for i = 0, tonumber(ARGV[1]) - 1 do \
                redis.call('SET', string.format('key:%012d', i), ARGV[2]) end return 1";
    let value = "x".repeat(200);
    raw_command(port, &["EVAL", fill, "0", &keys.to_string(), &value]).context("filling keys")?;
    // A first short run to size the measured one.
    let probe = run_redis_benchmark(port, keys, 100_000, script, shape)?;
    let n = ((probe * seconds as f64) as u64).max(100_000);
    raw_command(port, &["CONFIG", "RESETSTAT"]).context("CONFIG RESETSTAT")?;
    let rate = run_redis_benchmark(port, keys, n, script, shape)?;
    let stats = raw_command(port, &["INFO", "commandstats"]).context("INFO")?;
    for line in stats
        .lines()
        .filter(|l| l.starts_with("cmdstat_getex") || l.starts_with("cmdstat_evalsha:"))
    {
        println!("  server: {line}");
    }
    Ok(rate)
}

/// `redis-benchmark`'s connections (`-c`) and requests pipelined on each (`-P`).
#[derive(Debug, Clone, Copy)]
struct Shape {
    clients: usize,
    pipeline: usize,
}

/// The reference of the ratios: 64 connections pipelining 64 requests each.
const CEILING: Shape = Shape {
    clients: 64,
    pipeline: 64,
};
/// Context: one connection with as many requests in flight as the subject's tasks.
const MATCHED: Shape = Shape {
    clients: 1,
    pipeline: TASKS,
};

fn run_redis_benchmark(
    port: u16,
    keys: usize,
    n: u64,
    script: bool,
    shape: Shape,
) -> anyhow::Result<f64> {
    let (n, keys) = (n.to_string(), keys.to_string());
    let (clients, pipeline) = (shape.clients.to_string(), shape.pipeline.to_string());
    let mut command = Command::new("redis-benchmark");
    match TLS.get() {
        Some((tls_port, ca)) => {
            command.args(["-h", "127.0.0.1", "-p", &tls_port.to_string(), "--tls"]);
            command.arg("--cacert").arg(ca);
        }
        None => {
            command.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
        }
    }
    command.args(["-n", &n, "-P", &pipeline, "-c", &clients, "-r", &keys, "-q"]);
    if script {
        let sha = raw_command(port, &["SCRIPT", "LOAD", MINIMAL_SCRIPT]).context("SCRIPT LOAD")?;
        command.args(["EVALSHA", &sha, "1", "key:__rand_int__"]);
    } else {
        command.args(["GETEX", "key:__rand_int__", "PX", "1800000"]);
    }
    let out = command
        .output()
        .context("running redis-benchmark (install redis-tools)")?;
    ensure!(
        out.status.success(),
        "redis-benchmark failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // `-q` prints "GETEX key:__rand_int__ PX 1800000: 123456.78 requests per second, p50=…"
    // after progress lines separated by '\r'.
    let line = text
        .split(['\r', '\n'])
        .rfind(|l| l.contains("requests per second"))
        .with_context(|| format!("no result in redis-benchmark's output: {text:?}"))?;
    let rate = line
        .split("requests per second")
        .next()
        .and_then(|before| before.split_whitespace().next_back())
        .and_then(|n| n.parse::<f64>().ok())
        .with_context(|| format!("cannot parse redis-benchmark's result {line:?}"))?;
    Ok(rate)
}
