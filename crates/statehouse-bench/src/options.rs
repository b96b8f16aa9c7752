//! The command line of `ratelimit-bench`.

use std::time::Duration;

use anyhow::{Context, bail};
use statehouse_core::Algorithm;

use crate::cli::{Flags, number, positive};

/// What `--help` prints.
pub const USAGE: &str = "\
ratelimit-bench: decisions per second of Statehouse's stores, with references measured in the
same run (redis-benchmark's pipelined fixed-window script, governor's keyed limiter).

USAGE:
    cargo run --release -p statehouse-bench --bin ratelimit-bench -- [OPTIONS]

OPTIONS:
    --seconds N        measured seconds per run (default 5)
    --warmup N         warm-up seconds before each measured run (default 1)
    --tasks N          concurrent tokio tasks (default 64)
    --keys N           distinct keys, picked uniformly at random (default 10000)
    --redis-url URL    use this Redis server instead of starting a private one; it is NOT
                       flushed unless --flush is given (runs use their own key prefix)
    --flush            FLUSHALL the --redis-url server before each run (destructive)
    --tls              reach the private redis-server over TLS (rediss://, test
                       certificates), redis-benchmark too (--tls): the cost of TLS
    --connections N    RedisStore instances (one multiplexed connection each) shared
                       round-robin by the tasks (default 1)
    --client-threads N tokio worker threads of the Redis runs (default 1: like
                       redis-benchmark's single client thread, leaving the other core
                       to redis-server; the in-process runs use every core)
    --rounds N         the two headline pairs (governor / embedded GCRA, redis-benchmark /
                       Redis GCRA) alternate N times, --seconds/N each, so that a noisy
                       neighbour weighs on both sides of a ratio alike (default 5)
    --algorithms LIST  comma-separated subset, e.g. gcra,fixed_window (default: all six)
    --no-redis         skip every Redis measurement
    --no-embedded      skip every in-process measurement (embedded store, governor)
    -h, --help         print this help
";

/// Parsed options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Length of each measured run.
    pub measure: Duration,
    /// Length of the warm-up before each measured run.
    pub warmup: Duration,
    /// Concurrent tasks.
    pub tasks: usize,
    /// Distinct keys.
    pub keys: usize,
    /// An external Redis server, instead of the private one.
    pub redis_url: Option<String>,
    /// Whether an external server may be flushed between runs.
    pub flush_external: bool,
    /// Whether the private server is reached over TLS.
    pub tls: bool,
    /// How many `RedisStore`s (connections) the tasks share.
    pub connections: usize,
    /// Worker threads of the runtime the Redis runs use.
    pub client_threads: usize,
    /// Which algorithms to run, in `Algorithm::ALL` order.
    pub algorithms: Vec<Algorithm>,
    /// How many times each headline pair alternates.
    pub rounds: u32,
    /// Whether to run the Redis measurements at all.
    pub redis: bool,
    /// Whether to run the in-process measurements at all.
    pub embedded: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            measure: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            tasks: 64,
            keys: 10_000,
            redis_url: None,
            flush_external: false,
            tls: false,
            connections: 1,
            client_threads: 1,
            algorithms: Algorithm::ALL.to_vec(),
            rounds: 5,
            redis: true,
            embedded: true,
        }
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// Run the benchmark.
    Run(Options),
    /// Print [`USAGE`].
    Help,
}

/// Parses the arguments after the program name. Accepts `--flag value` and `--flag=value`.
pub fn parse(args: impl IntoIterator<Item = String>) -> anyhow::Result<Command> {
    let mut options = Options::default();
    let mut flags = Flags::new(args);
    while let Some((flag, inline)) = flags.next_flag() {
        let mut value = || flags.value(&flag, &inline);
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--seconds" => options.measure = Duration::from_secs(positive(&flag, &value()?)?),
            "--warmup" => options.warmup = Duration::from_secs(number(&flag, &value()?)?),
            "--tasks" => options.tasks = positive(&flag, &value()?)?,
            "--keys" => options.keys = positive(&flag, &value()?)?,
            "--redis-url" => options.redis_url = Some(value()?),
            "--flush" => options.flush_external = true,
            "--tls" => options.tls = true,
            "--connections" => options.connections = positive(&flag, &value()?)?,
            "--client-threads" => options.client_threads = positive(&flag, &value()?)?,
            "--algorithms" => options.algorithms = algorithms(&value()?)?,
            "--rounds" => options.rounds = positive(&flag, &value()?)?,
            "--no-redis" => options.redis = false,
            "--no-embedded" => options.embedded = false,
            other => bail!("unknown argument {other:?}; see --help"),
        }
    }
    Ok(Command::Run(options))
}

/// Parses `gcra,fixed_window`, keeping `Algorithm::ALL`'s order and dropping repeats.
fn algorithms(list: &str) -> anyhow::Result<Vec<Algorithm>> {
    let named = list
        .split(',')
        .map(|name| name.trim().parse::<Algorithm>())
        .collect::<Result<Vec<_>, _>>()
        .context("--algorithms")?;
    if named.is_empty() {
        bail!("--algorithms names no algorithm");
    }
    Ok(Algorithm::ALL
        .into_iter()
        .filter(|a| named.contains(a))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> anyhow::Result<Options> {
        match parse(args.iter().map(|s| (*s).to_owned()))? {
            Command::Run(options) => Ok(options),
            Command::Help => bail!("help"),
        }
    }

    #[test]
    fn defaults_match_the_documented_workload() -> anyhow::Result<()> {
        let o = run(&[])?;
        assert_eq!((o.tasks, o.keys, o.connections), (64, 10_000, 1));
        assert_eq!(o.measure, Duration::from_secs(5));
        assert_eq!(o.algorithms.len(), 6);
        assert!(!o.tls);
        assert!(run(&["--tls"])?.tls);
        Ok(())
    }

    #[test]
    fn both_value_forms_parse() -> anyhow::Result<()> {
        let o = run(&[
            "--seconds",
            "2",
            "--keys=50",
            "--algorithms",
            "gcra,fixed_window",
        ])?;
        assert_eq!(o.measure, Duration::from_secs(2));
        assert_eq!(o.keys, 50);
        assert_eq!(o.algorithms, [Algorithm::FixedWindow, Algorithm::Gcra]);
        Ok(())
    }

    #[test]
    fn bad_input_is_rejected() {
        assert!(run(&["--tasks", "0"]).is_err());
        assert!(run(&["--seconds"]).is_err());
        assert!(run(&["--algorithms", "nope"]).is_err());
        assert!(run(&["--bogus"]).is_err());
    }
}
