//! Tests of the harness itself, against real redis-server processes.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpStream};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use statehouse_testkit::{
    RedisCluster, RedisServer, raw_command, shared_cluster, shared_standalone, unique_prefix,
};

/// Env var telling the helper tests below that they run as a subprocess.
const CHILD_ENV: &str = "STATEHOUSE_TESTKIT_CHILD_MODE";

fn refuses_connections(port: u16) -> bool {
    TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err()
}

/// Polls until nothing listens on `port` anymore.
fn wait_until_refused(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if refuses_connections(port) {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn start_answers_ping_and_has_expected_config() {
    let mut server = RedisServer::start().expect("start redis-server");
    let port = server.port();
    assert_ne!(port, 6379);
    assert_eq!(server.url(), format!("redis://127.0.0.1:{port}"));
    assert!(server.is_running());
    assert_eq!(raw_command(port, &["PING"]).expect("PING"), "PONG");
    assert_eq!(
        raw_command(port, &["CONFIG", "GET", "save"]).expect("CONFIG GET"),
        "save\n"
    );
    assert_eq!(
        raw_command(port, &["CONFIG", "GET", "appendonly"]).expect("CONFIG GET"),
        "appendonly\nno"
    );
    assert_eq!(raw_command(port, &["DBSIZE"]).expect("DBSIZE"), "0");
}

#[test]
fn start_with_args_passes_arguments() {
    let server = RedisServer::start_with_args(&["--maxmemory", "10mb"]).expect("start");
    assert_eq!(
        raw_command(server.port(), &["CONFIG", "GET", "maxmemory"]).expect("CONFIG GET"),
        "maxmemory\n10485760"
    );
}

#[test]
fn bad_args_fail_with_log_tail() {
    let err = RedisServer::start_with_args(&["--no-such-option", "1"]).expect_err("must fail");
    let msg = err.to_string();
    assert!(msg.contains("redis.log"), "{msg}");
    assert!(msg.contains("no-such-option"), "{msg}");
}

#[test]
fn kill_then_restart_on_same_port() {
    let mut server = RedisServer::start().expect("start");
    let port = server.port();
    assert_eq!(raw_command(port, &["SET", "k", "v"]).expect("SET"), "OK");

    server.kill();
    assert!(!server.is_running());
    assert!(raw_command(port, &["PING"]).is_err());
    server.kill(); // idempotent

    server.restart().expect("restart");
    assert_eq!(server.port(), port);
    assert!(server.is_running());
    assert_eq!(raw_command(port, &["PING"]).expect("PING"), "PONG");
    // No persistence: the data is gone.
    assert_eq!(raw_command(port, &["GET", "k"]).expect("GET"), "(nil)");

    // restart() of a running server works too.
    server.restart().expect("second restart");
    assert_eq!(server.port(), port);
    assert_eq!(raw_command(port, &["PING"]).expect("PING"), "PONG");
}

#[test]
fn server_that_exits_by_itself_is_not_running() {
    let mut server = RedisServer::start().expect("start");
    let port = server.port();
    // The connection is closed by the server while shutting down.
    let _ = raw_command(port, &["SHUTDOWN", "NOSAVE"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.is_running() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(!server.is_running());
    server.restart().expect("restart after shutdown");
    assert_eq!(raw_command(port, &["PING"]).expect("PING"), "PONG");
}

#[test]
fn dropped_server_refuses_connections() {
    let server = RedisServer::start().expect("start");
    let port = server.port();
    assert_eq!(raw_command(port, &["PING"]).expect("PING"), "PONG");
    drop(server);
    assert!(refuses_connections(port));
    assert!(raw_command(port, &["PING"]).is_err());
}

#[test]
fn parallel_starts_get_distinct_ports() {
    let handles: Vec<_> = (0..4)
        .map(|_| thread::spawn(|| RedisServer::start().expect("start")))
        .collect();
    let servers: Vec<RedisServer> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let mut ports: Vec<u16> = servers.iter().map(RedisServer::port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), servers.len());
    for s in &servers {
        assert_eq!(raw_command(s.port(), &["PING"]).expect("PING"), "PONG");
    }
}

#[test]
fn raw_command_renders_replies() {
    let server = shared_standalone();
    let port = server.port();
    let p = unique_prefix("raw_command_renders_replies");
    let key = format!("{p}:counter");
    let list = format!("{p}:list");

    assert_eq!(raw_command(port, &["INCR", &key]).expect("INCR"), "1");
    assert_eq!(raw_command(port, &["TTL", &key]).expect("TTL"), "-1");
    assert_eq!(raw_command(port, &["TYPE", &key]).expect("TYPE"), "string");
    assert_eq!(
        raw_command(port, &["TTL", &format!("{p}:missing")]).expect("TTL"),
        "-2"
    );
    assert_eq!(
        raw_command(port, &["GET", &format!("{p}:missing")]).expect("GET"),
        "(nil)"
    );
    assert_eq!(
        raw_command(port, &["RPUSH", &list, "a", "", "c"]).expect("RPUSH"),
        "3"
    );
    assert_eq!(
        raw_command(port, &["LRANGE", &list, "0", "-1"]).expect("LRANGE"),
        "a\n\nc"
    );
    let err = raw_command(port, &["LPUSH", &key, "x"]).expect("reply");
    assert!(err.starts_with("ERR WRONGTYPE"), "{err}");
    let err = raw_command(port, &["NO-SUCH-COMMAND"]).expect("reply");
    assert!(err.starts_with("ERR unknown command"), "{err}");
    assert!(raw_command(port, &[]).is_err());
}

#[test]
fn shared_standalone_is_shared() {
    let a = shared_standalone();
    let b = shared_standalone();
    assert!(std::ptr::eq(a, b));
    assert_eq!(raw_command(a.port(), &["PING"]).expect("PING"), "PONG");
}

#[test]
fn unique_prefixes_differ() {
    let a = unique_prefix("same");
    let b = unique_prefix("same");
    assert_ne!(a, b);
    assert!(a.contains(&std::process::id().to_string()));
    assert!(!unique_prefix("{tag}").contains(['{', '}']));
}

fn assert_cluster_ok(ports: &[u16]) {
    for &port in ports {
        let info = raw_command(port, &["CLUSTER", "INFO"]).expect("CLUSTER INFO");
        assert!(info.contains("cluster_state:ok"), "{port}: {info}");
        assert!(
            info.contains("cluster_slots_assigned:16384"),
            "{port}: {info}"
        );
    }
}

#[test]
fn cluster_of_three_is_ok() {
    let cluster = RedisCluster::start(3).expect("start cluster");
    let ports = cluster.ports();
    assert_eq!(ports.len(), 3);
    assert!(ports.iter().all(|&p| p <= 55535));
    assert_eq!(
        cluster.urls(),
        ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
    );
    assert_cluster_ok(&ports);
    drop(cluster);
    for port in ports {
        assert!(refuses_connections(port));
    }
}

#[test]
fn small_clusters_are_ok() {
    for masters in [1, 2] {
        let cluster = RedisCluster::start(masters).expect("start cluster");
        assert_eq!(cluster.ports().len(), masters);
        assert_cluster_ok(&cluster.ports());
    }
    assert!(RedisCluster::start(0).is_err());
}

#[test]
fn shared_cluster_routes_keys() {
    let cluster = shared_cluster();
    let ports = cluster.ports();
    assert_eq!(ports.len(), 3);
    assert_cluster_ok(&ports);
    // A key lives on exactly one node; the others redirect with MOVED.
    let key = format!("{{{}}}:k", unique_prefix("shared_cluster_routes_keys"));
    let replies: Vec<String> = ports
        .iter()
        .map(|&p| raw_command(p, &["SET", &key, "v"]).expect("SET"))
        .collect();
    assert_eq!(
        replies.iter().filter(|r| *r == "OK").count(),
        1,
        "{replies:?}"
    );
    assert_eq!(
        replies
            .iter()
            .filter(|r| r.starts_with("ERR MOVED"))
            .count(),
        2,
        "{replies:?}"
    );
}

/// Runs one of the `child_*` helpers below in a subprocess (this same test
/// binary) and returns it with the port it printed.
fn spawn_child(helper: &str) -> (ChildGuard, u16) {
    let exe = std::env::current_exe().expect("current exe");
    let mut child = ChildGuard(
        Command::new(exe)
            .args([
                "--exact",
                helper,
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child test process"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let mut port = None;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.expect("read child stdout");
        // libtest prints "test NAME ... " on the same line before the output.
        if let Some((_, p)) = line.split_once("STATEHOUSE_CHILD_PORT=") {
            port = Some(p.trim().parse::<u16>().expect("port"));
            break;
        }
    }
    // Keep draining so the child does not fail writing to a closed pipe.
    thread::spawn(move || lines.for_each(drop));
    let port = port.expect("child printed its port");
    (child, port)
}

/// Kills and reaps the child process if the test panics before it does.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn server_dies_when_test_process_is_killed() {
    let (mut child, port) = spawn_child("child_starts_server_and_hangs");
    assert_eq!(raw_command(port, &["PING"]).expect("PING"), "PONG");
    child.0.kill().expect("SIGKILL child"); // no destructors run
    child.0.wait().expect("reap child");
    assert!(
        wait_until_refused(port, Duration::from_secs(5)),
        "redis-server on {port} survived its SIGKILLed test process"
    );
}

#[test]
fn shared_server_dies_when_test_process_exits() {
    let (mut child, port) = spawn_child("child_uses_shared_server_and_exits");
    let status = child.0.wait().expect("reap child");
    assert!(status.success());
    assert!(
        wait_until_refused(port, Duration::from_secs(5)),
        "shared redis-server on {port} survived the end of its test process"
    );
}

#[test]
#[ignore = "helper, run in a subprocess by server_dies_when_test_process_is_killed"]
fn child_starts_server_and_hangs() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let server = RedisServer::start().expect("start");
    println!("STATEHOUSE_CHILD_PORT={}", server.port());
    thread::sleep(Duration::from_secs(60));
}

#[test]
#[ignore = "helper, run in a subprocess by shared_server_dies_when_test_process_exits"]
fn child_uses_shared_server_and_exits() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let server = shared_standalone();
    println!("STATEHOUSE_CHILD_PORT={}", server.port());
}

#[test]
fn a_frozen_server_keeps_connections_open_but_answers_only_once_thawed() {
    use std::io::{Read, Write};
    let server = RedisServer::start().expect("start");
    let mut conn = TcpStream::connect((Ipv4Addr::LOCALHOST, server.port())).expect("connect");
    conn.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let frozen = server.freeze().expect("freeze");
    conn.write_all(b"PING\r\n").expect("the socket stays open");
    let mut reply = [0u8; 7];
    let err = conn.read(&mut reply).expect_err("no answer while frozen");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err:?}"
    );
    drop(frozen);
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    conn.read_exact(&mut reply).expect("answered once thawed");
    assert_eq!(&reply, b"+PONG\r\n");
}
