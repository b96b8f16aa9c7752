//! The limiter Lua script: its arguments, its invocation and the parsing of its reply.
//!
//! The script (`limiter.lua`) is `statehouse_core::algorithm::decide` for a batch of checks,
//! run atomically on the server; see the comments at its top for the argument layout.

use std::sync::LazyLock;

use redis::{Arg, Cmd, Script, ScriptInvocation, Value};
use statehouse_core::{Algorithm, Decision, Mode, Policy};

use crate::error::unexpected_reply;

/// The script, hashed once. `Script` runs `EVALSHA` and loads the script on `NOSCRIPT`; on
/// Redis Cluster the load goes to every primary.
static LIMITER: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("limiter.lua")));

/// Values the script returns per check.
const FIELDS_PER_CHECK: usize = 5;

/// What the script is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScriptMode {
    /// Decide every check; write every new state only if every check admits.
    Consume,
    /// Decide as a peek; never write.
    Peek,
    /// Decide as a consume would; never write. Reports the checks of a cross-slot batch that
    /// were not consumed because another slot denied.
    DryRun,
    /// Undo a consumption made at a given time.
    Refund,
}

impl ScriptMode {
    fn as_arg(self) -> &'static str {
        match self {
            ScriptMode::Consume => "consume",
            ScriptMode::Peek => "peek",
            ScriptMode::DryRun => "dry_run",
            ScriptMode::Refund => "refund",
        }
    }
}

impl From<Mode> for ScriptMode {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Consume => ScriptMode::Consume,
            Mode::Peek => ScriptMode::Peek,
        }
    }
}

/// One check as the script takes it: the storage key and the four numeric arguments
/// (algorithm code, the two policy parameters the algorithm needs, cost; see `limiter.lua`).
#[derive(Debug, Clone)]
pub(crate) struct ScriptCheck {
    /// The storage key (`{prefix}{{{encoded key}}}:{policy suffix}`).
    pub(crate) storage_key: String,
    /// The policy's capacity, reported as the decision's `limit`.
    pub(crate) capacity: u64,
    args: [u64; 4],
}

impl ScriptCheck {
    pub(crate) fn new(storage_key: String, policy: &Policy, cost: u64) -> Self {
        let algorithm = policy.algorithm();
        let (a, b) = match algorithm {
            Algorithm::TokenBucket | Algorithm::Gcra => (policy.burst(), policy.interval_micros()),
            Algorithm::LeakyBucket => (policy.max_delay_micros(), policy.interval_micros()),
            // The fixed window, the sliding log and the sliding counter (and any later
            // algorithm, which the script refuses by its code).
            _ => (policy.limit(), policy.period_micros()),
        };
        ScriptCheck {
            storage_key,
            capacity: policy.capacity(),
            args: [u64::from(algorithm.code()), a, b, cost],
        }
    }
}

/// What the script answered for a batch: the time it used and one decision per check.
#[derive(Debug, Clone)]
pub(crate) struct ScriptReply {
    /// The time (µs since the epoch) the script decided at: the server's `TIME` or the caller's.
    pub(crate) now: u64,
    /// One decision per check, in order.
    pub(crate) decisions: Vec<Decision>,
}

/// Builds the invocation of the script for `checks`. `now` is `None` to let the script read the
/// server's `TIME`.
pub(crate) fn invocation(
    mode: ScriptMode,
    now: Option<u64>,
    slack_ms: u64,
    checks: &[ScriptCheck],
) -> ScriptInvocation<'static> {
    let mut inv = LIMITER.prepare_invoke();
    inv.arg(mode.as_arg());
    match now {
        Some(now) => inv.arg(now),
        None => inv.arg(""),
    };
    inv.arg(slack_ms);
    for check in checks {
        inv.key(check.storage_key.as_str());
        inv.arg(&check.args[..]);
    }
    inv
}

/// One check of an `independent` call: a caller's single check with its own mode and time.
pub(crate) struct IndependentCheck<'a> {
    pub(crate) check: &'a ScriptCheck,
    pub(crate) mode: Mode,
    /// The caller's time, or `None` for the server's `TIME`.
    pub(crate) now: Option<u64>,
}

/// Builds the `independent` call as one `EVALSHA` command: every check is decided and
/// committed on its own, in order, as if each were a call of its own (see `limiter.lua`). The
/// batch's distinct policies are sent once, and each check names its policy by number; when
/// every check shares one policy, mode and cost (the checks of one limiter, on the server's
/// `TIME`), that number and cost are sent once for all (`same`), so a check is just its key.
///
/// A [`Cmd`] keeps its arguments in one buffer, where a [`ScriptInvocation`] makes a vector per
/// argument and copies them all into a `Cmd` again: three allocations and copies per check
/// saved. If the server answers `NOSCRIPT`, [`invocation_of`] turns the command into an
/// invocation, which loads the script and retries.
pub(crate) fn independent_command(slack_ms: u64, checks: &[IndependentCheck<'_>]) -> Cmd {
    // The distinct (code, a, b) triples (few: a batch mostly shares one policy).
    let mut policies: Vec<[u64; 3]> = Vec::new();
    let mut key_bytes = 0;
    for c in checks {
        let [code, a, b, _] = c.check.args;
        if !policies.contains(&[code, a, b]) {
            policies.push([code, a, b]);
        }
        key_bytes += c.check.storage_key.len();
    }
    let caller_times = checks.iter().any(|c| c.now.is_some());
    // One limiter's coalesced checks (the common batch): one policy, mode and cost, sent once.
    let same = !caller_times
        && checks.split_first().is_some_and(|(first, rest)| {
            rest.iter()
                .all(|c| c.mode == first.mode && c.check.args == first.check.args)
        });
    let per_check = match (caller_times, same) {
        (true, _) => 4,
        (false, true) => 1,
        (false, false) => 3,
    };
    let arg_count = 9 + 3 * policies.len() + per_check * checks.len();
    // Keys, the hash, and up to 20 digits per number.
    let mut cmd = Cmd::with_capacity(arg_count, key_bytes + 64 + 20 * arg_count);
    cmd.arg("EVALSHA").arg(LIMITER.get_hash()).arg(checks.len());
    for c in checks {
        cmd.arg(c.check.storage_key.as_str());
    }
    cmd.arg("independent")
        .arg(match (caller_times, same) {
            (true, _) => "caller",
            (false, true) => "same",
            (false, false) => "",
        })
        .arg(slack_ms)
        .arg(policies.len());
    for policy in &policies {
        cmd.arg(&policy[..]);
    }
    // With `same`, the first check's number and cost stand for every check.
    let per_check_args = if same { &checks[..1] } else { checks };
    for c in per_check_args {
        let [code, a, b, cost] = c.check.args;
        // Present: every check's triple was collected above. At most MAX_BATCH policies, so
        // the cast cannot wrap.
        let number = policies
            .iter()
            .position(|p| *p == [code, a, b])
            .map_or(0, |index| index as i64 + 1);
        let spec = match c.mode {
            Mode::Consume => number,
            Mode::Peek => -number,
        };
        cmd.arg(spec).arg(cost);
        if caller_times {
            match c.now {
                Some(now) => cmd.arg(now),
                None => cmd.arg(""),
            };
        }
    }
    cmd
}

/// The `EVALSHA` command of [`independent_command`] as a script invocation with the same keys
/// and arguments, which loads the script when the server answers `NOSCRIPT` (on Redis Cluster,
/// on every primary) and calls it again.
pub(crate) fn invocation_of(cmd: &Cmd) -> ScriptInvocation<'static> {
    let mut inv = LIMITER.prepare_invoke();
    let mut args = cmd.args_iter().filter_map(|arg| match arg {
        Arg::Simple(bytes) => Some(bytes),
        _ => None,
    });
    // EVALSHA, the hash, the number of keys.
    let keys = args
        .nth(2)
        .and_then(|n| std::str::from_utf8(n).ok()?.parse::<usize>().ok())
        .unwrap_or(0);
    for (i, arg) in args.enumerate() {
        if i < keys {
            inv.key(arg);
        } else {
            inv.arg(arg);
        }
    }
    inv
}

/// Parses the reply of an `independent` call over checks with the given capacities: one result
/// per check, an [`Error::Backend`](statehouse_core::Error::Backend) for a check the script
/// refused (corrupt state, a key of the wrong type). An `Err` of the whole is a reply of the
/// wrong shape.
///
/// Each check's values are packed (see `limiter.lua`): `remaining, reset_after` for a check
/// admitted without delay, `-1` and the five values otherwise, the error message alone for a
/// refused check.
pub(crate) fn parse_independent_reply(
    value: Value,
    capacities: impl ExactSizeIterator<Item = u64>,
) -> statehouse_core::Result<Vec<statehouse_core::Result<Decision>>> {
    let Value::Array(items) = value else {
        return Err(unexpected_reply(format!(
            "expected an array, got {value:?}"
        )));
    };
    let count = capacities.len();
    match items.first() {
        Some(Value::Int(now)) if *now >= 0 => {}
        other => return Err(unexpected_reply(format!("now = {other:?}"))),
    }
    let short = || {
        unexpected_reply(format!(
            "a reply of {} values for {count} checks",
            items.len()
        ))
    };
    let int = |v: &Value| match v {
        Value::Int(i) => Ok(*i),
        other => Err(unexpected_reply(format!(
            "expected integers, got {other:?}"
        ))),
    };
    let mut out = Vec::with_capacity(count);
    let mut rest = &items[1..];
    for capacity in capacities {
        let (first, tail) = rest.split_first().ok_or_else(short)?;
        let refused = match first {
            Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        };
        if let Some(message) = refused {
            out.push(Err(statehouse_core::Error::Backend {
                message: format!("the limiter script refused the check: {message}"),
                source: None,
            }));
            rest = tail;
            continue;
        }
        let fields = match int(first)? {
            -1 => {
                let (fields, tail) = tail.split_at_checked(FIELDS_PER_CHECK).ok_or_else(short)?;
                rest = tail;
                let mut ints = [0i64; FIELDS_PER_CHECK];
                for (slot, v) in ints.iter_mut().zip(fields) {
                    *slot = int(v)?;
                }
                ints
            }
            remaining => {
                let (reset_after, tail) = tail.split_first().ok_or_else(short)?;
                rest = tail;
                [1, remaining, int(reset_after)?, -1, 0]
            }
        };
        out.push(Ok(decision(capacity, fields)?));
    }
    if !rest.is_empty() {
        return Err(unexpected_reply(format!(
            "{} values left over after {count} checks",
            rest.len()
        )));
    }
    Ok(out)
}

/// Parses the script's reply for `checks`, refusing any shape the script does not produce.
pub(crate) fn parse_reply(
    value: Value,
    checks: &[ScriptCheck],
) -> statehouse_core::Result<ScriptReply> {
    let Value::Array(items) = value else {
        return Err(unexpected_reply(format!(
            "expected an array, got {value:?}"
        )));
    };
    let expected = 1 + checks.len() * FIELDS_PER_CHECK;
    if items.len() != expected {
        return Err(unexpected_reply(format!(
            "expected {expected} values for {} checks, got {}",
            checks.len(),
            items.len()
        )));
    }
    let ints = items
        .iter()
        .map(|v| match v {
            Value::Int(i) => Ok(*i),
            other => Err(unexpected_reply(format!(
                "expected integers, got {other:?}"
            ))),
        })
        .collect::<statehouse_core::Result<Vec<i64>>>()?;
    let now = non_negative(ints[0], "now")?;
    let mut decisions = Vec::with_capacity(checks.len());
    for (check, fields) in checks.iter().zip(ints[1..].chunks_exact(FIELDS_PER_CHECK)) {
        let &[allowed, remaining, reset_after, retry_after, delay] = fields else {
            return Err(unexpected_reply("a short decision"));
        };
        decisions.push(decision(
            check.capacity,
            [allowed, remaining, reset_after, retry_after, delay],
        )?);
    }
    Ok(ScriptReply { now, decisions })
}

/// One decision from the script's five integers for it.
fn decision(
    capacity: u64,
    [allowed, remaining, reset_after, retry_after, delay]: [i64; FIELDS_PER_CHECK],
) -> statehouse_core::Result<Decision> {
    let allowed = match allowed {
        0 => false,
        1 => true,
        other => return Err(unexpected_reply(format!("allowed = {other}"))),
    };
    let retry_after = match (allowed, retry_after) {
        (true, -1) => None,
        (false, r) if r >= 0 => Some(r as u64),
        (_, r) => {
            return Err(unexpected_reply(format!(
                "retry_after = {r} with allowed = {allowed}"
            )));
        }
    };
    Ok(Decision::from_parts(
        allowed,
        capacity,
        non_negative(remaining, "remaining")?,
        non_negative(reset_after, "reset_after")?,
        retry_after,
        non_negative(delay, "delay")?,
    ))
}

/// Parses the refund's reply (`{ now }`).
pub(crate) fn parse_refund_reply(value: Value) -> statehouse_core::Result<()> {
    match value {
        Value::Array(items) if matches!(items.as_slice(), [Value::Int(now)] if *now >= 0) => Ok(()),
        other => Err(unexpected_reply(format!("refund answered {other:?}"))),
    }
}

fn non_negative(v: i64, what: &str) -> statehouse_core::Result<u64> {
    u64::try_from(v).map_err(|_| unexpected_reply(format!("{what} = {v}")))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn gcra_policy() -> Policy {
        Policy::gcra(10, Duration::from_secs(1)).expect("valid policy")
    }

    fn check() -> ScriptCheck {
        ScriptCheck::new("sh:rl:{k}:gcra:1000000".into(), &gcra_policy(), 1)
    }

    #[test]
    fn the_independent_command_and_its_invocation_carry_the_same_call() {
        let gcra = check();
        let other = ScriptCheck::new(
            "sh:rl:{j}:fixed_window:60000000".into(),
            &Policy::fixed_window(5, Duration::from_secs(60)).expect("valid policy"),
            2,
        );
        let checks = [
            IndependentCheck {
                check: &gcra,
                mode: Mode::Consume,
                now: None,
            },
            IndependentCheck {
                check: &other,
                mode: Mode::Peek,
                now: Some(7),
            },
            IndependentCheck {
                check: &gcra,
                mode: Mode::Peek,
                now: None,
            },
        ];
        let cmd = independent_command(3, &checks);
        let args: Vec<Vec<u8>> = cmd
            .args_iter()
            .map(|a| match a {
                Arg::Simple(bytes) => bytes.to_vec(),
                _ => panic!("no cursor"),
            })
            .collect();
        let expected: Vec<&[u8]> = vec![
            b"EVALSHA",
            LIMITER.get_hash().as_bytes(),
            b"3",
            b"sh:rl:{k}:gcra:1000000",
            b"sh:rl:{j}:fixed_window:60000000",
            b"sh:rl:{k}:gcra:1000000",
            b"independent",
            b"caller",
            b"3",
            b"2",
            b"6",
            b"10",
            b"100000",
            b"1",
            b"5",
            b"60000000",
            b"1",
            b"1",
            b"",
            b"-2",
            b"2",
            b"7",
            b"-1",
            b"1",
            b"",
        ];
        assert_eq!(args, expected);
        // The invocation (for NOSCRIPT) has the same keys and arguments (its Debug shows only
        // their counts; redis-rs builds its EVALSHA from them in order).
        let shown = format!("{:?}", invocation_of(&cmd));
        assert!(
            shown.contains("args: 19") && shown.contains("keys: 3"),
            "{shown}"
        );
    }

    /// The arguments after the keys of an `independent` command.
    fn script_args(cmd: &Cmd, keys: usize) -> Vec<String> {
        cmd.args_iter()
            .skip(3 + keys)
            .map(|a| match a {
                Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                _ => panic!("no cursor"),
            })
            .collect()
    }

    #[test]
    fn checks_sharing_policy_mode_and_cost_send_them_once() {
        let gcra = check();
        let twice = ScriptCheck::new("sh:rl:{k}:gcra:1000000".into(), &gcra_policy(), 2);
        let on_server = |check, mode| IndependentCheck {
            check,
            mode,
            now: None,
        };
        // The arguments after the keys: the mode, the form, the slack, the one policy, then
        // `tail` (the shared number and cost, or a number and cost per check).
        let expected = |form: &str, tail: &[&str]| -> Vec<String> {
            ["independent", form, "0", "1", "6", "10", "100000"]
                .iter()
                .chain(tail)
                .map(|s| (*s).to_owned())
                .collect()
        };
        // One policy, mode and cost: `same`, the number and cost once; a lone check too.
        let same = [
            on_server(&gcra, Mode::Consume),
            on_server(&gcra, Mode::Consume),
        ];
        let shared = expected("same", &["1", "1"]);
        assert_eq!(script_args(&independent_command(0, &same), 2), shared);
        assert_eq!(script_args(&independent_command(0, &same[..1]), 1), shared);
        // Another cost, or another mode: a number and cost per check.
        let costs = [
            on_server(&gcra, Mode::Consume),
            on_server(&twice, Mode::Consume),
        ];
        assert_eq!(
            script_args(&independent_command(0, &costs), 2),
            expected("", &["1", "1", "1", "2"])
        );
        let modes = [
            on_server(&gcra, Mode::Consume),
            on_server(&gcra, Mode::Peek),
        ];
        assert_eq!(
            script_args(&independent_command(0, &modes), 2),
            expected("", &["1", "1", "-1", "1"])
        );
    }

    #[test]
    fn parses_a_well_formed_reply() {
        let reply = Value::Array(
            [1_000, 1, 9, 100_000, -1, 0]
                .into_iter()
                .map(Value::Int)
                .collect(),
        );
        let parsed = parse_reply(reply, &[check()]).expect("parses");
        assert_eq!(parsed.now, 1_000);
        assert_eq!(
            parsed.decisions,
            vec![Decision::from_parts(true, 10, 9, 100_000, None, 0)]
        );
    }

    #[test]
    fn parses_an_independent_reply_with_a_refused_check() {
        let reply = Value::Array(vec![
            Value::Int(1_000),
            // Denied: the full form.
            Value::Int(-1),
            Value::Int(0),
            Value::Int(0),
            Value::Int(50),
            Value::Int(70),
            Value::Int(0),
            // Refused: the message alone.
            Value::BulkString(b"WRONGTYPE Operation against a key".to_vec()),
            // Admitted at once: remaining and reset_after.
            Value::Int(9),
            Value::Int(100_000),
            // Admitted with a delay (leaky bucket): the full form.
            Value::Int(-1),
            Value::Int(1),
            Value::Int(3),
            Value::Int(400),
            Value::Int(-1),
            Value::Int(200),
        ]);
        let parsed = parse_independent_reply(reply, [10, 10, 10, 5].into_iter()).expect("parses");
        assert_eq!(parsed.len(), 4);
        assert_eq!(
            parsed[0].as_ref().expect("decided"),
            &Decision::from_parts(false, 10, 0, 50, Some(70), 0)
        );
        let err = parsed[1].as_ref().expect_err("refused");
        assert!(
            matches!(err, statehouse_core::Error::Backend { message, .. } if message.contains("WRONGTYPE")),
            "{err:?}"
        );
        assert_eq!(
            parsed[2].as_ref().expect("decided"),
            &Decision::from_parts(true, 10, 9, 100_000, None, 0)
        );
        assert_eq!(
            parsed[3].as_ref().expect("decided"),
            &Decision::from_parts(true, 5, 3, 400, None, 200)
        );
        // Short, overlong or malformed replies are errors of the whole, never a panic.
        let ints = |v: &[i64]| Value::Array(v.iter().copied().map(Value::Int).collect());
        for (bad, checks) in [
            (ints(&[1, 1]), 1),
            (ints(&[1, 1, 2, 3]), 1),
            (ints(&[1, 1, 2]), 2),
            (ints(&[1, -1, 1, 2, 3, -1]), 1),
            (ints(&[1, -2, 5]), 1),
            (ints(&[-1, 1, 2]), 1),
            (ints(&[]), 0),
            (Value::Nil, 1),
        ] {
            let shown = format!("{bad:?}");
            assert!(
                parse_independent_reply(bad, std::iter::repeat_n(10, checks)).is_err(),
                "{shown}"
            );
        }
    }

    #[test]
    fn refuses_every_other_shape_without_panicking() {
        let int_array = |v: &[i64]| Value::Array(v.iter().copied().map(Value::Int).collect());
        let bad = [
            Value::Nil,
            Value::Okay,
            Value::Int(3),
            Value::Array(vec![]),
            int_array(&[1, 1, 9, 0, -1]),
            int_array(&[1, 1, 9, 0, -1, 0, 7]),
            int_array(&[-1, 1, 9, 0, -1, 0]),
            int_array(&[1, 2, 9, 0, -1, 0]),
            int_array(&[1, 1, -9, 0, -1, 0]),
            int_array(&[1, 1, 9, 0, 5, 0]),
            int_array(&[1, 0, 9, 0, -1, 0]),
            int_array(&[1, 1, 9, 0, -1, -3]),
            Value::Array(vec![
                Value::Int(1),
                Value::BulkString(b"1".to_vec()),
                Value::Int(0),
                Value::Int(0),
                Value::Int(-1),
                Value::Int(0),
            ]),
        ];
        for value in bad {
            let shown = format!("{value:?}");
            let err = parse_reply(value, &[check()]).expect_err(&shown);
            assert!(
                matches!(err, statehouse_core::Error::Backend { .. }),
                "{shown}"
            );
        }
        assert!(parse_refund_reply(Value::Nil).is_err());
        assert!(parse_refund_reply(int_array(&[5])).is_ok());
    }
}
