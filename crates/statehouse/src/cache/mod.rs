//! [`Cache`]: a typed cache for one key class over a shared [`CacheStore`] (the embedded store,
//! Redis, Redis Cluster: "L2"), with a near cache per replica ("L1") kept honest by the
//! store's invalidation channel, single flight in the process, a lease across replicas, and
//! the TTL policy of [`CachePolicy`] (jitter, negative caching, stale-while-revalidate,
//! stale-if-error, XFetch early refresh).
//!
//! ## Reads
//!
//! [`Cache::get`] answers from the near cache, else from the store, and says which
//! ([`Lookup`]). [`Cache::get_or_load`] also loads what is missing: one caller per key and
//! process runs the loader while the others wait for its result (single flight), and across
//! replicas only the holder of the key's lease loads; the others poll the store for its fill
//! (2 ms, doubling to 50 ms) and take the lease over if it is released or expires. A loader
//! error is returned to every caller that waited for it and never cached.
//!
//! ## Consistency
//!
//! * **Read your writes.** [`set`](Cache::set), [`delete`](Cache::delete) and the
//!   invalidations drop this replica's near-cache entry before they return.
//! * **Other replicas** drop theirs when the store's invalidation message arrives. Until then
//!   they may serve the old value. The documented bound is **1 s on Redis** (asserted by the
//!   `writes_invalidate_other_replicas` test on standalone and Cluster; measured 2–5 ms on the
//!   shared 2-core test machine, and about 0.1 ms on the embedded store, where the message is
//!   delivered before the write returns). The near cache's
//!   [`max_ttl`](NearCacheConfig::max_ttl) bounds how long if a message is lost without the
//!   channel noticing.
//! * **A lost channel** flushes the near cache, which is bypassed (every read goes to the
//!   store) until the channel is back, and flushed again then: messages sent meanwhile are lost.
//! * **The stale-set race** (a slow loader filling an old value after a newer write) is closed
//!   by the lease: any write or delete voids it and the late fill is refused. The loaded value
//!   is still returned to the caller that loaded it, but not cached.
//! * **The late-fill race** (a store read that began before an invalidation, answered after it)
//!   is closed by an invalidation ticket taken before the read: the answer is returned to its
//!   caller but never put in the near cache.
//!
//! ## Store outages
//!
//! Every store call has a [deadline](CacheBuilder::deadline) (100 ms by default).
//! [`get_or_load`](Cache::get_or_load) with the store down or slow calls the loader and
//! returns its value without caching it ([`Source::Bypassed`], counted in
//! [`CacheStats::store_errors`]); [`get`](Cache::get) and the writes return the error
//! ([`Error::is_unavailable`]). A [circuit breaker](CacheBuilder::circuit_breaker) (3
//! failures in a row, then 1 s without calling the store, then one probe) makes a dead store
//! cost microseconds per call rather than a deadline; near-cache hits go on as before.
//!
//! ## Stored entries
//!
//! The store key of `key` is `<namespace>:<key>`. Each entry is an [`Envelope`]: its fresh and
//! stale times (from the cache's [`Clock`]), the load time (XFetch's δ), its tags with their
//! versions, the codec's id, and the payload ([`MsgPackCodec`] by default, LZ4-compressed
//! above [`compress_above`](CacheBuilder::compress_above), 1 KiB by default). Every entry is
//! tagged with its namespace (`ns:<namespace>`), so [`invalidate_namespace`](Cache::invalidate_namespace)
//! is one O(1) tag bump. The store keeps an entry until its stale window ends. An entry that
//! does not decode (another codec, another program's bytes, corrupt compression) is a miss,
//! counted in [`CacheStats::decode_errors`], never an error or a panic.
//!
//! ## Observability
//!
//! [`Cache::stats`] returns plain counters ([`CacheStats`]), like the rate limiter's
//! [`LimiterStats`](crate::LimiterStats): no metrics crate is imposed on applications; the
//! gateway exports them.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use statehouse::{Cache, CachePolicy, EmbeddedCacheStore};
//!
//! let store = Arc::new(EmbeddedCacheStore::new());
//! let users = Cache::<String>::builder(store, "users")
//!     .policy(CachePolicy::ttl(Duration::from_secs(60))?)
//!     .build()
//!     .await?;
//!
//! let name = users
//!     .get_or_load("42", || async { Ok::<_, std::io::Error>(Some("Ada".to_string())) })
//!     .await?;
//! assert_eq!(name.as_deref().map(String::as_str), Some("Ada"));
//! assert!(users.get("42").await?.is_hit());
//! users.delete("42").await?;
//! assert!(users.get("42").await?.is_miss());
//! # Ok(())
//! # }
//! ```

mod codec;
mod flight;
mod near;
mod stats;

pub use codec::{
    CacheCodec, JSON_CODEC_ID, MSGPACK_CODEC_ID, MsgPackCodec, RAW_CODEC_ID, RawCodec,
};
pub use stats::CacheStats;

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use statehouse_core::cache::{
    CachePolicy, CacheStore, Envelope, EnvelopeFlags, EnvelopeView, Freshness, InvalidationSink,
    InvalidationSubscription, LeaseOutcome, LeaseToken, MAX_CACHE_KEY_BYTES, MAX_TAGS,
    jittered_ttl, validate_tag, xfetch_refresh_due,
};
use statehouse_core::{Clock, Error, Result, SystemClock, Timestamp};

use crate::breaker::{Admission, Breakers, CircuitBreaker, CircuitBreakerConfig, Permit};
use flight::{Flights, Join, Shared};
use near::{NearCache, NearEntry};
use stats::CacheCounters;

/// The default per-call deadline of a [`Cache`]: 100 ms, as [`Sessions`](crate::Sessions).
/// A cache read slower than that is slower than most loads it would save.
pub const DEFAULT_CACHE_DEADLINE: Duration = Duration::from_millis(100);

/// Payloads above this many bytes are LZ4-compressed by default (when that makes them smaller).
pub const DEFAULT_COMPRESS_ABOVE: usize = 1024;

/// The first poll for another replica's fill waits this long; each next one twice as long.
/// Store keys (`<namespace>:<key>`) up to this many bytes are built on the stack for a read.
const INLINE_STORE_KEY: usize = 128;
const LEASE_POLL_START: Duration = Duration::from_millis(2);
/// The longest wait between two polls for another replica's fill.
const LEASE_POLL_MAX: Duration = Duration::from_millis(50);

/// The near cache (L1) of each replica: how many bytes it may hold, and the longest it keeps an
/// entry. An entry never outlives the stored entry it copies (its stale window's end) either.
///
/// ```
/// use statehouse::NearCacheConfig;
/// let c = NearCacheConfig::default();
/// assert_eq!(c.max_bytes, 16 * 1024 * 1024);
/// assert_eq!(c.max_ttl.as_secs(), 60);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NearCacheConfig {
    /// The byte bound: keys, encoded payloads and about 128 bytes of bookkeeping per entry.
    /// Default 16 MiB.
    pub max_bytes: usize,
    /// The longest an entry is kept, however long the stored entry lives: the bound on
    /// staleness when an invalidation message is lost. Default 60 s.
    pub max_ttl: Duration,
}

impl Default for NearCacheConfig {
    fn default() -> Self {
        NearCacheConfig {
            max_bytes: 16 * 1024 * 1024,
            max_ttl: Duration::from_secs(60),
        }
    }
}

/// Which tier answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// This replica's near cache (L1).
    Near,
    /// The shared store (L2).
    Remote,
}

/// What [`Cache::get`] found.
#[derive(Debug)]
pub enum Lookup<V> {
    /// A fresh value.
    Hit {
        /// The value, shared with the near cache (no copy on a near-cache hit).
        value: Arc<V>,
        /// Where it came from.
        tier: Tier,
    },
    /// The key is known not to exist (negative caching).
    Negative {
        /// Where that came from.
        tier: Tier,
    },
    /// A value past its fresh time but within its stale-while-revalidate window.
    Stale {
        /// The value.
        value: Arc<V>,
        /// Where it came from.
        tier: Tier,
    },
    /// Nothing usable.
    Miss,
}

impl<V> Clone for Lookup<V> {
    fn clone(&self) -> Self {
        match self {
            Lookup::Hit { value, tier } => Lookup::Hit {
                value: value.clone(),
                tier: *tier,
            },
            Lookup::Negative { tier } => Lookup::Negative { tier: *tier },
            Lookup::Stale { value, tier } => Lookup::Stale {
                value: value.clone(),
                tier: *tier,
            },
            Lookup::Miss => Lookup::Miss,
        }
    }
}

impl<V> Lookup<V> {
    /// The value of a hit or a stale answer.
    pub fn value(&self) -> Option<&Arc<V>> {
        match self {
            Lookup::Hit { value, .. } | Lookup::Stale { value, .. } => Some(value),
            _ => None,
        }
    }

    /// The value of a hit or a stale answer.
    pub fn into_value(self) -> Option<Arc<V>> {
        match self {
            Lookup::Hit { value, .. } | Lookup::Stale { value, .. } => Some(value),
            _ => None,
        }
    }

    /// A fresh value.
    pub fn is_hit(&self) -> bool {
        matches!(self, Lookup::Hit { .. })
    }

    /// Nothing usable (a negative answer is not a miss).
    pub fn is_miss(&self) -> bool {
        matches!(self, Lookup::Miss)
    }

    /// The tier that answered, for anything but a miss.
    pub fn tier(&self) -> Option<Tier> {
        match self {
            Lookup::Hit { tier, .. } | Lookup::Negative { tier } | Lookup::Stale { tier, .. } => {
                Some(*tier)
            }
            Lookup::Miss => None,
        }
    }
}

/// How [`Cache::get_or_load_with`] got its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Source {
    /// A fresh entry (or "known absent") in the near cache.
    Near,
    /// A fresh entry (or "known absent") in the store, possibly filled by another replica
    /// while this caller waited for its lease.
    Remote,
    /// A stale value within its stale-while-revalidate window; one refresh runs in the
    /// background.
    Stale,
    /// A stale value within its stale-if-error window, served because the loader failed.
    StaleIfError,
    /// This caller ran the loader (the result was cached unless the loader said not to, the
    /// lease was voided by a write, or the store failed).
    Loaded,
    /// Another caller in this process ran the loader; this one waited for its result.
    Coalesced,
    /// The store was unavailable or past the deadline: the loader's value, not cached.
    Bypassed,
}

/// The answer of [`Cache::get_or_load_with`]: the value (`None`: it does not exist) and how it
/// was obtained.
#[derive(Debug)]
pub struct Fetched<V> {
    /// The value, or `None` when the loader (now or earlier, through negative caching) found
    /// nothing.
    pub value: Option<Arc<V>>,
    /// Where the answer came from.
    pub source: Source,
}

impl<V> Clone for Fetched<V> {
    fn clone(&self) -> Self {
        Fetched {
            value: self.value.clone(),
            source: self.source,
        }
    }
}

/// What a loader of [`Cache::get_or_load_with`] found, and how to cache it.
///
/// ```
/// use std::time::Duration;
/// use statehouse::Loaded;
/// let page = Loaded::found("<html>…")
///     .ttl(Duration::from_secs(30)) // e.g. from `Cache-Control: s-maxage=30`
///     .tag("product:7");
/// let private: Loaded<&str> = Loaded::found("secret").do_not_store();
/// let gone: Loaded<&str> = Loaded::not_found();
/// # let _ = (page, private, gone);
/// ```
#[derive(Debug, Clone)]
pub struct Loaded<V> {
    value: Option<V>,
    ttl: Option<Duration>,
    tags: Vec<String>,
    store: bool,
}

impl<V> Loaded<V> {
    /// The value exists.
    pub fn found(value: V) -> Self {
        Loaded::from_option(Some(value))
    }

    /// The value does not exist (cached as "known absent" when the policy has a negative TTL
    /// or [`ttl`](Self::ttl) is given).
    pub fn not_found() -> Self {
        Loaded::from_option(None)
    }

    /// [`found`](Self::found) or [`not_found`](Self::not_found).
    pub fn from_option(value: Option<V>) -> Self {
        Loaded {
            value,
            ttl: None,
            tags: Vec::new(),
            store: true,
        }
    }

    /// The fresh TTL of this entry instead of the policy's (for a value: its fresh TTL, the
    /// policy's stale windows still follow; for "not found": its negative TTL). Jittered like
    /// the policy's.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Tags the entry (for [`Cache::invalidate_tag`]).
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Returns the value to the caller (and its waiters) without caching it.
    pub fn do_not_store(mut self) -> Self {
        self.store = false;
        self
    }
}

/// Options of [`Cache::set_with`].
///
/// ```
/// use std::time::Duration;
/// use statehouse::SetOptions;
/// let o = SetOptions::default().ttl(Duration::from_secs(5)).tag("team:7");
/// # let _ = o;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetOptions {
    ttl: Option<Duration>,
    tags: Vec<String>,
}

impl SetOptions {
    /// The fresh TTL instead of the policy's (still jittered; the stale windows follow).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Tags the entry (for [`Cache::invalidate_tag`]).
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }
}

/// The error of [`Cache::get_or_load`]: the loader's, or the cache's own.
///
/// A loader error is shared by every caller that waited for that load (single flight), hence
/// the `Arc`. It is never cached.
#[derive(Debug)]
pub enum CacheError<E> {
    /// The loader failed (and no stale value could be served instead).
    Load(Arc<E>),
    /// The cache failed: invalid input (an empty or oversized key). Store outages are not
    /// reported here: the loader's value is served instead.
    Store(Error),
}

impl<E> CacheError<E> {
    /// The loader's error, if that is what this is.
    pub fn load_error(&self) -> Option<&E> {
        match self {
            CacheError::Load(e) => Some(e),
            CacheError::Store(_) => None,
        }
    }

    /// The loader's error, shared with the other callers that waited for the same load.
    pub fn into_load_error(self) -> Option<Arc<E>> {
        match self {
            CacheError::Load(e) => Some(e),
            CacheError::Store(_) => None,
        }
    }

    /// The cache's error, if that is what this is.
    pub fn store_error(&self) -> Option<&Error> {
        match self {
            CacheError::Store(e) => Some(e),
            CacheError::Load(_) => None,
        }
    }
}

impl<E: fmt::Display> fmt::Display for CacheError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheError::Load(e) => write!(f, "cache loader failed: {e}"),
            CacheError::Store(e) => write!(f, "cache: {e}"),
        }
    }
}

/// An error for any loader error that can be shown, so `Box<dyn Error>`, `BoxError` and
/// `anyhow::Error` loaders (which do not implement `std::error::Error` themselves) work with
/// `?`. The loader's error is in the message (and [`load_error`](CacheError::load_error)),
/// not in [`source`](std::error::Error::source), which only a bound on `E: Error` could give.
impl<E: fmt::Debug + fmt::Display> std::error::Error for CacheError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CacheError::Load(_) => None,
            CacheError::Store(e) => Some(e),
        }
    }
}

impl<E> From<Error> for CacheError<E> {
    fn from(e: Error) -> Self {
        CacheError::Store(e)
    }
}

/// Builds a [`Cache`]; from [`Cache::builder`].
#[derive(Debug)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct CacheBuilder<V, C = MsgPackCodec> {
    store: Arc<dyn CacheStore>,
    namespace: String,
    policy: Option<CachePolicy>,
    near: Option<NearCacheConfig>,
    codec: C,
    compress_above: Option<usize>,
    clock: Arc<dyn Clock>,
    deadline: Duration,
    breaker: CircuitBreakerConfig,
    _value: std::marker::PhantomData<fn() -> V>,
}

impl<V: Send + Sync + 'static, C: CacheCodec<V>> CacheBuilder<V, C> {
    /// The TTL policy. Default: 5 minutes fresh, the other defaults of
    /// [`CachePolicy::builder`] (10 % jitter, no stale serving, no negative caching).
    pub fn policy(mut self, policy: CachePolicy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// The near cache's bounds; default [`NearCacheConfig::default`] (16 MiB, 60 s).
    pub fn near_cache(mut self, config: NearCacheConfig) -> Self {
        self.near = Some(config);
        self
    }

    /// No near cache: every read goes to the store. The cache still subscribes to
    /// invalidations, to trust the tag versions it learned.
    pub fn without_near_cache(mut self) -> Self {
        self.near = None;
        self
    }

    /// The codec; default [`MsgPackCodec`].
    pub fn codec<D: CacheCodec<V>>(self, codec: D) -> CacheBuilder<V, D> {
        CacheBuilder {
            store: self.store,
            namespace: self.namespace,
            policy: self.policy,
            near: self.near,
            codec,
            compress_above: self.compress_above,
            clock: self.clock,
            deadline: self.deadline,
            breaker: self.breaker,
            _value: std::marker::PhantomData,
        }
    }

    /// LZ4-compress payloads longer than `bytes` (kept only when smaller); default
    /// [`DEFAULT_COMPRESS_ABOVE`] (1 KiB).
    pub fn compress_above(mut self, bytes: usize) -> Self {
        self.compress_above = Some(bytes);
        self
    }

    /// Never compress.
    pub fn without_compression(mut self) -> Self {
        self.compress_above = None;
        self
    }

    /// The clock of entries' fresh and stale times, leases and load durations. Default
    /// [`SystemClock`]; all replicas must read the same time (as the store's stored times are
    /// absolute).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The hard deadline of one store call. Default [`DEFAULT_CACHE_DEADLINE`] (100 ms); more
    /// than zero, at most one hour. [`Cache::purge_prefix`] has none (it scans).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The circuit breaker in front of the store, as the rate limiter's and the sessions':
    /// after `failure_threshold` failures in a row (unavailable or past the deadline) the
    /// store is not called for `open_for`, so that a dead store costs microseconds per call
    /// instead of a deadline: [`get_or_load`](Cache::get_or_load) goes straight to its loader
    /// ([`Source::Bypassed`]), [`get`](Cache::get) and the writes fail at once
    /// ([`Error::is_unavailable`]); then one call probes the store. Near-cache hits never touch
    /// it. Default 3 failures, 1 s, on the cache's [`clock`](Self::clock).
    pub fn circuit_breaker(mut self, config: CircuitBreakerConfig) -> Self {
        self.breaker = config;
        self
    }

    /// Builds, and subscribes the near cache to the store's invalidations (waiting, within
    /// ten deadlines and at least 5 s, for the subscription).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for an invalid namespace (empty, over 1 000 bytes, or with a
    /// `:`), a deadline of zero or above one hour, a codec id above 15 or a near cache with a zero `max_ttl`; the
    /// store's error when it cannot subscribe.
    pub async fn build(self) -> Result<Cache<V, C>> {
        validate_tag(&self.namespace)?;
        if self.namespace.contains(':') || self.namespace.len() > 1000 {
            return Err(Error::InvalidInput(
                "a cache namespace must not contain `:` and must be at most 1000 bytes".into(),
            ));
        }
        self.breaker.validate()?;
        statehouse_core::check_deadline("deadline", self.deadline)?;
        if self.codec.id() > 15 {
            return Err(Error::InvalidInput(format!(
                "a cache codec id is 0 to 15, this one is {}",
                self.codec.id()
            )));
        }
        if let Some(n) = self.near
            && n.max_bytes > 0
            && n.max_ttl.is_zero()
        {
            return Err(Error::InvalidInput(
                "near cache `max_ttl` must be more than zero".into(),
            ));
        }
        let policy = match self.policy {
            Some(p) => p,
            None => CachePolicy::ttl(Duration::from_secs(300))?,
        };
        let counters = Arc::new(CacheCounters::default());
        let near_config = self.near.unwrap_or(NearCacheConfig {
            max_bytes: 0,
            max_ttl: Duration::from_secs(1),
        });
        let flights = Arc::new(Flights::new());
        let near = Arc::new(NearCache::new(
            &self.namespace,
            near_config.max_bytes,
            near_config.max_ttl,
            counters.clone(),
            flights.clone(),
        ));
        let domains = self.store.failure_domains();
        let sink: Arc<dyn InvalidationSink> = near.clone();
        let wait = (self.deadline * 10).max(Duration::from_secs(5));
        let subscription = tokio::time::timeout(wait, self.store.subscribe(sink))
            .await
            .unwrap_or(Err(Error::Timeout { deadline: wait }))?;
        Ok(Cache {
            inner: Arc::new(Inner {
                key_prefix: format!("{}:", self.namespace),
                namespace_tag: format!("ns:{}", self.namespace),
                namespace: self.namespace,
                store: self.store,
                policy,
                codec: self.codec,
                compress_above: self.compress_above,
                clock: self.clock,
                deadline: self.deadline,
                breakers: Breakers::new(self.breaker, domains),
                l1: near_config.max_bytes > 0,
                near,
                _subscription: subscription,
                flights,
                counters,
            }),
        })
    }
}

/// A typed cache of one key class (a namespace) over a [`CacheStore`], with a near cache,
/// single flight, leases and a [`CachePolicy`]; see the [module docs](self).
///
/// Cheap to clone (an `Arc` inside); clones share the near cache, flights and counters.
/// Build one per key class and replica. Calls need a Tokio runtime with its time driver.
pub struct Cache<V, C = MsgPackCodec> {
    inner: Arc<Inner<V, C>>,
}

impl<V, C> Clone for Cache<V, C> {
    fn clone(&self) -> Self {
        Cache {
            inner: self.inner.clone(),
        }
    }
}

impl<V, C: fmt::Debug> fmt::Debug for Cache<V, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("namespace", &self.inner.namespace)
            .field("store", &self.inner.store)
            .field("policy", &self.inner.policy)
            .field("codec", &self.inner.codec)
            .field("near_cache", &self.inner.l1)
            .finish_non_exhaustive()
    }
}

struct Inner<V, C> {
    store: Arc<dyn CacheStore>,
    namespace: String,
    /// `"<namespace>:"`.
    key_prefix: String,
    /// `"ns:<namespace>"`.
    namespace_tag: String,
    policy: CachePolicy,
    codec: C,
    compress_above: Option<usize>,
    clock: Arc<dyn Clock>,
    deadline: Duration,
    /// In front of every store call, one per failure domain of the store (see "Store
    /// outages" in the module docs).
    breakers: Breakers,
    /// Whether the near cache holds entries (it always tracks tag versions).
    l1: bool,
    near: Arc<NearCache<V>>,
    _subscription: InvalidationSubscription,
    flights: Arc<Flights<V>>,
    counters: Arc<CacheCounters>,
}

/// A stale value kept for stale-if-error.
struct StaleValue<V> {
    value: Arc<V>,
    stale_until: Timestamp,
}

/// An entry read from the store, judged.
struct RemoteEntry<V> {
    entry: NearEntry<V>,
    freshness: Freshness,
}

/// An entry ready to store.
struct Encoded<V> {
    bytes: Vec<u8>,
    store_ttl: Duration,
    near: NearEntry<V>,
    payload_len: usize,
}

/// Gives a lease back if its holder stops without filling (error, cancellation).
struct LeaseGuard {
    store: Arc<dyn CacheStore>,
    key: String,
    token: Option<LeaseToken>,
    deadline: Duration,
}

impl LeaseGuard {
    fn token(&self) -> Option<&LeaseToken> {
        self.token.as_ref()
    }

    /// The fill consumed the lease (or was refused): nothing to give back.
    fn disarm(&mut self) {
        self.token = None;
    }

    async fn release(mut self) {
        if let Some(token) = self.token.take() {
            let _ =
                tokio::time::timeout(self.deadline, self.store.release_lease(&self.key, &token))
                    .await;
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let Some(token) = self.token.take() else {
            return;
        };
        // Cancelled mid-load: give the lease back in the background so another replica need
        // not wait for it to expire.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let store = self.store.clone();
            let key = std::mem::take(&mut self.key);
            let deadline = self.deadline;
            runtime.spawn(async move {
                let _ = tokio::time::timeout(deadline, store.release_lease(&key, &token)).await;
            });
        }
    }
}

impl<V: Send + Sync + 'static> Cache<V, MsgPackCodec> {
    /// Starts building a cache of namespace `namespace` over `store`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), statehouse::Error> {
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use statehouse::{Cache, CachePolicy, EmbeddedCacheStore, JsonCodec, NearCacheConfig};
    ///
    /// let policy = CachePolicy::builder(Duration::from_secs(60))
    ///     .stale_while_revalidate(Duration::from_secs(30))
    ///     .negative_ttl(Duration::from_secs(5))
    ///     .build()?;
    /// let cache = Cache::<Vec<u32>>::builder(Arc::new(EmbeddedCacheStore::new()), "scores")
    ///     .policy(policy)
    ///     .near_cache(NearCacheConfig { max_bytes: 1 << 20, max_ttl: Duration::from_secs(10) })
    ///     .codec(JsonCodec)
    ///     .deadline(Duration::from_millis(50))
    ///     .build()
    ///     .await?;
    /// cache.set("a", &vec![1, 2]).await?;
    /// assert_eq!(cache.get("a").await?.value().map(|v| v.len()), Some(2));
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder(store: Arc<dyn CacheStore>, namespace: &str) -> CacheBuilder<V, MsgPackCodec> {
        CacheBuilder {
            store,
            namespace: namespace.to_owned(),
            policy: None,
            near: Some(NearCacheConfig::default()),
            codec: MsgPackCodec,
            compress_above: Some(DEFAULT_COMPRESS_ABOVE),
            clock: Arc::new(SystemClock),
            deadline: DEFAULT_CACHE_DEADLINE,
            breaker: CircuitBreakerConfig::default(),
            _value: std::marker::PhantomData,
        }
    }
}

impl<V: Send + Sync + 'static, C: CacheCodec<V>> Cache<V, C> {
    /// The value at `key`: from the near cache, else the store.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`] for an empty key or one that makes the store key longer than
    /// [`MAX_CACHE_KEY_BYTES`]; the store's error (an outage: [`Error::is_unavailable`]).
    pub async fn get(&self, key: &str) -> Result<Lookup<V>> {
        self.check_key(key)?;
        let inner = &*self.inner;
        let now = inner.clock.now();
        if let Some(found) = self.near_lookup(key, now) {
            match (found.0, found.1) {
                (Freshness::Fresh, Some(value)) => {
                    return Ok(Lookup::Hit {
                        value,
                        tier: Tier::Near,
                    });
                }
                (Freshness::Fresh, None) => {
                    CacheCounters::bump(&inner.counters.negative_hits);
                    return Ok(Lookup::Negative { tier: Tier::Near });
                }
                (Freshness::StaleWhileRevalidate, Some(value)) => {
                    CacheCounters::bump(&inner.counters.stale_served);
                    return Ok(Lookup::Stale {
                        value,
                        tier: Tier::Near,
                    });
                }
                _ => {}
            }
        }
        let Some(remote) = self.read_remote(key, now).await? else {
            return Ok(Lookup::Miss);
        };
        Ok(match (remote.freshness, remote.entry.value) {
            (Freshness::Fresh, Some(value)) => Lookup::Hit {
                value,
                tier: Tier::Remote,
            },
            (Freshness::Fresh, None) => {
                CacheCounters::bump(&inner.counters.negative_hits);
                Lookup::Negative { tier: Tier::Remote }
            }
            (Freshness::StaleWhileRevalidate, Some(value)) => {
                CacheCounters::bump(&inner.counters.stale_served);
                Lookup::Stale {
                    value,
                    tier: Tier::Remote,
                }
            }
            _ => Lookup::Miss,
        })
    }

    /// The value at `key`, loading it with `loader` on a miss (`Ok(None)`: it does not exist).
    /// See [`get_or_load_with`](Self::get_or_load_with), which this calls, for the details.
    ///
    /// # Errors
    ///
    /// [`CacheError::Load`] with the loader's error; [`CacheError::Store`] for an invalid key.
    pub async fn get_or_load<F, Fut, E>(
        &self,
        key: &str,
        loader: F,
    ) -> std::result::Result<Option<Arc<V>>, CacheError<E>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<V>, E>> + Send + 'static,
        E: Send + Sync + 'static,
    {
        let fetched = self
            .get_or_load_with(key, move || async move {
                loader().await.map(Loaded::from_option)
            })
            .await?;
        Ok(fetched.value)
    }

    /// The value at `key`, loading it on a miss; the loader says what it found and how to
    /// cache it ([`Loaded`]: its own TTL, tags, or not at all).
    ///
    /// * A fresh entry (near cache, then store) is returned; with XFetch on, a refresh may
    ///   start in the background as expiry nears.
    /// * A stale entry within stale-while-revalidate is returned ([`Source::Stale`]) and one
    ///   refresh starts in the background (coalesced with any running load of the key).
    /// * Otherwise one caller in this process loads (the others wait: [`Source::Coalesced`]),
    ///   under the key's lease; if another replica holds the lease, it polls the store for that
    ///   replica's fill.
    /// * If the loader fails and a stale value within stale-if-error exists, that is returned
    ///   ([`Source::StaleIfError`]); otherwise the error, to every caller that waited.
    /// * With the store down the loader's value is returned, not cached ([`Source::Bypassed`]).
    ///
    /// The loader is `'static` because a background refresh outlives the call.
    ///
    /// # Errors
    ///
    /// [`CacheError::Load`] with the loader's error; [`CacheError::Store`] for an invalid key.
    pub async fn get_or_load_with<F, Fut, E>(
        &self,
        key: &str,
        loader: F,
    ) -> std::result::Result<Fetched<V>, CacheError<E>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Loaded<V>, E>> + Send + 'static,
        E: Send + Sync + 'static,
    {
        self.check_key(key)?;
        let inner = &*self.inner;
        let mut loader = Some(loader);
        loop {
            let now = inner.clock.now();
            let mut stale: Option<StaleValue<V>> = None;
            if let Some((freshness, value, hit)) = self.near_lookup_full(key, now) {
                match (freshness, value) {
                    (Freshness::Fresh, value) => {
                        if value.is_none() {
                            CacheCounters::bump(&inner.counters.negative_hits);
                        }
                        if self.xfetch_due(now, hit.0, hit.1)
                            && let Some(loader) = loader.take()
                        {
                            self.spawn_refresh(key, loader, Some(hit.0));
                        }
                        return Ok(Fetched {
                            value,
                            source: Source::Near,
                        });
                    }
                    (Freshness::StaleWhileRevalidate, Some(value)) => {
                        CacheCounters::bump(&inner.counters.stale_served);
                        if let Some(loader) = loader.take() {
                            self.spawn_refresh(key, loader, Some(hit.0));
                        }
                        return Ok(Fetched {
                            value: Some(value),
                            source: Source::Stale,
                        });
                    }
                    (Freshness::StaleIfError, Some(value)) => {
                        stale = Some(StaleValue {
                            value,
                            stale_until: hit.2,
                        });
                    }
                    _ => {}
                }
            }
            let Some(load) = loader.take() else {
                // Only reachable if a refresh consumed the loader; never loops without one.
                return Err(CacheError::Store(Error::InvalidInput(
                    "cache loader already used".into(),
                )));
            };
            match inner.flights.join(key, false) {
                Join::Wait { rx, refresh } => {
                    // A background refresh is running: the stored entry may still be
                    // servable (fresh or stale-while-revalidate), as it was for whoever
                    // started the refresh; wait only if it is not.
                    if refresh {
                        match self.read_remote(key, now).await {
                            Ok(Some(RemoteEntry {
                                freshness: Freshness::Fresh,
                                entry,
                            })) => {
                                return Ok(Fetched {
                                    value: entry.value,
                                    source: Source::Remote,
                                });
                            }
                            Ok(Some(RemoteEntry {
                                freshness: Freshness::StaleWhileRevalidate,
                                entry:
                                    NearEntry {
                                        value: Some(value), ..
                                    },
                            })) => {
                                CacheCounters::bump(&inner.counters.stale_served);
                                return Ok(Fetched {
                                    value: Some(value),
                                    source: Source::Stale,
                                });
                            }
                            // Past stale-while-revalidate but within stale-if-error: kept, in
                            // case the refresh we wait for fails.
                            Ok(Some(RemoteEntry {
                                freshness: Freshness::StaleIfError,
                                entry:
                                    NearEntry {
                                        value: Some(value),
                                        stale_until,
                                        ..
                                    },
                            })) if stale.is_none() => {
                                stale = Some(StaleValue { value, stale_until });
                            }
                            Err(e) if e.is_invalid_input() => return Err(CacheError::Store(e)),
                            _ => {}
                        }
                    }
                    CacheCounters::bump(&inner.counters.coalesced_waiters);
                    match flight::wait(rx).await {
                        Some(Ok(fetched)) => {
                            return Ok(Fetched {
                                value: fetched.value,
                                source: match fetched.source {
                                    Source::Loaded => Source::Coalesced,
                                    other => other,
                                },
                            });
                        }
                        Some(Err(shared)) => {
                            if let Ok(e) = shared.downcast::<E>() {
                                // The load we waited for failed: the stale-if-error value, as
                                // for the caller who ran it.
                                return self.stale_or_error(e, stale);
                            }
                            // A loader with another error type failed: load ourselves.
                            loader = Some(load);
                        }
                        // The leader was cancelled: start over (one of the waiters leads).
                        None => loader = Some(load),
                    }
                }
                Join::Lead(leader) => {
                    let (result, refresh) = self.lead(key, now, stale, load).await;
                    leader.finish(share(&result));
                    if let Some((load, seen)) = refresh {
                        self.spawn_refresh(key, load, Some(seen));
                    }
                    return result;
                }
            }
        }
    }

    /// Stores `value` at `key` with the policy's TTL (a write: it voids any fill in progress)
    /// and drops this replica's near-cache entry before returning.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`]; the codec's error; the store's error.
    pub async fn set(&self, key: &str, value: &V) -> Result<()> {
        self.set_with(key, value, &SetOptions::default()).await
    }

    /// [`set`](Self::set) with a TTL of its own and tags.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`]; [`Error::InvalidInput`] for an invalid tag (empty, over 1 024
    /// bytes, starting with `ns:`, more than 31) or TTL (zero, over a year); the codec's
    /// error; the store's error.
    pub async fn set_with(&self, key: &str, value: &V, options: &SetOptions) -> Result<()> {
        self.check_key(key)?;
        let inner = &*self.inner;
        let now = inner.clock.now();
        let encoded = self
            .encode(Some(value), options.ttl, &options.tags, 0, now)
            .await?;
        let store_key = self.store_key(key);
        let result = self
            .call(
                &store_key,
                inner
                    .store
                    .set(&store_key, &encoded.bytes, encoded.store_ttl, None),
            )
            .await;
        // Whatever the store answered (a timeout may still have written), never serve the
        // old value from here again.
        inner.near.invalidate_key(key);
        result?;
        CacheCounters::bump(&inner.counters.invalidations_sent);
        Ok(())
    }

    /// Deletes `key` (voiding any fill in progress) and drops this replica's near-cache entry;
    /// `true` when a value was stored.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`]; the store's error.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        self.check_key(key)?;
        let inner = &*self.inner;
        let store_key = self.store_key(key);
        let result = self.call(&store_key, inner.store.delete(&store_key)).await;
        inner.near.invalidate_key(key);
        let existed = result?;
        CacheCounters::bump(&inner.counters.invalidations_sent);
        Ok(existed)
    }

    /// Voids every entry tagged `tag` (in every namespace): one O(1) version bump. Returns the
    /// tag's new version.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for an invalid tag; the store's error.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<u64> {
        check_user_tag(tag)?;
        let inner = &*self.inner;
        let result = self.call(tag, inner.store.bump_tag(tag)).await;
        inner
            .near
            .on_invalidation(&statehouse_core::cache::Invalidation::Tag(tag.to_owned()));
        let version = result?;
        CacheCounters::bump(&inner.counters.invalidations_sent);
        Ok(version)
    }

    /// Voids every entry of this cache's namespace, on every replica: one O(1) version bump of
    /// the namespace's tag. Returns its new version.
    ///
    /// # Errors
    ///
    /// The store's error.
    pub async fn invalidate_namespace(&self) -> Result<u64> {
        let inner = &*self.inner;
        let result = self
            .call(
                &inner.namespace_tag,
                inner.store.bump_tag(&inner.namespace_tag),
            )
            .await;
        inner.near.flush();
        let version = result?;
        CacheCounters::bump(&inner.counters.invalidations_sent);
        Ok(version)
    }

    /// Deletes every entry of this namespace whose key starts with `prefix` (all of them for
    /// an empty prefix) with a scan of the store; returns how many. Prefer tags or
    /// [`invalidate_namespace`](Self::invalidate_namespace) for anything frequent. Not bound by
    /// the deadline.
    ///
    /// # Errors
    ///
    /// The store's error.
    pub async fn purge_prefix(&self, prefix: &str) -> Result<u64> {
        let inner = &*self.inner;
        let store_prefix = format!("{}{prefix}", inner.key_prefix);
        let result = inner.store.purge_prefix(&store_prefix).await;
        inner
            .near
            .on_invalidation(&statehouse_core::cache::Invalidation::Prefix(store_prefix));
        let purged = result.inspect_err(|e| {
            if !e.is_invalid_input() {
                CacheCounters::bump(&inner.counters.store_errors);
            }
        })?;
        CacheCounters::bump(&inner.counters.invalidations_sent);
        Ok(purged)
    }

    /// The counters.
    pub fn stats(&self) -> CacheStats {
        let inner = &*self.inner;
        let mut stats = inner.counters.snapshot();
        stats.breaker_state = inner.breakers.state(&*inner.clock);
        stats.breaker_opened = inner.breakers.opened_count();
        stats
    }

    /// How many entries the near cache holds now.
    pub fn near_cache_len(&self) -> usize {
        self.inner.near.len()
    }

    /// Whether the near cache is in use now: configured, and its invalidation channel live.
    pub fn near_cache_live(&self) -> bool {
        self.inner.l1 && self.inner.near.is_live()
    }

    /// The key the store keeps `key` under: `<namespace>:<key>`.
    pub fn store_key(&self, key: &str) -> String {
        let mut s = String::with_capacity(self.inner.key_prefix.len() + key.len());
        s.push_str(&self.inner.key_prefix);
        s.push_str(key);
        s
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The TTL policy.
    pub fn policy(&self) -> &CachePolicy {
        &self.inner.policy
    }

    /// The codec.
    pub fn codec(&self) -> &C {
        &self.inner.codec
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn CacheStore> {
        &self.inner.store
    }

    // ----- internals -----

    fn check_key(&self, key: &str) -> Result<()> {
        if key.is_empty() {
            return Err(Error::InvalidKey {
                reason: "a cache key must not be empty".into(),
            });
        }
        let full = self.inner.key_prefix.len() + key.len();
        if full > MAX_CACHE_KEY_BYTES {
            return Err(Error::InvalidKey {
                reason: format!(
                    "a cache key with its namespace must be at most {MAX_CACHE_KEY_BYTES} \
                     bytes, this one has {full}"
                ),
            });
        }
        Ok(())
    }

    fn judge(&self, fresh_until: Timestamp, stale_until: Timestamp, now: Timestamp) -> Freshness {
        // `CachePolicy::freshness` is the one definition; an envelope without tags or payload
        // costs no allocation.
        self.inner.policy.freshness(
            &Envelope {
                flags: EnvelopeFlags::default(),
                fresh_until,
                stale_until,
                load_micros: 0,
                tags: Vec::new(),
                payload: Vec::new(),
            },
            now,
        )
    }

    fn near_lookup(&self, key: &str, now: Timestamp) -> Option<(Freshness, Option<Arc<V>>)> {
        self.near_lookup_full(key, now).map(|(f, v, _)| (f, v))
    }

    /// A near-cache lookup, counted; with `(fresh_until, load_micros, stale_until)`.
    #[allow(clippy::type_complexity)]
    fn near_lookup_full(
        &self,
        key: &str,
        now: Timestamp,
    ) -> Option<(Freshness, Option<Arc<V>>, (Timestamp, u32, Timestamp))> {
        let inner = &*self.inner;
        if !inner.l1 {
            return None;
        }
        let near = &inner.near;
        let Some(hit) = near.get(key, near.hash(key), now) else {
            if near.is_live() {
                CacheCounters::bump(&inner.counters.l1_misses);
            }
            return None;
        };
        let freshness = self.judge(hit.fresh_until, hit.stale_until, now);
        match freshness {
            Freshness::Fresh | Freshness::StaleWhileRevalidate => {
                CacheCounters::bump(&inner.counters.l1_hits)
            }
            _ => CacheCounters::bump(&inner.counters.l1_misses),
        }
        Some((
            freshness,
            hit.value,
            (hit.fresh_until, hit.load_micros, hit.stale_until),
        ))
    }

    fn xfetch_due(&self, now: Timestamp, fresh_until: Timestamp, load_micros: u32) -> bool {
        match self.inner.policy.xfetch_beta() {
            // `1 − [0, 1)` is in (0, 1], as XFetch's draw must be.
            Some(beta) => {
                xfetch_refresh_due(now, fresh_until, load_micros, beta, 1.0 - fastrand::f64())
            }
            None => false,
        }
    }

    /// A store call about `key` (a store key, or a tag: the name that picks the failure
    /// domain's breaker) through the breaker and under the deadline; failures counted.
    async fn call<T>(&self, key: &str, call: impl Future<Output = Result<T>>) -> Result<T> {
        let inner = &*self.inner;
        let permit = match self.breaker_for(key).admit(&*inner.clock) {
            Admission::Call(permit) => permit,
            Admission::Skip => return self.counted(Err(self.breaker_open_error())),
        };
        let result = tokio::time::timeout(inner.deadline, call)
            .await
            .unwrap_or(Err(Error::Timeout {
                deadline: inner.deadline,
            }));
        self.counted_through(permit, result)
    }

    /// The store's `get` through the breaker and under the deadline; failures counted. A store
    /// that bounds its own calls takes the deadline along ([`CacheStore::get_within`]) instead
    /// of our timer around its own (the Redis store's coalesced reads then arm no timer per
    /// read at all).
    async fn store_get(&self, store_key: &str) -> Result<Option<Vec<u8>>> {
        let inner = &*self.inner;
        // Called on the `dyn CacheStore` itself, not through the blanket `impl CacheStore for
        // Arc<S>` that method resolution would pick: that one boxes a second future per read.
        let store: &dyn CacheStore = &*inner.store;
        let permit = match self.breaker_for(store_key).admit(&*inner.clock) {
            Admission::Call(permit) => permit,
            Admission::Skip => return self.counted(Err(self.breaker_open_error())),
        };
        let result = match store.get_within(store_key, inner.deadline).await {
            Some(result) => result,
            None => tokio::time::timeout(inner.deadline, store.get(store_key))
                .await
                .unwrap_or(Err(Error::Timeout {
                    deadline: inner.deadline,
                })),
        };
        self.counted_through(permit, result)
    }

    /// Reports a store call's outcome to the breaker (an outage or a missed deadline counts
    /// against the store; invalid input is the caller's), then [`counted`](Self::counted).
    fn counted_through<T>(&self, permit: Permit<'_>, result: Result<T>) -> Result<T> {
        match &result {
            Err(e) if e.is_invalid_input() => permit.inconclusive(),
            Err(e) if e.is_unavailable() => permit.failed(self.inner.clock.now(), e),
            _ => permit.succeeded(),
        }
        self.counted(result)
    }

    /// The breaker of `key`'s failure domain of the store.
    fn breaker_for(&self, key: &str) -> &CircuitBreaker {
        let breakers = &self.inner.breakers;
        if breakers.per_domain() {
            breakers.of(self.inner.store.failure_domain(key))
        } else {
            breakers.of(0)
        }
    }

    /// The error of a call the open breaker kept from the store.
    fn breaker_open_error(&self) -> Error {
        Error::Unavailable {
            message: format!(
                "circuit breaker open after repeated cache store failures; the store was not \
                 called (probed again at most {:?} after it opened)",
                self.inner.breakers.config().open_for
            ),
            source: None,
        }
    }

    /// Counts (and traces) a failed store call; invalid input is the caller's, not the store's.
    fn counted<T>(&self, result: Result<T>) -> Result<T> {
        let inner = &*self.inner;
        if let Err(e) = &result
            && !e.is_invalid_input()
        {
            CacheCounters::bump(&inner.counters.store_errors);
            tracing::debug!(error = %e, namespace = %inner.namespace, "statehouse: cache store call failed");
        }
        result
    }

    /// Reads `key` from the store; `None` when absent, expired, void (a tag moved) or
    /// undecodable. Fills the near cache with what is fresh or within stale-while-revalidate.
    async fn read_remote(&self, key: &str, now: Timestamp) -> Result<Option<RemoteEntry<V>>> {
        let inner = &*self.inner;
        let ticket = inner.near.ticket();
        // `<namespace>:<key>` in a stack buffer when it fits (keys are short as a rule): no
        // allocation per read. Both parts are `str`s, so the check below cannot fail; it falls
        // back to the allocated key all the same rather than assume it.
        let mut buf = [0u8; INLINE_STORE_KEY];
        let heap;
        let prefix = inner.key_prefix.as_bytes();
        let len = prefix.len() + key.len();
        let inline = if len <= INLINE_STORE_KEY {
            buf[..prefix.len()].copy_from_slice(prefix);
            buf[prefix.len()..len].copy_from_slice(key.as_bytes());
            std::str::from_utf8(&buf[..len]).ok()
        } else {
            None
        };
        let store_key: &str = match inline {
            Some(k) => k,
            None => {
                heap = self.store_key(key);
                &heap
            }
        };
        let bytes = self.store_get(store_key).await?;
        let entry = match bytes {
            Some(bytes) => self.open(key, &bytes, now, ticket).await?,
            None => None,
        };
        match &entry {
            Some(e)
                if matches!(
                    e.freshness,
                    Freshness::Fresh | Freshness::StaleWhileRevalidate
                ) =>
            {
                CacheCounters::bump(&inner.counters.l2_hits)
            }
            _ => CacheCounters::bump(&inner.counters.l2_misses),
        }
        Ok(entry)
    }

    /// Decodes and judges stored bytes; fills the near cache.
    async fn open(
        &self,
        key: &str,
        bytes: &[u8],
        now: Timestamp,
        ticket: u64,
    ) -> Result<Option<RemoteEntry<V>>> {
        let inner = &*self.inner;
        let decode_error = |what: &dyn fmt::Display| {
            CacheCounters::bump(&inner.counters.decode_errors);
            tracing::debug!(namespace = %inner.namespace, error = %what, "statehouse: undecodable cache entry read as a miss");
        };
        // Read in place: neither the tags nor the payload are copied out of `bytes`.
        let envelope = match EnvelopeView::parse(bytes) {
            Ok(envelope) => envelope,
            Err(e) => {
                decode_error(&e);
                return Ok(None);
            }
        };
        let stored_payload = envelope.payload;
        let freshness = self.judge(envelope.fresh_until, envelope.stale_until, now);
        if freshness == Freshness::Expired {
            return Ok(None);
        }
        if !envelope.flags.negative && envelope.flags.codec != inner.codec.id() {
            decode_error(&format_args!(
                "written by codec {}, read with codec {}",
                envelope.flags.codec,
                inner.codec.id()
            ));
            return Ok(None);
        }
        if !self.tags_current(&envelope).await? {
            return Ok(None);
        }
        let (value, payload_len) = if envelope.flags.negative {
            (None, 0)
        } else {
            let plain;
            let payload = if envelope.flags.compressed {
                match codec::decompress(stored_payload) {
                    Ok(p) => {
                        plain = p;
                        &plain[..]
                    }
                    Err(e) => {
                        decode_error(&e);
                        return Ok(None);
                    }
                }
            } else {
                stored_payload
            };
            match inner.codec.decode(payload) {
                Ok(v) => (Some(Arc::new(v)), payload.len()),
                Err(e) => {
                    decode_error(&e);
                    return Ok(None);
                }
            }
        };
        let tags: Box<[(String, u64)]> = envelope
            .tags()
            .filter(|(t, _)| *t != inner.namespace_tag)
            .map(|(t, v)| (t.to_owned(), v))
            .collect();
        let entry = NearEntry {
            value,
            fresh_until: envelope.fresh_until,
            stale_until: envelope.stale_until,
            load_micros: envelope.load_micros,
            tags,
        };
        if inner.l1
            && matches!(
                freshness,
                Freshness::Fresh | Freshness::StaleWhileRevalidate
            )
        {
            let near = &inner.near;
            near.insert(ticket, key, near.hash(key), entry.clone(), payload_len, now);
        }
        Ok(Some(RemoteEntry { entry, freshness }))
    }

    /// Whether every recorded tag version is still current.
    async fn tags_current(&self, envelope: &EnvelopeView<'_>) -> Result<bool> {
        // Every tag known locally (the channel live): no store call and no copy of the names.
        let mut current = true;
        for (tag, version) in envelope.tags() {
            match self.inner.near.known_tag(tag, self.inner.clock.now()) {
                Some(known) => current &= known == version,
                None => return self.tags_current_from_store(envelope).await,
            }
        }
        Ok(current)
    }

    /// [`tags_current`](Self::tags_current) when some version must come from the store.
    async fn tags_current_from_store(&self, envelope: &EnvelopeView<'_>) -> Result<bool> {
        let names: Vec<String> = envelope.tags().map(|(t, _)| t.to_owned()).collect();
        let current = self.tag_versions(&names).await?;
        Ok(envelope.tags().zip(&current).all(|((_, v), c)| v == *c))
    }

    /// Current versions of `tags`: known locally while the channel is live, else from the store.
    async fn tag_versions(&self, tags: &[String]) -> Result<Vec<u64>> {
        let inner = &*self.inner;
        let mut versions = Vec::with_capacity(tags.len());
        let mut unknown = Vec::new();
        let now = inner.clock.now();
        for (i, t) in tags.iter().enumerate() {
            match inner.near.known_tag(t, now) {
                Some(v) => versions.push(v),
                None => {
                    versions.push(0);
                    unknown.push(i);
                }
            }
        }
        if unknown.is_empty() {
            return Ok(versions);
        }
        let ticket = inner.near.ticket();
        let names: Vec<String> = unknown.iter().map(|&i| tags[i].clone()).collect();
        let fetched = self
            .call(
                names.first().map_or("", String::as_str),
                inner.store.tag_versions(&names),
            )
            .await?;
        if fetched.len() != names.len() {
            return Err(Error::Backend {
                message: format!(
                    "cache store answered {} tag versions for {} tags",
                    fetched.len(),
                    names.len()
                ),
                source: None,
            });
        }
        inner.near.learn_tags(ticket, &names, &fetched, now);
        for (&i, v) in unknown.iter().zip(fetched) {
            versions[i] = v;
        }
        Ok(versions)
    }

    /// Builds the stored entry for `value` (`None`: known absent).
    async fn encode(
        &self,
        value: Option<&V>,
        ttl: Option<Duration>,
        user_tags: &[String],
        load_micros: u32,
        now: Timestamp,
    ) -> Result<Encoded<V>>
    where
        V: Sized,
    {
        let inner = &*self.inner;
        let policy = &inner.policy;
        if user_tags.len() >= MAX_TAGS {
            return Err(Error::InvalidInput(format!(
                "a cache entry may carry at most {} tags besides its namespace",
                MAX_TAGS - 1
            )));
        }
        for t in user_tags {
            check_user_tag(t)?;
        }
        let base = match (ttl, value) {
            (Some(t), _) => t,
            (None, Some(_)) => policy.fresh_ttl(),
            (None, None) => policy.negative_ttl().ok_or_else(|| {
                Error::InvalidInput("no negative TTL to cache \"not found\" with".into())
            })?,
        };
        if base.is_zero() || base > CachePolicy::MAX_TTL {
            return Err(Error::InvalidInput(
                "a cache TTL must be more than zero and at most a year".into(),
            ));
        }
        let fresh = jittered_ttl(base, policy.jitter(), fastrand::f64());
        let fresh_until = now.saturating_add(fresh);
        let stale_until = if value.is_some() {
            fresh_until.saturating_add(policy.stale_window())
        } else {
            fresh_until
        };
        let mut names = Vec::with_capacity(user_tags.len() + 1);
        names.push(inner.namespace_tag.clone());
        names.extend(user_tags.iter().cloned());
        names.dedup();
        let versions = self.tag_versions(&names).await?;
        let (payload, compressed, payload_len) = match value {
            None => (Vec::new(), false, 0),
            Some(v) => {
                let plain = inner.codec.encode(v)?;
                let len = plain.len();
                match inner.compress_above {
                    Some(limit) if len > limit => match codec::compress(&plain) {
                        Some(c) => (c, true, len),
                        None => (plain, false, len),
                    },
                    _ => (plain, false, len),
                }
            }
        };
        let tags: Vec<(String, u64)> = names.into_iter().zip(versions).collect();
        let envelope = Envelope {
            flags: EnvelopeFlags {
                negative: value.is_none(),
                compressed,
                codec: if value.is_some() { inner.codec.id() } else { 0 },
            },
            fresh_until,
            stale_until,
            load_micros,
            tags,
            payload,
        };
        let bytes = envelope.encode()?;
        let extra_tags: Box<[(String, u64)]> = envelope
            .tags
            .into_iter()
            .filter(|(t, _)| *t != inner.namespace_tag)
            .collect();
        Ok(Encoded {
            bytes,
            store_ttl: stale_until
                .saturating_duration_since(now)
                .max(Duration::from_millis(1)),
            near: NearEntry {
                value: None,
                fresh_until,
                stale_until,
                load_micros,
                tags: extra_tags,
            },
            payload_len,
        })
    }

    /// The leader's work: read the store, then load under the lease if needed. Returns the
    /// answer, and the loader with the seen entry's fresh time when a background refresh is
    /// due (started by the caller once the flight is finished).
    #[allow(clippy::type_complexity)]
    async fn lead<F, Fut, E>(
        &self,
        key: &str,
        now: Timestamp,
        mut stale: Option<StaleValue<V>>,
        loader: F,
    ) -> (
        std::result::Result<Fetched<V>, CacheError<E>>,
        Option<(F, Timestamp)>,
    )
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Loaded<V>, E>> + Send + 'static,
        E: Send + Sync + 'static,
    {
        let inner = &*self.inner;
        match self.read_remote(key, now).await {
            Ok(Some(remote)) => {
                let e = remote.entry;
                match (remote.freshness, e.value) {
                    (Freshness::Fresh, value) => {
                        if value.is_none() {
                            CacheCounters::bump(&inner.counters.negative_hits);
                        }
                        let refresh = self
                            .xfetch_due(now, e.fresh_until, e.load_micros)
                            .then_some((loader, e.fresh_until));
                        let fetched = Fetched {
                            value,
                            source: Source::Remote,
                        };
                        return (Ok(fetched), refresh);
                    }
                    (Freshness::StaleWhileRevalidate, Some(value)) => {
                        CacheCounters::bump(&inner.counters.stale_served);
                        let fetched = Fetched {
                            value: Some(value),
                            source: Source::Stale,
                        };
                        return (Ok(fetched), Some((loader, e.fresh_until)));
                    }
                    (Freshness::StaleIfError, Some(value)) => {
                        stale = Some(StaleValue {
                            value,
                            stale_until: e.stale_until,
                        });
                    }
                    _ => {}
                }
            }
            Ok(None) => {}
            Err(e) if e.is_invalid_input() => return (Err(CacheError::Store(e)), None),
            Err(_) => return (self.load_bypassing(loader, stale).await, None),
        }
        (self.load_with_lease(key, None, stale, loader).await, None)
    }

    /// Loads under the key's lease and fills the store. `seen`: the fresh time of the entry a
    /// refresh replaces (a fresh entry with another one means someone refreshed already).
    async fn load_with_lease<F, Fut, E>(
        &self,
        key: &str,
        seen: Option<Timestamp>,
        stale: Option<StaleValue<V>>,
        loader: F,
    ) -> std::result::Result<Fetched<V>, CacheError<E>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Loaded<V>, E>> + Send + 'static,
        E: Send + Sync + 'static,
    {
        let inner = &*self.inner;
        let store_key = self.store_key(key);
        let lease_ttl = inner.policy.lease_ttl();
        let mut backoff = LEASE_POLL_START;
        let mut waited = false;
        let filled_since = |remote: &RemoteEntry<V>| {
            remote.freshness == Freshness::Fresh && seen != Some(remote.entry.fresh_until)
        };
        loop {
            let now = inner.clock.now();
            let outcome = self
                .call(
                    &store_key,
                    inner.store.acquire_lease(&store_key, now, lease_ttl),
                )
                .await;
            match outcome {
                Err(e) if e.is_invalid_input() => return Err(CacheError::Store(e)),
                Err(_) => return self.load_bypassing(loader, stale).await,
                Ok(LeaseOutcome::Acquired(token)) => {
                    let guard = LeaseGuard {
                        store: inner.store.clone(),
                        key: store_key,
                        token: Some(token),
                        deadline: inner.deadline,
                    };
                    // Filled between our read and the lease (its fill consumed the lease)?
                    if let Ok(Some(remote)) = self.read_remote(key, now).await
                        && filled_since(&remote)
                    {
                        guard.release().await;
                        return Ok(Fetched {
                            value: remote.entry.value,
                            source: Source::Remote,
                        });
                    }
                    return self.load_and_fill(key, guard, stale, loader).await;
                }
                Ok(LeaseOutcome::HeldElsewhere) => {
                    if !waited {
                        waited = true;
                        CacheCounters::bump(&inner.counters.lease_waits);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(LEASE_POLL_MAX);
                    match self.read_remote(key, inner.clock.now()).await {
                        Ok(Some(remote)) if filled_since(&remote) => {
                            return Ok(Fetched {
                                value: remote.entry.value,
                                source: Source::Remote,
                            });
                        }
                        Err(e) if !e.is_invalid_input() => {
                            return self.load_bypassing(loader, stale).await;
                        }
                        // Not filled yet: ask for the lease again (granted once the holder
                        // filled, gave it back, or it expired).
                        _ => {}
                    }
                }
            }
        }
    }

    /// Runs the loader holding `guard`'s lease, and fills.
    async fn load_and_fill<F, Fut, E>(
        &self,
        key: &str,
        mut guard: LeaseGuard,
        stale: Option<StaleValue<V>>,
        loader: F,
    ) -> std::result::Result<Fetched<V>, CacheError<E>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Loaded<V>, E>> + Send + 'static,
        E: Send + Sync + 'static,
    {
        let inner = &*self.inner;
        let started = inner.clock.now();
        // Taken before the loader reads the source of truth: a tag invalidated after this may
        // have changed what the loader read, and the versions `encode` then reads would be the
        // new ones (see the check after `encode`).
        let tag_ticket = inner.near.ticket();
        CacheCounters::bump(&inner.counters.loads);
        let loaded = match loader().await {
            Ok(loaded) => loaded,
            Err(e) => {
                CacheCounters::bump(&inner.counters.load_errors);
                guard.release().await;
                return self.stale_or_error(e, stale);
            }
        };
        let now = inner.clock.now();
        let load_micros =
            u32::try_from(now.saturating_duration_since(started).as_micros()).unwrap_or(u32::MAX);
        let value = loaded.value.map(Arc::new);
        let cacheable = loaded.store
            && (value.is_some() || loaded.ttl.is_some() || inner.policy.negative_ttl().is_some());
        if !cacheable {
            guard.release().await;
            return Ok(Fetched {
                value,
                source: Source::Loaded,
            });
        }
        let encoded = match self
            .encode(value.as_deref(), loaded.ttl, &loaded.tags, load_micros, now)
            .await
        {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(namespace = %inner.namespace, error = %e, "statehouse: loaded value not cached");
                guard.release().await;
                return Ok(Fetched {
                    value,
                    source: Source::Loaded,
                });
            }
        };
        if inner.near.tag_changed_since(tag_ticket) {
            // A tag or namespace invalidation (from any replica) arrived while we loaded: what
            // we loaded may predate it, yet `encode` may have stamped it with the new versions,
            // and it would be served as fresh everywhere. Serve it to this caller, never cache
            // it. (Any tag of this cache counts: which ones the value carries is known only now.)
            tracing::debug!(namespace = %inner.namespace, "statehouse: cache fill skipped (a tag was invalidated during the load)");
            guard.release().await;
            return Ok(Fetched {
                value,
                source: Source::Loaded,
            });
        }
        let ticket = inner.near.ticket();
        let Some(token) = guard.token().cloned() else {
            return Ok(Fetched {
                value,
                source: Source::Loaded,
            });
        };
        let filled = self
            .call(
                &guard.key,
                inner
                    .store
                    .set(&guard.key, &encoded.bytes, encoded.store_ttl, Some(&token)),
            )
            .await;
        match filled {
            Ok(true) => {
                guard.disarm();
                CacheCounters::bump(&inner.counters.invalidations_sent);
                if inner.l1 {
                    let mut entry = encoded.near;
                    entry.value = value.clone();
                    let near = &inner.near;
                    near.insert(ticket, key, near.hash(key), entry, encoded.payload_len, now);
                }
            }
            Ok(false) => {
                // A write or delete voided the lease while we loaded: what we loaded may be
                // older than that write. Serve it to this caller, never cache it.
                guard.disarm();
                tracing::debug!(namespace = %inner.namespace, "statehouse: cache fill refused (lease voided by a write)");
            }
            Err(_) => guard.release().await,
        }
        Ok(Fetched {
            value,
            source: Source::Loaded,
        })
    }

    /// The store is down: load without a lease and without caching.
    async fn load_bypassing<F, Fut, E>(
        &self,
        loader: F,
        stale: Option<StaleValue<V>>,
    ) -> std::result::Result<Fetched<V>, CacheError<E>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Loaded<V>, E>> + Send + 'static,
        E: Send + Sync + 'static,
    {
        let inner = &*self.inner;
        CacheCounters::bump(&inner.counters.loads);
        match loader().await {
            Ok(loaded) => Ok(Fetched {
                value: loaded.value.map(Arc::new),
                source: Source::Bypassed,
            }),
            Err(e) => {
                CacheCounters::bump(&inner.counters.load_errors);
                self.stale_or_error(e, stale)
            }
        }
    }

    fn stale_or_error<E>(
        &self,
        error: impl Into<Arc<E>>,
        stale: Option<StaleValue<V>>,
    ) -> std::result::Result<Fetched<V>, CacheError<E>> {
        let inner = &*self.inner;
        match stale {
            Some(s) if inner.clock.now() < s.stale_until => {
                CacheCounters::bump(&inner.counters.stale_served);
                tracing::debug!(namespace = %inner.namespace, "statehouse: loader failed, stale value served");
                Ok(Fetched {
                    value: Some(s.value),
                    source: Source::StaleIfError,
                })
            }
            _ => Err(CacheError::Load(error.into())),
        }
    }

    /// Starts one background refresh of `key`, unless a load of it is running here already.
    fn spawn_refresh<F, Fut, E>(&self, key: &str, loader: F, seen: Option<Timestamp>)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Loaded<V>, E>> + Send + 'static,
        E: Send + Sync + 'static,
    {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Join::Lead(leader) = self.inner.flights.join(key, true) else {
            return;
        };
        let this = self.clone();
        let key = key.to_owned();
        runtime.spawn(async move {
            let result = this.load_with_lease(&key, seen, None, loader).await;
            leader.finish(share(&result));
        });
    }
}

fn check_user_tag(tag: &str) -> Result<()> {
    validate_tag(tag)?;
    if tag.starts_with("ns:") {
        return Err(Error::InvalidInput(format!(
            "cache tag `{tag}`: tags starting with `ns:` are reserved for namespaces"
        )));
    }
    Ok(())
}

/// The flight's copy of a leader's result.
fn share<V, E: Send + Sync + 'static>(
    result: &std::result::Result<Fetched<V>, CacheError<E>>,
) -> Shared<V> {
    match result {
        Ok(fetched) => Ok(fetched.clone()),
        Err(CacheError::Load(e)) => Err(e.clone() as Arc<dyn Any + Send + Sync>),
        // Invalid input is checked before a flight starts; a waiter retries on its own.
        Err(CacheError::Store(e)) => Err(Arc::new(e.to_string()) as Arc<dyn Any + Send + Sync>),
    }
}
