//! The 12 bytes in which Q4_K and Q5_K pack eight 6-bit scales and eight 6-bit mins (ggml's
//! `get_scale_min_k4` and the packing in `quantize_row_q4_K_ref`).
//!
//! Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3 likewise; scales and mins
//! 4-7 keep their low 4 bits in the nibbles of bytes 8-11 (scale low, min high) and their top 2
//! bits in the spare top bits of bytes 0-3 (scales) and 4-7 (mins).

/// The eight scales and eight mins of `packed` (each 0..=63).
#[inline(always)]
pub(super) fn unpack(packed: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let mut scales = [0u8; 8];
    let mut mins = [0u8; 8];
    for j in 0..4 {
        scales[j] = packed[j] & 63;
        mins[j] = packed[j + 4] & 63;
        scales[j + 4] = (packed[j + 8] & 0x0F) | ((packed[j] >> 6) << 4);
        mins[j + 4] = (packed[j + 8] >> 4) | ((packed[j + 4] >> 6) << 4);
    }
    (scales, mins)
}

/// [`unpack`] in word arithmetic, for the SIMD kernels: the eight scales and the eight mins as
/// the bytes (0 first) of two little-endian u64s.
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) fn unpack_words(packed: &[u8; 12]) -> (u64, u64) {
    let word =
        |i: usize| u32::from_le_bytes([packed[i], packed[i + 1], packed[i + 2], packed[i + 3]]);
    let (w0, w1, w2) = (word(0), word(4), word(8));
    const LOW6: u32 = 0x3F3F_3F3F;
    const NIBBLE: u32 = 0x0F0F_0F0F;
    // Byte j of `w >> 2` holds bits 6-7 of byte j of `w` in its bits 4-5 (the bits shifted in from
    // byte j + 1 land in bits 6-7, masked off).
    const TOP2: u32 = 0x3030_3030;
    let scales_hi = (w2 & NIBBLE) | ((w0 >> 2) & TOP2);
    let mins_hi = ((w2 >> 4) & NIBBLE) | ((w1 >> 2) & TOP2);
    (
        (w0 & LOW6) as u64 | (scales_hi as u64) << 32,
        (w1 & LOW6) as u64 | (mins_hi as u64) << 32,
    )
}

/// Packs eight scales and eight mins (each at most 63) into the 12-byte layout.
pub(super) fn pack(scales: &[u8; 8], mins: &[u8; 8]) -> [u8; 12] {
    let mut packed = [0u8; 12];
    for j in 0..4 {
        let (hi_scale, hi_min) = (scales[j + 4], mins[j + 4]);
        packed[j] = scales[j] | ((hi_scale >> 4) << 6);
        packed[j + 4] = mins[j] | ((hi_min >> 4) << 6);
        packed[j + 8] = (hi_scale & 0x0F) | ((hi_min & 0x0F) << 4);
    }
    packed
}

/// The packed scale bytes of a Q4_K or Q5_K block starting at `at`.
#[inline(always)]
pub(super) fn packed_at(block: &[u8], at: usize) -> &[u8; 12] {
    block[at..at + 12].try_into().expect("a slice of 12 bytes")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pack_then_unpack_is_identity(scales in prop::array::uniform8(0u8..64),
                                        mins in prop::array::uniform8(0u8..64)) {
            prop_assert_eq!(super::unpack(&super::pack(&scales, &mins)), (scales, mins));
        }

        #[test]
        fn unpack_words_is_unpack(packed in prop::array::uniform12(any::<u8>())) {
            let (scales, mins) = super::unpack(&packed);
            let (ws, wm) = super::unpack_words(&packed);
            prop_assert_eq!((ws.to_le_bytes(), wm.to_le_bytes()), (scales, mins));
        }

        #[test]
        fn unpack_then_pack_is_identity(packed in prop::array::uniform12(any::<u8>())) {
            let (scales, mins) = super::unpack(&packed);
            prop_assert_eq!(super::pack(&scales, &mins), packed);
        }
    }
}
