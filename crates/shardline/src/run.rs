//! `shardline run`: generate text from a prompt, streaming it, then a line of timings.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use shardline_model::generate::generate;
use shardline_model::sampler::Sampler;
use shardline_model::{Exec, Plan};

use crate::dist::{self, ParallelArgs, Role};
use crate::engine::{self, CommTime, DeviceArg, DynEngine, EngineOptions, ModelArgs};

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
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
    /// Also write the timings as a JSON object to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    parallel: ParallelArgs,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let source = args.model.source()?;
    let (plan, group) = match dist::role(&args.parallel)? {
        Role::Single => (Plan::single(), None),
        Role::Launcher => return dist::launch_local_checked(&args.parallel, &source.spec()?),
        Role::Rank { group, plan } => (plan, Some(group)),
    };
    let (spec, weights, codec) = source.load(&plan, |_| {})?;
    let prompt = codec.encode(&args.prompt)?;
    if prompt.is_empty() {
        anyhow::bail!("the prompt encodes to no tokens; give a non-empty --prompt");
    }
    // Every rank samples the same tokens from the same logits; rank 0 prints them.
    let print = group.as_ref().is_none_or(|g| g.rank() == 0);
    let opts = EngineOptions {
        device: args.device,
        exec: Exec::Split,
        positions: prompt.len() + args.max_tokens,
        gpu_comm: args.parallel.gpu_comm,
        comm_time: CommTime::default(),
    };
    let engine = engine::build(spec, weights, group.map(Arc::new), &opts)?;
    stream(engine, &codec, &prompt, &args, print)
}

/// Generates from `prompt`, streaming the text to stdout (when `print`), then the timings to
/// stderr (and to `--json`).
fn stream(
    mut engine: DynEngine,
    codec: &shardline_model::tokenizer::TextCodec,
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
    if !print {
        return Ok(());
    }
    let tokens_per_s = if t.decode_ms_per_token > 0.0 {
        1e3 / t.decode_ms_per_token
    } else {
        0.0
    };
    eprintln!(
        "[prefill {} tokens: {:.1} ms | decode {} tokens: {:.2} ms/token, {:.1} tokens/s]",
        t.prompt_tokens, t.prefill_ms, t.generated, t.decode_ms_per_token, tokens_per_s
    );
    if let Some(path) = &args.json {
        let record = serde_json::json!({
            "bench": "run",
            "device": match args.device { DeviceArg::Cpu => "cpu", DeviceArg::Cuda => "cuda" },
            "prompt_tokens": t.prompt_tokens,
            "prefill_ms": t.prefill_ms,
            "generated": t.generated,
            "decode_ms_per_token": t.decode_ms_per_token,
            "tokens_per_s": tokens_per_s,
        });
        std::fs::write(path, format!("{record}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
