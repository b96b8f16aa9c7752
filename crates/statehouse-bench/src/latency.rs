//! Latency of one decision, from a single task: every call timed, percentiles from the sorted
//! samples (exact, no histogram buckets).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::load::Limiter;

/// The most samples kept: 8 MB, and enough for a stable p99.9.
const MAX_SAMPLES: usize = 1_000_000;

/// Percentiles of one latency run, in nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Samples taken.
    pub samples: usize,
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

/// Times decisions on uniformly random keys from one task: `warmup` untimed, then up to
/// `measure` (or [`MAX_SAMPLES`] decisions) timed one by one. `None` if every call failed.
pub async fn single_task<L: Limiter>(
    limiter: &L,
    keys: &Arc<[String]>,
    warmup: Duration,
    measure: Duration,
) -> Option<Latency> {
    let mut rng = fastrand::Rng::with_seed(0x1a7e_0c1e);
    let warm_until = Instant::now() + warmup;
    while Instant::now() < warm_until {
        for _ in 0..64 {
            let _ = limiter.decide(&keys[rng.usize(..keys.len())]).await;
        }
    }
    let mut samples = Vec::with_capacity(MAX_SAMPLES);
    let until = Instant::now() + measure;
    while samples.len() < MAX_SAMPLES && Instant::now() < until {
        for _ in 0..64 {
            let key = &keys[rng.usize(..keys.len())];
            let started = Instant::now();
            let result = limiter.decide(key).await;
            let took = started.elapsed();
            if result.is_ok() {
                samples.push(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
            }
        }
    }
    Latency::from_samples(samples)
}

/// The cost of the timing itself (two `Instant::now()` reads), as the same percentiles: the
/// floor under every in-process latency figure.
pub fn timer_overhead() -> Option<Latency> {
    let samples = (0..100_000)
        .map(|_| {
            let started = Instant::now();
            let took = black_box(started).elapsed();
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX)
        })
        .collect();
    Latency::from_samples(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_samples() {
        let latency = Latency::from_samples((1..=1000).rev().collect()).expect("samples");
        assert_eq!((latency.p50, latency.p99, latency.p999), (501, 990, 999));
        assert!(Latency::from_samples(Vec::new()).is_none());
    }
}
