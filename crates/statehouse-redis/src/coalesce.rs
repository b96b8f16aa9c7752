//! The machinery shared by the store's coalescers ([`crate::batch`] for single rate-limit
//! checks, [`crate::session_batch`] for session loads, [`crate::cache_get`] for plain reads): a
//! queue and one background task per store, which sends whatever queued while earlier calls
//! were on the wire as one call per cluster slot.
//!
//! A [`Batch`] says what a request is and how one group of requests is sent and answered; a
//! [`Coalescer`] owns the queue, starts the task on first use on the caller's runtime (and
//! again if that runtime went away), and runs the loop:
//!
//! 1. wait until a request is queued and fewer than [`Batch::EAGER_ON_WIRE`] batches are on
//!    the wire, or at least [`MIN_SPLIT`] requests are queued and fewer than [`IN_FLIGHT`]
//!    batches are (plain reads, client-bound, send at once up to [`IN_FLIGHT`]; scripts,
//!    server-bound, keep two on the wire and add more only for a full share: larger calls cost
//!    the server less per check);
//! 2. **yield once** to the runtime, so that the callers just answered by a returning batch
//!    (woken, but not yet run) queue their next requests before the batch is formed. Not a
//!    timer: a lone request under low load waits one scheduler pass, not a clock;
//! 3. take the next batch from the front of the queue: an even share of what is queued over
//!    the [`IN_FLIGHT`] slots, at least [`MIN_SPLIT`] requests (when that many are queued) and
//!    at most [`Batch::MAX_BATCH`] requests or [`Batch::MAX_BATCH_BYTES`] of
//!    [`Batch::weight`];
//! 4. drop the requests whose caller has gone ([`Batch::is_canceled`]) and answer those past
//!    their deadline with a timeout: neither is sent;
//! 5. on Redis Cluster, group the batch by slot, keeping queue order within each group
//!    (standalone is one group), and [`Batch::send`] each group; the groups of one batch go
//!    out together and count as one batch on the wire.
//!
//! # Deadlines
//!
//! Callers set no timer of their own (a timer per call was about 8 % of a read's client
//! instructions). Each request carries its deadline (the call timeout from the moment its
//! caller called), and the task keeps them all: a call is bounded by the **earliest** deadline
//! among its requests ([`call_deadline`]), so that no caller waits past its own, and a request
//! still queued at its deadline is answered [`Error::Timeout`] by [`take_batch`]. No timer is
//! needed for the queue: deadlines follow queue order, and a batch is taken from the front, so
//! every call on the wire carries earlier deadlines than any queued request; it ends (answered
//! or timed out) first, which wakes the task and frees a slot before a queued deadline passes.
//! This needs one timeout per coalescer ([`Batch::timeout`]): plain reads and single
//! rate-limit checks, whose callers may ask for less than the call timeout (a facade's
//! deadline), keep one coalescer per timeout in use ([`Classes`]), and a call of a shorter
//! timeout answers its callers at their deadline with one timer per call ([`bounded_call`]).
//!
//! Why several smaller batches on the wire rather than one or two large ones: with a fixed
//! number of callers (64 tasks, say), one batch of everything makes the client and the server
//! take turns: the server idles while the client answers 64 callers and forms the next batch,
//! and the client idles while the server runs it. Split in three or four, the server runs one
//! batch while the client answers the previous one and sends the next, so both work at once;
//! measured on the 2-core benchmark machine, this nearly doubled the reads per second of 64
//! tasks (BENCHMARKS.md, "Coalescing: several batches on the wire"). With many more callers,
//! the even share grows up to [`Batch::MAX_BATCH`], so that per-call costs stay spread thin.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::task::{Poll, Waker};
use std::time::Duration;

use futures::channel::oneshot;
use futures::stream::FuturesUnordered;
use futures::{Future, StreamExt};
use redis::{
    Cmd, ErrorKind, RedisError, RedisFuture, RedisResult, ScriptInvocation, ServerErrorKind, Value,
};
use statehouse_core::{Error, Result};
use tokio::time::Instant;

use crate::link::Link;

/// One kind of coalesced call: its requests, its caps and how a group is sent. The value is the
/// background task's context (shared by the batches on the wire).
pub(crate) trait Batch: Send + Sync + 'static {
    /// One caller's request, waiting in the queue; it carries the caller's reply channel.
    type Request: Send + 'static;

    /// The most requests in one call.
    const MAX_BATCH: usize;
    /// Calls kept on the wire whatever their size: while fewer are, a request goes out at once;
    /// beyond, up to [`IN_FLIGHT`], only a batch of at least [`MIN_SPLIT`] requests.
    const EAGER_ON_WIRE: usize;
    /// The most [`weight`](Batch::weight) in one call (`usize::MAX`: no such cap).
    const MAX_BATCH_BYTES: usize;
    /// The connection the calls go through (for its topology).
    fn link(&self) -> &Link;

    /// How long a request may wait for its answer: its deadline is this long after its caller
    /// called. The same for every request of one coalescer (the store's call timeout unless
    /// the kind of call keeps coalescers per timeout, as plain reads do).
    fn timeout(&self) -> Duration {
        self.link().call_timeout
    }

    /// The request's cluster slot (0 on standalone).
    fn slot(request: &Self::Request) -> u16;

    /// The request's share of [`MAX_BATCH_BYTES`](Batch::MAX_BATCH_BYTES).
    fn weight(request: &Self::Request) -> usize;

    /// The request's deadline: [`timeout`](Batch::timeout) from the moment its caller called.
    /// Within one coalescer, deadlines follow queue order (every request has the same timeout).
    fn deadline(request: &Self::Request) -> Instant;

    /// Whether the request's caller has gone (its future dropped).
    fn is_canceled(request: &Self::Request) -> bool;

    /// Answers the request with `err` (a request that timed out in the queue).
    fn fail(request: Self::Request, err: Error);

    /// Sends one group (one slot, in queue order) as one script call and answers its callers,
    /// each with its own result or, if the whole call failed, with that call's error.
    fn send(&self, group: Vec<Self::Request>) -> impl Future<Output = ()> + Send;
}

/// The queue of a store's requests of one kind and its background task; see the module docs.
pub(crate) struct Coalescer<B: Batch> {
    shared: Arc<Shared<B::Request>>,
}

/// The queue, shared by the callers (who push) and the background task (which takes). A
/// std `Mutex` around a `VecDeque` rather than a channel: a channel allocates a node per
/// request, the deque reuses its buffer; the lock is held only to push, take or swap.
struct Shared<R> {
    state: Mutex<Queue<R>>,
}

struct Queue<R> {
    requests: VecDeque<R>,
    /// The task's waker while it waits for a request.
    waker: Option<Waker>,
    /// Whether a task is running (it clears this when it ends or its runtime drops it).
    running: bool,
    /// Set when the store (every clone) is dropped: the task ends once its calls are answered.
    closed: bool,
}

impl<R> Shared<R> {
    fn lock(&self) -> MutexGuard<'_, Queue<R>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<B: Batch> Coalescer<B> {
    pub(crate) fn new() -> Self {
        Coalescer {
            shared: Arc::new(Shared {
                state: Mutex::new(Queue {
                    requests: VecDeque::new(),
                    waker: None,
                    running: false,
                    closed: false,
                }),
            }),
        }
    }

    /// Queues `request`, starting the task (with the context `start` makes) if there is none
    /// or its runtime has gone.
    pub(crate) fn submit(&self, start: impl FnOnce() -> B, request: B::Request) {
        let mut queue = self.shared.lock();
        queue.requests.push_back(request);
        if !queue.running {
            queue.running = true;
            drop(queue);
            // The guard goes into the future, so that a task dropped before it first runs (its
            // runtime shutting down) still clears `running`.
            let running = Running {
                shared: Arc::clone(&self.shared),
            };
            tokio::spawn(run(Arc::new(start()), running));
            return;
        }
        let waker = queue.waker.take();
        drop(queue);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl<B: Batch> Drop for Coalescer<B> {
    fn drop(&mut self) {
        let mut queue = self.shared.lock();
        queue.closed = true;
        let waker = queue.waker.take();
        drop(queue);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// Marks the task stopped when it ends or is dropped with its runtime, dropping the requests
/// still queued (their callers see the task stopped); the next request starts another task.
struct Running<R> {
    shared: Arc<Shared<R>>,
}

impl<R> Drop for Running<R> {
    fn drop(&mut self) {
        let mut queue = self.shared.lock();
        queue.running = false;
        queue.waker = None;
        let requests = std::mem::take(&mut queue.requests);
        drop(queue);
        drop(requests);
    }
}

/// Waits for a queued request's answer. There is no timer per caller: the coalescer keeps
/// every request's deadline (see the module docs, "Deadlines"), answering
/// [`Error::Timeout`] for a request still queued at its deadline and bounding each call by the
/// earliest deadline among its requests. If a request was already sent when its call timed
/// out, it may still be applied, exactly like a single `EVALSHA` that timed out after reaching
/// the server. `stopped` is the message of the [`Error::Unavailable`] returned if the task
/// dropped the request unanswered (its runtime shut down).
pub(crate) async fn answer<T>(
    answer: oneshot::Receiver<Result<T>>,
    stopped: &'static str,
) -> Result<T> {
    match answer.await {
        Ok(result) => result,
        Err(oneshot::Canceled) => Err(Error::Unavailable {
            message: stopped.into(),
            source: None,
        }),
    }
}

/// [`answer`], bounded by a timer of the caller's own when its request could not go to the
/// coalescer of its timeout (`queued_by_timeout` false: see [`Classes::submit`]).
pub(crate) async fn answer_within<T>(
    answer_rx: oneshot::Receiver<Result<T>>,
    stopped: &'static str,
    queued_by_timeout: bool,
    deadline: Instant,
    timeout: Duration,
) -> Result<T> {
    let answered = answer(answer_rx, stopped);
    if queued_by_timeout {
        return answered.await;
    }
    tokio::time::timeout_at(deadline, answered)
        .await
        .unwrap_or(Err(Error::Timeout { deadline: timeout }))
}

/// The most caller timeouts with a coalescer of their own, per store and kind of call; callers
/// with yet another timeout use the call timeout's coalescer and a timer of their own.
const MAX_CLASSES: usize = 8;

/// One coalescer per caller timeout in use, for a kind of call whose callers may ask for less
/// than the store's call timeout (a facade's deadline). Within one coalescer every request has
/// the same timeout, so deadlines follow queue order (module docs, "Deadlines") and no request
/// needs a timer of its own; [`bounded_call`] answers a call's callers at their deadline.
/// Normally there are one or two (the call timeout, one facade's deadline).
pub(crate) struct Classes<B: Batch> {
    classes: RwLock<Vec<(Duration, Coalescer<B>)>>,
}

impl<B: Batch> Classes<B> {
    pub(crate) fn new() -> Self {
        Classes {
            classes: RwLock::new(Vec::new()),
        }
    }

    /// Queues the request `make(t)` on the coalescer of timeout `t = timeout` (made if need
    /// be; `start(t)` makes its task's context) and returns `true`. Beyond [`MAX_CLASSES`]
    /// timeouts it uses `t = call_timeout` instead and returns `false`: the caller then bounds
    /// its own wait.
    pub(crate) fn submit(
        &self,
        timeout: Duration,
        call_timeout: Duration,
        start: impl Fn(Duration) -> B,
        make: impl FnOnce(Duration) -> B::Request,
    ) -> bool {
        {
            let classes = self.classes.read().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, queue)) = classes.iter().find(|(t, _)| *t == timeout) {
                queue.submit(|| start(timeout), make(timeout));
                return true;
            }
        }
        let mut classes = self.classes.write().unwrap_or_else(PoisonError::into_inner);
        if !classes.iter().any(|(t, _)| *t == timeout) && classes.len() < MAX_CLASSES {
            classes.push((timeout, Coalescer::new()));
        }
        if let Some((_, queue)) = classes.iter().find(|(t, _)| *t == timeout) {
            queue.submit(|| start(timeout), make(timeout));
            return true;
        }
        if !classes.iter().any(|(t, _)| *t == call_timeout) {
            // At the cap without the call timeout's own: it replaces the last one made (whose
            // task ends once its queue is answered).
            classes.pop();
            classes.push((call_timeout, Coalescer::new()));
        }
        if let Some((_, queue)) = classes.iter().find(|(t, _)| *t == call_timeout) {
            queue.submit(|| start(call_timeout), make(call_timeout));
        }
        false
    }
}

/// Runs the call of `group`, whose callers wait `timeout`: `call(d)` makes the call bounded by
/// the link deadline `d`. Returns the group with the call's result, or `None` when the callers'
/// deadline came first: they have then been answered [`Error::Timeout`].
///
/// The callers' deadline is the group's ([`call_deadline`]). When their timeout is the link's
/// call timeout, that is the call's own deadline, as for every other call. When it is shorter,
/// the call is still bounded by the call timeout, which the connection's health check counts
/// (it replaces a connection after several calls in a row miss it; a deadline chosen by a
/// caller must not trip it): one timer per call answers the callers at theirs, and the call
/// runs on in a task of its own, so that its slot on the wire is free for the next batch.
pub(crate) async fn bounded_call<B: Batch, T, F>(
    link: &Link,
    timeout: Duration,
    group: Vec<B::Request>,
    call: impl FnOnce(Instant) -> F,
) -> Option<(Vec<B::Request>, Result<T>)>
where
    F: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let deadline = call_deadline::<B>(&group);
    if timeout >= link.call_timeout {
        let result = call(deadline).await;
        return Some((group, result));
    }
    let mut running = Box::pin(call(deadline + (link.call_timeout - timeout)));
    tokio::select! {
        result = &mut running => Some((group, result)),
        () = tokio::time::sleep_until(deadline) => {
            for request in group {
                B::fail(request, Error::Timeout { deadline: timeout });
            }
            tokio::spawn(async move {
                let _ = running.await;
            });
            None
        }
    }
}

/// The deadline of a call carrying `group`: the earliest of its requests', so that no caller
/// waits past its own.
pub(crate) fn call_deadline<B: Batch>(group: &[B::Request]) -> Instant {
    group
        .iter()
        .map(B::deadline)
        .min()
        .unwrap_or_else(Instant::now)
}

/// The most batches on the wire at once, per store and kind of call.
pub(crate) const IN_FLIGHT: usize = 4;

/// The fewest requests a batch takes when at least that many are queued: below it, the
/// per-call costs (a round trip, a script start, a `TIME` read) would weigh on each request
/// more than the overlap of client and server saves.
pub(crate) const MIN_SPLIT: usize = 24;

type InFlight = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The background task: see the module docs. Ends when the store (every clone) is dropped and
/// the batches on the wire are answered.
async fn run<B: Batch>(batcher: Arc<B>, running: Running<B::Request>) {
    let shared = &running.shared;
    let mut in_flight: FuturesUnordered<InFlight> = FuturesUnordered::new();
    // Requests taken off the queue but not yet sent, in queue order (so by deadline).
    let mut pending: VecDeque<B::Request> = VecDeque::new();
    let timeout = batcher.timeout();
    let mut open = true;
    loop {
        // Finish batches and queue what arrived; go on when there is a request to send now.
        let go = futures::future::poll_fn(|cx| {
            while let Poll::Ready(Some(())) = in_flight.poll_next_unpin(cx) {}
            let room = in_flight.len() < IN_FLIGHT;
            // One request at a time: the rest are taken after the yield below (taking them all
            // here made batches smaller: measured, 18 → 14 reads per `MGET`).
            if open && room && pending.len() < MIN_SPLIT {
                let mut queue = shared.lock();
                match queue.requests.pop_front() {
                    Some(request) => pending.push_back(request),
                    None if queue.closed => open = false,
                    None => queue.waker = Some(cx.waker().clone()),
                }
            }
            if pending.is_empty() {
                return if open || !in_flight.is_empty() {
                    Poll::Pending
                } else {
                    Poll::Ready(false)
                };
            }
            // `EAGER_ON_WIRE` calls on the wire whatever their size; more only for a full share.
            if room && (in_flight.len() < B::EAGER_ON_WIRE || pending.len() >= MIN_SPLIT) {
                return Poll::Ready(true);
            }
            // Woken by a finished call or (with room) a new request. No timer: every queued
            // request's deadline is after those of the calls on the wire (module docs,
            // "Deadlines").
            Poll::Pending
        })
        .await;
        if !go {
            return;
        }
        // Let the callers just woken by an answer queue their next requests first (module
        // docs, step 2).
        tokio::task::yield_now().await;
        pending.append(&mut shared.lock().requests);
        let batch = take_batch::<B>(&mut pending, timeout);
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

/// How many requests the next batch takes when `queued` are waiting: an even share over the
/// in-flight slots, within [`MIN_SPLIT`] and `max`.
fn batch_size(queued: usize, max: usize) -> usize {
    queued.div_ceil(IN_FLIGHT).clamp(MIN_SPLIT.min(max), max)
}

/// The next batch from the front of `pending` (see [`batch_size`]), without the requests whose
/// caller has gone or whose deadline has passed (answered [`Error::Timeout`]); both still count
/// towards the caps.
fn take_batch<B: Batch>(pending: &mut VecDeque<B::Request>, timeout: Duration) -> Vec<B::Request> {
    let size = batch_size(pending.len(), B::MAX_BATCH);
    let now = Instant::now();
    let mut weight = 0;
    let mut taken = 0;
    let mut batch = Vec::with_capacity(size.min(pending.len()));
    while taken < size && weight < B::MAX_BATCH_BYTES {
        let Some(request) = pending.pop_front() else {
            break;
        };
        taken += 1;
        weight += B::weight(&request);
        if B::is_canceled(&request) {
            continue;
        }
        if B::deadline(&request) <= now {
            B::fail(request, Error::Timeout { deadline: timeout });
            continue;
        }
        batch.push(request);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_share_the_queue_evenly_within_the_bounds() {
        // Few queued: up to MIN_SPLIT at once (a lone request goes alone).
        assert_eq!(batch_size(1, 128), MIN_SPLIT);
        assert_eq!(batch_size(64, 128), MIN_SPLIT);
        // Many queued: an even share over the slots …
        assert_eq!(batch_size(200, 128), 50);
        // … never above the cap, even when the cap is below MIN_SPLIT.
        assert_eq!(batch_size(10_000, 128), 128);
        assert_eq!(batch_size(100, 8), 8);
        assert_eq!(batch_size(0, 256), MIN_SPLIT);
    }
}

/// A coalesced call on a cluster that names several keys, sent so that a slot move does not
/// hold it up: while a slot moves between nodes, a call on several of its keys is refused with
/// `TRYAGAIN` (nothing ran) for as long as its keys are on two nodes. Such a call is sent once
/// ([`Connection::query_batch_once`](crate::connection::Connection::query_batch_once)), and
/// when refused so, its caller sends its requests again key by key ([`by_key`]; session loads
/// user by user): a call on one key follows `ASK` to wherever its key is. Any other call
/// (standalone Redis, one key) is sent as usual and costs nothing more. Clones share the record of a refusal.
#[derive(Clone)]
pub(crate) struct SplitOnMove(Option<Arc<AtomicBool>>);

impl SplitOnMove {
    /// For a call carrying `requests`, whose keys `key` reads.
    pub(crate) fn new<T>(link: &Link, requests: &[T], key: impl Fn(&T) -> &str) -> SplitOnMove {
        let several = link.conn.is_cluster()
            && requests
                .split_first()
                .is_some_and(|(first, rest)| rest.iter().any(|r| key(r) != key(first)));
        SplitOnMove(several.then(|| Arc::new(AtomicBool::new(false))))
    }

    /// Sends `cmd` as a batch call, noting a `TRYAGAIN` refusal.
    pub(crate) async fn send(&self, link: &Link, cmd: &Cmd) -> RedisResult<Value> {
        let Some(refused) = &self.0 else {
            return link.conn.query_batch(cmd).await;
        };
        let sent = link.conn.query_batch_once(cmd).await;
        if let Err(err) = &sent
            && err.kind() == ErrorKind::Server(ServerErrorKind::TryAgain)
        {
            refused.store(true, Ordering::Relaxed);
        }
        sent
    }

    /// Runs a script invocation as a batch call: as [`send`](Self::send) when the call can be
    /// refused so (its `EVALSHA`, and on `NOSCRIPT` the `SCRIPT LOAD` and the `EVALSHA` again,
    /// each sent once), otherwise as any script call
    /// ([`Connection::invoke`](crate::connection::Connection::invoke): on standalone Redis over
    /// redis-rs, not the batch connection, which does not carry scripts of this kind).
    pub(crate) async fn invoke(
        &self,
        link: &Link,
        inv: &ScriptInvocation<'_>,
    ) -> RedisResult<Value> {
        if self.0.is_none() {
            return link.conn.invoke(inv).await;
        }
        inv.invoke_async(&mut SentOnce {
            link,
            on_move: self,
        })
        .await
    }

    /// Whether the call was refused because its keys were apart: send them key by key.
    pub(crate) fn refused(&self) -> bool {
        self.0.as_ref().is_some_and(|r| r.load(Ordering::Relaxed))
    }
}

/// The connection [`SplitOnMove::invoke`] hands to redis-rs's `ScriptInvocation`, so that its
/// `EVALSHA`-then-load-on-`NOSCRIPT` goes through [`SplitOnMove::send`] (the invocation's own
/// command is not public).
struct SentOnce<'s> {
    link: &'s Link,
    on_move: &'s SplitOnMove,
}

impl redis::aio::ConnectionLike for SentOnce<'_> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(self.on_move.send(self.link, cmd))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        _: &'a redis::Pipeline,
        _: usize,
        _: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        // A script invocation sends single commands only.
        Box::pin(async {
            Err(RedisError::from((
                ErrorKind::Client,
                "a batch call carries no pipeline",
            )))
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// `requests` split by their key (`key`), each part in its original order.
pub(crate) fn by_key<T>(requests: Vec<T>, key: impl Fn(&T) -> &str) -> Vec<Vec<T>> {
    let mut parts: Vec<Vec<T>> = Vec::new();
    for request in requests {
        match parts.iter_mut().find(|part| key(&part[0]) == key(&request)) {
            Some(part) => part.push(request),
            None => parts.push(vec![request]),
        }
    }
    parts
}
