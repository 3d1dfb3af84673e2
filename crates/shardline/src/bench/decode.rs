//! `shardline bench decode`: the time of one decode step through the engine `run` uses (a token
//! in, the greedy id out), on the CPU or a GPU, one rank or many, and its share per layer.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Map, Value};
use shardline_model::load::load_layer_for;
use shardline_model::{Exec, Plan};
use shardline_tensor::{pool, DType};

use super::record::{Sink, Stats};
use crate::dist::{self, ParallelArgs, Role};
use crate::engine::{
    self, CommTime, DeviceArg, DynEngine, EngineOptions, KvDtypeArg, ModelArgs, Source,
};

/// Without `--layers`, a preset gets enough layers that one step reads at least this many weight
/// bytes: a step's weights must not sit in the CPU's caches or the GPU's L2 between iterations.
const MIN_BYTES_PER_STEP: usize = 256 << 20;
/// Distinct tokens cycled over (so routing picks different experts).
const TOKEN_POOL: usize = 16;

/// What one iteration measures; shown by `--help` (bench/peers/torch_decode.py matches it).
const SEMANTICS: &str = "\
One decode step of the model at KV length `--kv-len`, through the same engine as `run`: a token\n\
in, its embedding, every layer, the final norm, the logits and the greedy id out. With `--batch\n\
B`, B rows of B sequences at once in the paged KV cache, as `serve` runs them (each weight read\n\
once for all rows): `tokens_per_s` = B / step; `step_bytes` = the weights the step reads (the\n\
layers' attention and the experts the rows choose, the expected number of distinct ones under\n\
uniform routing; the lm_head) plus the KV it reads; `floor_us` = step_bytes over\n\
`mem_read_gbps`, measured in the same run: on the CPU this machine's parallel read bandwidth, on\n\
a GPU its device-to-device copy bandwidth (bytes read and written).\n\
\n\
The model is a preset's random weights at real shapes (`--layers` of them; by default enough\n\
layers that a step reads at least 256 MB of weights, so none stay in a cache between steps) or a\n\
model directory (its first `--layers` layers, default all). The KV cache is prefilled with\n\
`--kv-len` random tokens through the engine's prefill, and truncated back to that length before\n\
every iteration; an iteration's token is drawn in turn from a pool of 16 (so routing varies).\n\
Reported: `step_us` and `step_p99_us`, the wall-clock time of a whole step; `head_us`, the\n\
median step of the same model with no layers (embedding, final norm, logits, argmax; no KV);\n\
`median_us` and `p99_us` per layer, (step - head_us) / layers; `weight_bytes_per_layer`, what a\n\
layer reads in one step on one rank (attention, norms, router, top_k experts; its slices under\n\
--tp/--ep); `gbps` = weight_bytes_per_layer / per-layer median. With --tp/--ep the ranks start\n\
themselves, each iteration starts after a barrier, its time is the slowest rank's,\n\
`comm_us_per_layer` is the share of the host's collectives (0 where NCCL sums on the GPUs),\n\
`sum_dtype` the type the host's all-reduces carry the partial sums in (--reduce-dtype), and\n\
`rss_mb_per_rank` the largest rank's resident memory. `--exec per-op` runs each op on its own:\n\
one parallel region per matrix on the CPU, one launch waited for at a time on the GPU.\n\
Threads: SHARDLINE_THREADS (default all cores).";

#[derive(clap::Args)]
#[command(after_help = SEMANTICS)]
pub struct DecodeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Positions already in the KV cache.
    #[arg(long, default_value_t = 128)]
    kv_len: usize,
    /// Decode rows per step, each its own sequence at `--kv-len` in the paged KV cache (as a
    /// server batches them); 1 times the single-sequence step `run` takes. Several sizes
    /// (`--batch 1,2,4,8`) are timed one after the other on the same model, a record each.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    /// What the paged KV cache of `--batch` steps holds: auto (bf16 on a GPU, f32 on the CPU),
    /// f32 or bf16 (GPU only).
    #[arg(long, value_enum, default_value_t = KvDtypeArg::Auto)]
    kv_dtype: KvDtypeArg,
    /// Timed iterations (after 10% warm-up, at least 5).
    #[arg(long, default_value_t = 200)]
    iters: usize,
    /// Also write the record as a JSON line to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where the model runs: cpu, or cuda (a build with the `cuda` feature).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// How a step is submitted: split (one CUDA graph per step on the GPU; one parallel region
    /// for q/k/v and one per expert stage on the CPU) or per-op (each op launched and waited for).
    #[arg(long, default_value = "split")]
    exec: Exec,
    #[command(flatten)]
    parallel: ParallelArgs,
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

/// The model to time: `--layers` as given, else a preset gets enough layers to read
/// [`MIN_BYTES_PER_STEP`] per step (sized by one of its layers, as this rank holds it).
fn sized_source(args: &DecodeArgs, plan: &Plan) -> anyhow::Result<Source> {
    let source = args.model.source()?;
    let Source::Preset { name, dtype, .. } = &source else {
        return Ok(source);
    };
    if args.model.layers.is_some() {
        return Ok(source);
    }
    let one = Source::Preset {
        name: name.clone(),
        layers: 1,
        dtype: *dtype,
    };
    let spec = one.spec()?;
    let layer = load_layer_for(&spec, &Source::random_tensors(*dtype), 0, plan)?;
    let layers = MIN_BYTES_PER_STEP.div_ceil(layer.decode_bytes().max(1));
    Ok(Source::Preset {
        name: name.clone(),
        layers,
        dtype: *dtype,
    })
}

pub fn run(args: DecodeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.iters > 0, "--iters must be at least 1");
    anyhow::ensure!(
        !args.batch.is_empty() && args.batch.iter().all(|b| (1..=4096).contains(b)),
        "--batch must be between 1 and 4096"
    );
    let (plan, group) = match dist::role(&args.parallel)? {
        Role::Single => (Plan::single(), None),
        Role::Launcher => {
            let spec = args.model.source()?.spec()?;
            return dist::launch_local_checked(&args.parallel, &spec);
        }
        Role::Rank { group, plan } => (plan, Some(group)),
    };
    let source = sized_source(&args, &plan)?;
    let exec = args.exec;
    let comm_time = CommTime::default();
    let opts = EngineOptions {
        device: args.device,
        exec,
        positions: args.kv_len + 1,
        gpu_comm: args.parallel.gpu_comm,
        reduce_dtype: args.parallel.reduce_dtype,
        comm_time: comm_time.clone(),
    };
    let warmup = (args.iters / 10).max(5);

    // The model with no layers: embedding, final norm, logits and argmax alone.
    let (spec0, weights0, _) = source.load(&plan, |s| s.n_layers = 0)?;
    let split = group.is_some();
    let group = group.map(Arc::new);
    let mut head_engine = engine::build(spec0, weights0, group.clone(), &opts)
        .context("building the head-only model")?;
    let head = time_steps(&mut head_engine, 0, &args, warmup, &comm_time)?;
    drop(head_engine);

    let (spec, weights, _) = source.load(&plan, |_| {})?;
    let layers = spec.n_layers;
    anyhow::ensure!(layers > 0, "the model has no layers to time");
    let bytes_per_layer = weights
        .layers
        .iter()
        .map(|l| l.decode_bytes())
        .sum::<usize>()
        / layers.max(1);
    let dtype = weights.layers[0].attn.q.dtype();
    // One sequence decodes over the f32 cache `run` uses; batches over the paged cache.
    let kv_dtype = |b: usize| {
        if b == 1 {
            DType::F32
        } else {
            args.kv_dtype.on(args.device)
        }
    };
    let step_bytes: Vec<usize> = args
        .batch
        .iter()
        .map(|&b| {
            let kv = kv_dtype(b).size_in_bytes();
            weights
                .layers
                .iter()
                .map(|l| l.step_bytes(b))
                .sum::<usize>()
                + weights.lm_head().byte_len()
                + b * (args.kv_len + 1) * 2 * kv * spec.kv_width() / plan.world().max(1) * layers
        })
        .collect();
    let mut engine = engine::build(spec.clone(), weights, group, &opts)?;
    // The floor of a step: its bytes at the memory bandwidth of the device it runs on.
    let mem_gbps = match args.device {
        DeviceArg::Cpu => memory_read_gbps(),
        DeviceArg::Cuda => crate::engine::gpu_copy_gbps()?,
    };
    // Rank 0 reports.
    let mut sink = (engine.reduce.rank() == 0)
        .then(|| Sink::new(args.json.as_deref()))
        .transpose()?;
    for (&batch, &step_bytes) in args.batch.iter().zip(&step_bytes) {
        let steps = if batch == 1 {
            time_steps(&mut engine, args.kv_len, &args, warmup, &comm_time)?
        } else {
            time_batch_steps(&mut engine, &args, batch, warmup, &comm_time)?
        };

        // An iteration takes as long as its slowest rank.
        let steps = slowest(&mut engine, &steps.samples)?;
        let comm = slowest(&mut engine, &[steps_comm(&comm_time, &args, layers)])?[0];
        let rss = slowest(&mut engine, &[resident_mb()])?[0];
        let Some(sink) = sink.as_mut() else {
            continue;
        };
        let head_us = head.stats.median_us;
        let mut step_samples: Vec<f64> = steps.iter().map(|&v| v as f64).collect();
        let step = Stats::from_samples(&mut step_samples);
        let mut per_layer: Vec<f64> = step_samples
            .iter()
            .map(|s| (s - head_us).max(0.0) / layers as f64)
            .collect();
        let stats = Stats::from_samples(&mut per_layer);
        let gbps = bytes_per_layer as f64 / (stats.median_us * 1e3);
        let fields: Map<String, Value> = json!({
            "model": source.name(),
            "device": device_name(&args),
            "dtype": dtype.name(),
            "tp": plan.world(),
            "ep": plan.ep(),
            "exec": exec.name(),
            "transport": if split { args.parallel.transport.as_str() } else { "none" },
            "layers": layers,
            "kv_len": args.kv_len,
            "threads": pool::num_threads(),
            "step_us": round3(step.median_us),
            "step_p99_us": round3(step.p99_us),
            "head_us": round3(head_us),
            "weight_bytes_per_layer": bytes_per_layer,
            "gbps": round3(gbps),
            "comm_us_per_layer": round3(comm as f64),
            "sum_dtype": if split { engine.sum_dtype.name() } else { "none" },
            "rss_mb_per_rank": rss.round(),
            "batch": batch,
            "kv_dtype": kv_dtype(batch).name(),
            "tokens_per_s": round3(batch as f64 * 1e6 / step.median_us),
            "step_bytes": step_bytes,
            "mem_read_gbps": round3(mem_gbps),
            "floor_us": round3(step_bytes as f64 / (mem_gbps * 1e3)),
        })
        .as_object()
        .cloned()
        .unwrap_or_default();
        sink.write("decode", stats, fields)?;
    }
    Ok(())
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn device_name(args: &DecodeArgs) -> &'static str {
    match args.device {
        DeviceArg::Cpu => "cpu",
        DeviceArg::Cuda => "cuda",
    }
}

/// Step times, in microseconds, of the timed iterations.
struct Timed {
    samples: Vec<f32>,
    stats: Stats,
}

impl Timed {
    fn new(samples: Vec<f32>) -> Timed {
        let mut all: Vec<f64> = samples.iter().map(|&v| v as f64).collect();
        Timed {
            stats: Stats::from_samples(&mut all),
            samples,
        }
    }
}

/// Prefills `kv_len` random tokens, then times `--iters` single-token steps (after `warmup`
/// untimed ones), each from the same KV length.
fn time_steps(
    engine: &mut DynEngine,
    kv_len: usize,
    args: &DecodeArgs,
    warmup: usize,
    comm_time: &CommTime,
) -> anyhow::Result<Timed> {
    let vocab = engine.backend.spec().vocab as u32;
    let mut rng = fastrand::Rng::with_seed(42);
    let tokens: Vec<u32> = (0..TOKEN_POOL).map(|_| rng.u32(..vocab)).collect();
    engine.start(kv_len + 1)?;
    if kv_len > 0 {
        let prompt: Vec<u32> = (0..kv_len).map(|_| rng.u32(..vocab)).collect();
        engine.forward_argmax(&prompt)?;
    }
    let mut samples = Vec::with_capacity(args.iters);
    for it in 0..warmup + args.iters {
        engine.truncate(kv_len)?;
        engine.reduce.barrier()?;
        if it == warmup {
            comm_time.take_us();
        }
        let t = Instant::now();
        engine.forward_argmax(&[tokens[it % TOKEN_POOL]])?;
        if it >= warmup {
            samples.push((t.elapsed().as_secs_f64() * 1e6) as f32);
        }
    }
    Ok(Timed::new(samples))
}

/// Times `--iters` steps of `batch` decode rows (after `warmup` untimed ones): row `b` is
/// sequence `b`'s token at position `--kv-len` of the paged cache. The cached positions hold
/// zeros (attention costs the same whatever the keys are); every row's greedy token comes back,
/// as a server running greedy requests gets them.
fn time_batch_steps(
    engine: &mut DynEngine,
    args: &DecodeArgs,
    batch: usize,
    warmup: usize,
    comm_time: &CommTime,
) -> anyhow::Result<Timed> {
    use shardline_model::kv_pool::blocks_for;
    use shardline_model::PagedRow;
    let per_seq = blocks_for(args.kv_len + 1);
    let kv_dtype = args.kv_dtype.on(args.device);
    engine.backend.make_kv_pool(batch * per_seq, kv_dtype)?;
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|b| ((b * per_seq) as u32..((b + 1) * per_seq) as u32).collect())
        .collect();
    let rows: Vec<PagedRow> = tables
        .iter()
        .map(|t| PagedRow {
            pos: args.kv_len,
            blocks: t,
        })
        .collect();
    let sample: Vec<usize> = (0..batch).collect();
    let vocab = engine.backend.spec().vocab as u32;
    let mut rng = fastrand::Rng::with_seed(42);
    let pool: Vec<u32> = (0..TOKEN_POOL * batch).map(|_| rng.u32(..vocab)).collect();
    let mut samples = Vec::with_capacity(args.iters);
    for it in 0..warmup + args.iters {
        let start = (it % TOKEN_POOL) * batch;
        let tokens = &pool[start..start + batch];
        engine.reduce.barrier()?;
        if it == warmup {
            comm_time.take_us();
        }
        let t = Instant::now();
        std::hint::black_box(engine.forward_paged_greedy(tokens, &rows, &sample)?);
        if it >= warmup {
            samples.push((t.elapsed().as_secs_f64() * 1e6) as f32);
        }
    }
    Ok(Timed::new(samples))
}

/// This machine's memory read bandwidth, GB/s: the best of a few parallel sums of 512 MiB.
fn memory_read_gbps() -> f64 {
    let buf = vec![1.0f32; (512 << 20) / 4];
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(shardline_tensor::kernels::sum(std::hint::black_box(&buf)));
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    (buf.len() * 4) as f64 / best / 1e9
}

/// The host collectives' time per layer and timed step since the timing began.
fn steps_comm(comm_time: &CommTime, args: &DecodeArgs, layers: usize) -> f32 {
    (comm_time.take_us() / (args.iters * layers) as f64) as f32
}

/// The largest of each value over the ranks.
fn slowest(engine: &mut DynEngine, mine: &[f32]) -> anyhow::Result<Vec<f32>> {
    let world = engine.reduce.world();
    let mut all = vec![0.0f32; mine.len() * world];
    engine.reduce.all_gather(mine, &mut all)?;
    let mut max = mine.to_vec();
    for rank in all.chunks_exact(mine.len().max(1)) {
        for (m, v) in max.iter_mut().zip(rank) {
            *m = m.max(*v);
        }
    }
    Ok(max)
}
