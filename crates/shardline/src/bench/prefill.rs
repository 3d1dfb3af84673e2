//! `shardline bench prefill --device cuda`: the time to run a prompt chunk through one
//! preset-shaped layer with random weights on the GPU, two ways: as one prefill (cuBLAS GEMMs over
//! all rows) and token by token through the decode segments (what the GPU backend did before it
//! had a prefill).

use std::path::PathBuf;

use shardline_tensor::DType;

#[cfg(feature = "cuda")]
use super::record::{Sink, Stats};

/// What one iteration measures; shown by `--help`.
const SEMANTICS: &str = "\
One decoder layer (attention segment, then FFN segment) over `--rows` prompt tokens that follow\n\
`--kv-len` positions already in the KV cache, on the GPU, single rank, weights random at the\n\
preset's real shapes. `path` gemm: the whole chunk at once, as the GPU backend's prefill runs it\n\
(host rows in, cuBLAS GEMMs, the chosen experts read back once per MoE layer, partial sums out).\n\
`path` per-token: the same rows one at a time through the decode segments (host copies in and out\n\
per row and segment, as the GPU backend ran a prompt before it had a prefill). Each iteration\n\
rewrites the same cache positions; its wall-clock time is the record's; `us_per_token` is the\n\
median over `--rows`.";

#[derive(clap::Args)]
#[command(after_help = SEMANTICS)]
pub struct PrefillArgs {
    /// Random weights at real shapes: mixtral-8x7b, qwen3-30b-a3b or mixtral-mini.
    #[arg(long, default_value = "mixtral-mini")]
    preset: String,
    /// Weight dtype (f32, f16, bf16).
    #[arg(long, default_value = "bf16")]
    dtype: DType,
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

#[cfg(not(feature = "cuda"))]
pub fn run(_args: PrefillArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench prefill needs a shardline built with `--features cuda`")
}

#[cfg(feature = "cuda")]
pub fn run(args: PrefillArgs) -> anyhow::Result<()> {
    use std::time::Instant;

    use anyhow::Context;
    use serde_json::json;
    use shardline_cuda::{CudaDevice, DeviceLayer, FfnShape, LayerStack, Prefill};
    use shardline_model::cuda::layer_shape;
    use shardline_model::presets::preset;

    let spec = preset(&args.preset, 1, args.dtype)
        .with_context(|| format!("no preset named {}", args.preset))?;
    anyhow::ensure!(
        args.rows > 0 && args.iters > 0,
        "--rows and --iters must be positive"
    );
    let ffn = match &spec.moe {
        Some(m) => FfnShape::Moe {
            n_experts: m.n_experts,
            top_k: m.top_k,
            intermediate: m.intermediate,
            renormalize: m.renormalize,
            shared_intermediate: m.shared_intermediate,
        },
        None => FfnShape::Dense {
            intermediate: spec.dense_intermediate,
        },
    };
    let shape = layer_shape(&spec, args.kv_len + args.rows);
    let dev = CudaDevice::open(0)?;
    let layer = DeviceLayer::random(&dev, &shape, &ffn, args.dtype, 0x5EED)
        .context("building the random layer on the GPU")?;
    let mut stack = LayerStack::new(&dev, shape.clone(), vec![layer])?;
    let mut prefill = Prefill::new(&dev)?;
    let h = shape.hidden;
    let mut rng = fastrand::Rng::with_seed(7);
    let x: Vec<f32> = (0..args.rows * h).map(|_| rng.f32() * 2.0 - 1.0).collect();
    let mut out = vec![0.0f32; x.len()];
    let mut sink = Sink::new(args.json.as_deref())?;
    for path in ["gemm", "per-token"] {
        let mut samples = Vec::with_capacity(args.iters);
        for it in 0..2 + args.iters {
            let t = Instant::now();
            if path == "gemm" {
                prefill.attention(&dev, &stack, 0, args.kv_len, &x, &mut out)?;
                prefill.ffn(&dev, &stack, 0, &x, &mut out)?;
            } else {
                for (r, (xr, or)) in x.chunks(h).zip(out.chunks_mut(h)).enumerate() {
                    stack.set_position(&dev, args.kv_len + r)?;
                    stack.attention(&dev, 0, xr, or)?;
                    stack.ffn(&dev, 0, xr, or)?;
                }
            }
            if it >= 2 {
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        let stats = Stats::from_samples(&mut samples);
        let us_per_token = stats.median_us / args.rows as f64;
        let fields = json!({
            "model": args.preset,
            "device": "cuda",
            "device_name": dev.name(),
            "dtype": args.dtype.name(),
            "path": path,
            "layers": 1,
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
