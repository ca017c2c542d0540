//! Runners that start every node through one program, as DeepSpeed's pdsh and MPI
//! runners do: `--launcher pdsh` (`pdsh.rs`) and `--launcher openmpi` (`mpi.rs`). The
//! launcher the user started runs no rank itself: it builds one command that starts
//! `rsdeep --no_ssh ...` on every host of the filtered hostfile (the first included),
//! each of which supervises its own ranks; `launch/fanout.rs` runs that command, relays
//! its output and signals, stops every node when one fails and restarts the whole job
//! under `--max_restarts`. User programs only: a train.json job's token would have to
//! travel on a command line (the plan refuses it, `PlanError::FanOutRunsPrograms`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::nodes::mpi::{self, MpiFlavor, MpiStart};
use crate::nodes::pdsh;
use crate::nodes::ssh::{self, NodeStart, RemoteCommand};
use crate::plan::LaunchPlan;
use crate::plan::cli::{LaunchArgs, LauncherKind};
use crate::plan::hostfile::HostEntry;
use rsdeep_contract::env as ev;

/// Why a pdsh or mpirun launch cannot be prepared.
#[derive(Debug, thiserror::Error)]
pub enum FanOutError {
    #[error("--launcher_args {0:?}: unbalanced quotes (it is split as a shell would)")]
    LauncherArgs(String),
}

/// Which program starts the nodes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FanOutKind {
    Pdsh,
    /// mpirun, with the `--launcher` name each node's launcher is given.
    Mpi(MpiFlavor, LauncherKind),
}

impl FanOutKind {
    /// The runner for `--launcher`, if it is one of these.
    pub fn of(launcher: LauncherKind) -> Option<FanOutKind> {
        match launcher {
            LauncherKind::Pdsh => Some(FanOutKind::Pdsh),
            LauncherKind::Openmpi => Some(FanOutKind::Mpi(MpiFlavor::OpenMpi, launcher)),
            LauncherKind::Mpich | LauncherKind::Impi => {
                Some(FanOutKind::Mpi(MpiFlavor::Hydra, launcher))
            }
            _ => None,
        }
    }

    /// How to get the program, for the message when it is missing.
    pub fn install_hint(self) -> &'static str {
        match self {
            FanOutKind::Pdsh => "install pdsh (Debian/Ubuntu: apt-get install pdsh)",
            FanOutKind::Mpi(_, LauncherKind::Openmpi) => {
                "install Open MPI (Debian/Ubuntu: apt-get install openmpi-bin)"
            }
            FanOutKind::Mpi(_, LauncherKind::Mpich) => {
                "install MPICH (Debian/Ubuntu: apt-get install mpich)"
            }
            FanOutKind::Mpi(..) => "load your MPI's environment (e.g. Intel oneAPI's setvars.sh)",
        }
    }

    /// The program's name, for messages.
    pub fn program(self) -> &'static str {
        match self {
            FanOutKind::Pdsh => "pdsh",
            FanOutKind::Mpi(..) => "mpirun",
        }
    }
}

/// Everything needed to start (and restart) every node of one job.
#[derive(Debug, Clone)]
pub struct FanOutLaunch {
    pub kind: FanOutKind,
    /// The selected hosts, node 0's first.
    pub hosts: Vec<String>,
    /// The launcher each host runs, without the attempt number.
    remote: RemoteCommand,
    launcher_args: Vec<String>,
    /// `RSDEEP_SSH_ARGS` and `-p PORT` (`--ssh_port`), for the ssh the runner uses.
    ssh_args: Vec<String>,
}

impl FanOutLaunch {
    /// The launch of every node of `plan` (planned as node 0): `hosts` is the hostfile
    /// as read (each node applies the same include/exclude flags), `env` what
    /// `ssh::exported_env` chose, `program` this `rsdeep` (the same path on every host),
    /// `cwd` where every node runs.
    pub fn prepare(
        kind: FanOutKind,
        args: &LaunchArgs,
        plan: &LaunchPlan,
        hosts: &[HostEntry],
        env: &[(String, String)],
        program: &Path,
        cwd: &Path,
    ) -> Result<FanOutLaunch, FanOutError> {
        let start = match kind {
            FanOutKind::Pdsh => NodeStart::Pdsh(pdsh::NODE_RANK_PLACEHOLDER),
            FanOutKind::Mpi(_, launcher) => NodeStart::Mpi(launcher.as_str()),
        };
        let remote_args =
            ssh::remote_launcher_args(args, start, &plan.master_addr, plan.master_port, hosts);
        let launcher_args = shlex::split(&args.launcher_args)
            .ok_or_else(|| FanOutError::LauncherArgs(args.launcher_args.clone()))?;
        let user_ssh_args = std::env::var(ssh::SSH_ARGS_ENV).unwrap_or_default();
        let mut ssh_args: Vec<String> =
            user_ssh_args.split_whitespace().map(String::from).collect();
        if let Some(port) = args.ssh_port {
            ssh_args.extend(["-p".to_string(), port.to_string()]);
        }
        Ok(FanOutLaunch {
            kind,
            hosts: plan.nodes.iter().map(|n| n.host.clone()).collect(),
            remote: RemoteCommand {
                cwd: cwd.to_path_buf(),
                env: env.to_vec(),
                program: PathBuf::from(program),
                args: remote_args,
            },
            launcher_args,
            ssh_args,
        })
    }

    /// The command of attempt `restart_count` (every node gets `RSDEEP_RESTART_COUNT`
    /// from the first restart on).
    pub fn command(&self, restart_count: u32) -> Command {
        match self.kind {
            FanOutKind::Pdsh => pdsh::command(
                &self.hosts,
                &self.remote.render(restart_count),
                &self.launcher_args,
                &self.ssh_args,
            ),
            FanOutKind::Mpi(flavor, _) => {
                let mut env = self.remote.env.clone();
                if restart_count > 0 {
                    env.push((ev::RESTART_COUNT.to_string(), restart_count.to_string()));
                }
                let start = MpiStart {
                    cwd: &self.remote.cwd,
                    env: &env,
                    program: &self.remote.program,
                    args: &self.remote.args,
                    launcher_args: &self.launcher_args,
                    ssh_args: &self.ssh_args,
                };
                mpi::command(flavor, &self.hosts, &start)
            }
        }
    }

    /// The first attempt's command as a shell would take it (for `--dry_run`).
    pub fn render(&self) -> String {
        let command = self.command(0);
        let mut words: Vec<String> = command
            .get_envs()
            .filter_map(|(k, v)| Some(format!("{}={}", k.to_str()?, v?.to_str()?)))
            .map(|w| ssh::shell_quote(&w))
            .collect();
        words.push(ssh::shell_quote(&command.get_program().to_string_lossy()));
        words.extend(
            command
                .get_args()
                .map(|a| ssh::shell_quote(&a.to_string_lossy())),
        );
        format!(
            "{} starts every node: {}\n",
            self.kind.program(),
            words.join(" ")
        )
    }

    /// The node rank of `host` (pdsh names failed nodes by host).
    pub fn node_of(&self, host: &str) -> Option<usize> {
        self.hosts.iter().position(|h| h == host)
    }
}
