//! The session cookie: its attributes ([`CookieConfig`]), reading it from `Cookie` headers and
//! writing `Set-Cookie`.
//!
//! Parsed and written by hand rather than with the `cookie` crate: the layer reads one cookie
//! whose value is 54 base64url characters (no quoting, no percent-encoding, nothing to
//! unescape) and writes one fixed set of attributes, which is a few dozen lines. Doing it here
//! also makes the security decisions explicit instead of inherited: a duplicated session
//! cookie makes the request anonymous (see [`lookup`]), and the `__Host-` rules are checked
//! when the configuration is built, not when a browser silently drops the cookie.

use std::time::Duration;

use http::HeaderMap;
use http::HeaderValue;
use http::header::COOKIE;
use statehouse::SessionToken;

use crate::Error;

/// The `SameSite` attribute.
///
/// **`Lax` is the default**: the cookie goes with top-level navigations from other sites (a
/// link to your site from an e-mail arrives signed in) but not with cross-site subrequests or
/// form posts, which is what stops classic CSRF. `Strict` also withholds it from those
/// navigations, so every link from elsewhere lands signed out; use it for high-value
/// applications where that is acceptable. `None` sends it everywhere and requires `Secure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SameSite {
    /// Never sent on cross-site requests.
    Strict,
    /// Sent on top-level cross-site navigations only (the default).
    #[default]
    Lax,
    /// Always sent (requires `Secure`).
    None,
}

impl SameSite {
    fn as_str(self) -> &'static str {
        match self {
            SameSite::Strict => "Strict",
            SameSite::Lax => "Lax",
            SameSite::None => "None",
        }
    }
}

/// The session cookie's name and attributes. The [`Default`] is the secure one (see the
/// [crate docs](crate#security-defaults) for why each value is what it is):
///
/// | attribute | default |
/// |---|---|
/// | name | `__Host-session` |
/// | `Secure` | yes |
/// | `HttpOnly` | yes |
/// | `SameSite` | `Lax` |
/// | `Path` | `/` |
/// | `Domain` | none |
/// | `Max-Age` | none: a session cookie, gone when the browser closes |
///
/// [`CookieConfig::development`] is for plain-HTTP `localhost` only: name `session`, no
/// `Secure` (browsers refuse a `__Host-` cookie without it).
///
/// ```
/// use std::time::Duration;
/// use statehouse_tower::{CookieConfig, SameSite};
///
/// let c = CookieConfig::default();
/// assert_eq!(c.name(), "__Host-session");
/// let c = CookieConfig::builder()
///     .same_site(SameSite::Strict)
///     .max_age(Some(Duration::from_secs(12 * 3600)))
///     .build()?;
/// assert_eq!(c.same_site(), SameSite::Strict);
///
/// // A `__Host-` cookie must be Secure, on Path=/, without Domain: rejected at build.
/// let err = CookieConfig::builder().domain("example.com").build().unwrap_err();
/// assert!(err.to_string().contains("domain"));
/// # Ok::<(), statehouse_tower::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieConfig {
    name: String,
    secure: bool,
    http_only: bool,
    same_site: SameSite,
    path: String,
    domain: Option<String>,
    max_age: Option<Duration>,
}

impl Default for CookieConfig {
    fn default() -> Self {
        CookieConfig {
            name: "__Host-session".into(),
            secure: true,
            http_only: true,
            same_site: SameSite::Lax,
            path: "/".into(),
            domain: None,
            max_age: None,
        }
    }
}

/// The longest `Max-Age` browsers keep (RFC 6265bis caps it at 400 days).
const MAX_MAX_AGE: Duration = Duration::from_secs(400 * 86_400);

impl CookieConfig {
    /// A builder starting from the secure defaults.
    pub fn builder() -> CookieConfigBuilder {
        CookieConfigBuilder {
            config: CookieConfig::default(),
        }
    }

    /// For plain-HTTP development on `localhost`: name `session`, not `Secure`, otherwise the
    /// defaults. Never use it behind a public address: the cookie would travel in clear text.
    ///
    /// ```
    /// use statehouse_tower::CookieConfig;
    /// let dev = CookieConfig::development();
    /// assert_eq!(dev.name(), "session");
    /// assert!(!dev.secure() && dev.http_only());
    /// ```
    pub fn development() -> CookieConfig {
        CookieConfig {
            name: "session".into(),
            secure: false,
            ..CookieConfig::default()
        }
    }

    /// A builder starting from this configuration.
    pub fn to_builder(&self) -> CookieConfigBuilder {
        CookieConfigBuilder {
            config: self.clone(),
        }
    }

    /// The cookie's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the cookie is `Secure` (sent over HTTPS only).
    pub fn secure(&self) -> bool {
        self.secure
    }

    /// Whether the cookie is `HttpOnly` (hidden from JavaScript).
    pub fn http_only(&self) -> bool {
        self.http_only
    }

    /// The `SameSite` attribute.
    pub fn same_site(&self) -> SameSite {
        self.same_site
    }

    /// The `Path` attribute.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The `Domain` attribute, if any.
    pub fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }

    /// The `Max-Age` of a persistent cookie; `None` for a session cookie.
    pub fn max_age(&self) -> Option<Duration> {
        self.max_age
    }

    /// `Set-Cookie` carrying `token`.
    pub(crate) fn set_cookie(&self, token: &SessionToken) -> HeaderValue {
        let mut s = format!("{}={}", self.name, token.encode());
        self.push_attributes(&mut s, self.max_age.map(|d| d.as_secs()));
        to_header_value(s)
    }

    /// `Set-Cookie` removing the cookie: same name, path and domain, an empty value, `Max-Age=0`
    /// and a past `Expires` for clients that predate `Max-Age` (as OWASP advises).
    pub(crate) fn clear_cookie(&self) -> HeaderValue {
        let mut s = format!("{}=", self.name);
        self.push_attributes(&mut s, Some(0));
        s.push_str("; Expires=Thu, 01 Jan 1970 00:00:00 GMT");
        to_header_value(s)
    }

    fn push_attributes(&self, s: &mut String, max_age_secs: Option<u64>) {
        s.push_str("; Path=");
        s.push_str(&self.path);
        if let Some(domain) = &self.domain {
            s.push_str("; Domain=");
            s.push_str(domain);
        }
        if let Some(secs) = max_age_secs {
            s.push_str(&format!("; Max-Age={secs}"));
        }
        if self.secure {
            s.push_str("; Secure");
        }
        if self.http_only {
            s.push_str("; HttpOnly");
        }
        s.push_str("; SameSite=");
        s.push_str(self.same_site.as_str());
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |field: &'static str, reason: &str| Error::InvalidConfig {
            field,
            reason: reason.into(),
        };
        let separators = "()<>@,;:\\\"/[]?={} \t";
        if self.name.is_empty()
            || self.name.len() > 256
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_graphic() && !separators.contains(c))
        {
            return Err(bad(
                "name",
                "must be 1 to 256 visible ASCII characters without separators",
            ));
        }
        let lower = self.name.to_ascii_lowercase();
        if lower.starts_with("__host-") {
            if !self.secure {
                return Err(bad("secure", "a `__Host-` cookie must be Secure"));
            }
            if self.path != "/" {
                return Err(bad("path", "a `__Host-` cookie must have Path=/"));
            }
            if self.domain.is_some() {
                return Err(bad("domain", "a `__Host-` cookie must not have a Domain"));
            }
        }
        if lower.starts_with("__secure-") && !self.secure {
            return Err(bad("secure", "a `__Secure-` cookie must be Secure"));
        }
        if self.same_site == SameSite::None && !self.secure {
            return Err(bad("same_site", "SameSite=None requires Secure"));
        }
        let attribute_ok = |v: &str| v.chars().all(|c| c.is_ascii_graphic() && c != ';');
        if !self.path.starts_with('/') || !attribute_ok(&self.path) {
            return Err(bad(
                "path",
                "must start with `/` and hold visible ASCII without `;`",
            ));
        }
        if let Some(domain) = &self.domain
            && (domain.is_empty() || !attribute_ok(domain))
        {
            return Err(bad("domain", "must be visible ASCII without `;`"));
        }
        if let Some(max_age) = self.max_age
            && (max_age < Duration::from_secs(1) || max_age > MAX_MAX_AGE)
        {
            return Err(bad("max_age", "must be between 1 s and 400 days"));
        }
        Ok(())
    }
}

/// Every part was checked at build (visible ASCII); the token is base64url.
fn to_header_value(s: String) -> HeaderValue {
    HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Builds a [`CookieConfig`]; invalid combinations are rejected by [`build`](Self::build)
/// with the field's name.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct CookieConfigBuilder {
    config: CookieConfig,
}

impl CookieConfigBuilder {
    /// The cookie's name (default `__Host-session`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    /// `Secure` (default true).
    pub fn secure(mut self, secure: bool) -> Self {
        self.config.secure = secure;
        self
    }

    /// `HttpOnly` (default true).
    pub fn http_only(mut self, http_only: bool) -> Self {
        self.config.http_only = http_only;
        self
    }

    /// `SameSite` (default `Lax`).
    pub fn same_site(mut self, same_site: SameSite) -> Self {
        self.config.same_site = same_site;
        self
    }

    /// `Path` (default `/`).
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.config.path = path.into();
        self
    }

    /// `Domain` (default none: the cookie goes to this host only, not its subdomains).
    pub fn domain(mut self, domain: impl Into<String>) -> Self {
        self.config.domain = Some(domain.into());
        self
    }

    /// `Max-Age`: `Some` makes a persistent cookie, re-sent whenever a request moves the
    /// session's expiry (a refreshing read, a write) and its token is still current; `None`
    /// (the default) a session cookie. Either way the server enforces the idle
    /// and absolute timeouts; the cookie's lifetime is only a hint to the browser.
    pub fn max_age(mut self, max_age: Option<Duration>) -> Self {
        self.config.max_age = max_age;
        self
    }

    /// Validates and builds.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field: a name that is not a cookie token; a
    /// `__Host-` name without `Secure`, with a `Path` other than `/` or with a `Domain`; a
    /// `__Secure-` name without `Secure`; `SameSite=None` without `Secure`; a path not starting
    /// with `/`; a `;` or control character in the path or domain; a `Max-Age` under 1 s or
    /// over 400 days.
    pub fn build(self) -> Result<CookieConfig, Error> {
        self.config.validate()?;
        Ok(self.config)
    }
}

/// What the request's `Cookie` headers say about the session.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// No session cookie.
    Absent,
    /// A session cookie holding a well-formed token.
    Token(SessionToken),
    /// A session cookie that cannot be a token, or two different session cookies: no session,
    /// and no store I/O.
    Rejected(&'static str),
}

/// Finds the session cookie named `name` in every `Cookie` header (HTTP/2 may split the cookies
/// of one request over several headers, RFC 9113 §8.2.3).
///
/// Two session cookies with different values make the request anonymous: a browser sends two
/// only when another host or path planted one (cookie tossing from a sibling subdomain, the
/// attack `__Host-` exists to stop), and picking either could log the user into the attacker's
/// session.
pub(crate) fn lookup(headers: &HeaderMap, name: &str) -> Lookup {
    let name = name.as_bytes();
    let mut found: Option<&[u8]> = None;
    for header in headers.get_all(COOKIE) {
        // Read as bytes: another cookie's value may hold bytes outside visible ASCII (browsers
        // send UTF-8 as it is), and it must not hide ours.
        for pair in header.as_bytes().split(|&b| b == b';') {
            let Some(eq) = pair.iter().position(|&b| b == b'=') else {
                continue;
            };
            if pair[..eq].trim_ascii() != name {
                continue;
            }
            let v = pair[eq + 1..].trim_ascii();
            match found {
                Some(previous) if previous != v => {
                    return Lookup::Rejected("several different session cookies");
                }
                _ => found = Some(v),
            }
        }
    }
    match found {
        None => Lookup::Absent,
        Some(v) => match std::str::from_utf8(v).map(SessionToken::parse) {
            Ok(Ok(token)) => Lookup::Token(token),
            _ => Lookup::Rejected("malformed session cookie"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use statehouse::UserTag;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(COOKIE, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn defaults_are_the_secure_ones() {
        let c = CookieConfig::default();
        let t = SessionToken::generate(UserTag::for_user("u")).unwrap();
        assert_eq!(
            c.set_cookie(&t).to_str().unwrap(),
            format!(
                "__Host-session={}; Path=/; Secure; HttpOnly; SameSite=Lax",
                t.encode()
            )
        );
        assert_eq!(
            c.clear_cookie().to_str().unwrap(),
            "__Host-session=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Lax; \
             Expires=Thu, 01 Jan 1970 00:00:00 GMT"
        );
    }

    #[test]
    fn invalid_combinations_name_the_field() {
        let field = |b: CookieConfigBuilder| match b.build() {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(CookieConfig::builder().secure(false)), "secure");
        assert_eq!(field(CookieConfig::builder().path("/app")), "path");
        assert_eq!(
            field(CookieConfig::builder().domain("example.com")),
            "domain"
        );
        assert_eq!(field(CookieConfig::builder().name("a b")), "name");
        assert_eq!(field(CookieConfig::builder().name("")), "name");
        assert_eq!(
            field(CookieConfig::builder().name("__Secure-s").secure(false)),
            "secure"
        );
        assert_eq!(
            field(
                CookieConfig::development()
                    .to_builder()
                    .same_site(SameSite::None)
            ),
            "same_site"
        );
        assert_eq!(
            field(CookieConfig::development().to_builder().path("x")),
            "path"
        );
        assert_eq!(
            field(CookieConfig::builder().max_age(Some(Duration::ZERO))),
            "max_age"
        );
        let ok = CookieConfig::development()
            .to_builder()
            .path("/app")
            .domain("example.com")
            .build()
            .unwrap();
        assert_eq!(ok.domain(), Some("example.com"));
    }

    #[test]
    fn lookup_handles_bad_input() {
        let t = SessionToken::generate(UserTag::for_user("u")).unwrap();
        let good = format!("__Host-session={}", t.encode());
        assert_eq!(lookup(&headers(&[]), "__Host-session"), Lookup::Absent);
        assert_eq!(
            lookup(&headers(&[&format!("a=b; {good}; c=d")]), "__Host-session"),
            Lookup::Token(t.clone())
        );
        // Split over two headers (HTTP/2), and the same cookie twice: fine.
        assert_eq!(
            lookup(
                &headers(&["a=b", &format!("{good}; {good}")]),
                "__Host-session"
            ),
            Lookup::Token(t.clone())
        );
        for bad in [
            "__Host-session=".to_owned(),
            "__Host-session=abc".to_owned(),
            format!("__Host-session={}", "A".repeat(8192)),
            format!("__Host-session={}", "%".repeat(54)),
            format!("__Host-session=\"{}\"", t.encode()),
        ] {
            assert!(
                matches!(
                    lookup(&headers(&[&bad]), "__Host-session"),
                    Lookup::Rejected(_)
                ),
                "{bad}"
            );
        }
        let other = SessionToken::generate(UserTag::for_user("v")).unwrap();
        assert!(matches!(
            lookup(
                &headers(&[&good, &format!("__Host-session={}", other.encode())]),
                "__Host-session"
            ),
            Lookup::Rejected(_)
        ));
        // Another cookie holding UTF-8 (browsers send it as it is) does not hide ours; our
        // cookie holding such bytes is malformed.
        let mut raw = HeaderMap::new();
        raw.append(
            COOKIE,
            HeaderValue::from_bytes(format!("pref=caf\u{e9}; {good}; x=\u{1F600}").as_bytes())
                .unwrap(),
        );
        assert_eq!(lookup(&raw, "__Host-session"), Lookup::Token(t.clone()));
        let mut raw = HeaderMap::new();
        raw.append(
            COOKIE,
            HeaderValue::from_bytes("__Host-session=caf\u{e9}".as_bytes()).unwrap(),
        );
        assert_eq!(
            lookup(&raw, "__Host-session"),
            Lookup::Rejected("malformed session cookie")
        );
        let mut raw = HeaderMap::new();
        raw.append(
            COOKIE,
            HeaderValue::from_bytes(b"__Host-session=\xff\xfe").unwrap(),
        );
        assert_eq!(
            lookup(&raw, "__Host-session"),
            Lookup::Rejected("malformed session cookie")
        );
        // Other names, and pairs without `=`, are ignored.
        assert_eq!(
            lookup(
                &headers(&["session=x; __Host-session2=y; junk"]),
                "__Host-session"
            ),
            Lookup::Absent
        );
    }
}
