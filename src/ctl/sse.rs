//! An incremental parser for Server-Sent Events (the `text/event-stream` format of the HTML
//! standard), fed with the body's frames as they arrive.
//!
//! Lines end with LF, CRLF or a lone CR — also when the CR and the LF arrive in different
//! frames. `data:` lines accumulate (joined by LF), `event:` sets the event's type, lines
//! starting with `:` are comments, other fields (`id`, `retry`, unknown ones) are ignored, and a
//! blank line ends the event. An event without any `data` field is not dispatched, and an
//! unfinished event at the end of the stream is discarded, as the standard says.

/// One dispatched event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field (`None`: the default type, `message`).
    pub event: Option<String>,
    /// The `data:` lines, joined with LF.
    pub data: String,
}

/// The parser's state between frames.
#[derive(Debug, Default)]
pub struct SseParser {
    /// The current, unfinished line.
    line: Vec<u8>,
    /// The last byte seen was a CR: an LF right after it belongs to the same line end.
    after_cr: bool,
    /// Whether the first line (which may start with a byte-order mark) is still unfinished.
    started: bool,
    /// The current event's data (each `data:` line followed by LF).
    data: String,
    /// Whether the current event has a `data` field.
    has_data: bool,
    /// The current event's type.
    event: Option<String>,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// Feeds the next bytes of the stream; returns the events they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' => self.end_line(&mut events),
                b'\r' => {
                    self.end_line(&mut events);
                    self.after_cr = true;
                }
                _ => self.line.push(b),
            }
        }
        events
    }

    /// Whether part of an event (a line, or fields without their ending blank line) is
    /// buffered: at the end of the stream, that part is lost.
    pub fn has_partial_event(&self) -> bool {
        !self.line.is_empty() || self.has_data || self.event.is_some()
    }

    fn end_line(&mut self, events: &mut Vec<SseEvent>) {
        let mut line = &self.line[..];
        if !self.started {
            self.started = true;
            line = line.strip_prefix("\u{feff}".as_bytes()).unwrap_or(line);
        }
        if line.is_empty() {
            if self.has_data {
                let mut data = std::mem::take(&mut self.data);
                data.pop(); // the LF after the last data line
                events.push(SseEvent {
                    event: self.event.take(),
                    data,
                });
            }
            self.has_data = false;
            self.event = None;
        } else if line[0] != b':' {
            let line = String::from_utf8_lossy(line);
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (&line[..], ""),
            };
            match field {
                "data" => {
                    self.data.push_str(value);
                    self.data.push('\n');
                    self.has_data = true;
                }
                "event" => self.event = Some(value.to_string()),
                _ => {}
            }
        }
        self.line.clear();
    }
}

/// The JSON of one completion-stream event: `None` at `data: [DONE]`; an `error` event whose
/// data is not JSON is a [`CtlError::Stream`], any other non-JSON data a protocol error.
pub(crate) fn chunk_json(
    event: SseEvent,
) -> Result<Option<serde_json::Value>, crate::ctl::CtlError> {
    use crate::ctl::CtlError;
    if event.data.trim() == "[DONE]" {
        return Ok(None);
    }
    match serde_json::from_str(&event.data) {
        Ok(chunk) => Ok(Some(chunk)),
        Err(_) if event.event.as_deref() == Some("error") => Err(CtlError::Stream(event.data)),
        Err(e) => Err(CtlError::Protocol(format!(
            "the server sent an event that is not valid JSON ({e}): {}",
            event.data
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(s: &str) -> SseEvent {
        SseEvent {
            event: None,
            data: s.to_string(),
        }
    }

    /// Feeds `chunks` one after another and collects every event.
    fn feed(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut parser = SseParser::new();
        chunks.iter().flat_map(|c| parser.push(c)).collect()
    }

    #[test]
    fn one_event_per_frame() {
        let events = feed(&[b"data: {\"a\":1}\n\n", b"data: [DONE]\n\n"]);
        assert_eq!(events, vec![data("{\"a\":1}"), data("[DONE]")]);
    }

    #[test]
    fn several_events_in_one_frame() {
        let events = feed(&[b"data: one\n\ndata: two\n\ndata: [DONE]\n\n"]);
        assert_eq!(events, vec![data("one"), data("two"), data("[DONE]")]);
    }

    #[test]
    fn events_split_across_frames_at_every_byte() {
        let stream =
            b"data: {\"text\":\"h\xc3\xa9llo\"}\r\n\r\ndata: second\n\ndata: [DONE]\r\n\r\n";
        let expected = vec![data("{\"text\":\"héllo\"}"), data("second"), data("[DONE]")];
        // Every split point, and byte by byte.
        for cut in 0..=stream.len() {
            assert_eq!(
                feed(&[&stream[..cut], &stream[cut..]]),
                expected,
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(feed(&bytes), expected);
    }

    #[test]
    fn crlf_and_lone_cr_line_ends() {
        assert_eq!(feed(&[b"data: a\r\n\r\n"]), vec![data("a")]);
        assert_eq!(feed(&[b"data: a\r\r"]), vec![data("a")]);
        // CR at the end of one frame, LF at the start of the next: one line end, not two.
        let events = feed(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(events, vec![data("a\nb")]);
    }

    #[test]
    fn multi_line_data_comments_event_types_and_other_fields() {
        let events = feed(&[
            b": keep-alive\n\n",
            b"id: 7\nretry: 100\ndata: first\ndata:second\ndata\n\n",
            b"event: error\ndata: {}\n\n",
            b"event: ignored\n\n",
            b"data:\n\n",
        ]);
        assert_eq!(
            events,
            vec![
                data("first\nsecond\n"),
                SseEvent {
                    event: Some("error".into()),
                    data: "{}".into()
                },
                data(""),
            ]
        );
    }

    #[test]
    fn only_one_space_after_the_colon_is_removed_and_bom_is_skipped() {
        let events = feed(&[b"\xef\xbb\xbfdata:  x \n\n"]);
        assert_eq!(events, vec![data(" x ")]);
    }

    #[test]
    fn unfinished_event_is_reported_and_not_dispatched() {
        let mut parser = SseParser::new();
        assert!(!parser.has_partial_event());
        assert!(parser.push(b"data: [DONE]\n").is_empty());
        assert!(parser.has_partial_event());
        assert_eq!(parser.push(b"\n"), vec![data("[DONE]")]);
        assert!(!parser.has_partial_event());
        assert!(parser.push(b"data: x").is_empty());
        assert!(parser.has_partial_event());
    }
}
