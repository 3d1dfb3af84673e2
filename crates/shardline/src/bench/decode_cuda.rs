//! `bench decode --device cuda`: one decode step through preset-shaped layers with random weights
//! on the GPU, timed with CUDA events, in split (graph per segment) or per-op mode.

use anyhow::Context;
use cudarc::driver::sys::CUevent_flags;
use serde_json::{json, Map, Value};
use shardline_cuda::{ops, CudaDevice, DeviceLayer, ExecMode, FfnShape, LayerStack};
use shardline_model::cuda::layer_shape;
use shardline_model::ModelSpec;
use shardline_tensor::DType;

use super::record::{Sink, Stats};

/// The GPU FFN shape of a preset's (MoE) layers.
fn ffn_shape(spec: &ModelSpec) -> anyhow::Result<FfnShape> {
    let moe = spec
        .moe
        .as_ref()
        .context("the GPU decode bench runs MoE presets")?;
    Ok(FfnShape::Moe {
        n_experts: moe.n_experts,
        top_k: moe.top_k,
        intermediate: moe.intermediate,
        renormalize: moe.renormalize,
        shared_intermediate: moe.shared_intermediate,
    })
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
}

/// Runs one case and writes its record.
pub fn run_case(dev: &CudaDevice, case: &CudaDecodeCase, sink: &mut Sink) -> anyhow::Result<()> {
    let shape = layer_shape(case.spec, case.kv_len + 1);
    let ffn = ffn_shape(case.spec)?;
    let dtype = case.spec.dtype.unwrap_or(DType::BF16);
    let per_layer = shape.weight_bytes_read(&ffn, dtype);
    let layers = case
        .layers
        .max(MIN_BYTES_PER_STEP.div_ceil(per_layer) as usize);
    let dev_layers = (0..layers)
        .map(|l| DeviceLayer::random(dev, &shape, &ffn, dtype, 0x5EED + l as u32))
        .collect::<Result<Vec<_>, _>>()
        .context("building the random layers on the GPU")?;
    let mut stack = LayerStack::new(dev, shape.clone(), dev_layers)?;

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
        let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        stack.step(dev, case.exec)?;
        let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        dev.synchronize()?;
        if it >= warmup {
            samples.push(start.elapsed_ms(&end)? as f64 * 1000.0 / layers as f64);
        }
    }
    let stats = Stats::from_samples(&mut samples);
    if case.exec == ExecMode::PerOp {
        print_op_breakdown(dev, &mut stack, &inputs, layers)?;
    }
    let gbps = per_layer as f64 / (stats.median_us * 1e-6) / 1e9;
    let fields: Map<String, Value> = json!({
        "model": case.preset,
        "device": "cuda",
        "device_name": dev.name(),
        "dtype": dtype.name(),
        "tp": 1,
        "ep": 1,
        "exec": case.exec.name(),
        "layers": case.layers,
        "layer_copies": layers,
        "kv_len": case.kv_len,
        "weight_bytes_per_layer": per_layer,
        "gbps": (gbps * 10.0).round() / 10.0,
        "comm_us_per_layer": 0,
    })
    .as_object()
    .cloned()
    .unwrap_or_default();
    sink.write("decode", stats, fields)
}

/// Prints (to stderr) each op's mean device time per layer over a few op-by-op steps.
fn print_op_breakdown(
    dev: &CudaDevice,
    stack: &mut LayerStack,
    inputs: &cudarc::driver::CudaSlice<f32>,
    layers: usize,
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
    eprintln!("per-op device us per layer: {}", line.join(", "));
    Ok(())
}
