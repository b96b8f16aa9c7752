//! How a caller's key becomes a storage key that is safe on every backend.
//!
//! A caller's key is any UTF-8 text of 1 to [`MAX_KEY_LEN`] bytes: spaces, newlines and braces
//! included. Short keys without braces are stored as they are, so they stay readable in
//! `redis-cli`. A key with `{` or `}` (which would break a Redis Cluster hash tag), a key longer
//! than [`MAX_PLAIN_KEY_LEN`] bytes, or one starting with `~` is stored as `~` and the first 32
//! hex digits of its SHA-256: readable keys and hashed keys can never collide, since a plain key
//! never starts with `~`.

use std::borrow::Cow;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::policy::Policy;

/// The longest key accepted, in bytes (64 KiB).
pub const MAX_KEY_LEN: usize = 64 * 1024;

/// Keys up to this many bytes (without braces, not starting with `~`) are stored verbatim.
pub const MAX_PLAIN_KEY_LEN: usize = 200;

/// The storage form of a caller's key, as described in the [module docs](self).
///
/// ```
/// use statehouse_core::key::encode_key;
/// assert_eq!(encode_key("user:42").unwrap(), "user:42");
/// assert!(encode_key("a{b}").unwrap().starts_with('~'));
/// assert!(encode_key("").is_err());
/// ```
pub fn encode_key(key: &str) -> Result<Cow<'_, str>> {
    if key.is_empty() {
        return Err(Error::InvalidKey {
            reason: "a key must not be empty".into(),
        });
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Error::InvalidKey {
            reason: format!(
                "a key is at most {MAX_KEY_LEN} bytes; this one has {}",
                key.len()
            ),
        });
    }
    // A byte scan: braces are ASCII, and this runs on every check's hot path.
    if key.len() > MAX_PLAIN_KEY_LEN
        || key.starts_with('~')
        || key.bytes().any(|b| b == b'{' || b == b'}')
    {
        let digest = Sha256::digest(key.as_bytes());
        return Ok(Cow::Owned(format!("~{}", hex::encode(&digest[..16]))));
    }
    Ok(Cow::Borrowed(key))
}

/// Checks a key prefix (such as `sh:rl:`): printable ASCII without braces or spaces, at most
/// 64 bytes.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    if prefix.len() > 64
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
    {
        return Err(Error::InvalidInput(format!(
            "key prefix {prefix:?} must be at most 64 printable ASCII characters without braces \
             or spaces"
        )));
    }
    Ok(())
}

/// The part of a storage key that tells policies on one key apart: the algorithm and the period
/// in microseconds (`gcra:60000000`). The limit is left out on purpose, so raising or lowering a
/// limit keeps the counted state.
pub fn policy_suffix(policy: &Policy) -> String {
    let mut out = String::with_capacity(POLICY_SUFFIX_MAX_LEN);
    push_policy_suffix(&mut out, policy);
    out
}

/// The longest [`policy_suffix`]: the longest algorithm name, `:` and 20 digits.
pub const POLICY_SUFFIX_MAX_LEN: usize = 48;

/// Appends [`policy_suffix`] to `out`. Every check of a Redis limiter builds its storage key
/// with it: written digit by digit rather than through `format!`, which cost about a thousand
/// instructions a check (the formatting machinery and a growing `String`).
pub fn push_policy_suffix(out: &mut String, policy: &Policy) {
    out.push_str(policy.algorithm().name());
    out.push(':');
    let mut digits = [0u8; 20];
    let mut n = policy.period_micros();
    let mut at = digits.len();
    loop {
        at -= 1;
        // `n % 10` is below 10: the cast cannot truncate.
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // ASCII digits: the check cannot fail.
    out.push_str(std::str::from_utf8(&digits[at..]).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::{Algorithm, MAX_PERIOD};

    #[test]
    fn the_policy_suffix_is_the_algorithm_and_the_period_in_microseconds() {
        let periods = [
            Duration::from_millis(1),
            Duration::from_millis(10),
            Duration::from_millis(999),
            Duration::from_secs(1),
            Duration::from_secs(90),
            Duration::from_secs(3_600),
            Duration::from_secs(86_400),
            MAX_PERIOD,
        ];
        for algorithm in Algorithm::ALL {
            for period in periods {
                let policy = Policy::new(algorithm, 10, period).expect("valid policy");
                let expected = format!("{}:{}", algorithm.name(), period.as_micros());
                assert_eq!(policy_suffix(&policy), expected);
                assert!(expected.len() <= POLICY_SUFFIX_MAX_LEN, "{expected}");
                // Appended after what is there.
                let mut key = String::from("sh:rl:{k}:");
                push_policy_suffix(&mut key, &policy);
                assert_eq!(key, format!("sh:rl:{{k}}:{expected}"));
            }
        }
    }
}
