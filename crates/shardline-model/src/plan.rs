//! The parallel plan: which attention heads, experts and matrix slices each rank holds.
//!
//! `world` ranks run tensor parallelism over attention and dense FFNs (q/k/v split by heads,
//! o_proj and down_proj by their input columns, one all-reduce after each segment). The experts
//! split into `ep` groups of `world / ep` ranks; each group's experts are sharded over its ranks
//! by intermediate rows (`ep = 1`: every expert over every rank; `ep = world`: whole experts per
//! rank). KV heads are replicated when there are fewer than ranks. Sharding is a pure function of
//! (tensor, shape, plan, rank), and a plan that cannot work is refused before any weight is read.

use std::ops::Range;

use crate::config::{FfnKind, ModelSpec};
use crate::error::{ModelError, Result};

/// How the model is split over `world` ranks with `ep` expert groups, as seen from one rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    world: usize,
    ep: usize,
    rank: usize,
}

fn refuse(reason: String) -> ModelError {
    ModelError::Invalid(format!("parallel plan refused: {reason}"))
}

/// The `part`-th of `parts` equal pieces of `0..len` (`len` divisible by `parts`).
fn piece(len: usize, parts: usize, part: usize) -> Range<usize> {
    let n = len / parts;
    part * n..(part + 1) * n
}

impl Plan {
    /// One rank holding everything.
    pub fn single() -> Plan {
        Plan {
            world: 1,
            ep: 1,
            rank: 0,
        }
    }

    /// Rank `rank` of `world` ranks with `ep` expert groups.
    pub fn new(world: usize, ep: usize, rank: usize) -> Result<Plan> {
        if world == 0 || ep == 0 {
            return Err(refuse("the rank count and --ep must be at least 1".into()));
        }
        if !world.is_multiple_of(ep) {
            return Err(refuse(format!(
                "--ep {ep} does not divide the {world} ranks"
            )));
        }
        if rank >= world {
            return Err(refuse(format!("rank {rank} of {world} ranks")));
        }
        Ok(Plan { world, ep, rank })
    }

    /// Ranks in the job.
    pub fn world(&self) -> usize {
        self.world
    }

    /// This rank (`0..world`).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Expert groups; each holds `n_experts / ep` experts, sharded over its `world / ep` ranks.
    pub fn ep(&self) -> usize {
        self.ep
    }

    /// Ranks that share one expert group (and shard its experts).
    fn group_size(&self) -> usize {
        self.world / self.ep
    }

    /// Checks that `spec` splits under this plan, with the reason when it does not.
    pub fn check(&self, spec: &ModelSpec) -> Result<()> {
        let w = self.world;
        if !spec.n_heads.is_multiple_of(w) {
            return Err(refuse(format!(
                "{} attention heads do not split over {w} ranks",
                spec.n_heads
            )));
        }
        let kv = spec.n_kv_heads;
        if kv >= w && !kv.is_multiple_of(w) {
            return Err(refuse(format!("{kv} KV heads do not split over {w} ranks")));
        }
        if kv < w && !w.is_multiple_of(kv) {
            return Err(refuse(format!(
                "{kv} KV heads are replicated over {w} ranks, so the rank count must be a multiple of {kv}"
            )));
        }
        let mut any_moe = false;
        for layer in 0..spec.n_layers {
            match spec.ffn(layer) {
                FfnKind::Dense { intermediate } => {
                    if !intermediate.is_multiple_of(w) {
                        return Err(refuse(format!(
                            "layer {layer}: the dense FFN's intermediate size {intermediate} does not split over {w} ranks"
                        )));
                    }
                }
                FfnKind::Moe(m) => {
                    any_moe = true;
                    if !m.n_experts.is_multiple_of(self.ep) {
                        return Err(refuse(format!(
                            "{} experts do not split into {} expert groups (--ep)",
                            m.n_experts, self.ep
                        )));
                    }
                    let g = self.group_size();
                    if !m.intermediate.is_multiple_of(g) {
                        return Err(refuse(format!(
                            "an expert's intermediate size {} does not split over the {g} ranks of an expert group",
                            m.intermediate
                        )));
                    }
                    if let Some(si) = m.shared_intermediate {
                        if !si.is_multiple_of(w) {
                            return Err(refuse(format!(
                                "the shared expert's intermediate size {si} does not split over {w} ranks"
                            )));
                        }
                    }
                }
            }
        }
        if self.ep > 1 && !any_moe {
            return Err(refuse(format!(
                "--ep {} asks for expert parallelism, but the model has no experts",
                self.ep
            )));
        }
        Ok(())
    }

    /// This rank's query heads.
    pub fn heads(&self, n_heads: usize) -> Range<usize> {
        piece(n_heads, self.world, self.rank)
    }

    /// This rank's KV heads (one replicated head when there are fewer KV heads than ranks).
    pub fn kv_heads(&self, n_kv_heads: usize) -> Range<usize> {
        if n_kv_heads >= self.world {
            piece(n_kv_heads, self.world, self.rank)
        } else {
            let h = self.rank / (self.world / n_kv_heads);
            h..h + 1
        }
    }

    /// This rank's rows of a dense (or shared-expert) FFN's intermediate dimension.
    pub fn dense_rows(&self, intermediate: usize) -> Range<usize> {
        piece(intermediate, self.world, self.rank)
    }

    /// Vocabulary rows per rank of the column-parallel lm_head (the last rank's may be fewer).
    pub fn vocab_chunk(&self, vocab: usize) -> usize {
        vocab.div_ceil(self.world)
    }

    /// This rank's rows of the lm_head (its slice of the logits).
    pub fn vocab_rows(&self, vocab: usize) -> Range<usize> {
        let c = self.vocab_chunk(vocab);
        (self.rank * c).min(vocab)..((self.rank + 1) * c).min(vocab)
    }

    /// Whether this rank's expert group holds expert `e` of `n_experts`.
    pub fn holds_expert(&self, e: usize, n_experts: usize) -> bool {
        self.expert_ranks(e, n_experts).contains(&self.rank)
    }

    /// The ranks of the expert group that holds expert `e` of `n_experts`: each holds a shard
    /// of it.
    pub fn expert_ranks(&self, e: usize, n_experts: usize) -> Range<usize> {
        let group = e / (n_experts / self.ep);
        piece(self.world, self.ep, group)
    }

    /// This rank's rows of an expert's intermediate dimension.
    pub fn expert_rows(&self, intermediate: usize) -> Range<usize> {
        piece(
            intermediate,
            self.group_size(),
            self.rank % self.group_size(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::preset;
    use shardline_tensor::DType;

    #[test]
    fn slices_cover_everything_once() {
        let plans: Vec<Plan> = (0..4).map(|r| Plan::new(4, 2, r).unwrap()).collect();
        let heads: Vec<_> = plans.iter().map(|p| p.heads(32)).collect();
        assert_eq!(heads, vec![0..8, 8..16, 16..24, 24..32]);
        // 2 KV heads over 4 ranks: each replicated on two ranks.
        let kv: Vec<_> = plans.iter().map(|p| p.kv_heads(2)).collect();
        assert_eq!(kv, vec![0..1, 0..1, 1..2, 1..2]);
        // 8 experts in 2 groups of 2 ranks: ranks 0-1 hold experts 0-3, sharded in halves.
        assert!(plans[1].holds_expert(3, 8) && !plans[1].holds_expert(4, 8));
        assert!(plans[2].holds_expert(4, 8) && !plans[3].holds_expert(0, 8));
        assert_eq!(plans[0].expert_ranks(3, 8), 0..2);
        assert_eq!(plans[0].expert_ranks(4, 8), 2..4);
        assert_eq!(plans[0].expert_rows(100), 0..50);
        assert_eq!(plans[3].expert_rows(100), 50..100);
        assert_eq!(plans[3].dense_rows(100), 75..100);
    }

    #[test]
    fn impossible_plans_are_refused_with_the_reason() {
        let spec = preset("mixtral-mini", 1, DType::BF16).unwrap(); // 8 heads, 2 KV, 8 experts
        let err = |w, ep| {
            Plan::new(w, ep, 0)
                .and_then(|p| p.check(&spec))
                .unwrap_err()
                .to_string()
        };
        assert!(
            err(3, 1).contains("8 attention heads do not split over 3 ranks"),
            "{}",
            err(3, 1)
        );
        assert!(err(4, 3).contains("--ep 3 does not divide the 4 ranks"));
        assert!(err(16, 16).contains("attention heads"));
        let e = err(16, 1);
        assert!(e.contains("attention heads"), "{e}");
        assert!(Plan::new(4, 2, 0).unwrap().check(&spec).is_ok());
        assert!(Plan::new(8, 8, 7).unwrap().check(&spec).is_ok());
        assert!(Plan::new(2, 1, 2).is_err());
    }
}
