//! Q8_K activation blocks ([`BlockQ8K`]) and the quantizer that makes them, as ggml's
//! `quantize_row_q8_K_ref`: the right-hand operand of the K-quant dot products.

use super::error::check_finite;
use super::layout::QK_K;
use super::QuantError;

/// 256 activations quantized to signed 8 bits with one f32 scale, plus the sum of each 16
/// consecutive quants (the K-quant dot products use them for the weights' mins and offsets).
///
/// Only [`quantize_row_q8_k`] makes these, so the quants are always in `-127..=127` and the sums
/// always match them.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockQ8K {
    d: f32,
    qs: [i8; QK_K],
    bsums: [i16; QK_K / 16],
}

impl BlockQ8K {
    /// The scale: element `i` stands for `d() * qs()[i]`.
    pub fn d(&self) -> f32 {
        self.d
    }

    /// The 256 quants, each in `-127..=127`.
    pub fn qs(&self) -> &[i8; QK_K] {
        &self.qs
    }

    /// `bsums()[j]` is the sum of quants `16 j .. 16 j + 16`.
    pub fn bsums(&self) -> &[i16; QK_K / 16] {
        &self.bsums
    }
}

/// Replaces the contents of `out` with the Q8_K blocks of `x`, whose length must be a multiple
/// of 256 and whose values must be finite.
///
/// Per block: `max` is the value of largest magnitude (the first, on ties), `iscale = -127 / max`,
/// `q = min(127, round_ties_even(iscale * x))` and `d = 1 / iscale`; so `max` itself maps to
/// -127. An all-zero block gets `d = 0`.
pub fn quantize_row_q8_k(x: &[f32], out: &mut Vec<BlockQ8K>) -> Result<(), QuantError> {
    check_finite(x)?;
    if !x.len().is_multiple_of(QK_K) {
        return Err(QuantError::PartialBlock {
            format: "Q8_K",
            elements: x.len(),
            block_size: QK_K,
        });
    }
    out.clear();
    out.extend(x.chunks_exact(QK_K).map(quantize_block));
    Ok(())
}

fn quantize_block(x: &[f32]) -> BlockQ8K {
    let mut block = BlockQ8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        return block;
    }
    let iscale = -127.0 / max;
    for (q, &v) in block.qs.iter_mut().zip(x) {
        // ggml's nearest_int rounds ties to even. ggml clamps only above: |iscale * v| <= 127
        // up to rounding, so -127 is the least value reachable and the clamp below changes nothing
        // but makes the range plain.
        *q = ((iscale * v).round_ties_even() as i32).clamp(-127, 127) as i8;
    }
    for (sum, qs) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
        *sum = qs.iter().map(|&q| q as i16).sum();
    }
    block.d = 1.0 / iscale;
    block
}
