//! fp16 loss scaling with DeepSpeed's semantics (`DynamicLossScaler.update_scale` in
//! `deepspeed/runtime/fp16/loss_scaler.py`): start at 2^initial_scale_power; on overflow
//! spend one unit of hysteresis, or halve the scale (not below min_loss_scale) once it is
//! spent; after `loss_scale_window` clean iterations since the last overflow, double it.
//! A static scale (`loss_scale > 0`) never changes. The state is plain data so
//! checkpoints can save and restore it.

use super::config::LossScaleConfig;

const SCALE_FACTOR: f64 = 2.0;

/// The scaler's whole state; serialisable as numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScalerState {
    pub cur_scale: f64,
    pub cur_iter: u64,
    /// -1 before the first overflow.
    pub last_overflow_iter: i64,
    pub cur_hysteresis: u32,
}

/// Dynamic (or static) loss scaler.
#[derive(Debug, Clone)]
pub struct LossScaler {
    config: LossScaleConfig,
    state: LossScalerState,
}

impl LossScaler {
    pub fn new(config: LossScaleConfig) -> Self {
        let cur_scale = if config.loss_scale > 0.0 {
            config.loss_scale
        } else {
            2f64.powi(config.initial_scale_power as i32)
        };
        LossScaler {
            config,
            state: LossScalerState {
                cur_scale,
                cur_iter: 0,
                last_overflow_iter: -1,
                cur_hysteresis: config.hysteresis,
            },
        }
    }

    /// A scaler that always returns 1 (bf16 / fp32).
    pub fn unit() -> Self {
        LossScaler::new(LossScaleConfig {
            loss_scale: 1.0,
            ..LossScaleConfig::default()
        })
    }

    pub fn scale(&self) -> f64 {
        self.state.cur_scale
    }

    pub fn is_dynamic(&self) -> bool {
        self.config.loss_scale <= 0.0
    }

    pub fn state(&self) -> LossScalerState {
        self.state
    }

    pub fn load_state(&mut self, state: LossScalerState) {
        self.state = state;
    }

    /// Records one optimizer iteration, `overflow` meaning its gradients had inf/nan.
    pub fn update(&mut self, overflow: bool) {
        if !self.is_dynamic() {
            return;
        }
        let delayed_shift = self.config.hysteresis;
        let s = &mut self.state;
        if overflow {
            if delayed_shift == 1 || s.cur_hysteresis == 1 {
                s.cur_scale = (s.cur_scale / SCALE_FACTOR).max(self.config.min_loss_scale);
            } else {
                s.cur_hysteresis -= 1;
            }
            s.last_overflow_iter = s.cur_iter as i64;
        } else {
            if self.config.consecutive_hysteresis {
                s.cur_hysteresis = delayed_shift;
            }
            let clean = s.cur_iter as i64 - s.last_overflow_iter;
            if clean % self.config.loss_scale_window as i64 == 0 {
                if !self.config.consecutive_hysteresis {
                    s.cur_hysteresis = delayed_shift;
                }
                s.cur_scale *= SCALE_FACTOR;
            }
        }
        s.cur_iter += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(hysteresis: u32, window: u64) -> LossScaleConfig {
        LossScaleConfig {
            loss_scale: 0.0,
            initial_scale_power: 4,
            loss_scale_window: window,
            hysteresis,
            consecutive_hysteresis: false,
            min_loss_scale: 2.0,
        }
    }

    #[test]
    fn overflow_halves_without_hysteresis_and_stops_at_the_minimum() {
        let mut s = LossScaler::new(config(1, 1000));
        assert_eq!(s.scale(), 16.0);
        s.update(true);
        assert_eq!(s.scale(), 8.0);
        s.update(true);
        s.update(true);
        s.update(true);
        assert_eq!(s.scale(), 2.0);
    }

    #[test]
    fn hysteresis_absorbs_the_first_overflows() {
        let mut s = LossScaler::new(config(2, 1000));
        s.update(true);
        assert_eq!(s.scale(), 16.0);
        assert_eq!(s.state().cur_hysteresis, 1);
        s.update(true);
        assert_eq!(s.scale(), 8.0);
    }

    #[test]
    fn clean_window_doubles_and_restores_hysteresis() {
        let mut s = LossScaler::new(config(2, 3));
        s.update(true); // iter 0: hysteresis 2 -> 1, last_overflow 0
        s.update(false); // iter 1: 1 % 3
        s.update(false); // iter 2: 2 % 3
        assert_eq!(s.scale(), 16.0);
        s.update(false); // iter 3: 3 % 3 == 0 -> double
        assert_eq!(s.scale(), 32.0);
        assert_eq!(s.state().cur_hysteresis, 2);
    }

    #[test]
    fn first_growth_counts_from_iteration_minus_one() {
        // DeepSpeed starts last_overflow_iter at -1: with window 2, iteration 1 doubles.
        let mut s = LossScaler::new(config(1, 2));
        s.update(false);
        assert_eq!(s.scale(), 16.0);
        s.update(false);
        assert_eq!(s.scale(), 32.0);
    }

    #[test]
    fn static_scale_never_moves() {
        let mut s = LossScaler::new(LossScaleConfig {
            loss_scale: 128.0,
            ..config(1, 1)
        });
        s.update(true);
        s.update(false);
        assert_eq!(s.scale(), 128.0);
        assert_eq!(LossScaler::unit().scale(), 1.0);
    }
}
