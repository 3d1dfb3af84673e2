//! The attention segment on the CPU: rms_norm -> q/k/v -> (q/k norm) -> rope -> KV append ->
//! attention over the cache -> o_proj. Its output is this rank's partial sum of the residual
//! update (the whole update on one rank).

use shardline_tensor::kernels::{attention, rms_norm, KvCache, MatvecJob, Rope};

use crate::layer::{add_bias, linear, run_matvecs, AttentionWeights, Exec};

impl AttentionWeights {
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
        let hidden = self.input_norm.len();
        let rows = x.len() / hidden;
        let (qw, kw) = (
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        );
        let start = cache.len();
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
        rope.apply(&mut q, self.n_heads, start);
        rope.apply(&mut k, self.n_kv_heads, start);
        cache.append(&k, &v);
        let mut att = vec![0.0f32; rows * qw];
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        attention(&q, cache, self.n_heads, scale, &mut att);
        linear(&self.o.view(), &att, rows, out);
        if let Some(b) = &self.o_bias {
            add_bias(out, b);
        }
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
