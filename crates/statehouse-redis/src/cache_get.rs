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

/// The queue of a store's reads and its background task; see the module docs.
pub(crate) struct GetBatcher {
    queue: Coalescer<Gets>,
}

impl GetBatcher {
    pub(crate) fn new() -> Self {
        GetBatcher {
            queue: Coalescer::new(),
        }
    }

    /// Reads one key, coalesced with whatever other reads are queued.
    ///
    /// The read is answered by the link's call deadline, which the coalescer keeps (no timer
    /// per read); when `timeout` is shorter, the caller stops waiting after `timeout` with a
    /// timer of its own. A caller that stops waiting drops its receiver, which is what lets the
    /// batcher skip its read if it is still queued.
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
        let now = Instant::now();
        let deadline = now + link.call_timeout;
        let (reply, answer) = oneshot::channel();
        self.queue.submit(
            || Gets {
                link: Arc::clone(link),
            },
            GetRequest {
                key,
                slot,
                deadline,
                reply,
            },
        );
        let answer = coalesce::answer(answer, "the Redis read task stopped before answering");
        match timeout {
            // Shorter than the call timeout the coalescer keeps: a timer of the caller's own.
            Some(timeout) if timeout < link.call_timeout => {
                tokio::time::timeout_at(now + timeout, answer)
                    .await
                    .unwrap_or(Err(Error::Timeout { deadline: timeout }))
            }
            _ => answer.await,
        }
    }
}

/// The background task's context.
struct Gets {
    link: Arc<Link>,
}

impl Batch for Gets {
    type Request = GetRequest;

    const MAX_BATCH: usize = MAX_BATCH;
    const EAGER_ON_WIRE: usize = IN_FLIGHT;
    const MAX_BATCH_BYTES: usize = MAX_BATCH_BYTES;

    fn link(&self) -> &Link {
        &self.link
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
        send(&self.link, group)
    }
}

/// Sends one group (one slot) as one `GET` or `MGET` and answers its callers.
async fn send(link: &Link, group: Vec<GetRequest>) {
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
    let replies = link
        .bounded(deadline, link.conn.query_batch(&cmd))
        .await
        .and_then(|value| split(value, group.len()));
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
