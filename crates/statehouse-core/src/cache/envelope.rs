//! The stored form of a cache entry: a small binary header, then the encoded value.
//!
//! ```text
//! byte 0      format version (1); a reader that does not know it treats the entry as a miss
//! byte 1      flags: bit 0 negative ("known absent"), bit 1 compressed (LZ4 block, size
//!             prepended); bits 4..7 the codec id (0 MessagePack, 1 JSON, 2 raw bytes, …)
//! bytes 2..10   fresh until, µs since the epoch, big-endian
//! bytes 10..18  stale until (end of stale-while-revalidate / stale-if-error), µs, big-endian
//! bytes 18..22  how long the load took, µs (XFetch's δ), big-endian u32, saturating
//! byte 22     number of tags n (≤ 32); then n × (u16 length, name, u64 version)
//! the rest    the payload
//! ```
//!
//! The format byte lets the layout change without a flush: old readers miss on new entries and
//! reload, they never misread them.

use crate::{Error, Result, Timestamp};

/// The layout version this crate writes and reads.
pub const FORMAT_VERSION: u8 = 1;

/// At most this many tags per entry.
pub const MAX_TAGS: usize = 32;

const HEADER: usize = 23;

/// Tags an [`EnvelopeView`] keeps split (beyond, it splits them again when asked).
const INLINE_TAGS: usize = 4;

/// The flag byte of an [`Envelope`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EnvelopeFlags {
    /// The entry records that the value does not exist (negative caching); the payload is empty.
    pub negative: bool,
    /// The payload is LZ4-compressed (the facade's business; the envelope only carries the bit).
    pub compressed: bool,
    /// Which codec wrote the payload (0 to 15).
    pub codec: u8,
}

impl EnvelopeFlags {
    fn to_byte(self) -> u8 {
        (self.negative as u8) | ((self.compressed as u8) << 1) | ((self.codec & 0x0f) << 4)
    }

    fn from_byte(b: u8) -> Result<Self> {
        if b & 0b1100 != 0 {
            return Err(Error::InvalidInput(
                "cache entry: unknown flag bits set".into(),
            ));
        }
        Ok(EnvelopeFlags {
            negative: b & 1 != 0,
            compressed: b & 2 != 0,
            codec: b >> 4,
        })
    }
}

/// One cache entry as stored.
///
/// ```
/// use statehouse_core::Timestamp;
/// use statehouse_core::cache::{Envelope, EnvelopeFlags};
///
/// let e = Envelope {
///     flags: EnvelopeFlags::default(),
///     fresh_until: Timestamp::from_micros(10),
///     stale_until: Timestamp::from_micros(20),
///     load_micros: 5,
///     tags: vec![("team:7".into(), 3)],
///     payload: b"hello".to_vec(),
/// };
/// assert_eq!(Envelope::decode(&e.encode()?)?, e);
/// assert!(Envelope::decode(b"\x01garbage").is_err());
/// # Ok::<(), statehouse_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Flags (negative, compressed, codec).
    pub flags: EnvelopeFlags,
    /// Until when the value is fresh.
    pub fresh_until: Timestamp,
    /// Until when a stale value may still be served (stale-while-revalidate, stale-if-error);
    /// at least `fresh_until`. The store's own TTL ends here too.
    pub stale_until: Timestamp,
    /// How long the load that produced the value took, in µs (XFetch's δ).
    pub load_micros: u32,
    /// The tags (and namespaces) the entry belongs to, with their versions when it was written.
    pub tags: Vec<(String, u64)>,
    /// The encoded value.
    pub payload: Vec<u8>,
}

impl Envelope {
    /// The stored bytes. Fails when there are more than [`MAX_TAGS`] tags or a tag is longer
    /// than 65 535 bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        if self.tags.len() > MAX_TAGS {
            return Err(Error::InvalidInput(format!(
                "a cache entry may carry at most {MAX_TAGS} tags, this one has {}",
                self.tags.len()
            )));
        }
        let tag_bytes: usize = self.tags.iter().map(|(t, _)| 10 + t.len()).sum();
        let mut out = Vec::with_capacity(HEADER + tag_bytes + self.payload.len());
        out.push(FORMAT_VERSION);
        out.push(self.flags.to_byte());
        out.extend_from_slice(&self.fresh_until.as_micros().to_be_bytes());
        out.extend_from_slice(&self.stale_until.as_micros().to_be_bytes());
        out.extend_from_slice(&self.load_micros.to_be_bytes());
        out.push(self.tags.len() as u8);
        for (tag, version) in &self.tags {
            let len = u16::try_from(tag.len()).map_err(|_| {
                Error::InvalidInput("a cache tag must be at most 65 535 bytes".into())
            })?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(tag.as_bytes());
            out.extend_from_slice(&version.to_be_bytes());
        }
        out.extend_from_slice(&self.payload);
        Ok(out)
    }

    /// Parses stored bytes. Anything that is not a well-formed entry of this format (another
    /// program's bytes, a newer format, a truncated value) is a clear error, never a panic.
    /// [`EnvelopeView::parse`] reads the same without copying the tags and the payload.
    pub fn decode(bytes: &[u8]) -> Result<Envelope> {
        let view = EnvelopeView::parse(bytes)?;
        Ok(Envelope {
            flags: view.flags,
            fresh_until: view.fresh_until,
            stale_until: view.stale_until,
            load_micros: view.load_micros,
            tags: view.tags().map(|(t, v)| (t.to_owned(), v)).collect(),
            payload: view.payload.to_vec(),
        })
    }
}

/// A stored entry read in place: what [`Envelope::decode`] reads and checks, with the tags and
/// the payload left where they are in the stored bytes (the cache's read path: a hit then
/// allocates nothing for the envelope).
///
/// ```
/// use statehouse_core::Timestamp;
/// use statehouse_core::cache::{Envelope, EnvelopeFlags, EnvelopeView};
///
/// let e = Envelope {
///     flags: EnvelopeFlags::default(),
///     fresh_until: Timestamp::from_micros(10),
///     stale_until: Timestamp::from_micros(20),
///     load_micros: 5,
///     tags: vec![("team:7".into(), 3)],
///     payload: b"hello".to_vec(),
/// };
/// let bytes = e.encode()?;
/// let view = EnvelopeView::parse(&bytes)?;
/// assert_eq!(view.payload, b"hello");
/// assert_eq!(view.tags().collect::<Vec<_>>(), [("team:7", 3)]);
/// # Ok::<(), statehouse_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvelopeView<'a> {
    /// Flags (negative, compressed, codec).
    pub flags: EnvelopeFlags,
    /// Until when the value is fresh.
    pub fresh_until: Timestamp,
    /// Until when a stale value may still be served; at least `fresh_until`.
    pub stale_until: Timestamp,
    /// How long the load that produced the value took, in µs.
    pub load_micros: u32,
    /// The first tags, checked and split by `parse` (entries rarely carry more).
    inline: [(&'a str, u64); INLINE_TAGS],
    inline_len: usize,
    /// The tag records after those (each checked by `parse`: a length, a UTF-8 name, a version).
    rest: &'a [u8],
    /// The encoded value.
    pub payload: &'a [u8],
}

impl<'a> EnvelopeView<'a> {
    /// Parses stored bytes, with the checks of [`Envelope::decode`].
    pub fn parse(bytes: &'a [u8]) -> Result<EnvelopeView<'a>> {
        let bad = |why: &str| Error::InvalidInput(format!("cache entry: {why}"));
        if bytes.len() < HEADER {
            return Err(bad("shorter than its header"));
        }
        if bytes[0] != FORMAT_VERSION {
            return Err(bad(&format!("unknown format version {}", bytes[0])));
        }
        let flags = EnvelopeFlags::from_byte(bytes[1])?;
        let fresh_until = Timestamp::from_micros(u64_at(bytes, 2));
        let stale_until = Timestamp::from_micros(u64_at(bytes, 10));
        if stale_until < fresh_until {
            return Err(bad("stale-until before fresh-until"));
        }
        let load_micros = u32::from_be_bytes([bytes[18], bytes[19], bytes[20], bytes[21]]);
        let n = bytes[22] as usize;
        if n > MAX_TAGS {
            return Err(bad("too many tags"));
        }
        let mut inline = [("", 0); INLINE_TAGS];
        let mut at = HEADER;
        let mut rest_at = at;
        for i in 0..n {
            if bytes.len() < at + 2 {
                return Err(bad("truncated tag"));
            }
            let len = u16::from_be_bytes([bytes[at], bytes[at + 1]]) as usize;
            at += 2;
            if bytes.len() < at + len + 8 {
                return Err(bad("truncated tag"));
            }
            let name =
                std::str::from_utf8(&bytes[at..at + len]).map_err(|_| bad("tag is not UTF-8"))?;
            at += len + 8;
            if let Some(slot) = inline.get_mut(i) {
                *slot = (name, u64_at(bytes, at - 8));
                rest_at = at;
            }
        }
        let payload = &bytes[at..];
        if flags.negative && !payload.is_empty() {
            return Err(bad("negative entry with a payload"));
        }
        Ok(EnvelopeView {
            flags,
            fresh_until,
            stale_until,
            load_micros,
            inline,
            inline_len: n.min(INLINE_TAGS),
            rest: &bytes[rest_at..at],
            payload,
        })
    }

    /// The tags (and namespaces) the entry belongs to, with their versions when it was
    /// written, in stored order.
    pub fn tags(&self) -> impl Iterator<Item = (&'a str, u64)> + 'a {
        let mut rest = self.rest;
        let inline = self.inline;
        let more = std::iter::from_fn(move || {
            let len = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
            let name = rest.get(2..2 + len)?;
            let version = u64_at(rest.get(2 + len..2 + len + 8)?, 0);
            rest = &rest[2 + len + 8..];
            // Checked by `parse`; a name that were not UTF-8 would end the tags, not panic.
            Some((std::str::from_utf8(name).ok()?, version))
        });
        (0..self.inline_len).map(move |i| inline[i]).chain(more)
    }
}

/// The big-endian `u64` at `at` (the caller has checked the length).
fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_prefix_of_a_valid_entry_is_rejected_or_parsed_without_panic() {
        let e = Envelope {
            flags: EnvelopeFlags {
                negative: false,
                compressed: true,
                codec: 1,
            },
            fresh_until: Timestamp::from_micros(1),
            stale_until: Timestamp::from_micros(2),
            load_micros: 7,
            tags: vec![("a".into(), 1), ("bb".into(), u64::MAX)],
            payload: vec![1, 2, 3],
        };
        let bytes = e.encode().unwrap();
        assert_eq!(Envelope::decode(&bytes).unwrap(), e);
        for cut in 0..bytes.len() {
            // A prefix either fails or (once all tags are in) parses with a shorter payload.
            if let Ok(d) = Envelope::decode(&bytes[..cut]) {
                assert_eq!(d.tags, e.tags);
                assert!(d.payload.len() < e.payload.len());
            }
        }
    }

    #[test]
    fn the_view_reads_what_decode_reads_in_place() {
        for tags in [
            &[][..],
            &["ns:a"][..],
            &["ns:a", "", "team:{7}\n", "é", "e", "f"][..],
        ] {
            for payload in [&b""[..], &b"x"[..], &[0u8; 300][..]] {
                let e = Envelope {
                    flags: EnvelopeFlags::default(),
                    fresh_until: Timestamp::from_micros(1),
                    stale_until: Timestamp::from_micros(2),
                    load_micros: 3,
                    tags: tags
                        .iter()
                        .zip(1..)
                        .map(|(t, v)| (t.to_string(), v))
                        .collect(),
                    payload: payload.to_vec(),
                };
                let bytes = e.encode().unwrap();
                let view = EnvelopeView::parse(&bytes).unwrap();
                assert_eq!(view.payload, payload);
                let view_tags: Vec<(String, u64)> =
                    view.tags().map(|(t, v)| (t.to_owned(), v)).collect();
                assert_eq!(view_tags, e.tags);
                assert_eq!(
                    (
                        view.flags,
                        view.fresh_until,
                        view.stale_until,
                        view.load_micros
                    ),
                    (e.flags, e.fresh_until, e.stale_until, e.load_micros)
                );
                // Every prefix: parsed with all the tags and a shorter payload, or an error.
                for cut in 0..bytes.len() {
                    if let Ok(v) = EnvelopeView::parse(&bytes[..cut]) {
                        assert_eq!(v.tags().count(), e.tags.len());
                        assert!(v.payload.len() < payload.len());
                    }
                }
            }
        }
        let mut not_utf8 = Envelope {
            flags: EnvelopeFlags::default(),
            fresh_until: Timestamp::EPOCH,
            stale_until: Timestamp::EPOCH,
            load_micros: 0,
            tags: vec![("ab".into(), 1)],
            payload: vec![],
        }
        .encode()
        .unwrap();
        not_utf8[HEADER + 2] = 0xff;
        assert!(EnvelopeView::parse(&not_utf8).is_err());
        assert!(Envelope::decode(&not_utf8).is_err());
    }

    #[test]
    fn foreign_bytes_are_errors() {
        assert!(Envelope::decode(b"").is_err());
        assert!(Envelope::decode(b"{\"json\":true,\"from\":\"another program\"}").is_err());
        let mut wrong_version = vec![9u8; 40];
        wrong_version[0] = 2;
        assert!(Envelope::decode(&wrong_version).is_err());
    }

    #[test]
    fn too_many_tags_is_an_error() {
        let e = Envelope {
            flags: EnvelopeFlags::default(),
            fresh_until: Timestamp::EPOCH,
            stale_until: Timestamp::EPOCH,
            load_micros: 0,
            tags: (0..=MAX_TAGS).map(|i| (i.to_string(), 0)).collect(),
            payload: vec![],
        };
        assert!(e.encode().is_err());
    }
}
