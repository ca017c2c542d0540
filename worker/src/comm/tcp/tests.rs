//! Tests of the TCP ring against a naive reference: every operation and dtype, world
//! sizes 1..=8 and 16, element counts including 0, 1, primes and non-divisible ones;
//! results bit-identical across ranks; authentication and dead/hung peers.
//!
//! The reference reproduces the documented arithmetic exactly (see `schedule.rs`):
//! segment `k` is accumulated in ring order starting at rank `k+1`, each addition
//! rounded to the dtype, and `Avg` divides the final sum once. So results must match the
//! reference bit for bit, even with random non-integer inputs.

use super::schedule::balanced_segment;
use super::testing::{bind_listeners, run_world, run_world_on, test_options};
use crate::comm::{Communicator, ReduceOp};
use crate::{Error, Result};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

/// Rank `rank`'s input for case `case`: random values with varied magnitudes.
fn input_values(case: u64, rank: usize, numel: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(case * 1000 + rank as u64);
    (0..numel)
        .map(|_| rng.random_range(-1.0f32..1.0) * 2f32.powi(rng.random_range(-4..6)))
        .collect()
}

/// Rounds an f32 to `kind` and back (exact for the dtypes tested).
fn round_to(kind: Kind, x: f32) -> f32 {
    match kind {
        Kind::BFloat16 => bf16::from_f32(x).to_f32(),
        Kind::Half => f16::from_f32(x).to_f32(),
        _ => x,
    }
}

fn tensor_of(values: &[f32], kind: Kind) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(values)?.f_to_kind(kind)?)
}

fn values_of(tensor: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(&tensor.f_to_kind(Kind::Float)?)?)
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// The reduction of element `i` of segment `k` in ring order (`inputs[r][i]`).
fn ring_order_reduce(inputs: &[Vec<f32>], k: usize, i: usize, op: ReduceOp, kind: Kind) -> f32 {
    let world = inputs.len();
    let mut acc = inputs[(k + 1) % world][i];
    for step in 2..=world {
        let x = inputs[(k + step) % world][i];
        acc = match op {
            ReduceOp::Max if acc.is_nan() || acc > x => acc,
            ReduceOp::Max => x,
            _ => round_to(kind, acc + x),
        };
    }
    if op == ReduceOp::Avg {
        round_to(kind, acc / world as f32)
    } else {
        acc
    }
}

/// Reference all-reduce: element `i` belongs to the balanced segment containing it.
fn reference_all_reduce(inputs: &[Vec<f32>], op: ReduceOp, kind: Kind) -> Vec<f32> {
    let (world, numel) = (inputs.len(), inputs[0].len());
    let segment_of = |i: usize| {
        (0..world).find(|&k| {
            let (offset, len) = balanced_segment(numel, world, k);
            i >= offset && i < offset + len
        })
    };
    (0..numel)
        .map(|i| ring_order_reduce(inputs, segment_of(i).unwrap_or(0), i, op, kind))
        .collect()
}

#[derive(Debug, Clone, Copy)]
enum Case {
    AllReduce(ReduceOp),
    ReduceScatter(ReduceOp),
    AllGather,
    Broadcast(usize),
}

/// Runs one collective on this rank; returns (its result, the reference result).
fn run_case(
    comm: &dyn Communicator,
    case: Case,
    seed: u64,
    kind: Kind,
    count: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let in_numel = match case {
        Case::ReduceScatter(_) => count * world,
        _ => count,
    };
    // Inputs as every rank holds them (already rounded to the dtype).
    let inputs: Vec<Vec<f32>> = (0..world)
        .map(|r| {
            input_values(seed, r, in_numel)
                .into_iter()
                .map(|x| round_to(kind, x))
                .collect()
        })
        .collect();
    let mine = tensor_of(&inputs[rank], kind)?;
    match case {
        Case::AllReduce(op) => {
            comm.all_reduce(&mine, op)?.wait()?;
            Ok((values_of(&mine)?, reference_all_reduce(&inputs, op, kind)))
        }
        Case::ReduceScatter(op) => {
            let output = Tensor::f_full([count as i64], -7.0, (kind, tch::Device::Cpu))?;
            comm.reduce_scatter(&mine, &output, op)?.wait()?;
            assert_eq!(
                bits(&values_of(&mine)?),
                bits(&inputs[rank]),
                "reduce_scatter leaves its input untouched"
            );
            let expected = (0..count)
                .map(|i| ring_order_reduce(&inputs, rank, rank * count + i, op, kind))
                .collect();
            Ok((values_of(&output)?, expected))
        }
        Case::AllGather => {
            let output = Tensor::f_full([(count * world) as i64], -7.0, (kind, tch::Device::Cpu))?;
            comm.all_gather(&mine, &output)?.wait()?;
            Ok((values_of(&output)?, inputs.concat()))
        }
        Case::Broadcast(root) => {
            comm.broadcast(&mine, root % world)?.wait()?;
            Ok((values_of(&mine)?, inputs[root % world].clone()))
        }
    }
}

fn all_cases(world: usize) -> Vec<Case> {
    let mut cases = Vec::new();
    for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
        cases.push(Case::AllReduce(op));
        cases.push(Case::ReduceScatter(op));
    }
    cases.push(Case::AllGather);
    cases.push(Case::Broadcast(0));
    cases.push(Case::Broadcast(world.saturating_sub(1)));
    cases
}

/// Every case x dtype x count on one world; asserts reference equality on every rank
/// and bit-identical results across ranks.
fn check_world(world: usize, counts: &[usize], kinds: &[Kind], chunk_bytes: usize) -> Result<()> {
    check_world_with(world, counts, kinds, test_options(chunk_bytes))
}

/// `check_world` with any options (the shared-memory tests use it too).
pub(super) fn check_world_with(
    world: usize,
    counts: &[usize],
    kinds: &[Kind],
    options: super::TcpOptions,
) -> Result<()> {
    let (counts, kinds) = (counts.to_vec(), kinds.to_vec());
    let results = run_world(world, options, move |_rank, comm| {
        let mut outputs = Vec::new();
        let mut seed = 0u64;
        for &kind in &kinds {
            for &count in &counts {
                for case in all_cases(world) {
                    seed += 1;
                    let (got, expected) = run_case(&comm, case, seed, kind, count)?;
                    let label = format!(
                        "world {world} {case:?} {kind:?} count {count} rank {}",
                        comm.rank()
                    );
                    assert_eq!(got.len(), expected.len(), "{label}: length");
                    assert!(
                        bits(&got) == bits(&expected),
                        "{label}: differs from the reference\n got {got:?}\nwant {expected:?}"
                    );
                    outputs.push((label, bits(&got)));
                }
            }
        }
        Ok(outputs)
    })?;
    let per_rank: Vec<Vec<(String, Vec<u32>)>> = results.into_iter().collect::<Result<_>>()?;
    for (case_index, (label, rank0)) in per_rank[0].iter().enumerate() {
        for other in &per_rank[1..] {
            let (_, bits_other) = &other[case_index];
            let shared_result = !label.contains("ReduceScatter");
            if shared_result {
                assert_eq!(rank0, bits_other, "{label}: ranks disagree");
            }
        }
    }
    Ok(())
}

pub(super) const KINDS: [Kind; 3] = [Kind::Float, Kind::BFloat16, Kind::Half];

#[test]
fn matches_reference_for_world_sizes_1_to_8() -> Result<()> {
    let counts = [0usize, 1, 2, 7, 13, 64, 1009];
    for world in 1..=8 {
        check_world(world, &counts, &KINDS, 64)?;
    }
    Ok(())
}

#[test]
fn matches_reference_for_world_16_and_random_counts() -> Result<()> {
    check_world(16, &[0, 1, 17, 31], &[Kind::Float, Kind::BFloat16], 32)?;
    let mut rng = StdRng::seed_from_u64(42);
    for _ in 0..4 {
        let world = rng.random_range(2..=6);
        let counts: Vec<usize> = (0..3).map(|_| rng.random_range(0..5000)).collect();
        let chunk = 8 * rng.random_range(1..512);
        check_world(world, &counts, &KINDS, chunk)?;
    }
    Ok(())
}

#[test]
fn integer_and_double_reductions_are_exact() -> Result<()> {
    let results = run_world(3, test_options(40), |rank, comm| {
        let ints =
            Tensor::f_from_slice(&[rank as i64 + 1, -(rank as i64), i64::from(rank == 2) * 100])?;
        comm.all_reduce(&ints, ReduceOp::Sum)?.wait()?;
        let maxes = Tensor::f_from_slice(&[rank as i64, -(rank as i64)])?;
        comm.all_reduce(&maxes, ReduceOp::Max)?.wait()?;
        let doubles = Tensor::f_from_slice(&[0.5f64 * rank as f64; 5])?;
        comm.all_reduce(&doubles, ReduceOp::Avg)?.wait()?;
        assert!(
            comm.all_reduce(&ints, ReduceOp::Avg).is_err(),
            "Avg on integers is refused"
        );
        Ok((
            Vec::<i64>::try_from(&ints)?,
            Vec::<i64>::try_from(&maxes)?,
            Vec::<f64>::try_from(&doubles)?,
        ))
    })?;
    for result in results {
        let (ints, maxes, doubles) = result?;
        assert_eq!(ints, vec![6, -3, 100]);
        assert_eq!(maxes, vec![2, 0]);
        assert_eq!(doubles, vec![0.5; 5]);
    }
    Ok(())
}

#[test]
fn work_is_asynchronous_and_ordered() -> Result<()> {
    let results = run_world(3, test_options(1024), |rank, comm| {
        let tensors: Vec<Tensor> = (0..6)
            .map(|i| {
                Tensor::f_full(
                    [1000 + i],
                    (rank + 1) as f64,
                    (Kind::Float, tch::Device::Cpu),
                )
            })
            .collect::<std::result::Result<_, _>>()?;
        // Issue everything first, wait afterwards: the comm thread runs them in order.
        let works = tensors
            .iter()
            .map(|t| comm.all_reduce(t, ReduceOp::Sum))
            .collect::<Result<Vec<_>>>()?;
        works.into_iter().try_for_each(|w| w.wait())?;
        comm.barrier()?;
        tensors
            .iter()
            .map(|t| Ok(t.f_sum(Kind::Double)?.f_double_value(&[])?))
            .collect::<Result<Vec<f64>>>()
    })?;
    for result in results {
        let sums = result?;
        let expected: Vec<f64> = (0..6).map(|i| 6.0 * (1000 + i) as f64).collect();
        assert_eq!(sums, expected);
    }
    Ok(())
}

#[test]
fn rejects_bad_arguments_synchronously() -> Result<()> {
    let results = run_world(2, test_options(64), |_rank, comm| {
        let input = Tensor::f_zeros([5], (Kind::Float, tch::Device::Cpu))?;
        let output = Tensor::f_zeros([3], (Kind::Float, tch::Device::Cpu))?;
        let strided = Tensor::f_zeros([4, 4], (Kind::Float, tch::Device::Cpu))?.f_t_()?;
        let bools = Tensor::f_zeros([4], (Kind::Bool, tch::Device::Cpu))?;
        let errors = [
            comm.reduce_scatter(&input, &output, ReduceOp::Sum).err(),
            comm.all_gather(&output, &input).err(),
            comm.all_reduce(&strided, ReduceOp::Sum).err(),
            comm.all_reduce(&bools, ReduceOp::Sum).err(),
            comm.broadcast(&input, 2).err(),
        ];
        // The ring is still usable after refused calls (nothing was sent).
        comm.barrier()?;
        Ok(errors.iter().all(|e| matches!(e, Some(Error::Comm { .. }))))
    })?;
    for result in results {
        assert!(result?, "every bad call returns Error::Comm");
    }
    Ok(())
}

/// A hello with the right format but `token`, claiming `rank` of `world`.
fn forged_hello(rank: u32, world: u32, token: &str) -> Vec<u8> {
    let mut bytes = b"RSDPRNG1".to_vec();
    bytes.extend_from_slice(&rank.to_le_bytes());
    bytes.extend_from_slice(&world.to_le_bytes());
    bytes.extend_from_slice(&(token.len() as u32).to_le_bytes());
    bytes.extend_from_slice(token.as_bytes());
    bytes
}

#[test]
fn intruders_are_dropped_and_never_reduced() -> Result<()> {
    intruders_are_dropped_with(test_options(256))
}

/// Intruders queue on a listener before the real neighbour; only real ranks are summed.
pub(super) fn intruders_are_dropped_with(options: super::TcpOptions) -> Result<()> {
    let (listeners, addrs) = bind_listeners(3)?;
    // Three intruders queue on rank 1's listener before its real neighbour (rank 0):
    // garbage, a forged hello with the wrong token, and the right token claiming rank 2.
    let mut intruders = Vec::new();
    for payload in [
        b"GARBAGE GARBAGE GARBAGE".to_vec(),
        forged_hello(0, 3, "wrong-token"),
        forged_hello(2, 3, "test-token"),
    ] {
        let mut stream = std::net::TcpStream::connect(&addrs[1])
            .map_err(|e| Error::io("intruder connect", e))?;
        stream
            .write_all(&payload)
            .map_err(|e| Error::io("intruder write", e))?;
        // Then a flood of huge values that would poison any sum they entered.
        let _ = stream.write_all(&vec![0x7fu8; 1 << 16]);
        intruders.push(stream);
    }
    let results = run_world_on(listeners, addrs, options, |rank, comm| {
        let t = Tensor::f_full([4096], (rank + 1) as f64, (Kind::Float, tch::Device::Cpu))?;
        comm.all_reduce(&t, ReduceOp::Sum)?.wait()?;
        Ok(Vec::<f32>::try_from(&t)?)
    });
    for result in results {
        assert!(
            result?.iter().all(|&x| x == 6.0),
            "only the three real ranks were summed"
        );
    }
    drop(intruders);
    Ok(())
}

#[test]
fn wrong_token_cannot_form_a_ring() -> Result<()> {
    let (mut listeners, addrs) = bind_listeners(2)?;
    let missing = || Error::Engine("bind_listeners returned too few".into());
    let listener1 = listeners.pop().ok_or_else(missing)?;
    let listener0 = listeners.pop().ok_or_else(missing)?;
    let mut options = test_options(64);
    options.connect_timeout = Duration::from_secs(2);
    let addrs1 = addrs.clone();
    let options1 = options.clone();
    let impostor = std::thread::spawn(move || {
        super::TcpComm::connect(1, 2, &addrs1, listener1, "not-the-token", options1).err()
    });
    let honest = super::TcpComm::connect(0, 2, &addrs, listener0, "test-token", options);
    let impostor_error = impostor.join().unwrap_or(None);
    assert!(
        honest.is_err(),
        "rank 0 must not accept a neighbour without the job token"
    );
    assert!(
        impostor_error.is_some(),
        "and the impostor must not accept rank 0 either"
    );
    Ok(())
}

/// Runs a 4-rank world where rank 2 leaves after one good collective (after `linger`),
/// while the others start a large all-reduce; returns each survivor's error and delay.
pub(super) fn survivors_of_rank_2_leaving(
    linger: Duration,
    options: super::TcpOptions,
) -> Result<Vec<(usize, String, Duration)>> {
    let results = run_world(4, options, move |rank, comm| {
        let warmup = Tensor::f_ones([100], (Kind::Float, tch::Device::Cpu))?;
        comm.all_reduce(&warmup, ReduceOp::Sum)?.wait()?;
        if rank == 2 {
            std::thread::sleep(linger);
            drop(comm);
            return Ok(None);
        }
        let big = Tensor::f_ones([1 << 20], (Kind::Float, tch::Device::Cpu))?;
        let started = Instant::now();
        let outcome = comm.all_reduce(&big, ReduceOp::Sum)?.wait();
        let error = outcome.err().map(|e| e.to_string()).unwrap_or_default();
        // A broken communicator refuses later work at once instead of hanging.
        let refused = comm.barrier().is_err();
        Ok(Some((
            rank,
            format!("{error} | later barrier refused: {refused}"),
            started.elapsed(),
        )))
    })?;
    Ok(results
        .into_iter()
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect())
}

pub(super) fn assert_failed_in_time(survivors: &[(usize, String, Duration)], bound: Duration) {
    assert_eq!(survivors.len(), 3);
    for (rank, error, elapsed) in survivors {
        assert!(
            error.contains("collective all_reduce failed on rank"),
            "rank {rank}: {error}"
        );
        assert!(
            error.contains("peer rank"),
            "rank {rank} names a peer: {error}"
        );
        assert!(
            error.contains("later barrier refused: true"),
            "rank {rank}: {error}"
        );
        assert!(
            *elapsed < bound,
            "rank {rank} failed after {elapsed:?}, bound {bound:?}"
        );
    }
    let reader_of_2 = survivors.iter().find(|(rank, ..)| *rank == 3);
    assert!(
        reader_of_2.is_some_and(|(_, e, _)| e.contains("peer rank 2")),
        "rank 3 names rank 2: {survivors:?}"
    );
}

#[test]
fn dead_peer_fails_every_rank_quickly() -> Result<()> {
    let survivors = survivors_of_rank_2_leaving(Duration::from_millis(50), test_options(64 << 10))?;
    // The dead peer's sockets close at once: far quicker than the 2 s op timeout.
    assert_failed_in_time(&survivors, Duration::from_millis(1500));
    Ok(())
}

#[test]
fn hung_peer_fails_every_rank_within_the_timeout() -> Result<()> {
    let survivors = survivors_of_rank_2_leaving(Duration::from_secs(6), test_options(64 << 10))?;
    // Rank 3 times out after 2 s and closes its links; the others learn it from there.
    assert_failed_in_time(&survivors, Duration::from_secs(5));
    let timed_out = survivors
        .iter()
        .any(|(rank, e, _)| *rank == 3 && e.contains("no data from peer rank 2"));
    assert!(
        timed_out,
        "rank 3 reports the timeout on rank 2: {survivors:?}"
    );
    Ok(())
}

/// Environment of a child rank: `rank;world;addr0,addr1,...;shared_memory`.
const CHILD_ENV: &str = "RSDEEP_COMM_TEST_CHILD";

#[test]
fn separate_processes_match_reference() -> Result<()> {
    separate_processes_match_reference_with(false)
}

/// Three child processes run every case; `shared_memory` picks their transport (each
/// child asserts it got the one asked for).
pub(super) fn separate_processes_match_reference_with(shared_memory: bool) -> Result<()> {
    let world = 3;
    let (listeners, addrs) = bind_listeners(world)?;
    drop(listeners); // each child process binds its own address again
    let exe = std::env::current_exe().map_err(|e| Error::io("current_exe", e))?;
    let mut children = Vec::new();
    for rank in 0..world {
        let child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "comm::tcp::tests::child_rank",
                "--ignored",
                "--test-threads=1",
            ])
            .env(
                CHILD_ENV,
                format!("{rank};{world};{};{shared_memory}", addrs.join(",")),
            )
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| Error::io("spawning a child rank", e))?;
        children.push(child);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    for (rank, mut child) in children.into_iter().enumerate() {
        let status = loop {
            match child
                .try_wait()
                .map_err(|e| Error::io("waiting for a child rank", e))?
            {
                Some(status) => break Some(status),
                None if Instant::now() > deadline => break None,
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        if status.is_none() {
            let _ = child.kill();
        }
        assert!(
            status.is_some_and(|s| s.success()),
            "child rank {rank} failed or hung: {status:?}"
        );
        // Guard against a filter that matches nothing (which would also exit 0).
        let mut report = String::new();
        if let Some(mut stdout) = child.stdout.take() {
            std::io::Read::read_to_string(&mut stdout, &mut report)
                .map_err(|e| Error::io("child stdout", e))?;
        }
        assert!(
            report.contains("1 passed"),
            "child rank {rank} did not run its test: {report}"
        );
    }
    Ok(())
}

/// One rank of `separate_processes_match_reference`, in its own process.
#[test]
#[ignore = "child process of separate_processes_match_reference; fails without RSDEEP_COMM_TEST_CHILD"]
fn child_rank() -> Result<()> {
    let spec =
        std::env::var(CHILD_ENV).map_err(|_| Error::Config(format!("{CHILD_ENV} is not set")))?;
    let fields: Vec<&str> = spec.split(';').collect();
    let parse = |text: &str| {
        text.parse::<usize>()
            .map_err(|e| Error::Config(format!("{CHILD_ENV}: {e}")))
    };
    let (rank, world) = (
        parse(fields.first().copied().unwrap_or(""))?,
        parse(fields.get(1).copied().unwrap_or(""))?,
    );
    let addrs: Vec<String> = fields
        .get(2)
        .map(|a| a.split(',').map(String::from).collect())
        .unwrap_or_default();
    let listener = std::net::TcpListener::bind(addrs.get(rank).map(String::as_str).unwrap_or(""))
        .map_err(|e| Error::io("binding the child's address", e))?;
    let shared_memory = fields.get(3) == Some(&"true");
    let mut options = test_options(128);
    if shared_memory {
        options.shared_memory_slot_bytes = Some(96);
    }
    let comm = super::TcpComm::connect(rank, world, &addrs, listener, "test-token", options)?;
    assert_eq!(
        comm.uses_shared_memory(),
        shared_memory,
        "rank {rank} runs on the transport asked for"
    );
    let mut seed = 10_000u64;
    for kind in KINDS {
        for count in [0usize, 1, 5, 1031] {
            for case in all_cases(world) {
                seed += 1;
                let (got, expected) = run_case(&comm, case, seed, kind, count)?;
                assert!(
                    bits(&got) == bits(&expected),
                    "rank {rank} {case:?} {kind:?} {count}: differs from the reference"
                );
            }
        }
    }
    Ok(())
}
