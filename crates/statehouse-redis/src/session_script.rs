//! The session Lua script: its invocations and the parsing of its replies.
//!
//! The script (`session.lua`) runs each [`SessionStore`](statehouse_core::session::SessionStore)
//! operation in one atomic step; see the comments at its top for the key layout, the argument
//! layout and the status codes.

use std::sync::LazyLock;

use redis::{Script, ScriptInvocation, Value};
use statehouse_core::Result;
use statehouse_core::session::{SessionConfig, SessionId};

use crate::error::unexpected_reply;

/// The script, hashed once. `Script` runs `EVALSHA` and loads the script on `NOSCRIPT`.
static SESSION: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("session.lua")));

/// What the script found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// Unknown, revoked, or an alias past its grace.
    Gone,
    /// Done.
    Done,
    /// Found expired and deleted.
    Expired,
    /// The new id is taken: draw another token.
    Collision,
}

/// The first two values of every reply but `list` and `revoke_all`.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) now: u64,
    pub(crate) status: Status,
    /// The values after the status.
    pub(crate) rest: Vec<Value>,
}

/// Starts an invocation of `op` with the common arguments.
pub(crate) fn invocation(
    op: &str,
    now: Option<u64>,
    slack_ms: u64,
    config: &SessionConfig,
    key_base: &str,
) -> ScriptInvocation<'static> {
    let mut inv = SESSION.prepare_invoke();
    inv.arg(op);
    match now {
        Some(now) => inv.arg(now),
        None => inv.arg(""),
    };
    inv.arg(slack_ms)
        .arg(config.idle_micros())
        .arg(config.absolute_micros())
        .arg(config.touch_after_micros())
        .arg(config.rotation_grace_micros())
        .arg(key_base);
    inv
}

fn int(value: &Value, what: &str) -> Result<i64> {
    match value {
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| unexpected_reply(format!("{what} is not an integer"))),
        other => Err(unexpected_reply(format!(
            "{what}: expected an integer, got {other:?}"
        ))),
    }
}

pub(crate) fn uint(value: &Value, what: &str) -> Result<u64> {
    let i = int(value, what)?;
    u64::try_from(i).map_err(|_| unexpected_reply(format!("{what} = {i}")))
}

pub(crate) fn bytes(value: Value, what: &str) -> Result<Vec<u8>> {
    match value {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        other => Err(unexpected_reply(format!(
            "{what}: expected a string, got {other:?}"
        ))),
    }
}

pub(crate) fn string(value: Value, what: &str) -> Result<String> {
    String::from_utf8(bytes(value, what)?).map_err(|_| corrupt(format!("{what} is not UTF-8")))
}

pub(crate) fn session_id(value: Value, what: &str) -> Result<SessionId> {
    SessionId::parse(&string(value, what)?)
        .map_err(|_| unexpected_reply(format!("{what} is not a session id")))
}

pub(crate) fn array(value: Value, what: &str) -> Result<Vec<Value>> {
    match value {
        Value::Array(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(unexpected_reply(format!(
            "{what}: expected an array, got {other:?}"
        ))),
    }
}

/// An [`statehouse_core::Error::Backend`] for stored data that does not make a session.
pub(crate) fn corrupt(what: impl Into<String>) -> statehouse_core::Error {
    statehouse_core::Error::Backend {
        message: format!("corrupt session data: {}", what.into()),
        source: None,
    }
}

/// Parses `{ now, status, ... }`.
pub(crate) fn parse_reply(value: Value) -> Result<Reply> {
    let mut items = array(value, "session script reply")?.into_iter();
    let (Some(now), Some(status)) = (items.next(), items.next()) else {
        return Err(unexpected_reply("a session reply shorter than two values"));
    };
    let now = uint(&now, "now")?;
    let status = match int(&status, "status")? {
        0 => Status::Gone,
        1 => Status::Done,
        2 => Status::Expired,
        3 => Status::Collision,
        // One load of a load_many that the script refused: its message follows.
        4 => {
            let message = items
                .next()
                .map(|m| string(m, "error message"))
                .transpose()?
                .unwrap_or_default();
            return Err(statehouse_core::Error::Backend {
                message,
                source: None,
            });
        }
        other => return Err(unexpected_reply(format!("status = {other}"))),
    };
    Ok(Reply {
        now,
        status,
        rest: items.collect(),
    })
}

/// Parses `{ now, list, list }` (the replies of `list` and `revoke_all`).
pub(crate) fn parse_lists(value: Value) -> Result<(u64, Vec<Value>, Vec<Value>)> {
    let items = array(value, "session script reply")?;
    let [now, first, second]: [Value; 3] = items
        .try_into()
        .map_err(|_| unexpected_reply("expected three values"))?;
    Ok((
        uint(&now, "now")?,
        array(first, "first list")?,
        array(second, "second list")?,
    ))
}

/// Splits a flat `id, user, id, user ...` list of expired sessions.
pub(crate) fn parse_expired(values: Vec<Value>) -> Result<Vec<(SessionId, String)>> {
    let mut out = Vec::with_capacity(values.len() / 2);
    let mut it = values.into_iter();
    while let Some(id) = it.next() {
        let user = it
            .next()
            .ok_or_else(|| unexpected_reply("an expired session without its user"))?;
        out.push((session_id(id, "expired id")?, string(user, "user id")?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_replies_without_panicking() {
        for value in [Value::Nil, Value::Int(1), Value::Array(vec![Value::Int(1)])] {
            assert!(parse_reply(value).is_err());
        }
        assert!(parse_reply(Value::Array(vec![Value::Int(1), Value::Int(9)])).is_err());
        let failed = parse_reply(Value::Array(vec![
            Value::Int(1),
            Value::Int(4),
            Value::BulkString(b"ERR statehouse: corrupt".to_vec()),
        ]))
        .expect_err("a failed load");
        assert!(
            matches!(failed, statehouse_core::Error::Backend { .. }),
            "{failed:?}"
        );
        assert!(parse_lists(Value::Array(vec![Value::Int(1)])).is_err());
    }
}
