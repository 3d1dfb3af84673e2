//! Building what a command runs, in one place for `run`, `verify` and the benches: this rank's
//! weights (a Hugging Face directory, a preset's random weights at a real model's shapes, or the
//! built-in demo model) and the [`Engine`] over them on the chosen device, with this rank's
//! collectives.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use shardline_comm::Group;
use shardline_model::gguf::{self, GgufModel};
use shardline_model::load::{load_model_for, ModelWeights};
use shardline_model::presets::{preset, preset_layers, PRESETS};
use shardline_model::random::RandomWeights;
use shardline_model::tokenizer::TextCodec;
use shardline_model::{
    builtin_parts_for, builtin_spec, load_parts_quantized_for, load_tokenizer, Backend, CpuBackend,
    Engine, Exec, ModelSpec, Plan, Reduce, SingleRank, SumDType,
};
use shardline_tensor::quant::QuantFormat;
use shardline_tensor::DType;

use crate::dist::GroupReduce;
use crate::gpu_comm::GpuComm;

/// The seed of a preset's random weights.
const PRESET_SEED: u64 = 0x5eed;

/// Which model a command runs.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// A model directory in the Hugging Face layout (config.json, model.safetensors or
    /// model.safetensors.index.json with its shards, tokenizer.json), e.g. one downloaded with
    /// `huggingface-cli download mistralai/Mixtral-8x7B-v0.1 --local-dir DIR`; or a repository
    /// id (`ORG/NAME`) whose snapshot is in the local Hugging Face cache. Without it (and
    /// without --preset), a built-in small Mixtral-shaped model with deterministic random weights
    /// and a byte-level tokenizer runs (its text is gibberish, but it needs no download).
    #[arg(short = 'm', long, env = "SHARDLINE_MODEL", conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// Deterministic random weights at a real model's shapes, made in memory (no download; the
    /// text is gibberish, the speed is the real model's): mixtral-8x7b, qwen3-30b-a3b or
    /// mixtral-mini. Byte-level tokenizer.
    #[arg(long)]
    pub preset: Option<String>,
    /// Decoder layers to run: N, or `all` (the real model's count, the default): a preset's, or
    /// the first N of a model directory's.
    #[arg(long)]
    pub layers: Option<Layers>,
    /// Weight dtype of a preset: f32, f16, bf16, or q8_0 / q4_k (quantized as they load).
    #[arg(long, default_value = "bf16")]
    pub dtype: DType,
    /// Quantize a model directory's float weights while loading: q8_0 or q4_k (ggml's block
    /// formats; the matrices but the MoE routers, as llama.cpp quantizes them).
    #[arg(long, value_parser = parse_quantize)]
    pub quantize: Option<QuantFormat>,
}

/// `--quantize`: a block format weights can be made in.
pub fn parse_quantize(s: &str) -> Result<QuantFormat, String> {
    match s.parse::<DType>() {
        Ok(DType::Quant(q @ (QuantFormat::Q8_0 | QuantFormat::Q4K))) => Ok(q),
        _ => Err(format!("`{s}`: --quantize takes q8_0 or q4_k")),
    }
}

/// `--layers`: a count, or all of the model's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layers {
    All,
    First(usize),
}

impl std::str::FromStr for Layers {
    type Err = String;

    fn from_str(s: &str) -> Result<Layers, String> {
        match s {
            "all" => Ok(Layers::All),
            n => match n.parse::<usize>() {
                Ok(n) if n > 0 => Ok(Layers::First(n)),
                _ => Err(format!(
                    "`{s}`: expected a positive number of layers or `all`"
                )),
            },
        }
    }
}

impl Layers {
    /// The count out of a model's `total`.
    fn of(self, total: usize) -> usize {
        match self {
            Layers::All => total,
            Layers::First(n) => n,
        }
    }
}

/// Where a model's weights come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A Hugging Face directory, with only its first `layers` layers when given, and its
    /// float weights quantized to `quantize` when asked.
    Dir {
        dir: PathBuf,
        layers: Option<Layers>,
        quantize: Option<QuantFormat>,
    },
    /// A GGUF file (or the first shard of a split set), with only its first `layers` layers
    /// when given.
    Gguf {
        path: PathBuf,
        layers: Option<Layers>,
    },
    Preset {
        name: String,
        layers: usize,
        dtype: DType,
    },
    Builtin,
}

impl ModelArgs {
    pub fn source(&self) -> anyhow::Result<Source> {
        Ok(match (&self.model, &self.preset) {
            (Some(path), _) if gguf::is_gguf(path) => {
                anyhow::ensure!(
                    self.quantize.is_none(),
                    "--quantize applies to float weights; {} is a GGUF file, already in its format",
                    path.display()
                );
                Source::Gguf {
                    path: path.clone(),
                    layers: self.layers,
                }
            }
            (Some(dir), _) => Source::Dir {
                dir: crate::hub::resolve_model(dir)?,
                layers: self.layers,
                quantize: self.quantize,
            },
            (None, _) if self.quantize.is_some() => {
                anyhow::bail!("--quantize needs --model (a preset takes --dtype q8_0 or q4_k)")
            }
            (None, Some(name)) => {
                let total = preset_layers(name).with_context(|| unknown_preset(name))?;
                let layers = self.layers.unwrap_or(Layers::All).of(total);
                Source::Preset {
                    name: name.clone(),
                    layers,
                    dtype: self.dtype,
                }
            }
            (None, None) => {
                anyhow::ensure!(
                    self.layers.is_none(),
                    "--layers needs --model or --preset (the built-in model has its own)"
                );
                Source::Builtin
            }
        })
    }
}

/// `spec` cut to its first `layers` (those of the model at `path`), when given.
fn first_layers(
    mut spec: ModelSpec,
    layers: Option<Layers>,
    path: &std::path::Path,
) -> anyhow::Result<ModelSpec> {
    if let Some(layers) = layers {
        let n = layers.of(spec.n_layers);
        anyhow::ensure!(
            n <= spec.n_layers,
            "--layers {n}: {} has {} layers",
            path.display(),
            spec.n_layers
        );
        spec.n_layers = n;
    }
    Ok(spec)
}

fn unknown_preset(name: &str) -> String {
    format!("unknown preset `{name}` (known: {})", PRESETS.join(", "))
}

impl Source {
    /// The model's spec, read before any weight (to check a plan, or size a benchmark).
    pub fn spec(&self) -> anyhow::Result<ModelSpec> {
        match self {
            Source::Dir { dir, layers, .. } => first_layers(
                ModelSpec::from_file(&dir.join("config.json"))?,
                *layers,
                dir,
            ),
            Source::Gguf { path, layers } => first_layers(gguf::read_spec(path)?, *layers, path),
            Source::Preset {
                name,
                layers,
                dtype,
            } => preset(name, *layers, *dtype).with_context(|| unknown_preset(name)),
            Source::Builtin => Ok(builtin_spec()),
        }
    }

    /// A name for records and messages.
    pub fn name(&self) -> String {
        match self {
            Source::Dir { dir: path, .. } | Source::Gguf { path, .. } => path.display().to_string(),
            Source::Preset { name, .. } => name.clone(),
            Source::Builtin => "builtin".into(),
        }
    }

    /// This rank's weights under `plan`, with the spec `adjust`ed first, and the tokenizer.
    pub fn load(
        &self,
        plan: &Plan,
        adjust: impl FnOnce(&mut ModelSpec),
    ) -> anyhow::Result<(ModelSpec, ModelWeights, TextCodec)> {
        match self {
            Source::Dir {
                dir,
                layers,
                quantize,
            } => {
                let first = self.spec()?.n_layers;
                let adjust = |spec: &mut ModelSpec| {
                    if layers.is_some() {
                        spec.n_layers = first;
                    }
                    adjust(spec)
                };
                let (spec, weights) = load_parts_quantized_for(dir, adjust, plan, *quantize)
                    .with_context(|| format!("cannot load the model in {}", dir.display()))?;
                Ok((spec, weights, load_tokenizer(dir)?))
            }
            Source::Gguf { path, layers } => {
                let first = self.spec()?.n_layers;
                let adjust = |spec: &mut ModelSpec| {
                    if layers.is_some() {
                        spec.n_layers = first;
                    }
                    adjust(spec)
                };
                let model = GgufModel::open(path)?;
                let (spec, weights) = model
                    .weights_for(adjust, plan)
                    .with_context(|| format!("cannot load the model in {}", path.display()))?;
                Ok((spec, weights, model.tokenizer))
            }
            Source::Preset { dtype, .. } => {
                let mut spec = self.spec()?;
                adjust(&mut spec);
                let weights = load_model_for(&spec, &Source::random_tensors(*dtype), plan)?;
                Ok((spec, weights, TextCodec::Bytes))
            }
            Source::Builtin => {
                let (mut spec, weights) = builtin_parts_for(plan)?;
                adjust(&mut spec);
                Ok((spec, weights, TextCodec::Bytes))
            }
        }
    }
}

impl Source {
    /// Where a preset's or the built-in model's weights come from (random, deterministic).
    pub fn random_tensors(dtype: DType) -> RandomWeights {
        RandomWeights::new(PRESET_SEED, dtype)
    }
}

/// `--device`: where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    /// The rank's CUDA GPU (a build with `--features cuda`).
    Cuda,
}

/// `--kv-dtype`: what the paged KV cache of batched steps holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KvDtypeArg {
    /// bf16 on a GPU (half the bytes), f32 on the CPU (exact, where decode is bound by the
    /// weights' bytes rather than the cache's).
    #[default]
    Auto,
    F32,
    /// Half the bytes of f32: 8 bits of mantissa, f32's range.
    Bf16,
    /// Half the bytes of f32: 11 bits of mantissa, values up to 65504 (the CPU only).
    F16,
}

impl KvDtypeArg {
    /// The dtype on `device`.
    pub fn on(self, device: DeviceArg) -> DType {
        match (self, device) {
            (KvDtypeArg::Auto, DeviceArg::Cuda) | (KvDtypeArg::Bf16, _) => DType::BF16,
            (KvDtypeArg::Auto, DeviceArg::Cpu) | (KvDtypeArg::F32, _) => DType::F32,
            (KvDtypeArg::F16, _) => DType::F16,
        }
    }
}

/// Which type the segments' partial sums travel in between the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReduceDType {
    /// The model's activation type: bf16 or f16 for a bf16 or f16 model, f32 for the others.
    Model,
    /// Always f32: the sums are not rounded.
    F32,
}

/// An engine whose device and ranks are chosen at run time.
pub type DynEngine = Engine<Box<dyn Backend>, Box<dyn Reduce>>;

/// How an engine is built, besides its weights.
pub struct EngineOptions {
    pub device: DeviceArg,
    pub exec: Exec,
    /// Positions the KV cache must hold (the GPU's is fixed when it is made).
    pub positions: usize,
    /// With `--device cuda` over ranks: how the segments are summed (read only by a build with
    /// the `cuda` feature).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub gpu_comm: GpuComm,
    /// Where the time of the host's collectives adds up.
    pub comm_time: CommTime,
    /// The type the host's all-reduces carry the ranks' partial sums in.
    pub reduce_dtype: ReduceDType,
}

/// The engine of this rank over `weights` (the whole model with no `group`), as `opts` say. A
/// collective when there is a group: every rank calls it.
pub fn build(
    spec: ModelSpec,
    weights: ModelWeights,
    group: Option<Arc<Group>>,
    opts: &EngineOptions,
) -> anyhow::Result<DynEngine> {
    let backend: Box<dyn Backend> = match opts.device {
        DeviceArg::Cpu => {
            let mut b = CpuBackend::new(spec, weights, opts.positions);
            b.set_exec(opts.exec);
            Box::new(b)
        }
        DeviceArg::Cuda => cuda_backend(spec, weights, group.as_deref(), opts)?,
    };
    let reduce: Box<dyn Reduce> = match group {
        Some(g) => Box::new(GroupReduce::new(g, opts.comm_time.clone())),
        None => Box::new(SingleRank),
    };
    let mut engine = Engine::new(backend, reduce);
    if opts.reduce_dtype == ReduceDType::Model {
        engine.sum_dtype = SumDType::of_weights(engine.backend.weight_dtype());
    }
    agree_on_sum_dtype(&mut engine)?;
    engine.backend.set_sum_dtype(engine.sum_dtype)?;
    Ok(engine)
}

/// The sum types, as [`agree_on_sum_dtype`] numbers them.
const SUM_DTYPES: [SumDType; 3] = [SumDType::F32, SumDType::BF16, SumDType::F16];

/// Gives every rank rank 0's sum type. The model, and so its type, is the same on every rank, but
/// `--reduce-dtype` may come from an environment that differs between hosts, and ranks sending
/// sums of different types could not add them.
fn agree_on_sum_dtype(engine: &mut DynEngine) -> anyhow::Result<()> {
    if engine.reduce.world() == 1 {
        return Ok(());
    }
    let mut code = [match engine.sum_dtype {
        SumDType::F32 => 0,
        SumDType::BF16 => 1,
        SumDType::F16 => 2,
    }];
    engine.reduce.broadcast_u32(&mut code)?;
    engine.sum_dtype = *SUM_DTYPES
        .get(code[0] as usize)
        .with_context(|| format!("rank 0 sums in an unknown type (code {})", code[0]))?;
    Ok(())
}

#[cfg(feature = "cuda")]
fn cuda_backend(
    spec: ModelSpec,
    weights: ModelWeights,
    group: Option<&Group>,
    opts: &EngineOptions,
) -> anyhow::Result<Box<dyn Backend>> {
    let mut b = crate::gpu_comm::cuda_backend(spec, weights, opts.positions, group, opts.gpu_comm)?;
    b.set_exec(opts.exec);
    Ok(Box::new(b))
}

/// GPU 0's memory bandwidth, GB/s, counting the bytes a copy reads and writes.
#[cfg(feature = "cuda")]
pub fn gpu_copy_gbps() -> anyhow::Result<f64> {
    Ok(shardline_cuda::device::copy_gbps(0)?)
}

#[cfg(not(feature = "cuda"))]
pub fn gpu_copy_gbps() -> anyhow::Result<f64> {
    Err(shardline_model::ModelError::NoCuda.into())
}

/// Without the `cuda` feature there is no GPU backend: one clear error, wherever one is asked for.
#[cfg(not(feature = "cuda"))]
fn cuda_backend(
    _spec: ModelSpec,
    _weights: ModelWeights,
    _group: Option<&Group>,
    _opts: &EngineOptions,
) -> anyhow::Result<Box<dyn Backend>> {
    Err(shardline_model::ModelError::NoCuda.into())
}

/// Time spent in the host's collectives, for benchmarks (shared with [`GroupReduce`]).
#[derive(Clone, Default)]
pub struct CommTime(Arc<AtomicU64>);

impl CommTime {
    /// Runs `f`, adding its time.
    pub fn add<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.0
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }

    /// Microseconds so far, and the counter reset.
    pub fn take_us(&self) -> f64 {
        self.0.swap(0, Ordering::Relaxed) as f64 / 1e3
    }
}
