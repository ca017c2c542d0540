//! Checkpoint resume with the real engine and a tiny real Qwen2 on in-process ranks:
//! exact resume (20 steps straight == 10 + save + resume + 10, bit for bit, on CPU
//! fp32), resharding across world sizes (2->4, 4->1, 2->1) and stages (2->3, 3->0) with
//! the optimizer state preserved bit for bit and continued losses within 1e-5 of the
//! same-topology continuation, and asynchronous saves equal to synchronous ones.
//! Contract: `docs/checkpoints.md`.

use crate::checkpoint_support::{Run, assert_bit_identical, assert_losses_close, train};
use rsdeep_worker::checkpoint::read_full_optimizer_state;

fn full_state_named(dir: &std::path::Path) -> Vec<(String, tch::Tensor)> {
    let state = read_full_optimizer_state(dir).unwrap();
    state
        .params
        .into_iter()
        .flat_map(|(n, m, a, s)| {
            [
                (format!("{n}/master"), m),
                (format!("{n}/exp_avg"), a),
                (format!("{n}/exp_avg_sq"), s),
            ]
        })
        .collect()
}

#[test]
fn resume_is_bit_identical_to_a_straight_run() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = train(&Run::new(2, 2, 20, &tmp.path().join("straight")));

    let first_half_dir = tmp.path().join("first");
    let mut first = Run::new(2, 2, 10, &first_half_dir);
    first.save_at = vec![10];
    let first_half = train(&first);
    let checkpoint = first_half_dir.join("checkpoint-10");
    assert!(checkpoint.join("manifest.json").is_file());

    let mut second = Run::new(2, 2, 20, &tmp.path().join("second"));
    second.resume_from = Some(checkpoint.clone());
    let resumed = train(&second);
    assert_eq!(resumed.resumed_step, 10);
    assert_eq!(
        &straight.losses[..10],
        &first_half.losses[..],
        "first half diverged"
    );
    assert_eq!(
        &straight.losses[10..],
        &resumed.losses[..],
        "resumed losses differ"
    );
    assert_bit_identical(&resumed.weights, &straight.weights, "final weights");
    let state = resumed.trainer_state.unwrap();
    assert_eq!(state.global_step, 10);
    assert_eq!(state.log_history.len(), 10);
    for (rank, extra) in resumed.resumed_extra.iter().enumerate() {
        assert_eq!(
            extra["rank"], rank,
            "rank {rank} got another rank's sampler/RNG state"
        );
    }
}

#[test]
fn world_size_and_stage_changes_reshard_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = |name: &str| tmp.path().join(name);
    let mut base = Run::new(2, 2, 10, &out("base"));
    base.save_at = vec![10];
    train(&base);
    let checkpoint = out("base").join("checkpoint-10");
    let saved_state = full_state_named(&checkpoint);

    let mut reference_run = Run::new(2, 2, 14, &out("same"));
    reference_run.resume_from = Some(checkpoint.clone());
    let reference = train(&reference_run);

    for (world, stage) in [(4usize, 2u8), (1, 2), (2, 3), (4, 3), (1, 0)] {
        let label = format!("2x stage 2 -> {world}x stage {stage}");
        let dir = out(&format!("w{world}s{stage}"));
        let mut run = Run::new(world, stage, 14, &dir);
        run.resume_from = Some(checkpoint.clone());
        run.save_at = vec![10];
        run.write_model_weights = false;
        let resumed = train(&run);
        // Saving right after the load must give back the very same optimizer state.
        let resaved = full_state_named(&dir.join("checkpoint-10"));
        assert_bit_identical(&resaved, &saved_state, &format!("{label}: optimizer state"));
        assert_losses_close(&resumed.losses, &reference.losses, 1e-5, &label);
        if world != 2 {
            assert_eq!(
                resumed.resumed_extra[0]["rank"], 0,
                "{label}: rank 0's extra is handed out"
            );
        }
    }
}

#[test]
fn four_ranks_stage_three_resume_on_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let mut base = Run::new(4, 3, 6, &tmp.path().join("base"));
    base.save_at = vec![6];
    base.write_model_weights = false;
    train(&base);
    let checkpoint = tmp.path().join("base/checkpoint-6");
    let mut same = Run::new(4, 3, 9, &tmp.path().join("same"));
    same.resume_from = Some(checkpoint.clone());
    let reference = train(&same);
    let mut single = Run::new(1, 1, 9, &tmp.path().join("single"));
    single.resume_from = Some(checkpoint);
    let resumed = train(&single);
    assert_losses_close(
        &resumed.losses,
        &reference.losses,
        1e-5,
        "4x stage 3 -> 1x stage 1",
    );
    for ((name, got), (_, want)) in resumed.weights.iter().zip(&reference.weights) {
        let diff = (got - want).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{name}: weights differ by {diff}");
    }
}

#[test]
fn asynchronous_save_writes_the_same_checkpoint_as_a_synchronous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sync_run = Run::new(2, 3, 6, &tmp.path().join("sync"));
    sync_run.save_at = vec![4];
    let sync_outcome = train(&sync_run);
    let mut async_run = Run::new(2, 3, 6, &tmp.path().join("async"));
    async_run.save_at = vec![4];
    async_run.async_save = true;
    let async_outcome = train(&async_run);
    assert_eq!(sync_outcome.losses, async_outcome.losses, "losses");
    let (a, b) = (
        tmp.path().join("sync/checkpoint-4"),
        tmp.path().join("async/checkpoint-4"),
    );
    assert_bit_identical(
        &full_state_named(&b),
        &full_state_named(&a),
        "optimizer state",
    );
    for file in [
        "model.safetensors",
        "zero/optim_states_rank_00001.safetensors",
        "rng_state_1.json",
    ] {
        assert_eq!(
            std::fs::read(a.join(file)).unwrap(),
            std::fs::read(b.join(file)).unwrap(),
            "{file} differs"
        );
    }
}
