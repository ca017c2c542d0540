//! Starts the local workers and watches them: each worker runs in its own process group
//! with `PR_SET_PDEATHSIG=SIGKILL` (none survives a killed launcher), its stdout/stderr
//! lines reach the launcher prefixed `[rank N]` (and `--enable_each_rank_log` files), and
//! the first failure *by time* is reported with rank, host, pid, exit code or signal, the
//! worker's own error report and its last lines; failures that followed within a short
//! settling window are listed as consequences. Then the others get SIGTERM (and SIGCONT,
//! so that a stopped worker can act on it), then SIGKILL after the grace period.
//!
//! Hang detection reads the rendezvous heartbeat bookkeeping: workers send a
//! heartbeat every `--heartbeat_interval` carrying their last finished step. A rank is
//! hung when its heartbeats stop for `--heartbeat_timeout` (SIGSTOP, a frozen process, a
//! cut network), when heartbeats arrive but its step has not advanced for the same time
//! once it finished a first step (a stuck collective: the heartbeat thread lives on), or
//! when no first step finished within the startup allowance (model loading). Each beat
//! also says what the rank is doing (`step`, `collective op #seq`, `eval`, `save`,
//! `load`, `final_write`, `startup`, since when): `eval`/`save`/`load`/`final_write`
//! get the startup allowance instead of `--heartbeat_timeout` (and ranks waiting in a
//! collective meanwhile are not judged). The report (`classify_hang`) names the ranks
//! that missed heartbeats as the cause; when every rank beats, the ranks *not* in the
//! collective the others wait in are the cause and the waiters are consequences.
//! DeepSpeed's `launch.py`, for comparison, SIGTERMs all on the first non-zero exit and
//! SIGKILLs after 30 s, detects no hangs, and reports the last-spawned rank's command
//! rather than the failing rank's.

pub mod attempt;
pub mod lines;
pub mod python;
pub mod silence;

use crate::supervise::lines::lock;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::plan::RankPlan;
use crate::rendezvous::RendezvousState;
use crate::rendezvous::state::{ErrorRecord, HangKind, HangLimits, RankLiveness};

/// Output lines kept per rank for the failure report.
pub const TAIL_LINES: usize = 20;
/// Poll period of the watch loop: the resolution of the exit times that order failures.
const POLL: Duration = Duration::from_millis(10);
/// Longest wait for a dead worker's last output lines.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// After the first failure, how long the other workers may take to fail on their own
/// (a collective error on the survivors) before they are stopped: their failures are
/// then reported as consequences rather than hidden behind our SIGTERM.
pub const SETTLE: Duration = Duration::from_millis(1500);

/// A started worker process.
#[derive(Debug)]
pub struct Worker {
    pub rank: usize,
    pub host: String,
    pub pid: u32,
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
    /// Lines printed so far (stdout and stderr).
    lines: Arc<AtomicU64>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
    /// Unix ms of the last poll that found the worker running: it exited after that.
    alive_ms: u64,
}

impl Worker {
    /// The last output lines of this worker (stdout and stderr interleaved).
    pub fn tail(&self) -> Vec<String> {
        lock(&self.tail).iter().cloned().collect()
    }

    /// How many lines the worker has printed.
    pub fn lines_printed(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    fn poll(&mut self) -> std::io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            let now = unix_ms();
            self.status = self.child.try_wait()?;
            if self.status.is_none() {
                self.alive_ms = now;
            }
        }
        Ok(self.status)
    }

    /// Waits (bounded) for the output threads to drain what the worker printed; a
    /// grandchild still holding the pipes open must not hang the launcher.
    fn finish_output(&mut self) {
        let deadline = Instant::now() + OUTPUT_DRAIN;
        while Instant::now() < deadline && self.readers.iter().any(|r| !r.is_finished()) {
            std::thread::sleep(Duration::from_millis(5));
        }
        for reader in std::mem::take(&mut self.readers) {
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
    }
}

/// How one attempt of the job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every local worker exited 0.
    Success,
    /// A worker failed first; the report is ready to print.
    WorkerFailed {
        rank: usize,
        exit_code: i32,
        report: String,
        /// Unix ms of the failure (see `Failure::at_ms`): orders failures across nodes.
        at_ms: u64,
    },
    /// The launcher got SIGINT/SIGTERM/SIGHUP.
    Interrupted { signal: i32 },
    /// The rendezvous deadline passed; the message names who never arrived.
    JoinTimeout { message: String },
    /// Ranks stopped sending heartbeats or making steps; the report is ready to print.
    Hung { ranks: Vec<usize>, report: String },
    /// Ended from outside this node's workers (`SuperviseOptions::stop_source`): node 0
    /// stopped the attempt, or node 0 was lost. Never a reason to restart by itself.
    Stopped { reason: String, exit_code: i32 },
}

impl Outcome {
    /// The launcher's exit code for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Success => 0,
            Outcome::WorkerFailed { exit_code, .. } => *exit_code,
            Outcome::Interrupted { signal } => 128 + signal,
            Outcome::JoinTimeout { .. } | Outcome::Hung { .. } => 1,
            Outcome::Stopped { exit_code, .. } => *exit_code,
        }
    }
}

/// Set by the launcher's signal handler; read by the watch loop.
pub static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn remember_signal(signal: libc::c_int) {
    STOP_SIGNAL.store(signal, Ordering::SeqCst);
}

/// Routes SIGINT, SIGTERM and SIGHUP to `STOP_SIGNAL` so the launcher stops its workers.
pub fn install_stop_handlers() -> nix::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(remember_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action)? };
    }
    Ok(())
}

/// Options of one supervised attempt.
#[derive(Debug, Clone)]
pub struct SuperviseOptions {
    pub grace_period: Duration,
    /// `--heartbeat_timeout`; `None` turns hang detection off.
    pub heartbeat_timeout: Option<Duration>,
    /// The workers' heartbeat period: a rank whose last beat is older than three of
    /// these is named as the cause of a hang.
    pub heartbeat_interval: Duration,
    /// Longest time from a rank's first heartbeat to its first finished step.
    pub startup_timeout: Duration,
    /// Where `[rank N]` log files go (`--enable_each_rank_log`).
    pub rank_log_dir: Option<PathBuf>,
    /// Asked every poll whether something outside this node's workers ends the attempt
    /// (coordinated restarts across nodes); `None` outside of them.
    pub stop_source: Option<Arc<dyn StopSource>>,
    /// `--hang_timeout`: no line printed and no CPU used by any rank for this long ends
    /// the attempt as hung (`silence`); `None`: off.
    pub silence_timeout: Option<Duration>,
}

/// Something besides the local workers, a signal and the rendezvous that can end an
/// attempt: another node's failure seen by node 0, or node 0's word seen by a node.
pub trait StopSource: Send + Sync + std::fmt::Debug {
    /// `Some` once the attempt must end, with how it ended.
    fn stop_outcome(&self) -> Option<Outcome>;
}

/// Starts one worker per rank of `ranks` running `program`. Must be called from the
/// main thread: the parent-death signal fires when the *spawning thread* exits.
pub fn spawn_workers(
    program: &Path,
    ranks: &[&RankPlan],
    extra_env: &[(String, String)],
    rank_log_dir: Option<&Path>,
) -> std::io::Result<Vec<Worker>> {
    let stamp = utc_stamp(SystemTime::now());
    let mut workers = Vec::new();
    for plan in ranks {
        let log = match rank_log_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                Some(File::create(
                    dir.join(format!("{stamp}_rank{}.log", plan.rank)),
                )?)
            }
            None => None,
        };
        match spawn_one(program, plan, extra_env, log) {
            Ok(worker) => workers.push(worker),
            Err(e) => {
                stop_workers(&mut workers, Duration::from_secs(5));
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("cannot start {}: {e}", program.display()),
                ));
            }
        }
    }
    Ok(workers)
}

fn spawn_one(
    program: &Path,
    plan: &RankPlan,
    extra_env: &[(String, String)],
    log: Option<File>,
) -> std::io::Result<Worker> {
    let mut command = Command::new(program);
    command
        .args(&plan.args)
        .envs(plan.env.iter())
        .envs(extra_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let launcher_pid = std::process::id() as libc::pid_t;
    let cores = plan.cpu_cores.clone();
    // SAFETY: between fork and exec only async-signal-safe calls are made (prctl, getppid,
    // sched_setaffinity, _exit); `cores` was allocated before the fork.
    unsafe {
        command.pre_exec(move || {
            die_with_launcher(launcher_pid);
            if let Some(cores) = &cores {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                for &core in cores {
                    libc::CPU_SET(core, &mut set);
                }
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
    let lines = Arc::new(AtomicU64::new(0));
    let log = log.map(|f| Arc::new(Mutex::new(f)));
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(forward_lines(
            out,
            plan.rank,
            false,
            (tail.clone(), lines.clone()),
            log.clone(),
        ));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(forward_lines(
            err,
            plan.rank,
            true,
            (tail.clone(), lines.clone()),
            log,
        ));
    }
    Ok(Worker {
        rank: plan.rank,
        host: plan.host.clone(),
        pid: child.id(),
        child,
        tail,
        lines,
        readers,
        status: None,
        alive_ms: unix_ms(),
    })
}

/// In a child between fork and exec: asks the kernel to SIGKILL this process when the
/// launcher dies, and exits at once if the launcher already died before that took effect.
/// Only async-signal-safe calls (prctl, getppid, _exit), so it may run in `pre_exec`.
pub(crate) fn die_with_launcher(launcher_pid: libc::pid_t) {
    // SAFETY: plain syscalls on this process, no memory shared with the parent touched.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        if libc::getppid() != launcher_pid {
            libc::_exit(111);
        }
    }
}

/// Copies a worker stream line by line to the launcher's stdout/stderr with `[rank N]`,
/// into the rank's log file when there is one, and into its tail.
fn forward_lines(
    stream: impl Read + Send + 'static,
    rank: usize,
    to_stderr: bool,
    (tail, lines): (Arc<Mutex<VecDeque<String>>>, Arc<AtomicU64>),
    log: Option<Arc<Mutex<File>>>,
) -> JoinHandle<()> {
    let prefixed = move |line: &str| format!("[rank {rank}] {line}");
    crate::supervise::lines::forward(stream, to_stderr, prefixed, move |line| {
        if let Some(log) = &log {
            let _ = lock(log).write_all(format!("{line}\n").as_bytes());
        }
        lines.fetch_add(1, Ordering::Relaxed);
        let mut tail = lock(&tail);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.to_string());
    })
}

/// Watches `workers` until all succeed, one fails, the launcher is signalled, the
/// rendezvous times out or a rank hangs. After a failure it waits up to `SETTLE` for the
/// consequences, then reports the first failure by time. Does not stop anyone.
pub fn watch(
    workers: &mut [Worker],
    rendezvous: Option<&RendezvousState>,
    options: &SuperviseOptions,
) -> Outcome {
    let attempt_started_ms = unix_ms();
    let mut silence = options.silence_timeout.map(silence::SilenceWatch::new);
    loop {
        let signal = STOP_SIGNAL.load(Ordering::SeqCst);
        if signal != 0 {
            return Outcome::Interrupted { signal };
        }
        if let Some(outcome) = options.stop_source.as_ref().and_then(|s| s.stop_outcome()) {
            return outcome;
        }
        if let Some(outcome) = silence.as_mut().and_then(|s| s.check(workers)) {
            return outcome;
        }
        if let Some(state) = rendezvous
            && state.join_timed_out()
        {
            return Outcome::JoinTimeout {
                message: state.join_timeout_error().to_string(),
            };
        }
        let mut running = 0;
        for worker in workers.iter_mut() {
            match worker.poll() {
                Ok(Some(status)) if status.success() => {}
                Ok(Some(_)) => {
                    return settle_and_report(workers, rendezvous, options, attempt_started_ms);
                }
                Ok(None) => running += 1,
                Err(e) => {
                    return Outcome::WorkerFailed {
                        rank: worker.rank,
                        exit_code: 1,
                        report: format!(
                            "cannot wait for rank {} (pid {}): {e}",
                            worker.rank, worker.pid
                        ),
                        at_ms: unix_ms(),
                    };
                }
            }
        }
        if running == 0 {
            for worker in workers.iter_mut() {
                worker.finish_output();
            }
            return Outcome::Success;
        }
        if let (Some(state), Some(timeout)) = (rendezvous, options.heartbeat_timeout) {
            let limits = HangLimits {
                timeout,
                startup: options.startup_timeout.max(timeout),
            };
            let liveness = state.liveness(limits);
            if liveness.iter().any(|r| r.hung.is_some()) {
                return hang_outcome(&liveness, workers, options, timeout);
            }
        }
        std::thread::sleep(POLL);
    }
}

/// One failed rank of an attempt, as the supervisor saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub rank: usize,
    pub host: String,
    pub pid: u32,
    /// `None` for a rank of another node that only reported an error.
    pub status: Option<ExitStatus>,
    /// Unix ms of the failure: the earliest of its error report and the last poll that
    /// still saw it running.
    pub at_ms: u64,
    /// The worker's own error reports of this attempt, oldest first.
    pub reported: Vec<String>,
    /// Every report says the worker failed because another rank did (a broken
    /// collective, a rank it waited for gave up): never named the cause while a rank
    /// with its own error exists.
    pub caused_by_another_rank: bool,
    pub tail: Vec<String>,
}

impl Failure {
    /// Died of a signal without explaining itself (SIGKILL, SIGSEGV...): when two
    /// failures fall in the same poll period, such a death is the cause, since a worker
    /// that reports an error first noticed something (often this very death).
    fn abrupt(&self) -> bool {
        self.reported.is_empty() && self.status.is_some_and(|s| s.signal().is_some())
    }
}

/// Keeps polling (up to `SETTLE`) so that failures caused by the first one show up, then
/// builds the report naming the earliest failure. When every failure says another rank
/// caused it, the cause may be a node whose loss the stop source has not seen yet (a
/// killed remote launcher's ssh ends a little after its ranks' peers notice): it gets
/// up to `SETTLE` more to name that node.
fn settle_and_report(
    workers: &mut [Worker],
    rendezvous: Option<&RendezvousState>,
    options: &SuperviseOptions,
    attempt_started_ms: u64,
) -> Outcome {
    let deadline = Instant::now() + SETTLE;
    while Instant::now() < deadline && STOP_SIGNAL.load(Ordering::SeqCst) == 0 {
        let mut running = 0;
        for worker in workers.iter_mut() {
            running += usize::from(matches!(worker.poll(), Ok(None)));
        }
        if running == 0 {
            break;
        }
        std::thread::sleep(POLL);
    }
    let errors: Vec<ErrorRecord> = rendezvous
        .map(|s| s.errors_since(attempt_started_ms))
        .unwrap_or_default();
    let mut failures = Vec::new();
    for worker in workers.iter_mut() {
        let Some(status) = worker.status.filter(|s| !s.success()) else {
            continue;
        };
        worker.finish_output();
        let reports: Vec<&ErrorRecord> = errors.iter().filter(|e| e.rank == worker.rank).collect();
        let at_ms = reports
            .iter()
            .map(|e| e.time_ms)
            .fold(worker.alive_ms, u64::min);
        failures.push(Failure {
            rank: worker.rank,
            host: worker.host.clone(),
            pid: worker.pid,
            status: Some(status),
            at_ms,
            reported: reports.iter().map(|e| e.message.clone()).collect(),
            caused_by_another_rank: !reports.is_empty()
                && reports.iter().all(|e| e.caused_by_another_rank),
            tail: worker.tail(),
        });
    }
    failures.extend(remote_failures(workers, rendezvous, &errors));
    if failures.iter().all(|f| f.caused_by_another_rank)
        && let Some(outcome) = options
            .stop_source
            .as_deref()
            .and_then(wait_for_outside_cause)
    {
        return outcome;
    }
    order_by_time(&mut failures);
    let first = &failures[0];
    Outcome::WorkerFailed {
        rank: first.rank,
        exit_code: first.status.map_or(1, exit_code_of),
        report: failure_report(&failures),
        at_ms: first.at_ms,
    }
}

/// Polls `source` for up to `SETTLE`: the outcome it gives, if any.
fn wait_for_outside_cause(source: &dyn StopSource) -> Option<Outcome> {
    let deadline = Instant::now() + SETTLE;
    loop {
        if let Some(outcome) = source.stop_outcome() {
            return Some(outcome);
        }
        if Instant::now() >= deadline || STOP_SIGNAL.load(Ordering::SeqCst) != 0 {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// Ranks of other nodes that reported an error during this attempt (node 0 hosts the
/// rendezvous and sees every report).
fn remote_failures(
    workers: &[Worker],
    rendezvous: Option<&RendezvousState>,
    errors: &[ErrorRecord],
) -> Vec<Failure> {
    let mut failures: Vec<Failure> = Vec::new();
    for error in errors {
        if workers.iter().any(|w| w.rank == error.rank) {
            continue;
        }
        if let Some(known) = failures.iter_mut().find(|f| f.rank == error.rank) {
            known.reported.push(error.message.clone());
            known.at_ms = known.at_ms.min(error.time_ms);
            known.caused_by_another_rank &= error.caused_by_another_rank;
            continue;
        }
        let host = rendezvous
            .and_then(|s| s.spec().locate(error.rank).map(|(h, _, _)| h.to_string()))
            .unwrap_or_default();
        failures.push(Failure {
            rank: error.rank,
            host,
            pid: 0,
            status: None,
            at_ms: error.time_ms,
            reported: vec![error.message.clone()],
            caused_by_another_rank: error.caused_by_another_rank,
            tail: Vec::new(),
        });
    }
    failures
}

/// The cause first: failures of a rank's own (not `caused_by_another_rank`) before the
/// others, each group earliest first; within the same millisecond an abrupt death first.
pub fn order_by_time(failures: &mut [Failure]) {
    failures.sort_by_key(|f| (f.caused_by_another_rank, f.at_ms, !f.abrupt(), f.rank));
}

/// Exit code the launcher uses for a worker status: its code, or 128 + signal.
pub fn exit_code_of(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    }
}

/// How a worker ended, in words: `exit code 3` or `signal 9 (SIGKILL)` plus a hint.
pub fn describe_status(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit code {code}");
    }
    let Some(signal) = status.signal() else {
        return "an unknown status".into();
    };
    let name = Signal::try_from(signal)
        .map(|s| s.as_str())
        .unwrap_or("unknown signal");
    let hint = match signal {
        libc::SIGKILL => {
            " - SIGKILL usually comes from the kernel's OOM killer (check `dmesg`) or a manual kill -9"
        }
        libc::SIGSEGV => " - a segmentation fault (a native library crashed)",
        libc::SIGABRT => " - aborted (a native library assertion or panic=abort)",
        libc::SIGBUS => " - bus error (often a truncated memory-mapped file or full /dev/shm)",
        _ => "",
    };
    format!("signal {signal} ({name}){hint}")
}

/// The multi-line failure report printed by the launcher: the first of `failures` (in
/// time order) in full, the others as consequences.
pub fn failure_report(failures: &[Failure]) -> String {
    let Some(first) = failures.first() else {
        return "rsdeep: no failure to report\n".into();
    };
    let rank = first.rank;
    let how = first
        .status
        .map_or("reported an error".to_string(), describe_status);
    let pid = match first.pid {
        0 => String::new(),
        pid => format!(", pid {pid}"),
    };
    let mut out = format!(
        "rsdeep: rank {rank} failed first (host {}{pid}): {how}\n",
        first.host
    );
    for message in &first.reported {
        out.push_str(&format!("rsdeep: rank {rank} reported: {message}\n"));
    }
    if let Some(exception) = python::last_python_exception(&first.tail) {
        out.push_str(&format!("rsdeep: rank {rank} raised {exception}\n"));
        if exception.is_out_of_memory() {
            out.push_str(
                "rsdeep: hint: out of memory - lower the micro batch size, turn on gradient checkpointing, or use a higher ZeRO stage or offload\n",
            );
        }
    }
    if first.tail.is_empty() {
        out.push_str(&format!("rsdeep: rank {rank} printed nothing\n"));
    } else {
        out.push_str(&format!(
            "rsdeep: last {} line(s) of rank {rank}:\n",
            first.tail.len()
        ));
        for line in &first.tail {
            out.push_str(&format!("    {line}\n"));
        }
    }
    for then in &failures[1..] {
        out.push_str(&consequence_line(then, first));
    }
    out
}

/// `rsdeep: then: rank 0 (pid 7) exited with exit code 1, 0.012 s later (consequence): ...`
fn consequence_line(then: &Failure, first: &Failure) -> String {
    let how = then.status.map_or("reported an error".to_string(), |s| {
        format!("exited with {}", describe_status(s))
    });
    let later = then.at_ms.saturating_sub(first.at_ms) as f64 / 1000.0;
    let why = then
        .reported
        .first()
        .map(|m| format!(": {}", m.lines().next().unwrap_or_default()))
        .unwrap_or_default();
    format!(
        "rsdeep: then: rank {} (host {}, pid {}) {how}, {later:.3} s later (consequence of rank {}){why}\n",
        then.rank, then.host, then.pid, first.rank
    )
}

/// Which ranks of a hang are its cause and which wait for them (`classify_hang`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HangClasses {
    /// The hung ranks, in rank order.
    pub causes: Vec<usize>,
    /// Ranks waiting in the collective the causes never entered (or that simply stall
    /// behind them), in rank order.
    pub consequences: Vec<usize>,
}

/// Cause vs consequence of a hang. Ranks that missed heartbeats (`missed`) are the
/// cause. Otherwise, when every rank still beats: if some ranks wait in one collective
/// (the newest `op #seq` any rank is in), the ranks *not* in that collective (still in
/// their step, in an earlier collective, elsewhere) are the cause and the waiters the
/// consequence; with no such split every hung rank is a cause.
pub fn classify_hang(liveness: &[RankLiveness], missed: Duration) -> HangClasses {
    let silent: Vec<usize> = liveness
        .iter()
        .filter(|r| r.since_heartbeat > missed)
        .map(|r| r.rank)
        .collect();
    let split = |causes: Vec<usize>, waiting: &dyn Fn(&RankLiveness) -> bool| HangClasses {
        consequences: liveness
            .iter()
            .filter(|r| !causes.contains(&r.rank) && waiting(r))
            .map(|r| r.rank)
            .collect(),
        causes,
    };
    if !silent.is_empty() {
        return split(silent, &|r| {
            r.stepped && r.since_step > missed || in_collective(r)
        });
    }
    let awaited = liveness
        .iter()
        .filter_map(|r| r.phase.as_ref().filter(|p| p.in_collective()))
        .map(|p| (p.collective_seq, p.collective.clone()))
        .max();
    if let Some((seq, op)) = awaited {
        let in_awaited = |r: &RankLiveness| {
            r.phase
                .as_ref()
                .is_some_and(|p| p.in_collective() && p.collective_seq == seq && p.collective == op)
        };
        let outside: Vec<usize> = liveness
            .iter()
            .filter(|r| !in_awaited(r))
            .map(|r| r.rank)
            .collect();
        if !outside.is_empty() {
            return split(outside, &in_awaited);
        }
    }
    let hung: Vec<usize> = liveness
        .iter()
        .filter(|r| r.hung.is_some())
        .map(|r| r.rank)
        .collect();
    split(hung, &|_| false)
}

fn in_collective(rank: &RankLiveness) -> bool {
    rank.phase.as_ref().is_some_and(|p| p.in_collective())
}

/// The hung outcome: the causes (`classify_hang`) with their phase and last lines, then
/// the ranks waiting for them as consequences.
fn hang_outcome(
    liveness: &[RankLiveness],
    workers: &[Worker],
    options: &SuperviseOptions,
    timeout: Duration,
) -> Outcome {
    let missed = (options.heartbeat_interval * 3)
        .max(Duration::from_secs(1))
        .min(timeout);
    let classes = classify_hang(liveness, missed);
    let of = |rank: usize| liveness.iter().find(|r| r.rank == rank);
    let mut report = String::new();
    for cause in classes.causes.iter().filter_map(|&rank| of(rank)) {
        report.push_str(&hang_line(cause, workers, options, timeout));
        if let Some(worker) = workers.iter().find(|w| w.rank == cause.rank) {
            let tail = worker.tail();
            let shown = &tail[tail.len().saturating_sub(5)..];
            if !shown.is_empty() {
                report.push_str(&format!(
                    "rsdeep: last {} line(s) of rank {}:\n",
                    shown.len(),
                    cause.rank
                ));
            }
            for line in shown {
                report.push_str(&format!("    {line}\n"));
            }
        }
    }
    for other in classes.consequences.iter().filter_map(|&rank| of(rank)) {
        report.push_str(&waiting_line(other, workers, &classes.causes));
    }
    Outcome::Hung {
        ranks: classes.causes,
        report,
    }
}

/// `rsdeep: then: rank 0 (host h, pid 7): waiting in all_reduce #812 (step 3) since
/// 30.1 s (consequence of rank(s) [1])`
fn waiting_line(rank: &RankLiveness, workers: &[Worker], causes: &[usize]) -> String {
    let what = match &rank.phase {
        Some(phase) if phase.in_collective() => format!(
            "waiting in {} since {:.1} s",
            phase.describe(),
            phase.since.elapsed().as_secs_f64()
        ),
        _ => format!(
            "step {} has not advanced for {:.1} s",
            rank.last_step,
            rank.since_step.as_secs_f64()
        ),
    };
    format!(
        "rsdeep: then: rank {} (host {}, pid {}): {what} (consequence: waiting for rank(s) {causes:?})\n",
        rank.rank,
        rank.host,
        pid_of(rank, workers),
    )
}

/// `rsdeep: rank 1 is hung (host h, pid 7): no heartbeat for 3.2 s; last step 5, 3.9 s ago`
fn hang_line(
    rank: &RankLiveness,
    workers: &[Worker],
    options: &SuperviseOptions,
    timeout: Duration,
) -> String {
    let step = if rank.stepped {
        format!(
            "last step {}, finished {:.1} s ago",
            rank.last_step,
            rank.since_step.as_secs_f64()
        )
    } else {
        format!(
            "no step finished yet (last step {}), started {:.1} s ago",
            rank.last_step,
            rank.since_step.as_secs_f64()
        )
    };
    // `None`: named the cause because the others wait for it in a collective while it
    // beats, just before its own step crossed the timeout: a stalled step as well.
    let why = match rank.hung {
        Some(HangKind::StepStalled) | None => format!(
            "heartbeats arrive but the step has not advanced for {:.1} s (--heartbeat_timeout {:.1} s): a stuck collective or a step slower than the timeout",
            rank.since_step.as_secs_f64(),
            timeout.as_secs_f64()
        ),
        Some(HangKind::LongPhase) => format!(
            "in eval/save/load/final_write for longer than its allowance of {:.0} s (the startup allowance)",
            options.startup_timeout.max(timeout).as_secs_f64()
        ),
        Some(HangKind::NoFirstStep) => format!(
            "heartbeats arrive but no step finished within the startup allowance of {:.0} s",
            options.startup_timeout.max(timeout).as_secs_f64()
        ),
        Some(HangKind::Silent) => format!(
            "no heartbeat for {:.1} s (--heartbeat_timeout {:.1} s): stopped (SIGSTOP), frozen or cut off",
            rank.since_heartbeat.as_secs_f64(),
            timeout.as_secs_f64()
        ),
    };
    let phase = match &rank.phase {
        Some(phase) => format!(
            "; in {} for {:.1} s",
            phase.describe(),
            phase.since.elapsed().as_secs_f64()
        ),
        None => String::new(),
    };
    format!(
        "rsdeep: rank {} is hung (host {}, pid {}): {why}{phase}; {step}\n",
        rank.rank,
        rank.host,
        pid_of(rank, workers)
    )
}

/// The pid the rank joined with, else the local process the launcher started.
fn pid_of(rank: &RankLiveness, workers: &[Worker]) -> u32 {
    match rank.pid {
        0 => workers
            .iter()
            .find(|w| w.rank == rank.rank)
            .map_or(0, |w| w.pid),
        pid => pid,
    }
}

/// SIGTERMs every still-running worker's process group, waits up to `grace`, then
/// SIGKILLs what is left. Returns how many needed SIGKILL.
pub fn stop_workers(workers: &mut [Worker], grace: Duration) -> usize {
    signal_groups(workers, Signal::SIGTERM);
    // A stopped (SIGSTOP, hung) worker acts on SIGTERM only once continued.
    signal_groups(workers, Signal::SIGCONT);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && workers.iter_mut().any(|w| matches!(w.poll(), Ok(None))) {
        std::thread::sleep(POLL);
    }
    let mut stubborn = 0;
    for worker in workers.iter_mut() {
        stubborn += usize::from(matches!(worker.poll(), Ok(None)));
    }
    signal_groups(workers, Signal::SIGKILL);
    for worker in workers.iter_mut() {
        if worker.status.is_none() {
            worker.status = worker.child.wait().ok();
        }
        worker.finish_output();
    }
    stubborn
}

/// Sends `signal` to the process group of every worker whose group may still hold
/// processes (a group outlives its leader when the leader forked).
fn signal_groups(workers: &mut [Worker], signal: Signal) {
    for worker in workers.iter_mut() {
        let _ = killpg(Pid::from_raw(worker.pid as i32), signal);
    }
}

/// Milliseconds since the Unix epoch (the clock of the workers' error reports).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `YYYYmmddHHMMSS` in UTC (DeepSpeed's per-rank log file prefix).
pub fn utc_stamp(now: SystemTime) -> String {
    jiff::Timestamp::try_from(now)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .strftime("%Y%m%d%H%M%S")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn rank(rank: usize, script: &str) -> (RankPlan, Vec<(String, String)>) {
        let plan = RankPlan {
            rank,
            local_rank: rank,
            node_rank: 0,
            host: "localhost".into(),
            device_index: None,
            cpu_cores: None,
            env: BTreeMap::from([("RANK".to_string(), rank.to_string())]),
            args: Vec::new(),
        };
        (plan, vec![("SCRIPT".into(), script.into())])
    }

    fn options() -> SuperviseOptions {
        SuperviseOptions {
            grace_period: Duration::from_secs(2),
            heartbeat_timeout: None,
            heartbeat_interval: Duration::from_millis(100),
            startup_timeout: Duration::from_secs(600),
            rank_log_dir: None,
            stop_source: None,
            silence_timeout: None,
        }
    }

    /// Ends the attempt once `after` has passed.
    #[derive(Debug)]
    struct StopAfter(Instant);

    impl StopSource for StopAfter {
        fn stop_outcome(&self) -> Option<Outcome> {
            (Instant::now() >= self.0).then(|| Outcome::Stopped {
                reason: "node 0 stopped the attempt".into(),
                exit_code: 1,
            })
        }
    }

    #[test]
    fn a_stop_source_ends_the_watch_with_its_outcome() {
        let mut workers = spawn_sh(&["exec sleep 30"], None);
        let delay = Duration::from_millis(200);
        let options = SuperviseOptions {
            stop_source: Some(Arc::new(StopAfter(Instant::now() + delay))),
            ..options()
        };
        let started = Instant::now();
        let outcome = watch(&mut workers, None, &options);
        assert!(started.elapsed() >= delay);
        assert_eq!(
            outcome,
            Outcome::Stopped {
                reason: "node 0 stopped the attempt".into(),
                exit_code: 1
            }
        );
        assert_eq!(outcome.exit_code(), 1);
        assert!(workers[0].status.is_none(), "the watch stops nobody");
        stop_workers(&mut workers, Duration::from_secs(5));
    }

    /// A remote node's failure, seen `after` has passed.
    #[derive(Debug)]
    struct NodeLostAfter(Instant);

    impl StopSource for NodeLostAfter {
        fn stop_outcome(&self) -> Option<Outcome> {
            (Instant::now() >= self.0).then(|| Outcome::WorkerFailed {
                rank: 2,
                exit_code: 255,
                report: "node 1 failed".into(),
                at_ms: unix_ms(),
            })
        }
    }

    /// A rendezvous of one local rank that reports an error (at once) before it exits 1.
    fn rank_reporting(caused_by_another_rank: bool) -> RendezvousState {
        let spec = crate::rendezvous::state::WorldSpec {
            job_id: "job".into(),
            nodes: vec![("localhost".into(), 1), ("remote".into(), 2)],
            join_timeout: Duration::from_secs(5),
        };
        let state = RendezvousState::new(spec);
        state.record_error(ErrorRecord {
            rank: 0,
            message: "a collective broke".into(),
            time_ms: unix_ms() + 1000,
            caused_by_another_rank,
        });
        state
    }

    #[test]
    fn a_consequence_waits_for_a_node_loss_that_the_stop_source_sees_late() {
        let mut workers = spawn_sh(&["exit 1"], None);
        let state = rank_reporting(true);
        let options = SuperviseOptions {
            stop_source: Some(Arc::new(NodeLostAfter(Instant::now() + SETTLE))),
            ..options()
        };
        let outcome = watch(&mut workers, Some(&state), &options);
        let Outcome::WorkerFailed { rank, report, .. } = outcome else {
            panic!("expected a failure, got {outcome:?}");
        };
        assert_eq!((rank, report.as_str()), (2, "node 1 failed"));
    }

    #[test]
    fn a_rank_with_its_own_error_is_named_without_waiting_for_other_nodes() {
        let mut workers = spawn_sh(&["exit 1"], None);
        let state = rank_reporting(false);
        let options = SuperviseOptions {
            stop_source: Some(Arc::new(NodeLostAfter(Instant::now() + 2 * SETTLE))),
            ..options()
        };
        let started = Instant::now();
        let outcome = watch(&mut workers, Some(&state), &options);
        let Outcome::WorkerFailed { rank, report, .. } = outcome else {
            panic!("expected a failure, got {outcome:?}");
        };
        assert_eq!(rank, 0);
        assert!(report.contains("a collective broke"), "{report}");
        assert!(started.elapsed() < 2 * SETTLE);
    }

    static SCRIPTS: std::sync::LazyLock<tempfile::TempDir> =
        std::sync::LazyLock::new(|| tempfile::tempdir().unwrap());
    static NEXT_SCRIPT: AtomicI32 = AtomicI32::new(0);

    /// Each script becomes a small executable file run as the worker program.
    fn spawn_sh(scripts: &[&str], log_dir: Option<&Path>) -> Vec<Worker> {
        let mut workers = Vec::new();
        for (i, script) in scripts.iter().enumerate() {
            let (plan, env) = rank(i, script);
            let program = SCRIPTS
                .path()
                .join(format!("{}.sh", NEXT_SCRIPT.fetch_add(1, Ordering::SeqCst)));
            std::fs::write(&program, format!("#!/bin/sh\n{script}\n")).unwrap();
            std::fs::set_permissions(
                &program,
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .unwrap();
            let mut w = spawn_workers(&program, &[&plan], &env, log_dir).unwrap();
            workers.append(&mut w);
        }
        workers
    }

    #[test]
    fn all_zero_exits_are_success_and_output_is_kept() {
        let mut workers = spawn_sh(&["echo hello $RANK", "echo err >&2"], None);
        assert_eq!(watch(&mut workers, None, &options()), Outcome::Success);
        assert_eq!(workers[0].tail(), vec!["hello 0".to_string()]);
        assert_eq!(workers[1].tail(), vec!["err".to_string()]);
    }

    #[test]
    fn first_failure_is_reported_with_signal_and_last_lines_then_others_stop() {
        let mut workers = spawn_sh(&["exec sleep 30", "echo about to die; kill -9 $$"], None);
        let outcome = watch(&mut workers, None, &options());
        let Outcome::WorkerFailed {
            rank,
            exit_code,
            report,
            ..
        } = outcome
        else {
            panic!("expected a failure, got {outcome:?}");
        };
        assert_eq!((rank, exit_code), (1, 137));
        assert!(
            report.contains("rank 1 failed first (host localhost, pid"),
            "{report}"
        );
        assert!(report.contains("signal 9 (SIGKILL)"), "{report}");
        assert!(report.contains("OOM killer"), "{report}");
        assert!(report.contains("    about to die"), "{report}");
        let started = Instant::now();
        assert_eq!(stop_workers(&mut workers, Duration::from_secs(5)), 0);
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(
            workers[0].status.and_then(|s| s.signal()),
            Some(libc::SIGTERM)
        );
    }

    #[test]
    fn a_later_failure_is_listed_as_a_consequence_of_the_first() {
        let mut workers = spawn_sh(&["sleep 0.3; echo peer gone; exit 1", "kill -9 $$"], None);
        let outcome = watch(&mut workers, None, &options());
        let Outcome::WorkerFailed { rank, report, .. } = outcome else {
            panic!("expected a failure, got {outcome:?}");
        };
        assert_eq!(rank, 1, "{report}");
        assert!(report.contains("rank 1 failed first"), "{report}");
        assert!(
            report.contains("rsdeep: then: rank 0 (host localhost, pid")
                && report.contains("exited with exit code 1")
                && report.contains("(consequence of rank 1)"),
            "{report}"
        );
        stop_workers(&mut workers, Duration::from_secs(2));
    }

    #[test]
    fn a_ranks_own_error_is_the_cause_even_when_a_consequence_was_reported_earlier() {
        let failure = |rank: usize, at_ms: u64, message: &str, consequence: bool| Failure {
            rank,
            host: "h".into(),
            pid: 10 + rank as u32,
            status: Some(ExitStatus::from_raw(1 << 8)),
            at_ms,
            reported: vec![message.to_string()],
            caused_by_another_rank: consequence,
            tail: Vec::new(),
        };
        // Rank 1 gave up waiting on the publishing step before rank 0's ENOSPC surfaced.
        let mut failures = vec![
            failure(
                1,
                1000,
                "publishing the checkpoint failed on another rank",
                true,
            ),
            failure(
                0,
                1040,
                "writing model.safetensors: No space left on device",
                false,
            ),
        ];
        order_by_time(&mut failures);
        let report = failure_report(&failures);
        assert!(
            report.starts_with("rsdeep: rank 0 failed first (host h, pid 10): exit code 1"),
            "{report}"
        );
        assert!(report.contains("rank 0 reported: writing model.safetensors: No space left"));
        assert!(report.contains("(consequence of rank 0): publishing the checkpoint failed"));
        // With only consequences, time decides.
        let mut only = vec![
            failure(1, 1000, "all_reduce: rank 0 closed", true),
            failure(0, 990, "all_reduce: rank 1 closed", true),
        ];
        order_by_time(&mut only);
        assert_eq!(only[0].rank, 0);
    }

    #[test]
    fn failures_are_ordered_by_time_and_an_abrupt_death_wins_a_tie() {
        let failure = |rank: usize, at_ms: u64, status: i32, reported: &[&str]| Failure {
            rank,
            host: "h".into(),
            pid: 10 + rank as u32,
            status: Some(ExitStatus::from_raw(status)),
            at_ms,
            reported: reported.iter().map(|m| m.to_string()).collect(),
            caused_by_another_rank: false,
            tail: Vec::new(),
        };
        // Rank 0 reported a collective error in the same millisecond rank 2 was SIGKILLed.
        let mut failures = vec![
            failure(
                0,
                1000,
                1 << 8,
                &["all_reduce: rank 2 closed the connection"],
            ),
            failure(2, 1000, libc::SIGKILL, &[]),
            failure(1, 999, 3 << 8, &["out of data"]),
        ];
        order_by_time(&mut failures);
        let order: Vec<usize> = failures.iter().map(|f| f.rank).collect();
        assert_eq!(order, [1, 2, 0]);
        let report = failure_report(&failures[1..]);
        assert!(
            report.starts_with("rsdeep: rank 2 failed first (host h, pid 12): signal 9 (SIGKILL)"),
            "{report}"
        );
        assert!(report.contains("OOM killer"), "{report}");
        assert!(
            report.contains("then: rank 0 (host h, pid 10) exited with exit code 1, 0.000 s later (consequence of rank 2): all_reduce: rank 2 closed"),
            "{report}"
        );
    }

    #[test]
    fn a_worker_ignoring_sigterm_is_killed_after_the_grace_period() {
        let mut workers = spawn_sh(
            &["trap '' TERM; echo ready; while :; do sleep 0.05; done"],
            None,
        );
        while workers[0].tail().is_empty() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let started = Instant::now();
        assert_eq!(stop_workers(&mut workers, Duration::from_millis(300)), 1);
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(
            workers[0].status.and_then(|s| s.signal()),
            Some(libc::SIGKILL)
        );
    }

    #[test]
    fn exit_codes_and_per_rank_log_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut workers = spawn_sh(&["echo logged line; exit 3"], Some(dir.path()));
        let outcome = watch(&mut workers, None, &options());
        assert_eq!(outcome.exit_code(), 3);
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1);
        let name = files[0].file_name().unwrap().to_string_lossy().to_string();
        assert!(
            name.ends_with("_rank0.log") && name.len() == "YYYYmmddHHMMSS_rank0.log".len(),
            "{name}"
        );
        assert_eq!(std::fs::read_to_string(&files[0]).unwrap(), "logged line\n");
    }

    #[test]
    fn a_grandchild_holding_the_pipes_does_not_hang_the_report() {
        let mut workers = spawn_sh(&["sleep 30 & echo bye; exit 4"], None);
        let started = Instant::now();
        let outcome = watch(&mut workers, None, &options());
        assert_eq!(outcome.exit_code(), 4);
        assert!(started.elapsed() < OUTPUT_DRAIN + Duration::from_secs(2));
        stop_workers(&mut workers, Duration::from_secs(2));
        assert_eq!(workers[0].tail(), vec!["bye".to_string()]);
    }

    /// A rank that beats every 0.1 s, in `phase` (`"collective"` phases name `op #seq`),
    /// whose step has not advanced for `stalled_s`.
    fn beating(rank: usize, phase: &str, op: &str, seq: u64, stalled_s: f64) -> RankLiveness {
        let stalled = Duration::from_secs_f64(stalled_s);
        RankLiveness {
            rank,
            host: "h".into(),
            pid: 100 + rank as u32,
            last_step: 2,
            stepped: true,
            since_heartbeat: Duration::from_millis(100),
            since_step: stalled,
            phase: Some(crate::rendezvous::state::RankPhase::from_beat(
                phase, 3, op, seq, stalled_s,
            )),
            hung: (stalled_s > 3.0).then_some(HangKind::StepStalled),
        }
    }

    #[test]
    fn the_rank_outside_the_awaited_collective_is_the_cause() {
        let missed = Duration::from_millis(300);
        // Rank 1 never left step 3; ranks 0 and 2 wait in all_reduce #812.
        let ranks = [
            beating(0, "collective", "all_reduce", 812, 30.1),
            beating(1, "step", "", 811, 30.2),
            beating(2, "collective", "all_reduce", 812, 30.0),
        ];
        let classes = classify_hang(&ranks, missed);
        assert_eq!(classes.causes, vec![1]);
        assert_eq!(classes.consequences, vec![0, 2]);
        // A rank still in an earlier collective (#811) is the cause too.
        let ranks = [
            beating(0, "collective", "all_reduce", 812, 30.1),
            beating(1, "collective", "reduce_scatter", 811, 30.2),
        ];
        let classes = classify_hang(&ranks, missed);
        assert_eq!((classes.causes, classes.consequences), (vec![1], vec![0]));
    }

    #[test]
    fn silent_ranks_win_and_a_shared_collective_names_every_hung_rank() {
        let missed = Duration::from_millis(300);
        let mut silent = beating(1, "step", "", 5, 10.0);
        silent.since_heartbeat = Duration::from_secs(4);
        let ranks = [beating(0, "collective", "all_gather", 6, 10.0), silent];
        let classes = classify_hang(&ranks, missed);
        assert_eq!((classes.causes, classes.consequences), (vec![1], vec![0]));
        // Everyone in the same collective: no split, every hung rank is named.
        let ranks = [
            beating(0, "collective", "barrier", 9, 5.0),
            beating(1, "collective", "barrier", 9, 5.0),
        ];
        let classes = classify_hang(&ranks, missed);
        assert_eq!((classes.causes, classes.consequences), (vec![0, 1], vec![]));
    }

    /// The hung ranks and report `hang_outcome` gives for `ranks` with a 3 s timeout.
    fn hung_ranks_and_report(ranks: &[RankLiveness]) -> (Vec<usize>, String) {
        match hang_outcome(ranks, &[], &options(), Duration::from_secs(3)) {
            Outcome::Hung { ranks, report } => (ranks, report),
            _ => panic!("not a hang outcome"),
        }
    }

    #[test]
    fn the_hang_report_names_cause_phase_and_waiting_collective() {
        let ranks = [
            beating(0, "collective", "all_reduce", 812, 30.1),
            beating(1, "step", "", 811, 30.2),
        ];
        let (ranks, report) = hung_ranks_and_report(&ranks);
        assert_eq!(ranks, vec![1]);
        assert!(
            report.contains("rank 1 is hung (host h, pid 101)")
                && report.contains("in step 3 (not in a collective) for 30.")
                && report.contains("last step 2"),
            "{report}"
        );
        assert!(
            report.contains(
                "rank 0 (host h, pid 100): waiting in all_reduce #812 (step 3) since 30."
            ) && report.contains("consequence"),
            "{report}"
        );
    }

    /// The waiter's step crossed the timeout first (it finished step 2 a moment earlier):
    /// the rank it waits for is named the cause while its own step is just under the
    /// timeout, and is still described as stalled, never as silent.
    #[test]
    fn a_cause_just_under_the_timeout_is_reported_as_stalled_not_silent() {
        let ranks = [
            beating(0, "collective", "reduce_scatter", 162, 3.05),
            beating(1, "step", "", 161, 2.99),
        ];
        assert_eq!(ranks[1].hung, None);
        let (ranks, report) = hung_ranks_and_report(&ranks);
        assert_eq!(ranks, vec![1]);
        assert!(
            report.contains(
                "rank 1 is hung (host h, pid 101): heartbeats arrive but the step has not advanced"
            ),
            "{report}"
        );
        assert!(!report.contains("no heartbeat"), "{report}");
    }

    #[test]
    fn utc_stamp_matches_known_dates() {
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101000000");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096); // 2024-02-29 12:34:56 UTC
        assert_eq!(utc_stamp(t), "20240229123456");
    }
}
