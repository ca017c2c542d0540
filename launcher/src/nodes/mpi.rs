//! The Open MPI runner (`--launcher openmpi`): one `mpirun -n NODES -H host0:1,host1:1
//! --bind-to none` starts `rsdeep --no_ssh --launcher openmpi ...` once per node, in
//! hostfile order, so that each launcher's MPI rank is its node rank (`mpi_rank`). Each
//! node's launcher then spawns and supervises its own ranks with DeepSpeed's
//! environment, as under every other runner (no mpi4py needed in the program). The
//! exported environment travels with `-x`, the working directory with `-wdir`; mpirun
//! stops every node when one launcher exits non-zero, and forwards SIGINT/SIGTERM. A
//! launcher whose parent (mpirun, or Open MPI's daemon on another host) dies stops its
//! ranks (`stop_when_parent_dies`). The driving loop is `launch/fanout.rs`; the user
//! guide is `docs/launchers.md`.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use crate::supervise::{Outcome, StopSource};

/// Where MPI implementations put a process's rank: Open MPI, then the PMI name of
/// MPICH-derived ones.
const RANK_VARIABLES: &[&str] = &["OMPI_COMM_WORLD_RANK", "PMI_RANK"];

/// What one `mpirun` needs beyond the hosts.
pub struct MpiStart<'a> {
    pub cwd: &'a Path,
    /// Variables every node's launcher gets (`-x NAME=VALUE`).
    pub env: &'a [(String, String)],
    pub program: &'a Path,
    pub args: &'a [String],
    /// The user's `--launcher_args`, given to mpirun before the program.
    pub launcher_args: &'a [String],
    /// ssh options for the remote daemons (`plm_rsh_args`), empty for ssh's defaults.
    pub ssh_args: &'a [String],
}

/// The mpirun command that starts one launcher on each of `hosts`.
pub fn command(hosts: &[String], start: &MpiStart) -> Command {
    let slots: Vec<String> = hosts.iter().map(|h| format!("{h}:1")).collect();
    let mut command = Command::new("mpirun");
    command
        .args(["-n", &hosts.len().to_string(), "-H", &slots.join(",")])
        .args(["--bind-to", "none", "-wdir"])
        .arg(start.cwd);
    for (name, value) in start.env {
        command.arg("-x").arg(format!("{name}={value}"));
    }
    if !start.ssh_args.is_empty() {
        command
            .args(["--mca", "plm_rsh_args"])
            .arg(start.ssh_args.join(" "));
    }
    command
        .args(start.launcher_args)
        .arg(start.program)
        .args(start.args);
    command
}

/// This process's MPI rank, when an MPI launcher started it.
pub fn mpi_rank(lookup: impl Fn(&str) -> Option<String>) -> Option<usize> {
    RANK_VARIABLES
        .iter()
        .find_map(|name| lookup(name)?.trim().parse().ok())
}

/// On a launcher mpirun started: the supervisor's stop source that ends the attempt once
/// this process's parent is gone (mpirun was killed, even with SIGKILL, on this host; its
/// daemons stop the other hosts' launchers themselves).
pub fn stop_when_parent_dies() -> Arc<dyn StopSource> {
    // SAFETY: getppid has no preconditions.
    Arc::new(ParentGone(unsafe { libc::getppid() }))
}

/// The parent pid this launcher started with.
#[derive(Debug)]
struct ParentGone(libc::pid_t);

impl StopSource for ParentGone {
    fn stop_outcome(&self) -> Option<Outcome> {
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() };
        (parent != self.0).then(|| Outcome::Stopped {
            reason: format!(
                "this node's mpirun (pid {}) is gone: stopping the job here",
                self.0
            ),
            exit_code: 128 + libc::SIGHUP,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_launcher_per_host_with_the_environment_and_ssh_options() {
        let env = [("RSDEEP_RESTART_COUNT".to_string(), "1".to_string())];
        let start = MpiStart {
            cwd: Path::new("/work"),
            env: &env,
            program: Path::new("/bin/rsdeep"),
            args: &["--no_ssh".into(), "x.py".into()],
            launcher_args: &["--oversubscribe".into()],
            ssh_args: &["-p".into(), "2222".into()],
        };
        let command = command(&["a".into(), "b".into()], &start);
        let args: Vec<_> = command.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(
            args,
            [
                "-n",
                "2",
                "-H",
                "a:1,b:1",
                "--bind-to",
                "none",
                "-wdir",
                "/work",
                "-x",
                "RSDEEP_RESTART_COUNT=1",
                "--mca",
                "plm_rsh_args",
                "-p 2222",
                "--oversubscribe",
                "/bin/rsdeep",
                "--no_ssh",
                "x.py"
            ]
        );
    }

    #[test]
    fn the_rank_comes_from_open_mpi_or_pmi() {
        let env = |pairs: &'static [(&str, &str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(mpi_rank(env(&[("OMPI_COMM_WORLD_RANK", "3")])), Some(3));
        assert_eq!(mpi_rank(env(&[("PMI_RANK", "2")])), Some(2));
        assert_eq!(mpi_rank(env(&[])), None);
    }
}
