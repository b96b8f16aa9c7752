//! A Redis Cluster made of harness-managed [`RedisServer`] nodes.

use std::fs::File;
use std::io;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::resp::raw_command_timeout;
use crate::server::{CLI_ENV, Mode, RedisServer, TlsOptions, resolve_binary};

/// Total number of hash slots in a Redis Cluster.
const SLOTS: usize = 16384;
/// How long to wait for the cluster to converge.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one administrative command of a slot move may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `redis-cli --cluster create` may run.
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);

/// A Redis Cluster of N masters (no replicas), each a redis-server with
/// `cluster-enabled yes` on a free port whose bus port (port+10000) is also
/// free. All nodes are killed when the cluster is dropped (and, like every
/// [`RedisServer`], when the test process exits).
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` nodes, creates the cluster with `redis-cli --cluster
    /// create ... --cluster-replicas 0 --cluster-yes`, and waits until every
    /// node reports `cluster_state:ok`, all 16384 slots assigned and all
    /// nodes known (timeout ~30 s).
    ///
    /// `redis-cli --cluster create` needs at least 3 masters; for 1 or 2
    /// masters the slots are assigned directly with `CLUSTER ADDSLOTSRANGE`
    /// and `CLUSTER MEET`. `masters == 0` is rejected with
    /// [`io::ErrorKind::InvalidInput`]. The `redis-cli` binary can be
    /// overridden with the `STATEHOUSE_REDIS_CLI` env var.
    pub fn start(masters: usize) -> io::Result<RedisCluster> {
        Self::start_with(masters, None)
    }

    /// Starts a cluster as [`start`](Self::start) does, whose nodes also listen for TLS
    /// ([`tls_urls`](Self::tls_urls)) and speak TLS to each other on their bus
    /// (`tls-cluster yes`), with the certificates of [`crate::test_certificates`]. A client on
    /// TLS learns the nodes' TLS ports from `CLUSTER SLOTS`; the harness keeps to the plain
    /// ports.
    pub fn start_tls(masters: usize, options: TlsOptions) -> io::Result<RedisCluster> {
        Self::start_with(masters, Some(options))
    }

    fn start_with(masters: usize, tls: Option<TlsOptions>) -> io::Result<RedisCluster> {
        if masters == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a Redis Cluster needs at least one master",
            ));
        }
        let cli = if masters >= 3 {
            Some(resolve_binary(CLI_ENV, "redis-cli", "redis-tools")?)
        } else {
            None
        };
        let mut nodes = Vec::with_capacity(masters);
        for _ in 0..masters {
            nodes.push(RedisServer::start_full(Mode::ClusterNode, &[], tls)?);
        }
        let cluster = RedisCluster { nodes };
        match cli {
            Some(cli) => cluster.create_with_cli(&cli)?,
            None => cluster.create_manually()?,
        }
        cluster.wait_until_ok()?;
        Ok(cluster)
    }

    /// `"redis://127.0.0.1:PORT"` for every node, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// `"rediss://127.0.0.1:TLS-PORT"` for every node of a cluster started with TLS.
    ///
    /// # Panics
    ///
    /// When the cluster was started without TLS.
    pub fn tls_urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::tls_url).collect()
    }

    /// The port of every node, in node order.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }

    /// SIGKILLs node `i` (in node order); its port and `nodes.conf` are kept for
    /// [`restart_node`](Self::restart_node). The other nodes mark it failed after the node
    /// timeout (5 s), and with no replica to promote the cluster then refuses every command
    /// (`CLUSTERDOWN`, `cluster-require-full-coverage` being on by default).
    pub fn kill_node(&mut self, i: usize) {
        if let Some(node) = self.nodes.get_mut(i) {
            node.kill();
        }
    }

    /// Restarts node `i` on its port with its `nodes.conf`, so that it rejoins with the same
    /// id and slots, then waits until every node reports a healthy cluster again. Its data is
    /// gone (no persistence).
    pub fn restart_node(&mut self, i: usize) -> io::Result<()> {
        let node = self
            .nodes
            .get_mut(i)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no node {i}")))?;
        node.restart()?;
        self.wait_until_ok()
    }

    /// Starts a new node, joins it to the cluster as a replica of node `of` (in node order),
    /// waits until it has synchronized with its master and every node knows it, and returns
    /// its index (the last in node order).
    pub fn add_replica(&mut self, of: usize) -> io::Result<usize> {
        let master_id = self.node_id(of)?;
        let tls = self.nodes[of].tls_options();
        let node = RedisServer::start_full(Mode::ClusterNode, &[], tls)?;
        let port = node.port();
        self.nodes.push(node);
        let index = self.nodes.len() - 1;
        let master_port = self.nodes[of].port().to_string();
        expect_ok(
            port,
            &["CLUSTER", "MEET", "127.0.0.1", &master_port],
            COMMAND_TIMEOUT,
        )?;
        // REPLICATE needs the master known to the new node: retried until the handshake is done.
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let reply =
                raw_command_timeout(port, &["CLUSTER", "REPLICATE", &master_id], COMMAND_TIMEOUT)?;
            if reply == "OK" {
                break;
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("CLUSTER REPLICATE on 127.0.0.1:{port} kept answering {reply:?}"),
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
        wait_for(port, &["INFO", "REPLICATION"], "master_link_status:up")?;
        self.wait_until_ok()?;
        Ok(index)
    }

    /// Makes replica `i` (in node order) its master's master with a coordinated manual
    /// failover (`CLUSTER FAILOVER`: the master stops, the replica catches up and takes over,
    /// nothing written is lost), and waits until it says it is a master and every node sees
    /// a healthy cluster.
    pub fn fail_over_to(&self, i: usize) -> io::Result<()> {
        let node = self
            .nodes
            .get(i)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no node {i}")))?;
        expect_ok(node.port(), &["CLUSTER", "FAILOVER"], COMMAND_TIMEOUT)?;
        wait_for(node.port(), &["ROLE"], "master")?;
        self.wait_until_ok()
    }

    /// The index (in node order) of the node that owns `slot`, as that node says.
    pub fn owner_of(&self, slot: u16) -> io::Result<usize> {
        for (i, node) in self.nodes.iter().enumerate() {
            let nodes = raw_command_timeout(node.port(), &["CLUSTER", "NODES"], COMMAND_TIMEOUT)?;
            let Some(myself) = nodes.lines().find(|l| l.contains("myself")) else {
                continue;
            };
            let owns = myself.split(' ').skip(8).any(|range| {
                let (first, last) = range.split_once('-').unwrap_or((range, range));
                match (first.parse::<u16>(), last.parse::<u16>()) {
                    (Ok(first), Ok(last)) => (first..=last).contains(&slot),
                    _ => false, // `[slot->-id]` migration markers
                }
            });
            if owns {
                return Ok(i);
            }
        }
        Err(io::Error::other(format!("no node owns slot {slot}")))
    }

    /// Starts a live migration of `slot` from its owner to node `to` (in node order), as
    /// `redis-cli --cluster reshard` does: `IMPORTING` on the target, then `MIGRATING` on the
    /// source. Until [`SlotMove::finish`], the source answers a command for a key it no longer
    /// holds with `ASK` (the key moved with [`SlotMove::move_keys`]), and the target answers
    /// only commands preceded by `ASKING`; a command on several keys of the slot, some moved and
    /// some not, gets `TRYAGAIN`.
    pub fn start_moving_slot(&self, slot: u16, to: usize) -> io::Result<SlotMove> {
        let from = self.owner_of(slot)?;
        if from == to {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("slot {slot} is already on node {to}"),
            ));
        }
        let slot_arg = slot.to_string();
        let to_id = self.node_id(to)?;
        let from_id = self.node_id(from)?;
        let (from_port, to_port) = (self.nodes[from].port(), self.nodes[to].port());
        expect_ok(
            to_port,
            &["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &from_id],
            COMMAND_TIMEOUT,
        )?;
        expect_ok(
            from_port,
            &["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &to_id],
            COMMAND_TIMEOUT,
        )?;
        // With `tls-cluster yes`, MIGRATE speaks TLS to the target: its TLS port.
        let migrate_port = self.nodes[to].tls_port().unwrap_or(to_port);
        Ok(SlotMove {
            slot,
            from_port,
            to_port,
            migrate_port,
            to_id,
            ports: self.ports(),
        })
    }

    /// The node's cluster id (`CLUSTER MYID`).
    fn node_id(&self, i: usize) -> io::Result<String> {
        let node = self
            .nodes
            .get(i)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no node {i}")))?;
        raw_command_timeout(node.port(), &["CLUSTER", "MYID"], COMMAND_TIMEOUT)
    }

    /// Runs `redis-cli --cluster create`, logging to the first node's dir.
    fn create_with_cli(&self, cli: &std::path::Path) -> io::Result<()> {
        let log_path = self.nodes[0].dir().join("cluster-create.log");
        let log = File::create(&log_path)?;
        let mut cmd = Command::new(cli);
        cmd.arg("--cluster").arg("create");
        for port in self.ports() {
            cmd.arg(format!("127.0.0.1:{port}"));
        }
        cmd.args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = cmd.spawn().map_err(|e| {
            io::Error::new(e.kind(), format!("failed to run {}: {e}", cli.display()))
        })?;
        let deadline = Instant::now() + CREATE_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(20));
        };
        if status.is_some_and(|s| s.success()) {
            return Ok(());
        }
        let output = std::fs::read_to_string(&log_path).unwrap_or_default();
        let what = match status {
            Some(s) => format!("exited with {s}"),
            None => format!("timed out after {CREATE_TIMEOUT:?}"),
        };
        Err(io::Error::other(format!(
            "`redis-cli --cluster create` {what}; output:\n{output}"
        )))
    }

    /// Assigns slots and joins the nodes by hand (for 1 or 2 masters).
    fn create_manually(&self) -> io::Result<()> {
        let n = self.nodes.len();
        let timeout = Duration::from_secs(5);
        for (i, node) in self.nodes.iter().enumerate() {
            let first = i * SLOTS / n;
            let last = (i + 1) * SLOTS / n - 1;
            let epoch = (i + 1).to_string();
            expect_ok(
                node.port(),
                &["CLUSTER", "SET-CONFIG-EPOCH", &epoch],
                timeout,
            )?;
            expect_ok(
                node.port(),
                &[
                    "CLUSTER",
                    "ADDSLOTSRANGE",
                    &first.to_string(),
                    &last.to_string(),
                ],
                timeout,
            )?;
        }
        let first_port = self.nodes[0].port().to_string();
        for node in &self.nodes[1..] {
            expect_ok(
                node.port(),
                &["CLUSTER", "MEET", "127.0.0.1", &first_port],
                timeout,
            )?;
        }
        Ok(())
    }

    /// Waits until every node sees a healthy, fully assigned cluster that
    /// contains all nodes.
    fn wait_until_ok(&self) -> io::Result<()> {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        let want_known = format!("cluster_known_nodes:{}", self.nodes.len());
        let want_slots = format!("cluster_slots_assigned:{SLOTS}");
        loop {
            let mut last_info = String::new();
            let mut all_ok = true;
            for node in &self.nodes {
                let info =
                    raw_command_timeout(node.port(), &["CLUSTER", "INFO"], Duration::from_secs(2))
                        .unwrap_or_else(|e| format!("(CLUSTER INFO failed: {e})"));
                let has = |needle: &str| info.lines().any(|l| l.trim() == needle);
                if !(has("cluster_state:ok") && has(&want_slots) && has(&want_known)) {
                    all_ok = false;
                    last_info = format!("node 127.0.0.1:{}:\n{info}", node.port());
                    break;
                }
            }
            if all_ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "cluster of {} nodes did not become ready within {CLUSTER_TIMEOUT:?}; last {last_info}",
                        self.nodes.len()
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A slot being moved between two nodes of a [`RedisCluster`] (see
/// [`RedisCluster::start_moving_slot`]).
#[derive(Debug)]
pub struct SlotMove {
    slot: u16,
    from_port: u16,
    to_port: u16,
    /// The target's port for `MIGRATE` (its TLS port on a TLS cluster).
    migrate_port: u16,
    to_id: String,
    ports: Vec<u16>,
}

impl SlotMove {
    /// Moves up to `max` of the slot's keys still on the source to the target with `MIGRATE`;
    /// how many it moved (0 once the source holds none). Keys deleted between listing and
    /// moving them (`NOKEY`) are passed over: the slot is listed again.
    pub fn move_keys(&self, max: usize) -> io::Result<usize> {
        loop {
            if let Some(moved) = self.try_move_keys(max)? {
                return Ok(moved);
            }
        }
    }

    /// One listing and `MIGRATE`; `None` when none of the listed keys was left to move.
    fn try_move_keys(&self, max: usize) -> io::Result<Option<usize>> {
        let slot = self.slot.to_string();
        let listed = raw_command_timeout(
            self.from_port,
            &["CLUSTER", "GETKEYSINSLOT", &slot, &max.to_string()],
            COMMAND_TIMEOUT,
        )?;
        if listed.starts_with("ERR") {
            return Err(io::Error::other(format!("CLUSTER GETKEYSINSLOT: {listed}")));
        }
        let keys: Vec<&str> = listed.lines().filter(|k| !k.is_empty()).collect();
        if keys.is_empty() {
            return Ok(Some(0));
        }
        let port = self.migrate_port.to_string();
        let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
        args.extend(keys.iter().copied());
        let reply = raw_command_timeout(self.from_port, &args, COMMAND_TIMEOUT)?;
        match reply.as_str() {
            "OK" => Ok(Some(keys.len())),
            "NOKEY" => Ok(None),
            _ => Err(io::Error::other(format!("MIGRATE replied {reply:?}"))),
        }
    }

    /// Moves every key left, then gives the slot to the target on every node (the target
    /// first, as `redis-cli --cluster reshard` does): the source answers `MOVED` from then on.
    pub fn finish(self) -> io::Result<()> {
        while self.move_keys(100)? > 0 {}
        let slot = self.slot.to_string();
        let setslot = ["CLUSTER", "SETSLOT", &slot, "NODE", &self.to_id];
        expect_ok(self.to_port, &setslot, COMMAND_TIMEOUT)?;
        expect_ok(self.from_port, &setslot, COMMAND_TIMEOUT)?;
        for &port in &self.ports {
            if port != self.to_port && port != self.from_port {
                expect_ok(port, &setslot, COMMAND_TIMEOUT)?;
            }
        }
        Ok(())
    }
}

/// Sends a command and requires an `OK` reply.
fn expect_ok(port: u16, args: &[&str], timeout: Duration) -> io::Result<()> {
    let reply = raw_command_timeout(port, args, timeout)?;
    if reply == "OK" {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "`{}` on 127.0.0.1:{port} replied {reply:?}",
            args.join(" ")
        )))
    }
}

/// Sends a command every 50 ms until its reply has a line equal to `line` (timeout ~30 s).
fn wait_for(port: u16, args: &[&str], line: &str) -> io::Result<()> {
    let deadline = Instant::now() + CLUSTER_TIMEOUT;
    loop {
        let reply = raw_command_timeout(port, args, COMMAND_TIMEOUT)
            .unwrap_or_else(|e| format!("(failed: {e})"));
        if reply.lines().any(|l| l.trim() == line) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "`{}` on 127.0.0.1:{port} never answered {line:?}; last:\n{reply}",
                    args.join(" ")
                ),
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
}
