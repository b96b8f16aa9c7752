//! The shared rate-limiting conformance suite of `statehouse-testkit`, run on the embedded store.

use std::sync::Arc;

use async_trait::async_trait;
use statehouse_core::{ManualClock, RateLimitStore};
use statehouse_embedded::EmbeddedStore;
use statehouse_testkit::ratelimit_suite::StoreFactory;

/// A fresh store per case, following the case's clock.
struct EmbeddedFactory;

#[async_trait]
impl StoreFactory for EmbeddedFactory {
    async fn make(&self, clock: &ManualClock) -> Arc<dyn RateLimitStore> {
        let store = EmbeddedStore::builder()
            .clock(clock.clone())
            .build()
            .expect("valid store");
        Arc::new(store)
    }

    /// One process has one embedded store: a clone is the same store.
    async fn another_replica(
        &self,
        store: &Arc<dyn RateLimitStore>,
        _clock: &ManualClock,
    ) -> Arc<dyn RateLimitStore> {
        store.clone()
    }
}

statehouse_testkit::ratelimit_conformance!(embedded, super::EmbeddedFactory);
