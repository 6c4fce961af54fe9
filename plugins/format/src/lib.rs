//! Format plugin: makes model output fit for speech. Strips markdown
//! (headings, emphasis, code fences and backticks, links and images, bullets,
//! quotes, rules, table pipes), normalizes whitespace (one space between
//! words, at most one blank line) and optionally trims the output to a
//! maximum length on a sentence boundary.
//!
//! Config keys: `strip_markdown` (bool, default true), `normalize_whitespace`
//! (bool, default true), `max_length` (integer, characters; absent or 0 for
//! no limit).
//!
//! Streaming: text is released sentence by sentence (up to the last `.`, `!`,
//! `?`, `:` or `;` followed by a space, or the last line break), so markdown
//! markers are seen whole and `max_length` stops the stream at a sentence end.

// The export glue wit-bindgen generates takes the flattened arguments.
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({
    path: "../wit",
    world: "plugin",
});

use std::cell::RefCell;

/// Longest text held back waiting for a sentence end.
const MAX_HOLD: usize = 2048;

#[derive(Clone, Copy)]
struct Settings {
    strip_markdown: bool,
    normalize_whitespace: bool,
    max_length: usize,
}

/// Formatting state carried across the chunks of one stream.
struct Formatter {
    settings: Settings,
    in_code: bool,
    at_line_start: bool,
    /// Whitespace seen but not yet written (normalization).
    pending_space: bool,
    pending_newlines: usize,
    written_any: bool,
    /// Characters released so far (for `max_length`).
    released: usize,
}

thread_local! {
    static SETTINGS: RefCell<Option<Settings>> = const { RefCell::new(None) };
    static STREAM: RefCell<Option<Formatter>> = const { RefCell::new(None) };
}

fn settings() -> Settings {
    SETTINGS.with(|s| s.borrow().expect("init() is called before any hook"))
}

fn parse(config: Vec<(String, ConfigValue)>) -> Result<Settings, String> {
    let mut settings = Settings {
        strip_markdown: true,
        normalize_whitespace: true,
        max_length: 0,
    };
    for (key, value) in config {
        match (key.as_str(), value) {
            ("strip_markdown", ConfigValue::Boolean(b)) => settings.strip_markdown = b,
            ("normalize_whitespace", ConfigValue::Boolean(b)) => settings.normalize_whitespace = b,
            ("max_length", ConfigValue::Integer(n)) if n >= 0 => {
                settings.max_length = usize::try_from(n).unwrap_or(usize::MAX)
            }
            ("strip_markdown" | "normalize_whitespace" | "max_length", _) => {
                return Err(format!("`{key}` has the wrong type or value"))
            }
            (other, _) => return Err(format!("unknown config key `{other}`")),
        }
    }
    Ok(settings)
}

impl Formatter {
    fn new(settings: Settings) -> Self {
        Formatter {
            settings,
            in_code: false,
            at_line_start: true,
            pending_space: false,
            pending_newlines: 0,
            written_any: false,
            released: 0,
        }
    }

    /// Formats the next segment of the text.
    fn format(&mut self, segment: &str) -> String {
        let mut out = String::with_capacity(segment.len());
        for piece in segment.split_inclusive('\n') {
            let (line, newline) = match piece.strip_suffix('\n') {
                Some(line) => (line, true),
                None => (piece, false),
            };
            let line = if self.settings.strip_markdown {
                self.strip_line(line)
            } else {
                Some(line.to_owned())
            };
            let Some(line) = line else {
                // A dropped line (code fence, table separator) leaves no trace.
                continue;
            };
            for c in line.chars() {
                self.emit(c, &mut out);
            }
            if newline {
                self.emit('\n', &mut out);
                self.at_line_start = true;
            } else if !line_is_empty(piece) {
                self.at_line_start = false;
            }
        }
        out
    }

    /// Strips markdown from one line (or part of a line); `None` drops it.
    fn strip_line(&mut self, line: &str) -> Option<String> {
        let mut rest = line;
        if self.at_line_start {
            let trimmed = line.trim_start();
            if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
                self.in_code = !self.in_code;
                return None;
            }
            if self.in_code {
                return Some(line.to_owned());
            }
            if is_rule(trimmed) {
                return Some(String::new());
            }
            if is_table_separator(trimmed) {
                return None;
            }
            rest = trimmed;
            loop {
                let before = rest;
                rest = rest.trim_start_matches('>').trim_start();
                if let Some(after) = rest.strip_prefix('#') {
                    rest = after.trim_start_matches('#').trim_start();
                }
                for bullet in ["- ", "* ", "+ "] {
                    if let Some(after) = rest.strip_prefix(bullet) {
                        rest = after.trim_start();
                    }
                }
                if rest == before {
                    break;
                }
            }
        } else if self.in_code {
            return Some(line.to_owned());
        }
        Some(strip_inline(rest))
    }

    /// Writes one character, normalizing whitespace if configured.
    fn emit(&mut self, c: char, out: &mut String) {
        if !self.settings.normalize_whitespace {
            out.push(c);
            self.released += 1;
            return;
        }
        if c == '\n' {
            self.pending_newlines += 1;
            self.pending_space = false;
        } else if c.is_whitespace() {
            self.pending_space = self.pending_newlines == 0;
        } else {
            if self.written_any {
                if self.pending_newlines > 0 {
                    let n = self.pending_newlines.min(2);
                    out.extend(std::iter::repeat_n('\n', n));
                    self.released += n;
                } else if self.pending_space {
                    out.push(' ');
                    self.released += 1;
                }
            }
            self.pending_space = false;
            self.pending_newlines = 0;
            self.written_any = true;
            out.push(c);
            self.released += 1;
        }
    }
}

fn line_is_empty(piece: &str) -> bool {
    piece.trim().is_empty()
}

/// `---`, `***`, `___` (three or more, spaces allowed).
fn is_rule(line: &str) -> bool {
    let marks: String = line.chars().filter(|c| !c.is_whitespace()).collect();
    marks.len() >= 3
        && ["-", "*", "_"]
            .iter()
            .any(|m| marks.chars().all(|c| c.to_string() == *m))
}

/// `|---|:---:|` rows of a table.
fn is_table_separator(line: &str) -> bool {
    line.starts_with('|')
        && line.contains('-')
        && line.chars().all(|c| matches!(c, '|' | '-' | ':' | ' '))
}

/// Removes inline markdown: images and links keep their text, code spans
/// their content; emphasis markers and table pipes go.
fn strip_inline(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let image = c == '!' && chars.get(i + 1) == Some(&'[');
        if c == '[' || image {
            let open = if image { i + 1 } else { i };
            if let Some((text, next)) = link_at(&chars, open) {
                out.push_str(&text);
                i = next;
                continue;
            }
        }
        let prev = if i > 0 { Some(chars[i - 1]) } else { None };
        let next = chars.get(i + 1).copied();
        let spaced = |c: Option<char>| c.is_none_or(char::is_whitespace);
        match c {
            '`' => {}
            '*' | '_' | '~' if !(spaced(prev) && spaced(next)) => {
                let inside_word = prev.is_some_and(char::is_alphanumeric)
                    && next.is_some_and(char::is_alphanumeric);
                if c == '_' && inside_word {
                    out.push(c);
                }
            }
            '|' => {
                let trimmed = out.trim_end().len();
                out.truncate(trimmed);
                if !out.is_empty() {
                    out.push_str(", ");
                }
            }
            _ => out.push(c),
        }
        i += 1;
    }
    let trimmed = out.trim_end_matches([',', ' ']).len();
    if trimmed < out.len() && line.trim_end().ends_with('|') {
        out.truncate(trimmed);
    }
    out
}

/// `[text](url)` starting at `open` (the `[`): the text and the index after `)`.
fn link_at(chars: &[char], open: usize) -> Option<(String, usize)> {
    let close = open + chars[open..].iter().position(|&c| c == ']')?;
    if chars.get(close + 1) != Some(&'(') {
        return None;
    }
    let end = close + 1 + chars[close + 1..].iter().position(|&c| c == ')')?;
    Some((chars[open + 1..close].iter().collect(), end + 1))
}

/// Cuts `text` to at most `max` characters, at the last sentence end that
/// fits, else at the last word boundary followed by "…".
fn trim_to(text: &str, max: usize) -> String {
    if max == 0 || text.chars().count() <= max {
        return text.to_owned();
    }
    let cut: String = text.chars().take(max).collect();
    // Room for the ellipsis if no sentence end fits.
    let word_cut: String = text.chars().take(max - 1).collect();
    let word_complete = text[word_cut.len()..]
        .chars()
        .next()
        .is_none_or(char::is_whitespace);
    let sentence_end = cut
        .char_indices()
        .rev()
        .find(|&(i, c)| {
            matches!(c, '.' | '!' | '?')
                && text[i + c.len_utf8()..]
                    .chars()
                    .next()
                    .is_none_or(char::is_whitespace)
        })
        .map(|(i, c)| i + c.len_utf8());
    match sentence_end {
        Some(end) => cut[..end].to_owned(),
        None => {
            let end = if word_complete {
                word_cut.len()
            } else {
                word_cut
                    .rfind(char::is_whitespace)
                    .unwrap_or(word_cut.len())
            };
            let mut short = word_cut[..end].trim_end().to_owned();
            short.push('…');
            short
        }
    }
}

/// Byte offset just after the last sentence end or line break in `text`.
fn release_point(text: &str) -> usize {
    let mut point = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let end = i + c.len_utf8();
        let boundary = match c {
            '\n' => true,
            '.' | '!' | '?' | ':' | ';' => chars.peek().is_some_and(|&(_, n)| n.is_whitespace()),
            _ => false,
        };
        if boundary {
            point = end;
        }
    }
    if point == 0 && text.len() > MAX_HOLD {
        point = text.rfind(char::is_whitespace).unwrap_or(text.len());
    }
    point
}

struct Format;

impl Guest for Format {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "format".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Markdown to plain text for speech, whitespace, length".into(),
            hooks: vec![Hook::OnChunk, Hook::OnComplete],
        }
    }

    fn init(config: Vec<(String, ConfigValue)>) -> Result<(), String> {
        let settings = parse(config)?;
        SETTINGS.with(|s| *s.borrow_mut() = Some(settings));
        STREAM.with(|s| *s.borrow_mut() = None);
        Ok(())
    }

    fn on_prompt(prompt: String, _info: RequestInfo) -> Result<String, Rejection> {
        Ok(prompt)
    }

    fn on_chunk(text: String, last: bool) -> ChunkAction {
        STREAM.with(|stream| {
            let mut stream = stream.borrow_mut();
            let formatter = stream.get_or_insert_with(|| Formatter::new(settings()));
            let split = if last {
                text.len()
            } else {
                release_point(&text)
            };
            let (head, tail) = text.split_at(split);
            let before = formatter.released;
            let out = formatter.format(head);
            let max = formatter.settings.max_length;
            if max > 0 && formatter.released > max {
                // This sentence goes past the limit: end the stream before it,
                // or (if it is the first) with as much of it as fits.
                let release = if before == 0 {
                    trim_to(&out, max)
                } else {
                    String::new()
                };
                return ChunkAction::Stop(release);
            }
            ChunkAction::Hold(Held {
                release: out,
                keep: tail.to_owned(),
            })
        })
    }

    fn on_complete(text: String, _info: RequestInfo) -> Result<String, Rejection> {
        let settings = settings();
        let mut formatter = Formatter::new(settings);
        let out = formatter.format(&text);
        Ok(trim_to(&out, settings.max_length))
    }
}

export!(Format);
