//! Collective communication over flat, contiguous tensors: the `Communicator` trait the
//! ZeRO engine calls, with a TCP ring backend (CPU ranks, and every CI run) and an NCCL
//! backend (CUDA ranks). The contract is the trait below; semantics of `Avg` are "sum,
//! then divide by world size" on every backend.
//!
//! Layout: `tcp/` (ring backend), `nccl.rs` (NCCL backend, the only raw NCCL FFI),
//! `bucket.rs` (coalesced collectives over many small tensors), `elementwise.rs`
//! (reduction arithmetic and its rounding rules), `trace.rs` (record of issued
//! collectives), `logger.rs` (DeepSpeed's `comms_logger`: timed collectives and their
//! summary), `backend.rs` (choosing and building a backend).

pub mod backend;
pub mod bucket;
pub mod elementwise;
pub mod logger;
pub mod nccl;
pub mod tcp;
pub mod trace;

pub use backend::{Backend, CommSetup, build_communicator};
pub use bucket::{BucketPlan, all_reduce_bucketed, reduce_scatter_bucketed};
pub use logger::{CommOp, CommsLog, LoggedComm};
pub use tcp::{TcpComm, TcpOptions};
pub use trace::{TraceEvent, TraceRecorder};

use crate::Result;
use tch::Tensor;

/// How a reduction combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Avg,
    Max,
}

/// A started collective; `wait` blocks until it is complete on this rank.
pub struct Work {
    waiter: Box<dyn FnOnce() -> Result<()> + Send>,
}

impl Work {
    /// A collective that runs `waiter` to finish.
    pub fn new(waiter: impl FnOnce() -> Result<()> + Send + 'static) -> Self {
        Work {
            waiter: Box::new(waiter),
        }
    }

    /// A collective that already finished.
    pub fn done() -> Self {
        Work::new(|| Ok(()))
    }

    /// Blocks until the collective is complete; its error, if any.
    pub fn wait(self) -> Result<()> {
        (self.waiter)()
    }
}

/// Collectives over the ranks of one world. Tensors are flat (1-D), contiguous, of the
/// same dtype on every rank; results are written in place into the output tensor
/// (tensors are handles, so `&Tensor` outputs are mutated). Every rank must issue the
/// same collectives in the same order.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// In place: every rank ends with the reduction of all ranks' `tensor`.
    fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<Work>;
    /// `input` has `world_size * output.numel()` elements; rank r receives the reduction
    /// of chunk r.
    fn reduce_scatter(&self, input: &Tensor, output: &Tensor, op: ReduceOp) -> Result<Work>;
    /// `output` has `world_size * input.numel()` elements; chunk r is rank r's `input`.
    fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<Work>;
    /// In place: every rank ends with `root`'s `tensor`.
    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Work>;
    fn barrier(&self) -> Result<()>;
    /// The record of collectives issued through this communicator (off until enabled).
    fn trace(&self) -> &TraceRecorder;
}
