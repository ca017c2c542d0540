//! End-to-end fault handling through the real binaries on loopback: a
//! SIGKILLed worker of a CPU training with periodic checkpoints and `--max_restarts 1` is
//! reported first (SIGKILL, OOM hint; the survivor's collective error as a consequence),
//! the job restarts from the newest complete checkpoint and ends with weights
//! bit-identical to an uninterrupted run; a SIGSTOPped worker is reported hung (rank,
//! pid, last step) within the heartbeat timeout; used-up restarts fail with the report.
//! A rank stuck before a collective (the worker's test-only hook
//! `RSDEEP_FAULT_INJECT=stall_before_collective:rank=1:step=S`, its heartbeats go on) is
//! named as the cause with its phase, the other rank as waiting in `op #seq`
//! (consequence), the job stops within the timeout; with `--max_restarts 1` it resumes
//! from a checkpoint and finishes (the hook fires in the first generation only).
//! The random rank and step of the kill come from a seeded RNG whose seed is printed
//! (`RSDEEP_FAULT_SEED=<seed>` replays it). Run ownership: a restart in a folder holding
//! an earlier run's newer checkpoints resumes its own; a fresh run refuses such a folder
//! unless `--overwrite_output_dir`; a second job on a locked folder is refused naming the
//! first.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rsdeep_contract::checkpoint_dir::checkpoint_run_id;
use rsdeep_e2e::{
    Launcher, TrainFixture, binary, kill_all, logged_step, recorded_pids, sentence_corpus,
    survivors, wait_for_step, worker_script,
};

const RUN_LIMIT: Duration = Duration::from_secs(300);
const MAX_STEPS: u64 = 16;
const SAVE_STEPS: u64 = 4;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// The fixture of these tests: a pretrain train.json of `MAX_STEPS` steps saving every
/// `SAVE_STEPS` (ZeRO-2, 2 x 2 accumulation, AdamW + WarmupLR) over a 200-line corpus.
fn fixture() -> TrainFixture {
    let fx = TrainFixture::new(&corpus(), 64, 384, 300);
    fx.pretrain_json(
        "train.json",
        serde_json::json!({
            "block_size": 32,
            "gradient_accumulation_steps": 2,
            "warmup_steps": 2,
            "max_steps": MAX_STEPS,
            "save_steps": SAVE_STEPS,
            "seed": 11,
            "output_dir": fx.path("out"),
            "deepspeed": {
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
                "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
                "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
                "zero_optimization": {"reduce_bucket_size": 5000, "allgather_bucket_size": 5000}
            }
        }),
    );
    fx
}

/// Starting the fixture's training with recorded worker pids (and a fault hook).
trait FaultRuns {
    fn launch(&self, out: &Path, pid_dir: &Path, flags: &[&str], overrides: &[&str]) -> Launcher;
    fn launch_with_fault(
        &self,
        out: &Path,
        pid_dir: &Path,
        fault: Option<&str>,
        flags: &[&str],
        overrides: &[&str],
    ) -> Launcher;
}

impl FaultRuns for TrainFixture {
    /// Starts a 2-rank CPU training into `out` (launcher `flags`, train.json `overrides`)
    /// whose workers record their pids in `pid_dir` (the wrapper script `exec`s the real
    /// worker, so the pid is the worker's).
    fn launch(&self, out: &Path, pid_dir: &Path, flags: &[&str], overrides: &[&str]) -> Launcher {
        self.launch_with_fault(out, pid_dir, None, flags, overrides)
    }

    /// `launch` with the worker's test-only fault hook `RSDEEP_FAULT_INJECT` set to
    /// `fault` (exported by the wrapper script, so only the workers see it).
    fn launch_with_fault(
        &self,
        out: &Path,
        pid_dir: &Path,
        fault: Option<&str>,
        flags: &[&str],
        overrides: &[&str],
    ) -> Launcher {
        std::fs::create_dir_all(pid_dir).expect("pid dir");
        let body = match fault {
            Some(fault) => format!("export RSDEEP_FAULT_INJECT='{fault}'\nexec \"$REAL_WORKER\""),
            None => "exec \"$REAL_WORKER\"".to_string(),
        };
        let script = worker_script(pid_dir, &body);
        let json = self.path("train.json").display().to_string();
        let out = out.display().to_string();
        let mut args = vec![
            "--device",
            "cpu",
            "--num_procs",
            "2",
            "--master_port",
            "0",
            "--grace_period",
            "3",
        ];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[&json, "--output_dir", &out]);
        args.extend_from_slice(overrides);
        Launcher::start(&args, &wrapped(&script, pid_dir))
    }
}

/// Environment that makes the launcher run `script` as the worker.
fn wrapped(script: &Path, pid_dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("RSDEEP_WORKER_BIN", script.display().to_string()),
        ("REAL_WORKER", binary("rsdeep-worker").display().to_string()),
        ("PID_DIR", pid_dir.display().to_string()),
        ("OMP_NUM_THREADS", "1".to_string()),
    ]
}

/// Kills (SIGCONT first, then SIGKILL) every recorded worker when dropped.
struct Cleanup(Vec<i32>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: plain kill(2) on pids this test's launcher started.
            unsafe {
                libc::kill(pid, libc::SIGCONT);
            }
        }
        kill_all(&self.0);
    }
}

/// Waits for a job with a hung rank to end (its 3 s heartbeat timeout), prints the
/// launcher's own lines and checks it failed; returns its stderr and how long it took
/// from the call (made right after `what`).
fn wait_for_hung_job(launcher: &mut Launcher, what: &str) -> (String, Duration) {
    let since = Instant::now();
    let status = launcher.wait(Duration::from_secs(60));
    let took = since.elapsed();
    let stderr = launcher.stderr();
    println!("launcher exited {took:?} after {what}; its report:");
    for line in stderr.lines().filter(|l| l.starts_with("rsdeep: ")) {
        println!("{line}");
    }
    assert!(!status.success(), "a hung job must fail:\n{stderr}");
    (stderr, took)
}

/// What every hang test expects of the ending: rank 0 not blamed, the hang handled
/// within the 3 s timeout plus a little and the stop's grace period (a rank sleeping in
/// the fault hook ignores SIGTERM and is SIGKILLed), and no worker left.
fn assert_hang_handled(stderr: &str, pids: &[i32], took: Duration) {
    assert!(
        !stderr.contains("rank 0 is hung"),
        "rank 0 blamed:\n{stderr}"
    );
    assert!(
        took < Duration::from_secs(3 + 4 + 3),
        "hang handled after {took:?}:\n{stderr}"
    );
    assert!(
        survivors(pids, Duration::from_secs(5)).is_empty(),
        "a worker survived the hung job"
    );
}

/// Waits for the launcher, prints its own lines, and checks the job succeeded after
/// exactly one restart; returns its stderr.
fn wait_for_one_restart(launcher: &mut Launcher) -> String {
    let status = launcher.wait(RUN_LIMIT);
    let stderr = launcher.stderr();
    for line in stderr.lines().filter(|l| l.starts_with("rsdeep: ")) {
        println!("{line}");
    }
    assert!(
        status.success(),
        "the restarted job failed:\n{}",
        launcher.output()
    );
    assert_eq!(
        stderr.matches("rsdeep: restarting the job (").count(),
        1,
        "expected exactly one restart:\n{stderr}"
    );
    stderr
}

/// splitmix64: a small seeded generator (the seed is printed for replay).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fault_seed() -> u64 {
    std::env::var("RSDEEP_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

fn signal(pid: i32, signal: libc::c_int) {
    // SAFETY: plain kill(2) on a pid this test's launcher started.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

#[test]
fn a_killed_worker_restarts_from_the_newest_checkpoint_and_ends_bit_identical() {
    let _one = serial();
    let fx = fixture();
    let reference = fx.path("reference");
    let mut straight = fx.launch(&reference, &fx.path("pids-reference"), &[], &[]);
    let status = straight.wait(RUN_LIMIT);
    assert!(
        status.success(),
        "reference run failed:\n{}",
        straight.output()
    );
    let want = std::fs::read(reference.join("model.safetensors")).expect("reference weights");

    let seed = fault_seed();
    let mut rng = seed;
    let victim = (splitmix(&mut rng) % 2) as usize;
    // After the first checkpoint, early enough that the run is still going.
    let kill_step = SAVE_STEPS + 1 + splitmix(&mut rng) % (MAX_STEPS / 2 - SAVE_STEPS);
    println!("fault seed {seed} (RSDEEP_FAULT_SEED): SIGKILL rank {victim} at step {kill_step}");

    let out = fx.path("faulty");
    let pid_dir = fx.path("pids-faulty");
    let mut launcher = fx.launch(&out, &pid_dir, &["--max_restarts", "1"], &[]);
    let pids = recorded_pids(&pid_dir, 2, RUN_LIMIT);
    let _cleanup = Cleanup(pids.clone());
    let seen = wait_for_step(&launcher, &out, kill_step, RUN_LIMIT);
    signal(pids[victim], libc::SIGKILL);
    println!(
        "killed rank {victim} (pid {}) with step {seen} logged",
        pids[victim]
    );
    let stderr = wait_for_one_restart(&mut launcher);
    assert!(
        stderr.contains(
            "rsdeep: restarting the job (1/1), rendezvous generation 2: resuming from checkpoint-"
        ),
        "{stderr}"
    );
    let first = format!(
        "rsdeep: rank {victim} failed first (host localhost, pid {}): signal 9 (SIGKILL)",
        pids[victim]
    );
    assert!(
        stderr.contains(&first),
        "the report does not name the killed rank first:\n{stderr}"
    );
    assert!(stderr.contains("OOM killer"), "{stderr}");
    let survivor = 1 - victim;
    assert!(
        stderr.contains(&format!(
            "rsdeep: then: rank {survivor} (host localhost, pid {})",
            pids[survivor]
        )) && stderr.contains(&format!("(consequence of rank {victim})")),
        "the survivor's collective failure is not listed as a consequence:\n{stderr}"
    );
    assert!(
        stderr.contains("[rank 0] restart 1: resuming from"),
        "{stderr}"
    );
    let got = std::fs::read(out.join("model.safetensors")).expect("restarted run weights");
    assert!(
        got == want,
        "seed {seed}: final weights after the restart differ from the uninterrupted run"
    );
    assert_eq!(
        metrics_steps(&out),
        (1..=MAX_STEPS).collect::<Vec<_>>(),
        "metrics.jsonl must hold every step once, not the replayed ones twice"
    );
    assert!(
        survivors(
            &recorded_pids(&pid_dir, 2, RUN_LIMIT),
            Duration::from_secs(5)
        )
        .is_empty()
    );
}

#[test]
fn a_stopped_worker_is_reported_hung_with_rank_pid_and_last_step() {
    let _one = serial();
    let fx = fixture();
    let out = fx.path("hung");
    let pid_dir = fx.path("pids-hung");
    let mut launcher = fx.launch(
        &out,
        &pid_dir,
        &["--heartbeat_timeout", "3", "--heartbeat_interval", "0.5"],
        &["--max_steps", "100000", "--save_steps", "100000"],
    );
    let pids = recorded_pids(&pid_dir, 2, RUN_LIMIT);
    let _cleanup = Cleanup(pids.clone());
    wait_for_step(&launcher, &out, 2, RUN_LIMIT);
    signal(pids[1], libc::SIGSTOP);
    let (stderr, took) = wait_for_hung_job(&mut launcher, "the SIGSTOP");
    let hung = format!(
        "rsdeep: rank 1 is hung (host localhost, pid {}): no heartbeat for",
        pids[1]
    );
    assert!(
        stderr.contains(&hung),
        "rank 1 not reported hung:\n{stderr}"
    );
    assert!(stderr.contains("; last step "), "{stderr}");
    assert_hang_handled(&stderr, &pids, took);
}

/// The launcher flags of the stuck-collective tests: a 3 s hang timeout.
const STUCK_FLAGS: [&str; 4] = ["--heartbeat_timeout", "3", "--heartbeat_interval", "0.5"];
const STALL_RANK_1_AT_STEP_3: &str = "stall_before_collective:rank=1:step=3";

#[test]
fn a_rank_stuck_before_a_collective_is_the_cause_and_the_waiting_rank_the_consequence() {
    let _one = serial();
    let fx = fixture();
    let endless = ["--max_steps", "100000", "--save_steps", "100000"];

    // A malformed hook is refused before anything trains.
    let bad_pids = fx.path("pids-bad");
    let mut bad = fx.launch_with_fault(
        &fx.path("bad"),
        &bad_pids,
        Some("stall_before_collective:rank=one"),
        &STUCK_FLAGS,
        &endless,
    );
    let _bad_cleanup = Cleanup(recorded_pids(&bad_pids, 2, RUN_LIMIT));
    assert!(!bad.wait(RUN_LIMIT).success(), "{}", bad.output());
    assert!(
        bad.stderr()
            .contains("RSDEEP_FAULT_INJECT=\"stall_before_collective:rank=one\" is malformed"),
        "{}",
        bad.output()
    );

    let out = fx.path("stuck");
    let pid_dir = fx.path("pids-stuck");
    let mut launcher = fx.launch_with_fault(
        &out,
        &pid_dir,
        Some(STALL_RANK_1_AT_STEP_3),
        &STUCK_FLAGS,
        &endless,
    );
    let pids = recorded_pids(&pid_dir, 2, RUN_LIMIT);
    let _cleanup = Cleanup(pids.clone());
    wait_for_step(&launcher, &out, 2, RUN_LIMIT);
    let (stderr, took) = wait_for_hung_job(&mut launcher, "step 2 was logged");
    assert!(
        stderr.contains("stalling before a collective of step 3 (test fault)"),
        "the hook did not fire:\n{stderr}"
    );
    let cause = format!(
        "rsdeep: rank 1 is hung (host localhost, pid {}): heartbeats arrive but the step has not advanced",
        pids[1]
    );
    assert!(stderr.contains(&cause), "rank 1 not the cause:\n{stderr}");
    assert!(
        stderr.contains("; in step 3 (not in a collective) for "),
        "no phase for the cause:\n{stderr}"
    );
    let waiting = format!(
        "rsdeep: then: rank 0 (host localhost, pid {}): waiting in ",
        pids[0]
    );
    let waiting_line = stderr
        .lines()
        .find(|l| l.starts_with(&waiting))
        .unwrap_or_else(|| panic!("rank 0 not reported waiting in a collective:\n{stderr}"));
    assert!(
        waiting_line.contains(" (step 3) since ")
            && waiting_line.contains("(consequence: waiting for rank(s) [1])"),
        "{waiting_line}"
    );
    assert_hang_handled(&stderr, &pids, took);
}

#[test]
fn a_rank_stuck_before_a_collective_is_restarted_from_a_checkpoint_and_the_job_finishes() {
    let _one = serial();
    let fx = fixture();
    let out = fx.path("stuck-restart");
    let pid_dir = fx.path("pids-stuck-restart");
    let fault = format!("stall_before_collective:rank=1:step={}", SAVE_STEPS + 2);
    let flags = [&STUCK_FLAGS[..], &["--max_restarts", "1"]].concat();
    let mut launcher = fx.launch_with_fault(&out, &pid_dir, Some(&fault), &flags, &[]);
    let first_pids = recorded_pids(&pid_dir, 2, RUN_LIMIT);
    let _cleanup = Cleanup(first_pids.clone());
    let stderr = wait_for_one_restart(&mut launcher);
    // Streamed worker lines start with "[rank 1]" (the report quotes them indented).
    let stalls = stderr
        .lines()
        .filter(|l| l.starts_with("[rank 1]") && l.contains("stalling before a collective"));
    assert_eq!(
        stalls.count(),
        1,
        "the hook must fire in the first generation only:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "rsdeep: rank 1 is hung (host localhost, pid {})",
            first_pids[1]
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("resuming from checkpoint-"),
        "the restart did not resume from a checkpoint:\n{stderr}"
    );
    assert_eq!(logged_step(&out), MAX_STEPS, "{stderr}");
    assert!(out.join("model.safetensors").is_file(), "no final model");
    assert!(survivors(&first_pids, Duration::from_secs(5)).is_empty());
}

#[test]
fn used_up_restarts_fail_with_the_full_report() {
    let _one = serial();
    let pid_dir = tempfile::tempdir().expect("pid dir");
    let script = worker_script(
        pid_dir.path(),
        "if [ \"$LOCAL_RANK\" = 1 ]; then echo rank one dies; kill -9 $$; fi\nexec \"$REAL_WORKER\"",
    );
    let args = [
        "--device",
        "cpu",
        "--num_procs",
        "2",
        "--selftest",
        "--master_port",
        "0",
        "--max_restarts",
        "1",
        "--grace_period",
        "3",
    ];
    let mut launcher = Launcher::start(&args, &wrapped(&script, pid_dir.path()));
    let status = launcher.wait(Duration::from_secs(120));
    let stderr = launcher.stderr();
    assert_eq!(status.code(), Some(137), "{stderr}");
    assert_eq!(
        stderr.matches("rsdeep: restarting the job (1/1)").count(),
        1,
        "{stderr}"
    );
    assert_eq!(stderr.matches("rank 1 failed first").count(), 2, "{stderr}");
    assert!(
        stderr.contains("signal 9 (SIGKILL)") && stderr.contains("    rank one dies"),
        "{stderr}"
    );
    assert!(
        stderr.contains("rsdeep: giving up: all 1 restart(s) used"),
        "{stderr}"
    );
}

/// The `step` of every row of `out/metrics.jsonl`, in file order.
fn metrics_steps(out: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .collect()
}

/// The job id the launcher printed ("rsdeep: job <id> started ...").
fn job_id_of(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("rsdeep: job ")?.split_whitespace().next())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_restart_resumes_only_its_own_runs_checkpoints_never_an_earlier_runs() {
    let _one = serial();
    let fx = fixture();
    let out = fx.path("out");
    // An earlier run leaves checkpoint-4/8/12/16 and a final model in `out`.
    let mut earlier = fx.launch(&out, &fx.path("pids-earlier"), &[], &[]);
    assert!(earlier.wait(RUN_LIMIT).success(), "{}", earlier.output());
    // The new run continues the earlier run's checkpoint-4 with another learning rate:
    // uninterrupted (elsewhere), it gives the reference weights.
    let resume = out.join("checkpoint-4").display().to_string();
    let new_run = [
        "--resume_from_checkpoint",
        resume.as_str(),
        "--learning_rate",
        "1e-3",
    ];
    let reference = fx.path("reference");
    let mut straight = fx.launch(&reference, &fx.path("pids-reference"), &[], &new_run);
    assert!(straight.wait(RUN_LIMIT).success(), "{}", straight.output());
    let want = std::fs::read(reference.join("model.safetensors")).expect("reference weights");
    assert!(
        straight
            .stderr()
            .contains("with settings changed since its checkpoint (learning_rate: 0.003 -> 0.001)"),
        "the changed setting is not named:\n{}",
        straight.stderr()
    );

    // The same new run in the earlier run's folder, one rank killed after its own
    // checkpoint-8: the restart must not pick the earlier run's checkpoint-16.
    let pid_dir = fx.path("pids-new");
    let mut launcher = fx.launch(&out, &pid_dir, &["--max_restarts", "1"], &new_run);
    let pids = recorded_pids(&pid_dir, 2, RUN_LIMIT);
    let _cleanup = Cleanup(pids.clone());
    launcher.wait_for_stderr(RUN_LIMIT, |e| e.contains("step 9/16"));
    signal(pids[1], libc::SIGKILL);
    let stderr = wait_for_one_restart(&mut launcher);
    assert!(
        stderr.contains("(this run's newest complete checkpoint in")
            && !stderr.contains("resuming from checkpoint-16"),
        "{stderr}"
    );
    let got = std::fs::read(out.join("model.safetensors")).expect("new run's weights");
    assert!(
        got == want,
        "the restarted run did not finish its own training (an earlier run's checkpoint was resumed?)\n{stderr}"
    );
    let new_id = job_id_of(&stderr);
    let written_by = checkpoint_run_id(&out.join("checkpoint-16"));
    assert_eq!(written_by.as_deref(), Some(new_id.as_str()));
}

#[test]
fn a_fresh_run_refuses_another_runs_output_dir_unless_told_to_overwrite() {
    let _one = serial();
    let fx = fixture();
    let out = fx.path("out");
    let short = ["--max_steps", "4", "--save_steps", "2"];
    let mut earlier = fx.launch(&out, &fx.path("pids-earlier"), &[], &short);
    assert!(earlier.wait(RUN_LIMIT).success(), "{}", earlier.output());
    let earlier_id = job_id_of(&earlier.stderr());
    let model = std::fs::read(out.join("model.safetensors")).expect("earlier model");

    let mut again = fx.launch(&out, &fx.path("pids-again"), &[], &short);
    let status = again.wait(RUN_LIMIT);
    let stderr = again.stderr();
    assert_eq!(status.code(), Some(2), "{stderr}");
    for part in [
        "already holds checkpoint-2, checkpoint-4 and model.safetensors",
        &format!("(from run {earlier_id})"),
        "--resume_from_checkpoint true",
        "--overwrite_output_dir true",
    ] {
        assert!(stderr.contains(part), "{part:?} missing:\n{stderr}");
    }
    assert!(
        !stderr.contains("started"),
        "no worker may start:\n{stderr}"
    );
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).ok(),
        Some(model)
    );

    let overwrite = [
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--overwrite_output_dir",
        "true",
    ];
    let mut replacing = fx.launch(&out, &fx.path("pids-replacing"), &[], &overwrite);
    assert!(
        replacing.wait(RUN_LIMIT).success(),
        "{}",
        replacing.output()
    );
    let stderr = replacing.stderr();
    assert!(
        stderr.contains("overwrite_output_dir: removed checkpoint-2, checkpoint-4, latest from"),
        "{stderr}"
    );
    let new_id = job_id_of(&stderr);
    assert_ne!(new_id, earlier_id);
    for step in [2, 4] {
        let dir = out.join(format!("checkpoint-{step}"));
        let written_by = checkpoint_run_id(&dir);
        assert_eq!(
            written_by.as_deref(),
            Some(new_id.as_str()),
            "{}",
            dir.display()
        );
    }
}

#[test]
fn a_second_job_on_the_same_output_dir_is_refused_naming_the_first() {
    let _one = serial();
    let fx = fixture();
    let out = fx.path("out");
    let mut first = fx.launch(&out, &fx.path("pids-first"), &[], &[]);
    first.wait_for_stderr(RUN_LIMIT, |e| e.contains("step 2/16"));
    let first_id = job_id_of(&first.stderr());
    for extra in [&[][..], &["--resume_from_checkpoint", "true"][..]] {
        let mut second = fx.launch(&out, &fx.path("pids-second"), &[], extra);
        let status = second.wait(RUN_LIMIT);
        let stderr = second.stderr();
        assert_eq!(status.code(), Some(2), "{extra:?}:\n{stderr}");
        assert!(
            stderr.contains(&format!("is in use by job {first_id} (pid {}", first.pid())),
            "{extra:?}: the holder is not named:\n{stderr}"
        );
    }
    assert!(first.wait(RUN_LIMIT).success(), "{}", first.output());
    assert!(
        !out.join(".rsdeep.lock").exists(),
        "the lock is released at the end"
    );
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics");
    assert_eq!(
        log.lines().count() as u64,
        MAX_STEPS,
        "only the first job logged"
    );
}

#[test]
fn a_ranks_own_data_error_is_named_first_and_the_waiting_rank_as_its_consequence() {
    let _one = serial();
    let fx = fixture();
    let bad = fx.path("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"text\": broken\n").expect("bad corpus");
    let bad = bad.display().to_string();
    let out = fx.path("out");
    let mut launcher = fx.launch(&out, &fx.path("pids"), &[], &["--train_files", &bad]);
    let status = launcher.wait(RUN_LIMIT);
    let stderr = launcher.stderr();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("rsdeep: rank 0 failed first"),
        "the builder rank (local rank 0) is the cause:\n{stderr}"
    );
    let reported = stderr
        .lines()
        .find(|l| l.starts_with("rsdeep: rank 0 reported: "))
        .unwrap_or_default();
    assert!(
        reported.contains("bad.jsonl"),
        "rank 0's own data error:\n{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("(consequence of rank 0): ")
                && l.contains("the builder rank failed to build the data cache (local rank 0")),
        "rank 1 waited for the builder:\n{stderr}"
    );
}

/// 200 short documents of repetitive English.
fn corpus() -> String {
    let subjects = ["the fox", "a dog", "the captain", "my cat", "the river"];
    let verbs = ["jumps over", "sleeps near", "sails across", "watches"];
    let objects = ["the fence", "the harbour", "a garden", "the hill", "a door"];
    sentence_corpus(200, &subjects, &verbs, &objects)
}
