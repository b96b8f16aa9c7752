//! The session Lua script: its invocations and the parsing of its replies.
//!
//! The script (`session.lua`) runs each [`SessionStore`](statehouse_core::session::SessionStore)
//! operation in one atomic step; see the comments at its top for the key layout, the argument
//! layout and the status codes.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use redis::{Script, ScriptInvocation, Value};
use statehouse_core::session::{SessionConfig, SessionId, SessionRecord};
use statehouse_core::{Result, Timestamp};

use crate::error::unexpected_reply;

/// The script, hashed once. `Script` runs `EVALSHA` and loads the script on `NOSCRIPT`.
static SESSION: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("session.lua")));

/// The hash field that prefixes a data field's name, so data never collides with metadata.
pub(crate) const DATA_FIELD_PREFIX: &str = "d:";

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

/// Builds a record from a session hash's fields (`HGETALL`, flat).
pub(crate) fn parse_record(id: SessionId, flat: Vec<Value>) -> Result<SessionRecord> {
    if !flat.len().is_multiple_of(2) {
        return Err(unexpected_reply("an odd number of hash values"));
    }
    let mut user_id = None;
    let mut roles = Vec::new();
    let mut data = BTreeMap::new();
    let (mut created_at, mut last_seen) = (None, None);
    let (mut ip, mut user_agent) = (None, None);
    let mut it = flat.into_iter();
    while let (Some(field), Some(value)) = (it.next(), it.next()) {
        let field = bytes(field, "hash field")?;
        match field.as_slice() {
            b"u" => user_id = Some(string(value, "user id")?),
            b"r" => {
                let joined = string(value, "roles")?;
                roles = joined
                    .split('\n')
                    .filter(|r| !r.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            b"c" => created_at = Some(stored_time(value, "created_at")?),
            b"s" => last_seen = Some(stored_time(value, "last_seen")?),
            b"ip" => ip = Some(string(value, "ip")?),
            b"ua" => user_agent = Some(string(value, "user agent")?),
            name => {
                if let Some(name) = name.strip_prefix(DATA_FIELD_PREFIX.as_bytes()) {
                    let name = String::from_utf8(name.to_vec())
                        .map_err(|_| corrupt("a data field name is not UTF-8"))?;
                    data.insert(name, bytes(value, "data value")?);
                }
                // Other fields are left for newer versions of this store.
            }
        }
    }
    Ok(SessionRecord {
        id,
        user_id: user_id.ok_or_else(|| corrupt("no user id"))?,
        roles,
        data,
        created_at: created_at.ok_or_else(|| corrupt("no created_at"))?,
        last_seen: last_seen.ok_or_else(|| corrupt("no last_seen"))?,
        ip,
        user_agent,
    })
}

fn stored_time(value: Value, what: &str) -> Result<Timestamp> {
    let s = string(value, what)?;
    s.parse::<u64>()
        .map(Timestamp::from_micros)
        .map_err(|_| corrupt(format!("{what} is not an integer")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_a_record_and_keeps_binary_data() {
        let id = SessionId::parse(&"a".repeat(64)).expect("id");
        let flat = vec![
            bulk("u"),
            bulk("alice"),
            bulk("r"),
            bulk("admin\nuser"),
            bulk("c"),
            bulk("10"),
            bulk("s"),
            bulk("20"),
            bulk("d:blob"),
            Value::BulkString(vec![0, 159, 255]),
            bulk("future"),
            bulk("ignored"),
        ];
        let record = parse_record(id, flat).expect("parses");
        assert_eq!(record.user_id, "alice");
        assert_eq!(record.roles, vec!["admin".to_owned(), "user".to_owned()]);
        assert_eq!(record.created_at, Timestamp::from_micros(10));
        assert_eq!(record.last_seen, Timestamp::from_micros(20));
        assert_eq!(record.data["blob"], vec![0, 159, 255]);
        assert_eq!(record.ip, None);
    }

    #[test]
    fn refuses_bad_shapes_without_panicking() {
        let id = || SessionId::parse(&"b".repeat(64)).expect("id");
        for flat in [
            vec![bulk("u")],
            vec![bulk("c"), bulk("1"), bulk("s"), bulk("1")],
            vec![
                bulk("u"),
                bulk("x"),
                bulk("c"),
                bulk("one"),
                bulk("s"),
                bulk("1"),
            ],
            vec![
                bulk("u"),
                Value::BulkString(vec![255]),
                bulk("c"),
                bulk("1"),
                bulk("s"),
                bulk("1"),
            ],
            vec![
                bulk("u"),
                Value::Nil,
                bulk("c"),
                bulk("1"),
                bulk("s"),
                bulk("1"),
            ],
        ] {
            let err = parse_record(id(), flat).expect_err("refused");
            assert!(
                matches!(err, statehouse_core::Error::Backend { .. }),
                "{err:?}"
            );
        }
        for value in [Value::Nil, Value::Int(1), Value::Array(vec![Value::Int(1)])] {
            assert!(parse_reply(value).is_err());
        }
        assert!(parse_reply(Value::Array(vec![Value::Int(1), Value::Int(9)])).is_err());
        assert!(parse_lists(Value::Array(vec![Value::Int(1)])).is_err());
    }
}
