//! The validated launch plan: which hosts and slots the job uses, every rank's global and
//! local index, device and full worker environment. Built from the raw CLI (`cli`), the
//! hostfile, include/exclude and device discovery (`resources`) and `.rsdeep_env`
//! (`envfile`). Pure (no I/O): `PlanInputs` carries what was read from the machine. The
//! environment names are the contract in `rsdeep_contract::env`.

pub mod cli;
pub mod elastic;
pub mod envfile;
pub mod hostfile;
pub mod hostlist;
pub mod program;
pub mod resources;
pub mod slurm;

use rsdeep_contract::config::TrainConfig;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::plan::cli::{DeviceKind, LaunchArgs, LauncherKind};
use crate::plan::hostfile::HostEntry;
use crate::plan::slurm::{SlurmError, SlurmJob};
use program::{Program, ProgramError};
use resources::{ResourceError, ResourcePool};
use rsdeep_contract::env as ev;

/// Name of the local machine when no hostfile is used (DeepSpeed's name).
pub const LOCALHOST: &str = "localhost";

/// What the planner needs from the machine (read by the binary, faked by tests).
#[derive(Debug, Clone, Default)]
pub struct PlanInputs {
    /// Parsed hostfile, `None` when the file does not exist.
    pub hostfile: Option<Vec<HostEntry>>,
    /// The launcher's `CUDA_VISIBLE_DEVICES`, if set.
    pub cuda_visible_devices: Option<String>,
    /// Devices reported by the CUDA driver (`None`: no driver).
    pub cuda_device_count: Option<usize>,
    /// `.rsdeep_env` variables, in file order.
    pub env_file_vars: Vec<(String, String)>,
    /// Job id and token: fresh for single-node jobs, shared via env for multi-node.
    pub job_id: String,
    pub token: String,
    /// True when the job id/token came from the environment (required for multi-node).
    pub job_from_env: bool,
    /// SLURM's view of the job under `--launcher slurm` (nodes, this node's index, GPUs).
    pub slurm: Option<SlurmJob>,
    /// Online CPU cores of this machine (for `--bind_cores_to_rank`).
    pub total_cores: usize,
    /// True when the launcher's own environment sets OMP_NUM_THREADS (then it is left
    /// to the user, as torchrun does).
    pub omp_threads_from_user: bool,
    /// This process's MPI rank when mpirun started it (`OMPI_COMM_WORLD_RANK`,
    /// `PMI_RANK`): the node rank of a launcher that `--launcher openmpi` started.
    pub mpi_rank: Option<usize>,
}

/// One rank of the job.
#[derive(Debug, Clone, PartialEq)]
pub struct RankPlan {
    pub rank: usize,
    pub local_rank: usize,
    pub node_rank: usize,
    pub host: String,
    /// CUDA device index for CUDA workers, `None` for CPU workers.
    pub device_index: Option<usize>,
    /// Cores to pin this rank to (`--bind_cores_to_rank`).
    pub cpu_cores: Option<Vec<usize>>,
    /// The complete set of variables the launcher sets for this rank.
    pub env: BTreeMap<String, String>,
    /// Arguments of the rank's program (a user program's `--local_rank=N` and its own
    /// arguments; none for rsdeep's worker).
    pub args: Vec<String>,
}

/// One node of the job and the slots it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct NodePlan {
    pub host: String,
    pub slots: Vec<usize>,
}

/// Everything `rsdeep` decided before starting anything.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    pub job_id: String,
    pub token: String,
    pub device: DeviceKind,
    pub master_addr: String,
    /// 0 means "pick a free port when the rendezvous starts" (single node only).
    pub master_port: u16,
    /// The node this launcher runs (0 hosts the rendezvous).
    pub node_rank: usize,
    pub nodes: Vec<NodePlan>,
    /// Every rank of every node, in rank order.
    pub ranks: Vec<RankPlan>,
    pub selftest: bool,
    /// What every rank runs: rsdeep's worker with train.json, or the user's program.
    pub program: Program,
    /// The resolved train.json's `output_dir` (`adopt_config`); None before or without one.
    pub output_dir: Option<PathBuf>,
    pub join_timeout: Duration,
    pub heartbeat_timeout: Option<Duration>,
    /// `--hang_timeout`: silence and idleness of every rank after which the job is hung.
    pub silence_timeout: Option<Duration>,
    /// How often workers send a heartbeat (`RSDEEP_HEARTBEAT_INTERVAL_MS`).
    pub heartbeat_interval: Duration,
    pub grace_period: Duration,
    pub max_restarts: u32,
    pub rank_log_dir: Option<PathBuf>,
    /// Warnings to print before launching (e.g. an ignored CUDA_VISIBLE_DEVICES).
    pub warnings: Vec<String>,
}

/// Why no plan could be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Resources(#[from] ResourceError),
    #[error(transparent)]
    Slurm(#[from] SlurmError),
    #[error(
        "no CUDA GPU found (the CUDA driver could not be loaded or reports no device). \
         To run on CPU, pass `--device cpu --num_procs N` (N CPU ranks on this machine)"
    )]
    NoGpu,
    #[error("--num_gpus is for CUDA workers; with --device cpu use --num_procs")]
    NumGpusOnCpu,
    #[error("--num_procs is for CPU workers; add --device cpu (or use --num_gpus for GPUs)")]
    NumProcsOnCuda,
    #[error("--master_port 0 (pick a free port) works on a single node only; give a fixed port")]
    FreePortMultiNode,
    #[error("--node_rank {node_rank} is out of range: the job has {num_nodes} node(s)")]
    NodeRankOutOfRange { node_rank: usize, num_nodes: usize },
    #[error(
        "this job has {0} nodes: plan node 0 of the ssh runner with --no_ssh --node_rank 0 \
         (`LaunchPlan::needs_ssh_runner`), or start `rsdeep --no_ssh --node_rank K \
         --master_addr <node-0 address> ...` on every node"
    )]
    MultiNodeNeedsNoSsh(usize),
    #[error("multi-node jobs need --node_rank K (or SLURM_NODEID under --launcher slurm)")]
    MissingNodeRank,
    #[error(
        "multi-node jobs need the same {} and {} exported on every node \
         (e.g. {}=$(uuidgen) {}=$(openssl rand -hex 16))",
        ev::JOB_ID,
        ev::TOKEN,
        ev::JOB_ID,
        ev::TOKEN
    )]
    MissingSharedJob,
    #[error("--bind_core_list {0:?}: expected core numbers and ranges like 0-7,16,18-23")]
    BadCoreList(String),
    #[error("cannot bind {ranks} local ranks to {cores} cores")]
    TooFewCores { ranks: usize, cores: usize },
    #[error(transparent)]
    Program(#[from] ProgramError),
    #[error(
        "--autotuning runs DeepSpeed's autotuner, which rsdeep does not include: tune with `deepspeed --autotuning tune ...`, then launch the config it writes with rsdeep"
    )]
    Autotuning,
    #[error(
        "--launcher {0} is not built in rsdeep yet: use --launcher openmpi, mpich, pdsh or ssh with the same hostfile (ssh is rsdeep's own runner), or --launcher slurm inside a SLURM allocation"
    )]
    LauncherNotBuilt(&'static str),
    #[error(
        "--launcher {0} starts user programs only: a train.json job shares a secret token \
         between its nodes, which {0} could only carry on a command line; use --launcher \
         ssh with the same hostfile and flags (it sends the token over ssh's stdin)"
    )]
    FanOutRunsPrograms(&'static str),
    #[error(
        "--launcher {0} --no_ssh: this launcher was not started by mpirun (neither \
         OMPI_COMM_WORLD_RANK nor PMI_RANK is set): pass --node_rank K, or let `rsdeep \
         --launcher {0} -H hostfile ...` start every node"
    )]
    NoMpiRank(&'static str),
    #[error(
        "--heartbeat_interval {interval} must be a positive number of seconds shorter than --heartbeat_timeout {timeout}"
    )]
    HeartbeatInterval { interval: f64, timeout: f64 },
}

impl LaunchPlan {
    /// Validates the CLI against the machine and lays out every rank.
    pub fn build(args: &LaunchArgs, inputs: &PlanInputs) -> Result<Self, PlanError> {
        let mut warnings = Vec::new();
        let pool = select_resources(args, inputs, &mut warnings)?;
        if pool.is_empty() {
            return Err(ResourceError::NoResources.into());
        }
        let nodes: Vec<NodePlan> = pool
            .into_iter()
            .map(|(host, slots)| NodePlan { host, slots })
            .collect();
        let node_rank = choose_node_rank(args, inputs, nodes.len())?;
        if args.master_port == 0 && nodes.len() > 1 {
            return Err(PlanError::FreePortMultiNode);
        }
        let program = Program::from_args(args)?;
        refuse_unsupported(args, &program, nodes.len())?;
        let master_addr = match args.master_addr.as_str() {
            "" if nodes.len() == 1 => "127.0.0.1".to_string(),
            "" => nodes[0].host.clone(),
            addr => addr.to_string(),
        };
        let mut plan = LaunchPlan {
            job_id: inputs.job_id.clone(),
            token: inputs.token.clone(),
            device: args.device,
            master_addr,
            master_port: args.master_port,
            node_rank,
            nodes,
            ranks: Vec::new(),
            selftest: args.selftest,
            program,
            output_dir: None,
            join_timeout: secs(args.join_timeout),
            heartbeat_timeout: None,
            silence_timeout: args.hang_timeout.filter(|s| *s > 0.0).map(secs),
            heartbeat_interval: Duration::ZERO,
            grace_period: secs(args.grace_period),
            max_restarts: args.max_restarts,
            rank_log_dir: args.enable_each_rank_log.clone(),
            warnings,
        };
        (plan.heartbeat_timeout, plan.heartbeat_interval) =
            heartbeat_settings(args.heartbeat_timeout, args.heartbeat_interval, None)?;
        if plan.runs_user_program() {
            // A user's program sends no heartbeats: `--hang_timeout` watches it instead.
            plan.heartbeat_timeout = None;
        }
        let cores = match (&args.bind_core_list, args.bind_cores_to_rank) {
            (Some(list), true) => Some(parse_core_list(list)?),
            (None, true) => Some((0..inputs.total_cores).collect()),
            (_, false) => None,
        };
        plan.ranks = plan.layout_ranks(cores.as_deref(), inputs)?;
        Ok(plan)
    }

    /// Whether this launcher must run the ssh runner: node 0 of a job whose hostfile
    /// selects several hosts, without `--no_ssh`. That node is then planned with
    /// `--no_ssh --node_rank 0` (`build` refuses the multi-node plan without it).
    pub fn needs_ssh_runner(args: &LaunchArgs, inputs: &PlanInputs) -> Result<bool, PlanError> {
        if args.launcher != LauncherKind::Ssh || args.no_ssh {
            return Ok(false);
        }
        Ok(select_resources(args, inputs, &mut Vec::new())?.len() > 1)
    }

    /// True when this launcher starts every node through pdsh or mpirun (`--launcher
    /// pdsh|openmpi|mpich|impi` on a multi-node hostfile, or with `--force_multi`, without
    /// `--no_ssh`) and runs no rank itself.
    pub fn needs_fan_out(args: &LaunchArgs, inputs: &PlanInputs) -> Result<bool, PlanError> {
        let fan_out = [
            LauncherKind::Pdsh,
            LauncherKind::Openmpi,
            LauncherKind::Mpich,
            LauncherKind::Impi,
        ];
        if !fan_out.contains(&args.launcher) || args.no_ssh {
            return Ok(false);
        }
        Ok(args.force_multi || select_resources(args, inputs, &mut Vec::new())?.len() > 1)
    }

    /// Takes what the plan needs from the resolved train.json (loaded once, by the
    /// caller): its `output_dir`, and `heartbeat_timeout_secs` / `heartbeat_interval_secs`
    /// where the command line gave no `--heartbeat_timeout` / `--heartbeat_interval` (the
    /// CLI wins, as for other keys).
    pub fn adopt_config(
        &mut self,
        args: &LaunchArgs,
        config: &TrainConfig,
    ) -> Result<(), PlanError> {
        self.output_dir = Some(PathBuf::from(&config.args.output_dir));
        if args.heartbeat_timeout.is_some() && args.heartbeat_interval.is_some() {
            return Ok(());
        }
        let from_file = (
            config.args.heartbeat_timeout_secs,
            config.args.heartbeat_interval_secs,
        );
        (self.heartbeat_timeout, self.heartbeat_interval) = heartbeat_settings(
            args.heartbeat_timeout,
            args.heartbeat_interval,
            Some(from_file),
        )?;
        let interval_ms = self.heartbeat_interval.as_millis().max(1).to_string();
        self.set_env_all(ev::HEARTBEAT_INTERVAL_MS, &interval_ms);
        Ok(())
    }

    /// Total number of ranks.
    /// The train.json path, when rsdeep's own trainer runs.
    pub fn config_path(&self) -> Option<&std::path::Path> {
        match &self.program {
            Program::BuiltIn { config, .. } => config.as_deref(),
            Program::User(_) => None,
        }
    }

    /// The `--key value` overrides of train.json.
    pub fn overrides(&self) -> &[String] {
        match &self.program {
            Program::BuiltIn { overrides, .. } => overrides,
            Program::User(_) => &[],
        }
    }

    /// Whether the ranks run the user's program instead of rsdeep's worker.
    pub fn runs_user_program(&self) -> bool {
        self.program.user().is_some()
    }

    pub fn world_size(&self) -> usize {
        self.ranks.len()
    }

    /// The ranks this launcher starts (its own node's).
    pub fn local_ranks(&self) -> impl Iterator<Item = &RankPlan> {
        self.ranks.iter().filter(|r| r.node_rank == self.node_rank)
    }

    /// True when this launcher hosts the rendezvous.
    pub fn hosts_rendezvous(&self) -> bool {
        self.node_rank == 0
    }

    /// Sets the rendezvous port once it is known (after binding port 0).
    pub fn set_master_port(&mut self, port: u16) {
        self.master_port = port;
        for rank in &mut self.ranks {
            rank.env.insert(ev::MASTER_PORT.into(), port.to_string());
        }
    }

    /// Adds one variable to every rank (e.g. the resolved config path).
    pub fn set_env_all(&mut self, key: &str, value: &str) {
        for rank in &mut self.ranks {
            rank.env.insert(key.into(), value.into());
        }
    }

    /// Every rank of every node; with `cores` (`--bind_cores_to_rank`), each local rank
    /// gets an equal consecutive share of them.
    fn layout_ranks(
        &self,
        cores: Option<&[usize]>,
        inputs: &PlanInputs,
    ) -> Result<Vec<RankPlan>, PlanError> {
        let mut ranks = Vec::new();
        for (node_rank, node) in self.nodes.iter().enumerate() {
            let local_size = node.slots.len();
            let cores_per_rank = cores.map_or(0, |c| c.len() / local_size.max(1));
            if let Some(cores) = cores
                && cores_per_rank == 0
            {
                return Err(PlanError::TooFewCores {
                    ranks: local_size,
                    cores: cores.len(),
                });
            }
            for (local_rank, &slot) in node.slots.iter().enumerate() {
                let share = local_rank * cores_per_rank..(local_rank + 1) * cores_per_rank;
                let cpu_cores = cores.map(|cores| cores[share].to_vec());
                let mut rank = RankPlan {
                    rank: ranks.len(),
                    local_rank,
                    node_rank,
                    host: node.host.clone(),
                    device_index: (self.device == DeviceKind::Cuda).then_some(slot),
                    cpu_cores,
                    env: BTreeMap::new(),
                    args: self
                        .program
                        .user()
                        .map(|user| user.args_for(local_rank))
                        .unwrap_or_default(),
                };
                rank.env = match self.program {
                    Program::BuiltIn { .. } => self.rank_env(&rank, local_size, inputs),
                    Program::User(_) => self.user_rank_env(&rank, node, inputs),
                };
                ranks.push(rank);
            }
        }
        let world = ranks.len().to_string();
        for rank in &mut ranks {
            rank.env.insert(ev::WORLD_SIZE.into(), world.clone());
        }
        Ok(ranks)
    }

    /// The environment DeepSpeed's `launch.py` gives each rank of a user's program (so
    /// that torch.distributed, DeepSpeed, accelerate and HF Trainer work unchanged), plus
    /// the env files and the thread count. No rsdeep token or rendezvous variables: the
    /// program does not talk to rsdeep. CUDA_VISIBLE_DEVICES lists every device this node
    /// uses (DeepSpeed's rule: the program picks `cuda:LOCAL_RANK`).
    fn user_rank_env(
        &self,
        rank: &RankPlan,
        node: &NodePlan,
        inputs: &PlanInputs,
    ) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = inputs.env_file_vars.iter().cloned().collect();
        let local_size = node.slots.len();
        let pairs = [
            (ev::RANK, rank.rank.to_string()),
            (ev::LOCAL_RANK, rank.local_rank.to_string()),
            (ev::LOCAL_SIZE, local_size.to_string()),
            (ev::LOCAL_WORLD_SIZE, local_size.to_string()),
            (ev::CROSS_RANK, rank.node_rank.to_string()),
            (ev::CROSS_SIZE, self.nodes.len().to_string()),
            (ev::GROUP_RANK, rank.node_rank.to_string()),
            (ev::MASTER_ADDR, self.master_addr.clone()),
            (ev::MASTER_PORT, self.master_port.to_string()),
        ];
        env.extend(pairs.into_iter().map(|(k, v)| (k.to_string(), v)));
        if self.device == DeviceKind::Cuda {
            let visible: Vec<String> = node.slots.iter().map(usize::to_string).collect();
            env.insert(ev::CUDA_VISIBLE_DEVICES.into(), visible.join(","));
        }
        self.set_thread_count(&mut env, rank, local_size, inputs);
        env
    }

    fn rank_env(
        &self,
        rank: &RankPlan,
        local_size: usize,
        inputs: &PlanInputs,
    ) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = inputs.env_file_vars.iter().cloned().collect();
        let comm_host = if is_loopback(&self.master_addr) {
            "127.0.0.1"
        } else {
            &rank.host
        };
        let visible = rank.device_index.map(|d| d.to_string()).unwrap_or_default();
        let pairs: [(&str, String); 20] = [
            (ev::RANK, rank.rank.to_string()),
            (ev::LOCAL_RANK, rank.local_rank.to_string()),
            (ev::LOCAL_WORLD_SIZE, local_size.to_string()),
            (ev::LOCAL_SIZE, local_size.to_string()),
            (ev::GROUP_RANK, rank.node_rank.to_string()),
            (ev::CROSS_RANK, rank.node_rank.to_string()),
            (ev::CROSS_SIZE, self.nodes.len().to_string()),
            (ev::MASTER_ADDR, self.master_addr.clone()),
            (ev::MASTER_PORT, self.master_port.to_string()),
            (ev::CUDA_VISIBLE_DEVICES, visible),
            (ev::JOB_ID, self.job_id.clone()),
            (ev::TOKEN, self.token.clone()),
            (ev::NODE_RANK, rank.node_rank.to_string()),
            (ev::NUM_NODES, self.nodes.len().to_string()),
            (ev::DEVICE, self.device.as_str().to_string()),
            (ev::HOST, rank.host.clone()),
            (ev::COMM_HOST, comm_host.to_string()),
            (
                ev::SELFTEST,
                if self.selftest { "1" } else { "0" }.to_string(),
            ),
            (ev::RESTART_COUNT, "0".to_string()),
            (
                ev::HEARTBEAT_INTERVAL_MS,
                self.heartbeat_interval.as_millis().max(1).to_string(),
            ),
        ];
        env.extend(pairs.into_iter().map(|(k, v)| (k.to_string(), v)));
        self.set_thread_count(&mut env, rank, local_size, inputs);
        env
    }

    /// OMP_NUM_THREADS: the bound cores' count, else the node's cores shared by its ranks
    /// unless the user set it.
    fn set_thread_count(
        &self,
        env: &mut BTreeMap<String, String>,
        rank: &RankPlan,
        local_size: usize,
        inputs: &PlanInputs,
    ) {
        if let Some(cores) = &rank.cpu_cores {
            env.insert(ev::OMP_NUM_THREADS.into(), cores.len().to_string());
        } else if !inputs.omp_threads_from_user && !env.contains_key(ev::OMP_NUM_THREADS) {
            // Each rank's intra-op threads share the node's cores instead of every rank
            // spawning one per core (oversubscription costs more than it gains).
            let threads = (inputs.total_cores / local_size.max(1)).max(1);
            env.insert(ev::OMP_NUM_THREADS.into(), threads.to_string());
        }
    }

    /// The `--dry_run` report: every rank's host, device and environment (token hidden).
    pub fn render(&self) -> String {
        let mut out = format!(
            "rsdeep launch plan: job {} | {} rank(s) on {} node(s) | device {} | rendezvous {}:{}{}\n",
            self.job_id,
            self.world_size(),
            self.nodes.len(),
            self.device.as_str(),
            self.master_addr,
            self.master_port,
            if self.master_port == 0 {
                " (free port picked at launch)"
            } else {
                ""
            },
        );
        for warning in &self.warnings {
            out.push_str(&format!("warning: {warning}\n"));
        }
        for rank in &self.ranks {
            let device = match rank.device_index {
                Some(d) => format!("cuda:{d}"),
                None => "cpu".to_string(),
            };
            out.push_str(&format!(
                "rank {} host {} node {} local_rank {} device {}\n",
                rank.rank, rank.host, rank.node_rank, rank.local_rank, device
            ));
            for (key, value) in &rank.env {
                let shown = if key == ev::TOKEN { "<hidden>" } else { value };
                out.push_str(&format!("    {key}={shown}\n"));
            }
        }
        out
    }
}

/// `--bind_core_list`: `1,3-5,7` → [1, 3, 4, 5, 7] (DeepSpeed's syntax).
fn parse_core_list(text: &str) -> Result<Vec<usize>, PlanError> {
    let bad = || PlanError::BadCoreList(text.to_string());
    let mut cores = Vec::new();
    for part in text.split(',').map(str::trim) {
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        let first: usize = first.trim().parse().map_err(|_| bad())?;
        let last: usize = last.trim().parse().map_err(|_| bad())?;
        if first > last {
            return Err(bad());
        }
        cores.extend(first..=last);
    }
    Ok(cores)
}

/// DeepSpeed runner features rsdeep does not have, refused with what to do instead. The
/// multi-node runner only matters when there are several nodes (DeepSpeed ignores it
/// on one node too).
fn refuse_unsupported(
    args: &LaunchArgs,
    program: &Program,
    num_nodes: usize,
) -> Result<(), PlanError> {
    if args.autotuning.is_some() {
        return Err(PlanError::Autotuning);
    }
    let multi_node = num_nodes > 1 || args.force_multi;
    match args.launcher {
        LauncherKind::Ssh | LauncherKind::Slurm | LauncherKind::Local => Ok(()),
        _ if !multi_node => Ok(()),
        LauncherKind::Mvapich => Err(PlanError::LauncherNotBuilt("mvapich")),
        kind => match program.user() {
            Some(_) => Ok(()),
            None => Err(PlanError::FanOutRunsPrograms(kind.as_str())),
        },
    }
}

/// The hang timeout (`None`: off) and heartbeat period. Timeout: `--heartbeat_timeout`,
/// else train.json's `heartbeat_timeout_secs` (`from_file` = (timeout, interval)), else
/// 300 s. Interval: `--heartbeat_interval` (must be shorter than the timeout), else
/// train.json's when shorter than the timeout, else 2 s or a quarter of a shorter timeout.
fn heartbeat_settings(
    cli_timeout: Option<f64>,
    cli_interval: Option<f64>,
    from_file: Option<(f64, f64)>,
) -> Result<(Option<Duration>, Duration), PlanError> {
    const DEFAULT_TIMEOUT_SECS: f64 = 300.0;
    let timeout = cli_timeout
        .or(from_file.map(|(timeout, _)| timeout))
        .unwrap_or(DEFAULT_TIMEOUT_SECS);
    let shorter = |interval: f64| timeout <= 0.0 || interval < timeout;
    let interval = match (cli_interval, from_file) {
        (Some(interval), _) => {
            if !(interval.is_finite() && interval > 0.0 && shorter(interval)) {
                return Err(PlanError::HeartbeatInterval { interval, timeout });
            }
            interval
        }
        (None, Some((_, interval))) if interval > 0.0 && shorter(interval) => interval,
        (None, _) => {
            let quarter = if timeout > 0.0 { timeout / 4.0 } else { 2.0 };
            quarter.clamp(0.05, 2.0)
        }
    };
    Ok(((timeout > 0.0).then(|| secs(timeout)), secs(interval)))
}

fn secs(value: f64) -> Duration {
    Duration::from_secs_f64(value.max(0.0))
}

fn is_loopback(addr: &str) -> bool {
    addr == "localhost" || addr.starts_with("127.") || addr == "::1"
}

/// The pool of hosts and slots after hostfile, CUDA_VISIBLE_DEVICES, include/exclude and
/// the count flags.
fn select_resources(
    args: &LaunchArgs,
    inputs: &PlanInputs,
    warnings: &mut Vec<String>,
) -> Result<ResourcePool, PlanError> {
    let cpu = args.device == DeviceKind::Cpu;
    if cpu && args.num_gpus.is_some() {
        return Err(PlanError::NumGpusOnCpu);
    }
    if !cpu && args.num_procs.is_some() {
        return Err(PlanError::NumProcsOnCuda);
    }
    if args.launcher == LauncherKind::Slurm {
        return slurm_pool(args, inputs);
    }
    let per_node = if cpu { args.num_procs } else { args.num_gpus };
    let filtered = !args.include.is_empty() || !args.exclude.is_empty();
    let mut include = args.include.clone();
    let pool: ResourcePool = match (&inputs.hostfile, cpu) {
        (Some(hosts), _) => hosts
            .iter()
            .map(|h| (h.host.clone(), (0..h.slots).collect()))
            .collect(),
        (None, true) => vec![(LOCALHOST.into(), (0..per_node.unwrap_or(1)).collect())],
        (None, false) => {
            let flags_given = filtered || args.num_gpus.is_some() || args.num_nodes.is_some();
            match &inputs.cuda_visible_devices {
                Some(visible) if flags_given => {
                    warnings.push(resources::visible_devices_warning(visible))
                }
                Some(visible) => include = format!("{LOCALHOST}:{visible}"),
                None => {}
            }
            local_cuda_pool(inputs, args.num_gpus)?
        }
    };
    let filtered_pool = resources::filter_resources(&pool, &include, &args.exclude)?;
    Ok(resources::limit_resources(
        filtered_pool,
        args.num_nodes,
        per_node,
        filtered,
    )?)
}

/// `localhost` with the driver's devices, or the visible list (which defines the slots).
fn local_cuda_pool(
    inputs: &PlanInputs,
    num_gpus: Option<usize>,
) -> Result<ResourcePool, PlanError> {
    let devices: Vec<usize> = match (&inputs.cuda_visible_devices, inputs.cuda_device_count) {
        (Some(v), _) if !v.trim().is_empty() => resources::parse_visible_devices(v)?,
        (_, Some(n)) if n > 0 => (0..n).collect(),
        _ => Vec::new(),
    };
    if devices.is_empty()
        || num_gpus.is_some_and(|n| inputs.cuda_device_count.unwrap_or(0) < n.min(1))
    {
        return Err(PlanError::NoGpu);
    }
    Ok(vec![(LOCALHOST.into(), devices)])
}

/// `--launcher slurm`: every node of SLURM's list with this node's slots (nodes are
/// assumed alike): `--num_procs` CPU ranks, or the GPUs `SlurmJob::cuda_slots` finds.
fn slurm_pool(args: &LaunchArgs, inputs: &PlanInputs) -> Result<ResourcePool, PlanError> {
    let job = slurm_job(inputs)?;
    let flags = [
        ("--include", !args.include.is_empty()),
        ("--exclude", !args.exclude.is_empty()),
        ("--num_nodes", args.num_nodes.is_some()),
        ("--node_rank", args.node_rank.is_some()),
    ];
    if let Some((flag, _)) = flags.into_iter().find(|(_, given)| *given) {
        return Err(SlurmError::UnsupportedFlag(flag).into());
    }
    let slots: Vec<usize> = match args.device {
        DeviceKind::Cpu => (0..args.num_procs.unwrap_or(1)).collect(),
        DeviceKind::Cuda => {
            job.cuda_slots(args.num_gpus, inputs.cuda_visible_devices.as_deref())?
        }
    };
    Ok(job
        .nodes
        .iter()
        .map(|host| (host.clone(), slots.clone()))
        .collect())
}

fn slurm_job(inputs: &PlanInputs) -> Result<&SlurmJob, PlanError> {
    inputs
        .slurm
        .as_ref()
        .ok_or(PlanError::Slurm(SlurmError::Missing {
            var: crate::plan::slurm::JOB_NODELIST,
        }))
}

fn choose_node_rank(
    args: &LaunchArgs,
    inputs: &PlanInputs,
    num_nodes: usize,
) -> Result<usize, PlanError> {
    let node_rank = match args.launcher {
        LauncherKind::Slurm => Some(slurm_job(inputs)?.node_id),
        LauncherKind::Openmpi | LauncherKind::Mpich | LauncherKind::Impi
            if args.no_ssh && num_nodes > 1 =>
        {
            let missing = PlanError::NoMpiRank(args.launcher.as_str());
            Some(args.node_rank.or(inputs.mpi_rank).ok_or(missing)?)
        }
        _ => args.node_rank,
    };
    if num_nodes > 1 {
        if args.launcher == LauncherKind::Ssh && !args.no_ssh {
            return Err(PlanError::MultiNodeNeedsNoSsh(num_nodes));
        }
        if !inputs.job_from_env {
            return Err(PlanError::MissingSharedJob);
        }
    }
    let node_rank = match node_rank {
        Some(r) => r,
        None if num_nodes == 1 => 0,
        None => return Err(PlanError::MissingNodeRank),
    };
    if node_rank >= num_nodes {
        return Err(PlanError::NodeRankOutOfRange {
            node_rank,
            num_nodes,
        });
    }
    Ok(node_rank)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(list: &[&str]) -> LaunchArgs {
        let mut all = vec!["rsdeep"];
        all.extend_from_slice(list);
        LaunchArgs::try_parse_from(all).unwrap()
    }

    fn inputs() -> PlanInputs {
        PlanInputs {
            job_id: "job1".into(),
            token: "secret".into(),
            total_cores: 8,
            omp_threads_from_user: false,
            ..Default::default()
        }
    }

    fn hosts(list: &[(&str, usize)]) -> Option<Vec<HostEntry>> {
        Some(
            list.iter()
                .map(|(h, s)| HostEntry {
                    host: h.to_string(),
                    slots: *s,
                })
                .collect(),
        )
    }

    #[test]
    fn cpu_ranks_get_the_full_environment() {
        let plan = LaunchPlan::build(
            &args(&["--device", "cpu", "--num_procs", "4", "--selftest"]),
            &inputs(),
        )
        .unwrap();
        assert_eq!(plan.world_size(), 4);
        let r2 = &plan.ranks[2];
        assert_eq!(
            (r2.rank, r2.local_rank, r2.node_rank, r2.device_index),
            (2, 2, 0, None)
        );
        let env = |k: &str| r2.env.get(k).cloned().unwrap_or_default();
        assert_eq!(env("RANK"), "2");
        assert_eq!(env("LOCAL_RANK"), "2");
        assert_eq!(env("WORLD_SIZE"), "4");
        assert_eq!(env("LOCAL_WORLD_SIZE"), "4");
        assert_eq!(env("LOCAL_SIZE"), "4");
        assert_eq!(env("CROSS_RANK"), "0");
        assert_eq!(env("GROUP_RANK"), "0");
        assert_eq!(env("CROSS_SIZE"), "1");
        assert_eq!(env("MASTER_ADDR"), "127.0.0.1");
        assert_eq!(env("MASTER_PORT"), "29500");
        assert_eq!(env("CUDA_VISIBLE_DEVICES"), "");
        assert_eq!(env("RSDEEP_TOKEN"), "secret");
        assert_eq!(env("RSDEEP_JOB_ID"), "job1");
        assert_eq!(env("RSDEEP_DEVICE"), "cpu");
        assert_eq!(env("RSDEEP_SELFTEST"), "1");
    }

    #[test]
    fn visible_devices_become_the_local_include_list() {
        let mut machine = inputs();
        machine.cuda_visible_devices = Some("2,5".into());
        machine.cuda_device_count = Some(2);
        let plan = LaunchPlan::build(&args(&["t.json"]), &machine).unwrap();
        let devices: Vec<_> = plan
            .ranks
            .iter()
            .map(|r| r.env["CUDA_VISIBLE_DEVICES"].clone())
            .collect();
        assert_eq!(devices, ["2", "5"]);
        assert_eq!(plan.ranks[1].env["LOCAL_RANK"], "1");
        assert!(plan.warnings.is_empty());
    }

    #[test]
    fn visible_devices_are_ignored_with_a_warning_when_counts_are_given() {
        let mut machine = inputs();
        machine.cuda_visible_devices = Some("3".into());
        machine.cuda_device_count = Some(4);
        let plan = LaunchPlan::build(&args(&["--num_gpus", "2", "t.json"]), &machine).unwrap();
        assert_eq!(plan.world_size(), 2);
        assert_eq!(plan.warnings.len(), 1);
        assert!(plan.warnings[0].contains("ignoring it"));
    }

    #[test]
    fn driver_devices_and_include_filter() {
        let mut machine = inputs();
        machine.cuda_device_count = Some(4);
        let plan = LaunchPlan::build(&args(&["-i", "localhost:1,3", "t.json"]), &machine).unwrap();
        let devices: Vec<_> = plan.ranks.iter().map(|r| r.device_index).collect();
        assert_eq!(devices, [Some(1), Some(3)]);
        assert_eq!(plan.ranks[1].env["LOCAL_RANK"], "1");
    }

    #[test]
    fn no_gpu_tells_how_to_run_on_cpu() {
        let err = LaunchPlan::build(&args(&["t.json"]), &inputs()).unwrap_err();
        assert!(
            err.to_string().contains("--device cpu --num_procs N"),
            "{err}"
        );
    }

    #[test]
    fn ranks_follow_node_order_then_local_index() {
        let mut machine = inputs();
        machine.hostfile = hosts(&[("a", 2), ("b", 3)]);
        machine.job_from_env = true;
        let plan = LaunchPlan::build(
            &args(&[
                "--device",
                "cpu",
                "--no_ssh",
                "--node_rank",
                "1",
                "--master_addr",
                "a",
                "t.json",
            ]),
            &machine,
        )
        .unwrap();
        let layout: Vec<_> = plan
            .ranks
            .iter()
            .map(|r| (r.rank, r.host.as_str(), r.local_rank))
            .collect();
        assert_eq!(
            layout,
            [
                (0, "a", 0),
                (1, "a", 1),
                (2, "b", 0),
                (3, "b", 1),
                (4, "b", 2)
            ]
        );
        assert_eq!(plan.local_ranks().count(), 3);
        assert_eq!(plan.ranks[3].env["LOCAL_SIZE"], "3");
        assert_eq!(plan.ranks[3].env["CROSS_SIZE"], "2");
        assert_eq!(plan.ranks[3].env["RSDEEP_COMM_HOST"], "b");
        assert!(!plan.hosts_rendezvous());
    }

    #[test]
    fn multi_node_rules() {
        let mut machine = inputs();
        machine.hostfile = hosts(&[("a", 1), ("b", 1)]);
        let cpu = ["--device", "cpu"];
        let err =
            LaunchPlan::build(&args(&[&cpu[..], &["t.json"]].concat()), &machine).unwrap_err();
        assert!(matches!(err, PlanError::MultiNodeNeedsNoSsh(2)));
        let no_ssh = [&cpu[..], &["--no_ssh", "--node_rank", "0", "t.json"]].concat();
        assert!(matches!(
            LaunchPlan::build(&args(&no_ssh), &machine).unwrap_err(),
            PlanError::MissingSharedJob
        ));
        machine.job_from_env = true;
        let far = [&cpu[..], &["--no_ssh", "--node_rank", "2", "t.json"]].concat();
        assert!(matches!(
            LaunchPlan::build(&args(&far), &machine).unwrap_err(),
            PlanError::NodeRankOutOfRange {
                node_rank: 2,
                num_nodes: 2
            }
        ));
        let port0 = [
            &cpu[..],
            &[
                "--no_ssh",
                "--node_rank",
                "0",
                "--master_port",
                "0",
                "t.json",
            ],
        ]
        .concat();
        assert!(matches!(
            LaunchPlan::build(&args(&port0), &machine).unwrap_err(),
            PlanError::FreePortMultiNode
        ));
        let plan = LaunchPlan::build(&args(&no_ssh), &machine).unwrap();
        assert_eq!(plan.master_addr, "a");
    }

    fn slurm_machine(node_id: usize, gpus: Option<usize>) -> PlanInputs {
        let mut machine = inputs();
        machine.job_from_env = true;
        machine.slurm = Some(SlurmJob {
            job_id: "77".into(),
            step_id: Some("0".into()),
            nodes: vec!["node01".into(), "node02".into()],
            node_id,
            gpus_on_node: gpus,
            restart_count: 0,
        });
        machine
    }

    #[test]
    fn slurm_nodes_node_id_and_master_come_from_slurm() {
        let cpu = [
            "--launcher",
            "slurm",
            "--device",
            "cpu",
            "--num_procs",
            "2",
            "t.json",
        ];
        let plan = LaunchPlan::build(&args(&cpu), &slurm_machine(1, None)).unwrap();
        let layout: Vec<_> = plan
            .ranks
            .iter()
            .map(|r| (r.rank, r.host.as_str(), r.local_rank))
            .collect();
        assert_eq!(
            layout,
            [
                (0, "node01", 0),
                (1, "node01", 1),
                (2, "node02", 0),
                (3, "node02", 1)
            ]
        );
        assert_eq!((plan.node_rank, plan.master_addr.as_str()), (1, "node01"));
        assert_eq!(
            plan.local_ranks().map(|r| r.rank).collect::<Vec<_>>(),
            [2, 3]
        );
        assert!(!plan.hosts_rendezvous());
        let gpus = ["--launcher", "slurm", "--master_addr", "10.0.0.1", "t.json"];
        let plan = LaunchPlan::build(&args(&gpus), &slurm_machine(0, Some(4))).unwrap();
        assert_eq!(plan.world_size(), 8);
        assert_eq!(plan.ranks[7].device_index, Some(3));
        assert_eq!(plan.master_addr, "10.0.0.1");
    }

    #[test]
    fn slurm_refuses_host_selection_flags_and_missing_slurm_state() {
        for flag in [
            ["--include", "node01"],
            ["--node_rank", "0"],
            ["--num_nodes", "1"],
        ] {
            let list = [
                &["--launcher", "slurm", "--device", "cpu"][..],
                &flag[..],
                &["t.json"],
            ]
            .concat();
            let err = LaunchPlan::build(&args(&list), &slurm_machine(0, None)).unwrap_err();
            assert!(err.to_string().contains(flag[0]), "{err}");
        }
        let cpu = ["--launcher", "slurm", "--device", "cpu", "t.json"];
        let err = LaunchPlan::build(&args(&cpu), &inputs()).unwrap_err();
        assert!(err.to_string().contains("SLURM_JOB_NODELIST"), "{err}");
        let err = LaunchPlan::build(
            &args(&["--launcher", "slurm", "t.json"]),
            &slurm_machine(0, None),
        )
        .unwrap_err();
        assert!(err.to_string().contains("SLURM_GPUS_ON_NODE"), "{err}");
    }

    #[test]
    fn omp_threads_split_the_cores_unless_the_user_set_them() {
        let cpu = ["--device", "cpu", "--num_procs", "4", "t.json"];
        let mut machine = inputs();
        let plan = LaunchPlan::build(&args(&cpu), &machine).unwrap();
        assert_eq!(plan.ranks[3].env["OMP_NUM_THREADS"], "2");
        machine.omp_threads_from_user = true;
        let plan = LaunchPlan::build(&args(&cpu), &machine).unwrap();
        assert!(!plan.ranks[3].env.contains_key("OMP_NUM_THREADS"));
    }

    #[test]
    fn heartbeat_interval_reaches_workers_and_must_be_shorter_than_the_timeout() {
        let cpu = ["--device", "cpu", "--num_procs", "2"];
        let interval = |extra: &[&str]| {
            let list = [&cpu[..], extra, &["t.json"]].concat();
            let plan = LaunchPlan::build(&args(&list), &inputs());
            plan.map(|p| p.ranks[1].env["RSDEEP_HEARTBEAT_INTERVAL_MS"].clone())
        };
        assert_eq!(interval(&[]).unwrap(), "2000");
        assert_eq!(interval(&["--heartbeat_timeout", "3"]).unwrap(), "750");
        assert_eq!(
            interval(&["--heartbeat_timeout", "3", "--heartbeat_interval", "0.5"]).unwrap(),
            "500"
        );
        let err = interval(&["--heartbeat_timeout", "3", "--heartbeat_interval", "3"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("shorter than --heartbeat_timeout 3"),
            "{err}"
        );
        assert!(interval(&["--heartbeat_interval", "0"]).is_err());
    }

    #[test]
    fn train_json_heartbeat_keys_apply_unless_the_command_line_gives_them() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("train.json");
        let text = r#"{"config_name": "m", "tokenizer_name": "m", "train_files": "d.jsonl",
            "output_dir": "out", "heartbeat_timeout_secs": 40, "heartbeat_interval_secs": 4}"#;
        std::fs::write(&config, text).unwrap();
        let config = config.to_string_lossy().into_owned();
        // Launcher flags before train.json, train.json overrides after it.
        let plan = |flags: &[&str], overrides: &[&str]| {
            let cpu = ["--device", "cpu", "--num_procs", "2"];
            let list = [&cpu[..], flags, &[&config], overrides].concat();
            let launch_args = args(&list);
            let mut plan = LaunchPlan::build(&launch_args, &inputs()).unwrap();
            let path = plan.config_path().unwrap().to_path_buf();
            let resolved =
                rsdeep_contract::config::load(&path, plan.overrides(), plan.world_size()).unwrap();
            plan.adopt_config(&launch_args, &resolved).unwrap();
            let interval = plan.ranks[1].env["RSDEEP_HEARTBEAT_INTERVAL_MS"].clone();
            (plan.heartbeat_timeout.map(|t| t.as_secs_f64()), interval)
        };
        assert_eq!(plan(&[], &[]), (Some(40.0), "4000".to_string()));
        // The CLI wins; a file interval not shorter than the CLI timeout gives way.
        let cli_timeout = plan(&["--heartbeat_timeout", "3"], &[]);
        assert_eq!(cli_timeout, (Some(3.0), "750".to_string()));
        assert_eq!(
            plan(&["--heartbeat_interval", "1"], &[]),
            (Some(40.0), "1000".to_string())
        );
        // A train.json override of the key counts as train.json.
        assert_eq!(
            plan(&[], &["--heartbeat_timeout_secs", "20"]),
            (Some(20.0), "4000".to_string())
        );
    }

    #[test]
    fn env_file_vars_reach_workers_but_never_override_the_contract() {
        let mut machine = inputs();
        machine.env_file_vars = vec![
            ("NCCL_DEBUG".into(), "INFO".into()),
            ("RANK".into(), "99".into()),
        ];
        let plan = LaunchPlan::build(
            &args(&["--device", "cpu", "--num_procs", "2", "t.json"]),
            &machine,
        )
        .unwrap();
        assert_eq!(plan.ranks[1].env["NCCL_DEBUG"], "INFO");
        assert_eq!(plan.ranks[1].env["RANK"], "1");
    }

    #[test]
    fn bind_cores_splits_cores_and_sets_omp_threads() {
        let plan = LaunchPlan::build(
            &args(&[
                "--device",
                "cpu",
                "--num_procs",
                "2",
                "--bind_cores_to_rank",
                "--selftest",
            ]),
            &inputs(),
        )
        .unwrap();
        assert_eq!(plan.ranks[1].cpu_cores, Some(vec![4, 5, 6, 7]));
        assert_eq!(plan.ranks[1].env["OMP_NUM_THREADS"], "4");
        let err = LaunchPlan::build(
            &args(&[
                "--device",
                "cpu",
                "--num_procs",
                "16",
                "--bind_cores_to_rank",
                "--selftest",
            ]),
            &inputs(),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            PlanError::TooFewCores {
                ranks: 16,
                cores: 8
            }
        ));
    }

    #[test]
    fn dry_run_lists_every_rank_and_hides_the_token() {
        let mut plan = LaunchPlan::build(
            &args(&["--device", "cpu", "--num_procs", "2", "t.json"]),
            &inputs(),
        )
        .unwrap();
        plan.set_master_port(4242);
        let text = plan.render();
        assert!(
            text.contains("rank 1 host localhost node 0 local_rank 1 device cpu"),
            "{text}"
        );
        assert!(text.contains("    MASTER_PORT=4242"));
        assert!(text.contains("RSDEEP_TOKEN=<hidden>"));
        assert!(!text.contains("secret"));
    }

    #[test]
    fn a_core_list_is_shared_among_local_ranks() {
        assert_eq!(parse_core_list("1,3-5,7").unwrap(), [1, 3, 4, 5, 7]);
        assert!(matches!(
            parse_core_list("3-1"),
            Err(PlanError::BadCoreList(_))
        ));
        assert!(parse_core_list("a").is_err());
        let argv = [
            "--device",
            "cpu",
            "--num_procs",
            "2",
            "--bind_cores_to_rank",
        ];
        let plan = LaunchPlan::build(
            &args(&[&argv[..], &["--bind_core_list", "4-7", "t.json"]].concat()),
            &inputs(),
        )
        .unwrap();
        assert_eq!(plan.ranks[0].cpu_cores.as_deref(), Some(&[4, 5][..]));
        assert_eq!(plan.ranks[1].cpu_cores.as_deref(), Some(&[6, 7][..]));
        assert_eq!(plan.ranks[1].env["OMP_NUM_THREADS"], "2");
    }

    #[test]
    fn deepspeed_features_rsdeep_lacks_are_refused_with_what_to_do() {
        let cpu = ["--device", "cpu", "--num_procs", "1"];
        let autotuning = [&cpu[..], &["--autotuning", "tune", "t.json"]].concat();
        let err = LaunchPlan::build(&args(&autotuning), &inputs()).unwrap_err();
        assert!(matches!(err, PlanError::Autotuning), "{err}");
        // The multi-node runner only matters with several nodes, as in DeepSpeed.
        let single = [&cpu[..], &["--launcher", "mvapich", "t.json"]].concat();
        assert!(LaunchPlan::build(&args(&single), &inputs()).is_ok());
        let forced = [
            &cpu[..],
            &["--launcher", "mvapich", "--force_multi", "x.py"],
        ]
        .concat();
        let err = LaunchPlan::build(&args(&forced), &inputs()).unwrap_err();
        assert!(
            err.to_string().contains("--launcher mvapich is not built"),
            "{err}"
        );
        // pdsh and mpirun start programs; a train.json job's token needs the ssh runner.
        for kind in ["pdsh", "openmpi", "mpich", "impi"] {
            let json = [&cpu[..], &["--launcher", kind, "--force_multi", "t.json"]].concat();
            let err = LaunchPlan::build(&args(&json), &inputs()).unwrap_err();
            assert!(matches!(err, PlanError::FanOutRunsPrograms(_)), "{err}");
            assert!(err.to_string().contains("use --launcher ssh"), "{err}");
            let script = [&cpu[..], &["--launcher", kind, "--force_multi", "x.py"]].concat();
            assert!(LaunchPlan::build(&args(&script), &inputs()).is_ok());
        }
    }

    #[test]
    fn a_launcher_mpirun_started_takes_its_node_rank_from_mpi() {
        let hostfile = hosts(&[("a", 1), ("b", 1)]);
        let argv = [
            "--launcher",
            "openmpi",
            "--no_ssh",
            "--device",
            "cpu",
            "x.py",
        ];
        let machine = PlanInputs {
            hostfile: hostfile.clone(),
            job_from_env: true,
            mpi_rank: Some(1),
            ..inputs()
        };
        let plan = LaunchPlan::build(&args(&argv), &machine).unwrap();
        assert_eq!(plan.node_rank, 1);
        let outside_mpi = PlanInputs {
            mpi_rank: None,
            ..machine
        };
        let err = LaunchPlan::build(&args(&argv), &outside_mpi).unwrap_err();
        assert!(matches!(err, PlanError::NoMpiRank("openmpi")), "{err}");
    }

    #[test]
    fn a_user_program_gets_deepspeeds_environment_and_its_local_rank_argument() {
        let argv = ["-i", "localhost:1,3", "train.py", "--deepspeed", "ds.json"];
        let mut machine = inputs();
        machine.cuda_device_count = Some(4);
        let plan = LaunchPlan::build(&args(&argv), &machine).unwrap();
        assert!(plan.runs_user_program());
        assert_eq!(plan.heartbeat_timeout, None);
        let rank1 = &plan.ranks[1];
        assert_eq!(
            rank1.args,
            ["-u", "train.py", "--local_rank=1", "--deepspeed", "ds.json"]
        );
        assert_eq!(rank1.env["CUDA_VISIBLE_DEVICES"], "1,3");
        for (key, value) in [
            ("RANK", "1"),
            ("LOCAL_RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_SIZE", "2"),
            ("CROSS_RANK", "0"),
            ("CROSS_SIZE", "1"),
            ("MASTER_PORT", "29500"),
        ] {
            assert_eq!(rank1.env[key], value, "{key}");
        }
        assert!(!rank1.env.contains_key("RSDEEP_TOKEN"));
    }

    #[test]
    fn config_is_required_without_selftest_and_flag_misuse_is_explained() {
        let err = LaunchPlan::build(&args(&["--device", "cpu"]), &inputs()).unwrap_err();
        assert!(matches!(err, PlanError::Program(ProgramError::Missing)));
        let err = LaunchPlan::build(
            &args(&["--device", "cpu", "--num_gpus", "2", "t.json"]),
            &inputs(),
        )
        .unwrap_err();
        assert!(matches!(err, PlanError::NumGpusOnCpu));
    }
}
