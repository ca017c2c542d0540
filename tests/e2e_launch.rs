//! End-to-end tests of the launcher, rendezvous and supervision through the real
//! `rsdeep` and `rsdeep-worker` binaries on loopback. Each test uses `--master_port 0`
//! and its own temp folder; tests run one at a time (each starts several workers that
//! load libtorch) and kill what they started. The last test runs the prepared GPU
//! check's CPU dry run (`scripts/gpu-check.sh --cpu-dry-run`), so CI keeps it working.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rsdeep_e2e::{Launcher, binary, kill_all, recorded_pids, survivors, worker_script};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

const CPU4: [&str; 7] = [
    "--device",
    "cpu",
    "--num_procs",
    "4",
    "--selftest",
    "--master_port",
    "0",
];

/// Environment that makes the launcher run `script` as the worker.
fn wrapped(script: &std::path::Path, pid_dir: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        ("RSDEEP_WORKER_BIN", script.display().to_string()),
        ("REAL_WORKER", binary("rsdeep-worker").display().to_string()),
        ("PID_DIR", pid_dir.display().to_string()),
    ]
}

#[test]
fn four_cpu_workers_join_agree_exchange_and_exit_zero() {
    let _guard = serial();
    let mut launcher = Launcher::start(&CPU4, &[]);
    let status = launcher.wait(Duration::from_secs(120));
    assert_eq!(status.code(), Some(0), "{}", launcher.output());
    let stdout = launcher.stdout();
    let mut ids = Vec::new();
    let mut peer_lists = Vec::new();
    for rank in 0..4 {
        let prefix = format!("[rank {rank}] rank {rank}/4 local {rank} node 0 peers=[");
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no summary for rank {rank}\n{}", launcher.output()));
        let (peers, id) = line[prefix.len()..]
            .split_once("] nccl_id=")
            .expect("summary format");
        assert_eq!(id.len(), 16, "8 hex bytes: {line}");
        ids.push(id.to_string());
        peer_lists.push(peers.to_string());
    }
    assert!(
        ids.iter().all(|id| id == &ids[0]),
        "all ranks read rank 0's id: {ids:?}"
    );
    assert!(
        peer_lists.iter().all(|p| p == &peer_lists[0]),
        "same peers everywhere"
    );
    let peers: Vec<&str> = peer_lists[0].split(',').collect();
    assert_eq!(peers.len(), 4);
    assert!(
        peers.iter().all(|p| p.starts_with("127.0.0.1:")),
        "{peers:?}"
    );
    let stderr = launcher.stderr();
    assert!(
        stderr.contains("rendezvous complete: 4 rank(s) joined generation 1"),
        "{stderr}"
    );
    assert!(stderr.contains("all 4 worker(s) exited 0"), "{stderr}");
}

#[test]
fn killed_worker_is_reported_with_rank_and_signal_and_the_others_are_stopped() {
    let _guard = serial();
    let pid_dir = tempfile::tempdir().unwrap();
    let script = worker_script(
        pid_dir.path(),
        "if [ \"$LOCAL_RANK\" = 2 ]; then echo \"rank two going down\"; sleep 2; kill -9 $$; fi\nexec \"$REAL_WORKER\"",
    );
    let args = [&CPU4[..], &["--grace_period", "5"]].concat();
    let mut launcher = Launcher::start(&args, &wrapped(&script, pid_dir.path()));
    let pids = recorded_pids(pid_dir.path(), 4, Duration::from_secs(30));
    let status = launcher.wait(Duration::from_secs(60));
    let stderr = launcher.stderr();
    assert_eq!(status.code(), Some(128 + 9), "{}", launcher.output());
    let headline = format!(
        "rank 2 failed first (host localhost, pid {}): signal 9 (SIGKILL)",
        pids[2]
    );
    assert!(stderr.contains(&headline), "{stderr}");
    assert!(stderr.contains("OOM killer"), "{stderr}");
    assert!(
        stderr.contains("    rank two going down"),
        "last lines of rank 2: {stderr}"
    );
    assert!(
        !stderr.contains("ignored SIGTERM"),
        "all stopped within the grace period: {stderr}"
    );
    let left = survivors(&pids, Duration::from_secs(2));
    kill_all(&left);
    assert!(left.is_empty(), "workers survived: {left:?}");
}

#[test]
fn wrong_token_is_refused() {
    let _guard = serial();
    let pid_dir = tempfile::tempdir().unwrap();
    let script = worker_script(
        pid_dir.path(),
        "if [ \"$LOCAL_RANK\" = 1 ]; then export RSDEEP_TOKEN=not-the-job-token; fi\nexec \"$REAL_WORKER\"",
    );
    let args = [&CPU4[..], &["--grace_period", "5"]].concat();
    let mut launcher = Launcher::start(&args, &wrapped(&script, pid_dir.path()));
    let status = launcher.wait(Duration::from_secs(60));
    let stderr = launcher.stderr();
    assert_eq!(status.code(), Some(1), "{}", launcher.output());
    assert!(stderr.contains("rank 1 failed first"), "{stderr}");
    assert!(
        stderr.contains("join refused (Unauthenticated)"),
        "{stderr}"
    );
    assert!(stderr.contains("wrong rendezvous token"), "{stderr}");
}

#[test]
fn missing_worker_produces_a_timeout_naming_it() {
    let _guard = serial();
    let pid_dir = tempfile::tempdir().unwrap();
    let script = worker_script(
        pid_dir.path(),
        "if [ \"$LOCAL_RANK\" = 3 ]; then exec sleep 120; fi\nexec \"$REAL_WORKER\"",
    );
    let args = [&CPU4[..], &["--join_timeout", "8", "--grace_period", "3"]].concat();
    let mut launcher = Launcher::start(&args, &wrapped(&script, pid_dir.path()));
    let pids = recorded_pids(pid_dir.path(), 4, Duration::from_secs(30));
    let status = launcher.wait(Duration::from_secs(60));
    let stderr = launcher.stderr();
    assert_eq!(status.code(), Some(1), "{}", launcher.output());
    assert!(stderr.contains("3/4 ranks joined"), "{stderr}");
    assert!(
        stderr.contains("never arrived: rank 3 (host localhost, node 0, local rank 3)"),
        "{stderr}"
    );
    let left = survivors(&pids, Duration::from_secs(2));
    kill_all(&left);
    assert!(left.is_empty(), "workers survived: {left:?}");
}

/// Starts 4 workers that block in Join (rank 1 never joins), then stops the launcher.
fn launcher_with_blocked_workers() -> (Launcher, tempfile::TempDir, Vec<i32>) {
    let pid_dir = tempfile::tempdir().unwrap();
    let script = worker_script(
        pid_dir.path(),
        "if [ \"$LOCAL_RANK\" = 1 ]; then exec sleep 300; fi\nexec \"$REAL_WORKER\"",
    );
    let args = [&CPU4[..], &["--grace_period", "5"]].concat();
    let launcher = Launcher::start(&args, &wrapped(&script, pid_dir.path()));
    let pids = recorded_pids(pid_dir.path(), 4, Duration::from_secs(30));
    launcher.wait_for_stderr(Duration::from_secs(30), |s| {
        s.contains("started 4 worker(s)")
    });
    (launcher, pid_dir, pids)
}

#[test]
fn no_worker_survives_a_sigterm_to_the_launcher() {
    let _guard = serial();
    let (mut launcher, _dir, pids) = launcher_with_blocked_workers();
    // SAFETY: kill(2) on the launcher this test started.
    unsafe { libc::kill(launcher.pid(), libc::SIGTERM) };
    let started = Instant::now();
    let status = launcher.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(128 + 15), "{}", launcher.output());
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "stopped within the grace period"
    );
    assert!(
        launcher.stderr().contains("received signal 15"),
        "{}",
        launcher.output()
    );
    let left = survivors(&pids, Duration::from_secs(2));
    kill_all(&left);
    assert!(left.is_empty(), "workers survived the launcher: {left:?}");
}

#[test]
fn no_worker_survives_a_sigkilled_launcher() {
    let _guard = serial();
    let (mut launcher, _dir, pids) = launcher_with_blocked_workers();
    // SAFETY: kill(2) on the launcher this test started.
    unsafe { libc::kill(launcher.pid(), libc::SIGKILL) };
    launcher.wait(Duration::from_secs(10));
    let left = survivors(&pids, Duration::from_secs(5));
    kill_all(&left);
    assert!(
        left.is_empty(),
        "parent-death signal did not stop: {left:?}"
    );
}

#[test]
fn dry_run_prints_every_rank_without_starting_anything() {
    let _guard = serial();
    let args = [
        "--device",
        "cpu",
        "--num_procs",
        "2",
        "--selftest",
        "--dry_run",
    ];
    let mut launcher = Launcher::start(&args, &[]);
    let status = launcher.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", launcher.output());
    let stdout = launcher.stdout();
    assert!(
        stdout.contains("rank 0 host localhost node 0 local_rank 0 device cpu"),
        "{stdout}"
    );
    assert!(
        stdout.contains("rank 1 host localhost node 0 local_rank 1 device cpu"),
        "{stdout}"
    );
    assert!(stdout.contains("    WORLD_SIZE=2"), "{stdout}");
    assert!(stdout.contains("RSDEEP_TOKEN=<hidden>"), "{stdout}");
    assert!(
        !launcher.stderr().contains("started"),
        "dry run starts nothing"
    );
}

#[test]
fn no_gpu_and_no_cpu_flag_explains_how_to_run_on_cpu() {
    let _guard = serial();
    let mut launcher = Launcher::start(&["--selftest"], &[]);
    let status = launcher.wait(Duration::from_secs(20));
    if status.code() == Some(2) {
        assert!(
            launcher.stderr().contains("--device cpu --num_procs N"),
            "{}",
            launcher.output()
        );
    } else {
        // A machine with a GPU runs the selftest on it instead.
        assert_eq!(status.code(), Some(0), "{}", launcher.output());
    }
}

#[test]
fn a_failed_attempt_is_restarted_with_a_new_generation() {
    let _guard = serial();
    let pid_dir = tempfile::tempdir().unwrap();
    let script = worker_script(
        pid_dir.path(),
        "if [ \"$RSDEEP_RESTART_COUNT\" = 0 ] && [ \"$LOCAL_RANK\" = 1 ]; then echo first try fails; exit 3; fi\nexec \"$REAL_WORKER\"",
    );
    let args = [&CPU4[..], &["--max_restarts", "1", "--grace_period", "5"]].concat();
    let mut launcher = Launcher::start(&args, &wrapped(&script, pid_dir.path()));
    let status = launcher.wait(Duration::from_secs(120));
    let stderr = launcher.stderr();
    assert_eq!(status.code(), Some(0), "{}", launcher.output());
    assert!(stderr.contains("rank 1 failed first"), "{stderr}");
    assert!(stderr.contains("exit code 3"), "{stderr}");
    assert!(stderr.contains("restarting the job (1/1)"), "{stderr}");
    assert!(stderr.contains("joined generation 2"), "{stderr}");
    assert_eq!(
        launcher.stdout().matches("nccl_id=").count(),
        4,
        "{}",
        launcher.output()
    );
}

/// The prepared GPU check stays ready: its CPU dry run passes with this build's binaries
/// (with no fetched data it trains a stand-in tokenizer), every section included.
#[test]
fn the_gpu_check_cpu_dry_run_passes() {
    let _one = serial();
    let scratch = tempfile::tempdir().expect("temp dir");
    let empty_data = scratch.path().join("data");
    std::fs::create_dir_all(&empty_data).expect("data dir");
    let bin_dir = binary("rsdeep").parent().expect("bin dir").to_path_buf();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gpu-check.sh");
    let run = std::process::Command::new("bash")
        .arg(&script)
        .arg("--cpu-dry-run")
        .env("RSDEEP_DATA_DIR", &empty_data)
        .env("RSDEEP_BIN_DIR", &bin_dir)
        .env("TMPDIR", scratch.path())
        .output()
        .expect("run gpu-check.sh");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success() && stdout.contains("GPU CHECK PASSED (dry=1)"),
        "--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert_eq!(
        stdout.matches(" OK\n").count(),
        8,
        "4 stages x fp32/bf16:\n{stdout}"
    );
    for section in [
        "ratio rsdeep/hf tokens/s (gc=true)",
        "saved ",
        "resumed from",
        "flash: yes",
    ] {
        assert!(stdout.contains(section), "{section:?} missing:\n{stdout}");
    }
}
