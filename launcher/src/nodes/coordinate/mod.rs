//! Coordinated restarts across nodes under `--launcher slurm`: node 0 decides for the
//! whole job, every other node's launcher follows. This module holds the two adapters
//! the launcher's loops (`follow`) plug into the supervisor:
//! - on node K >= 1, `NodeLink`: a background task polls node 0's rendezvous
//!   (`NodeControl` in `proto/proto/rendezvous.proto`, token on every call) a few times a
//!   second with this node's attempt state and keeps node 0's latest answer; it ends the
//!   local attempt when node 0 says stop, and declares node 0 lost when it stays
//!   unreachable for longer than the allowed silence;
//! - on node 0, `RemoteNodes`: turns the first remote event the rendezvous recorded
//!   (`rendezvous::control`) into the attempt's `Outcome`.

pub mod follow;

use crate::supervise::lines::lock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rsdeep_proto::TOKEN_METADATA_KEY;
use rsdeep_proto::v1::rendezvous_client::RendezvousClient;
use tokio::sync::Notify;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tracing::{Instrument, info_span, warn};

use crate::rendezvous::RendezvousState;
use crate::rendezvous::control::{Directive, NodeReport, NodeState, RemoteEvent};
use crate::rendezvous::service::{directive_of, wire_status};
use crate::supervise::{Outcome, STOP_SIGNAL, StopSource, unix_ms};

/// How often a node polls node 0 (and so how late it may hear a decision).
pub const POLL_PERIOD: Duration = Duration::from_millis(200);
/// Longest wait for one poll's answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a node cannot start following node 0.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the rendezvous address {url} is not a valid URI: {reason}")]
    Address { url: String, reason: String },
    #[error("RSDEEP_TOKEN is not printable ASCII, so it cannot travel as gRPC metadata")]
    Token,
    #[error("TLS setup for {url}: {reason}")]
    Tls { url: String, reason: String },
}

/// Where and as whom a node polls node 0.
#[derive(Debug, Clone)]
pub struct LinkTarget {
    /// `http://host:port` or `https://host:port` of node 0's rendezvous.
    pub url: String,
    pub token: String,
    pub job_id: String,
    pub node_rank: usize,
    pub tls: Option<ClientTlsConfig>,
    /// How long node 0 may be unreachable before the first answer (its launcher may
    /// start later than this one: the join timeout) and after it (the heartbeat timeout).
    pub first_contact_within: Duration,
    pub lost_after: Duration,
}

/// What node 0 decided once this node's attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start `attempt` (node 0 has opened rendezvous `generation`) in the world of the
    /// launch node ids `world`, node 0 first.
    Restart {
        attempt: u32,
        generation: u64,
        world: Vec<usize>,
    },
    /// Exit with `code`; `report` names the job's first failure (empty on success).
    Exit { code: i32, report: String },
    /// Node 0 is unreachable: the message says since when and why.
    Lost(String),
    /// This launcher was signalled while waiting.
    Signal(i32),
}

#[derive(Debug)]
struct Shared {
    status: Mutex<NodeReport>,
    /// Bumped on every status change; `answered` is the newest version node 0 answered.
    version: AtomicU64,
    answered: AtomicU64,
    /// Node 0's latest answer and the attempt of the status it answered.
    answer: Mutex<Option<(u32, Directive)>>,
    /// `Some(why)` once node 0 counts as lost (or refused this node).
    lost: Mutex<Option<String>>,
    wake: Notify,
}

impl Shared {
    fn change(&self, edit: impl FnOnce(&mut NodeReport)) {
        edit(&mut lock(&self.status));
        self.version.fetch_add(1, Ordering::SeqCst);
        self.wake.notify_one();
    }

    fn lost(&self) -> Option<String> {
        lock(&self.lost).clone()
    }

    fn answer_for(&self, attempt: u32) -> Option<Directive> {
        match &*lock(&self.answer) {
            Some((asked, directive)) if *asked == attempt => Some(directive.clone()),
            _ => None,
        }
    }
}

/// A node's link to node 0 (node rank >= 1); polls in the background until dropped.
#[derive(Debug)]
pub struct NodeLink {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl NodeLink {
    /// Starts polling node 0 on `runtime` for attempt 0.
    pub fn start(runtime: &tokio::runtime::Handle, target: LinkTarget) -> Result<Self, LinkError> {
        let mut endpoint =
            Endpoint::from_shared(target.url.clone()).map_err(|e| LinkError::Address {
                url: target.url.clone(),
                reason: e.to_string(),
            })?;
        let call_timeout = call_timeout(&target);
        endpoint = endpoint
            .connect_timeout(call_timeout.min(Duration::from_secs(2)))
            .timeout(call_timeout);
        if let Some(tls) = target.tls.clone() {
            endpoint = endpoint.tls_config(tls).map_err(|e| LinkError::Tls {
                url: target.url.clone(),
                reason: e.to_string(),
            })?;
        }
        let token: AsciiMetadataValue = target.token.parse().map_err(|_| LinkError::Token)?;
        let shared = Arc::new(Shared {
            status: Mutex::new(NodeReport {
                node_rank: target.node_rank,
                attempt: 0,
                state: NodeState::Running,
                workers_stopped: false,
                exit_code: 0,
                failed_at_ms: 0,
                failed_rank: 0,
                report: String::new(),
                heard_exit: false,
            }),
            version: AtomicU64::new(1),
            answered: AtomicU64::new(0),
            answer: Mutex::new(None),
            lost: Mutex::new(None),
            wake: Notify::new(),
        });
        let _guard = runtime.enter();
        let channel = endpoint.connect_lazy();
        let client = RendezvousClient::with_interceptor(
            channel,
            move |mut request: tonic::Request<()>| -> Result<tonic::Request<()>, tonic::Status> {
                request
                    .metadata_mut()
                    .insert(TOKEN_METADATA_KEY, token.clone());
                Ok(request)
            },
        );
        let task = runtime.spawn(poll_node0(shared.clone(), client, target));
        Ok(NodeLink { shared, task })
    }

    /// The supervisor's view of this link: ends the local attempt on node 0's word.
    pub fn stop_source(&self) -> Arc<dyn StopSource> {
        Arc::new(LinkStop(self.shared.clone()))
    }

    /// A new attempt's workers are starting.
    pub fn begin_attempt(&self, attempt: u32) {
        *lock(&self.shared.answer) = None;
        self.shared.change(|s| {
            s.attempt = attempt;
            s.state = NodeState::Running;
            s.workers_stopped = false;
            s.heard_exit = false;
            (s.exit_code, s.failed_at_ms, s.failed_rank) = (0, 0, 0);
            s.report.clear();
        });
    }

    /// Tells node 0 (at once) how the local attempt ended.
    pub fn report_outcome(&self, outcome: &Outcome) {
        self.shared.change(|s| {
            s.exit_code = outcome.exit_code();
            s.state = match outcome {
                Outcome::Success => NodeState::Finished,
                Outcome::Interrupted { .. } => NodeState::Interrupted,
                Outcome::Stopped { .. } => NodeState::Stopped,
                Outcome::WorkerFailed { .. } | Outcome::Hung { .. } => NodeState::Failed,
                Outcome::JoinTimeout { .. } => NodeState::Failed,
            };
            (s.failed_rank, s.failed_at_ms, s.report) = match outcome {
                Outcome::WorkerFailed {
                    rank,
                    report,
                    at_ms,
                    ..
                } => (*rank, *at_ms, report.clone()),
                Outcome::Hung { ranks, report } => (
                    ranks.first().copied().unwrap_or(0),
                    unix_ms(),
                    report.clone(),
                ),
                Outcome::JoinTimeout { message } => (0, unix_ms(), message.clone()),
                _ => (0, 0, String::new()),
            };
        });
    }

    /// Node 0 counts as lost (or refused this node).
    pub fn is_lost(&self) -> bool {
        self.shared.lost().is_some()
    }

    /// Every local worker of the attempt has exited.
    pub fn mark_stopped(&self) {
        self.shared.change(|s| s.workers_stopped = true);
    }

    /// Waits (up to `limit`) until node 0 has answered the newest status; true if it did.
    pub fn flush(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let wanted = self.shared.version.load(Ordering::SeqCst);
        while self.shared.answered.load(Ordering::SeqCst) < wanted {
            if Instant::now() >= deadline || self.shared.lost().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// After the local workers of `attempt` stopped: waits for node 0's decision.
    pub fn wait_for_decision(&self, attempt: u32) -> Decision {
        loop {
            // The answer first: under SLURM node 0's exit makes srun signal this
            // launcher right after node 0 has heard that this node holds the decision.
            let answer = self.shared.answer_for(attempt);
            let signal = STOP_SIGNAL.load(Ordering::SeqCst);
            if signal != 0 && !matches!(answer, Some(Directive::Exit { .. })) {
                return Decision::Signal(signal);
            }
            if let Some(why) = self.shared.lost() {
                return Decision::Lost(why);
            }
            match answer {
                Some(Directive::Restart {
                    attempt: next,
                    generation,
                    world,
                }) if next > attempt => {
                    return Decision::Restart {
                        attempt: next,
                        generation,
                        world,
                    };
                }
                Some(Directive::Exit { code, report }) => return Decision::Exit { code, report },
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

impl Drop for NodeLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The supervisor's stop source on node K: node 0 said stop (or already decided), or
/// node 0 is lost.
#[derive(Debug)]
struct LinkStop(Arc<Shared>);

impl StopSource for LinkStop {
    fn stop_outcome(&self) -> Option<Outcome> {
        if let Some(why) = self.0.lost() {
            return Some(Outcome::Stopped {
                reason: why,
                exit_code: 1,
            });
        }
        let attempt = lock(&self.0.status).attempt;
        match self.0.answer_for(attempt)? {
            Directive::Continue => None,
            _ => Some(Outcome::Stopped {
                reason: format!(
                    "node 0 ends attempt {attempt} (a rank failed elsewhere or node 0 stops the job): stopping this node's workers"
                ),
                exit_code: 1,
            }),
        }
    }
}

/// The poll loop: sends the newest status, keeps the answer, judges silence.
async fn poll_node0<F>(
    shared: Arc<Shared>,
    mut client: RendezvousClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, F>,
    >,
    target: LinkTarget,
) where
    F: tonic::service::Interceptor + Send + 'static,
{
    let started = Instant::now();
    let mut last_answer: Option<Instant> = None;
    loop {
        let version = shared.version.load(Ordering::SeqCst);
        let status = lock(&shared.status).clone();
        let asked_for = status.attempt;
        let span = info_span!("node_control", node = target.node_rank, attempt = asked_for);
        let request = wire_status(&target.job_id, &status);
        let call = client.node_control(request).instrument(span);
        let answer = match tokio::time::timeout(call_timeout(&target), call).await {
            Ok(answer) => answer,
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer within {:.1} s",
                call_timeout(&target).as_secs_f64()
            ))),
        };
        match answer {
            Ok(answer) => {
                last_answer = Some(Instant::now());
                let directive = directive_of(answer.into_inner());
                if matches!(directive, Directive::Exit { .. }) && !status.heard_exit {
                    // Acknowledged on the next poll, which this change starts at once;
                    // made before the answer is visible, so `flush` waits for it.
                    shared.change(|s| s.heard_exit = true);
                }
                *lock(&shared.answer) = Some((asked_for, directive));
                shared.answered.fetch_max(version, Ordering::SeqCst);
            }
            Err(status) if refuses_this_node(&status) => {
                *lock(&shared.lost) = Some(format!(
                    "node 0's rendezvous at {} refuses this node: {} ({:?})",
                    target.url,
                    status.message(),
                    status.code()
                ));
                return;
            }
            Err(status) => {
                let (since, allowed) = match last_answer {
                    Some(at) => (at, target.lost_after),
                    None => (started, target.first_contact_within.max(target.lost_after)),
                };
                if since.elapsed() > allowed {
                    let why = format!(
                        "node 0 is lost: its rendezvous at {} has been unreachable for {:.1} s (allowed {:.1} s: its launcher stopped, hangs, or the network is cut); last error: {}",
                        target.url,
                        since.elapsed().as_secs_f64(),
                        allowed.as_secs_f64(),
                        status.message()
                    );
                    warn!(node = target.node_rank, "{why}");
                    *lock(&shared.lost) = Some(why);
                    return;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL_PERIOD) => {}
            _ = shared.wake.notified() => {}
        }
    }
}

/// A call never waits longer than the silence that makes node 0 lost.
fn call_timeout(target: &LinkTarget) -> Duration {
    CALL_TIMEOUT.min(target.lost_after).max(POLL_PERIOD)
}

/// Answers that waiting will not change: wrong token, another job, a node rank node 0
/// does not know, another protocol.
fn refuses_this_node(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unauthenticated | Code::NotFound | Code::OutOfRange | Code::Unimplemented
    )
}

/// Node 0's stop source: the first remote event the rendezvous recorded for the
/// current attempt, as an `Outcome` naming the node.
#[derive(Debug)]
pub struct RemoteNodes(pub Arc<RendezvousState>);

impl StopSource for RemoteNodes {
    fn stop_outcome(&self) -> Option<Outcome> {
        let event = self.0.control().remote_event()?;
        Some(outcome_of_event(&self.0, event))
    }
}

/// `node 1 (host, ranks 2-3)`.
pub fn describe_node(state: &RendezvousState, node_rank: usize) -> String {
    let spec = state.spec();
    let Some((host, size)) = spec.nodes.get(node_rank) else {
        return format!("node {node_rank}");
    };
    let first = spec.rank_of(node_rank, 0).unwrap_or(0);
    format!(
        "node {node_rank} ({host}, ranks {first}-{})",
        first + size.saturating_sub(1)
    )
}

/// How a remote event ends node 0's attempt.
pub fn outcome_of_event(state: &RendezvousState, event: RemoteEvent) -> Outcome {
    match event {
        RemoteEvent::Failed(report) => Outcome::WorkerFailed {
            rank: report.failed_rank,
            exit_code: report.exit_code,
            report: format!(
                "rsdeep: {} failed:\n{}",
                describe_node(state, report.node_rank),
                report.report
            ),
            at_ms: report.failed_at_ms,
        },
        RemoteEvent::Interrupted(report) => Outcome::Interrupted {
            signal: match report.exit_code {
                code if code > 128 => code - 128,
                _ => libc::SIGTERM,
            },
        },
        // Not restarted: a node that lost node 0 for as long stops itself, so a new
        // generation could never complete.
        RemoteEvent::Lost {
            node_rank,
            silent_for,
        } => Outcome::Stopped {
            reason: format!(
                "{} is lost: its launcher has not polled node 0 for {:.1} s (it died, hangs, or the network is cut); ending the job without a restart",
                describe_node(state, node_rank),
                silent_for.as_secs_f64()
            ),
            exit_code: 1,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rendezvous::{ServerHandle, WorldSpec, start_server};

    const TOKEN: &str = "t0ken";

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    fn serve(runtime: &tokio::runtime::Runtime) -> (Arc<RendezvousState>, ServerHandle) {
        let spec = WorldSpec {
            job_id: "job".into(),
            nodes: vec![("node0".into(), 1), ("node1".into(), 1)],
            join_timeout: Duration::from_secs(10),
        };
        let state = Arc::new(RendezvousState::new(spec));
        let bind = ([127, 0, 0, 1], 0).into();
        let server = runtime
            .block_on(start_server(state.clone(), TOKEN.into(), bind))
            .unwrap();
        (state, server)
    }

    fn target(server: &ServerHandle, token: &str, lost_after: Duration) -> LinkTarget {
        LinkTarget {
            url: format!("http://{}", server.addr),
            token: token.into(),
            job_id: "job".into(),
            node_rank: 1,
            tls: None,
            first_contact_within: lost_after,
            lost_after,
        }
    }

    fn until(limit: Duration, what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + limit;
        while !done() {
            assert!(Instant::now() < deadline, "{what} within {limit:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_node_reports_its_failure_stops_on_node_0s_word_and_restarts_when_told() {
        let runtime = runtime();
        let (state, _server) = serve(&runtime);
        let link = NodeLink::start(
            runtime.handle(),
            target(&_server, TOKEN, Duration::from_secs(30)),
        )
        .unwrap();
        let stop = link.stop_source();
        assert!(link.flush(Duration::from_secs(5)), "node 0 answers");
        assert_eq!(stop.stop_outcome(), None, "node 0 says continue");
        let failed = Outcome::WorkerFailed {
            rank: 1,
            exit_code: 137,
            report: "rank 1 failed first\n".into(),
            at_ms: 42,
        };
        link.report_outcome(&failed);
        assert!(link.flush(Duration::from_secs(5)));
        let Some(Outcome::WorkerFailed {
            rank,
            at_ms,
            report,
            ..
        }) = RemoteNodes(state.clone()).stop_outcome()
        else {
            panic!("node 0 did not hear node 1's failure");
        };
        assert_eq!((rank, at_ms), (1, 42));
        assert!(
            report.starts_with("rsdeep: node 1 (node1, ranks 1-1) failed:\nrank 1 failed first")
        );
        state.control().stop_all();
        until(Duration::from_secs(5), "node 1 told to stop", || {
            stop.stop_outcome().is_some()
        });
        link.mark_stopped();
        until(Duration::from_secs(5), "node 1 reported stopped", || {
            state.control().all_ended()
        });
        let generation = state.next_generation();
        state.control().begin_attempt(1, generation);
        assert_eq!(
            link.wait_for_decision(0),
            Decision::Restart {
                attempt: 1,
                generation: 2,
                world: vec![0, 1],
            }
        );
        link.begin_attempt(1);
        assert!(link.flush(Duration::from_secs(5)));
        assert_eq!(stop.stop_outcome(), None, "the new attempt runs");
        state.control().decide_exit(137, "the job's failure".into());
        link.report_outcome(&Outcome::Success);
        link.mark_stopped();
        assert_eq!(
            link.wait_for_decision(1),
            Decision::Exit {
                code: 137,
                report: "the job's failure".into()
            }
        );
    }

    #[test]
    fn a_wrong_token_is_refused_at_once_and_a_vanished_node_0_is_lost() {
        let runtime = runtime();
        let (state, mut server) = serve(&runtime);
        let started = Instant::now();
        let intruder = NodeLink::start(
            runtime.handle(),
            target(&server, "nope", Duration::from_secs(30)),
        )
        .unwrap();
        let Decision::Lost(why) = intruder.wait_for_decision(0) else {
            panic!("a refused node must stop");
        };
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "refusal is not retried"
        );
        assert!(
            why.contains("refuses this node") && why.contains("wrong rendezvous token"),
            "{why}"
        );
        assert_eq!(
            state.control().reports()[1],
            None,
            "a refused poll stores nothing"
        );

        let silence = Duration::from_millis(500);
        let link = NodeLink::start(runtime.handle(), target(&server, TOKEN, silence)).unwrap();
        assert!(link.flush(Duration::from_secs(5)));
        server.shutdown();
        let stopped = Instant::now();
        until(Duration::from_secs(10), "node 0 lost", || link.is_lost());
        assert!(
            stopped.elapsed() >= silence,
            "lost only after the allowed silence"
        );
        let Some(Outcome::Stopped { reason, exit_code }) = link.stop_source().stop_outcome() else {
            panic!("a lost node 0 ends the local attempt");
        };
        assert_eq!(exit_code, 1);
        assert!(
            reason.starts_with("node 0 is lost: its rendezvous at http://127.0.0.1:"),
            "{reason}"
        );
    }
}
