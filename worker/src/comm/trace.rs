//! A record of the collectives a communicator issued, so tests (bucketing here, the ZeRO
//! engine elsewhere) can assert "how many collectives, none larger than the bucket".
//! Every backend owns one `TraceRecorder`, reachable through `Communicator::trace`.
//! Recording is off by default (a training run would grow it without bound).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// One issued collective.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEvent {
    /// "all_reduce", "reduce_scatter", "all_gather", "broadcast" or "barrier".
    pub op: &'static str,
    /// Elements of the collective's largest tensor (the input of reduce_scatter, the
    /// output of all_gather).
    pub numel: usize,
    /// Bytes of that tensor.
    pub bytes: usize,
}

/// Thread-safe, switchable list of `TraceEvent`s.
#[derive(Debug, Default)]
pub struct TraceRecorder {
    enabled: AtomicBool,
    events: Mutex<Vec<TraceEvent>>,
}

impl TraceRecorder {
    /// Starts (or stops) recording.
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::SeqCst);
    }

    /// Appends an event if recording is on.
    pub fn record(&self, op: &'static str, numel: usize, bytes: usize) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let mut events = self
            .events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        events.push(TraceEvent { op, numel, bytes });
    }

    /// Returns and clears the recorded events.
    pub fn take(&self) -> Vec<TraceEvent> {
        let mut events = self
            .events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        std::mem::take(&mut *events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_when_enabled() {
        let trace = TraceRecorder::default();
        trace.record("all_reduce", 4, 16);
        assert!(trace.take().is_empty());
        trace.set_enabled(true);
        trace.record("all_gather", 8, 32);
        let events = trace.take();
        assert_eq!(
            events,
            vec![TraceEvent {
                op: "all_gather",
                numel: 8,
                bytes: 32
            }]
        );
        assert!(trace.take().is_empty(), "take clears");
    }
}
