//! The cache conformance suite (statehouse-testkit's `cache_suite`) on RedisCacheStore: on the
//! shared standalone server and on the shared 3-master cluster.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use statehouse_core::ManualClock;
use statehouse_core::cache::CacheStore;
use statehouse_redis::{RedisStore, RedisTopology};
use statehouse_testkit::cache_suite::CacheStoreFactory;
use statehouse_testkit::{shared_cluster, shared_standalone};

use common::store_prefix;

/// Each store on a connection of its own with a fresh prefix; a replica is another connection
/// with the same prefix (and so the same channel).
struct RedisCaches {
    cluster: bool,
    /// The prefix of each store made, by the address of its `Arc`. A std `Mutex`: never held
    /// across an await.
    prefixes: Mutex<HashMap<usize, String>>,
}

impl RedisCaches {
    fn standalone() -> Self {
        RedisCaches {
            cluster: false,
            prefixes: Mutex::new(HashMap::new()),
        }
    }

    fn cluster() -> Self {
        RedisCaches {
            cluster: true,
            prefixes: Mutex::new(HashMap::new()),
        }
    }

    async fn connect(&self, prefix: &str) -> Arc<dyn CacheStore> {
        let topology = if self.cluster {
            RedisTopology::Cluster(shared_cluster().urls())
        } else {
            RedisTopology::Standalone(shared_standalone().url())
        };
        let store = RedisStore::builder(topology)
            .prefix(prefix)
            .connect()
            .await
            .expect("connect");
        Arc::new(store.cache_store())
    }
}

fn address(store: &Arc<dyn CacheStore>) -> usize {
    Arc::as_ptr(store).cast::<()>() as usize
}

#[async_trait]
impl CacheStoreFactory for RedisCaches {
    async fn make(&self, _clock: &ManualClock) -> Arc<dyn CacheStore> {
        let prefix = store_prefix("cache");
        let store = self.connect(&prefix).await;
        self.prefixes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(address(&store), prefix);
        store
    }

    async fn another_replica(
        &self,
        store: &Arc<dyn CacheStore>,
        _clock: &ManualClock,
    ) -> Arc<dyn CacheStore> {
        let prefix = self
            .prefixes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&address(store))
            .cloned()
            .expect("a store this factory made");
        self.connect(&prefix).await
    }

    fn ttl_follows_clock(&self) -> bool {
        false
    }
}

statehouse_testkit::cache_conformance!(standalone, super::RedisCaches::standalone());
statehouse_testkit::cache_conformance!(cluster, super::RedisCaches::cluster());
