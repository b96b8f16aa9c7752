//! Request coalescing in one process: concurrent misses for one key make one upstream call.
//!
//! The first request for a key leads: it registers a flight and makes the upstream call. The
//! others wait on the flight and get its outcome: the response (when it may be stored, whether
//! or not the store accepted it) or "not shareable", and they then go upstream on their own.
//! A leader that is dropped mid-way (its client went away) ends the flight as abandoned; its
//! waiters look the key up again and one of them leads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::HeaderName;
use tokio::sync::watch;

use super::stored::StoredResponse;

/// What a flight ended with.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// A storable response; `vary` says which request it may answer: the `Vary` names and the
    /// leader's digest of its values (`None`: any request for the key).
    Shared {
        response: Arc<StoredResponse>,
        vary: Option<(Vec<HeaderName>, [u8; 32])>,
    },
    /// The response could not be reused; each waiter goes upstream itself.
    NotShareable,
}

type Slot = watch::Receiver<Option<Arc<Outcome>>>;

/// The flights in progress, by store key.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    // A std mutex: held only to look up or change the map, never across an `.await`.
    map: Mutex<HashMap<String, Slot>>,
}

/// How a request takes part in the flight for its key.
pub(crate) enum Join {
    /// No flight was in progress: this request leads one.
    Leader(FlightGuard),
    /// Another request is leading: wait for it.
    Waiter(Slot),
    /// Another request is leading and this one may not wait for it (its directives refuse a
    /// response it did not ask for).
    Busy,
}

impl Flights {
    /// Joins or starts the flight for `key`. `may_wait` false never waits.
    pub(crate) fn join(self: &Arc<Self>, key: &str, may_wait: bool) -> Join {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = map.get(key) {
            return if may_wait {
                Join::Waiter(slot.clone())
            } else {
                Join::Busy
            };
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key.to_owned(), rx);
        Join::Leader(FlightGuard {
            flights: self.clone(),
            key: key.to_owned(),
            tx: Some(tx),
        })
    }

    fn remove(&self, key: &str) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

/// A leader's hold on its flight. Ends it on [`FlightGuard::finish`], or as abandoned when
/// dropped first.
pub(crate) struct FlightGuard {
    flights: Arc<Flights>,
    key: String,
    tx: Option<watch::Sender<Option<Arc<Outcome>>>>,
}

impl FlightGuard {
    /// Ends the flight with `outcome`; every waiter wakes up with it.
    pub(crate) fn finish(mut self, outcome: Outcome) {
        self.flights.remove(&self.key);
        if let Some(tx) = self.tx.take() {
            // No receiver left is fine: nobody waited.
            let _ = tx.send(Some(Arc::new(outcome)));
        }
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if self.tx.is_some() {
            // Abandoned: the sender drops with us, and waiters see the channel closed.
            self.flights.remove(&self.key);
        }
    }
}

/// Waits for the flight's end: `None` when it was abandoned.
pub(crate) async fn wait(mut slot: Slot) -> Option<Arc<Outcome>> {
    match slot.wait_for(Option::is_some).await {
        Ok(value) => value.clone(),
        Err(_) => None,
    }
}
