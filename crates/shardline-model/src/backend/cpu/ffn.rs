//! The FFN segment on the CPU: rms_norm -> dense SwiGLU, or router -> selected experts ->
//! weighted sum (+ sigmoid-gated shared expert). Its output is this rank's partial sum.

use shardline_tensor::kernels::{axpy, rms_norm, silu_mul, softmax, top_k, MatmulJob, MatvecJob};

use crate::layer::{linear, run_matmuls, run_matvecs, Exec, FfnWeights, Layer, Mlp, MoeWeights};

/// Most token rows whose experts run together in a step of several rows: batched decode's rows
/// all fit, while a long prompt's experts go in groups so that their buffers stay small.
const GROUP_ROWS: usize = 256;

impl Mlp {
    /// `out = down(silu(gate x) * up x)` for `rows` rows of `x`.
    pub fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let i = self.intermediate;
        let mut gu = vec![0.0f32; rows * 2 * i];
        linear(&self.gate_up.view(), x, rows, &mut gu);
        let mut h = vec![0.0f32; rows * i];
        for (g, hr) in gu.chunks_exact(2 * i).zip(h.chunks_exact_mut(i)) {
            silu_mul(&g[..i], &g[i..], hr);
        }
        linear(&self.down.view(), &h, rows, out);
    }

    /// Runs the MLP once over `rows` (each `hidden` wide) gathered together; `each(i, y)` gets
    /// the output row of the i-th.
    pub(crate) fn forward_gathered<'a>(
        &self,
        rows: impl ExactSizeIterator<Item = &'a [f32]>,
        mut each: impl FnMut(usize, &[f32]),
    ) {
        let n = rows.len();
        let xs: Vec<f32> = rows.flatten().copied().collect();
        let mut ys = vec![0.0f32; xs.len()];
        self.forward(&xs, n, &mut ys);
        for (i, y) in ys.chunks_exact(xs.len() / n.max(1)).enumerate() {
            each(i, y);
        }
    }
}

/// The experts chosen for one token and their weights.
pub struct Routing {
    pub experts: Vec<usize>,
    pub weights: Vec<f32>,
}

impl MoeWeights {
    /// Router softmax over all experts (in f32), then top-k, then renormalised when the model
    /// says so: transformers' order for Mixtral, Qwen2-MoE and Qwen3-MoE.
    pub fn route(&self, xn_row: &[f32]) -> Routing {
        let n = self.router.view().shape().dims()[0];
        let mut probs = vec![0.0f32; n];
        linear(&self.router.view(), xn_row, 1, &mut probs);
        softmax(&mut probs);
        let mut experts = vec![0usize; self.top_k];
        let mut weights = vec![0.0f32; self.top_k];
        top_k(&probs, &mut experts, &mut weights);
        if self.renormalize {
            let sum: f32 = weights.iter().sum();
            for w in &mut weights {
                *w /= sum;
            }
        }
        Routing { experts, weights }
    }

    /// One token (decode): the chosen experts this rank holds (and the shared expert) run
    /// together, gate/up of all of them in one parallel region and down in another.
    fn forward_one(&self, xn: &[f32], exec: Exec, out: &mut [f32]) {
        let routing = self.route(xn);
        let mut mlps: Vec<(&Mlp, f32)> = routing
            .experts
            .iter()
            .zip(&routing.weights)
            .filter_map(|(&e, &w)| self.experts[e].as_ref().map(|m| (m, w)))
            .collect();
        if let Some((shared, gate)) = &self.shared {
            let mut g = [0.0f32];
            linear(&gate.view(), xn, 1, &mut g);
            mlps.push((shared, 1.0 / (1.0 + (-g[0]).exp())));
        }
        let mut gu: Vec<Vec<f32>> = mlps
            .iter()
            .map(|(m, _)| vec![0.0; 2 * m.intermediate])
            .collect();
        let mut jobs: Vec<MatvecJob> = mlps
            .iter()
            .zip(gu.iter_mut())
            .map(|((m, _), y)| MatvecJob {
                w: m.gate_up.view(),
                x: xn,
                y,
            })
            .collect();
        run_matvecs(exec, &mut jobs);
        let act: Vec<Vec<f32>> = mlps
            .iter()
            .zip(&gu)
            .map(|((m, _), g)| {
                let i = m.intermediate;
                let mut h = vec![0.0f32; i];
                silu_mul(&g[..i], &g[i..], &mut h);
                h
            })
            .collect();
        let mut ys: Vec<Vec<f32>> = mlps.iter().map(|_| vec![0.0; out.len()]).collect();
        let mut jobs: Vec<MatvecJob> = mlps
            .iter()
            .zip(&act)
            .zip(ys.iter_mut())
            .map(|(((m, _), x), y)| MatvecJob {
                w: m.down.view(),
                x,
                y,
            })
            .collect();
        run_matvecs(exec, &mut jobs);
        out.fill(0.0);
        for ((_, w), y) in mlps.iter().zip(&ys) {
            axpy(*w, y, out);
        }
    }

    fn forward(&self, xn: &[f32], rows: usize, exec: Exec, out: &mut [f32]) {
        if rows == 1 {
            return self.forward_one(xn, exec, out);
        }
        let hidden = xn.len() / rows;
        out.fill(0.0);
        // Token rows grouped by expert, so each expert runs once over all of its rows.
        let mut by_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); self.experts.len()];
        for (r, row) in xn.chunks_exact(hidden).enumerate() {
            let routing = self.route(row);
            for (&e, &w) in routing.experts.iter().zip(&routing.weights) {
                by_expert[e].push((r, w));
            }
        }
        // Experts of other expert groups add nothing here: their ranks add them in the reduce.
        let chosen: Vec<(&Mlp, &[(usize, f32)])> = self
            .experts
            .iter()
            .zip(&by_expert)
            .filter_map(|(e, rows)| Some((e.as_ref()?, rows.as_slice())))
            .filter(|(_, rows)| !rows.is_empty())
            .collect();
        let mut rest = &chosen[..];
        while !rest.is_empty() {
            let mut total = 0;
            let n = rest
                .iter()
                .take_while(|(_, rows)| {
                    total += rows.len();
                    total <= GROUP_ROWS
                })
                .count()
                .max(1);
            let (group, tail) = rest.split_at(n);
            run_experts(group, xn, hidden, exec, out);
            rest = tail;
        }
        self.add_shared(xn, rows, out);
    }

    /// Adds the sigmoid-gated shared expert (Qwen2-MoE), if any, over all `rows` to `out`.
    pub(crate) fn add_shared(&self, xn: &[f32], rows: usize, out: &mut [f32]) {
        let Some((shared, gate)) = &self.shared else {
            return;
        };
        let hidden = xn.len() / rows;
        let mut ys = vec![0.0f32; xn.len()];
        shared.forward(xn, rows, &mut ys);
        let mut g = vec![0.0f32; rows];
        linear(&gate.view(), xn, rows, &mut g);
        for ((o, y), g) in out
            .chunks_exact_mut(hidden)
            .zip(ys.chunks_exact(hidden))
            .zip(g)
        {
            axpy(1.0 / (1.0 + (-g).exp()), y, o);
        }
    }
}

/// Runs each expert over its token rows, `(row, routing weight)` each, and adds its output rows,
/// times their weights, to those rows of `out` (expert by expert, in order): every gate/up in one
/// parallel region, SwiGLU, every down in another. Each expert's products are computed as
/// [`Mlp::forward`] computes them.
fn run_experts(
    experts: &[(&Mlp, &[(usize, f32)])],
    xn: &[f32],
    hidden: usize,
    exec: Exec,
    out: &mut [f32],
) {
    let xs: Vec<Vec<f32>> = experts
        .iter()
        .map(|(_, rows)| {
            rows.iter()
                .flat_map(|&(r, _)| &xn[r * hidden..(r + 1) * hidden])
                .copied()
                .collect()
        })
        .collect();
    let mut gu: Vec<Vec<f32>> = experts
        .iter()
        .map(|(m, rows)| vec![0.0; rows.len() * 2 * m.intermediate])
        .collect();
    let mut jobs: Vec<MatmulJob> = experts
        .iter()
        .zip(&xs)
        .zip(gu.iter_mut())
        .map(|(((mlp, rows), x), y)| MatmulJob {
            w: mlp.gate_up.view(),
            x,
            m: rows.len(),
            y,
        })
        .collect();
    run_matmuls(exec, &mut jobs);
    let act: Vec<Vec<f32>> = experts
        .iter()
        .zip(&gu)
        .map(|((mlp, rows), g)| {
            let i = mlp.intermediate;
            let mut h = vec![0.0f32; rows.len() * i];
            for (g, hr) in g.chunks_exact(2 * i).zip(h.chunks_exact_mut(i)) {
                silu_mul(&g[..i], &g[i..], hr);
            }
            h
        })
        .collect();
    let mut ys: Vec<Vec<f32>> = experts
        .iter()
        .map(|(_, rows)| vec![0.0; rows.len() * hidden])
        .collect();
    let mut jobs: Vec<MatmulJob> = experts
        .iter()
        .zip(&act)
        .zip(ys.iter_mut())
        .map(|(((mlp, rows), x), y)| MatmulJob {
            w: mlp.down.view(),
            x,
            m: rows.len(),
            y,
        })
        .collect();
    run_matmuls(exec, &mut jobs);
    for ((_, rows), y) in experts.iter().zip(&ys) {
        for (&(r, w), yr) in rows.iter().zip(y.chunks_exact(hidden)) {
            axpy(w, yr, &mut out[r * hidden..(r + 1) * hidden]);
        }
    }
}

impl Layer {
    /// Runs the FFN segment for `[rows, hidden]` `x`; writes `[rows, hidden]` to `out`.
    pub fn ffn_forward(&self, x: &[f32], exec: Exec, out: &mut [f32]) {
        let rows = x.len() / self.post_norm.len();
        let xn = self.ffn_norm(x);
        match &self.ffn {
            FfnWeights::Dense(m) => m.forward(&xn, rows, out),
            FfnWeights::Moe(moe) => moe.forward(&xn, rows, exec, out),
        }
    }

    /// The FFN's input: `x` after the post-attention norm.
    pub(crate) fn ffn_norm(&self, x: &[f32]) -> Vec<f32> {
        let mut xn = vec![0.0f32; x.len()];
        rms_norm(x, &self.post_norm, self.rms_eps, &mut xn);
        xn
    }
}
