//! The ssh multi-node runner: node 0 (the machine `rsdeep` is started on, the
//! first host of the filtered hostfile) starts `rsdeep --no_ssh --node_rank K ...` on
//! every other host over `ssh -o BatchMode=yes`, in the same working directory, with the
//! exported environment (`.rsdeep_env` plus the `EXPORT_PREFIXES` variables). The job
//! token never appears on a command line: node 0 writes it as the first line of each
//! ssh's stdin and keeps stdin open; a remote launcher treats stdin EOF (node 0 or its
//! ssh died, or node 0 is stopping the job) as a stop signal. Remote output comes back
//! prefixed `[node K rank R]` / `[node K]`; an ssh exiting non-zero is that node's
//! failure. User guide, with how the exported environment compares with DeepSpeed's pdsh
//! runner: `deploy/README.md`.

use crate::supervise::lines::lock;
use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::plan::LaunchPlan;
use crate::plan::cli::LaunchArgs;
use crate::plan::hostfile::HostEntry;
use crate::supervise::{self, Outcome, STOP_SIGNAL, StopSource};
use rsdeep_contract::env as ev;

/// Extra ssh arguments before rsdeep's own options (`rsdeep_contract::env::SSH_ARGS`).
pub const SSH_ARGS_ENV: &str = ev::SSH_ARGS;

/// Name prefixes of the launcher's environment variables exported to remote nodes
/// (DeepSpeed exports NCCL, PYTHON, UCX, MLFLOW; rsdeep adds its own and the usual
/// thread, CUDA and Hugging Face knobs).
pub const EXPORT_PREFIXES: &[&str] = &[
    "RSDEEP_",
    "NCCL_",
    "PYTHON",
    "CUDA_",
    "OMP_",
    "MKL_",
    "UCX_",
    "MLFLOW_",
    "HF_",
    "TORCH_",
    "TOKENIZERS_",
];

/// Variables never exported, whatever their prefix: the secret, what node 0 sets itself,
/// and what only makes sense on node 0.
const NEVER_EXPORTED: &[&str] = &[
    ev::TOKEN,
    ev::JOB_ID,
    ev::RESTART_COUNT,
    ev::CUDA_VISIBLE_DEVICES,
    SSH_ARGS_ENV,
];

/// How long the preflight `ssh host true` may take per host.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(15);
/// Extra time, after the grace period, for remote launchers to stop their workers.
const REMOTE_STOP_MARGIN: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);

/// Why the ssh runner could not start or run a node.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error(
        "{host} is not reachable over ssh ({reason}); rsdeep starts every other node with \
         passwordless ssh: check that `{probe}` works, or start each node yourself with \
         `rsdeep --no_ssh --node_rank K --master_addr <node-0 address> ...`"
    )]
    Unreachable {
        host: String,
        reason: String,
        probe: String,
    },
    #[error("cannot start ssh for node {node_rank} ({host}): {reason}")]
    Spawn {
        node_rank: usize,
        host: String,
        reason: String,
    },
    #[error(
        "cannot detect the master address: {0}; pass --master_addr <address of this machine that the other nodes reach>"
    )]
    MasterAddr(String),
    #[error(
        "the first hostfile host {0} is a loopback name but other hosts are not: node 0's \
         workers would listen where the other nodes cannot reach them; name this machine in \
         the hostfile by an address or name the other hosts reach"
    )]
    LoopbackNode0(String),
    #[error("bad --world_hosts entry {0:?}: expected host=slots[,host=slots...]")]
    WorldHosts(String),
    #[error("--token_stdin: {0} (this flag is for launchers started by node 0's ssh runner)")]
    TokenStdin(String),
}

/// The environment node 0 exports to every remote launcher: its own variables with an
/// exported prefix, then the `.rsdeep_env` lines (later wins); sorted by name.
pub fn exported_env(
    process_env: impl IntoIterator<Item = (String, String)>,
    env_file_vars: &[(String, String)],
) -> Vec<(String, String)> {
    let exported = |key: &str| {
        EXPORT_PREFIXES.iter().any(|p| key.starts_with(p)) && !NEVER_EXPORTED.contains(&key)
    };
    let mut env: BTreeMap<String, String> = process_env
        .into_iter()
        .filter(|(k, _)| exported(k))
        .collect();
    env.extend(
        env_file_vars
            .iter()
            .filter(|(k, _)| !NEVER_EXPORTED.contains(&k.as_str()))
            .cloned(),
    );
    env.into_iter().collect()
}

/// Quotes `word` for a POSIX shell: unchanged when it only has safe characters, else in
/// single quotes (`'` becomes `'\''`).
pub fn shell_quote(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// ssh options: the user's `RSDEEP_SSH_ARGS` first (ssh keeps the first value of an
/// option, so they override rsdeep's), then `-p PORT`, then rsdeep's defaults.
pub fn ssh_options(ssh_port: Option<u16>, user_args: &str) -> Vec<String> {
    let mut options: Vec<String> = user_args.split_whitespace().map(String::from).collect();
    if let Some(port) = ssh_port {
        options.extend(["-p".to_string(), port.to_string()]);
    }
    for option in [
        "BatchMode=yes",
        "ConnectTimeout=10",
        "ServerAliveInterval=10",
        "ServerAliveCountMax=3",
    ] {
        options.extend(["-o".to_string(), option.to_string()]);
    }
    options.push("-T".to_string());
    options
}

/// `host=slots,host=slots`: the hostfile's hosts for `--world_hosts`.
pub fn encode_world_hosts(hosts: &[HostEntry]) -> String {
    hosts
        .iter()
        .map(|h| format!("{}={}", h.host, h.slots))
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses `--world_hosts` back into hostfile entries.
pub fn decode_world_hosts(text: &str) -> Result<Vec<HostEntry>, SshError> {
    text.split(',')
        .map(|entry| {
            let (host, slots) = entry
                .rsplit_once('=')
                .ok_or_else(|| SshError::WorldHosts(entry.to_string()))?;
            let slots = slots
                .parse()
                .map_err(|_| SshError::WorldHosts(entry.to_string()))?;
            if host.is_empty() {
                return Err(SshError::WorldHosts(entry.to_string()));
            }
            Ok(HostEntry {
                host: host.to_string(),
                slots,
            })
        })
        .collect()
}

/// How a launcher started on another node learns its node rank, and what stops it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NodeStart<'a> {
    /// By node 0's ssh runner: `--node_rank K --token_stdin` (token on stdin, stdin EOF
    /// stops it).
    Ssh(usize),
    /// By pdsh: `--node_rank` followed by this word, which pdsh replaces with the node's
    /// index in its host list, and `--stop_on_stdin_eof`.
    Pdsh(&'a str),
    /// By mpirun: `--launcher` with this name and no `--node_rank` (it is the MPI rank,
    /// read from MPI's environment); mpirun itself stops every node when one fails.
    Mpi(&'a str),
}

/// The launcher flags of a node started by `start`: the user's resource and supervision
/// flags, node 0's world (hosts, master address and port), how it learns its node rank
/// and what stops it, then train.json or the program and their arguments.
/// `--max_restarts` is not forwarded: node 0 alone decides restarts and starts every
/// remote launcher again with `RSDEEP_RESTART_COUNT` in its environment.
pub fn remote_launcher_args(
    args: &LaunchArgs,
    start: NodeStart,
    master_addr: &str,
    master_port: u16,
    hosts: &[HostEntry],
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut flag = |name: &str, value: String| {
        out.push(name.to_string());
        out.push(value);
    };
    match start {
        NodeStart::Ssh(node_rank) => flag("--node_rank", node_rank.to_string()),
        NodeStart::Pdsh(placeholder) => flag("--node_rank", placeholder.to_string()),
        NodeStart::Mpi(launcher) => flag("--launcher", launcher.to_string()),
    }
    flag("--master_addr", master_addr.to_string());
    flag("--master_port", master_port.to_string());
    flag("--world_hosts", encode_world_hosts(hosts));
    flag("--device", args.device.as_str().to_string());
    for (name, value) in [("--include", &args.include), ("--exclude", &args.exclude)] {
        if !value.is_empty() {
            flag(name, value.clone());
        }
    }
    let counts = [
        ("--num_nodes", args.num_nodes),
        ("--num_gpus", args.num_gpus),
        ("--num_procs", args.num_procs),
    ];
    for (name, value) in counts {
        if let Some(n) = value {
            flag(name, n.to_string());
        }
    }
    if let Some(dir) = &args.enable_each_rank_log {
        flag("--enable_each_rank_log", dir.display().to_string());
    }
    if let Some(timeout) = args.heartbeat_timeout {
        flag("--heartbeat_timeout", timeout.to_string());
    }
    flag("--join_timeout", args.join_timeout.to_string());
    flag("--grace_period", args.grace_period.to_string());
    if let Some(python) = &args.python {
        flag("--python", python.clone());
    }
    if let Some(cores) = &args.bind_core_list {
        flag("--bind_core_list", cores.clone());
    }
    if let Some(timeout) = args.hang_timeout {
        flag("--hang_timeout", timeout.to_string());
    }
    out.push("--no_ssh".to_string());
    match start {
        NodeStart::Ssh(_) => out.push("--token_stdin".to_string()),
        NodeStart::Pdsh(_) => out.push("--stop_on_stdin_eof".to_string()),
        NodeStart::Mpi(_) => {}
    }
    if args.bind_cores_to_rank {
        out.push("--bind_cores_to_rank".to_string());
    }
    if args.selftest {
        out.push("--selftest".to_string());
    }
    let switches = [
        (args.module, "--module"),
        (args.no_python, "--no_python"),
        (args.no_local_rank, "--no_local_rank"),
    ];
    out.extend(
        switches
            .into_iter()
            .filter(|(on, _)| *on)
            .map(|(_, name)| name.to_string()),
    );
    out.extend(args.config_and_overrides.iter().cloned());
    out
}

/// The shell command run on the remote host: `cd CWD && exec env K=V... PROGRAM ARGS`.
pub fn remote_command(
    cwd: &Path,
    env: &[(String, String)],
    program: &Path,
    args: &[String],
) -> String {
    let mut words = vec!["exec".to_string(), "env".to_string()];
    words.extend(env.iter().map(|(k, v)| shell_quote(&format!("{k}={v}"))));
    words.push(shell_quote(&program.to_string_lossy()));
    words.extend(args.iter().map(|a| shell_quote(a)));
    format!(
        "cd {} && {}",
        shell_quote(&cwd.to_string_lossy()),
        words.join(" ")
    )
}

/// What a remote launcher is started with, kept apart so that node 0 can start it
/// again after a restart with `RSDEEP_RESTART_COUNT=k` added.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteCommand {
    pub cwd: std::path::PathBuf,
    pub env: Vec<(String, String)>,
    pub program: std::path::PathBuf,
    pub args: Vec<String>,
}

impl RemoteCommand {
    /// The shell command of attempt `restart_count` (0: the first start, no variable).
    pub fn render(&self, restart_count: u32) -> String {
        let mut env = self.env.clone();
        if restart_count > 0 {
            env.push((ev::RESTART_COUNT.to_string(), restart_count.to_string()));
        }
        remote_command(&self.cwd, &env, &self.program, &self.args)
    }
}

/// One remote node: where it runs, its global ranks and the command its launcher is
/// started with.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteNodeSpec {
    pub node_rank: usize,
    pub host: String,
    pub ranks: std::ops::RangeInclusive<usize>,
    /// The command of the first attempt (`remote.render(0)`).
    pub command: String,
    pub remote: RemoteCommand,
}

/// Everything node 0 needs to start the other nodes.
#[derive(Debug, Clone)]
pub struct SshLaunch {
    pub options: Vec<String>,
    pub nodes: Vec<RemoteNodeSpec>,
    /// Node 0's host when it is a loopback name while other hosts are not: node 0's
    /// workers would listen where no other node can reach them.
    pub unreachable_node0: Option<String>,
}

impl SshLaunch {
    /// The ssh launch of every node but node 0 of `plan`: `hosts` is the hostfile as read
    /// (the remote launchers apply the same include/exclude flags to it), `env` what
    /// `exported_env` chose, `program` this `rsdeep` executable (the same path is
    /// expected on every host), `cwd` the working directory every node runs in.
    pub fn prepare(
        args: &LaunchArgs,
        plan: &LaunchPlan,
        hosts: &[HostEntry],
        env: &[(String, String)],
        program: &Path,
        cwd: &Path,
    ) -> SshLaunch {
        let user_args = std::env::var(SSH_ARGS_ENV).unwrap_or_default();
        let mut env = env.to_vec();
        env.push((ev::JOB_ID.to_string(), plan.job_id.clone()));
        env.sort();
        let nodes = plan
            .nodes
            .iter()
            .enumerate()
            .skip(1)
            .map(|(node_rank, node)| {
                let ranks: Vec<usize> = plan
                    .ranks
                    .iter()
                    .filter(|r| r.node_rank == node_rank)
                    .map(|r| r.rank)
                    .collect();
                let launcher_args = remote_launcher_args(
                    args,
                    NodeStart::Ssh(node_rank),
                    &plan.master_addr,
                    plan.master_port,
                    hosts,
                );
                let remote = RemoteCommand {
                    cwd: cwd.to_path_buf(),
                    env: env.clone(),
                    program: program.to_path_buf(),
                    args: launcher_args,
                };
                RemoteNodeSpec {
                    node_rank,
                    host: node.host.clone(),
                    ranks: ranks.first().copied().unwrap_or(0)..=ranks.last().copied().unwrap_or(0),
                    command: remote.render(0),
                    remote,
                }
            })
            .collect();
        let node0 = plan.nodes.first().map_or("", |n| n.host.as_str());
        let others: Vec<&str> = plan.nodes.iter().skip(1).map(|n| n.host.as_str()).collect();
        SshLaunch {
            options: ssh_options(args.ssh_port, &user_args),
            nodes,
            unreachable_node0: loopback_among_remote(node0, &others).then(|| node0.to_string()),
        }
    }

    /// The ssh command lines, one per remote node, as a shell would take them (for
    /// `--dry_run`; the token is not in them, it travels over stdin).
    pub fn render(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let mut words = vec!["ssh".to_string()];
            words.extend(self.options.iter().map(|o| shell_quote(o)));
            words.push(shell_quote(&node.host));
            words.push(shell_quote(&node.command));
            out.push_str(&format!(
                "ssh node {} ({}): {}\n",
                node.node_rank,
                node.host,
                words.join(" ")
            ));
        }
        out
    }

    /// Runs `ssh host true` for every remote host in parallel; the first unreachable host
    /// (in hostfile order) is the error.
    pub fn preflight(&self) -> Result<(), SshError> {
        if let Some(host) = &self.unreachable_node0 {
            return Err(SshError::LoopbackNode0(host.clone()));
        }
        let probes: Vec<_> = self
            .nodes
            .iter()
            .map(|node| {
                let options = self.options.clone();
                let host = node.host.clone();
                std::thread::spawn(move || probe_host(&options, &host))
            })
            .collect();
        let mut first_error = None;
        for probe in probes {
            let result = probe.join().unwrap_or_else(|_| {
                Err(SshError::Unreachable {
                    host: "?".into(),
                    reason: "the ssh probe thread panicked".into(),
                    probe: "ssh".into(),
                })
            });
            if let (Err(e), None) = (result, &first_error) {
                first_error = Some(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Whether `host` answers `ssh host true` now (the preflight probe of one host).
    pub fn probe(&self, host: &str) -> Result<(), SshError> {
        probe_host(&self.options, host)
    }
}

/// `ssh OPTIONS -o ConnectTimeout=5 host true`, bounded by `PREFLIGHT_TIMEOUT`.
fn probe_host(options: &[String], host: &str) -> Result<(), SshError> {
    let mut probe_options = vec!["-o".to_string(), "ConnectTimeout=5".to_string()];
    probe_options.extend(options.iter().cloned());
    let probe_line = format!("ssh {} {} true", probe_options.join(" "), host);
    let unreachable = |reason: String| SshError::Unreachable {
        host: host.to_string(),
        reason,
        probe: probe_line.clone(),
    };
    let mut child = Command::new("ssh")
        .args(&probe_options)
        .arg(host)
        .arg("true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| unreachable(format!("cannot run ssh: {e}")))?;
    let stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut stream) = stderr {
            let _ = stream.read_to_string(&mut text);
        }
        text
    });
    let deadline = Instant::now() + PREFLIGHT_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(unreachable(format!(
                    "no answer within {}s",
                    PREFLIGHT_TIMEOUT.as_secs()
                )));
            }
            Err(e) => return Err(unreachable(format!("cannot wait for ssh: {e}"))),
        }
    };
    if status.success() {
        return Ok(());
    }
    let said = reader.join().unwrap_or_default();
    let said = said.trim();
    Err(unreachable(format!(
        "ssh {}{}{}",
        supervise::describe_status(status),
        if said.is_empty() { "" } else { ": " },
        said.lines().last().unwrap_or_default()
    )))
}

/// The master address when `--master_addr` is not given, and how it was chosen: the
/// first hostfile host's own address when it is this machine (a loopback address only
/// when every other host is loopback too), else the local address the kernel routes to
/// the first remote host.
pub fn detect_master_addr(
    node0_host: &str,
    remote_hosts: &[&str],
) -> Result<(String, String), SshError> {
    let resolve = |host: &str| -> Vec<IpAddr> {
        (host, 0)
            .to_socket_addrs()
            .map(|a| a.map(|s| s.ip()).collect())
            .unwrap_or_default()
    };
    let local: Vec<IpAddr> = resolve(node0_host)
        .into_iter()
        .filter(|ip| UdpSocket::bind((*ip, 0)).is_ok())
        .collect();
    let all_remote_loopback = remote_hosts
        .iter()
        .all(|h| resolve(h).iter().any(IpAddr::is_loopback));
    let chosen = local
        .iter()
        .find(|ip| !ip.is_loopback())
        .or_else(|| local.first().filter(|_| all_remote_loopback));
    if let Some(ip) = chosen {
        return Ok((
            ip.to_string(),
            format!("the first hostfile host {node0_host} is this machine"),
        ));
    }
    let Some(first_remote) = remote_hosts.first() else {
        return Err(SshError::MasterAddr("the job has no other host".into()));
    };
    let target = resolve(first_remote).into_iter().next().ok_or_else(|| {
        SshError::MasterAddr(format!("{first_remote} does not resolve to an address"))
    })?;
    let route = route_source(target).map_err(|e| {
        SshError::MasterAddr(format!("no route from this machine to {first_remote}: {e}"))
    })?;
    Ok((
        route.to_string(),
        format!("the address this machine uses to reach {first_remote}"),
    ))
}

/// True when `host` resolves to an address of this machine (one a socket can bind).
pub fn is_this_machine(host: &str) -> bool {
    (host, 0)
        .to_socket_addrs()
        .map(|mut addrs| addrs.any(|a| UdpSocket::bind((a.ip(), 0)).is_ok()))
        .unwrap_or(false)
}

/// The addresses `host` resolves to (empty when it does not resolve).
fn resolve(host: &str) -> Vec<IpAddr> {
    (host, 0)
        .to_socket_addrs()
        .map(|a| a.map(|s| s.ip()).collect())
        .unwrap_or_default()
}

/// True when `node0` resolves only to loopback addresses while some other host does not.
pub fn loopback_among_remote(node0: &str, others: &[&str]) -> bool {
    let loopback_only = |host: &str| {
        let ips = resolve(host);
        !ips.is_empty() && ips.iter().all(IpAddr::is_loopback)
    };
    loopback_only(node0) && others.iter().any(|h| !loopback_only(h))
}

/// The local address the kernel would use to reach `target` (a connected UDP socket
/// sends nothing).
fn route_source(target: IpAddr) -> std::io::Result<IpAddr> {
    let unspecified: IpAddr = if target.is_ipv4() {
        [0, 0, 0, 0].into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind((unspecified, 0))?;
    socket.connect(SocketAddr::new(target, 9))?;
    Ok(socket.local_addr()?.ip())
}

/// `[node K rank R] text` for a remote worker line (`[rank R] text`), `[node K] line`
/// for anything else the remote launcher or ssh printed.
pub fn prefix_remote_line(node_rank: usize, line: &str) -> String {
    match line.strip_prefix("[rank ") {
        Some(rest) => format!("[node {node_rank} rank {rest}"),
        None => format!("[node {node_rank}] {line}"),
    }
}

/// Why a remote node ended the job.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteFailure {
    pub node_rank: usize,
    pub host: String,
    pub ranks: std::ops::RangeInclusive<usize>,
    pub exit_code: i32,
    pub description: String,
}

impl std::fmt::Display for RemoteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hint = if self.exit_code == 255 {
            " (ssh itself failed: the connection dropped or the remote launcher was killed)"
        } else {
            ""
        };
        write!(
            f,
            "node {} ({}, ranks {}-{}) failed: its launcher's ssh ended with {}{hint}",
            self.node_rank,
            self.host,
            self.ranks.start(),
            self.ranks.end(),
            self.description
        )
    }
}

/// One ssh child and what is known of it.
#[derive(Debug)]
struct RemoteProcess {
    node_rank: usize,
    host: String,
    ranks: std::ops::RangeInclusive<usize>,
    pid: u32,
    child: Child,
    status: Option<ExitStatus>,
}

/// State shared by node 0's main thread, the thread that watches the ssh children and
/// the supervisor (through `RemoteFailureStop`), for one attempt.
#[derive(Debug, Default)]
struct Shared {
    processes: Mutex<Vec<RemoteProcess>>,
    stopping: AtomicBool,
    /// The first remote node that failed while the attempt ran.
    first_failure: Mutex<Option<RemoteFailure>>,
    /// Set once that failure was returned as the attempt's outcome.
    failure_reported: AtomicBool,
}

impl Shared {
    fn first_failure(&self) -> Option<RemoteFailure> {
        lock(&self.first_failure).clone()
    }

    /// The remote failure as the attempt's outcome (its report names the node).
    fn failure_outcome(&self) -> Option<Outcome> {
        let failure = self.first_failure()?;
        self.failure_reported.store(true, Ordering::SeqCst);
        Some(Outcome::WorkerFailed {
            rank: *failure.ranks.start(),
            exit_code: failure.exit_code,
            report: format!("rsdeep: {failure}\n"),
            at_ms: supervise::unix_ms(),
        })
    }
}

/// The supervisor's stop source on node 0 of an ssh job: a remote node's failure ends
/// the attempt, reported as that node's failure.
#[derive(Debug)]
struct RemoteFailureStop(Arc<Shared>);

impl StopSource for RemoteFailureStop {
    fn stop_outcome(&self) -> Option<Outcome> {
        self.0.failure_outcome()
    }
}

impl Shared {
    /// Polls every ssh child once; the first non-zero exit while the job runs becomes
    /// the failure (which ends node 0's attempt through `RemoteFailureStop`). Returns
    /// true when every child has exited.
    fn poll(&self) -> bool {
        let mut processes = lock(&self.processes);
        for process in processes.iter_mut().filter(|p| p.status.is_none()) {
            let Ok(Some(status)) = process.child.try_wait() else {
                continue;
            };
            process.status = Some(status);
            if status.success() || self.stopping.load(Ordering::SeqCst) {
                continue;
            }
            lock(&self.first_failure).get_or_insert_with(|| RemoteFailure {
                node_rank: process.node_rank,
                host: process.host.clone(),
                ranks: process.ranks.clone(),
                exit_code: supervise::exit_code_of(status),
                description: supervise::describe_status(status),
            });
        }
        processes.iter().all(|p| p.status.is_some())
    }
}

/// The running remote launchers of one attempt of an ssh job, seen from node 0.
#[derive(Debug)]
pub struct SshNodes {
    shared: Arc<Shared>,
    stdins: Vec<ChildStdin>,
    readers: Vec<JoinHandle<()>>,
    monitor: Option<JoinHandle<()>>,
}

impl SshNodes {
    /// Starts one ssh per remote node (attempt `restart_count` of the job: its remote
    /// launchers pass it to their workers) and sends each the token line. Call from the
    /// main thread: every ssh gets SIGKILL when the thread that spawned it dies, so a
    /// killed node-0 launcher closes every connection and every remote launcher stops.
    pub fn start(
        launch: &SshLaunch,
        token: &str,
        restart_count: u32,
    ) -> Result<SshNodes, SshError> {
        let mut nodes = SshNodes {
            shared: Arc::new(Shared::default()),
            stdins: Vec::new(),
            readers: Vec::new(),
            monitor: None,
        };
        for spec in &launch.nodes {
            let command = spec.remote.render(restart_count);
            if let Err(reason) = nodes.spawn_one(&launch.options, spec, &command, token) {
                nodes.stop(Duration::ZERO);
                return Err(SshError::Spawn {
                    node_rank: spec.node_rank,
                    host: spec.host.clone(),
                    reason: reason.to_string(),
                });
            }
        }
        let shared = nodes.shared.clone();
        nodes.monitor = Some(std::thread::spawn(move || {
            while !shared.poll() {
                std::thread::sleep(POLL);
            }
        }));
        Ok(nodes)
    }

    fn spawn_one(
        &mut self,
        options: &[String],
        spec: &RemoteNodeSpec,
        command_line: &str,
        token: &str,
    ) -> std::io::Result<()> {
        let mut command = Command::new("ssh");
        command
            .args(options)
            .arg(&spec.host)
            .arg(command_line)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let launcher_pid = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                crate::supervise::die_with_launcher(launcher_pid);
                Ok(())
            });
        }
        let mut child = command.spawn()?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("ssh has no stdin pipe"))?;
        if let Some(out) = child.stdout.take() {
            self.readers
                .push(forward_remote_lines(out, spec.node_rank, false));
        }
        if let Some(err) = child.stderr.take() {
            self.readers
                .push(forward_remote_lines(err, spec.node_rank, true));
        }
        let pid = child.id();
        lock(&self.shared.processes).push(RemoteProcess {
            node_rank: spec.node_rank,
            host: spec.host.clone(),
            ranks: spec.ranks.clone(),
            pid,
            child,
            status: None,
        });
        stdin.write_all(format!("{token}\n").as_bytes())?;
        stdin.flush()?;
        self.stdins.push(stdin);
        Ok(())
    }

    /// After node 0's own workers all exited 0: waits until every remote launcher has
    /// ended, a remote node failed or a signal arrived, and says how the attempt ended.
    pub fn wait_for_remote_nodes(&self) -> Outcome {
        eprintln!("rsdeep: node 0 is done; waiting for the other node(s)");
        while !self.all_exited() && STOP_SIGNAL.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(POLL);
        }
        self.shared
            .failure_outcome()
            .unwrap_or_else(|| match STOP_SIGNAL.load(Ordering::SeqCst) {
                0 => Outcome::Success,
                signal => Outcome::Interrupted { signal },
            })
    }

    /// What ends node 0's attempt when a remote node fails (`SuperviseOptions::stop_source`).
    pub fn stop_source(&self) -> Arc<dyn StopSource> {
        Arc::new(RemoteFailureStop(self.shared.clone()))
    }

    /// Ends the attempt on every remote node (see `stop`) and mentions a remote failure
    /// that the attempt's report did not name.
    pub fn stop_all(mut self, grace: Duration) {
        self.stop(grace);
        if let Some(failure) = self.shared.first_failure()
            && !self.shared.failure_reported.load(Ordering::SeqCst)
        {
            eprintln!("rsdeep: also: {failure}");
        }
    }

    /// Stops every remote node: closes the ssh stdins (each remote launcher stops its
    /// workers within its grace period and exits), then SIGKILLs the ssh clients still
    /// running after `grace` plus a margin.
    pub fn stop(&mut self, grace: Duration) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.stdins.clear();
        let deadline = Instant::now() + grace + REMOTE_STOP_MARGIN;
        while Instant::now() < deadline && !self.all_exited() {
            std::thread::sleep(POLL);
        }
        for process in lock(&self.shared.processes).iter_mut() {
            if process.status.is_none() {
                eprintln!(
                    "rsdeep: node {} ({}) did not stop in time; killing its ssh (pid {})",
                    process.node_rank, process.host, process.pid
                );
                let _ = killpg(Pid::from_raw(process.pid as i32), Signal::SIGKILL);
                process.status = process.child.wait().ok();
            }
        }
        if let Some(monitor) = self.monitor.take() {
            let _ = monitor.join();
        }
        let drain_deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < drain_deadline && self.readers.iter().any(|r| !r.is_finished()) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn all_exited(&self) -> bool {
        match self.monitor {
            Some(_) => lock(&self.shared.processes)
                .iter()
                .all(|p| p.status.is_some()),
            None => self.shared.poll(),
        }
    }
}

impl Drop for SshNodes {
    fn drop(&mut self) {
        if !self.stdins.is_empty() {
            self.stop(Duration::ZERO);
        }
    }
}

/// Copies one ssh stream to node 0's stdout/stderr, line by line, with the node prefix.
fn forward_remote_lines(
    stream: impl Read + Send + 'static,
    node_rank: usize,
    to_stderr: bool,
) -> JoinHandle<()> {
    let prefixed = move |line: &str| prefix_remote_line(node_rank, line);
    crate::supervise::lines::forward(stream, to_stderr, prefixed, |_| {})
}

/// On a remote node (`--token_stdin`): the job token, the first line of stdin.
pub fn read_token_line(mut input: impl BufRead) -> Result<String, SshError> {
    let mut line = String::new();
    input
        .read_line(&mut line)
        .map_err(|e| SshError::TokenStdin(format!("cannot read the token from stdin: {e}")))?;
    let token = line.trim_end_matches(['\n', '\r']);
    if token.is_empty() {
        return Err(SshError::TokenStdin(
            "stdin closed before the token line arrived".into(),
        ));
    }
    Ok(token.to_string())
}

/// On a remote node: the supervisor's stop source that ends the attempt once stdin
/// reaches EOF (node 0 stopping the job, or node 0 or its ssh gone), exiting as SIGHUP
/// (a hung-up connection) would. A thread reads stdin; when the connection is gone it
/// points stdout/stderr at /dev/null first so the launcher's last messages cannot fail
/// on a closed pipe.
pub fn stop_on_stdin_eof() -> Arc<dyn StopSource> {
    let closed = Arc::new(AtomicBool::new(false));
    let seen = closed.clone();
    std::thread::spawn(move || {
        let mut sink = [0u8; 256];
        let mut stdin = std::io::stdin().lock();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        if output_is_closed() {
            silence_output();
        }
        seen.store(true, Ordering::SeqCst);
    });
    Arc::new(StdinClosed(closed))
}

/// Set once a remote launcher's stdin reached EOF.
#[derive(Debug)]
struct StdinClosed(Arc<AtomicBool>);

impl StopSource for StdinClosed {
    fn stop_outcome(&self) -> Option<Outcome> {
        self.0.load(Ordering::SeqCst).then(|| Outcome::Stopped {
            reason: "node 0 closed this node's ssh stdin: stopping the job here".into(),
            exit_code: 128 + libc::SIGHUP,
        })
    }
}

/// True when nobody reads this process's stderr any more (a pipe or socket whose other
/// end is closed reports POLLERR or POLLHUP).
fn output_is_closed() -> bool {
    let mut poll = libc::pollfd {
        fd: libc::STDERR_FILENO,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0 && poll.revents & (libc::POLLERR | libc::POLLHUP) != 0
}

/// Points stdout and stderr at /dev/null.
fn silence_output() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto the standard descriptors with a valid open descriptor.
        unsafe {
            libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO);
            libc::dup2(null.as_raw_fd(), libc::STDERR_FILENO);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn exported_env_keeps_documented_prefixes_and_never_the_token() {
        let process = pairs(&[
            ("NCCL_DEBUG", "INFO"),
            ("PYTHONPATH", "/code"),
            ("RSDEEP_LOG", "info"),
            ("RSDEEP_TOKEN", "secret"),
            ("RSDEEP_JOB_ID", "job"),
            ("CUDA_VISIBLE_DEVICES", "0"),
            ("CUDA_HOME", "/cuda"),
            ("HOME", "/root"),
            ("PATH", "/bin"),
        ]);
        let file = pairs(&[
            ("NCCL_DEBUG", "WARN"),
            ("MY_VAR", "x"),
            ("RSDEEP_TOKEN", "s"),
        ]);
        let env = exported_env(process, &file);
        assert_eq!(
            env,
            pairs(&[
                ("CUDA_HOME", "/cuda"),
                ("MY_VAR", "x"),
                ("NCCL_DEBUG", "WARN"),
                ("PYTHONPATH", "/code"),
                ("RSDEEP_LOG", "info"),
            ])
        );
    }

    #[test]
    fn shell_quote_leaves_safe_words_and_quotes_the_rest() {
        assert_eq!(shell_quote("/a/b-c_d.json"), "/a/b-c_d.json");
        assert_eq!(shell_quote("--lr=1e-4"), "--lr=1e-4");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's $HOME"), "'it'\\''s $HOME'");
    }

    #[test]
    fn quoted_remote_command_survives_a_real_shell() {
        let env = pairs(&[("A", "x y"), ("B", "it's")]);
        let args: Vec<String> = ["$HOME", "a;b", "c'd"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let command = remote_command(
            Path::new("/tmp/dir with space"),
            &env,
            Path::new("/bin/p"),
            &args,
        );
        assert!(
            command.starts_with("cd '/tmp/dir with space' && exec env 'A=x y'"),
            "{command}"
        );
        // Replace the cd/exec with printing what the shell would have passed on.
        let (_, tail) = command.split_once(" && exec env ").unwrap();
        let script = format!("for w in {tail}; do printf '%s\\n' \"$w\"; done");
        let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        let words: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        assert_eq!(words, ["A=x y", "B=it's", "/bin/p", "$HOME", "a;b", "c'd"]);
    }

    #[test]
    fn ssh_options_put_the_user_first_then_port_then_defaults() {
        let options = ssh_options(Some(2200), "-i /k  -o StrictHostKeyChecking=no");
        assert_eq!(&options[..3], ["-i", "/k", "-o"]);
        assert_eq!(&options[4..6], ["-p", "2200"]);
        assert!(options.contains(&"BatchMode=yes".to_string()));
        assert_eq!(
            ssh_options(None, "").first().map(String::as_str),
            Some("-o")
        );
    }

    #[test]
    fn a_restarted_remote_launcher_gets_the_restart_count_and_nothing_else_changes() {
        let remote = RemoteCommand {
            cwd: "/job dir".into(),
            env: pairs(&[("OMP_NUM_THREADS", "1")]),
            program: "/bin/rsdeep".into(),
            args: vec!["--node_rank".into(), "1".into()],
        };
        let first = remote.render(0);
        assert!(!first.contains(ev::RESTART_COUNT), "{first}");
        let second = remote.render(2);
        assert_eq!(
            second,
            "cd '/job dir' && exec env OMP_NUM_THREADS=1 RSDEEP_RESTART_COUNT=2 /bin/rsdeep --node_rank 1"
        );
        let exported = exported_env(pairs(&[(ev::RESTART_COUNT, "5")]), &[]);
        assert!(
            exported.iter().all(|(k, _)| k != ev::RESTART_COUNT),
            "node 0 sets the restart count itself: {exported:?}"
        );
    }

    #[test]
    fn world_hosts_round_trip_and_bad_entries_are_refused() {
        let hosts = vec![
            HostEntry {
                host: "a".into(),
                slots: 2,
            },
            HostEntry {
                host: "10.0.0.2".into(),
                slots: 8,
            },
        ];
        let text = encode_world_hosts(&hosts);
        assert_eq!(text, "a=2,10.0.0.2=8");
        assert_eq!(decode_world_hosts(&text).unwrap(), hosts);
        for bad in ["a", "a=x", "=2", "a=2,"] {
            assert!(decode_world_hosts(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn remote_args_forward_the_launch_and_never_the_token() {
        let args = LaunchArgs::try_parse_from([
            "rsdeep",
            "-H",
            "hosts",
            "--device",
            "cpu",
            "--num_procs",
            "2",
            "--exclude",
            "b:1",
            "--master_port",
            "4000",
            "--max_restarts",
            "3",
            "t.json",
            "--lr",
            "1e-4",
        ])
        .unwrap();
        let hosts = vec![HostEntry {
            host: "a".into(),
            slots: 2,
        }];
        let remote = remote_launcher_args(&args, NodeStart::Ssh(1), "10.0.0.1", 4000, &hosts);
        let reparsed = LaunchArgs::try_parse_from(
            std::iter::once("rsdeep".to_string()).chain(remote.iter().cloned()),
        )
        .unwrap();
        assert_eq!(reparsed.node_rank, Some(1));
        assert!(reparsed.no_ssh && reparsed.token_stdin);
        assert_eq!(reparsed.master_addr, "10.0.0.1");
        assert_eq!(reparsed.master_port, 4000);
        assert_eq!(reparsed.world_hosts.as_deref(), Some("a=2"));
        assert_eq!(reparsed.exclude, "b:1");
        assert_eq!(reparsed.num_procs, Some(2));
        assert_eq!(reparsed.max_restarts, 0, "node 0 alone decides restarts");
        assert_eq!(reparsed.config_and_overrides, ["t.json", "--lr", "1e-4"]);
        assert!(!remote.iter().any(|a| a.contains("secret")));
    }

    #[test]
    fn remote_lines_get_node_and_rank_prefixes() {
        assert_eq!(
            prefix_remote_line(1, "[rank 3] loss 2.0"),
            "[node 1 rank 3] loss 2.0"
        );
        assert_eq!(
            prefix_remote_line(2, "rsdeep: job x"),
            "[node 2] rsdeep: job x"
        );
    }

    #[test]
    fn token_is_the_first_stdin_line() {
        assert_eq!(read_token_line(&b"abc123\nrest"[..]).unwrap(), "abc123");
        assert!(read_token_line(&b""[..]).is_err());
    }

    #[test]
    fn master_addr_is_node_0_when_local_else_the_route_to_the_first_remote() {
        let (addr, how) = detect_master_addr("127.0.0.1", &["127.0.0.2"]).unwrap();
        assert_eq!(addr, "127.0.0.1");
        assert!(how.contains("this machine"), "{how}");
        // 192.0.2.1 (TEST-NET-1) is nobody's address: the route source is used instead.
        match detect_master_addr("192.0.2.1", &["127.0.0.2"]) {
            Ok((addr, how)) => {
                assert_eq!(addr, "127.0.0.1");
                assert!(how.contains("reach 127.0.0.2"), "{how}");
            }
            Err(e) => panic!("{e}"),
        }
        assert!(detect_master_addr("192.0.2.1", &[]).is_err());
    }

    #[test]
    fn a_loopback_node_0_among_remote_hosts_is_refused() {
        assert!(loopback_among_remote("127.0.0.1", &["192.0.2.7"]));
        assert!(loopback_among_remote(
            "localhost",
            &["127.0.0.2", "192.0.2.7"]
        ));
        assert!(!loopback_among_remote("127.0.0.1", &["127.0.0.2"]));
        assert!(!loopback_among_remote("192.0.2.1", &["192.0.2.7"]));
        let launch = SshLaunch {
            options: Vec::new(),
            nodes: Vec::new(),
            unreachable_node0: Some("localhost".into()),
        };
        let err = launch.preflight().unwrap_err().to_string();
        assert!(
            err.contains("first hostfile host localhost is a loopback name"),
            "{err}"
        );
    }

    #[test]
    fn unreachable_host_is_named_quickly() {
        // Nothing listens on port 1 of 127.0.0.3: ssh fails at once (or ssh is missing).
        let launch = SshLaunch {
            options: ssh_options(Some(1), "-F none -o StrictHostKeyChecking=no"),
            nodes: vec![RemoteNodeSpec {
                node_rank: 1,
                host: "127.0.0.3".into(),
                ranks: 2..=3,
                command: "true".into(),
                remote: RemoteCommand {
                    cwd: "/".into(),
                    env: Vec::new(),
                    program: "true".into(),
                    args: Vec::new(),
                },
            }],
            unreachable_node0: None,
        };
        let started = Instant::now();
        let err = launch.preflight().unwrap_err().to_string();
        assert!(
            err.starts_with("127.0.0.3 is not reachable over ssh"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
