//! [`EmbeddedSessionStore`]: sessions in process memory, deciding exactly like the Redis store.
//!
//! # Layout
//!
//! The store mirrors the Redis layout, so that both decide the same way in every case. For each
//! [`UserTag`] (the first 8 bytes of every token of that user) there is one map from
//! [`SessionId`] to an entry, which is either
//!
//! - a **session**: the [`SessionRecord`], or
//! - a **rotation alias**: the id of an old token, pointing to the id the session moved to, with
//!   its own `alias_expires_at`.
//!
//! That map is also the per-user index (on Redis: the session keys and the index ZSET under one
//! hash tag). The shards are chosen by user tag, so every operation of one user locks exactly one
//! shard.
//!
//! # Semantics (shared with the Redis store)
//!
//! Below, `now` is read once per call, under the shard's lock. A **session is alive** while
//! `now < expires_at(created_at, last_seen, config)` ([`statehouse_core::session::expires_at`]).
//! An **alias is alive** while `now < alias_expires_at` *and* its target id holds a live session
//! (not another alias: aliases resolve **one hop only**, so after a second rotation within the
//! grace the oldest token is dead). Resolving a token means: look up `token.id()` under
//! `token.user_tag()`; a live session resolves to itself, a live alias to its target
//! (`via_rotation_alias`); anything else resolves to nothing, and the dead entries met on the way
//! (the expired session, the expired alias, an alias whose target is gone) are removed.
//!
//! - **create**: validates the input ([`NewSession::validate`]) before anything else; draws a
//!   token for `UserTag::for_user(user_id)` and draws again if its id is already taken (never
//!   overwrites); `created_at = last_seen = now`; the user agent is cut to its longest prefix of
//!   at most [`MAX_USER_AGENT_LEN`] bytes that ends on a character boundary. The returned
//!   record's `id` is `token.id()`; the token itself is never stored. If the user already has
//!   [`SessionConfig::max_sessions_per_user`] live sessions (after the dead entries of the tag
//!   are removed), the ones first to expire (ties by id) are removed until one more fits, and
//!   their ids returned as [`Created::evicted`].
//! - **load**: resolve. If `touch_due(last_seen, now)`, set `last_seen = now` and report
//!   `touched = true`; otherwise nothing is written and `touched = false`. Through an alias the
//!   target is loaded and touched the same way, with `via_rotation_alias = true`.
//! - **update**: validates the changes first ([`SessionChanges::validate`]); resolve (a live alias
//!   updates its target); if nothing resolves, return [`Updated::Gone`] and write **nothing**
//!   (an update never brings back a revoked or expired session). Otherwise remove the fields in
//!   `changes.remove`, then set those in `changes.set` (so a field named in both ends up set),
//!   replace the roles if `changes.roles` is `Some`, and set `last_seen = now` (even when the
//!   changes are empty: an update is activity). Returns [`Updated::Written`], or
//!   [`Updated::WrittenViaRotationAlias`] when the token was a live alias.
//! - **rotate**: resolve (rotating through a live alias rotates its target); `None` if nothing
//!   resolves. Draws a new token with the same user tag (again never taking an existing id), moves
//!   the record to the new id keeping `created_at` (the absolute lifetime does not restart) and
//!   every field, sets `last_seen = now`, and turns the old id into an alias to the new id with
//!   `alias_expires_at = now + rotation_grace` (no alias at all when the grace is zero). An alias
//!   that pointed at the old id now points at an alias, so it is dead (one hop).
//! - **revoke**: resolve; if a live session resolves, remove it (and the alias the token was, if
//!   it was one) and return `true`; otherwise `false`. Aliases pointing to a removed session are
//!   dead from then on and are removed when next met.
//! - **list_for_user / revoke_by_id / revoke_all_for_user**: the user id is validated like
//!   [`NewSession::user_id`] (else [`Error::InvalidInput`]); they work on the entries under
//!   `UserTag::for_user(user_id)`, first removing every dead entry there (dead sessions, dead
//!   aliases), and consider only sessions whose `user_id` equals the argument (two user ids may
//!   in theory share a tag). `list_for_user` returns [`SessionInfo`]s sorted by `created_at`,
//!   ties by id. `revoke_by_id` removes the live session with that id (an alias id is not a
//!   session id: `false`). `revoke_all_for_user` removes every live session except `keep` (a
//!   `keep` that is a live alias keeps its target), plus the aliases pointing to them, and
//!   returns the ids of the sessions it removed (dead ones pruned on the way are not counted).
//!   None of them reads as activity.
//!
//! # Memory
//!
//! Each shard keeps at most `max_sessions / shards` entries (sessions and aliases). An insert
//! into a full shard first removes every dead entry of the shard; only if none was dead does it
//! evict the entry closest to expiry (a session by its `expires_at`, an alias by its
//! `alias_expires_at`), never the session being written. Both are scans of the shard, paid only
//! when it is full. The Redis store has no such bound of its own (Redis's `maxmemory` policy
//! applies there).

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use statehouse_core::session::{
    Created, LoadedSession, NewSession, Revoked, Rotated, SessionChanges, SessionConfig, SessionId,
    SessionInfo, SessionRecord, SessionStore, SessionToken, Updated, UserTag, is_alive, touch_due,
};
use statehouse_core::{Clock, Error, Result, SystemClock, Timestamp};

use crate::store::{DEFAULT_SHARDS, MAX_SHARDS};

/// The default bound on stored sessions (and rotation aliases). A session takes a few hundred
/// bytes plus its data, so a million is some hundreds of MiB with small data.
pub const DEFAULT_MAX_SESSIONS: usize = 1_000_000;

/// The longest user agent kept with a session, in bytes; longer ones are cut (on a character
/// boundary) when the session is created.
pub const MAX_USER_AGENT_LEN: usize = 512;

/// An in-process [`SessionStore`]: sharded by user, bounded, and deciding exactly like the Redis
/// session store. Clones share the same sessions.
///
/// See the [module docs](crate::session) for the precise semantics of every operation.
///
/// ```
/// use std::time::Duration;
/// use futures::executor::block_on;
/// use statehouse_core::session::{NewSession, SessionConfig, SessionStore};
/// use statehouse_core::{ManualClock, Timestamp};
/// use statehouse_embedded::EmbeddedSessionStore;
///
/// let clock = ManualClock::new(Timestamp::from_micros(1_700_000_000_000_000));
/// let config = SessionConfig::builder().idle_timeout(Duration::from_secs(60)).build()?;
/// let store = EmbeddedSessionStore::builder()
///     .clock(clock.clone())
///     .config(config)
///     .max_sessions(10_000)
///     .build()?;
/// block_on(async {
///     let (token, record) = store.create(&NewSession::for_user("alice")).await?;
///     assert_eq!(record.id, token.id());
///     assert!(store.load(&token).await?.is_some());
///     clock.advance(Duration::from_secs(60));
///     assert!(store.load(&token).await?.is_none(), "idle for the whole timeout");
///     Ok::<(), statehouse_core::Error>(())
/// })?;
/// # Ok::<(), statehouse_core::Error>(())
/// ```
#[derive(Clone)]
pub struct EmbeddedSessionStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// A std `Mutex` per shard: held only for one synchronous resolve-and-write (or a scan of
    /// the shard when it is full), never across an `.await`, so an async mutex would only add
    /// cost. The trait's async methods complete without ever waiting on anything else.
    shards: Box<[Mutex<SessionShard>]>,
    /// `shards.len() - 1`; the shard count is a power of two.
    shard_mask: usize,
    /// The bound actually enforced: per-shard cap × shards.
    max_sessions: usize,
    /// Picks the shard of a user tag. Seeded per store, so user ids cannot be chosen to crowd
    /// one shard of every process.
    hasher: foldhash::fast::RandomState,
    config: SessionConfig,
    clock: Arc<dyn Clock>,
}

/// What one id stores.
#[derive(Debug, Clone)]
enum Entry {
    Session(SessionRecord),
    /// The id of a token that was rotated away: `target` is where the session went.
    Alias {
        target: SessionId,
        expires_at: Timestamp,
    },
}

/// The entries of one user tag: the session records, the aliases, and thereby the per-user index.
type UserEntries = HashMap<SessionId, Entry>;

/// One shard: the users whose tag hashes to it. Always used under its `Mutex`.
#[derive(Debug)]
struct SessionShard {
    users: HashMap<UserTag, UserEntries>,
    /// Entries (sessions and aliases) over all users of the shard.
    len: usize,
    /// The most entries this shard holds.
    cap: usize,
}

/// Whether `entry` is alive at `now`; `entries` are its user's, to follow an alias.
fn entry_alive(
    entries: &UserEntries,
    entry: &Entry,
    now: Timestamp,
    config: &SessionConfig,
) -> bool {
    match entry {
        Entry::Session(r) => is_alive(r.created_at, r.last_seen, now, config),
        Entry::Alias { target, expires_at } => {
            now < *expires_at
                && matches!(
                    entries.get(target),
                    Some(Entry::Session(r)) if is_alive(r.created_at, r.last_seen, now, config)
                )
        }
    }
}

/// When an entry stops mattering, for eviction.
fn entry_expiry(entry: &Entry, config: &SessionConfig) -> Timestamp {
    match entry {
        Entry::Session(r) => r.expires_at(config),
        Entry::Alias { expires_at, .. } => *expires_at,
    }
}

impl SessionShard {
    fn new(cap: usize) -> Self {
        SessionShard {
            users: HashMap::new(),
            len: 0,
            cap,
        }
    }

    fn contains(&self, tag: UserTag, id: &SessionId) -> bool {
        self.users.get(&tag).is_some_and(|e| e.contains_key(id))
    }

    fn remove(&mut self, tag: UserTag, id: &SessionId) -> Option<Entry> {
        let entries = self.users.get_mut(&tag)?;
        let removed = entries.remove(id)?;
        self.len -= 1;
        if entries.is_empty() {
            self.users.remove(&tag);
        }
        Some(removed)
    }

    /// Inserts at an id known to be free. The caller made room.
    fn insert(&mut self, tag: UserTag, id: SessionId, entry: Entry) {
        if self
            .users
            .entry(tag)
            .or_default()
            .insert(id, entry)
            .is_none()
        {
            self.len += 1;
        }
    }

    fn session_mut(&mut self, tag: UserTag, id: &SessionId) -> Option<&mut SessionRecord> {
        match self.users.get_mut(&tag)?.get_mut(id)? {
            Entry::Session(r) => Some(r),
            Entry::Alias { .. } => None,
        }
    }

    /// The id of the live session `id` stands for, and whether `id` is an alias; removes the dead
    /// entries met on the way. See the module docs.
    fn resolve(
        &mut self,
        tag: UserTag,
        id: &SessionId,
        now: Timestamp,
        config: &SessionConfig,
    ) -> Option<(SessionId, bool)> {
        let entries = self.users.get(&tag)?;
        let (target, via_alias) = match entries.get(id)? {
            Entry::Session(_) => (id.clone(), false),
            Entry::Alias { expires_at, .. } if now >= *expires_at => {
                self.remove(tag, id);
                return None;
            }
            Entry::Alias { target, .. } => (target.clone(), true),
        };
        match entries.get(&target) {
            Some(Entry::Session(r)) if is_alive(r.created_at, r.last_seen, now, config) => {
                Some((target, via_alias))
            }
            Some(Entry::Session(_)) => {
                self.remove(tag, &target);
                if via_alias {
                    self.remove(tag, id);
                }
                None
            }
            // One hop only: the target was itself rotated away (it may still be a live alias
            // for its own token, so it stays).
            Some(Entry::Alias { .. }) | None => {
                self.remove(tag, id);
                None
            }
        }
    }

    /// Removes every dead entry of one user; returns how many.
    fn prune_user(&mut self, tag: UserTag, now: Timestamp, config: &SessionConfig) -> usize {
        let Some(entries) = self.users.get_mut(&tag) else {
            return 0;
        };
        let dead: Vec<SessionId> = entries
            .iter()
            .filter(|(_, e)| !entry_alive(entries, e, now, config))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &dead {
            entries.remove(id);
        }
        self.len -= dead.len();
        if entries.is_empty() {
            self.users.remove(&tag);
        }
        dead.len()
    }

    /// Revokes `user_id`'s least recently active sessions (the first to expire; ties by id, as
    /// the Redis index orders them) until one more fits under the per-user cap. Returns their
    /// ids in that order. Run after [`prune_user`](Self::prune_user), so every session counted
    /// is live.
    fn make_room_for_user(
        &mut self,
        tag: UserTag,
        user_id: &str,
        config: &SessionConfig,
    ) -> Vec<SessionId> {
        let cap = config.max_sessions_per_user() as usize;
        let Some(entries) = self.users.get(&tag) else {
            return Vec::new();
        };
        let mut live: Vec<(Timestamp, &SessionId)> = entries
            .iter()
            .filter_map(|(id, e)| match e {
                Entry::Session(r) if r.user_id == user_id => Some((r.expires_at(config), id)),
                _ => None,
            })
            .collect();
        if live.len() < cap {
            return Vec::new();
        }
        live.sort_unstable();
        let excess = live.len() + 1 - cap;
        let evicted: Vec<SessionId> = live[..excess].iter().map(|(_, id)| (*id).clone()).collect();
        for id in &evicted {
            self.remove(tag, id);
        }
        evicted
    }

    /// Removes every dead entry of the shard; returns how many.
    fn purge(&mut self, now: Timestamp, config: &SessionConfig) -> usize {
        let tags: Vec<UserTag> = self.users.keys().copied().collect();
        tags.into_iter()
            .map(|tag| self.prune_user(tag, now, config))
            .sum()
    }

    /// Frees at least one place if the shard is full: drop every dead entry, or if none was
    /// dead, evict the entry closest to expiry other than `protect` (ties: the smallest tag,
    /// then id, so the choice is deterministic). Returns whether there is room now.
    fn make_room(
        &mut self,
        now: Timestamp,
        config: &SessionConfig,
        protect: Option<(UserTag, &SessionId)>,
    ) -> bool {
        if self.len < self.cap {
            return true;
        }
        if self.purge(now, config) > 0 {
            return true;
        }
        let victim = self
            .users
            .iter()
            .flat_map(|(tag, entries)| entries.iter().map(move |(id, e)| (*tag, id, e)))
            .filter(|&(tag, id, _)| protect != Some((tag, id)))
            .min_by(|a, b| {
                (entry_expiry(a.2, config), a.0, a.1).cmp(&(entry_expiry(b.2, config), b.0, b.1))
            })
            .map(|(tag, id, _)| (tag, id.clone()));
        match victim {
            Some((tag, id)) => {
                self.remove(tag, &id);
                true
            }
            None => false,
        }
    }
}

/// `user_agent` cut to at most [`MAX_USER_AGENT_LEN`] bytes, on a character boundary.
fn truncate_user_agent(ua: &str) -> String {
    let mut end = ua.len().min(MAX_USER_AGENT_LEN);
    while !ua.is_char_boundary(end) {
        end -= 1;
    }
    ua[..end].to_owned()
}

/// Rejects a user id that no session could have (the same rule as [`NewSession::validate`]).
fn validate_user_id(user_id: &str) -> Result<()> {
    NewSession::for_user(user_id).validate()
}

impl EmbeddedSessionStore {
    /// A store with `config`, the system clock, [`DEFAULT_SHARDS`] shards and at most
    /// [`DEFAULT_MAX_SESSIONS`] entries.
    ///
    /// ```
    /// use statehouse_core::session::SessionConfig;
    /// let store = statehouse_embedded::EmbeddedSessionStore::new(SessionConfig::default());
    /// assert!(store.is_empty());
    /// ```
    pub fn new(config: SessionConfig) -> Self {
        Self::from_parts(
            Arc::new(SystemClock),
            config,
            DEFAULT_SHARDS,
            DEFAULT_MAX_SESSIONS,
        )
    }

    /// A builder to set the clock, the session configuration, the bound and the shard count.
    ///
    /// ```
    /// use statehouse_core::ManualClock;
    /// use statehouse_embedded::EmbeddedSessionStore;
    /// let store = EmbeddedSessionStore::builder()
    ///     .clock(ManualClock::starting_now())
    ///     .max_sessions(1_000)
    ///     .shards(8)
    ///     .build()?;
    /// assert_eq!(store.shards(), 8);
    /// assert_eq!(store.max_sessions(), 1_000);
    /// # Ok::<(), statehouse_core::Error>(())
    /// ```
    pub fn builder() -> EmbeddedSessionStoreBuilder {
        EmbeddedSessionStoreBuilder::default()
    }

    fn from_parts(
        clock: Arc<dyn Clock>,
        config: SessionConfig,
        shards: usize,
        max_sessions: usize,
    ) -> Self {
        let per_shard = (max_sessions / shards).max(1);
        let shards: Box<[_]> = (0..shards)
            .map(|_| Mutex::new(SessionShard::new(per_shard)))
            .collect();
        EmbeddedSessionStore {
            inner: Arc::new(Inner {
                shard_mask: shards.len() - 1,
                max_sessions: per_shard * shards.len(),
                shards,
                hasher: foldhash::fast::RandomState::default(),
                config,
                clock,
            }),
        }
    }

    /// The session configuration this store enforces.
    ///
    /// ```
    /// use statehouse_core::session::SessionConfig;
    /// let store = statehouse_embedded::EmbeddedSessionStore::new(SessionConfig::default());
    /// assert_eq!(store.config(), &SessionConfig::default());
    /// ```
    pub fn config(&self) -> &SessionConfig {
        &self.inner.config
    }

    /// The number of shards.
    ///
    /// ```
    /// use statehouse_core::session::SessionConfig;
    /// let store = statehouse_embedded::EmbeddedSessionStore::new(SessionConfig::default());
    /// assert_eq!(store.shards(), statehouse_embedded::DEFAULT_SHARDS);
    /// ```
    pub fn shards(&self) -> usize {
        self.inner.shards.len()
    }

    /// The bound on stored entries (sessions and rotation aliases) actually enforced: the
    /// per-shard cap (`max_sessions / shards`, at least 1) times the shard count.
    ///
    /// ```
    /// let store = statehouse_embedded::EmbeddedSessionStore::builder()
    ///     .max_sessions(1000)
    ///     .shards(64)
    ///     .build()?;
    /// assert_eq!(store.max_sessions(), 960); // 15 per shard
    /// # Ok::<(), statehouse_core::Error>(())
    /// ```
    pub fn max_sessions(&self) -> usize {
        self.inner.max_sessions
    }

    /// How many entries (sessions and rotation aliases) are stored, counting dead ones not yet
    /// removed. Shards are counted one after another, so under concurrent use this is an
    /// approximation.
    ///
    /// ```
    /// use statehouse_core::session::SessionConfig;
    /// assert_eq!(statehouse_embedded::EmbeddedSessionStore::new(SessionConfig::default()).len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        (0..self.inner.shards.len()).map(|i| self.lock(i).len).sum()
    }

    /// True when nothing is stored.
    ///
    /// ```
    /// use statehouse_core::session::SessionConfig;
    /// assert!(statehouse_embedded::EmbeddedSessionStore::new(SessionConfig::default()).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every dead entry (expired or revoked-target sessions and aliases), shard by
    /// shard, and returns how many. Never needed for correctness (dead entries read as absent)
    /// nor for the memory bound (a full shard reclaims them), but frees their memory sooner.
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::executor::block_on;
    /// use statehouse_core::session::{NewSession, SessionConfig, SessionStore};
    /// use statehouse_core::ManualClock;
    /// use statehouse_embedded::EmbeddedSessionStore;
    ///
    /// let clock = ManualClock::starting_now();
    /// let store = EmbeddedSessionStore::builder().clock(clock.clone()).build()?;
    /// block_on(store.create(&NewSession::for_user("alice")))?;
    /// clock.advance(SessionConfig::default().idle_timeout());
    /// assert_eq!(store.purge_expired(), 1);
    /// assert!(store.is_empty());
    /// # Ok::<(), statehouse_core::Error>(())
    /// ```
    pub fn purge_expired(&self) -> usize {
        (0..self.inner.shards.len())
            .map(|i| {
                let mut shard = self.lock(i);
                shard.purge(self.inner.clock.now(), &self.inner.config)
            })
            .sum()
    }

    fn shard_of(&self, tag: UserTag) -> MutexGuard<'_, SessionShard> {
        let hash = self.inner.hasher.hash_one(tag);
        self.lock((hash >> 32) as usize & self.inner.shard_mask)
    }

    fn lock(&self, index: usize) -> MutexGuard<'_, SessionShard> {
        // A poisoned shard is still consistent: every change is a single map insert or removal
        // (or a field write on one record), and `len` is adjusted right after each.
        self.inner.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A token for `tag` whose id is free in `shard`, drawn by `generate`.
    fn fresh_token(
        shard: &SessionShard,
        tag: UserTag,
        generate: &mut dyn FnMut(UserTag) -> Result<SessionToken>,
    ) -> Result<SessionToken> {
        loop {
            let token = generate(tag)?;
            // 256 random bits make a repeat astronomically unlikely; never overwriting is what
            // keeps an attacker from ever landing on someone else's session through one.
            if !shard.contains(tag, &token.id()) {
                return Ok(token);
            }
        }
    }

    fn create_with(
        &self,
        new: &NewSession,
        generate: &mut dyn FnMut(UserTag) -> Result<SessionToken>,
    ) -> Result<Created> {
        new.validate()?;
        let tag = UserTag::for_user(&new.user_id);
        let config = &self.inner.config;
        let mut shard = self.shard_of(tag);
        let now = self.inner.clock.now();
        let token = Self::fresh_token(&shard, tag, generate)?;
        let record = SessionRecord {
            id: token.id(),
            user_id: new.user_id.clone(),
            roles: new.roles.clone(),
            data: new.data.clone(),
            created_at: now,
            last_seen: now,
            ip: new.ip.clone(),
            user_agent: new.user_agent.as_deref().map(truncate_user_agent),
        };
        shard.prune_user(tag, now, config);
        let evicted = shard.make_room_for_user(tag, &new.user_id, config);
        shard.make_room(now, config, None);
        shard.insert(tag, record.id.clone(), Entry::Session(record.clone()));
        Ok(Created {
            token,
            record,
            evicted,
        })
    }

    fn load_sync(&self, token: &SessionToken) -> Option<LoadedSession> {
        let tag = token.user_tag();
        let config = &self.inner.config;
        let mut shard = self.shard_of(tag);
        let now = self.inner.clock.now();
        let (target, via_rotation_alias) = shard.resolve(tag, &token.id(), now, config)?;
        let record = shard.session_mut(tag, &target)?;
        let touched = touch_due(record.last_seen, now, config);
        if touched {
            record.last_seen = now;
        }
        Some(LoadedSession {
            record: record.clone(),
            touched,
            via_rotation_alias,
        })
    }

    fn update_sync(&self, token: &SessionToken, changes: &SessionChanges) -> Result<Updated> {
        changes.validate()?;
        let tag = token.user_tag();
        let mut shard = self.shard_of(tag);
        let now = self.inner.clock.now();
        let presented = token.id();
        let Some((target, _)) = shard.resolve(tag, &presented, now, &self.inner.config) else {
            return Ok(Updated::Gone);
        };
        let via_alias = target != presented;
        let Some(record) = shard.session_mut(tag, &target) else {
            return Ok(Updated::Gone);
        };
        for name in &changes.remove {
            record.data.remove(name);
        }
        for (name, value) in &changes.set {
            record.data.insert(name.clone(), value.clone());
        }
        if let Some(roles) = &changes.roles {
            record.roles.clone_from(roles);
        }
        record.last_seen = now;
        Ok(if via_alias {
            Updated::WrittenViaRotationAlias
        } else {
            Updated::Written
        })
    }

    fn rotate_with(
        &self,
        token: &SessionToken,
        generate: &mut dyn FnMut(UserTag) -> Result<SessionToken>,
    ) -> Result<Option<Rotated>> {
        let tag = token.user_tag();
        let config = &self.inner.config;
        let mut shard = self.shard_of(tag);
        let now = self.inner.clock.now();
        let Some((old_id, _)) = shard.resolve(tag, &token.id(), now, config) else {
            return Ok(None);
        };
        // Drawn before anything moves, so a failing generator leaves the session as it was.
        let new_token = Self::fresh_token(&shard, tag, generate)?;
        let Some(Entry::Session(mut record)) = shard.remove(tag, &old_id) else {
            return Ok(None);
        };
        record.id = new_token.id();
        record.last_seen = now;
        shard.insert(tag, record.id.clone(), Entry::Session(record.clone()));
        let alias_expires_at = now.saturating_add(config.rotation_grace());
        // With a shard bound so small that only the session itself fits, the alias is dropped:
        // the bound holds, and the old token simply stops working at once.
        if now < alias_expires_at && shard.make_room(now, config, Some((tag, &record.id))) {
            shard.insert(
                tag,
                old_id.clone(),
                Entry::Alias {
                    target: record.id.clone(),
                    expires_at: alias_expires_at,
                },
            );
        }
        Ok(Some(Rotated {
            token: new_token,
            record,
            from: old_id,
        }))
    }

    fn revoke_sync(&self, token: &SessionToken) -> Option<Revoked> {
        let tag = token.user_tag();
        let id = token.id();
        let mut shard = self.shard_of(tag);
        let now = self.inner.clock.now();
        let (target, via_alias) = shard.resolve(tag, &id, now, &self.inner.config)?;
        let removed = shard.remove(tag, &target);
        if via_alias {
            shard.remove(tag, &id);
        }
        match removed {
            Some(Entry::Session(record)) => Some(Revoked {
                id: target,
                user_id: record.user_id,
            }),
            _ => None,
        }
    }

    fn list_sync(&self, user_id: &str) -> Result<Vec<SessionInfo>> {
        validate_user_id(user_id)?;
        let tag = UserTag::for_user(user_id);
        let config = &self.inner.config;
        let mut shard = self.shard_of(tag);
        let now = self.inner.clock.now();
        shard.prune_user(tag, now, config);
        let mut list: Vec<SessionInfo> = shard
            .users
            .get(&tag)
            .into_iter()
            .flat_map(|entries| entries.values())
            .filter_map(|e| match e {
                Entry::Session(r) if r.user_id == user_id => Some(SessionInfo {
                    id: r.id.clone(),
                    created_at: r.created_at,
                    last_seen: r.last_seen,
                    expires_at: r.expires_at(config),
                    ip: r.ip.clone(),
                    user_agent: r.user_agent.clone(),
                }),
                _ => None,
            })
            .collect();
        list.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(list)
    }

    fn revoke_by_id_sync(&self, user_id: &str, id: &SessionId) -> Result<bool> {
        validate_user_id(user_id)?;
        let tag = UserTag::for_user(user_id);
        let mut shard = self.shard_of(tag);
        let now = self.inner.clock.now();
        shard.prune_user(tag, now, &self.inner.config);
        let owned = shard
            .users
            .get(&tag)
            .and_then(|entries| entries.get(id))
            .is_some_and(|e| matches!(e, Entry::Session(r) if r.user_id == user_id));
        if owned {
            shard.remove(tag, id);
            // Its aliases are dead now: remove them too.
            shard.prune_user(tag, now, &self.inner.config);
        }
        Ok(owned)
    }

    fn revoke_all_sync(&self, user_id: &str, keep: Option<&SessionId>) -> Result<Vec<SessionId>> {
        validate_user_id(user_id)?;
        let tag = UserTag::for_user(user_id);
        let mut shard = self.shard_of(tag);
        let now = self.inner.clock.now();
        // An old id in its rotation grace keeps the session it was rotated to.
        let keep = keep.map(|id| {
            shard
                .resolve(tag, id, now, &self.inner.config)
                .map_or_else(|| id.clone(), |(target, _)| target)
        });
        let keep = keep.as_ref();
        shard.prune_user(tag, now, &self.inner.config);
        let config = &self.inner.config;
        // First to expire first, ties by id: the order of the Redis index.
        let mut doomed: Vec<(Timestamp, SessionId)> = shard
            .users
            .get(&tag)
            .into_iter()
            .flat_map(|entries| entries.iter())
            .filter_map(|(id, e)| match e {
                Entry::Session(r) if r.user_id == user_id && Some(id) != keep => {
                    Some((r.expires_at(config), id.clone()))
                }
                _ => None,
            })
            .collect();
        doomed.sort_unstable();
        let doomed: Vec<SessionId> = doomed.into_iter().map(|(_, id)| id).collect();
        for id in &doomed {
            shard.remove(tag, id);
        }
        shard.prune_user(tag, now, &self.inner.config);
        Ok(doomed)
    }
}

impl fmt::Debug for EmbeddedSessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedSessionStore")
            .field("shards", &self.shards())
            .field("max_sessions", &self.max_sessions())
            .field("config", &self.inner.config)
            .field("clock", &self.inner.clock)
            .finish_non_exhaustive()
    }
}

/// Every method completes at once: the work is done under one shard lock, with no `.await`.
#[async_trait]
impl SessionStore for EmbeddedSessionStore {
    async fn create_session(&self, new: &NewSession) -> Result<Created> {
        self.create_with(new, &mut SessionToken::generate)
    }

    async fn load(&self, token: &SessionToken) -> Result<Option<LoadedSession>> {
        Ok(self.load_sync(token))
    }

    async fn update(&self, token: &SessionToken, changes: &SessionChanges) -> Result<Updated> {
        self.update_sync(token, changes)
    }

    async fn rotate_session(&self, token: &SessionToken) -> Result<Option<Rotated>> {
        self.rotate_with(token, &mut SessionToken::generate)
    }

    async fn revoke_session(&self, token: &SessionToken) -> Result<Option<Revoked>> {
        Ok(self.revoke_sync(token))
    }

    async fn list_for_user(&self, user_id: &str) -> Result<Vec<SessionInfo>> {
        self.list_sync(user_id)
    }

    async fn revoke_by_id(&self, user_id: &str, id: &SessionId) -> Result<bool> {
        self.revoke_by_id_sync(user_id, id)
    }

    async fn revoke_all_for_user(
        &self,
        user_id: &str,
        keep: Option<&SessionId>,
    ) -> Result<Vec<SessionId>> {
        self.revoke_all_sync(user_id, keep)
    }
}

/// Configures an [`EmbeddedSessionStore`]; from [`EmbeddedSessionStore::builder`].
///
/// ```
/// use statehouse_embedded::EmbeddedSessionStore;
/// assert!(EmbeddedSessionStore::builder().shards(0).build().is_err());
/// assert!(EmbeddedSessionStore::builder().max_sessions(0).build().is_err());
/// ```
#[derive(Debug, Clone)]
pub struct EmbeddedSessionStoreBuilder {
    clock: Arc<dyn Clock>,
    config: SessionConfig,
    max_sessions: usize,
    shards: usize,
}

impl Default for EmbeddedSessionStoreBuilder {
    fn default() -> Self {
        EmbeddedSessionStoreBuilder {
            clock: Arc::new(SystemClock),
            config: SessionConfig::default(),
            max_sessions: DEFAULT_MAX_SESSIONS,
            shards: DEFAULT_SHARDS,
        }
    }
}

impl EmbeddedSessionStoreBuilder {
    /// The clock; [`SystemClock`] by default. Pass a
    /// [`ManualClock`](statehouse_core::ManualClock) in tests.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The lifetimes to enforce ([`SessionConfig::default`] by default).
    pub fn config(mut self, config: SessionConfig) -> Self {
        self.config = config;
        self
    }

    /// The most entries (sessions and rotation aliases) kept, [`DEFAULT_MAX_SESSIONS`] by
    /// default. Each shard holds at most `max_sessions / shards` (at least 1); see the
    /// [module docs](crate::session#memory) for what happens when one is full.
    pub fn max_sessions(mut self, max_sessions: usize) -> Self {
        self.max_sessions = max_sessions;
        self
    }

    /// The number of shards ([`DEFAULT_SHARDS`] by default), rounded up to a power of two, at
    /// most [`MAX_SHARDS`], and lowered to a power of two not above `max_sessions`. All
    /// sessions of one user live in one shard.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards;
        self
    }

    /// Builds the store, or fails with [`Error::InvalidInput`] naming the field for a zero
    /// `shards` or `max_sessions`, or more than [`MAX_SHARDS`] shards.
    pub fn build(self) -> Result<EmbeddedSessionStore> {
        if self.max_sessions == 0 {
            return Err(Error::InvalidInput(
                "embedded session store `max_sessions` must be at least 1".into(),
            ));
        }
        if self.shards == 0 || self.shards > MAX_SHARDS {
            return Err(Error::InvalidInput(format!(
                "embedded session store `shards` is {}; it must be 1 to {MAX_SHARDS}",
                self.shards
            )));
        }
        let mut shards = self.shards.next_power_of_two();
        if shards > self.max_sessions {
            shards = 1 << self.max_sessions.ilog2();
        }
        Ok(EmbeddedSessionStore::from_parts(
            self.clock,
            self.config,
            shards,
            self.max_sessions,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use statehouse_core::ManualClock;
    use std::time::Duration;

    fn store(clock: &ManualClock) -> EmbeddedSessionStore {
        EmbeddedSessionStore::builder()
            .clock(clock.clone())
            .build()
            .unwrap()
    }

    /// The ID-collision takeover fixed in tower-sessions 0.12: a drawn token whose id already
    /// exists must be drawn again, never overwrite the session that has it.
    #[test]
    fn a_colliding_token_is_drawn_again_not_overwritten() {
        let clock = ManualClock::starting_now();
        let store = store(&clock);
        let tag = UserTag::for_user("alice");
        let first = SessionToken::generate(tag).unwrap();
        let second = SessionToken::generate(tag).unwrap();
        let mut draws = vec![second.clone(), first.clone(), first.clone()];
        let mut generate = |_: UserTag| Ok(draws.pop().unwrap());
        let alice = NewSession::for_user("alice");
        let t1 = store.create_with(&alice, &mut generate).unwrap().token;
        assert_eq!(t1, first);
        let t2 = store.create_with(&alice, &mut generate).unwrap().token;
        assert_eq!(t2, second, "the repeat of the first token was skipped");
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn rotation_never_takes_an_existing_id() {
        let clock = ManualClock::starting_now();
        let store = store(&clock);
        let alice = NewSession::for_user("alice");
        let a = store
            .create_with(&alice, &mut SessionToken::generate)
            .unwrap()
            .token;
        let b = store
            .create_with(&alice, &mut SessionToken::generate)
            .unwrap()
            .token;
        let c = SessionToken::generate(a.user_tag()).unwrap();
        let mut draws = vec![c.clone(), b.clone()];
        let Rotated {
            token: new, record, ..
        } = store
            .rotate_with(&a, &mut |_| Ok(draws.pop().unwrap()))
            .unwrap()
            .unwrap();
        assert_eq!(new, c);
        assert_eq!(record.id, c.id());
        assert!(store.load_sync(&b).is_some_and(|l| !l.via_rotation_alias));
    }

    #[test]
    fn a_failing_generator_leaves_the_session_in_place() {
        let clock = ManualClock::starting_now();
        let store = store(&clock);
        let a = store
            .create_with(&NewSession::for_user("alice"), &mut SessionToken::generate)
            .unwrap()
            .token;
        let failed = store.rotate_with(&a, &mut |_| Err(Error::InvalidInput("no entropy".into())));
        assert!(failed.is_err());
        assert!(store.load_sync(&a).is_some_and(|l| !l.via_rotation_alias));
    }

    #[test]
    fn zero_grace_rotation_leaves_no_alias() {
        let clock = ManualClock::starting_now();
        let config = SessionConfig::builder()
            .rotation_grace(Duration::ZERO)
            .build()
            .unwrap();
        let store = EmbeddedSessionStore::builder()
            .clock(clock.clone())
            .config(config)
            .build()
            .unwrap();
        let a = store
            .create_with(&NewSession::for_user("alice"), &mut SessionToken::generate)
            .unwrap()
            .token;
        let b = store
            .rotate_with(&a, &mut SessionToken::generate)
            .unwrap()
            .unwrap()
            .token;
        assert!(store.load_sync(&a).is_none());
        assert!(store.load_sync(&b).is_some());
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn long_user_agents_are_cut_on_a_character_boundary() {
        let ua = format!("{}é", "a".repeat(MAX_USER_AGENT_LEN - 1));
        assert_eq!(truncate_user_agent(&ua).len(), MAX_USER_AGENT_LEN - 1);
        assert_eq!(truncate_user_agent("curl/8"), "curl/8");
    }
}
