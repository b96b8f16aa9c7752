//! Where a new session's client IP address comes from.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderName, Request};

/// Where [`SessionLayer`](super::SessionLayer) reads the client's IP address, kept with every
/// session it creates (for "your devices" lists and audits; never used for access decisions).
///
/// A header is only as trustworthy as the proxy that sets it: behind no proxy, any client can
/// send `X-Forwarded-For: 1.2.3.4`. So the default is the socket's peer address, and a header
/// is read only when configured. A value that does not parse as an IP address is ignored, never
/// stored.
///
/// ```
/// use statehouse_tower::ClientIp;
/// // Behind one load balancer that appends the peer it saw to X-Forwarded-For:
/// let source = ClientIp::ForwardedFor { trusted_proxies: 1 };
/// # let _ = source;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientIp {
    /// The connection's peer address: axum's `ConnectInfo<SocketAddr>` (serve with
    /// `into_make_service_with_connect_info::<SocketAddr>()`), or a `SocketAddr` request
    /// extension put there by another server. The default.
    #[default]
    Peer,
    /// The `X-Forwarded-For` entry added by the outermost of `trusted_proxies` proxies you run:
    /// the `trusted_proxies`-th address from the right. Entries further left were written by
    /// the client and are never used. `trusted_proxies: 0` is [`ClientIp::Peer`].
    ForwardedFor {
        /// How many proxies you run in front of the application, each appending to the header.
        trusted_proxies: usize,
    },
    /// A single-address header set by your proxy, e.g. `X-Real-IP` or `Fly-Client-IP`.
    Header(HeaderName),
    /// Do not record the IP address.
    Off,
}

impl ClientIp {
    /// The client's address for `req`, or `None` when unknown or not parseable.
    pub(crate) fn resolve<B>(&self, req: &Request<B>) -> Option<String> {
        let ip = match self {
            ClientIp::Off => None,
            ClientIp::Peer | ClientIp::ForwardedFor { trusted_proxies: 0 } => peer(req),
            ClientIp::ForwardedFor { trusted_proxies } => {
                // Every X-Forwarded-For line, in order, as one comma-separated list. Split as
                // bytes: an entry the client wrote with other bytes must not hide (and so
                // shift) the entries the proxies appended to the same line.
                let entries: Vec<&[u8]> = req
                    .headers()
                    .get_all("x-forwarded-for")
                    .iter()
                    .flat_map(|v| v.as_bytes().split(|&b| b == b','))
                    .map(<[u8]>::trim_ascii)
                    .collect();
                entries
                    .len()
                    .checked_sub(*trusted_proxies)
                    .and_then(|i| entries.get(i))
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .and_then(parse_ip)
            }
            ClientIp::Header(name) => req
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| parse_ip(s.trim())),
        };
        ip.map(|ip| ip.to_string())
    }
}

fn peer<B>(req: &Request<B>) -> Option<IpAddr> {
    #[cfg(feature = "axum")]
    if let Some(info) = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(info.0.ip());
    }
    req.extensions().get::<SocketAddr>().map(SocketAddr::ip)
}

/// An IP address, also in the `[v6]:port` and `v4:port` forms some proxies write.
fn parse_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    s.parse::<SocketAddr>().ok().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn forwarded_for_takes_the_entry_of_the_outermost_trusted_proxy() {
        let r = req(&[
            ("x-forwarded-for", "6.6.6.6, 203.0.113.7"),
            ("x-forwarded-for", "10.0.0.2"),
        ]);
        let one = ClientIp::ForwardedFor { trusted_proxies: 1 };
        let two = ClientIp::ForwardedFor { trusted_proxies: 2 };
        let four = ClientIp::ForwardedFor { trusted_proxies: 4 };
        assert_eq!(one.resolve(&r).as_deref(), Some("10.0.0.2"));
        assert_eq!(two.resolve(&r).as_deref(), Some("203.0.113.7"));
        // More proxies than entries: the header cannot be trusted at all.
        assert_eq!(four.resolve(&r), None);
        // A client-written entry with bytes outside ASCII, on the line the proxy appended to:
        // the proxy's entry is still found.
        let mut r = req(&[]);
        r.headers_mut().append(
            "x-forwarded-for",
            http::HeaderValue::from_bytes("caf\u{e9}, 203.0.113.7".as_bytes()).unwrap(),
        );
        assert_eq!(one.resolve(&r).as_deref(), Some("203.0.113.7"));
        assert_eq!(
            two.resolve(&r),
            None,
            "the client's own entry is not an address"
        );
    }

    #[test]
    fn garbage_is_never_stored() {
        let one = ClientIp::ForwardedFor { trusted_proxies: 1 };
        assert_eq!(one.resolve(&req(&[("x-forwarded-for", "<script>")])), None);
        assert_eq!(one.resolve(&req(&[])), None);
        let real = ClientIp::Header(HeaderName::from_static("x-real-ip"));
        assert_eq!(real.resolve(&req(&[("x-real-ip", "not an ip")])), None);
        assert_eq!(
            real.resolve(&req(&[("x-real-ip", "[2001:db8::1]:443")]))
                .as_deref(),
            Some("2001:db8::1")
        );
        assert_eq!(
            ClientIp::Off.resolve(&req(&[("x-real-ip", "1.2.3.4")])),
            None
        );
    }

    #[test]
    fn peer_comes_from_the_connection() {
        let mut r = req(&[("x-forwarded-for", "6.6.6.6")]);
        assert_eq!(ClientIp::Peer.resolve(&r), None);
        r.extensions_mut()
            .insert("192.0.2.1:5555".parse::<SocketAddr>().unwrap());
        assert_eq!(ClientIp::Peer.resolve(&r).as_deref(), Some("192.0.2.1"));
    }
}
