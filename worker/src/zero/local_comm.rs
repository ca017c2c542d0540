//! An in-process `Communicator` for ranks that are threads of one process: every
//! collective deposits a copy of the rank's tensor, meets the others at a barrier, and
//! computes the result in rank order (so sums are bit-identical on every rank). Each rank
//! records its collectives in a `TraceRecorder` like every backend. The contract is
//! `crate::comm::Communicator`; this backend is for tests and single-host simulations
//! (no sockets), not for speed.

use crate::comm::{Communicator, ReduceOp, TraceRecorder, Work};
use crate::{Error, Result};
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use tch::Tensor;

struct Hub {
    world_size: usize,
    slots: Mutex<Vec<Option<Tensor>>>,
    barrier: Barrier,
}

/// One rank's handle on an in-process world.
pub struct LocalCommunicator {
    hub: Arc<Hub>,
    rank: usize,
    trace: TraceRecorder,
}

impl LocalCommunicator {
    /// Handles for ranks 0..world_size of a new world; hand one to each thread.
    pub fn world(world_size: usize) -> Vec<LocalCommunicator> {
        let hub = Arc::new(Hub {
            world_size,
            slots: Mutex::new((0..world_size).map(|_| None).collect()),
            barrier: Barrier::new(world_size),
        });
        (0..world_size)
            .map(|rank| LocalCommunicator {
                hub: hub.clone(),
                rank,
                trace: TraceRecorder::default(),
            })
            .collect()
    }

    fn fail(&self, op: &'static str, numel: usize, detail: impl Into<String>) -> Error {
        Error::Comm {
            op,
            rank: self.rank,
            numel,
            detail: detail.into(),
        }
    }

    /// Deposits `tensor`, waits for every rank, and returns `combine(all tensors)`.
    fn exchange(
        &self,
        op: &'static str,
        tensor: &Tensor,
        combine: impl FnOnce(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let numel = tensor.numel();
        let own = tensor.f_detach()?.f_contiguous()?.f_detach_copy()?;
        lock(&self.hub.slots).map_err(|e| self.fail(op, numel, e))?[self.rank] = Some(own);
        self.hub.barrier.wait();
        let result = {
            let slots = lock(&self.hub.slots).map_err(|e| self.fail(op, numel, e))?;
            let all: Option<Vec<Tensor>> = slots
                .iter()
                .map(|s| s.as_ref().map(|t| t.shallow_clone()))
                .collect();
            drop(slots);
            match all {
                Some(all) => combine(&all),
                None => Err(self.fail(op, numel, "a rank did not deposit")),
            }
        };
        self.hub.barrier.wait();
        result
    }

    fn record(&self, op: &'static str, tensor: &Tensor) {
        let numel = tensor.numel();
        self.trace
            .record(op, numel, numel * tensor.kind().elt_size_in_bytes());
    }
}

fn lock<T>(m: &Mutex<T>) -> std::result::Result<MutexGuard<'_, T>, String> {
    m.lock()
        .map_err(|_| "poisoned lock (another rank panicked)".to_string())
}

/// Element-wise reduction of equally shaped tensors, in rank order.
fn reduce_all(all: &[Tensor], op: ReduceOp) -> Result<Tensor> {
    let mut acc = all[0].f_detach_copy()?;
    for t in &all[1..] {
        acc = match op {
            ReduceOp::Sum | ReduceOp::Avg => acc.f_add(t)?,
            ReduceOp::Max => acc.f_maximum(t)?,
        };
    }
    if op == ReduceOp::Avg {
        acc = acc.f_div_scalar(all.len() as f64)?;
    }
    Ok(acc)
}

fn write_into(target: &Tensor, src: &Tensor) -> Result<()> {
    let mut target = target.shallow_clone();
    tch::no_grad(|| target.f_copy_(src))?;
    Ok(())
}

impl Communicator for LocalCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.hub.world_size
    }

    fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<Work> {
        self.record("all_reduce", tensor);
        let reduced = self.exchange("all_reduce", tensor, |all| reduce_all(all, op))?;
        write_into(tensor, &reduced)?;
        Ok(Work::done())
    }

    fn reduce_scatter(&self, input: &Tensor, output: &Tensor, op: ReduceOp) -> Result<Work> {
        let (n, chunk) = (input.numel(), output.numel());
        if n != chunk * self.hub.world_size {
            return Err(self.fail(
                "reduce_scatter",
                n,
                format!("input {n} != world * output {chunk}"),
            ));
        }
        self.record("reduce_scatter", input);
        let rank = self.rank as i64;
        let reduced = self.exchange("reduce_scatter", input, |all| {
            Ok(reduce_all(all, op)?.f_narrow(0, rank * chunk as i64, chunk as i64)?)
        })?;
        write_into(output, &reduced)?;
        Ok(Work::done())
    }

    fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<Work> {
        let (n, out) = (input.numel(), output.numel());
        if out != n * self.hub.world_size {
            return Err(self.fail(
                "all_gather",
                out,
                format!("output {out} != world * input {n}"),
            ));
        }
        self.record("all_gather", output);
        let gathered = self.exchange("all_gather", input, |all| Ok(Tensor::f_cat(all, 0)?))?;
        write_into(output, &gathered)?;
        Ok(Work::done())
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Work> {
        self.record("broadcast", tensor);
        let value = self.exchange("broadcast", tensor, |all| Ok(all[root].f_detach_copy()?))?;
        write_into(tensor, &value)?;
        Ok(Work::done())
    }

    fn barrier(&self) -> Result<()> {
        self.trace.record("barrier", 0, 0);
        self.hub.barrier.wait();
        Ok(())
    }

    fn trace(&self) -> &TraceRecorder {
        &self.trace
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F>(world: usize, f: F) -> Vec<Vec<f32>>
    where
        F: Fn(&LocalCommunicator) -> Tensor + Send + Sync + Copy + 'static,
    {
        let handles: Vec<_> = LocalCommunicator::world(world)
            .into_iter()
            .map(|c| std::thread::spawn(move || Vec::<f32>::try_from(&f(&c)).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn collectives_compute_what_the_trait_promises() {
        let sums = run(3, |c| {
            let t = Tensor::from_slice(&[c.rank() as f32, 1.0]);
            c.all_reduce(&t, ReduceOp::Avg).unwrap().wait().unwrap();
            t
        });
        assert!(sums.iter().all(|v| v == &vec![1.0, 1.0]));
        let scattered = run(2, |c| {
            let input = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]) * (c.rank() as f64 + 1.0);
            let out = Tensor::zeros([2], (tch::Kind::Float, tch::Device::Cpu));
            c.reduce_scatter(&input, &out, ReduceOp::Sum)
                .unwrap()
                .wait()
                .unwrap();
            out
        });
        assert_eq!(scattered, vec![vec![3.0, 6.0], vec![9.0, 12.0]]);
        let gathered = run(2, |c| {
            let out = Tensor::zeros([4], (tch::Kind::Float, tch::Device::Cpu));
            c.trace().set_enabled(true);
            c.all_gather(&Tensor::from_slice(&[c.rank() as f32; 2]), &out)
                .unwrap()
                .wait()
                .unwrap();
            let events = c.trace().take();
            assert_eq!(
                (events.len(), events[0].op, events[0].numel, events[0].bytes),
                (1, "all_gather", 4, 16)
            );
            out
        });
        assert!(gathered.iter().all(|v| v == &vec![0.0, 0.0, 1.0, 1.0]));
    }
}
