//! The TCP ring backend of `Communicator` (contract: `comm/mod.rs`): CPU ranks and every
//! CI run. One communication thread per communicator executes collectives in issue
//! order, so `Work` is truly asynchronous; it owns one persistent, token-authenticated
//! connection to each ring neighbour (`handshake.rs`) and runs pipelined ring schedules
//! (`schedule.rs`, `ring.rs`) directly on the tensors' CPU memory. CUDA tensors are
//! staged through host memory. After any failure the communicator closes its links
//! (neighbours fail at once instead of waiting for the timeout) and refuses further work.
//!
//! Caller contract beyond the trait: tensors handed to a collective must not be read or
//! written until its `Work::wait` returns.

mod handshake;
mod ring;
mod schedule;
mod shm;
#[cfg(test)]
mod shm_tests;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

use super::elementwise::ElemKind;
use super::trace::TraceRecorder;
use super::{Communicator, ReduceOp, Work};
use crate::{Error, Result};
use handshake::PeerName;
use ring::{Header, Plan, Region, Ring};
use shm::{SharedPlan, SharedReduce};
use std::net::TcpListener;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;
use tch::{Device, Tensor};

/// Timeouts and tuning of the TCP backend.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// How long ring formation (connect, accept, handshake) may take.
    pub connect_timeout: Duration,
    /// How long a collective may wait for data from its previous neighbour.
    pub op_timeout: Duration,
    /// Pipelining granularity: bytes per chunk (rounded down to a multiple of 8).
    pub chunk_bytes: usize,
    /// SO_SNDBUF / SO_RCVBUF for the ring sockets; `None` keeps the kernel's autotuning.
    pub socket_buffer_bytes: Option<usize>,
    /// When every rank runs on this host: collectives go through a shared-memory area
    /// (`shm.rs`) with slots of this many bytes per rank (two per rank); `None` keeps
    /// every collective on the TCP ring.
    pub shared_memory_slot_bytes: Option<usize>,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            connect_timeout: Duration::from_secs(120),
            op_timeout: Duration::from_secs(300),
            // Tuned with benches/comm on loopback (docs/comm-bench.md).
            chunk_bytes: 256 << 10,
            socket_buffer_bytes: Some(4 << 20),
            shared_memory_slot_bytes: Some(1 << 20),
        }
    }
}

enum Collective {
    AllReduce {
        tensor: Tensor,
        op: ReduceOp,
    },
    ReduceScatter {
        input: Tensor,
        output: Tensor,
        op: ReduceOp,
    },
    AllGather {
        input: Tensor,
        output: Tensor,
    },
    Broadcast {
        tensor: Tensor,
        root: usize,
    },
    Barrier,
}

impl Collective {
    fn name(&self) -> &'static str {
        match self {
            Collective::AllReduce { .. } => "all_reduce",
            Collective::ReduceScatter { .. } => "reduce_scatter",
            Collective::AllGather { .. } => "all_gather",
            Collective::Broadcast { .. } => "broadcast",
            Collective::Barrier => "barrier",
        }
    }

    /// Elements of the largest tensor involved (what errors and traces report).
    fn numel(&self) -> usize {
        match self {
            Collective::AllReduce { tensor, .. } | Collective::Broadcast { tensor, .. } => {
                tensor.numel()
            }
            Collective::ReduceScatter { input, .. } => input.numel(),
            Collective::AllGather { output, .. } => output.numel(),
            Collective::Barrier => 1,
        }
    }
}

struct Job {
    collective: Collective,
    reply: mpsc::Sender<Result<()>>,
}

/// A TCP ring communicator; see the module documentation.
pub struct TcpComm {
    rank: usize,
    world: usize,
    shared_memory: bool,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    trace: TraceRecorder,
}

fn comm_error(op: &'static str, rank: usize, numel: usize, detail: impl Into<String>) -> Error {
    Error::Comm {
        op,
        rank,
        numel,
        detail: detail.into(),
    }
}

impl TcpComm {
    /// Forms the ring: `addrs` are the rank-ordered `host:port` of every rank's listener,
    /// `listener` is this rank's (already bound, so peers can connect early), `token` the
    /// job token every connection must present.
    pub fn connect(
        rank: usize,
        world_size: usize,
        addrs: &[String],
        listener: TcpListener,
        token: &str,
        options: TcpOptions,
    ) -> Result<TcpComm> {
        let _span = tracing::info_span!("comm_connect", rank, world_size).entered();
        let fail = |detail: String| comm_error("connect", rank, 0, detail);
        if world_size == 0 || rank >= world_size || addrs.len() != world_size {
            return Err(fail(format!(
                "rank {rank} of world {world_size} with {} addresses",
                addrs.len()
            )));
        }
        let (ring, shared) = if world_size == 1 {
            (None, None)
        } else {
            let peer = |r: usize| PeerName {
                rank: r,
                addr: addrs[r].clone(),
            };
            let (next, prev) = (
                peer((rank + 1) % world_size),
                peer((rank + world_size - 1) % world_size),
            );
            let mut links =
                handshake::connect_ring(rank, world_size, &next, &prev, &listener, token, &options)
                    .map_err(fail)?;
            let peers = (0..world_size).map(peer).collect();
            let slot_bytes = options.shared_memory_slot_bytes;
            let shared = shm::negotiate(&mut links, rank, peers, slot_bytes, options.op_timeout)
                .map_err(fail)?;
            let ring = Ring::new(
                world_size,
                next,
                prev,
                links,
                options.chunk_bytes,
                options.op_timeout,
            );
            let ring = ring.map_err(|e| fail(format!("starting the sender thread: {e}")))?;
            (Some(ring), shared)
        };
        drop(listener); // late or stray connections are refused from now on
        let shared_memory = shared.is_some();
        tracing::info!(shared_memory, "ring formed");
        let executor = Executor {
            rank,
            world: world_size,
            ring,
            shared,
            scratch: Vec::new(),
            broken: None,
        };
        let (jobs, queue) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("rsdeep-comm-{rank}"))
            .spawn(move || executor.serve(queue))
            .map_err(|e| fail(format!("starting the communication thread: {e}")))?;
        Ok(TcpComm {
            rank,
            world: world_size,
            shared_memory,
            jobs: Some(jobs),
            thread: Some(thread),
            trace: TraceRecorder::default(),
        })
    }

    /// Whether collectives go through the shared-memory transport (every rank on this
    /// host) rather than the TCP ring's data path.
    pub fn uses_shared_memory(&self) -> bool {
        self.shared_memory
    }

    fn check_tensor(&self, op: &'static str, tensor: &Tensor) -> Result<ElemKind> {
        let fail = |detail: String| comm_error(op, self.rank, tensor.numel(), detail);
        if !tensor.is_contiguous() {
            return Err(fail("tensor is not contiguous".into()));
        }
        ElemKind::from_kind(tensor.kind())
            .ok_or_else(|| fail(format!("unsupported dtype {:?}", tensor.kind())))
    }

    fn check_reduce(
        &self,
        op: &'static str,
        tensor: &Tensor,
        reduce: ReduceOp,
    ) -> Result<ElemKind> {
        let kind = self.check_tensor(op, tensor)?;
        if !kind.supports(reduce) {
            let detail = format!("{reduce:?} is not defined for {:?}", tensor.kind());
            return Err(comm_error(op, self.rank, tensor.numel(), detail));
        }
        Ok(kind)
    }

    /// Checks that `big` has `world * small.numel()` elements of the same dtype/device.
    fn check_pair(&self, op: &'static str, big: &Tensor, small: &Tensor) -> Result<()> {
        self.check_tensor(op, small)?;
        let matches = big.numel() == self.world * small.numel()
            && big.kind() == small.kind()
            && big.device() == small.device();
        if !matches {
            let detail = format!(
                "needs {} x {} elements of one dtype and device, got {} {:?} {:?} and {} {:?} {:?}",
                self.world,
                small.numel(),
                big.numel(),
                big.kind(),
                big.device(),
                small.numel(),
                small.kind(),
                small.device()
            );
            return Err(comm_error(op, self.rank, big.numel(), detail));
        }
        Ok(())
    }

    fn submit(&self, collective: Collective) -> Result<mpsc::Receiver<Result<()>>> {
        let (op, numel) = (collective.name(), collective.numel());
        let bytes = match &collective {
            Collective::AllReduce { tensor, .. } | Collective::Broadcast { tensor, .. } => {
                tensor.numel() * tensor.kind().elt_size_in_bytes()
            }
            Collective::ReduceScatter { input, .. } => {
                input.numel() * input.kind().elt_size_in_bytes()
            }
            Collective::AllGather { output, .. } => {
                output.numel() * output.kind().elt_size_in_bytes()
            }
            Collective::Barrier => 4,
        };
        self.trace.record(op, numel, bytes);
        let (reply, outcome) = mpsc::channel();
        let sent = self
            .jobs
            .as_ref()
            .map(|jobs| jobs.send(Job { collective, reply }));
        match sent {
            Some(Ok(())) => Ok(outcome),
            _ => Err(comm_error(
                op,
                self.rank,
                numel,
                "the communication thread has exited",
            )),
        }
    }

    fn work(&self, collective: Collective) -> Result<Work> {
        let (op, numel, rank) = (collective.name(), collective.numel(), self.rank);
        let outcome = self.submit(collective)?;
        Ok(Work::new(move || {
            outcome.recv().unwrap_or_else(|_| {
                Err(comm_error(
                    op,
                    rank,
                    numel,
                    "the communication thread exited mid-collective",
                ))
            })
        }))
    }
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<Work> {
        self.check_reduce("all_reduce", tensor, op)?;
        self.work(Collective::AllReduce {
            tensor: tensor.shallow_clone(),
            op,
        })
    }

    fn reduce_scatter(&self, input: &Tensor, output: &Tensor, op: ReduceOp) -> Result<Work> {
        self.check_reduce("reduce_scatter", input, op)?;
        self.check_pair("reduce_scatter", input, output)?;
        self.work(Collective::ReduceScatter {
            input: input.shallow_clone(),
            output: output.shallow_clone(),
            op,
        })
    }

    fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<Work> {
        self.check_tensor("all_gather", input)?;
        self.check_pair("all_gather", output, input)?;
        self.work(Collective::AllGather {
            input: input.shallow_clone(),
            output: output.shallow_clone(),
        })
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Work> {
        self.check_tensor("broadcast", tensor)?;
        if root >= self.world {
            return Err(comm_error(
                "broadcast",
                self.rank,
                tensor.numel(),
                format!("root {root} outside world {}", self.world),
            ));
        }
        self.work(Collective::Broadcast {
            tensor: tensor.shallow_clone(),
            root,
        })
    }

    fn barrier(&self) -> Result<()> {
        self.work(Collective::Barrier)?.wait()
    }

    fn trace(&self) -> &TraceRecorder {
        &self.trace
    }
}

impl Drop for TcpComm {
    fn drop(&mut self) {
        self.jobs = None; // the thread finishes queued work, then closes the links
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A CPU copy of `tensor` to run the ring on (the tensor itself when already on CPU).
fn stage_in(tensor: &Tensor) -> std::result::Result<Tensor, String> {
    if tensor.device() == Device::Cpu {
        return Ok(tensor.shallow_clone());
    }
    tensor
        .f_to_device(Device::Cpu)
        .map_err(|e| format!("staging to host: {e}"))
}

/// Copies the ring's result back into `tensor` if it was staged.
fn stage_out(tensor: &Tensor, host: &Tensor) -> std::result::Result<(), String> {
    if tensor.device() == Device::Cpu {
        return Ok(());
    }
    let mut target = tensor.shallow_clone();
    target
        .f_copy_(host)
        .map_err(|e| format!("copying back to {:?}: {e}", tensor.device()))
}

/// The bytes of a contiguous CPU tensor.
///
/// # Safety
/// `tensor` must be contiguous, on CPU, and stay alive and untouched by others while the
/// region is in use (the job holds it until the ring returns).
unsafe fn tensor_region(tensor: &Tensor) -> Region {
    let bytes = tensor.numel() * tensor.kind().elt_size_in_bytes();
    // SAFETY: forwarded to the caller; `data_ptr` of a contiguous tensor addresses
    // exactly `numel * elt_size` bytes.
    unsafe { Region::new(tensor.data_ptr().cast::<u8>(), bytes) }
}

fn reduce_code(op: ReduceOp) -> u8 {
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Avg => 1,
        ReduceOp::Max => 2,
    }
}

/// Every segment but this rank's, tagged with its owner (the parts a rank collects).
fn others(segments: &[Region], rank: usize) -> Vec<(usize, Region)> {
    segments
        .iter()
        .copied()
        .enumerate()
        .filter(|(owner, _)| *owner != rank)
        .collect()
}

/// A collective's identity for the shared-memory step check: the op name's first 8
/// bytes, the element count, and the dtype, reduction and root codes.
fn shared_desc(header: &Header) -> [u64; 3] {
    let mut name = [0u8; 8];
    let len = header.op_name.len().min(8);
    name[..len].copy_from_slice(&header.op_name.as_bytes()[..len]);
    [
        u64::from_le_bytes(name),
        header.numel,
        u64::from(header.elem) | u64::from(header.reduce) << 8 | header.root << 16,
    ]
}

/// The communication thread's state.
struct Executor {
    rank: usize,
    world: usize,
    ring: Option<Ring>,
    /// The shared-memory transport, when every rank is on this host (used instead of
    /// the ring's TCP data path; the ring's links still tell when a neighbour dies).
    shared: Option<shm::SharedArea>,
    /// Partial sums of reduce-scatter, reused across collectives.
    scratch: Vec<u64>,
    /// Why the communicator stopped working, once it has.
    broken: Option<String>,
}

impl Executor {
    fn serve(mut self, queue: mpsc::Receiver<Job>) {
        while let Ok(job) = queue.recv() {
            let collective = &job.collective;
            let (op, numel) = (collective.name(), collective.numel());
            let _span = tracing::debug_span!("collective", rank = self.rank, op, numel).entered();
            let outcome = match &self.broken {
                Some(why) => Err(format!(
                    "communicator unusable after an earlier failure: {why}"
                )),
                None => self.execute(collective),
            };
            if let (Err(why), None) = (&outcome, &self.broken) {
                tracing::error!(rank = self.rank, op, numel, "collective failed: {why}");
                self.broken = Some(format!("{op} of {numel} elements: {why}"));
                if let Some(ring) = &self.ring {
                    ring.shut_down();
                }
            }
            let _ = job
                .reply
                .send(outcome.map_err(|detail| comm_error(op, self.rank, numel, detail)));
        }
    }

    fn execute(&mut self, collective: &Collective) -> std::result::Result<(), String> {
        match collective {
            Collective::AllReduce { tensor, op } => {
                let host = stage_in(tensor)?;
                self.all_reduce(&host, *op, "all_reduce")?;
                stage_out(tensor, &host)
            }
            Collective::ReduceScatter { input, output, op } => {
                let (host_in, host_out) = (stage_in(input)?, stage_in(output)?);
                self.reduce_scatter(&host_in, &host_out, *op)?;
                stage_out(output, &host_out)
            }
            Collective::AllGather { input, output } => {
                let (host_in, host_out) = (stage_in(input)?, stage_in(output)?);
                self.all_gather(&host_in, &host_out)?;
                stage_out(output, &host_out)
            }
            Collective::Broadcast { tensor, root } => {
                let host = stage_in(tensor)?;
                self.broadcast(&host, *root)?;
                stage_out(tensor, &host)
            }
            Collective::Barrier => {
                let token = Tensor::f_zeros([1], (tch::Kind::Float, Device::Cpu))
                    .map_err(|e| e.to_string())?;
                self.all_reduce(&token, ReduceOp::Sum, "barrier")
            }
        }
    }

    fn header(
        op_name: &'static str,
        tensor: &Tensor,
        reduce: Option<ReduceOp>,
        root: usize,
    ) -> Header {
        Header {
            seq: 0,
            op_name,
            elem: ElemKind::from_kind(tensor.kind()).map_or(0, ElemKind::code),
            reduce: reduce.map_or(255, reduce_code),
            numel: tensor.numel() as u64,
            root: root as u64,
        }
    }

    fn elem(tensor: &Tensor) -> std::result::Result<ElemKind, String> {
        ElemKind::from_kind(tensor.kind())
            .ok_or_else(|| format!("unsupported dtype {:?}", tensor.kind()))
    }

    fn all_reduce(
        &mut self,
        host: &Tensor,
        op: ReduceOp,
        name: &'static str,
    ) -> std::result::Result<(), String> {
        let Some(ring) = self.ring.as_mut() else {
            return Ok(());
        }; // one rank: x/1 == x
        let kind = Self::elem(host)?;
        // SAFETY: `host` is contiguous CPU memory held by this job until `run` returns.
        let region = unsafe { tensor_region(host) };
        let header = Self::header(name, host, Some(op), 0);
        if let Some(shared) = self.shared.as_mut() {
            let segments =
                schedule::balanced_segments(region, host.numel(), self.world, kind.size());
            let reduce = SharedReduce {
                into: segments[self.rank],
                local: segments[self.rank],
                kind,
                op,
                average: op == ReduceOp::Avg,
                republish: true,
            };
            let plan = SharedPlan {
                desc: shared_desc(&header),
                parts_per_slot: self.world,
                publish: others(&segments, self.rank),
                reduce: Some(reduce),
                collect: others(&segments, self.rank),
            };
            let ring: &Ring = ring;
            return shared.run(&plan, &|| ring.check_links());
        }
        let steps = schedule::all_reduce(
            self.rank,
            self.world,
            region,
            host.numel(),
            kind.size(),
            op == ReduceOp::Avg,
        );
        ring.run(header, &Plan { steps, kind, op })
    }

    fn reduce_scatter(
        &mut self,
        input: &Tensor,
        output: &Tensor,
        op: ReduceOp,
    ) -> std::result::Result<(), String> {
        let Some(ring) = self.ring.as_mut() else {
            let mut output = output.shallow_clone();
            return output.f_copy_(input).map_err(|e| e.to_string());
        };
        let kind = Self::elem(input)?;
        let header = Self::header("reduce_scatter", input, Some(op), 0);
        if let Some(shared) = self.shared.as_mut() {
            // SAFETY: input/output are contiguous CPU tensors held by this job until
            // `run` returns.
            let (input_region, into) = unsafe { (tensor_region(input), tensor_region(output)) };
            let segments = schedule::equal_segments(input_region, self.world, into.len());
            let reduce = SharedReduce {
                into,
                local: segments[self.rank],
                kind,
                op,
                average: op == ReduceOp::Avg,
                republish: false,
            };
            let plan = SharedPlan {
                desc: shared_desc(&header),
                parts_per_slot: self.world,
                publish: others(&segments, self.rank),
                reduce: Some(reduce),
                collect: Vec::new(),
            };
            let ring: &Ring = ring;
            return shared.run(&plan, &|| ring.check_links());
        }
        let input_bytes = input.numel() * kind.size();
        if self.scratch.len() * 8 < input_bytes {
            self.scratch = vec![0u64; input_bytes.div_ceil(8)];
        }
        // SAFETY: input/output are contiguous CPU tensors held by this job, and the scratch
        // vector is neither resized nor dropped until `run` returns.
        let (input_region, output_region, scratch) = unsafe {
            (
                tensor_region(input),
                tensor_region(output),
                Region::new(self.scratch.as_mut_ptr().cast(), input_bytes),
            )
        };
        let steps = schedule::reduce_scatter(
            self.rank,
            self.world,
            input_region,
            output_region,
            scratch,
            op == ReduceOp::Avg,
        );
        ring.run(header, &Plan { steps, kind, op })
    }

    fn all_gather(&mut self, input: &Tensor, output: &Tensor) -> std::result::Result<(), String> {
        let count = input.numel() as i64;
        let mut own = output
            .f_narrow(0, self.rank as i64 * count, count)
            .map_err(|e| e.to_string())?;
        own.f_copy_(input).map_err(|e| e.to_string())?;
        let Some(ring) = self.ring.as_mut() else {
            return Ok(());
        };
        let kind = Self::elem(output)?;
        // SAFETY: `output` is a contiguous CPU tensor held by this job until `run` returns.
        let region = unsafe { tensor_region(output) };
        let header = Self::header("all_gather", output, None, 0);
        if let Some(shared) = self.shared.as_mut() {
            let segments =
                schedule::equal_segments(region, self.world, input.numel() * kind.size());
            let plan = SharedPlan {
                desc: shared_desc(&header),
                parts_per_slot: 1,
                publish: vec![(self.rank, segments[self.rank])],
                reduce: None,
                collect: others(&segments, self.rank),
            };
            let ring: &Ring = ring;
            return shared.run(&plan, &|| ring.check_links());
        }
        let steps =
            schedule::all_gather(self.rank, self.world, region, input.numel() * kind.size());
        ring.run(
            header,
            &Plan {
                steps,
                kind,
                op: ReduceOp::Sum,
            },
        )
    }

    fn broadcast(&mut self, host: &Tensor, root: usize) -> std::result::Result<(), String> {
        let Some(ring) = self.ring.as_mut() else {
            return Ok(());
        };
        let kind = Self::elem(host)?;
        // SAFETY: `host` is contiguous CPU memory held by this job until `run` returns.
        let region = unsafe { tensor_region(host) };
        let header = Self::header("broadcast", host, None, root);
        if let Some(shared) = self.shared.as_mut() {
            let (publish, collect) = if self.rank == root {
                (vec![(root, region)], Vec::new())
            } else {
                (Vec::new(), vec![(root, region)])
            };
            let plan = SharedPlan {
                desc: shared_desc(&header),
                parts_per_slot: 1,
                publish,
                reduce: None,
                collect,
            };
            let ring: &Ring = ring;
            return shared.run(&plan, &|| ring.check_links());
        }
        let steps = schedule::broadcast(self.rank, self.world, root, region);
        ring.run(
            header,
            &Plan {
                steps,
                kind,
                op: ReduceOp::Sum,
            },
        )
    }
}
