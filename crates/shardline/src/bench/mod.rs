//! `shardline bench ...`: measurements written as JSON lines (keys in README.md, "Benchmarks",
//! and each bench's `--help`). A bench measures and reports; it never asserts.

pub mod comm;
pub mod decode;
pub mod kernels;
pub mod prefill;
pub mod record;
pub mod serve;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Decode step time through the engine, whole and per layer, and the layers' weight bandwidth
    /// (presets or a model directory).
    Decode(decode::DecodeArgs),
    /// Latency and bandwidth of shardline-comm collectives and send/recv (spawns its own ranks).
    ///
    /// `bytes` is the size of the whole buffer of the operation (as in nccl-tests): the
    /// all_reduce and broadcast buffer, the all_gather output, the reduce_scatter input, the
    /// all_to_all send buffer, or one send_recv message, whose time is half the round trip. Each
    /// iteration starts after a barrier and its time is the slowest rank's; `gbps` is bytes over
    /// the median time. Example: shardline bench comm --op all_reduce --transport shm --ranks 2
    /// --sizes 8192,16777216 --json comm.jsonl
    Comm(comm::CommArgs),
    /// CPU kernels at model shapes, and the machine's memory read bandwidth.
    Kernels(kernels::KernelsArgs),
    /// Prefill of a prompt chunk through the engine, all rows at once against token by token.
    Prefill(prefill::PrefillArgs),
    /// Load on an OpenAI-compatible server (`shardline serve`): streamed completions, N in
    /// flight; time to first token, inter-token latency, request latency and throughput.
    Serve(serve::ServeArgs),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Decode(args) => decode::run(args),
        BenchCommand::Comm(args) => comm::run(args),
        BenchCommand::Kernels(args) => kernels::run(args),
        BenchCommand::Prefill(args) => prefill::run(args),
        BenchCommand::Serve(args) => serve::run(args),
    }
}
