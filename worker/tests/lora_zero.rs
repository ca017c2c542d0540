//! LoRA through the ZeRO engine (plain LoRA on a Qwen3, the other methods on Qwen2 and,
//! for bottleneck adapters, Llama): `apply_lora`'s frozen set goes into
//! `EngineModel::frozen`; only adapters train (base weights bit-identical afterwards),
//! the loss falls, stage 3 on 2 ranks matches stage 0 on 1 rank (tied head, and untied
//! with activation checkpointing and prefetching), `lora_state` picks PEFT-named adapters
//! out of `gather_full_weights`. Under stage 3 the frozen base is partitioned: its bytes
//! per rank halve from world 1 to world 2 (stage 2 keeps it whole), the model's frozen
//! tensors are empty outside use, and a stage-3 checkpoint still holds the whole base
//! and resumes at world size 1. DoRA with trained `modules_to_save` (the head and
//! norms) trains the same at stages 1-3 on 2 ranks as stage 0 on 1, and a stage-3
//! checkpoint resumes at stage 2 on 1 rank. QLoRA (a 4-bit NF4 base): the same at every
//! stage; under ZeRO-3 each rank keeps only its slice of the 4-bit bytes (half at world
//! 2, none held outside a gather) and the base costs a fraction of an fp32 base; a
//! stage-3 checkpoint resumes at stage 1. Prefix tuning (per-layer key/value prefixes)
//! and Houlsby bottleneck adapters, every base weight frozen: the same at every stage,
//! resumed at stage 2 from stage 3.
//! Contracts: `lora/mod.rs`,
//! `docs/zero-engine.md`.

use crate::zero_support;

use rsdeep_worker::checkpoint::{
    FROZEN_FILE, SaveRequest, TrainerState, load_checkpoint, save_checkpoint,
};
use rsdeep_worker::comm::Communicator;
use rsdeep_worker::lora::{Bottleneck, LoraConfig, PrefixTuning, apply_lora, lora_state};
use rsdeep_worker::model::{
    BottleneckStyle, CausalLm, ForwardCtx, ModelConfig, ModelType, causal_lm_loss,
};
use rsdeep_worker::quant::{QuantConfig, QuantType};
use rsdeep_worker::zero::{EngineConfig, EngineModel, LocalCommunicator, MemoryReport, ZeroEngine};
use std::collections::HashSet;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

const STEPS: usize = 6;
const GLOBAL_BATCH: usize = 4;
const SEQ: i64 = 8;
const VOCAB: usize = 64;
const QLORA_BASE: QuantConfig = QuantConfig {
    quant_type: QuantType::Nf4,
    double_quant: true,
};

/// A tiny Qwen2 with fresh adapters, the base weights before injection, the frozen names
/// and the model's config.json.
struct LoraModel {
    model: CausalLm,
    base: Vec<(String, Tensor)>,
    frozen: HashSet<String>,
    config_json: String,
}

/// Plain LoRA on every linear, or DoRA with rsLoRA scaling that also trains the head and
/// every norm whole.
#[derive(Clone, Copy, PartialEq)]
enum Method {
    /// On a Qwen3 (per-head query/key norms, heads wider than hidden / heads).
    Lora,
    DoraWithSavedModules,
    /// LoRA on every linear of a base stored in 4 bits (NF4, double quantization).
    QLora,
    /// PEFT's prefix tuning: 3 trained virtual key/value positions per layer.
    Prefix,
    /// AdapterHub's Houlsby bottleneck adapters (a Llama model, reduction factor 8).
    Bottleneck,
}

/// The tiny base every method adapts: 2 layers, hidden 32, GQA (a Qwen3's heads are 16
/// wide over hidden 32 / 4 heads).
fn base_model(model_type: ModelType, tied: bool) -> CausalLm {
    let mut config = ModelConfig::new(model_type, VOCAB, 32, 48, 2, 4, 2);
    if model_type == ModelType::Qwen3 {
        config.head_dim = Some(16);
    }
    config.tie_word_embeddings = tied;
    config.initializer_range = 0.05;
    CausalLm::from_config(config, Device::Cpu, Kind::Float, 3).unwrap()
}

fn lora_model(tied: bool, method: Method) -> LoraModel {
    let model_type = match method {
        Method::Bottleneck => ModelType::Llama,
        Method::Lora => ModelType::Qwen3,
        _ => ModelType::Qwen2,
    };
    let mut model = base_model(model_type, tied);
    if method == Method::QLora {
        model.quantize_linears(QLORA_BASE).unwrap();
    }
    let base: Vec<(String, Tensor)> = model
        .params()
        .map(|p| (p.name.clone(), p.tensor.detach().copy()))
        .collect();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["all-linear".into()],
        use_rslora: method == Method::DoraWithSavedModules,
        use_dora: method == Method::DoraWithSavedModules,
        modules_to_save: match method {
            Method::DoraWithSavedModules => vec!["lm_head".into(), "norm".into()],
            _ => Vec::new(),
        },
        prefix_tuning: (method == Method::Prefix).then(|| PrefixTuning {
            num_virtual_tokens: 3,
            num_layers: model.config.num_hidden_layers,
            num_kv_heads: model.config.num_kv_heads(),
            head_dim: model.config.head_dim(),
        }),
        bottleneck: (method == Method::Bottleneck).then_some(Bottleneck {
            style: BottleneckStyle::DoubleSeq,
            reduction_factor: 8,
            hidden_size: model.config.hidden_size,
        }),
    };
    let info = apply_lora(&mut model, &cfg, 9).unwrap();
    let config_json = model.config.to_json_string().unwrap();
    LoraModel {
        model,
        base,
        frozen: info.frozen,
        config_json,
    }
}

fn tokens() -> Tensor {
    let rows = (STEPS * GLOBAL_BATCH) as i64;
    let ids: Vec<i64> = (0..rows * SEQ)
        .map(|i| ((i / SEQ) * 13 + (i % SEQ) * 7 + 5) % VOCAB as i64)
        .collect();
    Tensor::from_slice(&ids).reshape([rows, SEQ])
}

fn engine_config(stage: u8, world: usize) -> EngineConfig {
    zero_support::small_bucket_engine_config(stage, world, GLOBAL_BATCH)
}

/// What one rank does: which steps it trains, and whether it resumes from or saves a
/// checkpoint (after its last step).
#[derive(Clone)]
struct Plan {
    tied: bool,
    method: Method,
    steps: Range<usize>,
    resume_from: Option<PathBuf>,
    save_to: Option<PathBuf>,
}

impl Plan {
    fn all_steps(tied: bool) -> Self {
        Plan {
            tied,
            method: Method::Lora,
            steps: 0..STEPS,
            resume_from: None,
            save_to: None,
        }
    }
}

struct Outcome {
    losses: Vec<f64>,
    weights: Vec<(String, Tensor)>,
    base: Vec<(String, Tensor)>,
    /// Right after `ZeroEngine::new`, and after the last step.
    memory_at_start: MemoryReport,
    memory_at_end: MemoryReport,
    /// Elements the model's frozen tensors hold after the last step (persistent ones
    /// excluded: their count is `persistent_frozen_numel`).
    frozen_numel_held: usize,
    persistent_frozen_numel: usize,
    saved: Option<PathBuf>,
}

fn run_rank(comm: LocalCommunicator, config: EngineConfig, plan: Plan) -> Outcome {
    let rank = comm.rank();
    let world = comm.world_size();
    let comm: Arc<dyn Communicator> = Arc::new(comm);
    let LoraModel {
        model,
        base,
        frozen,
        config_json,
    } = lora_model(plan.tied, plan.method);
    let tied = model.tied_to_embedding();
    let engine_model = EngineModel {
        blocks: model.blocks,
        head_tied_to_embedding: tied,
        frozen: frozen.clone(),
    };
    let mut engine = ZeroEngine::new(engine_model, comm.clone(), config.clone()).expect("engine");
    let memory_at_start = engine.memory_report();
    if let Some(dir) = &plan.resume_from {
        let resumed = load_checkpoint(dir, &mut engine, rank, world).expect("resume");
        assert_eq!(resumed.global_step, plan.steps.start as u64);
    }
    let tokens = tokens();
    let mbs = config.train_micro_batch_size_per_gpu as i64;
    let mut losses = Vec::new();
    for step in plan.steps.clone() {
        let row = (step * GLOBAL_BATCH) as i64 + rank as i64 * mbs;
        let ids = tokens.narrow(0, row, mbs);
        let ctx = ForwardCtx::causal(&ids).expect("ctx");
        engine
            .forward_backward(&ids, &ctx, &mut |logits| causal_lm_loss(logits, &ids))
            .expect("forward_backward");
        losses.push(engine.step().expect("step").loss);
    }
    let memory_at_end = engine.memory_report();
    let threshold = config.stage3_param_persistence_threshold;
    let (mut frozen_numel_held, mut persistent_frozen_numel) = (0, 0);
    for param in engine.blocks().iter().flat_map(|b| b.params()) {
        if !frozen.contains(&param.name) {
            continue;
        }
        match config.stage.partitions_parameters() && param.tensor.numel() <= threshold {
            true => persistent_frozen_numel += param.tensor.numel(),
            false => frozen_numel_held += param.tensor.numel(),
        }
    }
    let saved = plan.save_to.as_ref().map(|dir| {
        let state = TrainerState {
            global_step: plan.steps.end as u64,
            max_steps: STEPS as u64,
            ..TrainerState::default()
        };
        save_checkpoint(SaveRequest {
            output_dir: dir,
            step: plan.steps.end as u64,
            engine: &mut engine,
            comm: comm.as_ref(),
            model_config_json: &config_json,
            tokenizer: None,
            trainer_state: &state,
            per_rank_extra: serde_json::json!({ "rank": rank }),
            save_total_limit: None,
            max_shard_bytes: 1 << 30,
            write_model_weights: false,
            weights_dtype: Kind::Float,
            run: None,
        })
        .expect("save")
    });
    Outcome {
        losses,
        weights: engine.gather_full_weights().expect("weights"),
        base,
        memory_at_start,
        memory_at_end,
        frozen_numel_held,
        persistent_frozen_numel,
        saved,
    }
}

fn train(world: usize, config: EngineConfig, plan: Plan) -> Vec<Outcome> {
    let handles: Vec<_> = LocalCommunicator::world(world)
        .into_iter()
        .map(|comm| {
            let (config, plan) = (config.clone(), plan.clone());
            std::thread::spawn(move || run_rank(comm, config, plan))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank panicked"))
        .collect()
}

fn find(weights: &[(String, Tensor)], name: &str) -> Option<Tensor> {
    weights
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t.shallow_clone())
}

/// A tensor's bytes (u8).
fn bytes_of(t: &Tensor) -> Tensor {
    t.contiguous().view_dtype(Kind::Uint8)
}

/// Trains `plan`'s first half of the steps under `save` (engine config, world) saving a
/// checkpoint, then the second half resumed from it under `resume`; every rank's outcome of
/// the resumed half.
fn save_half_then_resume(
    plan: &Plan,
    save: (EngineConfig, usize),
    resume: (EngineConfig, usize),
) -> Vec<Outcome> {
    let tmp = tempfile::tempdir().unwrap();
    let half = STEPS / 2;
    let first = Plan {
        steps: 0..half,
        save_to: Some(tmp.path().to_path_buf()),
        ..plan.clone()
    };
    let checkpoint = train(save.1, save.0, first)
        .remove(0)
        .saved
        .expect("checkpoint");
    let second = Plan {
        steps: half..STEPS,
        resume_from: Some(checkpoint),
        ..plan.clone()
    };
    train(resume.1, resume.0, second)
}

/// `straight` from step `from` on: its later losses, its final weights.
fn tail_of(straight: &Outcome, from: usize) -> Outcome {
    Outcome {
        losses: straight.losses[from..].to_vec(),
        weights: straight
            .weights
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect(),
        base: Vec::new(),
        memory_at_start: straight.memory_at_start,
        memory_at_end: straight.memory_at_end,
        frozen_numel_held: 0,
        persistent_frozen_numel: 0,
        saved: None,
    }
}

fn assert_same_training(got: &Outcome, want: &Outcome, what: &str) {
    assert_trained_within(got, want, 1e-5, what);
}

/// Losses within 1e-5 relative, every weight within `weight_tolerance`.
fn assert_trained_within(got: &Outcome, want: &Outcome, weight_tolerance: f64, what: &str) {
    assert_eq!(got.losses.len(), want.losses.len(), "{what}: step count");
    for (got, want) in got.losses.iter().zip(&want.losses) {
        assert!(
            ((got - want) / want).abs() <= 1e-5,
            "{what}: loss {got} vs {want}"
        );
    }
    for (name, want) in &want.weights {
        let got = find(&got.weights, name).unwrap_or_else(|| panic!("{what}: {name} missing"));
        if bytes_of(&got).equal(&bytes_of(want)) {
            continue; // also 4-bit state, whose bytes read as floats may be NaN
        }
        let err = (got - want).abs().max().double_value(&[]);
        assert!(err < weight_tolerance, "{what}: {name} differs by {err}");
    }
}

#[test]
fn lora_trains_only_adapters_under_zero() {
    tch::set_num_threads(1);
    let reference = train(1, engine_config(0, 1), Plan::all_steps(true)).remove(0);
    assert!(
        reference.losses[STEPS - 1] < reference.losses[0],
        "learns: {:?}",
        reference.losses
    );
    for (name, before) in &reference.base {
        let after = find(&reference.weights, name).unwrap_or_else(|| panic!("{name} missing"));
        assert!(after.equal(before), "frozen base weight {name} changed");
    }
    let adapters = lora_state(&reference.weights);
    assert_eq!(adapters.len(), 2 * 7 * 2);
    let b = find(
        &adapters,
        "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight",
    )
    .unwrap();
    assert!(
        b.abs().max().double_value(&[]) > 0.0,
        "lora_B trained away from zero"
    );
    for outcome in train(2, engine_config(3, 2), Plan::all_steps(true)) {
        assert_same_training(&outcome, &reference, "stage 3 world 2, tied");
    }
}

#[test]
fn lora_stage3_untied_with_checkpointing_and_prefetch_equals_stage0() {
    tch::set_num_threads(1);
    let reference = train(1, engine_config(0, 1), Plan::all_steps(false)).remove(0);
    let mut config = engine_config(3, 2);
    config.activation_checkpointing = true;
    config.stage3_param_persistence_threshold = 0;
    config.stage3_prefetch_bucket_size = 1 << 20;
    for outcome in train(2, config, Plan::all_steps(false)) {
        assert_same_training(&outcome, &reference, "stage 3 world 2, untied");
        assert_eq!(
            outcome.frozen_numel_held, 0,
            "frozen base still held outside a gather"
        );
    }
}

/// Frozen bytes per rank (stage, world) right after construction and after training.
fn frozen_bytes(stage: u8, world: usize) -> (usize, usize) {
    let outcomes = train(world, engine_config(stage, world), Plan::all_steps(true));
    let first = &outcomes[0];
    for other in &outcomes[1..] {
        assert_eq!(
            other.memory_at_end.frozen_bytes, first.memory_at_end.frozen_bytes,
            "ranks hold different frozen bytes"
        );
    }
    if stage == 3 {
        assert_eq!(first.frozen_numel_held, 0, "frozen base held after a step");
        assert!(first.persistent_frozen_numel > 0, "norms stay resident");
    }
    (
        first.memory_at_start.frozen_bytes,
        first.memory_at_end.frozen_bytes,
    )
}

#[test]
fn stage3_partitions_the_frozen_base_and_stage2_keeps_it_whole() {
    tch::set_num_threads(1);
    let model = lora_model(true, Method::Lora);
    let base_bytes: usize = model
        .model
        .params()
        .filter(|p| model.frozen.contains(&p.name))
        .map(|p| p.tensor.numel() * 4)
        .sum();
    let (s2w1, s2w1_end) = frozen_bytes(2, 1);
    let (s2w2, s2w2_end) = frozen_bytes(2, 2);
    assert_eq!(
        (s2w1, s2w1_end),
        (base_bytes, base_bytes),
        "stage 2 world 1"
    );
    assert_eq!(
        (s2w2, s2w2_end),
        (base_bytes, base_bytes),
        "stage 2 world 2"
    );
    let (s3w1, s3w1_end) = frozen_bytes(3, 1);
    let (s3w2, s3w2_end) = frozen_bytes(3, 2);
    println!(
        "frozen bytes per rank: base {base_bytes}; stage 2 w1 {s2w1}, w2 {s2w2}; stage 3 w1 \
         {s3w1} (after training {s3w1_end}), w2 {s3w2} (after training {s3w2_end})"
    );
    let within = |got: usize, want: f64| (got as f64 / want - 1.0).abs() <= 0.05;
    assert!(within(s3w1, base_bytes as f64), "stage 3 world 1: {s3w1}");
    assert!(
        within(s3w2, s3w1 as f64 / 2.0),
        "stage 3 w2 {s3w2} vs w1 {s3w1}"
    );
    assert!(
        within(s3w2_end, s3w1_end as f64 / 2.0),
        "after training: stage 3 w2 {s3w2_end} vs w1 {s3w1_end}"
    );
}

#[test]
fn stage3_lora_checkpoint_holds_the_whole_base_and_resumes_at_world_1() {
    tch::set_num_threads(1);
    let tmp = tempfile::tempdir().unwrap();
    let straight = train(1, engine_config(3, 1), Plan::all_steps(true)).remove(0);
    let half = STEPS / 2;
    let first = Plan {
        tied: true,
        method: Method::Lora,
        steps: 0..half,
        resume_from: None,
        save_to: Some(tmp.path().to_path_buf()),
    };
    let saved = train(2, engine_config(3, 2), first).remove(0);
    let checkpoint = saved.saved.expect("checkpoint folder");
    let frozen = Tensor::read_safetensors(checkpoint.join(FROZEN_FILE)).expect("frozen file");
    assert_eq!(
        frozen.len(),
        saved.base.len(),
        "frozen file holds {} tensors",
        frozen.len()
    );
    for (name, tensor) in &frozen {
        let before = find(&saved.base, name).unwrap_or_else(|| panic!("{name} not in the base"));
        assert!(
            tensor.equal(&before),
            "saved frozen {name} differs from the base"
        );
    }
    let second = Plan {
        tied: true,
        method: Method::Lora,
        steps: half..STEPS,
        resume_from: Some(checkpoint),
        save_to: None,
    };
    let resumed = train(1, engine_config(3, 1), second).remove(0);
    for (got, want) in resumed.losses.iter().zip(&straight.losses[half..]) {
        assert!(
            ((got - want) / want).abs() <= 1e-5,
            "resumed loss {got} vs straight {want}"
        );
    }
    for (name, want) in &straight.weights {
        let got = find(&resumed.weights, name).unwrap_or_else(|| panic!("{name} missing"));
        let err = (got - want).abs().max().double_value(&[]);
        assert!(err < 1e-5, "resumed {name} differs by {err}");
    }
}

#[test]
fn dora_with_saved_modules_trains_the_same_at_every_stage_and_resumes_across_stages() {
    tch::set_num_threads(1);
    let dora = Plan {
        method: Method::DoraWithSavedModules,
        ..Plan::all_steps(false)
    };
    let single = train(1, engine_config(0, 1), dora.clone()).remove(0);
    assert!(
        single.losses[STEPS - 1] < single.losses[0],
        "learns: {:?}",
        single.losses
    );
    // PEFT's rule: "norm" selects every module whose path ends with it.
    let trained = |name: &str| name == "lm_head.weight" || name.ends_with("norm.weight");
    for (name, before) in &single.base {
        let after = find(&single.weights, name).unwrap_or_else(|| panic!("{name} missing"));
        let changed = !after.equal(before);
        assert_eq!(changed, trained(name), "{name} changed: {changed}");
    }
    let magnitude = "model.layers.1.mlp.down_proj.lora_magnitude_vector";
    assert!(
        find(&single.weights, magnitude).is_some(),
        "{magnitude} missing"
    );
    // Two ranks sum their gradients in another order than one rank: Adam turns that
    // rounding into weight differences near 1e-5, the same at every stage.
    let reference = train(2, engine_config(0, 2), dora.clone()).remove(0);
    assert_trained_within(&reference, &single, 5e-5, "DoRA world 2 vs world 1");
    for stage in 1..=3 {
        for outcome in train(2, engine_config(stage, 2), dora.clone()) {
            assert_same_training(&outcome, &reference, &format!("DoRA stage {stage} world 2"));
        }
    }
    let half = STEPS / 2;
    let resumed =
        save_half_then_resume(&dora, (engine_config(3, 2), 2), (engine_config(2, 1), 1)).remove(0);
    assert_eq!(resumed.losses.len(), STEPS - half);
    let straight_tail = tail_of(&single, half);
    assert_trained_within(
        &resumed,
        &straight_tail,
        5e-5,
        "DoRA resumed at stage 2 world 1",
    );
}

#[test]
fn qlora_trains_the_same_at_every_stage_and_ranks_keep_only_their_4bit_slice() {
    tch::set_num_threads(1);
    let qlora = Plan {
        method: Method::QLora,
        ..Plan::all_steps(false)
    };
    let reference = train(2, engine_config(0, 2), qlora.clone()).remove(0);
    assert!(
        reference.losses[STEPS - 1] < reference.losses[0],
        "learns: {:?}",
        reference.losses
    );
    for (name, before) in &reference.base {
        let after = find(&reference.weights, name).unwrap_or_else(|| panic!("{name} missing"));
        // Bytes, not values: 4-bit state read as floats holds NaN patterns.
        assert!(
            bytes_of(&after).equal(&bytes_of(before)),
            "frozen 4-bit base tensor {name} changed"
        );
    }
    for stage in 1..=2 {
        for outcome in train(2, engine_config(stage, 2), qlora.clone()) {
            assert_same_training(
                &outcome,
                &reference,
                &format!("QLoRA stage {stage} world 2"),
            );
        }
    }
    let mut stage3 = engine_config(3, 2);
    stage3.stage3_param_persistence_threshold = 0;
    let outcomes = train(2, stage3.clone(), qlora.clone());
    for outcome in &outcomes {
        assert_same_training(outcome, &reference, "QLoRA stage 3 world 2");
        assert_eq!(
            outcome.frozen_numel_held, 0,
            "a rank holds 4-bit base tensors outside a gather"
        );
    }
    // The frozen base as built: 4-bit linears + absmax state, fp32 embedding, head and norms.
    let frozen_total: usize = lora_model(false, Method::QLora)
        .model
        .params()
        .filter(|p| !p.name.contains(".lora_"))
        .map(|p| p.tensor.numel() * 4)
        .sum();
    let fp32_base: usize = base_model(ModelType::Qwen2, false)
        .params()
        .map(|p| p.tensor.numel() * 4)
        .sum();
    let per_rank = outcomes[0].memory_at_start.frozen_bytes;
    println!(
        "QLoRA frozen base: {frozen_total} B whole ({:.2} of fp32's {fp32_base} B), {per_rank} B per rank at ZeRO-3 world 2",
        frozen_total as f64 / fp32_base as f64
    );
    assert!(
        frozen_total * 2 < fp32_base,
        "the 4-bit base is not smaller"
    );
    assert!(
        (per_rank as f64 / (frozen_total as f64 / 2.0) - 1.0).abs() <= 0.05,
        "per rank {per_rank} B is not half of {frozen_total} B"
    );

    let half = STEPS / 2;
    for resumed in save_half_then_resume(&qlora, (stage3, 2), (engine_config(1, 2), 2)) {
        let straight_tail = tail_of(&reference, half);
        assert_same_training(&resumed, &straight_tail, "QLoRA resumed at stage 1");
    }
}

#[test]
fn prefix_tuning_trains_the_same_at_every_stage_and_resumes_across_stages() {
    let trained = [
        "model.layers.0.prefix_key_values",
        "model.layers.1.prefix_key_values",
    ];
    added_weights_train_the_same_at_every_stage_and_resume(Method::Prefix, &trained);
}

#[test]
fn bottleneck_adapters_train_the_same_at_every_stage_and_resume_across_stages() {
    let suffixes = [
        "adapter_down.0.weight",
        "adapter_down.0.bias",
        "adapter_up.weight",
        "adapter_up.bias",
    ];
    let mut trained = Vec::new();
    for layer in 0..2 {
        for location in ["attention_adapters", "output_adapters"] {
            for suffix in suffixes {
                trained.push(format!(
                    "model.layers.{layer}.{location}.adapters.bottleneck.{suffix}"
                ));
            }
        }
    }
    let trained: Vec<&str> = trained.iter().map(String::as_str).collect();
    added_weights_train_the_same_at_every_stage_and_resume(Method::Bottleneck, &trained);
}

/// A method that adds weights (`trained`, in model order) to a frozen model: only they
/// move, stages 1-3 on 2 ranks equal stage 0, a stage-3 checkpoint resumes at stage 2.
fn added_weights_train_the_same_at_every_stage_and_resume(method: Method, trained: &[&str]) {
    tch::set_num_threads(1);
    let plan = Plan {
        method,
        ..Plan::all_steps(true)
    };
    let reference = train(2, engine_config(0, 2), plan.clone()).remove(0);
    let fresh = lora_model(true, method);
    for name in trained {
        let before = fresh
            .model
            .params()
            .find(|p| p.name == *name)
            .unwrap_or_else(|| panic!("{name} not in the model"));
        let after = find(&reference.weights, name).expect("trained weights");
        let moved = (after - &before.tensor).abs().max().double_value(&[]);
        assert!(moved > 1e-4, "{name} moved only {moved}");
    }
    for (name, before) in &reference.base {
        let after = find(&reference.weights, name).unwrap_or_else(|| panic!("{name} missing"));
        assert!(after.equal(before), "frozen weight {name} changed");
    }
    let added: Vec<_> = reference
        .weights
        .iter()
        .filter(|(name, _)| !reference.base.iter().any(|(base, _)| base == name))
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(added, trained, "only the added weights train");
    for stage in 1..=3 {
        for outcome in train(2, engine_config(stage, 2), plan.clone()) {
            assert_same_training(&outcome, &reference, &format!("stage {stage} world 2"));
        }
    }
    let half = STEPS / 2;
    for resumed in save_half_then_resume(&plan, (engine_config(3, 2), 2), (engine_config(2, 2), 2))
    {
        let straight_tail = tail_of(&reference, half);
        assert_same_training(&resumed, &straight_tail, "resumed at stage 2");
    }
}
