//! The training data order: which examples each rank reads at every optimizer step —
//! Hugging Face Trainer's order (transformers 5 + accelerate), reproduced exactly so that
//! rsdeep's loss curve can be laid over HF Trainer + DeepSpeed's for the same seed.
//!
//! Contract (checked against orders recorded from the real Trainer in
//! `tests/fixtures/hf_order/`):
//! - Permutation of epoch `e`: `random` draws torch's CPU `randperm(n)` from a generator
//!   seeded with `seed + e` (accelerate's seedable sampler; `seed` is `data_seed`, else the
//!   Trainer's `seed`): a forward Fisher–Yates over MT19937, `z = next_u32() % (n - i)`,
//!   swap `i` and `i + z` (64-bit draws from two words when `n` nears 2^32).
//!   `sequential` is `0..n`. `group_by_length` groups as transformers does (megabatches
//!   of `min(n / (4·b·GA), 50)` windows of the permutation, each sorted longest first, the
//!   longest example moved to the very front); transformers draws that permutation from
//!   torch's global generator, which rsdeep does not mirror, so it is not order-exact.
//! - Batches: the permutation cut into `batch`-sized batches; the last is shorter, or
//!   dropped with `drop_last`.
//! - Dealing (accelerate's batch sharding, whole batches, even batches): global batch `k`
//!   goes to rank `k mod world`; a last round that does not give every rank a full batch
//!   is completed with indices from the start of the epoch (or dropped with `drop_last`).
//!   One process is not sharded, so its last batch may be short.
//! - Windows: each rank's batches of an epoch are taken `grad_accum` at a time; the last
//!   window of an epoch may be shorter. Updates per epoch = max(ceil(batches / GA), 1).
//! - Position: the global step alone fixes epoch and window, so a resume — at the same
//!   or another world size — computes where to continue and never replays data.

use crate::error::{Error, Result};

/// Most windows per megabatch of `group_by_length` (transformers' `get_length_grouped_indices`).
const GROUP_BY_LENGTH_MAX_MEGABATCH: usize = 50;

/// MT19937 as torch's CPU generator runs it: 32-bit words, seeded from the low 32 bits.
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; Self::N],
    index: usize,
}

impl Mt19937 {
    const N: usize = 624;
    const M: usize = 397;

    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; Self::N];
        state[0] = seed as u32;
        for j in 1..Self::N {
            let previous = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(previous ^ (previous >> 30))
                .wrapping_add(j as u32);
        }
        Mt19937 {
            state,
            index: Self::N,
        }
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= Self::N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// torch's `random64`: the first word high, the second low.
    pub fn next_u64(&mut self) -> u64 {
        let high = self.next_u32() as u64;
        let low = self.next_u32() as u64;
        (high << 32) | low
    }

    fn twist(&mut self) {
        for i in 0..Self::N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % Self::N] & 0x7fff_ffff);
            let mut next = self.state[(i + Self::M) % Self::N] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }
}

/// `torch.randperm(n, generator=torch.Generator().manual_seed(seed))` on the CPU.
pub fn torch_randperm(n: usize, seed: u64) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    let mut rng = Mt19937::new(seed);
    let small = (n as u64) < (u32::MAX / 20) as u64;
    for i in 0..n.saturating_sub(1) {
        let span = (n - i) as u64;
        let draw = if small {
            rng.next_u32() as u64
        } else {
            rng.next_u64()
        };
        perm.swap(i, i + (draw % span) as usize);
    }
    perm
}

/// transformers' `train_sampling_strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Random,
    Sequential,
    GroupByLength,
}

/// Everything the order depends on.
#[derive(Debug, Clone)]
pub struct OrderConfig {
    pub len: usize,
    pub world_size: usize,
    pub batch: usize,
    pub grad_accum: usize,
    pub strategy: Strategy,
    /// `data_seed`, else the Trainer's `seed`.
    pub seed: u64,
    pub drop_last: bool,
}

/// One epoch dealt to ranks: `[rank][batch]` → dataset indices.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochBatches {
    pub epoch: u64,
    pub ranks: Vec<Vec<Vec<usize>>>,
}

/// One optimizer step's micro-batches on every rank: `[rank][micro]` → dataset indices.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub ranks: Vec<Vec<Vec<usize>>>,
    /// Epochs done after this step, as the Trainer logs it (epoch + batches done / batches).
    pub epoch_after: f64,
}

impl Window {
    /// Micro-steps in this window (the same on every rank).
    pub fn micro_steps(&self) -> usize {
        self.ranks.first().map_or(0, Vec::len)
    }
}

/// The Trainer's data order for one run; `lengths` (example token counts) is needed only
/// by `group_by_length`.
#[derive(Debug, Clone)]
pub struct TrainOrder {
    config: OrderConfig,
    lengths: Vec<usize>,
    batches_per_rank: usize,
    cached: Option<EpochBatches>,
}

impl TrainOrder {
    pub fn new(config: OrderConfig, lengths: Vec<usize>) -> Result<Self> {
        if config.world_size == 0 || config.batch == 0 || config.grad_accum == 0 {
            return Err(Error::Data(
                "world size, per-device batch and gradient accumulation must all be at least 1"
                    .into(),
            ));
        }
        if config.strategy == Strategy::GroupByLength && lengths.len() != config.len {
            return Err(Error::Data(format!(
                "group_by_length needs one length per example ({} lengths for {} examples)",
                lengths.len(),
                config.len
            )));
        }
        let mut order = TrainOrder {
            config,
            lengths,
            batches_per_rank: 0,
            cached: None,
        };
        let first = order.epoch(0);
        order.batches_per_rank = first.ranks[0].len();
        if order.batches_per_rank == 0 {
            let c = &order.config;
            return Err(Error::Data(format!(
                "{} examples give each of {} ranks no batch of {} (dataloader_drop_last = {}): add data or lower per_device_train_batch_size",
                c.len, c.world_size, c.batch, c.drop_last
            )));
        }
        order.cached = Some(first);
        Ok(order)
    }

    /// Batches each rank reads per epoch (the Trainer's `len(train_dataloader)`).
    pub fn batches_per_rank(&self) -> usize {
        self.batches_per_rank
    }

    /// Optimizer updates per epoch: max(ceil(batches / GA), 1).
    pub fn updates_per_epoch(&self) -> u64 {
        self.batches_per_rank
            .div_ceil(self.config.grad_accum)
            .max(1) as u64
    }

    /// The micro-batches of the `step`-th optimizer step (0-based) on every rank.
    pub fn window(&mut self, step: u64) -> Window {
        let per_epoch = self.updates_per_epoch();
        let (epoch, update) = (step / per_epoch, (step % per_epoch) as usize);
        if self.cached.as_ref().map(|c| c.epoch) != Some(epoch) {
            self.cached = Some(self.epoch(epoch));
        }
        let batches = self.cached.as_ref().map_or(&[][..], |c| &c.ranks[..]);
        let ga = self.config.grad_accum;
        let start = update * ga;
        let end = (start + ga).min(self.batches_per_rank);
        let ranks = batches
            .iter()
            .map(|rank| rank[start..end].to_vec())
            .collect();
        Window {
            ranks,
            epoch_after: epoch as f64 + end as f64 / self.batches_per_rank as f64,
        }
    }

    /// Every rank's batches of `epoch`.
    pub fn epoch(&self, epoch: u64) -> EpochBatches {
        let c = &self.config;
        let order = self.permutation(epoch);
        let batches: Vec<Vec<usize>> = order
            .chunks(c.batch)
            .filter(|b| !c.drop_last || b.len() == c.batch)
            .map(<[usize]>::to_vec)
            .collect();
        let ranks = if c.world_size == 1 {
            vec![batches]
        } else {
            (0..c.world_size)
                .map(|rank| shard_batches(&batches, c.batch, c.world_size, rank, c.drop_last))
                .collect()
        };
        EpochBatches { epoch, ranks }
    }

    fn permutation(&self, epoch: u64) -> Vec<usize> {
        let c = &self.config;
        let seed = c.seed.wrapping_add(epoch);
        match c.strategy {
            Strategy::Sequential => (0..c.len).collect(),
            Strategy::Random => torch_randperm(c.len, seed),
            Strategy::GroupByLength => self.length_grouped(torch_randperm(c.len, seed)),
        }
    }

    /// `order` in megabatches sorted longest first, the longest example first overall.
    fn length_grouped(&self, mut order: Vec<usize>) -> Vec<usize> {
        let c = &self.config;
        let window = c.batch * c.grad_accum;
        let windows = (c.len / (window * 4)).clamp(1, GROUP_BY_LENGTH_MAX_MEGABATCH);
        let length = |i: usize| self.lengths[i];
        let mut heads = Vec::new();
        for (m, megabatch) in order.chunks_mut(window * windows).enumerate() {
            megabatch.sort_by_key(|&i| std::cmp::Reverse(length(i)));
            heads.push((m * window * windows, length(megabatch[0])));
        }
        let longest = heads
            .iter()
            .max_by_key(|(at, len)| (*len, std::cmp::Reverse(*at)));
        if let Some(&(at, _)) = longest {
            order.swap(0, at);
        }
        order
    }
}

/// accelerate's whole-batch sharding with even batches, for one rank: batch `k` to rank
/// `k mod world` while every rank of a round gets a full batch; then (without
/// `drop_last`) the ranks' remaining full batches, and the round completed with indices
/// cycled from the epoch's first `world` batches.
fn shard_batches(
    batches: &[Vec<usize>],
    batch_size: usize,
    world: usize,
    rank: usize,
    drop_last: bool,
) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut initial: Vec<usize> = batches.iter().take(world).flatten().copied().collect();
    let mut pending: Option<&Vec<usize>> = None;
    for (idx, batch) in batches.iter().enumerate() {
        if idx % world == rank {
            pending = Some(batch);
        }
        if idx % world == world - 1 && batch.len() == batch_size {
            out.extend(pending.take().cloned());
        }
    }
    if drop_last || initial.is_empty() {
        return out;
    }
    if let Some(own) = pending.filter(|b| b.len() == batch_size) {
        out.push(own.clone());
    }
    while initial.len() < world * batch_size {
        initial.extend_from_within(..);
    }
    let mut idx = batches.len() - 1;
    let mut partial = batches[idx].clone();
    if partial.len() == batch_size {
        partial.clear();
        idx += 1;
    }
    let mut cursor = 0;
    while !idx.is_multiple_of(world) || !partial.is_empty() {
        let end = cursor + batch_size - partial.len();
        partial.extend_from_slice(&initial[cursor..end]);
        if idx % world == rank {
            out.push(std::mem::take(&mut partial));
        }
        partial.clear();
        cursor = end;
        idx += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(len: usize, world: usize, batch: usize, grad_accum: usize) -> TrainOrder {
        TrainOrder::new(
            OrderConfig {
                len,
                world_size: world,
                batch,
                grad_accum,
                strategy: Strategy::Random,
                seed: 42,
                drop_last: false,
            },
            Vec::new(),
        )
        .unwrap()
    }

    #[test]
    fn mt19937_matches_the_standard_reference_output() {
        // The 10000th output of the C++ standard's mt19937 seeded with 5489 is 4123659995.
        let mut rng = Mt19937::new(5489);
        let value = (0..10_000).map(|_| rng.next_u32()).last();
        assert_eq!(value, Some(4_123_659_995));
    }

    #[test]
    fn randperm_is_a_permutation() {
        let mut perm = torch_randperm(1000, 7);
        assert_ne!(perm, (0..1000).collect::<Vec<_>>());
        perm.sort_unstable();
        assert_eq!(perm, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn even_batches_give_every_rank_the_same_count() {
        let order = order(13, 4, 2, 1);
        let epoch = order.epoch(0);
        assert!(epoch.ranks.iter().all(|r| r.len() == 2));
        assert!(epoch.ranks.iter().flatten().all(|b| b.len() == 2));
        let seen: std::collections::BTreeSet<_> = epoch.ranks.iter().flatten().flatten().collect();
        assert_eq!(seen.len(), 13);
    }

    #[test]
    fn group_by_length_sorts_megabatches_and_puts_the_longest_first() {
        let lengths: Vec<usize> = (0..40).map(|i| (i * 7) % 23 + 1).collect();
        let config = OrderConfig {
            len: 40,
            world_size: 1,
            batch: 2,
            grad_accum: 1,
            strategy: Strategy::GroupByLength,
            seed: 3,
            drop_last: false,
        };
        let order = TrainOrder::new(config, lengths.clone()).unwrap();
        let flat: Vec<usize> = order.epoch(0).ranks[0].concat();
        let longest = *lengths.iter().max().unwrap();
        assert_eq!(lengths[flat[0]], longest);
        // 40 / (2 * 4) = 5 windows of 2 per megabatch: each megabatch of 10 sorted longest
        // first, but for its head, which may have been swapped with the longest example.
        for megabatch in flat.chunks(10) {
            let l: Vec<usize> = megabatch[1..].iter().map(|&i| lengths[i]).collect();
            assert!(l.windows(2).all(|w| w[0] >= w[1]), "{l:?}");
        }
        let mut seen = flat.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..40).collect::<Vec<_>>());
    }

    #[test]
    fn a_window_is_every_rank_s_next_batches_and_the_last_may_be_short() {
        let mut order = order(12, 2, 2, 2);
        assert_eq!(order.batches_per_rank(), 3);
        assert_eq!(order.updates_per_epoch(), 2);
        assert_eq!(order.window(0).micro_steps(), 2);
        let last = order.window(1);
        assert_eq!(last.micro_steps(), 1);
        assert_eq!(last.epoch_after, 1.0);
        assert_ne!(order.window(2), order.window(0));
    }
}
