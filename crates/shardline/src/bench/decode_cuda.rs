//! `bench decode --device cuda`: one decode step through preset-shaped layers with random weights
//! on the GPU, timed with CUDA events, in split (one graph per step) or per-op mode. Over several
//! ranks (`--tp`, `--ep`, one GPU each) each rank holds its slices and NCCL sums each segment on
//! the GPUs: inside the step's graph where the capture takes it, else between per-segment graphs.

use anyhow::Context;
use cudarc::driver::sys::CUevent_flags;
use serde_json::{json, Map, Value};
use shardline_comm::{Group, ReduceOp};
use shardline_cuda::nccl::DeviceComm;
use shardline_cuda::{ops, CudaDevice, DeviceLayer, ExecMode, FfnShape, LayerShape, LayerStack};
use shardline_model::cuda::layer_shape;
use shardline_model::{ModelSpec, Plan};
use shardline_tensor::DType;

use super::record::{Sink, Stats};

/// The GPU FFN shape of this rank's slice of a preset's (MoE) layers, and the experts it holds
/// (`None`: all of them).
fn ffn_shape(spec: &ModelSpec, plan: &Plan) -> anyhow::Result<(FfnShape, Option<Vec<usize>>)> {
    let moe = spec
        .moe
        .as_ref()
        .context("the GPU decode bench runs MoE presets")?;
    let n = moe.n_experts;
    let held: Vec<usize> = (0..n).filter(|&e| plan.holds_expert(e, n)).collect();
    let ffn = FfnShape::Moe {
        n_experts: n,
        top_k: moe.top_k,
        intermediate: plan.expert_rows(moe.intermediate).len(),
        renormalize: moe.renormalize,
        shared_intermediate: moe.shared_intermediate.map(|si| plan.dense_rows(si).len()),
    };
    Ok((ffn, (held.len() < n).then_some(held)))
}

/// The attention geometry of this rank's heads.
fn rank_shape(spec: &ModelSpec, plan: &Plan, capacity: usize) -> LayerShape {
    let mut shape = layer_shape(spec, capacity);
    shape.n_heads = plan.heads(spec.n_heads).len();
    shape.n_kv_heads = plan.kv_heads(spec.n_kv_heads).len();
    shape
}

/// Layers to cycle through so that one step reads at least this many weight bytes: the H100's
/// 50 MB L2 must not hold a step's weights between iterations.
const MIN_BYTES_PER_STEP: u64 = 256 << 20;

pub struct CudaDecodeCase<'a> {
    pub preset: &'a str,
    pub spec: &'a ModelSpec,
    pub layers: usize,
    pub kv_len: usize,
    pub iters: usize,
    pub exec: ExecMode,
    pub plan: Plan,
    /// The job's ranks (`None`: this process alone).
    pub group: Option<&'a Group>,
}

/// Runs one case (a collective over the case's ranks, which sum each segment through `comm`) and
/// writes its record on rank 0.
pub fn run_case(
    dev: &CudaDevice,
    case: &CudaDecodeCase,
    comm: Option<DeviceComm>,
    sink: &mut Sink,
) -> anyhow::Result<()> {
    let shape = rank_shape(case.spec, &case.plan, case.kv_len + 1);
    let (ffn, held) = ffn_shape(case.spec, &case.plan)?;
    let dtype = case.spec.dtype.unwrap_or(DType::BF16);
    let per_layer = shape.weight_bytes_read(&ffn, dtype);
    let layers = case
        .layers
        .max(MIN_BYTES_PER_STEP.div_ceil(per_layer) as usize);
    let dev_layers = (0..layers)
        .map(|l| {
            let seed = 0x5EED + l as u32 + ((case.plan.rank() as u32) << 16);
            DeviceLayer::random_held(dev, &shape, &ffn, dtype, seed, held.as_deref())
        })
        .collect::<Result<Vec<_>, _>>()
        .context("building the random layers on the GPU")?;
    let mut stack = LayerStack::new(dev, shape.clone(), dev_layers)?;
    if let Some(comm) = comm {
        stack.set_comm(dev, comm)?;
    }

    // A pool of inputs so that the routing, and so the experts read, vary between iterations.
    const POOL: usize = 16;
    let inputs = dev.zeros::<f32>(POOL * shape.hidden)?;
    let inputs_ptr = shardline_cuda::device::dptr(dev, &inputs);
    ops::fill_uniform(
        dev,
        inputs_ptr,
        POOL * shape.hidden,
        DType::F32,
        0xABCD,
        1.0,
    )?;
    stack.set_position(dev, case.kv_len)?;

    let stream = dev.stream();
    let warmup = 10;
    let mut samples = Vec::with_capacity(case.iters);
    for it in 0..warmup + case.iters {
        let slot = it % POOL;
        let input = inputs.slice(slot * shape.hidden..(slot + 1) * shape.hidden);
        stack.copy_hidden_from(dev, &input)?;
        if let Some(g) = case.group {
            dev.synchronize()?;
            g.barrier()?;
        }
        let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        stack.step(dev, case.exec)?;
        let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        stack.wait_comm(dev)?;
        dev.synchronize()?;
        if it >= warmup {
            samples.push(start.elapsed_ms(&end)? as f64 * 1000.0 / layers as f64);
        }
    }
    // The last step's kernel timeline, for kernels built with the probe (docs/cuda-notes.md).
    if let Some(path) = std::env::var_os("SHARDLINE_TIMELINE_OUT") {
        std::fs::write(&path, dev.timeline()?)
            .with_context(|| format!("writing the timeline to {}", path.to_string_lossy()))?;
    }
    let comm_in_graph = stack.comm_in_graph();
    if case.exec == ExecMode::PerOp {
        let print = case.group.is_none_or(|g| g.rank() == 0);
        print_op_breakdown(dev, &mut stack, &inputs, layers, print)?;
    }
    let mut comm_us = [comm_us_per_layer(dev, case.group, &stack, case.iters)? as f32];
    // An iteration takes as long as its slowest rank; rank 0 reports.
    if let Some(g) = case.group {
        let mut s32: Vec<f32> = samples.iter().map(|&v| v as f32).collect();
        g.all_reduce(&mut s32, ReduceOp::Max)?;
        g.all_reduce(&mut comm_us, ReduceOp::Max)?;
        if g.rank() != 0 {
            return Ok(());
        }
        samples = s32.iter().map(|&v| v as f64).collect();
    }
    let stats = Stats::from_samples(&mut samples);
    let gbps = per_layer as f64 / (stats.median_us * 1e-6) / 1e9;
    let fields: Map<String, Value> = json!({
        "model": case.preset,
        "device": "cuda",
        "device_name": dev.name(),
        "dtype": dtype.name(),
        "tp": case.plan.world(),
        "ep": case.plan.ep(),
        "exec": case.exec.name(),
        "layers": case.layers,
        "layer_copies": layers,
        "kv_len": case.kv_len,
        "weight_bytes_per_layer": per_layer,
        "gbps": (gbps * 10.0).round() / 10.0,
        "comm": if stack.comm().is_some() { "nccl" } else { "none" },
        "comm_in_graph": comm_in_graph,
        "comm_us_per_layer": (comm_us[0] as f64 * 100.0).round() / 100.0,
    })
    .as_object()
    .cloned()
    .unwrap_or_default();
    sink.write("decode", stats, fields)
}

/// The median device time of a layer's two NCCL all-reduces of the hidden state, timed alone
/// with events (after a barrier, as in the step), or 0 without a communicator.
fn comm_us_per_layer(
    dev: &CudaDevice,
    group: Option<&Group>,
    stack: &LayerStack,
    iters: usize,
) -> anyhow::Result<f64> {
    let Some(comm) = stack.comm() else {
        return Ok(0.0);
    };
    let mut buf = dev.zeros::<f32>(stack.shape().hidden)?;
    let stream = dev.stream();
    let mut samples = Vec::with_capacity(iters);
    for it in 0..10 + iters {
        if let Some(g) = group {
            dev.synchronize()?;
            g.barrier()?;
        }
        let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        comm.all_reduce_sum(dev, &mut buf)?;
        comm.all_reduce_sum(dev, &mut buf)?;
        let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        comm.wait(dev)?;
        dev.synchronize()?;
        if it >= 10 {
            samples.push(start.elapsed_ms(&end)? as f64 * 1000.0);
        }
    }
    Ok(Stats::from_samples(&mut samples).median_us)
}

/// Prints (to stderr, when `print`) each op's mean device time per layer over a few op-by-op steps.
fn print_op_breakdown(
    dev: &CudaDevice,
    stack: &mut LayerStack,
    inputs: &cudarc::driver::CudaSlice<f32>,
    layers: usize,
    print: bool,
) -> anyhow::Result<()> {
    const RUNS: usize = 20;
    let hidden = stack.shape().hidden;
    let mut totals: Vec<(&'static str, f64)> = Vec::new();
    for r in 0..RUNS {
        let slot = r % (inputs.len() / hidden);
        stack.copy_hidden_from(dev, &inputs.slice(slot * hidden..(slot + 1) * hidden))?;
        for (op, us) in stack.profile_step(dev)? {
            match totals.iter_mut().find(|(name, _)| *name == op) {
                Some(t) => t.1 += us,
                None => totals.push((op, us)),
            }
        }
    }
    let scale = 1.0 / (RUNS * layers) as f64;
    let line: Vec<String> = totals
        .iter()
        .map(|(op, us)| format!("{op} {:.1}", us * scale))
        .collect();
    if print {
        eprintln!("per-op device us per layer: {}", line.join(", "));
    }
    Ok(())
}
