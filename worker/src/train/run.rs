//! The training loop proper: model + engine + data from the resolved `TrainConfig`, the
//! step loop with gradient accumulation, logging, evaluation, periodic checkpoints and the
//! final HF-loadable output. Determinism contract: libtorch's RNG is reseeded at every
//! optimizer step from (seed, step, rank), and the data order comes from the sampler, so a
//! run depends only on its config and a resumed run continues exactly.

use super::data_source::{BatchStream, DataPlan, Examples};
use super::outputs;
use super::progress::{ProgressReporter, StepMetrics};
use crate::checkpoint::{self, PendingSave, RunRecord, SaveRequest, TrainerState};
use crate::comm::{Communicator, ReduceOp};
use crate::lora::{LoraConfig, LoraInfo, lora_state, save_adapter};
use crate::model::{ForwardCtx, ModelConfig, causal_lm_loss};
use crate::tokenizer::Tokenizer;
use crate::zero::{EngineConfig, LoraSpec, ModelSource, ZeroEngine, build_causal_lm_engine};
use crate::{Error, Result};
use rsdeep_contract::config::{IntervalStrategy, ResumeFrom, Task, TrainConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// This rank's place in the world, as the worker binary learned it from the rendezvous.
pub struct TrainWorld {
    pub comm: Arc<dyn Communicator>,
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub device: Device,
    /// The run's id (the launcher's job id, the same across restarts), recorded in every
    /// checkpoint so that a restart resumes only this run's checkpoints.
    pub run_id: String,
}

/// What the loop reports after every optimizer step (for heartbeats).
#[derive(Debug, Clone, Copy)]
pub struct StepProgress {
    pub step: u64,
    pub loss: f64,
    pub tokens_per_second: f64,
}

/// The outcome of a finished run.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    pub steps: u64,
    pub output_dir: PathBuf,
}

/// Runs pretraining or SFT to the end (resuming first when asked). Every rank calls it
/// with the same config.
pub fn train(
    mut config: TrainConfig,
    world: TrainWorld,
    on_step: &mut dyn FnMut(StepProgress),
) -> Result<TrainSummary> {
    let args = config.args.clone();
    let rank = world.rank;
    let tokenizer = load_tokenizer(&config)?;
    let kind = compute_kind(&config);
    let model_config = load_model_config(&config)?;
    check_vocab(&model_config, &tokenizer)?;
    let plan = DataPlan {
        config: &config,
        tokenizer: &tokenizer,
        max_position_embeddings: model_config.max_position_embeddings,
        is_builder: world.local_rank == 0,
    };
    let train_data = plan.load(&args.train_files)?;
    let eval_data = match args.eval_files.is_empty() {
        true => None,
        false => Some(plan.load(&args.eval_files)?),
    };
    let micro_batch = config.batch.train_micro_batch_size_per_gpu as usize;
    let grad_accum = config.batch.gradient_accumulation_steps as usize;
    let data_seed = args.data_seed.unwrap_or(args.seed);
    let mut stream = BatchStream::new(
        train_data.len(),
        world.world_size,
        rank,
        data_seed,
        micro_batch,
    )?;
    let updates_per_epoch = (stream.micro_batches_per_epoch() / grad_accum).max(1) as u64;
    let total_steps = args.total_training_steps(updates_per_epoch);
    let block_size = plan.block_size();
    config
        .fill_model_autos(model_config.hidden_size, total_steps)
        .map_err(|e| Error::Config(e.to_string()))?;
    let engine_config = EngineConfig::from_train_config(&config, total_steps, world.device)?;
    // The model is built block by block straight into the engine (with its adapters for
    // LoRA): under ZeRO-3 no rank ever holds the whole model.
    let lora_config = match args.task {
        Task::Lora => Some(lora_config_of(&config)),
        _ => None,
    };
    let built = build_causal_lm_engine(
        model_source(&config, model_config.clone())?,
        world.device,
        kind,
        lora_config.as_ref().map(|c| LoraSpec {
            config: c,
            seed: args.seed,
        }),
        world.comm.clone(),
        engine_config,
    )?;
    let mut engine = built.engine;
    let lora = match (lora_config, built.lora) {
        (Some(adapters), Some(info)) => Some(lora_run(adapters, info, &args, rank)),
        _ => None,
    };
    let flops_per_token = flops_per_token(built.num_parameters, &model_config, block_size);
    let output_dir = PathBuf::from(&args.output_dir);
    let mut state = TrainerState {
        max_steps: total_steps,
        logging_steps: args.logging_steps,
        eval_steps: args.eval_interval(),
        save_steps: args.save_steps,
        train_batch_size: Some(config.batch.train_micro_batch_size_per_gpu),
        num_train_epochs: args.num_train_epochs.ceil() as u64,
        is_world_process_zero: rank == 0,
        is_local_process_zero: world.local_rank == 0,
        ..TrainerState::default()
    };
    let mut run = RunRecord::new(&world.run_id, exact_resume_settings(&config));
    if let Some(resume) = &args.resume_from_checkpoint {
        let _phase = super::phase::enter(super::phase::PhaseKind::Load);
        let saved_run = resume_from(
            resume,
            &output_dir,
            &mut engine,
            &world,
            &mut stream,
            &mut state,
            grad_accum,
        )?;
        if let Some(saved) = saved_run {
            run = continue_run(run, &saved, rank);
        }
    }
    let start_step = state.global_step;
    let mut reporter = if rank == 0 {
        let tb_dir = args.report_to_tensorboard().then(|| {
            args.logging_dir
                .clone()
                .map(PathBuf::from)
                .unwrap_or_else(|| output_dir.join("runs"))
        });
        Some(ProgressReporter::open(
            &output_dir,
            total_steps,
            tb_dir.as_deref(),
            start_step,
        )?)
    } else {
        None
    };
    if rank == 0 {
        announce(
            &config,
            &model_config,
            &train_data,
            total_steps,
            world.world_size,
        );
    }
    let saver = Saver {
        config: &config,
        model_config_json: model_config.to_json_string()?,
        tokenizer: &tokenizer,
        kind,
        output_dir: &output_dir,
        lora: lora.as_ref(),
        run: &run,
    };
    let (mut first_loss, mut last_loss, mut final_eval) = (None, None, None);
    let mut window = LogWindow::default();
    let mut pending_save: Option<PendingSave> = None;
    let mut step = start_step;
    while step < total_steps {
        super::phase::begin_step(step + 1);
        tch::manual_seed(step_seed(args.seed, step, rank));
        let started = Instant::now();
        let mut tokens = 0i64;
        for _ in 0..grad_accum {
            let indices = stream.next_indices();
            let batch = train_data.batch(&indices, world.device)?;
            tokens += batch.input_ids.numel() as i64;
            let ctx = ForwardCtx::build(
                &batch.input_ids,
                batch.attention_mask.as_ref(),
                batch.segment_ids.as_ref(),
            )?;
            // Fused head + loss when the head allows it (no (B*T, V) logits), else generic.
            engine.forward_backward_causal_lm(&batch.input_ids, &ctx, &batch.labels)?;
        }
        if let Some(pending) = &pending_save {
            // An asynchronous save copies the state this step changes in the background.
            pending.wait_for_snapshot()?;
        }
        let report = engine.step()?;
        step += 1;
        state.global_step = step;
        state.epoch = Some(stream.epoch_progress());
        state.num_input_tokens_seen += (tokens * world.world_size as i64) as u64;
        let seconds = started.elapsed().as_secs_f64();
        let tokens_per_second = (tokens * world.world_size as i64) as f64 / seconds.max(1e-9);
        first_loss.get_or_insert(report.loss);
        last_loss = Some(report.loss);
        window.add(report.loss, report.grad_norm, tokens_per_second);
        on_step(StepProgress {
            step,
            loss: report.loss,
            tokens_per_second,
        });
        let log_now = args.logging_strategy == IntervalStrategy::Steps
            && (step.is_multiple_of(args.logging_steps.max(1))
                || step == total_steps
                || (step == 1 && args.logging_first_step));
        if log_now {
            let (loss, grad_norm, tps) = window.take();
            let metrics = StepMetrics {
                step,
                epoch: stream.epoch_progress(),
                loss,
                learning_rate: report.lr,
                grad_norm,
                loss_scale: report.loss_scale,
                tokens_per_second: tps,
                mfu: mfu_percent(flops_per_token, tps, world.device, world.world_size),
                elapsed_s: reporter.as_ref().map_or(0.0, |r| r.elapsed_s()),
                eta_s: reporter.as_ref().map_or(0.0, |r| r.eta_s(start_step, step)),
            };
            state
                .log_history
                .push(serde_json::to_value(&metrics).unwrap_or_default());
            if let Some(rep) = reporter.as_mut() {
                rep.log(metrics)?;
            }
        }
        let eval_now = args.eval_strategy == IntervalStrategy::Steps
            && step.is_multiple_of(args.eval_interval().max(1));
        if let (true, Some(eval)) = (eval_now || step == total_steps, eval_data.as_ref()) {
            let _eval_mode = lora.as_ref().map(|l| EvalMode::enter(&l.info));
            let _phase = super::phase::enter(super::phase::PhaseKind::Eval);
            let loss = evaluate(&mut engine, eval, &world, micro_batch)?;
            final_eval = Some(loss);
            state.log_history.push(
                serde_json::json!({"step": step, "eval_loss": loss, "eval_perplexity": loss.exp()}),
            );
            if let Some(rep) = reporter.as_mut() {
                rep.log_eval(step, loss)?;
            }
        }
        let save_now = args.save_strategy == IntervalStrategy::Steps
            && (step.is_multiple_of(args.save_steps.max(1)) || step == total_steps);
        if save_now {
            let _phase = super::phase::enter(super::phase::PhaseKind::Save);
            if let Some(previous) = pending_save.take() {
                saver.finish(previous, world.comm.as_ref())?;
            }
            let extra = serde_json::json!({
                "seed": args.seed,
                "step": step,
                "rank": rank,
                "world_size": world.world_size,
                "sampler": stream.state(),
            });
            pending_save = saver.save(&mut engine, world.comm.as_ref(), &state, extra)?;
        }
    }
    let _phase = super::phase::enter(super::phase::PhaseKind::FinalWrite);
    if let Some(previous) = pending_save.take() {
        saver.finish(previous, world.comm.as_ref())?;
    }
    if let Some(rep) = reporter.as_ref() {
        rep.finish_line();
    }
    if let Some(lora) = lora.as_ref() {
        // The adapters only: the frozen base is not part of a LoRA run's output.
        let weights = engine.gather_trainable_weights()?;
        lora.save(&output_dir, &weights, rank == 0)?;
        if rank == 0 {
            tokenizer.save(&output_dir)?;
        }
    } else {
        // Streamed block by block (rank 0 writes): no rank holds the whole model again.
        let max_shard_bytes = outputs::parse_size(&args.max_shard_size)?;
        checkpoint::export::write_final_weights(
            &mut engine,
            &output_dir,
            kind,
            max_shard_bytes,
            rank == 0,
        )?;
        if rank == 0 {
            write_model_config(&output_dir, &model_config, kind)?;
            tokenizer.save(&output_dir)?;
        }
    }
    if rank == 0 {
        if let Some(rep) = reporter.as_ref() {
            outputs::write_loss_curve(&output_dir, rep.history(), &state.log_history)?;
        }
        outputs::write_trainer_state(&output_dir, &state)?;
    }
    world.comm.barrier()?;
    Ok(TrainSummary {
        first_loss,
        last_loss,
        final_eval_loss: final_eval,
        steps: step,
        output_dir,
    })
}

/// Restores engine, data position and trainer state from the checkpoint `resume` names;
/// returns the record of the run that wrote it (absent in older checkpoints).
fn resume_from(
    resume: &ResumeFrom,
    output_dir: &Path,
    engine: &mut ZeroEngine,
    world: &TrainWorld,
    stream: &mut BatchStream,
    state: &mut TrainerState,
    grad_accum: usize,
) -> Result<Option<RunRecord>> {
    let spec = match resume {
        ResumeFrom::Latest(false) => return Ok(None),
        ResumeFrom::Latest(true) => "latest".to_string(),
        ResumeFrom::Path(path) => path.clone(),
    };
    let Some(dir) = resume_dir(output_dir, &spec, world.rank)? else {
        return Ok(None);
    };
    let started = Instant::now();
    let resumed = checkpoint::load_checkpoint(&dir, engine, world.rank, world.world_size)?;
    let load_seconds = started.elapsed().as_secs_f64();
    // The saved sampler position is this rank's only when the world size is unchanged;
    // otherwise every rank recomputes it from the global step.
    let extra = &resumed.per_rank_extra;
    let same_world = extra.get("world_size").and_then(|v| v.as_u64())
        == Some(world.world_size as u64)
        && extra.get("rank").and_then(|v| v.as_u64()) == Some(world.rank as u64);
    let saved_sampler = extra
        .get("sampler")
        .and_then(|v| serde_json::from_value(v.clone()).ok());
    match saved_sampler {
        Some(sampler) if same_world => stream.restore(sampler)?,
        _ => stream.skip_micro_batches(resumed.global_step * grad_accum as u64)?,
    }
    let max_steps = state.max_steps;
    *state = resumed.trainer_state;
    state.max_steps = max_steps;
    state.global_step = resumed.global_step;
    if world.rank == 0 {
        eprintln!(
            "[rank 0] resumed from {} (loaded in {load_seconds:.2} s) at step {}",
            dir.display(),
            resumed.global_step
        );
    }
    Ok(resumed.run)
}

/// `run` continuing `saved`'s lineage; rank 0 names the settings that changed since.
fn continue_run(run: RunRecord, saved: &RunRecord, rank: usize) -> RunRecord {
    let changed = run.changed_settings(saved);
    if rank == 0 && !changed.is_empty() {
        eprintln!(
            "[rank 0] note: resuming run {} with settings changed since its checkpoint ({}): the result will differ from an uninterrupted run",
            saved.run_id,
            changed.join("; ")
        );
    }
    run.continuing(saved)
}

/// The settings an exact resume depends on (the world size and ZeRO stage are not among
/// them: checkpoints reshard), recorded in every checkpoint's manifest.
fn exact_resume_settings(config: &TrainConfig) -> serde_json::Map<String, serde_json::Value> {
    const KEYS: [&str; 27] = [
        "task",
        "model_name_or_path",
        "config_name",
        "train_files",
        "text_field",
        "block_size",
        "max_seq_length",
        "packing",
        "learning_rate",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "lr_scheduler_type",
        "warmup_steps",
        "warmup_ratio",
        "max_steps",
        "num_train_epochs",
        "seed",
        "data_seed",
        "bf16",
        "fp16",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
    ];
    let args = serde_json::to_value(&config.args).unwrap_or_default();
    let mut settings: serde_json::Map<String, serde_json::Value> = KEYS
        .iter()
        .filter_map(|key| Some((key.to_string(), args.get(*key)?.clone())))
        .collect();
    settings.insert(
        "global_batch_size".into(),
        config.batch.train_batch_size.into(),
    );
    settings
}

/// The checkpoint `spec` names. `"auto"` (for requeued SLURM jobs) is what `latest` picks
/// when `output_dir` holds a complete checkpoint, else `None`: the first run starts fresh.
fn resume_dir(output_dir: &Path, spec: &str, rank: usize) -> Result<Option<PathBuf>> {
    if !spec.trim().eq_ignore_ascii_case("auto") {
        return checkpoint::resolve_resume_path(output_dir, spec).map(Some);
    }
    let any_complete =
        output_dir.is_dir() && !checkpoint::resume::complete_checkpoints(output_dir)?.is_empty();
    if any_complete {
        // The same choice as `latest`: follow `output_dir/latest` within its run.
        return checkpoint::resolve_resume_path(output_dir, "latest").map(Some);
    }
    if rank == 0 {
        eprintln!(
            "[rank 0] resume_from_checkpoint \"auto\": no complete checkpoint in {} yet, starting fresh",
            output_dir.display()
        );
    }
    Ok(None)
}

/// The parts of a checkpoint save that stay the same for the whole run.
struct Saver<'a> {
    config: &'a TrainConfig,
    model_config_json: String,
    tokenizer: &'a Tokenizer,
    kind: Kind,
    output_dir: &'a Path,
    lora: Option<&'a LoraRun>,
    run: &'a RunRecord,
}

impl Saver<'_> {
    /// Saves `checkpoint-{global_step}`; with `async_save` returns the save still being
    /// written (finish it with `finish` before the next save or the end).
    fn save(
        &self,
        engine: &mut ZeroEngine,
        comm: &dyn Communicator,
        state: &TrainerState,
        per_rank_extra: serde_json::Value,
    ) -> Result<Option<PendingSave>> {
        let args = &self.config.args;
        let zero = &self.config.deepspeed.zero_optimization;
        let request = SaveRequest {
            output_dir: self.output_dir,
            step: state.global_step,
            engine,
            comm,
            model_config_json: &self.model_config_json,
            tokenizer: Some(self.tokenizer),
            trainer_state: state,
            per_rank_extra,
            save_total_limit: args.save_total_limit.map(|n| n as usize),
            max_shard_bytes: outputs::parse_size(&args.max_shard_size)?,
            // LoRA checkpoints hold the adapter (PEFT's layout), not the frozen base.
            write_model_weights: self.lora.is_none()
                && (!zero.stage.partitions_parameters()
                    || zero.gather_16bit_weights_on_model_save()),
            weights_dtype: self.kind,
            run: Some(self.run),
        };
        let (step, rank) = (state.global_step, comm.rank());
        let started = Instant::now();
        if args.async_save && self.lora.is_none() {
            let pending = checkpoint::save_checkpoint_async(request)?;
            if rank == 0 {
                let stall = started.elapsed().as_secs_f64();
                eprintln!("checkpoint-{step}: async save started, training held {stall:.2} s");
            }
            return Ok(Some(pending));
        }
        let dir = checkpoint::save_checkpoint(request)?;
        if rank == 0 {
            report_save(&dir, started.elapsed().as_secs_f64());
        }
        if let Some(lora) = self.lora {
            // Collective gather on every rank; rank 0 writes the adapter files.
            lora.save(&dir, &engine.gather_trainable_weights()?, comm.rank() == 0)?;
        }
        Ok(None)
    }

    fn finish(&self, pending: PendingSave, comm: &dyn Communicator) -> Result<()> {
        let started = Instant::now();
        let dir = pending.finish(comm)?;
        if comm.rank() == 0 {
            let wait = started.elapsed().as_secs_f64();
            eprintln!(
                "{}: async save finished, training waited {wait:.2} s for it",
                dir.display()
            );
        }
        Ok(())
    }
}

/// Rank 0's line after a synchronous save: the checkpoint's size (from its manifest, all
/// ranks' files), time and rate.
fn report_save(dir: &Path, seconds: f64) {
    let bytes: u64 = checkpoint::Manifest::read(dir)
        .map(|m| m.files.values().map(|f| f.size).sum())
        .unwrap_or(0);
    let gigabytes = bytes as f64 / 1e9;
    eprintln!(
        "{}: saved {gigabytes:.3} GB in {seconds:.2} s ({:.2} GB/s)",
        dir.display(),
        gigabytes / seconds.max(1e-9)
    );
}

/// A LoRA run's adapter settings and what `apply_lora` injected.
struct LoraRun {
    config: LoraConfig,
    info: LoraInfo,
    base_model: String,
}

impl LoraRun {
    /// Writes `adapter_config.json` + `adapter_model.safetensors` (PEFT's key names) into
    /// `dir` from gathered weights (rank 0 only writes).
    fn save(&self, dir: &Path, weights: &[(String, Tensor)], writer: bool) -> Result<()> {
        if writer {
            save_adapter(dir, &self.config, &self.base_model, &lora_state(weights))?;
        }
        Ok(())
    }
}

/// train.json's LoRA settings (`task: "lora"`).
fn lora_config_of(config: &TrainConfig) -> LoraConfig {
    let args = &config.args;
    LoraConfig {
        r: args.lora_r,
        alpha: args.lora_alpha,
        dropout: args.lora_dropout,
        target_modules: args.lora_target_modules.clone(),
        use_rslora: false,
    }
}

/// The LoRA run's record of what was injected; prints PEFT's trainable-parameters line.
fn lora_run(
    config: LoraConfig,
    info: LoraInfo,
    args: &rsdeep_contract::config::TrainingArgs,
    rank: usize,
) -> LoraRun {
    if rank == 0 {
        eprintln!("{}", info.summary);
    }
    let base_model = args
        .model_name_or_path
        .clone()
        .or(args.config_name.clone())
        .unwrap_or_default();
    LoraRun {
        config,
        info,
        base_model,
    }
}

/// LoRA dropout off while it lives (PEFT's `model.eval()`), back on when dropped.
struct EvalMode(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl EvalMode {
    fn enter(info: &LoraInfo) -> EvalMode {
        info.dropout_switch
            .store(false, std::sync::atomic::Ordering::SeqCst);
        EvalMode(info.dropout_switch.clone())
    }
}

impl Drop for EvalMode {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Mean eval loss over the eval split (token-weighted, over all ranks). Every rank calls
/// it (the forward is a collective under ZeRO-3).
fn evaluate(
    engine: &mut ZeroEngine,
    eval: &Examples,
    world: &TrainWorld,
    micro_batch: usize,
) -> Result<f64> {
    let _span = tracing::info_span!("evaluate", rank = world.rank).entered();
    let per_rank = eval.len().div_ceil(world.world_size);
    let (mut loss_sum, mut count) = (0f64, 0f64);
    let mut start = 0;
    while start < per_rank {
        let end = (start + micro_batch).min(per_rank);
        // Rank r takes r, r+W, ...; indices past the end wrap (every rank runs the same
        // number of forwards, as ZeRO-3 requires).
        let indices: Vec<usize> = (start..end)
            .map(|i| (i * world.world_size + world.rank) % eval.len())
            .collect();
        let batch = eval.batch(&indices, world.device)?;
        let ctx = ForwardCtx::build(
            &batch.input_ids,
            batch.attention_mask.as_ref(),
            batch.segment_ids.as_ref(),
        )?;
        let logits = engine.forward_eval(&batch.input_ids, &ctx)?;
        let tokens = batch
            .labels
            .f_narrow(1, 1, batch.labels.size()[1] - 1)?
            .f_ne(-100)?
            .f_sum(Kind::Float)?
            .f_double_value(&[])?;
        if tokens > 0.0 {
            loss_sum += causal_lm_loss(&logits, &batch.labels)?.f_double_value(&[])? * tokens;
            count += tokens;
        }
        start = end;
    }
    let totals = Tensor::from_slice(&[loss_sum, count]);
    world.comm.all_reduce(&totals, ReduceOp::Sum)?.wait()?;
    let (sum, n) = (totals.f_double_value(&[0])?, totals.f_double_value(&[1])?);
    if n == 0.0 {
        return Err(Error::Data("the eval split has no tokens to score".into()));
    }
    Ok(sum / n)
}

/// Running means between two log lines.
#[derive(Default)]
struct LogWindow {
    loss: f64,
    grad_norm: f64,
    tokens_per_second: f64,
    count: f64,
}

impl LogWindow {
    fn add(&mut self, loss: f64, grad_norm: f64, tps: f64) {
        self.loss += loss;
        self.grad_norm += grad_norm;
        self.tokens_per_second += tps;
        self.count += 1.0;
    }

    fn take(&mut self) -> (f64, f64, f64) {
        let n = self.count.max(1.0);
        let means = (
            self.loss / n,
            self.grad_norm / n,
            self.tokens_per_second / n,
        );
        *self = LogWindow::default();
        means
    }
}

/// The seed libtorch gets at optimizer step `step` on `rank` (splitmix-style mix).
pub fn step_seed(seed: u64, step: u64, rank: usize) -> i64 {
    let mut z = seed
        ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (rank as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

fn compute_kind(config: &TrainConfig) -> Kind {
    match config.precision() {
        rsdeep_contract::config::Precision::Bf16 => Kind::BFloat16,
        rsdeep_contract::config::Precision::Fp16 => Kind::Half,
        rsdeep_contract::config::Precision::Fp32 => Kind::Float,
    }
}

fn load_tokenizer(config: &TrainConfig) -> Result<Tokenizer> {
    let path = config.args.tokenizer_path().ok_or_else(|| {
        Error::Config(
            "no tokenizer: set tokenizer_name (or model_name_or_path) in train.json".into(),
        )
    })?;
    Tokenizer::from_dir(path)
}

/// The model's config: `model_name_or_path/config.json`, or `config_name` (a
/// config.json file or a folder holding one).
fn load_model_config(config: &TrainConfig) -> Result<ModelConfig> {
    let args = &config.args;
    if let Some(dir) = &args.model_name_or_path {
        return ModelConfig::from_file(&Path::new(dir).join("config.json"));
    }
    let name = args.config_name.as_ref().ok_or_else(|| {
        Error::Config("set model_name_or_path (a pretrained folder) or config_name (a config.json) in train.json".into())
    })?;
    let path = Path::new(name);
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    ModelConfig::from_file(&file)
}

/// Where the weights come from: the pretrained folder, else a seeded init of `model`.
fn model_source(config: &TrainConfig, model: ModelConfig) -> Result<ModelSource<'_>> {
    Ok(match &config.args.model_name_or_path {
        Some(dir) => ModelSource::Pretrained(Path::new(dir)),
        None => ModelSource::Init {
            config: model,
            seed: config.args.seed,
        },
    })
}

/// `dir/config.json` declaring the saved weights' dtype.
fn write_model_config(dir: &Path, model_config: &ModelConfig, kind: Kind) -> Result<()> {
    let mut config = model_config.clone();
    config.set_declared_kind(kind)?;
    let path = dir.join("config.json");
    std::fs::write(&path, config.to_json_string()?)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn check_vocab(config: &ModelConfig, tokenizer: &Tokenizer) -> Result<()> {
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(Error::Config(format!(
            "the tokenizer has {} tokens but the model's vocab_size is {}: use a model config with vocab_size >= {}",
            tokenizer.vocab_size(),
            config.vocab_size,
            tokenizer.vocab_size()
        )));
    }
    Ok(())
}

/// 6·N plus attention (12·L·h·T) FLOPs per trained token (the PaLM/nanoGPT estimate),
/// N the model's parameter count.
fn flops_per_token(num_parameters: i64, c: &ModelConfig, seq_len: usize) -> f64 {
    6.0 * num_parameters as f64
        + 12.0 * c.num_hidden_layers as f64 * c.hidden_size as f64 * seq_len as f64
}

/// MFU in percent against the GPU's dense bf16 peak (`RSDEEP_PEAK_TFLOPS`, default 989 for
/// H100 SXM); None on CPU.
fn mfu_percent(
    flops_per_token: f64,
    tokens_per_second: f64,
    device: Device,
    world_size: usize,
) -> Option<f64> {
    if !device.is_cuda() {
        return None;
    }
    let peak_tflops: f64 = std::env::var(rsdeep_contract::env::PEAK_TFLOPS)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(989.0);
    Some(100.0 * flops_per_token * tokens_per_second / (peak_tflops * 1e12 * world_size as f64))
}

fn announce(
    config: &TrainConfig,
    model: &ModelConfig,
    data: &Examples,
    total_steps: u64,
    world_size: usize,
) {
    let b = &config.batch;
    eprintln!(
        "{:?}: {} examples, {} ranks x micro batch {} x accumulation {} = global batch {}, {} steps, ZeRO stage {}, {:?}; model {} layers hidden {} vocab {}",
        config.args.task,
        data.len(),
        world_size,
        b.train_micro_batch_size_per_gpu,
        b.gradient_accumulation_steps,
        b.train_batch_size,
        total_steps,
        config.zero_stage(),
        config.precision(),
        model.num_hidden_layers,
        model.hidden_size,
        model.vocab_size,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_seeds_differ_by_step_and_rank_and_repeat() {
        assert_eq!(step_seed(7, 3, 1), step_seed(7, 3, 1));
        assert_ne!(step_seed(7, 3, 1), step_seed(7, 4, 1));
        assert_ne!(step_seed(7, 3, 1), step_seed(7, 3, 0));
        assert!(step_seed(7, 3, 1) >= 0);
    }

    #[test]
    fn auto_resume_starts_fresh_without_a_complete_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("not-yet");
        assert_eq!(resume_dir(&missing, "auto", 1).unwrap(), None);
        std::fs::create_dir_all(dir.path().join("checkpoint-4")).unwrap(); // no manifest
        assert_eq!(resume_dir(dir.path(), " AUTO ", 1).unwrap(), None);
        assert!(resume_dir(dir.path(), "latest", 1).is_err());
    }

    #[test]
    fn log_window_averages_and_resets() {
        let mut w = LogWindow::default();
        w.add(2.0, 1.0, 10.0);
        w.add(4.0, 3.0, 30.0);
        assert_eq!(w.take(), (3.0, 2.0, 20.0));
        assert_eq!(w.take(), (0.0, 0.0, 0.0));
    }
}
