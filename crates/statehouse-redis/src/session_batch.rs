//! Coalescing of concurrent session loads: the fast path's reads into one `MGET` per slot
//! ([`ReadBatcher`], see its docs), and the loads that need the script into one script call.
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

use std::sync::Arc;

use futures::Future;
use futures::channel::oneshot;
use redis::Value;
use statehouse_core::session::SessionConfig;
use statehouse_core::{Error, Result};
use tokio::time::Instant;

use crate::coalesce::{self, Batch, Coalescer};
use crate::link::Link;
use crate::session_script::{array, invocation, uint};

/// The most loads in one script call.
pub(crate) const MAX_BATCH: usize = 128;
/// The most batches on the wire at once.
pub(crate) const MAX_IN_FLIGHT: usize = 2;

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
        let deadline = request.deadline;
        self.queue.submit(
            || Loads {
                link: Arc::clone(link),
                config: config.clone(),
            },
            request,
        );
        coalesce::answer(
            deadline,
            answer,
            link.call_timeout,
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
    const MAX_BATCH_BYTES: usize = usize::MAX;
    const MAX_IN_FLIGHT: usize = MAX_IN_FLIGHT;

    fn link(&self) -> &Link {
        &self.link
    }

    fn slot(request: &LoadRequest) -> u16 {
        request.slot
    }

    fn weight(_: &LoadRequest) -> usize {
        0
    }

    fn is_abandoned(request: &LoadRequest, now: Instant) -> bool {
        request.reply.is_canceled() || request.deadline <= now
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

/// The most reads in one `MGET`.
pub(crate) const MAX_READ_BATCH: usize = 256;
/// The most bytes of keys in one `MGET` (a session key is at most about 150 bytes).
const MAX_READ_BATCH_BYTES: usize = 256 * 1024;

/// One caller's read-only load (the fast path's read of the session record), waiting in the
/// queue.
pub(crate) struct ReadRequest {
    /// The presented id's session key.
    pub(crate) key: String,
    /// Its cluster slot (0 on standalone).
    pub(crate) slot: u16,
    pub(crate) deadline: Instant,
    /// The key, handed back, and its stored value (`None` when the key is absent).
    pub(crate) reply: oneshot::Sender<Result<(String, Option<Vec<u8>>)>>,
}

/// The queue of a store's read-only loads and its background task: the reads queued while
/// earlier ones are on the wire go out together, per Cluster slot, as **one `MGET`** (a lone
/// read is a plain `GET`): one command for the server to parse and answer, one reply array of
/// bulk strings for the client, like the cache's hit path ([`crate::cache_get`]).
///
/// `GET` of a key of another type (a HASH) is a `WRONGTYPE` error, which the lone read returns
/// as [`Error::Backend`]; `MGET` answers nil for it, so a coalesced read of such a key reads as
/// absent. Session keys hold only what this store writes; the difference matters only for a key
/// written by something else (or by a development build before records were STRINGs).
pub(crate) struct ReadBatcher {
    queue: Coalescer<Reads>,
}

impl ReadBatcher {
    pub(crate) fn new() -> Self {
        ReadBatcher {
            queue: Coalescer::new(),
        }
    }

    /// `GET key`, coalesced with whatever other reads are queued. Hands the key back with the
    /// value, so a caller that needs it afterwards does not have to copy it first.
    pub(crate) async fn read(
        &self,
        link: &Arc<Link>,
        key: String,
        slot: u16,
    ) -> Result<(String, Option<Vec<u8>>)> {
        let deadline = Instant::now() + link.call_timeout;
        let (reply, answer) = oneshot::channel();
        self.queue.submit(
            || Reads {
                link: Arc::clone(link),
            },
            ReadRequest {
                key,
                slot,
                deadline,
                reply,
            },
        );
        coalesce::answer(
            deadline,
            answer,
            link.call_timeout,
            "the Redis session read task stopped before answering",
        )
        .await
    }
}

/// The background task's context: reads, sent as `GET` or `MGET`.
struct Reads {
    link: Arc<Link>,
}

impl Batch for Reads {
    type Request = ReadRequest;

    const MAX_BATCH: usize = MAX_READ_BATCH;
    const MAX_BATCH_BYTES: usize = MAX_READ_BATCH_BYTES;
    const MAX_IN_FLIGHT: usize = MAX_IN_FLIGHT;

    fn link(&self) -> &Link {
        &self.link
    }

    fn slot(request: &ReadRequest) -> u16 {
        request.slot
    }

    fn weight(request: &ReadRequest) -> usize {
        request.key.len()
    }

    fn is_abandoned(request: &ReadRequest, now: Instant) -> bool {
        request.reply.is_canceled() || request.deadline <= now
    }

    fn send(&self, group: Vec<ReadRequest>) -> impl Future<Output = ()> + Send {
        send_reads(&self.link, group)
    }
}

/// Sends one group (one slot) as one `GET` or `MGET` and answers its callers.
async fn send_reads(link: &Link, group: Vec<ReadRequest>) {
    let deadline = group
        .iter()
        .map(|r| r.deadline)
        .max()
        .unwrap_or_else(Instant::now);
    let cmd = if let [only] = group.as_slice() {
        redis::cmd("GET").arg(only.key.as_str()).to_owned()
    } else {
        let mut cmd = redis::cmd("MGET");
        for request in &group {
            cmd.arg(request.key.as_str());
        }
        cmd
    };
    let replies = link
        .bounded(deadline, link.conn.query(&cmd))
        .await
        .and_then(|value| split_values(value, group.len()));
    match replies {
        Ok(values) => {
            for (request, value) in group.into_iter().zip(values) {
                let _ = request.reply.send(value.map(|value| (request.key, value)));
            }
        }
        Err(err) => {
            for request in group {
                let _ = request.reply.send(Err(clone_error(&err)));
            }
        }
    }
}

/// The values of a `GET` (`n == 1`) or `MGET` reply, one result per key.
fn split_values(value: Value, n: usize) -> Result<Vec<Result<Option<Vec<u8>>>>> {
    if n == 1 {
        return Ok(vec![one_value(value)]);
    }
    match value {
        Value::Array(items) if items.len() == n => Ok(items.into_iter().map(one_value).collect()),
        other => Err(crate::error::unexpected_reply(format!(
            "MGET of {n} keys answered {other:?}"
        ))),
    }
}

fn one_value(value: Value) -> Result<Option<Vec<u8>>> {
    match value {
        Value::Nil => Ok(None),
        Value::BulkString(bytes) => Ok(Some(bytes)),
        Value::SimpleString(s) => Ok(Some(s.into_bytes())),
        other => Err(crate::error::unexpected_reply(format!(
            "GET answered {other:?} instead of a value"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_replies_split_into_one_result_per_key() {
        let values = split_values(
            Value::Array(vec![Value::Nil, Value::BulkString(vec![b'S', 255])]),
            2,
        )
        .expect("two values");
        assert!(matches!(values[0], Ok(None)));
        assert_eq!(
            values[1].as_ref().expect("a value").as_deref(),
            Some(&[b'S', 255][..])
        );
        assert!(split_values(Value::Array(vec![Value::Nil]), 2).is_err());
        assert!(split_values(Value::Int(3), 1).expect("one reply")[0].is_err());
    }
}
