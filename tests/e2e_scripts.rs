//! End-to-end tests of user programs launched by `rsdeep` as DeepSpeed's launcher runs
//! them (`rsdeep --device cpu --num_procs 2 script.py args...`): the argument list and the
//! environment each rank gets (`.deepspeed_env` included), a Python exception named in the
//! failure report with the other ranks stopped, a torchrun-style script that reads
//! LOCAL_RANK (`--no_local_rank`) joining a real gloo process group, and a program run
//! without Python (`--no_python`). The scripts are `tests/fixtures/user_scripts/`; Python
//! is the project venv's (`RSDEEP_PYTHON`, set by `scripts/env.sh`).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use rsdeep_e2e::{
    Launcher, alive, pretrain_fixture, python, run_deepspeed, shell_script, user_script as script,
};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// `--device cpu --num_procs 2 --master_port 0 --python <venv python>` then `rest`.
fn two_ranks(rest: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--device", "cpu", "--num_procs", "2", "--master_port", "0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--python".to_string(), python()]);
    args.extend(rest.iter().map(|s| s.to_string()));
    args
}

fn start(args: &[String]) -> Launcher {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Launcher::start(&args, &[])
}

/// The JSON line rank `rank` of print_env.py printed (`[rank N] {...}`).
fn env_report(stdout: &str, rank: usize) -> serde_json::Value {
    let prefix = format!("[rank {rank}] ");
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).filter(|l| l.starts_with('{')))
        .unwrap_or_else(|| panic!("no JSON line from rank {rank} in:\n{stdout}"));
    serde_json::from_str(line).expect("print_env.py prints JSON")
}

#[test]
fn a_script_gets_deepspeeds_arguments_and_environment_and_the_env_files() {
    let _guard = serial();
    let print_env = script("print_env.py");
    let args = two_ranks(&[&print_env, "--some_flag", "two words"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // DeepSpeed users' env file, in the launcher's working directory.
    let env_file = (".deepspeed_env", "DS_ENV_FROM_FILE=yes\n");
    let mut launcher = Launcher::start_with_files(&args, &[], &[env_file]);
    let status = launcher.wait(Duration::from_secs(60));
    assert!(status.success(), "{}", launcher.output());
    let stdout = launcher.stdout();
    for rank in 0..2 {
        let report = env_report(&stdout, rank);
        let argv: Vec<&str> = report["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let local_rank = format!("--local_rank={rank}");
        assert_eq!(
            argv[1..],
            [local_rank.as_str(), "--some_flag", "two words"],
            "argv of rank {rank}"
        );
        let env = &report["env"];
        let expected = [
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("WORLD_SIZE", "2".to_string()),
            ("LOCAL_SIZE", "2".to_string()),
            ("CROSS_RANK", "0".to_string()),
            ("CROSS_SIZE", "1".to_string()),
            ("MASTER_ADDR", "127.0.0.1".to_string()),
        ];
        for (key, value) in expected {
            assert_eq!(env[key], value, "{key} of rank {rank}: {report}");
        }
        let port: u16 = env["MASTER_PORT"].as_str().unwrap().parse().unwrap();
        assert!(port > 0, "--master_port 0 picks a free port for torch");
        assert_eq!(env["DS_ENV_FROM_FILE"], "yes", "{report}");
    }
}

#[test]
fn a_python_exception_is_named_and_the_other_ranks_are_stopped() {
    let _guard = serial();
    let raises = script("raises.py");
    let args = two_ranks(&["--grace_period", "5", &raises]);
    let mut launcher = start(&args);
    let status = launcher.wait(Duration::from_secs(60));
    let stderr = launcher.stderr();
    assert_eq!(status.code(), Some(1), "{}", launcher.output());
    assert!(
        stderr.contains("rank 1 failed first (host localhost"),
        "{stderr}"
    );
    assert!(
        stderr.contains("rank 1 raised ValueError: bad batch shape at step 3 (at ")
            && stderr.contains("raises.py:"),
        "{stderr}"
    );
    assert!(
        stderr.contains("stopping the other workers"),
        "rank 0 was stopped: {stderr}"
    );
    let pids: Vec<i32> = launcher
        .stdout()
        .lines()
        .filter_map(|l| l.split(" started pid ").nth(1)?.trim().parse().ok())
        .collect();
    assert_eq!(pids.len(), 2, "{}", launcher.output());
    assert!(
        pids.iter().all(|&pid| !alive(pid)),
        "a rank survived: {pids:?}"
    );
}

#[test]
fn a_torchrun_style_script_reads_local_rank_and_joins_a_process_group() {
    let _guard = serial();
    let torchrun_style = script("torchrun_style.py");
    let args = two_ranks(&["--no_local_rank", &torchrun_style]);
    let mut launcher = start(&args);
    let status = launcher.wait(Duration::from_secs(120));
    assert!(status.success(), "{}", launcher.output());
    let stdout = launcher.stdout();
    for rank in 0..2 {
        let line = format!("[rank {rank}] rank {rank} of 2 sum 3 (local_rank {rank})");
        assert!(stdout.contains(&line), "{line} missing:\n{stdout}");
    }
}

#[test]
fn a_program_runs_without_python() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let program = shell_script(
        dir.path(),
        "train.sh",
        "echo \"shell rank $RANK of $WORLD_SIZE args $*\"",
    );
    let program = program.display().to_string();
    let args = two_ranks(&[
        "--save_pid",
        "--no_python",
        "--no_local_rank",
        &program,
        "a",
        "b",
    ]);
    let mut launcher = start(&args);
    let pid_file = std::env::temp_dir().join(format!("{}.deepspeed", launcher.pid()));
    let status = launcher.wait(Duration::from_secs(30));
    assert!(status.success(), "{}", launcher.output());
    assert!(
        launcher
            .stderr()
            .contains(&format!("saved in {}", pid_file.display())),
        "{}",
        launcher.output()
    );
    assert!(
        !pid_file.exists(),
        "--save_pid's file is removed at the end"
    );
    let stdout = launcher.stdout();
    for rank in 0..2 {
        let line = format!("[rank {rank}] shell rank {rank} of 2 args a b");
        assert!(stdout.contains(&line), "{line} missing:\n{stdout}");
    }
}

#[test]
fn a_train_json_only_flag_is_refused_for_a_script_and_the_reverse() {
    let _guard = serial();
    let mut launcher = start(&two_ranks(&["--no_local_rank", "train.json"]));
    let status = launcher.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(2), "{}", launcher.output());
    assert!(
        launcher
            .stderr()
            .contains("--no_local_rank applies to a user program"),
        "{}",
        launcher.output()
    );
    let mut launcher = start(&two_ranks(&["--autotuning", "tune", "x.py"]));
    assert_eq!(launcher.wait(Duration::from_secs(10)).code(), Some(2));
    assert!(
        launcher.stderr().contains("autotuner"),
        "{}",
        launcher.output()
    );
}

#[test]
fn a_silent_idle_job_is_reported_as_hung_and_stopped() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let program = shell_script(
        dir.path(),
        "stuck.sh",
        "echo \"rank $RANK pid $$ waiting\"\nexec sleep 120",
    );
    let program = program.display().to_string();
    let args = two_ranks(&[
        "--hang_timeout",
        "2",
        "--grace_period",
        "2",
        "--no_python",
        "--no_local_rank",
        &program,
    ]);
    let mut launcher = start(&args);
    let status = launcher.wait(Duration::from_secs(30));
    let stderr = launcher.stderr();
    assert_eq!(status.code(), Some(1), "{}", launcher.output());
    assert!(
        stderr.contains("no rank printed a line or used CPU for 2 s (--hang_timeout)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("    rank 1 pid"),
        "rank 1's last lines: {stderr}"
    );
    let pids: Vec<i32> = launcher
        .stdout()
        .lines()
        .filter_map(|l| l.split(" pid ").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(pids.len(), 2, "{}", launcher.output());
    assert!(
        pids.iter().all(|&pid| !alive(pid)),
        "a rank survived: {pids:?}"
    );
}

/// The `PRETRAIN_LOG` losses rank 0 of pretrain.py printed, by step.
fn pretrain_losses(output: &str) -> Vec<(u64, f64)> {
    output
        .lines()
        .filter_map(|l| l.split("PRETRAIN_LOG ").nth(1))
        .filter_map(|json| serde_json::from_str::<serde_json::Value>(json).ok())
        .filter_map(|v| Some((v.get("step")?.as_u64()?, v.get("loss")?.as_f64()?)))
        .collect()
}

/// The seed's command line (`deepspeed pretrain.py ...`), scaled down to a tiny model on
/// CPU: the same flags, smaller numbers, `--report_to none` (no swanlab here) and
/// `--use_cpu` (HF Trainer sees no accelerator on this machine).
fn seed_arguments(dir: &std::path::Path, output_dir: &str) -> Vec<String> {
    let path = |name: &str| dir.join(name).display().to_string();
    let ds_config =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/ds_config_zero2.json");
    let args = [
        "--config_name",
        &path("model"),
        "--tokenizer_name",
        &path("tok"),
        "--train_files",
        &path("corpus.jsonl"),
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--do_train",
        "--output_dir",
        &path(output_dir),
        "--evaluation_strategy",
        "no",
        "--learning_rate",
        "1e-3",
        "--num_train_epochs",
        "1",
        "--max_steps",
        "6",
        "--warmup_steps",
        "2",
        "--logging_dir",
        &path("logs"),
        "--logging_strategy",
        "steps",
        "--logging_steps",
        "1",
        "--save_strategy",
        "steps",
        "--save_steps",
        "3",
        "--preprocessing_num_workers",
        "10",
        "--save_total_limit",
        "2",
        "--seed",
        "12",
        "--block_size",
        "64",
        "--gradient_checkpointing",
        "--deepspeed",
        &ds_config.display().to_string(),
        "--report_to",
        "none",
        "--use_cpu",
    ];
    args.iter().map(|s| s.to_string()).collect()
}

/// `rsdeep --device cpu --num_procs 2 pretrain.py args...`; returns its output.
fn run_rsdeep(args: &[String]) -> String {
    let mut all = two_ranks(&[&script("pretrain.py")]);
    all.extend(args.iter().cloned());
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let envs = [
        ("DS_ACCELERATOR", "cpu".to_string()),
        ("OMP_NUM_THREADS", "1".to_string()),
    ];
    let mut launcher = Launcher::start(&all, &envs);
    let status = launcher.wait(Duration::from_secs(600));
    assert!(status.success(), "{}", launcher.output());
    launcher.output()
}

#[test]
fn the_seed_pretrain_script_matches_deepspeed_step_for_step_and_resumes_under_either_launcher() {
    let _guard = serial();
    let fixture = pretrain_fixture();
    let dir = fixture.path();
    let by_deepspeed = pretrain_losses(&run_deepspeed(
        dir,
        &script("pretrain.py"),
        &seed_arguments(dir, "ds-out"),
    ));
    let steps: Vec<u64> = by_deepspeed.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        steps,
        [1, 2, 3, 4, 5, 6],
        "deepspeed's run logged every step"
    );
    let by_rsdeep = pretrain_losses(&run_rsdeep(&seed_arguments(dir, "rs-out")));
    assert_eq!(
        by_rsdeep, by_deepspeed,
        "per-step losses under rsdeep vs deepspeed"
    );
    // The checkpoint the deepspeed-launched run wrote resumes under rsdeep.
    let mut resume = seed_arguments(dir, "rs-resumed");
    let checkpoint = dir.join("ds-out/checkpoint-3").display().to_string();
    resume.extend(["--resume_from_checkpoint".to_string(), checkpoint]);
    let resumed = pretrain_losses(&run_rsdeep(&resume));
    assert_eq!(
        resumed,
        by_deepspeed[3..],
        "steps 4-6 after resuming checkpoint-3"
    );
    // And the rsdeep-launched run's checkpoint resumes under deepspeed.
    let mut resume = seed_arguments(dir, "ds-resumed");
    let checkpoint = dir.join("rs-out/checkpoint-3").display().to_string();
    resume.extend(["--resume_from_checkpoint".to_string(), checkpoint]);
    let resumed = pretrain_losses(&run_deepspeed(dir, &script("pretrain.py"), &resume));
    assert_eq!(resumed, by_deepspeed[3..], "steps 4-6 resumed by deepspeed");
}
