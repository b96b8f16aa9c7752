//! Coalescing of concurrent single checks into one script call.
//!
//! # Design
//!
//! A [`RedisStore`](crate::RedisStore) sends every request with **one check** (the common case:
//! one key, one policy, either mode) through its [`Batcher`] instead of calling the script
//! itself. The batcher is a queue (an unbounded channel) and one background task per store
//! (shared by its clones), started on first use on the caller's runtime and started again if
//! that runtime went away. The task loops:
//!
//! 1. It waits for a request, then takes **whatever else is queued right now**, up to
//!    [`MAX_BATCH`] checks or [`MAX_BATCH_BYTES`] of keys. There is no timer: under low load a
//!    batch is a single check, sent at once, so batching adds no latency; under load the
//!    requests that queued while earlier calls were on the wire go out together.
//! 2. It drops requests whose caller has gone (deadline passed or future dropped): those are
//!    never sent, so they cannot be applied.
//! 3. It groups the batch by hash slot (on Redis Cluster; standalone is one group), keeping
//!    queue order within each group, and sends each group as **one** `EVALSHA` of
//!    `limiter.lua` in its `independent` mode. There, each check is decided and committed on
//!    its own, in order, exactly as if it had been a call of its own: a denial does not affect
//!    the others, and two checks of one key see each other's writes. Every check carries its
//!    own mode (consume or peek) and its own time (the caller's clock, or the script's single
//!    `TIME` read, shared by the group).
//! 4. It answers each caller through its oneshot. A check the script refused (corrupt state, a
//!    key of the wrong type) gets its own [`Error::Backend`]; the others are unaffected. An
//!    error of the whole call (timeout, connection lost, `OOM`, …) goes to every caller in the
//!    group, mapped exactly as a single call's error would be, and counts once towards the
//!    connection's consecutive-timeout replacement.
//!
//! At most [`MAX_IN_FLIGHT`] batches are on the wire at once: while one runs on the server,
//! the next forms in the queue. This in-flight cap is what makes batches form under load; it
//! also keeps the per-check cost of the script (reading `TIME`, the call itself, the client's
//! command encoding and reply routing) shared across the checks of a batch.
//!
//! Each caller waits for its answer until its own deadline (the store's call timeout from the
//! moment it called). A caller that times out just drops its oneshot and gets
//! [`Error::Timeout`]; if its check was already sent, **it may still be applied**, exactly like
//! a single `EVALSHA` that timed out after reaching the server. A batch call's own deadline is
//! the latest of its callers'.
//!
//! Requests with several checks (all or nothing) and cross-slot batches on a cluster do not go
//! through the batcher: they keep their own script call.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

use futures::channel::{mpsc, oneshot};
use futures::stream::FuturesUnordered;
use futures::{Future, StreamExt};
use statehouse_core::{Decision, Error, Mode, Result};
use tokio::time::Instant;

use crate::limiter_script::{
    IndependentCheck, ScriptCheck, independent_invocation, parse_independent_reply,
};
use crate::link::Link;

/// The most checks in one script call.
pub(crate) const MAX_BATCH: usize = 128;
/// The most bytes of storage keys in one script call (a bound on the call's size with long
/// prefixes or hashed keys).
pub(crate) const MAX_BATCH_BYTES: usize = 32 * 1024;
/// The most batches on the wire at once.
pub(crate) const MAX_IN_FLIGHT: usize = 2;

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

/// The queue of a store's single checks and its background task; see the module docs.
pub(crate) struct Batcher {
    /// The queue's sending end, or `None` before the task is started. A std `Mutex`: held only
    /// to send (which never blocks) or to start the task.
    queue: Mutex<Option<mpsc::UnboundedSender<Request>>>,
}

impl Batcher {
    pub(crate) fn new() -> Self {
        Batcher {
            queue: Mutex::new(None),
        }
    }

    /// Decides one check, coalesced with whatever other checks are queued.
    pub(crate) async fn check(
        &self,
        link: &Arc<Link>,
        check: ScriptCheck,
        mode: Mode,
        now: Option<u64>,
        slot: u16,
    ) -> Result<Decision> {
        let deadline = Instant::now() + link.call_timeout;
        let (reply, answer) = oneshot::channel();
        self.submit(
            link,
            Request {
                check,
                mode,
                now,
                slot,
                deadline,
                reply,
            },
        );
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(oneshot::Canceled)) => Err(Error::Unavailable {
                message: "the Redis batching task stopped before answering".into(),
                source: None,
            }),
            // The check may still be applied if it was sent: see the module docs.
            Err(_) => Err(Error::Timeout {
                deadline: link.call_timeout,
            }),
        }
    }

    fn submit(&self, link: &Arc<Link>, request: Request) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let request = match queue.as_ref() {
            Some(sender) => match sender.unbounded_send(request) {
                Ok(()) => return,
                // The task is gone (its runtime shut down): start another below.
                Err(err) => err.into_inner(),
            },
            None => request,
        };
        let (sender, receiver) = mpsc::unbounded();
        tokio::spawn(run(Arc::clone(link), receiver));
        // The receiver is alive: it was just made.
        let _ = sender.unbounded_send(request);
        *queue = Some(sender);
    }
}

type InFlight = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The background task: see the module docs. Ends when the store (every clone) is dropped and
/// the batches on the wire are answered.
async fn run(link: Arc<Link>, mut receiver: mpsc::UnboundedReceiver<Request>) {
    let mut in_flight: FuturesUnordered<InFlight> = FuturesUnordered::new();
    let mut open = true;
    loop {
        // Finish batches, and take a request when there is room on the wire.
        let first = futures::future::poll_fn(|cx| {
            while let Poll::Ready(Some(())) = in_flight.poll_next_unpin(cx) {}
            if open && in_flight.len() < MAX_IN_FLIGHT {
                match receiver.poll_next_unpin(cx) {
                    Poll::Ready(Some(request)) => return Poll::Ready(Some(request)),
                    Poll::Ready(None) => open = false,
                    Poll::Pending => {}
                }
            }
            if !open && in_flight.is_empty() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        let Some(first) = first else {
            return;
        };
        let batch = take_batch(first, &mut receiver);
        if batch.is_empty() {
            continue;
        }
        let groups = if link.conn.is_cluster() {
            group_by_slot(batch)
        } else {
            vec![batch]
        };
        let link = Arc::clone(&link);
        in_flight.push(Box::pin(async move {
            futures::future::join_all(groups.into_iter().map(|group| send(&link, group))).await;
        }));
    }
}

/// `first` and whatever else is queued now, within the caps, without the requests whose caller
/// has gone.
fn take_batch(first: Request, receiver: &mut mpsc::UnboundedReceiver<Request>) -> Vec<Request> {
    let now = Instant::now();
    let mut bytes = first.check.storage_key.len();
    let mut batch = Vec::with_capacity(16);
    let keep = |request: Request, batch: &mut Vec<Request>| {
        if !request.reply.is_canceled() && request.deadline > now {
            batch.push(request);
        }
    };
    keep(first, &mut batch);
    while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
        match receiver.try_recv() {
            Ok(request) => {
                bytes += request.check.storage_key.len();
                keep(request, &mut batch);
            }
            // Empty or closed.
            Err(_) => break,
        }
    }
    batch
}

/// Splits a batch by cluster slot, keeping queue order within each slot.
fn group_by_slot(batch: Vec<Request>) -> Vec<Vec<Request>> {
    let mut groups: Vec<Vec<Request>> = Vec::new();
    for request in batch {
        match groups.iter_mut().find(|g| g[0].slot == request.slot) {
            Some(group) => group.push(request),
            None => groups.push(vec![request]),
        }
    }
    groups
}

/// Sends one group (one slot) as one `independent` script call and answers its callers.
async fn send(link: &Link, group: Vec<Request>) {
    let deadline = group
        .iter()
        .map(|r| r.deadline)
        .max()
        .unwrap_or_else(Instant::now);
    let checks: Vec<IndependentCheck<'_>> = group
        .iter()
        .map(|r| IndependentCheck {
            check: &r.check,
            mode: r.mode,
            now: r.now,
        })
        .collect();
    let inv = independent_invocation(link.skew_allowance_ms, &checks);
    drop(checks);
    let result = link
        .bounded(deadline, link.conn.invoke(&inv))
        .await
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
                let _ = request.reply.send(Err(copy_error(&err)));
            }
        }
    }
}

/// The same error for another caller of a failed batch (errors do not clone: the client's
/// source error is kept in the message only).
fn copy_error(err: &Error) -> Error {
    match err {
        Error::Timeout { deadline } => Error::Timeout {
            deadline: *deadline,
        },
        Error::Unavailable { message, .. } => Error::Unavailable {
            message: message.clone(),
            source: None,
        },
        other => Error::Backend {
            message: match other {
                Error::Backend { message, .. } => message.clone(),
                _ => other.to_string(),
            },
            source: None,
        },
    }
}
