//! Crash safety: a run of two in-process ranks saves checkpoint-2, then is killed with
//! SIGKILL (kill -9, every worker at once) at each of the eleven moments of the save of
//! step 4 (`checkpoint::crash::KILL_POINTS`: mid partition write, before and after the
//! manifest, the rename, `latest`, rotation...). Every time, `latest` resolves to a
//! complete checkpoint (checkpoint-2 before the rename, checkpoint-4 after), it loads on
//! a different world size, training continues and saves again, the stale `.tmp` folder
//! is cleaned up, and the continued losses match an uninterrupted run within 1e-5.
//! The killed process is this test binary re-run on its `#[ignore]`d child test.
//! Contract: `docs/checkpoints.md`.

use crate::checkpoint_support::{Run, assert_losses_close, train};
use crate::support::rerun_alone;
use rsdeep_worker::checkpoint::crash::{KILL_ENV, KILL_POINTS};
use rsdeep_worker::checkpoint::resolve_resume_path;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

const CHILD_DIR_ENV: &str = "RSDEEP_CRASH_CHILD_DIR";

fn child_run(dir: &Path) -> Run {
    let mut run = Run::new(2, 2, 6, dir);
    run.save_at = vec![2, 4];
    run.save_total_limit = Some(1);
    run
}

#[test]
#[ignore = "the process killed by kill_nine_at_every_moment_of_a_save_leaves_a_resumable_checkpoint"]
fn crash_child() {
    let dir = std::env::var(CHILD_DIR_ENV).expect("run by the crash test only");
    train(&child_run(Path::new(&dir)));
}

#[test]
fn kill_nine_at_every_moment_of_a_save_leaves_a_resumable_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = train(&Run::new(2, 2, 6, &tmp.path().join("reference")));
    let rename_index = KILL_POINTS
        .iter()
        .position(|p| *p == "renamed_into_place")
        .unwrap();
    for (i, point) in KILL_POINTS.iter().enumerate() {
        let dir = tmp.path().join(point);
        let dir_text = dir.to_string_lossy().into_owned();
        let kill_at = format!("{point}:4");
        let status = rerun_alone(
            "checkpoint_crash::crash_child",
            &[
                (CHILD_DIR_ENV, dir_text.as_str()),
                (KILL_ENV, kill_at.as_str()),
            ],
            &["--ignored"],
        );
        assert_eq!(
            status.status.signal(),
            Some(9),
            "{point}: the child was not killed: {status:?}"
        );

        let latest = resolve_resume_path(&dir, "latest").unwrap();
        let expected = if i < rename_index {
            "checkpoint-2"
        } else {
            "checkpoint-4"
        };
        assert_eq!(
            latest,
            dir.join(expected),
            "{point}: wrong latest checkpoint"
        );

        let mut resume = Run::new(1, 3, 6, &dir);
        resume.resume_from = Some(latest);
        resume.save_at = vec![6];
        resume.save_total_limit = Some(1);
        let resumed = train(&resume);
        let start = resumed.resumed_step as usize;
        assert_losses_close(&resumed.losses, &reference.losses[start..], 1e-5, point);

        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["checkpoint-6", "latest"],
            "{point}: leftovers after the next save"
        );
        assert_eq!(
            resolve_resume_path(&dir, "true").unwrap(),
            dir.join("checkpoint-6")
        );
    }
}
