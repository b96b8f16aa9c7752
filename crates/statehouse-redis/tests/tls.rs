//! TLS (`rediss://`): every connection of a store goes over TLS, certificates are verified
//! (an unknown CA, a certificate for another name and a missing client certificate are all
//! refused), bad TLS settings are clear errors, and a TLS store reconnects after a restart.
//! The behaviour over TLS is the conformance suites' and the cache scenarios' (the `statehouse`
//! crate runs them on `Deployment::StandaloneTls` and `Deployment::ClusterTls`).

#![cfg(feature = "tls")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use statehouse_core::cache::CacheStore;
use statehouse_core::session::{NewSession, SessionConfig, SessionStore};
use statehouse_core::{Error, LimitCheck, Mode, Policy, RateLimitStore};
use statehouse_redis::{RedisStore, RedisStoreBuilder, RedisTopology};
use statehouse_testkit::cache_suite::RecordingSink;
use statehouse_testkit::{
    RedisServer, TlsOptions, raw_command, shared_tls_cluster, shared_tls_standalone,
    test_certificates,
};

use common::store_prefix;

fn tls_builder(url: String) -> RedisStoreBuilder {
    RedisStore::builder(RedisTopology::Standalone(url))
        .prefix(&store_prefix("tls"))
        .call_timeout(Duration::from_secs(5))
}

fn trusted(url: String) -> RedisStoreBuilder {
    tls_builder(url).tls_root_certificates(test_certificates().ca_pem())
}

/// The local ports of the server's client connections (`laddr` of `CLIENT LIST`), without the
/// connection that asks.
fn client_ports(server: &RedisServer) -> Vec<u16> {
    let list = raw_command(server.port(), &["CLIENT", "LIST"]).expect("CLIENT LIST");
    list.lines()
        .filter(|line| !line.contains("cmd=client|list"))
        .filter_map(|line| {
            let laddr = line.split(' ').find_map(|f| f.strip_prefix("laddr="))?;
            laddr.rsplit(':').next()?.parse().ok()
        })
        .collect()
}

async fn gcra_check(store: &RedisStore, key: &str) -> Result<bool, Error> {
    let policy = Policy::gcra(1_000, Duration::from_secs(60)).expect("policy");
    let verdict = store
        .check(&[LimitCheck::new(key, &policy, 1)], Mode::Consume)
        .await?;
    Ok(verdict.decisions[0].allowed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_of_a_store_goes_over_tls() {
    let server = RedisServer::start_tls(TlsOptions::default()).expect("TLS redis-server");
    let tls_port = server.tls_port().expect("a TLS port");
    let store = trusted(server.tls_url()).connect().await.expect("connect");

    // Rate limits (a script), cache reads and writes (coalesced reads), a session, and a
    // Pub/Sub subscription for cache invalidations: each kind of connection a store opens.
    assert!(gcra_check(&store, "user:1").await.expect("check"));
    let cache = store.cache_store();
    cache
        .set("k", b"value", Duration::from_secs(60), None)
        .await
        .expect("set");
    let reads = futures::future::join_all((0..32).map(|_| cache.get("k"))).await;
    for read in reads {
        assert_eq!(read.expect("get").as_deref(), Some(&b"value"[..]));
    }
    let sessions = store.session_store(SessionConfig::default());
    let (token, _) = sessions
        .create(&NewSession::for_user("alice"))
        .await
        .expect("create");
    let loaded = sessions
        .load(&token)
        .await
        .expect("load")
        .expect("a session");
    assert_eq!(loaded.record.user_id, "alice");
    let sink = RecordingSink::new();
    let _subscription = cache.subscribe(sink.clone()).await.expect("subscribe");

    let ports = client_ports(&server);
    assert_eq!(
        ports.len(),
        3,
        "the store's two connections (redis-rs's, and its batch connection) and its \
         subscription: {ports:?}"
    );
    assert!(
        ports.iter().all(|&p| p == tls_port),
        "every client connection is on the TLS port {tls_port}: {ports:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_signed_by_an_unknown_ca_is_refused() {
    let url = shared_tls_standalone().tls_url();
    // Another CA than the one that signed the server's certificate.
    let refused = tls_builder(url.clone())
        .tls_root_certificates(test_certificates().other_ca_pem())
        .connect()
        .await
        .expect_err("an unknown CA must be refused");
    assert!(refused.is_unavailable(), "{refused:?}");
    assert!(
        refused.to_string().contains("certificate"),
        "the error names the certificate: {refused}"
    );
    // The system's roots (no CA given) do not know the test CA either.
    let refused = tls_builder(url).connect().await.expect_err("system roots");
    assert!(refused.to_string().contains("certificate"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_is_refused() {
    let server = RedisServer::start_tls(TlsOptions {
        misnamed_certificate: true,
        ..TlsOptions::default()
    })
    .expect("TLS redis-server");
    // The right CA, but the certificate names `redis.invalid`, not 127.0.0.1.
    let refused = trusted(server.tls_url())
        .connect()
        .await
        .expect_err("a certificate for another name must be refused");
    assert!(
        refused.to_string().contains("certificate"),
        "the error names the certificate: {refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    let server = RedisServer::start_tls(TlsOptions {
        require_client_certificate: true,
        ..TlsOptions::default()
    })
    .expect("TLS redis-server");
    let certs = test_certificates();

    // Without a client certificate the server ends the handshake: no call succeeds.
    let without = trusted(server.tls_url()).connect().await;
    match without {
        Err(err) => assert!(err.is_unavailable(), "{err:?}"),
        Ok(store) => {
            let err = gcra_check(&store, "k")
                .await
                .expect_err("the server refuses a client without a certificate");
            assert!(err.is_unavailable(), "{err:?}");
        }
    }

    let store = trusted(server.tls_url())
        .tls_client_certificate(certs.client_cert_pem(), certs.client_key_pem())
        .connect()
        .await
        .expect("connect with the client certificate");
    assert!(gcra_check(&store, "k").await.expect("check"));
    let sessions = RedisStore::builder(RedisTopology::Standalone(server.tls_url()))
        .tls_root_certificates(certs.ca_pem())
        .tls_client_certificate(certs.client_cert_pem(), certs.client_key_pem())
        .connect()
        .await
        .expect("connect")
        .session_store(SessionConfig::default());
    let (token, _) = sessions
        .create(&NewSession::for_user("bob"))
        .await
        .expect("create");
    assert!(sessions.load(&token).await.expect("load").is_some());
}

#[tokio::test]
async fn bad_tls_settings_are_invalid_input() {
    let certs = test_certificates();
    let url = shared_tls_standalone().tls_url();
    let invalid = |result: Result<RedisStore, Error>, what: &str| match result {
        Err(Error::InvalidInput(message)) => message,
        other => panic!("{what}: expected InvalidInput, got {other:?}"),
    };

    let message = invalid(
        tls_builder(url.clone())
            .tls_root_certificates(Vec::new())
            .connect()
            .await,
        "an empty CA",
    );
    assert!(message.contains("no PEM certificate"), "{message}");
    invalid(
        tls_builder(url.clone())
            .tls_root_certificates(
                &b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"[..],
            )
            .connect()
            .await,
        "a CA that does not parse",
    );
    let message = invalid(
        tls_builder(url.clone())
            .tls_root_certificates(certs.ca_pem())
            .tls_client_certificate(certs.client_cert_pem(), certs.ca_pem())
            .connect()
            .await,
        "a certificate where the key belongs",
    );
    assert!(message.contains("private key"), "{message}");
    let message = invalid(
        tls_builder(shared_tls_standalone().url())
            .tls_root_certificates(certs.ca_pem())
            .connect()
            .await,
        "certificates for a redis:// URL",
    );
    assert!(message.contains("rediss://"), "{message}");
    let message = invalid(
        tls_builder(format!("{url}/#insecure"))
            .tls_root_certificates(certs.ca_pem())
            .connect()
            .await,
        "#insecure",
    );
    assert!(message.contains("#insecure"), "{message}");
    // A cluster seed list with one plain URL among TLS ones.
    let mut seeds = shared_tls_cluster().tls_urls();
    seeds.push(shared_tls_standalone().url());
    let message = invalid(
        RedisStore::builder(RedisTopology::Cluster(seeds))
            .tls_root_certificates(certs.ca_pem())
            .connect()
            .await,
        "a plain URL among the seeds",
    );
    assert!(message.contains("rediss://"), "{message}");
    // The key is never printed.
    let builder =
        tls_builder(url).tls_client_certificate(certs.client_cert_pem(), certs.client_key_pem());
    assert!(!format!("{builder:?}").contains("PRIVATE KEY"));
}

#[tokio::test]
async fn plain_and_tls_ports_do_not_mix() {
    let server = shared_tls_standalone();
    let tls_port = server.tls_port().expect("TLS port");
    // Plain RESP to the TLS port: no answer the client accepts.
    let plain = tls_builder(format!("redis://127.0.0.1:{tls_port}"))
        .call_timeout(Duration::from_millis(500))
        .connect()
        .await;
    match plain {
        Err(err) => assert!(err.is_unavailable(), "{err:?}"),
        Ok(store) => {
            let err = gcra_check(&store, "k")
                .await
                .expect_err("plain RESP on a TLS port");
            assert!(err.is_unavailable(), "{err:?}");
        }
    }
    // TLS to the plain port: the handshake fails.
    let err = trusted(format!("rediss://127.0.0.1:{}", server.port()))
        .call_timeout(Duration::from_millis(500))
        .connect()
        .await
        .expect_err("TLS on a plain port");
    assert!(err.is_unavailable(), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_store_reconnects_after_a_restart() {
    let mut server = RedisServer::start_tls(TlsOptions::default()).expect("TLS redis-server");
    let store = trusted(server.tls_url())
        .call_timeout(Duration::from_millis(500))
        .connect()
        .await
        .expect("connect");
    let cache: Arc<dyn CacheStore> = Arc::new(store.cache_store());
    assert!(gcra_check(&store, "k").await.expect("check"));

    server.kill();
    let err = gcra_check(&store, "k")
        .await
        .expect_err("the server is down");
    assert!(err.is_unavailable(), "{err:?}");
    assert!(cache.get("k").await.expect_err("down").is_unavailable());

    server.restart().expect("restart");
    // The store's batch connection (TLS too) reconnects by itself and watches the server, so
    // once it is back the first calls of every kind succeed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while client_ports(&server).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the store did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        gcra_check(&store, "k")
            .await
            .expect("first check after the restart")
    );
    cache
        .set("k", b"v", Duration::from_secs(60), None)
        .await
        .expect("first write after the restart");
    assert!(cache.get("k").await.expect("first read").is_some());
    let tls_port = server.tls_port().expect("TLS port");
    assert!(client_ports(&server).iter().all(|&p| p == tls_port));
}
