//! The optimizer step, identical on every rank: fp16 overflow check (local inf/nan, then
//! all-reduce Max, so a bad step is skipped everywhere), global gradient norm over the
//! partitions (sum of squares of owned slices, all-reduce Sum), DeepSpeed's combined
//! unscale-and-clip factor, Adam/AdamW on the owned fp32 slices with the scheduled lr,
//! copy back into the compute buffers and all-gather (stages 1/2).
//! Contract: `docs/zero-engine.md`.

use super::config::Precision;
use super::engine::ZeroEngine;
use super::profile::Phase;
use crate::comm::ReduceOp;
use crate::{Error, Result};
use tch::{Kind, Tensor};

/// What one `step()` did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// false when the step was skipped for inf/nan gradients.
    pub applied: bool,
    /// Mean loss of the global batch (over micro-steps and ranks).
    pub loss: f64,
    /// Global gradient norm, unscaled, before clipping.
    pub grad_norm: f64,
    /// Learning rate used (0 when skipped).
    pub lr: f64,
    /// The learning rate as Hugging Face's Trainer + DeepSpeed logs it after this step:
    /// the rate of the next step (DeepSpeed's engine steps the scheduler — its own or the
    /// Trainer's, which the Trainer hands it — inside its step, before the Trainer reads it).
    pub logged_lr: f64,
    /// Loss scale in effect for this step's gradients.
    pub loss_scale: f64,
    /// Steps taken so far, skipped ones included.
    pub global_step: u64,
}

impl ZeroEngine {
    /// Applies the accumulated gradients; call after `gradient_accumulation_steps`
    /// micro-steps of `forward_backward`.
    pub fn step(&mut self) -> Result<StepReport> {
        if !self.is_gradient_accumulation_boundary() {
            return Err(Error::Engine(format!(
                "step() after {} of {} micro-steps",
                self.micro_step,
                self.window.len()
            )));
        }
        let _span =
            tracing::info_span!("zero_step", rank = self.rank, step = self.global_steps).entered();
        self.settle_gathers()?;
        let scale = self.scaler.scale();
        if std::mem::take(&mut self.inject_overflow) {
            self.poison_gradients()?;
        }
        let mark = self.profile.mark();
        let loss = self.mean_loss()?;
        let overflow = self.detect_overflow()?;
        let scaled_norm = self.global_grad_norm()?;
        self.profile.add(Phase::StepNorm, mark);
        let fp16 = matches!(self.config.precision, Precision::Fp16(_));
        let overflow = overflow || (fp16 && !scaled_norm.is_finite());
        self.micro_step = 0;
        self.micro_losses.clear();
        self.window = Self::default_window(&self.config);
        self.global_steps += 1;
        if overflow {
            return self.skip_step(loss, scale);
        }
        let lr = self.schedule.lr_for_step(self.optimizer_steps);
        let combined = self.combined_scale(scaled_norm, scale);
        let mark = self.profile.mark();
        self.apply_updates(lr, combined)?;
        self.profile.add(Phase::StepAdam, mark);
        self.optimizer_steps += 1;
        self.scaler.update(false);
        let mark = self.profile.mark();
        self.zero_gradients()?;
        self.profile.add(Phase::StepZero, mark);
        let mark = self.profile.mark();
        if self.config.stage.partitions_parameters() {
            self.invalidate_resident();
        } else {
            self.all_gather_updated_params()?;
        }
        self.profile.add(Phase::StepAllGather, mark);
        self.profile.report(self.rank, self.global_steps);
        let report = StepReport {
            applied: true,
            loss,
            grad_norm: scaled_norm / scale,
            lr,
            logged_lr: self.schedule.lr_for_step(self.optimizer_steps),
            loss_scale: scale,
            global_step: self.global_steps,
        };
        self.maybe_print(&report);
        Ok(report)
    }

    /// Fault injection for tests: before the next step's overflow check this rank writes
    /// an inf into its first owned gradient element (only on this rank).
    pub fn inject_gradient_overflow(&mut self) {
        self.inject_overflow = true;
    }

    /// Applied optimizer steps so far.
    pub fn optimizer_steps(&self) -> u64 {
        self.optimizer_steps
    }

    /// Steps skipped for overflow so far.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }

    /// The current loss scale (1 without fp16).
    pub fn loss_scale(&self) -> f64 {
        self.scaler.scale()
    }

    fn skip_step(&mut self, loss: f64, scale: f64) -> Result<StepReport> {
        self.scaler.update(true);
        self.skipped_steps += 1;
        self.zero_gradients()?;
        tracing::warn!(
            rank = self.rank,
            "[rsdeep] OVERFLOW! Rank {} Skipping step. Attempted loss scale: {}, reducing to {}",
            self.rank,
            scale,
            self.scaler.scale()
        );
        Ok(StepReport {
            applied: false,
            loss,
            grad_norm: f64::NAN,
            lr: 0.0,
            logged_lr: self.schedule.lr_for_step(self.optimizer_steps),
            loss_scale: scale,
            global_step: self.global_steps,
        })
    }

    /// DeepSpeed's `unscale_and_clip_grads` factor: gradients are divided by it.
    fn combined_scale(&self, scaled_norm: f64, scale: f64) -> f64 {
        let clip = self.config.gradient_clipping;
        if clip > 0.0 {
            let ratio = ((scaled_norm / scale) + 1e-6) / clip;
            if ratio > 1.0 {
                return ratio * scale;
            }
        }
        scale
    }

    /// The owned (P,) gradient slice of block `b` (a view).
    pub(super) fn owned_grad(&self, b: usize) -> Result<Tensor> {
        let shard = &self.shards[b];
        if let Some(owned) = &shard.grad_owned {
            return Ok(owned.shallow_clone());
        }
        let full = shard
            .grad_full
            .as_ref()
            .ok_or_else(|| Error::Engine(format!("block {b} has no gradients")))?;
        let start = shard.owned_start(self.shard_rank) as i64;
        Ok(full.f_narrow(0, start, shard.layout.partition_numel() as i64)?)
    }

    fn poison_gradients(&mut self) -> Result<()> {
        if let Some(b) = self.shards.iter().position(|s| !s.is_empty()) {
            let mut first = self.owned_grad(b)?.f_narrow(0, 0, 1)?;
            let _ = tch::no_grad(|| first.f_fill_(f64::INFINITY))?;
        }
        Ok(())
    }

    /// This window's weighted micro-step losses summed, averaged over ranks.
    fn mean_loss(&self) -> Result<f64> {
        let local = self.micro_losses.iter().sum::<f64>();
        if self.world_size == 1 {
            return Ok(local);
        }
        let t = Tensor::from_slice(&[local]);
        self.comm.all_reduce(&t, ReduceOp::Avg)?.wait()?;
        Ok(t.f_double_value(&[0])?)
    }

    /// fp16 only: any inf/nan in this rank's gradients, agreed on by every rank.
    fn detect_overflow(&self) -> Result<bool> {
        if !matches!(self.config.precision, Precision::Fp16(_)) {
            return Ok(false);
        }
        let mut local = false;
        for b in 0..self.shards.len() {
            if self.shards[b].is_empty() {
                continue;
            }
            let grad = match &self.shards[b].grad_full {
                Some(full) => full.shallow_clone(),
                None => self.owned_grad(b)?,
            };
            let all_finite = grad.f_isfinite()?.f_all()?.f_int64_value(&[])? != 0;
            local |= !all_finite;
        }
        if self.world_size == 1 {
            return Ok(local);
        }
        let flag = Tensor::from_slice(&[if local { 1f32 } else { 0f32 }]);
        self.comm.all_reduce(&flag, ReduceOp::Max)?.wait()?;
        Ok(flag.f_double_value(&[0])? > 0.0)
    }

    /// sqrt of the sum of squares of every rank's owned gradient slice (still scaled).
    fn global_grad_norm(&self) -> Result<f64> {
        let mut local = 0f64;
        for b in 0..self.shards.len() {
            if self.shards[b].is_empty() {
                continue;
            }
            let grad = self.owned_grad(b)?.f_to_kind(Kind::Float)?;
            local += grad.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
        }
        if self.shard_world == 1 {
            return Ok(local.sqrt());
        }
        let t = Tensor::from_slice(&[local]);
        self.comm.all_reduce(&t, ReduceOp::Sum)?.wait()?;
        Ok(t.f_double_value(&[0])?.sqrt())
    }

    /// Adam on every owned slice, then the new values into the compute buffers.
    fn apply_updates(&mut self, lr: f64, combined_scale: f64) -> Result<()> {
        let step = self.optimizer_steps + 1;
        let _guard = tch::no_grad_guard();
        for b in 0..self.shards.len() {
            if self.shards[b].is_empty() {
                continue;
            }
            let grad = self
                .owned_grad(b)?
                .f_to_kind(Kind::Float)?
                .f_to_device(self.optimizer_device)?
                .f_div_scalar(combined_scale)?;
            let start = self.shards[b].owned_start(self.shard_rank) as i64;
            let stage3 = self.config.stage.partitions_parameters();
            let shard = &mut self.shards[b];
            let optim = shard
                .optim
                .as_mut()
                .ok_or_else(|| Error::Engine(format!("block {b} has no optimizer state")))?;
            let updated = optim
                .update(&grad, lr, step, &self.config.optimizer)?
                .f_to_kind(shard.compute.kind())?
                .f_to_device(shard.compute.device())?;
            let mut target = if stage3 {
                shard.compute.shallow_clone()
            } else {
                shard.compute.f_narrow(0, start, updated.numel() as i64)?
            };
            // Masters over the compute buffer were updated in place.
            if target.data_ptr() != updated.data_ptr() {
                target.f_copy_(&updated)?;
            }
        }
        Ok(())
    }

    pub(super) fn zero_gradients(&mut self) -> Result<()> {
        for shard in &mut self.shards {
            for grad in [&mut shard.grad_full, &mut shard.grad_owned]
                .into_iter()
                .flatten()
            {
                let _ = grad.f_zero_()?;
            }
        }
        Ok(())
    }

    fn maybe_print(&self, report: &StepReport) {
        let every = self.config.steps_per_print;
        if every > 0 && report.global_step.is_multiple_of(every) && self.rank == 0 {
            tracing::info!(
                rank = self.rank,
                "step={} loss={:.6} lr={:.3e} grad_norm={:.4} loss_scale={} skipped={}",
                report.global_step,
                report.loss,
                report.lr,
                report.grad_norm,
                report.loss_scale,
                self.skipped_steps
            );
        }
    }
}
