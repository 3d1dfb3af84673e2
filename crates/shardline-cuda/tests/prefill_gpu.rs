//! Prefill against decode on the same random layer: a chunk of rows through [`Prefill`] (after
//! earlier cache positions, as a chunked prompt has) must give what the decode segments give one
//! row at a time, and a decode step afterwards must see the same KV cache. Every FFN kind (MoE
//! with and without renormalisation, a shared expert, dense), q/k norm, q/k/v bias, f32 and bf16.
//!
//! Needs a CUDA device: without one the test prints that it did not run and why.

mod common;
use common::{device, max_rel_err};

use shardline_cuda::{DeviceLayer, FfnShape, LayerShape, LayerStack, Prefill};
use shardline_tensor::DType;

fn shape(hidden: usize, heads: (usize, usize, usize), qk_norm: bool, bias: bool) -> LayerShape {
    LayerShape {
        hidden,
        n_heads: heads.0,
        n_kv_heads: heads.1,
        head_dim: heads.2,
        qk_norm,
        qkv_bias: bias,
        rope_theta: 10_000.0,
        eps: 1e-5,
        capacity: 16,
    }
}

fn moe(n_experts: usize, top_k: usize, renormalize: bool, shared: Option<usize>) -> FfnShape {
    FfnShape::Moe {
        n_experts,
        top_k,
        intermediate: 48,
        renormalize,
        shared_intermediate: shared,
    }
}

/// Positions already in the cache before the prefilled rows, and the rows.
const POS0: usize = 4;
const ROWS: usize = 7;

#[test]
fn prefill_matches_decode_row_by_row() {
    let Some(dev) = device("prefill_matches_decode_row_by_row") else {
        return;
    };
    let cases = [
        (
            "mixtral-like",
            shape(256, (4, 2, 64), false, false),
            moe(4, 2, true, None),
        ),
        (
            "qwen3-like",
            shape(200, (8, 2, 16), true, false),
            moe(8, 4, true, None),
        ),
        (
            "qwen2-like",
            shape(128, (4, 4, 32), false, true),
            moe(4, 2, false, Some(40)),
        ),
        (
            "llama-like",
            shape(128, (8, 2, 16), false, false),
            FfnShape::Dense { intermediate: 160 },
        ),
    ];
    let mut prefill = Prefill::new(&dev).unwrap();
    for (name, sh, ffn) in cases {
        for (dtype, tolerance) in [(DType::F32, 1e-4f32), (DType::BF16, 1e-3)] {
            let stack = || {
                let layer = DeviceLayer::random(&dev, &sh, &ffn, dtype, 3).unwrap();
                LayerStack::new(&dev, sh.clone(), vec![layer]).unwrap()
            };
            let (mut decode, prefilled) = (stack(), stack());
            let h = sh.hidden;
            let x: Vec<f32> = (0..ROWS * h)
                .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5)
                .collect();
            let (mut want, mut got) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
            for (t, (xr, wr)) in x.chunks(h).zip(want.chunks_mut(h)).enumerate() {
                decode.set_position(&dev, POS0 + t).unwrap();
                decode.attention(&dev, 0, xr, wr).unwrap();
            }
            prefill
                .attention(&dev, &prefilled, 0, POS0, &x, &mut got)
                .unwrap();
            let attn_err = max_rel_err(&got, &want);
            for (xr, wr) in x.chunks(h).zip(want.chunks_mut(h)) {
                decode.ffn(&dev, 0, xr, wr).unwrap();
            }
            prefill.ffn(&dev, &prefilled, 0, &x, &mut got).unwrap();
            let ffn_err = max_rel_err(&got, &want);
            // One decode step after the prefilled rows, on both caches.
            let next = &x[..h];
            let (mut a, mut b) = (vec![0.0f32; h], vec![0.0f32; h]);
            let mut after = prefilled;
            for (s, out) in [(&mut decode, &mut a), (&mut after, &mut b)] {
                s.set_position(&dev, POS0 + ROWS).unwrap();
                s.attention(&dev, 0, next, out).unwrap();
            }
            let next_err = max_rel_err(&b, &a);
            eprintln!(
                "{name} {dtype}: attention {attn_err:.2e}, ffn {ffn_err:.2e}, decode after {next_err:.2e}"
            );
            for (what, err) in [
                ("attention", attn_err),
                ("ffn", ffn_err),
                ("next", next_err),
            ] {
                assert!(err < tolerance, "{name} {dtype} {what}: {err:e}");
            }
        }
    }
}
