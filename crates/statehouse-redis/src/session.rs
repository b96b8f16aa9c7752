//! [`RedisSessionStore`]: the [`SessionStore`] on Redis and Redis Cluster.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::{ScriptInvocation, Value};
use statehouse_core::key::validate_prefix;
use statehouse_core::session::{
    Created, LoadedSession, NewSession, Revoked, Rotated, SessionChanges, SessionConfig,
    SessionEvent, SessionHooks, SessionId, SessionInfo, SessionRecord, SessionStore, SessionToken,
    USER_TAG_LEN, Updated, UserTag, expires_at,
};
use statehouse_core::{Clock, Error, Result, Timestamp};
use tokio::time::Instant;

use crate::builder::{DEFAULT_CALL_TIMEOUT, RedisTopology, TimeSource};
use crate::cache_get::GetBatcher;
use crate::error::unexpected_reply;
use crate::hash_slot::hash_slot;
use crate::link::{Link, TlsSettings};
use crate::session_batch::{LoadBatcher, LoadRequest};
use crate::session_record::{decode, encode_fields, is_alias};
use crate::session_script::{
    Reply, Status, array, bytes, invocation, parse_expired, parse_lists, parse_reply, session_id,
    string, uint,
};
use crate::store::RedisStore;
use crate::store::failure_domain_of_slot;

/// The key prefix of a session store unless another is set.
pub const DEFAULT_SESSION_PREFIX: &str = "sh:s:";

/// With server time, how far from an expiry or a due refresh a session must be for
/// [`RedisSessionStore`]'s read-only fast path to answer it with the local clock (which may
/// differ from Redis's `TIME` by this much without changing any answer); closer ones go to the
/// script, which reads `TIME`.
pub const SERVER_TIME_FAST_PATH_MARGIN: Duration = Duration::from_secs(2);

/// The stored user agent is cut to this many bytes (at a character boundary).
const MAX_STORED_USER_AGENT: usize = 512;

/// Tokens drawn before `create` or `rotate` gives up on finding a free id. With 256 random
/// bits a second draw is already never needed; the loop exists so a collision can never
/// overwrite another session (tower-sessions 0.12.0's takeover bug).
const TOKEN_ATTEMPTS: usize = 4;

/// A session store on Redis or Redis Cluster.
///
/// Every operation is one Lua script (`EVALSHA`, loaded on `NOSCRIPT`), one round trip, atomic,
/// except the common `load`, which one plain `GET` answers (see below).
/// By default the script reads the server's `TIME`; [`TimeSource::Caller`] passes the caller's
/// clock instead. Concurrent `load`s (the per-request hot path) are coalesced: the loads queued
/// while earlier ones are on the wire go out together as one script call (per Cluster slot),
/// each still run and answered exactly as a load of its own; under low load a batch is a
/// single load, sent at once (no timer). On Redis Cluster, such a call refused with `TRYAGAIN`
/// while its slot is half moved (some users' keys on each node) is split by user at once, each
/// user's loads following `ASK`, rather than waiting for the move to end. A `load` takes at
/// most the call timeout in all, the fast path's read and the script together.
///
/// # Storage
///
/// All keys of one user share the hash tag of the user's [`UserTag`], so on Redis Cluster they
/// live in one slot and every script touches one slot only:
///
/// * `{prefix}{<tag hex>}:<session id>`: a STRING, one compact record: `S`, created_at and
///   last_seen (µs since the epoch, 16 decimal digits each, so a refresh is one `SETRANGE`),
///   then length-prefixed fields: the user id, the roles, the IP address and user agent (absent
///   when unknown) and each data field (raw bytes, binary safe). A load reads it with one `GET`
///   (concurrent loads: one `MGET` per slot) and decodes it in one pass.
/// * After a rotation, the old id's key (same name) becomes an **alias**: a STRING `A`, the end
///   of the rotation grace (µs, 16 digits), the new id. It expires with the grace.
/// * `{prefix}{<tag hex>}:idx`: the user's index, a ZSET of session id → expires_at (µs).
///
/// The layout changed from one HASH per session to these records before any release, so
/// there is no migration. A key that holds anything else (another type, such as one of those
/// HASHes, or a value that does not decode) is corrupt data: the call that meets it fails with
/// [`Error::Backend`], and in a coalesced script call only that load fails. One exception: the
/// load fast path's coalesced `MGET` answers nil for a key of another type, so such a load
/// reads as `None` (unknown) instead; a lone load (`GET`, `WRONGTYPE`) and every other
/// operation report the error.
///
/// Every key has a TTL: `PEXPIREAT` at the session's logical expiry (rounded up to the
/// millisecond) plus the skew allowance (zero with server time, five seconds by default with
/// caller time); the index lives as long as its longest-lived member. Expiry does not rely on
/// the TTL, though: every script checks `now < expires_at(created_at, last_seen)` from the
/// stored times. The token itself is never stored, only its SHA-256 ([`SessionId`]).
///
/// # Semantics
///
/// The same as `statehouse_embedded::EmbeddedSessionStore`'s, case for case (both pass the
/// session conformance suite). A session is alive while `now < expires_at(created_at,
/// last_seen)`. A token resolves to its session, or, when its key is a rotation alias still in
/// its grace whose target holds a session, to that target (**one hop**: an alias of an alias is
/// dead). Reads refresh `last_seen` (and the TTL and index score) only when
/// [`touch_due`](statehouse_core::session::touch_due); updates remove fields, then set fields
/// (a field in both ends up set), replace roles if given, and always refresh; nothing is ever
/// written to a session that is gone (no resurrection). Rotating through a live alias rotates
/// its target; revoking through a live alias revokes the target and deletes the alias. Dead
/// sessions met by any call are deleted and dropped from the index; `list_for_user`,
/// `revoke_by_id` and `revoke_all_for_user` prune index members whose session is gone or dead
/// and consider only sessions whose stored user id equals the argument (two users may share a
/// tag). None of the three counts as activity. No call uses `KEYS` or keyspace notifications.
///
/// Cloning is cheap: clones share the connection.
///
/// ```no_run
/// use statehouse_core::session::{NewSession, SessionConfig, SessionStore};
/// use statehouse_redis::{RedisSessionStore, RedisStore, RedisTopology};
///
/// # async fn example() -> Result<(), statehouse_core::Error> {
/// // On its own connection:
/// let sessions = RedisSessionStore::builder(RedisTopology::Standalone("redis://127.0.0.1".into()))
///     .prefix("myapp:s:")
///     .config(SessionConfig::default())
///     .connect()
///     .await?;
/// let (token, _record) = sessions.create(&NewSession::for_user("alice")).await?;
/// assert!(sessions.load(&token).await?.is_some());
///
/// // Or sharing the connection of a rate-limit store:
/// let limits = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// let sessions = limits.session_store(SessionConfig::default());
/// # let _ = sessions;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisSessionStore {
    inner: Arc<Inner>,
}

#[derive(Clone)]
struct Inner {
    link: Arc<Link>,
    /// Coalesces concurrent loads; shared by the clones and the `with_*` variants of a store.
    loads: Arc<LoadBatcher>,
    /// Coalesces the fast path's concurrent `GET`s into `MGET`s; shared like `loads`.
    reads: Arc<GetBatcher>,
    prefix: String,
    config: SessionConfig,
    hooks: Option<Arc<dyn SessionHooks>>,
}

impl fmt::Debug for RedisSessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSessionStore")
            .field("link", &self.inner.link)
            .field("prefix", &self.inner.prefix)
            .field("config", &self.inner.config)
            .field("hooks", &self.inner.hooks)
            .finish()
    }
}

impl RedisStore {
    /// A session store that shares this store's connection (and its time source, skew
    /// allowance and call timeout), with the key prefix [`DEFAULT_SESSION_PREFIX`]; change it
    /// with [`RedisSessionStore::with_prefix`].
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), statehouse_core::Error> {
    /// use statehouse_core::session::SessionConfig;
    /// let limits = statehouse_redis::RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// let sessions = limits.session_store(SessionConfig::default()).with_prefix("app:s:")?;
    /// assert_eq!(sessions.prefix(), "app:s:");
    /// # Ok(())
    /// # }
    /// ```
    pub fn session_store(&self, config: SessionConfig) -> RedisSessionStore {
        RedisSessionStore {
            inner: Arc::new(Inner {
                link: Arc::clone(self.link()),
                loads: Arc::new(LoadBatcher::new()),
                reads: Arc::new(GetBatcher::new()),
                prefix: DEFAULT_SESSION_PREFIX.to_owned(),
                config,
                hooks: None,
            }),
        }
    }
}

impl RedisSessionStore {
    /// A builder for a session store with its own connection to `topology`.
    pub fn builder(topology: RedisTopology) -> RedisSessionStoreBuilder {
        RedisSessionStoreBuilder {
            topology,
            prefix: DEFAULT_SESSION_PREFIX.to_owned(),
            time_source: TimeSource::Server,
            skew_allowance: None,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            config: SessionConfig::default(),
            hooks: None,
            tls: TlsSettings::default(),
        }
    }

    /// This store with another key prefix (at most 64 printable ASCII characters without
    /// spaces or braces), on the same connection.
    pub fn with_prefix(self, prefix: &str) -> Result<RedisSessionStore> {
        validate_prefix(prefix)?;
        let mut inner = (*self.inner).clone();
        prefix.clone_into(&mut inner.prefix);
        Ok(RedisSessionStore {
            inner: Arc::new(inner),
        })
    }

    /// This store reporting [`SessionEvent`]s to `hooks`, on the same connection.
    pub fn with_hooks(self, hooks: Arc<dyn SessionHooks>) -> RedisSessionStore {
        let mut inner = (*self.inner).clone();
        inner.hooks = Some(hooks);
        RedisSessionStore {
            inner: Arc::new(inner),
        }
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The session configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.inner.config
    }

    /// The Redis key of the session (or rotation alias) `token` names:
    /// `{prefix}{<user tag hex>}:<session id>`.
    pub fn session_key(&self, token: &SessionToken) -> String {
        format!("{}{}", self.key_base(token.user_tag()), token.id())
    }

    /// The Redis key of `user_id`'s index: `{prefix}{<user tag hex>}:idx`.
    pub fn index_key(&self, user_id: &str) -> String {
        format!("{}idx", self.key_base(UserTag::for_user(user_id)))
    }

    fn key_base(&self, tag: UserTag) -> String {
        format!("{}{{{}}}:", self.inner.prefix, tag.to_hex())
    }

    /// The session key of `id` under `tag`, built in one allocation, and the length of its key
    /// base (`{prefix}{<tag hex>}:`).
    fn session_key_of(&self, tag: UserTag, id: &SessionId) -> (String, usize) {
        let prefix = &self.inner.prefix;
        let id = id.as_str();
        let mut key = String::with_capacity(prefix.len() + 2 * USER_TAG_LEN + 3 + id.len());
        key.push_str(prefix);
        key.push('{');
        key.push_str(&tag.to_hex());
        key.push_str("}:");
        let base_len = key.len();
        key.push_str(id);
        (key, base_len)
    }

    fn start(&self, op: &str, tag: UserTag) -> (ScriptInvocation<'static>, String) {
        let base = self.key_base(tag);
        let link = &self.inner.link;
        let inv = invocation(
            op,
            link.caller_now(),
            link.skew_allowance_ms,
            &self.inner.config,
            &base,
        );
        (inv, base)
    }

    async fn run(&self, inv: &ScriptInvocation<'_>, deadline: Instant) -> Result<Value> {
        let link = &self.inner.link;
        link.bounded(deadline, link.conn.invoke(inv)).await
    }

    /// The common load, answered without a script: one plain `GET` of the presented id's key
    /// (concurrent ones go out together as one `MGET` per slot).
    ///
    /// `Ok(answer)` when the record alone settles the load: the key is absent (`None`:
    /// unknown, revoked or expired; an alias or a dead session is never absent-but-alive), or it
    /// holds a session that is alive and whose refresh is not due (`Some(session)`, nothing to
    /// write: exactly what the script would answer). Everything else — an alias (rotation
    /// grace), a session at or near its expiry, a refresh that is due, a record the fast path
    /// cannot decode — returns `Err(key)` (the key handed back) and goes to the script, which decides, writes and reports
    /// errors exactly as before. Reads write nothing, so this path can never resurrect a
    /// session.
    ///
    /// Time: with [`TimeSource::Caller`] the caller's clock decides, exactly. With server time
    /// the script's `TIME` is not available here, so the local clock is used with a margin of
    /// [`SERVER_TIME_FAST_PATH_MARGIN`] on both edges: a session within the margin of its expiry
    /// or of its refresh goes to the script. Redis's own key expiry (`PEXPIREAT` at the logical
    /// expiry) still removes a dead session whatever a replica's clock says.
    async fn load_read_only(
        &self,
        id: SessionId,
        key: String,
        timeout: Option<Duration>,
    ) -> Result<std::result::Result<Option<LoadedSession>, String>> {
        let link = &self.inner.link;
        let (now, margin) = match &link.time_source {
            TimeSource::Caller(clock) => (clock.now(), 0),
            TimeSource::Server => (
                statehouse_core::SystemClock.now(),
                SERVER_TIME_FAST_PATH_MARGIN.as_micros() as u64,
            ),
        };
        let slot = hash_slot(key.as_bytes());
        let (key, value) = self.inner.reads.read(link, key, slot, timeout).await?;
        let Some(value) = value else {
            return Ok(Ok(None));
        };
        if is_alias(&value) {
            return Ok(Err(key));
        }
        let Ok(record) = decode(id, &value) else {
            return Ok(Err(key));
        };
        let config = &self.inner.config;
        let now_us = now.as_micros().saturating_add(margin);
        let alive = now_us < expires_at(record.created_at, record.last_seen, config).as_micros();
        let refresh_not_due = now_us
            < record
                .last_seen
                .as_micros()
                .saturating_add(config.touch_after_micros());
        if alive && refresh_not_due {
            Ok(Ok(Some(LoadedSession {
                record,
                touched: false,
                via_rotation_alias: false,
            })))
        } else {
            Ok(Err(key))
        }
    }

    /// [`SessionStore::load`], within `timeout` when it is shorter than the call timeout.
    async fn load_bounded(
        &self,
        token: &SessionToken,
        timeout: Option<Duration>,
    ) -> Result<Option<LoadedSession>> {
        let link = &self.inner.link;
        let budget = LoadBudget::new(Instant::now(), timeout, link.call_timeout);
        let id = token.id();
        let (key, base_len) = self.session_key_of(token.user_tag(), &id);
        // The read-only fast path first: one plain `GET`, no script (see `load_read_only`).
        // When every load refreshes (`touch_after` zero), it could never answer a live session:
        // straight to the script then, saving a round trip.
        let (key, handed_over) = if self.inner.config.touch_after_micros() > 0 {
            match self.load_read_only(id, key, timeout).await? {
                Ok(answer) => return Ok(answer),
                Err(key) => (key, true),
            }
        } else {
            (key, false)
        };
        // Through the batcher: see `session_batch`. One script call either way.
        let (reply, answer) = futures::channel::oneshot::channel();
        let request = LoadRequest {
            slot: hash_slot(key.as_bytes()),
            key,
            base_len,
            now: link.caller_now(),
            deadline: budget.script_deadline(),
            reply,
        };
        let load = self
            .inner
            .loads
            .load(link, &self.inner.config, request, answer);
        let value = match budget.caller_deadline(handed_over) {
            Some(deadline) => tokio::time::timeout_at(deadline, load)
                .await
                .unwrap_or(Err(Error::Timeout {
                    deadline: budget.timeout,
                }))?,
            None => load.await?,
        };
        let reply = parse_reply(value)?;
        match reply.status {
            Status::Gone => Ok(None),
            Status::Expired => {
                self.emit_expired(reply.rest)?;
                Ok(None)
            }
            Status::Done => {
                // { id, via_alias, touched, the stored record (before a touch) }
                let Ok([id, via_alias, touched, stored]) = <[Value; 4]>::try_from(reply.rest)
                else {
                    return Err(unexpected_reply("a load reply of the wrong length"));
                };
                let id = session_id(id, "session id")?;
                let via_rotation_alias = uint(&via_alias, "via_alias")? == 1;
                let touched = uint(&touched, "touched")? == 1;
                let mut record = decode(id, &bytes(stored, "session record")?)?;
                if touched {
                    record.last_seen = Timestamp::from_micros(reply.now);
                }
                Ok(Some(LoadedSession {
                    record,
                    touched,
                    via_rotation_alias,
                }))
            }
            Status::Collision => Err(unexpected_reply("load answered a collision")),
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.inner.link.call_timeout
    }

    fn emit(&self, event: SessionEvent) {
        if let Some(hooks) = &self.inner.hooks {
            hooks.on_event(&event);
        }
    }

    /// Reports `{ id, user }` after an `Expired` status.
    fn emit_expired(&self, rest: Vec<Value>) -> Result<()> {
        for (id, user_id) in parse_expired(rest)? {
            self.emit(SessionEvent::Expired {
                id,
                user_id: Some(user_id),
            });
        }
        Ok(())
    }

    /// The answer of a revoking script (`revoke`, `revoke_id`): the session it revoked (`{ id,
    /// user }` after `Done`), reported to the hooks; an expired session found on the way is
    /// reported as expired, not revoked.
    fn revocation_outcome(&self, reply: Reply, op: &str) -> Result<Option<Revoked>> {
        match reply.status {
            Status::Done => {
                let Ok([(id, user_id)]) = <[_; 1]>::try_from(parse_expired(reply.rest)?) else {
                    return Err(unexpected_reply(format!("{op} answered no session")));
                };
                self.emit(SessionEvent::Revoked {
                    id: id.clone(),
                    user_id: Some(user_id.clone()),
                });
                Ok(Some(Revoked { id, user_id }))
            }
            Status::Gone => Ok(None),
            Status::Expired => {
                self.emit_expired(reply.rest)?;
                Ok(None)
            }
            Status::Collision => Err(unexpected_reply(format!("{op} answered a collision"))),
        }
    }
}

/// The time one [`SessionStore::load`] may take, fast path and script together: the call
/// timeout (or the caller's shorter timeout) from the moment the load started, not a fresh
/// call timeout for the script once the fast path hands over (a load whose read took nearly
/// the call timeout would then take up to twice as long).
#[derive(Debug, Clone, Copy)]
struct LoadBudget {
    started: Instant,
    /// The whole load's timeout: the caller's, when shorter than the call timeout.
    timeout: Duration,
    call_timeout: Duration,
}

impl LoadBudget {
    /// The budget of a load that started at `started`, within `timeout` when it is shorter
    /// than the call timeout.
    fn new(started: Instant, timeout: Option<Duration>, call_timeout: Duration) -> LoadBudget {
        LoadBudget {
            started,
            timeout: timeout.map_or(call_timeout, |t| t.min(call_timeout)),
            call_timeout,
        }
    }

    /// The deadline of the script's request in the load coalescer, which bounds the call
    /// carrying it: what is left of the call timeout.
    fn script_deadline(&self) -> Instant {
        self.started + self.call_timeout
    }

    /// When the caller stops waiting for the script with a timer of its own, or `None` when
    /// the request's deadline does it. It does when the script is the whole load (no fast path
    /// before it) and the caller's timeout is the call timeout: the coalescer then answers the
    /// request by its deadline without a timer, because a request queued with the full call
    /// timeout has a later deadline than every call already on the wire (`src/coalesce.rs`,
    /// "Deadlines"). A request handed over by the fast path has less time left than the queue
    /// order promises (a call on the wire may end after its deadline), and a caller with a
    /// shorter timeout waits less than its request's deadline: both keep a timer.
    fn caller_deadline(&self, handed_over: bool) -> Option<Instant> {
        (handed_over || self.timeout < self.call_timeout).then(|| self.started + self.timeout)
    }
}

fn check_user(user_id: &str) -> Result<()> {
    NewSession::for_user(user_id).validate()
}

fn too_many_collisions() -> Error {
    Error::Backend {
        message: format!("{TOKEN_ATTEMPTS} freshly drawn session ids were all taken"),
        source: None,
    }
}

/// Cuts `s` to at most `max` bytes at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[async_trait]
impl SessionStore for RedisSessionStore {
    /// On Redis Cluster, the groups of hash slots of the rate limiter's store
    /// ([`CLUSTER_FAILURE_DOMAINS`](crate::CLUSTER_FAILURE_DOMAINS)); on standalone Redis, one.
    fn failure_domains(&self) -> usize {
        if self.inner.link.conn.is_cluster() {
            crate::CLUSTER_FAILURE_DOMAINS
        } else {
            1
        }
    }

    /// The slot group of the user's hash tag (every key of the user is in its slot).
    fn failure_domain(&self, user: UserTag) -> usize {
        if !self.inner.link.conn.is_cluster() {
            return 0;
        }
        failure_domain_of_slot(hash_slot(user.to_hex().as_bytes()))
    }

    async fn create_session(&self, new: &NewSession) -> Result<Created> {
        new.validate()?;
        let tag = UserTag::for_user(&new.user_id);
        let user_agent = new
            .user_agent
            .as_deref()
            .map(|ua| truncate(ua, MAX_STORED_USER_AGENT).to_owned());
        let fields = encode_fields(
            &new.user_id,
            &new.roles,
            new.ip.as_deref(),
            user_agent.as_deref(),
            &new.data,
        )?;
        let deadline = self.deadline();
        for _ in 0..TOKEN_ATTEMPTS {
            let token = SessionToken::generate(tag)?;
            let id = token.id();
            let (mut inv, base) = self.start("create", tag);
            inv.key(format!("{base}{id}"))
                .key(format!("{base}idx"))
                .arg(id.as_str())
                .arg(fields.as_slice())
                .arg(new.user_id.as_str())
                .arg(self.inner.config.max_sessions_per_user());
            let reply = parse_reply(self.run(&inv, deadline).await?)?;
            match reply.status {
                Status::Done => {
                    let [evicted, expired]: [Value; 2] = reply
                        .rest
                        .try_into()
                        .map_err(|_| unexpected_reply("create answered no evicted list"))?;
                    let evicted = array(evicted, "evicted ids")?
                        .into_iter()
                        .map(|id| session_id(id, "evicted id"))
                        .collect::<Result<Vec<_>>>()?;
                    self.emit_expired(array(expired, "expired sessions")?)?;
                    let now = Timestamp::from_micros(reply.now);
                    let record = SessionRecord {
                        id: id.clone(),
                        user_id: new.user_id.clone(),
                        roles: new.roles.clone(),
                        data: new.data.clone(),
                        created_at: now,
                        last_seen: now,
                        ip: new.ip.clone(),
                        user_agent,
                    };
                    for id in &evicted {
                        self.emit(SessionEvent::Revoked {
                            id: id.clone(),
                            user_id: Some(new.user_id.clone()),
                        });
                    }
                    self.emit(SessionEvent::Created {
                        id,
                        user_id: new.user_id.clone(),
                    });
                    return Ok(Created {
                        token,
                        record,
                        evicted,
                    });
                }
                Status::Collision => {
                    tracing::warn!("statehouse-redis: a fresh session id was taken; drawing again");
                }
                other => return Err(unexpected_reply(format!("create answered {other:?}"))),
            }
        }
        Err(too_many_collisions())
    }

    async fn load(&self, token: &SessionToken) -> Result<Option<LoadedSession>> {
        self.load_bounded(token, None).await
    }

    /// `Some` always: the read-only fast path is answered within `timeout` by the read
    /// coalescer of that timeout (no timer per load); a load that needs the script (a refresh
    /// is due, an alias, an expiry to report) bounds that call with a timer of its own at
    /// `timeout` from the load's start, so the whole load stays within `timeout`.
    async fn load_within(
        &self,
        token: &SessionToken,
        timeout: Duration,
    ) -> Option<Result<Option<LoadedSession>>> {
        Some(self.load_bounded(token, Some(timeout)).await)
    }

    async fn update(&self, token: &SessionToken, changes: &SessionChanges) -> Result<Updated> {
        changes.validate()?;
        let id = token.id();
        let (mut inv, base) = self.start("update", token.user_tag());
        inv.key(format!("{base}{id}"))
            .key(format!("{base}idx"))
            .arg(id.as_str());
        match &changes.roles {
            Some(roles) => inv.arg("1").arg(roles.join("\n")),
            None => inv.arg("0").arg(""),
        };
        inv.arg(changes.set.len());
        for (name, value) in &changes.set {
            inv.arg(name.as_str()).arg(value.as_slice());
        }
        for name in &changes.remove {
            inv.arg(name.as_str());
        }
        let reply = parse_reply(self.run(&inv, self.deadline()).await?)?;
        match reply.status {
            Status::Done => match reply
                .rest
                .first()
                .map(|v| uint(v, "via_alias"))
                .transpose()?
            {
                Some(0) => Ok(Updated::Written),
                Some(1) => Ok(Updated::WrittenViaRotationAlias),
                _ => Err(unexpected_reply("update answered without its alias flag")),
            },
            Status::Gone => Ok(Updated::Gone),
            Status::Expired => {
                self.emit_expired(reply.rest)?;
                Ok(Updated::Gone)
            }
            Status::Collision => Err(unexpected_reply("update answered a collision")),
        }
    }

    async fn rotate_session(&self, token: &SessionToken) -> Result<Option<Rotated>> {
        let id = token.id();
        let tag = token.user_tag();
        let deadline = self.deadline();
        for _ in 0..TOKEN_ATTEMPTS {
            let new_token = SessionToken::generate(tag)?;
            let new_id = new_token.id();
            let (mut inv, base) = self.start("rotate", tag);
            inv.key(format!("{base}{id}"))
                .key(format!("{base}idx"))
                .key(format!("{base}{new_id}"))
                .arg(id.as_str())
                .arg(new_id.as_str());
            let reply = parse_reply(self.run(&inv, deadline).await?)?;
            match reply.status {
                Status::Gone => return Ok(None),
                Status::Expired => {
                    self.emit_expired(reply.rest)?;
                    return Ok(None);
                }
                Status::Done => {
                    let Ok([from, stored]) = <[Value; 2]>::try_from(reply.rest) else {
                        return Err(unexpected_reply("a rotate reply of the wrong length"));
                    };
                    let from = session_id(from, "old id")?;
                    let record = decode(new_id.clone(), &bytes(stored, "session record")?)?;
                    self.emit(SessionEvent::Rotated {
                        from: from.clone(),
                        to: new_id,
                        user_id: record.user_id.clone(),
                    });
                    return Ok(Some(Rotated {
                        token: new_token,
                        record,
                        from,
                    }));
                }
                Status::Collision => {
                    tracing::warn!("statehouse-redis: a fresh session id was taken; drawing again");
                }
            }
        }
        Err(too_many_collisions())
    }

    async fn revoke_session(&self, token: &SessionToken) -> Result<Option<Revoked>> {
        let id = token.id();
        let (mut inv, base) = self.start("revoke", token.user_tag());
        inv.key(format!("{base}{id}"))
            .key(format!("{base}idx"))
            .arg(id.as_str());
        let reply = parse_reply(self.run(&inv, self.deadline()).await?)?;
        self.revocation_outcome(reply, "revoke")
    }

    async fn list_for_user(&self, user_id: &str) -> Result<Vec<SessionInfo>> {
        check_user(user_id)?;
        let (mut inv, base) = self.start("list", UserTag::for_user(user_id));
        inv.key(format!("{base}idx")).arg(user_id);
        let (_now, live, expired) = parse_lists(self.run(&inv, self.deadline()).await?)?;
        self.emit_expired(expired)?;
        if !live.len().is_multiple_of(7) {
            return Err(unexpected_reply("a list entry of the wrong length"));
        }
        let mut out = Vec::with_capacity(live.len() / 7);
        let mut it = live.into_iter();
        while let Some(id) = it.next() {
            let mut next = || {
                it.next()
                    .ok_or_else(|| unexpected_reply("a short list entry"))
            };
            let id = session_id(id, "session id")?;
            let created_at = Timestamp::from_micros(uint(&next()?, "created_at")?);
            let last_seen = Timestamp::from_micros(uint(&next()?, "last_seen")?);
            let has_ip = uint(&next()?, "has_ip")? == 1;
            let ip = string(next()?, "ip")?;
            let has_ua = uint(&next()?, "has_ua")? == 1;
            let ua = string(next()?, "user agent")?;
            out.push(SessionInfo {
                id,
                created_at,
                last_seen,
                expires_at: expires_at(created_at, last_seen, &self.inner.config),
                ip: has_ip.then_some(ip),
                user_agent: has_ua.then_some(ua),
            });
        }
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    async fn revoke_by_id(&self, user_id: &str, id: &SessionId) -> Result<bool> {
        check_user(user_id)?;
        let (mut inv, base) = self.start("revoke_id", UserTag::for_user(user_id));
        inv.key(format!("{base}{id}"))
            .key(format!("{base}idx"))
            .arg(id.as_str())
            .arg(user_id);
        let reply = parse_reply(self.run(&inv, self.deadline()).await?)?;
        Ok(self.revocation_outcome(reply, "revoke_by_id")?.is_some())
    }

    async fn revoke_all_for_user(
        &self,
        user_id: &str,
        keep: Option<&SessionId>,
    ) -> Result<Vec<SessionId>> {
        check_user(user_id)?;
        let (mut inv, base) = self.start("revoke_all", UserTag::for_user(user_id));
        inv.key(format!("{base}idx"))
            .arg(user_id)
            .arg(keep.map_or("", SessionId::as_str));
        let (_now, revoked, expired) = parse_lists(self.run(&inv, self.deadline()).await?)?;
        self.emit_expired(expired)?;
        let revoked = revoked
            .into_iter()
            .map(|id| session_id(id, "revoked id"))
            .collect::<Result<Vec<_>>>()?;
        for id in &revoked {
            self.emit(SessionEvent::Revoked {
                id: id.clone(),
                user_id: Some(user_id.to_owned()),
            });
        }
        Ok(revoked)
    }
}

/// Configures a [`RedisSessionStore`] with a connection of its own; made by
/// [`RedisSessionStore::builder`]. To share a [`RedisStore`]'s connection instead, use
/// [`RedisStore::session_store`].
///
/// ```no_run
/// use std::time::Duration;
/// use statehouse_core::session::SessionConfig;
/// use statehouse_redis::{RedisSessionStore, RedisTopology, TimeSource};
///
/// # async fn example() -> Result<(), statehouse_core::Error> {
/// let config = SessionConfig::builder().idle_timeout(Duration::from_secs(900)).build()?;
/// let sessions = RedisSessionStore::builder(RedisTopology::Cluster(vec![
///     "redis://10.0.0.1:6379".into(),
/// ]))
/// .prefix("app:s:")
/// .time_source(TimeSource::Server)
/// .call_timeout(Duration::from_millis(250))
/// .config(config)
/// .connect()
/// .await?;
/// # let _ = sessions;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `connect` is awaited"]
pub struct RedisSessionStoreBuilder {
    topology: RedisTopology,
    prefix: String,
    time_source: TimeSource,
    skew_allowance: Option<Duration>,
    call_timeout: Duration,
    config: SessionConfig,
    hooks: Option<Arc<dyn SessionHooks>>,
    tls: TlsSettings,
}

impl RedisSessionStoreBuilder {
    /// The prefix of every storage key (default `"sh:s:"`): at most 64 printable ASCII
    /// characters without spaces or braces, checked by [`connect`](Self::connect).
    pub fn prefix(mut self, prefix: &str) -> Self {
        prefix.clone_into(&mut self.prefix);
        self
    }

    /// Which clock decides (default [`TimeSource::Server`]).
    pub fn time_source(mut self, time_source: TimeSource) -> Self {
        self.time_source = time_source;
        self
    }

    /// Slack added to the TTL of every key (default zero with server time, five seconds with
    /// caller time); see [`RedisStoreBuilder::skew_allowance`](crate::RedisStoreBuilder::skew_allowance).
    pub fn skew_allowance(mut self, skew_allowance: Duration) -> Self {
        self.skew_allowance = Some(skew_allowance);
        self
    }

    /// The deadline of one call (default one second); a call that misses it returns
    /// [`Error::Timeout`]. More than zero, at most one hour.
    pub fn call_timeout(mut self, call_timeout: Duration) -> Self {
        self.call_timeout = call_timeout;
        self
    }

    /// Lifetimes, refresh threshold and rotation grace (default [`SessionConfig::default`]).
    pub fn config(mut self, config: SessionConfig) -> Self {
        self.config = config;
        self
    }

    /// Receives a [`SessionEvent`] after each confirmed change.
    pub fn hooks(mut self, hooks: Arc<dyn SessionHooks>) -> Self {
        self.hooks = Some(hooks);
        self
    }

    /// Trusts these certificate authorities (PEM) for the server's certificate over
    /// `rediss://`, instead of the system's roots; see
    /// [`RedisStoreBuilder::tls_root_certificates`](crate::RedisStoreBuilder::tls_root_certificates).
    pub fn tls_root_certificates(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.root_certificates = Some(pem.into());
        self
    }

    /// Presents this client certificate and key (PEM) for mutual TLS; see
    /// [`RedisStoreBuilder::tls_client_certificate`](crate::RedisStoreBuilder::tls_client_certificate).
    pub fn tls_client_certificate(
        mut self,
        certificate_chain_pem: impl Into<Vec<u8>>,
        private_key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.client_certificate = Some((certificate_chain_pem.into(), private_key_pem.into()));
        self
    }

    /// Validates the configuration and connects; errors as
    /// [`RedisStoreBuilder::connect`](crate::RedisStoreBuilder::connect).
    pub async fn connect(self) -> Result<RedisSessionStore> {
        validate_prefix(&self.prefix)?;
        let link = Link::connect(
            self.topology,
            self.time_source,
            self.skew_allowance,
            self.call_timeout,
            self.tls,
        )
        .await?;
        Ok(RedisSessionStore {
            inner: Arc::new(Inner {
                link: Arc::new(link),
                loads: Arc::new(LoadBatcher::new()),
                reads: Arc::new(GetBatcher::new()),
                prefix: self.prefix,
                config: self.config,
                hooks: self.hooks,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_handed_over_to_the_script_keeps_the_time_left_from_its_start() {
        let call_timeout = Duration::from_millis(1000);
        let started = Instant::now();
        // However long the fast path's read took (here nearly the call timeout), the script's
        // request and the caller's wait end at the call timeout from the load's start.
        let handed_over_at = started + Duration::from_millis(900);
        let budget = LoadBudget::new(started, None, call_timeout);
        assert_eq!(budget.script_deadline(), started + call_timeout);
        assert_eq!(
            budget.script_deadline() - handed_over_at,
            Duration::from_millis(100)
        );
        assert_eq!(budget.caller_deadline(true), Some(started + call_timeout));
        // Straight to the script (`touch_after` zero): its request's deadline is enough.
        assert_eq!(budget.caller_deadline(false), None);

        // A caller's shorter timeout bounds the whole load; the script's call keeps the call
        // timeout (the connection's health check counts it, not a caller's choice).
        let budget = LoadBudget::new(started, Some(Duration::from_millis(300)), call_timeout);
        let caller = started + Duration::from_millis(300);
        assert_eq!(budget.caller_deadline(true), Some(caller));
        assert_eq!(budget.caller_deadline(false), Some(caller));
        assert_eq!(budget.script_deadline(), started + call_timeout);
        // A caller's longer timeout is the call timeout.
        let budget = LoadBudget::new(started, Some(Duration::from_secs(5)), call_timeout);
        assert_eq!(budget.timeout, call_timeout);
        assert_eq!(budget.caller_deadline(false), None);
    }

    #[test]
    fn user_agents_are_cut_at_a_character_boundary() {
        assert_eq!(truncate("abc", 2), "ab");
        assert_eq!(truncate("é", 1), "");
        assert_eq!(truncate("abc", 512), "abc");
    }
}
