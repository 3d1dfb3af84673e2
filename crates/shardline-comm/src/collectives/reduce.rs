//! Reducing collectives: all_reduce (direct or ring) and reduce_scatter. Results are bitwise equal
//! on every rank: with more than two ranks a sum is accumulated in rank order (f32 addition is
//! commutative but not associative), the ring reduces each chunk once and then copies it, and a
//! max, or a sum of two values, is the same in any order.

use super::{chunk, split2};
use crate::elem::{self, DType, ReduceOp};
use crate::engine::{Algo, Engine, DIRECT_MAX_BYTES};
use crate::error::Result;
use crate::progress::{Incoming, Outgoing, Recvs, Region, Sends, Sink, Source};
use crate::wire::{Header, OpCode};

impl Engine {
    pub(crate) fn all_reduce(
        &mut self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        algo: Option<Algo>,
    ) -> Result<()> {
        let tag = self.next_tag();
        if self.size == 1 {
            return Ok(());
        }
        match algo
            .or(self.algo)
            .unwrap_or(self.all_reduce_algo(buf.len()))
        {
            Algo::Direct => {
                let h = Engine::header(OpCode::AllReduce, dtype, tag, buf.len(), buf.len());
                if self.size > 2 && op == ReduceOp::Sum {
                    // `buf` stays unchanged until the ordered sum is stored: send it as it is.
                    self.accumulate_in_rank_order(|_| &*buf, &*buf, h, op)?;
                    elem::store(dtype, &self.scratch.acc[..buf.len() / dtype.size()], buf);
                    return Ok(());
                }
                // Reduced in place, so `buf` must not change while a send still reads it. Small
                // messages usually go out whole at the first try; otherwise the rest is sent from
                // a snapshot (scratch taken out of `self` and put back: nothing is allocated).
                let me = self.rank;
                let mut sends: Sends = (0..self.size)
                    .filter(|&p| p != me)
                    .map(|p| Outgoing::new(p, h, &*buf))
                    .collect();
                if self.links.push_once(&mut sends)? {
                    drop(sends);
                    return self.reduce_as_they_come(Sends::new(), h, buf, op);
                }
                self.scratch.bytes(buf.len());
                let mut snap = std::mem::take(&mut self.scratch.bytes);
                let own = &mut snap[..buf.len()];
                own.copy_from_slice(buf);
                let own: &[u8] = own;
                let moved: Sends = sends.iter().map(|s| s.moved_to(own)).collect();
                drop(sends);
                let r = self.reduce_as_they_come(moved, h, buf, op);
                self.scratch.bytes = snap;
                r
            }
            Algo::Ring => self.all_reduce_ring(buf, dtype, op, tag),
            Algo::Doubling if self.size.is_power_of_two() => {
                self.all_reduce_doubling(buf, dtype, op, tag)
            }
            Algo::Doubling => self.all_reduce_ring(buf, dtype, op, tag),
        }
    }

    /// The all-reduce for `bytes` unless one is forced: small buffers go whole to the peers in
    /// one round (direct), large ones around the ring (least traffic). When more than two ranks
    /// share too few cores, the direct exchange has each rank wait on every other, each wait
    /// costing a turn of the scheduler: small buffers then take recursive doubling (log2(ranks)
    /// pairwise steps) and large ones the ring, which waits on one neighbour at a time
    /// (docs/performance.md, collectives over UCX).
    pub(crate) fn all_reduce_algo(&self, bytes: usize) -> Algo {
        match (bytes <= DIRECT_MAX_BYTES, self.crowded) {
            (true, false) => Algo::Direct,
            (true, true) => Algo::Doubling,
            (false, _) => Algo::Ring,
        }
    }

    /// Recursive doubling: in step d (1, 2, 4, ...) each rank exchanges its whole partial result
    /// with rank `me ^ d`, so log2(size) steps in all, each waiting on one peer. Both ranks of a
    /// step add the same two partial sums (in either order, which gives the same value), so every
    /// rank ends with the same bits. `size` is a power of two.
    fn all_reduce_doubling(
        &mut self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        tag: u32,
    ) -> Result<()> {
        let (me, size) = (self.rank, self.size);
        let h = Engine::header(OpCode::AllReduce, dtype, tag, buf.len(), buf.len());
        // `buf` is reduced in place while the peer still reads this rank's partial: that goes
        // from a snapshot (scratch taken out of `self` and put back: nothing is allocated).
        self.scratch.bytes(buf.len());
        let mut snap = std::mem::take(&mut self.scratch.bytes);
        let mut r = Ok(());
        let mut d = 1;
        while d < size && r.is_ok() {
            let partner = me ^ d;
            let own = &mut snap[..buf.len()];
            own.copy_from_slice(buf);
            let mut sends: Sends = Sends::new();
            sends.push(Outgoing::new(partner, h, &*own));
            let mut recvs: Recvs = Recvs::new();
            recvs.push(Incoming::new(
                Source::Peer(partner),
                h,
                Sink::Reduce {
                    dst: Region::one(&mut *buf),
                    op,
                },
            ));
            r = self
                .links
                .run(&mut sends, &mut recvs, false, OpCode::AllReduce);
            d *= 2;
        }
        self.scratch.bytes = snap;
        r
    }

    /// Drives `sends` and reduces what each peer sends under header `h` into `dst` as it comes
    /// (`dst` holds this rank's contribution already): for reductions whose result does not
    /// depend on the order.
    fn reduce_as_they_come(
        &mut self,
        mut sends: Sends,
        h: Header,
        dst: &mut [u8],
        op: ReduceOp,
    ) -> Result<()> {
        let (me, size) = (self.rank, self.size);
        let mut regions = Region::alias(dst, size);
        let mut recvs: Recvs = (0..size)
            .filter(|&p| p != me)
            .map(|p| {
                let dst = regions.next().unwrap();
                Incoming::new(Source::Peer(p), h, Sink::Reduce { dst, op })
            })
            .collect();
        self.links.run(&mut sends, &mut recvs, false, h.op)
    }

    /// Sends `block(p)` to every peer p and accumulates everyone's contribution (this rank's is
    /// `own`) in f32, in rank order, into `self.scratch.acc`, where the caller picks it up.
    fn accumulate_in_rank_order<'s>(
        &mut self,
        block: impl Fn(usize) -> &'s [u8],
        own: &'s [u8],
        h: Header,
        op: ReduceOp,
    ) -> Result<()> {
        let (me, size) = (self.rank, self.size);
        let mut sends: Sends = (0..size)
            .filter(|&p| p != me)
            .map(|p| Outgoing::new(p, h, block(p)))
            .collect();
        let acc = self.scratch.acc(own.len() / h.dtype.size());
        let mut regions = Region::alias_f32(acc, size);
        let mut recvs: Recvs = (0..size)
            .map(|k| {
                let source = if k == me {
                    Source::Local(own)
                } else {
                    Source::Peer(k)
                };
                let acc = regions.next().unwrap();
                Incoming::new(
                    source,
                    h,
                    Sink::Accumulate {
                        acc,
                        op,
                        first: k == 0,
                    },
                )
            })
            .collect();
        self.links.run(&mut sends, &mut recvs, true, h.op)
    }

    fn all_reduce_ring(
        &mut self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        tag: u32,
    ) -> Result<()> {
        let (me, size, esize) = (self.rank, self.size, dtype.size());
        let n = buf.len() / esize;
        let (next, prev) = ((me + 1) % size, (me + size - 1) % size);
        let total = buf.len();
        // Reduce-scatter: after size-1 steps this rank holds the full sum of chunk me+1.
        // All-gather: then the finished chunks travel once around the ring.
        for phase in 0..2 {
            for s in 0..size - 1 {
                let (sc, rc) = if phase == 0 {
                    ((me + size - s) % size, (me + 2 * size - s - 1) % size)
                } else {
                    ((me + 1 + size - s) % size, (me + size - s) % size)
                };
                let (sr, rr) = (chunk(n, size, sc, esize), chunk(n, size, rc, esize));
                let (slen, rlen) = (sr.len(), rr.len());
                let (src, dst) = split2(buf, sr, rr);
                let mut sends: Sends = Sends::new();
                sends.push(Outgoing::new(
                    next,
                    Engine::header(OpCode::AllReduce, dtype, tag, total, slen),
                    src,
                ));
                let rh = Engine::header(OpCode::AllReduce, dtype, tag, total, rlen);
                let sink = if phase == 0 {
                    Sink::Reduce {
                        dst: Region::one(dst),
                        op,
                    }
                } else {
                    Sink::Copy(Region::one(dst))
                };
                let mut recvs: Recvs = Recvs::new();
                recvs.push(Incoming::new(Source::Peer(prev), rh, sink));
                self.links
                    .run(&mut sends, &mut recvs, false, OpCode::AllReduce)?;
            }
        }
        Ok(())
    }

    /// `output` (this rank's block) = op over ranks of block `rank` of their `input`.
    pub(crate) fn reduce_scatter(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let tag = self.next_tag();
        let (me, size, esize) = (self.rank, self.size, dtype.size());
        let block = output.len();
        let blocks = |p: usize| &input[p * block..(p + 1) * block];
        if size == 1 {
            output.copy_from_slice(input);
            return Ok(());
        }
        let h = Engine::header(OpCode::ReduceScatter, dtype, tag, input.len(), block);
        debug_assert_eq!(block % esize, 0);
        if size == 2 || op == ReduceOp::Max {
            output.copy_from_slice(blocks(me));
            let sends: Sends = (0..size)
                .filter(|&p| p != me)
                .map(|p| Outgoing::new(p, h, blocks(p)))
                .collect();
            self.reduce_as_they_come(sends, h, output, op)
        } else {
            self.accumulate_in_rank_order(blocks, blocks(me), h, op)?;
            elem::store(dtype, &self.scratch.acc[..block / esize], output);
            Ok(())
        }
    }
}
