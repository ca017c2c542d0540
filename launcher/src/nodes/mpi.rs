//! The MPI runners: `mpirun` starts `rsdeep --no_ssh --launcher KIND ...` once per node,
//! in hostfile order, so that each launcher's MPI rank is its node rank (`mpi_rank`).
//! Open MPI (`--launcher openmpi`): `mpirun -n NODES -H host0:1,host1:1 --bind-to none
//! -wdir CWD -x NAME=VALUE...`; MPICH and Intel MPI (`mpich`, `impi`, both Hydra):
//! `mpirun -n NODES -ppn 1 -hosts host0,host1 -wdir CWD -genv NAME VALUE...`. Each node's
//! launcher then spawns and supervises its own ranks with DeepSpeed's environment, as
//! under every other runner (no mpi4py needed in the program). A launcher whose job
//! failed says so in one line (`failure_line`, read back by `node_failure`): MPICH's
//! mpirun waits for every process, so the launcher that started mpirun stops the others
//! (Open MPI's stops them itself). mpirun forwards SIGINT/SIGTERM. A
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

/// Which mpirun's command line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MpiFlavor {
    OpenMpi,
    /// MPICH's and Intel MPI's process manager.
    Hydra,
}

/// What one `mpirun` needs beyond the hosts.
pub struct MpiStart<'a> {
    pub cwd: &'a Path,
    /// Variables every node's launcher gets (`-x NAME=VALUE`).
    pub env: &'a [(String, String)],
    pub program: &'a Path,
    pub args: &'a [String],
    /// The user's `--launcher_args`, given to mpirun before the program.
    pub launcher_args: &'a [String],
    /// ssh options for the remote daemons, empty for ssh's defaults.
    pub ssh_args: &'a [String],
}

/// Hydra's variables for extra ssh options: MPICH's, then Intel MPI's.
const HYDRA_SSH_ARGS: &[&str] = &[
    "HYDRA_LAUNCHER_EXTRA_ARGS",
    "I_MPI_HYDRA_BOOTSTRAP_EXEC_EXTRA_ARGS",
];

/// The mpirun command that starts one launcher on each of `hosts`.
pub fn command(flavor: MpiFlavor, hosts: &[String], start: &MpiStart) -> Command {
    let mut command = Command::new("mpirun");
    command.args(["-n", &hosts.len().to_string()]);
    match flavor {
        MpiFlavor::OpenMpi => open_mpi_options(&mut command, hosts, start),
        MpiFlavor::Hydra => hydra_options(&mut command, hosts, start),
    }
    command
        .args(start.launcher_args)
        .arg(start.program)
        .args(start.args);
    command
}

/// One slot per host, no core binding, the environment with `-x`, ssh options as
/// `plm_rsh_args`.
fn open_mpi_options(command: &mut Command, hosts: &[String], start: &MpiStart) {
    let slots: Vec<String> = hosts.iter().map(|h| format!("{h}:1")).collect();
    command
        .args(["-H", &slots.join(",")])
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
}

/// One process per host, the environment with `-genv`, ssh options in Hydra's variables.
fn hydra_options(command: &mut Command, hosts: &[String], start: &MpiStart) {
    command
        .args(["-ppn", "1", "-hosts", &hosts.join(","), "-wdir"])
        .arg(start.cwd);
    for (name, value) in start.env {
        command.args(["-genv", name, value]);
    }
    if !start.ssh_args.is_empty() {
        for variable in HYDRA_SSH_ARGS {
            command.env(variable, start.ssh_args.join(" "));
        }
    }
}

/// This process's MPI rank, when an MPI launcher started it.
pub fn mpi_rank(lookup: impl Fn(&str) -> Option<String>) -> Option<usize> {
    RANK_VARIABLES
        .iter()
        .find_map(|name| lookup(name)?.trim().parse().ok())
}

/// The line a launcher mpirun started prints when its job failed on its node.
pub fn failure_line(node_rank: usize, host: &str, exit_code: i32) -> String {
    format!("rsdeep: node {node_rank} ({host}) failed with exit code {exit_code}")
}

/// `(host, exit code)` of a `failure_line`.
pub fn node_failure(line: &str) -> Option<(String, i32)> {
    let rest = line.strip_prefix("rsdeep: node ")?;
    let (_, rest) = rest.split_once(" (")?;
    let (host, code) = rest.split_once(") failed with exit code ")?;
    Some((host.to_string(), code.trim().parse().ok()?))
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
        let hosts = ["a".to_string(), "b".to_string()];
        let command = command(MpiFlavor::OpenMpi, &hosts, &start);
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
        let hydra = super::command(MpiFlavor::Hydra, &hosts, &start);
        let args: Vec<_> = hydra.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(
            args,
            [
                "-n",
                "2",
                "-ppn",
                "1",
                "-hosts",
                "a,b",
                "-wdir",
                "/work",
                "-genv",
                "RSDEEP_RESTART_COUNT",
                "1",
                "--oversubscribe",
                "/bin/rsdeep",
                "--no_ssh",
                "x.py"
            ]
        );
        assert!(
            hydra
                .get_envs()
                .any(|(k, v)| k == "HYDRA_LAUNCHER_EXTRA_ARGS" && v.is_some_and(|v| v == "-p 2222"))
        );
    }

    #[test]
    fn a_failure_line_reads_back() {
        let line = failure_line(1, "10.0.0.2", 137);
        assert_eq!(node_failure(&line), Some(("10.0.0.2".to_string(), 137)));
        assert_eq!(node_failure("rsdeep: node 1 is done"), None);
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
