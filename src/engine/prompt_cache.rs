//! The prompt cache: finished sequences kept with their token history, so a request that
//! continues one (a chat client resending the whole conversation plus a new turn) prefills
//! only its new tokens.
//!
//! An entry is reused when the request's tokens begin with the entry's whole history: the
//! ring holds exactly what the next position needs, however long the conversation. When the
//! request shares only part of the history, the entry is cut back to the shared prefix if its
//! ring still holds what that position needs ([`Sequence::can_truncate`]: always before the
//! ring has wrapped). Entries are evicted least recently used first, bounded by count and by
//! bytes of KV memory.

use super::Sequence;

/// Fewest shared tokens for which an entry is cut back and reused (a whole history is reused
/// at any length).
pub const MIN_PARTIAL_REUSE: usize = 16;

/// Bounds of the prompt cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptCacheConfig {
    /// Most entries kept (0 disables the cache).
    pub max_entries: usize,
    /// Most bytes of KV memory the entries may hold together.
    pub max_bytes: usize,
}

struct Entry {
    /// Tokens whose keys and values the sequence holds, in order.
    history: Vec<u32>,
    seq: Sequence,
}

/// A reusable sequence found for a prompt.
pub struct CacheHit {
    /// The sequence, already cut back to `reused` positions.
    pub seq: Sequence,
    /// Leading prompt tokens it already holds.
    pub reused: usize,
}

/// Finished sequences with their histories, least recently used first.
pub struct PromptCache {
    cfg: PromptCacheConfig,
    entries: Vec<Entry>,
}

impl PromptCache {
    /// An empty cache with `cfg`'s bounds.
    pub fn new(cfg: PromptCacheConfig) -> PromptCache {
        PromptCache {
            cfg,
            entries: Vec::new(),
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of KV memory the entries hold.
    pub fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.seq.cache().bytes()).sum()
    }

    /// Takes the entry that saves the most prefill for `prompt` (at least one prompt token is
    /// always left to compute, since the next token's logits are needed), cut back to the part
    /// it shares with `prompt`. `None` when no entry shares a usable prefix.
    pub fn take(&mut self, prompt: &[u32]) -> Option<CacheHit> {
        let usable = |e: &Entry| -> usize {
            let common = e
                .history
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
                .min(prompt.len().saturating_sub(1));
            // A short shared start (BOS, a template's first tokens) saves little and would
            // take a conversation's entry away from the client that may continue it.
            let worth = common == e.history.len() || common >= MIN_PARTIAL_REUSE;
            if common > 0 && worth && e.seq.can_truncate(common as u64) {
                common
            } else {
                0
            }
        };
        let (best, reused) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, usable(e)))
            .filter(|&(_, n)| n > 0)
            // Most tokens reused; among equals the most recently used (last).
            .max_by_key(|&(i, n)| (n, i))?;
        let mut entry = self.entries.remove(best);
        entry
            .seq
            .truncate(reused as u64)
            .expect("checked by can_truncate");
        Some(CacheHit {
            seq: entry.seq,
            reused,
        })
    }

    /// Keeps `seq`, which holds `history`, as the most recently used entry; returns the
    /// sequences evicted to stay within the bounds (all of them, `seq` included, when the cache
    /// is disabled or one sequence alone exceeds the byte bound).
    pub fn insert(&mut self, history: Vec<u32>, seq: Sequence) -> Vec<Sequence> {
        if history.is_empty() || self.cfg.max_entries == 0 {
            return vec![seq];
        }
        // An older entry whose history the new one extends is redundant.
        let mut evicted = Vec::new();
        let mut i = 0;
        while i < self.entries.len() {
            if history.starts_with(&self.entries[i].history) {
                evicted.push(self.entries.remove(i).seq);
            } else {
                i += 1;
            }
        }
        self.entries.push(Entry { history, seq });
        while !self.entries.is_empty()
            && (self.entries.len() > self.cfg.max_entries || self.bytes() > self.cfg.max_bytes)
        {
            evicted.push(self.entries.remove(0).seq);
        }
        evicted
    }

    /// Empties the cache, returning its sequences.
    pub fn drain(&mut self) -> Vec<Sequence> {
        self.entries.drain(..).map(|e| e.seq).collect()
    }
}
