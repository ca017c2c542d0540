//! Shared harness of the ZeRO engine tests: a tiny model (embedding, residual MLP blocks,
//! norm-scaled head, optionally tied to the embedding) written against the `Block` trait,
//! deterministic weights and data built once on the main thread, and `run_world`, which
//! trains it on `world` in-process ranks and returns each rank's losses, reports, final
//! full weights, memory report and collective trace.

use rsdeep_worker::Result;
use rsdeep_worker::comm::{Communicator, TcpComm, TcpOptions, TraceEvent};
use rsdeep_worker::model::{Block, ForwardCtx, Param};
use rsdeep_worker::zero::{
    EngineConfig, EngineModel, LocalCommunicator, MemoryReport, Stage3Stats, StepReport, ZeroEngine,
};
use std::collections::HashSet;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// Shape of the tiny model and its data.
#[derive(Debug, Clone, Copy)]
pub struct TinySpec {
    pub vocab: i64,
    pub hidden: i64,
    pub mlp_blocks: usize,
    pub seq: i64,
    pub tied: bool,
    pub kind: Kind,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            vocab: 16,
            hidden: 8,
            mlp_blocks: 2,
            seq: 6,
            tied: true,
            kind: Kind::Float,
        }
    }
}

struct Embed {
    params: Vec<Param>,
}

impl Block for Embed {
    fn params(&self) -> &[Param] {
        &self.params
    }
    fn forward(&self, ids: &Tensor, _ctx: &ForwardCtx) -> Result<Tensor> {
        Ok(Tensor::f_embedding(
            &self.params[0].tensor,
            ids,
            -1,
            false,
            false,
        )?) // (B, T, H)
    }
}

struct Mlp {
    params: Vec<Param>,
}

impl Block for Mlp {
    fn params(&self) -> &[Param] {
        &self.params
    }
    fn forward(&self, x: &Tensor, _ctx: &ForwardCtx) -> Result<Tensor> {
        let p = |i: usize| &self.params[i].tensor;
        let hidden = x.f_linear(p(0), Some(p(1)))?.f_tanh()?; // (B, T, 2H)
        Ok(x.f_add(&hidden.f_linear(p(2), Some(p(3)))?)?) // (B, T, H)
    }
}

struct Head {
    params: Vec<Param>,
    /// The tied embedding weight (a handle on block 0's tensor), if tied.
    tied_weight: Option<Tensor>,
}

impl Block for Head {
    fn params(&self) -> &[Param] {
        &self.params
    }
    fn forward(&self, x: &Tensor, _ctx: &ForwardCtx) -> Result<Tensor> {
        let weight = match &self.tied_weight {
            Some(w) => w,
            None => &self.params[1].tensor,
        };
        let normed = x.f_mul(&self.params[0].tensor)?; // (B, T, H)
        Ok(normed.f_linear::<&Tensor>(weight, None)?) // (B, T, V)
    }
}

/// A tiny deterministic generator (tests run in parallel threads, so torch's global RNG
/// would make their data depend on scheduling).
struct Lcg(u64);

impl Lcg {
    /// Uniform in [0, 1).
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Named initial weights (fp32), deterministic.
pub fn init_weights(spec: &TinySpec) -> Vec<(String, Tensor)> {
    let mut rng = Lcg(7);
    let (v, h) = (spec.vocab, spec.hidden);
    let mut randn = |shape: &[i64], scale: f64| {
        let n: i64 = shape.iter().product();
        // centred uniform with unit variance, times scale
        let values: Vec<f32> = (0..n)
            .map(|_| ((rng.next() - 0.5) * 12f64.sqrt() * scale) as f32)
            .collect();
        Tensor::from_slice(&values).reshape(shape)
    };
    let mut weights = vec![("embed.weight".to_string(), randn(&[v, h], 0.5))];
    for i in 0..spec.mlp_blocks {
        weights.push((format!("mlp.{i}.w1"), randn(&[2 * h, h], 0.3)));
        weights.push((format!("mlp.{i}.b1"), randn(&[2 * h], 0.1)));
        weights.push((format!("mlp.{i}.w2"), randn(&[h, 2 * h], 0.3)));
        weights.push((format!("mlp.{i}.b2"), randn(&[h], 0.1)));
    }
    weights.push((
        "head.norm".to_string(),
        Tensor::ones([h], (Kind::Float, Device::Cpu)),
    ));
    if !spec.tied {
        weights.push(("head.weight".to_string(), randn(&[v, h], 0.5)));
    }
    weights
}

/// The tiny model on its own copies of `weights`, in `spec.kind`.
pub fn build_model(spec: &TinySpec, weights: &[(String, Tensor)]) -> EngineModel {
    let param = |i: usize| Param {
        name: weights[i].0.clone(),
        tensor: weights[i].1.to_kind(spec.kind).copy(),
    };
    let embed = Embed {
        params: vec![param(0)],
    };
    let tied_weight = spec.tied.then(|| embed.params[0].tensor.shallow_clone());
    let mut blocks: Vec<Box<dyn Block>> = vec![Box::new(embed)];
    for i in 0..spec.mlp_blocks {
        blocks.push(Box::new(Mlp {
            params: (1 + 4 * i..5 + 4 * i).map(param).collect(),
        }));
    }
    let head_start = 1 + 4 * spec.mlp_blocks;
    let head_params = if spec.tied {
        vec![param(head_start)]
    } else {
        vec![param(head_start), param(head_start + 1)]
    };
    blocks.push(Box::new(Head {
        params: head_params,
        tied_weight,
    }));
    EngineModel {
        blocks,
        head_tied_to_embedding: spec.tied,
        frozen: HashSet::new(),
    }
}

/// (rows, T + 1) token ids, deterministic and learnable.
pub fn make_tokens(spec: &TinySpec, rows: i64) -> Tensor {
    let mut rng = Lcg(11);
    let n = rows * (spec.seq + 1);
    // a learnable pattern: each row starts at random, then t' = (5t + 3) mod V
    let mut ids: Vec<i64> = Vec::with_capacity(n as usize);
    for i in 0..n {
        let id = if i % (spec.seq + 1) == 0 {
            (rng.next() * spec.vocab as f64) as i64
        } else {
            (ids[ids.len() - 1] * 5 + 3) % spec.vocab
        };
        ids.push(id);
    }
    Tensor::from_slice(&ids).reshape([rows, spec.seq + 1])
}

/// One training run's settings.
#[derive(Clone)]
pub struct Case {
    pub world: usize,
    pub config: EngineConfig,
    pub steps: usize,
    pub global_batch: usize,
    /// (step, rank): that rank injects an inf gradient before that step.
    pub inject_overflow: Option<(usize, usize)>,
    pub trace: bool,
    /// Ranks talk over the real TCP ring backend on 127.0.0.1 instead of in memory.
    pub tcp: bool,
}

impl Default for Case {
    fn default() -> Self {
        Case {
            world: 1,
            config: EngineConfig::default(),
            steps: 1,
            global_batch: 1,
            inject_overflow: None,
            trace: false,
            tcp: false,
        }
    }
}

/// What one rank saw.
pub struct RankOutcome {
    pub losses: Vec<f64>,
    pub reports: Vec<StepReport>,
    pub weights: Vec<(String, Tensor)>,
    pub memory: MemoryReport,
    /// Collectives per step (only when `Case::trace`).
    pub trace_per_step: Vec<Vec<TraceEvent>>,
    pub optimizer_steps: u64,
    pub stage3: Stage3Stats,
}

/// Trains the tiny model on `case.world` thread ranks; step s uses rows
/// [s*G, (s+1)*G) of the token table, micro-step m of rank r its slice (m*world + r).
pub fn run_world(spec: &TinySpec, case: &Case) -> Vec<RankOutcome> {
    let weights = init_weights(spec);
    let tokens = make_tokens(spec, (case.steps * case.global_batch) as i64);
    let connectors = rank_connectors(case.world, case.tcp);
    let handles: Vec<_> = connectors
        .into_iter()
        .map(|connect| {
            let spec = *spec;
            let case = case.clone();
            let weights: Vec<_> = weights.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
            let tokens = tokens.copy();
            std::thread::spawn(move || run_rank(&spec, &case, &weights, &tokens, connect()))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank panicked"))
        .collect()
}

type Connector = Box<dyn FnOnce() -> Arc<dyn Communicator> + Send>;

/// One closure per rank that yields its communicator when run on the rank's thread (TCP
/// ring formation needs every rank connecting at once).
fn rank_connectors(world: usize, tcp: bool) -> Vec<Connector> {
    if !tcp {
        return LocalCommunicator::world(world)
            .into_iter()
            .map(|c| Box::new(move || Arc::new(c) as Arc<dyn Communicator>) as Connector)
            .collect();
    }
    let listeners: Vec<_> = (0..world)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").to_string())
        .collect();
    listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let addrs = addrs.clone();
            Box::new(move || {
                let comm = TcpComm::connect(
                    rank,
                    world,
                    &addrs,
                    listener,
                    "zero-test",
                    TcpOptions::default(),
                )
                .expect("tcp ring");
                Arc::new(comm) as Arc<dyn Communicator>
            }) as Connector
        })
        .collect()
}

fn run_rank(
    spec: &TinySpec,
    case: &Case,
    weights: &[(String, Tensor)],
    tokens: &Tensor,
    comm: Arc<dyn Communicator>,
) -> RankOutcome {
    let rank = comm.rank();
    comm.trace().set_enabled(case.trace);
    let mut engine = ZeroEngine::new(
        build_model(spec, weights),
        comm.clone(),
        case.config.clone(),
    )
    .expect("engine");
    comm.trace().take();
    let mut outcome = RankOutcome {
        losses: vec![],
        reports: vec![],
        weights: vec![],
        memory: engine.memory_report(),
        trace_per_step: vec![],
        optimizer_steps: 0,
        stage3: Stage3Stats::default(),
    };
    for step in 0..case.steps {
        run_micro_steps(&mut engine, spec, case, tokens, rank, step);
        if case.inject_overflow == Some((step, rank)) {
            engine.inject_gradient_overflow();
        }
        let report = engine.step().expect("step");
        outcome.losses.push(report.loss);
        outcome.reports.push(report);
        outcome.trace_per_step.push(comm.trace().take());
    }
    outcome.memory = engine.memory_report();
    outcome.optimizer_steps = engine.optimizer_steps();
    outcome.stage3 = engine.stage3_stats();
    outcome.weights = engine.gather_full_weights().expect("gather weights");
    outcome
}

/// The `gradient_accumulation_steps` forward/backward passes of global step `step` on
/// `rank` (rows as documented on `run_world`).
pub fn run_micro_steps(
    engine: &mut ZeroEngine,
    spec: &TinySpec,
    case: &Case,
    tokens: &Tensor,
    rank: usize,
    step: usize,
) {
    let (gas, world) = (case.config.gradient_accumulation_steps, case.world);
    let mbs = case.config.train_micro_batch_size_per_gpu as i64;
    let vocab = spec.vocab;
    for micro in 0..gas {
        let row = (step * case.global_batch) as i64 + ((micro * world + rank) as i64) * mbs;
        let batch = tokens.narrow(0, row, mbs); // (mbs, T + 1)
        let ids = batch.narrow(1, 0, spec.seq);
        let labels = batch.narrow(1, 1, spec.seq).reshape([-1]);
        let ctx = ForwardCtx::causal(&ids).expect("ctx");
        let mut loss_fn = |logits: &Tensor| -> Result<Tensor> {
            Ok(logits
                .to_kind(Kind::Float)
                .reshape([-1, vocab])
                .cross_entropy_for_logits(&labels))
        };
        engine
            .forward_backward(&ids, &ctx, &mut loss_fn)
            .expect("forward_backward");
    }
}

/// Element-wise |a - b| <= tol * max(1, |b|).
pub fn assert_close(got: &Tensor, want: &Tensor, tol: f64, label: &str) {
    assert_eq!(got.size(), want.size(), "{label}: shape");
    let diff = (got - want).abs();
    let allowed = want.abs().clamp_min(1.0) * tol;
    let worst = (&diff - &allowed).max().double_value(&[]);
    assert!(
        worst <= 0.0,
        "{label}: max |diff| {} exceeds {tol}",
        diff.max().double_value(&[])
    );
}

/// The small-bucket engine config of the LoRA/streamed-build tests: `stage`, `world`
/// ranks sharing a global batch of `global_batch` rows, clipping 1.0, buckets of 1000
/// and 800 elements, stage-3 persistence 32, lr 1e-2.
pub fn small_bucket_engine_config(stage: u8, world: usize, global_batch: usize) -> EngineConfig {
    let mut config = EngineConfig {
        stage: stage.try_into().expect("a ZeRO stage"),
        gradient_accumulation_steps: 1,
        train_micro_batch_size_per_gpu: global_batch / world,
        train_batch_size: global_batch,
        gradient_clipping: 1.0,
        reduce_bucket_size: 1000,
        allgather_bucket_size: 800,
        stage3_param_persistence_threshold: 32,
        ..EngineConfig::default()
    };
    config.optimizer.lr = 1e-2;
    config
}
