//! The rate-limiting conformance suite: one behaviour contract, run against every backend.
//!
//! Each case takes a [`StoreFactory`] that makes a fresh, isolated store whose time follows a
//! [`ManualClock`], runs a scenario, and checks every decision twice: against facts stated in
//! the case (how many are admitted, what a denial says) and against [`Reference`], which applies
//! the pure [`decide`] function to its own copy of the state. A backend passes only if it decides
//! exactly like the algorithms in `statehouse-core`.
//!
//! Instantiate it with [`ratelimit_conformance!`](crate::ratelimit_conformance):
//!
//! ```ignore
//! statehouse_testkit::ratelimit_conformance!(embedded, EmbeddedFactory);
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use statehouse_core::algorithm::{State, decide};
use statehouse_core::key::MAX_KEY_LEN;
use statehouse_core::{
    Algorithm, Decision, LimitCheck, ManualClock, Mode, Policy, RateLimitStore, Verdict,
};

/// Makes stores for the suite.
#[async_trait]
pub trait StoreFactory: Send + Sync {
    /// A store isolated from every other store this factory made (its own key prefix, say),
    /// whose notion of "now" follows `clock`.
    async fn make(&self, clock: &ManualClock) -> Arc<dyn RateLimitStore>;

    /// A second handle on the same data as `store` (another connection, another replica),
    /// also following `clock`. Backends without separate connections return `store` itself.
    async fn another_replica(
        &self,
        store: &Arc<dyn RateLimitStore>,
        clock: &ManualClock,
    ) -> Arc<dyn RateLimitStore>;
}

/// The reference model: the pure algorithms over an in-memory map, all-or-nothing like a store.
#[derive(Debug, Default)]
pub struct Reference {
    states: HashMap<(String, Algorithm, u64), Option<State>>,
}

impl Reference {
    /// What a store must answer to `checks` at `clock`'s time.
    pub fn check(&mut self, clock: &ManualClock, checks: &[LimitCheck<'_>], mode: Mode) -> Verdict {
        use statehouse_core::Clock;
        let now = clock.now();
        let mut steps = Vec::new();
        for c in checks {
            let id = (
                c.key.to_owned(),
                c.policy.algorithm(),
                c.policy.period_micros(),
            );
            let state = self.states.get(&id).cloned().flatten();
            // A stored state past its expiry reads as absent on every backend; `decide` is built
            // so that this changes nothing, and the reference relies on it.
            steps.push((id, decide(c.policy, state, now, c.cost, mode)));
        }
        let all = steps.iter().all(|(_, s)| s.decision.allowed);
        let decisions = steps.iter().map(|(_, s)| s.decision.clone()).collect();
        if all && mode == Mode::Consume {
            for (id, s) in steps {
                self.states.insert(id, s.state);
            }
        }
        Verdict { decisions }
    }

    /// Forgets one key's state.
    pub fn reset(&mut self, key: &str, policy: &Policy) {
        self.states
            .remove(&(key.to_owned(), policy.algorithm(), policy.period_micros()));
    }
}

/// A store and the reference, driven together; every call asserts they agree.
pub struct Harness {
    /// The store under test.
    pub store: Arc<dyn RateLimitStore>,
    /// Its clock.
    pub clock: ManualClock,
    /// The reference model.
    pub reference: Reference,
}

impl Harness {
    /// A fresh store from `factory` at a clock starting now.
    pub async fn new(factory: &dyn StoreFactory) -> Harness {
        let clock = ManualClock::starting_now();
        let store = factory.make(&clock).await;
        Harness {
            store,
            clock,
            reference: Reference::default(),
        }
    }

    /// One check, asserted equal to the reference.
    pub async fn check(&mut self, key: &str, policy: &Policy, cost: u64) -> Decision {
        self.batch(&[LimitCheck::new(key, policy, cost)], Mode::Consume)
            .await
            .decisions
            .remove(0)
    }

    /// One peek, asserted equal to the reference.
    pub async fn peek(&mut self, key: &str, policy: &Policy) -> Decision {
        self.batch(&[LimitCheck::new(key, policy, 1)], Mode::Peek)
            .await
            .decisions
            .remove(0)
    }

    /// A batch, asserted equal to the reference.
    pub async fn batch(&mut self, checks: &[LimitCheck<'_>], mode: Mode) -> Verdict {
        let got = self
            .store
            .check(checks, mode)
            .await
            .unwrap_or_else(|e| panic!("store failed on {checks:?}: {e}"));
        let want = self.reference.check(&self.clock, checks, mode);
        assert_eq!(
            got, want,
            "store and reference disagree on {checks:?} ({mode:?})"
        );
        got
    }

    /// Resets on both.
    pub async fn reset(&mut self, key: &str, policy: &Policy) {
        self.store
            .reset(key, policy)
            .await
            .unwrap_or_else(|e| panic!("reset failed: {e}"));
        self.reference.reset(key, policy);
    }

    /// Moves the clock.
    pub fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }
}

fn policy(alg: Algorithm, limit: u64, period: Duration) -> Policy {
    Policy::new(alg, limit, period).expect("valid policy")
}

/// How many unit requests fit at one instant into a fresh state of `p`.
fn instant_capacity(p: &Policy) -> u64 {
    match p.algorithm() {
        Algorithm::LeakyBucket => p.max_delay_micros() / p.interval_micros() + 1,
        _ => p.capacity(),
    }
}

/// Every algorithm admits exactly its instant capacity, then denies, and a denial's
/// `retry_after` is exact: admitted at `retry_after`, not a microsecond before.
pub async fn admits_capacity_then_denies_with_exact_retry_after(f: &dyn StoreFactory) {
    for alg in Algorithm::ALL {
        let mut h = Harness::new(f).await;
        let p = policy(alg, 5, Duration::from_secs(10));
        let mut admitted = 0;
        let denial = loop {
            let d = h.check("k", &p, 1).await;
            if !d.allowed {
                break d;
            }
            admitted += 1;
            assert!(admitted <= 100, "{alg} never denies");
        };
        assert_eq!(admitted, instant_capacity(&p), "{alg}");
        assert_eq!(denial.remaining, 0, "{alg}");
        let retry = denial.retry_after.expect("a denial has retry_after");
        assert!(retry > Duration::ZERO, "{alg}");
        h.advance(retry - Duration::from_micros(1));
        assert!(
            !h.peek("k", &p).await.allowed,
            "{alg}: retry_after too long"
        );
        h.advance(Duration::from_micros(1));
        assert!(
            h.check("k", &p, 1).await.allowed,
            "{alg}: retry_after too short"
        );
    }
}

/// Peeking never consumes, on any algorithm.
pub async fn peek_consumes_nothing(f: &dyn StoreFactory) {
    for alg in Algorithm::ALL {
        let mut h = Harness::new(f).await;
        let p = policy(alg, 3, Duration::from_secs(60));
        h.check("k", &p, 1).await;
        let before = h.peek("k", &p).await;
        for _ in 0..10 {
            assert_eq!(h.peek("k", &p).await, before, "{alg}");
        }
        assert!(before.allowed, "{alg}");
    }
}

/// A denied request consumes nothing: what remains is what remained before it.
pub async fn denied_request_consumes_nothing(f: &dyn StoreFactory) {
    for alg in Algorithm::ALL {
        let mut h = Harness::new(f).await;
        let p = policy(alg, 4, Duration::from_secs(60));
        let cap = instant_capacity(&p);
        // Fill to one below capacity, then ask for 2 (denied), then 1 (admitted).
        for _ in 0..cap - 1 {
            assert!(h.check("k", &p, 1).await.allowed, "{alg}");
        }
        if alg != Algorithm::LeakyBucket {
            assert!(!h.check("k", &p, 2).await.allowed, "{alg}");
        }
        assert!(
            h.check("k", &p, 1).await.allowed,
            "{alg}: the denial consumed"
        );
        assert!(!h.check("k", &p, 1).await.allowed, "{alg}");
    }
}

/// Reset forgets a key's state, and only that key's.
pub async fn reset_forgets_one_key(f: &dyn StoreFactory) {
    for alg in Algorithm::ALL {
        let mut h = Harness::new(f).await;
        let p = policy(alg, 2, Duration::from_secs(60));
        while h.check("a", &p, 1).await.allowed {}
        while h.check("b", &p, 1).await.allowed {}
        h.reset("a", &p).await;
        assert!(h.check("a", &p, 1).await.allowed, "{alg}");
        assert!(!h.check("b", &p, 1).await.allowed, "{alg}");
    }
}

/// A request's cost is counted in full.
pub async fn costs_are_counted(f: &dyn StoreFactory) {
    for alg in Algorithm::ALL {
        let mut h = Harness::new(f).await;
        let p = policy(alg, 10, Duration::from_secs(60));
        let d = h.check("k", &p, 7).await;
        assert!(d.allowed, "{alg}");
        if alg != Algorithm::LeakyBucket {
            assert_eq!(d.remaining, 3, "{alg}");
            assert!(!h.check("k", &p, 4).await.allowed, "{alg}");
            assert!(h.check("k", &p, 3).await.allowed, "{alg}");
        }
    }
}

/// Several limits on one request: a denial by any consumes from none.
pub async fn several_limits_are_all_or_nothing(f: &dyn StoreFactory) {
    for alg in Algorithm::ALL {
        let mut h = Harness::new(f).await;
        let per_ip = policy(alg, 10, Duration::from_secs(60));
        let per_user = policy(alg, 3, Duration::from_secs(3600));
        let checks = [
            LimitCheck::new("ip:10.0.0.1", &per_ip, 1),
            LimitCheck::new("user:7", &per_user, 1),
        ];
        let user_cap = instant_capacity(&per_user);
        for _ in 0..user_cap {
            assert!(h.batch(&checks, Mode::Consume).await.allowed(), "{alg}");
        }
        let v = h.batch(&checks, Mode::Consume).await;
        assert!(!v.allowed(), "{alg}");
        assert!(v.decisions[0].allowed && !v.decisions[1].allowed, "{alg}");
        // The per-IP limit lost only what the admitted requests took.
        let ip = h.peek("ip:10.0.0.1", &per_ip).await;
        let mut fresh = Reference::default();
        fresh.check(
            &h.clock,
            &[LimitCheck::new("x", &per_ip, user_cap)],
            Mode::Consume,
        );
        let fresh_ip = fresh
            .check(&h.clock, &[LimitCheck::new("x", &per_ip, 1)], Mode::Peek)
            .decisions
            .remove(0);
        assert_eq!(ip.remaining, fresh_ip.remaining, "{alg}");
    }
}

/// State left alone long enough decides exactly like a fresh key.
pub async fn state_expires_into_a_fresh_key(f: &dyn StoreFactory) {
    for alg in Algorithm::ALL {
        let mut h = Harness::new(f).await;
        let p = policy(alg, 3, Duration::from_secs(2));
        let mut last = h.check("k", &p, 1).await;
        while last.allowed {
            last = h.check("k", &p, 1).await;
        }
        h.advance(last.reset_after + p.period() * 2);
        let fresh = h.check("fresh", &p, 1).await;
        assert_eq!(h.check("k", &p, 1).await, fresh, "{alg}");
    }
}

/// Periods need not be round: 100 per 90 s, 10 000 per day, 5 000 per second, 3 per ms.
pub async fn any_period_works(f: &dyn StoreFactory) {
    let cases = [
        (100, Duration::from_secs(90)),
        (10_000, Duration::from_secs(86_400)),
        (5_000, Duration::from_secs(1)),
        (3, Duration::from_millis(1)),
    ];
    for (limit, period) in cases {
        for alg in Algorithm::ALL {
            let mut h = Harness::new(f).await;
            let p = policy(alg, limit, period);
            // Take the whole capacity in a few large requests, then one more unit is denied.
            let cap = p.capacity().min(limit);
            let chunk = (cap / 4).max(1);
            let mut taken = 0;
            while taken + chunk <= cap {
                let d = h.check("k", &p, chunk).await;
                if !d.allowed {
                    break;
                }
                taken += chunk;
            }
            assert!(taken > 0, "{alg} {limit}/{period:?}");
            // And steady traffic over two periods is admitted at the policy's rate.
            h.reset("k", &p).await;
            let step = p.period() / 4;
            let mut admitted = 0;
            for _ in 0..8 {
                for _ in 0..(limit / 2).clamp(1, 50) {
                    admitted += u64::from(h.check("k", &p, 1).await.allowed);
                }
                h.advance(step);
            }
            assert!(admitted > 0, "{alg} {limit}/{period:?}");
        }
    }
}

/// Keys with spaces, newlines, braces, non-ASCII text or 64 KiB work, stay apart, and do not
/// break Redis Cluster hash tags; keys that cannot work get a clear error.
pub async fn keys_of_any_shape_work_and_stay_apart(f: &dyn StoreFactory) {
    let long = "k".repeat(MAX_KEY_LEN);
    let long2 = format!("{}j", "k".repeat(MAX_KEY_LEN - 1));
    let keys = [
        "with space",
        "with\nnewline",
        "{brace}",
        "}{",
        "a{b}c",
        "~tilde",
        "ключ 🔑",
        long.as_str(),
        long2.as_str(),
    ];
    let mut h = Harness::new(f).await;
    let p = policy(Algorithm::Gcra, 1, Duration::from_secs(60));
    for k in keys {
        assert!(h.check(k, &p, 1).await.allowed, "{k:.20?}");
    }
    for k in keys {
        assert!(!h.check(k, &p, 1).await.allowed, "{k:.20?}");
    }
    let too_long = "k".repeat(MAX_KEY_LEN + 1);
    for bad in ["", too_long.as_str()] {
        let e = h
            .store
            .check(&[LimitCheck::new(bad, &p, 1)], Mode::Consume)
            .await
            .expect_err("rejected");
        assert!(e.is_invalid_input(), "{e}");
    }
}

/// Invalid costs and duplicate checks are rejected before any I/O, with a clear error.
pub async fn bad_input_is_rejected(f: &dyn StoreFactory) {
    let h = Harness::new(f).await;
    let p = policy(Algorithm::FixedWindow, 5, Duration::from_secs(1));
    for cost in [0, 6, u64::MAX] {
        let e = h
            .store
            .check(&[LimitCheck::new("k", &p, cost)], Mode::Consume)
            .await
            .expect_err("rejected");
        assert!(e.is_invalid_input(), "{e}");
    }
    let dup = [LimitCheck::new("k", &p, 1), LimitCheck::new("k", &p, 1)];
    let e = h
        .store
        .check(&dup, Mode::Consume)
        .await
        .expect_err("rejected");
    assert!(e.is_invalid_input(), "{e}");
    // An empty batch is trivially admitted.
    let v = h
        .store
        .check(&[], Mode::Consume)
        .await
        .expect("empty batch");
    assert!(v.allowed() && v.decisions.is_empty());
}

/// Two handles on the same data (two replicas) share one limit.
pub async fn replicas_share_one_limit(f: &dyn StoreFactory) {
    for alg in Algorithm::ALL {
        let mut h = Harness::new(f).await;
        let other = f.another_replica(&h.store, &h.clock).await;
        let p = policy(alg, 4, Duration::from_secs(60));
        let mut admitted = 0;
        for i in 0..20 {
            let store = if i % 2 == 0 { &h.store } else { &other };
            let v = store
                .check(&[LimitCheck::new("shared", &p, 1)], Mode::Consume)
                .await
                .expect("check");
            admitted += u64::from(v.allowed());
        }
        assert_eq!(admitted, instant_capacity(&p), "{alg}");
        h.reset("shared", &p).await;
    }
}

/// Many concurrent checks on one key admit exactly the capacity.
pub async fn concurrent_checks_admit_exactly_the_limit(f: &dyn StoreFactory) {
    for alg in Algorithm::ALL {
        let h = Harness::new(f).await;
        let p = policy(alg, 50, Duration::from_secs(3600));
        let calls = (0..200).map(|_| {
            let store = h.store.clone();
            let p = p.clone();
            async move {
                store
                    .check(&[LimitCheck::new("hot", &p, 1)], Mode::Consume)
                    .await
                    .expect("check")
                    .allowed()
            }
        });
        let admitted = futures::future::join_all(calls)
            .await
            .into_iter()
            .filter(|&a| a)
            .count() as u64;
        assert_eq!(admitted, instant_capacity(&p), "{alg}");
    }
}

/// A long pseudo-random sequence of checks, peeks, resets and clock moves over every algorithm,
/// decided exactly like the reference.
pub async fn long_sequence_matches_the_reference(f: &dyn StoreFactory) {
    let mut h = Harness::new(f).await;
    let policies: Vec<Policy> = Algorithm::ALL
        .iter()
        .flat_map(|&alg| {
            [
                policy(alg, 3, Duration::from_millis(700)),
                policy(alg, 20, Duration::from_secs(9)),
            ]
        })
        .collect();
    let mut seed: u64 = 0x5eed_1234_abcd_ef01;
    let mut next = move |n: u64| {
        // xorshift64*: deterministic, so a failure replays identically.
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    };
    for _ in 0..600 {
        let p = &policies[next(policies.len() as u64) as usize];
        let key = ["a", "b", "c"][next(3) as usize];
        match next(10) {
            0 => h.advance(Duration::from_micros(next(p.period_micros() * 2))),
            1 => h.advance(Duration::from_micros(next(1_000))),
            2 => {
                h.peek(key, p).await;
            }
            3 if next(4) == 0 => h.reset(key, p).await,
            _ => {
                let cost = 1 + next(p.capacity().min(3));
                h.check(key, p, cost).await;
            }
        }
    }
}

/// Declares one `#[tokio::test]` per conformance case in a module named `$name`, using
/// `$factory` (an expression evaluating to a [`StoreFactory`]).
#[macro_export]
macro_rules! ratelimit_conformance {
    ($name:ident, $factory:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::ratelimit_conformance!(@cases $factory;
                admits_capacity_then_denies_with_exact_retry_after,
                peek_consumes_nothing,
                denied_request_consumes_nothing,
                reset_forgets_one_key,
                costs_are_counted,
                several_limits_are_all_or_nothing,
                state_expires_into_a_fresh_key,
                any_period_works,
                keys_of_any_shape_work_and_stay_apart,
                bad_input_is_rejected,
                replicas_share_one_limit,
                concurrent_checks_admit_exactly_the_limit,
                long_sequence_matches_the_reference,
            );
        }
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let factory = $factory;
                $crate::ratelimit_suite::$case(&factory).await;
            }
        )*
    };
}
