//! What is measured: a Statehouse store under one policy, the embedded store's direct call,
//! and governor's keyed limiter.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use statehouse_core::{Algorithm, LimitCheck, MAX_SLIDING_LOG_LIMIT, Mode, Policy, RateLimitStore};
use statehouse_embedded::EmbeddedStore;

use crate::load::Limiter;

/// The generous limit every policy gets, per hour: with 10 000 keys nearly every decision of a
/// run admits, so the figures measure the admitting path, which is the common one.
pub const GENEROUS_LIMIT_PER_HOUR: u32 = 1_000_000;

const HOUR: Duration = Duration::from_secs(3600);

/// The policy a run of `algorithm` uses: [`GENEROUS_LIMIT_PER_HOUR`] per hour, except the
/// sliding log, whose limit is capped at [`MAX_SLIDING_LOG_LIMIT`] (it keeps one entry per
/// admitted request).
pub fn generous_policy(algorithm: Algorithm) -> statehouse_core::Result<Policy> {
    let limit = match algorithm {
        Algorithm::SlidingWindowLog => MAX_SLIDING_LOG_LIMIT,
        _ => u64::from(GENEROUS_LIMIT_PER_HOUR),
    };
    Policy::new(algorithm, limit, HOUR)
}

/// A Statehouse store through the [`RateLimitStore`] trait behind an `Arc<dyn RateLimitStore>`
/// (`check_one_now`, then `check`): exactly the calls the `statehouse` facade makes for one limit.
#[derive(Debug)]
pub struct StoreLimiter {
    store: Arc<dyn RateLimitStore>,
    policy: Policy,
}

impl StoreLimiter {
    /// `store` deciding under `policy`.
    pub fn new(store: Arc<dyn RateLimitStore>, policy: Policy) -> Self {
        StoreLimiter { store, policy }
    }
}

impl Limiter for StoreLimiter {
    async fn decide(&self, key: &String) -> statehouse_core::Result<bool> {
        let check = [LimitCheck::new(key, &self.policy, 1)];
        // As the facade's `RateLimiter` does: an in-process store answers without a future.
        if let Some(answer) = self.store.check_one_now(&check[0], Mode::Consume) {
            return Ok(answer?.allowed);
        }
        Ok(self.store.check(&check, Mode::Consume).await?.allowed())
    }
}

/// The embedded store's synchronous single-check path, [`EmbeddedStore::check_one`]: no boxed
/// future, no `Verdict` vector. Shows what the trait call costs on top of the store itself.
#[derive(Debug)]
pub struct EmbeddedDirect {
    store: EmbeddedStore,
    policy: Policy,
}

impl EmbeddedDirect {
    /// `store` deciding under `policy`.
    pub fn new(store: EmbeddedStore, policy: Policy) -> Self {
        EmbeddedDirect { store, policy }
    }
}

impl Limiter for EmbeddedDirect {
    async fn decide(&self, key: &String) -> statehouse_core::Result<bool> {
        Ok(self
            .store
            .check_one(key, &self.policy, 1, Mode::Consume)?
            .allowed)
    }
}

/// governor's keyed limiter with its defaults (`DefaultKeyedRateLimiter<String>`: a dashmap
/// state store and the quanta clock), GCRA at [`GENEROUS_LIMIT_PER_HOUR`] per hour with a
/// burst of as many, like Statehouse's GCRA policy.
#[derive(Debug)]
pub struct GovernorKeyed {
    limiter: DefaultKeyedRateLimiter<String>,
}

impl GovernorKeyed {
    /// A fresh limiter.
    pub fn new() -> Self {
        let per_hour = NonZeroU32::new(GENEROUS_LIMIT_PER_HOUR).unwrap_or(NonZeroU32::MIN);
        GovernorKeyed {
            limiter: RateLimiter::keyed(Quota::per_hour(per_hour)),
        }
    }
}

impl Limiter for GovernorKeyed {
    async fn decide(&self, key: &String) -> statehouse_core::Result<bool> {
        Ok(self.limiter.check_key(key).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_algorithm_has_a_valid_generous_policy() {
        for algorithm in Algorithm::ALL {
            let policy = generous_policy(algorithm).expect("valid policy");
            assert!(policy.limit() >= 100_000, "{algorithm}");
        }
    }
}
