//! Choosing and building a communicator: `Backend::Auto` is NCCL for a CUDA device and
//! the TCP ring for CPU; `comm_backend` in train.json ("auto" | "tcp" | "nccl") overrides
//! it. The worker calls `build_communicator` with what the rendezvous returned.

use super::Communicator;
use super::nccl::{self, NcclComm};
use super::tcp::{TcpComm, TcpOptions};
use crate::{Error, Result};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;
use tch::Device;

/// Which collective implementation a worker uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// NCCL for CUDA devices, TCP for CPU.
    #[default]
    Auto,
    Tcp,
    Nccl,
}

impl Backend {
    /// The concrete backend for `device` (never `Auto`).
    pub fn resolve(self, device: Device) -> Backend {
        match (self, device) {
            (Backend::Auto, Device::Cuda(_)) => Backend::Nccl,
            (Backend::Auto, _) => Backend::Tcp,
            (chosen, _) => chosen,
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = Error;

    fn from_str(text: &str) -> Result<Backend> {
        match text.to_ascii_lowercase().as_str() {
            "auto" => Ok(Backend::Auto),
            "tcp" => Ok(Backend::Tcp),
            "nccl" => Ok(Backend::Nccl),
            other => Err(Error::Config(format!(
                "comm_backend {other:?}: expected auto, tcp or nccl"
            ))),
        }
    }
}

/// Everything a backend needs, as the rendezvous hands it over.
pub struct CommSetup {
    pub rank: usize,
    pub world_size: usize,
    /// This rank's device: decides `Auto`, and is the NCCL device.
    pub device: Device,
    /// TCP: the rank-ordered `host:port` of every rank's comm listener.
    pub peer_addrs: Vec<String>,
    /// TCP: this rank's bound listener (its address is `peer_addrs[rank]`).
    pub listener: Option<TcpListener>,
    /// TCP: the job token every ring connection must present.
    pub token: String,
    pub tcp: TcpOptions,
    /// NCCL: the 128-byte unique id rank 0 published through the rendezvous store.
    pub nccl_id: Option<Vec<u8>>,
    /// NCCL: how long `Work::wait` lets a collective run before aborting the communicator.
    pub nccl_timeout: Duration,
}

/// Builds the communicator for `backend` (after `Backend::resolve`).
pub fn build_communicator(backend: Backend, setup: CommSetup) -> Result<Arc<dyn Communicator>> {
    let fail = |detail: &str| Error::Comm {
        op: "setup",
        rank: setup.rank,
        numel: 0,
        detail: detail.into(),
    };
    match backend.resolve(setup.device) {
        Backend::Nccl => {
            let id_bytes = setup
                .nccl_id
                .as_deref()
                .ok_or_else(|| fail("the NCCL backend needs the unique id from rank 0"))?;
            let id = nccl::id_from_bytes(id_bytes)?;
            Ok(Arc::new(NcclComm::new(
                setup.rank,
                setup.world_size,
                setup.device,
                id,
                setup.nccl_timeout,
            )?))
        }
        _ => {
            let listener = setup
                .listener
                .ok_or_else(|| fail("the TCP backend needs this rank's bound listener"))?;
            let comm = TcpComm::connect(
                setup.rank,
                setup.world_size,
                &setup.peer_addrs,
                listener,
                &setup.token,
                setup.tcp,
            )?;
            Ok(Arc::new(comm))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_nccl_for_cuda_and_tcp_for_cpu() -> Result<()> {
        assert_eq!(Backend::Auto.resolve(Device::Cuda(0)), Backend::Nccl);
        assert_eq!(Backend::Auto.resolve(Device::Cpu), Backend::Tcp);
        assert_eq!(Backend::Tcp.resolve(Device::Cuda(1)), Backend::Tcp);
        assert_eq!("NCCL".parse::<Backend>()?, Backend::Nccl);
        assert!("mpi".parse::<Backend>().is_err());
        let parsed: Backend =
            serde_json::from_str("\"tcp\"").map_err(|e| Error::Config(e.to_string()))?;
        assert_eq!(parsed, Backend::Tcp);
        Ok(())
    }

    #[test]
    fn one_rank_tcp_communicator_builds_and_runs() -> Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("bind", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("local_addr", e))?
            .to_string();
        let setup = CommSetup {
            rank: 0,
            world_size: 1,
            device: Device::Cpu,
            peer_addrs: vec![addr],
            listener: Some(listener),
            token: "t".into(),
            tcp: TcpOptions::default(),
            nccl_id: None,
            nccl_timeout: Duration::from_secs(1),
        };
        let comm = build_communicator(Backend::Auto, setup)?;
        let x = tch::Tensor::f_from_slice(&[1.0f32, 2.0])?;
        comm.all_reduce(&x, super::super::ReduceOp::Avg)?.wait()?;
        assert_eq!(Vec::<f32>::try_from(&x)?, vec![1.0, 2.0]);
        comm.barrier()
    }
}
