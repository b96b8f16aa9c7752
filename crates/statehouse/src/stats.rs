//! Counters of what a limiter did, kept in atomics and read as a plain struct.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::breaker::BreakerState;

/// A snapshot of a [`RateLimiter`](crate::RateLimiter)'s counters, from
/// [`RateLimiter::stats`](crate::RateLimiter::stats).
///
/// Every counter is monotonic since the limiter was built, shared by its clones. This crate
/// exports no metrics itself: a caller (the Statehouse gateway, for instance) reads this struct
/// and exports it to Prometheus or OpenTelemetry as counters, without the library depending on
/// a metrics crate. Transitions of the circuit breaker are also reported as `tracing` events.
///
/// "Decisions" are the consuming checks: [`check`](crate::RateLimiter::check),
/// [`check_cost`](crate::RateLimiter::check_cost), [`acquire`](crate::RateLimiter::acquire) and
/// [`check_all`](crate::RateLimiter::check_all) (one per call, allowed only if every limit
/// allowed). Peeks, resets and calls that returned an error are not decisions, but their store
/// failures are counted.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), statehouse::Error> {
/// use std::time::Duration;
/// use statehouse::{BreakerState, EmbeddedStore, Policy, RateLimiter};
///
/// let limiter = RateLimiter::new(EmbeddedStore::new());
/// let policy = Policy::token_bucket(1, Duration::from_secs(60))?;
/// limiter.check("k", &policy).await?;
/// limiter.check("k", &policy).await?;
/// let stats = limiter.stats();
/// assert_eq!((stats.decisions, stats.allowed, stats.denied), (2, 1, 1));
/// assert_eq!(stats.degraded_decisions, 0);
/// assert_eq!(stats.breaker_state, BreakerState::Closed);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct LimiterStats {
    /// Consuming checks answered with a decision (`allowed + denied`).
    pub decisions: u64,
    /// Decisions that admitted the request.
    pub allowed: u64,
    /// Decisions that denied the request.
    pub denied: u64,
    /// Decisions made by the degraded policy rather than the store (included in `allowed` or
    /// `denied`).
    pub degraded_decisions: u64,
    /// Store calls that failed as unavailable, including those past the deadline.
    pub store_failures: u64,
    /// Store calls that timed out: cut at the limiter's deadline, or timed out inside the store
    /// itself (included in `store_failures`).
    pub timeouts: u64,
    /// Store calls answered with an error that is not an outage (a script error, a corrupt
    /// value): returned to the caller, never degraded, and not counted as breaker failures.
    pub backend_errors: u64,
    /// Times the circuit breaker went from closed to open (a failed half-open probe re-opens it
    /// without counting again); with one breaker per failure domain of the store (Redis
    /// Cluster), the sum over them.
    pub breaker_opened: u64,
    /// Where the circuit breaker stands now; with one per failure domain, the one furthest from
    /// closed (open, then half-open).
    pub breaker_state: BreakerState,
}

/// The live counters behind [`LimiterStats`]. Relaxed atomics: each counter is exact, but a
/// snapshot taken during traffic may be a few increments apart between fields.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) decisions: AtomicU64,
    pub(crate) allowed: AtomicU64,
    pub(crate) denied: AtomicU64,
    pub(crate) degraded_decisions: AtomicU64,
    pub(crate) store_failures: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) backend_errors: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_decision(&self, allowed: bool, degraded: bool) {
        Self::bump(&self.decisions);
        Self::bump(if allowed { &self.allowed } else { &self.denied });
        if degraded {
            Self::bump(&self.degraded_decisions);
        }
    }

    pub(crate) fn snapshot(
        &self,
        breaker_opened: u64,
        breaker_state: BreakerState,
    ) -> LimiterStats {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LimiterStats {
            decisions: read(&self.decisions),
            allowed: read(&self.allowed),
            denied: read(&self.denied),
            degraded_decisions: read(&self.degraded_decisions),
            store_failures: read(&self.store_failures),
            timeouts: read(&self.timeouts),
            backend_errors: read(&self.backend_errors),
            breaker_opened,
            breaker_state,
        }
    }
}
