//! A small axum app behind Statehouse's rate-limit layer: 10 requests per 10 s per client
//! address, 100 a minute per API key for requests that carry `x-api-key`, and a search route
//! with a tighter limit of its own. Run several copies on one Redis and they share the limits.
//!
//! ```text
//! cargo run -p statehouse-tower --example ratelimit_app                     # embedded store
//! cargo run -p statehouse-tower --example ratelimit_app -- --redis redis://127.0.0.1:6379
//! cargo run -p statehouse-tower --example ratelimit_app -- --listen 127.0.0.1:8080
//!
//! for i in $(seq 12); do curl -s -o /dev/null -D - localhost:3000/ | grep -i -e ^HTTP -e ratelimit -e retry; done
//! curl -i localhost:3000/search
//! curl -i -H 'x-api-key: demo' localhost:3000/
//! ```
//!
//! Each response carries `RateLimit-Policy` and `RateLimit`; past the limit the answer is
//! `429 Too Many Requests` with `Retry-After` and a `quota-exceeded` problem body.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use http::HeaderName;
use statehouse::{EmbeddedStore, Policy, RateLimiter, RedisStore};
use statehouse_tower::{ClientIp, RateLimitLayer, RateLimitRule, RuleKey};
use tokio::net::TcpListener;

/// The app's routes behind their rules over `limiter`.
fn app(limiter: RateLimiter) -> anyhow::Result<Router> {
    // Every route: 10 per 10 s per client address, and 100 a minute per API key for requests
    // that carry one; decided together (a request denied by one consumes from neither).
    let general = RateLimitLayer::new(limiter.clone())
        .rule(RateLimitRule::new(
            "per-ip",
            Policy::gcra(10, Duration::from_secs(10))?,
            RuleKey::ClientIp(ClientIp::Peer),
        )?)?
        .rule(RateLimitRule::new(
            "per-key",
            Policy::gcra(100, Duration::from_secs(60))?,
            RuleKey::Header(HeaderName::from_static("x-api-key")),
        )?)?;
    // Searches, on top: 4 per 10 s per client address. A layer of its own, checked after the
    // general one has admitted (and counted) the request.
    let search = RateLimitLayer::new(limiter).rule(RateLimitRule::new(
        "search-per-ip",
        Policy::gcra(4, Duration::from_secs(10))?,
        RuleKey::ClientIp(ClientIp::Peer),
    )?)?;
    Ok(Router::new()
        .route("/", get(|| async { "hello\n" }))
        .merge(
            Router::new()
                .route("/search", get(|| async { "results\n" }))
                .layer(search),
        )
        .layer(general))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut listen: SocketAddr = "127.0.0.1:3000".parse()?;
    let mut redis = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().unwrap_or_default().parse()?,
            "--redis" => redis = args.next(),
            other => anyhow::bail!("unknown argument {other:?} (--listen ADDR, --redis URL)"),
        }
    }
    let limiter = match &redis {
        Some(url) => RateLimiter::new(RedisStore::connect(url).await?),
        None => RateLimiter::new(EmbeddedStore::new()),
    };
    let listener = TcpListener::bind(listen).await?;
    println!(
        "ratelimit_app on http://{} ({} store)",
        listener.local_addr()?,
        if redis.is_some() { "Redis" } else { "embedded" }
    );
    let app = app(limiter)?;
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
