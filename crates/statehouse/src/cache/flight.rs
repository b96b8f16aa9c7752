//! Single flight in one process: one load per key at a time; the others wait for its result.
//!
//! A flight is a `watch` channel registered under its key. The leader publishes the outcome;
//! a leader whose future is dropped (cancelled) drops its sender, the waiters see the channel
//! closed and start over, and one of them leads the next flight.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::Fetched;

/// What a flight hands to its waiters: the result, or the loader's error (type-erased, because
/// one cache serves loaders with different error types; waiters downcast it back).
pub(crate) type Shared<V> = Result<Fetched<V>, Arc<dyn Any + Send + Sync>>;

type Slot<V> = watch::Receiver<Option<Shared<V>>>;

/// A running flight: its channel, and whether it is a background refresh (whose waiters may
/// serve the stale value instead of waiting).
struct Running<V> {
    rx: Slot<V>,
    refresh: bool,
}

/// The flights of one cache. A `std` mutex: held only to look up or change the map.
pub(crate) struct Flights<V> {
    map: Mutex<HashMap<String, Running<V>>>,
}

impl<V> std::fmt::Debug for Flights<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flights").finish_non_exhaustive()
    }
}

/// The caller's part in a flight.
pub(crate) enum Join<V: Send + Sync + 'static> {
    /// Load, then [`FlightLeader::finish`].
    Lead(FlightLeader<V>),
    /// Wait with [`wait`]; `refresh`: the flight is a background refresh.
    Wait {
        /// The flight's channel.
        rx: Slot<V>,
        /// Whether the flight is a background refresh.
        refresh: bool,
    },
}

impl<V: Send + Sync + 'static> Flights<V> {
    pub(crate) fn new() -> Self {
        Flights {
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running<V>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Leads a new flight for `key` (a background refresh when `refresh`), or joins the
    /// running one.
    pub(crate) fn join(self: &Arc<Self>, key: &str, refresh: bool) -> Join<V> {
        let mut map = self.lock();
        if let Some(running) = map.get(key) {
            return Join::Wait {
                rx: running.rx.clone(),
                refresh: running.refresh,
            };
        }
        let (tx, rx) = watch::channel(None);
        map.insert(
            key.to_owned(),
            Running {
                rx: rx.clone(),
                refresh,
            },
        );
        Join::Lead(FlightLeader {
            flights: self.clone(),
            key: key.to_owned(),
            tx: Some(tx),
            rx,
        })
    }

    /// Detaches the running flight of `key`, if any, after a write or an invalidation of it:
    /// callers already waiting keep it (they asked before the change), but later callers start
    /// a flight of their own instead of being handed what was loaded before the change.
    pub(crate) fn detach(&self, key: &str) {
        self.lock().remove(key);
    }

    /// [`detach`](Self::detach) for the running flights whose key starts with `prefix` (every
    /// flight for an empty prefix: a tag, namespace or channel change may concern any key).
    pub(crate) fn detach_prefix(&self, prefix: &str) {
        let mut map = self.lock();
        if prefix.is_empty() {
            map.clear();
        } else {
            map.retain(|key, _| !key.starts_with(prefix));
        }
    }

    fn remove(&self, key: &str, rx: &Slot<V>) {
        let mut map = self.lock();
        if map.get(key).is_some_and(|r| r.rx.same_channel(rx)) {
            map.remove(key);
        }
    }
}

/// The leader of one flight; dropping it unfinished lets a waiter take over.
pub(crate) struct FlightLeader<V: Send + Sync + 'static> {
    flights: Arc<Flights<V>>,
    key: String,
    tx: Option<watch::Sender<Option<Shared<V>>>>,
    rx: Slot<V>,
}

impl<V: Send + Sync + 'static> FlightLeader<V> {
    /// Ends the flight and hands `outcome` to its waiters.
    pub(crate) fn finish(mut self, outcome: Shared<V>) {
        self.flights.remove(&self.key, &self.rx);
        if let Some(tx) = self.tx.take() {
            tx.send_replace(Some(outcome));
        }
    }
}

impl<V: Send + Sync + 'static> Drop for FlightLeader<V> {
    fn drop(&mut self) {
        if self.tx.is_some() {
            // Cancelled: unregister; dropping the sender wakes the waiters to start over.
            self.flights.remove(&self.key, &self.rx);
        }
    }
}

/// Waits for a flight's outcome; `None` when its leader was dropped without one.
pub(crate) async fn wait<V: Send + Sync + 'static>(mut rx: Slot<V>) -> Option<Shared<V>> {
    match rx.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone(),
        Err(_closed) => None,
    }
}
