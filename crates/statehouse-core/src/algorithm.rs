//! The six rate-limiting algorithms as pure functions of (stored state, now, policy, cost).
//!
//! [`decide`] is the whole contract: it takes the state a store holds for one key (or `None`),
//! the current time, the policy and the cost, and returns the decision and the state to store.
//! The embedded store applies it under a shard lock; the Redis store runs the very same steps in
//! one Lua script (`statehouse-redis/src/limiter.lua`), and a differential property test checks
//! that both decide identically.
//!
//! All arithmetic is on integer microseconds. The one exception is the sliding window counter's
//! weight, computed in IEEE-754 doubles with the same operations in the same order as the Lua
//! script, so both round identically.
//!
//! A state is kept only while it matters: [`Step::expires_at`] is the moment from which the
//! stored state decides exactly like no state at all, so a store can drop it then.

use std::collections::VecDeque;

use crate::Timestamp;
use crate::decision::Decision;
use crate::policy::{Algorithm, Policy};
use crate::store::Mode;

/// The state one key holds for one policy.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum State {
    /// Fixed window: the aligned window's index (`now / period`) and the cost counted in it.
    FixedWindow {
        /// `now / period` of the window the count belongs to.
        window: u64,
        /// Cost admitted in that window.
        count: u64,
    },
    /// Sliding window log: one timestamp (µs) per admitted unit of cost, oldest first.
    SlidingWindowLog {
        /// Admission times, ascending.
        entries: VecDeque<u64>,
    },
    /// Sliding window counter: the current aligned window's index and count, and the previous
    /// window's count.
    SlidingWindowCounter {
        /// `now / period` of the current window.
        window: u64,
        /// Cost admitted in the current window.
        current: u64,
        /// Cost admitted in the window before it.
        previous: u64,
    },
    /// Token bucket: whole tokens left and when the last whole token was credited (µs).
    TokenBucket {
        /// Tokens in the bucket.
        tokens: u64,
        /// Time (µs) up to which refills have been credited.
        last: u64,
    },
    /// GCRA and leaky bucket: the theoretical arrival time (µs) of the next request.
    Tat(u64),
}

/// The outcome of [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The decision.
    pub decision: Decision,
    /// The state to keep for the key. When `changed` is false this is the input state (possibly
    /// with expired sliding-log entries pruned, which decides identically).
    pub state: Option<State>,
    /// Whether the state must be written back (an admitted, consuming request).
    pub changed: bool,
    /// When a written state stops mattering, as an absolute time (µs): the store may expire it
    /// then. Meaningful when `changed` is true.
    pub expires_at: Timestamp,
}

/// Decides one request of `cost` against `state` at `now`.
///
/// In [`Mode::Peek`] nothing is consumed: the decision says what a consuming call would answer,
/// and `changed` is false. A denied request consumes nothing either. `cost` must have passed
/// [`Policy::check_cost`]; a cost above capacity is simply denied here.
///
/// ```
/// use std::time::Duration;
/// use statehouse_core::{algorithm::decide, Mode, Policy, Timestamp};
///
/// let policy = Policy::gcra(10, Duration::from_secs(1))?.with_burst(2)?;
/// let t = Timestamp::from_micros(1_000_000);
/// let a = decide(&policy, None, t, 1, Mode::Consume);
/// let b = decide(&policy, a.state, t, 1, Mode::Consume);
/// let c = decide(&policy, b.state.clone(), t, 1, Mode::Consume);
/// assert!(a.decision.allowed && b.decision.allowed);
/// assert!(!c.decision.allowed);
/// assert_eq!(c.decision.retry_after, Some(Duration::from_millis(100)));
/// # Ok::<(), statehouse_core::Error>(())
/// ```
pub fn decide(
    policy: &Policy,
    state: Option<State>,
    now: Timestamp,
    cost: u64,
    mode: Mode,
) -> Step {
    let now = now.as_micros();
    let consume = mode == Mode::Consume;
    match policy.algorithm() {
        Algorithm::FixedWindow => fixed_window(policy, state, now, cost, consume),
        Algorithm::SlidingWindowLog => sliding_log(policy, state, now, cost, consume),
        Algorithm::SlidingWindowCounter => sliding_counter(policy, state, now, cost, consume),
        Algorithm::TokenBucket => token_bucket(policy, state, now, cost, consume),
        Algorithm::LeakyBucket => leaky_bucket(policy, state, now, cost, consume),
        Algorithm::Gcra => gcra(policy, state, now, cost, consume),
    }
}

fn step(decision: Decision, state: Option<State>, changed: bool, expires_at: u64) -> Step {
    Step {
        decision,
        state,
        changed,
        expires_at: Timestamp::from_micros(expires_at),
    }
}

fn allow(limit: u64, remaining: u64, reset_after: u64, delay: u64) -> Decision {
    Decision::from_parts(true, limit, remaining, reset_after, None, delay)
}

fn deny(limit: u64, remaining: u64, reset_after: u64, retry_after: u64) -> Decision {
    Decision::from_parts(false, limit, remaining, reset_after, Some(retry_after), 0)
}

fn fixed_window(p: &Policy, state: Option<State>, now: u64, cost: u64, consume: bool) -> Step {
    let period = p.period_micros();
    let limit = p.limit();
    let mut window = now / period;
    let mut count = 0;
    if let Some(State::FixedWindow {
        window: w,
        count: c,
    }) = state
    {
        // A window from the future (the clock stepped back) still counts: never more permissive.
        if w >= window {
            window = w;
            count = c;
        }
    }
    let window_end = (window + 1) * period;
    let reset_after = window_end.saturating_sub(now);
    if count + cost <= limit {
        let count = count + cost;
        let decision = allow(limit, limit - count, reset_after, 0);
        if consume {
            return step(
                decision,
                Some(State::FixedWindow { window, count }),
                true,
                window_end,
            );
        }
        return step(decision, state, false, window_end);
    }
    let decision = deny(limit, limit.saturating_sub(count), reset_after, reset_after);
    step(decision, state, false, window_end)
}

fn sliding_log(p: &Policy, state: Option<State>, now: u64, cost: u64, consume: bool) -> Step {
    let period = p.period_micros();
    let limit = p.limit();
    let mut entries = match state {
        Some(State::SlidingWindowLog { entries }) => entries,
        _ => VecDeque::new(),
    };
    // An entry counts while `ts + period > now`.
    while entries.front().is_some_and(|&ts| ts + period <= now) {
        entries.pop_front();
    }
    let used = entries.len() as u64;
    if used + cost <= limit {
        let remaining = limit - used - cost;
        if consume {
            // Keep the log sorted even if the clock stepped back.
            let at = entries.partition_point(|&ts| ts <= now);
            for _ in 0..cost {
                entries.insert(at, now);
            }
            let newest = entries.back().copied().unwrap_or(now);
            let expires_at = newest + period;
            let decision = allow(limit, remaining, expires_at - now, 0);
            return step(
                decision,
                Some(State::SlidingWindowLog { entries }),
                true,
                expires_at,
            );
        }
        let newest = entries.back().copied().unwrap_or(now).max(now);
        let decision = allow(limit, remaining, newest + period - now, 0);
        return step(
            decision,
            Some(State::SlidingWindowLog { entries }),
            false,
            newest + period,
        );
    }
    // Wait until enough of the oldest entries have left the window.
    let must_leave = (used + cost - limit) as usize;
    let oldest_needed = entries[must_leave - 1];
    let retry_after = (oldest_needed + period).saturating_sub(now);
    let newest = entries.back().copied().unwrap_or(now);
    let reset_after = (newest + period).saturating_sub(now);
    let decision = deny(limit, limit.saturating_sub(used), reset_after, retry_after);
    step(
        decision,
        Some(State::SlidingWindowLog { entries }),
        false,
        newest + period,
    )
}

/// The previous window's weighted count: `floor(previous × (period − elapsed) / period)`,
/// in doubles, exactly as the Lua script computes it.
fn weighted_previous(previous: u64, period: u64, elapsed: u64) -> u64 {
    ((previous as f64) * ((period - elapsed) as f64) / (period as f64)).floor() as u64
}

/// The least `e` in `lo..=period` with `weighted_previous(previous, period, e) <= room`
/// (`e = period` always qualifies). Binary search, mirrored step by step in Lua.
fn least_elapsed_within(previous: u64, period: u64, room: u64, lo: u64) -> u64 {
    let (mut lo, mut hi) = (lo, period);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if weighted_previous(previous, period, mid) <= room {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

fn sliding_counter(p: &Policy, state: Option<State>, now: u64, cost: u64, consume: bool) -> Step {
    let period = p.period_micros();
    let limit = p.limit();
    let mut window = now / period;
    let (mut current, mut previous) = (0, 0);
    if let Some(State::SlidingWindowCounter {
        window: w,
        current: c,
        previous: pv,
    }) = state
    {
        if w >= window {
            // Same window, or one from the future (clock stepped back): counts in full.
            window = w;
            current = c;
            previous = pv;
        } else if w + 1 == window {
            previous = c;
        }
    }
    let window_start = window * period;
    let elapsed = now.saturating_sub(window_start).min(period - 1);
    let estimate = weighted_previous(previous, period, elapsed) + current;
    if estimate + cost <= limit {
        let remaining = limit - estimate - cost;
        let current_after = if consume { current + cost } else { current };
        let reset_at = if current_after > 0 {
            window_start + 2 * period
        } else {
            window_start + period
        };
        let decision = allow(limit, remaining, reset_at.saturating_sub(now), 0);
        if consume {
            return step(
                decision,
                Some(State::SlidingWindowCounter {
                    window,
                    current: current_after,
                    previous,
                }),
                true,
                window_start + 2 * period,
            );
        }
        return step(decision, state, false, reset_at);
    }
    let retry_at = if current + cost <= limit {
        // Within this window, once the previous window's weight has decayed enough.
        let room = limit - cost - current;
        window_start + least_elapsed_within(previous, period, room, elapsed + 1)
    } else {
        // In the next window, where this window's count becomes the weighted previous one.
        let room = limit - cost;
        window_start + period + least_elapsed_within(current, period, room, 0)
    };
    let reset_at = if current > 0 {
        window_start + 2 * period
    } else {
        window_start + period
    };
    let decision = deny(
        limit,
        limit.saturating_sub(estimate),
        reset_at.saturating_sub(now),
        retry_at.saturating_sub(now),
    );
    step(decision, state, false, reset_at)
}

fn token_bucket(p: &Policy, state: Option<State>, now: u64, cost: u64, consume: bool) -> Step {
    let capacity = p.burst();
    let interval = p.interval_micros();
    let (mut tokens, mut last) = match state {
        Some(State::TokenBucket { tokens, last }) => (tokens, last),
        _ => (capacity, now),
    };
    if now > last {
        let credited = (now - last) / interval;
        if credited > 0 {
            tokens = (tokens + credited).min(capacity);
            last = if tokens == capacity {
                now
            } else {
                last + credited * interval
            };
        }
    }
    // Time from `now` until the bucket holds `want` tokens, given `have` credited up to `last`.
    let time_to = |have: u64, want: u64| -> u64 {
        if have >= want {
            0
        } else {
            (last + (want - have) * interval).saturating_sub(now)
        }
    };
    if tokens >= cost {
        let left = tokens - cost;
        let reset_after = time_to(left, capacity);
        let decision = allow(capacity, left, reset_after, 0);
        if consume {
            return step(
                decision,
                Some(State::TokenBucket { tokens: left, last }),
                true,
                now + reset_after,
            );
        }
        return step(decision, state, false, now + reset_after);
    }
    let reset_after = time_to(tokens, capacity);
    let decision = deny(capacity, tokens, reset_after, time_to(tokens, cost));
    step(decision, state, false, now + reset_after)
}

fn gcra(p: &Policy, state: Option<State>, now: u64, cost: u64, consume: bool) -> Step {
    let interval = p.interval_micros();
    let tolerance = p.burst() * interval;
    let tat = match state {
        Some(State::Tat(t)) => t.max(now),
        _ => now,
    };
    let new_tat = tat + cost * interval;
    if new_tat - now <= tolerance {
        let remaining = (tolerance - (new_tat - now)) / interval;
        let decision = allow(p.burst(), remaining, new_tat - now, 0);
        if consume {
            return step(decision, Some(State::Tat(new_tat)), true, new_tat);
        }
        return step(decision, state, false, tat);
    }
    let remaining = tolerance.saturating_sub(tat - now) / interval;
    let retry_after = new_tat - now - tolerance;
    let decision = deny(p.burst(), remaining, tat - now, retry_after);
    step(decision, state, false, tat)
}

fn leaky_bucket(p: &Policy, state: Option<State>, now: u64, cost: u64, consume: bool) -> Step {
    let interval = p.interval_micros();
    let max_delay = p.max_delay_micros();
    let start = match state {
        Some(State::Tat(t)) => t.max(now),
        _ => now,
    };
    let delay = start - now;
    if delay <= max_delay {
        let new_tat = start + cost * interval;
        let queued = new_tat - now;
        // How many more single-unit requests could still be queued behind this one.
        let remaining = if queued <= max_delay {
            (max_delay - queued) / interval + 1
        } else {
            0
        };
        let decision = allow(p.limit(), remaining, queued, delay);
        if consume {
            return step(decision, Some(State::Tat(new_tat)), true, new_tat);
        }
        return step(decision, state, false, start);
    }
    let decision = deny(p.limit(), 0, delay, delay - max_delay);
    step(decision, state, false, start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const T0: u64 = 1_700_000_000_000_000;

    fn run(p: &Policy, state: &mut Option<State>, now: u64, cost: u64) -> Decision {
        let s = decide(
            p,
            state.take(),
            Timestamp::from_micros(now),
            cost,
            Mode::Consume,
        );
        *state = s.state;
        s.decision
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn fixed_window_counts_per_aligned_window_and_denial_consumes_nothing() {
        let p = Policy::fixed_window(3, secs(10)).unwrap();
        let mut st = None;
        let base = (T0 / 10_000_000) * 10_000_000;
        assert!(run(&p, &mut st, base + 1, 2).allowed);
        let d = run(&p, &mut st, base + 2, 2);
        assert!(!d.allowed);
        assert_eq!(d.remaining, 1);
        assert_eq!(d.retry_after, Some(Duration::from_micros(10_000_000 - 2)));
        assert!(run(&p, &mut st, base + 3, 1).allowed);
        assert!(!run(&p, &mut st, base + 9_999_999, 1).allowed);
        // The next window starts exactly at the boundary.
        let d = run(&p, &mut st, base + 10_000_000, 3);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
    }

    #[test]
    fn sliding_log_entry_leaves_exactly_one_period_later() {
        let p = Policy::sliding_log(2, secs(1)).unwrap();
        let mut st = None;
        assert!(run(&p, &mut st, T0, 1).allowed);
        assert!(run(&p, &mut st, T0 + 500_000, 1).allowed);
        let d = run(&p, &mut st, T0 + 999_999, 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Some(Duration::from_micros(1)));
        assert!(run(&p, &mut st, T0 + 1_000_000, 1).allowed);
        assert!(!run(&p, &mut st, T0 + 1_000_001, 1).allowed);
    }

    #[test]
    fn sliding_counter_weights_previous_window() {
        let p = Policy::sliding_counter(10, secs(10)).unwrap();
        let base = (T0 / 10_000_000) * 10_000_000;
        let mut st = None;
        assert!(run(&p, &mut st, base, 10).allowed);
        // Halfway into the next window, the previous 10 weigh 5.
        let d = run(&p, &mut st, base + 15_000_000, 5);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        let d = run(&p, &mut st, base + 15_000_000, 1);
        assert!(!d.allowed);
        // floor(10 × (10 s − e) / 10 s) falls from 5 to 4 one microsecond after halfway.
        assert_eq!(d.retry_after, Some(Duration::from_micros(1)));
        assert!(!run(&p, &mut st, base + 15_000_000, 1).allowed);
        assert!(run(&p, &mut st, base + 15_000_001, 1).allowed);
    }

    #[test]
    fn token_bucket_refills_whole_tokens() {
        let p = Policy::token_bucket(10, secs(1))
            .unwrap()
            .with_burst(5)
            .unwrap();
        let mut st = None;
        assert!(run(&p, &mut st, T0, 5).allowed);
        let d = run(&p, &mut st, T0, 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Some(Duration::from_millis(100)));
        assert!(!run(&p, &mut st, T0 + 99_999, 1).allowed);
        let d = run(&p, &mut st, T0 + 100_000, 1);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        assert_eq!(d.reset_after, Duration::from_millis(500));
    }

    #[test]
    fn gcra_burst_then_steady_rate() {
        let p = Policy::gcra(10, secs(1)).unwrap().with_burst(3).unwrap();
        let mut st = None;
        for left in [2, 1, 0] {
            let d = run(&p, &mut st, T0, 1);
            assert!(d.allowed);
            assert_eq!(d.remaining, left);
        }
        let d = run(&p, &mut st, T0, 1);
        assert_eq!(d.retry_after, Some(Duration::from_millis(100)));
        assert!(run(&p, &mut st, T0 + 100_000, 1).allowed);
        assert!(!run(&p, &mut st, T0 + 100_001, 1).allowed);
    }

    #[test]
    fn leaky_bucket_shapes_with_delay_then_denies() {
        let p = Policy::leaky_bucket(10, secs(1))
            .unwrap()
            .with_max_delay(Duration::from_millis(250))
            .unwrap();
        let mut st = None;
        let decisions: Vec<_> = (0..4).map(|_| run(&p, &mut st, T0, 1)).collect();
        let delays: Vec<_> = decisions[..3].iter().map(|d| d.delay.as_millis()).collect();
        assert_eq!(delays, vec![0, 100, 200]);
        assert!(decisions[..3].iter().all(|d| d.allowed));
        // The fourth would wait 300 ms > 250 ms: denied, and may retry in 50 ms.
        assert!(!decisions[3].allowed);
        assert_eq!(decisions[3].retry_after, Some(Duration::from_millis(50)));
        assert!(run(&p, &mut st, T0 + 50_000, 1).allowed);
    }

    #[test]
    fn peek_consumes_nothing() {
        for alg in Algorithm::ALL {
            let p = Policy::new(alg, 2, secs(60)).unwrap();
            let mut st = None;
            for _ in 0..5 {
                let s = decide(&p, st.take(), Timestamp::from_micros(T0), 1, Mode::Peek);
                assert!(s.decision.allowed, "{alg}");
                assert!(!s.changed, "{alg}");
                st = s.state;
            }
            let fresh = run(&p, &mut None, T0, 1);
            assert_eq!(run(&p, &mut st, T0, 1), fresh, "{alg}");
        }
    }
}
