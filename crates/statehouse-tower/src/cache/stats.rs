//! [`HttpCacheStats`]: the layer's counters, plain atomics.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a forwarded response was not stored. Each has a counter in [`HttpCacheStats`] and is
/// the `detail` of the `Cache-Status` header when it applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NotStoredReason {
    /// The status is 206, 304 or not final, or `must-understand` with a status not understood.
    Status,
    /// `Cache-Control: no-store` on the response.
    NoStore,
    /// `Cache-Control: private` (this is a shared cache).
    Private,
    /// `Cache-Control: no-cache` on a response without a validator (or with revalidation
    /// off): it could only be used after a revalidation, which would need one, so storing it
    /// would gain nothing.
    NoCache,
    /// The request carried `Authorization` and the response lacks `public`, `s-maxage` and
    /// `must-revalidate` (RFC 9111 §3.5).
    Authorization,
    /// The response sets a cookie and `store_set_cookie` is off.
    SetCookie,
    /// `Vary: *`, or a malformed `Vary`.
    VaryStar,
    /// More `Vary` names than the configured limit.
    TooManyVary,
    /// The URI already has the configured most variants.
    TooManyVariants,
    /// No explicit freshness (`s-maxage`, `max-age`, `Expires`), or a malformed or repeated one.
    NoFreshness,
    /// Explicitly fresh, but already older than its freshness lifetime when received.
    StaleOnArrival,
    /// The body is larger than the configured maximum (it streamed through).
    TooLarge,
    /// The body has trailers.
    Trailers,
    /// The body failed while being read.
    BodyError,
    /// More than 32 tags, or an invalid tag.
    Tags,
    /// Another replica holds the fill lease for this key.
    LeaseHeld,
    /// A purge or a write of the key happened while the response was on its way.
    PurgedDuringFill,
    /// The response's `Vary` differs from the stored vary spec (the spec was dropped).
    VaryChanged,
    /// The store failed or did not answer in time.
    StoreUnavailable,
    /// A HEAD request: its response has no body to store.
    Head,
}

impl NotStoredReason {
    /// Every reason, in counter order.
    pub const ALL: [NotStoredReason; 20] = [
        NotStoredReason::Status,
        NotStoredReason::NoStore,
        NotStoredReason::Private,
        NotStoredReason::NoCache,
        NotStoredReason::Authorization,
        NotStoredReason::SetCookie,
        NotStoredReason::VaryStar,
        NotStoredReason::TooManyVary,
        NotStoredReason::TooManyVariants,
        NotStoredReason::NoFreshness,
        NotStoredReason::StaleOnArrival,
        NotStoredReason::TooLarge,
        NotStoredReason::Trailers,
        NotStoredReason::BodyError,
        NotStoredReason::Tags,
        NotStoredReason::LeaseHeld,
        NotStoredReason::PurgedDuringFill,
        NotStoredReason::VaryChanged,
        NotStoredReason::StoreUnavailable,
        NotStoredReason::Head,
    ];

    /// The token used as the `Cache-Status` `detail`, e.g. `set-cookie`.
    pub fn as_str(self) -> &'static str {
        match self {
            NotStoredReason::Status => "status",
            NotStoredReason::NoStore => "no-store",
            NotStoredReason::Private => "private",
            NotStoredReason::NoCache => "no-cache",
            NotStoredReason::Authorization => "authorization",
            NotStoredReason::SetCookie => "set-cookie",
            NotStoredReason::VaryStar => "vary-star",
            NotStoredReason::TooManyVary => "too-many-vary",
            NotStoredReason::TooManyVariants => "too-many-variants",
            NotStoredReason::NoFreshness => "no-freshness",
            NotStoredReason::StaleOnArrival => "stale-on-arrival",
            NotStoredReason::TooLarge => "too-large",
            NotStoredReason::Trailers => "trailers",
            NotStoredReason::BodyError => "body-error",
            NotStoredReason::Tags => "tags",
            NotStoredReason::LeaseHeld => "lease-held",
            NotStoredReason::PurgedDuringFill => "purged-during-fill",
            NotStoredReason::VaryChanged => "vary-changed",
            NotStoredReason::StoreUnavailable => "store-unavailable",
            NotStoredReason::Head => "head",
        }
    }

    fn index(self) -> usize {
        NotStoredReason::ALL
            .iter()
            .position(|r| *r == self)
            .unwrap_or(0)
    }
}

impl fmt::Display for NotStoredReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The counters of one [`HttpCacheLayer`](super::HttpCacheLayer), shared by its services and
/// its purger. Relaxed atomics: each counter is exact, reads across counters are not a
/// snapshot.
///
/// ```
/// use statehouse_tower::cache::{HttpCacheStats, NotStoredReason};
/// let stats = HttpCacheStats::default();
/// assert_eq!(stats.hits(), 0);
/// assert_eq!(stats.not_stored(NotStoredReason::SetCookie), 0);
/// ```
#[derive(Default)]
pub struct HttpCacheStats {
    hits: AtomicU64,
    misses: AtomicU64,
    stored: AtomicU64,
    not_stored: [AtomicU64; 20],
    coalesced: AtomicU64,
    bypassed: AtomicU64,
    invalidations: AtomicU64,
    purges: AtomicU64,
    decode_errors: AtomicU64,
    store_errors: AtomicU64,
    stale_served: AtomicU64,
    stale_while_revalidate: AtomicU64,
}

macro_rules! getters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        $(
            $(#[$doc])*
            pub fn $name(&self) -> u64 {
                self.$name.load(Ordering::Relaxed)
            }
        )*
    };
}

impl HttpCacheStats {
    getters! {
        /// Requests answered from the store without going to the origin.
        hits,
        /// GET and HEAD requests that went to the origin (miss, stale, request directives,
        /// vary miss); a coalesced waiter is not counted here.
        misses,
        /// Responses written to the store.
        stored,
        /// Requests that waited for another request's identical upstream call and were
        /// answered with its response.
        coalesced,
        /// GET and HEAD requests the cache did not handle (`no-store`, `Range`, `If-Match`,
        /// `If-Unmodified-Since`, `If-Range`, `Authorization`, no host, or a `Host` naming
        /// another host than the URI).
        bypassed,
        /// Stored entries dropped because an unsafe method succeeded on their URI.
        invalidations,
        /// Successful purges (by URI or by tag).
        purges,
        /// Stored values that could not be decoded (treated as misses).
        decode_errors,
        /// Store calls that failed or missed their deadline (the request went on without the
        /// store).
        store_errors,
        /// Stale responses served because the origin failed (`stale-if-error`).
        stale_served,
        /// Stale responses served while a background request revalidated them
        /// (`stale-while-revalidate`; also counted in `hits`).
        stale_while_revalidate,
    }

    /// Responses not stored for `reason`.
    pub fn not_stored(&self, reason: NotStoredReason) -> u64 {
        self.not_stored[reason.index()].load(Ordering::Relaxed)
    }

    /// Responses not stored, whatever the reason.
    pub fn not_stored_total(&self) -> u64 {
        self.not_stored
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    pub(crate) fn count_hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_stored(&self) {
        self.stored.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_not_stored(&self, reason: NotStoredReason) {
        self.not_stored[reason.index()].fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_coalesced(&self) {
        self.coalesced.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_bypassed(&self) {
        self.bypassed.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_invalidation(&self) {
        self.invalidations.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_purge(&self) {
        self.purges.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_decode_error(&self) {
        self.decode_errors.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_store_error(&self) {
        self.store_errors.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_stale_served(&self) {
        self.stale_served.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_stale_while_revalidate(&self) {
        self.stale_while_revalidate.fetch_add(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for HttpCacheStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("HttpCacheStats");
        d.field("hits", &self.hits())
            .field("misses", &self.misses())
            .field("stored", &self.stored())
            .field("not_stored", &self.not_stored_total())
            .field("coalesced", &self.coalesced())
            .field("bypassed", &self.bypassed())
            .field("invalidations", &self.invalidations())
            .field("purges", &self.purges())
            .field("decode_errors", &self.decode_errors())
            .field("store_errors", &self.store_errors())
            .field("stale_served", &self.stale_served())
            .field("stale_while_revalidate", &self.stale_while_revalidate());
        d.finish()
    }
}
