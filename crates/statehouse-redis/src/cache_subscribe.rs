//! The invalidation channel's listener: one background task per subscription.
//!
//! # Why a dedicated Pub/Sub connection (and not RESP3 pushes)
//!
//! Each subscription opens its own RESP2 Pub/Sub connection with redis-rs's
//! `Client::get_async_pubsub` and runs it in a task of its own. Its life is explicit: the
//! message stream *ends* when the connection is lost, which is exactly when the sink must hear
//! `on_channel_down` (its near cache can no longer trust itself), and the task alone decides
//! when the channel is up again, after its `SUBSCRIBE` is confirmed. RESP3 pushes on the shared
//! data connection were rejected: the `ConnectionManager` resubscribes silently on reconnect,
//! so a near cache would never learn that messages were lost in between; every data call would
//! share its socket with invalidation traffic; and RESP3 rules out older servers and some
//! proxies. A Pub/Sub connection costs one socket per subscription, and a process normally has
//! one.
//!
//! # Liveness
//!
//! A connection that silently stops answering (a partitioned network) reports nothing for
//! minutes. Every [`PING_EVERY`] the task sends a `PING` on the Pub/Sub connection itself;
//! no answer within the store's call timeout counts as a lost channel.
//!
//! # Reconnection
//!
//! After a loss the task tries again after 50 ms, doubling up to 2 s, until a `SUBSCRIBE` is
//! confirmed, then calls `on_channel_up` (a near cache flushes again: messages published while
//! it was down are lost). On Redis Cluster a classic `PUBLISH` reaches every node, so one node
//! is enough; the task tries the nodes in turn (the configured ones, then every master the
//! cluster client knew when the subscription was made), starting after the one that failed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use redis::{ConnectionAddr, IntoConnectionInfo, Value};
use statehouse_core::cache::{Invalidation, InvalidationSink, InvalidationSubscription};
use statehouse_core::{Error, Result};
use tokio::task::JoinHandle;

use crate::builder::RedisTopology;
use crate::cache::RedisCacheStore;
use crate::error::from_redis;

/// How often the listener checks that its connection still answers.
pub(crate) const PING_EVERY: Duration = Duration::from_secs(1);
/// The first pause before a reconnection attempt.
const RETRY_FIRST: Duration = Duration::from_millis(50);
/// The longest pause between reconnection attempts.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Aborts the listener task when the subscription is dropped. The task's future owns the sink
/// and the connection, so both are released at once.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where the listener may subscribe, and how long one attempt may take.
struct Nodes {
    clients: Vec<(String, redis::Client)>,
    /// The index of the node tried last (`usize::MAX` before the first try, so that the
    /// first node is tried first).
    last: usize,
    timeout: Duration,
    channel: String,
}

impl Nodes {
    /// Tries every node once, starting after the last one tried.
    async fn connect_any(&mut self) -> Result<(PubSubSink, PubSubStream)> {
        let mut last_error = None;
        for step in 1..=self.clients.len() {
            let i = self.last.wrapping_add(step) % self.clients.len();
            self.last = i;
            let (name, client) = &self.clients[i];
            match connect(client, &self.channel, self.timeout).await {
                Ok(conn) => return Ok(conn),
                Err(err) => {
                    tracing::debug!(node = %name, error = %err, "statehouse-redis: invalidation channel: subscribing failed");
                    last_error = Some(err);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| Error::Unavailable {
            message: "no Redis node to subscribe on".into(),
            source: None,
        }))
    }

    fn add(&mut self, name: String, client: redis::Client) {
        if !self.clients.iter().any(|(n, _)| *n == name) {
            self.clients.push((name, client));
        }
    }
}

/// Opens a Pub/Sub connection and subscribes, within `timeout`.
async fn connect(
    client: &redis::Client,
    channel: &str,
    timeout: Duration,
) -> Result<(PubSubSink, PubSubStream)> {
    let attempt = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok::<_, redis::RedisError>(pubsub.split())
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result.map_err(|e| from_redis(e, timeout)),
        Err(_) => Err(Error::Timeout { deadline: timeout }),
    }
}

fn invalid_url(err: redis::RedisError) -> Error {
    // The URL itself is not repeated: it may carry a password.
    Error::InvalidInput(format!("invalid Redis URL: {err}"))
}

impl RedisCacheStore {
    /// `subscribe`: connects and subscribes (returning an error if no node accepts within the
    /// call timeout), calls `on_channel_up`, then hands the connection to the listener task.
    pub(crate) async fn listen(
        &self,
        sink: Arc<dyn InvalidationSink>,
    ) -> Result<InvalidationSubscription> {
        let mut nodes = self.nodes().await?;
        let (ping, messages) = nodes.connect_any().await?;
        sink.on_channel_up();
        let malformed = Arc::clone(&self.inner.malformed);
        let task = tokio::spawn(run(nodes, sink, malformed, ping, messages));
        Ok(InvalidationSubscription::new(AbortOnDrop(task)))
    }

    /// The nodes a listener may subscribe on.
    async fn nodes(&self) -> Result<Nodes> {
        let link = &self.inner.link;
        let mut nodes = Nodes {
            clients: Vec::new(),
            last: usize::MAX,
            timeout: link.call_timeout,
            channel: self.inner.channel.clone(),
        };
        match &link.topology {
            RedisTopology::Standalone(url) => {
                let client = link.tls.client(url.as_str()).map_err(invalid_url)?;
                let name = client.get_connection_info().addr().to_string();
                nodes.add(name, client);
            }
            RedisTopology::Cluster(urls) => {
                let mut template = None;
                for url in urls {
                    let info = url.as_str().into_connection_info().map_err(invalid_url)?;
                    let client = link.tls.client(info.clone()).map_err(invalid_url)?;
                    nodes.add(info.addr().to_string(), client);
                    template.get_or_insert(info);
                }
                // Every master the cluster client knows, with the seeds' credentials and TLS
                // settings; a failure here only leaves the seeds to try.
                if let Some(template) = template {
                    match self.cluster_masters().await {
                        Ok(masters) => {
                            for (host, port) in masters {
                                let addr = match template.addr() {
                                    ConnectionAddr::TcpTls {
                                        insecure,
                                        tls_params,
                                        ..
                                    } => ConnectionAddr::TcpTls {
                                        host,
                                        port,
                                        insecure: *insecure,
                                        tls_params: tls_params.clone(),
                                    },
                                    _ => ConnectionAddr::Tcp(host, port),
                                };
                                let info = template.clone().set_addr(addr);
                                let name = info.addr().to_string();
                                if let Ok(client) = link.tls.client(info) {
                                    nodes.add(name, client);
                                }
                            }
                        }
                        Err(err) => tracing::debug!(
                            error = %err,
                            "statehouse-redis: could not list the cluster's masters; \
                             subscribing through the configured nodes only"
                        ),
                    }
                }
            }
        }
        if nodes.clients.is_empty() {
            return Err(Error::InvalidInput(
                "a Redis topology needs at least one node URL".into(),
            ));
        }
        Ok(nodes)
    }
}

/// The listener task: delivers messages until the connection is lost, then reports it and
/// reconnects, forever (until aborted by dropping the subscription).
async fn run(
    mut nodes: Nodes,
    sink: Arc<dyn InvalidationSink>,
    malformed: Arc<AtomicU64>,
    mut ping: PubSubSink,
    mut messages: PubSubStream,
) {
    loop {
        deliver(&mut ping, &mut messages, &*sink, &malformed, nodes.timeout).await;
        sink.on_channel_down();
        tracing::warn!("statehouse-redis: the cache invalidation channel was lost; reconnecting");
        let mut pause = RETRY_FIRST;
        (ping, messages) = loop {
            tokio::time::sleep(pause).await;
            match nodes.connect_any().await {
                Ok(conn) => break conn,
                Err(err) => {
                    tracing::debug!(error = %err, "statehouse-redis: invalidation channel still down");
                    pause = (pause * 2).min(RETRY_MAX);
                }
            }
        };
        tracing::info!("statehouse-redis: the cache invalidation channel is back");
        sink.on_channel_up();
    }
}

/// Delivers messages until the stream ends or a `PING` goes unanswered.
async fn deliver(
    ping: &mut PubSubSink,
    messages: &mut PubSubStream,
    sink: &dyn InvalidationSink,
    malformed: &AtomicU64,
    timeout: Duration,
) {
    let mut ticks = tokio::time::interval(PING_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; the connection was just proven alive.
    ticks.tick().await;
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else { return };
                match Invalidation::decode(message.get_payload_bytes()) {
                    Ok(invalidation) => sink.on_invalidation(&invalidation),
                    Err(err) => {
                        malformed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %err, "statehouse-redis: skipped a malformed invalidation message");
                    }
                }
            }
            _ = ticks.tick() => {
                match tokio::time::timeout(timeout, ping.ping::<Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => {
                        tracing::debug!(error = %err, "statehouse-redis: invalidation channel PING failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("statehouse-redis: invalidation channel PING unanswered");
                        return;
                    }
                }
            }
        }
    }
}
