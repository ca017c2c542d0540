//! End-to-end tests of the ssh multi-node runner through the real binaries: a
//! real sshd on 127.0.0.1 and 127.0.0.2 (`hosts/sshd.rs`) plays two hosts of this
//! machine; node 0 starts node 1's launcher over ssh. Checked: a short training across
//! both "hosts" forms one world of four ranks and finishes; an unreachable host fails
//! fast naming it; the dry run shows the ssh command without the token; a host in its
//! own network namespace joins through the detected master address; killing the
//! node-0 launcher, or one remote worker, leaves no process of the job on any node;
//! with `--max_restarts` node 0 restarts every node into generation 2 after a remote
//! worker is killed and the final weights match an uninterrupted run, and used-up
//! restarts fail with node 1's report naming the killed rank first; with `--min_nodes`
//! a node lost for good is left behind (the losses then equal a resume at the smaller
//! world size) and a node that answers again rejoins at the next restart. The pdsh, Open
//! MPI and MPICH runners (installed from Debian packages when missing) start a user script on
//! both hosts as one world, stop every node when a remote rank raises, and leave no rank
//! behind when the launcher is SIGKILLed.
//! Tests run one at a time (each starts four libtorch workers on a 2-core machine).

#[path = "hosts/sshd.rs"]
mod sshd;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rsdeep_e2e::{
    Launcher, TrainFixture, alive, assert_losses_match_a_resume, binary, kill_all, logged_step,
    wait_for_step,
};
use sshd::Sshd;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// The training fixture plus a hostfile of `hosts` with 2 slots each.
fn fixture(hosts: &[&str]) -> TrainFixture {
    fixture_with_slots(hosts, 2)
}

/// The training fixture (a 200-line corpus) plus a hostfile of `hosts` with `slots` each.
fn fixture_with_slots(hosts: &[&str], slots: usize) -> TrainFixture {
    let corpus: String = (0..200)
        .map(|i| {
            let text = format!("the fox {} jumps over fence {} again.", i % 7, i % 5);
            serde_json::json!({ "text": text }).to_string() + "\n"
        })
        .collect();
    let fx = TrainFixture::new(&corpus, 32, 320, 300);
    let hostfile: String = hosts
        .iter()
        .map(|h| format!("{h} slots={slots}\n"))
        .collect();
    std::fs::write(fx.path("hostfile"), hostfile).expect("hostfile");
    fx
}

/// The train.json files these tests run.
trait SshRuns {
    fn train_json(&self, max_steps: u32) -> PathBuf;
    fn checkpointed_train_json(&self, name: &str) -> (PathBuf, PathBuf);
}

impl SshRuns for TrainFixture {
    /// A ZeRO-2 pretrain train.json of `max_steps` steps writing to `out/`.
    fn train_json(&self, max_steps: u32) -> PathBuf {
        let settings = serde_json::json!({
            "block_size": 16,
            "max_steps": max_steps,
            "save_steps": 1_000_000,
            "seed": 3,
            "output_dir": self.path("out"),
        });
        self.pretrain_json("train.json", settings)
    }

    /// A ZeRO-2 train.json of `RESTART_STEPS` steps with a checkpoint every
    /// `RESTART_SAVE_STEPS`, writing to `<name>/`; returns (train.json, output dir).
    fn checkpointed_train_json(&self, name: &str) -> (PathBuf, PathBuf) {
        let out = self.path(name);
        let settings = serde_json::json!({
            "block_size": 16,
            "max_steps": RESTART_STEPS,
            "save_steps": RESTART_SAVE_STEPS,
            "seed": 5,
            "output_dir": out,
            "deepspeed": {
                "zero_optimization": {"reduce_bucket_size": 5000, "allgather_bucket_size": 5000}
            }
        });
        (self.pretrain_json(&format!("{name}.json"), settings), out)
    }
}

const RESTART_STEPS: u64 = 16;
const RESTART_SAVE_STEPS: u64 = 4;

/// A port nobody listens on right now (for the rendezvous).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Starts `rsdeep -H hostfile --device cpu ... train.json` as node 0 of the ssh runner.
fn launch(fx: &TrainFixture, sshd: &Sshd, train_json: &Path, extra: &[&str]) -> Launcher {
    let hostfile = fx.path("hostfile").display().to_string();
    let json = train_json.display().to_string();
    let (ssh_port, master_port) = (sshd.port.to_string(), free_port().to_string());
    let mut args = vec![
        "-H",
        &hostfile,
        "--device",
        "cpu",
        "--ssh_port",
        &ssh_port,
        "--master_port",
        &master_port,
        "--grace_period",
        "5",
    ];
    args.extend_from_slice(extra);
    args.push(&json);
    let envs = [
        ("RSDEEP_SSH_ARGS", sshd.client_args()),
        ("OMP_NUM_THREADS", "1".to_string()),
        ("RSDEEP_LOG", "info".to_string()),
    ];
    Launcher::start(&args, &envs)
}

/// The job id from node 0's `rsdeep: job <id> started ...` line.
fn job_id(stderr: &str) -> Option<String> {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("rsdeep: job "))
        .and_then(|rest| rest.split_whitespace().next())
        .map(String::from)
}

/// Live processes of the job (its id in their environment or command line).
fn job_processes(job: &str) -> Vec<(i32, String)> {
    let needle = format!("RSDEEP_JOB_ID={job}");
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let read = |name: &str| {
            std::fs::read(entry.path().join(name))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default()
        };
        let (environ, cmdline) = (read("environ"), read("cmdline"));
        if (environ.contains(&needle) || cmdline.contains(job)) && alive(pid) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Waits up to 15 s for every process of `job` to be gone; kills and fails on survivors.
fn assert_no_process_of_job_left(job: &str, stderr: &str) {
    let left = job_survivors(job, Duration::from_secs(15));
    kill_all(&left.iter().map(|(p, _)| *p).collect::<Vec<_>>());
    assert!(
        left.is_empty(),
        "survivors of job {job}: {left:?}\n{stderr}"
    );
}

/// Waits until no process of the job is left; returns the survivors after `limit`.
fn job_survivors(job: &str, limit: Duration) -> Vec<(i32, String)> {
    let deadline = Instant::now() + limit;
    loop {
        let left = job_processes(job);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until all four ranks logged that they joined; returns the job id.
fn wait_for_four_ranks(launcher: &Launcher) -> String {
    launcher.wait_for_stderr(Duration::from_secs(120), |s| {
        s.matches("joined the rendezvous").count() >= 4
    });
    job_id(&launcher.stderr()).expect("job id line")
}

#[test]
fn two_hosts_over_ssh_train_to_completion_as_one_world() {
    let _guard = serial();
    let sshd = Sshd::start();
    let fx = fixture(&["127.0.0.1", "127.0.0.2"]);
    let train_json = fx.train_json(4);
    let mut launcher = launch(&fx, &sshd, &train_json, &[]);
    let status = launcher.wait(Duration::from_secs(300));
    let stderr = launcher.stderr();
    assert_eq!(
        status.code(),
        Some(0),
        "{}\n--- sshd\n{}",
        launcher.output(),
        sshd.log()
    );
    for prefix in ["[rank 0]", "[rank 1]", "[node 1 rank 2]", "[node 1 rank 3]"] {
        let joined = stderr
            .lines()
            .find(|l| l.starts_with(prefix) && l.contains("joined the rendezvous"))
            .unwrap_or_else(|| panic!("no join line from {prefix}\n{stderr}"));
        assert!(
            joined.contains("generation=1") && joined.contains("world_size=4"),
            "{prefix} joined another world: {joined}"
        );
    }
    assert!(
        stderr.contains("rendezvous complete: 4 rank(s) joined generation 1"),
        "{stderr}"
    );
    assert!(
        stderr.contains("master address 127.0.0.1 (the first hostfile host"),
        "{stderr}"
    );
    let job = job_id(&stderr).expect("node 0 job line");
    assert!(
        stderr.contains(&format!(
            "[node 1] rsdeep: job {job} started 2 worker(s) on node 1"
        )),
        "node 1 runs the same job {job}: {stderr}"
    );
    assert!(stderr.contains("rsdeep: every node finished"), "{stderr}");
    let weights = fx.path("out").join("model.safetensors");
    assert!(weights.exists(), "no final model at {}", weights.display());
    assert!(job_survivors(&job, Duration::from_secs(5)).is_empty());
}

#[test]
fn an_unreachable_host_fails_fast_with_its_name() {
    let _guard = serial();
    let sshd = Sshd::start();
    // 127.0.0.3 reaches this machine too, but no sshd listens there.
    let fx = fixture(&["127.0.0.1", "127.0.0.2", "127.0.0.3"]);
    let train_json = fx.train_json(4);
    let started = Instant::now();
    let mut launcher = launch(&fx, &sshd, &train_json, &[]);
    let status = launcher.wait(Duration::from_secs(60));
    let took = started.elapsed();
    let stderr = launcher.stderr();
    assert_eq!(status.code(), Some(1), "{}", launcher.output());
    assert!(
        stderr.contains("127.0.0.3 is not reachable over ssh"),
        "{stderr}"
    );
    assert!(
        stderr.contains("Connection refused"),
        "ssh's own words: {stderr}"
    );
    assert!(!stderr.contains("127.0.0.2 is not reachable"), "{stderr}");
    assert!(!stderr.contains("started"), "nothing may start: {stderr}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[test]
fn dry_run_prints_the_ssh_commands_without_the_token() {
    let _guard = serial();
    let fx = fixture(&["127.0.0.1", "127.0.0.2"]);
    let train_json = fx.train_json(4);
    let args = [
        "-H",
        &fx.path("hostfile").display().to_string(),
        "--device",
        "cpu",
        "--ssh_port",
        "2299",
        "--dry_run",
        &train_json.display().to_string(),
        "--learning_rate",
        "1e-3",
    ]
    .map(String::from);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let envs = [
        ("RSDEEP_JOB_ID", "dryjob42".to_string()),
        ("RSDEEP_TOKEN", "sekrit-token-7".to_string()),
        ("NCCL_DEBUG", "INFO".to_string()),
        ("RSDEEP_SSH_ARGS", "-i /keys/id".to_string()),
    ];
    let mut launcher = Launcher::start(&args, &envs);
    assert_eq!(
        launcher.wait(Duration::from_secs(30)).code(),
        Some(0),
        "{}",
        launcher.output()
    );
    let stdout = launcher.stdout();
    let line = stdout
        .lines()
        .find(|l| l.starts_with("ssh node 1 (127.0.0.2): ssh -i /keys/id -p 2299 "))
        .unwrap_or_else(|| panic!("no ssh command for node 1:\n{stdout}"));
    for part in [
        "--no_ssh --token_stdin",
        "--node_rank 1 --master_addr 127.0.0.1 --master_port 29500",
        "RSDEEP_JOB_ID=dryjob42",
        "NCCL_DEBUG=INFO",
        "--learning_rate 1e-3",
        "--world_hosts 127.0.0.1=2,127.0.0.2=2",
    ] {
        assert!(line.contains(part), "missing {part:?} in {line}");
    }
    assert!(
        !launcher.output().contains("sekrit-token-7"),
        "{}",
        launcher.output()
    );
    assert!(
        stdout.contains("rank 3 host 127.0.0.2 node 1 local_rank 1 device cpu"),
        "{stdout}"
    );
}

#[test]
fn killing_the_node0_launcher_leaves_no_process_of_the_job_on_any_node() {
    let _guard = serial();
    let sshd = Sshd::start();
    let fx = fixture(&["127.0.0.1", "127.0.0.2"]);
    let train_json = fx.train_json(100_000);
    let launcher = launch(&fx, &sshd, &train_json, &[]);
    let job = wait_for_four_ranks(&launcher);
    let before = job_processes(&job);
    let remote_launcher = before
        .iter()
        .any(|(_, cmd)| cmd.contains("--token_stdin") && !cmd.starts_with("ssh"));
    assert!(
        remote_launcher,
        "node 1's launcher should run under sshd: {before:?}"
    );
    assert!(
        before.len() >= 6,
        "4 workers, node 1's launcher, ssh: {before:?}"
    );
    // SAFETY: kill(2) on the launcher this test started.
    unsafe { libc::kill(launcher.pid(), libc::SIGKILL) };
    let left = job_survivors(&job, Duration::from_secs(15));
    kill_all(&left.iter().map(|(p, _)| *p).collect::<Vec<_>>());
    assert!(
        left.is_empty(),
        "survivors of job {job}: {left:?}\n{}",
        launcher.output()
    );
}

#[test]
fn a_killed_remote_worker_stops_the_job_on_every_node() {
    let _guard = serial();
    let sshd = Sshd::start();
    let fx = fixture(&["127.0.0.1", "127.0.0.2"]);
    let train_json = fx.train_json(100_000);
    let mut launcher = launch(&fx, &sshd, &train_json, &[]);
    let job = wait_for_four_ranks(&launcher);
    let worker = binary("rsdeep-worker").display().to_string();
    let rank3 = job_processes(&job)
        .into_iter()
        .find(|(pid, cmd)| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            cmd.starts_with(&worker)
                && String::from_utf8_lossy(&environ)
                    .split('\0')
                    .any(|v| v == "RANK=3")
        })
        .unwrap_or_else(|| panic!("no rank 3 worker found\n{}", launcher.output()));
    // SAFETY: kill(2) on a worker of the job this test started.
    unsafe { libc::kill(rank3.0, libc::SIGKILL) };
    let status = launcher.wait(Duration::from_secs(60));
    let stderr = launcher.stderr();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("[node 1] rsdeep: rank 3 failed first (host 127.0.0.2"),
        "node 1 reports its worker: {stderr}"
    );
    assert_no_process_of_job_left(&job, &stderr);
}

#[test]
fn a_killed_remote_launcher_stops_the_job_on_every_node() {
    let _guard = serial();
    let sshd = Sshd::start();
    let fx = fixture(&["127.0.0.1", "127.0.0.2"]);
    let train_json = fx.train_json(100_000);
    let mut launcher = launch(&fx, &sshd, &train_json, &[]);
    let job = wait_for_four_ranks(&launcher);
    let remote_launcher = node1_launcher(&job, &launcher);
    // SAFETY: kill(2) on node 1's launcher of the job this test started.
    unsafe { libc::kill(remote_launcher, libc::SIGKILL) };
    let status = launcher.wait(Duration::from_secs(60));
    let stderr = launcher.stderr();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "node 1 (127.0.0.2, ranks 2-3) failed: its launcher's ssh ended with exit code 255"
        ),
        "node 0 names the node: {stderr}"
    );
    assert_no_process_of_job_left(&job, &stderr);
}

#[test]
fn a_node_that_never_joins_is_named_with_its_rank_range() {
    let _guard = serial();
    let sshd = Sshd::start();
    let fx = fixture(&["127.0.0.1", "127.0.0.2"]);
    // RSDEEP_WORKER_BIN reaches node 1 through the exported RSDEEP_* environment.
    let script = fx.path("worker.sh");
    let body = format!(
        "#!/bin/sh\nif [ \"$RSDEEP_NODE_RANK\" = 1 ]; then exec sleep 600; fi\nexec {}\n",
        binary("rsdeep-worker").display()
    );
    std::fs::write(&script, body).expect("worker script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod worker script");
    let hostfile = fx.path("hostfile").display().to_string();
    let (ssh_port, master_port) = (sshd.port.to_string(), free_port().to_string());
    let args = [
        "-H",
        &hostfile,
        "--device",
        "cpu",
        "--ssh_port",
        &ssh_port,
        "--master_port",
        &master_port,
        "--join_timeout",
        "8",
        "--grace_period",
        "3",
        "--selftest",
    ];
    let envs = [
        ("RSDEEP_SSH_ARGS", sshd.client_args()),
        ("RSDEEP_WORKER_BIN", script.display().to_string()),
        ("OMP_NUM_THREADS", "1".to_string()),
    ];
    let mut launcher = Launcher::start(&args, &envs);
    let status = launcher.wait(Duration::from_secs(90));
    let stderr = launcher.stderr();
    assert_eq!(status.code(), Some(1), "{}", launcher.output());
    assert!(
        stderr.contains("node 1 (127.0.0.2) never joined: ranks 2-3"),
        "the timeout names the node and its ranks: {stderr}"
    );
    let job = job_id(&stderr).expect("job id line");
    assert_no_process_of_job_left(&job, &stderr);
}

#[test]
fn a_host_in_another_network_namespace_joins_through_the_detected_master_address() {
    let _guard = serial();
    let other = sshd::OtherHost::create();
    let sshd = Sshd::start_in(&other);
    let fx = fixture(&[&other.local_address, &other.address]);
    let hostfile = fx.path("hostfile").display().to_string();
    let (ssh_port, master_port) = (sshd.port.to_string(), free_port().to_string());
    let args = [
        "-H",
        &hostfile,
        "--device",
        "cpu",
        "--ssh_port",
        &ssh_port,
        "--master_port",
        &master_port,
        "--selftest",
    ];
    let envs = [
        ("RSDEEP_SSH_ARGS", sshd.client_args()),
        ("OMP_NUM_THREADS", "1".to_string()),
    ];
    let mut launcher = Launcher::start(&args, &envs);
    let status = launcher.wait(Duration::from_secs(120));
    assert_eq!(
        status.code(),
        Some(0),
        "{}\n--- sshd\n{}",
        launcher.output(),
        sshd.log()
    );
    let detected = format!(
        "master address {} (the first hostfile host {} is this machine)",
        other.local_address, other.local_address
    );
    assert!(
        launcher.stderr().contains(&detected),
        "{}",
        launcher.output()
    );
    // Every rank prints the same peer table: node 0's ranks on this side of the link,
    // node 1's in the namespace.
    let stdout = launcher.stdout();
    let summaries: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_once("] rank ").map(|(_, rest)| rest))
        .collect();
    assert_eq!(summaries.len(), 4, "{stdout}");
    let tables: Vec<&str> = summaries
        .iter()
        .map(|s| s.split_once(" peers=").expect("peers").1)
        .collect();
    assert!(tables.iter().all(|t| t == &tables[0]), "{stdout}");
    let peers: Vec<&str> = tables[0]
        .trim_start_matches('[')
        .split(']')
        .next()
        .unwrap_or_default()
        .split(',')
        .collect();
    let hosts: Vec<&str> = peers
        .iter()
        .map(|p| p.rsplit_once(':').expect("addr").0)
        .collect();
    let (a, b) = (other.local_address.as_str(), other.address.as_str());
    assert_eq!(hosts, [a, a, b, b], "{stdout}");
    assert!(
        stdout.contains("[node 1 rank 3] rank 3/4 local 1 node 1"),
        "{stdout}"
    );
}

/// The pid of the live worker of `job` with `RANK=rank` other than `not`, waiting up to
/// 120 s for one to appear.
fn worker_of_rank(job: &str, rank: usize, not: Option<i32>, launcher: &Launcher) -> i32 {
    let worker = binary("rsdeep-worker").display().to_string();
    let wanted = format!("RANK={rank}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let found = job_processes(job).into_iter().find(|(pid, cmd)| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            cmd.starts_with(&worker)
                && Some(*pid) != not
                && String::from_utf8_lossy(&environ)
                    .split('\0')
                    .any(|v| v == wanted)
        });
        if let Some((pid, _)) = found {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "no rank {rank} worker of job {job}\n{}",
            launcher.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pid of node 1's launcher (the one sshd started with `--token_stdin`).
fn node1_launcher(job: &str, launcher: &Launcher) -> i32 {
    job_processes(job)
        .into_iter()
        .find(|(_, cmd)| cmd.contains("--token_stdin") && !cmd.starts_with("ssh"))
        .map(|(pid, _)| pid)
        .unwrap_or_else(|| panic!("no node-1 launcher found\n{}", launcher.output()))
}

fn sigkill(pid: i32) {
    // SAFETY: kill(2) on a worker of the job this test started.
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill({pid}) failed");
}

#[test]
fn a_killed_remote_worker_restarts_every_node_from_the_checkpoint_bit_identical() {
    let _guard = serial();
    let sshd = Sshd::start();
    let fx = fixture_with_slots(&["127.0.0.1", "127.0.0.2"], 1);
    let (reference_json, reference_out) = fx.checkpointed_train_json("reference");
    let mut straight = launch(&fx, &sshd, &reference_json, &[]);
    let status = straight.wait(Duration::from_secs(300));
    assert!(
        status.success(),
        "reference run failed:\n{}",
        straight.output()
    );
    let want = std::fs::read(reference_out.join("model.safetensors")).expect("reference weights");

    let (json, out) = fx.checkpointed_train_json("faulty");
    let mut launcher = launch(&fx, &sshd, &json, &["--max_restarts", "1"]);
    launcher.wait_for_stderr(Duration::from_secs(120), |s| {
        s.matches("joined the rendezvous").count() >= 2
    });
    let job = job_id(&launcher.stderr()).expect("job id line");
    let victim = worker_of_rank(&job, 1, None, &launcher);
    // A step after the first checkpoint.
    wait_for_step(
        &launcher,
        &out,
        RESTART_SAVE_STEPS + 1,
        Duration::from_secs(300),
    );
    sigkill(victim);
    println!(
        "killed rank 1 (pid {victim}) at logged step {}",
        logged_step(&out)
    );
    let status = launcher.wait(Duration::from_secs(300));
    let stderr = launcher.stderr();
    for line in stderr.lines().filter(|l| l.contains("rsdeep: ")) {
        println!("{line}");
    }
    assert!(status.success(), "the restarted job failed:\n{stderr}");
    assert_eq!(
        stderr.matches("rsdeep: restarting the job (").count(),
        1,
        "one restart, logged once by node 0 only:\n{stderr}"
    );
    assert!(
        stderr.contains(
            "\nrsdeep: restarting the job (1/1), rendezvous generation 2: resuming from checkpoint-"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "[node 1] rsdeep: rank 1 failed first (host 127.0.0.2, pid {victim}): signal 9 (SIGKILL)"
        )),
        "node 1 reports the killed rank: {stderr}"
    );
    let node1_starts = format!("[node 1] rsdeep: job {job} started 1 worker(s) on node 1");
    assert_eq!(stderr.matches(&node1_starts).count(), 2, "{stderr}");
    let rejoined = stderr.lines().any(|l| {
        l.starts_with("[node 1 rank 1]")
            && l.contains("joined the rendezvous")
            && l.contains("generation=2")
    });
    assert!(rejoined, "node 1 did not join generation 2: {stderr}");
    assert!(stderr.contains("rsdeep: every node finished"), "{stderr}");
    let got = std::fs::read(out.join("model.safetensors")).expect("final weights");
    assert!(
        got == want,
        "the restarted run's weights differ from the uninterrupted run's"
    );
    assert!(job_survivors(&job, Duration::from_secs(5)).is_empty());
}

#[test]
fn used_up_restarts_fail_with_node_1_naming_its_killed_rank_first() {
    let _guard = serial();
    let sshd = Sshd::start();
    let fx = fixture_with_slots(&["127.0.0.1", "127.0.0.2"], 1);
    let train_json = fx.train_json(100_000);
    let mut launcher = launch(&fx, &sshd, &train_json, &["--max_restarts", "1"]);
    launcher.wait_for_stderr(Duration::from_secs(120), |s| {
        s.matches("joined the rendezvous").count() >= 2
    });
    let job = job_id(&launcher.stderr()).expect("job id line");
    let first = worker_of_rank(&job, 1, None, &launcher);
    sigkill(first);
    launcher.wait_for_stderr(Duration::from_secs(120), |s| {
        s.contains("rsdeep: restarting the job (1/1), rendezvous generation 2")
            && s.matches("joined the rendezvous").count() >= 4
    });
    let second = worker_of_rank(&job, 1, Some(first), &launcher);
    sigkill(second);
    let status = launcher.wait(Duration::from_secs(120));
    let stderr = launcher.stderr();
    for line in stderr.lines().filter(|l| l.contains("rsdeep: ")) {
        println!("{line}");
    }
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("rsdeep: giving up: all 1 restart(s) used"),
        "{stderr}"
    );
    let after_restart = stderr
        .split_once("rsdeep: restarting the job (1/1)")
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    assert!(
        after_restart.contains(&format!(
            "[node 1] rsdeep: rank 1 failed first (host 127.0.0.2, pid {second}): signal 9 (SIGKILL)"
        )),
        "the last report does not name the killed rank first: {stderr}"
    );
    assert_no_process_of_job_left(&job, &stderr);
}

#[test]
fn a_node_lost_for_good_leaves_the_job_to_finish_on_the_other_as_a_resume_there_would() {
    let _guard = serial();
    let mut sshd = Sshd::start();
    let fx = fixture(&["127.0.0.1", "127.0.0.2"]);
    let (json, out) = fx.checkpointed_train_json("elastic");
    let elastic = [
        "--max_restarts",
        "1",
        "--min_nodes",
        "1",
        "--node_return_timeout",
        "2",
    ];
    let mut launcher = launch(&fx, &sshd, &json, &elastic);
    let job = wait_for_four_ranks(&launcher);
    wait_for_step(
        &launcher,
        &out,
        RESTART_SAVE_STEPS + 1,
        Duration::from_secs(300),
    );
    // Node 1 is gone for good: its address stops answering ssh, then its launcher dies.
    sshd.stop_listening_on("127.0.0.2");
    let node1 = node1_launcher(&job, &launcher);
    sigkill(node1);
    let status = launcher.wait(Duration::from_secs(300));
    let stderr = launcher.stderr();
    for line in stderr.lines().filter(|l| l.starts_with("rsdeep: ")) {
        println!("{line}");
    }
    assert!(
        status.success(),
        "the elastic job did not finish:\n{stderr}"
    );
    assert!(
        stderr.contains("rsdeep: elastic: waiting up to 2 s for 127.0.0.2 to answer ssh again"),
        "{stderr}"
    );
    let announced = "rsdeep: elastic: restarting the job (1/1) on 1 node(s) (127.0.0.1), \
                     world size 2 (was 4), without 127.0.0.2: resuming from checkpoint-";
    let resumed_step: u64 = stderr
        .split_once(announced)
        .and_then(|(_, rest)| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no elastic restart line:\n{stderr}"));
    assert!(resumed_step >= RESTART_SAVE_STEPS, "{stderr}");
    assert!(
        stderr.contains(
            "rsdeep: elastic: world size 2: train_batch_size 8 = 2 micro batch x 2 accumulation x 2 ranks"
        ),
        "the global batch of 2 x 1 x 4 is kept: {stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "rsdeep: job {job} started 2 worker(s) on node 0 (world size 2"
        )),
        "{stderr}"
    );
    assert!(job_survivors(&job, Duration::from_secs(5)).is_empty());

    // The same checkpoint resumed by a one-node job of two ranks with the global batch
    // kept by hand (2 per device x 2 accumulation x 2 ranks = 2 x 1 x 4).
    let checkpoint = out.join(format!("checkpoint-{resumed_step}"));
    assert_losses_match_a_resume(
        &json,
        2,
        &["--gradient_accumulation_steps", "2"],
        (&checkpoint, resumed_step, RESTART_STEPS),
        (&out, &fx.path("reference")),
    );
}

#[test]
fn a_node_that_answers_again_rejoins_at_the_next_restart() {
    let _guard = serial();
    let mut sshd = Sshd::start();
    let fx = fixture(&["127.0.0.1", "127.0.0.2"]);
    let out = fx.path("rejoin");
    let settings = serde_json::json!({
        "block_size": 16, "max_steps": 80, "save_steps": 4, "seed": 5, "output_dir": out,
    });
    let json = fx.pretrain_json("rejoin.json", settings);
    let elastic = [
        "--max_restarts",
        "2",
        "--min_nodes",
        "1",
        "--node_return_timeout",
        "2",
    ];
    let mut launcher = launch(&fx, &sshd, &json, &elastic);
    let job = wait_for_four_ranks(&launcher);
    let first_rank1 = worker_of_rank(&job, 1, None, &launcher);
    wait_for_step(&launcher, &out, 5, Duration::from_secs(300));
    // Node 1 goes away: the job goes on without it.
    sshd.stop_listening_on("127.0.0.2");
    let node1 = node1_launcher(&job, &launcher);
    sigkill(node1);
    launcher.wait_for_stderr(Duration::from_secs(120), |s| {
        s.contains("rsdeep: elastic: restarting the job (1/2) on 1 node(s) (127.0.0.1)")
    });
    // It comes back; the next failure restarts the job on both nodes again.
    sshd.listen_again_on("127.0.0.2");
    let shrunk_rank1 = worker_of_rank(&job, 1, Some(first_rank1), &launcher);
    sigkill(shrunk_rank1);
    let status = launcher.wait(Duration::from_secs(300));
    let stderr = launcher.stderr();
    for line in stderr.lines().filter(|l| l.starts_with("rsdeep: ")) {
        println!("{line}");
    }
    assert!(status.success(), "the job did not finish:\n{stderr}");
    assert!(
        stderr.contains(
            "rsdeep: elastic: restarting the job (2/2) on 2 node(s) (127.0.0.1, 127.0.0.2), \
             world size 4 (was 2), 127.0.0.2 rejoining: resuming from checkpoint-"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "rsdeep: elastic: world size 4: train_batch_size 8 = 2 micro batch x 1 accumulation x 4 ranks"
        ),
        "the original global batch at the original world: {stderr}"
    );
    assert!(stderr.contains("rsdeep: every node finished"), "{stderr}");
    assert_eq!(logged_step(&out), 80);
    assert!(job_survivors(&job, Duration::from_secs(5)).is_empty());
}

#[test]
fn a_user_script_runs_on_two_hosts_as_one_torch_distributed_world() {
    let _guard = serial();
    let sshd = Sshd::start();
    let fx = fixture(&["127.0.0.1", "127.0.0.2"]);
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/user_scripts/torchrun_style.py");
    let python = std::env::var("RSDEEP_PYTHON").expect("RSDEEP_PYTHON (scripts/env.sh)");
    let mut launcher = launch(
        &fx,
        &sshd,
        &script,
        &["--python", &python, "--no_local_rank"],
    );
    let status = launcher.wait(Duration::from_secs(180));
    let stdout = launcher.stdout();
    assert_eq!(
        status.code(),
        Some(0),
        "{}\n--- sshd\n{}",
        launcher.output(),
        sshd.log()
    );
    for (prefix, rank, local) in [
        ("[rank 0]", 0, 0),
        ("[rank 1]", 1, 1),
        ("[node 1 rank 2]", 2, 0),
        ("[node 1 rank 3]", 3, 1),
    ] {
        let line = format!("{prefix} rank {rank} of 4 sum 10 (local_rank {local})");
        assert!(
            stdout.contains(&line),
            "{line} missing:\n{}",
            launcher.output()
        );
    }
    assert!(
        launcher.stderr().contains("rsdeep: every node finished"),
        "{}",
        launcher.output()
    );
}

/// Starts `rsdeep --launcher KIND -H hostfile ... --no_local_rank SCRIPT SCRIPT_ARGS`
/// over the test sshd with the reference venv's python (`RSDEEP_PYTHON`); mpirun may run
/// as root here.
fn launch_through(
    fx: &TrainFixture,
    sshd: &Sshd,
    kind: &str,
    script: &str,
    script_args: &[&str],
) -> Launcher {
    let python = std::env::var("RSDEEP_PYTHON").expect("RSDEEP_PYTHON (scripts/env.sh)");
    let hostfile = fx.path("hostfile").display().to_string();
    let (ssh_port, master_port) = (sshd.port.to_string(), free_port().to_string());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/user_scripts")
        .join(script);
    let script = script.display().to_string();
    let mut args = vec![
        "--launcher",
        kind,
        "-H",
        &hostfile,
        "--device",
        "cpu",
        "--ssh_port",
        &ssh_port,
        "--master_port",
        &master_port,
        "--grace_period",
        "5",
        "--python",
        &python,
        "--no_local_rank",
        &script,
    ];
    args.extend_from_slice(script_args);
    let envs = [
        ("RSDEEP_SSH_ARGS", sshd.client_args()),
        ("OMP_NUM_THREADS", "1".to_string()),
        ("OMPI_ALLOW_RUN_AS_ROOT", "1".to_string()),
        ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1".to_string()),
        ("PATH", path_with_mpirun_of(kind, &fx.path("bin"))),
    ];
    Launcher::start(&args, &envs)
}

/// The runner program of `--launcher kind`, installed when missing.
fn ensure_runner(kind: &str) {
    match kind {
        "pdsh" => sshd::ensure_program("pdsh", &["pdsh"]),
        "mpich" => sshd::ensure_program("mpirun.mpich", &["mpich"]),
        // ompi_info: Open MPI's own, where `mpirun` could be MPICH's.
        _ => sshd::ensure_program("ompi_info", &["openmpi-bin"]),
    }
}

/// `PATH` with a folder first whose `mpirun` runs the one of `kind` (Debian installs Open
/// MPI and MPICH side by side, `mpirun` picking one of them). A script rather than a link:
/// MPICH finds its proxy program next to the path it was started as.
fn path_with_mpirun_of(kind: &str, dir: &Path) -> String {
    let real = match kind {
        "mpich" => "/usr/bin/mpirun.mpich",
        _ => "/usr/bin/mpirun.openmpi",
    };
    std::fs::create_dir_all(dir).expect("bin folder");
    let wrapper = dir.join("mpirun");
    let _ = std::fs::remove_file(&wrapper);
    std::fs::write(&wrapper, format!("#!/bin/sh\nexec {real} \"$@\"\n")).expect("mpirun");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod mpirun");
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// A torchrun-style script on two hosts started by pdsh or mpirun: one world of four
/// ranks, each node's ranks numbered after the node rank the runner gave its launcher.
fn a_user_script_runs_on_two_hosts_through(kind: &str) {
    let _guard = serial();
    ensure_runner(kind);
    let sshd = Sshd::start();
    let fx = fixture(&["127.0.0.1", "127.0.0.2"]);
    let mut launcher = launch_through(&fx, &sshd, kind, "torchrun_style.py", &[]);
    let status = launcher.wait(Duration::from_secs(180));
    let output = launcher.output();
    assert_eq!(status.code(), Some(0), "{output}\n--- sshd\n{}", sshd.log());
    let stdout = launcher.stdout();
    for (rank, local) in [(0, 0), (1, 1), (2, 0), (3, 1)] {
        let line = format!("[rank {rank}] rank {rank} of 4 sum 10 (local_rank {local})");
        assert!(stdout.contains(&line), "{line} missing:\n{output}");
    }
    if kind == "pdsh" {
        assert!(
            stdout.contains("127.0.0.2: [rank 3] rank 3 of 4"),
            "{output}"
        );
    }
    assert!(
        launcher.stderr().contains("rsdeep: every node finished"),
        "{output}"
    );
}

/// Rank 3 (node 1) raises: its node reports the exception, every node stops, the job
/// exits 1 and no rank is left running.
fn a_failing_rank_stops_every_node_through(kind: &str) {
    let _guard = serial();
    ensure_runner(kind);
    let sshd = Sshd::start();
    let fx = fixture(&["127.0.0.1", "127.0.0.2"]);
    let mut launcher = launch_through(&fx, &sshd, kind, "raises.py", &["--fail_rank", "3"]);
    let status = launcher.wait(Duration::from_secs(120));
    let (stdout, stderr, output) = (launcher.stdout(), launcher.stderr(), launcher.output());
    assert!(
        stderr.contains("rank 3 raised ValueError: bad batch shape at step 3"),
        "the failing rank's node names the exception: {output}"
    );
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        stderr.contains("rsdeep: node 1 (127.0.0.2) failed with exit code 1"),
        "{output}"
    );
    let pids: Vec<i32> = stdout
        .lines()
        .filter_map(|l| l.split(" started pid ").nth(1)?.trim().parse().ok())
        .collect();
    assert_eq!(pids.len(), 4, "{output}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while pids.iter().any(|&pid| alive(pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let survivors: Vec<_> = pids.iter().filter(|&&pid| alive(pid)).collect();
    kill_all(&pids);
    assert!(
        survivors.is_empty(),
        "ranks survived: {survivors:?}\n{output}"
    );
}

#[test]
fn pdsh_starts_a_user_script_on_two_hosts_as_one_world() {
    a_user_script_runs_on_two_hosts_through("pdsh");
}

#[test]
fn pdsh_a_rank_that_raises_stops_every_node() {
    a_failing_rank_stops_every_node_through("pdsh");
}

#[test]
fn mpich_starts_a_user_script_on_two_hosts_as_one_world() {
    a_user_script_runs_on_two_hosts_through("mpich");
}

#[test]
fn mpich_a_rank_that_raises_stops_every_node() {
    a_failing_rank_stops_every_node_through("mpich");
}

#[test]
fn mpich_killing_the_launcher_leaves_no_rank_on_any_node() {
    killing_the_launcher_leaves_no_rank_through("mpich");
}

#[test]
fn openmpi_starts_a_user_script_on_two_hosts_as_one_world() {
    a_user_script_runs_on_two_hosts_through("openmpi");
}

#[test]
fn openmpi_a_rank_that_raises_stops_every_node() {
    a_failing_rank_stops_every_node_through("openmpi");
}

/// SIGKILL of the `rsdeep` that started pdsh or mpirun: no rank of any node survives.
fn killing_the_launcher_leaves_no_rank_through(kind: &str) {
    let _guard = serial();
    ensure_runner(kind);
    let sshd = Sshd::start();
    let fx = fixture(&["127.0.0.1", "127.0.0.2"]);
    let script_args = ["--fail_rank", "99", "--sleep", "120"];
    let mut launcher = launch_through(&fx, &sshd, kind, "raises.py", &script_args);
    let started_pids = |launcher: &Launcher| -> Vec<i32> {
        let stdout = launcher.stdout();
        stdout
            .lines()
            .filter_map(|l| l.split(" started pid ").nth(1)?.trim().parse().ok())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while started_pids(&launcher).len() < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let pids = started_pids(&launcher);
    assert_eq!(pids.len(), 4, "{}", launcher.output());
    sigkill(launcher.pid());
    let _ = launcher.wait(Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(20);
    while pids.iter().any(|&pid| alive(pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let survivors: Vec<_> = pids.iter().copied().filter(|&pid| alive(pid)).collect();
    kill_all(&pids);
    assert!(
        survivors.is_empty(),
        "ranks survived: {survivors:?}\n{}",
        launcher.output()
    );
}

#[test]
fn pdsh_killing_the_launcher_leaves_no_rank_on_any_node() {
    killing_the_launcher_leaves_no_rank_through("pdsh");
}

#[test]
fn openmpi_killing_the_launcher_leaves_no_rank_on_any_node() {
    killing_the_launcher_leaves_no_rank_through("openmpi");
}
