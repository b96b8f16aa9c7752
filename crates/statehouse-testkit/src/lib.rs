//! Dev-only test harness for Statehouse.
//!
//! Starts its own `redis-server` processes (standalone or a Redis Cluster) on
//! free loopback ports, so tests are hermetic, can run in parallel and never
//! touch a Redis already running on the machine (e.g. on port 6379).
//!
//! * [`RedisServer`] — one private server, killed on drop; can be
//!   [`kill`](RedisServer::kill)ed and [`restart`](RedisServer::restart)ed on
//!   the same port to test reconnection.
//! * [`RedisCluster`] — N masters, no replicas.
//! * [`shared_standalone`] / [`shared_cluster`] (and [`shared_tls_standalone`] /
//!   [`shared_tls_cluster`]) — process-wide instances, started on first use; isolate tests
//!   with [`unique_prefix`].
//! * [`RedisServer::start_tls`] and [`RedisCluster::start_tls`] — the same over TLS, with
//!   certificates made at test time ([`test_certificates`]).
//! * [`raw_command`] — a minimal RESP client to inspect server state without a
//!   client crate.
//! * [`ratelimit_suite`], [`session_suite`] and [`cache_suite`] — the
//!   conformance suites every backend runs, instantiated with
//!   [`ratelimit_conformance!`], [`session_conformance!`] and
//!   [`cache_conformance!`].
//! * [`cache_intercept`] — a cache store that forwards to a real one except where a test
//!   makes it misbehave.
//!
//! Every server is supervised by a small `sh` watchdog that kills it once the
//! test process is gone (normal exit, panic or SIGKILL), so the never-dropped
//! shared instances do not leak processes.
//!
//! Binaries: `redis-server` and `redis-cli` are looked up on `PATH`; override
//! them with the `STATEHOUSE_REDIS_SERVER` / `STATEHOUSE_REDIS_CLI` env vars.
//!
//! ```no_run
//! use statehouse_testkit::{raw_command, shared_standalone, unique_prefix};
//!
//! let server = shared_standalone();
//! let prefix = unique_prefix("my_test");
//! let key = format!("{prefix}:k");
//! raw_command(server.port(), &["SET", &key, "v", "EX", "60"]).unwrap();
//! assert_eq!(raw_command(server.port(), &["TYPE", &key]).unwrap(), "string");
//! ```

pub mod cache_intercept;
pub mod cache_suite;
mod cluster;
pub mod ratelimit_suite;
mod resp;
mod server;
pub mod session_suite;
mod tls;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

pub use cluster::{RedisCluster, SlotMove};
pub use resp::raw_command;
pub use server::{Frozen, RedisServer, TlsOptions};
pub use tls::{TestCertificates, test_certificates};

/// A process-wide standalone server, started on first use and shared by all
/// tests of the test binary (tests isolate themselves with unique key
/// prefixes, see [`unique_prefix`]). Never dropped; it is killed by its
/// watchdog when the test process exits.
///
/// # Panics
///
/// Panics if the server cannot be started (e.g. `redis-server` is not
/// installed); a later call will try again.
pub fn shared_standalone() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        RedisServer::start().unwrap_or_else(|e| {
            panic!("statehouse-testkit: failed to start the shared redis-server: {e}")
        })
    })
}

/// A process-wide 3-master cluster, started on first use and shared by all
/// tests of the test binary. Never dropped; its nodes are killed by their
/// watchdogs when the test process exits.
///
/// # Panics
///
/// Panics if the cluster cannot be started; a later call will try again.
pub fn shared_cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        RedisCluster::start(3).unwrap_or_else(|e| {
            panic!("statehouse-testkit: failed to start the shared Redis Cluster: {e}")
        })
    })
}

/// A process-wide standalone server that also listens for TLS
/// ([`RedisServer::tls_url`]; certificates: [`test_certificates`], client certificates
/// optional), started on first use and shared like [`shared_standalone`].
///
/// # Panics
///
/// Panics if the server cannot be started; a later call will try again.
pub fn shared_tls_standalone() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        RedisServer::start_tls(TlsOptions::default()).unwrap_or_else(|e| {
            panic!("statehouse-testkit: failed to start the shared TLS redis-server: {e}")
        })
    })
}

/// A process-wide 3-master cluster on TLS ([`RedisCluster::tls_urls`]), started on first use
/// and shared like [`shared_cluster`].
///
/// # Panics
///
/// Panics if the cluster cannot be started; a later call will try again.
pub fn shared_tls_cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        RedisCluster::start_tls(3, TlsOptions::default()).unwrap_or_else(|e| {
            panic!("statehouse-testkit: failed to start the shared TLS Redis Cluster: {e}")
        })
    })
}

/// A unique string for key prefixes, `"t-<name>-<pid>-<n>"`, built from
/// `name`, the process id and a process-wide atomic counter.
///
/// Characters of `name` that could interfere with keys or cluster hash tags
/// (`{`, `}`, whitespace and control characters) are replaced by `_`, so the
/// result never contains `'{'` or `'}'`; wrap it in braces yourself if you
/// want all keys of a test in one cluster slot.
pub fn unique_prefix(name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name: String = name
        .chars()
        .map(|c| {
            if c == '{' || c == '}' || c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    format!("t-{name}-{}-{n}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_prefix_strips_braces_and_is_unique() {
        let a = unique_prefix("a{b}c d");
        let b = unique_prefix("a{b}c d");
        assert_ne!(a, b);
        assert!(!a.contains('{') && !a.contains('}') && !a.contains(' '));
        assert!(a.starts_with(&format!("t-a_b_c_d-{}-", std::process::id())));
    }
}
