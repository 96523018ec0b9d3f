//! `mimort serve` end to end: a real server on a loopback port (CPU backend, tiny checkpoint) driven by real HTTP
//! clients. Every endpoint streaming and not, the OpenAI error object for each kind of bad input, the API key, a
//! bounded load test (greedy outputs under load equal the single-request outputs), disconnects, context overflow,
//! a full queue, graceful shutdown, and the real binary under SIGTERM.

use futures::StreamExt;
use mimo_compiler::{compile, CompileOptions};
use mimo_models::tiny::{make_tiny, TinyOptions};
use mimo_runtime::cpu::CpuSession;
use mimo_runtime::generate::generate;
use mimo_runtime::model::Model;
use mimo_runtime::sampling::{Sampler, SamplingParams};
use mimo_runtime::server::detok::Detokenizer;
use mimo_runtime::server::{spawn, RunningServer, ServeOptions};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

const MODEL: &str = "tiny";

struct Fixture {
    plan: PathBuf,
    model: Arc<Model>,
}

/// The tiny checkpoint, compiled once per test binary (under the target's temp dir, so nothing outlives `cargo
/// clean`).
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let td = tempfile::Builder::new()
            .prefix("server-test-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap()
            .keep();
        let ckpt = td.join("ckpt");
        let plan = td.join("plan");
        make_tiny(&ckpt, &TinyOptions::default()).expect("make_tiny");
        let mut o = CompileOptions::default();
        o.passes.experts = mimo_ir::DType::BF16;
        compile(&ckpt, &plan, &o).expect("compile");
        let model = Model::load(&plan, true).expect("load");
        Fixture { plan, model }
    })
}

fn opts() -> ServeOptions {
    ServeOptions {
        port: 0,
        model_name: MODEL.into(),
        max_batch: 4,
        max_queue: 16,
        max_ctx: 512,
        shutdown_grace: Duration::from_secs(10),
        ..Default::default()
    }
}

async fn server(o: ServeOptions) -> (RunningServer, String) {
    let f = fixture();
    let s = spawn(f.model.clone(), Some(&f.plan), o).await.unwrap();
    let base = format!("http://{}", s.addr);
    (s, base)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

async fn post(c: &reqwest::Client, url: &str, body: &Value) -> (StatusCode, Value) {
    let r = c.post(url).json(body).send().await.unwrap();
    let st = r.status();
    let v = r.json::<Value>().await.unwrap();
    (st, v)
}

/// What a streamed response gave.
#[derive(Debug, Default)]
struct Streamed {
    chunks: Vec<Value>,
    text: String,
    finish: Option<String>,
    usage: Option<Value>,
    done: bool,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
}

async fn stream(c: &reqwest::Client, url: &str, body: &Value) -> Streamed {
    let r = c.post(url).json(body).send().await.unwrap();
    assert_eq!(r.status(), 200, "{body}");
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    read_stream(r).await
}

async fn read_stream(r: reqwest::Response) -> Streamed {
    let mut out = Streamed::default();
    let mut buf = String::new();
    let mut bytes = r.bytes_stream();
    while let Some(b) = bytes.next().await {
        buf.push_str(std::str::from_utf8(&b.unwrap()).unwrap());
        while let Some(i) = buf.find("\n\n") {
            let ev: String = buf.drain(..i + 2).collect();
            let data = ev.trim_end().strip_prefix("data: ").expect("data line");
            assert!(!out.done, "data after [DONE]");
            if data == "[DONE]" {
                out.done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            assert!(v.get("error").is_none(), "error chunk {v}");
            if let Some(ch) = v["choices"].as_array().and_then(|a| a.first()) {
                let t = ch["text"]
                    .as_str()
                    .or(ch["delta"]["content"].as_str())
                    .unwrap_or("");
                if !t.is_empty() {
                    let now = Instant::now();
                    out.first_at.get_or_insert(now);
                    out.last_at = Some(now);
                }
                out.text.push_str(t);
                if let Some(f) = ch["finish_reason"].as_str() {
                    out.finish = Some(f.into());
                }
            }
            if v["usage"].is_object() {
                out.usage = Some(v["usage"].clone());
            }
            out.chunks.push(v);
        }
    }
    assert!(buf.trim().is_empty(), "trailing bytes {buf:?}");
    out
}

fn greedy(prompt: &str, max_tokens: usize) -> Value {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

async fn metric(c: &reqwest::Client, base: &str, name: &str) -> f64 {
    let t = c
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    t.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no metric {name} in\n{t}"))
        .parse()
        .unwrap()
}

async fn wait_metric(c: &reqwest::Client, base: &str, name: &str, want: f64) {
    let t0 = Instant::now();
    loop {
        let v = metric(c, base, name).await;
        if v == want {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{name} stayed {v}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const PROMPTS: [&str; 8] = [
    "def hello():",
    "The quick brown fox",
    "import numpy as np\n",
    "Once upon a time",
    "fn main() {",
    "SELECT * FROM",
    "Hello, world! ",
    "for i in range(10):",
];

#[test]
fn detokenizer_matches_full_decode() {
    use rand::{Rng, SeedableRng};
    let tok = &fixture().model.tokenizer;
    let vocab = fixture().model.plan.model.vocab as u32;
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for _ in 0..200 {
        let ids: Vec<u32> = (0..r.random_range(1..40))
            .map(|_| r.random_range(0..vocab))
            .collect();
        let mut d = Detokenizer::default();
        let mut s = String::new();
        for &t in &ids {
            s.push_str(&d.push(tok, t));
        }
        s.push_str(&d.flush(tok));
        assert_eq!(s, tok.decode(&ids, true).unwrap(), "{ids:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_endpoint_streaming_and_not() {
    let (s, base) = server(opts()).await;
    let c = client();
    let h: Value = c
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["status"], "ok");
    let m: Value = c
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], MODEL);

    // Completions: the server's greedy output is the library's generate() output.
    let f = fixture();
    let prompt = PROMPTS[0];
    let (st, v) = post(&c, &format!("{base}/v1/completions"), &greedy(prompt, 12)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    let ids = f
        .model
        .tokenizer
        .encode(prompt, false)
        .unwrap()
        .get_ids()
        .to_vec();
    let mut sess = CpuSession::new(f.model.clone(), 512);
    let (out, _) = generate(
        &mut sess,
        &ids,
        12,
        &mut Sampler::new(SamplingParams::default()),
        &f.model.plan.model.eos,
        |_| true,
    )
    .unwrap();
    assert_eq!(text, f.model.tokenizer.decode(&out, true).unwrap());
    let u = &v["usage"];
    assert_eq!(u["prompt_tokens"], ids.len());
    assert_eq!(u["completion_tokens"], out.len());
    assert_eq!(u["total_tokens"], ids.len() + out.len());
    let finish = v["choices"][0]["finish_reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(finish, if out.len() == 12 { "length" } else { "stop" });

    // The same request streamed: the same text, usage on the last chunk, then [DONE].
    let mut b = greedy(prompt, 12);
    b["stream"] = json!(true);
    let sr = stream(&c, &format!("{base}/v1/completions"), &b).await;
    assert!(sr.done);
    assert_eq!(sr.text, text);
    assert_eq!(sr.finish.as_deref(), Some(finish.as_str()));
    assert_eq!(sr.usage.as_ref(), Some(u));
    assert!(sr.chunks.iter().all(|c| c["object"] == "text_completion"));
    assert!(sr.chunks.len() >= 2);

    // Chat, not streamed and streamed (with the OpenAI usage-only chunk).
    let chat = json!({"model": MODEL, "temperature": 0, "max_tokens": 10,
                      "messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": [{"type": "text", "text": "Say hi"}]}]});
    let (st, v) = post(&c, &format!("{base}/v1/chat/completions"), &chat).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let ctext = v["choices"][0]["message"]["content"].as_str().unwrap();
    let rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n";
    let n_prompt = f.model.tokenizer.encode(rendered, false).unwrap().len();
    assert_eq!(v["usage"]["prompt_tokens"], n_prompt);
    let mut cs = chat.clone();
    cs["stream"] = json!(true);
    cs["stream_options"] = json!({"include_usage": true});
    let sr = stream(&c, &format!("{base}/v1/chat/completions"), &cs).await;
    assert!(sr.done);
    assert_eq!(sr.text, ctext);
    assert_eq!(sr.chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(sr
        .chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let last = sr.chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], v["usage"]);
    assert_eq!(
        sr.finish.as_deref(),
        v["choices"][0]["finish_reason"].as_str()
    );

    // Sampling with a seed is reproducible; token-id prompts work.
    let sampled = json!({"model": MODEL, "prompt": ids, "max_tokens": 8, "temperature": 0.9,
                         "top_p": 0.9, "seed": 42});
    let (_, a) = post(&c, &format!("{base}/v1/completions"), &sampled).await;
    let (_, b) = post(&c, &format!("{base}/v1/completions"), &sampled).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    assert_eq!(a["usage"]["prompt_tokens"], ids.len());

    // Metrics.
    let t = c
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "mimo_requests_total{endpoint=\"/v1/completions\",status=\"200\"}",
        "mimo_prompt_tokens_total",
        "mimo_completion_tokens_total",
        "mimo_time_to_first_token_seconds_bucket",
        "mimo_time_per_output_token_seconds_count",
        "mimo_queue_depth 0",
        "mimo_active_sequences 0",
        "mimo_kv_cache_tokens_used 0",
        "mimo_kv_cache_tokens_capacity 2048",
        "mimo_dflash_acceptance_length_bucket{le=\"1\"}",
        "mimo_dflash_acceptance_length_count",
    ] {
        assert!(t.contains(name), "metrics lack {name}:\n{t}");
    }
    assert!(metric(&c, &base, "mimo_completion_tokens_total").await > 0.0);
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stop_strings_cut_the_output() {
    let (s, base) = server(opts()).await;
    let c = client();
    let url = format!("{base}/v1/completions");
    let mut b = greedy(PROMPTS[1], 24);
    b["logit_bias"] = json!({"2": -100});
    let (_, v) = post(&c, &url, &b).await;
    let full = v["choices"][0]["text"].as_str().unwrap().to_string();
    // A stop string from the middle of the output (3 chars from a char boundary past the first 4 bytes).
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    assert!(chars.len() > 8, "{full:?}");
    let (i0, _) = chars[4];
    let i1 = chars.get(7).map(|c| c.0).unwrap_or(full.len());
    let stop = full[i0..i1].to_string();
    let want = &full[..full.find(&stop).unwrap()];
    b["stop"] = json!(["never-there", stop]);
    let (_, v) = post(&c, &url, &b).await;
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), want);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    b["stream"] = json!(true);
    b["stop"] = json!(stop);
    let sr = stream(&c, &url, &b).await;
    assert_eq!(sr.text, want);
    assert_eq!(sr.finish.as_deref(), Some("stop"));
    s.shutdown().await.unwrap();
}

/// (what, url, body, status, param) of one bad request.
type Case<'a, B> = (&'a str, &'a str, B, u16, Option<&'a str>);

fn check_error(st: StatusCode, v: &Value, want: u16, param: Option<&str>, what: &str) {
    assert_eq!(st.as_u16(), want, "{what}: {v}");
    let e = &v["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
    assert!(e["type"].is_string(), "{what}: {v}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{what}: {v}"
    );
    if want != 429 {
        assert_eq!(e["type"], "invalid_request_error", "{what}: {v}");
    }
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{what}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_openai_errors_and_the_server_stays_up() {
    let (s, base) = server(ServeOptions {
        max_ctx: 64,
        ..opts()
    })
    .await;
    let c = client();
    let comp = format!("{base}/v1/completions");
    let chat = format!("{base}/v1/chat/completions");
    // A stream in flight while the bad requests come in must be unaffected.
    let mut long = greedy(PROMPTS[2], 40);
    long["stream"] = json!(true);
    long["logit_bias"] = json!({"2": -100});
    let mut plain = long.clone();
    plain["stream"] = json!(false);
    let (_, expect) = post(&c, &comp, &plain).await;
    let inflight = tokio::spawn({
        let c = c.clone();
        let comp = comp.clone();
        let long = long.clone();
        async move { stream(&c, &comp, &long).await }
    });

    let long_prompt = "word ".repeat(200);
    let raw: Vec<Case<Vec<u8>>> = vec![
        (
            "malformed JSON",
            &comp,
            b"{\"model\": \"tiny\", \"prompt\": ".to_vec(),
            400,
            None,
        ),
        ("not an object", &comp, b"[1, 2]".to_vec(), 400, None),
        ("empty body", &comp, vec![], 400, None),
        (
            "invalid UTF-8",
            &comp,
            b"{\"model\": \"tiny\", \"prompt\": \"\xff\xfe\"}".to_vec(),
            400,
            None,
        ),
        (
            "oversized",
            &comp,
            {
                let mut b = b"{\"model\": \"tiny\", \"prompt\": \"".to_vec();
                b.extend(std::iter::repeat_n(b'a', 2 << 20));
                b.extend(b"\"}");
                b
            },
            413,
            None,
        ),
    ];
    for (what, url, body, want, param) in raw {
        let r = c
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let st = r.status();
        let v: Value = r.json().await.unwrap();
        check_error(st, &v, want, param, what);
    }
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<Case<Value>> = vec![
        (
            "wrong type",
            &comp,
            json!({"model": MODEL, "prompt": "x", "max_tokens": "9"}),
            400,
            Some("max_tokens"),
        ),
        (
            "wrong type prompt",
            &comp,
            json!({"model": MODEL, "prompt": {"a": 1}}),
            400,
            Some("prompt"),
        ),
        (
            "missing model",
            &comp,
            json!({"prompt": "x"}),
            400,
            Some("model"),
        ),
        (
            "missing prompt",
            &comp,
            json!({"model": MODEL}),
            400,
            Some("prompt"),
        ),
        (
            "missing messages",
            &chat,
            json!({"model": MODEL}),
            400,
            Some("messages"),
        ),
        (
            "unknown model",
            &comp,
            json!({"model": "gpt-4", "prompt": "x"}),
            404,
            Some("model"),
        ),
        (
            "unknown model chat",
            &chat,
            json!({"model": "gpt-4", "messages": msgs}),
            404,
            Some("model"),
        ),
        (
            "empty prompt",
            &comp,
            json!({"model": MODEL, "prompt": ""}),
            400,
            Some("prompt"),
        ),
        (
            "empty prompt list",
            &comp,
            json!({"model": MODEL, "prompt": []}),
            400,
            Some("prompt"),
        ),
        (
            "two prompts",
            &comp,
            json!({"model": MODEL, "prompt": ["a", "b"]}),
            400,
            Some("prompt"),
        ),
        (
            "bad token id",
            &comp,
            json!({"model": MODEL, "prompt": [1, 99999]}),
            400,
            Some("prompt"),
        ),
        (
            "over-long prompt",
            &comp,
            json!({"model": MODEL, "prompt": long_prompt}),
            400,
            Some("prompt"),
        ),
        (
            "over-long chat",
            &chat,
            json!({"model": MODEL, "messages": [{"role": "user", "content": long_prompt}]}),
            400,
            Some("messages"),
        ),
        (
            "zero max_tokens",
            &comp,
            json!({"model": MODEL, "prompt": "x", "max_tokens": 0}),
            400,
            Some("max_tokens"),
        ),
        (
            "negative max_tokens",
            &comp,
            json!({"model": MODEL, "prompt": "x", "max_tokens": -5}),
            400,
            Some("max_tokens"),
        ),
        (
            "huge max_tokens",
            &comp,
            json!({"model": MODEL, "prompt": "x", "max_tokens": 1_000_000_000}),
            400,
            Some("max_tokens"),
        ),
        (
            "enormous max_tokens",
            &comp,
            json!({"model": MODEL, "prompt": "x", "max_tokens": 1e300}),
            400,
            Some("max_tokens"),
        ),
        (
            "negative temperature",
            &comp,
            json!({"model": MODEL, "prompt": "x", "temperature": -0.5}),
            400,
            Some("temperature"),
        ),
        (
            "hot temperature",
            &chat,
            json!({"model": MODEL, "messages": msgs, "temperature": 2.5}),
            400,
            Some("temperature"),
        ),
        (
            "top_p 0",
            &comp,
            json!({"model": MODEL, "prompt": "x", "top_p": 0}),
            400,
            Some("top_p"),
        ),
        (
            "top_p > 1",
            &comp,
            json!({"model": MODEL, "prompt": "x", "top_p": 1.5}),
            400,
            Some("top_p"),
        ),
        (
            "n = 2",
            &comp,
            json!({"model": MODEL, "prompt": "x", "n": 2}),
            400,
            Some("n"),
        ),
        (
            "n = 0",
            &chat,
            json!({"model": MODEL, "messages": msgs, "n": 0}),
            400,
            Some("n"),
        ),
        (
            "unknown field",
            &comp,
            json!({"model": MODEL, "prompt": "x", "frobnicate": true}),
            400,
            Some("frobnicate"),
        ),
        (
            "unknown message field",
            &chat,
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x", "mood": 1}]}),
            400,
            Some("messages[0].mood"),
        ),
        (
            "stop of wrong type",
            &comp,
            json!({"model": MODEL, "prompt": "x", "stop": 5}),
            400,
            Some("stop"),
        ),
        (
            "empty stop",
            &comp,
            json!({"model": MODEL, "prompt": "x", "stop": [""]}),
            400,
            Some("stop"),
        ),
        (
            "logprobs",
            &comp,
            json!({"model": MODEL, "prompt": "x", "logprobs": 5}),
            400,
            Some("logprobs"),
        ),
        (
            "penalty",
            &comp,
            json!({"model": MODEL, "prompt": "x", "presence_penalty": 1.0}),
            400,
            Some("presence_penalty"),
        ),
        (
            "empty messages",
            &chat,
            json!({"model": MODEL, "messages": []}),
            400,
            Some("messages"),
        ),
        (
            "unknown role",
            &chat,
            json!({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
            400,
            Some("messages[0].role"),
        ),
        (
            "image part",
            &chat,
            json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "text": null}]}]}),
            400,
            Some("messages[0].content[0]"),
        ),
        (
            "stream of wrong type",
            &chat,
            json!({"model": MODEL, "messages": msgs, "stream": "yes"}),
            400,
            Some("stream"),
        ),
    ];
    for (what, url, body, want, param) in cases {
        let (st, v) = post(&c, url, &body).await;
        check_error(st, &v, want, param, what);
    }
    // Neutral values of unimplemented fields are accepted.
    let ok = json!({"model": MODEL, "prompt": "x", "max_tokens": 2, "user": "u", "logprobs": null,
                    "presence_penalty": 0, "frequency_penalty": 0.0, "echo": false, "best_of": 1});
    let (st, v) = post(&c, &comp, &ok).await;
    assert_eq!(st, 200, "{v}");
    // Unknown route and method.
    let r = c.get(format!("{base}/v2/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    let r = c.get(&comp).send().await.unwrap();
    assert_eq!(r.status(), 405);

    let sr = inflight.await.unwrap();
    assert!(sr.done);
    assert_eq!(sr.text, expect["choices"][0]["text"].as_str().unwrap());
    let (st, _) = post(&c, &comp, &greedy(PROMPTS[0], 4)).await;
    assert_eq!(st, 200);
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_key_is_enforced_except_on_health() {
    let (s, base) = server(ServeOptions {
        api_key: Some("sekret".into()),
        ..opts()
    })
    .await;
    let c = client();
    assert_eq!(
        c.get(format!("{base}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    for (path, key) in [
        ("/v1/models", None),
        ("/v1/models", Some("wrong")),
        ("/metrics", None),
    ] {
        let mut r = c.get(format!("{base}{path}"));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let r = r.send().await.unwrap();
        let st = r.status();
        let v: Value = r.json().await.unwrap();
        check_error(st, &v, 401, None, path);
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    let r = c
        .post(format!("{base}/v1/completions"))
        .json(&greedy("x", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(format!("{base}/v1/completions"))
        .bearer_auth("sekret")
        .json(&greedy("x", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("{base}/v1/models"))
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.shutdown().await.unwrap();
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_32_concurrent_streams_match_single_requests() {
    const CLIENTS: usize = 32;
    const PER_CLIENT: usize = 2;
    const MAX_TOKENS: usize = 24;
    let (s, base) = server(ServeOptions {
        max_batch: 8,
        max_queue: 64,
        ..opts()
    })
    .await;
    let c = client();
    let url = format!("{base}/v1/completions");
    let body = |i: usize| {
        let mut b = greedy(PROMPTS[i % PROMPTS.len()], MAX_TOKENS);
        b["stream"] = json!(true);
        // Every request runs its full length (no end-of-sequence token).
        b["logit_bias"] = json!({"2": -100});
        b
    };
    // Single-request outputs, one at a time.
    let mut single = vec![];
    let t0 = Instant::now();
    let mut single_tokens = 0u64;
    for i in 0..PROMPTS.len() {
        let r = stream(&c, &url, &body(i)).await;
        single_tokens += r.usage.as_ref().unwrap()["completion_tokens"]
            .as_u64()
            .unwrap();
        single.push(r.text);
    }
    let single_tps = single_tokens as f64 / t0.elapsed().as_secs_f64();

    let t0 = Instant::now();
    let mut tasks = vec![];
    for k in 0..CLIENTS {
        let c = c.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = vec![];
            for j in 0..PER_CLIENT {
                let i = k * PER_CLIENT + j;
                let r = c.post(&url).json(&body(i)).send().await;
                let r = match r {
                    Ok(r) if r.status() == 200 => r,
                    other => {
                        out.push((i, Err(format!("{other:?}"))));
                        continue;
                    }
                };
                let start = Instant::now();
                let sr = read_stream(r).await;
                out.push((i, Ok((sr, start))));
            }
            out
        }));
    }
    let mut errors = 0;
    let mut tpot = vec![];
    let mut ttft = vec![];
    let mut tokens = 0u64;
    let mut n = 0;
    for t in tasks {
        for (i, r) in t.await.unwrap() {
            n += 1;
            match r {
                Err(e) => {
                    errors += 1;
                    eprintln!("request {i}: {e}");
                }
                Ok((sr, start)) => {
                    assert!(sr.done, "request {i} did not finish");
                    assert_eq!(sr.text, single[i % PROMPTS.len()], "request {i}");
                    let ct = sr.usage.as_ref().unwrap()["completion_tokens"]
                        .as_u64()
                        .unwrap();
                    assert_eq!(ct, MAX_TOKENS as u64, "request {i}");
                    tokens += ct;
                    if let (Some(a), Some(b)) = (sr.first_at, sr.last_at) {
                        ttft.push(a.duration_since(start).as_secs_f64());
                        if ct > 1 {
                            tpot.push(b.duration_since(a).as_secs_f64() / (ct - 1) as f64);
                        }
                    }
                }
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    assert_eq!(n, CLIENTS * PER_CLIENT);
    assert_eq!(errors, 0);
    let (p50, p99) = (pct(&mut tpot, 0.5), pct(&mut tpot, 0.99));
    eprintln!(
        "load: {n} requests, {CLIENTS} concurrent streaming clients, max batch 8, errors {errors}; \
         TPOT p50 {:.2} ms p99 {:.2} ms; TTFT p50 {:.1} ms; throughput {:.0} tok/s under load vs {:.0} tok/s \
         one request at a time; wall {wall:.2} s",
        p50 * 1e3,
        p99 * 1e3,
        pct(&mut ttft, 0.5) * 1e3,
        tokens as f64 / wall,
        single_tps
    );
    wait_metric(&c, &base, "mimo_active_sequences", 0.0).await;
    assert_eq!(metric(&c, &base, "mimo_queue_depth").await, 0.0);
    s.shutdown().await.unwrap();
}

fn endless(prompt: &str) -> Value {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": 500, "temperature": 0, "stream": true,
           "logit_bias": {"2": -100}})
}

/// Read until the first text arrives, then hand back the response (still streaming).
async fn started(c: &reqwest::Client, url: &str, body: &Value) -> impl futures::Stream {
    let r = c.post(url).json(body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut bytes = Box::pin(r.bytes_stream());
    let mut seen = String::new();
    while !seen.contains("\n\n") {
        seen.push_str(&String::from_utf8_lossy(
            &bytes.next().await.unwrap().unwrap(),
        ));
    }
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disconnect_frees_the_slot() {
    let (s, base) = server(ServeOptions {
        max_batch: 1,
        max_ctx: 4096,
        ..opts()
    })
    .await;
    let c = client();
    let url = format!("{base}/v1/completions");
    // A running stream dropped midway.
    let a = started(&c, &url, &endless(PROMPTS[0])).await;
    assert_eq!(metric(&c, &base, "mimo_active_sequences").await, 1.0);
    // A queued one dropped before it ever ran.
    let b = c
        .post(&url)
        .json(&endless(PROMPTS[1]))
        .send()
        .await
        .unwrap();
    wait_metric(&c, &base, "mimo_queue_depth", 1.0).await;
    drop(b);
    drop(a);
    wait_metric(&c, &base, "mimo_active_sequences", 0.0).await;
    wait_metric(&c, &base, "mimo_queue_depth", 0.0).await;
    wait_metric(&c, &base, "mimo_kv_cache_tokens_used", 0.0).await;
    assert_eq!(
        metric(&c, &base, "mimo_requests_cancelled_total").await,
        2.0
    );
    assert!(metric(&c, &base, "mimo_completion_tokens_total").await < 500.0);
    // A non-streaming request whose client gives up.
    let mut b = endless(PROMPTS[3]);
    b["stream"] = json!(false);
    b["max_tokens"] = json!(4000);
    let r = c
        .post(&url)
        .json(&b)
        .timeout(Duration::from_millis(150))
        .send()
        .await;
    assert!(r.is_err(), "{r:?}");
    wait_metric(&c, &base, "mimo_requests_cancelled_total", 3.0).await;
    wait_metric(&c, &base, "mimo_active_sequences", 0.0).await;
    assert!(metric(&c, &base, "mimo_completion_tokens_total").await < 4000.0);
    // Still serving.
    let (st, v) = post(&c, &url, &greedy(PROMPTS[2], 5)).await;
    assert_eq!(st, 200, "{v}");
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn context_overflow_ends_with_length() {
    let ctx = 48;
    let (s, base) = server(ServeOptions {
        max_ctx: ctx,
        ..opts()
    })
    .await;
    let c = client();
    let prompt = "The quick brown fox jumps over";
    let n = fixture()
        .model
        .tokenizer
        .encode(prompt, false)
        .unwrap()
        .len();
    assert!(n < ctx);
    let mut b = json!({"model": MODEL, "prompt": prompt, "max_tokens": ctx, "temperature": 0,
                       "logit_bias": {"2": -100}});
    let (st, v) = post(&c, &format!("{base}/v1/completions"), &b).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // Each new token but the last needs a cache position.
    assert_eq!(v["usage"]["completion_tokens"], ctx - n + 1);
    b["stream"] = json!(true);
    let sr = stream(&c, &format!("{base}/v1/completions"), &b).await;
    assert_eq!(sr.finish.as_deref(), Some("length"));
    assert_eq!(sr.text, v["choices"][0]["text"].as_str().unwrap());
    // Chat without max_tokens runs to the end of the context.
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
                      "logit_bias": {"2": -100}});
    let (st, v) = post(&c, &format!("{base}/v1/chat/completions"), &chat).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let (st, _) = post(&c, &format!("{base}/v1/completions"), &greedy("x", 3)).await;
    assert_eq!(st, 200);
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_queue_gets_429_with_retry_after() {
    let (s, base) = server(ServeOptions {
        max_batch: 1,
        max_queue: 1,
        ..opts()
    })
    .await;
    let c = client();
    let url = format!("{base}/v1/completions");
    let a = started(&c, &url, &endless(PROMPTS[0])).await;
    let b = c
        .post(&url)
        .json(&endless(PROMPTS[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(b.status(), 200);
    wait_metric(&c, &base, "mimo_queue_depth", 1.0).await;
    let r = c.post(&url).json(&greedy("x", 2)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let v: Value = r.json().await.unwrap();
    check_error(StatusCode::TOO_MANY_REQUESTS, &v, 429, None, "queue full");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    drop(a);
    drop(b);
    wait_metric(&c, &base, "mimo_active_sequences", 0.0).await;
    let (st, _) = post(&c, &url, &greedy("x", 2)).await;
    assert_eq!(st, 200);
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_finishes_in_flight_streams() {
    let (s, base) = server(opts()).await;
    let c = client();
    let url = format!("{base}/v1/completions");
    let mut b = greedy(PROMPTS[3], 60);
    b["logit_bias"] = json!({"2": -100});
    b["stream"] = json!(true);
    let r = c.post(&url).json(&b).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let reader = tokio::spawn(read_stream(r));
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.shutdown().await.unwrap();
    let sr = reader.await.unwrap();
    assert!(sr.done);
    assert_eq!(sr.finish.as_deref(), Some("length"));
    assert_eq!(sr.usage.unwrap()["completion_tokens"], 60);
    // Gone.
    assert!(c.get(format!("{base}/health")).send().await.is_err());
}

/// Ends the child process if the test fails first.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real binary: serves, and on SIGTERM finishes the stream in flight and exits 0.
#[test]
fn mimort_serve_binary_exits_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let f = fixture();
    let mut child = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_mimort"))
            .args(["serve", f.plan.to_str().unwrap(), "--port", "0"])
            .args(["--device", "cpu", "--max-batch", "2", "--model-name", MODEL])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Kept open to the end: the server still logs to it.
    let mut err = BufReader::new(child.0.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    let pid = child.0.id().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = client();
        let url = format!("http://{addr}/v1/completions");
        let (st, v) = post(&c, &url, &greedy("hi", 3)).await;
        assert_eq!(st, 200, "{v}");
        let mut b = endless(PROMPTS[4]);
        b["max_tokens"] = json!(400);
        let r = c.post(&url).json(&b).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let reader = tokio::spawn(read_stream(r));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(ok.success());
        let sr = reader.await.unwrap();
        assert!(sr.done);
        assert_eq!(sr.finish.as_deref(), Some("length"));
        assert_eq!(sr.usage.unwrap()["completion_tokens"], 400);
    });
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            assert!(st.success(), "exit status {st}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "mimort serve did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(err);
}
