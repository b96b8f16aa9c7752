//! The TTL policy of a key class and the pure decisions made with it.

use std::time::Duration;

use super::Envelope;
use crate::{Error, Result, Timestamp};

/// How long entries of one key class live, and what may be served once they are no longer fresh.
///
/// Build with [`CachePolicy::builder`]; invalid combinations are rejected with the field's name.
///
/// ```
/// use std::time::Duration;
/// use statehouse_core::cache::CachePolicy;
///
/// let p = CachePolicy::builder(Duration::from_secs(60))
///     .stale_while_revalidate(Duration::from_secs(30))
///     .stale_if_error(Duration::from_secs(300))
///     .negative_ttl(Duration::from_secs(5))
///     .build()?;
/// assert_eq!(p.fresh_ttl(), Duration::from_secs(60));
/// assert!(CachePolicy::builder(Duration::ZERO).build().is_err());
/// # Ok::<(), statehouse_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct CachePolicy {
    fresh_ttl: Duration,
    jitter: f64,
    negative_ttl: Option<Duration>,
    stale_while_revalidate: Duration,
    stale_if_error: Duration,
    xfetch_beta: Option<f64>,
    lease_ttl: Duration,
}

impl CachePolicy {
    /// The longest TTL accepted (one year).
    pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

    /// A builder with fresh TTL `fresh_ttl`, 10 % jitter, no negative caching, no stale serving,
    /// no early refresh, and a 5 s lease.
    pub fn builder(fresh_ttl: Duration) -> CachePolicyBuilder {
        CachePolicyBuilder {
            policy: CachePolicy {
                fresh_ttl,
                jitter: 0.1,
                negative_ttl: None,
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
                xfetch_beta: None,
                lease_ttl: Duration::from_secs(5),
            },
        }
    }

    /// A policy with only a fresh TTL (and the defaults of [`CachePolicy::builder`]).
    pub fn ttl(fresh_ttl: Duration) -> Result<CachePolicy> {
        Self::builder(fresh_ttl).build()
    }

    /// How long a value is fresh (before jitter).
    pub fn fresh_ttl(&self) -> Duration {
        self.fresh_ttl
    }
    /// The share of the TTL taken off at random (0 to 0.5): with 0.1 a 60 s TTL becomes 54–60 s.
    pub fn jitter(&self) -> f64 {
        self.jitter
    }
    /// How long "not found" is remembered, when negative caching is on.
    pub fn negative_ttl(&self) -> Option<Duration> {
        self.negative_ttl
    }
    /// How long after going stale a value is still served while one refresh runs.
    pub fn stale_while_revalidate(&self) -> Duration {
        self.stale_while_revalidate
    }
    /// How long after going stale a value is served when the loader fails.
    pub fn stale_if_error(&self) -> Duration {
        self.stale_if_error
    }
    /// XFetch's β (early refresh), when on.
    pub fn xfetch_beta(&self) -> Option<f64> {
        self.xfetch_beta
    }
    /// How long a fill lease lasts before another replica may take over.
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }
    /// How long after going stale an entry is kept at all: max(SWR, stale-if-error).
    pub fn stale_window(&self) -> Duration {
        self.stale_while_revalidate.max(self.stale_if_error)
    }

    /// What an entry is worth at `now` under this policy.
    pub fn freshness(&self, entry: &Envelope, now: Timestamp) -> Freshness {
        if now < entry.fresh_until {
            return Freshness::Fresh;
        }
        let stale_for = now.saturating_duration_since(entry.fresh_until);
        if now >= entry.stale_until {
            Freshness::Expired
        } else if stale_for < self.stale_while_revalidate {
            Freshness::StaleWhileRevalidate
        } else if stale_for < self.stale_if_error {
            Freshness::StaleIfError
        } else {
            Freshness::Expired
        }
    }
}

/// What a stored entry is worth at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Serve it.
    Fresh,
    /// Serve it, and refresh it once in the background.
    StaleWhileRevalidate,
    /// Reload; serve it only if the loader fails.
    StaleIfError,
    /// Worthless: reload.
    Expired,
}

/// Builds a [`CachePolicy`].
#[derive(Debug, Clone)]
pub struct CachePolicyBuilder {
    policy: CachePolicy,
}

impl CachePolicyBuilder {
    /// The share of the TTL taken off at random, 0 (off) to 0.5. Default 0.1.
    pub fn jitter(mut self, share: f64) -> Self {
        self.policy.jitter = share;
        self
    }
    /// Remember "not found" for `ttl` (negative caching).
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.policy.negative_ttl = Some(ttl);
        self
    }
    /// Serve a stale value for up to `d` after it went stale, while one refresh runs.
    pub fn stale_while_revalidate(mut self, d: Duration) -> Self {
        self.policy.stale_while_revalidate = d;
        self
    }
    /// Serve a stale value for up to `d` after it went stale when the loader fails.
    pub fn stale_if_error(mut self, d: Duration) -> Self {
        self.policy.stale_if_error = d;
        self
    }
    /// Refresh early with XFetch's probability `exp(-remaining / (β·δ))`, δ being the last
    /// load's duration. β = 1 is the paper's default; larger refreshes earlier.
    pub fn xfetch(mut self, beta: f64) -> Self {
        self.policy.xfetch_beta = Some(beta);
        self
    }
    /// How long a fill lease lasts (default 5 s); a holder that dies blocks others this long.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.policy.lease_ttl = ttl;
        self
    }

    /// The policy, or the first invalid field.
    pub fn build(self) -> Result<CachePolicy> {
        let p = self.policy;
        let field = |field: &'static str, reason: &str| Error::InvalidPolicy {
            field,
            reason: reason.into(),
        };
        let ttl_ok = |d: Duration| d > Duration::ZERO && d <= CachePolicy::MAX_TTL;
        if !ttl_ok(p.fresh_ttl) {
            return Err(field(
                "fresh_ttl",
                "must be more than zero and at most a year",
            ));
        }
        if !(0.0..=0.5).contains(&p.jitter) {
            return Err(field("jitter", "must be between 0 and 0.5"));
        }
        if let Some(n) = p.negative_ttl
            && !ttl_ok(n)
        {
            return Err(field(
                "negative_ttl",
                "must be more than zero and at most a year",
            ));
        }
        if p.stale_while_revalidate > CachePolicy::MAX_TTL {
            return Err(field("stale_while_revalidate", "must be at most a year"));
        }
        if p.stale_if_error > CachePolicy::MAX_TTL {
            return Err(field("stale_if_error", "must be at most a year"));
        }
        if let Some(b) = p.xfetch_beta
            && !(b.is_finite() && b > 0.0 && b <= 100.0)
        {
            return Err(field("xfetch", "β must be more than 0 and at most 100"));
        }
        if p.lease_ttl < Duration::from_millis(1) || p.lease_ttl > Duration::from_secs(3600) {
            return Err(field("lease_ttl", "must be between 1 ms and 1 hour"));
        }
        Ok(p)
    }
}

/// `ttl` shortened by a random share of at most `jitter`: `ttl × (1 − jitter × unit)`, with
/// `unit` uniform in [0, 1). Never longer than `ttl`, never zero.
///
/// ```
/// use std::time::Duration;
/// use statehouse_core::cache::jittered_ttl;
/// let ttl = Duration::from_secs(100);
/// assert_eq!(jittered_ttl(ttl, 0.1, 0.0), ttl);
/// assert_eq!(jittered_ttl(ttl, 0.1, 0.5), Duration::from_secs(95));
/// assert_eq!(jittered_ttl(ttl, 0.0, 0.9), ttl);
/// ```
pub fn jittered_ttl(ttl: Duration, jitter: f64, unit: f64) -> Duration {
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 0.5)
    } else {
        0.0
    };
    let cut = ttl.as_secs_f64() * jitter * unit;
    ttl.saturating_sub(Duration::from_secs_f64(cut))
        .max(Duration::from_micros(1).min(ttl))
}

/// XFetch (Vattani et al., VLDB 2015): refresh early when `now − δ·β·ln(unit) ≥ fresh_until`,
/// `unit` uniform in (0, 1]. The chance grows as expiry nears: `exp(−remaining / (β·δ))`.
///
/// ```
/// use statehouse_core::Timestamp;
/// use statehouse_core::cache::xfetch_refresh_due;
/// let until = Timestamp::from_micros(10_000_000);
/// // 1 s left, δ = 0.4 s, β = 1: due only when ln(unit) ≤ −2.5.
/// assert!(!xfetch_refresh_due(Timestamp::from_micros(9_000_000), until, 400_000, 1.0, 0.5));
/// assert!(xfetch_refresh_due(Timestamp::from_micros(9_000_000), until, 400_000, 1.0, 0.05));
/// assert!(xfetch_refresh_due(until, until, 0, 1.0, 1.0));
/// ```
pub fn xfetch_refresh_due(
    now: Timestamp,
    fresh_until: Timestamp,
    delta_micros: u32,
    beta: f64,
    unit: f64,
) -> bool {
    if now >= fresh_until {
        return true;
    }
    let unit = if unit.is_finite() && unit > 0.0 {
        unit.min(1.0)
    } else {
        f64::MIN_POSITIVE
    };
    let gap = -(delta_micros as f64) * beta * unit.ln();
    now.as_micros() as f64 + gap >= fresh_until.as_micros() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::EnvelopeFlags;

    fn entry(fresh: u64, stale: u64) -> Envelope {
        Envelope {
            flags: EnvelopeFlags::default(),
            fresh_until: Timestamp::from_micros(fresh),
            stale_until: Timestamp::from_micros(stale),
            load_micros: 0,
            tags: vec![],
            payload: vec![],
        }
    }

    #[test]
    fn freshness_edges() {
        let p = CachePolicy::builder(Duration::from_secs(10))
            .stale_while_revalidate(Duration::from_micros(100))
            .stale_if_error(Duration::from_micros(300))
            .build()
            .unwrap();
        let e = entry(1_000, 1_300);
        let at = |t| p.freshness(&e, Timestamp::from_micros(t));
        assert_eq!(at(999), Freshness::Fresh);
        assert_eq!(at(1_000), Freshness::StaleWhileRevalidate);
        assert_eq!(at(1_099), Freshness::StaleWhileRevalidate);
        assert_eq!(at(1_100), Freshness::StaleIfError);
        assert_eq!(at(1_299), Freshness::StaleIfError);
        assert_eq!(at(1_300), Freshness::Expired);
    }

    #[test]
    fn jitter_stays_within_its_share() {
        let ttl = Duration::from_secs(60);
        for i in 0..=100 {
            let d = jittered_ttl(ttl, 0.2, i as f64 / 100.0);
            assert!(d <= ttl && d >= Duration::from_secs(48), "{d:?}");
        }
        assert_eq!(jittered_ttl(ttl, f64::NAN, 0.5), ttl);
        assert_eq!(
            jittered_ttl(Duration::from_micros(1), 0.5, 0.99),
            Duration::from_micros(1)
        );
    }

    #[test]
    fn invalid_policies_name_their_field() {
        let err = |b: CachePolicyBuilder| match b.build() {
            Err(Error::InvalidPolicy { field, .. }) => field,
            other => panic!("expected an invalid policy, got {other:?}"),
        };
        let s = Duration::from_secs(1);
        assert_eq!(err(CachePolicy::builder(s).jitter(0.9)), "jitter");
        assert_eq!(err(CachePolicy::builder(s).xfetch(f64::NAN)), "xfetch");
        assert_eq!(
            err(CachePolicy::builder(s).negative_ttl(Duration::ZERO)),
            "negative_ttl"
        );
        assert_eq!(
            err(CachePolicy::builder(s).lease_ttl(Duration::ZERO)),
            "lease_ttl"
        );
        assert_eq!(err(CachePolicy::builder(Duration::MAX)), "fresh_ttl");
    }
}
