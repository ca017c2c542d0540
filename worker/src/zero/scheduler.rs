//! Learning-rate schedules with DeepSpeed's exact formulas (`deepspeed/runtime/
//! lr_schedules.py`: WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle's learning rate,
//! LRRangeTest) and Hugging Face's
//! `get_scheduler` schedules (every `lr_scheduler_type` of transformers 5 with its
//! keyword arguments) for configs without a DeepSpeed scheduler. Contract: `lr_for_step(k)` is the rate the k-th applied
//! optimizer step (0-based) uses. DeepSpeed schedulers start at `last_batch_iteration = -1`
//! (rate: WarmupLR's and WarmupDecayLR's `warmup_min_lr`, which their constructors set;
//! WarmupCosineLR's 0.0) and are stepped after each applied step, so step k uses iteration
//! k - 1 (checked against the packages in `worker/tests/lr_schedules.rs`);
//! HF's LambdaLR uses `lambda(k)` for step k. Skipped (overflow) steps do not advance it.

use super::config::{HfSchedule, OneCycle, SchedulerConfig, WarmupType, WsdShape};
use std::f64::consts::PI;

/// The schedule and the optimizer's base lr.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub config: SchedulerConfig,
    pub base_lr: f64,
}

impl LrSchedule {
    pub fn new(config: SchedulerConfig, base_lr: f64) -> Self {
        LrSchedule { config, base_lr }
    }

    /// The learning rate of the `step`-th applied optimizer step (0-based).
    pub fn lr_for_step(&self, step: u64) -> f64 {
        let iteration = step as i64 - 1;
        match self.config {
            SchedulerConfig::Constant => self.base_lr,
            SchedulerConfig::WarmupLr {
                warmup_min_lr,
                warmup_max_lr,
                warmup_num_steps,
                warmup_type,
            } => {
                if iteration < 0 {
                    return warmup_min_lr;
                }
                let gamma = warmup_gamma(iteration, warmup_num_steps, warmup_type).unwrap_or(1.0);
                warmup_min_lr + (warmup_max_lr - warmup_min_lr) * gamma
            }
            SchedulerConfig::WarmupDecayLr {
                warmup_min_lr,
                warmup_max_lr,
                warmup_num_steps,
                total_num_steps,
                warmup_type,
            } => {
                if iteration < 0 {
                    return warmup_min_lr;
                }
                let warmup = effective_warmup(warmup_num_steps) as f64;
                let gamma =
                    warmup_gamma(iteration, warmup_num_steps, warmup_type).unwrap_or_else(|| {
                        let total = total_num_steps as f64;
                        ((total - iteration as f64) / (total - warmup).max(1.0)).max(0.0)
                    });
                warmup_min_lr + (warmup_max_lr - warmup_min_lr) * gamma
            }
            SchedulerConfig::WarmupCosineLr {
                warmup_min_ratio,
                cos_min_ratio,
                warmup_num_steps,
                total_num_steps,
                warmup_type,
            } => {
                if iteration < 0 {
                    return 0.0;
                }
                let capped = iteration.min(total_num_steps as i64);
                self.base_lr
                    * cosine_ratio(
                        capped,
                        warmup_min_ratio,
                        cos_min_ratio,
                        warmup_num_steps,
                        total_num_steps,
                        warmup_type,
                    )
            }
            SchedulerConfig::OneCycle(cycle) => one_cycle_lr(&cycle, iteration),
            SchedulerConfig::LrRangeTest {
                min_lr,
                step_size,
                step_rate,
                staircase,
            } => {
                let mut interval = step as f64 / step_size.max(1) as f64;
                if staircase {
                    interval = interval.floor();
                }
                min_lr * (1.0 + step_rate * interval)
            }
            SchedulerConfig::Hf {
                schedule,
                warmup_steps,
                total_steps,
            } => self.base_lr * hf_factor(schedule, step, warmup_steps, total_steps, self.base_lr),
        }
    }
}

/// DeepSpeed clamps the warmup length to at least 2 (log warmup divides by ln(N)).
fn effective_warmup(warmup_num_steps: u64) -> u64 {
    warmup_num_steps.max(2)
}

/// The warmup fraction at `iteration`, or None once warmup is over.
fn warmup_gamma(iteration: i64, warmup_num_steps: u64, warmup_type: WarmupType) -> Option<f64> {
    let warmup = effective_warmup(warmup_num_steps);
    if iteration >= warmup as i64 {
        return None;
    }
    Some(match warmup_type {
        WarmupType::Log => ((iteration + 1) as f64).ln() / (warmup as f64).ln(),
        WarmupType::Linear => iteration as f64 / warmup as f64,
    })
}

/// WarmupCosineLR's `get_lr_ratio` at a non-negative iteration.
fn cosine_ratio(
    iteration: i64,
    warmup_min_ratio: f64,
    cos_min_ratio: f64,
    warmup_num_steps: u64,
    total_num_steps: u64,
    warmup_type: WarmupType,
) -> f64 {
    if let Some(gamma) = warmup_gamma(iteration, warmup_num_steps, warmup_type) {
        return warmup_min_ratio + gamma * (1.0 - warmup_min_ratio);
    }
    let warmup = effective_warmup(warmup_num_steps) as i64;
    let real_last_step = (iteration - warmup + 1) as f64;
    let real_total_steps = (total_num_steps as i64 - warmup).max(1) as f64;
    // DeepSpeed clamps the progress at 1: past the end the ratio stays at cos_min_ratio.
    let progress = (real_last_step / real_total_steps).min(1.0);
    let cosine = (1.0 + (PI * progress).cos()) / 2.0;
    (cos_min_ratio + (1.0 - cos_min_ratio) * cosine).max(0.0)
}

/// DeepSpeed's OneCycle rate at `iteration` (-1: the constructor's `min_lr`).
fn one_cycle_lr(cycle: &OneCycle, iteration: i64) -> f64 {
    let size = cycle.first_step_size + cycle.second_step_size;
    if iteration < 0 {
        return cycle.min_lr;
    }
    if (iteration as f64) < size {
        return cycle.min_lr + (cycle.max_lr - cycle.min_lr) * one_cycle_scale(cycle, iteration);
    }
    if cycle.decay_step_size.abs() < 1e-9 || cycle.decay_lr_rate.abs() < 1e-9 {
        return cycle.min_lr;
    }
    let decayed = (iteration as f64 - size + 1.0) / cycle.decay_step_size;
    cycle.min_lr / (1.0 + cycle.decay_lr_rate * decayed)
}

/// OneCycle's position in the cycle as a 0..1 scale, in stairs when the half has a count.
fn one_cycle_scale(cycle: &OneCycle, iteration: i64) -> f64 {
    let size = cycle.first_step_size + cycle.second_step_size;
    let ratio = cycle.first_step_size / size;
    let batch = (iteration + 1) as f64;
    let x = 1.0 + batch / size - (1.0 + batch / size).floor();
    let (scale, stairs) = match x <= ratio {
        true => (x / ratio, cycle.first_stair_count),
        false => ((x - 1.0) / (ratio - 1.0), cycle.second_stair_count),
    };
    if stairs == 0 {
        return scale;
    }
    let within = batch % size;
    let position = match within <= cycle.first_step_size {
        true => within * stairs as f64 / cycle.first_step_size,
        false => (size - within) * stairs as f64 / cycle.second_step_size,
    };
    position.floor() / stairs as f64
}

/// transformers' schedule lambdas (`optimization.py`): the factor on the base lr at
/// `step`, with `warmup` linear warmup steps of `total`.
fn hf_factor(schedule: HfSchedule, step: u64, warmup: u64, total: u64, base_lr: f64) -> f64 {
    let (s, w, t) = (step as f64, warmup as f64, total as f64);
    let warming = step < warmup;
    let warmup_factor = s / w.max(1.0);
    let progress = (s - w) / (t - w).max(1.0);
    let cosine = |cycles: f64| 0.5 * (1.0 + (PI * cycles * 2.0 * progress).cos());
    match schedule {
        HfSchedule::Constant => 1.0,
        HfSchedule::ConstantWithWarmup if warming => warmup_factor,
        HfSchedule::ConstantWithWarmup => 1.0,
        HfSchedule::WarmupStableDecay { .. } => wsd_factor(schedule, step, warmup, total),
        _ if warming => warmup_factor,
        HfSchedule::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
        HfSchedule::Cosine { num_cycles } => cosine(num_cycles).max(0.0),
        HfSchedule::CosineWithRestarts { .. } if progress >= 1.0 => 0.0,
        HfSchedule::CosineWithRestarts { num_cycles } => {
            (0.5 * (1.0 + (PI * ((num_cycles * progress) % 1.0)).cos())).max(0.0)
        }
        HfSchedule::CosineWithMinLr {
            num_cycles,
            min_lr_rate,
        } => (cosine(num_cycles) * (1.0 - min_lr_rate) + min_lr_rate).max(0.0),
        HfSchedule::Polynomial { lr_end, .. } if step > total => lr_end / base_lr,
        HfSchedule::Polynomial { lr_end, power } => {
            let remaining = 1.0 - (s - w) / (t - w);
            ((base_lr - lr_end) * remaining.powf(power) + lr_end) / base_lr
        }
        HfSchedule::InverseSqrt { timescale } => {
            let timescale = timescale.unwrap_or(if warmup > 0 { w } else { 10_000.0 });
            1.0 / ((s + timescale - w) / timescale).sqrt()
        }
    }
}

/// transformers' warmup-stable-decay lambda.
fn wsd_factor(schedule: HfSchedule, step: u64, warmup: u64, total: u64) -> f64 {
    let HfSchedule::WarmupStableDecay {
        num_stable_steps,
        num_decay_steps,
        warmup_type,
        decay_type,
        min_lr_ratio,
        num_cycles,
    } = schedule
    else {
        return 1.0;
    };
    let stable = num_stable_steps
        .unwrap_or_else(|| total.saturating_sub(warmup).saturating_sub(num_decay_steps));
    let floor = |factor: f64| (factor * (1.0 - min_lr_ratio) + min_lr_ratio).max(0.0);
    if step < warmup {
        let progress = step as f64 / warmup.max(1) as f64;
        return floor(match warmup_type {
            WsdShape::Linear => progress,
            WsdShape::Cosine => 0.5 * (1.0 - (PI * progress).cos()),
            WsdShape::OneMinusSqrt => 1.0 - (1.0 - progress).sqrt(),
        });
    }
    if step < warmup + stable {
        return 1.0;
    }
    if step < warmup + stable + num_decay_steps {
        let progress = (step - warmup - stable) as f64 / num_decay_steps.max(1) as f64;
        return floor(match decay_type {
            WsdShape::Linear => 1.0 - progress,
            WsdShape::Cosine => 0.5 * (1.0 + (PI * num_cycles * 2.0 * progress).cos()),
            WsdShape::OneMinusSqrt => 1.0 - progress.sqrt(),
        });
    }
    min_lr_ratio
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn warmup_lr_log_and_linear_match_hand_values() {
        let log = LrSchedule::new(
            SchedulerConfig::WarmupLr {
                warmup_min_lr: 0.1,
                warmup_max_lr: 1.1,
                warmup_num_steps: 10,
                warmup_type: WarmupType::Log,
            },
            1.1,
        );
        close(log.lr_for_step(0), 0.1); // iteration -1: the constructor's warmup_min_lr
        close(log.lr_for_step(1), 0.1); // ln(1) = 0
        close(log.lr_for_step(5), 0.1 + 5f64.ln() / 10f64.ln());
        close(log.lr_for_step(11), 1.1);
        let lin = LrSchedule::new(
            SchedulerConfig::WarmupLr {
                warmup_min_lr: 0.0,
                warmup_max_lr: 1.0,
                warmup_num_steps: 4,
                warmup_type: WarmupType::Linear,
            },
            1.0,
        );
        close(lin.lr_for_step(3), 0.5); // iteration 2 / 4
        close(lin.lr_for_step(100), 1.0);
        let one = LrSchedule::new(
            SchedulerConfig::WarmupLr {
                warmup_min_lr: 0.0,
                warmup_max_lr: 1.0,
                warmup_num_steps: 1,
                warmup_type: WarmupType::Linear,
            },
            1.0,
        );
        close(one.lr_for_step(2), 0.5); // warmup clamped to 2
    }

    #[test]
    fn warmup_decay_lr_decays_linearly_to_zero() {
        let s = LrSchedule::new(
            SchedulerConfig::WarmupDecayLr {
                warmup_min_lr: 0.0,
                warmup_max_lr: 2.0,
                warmup_num_steps: 4,
                total_num_steps: 12,
                warmup_type: WarmupType::Linear,
            },
            2.0,
        );
        close(s.lr_for_step(2), 2.0 * 1.0 / 4.0);
        close(s.lr_for_step(5), 2.0); // iteration 4: (12-4)/8
        close(s.lr_for_step(9), 2.0 * 4.0 / 8.0); // iteration 8
        close(s.lr_for_step(20), 0.0);
    }

    #[test]
    fn warmup_cosine_lr_uses_ratios_of_the_base_lr() {
        let s = LrSchedule::new(
            SchedulerConfig::WarmupCosineLr {
                warmup_min_ratio: 0.1,
                cos_min_ratio: 0.01,
                warmup_num_steps: 4,
                total_num_steps: 10,
                warmup_type: WarmupType::Linear,
            },
            0.5,
        );
        close(s.lr_for_step(0), 0.0);
        close(s.lr_for_step(3), 0.5 * (0.1 + 0.5 * 0.9)); // iteration 2
        // iteration 5: real_last_step 2 of 6
        let cosine = (1.0 + (PI * 2.0 / 6.0).cos()) / 2.0;
        close(s.lr_for_step(6), 0.5 * (0.01 + 0.99 * cosine));
        // the end (progress clamped at 1): ratio = cos_min_ratio, and it stays there
        close(s.lr_for_step(11), 0.5 * 0.01);
        assert_eq!(s.lr_for_step(50), s.lr_for_step(11));
    }

    #[test]
    fn hf_schedules_match_transformers_lambdas() {
        let hf = |schedule, warmup_steps, total_steps, base_lr| {
            LrSchedule::new(
                SchedulerConfig::Hf {
                    schedule,
                    warmup_steps,
                    total_steps,
                },
                base_lr,
            )
        };
        let lin = hf(HfSchedule::Linear, 2, 10, 1.0);
        close(lin.lr_for_step(0), 0.0);
        close(lin.lr_for_step(1), 0.5);
        close(lin.lr_for_step(2), 1.0);
        close(lin.lr_for_step(6), 0.5);
        close(lin.lr_for_step(10), 0.0);
        let cos = hf(HfSchedule::Cosine { num_cycles: 0.5 }, 0, 4, 2.0);
        close(cos.lr_for_step(0), 2.0);
        close(cos.lr_for_step(2), 1.0);
        close(cos.lr_for_step(4), 0.0);
        let flat = hf(HfSchedule::ConstantWithWarmup, 4, 100, 2.0);
        close(flat.lr_for_step(1), 0.5);
        close(flat.lr_for_step(4), 2.0);
        close(flat.lr_for_step(1000), 2.0);
    }
}
