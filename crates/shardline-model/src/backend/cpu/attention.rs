//! The attention segment on the CPU: rms_norm -> q/k/v -> (q/k norm) -> rope -> KV append ->
//! attention over the cache -> o_proj. Its output is this rank's partial sum of the residual
//! update (the whole update on one rank).

use shardline_tensor::kernels::{attention, rms_norm, KvCache, MatvecJob, Rope};

use crate::layer::{add_bias, linear, run_matvecs, AttentionWeights, Exec};

/// A segment's q, k and v rows (`[rows, heads * head_dim]` each), after bias and q/k norm,
/// before rope.
pub(super) struct Qkv {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl AttentionWeights {
    /// rms_norm -> q/k/v (+bias) -> (q/k norm) for the `[rows, hidden]` `x`.
    pub(super) fn project(&self, x: &[f32], eps: f32, exec: Exec) -> Qkv {
        let hidden = self.input_norm.len();
        let rows = x.len() / hidden;
        let (qw, kw) = (
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        );
        let mut xn = vec![0.0f32; x.len()];
        rms_norm(x, &self.input_norm, eps, &mut xn);
        let mut q = vec![0.0f32; rows * qw];
        let mut k = vec![0.0f32; rows * kw];
        let mut v = vec![0.0f32; rows * kw];
        if rows == 1 {
            // Decode: q, k and v in one parallel region (one wake-up of the workers).
            let (qv, kv, vv) = (self.q.view(), self.k.view(), self.v.view());
            run_matvecs(
                exec,
                &mut [
                    MatvecJob {
                        w: qv,
                        x: &xn,
                        y: &mut q,
                    },
                    MatvecJob {
                        w: kv,
                        x: &xn,
                        y: &mut k,
                    },
                    MatvecJob {
                        w: vv,
                        x: &xn,
                        y: &mut v,
                    },
                ],
            );
        } else {
            linear(&self.q.view(), &xn, rows, &mut q);
            linear(&self.k.view(), &xn, rows, &mut k);
            linear(&self.v.view(), &xn, rows, &mut v);
        }
        if let Some([bq, bk, bv]) = &self.qkv_bias {
            add_bias(&mut q, bq);
            add_bias(&mut k, bk);
            add_bias(&mut v, bv);
        }
        if let Some([nq, nk]) = &self.qk_norm {
            let q_in = q.clone();
            rms_norm(&q_in, nq, eps, &mut q);
            let k_in = k.clone();
            rms_norm(&k_in, nk, eps, &mut k);
        }
        Qkv { q, k, v }
    }

    /// o_proj (+bias) of the attention rows `att` into `out`.
    pub(super) fn output(&self, att: &[f32], out: &mut [f32]) {
        let rows = att.len() / (self.n_heads * self.head_dim);
        linear(&self.o.view(), att, rows, out);
        if let Some(b) = &self.o_bias {
            add_bias(out, b);
        }
    }

    /// Runs the segment for the `rows` tokens of `x` (`[rows, hidden]`), which sit at positions
    /// `cache.len()..cache.len() + rows`; writes `[rows, hidden]` to `out`.
    ///
    /// The caller has checked that the cache and the rope table have room for the rows.
    pub fn forward(
        &self,
        x: &[f32],
        eps: f32,
        cache: &mut KvCache,
        rope: &Rope,
        exec: Exec,
        out: &mut [f32],
    ) {
        let start = cache.len();
        let Qkv { mut q, mut k, v } = self.project(x, eps, exec);
        rope.apply(&mut q, self.n_heads, start);
        rope.apply(&mut k, self.n_kv_heads, start);
        cache.append(&k, &v);
        let mut att = vec![0.0f32; q.len()];
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        attention(&q, cache, self.n_heads, scale, &mut att);
        self.output(&att, out);
    }
}

impl crate::layer::Layer {
    /// Runs the attention segment of this layer (see [`AttentionWeights::forward`]).
    pub fn attention_forward(
        &self,
        x: &[f32],
        cache: &mut KvCache,
        rope: &Rope,
        exec: Exec,
        out: &mut [f32],
    ) {
        self.attn.forward(x, self.rms_eps, cache, rope, exec, out)
    }
}
