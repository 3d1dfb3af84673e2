//! Rotary position embedding in the half-rotation layout of Hugging Face Llama/Mixtral/Qwen:
//! element `i` of a head pairs with element `i + head_dim/2`.

/// Precomputed cos/sin tables for positions `0..max_positions`.
#[derive(Clone, Debug)]
pub struct Rope {
    head_dim: usize,
    max_positions: usize,
    /// `[max_positions, head_dim/2]`
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    /// Tables for `head_dim` (even) with base `theta`, as transformers computes them in f32:
    /// `inv_freq[i] = 1 / theta^(2i/head_dim)`, angle = `pos * inv_freq[i]`.
    pub fn new(head_dim: usize, max_positions: usize, theta: f64) -> Rope {
        Rope::from_inv_freq(&Rope::inv_freq(head_dim, theta), max_positions)
    }

    /// `inv_freq[i] = 1 / theta^(2i/head_dim)` for `i < head_dim/2`, in f32.
    pub fn inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
        assert!(head_dim.is_multiple_of(2), "rope: head_dim must be even");
        (0..head_dim / 2)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect()
    }

    /// Tables for the given inverse frequencies (`head_dim/2` of them), for callers that must
    /// match a reference's rounding of them (transformers keeps them in the model's dtype).
    pub fn from_inv_freq(inv_freq: &[f32], max_positions: usize) -> Rope {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for f in inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Rope {
            head_dim: 2 * half,
            max_positions,
            cos,
            sin,
        }
    }

    /// Elements per head the tables rotate.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Positions the tables cover (`0..max_positions`).
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Rotates `x`, laid out as rows of `n_heads * head_dim` (one row per token), in place; row
    /// `t` is at position `start_pos + t`.
    pub fn apply(&self, x: &mut [f32], n_heads: usize, start_pos: usize) {
        let d = self.head_dim;
        let half = d / 2;
        let row = n_heads * d;
        assert!(
            row > 0 && x.len().is_multiple_of(row),
            "rope: x is not whole rows"
        );
        for (t, xr) in x.chunks_exact_mut(row).enumerate() {
            let pos = start_pos + t;
            assert!(pos < self.max_positions, "rope: position beyond the table");
            let cos = &self.cos[pos * half..(pos + 1) * half];
            let sin = &self.sin[pos * half..(pos + 1) * half];
            for head in xr.chunks_exact_mut(d) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * cos[i] - x2 * sin[i];
                    b[i] = x2 * cos[i] + x1 * sin[i];
                }
            }
        }
    }
}
