//! `shardline bench ...`: measurements written as JSON lines (DESIGN.md, "Benchmarks"). A bench
//! measures and reports; it never asserts.

pub mod record;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {}
}
