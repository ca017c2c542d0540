//! End-to-end SLURM tests: a real one-node SLURM (munged, slurmctld, slurmd from
//! Debian's `slurm-wlm` and `munge`, installed with apt-get when missing) runs in a folder
//! the test owns, on free loopback ports (munged as user munge, slurm.conf through
//! `SLURM_CONF`). `deploy/slurm/train-1node.sbatch` is submitted
//! with `sbatch --wait` for a tiny 2-rank CPU training: the job must train and leave a
//! complete checkpoint; a second job is sent SIGUSR1 (what `--signal=B:USR1@120` sends
//! before the time limit) and must requeue and resume from its newest checkpoint; and
//! `deploy/slurm/train-multinode.sbatch` runs on two SLURM nodes, each a slurmd in its own
//! network namespace and host name, whose launchers form one world; on those two nodes
//! `--max_restarts` is coordinated by node 0 (a rank killed on node 1 restarts both nodes
//! into generation 2 and ends byte-identical to an uninterrupted run; a second kill gives
//! up on both nodes naming it; a frozen node 0 makes node 1 stop and say so). Also:
//! `expand_hostlist` against `scontrol show hostnames`, and `--launcher slurm` errors
//! naming the missing variable. A machine that cannot run SLURM fails the test with the
//! reason; nothing is skipped.

use rsdeep::plan::hostlist::expand_hostlist;
use rsdeep_e2e::{
    TrainFixture, assert_losses_match_a_resume, binary, logged_step, sentence_corpus,
};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The SLURM tests train on the same 2 cores: one at a time.
static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Programs the tests run (their Debian package is installed when one is missing).
const DAEMONS: [&str; 7] = [
    "/usr/sbin/munged",
    "/usr/sbin/slurmctld",
    "/usr/sbin/slurmd",
    "/usr/bin/sbatch",
    "/usr/bin/scontrol",
    "/usr/bin/sinfo",
    "/sbin/ip",
];

/// Installs `slurm-wlm munge iproute2` when a binary is missing (idempotent); panics with the reason
/// when that is impossible.
fn ensure_slurm_installed() {
    if DAEMONS.iter().all(|p| Path::new(p).exists()) {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "SLURM is not installed ({} missing) and this test is not root, so it cannot \
         `apt-get install slurm-wlm munge`; install them or run the tests as root",
        DAEMONS.iter().find(|p| !Path::new(p).exists()).unwrap()
    );
    for args in [
        &["update"][..],
        &[
            "install",
            "-y",
            "--no-install-recommends",
            "slurm-wlm",
            "munge",
            "iproute2",
        ][..],
    ] {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .expect("apt-get cannot be started: this machine cannot install SLURM");
        assert!(
            out.status.success(),
            "apt-get {args:?} failed, so SLURM cannot be installed here:\n{}",
            tail(&out)
        );
    }
    assert!(
        DAEMONS.iter().all(|p| Path::new(p).exists()),
        "apt-get installed slurm-wlm and munge but a daemon is still missing"
    );
}

fn tail(out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A free TCP port on loopback (released at once; SLURM binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn short_hostname() -> String {
    let out = Command::new("hostname")
        .arg("-s")
        .output()
        .expect("hostname -s");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// munged + slurmctld + slurmd with every file in `dir`; stopped by PID on drop.
/// Fields drop after `Drop::drop` stopped the daemons: the network goes last.
struct SlurmCluster {
    daemons: Vec<(&'static str, Child)>,
    network: Option<TwoHostNetwork>,
    dir: tempfile::TempDir,
}

impl SlurmCluster {
    fn new() -> SlurmCluster {
        ensure_slurm_installed();
        let dir = tempfile::tempdir().expect("temp dir");
        set_mode(dir.path(), 0o755); // munged (user munge) must reach its socket
        let mut cluster = SlurmCluster {
            daemons: Vec::new(),
            network: None,
            dir,
        };
        cluster.start_munge();
        cluster
    }

    /// One node named like this machine on 127.0.0.1.
    fn start() -> SlurmCluster {
        let mut cluster = SlurmCluster::new();
        let host = short_hostname();
        cluster.write_config("127.0.0.1", &[(host, "127.0.0.1".to_string())]);
        cluster.spawn("slurmctld", Command::new("slurmctld").args(["-D", "-i"]));
        cluster.spawn("slurmd", Command::new("slurmd").arg("-D"));
        cluster.wait_until_idle(1, Duration::from_secs(60));
        cluster
    }

    /// Two nodes, each a slurmd in its own network namespace with its own host name and
    /// an /etc/hosts (bind-mounted in a private mount namespace) naming both; slurmctld
    /// in this namespace on the bridge address. Each slurmd starts through `nsenter`, not
    /// `ip netns exec` (which remounts /sys, and slurmd then fails on cgroups).
    fn start_two_nodes() -> SlurmCluster {
        let mut cluster = SlurmCluster::new();
        let network = TwoHostNetwork::create();
        let nodes: Vec<(String, String)> = (0..2)
            .map(|i| (network.host_name(i), network.address(i)))
            .collect();
        cluster.write_config(&network.bridge_address(), &nodes);
        let hosts = cluster.path("hosts");
        let mut lines = String::from("127.0.0.1 localhost\n");
        for (name, addr) in &nodes {
            lines.push_str(&format!("{addr} {name}\n"));
        }
        std::fs::write(&hosts, lines).expect("hosts file");
        cluster.spawn("slurmctld", Command::new("slurmctld").args(["-D", "-i"]));
        for (i, (name, _)) in nodes.iter().enumerate() {
            let script = format!(
                "mount --bind {} /etc/hosts && hostname {name} && exec slurmd -D -N {name}",
                hosts.display()
            );
            cluster.spawn(
                ["slurmd-0", "slurmd-1"][i],
                Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{}", network.namespace(i)))
                    .args(["unshare", "--uts", "--mount", "sh", "-c", &script]),
            );
        }
        cluster.network = Some(network);
        cluster.wait_until_idle(2, Duration::from_secs(60));
        cluster
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn conf(&self) -> PathBuf {
        self.path("slurm.conf")
    }

    /// Starts `command` with its output in `<dir>/<name>.log` and `SLURM_CONF` set.
    fn spawn(&mut self, name: &'static str, command: &mut Command) {
        let log = File::create(self.path(&format!("{name}.log"))).expect("daemon log");
        let child = command
            .env("SLURM_CONF", self.conf())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.daemons.push((name, child));
    }

    /// munged as user munge with its own key and socket (as root it refuses to run).
    fn start_munge(&mut self) {
        let munge_dir = self.path("munge");
        std::fs::create_dir(&munge_dir).expect("munge dir");
        let key: Vec<u8> = (0..1024).map(|_| rand_byte()).collect();
        std::fs::write(munge_dir.join("munge.key"), key).expect("munge key");
        let status = Command::new("chown")
            .args(["-R", "munge:munge"])
            .arg(&munge_dir)
            .status()
            .expect("chown");
        assert!(
            status.success(),
            "cannot chown the munge folder to user munge"
        );
        set_mode(&munge_dir.join("munge.key"), 0o400);
        set_mode(&munge_dir, 0o755);
        let socket = munge_dir.join("munge.sock");
        let file = |name: &str| format!("--{name}={}", munge_dir.join(name).display());
        self.spawn(
            "munged",
            Command::new("setpriv")
                .args(["--reuid=munge", "--regid=munge", "--init-groups"])
                .args(["/usr/sbin/munged", "-F"])
                .arg(format!("--socket={}", socket.display()))
                .arg(format!(
                    "--key-file={}",
                    munge_dir.join("munge.key").display()
                ))
                .args([file("log-file"), file("pid-file"), file("seed-file")]),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "munged did not create its socket within 20 s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// slurm.conf for one node named like this machine, with the layout `slurmd -C` reports.
    /// slurm.conf: slurmctld at `ctld_addr`, `nodes` as (name, address) with the layout
    /// `slurmd -C` reports; every path in the cluster's folder.
    fn write_config(&self, ctld_addr: &str, nodes: &[(String, String)]) {
        let host = short_hostname();
        let layout = Command::new("slurmd")
            .arg("-C")
            .output()
            .expect("slurmd -C");
        let layout = String::from_utf8_lossy(&layout.stdout);
        let node_line = layout
            .lines()
            .find(|l| l.starts_with("NodeName="))
            .unwrap_or_else(|| panic!("`slurmd -C` printed no NodeName line: {layout}"));
        let resources: Vec<&str> = node_line
            .split_whitespace()
            .skip(1)
            .filter(|kv| !kv.starts_with("Boards="))
            .collect();
        let run = self.dir.path().display();
        let text = format!(
            "ClusterName=rsdeeptest\n\
             SlurmctldHost={host}({ctld_addr})\n\
             SlurmctldPort={ctld}\nSlurmdPort={slurmd}\n\
             SlurmUser=root\nSlurmdUser=root\n\
             AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={run}/munge/munge.sock\n\
             MpiDefault=none\nMailProg=/bin/true\n\
             ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
             SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n\
             AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none\n\
             ReturnToService=2\nMinJobAge=5\n\
             StateSaveLocation={run}/state\nSlurmdSpoolDir={run}/spool/%n\n\
             SlurmctldPidFile={run}/slurmctld.pid\nSlurmdPidFile={run}/slurmd-%n.pid\n\
             SlurmctldLogFile={run}/slurmctld.file.log\nSlurmdLogFile={run}/slurmd.file.log\n\
             {node_lines}\
             PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n",
            ctld = free_port(),
            slurmd = free_port(),
            node_lines = nodes
                .iter()
                .map(|(name, addr)| {
                    format!(
                        "NodeName={name} NodeAddr={addr} {} State=UNKNOWN\n",
                        resources.join(" ")
                    )
                })
                .collect::<String>(),
        );
        for sub in ["state", "spool"] {
            std::fs::create_dir(self.path(sub)).expect("slurm state dir");
        }
        std::fs::write(self.conf(), text).expect("slurm.conf");
    }

    fn wait_until_idle(&mut self, nodes: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        let want = format!("idle {nodes}");
        loop {
            let state = self.command("sinfo").args(["-h", "-o", "%T %D"]).output();
            if let Ok(out) = &state
                && String::from_utf8_lossy(&out.stdout).trim() == want
            {
                return;
            }
            let exited = self
                .daemons
                .iter_mut()
                .find_map(|(name, child)| Some((*name, child.try_wait().ok()??)));
            if let Some((name, status)) = exited {
                panic!(
                    "{name} exited ({status}) before the node became idle:\n{}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the SLURM node(s) did not become idle within {limit:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A SLURM client command (`sbatch`, `scontrol`...) aimed at this cluster.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.env("SLURM_CONF", self.conf());
        command
    }

    fn logs(&self) -> String {
        logs_in(self.dir.path())
    }
}

fn logs_in(dir: &Path) -> String {
    let mut text = String::new();
    for name in [
        "munged.log",
        "slurmctld.log",
        "slurmd.log",
        "slurmd-0.log",
        "slurmd-1.log",
        "slurmctld.file.log",
        "slurmd.file.log",
    ] {
        let body = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        let lines: Vec<&str> = body.lines().collect();
        let last = lines[lines.len().saturating_sub(15)..].join("\n");
        text.push_str(&format!("--- {name}\n{last}\n"));
    }
    text
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        // Jobs first (their slurmstepd is not our child), then the daemons in order.
        let _ = self
            .command("scancel")
            .args(["--full", "-u", "root"])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let out = self.command("squeue").args(["-h", "-o", "%i"]).output();
            if out.map_or(true, |o| o.stdout.is_empty()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        for (_, child) in self.daemons.iter_mut().rev() {
            stop(child);
        }
    }
}

/// SIGTERM, up to 10 s, then SIGKILL; always reaped.
fn stop(child: &mut Child) {
    // SAFETY: kill(2) on a child this test started and has not reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A bridge in this namespace (`.254`) and two network namespaces (`.1`, `.2`) on a
/// private /24 of 10.213.0.0/16, with a blackhole route so nothing for that subnet can
/// leave the machine; removed on drop. Names carry a per-process number.
struct TwoHostNetwork {
    id: u32,
}

impl TwoHostNetwork {
    fn create() -> TwoHostNetwork {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the two-node SLURM test needs root to create network namespaces"
        );
        let network = TwoHostNetwork {
            id: 20 + std::process::id() % 200,
        };
        network.remove(); // leftovers of a killed run with the same number
        let bridge = network.bridge();
        let subnet = format!("{}.0/24", network.prefix());
        network.ip(&["link", "add", &bridge, "type", "bridge"]);
        network.ip(&[
            "addr",
            "add",
            &format!("{}/24", network.bridge_address()),
            "dev",
            &bridge,
        ]);
        network.ip(&["link", "set", &bridge, "up"]);
        network.ip(&["route", "add", "blackhole", &subnet, "metric", "4000"]);
        for i in 0..2 {
            let (ns, outer, inner) = (
                network.namespace(i),
                network.veth(i, 'v'),
                network.veth(i, 'p'),
            );
            network.ip(&["netns", "add", &ns]);
            network.ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ]);
            network.ip(&["link", "set", &inner, "netns", &ns]);
            network.ip(&["link", "set", &outer, "master", &bridge, "up"]);
            let addr = format!("{}/24", network.address(i));
            network.ip(&["-n", &ns, "addr", "add", &addr, "dev", &inner]);
            network.ip(&["-n", &ns, "link", "set", &inner, "up"]);
            network.ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        network
    }

    fn prefix(&self) -> String {
        format!("10.213.{}", self.id)
    }
    fn bridge(&self) -> String {
        format!("rsbr{}", self.id)
    }
    fn bridge_address(&self) -> String {
        format!("{}.254", self.prefix())
    }
    fn namespace(&self, i: usize) -> String {
        format!("rsns{}-{i}", self.id)
    }
    fn veth(&self, i: usize, side: char) -> String {
        format!("rs{side}{}-{i}", self.id)
    }
    fn address(&self, i: usize) -> String {
        format!("{}.{}", self.prefix(), i + 1)
    }
    fn host_name(&self, i: usize) -> String {
        format!("rsn{}{}", self.id, ['a', 'b'][i])
    }

    /// Runs `ip args`; panics with its message on failure.
    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
            panic!("cannot run `ip` (package iproute2) for the two-node network: {e}")
        });
        assert!(
            out.status.success(),
            "ip {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Best-effort removal (errors ignored: parts may not exist).
    fn remove(&self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("ip").args(args).stderr(Stdio::null()).status();
        };
        for i in 0..2 {
            quiet(&["link", "del", &self.veth(i, 'v')]);
            quiet(&["netns", "del", &self.namespace(i)]);
        }
        quiet(&["link", "del", &self.bridge()]);
        let subnet = format!("{}.0/24", self.prefix());
        quiet(&["route", "del", "blackhole", &subnet, "metric", "4000"]);
    }
}

impl Drop for TwoHostNetwork {
    fn drop(&mut self) {
        self.remove();
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn rand_byte() -> u8 {
    use std::io::Read;
    let mut byte = [0u8];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut byte))
        .expect("/dev/urandom");
    byte[0]
}

/// Corpus, tokenizer, tiny Qwen2 config and a pretrain train.json (6 steps saving every
/// 3, 2 CPU ranks, ZeRO-2).
fn fixture() -> TrainFixture {
    let fx = TrainFixture::new(&corpus(), 64, 512, 400);
    fx.pretrain_json(
        "train.json",
        serde_json::json!({
            "block_size": 32,
            "max_steps": 6,
            "save_steps": 3,
            "seed": 7,
            "output_dir": fx.path("out"),
            "deepspeed": {"gradient_accumulation_steps": "auto"}
        }),
    );
    fx
}

/// 300 short documents of repetitive, learnable English.
fn corpus() -> String {
    let subjects = [
        "the quick brown fox",
        "a lazy dog",
        "the old captain",
        "my cat",
    ];
    let verbs = ["jumps over", "sleeps near", "sails across", "watches"];
    let objects = ["the fence", "the harbour", "a sunny garden", "the mountain"];
    sentence_corpus(300, &subjects, &verbs, &objects)
}

/// The sbatch script of `deploy/slurm/`.
fn deploy_script(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/slurm")
        .join(name);
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// A running `sbatch --wait`.
struct Submission {
    child: Child,
    stdout: PathBuf,
}

/// `sbatch --wait deploy/slurm/<script> train.json <overrides>` with no GPUs and the
/// launcher flags `launch_args` (RSDEEP_LAUNCH_ARGS).
fn submit(
    cluster: &SlurmCluster,
    fixture: &TrainFixture,
    script: &str,
    launch_args: &str,
    overrides: &[&str],
) -> Submission {
    submit_logging(cluster, fixture, script, launch_args, overrides, "warn")
}

/// `submit` with `RSDEEP_LOG=log_filter` for the launchers and workers.
fn submit_logging(
    cluster: &SlurmCluster,
    fixture: &TrainFixture,
    script: &str,
    launch_args: &str,
    overrides: &[&str],
    log_filter: &str,
) -> Submission {
    let train_json = fixture.path("train.json").display().to_string();
    let args: Vec<&str> = std::iter::once(train_json.as_str())
        .chain(overrides.iter().copied())
        .collect();
    submit_with_args(cluster, fixture, script, launch_args, &args, log_filter)
}

/// `sbatch --wait deploy/slurm/<script> args...`.
fn submit_with_args(
    cluster: &SlurmCluster,
    fixture: &TrainFixture,
    script: &str,
    launch_args: &str,
    args: &[&str],
    log_filter: &str,
) -> Submission {
    let stdout = fixture.path("sbatch.stdout");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
    let mut command = cluster.command("sbatch");
    command
        .arg("--wait")
        .arg("--gpus-per-node=0")
        .arg(format!("--cpus-per-task={cpus}"))
        .arg(deploy_script(script))
        .args(args)
        .current_dir(fixture.root())
        .env("RSDEEP", binary("rsdeep"))
        .env("RSDEEP_LAUNCH_ARGS", launch_args)
        .env("OMP_NUM_THREADS", "1")
        .env("RSDEEP_LOG", log_filter)
        .env_remove("RSDEEP_JOB_ID")
        .env_remove("RSDEEP_TOKEN")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .stdin(Stdio::null())
        .stdout(File::create(&stdout).expect("sbatch stdout"))
        .stderr(File::create(fixture.path("sbatch.stderr")).expect("sbatch stderr"));
    let child = command.spawn().expect("start sbatch");
    Submission { child, stdout }
}

impl Submission {
    /// The job id from "Submitted batch job N".
    fn job_id(&self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let text = std::fs::read_to_string(&self.stdout).unwrap_or_default();
            if let Some(id) = text.trim().strip_prefix("Submitted batch job ") {
                return id.trim().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "sbatch printed no job id: {text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for `sbatch --wait` (the job's exit code); panics with `context` after `limit`.
    fn wait(&mut self, limit: Duration, context: impl Fn() -> String) -> i32 {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait sbatch") {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "sbatch --wait did not return within {limit:?}\n{}",
                    context()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The job's output file (`%x-%j.out` in the submit folder).
fn job_output(fixture: &TrainFixture, job_id: &str) -> String {
    std::fs::read_to_string(fixture.path(&format!("rsdeep-{job_id}.out"))).unwrap_or_default()
}

fn logged_steps(output: &str) -> Vec<u64> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("[rank 0] step "))
        .filter_map(|rest| rest.split('/').next()?.parse().ok())
        .collect()
}

#[test]
fn sbatch_one_node_script_trains_and_writes_a_complete_checkpoint() {
    let _serial = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cluster = SlurmCluster::start();
    let fixture = fixture();
    let started = Instant::now();
    let mut job = submit(
        &cluster,
        &fixture,
        "train-1node.sbatch",
        "--device cpu --num_procs 2",
        &[],
    );
    let id = job.job_id(Duration::from_secs(30));
    let code = job.wait(Duration::from_secs(300), || {
        job_output(&fixture, &id) + &cluster.logs()
    });
    let output = job_output(&fixture, &id);
    assert_eq!(code, 0, "the job failed:\n{output}\n{}", cluster.logs());
    eprintln!(
        "sbatch --wait of a 6-step 2-rank job: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        output.contains(&format!("rsdeep: SLURM job {id} node 0 of 1")),
        "{output}"
    );
    assert!(output.contains("world size 2"), "{output}");
    assert!(
        output.contains("no complete checkpoint") && output.contains("starting fresh"),
        "the first run of a requeueable job must start fresh:\n{output}"
    );
    assert_eq!(logged_steps(&output), [1, 2, 3, 4, 5, 6], "{output}");
    let out = fixture.path("out");
    for step in [3, 6] {
        let manifest = out.join(format!("checkpoint-{step}/manifest.json"));
        assert!(manifest.is_file(), "{} is missing", manifest.display());
    }
    assert!(out.join("model.safetensors").is_file());
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics.jsonl");
    assert!(metrics.lines().count() >= 6, "{metrics}");
}

#[test]
fn sigusr1_before_the_time_limit_requeues_and_resumes_from_the_newest_checkpoint() {
    let _serial = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cluster = SlurmCluster::start();
    let fixture = fixture();
    let mut job = submit(
        &cluster,
        &fixture,
        "train-1node.sbatch",
        "--device cpu --num_procs 2",
        &["--max_steps", "40", "--save_steps", "4"],
    );
    let id = job.job_id(Duration::from_secs(30));
    let first = fixture.path("out/checkpoint-4/manifest.json");
    let deadline = Instant::now() + Duration::from_secs(240);
    while !first.exists() {
        assert!(
            Instant::now() < deadline,
            "no checkpoint-4 within 240 s:\n{}",
            job_output(&fixture, &id)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // What `#SBATCH --signal=B:USR1@120` does 120 s before the time limit.
    let status = cluster
        .command("scancel")
        .args(["--batch", "--signal=USR1", &id])
        .status()
        .expect("scancel");
    assert!(status.success(), "scancel --signal=USR1 failed");
    // SLURM holds a requeued job back ~2 minutes (BeginTime); release it at once.
    let released = Instant::now() + Duration::from_secs(60);
    while Instant::now() < released {
        let state = cluster
            .command("squeue")
            .args(["-h", "-j", &id, "-o", "%T %r"])
            .output()
            .expect("squeue");
        if String::from_utf8_lossy(&state.stdout).contains("BeginTime") {
            let _ = cluster
                .command("scontrol")
                .args(["update", &format!("jobid={id}"), "starttime=now"])
                .status();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let code = job.wait(Duration::from_secs(300), || {
        job_output(&fixture, &id) + &cluster.logs()
    });
    let output = job_output(&fixture, &id);
    assert_eq!(code, 0, "the requeued job failed:\n{output}");
    assert!(
        output.contains("SIGUSR1 (time limit near)"),
        "the trap did not run:\n{output}"
    );
    assert!(
        output.contains("received signal 15, stopping every worker"),
        "rsdeep was not stopped with SIGTERM:\n{output}"
    );
    assert!(
        output.contains("restart count 1"),
        "not requeued:\n{output}"
    );
    let resumed = output
        .lines()
        .find_map(|l| l.split("resumed from ").nth(1))
        .and_then(|rest| rest.split(" at step ").nth(1))
        .and_then(|step| step.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("the requeued run did not resume:\n{output}"));
    assert!(
        resumed >= 4 && resumed % 4 == 0,
        "resumed at step {resumed}"
    );
    let steps = logged_steps(&output);
    assert_eq!(steps.last(), Some(&40), "{output}");
    let after_requeue: Vec<u64> = steps.iter().copied().filter(|&s| s > resumed).collect();
    assert_eq!(after_requeue.first(), Some(&(resumed + 1)), "{output}");
    assert!(fixture.path("out/checkpoint-40/manifest.json").is_file());
}

/// Patterns compared with `scontrol show hostnames` (valid in Slurm 22.05).
const PATTERNS: [&str; 12] = [
    "node[01-04,07]",
    "n[01-10]",
    "a,b",
    "rack[1-2]-n[1-3]",
    "node[1-3,7]",
    "n[8-10],gpu7",
    "n[001-5] x[1-010]",
    "n1[0-2],m[09-11]",
    "a-[1-2],b[3]",
    "n[1-2][3-4]",
    "gpu[2,1,2]",
    "host.example.com,n[0-3]-[5-6]",
];

#[test]
fn hostlist_expansion_matches_scontrol_show_hostnames() {
    ensure_slurm_installed();
    let dir = tempfile::tempdir().expect("temp dir");
    let conf = dir.path().join("slurm.conf");
    std::fs::write(
        &conf,
        "ClusterName=hostlist\nSlurmctldHost=localhost(127.0.0.1)\n\
         NodeName=localhost CPUs=1 State=UNKNOWN\nPartitionName=p Nodes=ALL Default=YES\n",
    )
    .expect("slurm.conf");
    for pattern in PATTERNS {
        let out = Command::new("scontrol")
            .args(["show", "hostnames", pattern])
            .env("SLURM_CONF", &conf)
            .output()
            .expect("scontrol");
        assert!(out.status.success(), "scontrol failed on {pattern}");
        let theirs: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        assert!(!theirs.is_empty(), "scontrol expanded {pattern} to nothing");
        let ours = expand_hostlist(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"));
        assert_eq!(ours, theirs, "{pattern}");
    }
}

/// `rsdeep --launcher slurm --device cpu --selftest <extra>` with only the given SLURM_*
/// and RSDEEP_* variables (none inherited).
fn launcher_slurm_with(extra: &[&str], vars: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = Command::new(binary("rsdeep"));
    for (key, _) in std::env::vars() {
        if key.starts_with("SLURM_") || key.starts_with("RSDEEP_") {
            command.env_remove(key);
        }
    }
    command
        .args(["--launcher", "slurm", "--device", "cpu", "--selftest"])
        .args(extra)
        .current_dir(dir.path())
        .envs(vars.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run rsdeep")
}

fn launcher_slurm(vars: &[(&str, &str)]) -> Output {
    launcher_slurm_with(&[], vars)
}

#[test]
fn launcher_slurm_plans_from_slurm_variables() {
    let vars = [
        ("SLURM_JOB_ID", "9"),
        ("SLURM_STEP_ID", "3"),
        ("SLURM_NNODES", "1"),
        ("SLURM_NODEID", "0"),
        ("SLURM_JOB_NODELIST", "localhost"),
        ("SLURM_RESTART_COUNT", "2"),
    ];
    let out = launcher_slurm_with(&["--num_procs", "2", "--dry_run"], &vars);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("job slurm-9.3 | 2 rank(s) on 1 node(s) | device cpu"),
        "{stdout}"
    );
    assert!(stdout.contains("RSDEEP_JOB_ID=slurm-9.3"), "{stdout}");
    assert!(
        stderr.contains("SLURM job 9 node 0 of 1 (localhost), restart count 2"),
        "{stderr}"
    );
}

#[test]
fn launcher_slurm_names_the_missing_or_inconsistent_variable() {
    let base = [
        ("SLURM_JOB_ID", "9"),
        ("SLURM_NNODES", "2"),
        ("SLURM_NODEID", "1"),
    ];
    let out = launcher_slurm(&base);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("SLURM_JOB_NODELIST is not set"), "{stderr}");
    assert!(!stderr.contains("localhost"), "{stderr}");
    let mut vars = base.to_vec();
    vars.push(("SLURM_JOB_NODELIST", "node[1-3]"));
    let out = launcher_slurm(&vars);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("SLURM_JOB_NODELIST lists 3 node(s)") && stderr.contains("SLURM_NNODES=2"),
        "{stderr}"
    );
    vars[3] = ("SLURM_JOB_NODELIST", "node[1-2]");
    let out = launcher_slurm(&vars);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("RSDEEP_TOKEN is not set"),
        "several nodes without a shared token must fail: {stderr}"
    );
    vars[3] = ("SLURM_JOB_NODELIST", "rsdeep-unresolvable-node[1-2]");
    vars.push(("RSDEEP_TOKEN", "shared"));
    let out = launcher_slurm(&vars);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("rsdeep-unresolvable-node2 does not resolve on this node"),
        "{stderr}"
    );
}

#[test]
fn sbatch_many_node_script_forms_one_world_across_two_network_namespaces() {
    let _serial = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cluster = SlurmCluster::start_two_nodes();
    let fixture = fixture();
    let started = Instant::now();
    let mut job = submit(
        &cluster,
        &fixture,
        "train-multinode.sbatch",
        "--device cpu --num_procs 1",
        &[],
    );
    let id = job.job_id(Duration::from_secs(30));
    let code = job.wait(Duration::from_secs(300), || {
        job_output(&fixture, &id) + &cluster.logs()
    });
    let output = job_output(&fixture, &id);
    assert_eq!(code, 0, "the job failed:\n{output}\n{}", cluster.logs());
    eprintln!(
        "sbatch --wait of a 6-step job on 2 SLURM nodes: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let network = cluster.network.as_ref().expect("two-node network");
    let (first, second) = (network.host_name(0), network.host_name(1));
    for line in [
        format!("SLURM job {id} node 0 of 2 ({first}), restart count 0, rendezvous host {first}"),
        format!("SLURM job {id} node 1 of 2 ({second}), restart count 0, rendezvous host {first}"),
        "rendezvous complete: 2 rank(s)".to_string(),
        "started 1 worker(s) on node 1 (world size 2".to_string(),
    ] {
        assert!(output.contains(&line), "missing {line:?}:\n{output}");
    }
    assert_eq!(logged_steps(&output), [1, 2, 3, 4, 5, 6], "{output}");
    for step in [3, 6] {
        let manifest = fixture.path(&format!("out/checkpoint-{step}/manifest.json"));
        assert!(manifest.is_file(), "{} is missing", manifest.display());
    }
}

/// The pid of a live process started as `program` (its first argument) whose environment
/// holds every entry of `exact` and an entry starting with each of `prefixes`.
fn process_with(program: &Path, exact: &[String], prefixes: &[String]) -> Option<i32> {
    let program = program.display().to_string();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            let environ = String::from_utf8_lossy(&environ);
            let vars: Vec<&str> = environ.split('\0').collect();
            let cmdline = String::from_utf8_lossy(&cmdline);
            let ours = cmdline.split('\0').next() == Some(program.as_str())
                && exact.iter().all(|e| vars.contains(&e.as_str()))
                && prefixes
                    .iter()
                    .all(|p| vars.iter().any(|v| v.starts_with(p.as_str())));
            ours.then_some(pid)
        })
}

/// The pid of the live `rsdeep-worker` of SLURM job `job_id` with `RANK=rank`.
fn worker_of_rank(job_id: &str, rank: usize) -> Option<i32> {
    process_with(
        &binary("rsdeep-worker"),
        &[format!("RANK={rank}")],
        &[format!("RSDEEP_JOB_ID=slurm-{job_id}")],
    )
}

/// Runs the two-node job with `overrides` (and `extra` launcher flags) to the end and
/// returns its output; panics with it when the job fails.
fn run_two_node_job(cluster: &SlurmCluster, fixture: &TrainFixture, overrides: &[&str]) -> String {
    let mut job = submit(
        cluster,
        fixture,
        "train-multinode.sbatch",
        "--device cpu --num_procs 1",
        overrides,
    );
    let id = job.job_id(Duration::from_secs(30));
    let code = job.wait(Duration::from_secs(300), || {
        job_output(fixture, &id) + &cluster.logs()
    });
    let output = job_output(fixture, &id);
    assert_eq!(code, 0, "the job failed:\n{output}\n{}", cluster.logs());
    output
}

#[test]
fn a_rank_killed_on_node_1_restarts_both_nodes_from_the_checkpoint_bit_identical() {
    let _serial = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cluster = SlurmCluster::start_two_nodes();
    let fixture = fixture();
    let started = Instant::now();
    let (reference, faulty) = (fixture.path("reference"), fixture.path("faulty"));
    let overrides = |out: &Path| {
        let out = out.display().to_string();
        [
            "--max_steps",
            "16",
            "--save_steps",
            "4",
            "--output_dir",
            &out,
        ]
        .map(String::from)
    };
    let reference_args = overrides(&reference);
    let reference_args: Vec<&str> = reference_args.iter().map(String::as_str).collect();
    run_two_node_job(&cluster, &fixture, &reference_args);
    let want = std::fs::read(reference.join("model.safetensors")).expect("reference weights");
    eprintln!(
        "uninterrupted reference: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let faulty_args = overrides(&faulty);
    let faulty_args: Vec<&str> = faulty_args.iter().map(String::as_str).collect();
    let mut job = submit_logging(
        &cluster,
        &fixture,
        "train-multinode.sbatch",
        "--device cpu --num_procs 1 --max_restarts 1",
        &faulty_args,
        "warn,rsdeep_worker=info",
    );
    let id = job.job_id(Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(120);
    while logged_step(&faulty) < 5 {
        assert!(
            Instant::now() < deadline,
            "step 5 never logged:\n{}",
            job_output(&fixture, &id)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let victim = worker_of_rank(&id, 1).unwrap_or_else(|| {
        panic!(
            "no rank 1 worker of job {id}:\n{}",
            job_output(&fixture, &id)
        )
    });
    // SAFETY: kill(2) on a worker of the job this test submitted.
    assert_eq!(
        unsafe { libc::kill(victim, libc::SIGKILL) },
        0,
        "kill {victim}"
    );
    eprintln!(
        "killed rank 1 (pid {victim}) at logged step {}",
        logged_step(&faulty)
    );
    let code = job.wait(Duration::from_secs(300), || {
        job_output(&fixture, &id) + &cluster.logs()
    });
    let output = job_output(&fixture, &id);
    print_launcher_lines(&output);
    assert_eq!(code, 0, "the restarted job failed:\n{output}");
    assert_eq!(
        output.matches("rsdeep: restarting the job (").count(),
        1,
        "one restart, logged once by node 0 only:\n{output}"
    );
    assert!(
        output.contains(
            "rsdeep: restarting the job (1/1), rendezvous generation 2: resuming from checkpoint-"
        ),
        "{output}"
    );
    let second = cluster.network.as_ref().expect("network").host_name(1);
    assert!(
        output.contains(&format!(
            "rank 1 failed first (host {second}, pid {victim}): signal 9 (SIGKILL)"
        )),
        "node 1 reports its killed rank:\n{output}"
    );
    assert_eq!(
        output.matches("started 1 worker(s) on node 1").count(),
        2,
        "node 1 starts its workers twice:\n{output}"
    );
    let rejoined = output.lines().any(|l| {
        l.starts_with("[rank 1]")
            && l.contains("joined the rendezvous")
            && l.contains("generation=2")
    });
    assert!(
        rejoined,
        "node 1's rank did not join generation 2:\n{output}"
    );
    assert!(output.contains("rsdeep: every node finished"), "{output}");
    let got = std::fs::read(faulty.join("model.safetensors")).expect("final weights");
    assert!(
        got == want,
        "the restarted run's weights differ from the uninterrupted run's"
    );
    eprintln!(
        "reference + restarted two-node SLURM runs: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_node_lost_for_good_leaves_the_slurm_job_to_finish_on_node_0_as_a_resume_there_would() {
    // Two SLURM nodes of two ranks each; node 1's launcher dies for good after step 5.
    let _serial = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cluster = SlurmCluster::start_two_nodes();
    let fixture = fixture();
    let out = fixture.path("elastic");
    let out_arg = out.display().to_string();
    let overrides = [
        "--max_steps",
        "16",
        "--save_steps",
        "4",
        "--output_dir",
        &out_arg,
    ];
    let mut job = submit(
        &cluster,
        &fixture,
        "train-multinode.sbatch",
        "--device cpu --num_procs 2 --max_restarts 1 --min_nodes 1 --node_return_timeout 2 \
         --grace_period 5",
        &overrides,
    );
    let id = job.job_id(Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(120);
    while logged_step(&out) < 5 {
        assert!(
            Instant::now() < deadline,
            "step 5 never logged:\n{}",
            job_output(&fixture, &id)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Node 1 is gone for good: its launcher (and with it its ranks) dies, nothing restarts it.
    let node1 = launcher_of_node(&id, 1).unwrap_or_else(|| {
        panic!(
            "no node-1 launcher of job {id}:\n{}",
            job_output(&fixture, &id)
        )
    });
    signal(node1, libc::SIGKILL);
    let code = job.wait(Duration::from_secs(300), || {
        job_output(&fixture, &id) + &cluster.logs()
    });
    let output = job_output(&fixture, &id);
    print_launcher_lines(&output);
    assert_eq!(code, 0, "the elastic job failed:\n{output}");
    let network = cluster.network.as_ref().expect("network");
    let (first, second) = (network.host_name(0), network.host_name(1));
    assert!(
        output.contains(&format!(
            "rsdeep: elastic: waiting up to 2 s for {second} to answer again"
        )),
        "{output}"
    );
    assert!(
        output.contains(
            "rsdeep: elastic: world size 2: train_batch_size 8 = 2 micro batch x 2 accumulation x 2 ranks"
        ),
        "the global batch of 2 x 1 x 4 is kept:\n{output}"
    );
    let announced = format!(
        "rsdeep: elastic: restarting the job (1/1) on 1 node(s) ({first}), world size 2 (was 4), \
         without {second}: resuming from checkpoint-"
    );
    let resumed_step: u64 = output
        .split_once(&announced)
        .and_then(|(_, rest)| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no elastic restart line:\n{output}"));
    assert!(output.contains("rsdeep: every node finished"), "{output}");

    // The same checkpoint resumed by two ranks outside SLURM, the global batch kept by hand.
    let checkpoint = out.join(format!("checkpoint-{resumed_step}"));
    let overrides = [
        "--max_steps",
        "16",
        "--save_steps",
        "4",
        "--gradient_accumulation_steps",
        "2",
    ];
    assert_losses_match_a_resume(
        &fixture.path("train.json"),
        2,
        &overrides,
        (&checkpoint, resumed_step, 16),
        (&out, &fixture.path("reference")),
    );
}

/// Waits until the job's output satisfies `pred`; panics with it after `limit`.
fn wait_for_output(fixture: &TrainFixture, id: &str, limit: Duration, pred: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        let output = job_output(fixture, id);
        if pred(&output) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not seen within {limit:?}:\n{output}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pid of the `rsdeep` launcher of SLURM job `job_id` on node `node`.
fn launcher_of_node(job_id: &str, node: usize) -> Option<i32> {
    let exact = [
        format!("SLURM_NODEID={node}"),
        format!("SLURM_JOB_ID={job_id}"),
    ];
    process_with(&binary("rsdeep"), &exact, &[])
}

fn signal(pid: i32, signal: libc::c_int) {
    // SAFETY: kill(2) on a process of the job this test submitted.
    assert_eq!(
        unsafe { libc::kill(pid, signal) },
        0,
        "kill({pid}, {signal})"
    );
}

/// A 2-node SLURM job (1 CPU rank per node) that trains until it is stopped, past its
/// first rendezvous. Fields drop in order: the job's cluster goes before the lock.
struct EndlessTwoNodeJob {
    job: Submission,
    id: String,
    fixture: TrainFixture,
    cluster: SlurmCluster,
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// Starts an `EndlessTwoNodeJob` with the launcher flags `launch_args` and waits until
/// both ranks joined generation 1.
fn start_endless_two_node_job(launch_args: &str) -> EndlessTwoNodeJob {
    let serial = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cluster = SlurmCluster::start_two_nodes();
    let fixture = fixture();
    let job = submit(
        &cluster,
        &fixture,
        "train-multinode.sbatch",
        launch_args,
        &["--max_steps", "100000", "--save_steps", "100000"],
    );
    let id = job.job_id(Duration::from_secs(30));
    wait_for_output(&fixture, &id, Duration::from_secs(120), |o| {
        o.contains("rendezvous complete: 2 rank(s) joined generation 1")
    });
    EndlessTwoNodeJob {
        job,
        id,
        fixture,
        cluster,
        _serial: serial,
    }
}

/// Prints the launchers' `rsdeep: ` lines of a job's output (they tell what happened).
fn print_launcher_lines(output: &str) {
    for line in output.lines().filter(|l| l.contains("rsdeep: ")) {
        eprintln!("{line}");
    }
}

#[test]
fn used_up_restarts_end_both_nodes_naming_the_rank_killed_on_node_1() {
    // Bindings drop in reverse: the job first, the lock last.
    let EndlessTwoNodeJob {
        _serial,
        cluster,
        fixture,
        id,
        mut job,
    } = start_endless_two_node_job("--device cpu --num_procs 1 --max_restarts 1");
    let worker = |not: Option<i32>| {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match worker_of_rank(&id, 1) {
                Some(pid) if Some(pid) != not => return pid,
                _ => assert!(
                    Instant::now() < deadline,
                    "no new rank 1 worker:\n{}",
                    job_output(&fixture, &id)
                ),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let first = worker(None);
    signal(first, libc::SIGKILL);
    wait_for_output(&fixture, &id, Duration::from_secs(120), |o| {
        o.contains("rendezvous complete: 2 rank(s) joined generation 2")
    });
    let second = worker(Some(first));
    signal(second, libc::SIGKILL);
    let code = job.wait(Duration::from_secs(120), || {
        job_output(&fixture, &id) + &cluster.logs()
    });
    let output = job_output(&fixture, &id);
    print_launcher_lines(&output);
    assert_ne!(code, 0, "{output}");
    assert_eq!(
        output.matches("rsdeep: restarting the job (").count(),
        1,
        "{output}"
    );
    let after_restart = output
        .split_once("rsdeep: restarting the job (1/1), rendezvous generation 2")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no restart:\n{output}"));
    let host = cluster.network.as_ref().expect("network").host_name(1);
    let named = format!("rank 1 failed first (host {host}, pid {second}): signal 9 (SIGKILL)");
    assert!(
        after_restart.contains("rsdeep: giving up: all 1 restart(s) used"),
        "{output}"
    );
    assert!(
        after_restart.contains(&format!(
            "rsdeep: node 1 ({host}, ranks 1-1) failed:\nrsdeep: {named}"
        )),
        "node 0's last report must name node 1's killed rank:\n{output}"
    );
    assert!(
        after_restart.contains("rsdeep: node 0 ends the job with exit code 137"),
        "node 1 must exit on node 0's word:\n{output}"
    );
    assert!(output.contains("rsdeep exited with status 137"), "{output}");
}

#[test]
fn a_node_that_loses_node_0_stops_its_workers_and_says_so() {
    // Bindings drop in reverse: the job first, the lock last.
    let EndlessTwoNodeJob {
        _serial,
        cluster,
        fixture,
        id,
        mut job,
    } = start_endless_two_node_job(
        "--device cpu --num_procs 1 --max_restarts 1 --heartbeat_timeout 3 --heartbeat_interval 0.5",
    );
    let node0 = launcher_of_node(&id, 0)
        .unwrap_or_else(|| panic!("no node 0 launcher:\n{}", job_output(&fixture, &id)));
    let node1_worker = worker_of_rank(&id, 1).expect("node 1's worker");
    // A frozen node 0: its rendezvous stops answering, its workers keep training.
    signal(node0, libc::SIGSTOP);
    let stopped = Instant::now();
    let first = cluster.network.as_ref().expect("network").host_name(0);
    let lost = format!("rsdeep: node 0 is lost: its rendezvous at http://{first}:");
    wait_for_output(&fixture, &id, Duration::from_secs(30), |o| {
        o.contains(&lost)
    });
    let noticed = stopped.elapsed();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{node1_worker}")).exists() {
        assert!(
            Instant::now() < deadline,
            "node 1's worker {node1_worker} still runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Node 1's launcher exits non-zero once its worker is gone, and srun's
    // --kill-on-bad-exit then SIGKILLs the stopped node 0: it may be gone already (a
    // loaded host loses that race), so its SIGCONT is best effort.
    // SAFETY: kill(2) on a process of the job this test submitted.
    unsafe {
        libc::kill(node0, libc::SIGCONT);
    }
    let code = job.wait(Duration::from_secs(120), || {
        job_output(&fixture, &id) + &cluster.logs()
    });
    let output = job_output(&fixture, &id);
    print_launcher_lines(&output);
    eprintln!(
        "node 1 gave up on node 0 {:.1} s after the SIGSTOP",
        noticed.as_secs_f64()
    );
    assert!(
        noticed >= Duration::from_secs(3) && noticed < Duration::from_secs(10),
        "heartbeat timeout 3 s: noticed after {noticed:?}"
    );
    assert!(output.contains("has been unreachable for"), "{output}");
    assert_ne!(code, 0, "{output}");
    assert!(!output.contains("rsdeep: restarting the job ("), "{output}");
}

#[test]
fn scancel_sigterm_stops_both_nodes_without_a_restart() {
    // Bindings drop in reverse: the job first, the lock last.
    let EndlessTwoNodeJob {
        _serial,
        cluster,
        fixture,
        id,
        mut job,
    } = start_endless_two_node_job("--device cpu --num_procs 1 --max_restarts 1");
    // What the requeue trap of the sbatch scripts does on SIGUSR1.
    let status = cluster
        .command("scancel")
        .args(["--signal=TERM", &id])
        .status()
        .expect("scancel");
    assert!(status.success(), "scancel --signal=TERM failed");
    let signalled = Instant::now();
    let code = job.wait(Duration::from_secs(120), || {
        job_output(&fixture, &id) + &cluster.logs()
    });
    let stopped_in = signalled.elapsed();
    let output = job_output(&fixture, &id);
    print_launcher_lines(&output);
    eprintln!("job ended {:.1} s after scancel", stopped_in.as_secs_f64());
    assert_eq!(code, 143, "{output}");
    assert!(
        !output.contains("rsdeep: restarting the job ("),
        "a signal never restarts:\n{output}"
    );
    assert_eq!(
        output
            .matches("rsdeep: received signal 15, stopping every worker")
            .count(),
        2,
        "both nodes stop on the signal:\n{output}"
    );
    assert!(output.contains("rsdeep exited with status 143"), "{output}");
}

#[test]
fn a_user_script_runs_on_two_slurm_nodes_as_one_torch_distributed_world() {
    let _serial = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cluster = SlurmCluster::start_two_nodes();
    let fixture = fixture();
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/user_scripts/torchrun_style.py");
    let python = std::env::var("RSDEEP_PYTHON").expect("RSDEEP_PYTHON (scripts/env.sh)");
    let launch_args = format!("--device cpu --num_procs 1 --no_local_rank --python {python}");
    let script = script.display().to_string();
    let mut job = submit_with_args(
        &cluster,
        &fixture,
        "script-multinode.sbatch",
        &launch_args,
        &[&script],
        "warn",
    );
    let id = job.job_id(Duration::from_secs(30));
    let code = job.wait(Duration::from_secs(180), || {
        job_output(&fixture, &id) + &cluster.logs()
    });
    let output = job_output(&fixture, &id);
    assert_eq!(code, 0, "the job failed:\n{output}\n{}", cluster.logs());
    for rank in 0..2 {
        let line = format!("rank {rank} of 2 sum 3 (local_rank 0)");
        assert!(output.contains(&line), "missing {line:?}:\n{output}");
    }
}
