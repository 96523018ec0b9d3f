//! Server metrics in the Prometheus text exposition format (hand-written: counters, gauges and histograms on
//! atomics, no registry crate).
//!
//! The DFlash acceptance-length histogram is process-global so that the speculative decoder can record into it
//! without plumbing: call [`record_dflash_acceptance`] once per verify step with the number of tokens the step
//! committed (accepted draft tokens + the bonus token). Every server in the process renders it.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// A histogram with fixed upper bounds (`le`), cumulative on render.
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// f64 bits.
    sum: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Histogram {
        Histogram {
            bounds: bounds.to_vec(),
            counts: (0..bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((f64::from_bits(b) + v).to_bits())
            });
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut acc = 0u64;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            acc += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        let n = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            f64::from_bits(self.sum.load(Ordering::Relaxed))
        );
        let _ = writeln!(out, "{name}_count {n}");
    }
}

const LATENCY_BOUNDS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const ACCEPT_BOUNDS: [f64; 16] = [
    1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0,
];

static DFLASH_ACCEPTANCE: OnceLock<Histogram> = OnceLock::new();

fn dflash_acceptance() -> &'static Histogram {
    DFLASH_ACCEPTANCE.get_or_init(|| Histogram::new(&ACCEPT_BOUNDS))
}

/// Hook for speculative decoding: record the length committed by one DFlash verify step (accepted draft tokens
/// plus the bonus token, so 1..=block size). Cheap and thread-safe; rendered by `/metrics` of every server as
/// `mimo_dflash_acceptance_length`.
pub fn record_dflash_acceptance(committed: usize) {
    dflash_acceptance().observe(committed as f64);
}

/// One server's metrics.
pub struct Metrics {
    /// (endpoint, status) -> count.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Requests whose client went away before they finished.
    pub cancelled: AtomicU64,
    /// Requests that ended for each finish reason.
    finished: Mutex<BTreeMap<&'static str, u64>>,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub e2e: Histogram,
    pub queue_depth: AtomicU64,
    pub active: AtomicU64,
    pub kv_used: AtomicU64,
    pub kv_capacity: AtomicU64,
    pub max_batch: AtomicU64,
    /// Engine iterations (one step of every active sequence each).
    pub steps: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            finished: Mutex::new(BTreeMap::new()),
            ttft: Histogram::new(&LATENCY_BOUNDS),
            tpot: Histogram::new(&LATENCY_BOUNDS),
            e2e: Histogram::new(&LATENCY_BOUNDS),
            queue_depth: AtomicU64::new(0),
            active: AtomicU64::new(0),
            kv_used: AtomicU64::new(0),
            kv_capacity: AtomicU64::new(0),
            max_batch: AtomicU64::new(0),
            steps: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn record_request(&self, endpoint: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((endpoint.to_string(), status)).or_insert(0) += 1;
    }

    pub fn record_finish(&self, reason: &'static str) {
        let mut m = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(reason).or_insert(0) += 1;
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self, model: &str) -> String {
        let mut o = String::new();
        let g = |o: &mut String, name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
            let _ = writeln!(o, "{name} {v}");
        };
        let _ = writeln!(o, "# HELP mimo_model_info The served model.");
        let _ = writeln!(o, "# TYPE mimo_model_info gauge");
        let _ = writeln!(o, "mimo_model_info{{model=\"{}\"}} 1", escape(model));
        let _ = writeln!(
            o,
            "# HELP mimo_requests_total HTTP requests by endpoint and status code."
        );
        let _ = writeln!(o, "# TYPE mimo_requests_total counter");
        for ((ep, st), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                o,
                "mimo_requests_total{{endpoint=\"{}\",status=\"{st}\"}} {n}",
                escape(ep)
            );
        }
        let _ = writeln!(
            o,
            "# HELP mimo_request_finish_total Generation requests by finish reason."
        );
        let _ = writeln!(o, "# TYPE mimo_request_finish_total counter");
        for (r, n) in self
            .finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(o, "mimo_request_finish_total{{reason=\"{r}\"}} {n}");
        }
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        g(
            &mut o,
            "mimo_prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            ld(&self.prompt_tokens),
        );
        g(
            &mut o,
            "mimo_completion_tokens_total",
            "counter",
            "Completion tokens generated.",
            ld(&self.completion_tokens),
        );
        g(
            &mut o,
            "mimo_requests_cancelled_total",
            "counter",
            "Generation requests whose client disconnected first.",
            ld(&self.cancelled),
        );
        g(
            &mut o,
            "mimo_engine_steps_total",
            "counter",
            "Engine iterations (each advances every active sequence by one step).",
            ld(&self.steps),
        );
        g(
            &mut o,
            "mimo_queue_depth",
            "gauge",
            "Requests waiting for a sequence slot.",
            ld(&self.queue_depth),
        );
        g(
            &mut o,
            "mimo_active_sequences",
            "gauge",
            "Sequences holding a slot (prefilling or decoding).",
            ld(&self.active),
        );
        g(
            &mut o,
            "mimo_max_batch",
            "gauge",
            "Sequence slots.",
            ld(&self.max_batch),
        );
        g(
            &mut o,
            "mimo_kv_cache_tokens_used",
            "gauge",
            "KV-cache positions held by active sequences.",
            ld(&self.kv_used),
        );
        g(
            &mut o,
            "mimo_kv_cache_tokens_capacity",
            "gauge",
            "KV-cache positions over all slots.",
            ld(&self.kv_capacity),
        );
        self.ttft.render(
            &mut o,
            "mimo_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
        );
        self.tpot.render(
            &mut o,
            "mimo_time_per_output_token_seconds",
            "Time between consecutive generated tokens of a sequence.",
        );
        self.e2e.render(
            &mut o,
            "mimo_request_duration_seconds",
            "Time from request arrival to its last token.",
        );
        dflash_acceptance().render(
            &mut o,
            "mimo_dflash_acceptance_length",
            "Tokens committed per DFlash verify step (process-wide; empty without speculative decoding).",
        );
        o
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_renders_cumulative() {
        let h = Histogram::new(&[1.0, 2.0]);
        h.observe(0.5);
        h.observe(1.5);
        h.observe(9.0);
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"1\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"2\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3\n"), "{s}");
        assert!(s.contains("x_sum 11\n"), "{s}");
        assert!(s.contains("x_count 3\n"), "{s}");
    }
}
