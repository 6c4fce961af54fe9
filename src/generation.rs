//! Generating text for one prompt: prefill, then sample → decode → stream until EOS, a stop
//! string or the token limit.

use crate::engine::{Engine, Logits, Sequence};
use crate::sampler::{Sampler, SamplerConfig};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerationParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Generation ends (and the text is cut) where one of these appears.
    pub stop: Vec<String>,
    /// Sampling settings.
    pub sampler: SamplerConfig,
    /// `Some(k)`: compute each sampled token's log-probability and the `k` most likely
    /// alternatives.
    pub logprobs: Option<usize>,
    /// Treat the end-of-sequence token like any other (benchmarks that need a fixed length).
    pub ignore_eos: bool,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced its end-of-sequence token.
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The consumer asked to stop.
    Cancelled,
}

impl FinishReason {
    /// A lowercase name (`eos`, `stop`, `length`, `cancelled`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Counts and timings of one generation.
#[derive(Clone, Debug)]
pub struct GenerationStats {
    /// Prompt tokens processed.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// The generated token ids (the end-of-sequence token included when it was sampled).
    pub tokens: Vec<u32>,
    /// Seconds spent in prefill.
    pub prefill_seconds: f64,
    /// Seconds spent generating.
    pub decode_seconds: f64,
    /// Why it ended.
    pub finish: FinishReason,
}

/// Holds back text that might be the start of a stop string, and finds stop strings that are
/// split across streamed pieces.
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> StopMatcher {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds a piece; returns the text safe to emit and whether a stop string was reached
    /// (in which case the text ends right before it).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let tail = &self.pending[i..];
                if s.starts_with(tail) {
                    keep = keep.max(tail.len());
                    break;
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Text still held back at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// The log-probability of a sampled token and the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenProb {
    /// The sampled token.
    pub token: u32,
    /// Its natural-log probability under the model (before sampling filters).
    pub logprob: f32,
    /// The most likely tokens at this position with theirs, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// What one sampled token produced.
#[derive(Clone, Debug)]
pub struct Step {
    /// The sampled token.
    pub token: u32,
    /// Text it releases (whole characters, held back while it may start a stop string).
    pub text: String,
    /// Its log-probability, when [`GenerationParams::logprobs`] asks for them.
    pub prob: Option<TokenProb>,
    /// `Some` when generation is over; otherwise the caller feeds `token` to the sequence and
    /// calls [`Generation::next`] with the logits it gives.
    pub finish: Option<FinishReason>,
}

/// The per-request generation state: sampler, streaming detokenizer, stop strings and token
/// limit. Offline [`generate`] drives one; the daemon's scheduler drives many, one step each.
pub struct Generation {
    params: GenerationParams,
    sampler: Sampler,
    stream: StreamDecoder,
    stops: StopMatcher,
    tokens: Vec<u32>,
    finish: Option<FinishReason>,
}

impl Generation {
    /// A generation continuing `prompt` (which the repetition penalties see) with `params`.
    pub fn new(params: &GenerationParams, prompt: &[u32]) -> anyhow::Result<Generation> {
        params.sampler.validate().map_err(|e| anyhow::anyhow!(e))?;
        let mut sampler = Sampler::new(params.sampler.clone());
        prompt.iter().for_each(|&t| sampler.accept(t));
        Ok(Generation {
            params: params.clone(),
            sampler,
            stream: StreamDecoder::with_context(prompt.last().copied()),
            stops: StopMatcher::new(&params.stop),
            tokens: Vec::new(),
            finish: if params.max_tokens == 0 {
                Some(FinishReason::Length)
            } else {
                None
            },
        })
    }

    /// Samples the next token from `logits` (the last fed position's) and returns the text it
    /// releases. `room` tells whether the sequence can take one more position; without room
    /// the generation ends with [`FinishReason::Length`] after this token.
    pub fn next(&mut self, tok: &Tokenizer, logits: &[f32], room: bool) -> anyhow::Result<Step> {
        anyhow::ensure!(self.finish.is_none(), "the generation has already ended");
        let token = self.sampler.sample(logits);
        self.tokens.push(token);
        let prob = self.params.logprobs.map(|k| {
            let (logprob, top) = crate::sampler::log_probs(logits, token, k);
            TokenProb {
                token,
                logprob,
                top,
            }
        });
        if Some(token) == tok.eos() && !self.params.ignore_eos {
            let text = self.flush(tok)?;
            return Ok(self.end(token, text, prob, FinishReason::Eos));
        }
        self.sampler.accept(token);
        let (mut text, stopped) = self.stops.push(&self.stream.push(tok, token)?);
        if stopped {
            return Ok(self.end(token, text, prob, FinishReason::Stop));
        }
        if self.tokens.len() >= self.params.max_tokens || !room {
            text.push_str(&self.flush(tok)?);
            return Ok(self.end(token, text, prob, FinishReason::Length));
        }
        Ok(Step {
            token,
            text,
            prob,
            finish: None,
        })
    }

    /// Ends the generation on the consumer's request.
    pub fn cancel(&mut self) {
        self.finish.get_or_insert(FinishReason::Cancelled);
    }

    /// Tokens sampled so far (the end-of-sequence token included when it was sampled).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Why the generation ended, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    fn end(&mut self, token: u32, text: String, prob: Option<TokenProb>, f: FinishReason) -> Step {
        self.finish = Some(f);
        Step {
            token,
            text,
            prob,
            finish: Some(f),
        }
    }

    /// Text still held back by the detokenizer and the stop matcher.
    fn flush(&mut self, tok: &Tokenizer) -> anyhow::Result<String> {
        let (text, _) = self.stops.push(&self.stream.finish(tok)?);
        Ok(text + &self.stops.finish())
    }
}

/// Runs `prompt` through `seq` and generates, calling `emit` with each text piece; `emit`
/// returns false to cancel.
pub fn generate(
    engine: &mut Engine,
    tok: &Tokenizer,
    seq: &mut Sequence,
    prompt: &[u32],
    params: &GenerationParams,
    mut emit: impl FnMut(&str) -> bool,
) -> anyhow::Result<GenerationStats> {
    anyhow::ensure!(!prompt.is_empty(), "the prompt is empty");
    let mut generation = Generation::new(params, prompt)?;
    let t0 = std::time::Instant::now();
    let mut logits = engine.feed(seq, prompt, Logits::Last)?;
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let finish = loop {
        if let Some(f) = generation.finish_reason() {
            break f;
        }
        let room = seq.cache().remaining() != Some(0);
        let step = generation.next(tok, &logits, room)?;
        if !step.text.is_empty() && !emit(&step.text) {
            generation.cancel();
            break FinishReason::Cancelled;
        }
        if let Some(f) = step.finish {
            break f;
        }
        logits = engine.feed(seq, &[step.token], Logits::Last)?;
    };
    Ok(GenerationStats {
        prompt_tokens: prompt.len(),
        generated_tokens: generation.tokens().len(),
        tokens: generation.tokens().to_vec(),
        prefill_seconds,
        decode_seconds: t1.elapsed().as_secs_f64(),
        finish,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_split_across_pieces_are_found_and_cut() {
        let mut m = StopMatcher::new(&["\nUser:".into()]);
        let mut out = String::new();
        let mut stopped = false;
        for piece in ["Hi", " there\nUs", "er: more"] {
            let (t, s) = m.push(piece);
            out.push_str(&t);
            if s {
                stopped = true;
                break;
            }
        }
        assert!(stopped);
        assert_eq!(out, "Hi there");
        let mut m = StopMatcher::new(&["END".into()]);
        assert_eq!(m.push("The EN"), ("The ".into(), false));
        assert_eq!(m.push("igma"), ("ENigma".into(), false));
        assert_eq!(m.finish(), "");
    }
}
