//! `shardline run`: generate text from a prompt, streaming it, then a line of timings.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use shardline_model::generate::generate;
use shardline_model::sampler::Sampler;
use shardline_model::tokenizer::TextCodec;
use shardline_model::{
    builtin_parts_for, builtin_spec, load_parts_for, load_tokenizer, Backend, CpuBackend, Engine,
    ModelSpec, Plan, Reduce, SingleRank,
};

use crate::dist::{self, GroupReduce, ParallelArgs, Role};
use crate::verify::DeviceArg;

#[derive(clap::Args)]
pub struct RunArgs {
    /// A model directory in the Hugging Face layout (config.json, model.safetensors or
    /// model.safetensors.index.json with its shards, tokenizer.json), e.g. one downloaded with
    /// `huggingface-cli download mistralai/Mixtral-8x7B-v0.1 --local-dir DIR`. Without it, a
    /// built-in small Mixtral-shaped model with deterministic random weights and a byte-level
    /// tokenizer runs (its text is gibberish, but it needs no download).
    #[arg(long, env = "SHARDLINE_MODEL")]
    model: Option<PathBuf>,
    /// The prompt text.
    #[arg(long, default_value = "The quick brown fox")]
    prompt: String,
    /// Stop after this many generated tokens (or earlier at the model's EOS token).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: sample among the most likely tokens holding this much probability.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler (the same seed gives the same text).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the model runs: cpu, or cuda (a build with `--features cuda`).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu, env = "SHARDLINE_DEVICE")]
    device: DeviceArg,
    #[command(flatten)]
    parallel: ParallelArgs,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let (plan, group) = match dist::role(&args.parallel)? {
        Role::Single => (Plan::single(), None),
        Role::Launcher => {
            let spec = match &args.model {
                Some(dir) => ModelSpec::from_file(&dir.join("config.json"))?,
                None => builtin_spec(),
            };
            return dist::launch_local_checked(&args.parallel, &spec);
        }
        Role::Rank { group, plan } => (plan, Some(group)),
    };
    let (spec, weights, codec) = match &args.model {
        Some(dir) => {
            let (spec, weights) = load_parts_for(dir, |_| {}, &plan)
                .with_context(|| format!("cannot load the model in {}", dir.display()))?;
            (spec, weights, load_tokenizer(dir)?)
        }
        None => {
            let (spec, weights) = builtin_parts_for(&plan)?;
            (spec, weights, TextCodec::Bytes)
        }
    };
    let prompt = codec.encode(&args.prompt)?;
    if prompt.is_empty() {
        anyhow::bail!("the prompt encodes to no tokens; give a non-empty --prompt");
    }
    match (args.device, group) {
        (DeviceArg::Cpu, None) => {
            let engine = Engine::new(CpuBackend::new(spec, weights, 0), SingleRank);
            stream(engine, &codec, &prompt, &args, true)
        }
        (DeviceArg::Cpu, Some(group)) => {
            // Every rank samples the same tokens from the same logits; rank 0 prints them.
            let print = group.rank() == 0;
            let engine = Engine::new(CpuBackend::new(spec, weights, 0), GroupReduce(group));
            stream(engine, &codec, &prompt, &args, print)
        }
        (DeviceArg::Cuda, group) => run_cuda(spec, weights, &codec, &prompt, &args, group),
    }
}

/// Generates on this rank's GPU; the segments' sums go through NCCL or the host (--gpu-comm).
#[cfg(feature = "cuda")]
fn run_cuda(
    spec: shardline_model::ModelSpec,
    weights: shardline_model::load::ModelWeights,
    codec: &TextCodec,
    prompt: &[u32],
    args: &RunArgs,
    group: Option<shardline_comm::Group>,
) -> anyhow::Result<()> {
    let positions = prompt.len() + args.max_tokens;
    let want = args.parallel.gpu_comm;
    let backend = crate::gpu_comm::cuda_backend(spec, weights, positions, group.as_ref(), want)?;
    match group {
        None => stream(Engine::new(backend, SingleRank), codec, prompt, args, true),
        Some(group) => {
            let print = group.rank() == 0;
            let engine = Engine::new(backend, GroupReduce(group));
            stream(engine, codec, prompt, args, print)
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(
    _spec: shardline_model::ModelSpec,
    _weights: shardline_model::load::ModelWeights,
    _codec: &TextCodec,
    _prompt: &[u32],
    _args: &RunArgs,
    _group: Option<shardline_comm::Group>,
) -> anyhow::Result<()> {
    anyhow::bail!("--device cuda needs a shardline built with `--features cuda`")
}

/// Generates from `prompt`, streaming the text to stdout (when `print`), then the timings.
fn stream<B: Backend, R: Reduce>(
    mut engine: Engine<B, R>,
    codec: &TextCodec,
    prompt: &[u32],
    args: &RunArgs,
    print: bool,
) -> anyhow::Result<()> {
    let eos = engine.backend.spec().eos_ids.clone();
    let mut sampler = Sampler::new(args.temperature, args.top_p, args.seed);
    let mut out: Box<dyn Write> = if print {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::io::sink())
    };
    write!(out, "{}", args.prompt)?;
    out.flush()?;
    let (_, t) = generate(
        &mut engine,
        codec,
        prompt,
        args.max_tokens,
        &mut sampler,
        &eos,
        |piece| {
            // A closed stdout only loses the streamed text; the error surfaces at the final write.
            let _ = write!(out, "{piece}").and_then(|_| out.flush());
        },
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "[prefill {} tokens: {:.1} ms | decode {} tokens: {:.2} ms/token, {:.1} tokens/s]",
        t.prompt_tokens,
        t.prefill_ms,
        t.generated,
        t.decode_ms_per_token,
        if t.decode_ms_per_token > 0.0 {
            1e3 / t.decode_ms_per_token
        } else {
            0.0
        }
    )?;
    Ok(())
}
