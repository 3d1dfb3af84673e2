//! `shardline bench decode`: the time of one decode step of MoE layers, per layer, and the weight
//! bandwidth it achieves.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Map};
use shardline_comm::ReduceOp;
use shardline_model::load::load_layer_for;
use shardline_model::presets::{preset, PRESETS};
use shardline_model::random::RandomWeights;
use shardline_model::rope::inv_freq;
use shardline_model::safetensors_dir::SafetensorsDir;
use shardline_model::weights::{TensorSource, Weight};
use shardline_model::{layer::Layer, ModelSpec};
use shardline_model::{Exec, Plan};
use shardline_tensor::kernels::{add_assign, KvCache, Rope};
use shardline_tensor::{pool, DType, Tensor};

use super::record::{Sink, Stats};
use crate::dist::{self, ParallelArgs, Role};
#[cfg(feature = "cuda")]
use crate::gpu_comm::{self, GpuComm};

/// Below this many bytes of layer weights, layer copies are added so that an iteration's
/// weights are no longer in the CPU caches when they are read again.
const MIN_RESIDENT_BYTES: usize = 256 << 20;
/// Distinct random hidden states cycled over (so routing picks different experts).
const INPUT_POOL: usize = 16;

/// What one iteration measures; shown by `--help` (bench/peers/torch_decode.py matches it).
const SEMANTICS: &str = "\
One decode step (batch 1) of `--layers` decoder layers at KV length `--kv-len`.\n\
\n\
Semantics (bench/peers/torch_decode.py measures the same): weights are random at the preset's\n\
real shapes (or a model directory's first layers). Each layer's KV cache is prefilled with\n\
`--kv-len` random keys/values and reset to that length before every iteration (untimed). An\n\
iteration feeds a hidden state drawn in turn from a fixed pool of 16 random inputs (so routing\n\
varies) through the layers: rms_norm, q/k/v, rope, KV append, attention, o_proj, residual;\n\
rms_norm, router softmax + top-k, the selected experts, weighted sum, residual. When all\n\
layers together hold under 256 MB of weights, iterations cycle over enough layer copies that\n\
weights are not in cache. Reported per layer: `median_us`, `p99_us` (iteration time /\n\
layers); `weight_bytes_per_layer` = attention + norms + router + top_k experts' weights (the bytes one\n\
step reads, on one rank: its slices under --tp/--ep); `gbps` = weight_bytes_per_layer / median.\n\
With --tp/--ep the ranks start themselves, each iteration starts after a barrier, its time is the\n\
slowest rank's, `comm_us_per_layer` is the all-reduces' share of it, and `rss_mb_per_rank` the\n\
largest rank's resident memory. `--exec per-op` on the CPU runs every matrix as its own\n\
parallel region (q, k, v, each expert's gate/up and down) instead of one region for q/k/v and\n\
one per expert stage. Threads: SHARDLINE_THREADS (default all cores).\n\
\n\
With --device cuda the layers run on the GPU (the whole step one CUDA graph in split mode). Over\n\
--tp/--ep ranks each rank needs a GPU of its own: NCCL sums each segment on the GPUs, inside the\n\
step's graph when the capture takes it (`comm_in_graph`), else between per-segment graphs;\n\
`comm_us_per_layer` is then a layer's two NCCL all-reduces of the hidden state timed alone. One\n\
rank with --gpu-comm nccl runs a one-rank communicator the same way.";

#[derive(clap::Args)]
#[command(after_help = SEMANTICS)]
pub struct DecodeArgs {
    /// A model directory to take the layers from (weights as stored).
    #[arg(long, conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// Random weights at real shapes: mixtral-8x7b, qwen3-30b-a3b or mixtral-mini.
    #[arg(long)]
    preset: Option<String>,
    /// Decoder layers per step.
    #[arg(long, default_value_t = 1)]
    layers: usize,
    /// Positions already in the KV cache.
    #[arg(long, default_value_t = 128)]
    kv_len: usize,
    /// Weight dtype of a preset (f32, f16, bf16); default bf16.
    #[arg(long, conflicts_with = "model")]
    dtype: Option<DType>,
    /// Timed iterations (after 10% warm-up, at least 5).
    #[arg(long, default_value_t = 200)]
    iters: usize,
    /// Also write the record as a JSON line to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where the layers run: cpu, or cuda (a build with the `cuda` feature; presets only).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
    /// How a step is submitted: split (one submission per segment: a CUDA graph on the GPU, one
    /// parallel region for q/k/v and one for all chosen experts on the CPU) or per-op (each op
    /// launched and waited for: one parallel region per matrix on the CPU).
    #[arg(long, default_value = "split", value_parser = ["split", "per-op"])]
    exec: String,
    #[command(flatten)]
    parallel: ParallelArgs,
}

impl DecodeArgs {
    pub fn preset_name(&self) -> String {
        self.preset.clone().unwrap_or_else(|| "mixtral-mini".into())
    }
}

/// A source that hands out owned copies, so layer copies of a mapped model occupy distinct memory.
struct Copied<'a>(&'a dyn TensorSource);

impl TensorSource for Copied<'_> {
    fn get(&self, name: &str, expected: &[usize]) -> shardline_model::Result<Weight> {
        let w = self.0.get(name, expected)?;
        let v = w.view();
        let t = Tensor::from_bytes(v.dtype(), expected, v.bytes())
            .map_err(|e| shardline_model::ModelError::Invalid(e.to_string()))?;
        Ok(Weight::Owned(t))
    }

    fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// This process's resident memory in MB (VmRSS), or 0 where /proc does not say.
fn resident_mb() -> f32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f32>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn random_f32(rng: &mut fastrand::Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.f32() * 2.0 - 1.0).collect()
}

pub fn run(args: DecodeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.layers > 0, "--layers must be at least 1");
    anyhow::ensure!(args.iters > 0, "--iters must be at least 1");
    if args.device == "cuda" {
        return run_cuda(&args);
    }
    let exec = if args.exec == "per-op" {
        Exec::PerOp
    } else {
        Exec::Split
    };
    let role = dist::role(&args.parallel)?;
    let (name, spec, source): (String, ModelSpec, Box<dyn TensorSource>) = match &args.model {
        Some(dir) => {
            let spec = ModelSpec::from_file(&dir.join("config.json"))?;
            anyhow::ensure!(
                args.layers <= spec.n_layers,
                "--layers {} but {} has {} layers",
                args.layers,
                dir.display(),
                spec.n_layers
            );
            let files = SafetensorsDir::open(dir)
                .with_context(|| format!("cannot open the weights of {}", dir.display()))?;
            (dir.display().to_string(), spec, Box::new(files))
        }
        None => {
            let name = args.preset_name();
            let dtype = args.dtype.unwrap_or(DType::BF16);
            let spec = preset(&name, args.layers, dtype).with_context(|| {
                format!("unknown preset `{name}` (known: {})", PRESETS.join(", "))
            })?;
            (name, spec, Box::new(RandomWeights::new(0x5eed, dtype)))
        }
    };
    let (plan, group) = match role {
        Role::Single => (Plan::single(), None),
        Role::Launcher => {
            return dist::launch_local_checked(&args.parallel, &spec);
        }
        Role::Rank { group, plan } => (plan, Some(group)),
    };
    let load = |src: &dyn TensorSource, i: usize| load_layer_for(&spec, src, i, &plan);
    // Load the first set of layers, then add copies until the weights no longer fit in cache.
    let mut layers: Vec<Layer> = Vec::new();
    for i in 0..args.layers {
        layers.push(load(source.as_ref(), i)?);
    }
    let set_bytes: usize = layers.iter().map(Layer::total_bytes).sum();
    let copies = MIN_RESIDENT_BYTES.div_ceil(set_bytes.max(1)).max(1);
    let copied = Copied(source.as_ref());
    for c in 1..copies {
        for i in 0..args.layers {
            let layer = if args.model.is_some() {
                load(&copied, i)?
            } else {
                // Random weights depend on the tensor name: another layer index is another copy.
                load(source.as_ref(), c * args.layers + i)?
            };
            layers.push(layer);
        }
    }
    let dtype = layers[0].attn.q.dtype();
    let bytes_per_layer = layers.iter().map(Layer::decode_bytes).sum::<usize>() / layers.len();

    let mut rng = fastrand::Rng::with_seed(42);
    let kv_row = layers[0].attn.n_kv_heads * spec.head_dim; // this rank's KV heads
    let prefill_k = random_f32(&mut rng, args.kv_len * kv_row);
    let prefill_v = random_f32(&mut rng, args.kv_len * kv_row);
    let mut caches: Vec<KvCache> = layers
        .iter()
        .map(|l| KvCache::new(l.attn.n_kv_heads, spec.head_dim, args.kv_len + 1))
        .collect();
    let rope = Rope::from_inv_freq(&inv_freq(&spec), args.kv_len + 1);
    let inputs: Vec<Vec<f32>> = (0..INPUT_POOL)
        .map(|_| random_f32(&mut rng, spec.hidden))
        .collect();
    let mut x = vec![0.0f32; spec.hidden];
    let mut part = vec![0.0f32; spec.hidden];

    let warmup = (args.iters / 10).max(5);
    let mut samples = Vec::with_capacity(args.iters);
    let mut comm_samples = Vec::with_capacity(args.iters);
    // The all-reduce after each segment; its time is kept apart.
    let reduce = |part: &mut [f32], comm: &mut f64| -> anyhow::Result<()> {
        if let Some(g) = &group {
            let t = Instant::now();
            g.all_reduce(part, ReduceOp::Sum)?;
            *comm += t.elapsed().as_secs_f64() * 1e6;
        }
        Ok(())
    };
    for it in 0..warmup + args.iters {
        let set = it % copies;
        let range = set * args.layers..(set + 1) * args.layers;
        for cache in &mut caches[range.clone()] {
            cache.clear();
            if args.kv_len > 0 {
                cache.append(&prefill_k, &prefill_v);
            }
        }
        x.copy_from_slice(&inputs[it % INPUT_POOL]);
        if let Some(g) = &group {
            g.barrier()?;
        }
        let mut comm = 0.0f64;
        let t = Instant::now();
        for (layer, cache) in layers[range.clone()].iter().zip(&mut caches[range]) {
            layer.attention_forward(&x, cache, &rope, exec, &mut part);
            reduce(&mut part, &mut comm)?;
            add_assign(&mut x, &part);
            layer.ffn_forward(&x, exec, &mut part);
            reduce(&mut part, &mut comm)?;
            add_assign(&mut x, &part);
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / args.layers as f64;
        if it >= warmup {
            samples.push(us as f32);
            comm_samples.push((comm / args.layers as f64) as f32);
        }
    }
    // Resident memory of this process (weights, caches, buffers), MB.
    let mut rss_mb = [resident_mb()];
    // An iteration takes as long as its slowest rank; rank 0 reports.
    if let Some(g) = &group {
        g.all_reduce(&mut samples, ReduceOp::Max)?;
        g.all_reduce(&mut comm_samples, ReduceOp::Max)?;
        g.all_reduce(&mut rss_mb, ReduceOp::Max)?;
        if g.rank() != 0 {
            return Ok(());
        }
    }
    let mut samples: Vec<f64> = samples.iter().map(|&v| v as f64).collect();
    let mut comm_samples: Vec<f64> = comm_samples.iter().map(|&v| v as f64).collect();
    let stats = Stats::from_samples(&mut samples);
    let comm_us = Stats::from_samples(&mut comm_samples).median_us;
    let gbps = bytes_per_layer as f64 / (stats.median_us * 1e3);
    let fields: Map<String, serde_json::Value> = json!({
        "model": name,
        "device": "cpu",
        "dtype": dtype.name(),
        "tp": plan.world(),
        "ep": plan.ep(),
        "exec": args.exec,
        "transport": if plan.world() > 1 { args.parallel.transport.as_str() } else { "none" },
        "layers": args.layers,
        "kv_len": args.kv_len,
        "layer_copies": copies,
        "threads": pool::num_threads(),
        "weight_bytes_per_layer": bytes_per_layer,
        "gbps": (gbps * 1000.0).round() / 1000.0,
        "comm_us_per_layer": (comm_us * 1000.0).round() / 1000.0,
        "rss_mb_per_rank": rss_mb[0].round(),
    })
    .as_object()
    .cloned()
    .unwrap_or_default();
    Sink::new(args.json.as_deref())?.write("decode", stats, fields)
}

#[cfg(feature = "cuda")]
fn run_cuda(args: &DecodeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.model.is_none(),
        "--device cuda benchmarks presets only for now (no --model)"
    );
    let name = args.preset_name();
    let dtype = args.dtype.unwrap_or(DType::BF16);
    let spec = preset(&name, args.layers, dtype)
        .with_context(|| format!("unknown preset `{name}` (known: {})", PRESETS.join(", ")))?;
    let exec = match args.exec.as_str() {
        "per-op" => shardline_cuda::ExecMode::PerOp,
        _ => shardline_cuda::ExecMode::Split,
    };
    let world = args.parallel.world();
    let (plan, group) = match dist::role(&args.parallel)? {
        Role::Single => (Plan::single(), None),
        Role::Launcher => {
            // Checked here so that no rank starts when they would have to share a GPU.
            anyhow::ensure!(
                args.parallel.gpu_comm != GpuComm::Host,
                "bench decode --device cuda over {world} ranks sums through NCCL on the GPUs; \
                 --gpu-comm host is not measured there"
            );
            let gpus = shardline_cuda::device::device_count()?;
            anyhow::ensure!(
                gpus >= world,
                "bench decode --device cuda over {world} ranks needs a GPU per rank (NCCL cannot \
                 form a communicator of ranks sharing one GPU), and this host has {gpus}"
            );
            return dist::launch_local_checked(&args.parallel, &spec);
        }
        Role::Rank { group, plan } => (plan, Some(group)),
    };
    // Several ranks always sum through NCCL; one rank only when asked to (--gpu-comm nccl).
    let want = match (world, args.parallel.gpu_comm) {
        (1, want) => want,
        (_, GpuComm::Host) => anyhow::bail!("--gpu-comm host is not measured on the GPU"),
        _ => GpuComm::Nccl,
    };
    let dev = shardline_cuda::CudaDevice::open(gpu_comm::gpu_ordinal(group.as_ref())?)?;
    let comm = gpu_comm::device_comm(&dev, group.as_ref(), want)?;
    let case = super::decode_cuda::CudaDecodeCase {
        preset: &name,
        spec: &spec,
        layers: args.layers,
        kv_len: args.kv_len,
        iters: args.iters,
        exec,
        plan,
        group: group.as_ref(),
    };
    let mut sink = Sink::new(args.json.as_deref())?;
    super::decode_cuda::run_case(&dev, &case, comm, &mut sink)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_args: &DecodeArgs) -> anyhow::Result<()> {
    anyhow::bail!("--device cuda needs a shardline built with `--features cuda`")
}
