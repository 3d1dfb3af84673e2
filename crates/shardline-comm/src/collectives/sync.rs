//! Barrier and point-to-point messages.

use crate::elem::DType;
use crate::engine::Engine;
use crate::error::Result;
use crate::progress::{Incoming, Outgoing, Recvs, Region, Sends, Sink, Source};
use crate::wire::OpCode;

impl Engine {
    /// Returns once every rank has entered the barrier (an empty frame to and from every peer).
    pub(crate) fn barrier(&mut self) -> Result<()> {
        let tag = self.next_tag();
        let h = Engine::header(OpCode::Barrier, DType::U8, tag, 0, 0);
        let me = self.rank;
        let mut sends: Sends = (0..self.size)
            .filter(|&p| p != me)
            .map(|p| Outgoing::new(p, h, &[]))
            .collect();
        let mut recvs: Recvs = (0..self.size)
            .filter(|&p| p != me)
            .map(|p| Incoming::new(Source::Peer(p), h, Sink::Copy(Region::one(&mut []))))
            .collect();
        self.links
            .run(&mut sends, &mut recvs, false, OpCode::Barrier)
    }

    /// Sends `send` to `dst` and receives `recv` from `src` at once (either may be absent). The
    /// user `tag` must match on both sides.
    pub(crate) fn send_recv(
        &mut self,
        send: Option<(usize, &[u8])>,
        recv: Option<(usize, &mut [u8])>,
        dtype: DType,
        tag: u32,
    ) -> Result<()> {
        let h = |len: usize| Engine::header(OpCode::P2p, dtype, tag, len, len);
        let mut sends: Sends = send
            .into_iter()
            .map(|(p, d)| Outgoing::new(p, h(d.len()), d))
            .collect();
        let mut recvs: Recvs = recv
            .into_iter()
            .map(|(p, b)| Incoming::new(Source::Peer(p), h(b.len()), Sink::Copy(Region::one(b))))
            .collect();
        self.links.run(&mut sends, &mut recvs, false, OpCode::P2p)
    }
}
