//! `shardline bench ...`: measurements written as JSON lines (DESIGN.md, "Benchmarks"). A bench
//! measures and reports; it never asserts.

pub mod comm;
pub mod record;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Latency and bandwidth of shardline-comm collectives and send/recv (spawns its own ranks).
    Comm(comm::CommArgs),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Comm(args) => comm::run(args),
    }
}
