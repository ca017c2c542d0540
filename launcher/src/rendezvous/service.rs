//! The gRPC face of the rendezvous: maps `proto/proto/rendezvous.proto` calls onto
//! `RendezvousState` and its errors onto precise gRPC statuses (wrong token:
//! UNAUTHENTICATED; unknown job: NOT_FOUND; other version: FAILED_PRECONDITION; duplicate
//! rank: ALREADY_EXISTS; join beyond the world: OUT_OF_RANGE; timeouts: DEADLINE_EXCEEDED).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rsdeep_proto::v1::rendezvous_server::{Rendezvous, RendezvousServer};
use rsdeep_proto::v1::{self as pb, heartbeat_command::Kind};
use rsdeep_proto::{Bytes, RSDEEP_VERSION, TOKEN_METADATA_KEY, encode_peer_table};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::ServerTlsConfig;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, info_span, warn};

use super::control::{Directive, NodeReport, NodeState};
use super::guard::{ConnectionGuard, GuardLimits, guarded_incoming};
use super::state::{
    Command, CompleteWorld, ErrorRecord, Member, RankPhase, RendezvousError, RendezvousState,
};

/// Longest a blocking Get/Barrier may wait when the client asks for no limit.
const DEFAULT_WAIT: Duration = Duration::from_secs(1800);

impl From<RendezvousError> for Status {
    fn from(err: RendezvousError) -> Status {
        let message = err.to_string();
        match err {
            RendezvousError::UnknownJob { .. } => Status::not_found(message),
            RendezvousError::Version { .. } => Status::failed_precondition(message),
            RendezvousError::BeyondWorld { .. } | RendezvousError::BadRank { .. } => {
                Status::out_of_range(message)
            }
            RendezvousError::DuplicateRank { .. } => Status::already_exists(message),
            RendezvousError::JoinTimeout { .. }
            | RendezvousError::KeyTimeout { .. }
            | RendezvousError::BarrierTimeout { .. } => Status::deadline_exceeded(message),
        }
    }
}

/// The tonic service over one job's state.
#[derive(Debug, Clone)]
pub struct RendezvousService {
    state: Arc<RendezvousState>,
    /// The encoded peer table of the last completed world, built once per generation.
    peer_table: Arc<std::sync::Mutex<Option<EncodedPeers>>>,
}

/// A generation number and its encoded `PeerTable` (shared by every Join answer).
type EncodedPeers = (u64, Bytes);

impl RendezvousService {
    fn new(state: Arc<RendezvousState>) -> Self {
        RendezvousService {
            state,
            peer_table: Default::default(),
        }
    }

    /// The encoded peer table of `world`: encoded by the first answer of a generation,
    /// then handed out as refcounted clones (O(world) encoding per generation).
    fn peer_table(&self, world: &CompleteWorld) -> Bytes {
        let mut cache = self.peer_table.lock().unwrap_or_else(|p| p.into_inner());
        match cache.as_ref() {
            Some((generation, table)) if *generation == world.generation => table.clone(),
            _ => {
                let table = encode_peer_table(world.members.iter().map(wire_peer).collect());
                *cache = Some((world.generation, table.clone()));
                table
            }
        }
    }
}

fn wire_peer(m: &Member) -> pb::Peer {
    pb::Peer {
        rank: m.rank as u32,
        host: m.host.clone(),
        comm_addr: m.comm_addr.clone(),
        node_rank: m.node_rank as u32,
        local_rank: m.local_rank as u32,
    }
}

fn wait_limit(timeout_ms: u64) -> Duration {
    if timeout_ms == 0 {
        DEFAULT_WAIT
    } else {
        Duration::from_millis(timeout_ms)
    }
}

#[tonic::async_trait]
impl Rendezvous for RendezvousService {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let req = request.into_inner();
        self.state.check_job(&req.job_id)?;
        if req.version != RSDEEP_VERSION {
            return Err(RendezvousError::Version {
                worker: req.version,
                launcher: RSDEEP_VERSION.into(),
            }
            .into());
        }
        let span = info_span!(
            "rendezvous.join",
            node = req.node_rank,
            local_rank = req.local_rank
        );
        async move {
            let rank = self.state.register(Member {
                rank: 0,
                node_rank: req.node_rank as usize,
                local_rank: req.local_rank as usize,
                host: req.host,
                comm_addr: req.comm_addr,
                pid: req.pid,
            })?;
            let world = self.state.wait_for_world().await?;
            let peer_table = self.peer_table(&world);
            Ok(Response::new(join_response(
                &self.state,
                rank,
                &world,
                peer_table,
            )))
        }
        .instrument(span)
        .await
    }

    async fn set(
        &self,
        request: Request<pb::SetRequest>,
    ) -> Result<Response<pb::SetResponse>, Status> {
        let req = request.into_inner();
        self.state.check_job(&req.job_id)?;
        self.state.set(&req.key, req.value);
        Ok(Response::new(pb::SetResponse {}))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let req = request.into_inner();
        self.state.check_job(&req.job_id)?;
        let value = self.state.get(&req.key, wait_limit(req.timeout_ms)).await?;
        Ok(Response::new(pb::GetResponse { value }))
    }

    async fn barrier(
        &self,
        request: Request<pb::BarrierRequest>,
    ) -> Result<Response<pb::BarrierResponse>, Status> {
        let req = request.into_inner();
        self.state.check_job(&req.job_id)?;
        let span = info_span!("rendezvous.barrier", rank = req.rank, name = %req.name);
        self.state
            .barrier(&req.name, req.rank as usize, wait_limit(req.timeout_ms))
            .instrument(span)
            .await?;
        Ok(Response::new(pb::BarrierResponse {}))
    }

    type HeartbeatStream = Pin<Box<dyn Stream<Item = Result<pb::HeartbeatCommand, Status>> + Send>>;

    async fn heartbeat(
        &self,
        request: Request<Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let mut inbound = request.into_inner();
        let (sender, receiver) = mpsc::channel::<Command>(8);
        let state = self.state.clone();
        tokio::spawn(async move {
            // (generation, rank) of this stream, once its first beat was accepted.
            let mut attached = None;
            while let Some(Ok(beat)) = inbound.next().await {
                if state.check_job(&beat.job_id).is_err() {
                    warn!(rank = beat.rank, "heartbeat for another job ignored");
                    break;
                }
                let rank = beat.rank as usize;
                let recorded = state.record_heartbeat(
                    beat.generation,
                    rank,
                    beat.step,
                    beat.loss,
                    beat.tokens_per_second,
                );
                if recorded {
                    let phase = RankPhase::from_beat(
                        &beat.phase,
                        beat.phase_step,
                        &beat.collective,
                        beat.collective_seq,
                        beat.phase_secs,
                    );
                    state.record_phase(beat.generation, rank, phase);
                }
                if recorded && attached.is_none() {
                    state.attach_commands(rank, sender.clone());
                    attached = Some((beat.generation, rank));
                }
            }
            if let Some((generation, rank)) = attached {
                state.heartbeat_closed(generation, rank);
            }
        });
        let commands = ReceiverStream::new(receiver).map(|command| {
            let kind = match command {
                Command::Stop => Kind::Stop,
                Command::SaveNow => Kind::SaveNow,
            };
            Ok(pb::HeartbeatCommand { kind: kind as i32 })
        });
        Ok(Response::new(Box::pin(commands)))
    }

    async fn report_error(
        &self,
        request: Request<pb::ErrorReport>,
    ) -> Result<Response<pb::ErrorAck>, Status> {
        let req = request.into_inner();
        self.state.check_job(&req.job_id)?;
        self.state.record_error(ErrorRecord {
            rank: req.rank as usize,
            message: req.message,
            time_ms: req.time_ms,
            caused_by_another_rank: req.caused_by_another_rank,
        });
        Ok(Response::new(pb::ErrorAck {}))
    }

    async fn node_control(
        &self,
        request: Request<pb::NodeStatus>,
    ) -> Result<Response<pb::NodeDirective>, Status> {
        let req = request.into_inner();
        self.state.check_job(&req.job_id)?;
        let report = node_report(req);
        let span = info_span!("rendezvous.node_control", node = report.node_rank);
        let directive = span
            .in_scope(|| self.state.control().poll(report))
            .map_err(|e| Status::out_of_range(e.to_string()))?;
        Ok(Response::new(wire_directive(directive)))
    }
}

/// A `NodeStatus` as the control state machine reads it.
pub fn node_report(status: pb::NodeStatus) -> NodeReport {
    use pb::node_status::State;
    let state = match State::try_from(status.state).unwrap_or(State::Running) {
        State::Running => NodeState::Running,
        State::Finished => NodeState::Finished,
        State::Failed => NodeState::Failed,
        State::Interrupted => NodeState::Interrupted,
        State::Stopped => NodeState::Stopped,
    };
    NodeReport {
        node_rank: status.node_rank as usize,
        attempt: status.attempt,
        state,
        workers_stopped: status.workers_stopped,
        exit_code: status.exit_code,
        failed_at_ms: status.failed_at_ms,
        failed_rank: status.failed_rank as usize,
        report: status.report,
        heard_exit: status.heard_exit,
    }
}

/// The wire form of a node's poll (the inverse of `node_report`).
pub fn wire_status(job_id: &str, report: &NodeReport) -> pb::NodeStatus {
    use pb::node_status::State;
    let state = match report.state {
        NodeState::Running => State::Running,
        NodeState::Finished => State::Finished,
        NodeState::Failed => State::Failed,
        NodeState::Interrupted => State::Interrupted,
        NodeState::Stopped => State::Stopped,
    };
    pb::NodeStatus {
        job_id: job_id.to_string(),
        node_rank: report.node_rank as u32,
        attempt: report.attempt,
        state: state as i32,
        workers_stopped: report.workers_stopped,
        exit_code: report.exit_code,
        failed_at_ms: report.failed_at_ms,
        failed_rank: report.failed_rank as u32,
        report: report.report.clone(),
        heard_exit: report.heard_exit,
    }
}

/// Node 0's answer as a node reads it (an unknown action reads as `Continue`).
pub fn directive_of(wire: pb::NodeDirective) -> Directive {
    use pb::node_directive::Action;
    match Action::try_from(wire.action).unwrap_or(Action::Continue) {
        Action::Continue => Directive::Continue,
        Action::Stop => Directive::Stop,
        Action::Restart => Directive::Restart {
            attempt: wire.attempt,
            generation: wire.generation,
            world: wire.world_nodes.iter().map(|&n| n as usize).collect(),
        },
        Action::Exit => Directive::Exit {
            code: wire.exit_code,
            report: wire.report,
        },
    }
}

/// The wire form of node 0's answer.
pub fn wire_directive(directive: Directive) -> pb::NodeDirective {
    use pb::node_directive::Action;
    let mut wire = pb::NodeDirective::default();
    let action = match directive {
        Directive::Continue => Action::Continue,
        Directive::Stop => Action::Stop,
        Directive::Restart {
            attempt,
            generation,
            world,
        } => {
            (wire.attempt, wire.generation) = (attempt, generation);
            wire.world_nodes = world.into_iter().map(|n| n as u32).collect();
            Action::Restart
        }
        Directive::Exit { code, report } => {
            (wire.exit_code, wire.report) = (code, report);
            Action::Exit
        }
    };
    wire.action = action as i32;
    wire
}

fn join_response(
    state: &RendezvousState,
    rank: usize,
    world: &CompleteWorld,
    peer_table: Bytes,
) -> pb::JoinResponse {
    let me = &world.members[rank];
    let spec = state.spec();
    pb::JoinResponse {
        rank: rank as u32,
        world_size: world.members.len() as u32,
        local_rank: me.local_rank as u32,
        local_world_size: spec.nodes[me.node_rank].1 as u32,
        node_rank: me.node_rank as u32,
        num_nodes: spec.nodes.len() as u32,
        generation: world.generation,
        peer_table,
    }
}

/// Refuses any call whose token metadata is missing or differs from the job token.
/// Checks every call's token; a call that passes marks its connection authenticated in
/// `guard` (connections without one are closed after the guard's deadline).
fn token_checker(
    token: String,
    guard: Arc<ConnectionGuard>,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let given = request
            .metadata()
            .get(TOKEN_METADATA_KEY)
            .map(|v| v.as_bytes());
        match given {
            None => Err(Status::unauthenticated(format!(
                "missing rendezvous token (metadata '{TOKEN_METADATA_KEY}')"
            ))),
            Some(given) if !constant_time_eq(given, token.as_bytes()) => {
                Err(Status::unauthenticated(
                    "wrong rendezvous token for this job (RSDEEP_TOKEN does not match the launcher's)",
                ))
            }
            Some(_) => {
                guard.authenticated(request.remote_addr());
                Ok(request)
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A running rendezvous server; dropping the handle does not stop it, `shutdown` does.
#[derive(Debug)]
pub struct ServerHandle {
    pub addr: SocketAddr,
    /// The accepted connections' standing (flood defence).
    pub guard: Arc<ConnectionGuard>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// Stops accepting calls; open connections are served until they close.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Stops the server at once: the listener and every open connection are dropped (so
    /// the port can be bound again as soon as the runtime has cancelled the task).
    pub fn abort(&mut self) {
        self.shutdown();
        self.task.abort();
    }
}

/// Pending connections the listener queues: a thousand workers dialing at the same moment
/// must not overflow the accept queue (a dropped handshake costs a 1 s SYN retransmit).
const ACCEPT_BACKLOG: u32 = 4096;

/// Binds the rendezvous listener with a backlog of `ACCEPT_BACKLOG` (the kernel caps it
/// at `net.core.somaxconn`).
fn bind_listener(bind: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match bind {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(bind)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Binds `bind` (port 0 picks a free one) and serves `state` guarded by `token` on the
/// current tokio runtime, in plaintext.
pub async fn start_server(
    state: Arc<RendezvousState>,
    token: String,
    bind: SocketAddr,
) -> std::io::Result<ServerHandle> {
    start_server_tls(state, token, bind, None).await
}

/// Like `start_server`, over TLS when `tls` is given (see `super::tls::server_config`);
/// an unusable certificate/key pair fails here, before anything listens.
pub async fn start_server_tls(
    state: Arc<RendezvousState>,
    token: String,
    bind: SocketAddr,
    tls: Option<ServerTlsConfig>,
) -> std::io::Result<ServerHandle> {
    start_server_guarded(state, token, bind, tls, GuardLimits::default()).await
}

/// `start_server_tls` with explicit flood-defence limits.
pub async fn start_server_guarded(
    state: Arc<RendezvousState>,
    token: String,
    bind: SocketAddr,
    tls: Option<ServerTlsConfig>,
    limits: GuardLimits,
) -> std::io::Result<ServerHandle> {
    let mut builder = tonic::transport::Server::builder();
    let secure = tls.is_some();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(|e| {
            std::io::Error::other(format!(
                "the TLS certificate and key do not form a usable identity: {e:?}"
            ))
        })?;
    }
    let listener = bind_listener(bind)?;
    let addr = listener.local_addr()?;
    let guard = ConnectionGuard::new(limits);
    let service = RendezvousServer::with_interceptor(
        RendezvousService::new(state),
        token_checker(token, guard.clone()),
    );
    let incoming = guarded_incoming(listener, guard.clone());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let served = builder
            .max_concurrent_streams(Some(16_384))
            .tcp_nodelay(true)
            // Join answers carry every peer (about 40 bytes each): large windows keep
            // thousands of simultaneous answers from stalling on WINDOW_UPDATE round trips.
            .initial_connection_window_size(Some(32 << 20))
            .initial_stream_window_size(Some(4 << 20))
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await;
        if let Err(e) = served {
            warn!("rendezvous server stopped: {e}");
        }
    });
    info!(%addr, tls = secure, "rendezvous listening");
    Ok(ServerHandle {
        addr,
        guard,
        shutdown: Some(tx),
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rendezvous::WorldSpec;
    use rsdeep_proto::v1::rendezvous_client::RendezvousClient;
    use tonic::transport::Channel;

    const TOKEN: &str = "t0ken";

    async fn serve(local_ranks: usize, timeout: Duration) -> (Arc<RendezvousState>, ServerHandle) {
        let spec = WorldSpec {
            job_id: "job".into(),
            nodes: vec![("localhost".into(), local_ranks)],
            join_timeout: timeout,
        };
        let state = Arc::new(RendezvousState::new(spec));
        let server = start_server(state.clone(), TOKEN.into(), ([127, 0, 0, 1], 0).into())
            .await
            .unwrap();
        (state, server)
    }

    async fn client(server: &ServerHandle) -> RendezvousClient<Channel> {
        RendezvousClient::connect(format!("http://{}", server.addr))
            .await
            .unwrap()
    }

    fn with_token<T>(message: T, token: &str) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert(TOKEN_METADATA_KEY, token.parse().unwrap());
        request
    }

    fn join(local_rank: u32, job: &str, version: &str) -> pb::JoinRequest {
        pb::JoinRequest {
            job_id: job.into(),
            version: version.into(),
            node_rank: 0,
            local_rank,
            host: "localhost".into(),
            comm_addr: format!("127.0.0.1:{}", 7000 + local_rank),
            pid: 42 + local_rank,
        }
    }

    async fn serve_nodes(nodes: usize) -> (Arc<RendezvousState>, ServerHandle) {
        let spec = WorldSpec {
            job_id: "job".into(),
            nodes: (0..nodes).map(|n| (format!("node{n}"), 1)).collect(),
            join_timeout: Duration::from_secs(10),
        };
        let state = Arc::new(RendezvousState::new(spec));
        let server = start_server(state.clone(), TOKEN.into(), ([127, 0, 0, 1], 0).into())
            .await
            .unwrap();
        (state, server)
    }

    fn node_status(job: &str, node_rank: usize, state: NodeState) -> pb::NodeStatus {
        let report = NodeReport {
            node_rank,
            attempt: 0,
            state,
            workers_stopped: false,
            exit_code: 137,
            failed_at_ms: 1234,
            failed_rank: 1,
            report: "rank 1 failed first".into(),
            heard_exit: false,
        };
        wire_status(job, &report)
    }

    /// Opens `count` TCP connections to `addr`; with `junk` each sends it first.
    async fn open_sockets(
        addr: SocketAddr,
        count: usize,
        junk: &[u8],
    ) -> Vec<tokio::net::TcpStream> {
        use tokio::io::AsyncWriteExt;
        let mut sockets = Vec::with_capacity(count);
        for _ in 0..count {
            let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
            if !junk.is_empty() {
                let _ = socket.write_all(junk).await;
            }
            sockets.push(socket);
        }
        sockets
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_idle_and_junk_connections_neither_blocks_the_world_nor_stays_open() {
        use tokio::io::AsyncReadExt;
        super::super::guard::raise_open_file_limit().unwrap();
        let spec = WorldSpec {
            job_id: "job".into(),
            nodes: vec![("localhost".into(), 2)],
            join_timeout: Duration::from_secs(30),
        };
        let state = Arc::new(RendezvousState::new(spec));
        let limits = GuardLimits {
            auth_deadline: Duration::from_millis(1500),
            max_pending: 256,
        };
        let bind = ([127, 0, 0, 1], 0).into();
        let server = start_server_guarded(state, TOKEN.into(), bind, None, limits)
            .await
            .unwrap();
        // Opened before any worker: 1500 silent sockets and 100 that send junk.
        let mut flood = open_sockets(server.addr, 1500, b"").await;
        flood.extend(open_sockets(server.addr, 100, b"GET / HTTP/1.1\r\n\r\n\x00\xff junk").await);
        let started = std::time::Instant::now();
        let (mut c0, mut c1) = (client(&server).await, client(&server).await);
        let (a, b) = tokio::join!(
            c0.join(with_token(join(0, "job", RSDEEP_VERSION), TOKEN)),
            c1.join(with_token(join(1, "job", RSDEEP_VERSION), TOKEN)),
        );
        assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
        let formed = started.elapsed();
        assert!(
            formed < Duration::from_secs(5),
            "the world formed after {formed:?}"
        );
        assert!(
            server.guard.pending() <= limits.max_pending,
            "at most max_pending wait"
        );
        // Past the deadline every flood connection is closed by the server (EOF or reset)
        // and the workers' connections still serve calls.
        tokio::time::sleep(limits.auth_deadline * 2).await;
        for socket in flood.iter_mut().step_by(40) {
            // Whatever the server sent (its HTTP/2 settings, a GOAWAY), then the end.
            let mut sink = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut sink)).await;
            assert!(read.is_ok(), "a flood connection is still open");
        }
        assert_eq!(server.guard.pending(), 0);
        let set = pb::SetRequest {
            job_id: "job".into(),
            key: "k".into(),
            value: b"v".to_vec(),
        };
        c0.set(with_token(set, TOKEN))
            .await
            .expect("an authenticated connection stays");
    }

    #[tokio::test]
    async fn node_control_refuses_wrong_tokens_unknown_jobs_and_nodes_and_stores_nothing() {
        let (state, server) = serve_nodes(2).await;
        let mut c = client(&server).await;
        let status = node_status("job", 1, NodeState::Failed);
        let wrong = c
            .node_control(with_token(status.clone(), "nope"))
            .await
            .unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        let missing = c
            .node_control(Request::new(status.clone()))
            .await
            .unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        let other = node_status("other", 1, NodeState::Failed);
        let job = c.node_control(with_token(other, TOKEN)).await.unwrap_err();
        assert_eq!(job.code(), tonic::Code::NotFound);
        let beyond = node_status("job", 2, NodeState::Failed);
        let node = c.node_control(with_token(beyond, TOKEN)).await.unwrap_err();
        assert_eq!(node.code(), tonic::Code::OutOfRange);
        assert_eq!(
            state.control().remote_event(),
            None,
            "refused polls store nothing"
        );
        // The real poll is stored: node 1's failure, with its time and report, reaches node 0.
        let answer = c.node_control(with_token(status, TOKEN)).await.unwrap();
        assert_eq!(directive_of(answer.into_inner()), Directive::Continue);
        let Some(super::super::control::RemoteEvent::Failed(report)) =
            state.control().remote_event()
        else {
            panic!("node 1's failure was not recorded");
        };
        assert_eq!(
            (report.failed_rank, report.failed_at_ms, report.exit_code),
            (1, 1234, 137)
        );
        assert_eq!(report.report, "rank 1 failed first");
        state.control().decide_exit(137, "the report".into());
        let running = node_status("job", 1, NodeState::Running);
        let answer = c.node_control(with_token(running, TOKEN)).await.unwrap();
        assert_eq!(
            directive_of(answer.into_inner()),
            Directive::Exit {
                code: 137,
                report: "the report".into()
            }
        );
    }

    #[test]
    fn directives_survive_the_wire() {
        for directive in [
            Directive::Continue,
            Directive::Stop,
            Directive::Restart {
                attempt: 2,
                generation: 3,
                world: vec![0, 2],
            },
            Directive::Exit {
                code: 143,
                report: "r".into(),
            },
        ] {
            assert_eq!(directive_of(wire_directive(directive.clone())), directive);
        }
        let wire = node_status("job", 1, NodeState::Interrupted);
        let back = wire_status("job", &node_report(wire.clone()));
        assert_eq!(back, wire);
    }

    #[tokio::test]
    async fn refusals_carry_precise_statuses() {
        let (_state, server) = serve(2, Duration::from_millis(300)).await;
        let mut c = client(&server).await;
        let wrong = c
            .join(with_token(join(0, "job", RSDEEP_VERSION), "nope"))
            .await
            .unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(
            wrong.message().contains("wrong rendezvous token"),
            "{}",
            wrong.message()
        );
        let missing = c
            .join(Request::new(join(0, "job", RSDEEP_VERSION)))
            .await
            .unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        let job = c
            .join(with_token(join(0, "other", RSDEEP_VERSION), TOKEN))
            .await
            .unwrap_err();
        assert_eq!(job.code(), tonic::Code::NotFound);
        let version = c
            .join(with_token(join(0, "job", "0.0.0-old"), TOKEN))
            .await
            .unwrap_err();
        assert_eq!(version.code(), tonic::Code::FailedPrecondition);
        // The refusal names both versions, the worker's and the launcher's.
        let both = format!(
            "rsdeep version mismatch: worker runs 0.0.0-old, launcher runs {RSDEEP_VERSION}"
        );
        assert!(version.message().contains(&both), "{}", version.message());
        let beyond = c
            .join(with_token(join(2, "job", RSDEEP_VERSION), TOKEN))
            .await
            .unwrap_err();
        assert_eq!(beyond.code(), tonic::Code::OutOfRange);
        // Rank 0 joins and waits; a second rank 0 is a duplicate; rank 1 never comes.
        let mut first = c.clone();
        let waiting = tokio::spawn(async move {
            first
                .join(with_token(join(0, "job", RSDEEP_VERSION), TOKEN))
                .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let duplicate = c
            .join(with_token(join(0, "job", RSDEEP_VERSION), TOKEN))
            .await
            .unwrap_err();
        assert_eq!(duplicate.code(), tonic::Code::AlreadyExists);
        let timeout = waiting.await.unwrap().unwrap_err();
        assert_eq!(timeout.code(), tonic::Code::DeadlineExceeded);
        assert!(
            timeout
                .message()
                .contains("never arrived: rank 1 (host localhost"),
            "{}",
            timeout.message()
        );
    }

    #[tokio::test]
    async fn join_store_barrier_heartbeat_and_error_report_round_trip() {
        let (state, server) = serve(2, Duration::from_secs(10)).await;
        let c = client(&server).await;
        let joins: Vec<_> = (0..2u32)
            .map(|r| {
                let mut c = c.clone();
                tokio::spawn(async move {
                    c.join(with_token(join(r, "job", RSDEEP_VERSION), TOKEN))
                        .await
                })
            })
            .collect();
        for (r, handle) in joins.into_iter().enumerate() {
            let answer = handle.await.unwrap().unwrap().into_inner();
            assert_eq!(
                (answer.rank as usize, answer.world_size, answer.generation),
                (r, 2, 1)
            );
            let peers = rsdeep_proto::decode_peer_table(&answer.peer_table).unwrap();
            let addrs: Vec<_> = peers.iter().map(|p| p.comm_addr.as_str()).collect();
            assert_eq!(addrs, ["127.0.0.1:7000", "127.0.0.1:7001"]);
        }
        let mut c1 = c.clone();
        let getter = tokio::spawn(async move {
            let get = pb::GetRequest {
                job_id: "job".into(),
                key: "id".into(),
                timeout_ms: 5000,
            };
            c1.get(with_token(get, TOKEN)).await
        });
        let mut c0 = c.clone();
        let set = pb::SetRequest {
            job_id: "job".into(),
            key: "id".into(),
            value: vec![9; 128],
        };
        c0.set(with_token(set, TOKEN)).await.unwrap();
        assert_eq!(
            getter.await.unwrap().unwrap().into_inner().value,
            vec![9; 128]
        );
        let barriers: Vec<_> = (0..2u32)
            .map(|rank| {
                let mut c = c.clone();
                let req = pb::BarrierRequest {
                    job_id: "job".into(),
                    name: "b".into(),
                    rank,
                    timeout_ms: 5000,
                };
                tokio::spawn(async move { c.barrier(with_token(req, TOKEN)).await })
            })
            .collect();
        for b in barriers {
            b.await.unwrap().unwrap();
        }
        let (beat_tx, beat_rx) = mpsc::channel(4);
        let beat = pb::HeartbeatRequest {
            job_id: "job".into(),
            rank: 1,
            step: 7,
            loss: 2.5,
            tokens_per_second: 100.0,
            generation: 1,
            ..Default::default()
        };
        beat_tx.send(beat).await.unwrap();
        let mut commands = c0
            .heartbeat(with_token(ReceiverStream::new(beat_rx), TOKEN))
            .await
            .unwrap()
            .into_inner();
        while state.progress().get(&1).is_none_or(|p| p.step != 7) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(state.broadcast_command(Command::SaveNow), 1);
        let command = commands.next().await.unwrap().unwrap();
        assert_eq!(command.kind, Kind::SaveNow as i32);
        let report = pb::ErrorReport {
            job_id: "job".into(),
            rank: 1,
            message: "CUDA OOM".into(),
            time_ms: 1,
            caused_by_another_rank: false,
        };
        c0.report_error(with_token(report, TOKEN)).await.unwrap();
        assert_eq!(state.errors_of(1)[0].message, "CUDA OOM");
        drop(beat_tx);
        // The ended stream takes rank 1 out of the hang check.
        while state.progress().get(&1).is_some_and(|p| !p.closed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
