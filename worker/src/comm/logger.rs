//! DeepSpeed's `comms_logger` for rsdeep: `LoggedComm` wraps any `Communicator` and times
//! every profiled collective from its issue to the return of its `Work::wait` (the host's
//! wall clock: with `overlap_comm` the work a rank does before waiting counts in, and on
//! NCCL the kernels queued ahead of the collective on the stream do too). Latencies are
//! kept per (op, message bytes); `summary()` renders DeepSpeed's `log_summary` table and,
//! with `verbose`, rank 0 prints DeepSpeed's per-op line as each collective completes.
//! The contract is the `comms_logger` block of the DeepSpeed config
//! (`rsdeep_contract::config::CommsLoggerConfig`) and the `Communicator` trait
//! (`comm/mod.rs`); the training loop (`train/run.rs`) decides when to wrap and print.
//!
//! Message size is the per-rank size: the tensor of all_reduce and broadcast, the input
//! of all_gather, the output of reduce_scatter, 0 for barrier. Bandwidths follow
//! DeepSpeed's rule with world size n, size S and latency t: all_gather and
//! reduce_scatter move S·n (algbw S·n/t, busbw algbw·(n−1)/n), all_reduce algbw 2S/t and
//! busbw S/t·2(n−1)/n, broadcast and barrier S/t for both. Averages are DeepSpeed's
//! trimmed means (10% of the sorted latencies dropped at each end), so every latency is
//! kept: 8 bytes per collective for the whole run.

use super::{Communicator, ReduceOp, TraceRecorder, Work};
use crate::Result;
use rsdeep_contract::config::CommsLoggerConfig;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tch::Tensor;

/// The collectives of the `Communicator` trait, named as DeepSpeed's log names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommOp {
    AllReduce,
    ReduceScatter,
    AllGather,
    Broadcast,
    Barrier,
}

impl CommOp {
    pub const ALL: [CommOp; 5] = [
        CommOp::AllReduce,
        CommOp::ReduceScatter,
        CommOp::AllGather,
        CommOp::Broadcast,
        CommOp::Barrier,
    ];

    /// The name in the summary and the verbose line.
    pub fn name(self) -> &'static str {
        match self {
            CommOp::AllReduce => "all_reduce",
            CommOp::ReduceScatter => "reduce_scatter",
            CommOp::AllGather => "all_gather",
            CommOp::Broadcast => "broadcast",
            CommOp::Barrier => "barrier",
        }
    }

    /// The op a `prof_ops` entry names (DeepSpeed's tensor-API names included); `None`
    /// for ops rsdeep never issues.
    pub fn from_deepspeed_name(name: &str) -> Option<CommOp> {
        match name {
            "all_reduce" => Some(CommOp::AllReduce),
            "reduce_scatter" | "reduce_scatter_tensor" => Some(CommOp::ReduceScatter),
            "all_gather" | "all_gather_into_tensor" => Some(CommOp::AllGather),
            "broadcast" => Some(CommOp::Broadcast),
            "barrier" => Some(CommOp::Barrier),
            _ => None,
        }
    }
}

/// (algbw, busbw) in Gbps of one `op` of `bytes` per rank over `world` ranks that took
/// `latency_ms`; zero for a latency that is not positive.
pub fn bandwidth_gbps(op: CommOp, bytes: u64, world: usize, latency_ms: f64) -> (f64, f64) {
    if latency_ms <= 0.0 {
        return (0.0, 0.0);
    }
    let (s, n) = (bytes as f64, world.max(1) as f64);
    let per_ms = |moved: f64| moved / latency_ms;
    let (algbw, busbw) = match op {
        CommOp::AllGather | CommOp::ReduceScatter => (per_ms(s * n), per_ms(s * n) * (n - 1.0) / n),
        CommOp::AllReduce => (per_ms(2.0 * s), per_ms(s) * 2.0 * (n - 1.0) / n),
        CommOp::Broadcast | CommOp::Barrier => (per_ms(s), per_ms(s)),
    };
    // Bytes per millisecond to gigabits per second: × 8 bits × 1e3 ms/s ÷ 1e9.
    (algbw * 8.0 / 1e6, busbw * 8.0 / 1e6)
}

/// `bytes` as DeepSpeed's `convert_size` prints it: 1024-based units, the value rounded
/// to 2 decimals (ties to even) and written as Python writes that float ("4.0 MB",
/// "1.12 KB"); zero is "0B".
pub fn convert_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KB", "MB", "GB", "TB", "PB", "EB"];
    if bytes == 0 {
        return "0B".into();
    }
    let (mut unit, mut scale) = (0usize, 1u128);
    while unit + 1 < UNITS.len() && u128::from(bytes) >= scale * 1024 {
        scale *= 1024;
        unit += 1;
    }
    let hundredths = div_round_half_even(u128::from(bytes) * 100, scale);
    let (whole, fraction) = (hundredths / 100, hundredths % 100);
    let decimals = match fraction % 10 {
        0 => (fraction / 10).to_string(),
        _ => format!("{fraction:02}"),
    };
    format!("{whole}.{decimals} {}", UNITS[unit])
}

/// `numerator / denominator` rounded to the nearest integer, ties to even.
fn div_round_half_even(numerator: u128, denominator: u128) -> u128 {
    let (quotient, remainder) = (numerator / denominator, numerator % denominator);
    match (2 * remainder).cmp(&denominator) {
        std::cmp::Ordering::Less => quotient,
        std::cmp::Ordering::Greater => quotient + 1,
        std::cmp::Ordering::Equal => quotient + (quotient & 1),
    }
}

/// DeepSpeed's `trim_mean(data, 0.1)`: the mean of the sorted values without the
/// round(10%) smallest and largest (Python's round: ties to even).
fn trimmed(latencies_ms: &[f64]) -> Vec<f64> {
    let mut sorted = latencies_ms.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let k = (n as f64 * 0.1).round_ties_even() as usize;
    sorted[k..n - k].to_vec()
}

fn mean(values: &[f64]) -> f64 {
    match values.len() {
        0 => 0.0,
        len => values.iter().sum::<f64>() / len as f64,
    }
}

/// One row of the summary: one op at one message size.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryRow {
    pub op: CommOp,
    /// Per-rank message bytes.
    pub bytes: u64,
    pub count: usize,
    pub total_latency_ms: f64,
    /// Trimmed means, as DeepSpeed's table.
    pub avg_latency_ms: f64,
    pub algbw_gbps: f64,
    pub busbw_gbps: f64,
}

impl SummaryRow {
    fn from_latencies(op: CommOp, bytes: u64, world: usize, latencies_ms: &[f64]) -> Self {
        let kept = trimmed(latencies_ms);
        let bandwidths: Vec<(f64, f64)> = kept
            .iter()
            .map(|&t| bandwidth_gbps(op, bytes, world, t))
            .collect();
        // Bandwidth falls as latency grows, so trimming the latencies trims the
        // bandwidths DeepSpeed sorts on their own.
        let algbws: Vec<f64> = bandwidths.iter().map(|b| b.0).collect();
        let busbws: Vec<f64> = bandwidths.iter().map(|b| b.1).collect();
        SummaryRow {
            op,
            bytes,
            count: latencies_ms.len(),
            total_latency_ms: latencies_ms.iter().sum(),
            avg_latency_ms: mean(&kept),
            algbw_gbps: mean(&algbws),
            busbw_gbps: mean(&busbws),
        }
    }
}

/// Latencies of one op, by message size.
struct OpLatencies {
    op: CommOp,
    by_bytes: BTreeMap<u64, Vec<f64>>,
}

/// The latencies of every profiled collective of one rank, ops in first-seen order (as
/// DeepSpeed lists them).
pub struct CommsLog {
    rank: usize,
    world_size: usize,
    verbose: bool,
    ops: Mutex<Vec<OpLatencies>>,
}

impl CommsLog {
    pub fn new(rank: usize, world_size: usize, verbose: bool) -> Self {
        CommsLog {
            rank,
            world_size,
            verbose,
            ops: Mutex::new(Vec::new()),
        }
    }

    fn ops(&self) -> MutexGuard<'_, Vec<OpLatencies>> {
        self.ops
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds one completed collective; with `verbose`, rank 0 prints DeepSpeed's line.
    pub fn record(&self, op: CommOp, bytes: u64, latency_ms: f64) {
        {
            let mut ops = self.ops();
            let index = match ops.iter().position(|o| o.op == op) {
                Some(index) => index,
                None => {
                    ops.push(OpLatencies {
                        op,
                        by_bytes: BTreeMap::new(),
                    });
                    ops.len() - 1
                }
            };
            ops[index]
                .by_bytes
                .entry(bytes)
                .or_default()
                .push(latency_ms);
        }
        if self.verbose && self.rank == 0 {
            eprintln!("[Rank 0] {}", self.verbose_line(op, bytes, latency_ms));
        }
    }

    /// DeepSpeed's per-op line: `comm op: ... | time (ms): ... | msg size: ... | algbw
    /// (Gbps): ... | busbw (Gbps): ...`.
    pub fn verbose_line(&self, op: CommOp, bytes: u64, latency_ms: f64) -> String {
        let (algbw, busbw) = bandwidth_gbps(op, bytes, self.world_size, latency_ms);
        format!(
            "comm op: {} | time (ms): {latency_ms:.2} | msg size: {} | algbw (Gbps): {algbw:.2} | busbw (Gbps): {busbw:.2}",
            op.name(),
            convert_size(bytes)
        )
    }

    /// One row per (op, message size): ops in first-seen order, sizes ascending.
    pub fn rows(&self) -> Vec<SummaryRow> {
        let ops = self.ops();
        ops.iter()
            .flat_map(|o| {
                o.by_bytes.iter().map(|(&bytes, latencies)| {
                    SummaryRow::from_latencies(o.op, bytes, self.world_size, latencies)
                })
            })
            .collect()
    }

    /// DeepSpeed's `log_summary` table: the column header, then per op a line with its
    /// name followed by one row per message size (columns 20 characters wide).
    pub fn summary(&self) -> String {
        let mut lines = vec![summary_header()];
        let mut current = None;
        for row in self.rows() {
            if current != Some(row.op) {
                lines.push(row.op.name().to_string());
                current = Some(row.op);
            }
            lines.push(summary_line(&row));
        }
        lines.join("\n")
    }
}

fn summary_header() -> String {
    [
        "Comm. Op",
        "Message Size",
        "Count",
        "Total Latency(ms)",
        "Avg Latency(ms)",
        "tput_avg (Gbps)",
        "busbw_avg (Gbps)",
    ]
    .iter()
    .map(|title| format!("{title:<20}"))
    .collect()
}

fn summary_line(row: &SummaryRow) -> String {
    format!(
        "{:<20}{:<20}{:<20}{:<20.2}{:<20.2}{:<20.2}{:<20.2}",
        "",
        convert_size(row.bytes),
        row.count,
        row.total_latency_ms,
        row.avg_latency_ms,
        row.algbw_gbps,
        row.busbw_gbps
    )
}

/// Bytes of `tensor`'s elements.
fn bytes_of(tensor: &Tensor) -> u64 {
    (tensor.numel() * tensor.kind().elt_size_in_bytes()) as u64
}

/// A `Communicator` that logs the collectives `comms_logger` profiles into a `CommsLog`
/// and passes everything through to the one it wraps.
pub struct LoggedComm {
    inner: Arc<dyn Communicator>,
    profiled: Vec<CommOp>,
    log: Arc<CommsLog>,
}

impl LoggedComm {
    /// Wraps `inner` with `config`'s op selection (`prof_all`, else `prof_ops`; names of
    /// ops rsdeep never issues select nothing) and verbosity.
    pub fn new(inner: Arc<dyn Communicator>, config: &CommsLoggerConfig) -> Self {
        let profiled = match config.prof_all {
            true => CommOp::ALL.to_vec(),
            false => profiled_ops(&config.prof_ops),
        };
        let log = CommsLog::new(inner.rank(), inner.world_size(), config.verbose);
        LoggedComm {
            inner,
            profiled,
            log: Arc::new(log),
        }
    }

    /// This rank's log so far.
    pub fn log(&self) -> &CommsLog {
        &self.log
    }

    /// DeepSpeed's `log_summary` table of this rank's collectives so far.
    pub fn summary(&self) -> String {
        self.log.summary()
    }

    /// Issues `op` through `issue`; when profiled, its `Work` records the latency from
    /// now to the end of its wait.
    fn timed(&self, op: CommOp, bytes: u64, issue: impl FnOnce() -> Result<Work>) -> Result<Work> {
        if !self.profiled.contains(&op) {
            return issue();
        }
        let started = Instant::now();
        let work = issue()?;
        let log = self.log.clone();
        Ok(Work::new(move || {
            work.wait()?;
            log.record(op, bytes, elapsed_ms(started));
            Ok(())
        }))
    }
}

/// The ops `prof_ops` names, without repeats.
fn profiled_ops(names: &[String]) -> Vec<CommOp> {
    let mut ops: Vec<CommOp> = Vec::new();
    for op in names.iter().filter_map(|n| CommOp::from_deepspeed_name(n)) {
        if !ops.contains(&op) {
            ops.push(op);
        }
    }
    ops
}

fn elapsed_ms(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1e3
}

impl Communicator for LoggedComm {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<Work> {
        self.timed(CommOp::AllReduce, bytes_of(tensor), || {
            self.inner.all_reduce(tensor, op)
        })
    }

    fn reduce_scatter(&self, input: &Tensor, output: &Tensor, op: ReduceOp) -> Result<Work> {
        self.timed(CommOp::ReduceScatter, bytes_of(output), || {
            self.inner.reduce_scatter(input, output, op)
        })
    }

    fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<Work> {
        self.timed(CommOp::AllGather, bytes_of(input), || {
            self.inner.all_gather(input, output)
        })
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Work> {
        self.timed(CommOp::Broadcast, bytes_of(tensor), || {
            self.inner.broadcast(tensor, root)
        })
    }

    fn barrier(&self) -> Result<()> {
        let work = self.timed(CommOp::Barrier, 0, || {
            self.inner.barrier()?;
            Ok(Work::done())
        })?;
        work.wait()
    }

    fn trace(&self) -> &TraceRecorder {
        self.inner.trace()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zero::LocalCommunicator;
    use tch::{Device, Kind};

    fn config(prof_all: bool, prof_ops: &[&str]) -> CommsLoggerConfig {
        CommsLoggerConfig {
            enabled: true,
            prof_all,
            prof_ops: prof_ops.iter().map(|s| s.to_string()).collect(),
            ..CommsLoggerConfig::default()
        }
    }

    /// A one-rank world wrapped with `config`.
    fn one_rank(config: &CommsLoggerConfig) -> LoggedComm {
        let mut world = LocalCommunicator::world(1);
        LoggedComm::new(Arc::new(world.remove(0)), config)
    }

    /// Issues all_reduce of 256 and 1024 f32 (twice), a reduce_scatter to 64 f32, an
    /// all_gather of 32 bf16, a broadcast of 8 f32 and a barrier.
    fn issue_some(comm: &LoggedComm) -> Result<()> {
        let floats = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu));
        comm.all_reduce(&floats(256), ReduceOp::Sum)?.wait()?;
        comm.all_reduce(&floats(1024), ReduceOp::Sum)?.wait()?;
        comm.all_reduce(&floats(1024), ReduceOp::Avg)?.wait()?;
        comm.reduce_scatter(&floats(64), &floats(64), ReduceOp::Sum)?
            .wait()?;
        let halves = Tensor::zeros([32], (Kind::BFloat16, Device::Cpu));
        comm.all_gather(&halves, &halves.copy())?.wait()?;
        comm.broadcast(&floats(8), 0)?.wait()?;
        comm.barrier()
    }

    fn counts(comm: &LoggedComm) -> Vec<(&'static str, u64, usize)> {
        let rows = comm.log().rows();
        rows.iter()
            .map(|r| (r.op.name(), r.bytes, r.count))
            .collect()
    }

    #[test]
    fn counts_and_bytes_are_aggregated_per_op_and_size() -> Result<()> {
        let comm = one_rank(&config(true, &[]));
        issue_some(&comm)?;
        assert_eq!(
            counts(&comm),
            vec![
                ("all_reduce", 1024, 1),
                ("all_reduce", 4096, 2),
                ("reduce_scatter", 256, 1),
                ("all_gather", 64, 1),
                ("broadcast", 32, 1),
                ("barrier", 0, 1),
            ]
        );
        let rows = comm.log().rows();
        assert!(rows.iter().all(|r| r.total_latency_ms >= 0.0));
        Ok(())
    }

    #[test]
    fn prof_ops_selects_ops_by_deepspeed_name() -> Result<()> {
        let comm = one_rank(&config(
            false,
            &[
                "reduce_scatter_tensor",
                "all_gather_into_tensor",
                "all_to_all_single",
            ],
        ));
        issue_some(&comm)?;
        assert_eq!(
            counts(&comm),
            vec![("reduce_scatter", 256, 1), ("all_gather", 64, 1)]
        );
        let nothing = one_rank(&config(false, &[]));
        issue_some(&nothing)?;
        assert!(nothing.log().rows().is_empty());
        Ok(())
    }

    #[test]
    fn bandwidths_follow_deepspeeds_rule() {
        // 1 MB per rank in 1 ms is 8.388608 Gbps of payload.
        let (s, t) = (1u64 << 20, 1.0);
        let unit = 8.0 * (1u64 << 20) as f64 / 1e6;
        let close = |(a, b): (f64, f64), (x, y): (f64, f64)| {
            assert!(
                (a - x).abs() < 1e-9 && (b - y).abs() < 1e-9,
                "{a},{b} vs {x},{y}"
            );
        };
        close(
            bandwidth_gbps(CommOp::AllGather, s, 4, t),
            (4.0 * unit, 3.0 * unit),
        );
        close(
            bandwidth_gbps(CommOp::ReduceScatter, s, 4, t),
            (4.0 * unit, 3.0 * unit),
        );
        close(
            bandwidth_gbps(CommOp::AllReduce, s, 4, t),
            (2.0 * unit, 1.5 * unit),
        );
        close(bandwidth_gbps(CommOp::Broadcast, s, 4, t), (unit, unit));
        close(
            bandwidth_gbps(CommOp::AllReduce, s, 4, 2.0 * t),
            (unit, 0.75 * unit),
        );
        close(bandwidth_gbps(CommOp::Barrier, 0, 4, t), (0.0, 0.0));
        close(bandwidth_gbps(CommOp::AllReduce, s, 4, 0.0), (0.0, 0.0));
    }

    #[test]
    fn sizes_are_written_as_deepspeeds_convert_size() {
        let cases = [
            (0, "0B"),
            (1, "1.0 B"),
            (1000, "1000.0 B"),
            (1024, "1.0 KB"),
            (1152, "1.12 KB"),
            (1536, "1.5 KB"),
            (4 << 20, "4.0 MB"),
            (12_950_000, "12.35 MB"),
            ((1 << 30) - 1, "1024.0 MB"),
            (3 << 30, "3.0 GB"),
        ];
        for (bytes, text) in cases {
            assert_eq!(convert_size(bytes), text, "{bytes} bytes");
        }
    }

    /// A line of DeepSpeed's table: every cell left-aligned in 20 characters.
    fn table_line(cells: [&str; 7]) -> String {
        cells.iter().map(|c| format!("{c:<20}")).collect()
    }

    #[test]
    fn summary_matches_deepspeeds_log_all_for_the_same_records() {
        let log = CommsLog::new(0, 2, false);
        // Ten 4 MB all_reduces of 1..=10 ms (the trimmed mean drops 1 and 10), then an
        // all_gather and a smaller all_reduce.
        for ms in 1..=10 {
            log.record(CommOp::AllReduce, 4 << 20, ms as f64);
        }
        log.record(CommOp::AllGather, 1024, 0.5);
        log.record(CommOp::AllReduce, 512, 2.0);
        // What DeepSpeed 0.19.8's `CommsLogger.log_all` prints for the same appends with
        // a world size of 2.
        let expected = [
            table_line([
                "Comm. Op",
                "Message Size",
                "Count",
                "Total Latency(ms)",
                "Avg Latency(ms)",
                "tput_avg (Gbps)",
                "busbw_avg (Gbps)",
            ]),
            "all_reduce".to_string(),
            table_line(["", "512.0 B", "1", "2.00", "2.00", "0.00", "0.00"]),
            table_line(["", "4.0 MB", "10", "55.00", "5.50", "15.34", "7.67"]),
            "all_gather".to_string(),
            table_line(["", "1.0 KB", "1", "0.50", "0.50", "0.03", "0.02"]),
        ];
        assert_eq!(log.summary(), expected.join("\n"));
        assert_eq!(
            log.verbose_line(CommOp::AllGather, 1024, 0.5),
            "comm op: all_gather | time (ms): 0.50 | msg size: 1.0 KB | algbw (Gbps): 0.03 | busbw (Gbps): 0.02"
        );
    }

    #[test]
    fn trimmed_mean_drops_a_tenth_at_each_end_like_deepspeed() {
        assert_eq!(trimmed(&[3.0]), vec![3.0]);
        // round(0.5) is 0 in Python (ties to even): nothing dropped of five.
        assert_eq!(trimmed(&[5.0, 1.0, 4.0, 2.0, 3.0]).len(), 5);
        let fifteen: Vec<f64> = (0..15).map(f64::from).collect();
        assert_eq!(
            trimmed(&fifteen),
            (2..13).map(f64::from).collect::<Vec<_>>()
        );
    }

    #[test]
    fn two_ranks_log_their_own_collectives_and_pass_results_through() -> Result<()> {
        let handles: Vec<_> = LocalCommunicator::world(2)
            .into_iter()
            .map(|comm| {
                std::thread::spawn(move || -> Result<(Vec<f32>, usize)> {
                    let logged = LoggedComm::new(Arc::new(comm), &config(true, &[]));
                    let rank = logged.rank() as f32;
                    let input = Tensor::from_slice(&[rank, rank]);
                    let output = Tensor::zeros([4], (Kind::Float, Device::Cpu));
                    logged.all_gather(&input, &output)?.wait()?;
                    let rows = logged.log().rows();
                    Ok((Vec::<f32>::try_from(&output)?, rows[0].count))
                })
            })
            .collect();
        for handle in handles {
            let (gathered, count) = handle.join().expect("a rank panicked")?;
            assert_eq!(gathered, vec![0.0, 0.0, 1.0, 1.0]);
            assert_eq!(count, 1);
        }
        Ok(())
    }
}
