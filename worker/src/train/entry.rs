//! How a launched worker gets from "joined the rendezvous" to "training": reads the
//! resolved config the launcher wrote (`RSDEEP_CONFIG`), picks its device, ships the NCCL
//! unique id through the rendezvous store when the backend is NCCL, builds the
//! communicator from the rendezvous answer, wires heartbeats, and runs `train`.

use super::run::{StepProgress, TrainSummary, TrainWorld, train};
use crate::comm::backend::{Backend, CommSetup, build_communicator};
use crate::comm::nccl;
use crate::comm::tcp::TcpOptions;
use crate::rendezvous::{Rendezvous, WorkerEnv, World};
use crate::{Error, Result};
use rsdeep::config::{CommBackend, TrainConfig};
use std::net::TcpListener;
use std::time::Duration;
use tch::Device;

/// How long ranks wait for rank 0's NCCL id in the store.
const NCCL_ID_WAIT: Duration = Duration::from_secs(300);

/// Trains with the config the launcher resolved for this world.
pub fn train_from_launcher(
    env: &WorkerEnv,
    rendezvous: &Rendezvous,
    world: World,
    listener: TcpListener,
) -> Result<TrainSummary> {
    let path = env.config.as_ref().ok_or_else(|| {
        Error::Config("RSDEEP_CONFIG is not set: start workers through the rsdeep launcher".into())
    })?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading the resolved config {}", path.display()), e))?;
    let config = TrainConfig::from_json(&text).map_err(|e| Error::Config(e.to_string()))?;
    let device = device_for(&env.device)?;
    let backend = match config.args.comm_backend {
        CommBackend::Auto => Backend::Auto,
        CommBackend::Tcp => Backend::Tcp,
        CommBackend::Nccl => Backend::Nccl,
    }
    .resolve(device);
    let nccl_id = if backend == Backend::Nccl {
        Some(exchange_nccl_id(rendezvous, &world)?)
    } else {
        None
    };
    let timeout = Duration::from_secs(config.args.ddp_timeout.max(1));
    let setup = CommSetup {
        rank: world.rank,
        world_size: world.world_size,
        device,
        peer_addrs: world.peer_addrs(),
        listener: Some(listener),
        token: world.token.clone(),
        tcp: TcpOptions {
            op_timeout: timeout,
            ..TcpOptions::default()
        },
        nccl_id,
        nccl_timeout: timeout,
    };
    let comm = build_communicator(backend, setup)?;
    let heartbeat = rendezvous.start_heartbeat()?;
    let train_world = TrainWorld {
        comm,
        rank: world.rank,
        world_size: world.world_size,
        local_rank: world.local_rank,
        device,
    };
    let mut on_step = |p: StepProgress| heartbeat.beat(p.step, p.loss, p.tokens_per_second);
    train(config, train_world, &mut on_step)
}

/// `cpu`, or `cuda` (the launcher narrows CUDA_VISIBLE_DEVICES to this rank's GPU, so
/// it is device 0 of this process).
fn device_for(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        "cuda" => Err(Error::Config(
            "the launcher planned a CUDA rank but libtorch sees no CUDA device: check the driver and CUDA_VISIBLE_DEVICES, or run with --device cpu".into(),
        )),
        other => Err(Error::Config(format!("unknown device {other:?}: expected cpu or cuda"))),
    }
}

/// Rank 0 creates the NCCL unique id and publishes it; every rank reads it back.
fn exchange_nccl_id(rendezvous: &Rendezvous, world: &World) -> Result<Vec<u8>> {
    let key = format!("nccl/unique_id/{}", world.generation);
    if world.rank == 0 {
        rendezvous.set(&key, &nccl::new_unique_id()?)?;
    }
    rendezvous.get(&key, NCCL_ID_WAIT)
}
