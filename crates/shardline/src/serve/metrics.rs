//! What `GET /metrics` reports, in Prometheus's text format: the scheduler's load (running and
//! waiting sequences, KV blocks held), requests and tokens so far, and histograms of the time to
//! the first token and between tokens. Written by the engine thread, read by the HTTP side.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Upper bounds of the latency histograms' buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A latency histogram (cumulative buckets, as Prometheus keeps them).
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            if s <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// The serving counters.
pub struct Metrics {
    running: AtomicUsize,
    waiting: AtomicUsize,
    kv_used: AtomicUsize,
    kv_total: usize,
    pub requests: AtomicU64,
    pub tokens: AtomicU64,
    pub ttft: Histogram,
    pub itl: Histogram,
}

impl Metrics {
    pub fn new(kv_total: usize) -> Metrics {
        Metrics {
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            kv_used: AtomicUsize::new(0),
            kv_total,
            requests: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            ttft: Histogram::new(),
            itl: Histogram::new(),
        }
    }

    pub fn set_load(&self, running: usize, waiting: usize, kv_used: usize) {
        self.running.store(running, Ordering::Relaxed);
        self.waiting.store(waiting, Ordering::Relaxed);
        self.kv_used.store(kv_used, Ordering::Relaxed);
    }

    /// KV blocks held by sequences now.
    pub fn kv_used(&self) -> usize {
        self.kv_used.load(Ordering::Relaxed)
    }

    /// The Prometheus text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauges = [
            (
                "shardline_running_sequences",
                "Sequences admitted (prefilling or generating).",
                self.running.load(Ordering::Relaxed),
            ),
            (
                "shardline_waiting_sequences",
                "Sequences waiting for KV blocks.",
                self.waiting.load(Ordering::Relaxed),
            ),
            (
                "shardline_kv_blocks_used",
                "KV cache blocks held by sequences.",
                self.kv_used(),
            ),
            (
                "shardline_kv_blocks_total",
                "KV cache blocks in the pool.",
                self.kv_total,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let counters = [
            (
                "shardline_requests_total",
                "Requests admitted.",
                self.requests.load(Ordering::Relaxed),
            ),
            (
                "shardline_generated_tokens_total",
                "Tokens generated.",
                self.tokens.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        self.ttft.render(
            "shardline_time_to_first_token_seconds",
            "Time from a request's admission to its first token.",
            &mut out,
        );
        self.itl.render(
            "shardline_inter_token_latency_seconds",
            "Time between a request's consecutive tokens.",
            &mut out,
        );
        out
    }
}
