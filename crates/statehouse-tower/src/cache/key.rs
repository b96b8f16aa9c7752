//! Cache keys: the primary key of a target URI, and the variant key of a `Vary` response.
//!
//! Primary key: `{prefix}{scheme}://{host}{path-and-query}`. The method is not in it: only GET
//! responses are stored, and HEAD is answered from them. The host is lowercased and a default
//! port (`:80` for http, `:443` for https) dropped, so `Example.com:80` and `example.com` share
//! entries; the path and query are kept exactly as sent (no decoding, no reordering: two
//! spellings that an origin might treat differently never share an entry).
//!
//! Variant key: `{primary}\n{generation}\n{digest}`, where the generation is the random id of
//! the vary spec stored at the primary key and the digest a SHA-256 of the request's values
//! of the `Vary` header fields. Deleting the spec (a purge, an unsafe method) makes every
//! variant of the old generation unreachable at once, without listing them.

use http::header::{HOST, HeaderName};
use http::uri::Authority;
use http::{HeaderMap, Uri};
use sha2::{Digest, Sha256};

/// The host part of a key: lowercase, default port dropped; `None` when not a valid authority
/// or when it carries user information (never a key component).
pub(crate) fn normalise_host(authority: &str, scheme: &str) -> Option<String> {
    let authority: Authority = authority.parse().ok()?;
    if authority.as_str().contains('@') || authority.host().is_empty() {
        return None;
    }
    let host = authority.host().to_ascii_lowercase();
    match authority.port_u16() {
        Some(80) if scheme == "http" => Some(host),
        Some(443) if scheme == "https" => Some(host),
        Some(port) => Some(format!("{host}:{port}")),
        None => Some(host),
    }
}

/// The primary key of a request's target: the URI's own scheme and authority when it is in
/// absolute form, else `default_scheme` and the `Host` header. `None` without a usable host.
pub(crate) fn primary_key(
    prefix: &str,
    default_scheme: &str,
    uri: &Uri,
    headers: &HeaderMap,
) -> Option<String> {
    let scheme = uri
        .scheme_str()
        .map(str::to_ascii_lowercase)
        .unwrap_or_else(|| default_scheme.to_owned());
    let host = match uri.authority() {
        Some(a) => normalise_host(a.as_str(), &scheme)?,
        None => {
            let mut hosts = headers.get_all(HOST).iter();
            let host = hosts.next()?;
            if hosts.next().is_some() {
                return None; // two Host lines: RFC 9112 §3.2 says reject; we just do not cache
            }
            normalise_host(host.to_str().ok()?, &scheme)?
        }
    };
    let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let path_and_query = if path_and_query.is_empty() {
        "/"
    } else {
        path_and_query
    };
    Some(format!("{prefix}{scheme}://{host}{path_and_query}"))
}

/// Whether a request in absolute form (`GET http://a.test/x`) names another host in its `Host`
/// header (RFC 9112 §3.2.2 says a server uses the URI's and ignores `Host`, but an application
/// building links from `Host` may not): such a request is not cached, else a response rendered
/// for the `Host` one would be stored under the URI's host and served to its visitors. Hosts
/// compare as keys do (case-insensitive, default port dropped). A URI authority without any
/// `Host` (HTTP/2's `:authority`) is no conflict; two `Host` lines, or one that is not a
/// valid authority, are.
pub(crate) fn host_conflict(default_scheme: &str, uri: &Uri, headers: &HeaderMap) -> bool {
    let Some(authority) = uri.authority() else {
        return false;
    };
    let mut hosts = headers.get_all(HOST).iter();
    let Some(host) = hosts.next() else {
        return false;
    };
    if hosts.next().is_some() {
        return true;
    }
    let scheme = uri
        .scheme_str()
        .map(str::to_ascii_lowercase)
        .unwrap_or_else(|| default_scheme.to_owned());
    let from_uri = normalise_host(authority.as_str(), &scheme);
    let from_header = host.to_str().ok().and_then(|h| normalise_host(h, &scheme));
    from_uri.is_none() || from_uri != from_header
}

/// The `Vary` of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VaryNames {
    /// Lowercase, sorted, deduplicated field names; empty when the response has no `Vary`.
    Names(Vec<HeaderName>),
    /// `Vary: *`: never stored.
    Star,
    /// A `Vary` line that is not a list of field names.
    Malformed,
}

/// Reads the `Vary` lines of a response.
pub(crate) fn vary_names(headers: &HeaderMap) -> VaryNames {
    let mut names = Vec::new();
    for line in headers.get_all(http::header::VARY) {
        let Ok(line) = line.to_str() else {
            return VaryNames::Malformed;
        };
        for name in line.split(',').map(|n| n.trim_matches([' ', '\t'])) {
            if name.is_empty() {
                continue;
            }
            if name == "*" {
                return VaryNames::Star;
            }
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(n) => names.push(n),
                Err(_) => return VaryNames::Malformed,
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    VaryNames::Names(names)
}

/// The SHA-256 of the request's values of `names`: each name, then either "absent" or its
/// lines joined with `,`, each line trimmed of surrounding whitespace (RFC 9111 §4.1 allows
/// combining lines and removing whitespace). Length-prefixed, so no two inputs collide by
/// concatenation.
pub(crate) fn variant_digest(names: &[HeaderName], request: &HeaderMap) -> [u8; 32] {
    let mut hash = Sha256::new();
    for name in names {
        hash.update((name.as_str().len() as u64).to_be_bytes());
        hash.update(name.as_str().as_bytes());
        let mut lines = request.get_all(name).iter().peekable();
        if lines.peek().is_none() {
            hash.update([0u8]);
            continue;
        }
        let mut value = Vec::new();
        for (i, line) in lines.enumerate() {
            if i > 0 {
                value.push(b',');
            }
            value.extend_from_slice(line.as_bytes().trim_ascii());
        }
        hash.update([1u8]);
        hash.update((value.len() as u64).to_be_bytes());
        hash.update(&value);
    }
    hash.finalize().into()
}

/// The key of one variant under the vary spec of generation `generation`.
pub(crate) fn variant_key(primary: &str, generation: u64, digest: &[u8; 32]) -> String {
    format!("{primary}\n{generation:016x}\n{}", hex::encode(digest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hosts_are_normalised() {
        assert_eq!(
            normalise_host("Example.COM:80", "http").as_deref(),
            Some("example.com")
        );
        assert_eq!(
            normalise_host("example.com:80", "https").as_deref(),
            Some("example.com:80")
        );
        assert_eq!(normalise_host("user@example.com", "http"), None);
        assert_eq!(normalise_host("exa mple", "http"), None);
    }

    #[test]
    fn primary_key_from_host_header_or_absolute_uri() {
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("a.test"));
        let origin_form: Uri = "/x?b=1&a=2".parse().unwrap();
        assert_eq!(
            primary_key("p:", "http", &origin_form, &h).as_deref(),
            Some("p:http://a.test/x?b=1&a=2")
        );
        let absolute: Uri = "https://B.test:443/y".parse().unwrap();
        assert_eq!(
            primary_key("p:", "http", &absolute, &HeaderMap::new()).as_deref(),
            Some("p:https://b.test/y")
        );
        assert_eq!(
            primary_key("p:", "http", &origin_form, &HeaderMap::new()),
            None
        );
    }

    #[test]
    fn a_host_header_naming_another_host_than_the_uri_conflicts() {
        let host = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(HOST, HeaderValue::from_static(v));
            h
        };
        let absolute: Uri = "http://Example.com:80/p".parse().unwrap();
        assert!(!host_conflict("http", &absolute, &host("example.COM")));
        assert!(!host_conflict("http", &absolute, &host("example.com:80")));
        assert!(host_conflict("http", &absolute, &host("evil.test")));
        assert!(host_conflict("http", &absolute, &host("example.com:8080")));
        assert!(!host_conflict("http", &absolute, &HeaderMap::new()));
        let tls: Uri = "https://example.com/p".parse().unwrap();
        assert!(!host_conflict("http", &tls, &host("example.com:443")));
        assert!(host_conflict("http", &tls, &host("example.com:80")));
        let origin_form: Uri = "/p".parse().unwrap();
        assert!(!host_conflict("http", &origin_form, &host("evil.test")));
        let mut two = host("example.com");
        two.append(HOST, HeaderValue::from_static("example.com"));
        assert!(host_conflict("http", &absolute, &two));
    }

    #[test]
    fn vary_is_parsed_and_digests_differ() {
        let mut h = HeaderMap::new();
        h.append(
            http::header::VARY,
            HeaderValue::from_static("Accept-Encoding, accept"),
        );
        h.append(
            http::header::VARY,
            HeaderValue::from_static("accept-encoding"),
        );
        let VaryNames::Names(names) = vary_names(&h) else {
            panic!("names expected")
        };
        assert_eq!(
            names,
            vec![http::header::ACCEPT, http::header::ACCEPT_ENCODING]
        );
        let mut star = HeaderMap::new();
        star.insert(http::header::VARY, HeaderValue::from_static("accept, *"));
        assert_eq!(vary_names(&star), VaryNames::Star);

        let mut gzip = HeaderMap::new();
        gzip.insert(
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static(" gzip "),
        );
        let mut gzip2 = HeaderMap::new();
        gzip2.insert(
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip"),
        );
        let empty = HeaderMap::new();
        assert_eq!(
            variant_digest(&names, &gzip),
            variant_digest(&names, &gzip2)
        );
        assert_ne!(
            variant_digest(&names, &gzip),
            variant_digest(&names, &empty)
        );
    }
}
