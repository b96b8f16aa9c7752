//! The connection a store sends its scripts over.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, RedisResult, ScriptInvocation, ServerErrorKind, Value};
use tokio::time::Instant;

use crate::link::TlsSettings;
use crate::pipe::Pipe;

/// After this many calls in a row missed their deadline, the standalone connection is replaced.
pub(crate) const REPLACE_AFTER_TIMEOUTS: u32 = 3;

/// How long a cluster call keeps trying again while a slot moves (see [`across_slot_moves`]);
/// every call is also bounded by its caller's deadline, usually far shorter.
const SLOT_MOVE_PATIENCE: Duration = Duration::from_secs(2);
/// The first pause before trying again; it doubles up to [`SLOT_MOVE_MAX_PAUSE`].
const SLOT_MOVE_FIRST_PAUSE: Duration = Duration::from_millis(2);
const SLOT_MOVE_MAX_PAUSE: Duration = Duration::from_millis(50);

/// A standalone or cluster connection. Both are cheap handles to shared, multiplexed
/// connections: cloning one per call is how redis-rs expects them to be used, and concurrent
/// calls are pipelined on the same socket.
pub(crate) enum Connection {
    /// One multiplexed connection that reconnects by itself.
    Standalone(Box<StandaloneConnection>),
    /// redis-rs's slot-aware cluster connection: it follows MOVED/ASK, refreshes the slot map
    /// and reconnects to nodes by itself.
    Cluster(ClusterConnection),
}

/// A [`ConnectionManager`], replaced when calls keep missing their deadline or the server
/// closes its connections.
///
/// The manager reconnects when a call on its connection fails (reset, refused, closed). A
/// socket that silently stops answering (a partitioned network, a server that moved to another
/// address) reports nothing until the kernel gives up, which takes minutes; each call merely
/// times out. After [`REPLACE_AFTER_TIMEOUTS`] timeouts in a row the manager is swapped for a
/// fresh one, which connects anew on the next call.
///
/// A server that closes its connections (restarted, failed over behind the same address, an
/// idle `timeout`) is noticed by the batch connection, which watches its socket while idle
/// ([`crate::pipe`]): the manager is then swapped at once, so the first call after the server
/// is back connects afresh instead of failing on the dead socket. And a call refused because
/// the manager could not connect at its last attempt ([`redis::RedisError::is_connection_refusal`]:
/// nothing was sent) is tried once more on the reconnection that refusal started.
pub(crate) struct StandaloneConnection {
    slot: Arc<ManagerSlot>,
    /// The coalescers' batch connection (see [`crate::pipe`]); `None` for an address it does
    /// not speak, whose batches go through the manager.
    pipe: Option<Pipe>,
    consecutive_timeouts: AtomicU32,
}

/// The current [`ConnectionManager`] and what it takes to make another.
struct ManagerSlot {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// A std `Mutex`: held only to clone or swap the handle, never across an `.await`.
    manager: Mutex<ConnectionManager>,
}

impl ManagerSlot {
    fn current(&self) -> ConnectionManager {
        self.manager
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Swaps the manager for a fresh, lazily connecting one. Calls already on the old one run
    /// to their end on it.
    fn replace(&self, why: &'static str) {
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            Ok(fresh) => {
                tracing::info!(why, "statehouse-redis: replacing the connection");
                *self.manager.lock().unwrap_or_else(PoisonError::into_inner) = fresh;
            }
            Err(err) => {
                tracing::warn!(error = %err, "statehouse-redis: could not replace the connection");
            }
        }
    }
}

impl StandaloneConnection {
    /// Calls in a row that missed their deadline (the health check's count).
    #[cfg(test)]
    pub(crate) fn consecutive_timeouts(&self) -> u32 {
        self.consecutive_timeouts.load(Ordering::Relaxed)
    }

    pub(crate) fn new(
        client: redis::Client,
        config: ConnectionManagerConfig,
        manager: ConnectionManager,
        connect_timeout: std::time::Duration,
        tls: &TlsSettings,
    ) -> Self {
        let info = client.get_connection_info().clone();
        let slot = Arc::new(ManagerSlot {
            client,
            config,
            manager: Mutex::new(manager),
        });
        let weak = Arc::downgrade(&slot);
        let on_server_closed = Arc::new(move || {
            if let Some(slot) = weak.upgrade() {
                slot.replace("the server closed an idle connection");
            }
        });
        let pipe = Pipe::new(&info, connect_timeout, tls, on_server_closed);
        StandaloneConnection {
            slot,
            pipe,
            consecutive_timeouts: AtomicU32::new(0),
        }
    }

    /// Runs `call` on the manager; once more if the manager refused it for want of a
    /// connection (nothing was sent), now awaiting the reconnection that started.
    async fn on_manager<T, F, Fut>(&self, call: F) -> RedisResult<T>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        match call(self.slot.current()).await {
            Err(err) if err.is_connection_refusal() => call(self.slot.current()).await,
            other => other,
        }
    }
}

impl Connection {
    /// Runs a script invocation.
    pub(crate) async fn invoke(&self, inv: &ScriptInvocation<'_>) -> RedisResult<Value> {
        match self {
            Connection::Standalone(conn) => {
                conn.on_manager(|mut m| async move { inv.invoke_async(&mut m).await })
                    .await
            }
            Connection::Cluster(conn) => {
                across_slot_moves(|| {
                    let mut conn = conn.clone();
                    async move { inv.invoke_async(&mut conn).await }
                })
                .await
            }
        }
    }

    /// Runs a plain command.
    pub(crate) async fn exec(&self, cmd: &Cmd) -> RedisResult<()> {
        match self {
            Connection::Standalone(conn) => {
                conn.on_manager(|mut m| async move { cmd.exec_async(&mut m).await })
                    .await
            }
            Connection::Cluster(conn) => {
                across_slot_moves(|| {
                    let mut conn = conn.clone();
                    async move { cmd.exec_async(&mut conn).await }
                })
                .await
            }
        }
    }

    /// Runs a plain command and returns its reply (the cache store's `GET`, `SCAN`, `UNLINK`).
    pub(crate) async fn query(&self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Connection::Standalone(conn) => {
                conn.on_manager(|mut m| async move { cmd.query_async(&mut m).await })
                    .await
            }
            Connection::Cluster(conn) => query_cluster(conn, cmd).await,
        }
    }

    /// Runs a coalesced batch call (an `MGET`, an `independent` or `load_many` script call):
    /// on standalone Redis over the batch connection ([`crate::pipe`]), on a Cluster (or a TLS
    /// address) like [`query`](Self::query).
    pub(crate) async fn query_batch(&self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Connection::Standalone(conn) => match &conn.pipe {
                Some(pipe) => pipe.query(cmd.get_packed_command()).await,
                None => {
                    conn.on_manager(|mut m| async move { cmd.query_async(&mut m).await })
                        .await
                }
            },
            Connection::Cluster(conn) => query_cluster(conn, cmd).await,
        }
    }

    /// [`query_batch`](Self::query_batch) without waiting out a slot move: on a cluster, a
    /// call refused with `TRYAGAIN` (its keys are on two nodes while their slot moves) is
    /// answered with that error at once, for a caller that can split the call by key instead.
    pub(crate) async fn query_batch_once(&self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Connection::Standalone(_) => self.query_batch(cmd).await,
            Connection::Cluster(conn) => {
                match cmd.query_async(&mut conn.clone()).await {
                    // Refused before it ran while the nodes agree on a moved slot's owner:
                    // tried again as usual (a call on keys still apart gets `TRYAGAIN` then).
                    Err(err)
                        if matches!(
                            err.kind(),
                            ErrorKind::Server(ServerErrorKind::Moved | ServerErrorKind::Ask)
                        ) =>
                    {
                        query_cluster(conn, cmd).await
                    }
                    other => other,
                }
            }
        }
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Connection::Cluster(_))
    }

    /// Records that a call got an answer (even an error reply) in time.
    pub(crate) fn answered(&self) {
        if let Connection::Standalone(conn) = self {
            conn.consecutive_timeouts.store(0, Ordering::Relaxed);
        }
    }

    /// Records that a call missed its deadline; replaces a standalone connection that keeps
    /// missing them.
    pub(crate) fn timed_out(&self) {
        let Connection::Standalone(conn) = self else {
            return;
        };
        let timeouts = conn.consecutive_timeouts.fetch_add(1, Ordering::Relaxed) + 1;
        if timeouts < REPLACE_AFTER_TIMEOUTS {
            return;
        }
        conn.consecutive_timeouts.store(0, Ordering::Relaxed);
        if let Some(pipe) = &conn.pipe {
            pipe.reset();
        }
        tracing::warn!(timeouts, "statehouse-redis: Redis stopped answering");
        conn.slot.replace("calls kept missing their deadline");
    }
}

/// A command on the cluster, tried again while a slot move refuses it ([`across_slot_moves`]).
async fn query_cluster(conn: &ClusterConnection, cmd: &Cmd) -> RedisResult<Value> {
    across_slot_moves(|| {
        let mut conn = conn.clone();
        async move { cmd.query_async(&mut conn).await }
    })
    .await
}

/// Runs `call` until it answers something other than a slot-move redirection (`TRYAGAIN`,
/// `MOVED`, `ASK`), for at most [`SLOT_MOVE_PATIENCE`] (then the last one is the answer).
///
/// While a slot moves between nodes, a command on several of its keys, some moved and some not
/// yet, is refused with `TRYAGAIN` until the keys it names are together again; and until every
/// node (and the slot map redis-rs reads back from one of them) agrees on the new owner, a
/// command can bounce between the two with `MOVED`/`ASK`. Each is refused before it runs, so
/// nothing was applied. redis-rs follows redirections and tries again a few times (its retry
/// count is kept low so that an outage is reported fast), which can end before a slot of many
/// keys has moved or the nodes agree. So the call goes on trying here, with short pauses,
/// bounded by its caller's deadline.
async fn across_slot_moves<T, F, Fut>(mut call: F) -> RedisResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = RedisResult<T>>,
{
    let give_up = Instant::now() + SLOT_MOVE_PATIENCE;
    let mut pause = SLOT_MOVE_FIRST_PAUSE;
    loop {
        match call().await {
            Err(err)
                if matches!(
                    err.kind(),
                    ErrorKind::Server(
                        ServerErrorKind::TryAgain | ServerErrorKind::Moved | ServerErrorKind::Ask
                    )
                ) && Instant::now() + pause < give_up =>
            {
                tracing::debug!(error = %err, "statehouse-redis: a slot is moving; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(SLOT_MOVE_MAX_PAUSE);
            }
            other => return other,
        }
    }
}
