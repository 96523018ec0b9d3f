//! The engine: one dedicated worker thread that owns `max_batch` sequence slots, each a backend session with its
//! own KV cache, and runs continuous batching over them.
//!
//! Each iteration the worker (1) drops queued requests whose client went away, (2) admits queued requests into
//! free slots in arrival order, (3) advances every active sequence by one step — a prefill chunk of up to the
//! plan's `max_tokens` tokens or one decode token — running the sequences' forwards in parallel on the rayon pool,
//! and (4) retires finished sequences, freeing their slots at once. A slot's KV cache is reused by the next
//! sequence (a forward at position 0 starts it afresh), so a freed slot costs nothing to refill.
//!
//! Tokens leave the worker through an unbounded channel per request as text deltas (incremental detokenization and
//! stop strings run inside the sequence's step, also in parallel). A closed channel — the HTTP response future or
//! SSE stream was dropped because the client disconnected — cancels the sequence at its next step.

use super::detok::{Detokenizer, StopMatcher};
use super::metrics::Metrics;
use crate::generate::Backend;
use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams};
use anyhow::{anyhow, Result};
use rayon::prelude::*;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// One generation request, tokenized and validated.
#[derive(Clone, Debug)]
pub struct GenParams {
    pub prompt: Vec<u32>,
    /// At least 1.
    pub max_new: usize,
    pub sampling: SamplingParams,
    /// Added to the logits before sampling.
    pub logit_bias: Vec<(u32, f32)>,
    pub stop: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// max_tokens reached or the KV cache is full.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// New text (never empty, never splits a character).
    Delta(String),
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The backend failed; the request is over.
    Error(String),
}

#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// `max_queue` requests are already waiting.
    QueueFull,
    /// The engine is shutting down.
    Closed,
}

/// Builds one backend session (one slot). Called `max_batch` times on the worker thread at start.
pub type SessionFactory = Box<dyn FnMut() -> Result<Box<dyn Backend + Send>> + Send>;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_batch: usize,
    pub max_queue: usize,
    /// Advance the active sequences' forwards in parallel (CPU); sequentially when false.
    pub parallel: bool,
}

struct Job {
    params: GenParams,
    tx: UnboundedSender<Event>,
    arrived: Instant,
}

struct Queue {
    waiting: VecDeque<Job>,
    closed: bool,
}

struct Shared {
    q: Mutex<Queue>,
    cv: Condvar,
    metrics: Arc<Metrics>,
    max_queue: usize,
}

pub struct Engine {
    shared: Arc<Shared>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub max_ctx: usize,
    pub max_batch: usize,
}

impl Engine {
    /// Start the worker thread and build its slots; fails if a session cannot be built.
    pub fn start(
        model: Arc<Model>,
        cfg: EngineConfig,
        mut factory: SessionFactory,
        metrics: Arc<Metrics>,
    ) -> Result<Engine> {
        if cfg.max_batch == 0 {
            return Err(anyhow!("--max-batch must be at least 1"));
        }
        let shared = Arc::new(Shared {
            q: Mutex::new(Queue {
                waiting: VecDeque::new(),
                closed: false,
            }),
            cv: Condvar::new(),
            metrics: metrics.clone(),
            max_queue: cfg.max_queue,
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<usize>>();
        let sh = shared.clone();
        let worker = std::thread::Builder::new()
            .name("mimo-engine".into())
            .spawn(move || {
                let mut slots = vec![];
                for _ in 0..cfg.max_batch {
                    match factory() {
                        Ok(s) => slots.push(Slot { sess: s, seq: None }),
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    }
                }
                let max_ctx = slots[0].sess.max_ctx();
                let _ = ready_tx.send(Ok(max_ctx));
                drop(factory);
                run(&sh, &model, &mut slots, cfg.parallel);
            })?;
        let max_ctx = ready_rx
            .recv()
            .map_err(|_| anyhow!("the engine thread died while building its sessions"))??;
        metrics
            .kv_capacity
            .store((max_ctx * cfg.max_batch) as u64, Ordering::Relaxed);
        metrics
            .max_batch
            .store(cfg.max_batch as u64, Ordering::Relaxed);
        Ok(Engine {
            shared,
            worker: Mutex::new(Some(worker)),
            max_ctx,
            max_batch: cfg.max_batch,
        })
    }

    /// Queue a request. Its events arrive on the returned receiver; dropping the receiver cancels it.
    pub fn submit(&self, params: GenParams) -> Result<UnboundedReceiver<Event>, SubmitError> {
        let (tx, rx) = unbounded_channel();
        let mut q = self.shared.q.lock().unwrap_or_else(|e| e.into_inner());
        if q.closed {
            return Err(SubmitError::Closed);
        }
        // Requests whose clients left do not hold queue places.
        let before = q.waiting.len();
        q.waiting.retain(|j| !j.tx.is_closed());
        let gone = before - q.waiting.len();
        if gone > 0 {
            self.shared
                .metrics
                .cancelled
                .fetch_add(gone as u64, Ordering::Relaxed);
        }
        if q.waiting.len() >= self.shared.max_queue {
            return Err(SubmitError::QueueFull);
        }
        q.waiting.push_back(Job {
            params,
            tx,
            arrived: Instant::now(),
        });
        self.shared
            .metrics
            .queue_depth
            .store(q.waiting.len() as u64, Ordering::Relaxed);
        drop(q);
        self.shared.cv.notify_one();
        Ok(rx)
    }

    /// Stop admitting new requests; queued and active ones still run to the end.
    pub fn close(&self) {
        self.shared
            .q
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.shared.cv.notify_all();
    }

    /// Close and wait for the worker to finish every admitted request.
    pub fn join(&self) {
        self.close();
        let h = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = h {
            let _ = h.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // The receivers are gone with the server: the worker cancels what is left and exits.
        self.close();
    }
}

struct Slot {
    sess: Box<dyn Backend + Send>,
    seq: Option<Seq>,
}

struct Seq {
    tx: UnboundedSender<Event>,
    params: GenParams,
    sampler: Sampler,
    arrived: Instant,
    /// Tokens still to feed: the rest of the prompt, then the last sampled token.
    pending: Vec<u32>,
    /// Positions in the KV cache.
    pos: usize,
    generated: usize,
    last_token_at: Option<Instant>,
    detok: Detokenizer,
    stop: StopMatcher,
}

/// What a step left of a sequence.
enum StepResult {
    Running,
    /// Over: the slot is retired first, then the event (Done / Error) is sent, so that a client that has seen
    /// the end also sees the freed slot in the gauges.
    Finished(Event),
    Cancelled,
}

fn run(sh: &Shared, model: &Model, slots: &mut [Slot], parallel: bool) {
    let m = &sh.metrics;
    loop {
        {
            let mut q = sh.q.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                let before = q.waiting.len();
                q.waiting.retain(|j| !j.tx.is_closed());
                let gone = before - q.waiting.len();
                m.cancelled.fetch_add(gone as u64, Ordering::Relaxed);
                for slot in slots.iter_mut().filter(|s| s.seq.is_none()) {
                    let Some(job) = q.waiting.pop_front() else {
                        break;
                    };
                    slot.seq = Some(Seq::new(job));
                    m.active.fetch_add(1, Ordering::Relaxed);
                }
                m.queue_depth
                    .store(q.waiting.len() as u64, Ordering::Relaxed);
                if slots.iter().any(|s| s.seq.is_some()) {
                    break;
                }
                if q.closed && q.waiting.is_empty() {
                    return;
                }
                q = sh.cv.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        }
        let step = |slot: &mut Slot| {
            let Some(seq) = slot.seq.as_mut() else {
                return;
            };
            let r = seq.step(&mut *slot.sess, model, m);
            if let StepResult::Running = r {
                return;
            }
            let seq = slot.seq.take().expect("an active slot");
            m.active.fetch_sub(1, Ordering::Relaxed);
            m.kv_used.fetch_sub(seq.pos as u64, Ordering::Relaxed);
            match r {
                StepResult::Finished(ev) => {
                    let _ = seq.tx.send(ev);
                }
                _ => {
                    m.cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        if parallel {
            slots.par_iter_mut().for_each(step);
        } else {
            slots.iter_mut().for_each(step);
        }
        m.steps.fetch_add(1, Ordering::Relaxed);
    }
}

impl Seq {
    fn new(job: Job) -> Seq {
        Seq {
            pending: job.params.prompt.clone(),
            sampler: Sampler::new(job.params.sampling),
            stop: StopMatcher::new(job.params.stop.clone()),
            tx: job.tx,
            params: job.params,
            arrived: job.arrived,
            pos: 0,
            generated: 0,
            last_token_at: None,
            detok: Detokenizer::default(),
        }
    }

    fn send_text(&self, s: String) {
        if !s.is_empty() {
            let _ = self.tx.send(Event::Delta(s));
        }
    }

    /// End on an end-of-sequence token or a length limit: release the text still held back (a stop string may
    /// still complete in it).
    fn finish(&mut self, finish: FinishReason, model: &Model, m: &Metrics) -> StepResult {
        let tail = self.detok.flush(&model.tokenizer);
        let out = self.stop.feed(&tail);
        self.send_text(out.text);
        if out.stopped {
            return self.done(FinishReason::Stop, m);
        }
        let rest = self.stop.finish();
        self.send_text(rest);
        self.done(finish, m)
    }

    fn done(&mut self, finish: FinishReason, m: &Metrics) -> StepResult {
        if let Some(t) = self.last_token_at {
            m.e2e.observe(t.duration_since(self.arrived).as_secs_f64());
        }
        m.record_finish(finish.as_str());
        StepResult::Finished(Event::Done {
            finish,
            prompt_tokens: self.params.prompt.len(),
            completion_tokens: self.generated,
        })
    }

    fn step(&mut self, sess: &mut dyn Backend, model: &Model, m: &Metrics) -> StepResult {
        if self.tx.is_closed() {
            return StepResult::Cancelled;
        }
        let n = self.pending.len().min(sess.max_tokens());
        if let Err(e) = sess.forward(&self.pending[..n], self.pos) {
            m.record_finish("error");
            return StepResult::Finished(Event::Error(format!("{e:#}")));
        }
        self.pos += n;
        m.kv_used.fetch_add(n as u64, Ordering::Relaxed);
        self.pending.drain(..n);
        if !self.pending.is_empty() {
            return StepResult::Running;
        }
        if self.generated == 0 {
            m.prompt_tokens
                .fetch_add(self.params.prompt.len() as u64, Ordering::Relaxed);
        }
        let logits = sess.logits(n - 1);
        let t = if self.params.logit_bias.is_empty() {
            self.sampler.sample(logits)
        } else {
            let mut l = logits.to_vec();
            for &(id, b) in &self.params.logit_bias {
                if let Some(x) = l.get_mut(id as usize) {
                    *x += b;
                }
            }
            self.sampler.sample(&l)
        };
        let now = Instant::now();
        match self.last_token_at {
            None => m
                .ttft
                .observe(now.duration_since(self.arrived).as_secs_f64()),
            Some(prev) => m.tpot.observe(now.duration_since(prev).as_secs_f64()),
        }
        self.last_token_at = Some(now);
        self.generated += 1;
        m.completion_tokens.fetch_add(1, Ordering::Relaxed);
        if model.plan.model.eos.contains(&t) {
            return self.finish(FinishReason::Stop, model, m);
        }
        let delta = self.detok.push(&model.tokenizer, t);
        let out = self.stop.feed(&delta);
        self.send_text(out.text);
        if out.stopped {
            return self.done(FinishReason::Stop, m);
        }
        if self.generated >= self.params.max_new || self.pos + 1 > sess.max_ctx() {
            return self.finish(FinishReason::Length, model, m);
        }
        self.pending.push(t);
        StepResult::Running
    }
}
