//! Configuring and connecting a [`RedisStore`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use statehouse_core::{Clock, Result, key::validate_prefix};

use crate::link::{Link, TlsSettings};
use crate::store::RedisStore;

/// The key prefix used unless [`RedisStoreBuilder::prefix`] sets another.
pub const DEFAULT_PREFIX: &str = "sh:rl:";

/// The per-call deadline used unless [`RedisStoreBuilder::call_timeout`] sets another.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// The expiry slack used with [`TimeSource::Caller`] unless
/// [`RedisStoreBuilder::skew_allowance`] sets another.
pub const DEFAULT_CALLER_SKEW_ALLOWANCE: Duration = Duration::from_secs(5);

/// Where the Redis deployment is.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisTopology {
    /// One Redis server (or a proxy in front of several), by URL: `redis://host:6379/0`, or
    /// `rediss://host:6380/0` for TLS (the default `tls` feature; see
    /// [`RedisStoreBuilder::tls_root_certificates`]).
    Standalone(String),
    /// A Redis Cluster, by the URLs of one or more of its nodes; the others are discovered (over
    /// TLS when the seeds' URLs are `rediss://`).
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
    tls: TlsSettings,
}

impl RedisStoreBuilder {
    pub(crate) fn new(topology: RedisTopology) -> Self {
        RedisStoreBuilder {
            topology,
            prefix: DEFAULT_PREFIX.to_owned(),
            time_source: TimeSource::Server,
            skew_allowance: None,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            tls: TlsSettings::default(),
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
    /// reconnecting; a call that misses it returns [`Error::Timeout`](statehouse_core::Error::Timeout). Also bounds the initial
    /// connection in [`connect`](Self::connect). More than zero, at most one hour ([`MAX_DEADLINE`](statehouse_core::MAX_DEADLINE)).
    ///
    /// The `statehouse` facade adds its own, usually shorter, deadline and a circuit breaker.
    /// Coalesced calls (single checks, reads, read-only session loads) take that deadline
    /// along (`check_within`, `get_within`, `load_within`): their callers are answered by it,
    /// while the call on the wire stays bounded by this timeout, which is also what the
    /// connection's health check counts (three calls in a row past it replace the connection; a
    /// call that went out with less than half of it left, after queueing in this process, is
    /// not counted).
    pub fn call_timeout(mut self, call_timeout: Duration) -> Self {
        self.call_timeout = call_timeout;
        self
    }

    /// Trusts these certificate authorities (PEM, one or more `CERTIFICATE` blocks) for the
    /// server's certificate over `rediss://`, *instead of* the system's root certificates: for
    /// a Redis whose certificate a private CA signed (a self-managed Redis, most managed
    /// services' private endpoints). Without it the system's roots are used (which is what a
    /// public managed Redis with a publicly trusted certificate needs).
    ///
    /// The server's certificate must name the host of the URL (a DNS name, or an IP address
    /// for `rediss://10.0.0.5`): verification is never switched off. (redis-rs's
    /// `rediss://…/#insecure` is refused by [`connect`](Self::connect): this crate is built
    /// without redis-rs's `tls-rustls-insecure`.)
    ///
    /// [`connect`](Self::connect) fails with
    /// [`Error::InvalidInput`](statehouse_core::Error::InvalidInput) when the PEM holds no
    /// certificate, when the topology's URLs are not `rediss://`, or when the crate is built
    /// without its `tls` feature.
    ///
    /// ```no_run
    /// use statehouse_redis::{RedisStore, RedisTopology};
    ///
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let ca = std::fs::read("/etc/redis/tls/ca.crt")?;
    /// let store = RedisStore::builder(RedisTopology::Standalone(
    ///     "rediss://:secret@redis.internal:6380/0".into(),
    /// ))
    /// .tls_root_certificates(ca)
    /// .connect()
    /// .await?;
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    pub fn tls_root_certificates(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.root_certificates = Some(pem.into());
        self
    }

    /// Presents this client certificate (PEM chain, leaf first) and private key (PEM: PKCS#8,
    /// PKCS#1 or SEC1) to a Redis that authenticates its clients by certificate
    /// (`tls-auth-clients yes`, mutual TLS). Checked by [`connect`](Self::connect) like
    /// [`tls_root_certificates`](Self::tls_root_certificates). The key is never printed
    /// (`Debug` shows only whether one is set).
    pub fn tls_client_certificate(
        mut self,
        certificate_chain_pem: impl Into<Vec<u8>>,
        private_key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.client_certificate = Some((certificate_chain_pem.into(), private_key_pem.into()));
        self
    }

    /// Validates the configuration and connects.
    ///
    /// Fails with [`Error::InvalidInput`](statehouse_core::Error::InvalidInput) for a bad
    /// prefix, URL, timeout or TLS setting, and with an error for which
    /// [`Error::is_unavailable`](statehouse_core::Error::is_unavailable) is true when Redis cannot be reached within the call
    /// timeout.
    pub async fn connect(self) -> Result<RedisStore> {
        validate_prefix(&self.prefix)?;
        let link = Link::connect(
            self.topology,
            self.time_source,
            self.skew_allowance,
            self.call_timeout,
            self.tls,
        )
        .await?;
        Ok(RedisStore::from_parts(Arc::new(link), self.prefix))
    }
}
