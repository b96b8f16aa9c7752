//! The embedded cache against a plain model of the contract: random sequences of writes, fills,
//! deletes, leases, releases, purges and clock moves, with a bound large enough that nothing is
//! evicted, must answer exactly as the model says (values, expiry at the edge, which fills are
//! refused, purge counts).

use std::collections::HashMap;
use std::time::Duration;

use futures::executor::block_on;
use proptest::prelude::*;
use statehouse_core::cache::{CacheStore, LeaseOutcome, LeaseToken};
use statehouse_core::{Clock, ManualClock, Timestamp};
use statehouse_embedded::EmbeddedCacheStore;

const KEYS: [&str; 6] = ["a", "ab", "b", "b:1", "{x}*", "a b"];
const PREFIXES: [&str; 5] = ["a", "b:", "{x}", "c", "a b"];

#[derive(Debug, Clone)]
enum Op {
    Get(usize),
    Set(usize, u8, u64),
    /// Fill key with the `n`th token ever granted (if any).
    Fill(usize, usize, u8, u64),
    Delete(usize),
    Acquire(usize, u64),
    Release(usize, usize),
    Purge(usize),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let key = 0..KEYS.len();
    // Mostly whole seconds, so that clock moves land exactly on expiry edges.
    let ms = prop_oneof![Just(1_000u64), Just(2_000), 1..3_000u64];
    prop_oneof![
        key.clone().prop_map(Op::Get),
        (key.clone(), any::<u8>(), ms.clone()).prop_map(|(k, v, t)| Op::Set(k, v, t)),
        (key.clone(), 0..8usize, any::<u8>(), ms.clone())
            .prop_map(|(k, n, v, t)| Op::Fill(k, n, v, t)),
        key.clone().prop_map(Op::Delete),
        (key.clone(), ms.clone()).prop_map(|(k, t)| Op::Acquire(k, t)),
        (key, 0..8usize).prop_map(|(k, n)| Op::Release(k, n)),
        (0..PREFIXES.len()).prop_map(Op::Purge),
        // Often onto an edge or one millisecond either side of it.
        prop_oneof![Just(0u64), Just(1), Just(999), Just(1_000), 1..2_500u64].prop_map(Op::Advance),
    ]
}

#[derive(Default)]
struct Model {
    values: HashMap<&'static str, (Vec<u8>, Timestamp)>,
    leases: HashMap<&'static str, (LeaseToken, Timestamp)>,
}

impl Model {
    fn live_value(&self, key: &str, now: Timestamp) -> Option<Vec<u8>> {
        self.values
            .get(key)
            .filter(|(_, at)| *at > now)
            .map(|(v, _)| v.clone())
    }

    fn live_lease(&self, key: &str, now: Timestamp) -> Option<&LeaseToken> {
        self.leases
            .get(key)
            .filter(|(_, at)| *at > now)
            .map(|(t, _)| t)
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn run(ops: &[Op]) {
    let clock = ManualClock::new(Timestamp::from_micros(1_700_000_000_000_000));
    let cache = EmbeddedCacheStore::builder()
        .clock(clock.clone())
        .shards(2)
        .build()
        .expect("valid store");
    let mut model = Model::default();
    let mut tokens: Vec<LeaseToken> = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        let now = clock.now();
        match *op {
            Op::Get(k) => {
                let got = block_on(cache.get(KEYS[k])).expect("get");
                assert_eq!(got, model.live_value(KEYS[k], now), "step {step}: {op:?}");
            }
            Op::Set(k, v, t) => {
                assert!(block_on(cache.set(KEYS[k], &[v], ms(t), None)).expect("set"));
                model
                    .values
                    .insert(KEYS[k], (vec![v], now.saturating_add(ms(t))));
                model.leases.remove(KEYS[k]);
            }
            Op::Fill(k, n, v, t) => {
                let Some(token) = tokens.get(n).cloned() else {
                    continue;
                };
                let expected = model.live_lease(KEYS[k], now) == Some(&token);
                let filled = block_on(cache.set(KEYS[k], &[v], ms(t), Some(&token))).expect("fill");
                assert_eq!(filled, expected, "step {step}: {op:?}");
                if expected {
                    model
                        .values
                        .insert(KEYS[k], (vec![v], now.saturating_add(ms(t))));
                    model.leases.remove(KEYS[k]);
                }
            }
            Op::Delete(k) => {
                let existed = block_on(cache.delete(KEYS[k])).expect("delete");
                assert_eq!(
                    existed,
                    model.live_value(KEYS[k], now).is_some(),
                    "step {step}: {op:?}"
                );
                model.values.remove(KEYS[k]);
                model.leases.remove(KEYS[k]);
            }
            Op::Acquire(k, t) => {
                let outcome = block_on(cache.acquire_lease(KEYS[k], now, ms(t))).expect("lease");
                let held = model.live_lease(KEYS[k], now).is_some();
                match outcome {
                    LeaseOutcome::Acquired(token) => {
                        assert!(!held, "step {step}: granted a held lease");
                        model
                            .leases
                            .insert(KEYS[k], (token.clone(), now.saturating_add(ms(t))));
                        tokens.push(token);
                    }
                    LeaseOutcome::HeldElsewhere => {
                        assert!(held, "step {step}: refused a free lease")
                    }
                }
            }
            Op::Release(k, n) => {
                let Some(token) = tokens.get(n).cloned() else {
                    continue;
                };
                let expected = model.live_lease(KEYS[k], now) == Some(&token);
                let released = block_on(cache.release_lease(KEYS[k], &token)).expect("release");
                assert_eq!(released, expected, "step {step}: {op:?}");
                if expected {
                    model.leases.remove(KEYS[k]);
                }
            }
            Op::Purge(p) => {
                let prefix = PREFIXES[p];
                let expected = KEYS
                    .iter()
                    .filter(|k| k.starts_with(prefix) && model.live_value(k, now).is_some())
                    .count() as u64;
                let purged = block_on(cache.purge_prefix(prefix)).expect("purge");
                assert_eq!(purged, expected, "step {step}: {op:?}");
                model.values.retain(|k, _| !k.starts_with(prefix));
                model.leases.retain(|k, _| !k.starts_with(prefix));
            }
            Op::Advance(n) => clock.advance(ms(n)),
        }
    }
    assert_eq!(cache.evictions(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_embedded_cache_answers_like_the_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(&ops);
    }
}
