//! The batch connection: a second, lean pipelined connection to a standalone Redis that carries
//! the hottest coalesced calls: the `MGET`s of cache hits and session fast-path loads, and the
//! `independent` rate-limit scripts. (Session `load_many` scripts, single calls, writes,
//! administrative commands, Pub/Sub and everything on Redis Cluster stay on redis-rs.)
//!
//! Why a connection of our own beside redis-rs's: the coalesced calls are the hot path, and on
//! it redis-rs's generic reply parser (built on `combine`) and its allocations were a third of
//! the client's instructions per read (callgrind: about 2 200 of 6 900 instructions per
//! `RedisCacheStore::get`; 5 500 with this connection). The replies of these calls are plain
//! RESP2 (arrays of bulk strings, integers and nils), which [`parse`] reads in a few dozen
//! instructions per value.
//!
//! The design is redis-rs's multiplexed connection, minus what these calls do not need: one
//! task owns the socket; callers queue an encoded command with a reply channel; the task writes
//! whatever is queued in one write and answers the replies in order as they arrive. It connects
//! when the store is made, within the store's call timeout, with the URL's `AUTH` and `SELECT`,
//! over TLS for a `rediss://` URL (rustls, with the store's TLS settings: the trust and client
//! certificate redis-rs uses). Any I/O or protocol error fails every call on the wire and every
//! call queued with that error (so each caller's degraded-mode policy sees an outage) and drops
//! the socket; the task then connects again, at once for the next call or after a pause (20 ms
//! doubling to 1 s) when none comes. [`Pipe::reset`] ends the task (after calls keep timing
//! out); the next call starts another. A caller that gives up waiting is bounded by its own
//! deadline ([`crate::link::Link::bounded`]); its reply, if it comes, is read and dropped.
//!
//! While nothing is on the wire the task still watches the socket: a server that closes the
//! connection (restarted, failed over behind the same address, an idle `timeout`) is noticed at
//! once, and the owner told (it then replaces its redis-rs connection, which would otherwise
//! fail its next call on the dead socket). So the first calls after a restart succeed, rather
//! than fail once per connection.
//!
//! Only RESP2 is spoken (no `HELLO 3`), whatever the URL's `protocol`: these commands' replies
//! are the same in both.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use futures::channel::{mpsc, oneshot};
use redis::{ConnectionAddr, ConnectionInfo, ErrorKind, RedisError, RedisResult, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::link::TlsSettings;

/// The most nested arrays in a reply (the calls carried here nest at most two deep).
const MAX_DEPTH: usize = 8;
/// Read buffer capacity kept between replies.
const READ_CHUNK: usize = 64 * 1024;

/// Told when the server closes the connection while nothing is on the wire.
pub(crate) type OnServerClosed = Arc<dyn Fn() + Send + Sync>;

/// Where and how to connect.
#[derive(Clone)]
enum Target {
    Tcp(String, u16),
    #[cfg(feature = "tls")]
    Tls(String, u16, tls::Connector),
    #[cfg(unix)]
    Unix(std::path::PathBuf),
}

/// The batch connection of a standalone store; see the module docs.
pub(crate) struct Pipe {
    target: Target,
    username: Option<String>,
    password: Option<String>,
    db: i64,
    connect_timeout: Duration,
    on_server_closed: OnServerClosed,
    /// The running connection task's queue, or `None` before the first call and after a reset.
    /// A std `Mutex`: held only to send (which never blocks) or to start a task.
    jobs: Mutex<Option<mpsc::UnboundedSender<Job>>>,
}

/// One call: its encoded command and where its reply goes.
struct Job {
    command: Vec<u8>,
    reply: oneshot::Sender<RedisResult<Value>>,
}

impl Pipe {
    /// A batch connection to the address of `info`, or `None` for an address it does not
    /// speak (TLS without the `tls` feature, or TLS settings it cannot turn into a rustls
    /// configuration: those calls stay on redis-rs, which reports the problem).
    pub(crate) fn new(
        info: &ConnectionInfo,
        connect_timeout: Duration,
        tls: &TlsSettings,
        on_server_closed: OnServerClosed,
    ) -> Option<Pipe> {
        let target = match info.addr() {
            ConnectionAddr::Tcp(host, port) => Target::Tcp(host.clone(), *port),
            #[cfg(feature = "tls")]
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                ..
            } => match tls::Connector::new(host, tls) {
                Ok(connector) => Target::Tls(host.clone(), *port, connector),
                Err(err) => {
                    tracing::debug!(error = %err, "statehouse-redis: no TLS batch connection");
                    return None;
                }
            },
            #[cfg(unix)]
            ConnectionAddr::Unix(path) => Target::Unix(path.clone()),
            _ => return None,
        };
        #[cfg(not(feature = "tls"))]
        let _ = tls;
        let settings = info.redis_settings();
        let pipe = Pipe {
            target,
            username: settings.username().map(str::to_owned),
            password: settings.password().map(str::to_owned),
            db: settings.db(),
            connect_timeout,
            on_server_closed,
            jobs: Mutex::new(None),
        };
        // Connected from the start, so that it watches the server even before its first call.
        *pipe.jobs.lock().unwrap_or_else(PoisonError::into_inner) = Some(pipe.start());
        Some(pipe)
    }

    /// Sends `command` (one encoded command) and waits for its reply. Not bounded in time by
    /// itself: callers wrap it in their deadline.
    pub(crate) async fn query(&self, command: Vec<u8>) -> RedisResult<Value> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job { command, reply });
        match answer.await {
            Ok(result) => result,
            // The task ended without answering (its connection failed as the call was queued).
            Err(oneshot::Canceled) => Err(closed("the batch connection closed")),
        }
    }

    /// Drops the connection (the task ends once it notices; calls on the wire fail); the next
    /// call connects anew.
    pub(crate) fn reset(&self) {
        *self.jobs.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    fn submit(&self, job: Job) {
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        let job = match jobs.as_ref() {
            Some(sender) => match sender.unbounded_send(job) {
                Ok(()) => return,
                // The task has ended (a panic, or a runtime shut down): start another below.
                Err(err) => err.into_inner(),
            },
            None => job,
        };
        let sender = self.start();
        // The receiver is alive: it was just made.
        let _ = sender.unbounded_send(job);
        *jobs = Some(sender);
    }

    /// Starts a connection task; returns its queue.
    fn start(&self) -> mpsc::UnboundedSender<Job> {
        let (sender, receiver) = mpsc::unbounded();
        let setup = Setup {
            target: self.target.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
            db: self.db,
            connect_timeout: self.connect_timeout,
            on_server_closed: Arc::clone(&self.on_server_closed),
        };
        tokio::spawn(run(setup, receiver));
        sender
    }
}

/// What the connection task needs to connect.
struct Setup {
    target: Target,
    username: Option<String>,
    password: Option<String>,
    db: i64,
    connect_timeout: Duration,
    on_server_closed: OnServerClosed,
}

/// How serving a connection ended without an error.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The queue closed (reset, or the store dropped).
    QueueClosed,
    /// The server closed the connection while nothing was on the wire.
    ServerClosedIdle,
}

/// The first pause before connecting again after the connection was lost with no call
/// waiting; it doubles up to [`RECONNECT_MAX_PAUSE`]. A call that comes meanwhile connects at
/// once.
const RECONNECT_FIRST_PAUSE: Duration = Duration::from_millis(20);
const RECONNECT_MAX_PAUSE: Duration = Duration::from_secs(1);

/// The connection task: connects, then writes queued commands and answers replies in order
/// until the queue closes (reset, or the store dropped). When the connection is lost (an
/// error fails the calls on the wire and those queued), it connects again: at once for the
/// next call, else after a pause, so that it keeps watching the server between calls.
async fn run(setup: Setup, mut jobs: mpsc::UnboundedReceiver<Job>) {
    // A call taken from the queue while there was no connection, to be written first.
    let mut first: Option<Job> = None;
    let mut pause = RECONNECT_FIRST_PAUSE;
    loop {
        let connected = tokio::time::timeout(setup.connect_timeout, connect(&setup)).await;
        let result = match connected {
            Ok(Ok(stream)) => {
                pause = RECONNECT_FIRST_PAUSE;
                match stream {
                    Stream::Tcp(stream) => serve(stream, &mut jobs, first.take()).await,
                    #[cfg(feature = "tls")]
                    Stream::Tls(stream) => serve(*stream, &mut jobs, first.take()).await,
                    #[cfg(unix)]
                    Stream::Unix(stream) => serve(stream, &mut jobs, first.take()).await,
                }
            }
            Ok(Err(err)) => Err(err),
            Err(_) => Err(RedisError::from(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("could not connect within {:?}", setup.connect_timeout),
            ))),
        };
        match result {
            Ok(Ended::QueueClosed) => return,
            Ok(Ended::ServerClosedIdle) => (setup.on_server_closed)(),
            Err(err) => {
                if err.is_connection_dropped() && !err.is_connection_refusal() {
                    (setup.on_server_closed)();
                }
                // Fail what is queued now: those callers should hear of the outage at once.
                if let Some(job) = first.take() {
                    let _ = job.reply.send(Err(copy(&err)));
                }
                while let Ok(job) = jobs.try_recv() {
                    let _ = job.reply.send(Err(copy(&err)));
                }
            }
        }
        // Not connected: connect again at once for the next call, or after the pause.
        tokio::select! {
            job = jobs.next() => match job {
                Some(job) => first = Some(job),
                None => return,
            },
            () = tokio::time::sleep(pause) => pause = (pause * 2).min(RECONNECT_MAX_PAUSE),
        }
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
}

async fn connect(setup: &Setup) -> RedisResult<Stream> {
    let mut stream = match &setup.target {
        Target::Tcp(host, port) => {
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            Stream::Tcp(stream)
        }
        #[cfg(feature = "tls")]
        Target::Tls(host, port, connector) => {
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            Stream::Tls(Box::new(connector.connect(stream).await?))
        }
        #[cfg(unix)]
        Target::Unix(path) => Stream::Unix(tokio::net::UnixStream::connect(path).await?),
    };
    // (the command, whether it is the `AUTH`)
    let mut handshake: Vec<(redis::Cmd, bool)> = Vec::new();
    if let Some(password) = &setup.password {
        let mut auth = redis::cmd("AUTH");
        if let Some(username) = &setup.username {
            auth.arg(username);
        }
        handshake.push((auth.arg(password).to_owned(), true));
    }
    if setup.db != 0 {
        handshake.push((redis::cmd("SELECT").arg(setup.db).to_owned(), false));
    }
    for (cmd, is_auth) in handshake {
        let reply = match &mut stream {
            Stream::Tcp(s) => roundtrip(s, &cmd.get_packed_command()).await?,
            #[cfg(feature = "tls")]
            Stream::Tls(s) => roundtrip(s.as_mut(), &cmd.get_packed_command()).await?,
            #[cfg(unix)]
            Stream::Unix(s) => roundtrip(s, &cmd.get_packed_command()).await?,
        };
        match reply.extract_error() {
            // A refused `AUTH` is an outage for the caller's fallback, as redis-rs reports it.
            Err(err) if is_auth => {
                return Err(RedisError::from((
                    ErrorKind::AuthenticationFailed,
                    "the batch connection's AUTH was refused",
                    err.to_string(),
                )));
            }
            Err(err) => return Err(err),
            Ok(_) => {}
        }
    }
    Ok(stream)
}

/// One command and its reply, before the connection serves the queue.
async fn roundtrip<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    command: &[u8],
) -> RedisResult<Value> {
    stream.write_all(command).await?;
    stream.flush().await?;
    let mut buf = Vec::with_capacity(256);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(closed(
                "the server closed the connection during the handshake",
            ));
        }
        if let Some((value, _)) = parse(&buf)? {
            return Ok(value);
        }
    }
}

/// Serves the queue over a connected stream, starting with `first` when given; returns how it
/// ended, or the error that ended it.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    jobs: &mut mpsc::UnboundedReceiver<Job>,
    first: Option<Job>,
) -> RedisResult<Ended> {
    // Reply channels of the calls on the wire, in the order they were written.
    let mut waiting: VecDeque<oneshot::Sender<RedisResult<Value>>> = VecDeque::new();
    let mut out: Vec<u8> = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut start = 0;
    if let Some(job) = first {
        out.extend_from_slice(&job.command);
        waiting.push_back(job.reply);
        let written = async {
            stream.write_all(&out).await?;
            stream.flush().await
        };
        if let Err(err) = written.await {
            let err = RedisError::from(err);
            for reply in waiting {
                let _ = reply.send(Err(copy(&err)));
            }
            return Err(err);
        }
        out.clear();
    }
    let result = loop {
        // The branch futures are dropped before a handler runs, so both may use `stream`.
        tokio::select! {
            // Replies first: they free callers, whose next calls then join one write. Read
            // also while nothing is on the wire, to notice a server that closes the connection.
            biased;
            read = stream.read_buf(&mut buf) => {
                match read {
                    Ok(0) if waiting.is_empty() => break Ok(Ended::ServerClosedIdle),
                    Ok(0) => break Err(closed("the server closed the connection")),
                    Ok(_) => {}
                    Err(err) => break Err(err.into()),
                }
                let mut failed = None;
                loop {
                    match parse(&buf[start..]) {
                        Ok(Some((value, used))) => {
                            start += used;
                            let Some(reply) = waiting.pop_front() else {
                                failed = Some(protocol("a reply nobody asked for"));
                                break;
                            };
                            let _ = reply.send(value.extract_error());
                        }
                        Ok(None) => break,
                        Err(err) => {
                            failed = Some(err);
                            break;
                        }
                    }
                }
                if let Some(err) = failed {
                    break Err(err);
                }
                // Keep the unread tail at the front, and the buffer from growing for good.
                if start == buf.len() {
                    buf.clear();
                    start = 0;
                    if buf.capacity() > 4 * READ_CHUNK {
                        buf.shrink_to(READ_CHUNK);
                    }
                } else if start > READ_CHUNK {
                    buf.drain(..start);
                    start = 0;
                }
                if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                    buf.reserve(READ_CHUNK);
                }
            }
            job = jobs.next() => {
                let Some(job) = job else {
                    break Ok(Ended::QueueClosed);
                };
                out.extend_from_slice(&job.command);
                waiting.push_back(job.reply);
                // Whatever else is queued goes in the same write.
                while let Ok(job) = jobs.try_recv() {
                    out.extend_from_slice(&job.command);
                    waiting.push_back(job.reply);
                }
                if let Err(err) = stream.write_all(&out).await {
                    break Err(err.into());
                }
                if let Err(err) = stream.flush().await {
                    break Err(err.into());
                }
                out.clear();
            }
        }
    };
    if let Err(err) = &result {
        for reply in waiting {
            let _ = reply.send(Err(copy(err)));
        }
    }
    result
}

fn closed(what: &'static str) -> RedisError {
    RedisError::from(io::Error::new(io::ErrorKind::ConnectionReset, what))
}

fn protocol(what: impl Into<String>) -> RedisError {
    RedisError::from((ErrorKind::Parse, "invalid reply", what.into()))
}

/// The same error for every call that fails with one connection: I/O errors keep their kind
/// (so they still read as an outage), others their kind and text.
fn copy(err: &RedisError) -> RedisError {
    match err.kind() {
        ErrorKind::Io => RedisError::from(io::Error::new(
            if err.is_timeout() {
                io::ErrorKind::TimedOut
            } else {
                io::ErrorKind::ConnectionReset
            },
            err.to_string(),
        )),
        kind => RedisError::from((kind, "batch connection failed", err.to_string())),
    }
}

/// Parses one RESP2 reply at the start of `buf`: `Ok(None)` when it is not all there yet,
/// otherwise the value and the bytes it took. Error replies are values here
/// ([`Value::ServerError`], as redis-rs gives them); the caller turns a top-level one into an
/// error.
///
/// Past [`READ_CHUNK`] of input, a first pass only checks that the whole reply is there (no
/// allocation), so that a large reply arriving in many reads is not rebuilt, and its values
/// copied, at every read.
pub(crate) fn parse(buf: &[u8]) -> RedisResult<Option<(Value, usize)>> {
    if buf.len() > READ_CHUNK && value(buf, &mut 0, 0, false)?.is_none() {
        return Ok(None);
    }
    let mut at = 0;
    Ok(value(buf, &mut at, 0, true)?.map(|v| (v, at)))
}

/// One value at `at`; with `build` false, only whether it is complete (`Some(Value::Nil)`).
fn value(buf: &[u8], at: &mut usize, depth: usize, build: bool) -> RedisResult<Option<Value>> {
    let start = *at;
    let Some((&kind, rest)) = buf[start..].split_first() else {
        return Ok(None);
    };
    let Some(end) = line_end(rest) else {
        if rest.len() > 64 * 1024 {
            return Err(protocol("a reply line longer than 64 KiB"));
        }
        return Ok(None);
    };
    let line = &rest[..end];
    // Past the kind byte, the line and its CRLF.
    let next = start + 1 + end + 2;
    match kind {
        b'$' => {
            let len = integer(line)?;
            if len < 0 {
                *at = next;
                return Ok(Some(Value::Nil));
            }
            let len = usize::try_from(len).map_err(|_| protocol("a bulk length out of range"))?;
            let Some(stop) = next.checked_add(len) else {
                return Err(protocol("a bulk length out of range"));
            };
            if buf.len() < stop + 2 {
                return Ok(None);
            }
            if &buf[stop..stop + 2] != b"\r\n" {
                return Err(protocol("a bulk string without its CRLF"));
            }
            *at = stop + 2;
            Ok(Some(if build {
                Value::BulkString(buf[next..stop].to_vec())
            } else {
                Value::Nil
            }))
        }
        b':' => {
            *at = next;
            Ok(Some(Value::Int(integer(line)?)))
        }
        b'*' => {
            let count = integer(line)?;
            if count < 0 {
                *at = next;
                return Ok(Some(Value::Nil));
            }
            if depth >= MAX_DEPTH {
                return Err(protocol("arrays nested too deep"));
            }
            let count =
                usize::try_from(count).map_err(|_| protocol("an array length out of range"))?;
            // Every element takes at least 3 bytes: do not trust a count the buffer cannot hold
            // for the allocation.
            let mut items = Vec::with_capacity(if build {
                count.min((buf.len() - next) / 3 + 1)
            } else {
                0
            });
            let mut cursor = next;
            for _ in 0..count {
                match value(buf, &mut cursor, depth + 1, build)? {
                    Some(item) if build => items.push(item),
                    Some(_) => {}
                    None => return Ok(None),
                }
            }
            *at = cursor;
            Ok(Some(if build {
                Value::Array(items)
            } else {
                Value::Nil
            }))
        }
        b'+' => {
            *at = next;
            Ok(Some(if line == b"OK" {
                Value::Okay
            } else {
                Value::SimpleString(String::from_utf8_lossy(line).into_owned())
            }))
        }
        b'-' => {
            // Rare: let redis-rs classify it (NOSCRIPT, WRONGTYPE, BUSY, …) as it does for its
            // own connections.
            *at = next;
            redis::parse_redis_value(&buf[start..next]).map(Some)
        }
        other => Err(protocol(format!(
            "an unexpected reply type byte {other:#04x}"
        ))),
    }
}

/// Where the CRLF of the line at the start of `rest` begins.
fn line_end(rest: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = rest[from..].iter().position(|&b| b == b'\r') {
        let i = from + i;
        match rest.get(i + 1) {
            Some(b'\n') => return Some(i),
            Some(_) => from = i + 1,
            None => return None,
        }
    }
    None
}

fn integer(line: &[u8]) -> RedisResult<i64> {
    let (negative, digits) = match line.split_first() {
        Some((b'-', digits)) => (true, digits),
        _ => (false, line),
    };
    if digits.is_empty() || digits.len() > 19 {
        return Err(protocol("an integer reply out of range"));
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(protocol("an integer reply that is not a number"));
        }
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(i64::from(d - b'0')))
            .ok_or_else(|| protocol("an integer reply out of range"))?;
    }
    Ok(if negative { -n } else { n })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(bytes: &[u8]) -> Value {
        let (value, used) = parse(bytes).expect("parses").expect("complete");
        assert_eq!(used, bytes.len(), "{value:?}");
        value
    }

    #[test]
    fn parses_the_replies_of_the_batched_calls() {
        assert_eq!(whole(b"$3\r\nabc\r\n"), Value::BulkString(b"abc".to_vec()));
        assert_eq!(whole(b"$0\r\n\r\n"), Value::BulkString(Vec::new()));
        assert_eq!(whole(b"$-1\r\n"), Value::Nil);
        assert_eq!(whole(b"*-1\r\n"), Value::Nil);
        assert_eq!(whole(b":-42\r\n"), Value::Int(-42));
        assert_eq!(whole(b"+OK\r\n"), Value::Okay);
        assert_eq!(whole(b"+QUEUED\r\n"), Value::SimpleString("QUEUED".into()));
        // Binary values, CR and LF inside included.
        assert_eq!(
            whole(b"*3\r\n$4\r\n\r\n\0\xff\r\n$-1\r\n*2\r\n:1\r\n$1\r\nx\r\n"),
            Value::Array(vec![
                Value::BulkString(b"\r\n\0\xff".to_vec()),
                Value::Nil,
                Value::Array(vec![Value::Int(1), Value::BulkString(b"x".to_vec())]),
            ])
        );
        assert_eq!(whole(b":9223372036854775807\r\n"), Value::Int(i64::MAX));
    }

    #[test]
    fn server_errors_keep_their_kind() {
        let value = whole(b"-NOSCRIPT No matching script.\r\n");
        let err = value.extract_error().expect_err("an error reply");
        assert_eq!(
            err.kind(),
            ErrorKind::Server(redis::ServerErrorKind::NoScript)
        );
        let value = whole(b"-WRONGTYPE Operation against a key\r\n");
        assert_eq!(
            value.extract_error().expect_err("error").code(),
            Some("WRONGTYPE")
        );
    }

    #[test]
    fn an_incomplete_reply_waits_for_more_at_every_cut() {
        let reply = b"*3\r\n$5\r\nhello\r\n:7\r\n*1\r\n$-1\r\n";
        for cut in 0..reply.len() {
            assert!(
                parse(&reply[..cut])
                    .expect("a prefix is not an error")
                    .is_none(),
                "cut at {cut}"
            );
        }
        let mut two = reply.to_vec();
        two.extend_from_slice(b"$1\r\nz\r\n");
        let (_, used) = parse(&two).expect("parses").expect("complete");
        assert_eq!(used, reply.len());
        assert_eq!(whole(&two[used..]), Value::BulkString(b"z".to_vec()));
    }

    #[test]
    fn a_large_reply_parses_only_once_complete() {
        // 40 values of 4 KiB: past READ_CHUNK, so the completeness pass runs first.
        let mut reply = b"*40\r\n".to_vec();
        for i in 0..40u8 {
            reply.extend_from_slice(b"$4096\r\n");
            reply.extend(std::iter::repeat_n(i, 4096));
            reply.extend_from_slice(b"\r\n");
        }
        assert!(reply.len() > READ_CHUNK);
        for cut in [READ_CHUNK + 1, reply.len() - 1] {
            assert!(
                parse(&reply[..cut]).expect("a prefix").is_none(),
                "cut at {cut}"
            );
        }
        let Value::Array(items) = whole(&reply) else {
            panic!("an array");
        };
        assert_eq!(items.len(), 40);
        assert_eq!(items[39], Value::BulkString(vec![39; 4096]));
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        for bad in [
            &b"?oops\r\n"[..],
            b"$abc\r\n",
            b"$3\r\nabcXY",
            b":12x\r\n",
            b":99999999999999999999\r\n",
            b"$99999999999999999999\r\n",
            b"*9223372036854775807\r\n",
            b":\r\n",
        ] {
            match parse(bad) {
                Err(_) => {}
                // A huge array count is only incomplete until its elements fail to come.
                Ok(None) if bad.starts_with(b"*") => {}
                other => panic!("{bad:?} parsed as {other:?}"),
            }
        }
        let nested = b"*1\r\n".repeat(MAX_DEPTH + 1);
        assert!(parse(&nested).is_err());
    }
}

/// The batch connection's TLS: the trust and client certificate redis-rs uses for the same
/// settings (the given CAs instead of the system's roots, else the system's roots).
#[cfg(feature = "tls")]
mod tls {
    use std::io;
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::{ClientConfig, RootCertStore};
    use tokio::net::TcpStream;
    use tokio_rustls::TlsConnector;
    use tokio_rustls::client::TlsStream;

    use crate::link::TlsSettings;

    /// A rustls client configuration and the server name to verify.
    #[derive(Clone)]
    pub(super) struct Connector {
        connector: TlsConnector,
        name: ServerName<'static>,
    }

    impl Connector {
        pub(super) fn new(host: &str, settings: &TlsSettings) -> Result<Connector, String> {
            crate::link::install_crypto_provider();
            let mut roots = RootCertStore::empty();
            match &settings.root_certificates {
                Some(pem) => {
                    for cert in CertificateDer::pem_slice_iter(pem) {
                        let cert = cert.map_err(|e| format!("a root certificate: {e}"))?;
                        roots
                            .add(cert)
                            .map_err(|e| format!("a root certificate: {e}"))?;
                    }
                }
                None => {
                    let native = rustls_native_certs::load_native_certs();
                    if let Some(err) = native.errors.first() {
                        return Err(format!("the system's root certificates: {err}"));
                    }
                    for cert in native.certs {
                        roots
                            .add(cert)
                            .map_err(|e| format!("a system root certificate: {e}"))?;
                    }
                }
            }
            let builder = ClientConfig::builder().with_root_certificates(roots);
            let config = match &settings.client_certificate {
                Some((chain, key)) => {
                    let chain = CertificateDer::pem_slice_iter(chain)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| format!("the client certificate: {e}"))?;
                    let key = PrivateKeyDer::from_pem_slice(key)
                        .map_err(|e| format!("the client key: {e}"))?;
                    builder
                        .with_client_auth_cert(chain, key)
                        .map_err(|e| format!("the client certificate: {e}"))?
                }
                None => builder.with_no_client_auth(),
            };
            let name = ServerName::try_from(host.to_owned())
                .map_err(|e| format!("the server name {host:?}: {e}"))?;
            Ok(Connector {
                connector: TlsConnector::from(Arc::new(config)),
                name,
            })
        }

        pub(super) async fn connect(&self, stream: TcpStream) -> io::Result<TlsStream<TcpStream>> {
            self.connector.connect(self.name.clone(), stream).await
        }
    }
}
