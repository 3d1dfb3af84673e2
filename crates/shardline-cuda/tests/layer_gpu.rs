//! The GPU decode layers against the CPU kernels of `shardline-tensor` on the same weights: every
//! weight dtype, MoE (with and without renormalisation, with a shared expert) and dense FFNs, q/k
//! norm and q/k/v bias, over several decode steps, chained on the device in both execution modes
//! and one segment at a time.
//!
//! Needs a CUDA device: without one each test prints that it did not run and why.

mod common;
use common::{device, max_rel_err};

use shardline_cuda::{
    CudaDevice, CudaError, DeviceLayer, ExecMode, FfnShape, HostFfn, HostLayerWeights, HostMlp,
    LayerShape, LayerStack,
};
use shardline_tensor::kernels::{self, KvCache, Rope};
use shardline_tensor::{DType, Tensor};

/// Deterministic values in [-scale, scale).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// A SwiGLU MLP on the host: `[2I, H]` and `[H, I]`.
struct Mlp {
    gate_up: Tensor,
    down: Tensor,
}

enum Ffn {
    Moe {
        router: Tensor,
        experts: Vec<Mlp>,
        shared: Option<(Mlp, Tensor)>,
    },
    Dense(Mlp),
}

/// One layer's weights on the host, as tensors of the weight dtype.
struct HostLayer {
    attn_norm: Vec<f32>,
    qkv: Tensor,
    qkv_bias: Option<Vec<f32>>,
    o: Tensor,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    ffn: Ffn,
}

fn random_layer(sh: &LayerShape, ffn: &FfnShape, dtype: DType, rng: &mut Rng) -> HostLayer {
    let h = sh.hidden;
    let mut t = |rows: usize, cols: usize| {
        let v = rng.vec(rows * cols, 1.0 / (cols as f32).sqrt());
        Tensor::from_f32(dtype, [rows, cols], &v).unwrap()
    };
    let qkv = t(sh.qkv_rows(), h);
    let o = t(h, sh.q_dim());
    fn mlp(t: &mut impl FnMut(usize, usize) -> Tensor, i: usize, h: usize) -> Mlp {
        Mlp {
            gate_up: t(2 * i, h),
            down: t(h, i),
        }
    }
    let ffn = match ffn {
        FfnShape::Moe {
            n_experts,
            intermediate,
            shared_intermediate,
            ..
        } => Ffn::Moe {
            experts: (0..*n_experts)
                .map(|_| mlp(&mut t, *intermediate, h))
                .collect(),
            shared: shared_intermediate.map(|si| (mlp(&mut t, si, h), t(1, h))),
            router: t(*n_experts, h),
        },
        FfnShape::Dense { intermediate } => Ffn::Dense(mlp(&mut t, *intermediate, h)),
    };
    let mut norm = |n: usize| -> Vec<f32> { rng.vec(n, 0.5).iter().map(|v| 1.0 + v).collect() };
    HostLayer {
        attn_norm: norm(h),
        q_norm: sh.qk_norm.then(|| norm(sh.head_dim)),
        k_norm: sh.qk_norm.then(|| norm(sh.head_dim)),
        ffn_norm: norm(h),
        qkv_bias: sh.qkv_bias.then(|| norm(sh.qkv_rows())),
        qkv,
        o,
        ffn,
    }
}

fn concat(ts: &[&Tensor]) -> Vec<u8> {
    ts.iter().flat_map(|t| t.bytes().iter().copied()).collect()
}

fn upload(
    dev: &CudaDevice,
    sh: &LayerShape,
    shape: &FfnShape,
    dtype: DType,
    w: &HostLayer,
) -> DeviceLayer {
    let (gate_up, down): (Vec<u8>, Vec<u8>) = match &w.ffn {
        Ffn::Moe { experts, .. } => (
            concat(&experts.iter().map(|m| &m.gate_up).collect::<Vec<_>>()),
            concat(&experts.iter().map(|m| &m.down).collect::<Vec<_>>()),
        ),
        Ffn::Dense(m) => (m.gate_up.bytes().to_vec(), m.down.bytes().to_vec()),
    };
    let experts = HostMlp {
        gate_up: &gate_up,
        down: &down,
    };
    let ffn = match &w.ffn {
        Ffn::Moe { router, shared, .. } => HostFfn::Moe {
            router: router.bytes(),
            experts,
            held: None,
            shared: shared.as_ref().map(|(m, g)| {
                (
                    HostMlp {
                        gate_up: m.gate_up.bytes(),
                        down: m.down.bytes(),
                    },
                    g.bytes(),
                )
            }),
        },
        Ffn::Dense(_) => HostFfn::Dense(experts),
    };
    let host = HostLayerWeights {
        attn_norm: &w.attn_norm,
        qkv: w.qkv.bytes(),
        qkv_bias: w.qkv_bias.as_deref(),
        o: w.o.bytes(),
        q_norm: w.q_norm.as_deref(),
        k_norm: w.k_norm.as_deref(),
        ffn_norm: &w.ffn_norm,
        ffn,
    };
    DeviceLayer::upload(dev, sh, shape, dtype, &host).unwrap()
}

/// `down(silu(gate x) * (up x))` on the CPU.
fn cpu_mlp(m: &Mlp, x: &[f32], h: usize) -> Vec<f32> {
    let i = m.down.shape().dims()[1];
    let mut gu = vec![0.0; 2 * i];
    kernels::matvec(&m.gate_up.view(), x, &mut gu);
    let mut act = vec![0.0; i];
    kernels::silu_mul(&gu[..i], &gu[i..], &mut act);
    let mut out = vec![0.0; h];
    kernels::matvec(&m.down.view(), &act, &mut out);
    out
}

/// The CPU reference of the attention segment: the partial update (o_proj's output).
fn cpu_attention(
    sh: &LayerShape,
    w: &HostLayer,
    cache: &mut KvCache,
    rope: &Rope,
    pos: usize,
    x: &[f32],
) -> Vec<f32> {
    let mut normed = vec![0.0; sh.hidden];
    kernels::rms_norm(x, &w.attn_norm, sh.eps, &mut normed);
    let mut qkv = vec![0.0; sh.qkv_rows()];
    kernels::matvec(&w.qkv.view(), &normed, &mut qkv);
    if let Some(b) = &w.qkv_bias {
        kernels::add_assign(&mut qkv, b);
    }
    let (q, kv) = qkv.split_at_mut(sh.q_dim());
    let (k, v) = kv.split_at_mut(sh.kv_dim());
    if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
        let q_in = q.to_vec();
        kernels::rms_norm(&q_in, qn, sh.eps, q);
        let k_in = k.to_vec();
        kernels::rms_norm(&k_in, kn, sh.eps, k);
    }
    rope.apply(q, sh.n_heads, pos);
    rope.apply(k, sh.n_kv_heads, pos);
    cache.append(k, v);
    let mut attn = vec![0.0; sh.q_dim()];
    kernels::attention(
        q,
        cache,
        sh.n_heads,
        1.0 / (sh.head_dim as f32).sqrt(),
        &mut attn,
    );
    let mut o = vec![0.0; sh.hidden];
    kernels::matvec(&w.o.view(), &attn, &mut o);
    o
}

/// The CPU reference of the FFN segment: the partial update.
fn cpu_ffn(sh: &LayerShape, shape: &FfnShape, w: &HostLayer, x: &[f32]) -> Vec<f32> {
    let h = sh.hidden;
    let mut normed = vec![0.0; h];
    kernels::rms_norm(x, &w.ffn_norm, sh.eps, &mut normed);
    match (&w.ffn, shape) {
        (Ffn::Dense(m), _) => cpu_mlp(m, &normed, h),
        (
            Ffn::Moe {
                router,
                experts,
                shared,
            },
            FfnShape::Moe {
                n_experts,
                top_k,
                renormalize,
                ..
            },
        ) => {
            let mut logits = vec![0.0; *n_experts];
            kernels::matvec(&router.view(), &normed, &mut logits);
            kernels::softmax(&mut logits);
            let mut ids = vec![0usize; *top_k];
            let mut weights = vec![0.0f32; *top_k];
            kernels::top_k(&logits, &mut ids, &mut weights);
            if *renormalize {
                let s: f32 = weights.iter().sum();
                weights.iter_mut().for_each(|v| *v /= s);
            }
            let mut out = vec![0.0; h];
            for (e, wt) in ids.iter().zip(&weights) {
                kernels::axpy(*wt, &cpu_mlp(&experts[*e], &normed, h), &mut out);
            }
            if let Some((m, gate)) = shared {
                let mut g = [0.0f32];
                kernels::matvec(&gate.view(), &normed, &mut g);
                let sig = 1.0 / (1.0 + (-g[0]).exp());
                kernels::axpy(sig, &cpu_mlp(m, &normed, h), &mut out);
            }
            out
        }
        _ => unreachable!("shape and weights built together"),
    }
}

fn attention_shape(
    hidden: usize,
    heads: (usize, usize, usize),
    qk_norm: bool,
    qkv_bias: bool,
) -> LayerShape {
    LayerShape {
        hidden,
        n_heads: heads.0,
        n_kv_heads: heads.1,
        head_dim: heads.2,
        qk_norm,
        qkv_bias,
        rope_theta: 10_000.0,
        eps: 1e-5,
        capacity: 16,
    }
}

/// (name, attention geometry, FFN) of each case.
fn cases() -> Vec<(&'static str, LayerShape, FfnShape)> {
    vec![
        (
            // hidden a multiple of 4 but not of 8 (the fused router's scalar path)
            "mixtral-like",
            attention_shape(260, (4, 2, 64), false, false),
            FfnShape::Moe {
                n_experts: 4,
                top_k: 2,
                intermediate: 96,
                renormalize: true,
                shared_intermediate: None,
            },
        ),
        (
            // hidden not a multiple of 4 (the matvecs' scalar tail, the FFN head unfused), small
            // heads, q/k norm
            "qwen3-like-odd",
            attention_shape(202, (8, 2, 16), true, false),
            FfnShape::Moe {
                n_experts: 8,
                top_k: 4,
                intermediate: 44,
                renormalize: false,
                shared_intermediate: None,
            },
        ),
        (
            "qwen2-like",
            attention_shape(128, (4, 4, 32), false, true),
            FfnShape::Moe {
                n_experts: 4,
                top_k: 2,
                intermediate: 32,
                renormalize: false,
                shared_intermediate: Some(48),
            },
        ),
        (
            // many experts (the top-k block's threads span several warps), a count that is not
            // a multiple of 4 (the padded ranks), top-8
            "many-experts",
            attention_shape(64, (4, 2, 16), true, false),
            FfnShape::Moe {
                n_experts: 130,
                top_k: 8,
                intermediate: 24,
                renormalize: true,
                shared_intermediate: None,
            },
        ),
        (
            "llama-like",
            attention_shape(128, (8, 2, 16), false, false),
            FfnShape::Dense { intermediate: 160 },
        ),
        (
            // heads over 128 (the attention kernel of 8 elements per lane), rows longer than the
            // four-rows-per-warp kernels take (hidden and intermediate
            // above 768 columns), and a row count that is not a multiple of a block's rows
            "long-rows",
            attention_shape(1000, (4, 2, 160), false, false),
            FfnShape::Moe {
                n_experts: 4,
                top_k: 2,
                intermediate: 776,
                renormalize: true,
                shared_intermediate: None,
            },
        ),
    ]
}

const STEPS: usize = 5;
const TOLERANCE: f32 = 2e-5;

#[test]
fn gpu_layers_match_cpu_kernels_for_every_dtype_and_mode() {
    let Some(dev) = device("gpu_layers_match_cpu_kernels") else {
        return;
    };
    for (name, sh, ffn) in cases() {
        for dtype in DType::ALL {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
            let layers: Vec<HostLayer> = (0..2)
                .map(|_| random_layer(&sh, &ffn, dtype, &mut rng))
                .collect();
            let rope = Rope::new(sh.head_dim, sh.capacity, sh.rope_theta as f64);
            // The CPU reference of every step of the chained layers.
            let mut caches: Vec<KvCache> = (0..layers.len())
                .map(|_| KvCache::new(sh.n_kv_heads, sh.head_dim, sh.capacity))
                .collect();
            let mut input_rng = Rng(7);
            let mut inputs = Vec::new();
            let mut expected = Vec::new();
            for pos in 0..STEPS {
                let mut x = input_rng.vec(sh.hidden, 1.0);
                inputs.push(x.clone());
                for (w, cache) in layers.iter().zip(caches.iter_mut()) {
                    let a = cpu_attention(&sh, w, cache, &rope, pos, &x);
                    kernels::add_assign(&mut x, &a);
                    let f = cpu_ffn(&sh, &ffn, w, &x);
                    kernels::add_assign(&mut x, &f);
                }
                expected.push(x);
            }
            let mut outputs = Vec::new();
            for mode in [ExecMode::PerOp, ExecMode::Split] {
                let dev_layers = layers
                    .iter()
                    .map(|w| upload(&dev, &sh, &ffn, dtype, w))
                    .collect();
                let mut stack = LayerStack::new(&dev, sh.clone(), dev_layers).unwrap();
                let mut steps = Vec::new();
                for pos in 0..STEPS {
                    stack.set_hidden(&dev, &inputs[pos]).unwrap();
                    stack.set_position(&dev, pos).unwrap();
                    stack.step(&dev, mode).unwrap();
                    let gpu = stack.hidden(&dev).unwrap();
                    let err = max_rel_err(&gpu, &expected[pos]);
                    assert!(
                        err < TOLERANCE,
                        "{name} {dtype} {mode:?} pos {pos}: relative error {err}"
                    );
                    steps.push(gpu);
                }
                outputs.push(steps);
            }
            assert_eq!(
                outputs[0], outputs[1],
                "{name} {dtype}: split and per-op results differ"
            );

            // One segment at a time, the residual adds on the host (as a model engine runs it).
            let dev_layers = layers
                .iter()
                .map(|w| upload(&dev, &sh, &ffn, dtype, w))
                .collect();
            let mut stack = LayerStack::new(&dev, sh.clone(), dev_layers).unwrap();
            let mut part = vec![0.0f32; sh.hidden];
            for pos in 0..STEPS {
                let mut x = inputs[pos].clone();
                stack.set_position(&dev, pos).unwrap();
                for l in 0..layers.len() {
                    stack.attention(&dev, l, &x, &mut part).unwrap();
                    kernels::add_assign(&mut x, &part);
                    stack.ffn(&dev, l, &x, &mut part).unwrap();
                    kernels::add_assign(&mut x, &part);
                }
                let err = max_rel_err(&x, &expected[pos]);
                assert!(
                    err < TOLERANCE,
                    "{name} {dtype} segments pos {pos}: relative error {err}"
                );
            }
        }
    }
}

#[test]
fn bad_shapes_and_positions_are_errors() {
    let Some(dev) = device("bad_shapes_and_positions_are_errors") else {
        return;
    };
    let (_, mut sh, ffn) = cases().remove(0);
    sh.n_kv_heads = 3;
    let err = DeviceLayer::random(&dev, &sh, &ffn, DType::BF16, 1)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("KV heads"), "{err}");
    let (_, sh, ffn) = cases().remove(0);
    let layer = DeviceLayer::random(&dev, &sh, &ffn, DType::BF16, 1).unwrap();
    let mut stack = LayerStack::new(&dev, sh.clone(), vec![layer]).unwrap();
    let err = stack.set_position(&dev, sh.capacity).expect_err("refused");
    assert!(err.to_string().contains("beyond the KV cache"), "{err}");
    let err = stack.set_hidden(&dev, &[0.0; 3]).expect_err("refused");
    assert!(err.to_string().contains("hidden state"), "{err}");
    let err = stack
        .logits(&dev, &vec![0.0; sh.hidden])
        .expect_err("refused");
    assert!(err.to_string().contains("lm_head"), "{err}");
}

#[test]
fn kernels_compile_with_nvrtc() {
    for check in [
        shardline_cuda::device::check_kernels_compile,
        shardline_cuda::prefill_ops::check_prefill_kernels_compile,
    ] {
        match check() {
            Ok(()) => {}
            Err(e @ CudaError::Unavailable(_)) => {
                eprintln!("SKIPPED kernels_compile_with_nvrtc: {e}")
            }
            Err(e) => panic!("{e}"),
        }
    }
}
