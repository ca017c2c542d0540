//! Causal language models as the engine sees them: an ordered list of blocks (embedding,
//! decoder layers, final norm + head), each owning named leaf parameters with Hugging Face
//! names. The contract for the engine is `Block` and `CausalLm` below.

use crate::Result;
use tch::Tensor;

/// A trainable (or frozen) leaf tensor and its Hugging Face name, e.g.
/// `model.layers.0.self_attn.q_proj.weight`.
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
}

/// What every block's forward needs besides its input: positions, masks.
pub struct ForwardCtx {
    /// (B, T) int64 position ids.
    pub position_ids: Tensor,
    /// Optional (B, 1, T, T) boolean mask, true = may attend (padding/packing); None =
    /// plain causal attention.
    pub attention_mask: Option<Tensor>,
}

/// One unit the engine gathers, runs, recomputes and reduces.
pub trait Block: Send {
    /// The parameters this block owns, in a fixed order.
    fn params(&self) -> &[Param];
    /// Embedding: (B, T) int64 ids -> (B, T, H). Decoder: (B, T, H) -> (B, T, H).
    /// Head: (B, T, H) -> (B, T, V) logits.
    fn forward(&self, input: &Tensor, ctx: &ForwardCtx) -> Result<Tensor>;
}
