//! The stored form of a cached response and of a vary spec: the payload of a core
//! [`Envelope`] with codec id 2 (raw bytes).
//!
//! ```text
//! byte 0   record kind and format: 1 = response, format 1; 2 = vary spec, format 1
//!
//! response:
//!   u16 status · u64 response time (µs since the epoch) · u64 initial age (µs)
//!   u16 header count, then per header: u16 name length, name, u32 value length, value
//!   u64 body length, body (exactly: trailing bytes are an error)
//!
//! vary spec:
//!   u64 generation · u16 variants written under it
//!   u8 name count, then per name: u8 length, name (lowercase)
//! ```
//!
//! All integers are big-endian. The envelope carries freshness (`fresh_until`, `stale_until`)
//! and the tags with their versions. Anything that does not decode (another program's bytes,
//! an unknown kind or format, a truncated value, an invalid header) is an error, which the
//! service counts and treats as a miss: never a panic.

use std::time::Duration;

use bytes::Bytes;
use http::header::{ETAG, LAST_MODIFIED};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use statehouse::Timestamp;
use statehouse::statehouse_core::cache::{Envelope, EnvelopeFlags};

use super::control::{Qualifiable, ResponseDirectives};

/// The core envelope's codec id for raw bytes.
pub(crate) const CODEC_RAW: u8 = 2;
const KIND_RESPONSE_V1: u8 = 1;
const KIND_VARY_SPEC_V1: u8 = 2;
/// The most `Vary` names a decoded spec may list (the layer's own limit is lower).
const MAX_SPEC_NAMES: usize = 64;
/// The fewest bytes one stored header line takes: its name length (2), a one-byte name, its
/// value length (4).
const MIN_HEADER_BYTES: usize = 7;

/// A stored response, as read back (payload and envelope together).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredResponse {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// When the response was received.
    pub(crate) response_time: Timestamp,
    /// Its age when received (RFC 9111 §4.2.3, `corrected_initial_age`).
    pub(crate) initial_age: Duration,
    pub(crate) fresh_until: Timestamp,
    /// The end of the stale-if-error window; equal to `fresh_until` when there is none.
    pub(crate) stale_until: Timestamp,
    /// The store's tags (already namespaced) with their versions when stored.
    pub(crate) tags: Vec<(String, u64)>,
}

impl StoredResponse {
    /// Whether it carries a validator a conditional request can send back (§4.3.1).
    pub(crate) fn has_validator(&self) -> bool {
        self.headers.contains_key(ETAG) || self.headers.contains_key(LAST_MODIFIED)
    }

    /// Until when the store keeps it: the end of its `stale-if-error` window and of its
    /// `stale-while-revalidate` window, and, when it has a validator, at least
    /// `revalidate_window` past its freshness, to be revalidated.
    pub(crate) fn keep_until(&self, revalidate_window: Duration, max_ttl: Duration) -> Timestamp {
        let kept = self.stale_until.max(self.revalidate_until(max_ttl));
        if revalidate_window.is_zero() || !self.has_validator() {
            return kept;
        }
        kept.max(self.fresh_until.saturating_add(revalidate_window))
    }

    /// The end of its `stale-while-revalidate` window (RFC 5861 §3), read from its stored
    /// `Cache-Control` and at most `max_ttl` long: while it lasts, the stale response may be
    /// served as it is revalidated in the background. `fresh_until` when it has none, or must
    /// never be served stale (`must-revalidate`, `proxy-revalidate`, `s-maxage`, or an
    /// unqualified `no-cache`: revalidated before every use).
    pub(crate) fn revalidate_until(&self, max_ttl: Duration) -> Timestamp {
        let cc = ResponseDirectives::parse(&self.headers);
        match cc.stale_while_revalidate {
            Some(window) if !cc.forbids_stale() && cc.no_cache != Qualifiable::Whole => self
                .fresh_until
                .saturating_add(Duration::from_secs(window).min(max_ttl)),
            _ => self.fresh_until,
        }
    }

    /// The response's age at `now` (§4.2.3 `current_age`).
    pub(crate) fn current_age(&self, now: Timestamp) -> Duration {
        self.initial_age + now.saturating_duration_since(self.response_time)
    }

    /// The stored bytes: an envelope with codec 2 around this layout.
    pub(crate) fn encode(&self) -> statehouse::Result<Vec<u8>> {
        let mut p = Vec::with_capacity(64 + self.body.len());
        p.push(KIND_RESPONSE_V1);
        p.extend_from_slice(&self.status.as_u16().to_be_bytes());
        p.extend_from_slice(&self.response_time.as_micros().to_be_bytes());
        let age = u64::try_from(self.initial_age.as_micros()).unwrap_or(u64::MAX);
        p.extend_from_slice(&age.to_be_bytes());
        let count = u16::try_from(self.headers.len())
            .map_err(|_| invalid("a response with more than 65 535 header lines"))?;
        p.extend_from_slice(&count.to_be_bytes());
        for (name, value) in &self.headers {
            let name_len = u16::try_from(name.as_str().len())
                .map_err(|_| invalid("a header name longer than 65 535 bytes"))?;
            let value_len = u32::try_from(value.len())
                .map_err(|_| invalid("a header value longer than 4 GiB"))?;
            p.extend_from_slice(&name_len.to_be_bytes());
            p.extend_from_slice(name.as_str().as_bytes());
            p.extend_from_slice(&value_len.to_be_bytes());
            p.extend_from_slice(value.as_bytes());
        }
        p.extend_from_slice(&(self.body.len() as u64).to_be_bytes());
        p.extend_from_slice(&self.body);
        envelope(self.fresh_until, self.stale_until, self.tags.clone(), p).encode()
    }
}

/// The record at a primary key whose response varies: which request fields select the
/// variant, the generation that variant keys are built with, and how many variants were
/// written under it (the bound on variants).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VarySpec {
    pub(crate) generation: u64,
    pub(crate) variants: u16,
    pub(crate) names: Vec<HeaderName>,
    /// Until when the spec is kept (the envelope's `stale_until`).
    pub(crate) until: Timestamp,
}

impl VarySpec {
    /// The stored bytes, fresh (and kept) until `self.until`.
    pub(crate) fn encode(&self) -> statehouse::Result<Vec<u8>> {
        let mut p = vec![KIND_VARY_SPEC_V1];
        p.extend_from_slice(&self.generation.to_be_bytes());
        p.extend_from_slice(&self.variants.to_be_bytes());
        let count =
            u8::try_from(self.names.len()).map_err(|_| invalid("more than 255 Vary names"))?;
        p.push(count);
        for name in &self.names {
            let len = u8::try_from(name.as_str().len())
                .map_err(|_| invalid("a Vary name longer than 255 bytes"))?;
            p.push(len);
            p.extend_from_slice(name.as_str().as_bytes());
        }
        envelope(self.until, self.until, Vec::new(), p).encode()
    }
}

/// What a key holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    Response(StoredResponse),
    VarySpec(VarySpec),
}

fn envelope(
    fresh_until: Timestamp,
    stale_until: Timestamp,
    tags: Vec<(String, u64)>,
    payload: Vec<u8>,
) -> Envelope {
    Envelope {
        flags: EnvelopeFlags {
            negative: false,
            compressed: false,
            codec: CODEC_RAW,
        },
        fresh_until,
        stale_until,
        load_micros: 0,
        tags,
        payload,
    }
}

fn invalid(why: &str) -> statehouse::Error {
    statehouse::Error::InvalidInput(format!("HTTP cache entry: {why}"))
}

/// A cursor over a payload; every read checks the length first.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> statehouse::Result<&'a [u8]> {
        if self.bytes.len() < n {
            return Err(invalid("truncated"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> statehouse::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> statehouse::Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> statehouse::Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> statehouse::Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
}

/// Parses stored bytes. Every malformed input is an error.
pub(crate) fn decode(bytes: &[u8]) -> statehouse::Result<Record> {
    let env = Envelope::decode(bytes)?;
    if env.flags.codec != CODEC_RAW || env.flags.compressed || env.flags.negative {
        return Err(invalid("not written by the HTTP cache (codec or flags)"));
    }
    let mut r = Reader {
        bytes: &env.payload,
    };
    let record = match r.u8()? {
        KIND_RESPONSE_V1 => {
            let status =
                StatusCode::from_u16(r.u16()?).map_err(|_| invalid("invalid status code"))?;
            let response_time = Timestamp::from_micros(r.u64()?);
            let initial_age = Duration::from_micros(r.u64()?);
            let count = r.u16()? as usize;
            // The count is read, not trusted: each line takes at least `MIN_HEADER_BYTES`, and
            // a `HeaderMap` holds at most 32 768 (beyond, `with_capacity` and `append` panic).
            if count > r.bytes.len() / MIN_HEADER_BYTES {
                return Err(invalid("more header lines than the entry holds"));
            }
            let mut headers = HeaderMap::try_with_capacity(count)
                .map_err(|_| invalid("too many header lines"))?;
            for _ in 0..count {
                let len = r.u16()? as usize;
                let name = HeaderName::from_bytes(r.take(len)?)
                    .map_err(|_| invalid("invalid header name"))?;
                let len = r.u32()? as usize;
                let value = HeaderValue::from_bytes(r.take(len)?)
                    .map_err(|_| invalid("invalid header value"))?;
                headers
                    .try_append(name, value)
                    .map_err(|_| invalid("too many header lines"))?;
            }
            let len = usize::try_from(r.u64()?).map_err(|_| invalid("body too long"))?;
            let body = Bytes::copy_from_slice(r.take(len)?);
            Record::Response(StoredResponse {
                status,
                headers,
                body,
                response_time,
                initial_age,
                fresh_until: env.fresh_until,
                stale_until: env.stale_until,
                tags: env.tags,
            })
        }
        KIND_VARY_SPEC_V1 => {
            let generation = r.u64()?;
            let variants = r.u16()?;
            let count = r.u8()? as usize;
            if count == 0 || count > MAX_SPEC_NAMES {
                return Err(invalid("a vary spec needs 1 to 64 names"));
            }
            let mut names = Vec::with_capacity(count);
            for _ in 0..count {
                let len = r.u8()? as usize;
                names.push(
                    HeaderName::from_bytes(r.take(len)?)
                        .map_err(|_| invalid("invalid Vary name"))?,
                );
            }
            Record::VarySpec(VarySpec {
                generation,
                variants,
                names,
                until: env.stale_until,
            })
        }
        other => return Err(invalid(&format!("unknown record kind {other}"))),
    };
    if !r.bytes.is_empty() {
        return Err(invalid("trailing bytes"));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredResponse {
        let mut headers = HeaderMap::new();
        headers.append("content-type", HeaderValue::from_static("text/plain"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        StoredResponse {
            status: StatusCode::NOT_FOUND,
            headers,
            body: Bytes::from_static(b"hello"),
            response_time: Timestamp::from_micros(5),
            initial_age: Duration::from_secs(3),
            fresh_until: Timestamp::from_micros(10),
            stale_until: Timestamp::from_micros(20),
            tags: vec![("t".into(), 7)],
        }
    }

    #[test]
    fn records_round_trip() {
        let r = sample();
        assert_eq!(
            decode(&r.encode().unwrap()).unwrap(),
            Record::Response(r.clone())
        );
        let spec = VarySpec {
            generation: 42,
            variants: 3,
            until: Timestamp::from_micros(9),
            names: vec![http::header::ACCEPT_ENCODING],
        };
        assert_eq!(
            decode(&spec.encode().unwrap()).unwrap(),
            Record::VarySpec(spec)
        );
    }

    #[test]
    fn every_truncation_and_foreign_bytes_are_errors() {
        let bytes = sample().encode().unwrap();
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
        assert!(decode(b"garbage").is_err());
        let foreign = envelope(
            Timestamp::EPOCH,
            Timestamp::EPOCH,
            vec![],
            b"\x09whatever".to_vec(),
        );
        assert!(decode(&foreign.encode().unwrap()).is_err());
    }

    /// A response payload claiming `count` header lines, followed by `lines`.
    fn claiming(count: u16, lines: &[u8]) -> Vec<u8> {
        let mut p = vec![KIND_RESPONSE_V1];
        p.extend_from_slice(&200u16.to_be_bytes());
        p.extend_from_slice(&[0; 16]);
        p.extend_from_slice(&count.to_be_bytes());
        p.extend_from_slice(lines);
        p.extend_from_slice(&0u64.to_be_bytes());
        let env = envelope(Timestamp::EPOCH, Timestamp::EPOCH, vec![], p);
        env.encode().unwrap()
    }

    #[test]
    fn a_header_count_beyond_the_bytes_or_a_header_map_is_an_error() {
        assert!(decode(&claiming(40_000, b"")).is_err());
        assert!(decode(&claiming(u16::MAX, b"")).is_err());
        let line = b"\x00\x01a\x00\x00\x00\x00";
        assert!(decode(&claiming(1, line)).is_ok());
        assert!(decode(&claiming(40_000, &line.repeat(40_000))).is_err());
    }
}
