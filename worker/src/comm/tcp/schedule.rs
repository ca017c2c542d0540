//! Ring schedules: which region each rank sends and receives at every step of each
//! collective (the engine that runs them is `comm/tcp/ring.rs`).
//!
//! With `n` ranks, a buffer is cut into `n` segments (balanced: the first `numel % n`
//! segments get one extra element). Reduce-scatter takes `n - 1` steps: at step `s`
//! rank `r` sends segment `r-1-s` and receives segment `r-2-s`, reducing it with its own
//! copy; after the last step rank `r` owns the full reduction of segment `r` (and for
//! `Avg` divides it once). Segment `k` is therefore accumulated in ring order starting
//! at rank `k+1`: `((x[k+1] + x[k+2]) + ...) + x[k]`. All-gather then circulates the
//! owned segments for `n - 1` steps (send `r-s`, receive `r-s-1`), so every rank ends
//! with the owner's bytes: results are bit-identical across ranks.

use super::ring::{Incoming, Region, Step};

/// `(offset, len)` in elements of segment `k` of `numel` elements cut `world` ways.
pub(crate) fn balanced_segment(numel: usize, world: usize, k: usize) -> (usize, usize) {
    let (base, extra) = (numel / world, numel % world);
    (k * base + k.min(extra), base + usize::from(k < extra))
}

fn wrap(value: isize, world: usize) -> usize {
    value.rem_euclid(world as isize) as usize
}

/// Segments of `region` (of `numel` elements of `elem_size` bytes), balanced.
pub(crate) fn balanced_segments(
    region: Region,
    numel: usize,
    world: usize,
    elem_size: usize,
) -> Vec<Region> {
    (0..world)
        .map(|k| {
            let (offset, len) = balanced_segment(numel, world, k);
            region.sub(offset * elem_size, len * elem_size)
        })
        .collect()
}

/// Equal segments of `region`, each `seg_bytes` long.
pub(crate) fn equal_segments(region: Region, world: usize, seg_bytes: usize) -> Vec<Region> {
    (0..world)
        .map(|k| region.sub(k * seg_bytes, seg_bytes))
        .collect()
}

/// Reduce-scatter steps over segment lists: step `s` sends `sources(s)[r-1-s]` and
/// reduces segment `r-2-s` of `locals` into `dests(s)`.
fn reduce_scatter_steps(
    rank: usize,
    world: usize,
    sends_from: impl Fn(usize) -> Vec<Region>,
    locals: &[Region],
    dests: impl Fn(usize) -> Vec<Region>,
    average: bool,
) -> Vec<Step> {
    (0..world - 1)
        .map(|s| {
            let send = wrap(rank as isize - 1 - s as isize, world);
            let recv = wrap(rank as isize - 2 - s as isize, world);
            let last = s == world - 2;
            Step {
                send: Some(sends_from(s)[send]),
                recv: Some(Incoming::Reduce {
                    into: dests(s)[recv],
                    local: locals[recv],
                    average: average && last,
                }),
            }
        })
        .collect()
}

fn all_gather_steps(rank: usize, world: usize, segments: &[Region]) -> Vec<Step> {
    (0..world - 1)
        .map(|s| Step {
            send: Some(segments[wrap(rank as isize - s as isize, world)]),
            recv: Some(Incoming::Copy {
                into: segments[wrap(rank as isize - s as isize - 1, world)],
            }),
        })
        .collect()
}

/// In-place all-reduce of `buffer` (`numel` elements): reduce-scatter then all-gather.
pub(crate) fn all_reduce(
    rank: usize,
    world: usize,
    buffer: Region,
    numel: usize,
    elem_size: usize,
    average: bool,
) -> Vec<Step> {
    let segments = balanced_segments(buffer, numel, world, elem_size);
    let mut steps = reduce_scatter_steps(
        rank,
        world,
        |_| segments.clone(),
        &segments,
        |_| segments.clone(),
        average,
    );
    steps.extend(all_gather_steps(rank, world, &segments));
    steps
}

/// Out-of-place reduce-scatter: `input` is `world` segments of `output.len()` bytes and
/// is not modified; partial sums live in `scratch` (same size as `input`).
pub(crate) fn reduce_scatter(
    rank: usize,
    world: usize,
    input: Region,
    output: Region,
    scratch: Region,
    average: bool,
) -> Vec<Step> {
    let seg_bytes = output.len();
    let inputs = equal_segments(input, world, seg_bytes);
    let partials = equal_segments(scratch, world, seg_bytes);
    let mut finals = partials.clone();
    finals[rank] = output;
    reduce_scatter_steps(
        rank,
        world,
        |s| {
            if s == 0 {
                inputs.clone()
            } else {
                partials.clone()
            }
        },
        &inputs,
        |s| {
            if s == world - 2 {
                finals.clone()
            } else {
                partials.clone()
            }
        },
        average,
    )
}

/// All-gather in `output` (`world` segments); the caller has put this rank's input in
/// segment `rank` before running it.
pub(crate) fn all_gather(rank: usize, world: usize, output: Region, seg_bytes: usize) -> Vec<Step> {
    all_gather_steps(rank, world, &equal_segments(output, world, seg_bytes))
}

/// Pipelined chain broadcast from `root` along the ring.
pub(crate) fn broadcast(rank: usize, world: usize, root: usize, buffer: Region) -> Vec<Step> {
    let position = wrap(rank as isize - root as isize, world);
    let receive = Step {
        send: None,
        recv: Some(Incoming::Copy { into: buffer }),
    };
    let forward = Step {
        send: Some(buffer),
        recv: None,
    };
    match position {
        0 => vec![forward],
        p if p == world - 1 => vec![receive],
        _ => vec![receive, forward],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_segments_cover_everything_once() {
        for numel in [0usize, 1, 7, 16, 17, 1000] {
            for world in 1..=9 {
                let mut next = 0;
                for k in 0..world {
                    let (offset, len) = balanced_segment(numel, world, k);
                    assert_eq!(offset, next, "segments are contiguous");
                    next += len;
                }
                assert_eq!(next, numel);
            }
        }
    }

    #[test]
    fn reduce_scatter_ends_on_own_segment_and_links_match() {
        let mut data = vec![0u8; 4 * 5 * 8];
        let mut out = vec![0u8; 8];
        let mut scratch = vec![0u8; data.len()];
        for world in 2..=5 {
            for rank in 0..world {
                // SAFETY: the vectors outlive the regions; nothing is dereferenced here.
                let (input, output, scratch) = unsafe {
                    (
                        Region::new(data.as_mut_ptr(), world * 8),
                        Region::new(out.as_mut_ptr(), 8),
                        Region::new(scratch.as_mut_ptr(), world * 8),
                    )
                };
                let steps = reduce_scatter(rank, world, input, output, scratch, true);
                assert_eq!(steps.len(), world - 1);
                let Some(Incoming::Reduce { into, average, .. }) = steps[world - 2].recv else {
                    panic!("last step must reduce")
                };
                assert!(
                    into.same_memory(&output),
                    "rank {rank} finishes in its output"
                );
                assert!(average, "the owner divides once, on the last step");
            }
        }
    }
}
