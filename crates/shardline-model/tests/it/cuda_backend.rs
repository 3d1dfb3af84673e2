#![cfg(feature = "cuda")]
//! The CUDA backend against the CPU backend as the oracle, on small models with random weights
//! in every weight dtype: prefill and decode logits and the greedy choice through the engine
//! (whole decode steps in one CUDA graph, op by op, after a truncate, with a one-rank NCCL
//! communicator, and host-summed tensor parallelism over two ranks on one GPU), batched steps over
//! the paged KV cache as a server schedules them, and bad input refused with an error.
//!
//! Every test needs a CUDA GPU, which the machines that run the suite by default lack, so they are
//! ignored; on a GPU machine run them with
//! `cargo test -p shardline-model --features cuda --test it -- cuda_backend:: --ignored`. Without a
//! GPU they fail (opening the device is an error).

use crate::common;

use std::time::Duration;

use shardline_cuda::nccl::{DeviceComm, NcclId};
use shardline_model::backend::cuda::CudaBackend;
use shardline_model::load::{load_model_for, ModelWeights};
use shardline_model::random::RandomWeights;
use shardline_model::rope::RopeScaling;
use shardline_model::{
    Arch, Backend, CpuBackend, Engine, Exec, FfnKind, Logits, ModelError, ModelSpec, MoeSpec, Plan,
    Reduce, Result, SingleRank, SumDType, Want,
};
use shardline_tensor::DType;

/// The prompt of every run (the last id is the vocabulary's last row).
const PROMPT: [u32; 6] = [1, 17, 150, 299, 42, 300];
/// Decode steps after the prompt.
const STEPS: usize = 5;
/// Positions a run takes, and the GPU's KV cache capacity.
const POSITIONS: usize = PROMPT.len() + STEPS;
/// Not a multiple of 8 (nor of 2: over two ranks the lm_head slices differ in length).
const VOCAB: usize = 301;
/// Largest logit difference from the CPU, relative to the largest logit.
const TOLERANCE: f32 = 1e-4;
/// The same with keys and values held in bf16: each rounded to 8 significant bits (a relative
/// error of at most 2^-9 = 2e-3). The softmax over these random models' large attention scores
/// amplifies a key's error by the score's size: on an H100 the logits of the models with few
/// experts stayed within 5e-2 of the largest with prompts of up to 20 tokens; the bound is twice
/// that.
const KV_BF16_TOLERANCE: f32 = 1e-1;
/// Models whose bf16-KV logits are not compared with the CPU's: the many-experts model's router
/// logits lie so close together that a key's rounding changes which experts a row takes, and the
/// logits then move by up to 2.3e-1 of the largest (an H100, a 37-token prompt). Its f32-KV runs
/// check the same kernels against the CPU; its bf16-KV run is still checked for greedy tokens that
/// agree with its own logits.
const KV_BF16_ROUTING_SENSITIVE: &str = "many-experts";
const SEED: u64 = 0x5348_4c43_5544_4131;

/// Experts of a MoE model: `n_experts`, `top_k` chosen, each of `intermediate`, with an optional
/// shared expert of `shared` intermediate size.
fn experts(
    n_experts: usize,
    top_k: usize,
    intermediate: usize,
    renormalize: bool,
    shared: Option<usize>,
) -> FfnKind {
    FfnKind::Moe(MoeSpec {
        n_experts,
        top_k,
        intermediate,
        renormalize,
        shared_intermediate: shared,
        sparse_step: 1,
        dense_layers: Vec::new(),
    })
}

/// A two-layer model of `arch` with `heads` (query heads, KV heads, head_dim) and `ffn` in every
/// layer; q/k norm for Qwen3-MoE and q/k/v bias for Qwen2-MoE, as their configs give them.
fn spec(arch: Arch, hidden: usize, heads: (usize, usize, usize), ffn: FfnKind) -> ModelSpec {
    let (moe, dense_intermediate) = match ffn {
        FfnKind::Dense { intermediate } => (None, intermediate),
        FfnKind::Moe(m) => {
            let intermediate = m.intermediate;
            (Some(m), intermediate)
        }
    };
    ModelSpec {
        arch,
        hidden,
        n_layers: 2,
        n_heads: heads.0,
        n_kv_heads: heads.1,
        head_dim: heads.2,
        vocab: VOCAB,
        max_positions: 64,
        sliding_window: None,
        rms_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::None,
        qkv_bias: arch == Arch::Qwen2Moe,
        o_bias: false,
        qk_norm: arch == Arch::Qwen3Moe,
        tie_embeddings: false,
        dense_intermediate,
        moe,
        dtype: None,
        rope_freq_dtype: DType::F32,
        eos_ids: Vec::new(),
    }
}

/// (name, spec) of each model: the shapes that take the kernels' different paths.
fn cases() -> Vec<(&'static str, ModelSpec)> {
    vec![
        // hidden a multiple of 4 but not of 8 (the fused router's scalar path)
        (
            "mixtral-like",
            spec(
                Arch::Mixtral,
                260,
                (4, 2, 64),
                experts(4, 2, 96, true, None),
            ),
        ),
        // hidden not a multiple of 4 (the matvecs' scalar tail, the FFN head unfused), small
        // heads, q/k norm
        (
            "qwen3-like-odd",
            spec(
                Arch::Qwen3Moe,
                202,
                (8, 2, 16),
                experts(8, 4, 44, false, None),
            ),
        ),
        // q/k/v bias and a sigmoid-gated shared expert
        (
            "qwen2-like",
            spec(
                Arch::Qwen2Moe,
                128,
                (4, 4, 32),
                experts(4, 2, 32, false, Some(48)),
            ),
        ),
        // many experts (the top-k block's threads span several warps), a count that is not a
        // multiple of 4, top-8
        (
            "many-experts",
            spec(
                Arch::Qwen3Moe,
                64,
                (4, 2, 16),
                experts(130, 8, 24, true, None),
            ),
        ),
        // a dense FFN (one always-chosen expert)
        (
            "llama-like",
            spec(
                Arch::Llama,
                128,
                (8, 2, 16),
                FfnKind::Dense { intermediate: 160 },
            ),
        ),
        // heads over 128 (the attention kernel of 8 elements per lane), rows longer than the
        // four-rows-per-warp kernels take, a row count that is not a multiple of a block's rows
        (
            "long-rows",
            spec(
                Arch::Mixtral,
                1000,
                (4, 2, 160),
                experts(4, 2, 776, true, None),
            ),
        ),
    ]
}

/// Runs `f` on every case with weights of every dtype, named for messages.
fn for_each_model(mut f: impl FnMut(&str, &ModelSpec, DType)) {
    for (name, spec) in cases() {
        for dtype in DType::ALL {
            f(&format!("{name} {dtype}"), &spec, dtype);
        }
    }
}

/// Rank `plan`'s slice of `spec`'s random weights of `dtype` (the same numbers on every load).
fn weights(spec: &ModelSpec, dtype: DType, plan: &Plan) -> ModelWeights {
    load_model_for(spec, &RandomWeights::new(SEED, dtype), plan).unwrap()
}

fn cpu_engine(spec: &ModelSpec, dtype: DType) -> Engine<CpuBackend, SingleRank> {
    let weights = weights(spec, dtype, &Plan::single());
    Engine::new(CpuBackend::new(spec.clone(), weights, 0), SingleRank)
}

/// Rank `plan`'s slice of the model on GPU 0, with KV caches of [`POSITIONS`].
fn gpu_backend(spec: &ModelSpec, dtype: DType, plan: &Plan) -> CudaBackend {
    CudaBackend::new(spec.clone(), weights(spec, dtype, plan), 0, POSITIONS).unwrap()
}

fn gpu_engine(spec: &ModelSpec, dtype: DType) -> Engine<CudaBackend, SingleRank> {
    Engine::new(gpu_backend(spec, dtype, &Plan::single()), SingleRank)
}

/// What an engine gave for [`PROMPT`] and the tokens after it.
#[derive(Debug, PartialEq)]
struct Run {
    /// The prompt's logits, every row.
    prefill: Vec<f32>,
    /// The token of each decode step.
    fed: Vec<u32>,
    /// Each decode step's logits.
    steps: Vec<Vec<f32>>,
    /// Each decode step's greedy choice, by [`Engine::forward_argmax`].
    best: Vec<u32>,
}

/// Starts `engine`, prefills [`PROMPT`] and decodes [`STEPS`] tokens: `tokens`, or (`None`) each
/// step's greedy choice. Each step runs twice at its position: for its logits, then (truncated
/// back) for its argmax.
fn follow<B: Backend, R: Reduce>(engine: &mut Engine<B, R>, tokens: Option<&[u32]>) -> Result<Run> {
    let vocab = engine.backend.spec().vocab;
    engine.start(POSITIONS)?;
    let prefill = engine.forward(&PROMPT, Logits::All)?;
    let mut greedy = argmax(&prefill[prefill.len() - vocab..]);
    let mut run = Run {
        prefill,
        fed: Vec::new(),
        steps: Vec::new(),
        best: Vec::new(),
    };
    for step in 0..STEPS {
        let token = tokens.map_or(greedy, |t| t[step]);
        run.steps.push(engine.forward(&[token], Logits::Last)?);
        engine.truncate(PROMPT.len() + step)?;
        greedy = engine.forward_argmax(&[token])?;
        run.fed.push(token);
        run.best.push(greedy);
    }
    Ok(run)
}

/// The first index of the largest value.
fn argmax(x: &[f32]) -> u32 {
    let (best, _) = x
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        });
    best as u32
}

/// The largest magnitude in `x`.
fn scale(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// The largest difference between `got` and `want` relative to `want`'s largest magnitude; NaN
/// where either holds a value that is not finite.
fn rel_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "logits of different lengths");
    if !got.iter().chain(want).all(|v| v.is_finite()) {
        return f32::NAN;
    }
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale(want).max(f32::MIN_POSITIVE)
}

/// Asserts that `got` fed the tokens `want` fed and has its logits within `tolerance` (relative;
/// 0: the same values), and that each greedy choice of `got` is the largest of its own logits and,
/// by `want`'s logits, `want`'s choice or one within the tolerance of it.
fn assert_runs_close(ctx: &str, got: &Run, want: &Run, tolerance: f32) {
    assert_eq!(got.fed, want.fed, "{ctx}: different tokens fed");
    assert_eq!(got.steps.len(), STEPS, "{ctx}: decode steps");
    let close = |what: &str, g: &[f32], w: &[f32]| {
        let d = rel_diff(g, w);
        assert!(
            d <= tolerance,
            "{ctx} {what}: logits differ by {d:.2e} of the largest, more than {tolerance:.0e}"
        );
    };
    close("prefill", &got.prefill, &want.prefill);
    for (step, (g, w)) in got.steps.iter().zip(&want.steps).enumerate() {
        let ctx = format!("{ctx} decode step {step}");
        close(&format!("decode step {step}"), g, w);
        let (best, expected) = (got.best[step], want.best[step]);
        assert_eq!(
            best,
            argmax(g),
            "{ctx}: the greedy choice is not the largest logit"
        );
        let short = w[expected as usize] - w[best as usize];
        assert!(
            short <= tolerance * scale(w),
            "{ctx}: chose token {best}, {short:.2e} below token {expected}"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_logits_match_the_cpu_backend() {
    for_each_model(|ctx, spec, dtype| {
        let cpu = follow(&mut cpu_engine(spec, dtype), None).unwrap();
        let gpu = follow(&mut gpu_engine(spec, dtype), Some(&cpu.fed)).unwrap();
        assert_runs_close(ctx, &gpu, &cpu, TOLERANCE);
    });
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn per_op_decode_equals_the_graph() {
    for_each_model(|ctx, spec, dtype| {
        let split = follow(&mut gpu_engine(spec, dtype), None).unwrap();
        let mut per_op = gpu_engine(spec, dtype);
        per_op.backend.set_exec(Exec::PerOp);
        let per_op = follow(&mut per_op, Some(&split.fed)).unwrap();
        assert_runs_close(&format!("{ctx} per-op"), &per_op, &split, 0.0);
    });
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn truncate_replays_steps_exactly() {
    for_each_model(|ctx, spec, dtype| {
        let mut gpu = gpu_engine(spec, dtype);
        let first = follow(&mut gpu, None).unwrap();
        gpu.truncate(PROMPT.len()).unwrap();
        for (step, (&token, logits)) in first.fed.iter().zip(&first.steps).enumerate() {
            let again = gpu.forward(&[token], Logits::Last).unwrap();
            assert!(
                &again == logits,
                "{ctx} step {step}: the logits after truncating differ"
            );
        }
    });
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_one_rank_nccl_communicator_changes_nothing() {
    for_each_model(|ctx, spec, dtype| {
        let plain = follow(&mut gpu_engine(spec, dtype), None).unwrap();
        let mut gpu = gpu_engine(spec, dtype);
        let id = NcclId::new().unwrap();
        let dev = gpu.backend.device();
        let comm = DeviceComm::init(dev, &id, 1, 0, Duration::from_secs(60)).unwrap();
        gpu.backend.set_device_comm(comm).unwrap();
        assert!(gpu.backend.sums_across_ranks(), "{ctx}");
        let summed = follow(&mut gpu, Some(&plain.fed)).unwrap();
        assert!(
            gpu.backend.comm_in_graph().is_some(),
            "{ctx}: no decode step ran with the communicator"
        );
        assert_runs_close(&format!("{ctx} with NCCL"), &summed, &plain, 1e-6);
    });
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn host_summed_tensor_parallel_matches_one_rank() {
    const WORLD: usize = 2;
    for_each_model(|ctx, spec, dtype| {
        let cpu = follow(&mut cpu_engine(spec, dtype), None).unwrap();
        // Two ranks without a communicator: the engine drives the segments and sums on the host.
        let ranks = common::on_threads(WORLD, |reduce| {
            let plan = Plan::new(WORLD, 1, reduce.rank).unwrap();
            let mut engine = Engine::new(gpu_backend(spec, dtype, &plan), reduce);
            // Compared with one rank at its own tolerance: the sums must not be rounded.
            engine.sum_dtype = SumDType::F32;
            let run = follow(&mut engine, Some(&cpu.fed)).unwrap();
            (run, engine.reduce.all_gathers, engine.reduce.all_to_alls)
        });
        let (run, ..) = &ranks[0];
        assert_runs_close(&format!("{ctx} rank 0 of {WORLD}"), run, &cpu, TOLERANCE);
        for (rank, (other, all_gathers, all_to_alls)) in ranks.iter().enumerate() {
            assert!(
                other == run,
                "{ctx}: rank {rank}'s logits differ from rank 0's"
            );
            // The logits of the prompt and of each step, each step's best: nothing dispatched.
            assert_eq!(
                (*all_gathers, *all_to_alls),
                (1 + 2 * STEPS, 0),
                "{ctx} rank {rank}: exchanges"
            );
        }
    });
}

/// Batched steps over the paged KV cache, as a server schedules them (sequences of different
/// lengths joining mid-flight, prompt chunks beside decode rows, single-row steps): every step's
/// logits on the GPU are the CPU backend's within the tolerance. Both run the plans the scheduler
/// makes from the CPU's tokens.
#[test]
#[ignore = "needs a CUDA GPU"]
fn paged_batches_match_the_cpu_backend() {
    use shardline_model::scheduler::{GenParams, Scheduler, SchedulerConfig, StepOutput};
    // The 37-token prompt makes a step of more rows than the tensor cores take over at.
    let prompts: Vec<Vec<u32>> = [1usize, 5, 13, 37, 20, 9]
        .iter()
        .enumerate()
        .map(|(s, &n)| (0..n).map(|i| ((i * 37 + s * 11) % VOCAB) as u32).collect())
        .collect();
    let params = GenParams {
        max_tokens: 6,
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
        stop_ids: Vec::new(),
    };
    let cfg = SchedulerConfig {
        kv_blocks: 12,
        step_tokens: 40,
        max_running: 3,
        max_positions: 64,
    };
    for_each_model(|ctx, spec, dtype| {
        let mut cpu = cpu_engine(spec, dtype);
        cpu.backend.make_kv_pool(cfg.kv_blocks, DType::F32).unwrap();
        // Whole steps on the device, and (op by op) the segments the engine drives, with an f32
        // KV cache; whole steps with a bf16 one.
        let mut whole = gpu_engine(spec, dtype);
        let mut segments = gpu_engine(spec, dtype);
        let mut kv16 = gpu_engine(spec, dtype);
        segments.backend.set_exec(Exec::PerOp);
        for gpu in [&mut whole, &mut segments] {
            gpu.backend.make_kv_pool(cfg.kv_blocks, DType::F32).unwrap();
        }
        kv16.backend
            .make_kv_pool(cfg.kv_blocks, DType::BF16)
            .unwrap();
        let mut sched = Scheduler::new(cfg);
        let (mut added, mut steps, mut rows) = (0, 0, Vec::new());
        while added < prompts.len() || sched.running() + sched.waiting() > 0 {
            if steps % 3 == 0 && added < prompts.len() {
                sched
                    .add(added as u64, prompts[added].clone(), params.clone())
                    .unwrap();
                added += 1;
            }
            let greedy = sched.plan();
            if !greedy.is_empty() {
                assert!(greedy.greedy, "{ctx}: greedy requests make a greedy plan");
                // The same rows again write the same keys and values: each engine runs the
                // plan for its logits, then for its greedy tokens.
                let mut plan = greedy.clone();
                plan.greedy = false;
                let logits = |out: StepOutput| match out {
                    StepOutput::Logits(l) => l,
                    StepOutput::Greedy(_) => panic!("{ctx}: greedy tokens for logits"),
                };
                let want = logits(plan.run(&mut cpu).unwrap());
                let vocab = spec.vocab;
                for (how, gpu, tolerance) in [
                    ("whole", &mut whole, TOLERANCE),
                    ("segments", &mut segments, TOLERANCE),
                    ("bf16 KV", &mut kv16, KV_BF16_TOLERANCE),
                ] {
                    let got = logits(plan.run(gpu).unwrap());
                    let d = rel_diff(&got, &want);
                    let compared =
                        !(how == "bf16 KV" && ctx.starts_with(KV_BF16_ROUTING_SENSITIVE));
                    assert!(
                        !compared || d <= tolerance,
                        "{ctx} {how} step {steps} ({} rows): logits differ by {d:.2e} of the \
                         largest",
                        plan.tokens.len()
                    );
                    let StepOutput::Greedy(ids) = greedy.run(gpu).unwrap() else {
                        panic!("{ctx} {how}: logits for a greedy plan");
                    };
                    for (row, (&id, l)) in ids.iter().zip(got.chunks_exact(vocab)).enumerate() {
                        assert_eq!(id, argmax(l), "{ctx} {how} step {steps} row {row}");
                    }
                }
                rows.push(plan.tokens.len());
                sched.finish_step(&plan, &StepOutput::Logits(want));
            }
            steps += 1;
            assert!(steps < 200, "{ctx}: the scheduler made no progress");
        }
        assert!(
            rows.contains(&1) && rows.iter().any(|&r| r > 3) && rows.iter().any(|&r| r >= 32),
            "{ctx}: steps of one row, of several and of many: {rows:?}"
        );
    });
}

/// Asserts that `result` is an error `is` accepts.
fn assert_refused<T>(what: &str, result: Result<T>, is: impl Fn(&ModelError) -> bool) {
    match result {
        Err(e) if is(&e) => {}
        Err(e) => panic!("{what}: the wrong error: {e}"),
        Ok(_) => panic!("{what}: accepted"),
    }
}

/// Whether an error's message holds `needle`.
fn mentions(needle: &str) -> impl Fn(&ModelError) -> bool + '_ {
    move |e| e.to_string().contains(needle)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bad_input_is_an_error() {
    let (_, spec) = cases().swap_remove(0);
    let mut gpu = gpu_engine(&spec, DType::BF16);
    gpu.start(POSITIONS).unwrap();
    let vocab = VOCAB as u32;
    let out_of_range =
        |e: &ModelError| matches!(e, ModelError::TokenOutOfRange { id, .. } if *id == vocab);
    // In a prompt (the segments) and as a decode token (the whole step on the device).
    for tokens in [&[1, vocab, 2][..], &[vocab]] {
        assert_refused(
            "a token out of range",
            gpu.forward(tokens, Logits::Last),
            out_of_range,
        );
        assert_refused(
            "a token out of range",
            gpu.forward_argmax(tokens),
            out_of_range,
        );
    }
    // The backend checks it too (its embedding row would be read past the table).
    let decoded = gpu.backend.decode(vocab, Want::Best);
    assert_refused("a token out of range", decoded, out_of_range);
    assert_eq!(gpu.backend.position(), 0, "a refused token took a position");

    gpu.forward(&PROMPT, Logits::Last).unwrap();
    for _ in 0..STEPS {
        gpu.forward_argmax(&[1]).unwrap();
    }
    let full = |e: &ModelError| {
        matches!(
            e,
            ModelError::KvFull {
                capacity: POSITIONS,
                ..
            }
        )
    };
    assert_refused(
        "a decode past the KV cache",
        gpu.forward(&[1], Logits::Last),
        full,
    );
    assert_refused(
        "a prompt past the KV cache",
        gpu.forward(&[1, 2], Logits::Last),
        full,
    );
    assert_refused(
        "a decode past the KV cache",
        gpu.backend.decode(1, Want::Logits),
        full,
    );
    assert_refused(
        "truncating forward",
        gpu.truncate(POSITIONS + 1),
        mentions("truncate"),
    );
    assert_refused(
        "a longer sequence than the KV cache",
        gpu.start(POSITIONS + 1),
        mentions("KV cache"),
    );

    let mut odd = spec.clone();
    odd.n_kv_heads = 3;
    let weights = weights(&odd, DType::BF16, &Plan::single());
    assert_refused(
        "4 query heads over 3 KV heads",
        CudaBackend::new(odd, weights, 0, POSITIONS),
        mentions("KV heads"),
    );
}
