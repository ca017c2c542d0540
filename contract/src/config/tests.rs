//! Tests of `load` end to end on files: the seed's DeepSpeed config, errors as a user sees
//! them, overrides, model autos, the shipped configs/ files, and a never-panics property.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::*;

/// A temporary folder with train.json (and optional extra files).
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn train_json(&self, value: &Value) -> PathBuf {
        self.write("train.json", &serde_json::to_string_pretty(value).unwrap())
    }
}

fn repo_configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

/// The seed's `deepspeed pretrain.py` arguments as train.json.
fn seed_args(deepspeed: Value) -> Value {
    json!({
        "config_name": "autodl-tmp/qwen-1.5b",
        "tokenizer_name": "autodl-tmp/qwen-1.5b",
        "train_files": "autodl-tmp/dataset/pretrain_data/mobvoi_seq_monkey_general_open_corpus_small.jsonl",
        "per_device_train_batch_size": 16,
        "gradient_accumulation_steps": 4,
        "do_train": true,
        "output_dir": "autodl-tmp/output/pretrain",
        "evaluation_strategy": "no",
        "learning_rate": 1e-4,
        "num_train_epochs": 1,
        "warmup_steps": 200,
        "logging_dir": "autodl-tmp/output/pretrain/logs",
        "logging_strategy": "steps",
        "logging_steps": 5,
        "save_strategy": "steps",
        "save_steps": 100,
        "preprocessing_num_workers": 10,
        "save_total_limit": 1,
        "seed": 12,
        "block_size": 2048,
        "bf16": true,
        "gradient_checkpointing": true,
        "deepspeed": deepspeed,
        "report_to": "swanlab"
    })
}

fn seed_fixture() -> (Fixture, PathBuf) {
    let fixture = Fixture::new();
    let seed_ds = std::fs::read_to_string(repo_configs().join("ds_config_zero2.json")).unwrap();
    fixture.write("ds_config_zero2.json", &seed_ds);
    let path = fixture.train_json(&seed_args(json!("./ds_config_zero2.json")));
    (fixture, path)
}

fn load_err(path: &Path, overrides: &[&str], world: usize) -> String {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    load(path, &overrides, world).unwrap_err().to_string()
}

#[test]
fn seed_zero2_config_loads_unchanged_with_the_seed_arguments() {
    let (_fixture, path) = seed_fixture();
    let config = load(&path, &[], 2).unwrap();
    let ds = &config.deepspeed;
    assert_eq!(
        config.batch,
        BatchSizes {
            train_batch_size: 128,
            train_micro_batch_size_per_gpu: 16,
            gradient_accumulation_steps: 4,
            world_size: 2,
        }
    );
    assert_eq!(ds.train_batch_size, Some(AutoOr::Value(128)));
    assert_eq!(ds.gradient_clipping, AutoOr::Value(1.0));
    assert_eq!(config.precision(), Precision::Bf16);
    assert_eq!(ds.fp16.enabled, AutoOr::Value(false));
    let optimizer = config.optimizer();
    assert_eq!(optimizer.kind, OptimizerKind::AdamW);
    assert_eq!(
        (
            optimizer.lr,
            optimizer.betas,
            optimizer.eps,
            optimizer.weight_decay
        ),
        (1e-4, [0.9, 0.999], 1e-8, 0.0)
    );
    let scheduler = ds.scheduler.as_ref().unwrap();
    assert_eq!(scheduler.kind, SchedulerKind::WarmupLR);
    assert_eq!(scheduler.params.warmup_min_lr, Some(AutoOr::Value(0.0)));
    assert_eq!(scheduler.params.warmup_max_lr, Some(AutoOr::Value(1e-4)));
    let zero = &ds.zero_optimization;
    assert_eq!(
        (zero.stage, zero.allgather_bucket_size),
        (ZeroStage::Two, 200_000_000)
    );
    assert_eq!(zero.reduce_bucket_size, AutoOr::Value(200_000_000));
    assert_eq!(zero.overlap_comm, Some(true));
    assert_eq!(
        zero.offload_optimizer.as_ref().unwrap().device,
        OffloadDevice::None
    );
    assert_eq!(ds.steps_per_print, Some(100));
    assert_eq!(
        config.unresolved_autos(),
        vec!["scheduler.params.warmup_num_steps"]
    );
    assert!(config.activation_checkpointing());
    assert_eq!(config.args.eval_strategy, IntervalStrategy::No);
    // swanlab is reported to through its own client: no warning.
    assert!(
        !config.warnings.iter().any(|w| w.contains("swanlab")),
        "{:?}",
        config.warnings
    );
    assert!(
        matches!(&config.deepspeed_source, DeepSpeedSource::File(p) if p.ends_with("ds_config_zero2.json"))
    );
}

#[test]
fn seed_config_fills_warmup_once_the_model_is_known() {
    let (_fixture, path) = seed_fixture();
    let mut config = load(&path, &[], 2).unwrap();
    config.fill_model_autos(896, 1000).unwrap();
    let params = &config.deepspeed.scheduler.as_ref().unwrap().params;
    assert_eq!(params.warmup_num_steps, Some(AutoOr::Value(200)));
    assert!(config.unresolved_autos().is_empty());
    // Explicit 2e8 stays: fill_only never overrides a set value.
    assert_eq!(
        config.deepspeed.zero_optimization.reduce_bucket_size,
        AutoOr::Value(200_000_000)
    );
}

#[test]
fn world_size_changes_the_calculated_train_batch_size() {
    let (_fixture, path) = seed_fixture();
    assert_eq!(load(&path, &[], 8).unwrap().batch.train_batch_size, 512);
}

#[test]
fn zero3_model_autos_follow_hugging_face() {
    let fixture = Fixture::new();
    let ds = std::fs::read_to_string(repo_configs().join("ds_config_zero3.json")).unwrap();
    fixture.write("ds3.json", &ds);
    let path = fixture.train_json(&seed_args(json!("ds3.json")));
    let mut config = load(&path, &[], 2).unwrap();
    assert_eq!(config.unresolved_autos().len(), 4);
    config.fill_model_autos(896, 50).unwrap();
    let zero = &config.deepspeed.zero_optimization;
    assert_eq!(zero.reduce_bucket_size, AutoOr::Value(896 * 896));
    assert_eq!(zero.stage3_prefetch_bucket_size, AutoOr::Value(722_534)); // int(0.9 * 802816)
    assert_eq!(zero.stage3_param_persistence_threshold, AutoOr::Value(8960));
    assert!(zero.gather_16bit_weights_on_model_save());
    assert_eq!(zero.stage3_max_live_parameters, 1_000_000_000);
}

#[test]
fn ratio_warmup_and_explicit_step_mismatches() {
    let fixture = Fixture::new();
    let mut args = seed_args(json!({
        "train_micro_batch_size_per_gpu": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 999, "warmup_num_steps": "auto"}}
    }));
    args["warmup_steps"] = json!(0.1);
    let path = fixture.train_json(&args);
    let mut config = load(&path, &[], 1).unwrap();
    let err = config.fill_model_autos(64, 1000).unwrap_err().to_string();
    assert!(
        err.contains(
            "- ds scheduler.params.total_num_steps=999 vs hf num_training_steps (calculated)=1000"
        ),
        "{err}"
    );
    let params = &config.deepspeed.scheduler.as_ref().unwrap().params;
    assert_eq!(params.warmup_num_steps, Some(AutoOr::Value(100)));
}

#[test]
fn no_deepspeed_key_means_zero0_from_the_arguments() {
    let fixture = Fixture::new();
    let mut args = seed_args(Value::Null);
    args.as_object_mut().unwrap().remove("deepspeed");
    let path = fixture.train_json(&args);
    let config = load(&path, &[], 3).unwrap();
    assert_eq!(config.deepspeed_source, DeepSpeedSource::Default);
    assert_eq!(config.zero_stage(), ZeroStage::Zero);
    assert_eq!(config.batch.train_batch_size, 16 * 4 * 3);
    assert_eq!(config.precision(), Precision::Bf16);
    assert_eq!(config.optimizer().kind, OptimizerKind::AdamW);
    assert_eq!(config.deepspeed.zero_optimization.overlap_comm, Some(false));
}

#[test]
fn defaults_are_deepspeeds() {
    let ds = DeepSpeedConfig::default();
    let zero = &ds.zero_optimization;
    assert_eq!(
        (
            zero.stage,
            zero.reduce_bucket_size,
            zero.allgather_bucket_size
        ),
        (ZeroStage::Zero, AutoOr::Value(500_000_000), 500_000_000)
    );
    assert_eq!(
        (
            zero.stage3_prefetch_bucket_size,
            zero.stage3_param_persistence_threshold
        ),
        (AutoOr::Value(50_000_000), AutoOr::Value(100_000))
    );
    assert!(zero.contiguous_gradients && zero.reduce_scatter && zero.overlap_comm.is_none());
    assert_eq!(ds.gradient_clipping, AutoOr::Value(1.0));
    assert_eq!(
        (
            ds.fp16.initial_scale_power,
            ds.fp16.loss_scale_window,
            ds.fp16.hysteresis
        ),
        (16, 1000, 2)
    );
    assert_eq!(ds.fp16, Fp16Config::default());
    assert_eq!(ds.bf16, Bf16Config::default());
    let stage3 = ZeroConfig {
        stage: ZeroStage::Three,
        ..Default::default()
    };
    assert!(stage3.overlap_comm_resolved() && !zero.overlap_comm_resolved());
}

#[test]
fn top_level_typo_suggests_deepspeed() {
    let fixture = Fixture::new();
    let mut args = seed_args(Value::Null);
    let object = args.as_object_mut().unwrap();
    object.remove("deepspeed");
    object.insert("deepsped".into(), json!("ds.json"));
    let path = fixture.train_json(&args);
    let err = load_err(&path, &[], 1);
    assert_eq!(
        err,
        format!(
            "{}: unknown key \"deepsped\" (did you mean \"deepspeed\"?)",
            path.display()
        )
    );
}

#[test]
fn nested_typo_inline_is_a_warning_naming_the_full_path_and_an_error_when_strict() {
    let fixture = Fixture::new();
    let path = fixture.train_json(&seed_args(json!({
        "train_micro_batch_size_per_gpu": "auto",
        "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_sise": 5e7}
    })));
    let config = load(&path, &[], 1).unwrap();
    let expected = format!(
        "{}: unknown DeepSpeed key \"deepspeed.zero_optimization.stage3_prefetch_bucket_sise\" (did you mean \"stage3_prefetch_bucket_size\"?) is ignored",
        path.display()
    );
    assert!(
        config.warnings.iter().any(|w| w.starts_with(&expected)),
        "{:?}",
        config.warnings
    );
    let err = load_err(&path, &["--strict_config", "true"], 1);
    assert_eq!(
        err,
        format!(
            "{}: unknown key \"deepspeed.zero_optimization.stage3_prefetch_bucket_sise\" (did you mean \"stage3_prefetch_bucket_size\"?)",
            path.display()
        )
    );
}

#[test]
fn nested_typo_in_a_deepspeed_file_names_that_file() {
    let fixture = Fixture::new();
    let ds = fixture.write(
        "ds.json",
        r#"{"train_batch_size": 8, "fp16": {"enabeld": true}}"#,
    );
    let path = fixture.train_json(&seed_args(json!("ds.json")));
    let err = load_err(&path, &["--strict_config", "true"], 1);
    assert_eq!(
        err,
        format!(
            "{}: unknown key \"fp16.enabeld\" (did you mean \"enabled\"?)",
            ds.display()
        )
    );
}

#[test]
fn wrong_types_name_key_expected_type_and_value() {
    let fixture = Fixture::new();
    let mut args = seed_args(
        json!({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": "two"}}),
    );
    let path = fixture.train_json(&args);
    let err = load_err(&path, &[], 1);
    assert!(err.ends_with("key \"deepspeed.zero_optimization.stage\": invalid type: string \"two\", expected a non-negative integer"), "{err}");
    args["learning_rate"] = json!("fast");
    let path = fixture.train_json(&args);
    let err = load_err(&path, &[], 1);
    assert!(
        err.ends_with("key \"learning_rate\": invalid type: string \"fast\", expected a number"),
        "{err}"
    );
    let ds = fixture.write("ds.json", r#"{"gradient_clipping": [1]}"#);
    let path = fixture.train_json(&seed_args(json!("ds.json")));
    let err = load_err(&path, &[], 1);
    assert!(
        err.starts_with(&format!(
            "{}: key \"gradient_clipping\": invalid type: sequence",
            ds.display()
        )),
        "{err}"
    );
    assert!(err.contains("(or \"auto\")"), "{err}");
}

#[test]
fn flops_profiler_block_loads_with_deepspeeds_defaults_and_names_wrong_keys() {
    let fixture = Fixture::new();
    let path = fixture.train_json(&seed_args(autos()));
    let absent = load(&path, &[], 1).unwrap().deepspeed.flops_profiler;
    assert_eq!(absent, FlopsProfilerConfig::default());
    assert!(!absent.enabled && absent.detailed && absent.output_file.is_none());
    assert_eq!(
        (absent.profile_step, absent.module_depth, absent.top_modules),
        (1, -1, 1)
    );
    assert_eq!(absent.recompute_fwd_factor, 0.0);
    // The block as DeepSpeed's documentation publishes it.
    let published = r#"{"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "flops_profiler": {"enabled": true, "recompute_fwd_factor": 1.0, "profile_step": 50,
                           "module_depth": -1, "top_modules": 3, "detailed": true,
                           "output_file": "profile.log"}}"#;
    fixture.write("ds.json", published);
    let path = fixture.train_json(&seed_args(json!("ds.json")));
    let loaded = load(&path, &[], 1).unwrap().deepspeed;
    let profiler = &loaded.flops_profiler;
    assert!(profiler.enabled && profiler.detailed);
    assert_eq!(profiler.recompute_fwd_factor, 1.0);
    assert_eq!(
        (
            profiler.profile_step,
            profiler.module_depth,
            profiler.top_modules
        ),
        (50, -1, 3)
    );
    assert_eq!(profiler.output_file.as_deref(), Some("profile.log"));
    assert!(
        loaded.wall_clock_breakdown,
        "as in DeepSpeed, the profiler turns the wall-clock breakdown on"
    );
    let ds = fixture.write(
        "ds.json",
        r#"{"flops_profiler": {"enabled": true, "profile_step": "late"}}"#,
    );
    let err = load_err(&path, &[], 1);
    assert!(
        err.starts_with(&format!(
            "{}: key \"flops_profiler.profile_step\": invalid type: string \"late\"",
            ds.display()
        )),
        "{err}"
    );
    let with_block = |block: Value| {
        let mut ds = autos();
        ds["flops_profiler"] = block;
        fixture.train_json(&seed_args(ds))
    };
    let inline = with_block(json!({"detailed": "yes"}));
    let err = load_err(&inline, &[], 1);
    assert!(
        err.contains("key \"deepspeed.flops_profiler.detailed\": invalid type: string \"yes\""),
        "{err}"
    );
    let typo = with_block(json!({"module_dept": 2}));
    let err = load_err(&typo, &["--strict_config", "true"], 1);
    assert!(
        err.contains(
            "unknown key \"deepspeed.flops_profiler.module_dept\" (did you mean \"module_depth\"?)"
        ),
        "{err}"
    );
}

#[test]
fn comms_logger_block_loads_with_deepspeeds_defaults_and_names_wrong_keys() {
    let fixture = Fixture::new();
    let path = fixture.train_json(&seed_args(autos()));
    let absent = load(&path, &[], 1).unwrap().deepspeed.comms_logger;
    assert_eq!(absent, CommsLoggerConfig::default());
    assert!(!absent.enabled && absent.prof_all && absent.prof_ops.is_empty());
    // The block as DeepSpeed's documentation publishes it.
    let published = r#"{"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "comms_logger": {"enabled": true, "verbose": false, "prof_all": false,
                         "prof_ops": ["all_reduce", "all_gather"], "debug": false}}"#;
    fixture.write("ds.json", published);
    let path = fixture.train_json(&seed_args(json!("ds.json")));
    let logger = load(&path, &[], 1).unwrap().deepspeed.comms_logger;
    assert!(logger.enabled && !logger.verbose && !logger.prof_all && !logger.debug);
    assert_eq!(logger.prof_ops, ["all_reduce", "all_gather"]);
    let ds = fixture.write(
        "ds.json",
        r#"{"comms_logger": {"enabled": true, "prof_ops": "all_reduce"}}"#,
    );
    let err = load_err(&path, &[], 1);
    assert!(
        err.starts_with(&format!(
            "{}: key \"comms_logger.prof_ops\": invalid type: string \"all_reduce\"",
            ds.display()
        )),
        "{err}"
    );
    let with_block = |block: Value| {
        let mut ds = autos();
        ds["comms_logger"] = block;
        fixture.train_json(&seed_args(ds))
    };
    let inline = with_block(json!({"verbose": "yes"}));
    let err = load_err(&inline, &[], 1);
    assert!(
        err.contains("key \"deepspeed.comms_logger.verbose\": invalid type: string \"yes\""),
        "{err}"
    );
    let typo = with_block(json!({"prof_al": false}));
    let err = load_err(&typo, &["--strict_config", "true"], 1);
    assert!(
        err.contains("unknown key \"deepspeed.comms_logger.prof_al\" (did you mean \"prof_all\"?)"),
        "{err}"
    );
}

#[test]
fn syntax_errors_point_at_file_line_column() {
    let fixture = Fixture::new();
    let path = fixture.write("train.json", "{\n  \"seed\": 1,\n  \"bf16\": tru\n}\n");
    let err = load_err(&path, &[], 1);
    assert!(
        err.starts_with(&format!("{}:3:13: ", path.display())),
        "{err}"
    );
    let ds = fixture.write("ds.json", "{\"a\": 1,,}");
    let path = fixture.train_json(&seed_args(json!("ds.json")));
    assert!(load_err(&path, &[], 1).starts_with(&format!("{}:1:9: ", ds.display())));
}

#[test]
fn auto_mismatches_are_all_listed_in_hugging_face_wording() {
    let fixture = Fixture::new();
    let path = fixture.train_json(&seed_args(json!({
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 4,
        "gradient_clipping": 0.5,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}
    })));
    let err = load_err(&path, &[], 2);
    assert_eq!(
        err,
        "Please correct the following DeepSpeed config values that mismatch TrainingArguments values:\n\
        - ds train_micro_batch_size_per_gpu=8 vs hf per_device_train_batch_size=16\n\
        - ds gradient_clipping=0.5 vs hf max_grad_norm=1.0\n\
        - ds optimizer.params.lr=0.0003 vs hf learning_rate=0.0001\n\
        The easiest method is to set these DeepSpeed config values to 'auto'."
    );
}

#[test]
fn inconsistent_explicit_batch_fails_with_numbers() {
    let fixture = Fixture::new();
    let mut args = seed_args(
        json!({"train_batch_size": 100, "gradient_accumulation_steps": "auto", "train_micro_batch_size_per_gpu": "auto"}),
    );
    args["per_device_train_batch_size"] = json!(10);
    args["gradient_accumulation_steps"] = json!(5);
    let path = fixture.train_json(&args);
    // HF computes 10*5*2 = 100: consistent at world size 2 ...
    assert_eq!(load(&path, &[], 2).unwrap().batch.train_batch_size, 100);
    // ... but at world size 4 the explicit 100 mismatches the calculated 200.
    let err = load_err(&path, &[], 4);
    assert!(
        err.contains("- ds train_batch_size=100 vs hf train_batch_size (calculated)=200"),
        "{err}"
    );
    // Only gradient_accumulation_steps: DeepSpeed cannot derive the rest.
    let path = fixture.train_json(&seed_args(json!({"gradient_accumulation_steps": "auto"})));
    let err = load_err(&path, &[], 2);
    assert!(
        err.starts_with(
            "Either train_batch_size or train_micro_batch_size_per_gpu needs to be provided"
        ),
        "{err}"
    );
}

#[test]
fn overrides_apply_before_auto_filling() {
    let (_fixture, path) = seed_fixture();
    let overrides = [
        "--learning_rate",
        "3e-4",
        "--output_dir",
        "out2",
        "--fp16",
        "--bf16",
        "false",
        "--deepspeed.zero_optimization.stage",
        "1",
    ];
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let config = load(&path, &overrides, 2).unwrap();
    assert_eq!(config.optimizer().lr, 3e-4);
    assert_eq!(config.args.output_dir, "out2");
    assert_eq!(config.precision(), Precision::Fp16);
    assert_eq!(config.zero_stage(), ZeroStage::One);
    let err = load_err(
        &path,
        &[
            "--deepspeed.zero_optimization.stage3_prefetch_bucket_sise",
            "1",
            "--strict_config",
            "true",
        ],
        2,
    );
    assert!(
        err.contains("did you mean \"stage3_prefetch_bucket_size\""),
        "{err}"
    );
    let err = load_err(&path, &["--ouput_dir", "x"], 2);
    assert!(err.contains("did you mean \"--output_dir\""), "{err}");
}

#[test]
fn deepspeed_path_is_relative_to_train_json_or_to_the_command_line_cwd() {
    let (fixture, path) = seed_fixture();
    let err = load_err(
        &fixture.train_json(&seed_args(json!("missing.json"))),
        &[],
        1,
    );
    assert!(
        err.contains(
            "missing.json not found (a relative path is resolved against the folder of train.json)"
        ),
        "{err}"
    );
    // On the command line the path is the user's, relative to where rsdeep runs.
    let from_cwd = repo_configs().join("ds_config_zero3.json");
    let config = load(
        &path,
        &["--deepspeed".into(), from_cwd.display().to_string()],
        2,
    )
    .unwrap();
    assert_eq!(config.zero_stage(), ZeroStage::Three);
    let err = load_err(&path, &["--deepspeed", "ds_config_zero2.json"], 2);
    assert!(
        err.contains("resolved against the current directory"),
        "{err}"
    );
}

#[test]
fn offload_loads_with_a_notice_of_what_rsdeep_does() {
    let fixture = Fixture::new();
    let ds = json!({"train_batch_size": 8, "zero_optimization": {"stage": 3,
        "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"},
        "offload_param": {"device": "cpu", "pin_memory": true}}});
    let mut args = seed_args(ds);
    args["bf16"] = json!(false);
    let path = fixture.train_json(&args);
    let batch = [
        "--per_device_train_batch_size",
        "8",
        "--gradient_accumulation_steps",
        "1",
    ]
    .map(String::from);
    let config = load(&path, &batch, 1).unwrap();
    let notices = config.warnings.join("\n");
    assert!(
        !notices.contains("nvme"),
        "NVMe optimizer offload is built: {notices}"
    );
    assert!(
        notices.contains(
            "offload_param: on CPU ranks the parameter partitions already live in host memory"
        ),
        "{notices}"
    );
}

#[test]
fn nvme_offload_without_nvme_path_is_refused_naming_the_key() {
    let fixture = Fixture::new();
    let ds = json!({"train_batch_size": 8, "zero_optimization": {"stage": 3,
        "offload_optimizer": {"device": "nvme"}}});
    let path = fixture.train_json(&seed_args(ds));
    let batch = [
        "--per_device_train_batch_size",
        "8",
        "--gradient_accumulation_steps",
        "1",
    ];
    let err = load_err(&path, &batch, 1);
    assert!(
        err.contains("deepspeed.zero_optimization.offload_optimizer.nvme_path")
            && err.contains("set it to a folder on a fast local disk"),
        "{err}"
    );
}

#[test]
fn unsupported_features_are_refused_with_what_is_supported() {
    let fixture = Fixture::new();
    let cases = [
        (
            json!({"train_batch_size": 8, "optimizer": {"type": "Lamb", "params": {}}}),
            "rsdeep implements \"Adam\" and \"AdamW\"",
        ),
        (
            json!({"train_batch_size": 8, "scheduler": {"type": "CyclicLR"}}),
            "rsdeep implements \"WarmupLR\"",
        ),
        (
            json!({"train_batch_size": 8, "scheduler": {"type": "OneCycle"}}),
            "rsdeep cycles the learning rate only: set \"cycle_momentum\": false",
        ),
        (
            json!({"train_batch_size": 8, "amp": {"enabled": true}}),
            "apex AMP is not supported",
        ),
        (
            json!({"train_batch_size": 8, "sparse_attention": {"mode": "fixed"}}),
            "sparse attention is not implemented",
        ),
        (
            json!({"train_batch_size": 8, "zero_optimization": {"stage": 4}}),
            "4 is not a ZeRO stage",
        ),
    ];
    for (ds, expected) in cases {
        let mut args = seed_args(ds);
        args["bf16"] = json!(false);
        let path = fixture.train_json(&args);
        let err = load_err(
            &path,
            &[
                "--per_device_train_batch_size",
                "8",
                "--gradient_accumulation_steps",
                "1",
            ],
            1,
        );
        assert!(err.contains(expected), "{err}");
    }
}

#[test]
fn fp16_and_bf16_together_are_refused() {
    let ds: DeepSpeedConfig =
        serde_json::from_value(json!({"fp16": {"enabled": true}, "bf16": {"enabled": true}}))
            .unwrap();
    let err = validate::validate_deepspeed(&ds, Path::new("ds.json"), "")
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "ds.json: key \"bf16.enabled\": bfloat16 and fp16 modes cannot be simultaneously enabled"
    );
}

#[test]
fn report_to_unknown_backend_is_an_error_with_suggestion() {
    let fixture = Fixture::new();
    let mut args = seed_args(Value::Null);
    args["report_to"] = json!(["tensorbord"]);
    let path = fixture.train_json(&args);
    assert!(
        load_err(&path, &[], 1)
            .contains("unknown integration \"tensorbord\" (did you mean \"tensorboard\"?)")
    );
}

#[test]
fn adam_defaults_to_decoupled_weight_decay_like_deepspeed() {
    let fixture = Fixture::new();
    let path = fixture.train_json(&seed_args(json!({"train_batch_size": "auto", "optimizer": {"type": "adam", "params": {"adam_w_mode": false}}})));
    let optimizer = load(&path, &[], 1).unwrap().optimizer();
    assert_eq!(
        (optimizer.kind, optimizer.decoupled_weight_decay),
        (OptimizerKind::Adam, false)
    );
}

#[test]
fn resolved_config_round_trips_through_json() {
    let (_fixture, path) = seed_fixture();
    let config = load(&path, &[], 2).unwrap();
    let back = TrainConfig::from_json(&config.to_pretty_json()).unwrap();
    assert_eq!(back, config);
    // What `rsdeep check-config` prints after the JSON: the batch summary and the warnings.
    let summary = config.summary();
    assert!(
        summary.contains(
            "world size 2: train_batch_size 128 = 16 micro batch x 4 accumulation x 2 ranks"
        ),
        "{summary}"
    );
    // The seed's report_to swanlab is reported to (no warning); an integration rsdeep
    // does not drive is a warning.
    assert!(
        !config.warnings.iter().any(|w| w.starts_with("report_to")),
        "{:?}",
        config.warnings
    );
    let comet = ["--report_to", "comet_ml"].map(String::from);
    let config = load(&path, &comet, 2).unwrap();
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.starts_with("report_to [\"comet_ml\"]")),
        "{:?}",
        config.warnings
    );
}

#[test]
fn shipped_configs_load() {
    for name in ["pretrain.json", "sft.json", "lora.json"] {
        let path = repo_configs().join(name);
        let mut config = load(&path, &[], 2).unwrap_or_else(|e| panic!("{name}: {e}"));
        config
            .fill_model_autos(256, 100)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(config.unresolved_autos().is_empty(), "{name}");
    }
    for stage in 1..=3 {
        let ds: Value = serde_json::from_str(
            &std::fs::read_to_string(repo_configs().join(format!("ds_config_zero{stage}.json")))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(ds["zero_optimization"]["stage"], json!(stage));
    }
}

mod never_panics {
    use super::*;
    use proptest::prelude::*;

    const KEYS: [&str; 16] = [
        "deepspeed",
        "zero_optimization",
        "stage",
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "optimizer",
        "params",
        "lr",
        "betas",
        "scheduler",
        "type",
        "fp16",
        "bf16",
        "enabled",
        "per_device_train_batch_size",
    ];

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            Just(Value::from("auto")),
            "[a-z_]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((prop::sample::select(KEYS.to_vec()), inner), 0..6).prop_map(
                    |pairs| Value::Object(
                        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
                    )
                ),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn random_json_only_returns_errors(ds in json_value(), world in 0usize..5) {
            let fixture = Fixture::new();
            let path = fixture.train_json(&seed_args(ds));
            if let Ok(mut config) = load(&path, &[], world) {
                let _ = config.fill_model_autos(64, 10);
            }
            let raw = fixture.write("raw.json", "{\"deepspeed\": {\"zero_optimization\": [");
            prop_assert!(load(&raw, &[], world).is_err());
        }

        #[test]
        fn random_top_level_and_overrides_only_return_errors(
            top in json_value(),
            tokens in prop::collection::vec(
                prop_oneof![
                    prop::sample::select(KEYS.to_vec()).prop_map(|k| format!("--{k}")),
                    "[-a-z0-9.=]{0,6}".prop_map(String::from),
                    Just("--deepspeed.zero_optimization.stage".to_string()),
                ],
                0..6,
            ),
            text in "[\\PC]{0,40}",
        ) {
            let fixture = Fixture::new();
            let path = fixture.write("train.json", &top.to_string());
            let _ = load(&path, &tokens, 2);
            let seeded = fixture.train_json(&seed_args(Value::Null));
            let _ = load(&seeded, &tokens, 2);
            let garbage = fixture.write("garbage.json", &text);
            let _ = load(&garbage, &[], 1);
        }
    }
}

#[test]
fn deepspeeds_aliases_and_ignored_keys_load() {
    let fixture = Fixture::new();
    let ds = json!({
        "_comment": "as some published configs carry",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "steps_per_print": 10.0,
        "bfloat16": {"enabled": true},
        "zero_force_ds_cpu_optimizer": false,
        "zero_optimization": {
            "stage": 3,
            "sub_group_size": "auto",
            "max_live_parameters": 5e8,
            "stage3_max_reuse_distance": "auto",
            "prefetch_bucket_size": 1000,
            "param_persistence_threshold": 100,
            "gather_16bit_weights_on_model_save": true
        }
    });
    let path = fixture.train_json(&seed_args(ds));
    let config = load(&path, &[], 2).unwrap();
    let zero = &config.deepspeed.zero_optimization;
    assert_eq!(config.precision(), Precision::Bf16, "bfloat16 is bf16");
    assert_eq!(config.deepspeed.steps_per_print, Some(10));
    assert_eq!(
        (
            zero.sub_group_size,
            zero.stage3_max_live_parameters,
            zero.stage3_max_reuse_distance
        ),
        (1_000_000_000, 500_000_000, 1_000_000_000),
        "\"auto\" is DeepSpeed's default"
    );
    assert_eq!(zero.stage3_prefetch_bucket_size, AutoOr::Value(1000));
    assert_eq!(zero.stage3_param_persistence_threshold, AutoOr::Value(100));
    assert!(zero.stage3_gather_16bit_weights_on_model_save);
}

#[test]
fn bottleneck_adapter_keys_are_checked_by_name() {
    let (_fixture, path) = seed_fixture();
    let bottleneck = ["--task", "lora", "--peft_type", "BOTTLENECK"];
    let err = load_err(
        &path,
        &[&bottleneck[..], &["--bottleneck_config", "parallel"]].concat(),
        1,
    );
    assert!(
        err.contains("\"bottleneck_config\"") && err.contains("double_seq_bn"),
        "{err}"
    );
    let err = load_err(
        &path,
        &[&bottleneck[..], &["--bottleneck_reduction_factor", "0"]].concat(),
        1,
    );
    assert!(err.contains("\"bottleneck_reduction_factor\""), "{err}");
    let err = load_err(&path, &["--task", "lora", "--peft_type", "IA3"], 1);
    assert!(
        err.contains("\"peft_type\"") && err.contains("BOTTLENECK"),
        "{err}"
    );
    let overrides: Vec<String> = [&bottleneck[..], &["--bottleneck_config", "seq_bn"]]
        .concat()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let config = load(&path, &overrides, 1).unwrap();
    assert_eq!(
        (
            config.args.bottleneck_config.as_str(),
            config.args.bottleneck_reduction_factor
        ),
        ("seq_bn", 16)
    );
}

#[test]
fn a_4bit_base_is_checked_by_name() {
    let (_fixture, path) = seed_fixture();
    let err = load_err(&path, &["--quantization_bit", "8"], 1);
    assert!(
        err.contains("\"quantization_bit\"") && err.contains("use 4"),
        "{err}"
    );
    let err = load_err(&path, &["--load_in_4bit", "true"], 1);
    assert!(
        err.contains("\"load_in_4bit\"") && err.contains("task to \"lora\""),
        "{err}"
    );
    let lora = ["--task", "lora", "--load_in_4bit", "true"];
    let err = load_err(
        &path,
        &[&lora[..], &["--bnb_4bit_quant_type", "int4"]].concat(),
        1,
    );
    assert!(err.contains("\"bnb_4bit_quant_type\""), "{err}");
    let dtype = ["--bnb_4bit_compute_dtype", "float16"];
    let err = load_err(&path, &[&lora[..], &dtype].concat(), 1);
    assert!(
        err.contains("\"bnb_4bit_compute_dtype\"") && err.contains("bfloat16"),
        "{err}"
    );
    let ok = [&lora[..], &["--bnb_4bit_compute_dtype", "torch.bfloat16"]].concat();
    let overrides: Vec<String> = ok.iter().map(|s| s.to_string()).collect();
    let config = load(&path, &overrides, 1).unwrap();
    assert!(config.args.base_in_4bit());
    let fixture = Fixture::new();
    let seed_ds = std::fs::read_to_string(repo_configs().join("ds_config_zero2.json")).unwrap();
    fixture.write("ds_config_zero2.json", &seed_ds);
    let mut llama_factory = seed_args(json!("./ds_config_zero2.json"));
    llama_factory["task"] = json!("lora");
    llama_factory["quantization_bit"] = json!(4);
    llama_factory["quantization_type"] = json!("fp4");
    llama_factory["double_quantization"] = json!(true);
    let config = load(&fixture.train_json(&llama_factory), &[], 1).unwrap();
    assert!(config.args.base_in_4bit() && config.args.bnb_4bit_use_double_quant);
    assert_eq!(config.args.bnb_4bit_quant_type, "fp4");
}

/// Seed arguments with an inline DeepSpeed section holding `elasticity` (and `extra` keys).
fn elastic_args(elasticity: Value, extra: Value) -> Value {
    let mut ds = json!({
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2},
        "elasticity": elasticity
    });
    for (key, value) in extra.as_object().unwrap() {
        ds[key] = value.clone();
    }
    seed_args(ds)
}

fn elastic_block() -> Value {
    json!({"enabled": true, "max_train_batch_size": 64, "micro_batch_sizes": [2, 4], "max_gpus": 8})
}

fn sizes(train: u64, micro: u64, accumulation: u64, world: u64) -> BatchSizes {
    BatchSizes {
        train_batch_size: train,
        train_micro_batch_size_per_gpu: micro,
        gradient_accumulation_steps: accumulation,
        world_size: world,
    }
}

#[test]
fn elasticity_block_decides_the_batch_at_each_valid_world_size() {
    let fixture = Fixture::new();
    let path = fixture.train_json(&elastic_args(elastic_block(), json!({})));
    // Every base (2, 4 and their lcm 4) scales to 48 (2 x 24, 4 x 12): world sizes 1-8 dividing 24.
    let config = load(&path, &[], 2).unwrap();
    assert_eq!(config.batch, sizes(48, 4, 6, 2));
    assert_eq!(
        (
            config.args.per_device_train_batch_size,
            config.args.gradient_accumulation_steps
        ),
        (4, 6),
        "the training arguments' 16 x 4 are replaced"
    );
    let notice = config
        .warnings
        .iter()
        .find(|w| w.starts_with("elasticity: "))
        .unwrap();
    assert!(
        notice.contains("train_batch_size 48 = micro batch 4 x accumulation 6 x 2 ranks"),
        "{notice}"
    );
    assert!(
        notice.contains("valid world sizes [1, 2, 3, 4, 6, 8]"),
        "{notice}"
    );
    assert_eq!(load(&path, &[], 8).unwrap().batch, sizes(48, 2, 3, 8));
    let err = load_err(&path, &[], 5);
    assert!(err.contains("key \"deepspeed.elasticity\""), "{err}");
    assert!(
        err.contains("World size (5) is not valid with the current list of valid GPU counts: [1, 2, 3, 4, 6, 8]"),
        "{err}"
    );
}

#[test]
fn elasticity_refuses_explicit_batch_keys_unless_told_to_ignore_them() {
    let fixture = Fixture::new();
    let explicit = json!({"train_batch_size": 128});
    let path = fixture.train_json(&elastic_args(elastic_block(), explicit.clone()));
    let err = load_err(&path, &[], 2);
    assert!(err.contains("key \"deepspeed.train_batch_size\""), "{err}");
    assert!(
        err.contains("\"ignore_non_elastic_batch_info\": true in deepspeed.elasticity"),
        "{err}"
    );
    let mut block = elastic_block();
    block["ignore_non_elastic_batch_info"] = json!(true);
    let path = fixture.train_json(&elastic_args(block, explicit));
    let config = load(&path, &[], 2).unwrap();
    assert_eq!(config.batch, sizes(48, 4, 6, 2));
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.contains("the DeepSpeed config's train_batch_size are ignored")),
        "{:?}",
        config.warnings
    );
}

#[test]
fn disabled_elasticity_block_loads_as_before() {
    let fixture = Fixture::new();
    let mut block = elastic_block();
    block["enabled"] = json!(false);
    block["micro_batch_sizez"] = json!([1]);
    let path = fixture.train_json(&elastic_args(block, json!({})));
    let config = load(&path, &[], 2).unwrap();
    assert_eq!(config.batch, sizes(128, 16, 4, 2));
    assert!(!config.warnings.iter().any(|w| w.contains("elastic")));
}

fn keep(train_batch_size: u64, micro_batch_per_gpu: u64) -> KeepGlobalBatch {
    KeepGlobalBatch {
        train_batch_size,
        micro_batch_per_gpu,
    }
}

/// train.json whose DeepSpeed section is `ds`, with micro 2 x accumulation `accumulation`.
fn small_batch_fixture(ds: Value, accumulation: u64) -> (Fixture, PathBuf) {
    let fixture = Fixture::new();
    let mut args = seed_args(ds);
    args["per_device_train_batch_size"] = json!(2);
    args["gradient_accumulation_steps"] = json!(accumulation);
    let path = fixture.train_json(&args);
    (fixture, path)
}

fn autos() -> Value {
    json!({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
           "gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"}})
}

#[test]
fn keeping_the_global_batch_exactly_raises_accumulation() {
    let (_fixture, path) = small_batch_fixture(autos(), 2);
    assert_eq!(load(&path, &[], 4).unwrap().batch, sizes(16, 2, 2, 4));
    let config = load_keeping_batch(&path, &[], 2, keep(16, 2)).unwrap();
    assert_eq!(config.batch, sizes(16, 2, 4, 2));
    assert_eq!(config.args.gradient_accumulation_steps, 4);
    assert!(
        !config.warnings.iter().any(|w| w.contains("cannot be kept")),
        "{:?}",
        config.warnings
    );
}

#[test]
fn keeping_an_unreachable_global_batch_takes_the_closest_with_a_warning() {
    let (_fixture, path) = small_batch_fixture(autos(), 3);
    let kept =
        |global: u64, world: usize| load_keeping_batch(&path, &[], world, keep(global, 2)).unwrap();
    // 48 / (2 x 5) = 4.8 -> 5: 50; 48 / (2 x 7) = 3.4 -> 3: 42.
    let config = kept(48, 5);
    assert_eq!(config.batch, sizes(50, 2, 5, 5));
    let warning = config
        .warnings
        .iter()
        .find(|w| w.contains("cannot be kept"))
        .unwrap();
    assert!(
        warning
            .contains("global batch 48 cannot be kept at world size 5: train_batch_size is now 50"),
        "{warning}"
    );
    assert_eq!(kept(48, 7).batch, sizes(42, 2, 3, 7));
    // A tie (12 / 8 = 1.5) takes the smaller accumulation; never below 1.
    assert_eq!(kept(12, 4).batch, sizes(8, 2, 1, 4));
    assert_eq!(kept(4, 8).batch, sizes(16, 2, 1, 8));
}

#[test]
fn keeping_the_batch_ignores_explicit_values_that_no_longer_divide() {
    let ds = json!({"train_batch_size": 48, "train_micro_batch_size_per_gpu": 2,
                    "gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"}});
    let (_fixture, path) = small_batch_fixture(ds, 3);
    assert_eq!(load(&path, &[], 8).unwrap().batch, sizes(48, 2, 3, 8));
    assert!(load(&path, &[], 5).is_err());
    let config = load_keeping_batch(&path, &[], 5, keep(48, 2)).unwrap();
    assert_eq!(config.batch, sizes(50, 2, 5, 5));
}

#[test]
fn keeping_the_batch_defers_to_an_elasticity_block() {
    let fixture = Fixture::new();
    let path = fixture.train_json(&elastic_args(elastic_block(), json!({})));
    let config = load_keeping_batch(&path, &[], 2, keep(16, 2)).unwrap();
    assert_eq!(config.batch, sizes(48, 4, 6, 2));
    let err = load_keeping_batch(&path, &[], 5, keep(48, 2))
        .unwrap_err()
        .to_string();
    assert!(err.contains("World size (5)"), "{err}");
}
