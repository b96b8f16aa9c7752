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

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::{ConnectionAddr, IntoConnectionInfo, RedisResult};
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
    /// The builder's TLS settings, for the connections opened later (Pub/Sub listeners).
    pub(crate) tls: TlsSettings,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("topology", &self.topology)
            .field("time_source", &self.time_source)
            .field("skew_allowance_ms", &self.skew_allowance_ms)
            .field("call_timeout", &self.call_timeout)
            .field("tls", &self.tls)
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
        tls: TlsSettings,
    ) -> Result<Link> {
        statehouse_core::check_deadline("call_timeout", call_timeout)?;
        let skew_allowance = skew_allowance.unwrap_or(match time_source {
            TimeSource::Server => Duration::ZERO,
            TimeSource::Caller(_) => DEFAULT_CALLER_SKEW_ALLOWANCE,
        });
        let skew_allowance_ms = u64::try_from(skew_allowance.as_micros().div_ceil(1000))
            .map_err(|_| Error::InvalidInput("skew_allowance is too large".into()))?;
        tls.validate(&topology)?;
        let timeout = call_timeout;
        let connecting = async {
            match &topology {
                RedisTopology::Standalone(url) => {
                    let client = tls.client(url.as_str()).map_err(invalid_url)?;
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
                        client, config, manager, timeout, &tls,
                    ))))
                }
                RedisTopology::Cluster(urls) => {
                    if urls.is_empty() {
                        return Err(Error::InvalidInput(
                            "a Redis Cluster topology needs at least one node URL".into(),
                        ));
                    }
                    let client = tls
                        .cluster_builder(urls)
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
            tls,
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
    ///
    /// A miss counts toward the connection's health check ([`Connection::timed_out`]: several
    /// in a row replace it) only when the call had at least half the call timeout to run. A
    /// coalesced call's deadline counts from when its first request was queued, so under a
    /// client overload (requests waiting their turn in this process) calls go out with little
    /// time left and miss it while Redis answers every one in a millisecond: that says nothing
    /// about the connection, and replacing it would fail every call on its way.
    pub(crate) async fn bounded<T>(
        &self,
        deadline: Instant,
        fut: impl Future<Output = RedisResult<T>>,
    ) -> Result<T> {
        let timeout = self.call_timeout;
        let fair = deadline.saturating_duration_since(Instant::now()) >= timeout / 2;
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
                if fair {
                    self.conn.timed_out();
                }
                Err(Error::Timeout { deadline: timeout })
            }
        }
    }
}

/// The builder's TLS settings: extra trust anchors and a client certificate (PEM).
#[derive(Clone, Default)]
pub(crate) struct TlsSettings {
    pub(crate) root_certificates: Option<Vec<u8>>,
    /// The certificate chain and the private key.
    pub(crate) client_certificate: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for TlsSettings {
    // Certificates are long and the key is a secret: only whether each is set is printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("root_certificates", &self.root_certificates.is_some())
            .field("client_certificate", &self.client_certificate.is_some())
            .finish()
    }
}

impl TlsSettings {
    fn is_set(&self) -> bool {
        self.root_certificates.is_some() || self.client_certificate.is_some()
    }

    /// Checks the settings against the topology before anything connects: TLS settings need
    /// `rediss://` URLs, the `tls` feature and PEM that holds what it should; certificate
    /// verification is never switched off (redis-rs's `#insecure`).
    fn validate(&self, topology: &RedisTopology) -> Result<()> {
        #[cfg(not(feature = "tls"))]
        if self.is_set() {
            return Err(Error::InvalidInput(
                "TLS settings were given, but statehouse-redis was built without its `tls` \
                 feature"
                    .into(),
            ));
        }
        let urls: Vec<&str> = match topology {
            RedisTopology::Standalone(url) => vec![url.as_str()],
            RedisTopology::Cluster(urls) => urls.iter().map(String::as_str).collect(),
        };
        for url in urls {
            // A URL that does not parse is reported by the client below, with redis-rs's reason.
            let addr = url.into_connection_info().map(|info| info.addr().clone());
            match addr {
                Ok(ConnectionAddr::TcpTls { insecure: true, .. }) => {
                    return Err(Error::InvalidInput(
                        "a `rediss://…#insecure` URL asks to skip verifying the server's \
                         certificate, which this crate never does; give the CA that signed \
                         it with `tls_root_certificates` instead"
                            .into(),
                    ));
                }
                Ok(ConnectionAddr::TcpTls { .. }) => {}
                _ if self.is_set() => {
                    return Err(Error::InvalidInput(
                        "TLS certificates were given for a Redis URL that is not `rediss://` \
                         (or not a valid URL)"
                            .into(),
                    ));
                }
                _ => {}
            }
        }
        #[cfg(feature = "tls")]
        if self.is_set() {
            tls::check_pem(self)?;
        }
        Ok(())
    }

    /// A redis-rs client for `info`, with these settings when it is a TLS address.
    pub(crate) fn client(&self, info: impl IntoConnectionInfo) -> RedisResult<redis::Client> {
        let info = info.into_connection_info()?;
        #[cfg(feature = "tls")]
        if let ConnectionAddr::TcpTls { .. } = info.addr() {
            tls::install_crypto_provider();
            if self.is_set() {
                return redis::Client::build_with_tls(info, self.certificates());
            }
        }
        redis::Client::open(info)
    }

    /// A cluster client builder for these seeds, with these settings; the crypto provider is
    /// installed only when a seed is `rediss://` (a plain cluster leaves the process's rustls
    /// alone, for an application that installs its own provider later).
    fn cluster_builder(&self, urls: &[String]) -> ClusterClientBuilder {
        let builder = ClusterClientBuilder::new(urls.iter().map(String::as_str));
        #[cfg(feature = "tls")]
        {
            let any_tls = urls.iter().any(|url| {
                url.as_str()
                    .into_connection_info()
                    .is_ok_and(|info| matches!(info.addr(), ConnectionAddr::TcpTls { .. }))
            });
            if any_tls {
                tls::install_crypto_provider();
            }
            if self.is_set() {
                return builder.certs(self.certificates());
            }
        }
        builder
    }

    #[cfg(feature = "tls")]
    fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self.client_certificate.as_ref().map(|(cert, key)| {
                redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }
            }),
            root_cert: self.root_certificates.clone(),
        }
    }
}

#[cfg(feature = "tls")]
pub(crate) use tls::install_crypto_provider;

#[cfg(feature = "tls")]
mod tls {
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use statehouse_core::{Error, Result};

    use super::TlsSettings;

    /// Makes sure the process has a rustls crypto provider: redis-rs builds its TLS settings
    /// with `rustls::ClientConfig::builder()`, which panics when none is installed and the
    /// program's crates enable more than one (ring here, aws-lc-rs through another crate, say).
    /// An application that installed its own keeps it.
    pub(crate) fn install_crypto_provider() {
        if CryptoProvider::get_default().is_none() {
            // Another thread may install one in between: either way one is installed.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
    }

    /// The PEM parses and holds at least one certificate (and, for a client, one key).
    pub(super) fn check_pem(settings: &TlsSettings) -> Result<()> {
        if let Some(pem) = &settings.root_certificates {
            certificates(pem, "tls_root_certificates")?;
        }
        if let Some((chain, key)) = &settings.client_certificate {
            certificates(chain, "tls_client_certificate's certificate chain")?;
            PrivateKeyDer::from_pem_slice(key).map_err(|err| {
                Error::InvalidInput(format!(
                    "tls_client_certificate's private key is not a PEM private key: {err}"
                ))
            })?;
        }
        Ok(())
    }

    fn certificates(pem: &[u8], what: &str) -> Result<()> {
        let mut count = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            cert.map_err(|err| {
                Error::InvalidInput(format!("{what}: a certificate does not parse: {err}"))
            })?;
            count += 1;
        }
        if count == 0 {
            return Err(Error::InvalidInput(format!(
                "{what} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)"
            )));
        }
        Ok(())
    }
}

fn invalid_url(err: redis::RedisError) -> Error {
    // The URL itself is not repeated: it may carry a password.
    Error::InvalidInput(format!("invalid Redis URL or client settings: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consecutive_timeouts(link: &Link) -> u32 {
        match &link.conn {
            Connection::Standalone(conn) => conn.consecutive_timeouts(),
            Connection::Cluster(_) => unreachable!("a standalone link"),
        }
    }

    /// Calls that go out with little of their deadline left (they waited in this process's
    /// queue) and miss it do not count against the connection; calls that had their time do.
    #[tokio::test]
    async fn only_calls_that_had_their_time_count_against_the_connection() {
        let server = statehouse_testkit::RedisServer::start().expect("redis-server");
        let timeout = Duration::from_millis(400);
        let link = Link::connect(
            RedisTopology::Standalone(server.url()),
            TimeSource::Server,
            None,
            timeout,
            TlsSettings::default(),
        )
        .await
        .expect("connect");
        let never = || std::future::pending::<RedisResult<()>>();
        for _ in 0..crate::connection::REPLACE_AFTER_TIMEOUTS + 2 {
            let late = Instant::now() + timeout / 4;
            assert!(matches!(
                link.bounded(late, never()).await,
                Err(Error::Timeout { .. })
            ));
        }
        assert_eq!(consecutive_timeouts(&link), 0, "late calls are not counted");
        let fair = Instant::now() + timeout;
        assert!(link.bounded(fair, never()).await.is_err());
        assert_eq!(
            consecutive_timeouts(&link),
            1,
            "a call that had its time is"
        );
    }

    /// Built without the `tls` feature (`cargo test -p statehouse-redis --no-default-features
    /// --lib`), TLS is refused before anything connects, with a reason.
    #[cfg(not(feature = "tls"))]
    #[tokio::test]
    async fn without_the_tls_feature_tls_is_a_clear_error() {
        let connect = |topology, tls| {
            Link::connect(
                topology,
                TimeSource::Server,
                None,
                Duration::from_millis(200),
                tls,
            )
        };
        let rediss = RedisTopology::Standalone("rediss://127.0.0.1:1".into());
        match connect(rediss.clone(), TlsSettings::default()).await {
            Err(Error::InvalidInput(message)) => assert!(message.contains("TLS"), "{message}"),
            other => panic!("expected InvalidInput, got {other:?}"),
        }
        let settings = TlsSettings {
            root_certificates: Some(b"pem".to_vec()),
            client_certificate: None,
        };
        match connect(rediss, settings).await {
            Err(Error::InvalidInput(message)) => {
                assert!(message.contains("`tls` feature"), "{message}");
            }
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn tls_settings_never_print_their_contents() {
        let settings = TlsSettings {
            root_certificates: Some(b"-----BEGIN CERTIFICATE-----".to_vec()),
            client_certificate: Some((b"chain".to_vec(), b"-----BEGIN PRIVATE KEY-----".to_vec())),
        };
        let printed = format!("{settings:?}");
        assert!(!printed.contains("BEGIN"), "{printed}");
        assert!(printed.contains("client_certificate: true"), "{printed}");
    }

    #[tokio::test]
    async fn a_zero_call_timeout_is_invalid_input() {
        let plain = RedisTopology::Standalone("redis://127.0.0.1:1".into());
        let result = Link::connect(
            plain,
            TimeSource::Server,
            None,
            Duration::ZERO,
            TlsSettings::default(),
        )
        .await;
        assert!(matches!(result, Err(Error::InvalidInput(_))));
    }
}
