//! The machinery shared by the store's coalescers ([`crate::batch`] for single rate-limit
//! checks, [`crate::session_batch`] for session loads): a queue and one background task per
//! store, which sends whatever queued while earlier calls were on the wire as one script call
//! per cluster slot.
//!
//! A [`Batch`] says what a request is and how one group of requests is sent and answered; a
//! [`Coalescer`] owns the queue, starts the task on first use on the caller's runtime (and
//! again if that runtime went away), and runs the loop:
//!
//! 1. wait for a request while fewer than [`Batch::MAX_IN_FLIGHT`] batches are on the wire,
//!    then take **whatever else is queued right now**, up to [`Batch::MAX_BATCH`] requests or
//!    [`Batch::MAX_BATCH_BYTES`] of [`Batch::weight`]. There is no timer;
//! 2. drop the requests whose caller has gone ([`Batch::is_abandoned`]): they are not sent;
//! 3. on Redis Cluster, group the batch by slot, keeping queue order within each group
//!    (standalone is one group), and [`Batch::send`] each group; the groups of one batch go
//!    out together and count as one batch on the wire.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use futures::channel::{mpsc, oneshot};
use futures::stream::FuturesUnordered;
use futures::{Future, StreamExt};
use statehouse_core::{Error, Result};
use tokio::time::Instant;

use crate::link::Link;

/// One kind of coalesced call: its requests, its caps and how a group is sent. The value is the
/// background task's context (shared by the batches on the wire).
pub(crate) trait Batch: Send + Sync + 'static {
    /// One caller's request, waiting in the queue; it carries the caller's reply channel.
    type Request: Send + 'static;

    /// The most requests in one script call.
    const MAX_BATCH: usize;
    /// The most [`weight`](Batch::weight) in one script call (`usize::MAX`: no such cap).
    const MAX_BATCH_BYTES: usize;
    /// The most batches on the wire at once.
    const MAX_IN_FLIGHT: usize;

    /// The connection the calls go through (for its topology).
    fn link(&self) -> &Link;

    /// The request's cluster slot (0 on standalone).
    fn slot(request: &Self::Request) -> u16;

    /// The request's share of [`MAX_BATCH_BYTES`](Batch::MAX_BATCH_BYTES).
    fn weight(request: &Self::Request) -> usize;

    /// Whether the request's caller has gone (future dropped, or deadline not after `now`).
    fn is_abandoned(request: &Self::Request, now: Instant) -> bool;

    /// Sends one group (one slot, in queue order) as one script call and answers its callers,
    /// each with its own result or, if the whole call failed, with that call's error.
    fn send(&self, group: Vec<Self::Request>) -> impl Future<Output = ()> + Send;
}

/// The queue of a store's requests of one kind and its background task; see the module docs.
pub(crate) struct Coalescer<B: Batch> {
    /// The queue's sending end, or `None` before the task is started. A std `Mutex`: held only
    /// to send (which never blocks) or to start the task.
    queue: Mutex<Option<mpsc::UnboundedSender<B::Request>>>,
}

impl<B: Batch> Coalescer<B> {
    pub(crate) fn new() -> Self {
        Coalescer {
            queue: Mutex::new(None),
        }
    }

    /// Queues `request`, starting the task (with the context `start` makes) if there is none
    /// or its runtime has gone.
    pub(crate) fn submit(&self, start: impl FnOnce() -> B, request: B::Request) {
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
        tokio::spawn(run(Arc::new(start()), receiver));
        // The receiver is alive: it was just made.
        let _ = sender.unbounded_send(request);
        *queue = Some(sender);
    }
}

/// Waits for a queued request's answer until the caller's `deadline`. A caller that times out
/// just drops its receiver and gets [`Error::Timeout`] (of `call_timeout`); if its request was
/// already sent, it may still be applied, exactly like a single `EVALSHA` that timed out after
/// reaching the server. `stopped` is the message of the [`Error::Unavailable`] returned if the
/// task dropped the request unanswered.
pub(crate) async fn answer<T>(
    deadline: Instant,
    answer: oneshot::Receiver<Result<T>>,
    call_timeout: Duration,
    stopped: &'static str,
) -> Result<T> {
    match tokio::time::timeout_at(deadline, answer).await {
        Ok(Ok(result)) => result,
        Ok(Err(oneshot::Canceled)) => Err(Error::Unavailable {
            message: stopped.into(),
            source: None,
        }),
        // The request may still be applied if it was sent: see above.
        Err(_) => Err(Error::Timeout {
            deadline: call_timeout,
        }),
    }
}

type InFlight = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The background task: see the module docs. Ends when the store (every clone) is dropped and
/// the batches on the wire are answered.
async fn run<B: Batch>(batcher: Arc<B>, mut receiver: mpsc::UnboundedReceiver<B::Request>) {
    let mut in_flight: FuturesUnordered<InFlight> = FuturesUnordered::new();
    let mut open = true;
    loop {
        // Finish batches, and take a request when there is room on the wire.
        let first = futures::future::poll_fn(|cx| {
            while let Poll::Ready(Some(())) = in_flight.poll_next_unpin(cx) {}
            if open && in_flight.len() < B::MAX_IN_FLIGHT {
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
        if !in_flight.is_empty() {
            // Another batch is on the wire, so this one would wait behind it on the server
            // anyway: first let the tasks just woken by an answer run and queue their next
            // requests, so that they join this batch instead of forming a small one of their
            // own. Fewer, larger calls cost the server and the client less per request (each
            // call has its own round trip, TIME read and script start). Not a timer: with
            // nothing on the wire (low load), the request goes out at once.
            tokio::task::yield_now().await;
        }
        let batch = take_batch::<B>(first, &mut receiver);
        if batch.is_empty() {
            continue;
        }
        let groups = if batcher.link().conn.is_cluster() {
            group_by_slot::<B>(batch)
        } else {
            vec![batch]
        };
        let batcher = Arc::clone(&batcher);
        in_flight.push(Box::pin(async move {
            futures::future::join_all(groups.into_iter().map(|group| batcher.send(group))).await;
        }));
    }
}

/// `first` and whatever else is queued now, within the caps, without the requests whose caller
/// has gone (which still count towards the weight cap).
fn take_batch<B: Batch>(
    first: B::Request,
    receiver: &mut mpsc::UnboundedReceiver<B::Request>,
) -> Vec<B::Request> {
    let now = Instant::now();
    let mut weight = B::weight(&first);
    let mut batch = Vec::with_capacity(16);
    let keep = |request: B::Request, batch: &mut Vec<B::Request>| {
        if !B::is_abandoned(&request, now) {
            batch.push(request);
        }
    };
    keep(first, &mut batch);
    while batch.len() < B::MAX_BATCH && weight < B::MAX_BATCH_BYTES {
        match receiver.try_recv() {
            Ok(request) => {
                weight += B::weight(&request);
                keep(request, &mut batch);
            }
            // Empty for now, or closed: send what we have.
            Err(_) => break,
        }
    }
    batch
}

/// Splits a batch by cluster slot, keeping queue order within each slot.
fn group_by_slot<B: Batch>(batch: Vec<B::Request>) -> Vec<Vec<B::Request>> {
    let mut groups: Vec<(u16, Vec<B::Request>)> = Vec::new();
    for request in batch {
        let slot = B::slot(&request);
        match groups.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, group)) => group.push(request),
            None => groups.push((slot, vec![request])),
        }
    }
    groups.into_iter().map(|(_, group)| group).collect()
}

/// The same error for every caller of a failed call: errors do not clone, so the client's
/// source error is kept in the message only. The kind (timeout, unavailable, invalid input,
/// backend) is kept, so each caller's degraded-mode policy sees what really happened.
pub(crate) fn copy_error(err: &Error) -> Error {
    match err {
        Error::Timeout { deadline } => Error::Timeout {
            deadline: *deadline,
        },
        Error::Unavailable { message, .. } => Error::Unavailable {
            message: message.clone(),
            source: None,
        },
        Error::InvalidInput(message) => Error::InvalidInput(message.clone()),
        Error::Backend { message, .. } => Error::Backend {
            message: message.clone(),
            source: None,
        },
        other => Error::Backend {
            message: other.to_string(),
            source: None,
        },
    }
}
