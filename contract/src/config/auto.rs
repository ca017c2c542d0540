//! Hugging Face's `"auto"` filling (`HfTrainerDeepSpeedConfig` in transformers'
//! integrations/deepspeed.py), reproduced on the raw DeepSpeed JSON exactly as Hugging
//! Face does it on its dict: `fill_match` replaces `"auto"` with the training-argument
//! value, records an explicit value that differs as a mismatch, and leaves a missing key
//! (or a missing section) alone; `fill_only` never records a mismatch.
//!
//! The model-dependent keys (hidden-size buckets, total/warmup steps) are filled later on
//! the typed config by `TrainConfig::fill_model_autos`.

use serde_json::{Map, Value};

use super::train_args::TrainingArgs;

/// Accumulates fills and mismatches on one raw DeepSpeed config.
pub struct AutoFiller<'a> {
    config: &'a mut Value,
    /// `- ds {k}={v} vs hf {hk}={v}` lines, in the order Hugging Face checks them.
    pub mismatches: Vec<String>,
}

impl<'a> AutoFiller<'a> {
    pub fn new(config: &'a mut Value) -> Self {
        AutoFiller {
            config,
            mismatches: Vec::new(),
        }
    }

    /// The object holding the last segment of `ds_key_long`, if every parent exists.
    fn find_config_node(&mut self, ds_key_long: &str) -> Option<(&mut Map<String, Value>, String)> {
        let mut parts: Vec<&str> = ds_key_long.split('.').collect();
        let leaf = parts.pop()?.to_string();
        let mut node = self.config.as_object_mut()?;
        for part in parts {
            node = node.get_mut(part)?.as_object_mut()?;
        }
        Some((node, leaf))
    }

    /// HF `fill_match(ds_key_long, hf_val, hf_key, must_match)`.
    pub fn fill_match(&mut self, ds_key_long: &str, hf_val: Value, hf_key: &str, must_match: bool) {
        let Some((node, leaf)) = self.find_config_node(ds_key_long) else {
            return;
        };
        match node.get(&leaf) {
            Some(Value::String(s)) if s == "auto" => {
                node.insert(leaf, hf_val);
            }
            Some(ds_val) if must_match && !values_equal(ds_val, &hf_val) => {
                let line = format!("- ds {ds_key_long}={ds_val} vs hf {hf_key}={hf_val}");
                self.mismatches.push(line);
            }
            _ => {}
        }
    }

    /// HF `fill_only`: fill `"auto"`, never complain.
    pub fn fill_only(&mut self, ds_key_long: &str, hf_val: Value) {
        self.fill_match(ds_key_long, hf_val, "", false);
    }

    /// HF `trainer_config_process`: everything known from the training arguments alone.
    pub fn fill_from_training_args(&mut self, args: &TrainingArgs, world_size: usize) {
        let per_device = args.per_device_train_batch_size;
        let accumulation = args.gradient_accumulation_steps;
        let train_batch_size = world_size as u64 * per_device * accumulation;
        self.fill_match(
            "train_micro_batch_size_per_gpu",
            Value::from(per_device),
            "per_device_train_batch_size",
            true,
        );
        self.fill_match(
            "gradient_accumulation_steps",
            Value::from(accumulation),
            "gradient_accumulation_steps",
            true,
        );
        self.fill_match(
            "train_batch_size",
            Value::from(train_batch_size),
            "train_batch_size (calculated)",
            true,
        );
        self.fill_match(
            "gradient_clipping",
            Value::from(args.max_grad_norm),
            "max_grad_norm",
            true,
        );
        self.fill_match(
            "optimizer.params.lr",
            Value::from(args.learning_rate),
            "learning_rate",
            true,
        );
        self.fill_match(
            "optimizer.params.betas",
            Value::from(vec![args.adam_beta1, args.adam_beta2]),
            "adam_beta1+adam_beta2",
            true,
        );
        self.fill_match(
            "optimizer.params.eps",
            Value::from(args.adam_epsilon),
            "adam_epsilon",
            true,
        );
        self.fill_match(
            "optimizer.params.weight_decay",
            Value::from(args.weight_decay),
            "weight_decay",
            true,
        );
        self.fill_only("scheduler.params.warmup_min_lr", Value::from(0));
        self.fill_match(
            "scheduler.params.warmup_max_lr",
            Value::from(args.learning_rate),
            "learning_rate",
            true,
        );
        self.fill_match(
            "fp16.enabled",
            Value::from(args.fp16),
            "fp16|fp16_full_eval",
            true,
        );
        self.fill_match(
            "bf16.enabled",
            Value::from(args.bf16),
            "bf16|bf16_full_eval",
            true,
        );
    }
}

/// Python's `ds_val != hf_val` on JSON values: numbers compare by value (`2e8 == 200000000`).
fn values_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(xs), Value::Array(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| values_equal(x, y))
        }
        _ => a == b,
    }
}

/// The DeepSpeed config used when train.json has no `deepspeed` key: ZeRO stage 0 (DDP)
/// with every training-argument-derived key on `"auto"`.
pub fn default_deepspeed_value() -> Value {
    serde_json::json!({
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "fp16": {"enabled": "auto"},
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 0}
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn seed_like_args() -> TrainingArgs {
        TrainingArgs {
            per_device_train_batch_size: 16,
            gradient_accumulation_steps: 4,
            learning_rate: 1e-4,
            weight_decay: 0.01,
            adam_beta1: 0.9,
            adam_beta2: 0.95,
            adam_epsilon: 1e-6,
            max_grad_norm: 0.5,
            bf16: true,
            ..TrainingArgs::default()
        }
    }

    fn all_auto() -> Value {
        json!({
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
            "gradient_clipping": "auto",
            "optimizer": {"type": "AdamW", "params": {
                "lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
            "scheduler": {"type": "WarmupLR", "params": {
                "warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
            "fp16": {"enabled": "auto"},
            "bf16": {"enabled": "auto"}
        })
    }

    #[test]
    fn every_training_arg_mapping_fills_auto() {
        let mut config = all_auto();
        let mut filler = AutoFiller::new(&mut config);
        filler.fill_from_training_args(&seed_like_args(), 2);
        assert!(filler.mismatches.is_empty(), "{:?}", filler.mismatches);
        assert_eq!(config["train_micro_batch_size_per_gpu"], json!(16));
        assert_eq!(config["gradient_accumulation_steps"], json!(4));
        assert_eq!(config["train_batch_size"], json!(128));
        assert_eq!(config["gradient_clipping"], json!(0.5));
        assert_eq!(config["optimizer"]["params"]["lr"], json!(1e-4));
        assert_eq!(config["optimizer"]["params"]["betas"], json!([0.9, 0.95]));
        assert_eq!(config["optimizer"]["params"]["eps"], json!(1e-6));
        assert_eq!(config["optimizer"]["params"]["weight_decay"], json!(0.01));
        assert_eq!(config["scheduler"]["params"]["warmup_min_lr"], json!(0));
        assert_eq!(config["scheduler"]["params"]["warmup_max_lr"], json!(1e-4));
        assert_eq!(
            config["scheduler"]["params"]["warmup_num_steps"],
            json!("auto")
        );
        assert_eq!(config["fp16"]["enabled"], json!(false));
        assert_eq!(config["bf16"]["enabled"], json!(true));
    }

    #[test]
    fn missing_keys_and_sections_are_left_alone() {
        let mut config = json!({"gradient_clipping": 1.0});
        let mut filler = AutoFiller::new(&mut config);
        filler.fill_from_training_args(&seed_like_args(), 2);
        assert_eq!(config, json!({"gradient_clipping": 1.0}));
    }

    #[test]
    fn every_explicit_difference_is_listed() {
        let mut config = json!({
            "train_micro_batch_size_per_gpu": 8,
            "gradient_accumulation_steps": 4,
            "train_batch_size": 2e8,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95]}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 5.0}},
            "bf16": {"enabled": false}
        });
        let mut filler = AutoFiller::new(&mut config);
        filler.fill_from_training_args(&seed_like_args(), 2);
        assert_eq!(
            filler.mismatches,
            vec![
                "- ds train_micro_batch_size_per_gpu=8 vs hf per_device_train_batch_size=16",
                "- ds train_batch_size=200000000.0 vs hf train_batch_size (calculated)=128",
                "- ds optimizer.params.lr=0.0003 vs hf learning_rate=0.0001",
                "- ds bf16.enabled=false vs hf bf16|bf16_full_eval=true",
            ]
        );
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(values_equal(&json!(128.0), &json!(128)));
        assert!(!values_equal(&json!([0.9, 0.999]), &json!([0.9, 0.99])));
    }
}
