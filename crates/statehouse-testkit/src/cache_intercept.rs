//! A [`CacheStore`] wrapper for tests that need a store misbehaving in one way (slow, failing,
//! stalling on one call): it forwards every call to the real store, except the ones its
//! [`Intercept`] replaces.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use statehouse_core::cache::CacheStore;
//! use statehouse_testkit::cache_intercept::{Intercept, Intercepted};
//!
//! #[derive(Debug, Default)]
//! struct CountReads(AtomicUsize);
//!
//! #[async_trait::async_trait]
//! impl Intercept for CountReads {
//!     async fn get(
//!         &self,
//!         inner: &dyn CacheStore,
//!         key: &str,
//!     ) -> statehouse_core::Result<Option<Vec<u8>>> {
//!         self.0.fetch_add(1, Ordering::SeqCst);
//!         inner.get(key).await
//!     }
//! }
//!
//! fn wrap(real: Arc<dyn CacheStore>) -> Intercepted<CountReads> {
//!     Intercepted { inner: real, intercept: CountReads::default() }
//! }
//! # let _ = wrap;
//! ```

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use statehouse_core::Timestamp;
use statehouse_core::cache::{
    CacheStore, InvalidationSink, InvalidationSubscription, LeaseOutcome, LeaseToken,
};

/// What a test store does differently; every method defaults to forwarding to `inner`.
#[async_trait]
pub trait Intercept: Send + Sync + fmt::Debug + 'static {
    /// `get`, given the real store.
    async fn get(
        &self,
        inner: &dyn CacheStore,
        key: &str,
    ) -> statehouse_core::Result<Option<Vec<u8>>> {
        inner.get(key).await
    }

    /// `tag_versions`, given the real store.
    async fn tag_versions(
        &self,
        inner: &dyn CacheStore,
        tags: &[String],
    ) -> statehouse_core::Result<Vec<u64>> {
        inner.tag_versions(tags).await
    }

    /// `subscribe`, given the real store.
    async fn subscribe(
        &self,
        inner: &dyn CacheStore,
        sink: Arc<dyn InvalidationSink>,
    ) -> statehouse_core::Result<InvalidationSubscription> {
        inner.subscribe(sink).await
    }
}

/// `inner` with `intercept`'s changes. Derefs to the intercept, so a test reads its switches
/// and counters directly.
#[derive(Debug)]
pub struct Intercepted<I> {
    /// The real store.
    pub inner: Arc<dyn CacheStore>,
    /// What this store does differently.
    pub intercept: I,
}

impl<I> Deref for Intercepted<I> {
    type Target = I;
    fn deref(&self) -> &I {
        &self.intercept
    }
}

#[async_trait]
impl<I: Intercept> CacheStore for Intercepted<I> {
    async fn get(&self, key: &str) -> statehouse_core::Result<Option<Vec<u8>>> {
        self.intercept.get(&*self.inner, key).await
    }
    async fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        lease: Option<&LeaseToken>,
    ) -> statehouse_core::Result<bool> {
        self.inner.set(key, value, ttl, lease).await
    }
    async fn delete(&self, key: &str) -> statehouse_core::Result<bool> {
        self.inner.delete(key).await
    }
    async fn acquire_lease(
        &self,
        key: &str,
        now: Timestamp,
        ttl: Duration,
    ) -> statehouse_core::Result<LeaseOutcome> {
        self.inner.acquire_lease(key, now, ttl).await
    }
    async fn release_lease(&self, key: &str, token: &LeaseToken) -> statehouse_core::Result<bool> {
        self.inner.release_lease(key, token).await
    }
    async fn tag_versions(&self, tags: &[String]) -> statehouse_core::Result<Vec<u64>> {
        self.intercept.tag_versions(&*self.inner, tags).await
    }
    async fn bump_tag(&self, tag: &str) -> statehouse_core::Result<u64> {
        self.inner.bump_tag(tag).await
    }
    async fn purge_prefix(&self, prefix: &str) -> statehouse_core::Result<u64> {
        self.inner.purge_prefix(prefix).await
    }
    async fn subscribe(
        &self,
        sink: Arc<dyn InvalidationSink>,
    ) -> statehouse_core::Result<InvalidationSubscription> {
        self.intercept.subscribe(&*self.inner, sink).await
    }
}
