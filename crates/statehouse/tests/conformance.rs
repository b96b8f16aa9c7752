//! The rate-limiting conformance suite (`statehouse_testkit::ratelimit_suite`), run against the
//! embedded store, Redis standalone and Redis Cluster, each also over TLS. The Redis servers are
//! the test harness's own, on free ports.

mod common;

use common::{Deployment, Embedded, Redis};

statehouse_testkit::ratelimit_conformance!(embedded, Embedded);
statehouse_testkit::ratelimit_conformance!(redis_standalone, Redis::new(Deployment::Standalone));
statehouse_testkit::ratelimit_conformance!(redis_cluster, Redis::new(Deployment::Cluster));
statehouse_testkit::ratelimit_conformance!(
    redis_standalone_tls,
    Redis::new(Deployment::StandaloneTls)
);
statehouse_testkit::ratelimit_conformance!(redis_cluster_tls, Redis::new(Deployment::ClusterTls));
