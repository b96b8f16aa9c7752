//! The shared session conformance suite of `statehouse-testkit`, run on the embedded session
//! store (the cross-backend instantiation lives in `crates/statehouse/tests`).

use std::sync::Arc;

use async_trait::async_trait;
use statehouse_core::ManualClock;
use statehouse_core::session::{SessionConfig, SessionStore};
use statehouse_embedded::EmbeddedSessionStore;
use statehouse_testkit::session_suite::SessionStoreFactory;

/// A fresh store per case, following the case's clock.
struct EmbeddedSessions;

#[async_trait]
impl SessionStoreFactory for EmbeddedSessions {
    async fn make(&self, clock: &ManualClock, config: SessionConfig) -> Arc<dyn SessionStore> {
        let store = EmbeddedSessionStore::builder()
            .clock(clock.clone())
            .config(config)
            .build()
            .expect("valid store");
        Arc::new(store)
    }

    /// One process has one embedded store: a replica is the same store.
    async fn another_replica(
        &self,
        store: &Arc<dyn SessionStore>,
        _clock: &ManualClock,
        _config: SessionConfig,
    ) -> Arc<dyn SessionStore> {
        store.clone()
    }
}

statehouse_testkit::session_conformance!(embedded, super::EmbeddedSessions);
