//! Tests of the shared-memory transport (`shm.rs`) through `TcpComm`: the same reference
//! as the TCP ring (bit for bit, so both transports agree), tiny slots so that every
//! collective runs many rounds, the all-or-nothing negotiation, the area's unlinking,
//! separate processes, intruders, dead and hung peers, and collectives out of step.

use super::TcpComm;
use super::testing::{bind_listeners, run_world, test_options};
use super::tests::{
    KINDS, assert_failed_in_time, check_world_with, intruders_are_dropped_with,
    separate_processes_match_reference_with, survivors_of_rank_2_leaving,
};
use crate::comm::{Communicator, ReduceOp};
use crate::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;
use tch::{Kind, Tensor};

fn shm_options(slot_bytes: usize) -> super::TcpOptions {
    let mut options = test_options(256);
    options.shared_memory_slot_bytes = Some(slot_bytes);
    options
}

#[test]
fn shared_memory_matches_reference_for_world_sizes_2_to_8() -> Result<()> {
    let counts = [0usize, 1, 2, 7, 13, 64, 1009];
    for world in [2, 3, 5, 8] {
        check_world_with(world, &counts, &KINDS, shm_options(256))?;
    }
    Ok(())
}

#[test]
fn shared_memory_matches_reference_for_random_worlds_and_slots() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..4 {
        let world = rng.random_range(2..=6);
        let counts: Vec<usize> = (0..3).map(|_| rng.random_range(0..5000)).collect();
        let slot = rng.random_range(1..4096);
        check_world_with(world, &counts, &KINDS, shm_options(slot))?;
    }
    Ok(())
}

/// Forms a world where `shm_off` ranks turn shared memory off; every rank's transport
/// flag and the sum of an all-reduce.
fn transports_with(world: usize, shm_off: &[usize]) -> Result<Vec<(bool, Vec<f32>)>> {
    let (listeners, addrs) = bind_listeners(world)?;
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let addrs = addrs.clone();
            let options = if shm_off.contains(&rank) {
                test_options(256)
            } else {
                shm_options(256)
            };
            std::thread::spawn(move || -> Result<(bool, Vec<f32>)> {
                let comm = TcpComm::connect(rank, world, &addrs, listener, "test-token", options)?;
                let t = Tensor::f_full([300], (rank + 1) as f64, (Kind::Float, tch::Device::Cpu))?;
                comm.all_reduce(&t, ReduceOp::Sum)?.wait()?;
                Ok((comm.uses_shared_memory(), Vec::<f32>::try_from(&t)?))
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(Error::Engine("rank panicked".into())))
        })
        .collect()
}

#[test]
fn shared_memory_is_used_only_when_every_rank_maps_it() -> Result<()> {
    for (shm_off, expect_shared) in [(vec![], true), (vec![1], false), (vec![0], false)] {
        for (rank, result) in transports_with(3, &shm_off)?.into_iter().enumerate() {
            assert_eq!(
                result.0, expect_shared,
                "rank {rank} with shared memory off on {shm_off:?}"
            );
            assert!(result.1.iter().all(|&x| x == 6.0), "rank {rank} sums right");
        }
    }
    Ok(())
}

/// The mappings of shared-memory areas in this process, from /proc/self/maps.
fn mapped_areas() -> Result<Vec<String>> {
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| Error::io("maps", e))?;
    Ok(maps
        .lines()
        .filter(|line| line.contains("/dev/shm/rsdeep-comm-"))
        .map(String::from)
        .collect())
}

#[test]
fn shared_area_is_unlinked_once_every_rank_has_it() -> Result<()> {
    let results = run_world(2, shm_options(4096), |_rank, comm| {
        assert!(comm.uses_shared_memory());
        // Other tests in this process may be between create and unlink for a moment.
        let mut areas = Vec::new();
        for _ in 0..50 {
            areas = mapped_areas()?;
            if areas.iter().all(|line| line.ends_with("(deleted)")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        comm.barrier()?;
        Ok(areas)
    })?;
    for result in results {
        let areas = result?;
        assert!(!areas.is_empty(), "the area is mapped");
        assert!(
            areas.iter().all(|line| line.ends_with("(deleted)")),
            "no area stays visible in /dev/shm: {areas:?}"
        );
    }
    Ok(())
}

#[test]
fn shared_memory_in_separate_processes_matches_reference() -> Result<()> {
    separate_processes_match_reference_with(true)
}

#[test]
fn intruders_never_reach_shared_memory() -> Result<()> {
    intruders_are_dropped_with(shm_options(512))
}

#[test]
fn dead_peer_fails_every_shared_memory_rank_quickly() -> Result<()> {
    let survivors = survivors_of_rank_2_leaving(Duration::from_millis(50), shm_options(64 << 10))?;
    assert_failed_in_time(&survivors, Duration::from_millis(1500));
    Ok(())
}

#[test]
fn hung_peer_fails_every_shared_memory_rank_within_the_timeout() -> Result<()> {
    let survivors = survivors_of_rank_2_leaving(Duration::from_secs(6), shm_options(64 << 10))?;
    assert_failed_in_time(&survivors, Duration::from_secs(5));
    for (rank, error, _) in &survivors {
        assert!(
            error.contains("no data from peer rank 2"),
            "rank {rank} names the hung rank: {error}"
        );
    }
    Ok(())
}

#[test]
fn collectives_out_of_step_fail_on_shared_memory() -> Result<()> {
    let results = run_world(2, shm_options(64), |rank, comm| {
        let t = Tensor::f_ones([10 * (rank as i64 + 1)], (Kind::Float, tch::Device::Cpu))?;
        let error = comm.all_reduce(&t, ReduceOp::Sum)?.wait().err();
        Ok(error.map(|e| e.to_string()).unwrap_or_default())
    })?;
    for (rank, result) in results.into_iter().enumerate() {
        let error = result?;
        assert!(
            error.contains("out of step") || error.contains("abandoned"),
            "rank {rank}: {error}"
        );
    }
    Ok(())
}
