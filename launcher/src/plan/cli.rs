//! The `rsdeep` command line as typed (raw, unvalidated): DeepSpeed's launcher flag names
//! and meanings (those of its `runner.py`), rsdeep's CPU and supervision flags, then
//! `train.json [--key value ...]` overrides. `plan::LaunchPlan` turns these into a
//! validated plan; nothing here touches the machine.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Where workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    /// The value of `RSDEEP_DEVICE` for this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

/// How launchers reach the other nodes of a multi-node job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LauncherKind {
    Ssh,
    Slurm,
    Local,
    /// DeepSpeed's default multi-node runner: pdsh starts every node's launcher.
    Pdsh,
    /// Open MPI's `mpirun` starts one launcher per node (its node rank is the MPI rank).
    Openmpi,
    /// MPICH's `mpirun` (Hydra), as for Open MPI.
    Mpich,
    /// Intel MPI's `mpirun` (Hydra, MPICH's command line).
    Impi,
    /// MVAPICH's `mpirun_rsh`: not built yet.
    Mvapich,
}

impl LauncherKind {
    /// The name as typed on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            LauncherKind::Ssh => "ssh",
            LauncherKind::Slurm => "slurm",
            LauncherKind::Local => "local",
            LauncherKind::Pdsh => "pdsh",
            LauncherKind::Openmpi => "openmpi",
            LauncherKind::Mpich => "mpich",
            LauncherKind::Impi => "impi",
            LauncherKind::Mvapich => "mvapich",
        }
    }
}

/// `rsdeep [launcher flags] train.json [--key value ...]`
/// `rsdeep [launcher flags] your_script.py [script args ...]`
///
/// One node, 8 GPUs:            rsdeep --num_gpus 8 train.json
/// Your own script, as deepspeed: rsdeep --num_gpus 8 train.py --deepspeed ds_config.json
/// No GPU, 4 CPU ranks:         rsdeep --device cpu --num_procs 4 train.json
/// Many nodes over ssh:         rsdeep -H hosts --num_gpus 8 train.json
/// Node k of a manual cluster:  rsdeep --no_ssh --node_rank K --master_addr HOST0 -H hosts train.json
/// Rendezvous check only:       rsdeep --device cpu --num_procs 4 --selftest
///
/// Workers receive RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, LOCAL_SIZE, GROUP_RANK,
/// CROSS_RANK, CROSS_SIZE, MASTER_ADDR, MASTER_PORT, CUDA_VISIBLE_DEVICES and RSDEEP_*
/// (job id, token, device, config path), plus KEY=VALUE lines of ~/.rsdeep_env and
/// ./.rsdeep_env. Other subcommands: `rsdeep check-config ...`, `rsdeep estimate-memory
/// ...`, `rsdeep bench-rendezvous`.
#[derive(Debug, Clone, Parser)]
#[command(name = "rsdeep", version, verbatim_doc_comment)]
pub struct LaunchArgs {
    /// DeepSpeed hostfile (`host slots=N` lines); missing file = local run.
    #[arg(short = 'H', long = "hostfile", default_value = "/job/hostfile")]
    pub hostfile: PathBuf,
    /// Resources to use: `host[:slot,slot]@host...`.
    #[arg(short = 'i', long = "include", default_value = "")]
    pub include: String,
    /// Resources to leave out: `host[:slot,slot]@host...`.
    #[arg(short = 'e', long = "exclude", default_value = "")]
    pub exclude: String,
    /// Use only the first N hosts.
    #[arg(long = "num_nodes")]
    pub num_nodes: Option<usize>,
    /// GPUs per host (slots 0..N), overriding the hostfile.
    #[arg(long = "num_gpus", alias = "num_accelerators")]
    pub num_gpus: Option<usize>,
    /// CPU ranks per host (with `--device cpu`).
    #[arg(long = "num_procs")]
    pub num_procs: Option<usize>,
    /// Device of the workers.
    #[arg(long = "device", value_enum, default_value = "cuda")]
    pub device: DeviceKind,
    /// Address of the node-0 launcher (default 127.0.0.1 on one node; with the ssh runner
    /// the address of the first host, or the one this machine routes to the others).
    #[arg(long = "master_addr", default_value = "")]
    pub master_addr: String,
    /// Rendezvous port; 0 picks a free port (single node only).
    #[arg(long = "master_port", default_value_t = 29500)]
    pub master_port: u16,
    /// This node's index (with `--no_ssh`: one launcher per node).
    #[arg(long = "node_rank")]
    pub node_rank: Option<usize>,
    /// How other nodes are started.
    #[arg(long = "launcher", value_enum, default_value = "ssh")]
    pub launcher: LauncherKind,
    /// Do not ssh: every node runs its own `rsdeep --node_rank K`.
    #[arg(long = "no_ssh")]
    pub no_ssh: bool,
    /// ssh port for the multi-node runner.
    #[arg(long = "ssh_port")]
    pub ssh_port: Option<u16>,
    /// Also write each rank's output to DIR/<YYYYmmddHHMMSS>_rank<R>.log.
    #[arg(long = "enable_each_rank_log")]
    pub enable_each_rank_log: Option<PathBuf>,
    /// Pin each local rank to total_cores/local_ranks cores and set OMP_NUM_THREADS.
    #[arg(long = "bind_cores_to_rank")]
    pub bind_cores_to_rank: bool,
    /// Print the launch plan (every rank's host, device, environment) and exit.
    #[arg(long = "dry_run")]
    pub dry_run: bool,
    /// Restart the whole job this many times after a worker failure.
    #[arg(long = "max_restarts", default_value_t = 0)]
    pub max_restarts: u32,
    /// Seconds without a heartbeat, or without step progress while in a step or a
    /// collective, after which a rank counts as hung (0 = never). eval/save/load/
    /// final_write phases get the startup allowance (900 s) instead. Default: train.json's
    /// heartbeat_timeout_secs, else 300.
    #[arg(long = "heartbeat_timeout")]
    pub heartbeat_timeout: Option<f64>,
    /// Seconds between worker heartbeats; must be shorter than the timeout. Default:
    /// train.json's heartbeat_interval_secs when shorter than the timeout, else 2 or a
    /// quarter of a shorter timeout.
    #[arg(long = "heartbeat_interval")]
    pub heartbeat_interval: Option<f64>,
    /// Seconds the rendezvous waits for every rank to join.
    #[arg(long = "join_timeout", default_value_t = 300.0)]
    pub join_timeout: f64,
    /// Seconds between SIGTERM and SIGKILL when stopping workers.
    #[arg(long = "grace_period", default_value_t = 30.0)]
    pub grace_period: f64,
    /// Let the rendezvous listen on every interface (default: the master address only).
    #[arg(long = "rendezvous_bind_all")]
    pub rendezvous_bind_all: bool,
    /// PEM certificate (chain) of the rendezvous: serve it over TLS (with `--rendezvous_tls_key`).
    #[arg(long = "rendezvous_tls_cert", env = rsdeep_contract::env::TLS_CERT_ENV)]
    pub rendezvous_tls_cert: Option<PathBuf>,
    /// PEM private key of `--rendezvous_tls_cert`.
    #[arg(long = "rendezvous_tls_key", env = rsdeep_contract::env::TLS_KEY_ENV)]
    pub rendezvous_tls_key: Option<PathBuf>,
    /// PEM CA the workers trust for the rendezvous (default: the certificate itself);
    /// passed to them as RSDEEP_TLS_CA.
    #[arg(long = "rendezvous_tls_ca", env = rsdeep_contract::env::TLS_CA_ENV)]
    pub rendezvous_tls_ca: Option<PathBuf>,
    /// Run the rendezvous selftest in every worker instead of training.
    #[arg(long = "selftest")]
    pub selftest: bool,
    /// User programs: the Python interpreter that runs the script (default: `python3` on
    /// PATH; DeepSpeed uses the interpreter it was installed in).
    #[arg(long = "python")]
    pub python: Option<String>,
    /// User programs: run the program as a Python module (`python -u -m MODULE`).
    #[arg(short = 'm', long = "module")]
    pub module: bool,
    /// User programs: run the program directly, not through Python.
    #[arg(long = "no_python")]
    pub no_python: bool,
    /// User programs: do not pass `--local_rank=N` (the program reads LOCAL_RANK).
    #[arg(long = "no_local_rank")]
    pub no_local_rank: bool,
    /// User programs: when no rank prints a line and no rank uses CPU for this many
    /// seconds, report the hang (with a `py-spy dump` of every rank when installed) and
    /// stop the job. Off by default.
    #[arg(long = "hang_timeout")]
    pub hang_timeout: Option<f64>,
    /// Cores to bind ranks to with `--bind_cores_to_rank`, e.g. `0-7,16-23` (default:
    /// every core).
    #[arg(long = "bind_core_list")]
    pub bind_core_list: Option<String>,
    /// Write the launcher's pid to `/tmp/<pid>.deepspeed` (DeepSpeed's file) while it runs.
    #[arg(long = "save_pid")]
    pub save_pid: bool,
    /// Extra arguments for the multi-node runner program (pdsh, mpirun), split as a shell would.
    #[arg(long = "launcher_args", default_value = "", allow_hyphen_values = true)]
    pub launcher_args: String,
    /// Treat a single-node hostfile as a multi-node job (DeepSpeed's `--force_multi`).
    #[arg(long = "force_multi")]
    pub force_multi: bool,
    /// A comment for the job (DeepSpeed passes it to `srun --comment`; rsdeep runs inside
    /// srun under `--launcher slurm`, so it is accepted and not used).
    #[arg(long = "comment", default_value = "")]
    pub comment: String,
    /// DeepSpeed's autotuner: not part of rsdeep (refused with a message).
    #[arg(long = "autotuning", value_name = "tune|run")]
    pub autotuning: Option<String>,
    /// Elastic continuation (ssh runner, with `--max_restarts`): when a node fails and
    /// does not answer ssh again within `--node_return_timeout`, restart on the nodes that
    /// remain, as long as at least this many do. The global batch is kept (gradient
    /// accumulation scaled) and the run resumes from its newest checkpoint, resharded.
    #[arg(long = "min_nodes")]
    pub min_nodes: Option<usize>,
    /// Elastic continuation: the most nodes a restart runs on (default: every host
    /// selected from the hostfile); nodes that answer again rejoin at the next restart.
    #[arg(long = "max_nodes")]
    pub max_nodes: Option<usize>,
    /// Elastic continuation: seconds to wait for a failed node to answer ssh again
    /// before the job restarts without it.
    #[arg(long = "node_return_timeout", default_value_t = 60.0)]
    pub node_return_timeout: f64,
    /// DeepSpeed's elastic agent flags: `--elastic_training` with
    /// `--min_elastic_nodes N` / `--max_elastic_nodes M` is `--min_nodes N --max_nodes M`
    /// (defaults 1 and every host).
    #[arg(long = "elastic_training")]
    pub elastic_training: bool,
    #[arg(long = "min_elastic_nodes")]
    pub min_elastic_nodes: Option<i64>,
    #[arg(long = "max_elastic_nodes")]
    pub max_elastic_nodes: Option<i64>,
    /// Internal (ssh runner): read `RSDEEP_TOKEN` from the first stdin line and stop the
    /// job when stdin closes.
    #[arg(long = "token_stdin", hide = true)]
    pub token_stdin: bool,
    /// Internal (pdsh runner): stop the job when stdin closes (pdsh or its ssh ended).
    #[arg(long = "stop_on_stdin_eof", hide = true)]
    pub stop_on_stdin_eof: bool,
    /// Internal (ssh runner): node 0's hostfile as `host=slots,...`, used instead of
    /// reading `--hostfile` on this node.
    #[arg(long = "world_hosts", hide = true)]
    pub world_hosts: Option<String>,
    /// `train.json` followed by `--key value` overrides of its keys, or the user's
    /// program followed by its own arguments.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "TRAIN_JSON [--key value ...] | SCRIPT [ARGS ...]"
    )]
    pub config_and_overrides: Vec<String>,
}

impl LaunchArgs {
    /// The train.json path, if one was given.
    pub fn config_path(&self) -> Option<PathBuf> {
        self.config_and_overrides.first().map(PathBuf::from)
    }

    /// Everything after the train.json path.
    pub fn overrides(&self) -> &[String] {
        self.config_and_overrides.get(1..).unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launcher_flags_then_config_then_overrides() {
        let args = LaunchArgs::try_parse_from([
            "rsdeep",
            "-H",
            "hosts",
            "--num_gpus",
            "8",
            "--master_port",
            "0",
            "train.json",
            "--learning_rate",
            "1e-4",
            "--num_gpus",
            "2",
        ])
        .unwrap();
        assert_eq!(args.hostfile, PathBuf::from("hosts"));
        assert_eq!(args.num_gpus, Some(8));
        assert_eq!(args.master_port, 0);
        assert_eq!(args.config_path(), Some(PathBuf::from("train.json")));
        assert_eq!(
            args.overrides(),
            ["--learning_rate", "1e-4", "--num_gpus", "2"]
        );
    }

    #[test]
    fn defaults_follow_deepspeed() {
        let args = LaunchArgs::try_parse_from(["rsdeep", "--selftest"]).unwrap();
        assert_eq!(args.master_port, 29500);
        assert_eq!(args.hostfile, PathBuf::from("/job/hostfile"));
        assert_eq!(args.device, DeviceKind::Cuda);
        assert_eq!(args.config_path(), None);
        assert!(args.overrides().is_empty());
    }

    #[test]
    fn bad_device_is_a_usage_error() {
        assert!(LaunchArgs::try_parse_from(["rsdeep", "--device", "tpu"]).is_err());
    }
}
