//! Node 0's side of coordinated restarts across nodes (`--launcher slurm` with several
//! nodes): node 0 is the one decision maker. Every other node's launcher polls it
//! (`NodeControl` in `proto/proto/rendezvous.proto`) with the state of its attempt and
//! gets a `Directive`: keep going, stop, start the next attempt, or exit. This module is
//! the state machine behind those answers, independent of gRPC; the launcher binary
//! (`nodes/coordinate/follow.rs`) drives it: `begin_attempt`, `stop_all`, `decide_exit`, and reads
//! the remote events (`remote_event`) that end an attempt.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a node's launcher says about its attempt (`NodeStatus.State`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    Running,
    Finished,
    Failed,
    Interrupted,
    Stopped,
}

/// One poll of a node's launcher (`NodeStatus`).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeReport {
    pub node_rank: usize,
    pub attempt: u32,
    pub state: NodeState,
    /// Every local worker of `attempt` has exited.
    pub workers_stopped: bool,
    pub exit_code: i32,
    pub failed_at_ms: u64,
    pub failed_rank: usize,
    pub report: String,
    /// This node holds node 0's exit decision (its acknowledgement).
    pub heard_exit: bool,
}

/// What node 0 tells a polling node (`NodeDirective`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Directive {
    Continue,
    Stop,
    /// Start `attempt` in the world of the launch node ids `world` (node 0 first; an
    /// elastic job's world may have changed).
    Restart {
        attempt: u32,
        generation: u64,
        world: Vec<usize>,
    },
    Exit {
        code: i32,
        report: String,
    },
}

/// Something on another node that ends node 0's current attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum RemoteEvent {
    /// A node's worker failed (the earliest by time of the reports so far).
    Failed(NodeReport),
    /// A node's launcher was signalled.
    Interrupted(NodeReport),
    /// A node's launcher stopped polling for longer than the allowed silence.
    Lost {
        node_rank: usize,
        silent_for: Duration,
    },
}

/// Why a poll was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("node rank {node_rank} cannot poll node 0: the job's other nodes are 1..{nodes}")]
    BadNode { node_rank: usize, nodes: usize },
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Running,
    Stopping,
    Exit { code: i32, report: String },
}

#[derive(Debug)]
struct Inner {
    attempt: u32,
    generation: u64,
    phase: Phase,
    /// The latest report of every node for the current attempt (index: node rank).
    reports: Vec<Option<NodeReport>>,
    /// When every node last polled (`None`: never).
    last_poll: Vec<Option<Instant>>,
    /// Nodes that were answered `Exit`.
    told_exit: Vec<bool>,
    /// The launch node ids of the current world, node 0 first (every node but those an
    /// elastic job went on without).
    world: Vec<usize>,
}

impl Inner {
    /// The other nodes of the current world.
    fn others(&self) -> impl Iterator<Item = usize> + '_ {
        self.world.iter().copied().filter(|&n| n != 0)
    }
}

/// The coordination state of one job on node 0.
#[derive(Debug)]
pub struct JobControl {
    nodes: usize,
    lost_after: Mutex<Duration>,
    inner: Mutex<Inner>,
}

/// Default silence after which a node counts as lost (the default heartbeat timeout).
const DEFAULT_LOST_AFTER: Duration = Duration::from_secs(300);

impl JobControl {
    /// A job of `nodes` nodes at attempt 0, generation 1.
    pub fn new(nodes: usize) -> Self {
        JobControl {
            nodes,
            lost_after: Mutex::new(DEFAULT_LOST_AFTER),
            inner: Mutex::new(Inner {
                attempt: 0,
                generation: 1,
                phase: Phase::Running,
                reports: vec![None; nodes],
                last_poll: vec![None; nodes],
                told_exit: vec![false; nodes],
                world: (0..nodes).collect(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long a node may stay silent (no poll) before it counts as lost.
    pub fn set_lost_after(&self, silence: Duration) {
        *self.lost_after.lock().unwrap_or_else(|p| p.into_inner()) = silence;
    }

    fn lost_after(&self) -> Duration {
        *self.lost_after.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `attempt` on rendezvous `generation`: nodes still on an older attempt are
    /// told to stop, then to restart into this one.
    pub fn begin_attempt(&self, attempt: u32, generation: u64) {
        let world = self.lock().world.clone();
        self.begin_attempt_on(attempt, generation, world);
    }

    /// `begin_attempt` in the world of the launch node ids `world` (node 0 first).
    pub fn begin_attempt_on(&self, attempt: u32, generation: u64, world: Vec<usize>) {
        let mut inner = self.lock();
        inner.world = world;
        inner.attempt = attempt;
        inner.generation = generation;
        inner.phase = Phase::Running;
        inner.reports = vec![None; self.nodes];
    }

    /// Tells every node to stop its workers of the current attempt.
    pub fn stop_all(&self) {
        let mut inner = self.lock();
        if inner.phase == Phase::Running {
            inner.phase = Phase::Stopping;
        }
    }

    /// The job is over: every node is told to exit with `code` (`report`: the failure).
    pub fn decide_exit(&self, code: i32, report: String) {
        let mut inner = self.lock();
        inner.phase = Phase::Exit { code, report };
        inner.told_exit = vec![false; self.nodes];
    }

    /// Records a node's poll and answers it.
    pub fn poll(&self, report: NodeReport) -> Result<Directive, ControlError> {
        let node = report.node_rank;
        if node == 0 || node >= self.nodes {
            return Err(ControlError::BadNode {
                node_rank: node,
                nodes: self.nodes,
            });
        }
        let mut inner = self.lock();
        inner.last_poll[node] = Some(Instant::now());
        let directive = directive_for(&inner, &report);
        if matches!(directive, Directive::Exit { .. }) && report.heard_exit {
            inner.told_exit[node] = true;
        }
        if report.attempt == inner.attempt {
            inner.reports[node] = Some(report);
        }
        Ok(directive)
    }

    /// What ends the current attempt from another node, if anything: a signalled node
    /// first, then the earliest worker failure, then a node silent for too long.
    pub fn remote_event(&self) -> Option<RemoteEvent> {
        let inner = self.lock();
        let reports = || inner.reports.iter().flatten();
        if let Some(r) = reports().find(|r| r.state == NodeState::Interrupted) {
            return Some(RemoteEvent::Interrupted(r.clone()));
        }
        let first_failure = reports()
            .filter(|r| r.state == NodeState::Failed)
            .min_by_key(|r| (r.failed_at_ms, r.node_rank));
        if let Some(r) = first_failure {
            return Some(RemoteEvent::Failed(r.clone()));
        }
        self.lost_node(&inner)
    }

    /// A node that polled once and then fell silent for longer than the allowed silence,
    /// unless it already said it stopped for good (interrupted).
    fn lost_node(&self, inner: &Inner) -> Option<RemoteEvent> {
        let limit = self.lost_after();
        inner.others().find_map(|node| {
            let silent_for = inner.last_poll[node]?.elapsed();
            (silent_for > limit).then_some(RemoteEvent::Lost {
                node_rank: node,
                silent_for,
            })
        })
    }

    /// Every node's latest report of the current attempt (index: node rank).
    pub fn reports(&self) -> Vec<Option<NodeReport>> {
        self.lock().reports.clone()
    }

    /// Nodes whose workers of the current attempt are not known to have exited yet.
    pub fn not_stopped(&self) -> Vec<usize> {
        let inner = self.lock();
        inner
            .others()
            .filter(|&n| !inner.reports[n].as_ref().is_some_and(|r| r.workers_stopped))
            .collect()
    }

    /// The nodes of `not_stopped` that can still answer: they polled within the allowed
    /// silence (a lost node, or one that never polled, is not waited for).
    pub fn still_stopping(&self) -> Vec<usize> {
        let limit = self.lost_after();
        let reachable: Vec<bool> = {
            let inner = self.lock();
            inner
                .last_poll
                .iter()
                .map(|t| t.is_some_and(|t| t.elapsed() <= limit))
                .collect()
        };
        self.not_stopped()
            .into_iter()
            .filter(|&n| reachable[n])
            .collect()
    }

    /// Every other node's workers exited for good in the current attempt (finished,
    /// failed, interrupted or stopped).
    pub fn all_ended(&self) -> bool {
        self.not_stopped().is_empty()
    }

    /// Nodes not yet told to exit (those an elastic job left out included), leaving out
    /// those that exit on their own (signalled) and those silent for longer than the
    /// allowed silence.
    pub fn not_told_exit(&self) -> Vec<usize> {
        let inner = self.lock();
        let limit = self.lost_after();
        (1..self.nodes)
            .filter(|&n| !inner.told_exit[n])
            .filter(|&n| {
                let interrupted = inner.reports[n]
                    .as_ref()
                    .is_some_and(|r| r.state == NodeState::Interrupted);
                let silent = inner.last_poll[n].is_none_or(|t| t.elapsed() > limit);
                !interrupted && !silent
            })
            .collect()
    }

    /// The nodes (launch node ids, node 0 left out) that polled within `within`.
    pub fn answering(&self, within: Duration) -> Vec<usize> {
        let inner = self.lock();
        (1..self.nodes)
            .filter(|&n| inner.last_poll[n].is_some_and(|t| t.elapsed() <= within))
            .collect()
    }
}

/// The answer to `report` in node 0's present state.
fn directive_for(inner: &Inner, report: &NodeReport) -> Directive {
    match &inner.phase {
        Phase::Exit { code, report } => Directive::Exit {
            code: *code,
            report: report.clone(),
        },
        // Left out of an elastic job's world: wait, to rejoin at the next restart.
        _ if !inner.world.contains(&report.node_rank) => Directive::Continue,
        _ if report.attempt < inner.attempt => match report.workers_stopped {
            true => Directive::Restart {
                attempt: inner.attempt,
                generation: inner.generation,
                world: inner.world.clone(),
            },
            false => Directive::Stop,
        },
        Phase::Stopping => Directive::Stop,
        Phase::Running => Directive::Continue,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(node_rank: usize, attempt: u32, state: NodeState, stopped: bool) -> NodeReport {
        NodeReport {
            node_rank,
            attempt,
            state,
            workers_stopped: stopped,
            exit_code: 0,
            failed_at_ms: 0,
            failed_rank: 0,
            report: String::new(),
            heard_exit: false,
        }
    }

    fn failed(node_rank: usize, at_ms: u64, rank: usize) -> NodeReport {
        NodeReport {
            exit_code: 137,
            failed_at_ms: at_ms,
            failed_rank: rank,
            report: format!("rank {rank} failed first"),
            ..report(node_rank, 0, NodeState::Failed, false)
        }
    }

    #[test]
    fn a_restart_stops_every_node_then_starts_it_on_the_new_generation() {
        let control = JobControl::new(3);
        let running = report(1, 0, NodeState::Running, false);
        assert_eq!(control.poll(running.clone()), Ok(Directive::Continue));
        assert_eq!(control.poll(failed(2, 50, 2)), Ok(Directive::Continue));
        let Some(RemoteEvent::Failed(first)) = control.remote_event() else {
            panic!("node 2's failure must end the attempt");
        };
        assert_eq!((first.node_rank, first.failed_rank), (2, 2));
        control.stop_all();
        assert_eq!(control.poll(running), Ok(Directive::Stop));
        assert_eq!(control.not_stopped(), [1, 2]);
        assert_eq!(control.still_stopping(), [1, 2]);
        let stopped = report(1, 0, NodeState::Stopped, true);
        assert_eq!(control.poll(stopped.clone()), Ok(Directive::Stop));
        control
            .poll(NodeReport {
                workers_stopped: true,
                ..failed(2, 50, 2)
            })
            .unwrap();
        assert!(control.all_ended());
        control.begin_attempt(1, 2);
        assert_eq!(
            control.remote_event(),
            None,
            "a new attempt forgets the old"
        );
        let restart = Directive::Restart {
            attempt: 1,
            generation: 2,
            world: vec![0, 1, 2],
        };
        assert_eq!(control.poll(stopped), Ok(restart));
        // A node still running the old attempt is stopped first.
        assert_eq!(
            control.poll(report(2, 0, NodeState::Failed, false)),
            Ok(Directive::Stop)
        );
        assert_eq!(
            control.poll(report(1, 1, NodeState::Running, false)),
            Ok(Directive::Continue)
        );
        assert_eq!(control.not_stopped(), [1, 2]);
    }

    #[test]
    fn a_world_without_a_node_restarts_the_others_into_it_and_ignores_the_left_out_one() {
        let control = JobControl::new(3);
        control.set_lost_after(Duration::from_millis(20));
        for node in [1, 2] {
            control
                .poll(report(node, 0, NodeState::Running, false))
                .unwrap();
        }
        control.stop_all();
        control
            .poll(report(1, 0, NodeState::Stopped, true))
            .unwrap();
        std::thread::sleep(Duration::from_millis(40));
        control
            .poll(report(1, 0, NodeState::Stopped, true))
            .unwrap();
        assert_eq!(
            control.answering(Duration::from_millis(20)),
            [1],
            "node 2 fell silent"
        );
        control.begin_attempt_on(1, 2, vec![0, 1]);
        let restart = Directive::Restart {
            attempt: 1,
            generation: 2,
            world: vec![0, 1],
        };
        assert_eq!(
            control.poll(report(1, 0, NodeState::Stopped, true)),
            Ok(restart)
        );
        std::thread::sleep(Duration::from_millis(40));
        control
            .poll(report(1, 1, NodeState::Running, false))
            .unwrap();
        assert_eq!(
            control.remote_event(),
            None,
            "the left-out node is not lost"
        );
        assert_eq!(control.not_stopped(), [1]);
        let waiting = report(2, 0, NodeState::Stopped, true);
        assert_eq!(
            control.poll(waiting.clone()),
            Ok(Directive::Continue),
            "a left-out node that answers again waits for the next restart"
        );
        control.decide_exit(0, String::new());
        assert_eq!(
            control.not_told_exit(),
            [1, 2],
            "the left-out node that still answers is told the end too"
        );
        let exit = Directive::Exit {
            code: 0,
            report: String::new(),
        };
        assert_eq!(control.poll(waiting), Ok(exit));
    }

    #[test]
    fn the_earliest_failure_wins_and_a_signal_wins_over_failures() {
        let control = JobControl::new(3);
        control.poll(failed(1, 90, 1)).unwrap();
        control.poll(failed(2, 40, 2)).unwrap();
        let Some(RemoteEvent::Failed(first)) = control.remote_event() else {
            panic!("a failure was reported");
        };
        assert_eq!(first.failed_at_ms, 40);
        control
            .poll(report(1, 0, NodeState::Interrupted, true))
            .unwrap();
        assert!(matches!(
            control.remote_event(),
            Some(RemoteEvent::Interrupted(r)) if r.node_rank == 1
        ));
    }

    #[test]
    fn exit_reaches_every_node_and_silent_or_signalled_nodes_are_not_waited_for() {
        let control = JobControl::new(4);
        for node in 1..4 {
            control
                .poll(report(node, 0, NodeState::Finished, true))
                .unwrap();
        }
        control
            .poll(report(3, 0, NodeState::Interrupted, true))
            .unwrap();
        control.decide_exit(0, String::new());
        assert_eq!(control.not_told_exit(), [1, 2]);
        let exit = Directive::Exit {
            code: 0,
            report: String::new(),
        };
        let finished = report(1, 0, NodeState::Finished, true);
        assert_eq!(control.poll(finished.clone()), Ok(exit.clone()));
        assert_eq!(
            control.not_told_exit(),
            [1, 2],
            "told counts only once the node acknowledges it holds the decision"
        );
        let heard = NodeReport {
            heard_exit: true,
            ..finished
        };
        assert_eq!(control.poll(heard), Ok(exit));
        assert_eq!(control.not_told_exit(), [2]);
        control.set_lost_after(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        assert!(control.not_told_exit().is_empty());
    }

    #[test]
    fn a_silent_node_is_lost_and_unknown_nodes_are_refused() {
        let control = JobControl::new(2);
        control.set_lost_after(Duration::from_millis(20));
        assert_eq!(control.remote_event(), None, "never polled: not judged");
        control
            .poll(report(1, 0, NodeState::Running, false))
            .unwrap();
        assert_eq!(control.remote_event(), None);
        std::thread::sleep(Duration::from_millis(40));
        assert!(matches!(
            control.remote_event(),
            Some(RemoteEvent::Lost { node_rank: 1, silent_for }) if silent_for >= Duration::from_millis(20)
        ));
        assert_eq!(control.not_stopped(), [1]);
        assert!(
            control.still_stopping().is_empty(),
            "a lost node is not waited for"
        );
        for node in [0, 2] {
            let err = control
                .poll(report(node, 0, NodeState::Running, false))
                .unwrap_err();
            assert_eq!(
                err,
                ControlError::BadNode {
                    node_rank: node,
                    nodes: 2
                }
            );
        }
    }
}
