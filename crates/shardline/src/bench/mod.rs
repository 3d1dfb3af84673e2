//! `shardline bench ...`: measurements written as JSON lines (DESIGN.md, "Benchmarks"). A bench
//! measures and reports; it never asserts.

#[cfg(feature = "cuda")]
pub mod decode_cuda;
pub mod record;

use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Decode-layer time on the GPU (temporary entry until `bench decode` takes --device).
    #[cfg(feature = "cuda")]
    DecodeGpu(DecodeGpuArgs),
}

#[derive(Args)]
pub struct DecodeGpuArgs {
    #[arg(long, default_value = "mixtral-8x7b")]
    preset: String,
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long, default_value_t = 1)]
    layers: usize,
    #[arg(long, default_value_t = 128)]
    kv_len: usize,
    #[arg(long, default_value_t = 200)]
    iters: usize,
    #[arg(long, default_value = "split")]
    exec: String,
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        #[cfg(feature = "cuda")]
        BenchCommand::DecodeGpu(a) => {
            let dev = shardline_cuda::CudaDevice::open(0)?;
            let mut sink = record::Sink::new(a.json.as_deref())?;
            for preset in a.preset.split(',') {
                for exec in a.exec.split(',') {
                    let exec = match exec {
                        "split" => shardline_cuda::ExecMode::Split,
                        "per-op" => shardline_cuda::ExecMode::PerOp,
                        o => anyhow::bail!("unknown --exec {o}"),
                    };
                    let case = decode_cuda::CudaDecodeCase {
                        preset,
                        dtype: a.dtype.parse()?,
                        layers: a.layers,
                        kv_len: a.kv_len,
                        iters: a.iters,
                        exec,
                    };
                    decode_cuda::run_case(&dev, &case, &mut sink)?;
                }
            }
            Ok(())
        }
    }
}
