//! Chat prompts: the model's `tokenizer.chat_template` rendered with minijinja, or the Mistral
//! Instruct format (`<s>[INST] … [/INST]`) when the file has no template.

use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Renders conversations for one model.
pub struct ChatTemplate {
    source: Option<String>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// `template` is the GGUF's `tokenizer.chat_template` (if any); `bos`/`eos` the pieces of
    /// the model's BOS and EOS tokens.
    pub fn new(template: Option<String>, bos: &str, eos: &str) -> ChatTemplate {
        ChatTemplate {
            source: template,
            bos: bos.into(),
            eos: eos.into(),
        }
    }

    /// The template of a model file: its `tokenizer.chat_template`, with the pieces of its
    /// BOS and EOS tokens.
    pub fn for_model(
        gguf: &crate::ggml::gguf::GgufFile,
        tok: &crate::tokenizer::Tokenizer,
    ) -> ChatTemplate {
        let src = gguf
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let piece = |id: Option<u32>| id.and_then(|i| tok.piece(i)).unwrap_or("").to_string();
        ChatTemplate::new(src, &piece(tok.bos()), &piece(tok.eos()))
    }

    /// Renders `messages` and tokenizes the result (control tokens in the rendered text, such
    /// as `<s>` or `[INST]`, become their ids).
    pub fn encode(
        &self,
        tok: &crate::tokenizer::Tokenizer,
        messages: &[ChatMessage],
    ) -> anyhow::Result<Vec<u32>> {
        tok.encode_with_control_tokens(&self.render(messages)?)
    }

    /// Whether the model's own template is used.
    pub fn is_model_template(&self) -> bool {
        self.source.is_some()
    }

    /// Renders `messages` into prompt text (control tokens spelled out, e.g. `<s>`), ending
    /// where the assistant's reply begins.
    pub fn render(&self, messages: &[ChatMessage]) -> anyhow::Result<String> {
        if messages.is_empty() {
            anyhow::bail!("a chat needs at least one message");
        }
        if let Some(bad) = messages
            .iter()
            .find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant"))
        {
            anyhow::bail!(
                "unknown chat role '{}' (expected system, user or assistant)",
                bad.role
            );
        }
        match &self.source {
            Some(src) => self.render_jinja(src, messages),
            None => Ok(self.render_mistral(messages)),
        }
    }

    fn render_jinja(&self, src: &str, messages: &[ChatMessage]) -> anyhow::Result<String> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", src)
            .map_err(|e| anyhow::anyhow!("invalid chat template in the model: {e}"))?;
        let tmpl = env.get_template("chat").expect("just added");
        tmpl.render(context! {
            messages => messages,
            bos_token => self.bos,
            eos_token => self.eos,
            add_generation_prompt => true,
        })
        .map_err(|e| anyhow::anyhow!("chat template failed: {e}"))
    }

    /// Mistral Instruct: `<s>[INST] u1 [/INST] a1</s>[INST] u2 [/INST]` (replies untrimmed);
    /// a system message is prepended to the first user turn.
    fn render_mistral(&self, messages: &[ChatMessage]) -> String {
        let mut out = self.bos.clone();
        let mut system: Option<&str> = None;
        for m in messages {
            match m.role.as_str() {
                "system" => system = Some(&m.content),
                "user" => {
                    let text = match system.take() {
                        Some(s) => format!("{s}\n\n{}", m.content),
                        None => m.content.clone(),
                    };
                    out.push_str(&format!("[INST] {} [/INST]", text.trim()));
                }
                _ => {
                    // As Mistral's own template: the reply as given (a leading space is part
                    // of its first token), so a resent conversation tokenizes like the
                    // original and continues from the prompt cache.
                    out.push_str(&m.content);
                    out.push_str(&self.eos);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mistral_instruct_format() {
        let t = ChatTemplate::new(None, "<s>", "</s>");
        let s = t
            .render(&[
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi"),
                ChatMessage::new("assistant", " Hello."),
                ChatMessage::new("user", "Bye"),
            ])
            .unwrap();
        assert_eq!(
            s,
            "<s>[INST] Be brief.\n\nHi [/INST] Hello.</s>[INST] Bye [/INST]"
        );
    }

    #[test]
    fn model_template_is_rendered_with_python_methods_and_errors() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'].strip() }} [/INST]{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% else %}{{ raise_exception('no system') }}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(Some(src.into()), "<s>", "</s>");
        assert_eq!(
            t.render(&[ChatMessage::new("user", "  hi ")]).unwrap(),
            "<s>[INST] hi [/INST]"
        );
        let err = t
            .render(&[ChatMessage::new("system", "x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no system"), "{err}");
        assert!(ChatTemplate::new(Some("{% for %}".into()), "", "")
            .render(&[ChatMessage::new("user", "x")])
            .is_err());
        assert!(t.render(&[ChatMessage::new("robot", "x")]).is_err());
    }
}
