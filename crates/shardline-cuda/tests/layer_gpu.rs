//! The GPU decode layer against the CPU kernels of `shardline-tensor` on the same weights, for
//! every weight dtype, over several decode steps, in both execution modes.
//!
//! Needs a CUDA device: without one each test prints that it did not run and why.

use shardline_cuda::{
    CudaDevice, CudaError, DeviceLayer, ExecMode, HostLayerWeights, LayerShape, LayerStack,
};
use shardline_tensor::kernels::{self, KvCache, Rope};
use shardline_tensor::{DType, Tensor};

/// Opens the GPU, or says why this test does not run here. Only a missing driver or device skips;
/// any other failure (a kernel that does not compile, say) fails the test.
fn device(test: &str) -> Option<CudaDevice> {
    match CudaDevice::open(0) {
        Ok(d) => Some(d),
        Err(e @ CudaError::Unavailable(_)) => {
            eprintln!("SKIPPED {test}: {e}");
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

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

/// One layer's weights on the host, as tensors of the weight dtype.
struct HostLayer {
    attn_norm: Vec<f32>,
    qkv: Tensor,
    o: Tensor,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    router: Tensor,
    /// Per expert `[2I, H]` and `[H, I]`.
    gate_up: Vec<Tensor>,
    down: Vec<Tensor>,
}

fn random_layer(sh: &LayerShape, dtype: DType, rng: &mut Rng) -> HostLayer {
    let h = sh.hidden;
    let mut t = |rows: usize, cols: usize| {
        let v = rng.vec(rows * cols, 1.0 / (cols as f32).sqrt());
        Tensor::from_f32(dtype, [rows, cols], &v).unwrap()
    };
    let qkv = t(sh.qkv_rows(), h);
    let o = t(h, sh.q_dim());
    let router = t(sh.n_experts, h);
    let gate_up = (0..sh.n_experts)
        .map(|_| t(2 * sh.intermediate, h))
        .collect();
    let down = (0..sh.n_experts).map(|_| t(h, sh.intermediate)).collect();
    let mut norm = |n: usize| -> Vec<f32> { rng.vec(n, 0.5).iter().map(|v| 1.0 + v).collect() };
    HostLayer {
        attn_norm: norm(h),
        q_norm: sh.qk_norm.then(|| norm(sh.head_dim)),
        k_norm: sh.qk_norm.then(|| norm(sh.head_dim)),
        ffn_norm: norm(h),
        qkv,
        o,
        router,
        gate_up,
        down,
    }
}

fn concat(ts: &[Tensor]) -> Vec<u8> {
    ts.iter().flat_map(|t| t.bytes().iter().copied()).collect()
}

/// The CPU reference of one decode step of one layer, updating `x` in place.
fn cpu_step(
    sh: &LayerShape,
    w: &HostLayer,
    cache: &mut KvCache,
    rope: &Rope,
    pos: usize,
    x: &mut [f32],
) {
    let h = sh.hidden;
    let mut normed = vec![0.0; h];
    kernels::rms_norm(x, &w.attn_norm, sh.eps, &mut normed);
    let mut qkv = vec![0.0; sh.qkv_rows()];
    kernels::matvec(&w.qkv.view(), &normed, &mut qkv);
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
    let mut o = vec![0.0; h];
    kernels::matvec(&w.o.view(), &attn, &mut o);
    kernels::add_assign(x, &o);

    kernels::rms_norm(x, &w.ffn_norm, sh.eps, &mut normed);
    let mut logits = vec![0.0; sh.n_experts];
    kernels::matvec(&w.router.view(), &normed, &mut logits);
    kernels::softmax(&mut logits);
    let mut ids = vec![0usize; sh.top_k];
    let mut weights = vec![0.0f32; sh.top_k];
    kernels::top_k(&logits, &mut ids, &mut weights);
    if sh.renormalize {
        let s: f32 = weights.iter().sum();
        weights.iter_mut().for_each(|v| *v /= s);
    }
    let i = sh.intermediate;
    let mut out = vec![0.0; h];
    for (e, wt) in ids.iter().zip(&weights) {
        let mut gu = vec![0.0; 2 * i];
        kernels::matvec(&w.gate_up[*e].view(), &normed, &mut gu);
        let mut act = vec![0.0; i];
        kernels::silu_mul(&gu[..i], &gu[i..], &mut act);
        let mut d = vec![0.0; h];
        kernels::matvec(&w.down[*e].view(), &act, &mut d);
        kernels::axpy(*wt, &d, &mut out);
    }
    kernels::add_assign(x, &out);
}

fn shapes() -> Vec<LayerShape> {
    vec![
        // Mixtral-like: GQA, renormalised top-2, head_dim 64.
        LayerShape {
            hidden: 256,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 64,
            n_experts: 4,
            top_k: 2,
            intermediate: 96,
            qk_norm: false,
            renormalize: true,
            rope_theta: 10_000.0,
            eps: 1e-5,
            capacity: 16,
        },
        // Qwen-like with odd sizes: hidden not a multiple of 8 (the kernels' tail path), q/k
        // norm, small heads, top-4 of 8 without renormalising.
        LayerShape {
            hidden: 200,
            n_heads: 8,
            n_kv_heads: 2,
            head_dim: 16,
            n_experts: 8,
            top_k: 4,
            intermediate: 44,
            qk_norm: true,
            renormalize: false,
            rope_theta: 1_000_000.0,
            eps: 1e-6,
            capacity: 16,
        },
    ]
}

fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

#[test]
fn gpu_layers_match_cpu_kernels_for_every_dtype_and_mode() {
    let Some(dev) = device("gpu_layers_match_cpu_kernels") else {
        return;
    };
    for sh in shapes() {
        for dtype in DType::ALL {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
            let layers: Vec<HostLayer> =
                (0..2).map(|_| random_layer(&sh, dtype, &mut rng)).collect();
            let upload = |w: &HostLayer| {
                let gate_up = concat(&w.gate_up);
                let down = concat(&w.down);
                let host = HostLayerWeights {
                    attn_norm: &w.attn_norm,
                    qkv: w.qkv.bytes(),
                    o: w.o.bytes(),
                    q_norm: w.q_norm.as_deref(),
                    k_norm: w.k_norm.as_deref(),
                    ffn_norm: &w.ffn_norm,
                    router: w.router.bytes(),
                    gate_up: &gate_up,
                    down: &down,
                };
                DeviceLayer::upload(&dev, &sh, dtype, &host).unwrap()
            };
            let mut outputs = Vec::new();
            for mode in [ExecMode::PerOp, ExecMode::Split] {
                let dev_layers = layers.iter().map(upload).collect();
                let mut stack = LayerStack::new(&dev, sh.clone(), dev_layers).unwrap();
                let rope = Rope::new(sh.head_dim, sh.capacity, sh.rope_theta as f64);
                let mut caches: Vec<KvCache> = (0..layers.len())
                    .map(|_| KvCache::new(sh.n_kv_heads, sh.head_dim, sh.capacity))
                    .collect();
                let mut input_rng = Rng(7);
                let mut steps = Vec::new();
                for pos in 0..5 {
                    let x0 = input_rng.vec(sh.hidden, 1.0);
                    stack.set_hidden(&dev, &x0).unwrap();
                    stack.set_position(&dev, pos).unwrap();
                    stack.step(&dev, mode).unwrap();
                    let gpu = stack.hidden(&dev).unwrap();
                    let mut cpu = x0.clone();
                    for (w, cache) in layers.iter().zip(caches.iter_mut()) {
                        cpu_step(&sh, w, cache, &rope, pos, &mut cpu);
                    }
                    let err = max_rel_err(&gpu, &cpu);
                    assert!(
                        err < 2e-5,
                        "{dtype} {:?} pos {pos}: GPU vs CPU relative error {err}",
                        mode
                    );
                    assert!(gpu.iter().all(|v| v.is_finite()));
                    steps.push(gpu);
                }
                outputs.push(steps);
            }
            assert_eq!(
                outputs[0], outputs[1],
                "{dtype}: split and per-op results differ"
            );
        }
    }
}

#[test]
fn bad_shapes_and_positions_are_errors() {
    let Some(dev) = device("bad_shapes_and_positions_are_errors") else {
        return;
    };
    let mut sh = shapes().remove(0);
    sh.n_kv_heads = 3;
    let err = DeviceLayer::random(&dev, &sh, DType::BF16, 1)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("KV heads"), "{err}");
    let sh = shapes().remove(0);
    let layer = DeviceLayer::random(&dev, &sh, DType::BF16, 1).unwrap();
    let mut stack = LayerStack::new(&dev, sh.clone(), vec![layer]).unwrap();
    let err = stack
        .set_position(&dev, sh.capacity)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("beyond the KV cache"), "{err}");
    let err = stack.set_hidden(&dev, &[0.0; 3]).err().expect("refused");
    assert!(err.to_string().contains("hidden state"), "{err}");
}

#[test]
fn kernels_compile_with_nvrtc() {
    match shardline_cuda::device::check_kernels_compile() {
        Ok(()) => {}
        Err(e @ CudaError::Unavailable(_)) => eprintln!("SKIPPED kernels_compile_with_nvrtc: {e}"),
        Err(e) => panic!("{e}"),
    }
}
