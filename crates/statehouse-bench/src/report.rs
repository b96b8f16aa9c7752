//! The Markdown report, ready to paste into `BENCHMARKS.md`.

use std::fmt::Write as _;

use statehouse_core::Algorithm;

use crate::cli::grouped;
use crate::suite::Results;

/// Redis GCRA must reach this share of the `redis-benchmark` ceiling.
pub const REDIS_TARGET: f64 = 0.5;
/// Embedded GCRA must reach this multiple of governor's keyed limiter.
pub const EMBEDDED_TARGET: f64 = 1.0;

/// Renders everything measured as Markdown.
pub fn markdown(results: &Results) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_report(&mut out, results);
    out
}

fn write_report(out: &mut String, r: &Results) -> std::fmt::Result {
    let o = &r.setup.options;
    writeln!(out)?;
    writeln!(out, "### Setup")?;
    writeln!(out)?;
    writeln!(
        out,
        "{} cores; {} tokio tasks on a multi-thread runtime ({} workers); {} keys picked \
         uniformly at random; {} s warm-up, then {} s measured per run. GCRA and its reference \
         alternate in {} rounds of {:.1} s (a {} ms warm-up after the first).",
        r.setup.cores,
        o.tasks,
        r.setup.cores,
        o.keys,
        o.warmup.as_secs(),
        o.measure.as_secs(),
        o.rounds,
        (o.measure / o.rounds).as_secs_f64(),
        o.warmup
            .min(std::time::Duration::from_millis(250))
            .as_millis(),
    )?;
    match &r.setup.redis {
        Some(redis) => writeln!(
            out,
            "Redis: {redis}; {} `RedisStore` (one multiplexed connection each) shared by the \
             tasks, on {} tokio worker thread(s) (`--client-threads`; redis-benchmark runs one).",
            o.connections, o.client_threads
        )?,
        None => writeln!(out, "Redis: not measured (`--no-redis`).")?,
    }
    writeln!(out)?;

    writeln!(out, "### Decisions per second, by algorithm")?;
    writeln!(out)?;
    writeln!(
        out,
        "| Algorithm | Policy | Embedded | admitted | Redis | admitted | Redis client CPU µs/decision | Redis server CPU µs/decision |"
    )?;
    writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|")?;
    for algorithm in Algorithm::ALL {
        let embedded = r.embedded.iter().find(|x| x.algorithm == algorithm);
        let redis = r.redis.iter().find(|x| x.algorithm == algorithm);
        let Some(policy) = embedded.or(redis).map(|x| &x.policy) else {
            continue;
        };
        let (e, t) = (
            embedded.map(|x| &x.throughput),
            redis.map(|x| &x.throughput),
        );
        writeln!(
            out,
            "| {algorithm:?} | {} per hour | {} | {} | {} | {} | {} | {} |",
            grouped(policy.limit() as f64),
            e.map_or("–".into(), |e| grouped(e.per_second())),
            e.map_or("–".into(), |e| percent(e.admitted_share())),
            t.map_or("–".into(), |t| grouped(t.per_second())),
            t.map_or("–".into(), |t| percent(t.admitted_share())),
            t.and_then(|t| t.micros_per_decision(t.client_cpu))
                .map_or("–".into(), |v| format!("{v:.1}")),
            t.and_then(|t| t.micros_per_decision(t.server_cpu))
                .map_or("–".into(), |v| format!("{v:.1}")),
        )?;
    }
    writeln!(out)?;

    writeln!(out, "### References, measured in the same run")?;
    writeln!(out)?;
    writeln!(out, "| Reference | decisions/s | server CPU µs/decision |")?;
    writeln!(out, "|---|---:|---:|")?;
    if let Some(c) = r.ceiling {
        writeln!(
            out,
            "| **Redis ceiling**: `redis-benchmark -c {} -P 64 -r {}`, `EVALSHA` of the minimal fixed-window script | {} | {} |",
            o.tasks,
            o.keys,
            grouped(c.per_second()),
            c.server_micros_per_decision()
                .map_or("–".into(), |v| format!("{v:.1}"))
        )?;
    }
    if let Some(c) = r.ceiling_unpipelined {
        writeln!(
            out,
            "| (context) the same with `-P 1`: no pipelining | {} | {} |",
            grouped(c.per_second()),
            c.server_micros_per_decision()
                .map_or("–".into(), |v| format!("{v:.1}"))
        )?;
    }
    if let Some(c) = r.ceiling_matched {
        writeln!(
            out,
            "| (context) the same with `-c 1 -P {}`: one connection with {} requests in flight, as many as the subject's tasks (the ceiling has {}) | {} | {} |",
            o.tasks,
            o.tasks,
            grouped((o.tasks * 64) as f64),
            grouped(c.per_second()),
            c.server_micros_per_decision()
                .map_or("–".into(), |v| format!("{v:.1}"))
        )?;
    }
    if let Some(c) = r.statehouse_script_ceiling {
        writeln!(
            out,
            "| (context) the same `-P 64` load calling Statehouse's own `limiter.lua` with the GCRA policy | {} | {} |",
            grouped(c.per_second()),
            c.server_micros_per_decision()
                .map_or("–".into(), |v| format!("{v:.1}"))
        )?;
    }
    if let Some(g) = &r.governor {
        writeln!(
            out,
            "| **In-process reference**: governor `DefaultKeyedRateLimiter<String>`, `check_key` | {} | – |",
            grouped(g.per_second())
        )?;
    }
    if let Some(t) = &r.embedded_direct_gcra {
        writeln!(
            out,
            "| (context) embedded GCRA through `EmbeddedStore::check_one` (no trait call) | {} | – |",
            grouped(t.per_second())
        )?;
    }
    writeln!(out)?;

    writeln!(out, "### Ratios")?;
    writeln!(out)?;
    writeln!(out, "| Ratio | value | target | result |")?;
    writeln!(out, "|---|---:|---:|---|")?;
    ratio_row(
        out,
        "Redis GCRA ÷ Redis ceiling (median of the rounds)",
        r.redis_ratio(),
        REDIS_TARGET,
    )?;
    if !r.redis_round_ratios.is_empty() {
        writeln!(
            out,
            "| (context) the same ratio per round; pooled over the rounds | {}; {} | – | – |",
            r.redis_round_ratios
                .iter()
                .map(|v| format!("{v:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            r.pooled_redis_ratio()
                .map_or("–".to_owned(), |v| format!("{v:.2}"))
        )?;
    }
    ratio_row(
        out,
        "Embedded GCRA ÷ governor keyed",
        r.embedded_ratio(),
        EMBEDDED_TARGET,
    )?;
    if let (Some(direct), Some(g)) = (&r.embedded_direct_gcra, &r.governor) {
        writeln!(
            out,
            "| (context) embedded GCRA `check_one` ÷ governor keyed | {:.2} | – | – |",
            direct.per_second() / g.per_second()
        )?;
    }
    let redis_gcra = r.redis.iter().find(|x| x.algorithm == Algorithm::Gcra);
    if let (Some(gcra), Some(matched)) = (redis_gcra, r.ceiling_matched) {
        writeln!(
            out,
            "| (context) Redis GCRA ÷ the script at `-c 1 -P {}` (the same requests in flight) | {:.2} | – | – |",
            o.tasks,
            gcra.throughput.per_second() / matched.per_second()
        )?;
    }
    if let (Some(gcra), Some(script)) = (redis_gcra, r.statehouse_script_ceiling) {
        writeln!(
            out,
            "| (context) Redis GCRA ÷ redis-benchmark on Statehouse's own script | {:.2} | – | – |",
            gcra.throughput.per_second() / script.per_second()
        )?;
    }
    writeln!(out)?;

    writeln!(out, "### Latency of one decision, single task (ns)")?;
    writeln!(out)?;
    writeln!(out, "| Subject | p50 | p99 | p99.9 | samples |")?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    for (name, l) in &r.latencies {
        writeln!(
            out,
            "| {name} | {} | {} | {} | {} |",
            grouped(l.p50 as f64),
            grouped(l.p99 as f64),
            grouped(l.p999 as f64),
            grouped(l.samples as f64)
        )?;
    }
    if let Some(l) = r.timer_overhead {
        writeln!(
            out,
            "| (floor) the timing itself, two `Instant::now()` | {} | {} | {} | {} |",
            l.p50,
            l.p99,
            l.p999,
            grouped(l.samples as f64)
        )?;
    }
    writeln!(out)?;
    let failed = r.failed_runs();
    if !failed.is_empty() {
        writeln!(out, "**Calls failed** during: {}", failed.join("; "))?;
        writeln!(out)?;
    }
    Ok(())
}

fn ratio_row(out: &mut String, name: &str, ratio: Option<f64>, target: f64) -> std::fmt::Result {
    match ratio {
        Some(v) => writeln!(
            out,
            "| {name} | {v:.2} | ≥ {target:.1} | {} |",
            if v >= target { "PASS" } else { "BELOW" }
        ),
        None => writeln!(out, "| {name} | – | ≥ {target:.1} | not measured |"),
    }
}

fn percent(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_thousands() {
        assert_eq!(grouped(0.4), "0");
        assert_eq!(grouped(999.0), "999");
        assert_eq!(grouped(1_000.0), "1,000");
        assert_eq!(grouped(12_345_678.9), "12,345,679");
    }
}
