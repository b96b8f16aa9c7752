//! [`HttpCachePurger`]: drops entries by URI or by tag.
//!
//! **By URI**: deletes the primary key. That removes the response, or the vary spec, which
//! makes every variant of it unreachable (variant keys embed the spec's random generation, and
//! the next spec gets a new one). The delete also voids a fill lease taken on the key, so a
//! response already on its way from the origin is not written back after the purge.
//!
//! **By tag**: bumps the tag (O(1)): every entry recorded with an older version of it is void.
//! To keep a fill that raced the purge from recording the new version with old content, a
//! purge first bumps an epoch tag that every fill reads before forwarding and again (with its
//! tags) before writing; a fill that sees the epoch move does not store. A fill whose second
//! read came before the epoch moved recorded the old tag version, which the tag bump then
//! voids.

use std::fmt;
use std::sync::Arc;

use http::Uri;
use statehouse::statehouse_core::cache::validate_tag;

use super::key::normalise_host;
use super::layer::Shared;
use super::stats::HttpCacheStats;

/// Purges the entries of one [`HttpCacheLayer`](super::HttpCacheLayer). Cheap to clone; every
/// call is one or two store calls within the layer's store deadline, and its errors are
/// returned (a purge is never silently skipped).
///
/// ```
/// # async fn demo(purger: statehouse_tower::cache::HttpCachePurger) -> statehouse::Result<()> {
/// let uri: http::Uri = "https://example.com/articles/42?page=2".parse().unwrap();
/// purger.purge(&uri).await?; // every variant of that URI
/// purger.purge_path("example.com", "/articles/42").await?; // with the default scheme
/// purger.purge_tag("article-42").await?; // every response tagged `Cache-Tag: article-42`
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct HttpCachePurger {
    shared: Arc<Shared>,
}

impl fmt::Debug for HttpCachePurger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCachePurger").finish_non_exhaustive()
    }
}

impl HttpCachePurger {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        HttpCachePurger { shared }
    }

    /// Drops every stored variant of `uri` (absolute: scheme optional, the layer's default
    /// scheme used without one; authority required). `true` when something was stored.
    pub async fn purge(&self, uri: &Uri) -> statehouse::Result<bool> {
        let scheme = uri
            .scheme_str()
            .map(str::to_ascii_lowercase)
            .unwrap_or_else(|| self.shared.config.default_scheme.clone());
        let authority = uri.authority().ok_or_else(|| {
            statehouse::Error::InvalidInput(format!("purge needs an absolute URI, got `{uri}`"))
        })?;
        let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
        self.purge_key(&scheme, authority.as_str(), path).await
    }

    /// Drops every stored variant of `path_and_query` on `host` (as in the `Host` header), with
    /// the layer's default scheme. `true` when something was stored.
    pub async fn purge_path(&self, host: &str, path_and_query: &str) -> statehouse::Result<bool> {
        let scheme = self.shared.config.default_scheme.clone();
        self.purge_key(&scheme, host, path_and_query).await
    }

    async fn purge_key(&self, scheme: &str, host: &str, path: &str) -> statehouse::Result<bool> {
        let host = normalise_host(host, scheme)
            .ok_or_else(|| statehouse::Error::InvalidInput(format!("invalid host `{host}`")))?;
        if !path.starts_with('/') {
            return Err(statehouse::Error::InvalidInput(format!(
                "a path must start with `/`, got `{path}`"
            )));
        }
        let key = format!("{}{scheme}://{host}{path}", self.shared.config.key_prefix);
        let existed = self
            .shared
            .call(&key, self.shared.store.delete(&key))
            .await?;
        self.shared.stats.count_purge();
        Ok(existed)
    }

    /// Voids every response stored with `tag` in its tag header. Returns the tag's new version.
    pub async fn purge_tag(&self, tag: &str) -> statehouse::Result<u64> {
        validate_tag(tag)?;
        let shared = &self.shared;
        let tag_key = shared.tag_key(tag);
        validate_tag(&tag_key)?;
        // The epoch first, then the tag: see the module docs for why this order.
        shared
            .call(
                &shared.epoch_tag(),
                shared.store.bump_tag(&shared.epoch_tag()),
            )
            .await?;
        let version = shared
            .call(&tag_key, shared.store.bump_tag(&tag_key))
            .await?;
        shared.stats.count_purge();
        Ok(version)
    }

    /// The layer's counters.
    pub fn stats(&self) -> Arc<HttpCacheStats> {
        self.shared.stats.clone()
    }
}
