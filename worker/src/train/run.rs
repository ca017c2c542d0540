//! The training loop proper: model + engine + data from the resolved `TrainConfig`, the
//! step loop with gradient accumulation, logging, evaluation, periodic checkpoints and the
//! final HF-loadable output. Determinism contract: libtorch's RNG is reseeded at every
//! optimizer step from (seed, step, rank), and the data order comes from the sampler, so a
//! run depends only on its config and a resumed run continues exactly.

use super::data_source::{DataPlan, Examples, TrainStream};
use super::ds_monitor::{DsMonitor, step_events};
use super::flops_profile::{
    FlopsProfiler, MicroStepTimes, ProfiledRun, measure, measure_micro_step,
};
use super::outputs;
use super::progress::{ProgressReporter, StepMetrics};
use super::trackers::{TrackerRun, Trackers};
use crate::assemble::{LoraSpec, ModelSource, build_causal_lm_engine};
use crate::checkpoint::{self, PendingSave, RunRecord, SaveRequest, TrainerState};
use crate::comm::{Communicator, LoggedComm, ReduceOp};
use crate::data::Window;
use crate::lora::{Bottleneck, LoraConfig, LoraInfo, PrefixTuning, save_adapter};
use crate::model::{ForwardCtx, ModelConfig, ModelType, causal_lm_loss};
use crate::quant::{QuantConfig, QuantType};
use crate::tokenizer::Tokenizer;
use crate::zero::{EngineConfig, ZeroEngine};
use crate::{Error, Result};
use rsdeep_contract::config::{CommsLoggerConfig, IntervalStrategy, ResumeFrom, Task, TrainConfig};
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
    config: TrainConfig,
    world: TrainWorld,
    on_step: &mut dyn FnMut(StepProgress),
) -> Result<TrainSummary> {
    let (world, comms_logger) = with_comms_logger(&config.deepspeed.comms_logger, world);
    let rank = world.rank;
    let mut trainer = Trainer::setup(config, world)?;
    if trainer.run.config.args.eval_on_start {
        trainer.evaluate()?;
    }
    while trainer.step < trainer.run.total_steps {
        let report = trainer.optimizer_step()?;
        on_step(StepProgress {
            step: trainer.step,
            loss: report.loss,
            tokens_per_second: report.tokens_per_second,
        });
        trainer.log(&report)?;
        trainer.evaluate_if_due()?;
        trainer.save_if_due()?;
    }
    let summary = trainer.finish()?;
    if let Some(logged) = comms_logger.as_deref() {
        print_comms_summary(logged, rank);
    }
    Ok(summary)
}

/// The DeepSpeed config's `comms_logger` block: when enabled, `world`'s communicator
/// wrapped in a `LoggedComm` (returned as well, for the summary at the end of training).
fn with_comms_logger(
    block: &CommsLoggerConfig,
    world: TrainWorld,
) -> (TrainWorld, Option<Arc<LoggedComm>>) {
    if !block.enabled {
        return (world, None);
    }
    let logged = Arc::new(LoggedComm::new(world.comm.clone(), block));
    let world = TrainWorld {
        comm: logged.clone(),
        ..world
    };
    (world, Some(logged))
}

/// Rank 0 prints DeepSpeed's `log_summary` table of its collectives to stderr.
fn print_comms_summary(logged: &LoggedComm, rank: usize) {
    if rank == 0 {
        eprintln!(
            "[rank 0] comms_logger summary (DeepSpeed's log_summary):\n{}",
            logged.summary()
        );
    }
}

/// What stays the same for the whole run once set up: the resolved config, this rank's
/// world, tokenizer, model shape, compute dtype, output folder, adapters and run record.
struct RunContext {
    config: TrainConfig,
    world: TrainWorld,
    tokenizer: Tokenizer,
    model_config: ModelConfig,
    model_config_json: String,
    kind: Kind,
    output_dir: PathBuf,
    lora: Option<LoraRun>,
    run: RunRecord,
    total_steps: u64,
    micro_batch: usize,
    flops_per_token: f64,
}

/// One optimizer step's figures (the gradient norm goes into the log window).
struct StepReport {
    loss: f64,
    lr: f64,
    loss_scale: f64,
    tokens_per_second: f64,
}

/// Where one optimizer step's wall time went on this rank, in seconds.
#[derive(Clone, Copy, Debug, Default)]
struct StepTimes {
    /// Building the micro-batches (tokens to tensors on the device).
    data: f64,
    /// Forward and backward of every micro-step.
    forward_backward: f64,
    /// The engine's step: gradient reduction, clipping, the optimizer.
    optimizer: f64,
}

/// A training run in named steps: `setup` (data, model + engine, resume, reporter), then
/// per optimizer step `optimizer_step` (micro-steps with gradient accumulation, then the
/// engine's step), `log`, `evaluate_if_due`, `save_if_due`; and `finish` (final weights,
/// loss curve, trainer state).
struct Trainer {
    run: RunContext,
    engine: ZeroEngine,
    train_data: Examples,
    eval_data: Option<Examples>,
    stream: TrainStream,
    /// Epochs done, as the Trainer logs it.
    epoch: f64,
    state: TrainerState,
    reporter: Option<ProgressReporter>,
    /// The DeepSpeed config's `csv_monitor` / `tensorboard` blocks (rank 0, when enabled).
    ds_monitor: Option<DsMonitor>,
    /// The DeepSpeed config's `flops_profiler` block (rank 0, when enabled).
    flops_profiler: Option<FlopsProfiler>,
    window: LogWindow,
    pending_save: Option<PendingSave>,
    start_step: u64,
    step: u64,
    first_loss: Option<f64>,
    last_loss: Option<f64>,
    final_eval: Option<f64>,
}

impl Trainer {
    /// Tokenizer, data, model built block by block into the engine, the resumed state
    /// when asked, and rank 0's reporter.
    fn setup(mut config: TrainConfig, world: TrainWorld) -> Result<Trainer> {
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
        let block_size = plan.block_size();
        let micro_batch = config.batch.train_micro_batch_size_per_gpu as usize;
        let stream = TrainStream::new(&config, &train_data, world.world_size)?;
        let updates_per_epoch = stream.updates_per_epoch();
        let total_steps = args.total_training_steps(updates_per_epoch);
        config
            .fill_model_autos(model_config.hidden_size, total_steps)
            .map_err(|e| Error::Config(e.to_string()))?;
        let (engine, lora, num_parameters) =
            build_engine(&config, &model_config, &world, kind, total_steps)?;
        print_model_states(&engine.memory_report());
        let state = TrainerState {
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
        let run = RunContext {
            run: RunRecord::new(&world.run_id, exact_resume_settings(&config)),
            model_config_json: model_config.to_json_string()?,
            flops_per_token: flops_per_token(num_parameters, &model_config, block_size),
            output_dir: PathBuf::from(&args.output_dir),
            config,
            world,
            tokenizer,
            model_config,
            kind,
            lora,
            total_steps,
            micro_batch,
        };
        let lora_dropout = run.lora.as_ref().map_or(0.0, |l| l.config.dropout);
        let flops_profiler =
            FlopsProfiler::new(&run.config.deepspeed.flops_profiler, rank, lora_dropout);
        let mut trainer = Trainer {
            run,
            engine,
            train_data,
            eval_data,
            stream,
            epoch: 0.0,
            state,
            reporter: None,
            ds_monitor: None,
            flops_profiler,
            window: LogWindow::default(),
            pending_save: None,
            start_step: 0,
            step: 0,
            first_loss: None,
            last_loss: None,
            final_eval: None,
        };
        trainer.resume()?;
        trainer.open_reporter()?;
        Ok(trainer)
    }

    /// Restores engine, data position and trainer state when `resume_from_checkpoint`
    /// names a checkpoint, and continues the lineage of the run that wrote it.
    fn resume(&mut self) -> Result<()> {
        let run = &mut self.run;
        if let Some(resume) = &run.config.args.resume_from_checkpoint {
            let _phase = super::phase::enter(super::phase::PhaseKind::Load);
            let saved_run = resume_from(
                resume,
                &run.output_dir,
                &mut self.engine,
                &run.world,
                &mut self.state,
            )?;
            if let Some(saved) = saved_run {
                run.run = continue_run(run.run.clone(), &saved, run.world.rank);
            }
        }
        self.start_step = self.state.global_step;
        self.step = self.start_step;
        self.epoch = self.state.epoch.unwrap_or(0.0);
        Ok(())
    }

    /// Rank 0's progress line, metrics.jsonl and TensorBoard writer, and the run banner.
    fn open_reporter(&mut self) -> Result<()> {
        let run = &self.run;
        if run.world.rank != 0 {
            return Ok(());
        }
        let args = &run.config.args;
        let tb_dir = args.report_to_tensorboard().then(|| {
            args.logging_dir
                .clone()
                .map(PathBuf::from)
                .unwrap_or_else(|| run.output_dir.join("runs"))
        });
        let mut config = serde_json::to_value(&run.config).unwrap_or_default();
        // Where and how the run trains, beside its settings (HF logs the same facts).
        config["rsdeep"] = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "host": std::env::var(rsdeep_contract::env::HOST).unwrap_or_default(),
            "device": format!("{:?}", run.world.device),
            "world_size": run.world.world_size,
        });
        let trackers = Trackers::start(TrackerRun {
            report_to: &args.report_to,
            run_name: args
                .run_name
                .clone()
                .unwrap_or_else(|| args.output_dir.clone()),
            run_id: &run.world.run_id,
            resumed: self.start_step > 0,
            config,
        });
        let ds = &run.config.deepspeed;
        self.ds_monitor = DsMonitor::open(&ds.csv_monitor, &ds.tensorboard)?;
        self.reporter = Some(
            ProgressReporter::open(
                &run.output_dir,
                run.total_steps,
                tb_dir.as_deref(),
                self.start_step,
            )?
            .with_trackers(trackers),
        );
        announce(
            &run.config,
            &run.model_config,
            &self.train_data,
            run.total_steps,
            run.world.world_size,
        );
        Ok(())
    }

    /// This step's window of micro-steps (forward + backward; usually
    /// `gradient_accumulation_steps`, fewer at an epoch's end), then the engine's
    /// optimizer step; libtorch is reseeded from (seed, step, rank) first.
    fn optimizer_step(&mut self) -> Result<StepReport> {
        let (args, world) = (&self.run.config.args, &self.run.world);
        super::phase::begin_step(self.step + 1);
        tch::manual_seed(step_seed(args.seed, self.step, world.rank));
        let started = Instant::now();
        let mut times = StepTimes::default();
        let mut tokens = 0i64;
        let window = self.stream.window(self.step);
        self.engine.begin_window(self.loss_weights(&window))?;
        let profiling = self
            .flops_profiler
            .as_ref()
            .is_some_and(|p| p.is_due(self.step + 1));
        let mut profiled = None;
        for indices in &window.ranks[world.rank] {
            let data_started = Instant::now();
            let batch = self.train_data.batch(indices, world.device)?;
            times.data += data_started.elapsed().as_secs_f64();
            let compute_started = Instant::now();
            tokens += batch.input_ids.numel() as i64;
            let ctx = ForwardCtx::build(
                &batch.input_ids,
                batch.attention_mask.as_ref(),
                batch.segment_ids.as_ref(),
            )?;
            // Fused head + loss when the head allows it (no (B*T, V) logits), else generic.
            let mut micro_step = || {
                self.engine
                    .forward_backward_causal_lm(&batch.input_ids, &ctx, &batch.labels)
            };
            match profiling && profiled.is_none() {
                true => {
                    let (_, measured) =
                        measure_micro_step(world.device, &batch.input_ids, micro_step)?;
                    profiled = Some(measured);
                }
                false => _ = micro_step()?,
            }
            times.forward_backward += compute_started.elapsed().as_secs_f64();
        }
        if let Some(pending) = &self.pending_save {
            // An asynchronous save copies the state this step changes in the background.
            pending.wait_for_snapshot()?;
        }
        let optimizer_started = Instant::now();
        let (report, step_seconds) = match profiling {
            true => measure(world.device, || self.engine.step())?,
            false => (self.engine.step()?, 0.0),
        };
        times.optimizer = optimizer_started.elapsed().as_secs_f64();
        self.step += 1;
        if let Some(micro) = profiled {
            self.report_flops_profile(&micro, step_seconds)?;
        }
        let world_tokens = tokens * world.world_size as i64;
        self.state.global_step = self.step;
        self.epoch = window.epoch_after;
        self.state.epoch = Some(self.epoch);
        self.state.num_input_tokens_seen += world_tokens as u64;
        let tokens_per_second = world_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
        self.first_loss.get_or_insert(report.loss);
        self.last_loss = Some(report.loss);
        self.window
            .add(report.loss, report.grad_norm, tokens_per_second, times);
        Ok(StepReport {
            loss: report.loss,
            lr: report.logged_lr,
            loss_scale: report.loss_scale,
            tokens_per_second,
        })
    }

    /// The DeepSpeed flops profile of the step just taken (rank 0, `flops_profiler`):
    /// `micro` its first micro-step, `step_seconds` its optimizer step.
    fn report_flops_profile(&self, micro: &MicroStepTimes, step_seconds: f64) -> Result<()> {
        let Some(profiler) = self.flops_profiler.as_ref() else {
            return Ok(());
        };
        let trainable: Vec<(String, Vec<i64>)> = (0..self.engine.block_count())
            .flat_map(|b| self.engine.block_weight_specs(b))
            .collect();
        let run = ProfiledRun {
            step: self.step,
            model: &self.run.model_config,
            trainable: &trainable,
            world_size: self.run.world.world_size,
            micro_batch: self.run.config.batch.train_micro_batch_size_per_gpu,
        };
        profiler.report(&run, micro, step_seconds)
    }

    /// Each of this rank's micro-steps' loss weight: its share of the label tokens of the
    /// global batch (every rank's window) times the world size, which the average over
    /// ranks undoes — Hugging Face's token mean over the global batch. Without
    /// `average_tokens_across_devices`, its share of this rank's window.
    fn loss_weights(&self, window: &Window) -> Vec<f64> {
        let counts: Vec<Vec<usize>> = window
            .ranks
            .iter()
            .map(|rank| {
                rank.iter()
                    .map(|b| self.train_data.label_tokens(b))
                    .collect()
            })
            .collect();
        let world = &self.run.world;
        let mine = &counts[world.rank];
        let per_rank_share = match self.run.config.args.average_tokens_across_devices {
            true => counts.iter().flatten().sum::<usize>() as f64 / world.world_size as f64,
            false => mine.iter().sum::<usize>() as f64,
        };
        mine.iter()
            .map(|&tokens| tokens as f64 / per_rank_share.max(1.0))
            .collect()
    }

    /// Every step: the DeepSpeed monitor events when its config enables them. Every
    /// `logging_steps` (and the last step, and the first with `logging_first_step`): the
    /// window's means into the log history, the progress line and the metric files.
    fn log(&mut self, report: &StepReport) -> Result<()> {
        if let Some(monitor) = self.ds_monitor.as_mut() {
            let fp16 = self.run.kind == Kind::Half;
            let events = step_events(report.loss, report.lr, fp16.then_some(report.loss_scale));
            let samples = self.step * self.run.config.batch.train_batch_size;
            monitor.write(&events, samples)?;
        }
        let (args, step, total) = (&self.run.config.args, self.step, self.run.total_steps);
        let log_now = args.logging_strategy == IntervalStrategy::Steps
            && (step.is_multiple_of(args.logging_steps.max(1))
                || step == total
                || (step == 1 && args.logging_first_step));
        if !log_now {
            return Ok(());
        }
        let (loss, grad_norm, tps, times) = self.window.take();
        let peak_rss_mib = every_ranks_peak_rss_mib(&self.run.world)?;
        let world = &self.run.world;
        let metrics = StepMetrics {
            step,
            epoch: self.epoch,
            loss,
            learning_rate: report.lr,
            grad_norm,
            loss_scale: report.loss_scale,
            skipped_steps: self.engine.skipped_steps(),
            tokens_per_second: tps,
            mfu: mfu_percent(
                self.run.flops_per_token,
                tps,
                world.device,
                world.world_size,
            ),
            elapsed_s: self.reporter.as_ref().map_or(0.0, |r| r.elapsed_s()),
            eta_s: self
                .reporter
                .as_ref()
                .map_or(0.0, |r| r.eta_s(self.start_step, step)),
            peak_rss_mib,
            step_time_s: [times.data, times.forward_backward, times.optimizer],
        };
        self.state
            .log_history
            .push(serde_json::to_value(&metrics).unwrap_or_default());
        if let Some(reporter) = self.reporter.as_mut() {
            reporter.log(metrics)?;
        }
        Ok(())
    }

    /// Every `eval_steps` and at the end, when there is an eval split: the token-weighted
    /// eval loss over all ranks (LoRA dropout off meanwhile).
    fn evaluate_if_due(&mut self) -> Result<()> {
        let args = &self.run.config.args;
        let due = (args.eval_strategy == IntervalStrategy::Steps
            && self.step.is_multiple_of(args.eval_interval().max(1)))
            || self.step == self.run.total_steps;
        match due {
            true => self.evaluate(),
            false => Ok(()),
        }
    }

    /// The eval loss now (when there is an eval split), logged at the current step.
    fn evaluate(&mut self) -> Result<()> {
        let Some(eval) = self.eval_data.as_ref() else {
            return Ok(());
        };
        let _eval_mode = self.run.lora.as_ref().map(|l| EvalMode::enter(&l.info));
        let _phase = super::phase::enter(super::phase::PhaseKind::Eval);
        let loss = evaluate(
            &mut self.engine,
            eval,
            &self.run.world,
            self.run.micro_batch,
        )?;
        self.final_eval = Some(loss);
        self.state.log_history.push(
            serde_json::json!({"step": self.step, "eval_loss": loss, "eval_perplexity": loss.exp()}),
        );
        if let Some(reporter) = self.reporter.as_mut() {
            reporter.log_eval(self.step, loss)?;
        }
        Ok(())
    }

    /// Every `save_steps` and at the end: `checkpoint-N` (the previous asynchronous save
    /// finished first).
    fn save_if_due(&mut self) -> Result<()> {
        let args = &self.run.config.args;
        let due = args.save_strategy == IntervalStrategy::Steps
            && (self.step.is_multiple_of(args.save_steps.max(1))
                || self.step == self.run.total_steps);
        if !due {
            return Ok(());
        }
        let _phase = super::phase::enter(super::phase::PhaseKind::Save);
        if let Some(previous) = self.pending_save.take() {
            self.run.finish_save(previous)?;
        }
        let world = &self.run.world;
        let extra = serde_json::json!({
            "seed": args.seed,
            "step": self.step,
            "rank": world.rank,
            "world_size": world.world_size,
        });
        self.pending_save = self.run.save(&mut self.engine, &self.state, extra)?;
        Ok(())
    }

    /// The final outputs: the last asynchronous save finished, the model (or adapters)
    /// streamed to `output_dir` with its config and tokenizer, the loss curve and
    /// trainer_state.json; then a barrier so no rank leaves before the files exist.
    fn finish(mut self) -> Result<TrainSummary> {
        let _phase = super::phase::enter(super::phase::PhaseKind::FinalWrite);
        if let Some(previous) = self.pending_save.take() {
            self.run.finish_save(previous)?;
        }
        if let Some(reporter) = self.reporter.as_mut() {
            reporter.finish_line();
            reporter.finish_trackers();
        }
        self.write_model()?;
        let run = &self.run;
        if run.world.rank == 0 {
            if let Some(reporter) = self.reporter.as_ref() {
                outputs::write_loss_curve(
                    &run.output_dir,
                    reporter.history(),
                    &self.state.log_history,
                )?;
            }
            outputs::write_trainer_state(&run.output_dir, &self.state)?;
        }
        run.world.comm.barrier()?;
        Ok(TrainSummary {
            first_loss: self.first_loss,
            last_loss: self.last_loss,
            final_eval_loss: self.final_eval,
            steps: self.step,
            output_dir: self.run.output_dir,
        })
    }

    /// The trained model into `output_dir`: LoRA runs write the adapters only; full runs
    /// stream the weights block by block (rank 0 writes) with config and tokenizer.
    fn write_model(&mut self) -> Result<()> {
        let run = &self.run;
        let writer = run.world.rank == 0;
        if let Some(lora) = run.lora.as_ref() {
            let weights = self.engine.gather_trainable_weights()?;
            lora.save(&run.output_dir, &weights, writer)?;
        } else {
            let max_shard_bytes = outputs::parse_size(&run.config.args.max_shard_size)?;
            checkpoint::export::write_final_weights(
                &mut self.engine,
                &run.output_dir,
                run.kind,
                max_shard_bytes,
                writer,
            )?;
            if writer {
                write_model_config(&run.output_dir, &run.model_config, run.kind)?;
            }
        }
        if writer {
            run.tokenizer.save(&run.output_dir)?;
        }
        Ok(())
    }
}

/// This rank's model-state bytes (DeepSpeed's "estimated memory" lines, measured):
/// parameters (the frozen base among them), gradients, optimizer states.
fn print_model_states(report: &crate::zero::MemoryReport) {
    let mib = |bytes: usize| bytes as f64 / (1 << 20) as f64;
    let swapped = match report.swapped_optimizer_bytes {
        0 => String::new(),
        bytes => format!(" (+ {:.1} MiB in files under nvme_path)", mib(bytes)),
    };
    eprintln!(
        "model states on this rank: params {:.1} MiB (frozen {:.1} MiB), grads {:.1} MiB, \
         optimizer {:.1} MiB{swapped}",
        mib(report.param_bytes),
        mib(report.frozen_bytes),
        mib(report.grad_bytes),
        mib(report.optimizer_bytes)
    );
}

/// The model built block by block straight into the engine (with its adapters for
/// LoRA): under ZeRO-3 no rank ever holds the whole model. Returns the engine, the LoRA
/// run (for `task: "lora"`) and the parameter count.
fn build_engine(
    config: &TrainConfig,
    model_config: &ModelConfig,
    world: &TrainWorld,
    kind: Kind,
    total_steps: u64,
) -> Result<(ZeroEngine, Option<LoraRun>, i64)> {
    let args = &config.args;
    let engine_config = EngineConfig::from_train_config(config, total_steps, world.device)?;
    let lora_config = match args.task {
        Task::Lora => Some(lora_config_of(config, model_config)?),
        _ => None,
    };
    let base_4bit = base_quantization(args)?;
    let lora_spec = match (&lora_config, &args.adapter_name_or_path) {
        (Some(_), Some(dir)) => Some(LoraSpec::Saved {
            dir: Path::new(dir),
            base_4bit,
        }),
        (Some(c), None) => Some(LoraSpec::Fresh {
            config: c,
            seed: args.seed,
            base_4bit,
        }),
        (None, _) => None,
    };
    let built = build_causal_lm_engine(
        model_source(config, model_config.clone())?,
        world.device,
        kind,
        lora_spec,
        world.comm.clone(),
        engine_config,
    )?;
    let lora = match (lora_config, built.lora) {
        (Some(adapters), Some(info)) => Some(lora_run(adapters, info, args, world.rank)),
        _ => None,
    };
    Ok((built.engine, lora, built.num_parameters))
}

/// Restores engine, data position and trainer state from the checkpoint `resume` names;
/// returns the record of the run that wrote it (absent in older checkpoints).
fn resume_from(
    resume: &ResumeFrom,
    output_dir: &Path,
    engine: &mut ZeroEngine,
    world: &TrainWorld,
    state: &mut TrainerState,
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
    // The data position needs nothing restored: the global step fixes it at any world size.
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
    const KEYS: [&str; 45] = [
        "task",
        "model_name_or_path",
        "config_name",
        "adapter_name_or_path",
        "train_files",
        "text_field",
        "block_size",
        "group_texts_batch_size",
        "preprocessing_num_workers",
        "append_eos",
        "train_sampling_strategy",
        "dataloader_drop_last",
        "average_tokens_across_devices",
        "lr_scheduler_kwargs",
        "max_seq_length",
        "packing",
        "assistant_only_loss",
        "completion_only_loss",
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
        "use_dora",
        "use_rslora",
        "lora_modules_to_save",
        "peft_type",
        "num_virtual_tokens",
        "load_in_4bit",
        "bnb_4bit_quant_type",
        "bnb_4bit_use_double_quant",
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

impl RunContext {
    /// Saves `checkpoint-{global_step}`; with `async_save` returns the save still being
    /// written (finish it with `finish` before the next save or the end).
    fn save(
        &self,
        engine: &mut ZeroEngine,
        state: &TrainerState,
        per_rank_extra: serde_json::Value,
    ) -> Result<Option<PendingSave>> {
        let comm = self.world.comm.as_ref();
        let args = &self.config.args;
        let zero = &self.config.deepspeed.zero_optimization;
        let request = SaveRequest {
            output_dir: &self.output_dir,
            step: state.global_step,
            engine,
            comm,
            model_config_json: &self.model_config_json,
            tokenizer: Some(&self.tokenizer),
            trainer_state: state,
            per_rank_extra,
            save_total_limit: args.save_total_limit.map(|n| n as usize),
            max_shard_bytes: outputs::parse_size(&args.max_shard_size)?,
            // LoRA checkpoints hold the adapter (PEFT's layout), not the frozen base.
            write_model_weights: self.lora.is_none()
                && (!zero.stage.partitions_parameters()
                    || zero.gather_16bit_weights_on_model_save()),
            weights_dtype: self.kind,
            run: Some(&self.run),
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
        if let Some(lora) = &self.lora {
            // Collective gather on every rank; rank 0 writes the adapter files.
            lora.save(&dir, &engine.gather_trainable_weights()?, comm.rank() == 0)?;
        }
        Ok(None)
    }

    /// Waits for an asynchronous save to be complete on every rank.
    fn finish_save(&self, pending: PendingSave) -> Result<()> {
        let comm = self.world.comm.as_ref();
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
            save_adapter(
                dir,
                &self.config,
                &self.base_model,
                &self.info.saved_tensors(weights)?,
            )?;
        }
        Ok(())
    }
}

/// The LoRA settings of the run: the saved adapter's when training continues from
/// `adapter_name_or_path`, else train.json's.
fn lora_config_of(config: &TrainConfig, model: &ModelConfig) -> Result<LoraConfig> {
    let args = &config.args;
    if let Some(dir) = &args.adapter_name_or_path {
        return crate::lora::read_adapter_config(Path::new(dir));
    }
    Ok(LoraConfig {
        r: args.lora_r,
        alpha: args.lora_alpha,
        dropout: args.lora_dropout,
        target_modules: args.lora_target_modules.clone(),
        use_rslora: args.use_rslora,
        use_dora: args.use_dora,
        modules_to_save: args.lora_modules_to_save.clone(),
        prefix_tuning: (args.peft_type == "PREFIX_TUNING").then(|| PrefixTuning {
            num_virtual_tokens: args.num_virtual_tokens,
            num_layers: model.num_hidden_layers,
            num_kv_heads: model.num_kv_heads(),
            head_dim: model.head_dim(),
        }),
        bottleneck: bottleneck_of(args, model)?,
    })
}

/// Bottleneck adapters when `peft_type` asks for them: only Llama-architecture models,
/// the ones AdapterHub's library (the format they are saved in) supports.
fn bottleneck_of(
    args: &rsdeep_contract::config::TrainingArgs,
    model: &ModelConfig,
) -> Result<Option<Bottleneck>> {
    if args.peft_type != "BOTTLENECK" {
        return Ok(None);
    }
    if model.model_type != ModelType::Llama {
        return Err(Error::Config(format!(
            "peft_type BOTTLENECK: AdapterHub's adapters library (whose format rsdeep saves) \
             supports Llama-architecture models, this one is {:?}: use LoRA or a Llama model",
            model.model_type
        )));
    }
    Ok(Some(Bottleneck {
        style: crate::lora::parse_bottleneck_style(&args.bottleneck_config)?,
        reduction_factor: args.bottleneck_reduction_factor,
        hidden_size: model.hidden_size,
    }))
}

/// QLoRA: how the frozen base's linears are stored in 4 bits, when asked for.
fn base_quantization(args: &rsdeep_contract::config::TrainingArgs) -> Result<Option<QuantConfig>> {
    if !args.base_in_4bit() {
        return Ok(None);
    }
    Ok(Some(QuantConfig {
        quant_type: QuantType::parse(&args.bnb_4bit_quant_type)?,
        double_quant: args.bnb_4bit_use_double_quant,
    }))
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
    let totals = sum_over_ranks(world, &[loss_sum, count])?;
    let (sum, n) = (totals[0], totals[1]);
    if n == 0.0 {
        return Err(Error::Data("the eval split has no tokens to score".into()));
    }
    Ok(sum / n)
}

/// Every rank's peak resident memory in MiB (index = rank), gathered by one small sum
/// (each rank fills its own slot); every rank calls it at the same logging steps.
fn every_ranks_peak_rss_mib(world: &TrainWorld) -> Result<Vec<f64>> {
    let mut slots = vec![0.0f64; world.world_size];
    slots[world.rank] = own_peak_rss_mib();
    sum_over_ranks(world, &slots)
}

/// `values` summed element-wise over every rank (on the communicator's device: NCCL
/// reduces only device memory).
fn sum_over_ranks(world: &TrainWorld, values: &[f64]) -> Result<Vec<f64>> {
    let tensor = Tensor::from_slice(values).f_to_device(world.device)?;
    world.comm.all_reduce(&tensor, ReduceOp::Sum)?.wait()?;
    Ok(Vec::<f64>::try_from(&tensor.f_to_device(Device::Cpu)?)?)
}

/// This process's peak resident set (`VmHWM` in /proc/self/status) in MiB; 0 where the
/// kernel does not report it.
fn own_peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// What one log line reports about the steps since the previous one, as Hugging Face's
/// Trainer logs it: the mean loss, the last step's gradient norm, the mean throughput.
#[derive(Default)]
struct LogWindow {
    loss: f64,
    grad_norm: f64,
    tokens_per_second: f64,
    times: StepTimes,
    count: f64,
}

impl LogWindow {
    fn add(&mut self, loss: f64, grad_norm: f64, tps: f64, times: StepTimes) {
        self.loss += loss;
        self.grad_norm = grad_norm;
        self.tokens_per_second += tps;
        self.times.data += times.data;
        self.times.forward_backward += times.forward_backward;
        self.times.optimizer += times.optimizer;
        self.count += 1.0;
    }

    /// Mean loss, the last grad norm, mean tokens/s and mean step times since the last
    /// take; starts a new window.
    fn take(&mut self) -> (f64, f64, f64, StepTimes) {
        let n = self.count.max(1.0);
        let times = StepTimes {
            data: self.times.data / n,
            forward_backward: self.times.forward_backward / n,
            optimizer: self.times.optimizer / n,
        };
        let means = (
            self.loss / n,
            self.grad_norm,
            self.tokens_per_second / n,
            times,
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
    fn an_enabled_comms_logger_wraps_the_worlds_communicator() -> Result<()> {
        let one_rank = || -> Arc<dyn Communicator> {
            let mut handles = crate::zero::LocalCommunicator::world(1);
            Arc::new(handles.remove(0))
        };
        let world = |comm: Arc<dyn Communicator>| TrainWorld {
            comm,
            rank: 0,
            world_size: 1,
            local_rank: 0,
            device: Device::Cpu,
            run_id: "test".into(),
        };
        let comm = one_rank();
        let (off, none) = with_comms_logger(&CommsLoggerConfig::default(), world(comm.clone()));
        assert!(none.is_none() && Arc::ptr_eq(&off.comm, &comm));
        let enabled = CommsLoggerConfig {
            enabled: true,
            ..CommsLoggerConfig::default()
        };
        let (on, logged) = with_comms_logger(&enabled, world(one_rank()));
        on.comm.barrier()?;
        let rows = logged.map(|l| l.log().rows()).unwrap_or_default();
        assert_eq!(rows.len(), 1, "the barrier went through the logger");
        Ok(())
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
    fn log_window_averages_the_loss_and_times_keeps_the_last_norm_and_resets() {
        let mut w = LogWindow::default();
        let times = |data, forward_backward, optimizer| StepTimes {
            data,
            forward_backward,
            optimizer,
        };
        w.add(2.0, 1.0, 10.0, times(0.1, 1.0, 0.2));
        w.add(4.0, 3.0, 30.0, times(0.3, 3.0, 0.4));
        let (loss, norm, tps, mean) = w.take();
        assert_eq!((loss, norm, tps), (3.0, 3.0, 20.0));
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(mean.data, 0.2) && close(mean.forward_backward, 2.0));
        assert!(close(mean.optimizer, 0.3), "{mean:?}");
        let (loss, norm, tps, mean) = w.take();
        assert_eq!((loss, norm, tps, mean.optimizer), (0.0, 0.0, 0.0, 0.0));
    }
}
