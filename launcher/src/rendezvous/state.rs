//! The rendezvous state machine, independent of gRPC: who joined, the key-value store,
//! named barriers and heartbeats, for one job and one generation. The gRPC service
//! (`service.rs`) maps its errors to statuses; the supervisor reads it to detect a join
//! timeout or a hung rank. Ranks are fixed by the plan: `rank = node offset + local rank`.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};

use super::control::JobControl;

/// The world the rendezvous expects.
#[derive(Debug, Clone)]
pub struct WorldSpec {
    pub job_id: String,
    /// Host name and number of workers of every node, in node order.
    pub nodes: Vec<(String, usize)>,
    pub join_timeout: Duration,
}

impl WorldSpec {
    pub fn world_size(&self) -> usize {
        self.nodes.iter().map(|(_, n)| n).sum()
    }

    /// Global rank of `(node_rank, local_rank)`, if that slot exists.
    pub fn rank_of(&self, node_rank: usize, local_rank: usize) -> Option<usize> {
        let (_, local_size) = self.nodes.get(node_rank)?;
        (local_rank < *local_size).then(|| {
            self.nodes[..node_rank]
                .iter()
                .map(|(_, n)| n)
                .sum::<usize>()
                + local_rank
        })
    }

    /// `(host, node_rank, local_rank)` of a global rank.
    pub fn locate(&self, rank: usize) -> Option<(&str, usize, usize)> {
        let mut offset = 0;
        for (node_rank, (host, size)) in self.nodes.iter().enumerate() {
            if rank < offset + size {
                return Some((host, node_rank, rank - offset));
            }
            offset += size;
        }
        None
    }
}

/// One joined worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub rank: usize,
    pub node_rank: usize,
    pub local_rank: usize,
    pub host: String,
    pub comm_addr: String,
    pub pid: u32,
}

/// Every member of a completed generation, in rank order (built once, shared).
#[derive(Debug, Clone, PartialEq)]
pub struct CompleteWorld {
    pub generation: u64,
    pub members: Vec<Member>,
}

/// The heartbeat bookkeeping of one rank in the current generation.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// The last finished optimizer step the rank reported (0 before its first step).
    pub step: u64,
    pub loss: f64,
    pub tokens_per_second: f64,
    /// When the last heartbeat arrived.
    pub at: Instant,
    /// When `step` last changed, or the first heartbeat arrived.
    pub step_since: Instant,
    /// Whether `step` changed since the first heartbeat (the rank finished a step).
    pub stepped: bool,
    /// The heartbeat stream ended: the worker exited or its connection broke (its exit
    /// is judged by its own node's launcher, not by silence).
    pub closed: bool,
}

/// What a rank said it was doing in its last heartbeat (worker `train/phase.rs`).
#[derive(Debug, Clone, PartialEq)]
pub struct RankPhase {
    /// `startup`, `step`, `collective`, `eval`, `save`, `load`, `final_write`, or empty
    /// when the worker does not say.
    pub phase: String,
    /// The step in progress.
    pub step: u64,
    /// In `collective`: the operation and the rank's collective sequence number.
    pub collective: String,
    pub collective_seq: u64,
    /// When the rank entered the phase (launcher clock: beat arrival minus its age).
    pub since: Instant,
}

impl RankPhase {
    /// From the heartbeat fields; `phase_secs` is how long the worker had been in it.
    pub fn from_beat(
        phase: &str,
        step: u64,
        collective: &str,
        collective_seq: u64,
        phase_secs: f64,
    ) -> Self {
        let age = Duration::try_from_secs_f64(phase_secs).unwrap_or_default();
        let now = Instant::now();
        RankPhase {
            phase: phase.to_string(),
            step,
            collective: collective.to_string(),
            collective_seq,
            since: now.checked_sub(age).unwrap_or(now),
        }
    }

    /// In a collective.
    pub fn in_collective(&self) -> bool {
        self.phase == "collective"
    }

    /// In a phase with its own, longer allowance (`HangLimits::long_phase`).
    pub fn is_long_phase(&self) -> bool {
        matches!(
            self.phase.as_str(),
            "eval" | "save" | "load" | "final_write"
        )
    }

    /// `step 3 (not in a collective)`, `all_reduce #812 (step 3)`, `save (step 4)`.
    pub fn describe(&self) -> String {
        match self.phase.as_str() {
            "collective" => format!(
                "{} #{} (step {})",
                self.collective, self.collective_seq, self.step
            ),
            "step" => format!("step {} (not in a collective)", self.step),
            "" => "an unknown phase".to_string(),
            other => format!("{other} (step {})", self.step),
        }
    }
}

/// When a rank counts as hung (`hung_ranks`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HangLimits {
    /// Longest silence of the heartbeat stream, and longest time one step may take once
    /// the rank has finished its first step (`--heartbeat_timeout`).
    pub timeout: Duration,
    /// Longest time from the first heartbeat to the first finished step (model loading,
    /// data preparation, resume), and longest time a rank may stay in `eval`, `save`,
    /// `load` or `final_write` (those phases do not count as a stalled step; ranks
    /// waiting in a collective meanwhile are not judged either).
    pub startup: Duration,
}

/// Why a rank counts as hung.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HangKind {
    /// No heartbeat for longer than the timeout (stopped, frozen or cut off).
    Silent,
    /// Heartbeats arrive but the step has not advanced for longer than the timeout.
    StepStalled,
    /// Heartbeats arrive but the first step did not finish within the startup allowance.
    NoFirstStep,
    /// In `eval`/`save`/`load`/`final_write` for longer than the startup allowance.
    LongPhase,
}

/// One rank's heartbeat state as the hang check saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct RankLiveness {
    pub rank: usize,
    /// Host and pid the rank joined with (empty / 0 if unknown).
    pub host: String,
    pub pid: u32,
    pub last_step: u64,
    /// Whether the rank finished at least one step since it started.
    pub stepped: bool,
    pub since_heartbeat: Duration,
    pub since_step: Duration,
    /// What the rank's last heartbeat said it was doing, when it said.
    pub phase: Option<RankPhase>,
    /// `Some` when this rank is over a limit.
    pub hung: Option<HangKind>,
}

/// Ranks waiting in a collective while another rank is (within its allowance) in
/// `eval`/`save`/`load`/`final_write` wait for that rank: not a stalled step.
fn excuse_waiters_of_long_phases(ranks: &mut [RankLiveness]) {
    let someone_in_long_phase = ranks
        .iter()
        .any(|r| r.hung.is_none() && r.phase.as_ref().is_some_and(RankPhase::is_long_phase));
    if !someone_in_long_phase {
        return;
    }
    for rank in ranks.iter_mut() {
        let waiting = rank.phase.as_ref().is_some_and(RankPhase::in_collective);
        if waiting && rank.hung == Some(HangKind::StepStalled) {
            rank.hung = None;
        }
    }
}

/// A command the launcher sends down a worker's heartbeat stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Stop,
    SaveNow,
}

/// Why a rendezvous request was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RendezvousError {
    #[error("unknown job id '{got}' (this rendezvous serves job '{expected}')")]
    UnknownJob { got: String, expected: String },
    #[error("rsdeep version mismatch: worker runs {worker}, launcher runs {launcher}")]
    Version { worker: String, launcher: String },
    #[error(
        "join beyond the world size: node {node_rank} local rank {local_rank} does not exist \
         (world of {world_size} ranks: {layout})"
    )]
    BeyondWorld {
        node_rank: usize,
        local_rank: usize,
        world_size: usize,
        layout: String,
    },
    #[error(
        "duplicate rank {rank}: node {node_rank} local rank {local_rank} already joined (pid {pid} from {host})"
    )]
    DuplicateRank {
        rank: usize,
        node_rank: usize,
        local_rank: usize,
        pid: u32,
        host: String,
    },
    #[error(
        "rendezvous timed out after {waited:.1?}: {joined}/{world_size} ranks joined; {missing}"
    )]
    JoinTimeout {
        waited: Duration,
        joined: usize,
        world_size: usize,
        /// Whole nodes that never joined (`node 1 (10.0.0.2) never joined: ranks 4-7`),
        /// then single ranks of partly joined nodes (`never arrived: rank 3 (host ...)`).
        missing: String,
    },
    #[error("key '{key}' was not set within {waited:?}")]
    KeyTimeout { key: String, waited: Duration },
    #[error("barrier '{name}' timed out after {waited:?}: waiting for rank(s) {missing}")]
    BarrierTimeout {
        name: String,
        waited: Duration,
        missing: String,
    },
    #[error("rank {rank} is outside the world of {world_size}")]
    BadRank { rank: usize, world_size: usize },
}

#[derive(Debug, Default)]
struct Inner {
    generation: u64,
    started: Option<Instant>,
    members: Vec<Option<Member>>,
    joined: usize,
    complete: Option<Arc<CompleteWorld>>,
    kv: HashMap<String, Vec<u8>>,
    barriers: HashMap<String, BTreeSet<usize>>,
    progress: HashMap<usize, Progress>,
    phases: HashMap<usize, RankPhase>,
    command_senders: HashMap<usize, mpsc::Sender<Command>>,
    error_reports: Vec<ErrorRecord>,
}

/// A structured error a worker reported before exiting.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorRecord {
    pub rank: usize,
    pub message: String,
    /// Unix time in milliseconds on the worker.
    pub time_ms: u64,
    /// The worker says it failed because another rank did.
    pub caused_by_another_rank: bool,
}

/// Shared rendezvous state of one job (one per launcher process on node 0).
#[derive(Debug)]
pub struct RendezvousState {
    /// The world of the current generation (an elastic job's changes at a restart).
    spec: RwLock<Arc<WorldSpec>>,
    inner: Mutex<Inner>,
    join_complete: Notify,
    kv_changed: Notify,
    barrier_changed: Notify,
    /// Coordinated restarts across nodes (node 0 decides; survives generations).
    control: JobControl,
}

impl RendezvousState {
    /// A fresh rendezvous at generation 1; the join clock starts now.
    pub fn new(spec: WorldSpec) -> Self {
        let members = vec![None; spec.world_size()];
        let control = JobControl::new(spec.nodes.len());
        RendezvousState {
            control,
            spec: RwLock::new(Arc::new(spec)),
            inner: Mutex::new(Inner {
                generation: 1,
                started: Some(Instant::now()),
                members,
                ..Default::default()
            }),
            join_complete: Notify::new(),
            kv_changed: Notify::new(),
            barrier_changed: Notify::new(),
        }
    }

    /// The world of the current generation.
    pub fn spec(&self) -> Arc<WorldSpec> {
        self.spec
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Node 0's coordination of the other nodes' launchers (`control.rs`).
    pub fn control(&self) -> &JobControl {
        &self.control
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts a new generation for a restart: forgets members, keys, barriers, progress.
    pub fn next_generation(&self) -> u64 {
        self.next_generation_of(None)
    }

    /// `next_generation` on another world (an elastic job that lost or regained nodes):
    /// the job id stays, the nodes and their ranks are `spec`'s from now on.
    pub fn next_generation_on(&self, spec: WorldSpec) -> u64 {
        self.next_generation_of(Some(spec))
    }

    fn next_generation_of(&self, spec: Option<WorldSpec>) -> u64 {
        let mut inner = self.lock();
        if let Some(spec) = spec {
            *self
                .spec
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(spec);
        }
        inner.generation += 1;
        inner.started = Some(Instant::now());
        inner.members = vec![None; self.spec().world_size()];
        inner.joined = 0;
        inner.complete = None;
        inner.kv.clear();
        inner.barriers.clear();
        inner.progress.clear();
        inner.phases.clear();
        inner.command_senders.clear();
        inner.generation
    }

    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Refuses a request for another job.
    pub fn check_job(&self, job_id: &str) -> Result<(), RendezvousError> {
        let spec = self.spec();
        if job_id == spec.job_id {
            return Ok(());
        }
        Err(RendezvousError::UnknownJob {
            got: job_id.to_string(),
            expected: spec.job_id.clone(),
        })
    }

    /// Registers a worker; returns its rank. Does not wait.
    pub fn register(&self, member: Member) -> Result<usize, RendezvousError> {
        let spec = self.spec();
        let beyond = || RendezvousError::BeyondWorld {
            node_rank: member.node_rank,
            local_rank: member.local_rank,
            world_size: spec.world_size(),
            layout: layout(&spec),
        };
        let rank = spec
            .rank_of(member.node_rank, member.local_rank)
            .ok_or_else(beyond)?;
        let mut inner = self.lock();
        if rank >= inner.members.len() {
            return Err(beyond());
        }
        if let Some(existing) = &inner.members[rank] {
            return Err(RendezvousError::DuplicateRank {
                rank,
                node_rank: member.node_rank,
                local_rank: member.local_rank,
                pid: existing.pid,
                host: existing.host.clone(),
            });
        }
        inner.members[rank] = Some(Member { rank, ..member });
        inner.joined += 1;
        if inner.joined == inner.members.len() {
            let members = inner.members.iter().flatten().cloned().collect();
            let generation = inner.generation;
            inner.complete = Some(Arc::new(CompleteWorld {
                generation,
                members,
            }));
            self.join_complete.notify_waiters();
        }
        Ok(rank)
    }

    /// All members in rank order once everyone joined.
    pub fn complete_world(&self) -> Option<Arc<CompleteWorld>> {
        self.lock().complete.clone()
    }

    /// Waits until the world is complete or the join timeout passes.
    pub async fn wait_for_world(&self) -> Result<Arc<CompleteWorld>, RendezvousError> {
        loop {
            let notified = self.join_complete.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(world) = self.complete_world() {
                return Ok(world);
            }
            let deadline = self.join_deadline();
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                if let Some(world) = self.complete_world() {
                    return Ok(world);
                }
                return Err(self.join_timeout_error());
            }
        }
    }

    fn join_deadline(&self) -> Instant {
        let started = self.lock().started.unwrap_or_else(Instant::now);
        started + self.spec().join_timeout
    }

    /// True when the join timeout passed and someone is still missing.
    pub fn join_timed_out(&self) -> bool {
        self.complete_world().is_none() && Instant::now() >= self.join_deadline()
    }

    /// The timeout error naming every node that never joined (host, node rank, rank
    /// range) and every missing rank of the nodes that partly joined.
    pub fn join_timeout_error(&self) -> RendezvousError {
        let inner = self.lock();
        let spec = self.spec();
        let missing = describe_missing(&spec, |rank| {
            inner.members.get(rank).is_none_or(Option::is_none)
        });
        RendezvousError::JoinTimeout {
            waited: inner.started.map(|s| s.elapsed()).unwrap_or_default(),
            joined: inner.joined,
            world_size: spec.world_size(),
            missing,
        }
    }

    /// Stores a value and wakes every blocked `get`.
    pub fn set(&self, key: &str, value: Vec<u8>) {
        self.lock().kv.insert(key.to_string(), value);
        self.kv_changed.notify_waiters();
    }

    /// Returns the value of `key`, waiting up to `timeout` for someone to set it.
    pub async fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, RendezvousError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.kv_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(value) = self.lock().kv.get(key) {
                return Ok(value.clone());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(RendezvousError::KeyTimeout {
                    key: key.to_string(),
                    waited: timeout,
                });
            }
        }
    }

    /// Marks `rank` as arrived at barrier `name` and waits for the whole world.
    pub async fn barrier(
        &self,
        name: &str,
        rank: usize,
        timeout: Duration,
    ) -> Result<(), RendezvousError> {
        let world_size = self.spec().world_size();
        if rank >= world_size {
            return Err(RendezvousError::BadRank { rank, world_size });
        }
        let arrived_all = {
            let mut inner = self.lock();
            let arrived = inner.barriers.entry(name.to_string()).or_default();
            arrived.insert(rank);
            arrived.len() == world_size
        };
        if arrived_all {
            self.barrier_changed.notify_waiters();
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.barrier_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.barrier_count(name) >= world_size {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(self.barrier_timeout_error(name, timeout));
            }
        }
    }

    fn barrier_count(&self, name: &str) -> usize {
        self.lock().barriers.get(name).map_or(0, BTreeSet::len)
    }

    fn barrier_timeout_error(&self, name: &str, waited: Duration) -> RendezvousError {
        let inner = self.lock();
        let arrived = inner.barriers.get(name).cloned().unwrap_or_default();
        let missing: Vec<String> = (0..self.spec().world_size())
            .filter(|r| !arrived.contains(r))
            .map(|r| r.to_string())
            .collect();
        RendezvousError::BarrierTimeout {
            name: name.to_string(),
            waited,
            missing: missing.join(", "),
        }
    }

    /// Records a heartbeat from `rank` (periodic beats repeat the last step).
    pub fn record_progress(&self, rank: usize, step: u64, loss: f64, tokens_per_second: f64) {
        let now = Instant::now();
        let mut inner = self.lock();
        let progress = inner.progress.entry(rank).or_insert(Progress {
            step,
            loss,
            tokens_per_second,
            at: now,
            step_since: now,
            stepped: false,
            closed: false,
        });
        if progress.step != step {
            progress.step_since = now;
            progress.stepped = true;
        }
        *progress = Progress {
            step,
            loss,
            tokens_per_second,
            at: now,
            closed: false,
            ..*progress
        };
    }

    /// Records a heartbeat of `generation` from `rank`; beats of an older generation
    /// (a worker of a stopped attempt) are ignored. Returns whether it was recorded.
    pub fn record_heartbeat(
        &self,
        generation: u64,
        rank: usize,
        step: u64,
        loss: f64,
        tokens_per_second: f64,
    ) -> bool {
        if generation != self.generation() || rank >= self.spec().world_size() {
            return false;
        }
        self.record_progress(rank, step, loss, tokens_per_second);
        true
    }

    /// Records the phase a heartbeat of `generation` from `rank` carried (workers that
    /// send no phase leave it empty).
    pub fn record_phase(&self, generation: u64, rank: usize, phase: RankPhase) {
        let mut inner = self.lock();
        if inner.generation == generation && rank < self.spec().world_size() {
            inner.phases.insert(rank, phase);
        }
    }

    /// Marks the heartbeat stream of `rank` (of `generation`) as ended.
    pub fn heartbeat_closed(&self, generation: u64, rank: usize) {
        let mut inner = self.lock();
        if inner.generation != generation {
            return;
        }
        if let Some(progress) = inner.progress.get_mut(&rank) {
            progress.closed = true;
        }
    }

    /// The last heartbeat of every rank that sent one.
    pub fn progress(&self) -> HashMap<usize, Progress> {
        self.lock().progress.clone()
    }

    /// The heartbeat state of every rank with an open heartbeat stream, in rank order,
    /// each judged against `limits`. Ranks that never sent a heartbeat are not judged
    /// (the join timeout covers them); ranks whose stream ended are not judged either.
    pub fn liveness(&self, limits: HangLimits) -> Vec<RankLiveness> {
        let inner = self.lock();
        let mut ranks: Vec<RankLiveness> = inner
            .progress
            .iter()
            .filter(|(_, p)| !p.closed)
            .map(|(&rank, p)| {
                let member = inner.members.get(rank).and_then(Option::as_ref);
                let since_heartbeat = p.at.elapsed();
                let since_step = p.step_since.elapsed();
                let phase = inner.phases.get(&rank).filter(|f| !f.phase.is_empty());
                let in_long_phase = phase.is_some_and(RankPhase::is_long_phase);
                let hung = if since_heartbeat > limits.timeout {
                    Some(HangKind::Silent)
                } else if in_long_phase {
                    let lasted = phase.map_or(Duration::ZERO, |f| f.since.elapsed());
                    (lasted > limits.startup).then_some(HangKind::LongPhase)
                } else if p.stepped && since_step > limits.timeout {
                    Some(HangKind::StepStalled)
                } else if !p.stepped && since_step > limits.startup {
                    Some(HangKind::NoFirstStep)
                } else {
                    None
                };
                RankLiveness {
                    rank,
                    host: member.map(|m| m.host.clone()).unwrap_or_default(),
                    pid: member.map_or(0, |m| m.pid),
                    last_step: p.step,
                    stepped: p.stepped,
                    since_heartbeat,
                    since_step,
                    phase: phase.cloned(),
                    hung,
                }
            })
            .collect();
        ranks.sort_by_key(|r| r.rank);
        excuse_waiters_of_long_phases(&mut ranks);
        ranks
    }

    /// Ranks whose last heartbeat is older than `timeout` (ranks that never sent one are
    /// not judged: they may still be loading).
    pub fn silent_ranks(&self, timeout: Duration) -> Vec<usize> {
        let limits = HangLimits {
            timeout,
            startup: Duration::MAX,
        };
        self.liveness(limits)
            .into_iter()
            .filter(|r| r.hung == Some(HangKind::Silent))
            .map(|r| r.rank)
            .collect()
    }

    /// Keeps a worker's error report (shown in the launcher's failure report).
    pub fn record_error(&self, record: ErrorRecord) {
        self.lock().error_reports.push(record);
    }

    /// Error reports of `rank`, oldest first (all generations).
    pub fn errors_of(&self, rank: usize) -> Vec<ErrorRecord> {
        let inner = self.lock();
        inner
            .error_reports
            .iter()
            .filter(|e| e.rank == rank)
            .cloned()
            .collect()
    }

    /// Error reports made at or after `since_ms` (Unix ms on the workers' clocks), in
    /// the order they arrived: the reports of the current attempt.
    pub fn errors_since(&self, since_ms: u64) -> Vec<ErrorRecord> {
        let inner = self.lock();
        inner
            .error_reports
            .iter()
            .filter(|e| e.time_ms >= since_ms)
            .cloned()
            .collect()
    }

    /// Registers the command channel of a rank's heartbeat stream.
    pub fn attach_commands(&self, rank: usize, sender: mpsc::Sender<Command>) {
        self.lock().command_senders.insert(rank, sender);
    }

    /// Sends a command to every connected heartbeat stream; returns how many got it.
    pub fn broadcast_command(&self, command: Command) -> usize {
        let senders: Vec<_> = self.lock().command_senders.values().cloned().collect();
        senders
            .iter()
            .filter(|s| s.try_send(command).is_ok())
            .count()
    }
}

/// Most single missing ranks a join timeout lists before summing up the rest.
const MISSING_RANKS_LISTED: usize = 16;

/// `node 1 (10.0.0.2) never joined: ranks 4-7; never arrived: rank 2 (host a, node 0,
/// local rank 2)`: whole nodes by rank range first, then single ranks of partly joined
/// nodes (the first `MISSING_RANKS_LISTED`, then a count).
/// `node 0 a has 2, node 1 b has 3`: the layout a join beyond the world is compared with.
fn layout(spec: &WorldSpec) -> String {
    let nodes: Vec<String> = spec
        .nodes
        .iter()
        .enumerate()
        .map(|(i, (host, n))| format!("node {i} {host} has {n}"))
        .collect();
    nodes.join(", ")
}

fn describe_missing(spec: &WorldSpec, is_missing: impl Fn(usize) -> bool) -> String {
    let mut whole_nodes = Vec::new();
    let mut single_ranks = Vec::new();
    let mut first = 0;
    for (node, (host, size)) in spec.nodes.iter().enumerate() {
        let ranks = first..first + size;
        first += size;
        let missing: Vec<usize> = ranks.clone().filter(|&r| is_missing(r)).collect();
        if *size > 0 && missing.len() == *size {
            let range = match (ranks.start, ranks.end - 1) {
                (only, last) if only == last => format!("rank {only}"),
                (start, last) => format!("ranks {start}-{last}"),
            };
            whole_nodes.push(format!("node {node} ({host}) never joined: {range}"));
            continue;
        }
        single_ranks.extend(missing.into_iter().map(|r| {
            let local = r - ranks.start;
            format!("rank {r} (host {host}, node {node}, local rank {local})")
        }));
    }
    let mut parts = whole_nodes;
    if !single_ranks.is_empty() {
        let unlisted = single_ranks.len().saturating_sub(MISSING_RANKS_LISTED);
        single_ranks.truncate(MISSING_RANKS_LISTED);
        let mut listed = single_ranks.join(", ");
        if unlisted > 0 {
            listed.push_str(&format!(" and {unlisted} more rank(s)"));
        }
        parts.push(format!("never arrived: {listed}"));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn spec(nodes: &[(&str, usize)], timeout_ms: u64) -> WorldSpec {
        WorldSpec {
            job_id: "job".into(),
            nodes: nodes.iter().map(|(h, n)| (h.to_string(), *n)).collect(),
            join_timeout: Duration::from_millis(timeout_ms),
        }
    }

    fn member(node_rank: usize, local_rank: usize) -> Member {
        Member {
            rank: 0,
            node_rank,
            local_rank,
            host: format!("h{node_rank}"),
            comm_addr: format!("10.0.0.{node_rank}:{}", 5000 + local_rank),
            pid: 100 + local_rank as u32,
        }
    }

    #[test]
    fn ranks_are_node_offset_plus_local_rank() {
        let s = spec(&[("a", 2), ("b", 3)], 1000);
        assert_eq!(s.rank_of(0, 1), Some(1));
        assert_eq!(s.rank_of(1, 2), Some(4));
        assert_eq!(s.rank_of(1, 3), None);
        assert_eq!(s.rank_of(2, 0), None);
        assert_eq!(s.locate(3), Some(("b", 1, 1)));
    }

    #[tokio::test]
    async fn world_completes_in_rank_order_regardless_of_arrival() {
        let state = Arc::new(RendezvousState::new(spec(&[("a", 2), ("b", 2)], 5000)));
        let mut waiters = Vec::new();
        for (node, local) in [(1, 1), (0, 1), (1, 0), (0, 0)] {
            let state = state.clone();
            waiters.push(tokio::spawn(async move {
                let rank = state.register(member(node, local)).unwrap();
                (rank, state.wait_for_world().await.unwrap())
            }));
        }
        for waiter in waiters {
            let (rank, world) = waiter.await.unwrap();
            let members = &world.members;
            assert_eq!(world.generation, 1);
            assert_eq!(members[rank].rank, rank);
            let order: Vec<_> = members
                .iter()
                .map(|m| (m.node_rank, m.local_rank))
                .collect();
            assert_eq!(order, [(0, 0), (0, 1), (1, 0), (1, 1)]);
        }
    }

    #[test]
    fn duplicate_and_beyond_world_are_refused_precisely() {
        let state = RendezvousState::new(spec(&[("a", 2)], 1000));
        state.register(member(0, 1)).unwrap();
        let err = state.register(member(0, 1)).unwrap_err();
        assert!(
            matches!(
                err,
                RendezvousError::DuplicateRank {
                    rank: 1,
                    pid: 101,
                    ..
                }
            ),
            "{err}"
        );
        let err = state.register(member(0, 2)).unwrap_err();
        assert!(
            err.to_string().contains("join beyond the world size"),
            "{err}"
        );
        assert!(
            state
                .check_job("other")
                .unwrap_err()
                .to_string()
                .contains("unknown job id 'other'")
        );
    }

    #[tokio::test]
    async fn join_timeout_names_missing_ranks_and_hosts() {
        let state = RendezvousState::new(spec(&[("a", 1), ("b", 2)], 100));
        state.register(member(0, 0)).unwrap();
        state.register(member(1, 0)).unwrap();
        let err = state.wait_for_world().await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("2/3 ranks joined"), "{text}");
        assert!(
            text.contains("rank 2 (host b, node 1, local rank 1)"),
            "{text}"
        );
        assert!(state.join_timed_out());
    }

    #[test]
    fn join_timeout_names_each_missing_node_with_its_rank_range() {
        let s = spec(
            &[("10.0.0.1", 4), ("10.0.0.2", 4), ("10.0.0.3", 1), ("d", 3)],
            100,
        );
        let state = RendezvousState::new(s);
        for local in 0..3 {
            state.register(member(0, local)).unwrap();
        }
        state.register(member(3, 0)).unwrap();
        state.register(member(3, 2)).unwrap();
        let text = state.join_timeout_error().to_string();
        assert!(text.contains("5/12 ranks joined; "), "{text}");
        assert!(
            text.contains(
                "node 1 (10.0.0.2) never joined: ranks 4-7; \
                 node 2 (10.0.0.3) never joined: rank 8; \
                 never arrived: rank 3 (host 10.0.0.1, node 0, local rank 3), \
                 rank 10 (host d, node 3, local rank 1)"
            ),
            "{text}"
        );
    }

    #[test]
    fn join_timeout_lists_at_most_sixteen_single_ranks() {
        let state = RendezvousState::new(spec(&[("a", 40)], 100));
        state.register(member(0, 0)).unwrap();
        let text = state.join_timeout_error().to_string();
        assert!(text.contains("local rank 15), rank 16 (host a"), "{text}");
        assert!(
            text.ends_with("local rank 16) and 23 more rank(s)"),
            "{text}"
        );
        assert!(!text.contains("never joined"), "{text}");
    }

    #[test]
    fn a_long_phase_has_its_own_allowance_and_excuses_collective_waiters() {
        let state = RendezvousState::new(spec(&[("a", 2)], 1000));
        for rank in 0..2 {
            state.record_heartbeat(1, rank, 0, 0.0, 0.0);
            state.record_heartbeat(1, rank, 4, 1.0, 1.0);
        }
        std::thread::sleep(Duration::from_millis(60));
        state.record_phase(
            1,
            0,
            RankPhase::from_beat("collective", 5, "barrier", 40, 0.06),
        );
        state.record_phase(1, 1, RankPhase::from_beat("save", 5, "", 39, 0.06));
        for rank in 0..2 {
            state.record_heartbeat(1, rank, 4, 1.0, 1.0);
        }
        let short = Duration::from_millis(20);
        let limits = HangLimits {
            timeout: short,
            startup: Duration::from_secs(60),
        };
        let hung: Vec<_> = state.liveness(limits).iter().map(|r| r.hung).collect();
        assert_eq!(
            hung,
            vec![None, None],
            "save within its allowance, rank 0 waits for it"
        );
        let limits = HangLimits {
            timeout: short,
            startup: short,
        };
        let hung: Vec<_> = state.liveness(limits).iter().map(|r| r.hung).collect();
        assert_eq!(
            hung,
            vec![Some(HangKind::StepStalled), Some(HangKind::LongPhase)]
        );
    }

    #[tokio::test]
    async fn blocking_get_sees_a_later_set() {
        let state = Arc::new(RendezvousState::new(spec(&[("a", 2)], 1000)));
        let reader = {
            let state = state.clone();
            tokio::spawn(async move { state.get("nccl_id", Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        state.set("nccl_id", vec![7; 128]);
        assert_eq!(reader.await.unwrap().unwrap(), vec![7; 128]);
        let err = state
            .get("never", Duration::from_millis(30))
            .await
            .unwrap_err();
        assert!(matches!(err, RendezvousError::KeyTimeout { .. }));
    }

    #[tokio::test]
    async fn barrier_releases_all_or_names_the_missing() {
        let state = Arc::new(RendezvousState::new(spec(&[("a", 3)], 1000)));
        let tasks: Vec<_> = (0..3)
            .map(|r| {
                let state = state.clone();
                tokio::spawn(async move { state.barrier("b1", r, Duration::from_secs(5)).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let err = state
            .barrier("b2", 0, Duration::from_millis(30))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("waiting for rank(s) 1, 2"),
            "{err}"
        );
        assert!(
            state
                .barrier("b3", 3, Duration::from_millis(30))
                .await
                .is_err()
        );
    }

    #[test]
    fn next_generation_forgets_everything() {
        let state = RendezvousState::new(spec(&[("a", 1)], 1000));
        state.register(member(0, 0)).unwrap();
        state.set("k", vec![1]);
        state.record_progress(0, 5, 1.0, 10.0);
        assert_eq!(state.next_generation(), 2);
        assert!(state.complete_world().is_none());
        assert!(state.progress().is_empty());
        state.register(member(0, 0)).unwrap();
        assert_eq!(state.complete_world().unwrap().generation, 2);
    }

    fn limits(timeout_ms: u64, startup_ms: u64) -> HangLimits {
        HangLimits {
            timeout: Duration::from_millis(timeout_ms),
            startup: Duration::from_millis(startup_ms),
        }
    }

    #[test]
    fn a_rank_whose_step_stops_advancing_is_stalled_even_with_fresh_heartbeats() {
        let state = RendezvousState::new(spec(&[("a", 2)], 1000));
        state.register(member(0, 0)).unwrap();
        state.record_progress(0, 0, 0.0, 0.0);
        state.record_progress(1, 0, 0.0, 0.0);
        state.record_progress(0, 1, 2.5, 10.0);
        std::thread::sleep(Duration::from_millis(30));
        // Periodic beats repeat the step: they keep the stream alive, not the step.
        state.record_progress(0, 1, 2.5, 10.0);
        state.record_progress(1, 0, 0.0, 0.0);
        let seen = state.liveness(limits(20, 10_000));
        assert_eq!(seen[0].hung, Some(HangKind::StepStalled), "{seen:?}");
        assert_eq!((seen[0].last_step, seen[0].pid), (1, 100));
        assert_eq!(seen[0].host, "h0");
        assert!(seen[0].since_step >= Duration::from_millis(30));
        assert!(seen[0].since_heartbeat < Duration::from_millis(20));
        // Rank 1 has not finished a step yet: only the startup allowance applies.
        assert_eq!(seen[1].hung, None, "{seen:?}");
        assert_eq!(
            state.liveness(limits(20, 10))[1].hung,
            Some(HangKind::NoFirstStep)
        );
    }

    #[test]
    fn closed_streams_and_old_generations_are_not_judged() {
        let state = RendezvousState::new(spec(&[("a", 2)], 1000));
        assert!(state.record_heartbeat(1, 0, 3, 1.0, 1.0));
        assert!(!state.record_heartbeat(0, 1, 3, 1.0, 1.0));
        assert!(!state.record_heartbeat(1, 7, 3, 1.0, 1.0));
        state.heartbeat_closed(2, 0);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(state.silent_ranks(Duration::from_millis(1)), vec![0]);
        state.heartbeat_closed(1, 0);
        assert!(state.liveness(limits(1, 1)).is_empty());
        // A beat after a reconnect reopens the rank.
        assert!(state.record_heartbeat(1, 0, 3, 1.0, 1.0));
        assert_eq!(state.liveness(limits(1000, 1000)).len(), 1);
    }

    #[test]
    fn silent_ranks_only_counts_ranks_that_reported() {
        let state = RendezvousState::new(spec(&[("a", 2)], 1000));
        state.record_progress(1, 1, 0.5, 1.0);
        assert!(state.silent_ranks(Duration::from_secs(60)).is_empty());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(state.silent_ranks(Duration::from_millis(1)), vec![1]);
    }
}
