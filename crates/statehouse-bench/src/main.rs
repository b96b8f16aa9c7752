//! `ratelimit-bench`: decisions per second of Statehouse's six algorithms on the embedded store
//! and on Redis, beside two references measured in the same run on the same machine:
//! `redis-benchmark` running a minimal pipelined fixed-window script (the Redis ceiling) and
//! governor's keyed limiter (the in-process reference). Every headline figure is a ratio to a
//! reference, because the machine is small and shared. See `BENCHMARKS.md` at the repo root.
//!
//! ```text
//! cargo run --release -p statehouse-bench --bin ratelimit-bench -- --seconds 5
//! ```

mod cli;
mod cpu;
mod latency;
mod limiters;
mod load;
mod options;
mod redis_target;
mod report;
mod suite;

use anyhow::bail;

use crate::options::Command;

fn main() -> anyhow::Result<()> {
    let options = match options::parse(std::env::args().skip(1))? {
        Command::Help => {
            print!("{}", options::USAGE);
            return Ok(());
        }
        Command::Run(options) => options,
    };
    let results = suite::run(&options)?;
    print!("{}", report::markdown(&results));
    let failed = results.failed_runs();
    if !failed.is_empty() {
        bail!("calls failed during: {}", failed.join(", "));
    }
    Ok(())
}
