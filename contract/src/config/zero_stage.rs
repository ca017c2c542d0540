//! The ZeRO stage as a type: which of optimizer state, gradients and parameters each rank
//! keeps only a slice of. `zero_optimization.stage` is parsed straight into it; code that
//! acts on the stage asks these named predicates instead of comparing numbers.

use serde::{Deserialize, Serialize};

/// ZeRO stage 0 (plain data parallel) to 3; JSON carries the number (an out-of-range one
/// is refused when the config is parsed, naming the key).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(try_from = "u8", into = "u8")]
pub enum ZeroStage {
    /// Every rank keeps everything (DDP).
    #[default]
    Zero,
    /// Optimizer state (fp32 masters, Adam moments) partitioned.
    One,
    /// + gradients partitioned (reduce-scatter).
    Two,
    /// + parameters partitioned (gathered block by block for forward and backward).
    Three,
}

/// A number that is not a ZeRO stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not a ZeRO stage: use 0, 1, 2 or 3")]
pub struct NotAZeroStage(pub u8);

impl ZeroStage {
    pub const ALL: [ZeroStage; 4] = [
        ZeroStage::Zero,
        ZeroStage::One,
        ZeroStage::Two,
        ZeroStage::Three,
    ];

    /// 0..=3, as DeepSpeed numbers it.
    pub fn number(self) -> u8 {
        self as u8
    }

    /// Optimizer state is split across ranks (stages 1-3).
    pub fn partitions_optimizer_state(self) -> bool {
        self >= ZeroStage::One
    }

    /// Rank `rank` of `world_size`'s slice of the optimizer state and the number of slices:
    /// (rank, world_size) when it is partitioned, else the one whole slice (0, 1).
    pub fn optimizer_partition(self, rank: usize, world_size: usize) -> (usize, usize) {
        match self.partitions_optimizer_state() {
            true => (rank, world_size),
            false => (0, 1),
        }
    }

    /// Gradients are reduce-scattered to their owners instead of all-reduced (stages 2-3).
    pub fn partitions_gradients(self) -> bool {
        self >= ZeroStage::Two
    }

    /// Parameters live only as slices between uses (stage 3).
    pub fn partitions_parameters(self) -> bool {
        self == ZeroStage::Three
    }
}

impl TryFrom<u8> for ZeroStage {
    type Error = NotAZeroStage;

    fn try_from(number: u8) -> Result<Self, NotAZeroStage> {
        ZeroStage::ALL
            .get(number as usize)
            .copied()
            .ok_or(NotAZeroStage(number))
    }
}

impl From<ZeroStage> for u8 {
    fn from(stage: ZeroStage) -> u8 {
        stage.number()
    }
}

impl std::fmt::Display for ZeroStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.number())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_and_predicates_follow_deepspeeds_stages() {
        for (n, stage) in ZeroStage::ALL.into_iter().enumerate() {
            assert_eq!(ZeroStage::try_from(n as u8), Ok(stage));
            assert_eq!(stage.number() as usize, n);
            assert_eq!(stage.partitions_optimizer_state(), n >= 1);
            assert_eq!(stage.partitions_gradients(), n >= 2);
            assert_eq!(stage.partitions_parameters(), n == 3);
            let expected = if n >= 1 { (2, 4) } else { (0, 1) };
            assert_eq!(stage.optimizer_partition(2, 4), expected);
        }
        assert_eq!(ZeroStage::try_from(4), Err(NotAZeroStage(4)));
        assert_eq!(serde_json::to_string(&ZeroStage::Two).unwrap(), "2");
        assert_eq!(
            serde_json::from_str::<ZeroStage>("3").unwrap(),
            ZeroStage::Three
        );
        assert!(serde_json::from_str::<ZeroStage>("7").is_err());
    }
}
