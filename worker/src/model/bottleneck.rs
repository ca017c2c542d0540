//! Bottleneck adapters inside a decoder layer (`DecoderLayer::attach_bottleneck`): where
//! they sit and what they compute. An adapter maps h (B, T, H) to
//! up(act(down(h))): down (W, H) and up (H, W) with biases, W the bottleneck width.
//! `DoubleSeq` (Houlsby) adds A(a) to the attention output a and M(m) to the MLP output
//! m (SiLU); `Seq` (Pfeiffer) adds M(m + x1) to the MLP output, x1 the residual stream
//! entering the MLP (ReLU). The saved format and the init live in `lora/bottleneck.rs`.

use super::Param;
use crate::Result;
use tch::Tensor;

/// Which bottleneck architecture a layer carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BottleneckStyle {
    /// Houlsby et al.: after attention and after the MLP, SiLU (`double_seq_bn`).
    DoubleSeq,
    /// Pfeiffer et al.: after the MLP only, ReLU, input includes the residual (`seq_bn`).
    Seq,
}

/// One adapter's tensors: down (W, H) + bias (W,), up (H, W) + bias (H,).
pub struct BottleneckTensors {
    pub down_weight: Tensor,
    pub down_bias: Tensor,
    pub up_weight: Tensor,
    pub up_bias: Tensor,
}

impl BottleneckTensors {
    /// The four tensors with their name suffixes, in parameter order.
    pub fn named(self) -> [(&'static str, Tensor); 4] {
        [
            ("adapter_down.0.weight", self.down_weight),
            ("adapter_down.0.bias", self.down_bias),
            ("adapter_up.weight", self.up_weight),
            ("adapter_up.bias", self.up_bias),
        ]
    }
}

/// A layer's adapters: indices in its `params` of (down w, down b, up w, up b).
#[derive(Clone, Copy, Debug)]
pub(super) struct BottleneckSlots {
    pub(super) style: BottleneckStyle,
    pub(super) attention: Option<[usize; 4]>,
    pub(super) output: [usize; 4],
}

impl BottleneckSlots {
    /// The attention output `a` with its adapter added: a + A(a) (`DoubleSeq`), else a.
    pub(super) fn after_attention(&self, params: &[Param], a: Tensor) -> Result<Tensor> {
        match self.attention {
            Some(slots) => Ok(a.f_add(&adapter(params, slots, &a, self.style)?)?),
            None => Ok(a),
        }
    }

    /// The MLP output `m` with its adapter added, `x1` the residual stream entering the
    /// MLP: m + M(m) (`DoubleSeq`) or m + M(m + x1) (`Seq`).
    pub(super) fn after_mlp(&self, params: &[Param], m: Tensor, x1: &Tensor) -> Result<Tensor> {
        let input = match self.style {
            BottleneckStyle::DoubleSeq => m.shallow_clone(),
            BottleneckStyle::Seq => m.f_add(x1)?,
        };
        Ok(m.f_add(&adapter(params, self.output, &input, self.style)?)?)
    }
}

/// up(act(down(h))): (B, T, H) -> (B, T, H).
fn adapter(
    params: &[Param],
    [dw, db, uw, ub]: [usize; 4],
    h: &Tensor,
    style: BottleneckStyle,
) -> Result<Tensor> {
    let down = h.f_linear(&params[dw].tensor, Some(&params[db].tensor))?; // (B, T, W)
    let act = match style {
        BottleneckStyle::DoubleSeq => down.f_silu()?,
        BottleneckStyle::Seq => down.f_relu()?,
    };
    Ok(act.f_linear(&params[uw].tensor, Some(&params[ub].tensor))?) // (B, T, H)
}
