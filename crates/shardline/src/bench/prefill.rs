//! `shardline bench prefill`: the time to run a prompt chunk through the engine `run` uses, two
//! ways: as one prefill (all rows at once: matrix products on the CPU, cuBLAS GEMMs on a GPU) and
//! token by token through decode steps.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;
use shardline_model::{Exec, Plan};

use super::record::{Sink, Stats};
use crate::engine::{self, CommTime, DeviceArg, EngineOptions, Layers, ModelArgs, ReduceDType};
use crate::gpu_comm::GpuComm;

/// What one iteration measures; shown by `--help`.
const SEMANTICS: &str = "\
`--rows` prompt tokens that follow `--kv-len` positions already in the KV cache, through the\n\
model (a preset's random weights at real shapes, `--layers` of them, default 1; or a model\n\
directory), one rank, the greedy id of the last row out. `path` prefill: the whole chunk at once,\n\
as `run` prefills a prompt. `path` per-token: the same rows one decode step at a time. Each\n\
iteration first truncates the KV cache back to `--kv-len`; its wall-clock time is the record's;\n\
`us_per_token` is the median over `--rows`.";

#[derive(clap::Args)]
#[command(after_help = SEMANTICS)]
pub struct PrefillArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Where the model runs: cpu, or cuda (a build with the `cuda` feature).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Prompt tokens per iteration.
    #[arg(long, default_value_t = 512)]
    rows: usize,
    /// Positions already in the KV cache.
    #[arg(long, default_value_t = 0)]
    kv_len: usize,
    /// Timed iterations per path (after 2 untimed ones).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Also write the records as JSON lines to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(mut args: PrefillArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.rows > 0 && args.iters > 0,
        "--rows and --iters must be positive"
    );
    if args.model.preset.is_some() && args.model.layers.is_none() {
        args.model.layers = Some(Layers::First(1));
    }
    let source = args.model.source()?;
    let (spec, weights, _) = source.load(&Plan::single(), |_| {})?;
    let (layers, vocab) = (spec.n_layers, spec.vocab as u32);
    let dtype = weights.layers.first().map(|l| l.attn.q.dtype());
    let opts = EngineOptions {
        device: args.device,
        exec: Exec::Split,
        positions: args.kv_len + args.rows,
        gpu_comm: GpuComm::Auto,
        comm_time: CommTime::default(),
        reduce_dtype: ReduceDType::F32,
    };
    let mut engine = engine::build(spec, weights, None, &opts)?;
    let mut rng = fastrand::Rng::with_seed(7);
    let tokens: Vec<u32> = (0..args.kv_len + args.rows)
        .map(|_| rng.u32(..vocab))
        .collect();
    let (context, prompt) = tokens.split_at(args.kv_len);
    engine.start(tokens.len())?;
    if !context.is_empty() {
        engine.forward_argmax(context)?;
    }
    let mut sink = Sink::new(args.json.as_deref())?;
    for path in ["prefill", "per-token"] {
        let mut samples = Vec::with_capacity(args.iters);
        for it in 0..2 + args.iters {
            engine.truncate(args.kv_len)?;
            let t = Instant::now();
            if path == "prefill" {
                engine.forward_argmax(prompt)?;
            } else {
                for &token in prompt {
                    engine.forward_argmax(&[token])?;
                }
            }
            if it >= 2 {
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        let stats = Stats::from_samples(&mut samples);
        let us_per_token = stats.median_us / args.rows as f64;
        let fields = json!({
            "model": source.name(),
            "device": match args.device { DeviceArg::Cpu => "cpu", DeviceArg::Cuda => "cuda" },
            "dtype": dtype.map_or("none", |d| d.name()),
            "path": path,
            "layers": layers,
            "rows": args.rows,
            "kv_len": args.kv_len,
            "us_per_token": (us_per_token * 1000.0).round() / 1000.0,
        });
        sink.write(
            "prefill",
            stats,
            fields.as_object().cloned().unwrap_or_default(),
        )?;
    }
    Ok(())
}
