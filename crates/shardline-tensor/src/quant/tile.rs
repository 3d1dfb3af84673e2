//! Register-tiled kernels of the quantized matrix product ([`super::gemm`]) on x86: each weight
//! block is loaded and unpacked once for a tile of up to [`COLS`] activation rows, whose integer
//! sums stay in registers, instead of once per activation row as the dot products do.
//!
//! The kernels are 256-bit. The integer products run on AVX2 (`vpmaddubsw`, then `vpmaddwd`
//! and an add) or, where the CPU has AVX-512 VNNI, on its 256-bit forms (`vpmaddubsw`, then
//! `vpdpwssd`; `vpdpbusd` for Q8_0), chosen by [`IntOps`]. Per block:
//! - Q8_0: `|w| · sign(y, w)` in fours (ggml's sign trick: exact because activation quants from
//!   [`super::QuantizedRows`] are never -128, and `|w| <= 128` times `|y| <= 127` cannot saturate
//!   a pair of i16).
//! - Q4_K: as the dot kernels (nibbles times quants in i16 pairs, times the sub-block scales), and
//!   the min term from the Q8_K sums of 16, added into the same f32 lanes.
//! - Q6_K: the quants without their offset of 32 (below 64, so pairs cannot saturate), times the
//!   scales; the offset comes off once per block as `32 Σ_j scale_j · Σ_16 y` from the Q8_K sums
//!   of 16, which cover exactly one scale each.
//!
//! Every integer sum is exact; they are converted to f32 and added with `(weight scale ×
//! activation scale)` per block into one f32 vector per output, summed across lanes at the end.
//! So results differ from the dot products only in the order of f32 roundings.

use std::arch::x86_64::*;

use super::dot_avx2::{hsum_256, load_const, q6_k_half, K_SCALE_PICK, Q6_SCALE_PICK};
use super::kscale;
use super::layout::{q4_k, q6_k, q8_0};
use super::BlockQ8K;

/// Most activation rows per tile: on a 2-core Sapphire Rapids, one thread, 4 gained 1.2-1.9
/// times over 1 on every format and path, and 5 to 8 gained nothing more.
const COLS: usize = 4;

/// Bytes of weight rows a group keeps in L1 while every tile of activation rows passes over it.
const GROUP_BYTES: usize = 16 * 1024;

/// One activation row of a tile: its blocks (ggml Q8_0 bytes or [`BlockQ8K`]s), and for Q8_0 its
/// block scales widened to f32.
#[derive(Clone, Copy)]
pub(super) struct ActRow {
    pub(super) blocks: *const u8,
    pub(super) scales: *const f32,
}

/// The integer multiply-adds, on AVX2 or AVX-512 VNNI.
pub(super) trait IntOps {
    /// `acc` plus, per i32 lane, `Σ (q·y)·s` over its two i16 pairs: `q` unsigned bytes, `y`
    /// signed, `s` i16 scales. The caller keeps each i16 pair sum in range.
    unsafe fn dot_scaled(acc: __m256i, q: __m256i, y: __m256i, s: __m256i) -> __m256i;
    /// `acc` plus the four products of unsigned `u` and signed `s` bytes per i32 lane (at most
    /// 128 · 127 each, so no i16 pair saturates on AVX2).
    unsafe fn dot4(acc: __m256i, u: __m256i, s: __m256i) -> __m256i;
    /// `acc` plus the sum of the two i16 products per i32 lane.
    unsafe fn dot_i16(acc: __m256i, a: __m256i, b: __m256i) -> __m256i;
    /// `acc` plus the products of unsigned bytes `u` below 32 and signed bytes `y`, in the lanes'
    /// own form (i16 pairs on AVX2, which hold 8 such additions for `u` below 16 and 4 below 32:
    /// 8 · 2 · 15 · 127 and 4 · 2 · 31 · 127 < 2^15; i32 fours where [`IntOps::WIDE`]);
    /// [`IntOps::small_lanes`] makes the i32 sums of four bytes.
    unsafe fn dot_small(acc: __m256i, u: __m256i, y: __m256i) -> __m256i;
    /// Whether [`IntOps::dot_small`]'s lanes are i32, for any number of additions.
    const WIDE: bool;
    /// The i32 sums of four byte products from [`IntOps::dot_small`]'s lanes.
    unsafe fn small_lanes(acc: __m256i) -> __m256i;
    /// Whether [`IntOps::dot_i8`] adds the signed weight bytes offset by 128: the sums it
    /// extends must then start at `-128` times the activation bytes' sums of four.
    const BIASED: bool;
    /// Signed weight bytes `w` as [`IntOps::dot_i8`] takes them (once for many activations).
    unsafe fn prepare_i8(w: __m256i) -> __m256i;
    /// `acc` plus the four products of signed bytes `w` (prepared as `p`) and `y` per i32 lane
    /// (`y` never -128).
    unsafe fn dot_i8(acc: __m256i, p: __m256i, w: __m256i, y: __m256i) -> __m256i;
}

pub(super) struct Avx2;

impl IntOps for Avx2 {
    #[inline(always)]
    unsafe fn dot_scaled(acc: __m256i, q: __m256i, y: __m256i, s: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), s))
    }

    #[inline(always)]
    unsafe fn dot4(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        let pairs = _mm256_maddubs_epi16(u, s);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    #[inline(always)]
    unsafe fn dot_i16(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
    }

    #[inline(always)]
    unsafe fn dot_small(acc: __m256i, u: __m256i, y: __m256i) -> __m256i {
        _mm256_add_epi16(acc, _mm256_maddubs_epi16(u, y))
    }

    #[inline(always)]
    unsafe fn small_lanes(acc: __m256i) -> __m256i {
        _mm256_madd_epi16(acc, _mm256_set1_epi16(1))
    }

    const WIDE: bool = false;

    const BIASED: bool = false;

    /// `|w|` for the sign trick.
    #[inline(always)]
    unsafe fn prepare_i8(w: __m256i) -> __m256i {
        _mm256_abs_epi8(w)
    }

    #[inline(always)]
    unsafe fn dot_i8(acc: __m256i, p: __m256i, w: __m256i, y: __m256i) -> __m256i {
        Self::dot4(acc, p, _mm256_sign_epi8(y, w))
    }
}

pub(super) struct Vnni;

impl IntOps for Vnni {
    #[inline(always)]
    unsafe fn dot_scaled(acc: __m256i, q: __m256i, y: __m256i, s: __m256i) -> __m256i {
        _mm256_dpwssd_epi32(acc, _mm256_maddubs_epi16(q, y), s)
    }

    #[inline(always)]
    unsafe fn dot4(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, u, s)
    }

    #[inline(always)]
    unsafe fn dot_i16(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpwssd_epi32(acc, a, b)
    }

    #[inline(always)]
    unsafe fn dot_small(acc: __m256i, u: __m256i, y: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, u, y)
    }

    #[inline(always)]
    unsafe fn small_lanes(acc: __m256i) -> __m256i {
        acc
    }

    const WIDE: bool = true;

    const BIASED: bool = true;

    /// `w + 128` as unsigned bytes.
    #[inline(always)]
    unsafe fn prepare_i8(w: __m256i) -> __m256i {
        _mm256_xor_si256(w, _mm256_set1_epi8(-128))
    }

    #[inline(always)]
    unsafe fn dot_i8(acc: __m256i, p: __m256i, _: __m256i, y: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, p, y)
    }
}

/// A format's tile kernel: one unit of weight blocks against the same unit of `C` activation
/// rows. A unit is one weight block read where it lies, or (packed kernels) `UNIT_BLOCKS` blocks
/// rearranged by [`TileKernel::pack`] once per group of weight rows, for all the activation rows.
pub(super) trait TileKernel {
    /// Bytes per weight block.
    const W_BYTES: usize;
    /// Weight blocks per unit.
    const UNIT_BLOCKS: usize = 1;
    /// Bytes per packed unit; 0 where the kernel reads the blocks where they lie.
    const PACKED_BYTES: usize = 0;

    /// Packs the `blocks` (1..=`UNIT_BLOCKS`) weight blocks at `w` into the unit at `out` (the
    /// missing blocks of a row's last unit as zeros).
    ///
    /// Safety: `w` points at `blocks` whole blocks and `out` at `PACKED_BYTES` writable bytes, on
    /// a CPU with AVX2.
    unsafe fn pack(_w: *const u8, _blocks: usize, _out: *mut u8) {}

    /// Adds weight unit `w` times unit `u` of each row of `a` to that row's sums in `acc`.
    ///
    /// Safety: `w` points at one whole unit and each row of `a` holds unit `u`, on a CPU with
    /// `O`'s features.
    unsafe fn block<O: IntOps, const C: usize>(
        w: *const u8,
        a: &[ActRow; C],
        u: usize,
        acc: &mut [__m256; C],
    );
}

/// The f16 at `p` widened to f32, in every lane.
#[inline(always)]
unsafe fn f16_lanes(p: *const u8) -> __m256 {
    let bits = p.cast::<u16>().read_unaligned() as i32;
    _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

/// Block `b` of a Q8_K row.
#[inline(always)]
unsafe fn q8k<'a>(a: ActRow, b: usize) -> &'a BlockQ8K {
    &*a.blocks.cast::<BlockQ8K>().add(b)
}

pub(super) struct Q8;

impl TileKernel for Q8 {
    const W_BYTES: usize = q8_0::BYTES;

    #[inline(always)]
    unsafe fn block<O: IntOps, const C: usize>(
        w: *const u8,
        a: &[ActRow; C],
        b: usize,
        acc: &mut [__m256; C],
    ) {
        let wq = _mm256_loadu_si256(w.add(q8_0::QS).cast());
        let w_abs = _mm256_abs_epi8(wq);
        let dw = f16_lanes(w);
        for (a, acc) in a.iter().zip(acc.iter_mut()) {
            let y = _mm256_loadu_si256(a.blocks.add(b * q8_0::BYTES + q8_0::QS).cast());
            let sum = O::dot4(_mm256_setzero_si256(), w_abs, _mm256_sign_epi8(y, wq));
            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*a.scales.add(b)));
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, *acc);
        }
    }
}

pub(super) struct Q4K;

impl TileKernel for Q4K {
    const W_BYTES: usize = q4_k::BYTES;

    #[inline(always)]
    unsafe fn block<O: IntOps, const C: usize>(
        w: *const u8,
        a: &[ActRow; C],
        b: usize,
        acc: &mut [__m256; C],
    ) {
        let (scales, mins) = kscale::unpack_words(&*w.add(q4_k::SCALES).cast::<[u8; 12]>());
        let scales = _mm256_set1_epi64x(scales as i64);
        let mask = _mm256_set1_epi8(0x0F);
        let y: [*const i8; C] = std::array::from_fn(|c| q8k(a[c], b).qs().as_ptr());
        let mut sum = [_mm256_setzero_si256(); C];
        for p in 0..4 {
            // Sub-block 2p in the low nibbles of the 32 bytes, 2p + 1 in the high nibbles; quants
            // below 16: |q y + q' y'| <= 15 · 127 · 2 fits i16.
            let v = _mm256_loadu_si256(w.add(q4_k::QS + 32 * p).cast());
            let q0 = _mm256_and_si256(v, mask);
            let q1 = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
            let s0 = _mm256_shuffle_epi8(scales, load_const(&K_SCALE_PICK[2 * p]));
            let s1 = _mm256_shuffle_epi8(scales, load_const(&K_SCALE_PICK[2 * p + 1]));
            for (y, sum) in y.iter().zip(sum.iter_mut()) {
                let y0 = _mm256_loadu_si256(y.add(64 * p).cast());
                let y1 = _mm256_loadu_si256(y.add(64 * p + 32).cast());
                *sum = O::dot_scaled(O::dot_scaled(*sum, q0, y0, s0), q1, y1, s1);
            }
        }
        // Each min twice, for the two sums of 16 of its sub-block.
        let mins = _mm_cvtsi64_si128(mins as i64);
        let mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mins, mins));
        let dd = _mm_cvtph_ps(_mm_cvtsi32_si128(w.cast::<i32>().read_unaligned()));
        let d = _mm256_broadcastss_ps(dd);
        let dmin = _mm256_broadcastss_ps(_mm_movehdup_ps(dd));
        for (c, acc) in acc.iter_mut().enumerate() {
            let block = q8k(a[c], b);
            let bsums = _mm256_loadu_si256(block.bsums().as_ptr().cast());
            let min_sum = O::dot_i16(_mm256_setzero_si256(), mins, bsums);
            let da = _mm256_set1_ps(block.d());
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[c]), _mm256_mul_ps(d, da), *acc);
            *acc = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(min_sum), _mm256_mul_ps(dmin, da), *acc);
        }
    }
}

pub(super) struct Q6K;

impl TileKernel for Q6K {
    const W_BYTES: usize = q6_k::BYTES;

    #[inline(always)]
    unsafe fn block<O: IntOps, const C: usize>(
        w: *const u8,
        a: &[ActRow; C],
        b: usize,
        acc: &mut [__m256; C],
    ) {
        let scales = _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(q6_k::SCALES).cast()));
        let y: [*const i8; C] = std::array::from_fn(|c| q8k(a[c], b).qs().as_ptr());
        // The offset first: -32 · scale_j times the sum of the 16 quants scale j covers
        // (|32 · 128 · 2032| · 2 fits i32).
        let offset_scales =
            _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16::<5>(scales));
        // (A loop, not `array::from_fn`: a closure would not inherit the caller's target
        // features.)
        let mut sum = [_mm256_setzero_si256(); C];
        for (a, sum) in a.iter().zip(sum.iter_mut()) {
            let bsums = _mm256_loadu_si256(q8k(*a, b).bsums().as_ptr().cast());
            *sum = O::dot_i16(*sum, offset_scales, bsums);
        }
        for h in 0..2 {
            let (lane_scales, quants) = q6_k_half(w, scales, h);
            for (s, q) in quants.into_iter().enumerate() {
                // Quants below 64: |q y + q' y'| <= 63 · 127 · 2 fits i16.
                let scale = _mm256_shuffle_epi8(lane_scales, load_const(&Q6_SCALE_PICK[s]));
                for (y, sum) in y.iter().zip(sum.iter_mut()) {
                    let y = _mm256_loadu_si256(y.add(128 * h + 32 * s).cast());
                    *sum = O::dot_scaled(*sum, q, y, scale);
                }
            }
        }
        let d = f16_lanes(w.add(q6_k::D));
        for (c, acc) in acc.iter_mut().enumerate() {
            let da = _mm256_set1_ps(q8k(a[c], b).d());
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[c]), _mm256_mul_ps(d, da), *acc);
        }
    }
}

/// `out[c * n + r]` = weight row `r` of the `n` rows of `blocks` `K` blocks in `w` times
/// activation row `c` of `acts`: groups of weight rows that stay in L1 (packed first, for packed
/// kernels), each met by every tile of up to [`COLS`] activation rows.
///
/// Safety: the CPU has `O`'s features; `w` holds `n` rows of `blocks` whole `K` blocks, every
/// row of `acts` holds `blocks.div_ceil(K::UNIT_BLOCKS)` units of the layout `K` takes, and `out`
/// holds `acts.len() · n` values.
#[inline(always)]
pub(super) unsafe fn gemm<K: TileKernel, O: IntOps>(
    w: &[u8],
    blocks: usize,
    acts: &[ActRow],
    out: &mut [f32],
) {
    let row_bytes = blocks * K::W_BYTES;
    if row_bytes == 0 {
        return out.fill(0.0);
    }
    let n = w.len() / row_bytes;
    debug_assert_eq!(out.len(), acts.len() * n);
    let units = blocks.div_ceil(K::UNIT_BLOCKS);
    let packed = K::PACKED_BYTES > 0;
    let (unit_bytes, group_row_bytes) = if packed {
        (K::PACKED_BYTES, units * K::PACKED_BYTES)
    } else {
        (K::W_BYTES, row_bytes)
    };
    let group = (GROUP_BYTES / group_row_bytes).max(1);
    let mut scratch = if packed {
        vec![0u8; group.min(n) * group_row_bytes]
    } else {
        Vec::new()
    };
    for g0 in (0..n).step_by(group) {
        let rows = (g0 + group).min(n) - g0;
        let first = if packed {
            for r in 0..rows {
                let raw = w.as_ptr().add((g0 + r) * row_bytes);
                let dst = scratch.as_mut_ptr().add(r * group_row_bytes);
                for u in 0..units {
                    let b = u * K::UNIT_BLOCKS;
                    let n = K::UNIT_BLOCKS.min(blocks - b);
                    K::pack(raw.add(b * K::W_BYTES), n, dst.add(u * unit_bytes));
                }
            }
            scratch.as_ptr()
        } else {
            w.as_ptr().add(g0 * row_bytes)
        };
        let mut c0 = 0;
        while c0 < acts.len() {
            let cols = (acts.len() - c0).min(COLS);
            let t = Tile {
                w: first,
                stride: group_row_bytes,
                unit_bytes,
                units,
                n,
                c0,
                r0: g0,
            };
            match cols {
                1 => t.run::<K, O, 1>(rows, acts, out),
                2 => t.run::<K, O, 2>(rows, acts, out),
                3 => t.run::<K, O, 3>(rows, acts, out),
                _ => t.run::<K, O, 4>(rows, acts, out),
            }
            c0 += cols;
        }
    }
}

/// Where a tile of activation rows `c0..` meets a group of weight rows (output rows `r0..`).
struct Tile {
    /// The group's first weight row (packed or where it lies), then one every `stride` bytes.
    w: *const u8,
    stride: usize,
    unit_bytes: usize,
    units: usize,
    n: usize,
    c0: usize,
    r0: usize,
}

impl Tile {
    /// The group's first `rows` weight rows against activation rows `c0..c0 + C`.
    ///
    /// Safety: as [`gemm`], with `rows` rows in the group and `c0 + C <= acts.len()`.
    #[inline(always)]
    unsafe fn run<K: TileKernel, O: IntOps, const C: usize>(
        &self,
        rows: usize,
        acts: &[ActRow],
        out: &mut [f32],
    ) {
        let a: [ActRow; C] = std::array::from_fn(|c| acts[self.c0 + c]);
        for r in 0..rows {
            let row = self.w.add(r * self.stride);
            let mut acc = [_mm256_setzero_ps(); C];
            for u in 0..self.units {
                K::block::<O, C>(row.add(u * self.unit_bytes), &a, u, &mut acc);
            }
            for (c, acc) in acc.into_iter().enumerate() {
                *out.get_unchecked_mut((self.c0 + c) * self.n + self.r0 + r) = hsum_256(acc);
            }
        }
    }
}

/// Generates the entry points of one instruction set: `$name::<K>` runs [`gemm`] with `K` and
/// `$ops`, compiled for `$features`.
macro_rules! entry {
    ($name:ident, $ops:ty, $features:literal) => {
        /// [`gemm`] for kernel `K` on this instruction set.
        ///
        /// Safety: as [`gemm`]; the CPU has the features this is compiled for.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn $name<K: TileKernel>(
            w: &[u8],
            blocks: usize,
            acts: &[ActRow],
            out: &mut [f32],
        ) {
            gemm::<K, $ops>(w, blocks, acts, out)
        }
    };
}

entry!(gemm_avx2, Avx2, "avx2,fma,f16c");
entry!(
    gemm_vnni,
    Vnni,
    "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"
);
