//! The ZeRO engine's core: one flat buffer per block, the block-wise forward and backward
//! (detach at block boundaries, backprop each block with its output cotangent), activation
//! checkpointing by recomputation, and the hand-off of each block's gradient to the
//! reducer as soon as its backward is done. Construction (flattening and partitioning
//! each block) lives in `build.rs`, stage-3 gathering in `gather.rs`,
//! gradient reduction in `reduce.rs`, the optimizer step in `step.rs`, state and memory
//! accounting in `state.rs`. Design and contract: `docs/zero-engine.md`.

use super::adamw::AdamSlice;
use super::config::EngineConfig;
use super::in_flight::{PendingGather, PendingReduce};
use super::loss_scaler::LossScaler;
use super::partition::FlatLayout;
use super::profile::{Phase, StepProfile};
use super::scheduler::LrSchedule;
use crate::comm::Communicator;
use crate::model::{Block, ForwardCtx, LayerSaved, causal_lm_loss};
use crate::{Error, Result};
use std::collections::HashSet;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// What the engine trains: the model's blocks in order.
pub struct EngineModel {
    pub blocks: Vec<Box<dyn Block>>,
    /// The last block (head) also reads block 0's parameters (tied `lm_head` =
    /// `embed_tokens`) without listing them; the engine gathers and differentiates them.
    pub head_tied_to_embedding: bool,
    /// Parameter names kept out of the flat buffers and never updated (e.g. LoRA bases).
    pub frozen: HashSet<String>,
}

/// Stage-3 gathering counters since the engine was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stage3Stats {
    /// Block gathers waited synchronously.
    pub gathers: u64,
    /// Block gathers started ahead of use.
    pub prefetches: u64,
    /// Most parameter elements gathered at once (persistent copies excluded).
    pub peak_live_numel: usize,
}

/// One block's partitioned state on this rank.
pub(super) struct BlockShard {
    pub(super) layout: FlatLayout,
    /// Handles sharing the block's trainable parameter tensors (same TensorImpl), so
    /// `set_data` on them re-points the model's parameters.
    pub(super) params: Vec<Tensor>,
    /// Stage 3: parameters at or below `stage3_param_persistence_threshold`.
    pub(super) persistent: Vec<bool>,
    /// Stages 0-2: the full (padded,) compute buffer; stage 3: the owned (P,) slice.
    pub(super) compute: Tensor,
    /// Stage 3: the full (padded,) buffer while the block is gathered.
    pub(super) gathered: Option<Tensor>,
    /// Stage 3: every parameter is persistent and was gathered since the last step.
    pub(super) resident: bool,
    /// Stages 0/1: (padded,) gradients, accumulated over micro-steps.
    pub(super) grad_full: Option<Tensor>,
    /// Stages 2/3: (P,) reduced gradients of the owned slice, accumulated.
    pub(super) grad_owned: Option<Tensor>,
    /// (padded,) gradient the tied head produced for this block, added at its backward.
    pub(super) tied_grad: Option<Tensor>,
    pub(super) optim: Option<AdamSlice>,
    /// Stage 3: the block's frozen parameters, partitioned and gathered with the
    /// trainable ones (below stage 3 they stay whole in `ZeroEngine::frozen_params`).
    pub(super) frozen: Option<FrozenPart>,
}

/// Stage 3: a block's frozen parameters (e.g. a LoRA base). Like the trainable ones each
/// rank keeps a (P,) slice of their padded flat buffer and gathers the whole just before
/// use, but they get no gradient, no reduction and no optimizer state, and never change.
pub(super) struct FrozenPart {
    pub(super) layout: FlatLayout,
    /// Handles sharing the model's frozen parameter tensors (re-pointed by `set_data`).
    pub(super) params: Vec<Tensor>,
    /// Parameters at or below `stage3_param_persistence_threshold`.
    pub(super) persistent: Vec<bool>,
    /// The owned (P,) slice in compute precision.
    pub(super) owned: Tensor,
    /// The full (padded,) buffer while the block is gathered.
    pub(super) gathered: Option<Tensor>,
}

impl BlockShard {
    pub(super) fn is_empty(&self) -> bool {
        self.layout.numel == 0
    }

    /// Offset of this rank's slice in the flat buffer.
    pub(super) fn owned_start(&self, shard_rank: usize) -> usize {
        self.layout.partition_start(shard_rank)
    }

    /// Stage 3: elements a gather of this block brings in (trainable and frozen).
    pub(super) fn gather_numel(&self) -> usize {
        self.layout.padded_numel + self.frozen.as_ref().map_or(0, |f| f.layout.padded_numel)
    }

    /// Stage 3: whether a gathered (non-resident) buffer of this block is live.
    pub(super) fn is_gathered(&self) -> bool {
        self.gathered.is_some() || self.frozen.as_ref().is_some_and(|f| f.gathered.is_some())
    }
}

/// A block's saved forward state for one micro-step.
struct Activation {
    /// The detached block input (a grad-requiring leaf when it is floating point).
    input: Tensor,
    /// The output with its graph; None when the block is recomputed in backward or ran
    /// the manual path.
    output: Option<Tensor>,
    /// What a decoder layer's manual backward needs (`model/manual_layer.rs`), when its
    /// forward ran that way.
    manual: Option<LayerSaved>,
}

impl Activation {
    fn spent() -> Self {
        Activation {
            input: Tensor::new(),
            output: None,
            manual: None,
        }
    }
}

/// What a forward through the blocks is for.
#[derive(Clone, Copy, PartialEq)]
enum Pass {
    /// Evaluation: nothing kept but the last output.
    Eval,
    /// Training whose backward starts from a loss on the last block's output, which
    /// therefore keeps its autograd graph.
    TrainToLoss,
    /// Training whose backward starts from a cotangent of the last block's output (the
    /// fused head computed it), so every decoder layer may take the manual path.
    TrainToCotangent,
}

/// The engine: owns the model's blocks, the partitioned states and the communicator.
pub struct ZeroEngine {
    pub(super) blocks: Vec<Box<dyn Block>>,
    pub(super) shards: Vec<BlockShard>,
    pub(super) frozen_params: Vec<(String, Tensor)>,
    pub(super) tied: bool,
    pub(super) comm: Arc<dyn Communicator>,
    pub(super) config: EngineConfig,
    pub(super) rank: usize,
    pub(super) world_size: usize,
    /// Ranks the optimizer state is split over: 1 for stage 0, the world otherwise.
    pub(super) shard_world: usize,
    pub(super) shard_rank: usize,
    pub(super) optimizer_device: Device,
    pub(super) schedule: LrSchedule,
    pub(super) scaler: LossScaler,
    /// Applied optimizer steps (Adam's step count; the scheduler position).
    pub(super) optimizer_steps: u64,
    /// Steps taken, skipped ones included.
    pub(super) global_steps: u64,
    pub(super) skipped_steps: u64,
    /// Micro-steps done in the current accumulation window.
    pub(super) micro_step: usize,
    /// The current window's loss weight per micro-step (`begin_window`).
    pub(super) window: Vec<f64>,
    /// This window's micro-step losses, each times its weight.
    pub(super) micro_losses: Vec<f64>,
    pub(super) pending_reduce: Vec<PendingReduce>,
    pub(super) prefetch: Option<PendingGather>,
    /// Stage 3: elements of currently gathered, non-resident blocks.
    pub(super) live_numel: usize,
    /// Stage 3 (CPU, world > 1): per block, its (trainable, frozen) gather buffers, kept
    /// and reused across gathers (`gather.rs`, `keeps_gather_buffers`).
    pub(super) kept_buffers: Vec<(Option<Tensor>, Option<Tensor>)>,
    pub(super) stage3_stats: Stage3Stats,
    pub(super) inject_overflow: bool,
    /// Per-phase timers (`RSDEEP_ZERO_PROFILE`).
    pub(super) profile: StepProfile,
}

impl ZeroEngine {
    /// Stage-3 gather/prefetch counters (all zero below stage 3).
    pub fn stage3_stats(&self) -> Stage3Stats {
        self.stage3_stats
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The model's blocks (their parameters are views into the engine's buffers; under
    /// stage 3 they are empty outside a forward/backward).
    pub fn blocks(&self) -> &[Box<dyn Block>] {
        &self.blocks
    }

    /// Micro-steps still expected before `step()`.
    pub fn is_gradient_accumulation_boundary(&self) -> bool {
        self.micro_step == self.window.len()
    }

    /// Starts an optimizer step's window: one loss weight per micro-step, micro-step i's
    /// mean loss counting `weights[i]` times in the step's loss and gradients (before the
    /// average over ranks). Without a call a window is DeepSpeed's:
    /// `gradient_accumulation_steps` micro-steps of 1/GA each. Hugging Face's token
    /// averaging weighs each micro-batch by its share of the global batch's label tokens.
    pub fn begin_window(&mut self, weights: Vec<f64>) -> Result<()> {
        if self.micro_step != 0 || weights.is_empty() {
            return Err(Error::Engine(format!(
                "begin_window with {} weights after {} micro-steps: call it once, before a window's first forward_backward",
                weights.len(),
                self.micro_step
            )));
        }
        self.window = weights;
        Ok(())
    }

    /// DeepSpeed's window: GA micro-steps weighted 1/GA.
    pub(super) fn default_window(config: &EngineConfig) -> Vec<f64> {
        let ga = config.gradient_accumulation_steps;
        vec![1.0 / ga as f64; ga]
    }

    /// One micro-batch: forward through every block, `loss_fn` on the last block's output
    /// (it returns the mean loss of this micro-batch), backward block by block with the
    /// gradients handed to the reducer as each block finishes. Returns the unscaled loss.
    pub fn forward_backward(
        &mut self,
        input: &Tensor,
        ctx: &ForwardCtx,
        loss_fn: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<f64> {
        self.check_micro_step()?;
        let _span =
            tracing::debug_span!("micro_step", rank = self.rank, micro = self.micro_step).entered();
        let last_micro = self.micro_step + 1 == self.window.len();
        let count = self.blocks.len();
        let (mut activations, _) = self.forward_all(input, ctx, Pass::TrainToLoss, count)?;
        let last = activations.len() - 1;
        let output = activations[last]
            .output
            .take()
            .ok_or_else(|| Error::Engine("head output missing".into()))?;
        let mark = self.profile.mark();
        let loss = loss_fn(&output)?.f_to_kind(Kind::Float)?;
        let loss_value = loss.f_double_value(&[])?;
        self.profile.add(Phase::Loss, mark);
        let weight = self.window[self.micro_step];
        let factor = self.scaler.scale() * weight;
        activations[last].output = Some(output);
        let root = BackwardRoot::Loss(loss.f_mul_scalar(factor)?);
        self.backward_all(activations, ctx, root, last_micro)?;
        self.micro_step += 1;
        self.micro_losses.push(loss_value * weight);
        Ok(loss_value)
    }

    /// `forward_backward` with HF's causal-LM loss on `labels` (B, T): the same result,
    /// but when the last block is an fp32 untied `Head` the head, loss and their
    /// gradients run fused over row chunks (`model/fused_head.rs`) instead of
    /// materialising the (B*T, V) logits and backpropagating a log-softmax. Other models
    /// take the generic path. Returns the unscaled mean loss.
    pub fn forward_backward_causal_lm(
        &mut self,
        input: &Tensor,
        ctx: &ForwardCtx,
        labels: &Tensor,
    ) -> Result<f64> {
        if !self.fused_head_applies(labels)? {
            return self.forward_backward(input, ctx, &mut |logits| causal_lm_loss(logits, labels));
        }
        self.check_micro_step()?;
        let _span =
            tracing::debug_span!("micro_step", rank = self.rank, micro = self.micro_step).entered();
        let last_micro = self.micro_step + 1 == self.window.len();
        let head = self.blocks.len() - 1;
        let (activations, hidden) = self.forward_all(input, ctx, Pass::TrainToCotangent, head)?; // (B, T, H)
        let weight = self.window[self.micro_step];
        let factor = self.scaler.scale() * weight;
        let mark = self.profile.mark();
        self.acquire(head, head > 0, head.wrapping_sub(1))?;
        self.profile.add(Phase::Gather, mark);
        let mark = self.profile.mark();
        let leaf = block_input_leaf(&hidden)?;
        let fused = self.blocks[head]
            .as_head()
            .ok_or_else(|| Error::Engine("last block is not the head".into()))?
            .fused_loss_backward(&leaf, labels, factor)?;
        self.profile.add(Phase::Loss, mark);
        let mark = self.profile.mark();
        self.release(head)?;
        self.profile.add(Phase::Gather, mark);
        let mark = self.profile.mark();
        let flat = flatten_grads(
            &self.shards[head],
            &fused.param_grads,
            self.config.precision.kind(),
        )?;
        self.profile.add(Phase::Flatten, mark);
        let mark = self.profile.mark();
        self.reduce_block_gradients(head, flat, last_micro)?;
        self.profile.add(Phase::ReduceIssue, mark);
        let root = BackwardRoot::Cotangent(fused.grad_input);
        self.backward_all(activations, ctx, root, last_micro)?;
        self.micro_step += 1;
        self.micro_losses.push(fused.loss * weight);
        Ok(fused.loss)
    }

    /// Whether `forward_backward_causal_lm` takes the fused head path for `labels`: fp32
    /// training of an untied head whose parameters are all trainable (no LoRA-frozen
    /// head), with at least one counted label.
    pub fn fused_head_applies(&self, labels: &Tensor) -> Result<bool> {
        let Some(head) = self.blocks.last().and_then(|b| b.as_head()) else {
            return Ok(false);
        };
        let shard = &self.shards[self.blocks.len() - 1];
        if self.tied
            || self.config.precision.kind() != Kind::Float
            || shard.is_empty()
            || shard.params.len() != head.params().len()
        {
            return Ok(false);
        }
        head.fused_loss_applies(labels)
    }

    fn check_micro_step(&self) -> Result<()> {
        if self.micro_step >= self.window.len() {
            return Err(Error::Engine(format!(
                "forward_backward called {} times without step() (window of {} micro-steps)",
                self.micro_step + 1,
                self.window.len()
            )));
        }
        Ok(())
    }

    /// Inference forward (no graph): the last block's output. Gathers under stage 3.
    pub fn forward_eval(&mut self, input: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let count = self.blocks.len();
        let (mut activations, _) = self.forward_all(input, ctx, Pass::Eval, count)?;
        activations
            .pop()
            .and_then(|a| a.output)
            .ok_or_else(|| Error::Engine("model has no blocks".into()))
    }

    /// Forward through the first `count` blocks; also returns the last one's detached
    /// output. For `Pass::Eval` nothing is kept but the last output; with activation
    /// checkpointing only block inputs are kept (for `Pass::TrainToLoss` the last block run
    /// keeps its graph, the loss needs it). Decoder layers that can (`manual_block`) run
    /// the manual path and keep what its backward needs instead of a graph. Stage-3
    /// prefetching looks past `count` the same way whatever `count` is, so every rank
    /// issues the same gathers.
    fn forward_all(
        &mut self,
        input: &Tensor,
        ctx: &ForwardCtx,
        pass: Pass,
        count: usize,
    ) -> Result<(Vec<Activation>, Tensor)> {
        let training = pass != Pass::Eval;
        let total = self.blocks.len();
        if count == 0 || count > total {
            return Err(Error::Engine(format!(
                "forward through {count} of {total} blocks"
            )));
        }
        let mut activations = Vec::with_capacity(count);
        let mut x = input.shallow_clone();
        for b in 0..count {
            let mark = self.profile.mark();
            self.acquire(b, b + 1 < total, b + 1)?;
            self.profile.add(Phase::Gather, mark);
            let mark = self.profile.mark();
            let leaf = if training {
                block_input_leaf(&x)?
            } else {
                x.shallow_clone()
            };
            let last = b + 1 == count;
            let loss_input = pass == Pass::TrainToLoss && last;
            let keep_graph = training && (!self.config.activation_checkpointing || last);
            let manual = keep_graph && !loss_input && self.manual_block(b, &leaf, ctx);
            let mut saved = None;
            let output = if manual {
                let layer = self.blocks[b].as_decoder_layer();
                let (out, kept) = layer
                    .ok_or_else(|| Error::Engine(format!("block {b} is not a decoder layer")))?
                    .forward_manual(&leaf, ctx)?;
                saved = Some(kept);
                out
            } else if keep_graph {
                self.blocks[b].forward(&leaf, ctx)?
            } else {
                tch::no_grad(|| self.blocks[b].forward(&leaf, ctx))?
            };
            self.profile.add(Phase::Forward, mark);
            let mark = self.profile.mark();
            self.release(b)?;
            self.profile.add(Phase::Gather, mark);
            x = output.f_detach()?;
            let saved_output = if (keep_graph && !manual) || last {
                Some(output)
            } else {
                None
            };
            activations.push(Activation {
                input: if training { leaf } else { Tensor::new() },
                output: saved_output,
                manual: saved,
            });
        }
        Ok((activations, x))
    }

    /// Backward in reverse block order over `activations` (the first blocks of the
    /// model), starting from the scaled loss on the last of them or from the cotangent of
    /// its output (when the head's backward already ran fused).
    fn backward_all(
        &mut self,
        mut activations: Vec<Activation>,
        ctx: &ForwardCtx,
        root: BackwardRoot,
        last_micro: bool,
    ) -> Result<()> {
        let count = activations.len();
        let total = self.blocks.len();
        let (scaled_loss, mut cotangent) = match root {
            BackwardRoot::Loss(loss) => (loss, None),
            BackwardRoot::Cotangent(cot) => (Tensor::new(), Some(cot)),
        };
        for b in (0..count).rev() {
            let _span =
                tracing::trace_span!("block_backward", rank = self.rank, block = b).entered();
            if !needs_backward(&activations[b], &self.shards[b]) {
                // E.g. a LoRA-frozen embedding: no gradient to compute, nothing to gather.
                activations[b] = Activation::spent();
                continue;
            }
            let prefetch_previous =
                b > 0 && needs_backward(&activations[b - 1], &self.shards[b - 1]);
            let mark = self.profile.mark();
            self.acquire(b, prefetch_previous, b.wrapping_sub(1))?;
            self.profile.add(Phase::Gather, mark);
            let act = std::mem::replace(&mut activations[b], Activation::spent());
            let input_has_grad = act.input.requires_grad();
            let own_count = self.shards[b].params.len();
            let tied_here = self.tied && b + 1 == total && b > 0;
            // Manual when its forward ran manually, or when a checkpointed layer can.
            let manual = act.manual.is_some()
                || (act.output.is_none() && self.manual_block(b, &act.input, ctx));
            let mut grads = match (&cotangent, manual) {
                (Some(cot), true) => self.manual_block_backward(b, act, ctx, cot)?,
                _ => {
                    let root = BackwardRoot::from_parts(&scaled_loss, cotangent.as_ref());
                    self.autograd_block_backward(b, act, ctx, root, tied_here)?
                }
            };
            let mark = self.profile.mark();
            self.release(b)?;
            self.profile.add(Phase::Gather, mark);
            let mark = self.profile.mark();
            cotangent = if input_has_grad {
                Some(grads.remove(0))
            } else {
                None
            };
            let tied_grads = grads.split_off(own_count);
            if tied_here && !self.shards[0].is_empty() {
                let flat =
                    flatten_grads(&self.shards[0], &tied_grads, self.config.precision.kind())?;
                self.shards[0].tied_grad = Some(flat);
            }
            if self.shards[b].is_empty() {
                self.profile.add(Phase::Flatten, mark);
                continue;
            }
            // A tied embedding's head gradient is the buffer its own gradient adds into.
            let flat = match self.shards[b].tied_grad.take() {
                Some(tied) => add_grads_into(&tied, &self.shards[b], &grads)?,
                None => flatten_grads(&self.shards[b], &grads, self.config.precision.kind())?,
            };
            drop(grads);
            self.profile.add(Phase::Flatten, mark);
            let mark = self.profile.mark();
            self.reduce_block_gradients(b, flat, last_micro)?;
            self.profile.add(Phase::ReduceIssue, mark);
        }
        let mark = self.profile.mark();
        self.finish_reductions()?;
        self.profile.add(Phase::ReduceWait, mark);
        Ok(())
    }

    /// Whether block `b` trains through the manual decoder-layer path on `input`: enabled
    /// (`EngineConfig::manual_layers`), a layer that `manual_applies`, every parameter
    /// trainable, and a grad-requiring input.
    fn manual_block(&self, b: usize, input: &Tensor, ctx: &ForwardCtx) -> bool {
        self.config.manual_layers
            && input.requires_grad()
            && self.shards[b].params.len() == self.blocks[b].params().len()
            && self.blocks[b]
                .as_decoder_layer()
                .is_some_and(|layer| layer.manual_applies(input, ctx))
    }

    /// Backward of decoder layer `b` by hand from what its forward saved (recomputing that
    /// forward first under activation checkpointing): d input, then one gradient per
    /// parameter.
    fn manual_block_backward(
        &mut self,
        b: usize,
        act: Activation,
        ctx: &ForwardCtx,
        cotangent: &Tensor,
    ) -> Result<Vec<Tensor>> {
        let layer = self.blocks[b]
            .as_decoder_layer()
            .ok_or_else(|| Error::Engine(format!("block {b} is not a decoder layer")))?;
        let saved = match act.manual {
            Some(saved) => saved,
            None => {
                let mark = self.profile.mark();
                let (_, saved) = layer.forward_manual(&act.input, ctx)?;
                self.profile.add(Phase::Forward, mark);
                saved
            }
        };
        let mark = self.profile.mark();
        let (d_input, param_grads) = layer.backward_manual(saved, cotangent)?;
        self.profile.add(Phase::Backward, mark);
        Ok(std::iter::once(d_input).chain(param_grads).collect())
    }

    /// Backward of block `b` through autograd (recomputing its forward with a graph under
    /// activation checkpointing): d input when the input requires grad, then the block's
    /// trainable parameters' gradients, then the embedding's when a tied head is `b`.
    fn autograd_block_backward(
        &mut self,
        b: usize,
        act: Activation,
        ctx: &ForwardCtx,
        root: BackwardRoot,
        tied_here: bool,
    ) -> Result<Vec<Tensor>> {
        let mark = self.profile.mark();
        let output = match act.output {
            Some(output) => output,
            None => self.blocks[b].forward(&act.input, ctx)?,
        };
        self.profile.add(Phase::Forward, mark);
        let mark = self.profile.mark();
        let root = match root {
            BackwardRoot::Loss(loss) => loss,
            BackwardRoot::Cotangent(cot) => output.f_mul(&cot)?.f_sum(Kind::Float)?,
        };
        let mut wrt: Vec<Tensor> = Vec::new();
        if act.input.requires_grad() {
            wrt.push(act.input.shallow_clone());
        }
        wrt.extend(self.shards[b].params.iter().map(|p| p.shallow_clone()));
        if tied_here {
            wrt.extend(self.shards[0].params.iter().map(|p| p.shallow_clone()));
        }
        let grads = if wrt.is_empty() {
            Vec::new()
        } else {
            Tensor::f_run_backward(&[root], &wrt, false, false)?
        };
        self.profile.add(Phase::Backward, mark);
        Ok(grads)
    }

    /// Stage 3: makes block `b` (and block 0 for a tied head) usable, and prefetches
    /// `next` when `has_next`. Other stages: nothing to do.
    fn acquire(&mut self, b: usize, has_next: bool, next: usize) -> Result<()> {
        if !self.config.stage.partitions_parameters() {
            return Ok(());
        }
        self.ensure_gathered(b)?;
        if self.tied && b + 1 == self.blocks.len() {
            self.ensure_gathered(0)?;
        }
        if has_next {
            self.maybe_prefetch(next)?;
        }
        Ok(())
    }

    /// Stage 3: frees block `b`'s gathered parameters (and block 0's for a tied head).
    fn release(&mut self, b: usize) -> Result<()> {
        if !self.config.stage.partitions_parameters() {
            return Ok(());
        }
        self.release_block(b)?;
        if self.tied && b + 1 == self.blocks.len() {
            self.release_block(0)?;
        }
        Ok(())
    }
}

/// Where the backward pass starts: the scaled loss of the last block's output, or the
/// cotangent of the output of the last block in `activations`.
enum BackwardRoot {
    Loss(Tensor),
    Cotangent(Tensor),
}

impl BackwardRoot {
    /// The root for the current block: the cotangent from the block after it when there
    /// is one, else the scaled loss.
    fn from_parts(scaled_loss: &Tensor, cotangent: Option<&Tensor>) -> Self {
        match cotangent {
            Some(cot) => BackwardRoot::Cotangent(cot.shallow_clone()),
            None => BackwardRoot::Loss(scaled_loss.shallow_clone()),
        }
    }
}

/// Whether a block's backward produces anything: a cotangent for the previous block (its
/// input requires grad) or gradients of its own trainable parameters. Only an all-frozen
/// block fed integer ids (the embedding of a LoRA run) does not.
fn needs_backward(activation: &Activation, shard: &BlockShard) -> bool {
    activation.input.requires_grad() || !shard.is_empty()
}

/// The detached input of a block; floating-point inputs become grad-requiring leaves so
/// the block's backward yields the previous block's cotangent.
fn block_input_leaf(x: &Tensor) -> Result<Tensor> {
    let detached = x.f_detach()?;
    if detached.is_floating_point() {
        Ok(detached.f_set_requires_grad(true)?)
    } else {
        Ok(detached)
    }
}

/// Concatenates per-parameter gradients into a (padded,) flat buffer of `kind`; an
/// undefined gradient (parameter unused) counts as zeros.
pub(super) fn flatten_grads(shard: &BlockShard, grads: &[Tensor], kind: Kind) -> Result<Tensor> {
    let device = shard.compute.device();
    let mut pieces = Vec::with_capacity(grads.len() + 1);
    for (slot, grad) in shard.layout.slots.iter().zip(grads) {
        let piece = if grad.defined() {
            grad.f_reshape([-1])?.f_to_kind(kind)?
        } else {
            Tensor::f_zeros([slot.numel as i64], (kind, device))?
        };
        pieces.push(piece);
    }
    let padding = shard.layout.padding();
    if padding > 0 {
        pieces.push(Tensor::f_zeros([padding as i64], (kind, device))?);
    }
    Ok(Tensor::f_cat(&pieces, 0)?)
}

/// Adds per-parameter gradients into their slots of the (padded,) flat buffer `flat` in
/// place (an undefined gradient adds nothing); returns `flat`. `a + b` is `b + a` in IEEE
/// arithmetic, so this equals `flatten_grads(grads) + flat` bit for bit.
fn add_grads_into(flat: &Tensor, shard: &BlockShard, grads: &[Tensor]) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    for (slot, grad) in shard.layout.slots.iter().zip(grads) {
        if grad.defined() {
            let mut piece = flat.f_narrow(0, slot.offset as i64, slot.numel as i64)?;
            let _ = piece.f_add_(&grad.f_reshape([-1])?.f_to_kind(flat.kind())?)?;
        }
    }
    Ok(flat.shallow_clone())
}

/// Re-points every parameter at its view of the (padded,) buffer `flat`.
pub(super) fn point_params_at(
    params: &mut [Tensor],
    layout: &FlatLayout,
    flat: &Tensor,
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for (p, slot) in params.iter_mut().zip(&layout.slots) {
        let view = flat
            .f_narrow(0, slot.offset as i64, slot.numel as i64)?
            .f_view(slot.shape.as_slice())?;
        p.f_set_data(&view)?;
    }
    Ok(())
}
