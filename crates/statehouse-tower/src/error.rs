//! The one error type of `statehouse-tower`.

use http::StatusCode;

/// What can go wrong in the session layer.
///
/// With the `axum` feature it is an `IntoResponse`, so handlers can use `?`: the status is
/// [`Error::status`], the body a short fixed text (never the store's message, which may name
/// hosts).
///
/// ```
/// use http::StatusCode;
/// use statehouse_tower::Error;
/// assert_eq!(Error::NoSession.status(), StatusCode::UNAUTHORIZED);
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is invalid; `field` names it.
    #[error("invalid session configuration: `{field}` {reason}")]
    InvalidConfig {
        /// The field, e.g. `domain`.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// The request has no live session (none, unknown, revoked or expired), and the operation
    /// needs one.
    #[error("no live session")]
    NoSession,
    /// The request did not pass through a [`SessionLayer`](crate::SessionLayer).
    #[error("no session handle in the request: is the SessionLayer installed on this route?")]
    MissingLayer,
    /// The store failed, or rejected the input (see
    /// [`is_unavailable`](Self::is_unavailable)).
    #[error(transparent)]
    Store(#[from] statehouse::Error),
}

impl Error {
    /// True when the session store could not answer (unreachable, past the deadline, circuit
    /// breaker open).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Store(e) if e.is_unavailable())
    }

    /// The HTTP status this error answers with: 401 for [`NoSession`](Self::NoSession), 503
    /// when the store is unavailable, 400 for invalid input (a value too large to store),
    /// 500 otherwise.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::NoSession => StatusCode::UNAUTHORIZED,
            Error::Store(e) if e.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            Error::Store(e) if e.is_invalid_input() => StatusCode::BAD_REQUEST,
            Error::Store(_) | Error::InvalidConfig { .. } | Error::MissingLayer => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}
