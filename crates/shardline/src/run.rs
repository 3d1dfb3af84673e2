//! `shardline run`: generate text from a prompt, streaming it, then a line of timings.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use shardline_model::generate::generate;
use shardline_model::sampler::Sampler;
use shardline_model::tokenizer::TextCodec;
use shardline_model::{builtin, load_dir, load_tokenizer, Backend};

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
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let (mut engine, codec) = match &args.model {
        Some(dir) => {
            let engine = load_dir(dir)
                .with_context(|| format!("cannot load the model in {}", dir.display()))?;
            (engine, load_tokenizer(dir)?)
        }
        None => (builtin()?, TextCodec::Bytes),
    };
    let prompt = codec.encode(&args.prompt)?;
    if prompt.is_empty() {
        anyhow::bail!("the prompt encodes to no tokens; give a non-empty --prompt");
    }
    let eos = engine.backend.spec().eos_ids.clone();
    let mut sampler = Sampler::new(args.temperature, args.top_p, args.seed);
    let mut out = std::io::stdout().lock();
    write!(out, "{}", args.prompt)?;
    out.flush()?;
    let (_, t) = generate(
        &mut engine,
        &codec,
        &prompt,
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
