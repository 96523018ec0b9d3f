//! OpenAI request bodies, their validation, and the OpenAI error object.
//!
//! Bodies are parsed with `deny_unknown_fields`: a field the server does not know is a 400 naming it. Fields
//! of the OpenAI API that the server does not implement are listed explicitly and accepted only where they
//! change nothing:
//! - ignored whatever their value: `user`, `metadata`, `store`, `service_tier`, `parallel_tool_calls`;
//! - accepted at their neutral value only (else 400): `logprobs` (null / false / 0), `top_logprobs` (null / 0),
//!   `echo` (false), `presence_penalty` and `frequency_penalty` (0), `best_of` (1), `suffix` (null / ""),
//!   `response_format` ({"type": "text"}), `tools` (null / []), `tool_choice` ("none" / "auto").

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;

/// An error answered as the OpenAI error object.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// 400 invalid_request_error.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            retry_after: None,
        }
    }

    pub fn with_status(mut self, status: StatusCode) -> ApiError {
        self.status = status;
        self
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// Parse a JSON body into `T`, mapping every failure to a 400 that names the offending field where known.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ApiError::invalid(format!("the request body is not valid UTF-8: {e}"), None)
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::invalid(
            "the request body is empty; expected a JSON object",
            None,
        ));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let v: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner();
        let msg = inner.to_string();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::invalid(format!("the request body is not valid JSON: {msg}"), None);
        }
        // serde names unknown / missing fields in backquotes; join them to the path.
        let named = ["unknown field `", "missing field `"]
            .iter()
            .find_map(|p| msg.strip_prefix(p))
            .and_then(|rest| rest.split('`').next());
        let base = if path == "." { String::new() } else { path };
        // The path of an unknown field already ends with it; that of a missing one is its parent's.
        let param = match named {
            Some(f) if base.is_empty() => f.to_string(),
            Some(f) if base == f || base.ends_with(&format!(".{f}")) => base,
            Some(f) => format!("{base}.{f}"),
            None => base,
        };
        let param = (!param.is_empty()).then_some(param);
        let where_ = param
            .as_deref()
            .map(|p| format!(" (at '{p}')"))
            .unwrap_or_default();
        ApiError::invalid(format!("invalid request: {msg}{where_}"), param.as_deref())
    })?;
    de.end()
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    Ok(v)
}

/// `prompt` of /v1/completions: a string, a one-element list of strings, or token ids.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// `stop`: one string or a list of up to 4.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Default)]
pub struct Common {
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub logit_bias: Option<HashMap<String, f64>>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub logit_bias: Option<HashMap<String, f64>>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    // Accepted at neutral values only.
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    pub best_of: Option<i64>,
    pub suffix: Option<String>,
    // Ignored.
    pub user: Option<Value>,
    pub metadata: Option<Value>,
    pub store: Option<Value>,
    pub service_tier: Option<Value>,
}

/// Message content: a string or a list of text parts.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
    pub name: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub logit_bias: Option<HashMap<String, f64>>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    // Accepted at neutral values only.
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub response_format: Option<Value>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    // Ignored.
    pub user: Option<Value>,
    pub metadata: Option<Value>,
    pub store: Option<Value>,
    pub service_tier: Option<Value>,
    pub parallel_tool_calls: Option<Value>,
}

/// Validated sampling settings (everything of a request but the prompt).
#[derive(Debug)]
pub struct Checked {
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub stop: Vec<String>,
    pub logit_bias: Vec<(u32, f32)>,
    pub stream: bool,
    pub include_usage: bool,
}

fn unsupported(field: &str, what: &str) -> ApiError {
    ApiError::invalid(
        format!("'{field}' is not supported by this server ({what})"),
        Some(field),
    )
}

/// Check the shared sampling fields. `max_ctx` bounds max_tokens; `vocab` bounds logit_bias keys.
pub fn check_common(c: Common, max_ctx: usize, vocab: usize) -> Result<Checked, ApiError> {
    let max_tokens = match c.max_tokens {
        None => None,
        Some(m) if m < 1 => {
            return Err(ApiError::invalid(
                format!("max_tokens must be at least 1, got {m}"),
                Some("max_tokens"),
            ))
        }
        Some(m) if m as u64 > max_ctx as u64 => {
            return Err(ApiError::invalid(
                format!("max_tokens {m} exceeds the context of {max_ctx} tokens"),
                Some("max_tokens"),
            ))
        }
        Some(m) => Some(m as usize),
    };
    let temperature = c.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::invalid(
            format!("temperature must be between 0 and 2, got {temperature}"),
            Some("temperature"),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("top_p must be in (0, 1], got {top_p}"),
            Some("top_p"),
        ));
    }
    if let Some(n) = c.n {
        if n != 1 {
            return Err(ApiError::invalid(
                format!("only n = 1 is supported, got {n}"),
                Some("n"),
            ));
        }
    }
    for (f, v) in [
        ("presence_penalty", c.presence_penalty),
        ("frequency_penalty", c.frequency_penalty),
    ] {
        if let Some(v) = v {
            if v != 0.0 {
                return Err(unsupported(f, "only 0 is accepted"));
            }
        }
    }
    let stop = match c.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > 4 {
        return Err(ApiError::invalid(
            format!("at most 4 stop sequences are allowed, got {}", stop.len()),
            Some("stop"),
        ));
    }
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid(
            "stop sequences must not be empty",
            Some("stop"),
        ));
    }
    let mut logit_bias = vec![];
    for (k, v) in c.logit_bias.unwrap_or_default() {
        let id: u32 = match k.parse() {
            Ok(id) if (id as usize) < vocab => id,
            _ => {
                return Err(ApiError::invalid(
                    format!("logit_bias key {k:?} is not a token id below {vocab}"),
                    Some("logit_bias"),
                ))
            }
        };
        if !(-100.0..=100.0).contains(&v) {
            return Err(ApiError::invalid(
                format!("logit_bias values must be in [-100, 100], got {v}"),
                Some("logit_bias"),
            ));
        }
        logit_bias.push((id, v as f32));
    }
    logit_bias.sort_by_key(|x| x.0);
    let seed = match c.seed {
        Some(s) => s as u64,
        None => {
            use std::sync::atomic::{AtomicU64, Ordering};
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            t ^ NEXT
                .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
                .rotate_left(17)
        }
    };
    Ok(Checked {
        max_tokens,
        temperature: temperature as f32,
        top_p: top_p as f32,
        seed,
        stop,
        logit_bias,
        stream: c.stream.unwrap_or(false),
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
    })
}

impl CompletionRequest {
    /// Split into the shared fields, rejecting non-neutral values of unimplemented ones.
    pub fn common(&mut self) -> Result<Common, ApiError> {
        if self.logprobs.is_some_and(|l| l > 0) {
            return Err(unsupported("logprobs", "only null or 0 is accepted"));
        }
        if self.echo == Some(true) {
            return Err(unsupported("echo", "only false is accepted"));
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(unsupported("best_of", "only 1 is accepted"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(unsupported("suffix", "only null is accepted"));
        }
        Ok(Common {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            n: self.n,
            stream: self.stream,
            stream_options: self.stream_options.take(),
            seed: self.seed,
            stop: self.stop.take(),
            logit_bias: self.logit_bias.take(),
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
        })
    }
}

impl ChatRequest {
    pub fn common(&mut self) -> Result<Common, ApiError> {
        if self.logprobs == Some(true) {
            return Err(unsupported("logprobs", "only false is accepted"));
        }
        if self.top_logprobs.is_some_and(|l| l != 0) {
            return Err(unsupported("top_logprobs", "only 0 is accepted"));
        }
        if let Some(f) = &self.response_format {
            if f != &json!({"type": "text"}) {
                return Err(unsupported(
                    "response_format",
                    "only {\"type\": \"text\"} is accepted",
                ));
            }
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(unsupported("tools", "tool calling is not implemented"));
        }
        if let Some(c) = &self.tool_choice {
            if c != "none" && c != "auto" {
                return Err(unsupported("tool_choice", "only \"none\" is accepted"));
            }
        }
        if self.max_tokens.is_some() && self.max_completion_tokens.is_some() {
            return Err(ApiError::invalid(
                "give max_tokens or max_completion_tokens, not both",
                Some("max_tokens"),
            ));
        }
        Ok(Common {
            max_tokens: self.max_tokens.or(self.max_completion_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            n: self.n,
            stream: self.stream,
            stream_options: self.stream_options.take(),
            seed: self.seed,
            stop: self.stop.take(),
            logit_bias: self.logit_bias.take(),
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_name_fields() {
        let e = parse_json::<CompletionRequest>(br#"{"model":"m","prompt":"x","bogus":1}"#)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("bogus"), "{e:?}");
        let e = parse_json::<CompletionRequest>(br#"{"prompt":"x"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("model"), "{e:?}");
        let e = parse_json::<CompletionRequest>(br#"{"model":"m","prompt":"x","max_tokens":"9"}"#)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"), "{e:?}");
        let e = parse_json::<ChatRequest>(
            br#"{"model":"m","messages":[{"role":"user","content":"x","extra":1}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].extra"), "{e:?}");
        let e = parse_json::<CompletionRequest>(br#"{"model":"m","prompt":"x""#).unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{e:?}");
        assert!(parse_json::<CompletionRequest>(b"{\"model\":\"\xff\"}").is_err());
        let ok = parse_json::<CompletionRequest>(
            br#"{"model":"m","prompt":"x","user":"u","logprobs":null,"presence_penalty":0}"#,
        );
        assert!(ok.is_ok());
    }
}
