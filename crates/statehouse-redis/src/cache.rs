//! [`RedisCacheStore`]: the [`CacheStore`] (the shared "L2" cache tier) on Redis and Redis
//! Cluster.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::{ScriptInvocation, Value};
use statehouse_core::cache::{
    CacheStore, Invalidation, InvalidationSink, InvalidationSubscription, LeaseOutcome, LeaseToken,
    validate_cache_key, validate_tag,
};
use statehouse_core::key::validate_prefix;
use statehouse_core::{Error, Result, Timestamp};
use tokio::time::Instant;

use crate::cache_get::GetBatcher;
use crate::cache_script::{self, flag, fresh_version, ttl_millis};
use crate::hash_slot::hash_slot;
use crate::link::Link;
use crate::store::{RedisStore, failure_domain_of_slot};

/// The caller's `now` must stay below 2^53 µs (the year 2255): the script compares lease
/// expiries as Lua numbers, which are exact only below that.
const MAX_NOW_MICROS: u64 = 1 << 53;

/// A cache store on Redis or Redis Cluster: values, fill leases, tag versions, prefix purges
/// and the invalidation channel every replica's near cache listens to.
///
/// Made from a [`RedisStore`] with [`RedisStore::cache_store`]: it shares that store's
/// connection, key prefix and call deadline (every call returns [`Error::Timeout`] or
/// [`Error::Unavailable`] within it when Redis is down, so
/// [`Error::is_unavailable`] tells an outage from a bad request). Cloning is cheap: clones share
/// the connection.
///
/// # Operations
///
/// * [`get`](CacheStore::get) is a plain `GET`, coalesced: the reads queued while earlier ones
///   are on the wire go out as one `MGET` per Cluster slot (see `src/cache_get.rs`). It returns
///   the stored bytes as they are, whoever wrote them; telling a foreign value from an
///   [`Envelope`](statehouse_core::cache::Envelope) is the facade's job.
/// * `set`, `delete`, `acquire_lease`, `release_lease`, `bump_tag` and `tag_versions` are each
///   **one** Lua script call (`EVALSHA`, loaded on `NOSCRIPT`; `src/cache.lua`). The ones that
///   change a value or a tag (`set`, `delete`, `bump_tag`) `PUBLISH` the matching
///   [`Invalidation`] inside the same script, so no replica can miss a change that happened.
///   Lease calls publish nothing: they change no value, and a message would needlessly evict
///   every replica's near-cache copy during an early refresh.
/// * [`purge_prefix`](CacheStore::purge_prefix) runs `SCAN MATCH … COUNT 1000` on every master
///   (never `KEYS`), deletes what it finds with `UNLINK`, then publishes
///   [`Invalidation::Prefix`]. Each `SCAN` and `UNLINK` call has the call deadline of its own.
///   On a cluster being resharded a key can move from a master not yet scanned to one already
///   scanned, so the purge reads the slot map (`CLUSTER NODES` of every master) before and
///   after its scans and lists the keys of every slot that was moving or changed owner
///   (`CLUSTER GETKEYSINSLOT`) on the nodes involved, the source first.
/// * [`subscribe`](CacheStore::subscribe) opens a Pub/Sub connection of its own (redis-rs
///   `get_async_pubsub`: its message stream ends when the connection is lost, which is exactly
///   when the sink must hear `on_channel_down`; RESP3 pushes on the shared connection would be
///   resubscribed silently on reconnect, hiding the loss), subscribes, calls `on_channel_up`
///   and only then returns; an error once every node was tried, each within the call
///   timeout (on a Cluster, after asking the nodes for the cluster's nodes, also within one
///   call timeout in all). A background
///   task then delivers each message (a malformed one is skipped and counted in
///   [`malformed_invalidations`](RedisCacheStore::malformed_invalidations)), `PING`s every
///   second to notice a connection that silently died, and after a loss calls
///   `on_channel_down`, retries after 50 ms doubling to 2 s (on a cluster, trying the other
///   nodes, masters and replicas, as the cluster last described them in `CLUSTER SLOTS`: a
///   classic `PUBLISH` reaches every node, so one is enough) and calls
///   `on_channel_up` once subscribed again. Dropping the returned subscription stops the task
///   and releases the sink.
///
/// # Key layout
///
/// With the store's prefix `P` (`sh:rl:` by default):
///
/// * `P` `c:{=<key>}`: the value of `key`, with a `PX` TTL from the caller's TTL;
/// * `P` `c:{=<key>}:lease`: its fill lease, `"<token>:<expires_at µs>"`, with a `PX` TTL from
///   the lease TTL (the expiry that counts is `expires_at`, judged by the caller's clock);
/// * `P` `t:{<tag>}`: a tag's version, with a 30-day TTL renewed by reads and bumps (a tag in use
///   never expires; an expired or evicted tag gets a fresh random version: misses, never stale
///   hits);
/// * `P` `cache:invalidate`: the Pub/Sub channel.
///
/// Every key written has a TTL. Keys are stored verbatim (any UTF-8, braces, newlines, NUL and
/// glob characters included), which is what lets a prefix purge find them with `SCAN MATCH`.
///
/// **Why no escaping is needed for Redis Cluster.** The cache key sits inside the key's own
/// hash tag, right after a fixed `=`. Redis hashes the text between the first `{` and the
/// next `}`. The prefix has no braces ([`validate_prefix`]), so the first `{` is the one the
/// store writes; the next `}` is either inside the cache key or the store's closing brace. The
/// data key and its lease key are the same text up to that point (the lease key only appends
/// `:lease` after the closing brace), so they hash the same tag and live in one slot whatever
/// the key holds. The `=` keeps that tag from ever being empty (for a key starting with `}`),
/// because Redis hashes the *whole* name for an empty tag, which would split the pair.
///
/// ```no_run
/// use std::time::Duration;
/// use statehouse_core::cache::CacheStore;
/// use statehouse_redis::RedisStore;
///
/// # async fn example() -> Result<(), statehouse_core::Error> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// let cache = store.cache_store();
/// cache.set("user:42", b"...", Duration::from_secs(60), None).await?;
/// assert_eq!(cache.get("user:42").await?.as_deref(), Some(&b"..."[..]));
/// assert_eq!(cache.data_key("user:42")?, "sh:rl:c:{=user:42}");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisCacheStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) link: Arc<Link>,
    pub(crate) prefix: String,
    /// `<prefix>cache:invalidate`.
    pub(crate) channel: String,
    /// Coalesces concurrent reads.
    gets: GetBatcher,
    /// Malformed invalidation messages skipped by this store's subscriptions.
    pub(crate) malformed: Arc<AtomicU64>,
}

impl fmt::Debug for RedisCacheStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCacheStore")
            .field("link", &self.inner.link)
            .field("prefix", &self.inner.prefix)
            .field("channel", &self.inner.channel)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A cache store that shares this store's connection, key prefix and call deadline; see
    /// [`RedisCacheStore`] for the key layout.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), statehouse_core::Error> {
    /// let limits = statehouse_redis::RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// let cache = limits.cache_store();
    /// assert_eq!(cache.prefix(), limits.prefix());
    /// # Ok(())
    /// # }
    /// ```
    pub fn cache_store(&self) -> RedisCacheStore {
        RedisCacheStore::new(Arc::clone(self.link()), self.prefix().to_owned())
    }
}

impl RedisCacheStore {
    fn new(link: Arc<Link>, prefix: String) -> RedisCacheStore {
        RedisCacheStore {
            inner: Arc::new(Inner {
                link,
                channel: format!("{prefix}cache:invalidate"),
                prefix,
                gets: GetBatcher::new(),
                malformed: Arc::new(AtomicU64::new(0)),
            }),
        }
    }

    /// This store with another key prefix (at most 64 printable ASCII characters without
    /// spaces or braces), on the same connection. Its channel follows the prefix, so stores
    /// with different prefixes never see each other's invalidations.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), statehouse_core::Error> {
    /// let limits = statehouse_redis::RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// let cache = limits.cache_store().with_prefix("app:cache:")?;
    /// assert_eq!(cache.channel(), "app:cache:cache:invalidate");
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_prefix(self, prefix: &str) -> Result<RedisCacheStore> {
        validate_prefix(prefix)?;
        Ok(RedisCacheStore::new(
            Arc::clone(&self.inner.link),
            prefix.to_owned(),
        ))
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The Pub/Sub channel of the invalidations: `<prefix>cache:invalidate`.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// The Redis key holding `key`'s value: `<prefix>c:{=<key>}`.
    pub fn data_key(&self, key: &str) -> Result<String> {
        validate_cache_key(key)?;
        Ok(self.data_key_unchecked(key))
    }

    /// The Redis key holding `key`'s fill lease: `<prefix>c:{=<key>}:lease`.
    pub fn lease_key(&self, key: &str) -> Result<String> {
        validate_cache_key(key)?;
        Ok(self.lease_key_of(&self.data_key_unchecked(key)))
    }

    /// The Redis key holding `tag`'s version: `<prefix>t:{<tag>}`.
    pub fn tag_key(&self, tag: &str) -> Result<String> {
        validate_tag(tag)?;
        Ok(self.tag_key_unchecked(tag))
    }

    /// How many malformed invalidation messages this store's subscriptions skipped (a message
    /// on the channel that [`Invalidation::decode`] refuses: another program publishing there,
    /// or a newer Statehouse's format).
    pub fn malformed_invalidations(&self) -> u64 {
        self.inner.malformed.load(Ordering::Relaxed)
    }

    pub(crate) fn data_key_unchecked(&self, key: &str) -> String {
        let mut out = String::with_capacity(self.inner.prefix.len() + key.len() + 5);
        out.push_str(&self.inner.prefix);
        out.push_str("c:{=");
        out.push_str(key);
        out.push('}');
        out
    }

    fn lease_key_of(&self, data_key: &str) -> String {
        format!("{data_key}:lease")
    }

    fn tag_key_unchecked(&self, tag: &str) -> String {
        format!("{}t:{{{tag}}}", self.inner.prefix)
    }

    pub(crate) fn deadline(&self) -> Instant {
        Instant::now() + self.inner.link.call_timeout
    }

    /// The Cluster slot of a key (0 on standalone, where it is not needed).
    pub(crate) fn slot(&self, key: &str) -> u16 {
        if self.inner.link.conn.is_cluster() {
            hash_slot(key.as_bytes())
        } else {
            0
        }
    }

    /// A coalesced read (see `src/cache_get.rs`), answered within the call deadline or the
    /// caller's shorter `timeout`.
    async fn read(&self, key: &str, timeout: Option<Duration>) -> Result<Option<Vec<u8>>> {
        validate_cache_key(key)?;
        let data_key = self.data_key_unchecked(key);
        let slot = self.slot(&data_key);
        self.inner
            .gets
            .get(&self.inner.link, data_key, slot, timeout)
            .await
    }

    async fn run(&self, inv: &ScriptInvocation<'_>) -> Result<Value> {
        let link = &self.inner.link;
        link.bounded(self.deadline(), link.conn.invoke(inv)).await
    }

    /// Reads (or creates) the versions of tags that share one slot, in order.
    async fn tags_in_one_slot(&self, keys: Vec<String>) -> Result<Vec<u64>> {
        let fresh = keys
            .iter()
            .map(|_| fresh_version())
            .collect::<Result<Vec<u64>>>()?;
        let inv = cache_script::tags(&keys, &fresh);
        cache_script::versions(self.run(&inv).await?, keys.len())
    }
}

#[async_trait]
impl CacheStore for RedisCacheStore {
    /// On Redis Cluster, the groups of hash slots of the rate limiter's store
    /// ([`CLUSTER_FAILURE_DOMAINS`](crate::CLUSTER_FAILURE_DOMAINS)); on standalone Redis, one.
    fn failure_domains(&self) -> usize {
        if self.inner.link.conn.is_cluster() {
            crate::CLUSTER_FAILURE_DOMAINS
        } else {
            1
        }
    }

    /// The slot group of `key`'s data key.
    fn failure_domain(&self, key: &str) -> usize {
        if !self.inner.link.conn.is_cluster() {
            return 0;
        }
        failure_domain_of_slot(hash_slot(self.data_key_unchecked(key).as_bytes()))
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.read(key, None).await
    }

    /// Always `Some`: every read is bounded by the store's call deadline already. A read with a
    /// shorter `timeout` goes to the coalescer of that timeout (one per timeout in use), which
    /// answers it by then without a timer per read (`src/cache_get.rs`).
    async fn get_within(&self, key: &str, timeout: Duration) -> Option<Result<Option<Vec<u8>>>> {
        Some(self.read(key, Some(timeout)).await)
    }

    async fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        lease: Option<&LeaseToken>,
    ) -> Result<bool> {
        validate_cache_key(key)?;
        let ttl_ms = ttl_millis(ttl, "a cache TTL")?;
        let data_key = self.data_key_unchecked(key);
        let message = Invalidation::Keys(vec![key.to_owned()]).encode();
        let inv = cache_script::set(
            &data_key,
            &self.lease_key_of(&data_key),
            &self.inner.channel,
            &message,
            value,
            ttl_ms,
            lease.map(LeaseToken::as_str),
        );
        flag(self.run(&inv).await?, "set")
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        validate_cache_key(key)?;
        let data_key = self.data_key_unchecked(key);
        let message = Invalidation::Keys(vec![key.to_owned()]).encode();
        let inv = cache_script::delete(
            &data_key,
            &self.lease_key_of(&data_key),
            &self.inner.channel,
            &message,
        );
        flag(self.run(&inv).await?, "delete")
    }

    async fn acquire_lease(
        &self,
        key: &str,
        now: Timestamp,
        ttl: Duration,
    ) -> Result<LeaseOutcome> {
        validate_cache_key(key)?;
        let ttl_ms = ttl_millis(ttl, "a lease TTL")?;
        if now.as_micros() >= MAX_NOW_MICROS {
            return Err(Error::InvalidInput(format!(
                "`now` must be before 2^53 µs since the epoch, got {} µs",
                now.as_micros()
            )));
        }
        let token = LeaseToken::generate()?;
        let lease_key = self.lease_key_of(&self.data_key_unchecked(key));
        let inv = cache_script::acquire(&lease_key, token.as_str(), now.as_micros(), ttl, ttl_ms);
        Ok(if flag(self.run(&inv).await?, "acquire_lease")? {
            LeaseOutcome::Acquired(token)
        } else {
            LeaseOutcome::HeldElsewhere
        })
    }

    async fn release_lease(&self, key: &str, token: &LeaseToken) -> Result<bool> {
        validate_cache_key(key)?;
        let lease_key = self.lease_key_of(&self.data_key_unchecked(key));
        let inv = cache_script::release(&lease_key, token.as_str());
        flag(self.run(&inv).await?, "release_lease")
    }

    async fn tag_versions(&self, tags: &[String]) -> Result<Vec<u64>> {
        for tag in tags {
            validate_tag(tag)?;
        }
        if tags.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = tags.iter().map(|t| self.tag_key_unchecked(t)).collect();
        if !self.inner.link.conn.is_cluster() {
            return self.tags_in_one_slot(keys).await;
        }
        // On a cluster, tags live in different slots: one script call per slot, concurrently.
        let mut groups: Vec<(u16, Vec<usize>, Vec<String>)> = Vec::new();
        for (position, key) in keys.into_iter().enumerate() {
            let slot = hash_slot(key.as_bytes());
            match groups.iter_mut().find(|(s, _, _)| *s == slot) {
                Some((_, positions, keys)) => {
                    positions.push(position);
                    keys.push(key);
                }
                None => groups.push((slot, vec![position], vec![key])),
            }
        }
        let (positions, calls): (Vec<Vec<usize>>, Vec<_>) = groups
            .into_iter()
            .map(|(_, positions, keys)| (positions, self.tags_in_one_slot(keys)))
            .unzip();
        let replies = futures::future::try_join_all(calls).await?;
        let mut out = vec![0; tags.len()];
        for (positions, versions) in positions.into_iter().zip(replies) {
            for (position, version) in positions.into_iter().zip(versions) {
                out[position] = version;
            }
        }
        Ok(out)
    }

    async fn bump_tag(&self, tag: &str) -> Result<u64> {
        validate_tag(tag)?;
        let message = Invalidation::Tag(tag.to_owned()).encode();
        let inv = cache_script::bump(
            &self.tag_key_unchecked(tag),
            &self.inner.channel,
            &message,
            fresh_version()?,
        );
        cache_script::version(&self.run(&inv).await?, "bumped tag version")
    }

    async fn purge_prefix(&self, prefix: &str) -> Result<u64> {
        self.purge(prefix).await
    }

    async fn subscribe(&self, sink: Arc<dyn InvalidationSink>) -> Result<InvalidationSubscription> {
        self.listen(sink).await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_key_and_its_lease_share_a_slot_whatever_the_key_holds() {
        use crate::hash_slot::hash_slot;
        for key in [
            "}", "}}", "{", "{}", "a}b", "}a{b}", "x{y}z", "plain", "\0}",
        ] {
            let data = format!("p:c:{{={key}}}");
            let lease = format!("{data}:lease");
            assert_eq!(
                hash_slot(data.as_bytes()),
                hash_slot(lease.as_bytes()),
                "{key:?}"
            );
        }
        // Without the `=`, a key starting with `}` leaves an empty tag, and Redis then hashes
        // the whole name: the pair splits. This is why the `=` is there.
        assert_ne!(hash_slot(b"p:c:{}}"), hash_slot(b"p:c:{}}:lease"));
    }
}
