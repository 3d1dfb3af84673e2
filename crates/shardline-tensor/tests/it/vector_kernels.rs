//! The vector kernels of a decode step (norm, rotary embedding, activation, softmax, top-k,
//! element-wise ops, embedding lookup, sum) against the reference implementations.

use crate::common;

use common::{assert_close, sum_tol, values, Weight};
use proptest::prelude::*;
use shardline_tensor::kernels::{
    add_assign, axpy, embedding, rms_norm, scale, silu_mul, softmax, sum, top_k, Rope,
};
use shardline_tensor::{reference, DType};

/// Relative tolerance of `ulps` roundings on each element of `want`.
fn rel_tol(want: &[f32], ulps: f32) -> Vec<f32> {
    want.iter()
        .map(|w| ulps * f32::EPSILON * w.abs() + 1e-30)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn rms_norm_matches_reference(rows in 1usize..4, d in 1usize..300, seed in any::<u64>()) {
        let x = values(rows * d, seed);
        let w = values(d, seed + 1);
        let mut out = vec![f32::NAN; x.len()];
        rms_norm(&x, &w, 1e-5, &mut out);
        let want = reference::rms_norm(&x, &w, 1e-5);
        assert_close("rms_norm", &out, &want, &rel_tol(&want, d as f32 + 8.0));
    }

    #[test]
    fn rope_matches_reference(
        half in 1usize..40, heads in 1usize..4, t in 1usize..4, start in 0usize..5000,
        seed in any::<u64>(),
    ) {
        let d = 2 * half;
        let theta = [10_000.0, 500_000.0, 1_000_000.0][seed as usize % 3];
        let rope = Rope::new(d, start + t, theta);
        let mut x = values(t * heads * d, seed);
        let want = reference::rope(&x, d, heads, start, theta);
        rope.apply(&mut x, heads, start);
        // Each output is x1*cos -+ x2*sin with |x| < 1: a few roundings of numbers below 2.
        assert_close("rope", &x, &want, &vec![1e-6; want.len()]);
    }

    #[test]
    fn silu_mul_matches_reference(n in 1usize..200, seed in any::<u64>()) {
        let g: Vec<f32> = values(n, seed).iter().map(|v| v * 20.0).collect();
        let u = values(n, seed + 1);
        let mut out = vec![f32::NAN; n];
        silu_mul(&g, &u, &mut out);
        let want = reference::silu_mul(&g, &u);
        assert_close("silu_mul", &out, &want, &rel_tol(&want, 8.0));
    }

    #[test]
    fn softmax_matches_reference(n in 1usize..500, spread in 0.1f32..50.0, seed in any::<u64>()) {
        let mut x: Vec<f32> = values(n, seed).iter().map(|v| v * spread).collect();
        let want = reference::softmax(&x);
        // Rounding `x - max` to f32 moves it by up to |x - max| eps / 2, which exp turns into a
        // relative error of that size; the normalising sum adds about n roundings.
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let tol: Vec<f32> = x
            .iter()
            .zip(&want)
            .map(|(v, w)| (n as f32 + 8.0 + (v - max).abs()) * f32::EPSILON * w + 1e-30)
            .collect();
        softmax(&mut x);
        assert_close("softmax", &x, &want, &tol);
    }

    /// Values from a small set, so that ties are common.
    #[test]
    fn top_k_matches_reference(x in prop::collection::vec(-3i8..3, 1..70), k_pick in 0usize..70) {
        let x: Vec<f32> = x.iter().map(|&v| v as f32 * 0.5).collect();
        let k = 1 + k_pick % x.len();
        let (mut idx, mut val) = (vec![usize::MAX; k], vec![f32::NAN; k]);
        top_k(&x, &mut idx, &mut val);
        prop_assert_eq!(&idx, &reference::top_k(&x, k));
        for (i, v) in idx.iter().zip(&val) {
            prop_assert_eq!(x[*i], *v);
        }
    }

    #[test]
    fn elementwise_match_plain_loops(n in 0usize..100, alpha in -4.0f32..4.0, seed in any::<u64>()) {
        let a = values(n, seed);
        let b = values(n, seed + 1);
        let mut got = a.clone();
        add_assign(&mut got, &b);
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        prop_assert_eq!(&got, &want);
        let mut got = a.clone();
        axpy(alpha, &b, &mut got);
        let want: Vec<f32> = a.iter().zip(&b).map(|(y, x)| y + alpha * x).collect();
        prop_assert_eq!(&got, &want);
        let mut got = a.clone();
        scale(&mut got, alpha);
        let want: Vec<f32> = a.iter().map(|x| x * alpha).collect();
        prop_assert_eq!(&got, &want);
    }

    #[test]
    fn embedding_matches_reference(
        vocab in 1usize..50, hidden in 1usize..70, d in 0usize..3, token_pick in any::<usize>(),
        seed in any::<u64>(), offset in 0usize..3,
    ) {
        let table = Weight::new(DType::ALL[d], vocab, hidden, seed, offset);
        let token = token_pick % vocab;
        let mut out = vec![f32::NAN; hidden];
        embedding(&table.view(), token, &mut out);
        prop_assert_eq!(out, reference::embedding(&table.view(), token));
    }
}

/// Small sums run on the calling thread, large ones over the pool: test both.
#[test]
fn sum_matches_reference() {
    for n in [0, 1, 17, 1000, 600_001] {
        let x = values(n, n as u64);
        let scale: f32 = x.iter().map(|v| v.abs()).sum();
        let got = sum(&x);
        let want = reference::sum(&x) as f32;
        assert!(
            (got - want).abs() <= sum_tol(n, scale),
            "sum of {n}: {got}, expected {want}"
        );
    }
}

#[test]
fn softmax_of_all_negative_infinity_is_left_alone() {
    let mut x = [f32::NEG_INFINITY; 3];
    softmax(&mut x);
    assert!(x.iter().all(|v| *v == f32::NEG_INFINITY));
}
