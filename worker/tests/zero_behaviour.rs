//! ZeRO engine behaviour beyond equivalence: bucketing is real (the communicator's trace
//! shows several collectives per step, none larger than the bucket), an fp16 overflow
//! injected on one rank skips the step on every rank and halves the loss scale, and the
//! per-rank memory report matches the ZeRO formulas for bf16 + Adam. Harness:
//! `zero_support`; contract: `docs/zero-engine.md`.

use crate::zero_support::{Case, TinySpec, assert_close, run_world};
use rsdeep_worker::zero::{EngineConfig, LossScaleConfig, Precision};
use tch::Kind;

fn config(stage: u8, world: usize) -> EngineConfig {
    let mut config = EngineConfig {
        stage: stage.try_into().expect("a ZeRO stage"),
        train_micro_batch_size_per_gpu: 2,
        train_batch_size: 2 * world,
        ..EngineConfig::default()
    };
    config.optimizer.lr = 1e-2;
    config
}

#[test]
fn gradient_and_parameter_collectives_respect_their_buckets() {
    tch::set_num_threads(1);
    let spec = TinySpec::default();
    // One MLP block holds 2*16*8 + 16 + 8 = 280 elements, the embedding 128: larger than
    // every bucket below, so each block's gradients travel in several collectives
    // (2 + 5 + 5 + 1 = 13 per step with these sizes on 2 ranks).
    for (stage, op) in [
        (1u8, "all_reduce"),
        (2, "reduce_scatter"),
        (3, "reduce_scatter"),
    ] {
        let mut config = config(stage, 2);
        config.reduce_bucket_size = 64;
        config.allgather_bucket_size = 40;
        config.overlap_comm = stage == 2;
        config.stage3_param_persistence_threshold = 0;
        let ranks = run_world(
            &spec,
            &Case {
                world: 2,
                config,
                steps: 2,
                global_batch: 4,
                trace: true,
                ..Case::default()
            },
        );
        for rank in &ranks {
            for events in &rank.trace_per_step {
                let grads: Vec<_> = events
                    .iter()
                    .filter(|e| e.op == op && e.numel > 1)
                    .collect();
                assert!(
                    grads.len() >= 12,
                    "stage {stage}: expected many {op} buckets, got {}",
                    grads.len()
                );
                assert!(
                    grads.iter().all(|e| e.numel <= 64),
                    "stage {stage}: a {op} exceeds the bucket: {events:?}"
                );
                let gathers: Vec<_> = events.iter().filter(|e| e.op == "all_gather").collect();
                assert!(
                    gathers.len() > 4,
                    "stage {stage}: parameters gathered in pieces"
                );
                assert!(
                    gathers.iter().all(|e| e.numel <= 40),
                    "stage {stage}: an all_gather exceeds the bucket"
                );
            }
        }
    }
}

#[test]
fn injected_fp16_overflow_skips_the_step_everywhere_and_halves_the_scale() {
    tch::set_num_threads(1);
    let spec = TinySpec {
        kind: Kind::Half,
        ..TinySpec::default()
    };
    for stage in [0u8, 2, 3] {
        let mut config = config(stage, 2);
        config.precision = Precision::Fp16(LossScaleConfig {
            initial_scale_power: 8,
            hysteresis: 1,
            loss_scale_window: 1000,
            ..LossScaleConfig::default()
        });
        let ranks = run_world(
            &spec,
            &Case {
                world: 2,
                config: config.clone(),
                steps: 4,
                global_batch: 4,
                inject_overflow: Some((1, 1)),
                ..Case::default()
            },
        );
        let clean = run_world(
            &spec,
            &Case {
                world: 2,
                config,
                steps: 3,
                global_batch: 4,
                ..Case::default()
            },
        );
        for rank in &ranks {
            let applied: Vec<bool> = rank.reports.iter().map(|r| r.applied).collect();
            assert_eq!(
                applied,
                vec![true, false, true, true],
                "stage {stage}: only step 1 is skipped, on every rank"
            );
            let scales: Vec<f64> = rank.reports.iter().map(|r| r.loss_scale).collect();
            assert_eq!(
                scales,
                vec![256.0, 256.0, 128.0, 128.0],
                "stage {stage}: the overflow halves the scale"
            );
            assert_eq!(rank.optimizer_steps, 3);
            assert!(
                rank.losses.iter().all(|l| l.is_finite()),
                "training continues: {:?}",
                rank.losses
            );
        }
        // Every rank ends with the same weights, and up to the skip the run equals a clean one.
        for ((name, a), (_, b)) in ranks[0].weights.iter().zip(&ranks[1].weights) {
            assert_close(a, b, 0.0, &format!("stage {stage}: ranks agree on {name}"));
        }
        assert_eq!(clean[0].reports[0].loss, ranks[0].reports[0].loss);
        assert_eq!(
            clean[0].reports[1].loss, ranks[0].reports[1].loss,
            "the skipped step saw the same batch"
        );
    }
}

#[test]
fn memory_report_matches_the_zero_formulas_for_bf16_adam() {
    tch::set_num_threads(1);
    let spec = TinySpec {
        vocab: 64,
        hidden: 64,
        mlp_blocks: 2,
        seq: 4,
        tied: true,
        kind: Kind::BFloat16,
    };
    let psi = (64 * 64 + 2 * (2 * 64 * 64 + 2 * 64 + 2 * 64 * 64 + 64) + 64) as f64;
    let world = 4usize;
    let n = world as f64;
    for (stage, formula) in [
        (0u8, 16.0 * psi),
        (1, 4.0 * psi + 12.0 * psi / n),
        (2, 2.0 * psi + 14.0 * psi / n),
        (3, 16.0 * psi / n),
    ] {
        let mut config = config(stage, world);
        config.precision = Precision::Bf16;
        config.stage3_param_persistence_threshold = 0;
        let ranks = run_world(
            &spec,
            &Case {
                world,
                config,
                steps: 1,
                global_batch: 2 * world,
                ..Case::default()
            },
        );
        for rank in &ranks {
            let total = rank.memory.total() as f64;
            assert!(
                ((total - formula) / formula).abs() <= 0.05,
                "stage {stage}: held {total} bytes ({:?}) vs formula {formula}",
                rank.memory
            );
        }
    }
}

/// Trains `first` steps, snapshots `owned_state`, trains `then` more; a fresh engine
/// loaded from the snapshot must reproduce those last losses exactly.
fn state_round_trip(stage: u8, offload: bool) {
    state_round_trip_in(stage, |config| config.offload_optimizer_cpu = offload);
}

/// `state_round_trip` with the engine configuration changed by `adjust`.
fn state_round_trip_in(stage: u8, adjust: impl FnOnce(&mut EngineConfig)) {
    use crate::zero_support::{build_model, init_weights, make_tokens, run_micro_steps};
    use rsdeep_worker::comm::Communicator;
    use rsdeep_worker::zero::{LocalCommunicator, ZeroEngine};
    use std::sync::Arc;
    let spec = TinySpec::default();
    let world = 2;
    let mut config = config(stage, world);
    adjust(&mut config);
    let case = Case {
        world,
        config: config.clone(),
        steps: 5,
        global_batch: 4,
        ..Case::default()
    };
    let weights = init_weights(&spec);
    let tokens = make_tokens(&spec, 20);
    let comms: Vec<_> = LocalCommunicator::world(world)
        .into_iter()
        .zip(LocalCommunicator::world(world))
        .collect();
    let handles: Vec<_> = comms
        .into_iter()
        .map(|(first_comm, second_comm)| {
            let (case, tokens) = (case.clone(), tokens.copy());
            let weights: Vec<_> = weights.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
            std::thread::spawn(move || {
                let rank = first_comm.rank();
                let mut first = ZeroEngine::new(
                    build_model(&spec, &weights),
                    Arc::new(first_comm),
                    case.config.clone(),
                )
                .unwrap();
                for step in 0..3 {
                    run_micro_steps(&mut first, &spec, &case, &tokens, rank, step);
                    first.step().unwrap();
                }
                let state = first.owned_state().unwrap();
                let mut continued = Vec::new();
                for step in 3..5 {
                    run_micro_steps(&mut first, &spec, &case, &tokens, rank, step);
                    continued.push(first.step().unwrap().loss);
                }
                let mut second = ZeroEngine::new(
                    build_model(&spec, &weights),
                    Arc::new(second_comm),
                    case.config.clone(),
                )
                .unwrap();
                second.load_owned_state(&state).unwrap();
                let mut resumed = Vec::new();
                for step in 3..5 {
                    run_micro_steps(&mut second, &spec, &case, &tokens, rank, step);
                    resumed.push(second.step().unwrap().loss);
                }
                let eval_ids = tokens.narrow(0, 0, 2).narrow(1, 0, spec.seq);
                let ctx = rsdeep_worker::model::ForwardCtx::causal(&eval_ids).unwrap();
                let logits = (
                    first.forward_eval(&eval_ids, &ctx).unwrap(),
                    second.forward_eval(&eval_ids, &ctx).unwrap(),
                );
                (continued, resumed, state.optimizer_steps, logits)
            })
        })
        .collect();
    for handle in handles {
        let (continued, resumed, steps, (a, b)) = handle.join().unwrap();
        assert_eq!(steps, 3);
        assert_eq!(
            continued, resumed,
            "stage {stage}: resumed losses equal the uninterrupted run"
        );
        assert_eq!(a.size(), vec![2, spec.seq, spec.vocab]);
        assert_close(
            &a,
            &b,
            0.0,
            &format!("stage {stage}: eval logits after resume"),
        );
    }
}

#[test]
fn owned_state_round_trip_resumes_exactly() {
    tch::set_num_threads(1);
    for stage in [1u8, 3] {
        state_round_trip(stage, false);
    }
    state_round_trip(2, true);
}

#[test]
fn optimizer_offload_to_cpu_matches_the_plain_run() {
    tch::set_num_threads(1);
    let spec = TinySpec::default();
    let mut offloaded = config(2, 2);
    offloaded.offload_optimizer_cpu = true;
    let plain = run_world(
        &spec,
        &Case {
            world: 2,
            config: config(2, 2),
            steps: 4,
            global_batch: 4,
            ..Case::default()
        },
    );
    let moved = run_world(
        &spec,
        &Case {
            world: 2,
            config: offloaded,
            steps: 4,
            global_batch: 4,
            ..Case::default()
        },
    );
    for ((name, a), (_, b)) in plain[0].weights.iter().zip(&moved[0].weights) {
        assert_close(a, b, 0.0, &format!("offload: {name}"));
    }
}

/// NVMe optimizer offload (`optimizer_swap_dir`): at stages 1-3 on 2 ranks the losses and
/// weights equal the plain run's bit for bit, no optimizer byte stays in memory (they are
/// all in the swap files), and the files go with the engine. The plain fp32 run keeps no
/// master copy (its masters are the owned compute slice).
#[test]
fn optimizer_offload_to_nvme_matches_the_plain_run_and_holds_nothing_in_memory() {
    tch::set_num_threads(1);
    let spec = TinySpec::default();
    for stage in [1u8, 2, 3] {
        let run = |swap: Option<&std::path::Path>| {
            let mut config = config(stage, 2);
            config.optimizer_swap_dir = swap.map(std::path::Path::to_path_buf);
            let case = Case {
                world: 2,
                config,
                steps: 4,
                global_batch: 4,
                ..Case::default()
            };
            run_world(&spec, &case)
        };
        let swap = tempfile::tempdir().unwrap();
        let nvme_path = swap.path().join("nvme");
        let (plain, swapped) = (run(None), run(Some(&nvme_path)));
        for (rank, (a, b)) in plain.iter().zip(&swapped).enumerate() {
            let label = format!("stage {stage} rank {rank}");
            assert_eq!(a.losses, b.losses, "{label}: losses");
            for ((name, x), (_, y)) in a.weights.iter().zip(&b.weights) {
                assert_close(x, y, 0.0, &format!("{label}: {name}"));
            }
            if stage >= 2 {
                // fp32: per owned value two moments, as many bytes as two owned gradients.
                let plain = &a.memory;
                assert_eq!(
                    plain.optimizer_bytes,
                    2 * plain.grad_bytes,
                    "{label}: {plain:?}"
                );
            }
            assert_eq!(b.memory.optimizer_bytes, 0, "{label}: {:?}", b.memory);
            // The plain fp32 run keeps two moments (its masters are the compute slice,
            // counted with the parameters); the swap file holds a master copy as well.
            assert_eq!(
                b.memory.swapped_optimizer_bytes,
                a.memory.optimizer_bytes / 2 * 3,
                "{label}: every optimizer byte is in a file"
            );
        }
        let left: Vec<_> = std::fs::read_dir(&nvme_path).unwrap().collect();
        assert!(left.is_empty(), "stage {stage}: swap files left: {left:?}");
    }
}

/// A snapshot of a swapped engine (`owned_state`) loads into a swapped engine and
/// continues exactly as the uninterrupted one.
#[test]
fn owned_state_round_trip_resumes_exactly_with_nvme_offload() {
    tch::set_num_threads(1);
    let swap = tempfile::tempdir().unwrap();
    state_round_trip_in(3, |config| {
        config.optimizer_swap_dir = Some(swap.path().to_path_buf());
    });
}

#[test]
fn stage3_prefetch_respects_its_bucket_live_limit_and_persistence() {
    tch::set_num_threads(1);
    let spec = TinySpec::default(); // blocks of 128, 280, 280 and 8 elements, head tied
    let steps = 2;
    let run = |prefetch: usize, max_live: usize, persistence: usize| {
        let mut config = config(3, 2);
        config.stage3_prefetch_bucket_size = prefetch;
        config.stage3_max_live_parameters = max_live;
        config.stage3_param_persistence_threshold = persistence;
        run_world(
            &spec,
            &Case {
                world: 2,
                config,
                steps,
                global_batch: 4,
                ..Case::default()
            },
        )
        .remove(0)
    };
    let free = run(1 << 20, 1 << 20, 0);
    assert!(
        free.stage3.prefetches >= 4 * steps as u64,
        "{:?}",
        free.stage3
    );
    assert!(free.stage3.peak_live_numel > 300, "{:?}", free.stage3);
    let limited = run(1 << 20, 300, 0);
    assert!(
        limited.stage3.peak_live_numel <= 300,
        "max_live respected: {:?}",
        limited.stage3
    );
    assert!(limited.stage3.prefetches < free.stage3.prefetches);
    let no_prefetch = run(0, 1 << 20, 0);
    assert_eq!(no_prefetch.stage3.prefetches, 0);
    // every parameter persistent: each of the 4 blocks is gathered once per step
    let persistent = run(1 << 20, 1 << 20, 1 << 20);
    assert_eq!(
        persistent.stage3.gathers + persistent.stage3.prefetches,
        4 * steps as u64,
        "{:?}",
        persistent.stage3
    );
    for other in [&limited, &no_prefetch, &persistent] {
        assert_eq!(
            other.losses, free.losses,
            "gathering schedules do not change the math"
        );
    }
}
