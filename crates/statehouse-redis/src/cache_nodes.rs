//! The cache store's operations that address every master rather than one key: the prefix
//! purge and the memory report.
//!
//! On Redis Cluster, redis-rs routes a command to one node with
//! `ClusterConnection::route_command` and `SingleNodeRoutingInfo::ByAddress`, and to every
//! primary with `MultipleNodeRoutingInfo::AllMasters` (no response policy: the reply is a map
//! of `"host:port"` to each node's answer). The primaries are learnt from the client's own slot
//! map that way (a `PING` to all of them), so no `CLUSTER SHARDS` parsing is needed.

use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Value};
use statehouse_core::cache::{
    Invalidation, MAX_CACHE_KEY_BYTES, MemoryRisk, MemorySettings, assess_memory,
};
use statehouse_core::{Error, Result};

use crate::cache::RedisCacheStore;
use crate::cluster_topology::{SlotPicture, slots_to_recheck};
use crate::connection::Connection;
use crate::error::unexpected_reply;
use crate::hash_slot::hash_slot;

/// Keys asked of each `SCAN` call. A hint to the server: large enough to cross a big keyspace
/// in few round trips, small enough that one call never blocks the server noticeably.
const SCAN_COUNT: u64 = 1000;

/// Escapes the characters Redis glob patterns give a meaning to (`* ? [ ] \`), so `text`
/// matches only itself.
pub(crate) fn glob_escape(text: &str, out: &mut String) {
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// A master, as redis-rs names it in a cluster (`host:port`).
#[derive(Debug, Clone)]
struct Node {
    host: String,
    port: u16,
}

impl Node {
    fn parse(address: &str) -> Result<Node> {
        address
            .rsplit_once(':')
            .and_then(|(host, port)| {
                Some(Node {
                    host: host.to_owned(),
                    port: port.parse().ok()?,
                })
            })
            .ok_or_else(|| unexpected_reply(format!("a cluster node address {address:?}")))
    }
}

pub(crate) fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

impl RedisCacheStore {
    /// Runs a plain command through the store's connection within the call deadline.
    async fn query(&self, cmd: &Cmd) -> Result<Value> {
        let link = &self.inner.link;
        link.bounded(self.deadline(), link.conn.query(cmd)).await
    }

    /// Runs `cmd` on every master: `(node name, answer)`, where an answer the server refused
    /// (an error reply: `CONFIG` disabled, `NOPERM`) is `None`. An outage is an error.
    async fn on_every_master(&self, cmd: Cmd) -> Result<Vec<(String, Option<Value>)>> {
        let link = &self.inner.link;
        match &link.conn {
            Connection::Standalone(_) => {
                let name = self.standalone_name();
                match link.bounded(self.deadline(), link.conn.query(&cmd)).await {
                    Ok(value) => Ok(vec![(name, Some(value))]),
                    Err(err) if err.is_unavailable() => Err(err),
                    Err(_) => Ok(vec![(name, None)]),
                }
            }
            Connection::Cluster(conn) => {
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                let reply = link
                    .bounded(self.deadline(), conn.clone().route_command(cmd, routing))
                    .await?;
                let Value::Map(entries) = reply else {
                    return Err(unexpected_reply(format!(
                        "a command to every master answered {reply:?}"
                    )));
                };
                let mut out = Vec::with_capacity(entries.len());
                for (node, value) in entries {
                    let node = text(&node)
                        .ok_or_else(|| unexpected_reply(format!("a node name {node:?}")))?;
                    let value = match value {
                        Value::ServerError(_) => None,
                        other => Some(other),
                    };
                    out.push((node, value));
                }
                out.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(out)
            }
        }
    }

    /// Runs `cmd` on one cluster node within the call deadline (on standalone Redis, on the
    /// server).
    async fn on_node(&self, node: &Node, cmd: Cmd) -> Result<Value> {
        let link = &self.inner.link;
        match &link.conn {
            Connection::Cluster(conn) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: node.host.clone(),
                    port: node.port,
                });
                link.bounded(self.deadline(), conn.clone().route_command(cmd, routing))
                    .await
            }
            Connection::Standalone(_) => self.query(&cmd).await,
        }
    }

    /// The standalone server's `host:port` (never the URL: it may hold a password).
    fn standalone_name(&self) -> String {
        match &self.inner.link.topology {
            crate::RedisTopology::Standalone(url) => redis::Client::open(url.as_str())
                .map(|c| c.get_connection_info().addr().to_string())
                .unwrap_or_else(|_| "standalone".to_owned()),
            _ => "standalone".to_owned(),
        }
    }

    /// `purge_prefix`: see [`RedisCacheStore`]'s docs.
    pub(crate) async fn purge(&self, prefix: &str) -> Result<u64> {
        if prefix.len() > MAX_CACHE_KEY_BYTES {
            return Err(Error::InvalidInput(format!(
                "a purge prefix must be at most {MAX_CACHE_KEY_BYTES} bytes"
            )));
        }
        let mut pattern = String::with_capacity(self.inner.prefix.len() + prefix.len() + 8);
        glob_escape(&self.inner.prefix, &mut pattern);
        pattern.push_str("c:{=");
        glob_escape(prefix, &mut pattern);
        pattern.push('*');

        let outcome = match &self.inner.link.conn {
            Connection::Standalone(_) => self.purge_node(None, &pattern).await,
            Connection::Cluster(_) => {
                let mut raw = String::with_capacity(self.inner.prefix.len() + prefix.len() + 4);
                raw.push_str(&self.inner.prefix);
                raw.push_str("c:{=");
                raw.push_str(prefix);
                self.purge_cluster(&pattern, raw.as_bytes()).await
            }
        };
        // Every replica drops the prefix from its near cache, also after a purge that stopped
        // short (what it deleted is gone).
        let message = Invalidation::Prefix(prefix.to_owned()).encode();
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(&self.inner.channel).arg(message);
        let published = self.query(&publish).await;
        let deleted = outcome?;
        published?;
        Ok(deleted)
    }

    /// The purge on a cluster: every master scanned at once, between two pictures of the
    /// slots (see [`crate::cluster_topology`]). A key moves only with its slot, so the keys of
    /// every slot that was moving in either picture or changed owner between them are then
    /// listed on the nodes involved, the source first (`CLUSTER GETKEYSINSLOT`), and the
    /// prefix's unlinked: a key that moved past the scans is found where it went.
    async fn purge_cluster(&self, pattern: &str, raw_prefix: &[u8]) -> Result<u64> {
        let before = self.slot_picture().await?;
        let masters = self
            .on_every_master(redis::cmd("PING"))
            .await?
            .into_iter()
            .map(|(name, _)| Node::parse(&name))
            .collect::<Result<Vec<_>>>()?;
        let scans = masters
            .into_iter()
            .map(|node| self.purge_node(Some(node), pattern));
        let mut deleted = futures::future::try_join_all(scans)
            .await?
            .into_iter()
            .sum::<u64>();
        let after = self.slot_picture().await?;
        for (slot, nodes) in slots_to_recheck(&before, &after) {
            for node in nodes {
                deleted += self.purge_slot(slot, &node, raw_prefix).await?;
            }
        }
        Ok(deleted)
    }

    /// The cluster's slots as its masters describe themselves (`CLUSTER NODES`). A master that
    /// refuses the command (an ACL) is left out of the picture.
    async fn slot_picture(&self) -> Result<SlotPicture> {
        let mut nodes = redis::cmd("CLUSTER");
        nodes.arg("NODES");
        let replies = self.on_every_master(nodes).await?;
        let texts: Vec<String> = replies
            .iter()
            .filter_map(|(_, reply)| reply.as_ref().and_then(text))
            .collect();
        Ok(SlotPicture::from_nodes_replies(
            texts.iter().map(String::as_str),
        ))
    }

    /// Unlinks the keys of `slot` on the node at `address` that start with `raw_prefix`
    /// (values and leases); the number of values unlinked. A node the picture names only by
    /// its id (unknown to the master that reported the move) is skipped.
    async fn purge_slot(&self, slot: u16, address: &str, raw_prefix: &[u8]) -> Result<u64> {
        let Ok(node) = Node::parse(address) else {
            return Ok(0);
        };
        let on_node = |cmd: Cmd| self.on_node(&node, cmd);
        let mut count = redis::cmd("CLUSTER");
        count.arg("COUNTKEYSINSLOT").arg(slot);
        let n = match on_node(count).await? {
            Value::Int(n) => n,
            other => {
                return Err(unexpected_reply(format!(
                    "CLUSTER COUNTKEYSINSLOT answered {other:?}"
                )));
            }
        };
        if n <= 0 {
            return Ok(0);
        }
        let mut list = redis::cmd("CLUSTER");
        // A few more than counted, for keys written in between.
        list.arg("GETKEYSINSLOT").arg(slot).arg(n + 16);
        let Value::Array(keys) = on_node(list).await? else {
            return Err(unexpected_reply(
                "CLUSTER GETKEYSINSLOT answered a non-array",
            ));
        };
        let keys: Vec<Vec<u8>> = keys
            .into_iter()
            .filter_map(|key| match key {
                Value::BulkString(key) if key.starts_with(raw_prefix) => Some(key),
                _ => None,
            })
            .collect();
        self.unlink(keys).await
    }

    /// Scans one node (`None`: the standalone server) and unlinks what matches; returns the
    /// number of values (not leases) deleted.
    async fn purge_node(&self, node: Option<Node>, pattern: &str) -> Result<u64> {
        let link = &self.inner.link;
        let mut cursor = 0u64;
        let mut deleted = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let reply = match &node {
                Some(node) if link.conn.is_cluster() => self.on_node(node, scan).await?,
                _ => self.query(&scan).await?,
            };
            let (next, keys) = parse_scan(reply)?;
            deleted += self.unlink(keys).await?;
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// Unlinks `keys` (one `UNLINK` per slot on a cluster); returns how many values were
    /// unlinked. Values and leases are told apart by their last byte (a value's name ends with
    /// the `}` of its tag, a lease's with `:lease`). Counting `UNLINK`'s replies, not the
    /// scanned names, counts a key `SCAN` returned twice once.
    async fn unlink(&self, keys: Vec<Vec<u8>>) -> Result<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        let cluster = self.inner.link.conn.is_cluster();
        // (slot, is a value, keys)
        let mut groups: Vec<(u16, bool, Cmd)> = Vec::new();
        for key in keys {
            let slot = if cluster { hash_slot(&key) } else { 0 };
            let is_value = key.last() == Some(&b'}');
            match groups
                .iter_mut()
                .find(|(s, v, _)| *s == slot && *v == is_value)
            {
                Some((_, _, cmd)) => {
                    cmd.arg(key);
                }
                None => {
                    let mut cmd = redis::cmd("UNLINK");
                    cmd.arg(key);
                    groups.push((slot, is_value, cmd));
                }
            }
        }
        let calls = groups.iter().map(|(_, is_value, cmd)| async move {
            let reply = self.query(cmd).await?;
            match reply {
                Value::Int(n) if *is_value => Ok(u64::try_from(n).unwrap_or(0)),
                Value::Int(_) => Ok(0),
                other => Err(unexpected_reply(format!("UNLINK answered {other:?}"))),
            }
        });
        Ok(futures::future::try_join_all(calls)
            .await?
            .into_iter()
            .sum())
    }

    /// The memory and persistence settings of every master (one on standalone), by node name
    /// (`host:port`), sorted by name. A setting the server refuses to tell (managed services
    /// often disable `CONFIG`) is `None`; an outage is an error.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), statehouse_core::Error> {
    /// let cache = statehouse_redis::RedisStore::connect("redis://127.0.0.1:6379")
    ///     .await?
    ///     .cache_store();
    /// for (node, settings) in cache.memory_settings().await? {
    ///     println!("{node}: maxmemory-policy {:?}", settings.maxmemory_policy);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn memory_settings(&self) -> Result<Vec<(String, MemorySettings)>> {
        let config = |name: &str| {
            let mut cmd = redis::cmd("CONFIG");
            cmd.arg("GET").arg(name);
            self.on_every_master(cmd)
        };
        let info = |section: &str| {
            let mut cmd = redis::cmd("INFO");
            cmd.arg(section);
            self.on_every_master(cmd)
        };
        let (maxmemory, policy, save, appendonly, memory, stats) = futures::try_join!(
            config("maxmemory"),
            config("maxmemory-policy"),
            config("save"),
            config("appendonly"),
            info("memory"),
            info("stats"),
        )?;
        let mut nodes: Vec<(String, MemorySettings)> = Vec::new();
        let mut entry = |node: String| -> usize {
            match nodes.iter().position(|(n, _)| *n == node) {
                Some(i) => i,
                None => {
                    nodes.push((node, MemorySettings::default()));
                    nodes.len() - 1
                }
            }
        };
        let mut slots: Vec<(usize, &'static str, Option<Value>)> = Vec::new();
        for (what, answers) in [
            ("maxmemory", maxmemory),
            ("maxmemory-policy", policy),
            ("save", save),
            ("appendonly", appendonly),
            ("memory", memory),
            ("stats", stats),
        ] {
            for (node, value) in answers {
                slots.push((entry(node), what, value));
            }
        }
        for (i, what, value) in slots {
            let settings = &mut nodes[i].1;
            let Some(value) = value else { continue };
            match what {
                "maxmemory" => {
                    settings.maxmemory = config_value(&value).and_then(|v| v.parse().ok())
                }
                "maxmemory-policy" => settings.maxmemory_policy = config_value(&value),
                "save" => settings.save = config_value(&value),
                "appendonly" => {
                    settings.appendonly =
                        config_value(&value).map(|v| v.eq_ignore_ascii_case("yes"))
                }
                "memory" => settings.used_memory = info_field(&value, "used_memory"),
                _ => settings.evicted_keys = info_field(&value, "evicted_keys"),
            }
        }
        nodes.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(nodes)
    }

    /// [`assess_memory`] of every master's [`memory_settings`](Self::memory_settings): the
    /// findings per node, for a `doctor` command or a startup check. `shares_with_sessions`:
    /// whether sessions (or rate limits) live on the same instance.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), statehouse_core::Error> {
    /// use statehouse_core::cache::RiskLevel;
    /// let cache = statehouse_redis::RedisStore::connect("redis://127.0.0.1:6379")
    ///     .await?
    ///     .cache_store();
    /// for (node, risk) in cache.memory_report(true).await? {
    ///     if risk.level == RiskLevel::Critical {
    ///         eprintln!("{node}: {}: {}", risk.code, risk.message);
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn memory_report(
        &self,
        shares_with_sessions: bool,
    ) -> Result<Vec<(String, MemoryRisk)>> {
        Ok(self
            .memory_settings()
            .await?
            .into_iter()
            .flat_map(|(node, settings)| {
                assess_memory(&settings, shares_with_sessions)
                    .into_iter()
                    .map(move |risk| (node.clone(), risk))
            })
            .collect())
    }
}

/// The value of a one-parameter `CONFIG GET` reply (`[name, value]`, or a map on RESP3);
/// `None` when the parameter is unknown to the server.
fn config_value(value: &Value) -> Option<String> {
    match value {
        Value::Array(items) if items.len() == 2 => text(&items[1]),
        Value::Map(entries) if entries.len() == 1 => text(&entries[0].1),
        _ => None,
    }
}

/// A numeric field of an `INFO` section (`name:value` lines).
fn info_field(value: &Value, name: &str) -> Option<u64> {
    let body = text(value)?;
    body.lines().find_map(|line| {
        let (field, v) = line.trim_end().split_once(':')?;
        (field == name).then(|| v.parse().ok()).flatten()
    })
}

/// `[cursor, [key, ...]]`.
fn parse_scan(reply: Value) -> Result<(u64, Vec<Vec<u8>>)> {
    let Value::Array(mut items) = reply else {
        return Err(unexpected_reply(format!("SCAN answered {reply:?}")));
    };
    if items.len() != 2 {
        return Err(unexpected_reply("SCAN answered an array not of two items"));
    }
    let keys = items.pop();
    let cursor = items.pop();
    let cursor = cursor
        .as_ref()
        .and_then(text)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| unexpected_reply("SCAN's cursor is not a number"))?;
    let keys = match keys {
        Some(Value::Array(keys)) => keys
            .into_iter()
            .map(|k| match k {
                Value::BulkString(b) => Ok(b),
                other => Err(unexpected_reply(format!("SCAN returned a key {other:?}"))),
            })
            .collect::<Result<Vec<_>>>()?,
        other => return Err(unexpected_reply(format!("SCAN's keys: {other:?}"))),
    };
    Ok((cursor, keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_are_escaped() {
        let mut out = String::new();
        glob_escape("a*[?]\\{x}:", &mut out);
        assert_eq!(out, "a\\*\\[\\?\\]\\\\{x}:");
    }

    #[test]
    fn info_and_config_replies_parse() {
        let info =
            Value::BulkString(b"# Memory\r\nused_memory:1024\r\nused_memory_human:1K\r\n".to_vec());
        assert_eq!(info_field(&info, "used_memory"), Some(1024));
        assert_eq!(info_field(&info, "evicted_keys"), None);
        let config = Value::Array(vec![
            Value::BulkString(b"maxmemory-policy".to_vec()),
            Value::BulkString(b"allkeys-lru".to_vec()),
        ]);
        assert_eq!(config_value(&config).as_deref(), Some("allkeys-lru"));
        assert_eq!(config_value(&Value::Array(vec![])), None);
        assert!(parse_scan(Value::Array(vec![Value::Int(0)])).is_err());
        let (cursor, keys) = parse_scan(Value::Array(vec![
            Value::BulkString(b"17".to_vec()),
            Value::Array(vec![Value::BulkString(b"k".to_vec())]),
        ]))
        .expect("test step");
        assert_eq!((cursor, keys), (17, vec![b"k".to_vec()]));
        assert!(Node::parse("::1:7000").is_ok_and(|n| n.host == "::1" && n.port == 7000));
        assert!(Node::parse("nohost").is_err());
    }
}
