//! Rate-limit policies: which algorithm, how many per how long, burst and shaping delay.

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use crate::clock::duration_to_micros;
use crate::error::{Error, Result};

/// The longest period a policy may have: ten years. Keeps every stored time below 2^53
/// microseconds, the integer precision of the doubles Redis's Lua works in.
pub const MAX_PERIOD: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// The largest `limit` (and `burst`) a policy may have.
pub const MAX_LIMIT: u64 = 1_000_000_000;

/// The largest `limit` of a [`Algorithm::SlidingWindowLog`] policy: the log keeps one entry per
/// admitted unit of cost, so its memory grows with the limit.
pub const MAX_SLIDING_LOG_LIMIT: u64 = 100_000;

/// Which rate-limiting algorithm a [`Policy`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Algorithm {
    /// A counter per window aligned to the epoch (`now / period`). Cheap and exact within a
    /// window; lets up to twice the limit through around a window boundary.
    FixedWindow,
    /// A log of admission times: exact over every sliding interval, memory grows with the limit.
    SlidingWindowLog,
    /// Two aligned windows blended by the elapsed share of the current one. Never more than
    /// `limit` within one aligned window, and never more than `2 × limit - 1` in any sliding
    /// interval of one period (the previous window is assumed uniform; see the crate docs).
    SlidingWindowCounter,
    /// A bucket of `burst` tokens refilled at `limit` per `period`.
    TokenBucket,
    /// A leaky bucket used as a shaper: requests leave at `limit` per `period`; a request that
    /// would wait longer than `max_delay` is denied, otherwise the decision says how long to wait.
    LeakyBucket,
    /// The generic cell rate algorithm: one stored number (the theoretical arrival time),
    /// smooth, exact, with a burst. The recommended default.
    Gcra,
}

impl Algorithm {
    /// Every algorithm, in a fixed order.
    pub const ALL: [Algorithm; 6] = [
        Algorithm::FixedWindow,
        Algorithm::SlidingWindowLog,
        Algorithm::SlidingWindowCounter,
        Algorithm::TokenBucket,
        Algorithm::LeakyBucket,
        Algorithm::Gcra,
    ];

    /// A short stable name, used in storage keys and configuration (`fixed_window`, `gcra`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingWindowLog => "sliding_log",
            Algorithm::SlidingWindowCounter => "sliding_counter",
            Algorithm::TokenBucket => "token_bucket",
            Algorithm::LeakyBucket => "leaky_bucket",
            Algorithm::Gcra => "gcra",
        }
    }

    /// A small stable number for the algorithm, passed to the Redis script.
    pub const fn code(self) -> u8 {
        match self {
            Algorithm::FixedWindow => 1,
            Algorithm::SlidingWindowLog => 2,
            Algorithm::SlidingWindowCounter => 3,
            Algorithm::TokenBucket => 4,
            Algorithm::LeakyBucket => 5,
            Algorithm::Gcra => 6,
        }
    }

    /// Parses a name as given by [`Algorithm::name`].
    ///
    /// ```
    /// use statehouse_core::Algorithm;
    /// assert_eq!("gcra".parse::<Algorithm>().unwrap(), Algorithm::Gcra);
    /// assert!("nope".parse::<Algorithm>().is_err());
    /// ```
    pub fn from_name(name: &str) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Whether this algorithm paces requests at one per `period / limit` (and so needs that
    /// interval to be at least one microsecond).
    pub const fn is_interval_based(self) -> bool {
        matches!(
            self,
            Algorithm::TokenBucket | Algorithm::LeakyBucket | Algorithm::Gcra
        )
    }

    /// Whether `burst` means something for this algorithm.
    pub const fn has_burst(self) -> bool {
        matches!(self, Algorithm::TokenBucket | Algorithm::Gcra)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Algorithm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Algorithm::from_name(s).ok_or_else(|| {
            Error::policy(
                "algorithm",
                format!(
                    "is {s:?}; expected one of fixed_window, sliding_log, sliding_counter, \
                     token_bucket, leaky_bucket, gcra"
                ),
            )
        })
    }
}

/// A validated rate-limit policy: `limit` requests (units of cost) per `period`.
///
/// Invalid policies cannot be built: every constructor and `with_*` method checks its input and
/// names the offending field.
///
/// ```
/// use std::time::Duration;
/// use statehouse_core::{Algorithm, Policy};
///
/// // 100 requests per 90 seconds, smoothed, with bursts of up to 20 at once.
/// let p = Policy::gcra(100, Duration::from_secs(90))?.with_burst(20)?;
/// assert_eq!(p.algorithm(), Algorithm::Gcra);
/// assert_eq!(p.burst(), 20);
/// // 900 ms between requests at the steady rate.
/// assert_eq!(p.interval_micros(), 900_000);
///
/// assert!(Policy::fixed_window(0, Duration::from_secs(1)).is_err());
/// # Ok::<(), statehouse_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Policy {
    algorithm: Algorithm,
    limit: u64,
    period_us: u64,
    burst: u64,
    max_delay_us: u64,
}

impl Policy {
    /// A policy of `algorithm` admitting `limit` per `period`.
    ///
    /// `burst` defaults to `limit` (token bucket and GCRA) and `max_delay` to `period` (leaky
    /// bucket).
    pub fn new(algorithm: Algorithm, limit: u64, period: Duration) -> Result<Policy> {
        if limit == 0 {
            return Err(Error::policy("limit", "must be at least 1"));
        }
        if limit > MAX_LIMIT {
            return Err(Error::policy(
                "limit",
                format!("is {limit}; the maximum is {MAX_LIMIT}"),
            ));
        }
        if algorithm == Algorithm::SlidingWindowLog && limit > MAX_SLIDING_LOG_LIMIT {
            return Err(Error::policy(
                "limit",
                format!(
                    "is {limit}; a sliding_log keeps one entry per admitted unit, so its limit \
                     is at most {MAX_SLIDING_LOG_LIMIT} (use sliding_counter or gcra for more)"
                ),
            ));
        }
        if period < Duration::from_millis(1) {
            return Err(Error::policy(
                "period",
                format!("is {period:?}; the minimum is 1ms"),
            ));
        }
        if period > MAX_PERIOD {
            return Err(Error::policy(
                "period",
                format!("is {period:?}; the maximum is ten years"),
            ));
        }
        let period_us = duration_to_micros(period);
        if algorithm.is_interval_based() && period_us < limit {
            return Err(Error::policy(
                "limit",
                format!(
                    "{limit} per {period:?} is faster than one per microsecond, the resolution \
                     of {algorithm}; use a longer period or fixed_window/sliding_counter"
                ),
            ));
        }
        Ok(Policy {
            algorithm,
            limit,
            period_us,
            burst: limit,
            max_delay_us: period_us,
        })
    }

    /// A fixed-window policy; see [`Algorithm::FixedWindow`].
    pub fn fixed_window(limit: u64, period: Duration) -> Result<Policy> {
        Policy::new(Algorithm::FixedWindow, limit, period)
    }

    /// A sliding-window-log policy; see [`Algorithm::SlidingWindowLog`].
    pub fn sliding_log(limit: u64, period: Duration) -> Result<Policy> {
        Policy::new(Algorithm::SlidingWindowLog, limit, period)
    }

    /// A sliding-window-counter policy; see [`Algorithm::SlidingWindowCounter`].
    pub fn sliding_counter(limit: u64, period: Duration) -> Result<Policy> {
        Policy::new(Algorithm::SlidingWindowCounter, limit, period)
    }

    /// A token-bucket policy; see [`Algorithm::TokenBucket`].
    pub fn token_bucket(limit: u64, period: Duration) -> Result<Policy> {
        Policy::new(Algorithm::TokenBucket, limit, period)
    }

    /// A leaky-bucket shaping policy; see [`Algorithm::LeakyBucket`].
    pub fn leaky_bucket(limit: u64, period: Duration) -> Result<Policy> {
        Policy::new(Algorithm::LeakyBucket, limit, period)
    }

    /// A GCRA policy, the recommended default; see [`Algorithm::Gcra`].
    pub fn gcra(limit: u64, period: Duration) -> Result<Policy> {
        Policy::new(Algorithm::Gcra, limit, period)
    }

    /// Sets the burst: how many units may be admitted at once (token bucket capacity, GCRA
    /// burst). Only token bucket and GCRA take a burst.
    pub fn with_burst(mut self, burst: u64) -> Result<Policy> {
        if !self.algorithm.has_burst() {
            return Err(Error::policy(
                "burst",
                format!(
                    "does not apply to {}; only token_bucket and gcra take one",
                    self.algorithm
                ),
            ));
        }
        if burst == 0 {
            return Err(Error::policy("burst", "must be at least 1"));
        }
        if burst > MAX_LIMIT {
            return Err(Error::policy(
                "burst",
                format!("is {burst}; the maximum is {MAX_LIMIT}"),
            ));
        }
        let span = burst.saturating_mul(self.interval_micros());
        if span > duration_to_micros(MAX_PERIOD) {
            return Err(Error::policy(
                "burst",
                format!("is {burst}; burst × interval must not exceed ten years"),
            ));
        }
        self.burst = burst;
        Ok(self)
    }

    /// Sets the longest a leaky-bucket caller may be told to wait; beyond it the request is
    /// denied. Zero turns the shaper into a policer. Only the leaky bucket takes one.
    pub fn with_max_delay(mut self, max_delay: Duration) -> Result<Policy> {
        if self.algorithm != Algorithm::LeakyBucket {
            return Err(Error::policy(
                "max_delay",
                format!(
                    "does not apply to {}; only leaky_bucket takes one",
                    self.algorithm
                ),
            ));
        }
        if max_delay > MAX_PERIOD {
            return Err(Error::policy(
                "max_delay",
                format!("is {max_delay:?}; the maximum is ten years"),
            ));
        }
        self.max_delay_us = duration_to_micros(max_delay);
        Ok(self)
    }

    /// This policy's share for one of `replicas` processes that each enforce it alone, as in
    /// the degraded mode's local fallback: together they never admit more than the policy's
    /// rate.
    ///
    /// The limit is divided by `replicas`, rounded down. When that leaves less than one (a
    /// limit of 2 per minute over 10 replicas), a replica cannot admit a fraction of a
    /// request: its share is then **1 per a longer period**, `period × ⌈replicas ÷ limit⌉`
    /// (1 per 5 minutes here: 10 replicas admit 10 per 5 minutes, the policy's 2 per minute),
    /// capped at ten years. The burst is divided the same way, at least 1, so while every
    /// replica falls back at once the fleet's momentary burst is at least `replicas`.
    ///
    /// ```
    /// use std::num::NonZeroU32;
    /// use std::time::Duration;
    /// use statehouse_core::Policy;
    /// let p = Policy::gcra(100, Duration::from_secs(1))?;
    /// let share = p.divided(NonZeroU32::new(3).unwrap());
    /// assert_eq!((share.limit(), share.period()), (33, Duration::from_secs(1)));
    ///
    /// let scarce = Policy::gcra(2, Duration::from_secs(60))?;
    /// let share = scarce.divided(NonZeroU32::new(10).unwrap());
    /// assert_eq!((share.limit(), share.period()), (1, Duration::from_secs(300)));
    /// # Ok::<(), statehouse_core::Error>(())
    /// ```
    pub fn divided(&self, replicas: NonZeroU32) -> Policy {
        let n = u64::from(replicas.get());
        let mut p = self.clone();
        p.limit = (self.limit / n).max(1);
        p.burst = (self.burst / n).max(1);
        if self.limit < n {
            // ⌈n ÷ limit⌉ periods per admitted unit on each replica: n ÷ ⌈n ÷ limit⌉ ≤ limit.
            let stretch = n.div_ceil(self.limit);
            p.period_us = self
                .period_us
                .saturating_mul(stretch)
                .min(duration_to_micros(MAX_PERIOD));
        }
        p
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Units admitted per period.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The period.
    pub fn period(&self) -> Duration {
        Duration::from_micros(self.period_us)
    }

    /// The period in microseconds.
    pub fn period_micros(&self) -> u64 {
        self.period_us
    }

    /// The burst (token bucket capacity, GCRA burst); equals `limit` unless set.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// The leaky bucket's maximum delay, in microseconds.
    pub fn max_delay_micros(&self) -> u64 {
        self.max_delay_us
    }

    /// The leaky bucket's maximum delay.
    pub fn max_delay(&self) -> Duration {
        Duration::from_micros(self.max_delay_us)
    }

    /// The emission interval `period / limit` in microseconds, rounded up so that the limiter
    /// is never more permissive than the policy.
    pub fn interval_micros(&self) -> u64 {
        self.period_us.div_ceil(self.limit)
    }

    /// The most cost one request can ever be admitted with.
    pub fn capacity(&self) -> u64 {
        if self.algorithm.has_burst() {
            self.burst
        } else {
            self.limit
        }
    }

    /// Checks that a request of `cost` can ever be admitted by this policy.
    pub fn check_cost(&self, cost: u64) -> Result<()> {
        if cost == 0 {
            return Err(Error::InvalidCost {
                cost,
                reason: "a cost must be at least 1 (use peek to look without consuming)".into(),
            });
        }
        if cost > self.capacity() {
            return Err(Error::InvalidCost {
                cost,
                reason: format!(
                    "exceeds the policy's capacity of {} ({} {} per {:?}), so it could never \
                     be admitted",
                    self.capacity(),
                    self.algorithm,
                    self.limit,
                    self.period()
                ),
            });
        }
        Ok(())
    }
}

/// `NonZeroU32` of a replica count, for [`Policy::divided`], rejecting zero with a clear error.
pub fn replica_count(n: u32) -> Result<NonZeroU32> {
    NonZeroU32::new(n).ok_or_else(|| Error::policy("replicas", "must be at least 1"))
}
