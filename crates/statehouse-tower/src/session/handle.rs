//! [`Session`]: the lazy per-request handle the layer puts in the request's extensions.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use statehouse::{
    JsonCodec, NewSession, SessionChanges, SessionCodec, SessionId, SessionInfo, SessionRecord,
    SessionStoreDown, SessionToken, Sessions, Updated,
};

use crate::Error;

/// The session of one request: a cheap, cloneable handle.
///
/// **Lazy.** The layer only parses the cookie. The store is called the first time a handler
/// reads the session (any method here), once per request: the result is cached in the handle,
/// so a route that never touches the session costs no store I/O.
///
/// **Writes.** Data changes ([`insert`](Self::insert), [`remove`](Self::remove)) are collected
/// and written **at the end of the request**, as one field-level
/// [`update`](statehouse::Sessions::update) of just the fields this request changed: one round
/// trip however many fields change, and no lost updates, since a concurrent request changing
/// other fields is untouched. [`save`](Self::save) writes them at once, for a handler that must
/// know they were stored before it answers. If the write at the end fails, the response is
/// replaced by the error's (503 when the store is down; 401 when the session ended meanwhile,
/// by a logout elsewhere or an old token's rotation grace running out: the changes are dropped,
/// never bringing the session back), so a change never looks saved when it was not. Life-cycle operations ([`login`](Self::login), [`rotate`](Self::rotate),
/// [`logout`](Self::logout), …) go to the store immediately: they issue or revoke tokens.
///
/// **Cookies.** `Set-Cookie` is sent only when the token or its expiry changes: on login,
/// rotation, and, only with a persistent cookie (`Max-Age`), when the request moved the
/// session's expiry (a read that refreshed it, or a write) and the store confirms, at the end of
/// the request, that the token is still the session's current one (a concurrent request may
/// have rotated it: the client must not be handed the old token back). Logout sends a clearing
/// cookie.
///
/// With the `axum` feature, `Session` is an extractor. Without it, take it from the request:
/// `req.extensions().get::<Session>().cloned()`.
///
/// ```no_run
/// use statehouse_tower::{Error, Session};
///
/// async fn handler(session: Session) -> Result<String, Error> {
///     let Some(user) = session.user_id().await? else {
///         return Err(Error::NoSession); // 401
///     };
///     let visits: u64 = session.get("visits").await?.unwrap_or(0);
///     session.insert("visits", &(visits + 1)).await?;
///     Ok(format!("{user}: visit {}", visits + 1))
/// }
/// ```
pub struct Session<C = JsonCodec> {
    shared: Arc<Shared<C>>,
}

impl<C> Clone for Session<C> {
    fn clone(&self) -> Self {
        Session {
            shared: self.shared.clone(),
        }
    }
}

impl<C> fmt::Debug for Session<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the token.
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

struct Shared<C> {
    sessions: Sessions<C>,
    /// Whether the cookie is persistent: then a request that moves the session's expiry
    /// re-sends it.
    persistent_cookie: bool,
    user_agent: Option<String>,
    /// The client's IP address as the layer's [`ClientIp`](super::ClientIp) source found it.
    ip: Option<String>,
    /// An async mutex, held across the store call of the first load: concurrent first reads
    /// in one request wait for that one load instead of each calling the store.
    state: tokio::sync::Mutex<State>,
}

#[derive(Debug)]
pub(crate) struct State {
    /// The token the request came with, then the one this request issued.
    token: Option<SessionToken>,
    loaded: Loaded,
    pending: SessionChanges,
    cookie: CookieChange,
    /// The load wrote a refresh (the expiry moved) through the token the request came with.
    refreshed: bool,
}

#[derive(Debug)]
enum Loaded {
    NotYet,
    Absent,
    Live(Box<SessionRecord>),
    /// The store was down at the load under [`SessionStoreDown::Reject503`]: every later call
    /// fails the same way, without calling the store again.
    StoreDown,
}

/// What the response's `Set-Cookie` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CookieChange {
    Keep,
    Set(SessionToken),
    Clear,
}

/// What the service does once the inner service answered.
#[derive(Debug)]
pub(crate) struct Finish {
    pub(crate) cookie: CookieChange,
    /// Field-level changes to write, and the token to write them under.
    pub(crate) save: Option<(SessionToken, SessionChanges)>,
    /// With a persistent cookie and `cookie` [`Keep`](CookieChange::Keep): the request moved
    /// the expiry of the session under this token (its load refreshed it, or `save` will), so
    /// its cookie is re-sent, once the store confirms the token is still the session's current
    /// one (the write's answer, or a load).
    pub(crate) resend: Option<SessionToken>,
    /// The store was down under `Reject503`: answer 503 whatever the handler did.
    pub(crate) reject: bool,
}

fn store_down_error() -> Error {
    Error::Store(statehouse::Error::Unavailable {
        message: "the session store was unavailable earlier in this request".into(),
        source: None,
    })
}

impl<C: SessionCodec> Session<C> {
    pub(crate) fn new(
        sessions: Sessions<C>,
        token: Option<SessionToken>,
        persistent_cookie: bool,
        user_agent: Option<String>,
        ip: Option<String>,
    ) -> Self {
        Session {
            shared: Arc::new(Shared {
                sessions,
                persistent_cookie,
                user_agent,
                ip,
                state: tokio::sync::Mutex::new(State {
                    token,
                    loaded: Loaded::NotYet,
                    pending: SessionChanges::default(),
                    cookie: CookieChange::Keep,
                    refreshed: false,
                }),
            }),
        }
    }

    /// Loads the session if this request has not yet, and returns the locked state.
    async fn loaded(&self) -> Result<tokio::sync::MutexGuard<'_, State>, Error> {
        let mut state = self.shared.state.lock().await;
        if matches!(state.loaded, Loaded::NotYet) {
            state.loaded = match &state.token {
                None => Loaded::Absent,
                Some(token) => match self.shared.sessions.load(token).await {
                    Ok(Some(loaded)) => {
                        // Through an old token in its rotation grace, the expiry that moved is
                        // the newer token's: nothing to re-send.
                        state.refreshed = loaded.touched && !loaded.via_rotation_alias;
                        Loaded::Live(Box::new(loaded.record))
                    }
                    Ok(None) => Loaded::Absent,
                    Err(e) if e.is_unavailable() => {
                        match self.shared.sessions.store_down_policy() {
                            SessionStoreDown::Anonymous => Loaded::Absent,
                            _ => Loaded::StoreDown,
                        }
                    }
                    Err(e) => return Err(e.into()),
                },
            };
        }
        if matches!(state.loaded, Loaded::StoreDown) {
            return Err(store_down_error());
        }
        Ok(state)
    }

    fn live(state: &State) -> Result<&SessionRecord, Error> {
        match &state.loaded {
            Loaded::Live(record) => Ok(record),
            _ => Err(Error::NoSession),
        }
    }

    /// The user of the live session, `None` when there is none.
    ///
    /// # Errors
    ///
    /// The store failed (503 under [`SessionStoreDown::Reject503`]; under `Anonymous` an
    /// outage reads as no session).
    ///
    /// # Example
    ///
    /// ```no_run
    /// use statehouse_tower::{Error, Session};
    /// async fn whoami(session: Session) -> Result<String, Error> {
    ///     Ok(session.user_id().await?.unwrap_or_else(|| "anonymous".into()))
    /// }
    /// ```
    pub async fn user_id(&self) -> Result<Option<String>, Error> {
        let state = self.loaded().await?;
        Ok(Self::live(&state).ok().map(|r| r.user_id.clone()))
    }

    /// Whether the request has a live session.
    ///
    /// # Errors
    ///
    /// As [`user_id`](Self::user_id).
    pub async fn is_authenticated(&self) -> Result<bool, Error> {
        Ok(self.user_id().await?.is_some())
    }

    /// The roles of the live session (with this request's change, if any); empty when there is
    /// none.
    ///
    /// # Errors
    ///
    /// As [`user_id`](Self::user_id).
    ///
    /// # Example
    ///
    /// ```no_run
    /// use statehouse_tower::{Error, Session};
    /// async fn admin_only(session: Session) -> Result<&'static str, Error> {
    ///     if !session.roles().await?.iter().any(|r| r == "admin") {
    ///         return Err(Error::NoSession);
    ///     }
    ///     Ok("welcome, admin")
    /// }
    /// ```
    pub async fn roles(&self) -> Result<Vec<String>, Error> {
        let state = self.loaded().await?;
        if let Some(roles) = &state.pending.roles {
            return Ok(roles.clone());
        }
        Ok(Self::live(&state)
            .map(|r| r.roles.clone())
            .unwrap_or_default())
    }

    /// The id of the live session (safe to show and log; compare it with
    /// [`list_devices`](Self::list_devices) to mark "this device").
    ///
    /// # Errors
    ///
    /// As [`user_id`](Self::user_id).
    pub async fn id(&self) -> Result<Option<SessionId>, Error> {
        let state = self.loaded().await?;
        Ok(Self::live(&state).ok().map(|r| r.id.clone()))
    }

    /// The live session's record as loaded (without this request's pending changes).
    ///
    /// # Errors
    ///
    /// As [`user_id`](Self::user_id).
    pub async fn record(&self) -> Result<Option<SessionRecord>, Error> {
        let state = self.loaded().await?;
        Ok(Self::live(&state).ok().cloned())
    }

    /// The data field `field`, decoded; `None` when absent or when there is no session.
    ///
    /// # Errors
    ///
    /// As [`user_id`](Self::user_id), and the codec's error when the stored value is not a `T`.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use statehouse_tower::{Error, Session};
    /// #[derive(serde::Deserialize)]
    /// struct Cart { items: Vec<u64> }
    ///
    /// async fn cart_size(session: Session) -> Result<String, Error> {
    ///     let cart: Option<Cart> = session.get("cart").await?;
    ///     Ok(cart.map_or(0, |c| c.items.len()).to_string())
    /// }
    /// ```
    pub async fn get<T: DeserializeOwned>(&self, field: &str) -> Result<Option<T>, Error> {
        let state = self.loaded().await?;
        if state.pending.remove.contains(field) {
            return Ok(None);
        }
        let bytes = match state.pending.set.get(field) {
            Some(bytes) => Some(bytes),
            None => Self::live(&state).ok().and_then(|r| r.data.get(field)),
        };
        bytes
            .map(|b| self.shared.sessions.decode(b))
            .transpose()
            .map_err(Error::from)
    }

    /// Sets the data field `field`, written at the end of the request.
    ///
    /// # Errors
    ///
    /// [`Error::NoSession`] when there is no live session ([`login`](Self::login) first);
    /// the codec's error; as [`user_id`](Self::user_id).
    ///
    /// # Example
    ///
    /// ```no_run
    /// use statehouse_tower::{Error, Session};
    /// async fn set_theme(session: Session) -> Result<(), Error> {
    ///     session.insert("theme", "dark").await // written when the response goes out
    /// }
    /// ```
    pub async fn insert<T: Serialize + ?Sized>(&self, field: &str, value: &T) -> Result<(), Error> {
        let bytes = self.shared.sessions.encode(value)?;
        let mut state = self.loaded().await?;
        Self::live(&state)?;
        state.pending.remove.remove(field);
        state.pending.set.insert(field.to_owned(), bytes);
        Ok(())
    }

    /// Removes the data field `field`, at the end of the request.
    ///
    /// # Errors
    ///
    /// As [`insert`](Self::insert).
    ///
    /// # Example
    ///
    /// ```no_run
    /// use statehouse_tower::{Error, Session};
    /// async fn clear_cart(session: Session) -> Result<(), Error> {
    ///     session.remove("cart").await
    /// }
    /// ```
    pub async fn remove(&self, field: &str) -> Result<(), Error> {
        let mut state = self.loaded().await?;
        Self::live(&state)?;
        state.pending.set.remove(field);
        state.pending.remove.insert(field.to_owned());
        Ok(())
    }

    /// Writes this request's pending changes now instead of at the end of the request.
    ///
    /// # Errors
    ///
    /// [`Error::NoSession`] when the session is gone (revoked or expired meanwhile; the changes
    /// are dropped, never resurrecting it); the store's error.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use statehouse_tower::{Error, Session};
    /// async fn checkout(session: Session) -> Result<(), Error> {
    ///     session.insert("order", &42_u64).await?;
    ///     session.save().await?; // stored before we go on
    ///     Ok(())
    /// }
    /// ```
    pub async fn save(&self) -> Result<(), Error> {
        let mut state = self.loaded().await?;
        if state.pending.is_empty() {
            return Ok(());
        }
        let token = state.token.clone().ok_or(Error::NoSession)?;
        let changes = std::mem::take(&mut state.pending);
        let updated = self.shared.sessions.update(&token, &changes).await?;
        if updated.written() {
            // The expiry moved: with a persistent cookie, the end of the request re-sends it
            // (after checking the token is still current).
            state.refreshed |= updated == Updated::Written;
            if let Loaded::Live(record) = &mut state.loaded {
                apply(record, changes);
            }
            Ok(())
        } else {
            state.loaded = Loaded::Absent;
            Err(Error::NoSession)
        }
    }

    /// Logs `user_id` in with `roles`, always under a **new token** (OWASP: renew the session
    /// id on login, against session fixation):
    ///
    /// * a live session of the same user is **rotated**: its data is kept, the old token keeps
    ///   working for the rotation grace (parallel requests in flight do not fail), and the
    ///   roles are set;
    /// * a live session of another user is revoked, and a new one created;
    /// * otherwise a session is created, with the request's `User-Agent`.
    ///
    /// # Errors
    ///
    /// Invalid input (an empty user id); the store's error.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use statehouse_tower::{Error, Session};
    /// async fn login(session: Session) -> Result<(), Error> {
    ///     // ... after checking the credentials:
    ///     session.login("alice", &["user"]).await
    /// }
    /// ```
    pub async fn login(&self, user_id: &str, roles: &[&str]) -> Result<(), Error> {
        let roles: Vec<String> = roles.iter().map(|r| (*r).to_owned()).collect();
        let mut state = self.loaded().await?;
        let sessions = &self.shared.sessions;
        if let (Some(token), Loaded::Live(record)) = (&state.token, &state.loaded) {
            if record.user_id == user_id {
                if let Some((new_token, new_record)) = sessions.rotate(token).await? {
                    if new_record.roles != roles {
                        state.pending.roles = Some(roles);
                    }
                    state.token = Some(new_token.clone());
                    state.loaded = Loaded::Live(Box::new(new_record));
                    state.cookie = CookieChange::Set(new_token);
                    return Ok(());
                }
            } else {
                sessions.revoke(token).await?;
            }
        }
        let new = NewSession {
            user_id: user_id.to_owned(),
            roles,
            user_agent: self.shared.user_agent.clone(),
            ip: self.shared.ip.clone(),
            ..NewSession::default()
        };
        let (token, record) = sessions.create(&new).await?;
        state.pending = SessionChanges::default();
        state.token = Some(token.clone());
        state.loaded = Loaded::Live(Box::new(record));
        state.cookie = CookieChange::Set(token);
        Ok(())
    }

    /// Moves the session to a new token (call it on any privilege change: password change,
    /// role change, step-up authentication). The old token keeps working for the rotation
    /// grace.
    ///
    /// # Errors
    ///
    /// [`Error::NoSession`]; the store's error.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use statehouse_tower::{Error, Session};
    /// async fn change_password(session: Session) -> Result<(), Error> {
    ///     // ... after storing the new password:
    ///     session.rotate().await
    /// }
    /// ```
    pub async fn rotate(&self) -> Result<(), Error> {
        let mut state = self.loaded().await?;
        Self::live(&state)?;
        let token = state.token.clone().ok_or(Error::NoSession)?;
        match self.shared.sessions.rotate(&token).await? {
            Some((new_token, record)) => {
                state.token = Some(new_token.clone());
                state.loaded = Loaded::Live(Box::new(record));
                state.cookie = CookieChange::Set(new_token);
                Ok(())
            }
            None => {
                state.loaded = Loaded::Absent;
                Err(Error::NoSession)
            }
        }
    }

    /// Sets the roles and [rotates](Self::rotate) the token (a privilege change).
    ///
    /// # Errors
    ///
    /// As [`rotate`](Self::rotate).
    ///
    /// # Example
    ///
    /// ```no_run
    /// use statehouse_tower::{Error, Session};
    /// async fn step_up(session: Session) -> Result<(), Error> {
    ///     // ... after checking a second factor:
    ///     session.set_roles(&["user", "admin"]).await
    /// }
    /// ```
    pub async fn set_roles(&self, roles: &[&str]) -> Result<(), Error> {
        self.rotate().await?;
        let mut state = self.shared.state.lock().await;
        state.pending.roles = Some(roles.iter().map(|r| (*r).to_owned()).collect());
        Ok(())
    }

    /// Logs out: revokes this session and clears the cookie. Does not load the session first.
    /// Returns whether a live session was revoked.
    ///
    /// # Errors
    ///
    /// The store's error. The cookie is cleared even then: the browser forgets the token, and
    /// the server-side session ends at its idle timeout.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use statehouse_tower::{Error, Session};
    /// async fn logout(session: Session) -> Result<(), Error> {
    ///     session.logout().await?;
    ///     Ok(())
    /// }
    /// ```
    pub async fn logout(&self) -> Result<bool, Error> {
        let mut state = self.shared.state.lock().await;
        let Some(token) = state.token.take() else {
            return Ok(false);
        };
        // The browser forgets the token even when the store cannot revoke it now (OWASP:
        // invalidate on both sides); the server side then ends at the idle timeout.
        state.loaded = Loaded::Absent;
        state.pending = SessionChanges::default();
        state.cookie = CookieChange::Clear;
        Ok(self.shared.sessions.revoke(&token).await?)
    }

    /// Logs the user out everywhere: revokes every session of the user, this one included, and
    /// clears the cookie. Returns how many were revoked.
    ///
    /// # Errors
    ///
    /// [`Error::NoSession`]; the store's error.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use statehouse_tower::{Error, Session};
    /// async fn password_reset_done(session: Session) -> Result<String, Error> {
    ///     let n = session.logout_everywhere().await?;
    ///     Ok(format!("{n} sessions ended"))
    /// }
    /// ```
    pub async fn logout_everywhere(&self) -> Result<u64, Error> {
        let mut state = self.loaded().await?;
        let user = Self::live(&state)?.user_id.clone();
        let n = self
            .shared
            .sessions
            .revoke_all_for_user(&user, None)
            .await?;
        state.token = None;
        state.loaded = Loaded::Absent;
        state.pending = SessionChanges::default();
        state.cookie = CookieChange::Clear;
        Ok(n)
    }

    /// Revokes every other session of the user, keeping this one. Returns how many were
    /// revoked.
    ///
    /// # Errors
    ///
    /// [`Error::NoSession`]; the store's error.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use statehouse_tower::{Error, Session};
    /// async fn sign_out_others(session: Session) -> Result<String, Error> {
    ///     Ok(session.logout_other_devices().await?.to_string())
    /// }
    /// ```
    pub async fn logout_other_devices(&self) -> Result<u64, Error> {
        let state = self.loaded().await?;
        let record = Self::live(&state)?;
        Ok(self
            .shared
            .sessions
            .revoke_all_for_user(&record.user_id, Some(&record.id))
            .await?)
    }

    /// The user's live sessions, oldest first ("your devices").
    ///
    /// # Errors
    ///
    /// [`Error::NoSession`]; the store's error.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use statehouse_tower::{Error, Session};
    /// async fn devices(session: Session) -> Result<String, Error> {
    ///     let current = session.id().await?;
    ///     let mut page = String::new();
    ///     for d in session.list_devices().await? {
    ///         let this = if Some(&d.id) == current.as_ref() { " (this device)" } else { "" };
    ///         page += &format!("{:?} since {}{this}\n", d.user_agent, d.created_at);
    ///     }
    ///     Ok(page)
    /// }
    /// ```
    pub async fn list_devices(&self) -> Result<Vec<SessionInfo>, Error> {
        let state = self.loaded().await?;
        let user = &Self::live(&state)?.user_id;
        Ok(self.shared.sessions.list_for_user(user).await?)
    }

    /// Revokes one of the user's sessions by id ("sign out that device").
    ///
    /// # Errors
    ///
    /// [`Error::NoSession`]; the store's error.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use statehouse_tower::{Error, Session};
    /// use statehouse::SessionId;
    ///
    /// async fn sign_out_device(session: Session, id: String) -> Result<(), Error> {
    ///     let id = SessionId::parse(&id)?;
    ///     session.revoke_device(&id).await?;
    ///     Ok(())
    /// }
    /// ```
    pub async fn revoke_device(&self, id: &SessionId) -> Result<bool, Error> {
        let state = self.loaded().await?;
        let user = &Self::live(&state)?.user_id;
        Ok(self.shared.sessions.revoke_by_id(user, id).await?)
    }

    /// What the service has to do at the end of the request, without waiting: `None` when a
    /// clone of the handle is busy (a task the handler spawned), then see [`finish`](Self::finish).
    pub(crate) fn try_finish(&self) -> Option<Finish> {
        let mut state = self.shared.state.try_lock().ok()?;
        Some(take_finish(&mut state, self.shared.persistent_cookie))
    }

    /// [`try_finish`](Self::try_finish), waiting for the handle.
    pub(crate) async fn finish(&self) -> Finish {
        take_finish(
            &mut *self.shared.state.lock().await,
            self.shared.persistent_cookie,
        )
    }

    /// Writes the changes collected by [`finish`](Self::finish).
    pub(crate) async fn write(
        &self,
        token: &SessionToken,
        changes: &SessionChanges,
    ) -> Result<Updated, Error> {
        let updated = self.shared.sessions.update(token, changes).await?;
        if updated == Updated::Gone {
            // Revoked or expired meanwhile (a logout in another tab): the changes are dropped,
            // never resurrecting the session.
            tracing::debug!("statehouse: session gone before this request's changes were written");
        }
        Ok(updated)
    }

    /// Whether `token` is still the current token of a live session (not gone, not an old
    /// token in its rotation grace): asked before a refreshing read's cookie is re-sent. A
    /// store error answers no: the cookie the client holds stays as it is.
    pub(crate) async fn still_current(&self, token: &SessionToken) -> bool {
        match self.shared.sessions.load(token).await {
            Ok(Some(loaded)) => !loaded.via_rotation_alias,
            Ok(None) => false,
            Err(e) => {
                tracing::debug!(error = %e, "statehouse: session cookie not re-sent: store error");
                false
            }
        }
    }
}

fn take_finish(state: &mut State, persistent_cookie: bool) -> Finish {
    let reject = matches!(state.loaded, Loaded::StoreDown);
    let changes = std::mem::take(&mut state.pending);
    let save = match (&state.token, &state.loaded) {
        (Some(token), Loaded::Live(_)) if !changes.is_empty() => Some((token.clone(), changes)),
        _ => None,
    };
    let cookie = std::mem::replace(&mut state.cookie, CookieChange::Keep);
    let refreshed = std::mem::take(&mut state.refreshed);
    let resend = match (&state.token, &state.loaded) {
        (Some(token), Loaded::Live(_))
            if persistent_cookie
                && cookie == CookieChange::Keep
                && (refreshed || save.is_some()) =>
        {
            Some(token.clone())
        }
        _ => None,
    };
    Finish {
        cookie,
        save,
        resend,
        reject,
    }
}

fn apply(record: &mut SessionRecord, changes: SessionChanges) {
    for field in changes.remove {
        record.data.remove(&field);
    }
    record.data.extend(changes.set);
    if let Some(roles) = changes.roles {
        record.roles = roles;
    }
}
