//! The one error type of the Statehouse library crates.

use std::time::Duration;

/// A boxed error from a backend's client library, kept as the source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in Statehouse.
///
/// A denial is not an error: it is a [`Decision`](crate::Decision) with `allowed == false`.
/// Use [`Error::is_unavailable`] to tell a store outage (where a caller picks fail-open or
/// fail-closed) from a caller mistake.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A policy field is out of range; `field` names it, `reason` says why.
    #[error("invalid policy: `{field}` {reason}")]
    InvalidPolicy {
        /// The field's name, e.g. `limit`.
        field: &'static str,
        /// Why the value is rejected.
        reason: String,
    },
    /// A key cannot be used.
    #[error("invalid key: {reason}")]
    InvalidKey {
        /// Why the key is rejected.
        reason: String,
    },
    /// A request's cost is zero or can never be admitted by its policy.
    #[error("invalid cost {cost}: {reason}")]
    InvalidCost {
        /// The rejected cost.
        cost: u64,
        /// Why it is rejected.
        reason: String,
    },
    /// A request or configuration is malformed in some other way.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The store did not answer within the deadline.
    #[error("store did not answer within {deadline:?}")]
    Timeout {
        /// The deadline that passed.
        deadline: Duration,
    },
    /// The store cannot be reached (connection refused, reset, cluster down, circuit open).
    #[error("store unavailable: {message}")]
    Unavailable {
        /// What happened.
        message: String,
        /// The client library's error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The store answered with something Statehouse cannot use (a script error, a corrupt value,
    /// a wrong type at a key).
    #[error("store error: {message}")]
    Backend {
        /// What happened.
        message: String,
        /// The client library's error, if any.
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// True when the store could not be reached or did not answer in time: the caller's
    /// degraded-mode policy applies. False for invalid input, which no fallback can fix.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Timeout { .. } | Error::Unavailable { .. })
    }

    /// True when the caller passed something invalid (policy, key, cost, input).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Error::InvalidPolicy { .. }
                | Error::InvalidKey { .. }
                | Error::InvalidCost { .. }
                | Error::InvalidInput(_)
        )
    }

    pub(crate) fn policy(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidPolicy {
            field,
            reason: reason.into(),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The longest deadline (or call timeout) a builder accepts: one hour. A deadline bounds one
/// store call; anything longer is a mistake (or "no deadline", which Statehouse does not
/// offer: a dead store must cost a bounded wait), and would overflow the clock arithmetic of
/// the timers.
pub const MAX_DEADLINE: Duration = Duration::from_secs(3600);

/// Checks a deadline or call timeout named `what`: more than zero and at most
/// [`MAX_DEADLINE`].
///
/// ```
/// use std::time::Duration;
/// use statehouse_core::check_deadline;
/// assert!(check_deadline("deadline", Duration::from_millis(50)).is_ok());
/// assert!(check_deadline("deadline", Duration::ZERO).is_err());
/// assert!(check_deadline("deadline", Duration::MAX).is_err());
/// ```
///
/// # Errors
///
/// [`Error::InvalidInput`] naming `what` when the value is out of range.
pub fn check_deadline(what: &str, deadline: Duration) -> Result<()> {
    if deadline.is_zero() {
        return Err(Error::InvalidInput(format!(
            "{what} must be more than zero"
        )));
    }
    if deadline > MAX_DEADLINE {
        return Err(Error::InvalidInput(format!(
            "{what} is {deadline:?}; the most is one hour (a store call is bounded)"
        )));
    }
    Ok(())
}
