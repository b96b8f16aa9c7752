//! Configuring and connecting a [`RedisStore`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use statehouse_core::{Clock, Error, Result, key::validate_prefix};

use crate::connection::{Connection, StandaloneConnection};
use crate::error::from_redis;
use crate::store::RedisStore;

/// The key prefix used unless [`RedisStoreBuilder::prefix`] sets another.
pub const DEFAULT_PREFIX: &str = "sh:rl:";

/// The per-call deadline used unless [`RedisStoreBuilder::call_timeout`] sets another.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// The expiry slack used with [`TimeSource::Caller`] unless
/// [`RedisStoreBuilder::skew_allowance`] sets another.
pub const DEFAULT_CALLER_SKEW_ALLOWANCE: Duration = Duration::from_secs(5);

/// Reconnection attempts per outage before pending calls fail. A rate limiter wants a fast
/// "unavailable" (its caller has a degraded mode) more than a patient reconnect: the next call
/// starts a new attempt anyway.
const RECONNECT_RETRIES: usize = 2;
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(20);
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(200);

/// Where the Redis deployment is.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisTopology {
    /// One Redis server (or a proxy in front of several), by URL: `redis://host:6379/0`,
    /// `rediss://` for TLS when redis-rs is built with a TLS feature.
    Standalone(String),
    /// A Redis Cluster, by the URLs of one or more of its nodes; the others are discovered.
    Cluster(Vec<String>),
}

impl fmt::Debug for RedisTopology {
    // URLs may carry a password, so they are never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisTopology::Standalone(_) => f.write_str("Standalone(..)"),
            RedisTopology::Cluster(urls) => write!(f, "Cluster({} seed nodes)", urls.len()),
        }
    }
}

/// Which clock decides: the Redis server's or the caller's.
///
/// ```
/// use std::sync::Arc;
/// use statehouse_core::ManualClock;
/// use statehouse_redis::TimeSource;
///
/// let server = TimeSource::Server;
/// let caller = TimeSource::Caller(Arc::new(ManualClock::starting_now()));
/// # let _ = (server, caller);
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum TimeSource {
    /// The script reads Redis `TIME`: one clock for the whole fleet, however skewed the
    /// replicas' clocks are. The default.
    #[default]
    Server,
    /// The caller's clock is passed to the script. For tests (with a
    /// [`ManualClock`](statehouse_core::ManualClock)) and for managed Redis services that refuse
    /// `TIME` in scripts. Replicas must then keep their clocks in sync; see
    /// [`RedisStoreBuilder::skew_allowance`].
    Caller(Arc<dyn Clock>),
}

/// Configures a [`RedisStore`]; made by [`RedisStore::builder`].
///
/// ```no_run
/// use std::time::Duration;
/// use statehouse_redis::{RedisStore, RedisTopology};
///
/// # async fn example() -> Result<(), statehouse_core::Error> {
/// let store = RedisStore::builder(RedisTopology::Standalone("redis://127.0.0.1:6379".into()))
///     .prefix("myapp:rl:")
///     .call_timeout(Duration::from_millis(250))
///     .connect()
///     .await?;
/// # let _ = store;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `connect` is awaited"]
pub struct RedisStoreBuilder {
    topology: RedisTopology,
    prefix: String,
    time_source: TimeSource,
    skew_allowance: Option<Duration>,
    call_timeout: Duration,
}

impl RedisStoreBuilder {
    pub(crate) fn new(topology: RedisTopology) -> Self {
        RedisStoreBuilder {
            topology,
            prefix: DEFAULT_PREFIX.to_owned(),
            time_source: TimeSource::Server,
            skew_allowance: None,
            call_timeout: DEFAULT_CALL_TIMEOUT,
        }
    }

    /// The prefix of every storage key (default `"sh:rl:"`): at most 64 printable ASCII
    /// characters without spaces or braces, checked by [`connect`](Self::connect).
    pub fn prefix(mut self, prefix: &str) -> Self {
        prefix.clone_into(&mut self.prefix);
        self
    }

    /// Which clock decides (default [`TimeSource::Server`]).
    pub fn time_source(mut self, time_source: TimeSource) -> Self {
        self.time_source = time_source;
        self
    }

    /// Slack added to the expiry of every key the store writes.
    ///
    /// Defaults to zero with [`TimeSource::Server`] and to five seconds with
    /// [`TimeSource::Caller`]. With server time, the script's clock and the clock Redis expires
    /// keys on are the same, so a key expires exactly when its state stops mattering. With
    /// caller time they are not: a caller decides with its own clock, but Redis expires the key
    /// on the server's. If the writer's clock runs ahead, or another caller's clock lags behind,
    /// a key could vanish while a caller still considers its state live, and that caller would
    /// then admit requests against a fresh state: more than the limit. The slack keeps keys
    /// alive for that much clock disagreement. Set it to the skew you tolerate between replicas.
    pub fn skew_allowance(mut self, skew_allowance: Duration) -> Self {
        self.skew_allowance = Some(skew_allowance);
        self
    }

    /// The deadline of one call to Redis (default one second), including connecting or
    /// reconnecting; a call that misses it returns [`Error::Timeout`]. Also bounds the initial
    /// connection in [`connect`](Self::connect). Must not be zero.
    ///
    /// The `statehouse` facade adds its own, usually shorter, deadline and a circuit breaker.
    pub fn call_timeout(mut self, call_timeout: Duration) -> Self {
        self.call_timeout = call_timeout;
        self
    }

    /// Validates the configuration and connects.
    ///
    /// Fails with [`Error::InvalidInput`] for a bad prefix, URL or timeout, and with an error
    /// for which [`Error::is_unavailable`] is true when Redis cannot be reached within the call
    /// timeout.
    pub async fn connect(self) -> Result<RedisStore> {
        validate_prefix(&self.prefix)?;
        if self.call_timeout.is_zero() {
            return Err(Error::InvalidInput(
                "call_timeout must be greater than zero".into(),
            ));
        }
        let skew_allowance = self.skew_allowance.unwrap_or(match self.time_source {
            TimeSource::Server => Duration::ZERO,
            TimeSource::Caller(_) => DEFAULT_CALLER_SKEW_ALLOWANCE,
        });
        let skew_allowance_ms = u64::try_from(skew_allowance.as_micros().div_ceil(1000))
            .map_err(|_| Error::InvalidInput("skew_allowance is too large".into()))?;
        let timeout = self.call_timeout;
        let connecting = async {
            match &self.topology {
                RedisTopology::Standalone(url) => {
                    let client = redis::Client::open(url.as_str()).map_err(invalid_url)?;
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(Some(timeout))
                        .set_number_of_retries(RECONNECT_RETRIES)
                        .set_min_delay(RECONNECT_MIN_DELAY)
                        .set_max_delay(RECONNECT_MAX_DELAY);
                    let manager =
                        ConnectionManager::new_with_config(client.clone(), config.clone())
                            .await
                            .map_err(|e| from_redis(e, timeout))?;
                    Ok(Connection::Standalone(Box::new(StandaloneConnection::new(
                        client, config, manager,
                    ))))
                }
                RedisTopology::Cluster(urls) => {
                    if urls.is_empty() {
                        return Err(Error::InvalidInput(
                            "a Redis Cluster topology needs at least one node URL".into(),
                        ));
                    }
                    let client = ClusterClientBuilder::new(urls.iter().map(String::as_str))
                        .connection_timeout(timeout)
                        .response_timeout(timeout)
                        .retries(RECONNECT_RETRIES as u32 + 1)
                        .min_retry_wait(RECONNECT_MIN_DELAY.as_millis() as u64)
                        .max_retry_wait(RECONNECT_MAX_DELAY.as_millis() as u64)
                        .build()
                        .map_err(invalid_url)?;
                    let conn = client
                        .get_async_connection()
                        .await
                        .map_err(|e| from_redis(e, timeout))?;
                    Ok(Connection::Cluster(conn))
                }
            }
        };
        let conn = match tokio::time::timeout(timeout, connecting).await {
            Ok(conn) => conn?,
            Err(_) => {
                return Err(Error::Unavailable {
                    message: format!("could not connect to Redis within {timeout:?}"),
                    source: None,
                });
            }
        };
        Ok(RedisStore::from_parts(
            conn,
            self.topology,
            self.prefix,
            self.time_source,
            skew_allowance_ms,
            timeout,
        ))
    }
}

fn invalid_url(err: redis::RedisError) -> Error {
    // The URL itself is not repeated: it may carry a password.
    Error::InvalidInput(format!("invalid Redis URL or client settings: {err}"))
}
