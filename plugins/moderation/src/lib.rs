//! Moderation plugin: a blocklist of words and regular expressions, applied
//! to prompts, streamed chunks and final outputs.
//!
//! Config keys:
//! - `blocklist`: array of entries. A plain entry is a word or phrase,
//!   matched case-insensitively as whole words; an entry written `/…/` is a
//!   regular expression (Rust `regex` syntax, add `(?i)` for case-insensitive).
//! - `action`: `"redact"` (default) replaces each match, `"reject"` refuses
//!   the prompt or output (and stops a stream before the blocked text).
//! - `replacement`: text that replaces a match (default: one `*` per character).
//!
//! Streaming: a word split across chunks ("forb" + "idden") is caught because
//! the plugin holds back the trailing partial word, and any tail that could be
//! the start of a blocked phrase, until the next chunk shows how it goes on.

// The export glue wit-bindgen generates takes the flattened arguments.
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({
    path: "../wit",
    world: "plugin",
});

use std::cell::RefCell;

use regex::Regex;

/// Most bytes held back while waiting for the end of a word.
const MAX_HOLD: usize = 256;

#[derive(Clone, Copy, PartialEq)]
enum Action {
    Redact,
    Reject,
}

struct Settings {
    pattern: Option<Regex>,
    /// Plain entries, lowercased (for the split-phrase check).
    phrases: Vec<String>,
    action: Action,
    replacement: Option<String>,
}

thread_local! {
    static SETTINGS: RefCell<Option<Settings>> = const { RefCell::new(None) };
}

fn with_settings<R>(f: impl FnOnce(&Settings) -> R) -> R {
    SETTINGS.with(|s| {
        f(s.borrow()
            .as_ref()
            .expect("init() is called before any hook"))
    })
}

fn parse(config: Vec<(String, ConfigValue)>) -> Result<Settings, String> {
    let mut entries = Vec::new();
    let mut action = Action::Redact;
    let mut replacement = None;
    for (key, value) in config {
        match (key.as_str(), value) {
            ("blocklist", ConfigValue::TextList(list)) => entries = list,
            ("blocklist", ConfigValue::Text(one)) => entries = vec![one],
            ("action", ConfigValue::Text(a)) if a == "redact" => action = Action::Redact,
            ("action", ConfigValue::Text(a)) if a == "reject" => action = Action::Reject,
            ("action", _) => return Err("`action` must be \"redact\" or \"reject\"".into()),
            ("replacement", ConfigValue::Text(r)) => replacement = Some(r),
            ("blocklist" | "replacement", _) => {
                return Err(format!("`{key}` has the wrong type"));
            }
            (other, _) => return Err(format!("unknown config key `{other}`")),
        }
    }
    let mut alternatives = Vec::new();
    let mut phrases = Vec::new();
    for entry in entries.iter().filter(|e| !e.is_empty()) {
        if entry.len() > 2 && entry.starts_with('/') && entry.ends_with('/') {
            let re = &entry[1..entry.len() - 1];
            Regex::new(re).map_err(|e| format!("blocklist entry {entry}: {e}"))?;
            alternatives.push(format!("(?:{re})"));
        } else {
            let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
            let start = if word(entry.chars().next()) {
                r"\b"
            } else {
                ""
            };
            let end = if word(entry.chars().last()) {
                r"\b"
            } else {
                ""
            };
            alternatives.push(format!("(?i:{start}{}{end})", regex::escape(entry)));
            phrases.push(entry.to_lowercase());
        }
    }
    let pattern = if alternatives.is_empty() {
        None
    } else {
        Some(Regex::new(&alternatives.join("|")).map_err(|e| format!("blocklist: {e}"))?)
    };
    Ok(Settings {
        pattern,
        phrases,
        action,
        replacement,
    })
}

impl Settings {
    fn redact(&self, text: &str) -> String {
        match &self.pattern {
            None => text.to_owned(),
            Some(re) => re
                .replace_all(text, |caps: &regex::Captures<'_>| match &self.replacement {
                    Some(r) => r.clone(),
                    None => "*".repeat(caps[0].chars().count()),
                })
                .into_owned(),
        }
    }

    /// Byte offset of the first blocked match.
    fn find(&self, text: &str) -> Option<usize> {
        self.pattern.as_ref()?.find(text).map(|m| m.start())
    }

    fn check(&self, text: String, what: &str) -> Result<String, Rejection> {
        match self.action {
            Action::Redact => Ok(self.redact(&text)),
            Action::Reject if self.find(&text).is_some() => Err(Rejection {
                reason: format!("the {what} contains blocked content"),
            }),
            Action::Reject => Ok(text),
        }
    }

    /// Where the text that must wait for the next chunk starts: the trailing
    /// partial word, a tail that may begin a blocked phrase, or a match that
    /// reaches the end (it may grow).
    fn hold_from(&self, text: &str) -> usize {
        let is_word = |c: char| c.is_alphanumeric() || c == '_';
        let mut from = text
            .char_indices()
            .rev()
            .take_while(|&(_, c)| is_word(c))
            .last()
            .map_or(text.len(), |(i, _)| i);
        let longest = self.phrases.iter().map(String::len).max().unwrap_or(0);
        let window = longest.min(MAX_HOLD);
        for (i, _) in text
            .char_indices()
            .rev()
            .take_while(|&(i, _)| text.len() - i < window)
        {
            let tail = text[i..].to_lowercase();
            if self
                .phrases
                .iter()
                .any(|p| p.len() > tail.len() && p.starts_with(&tail))
            {
                from = from.min(i);
            }
        }
        if let Some(re) = &self.pattern {
            if let Some(m) = re.find_iter(text).last().filter(|m| m.end() == text.len()) {
                from = from.min(m.start());
            }
        }
        if text.len() - from > MAX_HOLD {
            text.len()
        } else {
            from
        }
    }
}

struct Moderation;

impl Guest for Moderation {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "moderation".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Redacts or rejects blocklisted words and patterns".into(),
            hooks: vec![Hook::OnPrompt, Hook::OnChunk, Hook::OnComplete],
        }
    }

    fn init(config: Vec<(String, ConfigValue)>) -> Result<(), String> {
        let settings = parse(config)?;
        SETTINGS.with(|s| *s.borrow_mut() = Some(settings));
        Ok(())
    }

    fn on_prompt(prompt: String, _info: RequestInfo) -> Result<String, Rejection> {
        with_settings(|s| s.check(prompt, "prompt"))
    }

    fn on_chunk(text: String, last: bool) -> ChunkAction {
        with_settings(|s| {
            let split = if last { text.len() } else { s.hold_from(&text) };
            let (head, tail) = text.split_at(split);
            match s.action {
                Action::Reject => match s.find(head) {
                    Some(at) => ChunkAction::Stop(head[..at].to_owned()),
                    None if tail.is_empty() => ChunkAction::Pass,
                    None => ChunkAction::Hold(Held {
                        release: head.to_owned(),
                        keep: tail.to_owned(),
                    }),
                },
                Action::Redact => {
                    let release = s.redact(head);
                    if tail.is_empty() && release == head {
                        ChunkAction::Pass
                    } else {
                        ChunkAction::Hold(Held {
                            release,
                            keep: tail.to_owned(),
                        })
                    }
                }
            }
        })
    }

    fn on_complete(text: String, _info: RequestInfo) -> Result<String, Rejection> {
        with_settings(|s| s.check(text, "output"))
    }
}

export!(Moderation);
