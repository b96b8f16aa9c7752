//! Coalescing of concurrent plain reads: the cache's hit path, and the session store's
//! read-only loads (a session is one STRING record).
//!
//! Every [`get`](statehouse_core::cache::CacheStore::get) of a
//! [`RedisCacheStore`](crate::RedisCacheStore), and every fast-path load of a
//! [`RedisSessionStore`](crate::RedisSessionStore), goes through a [`GetBatcher`], the generic
//! coalescer of [`crate::coalesce`]: a queue and one background task per store. The reads
//! queued while earlier ones are on the wire go out together, per Cluster slot, as **one
//! `MGET`** (a lone read is a plain `GET`). No script: a read changes nothing, and `GET`/`MGET`
//! are the cheapest commands Redis serves. `MGET` rather than a pipeline of `GET`s because it is
//! one command to parse, dispatch and answer on the server and one reply to route in the
//! client, which is what lets this path keep up with `redis-benchmark GET -P`.
//!
//! One difference between the two: `GET` of a key holding another type (a hash someone wrote
//! at a data key) is a `WRONGTYPE` error, `MGET` answers nil. A coalesced read of such a key is
//! therefore a miss; a lone one is a [`Error::Backend`](statehouse_core::Error::Backend). Both
//! are right for a cache: the key holds nothing this store wrote.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use futures::Future;
use futures::channel::oneshot;
use redis::Value;
use statehouse_core::{Error, Result};
use tokio::time::Instant;

use crate::coalesce::{self, Batch, Coalescer, IN_FLIGHT};
use crate::error::unexpected_reply;
use crate::link::Link;

/// The most reads in one `MGET`.
const MAX_BATCH: usize = 256;
/// The most bytes of keys in one `MGET` (keys may be up to 64 KiB long).
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// One caller's read, waiting in the queue.
pub(crate) struct GetRequest {
    /// The data key.
    pub(crate) key: String,
    /// Its Cluster slot (0 on standalone).
    pub(crate) slot: u16,
    pub(crate) deadline: Instant,
    /// The key, handed back with its value, so a caller that needs it afterwards (the session
    /// store) does not have to copy it first.
    pub(crate) reply: oneshot::Sender<Result<(String, Option<Vec<u8>>)>>,
}

/// The most read timeouts with a coalescer of their own per store; reads with yet another
/// timeout use the call timeout's coalescer and a timer of their own.
const MAX_CLASSES: usize = 8;

/// The queues of a store's reads and their background tasks; see the module docs.
///
/// One coalescer per read timeout in use (normally one or two: the store's call timeout, and a
/// cache facade's shorter deadline). Within one, every read has the same timeout, so deadlines
/// follow queue order, which is what lets the coalescer keep them without a timer per read
/// (`crate::coalesce`, "Deadlines"); a call of a shorter timeout answers its callers at their
/// deadline with one timer per call ([`send`]).
pub(crate) struct GetBatcher {
    classes: RwLock<Vec<(Duration, Coalescer<Gets>)>>,
}

impl GetBatcher {
    pub(crate) fn new() -> Self {
        GetBatcher {
            classes: RwLock::new(Vec::new()),
        }
    }

    /// Reads one key, coalesced with whatever other reads of the same timeout are queued.
    ///
    /// The read is answered within `timeout` (when shorter than the link's call timeout) or the
    /// call timeout, by the coalescer (no timer per read). A caller that stops waiting drops
    /// its receiver, which is what lets the batcher skip its read if it is still queued.
    pub(crate) async fn get(
        &self,
        link: &Arc<Link>,
        key: String,
        slot: u16,
        timeout: Option<Duration>,
    ) -> Result<Option<Vec<u8>>> {
        Ok(self.read(link, key, slot, timeout).await?.1)
    }

    /// [`get`](Self::get), handing the key back with the value.
    pub(crate) async fn read(
        &self,
        link: &Arc<Link>,
        key: String,
        slot: u16,
        timeout: Option<Duration>,
    ) -> Result<(String, Option<Vec<u8>>)> {
        let timeout = timeout.map_or(link.call_timeout, |t| t.min(link.call_timeout));
        let now = Instant::now();
        let (reply, answer) = oneshot::channel();
        let request = GetRequest {
            key,
            slot,
            deadline: now + timeout,
            reply,
        };
        let answer = coalesce::answer(answer, STOPPED);
        if self.submit(link, timeout, request) {
            return answer.await;
        }
        // Too many timeouts in use: the read went to the call timeout's coalescer; a timer of
        // its own bounds this caller's wait.
        tokio::time::timeout_at(now + timeout, answer)
            .await
            .unwrap_or(Err(Error::Timeout { deadline: timeout }))
    }

    /// Queues `request` on the coalescer of `timeout` (made if need be), or, beyond
    /// [`MAX_CLASSES`] timeouts, on the call timeout's with its deadline moved to the call
    /// timeout's; `false` in that last case (the caller then needs a timer of its own).
    fn submit(&self, link: &Arc<Link>, timeout: Duration, request: GetRequest) -> bool {
        let start = |timeout| {
            move || Gets {
                link: Arc::clone(link),
                timeout,
            }
        };
        {
            let classes = self.classes.read().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, queue)) = classes.iter().find(|(t, _)| *t == timeout) {
                queue.submit(start(timeout), request);
                return true;
            }
        }
        let mut classes = self.classes.write().unwrap_or_else(PoisonError::into_inner);
        if !classes.iter().any(|(t, _)| *t == timeout) && classes.len() < MAX_CLASSES {
            classes.push((timeout, Coalescer::new()));
        }
        if let Some((_, queue)) = classes.iter().find(|(t, _)| *t == timeout) {
            queue.submit(start(timeout), request);
            return true;
        }
        let call_timeout = link.call_timeout;
        let request = GetRequest {
            deadline: request.deadline - timeout + call_timeout,
            ..request
        };
        if !classes.iter().any(|(t, _)| *t == call_timeout) {
            // At the cap without the call timeout's own: it replaces the last one made (whose
            // task ends once its queue is answered).
            classes.pop();
            classes.push((call_timeout, Coalescer::new()));
        }
        if let Some((_, queue)) = classes.iter().find(|(t, _)| *t == call_timeout) {
            queue.submit(start(call_timeout), request);
        }
        false
    }
}

/// Why a read has no answer when its task stopped without one.
const STOPPED: &str = "the Redis read task stopped before answering";

/// The background task's context: the link, and the timeout of this coalescer's reads.
struct Gets {
    link: Arc<Link>,
    timeout: Duration,
}

impl Batch for Gets {
    type Request = GetRequest;

    const MAX_BATCH: usize = MAX_BATCH;
    const EAGER_ON_WIRE: usize = IN_FLIGHT;
    const MAX_BATCH_BYTES: usize = MAX_BATCH_BYTES;

    fn link(&self) -> &Link {
        &self.link
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn slot(request: &GetRequest) -> u16 {
        request.slot
    }

    fn weight(request: &GetRequest) -> usize {
        request.key.len()
    }

    fn deadline(request: &GetRequest) -> Instant {
        request.deadline
    }

    fn is_canceled(request: &GetRequest) -> bool {
        request.reply.is_canceled()
    }

    fn fail(request: GetRequest, err: Error) {
        let _ = request.reply.send(Err(err));
    }

    fn send(&self, group: Vec<GetRequest>) -> impl Future<Output = ()> + Send {
        send(&self.link, self.timeout, group)
    }
}

/// Sends one group (one slot) as one `GET` or `MGET` and answers its callers.
///
/// The callers are answered by the group's deadline (its first request's: see
/// [`coalesce::call_deadline`]). When their timeout is the link's call timeout, that is also
/// the call's own deadline, as for every other call. When it is shorter, the call is still
/// bounded by the call timeout (counted by the connection's health check, which replaces a
/// connection that stopped answering; a deadline chosen by a caller must not trip it): one
/// timer per call answers the callers with a timeout at theirs, and the call goes on in a task
/// of its own, so that its slot on the wire is free for the next batch.
async fn send(link: &Arc<Link>, timeout: Duration, group: Vec<GetRequest>) {
    let deadline = coalesce::call_deadline::<Gets>(&group);
    let cmd = if let [only] = group.as_slice() {
        redis::cmd("GET").arg(only.key.as_str()).to_owned()
    } else {
        // Sized up front: grown key by key, the buffers were reallocated several times a call.
        let key_bytes: usize = group.iter().map(|request| request.key.len()).sum();
        let mut cmd = redis::Cmd::with_capacity(group.len() + 1, key_bytes + 4);
        cmd.arg("MGET");
        for request in &group {
            cmd.arg(request.key.as_str());
        }
        cmd
    };
    let n = group.len();
    if timeout >= link.call_timeout {
        let replies = link.bounded(deadline, link.conn.query_batch(&cmd)).await;
        return answer(group, replies.and_then(|value| split(value, n)));
    }
    let link_deadline = deadline + (link.call_timeout - timeout);
    let link = Arc::clone(link);
    let mut call = Box::pin(async move {
        link.bounded(link_deadline, link.conn.query_batch(&cmd))
            .await
    });
    tokio::select! {
        replies = &mut call => answer(group, replies.and_then(|value| split(value, n))),
        () = tokio::time::sleep_until(deadline) => {
            for request in group {
                let _ = request.reply.send(Err(Error::Timeout { deadline: timeout }));
            }
            tokio::spawn(async move {
                let _ = call.await;
            });
        }
    }
}

/// Answers each caller of a group with its value, or all of them with the call's error.
fn answer(group: Vec<GetRequest>, replies: Result<Vec<Result<Option<Vec<u8>>>>>) {
    match replies {
        Ok(values) => {
            for (request, value) in group.into_iter().zip(values) {
                // A caller that stopped waiting has dropped its receiver: nothing to do.
                let _ = request.reply.send(value.map(|value| (request.key, value)));
            }
        }
        Err(err) => {
            for request in group {
                let _ = request.reply.send(Err(coalesce::copy_error(&err)));
            }
        }
    }
}

/// The values of a `GET` (`n == 1`) or `MGET` reply, one result per key.
fn split(value: Value, n: usize) -> Result<Vec<Result<Option<Vec<u8>>>>> {
    if n == 1 {
        return Ok(vec![one(value)]);
    }
    match value {
        Value::Array(items) if items.len() == n => Ok(items.into_iter().map(one).collect()),
        other => Err(unexpected_reply(format!(
            "MGET of {n} keys answered {other:?}"
        ))),
    }
}

fn one(value: Value) -> Result<Option<Vec<u8>>> {
    match value {
        Value::Nil => Ok(None),
        Value::BulkString(bytes) => Ok(Some(bytes)),
        Value::SimpleString(s) => Ok(Some(s.into_bytes())),
        other => Err(unexpected_reply(format!(
            "GET answered {other:?} instead of a value"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_split_into_one_result_per_key() {
        let values = split(
            Value::Array(vec![Value::Nil, Value::BulkString(vec![0, 255])]),
            2,
        )
        .expect("test step");
        assert!(matches!(values[0], Ok(None)));
        assert_eq!(
            values[1].as_ref().expect("test step").as_deref(),
            Some(&[0u8, 255][..])
        );
        assert!(split(Value::Array(vec![Value::Nil]), 2).is_err());
        assert!(split(Value::Int(3), 1).expect("one reply")[0].is_err());
    }
}
