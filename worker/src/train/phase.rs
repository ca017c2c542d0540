//! What this worker is doing right now, for heartbeats: a process-wide phase
//! cell the training thread and the communicator update and the heartbeat thread reads.
//! Contract: the `phase*`/`collective*` fields of `HeartbeatRequest` in
//! `proto/proto/rendezvous.proto`; the launcher's hang rule is in `launcher/src/supervisor.rs`.
//!
//! The hot path takes no lock: one atomic store packs the phase, the collective and since
//! when (milliseconds since the process's first phase change); the step and the collective
//! sequence number live in their own atomics. A reader may see the step of one update
//! with the phase of the next; for a report that is read every second that is harmless.
//!
//! Also here: `PhasedCommunicator`, which marks every collective (issue and wait) as the
//! `collective` phase with a per-rank sequence number, and the test-only fault hook
//! `RSDEEP_FAULT_INJECT=stall_before_collective:rank=R:step=S` (see `FaultInjection`).

use crate::comm::trace::TraceRecorder;
use crate::comm::{Communicator, ReduceOp, Work};
use crate::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tch::Tensor;

/// What the worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PhaseKind {
    Startup = 0,
    Step = 1,
    Collective = 2,
    Eval = 3,
    Save = 4,
    Load = 5,
    FinalWrite = 6,
}

impl PhaseKind {
    const ALL: [PhaseKind; 7] = [
        PhaseKind::Startup,
        PhaseKind::Step,
        PhaseKind::Collective,
        PhaseKind::Eval,
        PhaseKind::Save,
        PhaseKind::Load,
        PhaseKind::FinalWrite,
    ];

    /// The name on the wire (`HeartbeatRequest.phase`).
    pub fn name(self) -> &'static str {
        match self {
            PhaseKind::Startup => "startup",
            PhaseKind::Step => "step",
            PhaseKind::Collective => "collective",
            PhaseKind::Eval => "eval",
            PhaseKind::Save => "save",
            PhaseKind::Load => "load",
            PhaseKind::FinalWrite => "final_write",
        }
    }
}

/// Which collective a rank is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CollectiveOp {
    None = 0,
    AllReduce = 1,
    ReduceScatter = 2,
    AllGather = 3,
    Broadcast = 4,
    Barrier = 5,
}

impl CollectiveOp {
    const ALL: [CollectiveOp; 6] = [
        CollectiveOp::None,
        CollectiveOp::AllReduce,
        CollectiveOp::ReduceScatter,
        CollectiveOp::AllGather,
        CollectiveOp::Broadcast,
        CollectiveOp::Barrier,
    ];

    /// The name on the wire (`HeartbeatRequest.collective`); empty for `None`.
    pub fn name(self) -> &'static str {
        match self {
            CollectiveOp::None => "",
            CollectiveOp::AllReduce => "all_reduce",
            CollectiveOp::ReduceScatter => "reduce_scatter",
            CollectiveOp::AllGather => "all_gather",
            CollectiveOp::Broadcast => "broadcast",
            CollectiveOp::Barrier => "barrier",
        }
    }
}

/// kind (bits 56..64) | collective (bits 48..56) | since, ms after `epoch()` (bits 0..48).
static CELL: AtomicU64 = AtomicU64::new(0);
/// The step the phase belongs to (the step in progress).
static STEP: AtomicU64 = AtomicU64::new(0);
/// Collectives issued by this process so far; the current one's number.
static COLLECTIVE_SEQ: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 & ((1 << 48) - 1)
}

fn pack(kind: PhaseKind, op: CollectiveOp, since_ms: u64) -> u64 {
    ((kind as u64) << 56) | ((op as u64) << 48) | since_ms
}

fn store(kind: PhaseKind, op: CollectiveOp) -> u64 {
    CELL.swap(pack(kind, op, now_ms()), Ordering::Relaxed)
}

/// What the heartbeat thread reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PhaseSnapshot {
    pub kind: PhaseKind,
    pub step: u64,
    pub collective: CollectiveOp,
    pub collective_seq: u64,
    /// How long the worker has been in this phase.
    pub for_secs: f64,
}

/// Reads the current phase (lock-free).
pub fn snapshot() -> PhaseSnapshot {
    let cell = CELL.load(Ordering::Relaxed);
    let kind = PhaseKind::ALL
        .get((cell >> 56) as usize)
        .copied()
        .unwrap_or(PhaseKind::Startup);
    let collective = CollectiveOp::ALL
        .get(((cell >> 48) & 0xff) as usize)
        .copied()
        .unwrap_or(CollectiveOp::None);
    let since_ms = cell & ((1 << 48) - 1);
    PhaseSnapshot {
        kind,
        step: STEP.load(Ordering::Relaxed),
        collective,
        collective_seq: COLLECTIVE_SEQ.load(Ordering::Relaxed),
        for_secs: now_ms().saturating_sub(since_ms) as f64 / 1000.0,
    }
}

/// Marks the start of optimizer step `step` (forward, backward, optimizer).
pub fn begin_step(step: u64) {
    STEP.store(step, Ordering::Relaxed);
    store(PhaseKind::Step, CollectiveOp::None);
}

/// Enters `kind` (eval, save, load, final_write) until the guard drops, then restores
/// the phase that was current before.
pub fn enter(kind: PhaseKind) -> PhaseGuard {
    PhaseGuard {
        previous: store(kind, CollectiveOp::None),
    }
}

/// Restores the previous phase (keeping its original "since") on drop.
#[must_use = "the phase ends when the guard drops"]
pub struct PhaseGuard {
    previous: u64,
}

impl Drop for PhaseGuard {
    fn drop(&mut self) {
        CELL.store(self.previous, Ordering::Relaxed);
    }
}

/// Enters collective `op` number `seq` until the guard drops.
fn enter_collective(op: CollectiveOp, seq: u64) -> PhaseGuard {
    COLLECTIVE_SEQ.store(seq, Ordering::Relaxed);
    PhaseGuard {
        previous: store(PhaseKind::Collective, op),
    }
}

/// The test-only fault hook: `RSDEEP_FAULT_INJECT=stall_before_collective:rank=R:step=S`
/// makes rank R sleep forever right before its first collective of step S (its
/// heartbeat thread keeps beating), in the first generation only (`RSDEEP_RESTART_COUNT`
/// 0), so a restarted job runs clean. Never active unless the variable is set; a
/// malformed value is refused at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultInjection {
    pub rank: usize,
    pub step: u64,
}

/// The fault hook's environment variable.
pub const FAULT_INJECT_ENV: &str = rsdeep_contract::env::FAULT_INJECT;

impl FaultInjection {
    /// Parses `stall_before_collective:rank=R:step=S`.
    pub fn parse(text: &str) -> Result<FaultInjection> {
        let malformed = || {
            Error::Config(format!(
                "{FAULT_INJECT_ENV}={text:?} is malformed: expected stall_before_collective:rank=R:step=S (a test-only fault hook; unset it for real runs)"
            ))
        };
        let mut parts = text.trim().split(':');
        if parts.next() != Some("stall_before_collective") {
            return Err(malformed());
        }
        let (mut rank, mut step) = (None, None);
        for part in parts {
            let (key, value) = part.split_once('=').ok_or_else(malformed)?;
            match key {
                "rank" if rank.is_none() => rank = Some(value.parse().map_err(|_| malformed())?),
                "step" if step.is_none() => step = Some(value.parse().map_err(|_| malformed())?),
                _ => return Err(malformed()),
            }
        }
        match (rank, step) {
            (Some(rank), Some(step)) if step > 0 => Ok(FaultInjection { rank, step }),
            _ => Err(malformed()),
        }
    }

    /// The hook for this process: `None` unless the variable is set, this is the first
    /// generation, and the rank matches.
    pub fn from_env(rank: usize, restart_count: u32) -> Result<Option<FaultInjection>> {
        let Ok(text) = std::env::var(FAULT_INJECT_ENV) else {
            return Ok(None);
        };
        let fault = FaultInjection::parse(&text)?;
        eprintln!(
            "[rank {rank}] {FAULT_INJECT_ENV}={text}: test fault hook armed for rank {} step {} (first generation only)",
            fault.rank, fault.step
        );
        Ok((fault.rank == rank && restart_count == 0).then_some(fault))
    }
}

/// A communicator that reports every collective as the `collective` phase (while it is
/// issued and while it is waited for) and runs the fault hook before each.
pub struct PhasedCommunicator {
    inner: Arc<dyn Communicator>,
    fault: Option<FaultInjection>,
}

impl PhasedCommunicator {
    pub fn new(inner: Arc<dyn Communicator>, fault: Option<FaultInjection>) -> Self {
        PhasedCommunicator { inner, fault }
    }

    /// Stalls forever when the fault hook targets the step in progress.
    fn before_collective(&self) {
        let Some(fault) = self.fault else { return };
        if STEP.load(Ordering::Relaxed) == fault.step
            && CELL.load(Ordering::Relaxed) >> 56 == PhaseKind::Step as u64
        {
            eprintln!(
                "[rank {}] {FAULT_INJECT_ENV}: stalling before a collective of step {} (test fault)",
                self.inner.rank(),
                fault.step
            );
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }

    /// Runs `issue` as collective `op`, and waits for it in the same phase.
    fn phased(&self, op: CollectiveOp, issue: impl FnOnce() -> Result<Work>) -> Result<Work> {
        self.before_collective();
        let seq = COLLECTIVE_SEQ.load(Ordering::Relaxed) + 1;
        let work = {
            let _phase = enter_collective(op, seq);
            issue()?
        };
        Ok(Work::new(move || {
            let _phase = enter_collective(op, seq);
            work.wait()
        }))
    }
}

impl Communicator for PhasedCommunicator {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<Work> {
        self.phased(CollectiveOp::AllReduce, || {
            self.inner.all_reduce(tensor, op)
        })
    }

    fn reduce_scatter(&self, input: &Tensor, output: &Tensor, op: ReduceOp) -> Result<Work> {
        self.phased(CollectiveOp::ReduceScatter, || {
            self.inner.reduce_scatter(input, output, op)
        })
    }

    fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<Work> {
        self.phased(CollectiveOp::AllGather, || {
            self.inner.all_gather(input, output)
        })
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Work> {
        self.phased(CollectiveOp::Broadcast, || {
            self.inner.broadcast(tensor, root)
        })
    }

    fn barrier(&self) -> Result<()> {
        self.before_collective();
        let seq = COLLECTIVE_SEQ.load(Ordering::Relaxed) + 1;
        let _phase = enter_collective(CollectiveOp::Barrier, seq);
        self.inner.barrier()
    }

    fn trace(&self) -> &TraceRecorder {
        self.inner.trace()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_hook_parses_and_refuses_malformed_values() {
        assert_eq!(
            FaultInjection::parse("stall_before_collective:rank=1:step=3").ok(),
            Some(FaultInjection { rank: 1, step: 3 })
        );
        for bad in [
            "",
            "stall_before_collective",
            "stall_before_collective:rank=1",
            "stall_before_collective:rank=x:step=3",
            "stall_before_collective:rank=1:step=0",
            "stall_before_collective:rank=1:step=3:extra=2",
            "crash:rank=1:step=3",
        ] {
            let err = FaultInjection::parse(bad).expect_err(bad).to_string();
            assert!(err.contains("malformed"), "{bad}: {err}");
        }
    }

    /// One test touches the process-wide cell (tests run in parallel threads).
    #[test]
    fn phases_nest_and_collectives_count_up() {
        begin_step(7);
        let at_step = snapshot();
        assert_eq!((at_step.kind, at_step.step), (PhaseKind::Step, 7));
        {
            let _save = enter(PhaseKind::Save);
            assert_eq!(snapshot().kind, PhaseKind::Save);
            let before = COLLECTIVE_SEQ.load(Ordering::Relaxed);
            {
                let _c = enter_collective(CollectiveOp::AllGather, before + 1);
                let inside = snapshot();
                assert_eq!(inside.kind, PhaseKind::Collective);
                assert_eq!(inside.collective.name(), "all_gather");
                assert_eq!(inside.collective_seq, before + 1);
            }
            assert_eq!(snapshot().kind, PhaseKind::Save);
        }
        let after = snapshot();
        assert_eq!((after.kind, after.step), (PhaseKind::Step, 7));
        assert!(after.for_secs >= at_step.for_secs);
    }
}
