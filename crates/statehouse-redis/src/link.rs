//! The link to Redis that every store of this crate shares: the connection, the clock choice,
//! the expiry slack and the per-call deadline.
//!
//! A [`RedisStore`](crate::RedisStore) and the
//! [`RedisSessionStore`](crate::RedisSessionStore)s made from it hold the same `Arc<Link>`, so
//! a process keeps one multiplexed connection (plus, on standalone Redis, the coalescers' batch
//! connection: [`crate::pipe`]) and one reconnection policy however many stores it builds.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use redis::RedisResult;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use statehouse_core::{Error, Result};
use tokio::time::Instant;

use crate::builder::{DEFAULT_CALLER_SKEW_ALLOWANCE, RedisTopology, TimeSource};
use crate::connection::{Connection, StandaloneConnection};
use crate::error::from_redis;

/// Reconnection attempts per outage before pending calls fail. A rate limiter wants a fast
/// "unavailable" (its caller has a degraded mode) more than a patient reconnect: the next call
/// starts a new attempt anyway.
const RECONNECT_RETRIES: usize = 2;
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(20);
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(200);

/// A connected link; see the module docs.
pub(crate) struct Link {
    pub(crate) conn: Connection,
    pub(crate) topology: RedisTopology,
    pub(crate) time_source: TimeSource,
    pub(crate) skew_allowance_ms: u64,
    pub(crate) call_timeout: Duration,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("topology", &self.topology)
            .field("time_source", &self.time_source)
            .field("skew_allowance_ms", &self.skew_allowance_ms)
            .field("call_timeout", &self.call_timeout)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Validates the settings and connects within `call_timeout`.
    pub(crate) async fn connect(
        topology: RedisTopology,
        time_source: TimeSource,
        skew_allowance: Option<Duration>,
        call_timeout: Duration,
    ) -> Result<Link> {
        if call_timeout.is_zero() {
            return Err(Error::InvalidInput(
                "call_timeout must be greater than zero".into(),
            ));
        }
        let skew_allowance = skew_allowance.unwrap_or(match time_source {
            TimeSource::Server => Duration::ZERO,
            TimeSource::Caller(_) => DEFAULT_CALLER_SKEW_ALLOWANCE,
        });
        let skew_allowance_ms = u64::try_from(skew_allowance.as_micros().div_ceil(1000))
            .map_err(|_| Error::InvalidInput("skew_allowance is too large".into()))?;
        let timeout = call_timeout;
        let connecting = async {
            match &topology {
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
                        client, config, manager, timeout,
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
        Ok(Link {
            conn,
            topology,
            time_source,
            skew_allowance_ms,
            call_timeout,
        })
    }

    /// The caller's time in µs, or `None` to let a script read the server's `TIME`.
    pub(crate) fn caller_now(&self) -> Option<u64> {
        match &self.time_source {
            TimeSource::Server => None,
            TimeSource::Caller(clock) => Some(clock.now().as_micros()),
        }
    }

    /// Runs `fut` against a deadline, mapping client errors.
    pub(crate) async fn bounded<T>(
        &self,
        deadline: Instant,
        fut: impl Future<Output = RedisResult<T>>,
    ) -> Result<T> {
        let timeout = self.call_timeout;
        match tokio::time::timeout_at(deadline, fut).await {
            Ok(result) => {
                // redis-rs's own response timeout (set to the same duration) may fire first.
                if result.as_ref().is_err_and(|e| e.is_timeout()) {
                    self.conn.timed_out();
                } else {
                    self.conn.answered();
                }
                result.map_err(|e| from_redis(e, timeout))
            }
            Err(_) => {
                self.conn.timed_out();
                Err(Error::Timeout { deadline: timeout })
            }
        }
    }
}

fn invalid_url(err: redis::RedisError) -> Error {
    // The URL itself is not repeated: it may carry a password.
    Error::InvalidInput(format!("invalid Redis URL or client settings: {err}"))
}
