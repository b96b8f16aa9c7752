//! axum extractors: [`Session`] and [`AuthenticatedSession`]; `IntoResponse` for [`Error`].

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use statehouse::{JsonCodec, SessionCodec};

use super::handle::Session;
use crate::Error;

/// Takes the handle the [`SessionLayer`](super::SessionLayer) installed; no store I/O.
/// Rejects with 500 ([`Error::MissingLayer`]) on a route without the layer.
impl<S: Send + Sync, C: SessionCodec> FromRequestParts<S> for Session<C> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Session<C>>()
            .cloned()
            .ok_or(Error::MissingLayer)
    }
}

/// An extractor for routes that need a signed-in user: loads the session (one store call,
/// cached for the rest of the request) and rejects with **401** when there is no live session.
/// When the store is down it rejects with 503 under
/// [`SessionStoreDown::Reject503`](statehouse::SessionStoreDown), and with 401 under
/// `Anonymous`.
///
/// ```no_run
/// use statehouse_tower::AuthenticatedSession;
///
/// async fn me(auth: AuthenticatedSession) -> String {
///     format!("{} ({})", auth.user_id, auth.roles.join(","))
/// }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AuthenticatedSession<C = JsonCodec> {
    /// The signed-in user.
    pub user_id: String,
    /// The session's roles.
    pub roles: Vec<String>,
    /// The handle, for data and life-cycle operations.
    pub session: Session<C>,
}

impl<S: Send + Sync, C: SessionCodec> FromRequestParts<S> for AuthenticatedSession<C> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let session = Session::<C>::from_request_parts(parts, state).await?;
        let user_id = session.user_id().await?.ok_or(Error::NoSession)?;
        let roles = session.roles().await?;
        Ok(AuthenticatedSession {
            user_id,
            roles,
            session,
        })
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "statehouse: session error");
        }
        // A fixed text: the store's message may name hosts or keys.
        let body = match &self {
            Error::NoSession => "no live session",
            e if e.is_unavailable() => "session store unavailable",
            _ => status.canonical_reason().unwrap_or("error"),
        };
        (status, body).into_response()
    }
}
