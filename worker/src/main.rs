//! `rsdeep-worker`: started by the `rsdeep` launcher, one per device. Reads the
//! environment contract (`rsdeep_contract::env`), joins the rendezvous, then runs either
//! the diagnostic selftest (`RSDEEP_SELFTEST=1`) or training (`run_training`). Exit
//! codes: 0 success, 1 any error (also reported to the launcher when it can be).

use std::net::TcpListener;
use std::time::Duration;

use anyhow::{Context, Result};
use rsdeep_worker::rendezvous::{Rendezvous, WorkerEnv, World, join_world};
use tracing::{info, info_span, warn};

/// How long selftest waits for the store and the barrier.
const SELFTEST_WAIT: Duration = Duration::from_secs(120);

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if let Some(code) = run_tool(&argv) {
        std::process::exit(code);
    }
    let env = match WorkerEnv::from_env() {
        Ok(env) => env,
        Err(e) => {
            eprintln!("rsdeep-worker: error: {e}");
            std::process::exit(1);
        }
    };
    init_tracing();
    keep_training_buffers_on_the_heap();
    let _span = info_span!("worker", rank = env.rank).entered();
    let code = match run(&env) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("rsdeep-worker rank {}: error: {e:#}", env.rank);
            1
        }
    };
    exit_skipping_static_destructors(code);
}

/// Makes glibc serve the step's large transient tensors (activations, logits tiles,
/// flattened gradients: 1-32 MiB each, allocated and freed every micro-step) from the heap
/// instead of fresh `mmap`s, and keep up to 128 MiB of freed heap before trimming: by
/// default each such buffer was a new mapping whose pages faulted in zeroed every step.
/// On the ZeRO benchmark this halves the page faults and cuts ~3% of the CPU per step,
/// peak RSS unchanged (docs/benchmarks.md §1e). The engine build still returns memory
/// explicitly (`malloc_trim` in `zero/build.rs`).
fn keep_training_buffers_on_the_heap() {
    // SAFETY: mallopt only changes glibc allocator thresholds; called once at start-up,
    // before any thread of ours exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

/// Ends the process after flushing stdout/stderr, without running C++ static destructors:
/// libtorch's and the CUDA libraries' (cusparseLt, libtorch_cuda, ...) touch ~100 MB of
/// their pages on the way out, which set the worker's peak RSS (VmHWM) after training.
/// Everything the run writes is closed and synced before `run` returns.
fn exit_skipping_static_destructors(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` ends the process immediately; nothing runs after it.
    unsafe { libc::_exit(code) }
}

/// The worker's offline tools (the launcher forwards `rsdeep tokenizer|consolidate|convert ...`
/// here, since they need libtorch or the tokenizer): Some(exit code) when `argv` names one.
fn run_tool(argv: &[String]) -> Option<i32> {
    let tool = argv.get(1)?.as_str();
    let rest = &argv[2..];
    let result: Result<()> = match tool {
        "tokenizer" => rsdeep_worker::tokenizer::cli::run(rest).map_err(Into::into),
        "consolidate" => rsdeep_worker::checkpoint::consolidate_cli(rest),
        "generate" => rsdeep_worker::generate::generate_cli(rest),
        "merge-lora" => rsdeep_worker::lora::merge_lora_cli(rest),
        "convert" => rsdeep_worker::convert::convert_cli(rest),
        _ => return None,
    };
    Some(match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("rsdeep {tool}: error: {e:#}");
            1
        }
    })
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env(rsdeep_contract::env::LOG)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .init();
}

fn run(env: &WorkerEnv) -> Result<()> {
    let (rendezvous, world, listener) = join_world(env).context("rendezvous")?;
    info!(
        generation = world.generation,
        world_size = world.world_size,
        "joined the rendezvous"
    );
    let result = if env.selftest {
        selftest(&rendezvous, &world)
    } else {
        run_training(env, &rendezvous, world, listener)
    };
    if let Err(e) = &result
        && let Err(report) = rendezvous.report_error(&format!("{e:#}"), caused_by_another_rank(e))
    {
        warn!("could not report the error to the launcher: {report}");
    }
    result
}

/// Whether the worker library's error behind `e` only follows another rank's failure.
fn caused_by_another_rank(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|cause| cause.downcast_ref::<rsdeep_worker::Error>())
        .any(rsdeep_worker::Error::is_caused_by_another_rank)
}

/// The training entry point: builds the communicator from `world` + `listener`, loads
/// `env.config` and runs the engine. Filled in by the engine work.
fn run_training(
    env: &WorkerEnv,
    rendezvous: &Rendezvous,
    world: World,
    listener: TcpListener,
) -> Result<()> {
    let rank = world.rank;
    let summary = rsdeep_worker::train::train_from_launcher(env, rendezvous, world, listener)
        .context("training")?;
    if rank == 0 {
        info!(
            steps = summary.steps,
            first_loss = summary.first_loss,
            last_loss = summary.last_loss,
            eval_loss = summary.final_eval_loss,
            output_dir = %summary.output_dir.display(),
            "training finished"
        );
    }
    Ok(())
}

/// Rank 0 publishes a real NCCL unique id, every rank reads and checks it, all pass a
/// barrier, and each prints one summary line.
fn selftest(rendezvous: &Rendezvous, world: &World) -> Result<()> {
    const KEY: &str = "selftest/nccl_id";
    if world.rank == 0 {
        rendezvous
            .set(KEY, &nccl_unique_id())
            .context("publishing the NCCL id")?;
    }
    let id = rendezvous
        .get(KEY, SELFTEST_WAIT)
        .context("reading the NCCL id")?;
    anyhow::ensure!(
        id.len() == 128,
        "NCCL id has {} bytes, expected 128",
        id.len()
    );
    rendezvous
        .barrier("selftest/done", SELFTEST_WAIT)
        .context("selftest barrier")?;
    let peers: Vec<String> = world.peers.iter().map(|p| p.comm_addr.clone()).collect();
    println!(
        "rank {}/{} local {} node {} peers=[{}] nccl_id={}",
        world.rank,
        world.world_size,
        world.local_rank,
        world.node_rank,
        peers.join(","),
        hex::encode(&id[..8])
    );
    Ok(())
}

/// 128 bytes from `ncclGetUniqueId`, or random bytes (logged) when NCCL cannot load.
fn nccl_unique_id() -> Vec<u8> {
    // SAFETY: only probes whether the NCCL library can be dlopen'ed.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        match cudarc::nccl::Id::new() {
            Ok(id) => {
                info!("created a real NCCL unique id");
                return id.internal().iter().map(|&b| b as u8).collect();
            }
            Err(e) => warn!("ncclGetUniqueId failed ({e:?}); using 128 random bytes instead"),
        }
    } else {
        warn!("libnccl.so could not be loaded; using 128 random bytes as the NCCL id");
    }
    rand::random::<[u8; 128]>().to_vec()
}
