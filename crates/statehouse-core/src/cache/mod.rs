//! Caching: the [`CacheStore`] trait every backend implements (the shared tier, "L2"), the
//! invalidation messages that keep every replica's near cache ("L1") honest, the stored
//! [`Envelope`] format, the [`CachePolicy`] of a key class and the pure decisions on it
//! (freshness, TTL jitter, probabilistic early refresh), and the memory-risk assessment used by
//! the gateway's `doctor`.
//!
//! The store is deliberately small: bytes in, bytes out, leases, tag versions, a prefix purge
//! and an invalidation channel. Everything typed (codecs, the near cache, single flight,
//! stale-while-revalidate) lives in the `statehouse` facade, so both backends share it.
//!
//! ## The lease protocol (the stale-set race)
//!
//! A reader that misses takes a lease *before* it reads the source of truth, and fills the cache
//! with [`CacheStore::set`] passing that lease. Any write or delete of the key in the meantime
//! voids the lease, so the late fill is refused and an old value is never written back after a
//! newer write (the memcache lease of Facebook's NSDI'13 paper; rueidisaside's placeholder CAS).
//! A lease expires on its own (its holder may die), judged by the caller's clock.

mod envelope;
mod memory;
mod policy;

pub use envelope::{Envelope, EnvelopeFlags, EnvelopeView, FORMAT_VERSION, MAX_TAGS};
pub use memory::{MemoryRisk, MemorySettings, RiskLevel, assess_memory};
pub use policy::{CachePolicy, CachePolicyBuilder, Freshness, jittered_ttl, xfetch_refresh_due};

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{Error, Result, Timestamp};

/// The longest cache key accepted, in bytes.
pub const MAX_CACHE_KEY_BYTES: usize = 64 * 1024;

/// Checks a cache key: not empty, at most [`MAX_CACHE_KEY_BYTES`].
///
/// Keys are stored verbatim (any bytes of valid UTF-8, braces and newlines included), so a
/// prefix purge can find them; the store puts the key inside its own hash tag, which keeps a
/// key and its lease in one Redis Cluster slot whatever the key holds.
///
/// ```
/// use statehouse_core::cache::validate_cache_key;
/// assert!(validate_cache_key("user:42").is_ok());
/// assert!(validate_cache_key("").is_err());
/// ```
pub fn validate_cache_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidKey {
            reason: "a cache key must not be empty".into(),
        });
    }
    if key.len() > MAX_CACHE_KEY_BYTES {
        return Err(Error::InvalidKey {
            reason: format!(
                "a cache key must be at most {MAX_CACHE_KEY_BYTES} bytes, this one has {}",
                key.len()
            ),
        });
    }
    Ok(())
}

/// Checks a tag or namespace name: not empty, at most 1 024 bytes.
pub fn validate_tag(tag: &str) -> Result<()> {
    if tag.is_empty() || tag.len() > 1024 {
        return Err(Error::InvalidInput(format!(
            "a cache tag must have 1 to 1024 bytes, this one has {}",
            tag.len()
        )));
    }
    Ok(())
}

/// A lease on one cache key: proof that its holder may fill the key, until a write or delete of
/// the key voids it or it expires.
///
/// ```
/// use statehouse_core::cache::LeaseToken;
/// let a = LeaseToken::generate()?;
/// let b = LeaseToken::generate()?;
/// assert_ne!(a, b);
/// assert_eq!(LeaseToken::parse(a.as_str())?, a);
/// # Ok::<(), statehouse_core::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct LeaseToken(String);

impl LeaseToken {
    /// A new random token (128 bits from the operating system's CSPRNG, hex).
    pub fn generate() -> Result<LeaseToken> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| Error::Backend {
            message: format!("the operating system's random source failed: {e}"),
            source: None,
        })?;
        Ok(LeaseToken(hex::encode(bytes)))
    }

    /// Parses a token read back from a store: 32 lowercase hex digits.
    pub fn parse(s: &str) -> Result<LeaseToken> {
        if s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(LeaseToken(s.to_owned()))
        } else {
            Err(Error::InvalidInput(
                "a lease token is 32 lowercase hex digits".into(),
            ))
        }
    }

    /// The token as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Short on purpose: enough to correlate in logs.
        write!(f, "LeaseToken({}…)", &self.0[..8])
    }
}

/// What a lease request got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// The caller holds the lease and should load and fill the key.
    Acquired(LeaseToken),
    /// Another caller holds a live lease: wait for its fill, or serve stale.
    HeldElsewhere,
}

/// One message on the invalidation channel: what every replica must drop from its near cache.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Invalidation {
    /// These keys were written or deleted.
    Keys(Vec<String>),
    /// This tag (or namespace) was bumped: every entry recorded with an older version is void.
    Tag(String),
    /// Every key starting with this prefix was purged.
    Prefix(String),
    /// Everything may have changed (the store was flushed).
    All,
}

impl Invalidation {
    /// The wire form used on a Redis Pub/Sub channel: a one-byte kind, then the payload.
    /// Keys are separated by a NUL byte, which valid keys may contain, so each key is preceded
    /// by its length in decimal and a colon.
    ///
    /// ```
    /// use statehouse_core::cache::Invalidation;
    /// let inv = Invalidation::Keys(vec!["a:1".into(), "b\0{x}".into()]);
    /// assert_eq!(Invalidation::decode(&inv.encode()).unwrap(), inv);
    /// assert!(Invalidation::decode(b"zzz").is_err());
    /// ```
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Invalidation::Keys(keys) => {
                out.push(b'k');
                for k in keys {
                    out.extend_from_slice(k.len().to_string().as_bytes());
                    out.push(b':');
                    out.extend_from_slice(k.as_bytes());
                }
            }
            Invalidation::Tag(t) => {
                out.push(b't');
                out.extend_from_slice(t.as_bytes());
            }
            Invalidation::Prefix(p) => {
                out.push(b'p');
                out.extend_from_slice(p.as_bytes());
            }
            Invalidation::All => out.push(b'a'),
        }
        out
    }

    /// Parses the wire form; a clear error for anything else (never a panic).
    pub fn decode(bytes: &[u8]) -> Result<Invalidation> {
        let bad = |why: &str| Error::InvalidInput(format!("invalidation message: {why}"));
        let (&kind, rest) = bytes.split_first().ok_or_else(|| bad("empty"))?;
        let text = |b: &[u8]| {
            std::str::from_utf8(b)
                .map(str::to_owned)
                .map_err(|_| bad("not UTF-8"))
        };
        match kind {
            b'k' => {
                let mut keys = Vec::new();
                let mut rest = rest;
                while !rest.is_empty() {
                    let colon = rest
                        .iter()
                        .position(|&b| b == b':')
                        .ok_or_else(|| bad("key length without `:`"))?;
                    let len: usize = std::str::from_utf8(&rest[..colon])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| bad("key length is not a number"))?;
                    let body = &rest[colon + 1..];
                    if body.len() < len {
                        return Err(bad("key shorter than its length"));
                    }
                    keys.push(text(&body[..len])?);
                    rest = &body[len..];
                }
                Ok(Invalidation::Keys(keys))
            }
            b't' => Ok(Invalidation::Tag(text(rest)?)),
            b'p' => Ok(Invalidation::Prefix(text(rest)?)),
            b'a' if rest.is_empty() => Ok(Invalidation::All),
            _ => Err(bad("unknown kind")),
        }
    }
}

/// Receives the invalidation channel's messages and its state. Called from the store's
/// listener task: keep it quick and never block.
pub trait InvalidationSink: Send + Sync + 'static {
    /// A message arrived (from any replica, this one included).
    fn on_invalidation(&self, message: &Invalidation);

    /// The channel was lost: messages may be lost until [`InvalidationSink::on_channel_up`].
    /// A near cache flushes and stops trusting itself.
    fn on_channel_down(&self);

    /// The channel is (again) subscribed; messages published from now on arrive. A near cache
    /// flushes again (messages sent while it was down are lost) and resumes.
    fn on_channel_up(&self);
}

/// Keeps a subscription alive; dropping it unsubscribes.
pub struct InvalidationSubscription {
    _guard: Box<dyn Any + Send + Sync>,
}

impl InvalidationSubscription {
    /// Wraps whatever keeps the subscription alive (a task handle that aborts on drop, a
    /// registry entry): dropping the subscription drops `guard`.
    pub fn new(guard: impl Any + Send + Sync) -> Self {
        InvalidationSubscription {
            _guard: Box::new(guard),
        }
    }
}

impl fmt::Debug for InvalidationSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InvalidationSubscription")
    }
}

/// The shared cache tier: the embedded store, Redis, Redis Cluster. Every implementation passes
/// the cache conformance suite in `statehouse-testkit`.
///
/// Values are opaque bytes (an [`Envelope`] written by the facade). Every key the store writes
/// expires by itself. Every write, delete, tag bump and purge publishes the matching
/// [`Invalidation`] on the store's channel, atomically with the change where the backend can
/// (one Lua script on Redis), so no replica's near cache outlives a change it was not told of.
#[async_trait]
pub trait CacheStore: Send + Sync + fmt::Debug + 'static {
    /// The value at `key`, or `None`.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// [`get`](Self::get) bounded by the caller's `timeout` as well as by the store's own call
    /// deadline: `Some` with the result, which is [`Error::Timeout`] carrying the shorter of
    /// the two durations when that one passes first; or `None` (the default) when the store
    /// does not bound its calls itself, and the caller must bound [`get`](Self::get) on its
    /// own.
    ///
    /// This lets a caller with a deadline of its own (the `statehouse` facade's `Cache`) read
    /// without arming a timer of its own around a call the store already times (the Redis
    /// store's coalesced reads arm none per read at all).
    async fn get_within(&self, key: &str, timeout: Duration) -> Option<Result<Option<Vec<u8>>>> {
        let _ = (key, timeout);
        None
    }

    /// Stores `value` at `key` for `ttl` and publishes `Invalidation::Keys([key])`.
    ///
    /// With `lease: None` this is a write: it always succeeds and voids any outstanding lease on
    /// the key. With `lease: Some(token)` it is a fill: it succeeds only while `token` is the
    /// key's current lease (no write or delete happened since it was granted), consumes the
    /// lease, and returns `false` (storing nothing) otherwise.
    async fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        lease: Option<&LeaseToken>,
    ) -> Result<bool>;

    /// Deletes `key` and voids its lease; publishes `Invalidation::Keys([key])`. `true` when a
    /// value was there.
    async fn delete(&self, key: &str) -> Result<bool>;

    /// Asks for the lease on `key`, valid for `ttl` from `now` (the caller's clock). Granted when
    /// no lease is held or the held one expired by `now`.
    async fn acquire_lease(&self, key: &str, now: Timestamp, ttl: Duration)
    -> Result<LeaseOutcome>;

    /// Gives a lease back without filling (the loader failed or was cancelled); `false` when it
    /// was no longer the key's lease.
    async fn release_lease(&self, key: &str, token: &LeaseToken) -> Result<bool>;

    /// The current version of each tag, in order. A tag never seen before gets a random
    /// starting version, stored, so an evicted or new tag key can never make an old entry valid
    /// again.
    async fn tag_versions(&self, tags: &[String]) -> Result<Vec<u64>>;

    /// Moves `tag` to a new version (O(1): every entry recorded with an older one is void) and
    /// publishes `Invalidation::Tag(tag)`. Returns the new version.
    async fn bump_tag(&self, tag: &str) -> Result<u64>;

    /// Deletes every key that starts with `prefix` (on Redis: `SCAN` + `UNLINK` on every master,
    /// never `KEYS`) and publishes `Invalidation::Prefix(prefix)`. Returns how many were deleted.
    async fn purge_prefix(&self, prefix: &str) -> Result<u64>;

    /// Subscribes `sink` to the invalidation channel. The sink gets `on_channel_up` once the
    /// subscription is live, and `on_channel_down`/`on_channel_up` around every loss of it.
    async fn subscribe(&self, sink: Arc<dyn InvalidationSink>) -> Result<InvalidationSubscription>;

    /// How many failure domains the store has: parts that can fail while the others go on
    /// (groups of hash slots of a Redis Cluster). A caller with a circuit breaker (the
    /// `statehouse` facade's `Cache`) keeps one per domain. The default is 1.
    fn failure_domains(&self) -> usize {
        1
    }

    /// The failure domain, below [`failure_domains`](Self::failure_domains), of `key`. The
    /// default is 0.
    fn failure_domain(&self, key: &str) -> usize {
        let _ = key;
        0
    }
}

#[async_trait]
impl<S: CacheStore + ?Sized> CacheStore for Arc<S> {
    fn failure_domains(&self) -> usize {
        (**self).failure_domains()
    }
    fn failure_domain(&self, key: &str) -> usize {
        (**self).failure_domain(key)
    }
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        (**self).get(key).await
    }
    async fn get_within(&self, key: &str, timeout: Duration) -> Option<Result<Option<Vec<u8>>>> {
        (**self).get_within(key, timeout).await
    }
    async fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        lease: Option<&LeaseToken>,
    ) -> Result<bool> {
        (**self).set(key, value, ttl, lease).await
    }
    async fn delete(&self, key: &str) -> Result<bool> {
        (**self).delete(key).await
    }
    async fn acquire_lease(
        &self,
        key: &str,
        now: Timestamp,
        ttl: Duration,
    ) -> Result<LeaseOutcome> {
        (**self).acquire_lease(key, now, ttl).await
    }
    async fn release_lease(&self, key: &str, token: &LeaseToken) -> Result<bool> {
        (**self).release_lease(key, token).await
    }
    async fn tag_versions(&self, tags: &[String]) -> Result<Vec<u64>> {
        (**self).tag_versions(tags).await
    }
    async fn bump_tag(&self, tag: &str) -> Result<u64> {
        (**self).bump_tag(tag).await
    }
    async fn purge_prefix(&self, prefix: &str) -> Result<u64> {
        (**self).purge_prefix(prefix).await
    }
    async fn subscribe(&self, sink: Arc<dyn InvalidationSink>) -> Result<InvalidationSubscription> {
        (**self).subscribe(sink).await
    }
}
