//! The NCCL backend of `Communicator` (contract: `comm/mod.rs`) for CUDA ranks, and the
//! only module with raw NCCL FFI. NCCL and the CUDA driver are loaded at run time by
//! cudarc (`dynamic-loading`), so this compiles and links on machines without CUDA.
//!
//! - **Unique id.** Rank 0 calls `new_unique_id()` and ships the 128 bytes through the
//!   rendezvous store; every rank passes them to `NcclComm::new`.
//! - **Ownership.** The communicator is created with `ncclCommInitRank` through cudarc's
//!   `result` layer (the safe `Comm` hides its handle) and owned by `NcclComm`; `Drop`
//!   aborts it (never blocks).
//! - **Stream convention.** libtorch (through tch) has no stream API, so every torch kernel
//!   runs on the device's legacy default stream (the NULL stream). Every NCCL call here is
//!   issued on that same NULL stream, so it is ordered after the kernels that produced the
//!   tensor and before the kernels that consume it: no extra synchronisation is needed for
//!   GPU consumers. `Work::wait` additionally blocks the host until the stream is idle.
//! - **Avg** is `ncclSum` followed by a torch in-place division by the world size on the
//!   same stream, so it means "sum, then divide" exactly as on the TCP backend.
//! - **Errors and hangs.** Launch errors name the collective, rank, size and dtype. `wait`
//!   polls the stream and `ncclCommGetAsyncError`; an asynchronous error or a collective
//!   still running after the timeout aborts the communicator (`ncclCommAbort`) and
//!   returns an error; later collectives are refused.

use super::trace::TraceRecorder;
use super::{Communicator, ReduceOp, Work};
use crate::{Error, Result};
use cudarc::driver::CudaContext;
use cudarc::nccl::{result as nccl, sys};
use std::ffi::{CStr, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Length of an NCCL unique id.
pub const UNIQUE_ID_BYTES: usize = 128;

/// Whether an NCCL library can be loaded (cudarc panics on a missing symbol otherwise).
pub fn nccl_available() -> bool {
    // SAFETY: only tries to dlopen the library names cudarc knows; no symbol is called.
    unsafe { sys::is_culib_present() }
}

fn setup_error(detail: impl Into<String>) -> Error {
    Error::Comm {
        op: "nccl_init",
        rank: 0,
        numel: 0,
        detail: detail.into(),
    }
}

/// NCCL's own text for a result code.
fn describe(code: sys::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a pointer to a static NUL-terminated string.
    let text = unsafe { sys::ncclGetErrorString(code) };
    if text.is_null() {
        return format!("{code:?}");
    }
    // SAFETY: non-null, static and NUL-terminated (see above).
    format!(
        "{code:?}: {}",
        unsafe { CStr::from_ptr(text) }.to_string_lossy()
    )
}

/// A fresh unique id (rank 0 only), as the bytes the rendezvous store carries.
pub fn new_unique_id() -> Result<[u8; UNIQUE_ID_BYTES]> {
    if !nccl_available() {
        return Err(setup_error(
            "libnccl.so cannot be loaded (see scripts/env.sh for the symlink)",
        ));
    }
    let id = nccl::get_uniqueid()
        .map_err(|e| setup_error(format!("ncclGetUniqueId: {}", describe(e.0))))?;
    Ok(id_to_bytes(&id))
}

/// The id's bytes (each `c_char` reinterpreted as `u8`).
pub fn id_to_bytes(id: &sys::ncclUniqueId) -> [u8; UNIQUE_ID_BYTES] {
    id.internal.map(|c| c as u8)
}

/// Rebuilds an id from bytes received through the rendezvous; the length must be exact.
pub fn id_from_bytes(bytes: &[u8]) -> Result<sys::ncclUniqueId> {
    let bytes: [u8; UNIQUE_ID_BYTES] = bytes.try_into().map_err(|_| {
        setup_error(format!(
            "an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {}",
            bytes.len()
        ))
    })?;
    Ok(sys::ncclUniqueId {
        internal: bytes.map(|b| b as std::ffi::c_char),
    })
}

/// The raw communicator handle.
struct RawComm(sys::ncclComm_t);
// SAFETY: an ncclComm_t may be used from any thread; NcclComm serialises enqueueing with
// a mutex (NCCL requires one thread at a time per communicator) and aborts at most once.
unsafe impl Send for RawComm {}
unsafe impl Sync for RawComm {}

/// An NCCL communicator for one CUDA device; see the module documentation.
pub struct NcclComm {
    comm: Arc<Mutex<RawComm>>,
    context: Arc<CudaContext>,
    rank: usize,
    world: usize,
    device: Device,
    timeout: Duration,
    aborted: Arc<AtomicBool>,
    trace: TraceRecorder,
}

fn nccl_dtype(kind: Kind) -> Option<sys::ncclDataType_t> {
    match kind {
        Kind::Float => Some(sys::ncclDataType_t::ncclFloat32),
        Kind::Double => Some(sys::ncclDataType_t::ncclFloat64),
        Kind::Half => Some(sys::ncclDataType_t::ncclFloat16),
        Kind::BFloat16 => Some(sys::ncclDataType_t::ncclBfloat16),
        Kind::Int => Some(sys::ncclDataType_t::ncclInt32),
        Kind::Int64 => Some(sys::ncclDataType_t::ncclInt64),
        _ => None,
    }
}

fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
    }
}

/// The legacy default stream that libtorch's kernels run on.
fn null_stream() -> sys::cudaStream_t {
    std::ptr::null_mut()
}

impl NcclComm {
    /// Joins the communicator `id` as `rank` of `world_size` on CUDA device `device`.
    /// Blocks until every rank has joined (NCCL's own behaviour).
    pub fn new(
        rank: usize,
        world_size: usize,
        device: Device,
        id: sys::ncclUniqueId,
        timeout: Duration,
    ) -> Result<NcclComm> {
        let _span = tracing::info_span!("nccl_init", rank, world_size).entered();
        let fail = |detail: String| Error::Comm {
            op: "nccl_init",
            rank,
            numel: 0,
            detail,
        };
        let Device::Cuda(ordinal) = device else {
            return Err(fail(format!("NCCL needs a CUDA device, got {device:?}")));
        };
        if !nccl_available() {
            return Err(fail("libnccl.so cannot be loaded".into()));
        }
        let context =
            CudaContext::new(ordinal).map_err(|e| fail(format!("CUDA device {ordinal}: {e:?}")))?;
        context
            .bind_to_thread()
            .map_err(|e| fail(format!("binding CUDA device {ordinal}: {e:?}")))?;
        let mut handle: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer; the id came from ncclGetUniqueId on
        // rank 0; the device's primary context (shared with libtorch) is current.
        unsafe { nccl::comm_init_rank(&mut handle, world_size as i32, id, rank as i32) }
            .map_err(|e| fail(format!("ncclCommInitRank: {}", describe(e.0))))?;
        tracing::info!(device = ordinal, "NCCL communicator ready");
        Ok(NcclComm {
            comm: Arc::new(Mutex::new(RawComm(handle))),
            context,
            rank,
            world: world_size,
            device,
            timeout,
            aborted: Arc::new(AtomicBool::new(false)),
            trace: TraceRecorder::default(),
        })
    }

    fn error(&self, op: &'static str, numel: usize, detail: impl Into<String>) -> Error {
        Error::Comm {
            op,
            rank: self.rank,
            numel,
            detail: detail.into(),
        }
    }

    fn check(&self, op: &'static str, tensor: &Tensor) -> Result<sys::ncclDataType_t> {
        let numel = tensor.numel();
        if self.aborted.load(Ordering::SeqCst) {
            return Err(self.error(
                op,
                numel,
                "the NCCL communicator was aborted after an earlier failure",
            ));
        }
        if tensor.device() != self.device || !tensor.is_contiguous() {
            let detail = format!(
                "needs a contiguous tensor on {:?}, got {:?}",
                self.device,
                tensor.device()
            );
            return Err(self.error(op, numel, detail));
        }
        nccl_dtype(tensor.kind())
            .ok_or_else(|| self.error(op, numel, format!("unsupported dtype {:?}", tensor.kind())))
    }

    /// Enqueues one NCCL call (under the communicator's lock) and returns its `Work`.
    fn launch(
        &self,
        op: &'static str,
        numel: usize,
        kind: Kind,
        call: impl FnOnce(sys::ncclComm_t) -> std::result::Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<()> {
        let _span = tracing::debug_span!("collective", rank = self.rank, op, numel).entered();
        self.trace
            .record(op, numel, numel * kind.elt_size_in_bytes());
        let comm = self
            .comm
            .lock()
            .map_err(|_| self.error(op, numel, "communicator lock poisoned"))?;
        self.context
            .bind_to_thread()
            .map_err(|e| self.error(op, numel, format!("binding the device: {e:?}")))?;
        call(comm.0).map(|_| ()).map_err(|e| {
            let detail = format!(
                "{} ({numel} x {kind:?}, world {})",
                describe(e.0),
                self.world
            );
            self.abort(&comm);
            self.error(op, numel, detail)
        })
    }

    fn abort(&self, comm: &RawComm) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: the handle came from ncclCommInitRank and is aborted at most once.
            let _ = unsafe { nccl::comm_abort(comm.0) };
        }
    }

    /// A `Work` that waits for the NULL stream, watching for NCCL errors and the timeout.
    fn watch(&self, op: &'static str, numel: usize) -> Work {
        let watchdog = Watchdog {
            op,
            numel,
            rank: self.rank,
            context: self.context.clone(),
            aborted: self.aborted.clone(),
            comm: self.comm.clone(),
            deadline: Instant::now() + self.timeout,
        };
        Work::new(move || watchdog.wait())
    }

    fn divide_for_avg(&self, op: &'static str, tensor: &Tensor, reduce: ReduceOp) -> Result<()> {
        if reduce == ReduceOp::Avg {
            let mut target = tensor.shallow_clone();
            let _ = target
                .f_div_scalar_(self.world as f64)
                .map_err(|e| self.error(op, tensor.numel(), e.to_string()))?;
        }
        Ok(())
    }
}

/// Waits for an enqueued collective; aborts the communicator on error or timeout.
struct Watchdog {
    op: &'static str,
    numel: usize,
    rank: usize,
    context: Arc<CudaContext>,
    aborted: Arc<AtomicBool>,
    comm: Arc<Mutex<RawComm>>,
    deadline: Instant,
}

impl Watchdog {
    fn fail(&self, detail: String) -> Error {
        if !self.aborted.swap(true, Ordering::SeqCst)
            && let Ok(comm) = self.comm.lock()
        {
            // SAFETY: a handle from ncclCommInitRank, aborted at most once (flag above).
            let _ = unsafe { nccl::comm_abort(comm.0) };
        }
        Error::Comm {
            op: self.op,
            rank: self.rank,
            numel: self.numel,
            detail,
        }
    }

    fn async_error(&self) -> Option<sys::ncclResult_t> {
        let comm = self.comm.lock().ok()?;
        let mut code = sys::ncclResult_t::ncclSuccess;
        // SAFETY: a live handle (not yet aborted: checked by the caller) and a valid out-pointer.
        unsafe { sys::ncclCommGetAsyncError(comm.0, &mut code) };
        (code != sys::ncclResult_t::ncclSuccess && code != sys::ncclResult_t::ncclInProgress)
            .then_some(code)
    }

    fn wait(self) -> Result<()> {
        self.context
            .bind_to_thread()
            .map_err(|e| self.fail(format!("binding the device: {e:?}")))?;
        loop {
            if self.aborted.load(Ordering::SeqCst) {
                return Err(self.fail("the NCCL communicator was aborted".into()));
            }
            // SAFETY: querying the legacy NULL stream of the current (bound) context.
            let state = unsafe { cudarc::driver::sys::cuStreamQuery(std::ptr::null_mut()) };
            match state {
                cudarc::driver::sys::CUresult::CUDA_SUCCESS => return Ok(()),
                cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => {}
                other => return Err(self.fail(format!("CUDA error while waiting: {other:?}"))),
            }
            if let Some(code) = self.async_error() {
                return Err(self.fail(format!("asynchronous NCCL error: {}", describe(code))));
            }
            if Instant::now() > self.deadline {
                return Err(self.fail("timed out: a peer is dead or not issuing this collective; communicator aborted".into()));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn ptr(tensor: &Tensor) -> *mut c_void {
    tensor.data_ptr()
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<Work> {
        let dtype = self.check("all_reduce", tensor)?;
        let (buf, count) = (ptr(tensor), tensor.numel());
        // SAFETY: `buf` is the device pointer of a contiguous tensor of `count` elements
        // of `dtype` on this communicator's device; enqueued on the NULL stream (see module docs).
        self.launch("all_reduce", count, tensor.kind(), |comm| unsafe {
            nccl::all_reduce(buf, buf, count, dtype, nccl_op(op), comm, null_stream())
        })?;
        self.divide_for_avg("all_reduce", tensor, op)?;
        Ok(self.watch("all_reduce", count))
    }

    fn reduce_scatter(&self, input: &Tensor, output: &Tensor, op: ReduceOp) -> Result<Work> {
        let dtype = self.check("reduce_scatter", input)?;
        self.check("reduce_scatter", output)?;
        let count = output.numel();
        if input.numel() != count * self.world || input.kind() != output.kind() {
            return Err(self.error(
                "reduce_scatter",
                input.numel(),
                format!(
                    "input must be {} x {count} elements of one dtype",
                    self.world
                ),
            ));
        }
        let (send, recv) = (ptr(input), ptr(output));
        // SAFETY: both are contiguous device tensors of the checked sizes and dtype.
        self.launch(
            "reduce_scatter",
            input.numel(),
            input.kind(),
            |comm| unsafe {
                nccl::reduce_scatter(send, recv, count, dtype, nccl_op(op), comm, null_stream())
            },
        )?;
        self.divide_for_avg("reduce_scatter", output, op)?;
        Ok(self.watch("reduce_scatter", input.numel()))
    }

    fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<Work> {
        let dtype = self.check("all_gather", input)?;
        self.check("all_gather", output)?;
        let count = input.numel();
        if output.numel() != count * self.world || input.kind() != output.kind() {
            return Err(self.error(
                "all_gather",
                output.numel(),
                format!(
                    "output must be {} x {count} elements of one dtype",
                    self.world
                ),
            ));
        }
        let (send, recv) = (ptr(input), ptr(output));
        // SAFETY: both are contiguous device tensors of the checked sizes and dtype.
        self.launch("all_gather", output.numel(), input.kind(), |comm| unsafe {
            nccl::all_gather(send, recv, count, dtype, comm, null_stream())
        })?;
        Ok(self.watch("all_gather", output.numel()))
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Work> {
        let dtype = self.check("broadcast", tensor)?;
        if root >= self.world {
            return Err(self.error(
                "broadcast",
                tensor.numel(),
                format!("root {root} outside world {}", self.world),
            ));
        }
        let (buf, count) = (ptr(tensor), tensor.numel());
        // SAFETY: a contiguous device tensor of `count` elements; in place on every rank.
        self.launch("broadcast", count, tensor.kind(), |comm| unsafe {
            nccl::broadcast(buf, buf, count, dtype, root as i32, comm, null_stream())
        })?;
        Ok(self.watch("broadcast", count))
    }

    fn barrier(&self) -> Result<()> {
        let token = Tensor::f_zeros([1], (Kind::Float, self.device))
            .map_err(|e| self.error("barrier", 1, e.to_string()))?;
        self.all_reduce(&token, ReduceOp::Sum)?.wait()
    }

    fn trace(&self) -> &TraceRecorder {
        &self.trace
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if let Ok(comm) = self.comm.lock() {
            self.abort(&comm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails loudly when a GPU is required (RSDEEP_REQUIRE_GPU=1) but absent; otherwise
    /// says whether GPU tests can run.
    fn gpu_present() -> bool {
        let present = tch::Cuda::is_available() && nccl_available();
        if std::env::var(rsdeep_contract::env::REQUIRE_GPU).as_deref() == Ok("1") {
            assert!(
                present,
                "RSDEEP_REQUIRE_GPU=1 but no CUDA GPU with NCCL is usable"
            );
        }
        present
    }

    #[test]
    fn unique_id_round_trips_through_bytes() -> Result<()> {
        // The id needs libnccl (no GPU): scripts/env.sh provides it on dev and CI machines,
        // and without it this test fails rather than skipping.
        assert!(
            nccl_available(),
            "libnccl.so not loadable: source scripts/env.sh"
        );
        let bytes = new_unique_id()?;
        assert_ne!(bytes, [0u8; UNIQUE_ID_BYTES], "a real id is not all zeros");
        // Through a byte channel, as the rendezvous store carries it.
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        tx.send(bytes.to_vec())
            .map_err(|e| setup_error(e.to_string()))?;
        let received = rx.recv().map_err(|e| setup_error(e.to_string()))?;
        let id = id_from_bytes(&received)?;
        let safe = cudarc::nccl::Id::uninit(id.internal);
        assert_eq!(
            id_to_bytes(&sys::ncclUniqueId {
                internal: *safe.internal()
            }),
            bytes
        );
        assert!(
            id_from_bytes(&received[..127]).is_err(),
            "a short id is rejected"
        );
        Ok(())
    }

    fn deep_copy(x: &Tensor) -> Result<Tensor> {
        let mut y = x.f_zeros_like()?;
        y.f_copy_(x)?;
        Ok(y)
    }

    fn check_all_ops_one_rank(kind: Kind, numel: i64) -> Result<()> {
        let device = Device::Cuda(0);
        let comm = NcclComm::new(
            0,
            1,
            device,
            id_from_bytes(&new_unique_id()?)?,
            Duration::from_secs(60),
        )?;
        let x = Tensor::f_arange(numel, (Kind::Float, device))?.f_to_kind(kind)?;
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
            let y = deep_copy(&x)?;
            comm.all_reduce(&y, op)?.wait()?;
            assert!(
                y.f_equal(&x)?,
                "{op:?} on one rank is the identity for {kind:?}"
            );
        }
        let out = x.f_zeros_like()?;
        comm.reduce_scatter(&x, &out, ReduceOp::Sum)?.wait()?;
        assert!(out.f_equal(&x)?);
        let gathered = x.f_zeros_like()?;
        comm.all_gather(&x, &gathered)?.wait()?;
        assert!(gathered.f_equal(&x)?);
        let b = deep_copy(&x)?;
        comm.broadcast(&b, 0)?.wait()?;
        assert!(b.f_equal(&x)?);
        comm.barrier()
    }

    #[test]
    #[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine"]
    fn one_rank_nccl_all_ops_all_dtypes() -> Result<()> {
        assert!(gpu_present(), "this test needs a CUDA GPU and libnccl");
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            for numel in [0, 1, 7, 1001, 65_537] {
                check_all_ops_one_rank(kind, numel)?;
            }
        }
        Ok(())
    }
}
