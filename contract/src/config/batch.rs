//! DeepSpeed's batch rule (`_set_batch_related_parameters` + `_batch_assertion` in
//! deepspeed/runtime/config.py): any two of train_batch_size, train_micro_batch_size_per_gpu
//! and gradient_accumulation_steps determine the third for the data-parallel world size.
//! Messages are DeepSpeed's, followed by a hint.

use serde::{Deserialize, Serialize};

use super::error::ConfigError;

/// The resolved batch geometry: `train_batch_size = micro × accumulation × world_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchSizes {
    pub train_batch_size: u64,
    pub train_micro_batch_size_per_gpu: u64,
    pub gradient_accumulation_steps: u64,
    /// Data-parallel world size the rule was applied for.
    pub world_size: u64,
}

const HINT: &str = "hint: set train_batch_size, train_micro_batch_size_per_gpu and \
                    gradient_accumulation_steps to \"auto\" to derive them from \
                    per_device_train_batch_size and gradient_accumulation_steps";

/// Applies DeepSpeed's rule to the given values (None = key absent).
pub fn resolve_batch(
    train_batch: Option<u64>,
    micro_batch: Option<u64>,
    grad_acc: Option<u64>,
    world_size: u64,
) -> Result<BatchSizes, ConfigError> {
    let ws = world_size.max(1);
    let (tbs, mbs, gas) = match (train_batch, micro_batch, grad_acc) {
        (Some(t), Some(m), Some(g)) => (t, m, g),
        (Some(t), Some(m), None) => (t, m, checked_div(t, m) / ws),
        (Some(t), None, Some(g)) => (t, checked_div(t / ws, g), g),
        (None, Some(m), Some(g)) => (m.saturating_mul(g).saturating_mul(ws), m, g),
        (Some(t), None, None) => (t, t / ws, 1),
        (None, Some(m), None) => (m.saturating_mul(ws), m, 1),
        (None, None, _) => {
            return Err(ConfigError::Batch(format!(
                "Either train_batch_size or train_micro_batch_size_per_gpu needs to be provided\n{HINT}"
            )));
        }
    };
    assert_batch(tbs, mbs, gas, ws)?;
    Ok(BatchSizes {
        train_batch_size: tbs,
        train_micro_batch_size_per_gpu: mbs,
        gradient_accumulation_steps: gas,
        world_size: ws,
    })
}

/// Python's `a // b` where `b == 0` would raise; we let the assertion below report it.
fn checked_div(a: u64, b: u64) -> u64 {
    a.checked_div(b).unwrap_or(0)
}

/// DeepSpeed's `_batch_assertion`, messages verbatim.
fn assert_batch(tbs: u64, mbs: u64, gas: u64, ws: u64) -> Result<(), ConfigError> {
    let fail = |message: String| Err(ConfigError::Batch(format!("{message}\n{HINT}")));
    if tbs == 0 {
        return fail(format!("Train batch size: {tbs} has to be greater than 0"));
    }
    if mbs == 0 {
        return fail(format!(
            "Micro batch size per gpu: {mbs} has to be greater than 0"
        ));
    }
    if gas == 0 {
        return fail(format!(
            "Gradient accumulation steps: {gas} has to be greater than 0"
        ));
    }
    if Some(tbs) != mbs.checked_mul(gas).and_then(|p| p.checked_mul(ws)) {
        return fail(format!(
            "Check batch related parameters. train_batch_size is not equal to \
             micro_batch_per_gpu * gradient_acc_step * world_size {tbs} != {mbs} * {gas} * {ws}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(t: u64, m: u64, g: u64, w: u64) -> BatchSizes {
        BatchSizes {
            train_batch_size: t,
            train_micro_batch_size_per_gpu: m,
            gradient_accumulation_steps: g,
            world_size: w,
        }
    }

    #[test]
    fn all_three_are_used_as_given() {
        assert_eq!(
            resolve_batch(Some(64), Some(8), Some(4), 2).unwrap(),
            sizes(64, 8, 4, 2)
        );
    }

    #[test]
    fn train_and_micro_give_accumulation() {
        assert_eq!(
            resolve_batch(Some(64), Some(8), None, 2).unwrap(),
            sizes(64, 8, 4, 2)
        );
    }

    #[test]
    fn train_and_accumulation_give_micro() {
        assert_eq!(
            resolve_batch(Some(64), None, Some(4), 2).unwrap(),
            sizes(64, 8, 4, 2)
        );
    }

    #[test]
    fn micro_and_accumulation_give_train() {
        assert_eq!(
            resolve_batch(None, Some(8), Some(4), 2).unwrap(),
            sizes(64, 8, 4, 2)
        );
    }

    #[test]
    fn only_train_means_no_accumulation() {
        assert_eq!(
            resolve_batch(Some(64), None, None, 4).unwrap(),
            sizes(64, 16, 1, 4)
        );
    }

    #[test]
    fn only_micro_means_no_accumulation() {
        assert_eq!(
            resolve_batch(None, Some(8), None, 4).unwrap(),
            sizes(32, 8, 1, 4)
        );
    }

    #[test]
    fn neither_train_nor_micro_fails() {
        let err = resolve_batch(None, None, Some(4), 2)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(
            "Either train_batch_size or train_micro_batch_size_per_gpu needs to be provided"
        ));
    }

    #[test]
    fn inconsistent_values_report_the_numbers() {
        let err = resolve_batch(Some(64), Some(8), Some(3), 2)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 64 != 8 * 3 * 2"),
            "{err}"
        );
    }

    #[test]
    fn indivisible_train_batch_surfaces_at_the_assertion() {
        // 30 // 8 // 2 = 1 -> 30 != 8 * 1 * 2, as in DeepSpeed.
        let err = resolve_batch(Some(30), Some(8), None, 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("30 != 8 * 1 * 2"), "{err}");
    }

    #[test]
    fn zero_values_are_refused_with_their_message() {
        let err = resolve_batch(Some(1), Some(8), None, 2)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("Gradient accumulation steps: 0 has to be greater than 0"),
            "{err}"
        );
        let err = resolve_batch(None, Some(0), Some(1), 2)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("Train batch size: 0 has to be greater than 0"),
            "{err}"
        );
    }
}
