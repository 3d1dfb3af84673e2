//! `shardline verify`: run a model on reference inputs and compare its logits and greedy choices
//! with the reference's (computed by transformers); exits non-zero unless they agree.

use std::path::PathBuf;

use anyhow::Context;
use shardline_model::{verify_dir, Device};

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The model directory (config.json, safetensors weights).
    #[arg(long, env = "SHARDLINE_MODEL")]
    model: PathBuf,
    /// The reference file (prompt_ids, prefill_logits, greedy_ids, decode_logits);
    /// default MODEL/reference.json.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Precision of rope's inverse frequencies: `f32`, as transformers computes them when it
    /// loads a model; `model-dtype` rounds them to the config's dtype, as in a reference computed
    /// from a model cast to bf16/f16 with its buffers (`model.to(dtype)`) and then upcast.
    #[arg(long, value_enum, default_value_t = RopeFreqs::F32)]
    rope_freqs: RopeFreqs,
    /// Where the model runs: cpu, or cuda (a build with `--features cuda`; activations stay f32,
    /// so the tolerances are the CPU's).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu, env = "SHARDLINE_DEVICE")]
    device: DeviceArg,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RopeFreqs {
    F32,
    ModelDtype,
}

pub fn run(args: VerifyArgs) -> anyhow::Result<()> {
    let rope_in_model_dtype = args.rope_freqs == RopeFreqs::ModelDtype;
    let device = match args.device {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::Cuda,
    };
    let r = verify_dir(
        &args.model,
        args.reference.as_deref(),
        rope_in_model_dtype,
        device,
    )
    .with_context(|| format!("cannot verify the model in {}", args.model.display()))?;
    println!(
        "{}: prefill max |diff| {:.3e} (position {}), decode max |diff| {:.3e} (step {}) (tolerance {:.0e} for {} weights); greedy {}/{} agree",
        args.model.display(),
        r.prefill_max_diff,
        r.prefill_worst_position,
        r.decode_max_diff,
        r.decode_worst_step,
        r.tolerance,
        r.weight_dtype,
        r.greedy_agree,
        r.greedy_total
    );
    if !r.passed() {
        anyhow::bail!("verify FAILED for {}", args.model.display());
    }
    println!("verify passed");
    Ok(())
}
