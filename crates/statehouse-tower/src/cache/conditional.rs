//! Conditional requests answered from a stored response (RFC 9111 §4.3.2, with the
//! preconditions of RFC 9110 §13): a client that already holds the representation
//! (`If-None-Match` with its `ETag`, or `If-Modified-Since`) gets a `304 Not Modified` without
//! the body, instead of the whole response again.

use http::header::{
    CACHE_CONTROL, CONTENT_LOCATION, DATE, ETAG, EXPIRES, IF_MODIFIED_SINCE, IF_NONE_MATCH,
    LAST_MODIFIED, VARY,
};
use http::{HeaderMap, Method, StatusCode};

use super::assess::http_date;

/// The fields a 304 carries from the stored response (RFC 9110 §15.4.5: those a 200 would
/// have sent that guide caches, plus `Last-Modified` for the next `If-Modified-Since`).
pub(crate) const NOT_MODIFIED_FIELDS: [http::header::HeaderName; 7] = [
    CACHE_CONTROL,
    CONTENT_LOCATION,
    DATE,
    ETAG,
    EXPIRES,
    VARY,
    LAST_MODIFIED,
];

/// Whether a GET or HEAD request's preconditions say the client's copy of `stored` (a `200`)
/// is current, so that `304 Not Modified` is the answer (RFC 9110 §13.2.2, steps 3 and 4):
/// `If-None-Match` when present (weak comparison; `*` matches any stored representation),
/// else `If-Modified-Since` against the stored `Last-Modified`. An unparsable field is
/// ignored, as the RFC requires, and so the full response is sent.
pub(crate) fn not_modified(
    method: &Method,
    request: &HeaderMap,
    status: StatusCode,
    stored: &HeaderMap,
) -> bool {
    if (method != Method::GET && method != Method::HEAD) || status != StatusCode::OK {
        return false;
    }
    if request.contains_key(IF_NONE_MATCH) {
        let Some(etag) = stored.get(ETAG).and_then(|v| v.to_str().ok()) else {
            // No validator: only `*` could match (there is a representation).
            return if_none_match_lists(request).any(|tag| tag == "*");
        };
        let etag = opaque(etag.trim());
        return if_none_match_lists(request).any(|tag| tag == "*" || opaque(tag) == etag);
    }
    let (Some(Some(since)), Some(Some(modified))) = (
        http_date(request, IF_MODIFIED_SINCE),
        http_date(stored, LAST_MODIFIED),
    ) else {
        return false;
    };
    modified <= since
}

/// The entity tags of every `If-None-Match` line, trimmed (RFC 9110 §13.1.2: a list).
fn if_none_match_lists(request: &HeaderMap) -> impl Iterator<Item = &str> {
    request
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|line| line.split(','))
        .map(str::trim)
        .filter(|tag| !tag.is_empty())
}

/// An entity tag without its weakness prefix, for the weak comparison (RFC 9110 §8.8.3.2).
fn opaque(tag: &str) -> &str {
    tag.strip_prefix("W/").unwrap_or(tag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(http::header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        h
    }

    #[test]
    fn if_none_match_uses_the_weak_comparison_and_lists() {
        let stored = headers(&[(ETAG, "\"v1\"")]);
        let ok = StatusCode::OK;
        let get = &Method::GET;
        for matching in ["\"v1\"", "W/\"v1\"", "\"a\", \"v1\"", "*", " \"v1\" "] {
            let req = headers(&[(IF_NONE_MATCH, matching)]);
            assert!(not_modified(get, &req, ok, &stored), "{matching}");
        }
        for other in ["\"v2\"", "\"V1\"", "v1", ""] {
            let req = headers(&[(IF_NONE_MATCH, other)]);
            assert!(!not_modified(get, &req, ok, &stored), "{other}");
        }
        let weak_stored = headers(&[(ETAG, "W/\"v1\"")]);
        let req = headers(&[(IF_NONE_MATCH, "\"v1\"")]);
        assert!(not_modified(get, &req, ok, &weak_stored));
        // Two lines are one list.
        let mut req = headers(&[(IF_NONE_MATCH, "\"x\"")]);
        req.append(IF_NONE_MATCH, HeaderValue::from_static("\"v1\""));
        assert!(not_modified(get, &req, ok, &stored));
        // No stored validator: only `*`.
        let bare = HeaderMap::new();
        assert!(!not_modified(
            get,
            &headers(&[(IF_NONE_MATCH, "\"v1\"")]),
            ok,
            &bare
        ));
        assert!(not_modified(
            get,
            &headers(&[(IF_NONE_MATCH, "*")]),
            ok,
            &bare
        ));
    }

    #[test]
    fn if_none_match_takes_precedence_over_if_modified_since() {
        let stored = headers(&[
            (ETAG, "\"v1\""),
            (LAST_MODIFIED, "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        let req = headers(&[
            (IF_NONE_MATCH, "\"v2\""),
            (IF_MODIFIED_SINCE, "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        assert!(!not_modified(&Method::GET, &req, StatusCode::OK, &stored));
    }

    #[test]
    fn if_modified_since_compares_with_last_modified() {
        let stored = headers(&[(LAST_MODIFIED, "Sun, 06 Nov 1994 08:49:37 GMT")]);
        let ok = StatusCode::OK;
        let at = |since: &str| headers(&[(IF_MODIFIED_SINCE, since)]);
        assert!(not_modified(
            &Method::GET,
            &at("Sun, 06 Nov 1994 08:49:37 GMT"),
            ok,
            &stored
        ));
        assert!(not_modified(
            &Method::HEAD,
            &at("Mon, 07 Nov 1994 00:00:00 GMT"),
            ok,
            &stored
        ));
        assert!(!not_modified(
            &Method::GET,
            &at("Sat, 05 Nov 1994 00:00:00 GMT"),
            ok,
            &stored
        ));
        // Malformed, or nothing to compare with: the full response.
        assert!(!not_modified(&Method::GET, &at("yesterday"), ok, &stored));
        let bare = HeaderMap::new();
        assert!(!not_modified(
            &Method::GET,
            &at("Sun, 06 Nov 1994 08:49:37 GMT"),
            ok,
            &bare
        ));
    }

    #[test]
    fn only_a_stored_200_of_a_get_or_head_is_answered_304() {
        let stored = headers(&[(ETAG, "\"v1\"")]);
        let req = headers(&[(IF_NONE_MATCH, "\"v1\"")]);
        assert!(!not_modified(&Method::POST, &req, StatusCode::OK, &stored));
        assert!(!not_modified(
            &Method::GET,
            &req,
            StatusCode::NOT_FOUND,
            &stored
        ));
    }
}
