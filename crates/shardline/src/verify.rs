//! `shardline verify`: run a model on reference inputs and compare its logits and greedy choices
//! with the reference's (computed by transformers); exits non-zero unless they agree.

use std::path::PathBuf;

use anyhow::Context;
use shardline_model::{
    load_parts_for, verify, verify_dir, CpuBackend, Device, Engine, Plan, Reference, SingleRank,
    VerifyReport,
};

use crate::dist::{self, GroupReduce, ParallelArgs, Role};

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
    #[command(flatten)]
    parallel: ParallelArgs,
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
    let context = || format!("cannot verify the model in {}", args.model.display());
    let role = match dist::role(&args.parallel)? {
        // One rank on the GPU goes the ranks' way, which can form a one-rank NCCL communicator.
        Role::Single if device == Device::Cuda => Some((None, Plan::single())),
        Role::Single => None,
        Role::Launcher => {
            let spec = shardline_model::ModelSpec::from_file(&args.model.join("config.json"))?;
            return dist::launch_local_checked(&args.parallel, &spec);
        }
        Role::Rank { group, plan } => Some((Some(group), plan)),
    };
    let r = match role {
        None => verify_dir(
            &args.model,
            args.reference.as_deref(),
            rope_in_model_dtype,
            device,
        )
        .with_context(context)?,
        Some((group, plan)) => {
            let adjust = |spec: &mut shardline_model::ModelSpec| {
                if rope_in_model_dtype {
                    spec.rope_freq_dtype = spec.dtype.unwrap_or(shardline_tensor::DType::F32);
                }
            };
            let (spec, weights) =
                load_parts_for(&args.model, adjust, &plan).with_context(context)?;
            let path = args
                .reference
                .clone()
                .unwrap_or_else(|| args.model.join("reference.json"));
            let reference = Reference::from_file(&path, spec.vocab)?;
            let rank = group.as_ref().map_or(0, |g| g.rank());
            let r: VerifyReport = match (device, group) {
                (Device::Cpu, Some(group)) => {
                    let backend = CpuBackend::new(spec, weights, 0);
                    verify(&mut Engine::new(backend, GroupReduce(group)), &reference)
                        .map_err(anyhow::Error::from)
                }
                (Device::Cpu, None) => {
                    let backend = CpuBackend::new(spec, weights, 0);
                    verify(&mut Engine::new(backend, SingleRank), &reference)
                        .map_err(anyhow::Error::from)
                }
                (Device::Cuda, group) => {
                    let want = args.parallel.gpu_comm;
                    verify_rank_on_gpu(spec, weights, group, &reference, want)
                }
            }
            .with_context(context)?;
            if rank != 0 {
                // Rank 0 reports; every rank fails on its own if its logits disagree.
                anyhow::ensure!(r.passed(), "verify FAILED on rank {rank}");
                return Ok(());
            }
            r
        }
    };
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
        let hint = if r.weight_dtype != shardline_tensor::DType::F32 && !rope_in_model_dtype {
            " (if the reference came from a model cast with `.to(dtype)`, its rope frequencies \
             were rounded too: try --rope-freqs model-dtype)"
        } else {
            ""
        };
        anyhow::bail!("verify FAILED for {}{hint}", args.model.display());
    }
    println!("verify passed");
    Ok(())
}

/// One rank's verify on its GPU (the only rank when `group` is `None`); the segments' sums go
/// through NCCL or the host as `want` and the placement decide.
#[cfg(feature = "cuda")]
fn verify_rank_on_gpu(
    spec: shardline_model::ModelSpec,
    weights: shardline_model::load::ModelWeights,
    group: Option<shardline_comm::Group>,
    reference: &Reference,
    want: crate::gpu_comm::GpuComm,
) -> anyhow::Result<VerifyReport> {
    let positions = reference.prompt_ids.len() + reference.decode_logits.len();
    let backend = crate::gpu_comm::cuda_backend(spec, weights, positions, group.as_ref(), want)?;
    Ok(match group {
        None => verify(&mut Engine::new(backend, SingleRank), reference)?,
        Some(group) => verify(&mut Engine::new(backend, GroupReduce(group)), reference)?,
    })
}

#[cfg(not(feature = "cuda"))]
fn verify_rank_on_gpu(
    _spec: shardline_model::ModelSpec,
    _weights: shardline_model::load::ModelWeights,
    _group: Option<shardline_comm::Group>,
    _reference: &Reference,
    _want: crate::gpu_comm::GpuComm,
) -> anyhow::Result<VerifyReport> {
    anyhow::bail!("--device cuda needs a shardline built with `--features cuda`")
}
