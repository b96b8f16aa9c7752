//! Store factories shared by the cross-backend test files: the embedded store, Redis standalone
//! and Redis Cluster, each following a `ManualClock`.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use statehouse::{
    Clock, EmbeddedStore, ManualClock, RateLimitStore, RedisStore, RedisTopology, TimeSource,
};
use statehouse_testkit::ratelimit_suite::StoreFactory;
use statehouse_testkit::{
    shared_cluster, shared_standalone, shared_tls_cluster, shared_tls_standalone,
    test_certificates, unique_prefix,
};

/// Embedded stores; a "replica" is the same store (one process).
pub struct Embedded;

#[async_trait]
impl StoreFactory for Embedded {
    async fn make(&self, clock: &ManualClock) -> Arc<dyn RateLimitStore> {
        let clock: Arc<dyn Clock> = Arc::new(clock.clone());
        Arc::new(
            EmbeddedStore::builder()
                .clock(clock)
                .build()
                .expect("embedded store"),
        )
    }

    async fn another_replica(
        &self,
        store: &Arc<dyn RateLimitStore>,
        _clock: &ManualClock,
    ) -> Arc<dyn RateLimitStore> {
        store.clone()
    }
}

/// Which Redis deployment a factory targets.
#[derive(Clone, Copy, Debug)]
pub enum Deployment {
    /// The shared standalone test server.
    Standalone,
    /// The shared 3-master test cluster.
    Cluster,
    /// The shared standalone TLS test server, over `rediss://`.
    StandaloneTls,
    /// The shared 3-master TLS test cluster, over `rediss://`.
    ClusterTls,
}

impl Deployment {
    pub fn topology(self) -> RedisTopology {
        match self {
            Deployment::Standalone => RedisTopology::Standalone(shared_standalone().url()),
            Deployment::Cluster => RedisTopology::Cluster(shared_cluster().urls()),
            Deployment::StandaloneTls => {
                RedisTopology::Standalone(shared_tls_standalone().tls_url())
            }
            Deployment::ClusterTls => RedisTopology::Cluster(shared_tls_cluster().tls_urls()),
        }
    }

    /// The CA to trust for a TLS deployment.
    pub fn tls_root(self) -> Option<&'static str> {
        match self {
            Deployment::Standalone | Deployment::Cluster => None,
            Deployment::StandaloneTls | Deployment::ClusterTls => {
                Some(test_certificates().ca_pem())
            }
        }
    }

    /// A rate-limit store builder for this deployment (trusting the test CA over TLS).
    pub fn store_builder(self) -> statehouse_redis::RedisStoreBuilder {
        let builder = RedisStore::builder(self.topology());
        match self.tls_root() {
            Some(ca) => builder.tls_root_certificates(ca),
            None => builder,
        }
    }

    /// A session store builder for this deployment (trusting the test CA over TLS).
    pub fn session_builder(self) -> statehouse_redis::RedisSessionStoreBuilder {
        let builder = statehouse_redis::RedisSessionStore::builder(self.topology());
        match self.tls_root() {
            Some(ca) => builder.tls_root_certificates(ca),
            None => builder,
        }
    }
}

/// Redis stores with the caller's (manual) clock, each under a fresh key prefix; a replica is
/// a new connection with the same prefix.
pub struct Redis {
    pub deployment: Deployment,
    made: Mutex<Vec<(Arc<dyn RateLimitStore>, String)>>,
}

impl Redis {
    pub fn new(deployment: Deployment) -> Self {
        Redis {
            deployment,
            made: Mutex::new(Vec::new()),
        }
    }

    pub async fn connect(&self, prefix: &str, clock: &ManualClock) -> RedisStore {
        let clock: Arc<dyn Clock> = Arc::new(clock.clone());
        self.deployment
            .store_builder()
            .prefix(prefix)
            .time_source(TimeSource::Caller(clock))
            // Test steps take real time while the manual clock may stand still: keep keys
            // well past their logical expiry.
            .skew_allowance(Duration::from_secs(120))
            .call_timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("connect to the test redis")
    }
}

#[async_trait]
impl StoreFactory for Redis {
    async fn make(&self, clock: &ManualClock) -> Arc<dyn RateLimitStore> {
        let prefix = format!("{}:", unique_prefix("conformance"));
        let store: Arc<dyn RateLimitStore> = Arc::new(self.connect(&prefix, clock).await);
        self.made
            .lock()
            .expect("lock")
            .push((store.clone(), prefix));
        store
    }

    async fn another_replica(
        &self,
        store: &Arc<dyn RateLimitStore>,
        clock: &ManualClock,
    ) -> Arc<dyn RateLimitStore> {
        let prefix = self
            .made
            .lock()
            .expect("lock")
            .iter()
            .find(|(s, _)| Arc::ptr_eq(s, store))
            .map(|(_, p)| p.clone())
            .expect("a store made by this factory");
        Arc::new(self.connect(&prefix, clock).await)
    }
}

/// Embedded session stores following the case's clock and config; a "replica" is the same store
/// (one process). For the session conformance suite (`tests/session_conformance.rs`).
pub struct EmbeddedSessions;

#[async_trait]
impl statehouse_testkit::session_suite::SessionStoreFactory for EmbeddedSessions {
    async fn make(
        &self,
        clock: &ManualClock,
        config: statehouse_core::session::SessionConfig,
    ) -> Arc<dyn statehouse_core::session::SessionStore> {
        Arc::new(
            statehouse_embedded::EmbeddedSessionStore::builder()
                .clock(clock.clone())
                .config(config)
                .build()
                .expect("embedded session store"),
        )
    }

    async fn another_replica(
        &self,
        store: &Arc<dyn statehouse_core::session::SessionStore>,
        _clock: &ManualClock,
        _config: statehouse_core::session::SessionConfig,
    ) -> Arc<dyn statehouse_core::session::SessionStore> {
        store.clone()
    }
}

/// Redis session stores with the caller's (manual) clock, each under a fresh key prefix; a
/// replica is a new connection with the same prefix. For the session conformance suite
/// (`tests/session_conformance.rs`).
pub struct RedisSessions {
    pub deployment: Deployment,
    made: Mutex<Vec<(Arc<dyn statehouse_core::session::SessionStore>, String)>>,
}

impl RedisSessions {
    pub fn new(deployment: Deployment) -> Self {
        RedisSessions {
            deployment,
            made: Mutex::new(Vec::new()),
        }
    }

    pub async fn connect(
        &self,
        prefix: &str,
        clock: &ManualClock,
        config: statehouse_core::session::SessionConfig,
    ) -> statehouse_redis::RedisSessionStore {
        let clock: Arc<dyn Clock> = Arc::new(clock.clone());
        self.deployment
            .session_builder()
            .prefix(prefix)
            .time_source(TimeSource::Caller(clock))
            .config(config)
            // Test steps take real time while the manual clock may stand still: keep keys
            // well past their logical expiry.
            .skew_allowance(Duration::from_secs(120))
            .call_timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("connect to the test redis")
    }
}

#[async_trait]
impl statehouse_testkit::session_suite::SessionStoreFactory for RedisSessions {
    async fn make(
        &self,
        clock: &ManualClock,
        config: statehouse_core::session::SessionConfig,
    ) -> Arc<dyn statehouse_core::session::SessionStore> {
        let prefix = format!("{}:", unique_prefix("sessions"));
        let store: Arc<dyn statehouse_core::session::SessionStore> =
            Arc::new(self.connect(&prefix, clock, config).await);
        self.made
            .lock()
            .expect("lock")
            .push((store.clone(), prefix));
        store
    }

    async fn another_replica(
        &self,
        store: &Arc<dyn statehouse_core::session::SessionStore>,
        clock: &ManualClock,
        config: statehouse_core::session::SessionConfig,
    ) -> Arc<dyn statehouse_core::session::SessionStore> {
        let prefix = self
            .made
            .lock()
            .expect("lock")
            .iter()
            .find(|(s, _)| Arc::ptr_eq(s, store))
            .map(|(_, p)| p.clone())
            .expect("a store made by this factory");
        Arc::new(self.connect(&prefix, clock, config).await)
    }
}

/// Where a cache test's stores live.
#[derive(Clone, Copy, Debug)]
pub enum CacheBackend {
    /// One `EmbeddedCacheStore` shared by every "replica" (one process).
    Embedded,
    /// Redis: each replica is its own connection (its own Pub/Sub subscription).
    Redis(Deployment),
}

/// The stores of a cache test's replicas: same data, each with its own connection on Redis.
pub struct CacheFleet {
    /// One store per replica.
    pub stores: Vec<Arc<dyn statehouse_core::cache::CacheStore>>,
    /// The embedded store, for `reset_channel` (embedded backend only).
    pub embedded: Option<Arc<statehouse_embedded::EmbeddedCacheStore>>,
    /// The Redis key prefix (Redis backends only).
    pub prefix: Option<String>,
}

impl CacheBackend {
    /// `replicas` stores over one fresh, isolated data set, following `clock`.
    pub async fn fleet(self, clock: &ManualClock, replicas: usize) -> CacheFleet {
        match self {
            CacheBackend::Embedded => {
                let store = Arc::new(
                    statehouse_embedded::EmbeddedCacheStore::builder()
                        .clock(clock.clone())
                        .build()
                        .expect("embedded cache store"),
                );
                let shared: Arc<dyn statehouse_core::cache::CacheStore> = store.clone();
                CacheFleet {
                    stores: vec![shared; replicas],
                    embedded: Some(store),
                    prefix: None,
                }
            }
            CacheBackend::Redis(deployment) => {
                let prefix = format!("{}:", unique_prefix("cache"));
                let redis = Redis::new(deployment);
                let mut stores: Vec<Arc<dyn statehouse_core::cache::CacheStore>> = Vec::new();
                for _ in 0..replicas {
                    let store = redis.connect(&prefix, clock).await;
                    stores.push(Arc::new(store.cache_store()));
                }
                CacheFleet {
                    stores,
                    embedded: None,
                    prefix: Some(prefix),
                }
            }
        }
    }
}
