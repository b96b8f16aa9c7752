//! What Redis's memory and persistence settings mean for a cache, and for sessions that share
//! the instance with one. Pure: the Redis store reads the settings (`CONFIG GET`, `INFO`), this
//! module judges them, the gateway's `doctor` prints the verdicts.

use std::fmt;

/// The settings read from one Redis server; `None` where the server refused to tell (managed
/// services often refuse `CONFIG`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemorySettings {
    /// `maxmemory` in bytes (0: no limit).
    pub maxmemory: Option<u64>,
    /// `maxmemory-policy`, e.g. `noeviction`, `allkeys-lru`.
    pub maxmemory_policy: Option<String>,
    /// `used_memory` from `INFO memory`.
    pub used_memory: Option<u64>,
    /// `save` (RDB snapshots; empty: none).
    pub save: Option<String>,
    /// `appendonly` (AOF).
    pub appendonly: Option<bool>,
    /// `evicted_keys` from `INFO stats`.
    pub evicted_keys: Option<u64>,
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RiskLevel {
    /// Worth knowing; nothing to fix.
    Info,
    /// Will hurt under load or after a restart.
    Warning,
    /// Loses data users notice (sessions) or takes the store down.
    Critical,
}

impl fmt::Display for RiskLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RiskLevel::Info => "info",
            RiskLevel::Warning => "warning",
            RiskLevel::Critical => "critical",
        })
    }
}

/// One finding of [`assess_memory`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryRisk {
    /// How bad.
    pub level: RiskLevel,
    /// A stable identifier, e.g. `no-maxmemory`, for scripts and alerts.
    pub code: &'static str,
    /// What it means and what to do, in one or two sentences.
    pub message: String,
}

/// Judges `settings` for a cache, and for sessions too when `shares_with_sessions`.
///
/// ```
/// use statehouse_core::cache::{assess_memory, MemorySettings, RiskLevel};
/// let s = MemorySettings {
///     maxmemory: Some(1 << 30),
///     maxmemory_policy: Some("allkeys-lru".into()),
///     ..Default::default()
/// };
/// assert!(assess_memory(&s, false).iter().all(|r| r.level < RiskLevel::Critical));
/// assert!(assess_memory(&s, true).iter().any(|r| r.code == "sessions-evictable"));
/// ```
pub fn assess_memory(settings: &MemorySettings, shares_with_sessions: bool) -> Vec<MemoryRisk> {
    let mut out = Vec::new();
    let mut risk = |level, code, message: String| {
        out.push(MemoryRisk {
            level,
            code,
            message,
        })
    };

    match settings.maxmemory {
        None => risk(
            RiskLevel::Info,
            "maxmemory-unknown",
            "could not read `maxmemory` (CONFIG refused?); check the service's memory limit".into(),
        ),
        Some(0) => risk(
            RiskLevel::Warning,
            "no-maxmemory",
            "`maxmemory` is 0 (no limit): a cache grows until the operating system kills Redis; \
             set `maxmemory` below the machine's memory"
                .into(),
        ),
        Some(max) => {
            if let Some(used) = settings.used_memory
                && used.saturating_mul(10) >= max.saturating_mul(9)
            {
                risk(
                    RiskLevel::Warning,
                    "memory-nearly-full",
                    format!(
                        "{used} of {max} bytes used (≥ 90 %): evictions or refused writes are near"
                    ),
                );
            }
        }
    }

    let policy = settings.maxmemory_policy.as_deref();
    match policy {
        None => risk(
            RiskLevel::Info,
            "policy-unknown",
            "could not read `maxmemory-policy`".into(),
        ),
        Some("noeviction") => risk(
            RiskLevel::Warning,
            "noeviction",
            "`maxmemory-policy noeviction`: once full, every cache write fails instead of evicting; \
             use `allkeys-lru`/`allkeys-lfu` on an instance that holds only caches"
                .into(),
        ),
        Some(p) if p.starts_with("allkeys-") || p.starts_with("volatile-") => {
            if shares_with_sessions {
                risk(
                    RiskLevel::Critical,
                    "sessions-evictable",
                    format!(
                        "`maxmemory-policy {p}` with sessions on the same instance: every Statehouse \
                         key has a TTL, so a full cache evicts live sessions and users are logged \
                         out; run sessions on their own instance with `noeviction`"
                    ),
                );
            }
            if p.starts_with("volatile-") || p.starts_with("allkeys-") {
                risk(
                    RiskLevel::Info,
                    "tags-evictable",
                    "tag and namespace versions can be evicted; Statehouse then treats the tag as \
                     new (a miss, never a stale hit)"
                        .into(),
                );
            }
        }
        Some(p) => risk(
            RiskLevel::Info,
            "policy-unrecognised",
            format!("`maxmemory-policy {p}` is not one this check knows"),
        ),
    }

    let rdb = settings.save.as_deref().map(|s| !s.trim().is_empty());
    let aof = settings.appendonly;
    if shares_with_sessions && rdb == Some(false) && aof == Some(false) {
        risk(
            RiskLevel::Warning,
            "sessions-not-persisted",
            "no RDB snapshots and no AOF: a Redis restart logs every user out".into(),
        );
    }
    if !shares_with_sessions && (rdb == Some(true) || aof == Some(true)) {
        risk(
            RiskLevel::Info,
            "cache-persisted",
            "persistence is on for a cache-only instance: forks for snapshots cost latency and \
             memory, and a cache can be rebuilt"
                .into(),
        );
    }
    if let Some(n) = settings.evicted_keys.filter(|&n| n > 0) {
        risk(
            if shares_with_sessions {
                RiskLevel::Warning
            } else {
                RiskLevel::Info
            },
            "keys-evicted",
            format!("{n} keys were evicted since the server started"),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(s: &MemorySettings, sessions: bool) -> Vec<&'static str> {
        assess_memory(s, sessions)
            .into_iter()
            .map(|r| r.code)
            .collect()
    }

    #[test]
    fn redis_defaults_warn_about_no_limit_and_noeviction() {
        let s = MemorySettings {
            maxmemory: Some(0),
            maxmemory_policy: Some("noeviction".into()),
            used_memory: Some(1_000_000),
            save: Some("3600 1 300 100 60 10000".into()),
            appendonly: Some(false),
            evicted_keys: Some(0),
        };
        assert_eq!(
            codes(&s, false),
            ["no-maxmemory", "noeviction", "cache-persisted"]
        );
        assert_eq!(codes(&s, true), ["no-maxmemory", "noeviction"]);
    }

    #[test]
    fn sessions_beside_an_evicting_cache_are_critical() {
        let s = MemorySettings {
            maxmemory: Some(100),
            maxmemory_policy: Some("volatile-lru".into()),
            used_memory: Some(95),
            save: Some(String::new()),
            appendonly: Some(false),
            evicted_keys: Some(12),
        };
        let risks = assess_memory(&s, true);
        let critical: Vec<_> = risks
            .iter()
            .filter(|r| r.level == RiskLevel::Critical)
            .collect();
        assert_eq!(critical.len(), 1);
        assert_eq!(critical[0].code, "sessions-evictable");
        let c = codes(&s, true);
        assert!(c.contains(&"memory-nearly-full"));
        assert!(c.contains(&"sessions-not-persisted"));
        assert!(c.contains(&"keys-evicted"));
    }

    #[test]
    fn unreadable_settings_are_reported_not_guessed() {
        assert_eq!(
            codes(&MemorySettings::default(), true),
            ["maxmemory-unknown", "policy-unknown"]
        );
    }
}
