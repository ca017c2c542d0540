//! The launch sequence of `rsdeep`: gather what the plan needs from the machine, resolve
//! train.json for the world size, print the plan (`--dry_run`) or host the rendezvous
//! (node 0), spawn the local workers and supervise them, restarting up to
//! `--max_restarts` times. Binary code: errors are `anyhow`, usage errors are tagged
//! with `UsageError` so `main` exits 2.

pub mod elastic;
pub mod fanout;
pub mod output_dir;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::nodes::coordinate::follow::{self, Regroup};
use crate::nodes::fanout::{FanOutKind, FanOutLaunch};
use crate::nodes::mpi;
use crate::nodes::ssh::{self, SshLaunch, SshNodes};
use crate::plan::cli::{DeviceKind, LaunchArgs, LauncherKind};
use crate::plan::elastic::{self as elastic_plan, ElasticError, ElasticPolicy};
use crate::plan::program::Program;
use crate::plan::slurm::SlurmJob;
use crate::plan::{LaunchPlan, PlanInputs};
use crate::plan::{envfile, hostfile, resources};
use crate::rendezvous::{self, RendezvousState, ServerHandle};
use crate::supervise::{self, Outcome, SuperviseOptions};
use anyhow::{Context, Result};
use output_dir::{Acquired, OutputDirLock};
use rsdeep_contract::config;
use rsdeep_contract::env as ev;
use rsdeep_proto::tls;
use tonic::transport::ServerTlsConfig;

use crate::supervise::attempt::{
    AfterAttempt, after_attempt, announce_regroup, announce_world, rank_program, report_outcome,
    resume_point, spawn_local_workers, supervise_options, world_spec,
};

/// Marks an error as the user's (bad flag, plan or config): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

fn usage(err: impl std::fmt::Display) -> anyhow::Error {
    UsageError(err.to_string()).into()
}

/// What this launcher does in its job: decided once from the command line and the plan,
/// then `run` dispatches on it.
enum NodeRole {
    /// The whole job runs on this node.
    SingleNode,
    /// Node 0 of a hostfile job: also starts, streams and stops the other nodes over ssh.
    SshLead(SshLaunch),
    /// A node the ssh lead started (`--token_stdin`), or pdsh (`--stop_on_stdin_eof`):
    /// stops when its ssh session ends and runs the attempt node 0 names.
    SshFollower,
    /// The launcher the user started under `--launcher pdsh|openmpi|mpich|impi` on
    /// several hosts: starts every node through pdsh or mpirun and runs no rank itself.
    FanOutLead(FanOutLaunch),
    /// A node mpirun started (`--launcher openmpi|mpich|impi --no_ssh`): runs the attempt
    /// the lead names; mpirun stops it, and it stops when mpirun is gone.
    MpiNode,
    /// `--no_ssh --node_rank K`: one node of a job the user starts on every node.
    ManualNode,
    /// Node 0 under `--launcher slurm`: decides restarts and stops for every node.
    SlurmLead,
    /// Node K >= 1 under `--launcher slurm`: follows node 0's decisions.
    SlurmFollower,
}

/// Runs the whole launch; returns the process exit code.
pub fn run(args: LaunchArgs, started: Instant) -> Result<i32> {
    // Many ranks (and any flood on the rendezvous port) need descriptors.
    if let Err(e) = rendezvous::guard::raise_open_file_limit() {
        eprintln!("rsdeep: warning: cannot raise the open-file limit: {e}");
    }
    let inputs = gather_inputs(&args)?;
    let (mut plan, role) = plan_job(&args, &inputs)?;
    let elastic = ElasticPolicy::from_args(&args, plan.nodes.len()).map_err(usage)?;
    let can_regroup = matches!(
        role,
        NodeRole::SshLead(_) | NodeRole::SlurmLead | NodeRole::SlurmFollower
    );
    if elastic.is_some() && !can_regroup {
        return Err(usage(ElasticError::NoRunnerToRegroup));
    }
    if let NodeRole::FanOutLead(launch) = &role {
        return lead_fan_out(&args, &plan, launch);
    }
    for warning in &plan.warnings {
        eprintln!("rsdeep: warning: {warning}");
    }
    let job_dir = job_dir_of(&plan);
    let resolved = resolve_config(&mut plan, &job_dir, None)?;
    if let Some(config) = &resolved {
        plan.adopt_config(&args, config).map_err(usage)?;
    }
    let tls = rendezvous_tls(&args, &mut plan)?;
    if args.dry_run {
        print!("{}", plan.render());
        if let NodeRole::SshLead(launch) = &role {
            print!("{}", launch.render());
        }
        return Ok(0);
    }
    // Held by the deciding launcher until the job ends, restarts included.
    let _output_lock = match (&resolved, plan.hosts_rendezvous()) {
        (Some(config), true) => Some(claim_output_dir(config, &plan.job_id)?),
        _ => None,
    };
    if let NodeRole::SshLead(launch) = &role {
        launch.preflight()?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut rendezvous = host_rendezvous(&runtime, &mut plan, args.rendezvous_bind_all, tls)?;
    supervise::install_stop_handlers().context("cannot install signal handlers")?;
    let _pid_file = args.save_pid.then(PidFile::write).transpose()?;
    let state = rendezvous.as_ref().map(|(state, _)| state.clone());
    let keep = resolved.as_ref().map(|config| config::KeepGlobalBatch {
        train_batch_size: config.batch.train_batch_size,
        micro_batch_per_gpu: config.batch.train_micro_batch_size_per_gpu,
    });
    let rendezvous_host = plan.master_addr.clone();
    let replan_slurm = |world: &[usize]| {
        let args = LaunchArgs {
            master_addr: rendezvous_host.clone(),
            ..args.clone()
        };
        plan_slurm_world(&args, &inputs, &job_dir, keep, world)
    };
    let slurm_regroup = Regroup {
        policy: elastic.clone(),
        names: inputs
            .slurm
            .as_ref()
            .map(|job| job.nodes.clone())
            .unwrap_or_default(),
        replan: &replan_slurm,
    };
    let code = match (&role, state) {
        (NodeRole::SlurmLead, Some(state)) => {
            follow::lead_nodes(&runtime, &plan, state, &slurm_regroup, started)
        }
        (NodeRole::SlurmLead, None) => Err(anyhow::anyhow!("node 0 hosts no rendezvous")),
        (NodeRole::SlurmFollower, _) => follow::follow_node0(&runtime, &plan, &slurm_regroup),
        (NodeRole::SshFollower | NodeRole::MpiNode, state) => {
            let follower = Attempts::Follower {
                restart_base: inherited_restart_count(),
                stop: match role {
                    NodeRole::SshFollower => ssh::stop_on_stdin_eof(),
                    _ => mpi::stop_when_parent_dies(),
                },
            };
            supervise_attempts(&runtime, &plan, state, follower, started).map(JobEnd::code)
        }
        (NodeRole::FanOutLead(_), _) => unreachable!("a fan-out lead returned above"),
        (NodeRole::SshLead(launch), state) => match elastic {
            Some(policy) => {
                let job = ElasticJob {
                    args: &args,
                    inputs: &inputs,
                    policy,
                    job_dir: &job_dir,
                    keep,
                };
                let world = (plan.clone(), launch.clone());
                lead_elastic_job(&runtime, &job, world, &mut rendezvous, started)
            }
            None => {
                let lead = Attempts::SshLead(launch, None);
                supervise_attempts(&runtime, &plan, state, lead, started).map(JobEnd::code)
            }
        },
        (NodeRole::SingleNode | NodeRole::ManualNode, state) => {
            supervise_attempts(&runtime, &plan, state, Attempts::ThisNode, started)
                .map(JobEnd::code)
        }
    };
    if let (NodeRole::MpiNode, Ok(code @ 1..)) = (&role, &code)
        && supervise::STOP_SIGNAL.load(std::sync::atomic::Ordering::SeqCst) == 0
    {
        let host = &plan.nodes[plan.node_rank].host;
        eprintln!("{}", mpi::failure_line(plan.node_rank, host, *code));
    }
    if let Some((_, mut server)) = rendezvous {
        server.shutdown();
    }
    let _ = std::fs::remove_dir_all(&job_dir);
    if plan.hosts_rendezvous() {
        record_status(code.as_ref().map_or(1, |code| *code));
    }
    code
}

/// Writes the job's exit code to `RSDEEP_STATUS_FILE`, when set (node 0 only).
fn record_status(code: i32) {
    let Some(path) = std::env::var_os(ev::STATUS_FILE) else {
        return;
    };
    if let Err(e) = std::fs::write(&path, format!("{code}\n")) {
        eprintln!(
            "rsdeep: warning: cannot write the exit status to {} ({e})",
            Path::new(&path).display()
        );
    }
}

/// `--save_pid`: `/tmp/<pid>.deepspeed` holding the launcher's pid while the job runs
/// (DeepSpeed's file, so tools that read it find rsdeep), removed at the end.
struct PidFile(PathBuf);

impl PidFile {
    fn write() -> Result<PidFile> {
        let pid = std::process::id();
        let path = std::env::temp_dir().join(format!("{pid}.deepspeed"));
        std::fs::write(&path, pid.to_string())
            .with_context(|| format!("--save_pid: cannot write {}", path.display()))?;
        eprintln!("rsdeep: launcher pid {pid} saved in {}", path.display());
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// This node's plan and its role in the job.
fn plan_job(args: &LaunchArgs, inputs: &PlanInputs) -> Result<(LaunchPlan, NodeRole)> {
    if LaunchPlan::needs_ssh_runner(args, inputs).map_err(usage)? {
        let (plan, launch) = plan_ssh_lead(args, inputs)?;
        return Ok((plan, NodeRole::SshLead(launch)));
    }
    if LaunchPlan::needs_fan_out(args, inputs).map_err(usage)? {
        let (plan, launch) = plan_fan_out_lead(args, inputs)?;
        return Ok((plan, NodeRole::FanOutLead(launch)));
    }
    let plan = LaunchPlan::build(args, inputs).map_err(usage)?;
    let role = match (plan.nodes.len(), args.launcher, plan.node_rank) {
        _ if args.token_stdin || args.stop_on_stdin_eof => NodeRole::SshFollower,
        (1, _, _) => NodeRole::SingleNode,
        (_, LauncherKind::Openmpi | LauncherKind::Mpich | LauncherKind::Impi, _) => {
            NodeRole::MpiNode
        }
        // A user's program has no rsdeep rendezvous to carry node 0's decisions: each
        // node supervises its own ranks.
        (_, LauncherKind::Slurm, _) if plan.runs_user_program() => NodeRole::ManualNode,
        (_, LauncherKind::Slurm, 0) => NodeRole::SlurmLead,
        (_, LauncherKind::Slurm, _) => NodeRole::SlurmFollower,
        _ => NodeRole::ManualNode,
    };
    Ok((plan, role))
}

/// Node 0 of a multi-host hostfile without `--no_ssh` (the ssh runner): planned like node
/// 0 of a `--no_ssh` job whose fresh job id and token it shares over ssh, with the master
/// address auto-detected unless `--master_addr` is given; plus the ssh launch of the other
/// nodes.
fn plan_ssh_lead(args: &LaunchArgs, inputs: &PlanInputs) -> Result<(LaunchPlan, SshLaunch)> {
    let plan = plan_node0_of_hostfile(args, inputs, true)?;
    let every = EveryNode::of(inputs)?;
    let hosts = inputs.hostfile.as_deref().unwrap_or_default();
    let launch = SshLaunch::prepare(args, &plan, hosts, &every.env, &every.program, &every.cwd);
    Ok((plan, launch))
}

/// What a multi-host runner starts on every node.
struct EveryNode {
    /// This `rsdeep`: the same path is expected on every host.
    program: PathBuf,
    /// The working directory every node runs in.
    cwd: PathBuf,
    /// The environment exported to the other nodes (`ssh::exported_env`).
    env: Vec<(String, String)>,
}

impl EveryNode {
    fn of(inputs: &PlanInputs) -> Result<EveryNode> {
        Ok(EveryNode {
            program: std::env::current_exe().context("cannot locate the rsdeep executable")?,
            cwd: std::env::current_dir().context("cannot read the working directory")?,
            env: ssh::exported_env(std::env::vars(), &inputs.env_file_vars),
        })
    }
}

/// The launcher the user started under `--launcher pdsh|openmpi|mpich|impi`: plans the
/// job as node 0 of the ssh runner would (the master address detected the same way when
/// the first host is this machine) and prepares the one command that starts every node.
fn plan_fan_out_lead(args: &LaunchArgs, inputs: &PlanInputs) -> Result<(LaunchPlan, FanOutLaunch)> {
    let kind = FanOutKind::of(args.launcher).context("not a pdsh or mpirun launch")?;
    let plan = plan_node0_of_hostfile(args, inputs, false)?;
    let every = EveryNode::of(inputs)?;
    let hosts = inputs.hostfile.as_deref().unwrap_or_default();
    let launch = FanOutLaunch::prepare(
        kind,
        args,
        &plan,
        hosts,
        &every.env,
        &every.program,
        &every.cwd,
    )
    .map_err(usage)?;
    Ok((plan, launch))
}

/// Runs a pdsh or mpirun job to its end: prints the plan and the command (or only them
/// under `--dry_run`), then drives the runner.
fn lead_fan_out(args: &LaunchArgs, plan: &LaunchPlan, launch: &FanOutLaunch) -> Result<i32> {
    if args.dry_run {
        print!("{}{}", plan.render(), launch.render());
        return Ok(0);
    }
    supervise::install_stop_handlers().context("cannot install signal handlers")?;
    let _pid_file = args.save_pid.then(PidFile::write).transpose()?;
    eprintln!(
        "rsdeep: {} starts {} node(s): {}",
        launch.kind.program(),
        launch.hosts.len(),
        launch.hosts.join(", ")
    );
    let code = fanout::drive(launch, plan.max_restarts, plan.grace_period)?;
    record_status(code);
    Ok(code)
}

/// Node 0's plan of a job over the hostfile's hosts (ssh, pdsh and mpirun runners): a
/// `--no_ssh --node_rank 0` plan. Unless `--master_addr` is given, the master address is
/// detected when node 0 runs here (`node0_here`: the ssh runner, or a first host that is
/// this machine), else it is the first host's name.
fn plan_node0_of_hostfile(
    args: &LaunchArgs,
    inputs: &PlanInputs,
    node0_here: bool,
) -> Result<LaunchPlan> {
    let mut node0 = args.clone();
    node0.no_ssh = true;
    node0.node_rank = Some(0);
    let shared = PlanInputs {
        job_from_env: true,
        ..inputs.clone()
    };
    let mut plan = LaunchPlan::build(&node0, &shared).map_err(usage)?;
    let first_host_here = ssh::is_this_machine(&plan.nodes[0].host);
    if args.master_addr.is_empty() && (node0_here || first_host_here) {
        let others: Vec<&str> = plan.nodes[1..].iter().map(|n| n.host.as_str()).collect();
        let (addr, how) = ssh::detect_master_addr(&plan.nodes[0].host, &others).map_err(usage)?;
        eprintln!("rsdeep: master address {addr} ({how}); --master_addr overrides it");
        node0.master_addr = addr;
        plan = LaunchPlan::build(&node0, &shared).map_err(usage)?;
    }
    if node0_here && !first_host_here {
        eprintln!(
            "rsdeep: warning: the first hostfile host {} is not an address of this machine; node 0 runs here anyway (run rsdeep on the first host)",
            plan.nodes[0].host
        );
    }
    Ok(plan)
}

/// Where this node writes the resolved config: one folder per job and node (nodes may
/// share a machine or a /tmp).
fn job_dir_of(plan: &LaunchPlan) -> PathBuf {
    let name = match plan.node_rank {
        0 => format!("rsdeep-{}", plan.job_id),
        k => format!("rsdeep-{}-node{k}", plan.job_id),
    };
    std::env::temp_dir().join(name)
}

/// Reads the hostfile, CUDA state, env files and job identity.
fn gather_inputs(args: &LaunchArgs) -> Result<PlanInputs> {
    let slurm = match args.launcher {
        LauncherKind::Slurm => Some(SlurmJob::from_env().map_err(usage)?),
        _ => None,
    };
    let hostfile = match slurm {
        Some(_) => None, // SLURM's node list replaces the hostfile
        None => match &args.world_hosts {
            Some(hosts) => Some(ssh::decode_world_hosts(hosts).map_err(usage)?),
            None => hostfile::read_hostfile(&args.hostfile).map_err(usage)?,
        },
    };
    if slurm.is_none() && hostfile.is_none() && args.hostfile != Path::new("/job/hostfile") {
        eprintln!(
            "rsdeep: warning: hostfile {} not found, running on this machine only",
            args.hostfile.display()
        );
    }
    let cuda_visible_devices = std::env::var(ev::CUDA_VISIBLE_DEVICES).ok();
    let cuda_device_count = match (args.device, &hostfile) {
        (DeviceKind::Cuda, None) => resources::cuda_device_count(),
        _ => None,
    };
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let env_file_vars = envfile::load_env_files(home.as_deref(), &cwd).map_err(usage)?;
    let shared = (
        std::env::var(ev::JOB_ID).ok(),
        match args.token_stdin {
            true => Some(ssh::read_token_line(std::io::stdin().lock())?),
            false => std::env::var(ev::TOKEN).ok(),
        },
    );
    // A user's program talks to no rsdeep rendezvous: its nodes share nothing of rsdeep's
    // (no job id or token to agree on; torch.distributed meets on MASTER_ADDR:PORT).
    let user_program = Program::from_args(args).is_ok_and(|p| p.user().is_some());
    let (job_id, token, job_from_env) = match shared {
        _ if slurm.is_some() => slurm_identity(slurm.as_ref(), !user_program)?,
        _ if user_program => (
            hex::encode(rand::random::<[u8; 6]>()),
            hex::encode(rand::random::<[u8; 16]>()),
            true,
        ),
        (Some(id), Some(token)) if !id.is_empty() && !token.is_empty() => (id, token, true),
        _ => (
            hex::encode(rand::random::<[u8; 6]>()),
            hex::encode(rand::random::<[u8; 16]>()),
            false,
        ),
    };
    Ok(PlanInputs {
        hostfile,
        cuda_visible_devices,
        cuda_device_count,
        env_file_vars,
        job_id,
        token,
        job_from_env,
        slurm,
        total_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        omp_threads_from_user: std::env::var_os("OMP_NUM_THREADS").is_some(),
        mpi_rank: mpi::mpi_rank(|name| std::env::var(name).ok()),
    })
}

/// Under `--launcher slurm`: `RSDEEP_JOB_ID` or `slurm-<job>[.<step>]`, and
/// `RSDEEP_TOKEN` (required with several nodes when they share rsdeep's rendezvous,
/// `shares_rendezvous`) or a fresh token.
fn slurm_identity(
    slurm: Option<&SlurmJob>,
    shares_rendezvous: bool,
) -> Result<(String, String, bool)> {
    let Some(job) = slurm else {
        anyhow::bail!("internal: no SLURM job");
    };
    eprintln!("rsdeep: {}", job.describe());
    let job_id = std::env::var(ev::JOB_ID)
        .ok()
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| job.rsdeep_job_id());
    let fresh = || hex::encode(rand::random::<[u8; 16]>());
    let token = match shares_rendezvous {
        true => job
            .token(std::env::var(ev::TOKEN).ok(), fresh)
            .map_err(usage)?,
        false => fresh(),
    };
    let own_name = job.nodes[job.node_id].as_str();
    let resolved: Vec<_> = (own_name, 0)
        .to_socket_addrs()
        .map(|addrs| addrs.map(|a| a.ip()).collect())
        .unwrap_or_default();
    job.check_own_address(&resolved).map_err(usage)?;
    Ok((job_id, token, true))
}

/// Resolves train.json for the world size (fail fast) and ships it as `RSDEEP_CONFIG`;
/// with `keep` (an elastic job on a new world) the job's global batch is kept.
fn resolve_config(
    plan: &mut LaunchPlan,
    job_dir: &Path,
    keep: Option<config::KeepGlobalBatch>,
) -> Result<Option<config::TrainConfig>> {
    let Some(path) = plan.config_path().map(Path::to_path_buf) else {
        return Ok(None);
    };
    let (overrides, world_size) = (plan.overrides(), plan.world_size());
    let resolved = match keep {
        Some(keep) => config::load_keeping_batch(&path, overrides, world_size, keep),
        None => config::load(&path, overrides, world_size),
    }
    .map_err(usage)?;
    for warning in &resolved.warnings {
        eprintln!("rsdeep: warning: {warning}");
    }
    std::fs::create_dir_all(job_dir)
        .with_context(|| format!("cannot create {}", job_dir.display()))?;
    let out = job_dir.join("config.json");
    std::fs::write(&out, resolved.to_pretty_json())
        .with_context(|| format!("cannot write {}", out.display()))?;
    plan.set_env_all(ev::CONFIG, &out.to_string_lossy());
    Ok(Some(resolved))
}

/// Locks the run's `output_dir` for this job and, for a fresh run (no resume asked for),
/// refuses a folder holding another run's checkpoints or model unless
/// `overwrite_output_dir` (which removes those checkpoints first). See `output_dir.rs`.
fn claim_output_dir(config: &config::TrainConfig, job_id: &str) -> Result<OutputDirLock> {
    let dir = Path::new(&config.args.output_dir);
    let (lock, acquired) = OutputDirLock::acquire(dir, job_id).map_err(usage)?;
    if let Acquired::TookOver(old) = acquired {
        eprintln!(
            "rsdeep: output_dir {}: taking over the stale lock of job {} (pid {} on {}, no longer running)",
            dir.display(),
            old.job_id,
            old.pid,
            old.host
        );
    }
    let resume_asked = !matches!(
        config.args.resume_from_checkpoint,
        None | Some(config::ResumeFrom::Latest(false))
    );
    if !resume_asked {
        let removed = output_dir::claim_for_fresh_run(dir, config.args.overwrite_output_dir)
            .map_err(usage)?;
        if !removed.is_empty() {
            eprintln!(
                "rsdeep: overwrite_output_dir: removed {} from {}",
                removed.join(", "),
                dir.display()
            );
        }
    }
    Ok(lock)
}

/// Under `--launcher slurm`: this node's plan in the world of the launch node ids
/// `world` (node 0 first) of an elastic job: SLURM's node list narrowed to them, this
/// node's rank in it, train.json resolved again keeping the global batch. `args` name
/// the rendezvous address the job already uses.
fn plan_slurm_world(
    args: &LaunchArgs,
    inputs: &PlanInputs,
    job_dir: &Path,
    keep: Option<config::KeepGlobalBatch>,
    world: &[usize],
) -> Result<LaunchPlan> {
    let slurm = inputs.slurm.as_ref().context("internal: no SLURM job")?;
    let node_id = world
        .iter()
        .position(|&n| n == slurm.node_id)
        .context("node 0 named a world without this node")?;
    let narrowed = SlurmJob {
        nodes: world.iter().map(|&n| slurm.nodes[n].clone()).collect(),
        node_id,
        ..slurm.clone()
    };
    let inputs = PlanInputs {
        slurm: Some(narrowed),
        ..inputs.clone()
    };
    let mut plan = LaunchPlan::build(args, &inputs).map_err(usage)?;
    if let Some(config) = resolve_config(&mut plan, job_dir, keep)? {
        plan.adopt_config(args, &config).map_err(usage)?;
        eprintln!("rsdeep: elastic: {}", config.summary());
    }
    rendezvous_tls(args, &mut plan)?;
    Ok(plan)
}

/// Loads the rendezvous TLS identity (if asked for) and tells every local worker which CA
/// to trust (`RSDEEP_TLS_CA`: `--rendezvous_tls_ca`, else the certificate itself).
fn rendezvous_tls(args: &LaunchArgs, plan: &mut LaunchPlan) -> Result<Option<ServerTlsConfig>> {
    let server = if plan.hosts_rendezvous() {
        tls::server_config(
            args.rendezvous_tls_cert.as_deref(),
            args.rendezvous_tls_key.as_deref(),
        )
        .map_err(usage)?
    } else {
        None
    };
    let trusted = args
        .rendezvous_tls_ca
        .as_ref()
        .or(args.rendezvous_tls_cert.as_ref());
    if let Some(ca) = trusted {
        let ca = std::path::absolute(ca)
            .with_context(|| format!("cannot resolve the path {}", ca.display()))?;
        tls::client_config(&ca, "check").map_err(usage)?;
        plan.set_env_all(ev::TLS_CA_ENV, &ca.to_string_lossy());
    }
    Ok(server)
}

/// On node 0: binds the rendezvous (port 0 picks one) and records the real port.
fn host_rendezvous(
    runtime: &tokio::runtime::Runtime,
    plan: &mut LaunchPlan,
    bind_all: bool,
    tls: Option<ServerTlsConfig>,
) -> Result<Option<(Arc<RendezvousState>, ServerHandle)>> {
    if plan.runs_user_program() {
        // The user's program rendezvouses by itself (torch.distributed on MASTER_PORT).
        if plan.master_port == 0 {
            plan.set_master_port(free_port(&plan.master_addr)?);
        }
        return Ok(None);
    }
    if !plan.hosts_rendezvous() {
        return Ok(None);
    }
    let state = Arc::new(RendezvousState::new(world_spec(plan)));
    let mut last_error = None;
    for addr in bind_candidates(&plan.master_addr, plan.master_port, bind_all) {
        match runtime.block_on(rendezvous::start_server_tls(
            state.clone(),
            plan.token.clone(),
            addr,
            tls.clone(),
        )) {
            Ok(server) => {
                plan.set_master_port(server.addr.port());
                return Ok(Some((state, server)));
            }
            Err(e) => last_error = Some(format!("{addr}: {e}")),
        }
    }
    anyhow::bail!(
        "cannot start the rendezvous on {}:{} ({}); choose another --master_port (0 picks a free one)",
        plan.master_addr,
        plan.master_port,
        last_error.unwrap_or_else(|| "address does not resolve".into())
    )
}

/// Where the rendezvous may listen, tried in order: the master address's resolutions
/// only, or every interface with `--rendezvous_bind_all`. Empty when the master address
/// does not resolve (the caller reports it).
/// A port nobody listens on at `addr` right now (for a user program's MASTER_PORT under
/// `--master_port 0`).
fn free_port(addr: &str) -> Result<u16> {
    let listener = std::net::TcpListener::bind((addr, 0))
        .with_context(|| format!("cannot find a free port on {addr}"))?;
    Ok(listener.local_addr()?.port())
}

fn bind_candidates(master_addr: &str, port: u16, bind_all: bool) -> Vec<SocketAddr> {
    if bind_all {
        return vec![SocketAddr::from(([0, 0, 0, 0], port))];
    }
    (master_addr, port)
        .to_socket_addrs()
        .map(|a| a.collect())
        .unwrap_or_default()
}

/// On a remote node started by node 0's ssh runner: the attempt node 0 is on
/// (`RSDEEP_RESTART_COUNT` in the remote command), 0 when absent or unreadable.
fn inherited_restart_count() -> u32 {
    std::env::var(ev::RESTART_COUNT)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Which node `supervise_attempts` supervises for.
enum Attempts<'a> {
    /// This node alone (one node, or a node of a job started by hand or by srun).
    ThisNode,
    /// Node 0 of an ssh job: it also starts and watches the remote launchers; elastic
    /// jobs check which hosts answer before each restart.
    SshLead(&'a SshLaunch, Option<ElasticTurn<'a>>),
    /// A node started for attempt `restart_base` by an ssh lead, pdsh or mpirun; `stop`
    /// (stdin closed under ssh and pdsh, mpirun gone) ends its attempt.
    Follower {
        restart_base: u32,
        stop: Arc<dyn supervise::StopSource>,
    },
}

/// An elastic ssh lead's attempts on one world: the attempt they start counting from and
/// the hosts the job may run on.
struct ElasticTurn<'a> {
    policy: &'a ElasticPolicy,
    /// Every host the job started with, node 0's first.
    selected: &'a [String],
    first_attempt: u32,
}

/// How `supervise_attempts` ended.
enum JobEnd {
    /// The job is over: exit with this code.
    Exit(i32),
    /// An elastic job restarts attempt `next_attempt` on other hosts (node 0's first).
    Regroup {
        next_attempt: u32,
        hosts: Vec<String>,
    },
}

impl JobEnd {
    /// The exit code of a job that cannot regroup (every role but an elastic ssh lead).
    fn code(self) -> i32 {
        match self {
            JobEnd::Exit(code) => code,
            JobEnd::Regroup { .. } => 1,
        }
    }
}

/// Spawns and supervises the local workers (and, under the ssh runner, the remote
/// launchers), restarting after failures if allowed.
///
/// Node 0 is the one decision maker. A restart first stops every worker: the local ones
/// and, under the ssh runner, every remote launcher (stdin closed, then its ssh waited
/// for, SIGKILL after the grace period); then it opens a new rendezvous generation and
/// starts everything again with `RSDEEP_RESTART_COUNT = k` (the remote launchers get it
/// in their command and run no restart loop of their own: `--max_restarts` is not
/// forwarded); the workers resume from this run's newest complete checkpoint in
/// `output_dir` (`train::entry`). A remote launcher counts its attempts from the one it
/// was started for and stops when node 0 closes its stdin. (Coordinated SLURM nodes run
/// `nodes::coordinate::follow` instead.) An elastic lead returns `JobEnd::Regroup` when a
/// restart finds another set of answering hosts.
fn supervise_attempts(
    runtime: &tokio::runtime::Runtime,
    plan: &LaunchPlan,
    state: Option<Arc<RendezvousState>>,
    role: Attempts,
    started: Instant,
) -> Result<JobEnd> {
    let (ssh_launch, restart_base, follower_stop, elastic) = match role {
        Attempts::ThisNode => (None, 0, None, None),
        Attempts::SshLead(launch, elastic) => (Some(launch), 0, None, elastic),
        Attempts::Follower { restart_base, stop } => (None, restart_base, Some(stop), None),
    };
    let program = rank_program(plan)?;
    let local: Vec<_> = plan.local_ranks().collect();
    let first_attempt = elastic.as_ref().map_or(0, |turn| turn.first_attempt);
    for attempt in first_attempt..=plan.max_restarts {
        let restart_count = restart_base + attempt;
        let _span = tracing::info_span!("attempt", attempt = restart_count, node = plan.node_rank)
            .entered();
        if let Some(state) = &state {
            announce_world(runtime, state.clone(), started);
        }
        let remote = match ssh_launch {
            Some(launch) => Some(SshNodes::start(launch, &plan.token, restart_count)?),
            None => None,
        };
        let options = SuperviseOptions {
            stop_source: remote
                .as_ref()
                .map(SshNodes::stop_source)
                .or_else(|| follower_stop.clone()),
            ..supervise_options(plan)
        };
        let mut workers = spawn_local_workers(&program, &local, restart_count, plan)?;
        let outcome = supervise::watch(&mut workers, state.as_deref(), &options);
        let outcome = match (&outcome, &remote) {
            (Outcome::Success, Some(remote)) => remote.wait_for_remote_nodes(),
            _ => outcome,
        };
        report_outcome(&outcome, workers.len(), plan);
        let killed = supervise::stop_workers(&mut workers, plan.grace_period);
        if killed > 0 {
            eprintln!("rsdeep: {killed} worker(s) ignored SIGTERM and were killed");
        }
        if let Some(remote) = remote {
            remote.stop_all(plan.grace_period);
            if outcome == Outcome::Success {
                eprintln!("rsdeep: every node finished");
            }
        }
        match after_attempt(&outcome, attempt, plan.max_restarts) {
            AfterAttempt::Exit(code) => return Ok(JobEnd::Exit(code)),
            AfterAttempt::GiveUp(code) => {
                eprintln!(
                    "rsdeep: giving up: all {} restart(s) used; the last failure is reported above",
                    plan.max_restarts
                );
                return Ok(JobEnd::Exit(code));
            }
            AfterAttempt::Restart => {}
        }
        if let (Some(turn), Some(launch)) = (&elastic, ssh_launch) {
            match next_world(turn, launch, plan) {
                Ok(Some(hosts)) => {
                    let next_attempt = attempt + 1;
                    return Ok(JobEnd::Regroup {
                        next_attempt,
                        hosts,
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    eprintln!("rsdeep: giving up: {e}");
                    return Ok(JobEnd::Exit(outcome.exit_code()));
                }
            }
        }
        let generation = state.as_ref().map(|s| s.next_generation());
        eprintln!(
            "rsdeep: restarting the job ({}/{}){}: {}",
            attempt + 1,
            plan.max_restarts,
            generation.map_or(String::new(), |g| format!(", rendezvous generation {g}")),
            resume_point(plan)
        );
    }
    Ok(JobEnd::Exit(1))
}

/// Before an elastic restart: the hosts of the next attempt when they differ from this
/// world's (a node was lost, or one the job went on without answers again).
fn next_world(
    turn: &ElasticTurn,
    launch: &SshLaunch,
    plan: &LaunchPlan,
) -> Result<Option<Vec<String>>, ElasticError> {
    let current: Vec<String> = plan.nodes.iter().map(|n| n.host.clone()).collect();
    let timeout = turn.policy.return_timeout;
    let answering = elastic::answering_hosts(launch, turn.selected, &current, timeout);
    let hosts = turn.policy.next_hosts(turn.selected, &answering)?;
    Ok((hosts != current).then_some(hosts))
}

/// What an elastic ssh job re-plans a new world from.
struct ElasticJob<'a> {
    args: &'a LaunchArgs,
    inputs: &'a PlanInputs,
    policy: ElasticPolicy,
    job_dir: &'a Path,
    /// The global batch of the world the job started on (train.json jobs).
    keep: Option<config::KeepGlobalBatch>,
}

/// Node 0 of an elastic ssh job: supervises attempts on the current world; when a restart
/// finds another set of answering hosts, re-plans the job on them (`regroup`) and goes on
/// counting restarts there.
fn lead_elastic_job(
    runtime: &tokio::runtime::Runtime,
    job: &ElasticJob,
    (mut plan, mut launch): (LaunchPlan, SshLaunch),
    rendezvous: &mut Option<(Arc<RendezvousState>, ServerHandle)>,
    started: Instant,
) -> Result<i32> {
    let selected: Vec<String> = plan.nodes.iter().map(|n| n.host.clone()).collect();
    let mut first_attempt = 0;
    loop {
        let turn = ElasticTurn {
            policy: &job.policy,
            selected: &selected,
            first_attempt,
        };
        let state = rendezvous.as_ref().map(|(state, _)| state.clone());
        let lead = Attempts::SshLead(&launch, Some(turn));
        match supervise_attempts(runtime, &plan, state, lead, started)? {
            JobEnd::Exit(code) => return Ok(code),
            JobEnd::Regroup {
                next_attempt,
                hosts,
            } => {
                let (next_plan, next_launch) = regroup(runtime, job, &plan, &hosts, rendezvous)?;
                announce_regroup(&plan, &next_plan, next_attempt);
                (plan, launch, first_attempt) = (next_plan, next_launch, next_attempt);
            }
        }
    }
}

/// The job re-planned on `hosts` (node 0's first): same job id, token, rendezvous address
/// and port; train.json resolved again for the new world size keeping the global batch;
/// a fresh rendezvous for the new world in place of the old one.
fn regroup(
    runtime: &tokio::runtime::Runtime,
    job: &ElasticJob,
    old: &LaunchPlan,
    hosts: &[String],
    rendezvous: &mut Option<(Arc<RendezvousState>, ServerHandle)>,
) -> Result<(LaunchPlan, SshLaunch)> {
    let args = elastic_plan::args_for_hosts(job.args, hosts, &old.master_addr, old.master_port);
    let hostfile = job.inputs.hostfile.as_deref();
    let inputs = PlanInputs {
        hostfile: hostfile.map(|entries| elastic_plan::hostfile_of(entries, hosts)),
        ..job.inputs.clone()
    };
    let (mut plan, launch) = plan_ssh_lead(&args, &inputs)?;
    if let Some(config) = resolve_config(&mut plan, job.job_dir, job.keep)? {
        plan.adopt_config(&args, &config).map_err(usage)?;
        eprintln!("rsdeep: elastic: {}", config.summary());
    }
    let tls = rendezvous_tls(&args, &mut plan)?;
    if let Some((_, mut server)) = rendezvous.take() {
        server.abort();
    }
    // The old listener closes once the runtime has cancelled its task: retry for a while.
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    *rendezvous = loop {
        match host_rendezvous(runtime, &mut plan, args.rendezvous_bind_all, tls.clone()) {
            Ok(hosted) => break hosted,
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
        }
    };
    Ok((plan, launch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rendezvous_binds_the_master_address_only_unless_told() {
        let only = bind_candidates("127.0.0.1", 29500, false);
        assert_eq!(only, [SocketAddr::from(([127, 0, 0, 1], 29500))]);
        assert!(only.iter().all(|a| !a.ip().is_unspecified()));
        let all = bind_candidates("127.0.0.1", 29500, true);
        assert_eq!(all, [SocketAddr::from(([0, 0, 0, 0], 29500))]);
        assert!(bind_candidates("no-such-host.invalid", 1, false).is_empty());
    }
}
