//! What a process costs, read from `/proc`: CPU time (user + system, all threads) and
//! resident memory, summed over a set of processes.

use std::time::Duration;

/// Clock ticks per second of `/proc/PID/stat` times (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: u64 = 100;

/// CPU time of one process so far, or `None` when it is gone.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count from after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the whole line, utime 14 and stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis(
        (utime + stime) * 1000 / TICKS_PER_SECOND,
    ))
}

/// The parent of a process.
pub fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `pid` and every process descended from it.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return all;
    };
    let pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut i = 0;
    while i < all.len() {
        let parent_pid = all[i];
        for &p in &pids {
            if parent(p) == Some(parent_pid) && !all.contains(&p) {
                all.push(p);
            }
        }
        i += 1;
    }
    all
}

/// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        value.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// CPU time and memory of a set of processes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub cpu: Duration,
    /// Resident set, KiB, summed.
    pub rss_kib: u64,
    /// Peak resident set, KiB, summed over the processes' own peaks.
    pub peak_rss_kib: u64,
}

/// Usage of `pids` now.
pub fn usage(pids: &[u32]) -> Usage {
    let mut total = Usage::default();
    for &pid in pids {
        total.cpu += cpu_time(pid).unwrap_or_default();
        total.rss_kib += status_kib(pid, "VmRSS").unwrap_or(0);
        total.peak_rss_kib += status_kib(pid, "VmHWM").unwrap_or(0);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_memory_and_a_parent() {
        let me = std::process::id();
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        let u = usage(&[me]);
        assert!(u.cpu >= Duration::from_millis(10), "{u:?}");
        assert!(u.rss_kib > 1000 && u.peak_rss_kib >= u.rss_kib, "{u:?}");
        assert!(parent(me).is_some());
        assert!(tree(parent(me).unwrap_or(1)).contains(&me));
    }
}
