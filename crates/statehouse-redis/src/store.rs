//! [`RedisStore`]: the [`RateLimitStore`] on Redis and Redis Cluster.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use statehouse_core::key::{POLICY_SUFFIX_MAX_LEN, encode_key, push_policy_suffix};
use statehouse_core::{
    Decision, Error, LimitCheck, Mode, Policy, RateLimitStore, Result, Verdict, prepare_checks,
};
use tokio::time::Instant;

use crate::batch::Batcher;
use crate::builder::{RedisStoreBuilder, RedisTopology};
use crate::error::unexpected_reply;
use crate::hash_slot::hash_slot;
use crate::limiter_script::{
    ScriptCheck, ScriptMode, ScriptReply, invocation, parse_refund_reply, parse_reply,
};
use crate::link::Link;

/// A rate-limit store on Redis or Redis Cluster.
///
/// Every check runs [`statehouse_core::algorithm::decide`] inside one Lua script on the server
/// (`EVALSHA`, loaded on `NOSCRIPT`): it reads the state of every limit of the request, decides
/// them all, and writes the new states only if every limit admits (all or nothing), each with an
/// expiry. By default the script reads the server's `TIME`, so every replica of a fleet decides
/// on one clock.
///
/// Cloning is cheap: clones share the connection.
///
/// # Coalescing
///
/// Requests with a single check (the common case) are coalesced: concurrent ones are sent
/// together as one script call that decides and commits each of them on its own, in order, as
/// if each were a call of its own, so decisions are exactly those of separate calls. There is
/// no timer: a check is sent as soon as fewer than four batches are on the wire (after one
/// scheduler pass that lets other callers join), so under low load a batch is one check and
/// batching adds no measurable latency. A caller that gives up
/// at its deadline gets [`Error::Timeout`], and its check, if already sent, may still be
/// applied, just as with a single `EVALSHA` that timed out. Requests with several checks keep
/// their own all-or-nothing call. The design is described in `src/batch.rs`.
///
/// # Redis Cluster
///
/// Storage keys carry the caller's key as their hash tag (`sh:rl:{user:1}:gcra:60000000`), so
/// every limit on one key lives in one slot and a request whose limits all concern one key is
/// still one atomic script. A batch whose keys fall in **several slots** cannot be one script on
/// a cluster; it is **"consume in order, refund on denial"**: the slots are consumed one after
/// the other, and on the first denial the slots already consumed are refunded (undone at the
/// time they were consumed at). This never admits more than the limits allow, but for a moment
/// other requests may see less remaining than they should. The protocol runs in a task of its
/// own, so the refund happens even if the caller stops waiting.
///
/// ```no_run
/// use std::time::Duration;
/// use statehouse_core::{LimitCheck, Mode, Policy, RateLimitStore};
/// use statehouse_redis::RedisStore;
///
/// # async fn example() -> Result<(), statehouse_core::Error> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// let per_minute = Policy::gcra(60, Duration::from_secs(60))?;
/// let verdict = store
///     .check(&[LimitCheck::new("user:42", &per_minute, 1)], Mode::Consume)
///     .await?;
/// assert!(verdict.allowed());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Shared with the session stores made by [`RedisStore::session_store`].
    link: Arc<Link>,
    prefix: String,
    /// Coalesces concurrent single checks into one script call: see [`crate::batch`].
    batcher: Batcher,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let link = &self.inner.link;
        f.debug_struct("RedisStore")
            .field("topology", &link.topology)
            .field("prefix", &self.inner.prefix)
            .field("time_source", &link.time_source)
            .field("skew_allowance_ms", &link.skew_allowance_ms)
            .field("call_timeout", &link.call_timeout)
            .finish_non_exhaustive()
    }
}

/// The checks of a batch that share one cluster slot, with their positions in the batch.
struct SlotGroup {
    positions: Vec<usize>,
    checks: Vec<ScriptCheck>,
}

impl RedisStore {
    /// One check: coalesced with the other callers' (see `crate::batch`) and decided as if
    /// alone, answered within `timeout` when it is shorter than the call timeout. Validated as
    /// `prepare_checks` does, without its vector.
    async fn check_single(
        &self,
        single: &LimitCheck<'_>,
        mode: Mode,
        timeout: Option<Duration>,
    ) -> Result<Verdict> {
        single.policy.check_cost(single.cost)?;
        let key = encode_key(single.key)?;
        let check = ScriptCheck::new(
            self.storage_key_of_encoded(&key, single.policy),
            single.policy,
            single.cost,
        );
        let slot = if self.inner.link.conn.is_cluster() {
            hash_slot(key.as_bytes())
        } else {
            0
        };
        let now = self.inner.link.caller_now();
        let decision = self
            .inner
            .batcher
            .check(&self.inner.link, check, mode, now, slot, timeout)
            .await?;
        Ok(Verdict {
            decisions: vec![decision],
        })
    }

    /// A builder for a store on `topology`; finish with [`RedisStoreBuilder::connect`].
    pub fn builder(topology: RedisTopology) -> RedisStoreBuilder {
        RedisStoreBuilder::new(topology)
    }

    /// Connects to a standalone Redis at `url` with the default settings.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), statehouse_core::Error> {
    /// let store = statehouse_redis::RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(url: &str) -> Result<RedisStore> {
        Self::builder(RedisTopology::Standalone(url.to_owned()))
            .connect()
            .await
    }

    /// Connects to a Redis Cluster through one or more of its nodes with the default settings.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), statehouse_core::Error> {
    /// let store = statehouse_redis::RedisStore::connect_cluster(&[
    ///     "redis://10.0.0.1:6379",
    ///     "redis://10.0.0.2:6379",
    /// ])
    /// .await?;
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_cluster(urls: &[&str]) -> Result<RedisStore> {
        let urls = urls.iter().map(|u| (*u).to_owned()).collect();
        Self::builder(RedisTopology::Cluster(urls)).connect().await
    }

    pub(crate) fn from_parts(link: Arc<Link>, prefix: String) -> RedisStore {
        RedisStore {
            inner: Arc::new(Inner {
                link,
                prefix,
                batcher: Batcher::new(),
            }),
        }
    }

    /// The link this store talks to Redis over, for the session stores that share it.
    pub(crate) fn link(&self) -> &Arc<Link> {
        &self.inner.link
    }

    /// The Redis key holding the state of `key` under `policy`:
    /// `{prefix}{{{encoded key}}}:{algorithm}:{period in µs}`, where the encoded key is
    /// [`encode_key`] of `key` (the key itself when short and brace-free, otherwise `~` and a
    /// hash) and doubles as the Redis Cluster hash tag.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), statehouse_core::Error> {
    /// use std::time::Duration;
    /// use statehouse_core::Policy;
    ///
    /// let store = statehouse_redis::RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// let policy = Policy::gcra(100, Duration::from_secs(60))?;
    /// assert_eq!(store.storage_key("user:1", &policy)?, "sh:rl:{user:1}:gcra:60000000");
    /// # Ok(())
    /// # }
    /// ```
    pub fn storage_key(&self, key: &str, policy: &Policy) -> Result<String> {
        Ok(self.storage_key_of_encoded(&encode_key(key)?, policy))
    }

    /// The key prefix of this store.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    fn storage_key_of_encoded(&self, encoded: &str, policy: &Policy) -> String {
        // Sized up front: `format!` would start empty and grow three or four times, on every
        // check.
        let prefix = &self.inner.prefix;
        let mut key =
            String::with_capacity(prefix.len() + encoded.len() + POLICY_SUFFIX_MAX_LEN + 3);
        key.push_str(prefix);
        key.push('{');
        key.push_str(encoded);
        key.push_str("}:");
        push_policy_suffix(&mut key, policy);
        key
    }

    /// Runs the script once over `checks` (all in one slot on a cluster).
    async fn run_script(
        &self,
        mode: ScriptMode,
        now: Option<u64>,
        checks: &[ScriptCheck],
        deadline: Instant,
    ) -> Result<ScriptReply> {
        let inv = invocation(mode, now, self.inner.link.skew_allowance_ms, checks);
        let value = self
            .inner
            .link
            .bounded(deadline, self.inner.link.conn.invoke(&inv))
            .await?;
        parse_reply(value, checks)
    }

    /// Undoes the consumption of `checks` made at `now`, with a deadline of its own: refunds
    /// run after a batch's deadline may have passed, and are worth finishing.
    async fn refund(&self, now: u64, checks: &[ScriptCheck]) -> Result<()> {
        let inv = invocation(
            ScriptMode::Refund,
            Some(now),
            self.inner.link.skew_allowance_ms,
            checks,
        );
        let deadline = Instant::now() + self.inner.link.call_timeout;
        let value = self
            .inner
            .link
            .bounded(deadline, self.inner.link.conn.invoke(&inv))
            .await?;
        parse_refund_reply(value)
    }

    /// Refunds every consumed group, concurrently; failures are logged, not returned: the
    /// request's outcome stands, and an unrefunded consumption only ever errs on the strict side.
    async fn refund_all(&self, consumed: Vec<(u64, Vec<ScriptCheck>)>) {
        let refunds = consumed
            .iter()
            .map(|(now, checks)| self.refund(*now, checks));
        for (result, (_, checks)) in futures::future::join_all(refunds)
            .await
            .into_iter()
            .zip(&consumed)
        {
            if let Err(err) = result {
                tracing::warn!(
                    error = %err,
                    keys = ?checks.iter().map(|c| c.storage_key.as_str()).collect::<Vec<_>>(),
                    "statehouse-redis: could not refund a cross-slot batch; these limits stay \
                     consumed until their windows pass"
                );
            }
        }
    }

    /// Groups checks by cluster slot, in order of first appearance.
    fn group_by_slot(checks: Vec<ScriptCheck>, slots: &[u16]) -> Vec<SlotGroup> {
        let mut groups: Vec<(u16, SlotGroup)> = Vec::new();
        for (position, (check, &slot)) in checks.into_iter().zip(slots).enumerate() {
            match groups.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, group)) => {
                    group.positions.push(position);
                    group.checks.push(check);
                }
                None => groups.push((
                    slot,
                    SlotGroup {
                        positions: vec![position],
                        checks: vec![check],
                    },
                )),
            }
        }
        groups.into_iter().map(|(_, group)| group).collect()
    }

    /// A cross-slot batch on Redis Cluster: see the type's docs.
    async fn check_cross_slot(
        &self,
        groups: Vec<SlotGroup>,
        total: usize,
        mode: Mode,
        now: Option<u64>,
    ) -> Result<Verdict> {
        let deadline = Instant::now() + self.inner.link.call_timeout;
        let replies = match mode {
            Mode::Peek => {
                let runs = groups
                    .iter()
                    .map(|g| self.run_script(ScriptMode::Peek, now, &g.checks, deadline));
                futures::future::try_join_all(runs).await?
            }
            Mode::Consume => {
                // In a task of its own, so that a caller who stops waiting (its own deadline)
                // does not leave a half-consumed batch behind.
                let store = self.clone();
                let task = tokio::spawn(async move {
                    let replies = store.consume_in_order(&groups, now, deadline).await?;
                    Ok::<_, Error>((groups, replies))
                });
                let (returned_groups, replies) = task.await.map_err(|e| Error::Backend {
                    message: format!("the cross-slot consume task failed: {e}"),
                    source: Some(Box::new(e)),
                })??;
                return assemble(&returned_groups, replies, total);
            }
        };
        assemble(&groups, replies, total)
    }

    /// Consumes group by group; on the first denial, refunds the groups already consumed and
    /// reports the remaining groups with a dry run (what consuming them would have answered).
    async fn consume_in_order(
        &self,
        groups: &[SlotGroup],
        now: Option<u64>,
        deadline: Instant,
    ) -> Result<Vec<ScriptReply>> {
        let mut replies: Vec<ScriptReply> = Vec::with_capacity(groups.len());
        for (index, group) in groups.iter().enumerate() {
            let reply = match self
                .run_script(ScriptMode::Consume, now, &group.checks, deadline)
                .await
            {
                Ok(reply) => reply,
                Err(err) => {
                    // Whether this group was consumed is unknown (a timeout may come after the
                    // script ran); the earlier ones were. Refund those in the background and
                    // report the error now.
                    let consumed = consumed_groups(groups, &replies);
                    let store = self.clone();
                    tokio::spawn(async move { store.refund_all(consumed).await });
                    return Err(err);
                }
            };
            let denied = reply.decisions.iter().any(|d| !d.allowed);
            replies.push(reply);
            if denied {
                let consumed = consumed_groups(groups, &replies[..index]);
                let rest = groups[index + 1..]
                    .iter()
                    .map(|g| self.run_script(ScriptMode::DryRun, now, &g.checks, deadline));
                let (rest, ()) = futures::future::join(
                    futures::future::try_join_all(rest),
                    self.refund_all(consumed),
                )
                .await;
                replies.extend(rest?);
                return Ok(replies);
            }
        }
        Ok(replies)
    }
}

/// The groups (with the time each was consumed at) among the first `replies.len()` groups.
fn consumed_groups(groups: &[SlotGroup], replies: &[ScriptReply]) -> Vec<(u64, Vec<ScriptCheck>)> {
    groups
        .iter()
        .zip(replies)
        .map(|(group, reply)| (reply.now, group.checks.clone()))
        .collect()
}

/// Puts per-group decisions back in batch order.
fn assemble(groups: &[SlotGroup], replies: Vec<ScriptReply>, total: usize) -> Result<Verdict> {
    let mut decisions: Vec<Option<Decision>> = vec![None; total];
    for (group, reply) in groups.iter().zip(replies) {
        for (&position, decision) in group.positions.iter().zip(reply.decisions) {
            decisions[position] = Some(decision);
        }
    }
    let decisions = decisions
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| unexpected_reply("a check of a cross-slot batch got no decision"))?;
    Ok(Verdict { decisions })
}

/// The failure domains of a store on Redis Cluster: groups of 1 024 contiguous hash slots.
/// Finer groups would each need their own run of failures before their breaker opens (each
/// failure costing a caller its deadline); coarser ones would put keys of live masters behind
/// a dead one's breaker more often.
pub const CLUSTER_FAILURE_DOMAINS: usize = 16;

/// The failure domain of a hash slot: its group of contiguous slots.
pub(crate) fn failure_domain_of_slot(slot: u16) -> usize {
    usize::from(slot) * CLUSTER_FAILURE_DOMAINS / usize::from(crate::SLOT_COUNT)
}

#[async_trait]
impl RateLimitStore for RedisStore {
    /// Decides every check together, all or nothing; see the type's docs for the one exception
    /// (cross-slot batches on Redis Cluster).
    async fn check(&self, checks: &[LimitCheck<'_>], mode: Mode) -> Result<Verdict> {
        if let [single] = checks {
            return self.check_single(single, mode, None).await;
        }
        let prepared = prepare_checks(checks)?;
        if prepared.is_empty() {
            return Ok(Verdict {
                decisions: Vec::new(),
            });
        }
        let now = self.inner.link.caller_now();
        let slots: Vec<u16> = prepared
            .iter()
            .map(|p| hash_slot(p.key.as_bytes()))
            .collect();
        let script_checks: Vec<ScriptCheck> = prepared
            .iter()
            .map(|p| {
                ScriptCheck::new(
                    self.storage_key_of_encoded(&p.key, p.policy),
                    p.policy,
                    p.cost,
                )
            })
            .collect();
        let single_slot = slots.iter().all(|&s| s == slots[0]);
        if !self.inner.link.conn.is_cluster() || single_slot {
            // Standalone has no slots: any batch is one atomic script.
            let deadline = Instant::now() + self.inner.link.call_timeout;
            let reply = self
                .run_script(mode.into(), now, &script_checks, deadline)
                .await?;
            return Ok(Verdict {
                decisions: reply.decisions,
            });
        }
        let total = script_checks.len();
        let groups = Self::group_by_slot(script_checks, &slots);
        self.check_cross_slot(groups, total, mode, now).await
    }

    /// `Some` for a single check (coalesced, answered within `timeout` without a timer of its
    /// own); `None` for several checks, which the caller bounds itself.
    async fn check_within(
        &self,
        checks: &[LimitCheck<'_>],
        mode: Mode,
        timeout: Duration,
    ) -> Option<Result<Verdict>> {
        match checks {
            [single] => Some(self.check_single(single, mode, Some(timeout)).await),
            _ => None,
        }
    }

    /// On Redis Cluster, [`CLUSTER_FAILURE_DOMAINS`] groups of contiguous hash slots (a
    /// cluster assigns slots to masters in ranges, so a group lives on one master, or two at a
    /// range's edge); on standalone Redis, one.
    fn failure_domains(&self) -> usize {
        if self.inner.link.conn.is_cluster() {
            CLUSTER_FAILURE_DOMAINS
        } else {
            1
        }
    }

    /// The slot group of the check's key (a key that cannot be encoded: group 0, and the call
    /// will fail as invalid input, which no breaker counts).
    fn failure_domain(&self, check: &LimitCheck<'_>) -> usize {
        if !self.inner.link.conn.is_cluster() {
            return 0;
        }
        encode_key(check.key).map_or(0, |key| failure_domain_of_slot(hash_slot(key.as_bytes())))
    }

    /// Deletes the key's state (`UNLINK`).
    async fn reset(&self, key: &str, policy: &Policy) -> Result<()> {
        let storage_key = self.storage_key(key, policy)?;
        let deadline = Instant::now() + self.inner.link.call_timeout;
        let unlink = redis::cmd("UNLINK").arg(&storage_key).to_owned();
        self.inner
            .link
            .bounded(deadline, self.inner.link.conn.exec(&unlink))
            .await
    }
}
