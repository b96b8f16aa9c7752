//! Cache codecs: how a typed value becomes the payload of an [`Envelope`](statehouse_core::cache::Envelope), and the
//! optional LZ4 compression of that payload.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;
use statehouse_core::{Error, Result};

use crate::session::JsonCodec;

/// The codec id of [`MsgPackCodec`] in an entry's flags.
pub const MSGPACK_CODEC_ID: u8 = 0;
/// The codec id of [`JsonCodec`] in an entry's flags.
pub const JSON_CODEC_ID: u8 = 1;
/// The codec id of [`RawCodec`] in an entry's flags.
pub const RAW_CODEC_ID: u8 = 2;

/// Turns values of type `V` into the payload bytes of a cache entry, and back.
///
/// Every codec has an [`id`](CacheCodec::id) (0 to 15) written into each entry's flags: an
/// entry written by another codec (a deployment that switched codecs, another program sharing
/// the namespace) is read as a miss and counted in
/// [`CacheStats::decode_errors`](crate::CacheStats::decode_errors), never misread. Ids 0 to 2
/// are the built-in codecs; a codec of your own takes one of 3 to 15.
///
/// The trait is generic over the value rather than over serde, so a codec can serve types that
/// are not serde types (raw bytes: [`RawCodec`]).
///
/// ```
/// use statehouse::{CacheCodec, MsgPackCodec};
/// let bytes = CacheCodec::<Vec<u32>>::encode(&MsgPackCodec, &vec![1, 2, 3])?;
/// let back: Vec<u32> = MsgPackCodec.decode(&bytes)?;
/// assert_eq!(back, [1, 2, 3]);
/// # Ok::<(), statehouse::Error>(())
/// ```
pub trait CacheCodec<V>: Clone + Send + Sync + fmt::Debug + 'static {
    /// This codec's id in an entry's flags, 0 to 15.
    fn id(&self) -> u8;

    /// Encodes `value`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when the value cannot be encoded in this format.
    fn encode(&self, value: &V) -> Result<Vec<u8>>;

    /// Decodes bytes written by [`encode`](Self::encode).
    ///
    /// # Errors
    ///
    /// Any error when the bytes are not a `V` in this format; the cache treats it as a miss.
    fn decode(&self, bytes: &[u8]) -> Result<V>;
}

/// MessagePack through `rmp-serde`, **with named fields** (structs are maps keyed by field
/// name): the cache's default codec.
///
/// Named fields cost a few bytes per field over positional encoding, and buy tolerance to
/// change: adding a field with `#[serde(default)]` reads old entries, removing one ignores it,
/// and reordering fields changes nothing. A positional format (bincode, postcard, rmp's
/// compact mode) would misread every cached entry the first time a struct gained a field,
/// across a whole fleet mid-deploy. Compared with JSON it is smaller and faster, and it keeps
/// bytes as bytes.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use statehouse::{CacheCodec, MsgPackCodec};
///
/// #[derive(Serialize, Deserialize)]
/// struct V1 { name: String }
/// #[derive(Serialize, Deserialize)]
/// struct V2 { name: String, #[serde(default)] age: u32 }
///
/// let old = CacheCodec::<V1>::encode(&MsgPackCodec, &V1 { name: "ada".into() })?;
/// let new: V2 = MsgPackCodec.decode(&old)?;
/// assert_eq!((new.name.as_str(), new.age), ("ada", 0));
/// # Ok::<(), statehouse::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsgPackCodec;

impl<V: Serialize + DeserializeOwned> CacheCodec<V> for MsgPackCodec {
    fn id(&self) -> u8 {
        MSGPACK_CODEC_ID
    }

    fn encode(&self, value: &V) -> Result<Vec<u8>> {
        rmp_serde::to_vec_named(value).map_err(|e| {
            Error::InvalidInput(format!("cache value cannot be encoded as MessagePack: {e}"))
        })
    }

    fn decode(&self, bytes: &[u8]) -> Result<V> {
        rmp_serde::from_slice(bytes).map_err(|e| Error::Backend {
            message: "cached value is not the MessagePack of the requested type".into(),
            source: Some(Box::new(e)),
        })
    }
}

/// JSON (the same [`JsonCodec`] sessions use): readable in `redis-cli`, for values other
/// programs read too.
impl<V: Serialize + DeserializeOwned> CacheCodec<V> for JsonCodec {
    fn id(&self) -> u8 {
        JSON_CODEC_ID
    }

    fn encode(&self, value: &V) -> Result<Vec<u8>> {
        serde_json::to_vec(value)
            .map_err(|e| Error::InvalidInput(format!("cache value cannot be encoded as JSON: {e}")))
    }

    fn decode(&self, bytes: &[u8]) -> Result<V> {
        serde_json::from_slice(bytes).map_err(|e| Error::Backend {
            message: "cached value is not the JSON of the requested type".into(),
            source: Some(Box::new(e)),
        })
    }
}

/// Raw bytes, stored as they are: for values that are already bytes (rendered pages, HTTP
/// bodies, protobuf), with no encoding cost.
///
/// ```
/// use statehouse::{CacheCodec, RawCodec};
/// assert_eq!(RawCodec.encode(&b"abc".to_vec())?, b"abc");
/// # Ok::<(), statehouse::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawCodec;

impl CacheCodec<Vec<u8>> for RawCodec {
    fn id(&self) -> u8 {
        RAW_CODEC_ID
    }

    fn encode(&self, value: &Vec<u8>) -> Result<Vec<u8>> {
        Ok(value.clone())
    }

    fn decode(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        Ok(bytes.to_vec())
    }
}

/// The largest value the cache decompresses (256 MiB): a corrupt or hostile size prefix must
/// not make it allocate gigabytes.
const MAX_DECOMPRESSED: usize = 256 * 1024 * 1024;

/// LZ4 (block format, uncompressed size prepended). `None` when compressing does not make the
/// payload smaller, so incompressible values are stored as they are.
pub(crate) fn compress(payload: &[u8]) -> Option<Vec<u8>> {
    let out = lz4_flex::compress_prepend_size(payload);
    (out.len() < payload.len()).then_some(out)
}

/// Reverses [`compress`]; an error (never a panic, never a huge allocation) for bytes that are
/// not such a block.
pub(crate) fn decompress(bytes: &[u8]) -> Result<Vec<u8>> {
    let bad = |why: String| Error::Backend {
        message: format!("cached value: {why}"),
        source: None,
    };
    let Some(prefix) = bytes.get(..4) else {
        return Err(bad("compressed payload shorter than its size prefix".into()));
    };
    let size = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    // LZ4 cannot expand a block more than about 255 times.
    if size > MAX_DECOMPRESSED || size > bytes.len().saturating_mul(255) {
        return Err(bad(format!(
            "compressed payload claims an implausible size ({size} bytes)"
        )));
    }
    lz4_flex::decompress_size_prepended(bytes)
        .map_err(|e| bad(format!("compressed payload is not valid LZ4: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_round_trips_and_skips_incompressible_values() {
        let text = "abcdefgh".repeat(200);
        let c = compress(text.as_bytes()).expect("compressible");
        assert!(c.len() < text.len());
        assert_eq!(decompress(&c).expect("valid"), text.as_bytes());
        assert!(compress(b"xyz").is_none());
    }

    #[test]
    fn corrupt_compressed_payloads_are_errors() {
        assert!(decompress(b"").is_err());
        assert!(decompress(&[0xff, 0xff, 0xff, 0x7f, 1, 2]).is_err());
        assert!(decompress(&[10, 0, 0, 0, 0xff, 0xff]).is_err());
        let mut c = compress("abcdefgh".repeat(200).as_bytes()).expect("compressible");
        c.truncate(c.len() / 2);
        assert!(decompress(&c).is_err());
    }

    #[test]
    fn codecs_reject_foreign_bytes() {
        assert!(CacheCodec::<Vec<String>>::decode(&MsgPackCodec, b"\xc1").is_err());
        assert!(CacheCodec::<u32>::decode(&JsonCodec, b"{").is_err());
    }
}
