//! Coalescing of concurrent single checks (`src/batch.rs`): checks decided together in one
//! script call are decided exactly as if each were a call of its own.

mod common;

use std::sync::Arc;
use std::time::Duration;

use statehouse_core::{Error, LimitCheck, ManualClock, Mode, Policy, RateLimitStore};
use statehouse_redis::{RedisStore, RedisTopology, TimeSource};
use statehouse_testkit::{RedisServer, raw_command, shared_cluster, shared_standalone};

use common::{admitted_at_once, hourly_policies, store_prefix};

async fn store_on(topology: RedisTopology, name: &str) -> RedisStore {
    RedisStore::builder(topology)
        .prefix(&store_prefix(name))
        .call_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect")
}

fn topologies() -> [RedisTopology; 2] {
    [
        RedisTopology::Standalone(shared_standalone().url()),
        RedisTopology::Cluster(shared_cluster().urls()),
    ]
}

/// Many concurrent single checks on one key, under every algorithm at once (so batches mix
/// policies): exactly the allowance is admitted, and each later check of the same state saw
/// the earlier ones' writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_of_one_key_admit_exactly_the_allowance() {
    for topology in topologies() {
        let store = store_on(topology, "batch-one-key").await;
        let policies = hourly_policies(40);
        let mut tasks = Vec::new();
        for round in 0..120 {
            for (index, policy) in policies.iter().enumerate() {
                let store = store.clone();
                let policy = policy.clone();
                let key = if round % 2 == 0 { "hot" } else { "hot2" };
                tasks.push(tokio::spawn(async move {
                    let allowed = store
                        .check(&[LimitCheck::new(key, &policy, 1)], Mode::Consume)
                        .await
                        .expect("check")
                        .allowed();
                    (index, allowed)
                }));
            }
        }
        let mut admitted = vec![0; policies.len()];
        for task in tasks {
            let (index, allowed) = task.await.expect("task");
            if allowed {
                admitted[index] += 1;
            }
        }
        for (policy, admitted) in policies.iter().zip(admitted) {
            assert_eq!(
                admitted,
                2 * admitted_at_once(policy),
                "{}",
                policy.algorithm()
            );
        }
    }
}

/// A corrupt key among concurrent checks fails its own callers only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_key_fails_only_its_own_checks() {
    let server = shared_standalone();
    let store = store_on(RedisTopology::Standalone(server.url()), "batch-corrupt").await;
    let policy = Policy::gcra(1_000, Duration::from_secs(60)).expect("policy");
    let bad = store.storage_key("bad", &policy).expect("key");
    assert_eq!(
        raw_command(server.port(), &["HSET", &bad, "t", "1"]).expect("HSET"),
        "1"
    );
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            let policy = policy.clone();
            tokio::spawn(async move {
                let key = if i % 10 == 0 {
                    "bad".to_owned()
                } else {
                    format!("good:{i}")
                };
                let result = store
                    .check(&[LimitCheck::new(&key, &policy, 1)], Mode::Consume)
                    .await;
                (key, result)
            })
        })
        .collect();
    for task in tasks {
        let (key, result) = task.await.expect("task");
        if key == "bad" {
            let err = result.expect_err("corrupt");
            assert!(matches!(err, Error::Backend { .. }), "{err:?}");
        } else {
            assert!(result.expect(&key).allowed(), "{key}");
        }
    }
}

/// Consumes and peeks of one key interleaved in a batch, with caller time: each check uses its
/// own time and mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peeks_and_consumes_mix_in_a_batch() {
    for topology in topologies() {
        let clock = Arc::new(ManualClock::starting_now());
        let store = RedisStore::builder(topology)
            .prefix(&store_prefix("batch-mix"))
            .time_source(TimeSource::Caller(clock.clone()))
            .connect()
            .await
            .expect("connect");
        let policy = Policy::fixed_window(50, Duration::from_secs(3600)).expect("policy");
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let store = store.clone();
                let policy = policy.clone();
                let mode = if i % 2 == 0 {
                    Mode::Consume
                } else {
                    Mode::Peek
                };
                tokio::spawn(async move {
                    let d = store
                        .check(&[LimitCheck::new("mixed", &policy, 1)], mode)
                        .await
                        .expect("check")
                        .decisions[0]
                        .clone();
                    (mode, d)
                })
            })
            .collect();
        let mut consumed = 0;
        for task in tasks {
            let (mode, d) = task.await.expect("task");
            if mode == Mode::Consume {
                assert!(d.allowed);
                consumed += 1;
            } else {
                // A peek sees the consumes decided before it, and never writes.
                assert!(d.allowed || d.remaining == 0, "{d:?}");
            }
        }
        assert_eq!(consumed, 50);
        let d = store
            .check(&[LimitCheck::new("mixed", &policy, 1)], Mode::Peek)
            .await
            .expect("peek")
            .decisions[0]
            .clone();
        assert!(!d.allowed);
        assert_eq!(d.remaining, 0);
    }
}

fn evalsha_calls(port: u16) -> u64 {
    let info = raw_command(port, &["INFO", "commandstats"]).expect("INFO");
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().expect("calls"))
}

/// Under concurrency, checks share script calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_share_script_calls() {
    let server = tokio::task::spawn_blocking(|| RedisServer::start().expect("start redis"))
        .await
        .expect("start task");
    let store = store_on(RedisTopology::Standalone(server.url()), "batch-calls").await;
    let policy = Policy::gcra(1_000_000, Duration::from_secs(3600)).expect("policy");
    // Loads the script.
    store
        .check(&[LimitCheck::new("warm", &policy, 1)], Mode::Consume)
        .await
        .expect("check");
    let before = evalsha_calls(server.port());
    let checks = 512;
    let tasks: Vec<_> = (0..checks)
        .map(|i| {
            let store = store.clone();
            let policy = policy.clone();
            tokio::spawn(async move {
                store
                    .check(
                        &[LimitCheck::new(&format!("user:{i}"), &policy, 1)],
                        Mode::Consume,
                    )
                    .await
                    .expect("check")
                    .allowed()
            })
        })
        .collect();
    for task in tasks {
        assert!(task.await.expect("task"));
    }
    let calls = evalsha_calls(server.port()) - before;
    assert!(calls < checks, "{calls} script calls for {checks} checks");
}

/// Writes each named state at `key(name)`: a string value (with a ten-minute expiry), a hash
/// for the name "hash", nothing for `None`.
fn write_states(port: u16, states: &[(&str, Option<String>)], key: impl Fn(&str) -> String) {
    for (name, value) in states {
        let k = key(name);
        match (*name, value) {
            ("hash", _) => {
                raw_command(port, &["HSET", &k, "t", "1"]).expect("HSET");
            }
            (_, Some(value)) => {
                raw_command(port, &["SET", &k, value, "PX", "600000"]).expect("SET");
            }
            (_, None) => {}
        }
    }
}

/// The limiter script's fast path (independent mode on the server's TIME, gcra checks that
/// consume) decides and writes exactly as its general code. One batch runs twice on twin keys
/// holding the same states: once on the server's TIME, where its gcra consumes take the fast
/// path, and once with every check given that call's time, where every check takes the general
/// code. The replies and the states left behind must be the same. The batch holds every kind of
/// state the fast path meets (none, an arrival time passed, one to come that admits, one that
/// denies, corrupt values, a key of the wrong type, a key checked twice) and checks it hands to
/// the general code in the middle (a peek, a cost above the burst, another algorithm).
#[test]
fn the_fast_path_decides_as_the_general_code() {
    const SCRIPT: &str = include_str!("../src/limiter.lua");
    let port = shared_standalone().port();
    let prefix = store_prefix("batch-fast-path");
    let interval: u64 = 720_000_000;
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_micros() as u64;
    // Initial states by name: a string value, or None for no key. "hash" is made a hash.
    let states: Vec<(&str, Option<String>)> = vec![
        ("absent", None),
        ("passed", Some((wall - 10_000_000).to_string())),
        ("zeros", Some("0000000000000005".into())),
        ("admits", Some((wall + interval).to_string())),
        ("denies", Some((wall + 5 * interval).to_string())),
        ("max", Some("9007199254740992".into())),
        ("exp", Some("1e3".into())),
        ("space", Some(" 5".into())),
        ("hex", Some("0x10".into())),
        ("empty", Some(String::new())),
        ("word", Some("abc".into())),
        ("long", Some("12345678901234567".into())),
        ("big", Some("9999999999999999".into())),
        ("sign", Some("+5".into())),
        ("hash", Some("1".into())),
        ("window", None),
        ("other", None),
        ("late", None),
    ];
    // Their number, then each: 1 gcra (burst 5), 2 fixed window (3 per hour), 3 gcra (burst 2,
    // interval 1 s).
    let policies = [
        "3",
        "6",
        "5",
        &interval.to_string(),
        "1",
        "3",
        "3600000000",
        "6",
        "2",
        "1000000",
    ]
    .map(str::to_owned);
    // The checks: (state name, policy spec (negative: a peek), cost).
    let mut checks: Vec<(&str, i64, u64)> = states
        .iter()
        .filter(|(name, _)| !matches!(*name, "window" | "other" | "late"))
        .map(|(name, _)| (*name, 1, 1))
        .collect();
    checks.extend([
        ("passed", 1, 1),
        ("admits", -1, 1),
        ("absent", 1, 6),
        ("window", 2, 1),
        ("other", 3, 2),
        ("late", 1, 3),
        ("exp", 1, 1),
        ("late", 1, 1),
    ]);
    let key = |set: &str, name: &str| format!("{prefix}{{{set}}}:{name}");
    for set in ["fast", "general"] {
        write_states(port, &states, |name| key(set, name));
    }
    let run = |set: &str, now: Option<&str>| -> Vec<String> {
        let keys: Vec<String> = checks.iter().map(|(name, _, _)| key(set, name)).collect();
        let count = keys.len().to_string();
        let mut args: Vec<String> = vec!["EVAL".into(), SCRIPT.into(), count];
        args.extend(keys);
        args.extend(["independent".into(), now.map_or("", |_| "caller").into()]);
        args.push("60000".into());
        args.extend(policies.iter().cloned());
        for (_, spec, cost) in &checks {
            args.push(spec.to_string());
            args.push(cost.to_string());
            if let Some(now) = now {
                args.push(now.into());
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let reply = raw_command(port, &args).expect("EVAL");
        assert!(!reply.starts_with("ERR"), "{reply}");
        reply.lines().map(str::to_owned).collect()
    };
    let fast = run("fast", None);
    let now = fast[0].clone();
    assert!(now.parse::<u64>().expect("now") >= wall, "{now}");
    let general = run("general", Some(&now));
    let fast_rest: Vec<String> = fast[1..]
        .iter()
        .map(|v| v.replace("{fast}", "{general}"))
        .collect();
    assert_eq!(fast_rest, general[1..], "now {now}");
    // Admitted at once, denied (six values), refused (one string): all were met.
    assert!(general.iter().any(|v| v.contains("corrupt state")));
    assert!(general.iter().any(|v| v.contains("WRONGTYPE")));
    assert!(general.iter().any(|v| v == "-1"));
    // The states left behind: the same values, each (but the hash) with an expiry.
    for (name, _) in &states {
        let (f, g) = (key("fast", name), key("general", name));
        let read = |k: &str| {
            let kind = raw_command(port, &["TYPE", k]).expect("TYPE");
            let value = if kind == "hash" {
                raw_command(port, &["HGETALL", k]).expect("HGETALL")
            } else {
                raw_command(port, &["GET", k]).expect("GET")
            };
            let ttl: i64 = raw_command(port, &["PTTL", k])
                .expect("PTTL")
                .parse()
                .expect("ttl");
            (kind, value, ttl)
        };
        let ((fk, fv, ft), (gk, gv, gt)) = (read(&f), read(&g));
        assert_eq!((&fk, &fv), (&gk, &gv), "{name}");
        if *name == "hash" {
            // Of the wrong type: untouched (it was made without an expiry).
            assert_eq!((ft, gt), (-1, -1));
        } else {
            assert!(
                ft > 0 && gt > 0 && (ft - gt).abs() < 5_000,
                "{name}: {ft} {gt}"
            );
        }
    }
}

/// A batch whose checks share one policy, mode and cost sends them once (`same`), and the
/// script reads that one pair for every check: it decides and writes exactly as the per-check
/// form. Each shared pair runs on twin keys holding the same states: once as `same` on the
/// server's TIME, once in the per-check form at that call's time (the general code). The pairs
/// cover the fast path (a gcra consume) and the general code (a peek, a cost above the burst,
/// another algorithm).
#[test]
fn checks_sent_once_for_all_decide_as_checks_sent_each() {
    const SCRIPT: &str = include_str!("../src/limiter.lua");
    let port = shared_standalone().port();
    let prefix = store_prefix("batch-same");
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_micros() as u64;
    let interval: u64 = 720_000_000;
    let states: Vec<(&str, Option<String>)> = vec![
        ("absent", None),
        ("passed", Some((wall - 10_000_000).to_string())),
        ("admits", Some((wall + interval).to_string())),
        ("denies", Some((wall + 5 * interval).to_string())),
        ("word", Some("abc".into())),
        ("hash", Some("1".into())),
    ];
    // 1: gcra (burst 5); 2: fixed window (3 per hour).
    let policies =
        ["2", "6", "5", &interval.to_string(), "1", "3", "3600000000"].map(str::to_owned);
    let names: Vec<&str> = states
        .iter()
        .map(|(name, _)| *name)
        .chain(["absent", "passed"])
        .collect();
    for (case, (spec, cost)) in [(1, 1), (-1, 1), (1, 6), (2, 1), (1, 2)]
        .into_iter()
        .enumerate()
    {
        let key = |set: &str, name: &str| format!("{prefix}{case}:{{{set}}}:{name}");
        for set in ["same", "each"] {
            write_states(port, &states, |name| key(set, name));
        }
        let run = |set: &str, now: Option<&str>| -> Vec<String> {
            let mut args: Vec<String> = vec!["EVAL".into(), SCRIPT.into(), names.len().to_string()];
            args.extend(names.iter().map(|name| key(set, name)));
            args.extend([
                "independent".into(),
                now.map_or("same", |_| "caller").into(),
            ]);
            args.push("60000".into());
            args.extend(policies.iter().cloned());
            match now {
                None => args.extend([spec.to_string(), cost.to_string()]),
                Some(now) => {
                    for _ in &names {
                        args.extend([spec.to_string(), cost.to_string(), now.to_owned()]);
                    }
                }
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let reply = raw_command(port, &args).expect("EVAL");
            assert!(!reply.starts_with("ERR"), "{reply}");
            reply.lines().map(str::to_owned).collect()
        };
        let same = run("same", None);
        let now = same[0].clone();
        assert!(now.parse::<u64>().expect("now") >= wall, "{now}");
        let each = run("each", Some(&now));
        let same_rest: Vec<String> = same[1..]
            .iter()
            .map(|v| v.replace("{same}", "{each}"))
            .collect();
        assert_eq!(same_rest, each[1..], "spec {spec}, cost {cost}, now {now}");
        // More than one value per check: every check was decided (not one, read n times).
        assert!(each.len() > names.len(), "{each:?}");
        for (name, _) in &states {
            let read = |set: &str| {
                let k = key(set, name);
                let ttl: i64 = raw_command(port, &["PTTL", &k])
                    .expect("PTTL")
                    .parse()
                    .expect("ttl");
                let value = if *name == "hash" {
                    raw_command(port, &["HGETALL", &k]).expect("HGETALL")
                } else {
                    raw_command(port, &["GET", &k]).expect("GET")
                };
                (value, ttl > 0 || ttl == -1, ttl == -2)
            };
            assert_eq!(
                read("same"),
                read("each"),
                "spec {spec}, cost {cost}: {name}"
            );
        }
    }
}

/// A store outlives the runtime it was first used on: the coalescing task that runtime ran
/// goes with it, and the next check, on another runtime, starts another (a request queued for
/// a task that is gone would otherwise wait for nothing).
#[test]
fn a_store_works_on_a_new_runtime_after_its_first_runtime_is_gone() {
    let url = shared_standalone().url();
    let policy = Policy::gcra(1_000, Duration::from_secs(60)).expect("policy");
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    };
    let first = runtime();
    let store = first.block_on(store_on(RedisTopology::Standalone(url), "batch-runtimes"));
    let check = |store: RedisStore| {
        let policy = policy.clone();
        async move {
            let checks = [LimitCheck::new("a", &policy, 1)];
            store.check(&checks, Mode::Consume).await
        }
    };
    let verdict = first
        .block_on(check(store.clone()))
        .expect("check on the first runtime");
    assert!(verdict.allowed());
    drop(first);
    let second = runtime();
    let verdict = second
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(10), check(store.clone())).await
        })
        .expect("answered, not left waiting")
        .expect("check on the second runtime");
    assert!(verdict.allowed());
    assert_eq!(verdict.decisions[0].remaining, 998);
}
