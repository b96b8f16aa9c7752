//! A single `redis-server` process supervised by a small `sh` watchdog.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::resp::raw_command_timeout;

/// Env var overriding the `redis-server` binary (name on `PATH` or a path).
pub(crate) const SERVER_ENV: &str = "STATEHOUSE_REDIS_SERVER";
/// Env var overriding the `redis-cli` binary (name on `PATH` or a path).
pub(crate) const CLI_ENV: &str = "STATEHOUSE_REDIS_CLI";

/// How long `start()` waits for a fresh server to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How many fresh ports `start()` tries before giving up.
const START_ATTEMPTS: usize = 5;
/// How long `restart()` keeps retrying to bind the old port.
const RESTART_RETRY: Duration = Duration::from_secs(5);
/// Highest port usable by a cluster node (its bus port is `port + 10000`).
const MAX_CLUSTER_PORT: u16 = 55535;
/// Number of lines of `redis.log` quoted in startup errors.
const LOG_TAIL_LINES: usize = 25;

/// Watchdog run as `sh -c WRAPPER wrapper TESTPID DIR REDIS-SERVER ARGS...`.
///
/// It starts redis-server in the background, prints its pid on stdout, then
/// polls every 0.2 s: when redis-server exits, the wrapper exits too; when the
/// test process is gone (it no longer exists, or the wrapper got re-parented
/// because it died, which also covers a zombie test process), it SIGKILLs
/// redis-server, reaps it and removes the server's temp dir. If the watchdog
/// itself gets SIGHUP/SIGINT/SIGTERM, it takes redis-server down with it.
const WRAPPER: &str = r#"
testpid=$1
dir=$2
shift 2
"$@" </dev/null >>"$dir/redis.log" 2>&1 &
child=$!
stop_child() {
    kill -9 "$child" 2>/dev/null
    # `wait` may return early when a signal arrives; loop until reaped.
    while kill -0 "$child" 2>/dev/null; do
        wait "$child" 2>/dev/null
        sleep 0.01
    done
}
trap 'stop_child; exit 1' HUP INT TERM
echo "$child"
exec >/dev/null
owner_alive() {
    kill -0 "$testpid" 2>/dev/null || return 1
    if [ -r "/proc/$$/stat" ]; then
        read -r _pid _comm _state ppid _rest <"/proc/$$/stat" || return 0
        [ "$ppid" = "$testpid" ] || return 1
    fi
    return 0
}
while kill -0 "$child" 2>/dev/null; do
    if ! owner_alive; then
        stop_child
        rm -rf "$dir"
        exit 0
    fi
    sleep 0.2
done
wait "$child" 2>/dev/null
exit 0
"#;

/// Which kind of node a [`RedisServer`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Plain standalone server.
    Standalone,
    /// `cluster-enabled yes` node (port <= 55535, bus port free).
    ClusterNode,
}

/// How a TLS server of the harness is set up ([`RedisServer::start_tls`]).
///
/// The server keeps its plain port too (the harness's own commands, [`crate::raw_command`]);
/// what is under test connects to [`RedisServer::tls_url`]. Its certificates are
/// [`crate::test_certificates`]'.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// `tls-auth-clients yes`: a client must present a certificate the test CA signed (mutual
    /// TLS). Otherwise `optional`: one is checked when presented.
    pub require_client_certificate: bool,
    /// Serve a certificate the test CA signed for `redis.invalid` only, not for the address
    /// tests connect to.
    pub misnamed_certificate: bool,
}

/// A TLS port and how it is set up.
#[derive(Debug, Clone, Copy)]
struct Tls {
    port: u16,
    options: TlsOptions,
}

/// A live redis-server and the watchdog shell supervising it.
#[derive(Debug)]
struct Running {
    /// The `sh` watchdog (our direct child; redis-server is its child).
    wrapper: Child,
    /// Pid of the redis-server process itself.
    pid: u32,
}

/// One redis-server process on a free loopback port, killed on drop.
///
/// The server runs with `--save "" --appendonly no`, binds `127.0.0.1`, and
/// keeps its files (`redis.log`, `nodes.conf` for cluster nodes) in its own
/// temp dir under [`std::env::temp_dir`], removed on drop.
///
/// Each server is supervised by a small `sh` watchdog that also kills it as
/// soon as the test process is gone, so servers held in never-dropped statics
/// (see [`crate::shared_standalone`]) or in a test process that panicked or
/// was SIGKILLed do not outlive the test run.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    mode: Mode,
    extra_args: Vec<String>,
    server_bin: PathBuf,
    proc: Option<Running>,
    tls: Option<Tls>,
}

impl RedisServer {
    /// Starts a standalone server (`--save "" --appendonly no`, its own temp
    /// dir, bind 127.0.0.1, a free port), waits until it answers `PING`
    /// (timeout ~10 s) and returns it.
    ///
    /// If the server fails to come up (e.g. another process grabbed the port
    /// in the meantime) it is retried on a fresh port, up to 5 times. Errors
    /// include the tail of the server's `redis.log`. If `redis-server` cannot
    /// be found, the error kind is [`io::ErrorKind::NotFound`] and the message
    /// says `redis-server not found on PATH; install it (apt-get install -y
    /// redis-server)`. The binary can be overridden with the
    /// `STATEHOUSE_REDIS_SERVER` env var.
    pub fn start() -> io::Result<RedisServer> {
        Self::start_with_args(&[])
    }

    /// Same as [`RedisServer::start`], with extra `redis-server` arguments
    /// appended after the harness' own (so they take precedence), e.g.
    /// `&["--maxmemory", "10mb"]`.
    pub fn start_with_args(args: &[&str]) -> io::Result<RedisServer> {
        Self::start_mode(Mode::Standalone, args)
    }

    /// Starts a standalone server that also listens for TLS on a second port
    /// ([`tls_port`](Self::tls_port), [`tls_url`](Self::tls_url)), with the certificates of
    /// [`crate::test_certificates`] and the given options.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start); a `redis-server` built without TLS fails to start, with its
    /// log in the error.
    pub fn start_tls(options: TlsOptions) -> io::Result<RedisServer> {
        Self::start_full(Mode::Standalone, &[], Some(options))
    }

    /// Starts a server of the given mode (used by the cluster too).
    pub(crate) fn start_mode(mode: Mode, args: &[&str]) -> io::Result<RedisServer> {
        Self::start_full(mode, args, None)
    }

    /// Starts a server of the given mode, with TLS when `tls` is set.
    pub(crate) fn start_full(
        mode: Mode,
        args: &[&str],
        tls: Option<TlsOptions>,
    ) -> io::Result<RedisServer> {
        let server_bin = resolve_binary(SERVER_ENV, "redis-server", "redis-server")?;
        let dir = make_temp_dir()?;
        if let Some(options) = tls {
            crate::test_certificates().write_server_files(&dir, options.misnamed_certificate)?;
        }
        let mut server = RedisServer {
            port: 0,
            dir,
            mode,
            extra_args: args.iter().map(|a| (*a).to_owned()).collect(),
            server_bin,
            proc: None,
            tls: tls.map(|options| Tls { port: 0, options }),
        };
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            server.port = free_port(mode)?;
            if let Some(tls) = &mut server.tls {
                tls.port = loop {
                    let port = free_port(Mode::Standalone)?;
                    if port != server.port && port != server.port + 10000 {
                        break port;
                    }
                };
            }
            match server.spawn_and_wait() {
                Ok(()) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        // `server` is dropped here, which removes its temp dir.
        Err(last_err.unwrap_or_else(|| io::Error::other("redis-server failed to start")))
    }

    /// The TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The connection URL, `"redis://127.0.0.1:PORT"`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// How the server's TLS port is set up (`None`: no TLS port).
    pub(crate) fn tls_options(&self) -> Option<TlsOptions> {
        self.tls.map(|t| t.options)
    }

    /// The TLS port of a server started with TLS, on 127.0.0.1.
    pub fn tls_port(&self) -> Option<u16> {
        self.tls.map(|tls| tls.port)
    }

    /// `"rediss://127.0.0.1:TLS-PORT"` for a server started with TLS.
    ///
    /// # Panics
    ///
    /// When the server was started without TLS.
    pub fn tls_url(&self) -> String {
        let port = self.tls_port().expect("a server started with TLS");
        format!("rediss://127.0.0.1:{port}")
    }

    /// SIGKILLs the redis-server process and waits for it (and its watchdog)
    /// to be gone. The port number is kept for [`RedisServer::restart`] (it
    /// is not held open, so another process could in theory take it).
    /// Idempotent; also fine if the server already exited on its own.
    pub fn kill(&mut self) {
        let Some(mut running) = self.proc.take() else {
            return;
        };
        let wrapper_alive = matches!(running.wrapper.try_wait(), Ok(None));
        if server_alive(running.pid, self.port, wrapper_alive) {
            // Kill redis-server first so that the watchdog (its parent) reaps
            // it and then exits on its own; killing the watchdog first would
            // orphan redis-server.
            sigkill(running.pid);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match running.wrapper.try_wait() {
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
                Ok(None) | Err(_) => {
                    let _ = running.wrapper.kill();
                    let _ = running.wrapper.wait();
                    break;
                }
                Ok(Some(_)) => break,
            }
        }
        // The watchdog reaps redis-server before exiting; in the odd case it
        // was killed from outside (or the kill above could not be spawned),
        // try again and give the kernel a moment to finish it off.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut retried = false;
        while server_alive(running.pid, self.port, false) && Instant::now() < deadline {
            if !retried {
                sigkill(running.pid);
                retried = true;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts the server again on the same port, with the same arguments and
    /// the same temp dir (a cluster node keeps its `nodes.conf`), and waits for
    /// `PING`. If it is still running it is killed first. Binding the old
    /// port is retried for a few seconds.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        let deadline = Instant::now() + RESTART_RETRY;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound || Instant::now() >= deadline => {
                    return Err(e);
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Freezes the redis-server process (`SIGSTOP`) until the returned guard is dropped
    /// (`SIGCONT`), also when the test fails in between: a server that stops answering without
    /// closing its connections, like one behind a network partition.
    ///
    /// # Errors
    ///
    /// When the server is not running or `kill` cannot be run.
    pub fn freeze(&self) -> io::Result<Frozen> {
        let pid = self
            .proc
            .as_ref()
            .map(|running| running.pid)
            .ok_or_else(|| io::Error::other("redis-server is not running"))?;
        let status = Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .stdin(Stdio::null())
            .status()?;
        if !status.success() {
            return Err(io::Error::other(format!(
                "kill -STOP {pid} failed: {status}"
            )));
        }
        Ok(Frozen { pid })
    }

    /// Whether the redis-server process is running.
    pub fn is_running(&mut self) -> bool {
        let Some(running) = self.proc.as_mut() else {
            return false;
        };
        let wrapper_alive = matches!(running.wrapper.try_wait(), Ok(None));
        server_alive(running.pid, self.port, wrapper_alive)
    }

    /// The server's temp dir.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    /// Builds the full `redis-server` argument list.
    fn server_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |a: &str| args.push(OsString::from(a));
        push("--port");
        push(&self.port.to_string());
        push("--bind");
        push("127.0.0.1");
        push("--daemonize");
        push("no");
        push("--save");
        push("");
        push("--appendonly");
        push("no");
        args.push("--dir".into());
        args.push(self.dir.clone().into_os_string());
        args.push("--logfile".into());
        args.push(self.log_path().into_os_string());
        if self.mode == Mode::ClusterNode {
            args.push("--cluster-enabled".into());
            args.push("yes".into());
            args.push("--cluster-config-file".into());
            args.push(self.dir.join("nodes.conf").into_os_string());
            args.push("--cluster-node-timeout".into());
            args.push("5000".into());
        }
        if let Some(tls) = self.tls {
            for (name, value) in [
                ("--tls-port", tls.port.to_string()),
                (
                    "--tls-cert-file",
                    self.dir.join("server.crt").display().to_string(),
                ),
                (
                    "--tls-key-file",
                    self.dir.join("server.key").display().to_string(),
                ),
                (
                    "--tls-ca-cert-file",
                    self.dir.join("ca.crt").display().to_string(),
                ),
                (
                    "--tls-auth-clients",
                    if tls.options.require_client_certificate {
                        "yes"
                    } else {
                        "optional"
                    }
                    .to_owned(),
                ),
            ] {
                args.push(name.into());
                args.push(value.into());
            }
            if self.mode == Mode::ClusterNode {
                // The bus speaks TLS too, and stays on the port `free_port` checked (by
                // default it would follow the TLS port); nodes then announce their TLS ports
                // to TLS clients and their plain ports to the harness. A replica
                // ([`crate::RedisCluster::add_replica`]) syncs over TLS.
                args.push("--tls-cluster".into());
                args.push("yes".into());
                // A replica dials its master's TLS port (the one the cluster announces to it).
                args.push("--tls-replication".into());
                args.push("yes".into());
                args.push("--cluster-port".into());
                args.push((self.port + 10000).to_string().into());
            }
        }
        args.extend(self.extra_args.iter().map(OsString::from));
        args
    }

    /// Spawns redis-server on `self.port` and waits until it answers `PING`.
    /// On failure the process is killed and the error carries the log tail.
    fn spawn_and_wait(&mut self) -> io::Result<()> {
        self.kill();
        // Fresh log per attempt, so the quoted tail is about this attempt.
        let _ = std::fs::remove_file(self.log_path());
        std::fs::create_dir_all(&self.dir)?;
        let mut wrapper = Command::new("sh")
            .arg("-c")
            .arg(WRAPPER)
            .arg("statehouse-redis-watchdog")
            .arg(std::process::id().to_string())
            .arg(&self.dir)
            .arg(&self.server_bin)
            .args(self.server_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("failed to spawn `sh` watchdog: {e}")))?;
        let mut line = String::new();
        let read = match wrapper.stdout.take() {
            Some(out) => BufReader::new(out).read_line(&mut line),
            None => Ok(0),
        };
        let pid = match read.ok().and_then(|_| line.trim().parse::<u32>().ok()) {
            Some(pid) => pid,
            None => {
                let _ = wrapper.kill();
                let _ = wrapper.wait();
                return Err(io::Error::other(format!(
                    "redis watchdog did not report a pid (got {line:?})"
                )));
            }
        };
        self.proc = Some(Running { wrapper, pid });
        match self.wait_ready(pid) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.kill();
                Err(self.error_with_log(e))
            }
        }
    }

    /// Polls until the server we spawned (pid `pid`) answers `PING`.
    fn wait_ready(&mut self, pid: u32) -> io::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(running) = self.proc.as_mut()
                && let Some(status) = running.wrapper.try_wait()?
            {
                return Err(io::Error::other(format!(
                    "redis-server on port {} exited during startup (watchdog {status})",
                    self.port
                )));
            }
            if !pid_alive(pid) {
                return Err(io::Error::other(format!(
                    "redis-server on port {} exited during startup",
                    self.port
                )));
            }
            let timeout = Duration::from_secs(1);
            if let Ok(reply) = raw_command_timeout(self.port, &["PING"], timeout) {
                // Make sure it is *our* server answering, not another process
                // that won the race for this port.
                if reply == "PONG" {
                    let info = raw_command_timeout(self.port, &["INFO", "server"], timeout)
                        .unwrap_or_default();
                    let ours = info
                        .lines()
                        .any(|l| l.trim() == format!("process_id:{pid}"));
                    if ours {
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "redis-server on port {} did not answer PING within {:?}",
                        self.port, READY_TIMEOUT
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Appends the tail of `redis.log` to an error.
    fn error_with_log(&self, e: io::Error) -> io::Error {
        let log = self.log_path();
        let tail = std::fs::read_to_string(&log)
            .map(|text| {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
            })
            .unwrap_or_else(|err| format!("(could not read log: {err})"));
        io::Error::new(
            e.kind(),
            format!(
                "{e}\n--- tail of {} ---\n{tail}\n--- end of log ---",
                log.display()
            ),
        )
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends SIGKILL to `pid` (via the shell's `kill` builtin; std has no way
/// to signal an arbitrary pid without `unsafe`).
/// A redis-server frozen by [`RedisServer::freeze`]; dropping it lets the server run again.
#[derive(Debug)]
#[must_use = "the server runs again as soon as this guard is dropped"]
pub struct Frozen {
    pid: u32,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.pid.to_string()])
            .stdin(Stdio::null())
            .status();
    }
}

fn sigkill(pid: u32) {
    for _ in 0..3 {
        let status = Command::new("sh")
            .args(["-c", "kill -9 \"$1\" 2>/dev/null; exit 0", "sh"])
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if status.is_ok() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Whether our redis-server (`pid`, listening on `port`) is running.
///
/// While the watchdog is alive, `pid` is its unreaped child, so the pid cannot
/// have been reused. Once the watchdog is gone (normally after reaping
/// redis-server; or it was killed from outside, orphaning redis-server), the
/// pid could in theory belong to another process, so the command line must
/// also mention the port (redis-server sets its title to `... 127.0.0.1:PORT`).
/// Without `/proc`, this falls back to the watchdog's status.
fn server_alive(pid: u32, port: u16, wrapper_alive: bool) -> bool {
    if !Path::new("/proc/self/stat").exists() {
        return wrapper_alive;
    }
    if !pid_alive(pid) {
        return false;
    }
    wrapper_alive
        || std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
            let port = port.to_string();
            cmdline
                .split(|&b| b == 0 || b == b' ' || b == b':')
                .any(|part| part == port.as_bytes())
        })
}

/// Whether process `pid` still has a live thread. Without `/proc`, assumes
/// yes.
///
/// Looking only at the main thread is not enough: on SIGKILL the main thread
/// of a multi-threaded redis-server can turn zombie while other threads are
/// still exiting and keep the listening socket open for a moment.
fn pid_alive(pid: u32) -> bool {
    if !Path::new("/proc/self/stat").exists() {
        return true;
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // Format: "tid (comm) state ..."; comm may contain spaces/parens.
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next());
            !matches!(state, Some("Z" | "X" | "x") | None)
        })
    })
}

/// Creates a fresh per-server temp dir.
fn make_temp_dir() -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("statehouse-redis-{}-{n}", std::process::id()));
    // A leftover from an earlier process that had the same pid.
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Picks a currently free loopback port (for cluster nodes: <= 55535 with a
/// free bus port `port + 10000`). Inherently racy; callers retry.
fn free_port(mode: Mode) -> io::Result<u16> {
    for _ in 0..500 {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        match mode {
            Mode::Standalone => return Ok(port),
            Mode::ClusterNode => {
                if port > MAX_CLUSTER_PORT {
                    continue;
                }
                if TcpListener::bind((Ipv4Addr::LOCALHOST, port + 10000)).is_ok() {
                    return Ok(port);
                }
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrNotAvailable,
        "could not find a free loopback port (with a free bus port +10000)",
    ))
}

/// Finds a binary: the env var `env` if set (a path, or a name looked up on
/// `PATH`), else `default` on `PATH`.
pub(crate) fn resolve_binary(env: &str, default: &str, apt_package: &str) -> io::Result<PathBuf> {
    let overridden = std::env::var_os(env).filter(|v| !v.is_empty());
    let name = overridden
        .clone()
        .unwrap_or_else(|| OsString::from(default));
    find_binary(
        &name,
        default,
        apt_package,
        overridden.is_some().then_some(env),
    )
}

/// Looks `name` up (as a path if it contains a `/`, else on `PATH`).
pub(crate) fn find_binary(
    name: &std::ffi::OsStr,
    what: &str,
    apt_package: &str,
    from_env: Option<&str>,
) -> io::Result<PathBuf> {
    let path = Path::new(name);
    let is_path = path.components().count() > 1 || path.is_absolute();
    if is_path {
        if path.is_file() {
            return Ok(path.to_path_buf());
        }
    } else if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join(path);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let msg = match from_env {
        Some(env) if is_path => format!(
            "{what} not found at {} (set by {env}); install it (apt-get install -y {apt_package}) or fix {env}",
            path.display()
        ),
        Some(env) => format!(
            "{what} not found on PATH (looked for {:?}, set by {env}); install it (apt-get install -y {apt_package}) or fix {env}",
            path.display()
        ),
        None => format!("{what} not found on PATH; install it (apt-get install -y {apt_package})"),
    };
    Err(io::Error::new(io::ErrorKind::NotFound, msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_has_install_hint() {
        let err = find_binary(
            std::ffi::OsStr::new("statehouse-definitely-not-a-redis-server"),
            "redis-server",
            "redis-server",
            None,
        )
        .expect_err("must not be found");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            err.to_string(),
            "redis-server not found on PATH; install it (apt-get install -y redis-server)"
        );
    }

    #[test]
    fn missing_override_path_mentions_env_var() {
        let err = find_binary(
            std::ffi::OsStr::new("/nonexistent/redis-server"),
            "redis-server",
            "redis-server",
            Some(SERVER_ENV),
        )
        .expect_err("must not be found");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains(SERVER_ENV), "{err}");
    }

    #[test]
    fn finds_sh_on_path() {
        let p = find_binary(std::ffi::OsStr::new("sh"), "sh", "dash", None).expect("sh exists");
        assert!(p.is_absolute() || p.components().count() > 1);
    }

    #[test]
    fn cluster_ports_leave_room_for_bus_port() {
        for _ in 0..20 {
            let p = free_port(Mode::ClusterNode).expect("free port");
            assert!(p <= MAX_CLUSTER_PORT);
        }
    }

    #[test]
    fn watchdog_sigterm_takes_server_down() {
        let mut server = RedisServer::start().expect("start");
        let port = server.port();
        let wrapper_pid = server.proc.as_ref().expect("running").wrapper.id();
        let status = Command::new("sh")
            .args(["-c", "kill -TERM \"$1\"", "sh"])
            .arg(wrapper_pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.is_running() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        assert!(!server.is_running());
        assert!(std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err());
        server.restart().expect("restart");
        assert_eq!(crate::raw_command(port, &["PING"]).expect("PING"), "PONG");
    }

    #[test]
    fn own_pid_is_alive_and_bogus_pid_is_not() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX - 1));
    }
}
