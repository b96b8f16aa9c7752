//! The session conformance suite (`statehouse_testkit::session_suite`), one instantiation per
//! backend. Each backend is one line: a factory from `common` implementing
//! `SessionStoreFactory`, whose `another_replica` gives a second handle on the same sessions
//! (for Redis: a new connection with the same key prefix).

// `common` builds the Redis factories too, so this file needs both backends (like
// `conformance.rs`, which says so through `required-features`).
#![cfg(all(feature = "embedded", feature = "redis"))]

mod common;

use common::{Deployment, EmbeddedSessions, RedisSessions};

statehouse_testkit::session_conformance!(embedded, EmbeddedSessions);
statehouse_testkit::session_conformance!(
    redis_standalone,
    RedisSessions::new(Deployment::Standalone)
);
statehouse_testkit::session_conformance!(redis_cluster, RedisSessions::new(Deployment::Cluster));
statehouse_testkit::session_conformance!(
    redis_standalone_tls,
    RedisSessions::new(Deployment::StandaloneTls)
);
statehouse_testkit::session_conformance!(
    redis_cluster_tls,
    RedisSessions::new(Deployment::ClusterTls)
);
