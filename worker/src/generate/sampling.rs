//! Choosing the next token from one position's logits: greedy argmax, or transformers'
//! sampling pipeline (temperature, then top-k, then top-p, then a multinomial draw) with
//! a seeded RNG so a seed reproduces a generation. Contract: `generate/mod.rs`.

use super::GenerateOptions;
use crate::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The seeded generator behind sampling.
pub struct SamplingRng(StdRng);

impl SamplingRng {
    pub fn new(seed: u64) -> Self {
        SamplingRng(StdRng::seed_from_u64(seed))
    }
}

/// Picks the next id from `logits` (V,) under `opts`.
pub fn choose_next(logits: &[f32], opts: &GenerateOptions, rng: &mut SamplingRng) -> Result<u32> {
    if logits.is_empty() || logits.iter().any(|x| x.is_nan()) {
        return Err(Error::Model("logits are empty or NaN".into()));
    }
    if opts.temperature <= 0.0 {
        return Ok(argmax(logits));
    }
    let scaled: Vec<f64> = logits
        .iter()
        .map(|&x| x as f64 / opts.temperature)
        .collect();
    let mut candidates = sorted_descending(&scaled);
    if opts.top_k > 0 {
        let threshold = scaled[candidates[opts.top_k.min(candidates.len()) - 1]];
        candidates.retain(|&i| scaled[i] >= threshold);
    }
    let probs = softmax(&candidates.iter().map(|&i| scaled[i]).collect::<Vec<_>>());
    let kept = nucleus_len(&probs, opts.top_p);
    let total: f64 = probs[..kept].iter().sum();
    let mut draw = rng.0.random::<f64>() * total;
    for (rank, p) in probs[..kept].iter().enumerate() {
        draw -= p;
        if draw <= 0.0 {
            return Ok(candidates[rank] as u32);
        }
    }
    Ok(candidates[kept - 1] as u32)
}

/// First index of the maximum (torch's argmax picks the first on ties).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Indices sorted by value, largest first (stable: lower index first on ties).
fn sorted_descending(values: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    order
}

fn softmax(values: &[f64]) -> Vec<f64> {
    let max = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = values.iter().map(|v| (v - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// How many of the descending `probs` top-p keeps: the smallest prefix whose mass
/// reaches `top_p` (at least one), as transformers' TopPLogitsWarper.
fn nucleus_len(probs: &[f64], top_p: f64) -> usize {
    if top_p >= 1.0 {
        return probs.len();
    }
    let mut mass = 0.0;
    for (i, p) in probs.iter().enumerate() {
        mass += p;
        if mass >= top_p {
            return i + 1;
        }
    }
    probs.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(temperature: f64, top_k: usize, top_p: f64) -> GenerateOptions {
        GenerateOptions {
            temperature,
            top_k,
            top_p,
            ..GenerateOptions::default()
        }
    }

    fn histogram(logits: &[f32], o: &GenerateOptions, draws: usize) -> Vec<usize> {
        let mut rng = SamplingRng::new(7);
        let mut counts = vec![0; logits.len()];
        for _ in 0..draws {
            counts[choose_next(logits, o, &mut rng).unwrap() as usize] += 1;
        }
        counts
    }

    #[test]
    fn greedy_takes_first_maximum() {
        let mut rng = SamplingRng::new(0);
        let pick = choose_next(&[0.1, 3.0, 3.0, -1.0], &opts(0.0, 0, 1.0), &mut rng);
        assert_eq!(pick.unwrap(), 1);
        assert!(choose_next(&[f32::NAN], &opts(1.0, 0, 1.0), &mut rng).is_err());
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [2.0f32, 1.0, 0.5, 0.0, -1.0];
        let counts = histogram(&logits, &opts(1.0, 2, 1.0), 2000);
        assert_eq!(counts[2] + counts[3] + counts[4], 0, "{counts:?}");
        assert!(counts[0] > counts[1] && counts[1] > 0, "{counts:?}");
        // probs ~ [0.53, 0.20, 0.12, 0.07, 0.03]: top_p 0.7 keeps the first two.
        let counts = histogram(&logits, &opts(1.0, 0, 0.7), 2000);
        assert_eq!(counts[2] + counts[3] + counts[4], 0, "{counts:?}");
        assert!(counts[1] > 0);
    }

    #[test]
    fn sampling_follows_softmax_and_the_seed() {
        let logits = [1.0f32, 0.0];
        let counts = histogram(&logits, &opts(1.0, 0, 1.0), 4000);
        let share = counts[0] as f64 / 4000.0;
        let expected = 1.0 / (1.0 + (-1f64).exp());
        assert!((share - expected).abs() < 0.03, "{share} vs {expected}");
        // A low temperature sharpens towards the argmax.
        let cold = histogram(&logits, &opts(0.1, 0, 1.0), 500);
        assert!(cold[0] > 495, "{cold:?}");
        assert_eq!(
            histogram(&logits, &opts(1.0, 0, 1.0), 50),
            histogram(&logits, &opts(1.0, 0, 1.0), 50)
        );
    }
}
