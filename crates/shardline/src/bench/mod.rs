//! `shardline bench ...`: measurements written as JSON lines (DESIGN.md, "Benchmarks"). A bench
//! measures and reports; it never asserts.

pub mod kernels;
pub mod record;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// CPU kernels at model shapes, and the machine's memory read bandwidth.
    Kernels(kernels::KernelsArgs),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Kernels(args) => kernels::run(args),
    }
}
