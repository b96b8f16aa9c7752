//! Coalescing of concurrent session loads into one script call.
//!
//! `load` is the per-request hot path, and on Redis most of its cost is the script call itself
//! (the call's set-up, reading `TIME`, the client's encoding and reply routing), not the few
//! commands inside. So every [`load`](statehouse_core::session::SessionStore::load) of a
//! [`RedisSessionStore`](crate::RedisSessionStore) goes through a [`LoadBatcher`]: a queue and
//! one background task per store (shared by its clones), started on first use on the caller's
//! runtime and started again if that runtime went away. The task:
//!
//! 1. waits for a load, then takes **whatever else is queued right now**, up to [`MAX_BATCH`]
//!    loads. There is no timer: under low load a batch is a single load, sent at once;
//! 2. drops loads whose caller has gone (deadline passed, future dropped): they are not sent;
//! 3. groups the batch by hash slot on Redis Cluster (standalone is one group) and sends each
//!    group as one `EVALSHA` of `session.lua` in its `load_many` mode, where each load runs
//!    exactly as a `load` call of its own, in queue order, with its own time (the caller's
//!    clock, or the script's one `TIME` read);
//! 4. answers each caller. A load the script refused (corrupt data, a key of the wrong type)
//!    gets its own [`Error::Backend`]; an error of the whole call (timeout, connection lost)
//!    goes to every caller in the group, mapped as a single call's error would be.
//!
//! At most [`MAX_IN_FLIGHT`] batches are on the wire at once: while one runs on the server,
//! the next forms in the queue. A caller waits until its own deadline (the call timeout from
//! the moment it called); a load that was sent may still refresh the session after its caller
//! gave up, exactly like a single `EVALSHA` that timed out after reaching the server.
//!
//! Only loads are coalesced: they are the hot path, and the other operations are rare.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

use futures::channel::{mpsc, oneshot};
use futures::stream::FuturesUnordered;
use futures::{Future, StreamExt};
use redis::Value;
use statehouse_core::session::SessionConfig;
use statehouse_core::{Error, Result};
use tokio::time::Instant;

use crate::link::Link;
use crate::session_script::{array, invocation, uint};

/// The most loads in one script call.
pub(crate) const MAX_BATCH: usize = 128;
/// The most batches on the wire at once.
pub(crate) const MAX_IN_FLIGHT: usize = 2;

/// One caller's load, waiting in the queue.
pub(crate) struct LoadRequest {
    /// The user's key base, `{prefix}{<tag>}:`.
    pub(crate) base: String,
    /// The presented id.
    pub(crate) id: String,
    /// The caller's time in µs, or `None` for the server's.
    pub(crate) now: Option<u64>,
    /// The cluster slot of the user's keys (0 on standalone).
    pub(crate) slot: u16,
    pub(crate) deadline: Instant,
    pub(crate) reply: oneshot::Sender<Result<Value>>,
}

/// The queue of a store's loads and its background task; see the module docs.
pub(crate) struct LoadBatcher {
    /// The queue's sending end, or `None` before the task is started. A std `Mutex`: held only
    /// to send (which never blocks) or to start the task.
    queue: Mutex<Option<mpsc::UnboundedSender<LoadRequest>>>,
}

impl LoadBatcher {
    pub(crate) fn new() -> Self {
        LoadBatcher {
            queue: Mutex::new(None),
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
        let deadline = request.deadline;
        self.submit(link, config, request);
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(oneshot::Canceled)) => Err(Error::Unavailable {
                message: "the Redis session batching task stopped before answering".into(),
                source: None,
            }),
            Err(_) => Err(Error::Timeout {
                deadline: link.call_timeout,
            }),
        }
    }

    fn submit(&self, link: &Arc<Link>, config: &SessionConfig, request: LoadRequest) {
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
        tokio::spawn(run(Arc::clone(link), config.clone(), receiver));
        // The receiver is alive: it was just made.
        let _ = sender.unbounded_send(request);
        *queue = Some(sender);
    }
}

type InFlight = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The background task; ends when every clone of the store is dropped and the batches on the
/// wire are answered.
async fn run(
    link: Arc<Link>,
    config: SessionConfig,
    mut receiver: mpsc::UnboundedReceiver<LoadRequest>,
) {
    let config = Arc::new(config);
    let mut in_flight: FuturesUnordered<InFlight> = FuturesUnordered::new();
    let mut open = true;
    loop {
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
        let (link, config) = (Arc::clone(&link), Arc::clone(&config));
        in_flight.push(Box::pin(async move {
            futures::future::join_all(groups.into_iter().map(|group| send(&link, &config, group)))
                .await;
        }));
    }
}

/// `first` and whatever else is queued now, up to [`MAX_BATCH`], without the loads whose
/// caller has gone.
fn take_batch(
    first: LoadRequest,
    receiver: &mut mpsc::UnboundedReceiver<LoadRequest>,
) -> Vec<LoadRequest> {
    let now = Instant::now();
    let mut batch = Vec::with_capacity(16);
    let alive = |r: &LoadRequest| !r.reply.is_canceled() && r.deadline > now;
    if alive(&first) {
        batch.push(first);
    }
    while batch.len() < MAX_BATCH {
        match receiver.try_recv() {
            Ok(request) => {
                if alive(&request) {
                    batch.push(request);
                }
            }
            // Empty for now, or closed: send what we have.
            Err(_) => break,
        }
    }
    batch
}

/// Groups by slot, keeping queue order within each group.
fn group_by_slot(batch: Vec<LoadRequest>) -> Vec<Vec<LoadRequest>> {
    let mut groups: Vec<(u16, Vec<LoadRequest>)> = Vec::new();
    for request in batch {
        match groups.iter_mut().find(|(slot, _)| *slot == request.slot) {
            Some((_, group)) => group.push(request),
            None => groups.push((request.slot, vec![request])),
        }
    }
    groups.into_iter().map(|(_, group)| group).collect()
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
        &group[0].base,
    );
    inv.arg(group.len());
    for request in &group {
        inv.key(format!("{}{}", request.base, request.id))
            .key(format!("{}idx", request.base))
            .arg(request.base.as_str())
            .arg(request.id.as_str());
        match request.now {
            Some(now) => inv.arg(now),
            None => inv.arg(""),
        };
    }
    let deadline = group
        .iter()
        .map(|r| r.deadline)
        .max()
        .unwrap_or_else(Instant::now);
    let result = link.bounded(deadline, link.conn.invoke(&inv)).await;
    let replies = result.and_then(|value| split_replies(value, group.len()));
    match replies {
        Ok(replies) => {
            for (request, reply) in group.into_iter().zip(replies) {
                let _ = request.reply.send(Ok(reply));
            }
        }
        Err(err) => {
            for request in group {
                let _ = request.reply.send(Err(clone_error(&err)));
            }
        }
    }
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

/// The same error for every caller of a failed call. Sources are not `Clone`; their text is
/// kept in the message.
fn clone_error(err: &Error) -> Error {
    match err {
        Error::Timeout { deadline } => Error::Timeout {
            deadline: *deadline,
        },
        Error::Unavailable { message, .. } => Error::Unavailable {
            message: message.clone(),
            source: None,
        },
        Error::InvalidInput(message) => Error::InvalidInput(message.clone()),
        other => Error::Backend {
            message: other.to_string(),
            source: None,
        },
    }
}
