//! `--hang_timeout` for programs that send no heartbeats (users' scripts): the job counts
//! as hung when no rank printed a line and no rank's process group used CPU for the
//! timeout. The report carries every rank's last lines and, when `py-spy` is installed, a
//! `py-spy dump` of every rank's Python stacks. CPU time comes from `/proc/<pid>/stat` of
//! every process in a rank's process group (DataLoader workers included).

use std::time::{Duration, Instant};

use super::{Outcome, Worker};

/// How often the watch samples output and CPU time.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// CPU use below this share of one core counts as idle (timers, heartbeats of libraries).
const IDLE_CORE_SHARE: f64 = 0.02;
/// Longest wait for one `py-spy dump`.
const DUMP_LIMIT: Duration = Duration::from_secs(20);

/// Tracks the last time any rank printed or computed.
#[derive(Debug)]
pub struct SilenceWatch {
    timeout: Duration,
    last_activity: Instant,
    last_sample: Instant,
    lines: u64,
    cpu_ticks: u64,
}

impl SilenceWatch {
    pub fn new(timeout: Duration) -> SilenceWatch {
        let now = Instant::now();
        SilenceWatch {
            timeout,
            last_activity: now,
            last_sample: now,
            lines: 0,
            cpu_ticks: 0,
        }
    }

    /// `Some(Hung)` once the ranks have been silent and idle for the timeout.
    pub fn check(&mut self, workers: &[Worker]) -> Option<Outcome> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last_sample);
        if elapsed < SAMPLE_EVERY {
            return None;
        }
        self.last_sample = now;
        let lines: u64 = workers.iter().map(Worker::lines_printed).sum();
        let groups: Vec<u32> = workers.iter().map(|w| w.pid).collect();
        let ticks = cpu_ticks_of_groups(&groups);
        let idle_ticks = elapsed.as_secs_f64() * clock_ticks_per_second() * IDLE_CORE_SHARE;
        let computed =
            ticks.saturating_sub(self.cpu_ticks) as f64 > idle_ticks * groups.len() as f64;
        if lines != self.lines || computed {
            self.last_activity = now;
        }
        (self.lines, self.cpu_ticks) = (lines, ticks);
        (now.duration_since(self.last_activity) >= self.timeout).then(|| self.hung(workers))
    }

    fn hung(&self, workers: &[Worker]) -> Outcome {
        let mut report = format!(
            "rsdeep: no rank printed a line or used CPU for {:.0} s (--hang_timeout): the job looks hung\n",
            self.timeout.as_secs_f64()
        );
        for worker in workers {
            report.push_str(&format!(
                "rsdeep: rank {} (host {}, pid {}), last lines:\n",
                worker.rank, worker.host, worker.pid
            ));
            for line in worker.tail() {
                report.push_str(&format!("    {line}\n"));
            }
            report.push_str(&py_spy_dump(worker.pid));
        }
        Outcome::Hung {
            ranks: workers.iter().map(|w| w.rank).collect(),
            report,
        }
    }
}

/// utime + stime of every process whose process group is one of `groups`.
fn cpu_ticks_of_groups(groups: &[u32]) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|stat| group_and_ticks(&stat))
        .filter(|(group, _)| groups.contains(group))
        .map(|(_, ticks)| ticks)
        .sum()
}

/// (process group, utime + stime) from a `/proc/<pid>/stat` line. The command name in
/// parentheses may hold spaces, so fields are counted after its closing parenthesis:
/// state, ppid, pgrp, ... utime is the 12th and stime the 13th after it.
fn group_and_ticks(stat: &str) -> Option<(u32, u64)> {
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let group = fields.get(2)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((group, utime + stime))
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// `py-spy dump --pid PID` indented, or a note on how to get it.
fn py_spy_dump(pid: u32) -> String {
    let child = std::process::Command::new("py-spy")
        .args(["dump", "--pid", &pid.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        return "    (install py-spy, `pip install py-spy`, to see every rank's Python stack here)\n"
            .to_string();
    };
    let deadline = Instant::now() + DUMP_LIMIT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            let output = child
                .wait_with_output()
                .map(|o| o.stdout)
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&output);
            return text.lines().map(|l| format!("    py-spy| {l}\n")).collect();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    format!("    (py-spy dump of pid {pid} did not finish within {DUMP_LIMIT:?})\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        let stat = "4242 (python3 -u x) S 1 4240 4240 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 3";
        assert_eq!(group_and_ticks(stat), Some((4240, 42)));
        assert_eq!(group_and_ticks("garbage"), None);
    }

    #[test]
    fn this_process_group_has_used_cpu() {
        let group = nix::unistd::getpgrp().as_raw() as u32;
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {}
        assert!(cpu_ticks_of_groups(&[group]) > 0);
        assert_eq!(cpu_ticks_of_groups(&[u32::MAX]), 0);
    }
}
