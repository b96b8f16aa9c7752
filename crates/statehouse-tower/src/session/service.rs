//! [`SessionService`]: the middleware itself.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::USER_AGENT;
use http::{Request, Response};
use statehouse::{JsonCodec, SessionCodec};
use tower_service::Service;

use super::cookie::{Lookup, lookup};
use super::future::ResponseFuture;
use super::handle::Session;
use super::layer::LayerConfig;

/// The service of a [`SessionLayer`](super::SessionLayer): parses the session cookie (no store
/// I/O), puts a lazy [`Session`] in the request's extensions, calls the inner service, then
/// writes the request's changes and sets the cookie if it changed.
///
/// Always ready when the inner service is; clones share the configuration. The response body
/// must implement `Default` (axum's `Body` does): the store-down policy and a failed write
/// answer with an empty body of the status.
pub struct SessionService<S, C = JsonCodec> {
    inner: S,
    config: Arc<LayerConfig<C>>,
}

impl<S: Clone, C> Clone for SessionService<S, C> {
    fn clone(&self) -> Self {
        SessionService {
            inner: self.inner.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S: fmt::Debug, C: SessionCodec> fmt::Debug for SessionService<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionService")
            .field("inner", &self.inner)
            .field("cookie", &self.config.cookie)
            .finish_non_exhaustive()
    }
}

impl<S, C: SessionCodec> SessionService<S, C> {
    pub(crate) fn new(inner: S, config: Arc<LayerConfig<C>>) -> Self {
        SessionService { inner, config }
    }
}

/// The longest `User-Agent` kept with a session.
const MAX_USER_AGENT: usize = 512;

/// The request's `User-Agent`, kept with a new session for "your devices" lists: control
/// characters (a tab passes `to_str`) dropped, cut to [`MAX_USER_AGENT`] bytes.
fn user_agent<B>(req: &Request<B>) -> Option<String> {
    let ua = req.headers().get(USER_AGENT)?.to_str().ok()?;
    let mut kept = String::with_capacity(ua.len().min(MAX_USER_AGENT));
    for c in ua.chars().filter(|c| !c.is_control()) {
        if kept.len() + c.len_utf8() > MAX_USER_AGENT {
            break;
        }
        kept.push(c);
    }
    Some(kept).filter(|k| !k.is_empty())
}

impl<S, C, ReqBody, ResBody> Service<Request<ReqBody>> for SessionService<S, C>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
    C: SessionCodec,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let config = &self.config;
        let token = match lookup(req.headers(), config.cookie.name()) {
            Lookup::Absent => None,
            Lookup::Token(token) => Some(token),
            Lookup::Rejected(why) => {
                // Never the value: it may be someone's token with a typo.
                tracing::debug!(reason = why, "statehouse: session cookie ignored");
                None
            }
        };
        let session = Session::new(
            config.sessions.clone(),
            token,
            config.cookie.max_age().is_some(),
            user_agent(&req),
            config.client_ip.resolve(&req),
        );
        req.extensions_mut().insert(session.clone());
        ResponseFuture::new(self.inner.call(req), session, self.config.clone())
    }
}
