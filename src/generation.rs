//! Generating text for one prompt: prefill, then sample → decode → stream until EOS, a stop
//! string or the token limit.

use crate::engine::{Engine, Logits, Sequence};
use crate::sampler::{Sampler, SamplerConfig};
use crate::tokenizer::Tokenizer;

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerationParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Generation ends (and the text is cut) where one of these appears.
    pub stop: Vec<String>,
    /// Sampling settings.
    pub sampler: SamplerConfig,
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
    params.sampler.validate().map_err(|e| anyhow::anyhow!(e))?;
    anyhow::ensure!(!prompt.is_empty(), "the prompt is empty");
    let mut sampler = Sampler::new(params.sampler.clone());
    prompt.iter().for_each(|&t| sampler.accept(t));
    let t0 = std::time::Instant::now();
    let mut logits = engine.feed(seq, prompt, Logits::Last)?;
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let mut stream = tok.stream();
    let mut stops = StopMatcher::new(&params.stop);
    let mut generated = 0;
    let finish = loop {
        if generated == params.max_tokens {
            break FinishReason::Length;
        }
        let token = sampler.sample(&logits);
        generated += 1;
        if Some(token) == tok.eos() {
            break FinishReason::Eos;
        }
        sampler.accept(token);
        let (text, stopped) = stops.push(&stream.push(token)?);
        if !text.is_empty() && !emit(&text) {
            break FinishReason::Cancelled;
        }
        if stopped {
            break FinishReason::Stop;
        }
        if generated == params.max_tokens {
            break FinishReason::Length;
        }
        if seq.cache().remaining() == Some(0) {
            break FinishReason::Length;
        }
        logits = engine.feed(seq, &[token], Logits::Last)?;
    };
    if matches!(finish, FinishReason::Eos | FinishReason::Length) {
        let (text, _) = stops.push(&stream.finish()?);
        let rest = text + &stops.finish();
        if !rest.is_empty() {
            emit(&rest);
        }
    }
    Ok(GenerationStats {
        prompt_tokens: prompt.len(),
        generated_tokens: generated,
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
