//! The distributed sampler: which dataset indices each rank reads, in which order, and
//! where it stands, so that a run can be resumed at the exact next sample.
//!
//! Contract (torch `DistributedSampler`, made self-contained):
//! - The order of epoch `e` is a Fisher-Yates shuffle of `0..len` driven by SplitMix64
//!   seeded with `seed + e` (wrapping), reduced to a range without bias by rejection.
//!   SplitMix64 is written here, so the order never changes with a crate version.
//! - `drop_last = false`: the order is padded with its own first indices up to a multiple of
//!   `world_size` (some samples are seen twice per epoch). `drop_last = true`: the tail that
//!   does not fill a round is dropped. Either way every rank gets `per_rank_len` indices.
//! - Rank `r` takes positions `r, r + world_size, ...` of the order: shards are disjoint
//!   and, with `drop_last = false`, cover the dataset.
//! - `state()` is `(epoch, position)`: the number of indices this rank has consumed in the
//!   epoch. `restore(state)` continues from exactly there.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, well-distributed 64-bit generator.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound > 0`), by rejection of the biased top range.
    pub fn below(&mut self, bound: u64) -> u64 {
        let zone = u64::MAX - (u64::MAX % bound);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % bound;
            }
        }
    }
}

/// Where a rank stands: epoch and how many of its indices it has consumed in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub epoch: u64,
    pub position: usize,
}

/// Deterministic, resumable sharding of `0..len` over `world_size` ranks.
#[derive(Debug, Clone)]
pub struct DistributedSampler {
    len: usize,
    world_size: usize,
    rank: usize,
    shuffle: bool,
    seed: u64,
    drop_last: bool,
    epoch: u64,
    position: usize,
    order: Vec<usize>,
}

impl DistributedSampler {
    /// A sampler at epoch 0, position 0.
    pub fn new(
        len: usize,
        world_size: usize,
        rank: usize,
        shuffle: bool,
        seed: u64,
        drop_last: bool,
    ) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            return Err(Error::Data(format!(
                "sampler: rank {rank} outside world size {world_size}"
            )));
        }
        if len == 0 || (drop_last && len < world_size) {
            return Err(Error::Data(format!(
                "sampler: {len} samples cannot feed {world_size} ranks (drop_last={drop_last})"
            )));
        }
        let mut sampler = DistributedSampler {
            len,
            world_size,
            rank,
            shuffle,
            seed,
            drop_last,
            epoch: 0,
            position: 0,
            order: Vec::new(),
        };
        sampler.order = sampler.rank_order(0);
        Ok(sampler)
    }

    /// Indices each rank gets per epoch.
    pub fn per_rank_len(&self) -> usize {
        if self.drop_last {
            self.len / self.world_size
        } else {
            self.len.div_ceil(self.world_size)
        }
    }

    /// This rank's indices for `epoch`, in reading order.
    pub fn rank_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            let mut rng = SplitMix64::new(self.seed.wrapping_add(epoch));
            for i in (1..order.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                order.swap(i, j);
            }
        }
        let total = self.per_rank_len() * self.world_size;
        let padding: Vec<usize> = order
            .iter()
            .copied()
            .cycle()
            .take(total.saturating_sub(self.len))
            .collect();
        order.extend(padding);
        order.truncate(total);
        order
            .into_iter()
            .skip(self.rank)
            .step_by(self.world_size)
            .collect()
    }

    /// Moves to the start of `epoch`.
    pub fn set_epoch(&mut self, epoch: u64) {
        if epoch != self.epoch || self.order.is_empty() {
            self.order = self.rank_order(epoch);
        }
        self.epoch = epoch;
        self.position = 0;
    }

    /// The current epoch and position, for checkpoints.
    pub fn state(&self) -> SamplerState {
        SamplerState {
            epoch: self.epoch,
            position: self.position,
        }
    }

    /// Continues exactly where `state` was taken.
    pub fn restore(&mut self, state: SamplerState) -> Result<()> {
        if state.position > self.per_rank_len() {
            return Err(Error::Data(format!(
                "sampler: saved position {} beyond the {} indices of an epoch",
                state.position,
                self.per_rank_len()
            )));
        }
        self.set_epoch(state.epoch);
        self.position = state.position;
        Ok(())
    }

    /// The next index of this epoch, or `None` at its end (then call `set_epoch`).
    pub fn next_index(&mut self) -> Option<usize> {
        let index = self.order.get(self.position).copied()?;
        self.position += 1;
        Some(index)
    }

    /// The next `n` indices, crossing into the following epoch when this one ends.
    pub fn next_indices(&mut self, n: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.next_index() {
                Some(i) => out.push(i),
                None => self.set_epoch(self.epoch + 1),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn splitmix64_matches_reference_values() {
        // First outputs for seed 1234567 of the public-domain C reference implementation.
        let mut rng = SplitMix64::new(1234567);
        assert_eq!(rng.next_u64(), 6457827717110365317);
        assert_eq!(rng.next_u64(), 3203168211198807973);
    }

    #[test]
    fn shards_are_disjoint_and_cover() {
        let shards: Vec<Vec<usize>> = (0..3)
            .map(|r| {
                DistributedSampler::new(10, 3, r, true, 7, false)
                    .unwrap()
                    .rank_order(0)
            })
            .collect();
        let all: Vec<usize> = shards.concat();
        assert_eq!(all.len(), 12);
        let distinct: HashSet<usize> = all.iter().copied().collect();
        assert_eq!(distinct.len(), 10);
        let dropped: Vec<usize> = (0..3)
            .flat_map(|r| {
                DistributedSampler::new(10, 3, r, true, 7, true)
                    .unwrap()
                    .rank_order(0)
            })
            .collect();
        assert_eq!(dropped.len(), 9);
        assert_eq!(dropped.iter().copied().collect::<HashSet<_>>().len(), 9);
    }

    #[test]
    fn epochs_differ_and_are_deterministic() {
        let s = DistributedSampler::new(100, 1, 0, true, 42, false).unwrap();
        assert_eq!(s.rank_order(3), s.rank_order(3));
        assert_ne!(s.rank_order(0), s.rank_order(1));
        let unshuffled = DistributedSampler::new(5, 1, 0, false, 42, false).unwrap();
        assert_eq!(unshuffled.rank_order(9), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn restore_continues_exactly() {
        let mut a = DistributedSampler::new(50, 2, 1, true, 3, false).unwrap();
        a.next_indices(40);
        let saved = a.state();
        let expected = a.next_indices(30);
        let mut b = DistributedSampler::new(50, 2, 1, true, 3, false).unwrap();
        b.restore(saved).unwrap();
        assert_eq!(b.next_indices(30), expected);
        assert!(
            b.restore(SamplerState {
                epoch: 0,
                position: 26
            })
            .is_err()
        );
    }
}
