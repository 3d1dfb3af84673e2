//! The quantized block formats' sizes, argument checks, quantizers and dot products: the scalar
//! reference and every SIMD path against the dot of the dequantized rows (within a tolerance
//! derived from their rounding steps), many rows at once against one at a time (bit for bit), the
//! tiled matrix product against the dot products (within rounding), and quantize/dequantize round
//! trips (within bounds derived from the formats' step sizes).

use crate::common;

use half::f16;
use proptest::prelude::*;
use shardline_tensor::quant::{
    dequantize_row, dot, dot_rows, gemm, quantize_row_q4_k, quantize_row_q8_0, quantize_row_q8_k,
    Activations, BlockQ8K, QuantError, QuantFormat, QuantizedRows,
};
use shardline_tensor::Isa;

/// A small deterministic generator (splitmix64): rows of hundreds of random bytes are cheaper to
/// make from one proptest seed than as proptest collections.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Roughly Gaussian values with a random magnitude per 32 (10^-3 .. 10^2), some blocks zero.
    fn activations(&mut self, n: usize) -> Vec<f32> {
        let mut x = Vec::with_capacity(n);
        for _ in 0..n.div_ceil(32) {
            let scale = if self.next().is_multiple_of(16) {
                0.0
            } else {
                10f32.powf(self.unit() * 5.0 - 3.0)
            };
            for _ in 0..32 {
                let g = (0..4).map(|_| self.unit()).sum::<f32>() - 2.0;
                x.push(g * scale);
            }
        }
        x.truncate(n);
        x
    }
}

/// Byte offsets of each format's f16 scales in a block.
fn scale_offsets(format: QuantFormat) -> &'static [usize] {
    match format {
        QuantFormat::Q4_0 | QuantFormat::Q8_0 => &[0],
        QuantFormat::Q4K | QuantFormat::Q5K => &[0, 2],
        QuantFormat::Q6K => &[208],
    }
}

/// Sets every f16 scale of the `format` blocks in `row` with `scale(old bits)`.
fn set_scales(format: QuantFormat, row: &mut [u8], mut scale: impl FnMut(u16) -> u16) {
    for block in row.chunks_exact_mut(format.block_bytes()) {
        for &at in scale_offsets(format) {
            let old = u16::from_le_bytes([block[at], block[at + 1]]);
            block[at..at + 2].copy_from_slice(&scale(old).to_le_bytes());
        }
    }
}

/// `blocks` random `format` blocks: random bytes, with f16 scales made finite (`wide`: any
/// finite f16, subnormals included; otherwise 2^-14 .. 2^-2 of either sign).
fn weight_row(rng: &mut Rng, format: QuantFormat, blocks: usize, wide: bool) -> Vec<u8> {
    let mut row = rng.bytes(blocks * format.block_bytes());
    set_scales(format, &mut row, |bits| {
        if wide {
            // Clear one exponent bit of Inf/NaN patterns.
            if bits & 0x7C00 == 0x7C00 {
                bits & !0x4000
            } else {
                bits
            }
        } else {
            // Sign and mantissa kept, exponent 1..=13 (2^-14 .. 2^-2).
            (bits & 0x83FF) | ((1 + (bits >> 10) % 13) << 10)
        }
    });
    row
}

/// The activation row for `format` weights made from `x`.
enum Acts {
    Q8_0(Vec<u8>),
    Q8K(Vec<BlockQ8K>),
}

impl Acts {
    fn quantize(format: QuantFormat, x: &[f32]) -> Acts {
        match format {
            QuantFormat::Q4_0 | QuantFormat::Q8_0 => {
                let mut out = vec![0; QuantFormat::Q8_0.row_bytes(x.len()).unwrap()];
                quantize_row_q8_0(x, &mut out).unwrap();
                Acts::Q8_0(out)
            }
            _ => {
                let mut out = Vec::new();
                quantize_row_q8_k(x, &mut out).unwrap();
                Acts::Q8K(out)
            }
        }
    }

    fn view(&self) -> Activations<'_> {
        match self {
            Acts::Q8_0(bytes) => Activations::Q8_0(bytes),
            Acts::Q8K(blocks) => Activations::Q8K(blocks),
        }
    }

    /// The values the quants stand for, exactly (f32 scale times small integer, in f64).
    fn values(&self) -> Vec<f64> {
        match self {
            Acts::Q8_0(bytes) => {
                let mut out = vec![0.0; bytes.len() / 34 * 32];
                dequantize_row(QuantFormat::Q8_0, bytes, &mut out).unwrap();
                out.into_iter().map(f64::from).collect()
            }
            Acts::Q8K(blocks) => blocks
                .iter()
                .flat_map(|b| b.qs().iter().map(|&q| b.d() as f64 * q as f64))
                .collect(),
        }
    }
}

fn dequantized(format: QuantFormat, row: &[u8]) -> Vec<f32> {
    let n = row.len() / format.block_bytes() * format.block_size();
    let mut out = vec![0.0; n];
    dequantize_row(format, row, &mut out).unwrap();
    out
}

/// Asserts that the scalar result and every SIMD path's are within rounding of the exact dot
/// product of the dequantized rows (and so within twice that of each other); returns the scalar
/// result.
///
/// Tolerance: every path computes the block's integer sums exactly, so only f32 roundings remain.
/// The scalar reference rounds each block's term at most 4 times (an integer sum converted, a
/// scale product, the term's product, and the min term's pair for Q4_K/Q5_K) and the accumulation
/// at most once per block more. The SIMD paths keep exact integer sums of some of a block's
/// products in each lane (never mixing terms of different elements that the exact sum would
/// cancel: Q4_0's, Q8_0's and Q6_K's offsets are taken off the lanes of the products they belong
/// to) and round each at most: its conversion, the scale product, then one fused multiply-add per
/// block into the lane's f32 sum, and at the end at most 4 more adding the 16 lanes, 2 for the
/// 4 lanes of the min part and 1 subtracting it. So no term sees more than `blocks + 8`
/// roundings on any path. The dequantized weights round at most once (the products d·scale·q are
/// exact in f32, only Q4_K/Q5_K's subtraction of the min rounds). Every error is relative to a
/// term bounded by `A = Σ_i (|d·scale·q_i| + |dmin·min_i|)·|a_i|` (for a lane's partial sum too),
/// so with `u = ε/2`, `|dot - exact| <= γ(blocks + 8)·A ≈ (blocks + 8)·u·A`; the tolerance is
/// twice that, `(blocks + 8)·ε·A`, plus the smallest normal f32 for results that underflow.
fn check_dot(what: &str, format: QuantFormat, w: &[u8], acts: &Acts) -> f32 {
    let a = acts.values();
    let exact: f64 = dequantized(format, w)
        .iter()
        .zip(&a)
        .map(|(&w, a)| w as f64 * a)
        .sum();
    let magnitude: f64 = match format {
        QuantFormat::Q4K | QuantFormat::Q5K => {
            // The scale part with dmin zeroed, the min part with d zeroed.
            let mut scale_part = w.to_vec();
            let mut min_part = w.to_vec();
            for (s, m) in scale_part
                .chunks_exact_mut(format.block_bytes())
                .zip(min_part.chunks_exact_mut(format.block_bytes()))
            {
                s[2..4].fill(0);
                m[0..2].fill(0);
            }
            let (s, m) = (
                dequantized(format, &scale_part),
                dequantized(format, &min_part),
            );
            s.iter()
                .zip(&m)
                .zip(&a)
                .map(|((&s, &m), a)| (s.abs() as f64 + m.abs() as f64) * a.abs())
                .sum()
        }
        _ => dequantized(format, w)
            .iter()
            .zip(&a)
            .map(|(&w, a)| (w as f64 * a).abs())
            .sum(),
    };
    let blocks = w.len() / format.block_bytes();
    let tol = (blocks + 8) as f64 * f32::EPSILON as f64 * magnitude + f32::MIN_POSITIVE as f64;
    let scalar = dot(Isa::Scalar, format, w, acts.view()).unwrap();
    assert!(
        (scalar as f64 - exact).abs() <= tol,
        "{what}: {format} dot {scalar:e}, dequantized rows give {exact:e} (tolerance {tol:e})"
    );
    for isa in common::isas() {
        let got = dot(isa, format, w, acts.view()).unwrap();
        assert!(
            (got as f64 - exact).abs() <= tol && (got as f64 - scalar as f64).abs() <= 2.0 * tol,
            "{what}: {format} on {isa} gives {got:e}, scalar {scalar:e}, dequantized rows \
             {exact:e} (tolerance {tol:e})"
        );
    }
    scalar
}

/// Asserts that [`dot_rows`] over `rows` weight rows gives, on every path, the bits of [`dot`] of
/// each row on that path (the SIMD paths may compute what the rows take from the activation row
/// once for all of them, which must change nothing).
fn check_dot_rows(format: QuantFormat, w: &[u8], rows: usize, acts: &Acts) {
    let row_bytes = w.len() / rows;
    for isa in common::isas() {
        let mut got = vec![f32::NAN; rows];
        dot_rows(isa, format, w, acts.view(), &mut got).unwrap();
        for (r, got) in got.iter().enumerate() {
            let row = &w[r * row_bytes..(r + 1) * row_bytes];
            let want = dot(isa, format, row, acts.view()).unwrap();
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{format} on {isa}: row {r} of {rows} gives {got:e}, alone {want:e}"
            );
        }
    }
}

#[test]
fn formats_have_ggml_sizes_and_type_ids() {
    let table = [
        (QuantFormat::Q4_0, "Q4_0", 2, 32, 18),
        (QuantFormat::Q8_0, "Q8_0", 8, 32, 34),
        (QuantFormat::Q4K, "Q4_K", 12, 256, 144),
        (QuantFormat::Q5K, "Q5_K", 13, 256, 176),
        (QuantFormat::Q6K, "Q6_K", 14, 256, 210),
    ];
    assert_eq!(QuantFormat::ALL.len(), table.len());
    for (format, name, id, block, bytes) in table {
        assert_eq!(format.name(), name);
        assert_eq!(format.to_string(), name);
        assert_eq!(format.ggml_type_id(), id);
        assert_eq!(QuantFormat::from_ggml_type_id(id), Ok(format));
        assert_eq!(format.block_size(), block);
        assert_eq!(format.block_bytes(), bytes);
        assert_eq!(format.row_bytes(0), Ok(0));
        assert_eq!(format.row_bytes(3 * block), Ok(3 * bytes));
        assert_eq!(
            format.row_bytes(3 * block + 1),
            Err(QuantError::PartialBlock {
                format: name,
                elements: 3 * block + 1,
                block_size: block
            })
        );
    }
    for id in [0, 1, 3, 15, 16, 30, u32::MAX] {
        assert_eq!(
            QuantFormat::from_ggml_type_id(id),
            Err(QuantError::UnknownTypeId(id))
        );
    }
    assert!(matches!(
        QuantFormat::Q8_0.row_bytes(usize::MAX / 32 * 32),
        Err(QuantError::Overflow { .. })
    ));
}

#[test]
fn wrong_lengths_and_inputs_are_errors() {
    let mut rng = Rng(1);
    // Dequantization: output length not whole blocks, or bytes not matching it.
    let row = weight_row(&mut rng, QuantFormat::Q4K, 2, false);
    let mut out = vec![0.0; 512];
    assert!(matches!(
        dequantize_row(QuantFormat::Q4K, &row, &mut out[..500]),
        Err(QuantError::PartialBlock { .. })
    ));
    assert!(matches!(
        dequantize_row(QuantFormat::Q4K, &row[..200], &mut out),
        Err(QuantError::Length {
            expected: 288,
            actual: 200,
            ..
        })
    ));
    assert!(matches!(
        dequantize_row(QuantFormat::Q4K, &row, &mut out[..256]),
        Err(QuantError::Length {
            expected: 144,
            actual: 288,
            ..
        })
    ));

    // Quantizers: partial blocks, wrong output sizes, non-finite values.
    let x = rng.activations(512);
    let mut q8 = vec![0u8; 16 * 34];
    assert!(matches!(
        quantize_row_q8_0(&x[..40], &mut q8),
        Err(QuantError::PartialBlock { .. })
    ));
    assert!(matches!(
        quantize_row_q8_0(&x, &mut q8[..100]),
        Err(QuantError::Length {
            expected: 544,
            actual: 100,
            ..
        })
    ));
    let mut bad = x.clone();
    bad[77] = f32::NAN;
    assert!(matches!(
        quantize_row_q8_0(&bad, &mut q8),
        Err(QuantError::NonFinite { index: 77, .. })
    ));
    let mut q4k = vec![0u8; 2 * 144];
    assert!(matches!(
        quantize_row_q4_k(&x[..256 + 32], &mut q4k),
        Err(QuantError::PartialBlock { .. })
    ));
    assert!(matches!(
        quantize_row_q4_k(&x, &mut q4k[..144]),
        Err(QuantError::Length { .. })
    ));
    bad[77] = f32::INFINITY;
    assert!(matches!(
        quantize_row_q4_k(&bad, &mut q4k),
        Err(QuantError::NonFinite { index: 77, .. })
    ));
    let mut q8k = Vec::new();
    assert!(matches!(
        quantize_row_q8_k(&x[..300], &mut q8k),
        Err(QuantError::PartialBlock { format: "Q8_K", .. })
    ));
    assert!(matches!(
        quantize_row_q8_k(&bad, &mut q8k),
        Err(QuantError::NonFinite { index: 77, .. })
    ));

    // Dot products: partial blocks, unequal lengths, activations of the wrong kind.
    quantize_row_q8_0(&x, &mut q8).unwrap();
    quantize_row_q8_k(&x, &mut q8k).unwrap();
    let q8_0_w = weight_row(&mut rng, QuantFormat::Q8_0, 16, false);
    for isa in common::isas() {
        assert!(matches!(
            dot(
                isa,
                QuantFormat::Q8_0,
                &q8_0_w[..100],
                Activations::Q8_0(&q8)
            ),
            Err(QuantError::PartialBlockBytes { .. })
        ));
        assert!(matches!(
            dot(
                isa,
                QuantFormat::Q8_0,
                &q8_0_w,
                Activations::Q8_0(&q8[..101])
            ),
            Err(QuantError::PartialBlockBytes { .. })
        ));
        assert!(matches!(
            dot(
                isa,
                QuantFormat::Q8_0,
                &q8_0_w,
                Activations::Q8_0(&q8[..34 * 15])
            ),
            Err(QuantError::Length {
                expected: 512,
                actual: 480,
                ..
            })
        ));
        assert!(matches!(
            dot(isa, QuantFormat::Q4K, &row, Activations::Q8K(&q8k[..1])),
            Err(QuantError::Length {
                expected: 512,
                actual: 256,
                ..
            })
        ));
        assert!(matches!(
            dot(isa, QuantFormat::Q4K, &row, Activations::Q8_0(&q8)),
            Err(QuantError::ActivationKind {
                expected: "Q8_K",
                actual: "Q8_0",
                ..
            })
        ));
        assert!(matches!(
            dot(isa, QuantFormat::Q8_0, &q8_0_w, Activations::Q8K(&q8k)),
            Err(QuantError::ActivationKind {
                expected: "Q8_0",
                actual: "Q8_K",
                ..
            })
        ));
    }
}

#[test]
fn dots_of_extreme_quants_are_right_on_every_path() {
    // The largest products each format can hold (all quant bits set, or all -128 bytes for
    // Q8_0), with scales 1: no i16 step may saturate and no i32 sum overflow (either would be far
    // outside the rounding tolerance).
    let one = f16::ONE.to_bits();
    let x_neg = vec![-1.0f32; 1024];
    let x_pos = vec![1.0f32; 1024];
    for format in QuantFormat::ALL {
        for fill in [0x00u8, 0xFF, 0x80, 0x7F] {
            let mut w = vec![fill; format.row_bytes(1024).unwrap()];
            set_scales(format, &mut w, |_| one);
            for x in [&x_neg, &x_pos] {
                check_dot("extreme", format, &w, &Acts::quantize(format, x));
            }
            if matches!(format, QuantFormat::Q4_0 | QuantFormat::Q8_0) {
                // Activation bytes of -128, which no quantizer writes but a row may hold.
                let mut a = vec![0x80u8; QuantFormat::Q8_0.row_bytes(1024).unwrap()];
                set_scales(QuantFormat::Q8_0, &mut a, |_| one);
                check_dot("-128 activations", format, &w, &Acts::Q8_0(a));
            }
        }
    }
}

/// The largest |error| and the root mean square error of `got` against `x`.
fn errors(x: &[f32], got: &[f32]) -> (f32, f32) {
    let max = x
        .iter()
        .zip(got)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    let sq: f64 = x
        .iter()
        .zip(got)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    (max, (sq / x.len() as f64).sqrt() as f32)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random weights of every format (scales of any finite f16, or of a realistic range) times
    /// activations quantized from random values; rows of 1 to 20 blocks (Q4_0/Q8_0: 3 to 60).
    #[test]
    fn simd_and_scalar_dots_are_close_to_dequantized_dots(seed in any::<u64>(), blocks in 1usize..=20,
                                                    wide in any::<bool>()) {
        let mut rng = Rng(seed);
        for format in QuantFormat::ALL {
            let blocks = if format.block_size() == 32 { blocks * 3 } else { blocks };
            let w = weight_row(&mut rng, format, blocks, wide);
            let x = rng.activations(blocks * format.block_size());
            check_dot("random", format, &w, &Acts::quantize(format, &x));
        }
    }

    /// Q4_0/Q8_0 weights times Q8_0 activation rows of random bytes (any quant, -128 included).
    #[test]
    fn dots_are_close_to_dequantized_dots_on_raw_q8_0_activations(seed in any::<u64>(), blocks in 1usize..=40) {
        let mut rng = Rng(seed);
        let a = weight_row(&mut rng, QuantFormat::Q8_0, blocks, false);
        for format in [QuantFormat::Q4_0, QuantFormat::Q8_0] {
            let w = weight_row(&mut rng, format, blocks, true);
            check_dot("raw activations", format, &w, &Acts::Q8_0(a.clone()));
        }
    }

    /// 1 to 11 rows of every format at once, of 1 to 6 blocks (whole and partial groups of the 4
    /// blocks whose sums Q4_0/Q8_0 keep apart), give each row's own dot product.
    #[test]
    fn dot_rows_give_each_rows_dot(seed in any::<u64>(), blocks in 1usize..=6,
                                   rows in 1usize..=11) {
        let mut rng = Rng(seed);
        for format in QuantFormat::ALL {
            let w = weight_row(&mut rng, format, rows * blocks, false);
            let x = rng.activations(blocks * format.block_size());
            check_dot_rows(format, &w, rows, &Acts::quantize(format, &x));
        }
    }

    /// Q8_0: each value comes back within half a step `d = max|x| / 127`, plus what storing `d`
    /// as f16 moves the largest quants: `|x - q·d16| <= d/2 + 127·|d - d16| + 127·4ε·d`, with
    /// `|d - d16| <= max(d·2^-11, 2^-25)` (f16's relative half-ulp, or its subnormal half-ulp).
    #[test]
    fn q8_0_round_trip_is_within_half_a_step(seed in any::<u64>(), blocks in 1usize..=8) {
        let mut rng = Rng(seed);
        let x = rng.activations(32 * blocks);
        let mut q = vec![0; QuantFormat::Q8_0.row_bytes(x.len()).unwrap()];
        quantize_row_q8_0(&x, &mut q).unwrap();
        let got = dequantized(QuantFormat::Q8_0, &q);
        for (xb, gb) in x.chunks(32).zip(got.chunks(32)) {
            let d = xb.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
            let d16_err = (d * 2f32.powi(-11)).max(2f32.powi(-25));
            let tol = 0.5 * d + 127.0 * d16_err + 127.0 * 4.0 * f32::EPSILON * d;
            for (v, g) in xb.iter().zip(gb) {
                prop_assert!((v - g).abs() <= tol, "{v} came back as {g} (d {d}, tolerance {tol})");
            }
        }
    }

    /// Q8_0 blocks as the quantizer writes them (scale >= 0, some quant ±127, none -128, or all
    /// zero) dequantize to values that quantize back to the same bytes.
    #[test]
    fn canonical_q8_0_blocks_survive_dequantize_quantize(seed in any::<u64>(), blocks in 1usize..=8) {
        let mut rng = Rng(seed);
        let mut row = weight_row(&mut rng, QuantFormat::Q8_0, blocks, true);
        for block in row.chunks_exact_mut(34) {
            block[1] &= 0x7F; // a non-negative scale
            for q in &mut block[2..] {
                if *q == 0x80 {
                    *q = 0x81;
                }
            }
            let at = 2 + (rng.next() % 32) as usize;
            block[at] = if rng.next().is_multiple_of(2) { 127 } else { (-127i8) as u8 };
            if u16::from_le_bytes([block[0], block[1]]) == 0 {
                block[2..].fill(0);
            }
        }
        let x = dequantized(QuantFormat::Q8_0, &row);
        let mut again = vec![0; row.len()];
        quantize_row_q8_0(&x, &mut again).unwrap();
        prop_assert_eq!(again, row);
    }

    /// Q8_K: each value within half a step `|d|`, the quants in -127..=127 and the sums of 16
    /// exact. The half step grows by three roundings of values up to 127 steps: `iscale·x` before
    /// it is rounded to a quant, `d = 1/iscale`, and this test's `q·d`; each is off by at most
    /// `127·u·|d|` (`u = ε/2`), so `|x - q·d| <= |d|·(0.5 + 3·127·u)`.
    #[test]
    fn q8_k_round_trip_is_within_half_a_step(seed in any::<u64>(), blocks in 1usize..=4) {
        let mut rng = Rng(seed);
        let x = rng.activations(256 * blocks);
        let mut q = Vec::new();
        quantize_row_q8_k(&x, &mut q).unwrap();
        prop_assert_eq!(q.len(), blocks);
        for (xb, block) in x.chunks(256).zip(&q) {
            let d = block.d();
            let tol = d.abs() * (0.5 + 3.0 * 127.0 * f32::EPSILON / 2.0);
            for (v, &qv) in xb.iter().zip(block.qs()) {
                prop_assert!((-127..=127).contains(&qv));
                prop_assert!((v - d * qv as f32).abs() <= tol, "{v} came back as {}", d * qv as f32);
            }
            for (j, &sum) in block.bsums().iter().enumerate() {
                let want: i32 = block.qs()[16 * j..16 * j + 16].iter().map(|&q| q as i32).sum();
                prop_assert_eq!(sum as i32, want);
            }
        }
    }

    /// Q4_K: in a super-block of span `R = max(x) - min(min(x), 0)` every sub-block's grid has
    /// 16 levels over at most about `R`, a step of at most about `R/15`: values the grid covers
    /// come back within half a step, `R/30`, which bounds the rms error. The least-squares fit may
    /// leave a sub-block's extremes outside its grid (clamped to the end level), and the 6-bit
    /// scales and mins shift each grid by up to `R/126`, so single values may be further off:
    /// `max |err| <= R/8`. (Over 12,000 random super-blocks of the kinds generated here the worst
    /// were about `R/17` and `R/64`.)
    #[test]
    fn q4_k_round_trip_is_within_bounds(seed in any::<u64>(), blocks in 1usize..=4) {
        let mut rng = Rng(seed);
        let x = rng.activations(256 * blocks);
        let mut q = vec![0; QuantFormat::Q4K.row_bytes(x.len()).unwrap()];
        quantize_row_q4_k(&x, &mut q).unwrap();
        let got = dequantized(QuantFormat::Q4K, &q);
        for (xb, gb) in x.chunks(256).zip(got.chunks(256)) {
            let hi = xb.iter().fold(f32::MIN, |m, &v| m.max(v));
            let lo = xb.iter().fold(0.0f32, |m, &v| m.min(v));
            let span = hi - lo;
            let (max, rms) = errors(xb, gb);
            prop_assert!(max <= span / 8.0 + f32::MIN_POSITIVE, "max error {max} for span {span}");
            prop_assert!(rms <= span / 30.0 + f32::MIN_POSITIVE, "rms error {rms} for span {span}");
        }
    }
}

/// Q4_K of well-scaled Gaussian data: the mean error against the values should be what a 4-bit
/// grid over the sub-block ranges gives (a step of about range/15, rms about step/√12), not just
/// within the worst-case bounds above.
#[test]
fn q4_k_is_accurate_on_gaussian_data() {
    let mut rng = Rng(7);
    let x: Vec<f32> = (0..256 * 64)
        .map(|_| (0..4).map(|_| rng.unit()).sum::<f32>() - 2.0)
        .collect();
    let mut q = vec![0; QuantFormat::Q4K.row_bytes(x.len()).unwrap()];
    quantize_row_q4_k(&x, &mut q).unwrap();
    let got = dequantized(QuantFormat::Q4K, &q);
    let (max, rms) = errors(&x, &got);
    let x_rms = (x.iter().map(|v| (v * v) as f64).sum::<f64>() / x.len() as f64).sqrt() as f32;
    eprintln!(
        "Q4_K on Gaussian data: rms error {rms} ({:.2}% of rms), max {max}",
        100.0 * rms / x_rms
    );
    assert!(rms / x_rms < 0.12, "rms error {rms} against rms {x_rms}");
}

/// The largest magnitude of the integer weight factor an element of a `format` block can put
/// into any partial sum of any path, times the block's scales: `|d|·max|q ± offset|` (Q8_0: 128;
/// Q4_0: 15 + 8; Q6_K: |scale| <= 128 times 63 + 32, its offset taken off separately by some
/// paths), and for Q4_K/Q5_K `|d|·63·31 + |dmin|·63` (scale times quant, and min).
fn block_bound(format: QuantFormat, block: &[u8]) -> f64 {
    let f16_at = |at: usize| {
        f16::from_le_bytes([block[at], block[at + 1]])
            .to_f64()
            .abs()
    };
    match format {
        QuantFormat::Q8_0 => 128.0 * f16_at(0),
        QuantFormat::Q4_0 => 23.0 * f16_at(0),
        QuantFormat::Q4K | QuantFormat::Q5K => 63.0 * 31.0 * f16_at(0) + 63.0 * f16_at(2),
        QuantFormat::Q6K => 128.0 * 95.0 * f16_at(208),
    }
}

/// Asserts that [`gemm`] of `w` (`n` rows) with the rows of `x` gives, on every path, each
/// product as [`dot`] does on that path: the same bits on the scalar path; within f32 rounding
/// on the SIMD paths, which tile the activation rows and may add the same exact integer sums in
/// another order. NaN for rows of `x` holding a non-finite value.
///
/// Tolerance: both results sum the same exact per-block integers, each term rounded at most a few
/// times (conversion, scale products, a fused multiply-add) and the accumulation at most once per
/// block more, then at most 4 times adding lanes and once more combining Q4_K/Q5_K's min part:
/// fewer than `blocks + 8` roundings on either side, each relative to a partial sum bounded by
/// `A = Σ_blocks block_bound · Σ_i |a_i|` (the integer factors' largest magnitudes, before offsets
/// or mins cancel, times the activations). So `|gemm - dot| <= 2·(blocks + 8)·u·A·(1 + O(u))`
/// with `u = ε/2`; the tolerance is `(blocks + 16)·ε·A`, plus the smallest normal f32.
fn check_gemm(format: QuantFormat, w: &[u8], n: usize, x: &[f32], m: usize) {
    let k = x.len() / m;
    let acts = QuantizedRows::for_weights(format, m, x).unwrap();
    let row_bytes = format.row_bytes(k).unwrap();
    let blocks = k / format.block_size();
    for isa in common::isas() {
        let mut got = vec![f32::NAN; m * n];
        gemm(isa, format, w, &acts, &mut got).unwrap();
        for c in 0..m {
            let row = &x[c * k..(c + 1) * k];
            let Some(act) = acts.row(c) else {
                assert!(row.iter().any(|v| !v.is_finite()), "row {c} quantizes");
                assert!(got[c * n..(c + 1) * n].iter().all(|v| v.is_nan()));
                continue;
            };
            let act_abs: Vec<f64> = match act {
                Activations::Q8_0(bytes) => bytes
                    .chunks_exact(34)
                    .map(|b| {
                        let d = f16::from_le_bytes([b[0], b[1]]).to_f64().abs();
                        b[2..].iter().map(|&q| d * (q as i8 as f64).abs()).sum()
                    })
                    .collect(),
                Activations::Q8K(blocks) => blocks
                    .iter()
                    .map(|b| {
                        let d = (b.d() as f64).abs();
                        b.qs().iter().map(|&q| d * (q as f64).abs()).sum()
                    })
                    .collect(),
            };
            for r in 0..n {
                let wrow = &w[r * row_bytes..(r + 1) * row_bytes];
                let want = dot(isa, format, wrow, act).unwrap();
                let got = got[c * n + r];
                if isa == Isa::Scalar {
                    assert_eq!(got.to_bits(), want.to_bits(), "{format} scalar ({r}, {c})");
                    continue;
                }
                // The activation blocks of Q8_0 are 32 long; a K-quant block meets 256 values.
                let per_block = act_abs.len() / blocks;
                let magnitude: f64 = wrow
                    .chunks_exact(format.block_bytes())
                    .zip(act_abs.chunks_exact(per_block))
                    .map(|(wb, a)| block_bound(format, wb) * a.iter().sum::<f64>())
                    .sum();
                let tol = (blocks + 16) as f64 * f32::EPSILON as f64 * magnitude
                    + f32::MIN_POSITIVE as f64;
                assert!(
                    (got as f64 - want as f64).abs() <= tol,
                    "{format} on {isa}, {n}x{k} by m={m}: ({r}, {c}) gives {got:e}, dot \
                     {want:e} (tolerance {tol:e})"
                );
            }
        }
    }
}

#[test]
fn gemm_gives_the_dot_products() {
    let mut rng = Rng(7);
    for format in QuantFormat::ALL {
        let block = format.block_size();
        // Rows around the tile and group sizes; one to three blocks (and 33 for groups of rows
        // that do not fill the L1 budget evenly).
        for (n, blocks) in [(1, 1), (5, 2), (17, 3), (6, 33)] {
            let k = blocks * block;
            let mut w = Vec::new();
            for _ in 0..n {
                let wide = rng.next().is_multiple_of(4);
                w.extend(weight_row(&mut rng, format, blocks, wide));
            }
            for m in 1..=9 {
                let mut x = rng.activations(m * k);
                if m == 6 {
                    x[4 * k + 7] = f32::NAN;
                }
                check_gemm(format, &w, n, &x, m);
            }
        }
    }
}

#[test]
fn gemm_sums_do_not_overflow_at_the_largest_quants() {
    // Every quant at its largest magnitude (Q8_0: -128; the others: all bits set) against
    // activations of one magnitude and sign (all quantized to -127 or 127), where the i16 and
    // i32 sums of every path are fullest.
    for format in QuantFormat::ALL {
        let (n, blocks, m) = (3, 4, 5);
        let byte = if format == QuantFormat::Q8_0 {
            0x80
        } else {
            0xFF
        };
        let mut w = vec![byte; n * blocks * format.block_bytes()];
        set_scales(format, &mut w, |_| 0x2C00);
        let k = blocks * format.block_size();
        for sign in [1.0, -1.0] {
            check_gemm(format, &w, n, &vec![sign; m * k], m);
        }
    }
}

#[test]
fn gemm_checks_its_arguments() {
    let (k, m, n) = (256, 3, 2);
    let x = Rng(8).activations(m * k);
    let w = weight_row(&mut Rng(9), QuantFormat::Q4K, n, false);
    let acts = QuantizedRows::for_weights(QuantFormat::Q4K, m, &x).unwrap();
    assert_eq!((acts.rows(), acts.elements()), (m, k));
    let mut out = vec![0.0; m * n];
    for isa in common::isas() {
        gemm(isa, QuantFormat::Q4K, &w, &acts, &mut out).unwrap();
        assert!(matches!(
            gemm(isa, QuantFormat::Q4K, &w[1..], &acts, &mut out),
            Err(QuantError::Length { .. })
        ));
        assert!(matches!(
            gemm(isa, QuantFormat::Q4K, &w, &acts, &mut out[1..]),
            Err(QuantError::Length { .. })
        ));
        assert!(matches!(
            gemm(isa, QuantFormat::Q8_0, &w, &acts, &mut out),
            Err(QuantError::ActivationKind { .. })
        ));
    }
    assert!(matches!(
        QuantizedRows::for_weights(QuantFormat::Q4K, 2, &x[..701]),
        Err(QuantError::Length { .. })
    ));
    assert!(matches!(
        QuantizedRows::for_weights(QuantFormat::Q4K, 3, &x[..300]),
        Err(QuantError::PartialBlock { .. })
    ));
    // Rows quantized for Q4_K (and rearranged for its packed kernels) serve the other K-quants
    // as rows quantized for them do.
    let x = Rng(10).activations(5 * k);
    let w6 = weight_row(&mut Rng(11), QuantFormat::Q6K, 3, false);
    for isa in common::isas() {
        let mut outs = [vec![0.0; 15], vec![0.0; 15]];
        for (format, out) in [QuantFormat::Q4K, QuantFormat::Q6K]
            .into_iter()
            .zip(&mut outs)
        {
            let acts = QuantizedRows::for_weights(format, 5, &x).unwrap();
            gemm(isa, QuantFormat::Q6K, &w6, &acts, out).unwrap();
        }
        assert_eq!(outs[0], outs[1], "{isa}");
    }
    let none = QuantizedRows::for_weights(QuantFormat::Q8_0, 0, &[]).unwrap();
    assert!(none.row(0).is_none());
    gemm(Isa::Scalar, QuantFormat::Q8_0, &[], &none, &mut []).unwrap();
}
