//! The model built block by block straight into the engine
//! (`assemble::build_causal_lm_engine`, what `train/run.rs` uses) equals the model built
//! whole, then `apply_lora`, then `ZeroEngine::new`, bit for bit: same losses, same final
//! weights, at stages 2 and 3 on 2 in-process ranks, for full training and LoRA, tied and
//! untied heads, from a seeded init and from a pretrained folder. Ranks that built
//! different initial weights are refused by the hash check in `EngineBuilder::finish`.
//! The final export streamed block by block (`checkpoint::export`) equals gathering all
//! weights and saving them (single file and shards, fp32/bf16/fp16, stages 0/2/3).
//! Contract: `worker/src/zero/causal_lm.rs`, `worker/src/zero/build.rs`.

use crate::zero_support;

use rsdeep_worker::assemble::{LoraSpec, ModelSource, build_causal_lm_engine};
use rsdeep_worker::checkpoint::export::write_final_weights;
use rsdeep_worker::comm::Communicator;
use rsdeep_worker::lora::{LoraConfig, apply_lora};
use rsdeep_worker::model::{
    CausalLm, ForwardCtx, INDEX_FILE, ModelConfig, ModelType, SINGLE_FILE, SafetensorsFolder,
    causal_lm_loss, save_safetensors_sharded,
};
use rsdeep_worker::zero::{EngineConfig, EngineModel, LocalCommunicator, ZeroEngine};
use std::path::PathBuf;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

const STEPS: usize = 3;
const GLOBAL_BATCH: usize = 4;
const SEQ: i64 = 8;
const VOCAB: usize = 64;
const SEED: u64 = 5;

fn model_config(tied: bool) -> ModelConfig {
    let mut config = ModelConfig::new(ModelType::Qwen2, VOCAB, 32, 48, 2, 4, 2);
    config.tie_word_embeddings = tied;
    config.initializer_range = 0.05;
    config
}

fn lora_config() -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["all-linear".into()],
        use_rslora: false,
        use_dora: false,
        modules_to_save: Vec::new(),
        prefix_tuning: None,
        bottleneck: None,
    }
}

fn engine_config(stage: u8, world: usize) -> EngineConfig {
    zero_support::small_bucket_engine_config(stage, world, GLOBAL_BATCH)
}

/// What one case builds: stage, LoRA or full, tied head, and the weights' origin.
#[derive(Clone)]
struct Case {
    stage: u8,
    lora: bool,
    tied: bool,
    /// A pretrained folder to load instead of the seeded init.
    pretrained: Option<PathBuf>,
}

/// The old way: the whole model, then adapters, then the engine.
fn whole_then_partition(case: &Case, comm: Arc<dyn Communicator>) -> ZeroEngine {
    let mut model = match &case.pretrained {
        Some(dir) => CausalLm::from_pretrained(dir, Device::Cpu, Kind::Float).unwrap(),
        None => {
            CausalLm::from_config(model_config(case.tied), Device::Cpu, Kind::Float, SEED).unwrap()
        }
    };
    let frozen = match case.lora {
        true => apply_lora(&mut model, &lora_config(), SEED).unwrap().frozen,
        false => Default::default(),
    };
    let world = comm.world_size();
    let engine_model = EngineModel {
        head_tied_to_embedding: model.tied_to_embedding(),
        blocks: model.blocks,
        frozen,
    };
    ZeroEngine::new(engine_model, comm, engine_config(case.stage, world)).unwrap()
}

/// The new way: block by block into the engine.
fn streamed(case: &Case, comm: Arc<dyn Communicator>) -> ZeroEngine {
    let lora = lora_config();
    let source = match &case.pretrained {
        Some(dir) => ModelSource::Pretrained(dir),
        None => ModelSource::Init {
            config: model_config(case.tied),
            seed: SEED,
        },
    };
    let world = comm.world_size();
    let built = build_causal_lm_engine(
        source,
        Device::Cpu,
        Kind::Float,
        case.lora.then_some(LoraSpec::Fresh {
            config: &lora,
            seed: SEED,
            base_4bit: None,
        }),
        comm,
        engine_config(case.stage, world),
    )
    .unwrap();
    assert_eq!(built.lora.is_some(), case.lora);
    built.engine
}

fn tokens() -> Tensor {
    let rows = (STEPS * GLOBAL_BATCH) as i64;
    let ids: Vec<i64> = (0..rows * SEQ)
        .map(|i| ((i / SEQ) * 13 + (i % SEQ) * 7 + 5) % VOCAB as i64)
        .collect();
    Tensor::from_slice(&ids).reshape([rows, SEQ])
}

/// Trains STEPS steps on this rank's rows; returns the losses and the final weights.
fn train(engine: &mut ZeroEngine, rank: usize, world: usize) -> (Vec<f64>, Vec<(String, Tensor)>) {
    let data = tokens();
    let per_rank = (GLOBAL_BATCH / world) as i64;
    let mut losses = Vec::new();
    for step in 0..STEPS as i64 {
        let start = step * GLOBAL_BATCH as i64 + rank as i64 * per_rank;
        let ids = data.narrow(0, start, per_rank);
        let ctx = ForwardCtx::causal(&ids).unwrap();
        engine
            .forward_backward(&ids, &ctx, &mut |logits| causal_lm_loss(logits, &ids))
            .unwrap();
        losses.push(engine.step().unwrap().loss);
    }
    (losses, engine.gather_full_weights().unwrap())
}

/// Runs both builds on `world` in-process ranks and asserts they train identically.
fn assert_streamed_equals_whole(case: Case, world: usize) {
    let handles: Vec<_> = LocalCommunicator::world(world)
        .into_iter()
        .map(|comm| {
            let case = case.clone();
            std::thread::spawn(move || {
                let rank = comm.rank();
                let comm: Arc<dyn Communicator> = Arc::new(comm);
                let mut whole = whole_then_partition(&case, comm.clone());
                let mut stream = streamed(&case, comm);
                let expected = train(&mut whole, rank, world);
                let got = train(&mut stream, rank, world);
                (expected, got)
            })
        })
        .collect();
    let label = format!(
        "stage {} lora {} tied {} pretrained {}",
        case.stage,
        case.lora,
        case.tied,
        case.pretrained.is_some()
    );
    for handle in handles {
        let ((expected_losses, expected_weights), (losses, weights)) = handle.join().unwrap();
        assert_eq!(losses, expected_losses, "{label}: losses differ");
        assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{label}");
        assert_eq!(weights.len(), expected_weights.len(), "{label}");
        for ((name, got), (expected_name, expected)) in weights.iter().zip(&expected_weights) {
            assert_eq!(name, expected_name, "{label}");
            assert!(got.equal(expected), "{label}: {name} differs");
        }
    }
}

#[test]
fn streamed_build_trains_like_whole_model_then_partition() {
    tch::set_num_threads(1);
    for (stage, lora, tied) in [
        (3u8, true, true),
        (3, true, false),
        (3, false, false),
        (2, true, false),
        (2, false, true),
    ] {
        let case = Case {
            stage,
            lora,
            tied,
            pretrained: None,
        };
        assert_streamed_equals_whole(case, 2);
    }
}

#[test]
fn streamed_build_from_a_pretrained_folder_equals_from_pretrained() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let model = CausalLm::from_config(model_config(false), Device::Cpu, Kind::Float, 77).unwrap();
    // Sharded, to read from several mapped files.
    model
        .save_pretrained(dir.path(), 20_000, Kind::Float)
        .unwrap();
    for (stage, lora) in [(3u8, true), (3, false)] {
        let case = Case {
            stage,
            lora,
            tied: false,
            pretrained: Some(dir.path().to_path_buf()),
        };
        assert_streamed_equals_whole(case, 2);
    }
}

#[test]
fn ranks_that_built_different_weights_are_refused() {
    let handles: Vec<_> = LocalCommunicator::world(2)
        .into_iter()
        .map(|comm| {
            std::thread::spawn(move || {
                let rank = comm.rank();
                let comm: Arc<dyn Communicator> = Arc::new(comm);
                let built = build_causal_lm_engine(
                    ModelSource::Init {
                        config: model_config(false),
                        seed: SEED + rank as u64,
                    },
                    Device::Cpu,
                    Kind::Float,
                    None,
                    comm,
                    engine_config(3, 2),
                );
                built.err().map(|e| e.to_string())
            })
        })
        .collect();
    let errors: Vec<Option<String>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        errors[0].is_none(),
        "rank 0 is the reference: {:?}",
        errors[0]
    );
    let message = errors[1].as_deref().unwrap_or("rank 1 was not refused");
    assert!(
        message.contains("rank 1 built different initial weights than rank 0")
            && message.contains("block 0"),
        "{message}"
    );
}

/// The final export streamed block by block equals gathering everything and saving it:
/// same names, values and dtype; a single file or shards + index as the size asks.
#[test]
fn streamed_final_export_equals_gather_then_save() {
    tch::set_num_threads(1);
    for (stage, world, max_shard_bytes, dtype) in [
        (3u8, 2usize, 1u64 << 30, Kind::Float),
        (3, 2, 30_000, Kind::BFloat16),
        (2, 2, 30_000, Kind::Float),
        (0, 1, 1 << 30, Kind::Half),
    ] {
        let root = tempfile::tempdir().unwrap();
        let (streamed_dir, reference_dir) = (root.path().join("s"), root.path().join("r"));
        let handles: Vec<_> = LocalCommunicator::world(world)
            .into_iter()
            .map(|comm| {
                let (streamed_dir, reference_dir) = (streamed_dir.clone(), reference_dir.clone());
                std::thread::spawn(move || {
                    let rank = comm.rank();
                    let comm: Arc<dyn Communicator> = Arc::new(comm);
                    let case = Case {
                        stage,
                        lora: false,
                        tied: false,
                        pretrained: None,
                    };
                    let mut engine = streamed(&case, comm);
                    train(&mut engine, rank, world);
                    let writer = rank == 0;
                    write_final_weights(&mut engine, &streamed_dir, dtype, max_shard_bytes, writer)
                        .unwrap();
                    let weights = engine.gather_full_weights().unwrap();
                    if writer {
                        let named: Vec<(String, Tensor)> = weights
                            .into_iter()
                            .map(|(n, t)| (n, t.to_kind(dtype)))
                            .collect();
                        save_safetensors_sharded(&named, &reference_dir, max_shard_bytes).unwrap();
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        let label = format!("stage {stage} world {world} shard {max_shard_bytes} {dtype:?}");
        let sharded = max_shard_bytes < 1 << 20;
        assert_eq!(streamed_dir.join(INDEX_FILE).is_file(), sharded, "{label}");
        assert_eq!(
            streamed_dir.join(SINGLE_FILE).is_file(),
            !sharded,
            "{label}"
        );
        let got = SafetensorsFolder::open(&streamed_dir).unwrap();
        let want = SafetensorsFolder::open(&reference_dir).unwrap();
        let names: Vec<&str> = got.names().collect();
        assert_eq!(names, want.names().collect::<Vec<_>>(), "{label}");
        assert!(names.len() > 10, "{label}");
        for name in names {
            let (a, b) = (got.load(name).unwrap(), want.load(name).unwrap());
            assert_eq!(a.kind(), dtype, "{label}: {name}");
            assert!(a.equal(&b), "{label}: {name} differs");
        }
    }
}
