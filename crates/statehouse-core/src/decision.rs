//! What a limiter answers.

use std::time::Duration;

/// The answer to one rate-limit check.
///
/// Every time in a decision is a relative duration, never a clock reading of one replica, so
/// replicas with skewed clocks report the same thing.
///
/// ```
/// use std::time::Duration;
/// use statehouse_core::{algorithm, Mode, Policy, Timestamp};
///
/// let policy = Policy::fixed_window(2, Duration::from_secs(10))?;
/// let now = Timestamp::from_micros(3_000_000);
/// let step = algorithm::decide(&policy, None, now, 1, Mode::Consume);
/// assert!(step.decision.allowed);
/// assert_eq!(step.decision.remaining, 1);
/// assert_eq!(step.decision.reset_after, Duration::from_secs(7));
/// assert_eq!(step.decision.retry_after, None);
/// # Ok::<(), statehouse_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Decision {
    /// Whether the request may go on (for the leaky bucket: after [`Decision::delay`]).
    pub allowed: bool,
    /// The policy's limit, for `RateLimit-Policy`/`X-RateLimit-Limit` headers.
    pub limit: u64,
    /// Units of cost that could still be admitted now (after this request, if admitted).
    pub remaining: u64,
    /// Time until the limiter is back to its full allowance if nothing more arrives.
    pub reset_after: Duration,
    /// When denied: the least time after which the same request could be admitted. `None`
    /// when allowed.
    pub retry_after: Option<Duration>,
    /// Leaky bucket: how long the caller must wait before going on. Zero for other algorithms.
    pub delay: Duration,
    /// True when the decision was not made by the shared store (it was down or slow) but by the
    /// configured degraded policy.
    pub degraded: bool,
}

impl Decision {
    /// A decision made without the store (fail-open, fail-closed): `allowed`, with the policy's
    /// limit, marked degraded.
    pub fn degraded(allowed: bool, limit: u64, retry_after: Option<Duration>) -> Decision {
        Decision {
            allowed,
            limit,
            remaining: if allowed { limit } else { 0 },
            reset_after: Duration::ZERO,
            retry_after: if allowed { None } else { retry_after },
            delay: Duration::ZERO,
            degraded: true,
        }
    }

    /// Builds a decision from its parts in microseconds (as backends return them).
    pub fn from_parts(
        allowed: bool,
        limit: u64,
        remaining: u64,
        reset_after_us: u64,
        retry_after_us: Option<u64>,
        delay_us: u64,
    ) -> Decision {
        Decision {
            allowed,
            limit,
            remaining,
            reset_after: Duration::from_micros(reset_after_us),
            retry_after: retry_after_us.map(Duration::from_micros),
            delay: Duration::from_micros(delay_us),
            degraded: false,
        }
    }
}

/// The answer to a set of checks made together (several limits on one request).
///
/// Either every limit admitted the request and all were consumed, or at least one denied and
/// none was consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// One decision per check, in the order given.
    pub decisions: Vec<Decision>,
}

impl Verdict {
    /// True when every check admitted the request.
    pub fn allowed(&self) -> bool {
        self.decisions.iter().all(|d| d.allowed)
    }

    /// True when any decision was made in degraded mode.
    pub fn degraded(&self) -> bool {
        self.decisions.iter().any(|d| d.degraded)
    }

    /// The decision to report to a client: the denial with the longest `retry_after` if any
    /// check denied, otherwise the admission with the fewest `remaining`. `None` when empty.
    pub fn most_restrictive(&self) -> Option<&Decision> {
        if self.allowed() {
            self.decisions
                .iter()
                .min_by_key(|d| (d.remaining, std::cmp::Reverse(d.delay)))
        } else {
            self.decisions
                .iter()
                .filter(|d| !d.allowed)
                .max_by_key(|d| d.retry_after)
        }
    }
}
