//! How redis-rs errors become [`statehouse_core::Error`]s.

use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};
use statehouse_core::Error;

/// Maps a client error: anything that says "the store cannot be reached or answer right now"
/// becomes [`Error::Unavailable`] or [`Error::Timeout`] (so the caller's degraded-mode policy
/// applies); anything the server answered that Statehouse cannot use (a script error, a corrupt
/// or mistyped key, an unexpected reply) becomes [`Error::Backend`].
pub(crate) fn from_redis(err: RedisError, deadline: Duration) -> Error {
    if err.is_timeout() {
        return Error::Timeout { deadline };
    }
    let unavailable = match err.kind() {
        ErrorKind::Io | ErrorKind::ClusterConnectionNotFound => true,
        // A wrong password or a server that will not talk to us: no retry on our side fixes it,
        // but it is an outage of the store as far as the caller's fallback is concerned.
        ErrorKind::AuthenticationFailed => true,
        ErrorKind::Server(kind) => matches!(
            kind,
            ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::TryAgain
                | ServerErrorKind::BusyLoading
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::Moved
                | ServerErrorKind::Ask
        ),
        _ => false,
    } || err.is_connection_dropped()
        || err.is_connection_refusal()
        // A server busy with a long script, out of memory for writes, or short of replicas
        // cannot serve the request now, however well-formed.
        || matches!(err.code(), Some("BUSY" | "OOM" | "NOREPLICAS"));
    let message = err.to_string();
    if unavailable {
        Error::Unavailable {
            message,
            source: Some(Box::new(err)),
        }
    } else {
        Error::Backend {
            message,
            source: Some(Box::new(err)),
        }
    }
}

/// An [`Error::Backend`] for a reply whose shape is not what the script returns.
pub(crate) fn unexpected_reply(what: impl Into<String>) -> Error {
    Error::Backend {
        message: format!("unexpected reply from the limiter script: {}", what.into()),
        source: None,
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use redis::make_extension_error;

    use super::*;

    const DEADLINE: Duration = Duration::from_millis(100);

    fn io_error(kind: io::ErrorKind) -> RedisError {
        RedisError::from(io::Error::from(kind))
    }

    #[test]
    fn outages_are_unavailable() {
        for err in [
            io_error(io::ErrorKind::ConnectionRefused),
            io_error(io::ErrorKind::ConnectionReset),
            io_error(io::ErrorKind::BrokenPipe),
            io_error(io::ErrorKind::UnexpectedEof),
            RedisError::from((ErrorKind::Server(ServerErrorKind::ClusterDown), "down")),
            RedisError::from((ErrorKind::Server(ServerErrorKind::BusyLoading), "loading")),
            RedisError::from((ErrorKind::ClusterConnectionNotFound, "gone")),
            make_extension_error("BUSY".into(), Some("a script is running".into())),
        ] {
            let shown = format!("{err:?}");
            let mapped = from_redis(err, DEADLINE);
            assert!(
                matches!(mapped, Error::Unavailable { .. }),
                "{shown} -> {mapped:?}"
            );
        }
        let mapped = from_redis(io_error(io::ErrorKind::TimedOut), DEADLINE);
        assert!(
            matches!(mapped, Error::Timeout { deadline } if deadline == DEADLINE),
            "{mapped:?}"
        );
        assert!(mapped.is_unavailable());
    }

    #[test]
    fn answers_statehouse_cannot_use_are_backend_errors() {
        for err in [
            RedisError::from((
                ErrorKind::Server(ServerErrorKind::ResponseError),
                "statehouse: corrupt state",
            )),
            make_extension_error(
                "WRONGTYPE".into(),
                Some("statehouse: key holds a list".into()),
            ),
            RedisError::from((ErrorKind::UnexpectedReturnType, "not an array")),
            RedisError::from((ErrorKind::Server(ServerErrorKind::NoScript), "no script")),
        ] {
            let shown = format!("{err:?}");
            let mapped = from_redis(err, DEADLINE);
            assert!(
                matches!(mapped, Error::Backend { .. }),
                "{shown} -> {mapped:?}"
            );
            assert!(!mapped.is_unavailable());
        }
    }
}
