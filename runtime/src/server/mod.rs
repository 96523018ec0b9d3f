//! `mimort serve`: an OpenAI-compatible HTTP server (axum + tokio) over the engine in [`engine`].
//!
//! Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as server-sent
//! events ending in `data: [DONE]`), `GET /v1/models`, `GET /health` (never needs the API key), `GET /metrics`
//! (Prometheus text).
//!
//! Usage in streams: the chunk that carries `finish_reason` always carries `usage` too; with
//! `stream_options: {"include_usage": true}` an OpenAI-style usage-only chunk (`choices: []`) follows it before
//! `[DONE]`. Default `max_tokens`: 16 for completions (as OpenAI), the rest of the context for chat.

pub mod api;
pub mod chat;
pub mod detok;
pub mod engine;
pub mod metrics;

use crate::model::Model;
use api::{check_common, parse_json, ApiError, ChatRequest, Checked, CompletionRequest, Content};
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chat::{ChatTemplate, TemplateMessage};
use engine::{Engine, EngineConfig, Event, GenParams, SessionFactory, SubmitError};
use futures::Stream;
use metrics::Metrics;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    pub device: Device,
    pub max_batch: usize,
    pub max_queue: usize,
    pub max_ctx: usize,
    pub api_key: Option<String>,
    pub model_name: String,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            host: "127.0.0.1".into(),
            port: 8000,
            device: Device::Cpu,
            max_batch: 8,
            max_queue: 64,
            max_ctx: 4096,
            api_key: None,
            model_name: "mimo".into(),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

struct AppState {
    model: Arc<Model>,
    engine: Engine,
    metrics: Arc<Metrics>,
    template: Result<ChatTemplate, String>,
    model_name: String,
    api_key: Option<String>,
    max_queue: usize,
    created: u64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("{prefix}-{:016x}{n:x}", t.rotate_left(29) ^ 0x5bd1_e995)
}

/// Sessions for the slots of `device`. CUDA keeps one slot: each `CudaSession` holds a device copy of the
/// weights, and one cooperative megakernel launch fills the GPU, so slots could not run side by side anyway.
fn session_factory(
    model: &Arc<Model>,
    plan_dir: Option<&std::path::Path>,
    opts: &ServeOptions,
) -> anyhow::Result<(SessionFactory, EngineConfig)> {
    let ctx = opts.max_ctx.min(model.plan.model.max_position);
    let m = model.clone();
    match opts.device {
        Device::Cpu => Ok((
            Box::new(move || Ok(Box::new(crate::cpu::CpuSession::new(m.clone(), ctx)) as _)),
            EngineConfig {
                max_batch: opts.max_batch,
                max_queue: opts.max_queue,
                parallel: true,
            },
        )),
        Device::Cuda => {
            let dir = plan_dir
                .ok_or_else(|| anyhow::anyhow!("--device cuda needs the plan directory"))?
                .to_path_buf();
            if opts.max_batch > 1 {
                tracing::warn!("--device cuda serves one sequence at a time (max batch 1)");
            }
            Ok((
                Box::new(move || {
                    Ok(Box::new(crate::cuda::CudaSession::new(m.clone(), &dir, ctx, 0)?) as _)
                }),
                EngineConfig {
                    max_batch: 1,
                    max_queue: opts.max_queue,
                    parallel: false,
                },
            ))
        }
    }
}

/// A server running on a tokio task (tests and embedding).
pub struct RunningServer {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningServer {
    /// Graceful shutdown: stop accepting, let in-flight requests finish (bounded by the grace period).
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await?
    }
}

/// Bind `opts.host:opts.port` (port 0: any free port) and serve on a spawned task.
pub async fn spawn(
    model: Arc<Model>,
    plan_dir: Option<&std::path::Path>,
    opts: ServeOptions,
) -> anyhow::Result<RunningServer> {
    let listener = TcpListener::bind((opts.host.as_str(), opts.port)).await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let metrics = Arc::new(Metrics::default());
    let app = build(model, plan_dir, &opts, metrics.clone())?;
    let task = tokio::spawn(serve_on(listener, app, opts.shutdown_grace, async move {
        let _ = rx.await;
    }));
    Ok(RunningServer {
        addr,
        metrics,
        stop: Some(tx),
        task,
    })
}

/// `mimort serve`: serve until SIGINT / SIGTERM, then shut down gracefully.
pub async fn serve(
    model: Arc<Model>,
    plan_dir: &std::path::Path,
    opts: ServeOptions,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind((opts.host.as_str(), opts.port)).await?;
    let app = build(model, Some(plan_dir), &opts, Arc::new(Metrics::default()))?;
    eprintln!(
        "mimort serve: model {:?} on http://{} (max batch {}, max queue {}, context {})",
        opts.model_name,
        listener.local_addr()?,
        app.1.engine.max_batch,
        opts.max_queue,
        app.1.engine.max_ctx
    );
    serve_on(listener, app, opts.shutdown_grace, shutdown_signal()).await
}

async fn shutdown_signal() {
    let int = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = int => {}
            _ = term => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = int.await;
    }
}

async fn serve_on(
    listener: TcpListener,
    (router, state): (Router, Arc<AppState>),
    grace: Duration,
    signal: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (began_tx, began_rx) = tokio::sync::oneshot::channel::<()>();
    let st = state.clone();
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        signal.await;
        tracing::info!("shutting down: no new connections; finishing in-flight requests");
        st.engine.close();
        let _ = began_tx.send(());
    });
    let deadline = async {
        if began_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = server => r?,
        _ = deadline => {
            eprintln!("mimort serve: in-flight requests still running after {grace:?}; exiting");
        }
    }
    Ok(())
}

fn build(
    model: Arc<Model>,
    plan_dir: Option<&std::path::Path>,
    opts: &ServeOptions,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(Router, Arc<AppState>)> {
    let (factory, cfg) = session_factory(&model, plan_dir, opts)?;
    let engine = Engine::start(model.clone(), cfg, factory, metrics.clone())?;
    let tok_str = |id: Option<u32>| {
        id.and_then(|i| model.tokenizer.id_to_token(i))
            .unwrap_or_default()
    };
    let template = match &model.plan.chat_template {
        Some(src) => ChatTemplate::new(
            src,
            tok_str(model.plan.model.bos),
            tok_str(model.plan.model.eos.first().copied()),
        )
        .map_err(|e| format!("the model's chat template does not compile: {e}")),
        None => Err("the model has no chat template; use /v1/completions".to_string()),
    };
    if let Err(e) = &template {
        tracing::warn!("{e}");
    }
    let state = Arc::new(AppState {
        model,
        engine,
        metrics,
        template,
        model_name: opts.model_name.clone(),
        api_key: opts.api_key.clone(),
        max_queue: opts.max_queue,
        created: now_secs(),
    });
    let router = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state.clone());
    Ok((router, state))
}

async fn count(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let ep = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "other".into());
    let r = next.run(req).await;
    st.metrics.record_request(&ep, r.status().as_u16());
    r
}

async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        if req.uri().path() != "/health" {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            let ok = given.is_some_and(|g| {
                g.len() == key.len()
                    && g.bytes()
                        .zip(key.bytes())
                        .fold(0u8, |a, (x, y)| a | (x ^ y))
                        == 0
            });
            if !ok {
                return ApiError::invalid(
                    "missing or incorrect API key (send it as 'Authorization: Bearer KEY')",
                    None,
                )
                .with_status(StatusCode::UNAUTHORIZED)
                .with_code("invalid_api_key")
                .into_response();
            }
        }
    }
    next.run(req).await
}

async fn not_found(req: Request) -> ApiError {
    ApiError::invalid(format!("no route for {}", req.uri().path()), None)
        .with_status(StatusCode::NOT_FOUND)
        .with_code("not_found")
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::invalid(
        format!(
            "method {} is not allowed on {}",
            req.method(),
            req.uri().path()
        ),
        None,
    )
    .with_status(StatusCode::METHOD_NOT_ALLOWED)
}

async fn health(State(st): State<Arc<AppState>>) -> Json<Value> {
    let m = &st.metrics;
    Json(json!({
        "status": "ok",
        "active_sequences": m.active.load(Ordering::Relaxed),
        "queue_depth": m.queue_depth.load(Ordering::Relaxed),
    }))
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.model_name,
            "object": "model",
            "created": st.created,
            "owned_by": "mimo",
            "max_model_len": st.engine.max_ctx,
        }]
    }))
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(&st.model_name),
    )
        .into_response()
}

/// Bytes of an oversized body read and discarded before answering 413, so that a client that writes its whole
/// body before reading sees the answer rather than a broken pipe.
const DRAIN_BYTES: usize = 16 << 20;

/// Read the body with the size limit (413 past it).
async fn read_body(headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes, ApiError> {
    use futures::StreamExt;
    let too_big = || {
        ApiError::invalid(
            format!("the request body exceeds {MAX_BODY_BYTES} bytes"),
            None,
        )
        .with_status(StatusCode::PAYLOAD_TOO_LARGE)
        .with_code("request_too_large")
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > DRAIN_BYTES as u64) {
        return Err(too_big());
    }
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::invalid(format!("reading the request body: {e}"), None))?;
        total += chunk.len();
        if total <= MAX_BODY_BYTES {
            buf.extend_from_slice(&chunk);
        } else if total > DRAIN_BYTES {
            break;
        }
    }
    if total > MAX_BODY_BYTES {
        return Err(too_big());
    }
    Ok(buf.into())
}

impl AppState {
    fn check_model(&self, name: &str) -> Result<(), ApiError> {
        if name != self.model_name {
            return Err(ApiError::invalid(
                format!(
                    "the model '{name}' does not exist; this server serves '{}'",
                    self.model_name
                ),
                Some("model"),
            )
            .with_status(StatusCode::NOT_FOUND)
            .with_code("model_not_found"));
        }
        Ok(())
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        self.model
            .tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ApiError::invalid(format!("the prompt does not tokenize: {e}"), None))
    }

    /// Check the prompt's length and queue the request.
    fn submit(
        &self,
        prompt: Vec<u32>,
        c: &Checked,
        default_max: Option<usize>,
        param: &str,
    ) -> Result<(tokio::sync::mpsc::UnboundedReceiver<Event>, usize), ApiError> {
        let ctx = self.engine.max_ctx;
        if prompt.is_empty() {
            return Err(ApiError::invalid(
                "the prompt is empty (it has no tokens)",
                Some(param),
            ));
        }
        if prompt.len() >= ctx {
            return Err(ApiError::invalid(
                format!(
                    "the prompt has {} tokens; this model's context is {ctx} tokens (at most {} for the prompt)",
                    prompt.len(),
                    ctx - 1
                ),
                Some(param),
            )
            .with_code("context_length_exceeded"));
        }
        let n_prompt = prompt.len();
        let max_new = c
            .max_tokens
            .or(default_max)
            .unwrap_or(ctx - n_prompt)
            .max(1);
        let p = GenParams {
            prompt,
            max_new,
            sampling: crate::sampling::SamplingParams {
                temperature: c.temperature,
                top_p: c.top_p,
                seed: c.seed,
            },
            logit_bias: c.logit_bias.clone(),
            stop: c.stop.clone(),
        };
        match self.engine.submit(p) {
            Ok(rx) => Ok((rx, n_prompt)),
            Err(SubmitError::QueueFull) => Err(ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: format!(
                    "the server is at capacity ({} requests waiting); retry later",
                    self.max_queue
                ),
                kind: "rate_limit_error",
                param: None,
                code: Some("rate_limit_exceeded"),
                retry_after: Some(1),
            }),
            Err(SubmitError::Closed) => Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "the server is shutting down".into(),
                kind: "server_error",
                param: None,
                code: Some("shutting_down"),
                retry_after: None,
            }),
        }
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn server_error(msg: String) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: msg,
        kind: "server_error",
        param: None,
        code: None,
        retry_after: None,
    }
}

/// The two endpoints differ only in how a piece of text and the end are wrapped.
#[derive(Clone, Copy)]
enum Kind {
    Completion,
    Chat,
}

struct Shape {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Shape {
    fn object(&self, stream: bool) -> &'static str {
        match (self.kind, stream) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn chunk(&self, choice: Value) -> Value {
        json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model,
               "choices": [choice]})
    }

    fn delta(&self, text: &str, role: bool) -> Value {
        match self.kind {
            Kind::Completion => self
                .chunk(json!({"index": 0, "text": text, "logprobs": null, "finish_reason": null})),
            Kind::Chat => {
                let d = if role {
                    json!({"role": "assistant", "content": text})
                } else {
                    json!({"content": text})
                };
                self.chunk(json!({"index": 0, "delta": d, "logprobs": null, "finish_reason": null}))
            }
        }
    }

    fn last(&self, finish: &str, usage: Value) -> Value {
        let mut c = match self.kind {
            Kind::Completion => self
                .chunk(json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish})),
            Kind::Chat => self
                .chunk(json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish})),
        };
        c["usage"] = usage;
        c
    }

    fn usage_only(&self, usage: Value) -> Value {
        json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model,
               "choices": [], "usage": usage})
    }

    fn full(&self, text: String, finish: &str, usage: Value) -> Value {
        let choice = match self.kind {
            Kind::Completion => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
            Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": null, "finish_reason": finish}),
        };
        json!({"id": self.id, "object": self.object(false), "created": self.created, "model": self.model,
               "choices": [choice], "usage": usage})
    }
}

/// Answer a queued request: SSE when streaming, else one JSON object once generation ends.
async fn respond(
    shape: Shape,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    c: &Checked,
) -> Response {
    if c.stream {
        let include_usage = c.include_usage;
        return Sse::new(sse_stream(shape, rx, include_usage)).into_response();
    }
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Delta(s) => text.push_str(&s),
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                return Json(shape.full(
                    text,
                    finish.as_str(),
                    usage(prompt_tokens, completion_tokens),
                ))
                .into_response()
            }
            Event::Error(e) => {
                return server_error(format!("generation failed: {e}")).into_response()
            }
        }
    }
    server_error("the engine dropped the request".into()).into_response()
}

fn sse_stream(
    shape: Shape,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    async_stream::stream! {
        let mut first = true;
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Delta(s) => {
                    yield Ok(SseEvent::default().data(shape.delta(&s, first).to_string()));
                    first = false;
                }
                Event::Done { finish, prompt_tokens, completion_tokens } => {
                    if first {
                        if let Kind::Chat = shape.kind {
                            yield Ok(SseEvent::default().data(shape.delta("", true).to_string()));
                        }
                    }
                    let u = usage(prompt_tokens, completion_tokens);
                    yield Ok(SseEvent::default().data(shape.last(finish.as_str(), u.clone()).to_string()));
                    if include_usage {
                        yield Ok(SseEvent::default().data(shape.usage_only(u).to_string()));
                    }
                    break;
                }
                Event::Error(e) => {
                    let err = server_error(format!("generation failed: {e}"));
                    yield Ok(SseEvent::default().data(err.body().to_string()));
                    break;
                }
            }
        }
        yield Ok(SseEvent::default().data("[DONE]"));
    }
}

async fn completions(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    match completions_inner(st, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions_inner(
    st: Arc<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(&headers, body).await?;
    let mut req: CompletionRequest = parse_json(&bytes)?;
    st.check_model(&req.model)?;
    let common = req.common()?;
    let c = check_common(common, st.engine.max_ctx, st.model.plan.model.vocab)?;
    let vocab = st.model.plan.model.vocab;
    let ids = match &req.prompt {
        api::Prompt::Text(s) => st.tokenize(s)?,
        api::Prompt::Texts(v) if v.len() == 1 => st.tokenize(&v[0])?,
        api::Prompt::Texts(v) if v.is_empty() => vec![],
        api::Prompt::Tokens(v) => v.clone(),
        api::Prompt::TokenLists(v) if v.len() == 1 => v[0].clone(),
        _ => {
            return Err(ApiError::invalid(
                "only one prompt per request is supported",
                Some("prompt"),
            ))
        }
    };
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            format!("token id {bad} is outside the vocabulary ({vocab})"),
            Some("prompt"),
        ));
    }
    let (rx, _) = st.submit(ids, &c, Some(16), "prompt")?;
    let shape = Shape {
        kind: Kind::Completion,
        id: new_id("cmpl"),
        created: now_secs(),
        model: st.model_name.clone(),
    };
    Ok(respond(shape, rx, &c).await)
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match chat_inner(st, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(
    st: Arc<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(&headers, body).await?;
    let mut req: ChatRequest = parse_json(&bytes)?;
    st.check_model(&req.model)?;
    let common = req.common()?;
    let c = check_common(common, st.engine.max_ctx, st.model.plan.model.vocab)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must hold at least one message",
            Some("messages"),
        ));
    }
    let mut msgs = vec![];
    for (i, m) in req.messages.iter().enumerate() {
        if !["system", "developer", "user", "assistant", "tool"].contains(&m.role.as_str()) {
            return Err(ApiError::invalid(
                format!("unknown role '{}'", m.role),
                Some(&format!("messages[{i}].role")),
            ));
        }
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(s)) => s.clone(),
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => s.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                format!(
                                    "content part of type '{}' is not supported; only text parts",
                                    p.kind
                                ),
                                Some(&format!("messages[{i}].content[{j}]")),
                            ))
                        }
                    }
                }
                s
            }
        };
        msgs.push(TemplateMessage {
            role: m.role.clone(),
            content,
            name: m.name.clone(),
        });
    }
    let template = st
        .template
        .as_ref()
        .map_err(|e| ApiError::invalid(e.clone(), Some("messages")))?;
    let text = template.render(&msgs).map_err(|e| {
        ApiError::invalid(
            format!("the chat template failed on these messages: {e}"),
            Some("messages"),
        )
    })?;
    let ids = st.tokenize(&text)?;
    let (rx, _) = st.submit(ids, &c, None, "messages")?;
    let shape = Shape {
        kind: Kind::Chat,
        id: new_id("chatcmpl"),
        created: now_secs(),
        model: st.model_name.clone(),
    };
    Ok(respond(shape, rx, &c).await)
}
