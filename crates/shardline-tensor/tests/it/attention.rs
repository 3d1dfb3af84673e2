//! Grouped-query attention over the KV cache (decode and causal prefill) against the f64
//! reference, including the parallel path and a cache filled by several appends.

use crate::common;

use common::{assert_close, isas, values};
use proptest::prelude::*;
use shardline_tensor::kernels::{attention, attention_on, KvCache};
use shardline_tensor::reference;

/// Appends `len` positions in `chunks` appends, then attends `t` query rows (the last `t`
/// positions) and compares with the reference.
fn check(n_kv: usize, group: usize, d: usize, len: usize, t: usize, chunks: usize, seed: u64) {
    let n_heads = n_kv * group;
    let kv_row = n_kv * d;
    let k = values(len * kv_row, seed);
    let v = values(len * kv_row, seed + 1);
    let q: Vec<f32> = values(t * n_heads * d, seed + 2)
        .iter()
        .map(|x| x * 3.0)
        .collect();
    let mut cache = KvCache::new(n_kv, d, len + 3);
    let step = len.div_ceil(chunks).max(1);
    for start in (0..len).step_by(step) {
        let end = (start + step).min(len);
        cache.append(
            &k[start * kv_row..end * kv_row],
            &v[start * kv_row..end * kv_row],
        );
    }
    assert_eq!(cache.len(), len);
    let scale = 1.0 / (d as f32).sqrt();
    let want = reference::attention(&q, &k, &v, n_heads, n_kv, d, scale);
    for isa in isas() {
        let mut out = vec![f32::NAN; q.len()];
        attention_on(isa, &q, &cache, n_heads, scale, &mut out);
        // Outputs are convex combinations of values in [-1, 1].
        let what = format!("attention {isa} kv={n_kv} group={group} d={d} len={len} t={t}");
        assert_close(&what, &out, &want, &vec![2e-5; want.len()]);
    }
}

#[test]
fn decode_parallel_over_heads() {
    check(2, 4, 64, 300, 1, 3, 1);
    // Mixtral's head size, over several position blocks.
    check(1, 2, 128, 150, 1, 1, 3);
}

#[test]
fn prefill_parallel_causal() {
    check(2, 2, 32, 60, 40, 2, 2);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn attention_matches_reference(
        n_kv in 1usize..3, group in 1usize..4, d in 1usize..40, len in 1usize..40,
        t_pick in 0usize..40, chunks in 1usize..4, seed in any::<u64>(),
    ) {
        let t = 1 + t_pick % len;
        check(n_kv, group, d, len, t, chunks, seed);
    }
}

#[test]
#[should_panic(expected = "attention: queries beyond the cache")]
fn attention_rejects_more_queries_than_positions() {
    let mut cache = KvCache::new(1, 4, 8);
    cache.append(&[0.0; 4], &[0.0; 4]);
    let mut out = [0.0; 8];
    attention(&[0.0; 8], &cache, 1, 1.0, &mut out);
}
