//! The `shardline` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Shardline: fast Mixture-of-Experts inference over processes, GPUs and machines.
#[derive(Parser)]
#[command(name = "shardline", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    verbosity: log::Verbosity,
}

#[derive(Subcommand)]
enum Command {
    /// Measure kernels, communication or decode speed.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Generate text with a model (the built-in demo model without --model).
    Run(run::RunArgs),
    /// Check a model against reference logits computed by transformers.
    Verify(verify::VerifyArgs),
    /// Start a command's ranks on several hosts over ssh.
    Launch(launch::LaunchArgs),
    /// Serve the model over an OpenAI-compatible HTTP API, batching many clients.
    Serve(serve::ServeArgs),
}

mod bench;
mod dist;
mod engine;
// Without the `cuda` feature only its tests use the choice and the id exchange.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod gpu_comm;
mod hub;
mod launch;
mod log;
mod run;
mod serve;
mod verify;

fn main() -> ExitCode {
    let cli = Cli::parse();
    log::init(cli.verbosity);
    let result = match cli.command {
        Command::Bench(cmd) => bench::run(cmd),
        Command::Run(args) => run::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Launch(args) => launch::run(args),
        Command::Serve(args) => serve::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::print_error(&e, cli.verbosity);
            ExitCode::FAILURE
        }
    }
}
