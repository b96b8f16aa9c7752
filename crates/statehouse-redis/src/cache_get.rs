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

use std::sync::Arc;
use std::time::Duration;

use futures::Future;
use futures::channel::oneshot;
use redis::Value;
use statehouse_core::{Error, Result};
use tokio::time::Instant;

use crate::coalesce::{self, Batch, Classes, IN_FLIGHT, SplitOnMove};
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

/// The queues of a store's reads and their background tasks, one per read timeout in use
/// ([`coalesce::Classes`]); see the module docs.
pub(crate) struct GetBatcher {
    classes: Classes<Gets>,
}

impl GetBatcher {
    pub(crate) fn new() -> Self {
        GetBatcher {
            classes: Classes::new(),
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
        let queued = self.classes.submit(
            timeout,
            link.call_timeout,
            |timeout| Gets {
                link: Arc::clone(link),
                timeout,
            },
            |class| GetRequest {
                key,
                slot,
                deadline: now + class,
                reply,
            },
        );
        coalesce::answer_within(answer, STOPPED, queued, now + timeout, timeout).await
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

/// Sends one group (one slot) as one `GET` or `MGET` and answers its callers, by their
/// deadline ([`coalesce::bounded_call`]).
async fn send(link: &Arc<Link>, timeout: Duration, group: Vec<GetRequest>) {
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
    // The reads are independent: a call refused while its keys are apart is split by key.
    let on_move = SplitOnMove::new(link, &group, |r| r.key.as_str());
    let sender = on_move.clone();
    let call = |deadline| {
        let link = Arc::clone(link);
        async move {
            link.bounded(deadline, sender.send(&link, &cmd))
                .await
                .and_then(|value| split(value, n))
        }
    };
    let Some((group, replies)) =
        coalesce::bounded_call::<Gets, _, _>(link, timeout, group, call).await
    else {
        return;
    };
    if replies.is_err() && on_move.refused() {
        // One read per key, concurrently (a read of one key follows `ASK`).
        let by_key = coalesce::by_key(group, |r| r.key.as_str());
        futures::future::join_all(
            by_key
                .into_iter()
                .map(|part| Box::pin(send(link, timeout, part))),
        )
        .await;
        return;
    }
    answer(group, replies);
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
