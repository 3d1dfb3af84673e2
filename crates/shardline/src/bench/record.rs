//! Timing statistics and the JSON-lines sink every bench writes to.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::Context;
use serde_json::{Map, Value};

/// Summary of a set of timed iterations, in microseconds.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub median_us: f64,
    pub p99_us: f64,
    pub iters: usize,
}

impl Stats {
    /// Median and 99th percentile (nearest rank) of `samples_us`.
    pub fn from_samples(samples_us: &mut [f64]) -> Stats {
        assert!(!samples_us.is_empty(), "no samples");
        samples_us.sort_by(f64::total_cmp);
        let n = samples_us.len();
        let median_us = if n % 2 == 1 {
            samples_us[n / 2]
        } else {
            (samples_us[n / 2 - 1] + samples_us[n / 2]) / 2.0
        };
        let p99_idx = ((n as f64 * 0.99).ceil() as usize).clamp(1, n) - 1;
        Stats {
            median_us,
            p99_us: samples_us[p99_idx],
            iters: n,
        }
    }
}

/// Where records go: always printed as a table line on stdout, and as one JSON object per line to
/// the `--json` file when one is given.
pub struct Sink {
    json: Option<BufWriter<File>>,
}

impl Sink {
    pub fn new(json_path: Option<&Path>) -> anyhow::Result<Sink> {
        let json = json_path
            .map(|p| {
                File::create(p)
                    .map(BufWriter::new)
                    .with_context(|| format!("cannot create the JSON output file {}", p.display()))
            })
            .transpose()?;
        Ok(Sink { json })
    }

    /// Writes one record: `bench`, the stats keys, then `fields` in order.
    pub fn write(
        &mut self,
        bench: &str,
        stats: Stats,
        fields: Map<String, Value>,
    ) -> anyhow::Result<()> {
        let mut rec = Map::new();
        rec.insert("bench".into(), bench.into());
        rec.insert("median_us".into(), round3(stats.median_us).into());
        rec.insert("p99_us".into(), round3(stats.p99_us).into());
        rec.insert("iters".into(), stats.iters.into());
        rec.extend(fields);
        let line = Value::Object(rec).to_string();
        println!("{line}");
        if let Some(w) = self.json.as_mut() {
            writeln!(w, "{line}").context("cannot write the JSON output file")?;
            w.flush().context("cannot write the JSON output file")?;
        }
        Ok(())
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
