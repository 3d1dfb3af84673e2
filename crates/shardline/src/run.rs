//! `shardline run`: generate text from a prompt, streaming it, then a line of timings.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use shardline_model::generate::generate;
use shardline_model::load::ModelWeights;
use shardline_model::sampler::Sampler;
use shardline_model::tokenizer::TextCodec;
use shardline_model::{Exec, ModelSpec, Plan};

use crate::dist::{self, ParallelArgs, Role};
use crate::engine::{self, CommTime, DeviceArg, DynEngine, EngineOptions, ModelArgs, Source};
use crate::serve::chat::{ChatTemplate, Message};

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text; `-` reads it from stdin.
    #[arg(short = 'p', long, default_value = "The quick brown fox")]
    prompt: String,
    /// Read the prompt from this file instead.
    #[arg(long, conflicts_with = "prompt")]
    prompt_file: Option<PathBuf>,
    /// Stop after this many generated tokens (or earlier at the model's EOS token).
    #[arg(short = 'n', long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Nucleus sampling: sample among the most likely tokens holding this much probability.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
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
    /// Chat in the terminal instead: each line read from stdin is a user message, answered
    /// with the whole conversation rendered by the model's chat template (as `serve` renders
    /// it); an empty line or end of input ends the chat. One rank.
    #[arg(long, conflicts_with = "prompt")]
    chat: bool,
    #[command(flatten)]
    parallel: ParallelArgs,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    // Settings are checked before any weight is read.
    let sampler = Sampler::checked(args.temperature, args.top_p, args.seed)?;
    let source = args.model.source()?;
    let (plan, group) = match dist::role(&args.parallel)? {
        Role::Single => (Plan::single(), None),
        Role::Launcher => return dist::launch_local_checked(&args.parallel, &source.spec()?),
        Role::Rank { group, plan } => (plan, Some(group)),
    };
    if args.chat {
        anyhow::ensure!(
            group.is_none(),
            "run --chat runs on one rank; `serve` splits a model over ranks"
        );
        let (spec, weights, codec) = source.load(&plan, |_| {})?;
        return chat(spec, weights, codec, &source, sampler, &args);
    }
    let text = prompt_text(&args)?;
    let (spec, weights, codec) = source.load(&plan, |_| {})?;
    let prompt = codec.encode(&text)?;
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
        reduce_dtype: args.parallel.reduce_dtype,
        comm_time: CommTime::default(),
    };
    let engine = engine::build(spec, weights, group.map(Arc::new), &opts)?;
    stream(engine, &codec, &prompt, sampler, &args, print)
}

/// The prompt: `--prompt`, stdin for `-p -`, or `--prompt-file`.
fn prompt_text(args: &RunArgs) -> anyhow::Result<String> {
    if let Some(path) = &args.prompt_file {
        return std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the prompt file {}", path.display()));
    }
    if args.prompt == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("cannot read the prompt from stdin")?;
        return Ok(text);
    }
    Ok(args.prompt.clone())
}

/// Positions a terminal chat holds at most (the KV cache is sized for them up front on a GPU).
const CHAT_POSITIONS: usize = 8192;

/// The terminal chat of `run --chat`: the conversation so far is rendered and run again for
/// each user message (the engine's cache holds one sequence), the reply streamed to stdout.
fn chat(
    spec: ModelSpec,
    weights: ModelWeights,
    codec: TextCodec,
    source: &Source,
    mut sampler: Sampler,
    args: &RunArgs,
) -> anyhow::Result<()> {
    let template = ChatTemplate::for_source(source)?;
    let eos = spec.eos_ids.clone();
    let positions = spec.max_positions.min(CHAT_POSITIONS);
    let opts = EngineOptions {
        device: args.device,
        exec: Exec::Split,
        positions,
        gpu_comm: args.parallel.gpu_comm,
        reduce_dtype: args.parallel.reduce_dtype,
        comm_time: CommTime::default(),
    };
    let mut engine = engine::build(spec, weights, None, &opts)?;
    let mut messages: Vec<Message> = Vec::new();
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lines() {
        let line = line.context("cannot read the chat from stdin")?;
        if line.trim().is_empty() {
            break;
        }
        messages.push(Message {
            role: "user".into(),
            content: line,
        });
        let text = template
            .render(&messages, true)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let prompt = codec.encode_rendered(&text)?;
        let room = positions.saturating_sub(prompt.len());
        anyhow::ensure!(
            room > 0,
            "the conversation ({} tokens) fills the model's context of {positions}",
            prompt.len()
        );
        let (ids, _) = generate(
            &mut engine,
            &codec,
            &prompt,
            args.max_tokens.min(room),
            &mut sampler,
            &eos,
            |piece| {
                let _ = write!(out, "{piece}").and_then(|_| out.flush());
            },
        )?;
        writeln!(out)?;
        messages.push(Message {
            role: "assistant".into(),
            content: codec.decode(&ids)?,
        });
    }
    Ok(())
}

/// Generates from `prompt`, streaming the text to stdout (when `print`), then the timings to
/// stderr (and to `--json`).
fn stream(
    mut engine: DynEngine,
    codec: &TextCodec,
    prompt: &[u32],
    mut sampler: Sampler,
    args: &RunArgs,
    print: bool,
) -> anyhow::Result<()> {
    let eos = engine.backend.spec().eos_ids.clone();
    let mut out: Box<dyn Write> = if print {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::io::sink())
    };
    write!(out, "{}", codec.decode(prompt)?)?;
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
    tracing::info!(
        "[prefill {} tokens: {:.1} ms | decode {} tokens: {:.2} ms/token, {:.1} tokens/s]",
        t.prompt_tokens,
        t.prefill_ms,
        t.generated,
        t.decode_ms_per_token,
        tokens_per_s
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
