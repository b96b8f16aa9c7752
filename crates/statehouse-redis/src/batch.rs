//! Coalescing of concurrent single checks into one script call.
//!
//! # Design
//!
//! A [`RedisStore`](crate::RedisStore) sends every request with **one check** (the common case:
//! one key, one policy, either mode) through its [`Batcher`] instead of calling the script
//! itself. The batcher is a queue (a deque behind a mutex) and one background task per store
//! (shared by its clones), started on first use on the caller's runtime and started again if
//! that runtime went away. The task loops:
//!
//! 1. It waits for a request and room on the wire, yields once (so that callers just
//!    answered queue their next checks), then takes the next batch from the queue: an even
//!    share of what is queued over the batches allowed on the wire, within
//!    [`MIN_SPLIT`](crate::coalesce::MIN_SPLIT) and [`MAX_BATCH`] checks or
//!    [`MAX_BATCH_BYTES`] of keys (the rule and why are in `src/coalesce.rs`). There is no
//!    timer: under low load a batch is a single check, sent after one scheduler pass; under
//!    load the requests that queued while earlier calls were on the wire go out together.
//! 2. It drops requests whose caller has gone (deadline passed or future dropped): those are
//!    never sent, so they cannot be applied.
//! 3. It groups the batch by hash slot (on Redis Cluster; standalone is one group), keeping
//!    queue order within each group, and sends each group as **one** `EVALSHA` of
//!    `limiter.lua` in its `independent` mode. There, each check is decided and committed on
//!    its own, in order, exactly as if it had been a call of its own: a denial does not affect
//!    the others, and two checks of one key see each other's writes. Every check carries its
//!    own mode (consume or peek) and its own time (the caller's clock, or the script's single
//!    `TIME` read, shared by the group).
//!    On a cluster, a call on several keys of a slot that is being moved between nodes is
//!    refused with `TRYAGAIN` (nothing ran) while its keys are on two nodes; such a call is
//!    not tried again whole but split by key ([`split`], [`SplitOnMove`]): one call per key,
//!    concurrently, each key's checks in order, each following `ASK` to its key's node.
//! 4. It answers each caller through its oneshot. A check the script refused (corrupt state, a
//!    key of the wrong type) gets its own [`Error::Backend`]; the others are unaffected. An
//!    error of the whole call (timeout, connection lost, `OOM`, …) goes to every caller in the
//!    group, mapped exactly as a single call's error would be, and counts once towards the
//!    connection's consecutive-timeout replacement.
//!
//! At most [`IN_FLIGHT`](crate::coalesce::IN_FLIGHT) batches are on the wire at once: while
//! one runs on the server, the client answers the previous one and the next forms in the
//! queue. This in-flight cap is what makes batches form under load; it also keeps the
//! per-check cost of the script (reading `TIME`, the call itself, the client's command encoding
//! and reply routing) shared across the checks of a batch.
//!
//! Each caller gets its answer by its own deadline (the store's call timeout from the moment it
//! called), kept by the coalescer rather than a timer per caller (`src/coalesce.rs`,
//! "Deadlines"): a batch call's deadline is the earliest of its callers', and a check still
//! queued at its deadline is answered [`Error::Timeout`] unsent. A check that was sent when its
//! call timed out **may still be applied**, exactly like a single `EVALSHA` that timed out after
//! reaching the server.
//!
//! Requests with several checks (all or nothing) and cross-slot batches on a cluster do not go
//! through the batcher: they keep their own script call.

use std::sync::Arc;
use std::time::Duration;

use futures::Future;
use futures::channel::oneshot;
use redis::{ErrorKind, ServerErrorKind};
use statehouse_core::{Decision, Error, Mode, Result};
use tokio::time::Instant;

use crate::coalesce::{self, Batch, Classes, SplitOnMove};
use crate::limiter_script::{
    IndependentCheck, ScriptCheck, independent_command, invocation_of, parse_independent_reply,
};
use crate::link::Link;

/// The most checks in one script call.
pub(crate) const MAX_BATCH: usize = 128;
/// The most bytes of storage keys in one script call (a bound on the call's size with long
/// prefixes or hashed keys).
pub(crate) const MAX_BATCH_BYTES: usize = 32 * 1024;

/// One caller's single check, waiting in the queue.
struct Request {
    check: ScriptCheck,
    mode: Mode,
    now: Option<u64>,
    /// The check's cluster slot (0 on standalone).
    slot: u16,
    deadline: Instant,
    reply: oneshot::Sender<Result<Decision>>,
}

/// The queues of a store's single checks and their background tasks, one per caller timeout
/// in use ([`coalesce::Classes`]); see the module docs.
pub(crate) struct Batcher {
    classes: Classes<Checks>,
}

impl Batcher {
    pub(crate) fn new() -> Self {
        Batcher {
            classes: Classes::new(),
        }
    }

    /// Decides one check, coalesced with whatever other checks of the same timeout are queued;
    /// answered within `timeout` (when shorter than the call timeout) or the call timeout, by
    /// the coalescer (no timer per check).
    pub(crate) async fn check(
        &self,
        link: &Arc<Link>,
        check: ScriptCheck,
        mode: Mode,
        now: Option<u64>,
        slot: u16,
        timeout: Option<Duration>,
    ) -> Result<Decision> {
        let timeout = timeout.map_or(link.call_timeout, |t| t.min(link.call_timeout));
        let started = Instant::now();
        let (reply, answer) = oneshot::channel();
        let queued = self.classes.submit(
            timeout,
            link.call_timeout,
            |timeout| Checks {
                link: Arc::clone(link),
                timeout,
            },
            |class| Request {
                check,
                mode,
                now,
                slot,
                deadline: started + class,
                reply,
            },
        );
        // The check may still be applied if it was sent: see the module docs.
        coalesce::answer_within(
            answer,
            "the Redis batching task stopped before answering",
            queued,
            started + timeout,
            timeout,
        )
        .await
    }
}

/// The background task's context: single checks of one caller timeout, sent as `independent`
/// script calls.
struct Checks {
    link: Arc<Link>,
    timeout: Duration,
}

impl Batch for Checks {
    type Request = Request;

    const MAX_BATCH: usize = MAX_BATCH;
    const EAGER_ON_WIRE: usize = 2;
    const MAX_BATCH_BYTES: usize = MAX_BATCH_BYTES;

    fn link(&self) -> &Link {
        &self.link
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn slot(request: &Request) -> u16 {
        request.slot
    }

    fn weight(request: &Request) -> usize {
        request.check.storage_key.len()
    }

    fn deadline(request: &Request) -> Instant {
        request.deadline
    }

    fn is_canceled(request: &Request) -> bool {
        request.reply.is_canceled()
    }

    fn fail(request: Request, err: Error) {
        let _ = request.reply.send(Err(err));
    }

    fn send(&self, group: Vec<Request>) -> impl Future<Output = ()> + Send {
        send(&self.link, self.timeout, group)
    }
}

/// Sends one group (one slot) as one `independent` script call and answers its callers, by
/// their deadline ([`coalesce::bounded_call`]).
async fn send(link: &Arc<Link>, timeout: Duration, group: Vec<Request>) {
    let checks: Vec<IndependentCheck<'_>> = group
        .iter()
        .map(|r| IndependentCheck {
            check: &r.check,
            mode: r.mode,
            now: r.now,
        })
        .collect();
    let cmd = independent_command(link.skew_allowance_ms, &checks);
    drop(checks);
    // The checks are independent: a call refused while its keys are apart is split by key.
    let on_move = SplitOnMove::new(link, &group, |r| r.check.storage_key.as_str());
    let sender = on_move.clone();
    let call = |deadline| {
        let link = Arc::clone(link);
        async move {
            let call = async {
                match sender.send(&link, &cmd).await {
                    // Not loaded yet (or flushed): the invocation loads it and calls again.
                    // Nothing ran.
                    Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                        link.conn.invoke(&invocation_of(&cmd)).await
                    }
                    other => other,
                }
            };
            link.bounded(deadline, call).await
        }
    };
    let Some((group, value)) =
        coalesce::bounded_call::<Checks, _, _>(link, timeout, group, call).await
    else {
        return;
    };
    if value.is_err() && on_move.refused() {
        split(link, timeout, group).await;
        return;
    }
    let result = value
        .and_then(|value| parse_independent_reply(value, group.iter().map(|r| r.check.capacity)));
    match result {
        Ok(results) => {
            for (request, result) in group.into_iter().zip(results) {
                // A caller that stopped waiting has dropped its receiver: nothing to do.
                let _ = request.reply.send(result);
            }
        }
        Err(err) => {
            for request in group {
                let _ = request.reply.send(Err(coalesce::copy_error(&err)));
            }
        }
    }
}

/// Sends the checks of a group refused with `TRYAGAIN` (nothing ran) again as one call per key,
/// concurrently, each key's checks in their order: a call on one key is never refused so, and
/// follows `ASK` to wherever its key is now. The checks are independent, so the answers are
/// those the whole call would have given, in one of the orders the callers could have raced
/// in.
async fn split(link: &Arc<Link>, timeout: Duration, group: Vec<Request>) {
    let by_key = coalesce::by_key(group, |r| r.check.storage_key.as_str());
    tracing::debug!(
        keys = by_key.len(),
        "statehouse-redis: a slot is moving; sending a coalesced call key by key"
    );
    futures::future::join_all(
        by_key
            .into_iter()
            .map(|part| Box::pin(send(link, timeout, part))),
    )
    .await;
}
