//! The tokenizer: SentencePiece-style BPE with byte fallback, built with the `tokenizers`
//! crate from a GGUF file's `tokenizer.ggml.*` metadata (or from a `tokenizer.json` beside the
//! model), plus a streaming detokenizer.
//!
//! GGUF stores a SentencePiece vocabulary as pieces with scores. SentencePiece BPE repeatedly
//! merges the adjacent pair whose concatenation is the highest-scoring piece; that is a BPE
//! model whose merge ranks follow the merged piece's score, which is what is built here.
//! Text is normalized the SentencePiece way: spaces become `▁` and one `▁` is prepended.

use crate::ggml::gguf::{GgufFile, GgufValue};
use anyhow::{anyhow, bail, Context as _};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::{DecoderWrapper, NormalizerWrapper, Tokenizer as HfTokenizer};

/// SentencePiece's word-boundary marker.
const SPACE_MARK: &str = "\u{2581}";

/// GGUF token types (`tokenizer.ggml.token_type`).
mod token_type {
    pub const NORMAL: i32 = 1;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
}

/// A vocabulary with its special tokens.
pub struct Tokenizer {
    hf: HfTokenizer,
    pieces: Vec<String>,
    control: Vec<bool>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
}

impl Tokenizer {
    /// Builds the tokenizer for a model: from `tokenizer.json` next to `model_path` when that
    /// file exists, else from the GGUF metadata.
    pub fn for_model(gguf: &GgufFile, model_path: &Path) -> anyhow::Result<Tokenizer> {
        let json = model_path.with_file_name("tokenizer.json");
        if json.is_file() {
            return Tokenizer::from_json_file(&json, gguf);
        }
        Tokenizer::from_gguf(gguf)
    }

    /// Builds the tokenizer from `tokenizer.ggml.*` metadata.
    pub fn from_gguf(g: &GgufFile) -> anyhow::Result<Tokenizer> {
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "llama" {
            bail!(
                "{}: tokenizer model '{model}' is not supported (expected 'llama', a SentencePiece vocabulary); put a tokenizer.json beside the model",
                g.path.display()
            );
        }
        let pieces = string_array(g, "tokenizer.ggml.tokens")?;
        let n = pieces.len();
        let scores = match g.get("tokenizer.ggml.scores") {
            Some(v) => numeric_array(g, "tokenizer.ggml.scores", v, n)?,
            None => vec![0.0; n],
        };
        let types: Vec<i32> = match g.get("tokenizer.ggml.token_type") {
            Some(v) => numeric_array(g, "tokenizer.ggml.token_type", v, n)?
                .into_iter()
                .map(|x| x as i32)
                .collect(),
            None => vec![token_type::NORMAL; n],
        };
        if g.get_u64_opt("tokenizer.ggml.add_space_prefix")? == Some(0)
            || matches!(
                g.get("tokenizer.ggml.add_space_prefix"),
                Some(GgufValue::Bool(false))
            )
        {
            bail!(
                "{}: vocabularies without the SentencePiece space prefix are not supported",
                g.path.display()
            );
        }

        let mut vocab: HashMap<String, u32> = HashMap::with_capacity(n);
        for (id, p) in pieces.iter().enumerate() {
            // First occurrence wins for duplicated pieces (unused slots in some vocabularies).
            vocab.entry(p.clone()).or_insert(id as u32);
        }
        let mergeable =
            |id: usize| matches!(types[id], token_type::NORMAL | token_type::USER_DEFINED);
        // Every way of splitting a piece into two pieces is a merge, ranked by the piece's score.
        let mut merges: Vec<(f32, u32, String, String)> = Vec::new();
        for (id, piece) in pieces.iter().enumerate() {
            if !mergeable(id) || vocab.get(piece) != Some(&(id as u32)) {
                continue;
            }
            for (split, _) in piece.char_indices().skip(1) {
                let (left, right) = piece.split_at(split);
                let ok = |s: &str| vocab.get(s).is_some_and(|&i| mergeable(i as usize));
                if ok(left) && ok(right) {
                    merges.push((scores[id], id as u32, left.to_string(), right.to_string()));
                }
            }
        }
        merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let merges: Vec<(String, String)> = merges.into_iter().map(|(_, _, l, r)| (l, r)).collect();

        let unk_id = g
            .get_u64_opt("tokenizer.ggml.unknown_token_id")?
            .map(|v| v as usize)
            .unwrap_or(0);
        let unk = pieces.get(unk_id).cloned().ok_or_else(|| {
            anyhow!(
                "{}: unknown_token_id {unk_id} out of range",
                g.path.display()
            )
        })?;
        let bpe = BPE::builder()
            .vocab_and_merges(
                vocab
                    .into_iter()
                    .collect::<tokenizers::models::bpe::Vocab>(),
                merges,
            )
            .unk_token(unk)
            .fuse_unk(true)
            .byte_fallback(true)
            .build()
            .map_err(|e| anyhow!("{}: cannot build the BPE model: {e}", g.path.display()))?;
        let mut hf = HfTokenizer::new(bpe);
        hf.with_normalizer(Some(NormalizerWrapper::Sequence(NormalizerSequence::new(
            vec![
                NormalizerWrapper::Prepend(Prepend::new(SPACE_MARK.into())),
                NormalizerWrapper::Replace(
                    Replace::new(" ", SPACE_MARK).map_err(|e| anyhow!("{e}"))?,
                ),
            ],
        ))));
        hf.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(vec![
            DecoderWrapper::Replace(Replace::new(SPACE_MARK, " ").map_err(|e| anyhow!("{e}"))?),
            DecoderWrapper::ByteFallback(ByteFallback::new()),
            DecoderWrapper::Fuse(Fuse::new()),
            DecoderWrapper::Strip(Strip::new(' ', 1, 0)),
        ]))));
        let control = types.iter().map(|&t| t == token_type::CONTROL).collect();
        Tokenizer::finish(hf, pieces, control, g)
    }

    /// Loads a Hugging Face `tokenizer.json`; special token ids come from the GGUF metadata.
    pub fn from_json_file(path: &Path, g: &GgufFile) -> anyhow::Result<Tokenizer> {
        let hf = HfTokenizer::from_file(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let n = hf.get_vocab_size(true);
        let mut pieces = vec![String::new(); n];
        for (piece, id) in hf.get_vocab(true) {
            if let Some(slot) = pieces.get_mut(id as usize) {
                *slot = piece;
            }
        }
        let specials: Vec<u32> = hf
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        let control = (0..n as u32).map(|id| specials.contains(&id)).collect();
        Tokenizer::finish(hf, pieces, control, g)
    }

    fn finish(
        hf: HfTokenizer,
        pieces: Vec<String>,
        control: Vec<bool>,
        g: &GgufFile,
    ) -> anyhow::Result<Tokenizer> {
        let n = pieces.len() as u64;
        let id = |key: &str| -> anyhow::Result<Option<u32>> {
            match g.get_u64_opt(key)? {
                Some(v) if v < n => Ok(Some(v as u32)),
                Some(v) => bail!(
                    "{}: {key} = {v} is outside the vocabulary of {n} tokens",
                    g.path.display()
                ),
                None => Ok(None),
            }
        };
        let add_bos = !matches!(
            g.get("tokenizer.ggml.add_bos_token"),
            Some(GgufValue::Bool(false))
        );
        Ok(Tokenizer {
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            hf,
            pieces,
            control,
            add_bos,
        })
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json` (which [`Tokenizer::for_model`]
    /// picks up when it lies beside a model).
    pub fn save_json(&self, path: &Path) -> anyhow::Result<()> {
        self.hf
            .save(path, false)
            .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether prompts start with BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// The piece of token `id` (e.g. `▁Hello`, `<0x0A>`, `</s>`).
    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    /// Whether `id` is a control token (BOS, EOS, ...), which never appears in decoded text.
    pub fn is_control(&self, id: u32) -> bool {
        self.control.get(id as usize).copied().unwrap_or(false)
    }

    /// Tokenizes plain text (control-token spellings such as `</s>` are treated as text).
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let enc = self
            .hf
            .encode_fast(text, false)
            .map_err(|e| anyhow!("tokenization failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Tokenizes text in which control-token spellings (`<s>`, `</s>`, ...) stand for those
    /// tokens, as in rendered chat templates.
    pub fn encode_with_control_tokens(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let controls: Vec<(u32, &str)> = (0..self.pieces.len() as u32)
            .filter(|&id| self.is_control(id) && !self.pieces[id as usize].is_empty())
            .map(|id| (id, self.pieces[id as usize].as_str()))
            .collect();
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let next = controls
                .iter()
                .filter_map(|&(id, s)| rest.find(s).map(|at| (at, id, s.len())))
                .min_by_key(|&(at, _, len)| (at, std::cmp::Reverse(len)));
            match next {
                Some((at, id, len)) => {
                    // SentencePiece treats text after a control token as a new segment.
                    out.extend(self.encode(&rest[..at])?);
                    out.push(id);
                    rest = &rest[at + len..];
                }
                None => {
                    out.extend(self.encode(rest)?);
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Decodes tokens to text, leaving out control tokens.
    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        let ids: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&id| !self.is_control(id))
            .collect();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.pieces.len()) {
            bail!(
                "token id {bad} is outside the vocabulary ({} tokens)",
                self.pieces.len()
            );
        }
        self.hf
            .decode(&ids, false)
            .map_err(|e| anyhow!("decoding failed: {e}"))
    }

    /// Token ids of a plain-text prompt: BOS first when the model adds one, then the text.
    pub fn encode_prompt(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.bos().filter(|_| self.adds_bos()).into_iter().collect();
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// A streaming decoder for one generated sequence (bound to this tokenizer).
    pub fn stream(&self) -> BoundStreamDecoder<'_> {
        BoundStreamDecoder {
            tok: self,
            inner: StreamDecoder::default(),
        }
    }
}

fn string_array(g: &GgufFile, key: &str) -> anyhow::Result<Vec<String>> {
    let arr = g.get(key).and_then(GgufValue::as_array).ok_or_else(|| {
        anyhow!(
            "{}: missing or invalid '{key}' (not a tokenizer vocabulary?)",
            g.path.display()
        )
    })?;
    if arr.is_empty() {
        bail!("{}: '{key}' is empty", g.path.display());
    }
    arr.iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("{}: '{key}' holds a non-string", g.path.display()))
        })
        .collect()
}

fn numeric_array(g: &GgufFile, key: &str, v: &GgufValue, n: usize) -> anyhow::Result<Vec<f32>> {
    let arr = v
        .as_array()
        .ok_or_else(|| anyhow!("{}: '{key}' is not an array", g.path.display()))?;
    if arr.len() != n {
        bail!(
            "{}: '{key}' has {} entries for {n} tokens",
            g.path.display(),
            arr.len()
        );
    }
    arr.iter()
        .map(|x| {
            x.as_f64()
                .map(|f| f as f32)
                .with_context(|| format!("{}: '{key}' holds a non-number", g.path.display()))
        })
        .collect()
}

/// Turns generated tokens into text pieces as they arrive: every piece is valid UTF-8, and a
/// character split over several byte tokens is held back until it is complete. It holds no
/// reference to the tokenizer (each call takes it), so it can live in long-lived per-request
/// state; [`Tokenizer::stream`] gives one bound to a tokenizer.
#[derive(Clone, Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

/// A [`StreamDecoder`] bound to its tokenizer.
pub struct BoundStreamDecoder<'t> {
    tok: &'t Tokenizer,
    inner: StreamDecoder,
}

impl BoundStreamDecoder<'_> {
    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> anyhow::Result<String> {
        self.inner.push(self.tok, id)
    }

    /// Text still held back (an incomplete character at the end), decoded leniently.
    pub fn finish(&mut self) -> anyhow::Result<String> {
        self.inner.finish(self.tok)
    }
}

impl StreamDecoder {
    /// A decoder whose text continues `context` (the prompt's last token): the first piece
    /// keeps its leading space ("is" + " to"), so prompt and output concatenate as the model
    /// meant, as OpenAI's completions do. Without context (or when it is a control token) the
    /// first piece's leading space is dropped, as SentencePiece decoding does.
    pub fn with_context(context: Option<u32>) -> StreamDecoder {
        match context {
            Some(id) => StreamDecoder {
                ids: vec![id],
                prefix: 0,
                read: 1,
            },
            None => StreamDecoder::default(),
        }
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> anyhow::Result<String> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            let piece = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back (an incomplete character at the end), decoded leniently.
    pub fn finish(&mut self, tok: &Tokenizer) -> anyhow::Result<String> {
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or("").to_string())
    }
}
