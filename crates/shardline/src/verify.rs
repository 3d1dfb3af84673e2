//! `shardline verify`: run a model on reference inputs and compare its logits and greedy choices
//! with the reference's (computed by transformers); exits non-zero unless they agree.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use shardline_model::{verify, Exec, Plan, Reference};

use crate::dist::{self, ParallelArgs, Role};
use crate::engine::{self, CommTime, DeviceArg, EngineOptions, Source};

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The model directory (config.json, safetensors weights), or a GGUF file.
    #[arg(short = 'm', long, env = "SHARDLINE_MODEL")]
    model: PathBuf,
    /// The reference file (prompt_ids, prefill_logits, greedy_ids, decode_logits);
    /// default MODEL/reference.json (beside a GGUF file).
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Quantize the model's float weights while loading (q8_0 or q4_k), as `run --quantize`
    /// does; the tolerance is then the quantized one.
    #[arg(long, value_parser = engine::parse_quantize)]
    quantize: Option<shardline_tensor::quant::QuantFormat>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
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
pub enum RopeFreqs {
    F32,
    ModelDtype,
}

pub fn run(args: VerifyArgs) -> anyhow::Result<()> {
    let rope_in_model_dtype = args.rope_freqs == RopeFreqs::ModelDtype;
    let context = || format!("cannot verify the model in {}", args.model.display());
    let gguf = shardline_model::gguf::is_gguf(&args.model);
    anyhow::ensure!(
        !(gguf && args.quantize.is_some()),
        "--quantize applies to float weights; {} is a GGUF file, already in its format",
        args.model.display()
    );
    let source = if gguf {
        Source::Gguf {
            path: args.model.clone(),
            layers: None,
        }
    } else {
        Source::Dir {
            dir: args.model.clone(),
            layers: None,
            quantize: args.quantize,
        }
    };
    let (plan, group) = match dist::role(&args.parallel)? {
        Role::Single => (Plan::single(), None),
        Role::Launcher => return dist::launch_local_checked(&args.parallel, &source.spec()?),
        Role::Rank { group, plan } => (plan, Some(group)),
    };
    let rank = group.as_ref().map_or(0, |g| g.rank());
    let adjust = |spec: &mut shardline_model::ModelSpec| {
        if rope_in_model_dtype {
            spec.rope_freq_dtype = spec.dtype.unwrap_or(shardline_tensor::DType::F32);
        }
    };
    let (spec, weights, _) = source.load(&plan, adjust).with_context(context)?;
    let path = args.reference.clone().unwrap_or_else(|| {
        let dir = if gguf {
            args.model.parent().unwrap_or(std::path::Path::new("."))
        } else {
            &args.model
        };
        dir.join("reference.json")
    });
    let reference = Reference::from_file(&path, spec.vocab)?;
    let opts = EngineOptions {
        device: args.device,
        exec: Exec::Split,
        positions: reference.prompt_ids.len() + reference.decode_logits.len(),
        gpu_comm: args.parallel.gpu_comm,
        reduce_dtype: args.parallel.reduce_dtype,
        comm_time: CommTime::default(),
    };
    let mut engine =
        engine::build(spec, weights, group.map(Arc::new), &opts).with_context(context)?;
    let r = verify(&mut engine, &reference).with_context(context)?;
    if rank != 0 {
        // Rank 0 reports; every rank fails on its own if its logits disagree.
        anyhow::ensure!(r.passed(), "verify FAILED on rank {rank}");
        return Ok(());
    }
    println!(
        "{}: prefill max |diff| {:.3e} (position {}), decode max |diff| {:.3e} (step {}) (tolerance {:.1e} for {} weights, {} sums); greedy {}/{} agree",
        args.model.display(),
        r.prefill_max_diff,
        r.prefill_worst_position,
        r.decode_max_diff,
        r.decode_worst_step,
        r.tolerance,
        r.weight_dtype,
        r.sum_dtype.name(),
        r.greedy_agree,
        r.greedy_total
    );
    if let Some(json) = &args.json {
        let record = serde_json::json!({
            "model": args.model.display().to_string(),
            "passed": r.passed(),
            "prefill_max_diff": r.prefill_max_diff,
            "decode_max_diff": r.decode_max_diff,
            "tolerance": r.tolerance,
            "weight_dtype": r.weight_dtype.name(),
            "sum_dtype": r.sum_dtype.name(),
            "greedy_agree": r.greedy_agree,
            "greedy_total": r.greedy_total,
        });
        std::fs::write(json, format!("{record}\n"))
            .with_context(|| format!("cannot write {}", json.display()))?;
    }
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
