//! A test-only store that injects faults: it counts calls and can be told to fail as
//! unavailable, to fail with a backend error, to reject the input, to answer slowly or to hang
//! forever. It exists to test the limiter's breaker and degraded-mode logic deterministically;
//! `redis_outage.rs` covers the same paths against a real redis-server that is killed.

#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use statehouse::{
    EmbeddedStore, Error, LimitCheck, ManualClock, Mode, Policy, RateLimitStore, Result, Timestamp,
    Verdict,
};

/// How the store behaves on its next calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answers from an embedded store.
    Healthy,
    /// `Error::Unavailable`, as a refused connection.
    Unavailable,
    /// Never answers.
    Hang,
    /// `Error::Backend`, as a script error.
    Backend,
    /// `Error::InvalidKey`, as if the store rejected the key itself.
    RejectInput,
}

#[derive(Debug)]
struct Shared {
    calls: AtomicU64,
    // A std Mutex: held only to copy the setting out, never across an await.
    fault: Mutex<Fault>,
    latency: Mutex<Duration>,
    backing: EmbeddedStore,
}

/// The fault-injecting store; clones share the same state.
#[derive(Debug, Clone)]
pub struct FaultyStore {
    shared: Arc<Shared>,
}

impl FaultyStore {
    /// A healthy store answering from an embedded store on `clock`.
    pub fn new(clock: &ManualClock) -> Self {
        let backing = EmbeddedStore::builder()
            .clock(clock.clone())
            .build()
            .expect("embedded store");
        FaultyStore {
            shared: Arc::new(Shared {
                calls: AtomicU64::new(0),
                fault: Mutex::new(Fault::Healthy),
                latency: Mutex::new(Duration::ZERO),
                backing,
            }),
        }
    }

    pub fn set_fault(&self, fault: Fault) {
        *self.shared.fault.lock().expect("fault lock") = fault;
    }

    /// Latency (tokio time) added to every call before it answers.
    pub fn set_latency(&self, latency: Duration) {
        *self.shared.latency.lock().expect("latency lock") = latency;
    }

    /// Calls received so far (check and reset).
    pub fn calls(&self) -> u64 {
        self.shared.calls.load(Ordering::SeqCst)
    }

    async fn enter(&self) -> Result<()> {
        self.shared.calls.fetch_add(1, Ordering::SeqCst);
        let fault = *self.shared.fault.lock().expect("fault lock");
        let latency = *self.shared.latency.lock().expect("latency lock");
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        match fault {
            Fault::Healthy => Ok(()),
            Fault::Unavailable => Err(Error::Unavailable {
                message: "injected: connection refused".into(),
                source: None,
            }),
            Fault::Hang => std::future::pending().await,
            Fault::Backend => Err(Error::Backend {
                message: "injected: ERR script error".into(),
                source: None,
            }),
            Fault::RejectInput => Err(Error::InvalidKey {
                reason: "injected: rejected by the store".into(),
            }),
        }
    }
}

#[async_trait]
impl RateLimitStore for FaultyStore {
    async fn check(&self, checks: &[LimitCheck<'_>], mode: Mode) -> Result<Verdict> {
        self.enter().await?;
        self.shared.backing.check(checks, mode).await
    }

    async fn reset(&self, key: &str, policy: &Policy) -> Result<()> {
        self.enter().await?;
        self.shared.backing.reset(key, policy).await
    }
}

/// A manual clock at a fixed, realistic time.
pub fn manual_clock() -> ManualClock {
    ManualClock::new(Timestamp::from_micros(1_700_000_000_000_000))
}
