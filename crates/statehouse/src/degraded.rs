//! What a limiter decides when its store is down, slow, or behind an open circuit breaker.

#[cfg(feature = "embedded")]
use std::num::NonZeroU32;

/// What a [`RateLimiter`](crate::RateLimiter) does when its store cannot decide: the store is
/// unreachable ([`Error::is_unavailable`](crate::Error::is_unavailable)), missed the deadline,
/// or the circuit breaker is open.
///
/// Every decision made this way has [`Decision::degraded`](crate::Decision::degraded) set and is
/// counted in [`LimiterStats::degraded_decisions`](crate::LimiterStats::degraded_decisions).
/// Invalid input is never degraded: it is returned as an error whatever the policy.
///
/// The default is [`DegradedPolicy::FailOpen`]; see the [crate docs](crate#degraded-mode) for
/// why, and for when to pick another.
///
/// ```
/// use statehouse::{DegradedPolicy, EmbeddedStore, RateLimiter};
///
/// // Login attempts: better to refuse than to let a password-guessing run through.
/// let login_limiter = RateLimiter::builder(EmbeddedStore::new())
///     .on_store_failure(DegradedPolicy::FailClosed)
///     .build()?;
/// assert_eq!(DegradedPolicy::default(), DegradedPolicy::FailOpen);
/// # Ok::<(), statehouse::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum DegradedPolicy {
    /// Admit the request. The decision reports `remaining == limit` and no reset time, since
    /// nothing was counted. The default.
    #[default]
    FailOpen,
    /// Deny the request, with a `retry_after` of the circuit breaker's `open_for` (the time
    /// after which the store is tried again).
    FailClosed,
    /// Decide with an in-process [`EmbeddedStore`](crate::EmbeddedStore) running the same
    /// algorithm, with the policy's limit and burst divided by `replicas`
    /// ([`Policy::divided`](crate::Policy::divided); a limit below `replicas` becomes one per
    /// a longer period): if every one of `replicas` processes falls back at once, the fleet as
    /// a whole admits at most the policy's rate.
    ///
    /// The counts taken while degraded stay in this process: they are **not** copied back to
    /// the store when it returns (as in rate-limiter-flexible's insurance limiter), so right
    /// after a recovery a key may be admitted up to its full limit again, on top of what the
    /// fallback admitted. Conversely, what the store had counted before the outage is not
    /// known to the fallback. A request whose cost exceeds one replica's share is denied while
    /// degraded. Decisions report the divided limit.
    #[cfg(feature = "embedded")]
    LocalFallback {
        /// How many processes share the limit (round it up when unsure: dividing by too many is
        /// stricter, by too few lets the fleet admit more than the limit).
        replicas: NonZeroU32,
    },
    /// Return the store's error (or [`Error::Unavailable`](crate::Error::Unavailable) when the
    /// breaker is open) and let the caller decide.
    ReturnError,
}
