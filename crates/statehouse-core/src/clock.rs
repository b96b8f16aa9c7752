//! The one clock of a process: a [`Clock`] trait, the [`SystemClock`] and a [`ManualClock`] for tests.
//!
//! Every stored time in Statehouse is absolute (microseconds since the Unix epoch), never relative
//! to a process start, so every replica reads a stored time the same way. Nothing else in the
//! workspace calls `SystemTime::now()`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time: whole microseconds since the Unix epoch.
///
/// Microseconds keep rates up to one million per second exact, and fit in the 53 bits of integer
/// precision that Redis's Lua numbers (doubles) hold until the year 2255.
///
/// ```
/// use statehouse_core::Timestamp;
/// let t = Timestamp::from_micros(1_500_000);
/// assert_eq!(t.as_micros(), 1_500_000);
/// assert_eq!(t.as_millis(), 1_500);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// A timestamp `micros` microseconds after the Unix epoch.
    pub const fn from_micros(micros: u64) -> Self {
        Timestamp(micros)
    }

    /// Microseconds since the Unix epoch.
    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// Whole milliseconds since the Unix epoch (rounded down).
    pub const fn as_millis(self) -> u64 {
        self.0 / 1_000
    }

    /// This timestamp moved forward by `d` (saturating).
    pub fn saturating_add(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(duration_to_micros(d)))
    }

    /// The time from `earlier` to `self`, or zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:06}s", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

/// Whole microseconds in `d`, saturating at `u64::MAX`.
pub(crate) fn duration_to_micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A source of the current time.
///
/// Inject one everywhere time matters; use [`SystemClock`] in production and [`ManualClock`] in
/// tests, so time logic is tested without real sleeps.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The operating system's wall clock.
///
/// ```
/// use statehouse_core::{Clock, SystemClock};
/// assert!(SystemClock.now().as_micros() > 1_600_000_000_000_000);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        // A clock set before 1970 reads as the epoch rather than panicking.
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Timestamp(duration_to_micros(since))
    }
}

/// A clock that moves only when told to. Clones share the same time.
///
/// ```
/// use std::time::Duration;
/// use statehouse_core::{Clock, ManualClock, Timestamp};
/// let clock = ManualClock::new(Timestamp::from_micros(10));
/// let other = clock.clone();
/// clock.advance(Duration::from_millis(1));
/// assert_eq!(other.now().as_micros(), 1_010);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    micros: Arc<AtomicU64>,
}

impl ManualClock {
    /// A manual clock reading `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            micros: Arc::new(AtomicU64::new(start.as_micros())),
        }
    }

    /// A manual clock starting at the current system time, convenient where a test also
    /// touches real Redis key expiry.
    pub fn starting_now() -> Self {
        Self::new(SystemClock.now())
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.micros
            .fetch_add(duration_to_micros(d), Ordering::SeqCst);
    }

    /// Sets the clock to `t` (which may move it backwards, to test clock steps).
    pub fn set(&self, t: Timestamp) {
        self.micros.store(t.as_micros(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.micros.load(Ordering::SeqCst))
    }
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
}
