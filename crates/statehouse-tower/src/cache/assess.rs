//! Whether a response may be stored (RFC 9111 §3, §3.5, §4.2), and for how long.

use std::time::{Duration, UNIX_EPOCH};

use http::header::{AGE, CONNECTION, DATE, ETAG, EXPIRES, LAST_MODIFIED, SET_COOKIE};
use http::{HeaderMap, HeaderName, StatusCode};
use statehouse::Timestamp;
use statehouse::statehouse_core::cache::MAX_TAGS;

use super::control::{Qualifiable, ResponseDirectives, Seconds};
use super::key::{VaryNames, vary_names};
use super::layer::Config;
use super::stats::NotStoredReason;

/// A storable response's storage plan.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// The header fields to store (hop-by-hop, `Age`, `Cache-Status` and fields a qualified
    /// `private` / `no-cache` names removed).
    pub(crate) headers: HeaderMap,
    pub(crate) initial_age: Duration,
    pub(crate) fresh_until: Timestamp,
    pub(crate) stale_until: Timestamp,
    /// The `Vary` names (empty: the response does not vary).
    pub(crate) vary: Vec<HeaderName>,
    /// The response's tags, as sent.
    pub(crate) tags: Vec<String>,
}

/// The statuses this cache "understands" for `must-understand` (§5.2.2.3): the heuristically
/// cacheable ones, whose semantics need nothing special from a cache.
fn understood(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Header fields a cache never stores (§3.1): hop-by-hop fields, and the ones this cache
/// regenerates (`Age`, `Cache-Status`).
const NOT_STORED: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "trailer",
    "age",
    "cache-status",
];

/// An HTTP-date as a timestamp; `None` when malformed (RFC 9110 §5.6.7: all three formats).
pub(crate) fn http_date(headers: &HeaderMap, name: HeaderName) -> Option<Option<Timestamp>> {
    let mut lines = headers.get_all(name).iter();
    let first = lines.next()?;
    if lines.next().is_some() {
        return Some(None); // two lines: treated as invalid
    }
    let parsed = first
        .to_str()
        .ok()
        .and_then(|s| httpdate::parse_http_date(s).ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| Timestamp::from_micros(u64::try_from(d.as_micros()).unwrap_or(u64::MAX)));
    Some(parsed)
}

fn age_value(headers: &HeaderMap) -> Duration {
    headers
        .get(AGE)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .map(|s| s.parse::<u64>().unwrap_or(1 << 31).min(1 << 31))
        .map_or(Duration::ZERO, Duration::from_secs)
}

/// Decides on the response to a GET. `authorized`: the request carried `Authorization` (only
/// possible here when the layer allows such requests).
pub(crate) fn assess(
    status: StatusCode,
    headers: &HeaderMap,
    authorized: bool,
    config: &Config,
    request_time: Timestamp,
    response_time: Timestamp,
) -> Result<Plan, NotStoredReason> {
    if status.is_informational() || matches!(status.as_u16(), 206 | 304) {
        return Err(NotStoredReason::Status);
    }
    let cc = ResponseDirectives::parse(headers);
    if cc.malformed {
        // A `Cache-Control` line that does not parse might have said `private` or `no-store`.
        return Err(NotStoredReason::NoStore);
    }
    if cc.must_understand {
        // §5.2.2.3: store only what is understood, and then no-store may be ignored.
        if !understood(status) {
            return Err(NotStoredReason::Status);
        }
    } else if cc.no_store {
        return Err(NotStoredReason::NoStore);
    }
    let mut dropped: Vec<String> = Vec::new();
    match &cc.private {
        Qualifiable::Whole => return Err(NotStoredReason::Private),
        Qualifiable::Fields(f) => dropped.extend(f.iter().cloned()),
        Qualifiable::Absent => {}
    }
    // An unqualified `no-cache` response may be stored, but never used without a successful
    // revalidation (§5.2.2.4): kept as a stale entry to revalidate, when it has a validator to
    // revalidate with and revalidation is on; otherwise it could never serve.
    let always_revalidate = match &cc.no_cache {
        Qualifiable::Whole => {
            let validator = headers.contains_key(ETAG) || headers.contains_key(LAST_MODIFIED);
            if !validator || config.revalidate_window.is_zero() {
                return Err(NotStoredReason::NoCache);
            }
            true
        }
        Qualifiable::Fields(f) => {
            dropped.extend(f.iter().cloned());
            false
        }
        Qualifiable::Absent => false,
    };
    if authorized && !(cc.public || cc.s_maxage.is_present() || cc.must_revalidate) {
        return Err(NotStoredReason::Authorization);
    }
    let set_cookie_dropped = dropped.iter().any(|f| f == "set-cookie");
    if headers.contains_key(SET_COOKIE) && !set_cookie_dropped && !config.store_set_cookie {
        return Err(NotStoredReason::SetCookie);
    }
    let vary = match vary_names(headers) {
        VaryNames::Star | VaryNames::Malformed => return Err(NotStoredReason::VaryStar),
        VaryNames::Names(n) if n.len() > config.max_vary_headers => {
            return Err(NotStoredReason::TooManyVary);
        }
        VaryNames::Names(n) => n,
    };

    // §4.2.1: s-maxage (a shared cache), then max-age, then Expires − Date.
    let date = http_date(headers, DATE).flatten();
    let lifetime = match (cc.s_maxage, cc.max_age) {
        _ if always_revalidate => Duration::ZERO,
        (Seconds::Value(s), _) => Duration::from_secs(s),
        (Seconds::Invalid, _) => return Err(NotStoredReason::NoFreshness),
        (Seconds::Absent, Seconds::Value(s)) => Duration::from_secs(s),
        (Seconds::Absent, Seconds::Invalid) => return Err(NotStoredReason::NoFreshness),
        (Seconds::Absent, Seconds::Absent) => match http_date(headers, EXPIRES) {
            None => return Err(NotStoredReason::NoFreshness),
            // An invalid Expires ("0" included) means "already expired".
            Some(None) => return Err(NotStoredReason::StaleOnArrival),
            Some(Some(expires)) => expires.saturating_duration_since(date.unwrap_or(response_time)),
        },
    };
    let lifetime = lifetime.min(config.max_ttl);

    // §4.2.3: the age the response had when it arrived.
    let apparent_age = date.map_or(Duration::ZERO, |d| {
        response_time.saturating_duration_since(d)
    });
    let response_delay = response_time.saturating_duration_since(request_time);
    let corrected_age_value = age_value(headers) + response_delay;
    let initial_age = apparent_age.max(corrected_age_value);
    if lifetime <= initial_age && !always_revalidate {
        return Err(NotStoredReason::StaleOnArrival);
    }
    let fresh_until = response_time.saturating_add(lifetime.saturating_sub(initial_age));
    let stale_window = match cc.stale_if_error {
        Some(s) if !cc.forbids_stale() && !always_revalidate => {
            Duration::from_secs(s).min(config.max_ttl)
        }
        _ => Duration::ZERO,
    };
    let stale_until = fresh_until.saturating_add(stale_window);

    let mut tags = Vec::new();
    for line in headers.get_all(&config.tag_header) {
        let Ok(line) = line.to_str() else {
            return Err(NotStoredReason::Tags);
        };
        tags.extend(
            line.split(',')
                .map(|t| t.trim_matches([' ', '\t']))
                .filter(|t| !t.is_empty())
                .map(str::to_owned),
        );
    }
    tags.sort();
    tags.dedup();
    if tags.len() > MAX_TAGS || tags.iter().any(|t| t.len() > 512) {
        return Err(NotStoredReason::Tags);
    }

    let mut stored = headers.clone();
    let connection_named: Vec<String> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim_matches([' ', '\t']).to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    for name in NOT_STORED
        .iter()
        .map(|s| (*s).to_owned())
        .chain(connection_named)
        .chain(dropped)
    {
        stored.remove(name.as_str());
    }
    if config.strip_tag_header {
        // Otherwise kept, so hits carry it like forwarded responses do.
        stored.remove(&config.tag_header);
    }

    Ok(Plan {
        headers: stored,
        initial_age,
        fresh_until,
        stale_until,
        vary,
        tags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn at(secs: u64) -> Timestamp {
        Timestamp::from_micros(secs * 1_000_000)
    }

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (n, v) in pairs {
            m.append(*n, HeaderValue::from_static(v));
        }
        m
    }

    fn run(pairs: &[(&'static str, &'static str)]) -> Result<Plan, NotStoredReason> {
        assess(
            StatusCode::OK,
            &h(pairs),
            false,
            &Config::default(),
            at(1_000),
            at(1_000),
        )
    }

    #[test]
    fn freshness_sources_in_order() {
        let p = run(&[("cache-control", "max-age=60, s-maxage=10")]).unwrap();
        assert_eq!(p.fresh_until, at(1_010));
        let p = run(&[("cache-control", "max-age=60"), ("age", "20")]).unwrap();
        assert_eq!(p.fresh_until, at(1_040));
        assert_eq!(
            run(&[("cache-control", "max-age=20"), ("age", "20")]).unwrap_err(),
            NotStoredReason::StaleOnArrival
        );
        assert_eq!(
            run(&[("cache-control", "public")]).unwrap_err(),
            NotStoredReason::NoFreshness
        );
        assert_eq!(
            run(&[("expires", "0")]).unwrap_err(),
            NotStoredReason::StaleOnArrival
        );
    }

    #[test]
    fn expires_minus_date() {
        let p = run(&[
            ("date", "Thu, 01 Jan 1970 00:16:40 GMT"),    // 1000 s
            ("expires", "Thu, 01 Jan 1970 00:17:40 GMT"), // 1060 s
        ])
        .unwrap();
        assert_eq!(p.fresh_until, at(1_060));
    }

    #[test]
    fn stale_if_error_unless_forbidden() {
        let p = run(&[("cache-control", "max-age=10, stale-if-error=30")]).unwrap();
        assert_eq!(p.stale_until, at(1_040));
        let p = run(&[(
            "cache-control",
            "max-age=10, stale-if-error=30, must-revalidate",
        )])
        .unwrap();
        assert_eq!(p.stale_until, p.fresh_until);
    }

    #[test]
    fn qualified_private_drops_fields_only() {
        let p = run(&[
            ("cache-control", "max-age=10, private=\"set-cookie\""),
            ("set-cookie", "a=b"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("x-kept", "1"),
        ])
        .unwrap();
        assert!(p.headers.get("set-cookie").is_none());
        assert!(p.headers.get("x-hop").is_none());
        assert!(p.headers.get("x-kept").is_some());
    }
}
