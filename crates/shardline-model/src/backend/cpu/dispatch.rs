//! Expert dispatch for several rows (prefill, batches) when the experts are split into groups
//! (`--ep` > 1), as docs/architecture.md describes: each rank routes its own contiguous share of the rows, sends
//! each row to every rank that holds a shard of a chosen expert (all-to-all(v)), runs its experts
//! on what it received (one matmul per expert), sends the results back (all-to-all(v)), and adds
//! them, weighted, into its own rows. The rows go in chunks of [`DISPATCH_CHUNK`] own rows: chunk
//! c + 1 travels while chunk c computes, and chunk c's results travel back while chunk c + 1
//! computes.
//!
//! On the wire: first one exchange of counts (rows per chunk, for each pair of ranks), then per
//! chunk the rows, each `[expert, x...]` (`hidden + 1` floats; expert ids are exact in f32), and
//! back `hidden` floats per row, in the order received. The sender keeps each row's index and
//! routing weight. Every count and expert id that arrives is checked; an error names the rank
//! that sent it.
//!
//! Each rank's routed output is whole for its own rows and zero for the others. Without a shared
//! expert the engine then gathers the rows ([`gather_own_rows`], half the bytes of an
//! all-reduce); the shared expert (Qwen2-MoE) stays split over every rank by intermediate rows,
//! so its partial sums over all rows make the segment's output a partial sum, all-reduced.

use std::ops::Range;

use shardline_tensor::kernels::axpy;

use super::ffn::Routing;
use crate::backend::{FfnPart, Pending, Reduce};
use crate::error::{ModelError, Result};
use crate::layer::{Exec, FfnWeights, Layer, MoeWeights};
use crate::plan::Plan;

/// Own rows per chunk of the exchange.
pub const DISPATCH_CHUNK: usize = 64;

/// A row sent to an expert's rank: which own row, for which expert, with what routing weight.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sent {
    /// The row's index among the step's rows (one of the sender's own rows).
    pub row: usize,
    /// The expert the row is sent to.
    pub expert: usize,
    /// The router's weight of that expert for the row.
    pub weight: f32,
}

/// One chunk's sends: for each rank, the rows in the order they travel.
pub type Sends = Vec<Vec<Sent>>;

/// The contiguous share of `0..rows` that rank `rank` of `world` owns (the first `rows % world`
/// ranks own one row more).
pub fn own_rows(rows: usize, world: usize, rank: usize) -> Range<usize> {
    let (base, extra) = (rows / world, rows % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// The sends of rows `first..first + routings.len()`: each row to every rank in
/// `holders(expert)`, for each expert chosen for it.
pub fn plan_sends(
    first: usize,
    routings: &[Routing],
    world: usize,
    holders: impl Fn(usize) -> Range<usize>,
) -> Sends {
    let mut sends = vec![Vec::new(); world];
    for (i, routing) in routings.iter().enumerate() {
        for (&expert, &weight) in routing.experts.iter().zip(&routing.weights) {
            for p in holders(expert) {
                sends[p].push(Sent {
                    row: first + i,
                    expert,
                    weight,
                });
            }
        }
    }
    sends
}

/// Rows per rank of one chunk's sends.
fn counts(sends: &Sends) -> Vec<usize> {
    sends.iter().map(Vec::len).collect()
}

/// `counts` in floats, for rows `width` floats wide.
fn floats(counts: &[usize], width: usize) -> Vec<usize> {
    counts.iter().map(|n| n * width).collect()
}

/// `v` as a whole number in `0..=max`, if it is one.
fn whole(v: f32, max: usize) -> Option<usize> {
    (v >= 0.0 && v.fract() == 0.0 && v <= max as f32).then_some(v as usize)
}

/// What rank `from` sent rank `me` that cannot be used.
fn bad_from(from: usize, me: usize, what: String) -> ModelError {
    ModelError::Invalid(format!(
        "expert dispatch: rank {from} sent rank {me} {what}"
    ))
}

/// The rows arriving per chunk and rank (`[chunk][rank]`) from the counts every rank sent
/// (rank-major: `chunks` counts from each rank), each checked to be at most `max`.
fn arriving_counts(
    received: &[f32],
    chunks: usize,
    world: usize,
    max: usize,
    me: usize,
) -> Result<Vec<Vec<usize>>> {
    if received.len() != chunks * world {
        return Err(ModelError::Invalid(format!(
            "expert dispatch: rank {me} received {} row counts, expected {}",
            received.len(),
            chunks * world
        )));
    }
    let mut rows = vec![vec![0; world]; chunks];
    for (from, theirs) in received.chunks_exact(chunks).enumerate() {
        for (c, &v) in theirs.iter().enumerate() {
            rows[c][from] = whole(v, max).ok_or_else(|| {
                bad_from(
                    from,
                    me,
                    format!("a count of {v} rows for chunk {c}; at most {max} can come"),
                )
            })?;
        }
    }
    Ok(rows)
}

/// The received rows (`width` floats each, the expert id first; `arriving[p]` of them from rank
/// p) grouped by expert: indices of rows, for each of `n_experts`. Every expert id must be one
/// that `holds`.
fn group_by_expert(
    received: &[f32],
    arriving: &[usize],
    width: usize,
    n_experts: usize,
    holds: impl Fn(usize) -> bool,
    me: usize,
) -> Result<Vec<Vec<usize>>> {
    let total: usize = arriving.iter().sum();
    if received.len() != total * width {
        return Err(ModelError::Invalid(format!(
            "expert dispatch: rank {me} received {} floats of rows, expected {}",
            received.len(),
            total * width
        )));
    }
    let senders = arriving
        .iter()
        .enumerate()
        .flat_map(|(p, &n)| std::iter::repeat_n(p, n));
    let mut by_expert = vec![Vec::new(); n_experts];
    for (i, (row, from)) in received.chunks_exact(width).zip(senders).enumerate() {
        let expert = whole(row[0], n_experts)
            .filter(|&e| e < n_experts && holds(e))
            .ok_or_else(|| {
                bad_from(
                    from,
                    me,
                    format!("a row for expert {}, which it does not hold", row[0]),
                )
            })?;
        by_expert[expert].push(i);
    }
    Ok(by_expert)
}

/// Adds `results` (`hidden` floats per sent row, in the order of `sends`), weighted, into the
/// sent rows of `out`.
fn combine(
    sends: &Sends,
    results: &[f32],
    hidden: usize,
    out: &mut [f32],
    me: usize,
) -> Result<()> {
    let total: usize = sends.iter().map(Vec::len).sum();
    if results.len() != total * hidden {
        return Err(ModelError::Invalid(format!(
            "expert dispatch: rank {me} got {} floats of expert results back, expected {}",
            results.len(),
            total * hidden
        )));
    }
    for (s, y) in sends.iter().flatten().zip(results.chunks_exact(hidden)) {
        axpy(s.weight, y, &mut out[s.row * hidden..(s.row + 1) * hidden]);
    }
    Ok(())
}

/// One layer's dispatch on one rank.
struct Dispatch<'a> {
    moe: &'a MoeWeights,
    plan: &'a Plan,
    ranks: &'a mut dyn Reduce,
    hidden: usize,
}

impl Dispatch<'_> {
    /// Adds this rank's own rows' routed-expert output for the normed rows `xn` to `out`.
    fn run(&mut self, xn: &[f32], out: &mut [f32]) -> Result<()> {
        let (h, world, me) = (self.hidden, self.plan.world(), self.plan.rank());
        let rows = xn.len() / h;
        let own = own_rows(rows, world, me);
        // The same chunk count on every rank (from the largest share), so that every rank takes
        // part in every exchange, with nothing to send where its share is shorter.
        let chunks = rows.div_ceil(world).div_ceil(DISPATCH_CHUNK).max(1);
        let n_experts = self.moe.experts.len();
        let sends: Vec<Sends> = (0..chunks)
            .map(|c| {
                let start = (own.start + c * DISPATCH_CHUNK).min(own.end);
                let end = (start + DISPATCH_CHUNK).min(own.end);
                let routings: Vec<Routing> = xn[start * h..end * h]
                    .chunks_exact(h)
                    .map(|row| self.moe.route(row))
                    .collect();
                plan_sends(start, &routings, world, |e| {
                    self.plan.expert_ranks(e, n_experts)
                })
            })
            .collect();
        let arriving = self.exchange_counts(&sends)?;
        let mut incoming = self.send_rows(&sends[0], xn, &arriving[0])?;
        let mut returning: Option<(usize, Pending)> = None;
        for c in 0..chunks {
            // Chunk c + 1's rows travel while chunk c computes.
            let following = match sends.get(c + 1) {
                Some(next) => self.send_rows(next, xn, &arriving[c + 1])?,
                None => Pending::ready(Vec::new()),
            };
            let received = std::mem::replace(&mut incoming, following).wait()?;
            let results = self.run_experts(&received, &arriving[c])?;
            let back = self.ranks.all_to_all_v(
                results,
                &floats(&arriving[c], h),
                &floats(&counts(&sends[c]), h),
            )?;
            // Chunk c - 1's results have travelled while chunk c computed.
            if let Some((done, results)) = returning.replace((c, back)) {
                combine(&sends[done], &results.wait()?, h, out, me)?;
            }
        }
        if let Some((done, results)) = returning {
            combine(&sends[done], &results.wait()?, h, out, me)?;
        }
        Ok(())
    }

    /// Tells every rank how many rows it gets from this one in each chunk, and learns the same.
    fn exchange_counts(&mut self, sends: &[Sends]) -> Result<Vec<Vec<usize>>> {
        let (world, chunks) = (self.plan.world(), sends.len());
        let mine: Vec<f32> = (0..world)
            .flat_map(|p| sends.iter().map(move |s| s[p].len() as f32))
            .collect();
        let per_rank = vec![chunks; world];
        let theirs = self
            .ranks
            .all_to_all_v(mine, &per_rank, &per_rank)?
            .wait()?;
        // A row goes to a rank at most once per chosen expert.
        let max = DISPATCH_CHUNK * self.moe.top_k;
        arriving_counts(&theirs, chunks, world, max, self.plan.rank())
    }

    /// Starts sending one chunk's rows, each `[expert, x...]`, to the experts' ranks.
    fn send_rows(&mut self, sends: &Sends, xn: &[f32], arriving: &[usize]) -> Result<Pending> {
        let h = self.hidden;
        let mut buf = Vec::with_capacity(sends.iter().map(Vec::len).sum::<usize>() * (h + 1));
        for s in sends.iter().flatten() {
            buf.push(s.expert as f32);
            buf.extend_from_slice(&xn[s.row * h..(s.row + 1) * h]);
        }
        self.ranks.all_to_all_v(
            buf,
            &floats(&counts(sends), h + 1),
            &floats(arriving, h + 1),
        )
    }

    /// This rank's experts over the received rows (one matmul per expert): `hidden` floats per
    /// row, in the order received.
    fn run_experts(&self, received: &[f32], arriving: &[usize]) -> Result<Vec<f32>> {
        let (h, experts) = (self.hidden, &self.moe.experts);
        let by_expert = group_by_expert(
            received,
            arriving,
            h + 1,
            experts.len(),
            |e| experts[e].is_some(),
            self.plan.rank(),
        )?;
        let mut results = vec![0.0f32; arriving.iter().sum::<usize>() * h];
        for (expert, rows) in experts.iter().zip(&by_expert) {
            let Some(expert) = expert.as_ref().filter(|_| !rows.is_empty()) else {
                continue;
            };
            let xs = rows
                .iter()
                .map(|&i| &received[i * (h + 1) + 1..(i + 1) * (h + 1)]);
            expert.forward_gathered(xs, |j, y| {
                results[rows[j] * h..(rows[j] + 1) * h].copy_from_slice(y);
            });
        }
        Ok(results)
    }
}

impl Layer {
    /// The FFN segment of several rows with the routed experts dispatched over `ranks` (see the
    /// module doc); the shared expert runs as in [`Layer::ffn_forward`], and so does a dense FFN.
    /// Says what `out` holds: this rank's own rows, whole, or (with a shared expert or a dense
    /// FFN) a partial sum of every row.
    pub fn ffn_forward_dispatched(
        &self,
        x: &[f32],
        out: &mut [f32],
        plan: &Plan,
        ranks: &mut dyn Reduce,
    ) -> Result<FfnPart> {
        let FfnWeights::Moe(moe) = &self.ffn else {
            // Several rows run as matrix products: the decode submission mode does not apply.
            self.ffn_forward(x, Exec::Split, out);
            return Ok(FfnPart::Sum);
        };
        if (ranks.world(), ranks.rank()) != (plan.world(), plan.rank()) {
            return Err(ModelError::Invalid(format!(
                "expert dispatch: the weights are sliced for rank {} of {}, but this is rank {} of {}",
                plan.rank(),
                plan.world(),
                ranks.rank(),
                ranks.world()
            )));
        }
        let hidden = self.post_norm.len();
        let xn = self.ffn_norm(x);
        out.fill(0.0);
        Dispatch {
            moe,
            plan,
            ranks,
            hidden,
        }
        .run(&xn, out)?;
        if moe.shared.is_none() {
            return Ok(FfnPart::OwnRows);
        }
        moe.add_shared(&xn, x.len() / hidden, out);
        Ok(FfnPart::Sum)
    }
}

/// Puts every rank's own rows of `part` (`hidden` wide; see [`own_rows`]) together on every
/// rank: one all-gather of equal pieces, each rank's share padded to the largest.
pub fn gather_own_rows(part: &mut [f32], hidden: usize, ranks: &mut dyn Reduce) -> Result<()> {
    let (world, rows) = (ranks.world(), part.len() / hidden);
    let piece = rows.div_ceil(world) * hidden;
    let own = own_rows(rows, world, ranks.rank());
    let mut mine = vec![0.0f32; piece];
    mine[..own.len() * hidden].copy_from_slice(&part[own.start * hidden..own.end * hidden]);
    let mut all = vec![0.0f32; world * piece];
    ranks.all_gather(&mine, &mut all)?;
    for (p, theirs) in all.chunks_exact(piece.max(1)).enumerate() {
        let r = own_rows(rows, world, p);
        part[r.start * hidden..r.end * hidden].copy_from_slice(&theirs[..r.len() * hidden]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_rows_split_the_rows_into_contiguous_shares() {
        for rows in [0, 1, 5, 64, 130] {
            for world in [1, 2, 3, 4, 8] {
                let shares: Vec<_> = (0..world).map(|r| own_rows(rows, world, r)).collect();
                assert_eq!(shares[0].start, 0);
                assert_eq!(shares[world - 1].end, rows);
                for w in shares.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() == w[1].len() || w[0].len() == w[1].len() + 1);
                }
            }
        }
        assert_eq!(own_rows(10, 4, 1), 3..6);
        assert_eq!(own_rows(10, 4, 3), 8..10);
    }

    #[test]
    fn each_row_goes_to_every_shard_of_its_experts() {
        // 4 ranks, 2 expert groups: experts 0-3 on ranks 0-1, experts 4-7 on ranks 2-3.
        let plan = Plan::new(4, 2, 0).unwrap();
        let routings = [
            Routing {
                experts: vec![5, 1],
                weights: vec![0.75, 0.25],
            },
            Routing {
                experts: vec![2, 3],
                weights: vec![0.5, 0.5],
            },
        ];
        let sends = plan_sends(10, &routings, 4, |e| plan.expert_ranks(e, 8));
        let sent = |row, expert, weight| Sent {
            row,
            expert,
            weight,
        };
        let low = vec![sent(10, 1, 0.25), sent(11, 2, 0.5), sent(11, 3, 0.5)];
        let high = vec![sent(10, 5, 0.75)];
        assert_eq!(sends, vec![low.clone(), low, high.clone(), high]);
        assert_eq!(counts(&sends), vec![3, 3, 1, 1]);
        assert_eq!(floats(&counts(&sends), 5), vec![15, 15, 5, 5]);
    }

    #[test]
    fn counts_that_cannot_be_are_refused_naming_the_sender() {
        // Two chunks from each of two ranks, rank-major.
        let ok = arriving_counts(&[1.0, 2.0, 3.0, 0.0], 2, 2, 8, 0).unwrap();
        assert_eq!(ok, vec![vec![1, 3], vec![2, 0]]);
        for bad in [9.0, -1.0, 1.5, f32::NAN] {
            let e = arriving_counts(&[1.0, 2.0, bad, 0.0], 2, 2, 8, 0).unwrap_err();
            assert!(e.to_string().contains("rank 1 sent rank 0"), "{e}");
        }
        let e = arriving_counts(&[1.0, 2.0, 3.0], 2, 2, 8, 0).unwrap_err();
        assert!(
            e.to_string().contains("rank 0 received 3 row counts"),
            "{e}"
        );
    }

    #[test]
    fn rows_are_grouped_by_expert_and_foreign_experts_refused() {
        // Rows two floats wide: rank 0 sent one row (expert 1), rank 1 two (experts 0 and 1).
        let received = [1.0, 0.1, 0.0, 0.2, 1.0, 0.3];
        let groups = group_by_expert(&received, &[1, 2], 2, 4, |e| e < 2, 1).unwrap();
        assert_eq!(groups, vec![vec![1], vec![0, 2], vec![], vec![]]);
        let e = group_by_expert(&received, &[1, 2], 2, 4, |e| e == 1, 1).unwrap_err();
        assert!(
            e.to_string()
                .contains("rank 1 sent rank 1 a row for expert 0"),
            "{e}"
        );
        for bad in [3.0, 4.0, 0.5, -1.0, f32::INFINITY] {
            let rows = [1.0, 0.1, bad, 0.2, 1.0, 0.3];
            let e = group_by_expert(&rows, &[1, 2], 2, 4, |e| e != 3, 0).unwrap_err();
            assert!(e.to_string().contains("rank 1 sent rank 0"), "{e}");
        }
        let e = group_by_expert(&received[..5], &[1, 2], 2, 4, |_| true, 0).unwrap_err();
        assert!(e.to_string().contains("received 5 floats"), "{e}");
    }

    #[test]
    fn results_are_added_weighted_into_the_sent_rows() {
        let sends = vec![
            vec![Sent {
                row: 1,
                expert: 0,
                weight: 0.5,
            }],
            vec![Sent {
                row: 1,
                expert: 2,
                weight: 2.0,
            }],
        ];
        let mut out = vec![0.0f32; 6];
        combine(&sends, &[2.0, 4.0, 1.0, 1.0], 2, &mut out, 0).unwrap();
        assert_eq!(out, [0.0, 0.0, 3.0, 4.0, 0.0, 0.0]);
        let e = combine(&sends, &[2.0, 4.0, 1.0], 2, &mut out, 0).unwrap_err();
        assert!(e.to_string().contains("got 3 floats"), "{e}");
    }
}
