//! [`RateLimiter`]: a store behind a deadline, a circuit breaker and a degraded policy.

use std::sync::Arc;
use std::time::Duration;

use statehouse_core::key::encode_key;
use statehouse_core::{
    Clock, Decision, Error, LimitCheck, Mode, Policy, RateLimitStore, Result, SystemClock, Verdict,
    prepare_checks,
};

use crate::breaker::{Admission, Breakers, CircuitBreaker, CircuitBreakerConfig};
use crate::degraded::DegradedPolicy;
use crate::stats::{Counters, LimiterStats};

#[cfg(feature = "embedded")]
use statehouse_embedded::EmbeddedStore;
#[cfg(feature = "embedded")]
use std::num::NonZeroU32;

/// The default per-call deadline: tens of milliseconds, far above a healthy Redis round trip
/// (well under a millisecond on a LAN) and far below the seconds of a client library's default
/// timeout, which is what made every request wait during a Redis outage in Envoy's rate-limit
/// service (envoyproxy/ratelimit #462).
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(50);

/// What an application holds to rate-limit: a [`RateLimitStore`] (Redis, the embedded store)
/// behind a per-call deadline, a circuit breaker and a [`DegradedPolicy`].
///
/// Cheap to clone (an `Arc` inside); clones share the store, the breaker and the counters.
/// Build one per store and degraded policy, and share it. Calls need a Tokio runtime with its
/// time driver enabled (`#[tokio::main]` has it), for the deadline.
///
/// A denial is a [`Decision`] with `allowed == false`, not an error. Errors are invalid input
/// (never degraded), errors from the store that are not an outage, and outages under
/// [`DegradedPolicy::ReturnError`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), statehouse::Error> {
/// use std::time::Duration;
/// use statehouse::{DegradedPolicy, EmbeddedStore, Policy, RateLimiter};
///
/// let limiter = RateLimiter::builder(EmbeddedStore::new())
///     .on_store_failure(DegradedPolicy::FailOpen)
///     .deadline(Duration::from_millis(20))
///     .build()?;
/// let policy = Policy::gcra(10, Duration::from_secs(1))?.with_burst(2)?;
/// assert!(limiter.check("ip:10.0.0.1", &policy).await?.allowed);
/// assert!(limiter.check("ip:10.0.0.1", &policy).await?.allowed);
/// let third = limiter.check("ip:10.0.0.1", &policy).await?;
/// assert!(!third.allowed);
/// // One request every 100 ms at the steady rate.
/// assert!(third.retry_after.is_some_and(|t| t <= Duration::from_millis(100)));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn RateLimitStore>,
    degraded: Degraded,
    deadline: Duration,
    /// One per failure domain of the store ([`RateLimitStore::failure_domains`]).
    breakers: Breakers,
    clock: Arc<dyn Clock>,
    counters: Counters,
}

/// [`DegradedPolicy`] with what it needs to run.
#[derive(Debug)]
enum Degraded {
    FailOpen,
    FailClosed,
    #[cfg(feature = "embedded")]
    LocalFallback {
        replicas: NonZeroU32,
        store: EmbeddedStore,
    },
    ReturnError,
}

/// How a guarded store call ended.
enum StoreCall<T> {
    /// The store answered, or rejected the input: give this to the caller as it is.
    Answered(Result<T>),
    /// The store was unavailable or missed the deadline.
    Failed(Error),
    /// The breaker is open: the store was not called.
    Skipped,
}

/// Builds a [`RateLimiter`]; from [`RateLimiter::builder`].
///
/// ```
/// use std::num::NonZeroU32;
/// use std::sync::Arc;
/// use std::time::Duration;
/// use statehouse::{CircuitBreakerConfig, DegradedPolicy, EmbeddedStore, RateLimiter, SystemClock};
///
/// let limiter = RateLimiter::builder(EmbeddedStore::new())
///     .on_store_failure(DegradedPolicy::LocalFallback { replicas: NonZeroU32::new(4).unwrap() })
///     .deadline(Duration::from_millis(30))
///     .circuit_breaker(CircuitBreakerConfig {
///         failure_threshold: 5,
///         open_for: Duration::from_millis(500),
///     })
///     .clock(Arc::new(SystemClock))
///     .build()?;
/// # let _ = limiter;
/// # Ok::<(), statehouse::Error>(())
/// ```
#[derive(Debug)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct RateLimiterBuilder {
    store: Arc<dyn RateLimitStore>,
    degraded: DegradedPolicy,
    deadline: Duration,
    breaker: CircuitBreakerConfig,
    clock: Arc<dyn Clock>,
}

impl RateLimiterBuilder {
    /// What to decide when the store cannot: see [`DegradedPolicy`]. Default
    /// [`DegradedPolicy::FailOpen`].
    pub fn on_store_failure(mut self, policy: DegradedPolicy) -> Self {
        self.degraded = policy;
        self
    }

    /// The hard deadline of one store call (enforced with `tokio::time::timeout`, or by the
    /// store itself where it bounds its calls: `RateLimitStore::check_within`); a call past it
    /// counts as a store failure and its decision follows the degraded policy. Default
    /// [`DEFAULT_DEADLINE`] (50 ms). More than zero, at most one hour.
    ///
    /// This deadline bounds every decision; a store's own timeout (such as the Redis store's
    /// `call_timeout`) is best set at or above it.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// How the circuit breaker trips and recovers; default 3 consecutive failures, open for
    /// 1 s. See [`CircuitBreakerConfig`].
    pub fn circuit_breaker(mut self, config: CircuitBreakerConfig) -> Self {
        self.breaker = config;
        self
    }

    /// The clock of the circuit breaker (its `open_for`) and of the local fallback store.
    /// Default [`SystemClock`]; tests pass a [`ManualClock`](crate::ManualClock).
    ///
    /// The store keeps its own time source (the Redis store reads Redis's `TIME`).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Builds the limiter.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a deadline of zero or above one hour ([`MAX_DEADLINE`](statehouse_core::MAX_DEADLINE)), a zero `failure_threshold` or a zero
    /// `open_for`; an error of the embedded store for [`DegradedPolicy::LocalFallback`].
    pub fn build(self) -> Result<RateLimiter> {
        statehouse_core::check_deadline("deadline", self.deadline)?;
        self.breaker.validate()?;
        let degraded = match self.degraded {
            DegradedPolicy::FailOpen => Degraded::FailOpen,
            DegradedPolicy::FailClosed => Degraded::FailClosed,
            #[cfg(feature = "embedded")]
            DegradedPolicy::LocalFallback { replicas } => Degraded::LocalFallback {
                replicas,
                store: EmbeddedStore::builder().clock(self.clock.clone()).build()?,
            },
            DegradedPolicy::ReturnError => Degraded::ReturnError,
        };
        Ok(self.assemble(degraded))
    }

    fn assemble(self, degraded: Degraded) -> RateLimiter {
        let domains = self.store.failure_domains();
        RateLimiter {
            inner: Arc::new(Inner {
                store: self.store,
                degraded,
                deadline: self.deadline,
                breakers: Breakers::new(self.breaker, domains),
                clock: self.clock,
                counters: Counters::default(),
            }),
        }
    }
}

impl RateLimiter {
    /// Starts building a limiter over `store`: any [`RateLimitStore`], including an
    /// `Arc<dyn RateLimitStore>` (or `Arc<S>`) already shared with other code.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use statehouse::{EmbeddedStore, RateLimitStore, RateLimiter};
    ///
    /// let shared: Arc<dyn RateLimitStore> = Arc::new(EmbeddedStore::new());
    /// let limiter = RateLimiter::builder(shared.clone()).build()?;
    /// # let _ = limiter;
    /// # Ok::<(), statehouse::Error>(())
    /// ```
    pub fn builder(store: impl RateLimitStore) -> RateLimiterBuilder {
        RateLimiterBuilder {
            store: Arc::new(store),
            degraded: DegradedPolicy::default(),
            deadline: DEFAULT_DEADLINE,
            breaker: CircuitBreakerConfig::default(),
            clock: Arc::new(SystemClock),
        }
    }

    /// A limiter over `store` with every default: [`DegradedPolicy::FailOpen`], a 50 ms
    /// deadline, a breaker opening after 3 failures for 1 s, the [`SystemClock`].
    ///
    /// ```
    /// use statehouse::{EmbeddedStore, RateLimiter};
    /// let limiter = RateLimiter::new(EmbeddedStore::new());
    /// # let _ = limiter;
    /// ```
    pub fn new(store: impl RateLimitStore) -> RateLimiter {
        Self::builder(store).assemble(Degraded::FailOpen)
    }

    /// Checks one request (cost 1) on `key` under `policy`, consuming if admitted.
    ///
    /// # Errors
    ///
    /// Invalid input (an empty or oversized key); a store error that is not an outage; an
    /// outage under [`DegradedPolicy::ReturnError`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), statehouse::Error> {
    /// use std::time::Duration;
    /// use statehouse::{EmbeddedStore, Policy, RateLimiter};
    ///
    /// let limiter = RateLimiter::new(EmbeddedStore::new());
    /// let policy = Policy::token_bucket(1, Duration::from_secs(60))?;
    /// assert!(limiter.check("user:7", &policy).await?.allowed);
    /// let denied = limiter.check("user:7", &policy).await?;
    /// assert!(!denied.allowed && !denied.degraded);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn check(&self, key: &str, policy: &Policy) -> Result<Decision> {
        self.check_cost(key, policy, 1).await
    }

    /// Checks one request of `cost` units on `key` under `policy`, consuming `cost` if admitted.
    ///
    /// # Errors
    ///
    /// As [`check`](Self::check), plus [`Error::InvalidCost`] for a zero cost or one above the
    /// policy's capacity (it could never be admitted).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), statehouse::Error> {
    /// use std::time::Duration;
    /// use statehouse::{EmbeddedStore, Policy, RateLimiter};
    ///
    /// let limiter = RateLimiter::new(EmbeddedStore::new());
    /// let tokens = Policy::token_bucket(1_000, Duration::from_secs(60))?;
    /// let d = limiter.check_cost("tenant:acme", &tokens, 250).await?;
    /// assert_eq!(d.remaining, 750);
    /// assert!(limiter.check_cost("tenant:acme", &tokens, 0).await.unwrap_err().is_invalid_input());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn check_cost(&self, key: &str, policy: &Policy, cost: u64) -> Result<Decision> {
        let checks = [LimitCheck::new(key, policy, cost)];
        let decision = match self.inner.store.check_one_now(&checks[0], Mode::Consume) {
            // An in-process store (see `decide`): no future, no timer, no vector; it validates
            // the input itself.
            Some(answer) => answer?,
            None => {
                // Validated before the breaker, so that invalid input is an error even while
                // the store is skipped.
                policy.check_cost(cost)?;
                encode_key(key)?;
                single(self.decide(&checks, Mode::Consume).await?)?
            }
        };
        self.inner
            .counters
            .record_decision(decision.allowed, decision.degraded);
        Ok(decision)
    }

    /// What a [`check`](Self::check) would answer now, without consuming anything. Not counted
    /// as a decision in [`stats`](Self::stats).
    ///
    /// # Errors
    ///
    /// As [`check`](Self::check).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), statehouse::Error> {
    /// use std::time::Duration;
    /// use statehouse::{EmbeddedStore, Policy, RateLimiter};
    ///
    /// let limiter = RateLimiter::new(EmbeddedStore::new());
    /// let policy = Policy::fixed_window(5, Duration::from_secs(60))?;
    /// assert_eq!(limiter.peek("k", &policy).await?.remaining, 4);
    /// assert_eq!(limiter.peek("k", &policy).await?.remaining, 4);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn peek(&self, key: &str, policy: &Policy) -> Result<Decision> {
        encode_key(key)?;
        let checks = [LimitCheck::new(key, policy, 1)];
        single(self.decide(&checks, Mode::Peek).await?)
    }

    /// Checks several limits on one request, all or nothing: if every limit admits it, all are
    /// consumed; if any denies, none is. The store does this in one step (one script on Redis;
    /// on a Redis Cluster with keys in several slots, see the
    /// [crate docs](crate#several-limits-on-one-request)). Counted as one decision. An empty
    /// slice is admitted without calling the store.
    ///
    /// # Errors
    ///
    /// As [`check_cost`](Self::check_cost) for any check, plus [`Error::InvalidInput`] when two
    /// checks share a key with the same algorithm and period.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), statehouse::Error> {
    /// use std::time::Duration;
    /// use statehouse::{EmbeddedStore, LimitCheck, Policy, RateLimiter};
    ///
    /// let limiter = RateLimiter::new(EmbeddedStore::new());
    /// let per_minute = Policy::token_bucket(2, Duration::from_secs(60))?;
    /// let per_day = Policy::fixed_window(1, Duration::from_secs(86_400))?;
    /// let checks = [
    ///     LimitCheck::new("user:1", &per_minute, 1),
    ///     LimitCheck::new("user:1", &per_day, 1),
    /// ];
    /// assert!(limiter.check_all(&checks).await?.allowed());
    /// let second = limiter.check_all(&checks).await?;
    /// assert!(!second.allowed());
    /// assert!(second.decisions[0].allowed && !second.decisions[1].allowed);
    /// // The denied request did not take the per-minute limit's second token.
    /// assert!(limiter.check("user:1", &per_minute).await?.allowed);
    /// assert!(!limiter.check("user:1", &per_minute).await?.allowed);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn check_all(&self, checks: &[LimitCheck<'_>]) -> Result<Verdict> {
        if checks.is_empty() {
            return Ok(Verdict {
                decisions: Vec::new(),
            });
        }
        prepare_checks(checks)?;
        let verdict = self.decide(checks, Mode::Consume).await?;
        self.inner
            .counters
            .record_decision(verdict.allowed(), verdict.degraded());
        Ok(verdict)
    }

    /// For the leaky-bucket shaper ([`Policy::leaky_bucket`]): checks a request of `cost` and,
    /// when it is admitted with a non-zero [`Decision::delay`], waits that long
    /// (`tokio::time::sleep`) before returning, so requests leave at the policy's rate. A
    /// request that would have to wait longer than the policy's `max_delay` is denied at once.
    ///
    /// Callers that would rather reject than wait use [`check_cost`](Self::check_cost) and
    /// read `delay` themselves. For other algorithms `delay` is zero and this is `check_cost`.
    ///
    /// # Errors
    ///
    /// As [`check_cost`](Self::check_cost).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), statehouse::Error> {
    /// use std::time::Duration;
    /// use statehouse::{EmbeddedStore, Policy, RateLimiter};
    ///
    /// let limiter = RateLimiter::new(EmbeddedStore::new());
    /// // Ten per second, queueing up to half a second.
    /// let shaper = Policy::leaky_bucket(10, Duration::from_secs(1))?
    ///     .with_max_delay(Duration::from_millis(500))?;
    /// let first = limiter.acquire("jobs", &shaper, 1).await?;
    /// assert!(first.allowed && first.delay.is_zero());
    /// // The second one leaves 100 ms after the first: `acquire` waited for it.
    /// let second = limiter.acquire("jobs", &shaper, 1).await?;
    /// assert!(second.allowed);
    /// assert!(second.delay > Duration::ZERO);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn acquire(&self, key: &str, policy: &Policy, cost: u64) -> Result<Decision> {
        let decision = self.check_cost(key, policy, cost).await?;
        if decision.allowed && !decision.delay.is_zero() {
            tokio::time::sleep(decision.delay).await;
        }
        Ok(decision)
    }

    /// Forgets `key`'s state under `policy` in the store (and in the local fallback store, if
    /// any), as if it had never been seen.
    ///
    /// # Errors
    ///
    /// A reset is never degraded: when the store is unavailable, misses the deadline or the
    /// breaker is open, the error is returned whatever the [`DegradedPolicy`]. Invalid keys are
    /// rejected.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), statehouse::Error> {
    /// use std::time::Duration;
    /// use statehouse::{EmbeddedStore, Policy, RateLimiter};
    ///
    /// let limiter = RateLimiter::new(EmbeddedStore::new());
    /// let policy = Policy::token_bucket(1, Duration::from_secs(60))?;
    /// limiter.check("k", &policy).await?;
    /// assert!(!limiter.check("k", &policy).await?.allowed);
    /// limiter.reset("k", &policy).await?;
    /// assert!(limiter.check("k", &policy).await?.allowed);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn reset(&self, key: &str, policy: &Policy) -> Result<()> {
        encode_key(key)?;
        #[cfg(feature = "embedded")]
        if let Degraded::LocalFallback { store, .. } = &self.inner.degraded {
            store.reset_sync(key, policy)?;
        }
        let breaker = self.breaker_of(&LimitCheck::new(key, policy, 1));
        match self
            .call_store(breaker, || {
                self.within_deadline(self.inner.store.reset(key, policy))
            })
            .await
        {
            StoreCall::Answered(result) => result,
            StoreCall::Failed(error) => Err(error),
            StoreCall::Skipped => Err(self.breaker_open_error()),
        }
    }

    /// A snapshot of the counters and the breaker's state; see [`LimiterStats`].
    pub fn stats(&self) -> LimiterStats {
        let inner = &*self.inner;
        inner.counters.snapshot(
            inner.breakers.opened_count(),
            inner.breakers.state(&*inner.clock),
        )
    }

    /// The breaker of the store's failure domain of a call whose first check is `check`.
    fn breaker_of(&self, check: &LimitCheck<'_>) -> &CircuitBreaker {
        let breakers = &self.inner.breakers;
        if breakers.per_domain() {
            breakers.of(self.inner.store.failure_domain(check))
        } else {
            breakers.of(0)
        }
    }

    /// The degraded policy this limiter was built with.
    pub fn degraded_policy(&self) -> DegradedPolicy {
        match &self.inner.degraded {
            Degraded::FailOpen => DegradedPolicy::FailOpen,
            Degraded::FailClosed => DegradedPolicy::FailClosed,
            #[cfg(feature = "embedded")]
            Degraded::LocalFallback { replicas, .. } => DegradedPolicy::LocalFallback {
                replicas: *replicas,
            },
            Degraded::ReturnError => DegradedPolicy::ReturnError,
        }
    }

    /// Decides `checks` with the store, or with the degraded policy when the store cannot.
    async fn decide(&self, checks: &[LimitCheck<'_>], mode: Mode) -> Result<Verdict> {
        // A store that decides in-process (the embedded store) answers right away: no boxed
        // future, no deadline timer, no breaker, since it cannot be down or slow. Its errors
        // are invalid input, returned as they are.
        if let [one] = checks
            && let Some(answer) = self.inner.store.check_one_now(one, mode)
        {
            return answer.map(|decision| Verdict {
                decisions: vec![decision],
            });
        }
        let breaker = match checks.first() {
            Some(first) => self.breaker_of(first),
            None => self.inner.breakers.of(0),
        };
        let call = self
            .call_store(breaker, || async {
                let store = &self.inner.store;
                // A store that bounds its own calls takes the deadline along: no timer of ours
                // (the Redis store's coalesced single checks then arm none per check at all).
                let verdict = match store.check_within(checks, mode, self.inner.deadline).await {
                    Some(result) => result?,
                    None => self.within_deadline(store.check(checks, mode)).await?,
                };
                if verdict.decisions.len() != checks.len() {
                    return Err(Error::Backend {
                        message: format!(
                            "the store answered {} decisions for {} checks",
                            verdict.decisions.len(),
                            checks.len()
                        ),
                        source: None,
                    });
                }
                Ok(verdict)
            })
            .await;
        match call {
            StoreCall::Answered(result) => result,
            StoreCall::Failed(error) => self.degrade(checks, mode, Some(error)),
            StoreCall::Skipped => self.degrade(checks, mode, None),
        }
    }

    /// `call` under the deadline: [`Error::Timeout`] when it passes first.
    async fn within_deadline<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        let deadline = self.inner.deadline;
        tokio::time::timeout(deadline, call)
            .await
            .unwrap_or(Err(Error::Timeout { deadline }))
    }

    /// Calls the store through the breaker (`call` is bounded by the deadline, by
    /// [`within_deadline`](Self::within_deadline) or by the store itself), and sorts the
    /// outcome.
    async fn call_store<T, F, Fut>(&self, breaker: &CircuitBreaker, call: F) -> StoreCall<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let inner = &*self.inner;
        let permit = match breaker.admit(&*inner.clock) {
            Admission::Call(permit) => permit,
            Admission::Skip => return StoreCall::Skipped,
        };
        let result = call().await;
        match result {
            Ok(value) => {
                permit.succeeded();
                StoreCall::Answered(Ok(value))
            }
            // The caller's mistake says nothing about the store's health.
            Err(error) if error.is_invalid_input() => {
                permit.inconclusive();
                StoreCall::Answered(Err(error))
            }
            Err(error) if error.is_unavailable() => {
                Counters::bump(&inner.counters.store_failures);
                if matches!(error, Error::Timeout { .. }) {
                    Counters::bump(&inner.counters.timeouts);
                }
                permit.failed(inner.clock.now(), &error);
                StoreCall::Failed(error)
            }
            // `Error::Backend` (a script error, a corrupt value, a wrong type at a key) and any
            // later kind: the store is up and answered in time, so this is not an outage.
            // Degrading would hide a bug behind fail-open, the silent failure of Spring Cloud
            // Gateway's limiter (spring-cloud-gateway #248), and tripping the breaker would
            // stop calling a store that works for other keys. So the error goes back to the
            // caller, is counted in `backend_errors`, and counts as an answer for the breaker.
            Err(error) => {
                Counters::bump(&inner.counters.backend_errors);
                permit.succeeded();
                StoreCall::Answered(Err(error))
            }
        }
    }

    /// The degraded policy's verdict. `error` is the store's failure, `None` when the breaker
    /// was open.
    // Only the local fallback looks at `mode`: fail-open and fail-closed answer a peek as they
    // answer a check.
    #[cfg_attr(not(feature = "embedded"), allow(unused_variables))]
    fn degrade(
        &self,
        checks: &[LimitCheck<'_>],
        mode: Mode,
        error: Option<Error>,
    ) -> Result<Verdict> {
        let open_for = self.inner.breakers.config().open_for;
        let decisions = match &self.inner.degraded {
            Degraded::FailOpen => checks
                .iter()
                .map(|c| Decision::degraded(true, c.policy.capacity(), None))
                .collect(),
            Degraded::FailClosed => checks
                .iter()
                .map(|c| Decision::degraded(false, c.policy.capacity(), Some(open_for)))
                .collect(),
            #[cfg(feature = "embedded")]
            Degraded::LocalFallback { replicas, store } => {
                return local_fallback(store, *replicas, checks, mode, open_for);
            }
            Degraded::ReturnError => {
                return Err(error.unwrap_or_else(|| self.breaker_open_error()));
            }
        };
        Ok(Verdict { decisions })
    }

    fn breaker_open_error(&self) -> Error {
        Error::Unavailable {
            message: format!(
                "circuit breaker open after repeated store failures; the store was not called \
                 (it is probed again at most {:?} after the breaker opened)",
                self.inner.breakers.config().open_for
            ),
            source: None,
        }
    }
}

/// Decides with the in-process store on each policy's per-replica share.
#[cfg(feature = "embedded")]
fn local_fallback(
    store: &EmbeddedStore,
    replicas: NonZeroU32,
    checks: &[LimitCheck<'_>],
    mode: Mode,
    open_for: Duration,
) -> Result<Verdict> {
    let shares: Vec<Policy> = checks.iter().map(|c| c.policy.divided(replicas)).collect();
    // A cost within the policy's capacity may still exceed one replica's share: such a request
    // cannot be admitted locally, so the verdict is a denial, and the other checks are only
    // peeked (all or nothing: a denied request consumes nothing).
    let over_share = |c: &LimitCheck<'_>, share: &Policy| c.cost > share.capacity();
    let any_over_share = checks.iter().zip(&shares).any(|(c, s)| over_share(c, s));
    let local_checks: Vec<LimitCheck<'_>> = checks
        .iter()
        .zip(&shares)
        .map(|(c, share)| LimitCheck::new(c.key, share, c.cost.min(share.capacity())))
        .collect();
    let local_mode = if any_over_share { Mode::Peek } else { mode };
    let mut verdict = store.check_sync(&local_checks, local_mode)?;
    for ((decision, check), share) in verdict.decisions.iter_mut().zip(checks).zip(&shares) {
        if over_share(check, share) {
            *decision = Decision::degraded(false, share.capacity(), Some(open_for));
        }
        decision.degraded = true;
    }
    Ok(verdict)
}

/// The one decision of a one-check verdict.
fn single(verdict: Verdict) -> Result<Decision> {
    verdict
        .decisions
        .into_iter()
        .next()
        .ok_or_else(|| Error::Backend {
            message: "the store answered no decision for one check".into(),
            source: None,
        })
}
