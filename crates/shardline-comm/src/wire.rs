//! The frame header every message carries on every transport: what collective it belongs to, its
//! dtype, a tag (collective sequence number or user tag), the collective's total size and this
//! frame's payload length, protected by a magic number and a checksum. Payloads are padded to 8
//! bytes so that every payload starts 8-aligned within a stream.

use crate::elem::DType;

/// Bytes of an encoded header.
pub const HEADER_LEN: usize = 32;
const MAGIC: u32 = 0x5343_4c53; // "SLCS"
/// No frame may claim more than this many bytes (1 TiB): a larger value is garbage.
pub(crate) const MAX_LEN: u64 = 1 << 40;

/// What a frame is part of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum OpCode {
    AllReduce = 1,
    AllGather = 2,
    ReduceScatter = 3,
    Broadcast = 4,
    AllToAll = 5,
    Barrier = 6,
    P2p = 7,
    /// A heartbeat (tcp): an empty frame between two others, dropped by the receiver.
    Heartbeat = 8,
}

impl OpCode {
    pub(crate) fn from_code(code: u8) -> Option<OpCode> {
        Some(match code {
            1 => OpCode::AllReduce,
            2 => OpCode::AllGather,
            3 => OpCode::ReduceScatter,
            4 => OpCode::Broadcast,
            5 => OpCode::AllToAll,
            6 => OpCode::Barrier,
            7 => OpCode::P2p,
            8 => OpCode::Heartbeat,
            _ => return None,
        })
    }

    /// Name used in errors and benchmark records.
    pub fn name(self) -> &'static str {
        match self {
            OpCode::AllReduce => "all_reduce",
            OpCode::AllGather => "all_gather",
            OpCode::ReduceScatter => "reduce_scatter",
            OpCode::Broadcast => "broadcast",
            OpCode::AllToAll => "all_to_all",
            OpCode::Barrier => "barrier",
            OpCode::P2p => "send/recv",
            OpCode::Heartbeat => "heartbeat",
        }
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub op: OpCode,
    pub dtype: DType,
    pub tag: u32,
    /// Bytes of the whole collective on the sending rank (the caller's buffer length).
    pub total: u64,
    /// Payload bytes of this frame.
    pub len: u64,
}

pub(crate) fn checksum(bytes: &[u8]) -> u32 {
    // FNV-1a: enough to tell a header from stray bytes; not a security measure.
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    })
}

/// Rounds a payload length up to the 8-byte frame alignment.
pub fn padded(len: usize) -> usize {
    (len + 7) & !7
}

/// The heartbeat frame: a header alone (no payload), the same every time.
pub fn heartbeat_frame() -> [u8; HEADER_LEN] {
    Header {
        op: OpCode::Heartbeat,
        dtype: DType::U8,
        tag: 0,
        total: 0,
        len: 0,
    }
    .encode()
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = self.op as u8;
        b[5] = self.dtype as u8;
        b[8..12].copy_from_slice(&self.tag.to_le_bytes());
        b[12..20].copy_from_slice(&self.total.to_le_bytes());
        b[20..28].copy_from_slice(&self.len.to_le_bytes());
        let sum = checksum(&b[..28]);
        b[28..32].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Decodes and checks a header; the error text says which field was wrong.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, String> {
        let word = |r: std::ops::Range<usize>| u32::from_le_bytes(b[r].try_into().unwrap());
        let dword = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().unwrap());
        if word(0..4) != MAGIC {
            return Err(format!("bad magic {:#010x}", word(0..4)));
        }
        if word(28..32) != checksum(&b[..28]) {
            return Err("header checksum does not match".into());
        }
        let op = OpCode::from_code(b[4]).ok_or_else(|| format!("unknown op code {}", b[4]))?;
        let dtype = DType::from_code(b[5]).ok_or_else(|| format!("unknown dtype code {}", b[5]))?;
        let (total, len) = (dword(12..20), dword(20..28));
        if total > MAX_LEN || len > total {
            return Err(format!(
                "impossible lengths: frame {len} bytes of a {total}-byte total"
            ));
        }
        if len % dtype.size() as u64 != 0 {
            return Err(format!(
                "{len} bytes is not a whole number of {} elements",
                dtype.name()
            ));
        }
        Ok(Header {
            op,
            dtype,
            tag: word(8..12),
            total,
            len,
        })
    }

    /// Compares a received header with what this rank expects; `Err` describes the difference.
    pub fn check_matches(&self, expected: &Header) -> Result<(), String> {
        let what = |h: &Header| format!("{} #{} ({})", h.op.name(), h.tag, h.dtype.name());
        if (self.op, self.tag, self.dtype) != (expected.op, expected.tag, expected.dtype) {
            return Err(format!(
                "it sent {} while this rank runs {} (collectives called in a different order?)",
                what(self),
                what(expected)
            ));
        }
        if self.total != expected.total || self.len != expected.len {
            return Err(format!(
                "{}: it sent {} bytes of a {}-byte buffer, this rank expects {} of {} \
                 (different lengths on different ranks?)",
                what(self),
                self.len,
                self.total,
                expected.len,
                expected.total
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            op: OpCode::AllReduce,
            dtype: DType::F16,
            tag: 7,
            total: 64,
            len: 32,
        }
    }

    #[test]
    fn round_trip() {
        assert_eq!(Header::decode(&sample().encode()), Ok(sample()));
        let beat = Header::decode(&heartbeat_frame()).unwrap();
        assert_eq!((beat.op, beat.len), (OpCode::Heartbeat, 0));
    }

    #[test]
    fn every_corrupted_byte_is_caught() {
        let good = sample().encode();
        for i in 0..HEADER_LEN {
            let mut bad = good;
            bad[i] ^= 0x40;
            assert!(
                Header::decode(&bad).is_err(),
                "flipping byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn lengths_are_checked_before_use() {
        let mut h = sample();
        h.len = 3; // not whole f16 elements
        assert!(Header::decode(&h.encode())
            .unwrap_err()
            .contains("whole number"));
        h.len = u64::MAX;
        h.total = u64::MAX;
        assert!(Header::decode(&h.encode())
            .unwrap_err()
            .contains("impossible"));
    }

    #[test]
    fn mismatches_are_described() {
        let mut other = sample();
        other.total = 128;
        other.len = 64;
        assert!(other
            .check_matches(&sample())
            .unwrap_err()
            .contains("different lengths"));
        other = sample();
        other.op = OpCode::AllGather;
        assert!(other
            .check_matches(&sample())
            .unwrap_err()
            .contains("different order"));
    }
}
