//! `shardline run`: generate text from a prompt, streaming it, then a line of timings.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use shardline_model::generate::generate;
use shardline_model::sampler::Sampler;
use shardline_model::tokenizer::TextCodec;
use shardline_model::{
    builtin_parts, load_parts, load_tokenizer, Backend, CpuBackend, Engine, SingleRank,
};

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
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let (spec, weights, codec) = match &args.model {
        Some(dir) => {
            let (spec, weights) = load_parts(dir, |_| {})
                .with_context(|| format!("cannot load the model in {}", dir.display()))?;
            (spec, weights, load_tokenizer(dir)?)
        }
        None => {
            let (spec, weights) = builtin_parts()?;
            (spec, weights, TextCodec::Bytes)
        }
    };
    let prompt = codec.encode(&args.prompt)?;
    if prompt.is_empty() {
        anyhow::bail!("the prompt encodes to no tokens; give a non-empty --prompt");
    }
    match args.device {
        DeviceArg::Cpu => {
            let engine = Engine::new(CpuBackend::new(spec, weights, 0), SingleRank);
            stream(engine, &codec, &prompt, &args)
        }
        DeviceArg::Cuda => run_cuda(spec, weights, &codec, &prompt, &args),
    }
}

#[cfg(feature = "cuda")]
fn run_cuda(
    spec: shardline_model::ModelSpec,
    weights: shardline_model::load::ModelWeights,
    codec: &TextCodec,
    prompt: &[u32],
    args: &RunArgs,
) -> anyhow::Result<()> {
    let positions = prompt.len() + args.max_tokens;
    let backend = shardline_model::cuda::CudaBackend::new(spec, weights, 0, positions)?;
    stream(Engine::new(backend, SingleRank), codec, prompt, args)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(
    _spec: shardline_model::ModelSpec,
    _weights: shardline_model::load::ModelWeights,
    _codec: &TextCodec,
    _prompt: &[u32],
    _args: &RunArgs,
) -> anyhow::Result<()> {
    anyhow::bail!("--device cuda needs a shardline built with `--features cuda`")
}

/// Generates from `prompt`, streaming the text to stdout, then prints the timings.
fn stream<B: Backend>(
    mut engine: Engine<B, SingleRank>,
    codec: &TextCodec,
    prompt: &[u32],
    args: &RunArgs,
) -> anyhow::Result<()> {
    let eos = engine.backend.spec().eos_ids.clone();
    let mut sampler = Sampler::new(args.temperature, args.top_p, args.seed);
    let mut out = std::io::stdout().lock();
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
