//! The weights of one decoder layer, laid out for the kernels, and the bytes one decode step reads.
//!
//! Head and expert counts here are what *this* rank holds: the layer code never assumes it has
//! whole matrices, so a tensor-parallel plan only changes what the loader slices.

use shardline_tensor::kernels::{matmul, matmul_many, matvec, matvec_many, MatmulJob, MatvecJob};
use shardline_tensor::TensorView;

use crate::weights::Weight;

/// A SwiGLU MLP (a dense FFN, one routed expert or a shared expert).
#[derive(Debug)]
pub struct Mlp {
    /// Gate rows then up rows, `[2 * intermediate, hidden]`.
    pub gate_up: Weight,
    /// `[hidden, intermediate]`.
    pub down: Weight,
    /// The intermediate rows this rank holds.
    pub intermediate: usize,
}

/// The attention segment's weights.
#[derive(Debug)]
pub struct AttentionWeights {
    /// RMSNorm weights applied before attention, `[hidden]`.
    pub input_norm: Vec<f32>,
    /// Query projection of this rank's heads, `[n_heads * head_dim, hidden]`.
    pub q: Weight,
    /// Key projection of this rank's KV heads, `[n_kv_heads * head_dim, hidden]`.
    pub k: Weight,
    /// Value projection of this rank's KV heads, `[n_kv_heads * head_dim, hidden]`.
    pub v: Weight,
    /// Output projection's columns for this rank's heads, `[hidden, n_heads * head_dim]`.
    pub o: Weight,
    /// q, k and v biases (Qwen2).
    pub qkv_bias: Option<[Vec<f32>; 3]>,
    /// Output projection bias, held by rank 0 only so that the ranks' partial sums add it once.
    pub o_bias: Option<Vec<f32>>,
    /// Per-head RMSNorm weights for q and k (Qwen3).
    pub qk_norm: Option<[Vec<f32>; 2]>,
    /// Query heads this rank holds.
    pub n_heads: usize,
    /// KV heads this rank holds.
    pub n_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
}

/// A routed mixture of experts, with an optional sigmoid-gated shared expert.
#[derive(Debug)]
pub struct MoeWeights {
    /// `[n_experts, hidden]`, replicated on every rank.
    pub router: Weight,
    /// Every expert of the model; `None` where another expert group holds it.
    pub experts: Vec<Option<Mlp>>,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Divide the top-k router probabilities by their sum.
    pub renormalize: bool,
    /// The shared expert and its `[1, hidden]` gate.
    pub shared: Option<(Mlp, Weight)>,
}

/// The FFN segment's weights.
#[derive(Debug)]
pub enum FfnWeights {
    /// One SwiGLU MLP.
    Dense(Mlp),
    /// Routed experts.
    Moe(MoeWeights),
}

/// One decoder layer.
#[derive(Debug)]
pub struct Layer {
    /// The attention segment.
    pub attn: AttentionWeights,
    /// RMSNorm weights applied before the FFN, `[hidden]`.
    pub post_norm: Vec<f32>,
    /// The FFN segment.
    pub ffn: FfnWeights,
    /// Epsilon of the layer's RMSNorms.
    pub rms_eps: f32,
}

impl Mlp {
    fn bytes(&self) -> usize {
        self.gate_up.byte_len() + self.down.byte_len()
    }
}

impl AttentionWeights {
    /// Every byte of weights, biases and norms (the small vectors are held as f32).
    fn bytes(&self) -> usize {
        let vectors = self.input_norm.len()
            + self.qkv_bias.iter().flatten().map(Vec::len).sum::<usize>()
            + self.o_bias.as_ref().map_or(0, Vec::len)
            + self.qk_norm.iter().flatten().map(Vec::len).sum::<usize>();
        self.q.byte_len() + self.k.byte_len() + self.v.byte_len() + self.o.byte_len() + 4 * vectors
    }
}

impl Layer {
    /// Weight bytes one decode step reads: attention, norms, router, `top_k` routed experts (the
    /// largest, should they differ) and the shared expert.
    pub fn decode_bytes(&self) -> usize {
        self.step_bytes(1)
    }

    /// Weight bytes a step of `rows` decode rows reads, each weight once for all rows: as
    /// [`Layer::decode_bytes`], with the routed experts the rows choose between them. For several
    /// rows that is the expected number of distinct experts under uniform routing,
    /// `n (1 - (1 - top_k / n)^rows)` of this rank's `n`, at their mean size.
    pub fn step_bytes(&self, rows: usize) -> usize {
        let attn = self.attn.bytes() + 4 * self.post_norm.len();
        let ffn = match &self.ffn {
            FfnWeights::Dense(m) => m.bytes(),
            FfnWeights::Moe(moe) => {
                let mut sizes: Vec<usize> = moe.experts.iter().flatten().map(Mlp::bytes).collect();
                sizes.sort_unstable_by(|x, y| y.cmp(x));
                let shared = moe
                    .shared
                    .as_ref()
                    .map_or(0, |(m, g)| m.bytes() + g.byte_len());
                let routed = if rows <= 1 {
                    sizes.iter().take(moe.top_k).sum::<usize>()
                } else {
                    let n = moe.experts.len() as f64;
                    let held = sizes.len() as f64 / n;
                    let chosen = n * (1.0 - (1.0 - moe.top_k as f64 / n).powi(rows as i32));
                    let mean = sizes.iter().sum::<usize>() as f64 / sizes.len().max(1) as f64;
                    (chosen * held * mean) as usize
                };
                moe.router.byte_len() + routed + shared
            }
        };
        attn + ffn
    }

    /// Every weight byte the layer holds.
    pub fn total_bytes(&self) -> usize {
        self.attn.bytes()
            + 4 * self.post_norm.len()
            + match &self.ffn {
                FfnWeights::Dense(m) => m.bytes(),
                FfnWeights::Moe(moe) => {
                    moe.router.byte_len()
                        + moe.experts.iter().flatten().map(Mlp::bytes).sum::<usize>()
                        + moe
                            .shared
                            .as_ref()
                            .map_or(0, |(m, g)| m.bytes() + g.byte_len())
                }
            }
    }
}

/// How a step's work is submitted to the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Exec {
    /// In as few submissions as the device allows: on a GPU the whole decode step replays as one
    /// CUDA graph; on the CPU a segment's independent products share one parallel region (q/k/v
    /// at once; all chosen experts' gate/up at once, then all their downs, for one row or for
    /// the rows each expert gets in a batched step).
    #[default]
    Split,
    /// Op by op, each waited for before the next starts: one kernel launch, or one parallel
    /// region per matrix on the CPU.
    PerOp,
}

impl std::str::FromStr for Exec {
    type Err = String;

    fn from_str(s: &str) -> Result<Exec, String> {
        match s {
            "split" => Ok(Exec::Split),
            "per-op" => Ok(Exec::PerOp),
            _ => Err(format!("`{s}`: expected split or per-op")),
        }
    }
}

impl Exec {
    /// The name benchmarks record (`split`, `per-op`).
    pub fn name(self) -> &'static str {
        match self {
            Exec::Split => "split",
            Exec::PerOp => "per-op",
        }
    }
}

/// Runs independent matvecs as `exec` says.
pub fn run_matvecs(exec: Exec, jobs: &mut [MatvecJob]) {
    match exec {
        Exec::Split => matvec_many(jobs),
        Exec::PerOp => {
            for job in jobs {
                matvec(&job.w, job.x, job.y);
            }
        }
    }
}

/// Runs independent matrix products of a few rows each (a step's experts over their rows) as
/// `exec` says.
pub fn run_matmuls(exec: Exec, jobs: &mut [MatmulJob]) {
    match exec {
        Exec::Split => matmul_many(jobs),
        Exec::PerOp => {
            for job in jobs {
                matmul(&job.w, job.x, job.m, job.y);
            }
        }
    }
}

/// `y = x W^T` for `rows` rows of `x`: a matrix-vector product for one row (decode), a matrix
/// product for several (prefill).
pub fn linear(w: &TensorView, x: &[f32], rows: usize, y: &mut [f32]) {
    if rows == 1 {
        matvec(w, x, y);
    } else {
        matmul(w, x, rows, y);
    }
}

/// Adds `bias` to every row of `x`.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}
