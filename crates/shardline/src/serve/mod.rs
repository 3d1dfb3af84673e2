//! `shardline serve`: an OpenAI-compatible HTTP server over the engine, batching the requests of
//! many clients into each step (continuous batching over a paged KV cache). Rank 0 serves HTTP on
//! its own async runtime and schedules; over several ranks the others run each step rank 0 plans.

pub mod batcher;
pub mod chat;
pub mod http;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use shardline_model::kv_pool::BLOCK_POSITIONS;
use shardline_model::scheduler::{Scheduler, SchedulerConfig};
use shardline_model::tokenizer::TextCodec;
use shardline_model::{Backend, Exec, Plan};

use crate::dist::{self, ParallelArgs, Role};
use crate::engine::{self, CommTime, DeviceArg, EngineOptions, KvDtypeArg, ModelArgs, Source};

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Where the model runs: cpu, or cuda (a build with the `cuda` feature; each step of the
    /// batch runs whole on the GPU).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu, env = "SHARDLINE_DEVICE")]
    device: DeviceArg,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The name `/v1/models` lists and requests may give as `model` (default: the model
    /// directory's name, or the preset's).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Positions of KV cache to share between the sequences (in blocks of 16).
    #[arg(long, default_value_t = 65536)]
    kv_positions: usize,
    /// What the KV cache holds: auto (bf16 on a GPU, f32 on the CPU), f32 or bf16 (GPU only).
    #[arg(long, value_enum, default_value_t = KvDtypeArg::Auto)]
    kv_dtype: KvDtypeArg,
    /// Sequences generating at once at most.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// Tokens one step runs at most (decode rows plus prompt chunks).
    #[arg(long, default_value_t = 256)]
    step_tokens: usize,
    /// Requests queued for the engine at most; past it, 503.
    #[arg(long, default_value_t = 256)]
    queue: usize,
    #[command(flatten)]
    parallel: ParallelArgs,
}

/// What the HTTP handlers share.
pub struct AppState {
    pub engine: batcher::EngineHandle,
    pub codec: TextCodec,
    pub model_name: String,
    /// The model's context: prompt + max_tokens may not exceed it.
    pub max_positions: usize,
    /// The model's vocabulary: token ids in a prompt are below it.
    pub vocab: usize,
    pub eos_ids: Vec<u32>,
    /// The chat template of `tokenizer_config.json`, when the model has one.
    pub chat: chat::ChatTemplate,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let source = args.model.source()?;
    let (plan, group) = match dist::role(&args.parallel)? {
        Role::Single => (Plan::single(), None),
        Role::Launcher => return dist::launch_local_checked(&args.parallel, &source.spec()?),
        Role::Rank { group, plan } => (plan, Some(group)),
    };
    let rank = group.as_ref().map_or(0, |g| g.rank());
    let (spec, weights, codec) = source.load(&plan, |_| {})?;
    let (max_positions, vocab, eos_ids) = (spec.max_positions, spec.vocab, spec.eos_ids.clone());
    let kv_blocks = args.kv_positions.div_ceil(BLOCK_POSITIONS);
    let opts = EngineOptions {
        device: args.device,
        exec: Exec::Split,
        positions: 1,
        gpu_comm: args.parallel.gpu_comm,
        reduce_dtype: args.parallel.reduce_dtype,
        comm_time: CommTime::default(),
    };
    let mut engine = engine::build(spec, weights, group.map(Arc::new), &opts)?;
    engine
        .backend
        .make_kv_pool(kv_blocks, args.kv_dtype.on(args.device))
        .context("cannot make the paged KV cache for serving")?;
    if rank != 0 {
        return batcher::follow(engine);
    }
    let scheduler = Scheduler::new(SchedulerConfig {
        kv_blocks,
        step_tokens: args.step_tokens,
        max_running: args.max_running.min(args.step_tokens),
        max_positions,
    });
    let stop = Arc::new(AtomicBool::new(false));
    let (handle, batcher) = batcher::start(scheduler, batcher::BatcherConfig { queue: args.queue });
    let chat = chat::ChatTemplate::for_source(&source)?;
    let model_name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| match &source {
            Source::Dir { dir: path, .. } | Source::Gguf { path, .. } => path
                .file_name()
                .map_or_else(|| source.name(), |n| n.to_string_lossy().into_owned()),
            _ => source.name(),
        });
    let state = Arc::new(AppState {
        engine: handle,
        codec,
        model_name,
        max_positions,
        vocab,
        eos_ids,
        chat,
    });
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("--host {} --port {}", args.host, args.port))?;
    // HTTP on a thread of its own (it sets `stop` when it is done, whatever happened there);
    // the engine here, on the thread that built it.
    let http = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("shardline-http".into())
            .spawn(move || http::serve(addr, state, stop))
            .context("cannot start the HTTP thread")?
    };
    let engine_result = batcher.run(engine, &stop);
    // An engine that failed stops the HTTP side too.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let served = http
        .join()
        .map_err(|_| anyhow::anyhow!("the HTTP thread panicked"))?;
    engine_result?;
    served
}
