//! Drives a job that pdsh or mpirun starts on every node (`nodes::fanout`): runs the
//! runner program in its own process group (SIGKILLed with this launcher), relays its
//! output, and ends the attempt when it exits, when a node is reported failed (by pdsh,
//! or by that node's launcher under mpirun; the other nodes are then stopped: pdsh ends
//! and every remote stdin closes, or mpirun passes SIGTERM on; each node's launcher
//! stops its ranks), or when this launcher gets SIGINT/SIGTERM/SIGHUP (passed to
//! the runner, SIGKILL after the grace period). Restarts the whole job under
//! `--max_restarts`. Binary code: errors are `anyhow`.

use std::os::unix::process::CommandExt;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::nodes::fanout::{FanOutKind, FanOutLaunch};
use crate::nodes::{mpi, pdsh};
use crate::supervise::lines::lock;
use crate::supervise::{self, STOP_SIGNAL};

const POLL: Duration = Duration::from_millis(20);
/// Extra time, after the grace period, for the runner to stop every node.
const STOP_MARGIN: Duration = Duration::from_secs(5);
/// Before a pdsh restart: pdsh ends as soon as its ssh sessions do, while each remote
/// launcher still stops its ranks; the next attempt waits this long for their ports.
const PDSH_RESTART_PAUSE: Duration = Duration::from_secs(3);

/// A node reported as failed (by pdsh, or by its own launcher under mpirun): its host
/// and exit code.
type FailedNode = Arc<Mutex<Option<(String, i32)>>>;

/// How the watch of one attempt ended.
enum WatchEnd {
    /// The runner exited by itself.
    Exited(ExitStatus),
    /// A node was reported failed; every node was stopped. Its exit code.
    NodeFailed(i32),
    /// This launcher was signalled; every node was stopped.
    Interrupted(i32),
}

/// Runs every attempt of the job; returns the launcher's exit code.
pub fn drive(launch: &FanOutLaunch, max_restarts: u32, grace: Duration) -> Result<i32> {
    for attempt in 0..=max_restarts {
        let code = run_attempt(launch, attempt, grace)?;
        if code == 0 {
            eprintln!("rsdeep: every node finished");
            return Ok(0);
        }
        if STOP_SIGNAL.load(Ordering::SeqCst) != 0 {
            return Ok(code);
        }
        if attempt == max_restarts {
            if max_restarts > 0 {
                eprintln!(
                    "rsdeep: giving up: all {max_restarts} restart(s) used; the last failure is reported above"
                );
            }
            return Ok(code);
        }
        eprintln!(
            "rsdeep: restarting the job on every node ({}/{max_restarts})",
            attempt + 1
        );
        if launch.kind == FanOutKind::Pdsh {
            std::thread::sleep(PDSH_RESTART_PAUSE.min(grace));
        }
    }
    Ok(1)
}

/// One start of every node, until the runner exits; returns the attempt's exit code.
fn run_attempt(launch: &FanOutLaunch, attempt: u32, grace: Duration) -> Result<i32> {
    let runner = launch.kind.program();
    let mut command = launch.command(attempt);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .process_group(0);
    let launcher_pid = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            supervise::die_with_launcher(launcher_pid);
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "{runner} is not installed here (not on PATH): {}, or use --launcher ssh with the same hostfile (rsdeep's own runner needs only ssh)",
            launch.kind.install_hint()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot start {runner}")),
    };
    let failed_node = FailedNode::default();
    let relay = relay_stderr(&mut child, launch.kind, failed_node.clone());
    let end = watch(&mut child, launch, &failed_node, grace)?;
    if let Some(relay) = relay {
        let _ = relay.join();
    }
    Ok(match end {
        WatchEnd::Interrupted(signal) => 128 + signal,
        WatchEnd::NodeFailed(code) => code,
        // pdsh -S exits with the largest code of any node; the first reported is the cause.
        WatchEnd::Exited(status) => match lock(&failed_node).take() {
            Some((_, code)) => code,
            None => supervise::exit_code_of(status),
        },
    })
}

/// Copies the runner's stderr to this launcher's, noting the first node reported failed.
fn relay_stderr(
    child: &mut Child,
    kind: FanOutKind,
    failed_node: FailedNode,
) -> Option<JoinHandle<()>> {
    let stderr = child.stderr.take()?;
    Some(supervise::lines::forward(
        stderr,
        true,
        |line| line.to_string(),
        move |line| {
            let failure = match kind {
                FanOutKind::Pdsh => pdsh::node_failure(line),
                FanOutKind::Mpi(..) => mpi::node_failure(line),
            };
            if let Some(failure) = failure {
                lock(&failed_node).get_or_insert(failure);
            }
        },
    ))
}

/// Waits for the runner to exit; stops it on a signal or a failed node.
fn watch(
    child: &mut Child,
    launch: &FanOutLaunch,
    failed_node: &FailedNode,
    grace: Duration,
) -> Result<WatchEnd> {
    loop {
        if let Some(status) = child.try_wait().context("cannot wait for the runner")? {
            return Ok(WatchEnd::Exited(status));
        }
        let signal = STOP_SIGNAL.load(Ordering::SeqCst);
        if signal != 0 {
            eprintln!("rsdeep: signal {signal}: stopping every node");
            stop(child, grace);
            return Ok(WatchEnd::Interrupted(signal));
        }
        let failure = lock(failed_node).clone();
        if let Some((host, code)) = failure {
            let node = launch
                .node_of(&host)
                .map_or(String::new(), |n| format!("node {n} "));
            eprintln!(
                "rsdeep: {node}({host}) failed with exit code {code} (its report is above): stopping every node"
            );
            stop(child, grace);
            return Ok(WatchEnd::NodeFailed(code));
        }
        std::thread::sleep(POLL);
    }
}

/// SIGTERM to the runner (pdsh ends its ssh sessions, so every remote launcher sees its
/// stdin close; mpirun passes it to every node), then SIGKILL to its process group once
/// the grace period and a margin have passed.
fn stop(child: &mut Child, grace: Duration) {
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + grace + STOP_MARGIN;
    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(POLL);
    }
    let _ = killpg(pid, Signal::SIGKILL);
    let _ = child.wait();
}
