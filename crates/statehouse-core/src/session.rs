//! Sessions shared by every replica: tokens, records, expiry rules and the store trait.
//!
//! A session token is 40 random-looking bytes, base64url in the cookie (54 characters):
//! 8 bytes of [`UserTag`] (a hash of the user id, so every session of one user lands in one
//! Redis Cluster slot, next to the user's index) followed by **256 bits from the operating
//! system's CSPRNG**. The store never sees the token: it keys a session by
//! [`SessionId`], the SHA-256 of the token, so a dump of Redis holds no usable token.
//!
//! Expiry is enforced by the store at every read: a session is gone at
//! `min(last_seen + idle_timeout, created_at + absolute_lifetime)` ([`expires_at`]). Reading
//! counts as activity, but the refresh write is throttled ([`touch_due`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use crate::clock::{Timestamp, duration_to_micros};
use crate::error::{Error, Result};

/// Bytes of user tag at the start of a token.
pub const USER_TAG_LEN: usize = 8;
/// Bytes of CSPRNG secret in a token (256 bits).
pub const SECRET_LEN: usize = 32;
/// Bytes in a token.
pub const TOKEN_LEN: usize = USER_TAG_LEN + SECRET_LEN;
/// Characters of a token in its cookie form (base64url, no padding).
pub const TOKEN_CHARS: usize = 54;
/// The longest user id, role or data field name, in bytes.
pub const MAX_NAME_LEN: usize = 256;
/// The most roles one session may carry.
pub const MAX_ROLES: usize = 64;
/// The largest encoded value of one data field (1 MiB).
pub const MAX_VALUE_LEN: usize = 1024 * 1024;

/// The 8-byte tag of a user: the start of SHA-256 over the user id. Every session of a user
/// shares it, so on Redis Cluster a user's sessions and index live in one slot.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserTag([u8; USER_TAG_LEN]);

impl UserTag {
    /// The tag of `user_id`.
    ///
    /// ```
    /// use statehouse_core::session::UserTag;
    /// assert_eq!(UserTag::for_user("alice"), UserTag::for_user("alice"));
    /// assert_ne!(UserTag::for_user("alice"), UserTag::for_user("bob"));
    /// assert_eq!(UserTag::for_user("alice").to_hex().len(), 16);
    /// ```
    pub fn for_user(user_id: &str) -> UserTag {
        let digest = Sha256::new()
            .chain_update(b"statehouse:user-tag:")
            .chain_update(user_id.as_bytes())
            .finalize();
        let mut tag = [0; USER_TAG_LEN];
        tag.copy_from_slice(&digest[..USER_TAG_LEN]);
        UserTag(tag)
    }

    /// 16 lowercase hex digits, the form used in storage keys.
    pub fn to_hex(&self) -> String {
        lower_hex(&self.0)
    }
}

impl fmt::Debug for UserTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserTag({})", self.to_hex())
    }
}

/// A session token: what the client holds. Never stored, never logged (its `Debug` shows only
/// the [`SessionId`] prefix).
#[derive(Clone, PartialEq, Eq)]
pub struct SessionToken([u8; TOKEN_LEN]);

impl SessionToken {
    /// A new token for a session of the user with `tag`, its secret part drawn from the
    /// operating system's CSPRNG.
    pub fn generate(tag: UserTag) -> Result<SessionToken> {
        let mut bytes = [0u8; TOKEN_LEN];
        bytes[..USER_TAG_LEN].copy_from_slice(&tag.0);
        getrandom::fill(&mut bytes[USER_TAG_LEN..]).map_err(|e| Error::Backend {
            message: format!("the operating system's random number generator failed: {e}"),
            source: None,
        })?;
        Ok(SessionToken(bytes))
    }

    /// Parses a cookie value. Anything but exactly 54 base64url characters is rejected before
    /// any store is asked (the token is untrusted input).
    ///
    /// ```
    /// use statehouse_core::session::{SessionToken, UserTag};
    /// let t = SessionToken::generate(UserTag::for_user("alice")).unwrap();
    /// let parsed = SessionToken::parse(&t.encode()).unwrap();
    /// assert_eq!(parsed, t);
    /// assert!(SessionToken::parse("").is_err());
    /// assert!(SessionToken::parse(&"A".repeat(8192)).is_err());
    /// assert!(SessionToken::parse(&"%".repeat(54)).is_err());
    /// ```
    pub fn parse(cookie_value: &str) -> Result<SessionToken> {
        let invalid = |why: &str| Error::InvalidInput(format!("malformed session token: {why}"));
        if cookie_value.len() != TOKEN_CHARS {
            return Err(invalid("wrong length"));
        }
        let mut bytes = [0u8; TOKEN_LEN];
        let n = URL_SAFE_NO_PAD
            .decode_slice(cookie_value.as_bytes(), &mut bytes)
            .map_err(|_| invalid("not base64url"))?;
        if n != TOKEN_LEN {
            return Err(invalid("wrong length"));
        }
        Ok(SessionToken(bytes))
    }

    /// The cookie form: 54 base64url characters.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    /// The user tag this token carries.
    pub fn user_tag(&self) -> UserTag {
        let mut tag = [0; USER_TAG_LEN];
        tag.copy_from_slice(&self.0[..USER_TAG_LEN]);
        UserTag(tag)
    }

    /// The id the store keys this session by: SHA-256 of the token.
    pub fn id(&self) -> SessionId {
        SessionId(lower_hex(&Sha256::digest(self.0)))
    }
}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = self.id();
        write!(f, "SessionToken(id {}…)", &id.0[..12])
    }
}

/// A session's id in the store: 64 hex digits of SHA-256 over its token. Safe to log and to
/// show to the user (in "your devices" lists); it cannot be turned back into a token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(String);

impl SessionId {
    /// Parses 64 lowercase hex digits (as returned by [`SessionId::as_str`]).
    pub fn parse(s: &str) -> Result<SessionId> {
        if s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(SessionId(s.to_owned()))
        } else {
            Err(Error::InvalidInput(format!(
                "a session id is 64 lowercase hex digits, not {:?}",
                s.chars().take(80).collect::<String>()
            )))
        }
    }

    /// The 64 hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How long sessions live and how often a read refreshes them. Built with
/// [`SessionConfig::builder`]; invalid values are rejected with the field's name.
///
/// ```
/// use std::time::Duration;
/// use statehouse_core::session::SessionConfig;
/// let c = SessionConfig::default();
/// assert_eq!(c.idle_timeout(), Duration::from_secs(30 * 60));
/// assert_eq!(c.absolute_lifetime(), Duration::from_secs(12 * 3600));
/// let c = SessionConfig::builder().idle_timeout(Duration::from_secs(300)).build().unwrap();
/// assert_eq!(c.touch_after(), Duration::from_secs(75));
/// assert!(SessionConfig::builder().idle_timeout(Duration::ZERO).build().is_err());
/// assert_eq!(c.max_sessions_per_user(), 100);
/// assert!(SessionConfig::builder().max_sessions_per_user(0).build().is_err());
/// assert!(SessionConfig::builder().max_sessions_per_user(10_001).build().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    idle_us: u64,
    absolute_us: u64,
    touch_after_us: u64,
    rotation_grace_us: u64,
    max_per_user: u32,
}

/// The default [`SessionConfig::max_sessions_per_user`].
pub const DEFAULT_MAX_SESSIONS_PER_USER: u32 = 100;
/// The largest [`SessionConfig::max_sessions_per_user`]: listing or revoking a user's sessions
/// visits each of them in one atomic step, which must stay short.
pub const MAX_SESSIONS_PER_USER: u32 = 10_000;

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            idle_us: 30 * 60 * 1_000_000,
            absolute_us: 12 * 3600 * 1_000_000,
            touch_after_us: 30 * 60 * 1_000_000 / 4,
            rotation_grace_us: 5 * 1_000_000,
            max_per_user: DEFAULT_MAX_SESSIONS_PER_USER,
        }
    }
}

impl SessionConfig {
    /// A builder starting from the defaults: 30 min idle, 12 h absolute, refresh after a quarter
    /// of the idle timeout, 5 s rotation grace, at most 100 sessions per user.
    pub fn builder() -> SessionConfigBuilder {
        SessionConfigBuilder::default()
    }

    /// The sliding idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_micros(self.idle_us)
    }

    /// The absolute lifetime from creation.
    pub fn absolute_lifetime(&self) -> Duration {
        Duration::from_micros(self.absolute_us)
    }

    /// A read refreshes the stored `last_seen` (and the expiry) only once this much time has
    /// passed since the last refresh.
    pub fn touch_after(&self) -> Duration {
        Duration::from_micros(self.touch_after_us)
    }

    /// How long an old token keeps working after a rotation.
    pub fn rotation_grace(&self) -> Duration {
        Duration::from_micros(self.rotation_grace_us)
    }

    /// The idle timeout in microseconds.
    pub fn idle_micros(&self) -> u64 {
        self.idle_us
    }

    /// The absolute lifetime in microseconds.
    pub fn absolute_micros(&self) -> u64 {
        self.absolute_us
    }

    /// The refresh threshold in microseconds.
    pub fn touch_after_micros(&self) -> u64 {
        self.touch_after_us
    }

    /// The rotation grace in microseconds.
    pub fn rotation_grace_micros(&self) -> u64 {
        self.rotation_grace_us
    }

    /// The most live sessions one user may have. Creating one more revokes the user's session
    /// whose expiry comes first (ties by id): normally the least recently active one, near the
    /// absolute lifetime the oldest. So a user who logs in from
    /// ever more clients, or a script logging in in a loop, cannot grow the per-user index
    /// without bound (listing and revoking a user's sessions visit each of them in one atomic
    /// step, which on Redis holds the server).
    pub fn max_sessions_per_user(&self) -> u32 {
        self.max_per_user
    }
}

/// Builds a [`SessionConfig`].
#[derive(Debug, Clone, Default)]
pub struct SessionConfigBuilder {
    idle: Option<Duration>,
    absolute: Option<Duration>,
    touch_share: Option<(u32, u32)>,
    rotation_grace: Option<Duration>,
    max_per_user: Option<u32>,
}

impl SessionConfigBuilder {
    /// The sliding idle timeout (default 30 minutes; 1 s to 30 days).
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.idle = Some(d);
        self
    }

    /// The absolute lifetime (default 12 hours; at least the idle timeout, at most 400 days).
    pub fn absolute_lifetime(mut self, d: Duration) -> Self {
        self.absolute = Some(d);
        self
    }

    /// Refresh on read only after `numerator / denominator` of the idle timeout has passed
    /// since the last refresh (default 1/4; 0/1 refreshes on every read).
    pub fn touch_after_share(mut self, numerator: u32, denominator: u32) -> Self {
        self.touch_share = Some((numerator, denominator));
        self
    }

    /// How long an old token keeps working after a rotation (default 5 s; at most 5 minutes).
    pub fn rotation_grace(mut self, d: Duration) -> Self {
        self.rotation_grace = Some(d);
        self
    }

    /// The most live sessions one user may have (default 100; 1 to 10 000): see
    /// [`SessionConfig::max_sessions_per_user`].
    pub fn max_sessions_per_user(mut self, n: u32) -> Self {
        self.max_per_user = Some(n);
        self
    }

    /// Validates and builds.
    pub fn build(self) -> Result<SessionConfig> {
        let d = SessionConfig::default();
        let idle = self.idle.map_or(d.idle_us, duration_to_micros);
        let absolute = self.absolute.map_or(d.absolute_us, duration_to_micros);
        let grace = self
            .rotation_grace
            .map_or(d.rotation_grace_us, duration_to_micros);
        let bad = |field: &'static str, reason: String| Error::InvalidPolicy { field, reason };
        if !(1_000_000..=30 * 86_400 * 1_000_000).contains(&idle) {
            return Err(bad(
                "idle_timeout",
                "must be between 1 s and 30 days".into(),
            ));
        }
        if absolute < idle || absolute > 400 * 86_400 * 1_000_000 {
            return Err(bad(
                "absolute_lifetime",
                "must be at least the idle timeout and at most 400 days".into(),
            ));
        }
        if grace > 300 * 1_000_000 {
            return Err(bad("rotation_grace", "must be at most 5 minutes".into()));
        }
        let (num, den) = self.touch_share.unwrap_or((1, 4));
        if den == 0 || num >= den {
            return Err(bad(
                "touch_after_share",
                format!("{num}/{den} must be a fraction below 1"),
            ));
        }
        let max_per_user = self.max_per_user.unwrap_or(d.max_per_user);
        if !(1..=MAX_SESSIONS_PER_USER).contains(&max_per_user) {
            return Err(bad(
                "max_sessions_per_user",
                format!("{max_per_user} must be between 1 and {MAX_SESSIONS_PER_USER}"),
            ));
        }
        Ok(SessionConfig {
            idle_us: idle,
            absolute_us: absolute,
            touch_after_us: idle / u64::from(den) * u64::from(num),
            rotation_grace_us: grace,
            max_per_user,
        })
    }
}

/// What a new session starts with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewSession {
    /// The user the session belongs to (1 to 256 bytes, no control characters).
    pub user_id: String,
    /// Roles (each 1 to 256 bytes without control characters; at most 64).
    pub roles: Vec<String>,
    /// Encoded application data by field name.
    pub data: BTreeMap<String, Vec<u8>>,
    /// The client's IP address, if known.
    pub ip: Option<String>,
    /// The client's user agent, if known (truncated to 512 bytes).
    pub user_agent: Option<String>,
}

/// Field-level changes to a session: only these fields are written, so concurrent changes to
/// other fields are never lost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionChanges {
    /// Data fields to set.
    pub set: BTreeMap<String, Vec<u8>>,
    /// Data fields to remove.
    pub remove: BTreeSet<String>,
    /// New roles, if they change.
    pub roles: Option<Vec<String>>,
}

impl SessionChanges {
    /// True when nothing changes.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty() && self.roles.is_none()
    }
}

/// A stored session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Its id (SHA-256 of the current token).
    pub id: SessionId,
    /// The user.
    pub user_id: String,
    /// Roles.
    pub roles: Vec<String>,
    /// Encoded application data by field name.
    pub data: BTreeMap<String, Vec<u8>>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it was last refreshed by a read or a write (reads refresh at most every
    /// [`SessionConfig::touch_after`]).
    pub last_seen: Timestamp,
    /// The client's IP address at creation.
    pub ip: Option<String>,
    /// The client's user agent at creation.
    pub user_agent: Option<String>,
}

impl SessionRecord {
    /// When this session expires under `config`; see [`expires_at`].
    pub fn expires_at(&self, config: &SessionConfig) -> Timestamp {
        expires_at(self.created_at, self.last_seen, config)
    }
}

/// A session as listed for its user: no data, just what a "your devices" page shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The session's id.
    pub id: SessionId,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it was last refreshed.
    pub last_seen: Timestamp,
    /// When it expires unless used again.
    pub expires_at: Timestamp,
    /// IP address at creation.
    pub ip: Option<String>,
    /// User agent at creation.
    pub user_agent: Option<String>,
}

/// The result of loading a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedSession {
    /// The record (after the refresh, if one was written).
    pub record: SessionRecord,
    /// True when this load wrote a refresh (`last_seen` and the expiry moved).
    pub touched: bool,
    /// True when the token was an old one, still valid in its rotation grace window: the record
    /// is the rotated session's.
    pub via_rotation_alias: bool,
}

/// A session [created](SessionStore::create_session), and the sessions of the same user it
/// displaced (over [`SessionConfig::max_sessions_per_user`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// The new session's token: the only copy, for the cookie.
    pub token: SessionToken,
    /// The new session.
    pub record: SessionRecord,
    /// The ids of the user's sessions revoked to make room, first to expire first.
    pub evicted: Vec<SessionId>,
}

/// A session [rotated](SessionStore::rotate_session) to a new token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    /// The new token: the only copy, for the cookie.
    pub token: SessionToken,
    /// The session under its new id.
    pub record: SessionRecord,
    /// The session's id before the rotation. Not always the presented token's id: rotating
    /// through an old token still in its grace rotates the session that token was rotated to.
    pub from: SessionId,
}

/// A session [revoked](SessionStore::revoke_session).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The revoked session's id. Not always the presented token's id: revoking through an old
    /// token still in its grace revokes the session that token was rotated to.
    pub id: SessionId,
    /// Its user.
    pub user_id: String,
}

/// What an [`update`](SessionStore::update) found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Updated {
    /// The session is gone (revoked, expired or unknown): nothing was written, and nothing
    /// brought it back.
    Gone,
    /// Written through the session's current token; `last_seen` and the expiry moved.
    Written,
    /// Written through an old token still in its rotation grace: the session has a newer token
    /// (a concurrent request rotated it), so a client holding the old one must not be handed it
    /// again.
    WrittenViaRotationAlias,
}

impl Updated {
    /// Whether the changes were written.
    pub fn written(self) -> bool {
        self != Updated::Gone
    }
}

/// When a session expires: `min(last_seen + idle, created_at + absolute)`.
pub fn expires_at(
    created_at: Timestamp,
    last_seen: Timestamp,
    config: &SessionConfig,
) -> Timestamp {
    let idle_end = last_seen.as_micros().saturating_add(config.idle_us);
    let absolute_end = created_at.as_micros().saturating_add(config.absolute_us);
    Timestamp::from_micros(idle_end.min(absolute_end))
}

/// Whether a session is alive at `now` (it expires exactly at [`expires_at`]).
pub fn is_alive(
    created_at: Timestamp,
    last_seen: Timestamp,
    now: Timestamp,
    config: &SessionConfig,
) -> bool {
    now < expires_at(created_at, last_seen, config)
}

/// Whether a read at `now` should write a refresh: once [`SessionConfig::touch_after`] has
/// passed since `last_seen`.
pub fn touch_due(last_seen: Timestamp, now: Timestamp, config: &SessionConfig) -> bool {
    now.as_micros() >= last_seen.as_micros().saturating_add(config.touch_after_us)
}

/// Lowercase hex, through a table: the ids and tags of every session load are encoded with it,
/// and `hex::encode` (a `char` iterator collected into a `String`) was about 7 % of a Redis
/// session load's client CPU.
fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

fn check_name(what: &str, s: &str) -> Result<()> {
    if s.is_empty() || s.len() > MAX_NAME_LEN || s.chars().any(char::is_control) {
        return Err(Error::InvalidInput(format!(
            "a {what} is 1 to {MAX_NAME_LEN} bytes without control characters"
        )));
    }
    Ok(())
}

fn check_roles(roles: &[String]) -> Result<()> {
    if roles.len() > MAX_ROLES {
        return Err(Error::InvalidInput(format!("at most {MAX_ROLES} roles")));
    }
    roles.iter().try_for_each(|r| check_name("role", r))
}

fn check_data<'a>(
    fields: impl IntoIterator<Item = (&'a String, Option<&'a Vec<u8>>)>,
) -> Result<()> {
    for (name, value) in fields {
        check_name("data field name", name)?;
        if value.is_some_and(|v| v.len() > MAX_VALUE_LEN) {
            return Err(Error::InvalidInput(format!(
                "data field {name:?} is larger than {MAX_VALUE_LEN} bytes"
            )));
        }
    }
    Ok(())
}

impl NewSession {
    /// A new session for `user_id` with no roles or data.
    pub fn for_user(user_id: impl Into<String>) -> NewSession {
        NewSession {
            user_id: user_id.into(),
            ..NewSession::default()
        }
    }

    /// Checks every field; stores call this before any I/O.
    pub fn validate(&self) -> Result<()> {
        check_name("user id", &self.user_id)?;
        check_roles(&self.roles)?;
        check_data(self.data.iter().map(|(k, v)| (k, Some(v))))?;
        for (what, v) in [("ip", &self.ip), ("user agent", &self.user_agent)] {
            if v.as_ref()
                .is_some_and(|s| s.len() > 1024 || s.chars().any(char::is_control))
            {
                return Err(Error::InvalidInput(format!(
                    "the {what} is at most 1024 bytes without control characters"
                )));
            }
        }
        Ok(())
    }
}

impl SessionChanges {
    /// Checks every field; stores call this before any I/O.
    pub fn validate(&self) -> Result<()> {
        if let Some(roles) = &self.roles {
            check_roles(roles)?;
        }
        check_data(
            self.set
                .iter()
                .map(|(k, v)| (k, Some(v)))
                .chain(self.remove.iter().map(|k| (k, None))),
        )
    }
}

/// A store of sessions: the embedded store, Redis, Redis Cluster. Every implementation passes
/// the session conformance suite in `statehouse-testkit`.
///
/// Every method takes effect atomically, and no method ever brings back a session that was
/// revoked or has expired.
#[async_trait]
pub trait SessionStore: Send + Sync + fmt::Debug + 'static {
    /// Creates a session with a fresh token; never overwrites an existing one. A user already at
    /// [`SessionConfig::max_sessions_per_user`] loses the sessions that expire first (ties by
    /// id) in the same atomic step; [`Created::evicted`] names them.
    async fn create_session(&self, new: &NewSession) -> Result<Created>;

    /// [`create_session`](Self::create_session), for a caller that does not need the evicted
    /// sessions' ids.
    async fn create(&self, new: &NewSession) -> Result<(SessionToken, SessionRecord)> {
        let created = self.create_session(new).await?;
        Ok((created.token, created.record))
    }

    /// Loads a session and counts the read as activity, in one round trip: `None` when the
    /// token is unknown, revoked, expired, or an old token past its rotation grace.
    async fn load(&self, token: &SessionToken) -> Result<Option<LoadedSession>>;

    /// [`load`](Self::load) bounded by the caller's `timeout` as well as by the store's own
    /// call deadline: `Some` with the result, which is [`Error::Timeout`] carrying the shorter
    /// of the two durations when that one passes first; or `None` (the default) when the store
    /// does not bound this call itself, and the caller must bound [`load`](Self::load) on its
    /// own.
    ///
    /// This lets a caller with a deadline of its own (the `statehouse` facade's `Sessions`)
    /// load without a timer of its own around a call the store already times (the Redis
    /// store's read-only loads arm no timer per load at all).
    async fn load_within(
        &self,
        token: &SessionToken,
        timeout: Duration,
    ) -> Option<Result<Option<LoadedSession>>> {
        let _ = (token, timeout);
        None
    }

    /// Applies `changes` field by field and refreshes the session; [`Updated::Gone`] (and
    /// nothing written) when the session is gone.
    async fn update(&self, token: &SessionToken, changes: &SessionChanges) -> Result<Updated>;

    /// Moves the session to a new token, atomically; the old token keeps working for the
    /// rotation grace. `None` when the session is gone. Through an old token in its grace, the
    /// session it was rotated to is rotated ([`Rotated::from`] names it).
    async fn rotate_session(&self, token: &SessionToken) -> Result<Option<Rotated>>;

    /// [`rotate_session`](Self::rotate_session) without the session's previous id.
    async fn rotate(&self, token: &SessionToken) -> Result<Option<(SessionToken, SessionRecord)>> {
        Ok(self
            .rotate_session(token)
            .await?
            .map(|rotated| (rotated.token, rotated.record)))
    }

    /// Revokes the session (logout); `None` when it was already gone. Through an old token in
    /// its grace, the session it was rotated to is revoked ([`Revoked::id`] names it).
    async fn revoke_session(&self, token: &SessionToken) -> Result<Option<Revoked>>;

    /// [`revoke_session`](Self::revoke_session): whether a live session was revoked.
    async fn revoke(&self, token: &SessionToken) -> Result<bool> {
        Ok(self.revoke_session(token).await?.is_some())
    }

    /// The live sessions of `user_id`, oldest first. Prunes index entries of sessions that
    /// are gone.
    async fn list_for_user(&self, user_id: &str) -> Result<Vec<SessionInfo>>;

    /// Revokes one session of `user_id` by id; `false` when there was none.
    async fn revoke_by_id(&self, user_id: &str, id: &SessionId) -> Result<bool>;

    /// Revokes every session of `user_id` except `keep` ("log out everywhere else"); returns
    /// the ids of the sessions it revoked, first to expire first (ties by id). A `keep` that is the id of an old token still in its rotation
    /// grace keeps the session that token was rotated to (a request that loaded its session
    /// just before a concurrent rotation keeps the current device).
    async fn revoke_all_for_user(
        &self,
        user_id: &str,
        keep: Option<&SessionId>,
    ) -> Result<Vec<SessionId>>;

    /// How many failure domains the store has: parts that can fail while the others go on
    /// (groups of hash slots of a Redis Cluster). A caller with a circuit breaker (the
    /// `statehouse` facade's `Sessions`) keeps one per domain. The default is 1.
    fn failure_domains(&self) -> usize {
        1
    }

    /// The failure domain, below [`failure_domains`](Self::failure_domains), of the sessions
    /// of the user tagged `user` (a token's [`SessionToken::user_tag`], or
    /// [`UserTag::for_user`]). The default is 0.
    fn failure_domain(&self, user: UserTag) -> usize {
        let _ = user;
        0
    }
}

/// Something that happened to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// A session was created.
    Created {
        /// Its id.
        id: SessionId,
        /// Its user.
        user_id: String,
    },
    /// A session moved to a new token.
    Rotated {
        /// The old id.
        from: SessionId,
        /// The new id.
        to: SessionId,
        /// Its user.
        user_id: String,
    },
    /// A session was revoked (logout, revoke by id, revoke all).
    Revoked {
        /// Its id.
        id: SessionId,
        /// Its user, when known.
        user_id: Option<String>,
    },
    /// A session was found expired (on load, or when pruning a user's index).
    Expired {
        /// Its id.
        id: SessionId,
        /// Its user, when known.
        user_id: Option<String>,
    },
}

/// Receives [`SessionEvent`]s. Called synchronously after the store confirmed the change: keep
/// it quick (hand off to a channel for slow work).
pub trait SessionHooks: Send + Sync + fmt::Debug + 'static {
    /// One event.
    fn on_event(&self, event: &SessionEvent);
}

#[cfg(test)]
mod tests {
    use super::lower_hex;

    #[test]
    fn lower_hex_matches_the_hex_crate() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(lower_hex(&all), hex::encode(&all));
        assert_eq!(lower_hex(&[]), "");
    }
}
