//! Chat templates: the plan's Jinja `chat_template` (from the checkpoint's tokenizer_config.json), rendered with
//! minijinja plus Python string methods (`.strip()`, `.startswith()`, ...) and `raise_exception`, as Hugging Face
//! templates expect.

use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// One message as the template sees it.
#[derive(Serialize)]
pub struct TemplateMessage {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatTemplate {
    /// Compile a template; `bos_token` / `eos_token` are exposed to it as variables.
    pub fn new(source: &str, bos_token: String, eos_token: String) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        // As transformers' apply_chat_template renders them.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| format!("{e:#}"))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// The prompt for `messages`, ending with the assistant turn's opening (add_generation_prompt = true).
    pub fn render(&self, messages: &[TemplateMessage]) -> Result<String, String> {
        let t = self.env.get_template("chat").map_err(|e| e.to_string())?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s.push_str(&format!(": {c}"));
                src = c.source();
            }
            s
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_and_errors() {
        let src =
            "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.strip() }}<|im_end|>\n\
                   {%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}";
        let t = ChatTemplate::new(src, String::new(), "<|im_end|>".into()).unwrap();
        let s = t
            .render(&[TemplateMessage {
                role: "user".into(),
                content: " hi ".into(),
                name: None,
            }])
            .unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|><|im_start|>assistant");
        let bad = ChatTemplate::new(
            "{{ raise_exception('roles must alternate') }}",
            String::new(),
            String::new(),
        )
        .unwrap();
        assert!(bad
            .render(&[])
            .unwrap_err()
            .contains("roles must alternate"));
        assert!(ChatTemplate::new("{% for %}", String::new(), String::new()).is_err());
    }
}
