//! Collectives that only move data: all_gather, broadcast and all_to_all(v). Each is one direct
//! exchange: every transfer is posted at once and the progress engine streams them together.

use super::blocks_mut;
use crate::elem::DType;
use crate::engine::Engine;
use crate::error::{CommError, Result};
use crate::progress::{Incoming, Outgoing, Recvs, Region, Sends, Sink, Source};
use crate::wire::OpCode;

impl Engine {
    /// `output` = every rank's `input`, in rank order.
    pub(crate) fn all_gather(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
    ) -> Result<()> {
        let block = input.len();
        let counts: smallvec::SmallVec<[usize; 16]> = (0..self.size).map(|_| block).collect();
        self.exchange_blocks(
            OpCode::AllGather,
            dtype,
            |_| input,
            &counts,
            output,
            input.len(),
        )
    }

    /// Block p of `input` goes to rank p; block p of `output` comes from rank p (byte counts).
    pub(crate) fn all_to_all_v(
        &mut self,
        input: &[u8],
        send_counts: &[usize],
        output: &mut [u8],
        recv_counts: &[usize],
        dtype: DType,
    ) -> Result<()> {
        let mut offsets: smallvec::SmallVec<[usize; 17]> = smallvec::smallvec![0];
        for c in send_counts {
            offsets.push(offsets.last().unwrap() + c);
        }
        if send_counts[self.rank] != recv_counts[self.rank] {
            return Err(CommError::InvalidArgument(format!(
                "all_to_all_v: rank {} sends itself {} bytes but expects {}",
                self.world_rank(),
                send_counts[self.rank],
                recv_counts[self.rank]
            )));
        }
        self.exchange_blocks(
            OpCode::AllToAll,
            dtype,
            |p| &input[offsets[p]..offsets[p + 1]],
            recv_counts,
            output,
            input.len(),
        )
    }

    /// The common exchange: `block(p)` to rank p (its own block copied locally), rank p's block
    /// into the p-th `recv_counts` piece of `output`. Headers carry `total` (the sender's whole
    /// input length) only for all_gather, where every rank's must agree.
    fn exchange_blocks<'s>(
        &mut self,
        op: OpCode,
        dtype: DType,
        block: impl Fn(usize) -> &'s [u8],
        recv_counts: &[usize],
        output: &mut [u8],
        total: usize,
    ) -> Result<()> {
        let tag = self.next_tag();
        let (me, size) = (self.rank, self.size);
        let header = |len: usize| {
            let total = if op == OpCode::AllGather { total } else { len };
            Engine::header(op, dtype, tag, total, len)
        };
        let mut blocks = blocks_mut(output, recv_counts.iter().copied());
        blocks[me].copy_from_slice(block(me));
        let mut sends: Sends = (0..size)
            .filter(|&p| p != me)
            .map(|p| Outgoing::new(p, header(block(p).len()), block(p)))
            .collect();
        let mut recvs: Recvs = blocks
            .into_iter()
            .enumerate()
            .filter(|(p, _)| *p != me)
            .map(|(p, b)| {
                Incoming::new(
                    Source::Peer(p),
                    header(recv_counts[p]),
                    Sink::Copy(Region::one(b)),
                )
            })
            .collect();
        self.links.run(&mut sends, &mut recvs, false, op)
    }

    /// Every rank's `buf` = `root`'s.
    pub(crate) fn broadcast(&mut self, buf: &mut [u8], root: usize, dtype: DType) -> Result<()> {
        let tag = self.next_tag();
        let h = Engine::header(OpCode::Broadcast, dtype, tag, buf.len(), buf.len());
        if self.rank == root {
            let mut sends: Sends = (0..self.size)
                .filter(|&p| p != root)
                .map(|p| Outgoing::new(p, h, buf))
                .collect();
            self.links
                .run(&mut sends, &mut [], false, OpCode::Broadcast)
        } else {
            let mut recvs: Recvs = Recvs::new();
            recvs.push(Incoming::new(
                Source::Peer(root),
                h,
                Sink::Copy(Region::one(buf)),
            ));
            self.links
                .run(&mut [], &mut recvs, false, OpCode::Broadcast)
        }
    }
}
