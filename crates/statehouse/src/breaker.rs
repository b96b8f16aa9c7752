//! The circuit breaker in front of the store: after a run of failures, stop calling it for a
//! while, then let exactly one caller find out whether it is back.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use statehouse_core::{Clock, Error, Timestamp};

/// How the circuit breaker in front of the store trips and recovers.
///
/// * **Closed** (normal): every call goes to the store. `failure_threshold` failures in a row
///   (unavailable or past the deadline) open the breaker.
/// * **Open**: calls skip the store entirely, costing microseconds instead of a deadline each,
///   and follow the [`DegradedPolicy`](crate::DegradedPolicy).
/// * **Half-open**: once `open_for` has passed (on the limiter's [`Clock`]), exactly one caller
///   probes the store while every other caller keeps degrading. A successful probe closes the
///   breaker; a failed one opens it for another `open_for`.
///
/// ```
/// use std::time::Duration;
/// use statehouse::CircuitBreakerConfig;
///
/// let config = CircuitBreakerConfig { open_for: Duration::from_secs(5), ..Default::default() };
/// assert_eq!(config.failure_threshold, 3);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreakerConfig {
    /// Consecutive store failures that open the breaker. At least 1; default 3.
    pub failure_threshold: u32,
    /// How long the breaker stays open before one probe is let through. More than zero;
    /// default 1 s.
    pub open_for: Duration,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(1),
        }
    }
}

impl CircuitBreakerConfig {
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.failure_threshold == 0 {
            return Err(Error::InvalidInput(
                "circuit_breaker.failure_threshold must be at least 1".into(),
            ));
        }
        if self.open_for.is_zero() {
            return Err(Error::InvalidInput(
                "circuit_breaker.open_for must be more than zero".into(),
            ));
        }
        Ok(())
    }
}

/// Where the circuit breaker stands, as reported by [`LimiterStats`](crate::LimiterStats).
///
/// ```
/// use statehouse::BreakerState;
/// assert_eq!(BreakerState::default(), BreakerState::Closed);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls go to the store.
    #[default]
    Closed,
    /// Calls skip the store and follow the degraded policy.
    Open,
    /// `open_for` has passed: the next caller probes the store (or a probe is in flight).
    HalfOpen,
}

// The stored state. `PROBING` is half-open with the one probe already taken; half-open with
// the probe still free is `OPEN` with `opened_at + open_for` in the past, so that taking the
// probe is a single compare-and-swap from `OPEN` to `PROBING`.
const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const PROBING: u8 = 2;

/// The breaker itself. Lock-free: every call on the closed fast path is one atomic load (and
/// one more only after failures), so the breaker adds no contention point to a hot limiter.
/// A `Mutex` was considered and rejected for that reason, not for correctness.
#[derive(Debug)]
pub(crate) struct CircuitBreaker {
    config: CircuitBreakerConfig,
    open_for_us: u64,
    state: AtomicU8,
    consecutive_failures: AtomicU32,
    /// When the breaker last opened (µs on the limiter's clock). Written before `state` is set
    /// to `OPEN` (release), read after `state` is seen `OPEN` (acquire).
    opened_at_us: AtomicU64,
    /// Bumped each time the breaker closes, so that a call admitted before an outage and
    /// finishing after the recovery cannot count against the fresh closed period.
    generation: AtomicU64,
    /// Times the breaker went from closed to open.
    opened_count: AtomicU64,
}

/// The most circuit breakers a facade keeps, whatever number of failure domains its store
/// names.
pub const MAX_BREAKERS: usize = 64;

/// One [`CircuitBreaker`] per failure domain of a store (see
/// `RateLimitStore::failure_domains`): a dead part of the store opens its own breaker only, and
/// the parts that answer keep theirs closed. With one breaker for a store whose parts fail
/// apart (the masters of a Redis Cluster), the live parts' successes reset the run of failures,
/// so it never opens, and once open it degrades every key.
#[derive(Debug)]
pub(crate) struct Breakers {
    breakers: Box<[CircuitBreaker]>,
}

impl Breakers {
    /// `domains` breakers (1 to [`MAX_BREAKERS`]) of `config`.
    pub(crate) fn new(config: CircuitBreakerConfig, domains: usize) -> Self {
        Breakers {
            breakers: (0..domains.clamp(1, MAX_BREAKERS))
                .map(|_| CircuitBreaker::new(config))
                .collect(),
        }
    }

    /// Whether there is more than one (so that a caller asks the store for a domain at all).
    pub(crate) fn per_domain(&self) -> bool {
        self.breakers.len() > 1
    }

    /// The breaker of `domain` (any number: it wraps).
    pub(crate) fn of(&self, domain: usize) -> &CircuitBreaker {
        &self.breakers[domain % self.breakers.len()]
    }

    pub(crate) fn config(&self) -> &CircuitBreakerConfig {
        self.breakers[0].config()
    }

    /// Times any of them went from closed to open.
    pub(crate) fn opened_count(&self) -> u64 {
        self.breakers.iter().map(CircuitBreaker::opened_count).sum()
    }

    /// The state of the one furthest from closed (open, then half-open).
    pub(crate) fn state(&self, clock: &dyn Clock) -> BreakerState {
        self.breakers
            .iter()
            .map(|b| b.state(clock))
            .max_by_key(|state| match state {
                BreakerState::Closed => 0,
                BreakerState::HalfOpen => 1,
                BreakerState::Open => 2,
            })
            .unwrap_or_default()
    }
}

/// Circuit breakers for code that calls a store on its own (the HTTP cache layer of
/// `statehouse-tower`), as the [`RateLimiter`](crate::RateLimiter), the [`Cache`](crate::Cache)
/// and [`Sessions`](crate::Sessions) keep them: one per failure domain of the store (the
/// store's `failure_domains()`, at most [`MAX_BREAKERS`]), each opening after
/// `failure_threshold` failures in a row for `open_for` on `clock`, then letting one probe
/// through.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::sync::Arc;
/// use statehouse::{CircuitBreakerConfig, Error, ManualClock, StoreBreakers};
///
/// let clock = ManualClock::starting_now();
/// let breakers = StoreBreakers::new(CircuitBreakerConfig::default(), 1, Arc::new(clock.clone()))
///     .expect("valid");
/// for _ in 0..3 {
///     let down = breakers.call(0, async { Err::<(), _>(Error::Timeout { deadline: Default::default() }) });
///     assert!(down.await.is_err());
/// }
/// // Open: the call is not made.
/// let skipped = breakers.call(0, async { Ok::<_, Error>(1) }).await;
/// assert!(skipped.unwrap_err().is_unavailable());
/// # }
/// ```
#[derive(Debug)]
pub struct StoreBreakers {
    breakers: Breakers,
    clock: Arc<dyn Clock>,
}

impl StoreBreakers {
    /// `domains` breakers (1 to [`MAX_BREAKERS`]) of `config` on `clock`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a zero `failure_threshold` or `open_for`.
    pub fn new(
        config: CircuitBreakerConfig,
        domains: usize,
        clock: Arc<dyn Clock>,
    ) -> Result<StoreBreakers, Error> {
        config.validate()?;
        Ok(StoreBreakers {
            breakers: Breakers::new(config, domains),
            clock,
        })
    }

    /// Runs `call` through the breaker of `domain` (any number: it wraps): while that breaker
    /// is open, an [`Error::Unavailable`] at once and `call` is not polled; otherwise `call`'s
    /// result, its outcome counted (an error for which [`Error::is_unavailable`] holds, an
    /// outage or a missed deadline, as a failure; invalid input as nothing; anything else as
    /// an answer).
    ///
    /// # Errors
    ///
    /// `call`'s error, or [`Error::Unavailable`] when the breaker is open.
    pub async fn call<T>(
        &self,
        domain: usize,
        call: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let breaker = self.breakers.of(domain);
        let permit = match breaker.admit(&*self.clock) {
            Admission::Call(permit) => permit,
            Admission::Skip => {
                return Err(Error::Unavailable {
                    message: format!(
                        "circuit breaker open after repeated store failures; the store was not \
                         called (probed again at most {:?} after it opened)",
                        breaker.config().open_for
                    ),
                    source: None,
                });
            }
        };
        let result = call.await;
        match &result {
            Err(e) if e.is_invalid_input() => permit.inconclusive(),
            Err(e) if e.is_unavailable() => permit.failed(self.clock.now(), e),
            _ => permit.succeeded(),
        }
        result
    }

    /// The state of the breaker furthest from closed (open, then half-open).
    pub fn state(&self) -> BreakerState {
        self.breakers.state(&*self.clock)
    }

    /// Times any of the breakers went from closed to open.
    pub fn opened_count(&self) -> u64 {
        self.breakers.opened_count()
    }
}

/// What the breaker lets a caller do.
#[derive(Debug)]
pub(crate) enum Admission<'a> {
    /// Call the store and report the outcome on the permit.
    Call(Permit<'a>),
    /// Do not call the store: the breaker is open (or another caller holds the probe).
    Skip,
}

/// The right to call the store once. Report the outcome with [`Permit::succeeded`],
/// [`Permit::failed`] or [`Permit::inconclusive`]; a permit dropped without an outcome (the
/// caller's future was cancelled) is inconclusive, which matters for the probe: it is handed
/// back so that the next caller can probe, instead of the breaker staying half-open forever.
#[derive(Debug)]
pub(crate) struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    kind: PermitKind,
    reported: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PermitKind {
    /// A normal call while closed, in the given generation.
    Closed { generation: u64 },
    /// The one half-open probe.
    Probe,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl CircuitBreaker {
    pub(crate) fn new(config: CircuitBreakerConfig) -> Self {
        CircuitBreaker {
            config,
            open_for_us: micros(config.open_for),
            state: AtomicU8::new(CLOSED),
            consecutive_failures: AtomicU32::new(0),
            opened_at_us: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            opened_count: AtomicU64::new(0),
        }
    }

    pub(crate) fn config(&self) -> &CircuitBreakerConfig {
        &self.config
    }

    /// Asks to call the store. The clock is read only when the breaker is open.
    pub(crate) fn admit(&self, clock: &dyn Clock) -> Admission<'_> {
        match self.state.load(Ordering::Acquire) {
            CLOSED => Admission::Call(Permit {
                breaker: self,
                kind: PermitKind::Closed {
                    generation: self.generation.load(Ordering::Acquire),
                },
                reported: false,
            }),
            OPEN => {
                if self.due(clock)
                    && self
                        .state
                        .compare_exchange(OPEN, PROBING, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    tracing::debug!("statehouse: circuit breaker half-open, probing the store");
                    Admission::Call(Permit {
                        breaker: self,
                        kind: PermitKind::Probe,
                        reported: false,
                    })
                } else {
                    Admission::Skip
                }
            }
            _ => Admission::Skip,
        }
    }

    /// The state as a caller would see it now.
    pub(crate) fn state(&self, clock: &dyn Clock) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            CLOSED => BreakerState::Closed,
            OPEN => {
                if self.due(clock) {
                    BreakerState::HalfOpen
                } else {
                    BreakerState::Open
                }
            }
            _ => BreakerState::HalfOpen,
        }
    }

    /// Whether an open breaker may probe: `open_for` has passed since it opened, or the clock
    /// now reads more than `open_for` earlier than the opening (a wall clock stepped back, by
    /// NTP say: waiting for the old reading to come round again could keep the store unused
    /// for hours). A smaller step back (two threads' readings a little apart, a slewing
    /// clock) just waits, at most twice `open_for`: probing at once would send a call to a
    /// store that failed a moment ago.
    fn due(&self, clock: &dyn Clock) -> bool {
        let opened_at = self.opened_at_us.load(Ordering::Acquire);
        let now = clock.now().as_micros();
        now >= opened_at.saturating_add(self.open_for_us)
            || now < opened_at.saturating_sub(self.open_for_us)
    }

    /// Times the breaker went from closed to open.
    pub(crate) fn opened_count(&self) -> u64 {
        self.opened_count.load(Ordering::Relaxed)
    }

    fn on_success(&self, kind: PermitKind) {
        match kind {
            PermitKind::Closed { generation } => {
                // Skip the store when there is nothing to reset: keeps the cache line shared on
                // the hot path.
                if self.generation.load(Ordering::Acquire) == generation
                    && self.consecutive_failures.load(Ordering::Relaxed) != 0
                {
                    self.consecutive_failures.store(0, Ordering::Relaxed);
                }
            }
            PermitKind::Probe => {
                self.consecutive_failures.store(0, Ordering::Relaxed);
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.state.store(CLOSED, Ordering::Release);
                tracing::info!("statehouse: store answered the probe; circuit breaker closed");
            }
        }
    }

    fn on_failure(&self, kind: PermitKind, now: Timestamp, error: &Error) {
        match kind {
            PermitKind::Closed { generation } => {
                if self.generation.load(Ordering::Acquire) != generation {
                    // Admitted before the last recovery: says nothing about the store now.
                    return;
                }
                let failures = self
                    .consecutive_failures
                    .fetch_add(1, Ordering::AcqRel)
                    .saturating_add(1);
                if failures >= self.config.failure_threshold
                    && self.state.load(Ordering::Acquire) == CLOSED
                {
                    self.opened_at_us.store(now.as_micros(), Ordering::Release);
                    if self
                        .state
                        .compare_exchange(CLOSED, OPEN, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        self.opened_count.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            consecutive_failures = failures,
                            open_for = ?self.config.open_for,
                            error = %error,
                            "statehouse: store failing; circuit breaker opened, decisions follow \
                             the degraded policy without calling the store"
                        );
                    }
                }
            }
            PermitKind::Probe => {
                self.opened_at_us.store(now.as_micros(), Ordering::Release);
                self.state.store(OPEN, Ordering::Release);
                // Debug, not warn: during a long outage this fires once per `open_for`, and the
                // opening itself was already reported.
                tracing::debug!(
                    error = %error,
                    open_for = ?self.config.open_for,
                    "statehouse: probe failed; circuit breaker open again"
                );
            }
        }
    }

    fn on_inconclusive(&self, kind: PermitKind) {
        if kind == PermitKind::Probe {
            // Hand the probe back; `opened_at` is unchanged (and due), so the next caller
            // probes.
            let _ = self
                .state
                .compare_exchange(PROBING, OPEN, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

impl Permit<'_> {
    /// The store answered.
    pub(crate) fn succeeded(mut self) {
        self.reported = true;
        self.breaker.on_success(self.kind);
    }

    /// The store was unavailable or missed the deadline.
    pub(crate) fn failed(mut self, now: Timestamp, error: &Error) {
        self.reported = true;
        self.breaker.on_failure(self.kind, now, error);
    }

    /// The call says nothing about the store (it rejected the caller's input).
    pub(crate) fn inconclusive(mut self) {
        self.reported = true;
        self.breaker.on_inconclusive(self.kind);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.reported {
            self.breaker.on_inconclusive(self.kind);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use statehouse_core::ManualClock;

    fn unavailable() -> Error {
        Error::Unavailable {
            message: "test".into(),
            source: None,
        }
    }

    fn breaker(threshold: u32) -> (CircuitBreaker, ManualClock) {
        let b = CircuitBreaker::new(CircuitBreakerConfig {
            failure_threshold: threshold,
            open_for: Duration::from_secs(1),
        });
        (b, ManualClock::new(Timestamp::from_micros(1_000_000)))
    }

    fn fail(b: &CircuitBreaker, clock: &ManualClock) {
        match b.admit(clock) {
            Admission::Call(p) => p.failed(clock.now(), &unavailable()),
            Admission::Skip => panic!("expected a call"),
        }
    }

    #[test]
    fn opens_after_threshold_consecutive_failures_only() {
        let (b, clock) = breaker(3);
        fail(&b, &clock);
        fail(&b, &clock);
        // A success in between resets the run.
        match b.admit(&clock) {
            Admission::Call(p) => p.succeeded(),
            Admission::Skip => panic!("closed breaker skipped"),
        }
        fail(&b, &clock);
        fail(&b, &clock);
        assert_eq!(b.state(&clock), BreakerState::Closed);
        fail(&b, &clock);
        assert_eq!(b.state(&clock), BreakerState::Open);
        assert_eq!(b.opened_count(), 1);
        assert!(matches!(b.admit(&clock), Admission::Skip));
    }

    #[test]
    fn one_probe_after_open_for_then_close_on_success() {
        let (b, clock) = breaker(1);
        fail(&b, &clock);
        clock.advance(Duration::from_millis(999));
        assert!(matches!(b.admit(&clock), Admission::Skip));
        clock.advance(Duration::from_millis(1));
        assert_eq!(b.state(&clock), BreakerState::HalfOpen);
        let Admission::Call(probe) = b.admit(&clock) else {
            panic!("no probe after open_for");
        };
        // Everyone else keeps skipping while the probe is out.
        for _ in 0..10 {
            assert!(matches!(b.admit(&clock), Admission::Skip));
        }
        probe.succeeded();
        assert_eq!(b.state(&clock), BreakerState::Closed);
        assert!(matches!(b.admit(&clock), Admission::Call(_)));
    }

    #[test]
    fn a_clock_stepped_back_lets_the_probe_through_at_once() {
        let (b, clock) = breaker(1);
        clock.advance(Duration::from_secs(3600));
        fail(&b, &clock);
        assert_eq!(b.state(&clock), BreakerState::Open);
        // The wall clock is stepped back an hour: waiting for `opened_at + open_for` would
        // keep the store unused for that hour.
        clock.set(Timestamp::from_micros(1_000_000));
        assert_eq!(b.state(&clock), BreakerState::HalfOpen);
        let Admission::Call(probe) = b.admit(&clock) else {
            panic!("no probe after the clock went back");
        };
        assert!(
            matches!(b.admit(&clock), Admission::Skip),
            "still one probe"
        );
        // A failed probe reopens from the new reading: `open_for` on the clock as it is now.
        probe.failed(clock.now(), &unavailable());
        clock.advance(Duration::from_millis(999));
        assert!(matches!(b.admit(&clock), Admission::Skip));
        clock.advance(Duration::from_millis(1));
        assert!(matches!(b.admit(&clock), Admission::Call(_)));
    }

    #[test]
    fn a_small_step_back_does_not_probe_early() {
        let (b, clock) = breaker(1);
        clock.advance(Duration::from_secs(3600));
        fail(&b, &clock);
        // A reading a little earlier than the opening (another thread's, a slewing clock):
        // still open, until `open_for` after the opening.
        clock.set(Timestamp::from_micros(clock.now().as_micros() - 500_000));
        assert_eq!(b.state(&clock), BreakerState::Open);
        assert!(matches!(b.admit(&clock), Admission::Skip));
        clock.advance(Duration::from_millis(1_499));
        assert!(matches!(b.admit(&clock), Admission::Skip));
        clock.advance(Duration::from_millis(1));
        assert!(matches!(b.admit(&clock), Admission::Call(_)));
    }

    #[test]
    fn failed_probe_reopens_for_another_period() {
        let (b, clock) = breaker(1);
        fail(&b, &clock);
        clock.advance(Duration::from_secs(1));
        fail(&b, &clock); // the probe
        assert_eq!(b.state(&clock), BreakerState::Open);
        assert_eq!(b.opened_count(), 1, "a re-open is not a new opening");
        clock.advance(Duration::from_millis(500));
        assert!(matches!(b.admit(&clock), Admission::Skip));
        clock.advance(Duration::from_millis(500));
        assert!(matches!(b.admit(&clock), Admission::Call(_)));
    }

    #[test]
    fn dropped_or_inconclusive_probe_is_handed_back() {
        let (b, clock) = breaker(1);
        fail(&b, &clock);
        clock.advance(Duration::from_secs(1));
        let Admission::Call(probe) = b.admit(&clock) else {
            panic!("no probe");
        };
        drop(probe);
        let Admission::Call(probe) = b.admit(&clock) else {
            panic!("the probe of a cancelled call was not handed back");
        };
        probe.inconclusive();
        assert!(matches!(b.admit(&clock), Admission::Call(_)));
    }

    #[test]
    fn stale_failure_from_before_recovery_is_ignored() {
        let (b, clock) = breaker(1);
        let Admission::Call(stale) = b.admit(&clock) else {
            panic!("closed breaker skipped");
        };
        fail(&b, &clock);
        clock.advance(Duration::from_secs(1));
        let Admission::Call(probe) = b.admit(&clock) else {
            panic!("no probe");
        };
        probe.succeeded();
        stale.failed(clock.now(), &unavailable());
        assert_eq!(b.state(&clock), BreakerState::Closed);
    }

    #[test]
    fn config_is_validated() {
        let zero = CircuitBreakerConfig {
            failure_threshold: 0,
            ..Default::default()
        };
        assert!(zero.validate().is_err());
        let instant = CircuitBreakerConfig {
            open_for: Duration::ZERO,
            ..Default::default()
        };
        assert!(instant.validate().is_err());
        assert!(CircuitBreakerConfig::default().validate().is_ok());
    }
}
