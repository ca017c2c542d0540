//! How a launched worker gets from "joined the rendezvous" to "training": reads the
//! resolved config the launcher wrote (`RSDEEP_CONFIG`), picks its device, ships the NCCL
//! unique id through the rendezvous store when the backend is NCCL, builds the
//! communicator from the rendezvous answer, wires heartbeats, and runs `train`.
//!
//! Heartbeats: from right after the join, a `Pulse` thread sends one every
//! `RSDEEP_HEARTBEAT_INTERVAL_MS` carrying the last finished step and the current phase
//! (`phase.rs`: startup/step/collective/eval/save/load/final_write, since when), and every
//! finished step sends one at once. The launcher tells a stopped or frozen process (no
//! beats) from a stuck one (beats, but the step does not advance), and a rank stuck
//! outside a collective from the ranks waiting for it inside one. The communicator is
//! wrapped in `PhasedCommunicator`, which also carries the test-only fault hook
//! `RSDEEP_FAULT_INJECT` (refused at startup when malformed). On a restart
//! (`RSDEEP_RESTART_COUNT > 0`) the run resumes from the newest checkpoint it wrote itself
//! in `output_dir`, whatever `resume_from_checkpoint` says (`resume_after_restart`).

use super::phase::{self, FaultInjection, PhasedCommunicator};
use super::run::{StepProgress, TrainSummary, TrainWorld, train};
use crate::comm::Communicator;
use crate::comm::backend::{Backend, CommSetup, build_communicator};
use crate::comm::nccl;
use crate::comm::tcp::TcpOptions;
use crate::rendezvous::{HeartbeatSender, Rendezvous, WorkerEnv, World};
use crate::{Error, Result};
use rsdeep_contract::config::{CommBackend, ResumeFrom, TrainConfig};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tch::Device;

/// How long ranks wait for rank 0's NCCL id in the store.
const NCCL_ID_WAIT: Duration = Duration::from_secs(300);

/// Trains with the config the launcher resolved for this world.
pub fn train_from_launcher(
    env: &WorkerEnv,
    rendezvous: &Rendezvous,
    world: World,
    listener: TcpListener,
) -> Result<TrainSummary> {
    let pulse = Pulse::start(rendezvous.start_heartbeat()?, env.heartbeat_interval);
    let path = env.config.as_ref().ok_or_else(|| {
        Error::Config("RSDEEP_CONFIG is not set: start workers through the rsdeep launcher".into())
    })?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading the resolved config {}", path.display()), e))?;
    let mut config = TrainConfig::from_json(&text).map_err(|e| Error::Config(e.to_string()))?;
    resume_after_restart(&mut config, env.restart_count, &env.job_id, world.rank);
    let device = device_for(&env.device)?;
    let backend = match config.args.comm_backend {
        CommBackend::Auto => Backend::Auto,
        CommBackend::Tcp => Backend::Tcp,
        CommBackend::Nccl => Backend::Nccl,
    }
    .resolve(device);
    let nccl_id = if backend == Backend::Nccl {
        Some(exchange_nccl_id(rendezvous, &world)?)
    } else {
        None
    };
    let timeout = Duration::from_secs(config.args.ddp_timeout.max(1));
    let setup = CommSetup {
        rank: world.rank,
        world_size: world.world_size,
        device,
        peer_addrs: world.peer_addrs(),
        listener: Some(listener),
        token: world.token.clone(),
        tcp: TcpOptions {
            op_timeout: timeout,
            ..TcpOptions::default()
        },
        nccl_id,
        nccl_timeout: timeout,
    };
    let fault = FaultInjection::from_env(world.rank, env.restart_count)?;
    let comm: Arc<dyn Communicator> = Arc::new(PhasedCommunicator::new(
        build_communicator(backend, setup)?,
        fault,
    ));
    let train_world = TrainWorld {
        comm,
        rank: world.rank,
        world_size: world.world_size,
        local_rank: world.local_rank,
        device,
        run_id: env.job_id.clone(),
    };
    let mut on_step = |p: StepProgress| pulse.step_finished(p);
    train(config, train_world, &mut on_step)
}

/// On a restart of the job, resumes from the newest checkpoint this run (`run_id`) wrote
/// in `output_dir`, overriding `resume_from_checkpoint`; with none there the configured
/// start stays (which resumes the run this one continued, if any). Checkpoints of other
/// runs in the same folder are never picked.
fn resume_after_restart(config: &mut TrainConfig, restart_count: u32, run_id: &str, rank: usize) {
    if restart_count == 0 {
        return;
    }
    let output_dir = Path::new(&config.args.output_dir);
    let configured = &config.args.resume_from_checkpoint;
    match rsdeep_contract::checkpoint_dir::newest_checkpoint_of_run(output_dir, run_id) {
        Some((step, dir)) => {
            if rank == 0 {
                eprintln!(
                    "[rank 0] restart {restart_count}: resuming from {} (step {step}, this run's newest complete checkpoint; resume_from_checkpoint {configured:?} is ignored)",
                    dir.display()
                );
            }
            config.args.resume_from_checkpoint =
                Some(ResumeFrom::Path(dir.to_string_lossy().into_owned()));
        }
        None if rank == 0 => eprintln!(
            "[rank 0] restart {restart_count}: no checkpoint of this run in {}: starting as configured (resume_from_checkpoint {configured:?})",
            output_dir.display()
        ),
        None => {}
    }
}

/// Sends a heartbeat every interval with the last finished step (zero before the
/// first), from its own thread, until dropped.
struct Pulse {
    sender: HeartbeatSender,
    latest: Arc<Mutex<StepProgress>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Pulse {
    fn start(sender: HeartbeatSender, interval: Duration) -> Pulse {
        let latest = Arc::new(Mutex::new(StepProgress {
            step: 0,
            loss: 0.0,
            tokens_per_second: 0.0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (sender, latest, stop) = (sender.clone(), latest.clone(), stop.clone());
            std::thread::Builder::new()
                .name("rsdeep-heartbeat".into())
                .spawn(move || beat_until_stopped(&sender, &latest, &stop, interval))
                .ok()
        };
        Pulse {
            sender,
            latest,
            stop,
            thread,
        }
    }

    /// Records a finished step and reports it at once.
    fn step_finished(&self, progress: StepProgress) {
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = progress;
        let phase = phase::snapshot();
        self.sender.beat(
            progress.step,
            progress.loss,
            progress.tokens_per_second,
            &phase,
        );
    }
}

impl Drop for Pulse {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn beat_until_stopped(
    sender: &HeartbeatSender,
    latest: &Mutex<StepProgress>,
    stop: &AtomicBool,
    interval: Duration,
) {
    const SLICE: Duration = Duration::from_millis(20);
    let mut waited = interval;
    while !stop.load(Ordering::SeqCst) {
        if waited >= interval {
            let p = *latest.lock().unwrap_or_else(|p| p.into_inner());
            sender.beat(p.step, p.loss, p.tokens_per_second, &phase::snapshot());
            waited = Duration::ZERO;
        }
        std::thread::sleep(SLICE.min(interval));
        waited += SLICE.min(interval);
    }
}

/// `cpu`, or `cuda` (the launcher narrows CUDA_VISIBLE_DEVICES to this rank's GPU, so
/// it is device 0 of this process).
fn device_for(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        "cuda" => Err(Error::Config(
            "the launcher planned a CUDA rank but libtorch sees no CUDA device: check the driver and CUDA_VISIBLE_DEVICES, or run with --device cpu".into(),
        )),
        other => Err(Error::Config(format!("unknown device {other:?}: expected cpu or cuda"))),
    }
}

/// Rank 0 creates the NCCL unique id and publishes it; every rank reads it back.
fn exchange_nccl_id(rendezvous: &Rendezvous, world: &World) -> Result<Vec<u8>> {
    let key = format!("nccl/unique_id/{}", world.generation);
    if world.rank == 0 {
        rendezvous.set(&key, &nccl::new_unique_id()?)?;
    }
    rendezvous.get(&key, NCCL_ID_WAIT)
}
