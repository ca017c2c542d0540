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
use rsdeep_proto::{RSDEEP_VERSION, TOKEN_METADATA_KEY};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, info_span, warn};

use super::state::{Command, ErrorRecord, Member, RendezvousError, RendezvousState};

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
            let (generation, members) = self.state.wait_for_world().await?;
            Ok(Response::new(join_response(
                &self.state,
                rank,
                generation,
                &members,
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
            let mut attached = false;
            while let Some(Ok(beat)) = inbound.next().await {
                if state.check_job(&beat.job_id).is_err() {
                    warn!(rank = beat.rank, "heartbeat for another job ignored");
                    break;
                }
                if !attached {
                    state.attach_commands(beat.rank as usize, sender.clone());
                    attached = true;
                }
                state.record_progress(
                    beat.rank as usize,
                    beat.step,
                    beat.loss,
                    beat.tokens_per_second,
                );
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
        });
        Ok(Response::new(pb::ErrorAck {}))
    }
}

fn join_response(
    state: &RendezvousState,
    rank: usize,
    generation: u64,
    members: &[Member],
) -> pb::JoinResponse {
    let me = &members[rank];
    let spec = state.spec();
    pb::JoinResponse {
        rank: rank as u32,
        world_size: members.len() as u32,
        local_rank: me.local_rank as u32,
        local_world_size: spec.nodes[me.node_rank].1 as u32,
        node_rank: me.node_rank as u32,
        num_nodes: spec.nodes.len() as u32,
        generation,
        peers: members
            .iter()
            .map(|m| pb::Peer {
                rank: m.rank as u32,
                host: m.host.clone(),
                comm_addr: m.comm_addr.clone(),
                node_rank: m.node_rank as u32,
                local_rank: m.local_rank as u32,
            })
            .collect(),
    }
}

/// Refuses any call whose token metadata is missing or differs from the job token.
fn token_checker(token: String) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
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
            Some(_) => Ok(request),
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
    shutdown: Option<oneshot::Sender<()>>,
}

impl ServerHandle {
    /// Stops accepting calls.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Binds `bind` (port 0 picks a free one) and serves `state` guarded by `token` on the
/// current tokio runtime.
pub async fn start_server(
    state: Arc<RendezvousState>,
    token: String,
    bind: SocketAddr,
) -> std::io::Result<ServerHandle> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let service =
        RendezvousServer::with_interceptor(RendezvousService { state }, token_checker(token));
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(16_384))
            .tcp_nodelay(true)
            .add_service(service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = rx.await;
            })
            .await;
        if let Err(e) = served {
            warn!("rendezvous server stopped: {e}");
        }
    });
    info!(%addr, "rendezvous listening");
    Ok(ServerHandle {
        addr,
        shutdown: Some(tx),
    })
}
