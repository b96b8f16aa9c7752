//! The store traits every backend implements.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;

use crate::decision::{Decision, Verdict};
use crate::error::{Error, Result};
use crate::key::encode_key;
use crate::policy::Policy;

/// Whether a check consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Consume the cost if (every limit) admits the request.
    Consume,
    /// Answer what a consuming check would, and change nothing.
    Peek,
}

/// One limit to check: a key, its policy and the request's cost.
#[derive(Debug, Clone, Copy)]
pub struct LimitCheck<'a> {
    /// The caller's key (a user id, an IP address, a route...).
    pub key: &'a str,
    /// The policy to enforce on it.
    pub policy: &'a Policy,
    /// Units of cost this request takes (1 for a plain request).
    pub cost: u64,
}

impl<'a> LimitCheck<'a> {
    /// A check of `cost` units on `key` under `policy`.
    pub fn new(key: &'a str, policy: &'a Policy, cost: u64) -> Self {
        LimitCheck { key, policy, cost }
    }
}

/// A check whose input has been validated, with its key in storage form.
#[derive(Debug, Clone)]
pub struct PreparedCheck<'a> {
    /// The storage form of the key ([`encode_key`]).
    pub key: std::borrow::Cow<'a, str>,
    /// The policy.
    pub policy: &'a Policy,
    /// The cost (at least 1 and at most the policy's capacity).
    pub cost: u64,
}

/// Validates a batch of checks: every key encodable, every cost admissible, and no two checks on
/// the same key with the same algorithm and period (they would share one stored state).
///
/// ```
/// use std::time::Duration;
/// use statehouse_core::{prepare_checks, LimitCheck, Policy};
/// let per_sec = Policy::gcra(10, Duration::from_secs(1))?;
/// let checks = [LimitCheck::new("ip:1", &per_sec, 1), LimitCheck::new("ip:1", &per_sec, 1)];
/// assert!(prepare_checks(&checks).is_err());
/// # Ok::<(), statehouse_core::Error>(())
/// ```
pub fn prepare_checks<'a>(checks: &[LimitCheck<'a>]) -> Result<Vec<PreparedCheck<'a>>> {
    // Only a batch of several checks can repeat a state; a single check (the common case)
    // allocates no set.
    let mut seen = HashSet::with_capacity(if checks.len() > 1 { checks.len() } else { 0 });
    let mut out = Vec::with_capacity(checks.len());
    for check in checks {
        check.policy.check_cost(check.cost)?;
        let key = encode_key(check.key)?;
        if checks.len() > 1
            && !seen.insert((
                key.clone(),
                check.policy.algorithm(),
                check.policy.period_micros(),
            ))
        {
            return Err(Error::InvalidInput(format!(
                "two checks in one batch share key {:?} with {} per {:?}; they would share one \
                 state (use different periods or merge them)",
                check.key,
                check.policy.algorithm(),
                check.policy.period()
            )));
        }
        out.push(PreparedCheck {
            key,
            policy: check.policy,
            cost: check.cost,
        });
    }
    Ok(out)
}

/// A store of rate-limit state: the embedded store, Redis, Redis Cluster.
///
/// Every implementation makes exactly the decisions of
/// [`algorithm::decide`](crate::algorithm::decide), and passes the one conformance suite in
/// `statehouse-testkit`.
#[async_trait]
pub trait RateLimitStore: Send + Sync + fmt::Debug + 'static {
    /// Decides every check together: if all admit, all are consumed (in [`Mode::Consume`]);
    /// if any denies, none is. Returns one decision per check, in order.
    async fn check(&self, checks: &[LimitCheck<'_>], mode: Mode) -> Result<Verdict>;

    /// Decides one check right away, for stores that never wait (the embedded store): `Some`
    /// answer, or `None` when the caller must await [`check`](Self::check). Same contract as
    /// `check` with one check.
    ///
    /// Hot paths (the `statehouse` facade's `RateLimiter`) try this first: an in-process
    /// decision then costs no boxed future, no timer and no vector. The default answers `None`.
    fn check_one_now(&self, check: &LimitCheck<'_>, mode: Mode) -> Option<Result<Decision>> {
        let _ = (check, mode);
        None
    }

    /// [`check`](Self::check) bounded by the caller's `timeout` as well as by the store's own
    /// call deadline: `Some` with the result, which is [`Error::Timeout`]
    /// carrying the shorter of the two durations when that one passes first; or `None` (the
    /// default) when the store does not bound this call itself, and the caller must bound
    /// [`check`](Self::check) on its own.
    ///
    /// This lets a caller with a deadline of its own (the `statehouse` facade's `RateLimiter`)
    /// decide without a timer of its own around a call the store already times (the Redis
    /// store's coalesced single checks arm no timer per check at all).
    async fn check_within(
        &self,
        checks: &[LimitCheck<'_>],
        mode: Mode,
        timeout: Duration,
    ) -> Option<Result<Verdict>> {
        let _ = (checks, mode, timeout);
        None
    }

    /// Forgets the state of `key` under `policy`, as if it had never been seen.
    async fn reset(&self, key: &str, policy: &Policy) -> Result<()>;

    /// How many failure domains the store has: parts that can fail while the others go on
    /// (groups of hash slots of a Redis Cluster, each on one master or two). A caller with a
    /// circuit breaker (the `statehouse` facade's `RateLimiter`) keeps one per domain, so that
    /// one dead part does not send keys that live on the others to the degraded path. The
    /// default is 1: the store fails as a whole.
    fn failure_domains(&self) -> usize {
        1
    }

    /// The failure domain, below [`failure_domains`](Self::failure_domains), of a call whose
    /// first check is `check`. The default is 0.
    fn failure_domain(&self, check: &LimitCheck<'_>) -> usize {
        let _ = check;
        0
    }
}

/// Forwards to the shared store. Written out by hand rather than with `#[async_trait]`, which
/// would box a future around the inner store's already boxed future on every call.
impl<S: RateLimitStore + ?Sized> RateLimitStore for std::sync::Arc<S> {
    fn check<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        checks: &'life1 [LimitCheck<'life2>],
        mode: Mode,
    ) -> Pin<Box<dyn Future<Output = Result<Verdict>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        (**self).check(checks, mode)
    }

    fn check_one_now(&self, check: &LimitCheck<'_>, mode: Mode) -> Option<Result<Decision>> {
        (**self).check_one_now(check, mode)
    }

    fn failure_domains(&self) -> usize {
        (**self).failure_domains()
    }

    fn failure_domain(&self, check: &LimitCheck<'_>) -> usize {
        (**self).failure_domain(check)
    }

    fn check_within<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        checks: &'life1 [LimitCheck<'life2>],
        mode: Mode,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = Option<Result<Verdict>>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        (**self).check_within(checks, mode, timeout)
    }

    fn reset<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        key: &'life1 str,
        policy: &'life2 Policy,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        (**self).reset(key, policy)
    }
}
