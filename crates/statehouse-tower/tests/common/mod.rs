//! The harness shared by the HTTP tests: the example app's Router over a real store (embedded
//! or a real Redis from `statehouse-testkit`, both following a `ManualClock`), behind a
//! counting wrapper, driven through `tower::ServiceExt::oneshot` or through hyper's client on
//! a real socket; and a cookie jar per "device".

#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use axum::Router;
use axum::body::{Body, Bytes};
use http::header::{CONTENT_TYPE, COOKIE, SET_COOKIE};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use statehouse::{
    Created, EmbeddedSessionStore, LoadedSession, ManualClock, NewSession, RedisSessionStore,
    RedisTopology, SessionChanges, SessionConfig, SessionId, SessionInfo, SessionStore,
    SessionToken, Sessions, SessionsBuilder, TimeSource,
};
use statehouse_testkit::{shared_standalone, unique_prefix};
use statehouse_tower::CookieConfig;
use tower::ServiceExt;

#[path = "../../examples/sessions_app.rs"]
pub mod sessions_app;

/// Which real store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Redis,
}

/// How requests reach the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Oneshot,
    Socket,
}

/// Counts every call to the store it wraps (and delegates each one to it).
#[derive(Debug)]
pub struct Counting {
    inner: Arc<dyn SessionStore>,
    pub calls: Arc<AtomicUsize>,
    pub loads: Arc<AtomicUsize>,
}

impl Counting {
    fn bump(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl SessionStore for Counting {
    async fn create_session(&self, new: &NewSession) -> statehouse::Result<Created> {
        self.bump();
        self.inner.create_session(new).await
    }
    async fn load(&self, token: &SessionToken) -> statehouse::Result<Option<LoadedSession>> {
        self.bump();
        self.loads.fetch_add(1, Ordering::SeqCst);
        self.inner.load(token).await
    }
    async fn update(
        &self,
        token: &SessionToken,
        changes: &SessionChanges,
    ) -> statehouse::Result<statehouse::Updated> {
        self.bump();
        self.inner.update(token, changes).await
    }
    async fn rotate_session(
        &self,
        token: &SessionToken,
    ) -> statehouse::Result<Option<statehouse::Rotated>> {
        self.bump();
        self.inner.rotate_session(token).await
    }
    async fn revoke_session(
        &self,
        token: &SessionToken,
    ) -> statehouse::Result<Option<statehouse::Revoked>> {
        self.bump();
        self.inner.revoke_session(token).await
    }
    async fn list_for_user(&self, user_id: &str) -> statehouse::Result<Vec<SessionInfo>> {
        self.bump();
        self.inner.list_for_user(user_id).await
    }
    async fn revoke_by_id(&self, user_id: &str, id: &SessionId) -> statehouse::Result<bool> {
        self.bump();
        self.inner.revoke_by_id(user_id, id).await
    }
    async fn revoke_all_for_user(
        &self,
        user_id: &str,
        keep: Option<&SessionId>,
    ) -> statehouse::Result<Vec<SessionId>> {
        self.bump();
        self.inner.revoke_all_for_user(user_id, keep).await
    }
}

/// A real store following `clock`.
pub async fn real_store(
    backend: Backend,
    clock: &ManualClock,
    redis_url: Option<String>,
) -> Arc<dyn SessionStore> {
    match backend {
        Backend::Embedded => Arc::new(
            EmbeddedSessionStore::builder()
                .clock(clock.clone())
                .config(SessionConfig::default())
                .build()
                .expect("embedded session store"),
        ),
        Backend::Redis => {
            let url = redis_url.unwrap_or_else(|| shared_standalone().url());
            Arc::new(
                RedisSessionStore::builder(RedisTopology::Standalone(url))
                    .prefix(&format!("{}:", unique_prefix("tower")))
                    .time_source(TimeSource::Caller(Arc::new(clock.clone())))
                    .config(SessionConfig::default())
                    .connect()
                    .await
                    .expect("connect to the test redis"),
            )
        }
    }
}

/// One app under test.
pub struct Harness {
    pub clock: ManualClock,
    pub calls: Arc<AtomicUsize>,
    pub loads: Arc<AtomicUsize>,
    transport: Transport,
}

enum Transport {
    Oneshot(Router),
    Socket {
        base: String,
        client: Client<HttpConnector, Full<Bytes>>,
        server: tokio::task::JoinHandle<()>,
    },
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Transport::Socket { server, .. } = &self.transport {
            server.abort();
        }
    }
}

/// The response, body collected.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all(SET_COOKIE)
            .iter()
            .map(|v| v.to_str().expect("ASCII Set-Cookie").to_owned())
            .collect()
    }
}

impl Harness {
    /// The example app over `backend`, with `cookie`, reached `via`.
    pub async fn new(backend: Backend, via: Via, cookie: CookieConfig) -> Harness {
        Self::with(backend, via, cookie, |b| b).await
    }

    /// As [`new`](Self::new), with the `Sessions` builder adjusted by `configure`.
    pub async fn with(
        backend: Backend,
        via: Via,
        cookie: CookieConfig,
        configure: impl FnOnce(SessionsBuilder) -> SessionsBuilder,
    ) -> Harness {
        let clock = ManualClock::starting_now();
        let store = real_store(backend, &clock, None).await;
        Self::over(store, clock, via, cookie, configure).await
    }

    /// The example app over `store`.
    pub async fn over(
        store: Arc<dyn SessionStore>,
        clock: ManualClock,
        via: Via,
        cookie: CookieConfig,
        configure: impl FnOnce(SessionsBuilder) -> SessionsBuilder,
    ) -> Harness {
        let calls = Arc::new(AtomicUsize::new(0));
        let loads = Arc::new(AtomicUsize::new(0));
        let counting = Counting {
            inner: store,
            calls: calls.clone(),
            loads: loads.clone(),
        };
        let sessions: Sessions = configure(Sessions::builder(counting))
            .build()
            .expect("sessions");
        let router = sessions_app::app(sessions, cookie);
        let transport = match via {
            Via::Oneshot => Transport::Oneshot(router),
            Via::Socket => {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind 127.0.0.1:0");
                let addr = listener.local_addr().expect("local addr");
                let server = tokio::spawn(async move {
                    sessions_app::run(listener, router, std::future::pending())
                        .await
                        .expect("serve");
                });
                Transport::Socket {
                    base: format!("http://{addr}"),
                    client: Client::builder(TokioExecutor::new()).build_http(),
                    server,
                }
            }
        };
        Harness {
            clock,
            calls,
            loads,
            transport,
        }
    }

    /// Store calls so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Store loads so far.
    pub fn loads(&self) -> usize {
        self.loads.load(Ordering::SeqCst)
    }

    /// Sends `method path` with `headers` (each appended) and an optional JSON body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        json: Option<Value>,
    ) -> Resp {
        let mut builder = Request::builder().method(method);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let body = match json {
            Some(v) => {
                builder = builder.header(CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(&v).expect("json"))
            }
            None => Bytes::new(),
        };
        match &self.transport {
            Transport::Oneshot(router) => {
                let req = builder.uri(path).body(Body::from(body)).expect("request");
                let res = router.clone().oneshot(req).await.expect("infallible");
                let (parts, body) = res.into_parts();
                Resp {
                    status: parts.status,
                    headers: parts.headers,
                    body: body.collect().await.expect("body").to_bytes(),
                }
            }
            Transport::Socket { base, client, .. } => {
                let req = builder
                    .uri(format!("{base}{path}"))
                    .body(Full::new(body))
                    .expect("request");
                let res = client
                    .request(req)
                    .await
                    .expect("HTTP request to the test server");
                let (parts, body) = res.into_parts();
                Resp {
                    status: parts.status,
                    headers: parts.headers,
                    body: body.collect().await.expect("body").to_bytes(),
                }
            }
        }
    }

    /// A new device (an empty cookie jar).
    pub fn device(&self) -> Device<'_> {
        Device {
            harness: self,
            cookie: None,
        }
    }
}

/// One browser: keeps the session cookie the app sets.
pub struct Device<'a> {
    harness: &'a Harness,
    /// `name=value`, as sent back in `Cookie`.
    pub cookie: Option<String>,
}

impl Device<'_> {
    pub async fn send(&mut self, method: Method, path: &str, json: Option<Value>) -> Resp {
        let cookie = self.cookie.clone();
        let headers: Vec<(&str, &str)> = cookie
            .iter()
            .map(|c| (COOKIE.as_str(), c.as_str()))
            .collect();
        let res = self.harness.send(method, path, &headers, json).await;
        for set in res.set_cookies() {
            let pair = set.split(';').next().unwrap_or_default();
            let cleared = pair.ends_with('=') || set.contains("Max-Age=0");
            self.cookie = if cleared { None } else { Some(pair.to_owned()) };
        }
        res
    }

    pub async fn get(&mut self, path: &str) -> Resp {
        self.send(Method::GET, path, None).await
    }

    pub async fn post(&mut self, path: &str, json: Option<Value>) -> Resp {
        self.send(Method::POST, path, json).await
    }

    pub async fn login(&mut self, user: &str) -> Resp {
        let res = self
            .post("/login", Some(serde_json::json!({ "user_id": user })))
            .await;
        assert_eq!(res.status, StatusCode::OK, "login: {:?}", res.body);
        res
    }
}
