//! Semantic checks after typing: values that parse but cannot work, and DeepSpeed
//! features rsdeep refuses by name (so no key is silently ignored). Each error
//! names the key and says what to do. Warnings (accepted but without effect) are returned.

use std::path::Path;

use super::deepspeed::{DeepSpeedConfig, OffloadDevice, SchedulerKind};
use super::error::ConfigError;
use super::json_errors::did_you_mean;
use super::train_args::{
    IntervalStrategy, KNOWN_REPORT_BACKENDS, SamplingStrategy, Task, TrainingArgs,
};

fn invalid(file: &Path, key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_path_buf(),
        key: key.to_string(),
        message: message.into(),
    }
}

fn unsupported(file: &Path, key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Unsupported {
        file: file.to_path_buf(),
        key: key.to_string(),
        message: message.into(),
    }
}

/// Checks the training arguments; returns warnings for accepted-but-ignored settings.
pub fn validate_training_args(
    args: &TrainingArgs,
    file: &Path,
) -> Result<Vec<String>, ConfigError> {
    check_model_and_data(args, file)?;
    check_optimisation(args, file)?;
    args.hf_schedule()
        .map_err(|message| invalid(file, "lr_scheduler_kwargs", message))?;
    check_intervals(args, file)?;
    check_lora(args, file)?;
    check_runtime(args, file)?;
    check_report_to(args, file)
}

fn check_model_and_data(args: &TrainingArgs, file: &Path) -> Result<(), ConfigError> {
    if args.model_name_or_path.is_none() && args.config_name.is_none() {
        return Err(invalid(
            file,
            "model_name_or_path",
            "neither model_name_or_path (load pretrained weights) nor config_name (train from \
             scratch) is set: set one of them",
        ));
    }
    if args.tokenizer_path().is_none() {
        return Err(invalid(
            file,
            "tokenizer_name",
            "no tokenizer: set tokenizer_name (or model_name_or_path, whose folder holds one)",
        ));
    }
    if args.train_files.is_empty() {
        return Err(invalid(
            file,
            "train_files",
            "no training data: list at least one JSONL/text file",
        ));
    }
    if args.block_size == Some(0) || args.max_seq_length == 0 {
        return Err(invalid(
            file,
            "block_size",
            "block_size and max_seq_length must be positive",
        ));
    }
    if args.text_field.is_empty() {
        return Err(invalid(
            file,
            "text_field",
            "must name the JSON field holding the text",
        ));
    }
    if args.validation_split_percentage >= 100 {
        return Err(invalid(
            file,
            "validation_split_percentage",
            "must be below 100",
        ));
    }
    if args.train_sampling_strategy == SamplingStrategy::BatchRebalance {
        return Err(unsupported(
            file,
            "train_sampling_strategy",
            "\"batch_rebalance\" is not built in rsdeep: use \"random\" (Hugging Face's \
             default), \"sequential\" or \"group_by_length\"",
        ));
    }
    if args.group_texts_batch_size == Some(0) {
        return Err(invalid(
            file,
            "group_texts_batch_size",
            "must be at least 1 document (or null to group the whole corpus at once)",
        ));
    }
    if let Some(overrides) = &args.config_overrides
        && let Some(bad) = overrides.split(',').find(|part| !part.contains('='))
    {
        return Err(invalid(
            file,
            "config_overrides",
            format!(
                "\"{bad}\" is not key=value (expected e.g. \"num_hidden_layers=2,rope_theta=1e6\")"
            ),
        ));
    }
    Ok(())
}

fn check_optimisation(args: &TrainingArgs, file: &Path) -> Result<(), ConfigError> {
    if args.per_device_train_batch_size == 0 || args.per_device_eval_batch_size == 0 {
        return Err(invalid(
            file,
            "per_device_train_batch_size",
            "batch sizes must be at least 1",
        ));
    }
    if args.gradient_accumulation_steps == 0 {
        return Err(invalid(
            file,
            "gradient_accumulation_steps",
            "must be at least 1",
        ));
    }
    let non_negative = [
        ("learning_rate", args.learning_rate),
        ("weight_decay", args.weight_decay),
        ("max_grad_norm", args.max_grad_norm),
        ("warmup_steps", args.warmup_steps),
        ("warmup_ratio", args.warmup_ratio),
    ];
    if let Some((key, value)) = non_negative
        .iter()
        .find(|(_, v)| !(v.is_finite() && *v >= 0.0))
    {
        return Err(invalid(
            file,
            key,
            format!("{value} must be a finite number >= 0"),
        ));
    }
    for (key, beta) in [
        ("adam_beta1", args.adam_beta1),
        ("adam_beta2", args.adam_beta2),
    ] {
        if !(0.0..1.0).contains(&beta) {
            return Err(invalid(file, key, format!("{beta} must be in [0, 1)")));
        }
    }
    if !(args.adam_epsilon > 0.0 && args.adam_epsilon.is_finite()) {
        return Err(invalid(file, "adam_epsilon", "must be a positive number"));
    }
    if args.warmup_ratio >= 1.0 {
        return Err(invalid(file, "warmup_ratio", "must be in [0, 1)"));
    }
    if args.max_steps <= 0 && !(args.num_train_epochs > 0.0 && args.num_train_epochs.is_finite()) {
        return Err(invalid(
            file,
            "num_train_epochs",
            "set num_train_epochs > 0 or max_steps > 0",
        ));
    }
    if args.bf16 && args.fp16 {
        return Err(invalid(
            file,
            "bf16",
            "bf16 and fp16 cannot both be true: pick one",
        ));
    }
    Ok(())
}

fn check_intervals(args: &TrainingArgs, file: &Path) -> Result<(), ConfigError> {
    let steps_keys = [
        ("logging_steps", args.logging_strategy, args.logging_steps),
        ("save_steps", args.save_strategy, args.save_steps),
        ("eval_steps", args.eval_strategy, args.eval_interval()),
    ];
    for (key, strategy, steps) in steps_keys {
        if strategy == IntervalStrategy::Steps && steps == 0 {
            return Err(invalid(
                file,
                key,
                "must be at least 1 with the \"steps\" strategy",
            ));
        }
    }
    if args.save_total_limit == Some(0) {
        return Err(invalid(
            file,
            "save_total_limit",
            "0 would delete every checkpoint: use at least 1, or omit it",
        ));
    }
    if args.eval_strategy != IntervalStrategy::No
        && args.eval_files.is_empty()
        && args.validation_split_percentage == 0
    {
        return Err(invalid(
            file,
            "eval_strategy",
            "evaluation is on but there is no evaluation data: set eval_files or validation_split_percentage",
        ));
    }
    Ok(())
}

fn check_lora(args: &TrainingArgs, file: &Path) -> Result<(), ConfigError> {
    if args.adapter_name_or_path.is_some() && args.task != Task::Lora {
        return Err(invalid(
            file,
            "adapter_name_or_path",
            "continues training a LoRA adapter: set task to \"lora\" (or remove it)",
        ));
    }
    check_4bit_base(args, file)?;
    if args.task != Task::Lora {
        return Ok(());
    }
    match args.peft_type.as_str() {
        "LORA" => {}
        "PREFIX_TUNING" => return check_prefix_tuning(args, file),
        "BOTTLENECK" => return check_bottleneck(args, file),
        other => {
            return Err(unsupported(
                file,
                "peft_type",
                format!(
                    "{other:?} is not built: use \"LORA\" (with use_dora or load_in_4bit for DoRA and QLoRA), \"PREFIX_TUNING\" or \"BOTTLENECK\""
                ),
            ));
        }
    }
    if args.lora_r == 0 {
        return Err(invalid(file, "lora_r", "the LoRA rank must be at least 1"));
    }
    if !(0.0..1.0).contains(&args.lora_dropout) {
        return Err(invalid(file, "lora_dropout", "must be in [0, 1)"));
    }
    if args.lora_target_modules.is_empty() {
        return Err(invalid(
            file,
            "lora_target_modules",
            "name at least one module, e.g. [\"q_proj\", \"v_proj\"]",
        ));
    }
    Ok(())
}

/// Prefix tuning's keys: at least one virtual token, no projection MLP, no packing (the
/// prefix moves every token's position, which packed segments restart).
fn check_prefix_tuning(args: &TrainingArgs, file: &Path) -> Result<(), ConfigError> {
    if args.num_virtual_tokens == 0 {
        return Err(invalid(
            file,
            "num_virtual_tokens",
            "prefix tuning needs at least 1",
        ));
    }
    if args.prefix_projection {
        return Err(unsupported(
            file,
            "prefix_projection",
            "the reparametrising MLP is not built: train the prefix directly (false)",
        ));
    }
    if args.packing {
        return Err(invalid(
            file,
            "packing",
            "prefix tuning shifts every position by the prefix; packed sequences restart them: set packing to false",
        ));
    }
    Ok(())
}

/// Bottleneck adapters' keys: one of AdapterHub's two sequential architectures, a
/// reduction factor of at least 1.
fn check_bottleneck(args: &TrainingArgs, file: &Path) -> Result<(), ConfigError> {
    if !["double_seq_bn", "seq_bn", "houlsby", "pfeiffer"]
        .contains(&args.bottleneck_config.as_str())
    {
        return Err(unsupported(
            file,
            "bottleneck_config",
            format!(
                "{:?} is not built: use \"double_seq_bn\" (Houlsby) or \"seq_bn\" (Pfeiffer)",
                args.bottleneck_config
            ),
        ));
    }
    if args.bottleneck_reduction_factor == 0 {
        return Err(invalid(
            file,
            "bottleneck_reduction_factor",
            "the bottleneck width is hidden_size / this: use at least 1 (16 by default)",
        ));
    }
    Ok(())
}

/// QLoRA's keys: a 4-bit base only under adapters, a known 4-bit type, and a compute
/// dtype equal to the training precision.
fn check_4bit_base(args: &TrainingArgs, file: &Path) -> Result<(), ConfigError> {
    if let Some(bits) = args.quantization_bit.filter(|b| *b != 4) {
        return Err(unsupported(
            file,
            "quantization_bit",
            format!("{bits}-bit bases are not built: use 4 (QLoRA) or remove the key"),
        ));
    }
    if !args.base_in_4bit() {
        return Ok(());
    }
    if args.task != Task::Lora {
        return Err(invalid(
            file,
            "load_in_4bit",
            "a 4-bit base trains only adapters: set task to \"lora\"",
        ));
    }
    if !matches!(args.bnb_4bit_quant_type.as_str(), "nf4" | "fp4") {
        return Err(invalid(
            file,
            "bnb_4bit_quant_type",
            "use \"nf4\" or \"fp4\"",
        ));
    }
    let training = match (args.bf16, args.fp16) {
        (true, _) => "bfloat16",
        (_, true) => "float16",
        _ => "float32",
    };
    match args.bnb_4bit_compute_dtype.as_deref() {
        Some(dtype) if dtype.trim_start_matches("torch.") != training => Err(invalid(
            file,
            "bnb_4bit_compute_dtype",
            format!(
                "{dtype:?} differs from the training precision ({training}): rsdeep computes \
                 in the precision it trains in; set it to {training:?} or remove it"
            ),
        )),
        _ => Ok(()),
    }
}

fn check_runtime(args: &TrainingArgs, file: &Path) -> Result<(), ConfigError> {
    if !(args.heartbeat_interval_secs > 0.0 && args.heartbeat_interval_secs.is_finite()) {
        return Err(invalid(
            file,
            "heartbeat_interval_secs",
            "must be a positive number of seconds",
        ));
    }
    if args
        .heartbeat_timeout_secs
        .partial_cmp(&args.heartbeat_interval_secs)
        != Some(std::cmp::Ordering::Greater)
    {
        return Err(invalid(
            file,
            "heartbeat_timeout_secs",
            "must be longer than heartbeat_interval_secs",
        ));
    }
    if args.output_dir.is_empty() {
        return Err(invalid(file, "output_dir", "must not be empty"));
    }
    Ok(())
}

fn check_report_to(args: &TrainingArgs, file: &Path) -> Result<Vec<String>, ConfigError> {
    for backend in &args.report_to {
        if !KNOWN_REPORT_BACKENDS.contains(&backend.as_str()) {
            let hint = did_you_mean(backend, &KNOWN_REPORT_BACKENDS)
                .map(|s| format!(" (did you mean \"{s}\"?)"))
                .unwrap_or_default();
            return Err(invalid(
                file,
                "report_to",
                format!("unknown integration \"{backend}\"{hint}"),
            ));
        }
    }
    if args.report_to.len() > 1 && args.report_to.iter().any(|b| b == "none") {
        return Err(invalid(
            file,
            "report_to",
            "\"none\" cannot be combined with other integrations",
        ));
    }
    let mut warnings: Vec<String> = args.report_to_warning().into_iter().collect();
    if args.preprocessing_num_workers.is_some() {
        warnings
            .push("preprocessing_num_workers is accepted but has no effect in rsdeep".to_string());
    }
    Ok(warnings)
}

/// Checks the resolved DeepSpeed config. `prefix` is `"deepspeed."` for an inline section.
pub fn validate_deepspeed(
    ds: &DeepSpeedConfig,
    file: &Path,
    prefix: &str,
) -> Result<(), ConfigError> {
    let key = |k: &str| format!("{prefix}{k}");
    let zero = &ds.zero_optimization;
    if zero.allgather_bucket_size == 0 || !zero.allgather_bucket_size.is_multiple_of(2) {
        return Err(invalid(
            file,
            &key("zero_optimization.allgather_bucket_size"),
            "must be a positive even number",
        ));
    }
    if zero.reduce_bucket_size.value() == Some(0) {
        return Err(invalid(
            file,
            &key("zero_optimization.reduce_bucket_size"),
            "must be positive",
        ));
    }
    if !zero.allgather_partitions {
        return Err(unsupported(
            file,
            &key("zero_optimization.allgather_partitions"),
            "false (broadcast per rank) is not supported: remove it or set true",
        ));
    }
    if !zero.load_from_fp32_weights {
        return Err(unsupported(
            file,
            &key("zero_optimization.load_from_fp32_weights"),
            "rsdeep always restores the fp32 master weights: remove it or set true",
        ));
    }
    check_offload(ds, file, prefix)?;
    if zero.zero_quantized_weights
        || zero.zero_quantized_gradients
        || zero.zero_hpz_partition_size.is_some_and(|n| n > 1)
    {
        return Err(unsupported(
            file,
            &key("zero_optimization"),
            "ZeRO++ (quantized weights/gradients, hpZ) is not implemented: remove zero_quantized_* and zero_hpz_partition_size",
        ));
    }
    check_precision(ds, file, prefix)?;
    check_scheduler(ds, file, prefix)?;
    check_misc(ds, file, prefix)
}

fn check_offload(ds: &DeepSpeedConfig, file: &Path, prefix: &str) -> Result<(), ConfigError> {
    let zero = &ds.zero_optimization;
    let offloads_optimizer = zero
        .offload_optimizer
        .as_ref()
        .is_some_and(|o| o.device != OffloadDevice::None);
    let nvme_without_path = zero
        .offload_optimizer
        .as_ref()
        .is_some_and(|o| o.device == OffloadDevice::Nvme && o.nvme_path.is_none());
    if nvme_without_path {
        return Err(invalid(
            file,
            &format!("{prefix}zero_optimization.offload_optimizer.nvme_path"),
            "device \"nvme\" keeps the optimizer state in files under nvme_path: set it to a \
             folder on a fast local disk (DeepSpeed needs it too)",
        ));
    }
    if offloads_optimizer && !zero.stage.partitions_optimizer_state() {
        return Err(invalid(
            file,
            &format!("{prefix}zero_optimization.offload_optimizer.device"),
            "optimizer offload needs ZeRO stage 1, 2 or 3 (zero_optimization.stage is 0)",
        ));
    }
    Ok(())
}

/// What rsdeep does with memory settings, said once at load: the optimizer state in host
/// memory and in files under `nvme_path` (ZeRO-Infinity) is built; parameter offload and
/// Megatron's activation partitioning are not (neither changes the math).
pub fn memory_notices(ds: &DeepSpeedConfig) -> Vec<String> {
    let zero = &ds.zero_optimization;
    let device = |o: &Option<super::deepspeed::OffloadConfig>| o.as_ref().map(|o| o.device);
    let mut notices = Vec::new();
    let param = device(&zero.offload_param);
    if zero.stage.partitions_parameters()
        && matches!(param, Some(OffloadDevice::Cpu | OffloadDevice::Nvme))
    {
        notices.push(
            "offload_param: on CPU ranks the parameter partitions already live in host memory; on CUDA ranks rsdeep keeps them in GPU memory (parameter offload is not built yet)".to_string(),
        );
    }
    if let Some(ac) = &ds.activation_checkpointing
        && (ac.partition_activations || ac.cpu_checkpointing || ac.contiguous_memory_optimization)
    {
        notices.push(
            "activation_checkpointing: partition_activations, cpu_checkpointing and contiguous_memory_optimization are Megatron memory layouts rsdeep does not have; with gradient_checkpointing it recomputes whole decoder layers from their saved inputs".to_string(),
        );
    }
    notices
}

fn check_precision(ds: &DeepSpeedConfig, file: &Path, prefix: &str) -> Result<(), ConfigError> {
    if ds.fp16.enabled.value() == Some(true) && ds.bf16.enabled.value() == Some(true) {
        return Err(invalid(
            file,
            &format!("{prefix}bf16.enabled"),
            "bfloat16 and fp16 modes cannot be simultaneously enabled",
        ));
    }
    let fp16 = &ds.fp16;
    let key = |k: &str| format!("{prefix}fp16.{k}");
    if !(fp16.loss_scale >= 0.0 && fp16.loss_scale.is_finite()) {
        return Err(invalid(
            file,
            &key("loss_scale"),
            "must be 0 (dynamic) or a positive static scale",
        ));
    }
    if fp16.min_loss_scale.is_nan()
        || fp16.min_loss_scale <= 0.0
        || fp16.hysteresis == 0
        || fp16.loss_scale_window == 0
    {
        return Err(invalid(
            file,
            &key("min_loss_scale"),
            "min_loss_scale, hysteresis and loss_scale_window must be positive",
        ));
    }
    if fp16.initial_scale_power > 63 {
        return Err(invalid(
            file,
            &key("initial_scale_power"),
            "must be at most 63",
        ));
    }
    let clipping = ds.gradient_clipping.value().unwrap_or(0.0);
    if clipping.is_nan() || clipping < 0.0 {
        return Err(invalid(
            file,
            &format!("{prefix}gradient_clipping"),
            "must be >= 0 (0 disables clipping)",
        ));
    }
    if let Some(kind) = ds.communication_data_type.as_deref()
        && !matches!(kind, "fp32" | "fp16" | "bf16")
    {
        return Err(invalid(
            file,
            &format!("{prefix}communication_data_type"),
            format!("\"{kind}\" is not one of \"fp32\", \"fp16\", \"bf16\""),
        ));
    }
    Ok(())
}

fn check_scheduler(ds: &DeepSpeedConfig, file: &Path, prefix: &str) -> Result<(), ConfigError> {
    let Some(scheduler) = &ds.scheduler else {
        return Ok(());
    };
    let params = &scheduler.params;
    let key = |k: &str| format!("{prefix}scheduler.params.{k}");
    if params.warmup_num_steps.and_then(|v| v.value()) == Some(0) {
        return Err(invalid(
            file,
            &key("warmup_num_steps"),
            "must be positive (use 1 for no warmup)",
        ));
    }
    if scheduler.kind == SchedulerKind::OneCycle {
        return check_one_cycle(params, file, &key);
    }
    if scheduler.kind == SchedulerKind::LRRangeTest {
        if params.lr_range_test_step_size == Some(0) {
            return Err(invalid(
                file,
                &key("lr_range_test_step_size"),
                "must be a positive number of steps",
            ));
        }
        return Ok(());
    }
    let needs_total = matches!(
        scheduler.kind,
        SchedulerKind::WarmupDecayLR | SchedulerKind::WarmupCosineLR
    );
    if needs_total && params.total_num_steps.is_none() {
        return Err(invalid(
            file,
            &key("total_num_steps"),
            "this scheduler needs total_num_steps (a number or \"auto\")",
        ));
    }
    let is_cosine = scheduler.kind == SchedulerKind::WarmupCosineLR;
    if is_cosine && (params.warmup_min_lr.is_some() || params.warmup_max_lr.is_some()) {
        return Err(invalid(
            file,
            &key("warmup_min_lr"),
            "WarmupCosineLR takes ratios of the optimizer lr (warmup_min_ratio, cos_min_ratio), not warmup_min_lr/warmup_max_lr",
        ));
    }
    if !is_cosine && (params.warmup_min_ratio.is_some() || params.cos_min_ratio.is_some()) {
        return Err(invalid(
            file,
            &key("warmup_min_ratio"),
            "warmup_min_ratio and cos_min_ratio belong to WarmupCosineLR only",
        ));
    }
    Ok(())
}

fn check_one_cycle(
    params: &super::deepspeed::SchedulerParams,
    file: &Path,
    key: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    if params.cycle_momentum != Some(false) {
        return Err(unsupported(
            file,
            &key("cycle_momentum"),
            "OneCycle cycles Adam's beta1 unless told not to (DeepSpeed's default is true); \
             rsdeep cycles the learning rate only: set \"cycle_momentum\": false",
        ));
    }
    for (name, value) in [
        ("cycle_min_lr", params.cycle_min_lr),
        ("cycle_max_lr", params.cycle_max_lr),
    ] {
        if value.is_none() {
            return Err(invalid(
                file,
                &key(name),
                "OneCycle needs it (DeepSpeed has no default)",
            ));
        }
    }
    if params.cycle_first_step_size.is_some_and(|s| s <= 0.0)
        || params.cycle_second_step_size.is_some_and(|s| s < 0.0)
    {
        return Err(invalid(
            file,
            &key("cycle_first_step_size"),
            "the first half-cycle must be positive and the second not negative",
        ));
    }
    Ok(())
}

fn check_misc(ds: &DeepSpeedConfig, file: &Path, prefix: &str) -> Result<(), ConfigError> {
    if let Some(op) = ds.gradient_allreduce_op.as_deref()
        && op != "mean"
    {
        return Err(unsupported(
            file,
            &format!("{prefix}gradient_allreduce_op"),
            format!("\"{op}\" is not supported: rsdeep averages gradients (\"mean\")"),
        ));
    }
    if let Some(checkpoint) = &ds.checkpoint {
        let key = format!("{prefix}checkpoint");
        if checkpoint.use_node_local_storage {
            return Err(unsupported(
                file,
                &key,
                "use_node_local_storage is not implemented: checkpoints go to the shared output_dir",
            ));
        }
        if let Some(tag) = checkpoint.tag_validation.as_deref()
            && !matches!(tag.to_lowercase().as_str(), "warn" | "ignore" | "fail")
        {
            return Err(invalid(
                file,
                &key,
                format!("tag_validation \"{tag}\" is not one of Warn, Ignore, Fail"),
            ));
        }
    }
    Ok(())
}
