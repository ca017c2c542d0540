//! Checkpoint files and tools: a flipped byte or a truncated shard fails the load with
//! the file's name and advice, and changes nothing on disk; `latest`/`true` pick the
//! newest complete checkpoint and ignore `.tmp` and manifest-less folders; rotation by
//! `save_total_limit` keeps the newest; stale `.tmp` folders are removed by the next
//! save; consolidated weights (fp32, sharded) and the checkpoint's own
//! `model.safetensors` load in Python transformers with logits matching rsdeep's (1e-4).
//! Needs `RSDEEP_PYTHON` (set by `scripts/env.sh`); without it the Python test fails.
//! Contract: `docs/checkpoints.md`.

use crate::checkpoint_support::{Run, model_config, train};
use rsdeep_worker::checkpoint::{consolidate, load_checkpoint, resolve_resume_path};
use rsdeep_worker::model::{CausalLm, ForwardCtx};
use rsdeep_worker::zero::{EngineModel, LocalCommunicator, ZeroEngine};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// Loads `dir` into a fresh single-rank engine; the error text on failure.
fn try_load(dir: &Path) -> Result<u64, String> {
    let model = CausalLm::from_config(model_config(), Device::Cpu, Kind::Float, 5).unwrap();
    let comm = LocalCommunicator::world(1).pop().unwrap();
    let engine_model = EngineModel {
        head_tied_to_embedding: model.tied_to_embedding(),
        blocks: model.blocks,
        frozen: Default::default(),
    };
    let mut engine = ZeroEngine::new(
        engine_model,
        Arc::new(comm),
        crate::checkpoint_support::engine_config(1, 1),
    )
    .unwrap();
    load_checkpoint(dir, &mut engine, 0, 1)
        .map(|s| s.global_step)
        .map_err(|e| e.to_string())
}

fn saved_run(dir: &Path, world: usize, stage: u8, steps: u64, save_at: Vec<u64>) {
    let mut run = Run::new(world, stage, steps, dir);
    run.save_at = save_at;
    train(&run);
}

#[test]
fn damaged_files_are_named_and_nothing_is_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    saved_run(tmp.path(), 2, 2, 2, vec![2]);
    let checkpoint = tmp.path().join("checkpoint-2");
    assert_eq!(try_load(&checkpoint), Ok(2));

    let shard = checkpoint.join("zero/optim_states_rank_00001.safetensors");
    let original = std::fs::read(&shard).unwrap();
    let mut flipped = original.clone();
    let last = flipped.len() - 5;
    flipped[last] ^= 0x10;
    std::fs::write(&shard, &flipped).unwrap();
    let err = try_load(&checkpoint).unwrap_err();
    assert!(
        err.contains("optim_states_rank_00001.safetensors") && err.contains("checksum"),
        "{err}"
    );
    assert!(err.contains("earlier checkpoint"), "no advice: {err}");
    assert_eq!(
        std::fs::read(&shard).unwrap(),
        flipped,
        "a failed load modified the file"
    );

    std::fs::write(&shard, &original[..original.len() / 2]).unwrap();
    let err = try_load(&checkpoint).unwrap_err();
    assert!(
        err.contains("optim_states_rank_00001.safetensors") && err.contains("truncated"),
        "{err}"
    );

    std::fs::remove_file(&shard).unwrap();
    let err = try_load(&checkpoint).unwrap_err();
    assert!(
        err.contains("optim_states_rank_00001.safetensors") && err.contains("missing"),
        "{err}"
    );

    std::fs::write(&shard, &original).unwrap();
    std::fs::write(checkpoint.join("trainer_state.json"), "{}").unwrap();
    let err = try_load(&checkpoint).unwrap_err();
    assert!(err.contains("trainer_state.json"), "{err}");

    // Files a resume does not read are checked too: a damaged checkpoint is refused.
    for name in ["engine_state.json", "model.safetensors"] {
        let fresh = tempfile::tempdir().unwrap();
        saved_run(fresh.path(), 2, 2, 2, vec![2]);
        let checkpoint = fresh.path().join("checkpoint-2");
        let path = checkpoint.join(name);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let err = try_load(&checkpoint).unwrap_err();
        assert!(
            err.contains(name) && err.contains("checksum"),
            "{name}: {err}"
        );
    }
}

#[test]
fn latest_picks_the_newest_complete_checkpoint_and_rotation_keeps_the_newest() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    let err = resolve_resume_path(out, "latest").unwrap_err().to_string();
    assert!(err.contains("No valid checkpoint"), "{err}");

    let mut run = Run::new(1, 1, 4, out);
    run.save_at = vec![1, 2, 3, 4];
    run.save_total_limit = Some(2);
    run.write_model_weights = false;
    // A crashed save and a stray folder without manifest, both newer.
    std::fs::create_dir_all(out.join("checkpoint-9.tmp/zero")).unwrap();
    std::fs::write(out.join("checkpoint-9.tmp/.rsdeep-saving"), "").unwrap();
    std::fs::create_dir_all(out.join("checkpoint-12")).unwrap();
    std::fs::write(out.join("checkpoint-12/config.json"), "{}").unwrap();
    train(&run);

    let mut names: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["checkpoint-12", "checkpoint-3", "checkpoint-4", "latest"],
        "rotation or tmp cleanup"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("latest")).unwrap().trim(),
        "checkpoint-4"
    );
    for spec in ["latest", "true", "True"] {
        assert_eq!(
            resolve_resume_path(out, spec).unwrap(),
            out.join("checkpoint-4"),
            "{spec}"
        );
    }
    let explicit = out.join("checkpoint-3");
    assert_eq!(
        resolve_resume_path(out, explicit.to_str().unwrap()).unwrap(),
        explicit
    );
    // `latest` is followed to its run's newest complete checkpoint: checkpoint-4 when both
    // are one run's (a save killed before it updated `latest`) ...
    std::fs::write(out.join("latest"), "checkpoint-3\n").unwrap();
    assert_eq!(
        resolve_resume_path(out, "true").unwrap(),
        out.join("checkpoint-4")
    );
    // ... never the larger number of another run.
    let manifest_path = out.join("checkpoint-4/manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest["run"] =
        serde_json::json!({"run_id": "another", "lineage": ["another"], "config": {}});
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    assert_eq!(resolve_resume_path(out, "true").unwrap(), explicit);
    std::fs::write(out.join("latest"), "checkpoint-12\n").unwrap(); // incomplete
    assert_eq!(
        resolve_resume_path(out, "latest").unwrap(),
        out.join("checkpoint-4")
    );
    let err = resolve_resume_path(out, out.join("checkpoint-12").to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("incomplete"), "{err}");
    let err = resolve_resume_path(out, "/no/such/checkpoint")
        .unwrap_err()
        .to_string();
    assert!(err.contains("/no/such/checkpoint"), "{err}");
}

fn python() -> String {
    match std::env::var("RSDEEP_PYTHON") {
        Ok(p) if !p.is_empty() => p,
        _ => panic!(
            "RSDEEP_PYTHON is not set: `source scripts/env.sh` first (torch + transformers needed)"
        ),
    }
}

/// Logits transformers computes for `ids` with the model in `dir`.
fn transformers_logits(dir: &Path, ids: &Tensor, scratch: &Path) -> Tensor {
    let out_file = scratch.join(format!(
        "{}.logits.safetensors",
        dir.file_name().unwrap().to_string_lossy()
    ));
    let rows: Vec<Vec<i64>> = (0..ids.size()[0])
        .map(|r| Vec::<i64>::try_from(ids.get(r)).unwrap())
        .collect();
    let spec = serde_json::json!({"model_dir": dir, "input_ids": rows, "labels": null, "out_file": out_file});
    let spec_path = scratch.join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/load_rsdeep_model.py");
    let output = Command::new(python())
        .arg(script)
        .arg(&spec_path)
        .output()
        .expect("cannot run RSDEEP_PYTHON");
    assert!(
        output.status.success(),
        "transformers failed on {}:\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    Tensor::read_safetensors(&out_file)
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == "logits")
        .unwrap()
        .1
}

fn rsdeep_logits(dir: &Path, ids: &Tensor) -> Tensor {
    let model = CausalLm::from_pretrained(dir, Device::Cpu, Kind::Float).unwrap();
    let ctx = ForwardCtx::causal(ids).unwrap();
    tch::no_grad(|| model.forward(ids, &ctx).unwrap())
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

#[test]
fn consolidated_and_saved_weights_load_in_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let mut run = Run::new(2, 3, 3, &tmp.path().join("run"));
    run.save_at = vec![3];
    run.max_shard_bytes = 40_000;
    let outcome = train(&run);
    let checkpoint = tmp.path().join("run/checkpoint-3");
    assert!(
        checkpoint.join("model.safetensors.index.json").is_file(),
        "weights were not sharded"
    );

    let fp32 = tmp.path().join("fp32");
    consolidate(&checkpoint, &fp32, Kind::Float, 40_000).unwrap();
    assert!(
        fp32.join("model.safetensors.index.json").is_file(),
        "consolidated output not sharded"
    );
    let consolidated = CausalLm::from_pretrained(&fp32, Device::Cpu, Kind::Float).unwrap();
    for (param, (name, want)) in consolidated.params().zip(&outcome.weights) {
        assert_eq!(&param.name, name);
        assert!(
            param.tensor.equal(want),
            "{name}: consolidated differs from the engine's weights"
        );
    }

    let bf16 = tmp.path().join("bf16");
    consolidate(&checkpoint, &bf16, Kind::BFloat16, 1 << 30).unwrap();
    assert!(bf16.join("model.safetensors").is_file());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bf16.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");

    tch::manual_seed(2);
    let ids = Tensor::randint(64, [2, 8], (Kind::Int64, Device::Cpu));
    for dir in [&fp32, &checkpoint] {
        let diff = max_diff(
            &transformers_logits(dir, &ids, tmp.path()),
            &rsdeep_logits(dir, &ids),
        );
        assert!(diff < 1e-4, "{}: logits differ by {diff}", dir.display());
    }
    let diff = max_diff(
        &transformers_logits(&bf16, &ids, tmp.path()),
        &rsdeep_logits(&fp32, &ids),
    );
    assert!(diff < 0.1, "bf16 logits differ by {diff}");
}
