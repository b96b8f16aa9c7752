//! The closed-loop load generator: N tasks, each deciding one request after another on a
//! uniformly random key until told to stop, and counters read at the start and end of the
//! measured window.

use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::cpu;

/// Something that decides one request on a key: a Statehouse store under a policy, or
/// governor's keyed limiter.
pub trait Limiter: Send + Sync + 'static {
    /// Decides one request of cost 1 on `key`; `Ok(true)` when admitted.
    ///
    /// The key is a `&String` because governor's `check_key(&K)` takes a reference to its key
    /// type, and both sides must get the same pre-built keys.
    #[allow(clippy::ptr_arg)]
    fn decide(&self, key: &String) -> impl Future<Output = statehouse_core::Result<bool>> + Send;
}

/// How an in-process task gives the scheduler a turn. The embedded store and governor answer
/// without ever suspending, so without this two tasks (one per worker thread) would run the
/// whole window while the other 62 waited; every task pays the same, whatever it measures.
const YIELD_EVERY: u64 = 64;

/// How long, how wide.
#[derive(Debug, Clone, Copy)]
pub struct LoadShape {
    /// Concurrent tasks.
    pub tasks: usize,
    /// Time the tasks run before the measured window opens.
    pub warmup: Duration,
    /// The measured window.
    pub measure: Duration,
}

/// What one measured window counted.
#[derive(Debug, Clone, Default)]
pub struct Throughput {
    /// Decisions completed (admitted or denied) within the window.
    pub decisions: u64,
    /// Of which admitted.
    pub admitted: u64,
    /// Calls that failed within the whole run (warm-up included).
    pub errors: u64,
    /// The first failure's message.
    pub first_error: Option<String>,
    /// The window's length as measured.
    pub elapsed: Duration,
    /// CPU time of this process (every thread) within the window, where `/proc` tells it.
    pub client_cpu: Option<Duration>,
    /// CPU time of the Redis server within the window, where it was sampled.
    pub server_cpu: Option<Duration>,
}

impl Throughput {
    /// Decisions per second.
    pub fn per_second(&self) -> f64 {
        self.decisions as f64 / self.elapsed.as_secs_f64()
    }

    /// The admitted share of decisions, 0 to 1.
    pub fn admitted_share(&self) -> f64 {
        if self.decisions == 0 {
            return 0.0;
        }
        self.admitted as f64 / self.decisions as f64
    }

    /// Adds another window's counts to this one, as if the two were one window. A CPU time
    /// stays known only if it is known for every window merged.
    pub fn merge(&mut self, other: Throughput) {
        let first = self.elapsed.is_zero();
        let add = |a: Option<Duration>, b: Option<Duration>| match (first, a, b) {
            (true, _, b) => b,
            (false, Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        self.client_cpu = add(self.client_cpu, other.client_cpu);
        self.server_cpu = add(self.server_cpu, other.server_cpu);
        self.decisions += other.decisions;
        self.admitted += other.admitted;
        self.errors += other.errors;
        self.first_error = self.first_error.take().or(other.first_error);
        self.elapsed += other.elapsed;
    }

    /// CPU microseconds per decision of `cpu`, if known.
    pub fn micros_per_decision(&self, cpu: Option<Duration>) -> Option<f64> {
        let cpu = cpu?;
        (self.decisions > 0).then(|| cpu.as_secs_f64() * 1e6 / self.decisions as f64)
    }
}

/// One task's counters, written only by that task (relaxed stores, no read-modify-write) and
/// read by the coordinator at the window's edges. Each on its own cache lines, so the tasks on
/// the two workers never contend on a counter line: the figures measure the limiter, not the
/// bookkeeping.
#[repr(align(128))]
#[derive(Default)]
struct TaskCounter {
    decisions: AtomicU64,
    admitted: AtomicU64,
    errors: AtomicU64,
}

/// Shared by the coordinator and every task of one run.
struct Run {
    counters: Box<[TaskCounter]>,
    stop: AtomicBool,
    first_error: Mutex<Option<String>>,
}

impl Run {
    fn totals(&self) -> (u64, u64, u64) {
        self.counters.iter().fold((0, 0, 0), |(d, a, e), c| {
            (
                d + c.decisions.load(Ordering::Relaxed),
                a + c.admitted.load(Ordering::Relaxed),
                e + c.errors.load(Ordering::Relaxed),
            )
        })
    }
}

/// Runs `shape.tasks` tasks against `limiters` (task `i` uses `limiters[i % len]`) over
/// `keys`, and counts the decisions of the measured window. `server_cpu` is sampled at the
/// window's edges (the Redis server's CPU time; `None` for in-process runs).
///
/// Must be called from within a multi-thread tokio runtime.
pub async fn closed_loop<L: Limiter>(
    limiters: &[Arc<L>],
    keys: &Arc<[String]>,
    shape: LoadShape,
    server_cpu: &dyn Fn() -> Option<Duration>,
) -> Throughput {
    assert!(!limiters.is_empty(), "closed_loop needs a limiter");
    let run = Arc::new(Run {
        counters: (0..shape.tasks).map(|_| TaskCounter::default()).collect(),
        stop: AtomicBool::new(false),
        first_error: Mutex::new(None),
    });
    let handles: Vec<_> = (0..shape.tasks)
        .map(|task| {
            let limiter = Arc::clone(&limiters[task % limiters.len()]);
            let keys = Arc::clone(keys);
            let run = Arc::clone(&run);
            // A fixed seed per task: reruns draw the same key sequences.
            let seed = 0x5eed_0000 + task as u64;
            tokio::spawn(drive(limiter, keys, run, task, seed))
        })
        .collect();

    tokio::time::sleep(shape.warmup).await;
    let (d0, a0, _) = run.totals();
    let (client0, server0) = (cpu::process_cpu(), server_cpu());
    let started = Instant::now();
    tokio::time::sleep(shape.measure).await;
    let (d1, a1, _) = run.totals();
    let elapsed = started.elapsed();
    let (client1, server1) = (cpu::process_cpu(), server_cpu());

    run.stop.store(true, Ordering::Relaxed);
    for handle in handles {
        // A task only ends by seeing `stop`; a panic in one is a bug worth seeing.
        if let Err(e) = handle.await {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    let (_, _, errors) = run.totals();
    let first_error = run
        .first_error
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    Throughput {
        decisions: d1 - d0,
        admitted: a1 - a0,
        errors,
        first_error,
        elapsed,
        client_cpu: client1.zip(client0).map(|(b, a)| b.saturating_sub(a)),
        server_cpu: server1.zip(server0).map(|(b, a)| b.saturating_sub(a)),
    }
}

async fn drive<L: Limiter>(
    limiter: Arc<L>,
    keys: Arc<[String]>,
    run: Arc<Run>,
    task: usize,
    seed: u64,
) {
    let counter = &run.counters[task];
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut decisions, mut admitted, mut errors) = (0u64, 0u64, 0u64);
    while !run.stop.load(Ordering::Relaxed) {
        let key = &keys[rng.usize(..keys.len())];
        match limiter.decide(key).await {
            Ok(allowed) => {
                decisions += 1;
                admitted += u64::from(allowed);
                counter.decisions.store(decisions, Ordering::Relaxed);
                counter.admitted.store(admitted, Ordering::Relaxed);
            }
            Err(e) => {
                errors += 1;
                counter.errors.store(errors, Ordering::Relaxed);
                let mut first = run
                    .first_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                first.get_or_insert_with(|| e.to_string());
            }
        }
        if (decisions + errors) % YIELD_EVERY == 0 {
            tokio::task::yield_now().await;
        }
    }
}

/// The pre-built keys every limiter is given: `user:0` to `user:{n-1}`. Short and brace-free,
/// so Statehouse stores them as they are (no hashing of the key itself).
pub fn keys(n: usize) -> Arc<[String]> {
    (0..n).map(|i| format!("user:{i}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_windows_count_as_one() {
        let window = |decisions, secs, cpu: Option<u64>| Throughput {
            decisions,
            admitted: decisions,
            elapsed: Duration::from_secs(secs),
            client_cpu: cpu.map(Duration::from_secs),
            ..Throughput::default()
        };
        let mut total = Throughput::default();
        total.merge(window(300, 1, Some(1)));
        total.merge(window(100, 1, Some(2)));
        assert_eq!(total.per_second(), 200.0);
        assert_eq!(total.client_cpu, Some(Duration::from_secs(3)));
        // One window without a CPU time makes the total unknown, not too small.
        total.merge(window(100, 1, None));
        assert_eq!(total.client_cpu, None);
    }

    #[test]
    fn keys_are_distinct_and_stored_verbatim() -> statehouse_core::Result<()> {
        let keys = keys(1000);
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), 1000);
        for key in keys.iter() {
            assert_eq!(statehouse_core::key::encode_key(key)?, key.as_str());
        }
        Ok(())
    }
}
