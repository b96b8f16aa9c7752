//! The shared cache conformance suite of `statehouse-testkit`, run on the embedded cache store.

use std::sync::Arc;

use async_trait::async_trait;
use statehouse_core::ManualClock;
use statehouse_core::cache::CacheStore;
use statehouse_embedded::EmbeddedCacheStore;
use statehouse_testkit::cache_suite::CacheStoreFactory;

/// A fresh store per case, following the case's clock.
struct EmbeddedCaches;

#[async_trait]
impl CacheStoreFactory for EmbeddedCaches {
    async fn make(&self, clock: &ManualClock) -> Arc<dyn CacheStore> {
        let store = EmbeddedCacheStore::builder()
            .clock(clock.clone())
            .build()
            .expect("valid store");
        Arc::new(store)
    }

    /// One process has one embedded store: a replica is the same store.
    async fn another_replica(
        &self,
        store: &Arc<dyn CacheStore>,
        _clock: &ManualClock,
    ) -> Arc<dyn CacheStore> {
        store.clone()
    }

    fn ttl_follows_clock(&self) -> bool {
        true
    }
}

statehouse_testkit::cache_conformance!(embedded, super::EmbeddedCaches);
