//! The `shardline` command line.

use clap::{Parser, Subcommand};

/// Shardline: fast Mixture-of-Experts inference over processes, GPUs and machines.
#[derive(Parser)]
#[command(name = "shardline", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure kernels, communication or decode speed.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

mod bench;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(cmd) => bench::run(cmd),
    }
}
