//! The Redis server the Redis runs and `redis-benchmark` share, and `redis-benchmark` itself:
//! the Redis ceiling of this machine.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use statehouse_testkit::{RedisServer, TlsOptions, test_certificates};

use crate::cpu::parse_info_cpu;

/// The minimal fixed-window script `redis-benchmark` runs: the least a Redis rate limiter can
/// do per decision in one atomic script call.
pub const CEILING_SCRIPT: &str = "local c = redis.call('INCR', KEYS[1]) \
     if c == 1 then redis.call('PEXPIRE', KEYS[1], 60000) end return c";

/// Where the Redis runs go.
#[derive(Debug)]
pub struct RedisTarget {
    url: String,
    /// The private server, killed on drop; `None` for `--redis-url`.
    private: Option<RedisServer>,
    /// Whether an external server may be flushed.
    flush_external: bool,
    /// For a private TLS server: the test CA, in a file for `redis-benchmark --cacert`
    /// (removed on drop).
    tls_ca_file: Option<PathBuf>,
}

impl Drop for RedisTarget {
    fn drop(&mut self) {
        if let Some(file) = &self.tls_ca_file {
            let _ = std::fs::remove_file(file);
        }
    }
}

impl RedisTarget {
    /// Starts a private, hermetic `redis-server` on a free loopback port.
    pub fn start_private() -> anyhow::Result<RedisTarget> {
        let server = RedisServer::start().context("starting a private redis-server")?;
        Ok(RedisTarget {
            url: server.url(),
            private: Some(server),
            flush_external: false,
            tls_ca_file: None,
        })
    }

    /// Starts a private, hermetic `redis-server` that the runs reach over TLS (`rediss://`,
    /// the test certificates of `statehouse-testkit`); `redis-benchmark` then runs with
    /// `--tls --cacert`. Administrative commands keep to the server's plain port.
    pub fn start_private_tls() -> anyhow::Result<RedisTarget> {
        let server = RedisServer::start_tls(TlsOptions::default())
            .context("starting a private redis-server with TLS")?;
        let file = std::env::temp_dir().join(format!(
            "statehouse-bench-ca-{}-{}.pem",
            std::process::id(),
            server.port()
        ));
        std::fs::write(&file, test_certificates().ca_pem()).context("writing the test CA")?;
        Ok(RedisTarget {
            url: server.tls_url(),
            private: Some(server),
            flush_external: false,
            tls_ca_file: Some(file),
        })
    }

    /// The CA to trust for a private TLS server (PEM), `None` otherwise.
    pub fn tls_root(&self) -> Option<&'static str> {
        self.tls_ca_file
            .as_ref()
            .map(|_| test_certificates().ca_pem())
    }

    /// An external server, flushed between runs only if `flush` is true.
    pub fn external(url: String, flush: bool) -> anyhow::Result<RedisTarget> {
        let target = RedisTarget {
            url,
            private: None,
            flush_external: flush,
            tls_ca_file: None,
        };
        target
            .command(&["PING"])
            .context("reaching the --redis-url server with redis-cli")?;
        Ok(target)
    }

    /// The connection URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether this is the private server (and so flushed between runs).
    pub fn is_private(&self) -> bool {
        self.private.is_some()
    }

    /// Sends one command: over a raw RESP socket to the private server, with `redis-cli -u` to
    /// an external one. Returns the reply as text.
    pub fn command(&self, args: &[&str]) -> anyhow::Result<String> {
        let reply = match &self.private {
            Some(server) => statehouse_testkit::raw_command(server.port(), args)
                .with_context(|| format!("sending {} to the private server", args[0]))?,
            None => {
                let out = Command::new("redis-cli")
                    .arg("-u")
                    .arg(&self.url)
                    .args(args)
                    .output()
                    .context("running redis-cli (install redis-tools)")?;
                ensure!(
                    out.status.success(),
                    "redis-cli {} failed: {}",
                    args[0],
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                String::from_utf8_lossy(&out.stdout).trim().to_owned()
            }
        };
        if reply.starts_with("ERR") {
            bail!("{} answered {reply}", args[0]);
        }
        Ok(reply)
    }

    /// Empties the server before a run: always the private one, an external one only with
    /// `--flush`. Returns whether it flushed. The script cache survives `FLUSHALL`.
    pub fn flush(&self) -> anyhow::Result<bool> {
        if self.private.is_none() && !self.flush_external {
            return Ok(false);
        }
        self.command(&["FLUSHALL"])?;
        Ok(true)
    }

    /// The server's CPU time so far (`INFO cpu`), `None` if it cannot be read.
    pub fn server_cpu(&self) -> Option<Duration> {
        parse_info_cpu(&self.command(&["INFO", "cpu"]).ok()?)
    }

    /// `redis_version` from `INFO server`.
    pub fn version(&self) -> String {
        self.command(&["INFO", "server"])
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.trim().strip_prefix("redis_version:").map(str::to_owned))
            })
            .unwrap_or_else(|| "unknown".to_owned())
    }
}

/// One `redis-benchmark` run, or several merged.
#[derive(Debug, Clone, Copy, Default)]
pub struct CeilingRun {
    /// Requests sent.
    pub requests: u64,
    /// Time they took, as redis-benchmark's rate implies (`requests / rps`).
    pub elapsed: Duration,
    /// The server's CPU time over the run, if it could be read.
    pub server_cpu: Option<Duration>,
}

impl CeilingRun {
    /// Requests (script calls, each one decision) per second.
    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    /// Server CPU microseconds per request, if known.
    pub fn server_micros_per_decision(&self) -> Option<f64> {
        self.server_cpu
            .map(|cpu| cpu.as_secs_f64() * 1e6 / self.requests as f64)
    }

    /// Adds another run, as if the two were one.
    pub fn merge(&mut self, other: CeilingRun) {
        self.server_cpu = match (self.requests, self.server_cpu, other.server_cpu) {
            (0, _, b) => b,
            (_, Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        self.requests += other.requests;
        self.elapsed += other.elapsed;
    }
}

/// How `redis-benchmark` is run.
#[derive(Debug, Clone, Copy)]
pub struct CeilingShape {
    /// Requests in all (`-n`).
    pub requests: u64,
    /// Connections (`-c`).
    pub clients: usize,
    /// Requests pipelined per connection (`-P`).
    pub pipeline: usize,
    /// Key space (`-r`): `__rand_int__` in the key becomes `000000000000` to `{keys-1}`.
    pub keys: usize,
}

/// A script for `redis-benchmark` to call, with its one key (holding `__rand_int__`) and its
/// arguments.
#[derive(Debug, Clone, Copy)]
pub struct ScriptCall<'a> {
    /// The Lua source.
    pub script: &'a str,
    /// The key, with `__rand_int__` where the random number goes.
    pub key: &'a str,
    /// `ARGV`.
    pub args: &'a [&'a str],
}

/// The ceiling's call: [`CEILING_SCRIPT`] on `rl:<random>`.
pub const CEILING_CALL: ScriptCall<'static> = ScriptCall {
    script: CEILING_SCRIPT,
    key: "rl:__rand_int__",
    args: &[],
};

/// Runs `redis-benchmark` calling `call.script` by `EVALSHA` (as the Statehouse store calls its
/// script: loaded once, then only its SHA travels) on uniformly random keys. The server is
/// flushed first. One call is made up front, so a script that fails is reported as such rather
/// than measured at the speed of its error replies.
pub fn redis_benchmark(
    target: &RedisTarget,
    call: ScriptCall<'_>,
    shape: CeilingShape,
) -> anyhow::Result<CeilingRun> {
    let sha = target.command(&["SCRIPT", "LOAD", call.script])?;
    ensure!(sha.len() == 40, "SCRIPT LOAD answered {sha:?}");
    target.flush()?;
    let probe_key = call.key.replace("__rand_int__", "probe");
    let mut probe = vec!["EVALSHA", &sha, "1", &probe_key];
    probe.extend_from_slice(call.args);
    target
        .command(&probe)
        .context("a trial call of the benchmarked script")?;
    target.flush()?;
    let mut command = vec!["EVALSHA", &sha, "1", call.key];
    command.extend_from_slice(call.args);
    run_redis_benchmark(target, &command, shape)
}

/// Runs `redis-benchmark` once with `command` (where `__rand_int__` in an argument becomes a
/// random number below `shape.keys`) against whatever the server holds now: nothing is
/// flushed or loaded. The server's CPU time is sampled around the run.
pub fn run_redis_benchmark(
    target: &RedisTarget,
    command: &[&str],
    shape: CeilingShape,
) -> anyhow::Result<CeilingRun> {
    let before = target.server_cpu();
    let mut benchmark = Command::new("redis-benchmark");
    if let Some(ca) = &target.tls_ca_file {
        benchmark.arg("--tls").arg("--cacert").arg(ca);
    }
    let out = benchmark
        .arg("-u")
        .arg(target.url())
        .args(["-n", &shape.requests.to_string()])
        .args(["-c", &shape.clients.to_string()])
        .args(["-P", &shape.pipeline.to_string()])
        .args(["-r", &shape.keys.to_string()])
        .arg("--csv")
        .args(command)
        .output()
        .context("running redis-benchmark (install redis-tools)")?;
    let after = target.server_cpu();
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "redis-benchmark failed ({}): {}{}",
        out.status,
        stdout.trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let per_second = parse_csv_rps(&stdout).with_context(|| {
        format!("reading requests per second from redis-benchmark's output {stdout:?}")
    })?;
    ensure!(
        per_second > 0.0,
        "redis-benchmark reported {per_second} requests/s"
    );
    Ok(CeilingRun {
        requests: shape.requests,
        elapsed: Duration::from_secs_f64(shape.requests as f64 / per_second),
        server_cpu: after.zip(before).map(|(b, a)| b.saturating_sub(a)),
    })
}

/// The `rps` column of `redis-benchmark --csv` output: a header row naming the columns, then
/// one row for the command. Fields are double-quoted (the test name holds the command line,
/// which may hold commas and quotes, doubled).
fn parse_csv_rps(csv: &str) -> Option<f64> {
    let mut rows = csv.lines().filter(|l| !l.trim().is_empty()).map(csv_fields);
    let header = rows.next()?;
    let column = header.iter().position(|h| h == "rps")?;
    let row = rows.next()?;
    row.get(column)?.parse().ok()
}

fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.trim_end().chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    fields.push(field);
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rps_from_redis_benchmark_csv() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\"\n\
                   \"EVALSHA abc 1 rl:__rand_int__, with \"\"quotes\"\"\",\"191216.83\",\"21.038\",\"1.064\"\n";
        assert_eq!(parse_csv_rps(csv), Some(191_216.83));
    }

    #[test]
    fn merged_runs_report_the_overall_rate() {
        let run = |requests, secs| CeilingRun {
            requests,
            elapsed: Duration::from_secs(secs),
            server_cpu: Some(Duration::from_secs(1)),
        };
        let mut total = CeilingRun::default();
        total.merge(run(300, 1));
        total.merge(run(100, 1));
        assert_eq!(total.per_second(), 200.0);
        assert_eq!(total.server_micros_per_decision(), Some(5_000.0));
    }

    #[test]
    fn refuses_output_without_an_rps_column() {
        assert_eq!(parse_csv_rps("\"test\",\"x\"\n\"a\",\"1\"\n"), None);
        assert_eq!(parse_csv_rps(""), None);
    }
}
