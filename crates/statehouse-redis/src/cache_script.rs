//! The cache Lua script (`cache.lua`): its invocations and the parsing of its replies. See the
//! comments at the top of the script for the argument layout of each operation.

use std::sync::LazyLock;
use std::time::Duration;

use redis::{Script, ScriptInvocation, Value};
use statehouse_core::{Error, Result};

use crate::error::unexpected_reply;

/// The script, hashed once. `Script` runs `EVALSHA` and loads the script on `NOSCRIPT`.
static CACHE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("cache.lua")));

/// How long a tag version lives without being read or bumped: 30 days.
///
/// A tag version must outlive every entry recorded with it (an entry is checked against the
/// current version on every read), and tags are few and tiny, so a long TTL costs nothing. It
/// is renewed whenever a read finds less than [`TAG_REFRESH_BELOW`] left, so a tag in use
/// never expires, while a tag nobody reads any more disappears after a month. An expired (or
/// evicted) tag gets a fresh random version on its next read: entries recorded with the old one
/// become misses, never stale hits.
pub(crate) const TAG_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// A read renews a tag's TTL only when less than this is left (half of [`TAG_TTL`]): renewing
/// on every read would turn every cache read into a replicated write.
pub(crate) const TAG_REFRESH_BELOW: Duration = Duration::from_secs(15 * 24 * 3600);

/// The longest TTL (value or lease) accepted: ten years. Longer ones are a bug in the caller,
/// and keeping `now + ttl` in µs well below 2^53 keeps the script's arithmetic exact.
pub(crate) const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Random starting versions are below 2^52: the script handles versions as Lua numbers
/// (doubles, exact below 2^53), and a tag can be bumped 2^52 times before that bound.
const VERSION_MASK: u64 = (1 << 52) - 1;

/// Checks a TTL and returns it in whole milliseconds, rounded up (Redis `PX` counts in ms; a
/// value must never expire before its TTL).
pub(crate) fn ttl_millis(ttl: Duration, what: &str) -> Result<u64> {
    if ttl.is_zero() {
        return Err(Error::InvalidInput(format!(
            "{what} must be greater than zero"
        )));
    }
    if ttl > MAX_TTL {
        return Err(Error::InvalidInput(format!(
            "{what} must be at most ten years, got {ttl:?}"
        )));
    }
    // At most ten years: the cast cannot truncate.
    Ok(ttl.as_micros().div_ceil(1000) as u64)
}

/// A random version in `1..2^52` for a tag that has none stored.
pub(crate) fn fresh_version() -> Result<u64> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| Error::Backend {
        message: format!("the operating system's random source failed: {e}"),
        source: None,
    })?;
    Ok((u64::from_le_bytes(bytes) & VERSION_MASK).max(1))
}

/// `set`: a write (`token: None`) or a fill.
pub(crate) fn set(
    data_key: &str,
    lease_key: &str,
    channel: &str,
    message: &[u8],
    value: &[u8],
    ttl_ms: u64,
    token: Option<&str>,
) -> ScriptInvocation<'static> {
    let mut inv = CACHE.prepare_invoke();
    inv.key(data_key)
        .key(lease_key)
        .arg("set")
        .arg(channel)
        .arg(message)
        .arg(value)
        .arg(ttl_ms)
        .arg(token.unwrap_or(""));
    inv
}

/// `delete`.
pub(crate) fn delete(
    data_key: &str,
    lease_key: &str,
    channel: &str,
    message: &[u8],
) -> ScriptInvocation<'static> {
    let mut inv = CACHE.prepare_invoke();
    inv.key(data_key)
        .key(lease_key)
        .arg("delete")
        .arg(channel)
        .arg(message);
    inv
}

/// `acquire`: `now_us` is the caller's clock.
pub(crate) fn acquire(
    lease_key: &str,
    token: &str,
    now_us: u64,
    ttl: Duration,
    ttl_ms: u64,
) -> ScriptInvocation<'static> {
    let mut inv = CACHE.prepare_invoke();
    // `ttl` was checked (at most ten years), so its µs fit in a u64.
    inv.key(lease_key)
        .arg("acquire")
        .arg(token)
        .arg(now_us)
        .arg(ttl.as_micros() as u64)
        .arg(ttl_ms);
    inv
}

/// `release`.
pub(crate) fn release(lease_key: &str, token: &str) -> ScriptInvocation<'static> {
    let mut inv = CACHE.prepare_invoke();
    inv.key(lease_key).arg("release").arg(token);
    inv
}

/// `bump`.
pub(crate) fn bump(
    tag_key: &str,
    channel: &str,
    message: &[u8],
    fresh: u64,
) -> ScriptInvocation<'static> {
    let mut inv = CACHE.prepare_invoke();
    inv.key(tag_key)
        .arg("bump")
        .arg(channel)
        .arg(message)
        .arg(fresh)
        .arg(TAG_TTL.as_millis() as u64);
    inv
}

/// `tags`: `keys` and `fresh` have the same length.
pub(crate) fn tags(keys: &[String], fresh: &[u64]) -> ScriptInvocation<'static> {
    let mut inv = CACHE.prepare_invoke();
    inv.arg("tags")
        .arg(TAG_TTL.as_millis() as u64)
        .arg(TAG_REFRESH_BELOW.as_millis() as u64);
    for (key, fresh) in keys.iter().zip(fresh) {
        inv.key(key.as_str()).arg(*fresh);
    }
    inv
}

/// A `0`/`1` reply.
pub(crate) fn flag(value: Value, what: &str) -> Result<bool> {
    match value {
        Value::Int(0) => Ok(false),
        Value::Int(1) => Ok(true),
        other => Err(unexpected_reply(format!(
            "{what}: expected 0 or 1, got {other:?}"
        ))),
    }
}

/// A version: an integer reply, or a decimal string stored in a tag key.
pub(crate) fn version(value: &Value, what: &str) -> Result<u64> {
    let parsed = match value {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    };
    parsed.ok_or_else(|| Error::Backend {
        message: format!("{what}: a tag version must be a non-negative integer, got {value:?}"),
        source: None,
    })
}

/// The `tags` reply: one version per key.
pub(crate) fn versions(value: Value, n: usize) -> Result<Vec<u64>> {
    let Value::Array(items) = value else {
        return Err(unexpected_reply(format!(
            "tag versions: expected an array, got {value:?}"
        )));
    };
    if items.len() != n {
        return Err(unexpected_reply(format!(
            "{} tag versions for {n} tags",
            items.len()
        )));
    }
    items.iter().map(|v| version(v, "tag version")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_round_up_to_the_millisecond_and_are_bounded() {
        assert_eq!(
            ttl_millis(Duration::from_micros(1), "ttl").expect("test step"),
            1
        );
        assert_eq!(
            ttl_millis(Duration::from_micros(1001), "ttl").expect("test step"),
            2
        );
        assert_eq!(
            ttl_millis(Duration::from_secs(3), "ttl").expect("test step"),
            3000
        );
        assert_eq!(
            ttl_millis(MAX_TTL, "ttl").expect("test step"),
            MAX_TTL.as_millis() as u64
        );
        for bad in [
            Duration::ZERO,
            MAX_TTL + Duration::from_micros(1),
            Duration::MAX,
        ] {
            assert!(ttl_millis(bad, "ttl").unwrap_err().is_invalid_input());
        }
    }

    #[test]
    fn fresh_versions_are_nonzero_and_exact_as_doubles() {
        for _ in 0..1000 {
            let v = fresh_version().expect("test step");
            assert!((1..(1 << 52)).contains(&v), "{v}");
        }
    }

    #[test]
    fn versions_parse_integers_and_decimal_strings_only() {
        assert_eq!(version(&Value::Int(7), "v").expect("test step"), 7);
        assert_eq!(
            version(&Value::BulkString(b"4503599627370495".to_vec()), "v").expect("test step"),
            4503599627370495
        );
        for bad in [
            Value::Int(-1),
            Value::Nil,
            Value::BulkString(b"1.5".to_vec()),
            Value::BulkString(b"4.5e+15".to_vec()),
        ] {
            assert!(version(&bad, "v").is_err(), "{bad:?}");
        }
        assert!(versions(Value::Array(vec![Value::Int(1)]), 2).is_err());
        assert!(flag(Value::Int(2), "f").is_err());
    }
}
