//! An RFC 9111 shared HTTP cache as tower middleware: [`HttpCacheLayer`] answers GET and HEAD
//! from a [`CacheStore`](statehouse::CacheStore) (the embedded store, Redis, Redis Cluster),
//! strict by default, with `Cache-Status` (RFC 9211) on every response.
//!
//! ## Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use axum::Router;
//! use axum::body::Body;
//! use axum::response::IntoResponse;
//! use axum::routing::get;
//! use http::{Request, header};
//! use statehouse::{Clock, EmbeddedCacheStore, ManualClock};
//! use statehouse_tower::cache::HttpCacheLayer;
//! use tower::ServiceExt;
//!
//! async fn article() -> impl IntoResponse {
//!     (
//!         [(header::CACHE_CONTROL, "public, max-age=60"), (header::HeaderName::from_static("cache-tag"), "article-42")],
//!         "the article",
//!     )
//! }
//!
//! // A manual clock so the numbers below are exact; production leaves the system clock.
//! let clock = ManualClock::starting_now();
//! // A fleet: `RedisStore::cache_store()` instead.
//! let store = EmbeddedCacheStore::builder().clock(clock.clone()).build()?;
//! let cache = HttpCacheLayer::builder(Arc::new(store))
//!     .clock(Arc::new(clock.clone()) as Arc<dyn Clock>)
//!     .cache_name("edge")
//!     .build()?;
//! let purger = cache.purger();
//! let stats = cache.stats();
//! let app = Router::new().route("/article", get(article)).layer(cache);
//!
//! let get = || Request::get("/article").header(header::HOST, "example.com").body(Body::empty());
//! let first = app.clone().oneshot(get()?).await?;
//! assert_eq!(first.headers()["cache-status"], "edge; fwd=uri-miss; fwd-status=200; stored");
//! clock.advance(std::time::Duration::from_secs(15));
//! let second = app.clone().oneshot(get()?).await?;
//! assert_eq!(second.headers()["cache-status"], "edge; hit; ttl=45");
//! assert_eq!(second.headers()[header::AGE], "15");
//! assert!(second.headers().get("cache-tag").is_none()); // tags stay with the operator
//!
//! purger.purge_tag("article-42").await?;
//! let third = app.oneshot(get()?).await?;
//! assert_eq!(third.headers()["cache-status"], "edge; fwd=uri-miss; fwd-status=200; stored");
//! assert_eq!((stats.hits(), stats.stored()), (1, 2));
//! # Ok(())
//! # }
//! ```
//!
//! ## What is stored
//!
//! Only responses to GET, and only when all of these hold (RFC 9111 §3):
//!
//! * a final status other than 206 and 304;
//! * **explicit freshness**: `s-maxage` (which wins: this is a shared cache), else `max-age`,
//!   else `Expires` minus `Date`. There is no heuristic freshness, so a response without them
//!   is never stored. A repeated or malformed `max-age`/`s-maxage` makes the response stale
//!   (§4.2.1), and an invalid `Expires` (such as `0`) means "already expired";
//! * no `no-store` (unless `must-understand` and a status understood: §5.2.2.3), no
//!   unqualified `private` or `no-cache`. The qualified forms (`private="Set-Cookie"`) store
//!   the response without the fields they name. An unqualified `no-cache` response is
//!   stored only when it has a validator (and revalidation is on), as an entry revalidated
//!   before every use (§5.2.2.4, below) and never served stale. Each `Cache-Control` line is
//!   read as bytes, so a quoted argument outside ASCII (`x-note="café"`) hides none of the
//!   line's directives; a line that does not parse at all (a name that is not a token, an
//!   unterminated quoted string) might have said `private`, so the response is not stored
//!   (`detail=no-store`);
//! * no `Set-Cookie`, unless [`store_set_cookie(true)`](HttpCacheLayerBuilder::store_set_cookie);
//! * for a request with `Authorization` (only handled at all with
//!   [`cache_authorized(true)`](HttpCacheLayerBuilder::cache_authorized)): `public`,
//!   `s-maxage` or `must-revalidate` on the response (§3.5);
//! * not `Vary: *`, at most 8 `Vary` names ([`max_vary_headers`](HttpCacheLayerBuilder::max_vary_headers)),
//!   and at most 16 variants per URI ([`max_variants`](HttpCacheLayerBuilder::max_variants));
//! * a body of at most 1 MiB ([`max_body_bytes`](HttpCacheLayerBuilder::max_body_bytes)) and
//!   no trailers. A larger body is read only up to the limit, then streams through unstored;
//! * not already stale when received (its `Age`, and the delay, count: §4.2.3).
//!
//! Hop-by-hop fields, `Age` and upstream `Cache-Status` are not stored. Freshness and ages
//! follow the injected [`Clock`](statehouse::Clock) ([`HttpCacheLayerBuilder::clock`]), so
//! tests use a `ManualClock`; a hit carries `Age`.
//!
//! ## Requests
//!
//! * GET and HEAD are looked up; HEAD is answered from a stored GET without the body. A HEAD
//!   miss goes to the origin as HEAD and stores nothing.
//! * Bypass the cache (`fwd=bypass`: forwarded as they are, nothing stored, never coalesced
//!   with other requests): `Cache-Control: no-store` (a request `Cache-Control` line that
//!   does not parse counts as `no-store`), a `Range` (`detail=range`), `If-Match`,
//!   `If-Unmodified-Since` or `If-Range` (`detail=precondition`: the origin's `412` or `206`
//!   answers that client alone), `Authorization` (unless allowed), and a request in absolute
//!   form whose `Host` names another host than its URI (`detail=host-mismatch`: an
//!   application building links from `Host` would otherwise have one client's `Host` served
//!   to every visitor of the URI's host; see *Keys*).
//!   `no-cache` or `max-age=0` go to the origin even when a fresh entry
//!   exists (`fwd=request`), and the new response is stored; `max-age=N` and `min-fresh=N`
//!   are honoured; `only-if-cached` gets a 504 when the cache cannot answer.
//! * Any other method goes to the origin (`fwd=method`). An unsafe one (anything but GET,
//!   HEAD, OPTIONS, TRACE) that succeeds (2xx, 3xx) drops the entry of its target URI
//!   (§4.4). The URIs in `Location` and `Content-Location`, which §4.4 allows dropping too,
//!   are left alone.
//! * A conditional GET or HEAD that a fresh stored `200` satisfies (`If-None-Match` matching
//!   its `ETag` by the weak comparison, or `*`; without `If-None-Match`, `If-Modified-Since`
//!   at or after its `Last-Modified`) gets a `304 Not Modified` from the cache, with the
//!   stored `Cache-Control`, `Content-Location`, `Date`, `ETag`, `Expires`, `Vary`,
//!   `Last-Modified` and `Age`, and no body (§4.3.2). One that misses is filled: its
//!   `If-None-Match` and `If-Modified-Since` are kept from the origin (which then sends the
//!   whole response, stored as any other), and answered from what the origin sent, with a
//!   `304` when the client's copy is current (carrying the origin's `Set-Cookie`, if any,
//!   with the fields above). That is only for a response the cache may store: one it does not
//!   store (`Set-Cookie`, `private`, `no-store`...) goes to the client as the origin sent it,
//!   every field and the body (a `200` answers a conditional GET too). Only a request that
//!   cannot store (another
//!   replica holds the fill's lease, or the store is down) goes to the origin with its
//!   conditions, and the origin's `304` is passed on.
//! * A stale entry goes to the origin (`fwd=stale`; so does a fresh one the request refuses,
//!   `fwd=request`). One with a validator (`ETag`, `Last-Modified`) is kept for
//!   [`revalidate_window`](HttpCacheLayerBuilder::revalidate_window) (default 10 minutes)
//!   after it went stale and is **revalidated** (§4.3): the origin gets `If-None-Match` and
//!   `If-Modified-Since` with the stored validators (never the client's own), and a
//!   `304 Not Modified` refreshes the stored response: its fields updated from the 304's
//!   (`Content-Length` excepted), its freshness judged again, its body kept; the client gets
//!   it whole, or a `304` when its own conditions say its copy is current
//!   (`fwd-status=304; stored`). Any other answer
//!   replaces the entry as a new response would. If the entry's `stale-if-error` window
//!   (RFC 5861) is still open and the origin fails (an error, or 500, 502, 503, 504), the
//!   stale entry is served instead. `must-revalidate`, `proxy-revalidate` and `s-maxage`
//!   close that window.
//! * **`stale-while-revalidate=N`** (RFC 5861 §3; on unless
//!   [`stale_while_revalidate(false)`](HttpCacheLayerBuilder::stale_while_revalidate)): for N
//!   seconds after a response went stale (at most `max_ttl`), a GET for it is answered from
//!   the store at once (`hit; ttl=-5; detail=stale-while-revalidate`, counted in
//!   [`HttpCacheStats::stale_while_revalidate`]), and the request itself goes on to the
//!   origin from a background task, as the fill of the key (revalidating with the stored
//!   validators where it has them): one per key at a time in a process, and only in the
//!   replica that takes the key's lease (another replica already refreshing it means nothing
//!   more is sent). Not for a response that may never be served stale (`must-revalidate`,
//!   `proxy-revalidate`, `s-maxage`, unqualified `no-cache`), a request with `no-cache`,
//!   `max-age` or `min-fresh`, or a HEAD: those wait for the origin.
//!
//! ## Keys, `Vary`, coalescing, leases
//!
//! The key is the scheme (the URI's own, else [`default_scheme`](HttpCacheLayerBuilder::default_scheme)),
//! the host (lowercase, default port dropped) and the exact path and query. The host is the
//! URI's own when it has one (absolute form, HTTP/2's `:authority`), else the `Host` header;
//! a request carrying both, naming different hosts (compared the same way), is not cached. A response with
//! `Vary` stores a small *vary spec* at that key (the names and a random generation) and the
//! response itself under a variant key made of the generation and a SHA-256 of the request's
//! values of those fields.
//!
//! Concurrent misses for one key in one process make **one** upstream request; the others
//! wait and get its response (`collapsed`), or go upstream themselves when it could not be
//! stored. Across replicas, a filler takes the store's lease on the key before asking the
//! origin and writes with it: a purge or an invalidation in between voids the lease, so an
//! old response is never written back after it. A replica that finds the lease taken goes
//! to the origin and does not store (`detail=lease-held`). A filler whose client goes away
//! mid-fill (at any point after it took the lease) gives its lease back from a background
//! task, and its waiters look the key up again (one of them leads).
//!
//! ## Purging
//!
//! [`HttpCachePurger`] (from [`HttpCacheLayer::purger`]) drops a URI (every variant) or every
//! response carrying a tag. Tags come from the `Cache-Tag` response header (comma-separated;
//! [`tag_header`](HttpCacheLayerBuilder::tag_header)), are recorded with their versions in the
//! stored entry, and are removed from responses sent to clients unless
//! [`strip_tag_header(false)`](HttpCacheLayerBuilder::strip_tag_header).
//!
//! ## The store down or slow
//!
//! Every store call has a deadline (50 ms, [`store_deadline`](HttpCacheLayerBuilder::store_deadline)),
//! kept with Tokio's timer: the layer runs inside a Tokio runtime with time enabled (as every
//! axum and hyper server does).
//! A failing or slow store never fails a request: it goes to the origin, is not stored
//! (`detail=store-unavailable`), and [`HttpCacheStats::store_errors`] counts it. A
//! [circuit breaker](HttpCacheLayerBuilder::circuit_breaker) (3 failures in a row, then 1 s
//! without calling the store, then one probe; one per failure domain of the store, so on Redis
//! Cluster one dead master does not cut the others off) makes a dead store cost a request no
//! deadline at all ([`HttpCacheLayer::breaker_state`]). A stored value that does not decode
//! (corrupt, truncated, another program's, or claiming more header lines than it holds) is a
//! miss, counted in [`HttpCacheStats::decode_errors`], never a panic.
//!
//! ## `Cache-Status`
//!
//! Every response gets one member (RFC 9211), after any from upstream caches:
//!
//! | case | value |
//! |---|---|
//! | fresh hit | `statehouse; hit; ttl=42` |
//! | miss, stored | `statehouse; fwd=uri-miss; fwd-status=200; stored` |
//! | miss, not stored | `statehouse; fwd=uri-miss; fwd-status=200; detail=set-cookie` |
//! | another variant | `statehouse; fwd=vary-miss; fwd-status=200; stored` |
//! | waited for another request | `statehouse; fwd=uri-miss; fwd-status=200; collapsed` |
//! | request directives | `statehouse; fwd=request; fwd-status=200; stored` |
//! | stale entry | `statehouse; fwd=stale; fwd-status=200; stored` |
//! | not handled | `statehouse; fwd=bypass; fwd-status=200; detail=no-store` (or `range`, `precondition`, `authorization`, `host-mismatch`, `no-host`) |
//! | other methods | `statehouse; fwd=method; fwd-status=204` |
//!
//! The `detail` of a response not stored is a [`NotStoredReason`].

mod assess;
mod body;
mod conditional;
mod control;
mod flight;
mod future;
mod key;
mod layer;
mod purge;
mod service;
mod stats;
mod stored;

pub use body::CacheBody;
pub use future::ResponseFuture;
pub use layer::{
    DEFAULT_LEASE_TTL, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_VARIANTS, DEFAULT_MAX_VARY_HEADERS,
    DEFAULT_REVALIDATE_WINDOW, DEFAULT_STORE_DEADLINE, HttpCacheLayer, HttpCacheLayerBuilder,
};
pub use purge::HttpCachePurger;
pub use service::HttpCache;
pub use stats::{HttpCacheStats, NotStoredReason};
