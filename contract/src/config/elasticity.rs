//! DeepSpeed's `elasticity` block, version 0.1: instead of the three batch keys, the
//! DeepSpeed config names the largest acceptable global batch and the micro batch sizes
//! the model fits, and the global batch is chosen so that as many world sizes as possible
//! can run it unchanged (only the micro batch and the gradient accumulation differ). A job
//! that loses ranks then keeps its convergence behaviour, as long as the new world size is
//! one of the valid ones.
//!
//! The rule, as older DeepSpeed computed it (`compute_elastic_config`, removed in 0.19.8):
//! each micro batch size and their least common multiple is a base; each base is scaled by
//! the largest number of `HIGHLY_COMPOSITE` not above `max_train_batch_size / base` (a base
//! already at or above the maximum is kept as it is, even above it); for each candidate the
//! valid world sizes are the divisors, within `[min_gpus, max_gpus]`, of candidate / micro
//! for every micro batch size dividing it; the candidate with the most valid world sizes
//! wins, ties going to the larger candidate (or the smaller with `prefer_larger_batch`
//! false). At a given world size the micro batch is the largest micro batch size dividing
//! batch / world size, and gradient accumulation follows from DeepSpeed's batch rule.
//!
//! `take_block` removes the block from the raw DeepSpeed JSON (so the schema never sees
//! it) and types it only when enabled, as DeepSpeed reads a disabled block not at all.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::error::ConfigError;
use super::json_errors;

/// The thirty-eight smallest highly composite numbers, the scale factors DeepSpeed tries
/// (enough for global batches up to 720720 times a micro batch size).
const HIGHLY_COMPOSITE: [u64; 38] = [
    1, 2, 4, 6, 12, 24, 36, 48, 60, 120, 180, 240, 360, 720, 840, 1260, 1680, 2520, 5040, 7560,
    10080, 15120, 20160, 25200, 27720, 45360, 50400, 55440, 83160, 110880, 166320, 221760, 277200,
    332640, 498960, 554400, 665280, 720720,
];

/// The batch keys the block takes over.
pub const BATCH_KEYS: [&str; 3] = [
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
];

/// The block as written, DeepSpeed's key names; absent keys take DeepSpeed's defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBlock {
    enabled: Option<bool>,
    max_train_batch_size: Option<u64>,
    micro_batch_sizes: Option<Vec<u64>>,
    min_gpus: Option<u64>,
    max_gpus: Option<u64>,
    /// Read by cluster schedulers only; checked, no effect here.
    min_time: Option<f64>,
    /// A number or a numeric string, as DeepSpeed accepts both.
    version: Option<Value>,
    prefer_larger_batch: Option<bool>,
    ignore_non_elastic_batch_info: Option<bool>,
    /// Version 0.2 keys; version 0.1 ignores the first and refuses the second above 1.
    num_gpus_per_node: Option<u64>,
    model_parallel_size: Option<u64>,
}

/// An enabled, checked version-0.1 block and where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Elasticity {
    pub max_train_batch_size: u64,
    pub micro_batch_sizes: Vec<u64>,
    pub min_gpus: u64,
    pub max_gpus: u64,
    pub prefer_larger_batch: bool,
    pub ignore_non_elastic_batch_info: bool,
    file: PathBuf,
    /// `deepspeed.elasticity` for an inline section, `elasticity` in a DeepSpeed file.
    key: String,
}

/// The elastic batch for one world size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElasticBatch {
    pub train_batch_size: u64,
    pub micro_batch_per_gpu: u64,
    /// Every world size that can run `train_batch_size`, ascending.
    pub valid_world_sizes: Vec<u64>,
}

/// Removes `elasticity` from the raw DeepSpeed JSON; the checked block when it is enabled.
pub fn take_block(
    ds: &mut Value,
    file: &Path,
    prefix: &str,
) -> Result<Option<Elasticity>, ConfigError> {
    let Some(block) = ds.as_object_mut().and_then(|m| m.remove("elasticity")) else {
        return Ok(None);
    };
    let key = format!("{prefix}elasticity");
    if is_disabled(&block) {
        return Ok(None);
    }
    let raw: RawBlock = json_errors::typed_from_value(block, file, &key)?;
    if raw.enabled != Some(true) {
        return Ok(None);
    }
    Elasticity::from_raw(raw, file, key).map(Some)
}

/// Absent, `null` or with `enabled` absent or false: DeepSpeed never reads the rest.
fn is_disabled(block: &Value) -> bool {
    match block {
        Value::Null => true,
        Value::Object(map) => matches!(map.get("enabled"), None | Some(Value::Bool(false))),
        _ => false,
    }
}

impl Elasticity {
    fn from_raw(raw: RawBlock, file: &Path, key: String) -> Result<Elasticity, ConfigError> {
        let invalid = |sub: &str, message: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            key: format!("{key}.{sub}"),
            message,
        };
        check_version(raw.version.as_ref(), &invalid, file, &key)?;
        let max_train_batch_size = raw.max_train_batch_size.ok_or_else(|| {
            invalid(
                "max_train_batch_size",
                "required when elasticity is enabled: the largest global batch to consider".into(),
            )
        })?;
        let micro_batch_sizes = raw.micro_batch_sizes.ok_or_else(|| {
            invalid(
                "micro_batch_sizes",
                "required when elasticity is enabled: the list of micro batch sizes per GPU \
                 the model fits"
                    .into(),
            )
        })?;
        check_micro_batches(&micro_batch_sizes, max_train_batch_size, &invalid)?;
        let (min_gpus, max_gpus) = (raw.min_gpus.unwrap_or(1), raw.max_gpus.unwrap_or(10_000));
        check_gpu_range(min_gpus, max_gpus, &invalid)?;
        if raw.min_time.is_some_and(|t| t < 0.0) {
            return Err(invalid("min_time", "must be >= 0 (minutes)".into()));
        }
        check_parallel_keys(
            raw.num_gpus_per_node,
            raw.model_parallel_size,
            &invalid,
            file,
            &key,
        )?;
        Ok(Elasticity {
            max_train_batch_size,
            micro_batch_sizes,
            min_gpus,
            max_gpus,
            prefer_larger_batch: raw.prefer_larger_batch.unwrap_or(true),
            ignore_non_elastic_batch_info: raw.ignore_non_elastic_batch_info.unwrap_or(false),
            file: file.to_path_buf(),
            key,
        })
    }

    /// The global batch and its valid world sizes (independent of the world size).
    pub fn global_batch(&self) -> Result<(u64, Vec<u64>), ConfigError> {
        let candidates = candidate_batch_sizes(&self.micro_batch_sizes, self.max_train_batch_size)
            .ok_or_else(|| {
                self.error("the least common multiple of micro_batch_sizes overflows")
            })?;
        best_candidate(
            &candidates,
            &self.micro_batch_sizes,
            (self.min_gpus, self.max_gpus),
            self.prefer_larger_batch,
        )
        .ok_or_else(|| {
            self.error(&format!(
                "no world size between min_gpus {} and max_gpus {} can run any candidate \
                 global batch {candidates:?} with micro_batch_sizes {:?}",
                self.min_gpus, self.max_gpus, self.micro_batch_sizes
            ))
        })
    }

    /// The elastic batch at `world_size` ranks; an error naming the block when that world
    /// size is not a valid one.
    pub fn batch_for(&self, world_size: u64) -> Result<ElasticBatch, ConfigError> {
        let (train_batch_size, valid_world_sizes) = self.global_batch()?;
        let micro = valid_world_sizes
            .contains(&world_size)
            .then(|| micro_batch_for(train_batch_size, world_size, &self.micro_batch_sizes))
            .flatten();
        let Some(micro_batch_per_gpu) = micro else {
            return Err(self.error(&format!(
                "World size ({world_size}) is not valid with the current list of valid GPU \
                 counts: {valid_world_sizes:?} (elastic global batch {train_batch_size}); run \
                 on one of those world sizes or change min_gpus / max_gpus / micro_batch_sizes"
            )));
        };
        Ok(ElasticBatch {
            train_batch_size,
            micro_batch_per_gpu,
            valid_world_sizes,
        })
    }

    /// The batch keys the DeepSpeed config sets to numbers (not "auto"). Unless
    /// `ignore_non_elastic_batch_info`, any of them is refused, as DeepSpeed did;
    /// otherwise they are returned so that a notice can say they are ignored.
    pub fn explicit_batch_keys(
        &self,
        ds: &Value,
        prefix: &str,
    ) -> Result<Vec<&'static str>, ConfigError> {
        let explicit: Vec<&'static str> = BATCH_KEYS
            .into_iter()
            .filter(|k| ds.get(k).is_some_and(Value::is_number))
            .collect();
        match explicit.first() {
            Some(first) if !self.ignore_non_elastic_batch_info => Err(ConfigError::Invalid {
                file: self.file.clone(),
                key: format!("{prefix}{first}"),
                message: format!(
                    "One or more batch related parameters were found in your ds_config \
                     ({}). These parameters *will not be used* since elastic training is \
                     enabled, which takes control of these parameters: remove them (or set \
                     them to \"auto\"), or set \"ignore_non_elastic_batch_info\": true in \
                     {} to ignore them",
                    explicit.join(", "),
                    self.key
                ),
            }),
            _ => Ok(explicit),
        }
    }

    fn error(&self, message: &str) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.clone(),
            key: self.key.clone(),
            message: message.to_string(),
        }
    }
}

/// Version 0.1 only: 0.2 (node-level batches) is refused by name, others are unknown.
fn check_version(
    version: Option<&Value>,
    invalid: &dyn Fn(&str, String) -> ConfigError,
    file: &Path,
    key: &str,
) -> Result<(), ConfigError> {
    let number = match version {
        None => return Ok(()),
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match number {
        Some(0.1) => Ok(()),
        Some(0.2) => Err(ConfigError::Unsupported {
            file: file.to_path_buf(),
            key: format!("{key}.version"),
            message: "elasticity version 0.2 (batches per node with num_gpus_per_node and \
                      model_parallel_size) is not implemented: set \"version\": 0.1"
                .into(),
        }),
        _ => Err(invalid(
            "version",
            format!(
                "{} is not an elasticity version DeepSpeed defined: set 0.1",
                version.map(Value::to_string).unwrap_or_default()
            ),
        )),
    }
}

fn check_micro_batches(
    micros: &[u64],
    max_train_batch_size: u64,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<(), ConfigError> {
    if micros.is_empty() || micros.contains(&0) {
        return Err(invalid(
            "micro_batch_sizes",
            format!("expected a non-empty list of positive integers, found {micros:?}"),
        ));
    }
    if micros.iter().any(|&m| m > max_train_batch_size) {
        return Err(invalid(
            "micro_batch_sizes",
            format!(
                "All micro batches must be less than or equal to max_train_batch_size: \
                 {max_train_batch_size} (found {micros:?})"
            ),
        ));
    }
    Ok(())
}

fn check_gpu_range(
    min_gpus: u64,
    max_gpus: u64,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<(), ConfigError> {
    if min_gpus < 1 || max_gpus < 1 {
        let which = if min_gpus < 1 { "min_gpus" } else { "max_gpus" };
        return Err(invalid(
            which,
            format!("min/max gpus must be > 0, given min_gpus: {min_gpus}, max_gpus: {max_gpus}"),
        ));
    }
    if max_gpus < min_gpus {
        return Err(invalid(
            "min_gpus",
            format!(
                "min_gpus cannot be greater than max_gpus, given min_gpus: {min_gpus}, \
                 max_gpus: {max_gpus}"
            ),
        ));
    }
    Ok(())
}

/// `num_gpus_per_node` has no effect in version 0.1; model parallelism is refused there.
fn check_parallel_keys(
    num_gpus_per_node: Option<u64>,
    model_parallel_size: Option<u64>,
    invalid: &dyn Fn(&str, String) -> ConfigError,
    file: &Path,
    key: &str,
) -> Result<(), ConfigError> {
    for (name, value) in [
        ("num_gpus_per_node", num_gpus_per_node),
        ("model_parallel_size", model_parallel_size),
    ] {
        if value == Some(0) {
            return Err(invalid(name, "cannot be less than 1".into()));
        }
    }
    match model_parallel_size {
        Some(size) if size > 1 => Err(ConfigError::Unsupported {
            file: file.to_path_buf(),
            key: format!("{key}.model_parallel_size"),
            message: format!(
                "Elasticity V0.1 does not support model-parallel training. Given \
                 model-parallel size: {size} (rsdeep is ZeRO data parallel only): set it to 1"
            ),
        }),
        _ => Ok(()),
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The least common multiple of `values`; None on overflow.
fn lcm_of(values: &[u64]) -> Option<u64> {
    values
        .iter()
        .try_fold(1u64, |acc, &v| (acc / gcd(acc, v)).checked_mul(v))
}

/// The largest highly composite number not above `limit` (1 for a limit of 0).
fn largest_highly_composite_at_most(limit: u64) -> u64 {
    HIGHLY_COMPOSITE
        .iter()
        .copied()
        .take_while(|&h| h <= limit)
        .last()
        .unwrap_or(1)
}

/// Each micro batch size and their least common multiple, scaled by the largest highly
/// composite number that keeps it within `max_batch` (a base at or above it stays as it
/// is); ascending, without repeats. None when the least common multiple overflows.
pub fn candidate_batch_sizes(micros: &[u64], max_batch: u64) -> Option<Vec<u64>> {
    let mut bases = micros.to_vec();
    bases.push(lcm_of(micros)?);
    let mut candidates: Vec<u64> = bases
        .into_iter()
        .map(|base| match base {
            0 => 0,
            b if b >= max_batch => b,
            b => b * largest_highly_composite_at_most(max_batch / b),
        })
        .collect();
    candidates.sort_unstable();
    candidates.dedup();
    Some(candidates)
}

/// The world sizes within `[min, max]` that can run `batch`: the divisors of batch / micro
/// for every micro batch size dividing `batch`; ascending, without repeats.
pub fn valid_world_sizes(batch: u64, micros: &[u64], (min, max): (u64, u64)) -> Vec<u64> {
    let mut sizes: Vec<u64> = micros
        .iter()
        .filter(|&&m| m > 0 && batch.is_multiple_of(m))
        .flat_map(|&m| divisors_within(batch / m, (min, max)))
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

/// The divisors of `n` within `[min, max]`, by whichever trial division is shorter: every
/// number of the range, or up to the square root of `n`.
fn divisors_within(n: u64, (min, max): (u64, u64)) -> Vec<u64> {
    let in_range = |d: &u64| (min..=max).contains(d);
    if max.saturating_sub(min) <= n.isqrt() {
        return (min..=max.min(n))
            .filter(|&d| n.is_multiple_of(d))
            .collect();
    }
    (1..=n.isqrt())
        .filter(|&i| n.is_multiple_of(i))
        .flat_map(|i| [i, n / i])
        .filter(in_range)
        .collect()
}

/// The candidate with the most valid world sizes, ties to the larger (or smaller) one,
/// with those world sizes; None when no candidate has any.
pub fn best_candidate(
    candidates: &[u64],
    micros: &[u64],
    gpus: (u64, u64),
    prefer_larger: bool,
) -> Option<(u64, Vec<u64>)> {
    let rank = |(batch, sizes): &(u64, Vec<u64>)| {
        let tie = if prefer_larger {
            *batch
        } else {
            u64::MAX - batch
        };
        (sizes.len(), tie)
    };
    candidates
        .iter()
        .map(|&batch| (batch, valid_world_sizes(batch, micros, gpus)))
        .filter(|(_, sizes)| !sizes.is_empty())
        .max_by_key(rank)
}

/// The largest micro batch size dividing batch / world size.
pub fn micro_batch_for(batch: u64, world_size: u64, micros: &[u64]) -> Option<u64> {
    let per_rank = batch.checked_div(world_size)?;
    micros
        .iter()
        .copied()
        .filter(|&m| m > 0 && per_rank.is_multiple_of(m))
        .max()
}

/// A notice naming the elastic batch the run uses, for the launcher to print.
pub fn batch_notice(world_size: u64, batch: &ElasticBatch, ignored: &[&str]) -> String {
    let accumulation = batch.train_batch_size / (batch.micro_batch_per_gpu * world_size.max(1));
    let ignored_text = if ignored.is_empty() {
        String::new()
    } else {
        format!(
            "; the DeepSpeed config's {} are ignored (ignore_non_elastic_batch_info)",
            ignored.join(", ")
        )
    };
    format!(
        "elasticity: elastic batch at world size {world_size}: train_batch_size {} = micro \
         batch {} x accumulation {accumulation} x {world_size} ranks, replacing the training \
         arguments' per_device_train_batch_size and gradient_accumulation_steps; valid world \
         sizes {:?}{ignored_text}",
        batch.train_batch_size, batch.micro_batch_per_gpu, batch.valid_world_sizes
    )
}

/// Removes the batch keys from the raw DeepSpeed JSON before "auto" filling, for a batch
/// decided elsewhere (this block, or a kept global batch): they are neither filled nor
/// compared with the training arguments.
pub fn remove_batch_keys(ds: &mut Value) {
    if let Some(map) = ds.as_object_mut() {
        for key in BATCH_KEYS {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The block of DeepSpeed's own elasticity unit tests.
    fn upstream_block() -> Value {
        json!({
            "enabled": true,
            "max_train_batch_size": 10000,
            "micro_batch_sizes": [8, 12, 16, 17],
            "min_gpus": 32,
            "max_gpus": 1500,
            "min_time": 20,
            "version": 0.1
        })
    }

    fn take(block: Value) -> Result<Option<Elasticity>, ConfigError> {
        let mut ds = json!({ "elasticity": block });
        let taken = take_block(&mut ds, Path::new("ds.json"), "")?;
        assert_eq!(
            ds,
            json!({}),
            "the block is removed from the DeepSpeed JSON"
        );
        Ok(taken)
    }

    fn enabled(block: Value) -> Elasticity {
        take(block).unwrap().expect("enabled block")
    }

    fn err(block: Value) -> String {
        take(block).unwrap_err().to_string()
    }

    #[test]
    fn basic_10k_gives_9792_with_23_world_sizes_each_dividing_it() {
        let elastic = enabled(upstream_block());
        let (batch, sizes) = elastic.global_batch().unwrap();
        assert_eq!(batch, 9792);
        assert_eq!(sizes.len(), 23, "{sizes:?}");
        for world in sizes {
            assert_eq!(batch % world, 0);
            let per_rank = batch / world;
            assert!([8, 12, 16, 17].iter().any(|m| per_rank % m == 0));
        }
    }

    #[test]
    fn valid_world_size_picks_the_largest_dividing_micro_batch() {
        let batch = enabled(upstream_block()).batch_for(64).unwrap();
        assert_eq!(batch.micro_batch_per_gpu, 17);
        assert_eq!(batch.train_batch_size, 9792);
    }

    #[test]
    fn incompatible_world_size_names_the_block_and_the_valid_counts() {
        let message = enabled(upstream_block())
            .batch_for(128)
            .unwrap_err()
            .to_string();
        assert!(message.contains("key \"elasticity\""), "{message}");
        assert!(
            message.contains("World size (128) is not valid"),
            "{message}"
        );
        assert!(message.contains("[32, 34, 36, 48, 51, 64,"), "{message}");
    }

    #[test]
    fn proper_micro_batch_when_the_common_multiple_exceeds_the_maximum() {
        let mut block = upstream_block();
        block["max_train_batch_size"] = json!(32);
        block["micro_batch_sizes"] = json!([1, 2, 3, 7]);
        block["min_gpus"] = json!(1);
        let batch = enabled(block).batch_for(7).unwrap();
        // The least common multiple 42 is above 32 and kept, as DeepSpeed does.
        assert_eq!(batch.train_batch_size, 42);
        assert_eq!(batch.micro_batch_per_gpu, 3);
    }

    #[test]
    fn prefer_larger_false_takes_the_smaller_of_tied_candidates() {
        let block = |prefer: bool| {
            json!({"enabled": true, "max_train_batch_size": 16,
                   "micro_batch_sizes": [2, 4, 6], "prefer_larger_batch": prefer})
        };
        let larger = enabled(block(true)).global_batch().unwrap();
        assert_eq!(larger, (16, vec![1, 2, 4, 8]));
        let smaller = enabled(block(false)).global_batch().unwrap();
        assert_eq!(smaller, (12, vec![1, 2, 3, 6]));
    }

    #[test]
    fn defaults_are_deepspeeds() {
        let elastic = enabled(json!({"enabled": true, "max_train_batch_size": 2000,
                                     "micro_batch_sizes": [2, 4, 6]}));
        assert_eq!((elastic.min_gpus, elastic.max_gpus), (1, 10_000));
        assert!(elastic.prefer_larger_batch && !elastic.ignore_non_elastic_batch_info);
        let (batch, sizes) = elastic.global_batch().unwrap();
        assert_eq!((batch, sizes.len()), (1680, 32));
        assert_eq!(elastic.batch_for(4).unwrap().micro_batch_per_gpu, 6);
    }

    #[test]
    fn candidates_scale_each_base_by_the_largest_fitting_highly_composite_number() {
        // Bases 1, 2, 3, 7 and lcm 42: 1x24, 2x12, 3x6, 7x4, and 42 kept above 32.
        let candidates = candidate_batch_sizes(&[1, 2, 3, 7], 32).unwrap();
        assert_eq!(candidates, vec![18, 24, 28, 42]);
        assert_eq!(largest_highly_composite_at_most(10_000_000), 720_720);
    }

    #[test]
    fn divisors_within_a_range_match_a_plain_search() {
        for n in [1u64, 12, 36, 97, 720, 9792] {
            for range in [(1, 10_000), (2, 5), (32, 1500), (7, 7)] {
                let plain: Vec<u64> = (range.0..=range.1)
                    .filter(|&d| n.is_multiple_of(d))
                    .collect();
                let mut found = divisors_within(n, range);
                found.sort_unstable();
                found.dedup();
                assert_eq!(found, plain, "n {n} range {range:?}");
            }
        }
    }

    #[test]
    fn disabled_or_absent_blocks_are_not_read() {
        assert_eq!(
            take(json!({"enabled": false, "micro_batch_sizes": "x"})).unwrap(),
            None
        );
        assert_eq!(take(json!({"max_gpus": 4})).unwrap(), None);
        let mut ds = json!({"train_batch_size": 8});
        assert_eq!(take_block(&mut ds, Path::new("ds.json"), "").unwrap(), None);
    }

    #[test]
    fn missing_required_keys_are_named() {
        let mut block = upstream_block();
        block
            .as_object_mut()
            .unwrap()
            .remove("max_train_batch_size");
        assert!(err(block).contains("\"elasticity.max_train_batch_size\": required"));
        let message = err(json!({"enabled": true, "max_train_batch_size": 8}));
        assert!(
            message.contains("\"elasticity.micro_batch_sizes\": required"),
            "{message}"
        );
    }

    #[test]
    fn invalid_values_are_refused_naming_the_key() {
        let cases = [
            (
                "micro_batch_sizes",
                json!([1, 4, -1, 2, -10]),
                "micro_batch_sizes",
            ),
            ("micro_batch_sizes", json!(5), "micro_batch_sizes"),
            (
                "micro_batch_sizes",
                json!(["a", null, 0.5]),
                "micro_batch_sizes",
            ),
            ("micro_batch_sizes", json!([2, 0.5, 4]), "micro_batch_sizes"),
            ("micro_batch_sizes", json!([0, 4]), "micro_batch_sizes"),
            ("micro_batch_sizes", json!([]), "micro_batch_sizes"),
            ("micro_batch_sizes", json!([20000]), "micro_batch_sizes"),
            ("min_gpus", json!(-1), "min_gpus"),
            ("max_gpus", json!(0), "max_gpus"),
            ("min_gpus", json!(2000), "min_gpus"),
            ("min_time", json!(-1), "min_time"),
            ("version", json!("0.3"), "version"),
            ("version", json!(0.2), "version"),
            ("model_parallel_size", json!(4), "model_parallel_size"),
        ];
        for (key, value, named) in cases {
            let mut block = upstream_block();
            block[key] = value;
            let message = err(block);
            assert!(
                message.contains(&format!("\"elasticity.{named}")),
                "{message}"
            );
        }
    }

    #[test]
    fn version_0_2_is_refused_with_what_to_set() {
        let mut block = upstream_block();
        block["version"] = json!(0.2);
        block["num_gpus_per_node"] = json!(8);
        assert!(err(block).contains("set \"version\": 0.1"));
        let mut string_version = upstream_block();
        string_version["version"] = json!("0.1");
        assert!(take(string_version).unwrap().is_some());
    }

    #[test]
    fn unknown_keys_are_errors_with_did_you_mean() {
        let mut block = upstream_block();
        block["prefer_larger_batches"] = json!(false);
        let message = err(block);
        assert!(
            message.contains("elasticity.prefer_larger_batches"),
            "{message}"
        );
        assert!(
            message.contains("did you mean \"prefer_larger_batch\""),
            "{message}"
        );
    }

    #[test]
    fn no_world_size_in_range_is_an_error() {
        let elastic = enabled(json!({"enabled": true, "max_train_batch_size": 7,
                                     "micro_batch_sizes": [7], "min_gpus": 2}));
        let message = elastic.batch_for(1).unwrap_err().to_string();
        assert!(
            message.contains("no world size between min_gpus 2"),
            "{message}"
        );
    }

    #[test]
    fn explicit_batch_keys_are_refused_unless_ignored() {
        let elastic = enabled(upstream_block());
        let ds = json!({"train_batch_size": 2, "gradient_accumulation_steps": "auto"});
        let message = elastic
            .explicit_batch_keys(&ds, "")
            .unwrap_err()
            .to_string();
        assert!(message.contains("\"train_batch_size\""), "{message}");
        assert!(
            message.contains("ignore_non_elastic_batch_info"),
            "{message}"
        );
        let mut block = upstream_block();
        block["ignore_non_elastic_batch_info"] = json!(true);
        let ignored = enabled(block).explicit_batch_keys(&ds, "").unwrap();
        assert_eq!(ignored, vec!["train_batch_size"]);
        let autos = json!({"train_batch_size": "auto"});
        assert!(elastic.explicit_batch_keys(&autos, "").unwrap().is_empty());
    }
}
