//! A Redis Cluster made of harness-managed [`RedisServer`] nodes.

use std::fs::File;
use std::io;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::resp::raw_command_timeout;
use crate::server::{CLI_ENV, Mode, RedisServer, resolve_binary};

/// Total number of hash slots in a Redis Cluster.
const SLOTS: usize = 16384;
/// How long to wait for the cluster to converge.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);
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
            nodes.push(RedisServer::start_mode(Mode::ClusterNode, &[])?);
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

    /// The port of every node, in node order.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
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
