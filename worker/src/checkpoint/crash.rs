//! Crash injection for the crash-safety tests: when `RSDEEP_CHECKPOINT_KILL_AT` is
//! `POINT:STEP` (or `POINT:STEP:RANK`, to kill only the worker whose `RANK` environment
//! variable is RANK), the process sends itself SIGKILL (kill -9: no unwinding, no
//! buffered writes flushed) on reaching point POINT of the save of step STEP. Unset (always, in
//! production) every point is a no-op after one environment read. The points, in
//! protocol order, are `KILL_POINTS`; `worker/tests/checkpoint_crash.rs` kills at each.

use std::sync::OnceLock;

/// Environment variable naming the kill point: `POINT:STEP`.
pub const KILL_ENV: &str = rsdeep_contract::env::CHECKPOINT_KILL_AT;

/// Every point a save can be killed at, in the order the protocol passes them.
pub const KILL_POINTS: [&str; 11] = [
    "tmp_dir_created",
    "partition_partly_written",
    "partition_written",
    "leader_files_written",
    "manifest_part_written",
    "manifest_parts_merged",
    "weights_written",
    "manifest_written",
    "renamed_into_place",
    "latest_updated",
    "rotation_retired_one",
];

fn target() -> Option<&'static (String, u64)> {
    static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
    TARGET
        .get_or_init(|| parse_target(&std::env::var(KILL_ENV).ok()?, std::env::var("RANK").ok()))
        .as_ref()
}

/// `POINT:STEP[:RANK]` -> the point and step, when this process (`rank`) is targeted.
fn parse_target(value: &str, rank: Option<String>) -> Option<(String, u64)> {
    let mut parts = value.split(':');
    let point = parts.next()?.to_string();
    let step = parts.next()?.parse().ok()?;
    match parts.next() {
        Some(wanted) if Some(wanted) != rank.as_deref() => None,
        _ => Some((point, step)),
    }
}

/// Kills this process with SIGKILL if `point` of step `step`'s save is the target.
pub(crate) fn crash_point(point: &str, step: u64) {
    if let Some((name, at)) = target()
        && name == point
        && *at == step
    {
        eprintln!("rsdeep: {KILL_ENV}: killing this process at {point} of step {step}");
        // SAFETY: kill(2) on our own pid; no memory is touched.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_target;

    #[test]
    fn targets_every_rank_or_only_the_named_one() {
        let any = parse_target("manifest_written:4", Some("1".into()));
        assert_eq!(any, Some(("manifest_written".to_string(), 4)));
        assert_eq!(
            parse_target("manifest_written:4:1", Some("1".into())).map(|t| t.1),
            Some(4)
        );
        assert_eq!(parse_target("manifest_written:4:1", Some("0".into())), None);
        assert_eq!(parse_target("manifest_written:x", None), None);
    }
}
