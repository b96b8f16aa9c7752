//! Coalescing of concurrent session loads: the fast path's reads into one `MGET` per slot
//! (through the cache store's [`GetBatcher`](crate::cache_get::GetBatcher): the same plain
//! reads), and the loads that need the script into one script call.
//!
//! `load` is the per-request hot path. Most loads are answered by a plain read of the session
//! record; the others (a refresh that is due, an alias, an expiry edge) run the script, and
//! there most of the cost is the script call itself (the call's set-up, reading `TIME`, the
//! client's encoding and reply routing), not the few commands inside. So every
//! [`load`](statehouse_core::session::SessionStore::load) of a
//! [`RedisSessionStore`](crate::RedisSessionStore) that needs the script goes through a
//! [`LoadBatcher`]: a queue and one background task per store (shared by its clones), started
//! on first use on the caller's runtime and started again if that runtime went away. The task:
//!
//! 1. waits for a load and room on the wire, yields once, then takes the next batch from the
//!    queue (an even share of what is queued, within `MIN_SPLIT` and [`MAX_BATCH`] loads: see
//!    `src/coalesce.rs`). There is no timer: under low load a batch is a single load;
//! 2. drops loads whose caller has gone (deadline passed, future dropped): they are not sent;
//! 3. groups the batch by hash slot on Redis Cluster (standalone is one group) and sends each
//!    group as one `EVALSHA` of `session.lua` in its `load_many` mode, where each load runs
//!    exactly as a `load` call of its own, in queue order, with its own time (the caller's
//!    clock, or the script's one `TIME` read). On a cluster, a call on several users' keys of
//!    a slot that is being moved between nodes is refused with `TRYAGAIN` (nothing ran) while
//!    its keys are on two nodes; such a call is not tried again whole but split by user
//!    ([`split`], [`SplitOnMove`](crate::coalesce::SplitOnMove)): one call per user,
//!    concurrently, each user's loads in order, each following `ASK` to its keys' node (a
//!    user's session keys and index always move together: a call on one user's keys waits
//!    out the moment they are apart);
//! 4. answers each caller. A load the script refused (corrupt data, a key of the wrong type)
//!    gets its own [`Error::Backend`]; an error of the whole call (timeout, connection lost)
//!    goes to every caller in the group, mapped as a single call's error would be.
//!
//! At most [`IN_FLIGHT`](crate::coalesce::IN_FLIGHT) batches are on the wire at once: while one
//! runs on the server, the next forms in the queue. A caller is answered by its own deadline
//! (the call timeout from the moment its load started, the fast path's read included; kept by
//! the coalescer, see `src/coalesce.rs`, and by a timer of the caller's own for a load the fast
//! path handed over, see `LoadBudget` in `src/session.rs`); a load that was sent may
//! still refresh the session after its call timed out, exactly like a single `EVALSHA` that
//! timed out after reaching the server.
//!
//! Only loads are coalesced: they are the hot path, and the other operations are rare.

use std::sync::Arc;

use futures::Future;
use futures::channel::oneshot;
use redis::Value;
use statehouse_core::session::SessionConfig;
use statehouse_core::{Error, Result};
use tokio::time::Instant;

use crate::coalesce::{self, Batch, Coalescer, SplitOnMove};
use crate::link::Link;
use crate::session_script::{array, invocation, uint};

/// The most loads in one script call.
pub(crate) const MAX_BATCH: usize = 128;

/// One caller's load, waiting in the queue.
pub(crate) struct LoadRequest {
    /// The presented id's session key, `{prefix}{<tag>}:<id>`.
    pub(crate) key: String,
    /// The length of its key base `{prefix}{<tag>}:` (the id follows).
    pub(crate) base_len: usize,
    /// The caller's time in µs, or `None` for the server's.
    pub(crate) now: Option<u64>,
    /// The cluster slot of the user's keys (0 on standalone).
    pub(crate) slot: u16,
    pub(crate) deadline: Instant,
    pub(crate) reply: oneshot::Sender<Result<Value>>,
}

impl LoadRequest {
    /// The user's key base, `{prefix}{<tag>}:`.
    fn base(&self) -> &str {
        &self.key[..self.base_len]
    }
}

/// The queue of a store's loads and its background task; see the module docs.
pub(crate) struct LoadBatcher {
    /// The queue and its task (see [`crate::coalesce`]).
    queue: Coalescer<Loads>,
}

impl LoadBatcher {
    pub(crate) fn new() -> Self {
        LoadBatcher {
            queue: Coalescer::new(),
        }
    }

    /// Runs one load, coalesced with whatever other loads are queued; answers the load's own
    /// reply (`{ now, status, ... }`, as the `load` mode returns it).
    pub(crate) async fn load(
        &self,
        link: &Arc<Link>,
        config: &SessionConfig,
        request: LoadRequest,
        answer: oneshot::Receiver<Result<Value>>,
    ) -> Result<Value> {
        self.queue.submit(
            || Loads {
                link: Arc::clone(link),
                config: config.clone(),
            },
            request,
        );
        coalesce::answer(
            answer,
            "the Redis session batching task stopped before answering",
        )
        .await
    }
}

/// The background task's context: loads, sent as `load_many` script calls. Loads have no byte
/// cap: only [`MAX_BATCH`] bounds a call.
struct Loads {
    link: Arc<Link>,
    config: SessionConfig,
}

impl Batch for Loads {
    type Request = LoadRequest;

    const MAX_BATCH: usize = MAX_BATCH;
    const EAGER_ON_WIRE: usize = 2;
    const MAX_BATCH_BYTES: usize = usize::MAX;

    fn link(&self) -> &Link {
        &self.link
    }

    fn slot(request: &LoadRequest) -> u16 {
        request.slot
    }

    fn weight(_: &LoadRequest) -> usize {
        0
    }

    fn deadline(request: &LoadRequest) -> Instant {
        request.deadline
    }

    fn is_canceled(request: &LoadRequest) -> bool {
        request.reply.is_canceled()
    }

    fn fail(request: LoadRequest, err: Error) {
        let _ = request.reply.send(Err(err));
    }

    fn send(&self, group: Vec<LoadRequest>) -> impl Future<Output = ()> + Send {
        send(&self.link, &self.config, group)
    }
}

/// Sends one group as one `load_many` call and answers its callers.
async fn send(link: &Link, config: &SessionConfig, group: Vec<LoadRequest>) {
    // Read TIME only if some load wants the server's time.
    let script_now = if group.iter().any(|r| r.now.is_none()) {
        None
    } else {
        group[0].now
    };
    let mut inv = invocation(
        "load_many",
        script_now,
        link.skew_allowance_ms,
        config,
        group[0].base(),
    );
    inv.arg(group.len());
    for request in &group {
        let base = request.base();
        inv.key(request.key.as_str())
            .key(format!("{base}idx"))
            .arg(base)
            .arg(&request.key[request.base_len..]);
        match request.now {
            Some(now) => inv.arg(now),
            None => inv.arg(""),
        };
    }
    // The users' loads are independent: a call refused while their keys are apart is split by
    // user (a user's loads name its session keys and its index, which always go together).
    let on_move = SplitOnMove::new(link, &group, LoadRequest::base);
    let deadline = coalesce::call_deadline::<Loads>(&group);
    let result = link.bounded(deadline, on_move.invoke(link, &inv)).await;
    if result.is_err() && on_move.refused() {
        split(link, config, group).await;
        return;
    }
    let replies = result.and_then(|value| split_replies(value, group.len()));
    match replies {
        Ok(replies) => {
            for (request, reply) in group.into_iter().zip(replies) {
                let _ = request.reply.send(Ok(reply));
            }
        }
        Err(err) => {
            for request in group {
                let _ = request.reply.send(Err(coalesce::copy_error(&err)));
            }
        }
    }
}

/// Sends the loads of a group refused with `TRYAGAIN` (nothing ran) again as one call per user,
/// concurrently, each user's loads in their order: a call on one user's keys is not refused so
/// while they are together (a move carries them one by one; [`Connection::invoke`] waits out
/// the moment they are apart) and follows `ASK` to wherever they are now. Loads of different
/// users touch different keys, so the answers are those the whole call would have given.
///
/// [`Connection::invoke`]: crate::connection::Connection::invoke
async fn split(link: &Link, config: &SessionConfig, group: Vec<LoadRequest>) {
    let by_user = coalesce::by_key(group, LoadRequest::base);
    tracing::debug!(
        users = by_user.len(),
        "statehouse-redis: a slot is moving; sending a coalesced session load user by user"
    );
    futures::future::join_all(
        by_user
            .into_iter()
            .map(|part| Box::pin(send(link, config, part))),
    )
    .await;
}

/// Splits `{ now, reply 1, ..., reply n }`.
fn split_replies(value: Value, n: usize) -> Result<Vec<Value>> {
    let mut items = array(value, "load_many reply")?.into_iter();
    let now = items
        .next()
        .ok_or_else(|| crate::error::unexpected_reply("an empty load_many reply"))?;
    uint(&now, "now")?;
    let replies: Vec<Value> = items.collect();
    if replies.len() != n {
        return Err(crate::error::unexpected_reply(format!(
            "{} replies for {n} loads",
            replies.len()
        )));
    }
    Ok(replies)
}
