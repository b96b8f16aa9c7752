//! `Cache-Control` parsing (RFC 9111 §5.2), for requests and responses.
//!
//! Directive names are case-insensitive; arguments are a token or a quoted string. A
//! `delta-seconds` larger than 2³¹ is read as 2³¹ (§1.2.2). A freshness directive that appears
//! twice or has a malformed argument makes the response stale (§4.2.1 allows "the first one"
//! or "stale"; stale is the strict choice), so it is never stored.

use http::HeaderMap;
use http::header::CACHE_CONTROL;

/// The value §1.2.2 says to use for a delta-seconds too large to represent.
const DELTA_SECONDS_CAP: u64 = 1 << 31;

/// One directive: its lowercase name and its argument (quotes removed), if any.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Directive {
    name: String,
    argument: Option<String>,
}

/// Splits every `Cache-Control` line of `headers` into directives. Commas inside a quoted
/// string do not split; a line that is not visible ASCII is skipped whole.
fn directives(headers: &HeaderMap) -> Vec<Directive> {
    let mut out = Vec::new();
    for line in headers.get_all(CACHE_CONTROL) {
        let Ok(line) = line.to_str() else { continue };
        let mut rest = line;
        while !rest.is_empty() {
            let (item, after) = split_item(rest);
            rest = after;
            let item = item.trim_matches([' ', '\t']);
            if item.is_empty() {
                continue;
            }
            let (name, argument) = match item.split_once('=') {
                Some((n, a)) => {
                    let a = a.trim_matches([' ', '\t']);
                    let a = match a.strip_prefix('"').and_then(|a| a.strip_suffix('"')) {
                        Some(quoted) => quoted.replace("\\\"", "\"").replace("\\\\", "\\"),
                        None => a.to_owned(),
                    };
                    (n.trim_matches([' ', '\t']), Some(a))
                }
                None => (item, None),
            };
            out.push(Directive {
                name: name.to_ascii_lowercase(),
                argument,
            });
        }
    }
    out
}

/// The first comma-separated item of `s` (commas inside quotes kept) and the rest after it.
fn split_item(s: &str) -> (&str, &str) {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => return (&s[..i], &s[i + 1..]),
            _ => {}
        }
    }
    (s, "")
}

/// A `delta-seconds` argument: `Some(n)` (capped at 2³¹), or `None` when malformed.
fn delta_seconds(argument: Option<&str>) -> Option<u64> {
    let a = argument?;
    if a.is_empty() || !a.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        a.parse::<u64>()
            .unwrap_or(DELTA_SECONDS_CAP)
            .min(DELTA_SECONDS_CAP),
    )
}

/// The lowercase field names of a qualified `private="a, b"` or `no-cache="a"`.
fn field_names(argument: &str) -> Vec<String> {
    argument
        .split(',')
        .map(|f| f.trim_matches([' ', '\t']).to_ascii_lowercase())
        .filter(|f| !f.is_empty())
        .collect()
}

/// A directive that may be plain or qualified with field names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Qualifiable {
    /// Not present.
    Absent,
    /// Present without field names: applies to the whole response.
    Whole,
    /// Present with field names: applies to those header fields only.
    Fields(Vec<String>),
}

/// A freshness directive (`max-age`, `s-maxage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seconds {
    /// Not present.
    Absent,
    /// Present once with a valid value.
    Value(u64),
    /// Present twice, or malformed: the response is stale.
    Invalid,
}

impl Seconds {
    fn record(&mut self, argument: Option<&str>) {
        *self = match (*self, delta_seconds(argument)) {
            (Seconds::Absent, Some(v)) => Seconds::Value(v),
            _ => Seconds::Invalid,
        };
    }

    /// True when present (valid or not).
    pub(crate) fn is_present(self) -> bool {
        self != Seconds::Absent
    }
}

/// The response directives a shared cache acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResponseDirectives {
    pub(crate) max_age: Seconds,
    pub(crate) s_maxage: Seconds,
    pub(crate) no_store: bool,
    pub(crate) no_cache: Qualifiable,
    pub(crate) private: Qualifiable,
    pub(crate) public: bool,
    pub(crate) must_revalidate: bool,
    pub(crate) proxy_revalidate: bool,
    pub(crate) must_understand: bool,
    /// RFC 5861's `stale-if-error`, when valid.
    pub(crate) stale_if_error: Option<u64>,
    /// RFC 5861's `stale-while-revalidate`, when valid.
    pub(crate) stale_while_revalidate: Option<u64>,
}

impl ResponseDirectives {
    pub(crate) fn parse(headers: &HeaderMap) -> Self {
        let mut d = ResponseDirectives {
            max_age: Seconds::Absent,
            s_maxage: Seconds::Absent,
            no_store: false,
            no_cache: Qualifiable::Absent,
            private: Qualifiable::Absent,
            public: false,
            must_revalidate: false,
            proxy_revalidate: false,
            must_understand: false,
            stale_if_error: None,
            stale_while_revalidate: None,
        };
        for Directive { name, argument } in directives(headers) {
            let arg = argument.as_deref();
            match name.as_str() {
                "max-age" => d.max_age.record(arg),
                "s-maxage" => d.s_maxage.record(arg),
                "no-store" => d.no_store = true,
                "no-cache" => d.no_cache = qualify(d.no_cache, arg),
                "private" => d.private = qualify(d.private, arg),
                "public" => d.public = true,
                "must-revalidate" => d.must_revalidate = true,
                "proxy-revalidate" => d.proxy_revalidate = true,
                "must-understand" => d.must_understand = true,
                "stale-if-error" => d.stale_if_error = delta_seconds(arg),
                "stale-while-revalidate" => d.stale_while_revalidate = delta_seconds(arg),
                _ => {}
            }
        }
        d
    }

    /// True when a stale copy must never be served (`must-revalidate`, `proxy-revalidate`,
    /// and `s-maxage`, which implies `proxy-revalidate` for a shared cache: §5.2.2.10).
    pub(crate) fn forbids_stale(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate || self.s_maxage.is_present()
    }
}

/// Merges one more occurrence: a plain occurrence wins over field lists (it covers more).
fn qualify(previous: Qualifiable, argument: Option<&str>) -> Qualifiable {
    let fields = argument.map(field_names).unwrap_or_default();
    match previous {
        Qualifiable::Whole => Qualifiable::Whole,
        _ if fields.is_empty() => Qualifiable::Whole,
        Qualifiable::Fields(mut before) => {
            before.extend(fields);
            Qualifiable::Fields(before)
        }
        Qualifiable::Absent => Qualifiable::Fields(fields),
    }
}

/// The request directives a cache acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RequestDirectives {
    pub(crate) no_store: bool,
    pub(crate) no_cache: bool,
    /// The oldest response the client accepts, in seconds. A malformed value reads as 0
    /// (the conservative reading: nothing stored is acceptable).
    pub(crate) max_age: Option<u64>,
    /// How much freshness the response must still have, in seconds.
    pub(crate) min_fresh: Option<u64>,
    pub(crate) only_if_cached: bool,
}

impl RequestDirectives {
    pub(crate) fn parse(headers: &HeaderMap) -> Self {
        let mut d = RequestDirectives::default();
        for Directive { name, argument } in directives(headers) {
            let arg = argument.as_deref();
            match name.as_str() {
                "no-store" => d.no_store = true,
                "no-cache" => d.no_cache = true,
                "max-age" => {
                    let v = delta_seconds(arg).unwrap_or(0);
                    d.max_age = Some(d.max_age.map_or(v, |before| before.min(v)));
                }
                "min-fresh" => {
                    let v = delta_seconds(arg).unwrap_or(0);
                    d.min_fresh = Some(d.min_fresh.map_or(v, |before| before.max(v)));
                }
                "only-if-cached" => d.only_if_cached = true,
                _ => {}
            }
        }
        d
    }

    /// True when no stored response may be used, however fresh (`no-cache`, `max-age=0`).
    pub(crate) fn refuses_stored(&self) -> bool {
        self.no_cache || self.max_age == Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(CACHE_CONTROL, HeaderValue::from_str(l).unwrap());
        }
        h
    }

    #[test]
    fn response_directives_across_lines_and_quotes() {
        let d = ResponseDirectives::parse(&headers(&[
            "Public, MAX-AGE=60",
            "no-cache=\"Set-Cookie, X-Foo\", s-maxage=\"30\"",
        ]));
        assert!(d.public);
        assert_eq!(d.max_age, Seconds::Value(60));
        assert_eq!(d.s_maxage, Seconds::Value(30));
        assert_eq!(
            d.no_cache,
            Qualifiable::Fields(vec!["set-cookie".into(), "x-foo".into()])
        );
        assert!(d.forbids_stale());
    }

    #[test]
    fn duplicate_or_malformed_freshness_is_invalid() {
        let d = ResponseDirectives::parse(&headers(&["max-age=60", "max-age=60"]));
        assert_eq!(d.max_age, Seconds::Invalid);
        let d = ResponseDirectives::parse(&headers(&["max-age=-1"]));
        assert_eq!(d.max_age, Seconds::Invalid);
        let d = ResponseDirectives::parse(&headers(&["max-age=99999999999999999999999"]));
        assert_eq!(d.max_age, Seconds::Value(1 << 31));
    }

    #[test]
    fn request_directives() {
        let d = RequestDirectives::parse(&headers(&["max-age=0"]));
        assert!(d.refuses_stored());
        let d = RequestDirectives::parse(&headers(&["max-age=10, min-fresh=5, only-if-cached"]));
        assert_eq!((d.max_age, d.min_fresh), (Some(10), Some(5)));
        assert!(d.only_if_cached && !d.refuses_stored());
        assert!(RequestDirectives::parse(&headers(&["no-store"])).no_store);
    }
}
