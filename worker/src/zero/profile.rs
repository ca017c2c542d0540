//! Per-phase step timers for the ZeRO engine, on only when `RSDEEP_ZERO_PROFILE` is set
//! (any value): wall time and this thread's CPU time of each phase of an optimizer step
//! (forward, loss, autograd backward, gradient flattening, reduction issue and wait,
//! stage-3 gathers, the step's norm / Adam / zeroing / all-gather), plus the whole
//! process's CPU time (communication threads included), logged once per step at `info`
//! as one `zero_profile` line. Used to find where a step's time goes
//! (`docs/benchmarks.md` §1b); costs two clock reads per phase when on, nothing
//! when off. DeepSpeed's `wall_clock_breakdown` turns the same timers on and prints, on
//! rank 0 every `steps_per_print` steps, DeepSpeed's `time (ms) | fwd: ... | bwd: ...`
//! line with the mean per optimizer step since the previous one.

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
    /// The per-step `zero_profile` line (`RSDEEP_ZERO_PROFILE`).
    per_step_line: bool,
    /// `wall_clock_breakdown`: print the breakdown every this many steps (0: never).
    breakdown_every: u64,
    totals: [(f64, f64); PHASES.len()],
    step_start: Option<(Instant, f64)>,
    /// Wall seconds per phase since the last breakdown line, and the steps they span.
    window: [f64; PHASES.len()],
    window_steps: u64,
}

impl StepProfile {
    /// Timers on when the `RSDEEP_ZERO_PROFILE` environment variable is set (a line per
    /// step) or `breakdown_every` > 0 (`wall_clock_breakdown`, a line every that many).
    pub(super) fn new(breakdown_every: u64) -> Self {
        let per_step_line = std::env::var_os(rsdeep_contract::env::ZERO_PROFILE).is_some();
        StepProfile {
            enabled: per_step_line || breakdown_every > 0,
            per_step_line,
            breakdown_every,
            totals: [(0.0, 0.0); PHASES.len()],
            step_start: None,
            window: [0.0; PHASES.len()],
            window_steps: 0,
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

    /// Logs the step's phases (and, when due, the breakdown) and resets (at the end of
    /// `step()`).
    pub(super) fn report(&mut self, rank: usize, step: u64) {
        let Some((start, process_cpu)) = self.step_start.take() else {
            return;
        };
        if self.per_step_line {
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
        }
        for (sum, (wall, _)) in self.window.iter_mut().zip(self.totals) {
            *sum += wall;
        }
        self.window_steps += 1;
        self.totals = [(0.0, 0.0); PHASES.len()];
        if self.breakdown_every > 0 && step.is_multiple_of(self.breakdown_every) {
            if rank == 0 {
                eprintln!(
                    "[Rank 0] {}",
                    breakdown_line(&self.window, self.window_steps)
                );
            }
            self.window = [0.0; PHASES.len()];
            self.window_steps = 0;
        }
    }
}

/// DeepSpeed's wall-clock breakdown of `window` (wall seconds per phase over `steps`
/// optimizer steps), mean milliseconds per step: fwd (forward + loss), bwd (autograd
/// backward + gradient flattening), bwd_allreduce (gradient reduction issue + wait),
/// gather (ZeRO-3 parameter gathers), step (norm, Adam, zeroing, the parameter
/// all-gather).
fn breakdown_line(window: &[f64; PHASES.len()], steps: u64) -> String {
    let ms = |phases: &[Phase]| {
        let total: f64 = phases.iter().map(|p| window[p.index()]).sum();
        1000.0 * total / steps.max(1) as f64
    };
    format!(
        "time (ms) | fwd: {:.2} | bwd: {:.2} | bwd_allreduce: {:.2} | gather: {:.2} | step: {:.2}",
        ms(&[Phase::Forward, Phase::Loss]),
        ms(&[Phase::Backward, Phase::Flatten]),
        ms(&[Phase::ReduceIssue, Phase::ReduceWait]),
        ms(&[Phase::Gather]),
        ms(&[
            Phase::StepNorm,
            Phase::StepAdam,
            Phase::StepZero,
            Phase::StepAllGather
        ]),
    )
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

    fn profile(enabled: bool, breakdown_every: u64) -> StepProfile {
        StepProfile {
            enabled,
            per_step_line: enabled,
            breakdown_every,
            totals: [(0.0, 0.0); PHASES.len()],
            step_start: None,
            window: [0.0; PHASES.len()],
            window_steps: 0,
        }
    }

    #[test]
    fn phases_accumulate_cpu_time_and_reset_after_a_report() {
        let mut profile = profile(true, 0);
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
        let mut profile = profile(false, 0);
        assert!(profile.mark().is_none());
        assert!(profile.step_start.is_none());
    }

    #[test]
    fn the_breakdown_averages_phase_groups_over_the_steps_since_the_last_line() {
        let mut window = [0.0; PHASES.len()];
        window[Phase::Forward.index()] = 0.040;
        window[Phase::Loss.index()] = 0.004;
        window[Phase::ReduceWait.index()] = 0.002;
        window[Phase::StepAdam.index()] = 0.010;
        assert_eq!(
            breakdown_line(&window, 2),
            "time (ms) | fwd: 22.00 | bwd: 0.00 | bwd_allreduce: 1.00 | gather: 0.00 | step: 5.00"
        );
        let mut profile = profile(true, 2);
        for step in 1..=2 {
            let _ = profile.mark();
            profile.totals[Phase::Forward.index()].0 = 0.01;
            profile.report(0, step);
            let expected = if step == 1 { (1, 0.01) } else { (0, 0.0) };
            assert_eq!(
                (profile.window_steps, profile.window[Phase::Forward.index()]),
                expected,
                "step {step}: the line every 2 steps resets the window"
            );
        }
    }
}
