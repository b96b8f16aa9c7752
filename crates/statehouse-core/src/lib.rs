//! # statehouse-core
//!
//! The small, stable core of [Statehouse](https://example.invalid/statehouse): the types, the
//! store traits, the pure rate-limiting algorithms and the injectable [`Clock`]. It depends on
//! no Redis client, no tower and no async runtime; backends (`statehouse-embedded`,
//! `statehouse-redis`) and the `statehouse` facade build on it.
//!
//! ```
//! use std::time::Duration;
//! use statehouse_core::{algorithm, Mode, Policy, Timestamp};
//!
//! let policy = Policy::gcra(100, Duration::from_secs(60))?;
//! let step = algorithm::decide(&policy, None, Timestamp::from_micros(0), 1, Mode::Consume);
//! assert!(step.decision.allowed);
//! assert_eq!(step.decision.remaining, 99);
//! # Ok::<(), statehouse_core::Error>(())
//! ```

pub mod algorithm;
pub mod cache;
mod clock;
mod decision;
mod error;
pub mod key;
mod policy;
pub mod session;
mod store;

pub use clock::{Clock, ManualClock, SystemClock, Timestamp};
pub use decision::{Decision, Verdict};
pub use error::{BoxError, Error, MAX_DEADLINE, Result, check_deadline};
pub use policy::{Algorithm, MAX_LIMIT, MAX_PERIOD, MAX_SLIDING_LOG_LIMIT, Policy, replica_count};
pub use store::{LimitCheck, Mode, PreparedCheck, RateLimitStore, prepare_checks};
