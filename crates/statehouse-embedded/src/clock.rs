//! The embedded store's default clock: absolute time that advances with a cheap monotonic
//! counter.

use std::time::Duration;

use statehouse_core::{Clock, SystemClock, Timestamp};

/// Absolute time (microseconds since the Unix epoch) read from the CPU's time-stamp counter
/// through [`quanta`], anchored to the system clock once, when the clock is made.
///
/// Why not [`SystemClock`]: reading the wall clock (`clock_gettime`) was the largest single
/// cost of an embedded decision in the benchmark (about a quarter of it), and the embedded store
/// only needs time that is consistent within its own process. Monotonic time is also the better
/// basis for rates: a wall-clock step (NTP, an operator) neither refills nor freezes limits.
/// Times stay absolute, so a stored state reads the same way whatever clock wrote it; the cost
/// is that this clock drifts from the wall clock by the monotonic clock's drift (parts per
/// million) over the life of the process.
#[derive(Debug, Clone)]
pub struct MonotonicClock {
    counter: quanta::Clock,
    anchor: quanta::Instant,
    anchor_epoch_us: u64,
}

impl MonotonicClock {
    /// A clock reading the system time now, and advancing monotonically from there.
    pub fn new() -> Self {
        let counter = quanta::Clock::new();
        let anchor = counter.now();
        MonotonicClock {
            counter,
            anchor,
            anchor_epoch_us: SystemClock.now().as_micros(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Timestamp {
        let elapsed: Duration = self.counter.now().duration_since(self.anchor);
        let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        Timestamp::from_micros(self.anchor_epoch_us.saturating_add(elapsed_us))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_the_system_time_and_never_goes_back() {
        let clock = MonotonicClock::new();
        let system = SystemClock.now().as_micros();
        let first = clock.now().as_micros();
        // Anchored to the system clock when made (allow for a slow, loaded test machine).
        assert!(first.abs_diff(system) < 5_000_000, "{first} vs {system}");
        let mut last = first;
        for _ in 0..10_000 {
            let t = clock.now().as_micros();
            assert!(t >= last);
            last = t;
        }
    }
}
