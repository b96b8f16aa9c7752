//! The Markdown report, ready to paste into `BENCHMARKS.md`.

use std::fmt::Write as _;

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
         uniformly at random; {} s warm-up, then {} s measured per run.",
        r.setup.cores,
        o.tasks,
        r.setup.cores,
        o.keys,
        o.warmup.as_secs(),
        o.measure.as_secs()
    )?;
    match &r.setup.redis {
        Some(redis) => writeln!(
            out,
            "Redis: {redis}; {} `RedisStore` (one multiplexed connection each) shared by the tasks.",
            o.connections
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
    for row in &r.embedded {
        let redis = r.redis.iter().find(|x| x.algorithm == row.algorithm);
        let t = redis.map(|x| &x.throughput);
        writeln!(
            out,
            "| {:?} | {} per hour | {} | {} | {} | {} | {} | {} |",
            row.algorithm,
            grouped(row.policy.limit() as f64),
            grouped(row.throughput.per_second()),
            percent(row.throughput.admitted_share()),
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
            grouped(c.per_second),
            c.server_micros_per_decision()
                .map_or("–".into(), |v| format!("{v:.1}"))
        )?;
    }
    if let Some(c) = r.ceiling_unpipelined {
        writeln!(
            out,
            "| (context) the same with `-P 1`: no pipelining | {} | {} |",
            grouped(c.per_second),
            c.server_micros_per_decision()
                .map_or("–".into(), |v| format!("{v:.1}"))
        )?;
    }
    writeln!(
        out,
        "| **In-process reference**: governor `DefaultKeyedRateLimiter<String>`, `check_key` | {} | – |",
        grouped(r.governor.per_second())
    )?;
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
        "Redis GCRA ÷ Redis ceiling",
        r.redis_ratio(),
        REDIS_TARGET,
    )?;
    ratio_row(
        out,
        "Embedded GCRA ÷ governor keyed",
        r.embedded_ratio(),
        EMBEDDED_TARGET,
    )?;
    if let Some(direct) = &r.embedded_direct_gcra {
        writeln!(
            out,
            "| (context) embedded GCRA `check_one` ÷ governor keyed | {:.2} | – | – |",
            direct.per_second() / r.governor.per_second()
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

/// A rate rounded to a whole number, with thousands separated by commas.
fn grouped(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
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
