//! Top-k selection for MoE routing.

/// Writes the indices and values of the `idx.len()` largest elements of `x`, largest first; ties
/// go to the lower index (as `torch.topk` does on CPU for router scores).
pub fn top_k(x: &[f32], idx: &mut [usize], val: &mut [f32]) {
    let k = idx.len();
    assert_eq!(k, val.len(), "top_k: idx vs val length");
    assert!(k <= x.len(), "top_k: k larger than the input");
    let mut filled = 0usize;
    for (i, &v) in x.iter().enumerate() {
        // Position where v goes among the current best, keeping strict order for ties.
        let mut pos = filled;
        while pos > 0 && val[pos - 1] < v {
            pos -= 1;
        }
        if pos >= k {
            continue;
        }
        let end = filled.min(k - 1);
        for j in (pos..end).rev() {
            idx[j + 1] = idx[j];
            val[j + 1] = val[j];
        }
        idx[pos] = i;
        val[pos] = v;
        filled = (filled + 1).min(k);
    }
}
