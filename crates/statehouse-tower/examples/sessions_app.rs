//! A small axum app with Statehouse sessions: log in, see who you are, list your devices, log
//! out here or everywhere.
//!
//! ```text
//! cargo run -p statehouse-tower --example sessions_app                      # embedded store
//! cargo run -p statehouse-tower --example sessions_app -- --redis redis://127.0.0.1:6379
//! REDIS_URL=redis://127.0.0.1:6379 cargo run -p statehouse-tower --example sessions_app
//! cargo run -p statehouse-tower --example sessions_app -- --listen 127.0.0.1:8080
//!
//! curl -i -c jar -b jar -X POST localhost:3000/login -H 'content-type: application/json' \
//!      -d '{"user_id":"alice"}'
//! curl -i -b jar localhost:3000/me
//! curl -i -b jar localhost:3000/sessions
//! curl -i -c jar -b jar -X POST localhost:3000/logout-everywhere
//! ```
//!
//! | route | what |
//! |---|---|
//! | `POST /login` `{"user_id": "…"}` | logs in (a demo: no password), rotating any session |
//! | `GET /me` | `{"user_id", "roles", "theme"}`, 401 without a session |
//! | `PUT /theme` `{"theme": "…"}` | stores a session field (written at the end of the request) |
//! | `GET /sessions` | the user's devices, the current one marked |
//! | `POST /logout` | logs out here |
//! | `POST /logout-everywhere` | logs out every device of the user |
//! | `POST /logout-other-devices` | logs out every other device, keeps this one |
//! | `POST /elevate` | adds the `admin` role: a privilege change, so the token rotates |
//! | `GET /health` | never touches the session: no store I/O |
//!
//! The app serves plain HTTP, so it uses [`CookieConfig::development`] (no `__Host-` prefix,
//! not `Secure`) unless `--secure-cookie` asks for the production defaults (behind a TLS
//! proxy).

use std::future::Future;
use std::net::SocketAddr;

use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use statehouse::{
    EmbeddedSessionStore, RedisSessionStore, RedisTopology, SessionConfig, SessionStore, Sessions,
};
use statehouse_tower::{AuthenticatedSession, CookieConfig, Error, Session, SessionLayer};
use tokio::net::TcpListener;

/// The app's routes behind a [`SessionLayer`] over `sessions`, with `cookie`.
pub fn app(sessions: Sessions, cookie: CookieConfig) -> Router {
    Router::new()
        .route("/login", post(login))
        .route("/me", get(me))
        .route("/theme", put(set_theme))
        .route("/sessions", get(list_sessions))
        .route("/logout", post(logout))
        .route("/logout-everywhere", post(logout_everywhere))
        .route("/logout-other-devices", post(logout_other_devices))
        .route("/elevate", post(elevate))
        .route("/health", get(|| async { "ok" }))
        .layer(SessionLayer::new(sessions).cookie(cookie))
}

/// The session store: Redis when `redis_url` is given, the embedded store otherwise.
pub async fn store(redis_url: Option<&str>) -> Result<Box<dyn SessionStore>, statehouse::Error> {
    Ok(match redis_url {
        Some(url) => Box::new(
            RedisSessionStore::builder(RedisTopology::Standalone(url.to_owned()))
                .config(SessionConfig::default())
                .connect()
                .await?,
        ),
        None => Box::new(EmbeddedSessionStore::new(SessionConfig::default())),
    })
}

/// Serves `app` on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // With the peer address in every request, so new sessions record the client's IP
    // (`ClientIp::Peer`, the layer's default).
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

#[derive(Deserialize)]
struct LoginForm {
    user_id: String,
}

async fn login(session: Session, Json(form): Json<LoginForm>) -> Result<Json<Value>, Error> {
    session.login(&form.user_id, &["user"]).await?;
    Ok(Json(json!({ "user_id": form.user_id })))
}

async fn me(auth: AuthenticatedSession) -> Result<Json<Value>, Error> {
    let theme: Option<String> = auth.session.get("theme").await?;
    Ok(Json(json!({
        "user_id": auth.user_id,
        "roles": auth.roles,
        "theme": theme,
    })))
}

#[derive(Deserialize)]
struct ThemeForm {
    theme: String,
}

async fn set_theme(
    auth: AuthenticatedSession,
    Json(form): Json<ThemeForm>,
) -> Result<Json<Value>, Error> {
    auth.session.insert("theme", &form.theme).await?;
    Ok(Json(json!({ "theme": form.theme })))
}

async fn list_sessions(auth: AuthenticatedSession) -> Result<Json<Value>, Error> {
    let current = auth.session.id().await?;
    let devices = auth.session.list_devices().await?;
    let devices: Vec<Value> = devices
        .into_iter()
        .map(|d| {
            json!({
                "id": d.id.as_str(),
                "current": Some(&d.id) == current.as_ref(),
                "created_at_us": d.created_at.as_micros(),
                "last_seen_us": d.last_seen.as_micros(),
                "expires_at_us": d.expires_at.as_micros(),
                "user_agent": d.user_agent,
                "ip": d.ip,
            })
        })
        .collect();
    Ok(Json(Value::Array(devices)))
}

async fn logout(session: Session) -> Result<Json<Value>, Error> {
    let revoked = session.logout().await?;
    Ok(Json(json!({ "revoked": revoked })))
}

async fn logout_everywhere(auth: AuthenticatedSession) -> Result<Json<Value>, Error> {
    let revoked = auth.session.logout_everywhere().await?;
    Ok(Json(json!({ "revoked": revoked })))
}

async fn logout_other_devices(auth: AuthenticatedSession) -> Result<Json<Value>, Error> {
    let revoked = auth.session.logout_other_devices().await?;
    Ok(Json(json!({ "revoked": revoked })))
}

async fn elevate(auth: AuthenticatedSession) -> Result<Json<Value>, Error> {
    // A real app checks a second factor here.
    auth.session.set_roles(&["user", "admin"]).await?;
    Ok(Json(json!({ "roles": ["user", "admin"] })))
}

/// Command line: `--listen ADDR` (or `LISTEN_ADDR`, default `127.0.0.1:3000`), `--redis URL`
/// (or `REDIS_URL`; default the embedded store), `--secure-cookie`.
struct Args {
    listen: SocketAddr,
    redis: Option<String>,
    secure_cookie: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut listen = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let mut redis = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty());
    let mut secure_cookie = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                listen = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--listen ADDR"))?
            }
            "--redis" => redis = Some(args.next().ok_or_else(|| anyhow::anyhow!("--redis URL"))?),
            "--secure-cookie" => secure_cookie = true,
            other => anyhow::bail!(
                "unknown argument {other:?}; usage: sessions_app [--listen ADDR] [--redis URL] \
                 [--secure-cookie]"
            ),
        }
    }
    Ok(Args {
        listen: listen.parse()?,
        redis,
        secure_cookie,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let store = store(args.redis.as_deref()).await?;
    let sessions = Sessions::builder_shared(store.into()).build()?;
    let cookie = if args.secure_cookie {
        CookieConfig::default()
    } else {
        CookieConfig::development()
    };
    let listener = TcpListener::bind(args.listen).await?;
    println!(
        "sessions_app on http://{} ({} store)",
        listener.local_addr()?,
        if args.redis.is_some() {
            "Redis"
        } else {
            "embedded"
        }
    );
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    run(listener, app(sessions, cookie), shutdown).await?;
    Ok(())
}
