//! Adam/AdamW on one flat fp32 slice, with `torch.optim.AdamW`'s single-tensor math
//! (bias-corrected moments; decoupled decay `p *= 1 - lr*wd` before the update) or
//! Adam's L2 decay (`g += wd*p`). Each rank runs it only on the slice it owns; the
//! engine (`engine.rs`) owns the step counter and the learning rate. A slice lives in
//! memory, or with NVMe offload in its swap file (`swap.rs`), read in for each use. When
//! training is fp32 on the optimizer's device the masters are the owned slice of the
//! compute buffer itself (`over_compute`): a copy would hold the same values.

use super::config::OptimizerConfig;
use super::swap::{SwapFile, SwapPart};
use crate::Result;
use crate::kernels;
use tch::{Device, Kind, Tensor};

/// fp32 master weights and the two moments of one owned slice.
pub struct AdamTensors {
    /// (P,) fp32 master copy of the owned parameters.
    pub master: Tensor,
    /// (P,) first moment.
    pub exp_avg: Tensor,
    /// (P,) second moment.
    pub exp_avg_sq: Tensor,
}

/// One owned slice's optimizer state, in memory or in its swap file.
pub enum AdamSlice {
    Resident {
        tensors: AdamTensors,
        /// The masters are a view of the compute buffer (counted with the parameters).
        master_is_compute: bool,
    },
    Swapped(SwapFile),
}

impl AdamSlice {
    /// Masters copied from `initial` (any float kind), moments zero, all on `device`.
    pub fn new(initial: &Tensor, device: Device) -> Result<Self> {
        let master = initial
            .f_to_kind(Kind::Float)?
            .f_to_device(device)?
            .f_contiguous()?
            .f_detach_copy()?;
        Self::resident(master, false)
    }

    /// Masters that are `compute_slice` itself (fp32, on the optimizer's device: the
    /// owned part of the compute buffer), moments zero. An update writes the compute
    /// buffer directly.
    pub fn over_compute(compute_slice: &Tensor) -> Result<Self> {
        Self::resident(compute_slice.shallow_clone(), true)
    }

    fn resident(master: Tensor, master_is_compute: bool) -> Result<Self> {
        let exp_avg = master.f_zeros_like()?;
        let exp_avg_sq = master.f_zeros_like()?;
        let tensors = AdamTensors {
            master,
            exp_avg,
            exp_avg_sq,
        };
        Ok(AdamSlice::Resident {
            tensors,
            master_is_compute,
        })
    }

    /// This slice moved into `swap` (its memory freed).
    pub fn swapped_to(self, swap: SwapFile) -> Result<Self> {
        let tensors = self.tensors()?;
        swap.write(SwapPart::Master, &tensors.master)?;
        swap.write(SwapPart::ExpAvg, &tensors.exp_avg)?;
        swap.write(SwapPart::ExpAvgSq, &tensors.exp_avg_sq)?;
        Ok(AdamSlice::Swapped(swap))
    }

    /// Bytes the slice keeps in memory between uses (none when swapped).
    pub fn bytes(&self) -> usize {
        match self {
            AdamSlice::Resident {
                tensors,
                master_is_compute,
            } => {
                let copies = if *master_is_compute { 2 } else { 3 };
                copies * 4 * tensors.master.numel()
            }
            AdamSlice::Swapped(_) => 0,
        }
    }

    /// Bytes the slice keeps in its swap file.
    pub fn swapped_bytes(&self) -> usize {
        match self {
            AdamSlice::Resident { .. } => 0,
            AdamSlice::Swapped(swap) => swap.bytes(),
        }
    }

    /// The three tensors: the resident ones themselves (shared storage), or fresh copies
    /// read from the swap file.
    pub fn tensors(&self) -> Result<AdamTensors> {
        match self {
            AdamSlice::Resident { tensors: t, .. } => Ok(AdamTensors {
                master: t.master.shallow_clone(),
                exp_avg: t.exp_avg.shallow_clone(),
                exp_avg_sq: t.exp_avg_sq.shallow_clone(),
            }),
            AdamSlice::Swapped(swap) => Ok(AdamTensors {
                master: swap.read(SwapPart::Master)?,
                exp_avg: swap.read(SwapPart::ExpAvg)?,
                exp_avg_sq: swap.read(SwapPart::ExpAvgSq)?,
            }),
        }
    }

    /// The (P,) masters alone (read from the swap file when swapped).
    pub fn master(&self) -> Result<Tensor> {
        match self {
            AdamSlice::Resident { tensors, .. } => Ok(tensors.master.shallow_clone()),
            AdamSlice::Swapped(swap) => swap.read(SwapPart::Master),
        }
    }

    /// Replaces the slice's values by `values`.
    pub fn set(&mut self, values: &AdamTensors) -> Result<()> {
        match self {
            AdamSlice::Resident { tensors: t, .. } => {
                t.master.f_copy_(&values.master)?;
                t.exp_avg.f_copy_(&values.exp_avg)?;
                t.exp_avg_sq.f_copy_(&values.exp_avg_sq)?;
                Ok(())
            }
            AdamSlice::Swapped(swap) => {
                swap.write(SwapPart::Master, &values.master)?;
                swap.write(SwapPart::ExpAvg, &values.exp_avg)?;
                swap.write(SwapPart::ExpAvgSq, &values.exp_avg_sq)
            }
        }
    }

    /// One update with the (already unscaled, clipped) fp32 gradient `grad` (P,);
    /// `step` is 1-based (the count including this update). Returns the updated (P,)
    /// masters (swapped slices are read in, updated and written back).
    pub fn update(
        &mut self,
        grad: &Tensor,
        lr: f64,
        step: u64,
        config: &OptimizerConfig,
    ) -> Result<Tensor> {
        let mut tensors = self.tensors()?;
        tensors.update(grad, lr, step, config)?;
        if let AdamSlice::Swapped(_) = self {
            self.set(&tensors)?;
        }
        Ok(tensors.master)
    }
}

impl AdamTensors {
    /// `AdamSlice::update` on these tensors, in place.
    fn update(
        &mut self,
        grad: &Tensor,
        lr: f64,
        step: u64,
        config: &OptimizerConfig,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        if kernels::applies(grad) && kernels::applies(&self.master) {
            let coefficients = fused_coefficients(lr, step, config);
            return kernels::adamw_in_place(
                &mut self.master,
                grad,
                &mut self.exp_avg,
                &mut self.exp_avg_sq,
                coefficients,
            );
        }
        let grad = if !config.decoupled_weight_decay && config.weight_decay != 0.0 {
            grad.f_add(&self.master.f_mul_scalar(config.weight_decay)?)?
        } else {
            grad.shallow_clone()
        };
        if config.decoupled_weight_decay && config.weight_decay != 0.0 {
            let _ = self.master.f_mul_scalar_(1.0 - lr * config.weight_decay)?;
        }
        // m = beta1*m + (1-beta1)*g ; v = beta2*v + (1-beta2)*g*g
        let _ = self.exp_avg.f_mul_scalar_(config.beta1)?;
        let _ = self
            .exp_avg
            .f_add_(&grad.f_mul_scalar(1.0 - config.beta1)?)?;
        let _ = self.exp_avg_sq.f_mul_scalar_(config.beta2)?;
        let _ = self
            .exp_avg_sq
            .f_add_(&grad.f_mul(&grad)?.f_mul_scalar(1.0 - config.beta2)?)?;
        let bias_correction1 = 1.0 - config.beta1.powi(step as i32);
        let bias_correction2 = 1.0 - config.beta2.powi(step as i32);
        let step_size = lr / bias_correction1;
        // denom = sqrt(v) / sqrt(bc2) + eps
        let denom = self
            .exp_avg_sq
            .f_sqrt()?
            .f_div_scalar(bias_correction2.sqrt())?
            .f_add_scalar(config.eps)?;
        let update = self.exp_avg.f_div(&denom)?.f_mul_scalar(step_size)?;
        let _ = self.master.f_sub_(&update)?;
        Ok(())
    }
}

/// The scalars of `AdamSlice::update` for the fused pass (`kernels::adamw_in_place`).
fn fused_coefficients(lr: f64, step: u64, config: &OptimizerConfig) -> kernels::AdamCoefficients {
    let decoupled = config.decoupled_weight_decay;
    kernels::AdamCoefficients {
        beta1: config.beta1 as f32,
        beta2: config.beta2 as f32,
        one_minus_beta1: (1.0 - config.beta1) as f32,
        one_minus_beta2: (1.0 - config.beta2) as f32,
        decay_factor: if decoupled {
            (1.0 - lr * config.weight_decay) as f32
        } else {
            1.0
        },
        l2: if decoupled {
            0.0
        } else {
            config.weight_decay as f32
        },
        step_size: (lr / (1.0 - config.beta1.powi(step as i32))) as f32,
        bias_correction2_sqrt: (1.0 - config.beta2.powi(step as i32)).sqrt() as f32,
        eps: config.eps as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A naive per-element AdamW loop in f64, written from the torch docs' pseudo-code.
    fn naive_adamw(
        p: &mut [f64],
        m: &mut [f64],
        v: &mut [f64],
        g: &[f64],
        lr: f64,
        step: u64,
        c: &OptimizerConfig,
    ) {
        for i in 0..p.len() {
            let mut gi = g[i];
            if c.decoupled_weight_decay {
                p[i] *= 1.0 - lr * c.weight_decay;
            } else {
                gi += c.weight_decay * p[i];
            }
            m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * gi;
            v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * gi * gi;
            let m_hat = m[i] / (1.0 - c.beta1.powi(step as i32));
            let v_hat_sqrt = v[i].sqrt() / (1.0 - c.beta2.powi(step as i32)).sqrt();
            p[i] -= lr * m_hat / (v_hat_sqrt + c.eps);
        }
    }

    fn check_against_naive(decoupled: bool) {
        let c = OptimizerConfig {
            lr: 0.01,
            weight_decay: 0.1,
            decoupled_weight_decay: decoupled,
            ..Default::default()
        };
        let init: Vec<f64> = (0..17).map(|i| (i as f64 * 0.37).sin()).collect();
        let mut p = init.clone();
        let (mut m, mut v) = (vec![0.0; 17], vec![0.0; 17]);
        let mut slice = AdamSlice::new(&Tensor::from_slice(&init), Device::Cpu).unwrap();
        for step in 1..=5u64 {
            let g: Vec<f64> = (0..17)
                .map(|i| ((i as f64 + step as f64) * 0.91).cos())
                .collect();
            let lr = c.lr * step as f64;
            naive_adamw(&mut p, &mut m, &mut v, &g, lr, step, &c);
            let grad = Tensor::from_slice(&g).to_kind(Kind::Float);
            let _ = slice.update(&grad, lr, step, &c).unwrap();
        }
        let got: Vec<f32> = Vec::try_from(&slice.master().unwrap()).unwrap();
        for (a, b) in got.iter().zip(&p) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    /// The fused CPU pass and the aten formula (taken for a strided gradient) agree.
    #[test]
    fn fused_update_equals_the_aten_formula() {
        for decoupled in [true, false] {
            let c = OptimizerConfig {
                lr: 0.01,
                weight_decay: 0.1,
                decoupled_weight_decay: decoupled,
                ..Default::default()
            };
            let init = Tensor::randn([101], (Kind::Float, Device::Cpu));
            let mut fused = AdamSlice::new(&init, Device::Cpu).unwrap();
            let mut aten = AdamSlice::new(&init, Device::Cpu).unwrap();
            for step in 1..=4u64 {
                let doubled = Tensor::randn([202], (Kind::Float, Device::Cpu));
                let strided = doubled.slice(0, 0, 202, 2); // not contiguous: aten path
                assert!(!kernels::applies(&strided));
                let _ = fused.update(&strided.contiguous(), c.lr, step, &c).unwrap();
                let _ = aten.update(&strided, c.lr, step, &c).unwrap();
            }
            let (fused, aten) = (fused.tensors().unwrap(), aten.tensors().unwrap());
            let diff = (&fused.master - &aten.master).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "decoupled {decoupled}: max diff {diff}");
            let diff = (&fused.exp_avg_sq - &aten.exp_avg_sq)
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff < 1e-7, "second moments differ by {diff}");
        }
    }

    #[test]
    fn adamw_matches_a_naive_loop() {
        check_against_naive(true);
    }

    #[test]
    fn adam_l2_matches_a_naive_loop() {
        check_against_naive(false);
    }

    #[test]
    fn adamw_matches_python_torch() {
        let python = std::env::var(rsdeep_contract::env::PYTHON)
            .expect("RSDEEP_PYTHON must point at the venv python (source scripts/env.sh)");
        let script = r#"
import torch, math
p = torch.tensor([math.sin(i * 0.37) for i in range(9)], dtype=torch.float32, requires_grad=True)
opt = torch.optim.AdamW([p], lr=0.02, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.3)
for step in range(1, 4):
    p.grad = torch.tensor([math.cos((i + step) * 0.91) for i in range(9)], dtype=torch.float32)
    opt.step()
print(" ".join(repr(x) for x in p.detach().tolist()))
"#;
        let out = std::process::Command::new(&python)
            .arg("-c")
            .arg(script)
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "python failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let expected: Vec<f64> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(|s| s.parse().unwrap())
            .collect();
        let c = OptimizerConfig {
            lr: 0.02,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-6,
            weight_decay: 0.3,
            decoupled_weight_decay: true,
        };
        let init: Vec<f32> = (0..9).map(|i| (i as f64 * 0.37).sin() as f32).collect();
        let mut slice = AdamSlice::new(&Tensor::from_slice(&init), Device::Cpu).unwrap();
        for step in 1..=3u64 {
            let g: Vec<f32> = (0..9)
                .map(|i| ((i + step) as f64 * 0.91).cos() as f32)
                .collect();
            let _ = slice
                .update(&Tensor::from_slice(&g), c.lr, step, &c)
                .unwrap();
        }
        let got: Vec<f32> = Vec::try_from(&slice.master().unwrap()).unwrap();
        assert_eq!(got.len(), expected.len());
        for (a, b) in got.iter().zip(&expected) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
