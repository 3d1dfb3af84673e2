//! Where the fields of each ggml block live: byte offsets and sizes of ggml-common.h's
//! `block_q4_0`, `block_q8_0`, `block_q4_K`, `block_q5_K` and `block_q6_K` (packed, little-endian),
//! and the f16 reader every block format uses for its scales.

use half::f16;

/// Elements in a Q4_0 or Q8_0 block.
pub(super) const QK: usize = 32;
/// Elements in a K-quant super-block (Q4_K, Q5_K, Q6_K; also Q8_K activations).
pub(super) const QK_K: usize = 256;

/// Q4_0: f16 scale `d`, then 16 bytes holding element `j` in the low nibble of byte `j` and
/// element `j + 16` in the high nibble; an element is `d * (nibble - 8)`.
pub(super) mod q4_0 {
    pub const BYTES: usize = 18;
    pub const QS: usize = 2;
}

/// Q8_0: f16 scale `d`, then 32 signed bytes; an element is `d * q`.
pub(super) mod q8_0 {
    pub const BYTES: usize = 34;
    pub const QS: usize = 2;
}

/// Q4_K: f16 `d` and `dmin`, 12 bytes of eight 6-bit scales and mins (see `kscale`), then 128
/// bytes: for each 64 elements, 32 bytes with the first 32 in the low nibbles and the next 32 in
/// the high nibbles. Element `i` of sub-block `j` is `d * scale_j * q - dmin * min_j`.
pub(super) mod q4_k {
    pub const BYTES: usize = 144;
    pub const DMIN: usize = 2;
    pub const SCALES: usize = 4;
    pub const QS: usize = 16;
}

/// Q5_K: as Q4_K with 32 bytes of fifth bits before the nibbles: bit `j` of byte `l` is the high
/// bit of element `l` of sub-block `j`.
pub(super) mod q5_k {
    pub const BYTES: usize = 176;
    pub const DMIN: usize = 2;
    pub const SCALES: usize = 4;
    pub const QH: usize = 16;
    pub const QS: usize = 48;
}

/// Q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 signed 8-bit scales (one per
/// 16 elements), then f16 `d`. Each 128 elements take 64 low-nibble bytes and 32 high bytes:
/// element `32 s + l` (s in 0..4, l in 0..32) has the low (s < 2) or high (s >= 2) nibble of
/// byte `l + 32 (s % 2)` and bits `2 s, 2 s + 1` of high byte `l`; it is `d * scale * (q - 32)`.
pub(super) mod q6_k {
    pub const BYTES: usize = 210;
    pub const QH: usize = 128;
    pub const SCALES: usize = 192;
    pub const D: usize = 208;
}

/// The little-endian f16 at `bytes[at..at + 2]`, widened (exactly) to f32.
#[inline(always)]
pub(super) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}
