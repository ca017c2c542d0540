//! LoRA through the ZeRO engine: `apply_lora`'s frozen set goes into
//! `EngineModel::frozen`; only adapters train (base weights bit-identical afterwards),
//! the loss falls, stage 3 on 2 ranks matches stage 0 on 1 rank, and `lora_state` picks
//! PEFT-named adapters out of `gather_full_weights`. Contracts: `lora/mod.rs`,
//! `docs/zero-engine.md`.

use rsdeep_worker::comm::Communicator;
use rsdeep_worker::lora::{LoraConfig, apply_lora, lora_state};
use rsdeep_worker::model::{CausalLm, ForwardCtx, ModelConfig, ModelType, causal_lm_loss};
use rsdeep_worker::zero::{EngineConfig, EngineModel, LocalCommunicator, ZeroEngine};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

const STEPS: usize = 6;
const GLOBAL_BATCH: usize = 4;
const SEQ: i64 = 8;
const VOCAB: usize = 64;

fn lora_model() -> (
    CausalLm,
    Vec<(String, Tensor)>,
    std::collections::HashSet<String>,
) {
    let mut config = ModelConfig::new(ModelType::Qwen2, VOCAB, 32, 48, 2, 4, 2);
    config.tie_word_embeddings = true;
    config.initializer_range = 0.05;
    let mut model = CausalLm::from_config(config, Device::Cpu, Kind::Float, 3).unwrap();
    let base: Vec<(String, Tensor)> = model
        .params()
        .map(|p| (p.name.clone(), p.tensor.detach().copy()))
        .collect();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["all-linear".into()],
        use_rslora: false,
    };
    let info = apply_lora(&mut model, &cfg, 9).unwrap();
    (model, base, info.frozen)
}

fn tokens() -> Tensor {
    let rows = (STEPS * GLOBAL_BATCH) as i64;
    let ids: Vec<i64> = (0..rows * SEQ)
        .map(|i| ((i / SEQ) * 13 + (i % SEQ) * 7 + 5) % VOCAB as i64)
        .collect();
    Tensor::from_slice(&ids).reshape([rows, SEQ])
}

fn engine_config(stage: u8, world: usize) -> EngineConfig {
    let mut config = EngineConfig {
        stage,
        gradient_accumulation_steps: 1,
        train_micro_batch_size_per_gpu: GLOBAL_BATCH / world,
        train_batch_size: GLOBAL_BATCH,
        gradient_clipping: 1.0,
        reduce_bucket_size: 1000,
        allgather_bucket_size: 800,
        stage3_param_persistence_threshold: 32,
        ..EngineConfig::default()
    };
    config.optimizer.lr = 1e-2;
    config
}

struct Outcome {
    losses: Vec<f64>,
    weights: Vec<(String, Tensor)>,
    base: Vec<(String, Tensor)>,
}

fn train(world: usize, config: EngineConfig) -> Vec<Outcome> {
    let models: Vec<_> = (0..world).map(|_| lora_model()).collect();
    let tokens = tokens();
    let handles: Vec<_> = LocalCommunicator::world(world)
        .into_iter()
        .zip(models)
        .map(|(comm, (model, base, frozen))| {
            let (config, tokens) = (config.clone(), tokens.copy());
            std::thread::spawn(move || {
                let rank = comm.rank();
                let tied = model.tied_to_embedding();
                let engine_model = EngineModel {
                    blocks: model.blocks,
                    head_tied_to_embedding: tied,
                    frozen,
                };
                let mut engine =
                    ZeroEngine::new(engine_model, Arc::new(comm), config.clone()).expect("engine");
                let mbs = config.train_micro_batch_size_per_gpu as i64;
                let mut losses = Vec::new();
                for step in 0..STEPS {
                    let row = (step * GLOBAL_BATCH) as i64 + rank as i64 * mbs;
                    let ids = tokens.narrow(0, row, mbs);
                    let ctx = ForwardCtx::causal(&ids).expect("ctx");
                    engine
                        .forward_backward(&ids, &ctx, &mut |logits| causal_lm_loss(logits, &ids))
                        .expect("forward_backward");
                    losses.push(engine.step().expect("step").loss);
                }
                Outcome {
                    losses,
                    weights: engine.gather_full_weights().expect("weights"),
                    base,
                }
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank panicked"))
        .collect()
}

#[test]
fn lora_trains_only_adapters_under_zero() {
    tch::set_num_threads(1);
    let reference = train(1, engine_config(0, 1)).remove(0);
    assert!(
        reference.losses[STEPS - 1] < reference.losses[0],
        "learns: {:?}",
        reference.losses
    );
    let find = |weights: &[(String, Tensor)], name: &str| {
        weights
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.shallow_clone())
    };
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

    for outcome in train(2, engine_config(3, 2)) {
        for (got, want) in outcome.losses.iter().zip(&reference.losses) {
            assert!(
                ((got - want) / want).abs() <= 1e-5,
                "stage 3 loss {got} vs {want}"
            );
        }
        for (name, want) in &reference.weights {
            let got = find(&outcome.weights, name).unwrap_or_else(|| panic!("{name} missing"));
            let err = (got - want).abs().max().double_value(&[]);
            assert!(err < 1e-5, "stage 3 {name} differs by {err}");
        }
    }
}
