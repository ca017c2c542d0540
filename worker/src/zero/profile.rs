//! Per-phase step timers for the ZeRO engine, on only when `RSDEEP_ZERO_PROFILE` is set
//! (any value): wall time and this thread's CPU time of each phase of an optimizer step
//! (forward, loss, autograd backward, gradient flattening, reduction issue and wait,
//! stage-3 gathers, the step's norm / Adam / zeroing / all-gather), plus the whole
//! process's CPU time (communication threads included), logged once per step at `info`
//! as one `zero_profile` line. Used to find where a step's time goes
//! (`docs/benchmarks.md` §1b); costs two clock reads per phase when on, nothing
//! when off.

use std::time::Instant;

/// The phases a step is split into, in the order they are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Forward,
    Loss,
    Backward,
    Flatten,
    ReduceIssue,
    ReduceWait,
    Gather,
    StepNorm,
    StepAdam,
    StepZero,
    StepAllGather,
}

const PHASES: [Phase; 11] = [
    Phase::Forward,
    Phase::Loss,
    Phase::Backward,
    Phase::Flatten,
    Phase::ReduceIssue,
    Phase::ReduceWait,
    Phase::Gather,
    Phase::StepNorm,
    Phase::StepAdam,
    Phase::StepZero,
    Phase::StepAllGather,
];

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Loss => "loss",
            Phase::Backward => "backward",
            Phase::Flatten => "flatten",
            Phase::ReduceIssue => "reduce_issue",
            Phase::ReduceWait => "reduce_wait",
            Phase::Gather => "gather",
            Phase::StepNorm => "step_norm",
            Phase::StepAdam => "step_adam",
            Phase::StepZero => "step_zero",
            Phase::StepAllGather => "step_allgather",
        }
    }

    fn index(self) -> usize {
        PHASES.iter().position(|p| *p == self).unwrap_or(0)
    }
}

/// A phase's start: wall clock and thread CPU clock.
pub(super) struct Mark {
    wall: Instant,
    cpu_s: f64,
}

/// Accumulated (wall, thread CPU) seconds per phase since the last report.
pub(super) struct StepProfile {
    enabled: bool,
    totals: [(f64, f64); PHASES.len()],
    step_start: Option<(Instant, f64)>,
}

impl StepProfile {
    /// On when the `RSDEEP_ZERO_PROFILE` environment variable is set.
    pub(super) fn from_env() -> Self {
        StepProfile {
            enabled: std::env::var_os(rsdeep_contract::env::ZERO_PROFILE).is_some(),
            totals: [(0.0, 0.0); PHASES.len()],
            step_start: None,
        }
    }

    /// Starts timing a phase (None when profiling is off).
    pub(super) fn mark(&mut self) -> Option<Mark> {
        if !self.enabled {
            return None;
        }
        if self.step_start.is_none() {
            self.step_start = Some((Instant::now(), process_cpu_s()));
        }
        Some(Mark {
            wall: Instant::now(),
            cpu_s: thread_cpu_s(),
        })
    }

    /// Adds the time since `mark` to `phase`.
    pub(super) fn add(&mut self, phase: Phase, mark: Option<Mark>) {
        let Some(mark) = mark else { return };
        let slot = &mut self.totals[phase.index()];
        slot.0 += mark.wall.elapsed().as_secs_f64();
        slot.1 += thread_cpu_s() - mark.cpu_s;
    }

    /// Logs the step's phases and resets (at the end of `step()`).
    pub(super) fn report(&mut self, rank: usize, step: u64) {
        let Some((start, process_cpu)) = self.step_start.take() else {
            return;
        };
        let mut line = String::new();
        for phase in PHASES {
            let (wall, cpu) = self.totals[phase.index()];
            line.push_str(&format!(" {}={:.3}/{:.3}", phase.name(), wall, cpu));
        }
        tracing::info!(
            rank,
            "zero_profile step={} wall={:.3} process_cpu={:.3} (phase=wall/thread_cpu s){}",
            step,
            start.elapsed().as_secs_f64(),
            process_cpu_s() - process_cpu,
            line
        );
        self.totals = [(0.0, 0.0); PHASES.len()];
    }
}

fn clock_s(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn thread_cpu_s() -> f64 {
    clock_s(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn process_cpu_s() -> f64 {
    clock_s(libc::CLOCK_PROCESS_CPUTIME_ID)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_accumulate_cpu_time_and_reset_after_a_report() {
        let mut profile = StepProfile {
            enabled: true,
            totals: [(0.0, 0.0); PHASES.len()],
            step_start: None,
        };
        let mark = profile.mark();
        let mut x = 0u64;
        for i in 0..3_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        profile.add(Phase::StepAdam, mark);
        let (wall, cpu) = profile.totals[Phase::StepAdam.index()];
        assert!(wall > 0.0 && cpu > 0.0, "wall {wall} cpu {cpu}");
        assert_eq!(profile.totals[Phase::Forward.index()], (0.0, 0.0));
        profile.report(0, 1);
        assert_eq!(profile.totals[Phase::StepAdam.index()], (0.0, 0.0));
        assert!(profile.step_start.is_none());
    }

    #[test]
    fn disabled_profile_marks_nothing() {
        let mut profile = StepProfile {
            enabled: false,
            totals: [(0.0, 0.0); PHASES.len()],
            step_start: None,
        };
        assert!(profile.mark().is_none());
        assert!(profile.step_start.is_none());
    }
}
