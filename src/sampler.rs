//! Token sampling: greedy, temperature, top-k, top-p, min-p and a repetition penalty, with a
//! seedable random generator for reproducible output.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Sampling settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplerConfig {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probabilities sum to at least `top_p` (1: all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0: none).
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of recently seen tokens by this (1: off).
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition, presence and frequency penalties look at.
    pub repeat_last_n: usize,
    /// Subtracted from the logit of every token that appears among the recent tokens
    /// (OpenAI's `presence_penalty`, -2..2; 0: off).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it appears among the recent tokens
    /// (OpenAI's `frequency_penalty`, -2..2; 0: off).
    pub frequency_penalty: f32,
    /// Random seed (`None`: from the operating system).
    pub seed: Option<u64>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplerConfig {
    /// Greedy decoding without penalties.
    pub fn greedy() -> SamplerConfig {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            ..Default::default()
        }
    }

    /// What the daemon's APIs (HTTP and D-Bus) use when a request sets nothing: OpenAI's
    /// defaults — temperature 1 and no top-k, top-p, min-p or penalties.
    pub fn api_default() -> SamplerConfig {
        SamplerConfig {
            temperature: 1.0,
            ..SamplerConfig::greedy()
        }
    }

    /// Checks ranges; the message names the offending setting.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0 && self.temperature <= 100.0) {
            return Err(format!(
                "temperature {} must be between 0 and 100",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p {} must be in [0, 1]", self.min_p));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return Err(format!(
                "repeat_penalty {} must be positive",
                self.repeat_penalty
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(v.is_finite() && (-2.0..=2.0).contains(&v)) {
                return Err(format!("{name} {v} must be between -2 and 2"));
            }
        }
        Ok(())
    }
}

/// Picks the next token from logits.
pub struct Sampler {
    cfg: SamplerConfig,
    rng: StdRng,
    recent: VecDeque<u32>,
}

impl Sampler {
    /// A sampler with `cfg` (validated by the caller).
    pub fn new(cfg: SamplerConfig) -> Sampler {
        let rng = match cfg.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Sampler {
            cfg,
            rng,
            recent: VecDeque::new(),
        }
    }

    /// Records a token that is part of the context (prompt or output) for the penalty.
    pub fn accept(&mut self, token: u32) {
        if self.cfg.repeat_last_n == 0 {
            return;
        }
        if self.recent.len() == self.cfg.repeat_last_n {
            self.recent.pop_front();
        }
        self.recent.push_back(token);
    }

    /// Chooses a token from `logits` (one per vocabulary entry).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let mut logits = logits.to_vec();
        if self.cfg.repeat_penalty != 1.0 {
            for &t in &self.recent {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / self.cfg.repeat_penalty
                    } else {
                        *l * self.cfg.repeat_penalty
                    };
                }
            }
        }
        if self.cfg.presence_penalty != 0.0 || self.cfg.frequency_penalty != 0.0 {
            let mut counts: std::collections::HashMap<u32, u32> = Default::default();
            for &t in &self.recent {
                *counts.entry(t).or_default() += 1;
            }
            for (t, n) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= self.cfg.presence_penalty + self.cfg.frequency_penalty * n as f32;
                }
            }
        }
        if self.cfg.temperature <= 0.0 {
            return argmax(&logits);
        }
        let mut cands: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if cands.is_empty() {
            return argmax(&logits);
        }
        cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if self.cfg.top_k > 0 {
            cands.truncate(self.cfg.top_k);
        }
        let max = cands[0].1;
        let mut probs: Vec<f32> = cands
            .iter()
            .map(|&(_, l)| ((l - max) / self.cfg.temperature).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        let mut keep = probs.len();
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.cfg.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if self.cfg.min_p > 0.0 {
            let floor = self.cfg.min_p * probs[0];
            keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, p) in probs[..keep].iter().enumerate() {
            if r < *p {
                return cands[i].0;
            }
            r -= p;
        }
        cands[keep - 1].0
    }
}

/// The natural-log probability of `token` under the softmax of `logits`, and the `k` most
/// likely tokens with theirs (most likely first).
pub fn log_probs(logits: &[f32], token: u32, k: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let log_sum = max
        + logits
            .iter()
            .filter(|l| l.is_finite())
            .map(|&l| ((l - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    let lp = |l: f32| {
        if l.is_finite() {
            l - log_sum
        } else {
            f32::NEG_INFINITY
        }
    };
    let chosen = logits
        .get(token as usize)
        .copied()
        .map(lp)
        .unwrap_or(f32::NEG_INFINITY);
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if !l.is_finite() {
                continue;
            }
            if top.len() < k || l > top[top.len() - 1].1 {
                let at = top.partition_point(|&(_, x)| x >= l);
                top.insert(at, (i as u32, l));
                top.truncate(k);
            }
        }
    }
    (chosen, top.into_iter().map(|(i, l)| (i, lp(l))).collect())
}

/// Perplexity of `ids` under `logits` (row `i` of `[ids.len()][n_vocab]` predicts `ids[i + 1]`):
/// `exp` of the mean negative log-likelihood of every token after the first (NaN for fewer
/// than two tokens).
pub fn perplexity(logits: &[f32], ids: &[u32], n_vocab: usize) -> f64 {
    let mut nll = 0f64;
    for (row, &next) in logits.chunks(n_vocab).zip(ids.iter().skip(1)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + row
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln();
        nll += lse - row[next as usize] as f64;
    }
    let n_pred = ids.len().saturating_sub(1);
    if n_pred > 0 {
        (nll / n_pred as f64).exp()
    } else {
        f64::NAN
    }
}

/// Index of the largest logit.
pub fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_probs_are_a_normalized_log_softmax_with_the_top_k_in_order() {
        let logits = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY];
        let (lp, top) = log_probs(&logits, 2, 2);
        let z: f64 = [1.0f64, 3.0, 2.0].iter().map(|x| x.exp()).sum();
        assert!((lp as f64 - (2.0 - z.ln())).abs() < 1e-5);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        let total: f64 = (0..3)
            .map(|t| (log_probs(&logits, t, 0).0 as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert_eq!(log_probs(&logits, 3, 0).0, f32::NEG_INFINITY);
    }

    #[test]
    fn presence_and_frequency_penalties_lower_seen_tokens() {
        let logits = [1.0f32, 1.2, 0.0];
        let mut s = Sampler::new(SamplerConfig {
            presence_penalty: 0.5,
            ..SamplerConfig::greedy()
        });
        s.accept(1);
        assert_eq!(s.sample(&logits), 0, "1.2 - 0.5 < 1.0");
        let mut s = Sampler::new(SamplerConfig {
            frequency_penalty: 0.15,
            ..SamplerConfig::greedy()
        });
        s.accept(1);
        assert_eq!(s.sample(&logits), 1, "one occurrence: 1.05 > 1.0");
        s.accept(1);
        assert_eq!(s.sample(&logits), 0, "two occurrences: 0.9 < 1.0");
        let bad = SamplerConfig {
            frequency_penalty: 3.0,
            ..SamplerConfig::greedy()
        };
        assert!(bad.validate().unwrap_err().contains("frequency_penalty"));
    }

    #[test]
    fn greedy_picks_the_largest() {
        let mut s = Sampler::new(SamplerConfig::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0]), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let cfg = SamplerConfig {
            temperature: 1.5,
            top_k: 5,
            seed: Some(9),
            repeat_penalty: 1.0,
            min_p: 0.0,
            top_p: 1.0,
            ..Default::default()
        };
        let mut order: Vec<u32> = (0..100).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let top5 = &order[..5];
        let run = |cfg: &SamplerConfig| {
            let mut s = Sampler::new(cfg.clone());
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = run(&cfg);
        assert_eq!(a, run(&cfg));
        assert!(a.iter().all(|t| top5.contains(t)));
        assert!(
            top5.iter().filter(|t| a.contains(t)).count() >= 3,
            "samples spread over the top 5"
        );
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let logits = [10.0, 9.9, 0.0, -5.0];
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.9,
            min_p: 0.0,
            repeat_penalty: 1.0,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(cfg.clone());
        assert!((0..300).all(|_| s.sample(&logits) < 2));
        let mut s = Sampler::new(SamplerConfig {
            top_p: 1.0,
            min_p: 0.5,
            ..cfg
        });
        assert!((0..300).all(|_| s.sample(&logits) < 2));
    }

    #[test]
    fn repetition_penalty_discourages_recent_tokens() {
        let mut s = Sampler::new(SamplerConfig {
            repeat_penalty: 2.0,
            ..SamplerConfig::greedy()
        });
        s.accept(0);
        assert_eq!(s.sample(&[2.0, 1.5]), 1);
        assert!(SamplerConfig {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
