//! ZeRO engine equivalence: for stages 0-3 and world sizes 1, 2, 4 (with and without
//! overlap_comm, activation checkpointing, gradient accumulation, tied head, small
//! buckets), 20 steps on the same global batch give the losses and final weights of world
//! size 1 stage 0 within 1e-5. Ranks are threads joined by the in-process communicator;
//! the model is a tiny embedding + MLP blocks + head written here (see
//! `zero_qwen2.rs` for the real model). Contract: `docs/zero-engine.md`.

use crate::zero_support::{Case, TinySpec, assert_close, run_world};
use rsdeep_worker::zero::{EngineConfig, SchedulerConfig, WarmupType};

const STEPS: usize = 20;

fn base_config(stage: u8, world: usize, gas: usize, global_batch: usize) -> EngineConfig {
    let mut config = EngineConfig {
        stage: stage.try_into().expect("a ZeRO stage"),
        gradient_accumulation_steps: gas,
        train_micro_batch_size_per_gpu: global_batch / world / gas,
        train_batch_size: global_batch,
        gradient_clipping: 1.0,
        ..EngineConfig::default()
    };
    config.optimizer.lr = 1e-2;
    config.optimizer.weight_decay = 0.01;
    config.scheduler = SchedulerConfig::WarmupLr {
        warmup_min_lr: 0.0,
        warmup_max_lr: 1e-2,
        warmup_num_steps: 5,
        warmup_type: WarmupType::Linear,
    };
    config
}

struct Variant {
    stage: u8,
    world: usize,
    overlap: bool,
    checkpointing: bool,
    gas: usize,
    small_buckets: bool,
}

fn variant_config(v: &Variant, global_batch: usize) -> EngineConfig {
    let mut config = base_config(v.stage, v.world, v.gas, global_batch);
    config.overlap_comm = v.overlap;
    config.activation_checkpointing = v.checkpointing;
    if v.small_buckets {
        config.reduce_bucket_size = 64;
        config.allgather_bucket_size = 48;
        config.stage3_prefetch_bucket_size = 300;
        config.stage3_max_live_parameters = 700;
    }
    config.stage3_param_persistence_threshold = 8;
    // stage 2 on 4 ranks takes the all-reduce-and-keep-the-slice path
    config.reduce_scatter = !(v.stage == 2 && v.world == 4);
    config
}

fn check_matrix(spec: &TinySpec, variants: &[Variant]) {
    tch::set_num_threads(1);
    let global_batch = 8;
    let reference_config = base_config(0, 1, 1, global_batch);
    let reference = run_world(
        spec,
        &Case {
            world: 1,
            config: reference_config,
            steps: STEPS,
            global_batch,
            ..Case::default()
        },
    );
    let reference = &reference[0];
    assert!(reference.losses.iter().all(|l| l.is_finite()));
    assert!(
        reference.losses[STEPS - 1] < reference.losses[0] * 0.9,
        "the reference run must learn: {:?}",
        reference.losses
    );
    for v in variants {
        let label = format!(
            "stage {} world {} overlap {} ckpt {} gas {} small buckets {} tied {}",
            v.stage, v.world, v.overlap, v.checkpointing, v.gas, v.small_buckets, spec.tied
        );
        let config = variant_config(v, global_batch);
        let ranks = run_world(
            spec,
            &Case {
                world: v.world,
                config,
                steps: STEPS,
                global_batch,
                ..Case::default()
            },
        );
        for rank in &ranks {
            for (step, (got, want)) in rank.losses.iter().zip(&reference.losses).enumerate() {
                assert!(
                    ((got - want) / want).abs() <= 1e-5,
                    "{label}: loss at step {step}: {got} vs {want}"
                );
            }
            assert_eq!(rank.weights.len(), reference.weights.len(), "{label}");
            for ((name, got), (ref_name, want)) in rank.weights.iter().zip(&reference.weights) {
                assert_eq!(name, ref_name, "{label}");
                assert_close(got, want, 1e-5, &format!("{label}: {name}"));
            }
        }
    }
}

#[test]
fn every_stage_matches_world_one_stage_zero_tied_head() {
    let v = |stage, world, overlap, checkpointing, gas, small_buckets| Variant {
        stage,
        world,
        overlap,
        checkpointing,
        gas,
        small_buckets,
    };
    check_matrix(
        &TinySpec {
            tied: true,
            ..TinySpec::default()
        },
        &[
            v(0, 2, false, false, 1, false),
            v(0, 4, true, false, 2, true),
            v(1, 1, false, false, 2, false),
            v(1, 2, false, true, 1, true),
            v(1, 4, true, false, 1, false),
            v(2, 1, false, false, 1, true),
            v(2, 2, true, false, 1, true),
            v(2, 4, false, true, 2, false),
            v(3, 1, false, true, 1, false),
            v(3, 2, false, false, 1, true),
            v(3, 2, true, false, 2, false),
            v(3, 4, true, true, 1, true),
        ],
    );
}

#[test]
fn every_stage_matches_world_one_stage_zero_untied_head() {
    let v = |stage, world, overlap, checkpointing, gas, small_buckets| Variant {
        stage,
        world,
        overlap,
        checkpointing,
        gas,
        small_buckets,
    };
    check_matrix(
        &TinySpec {
            tied: false,
            ..TinySpec::default()
        },
        &[
            v(0, 4, false, true, 1, false),
            v(1, 2, true, false, 2, false),
            v(2, 4, true, true, 1, true),
            v(3, 4, false, false, 2, true),
        ],
    );
}

#[test]
fn every_stage_matches_over_the_tcp_ring_backend() {
    tch::set_num_threads(1);
    let spec = TinySpec::default();
    let global_batch = 8;
    let reference = run_world(
        &spec,
        &Case {
            world: 1,
            config: base_config(0, 1, 1, global_batch),
            steps: STEPS,
            global_batch,
            ..Case::default()
        },
    );
    for (stage, world, overlap, gas) in [
        (0u8, 2usize, false, 1usize),
        (1, 4, true, 1),
        (2, 2, true, 2),
        (3, 4, true, 1),
        (3, 2, false, 2),
    ] {
        let v = Variant {
            stage,
            world,
            overlap,
            checkpointing: stage == 3,
            gas,
            small_buckets: true,
        };
        let config = variant_config(&v, global_batch);
        let ranks = run_world(
            &spec,
            &Case {
                world,
                config,
                steps: STEPS,
                global_batch,
                tcp: true,
                ..Case::default()
            },
        );
        for rank in &ranks {
            for (step, (got, want)) in rank.losses.iter().zip(&reference[0].losses).enumerate() {
                assert!(
                    ((got - want) / want).abs() <= 1e-5,
                    "tcp stage {stage} world {world}: step {step}: {got} vs {want}"
                );
            }
            for ((name, got), (_, want)) in rank.weights.iter().zip(&reference[0].weights) {
                assert_close(
                    got,
                    want,
                    1e-5,
                    &format!("tcp stage {stage} world {world}: {name}"),
                );
            }
        }
    }
}
