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
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Value};
use statehouse_core::cache::{Invalidation, InvalidationSink, InvalidationSubscription};
use statehouse_core::{Error, Result};
use tokio::task::JoinHandle;

use crate::builder::RedisTopology;
use crate::cache::RedisCacheStore;
use crate::cache_nodes::text;
use crate::error::from_redis;
use crate::link::TlsSettings;

/// How often the listener checks that its connection still answers.
pub(crate) const PING_EVERY: Duration = Duration::from_secs(1);
/// How often a listener on Redis Cluster asks the node it is subscribed on for the cluster's
/// nodes.
const REFRESH_EVERY: Duration = Duration::from_secs(30);
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

/// A node the listener may subscribe on: its address (`host:port`, also its name in logs) and
/// a client for it.
type Candidate = (String, redis::Client);

/// Where the listener may subscribe, and how long one attempt may take.
///
/// On Redis Cluster the list is the configured nodes (always kept) and every node, master or
/// replica, that the cluster last described (`CLUSTER SLOTS`, asked of a node that answers):
/// at subscription, every [`REFRESH_EVERY`] while subscribed (asking the node subscribed on),
/// and after every loss, so that a listener follows a cluster whose nodes are replaced one by
/// one even when none of the configured ones is left.
struct Nodes {
    seeds: Vec<Candidate>,
    /// The nodes the cluster last described, seeds excluded.
    discovered: Vec<Candidate>,
    /// A seed's connection settings (credentials, database, TLS), for a discovered node;
    /// `None` on standalone Redis, which has nothing to discover.
    template: Option<ConnectionInfo>,
    tls: TlsSettings,
    /// The address of the node tried last (`None` before the first try).
    last: Option<String>,
    timeout: Duration,
    channel: String,
}

impl Nodes {
    /// Every candidate in the order tried, starting with the one after the last tried
    /// (`after_last`) or with the last tried itself.
    fn order(&self, after_last: bool) -> Vec<&Candidate> {
        let all: Vec<&Candidate> = self.seeds.iter().chain(&self.discovered).collect();
        let start = self
            .last
            .as_ref()
            .and_then(|last| all.iter().position(|(name, _)| name == last))
            .map_or(0, |i| if after_last { i + 1 } else { i });
        let mut ordered = Vec::with_capacity(all.len());
        for k in 0..all.len() {
            ordered.push(all[(start + k) % all.len()]);
        }
        ordered
    }

    /// Tries every node once, starting after the last one tried.
    async fn connect_any(&mut self) -> Result<(PubSubSink, PubSubStream)> {
        let mut last_error = None;
        let mut tried = None;
        let mut connected = None;
        for (name, client) in self.order(true) {
            tried = Some(name.clone());
            match connect(client, &self.channel, self.timeout).await {
                Ok(conn) => {
                    connected = Some(conn);
                    break;
                }
                Err(err) => {
                    tracing::debug!(node = %name, error = %err, "statehouse-redis: invalidation channel: subscribing failed");
                    last_error = Some(err);
                }
            }
        }
        if tried.is_some() {
            self.last = tried;
        }
        connected.ok_or_else(|| {
            last_error.unwrap_or_else(|| Error::Unavailable {
                message: "no Redis node to subscribe on".into(),
                source: None,
            })
        })
    }

    /// Asks the nodes in turn (from the last tried, or from the one after it) for the
    /// cluster's nodes, and makes the first answer the discovered list. A node that does not
    /// answer within the call timeout is passed over; when none answers, the list stays as it
    /// was. Nothing to do on standalone Redis.
    async fn refresh(&mut self, after_last: bool) {
        let Some(template) = &self.template else {
            return;
        };
        let mut found = None;
        for (name, client) in self.order(after_last) {
            match cluster_nodes(client, self.timeout).await {
                Ok(addresses) => {
                    found = Some(addresses);
                    break;
                }
                Err(err) => {
                    tracing::debug!(node = %name, error = %err, "statehouse-redis: invalidation channel: CLUSTER SLOTS failed")
                }
            }
        }
        let Some(addresses) = found else { return };
        let mut discovered: Vec<Candidate> = Vec::with_capacity(addresses.len());
        for (host, port) in addresses {
            if let Some((name, client)) = candidate(template, &self.tls, host, port)
                && !self.seeds.iter().any(|(seed, _)| *seed == name)
                && !discovered.iter().any(|(known, _)| *known == name)
            {
                discovered.push((name, client));
            }
        }
        self.discovered = discovered;
    }
}

/// A client for `host:port` with `template`'s settings (TLS or not, credentials, database).
fn candidate(
    template: &ConnectionInfo,
    tls: &TlsSettings,
    host: String,
    port: u16,
) -> Option<Candidate> {
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
    let client = tls.client(info).ok()?;
    Some((name, client))
}

/// Every node of the cluster, as `client`'s node describes it in `CLUSTER SLOTS`.
async fn cluster_nodes(client: &redis::Client, timeout: Duration) -> Result<Vec<(String, u16)>> {
    let host = match client.get_connection_info().addr() {
        ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => host.clone(),
        _ => String::new(),
    };
    let ask = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async::<Value>(&mut conn)
            .await
    };
    match tokio::time::timeout(timeout, ask).await {
        Ok(Ok(reply)) => Ok(slot_nodes(&reply, &host)),
        Ok(Err(err)) => Err(from_redis(err, timeout)),
        Err(_) => Err(Error::Timeout { deadline: timeout }),
    }
}

/// The nodes in a `CLUSTER SLOTS` reply, masters and replicas, each once, in the order they
/// first appear. An empty host means the node asked (`asked_host`); a node whose address is
/// unknown (`?`) or an entry that is not `[host, port, …]` is left out.
fn slot_nodes(reply: &Value, asked_host: &str) -> Vec<(String, u16)> {
    let mut nodes: Vec<(String, u16)> = Vec::new();
    let Value::Array(ranges) = reply else {
        return nodes;
    };
    for range in ranges {
        let Value::Array(fields) = range else {
            continue;
        };
        // [first slot, last slot, master, replica, …]
        for node in fields.iter().skip(2) {
            let Value::Array(node) = node else { continue };
            let (Some(host), Some(Value::Int(port))) = (node.first().and_then(text), node.get(1))
            else {
                continue;
            };
            let Ok(port) = u16::try_from(*port) else {
                continue;
            };
            if host == "?" || port == 0 {
                continue;
            }
            let host = if host.is_empty() {
                asked_host.to_owned()
            } else {
                host
            };
            if !host.is_empty() && !nodes.iter().any(|(h, p)| *h == host && *p == port) {
                nodes.push((host, port));
            }
        }
    }
    nodes
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

    /// The nodes a listener may subscribe on: the configured ones and, on Redis Cluster,
    /// every node the cluster describes (a failure to ask only leaves the configured ones).
    async fn nodes(&self) -> Result<Nodes> {
        let link = &self.inner.link;
        let mut nodes = Nodes {
            seeds: Vec::new(),
            discovered: Vec::new(),
            template: None,
            tls: link.tls.clone(),
            last: None,
            timeout: link.call_timeout,
            channel: self.inner.channel.clone(),
        };
        match &link.topology {
            RedisTopology::Standalone(url) => {
                let client = link.tls.client(url.as_str()).map_err(invalid_url)?;
                let name = client.get_connection_info().addr().to_string();
                nodes.seeds.push((name, client));
            }
            RedisTopology::Cluster(urls) => {
                for url in urls {
                    let info = url.as_str().into_connection_info().map_err(invalid_url)?;
                    let client = link.tls.client(info.clone()).map_err(invalid_url)?;
                    let name = info.addr().to_string();
                    if !nodes.seeds.iter().any(|(seed, _)| *seed == name) {
                        nodes.seeds.push((name, client));
                    }
                    nodes.template.get_or_insert(info);
                }
                // One call timeout for the whole discovery, however many seeds stay silent:
                // without an answer the seeds alone are tried.
                let timeout = link.call_timeout;
                let _ = tokio::time::timeout(timeout, nodes.refresh(false)).await;
            }
        }
        if nodes.seeds.is_empty() {
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
        deliver(&mut nodes, &mut ping, &mut messages, &*sink, &malformed).await;
        sink.on_channel_down();
        tracing::warn!("statehouse-redis: the cache invalidation channel was lost; reconnecting");
        let mut pause = RETRY_FIRST;
        (ping, messages) = loop {
            tokio::time::sleep(pause).await;
            // The loss may be the node's replacement: ask the cluster what nodes it has now.
            nodes.refresh(true).await;
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

/// Delivers messages until the stream ends or a `PING` goes unanswered; refreshes the node
/// list every [`REFRESH_EVERY`].
async fn deliver(
    nodes: &mut Nodes,
    ping: &mut PubSubSink,
    messages: &mut PubSubStream,
    sink: &dyn InvalidationSink,
    malformed: &AtomicU64,
) {
    let timeout = nodes.timeout;
    let refresh_ticks = (REFRESH_EVERY.as_millis() / PING_EVERY.as_millis()).max(1);
    let mut tick: u128 = 0;
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
                    Ok(Ok(_)) => {
                        tick += 1;
                        if tick.is_multiple_of(refresh_ticks) {
                            nodes.refresh(false).await;
                        }
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"0123456789abcdef".to_vec()),
        ])
    }

    fn range(first: i64, last: i64, nodes: Vec<Value>) -> Value {
        let mut fields = vec![Value::Int(first), Value::Int(last)];
        fields.extend(nodes);
        Value::Array(fields)
    }

    #[test]
    fn slot_nodes_lists_masters_and_replicas_once_each() {
        let reply = Value::Array(vec![
            range(
                0,
                5460,
                vec![node("10.0.0.1", 7000), node("10.0.0.4", 7003)],
            ),
            range(5461, 10922, vec![node("10.0.0.2", 7001)]),
            range(
                10923,
                12000,
                vec![node("10.0.0.3", 7002), node("10.0.0.1", 7000)],
            ),
            range(12001, 16383, vec![node("10.0.0.3", 7002)]),
        ]);
        assert_eq!(
            slot_nodes(&reply, "seed"),
            vec![
                ("10.0.0.1".to_owned(), 7000),
                ("10.0.0.4".to_owned(), 7003),
                ("10.0.0.2".to_owned(), 7001),
                ("10.0.0.3".to_owned(), 7002),
            ]
        );
    }

    #[test]
    fn slot_nodes_reads_an_empty_host_as_the_node_asked_and_skips_unknown_ones() {
        let reply = Value::Array(vec![range(
            0,
            16383,
            vec![node("", 7000), node("?", 7001), node("10.0.0.9", 0)],
        )]);
        assert_eq!(slot_nodes(&reply, "seed"), vec![("seed".to_owned(), 7000)]);
        assert_eq!(slot_nodes(&reply, ""), Vec::<(String, u16)>::new());
    }

    #[test]
    fn slot_nodes_ignores_what_is_not_a_slot_table() {
        let malformed = [
            Value::Nil,
            Value::Int(3),
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![range(0, 1, vec![Value::Nil, Value::Int(7)])]),
            Value::Array(vec![range(
                0,
                1,
                vec![Value::Array(vec![Value::BulkString(b"h".to_vec())])],
            )]),
            Value::Array(vec![range(0, 1, vec![node("h", 70_000), node("h", -1)])]),
            Value::Array(vec![range(
                0,
                1,
                vec![Value::Array(vec![
                    Value::BulkString(vec![0xff, 0xfe]),
                    Value::Int(7000),
                ])],
            )]),
        ];
        for reply in &malformed {
            assert_eq!(
                slot_nodes(reply, "seed"),
                Vec::<(String, u16)>::new(),
                "{reply:?}"
            );
        }
    }
}
