//! The worker's side of the rendezvous: reads the launcher's environment contract
//! (`rsdeep_contract::env`), binds the TCP listener for collectives, joins the gRPC
//! rendezvous (`proto/proto/rendezvous.proto`) and exposes the store, barriers,
//! heartbeats and error reports through a blocking API (it owns a small tokio runtime,
//! so engine code stays synchronous).
//!
//! ```no_run
//! # fn main() -> rsdeep_worker::Result<()> {
//! use rsdeep_worker::rendezvous::{WorkerEnv, join_world};
//! let env = WorkerEnv::from_env()?;
//! let (rendezvous, world, listener) = join_world(&env)?;
//! // world.peers[r].comm_addr is where rank r's listener accepts ring connections.
//! # Ok(()) }
//! ```

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::train::phase::PhaseSnapshot;
use rsdeep_contract::env as ev;
use rsdeep_proto::tls;
use rsdeep_proto::v1::{self as pb, heartbeat_command::Kind, rendezvous_client::RendezvousClient};
use rsdeep_proto::{RSDEEP_VERSION, TOKEN_METADATA_KEY, decode_peer_table};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info_span};

use crate::{Error, Result};

/// How long a worker keeps trying to reach the rendezvous before giving up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);

/// Everything the launcher told this worker through its environment.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerEnv {
    /// The rank the launcher planned (the rendezvous confirms it on Join).
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub local_world_size: usize,
    pub node_rank: usize,
    pub num_nodes: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub job_id: String,
    pub token: String,
    /// `cpu` or `cuda`.
    pub device: String,
    /// This node's host name as the launcher knows it.
    pub host: String,
    /// Address to bind the collective listener on (port picked by the OS).
    pub comm_host: String,
    /// The resolved train.json, absent in selftest runs.
    pub config: Option<PathBuf>,
    pub selftest: bool,
    pub restart_count: u32,
    pub heartbeat_interval: Duration,
    /// PEM CA to trust when the rendezvous speaks TLS (`RSDEEP_TLS_CA`); plaintext if absent.
    pub tls_ca: Option<PathBuf>,
    /// Name checked against the rendezvous certificate (`RSDEEP_TLS_DOMAIN`, default
    /// `master_addr`).
    pub tls_domain: Option<String>,
}

impl WorkerEnv {
    /// Reads the contract from the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Reads the contract through `lookup` (tests pass a map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let text = |key: &str| -> Result<String> {
            lookup(key).ok_or_else(|| {
                Error::Rendezvous(format!(
                    "environment variable {key} is not set: rsdeep-worker is started by the `rsdeep` launcher"
                ))
            })
        };
        let number = |key: &str| -> Result<usize> {
            let value = text(key)?;
            value.parse().map_err(|_| {
                Error::Rendezvous(format!("{key}={value:?} is not a non-negative integer"))
            })
        };
        let optional = |key: &str| lookup(key).filter(|v| !v.is_empty());
        let master_port = number(ev::MASTER_PORT)?;
        Ok(WorkerEnv {
            rank: number(ev::RANK)?,
            local_rank: number(ev::LOCAL_RANK)?,
            world_size: number(ev::WORLD_SIZE)?,
            local_world_size: number(ev::LOCAL_WORLD_SIZE)?,
            node_rank: number(ev::NODE_RANK)?,
            num_nodes: number(ev::NUM_NODES)?,
            master_addr: text(ev::MASTER_ADDR)?,
            master_port: u16::try_from(master_port).map_err(|_| {
                Error::Rendezvous(format!("MASTER_PORT={master_port} is out of range"))
            })?,
            job_id: text(ev::JOB_ID)?,
            token: text(ev::TOKEN)?,
            device: optional(ev::DEVICE).unwrap_or_else(|| "cpu".into()),
            host: optional(ev::HOST).unwrap_or_else(|| "localhost".into()),
            comm_host: optional(ev::COMM_HOST).unwrap_or_else(|| "127.0.0.1".into()),
            config: optional(ev::CONFIG).map(PathBuf::from),
            selftest: optional(ev::SELFTEST).is_some_and(|v| v == "1"),
            restart_count: optional(ev::RESTART_COUNT)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            heartbeat_interval: Duration::from_millis(
                optional(ev::HEARTBEAT_INTERVAL_MS)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(2000),
            ),
            tls_ca: optional(ev::TLS_CA_ENV).map(PathBuf::from),
            tls_domain: optional(ev::TLS_DOMAIN_ENV),
        })
    }
}

/// One rank of the world as the rendezvous reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub rank: usize,
    pub host: String,
    /// `host:port` of the rank's collective TCP listener.
    pub comm_addr: String,
    pub node_rank: usize,
    pub local_rank: usize,
}

/// The agreed world: what the communicator is built from (with the bound listener).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub node_rank: usize,
    pub num_nodes: usize,
    /// Bumped by the launcher on every restart of the job.
    pub generation: u64,
    /// Every rank, ordered by rank (`peers[r].rank == r`).
    pub peers: Vec<PeerInfo>,
    /// The per-job token; TCP ring connections present it too.
    pub token: String,
    pub job_id: String,
}

impl World {
    /// The rank-ordered collective addresses (`CommSetup::peer_addrs`).
    pub fn peer_addrs(&self) -> Vec<String> {
        self.peers.iter().map(|p| p.comm_addr.clone()).collect()
    }
}

/// A command the launcher sent down the heartbeat stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LauncherCommand {
    Stop,
    SaveNow,
}

/// Sends progress to the launcher and collects its commands (non-blocking).
#[derive(Debug, Clone)]
pub struct HeartbeatSender {
    job_id: String,
    rank: usize,
    generation: u64,
    outbound: mpsc::Sender<pb::HeartbeatRequest>,
    commands: Arc<Mutex<Vec<LauncherCommand>>>,
}

impl HeartbeatSender {
    /// Reports the last finished step and what the worker is doing now (`phase`);
    /// dropped silently if the stream is congested.
    pub fn beat(&self, step: u64, loss: f64, tokens_per_second: f64, phase: &PhaseSnapshot) {
        let _ = self.outbound.try_send(pb::HeartbeatRequest {
            job_id: self.job_id.clone(),
            rank: self.rank as u32,
            step,
            loss,
            tokens_per_second,
            generation: self.generation,
            phase: phase.kind.name().to_string(),
            phase_step: phase.step,
            collective: phase.collective.name().to_string(),
            collective_seq: phase.collective_seq,
            phase_secs: phase.for_secs,
        });
    }

    /// Commands received since the last call, oldest first.
    pub fn take_commands(&self) -> Vec<LauncherCommand> {
        std::mem::take(&mut *self.commands.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

type TokenClient = RendezvousClient<InterceptedService<Channel, TokenInterceptor>>;

/// Adds the job token to every call.
#[derive(Debug, Clone)]
pub struct TokenInterceptor(AsciiMetadataValue);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert(TOKEN_METADATA_KEY, self.0.clone());
        Ok(request)
    }
}

/// A connected rendezvous client with a blocking API.
pub struct Rendezvous {
    runtime: tokio::runtime::Runtime,
    client: TokenClient,
    job_id: String,
    rank: usize,
    generation: u64,
}

fn status_error(call: &str, status: tonic::Status) -> Error {
    Error::Rendezvous(format!(
        "{call} refused ({:?}): {}",
        status.code(),
        status.message()
    ))
}

impl Rendezvous {
    /// Connects to `MASTER_ADDR:MASTER_PORT`, retrying until `timeout` (the launcher of
    /// node 0 may start later than this node's).
    pub fn connect(env: &WorkerEnv, timeout: Duration) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the rendezvous runtime", e))?;
        let (endpoint, url) = rendezvous_endpoint(env)?;
        let channel = runtime.block_on(connect_with_retry(&endpoint, &url, timeout))?;
        let token = env
            .token
            .parse::<AsciiMetadataValue>()
            .map_err(|_| Error::Rendezvous("RSDEEP_TOKEN is not printable ASCII".into()))?;
        let client = RendezvousClient::with_interceptor(channel, TokenInterceptor(token))
            .max_decoding_message_size(64 << 20);
        Ok(Rendezvous {
            runtime,
            client,
            job_id: env.job_id.clone(),
            rank: env.rank,
            generation: 0,
        })
    }

    /// Joins; blocks until the whole world has joined (or the launcher's timeout).
    pub fn join(&mut self, env: &WorkerEnv, comm_addr: &str) -> Result<World> {
        let _span = info_span!("rendezvous.join", rank = env.rank).entered();
        let request = pb::JoinRequest {
            job_id: env.job_id.clone(),
            version: RSDEEP_VERSION.into(),
            node_rank: env.node_rank as u32,
            local_rank: env.local_rank as u32,
            host: env.host.clone(),
            comm_addr: comm_addr.to_string(),
            pid: std::process::id(),
        };
        let mut client = self.client.clone();
        let answer = self
            .runtime
            .block_on(client.join(request))
            .map_err(|s| status_error("join", s))?
            .into_inner();
        self.rank = answer.rank as usize;
        self.generation = answer.generation;
        debug!(rank = answer.rank, generation = answer.generation, "joined");
        world_from(answer, env)
    }

    /// Stores `value` under `key` for every rank of the job.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let request = pb::SetRequest {
            job_id: self.job_id.clone(),
            key: key.into(),
            value: value.to_vec(),
        };
        let mut client = self.client.clone();
        self.runtime
            .block_on(client.set(request))
            .map_err(|s| status_error("set", s))?;
        Ok(())
    }

    /// Returns the value of `key`, waiting up to `timeout` for another rank to set it.
    pub fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let request = pb::GetRequest {
            job_id: self.job_id.clone(),
            key: key.into(),
            timeout_ms: timeout.as_millis().max(1) as u64,
        };
        let mut client = self.client.clone();
        let answer = self
            .runtime
            .block_on(client.get(request))
            .map_err(|s| status_error("get", s))?;
        Ok(answer.into_inner().value)
    }

    /// Waits until every rank reached barrier `name` (names must be unique per use).
    pub fn barrier(&self, name: &str, timeout: Duration) -> Result<()> {
        let _span = info_span!("rendezvous.barrier", rank = self.rank, name).entered();
        let request = pb::BarrierRequest {
            job_id: self.job_id.clone(),
            name: name.into(),
            rank: self.rank as u32,
            timeout_ms: timeout.as_millis().max(1) as u64,
        };
        let mut client = self.client.clone();
        self.runtime
            .block_on(client.barrier(request))
            .map_err(|s| status_error("barrier", s))?;
        Ok(())
    }

    /// Opens the heartbeat stream; the returned sender reports steps and yields commands.
    pub fn start_heartbeat(&self) -> Result<HeartbeatSender> {
        let (outbound, receiver) = mpsc::channel::<pb::HeartbeatRequest>(64);
        let commands = Arc::new(Mutex::new(Vec::new()));
        let mut client = self.client.clone();
        let inbox = commands.clone();
        self.runtime.spawn(async move {
            let Ok(response) = client.heartbeat(ReceiverStream::new(receiver)).await else {
                return;
            };
            let mut stream = response.into_inner();
            while let Some(Ok(command)) = stream.next().await {
                let command = match Kind::try_from(command.kind) {
                    Ok(Kind::Stop) => LauncherCommand::Stop,
                    Ok(Kind::SaveNow) => LauncherCommand::SaveNow,
                    _ => continue,
                };
                inbox
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(command);
            }
        });
        Ok(HeartbeatSender {
            job_id: self.job_id.clone(),
            rank: self.rank,
            generation: self.generation,
            outbound,
            commands,
        })
    }

    /// Tells the launcher why this worker is about to fail (best effort, 2 s limit);
    /// `caused_by_another_rank` when it failed only because another rank did.
    pub fn report_error(&self, message: &str, caused_by_another_rank: bool) -> Result<()> {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let request = pb::ErrorReport {
            job_id: self.job_id.clone(),
            rank: self.rank as u32,
            message: message.into(),
            time_ms,
            caused_by_another_rank,
        };
        let mut client = self.client.clone();
        // The timer must be created inside the runtime (a Sleep needs its time driver).
        let call = async move {
            tokio::time::timeout(Duration::from_secs(2), client.report_error(request)).await
        };
        match self.runtime.block_on(call) {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(status_error("report_error", status)),
            Err(_) => Err(Error::Rendezvous("report_error timed out".into())),
        }
    }
}

/// The rendezvous endpoint: `http://MASTER_ADDR:MASTER_PORT`, or `https://` checked
/// against `RSDEEP_TLS_CA` when the launcher serves TLS.
fn rendezvous_endpoint(env: &WorkerEnv) -> Result<(Endpoint, String)> {
    let scheme = if env.tls_ca.is_some() {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://{}:{}", env.master_addr, env.master_port);
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| Error::Rendezvous(format!("bad rendezvous address {url}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .initial_connection_window_size(Some(8 << 20))
        .initial_stream_window_size(Some(4 << 20));
    if let Some(ca) = &env.tls_ca {
        let domain = env.tls_domain.as_deref().unwrap_or(&env.master_addr);
        let config =
            tls::client_config(ca, domain).map_err(|e| Error::Rendezvous(e.to_string()))?;
        endpoint = endpoint.tls_config(config).map_err(|e| {
            Error::Rendezvous(format!("TLS setup for {url} with CA {}: {e}", ca.display()))
        })?;
    }
    Ok((endpoint, url))
}

async fn connect_with_retry(endpoint: &Endpoint, url: &str, timeout: Duration) -> Result<Channel> {
    let deadline = Instant::now() + timeout;
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) => {
                let cause = error_chain(&e);
                // A certificate the worker does not trust will not change by waiting.
                if cause.contains("certificate") {
                    return Err(Error::Rendezvous(format!(
                        "TLS to the rendezvous at {url} failed: {cause} (check RSDEEP_TLS_CA / \
                         --rendezvous_tls_ca and that the certificate names {})",
                        endpoint.uri().host().unwrap_or("the master address")
                    )));
                }
                if Instant::now() >= deadline {
                    return Err(Error::Rendezvous(format!(
                        "cannot reach the rendezvous at {url} within {timeout:?}: {cause}"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await
            }
        }
    }
}

/// `err` and its sources, joined by ": ".
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The agreed world from a Join answer: decodes the peer table (encoded once per
/// generation by the launcher) and checks it is complete and in rank order.
fn world_from(answer: pb::JoinResponse, env: &WorkerEnv) -> Result<World> {
    let peers = decode_peer_table(&answer.peer_table).map_err(|e| {
        Error::Rendezvous(format!("the rendezvous sent an unreadable peer table: {e}"))
    })?;
    let world_size = answer.world_size as usize;
    let in_rank_order = peers.iter().enumerate().all(|(r, p)| p.rank as usize == r);
    if peers.len() != world_size || !in_rank_order {
        return Err(Error::Rendezvous(format!(
            "the rendezvous sent a peer table of {} entries (in rank order: {in_rank_order}) \
             for a world of {world_size}",
            peers.len()
        )));
    }
    Ok(World {
        rank: answer.rank as usize,
        world_size,
        local_rank: answer.local_rank as usize,
        local_world_size: answer.local_world_size as usize,
        node_rank: answer.node_rank as usize,
        num_nodes: answer.num_nodes as usize,
        generation: answer.generation,
        peers: peers.into_iter().map(peer_info).collect(),
        token: env.token.clone(),
        job_id: env.job_id.clone(),
    })
}

fn peer_info(p: pb::Peer) -> PeerInfo {
    PeerInfo {
        rank: p.rank as usize,
        host: p.host,
        comm_addr: p.comm_addr,
        node_rank: p.node_rank as usize,
        local_rank: p.local_rank as usize,
    }
}

/// Binds the collective listener on `RSDEEP_COMM_HOST` with an OS-chosen port.
pub fn bind_comm_listener(env: &WorkerEnv) -> Result<TcpListener> {
    TcpListener::bind((env.comm_host.as_str(), 0)).map_err(|e| {
        Error::io(
            format!("binding the collective listener on {}", env.comm_host),
            e,
        )
    })
}

/// Binds the listener, connects and joins: everything a worker needs to build its
/// communicator. The advertised address is `comm_host:<bound port>`.
pub fn join_world(env: &WorkerEnv) -> Result<(Rendezvous, World, TcpListener)> {
    let listener = bind_comm_listener(env)?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::io("reading the collective listener address", e))?
        .port();
    let mut rendezvous = Rendezvous::connect(env, CONNECT_TIMEOUT)?;
    let world = rendezvous.join(env, &format!("{}:{port}", env.comm_host))?;
    if world.rank != env.rank || world.world_size != env.world_size {
        return Err(Error::Rendezvous(format!(
            "the rendezvous assigned rank {}/{} but the launcher planned {}/{}",
            world.rank, world.world_size, env.rank, env.world_size
        )));
    }
    Ok((rendezvous, world, listener))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn contract() -> HashMap<&'static str, String> {
        HashMap::from([
            ("RANK", "3".to_string()),
            ("LOCAL_RANK", "1".into()),
            ("WORLD_SIZE", "4".into()),
            ("LOCAL_WORLD_SIZE", "2".into()),
            ("RSDEEP_NODE_RANK", "1".into()),
            ("RSDEEP_NUM_NODES", "2".into()),
            ("MASTER_ADDR", "10.0.0.1".into()),
            ("MASTER_PORT", "29500".into()),
            ("RSDEEP_JOB_ID", "job".into()),
            ("RSDEEP_TOKEN", "tok".into()),
            ("RSDEEP_SELFTEST", "1".into()),
            ("RSDEEP_CONFIG", "/tmp/c.json".into()),
        ])
    }

    #[test]
    fn reads_the_launcher_contract() {
        let vars = contract();
        let env = WorkerEnv::from_lookup(|k| vars.get(k).cloned()).unwrap();
        assert_eq!(
            (
                env.rank,
                env.local_rank,
                env.world_size,
                env.local_world_size
            ),
            (3, 1, 4, 2)
        );
        assert_eq!(
            (env.node_rank, env.num_nodes, env.master_port),
            (1, 2, 29500)
        );
        assert!(env.selftest);
        assert_eq!(env.config, Some(PathBuf::from("/tmp/c.json")));
        assert_eq!(env.comm_host, "127.0.0.1");
        assert_eq!(env.heartbeat_interval, Duration::from_secs(2));
    }

    #[test]
    fn tls_ca_switches_the_rendezvous_to_https_and_names_a_bad_file() {
        let vars = contract();
        let env = WorkerEnv::from_lookup(|k| vars.get(k).cloned()).unwrap();
        assert_eq!(env.tls_ca, None);
        let (_, url) = rendezvous_endpoint(&env).unwrap();
        assert_eq!(url, "http://10.0.0.1:29500");
        let mut vars = contract();
        vars.insert("RSDEEP_TLS_CA", "/nonexistent/ca.pem".into());
        let env = WorkerEnv::from_lookup(|k| vars.get(k).cloned()).unwrap();
        let err = rendezvous_endpoint(&env).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }

    fn answer_with(peer_ranks: &[u32], world_size: u32) -> pb::JoinResponse {
        let peers = peer_ranks
            .iter()
            .map(|&rank| pb::Peer {
                rank,
                host: format!("n{}", rank / 2),
                comm_addr: format!("10.0.0.{}:{}", rank / 2, 7000 + rank),
                node_rank: rank / 2,
                local_rank: rank % 2,
            })
            .collect();
        pb::JoinResponse {
            rank: 3,
            world_size,
            local_rank: 1,
            local_world_size: 2,
            node_rank: 1,
            num_nodes: 2,
            generation: 4,
            peer_table: rsdeep_proto::encode_peer_table(peers),
        }
    }

    #[test]
    fn the_world_comes_from_the_encoded_peer_table() {
        let vars = contract();
        let env = WorkerEnv::from_lookup(|k| vars.get(k).cloned()).unwrap();
        let world = world_from(answer_with(&[0, 1, 2, 3], 4), &env).unwrap();
        assert_eq!((world.rank, world.world_size, world.generation), (3, 4, 4));
        assert_eq!((world.node_rank, world.local_world_size), (1, 2));
        assert_eq!(world.peer_addrs()[2], "10.0.0.1:7002");
        assert_eq!(world.peers[3].host, "n1");
        assert_eq!(world.token, "tok");
        let short = world_from(answer_with(&[0, 1, 2], 4), &env).unwrap_err();
        assert!(
            short.to_string().contains("peer table of 3 entries"),
            "{short}"
        );
        let shuffled = world_from(answer_with(&[0, 2, 1, 3], 4), &env).unwrap_err();
        assert!(
            shuffled.to_string().contains("in rank order: false"),
            "{shuffled}"
        );
        let mut garbage = answer_with(&[0], 1);
        garbage.peer_table = rsdeep_proto::Bytes::from_static(&[0x0a, 0x7f]);
        let err = world_from(garbage, &env).unwrap_err();
        assert!(err.to_string().contains("unreadable peer table"), "{err}");
    }

    #[test]
    fn missing_or_bad_variables_are_named() {
        let mut vars = contract();
        vars.remove("RSDEEP_TOKEN");
        let err = WorkerEnv::from_lookup(|k| vars.get(k).cloned())
            .unwrap_err()
            .to_string();
        assert!(err.contains("RSDEEP_TOKEN is not set"), "{err}");
        let mut vars = contract();
        vars.insert("MASTER_PORT", "70000".into());
        let err = WorkerEnv::from_lookup(|k| vars.get(k).cloned())
            .unwrap_err()
            .to_string();
        assert!(err.contains("MASTER_PORT=70000"), "{err}");
    }
}
