//! [`Sessions`]: a [`SessionStore`] behind a per-call deadline and a circuit breaker, with a
//! codec for typed data, lifecycle events and an explicit policy for when the store is down.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use statehouse_core::session::{
    Created, LoadedSession, NewSession, Revoked, Rotated, SessionChanges, SessionEvent,
    SessionHooks, SessionId, SessionInfo, SessionRecord, SessionStore, SessionToken, Updated,
    UserTag,
};
use statehouse_core::{Clock, Error, Result, SystemClock};

use crate::breaker::{Admission, Breakers, CircuitBreakerConfig};

/// The default per-call deadline of [`Sessions`]: 100 ms. Twice the rate limiter's
/// [`DEFAULT_DEADLINE`](crate::DEFAULT_DEADLINE), because a session call that misses it fails
/// the request (see [`SessionStoreDown`]) where a limiter fails open; still far below a client
/// library's seconds-long default timeout, so an outage is decided quickly.
pub const DEFAULT_SESSION_DEADLINE: Duration = Duration::from_millis(100);

/// Turns typed session data into the bytes a [`SessionStore`] keeps, and back.
///
/// Generic methods make this trait not object-safe, so [`Sessions`] takes the codec as a type
/// parameter (default [`JsonCodec`]) instead of a `Box<dyn …>`: calls are statically
/// dispatched, and any serde format (MessagePack, postcard, CBOR) plugs in with a few lines
/// and no new dependency of this crate. A closed enum of built-in codecs was rejected: it would
/// make this crate depend on every format it offers, and leave out the one an application
/// already uses.
///
/// ```
/// use statehouse::{JsonCodec, SessionCodec};
/// let bytes = JsonCodec.encode(&vec![1, 2, 3])?;
/// assert_eq!(bytes, b"[1,2,3]");
/// let back: Vec<u32> = JsonCodec.decode(&bytes)?;
/// assert_eq!(back, [1, 2, 3]);
/// # Ok::<(), statehouse::Error>(())
/// ```
pub trait SessionCodec: Clone + Send + Sync + fmt::Debug + 'static {
    /// Encodes `value`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when the value cannot be encoded in this format.
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>>;

    /// Decodes a value written by [`encode`](Self::encode).
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the stored bytes are not a `T` in this format (a corrupt value,
    /// or data written by another version of the application).
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T>;
}

/// JSON through `serde_json`: readable in `redis-cli`, stable across versions of the
/// application, the format every surveyed session library offers. The default codec.
///
/// ```
/// use statehouse::{JsonCodec, SessionCodec};
/// assert_eq!(JsonCodec.encode("dark")?, br#""dark""#);
/// # Ok::<(), statehouse::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JsonCodec;

impl SessionCodec for JsonCodec {
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>> {
        serde_json::to_vec(value).map_err(|e| {
            Error::InvalidInput(format!("session value cannot be encoded as JSON: {e}"))
        })
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T> {
        serde_json::from_slice(bytes).map_err(|e| Error::Backend {
            message: "stored session value is not the JSON of the requested type".into(),
            source: Some(Box::new(e)),
        })
    }
}

/// What a request does when the session store cannot answer (unreachable, past the
/// [deadline](SessionsBuilder::deadline), or the circuit breaker is open).
///
/// **Why `Reject503` is the default.** A session is authentication: treating every user as
/// logged out while the store is away sends signed-in users to a login page that cannot work
/// either, shows them anonymous content as if they had been logged out, and lets any cache in
/// between store anonymous pages. A 503 says what happened, is retried by clients, and fails
/// closed. This is the opposite of the rate limiter's fail-open default on purpose: a limiter
/// that fails open loses some protection, a session layer that fails open loses the user.
/// Pick `Anonymous` for sites whose pages work for anonymous visitors anyway (a shop's
/// catalogue), where a signed-in user would rather browse logged out than see an error.
///
/// ```
/// use statehouse::SessionStoreDown;
/// assert_eq!(SessionStoreDown::default(), SessionStoreDown::Reject503);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum SessionStoreDown {
    /// Answer `503 Service Unavailable` (the default).
    #[default]
    Reject503,
    /// Go on as if the request carried no session.
    Anonymous,
}

/// What an application holds to manage sessions: a [`SessionStore`] (Redis, the embedded
/// store) behind a per-call deadline and a circuit breaker, a [`SessionCodec`] for typed data
/// (default [`JsonCodec`]), optional [`SessionHooks`], and a [`SessionStoreDown`] policy that
/// the HTTP layer (`statehouse-tower`) follows.
///
/// Cheap to clone (an `Arc` inside). Calls need a Tokio runtime with its time driver.
///
/// ## Events
///
/// Every change confirmed by the store is reported to the hooks as a [`SessionEvent`] and as a
/// `tracing` event at `info` (`debug` for loads). Logs carry the first 12 hex digits of the
/// [`SessionId`] (the SHA-256 of the token), never the token, and no user id (hooks get it).
///
/// * [`create`](Self::create) → `Created`; [`rotate`](Self::rotate) → `Rotated`;
///   [`revoke`](Self::revoke) and [`revoke_by_id`](Self::revoke_by_id) → `Revoked`.
/// * [`revoke_all_for_user`](Self::revoke_all_for_user) → one `Revoked` per session listed
///   just before the revocation. The store answers only a count, so a session created between
///   the listing and the revocation is revoked without an event.
/// * **`Expired` is never emitted here.** The store's [`load`](SessionStore::load) answers
///   `None` alike for an unknown, a revoked and an expired token, and treating every `None` as
///   an expiry would report forged tokens as expired sessions. A store that can tell them
///   apart may emit `Expired` itself: the Redis store does, given hooks of its own
///   (`RedisSessionStoreBuilder::hooks`). Give hooks to `Sessions` or to the store, not both,
///   or each change is reported twice. A load answering `None` is logged at `debug`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), statehouse::Error> {
/// use statehouse::{EmbeddedSessionStore, NewSession, SessionConfig, Sessions};
///
/// let sessions = Sessions::new(EmbeddedSessionStore::new(SessionConfig::default()));
/// let (token, _record) = sessions.create(&NewSession::for_user("alice")).await?;
/// let loaded = sessions.load(&token).await?.expect("live");
/// assert_eq!(loaded.record.user_id, "alice");
/// assert!(sessions.revoke(&token).await?);
/// assert!(sessions.load(&token).await?.is_none());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Sessions<C = JsonCodec> {
    inner: Arc<Inner>,
    codec: C,
}

impl<C: Clone> Clone for Sessions<C> {
    fn clone(&self) -> Self {
        Sessions {
            inner: self.inner.clone(),
            codec: self.codec.clone(),
        }
    }
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn SessionStore>,
    hooks: Option<Arc<dyn SessionHooks>>,
    deadline: Duration,
    store_down: SessionStoreDown,
    /// One per failure domain of the store (on Redis Cluster, groups of the users' slots).
    breakers: Breakers,
    clock: Arc<dyn Clock>,
}

/// Builds [`Sessions`]; from [`Sessions::builder`].
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use statehouse::{
///     EmbeddedSessionStore, JsonCodec, SessionConfig, SessionEvent, SessionHooks,
///     SessionStoreDown, Sessions,
/// };
///
/// #[derive(Debug)]
/// struct Audit;
/// impl SessionHooks for Audit {
///     fn on_event(&self, event: &SessionEvent) {
///         println!("{event:?}");
///     }
/// }
///
/// let sessions = Sessions::builder(EmbeddedSessionStore::new(SessionConfig::default()))
///     .hooks(Arc::new(Audit))
///     .deadline(Duration::from_millis(50))
///     .on_store_down(SessionStoreDown::Anonymous)
///     .codec(JsonCodec)
///     .build()?;
/// assert_eq!(sessions.store_down_policy(), SessionStoreDown::Anonymous);
/// # Ok::<(), statehouse::Error>(())
/// ```
#[derive(Debug)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct SessionsBuilder<C = JsonCodec> {
    store: Arc<dyn SessionStore>,
    hooks: Option<Arc<dyn SessionHooks>>,
    deadline: Duration,
    store_down: SessionStoreDown,
    breaker: CircuitBreakerConfig,
    clock: Arc<dyn Clock>,
    codec: C,
}

impl<C: SessionCodec> SessionsBuilder<C> {
    /// Receives every [`SessionEvent`]; default none.
    pub fn hooks(mut self, hooks: Arc<dyn SessionHooks>) -> Self {
        self.hooks = Some(hooks);
        self
    }

    /// The hard deadline of one store call; a call past it is an [`Error::Timeout`] and counts
    /// as a store failure. Default [`DEFAULT_SESSION_DEADLINE`] (100 ms); more than zero, at most one hour.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// What a request does while the store is down; default [`SessionStoreDown::Reject503`].
    pub fn on_store_down(mut self, policy: SessionStoreDown) -> Self {
        self.store_down = policy;
        self
    }

    /// The circuit breaker in front of the store (as the rate limiter's): after
    /// `failure_threshold` failures in a row, calls fail at once for `open_for` instead of each
    /// waiting for the deadline. Default 3 failures, 1 s.
    pub fn circuit_breaker(mut self, config: CircuitBreakerConfig) -> Self {
        self.breaker = config;
        self
    }

    /// The clock of the circuit breaker. Default [`SystemClock`]. The store keeps its own.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The codec for typed data; default [`JsonCodec`].
    pub fn codec<D: SessionCodec>(self, codec: D) -> SessionsBuilder<D> {
        SessionsBuilder {
            store: self.store,
            hooks: self.hooks,
            deadline: self.deadline,
            store_down: self.store_down,
            breaker: self.breaker,
            clock: self.clock,
            codec,
        }
    }

    /// Builds.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a deadline of zero or above one hour or an invalid circuit breaker.
    pub fn build(self) -> Result<Sessions<C>> {
        statehouse_core::check_deadline("deadline", self.deadline)?;
        self.breaker.validate()?;
        Ok(self.assemble())
    }

    fn assemble(self) -> Sessions<C> {
        let domains = self.store.failure_domains();
        Sessions {
            inner: Arc::new(Inner {
                store: self.store,
                hooks: self.hooks,
                deadline: self.deadline,
                store_down: self.store_down,
                breakers: Breakers::new(self.breaker, domains),
                clock: self.clock,
            }),
            codec: self.codec,
        }
    }
}

impl Sessions<JsonCodec> {
    /// Starts building over `store`.
    pub fn builder(store: impl SessionStore) -> SessionsBuilder<JsonCodec> {
        Self::builder_shared(Arc::new(store))
    }

    /// Starts building over a store already shared with other code.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use statehouse::{EmbeddedSessionStore, SessionConfig, SessionStore, Sessions};
    /// let store: Arc<dyn SessionStore> =
    ///     Arc::new(EmbeddedSessionStore::new(SessionConfig::default()));
    /// let sessions = Sessions::builder_shared(store.clone()).build()?;
    /// # let _ = sessions;
    /// # Ok::<(), statehouse::Error>(())
    /// ```
    pub fn builder_shared(store: Arc<dyn SessionStore>) -> SessionsBuilder<JsonCodec> {
        SessionsBuilder {
            store,
            hooks: None,
            deadline: DEFAULT_SESSION_DEADLINE,
            store_down: SessionStoreDown::default(),
            breaker: CircuitBreakerConfig::default(),
            clock: Arc::new(SystemClock),
            codec: JsonCodec,
        }
    }

    /// Sessions over `store` with every default: JSON, no hooks, a 100 ms deadline,
    /// [`SessionStoreDown::Reject503`].
    pub fn new(store: impl SessionStore) -> Sessions<JsonCodec> {
        Self::builder(store).assemble()
    }
}

/// The first 12 hex digits of a session id: enough to follow one session through the logs,
/// useless to an attacker (the id is a hash of the token and cannot be turned back into it).
fn log_id(id: &SessionId) -> &str {
    &id.as_str()[..12]
}

impl<C: SessionCodec> Sessions<C> {
    /// Creates a session. Invalid input is rejected before the store is called. A user at
    /// [`SessionConfig::max_sessions_per_user`](statehouse_core::session::SessionConfig::max_sessions_per_user) loses the least recently active session(s) in
    /// the same step, each reported as [`SessionEvent::Revoked`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`]; the store's error (an outage: [`Error::is_unavailable`]).
    pub async fn create(&self, new: &NewSession) -> Result<(SessionToken, SessionRecord)> {
        new.validate()?;
        let user = UserTag::for_user(&new.user_id);
        let Created {
            token,
            record,
            evicted,
        } = self
            .call(user, || self.inner.store.create_session(new))
            .await?;
        for id in evicted {
            tracing::info!(
                session = log_id(&id),
                "statehouse: session revoked: its user reached the most sessions per user"
            );
            self.emit(SessionEvent::Revoked {
                id,
                user_id: Some(record.user_id.clone()),
            });
        }
        tracing::info!(session = log_id(&record.id), "statehouse: session created");
        self.emit(SessionEvent::Created {
            id: record.id.clone(),
            user_id: record.user_id.clone(),
        });
        Ok((token, record))
    }

    /// Loads a session (the store counts the read as activity). `None` when the token is
    /// unknown, revoked, expired, or an old token past its rotation grace: the store does not
    /// say which, so no `Expired` event is emitted (see [`Sessions`]).
    ///
    /// # Errors
    ///
    /// The store's error.
    pub async fn load(&self, token: &SessionToken) -> Result<Option<LoadedSession>> {
        // A store that bounds its own calls takes the deadline along: no timer of ours (the
        // Redis store's read-only loads then arm none per load at all).
        let loaded = self
            .call_bounded(token.user_tag(), || async {
                let store = &self.inner.store;
                match store.load_within(token, self.inner.deadline).await {
                    Some(result) => result,
                    None => within(self.inner.deadline, store.load(token)).await,
                }
            })
            .await?;
        match &loaded {
            None => tracing::debug!(
                session = log_id(&token.id()),
                "statehouse: no live session for this token (unknown, revoked or expired)"
            ),
            Some(l) if l.via_rotation_alias => tracing::debug!(
                session = log_id(&token.id()),
                current = log_id(&l.record.id),
                "statehouse: old token used within its rotation grace"
            ),
            Some(_) => {}
        }
        Ok(loaded)
    }

    /// Applies field-level `changes`; [`Updated::Gone`] when the session is gone, and
    /// [`Updated::WrittenViaRotationAlias`] when `token` is an old one in its rotation grace (a
    /// client holding it must not be handed it again). Invalid input is rejected before the
    /// store is called. Empty changes still go to the store: an update is activity (it moves
    /// `last_seen`), and the answer must say whether the session is there.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`]; the store's error.
    pub async fn update(&self, token: &SessionToken, changes: &SessionChanges) -> Result<Updated> {
        changes.validate()?;
        self.call(token.user_tag(), || self.inner.store.update(token, changes))
            .await
    }

    /// Moves the session to a new token (the old one works for the rotation grace); `None`
    /// when it is gone.
    ///
    /// # Errors
    ///
    /// The store's error.
    ///
    /// # Example
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), statehouse::Error> {
    /// use statehouse::{EmbeddedSessionStore, NewSession, SessionConfig, Sessions};
    /// let sessions = Sessions::new(EmbeddedSessionStore::new(SessionConfig::default()));
    /// let (old, _) = sessions.create(&NewSession::for_user("alice")).await?;
    /// let (new, record) = sessions.rotate(&old).await?.expect("live");
    /// assert_ne!(old, new);
    /// assert_eq!(record.id, new.id());
    /// // The old token works for the rotation grace (5 s by default), on the same session.
    /// assert!(sessions.load(&old).await?.expect("in grace").via_rotation_alias);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn rotate(
        &self,
        token: &SessionToken,
    ) -> Result<Option<(SessionToken, SessionRecord)>> {
        let rotated = self
            .call(token.user_tag(), || self.inner.store.rotate_session(token))
            .await?;
        Ok(rotated.map(
            |Rotated {
                 token,
                 record,
                 from,
             }| {
                // `from` is the session's id before the rotation: through an old token in its
                // grace, not the presented token's.
                tracing::info!(
                    from = log_id(&from),
                    to = log_id(&record.id),
                    "statehouse: session rotated"
                );
                self.emit(SessionEvent::Rotated {
                    from,
                    to: record.id.clone(),
                    user_id: record.user_id.clone(),
                });
                (token, record)
            },
        ))
    }

    /// Revokes the session (logout); `false` when it was already gone.
    ///
    /// # Errors
    ///
    /// The store's error.
    pub async fn revoke(&self, token: &SessionToken) -> Result<bool> {
        let revoked = self
            .call(token.user_tag(), || self.inner.store.revoke_session(token))
            .await?;
        let Some(Revoked { id, user_id }) = revoked else {
            return Ok(false);
        };
        // `id` is the revoked session's: through an old token in its grace, not the presented
        // token's.
        tracing::info!(session = log_id(&id), "statehouse: session revoked");
        self.emit(SessionEvent::Revoked {
            id,
            user_id: Some(user_id),
        });
        Ok(true)
    }

    /// The live sessions of `user_id`, oldest first.
    ///
    /// # Errors
    ///
    /// The store's error.
    ///
    /// # Example
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), statehouse::Error> {
    /// use statehouse::{EmbeddedSessionStore, NewSession, SessionConfig, Sessions};
    /// let sessions = Sessions::new(EmbeddedSessionStore::new(SessionConfig::default()));
    /// let (token, _) = sessions.create(&NewSession::for_user("bob")).await?;
    /// sessions.create(&NewSession::for_user("bob")).await?;
    /// let devices = sessions.list_for_user("bob").await?;
    /// assert_eq!(devices.len(), 2);
    /// assert_eq!(devices[0].id, token.id()); // oldest first
    /// # Ok(())
    /// # }
    /// ```
    pub async fn list_for_user(&self, user_id: &str) -> Result<Vec<SessionInfo>> {
        self.call(UserTag::for_user(user_id), || {
            self.inner.store.list_for_user(user_id)
        })
        .await
    }

    /// Revokes one session of `user_id` by id (a "sign out this device" button).
    ///
    /// # Errors
    ///
    /// The store's error.
    pub async fn revoke_by_id(&self, user_id: &str, id: &SessionId) -> Result<bool> {
        let revoked = self
            .call(UserTag::for_user(user_id), || {
                self.inner.store.revoke_by_id(user_id, id)
            })
            .await?;
        if revoked {
            tracing::info!(session = log_id(id), "statehouse: session revoked by id");
            self.emit(SessionEvent::Revoked {
                id: id.clone(),
                user_id: Some(user_id.to_owned()),
            });
        }
        Ok(revoked)
    }

    /// Revokes every session of `user_id` but `keep`; returns how many were revoked. Lists the
    /// sessions first, for the events (see [`Sessions`]).
    ///
    /// # Errors
    ///
    /// The store's error.
    ///
    /// # Example
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), statehouse::Error> {
    /// use statehouse::{EmbeddedSessionStore, NewSession, SessionConfig, Sessions};
    /// let sessions = Sessions::new(EmbeddedSessionStore::new(SessionConfig::default()));
    /// let (phone, _) = sessions.create(&NewSession::for_user("carol")).await?;
    /// let (laptop, _) = sessions.create(&NewSession::for_user("carol")).await?;
    /// // "Log out my other devices", from the phone:
    /// assert_eq!(sessions.revoke_all_for_user("carol", Some(&phone.id())).await?, 1);
    /// assert!(sessions.load(&laptop).await?.is_none());
    /// assert!(sessions.load(&phone).await?.is_some());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn revoke_all_for_user(
        &self,
        user_id: &str,
        keep: Option<&SessionId>,
    ) -> Result<u64> {
        let revoked = self
            .call(UserTag::for_user(user_id), || {
                self.inner.store.revoke_all_for_user(user_id, keep)
            })
            .await?;
        let count = revoked.len() as u64;
        tracing::info!(
            revoked = count,
            kept = keep.map(log_id),
            "statehouse: sessions of one user revoked"
        );
        for id in revoked {
            self.emit(SessionEvent::Revoked {
                id,
                user_id: Some(user_id.to_owned()),
            });
        }
        Ok(count)
    }

    /// Encodes a value with this codec.
    ///
    /// # Errors
    ///
    /// The codec's error.
    pub fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>> {
        self.codec.encode(value)
    }

    /// Decodes a value with this codec.
    ///
    /// # Errors
    ///
    /// The codec's error.
    pub fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T> {
        self.codec.decode(bytes)
    }

    /// The codec.
    pub fn codec(&self) -> &C {
        &self.codec
    }

    /// The store-down policy the HTTP layer follows.
    pub fn store_down_policy(&self) -> SessionStoreDown {
        self.inner.store_down
    }

    /// The per-call deadline.
    pub fn deadline(&self) -> Duration {
        self.inner.deadline
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.inner.store
    }

    fn emit(&self, event: SessionEvent) {
        if let Some(hooks) = &self.inner.hooks {
            hooks.on_event(&event);
        }
    }

    /// Calls the store about `user`'s sessions through its breaker and the deadline.
    async fn call<'a, T, F, Fut>(&'a self, user: UserTag, call: F) -> Result<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T>> + 'a,
    {
        let deadline = self.inner.deadline;
        self.call_bounded(user, || within(deadline, call())).await
    }

    /// Calls the store through the breaker; `call` is bounded by the deadline already (by
    /// [`within`] or by the store itself).
    async fn call_bounded<'a, T, F, Fut>(&'a self, user: UserTag, call: F) -> Result<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T>> + 'a,
    {
        let inner = &*self.inner;
        let breaker = if inner.breakers.per_domain() {
            inner.breakers.of(inner.store.failure_domain(user))
        } else {
            inner.breakers.of(0)
        };
        let permit = match breaker.admit(&*inner.clock) {
            Admission::Call(permit) => permit,
            Admission::Skip => {
                return Err(Error::Unavailable {
                    message: format!(
                        "circuit breaker open after repeated session store failures; the store \
                         was not called (probed again at most {:?} after it opened)",
                        inner.breakers.config().open_for
                    ),
                    source: None,
                });
            }
        };
        let result = call().await;
        match &result {
            Err(e) if e.is_invalid_input() => permit.inconclusive(),
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, "statehouse: session store unavailable");
                permit.failed(inner.clock.now(), e);
            }
            _ => permit.succeeded(),
        }
        result
    }
}

/// `call` under `deadline`: [`Error::Timeout`] when it passes first.
async fn within<T>(deadline: Duration, call: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(deadline, call)
        .await
        .unwrap_or(Err(Error::Timeout { deadline }))
}
