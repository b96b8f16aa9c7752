//! The limiter Lua script: its arguments, its invocation and the parsing of its reply.
//!
//! The script (`limiter.lua`) is `statehouse_core::algorithm::decide` for a batch of checks,
//! run atomically on the server; see the comments at its top for the argument layout.

use std::sync::LazyLock;

use redis::{Script, ScriptInvocation, Value};
use statehouse_core::{Decision, Mode, Policy};

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

/// One check as the script takes it: the storage key and the seven numeric arguments.
#[derive(Debug, Clone)]
pub(crate) struct ScriptCheck {
    /// The storage key (`{prefix}{{{encoded key}}}:{policy suffix}`).
    pub(crate) storage_key: String,
    /// The policy's capacity, reported as the decision's `limit`.
    pub(crate) capacity: u64,
    args: [u64; 7],
}

impl ScriptCheck {
    pub(crate) fn new(storage_key: String, policy: &Policy, cost: u64) -> Self {
        ScriptCheck {
            storage_key,
            capacity: policy.capacity(),
            args: [
                u64::from(policy.algorithm().code()),
                policy.limit(),
                policy.period_micros(),
                policy.burst(),
                policy.interval_micros(),
                policy.max_delay_micros(),
                cost,
            ],
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
        decisions.push(Decision::from_parts(
            allowed,
            check.capacity,
            non_negative(remaining, "remaining")?,
            non_negative(reset_after, "reset_after")?,
            retry_after,
            non_negative(delay, "delay")?,
        ));
    }
    Ok(ScriptReply { now, decisions })
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

    fn check() -> ScriptCheck {
        let policy = Policy::gcra(10, Duration::from_secs(1)).expect("valid policy");
        ScriptCheck::new("sh:rl:{k}:gcra:1000000".into(), &policy, 1)
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
