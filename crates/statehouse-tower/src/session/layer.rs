//! [`SessionLayer`]: installs the session handle on every request.

use std::sync::Arc;

use statehouse::{JsonCodec, SessionCodec, Sessions};
use tower_layer::Layer;

use super::ClientIp;
use super::cookie::CookieConfig;
use super::service::SessionService;

/// A tower [`Layer`] that gives every request a lazy [`Session`](super::Session) handle and
/// answers with the cookies and the store-down policy (see the [crate docs](crate)).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use axum::Router;
/// use axum::body::Body;
/// use axum::routing::{get, post};
/// use http::{Request, StatusCode, header};
/// use statehouse::{EmbeddedSessionStore, SessionConfig, Sessions};
/// use statehouse_tower::{AuthenticatedSession, CookieConfig, Session, SessionLayer};
/// use tower::ServiceExt;
///
/// let sessions = Sessions::new(EmbeddedSessionStore::new(SessionConfig::default()));
/// let app = Router::new()
///     .route("/login", post(|s: Session| async move { s.login("alice", &[]).await }))
///     .route("/me", get(|a: AuthenticatedSession| async move { a.user_id }))
///     .layer(
///         SessionLayer::new(sessions)
///             .cookie(CookieConfig::default())
///             .no_store_on_set_cookie(true),
///     );
///
/// let res = app.clone().oneshot(Request::post("/login").body(Body::empty())?).await?;
/// let set_cookie = res.headers()[header::SET_COOKIE].to_str()?;
/// assert!(set_cookie.ends_with("; Path=/; Secure; HttpOnly; SameSite=Lax"));
/// assert_eq!(res.headers()[header::CACHE_CONTROL], "no-store");
/// let cookie = set_cookie.split(';').next().unwrap_or_default();
///
/// let me = Request::get("/me").header(header::COOKIE, cookie).body(Body::empty())?;
/// let res = app.clone().oneshot(me).await?;
/// assert_eq!(res.status(), StatusCode::OK);
/// assert!(res.headers().get(header::SET_COOKIE).is_none());
///
/// let anonymous = app.oneshot(Request::get("/me").body(Body::empty())?).await?;
/// assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct SessionLayer<C = JsonCodec> {
    config: Arc<LayerConfig<C>>,
}

impl<C> Clone for SessionLayer<C> {
    fn clone(&self) -> Self {
        SessionLayer {
            config: self.config.clone(),
        }
    }
}

/// What every [`SessionService`] of one layer shares.
#[derive(Debug, Clone)]
pub(crate) struct LayerConfig<C> {
    pub(crate) sessions: Sessions<C>,
    pub(crate) cookie: CookieConfig,
    pub(crate) no_store_on_set_cookie: bool,
    pub(crate) client_ip: ClientIp,
}

impl<C: SessionCodec> SessionLayer<C> {
    /// A layer over `sessions` with the secure [`CookieConfig::default`] and `Cache-Control:
    /// no-store` on responses that set the cookie. The store-down policy is the one `sessions`
    /// was built with ([`SessionsBuilder::on_store_down`](statehouse::SessionsBuilder::on_store_down)).
    pub fn new(sessions: Sessions<C>) -> Self {
        SessionLayer {
            config: Arc::new(LayerConfig {
                sessions,
                cookie: CookieConfig::default(),
                no_store_on_set_cookie: true,
                client_ip: ClientIp::default(),
            }),
        }
    }

    fn config_mut(&mut self) -> &mut LayerConfig<C> {
        // Builders run before the layer is cloned into services, so this does not copy.
        Arc::make_mut(&mut self.config)
    }

    /// The cookie's name and attributes (already validated by [`CookieConfig`]'s builder).
    pub fn cookie(mut self, cookie: CookieConfig) -> Self {
        self.config_mut().cookie = cookie;
        self
    }

    /// Whether a response carrying `Set-Cookie` and no `Cache-Control` of its own gets
    /// `Cache-Control: no-store` (default true). OWASP asks that responses carrying a session
    /// id not be cached (`no-cache="Set-Cookie"`); a shared cache that stored one would hand
    /// the session to the next visitor. A handler that sets its own `Cache-Control` keeps it.
    pub fn no_store_on_set_cookie(mut self, enabled: bool) -> Self {
        self.config_mut().no_store_on_set_cookie = enabled;
        self
    }
}

impl<C: SessionCodec> SessionLayer<C> {
    /// Where the client's IP address of a new session comes from (default
    /// [`ClientIp::Peer`], the connection's peer address). Behind a load balancer, say which
    /// header your proxies set: see [`ClientIp`] for why a header is never trusted by default.
    pub fn client_ip(mut self, source: ClientIp) -> Self {
        self.config_mut().client_ip = source;
        self
    }
}

impl<S, C: SessionCodec> Layer<S> for SessionLayer<C> {
    type Service = SessionService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        SessionService::new(inner, self.config.clone())
    }
}
