//! CPU time of this process, to tell client cost from server cost on a machine where both
//! share two cores.

use std::time::Duration;

/// The kernel's `USER_HZ`, the unit of `utime`/`stime` in `/proc/<pid>/stat`. It is part of
/// the Linux ABI (100 on every architecture Linux runs tokio on), unlike the tick rate.
const USER_HZ: u64 = 100;

/// User plus system CPU time of every thread of this process, from `/proc/self/stat`
/// (10 ms resolution: fine over a window of seconds). `None` where there is no `/proc`.
pub fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_stat(&stat)
}

/// `utime + stime` of a `/proc/<pid>/stat` line. The command name (field 2) is in parentheses
/// and may hold spaces, so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<Duration> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 1000 / USER_HZ))
}

/// `used_cpu_user + used_cpu_sys` of a Redis `INFO cpu` reply.
pub fn parse_info_cpu(info: &str) -> Option<Duration> {
    let field = |name: &str| -> Option<f64> {
        info.lines()
            .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(Duration::from_secs_f64(
        field("used_cpu_user")? + field("used_cpu_sys")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_and_stime_past_a_name_with_spaces() {
        let stat = "42 (my (odd) bin) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(parse_stat(stat), Some(Duration::from_secs(3)));
    }

    #[test]
    fn reads_redis_info_cpu() {
        let info = "# CPU\r\nused_cpu_sys:1.500000\r\nused_cpu_user:2.250000\r\n\
                    used_cpu_sys_children:0.000000\r\n";
        assert_eq!(parse_info_cpu(info), Some(Duration::from_secs_f64(3.75)));
    }

    #[test]
    fn this_process_has_a_cpu_time_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(process_cpu().is_some());
        }
    }
}
