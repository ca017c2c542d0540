//! Forward latencies of the model's modules for DeepSpeed's flops profiler
//! (`train/flops_profile.rs`, contract: `FlopsProfilerConfig` of the DeepSpeed config):
//! while a thread records, the blocks time their forward and its parts (`embed_tokens`,
//! each decoder layer with its norms, attention and MLP, the final norm, `lm_head`)
//! under Hugging Face's module paths (`model.layers.0.self_attn`), synchronising a CUDA
//! device around each so the time is the kernels' (DeepSpeed's module hooks do the same).
//! A module keeps its first time of the recording, so a block recomputed in the backward
//! (activation checkpointing) keeps its forward; `lm_head` run in row chunks by the fused
//! head adds its chunks up. When no thread records, each timing point costs one
//! thread-local read.

use crate::Result;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;
use tch::Device;

thread_local! {
    static RECORDING: RefCell<Option<BTreeMap<String, f64>>> = const { RefCell::new(None) };
}

/// Starts recording this thread's module forwards (forgetting an unfinished recording).
pub fn start_recording() {
    RECORDING.with(|r| *r.borrow_mut() = Some(BTreeMap::new()));
}

/// Stops recording; returns seconds by module path (empty when nothing recorded).
pub fn finish_recording() -> BTreeMap<String, f64> {
    RECORDING
        .with(|r| r.borrow_mut().take())
        .unwrap_or_default()
}

fn is_recording() -> bool {
    RECORDING.with(|r| r.borrow().is_some())
}

/// Waits for `device`'s queued kernels (a no-op on the CPU).
pub fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// A started timing: when and on which device.
pub struct Lap {
    started: Instant,
    device: Device,
}

/// Starts timing a module on `device` (None when this thread does not record).
pub fn lap(device: Device) -> Option<Lap> {
    if !is_recording() {
        return None;
    }
    synchronize(device);
    Some(Lap {
        started: Instant::now(),
        device,
    })
}

/// The seconds since `lap` started, after the device finished.
fn elapsed(lap: Lap) -> f64 {
    synchronize(lap.device);
    lap.started.elapsed().as_secs_f64()
}

/// Records the module `path` ran from `lap` until now, unless it already has a time.
pub fn record(lap: Option<Lap>, path: impl FnOnce() -> String) {
    let Some(lap) = lap else { return };
    let seconds = elapsed(lap);
    RECORDING.with(|r| {
        if let Some(times) = r.borrow_mut().as_mut() {
            times.entry(path()).or_insert(seconds);
        }
    });
}

/// Adds the time since `lap` to the module `path` (a forward run in pieces).
pub fn accumulate(lap: Option<Lap>, path: &str) {
    let Some(lap) = lap else { return };
    let seconds = elapsed(lap);
    RECORDING.with(|r| {
        if let Some(times) = r.borrow_mut().as_mut() {
            *times.entry(path.to_string()).or_insert(0.0) += seconds;
        }
    });
}

/// Runs `forward` on `device`, recording its time as the module `path`'s.
pub fn timed<T>(
    device: Device,
    path: impl FnOnce() -> String,
    forward: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let lap = lap(device);
    let out = forward()?;
    record(lap, path);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_recording_thread_times_and_the_first_time_of_a_module_stays() -> Result<()> {
        assert!(lap(Device::Cpu).is_none(), "nothing records by default");
        timed(Device::Cpu, || "ignored".into(), || Ok(()))?;
        start_recording();
        timed(Device::Cpu, || "model.norm".into(), || Ok(()))?;
        let first = RECORDING.with(|r| r.borrow().as_ref().map(|t| t["model.norm"]));
        timed(
            Device::Cpu,
            || "model.norm".into(),
            || {
                std::thread::sleep(std::time::Duration::from_millis(5));
                Ok(())
            },
        )?;
        for _ in 0..2 {
            accumulate(lap(Device::Cpu), "lm_head");
        }
        let other_thread = std::thread::spawn(|| lap(Device::Cpu).is_none()).join();
        assert!(matches!(other_thread, Ok(true)), "recording is per thread");
        let times = finish_recording();
        assert_eq!(times.keys().collect::<Vec<_>>(), ["lm_head", "model.norm"]);
        assert_eq!(
            Some(times["model.norm"]),
            first,
            "a recompute keeps the first"
        );
        assert!(times["model.norm"] < 0.005);
        assert!(finish_recording().is_empty() && lap(Device::Cpu).is_none());
        Ok(())
    }
}
