//! [`ResponseFuture`]: the inner service's response, then the session's cookie and changes.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::{CACHE_CONTROL, SET_COOKIE};
use http::{HeaderValue, Response, StatusCode};
use pin_project_lite::pin_project;
use statehouse::{SessionCodec, Updated};

use super::handle::{CookieChange, Finish, Session};
use super::layer::LayerConfig;
use crate::Error;

type Finishing<B, E> = Pin<Box<dyn Future<Output = Result<Response<B>, E>> + Send>>;

pin_project! {
    /// The response future of a [`SessionService`](super::SessionService).
    ///
    /// Without session changes to write (reads, logins, logouts: their store calls happened
    /// in the handler), the cookie is set as soon as the inner response is ready, without an
    /// allocation. With changes, one boxed future writes them (one store call, within the
    /// deadline) before the response goes out; so does, with a persistent cookie, the check
    /// that a token whose session a read refreshed (or an explicit `save` wrote) is still
    /// current before its cookie is re-sent (one load: with the default refresh throttle, at
    /// most once per refresh interval of a session for reads).
    pub struct ResponseFuture<F, B, E, C> {
        #[pin]
        state: State<F, B, E>,
        session: Option<Session<C>>,
        config: Arc<LayerConfig<C>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B, E> {
        Inner { #[pin] future: F },
        Finishing { future: Finishing<B, E> },
    }
}

impl<F, B, E, C> fmt::Debug for ResponseFuture<F, B, E, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E, C> ResponseFuture<F, B, E, C> {
    pub(crate) fn new(future: F, session: Session<C>, config: Arc<LayerConfig<C>>) -> Self {
        ResponseFuture {
            state: State::Inner { future },
            session: Some(session),
            config,
        }
    }
}

impl<F, B, E, C> Future for ResponseFuture<F, B, E, C>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Default + Send + 'static,
    E: Send + 'static,
    C: SessionCodec,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Inner { future } => {
                    let response = ready!(future.poll(cx))?;
                    let Some(session) = this.session.take() else {
                        return Poll::Ready(Ok(response));
                    };
                    let finish = match session.try_finish() {
                        Some(finish) if finish.save.is_none() && finish.resend.is_none() => {
                            return Poll::Ready(Ok(complete(response, finish, this.config, None)));
                        }
                        other => other,
                    };
                    let config = this.config.clone();
                    let future = Box::pin(async move {
                        let mut finish = match finish {
                            Some(finish) => finish,
                            None => session.finish().await,
                        };
                        // Whether the store confirms the token the cookie would carry again.
                        let (written, current) = match &finish.save {
                            Some((token, changes)) => match session.write(token, changes).await {
                                // Revoked or expired meanwhile (a logout in another tab, an
                                // old token past its grace): nothing was written, so the
                                // response must not say it was. A token this request issued
                                // (a login, a rotation) is dead: the cookie is cleared rather
                                // than set to it. Otherwise the cookie is left alone: the
                                // browser may hold a newer token.
                                Ok(Updated::Gone) => {
                                    if matches!(finish.cookie, CookieChange::Set(_)) {
                                        finish.cookie = CookieChange::Clear;
                                    }
                                    (Some(Error::NoSession), false)
                                }
                                Ok(updated) => (None, updated == Updated::Written),
                                Err(e) => (Some(e), false),
                            },
                            None => (None, false),
                        };
                        if let Some(token) = finish.resend.take() {
                            let current = current
                                || (finish.save.is_none() && session.still_current(&token).await);
                            if current {
                                finish.cookie = CookieChange::Set(token);
                            }
                        }
                        Ok(complete(response, finish, &config, written))
                    });
                    this.state.set(State::Finishing { future });
                }
                StateProj::Finishing { future } => return future.as_mut().poll(cx),
            }
        }
    }
}

fn status_only<B: Default>(status: StatusCode) -> Response<B> {
    let mut response = Response::new(B::default());
    *response.status_mut() = status;
    response
}

/// The final response: the policy's 503, or the write's error, or the handler's response;
/// then the cookie.
fn complete<B: Default, C: SessionCodec>(
    response: Response<B>,
    finish: Finish,
    config: &LayerConfig<C>,
    written: Option<Error>,
) -> Response<B> {
    let mut response = if finish.reject && response.status() != StatusCode::SERVICE_UNAVAILABLE {
        // `SessionStoreDown::Reject503`, even if the handler swallowed the error.
        status_only(StatusCode::SERVICE_UNAVAILABLE)
    } else if let Some(error) = written {
        if matches!(error, Error::NoSession) {
            // A race with a logout elsewhere or a rotation, not a fault.
            tracing::debug!("statehouse: session changes dropped: the session ended meanwhile");
        } else {
            tracing::warn!(error = %error, "statehouse: session changes could not be written");
        }
        status_only(error.status())
    } else {
        response
    };
    let set_cookie = match finish.cookie {
        CookieChange::Keep => return response,
        CookieChange::Set(token) => config.cookie.set_cookie(&token),
        CookieChange::Clear => config.cookie.clear_cookie(),
    };
    let headers = response.headers_mut();
    headers.append(SET_COOKIE, set_cookie);
    if config.no_store_on_set_cookie && !headers.contains_key(CACHE_CONTROL) {
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}
