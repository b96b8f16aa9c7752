//! The batch connection (`src/pipe.rs`): the coalesced reads and rate-limit checks of a
//! standalone store travel over a lean connection of their own. It must honour the URL's
//! password and database exactly as redis-rs's connection does, and report a refused password
//! as an outage (so degraded modes apply), never as a wrong answer.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use statehouse_core::cache::CacheStore;
use statehouse_core::{LimitCheck, Mode, Policy, RateLimitStore};
use statehouse_redis::{RedisStore, RedisTopology};
use statehouse_testkit::RedisServer;

const TTL: Duration = Duration::from_secs(600);

/// Sends `commands` (each a list of arguments) on one fresh connection and returns the raw
/// replies read within a second.
fn raw(port: u16, commands: &[&[&str]]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut out = Vec::new();
    for args in commands {
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in *args {
            out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
    }
    stream.write_all(&out).expect("write");
    let mut replies = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        replies.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&replies).into_owned()
}

/// A private server that requires `password` (set once it is up: the harness's readiness
/// `PING` does not authenticate).
fn protected(password: &str) -> RedisServer {
    let server = RedisServer::start().expect("redis");
    let set = raw(
        server.port(),
        &[&["CONFIG", "SET", "requirepass", password]],
    );
    assert_eq!(set, "+OK\r\n");
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_calls_use_the_urls_password_and_database() {
    let server = protected("s3cret");
    let url = format!("redis://:s3cret@127.0.0.1:{}/3", server.port());
    let store = RedisStore::builder(RedisTopology::Standalone(url))
        .call_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect with the password");
    let cache = store.cache_store();
    // Written through redis-rs's connection (a script), read through the batch connection:
    // found only if both authenticated and selected database 3.
    for i in 0..40 {
        cache
            .set(&format!("k{i}"), format!("v{i}").as_bytes(), TTL, None)
            .await
            .expect("set");
    }
    let reads = (0..40).map(|i| {
        let cache = cache.clone();
        async move { (i, cache.get(&format!("k{i}")).await) }
    });
    for (i, found) in futures::future::join_all(reads).await {
        assert_eq!(
            found.expect("get").as_deref(),
            Some(format!("v{i}").as_bytes())
        );
    }
    let keys = raw(
        server.port(),
        &[
            &["AUTH", "s3cret"],
            &["SELECT", "3"],
            &["DBSIZE"],
            &["SELECT", "0"],
            &["DBSIZE"],
        ],
    );
    assert!(
        keys.contains(":40\r\n"),
        "database 3 holds the keys: {keys:?}"
    );
    assert!(keys.ends_with(":0\r\n"), "database 0 is empty: {keys:?}");

    // Coalesced rate-limit checks go over the same connection.
    let policy = Policy::gcra(5, Duration::from_secs(60)).expect("policy");
    let checks = (0..8).map(|_| {
        let (store, policy) = (store.clone(), policy.clone());
        async move {
            store
                .check(&[LimitCheck::new("auth-user", &policy, 1)], Mode::Consume)
                .await
                .expect("check")
                .allowed()
        }
    });
    let admitted = futures::future::join_all(checks)
        .await
        .into_iter()
        .filter(|a| *a)
        .count();
    assert_eq!(admitted, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_password_is_an_outage_not_a_miss() {
    let server = protected("old");
    let url = format!("redis://:old@127.0.0.1:{}", server.port());
    let store = RedisStore::builder(RedisTopology::Standalone(url))
        .call_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("connect");
    let cache = store.cache_store();
    cache.set("k", b"v", TTL, None).await.expect("set");
    assert_eq!(
        cache.get("k").await.expect("get").as_deref(),
        Some(&b"v"[..])
    );
    // The password changes and every connection is dropped: reconnecting fails to authenticate.
    raw(
        server.port(),
        &[
            &["AUTH", "old"],
            &["CONFIG", "SET", "requirepass", "new"],
            &["CLIENT", "KILL", "TYPE", "normal"],
        ],
    );
    // The first read may still race the kill; from then on every read reconnects and is refused.
    let _ = cache.get("k").await;
    for _ in 0..3 {
        let err = cache
            .get("k")
            .await
            .expect_err("a refused password is an error");
        assert!(err.is_unavailable(), "an outage, not {err:?}");
        let message = err.to_string().to_uppercase();
        assert!(
            message.contains("AUTH") || message.contains("WRONGPASS"),
            "says why: {err}"
        );
    }
}
