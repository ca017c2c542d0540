//! `rsdeep-comm-bench`: one rank of the TCP-ring collective benchmark (driven by
//! `benches/comm/run.sh`, which also runs the gloo baseline and prints the comparison;
//! results are recorded in docs/comm-bench.md). For every size it times all_reduce,
//! reduce_scatter and all_gather on f32 tensors and rank 0 prints one TSV line per
//! (op, size): `impl op bytes iters usec algbw_GBps busbw_GBps`, with nccl-tests'
//! definitions (algbw = S/t; busbw = algbw * 2(n-1)/n for all_reduce, (n-1)/n otherwise;
//! S = the larger buffer). `--check` also verifies every result across processes.

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use rsdeep_worker::comm::{Communicator, ReduceOp, TcpComm, TcpOptions};
use std::net::TcpListener;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

#[derive(Parser, Debug)]
#[command(about = "One rank of the TCP-ring collective benchmark")]
struct Args {
    #[arg(long)]
    rank: usize,
    #[arg(long)]
    world: usize,
    /// Comma-separated, rank-ordered host:port of every rank.
    #[arg(long, value_delimiter = ',')]
    addrs: Vec<String>,
    #[arg(long, default_value = "bench-token")]
    token: String,
    #[arg(long, default_value_t = 1024)]
    min_bytes: usize,
    #[arg(long, default_value_t = 256 << 20)]
    max_bytes: usize,
    /// Bytes moved per size and op (sets the iteration count; at least 3 iterations).
    #[arg(long, default_value_t = 64 << 20)]
    budget_bytes: usize,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "all_reduce,reduce_scatter,all_gather"
    )]
    ops: Vec<String>,
    #[arg(long, default_value_t = TcpOptions::default().chunk_bytes)]
    chunk_bytes: usize,
    /// SO_SNDBUF/SO_RCVBUF; 0 keeps the kernel's autotuning.
    #[arg(long, default_value_t = TcpOptions::default().socket_buffer_bytes.unwrap_or(0))]
    socket_buffer: usize,
    /// Shared-memory slot bytes per rank when all ranks are on this host; 0 keeps every
    /// collective on the TCP ring.
    #[arg(long, default_value_t = TcpOptions::default().shared_memory_slot_bytes.unwrap_or(0))]
    shm_slot_bytes: usize,
    /// Verify each operation's result once per size (untimed).
    #[arg(long)]
    check: bool,
}

/// The tensors for one op at one size `bytes` (the larger buffer).
struct Buffers {
    input: Tensor,
    output: Tensor,
}

fn buffers(op: &str, bytes: usize, world: usize) -> Result<Buffers> {
    let numel = (bytes / 4) as i64;
    let piece = numel / world as i64;
    let zeros = |n: i64| Tensor::f_zeros([n], (Kind::Float, Device::Cpu));
    Ok(match op {
        "all_reduce" => Buffers {
            input: zeros(numel)?,
            output: zeros(0)?,
        },
        "reduce_scatter" => Buffers {
            input: zeros(piece * world as i64)?,
            output: zeros(piece)?,
        },
        "all_gather" => Buffers {
            input: zeros(piece)?,
            output: zeros(piece * world as i64)?,
        },
        other => bail!("unknown op {other}"),
    })
}

fn run_op(comm: &dyn Communicator, op: &str, b: &Buffers) -> Result<()> {
    let work = match op {
        "all_reduce" => comm.all_reduce(&b.input, ReduceOp::Sum)?,
        "reduce_scatter" => comm.reduce_scatter(&b.input, &b.output, ReduceOp::Sum)?,
        _ => comm.all_gather(&b.input, &b.output)?,
    };
    Ok(work.wait()?)
}

/// Fills inputs with `rank + 1`, runs once, and checks the exact expected values.
fn check(comm: &dyn Communicator, op: &str, b: &Buffers) -> Result<()> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let _ = b.input.shallow_clone().f_fill_((rank + 1) as f64)?;
    run_op(comm, op, b)?;
    let total = (world * (world + 1) / 2) as f64;
    let ok = match op {
        "all_reduce" => b.input.f_eq(total)?.f_all()?.f_int64_value(&[])? == 1,
        "reduce_scatter" => b.output.f_eq(total)?.f_all()?.f_int64_value(&[])? == 1,
        _ => {
            let ranks = Tensor::f_arange_start(1, world as i64 + 1, (Kind::Float, Device::Cpu))?;
            let expected = ranks.f_repeat_interleave_self_int(b.input.numel() as i64, 0, None)?;
            b.output.f_equal(&expected)?
        }
    };
    ensure!(
        ok,
        "{op} of {} bytes produced wrong values on rank {rank}",
        b.input.numel() * 4
    );
    Ok(())
}

fn bus_factor(op: &str, world: usize) -> f64 {
    let n = world as f64;
    if op == "all_reduce" {
        2.0 * (n - 1.0) / n
    } else {
        (n - 1.0) / n
    }
}

/// Mean seconds per op over `iters` back-to-back runs, after a warm-up.
fn time_op(comm: &dyn Communicator, op: &str, b: &Buffers, iters: usize) -> Result<f64> {
    run_op(comm, op, b)?;
    comm.barrier()?;
    let started = Instant::now();
    for _ in 0..iters {
        run_op(comm, op, b)?;
    }
    comm.barrier()?;
    Ok(started.elapsed().as_secs_f64() / iters as f64)
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.addrs.len() == args.world,
        "--addrs must list {} addresses",
        args.world
    );
    let listener = TcpListener::bind(&args.addrs[args.rank])
        .with_context(|| format!("binding {}", args.addrs[args.rank]))?;
    let options = TcpOptions {
        chunk_bytes: args.chunk_bytes,
        socket_buffer_bytes: (args.socket_buffer > 0).then_some(args.socket_buffer),
        shared_memory_slot_bytes: (args.shm_slot_bytes > 0).then_some(args.shm_slot_bytes),
        connect_timeout: Duration::from_secs(60),
        ..TcpOptions::default()
    };
    let comm = TcpComm::connect(
        args.rank,
        args.world,
        &args.addrs,
        listener,
        &args.token,
        options,
    )
    .context("forming the ring")?;
    let transport = if comm.uses_shared_memory() {
        "shared memory"
    } else {
        "TCP ring"
    };
    eprintln!("rank {}: transport {transport}", args.rank);
    let mut bytes = args.min_bytes;
    while bytes <= args.max_bytes {
        for op in &args.ops {
            let b = buffers(op, bytes, args.world)?;
            if args.check {
                check(&comm, op, &b)?;
            }
            let iters = (args.budget_bytes / bytes).clamp(3, 200);
            let seconds = time_op(&comm, op, &b, iters)?;
            let size = b.input.numel().max(b.output.numel()) * 4;
            let algbw = size as f64 / seconds / 1e9;
            if args.rank == 0 {
                let busbw = algbw * bus_factor(op, args.world);
                println!(
                    "rsdeep\t{op}\t{size}\t{iters}\t{:.1}\t{algbw:.3}\t{busbw:.3}",
                    seconds * 1e6
                );
            }
        }
        bytes *= 2;
    }
    Ok(())
}
