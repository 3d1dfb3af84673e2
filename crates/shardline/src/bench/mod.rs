//! `shardline bench ...`: measurements written as JSON lines (DESIGN.md, "Benchmarks"). A bench
//! measures and reports; it never asserts.

pub mod decode;
#[cfg(feature = "cuda")]
pub mod decode_cuda;
pub mod record;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Per-layer decode time and weight bandwidth of one MoE layer (presets or a model directory).
    Decode(decode::DecodeArgs),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Decode(args) => decode::run(args),
    }
}
