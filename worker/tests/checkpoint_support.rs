//! Shared harness of the checkpoint tests: a tiny real Qwen2 (`CausalLm::from_config`)
//! trained by the real ZeRO engine on in-process ranks (threads joined by the
//! `LocalCommunicator`), with saves at chosen steps and an optional resume from a
//! checkpoint. Step s always consumes rows [s*G, (s+1)*G) of one token table, so every
//! topology sees the same global batches and runs are comparable step by step.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rsdeep_worker::checkpoint::{
    SaveRequest, TrainerState, load_checkpoint, save_checkpoint, save_checkpoint_async,
};
use rsdeep_worker::comm::Communicator;
use rsdeep_worker::model::{CausalLm, ForwardCtx, ModelConfig, ModelType, causal_lm_loss};
use rsdeep_worker::zero::{EngineConfig, EngineModel, LocalCommunicator, ZeroEngine};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

pub const GLOBAL_BATCH: usize = 8;
pub const SEQ: i64 = 8;

pub fn model_config() -> ModelConfig {
    let mut config = ModelConfig::new(ModelType::Qwen2, 64, 32, 48, 2, 4, 2);
    config.initializer_range = 0.05;
    config
}

/// Where and how one run trains.
#[derive(Clone)]
pub struct Run {
    pub world: usize,
    pub stage: u8,
    /// Train steps [start, end): start comes from the checkpoint when resuming.
    pub end_step: u64,
    pub resume_from: Option<PathBuf>,
    pub output_dir: PathBuf,
    /// Save after these global steps (a step equal to the resumed one saves right after
    /// loading, before training).
    pub save_at: Vec<u64>,
    pub save_total_limit: Option<usize>,
    pub write_model_weights: bool,
    pub max_shard_bytes: u64,
    /// Save asynchronously and finish after the next step (or at the end).
    pub async_save: bool,
}

impl Run {
    pub fn new(world: usize, stage: u8, end_step: u64, output_dir: &Path) -> Self {
        Run {
            world,
            stage,
            end_step,
            resume_from: None,
            output_dir: output_dir.to_path_buf(),
            save_at: Vec::new(),
            save_total_limit: None,
            write_model_weights: true,
            max_shard_bytes: 1 << 30,
            async_save: false,
        }
    }
}

/// What rank 0 saw.
pub struct Outcome {
    /// (global step after the update, loss)
    pub losses: Vec<(u64, f64)>,
    /// Full fp32 weights at the end, by name.
    pub weights: Vec<(String, Tensor)>,
    /// Per-rank `per_rank_extra` values returned by the resume (rank order).
    pub resumed_extra: Vec<serde_json::Value>,
    pub resumed_step: u64,
    pub trainer_state: Option<TrainerState>,
}

pub fn engine_config(stage: u8, world: usize) -> EngineConfig {
    let mut config = EngineConfig {
        stage: stage.try_into().expect("a ZeRO stage"),
        gradient_accumulation_steps: 1,
        train_micro_batch_size_per_gpu: GLOBAL_BATCH / world,
        train_batch_size: GLOBAL_BATCH,
        gradient_clipping: 1.0,
        ..EngineConfig::default()
    };
    config.optimizer.lr = 5e-3;
    config.optimizer.weight_decay = 0.01;
    config
}

/// A fixed (rows, SEQ) table of token ids below 64, drawn from its own generator (not
/// libtorch's global one, which tests of other areas draw from concurrently).
pub fn tokens(rows: usize) -> Tensor {
    let mut rng = StdRng::seed_from_u64(11);
    let ids: Vec<i64> = (0..rows as i64 * SEQ)
        .map(|_| rng.random_range(0..64))
        .collect();
    Tensor::from_slice(&ids).reshape([rows as i64, SEQ])
}

/// Trains `run` on `run.world` thread ranks and returns rank 0's outcome.
pub fn train(run: &Run) -> Outcome {
    tch::set_num_threads(1);
    // `from_config` seeds and draws under its own lock: every rank gets the same init.
    let table = tokens(GLOBAL_BATCH * run.end_step as usize);
    let models: Vec<CausalLm> = (0..run.world)
        .map(|_| CausalLm::from_config(model_config(), Device::Cpu, Kind::Float, 3).unwrap())
        .collect();
    let handles: Vec<_> = LocalCommunicator::world(run.world)
        .into_iter()
        .zip(models)
        .map(|(comm, model)| {
            let run = run.clone();
            let table = table.copy();
            std::thread::spawn(move || train_rank(&run, model, &table, Arc::new(comm)))
        })
        .collect();
    let mut outcomes: Vec<Outcome> = handles
        .into_iter()
        .map(|h| h.join().expect("rank panicked"))
        .collect();
    let extras: Vec<serde_json::Value> = outcomes
        .iter()
        .map(|o| o.resumed_extra[0].clone())
        .collect();
    let mut first = outcomes.remove(0);
    first.resumed_extra = extras;
    first
}

fn train_rank(run: &Run, model: CausalLm, table: &Tensor, comm: Arc<LocalCommunicator>) -> Outcome {
    let rank = comm.rank();
    let engine_model = EngineModel {
        head_tied_to_embedding: model.tied_to_embedding(),
        blocks: model.blocks,
        frozen: Default::default(),
    };
    let mut engine = ZeroEngine::new(
        engine_model,
        comm.clone(),
        engine_config(run.stage, run.world),
    )
    .unwrap();
    let mut outcome = Outcome {
        losses: vec![],
        weights: vec![],
        resumed_extra: vec![serde_json::Value::Null],
        resumed_step: 0,
        trainer_state: None,
    };
    let mut state = TrainerState {
        max_steps: run.end_step,
        train_batch_size: Some(GLOBAL_BATCH as u64),
        ..Default::default()
    };
    let mut step = 0u64;
    if let Some(dir) = &run.resume_from {
        let resumed = load_checkpoint(dir, &mut engine, rank, run.world).unwrap();
        step = resumed.global_step;
        outcome.resumed_extra = vec![resumed.per_rank_extra];
        outcome.resumed_step = step;
        state = resumed.trainer_state.clone();
        outcome.trainer_state = Some(resumed.trainer_state);
    }
    let config_json = model_config().to_json_string().unwrap();
    let mut pending = None;
    let mbs = (GLOBAL_BATCH / run.world) as i64;
    loop {
        if run.save_at.contains(&step) && step != 0 {
            let req = SaveRequest {
                output_dir: &run.output_dir,
                step,
                engine: &mut engine,
                comm: &*comm,
                model_config_json: &config_json,
                tokenizer: None,
                trainer_state: &state,
                per_rank_extra: serde_json::json!({"rank": rank, "world": run.world, "step": step}),
                save_total_limit: run.save_total_limit,
                max_shard_bytes: run.max_shard_bytes,
                write_model_weights: run.write_model_weights,
                weights_dtype: Kind::Float,
                run: None,
            };
            if run.async_save {
                pending = Some(save_checkpoint_async(req).unwrap());
            } else {
                save_checkpoint(req).unwrap();
            }
        }
        if step >= run.end_step {
            break;
        }
        let row = step as i64 * GLOBAL_BATCH as i64 + rank as i64 * mbs;
        let ids = table.narrow(0, row, mbs); // (mbs, T)
        let ctx = ForwardCtx::causal(&ids).unwrap();
        engine
            .forward_backward(&ids, &ctx, &mut |logits| causal_lm_loss(logits, &ids))
            .unwrap();
        if let Some(p) = &pending {
            p.wait_for_snapshot().unwrap();
        }
        let report = engine.step().unwrap();
        step += 1;
        outcome.losses.push((step, report.loss));
        state.global_step = step;
        state
            .log_history
            .push(serde_json::json!({"loss": report.loss, "step": step}));
        if let Some(p) = pending.take() {
            p.finish(&*comm).unwrap();
        }
    }
    if let Some(p) = pending.take() {
        p.finish(&*comm).unwrap();
    }
    outcome.weights = engine.gather_full_weights().unwrap();
    outcome
}

/// Bit-exact equality of two named tensor lists.
pub fn assert_bit_identical(a: &[(String, Tensor)], b: &[(String, Tensor)], label: &str) {
    assert_eq!(a.len(), b.len(), "{label}: tensor count");
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb, "{label}: names");
        assert!(
            ta.equal(tb),
            "{label}: {na} differs (max |diff| {})",
            (ta - tb).abs().max().double_value(&[])
        );
    }
}

/// Losses agree within `tol` relative.
pub fn assert_losses_close(got: &[(u64, f64)], want: &[(u64, f64)], tol: f64, label: &str) {
    assert_eq!(got.len(), want.len(), "{label}: number of steps");
    for ((sg, lg), (sw, lw)) in got.iter().zip(want) {
        assert_eq!(sg, sw, "{label}: steps");
        assert!(
            (lg - lw).abs() <= tol * lw.abs().max(1e-12),
            "{label}: step {sg}: loss {lg} vs {lw}"
        );
    }
}
