//! RedisSessionStore when Redis goes away and comes back (a private server, since it is killed).

mod common;

use std::time::Duration;

use statehouse_core::session::{NewSession, SessionConfig, SessionStore};
use statehouse_redis::{RedisSessionStore, RedisTopology};
use statehouse_testkit::RedisServer;
use tokio::time::Instant;

use common::store_prefix;

const CALL_TIMEOUT: Duration = Duration::from_millis(300);
/// Slack for a loaded CI machine: the bound being tested is "about the call timeout".
const MARGIN: Duration = Duration::from_millis(700);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_is_unavailable_within_the_call_timeout_and_recovers() {
    let mut server = tokio::task::spawn_blocking(|| RedisServer::start().expect("start redis"))
        .await
        .expect("start task");
    let store = RedisSessionStore::builder(RedisTopology::Standalone(server.url()))
        .prefix(&store_prefix("session-outage"))
        .call_timeout(CALL_TIMEOUT)
        .config(SessionConfig::default())
        .connect()
        .await
        .expect("connect");
    let (token, _) = store
        .create(&NewSession::for_user("alice"))
        .await
        .expect("create");

    let mut server = tokio::task::spawn_blocking(move || {
        server.kill();
        server
    })
    .await
    .expect("kill task");

    for attempt in 0..5 {
        let started = Instant::now();
        let err = store.load(&token).await.expect_err("Redis is down");
        let took = started.elapsed();
        assert!(err.is_unavailable(), "attempt {attempt}: {err:?}");
        assert!(
            took <= CALL_TIMEOUT + MARGIN,
            "attempt {attempt} took {took:?}"
        );
        let err = store
            .create(&NewSession::for_user("bob"))
            .await
            .expect_err("Redis is down");
        assert!(err.is_unavailable(), "attempt {attempt}: {err:?}");
    }

    // The server comes back empty (no persistence): the old session is gone, new ones work.
    let _server = tokio::task::spawn_blocking(move || {
        server.restart().expect("restart");
        server
    })
    .await
    .expect("restart task");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (token, _) = loop {
        match store.create(&NewSession::for_user("carol")).await {
            Ok(created) => break created,
            Err(err) if Instant::now() < deadline => {
                assert!(err.is_unavailable(), "{err:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("no recovery: {err:?}"),
        }
    };
    assert!(store.load(&token).await.expect("load").is_some());
}
