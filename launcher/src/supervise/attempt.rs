//! One attempt of a job, the pieces both launch modes share (`launch/` for one node and
//! the ssh runner, `nodes/coordinate/follow.rs` for SLURM nodes that node 0 coordinates):
//! starting this node's workers, the supervisor's settings, what to do once an attempt has
//! ended, where a restart resumes, and the lines the launcher prints about it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::plan::LaunchPlan;
use crate::rendezvous::{RendezvousState, WorldSpec};
use crate::supervise::{self, Outcome, SuperviseOptions};
use anyhow::{Context, Result};
use rsdeep_contract::env as ev;

/// Longest time from a rank's first heartbeat to its first finished step (model
/// loading, data preparation, resume) before it counts as hung; never shorter than
/// `--heartbeat_timeout`.
const STARTUP_ALLOWANCE: Duration = Duration::from_secs(900);

/// Starts this node's workers for restart `attempt` (`RSDEEP_RESTART_COUNT`) and says so.
pub(crate) fn spawn_local_workers(
    program: &Path,
    local: &[&crate::plan::RankPlan],
    attempt: u32,
    plan: &LaunchPlan,
) -> Result<Vec<supervise::Worker>> {
    let extra = vec![(ev::RESTART_COUNT.to_string(), attempt.to_string())];
    let workers = supervise::spawn_workers(program, local, &extra, plan.rank_log_dir.as_deref())?;
    let (what, port_role) = match plan.program.user() {
        Some(user) => (
            format!("rank(s) of `{}`", user.render(0)),
            "MASTER_ADDR:PORT",
        ),
        None => ("worker(s)".to_string(), "rendezvous"),
    };
    eprintln!(
        "rsdeep: job {} started {} {what} on node {} (world size {}, {port_role} {}:{})",
        plan.job_id,
        workers.len(),
        plan.node_rank,
        plan.world_size(),
        plan.master_addr,
        plan.master_port
    );
    Ok(workers)
}

/// The supervisor's settings from the plan (no stop source).
pub(crate) fn supervise_options(plan: &LaunchPlan) -> SuperviseOptions {
    SuperviseOptions {
        grace_period: plan.grace_period,
        heartbeat_timeout: plan.heartbeat_timeout,
        heartbeat_interval: plan.heartbeat_interval,
        startup_timeout: STARTUP_ALLOWANCE,
        rank_log_dir: plan.rank_log_dir.clone(),
        stop_source: None,
        silence_timeout: plan.silence_timeout,
    }
}

/// What the deciding launcher does once attempt `attempt` (0-based) has ended and every
/// worker of it is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterAttempt {
    /// Success, a signal, or a failure with restarts off: exit with this code.
    Exit(i32),
    /// A failure after all `--max_restarts` restarts: exit with the failure's code.
    GiveUp(i32),
    /// A failure with restarts left: new generation, start everything again.
    Restart,
}

pub(crate) fn after_attempt(outcome: &Outcome, attempt: u32, max_restarts: u32) -> AfterAttempt {
    let failed = matches!(
        outcome,
        Outcome::WorkerFailed { .. } | Outcome::Hung { .. } | Outcome::JoinTimeout { .. }
    );
    match (failed, max_restarts) {
        (false, _) | (true, 0) => AfterAttempt::Exit(outcome.exit_code()),
        _ if attempt >= max_restarts => AfterAttempt::GiveUp(outcome.exit_code()),
        _ => AfterAttempt::Restart,
    }
}

/// Where the restarted workers will resume, as far as the launcher can tell: the newest
/// checkpoint this job wrote in the resolved config's `output_dir` (the worker applies the
/// same rule, `output_dir::newest_checkpoint_of_run`).
pub(crate) fn resume_point(plan: &LaunchPlan) -> String {
    let Some(output_dir) = &plan.output_dir else {
        return "starting the workers again".into();
    };
    match rsdeep_contract::checkpoint_dir::newest_checkpoint_of_run(output_dir, &plan.job_id) {
        Some((step, _)) => format!(
            "resuming from checkpoint-{step} (this run's newest complete checkpoint in {})",
            output_dir.display()
        ),
        None => format!(
            "no complete checkpoint of this run in {} yet: starting as configured",
            output_dir.display()
        ),
    }
}

/// The rendezvous world of `plan`: its job id, every node's host and rank count, the join
/// timeout.
pub(crate) fn world_spec(plan: &LaunchPlan) -> WorldSpec {
    WorldSpec {
        job_id: plan.job_id.clone(),
        nodes: plan
            .nodes
            .iter()
            .map(|n| (n.host.clone(), n.slots.len()))
            .collect(),
        join_timeout: plan.join_timeout,
    }
}

/// Says how an elastic job's world changed (`old` → `new`) before restart `attempt` on it.
pub(crate) fn announce_regroup(old: &LaunchPlan, new: &LaunchPlan, attempt: u32) {
    let hosts =
        |plan: &LaunchPlan| -> Vec<String> { plan.nodes.iter().map(|n| n.host.clone()).collect() };
    let (before, after) = (hosts(old), hosts(new));
    let only_in = |these: &[String], not: &[String]| -> String {
        let only: Vec<&str> = these
            .iter()
            .filter(|h| !not.contains(h))
            .map(String::as_str)
            .collect();
        only.join(", ")
    };
    let mut change = String::new();
    let lost = only_in(&before, &after);
    if !lost.is_empty() {
        change.push_str(&format!(", without {lost}"));
    }
    let back = only_in(&after, &before);
    if !back.is_empty() {
        change.push_str(&format!(", {back} rejoining"));
    }
    eprintln!(
        "rsdeep: elastic: restarting the job ({attempt}/{}) on {} node(s) ({}), world size {} (was {}){change}: {}",
        new.max_restarts,
        after.len(),
        after.join(", "),
        new.world_size(),
        old.world_size(),
        resume_point(new)
    );
}

/// Prints, once, how long after the launcher started the whole world had joined.
pub(crate) fn announce_world(
    runtime: &tokio::runtime::Runtime,
    state: Arc<RendezvousState>,
    started: Instant,
) {
    runtime.spawn(async move {
        if let Ok(world) = state.wait_for_world().await {
            eprintln!(
                "rsdeep: rendezvous complete: {} rank(s) joined generation {} in {:.1} ms after launcher start",
                world.members.len(),
                world.generation,
                started.elapsed().as_secs_f64() * 1e3
            );
        }
    });
}

pub(crate) fn report_outcome(outcome: &Outcome, local_workers: usize, plan: &LaunchPlan) {
    let grace = plan.grace_period.as_secs_f64();
    match outcome {
        Outcome::Success => eprintln!("rsdeep: all {local_workers} worker(s) exited 0"),
        Outcome::WorkerFailed { report, .. } => {
            eprint!("{report}");
            eprintln!("rsdeep: stopping the other workers (SIGTERM, SIGKILL after {grace}s)");
        }
        Outcome::Interrupted { signal } => {
            eprintln!(
                "rsdeep: received signal {signal}, stopping every worker (SIGKILL after {grace}s)"
            )
        }
        Outcome::JoinTimeout { message } => eprintln!("rsdeep: {message}"),
        Outcome::Hung { report, .. } => {
            eprint!("{report}");
            eprintln!(
                "rsdeep: stopping every worker as hung (SIGTERM and SIGCONT, SIGKILL after {grace}s)"
            );
        }
        Outcome::Stopped { reason, .. } => eprintln!("rsdeep: {reason}"),
    }
}

/// What every rank runs: the user's program (found on PATH by the OS when it has no
/// folder), else rsdeep's worker.
pub fn rank_program(plan: &LaunchPlan) -> Result<PathBuf> {
    match plan.program.user() {
        Some(user) => Ok(PathBuf::from(&user.executable)),
        None => worker_program(),
    }
}

/// `RSDEEP_WORKER_BIN`, else `rsdeep-worker` next to this executable.
pub fn worker_program() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(ev::WORKER_BIN) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("cannot locate the rsdeep executable")?;
    let sibling = exe.with_file_name("rsdeep-worker");
    anyhow::ensure!(
        sibling.exists(),
        "worker binary {} not found (build it with `cargo build -p rsdeep-worker` or set RSDEEP_WORKER_BIN)",
        sibling.display()
    );
    Ok(sibling)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_restart_until_the_count_is_used_and_signals_never_do() {
        let failed = Outcome::WorkerFailed {
            rank: 3,
            exit_code: 137,
            report: String::new(),
            at_ms: 0,
        };
        assert_eq!(after_attempt(&failed, 0, 2), AfterAttempt::Restart);
        assert_eq!(after_attempt(&failed, 1, 2), AfterAttempt::Restart);
        assert_eq!(after_attempt(&failed, 2, 2), AfterAttempt::GiveUp(137));
        assert_eq!(after_attempt(&failed, 0, 0), AfterAttempt::Exit(137));
        let hung = Outcome::Hung {
            ranks: vec![1],
            report: String::new(),
        };
        assert_eq!(after_attempt(&hung, 0, 1), AfterAttempt::Restart);
        let join = Outcome::JoinTimeout {
            message: String::new(),
        };
        assert_eq!(after_attempt(&join, 1, 1), AfterAttempt::GiveUp(1));
        let signal = Outcome::Interrupted {
            signal: libc::SIGTERM,
        };
        assert_eq!(after_attempt(&signal, 0, 3), AfterAttempt::Exit(143));
        let stopped = Outcome::Stopped {
            reason: String::new(),
            exit_code: 1,
        };
        assert_eq!(after_attempt(&stopped, 0, 3), AfterAttempt::Exit(1));
        assert_eq!(
            after_attempt(&Outcome::Success, 0, 3),
            AfterAttempt::Exit(0)
        );
    }
}
