//! `exp` for f32 as straight-line arithmetic (no libm call, no branch), so that the loops using
//! it vectorise inside a [`super::WithSimd`] body: Cody-Waite range reduction by ln 2 and the
//! degree-6 polynomial of Cephes' `expf` (within about 2 ulp of the true value). Results below
//! f32's normal range flush to 0; above it they are +inf.

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two so that `n * LN2_HI` is exact for the n that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding and subtracting it rounds an f32 of magnitude below 2^22 to an integer.
const ROUND: f32 = 12_582_912.0;
/// Inputs beyond these give results outside f32's normal range.
const LO: f32 = -87.33;
const HI: f32 = 88.72;

/// e^x.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let xc = x.clamp(LO, HI);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    // The integer n sits in the low mantissa bits of t.
    let ni = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n in two factors: n reaches 128, one beyond the largest f32 exponent.
    let h = ni >> 1;
    let y = y * pow2(h) * pow2(ni - h);
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// 2^e for -126 <= e <= 127.
#[inline(always)]
fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    /// Against f64's exp over the whole range, in ulps of the f32 result.
    #[test]
    fn exp_is_within_a_few_ulp() {
        let mut worst = 0.0f64;
        for i in -870_000..=887_000 {
            let x = i as f32 * 1e-4;
            let want = (x as f64).exp();
            let got = super::exp(x) as f64;
            let ulp = (want as f32).abs() as f64 * f32::EPSILON as f64;
            worst = worst.max((got - want).abs() / ulp.max(f64::MIN_POSITIVE));
        }
        assert!(worst <= 3.0, "worst error {worst} ulp");
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(-200.0), 0.0);
        assert_eq!(super::exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(super::exp(100.0), f32::INFINITY);
        assert_eq!(super::exp(0.0), 1.0);
        assert!(super::exp(f32::NAN).is_nan());
    }
}
