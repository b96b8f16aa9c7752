//! Redis Cluster hash slots: which of the 16384 slots a key belongs to.

/// The number of hash slots of a Redis Cluster.
pub const SLOT_COUNT: u16 = 16384;

/// The Redis Cluster hash slot of `key`: CRC16/XMODEM of the key modulo 16384, where a key
/// holding a non-empty `{...}` hash tag is hashed on the tag alone (the text between its first
/// `{` and the next `}`), exactly as the Redis Cluster specification says.
///
/// Statehouse's storage keys carry the caller's encoded key as their hash tag, so every policy
/// of one key lands in one slot.
///
/// ```
/// use statehouse_redis::hash_slot;
/// assert_eq!(hash_slot(b"foo"), 12182);
/// assert_eq!(hash_slot(b"{user1000}.following"), hash_slot(b"{user1000}.followers"));
/// assert_eq!(hash_slot(b"123456789"), 12739);
/// // Statehouse's storage keys are hashed on the caller's (encoded) key.
/// assert_eq!(hash_slot(b"sh:rl:{user:1}:gcra:60000000"), hash_slot(b"user:1"));
/// ```
pub fn hash_slot(key: &[u8]) -> u16 {
    crc16_xmodem(hash_tag(key)) % SLOT_COUNT
}

/// The part of `key` that is hashed: the first non-empty `{...}` tag, or the whole key.
fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{')
        && let Some(len) = key[open + 1..].iter().position(|&b| b == b'}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

/// CRC-16/XMODEM (polynomial 0x1021, initial value 0, no reflection), the checksum Redis Cluster
/// uses. Bitwise rather than table-driven: keys are short, and this runs once per key per call.
fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_the_reference_check_value() {
        // The check value of CRC-16/XMODEM, also given in the Redis Cluster specification.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
    }

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on a real server.
        assert_eq!(hash_slot(b"foo"), 12182);
        assert_eq!(hash_slot(b"bar"), 5061);
        assert_eq!(hash_slot(b"123456789"), 12739);
        assert_eq!(hash_slot(b""), 0);
    }

    #[test]
    fn hash_tags_follow_the_specification() {
        assert_eq!(
            hash_slot(b"{user1000}.following"),
            hash_slot(b"{user1000}.followers")
        );
        assert_eq!(hash_slot(b"{user1000}.following"), hash_slot(b"user1000"));
        // Only the first tag counts.
        assert_eq!(hash_slot(b"foo{bar}{zap}"), hash_slot(b"bar"));
        // An empty first tag means the whole key is hashed.
        assert_eq!(
            hash_slot(b"foo{}{bar}"),
            crc16_xmodem(b"foo{}{bar}") % SLOT_COUNT
        );
        // `{{bar}}` hashes `{bar`.
        assert_eq!(hash_slot(b"foo{{bar}}zap"), hash_slot(b"{bar"));
        // An unclosed brace means no tag.
        assert_eq!(hash_slot(b"foo{bar"), crc16_xmodem(b"foo{bar") % SLOT_COUNT);
        assert_eq!(
            hash_slot(b"sh:rl:{user:1}:gcra:60000000"),
            hash_slot(b"user:1")
        );
    }
}
