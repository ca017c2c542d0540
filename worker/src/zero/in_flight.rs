//! The engine's collectives in flight, as the engine holds them between issuing and
//! completing: stage-3 parameter gathers (`gather.rs` issues and completes them) and
//! gradient reductions (`reduce.rs`). Separate from both so that the engine's state
//! (`engine.rs`) names them without importing the code that drives them.

use crate::comm::Work;
use tch::Tensor;

/// One all-gather piece in flight: per-rank range `[start, start + len)` of the partition.
pub(super) struct GatherPiece {
    pub(super) work: Work,
    /// (world * len,) receive buffer; None when the gather wrote straight into `full`.
    pub(super) staging: Option<Tensor>,
    pub(super) start: usize,
    pub(super) len: usize,
}

/// One flat buffer's gather in flight: its (padded,) destination and the pieces.
pub(super) struct GatherPart {
    pub(super) full: Tensor,
    pub(super) pieces: Vec<GatherPiece>,
    pub(super) partition: usize,
}

/// A block's gather in flight (a prefetch, or a synchronous gather not yet waited):
/// its trainable buffer and its frozen one, each when the block has any.
pub(super) struct PendingGather {
    pub(super) block: usize,
    pub(super) trainable: Option<GatherPart>,
    pub(super) frozen: Option<GatherPart>,
}

/// A reduction in flight and what to do once it completes.
pub(super) struct PendingReduce {
    pub(super) work: Work,
    /// `dst += src` after the wait (dst is a view into an owned-gradient buffer).
    pub(super) accumulate: Option<(Tensor, Tensor)>,
    /// Tensors the collective reads or writes, kept alive until it completes.
    pub(super) _buffers: Vec<Tensor>,
}
