//! `Cache-Control` parsing (RFC 9111 §5.2), for requests and responses.
//!
//! Directive names are case-insensitive; arguments are a token or a quoted string. A
//! `delta-seconds` larger than 2³¹ is read as 2³¹ (§1.2.2). A freshness directive that appears
//! twice or has a malformed argument makes the response stale (§4.2.1 allows "the first one"
//! or "stale"; stale is the strict choice), so it is never stored.
//!
//! Each field line is parsed as bytes: a quoted argument (and an unquoted one) may hold bytes
//! outside ASCII (`x-note="café"`) without hiding the line's other directives. A line that
//! does not parse (a directive name that is not a token, an unterminated quoted string,
//! something other than a comma after a directive) is *malformed*: the conservative reading
//! is `no-store`, for a request and a response alike (see [`ResponseDirectives::malformed`]).

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

/// The directives of every `Cache-Control` line of `headers`, and whether some line did not
/// parse (its directives are then left out).
fn directives(headers: &HeaderMap) -> (Vec<Directive>, bool) {
    let mut out = Vec::new();
    let mut malformed = false;
    for line in headers.get_all(CACHE_CONTROL) {
        match parse_line(line.as_bytes()) {
            Some(line) => out.extend(line),
            None => malformed = true,
        }
    }
    (out, malformed)
}

/// A `tchar` (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `b` without surrounding spaces and tabs.
fn trim_ows(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !matches!(c, b' ' | b'\t'));
    let end = b.iter().rposition(|c| !matches!(c, b' ' | b'\t'));
    match (start, end) {
        (Some(s), Some(e)) => &b[s..=e],
        _ => &[],
    }
}

/// The directives of one field line (`#cache-directive`: empty list elements allowed), or
/// `None` when it does not parse. Whitespace around `=` is tolerated.
fn parse_line(line: &[u8]) -> Option<Vec<Directive>> {
    let mut out = Vec::new();
    let mut rest = trim_ows(line);
    while !rest.is_empty() {
        if rest[0] == b',' {
            rest = trim_ows(&rest[1..]);
            continue;
        }
        let name_len = rest.iter().take_while(|b| is_tchar(**b)).count();
        if name_len == 0 {
            return None;
        }
        let name = String::from_utf8_lossy(&rest[..name_len]).to_ascii_lowercase();
        rest = trim_ows(&rest[name_len..]);
        let argument = match rest.split_first() {
            Some((b'=', after)) => {
                let after = trim_ows(after);
                if let Some(quoted) = after.strip_prefix(b"\"") {
                    let (value, after) = quoted_string(quoted)?;
                    rest = trim_ows(after);
                    Some(String::from_utf8_lossy(&value).into_owned())
                } else {
                    // A token, or something else that the directive's own parser judges (a
                    // malformed `max-age` makes the response stale).
                    let end = after.iter().position(|b| *b == b',').unwrap_or(after.len());
                    rest = &after[end..];
                    Some(String::from_utf8_lossy(trim_ows(&after[..end])).into_owned())
                }
            }
            _ => None,
        };
        match rest.split_first() {
            None => {}
            Some((b',', after)) => rest = trim_ows(after),
            Some(_) => return None,
        }
        out.push(Directive { name, argument });
    }
    Some(out)
}

/// The content of a quoted string whose opening quote was read (escapes resolved), and the
/// bytes after its closing quote; `None` when it is not closed.
fn quoted_string(bytes: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let mut value = Vec::new();
    let mut escaped = false;
    for (i, b) in bytes.iter().enumerate() {
        match *b {
            c if escaped => {
                value.push(c);
                escaped = false;
            }
            b'\\' => escaped = true,
            b'"' => return Some((value, &bytes[i + 1..])),
            c => value.push(c),
        }
    }
    None
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
    /// A `Cache-Control` line did not parse, so what it said is unknown (it might have said
    /// `private`): the response is not stored, whatever else the field says (even with
    /// `must-understand`).
    pub(crate) malformed: bool,
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
            malformed: false,
        };
        let (directives, malformed) = directives(headers);
        d.malformed = malformed;
        for Directive { name, argument } in directives {
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
    /// A line that does not parse reads as `no-store` (the request bypasses the cache): what
    /// it said is unknown, and it might have been `no-store`.
    pub(crate) fn parse(headers: &HeaderMap) -> Self {
        let mut d = RequestDirectives::default();
        let (directives, malformed) = directives(headers);
        d.no_store = malformed;
        for Directive { name, argument } in directives {
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

    fn raw(lines: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(CACHE_CONTROL, HeaderValue::from_bytes(l).unwrap());
        }
        h
    }

    #[test]
    fn bytes_outside_ascii_do_not_hide_a_line() {
        let d = ResponseDirectives::parse(&raw(&[
            b"max-age=60",
            b"private, x-note=\"caf\xc3\xa9, \\\"still\\\" quoted\", no-cache=\"x-a\"",
        ]));
        assert_eq!(d.private, Qualifiable::Whole);
        assert_eq!(d.no_cache, Qualifiable::Fields(vec!["x-a".into()]));
        assert_eq!(d.max_age, Seconds::Value(60));
        assert!(!d.malformed);
        let d = ResponseDirectives::parse(&raw(&[b"x=caf\xe9 , public , max-age = 5"]));
        assert!(d.public && !d.malformed);
        assert_eq!(d.max_age, Seconds::Value(5));
        assert!(RequestDirectives::parse(&raw(&[b"no-store, x=\"\xe9\""])).no_store);
        let d = RequestDirectives::parse(&raw(&[b"max-age=5, x=\"\xe9\""]));
        assert_eq!((d.no_store, d.max_age), (false, Some(5)));
    }

    #[test]
    fn a_line_that_does_not_parse_is_no_store() {
        for line in [
            &b"caf\xc3\xa9, public"[..],
            b"private=\"unterminated, max-age=60",
            b"public; max-age=60",
            b"max-age=\"60\"junk",
            b"=60",
        ] {
            let d = ResponseDirectives::parse(&raw(&[b"max-age=60", line]));
            assert!(d.malformed, "{line:?}");
            assert!(RequestDirectives::parse(&raw(&[line])).no_store, "{line:?}");
        }
        let d = ResponseDirectives::parse(&raw(&[b" , max-age=60 ,, public ,"]));
        assert!(!d.malformed && d.public);
    }
}
