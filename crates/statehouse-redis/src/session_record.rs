//! The stored form of a session on Redis: one compact STRING per session (and per rotation
//! alias), so a load is one `GET` (one `MGET` for many) and one pass over one byte string.
//!
//! A session:
//!
//! | bytes | content |
//! |---|---|
//! | 0 | `S` (format 1) |
//! | 1..17 | created_at, µs since the epoch, 16 zero-padded decimal digits |
//! | 17..33 | last_seen, the same (a refresh is one `SETRANGE key 17 <16 digits>`) |
//! | 33.. | fields |
//!
//! Each field is a kind byte, for `d` a 2-byte big-endian name length and the name, then a
//! 4-byte big-endian value length and the value: `u` user id, `r` roles joined by `\n` (roles
//! hold no control characters), `i` IP address, `a` user agent (absent when unknown), `d` a
//! data field (raw bytes). Kinds this version does not know are skipped when reading (and kept
//! by the script's updates).
//!
//! A rotation alias: `A`, the end of the rotation grace (16 digits), the new id (64 hex digits).
//!
//! `session.lua` reads and writes the same layout (its comments at the top describe it too).

use std::collections::BTreeMap;

use statehouse_core::session::{SessionId, SessionRecord};
use statehouse_core::{Error, Result, Timestamp};

use crate::session_script::corrupt;

/// The first byte of a session record.
pub(crate) const SESSION_KIND: u8 = b'S';
/// The first byte of a rotation alias.
pub(crate) const ALIAS_KIND: u8 = b'A';
/// Digits of a stored time.
const TIME_DIGITS: usize = 16;
/// The kind byte and the two times.
const HEADER_LEN: usize = 1 + 2 * TIME_DIGITS;

const USER: u8 = b'u';
const ROLES: u8 = b'r';
const IP: u8 = b'i';
const AGENT: u8 = b'a';
const DATA: u8 = b'd';

/// Whether a stored value is a rotation alias (the script resolves those).
pub(crate) fn is_alias(value: &[u8]) -> bool {
    value.first() == Some(&ALIAS_KIND)
}

/// The fields of a new session (everything after the header, which the script writes with its
/// own time). The values were validated by [`NewSession::validate`](statehouse_core::session::NewSession::validate).
pub(crate) fn encode_fields(
    user_id: &str,
    roles: &[String],
    ip: Option<&str>,
    user_agent: Option<&str>,
    data: &BTreeMap<String, Vec<u8>>,
) -> Result<Vec<u8>> {
    let roles = roles.join("\n");
    let size = 5 * 4
        + user_id.len()
        + roles.len()
        + ip.map_or(0, str::len)
        + user_agent.map_or(0, str::len)
        + data
            .iter()
            .map(|(k, v)| 7 + k.len() + v.len())
            .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    push_field(&mut out, USER, user_id.as_bytes())?;
    push_field(&mut out, ROLES, roles.as_bytes())?;
    if let Some(ip) = ip {
        push_field(&mut out, IP, ip.as_bytes())?;
    }
    if let Some(ua) = user_agent {
        push_field(&mut out, AGENT, ua.as_bytes())?;
    }
    for (name, value) in data {
        let len = u16::try_from(name.len())
            .map_err(|_| Error::InvalidInput("a data field name is too long".into()))?;
        out.push(DATA);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        push_len(&mut out, value.len())?;
        out.extend_from_slice(value);
    }
    Ok(out)
}

fn push_field(out: &mut Vec<u8>, kind: u8, value: &[u8]) -> Result<()> {
    out.push(kind);
    push_len(out, value.len())?;
    out.extend_from_slice(value);
    Ok(())
}

fn push_len(out: &mut Vec<u8>, len: usize) -> Result<()> {
    let len = u32::try_from(len)
        .map_err(|_| Error::InvalidInput("a session value is too long".into()))?;
    out.extend_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Decodes a stored session record; anything that is not one (an alias, a cut-short or
/// malformed value, a missing user id, text that is not UTF-8) is
/// [`Error::Backend`] (corrupt data).
pub(crate) fn decode(id: SessionId, value: &[u8]) -> Result<SessionRecord> {
    if value.len() < HEADER_LEN || value[0] != SESSION_KIND {
        return Err(corrupt("not a session record"));
    }
    let created_at = time(&value[1..1 + TIME_DIGITS], "created_at")?;
    let last_seen = time(&value[1 + TIME_DIGITS..HEADER_LEN], "last_seen")?;
    let mut user_id = None;
    let mut roles = Vec::new();
    let mut data = BTreeMap::new();
    let (mut ip, mut user_agent) = (None, None);
    let mut rest = &value[HEADER_LEN..];
    while let Some((&kind, after)) = rest.split_first() {
        rest = after;
        let name = if kind == DATA {
            let (len, after) = take(rest, 2, "a data field name")?;
            let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
            let (name, after) = take(after, len, "a data field name")?;
            rest = after;
            Some(name)
        } else {
            None
        };
        let (len, after) = take(rest, 4, "a field length")?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let (field, after) = take(after, len, "a field value")?;
        rest = after;
        match (kind, name) {
            (USER, _) => user_id = Some(text(field, "user id")?),
            (ROLES, _) => {
                roles = text_ref(field, "roles")?
                    .split('\n')
                    .filter(|r| !r.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            (IP, _) => ip = Some(text(field, "ip")?),
            (AGENT, _) => user_agent = Some(text(field, "user agent")?),
            (DATA, Some(name)) => {
                data.insert(text(name, "a data field name")?, field.to_vec());
            }
            // Other kinds are left for newer versions of this store.
            _ => {}
        }
    }
    Ok(SessionRecord {
        id,
        user_id: user_id.ok_or_else(|| corrupt("no user id"))?,
        roles,
        data,
        created_at,
        last_seen,
        ip,
        user_agent,
    })
}

/// The first `n` bytes of `rest` and what follows, or corrupt data.
fn take<'a>(rest: &'a [u8], n: usize, what: &str) -> Result<(&'a [u8], &'a [u8])> {
    if rest.len() < n {
        return Err(corrupt(format!("{what} is cut short")));
    }
    Ok(rest.split_at(n))
}

fn text_ref<'a>(bytes: &'a [u8], what: &str) -> Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|_| corrupt(format!("{what} is not UTF-8")))
}

fn text(bytes: &[u8], what: &str) -> Result<String> {
    text_ref(bytes, what).map(str::to_owned)
}

/// A 16-digit stored time.
fn time(digits: &[u8], what: &str) -> Result<Timestamp> {
    let mut n: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(corrupt(format!("{what} is not a 16-digit time")));
        }
        n = n * 10 + u64::from(d - b'0');
    }
    Ok(Timestamp::from_micros(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> SessionId {
        SessionId::parse(&"a".repeat(64)).expect("id")
    }

    fn header(created: u64, seen: u64) -> Vec<u8> {
        format!("S{created:016}{seen:016}").into_bytes()
    }

    #[test]
    fn a_record_round_trips_and_keeps_binary_data() {
        let mut data = BTreeMap::new();
        data.insert("blob".to_owned(), vec![0, 159, 255]);
        data.insert("empty".to_owned(), Vec::new());
        let roles = vec!["admin".to_owned(), "user".to_owned()];
        let mut value = header(10, 1_764_000_000_000_000);
        value.extend(
            encode_fields("alice", &roles, Some("10.0.0.1"), None, &data).expect("encodes"),
        );
        // A field of a kind a newer version might write is skipped.
        value.extend([b'z', 0, 0, 0, 2, b'h', b'i']);
        let record = decode(id(), &value).expect("decodes");
        assert_eq!(record.user_id, "alice");
        assert_eq!(record.roles, roles);
        assert_eq!(record.created_at, Timestamp::from_micros(10));
        assert_eq!(
            record.last_seen,
            Timestamp::from_micros(1_764_000_000_000_000)
        );
        assert_eq!(record.data, data);
        assert_eq!(record.ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(record.user_agent, None);
        assert!(!is_alias(&value));
    }

    #[test]
    fn refuses_bad_records_without_panicking() {
        let good = {
            let mut v = header(1, 2);
            v.extend(
                encode_fields("bob", &[], None, Some("ua"), &BTreeMap::new()).expect("encodes"),
            );
            v
        };
        assert!(decode(id(), &good).is_ok());
        let mut bad: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"S".to_vec(),
            header(1, 2),                                         // no user id
            format!("A{:016}{}", 5, "b".repeat(64)).into_bytes(), // an alias
            b"not a session at all, but long enough".to_vec(),
        ];
        // Cut short anywhere inside a field (the fields: user 8 bytes, roles 5, agent 7).
        let boundaries = [HEADER_LEN + 8, HEADER_LEN + 13];
        for cut in HEADER_LEN + 1..good.len() {
            if !boundaries.contains(&cut) {
                bad.push(good[..cut].to_vec());
            }
        }
        for cut in boundaries {
            assert!(decode(id(), &good[..cut]).is_ok(), "whole fields at {cut}");
        }
        // A time that is not digits.
        let mut v = good.clone();
        v[20] = b'x';
        bad.push(v);
        // A user id that is not UTF-8.
        let mut v = header(1, 2);
        v.extend([USER, 0, 0, 0, 1, 255]);
        bad.push(v);
        // A data field whose length runs past the end.
        let mut v = good.clone();
        v.extend([DATA, 0, 1, b'k', 255, 255, 255, 255]);
        bad.push(v);
        for value in bad {
            let err = decode(id(), &value).expect_err("refused");
            assert!(matches!(err, Error::Backend { .. }), "{err:?}");
        }
    }
}
