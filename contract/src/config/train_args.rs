//! The training arguments of train.json: the flags the seed passes to
//! `deepspeed pretrain.py` (Hugging Face `TrainingArguments` + run_clm's data/model
//! arguments + PEFT LoRA settings + rsdeep's own runtime keys), with Hugging Face's names
//! and defaults where they exist. Defaults from transformers 5.x `training_args.py`,
//! run_clm.py, PEFT `LoraConfig`, TRL `SFTConfig`.
//!
//! Accepted but meaningless for rsdeep (kept as known keys so the seed's flags load):
//! `do_train`, `do_eval`, `logging_strategy`, `run_name`.
//! `overwrite_output_dir` lets a fresh run start in a folder holding another run's
//! checkpoints (they are removed first; `output_dir.rs`).

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::lr_schedule::{HfSchedule, LrSchedulerType, resolve_hf_schedule};

/// What kind of training the worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Causal-LM pretraining on concatenated text cut into `block_size` chunks.
    #[default]
    Pretrain,
    /// Supervised fine-tuning on chat/prompt-completion records (loss on answers).
    Sft,
    /// SFT with LoRA adapters (PEFT layout); base weights frozen.
    Lora,
}

/// Hugging Face `IntervalStrategy` for logging, evaluation and saving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IntervalStrategy {
    No,
    Steps,
    Epoch,
}

/// Collective backend between ranks: `auto` = NCCL on GPUs, TCP ring on CPU ranks.
/// transformers 5's `train_sampling_strategy`: the order the Trainer reads examples in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplingStrategy {
    #[default]
    Random,
    Sequential,
    GroupByLength,
    /// Accepted by name so that it is refused with a message instead of a parse error.
    BatchRebalance,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommBackend {
    #[default]
    Auto,
    Tcp,
    Nccl,
}

/// `resume_from_checkpoint`: `true` = the newest `output_dir/checkpoint-N`; a string = a
/// checkpoint folder, `"latest"` (= `true`), or `"auto"` (rsdeep: the newest if one
/// exists, else start fresh, for requeued SLURM jobs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ResumeFrom {
    Latest(bool),
    Path(String),
}

/// Hugging Face's `report_to` names. rsdeep reports to TensorBoard (event files), swanlab,
/// wandb and mlflow (through their own clients), plus metrics.jsonl always; the other
/// integrations are accepted with a warning (see `report_to_warning`).
pub const KNOWN_REPORT_BACKENDS: [&str; 14] = [
    "all",
    "none",
    "tensorboard",
    "azure_ml",
    "clearml",
    "codecarbon",
    "comet_ml",
    "dagshub",
    "dvclive",
    "flyte",
    "mlflow",
    "swanlab",
    "trackio",
    "wandb",
];

/// Training arguments. Every key has Hugging Face's default unless noted "rsdeep".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingArgs {
    // --- model and data (run_clm ModelArguments / DataTrainingArguments) ---
    /// Pretrained model folder (config.json + safetensors); weights are loaded.
    pub model_name_or_path: Option<String>,
    /// Model config.json (or its folder) for training from scratch.
    pub config_name: Option<String>,
    /// Tokenizer folder; defaults to `model_name_or_path`.
    pub tokenizer_name: Option<String>,
    /// run_clm `--config_overrides`: `"key=value,key=value"` applied to the model config.
    pub config_overrides: Option<String>,
    /// JSONL / text files to train on (a single string is accepted).
    #[serde(deserialize_with = "string_or_list")]
    pub train_files: Vec<String>,
    #[serde(deserialize_with = "string_or_list")]
    pub eval_files: Vec<String>,
    /// rsdeep: which training the worker runs.
    pub task: Task,
    /// Pretraining chunk length in tokens; `None`: min(1024, max_position_embeddings).
    pub block_size: Option<usize>,
    /// SFT: longest example in tokens (TRL `max_length` default 1024).
    #[serde(alias = "max_length")]
    pub max_seq_length: usize,
    /// SFT: pack several examples into one sequence.
    pub packing: bool,
    /// SFT chats: train on the assistant turns only (rsdeep's and LLaMA-Factory's default;
    /// TRL's SFTTrainer trains on every token unless told `assistant_only_loss: true`).
    pub assistant_only_loss: bool,
    /// SFT prompt/completion rows: train on the completion only (TRL: `None` means yes).
    pub completion_only_loss: Option<bool>,
    /// rsdeep: JSON field holding the text in pretraining JSONL lines.
    pub text_field: String,
    /// rsdeep: skip (and count) unparsable JSONL lines instead of failing.
    pub skip_bad_lines: bool,
    pub max_train_samples: Option<u64>,
    pub max_eval_samples: Option<u64>,
    /// Percentage of the train files held out for evaluation when `eval_files` is empty.
    pub validation_split_percentage: u64,
    /// run_clm's `preprocessing_num_workers`: rsdeep tokenizes with its own thread pool,
    /// but groups blocks per contiguous shard as `datasets.map(num_proc=...)` does, so
    /// the blocks equal run_clm's.
    pub preprocessing_num_workers: Option<usize>,
    /// Documents per `group_texts` call (run_clm's `map(batched=True)` batch of 1000: each
    /// call drops its own remainder); `null` groups the whole corpus at once.
    pub group_texts_batch_size: Option<usize>,
    /// Append the tokenizer's EOS after every pretraining document. run_clm and the
    /// seed's pretrain.py do not (`tokenizer(text)` only adds what the tokenizer adds).
    pub append_eos: bool,
    pub train_sampling_strategy: SamplingStrategy,
    pub dataloader_drop_last: bool,

    // --- batch and optimisation ---
    pub per_device_train_batch_size: u64,
    pub per_device_eval_batch_size: u64,
    pub gradient_accumulation_steps: u64,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    /// HF: the loss is a token mean over the whole global batch (every rank and
    /// micro-step); `false`: each rank's token mean, averaged over ranks.
    pub average_tokens_across_devices: bool,
    pub num_train_epochs: f64,
    /// > 0 overrides `num_train_epochs`.
    pub max_steps: i64,
    pub lr_scheduler_type: LrSchedulerType,
    /// Keyword arguments of `lr_scheduler_type` (an object, or its JSON text as HF's
    /// command line passes it), checked by `lr_schedule::resolve_hf_schedule`.
    #[serde(deserialize_with = "object_or_json_text")]
    pub lr_scheduler_kwargs: serde_json::Map<String, Value>,
    /// Steps (>= 1) or a ratio of the total steps (< 1), as in transformers 5.
    pub warmup_steps: f64,
    /// Older transformers' ratio; used only when `warmup_steps` is 0.
    pub warmup_ratio: f64,
    pub seed: u64,
    pub data_seed: Option<u64>,
    pub bf16: bool,
    pub fp16: bool,
    pub gradient_checkpointing: bool,

    // --- logging, evaluation, saving ---
    pub output_dir: String,
    pub overwrite_output_dir: bool,
    pub do_train: bool,
    pub do_eval: bool,
    pub logging_dir: Option<String>,
    pub logging_strategy: IntervalStrategy,
    /// Whole steps (Hugging Face's fractional "ratio of total steps" is not accepted).
    pub logging_steps: u64,
    pub logging_first_step: bool,
    #[serde(alias = "evaluation_strategy")]
    pub eval_strategy: IntervalStrategy,
    /// `None`: same as `logging_steps` (Hugging Face).
    pub eval_steps: Option<u64>,
    /// Evaluate once before the first step (Hugging Face's `eval_on_start`).
    pub eval_on_start: bool,
    pub save_strategy: IntervalStrategy,
    pub save_steps: u64,
    pub save_total_limit: Option<u64>,
    /// Largest safetensors shard when saving a model ("50GB" in transformers 5).
    pub max_shard_size: String,
    /// rsdeep: write checkpoints on a background thread after gathering.
    pub async_save: bool,
    pub resume_from_checkpoint: Option<ResumeFrom>,
    /// `"none"`, `"all"`, `"tensorboard"`, another HF integration name, or a list.
    #[serde(deserialize_with = "string_or_list")]
    pub report_to: Vec<String>,
    pub run_name: Option<String>,
    pub disable_tqdm: bool,

    // --- LoRA (PEFT LoraConfig defaults) ---
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    #[serde(deserialize_with = "string_or_list")]
    pub lora_target_modules: Vec<String>,
    /// PEFT's DoRA: a trained magnitude per output row on top of the LoRA direction.
    pub use_dora: bool,
    /// PEFT's rank-stabilised scaling alpha / sqrt(r) instead of alpha / r.
    pub use_rslora: bool,
    /// Modules trained whole and saved in the adapter beside LoRA (PEFT's
    /// `modules_to_save`, e.g. `["lm_head", "embed_tokens"]`).
    #[serde(alias = "modules_to_save", deserialize_with = "string_or_list")]
    pub lora_modules_to_save: Vec<String>,

    /// PEFT method of `task: "lora"`: `"LORA"` (also DoRA, QLoRA), `"PREFIX_TUNING"` or
    /// `"BOTTLENECK"` (AdapterHub's bottleneck adapters).
    pub peft_type: String,
    /// Prefix tuning: trained virtual positions per layer.
    pub num_virtual_tokens: usize,
    /// Prefix tuning through an MLP (not built: refused when true).
    pub prefix_projection: bool,
    /// Bottleneck adapters: AdapterHub's `"double_seq_bn"` (Houlsby: after attention and
    /// MLP) or `"seq_bn"` (Pfeiffer: after the MLP).
    pub bottleneck_config: String,
    /// Bottleneck adapters: the width is the hidden size divided by this.
    pub bottleneck_reduction_factor: usize,

    // --- QLoRA: the frozen base in 4 bits (transformers' BitsAndBytesConfig keys) ---
    pub load_in_4bit: bool,
    /// LLaMA-Factory's spelling: 4 means `load_in_4bit`.
    pub quantization_bit: Option<u8>,
    /// `"nf4"` or `"fp4"`.
    #[serde(alias = "quantization_type")]
    pub bnb_4bit_quant_type: String,
    #[serde(alias = "double_quantization")]
    pub bnb_4bit_use_double_quant: bool,
    /// Must agree with the training precision when given (`"bfloat16"`, `"float16"`,
    /// `"float32"`): rsdeep computes in the precision it trains in.
    pub bnb_4bit_compute_dtype: Option<String>,
    /// A PEFT LoRA adapter folder to continue training from (`task: "lora"`); its
    /// adapter_config.json then sets the LoRA rank, alpha, dropout and targets.
    pub adapter_name_or_path: Option<String>,

    // --- rsdeep runtime ---
    /// Collective backend: auto | tcp | nccl.
    pub comm_backend: CommBackend,
    /// Seconds between worker heartbeats to the launcher.
    pub heartbeat_interval_secs: f64,
    /// Seconds without progress before the launcher declares a rank hung.
    pub heartbeat_timeout_secs: f64,
    /// Collective timeout in seconds (HF `ddp_timeout`).
    pub ddp_timeout: u64,
    /// DeepSpeed keys rsdeep does not know are errors instead of warnings.
    pub strict_config: bool,

    /// The DeepSpeed config file as written in train.json (relative to train.json's
    /// folder); `None` when inline or absent (see `TrainConfig::deepspeed_source`).
    pub deepspeed: Option<String>,
}

impl TrainingArgs {
    /// Whether the frozen base is held in 4 bits (`load_in_4bit`, or LLaMA-Factory's
    /// `quantization_bit: 4`).
    pub fn base_in_4bit(&self) -> bool {
        self.load_in_4bit || self.quantization_bit == Some(4)
    }
}

impl Default for TrainingArgs {
    fn default() -> Self {
        TrainingArgs {
            model_name_or_path: None,
            config_name: None,
            tokenizer_name: None,
            config_overrides: None,
            train_files: Vec::new(),
            eval_files: Vec::new(),
            task: Task::Pretrain,
            block_size: None,
            max_seq_length: 1024,
            packing: false,
            assistant_only_loss: true,
            completion_only_loss: None,
            text_field: "text".to_string(),
            skip_bad_lines: false,
            max_train_samples: None,
            max_eval_samples: None,
            validation_split_percentage: 5,
            preprocessing_num_workers: None,
            group_texts_batch_size: Some(1000),
            append_eos: false,
            train_sampling_strategy: SamplingStrategy::Random,
            dataloader_drop_last: false,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            learning_rate: 5e-5,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            average_tokens_across_devices: true,
            num_train_epochs: 3.0,
            max_steps: -1,
            lr_scheduler_type: LrSchedulerType::Linear,
            lr_scheduler_kwargs: serde_json::Map::new(),
            warmup_steps: 0.0,
            warmup_ratio: 0.0,
            seed: 42,
            data_seed: None,
            bf16: false,
            fp16: false,
            gradient_checkpointing: false,
            output_dir: "trainer_output".to_string(),
            overwrite_output_dir: false,
            do_train: false,
            do_eval: false,
            logging_dir: None,
            logging_strategy: IntervalStrategy::Steps,
            logging_steps: 500,
            logging_first_step: false,
            eval_strategy: IntervalStrategy::No,
            eval_steps: None,
            eval_on_start: false,
            save_strategy: IntervalStrategy::Steps,
            save_steps: 500,
            save_total_limit: None,
            max_shard_size: "50GB".to_string(),
            async_save: false,
            resume_from_checkpoint: None,
            report_to: vec!["none".to_string()],
            run_name: None,
            disable_tqdm: false,
            lora_r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            lora_target_modules: vec!["q_proj".to_string(), "v_proj".to_string()],
            use_dora: false,
            use_rslora: false,
            lora_modules_to_save: Vec::new(),
            peft_type: "LORA".to_string(),
            num_virtual_tokens: 20,
            prefix_projection: false,
            bottleneck_config: "double_seq_bn".to_string(),
            bottleneck_reduction_factor: 16,
            load_in_4bit: false,
            quantization_bit: None,
            bnb_4bit_quant_type: "nf4".to_string(),
            bnb_4bit_use_double_quant: false,
            bnb_4bit_compute_dtype: None,
            adapter_name_or_path: None,
            comm_backend: CommBackend::Auto,
            heartbeat_interval_secs: 5.0,
            heartbeat_timeout_secs: 600.0,
            ddp_timeout: 1800,
            strict_config: false,
            deepspeed: None,
        }
    }
}

/// Accepts `"a"` or `["a", "b"]` for list-valued keys (the seed passes single files).
fn string_or_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::String(s) => Ok(vec![s]),
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                other => Err(de::Error::custom(format!(
                    "invalid type: {other} in a list, expected a string or a list of strings"
                ))),
            })
            .collect(),
        other => Err(de::Error::custom(format!(
            "invalid type: {other}, expected a string or a list of strings"
        ))),
    }
}

/// Accepts `{"k": v}` or the text `"{\"k\": v}"` (HF's `--lr_scheduler_kwargs '{...}'`).
fn object_or_json_text<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<serde_json::Map<String, Value>, D::Error> {
    let value = match Value::deserialize(deserializer)? {
        Value::String(text) => serde_json::from_str(&text)
            .map_err(|e| de::Error::custom(format!("not a JSON object: {e}")))?,
        other => other,
    };
    match value {
        Value::Object(map) => Ok(map),
        Value::Null => Ok(serde_json::Map::new()),
        other => Err(de::Error::custom(format!(
            "invalid type: {other}, expected an object of keyword arguments"
        ))),
    }
}

impl TrainingArgs {
    /// `lr_scheduler_type` with its keyword arguments resolved (checked at load).
    pub fn hf_schedule(&self) -> Result<HfSchedule, String> {
        resolve_hf_schedule(
            self.lr_scheduler_type,
            &self.lr_scheduler_kwargs,
            self.learning_rate,
        )
    }

    /// HF `get_warmup_steps`: `warmup_steps` if >= 1, else a ratio of the total steps
    /// (falling back to the older `warmup_ratio` when `warmup_steps` is 0).
    pub fn warmup_steps_for(&self, total_steps: u64) -> u64 {
        if self.warmup_steps >= 1.0 {
            return self.warmup_steps as u64;
        }
        let ratio = if self.warmup_steps > 0.0 {
            self.warmup_steps
        } else {
            self.warmup_ratio
        };
        (total_steps as f64 * ratio).ceil() as u64
    }

    /// HF's total optimizer steps: `max_steps` when > 0, else
    /// ceil(num_train_epochs × update steps per epoch).
    pub fn total_training_steps(&self, update_steps_per_epoch: u64) -> u64 {
        if self.max_steps > 0 {
            return self.max_steps as u64;
        }
        (self.num_train_epochs * update_steps_per_epoch as f64).ceil() as u64
    }

    /// The folder the tokenizer comes from.
    pub fn tokenizer_path(&self) -> Option<&str> {
        self.tokenizer_name
            .as_deref()
            .or(self.model_name_or_path.as_deref())
    }

    /// Evaluation interval in steps (HF: `eval_steps` or else `logging_steps`).
    pub fn eval_interval(&self) -> u64 {
        self.eval_steps.unwrap_or(self.logging_steps)
    }

    /// True when TensorBoard event files should be written.
    pub fn report_to_tensorboard(&self) -> bool {
        self.report_to
            .iter()
            .any(|b| b == "tensorboard" || b == "all")
    }

    /// The warning for trackers rsdeep does not write (None when all are supported).
    pub fn report_to_warning(&self) -> Option<String> {
        let foreign: Vec<&str> = self
            .report_to
            .iter()
            .map(String::as_str)
            .filter(|b| {
                !matches!(
                    *b,
                    "none" | "all" | "tensorboard" | "swanlab" | "wandb" | "mlflow"
                )
            })
            .collect();
        (!foreign.is_empty()).then(|| {
            format!(
                "report_to {foreign:?}: rsdeep reports to tensorboard, swanlab, wandb and \
                 mlflow (and metrics.jsonl); these integrations are not reported to"
            )
        })
    }
}
