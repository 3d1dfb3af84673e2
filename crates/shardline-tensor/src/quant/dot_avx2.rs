//! AVX2 dot-product kernels, one weight row after another (see `group`), and the x86 pieces the
//! AVX-512 kernels share with them.
//!
//! Quants are multiplied with `vpmaddubsw` (unsigned × signed bytes to pairs of i16) wherever one
//! side is a small unsigned quant, so no i16 sum can saturate; Q8_0 × Q8_0 widens both sides to
//! i16 first, which is exact for every byte (ggml's sign trick would be wrong for activation
//! bytes of -128, which its quantizer never writes but a Q8_0 row may hold). The i16 products are
//! summed into i32 by `vpmaddwd` with ones or with the sub-block scales, spread over the lanes by
//! byte shuffles. Q4_0's offset of 8 and Q6_K's of 32 are taken off each product of i16 pairs
//! (`8 y + 8 y'`, `32 y + 32 y'`). Q4_K/Q5_K's scales and mins are unpacked in word arithmetic
//! ([`kscale::unpack_words`]) and their min terms come from the activation sums of 32 (`vpmaddwd`
//! of the mins with the pairs of Q8_K's sums of 16).
//!
//! Every block's integer sums are exact, and each lane's holds products of its own elements only
//! (with their offsets). They are converted to f32 in their lanes and added into the row's f32
//! vector with `(weight scale × activation scale)` (fused multiply-add), and a row's lanes are
//! summed once at its end: the result differs from the scalar reference only in the order of the
//! f32 roundings (see the tolerance in the quant tests).
//!
//! Callers must run these only where the CPU has AVX2, FMA and F16C, and pass rows of whole blocks
//! with as many elements as the activation row.

use std::arch::x86_64::*;

use super::group::{dot_rows, BlockKernel};
use super::kscale;
use super::layout::{q4_0, q4_k, q5_k, q6_k, q8_0};
use super::BlockQ8K;

/// Bytes per [`BlockQ8K`], the stride of a Q8_K row.
pub(super) const Q8K_BYTES: usize = std::mem::size_of::<BlockQ8K>();

/// The sum of the 8 lanes of `v`.
#[inline(always)]
pub(super) unsafe fn hsum_256(v: __m256) -> f32 {
    hsum_128(_mm_add_ps(
        _mm256_castps256_ps128(v),
        _mm256_extractf128_ps::<1>(v),
    ))
}

/// The sum of the 4 lanes of `v`: `(v0 + v2) + (v1 + v3)`.
#[inline(always)]
pub(super) unsafe fn hsum_128(v: __m128) -> f32 {
    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)))
}

/// The f16 at `p`, widened, times lane 0 of `da`, in lane 0.
#[inline(always)]
pub(super) unsafe fn f16_times(p: *const u8, da: __m128) -> __m128 {
    let bits = p.cast::<u16>().read_unaligned() as i32;
    _mm_mul_ss(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)), da)
}

/// A K-quant block's f16 `d` and `dmin` (at `w`) times the activation scale in `da`'s lanes:
/// `[d · da, dmin · da, 0, 0]`.
#[inline(always)]
pub(super) unsafe fn k_scales(w: *const u8, da: __m128) -> __m128 {
    let bits = w.cast::<i32>().read_unaligned();
    _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)), da)
}

/// What a Q8_0 block takes from its Q8_0 activation block: the quants widened to i16, and the
/// scale in every lane.
struct Q8Shared {
    low: __m256i,
    high: __m256i,
    da: __m128,
}

#[inline(always)]
unsafe fn q8_da(a: *const u8) -> __m128 {
    _mm_cvtph_ps(_mm_set1_epi16(a.cast::<i16>().read_unaligned()))
}

/// The 16 signed bytes at `p`, sign-extended to 16 i16 lanes.
#[inline(always)]
unsafe fn widen_i8(p: *const u8) -> __m256i {
    _mm256_cvtepi8_epi16(_mm_loadu_si128(p.cast()))
}

/// A 32-element block's lane sums `sum` scaled by its weight scale (the f16 at `w`) and the
/// activation scale (lane 0 of `da`) into `acc`.
#[inline(always)]
unsafe fn add_block(w: *const u8, sum: __m256i, da: __m128, acc: &mut __m256) {
    let scale = _mm256_broadcastss_ps(f16_times(w, da));
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, *acc);
}

struct Q8;

impl BlockKernel for Q8 {
    const W_BYTES: usize = q8_0::BYTES;
    const A_BYTES: usize = q8_0::BYTES;
    const PREPARE: bool = false;
    type Shared = Q8Shared;
    type Acc = __m256;

    #[inline(always)]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }

    #[inline(always)]
    unsafe fn shared(a: *const u8) -> Q8Shared {
        Q8Shared {
            low: widen_i8(a.add(q8_0::QS)),
            high: widen_i8(a.add(q8_0::QS + 16)),
            da: q8_da(a),
        }
    }

    #[inline(always)]
    unsafe fn block(w: *const u8, s: &Q8Shared, acc: &mut __m256) {
        // |x y + x' y'| <= 2 · 128² fits the i32 lanes of vpmaddwd.
        let x = w.add(q8_0::QS);
        let low = _mm256_madd_epi16(widen_i8(x), s.low);
        let high = _mm256_madd_epi16(widen_i8(x.add(16)), s.high);
        add_block(w, _mm256_add_epi32(low, high), s.da, acc);
    }

    #[inline(always)]
    unsafe fn merge(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }

    #[inline(always)]
    unsafe fn total(acc: __m256) -> f32 {
        hsum_256(acc)
    }
}

/// What a Q4_0 block takes from its Q8_0 activation block: the quants, `8 y + 8 y'` for each pair
/// (the offset's share), and the scale.
struct Q4Shared {
    y: __m256i,
    eight_y: __m256i,
    da: __m128,
}

struct Q4;

impl BlockKernel for Q4 {
    const W_BYTES: usize = q4_0::BYTES;
    const A_BYTES: usize = q8_0::BYTES;
    const PREPARE: bool = false;
    type Shared = Q4Shared;
    type Acc = __m256;

    #[inline(always)]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }

    #[inline(always)]
    unsafe fn shared(a: *const u8) -> Q4Shared {
        let y = _mm256_loadu_si256(a.add(q8_0::QS).cast());
        Q4Shared {
            y,
            eight_y: _mm256_maddubs_epi16(_mm256_set1_epi8(8), y),
            da: q8_da(a),
        }
    }

    #[inline(always)]
    unsafe fn block(w: *const u8, s: &Q4Shared, acc: &mut __m256) {
        // Elements 0..16 in the low nibbles of the 16 bytes, 16..32 in the high ones.
        let v = _mm_loadu_si128(w.add(q4_0::QS).cast());
        let mask = _mm_set1_epi8(0x0F);
        let low = _mm_and_si128(v, mask);
        let high = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
        // Σ (q - 8) y = Σ q y - Σ 8 y, both in i16 pairs: |q y + q' y'| <= 3810, |8 y + 8 y'| <= 2048.
        let qy = _mm256_maddubs_epi16(_mm256_set_m128i(high, low), s.y);
        let sum = _mm256_madd_epi16(_mm256_sub_epi16(qy, s.eight_y), _mm256_set1_epi16(1));
        add_block(w, sum, s.da, acc);
    }

    #[inline(always)]
    unsafe fn merge(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }

    #[inline(always)]
    unsafe fn total(acc: __m256) -> f32 {
        hsum_256(acc)
    }
}

/// Q8_0 weight rows · a Q8_0 activation row into `out` (safety: see the module documentation).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q8_0(w: &[u8], a: &[u8], out: &mut [f32]) {
    dot_rows::<Q8, 4>(w, a.as_ptr(), a.len() / q8_0::BYTES, out)
}

/// Q4_0 weight rows · a Q8_0 activation row into `out` (safety: see the module documentation).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4_0(w: &[u8], a: &[u8], out: &mut [f32]) {
    dot_rows::<Q4, 4>(w, a.as_ptr(), a.len() / q8_0::BYTES, out)
}

/// The byte shuffle that spreads scale `j` (byte `j` of each 128-bit lane of a broadcast u64)
/// over all 16-bit lanes, zero-extended.
const fn k_scale_pick(j: usize) -> [u8; 32] {
    let mut pick = [0x80u8; 32];
    let mut i = 0;
    while i < 32 {
        pick[i] = j as u8;
        i += 2;
    }
    pick
}

pub(super) const K_SCALE_PICK: [[u8; 32]; 8] = [
    k_scale_pick(0),
    k_scale_pick(1),
    k_scale_pick(2),
    k_scale_pick(3),
    k_scale_pick(4),
    k_scale_pick(5),
    k_scale_pick(6),
    k_scale_pick(7),
];

#[inline(always)]
pub(super) unsafe fn load_const(bytes: &[u8; 32]) -> __m256i {
    _mm256_loadu_si256(bytes.as_ptr().cast())
}

/// What a Q4_K/Q5_K block takes from its Q8_K block: the quants, the scale, and the sums of 32.
struct KShared {
    y: *const i8,
    da: __m128,
    pairs: __m128i,
}

#[inline(always)]
unsafe fn k_shared(a: *const u8) -> KShared {
    let a = &*a.cast::<BlockQ8K>();
    let bsums = a.bsums().as_ptr();
    // |a sum of 32| <= 32 · 127 fits i16.
    let pairs = _mm_hadd_epi16(
        _mm_loadu_si128(bsums.cast()),
        _mm_loadu_si128(bsums.add(8).cast()),
    );
    KShared {
        y: a.qs().as_ptr(),
        da: _mm_set1_ps(a.d()),
        pairs,
    }
}

/// A Q4_K block (`Q5` false) or a Q5_K block (`Q5` true; its high bytes at `w + qh_at`), whose
/// f16 `d` and `dmin` are at `w`, its packed scales at `w + scales_at` and its nibbles at
/// `w + qs_at`: `d · da · Σ_j scale_j Σ q·y` into `acc.0` and `dmin · da · Σ_j min_j Σ y` into
/// `acc.1`.
#[inline(always)]
unsafe fn k_block<const Q5: bool>(
    w: *const u8,
    scales_at: usize,
    qh_at: usize,
    qs_at: usize,
    s: &KShared,
    acc: &mut (__m256, __m128),
) {
    let (scales, mins) = kscale::unpack_words(&*w.add(scales_at).cast::<[u8; 12]>());
    let scales = _mm256_set1_epi64x(scales as i64);
    let (mask, one) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(1));
    let mut high = if Q5 {
        _mm256_loadu_si256(w.add(qh_at).cast())
    } else {
        _mm256_setzero_si256()
    };
    let mut sum = _mm256_setzero_si256();
    for p in 0..4 {
        // Sub-block 2p in the low nibbles of the 32 bytes, 2p + 1 in the high nibbles.
        let v = _mm256_loadu_si256(w.add(qs_at + 32 * p).cast());
        let mut q0 = _mm256_and_si256(v, mask);
        let mut q1 = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
        if Q5 {
            // Bits 2p and 2p + 1 of each byte; 16-bit lanes shifted by at most 7 keep each byte's
            // bit in that byte.
            q0 = _mm256_or_si256(q0, _mm256_slli_epi16::<4>(_mm256_and_si256(high, one)));
            let h1 = _mm256_and_si256(_mm256_srli_epi16::<1>(high), one);
            q1 = _mm256_or_si256(q1, _mm256_slli_epi16::<4>(h1));
            high = _mm256_srli_epi16::<2>(high);
        }
        // Quants below 32: |q y + q' y'| <= 31 · 127 · 2 fits i16.
        let p0 = _mm256_maddubs_epi16(q0, _mm256_loadu_si256(s.y.add(64 * p).cast()));
        let p1 = _mm256_maddubs_epi16(q1, _mm256_loadu_si256(s.y.add(64 * p + 32).cast()));
        let s0 = _mm256_shuffle_epi8(scales, load_const(&K_SCALE_PICK[2 * p]));
        let s1 = _mm256_shuffle_epi8(scales, load_const(&K_SCALE_PICK[2 * p + 1]));
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p0, s0));
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p1, s1));
    }
    let mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mins as i64));
    let min_sum = _mm_madd_epi16(mins, s.pairs);
    let dd = k_scales(w, s.da);
    acc.0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_broadcastss_ps(dd), acc.0);
    acc.1 = _mm_fmadd_ps(
        _mm_cvtepi32_ps(min_sum),
        _mm_permute_ps::<0b01_01_01_01>(dd),
        acc.1,
    );
}

struct Q4K;

impl BlockKernel for Q4K {
    const W_BYTES: usize = q4_k::BYTES;
    const A_BYTES: usize = Q8K_BYTES;
    const PREPARE: bool = true;
    type Shared = KShared;
    type Acc = (__m256, __m128);

    #[inline(always)]
    unsafe fn zero() -> (__m256, __m128) {
        (_mm256_setzero_ps(), _mm_setzero_ps())
    }

    #[inline(always)]
    unsafe fn shared(a: *const u8) -> KShared {
        k_shared(a)
    }

    #[inline(always)]
    unsafe fn block(w: *const u8, s: &KShared, acc: &mut (__m256, __m128)) {
        k_block::<false>(w, q4_k::SCALES, 0, q4_k::QS, s, acc)
    }

    #[inline(always)]
    unsafe fn merge(a: (__m256, __m128), b: (__m256, __m128)) -> (__m256, __m128) {
        (_mm256_add_ps(a.0, b.0), _mm_add_ps(a.1, b.1))
    }

    #[inline(always)]
    unsafe fn total(acc: (__m256, __m128)) -> f32 {
        hsum_256(acc.0) - hsum_128(acc.1)
    }
}

struct Q5K;

impl BlockKernel for Q5K {
    const W_BYTES: usize = q5_k::BYTES;
    const A_BYTES: usize = Q8K_BYTES;
    const PREPARE: bool = true;
    type Shared = KShared;
    type Acc = (__m256, __m128);

    #[inline(always)]
    unsafe fn zero() -> (__m256, __m128) {
        (_mm256_setzero_ps(), _mm_setzero_ps())
    }

    #[inline(always)]
    unsafe fn shared(a: *const u8) -> KShared {
        k_shared(a)
    }

    #[inline(always)]
    unsafe fn block(w: *const u8, s: &KShared, acc: &mut (__m256, __m128)) {
        k_block::<true>(w, q5_k::SCALES, q5_k::QH, q5_k::QS, s, acc)
    }

    #[inline(always)]
    unsafe fn merge(a: (__m256, __m128), b: (__m256, __m128)) -> (__m256, __m128) {
        (_mm256_add_ps(a.0, b.0), _mm_add_ps(a.1, b.1))
    }

    #[inline(always)]
    unsafe fn total(acc: (__m256, __m128)) -> f32 {
        hsum_256(acc.0) - hsum_128(acc.1)
    }
}

/// Q4_K weight rows · a Q8_K activation row into `out` (safety: see the module documentation).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4_k(w: &[u8], a: &[BlockQ8K], out: &mut [f32]) {
    dot_rows::<Q4K, 1>(w, a.as_ptr().cast(), a.len(), out)
}

/// Q5_K weight rows · a Q8_K activation row into `out` (safety: see the module documentation).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q5_k(w: &[u8], a: &[BlockQ8K], out: &mut [f32]) {
    dot_rows::<Q5K, 1>(w, a.as_ptr().cast(), a.len(), out)
}

/// What a Q6_K block takes from its Q8_K block: the quants, the scale, and `32 y + 32 y'` for
/// each pair of quants (the offset's share, in the lanes of the products it goes with). Computed
/// for every weight block: a buffer of them for all the rows doubles the activation bytes a
/// block reads, and measured slower from memory on rows of 8192 or more.
struct Q6Shared {
    y: *const i8,
    da: __m128,
    offset: [__m256i; 8],
}

/// The byte shuffle that spreads 16-bit scale `2s` over the lower 128-bit lane and `2s + 1` over
/// the upper one (of 8 scales in each lane): the scales of elements `32s..32s + 16` and
/// `32s + 16..32s + 32` of a group of 128.
const fn q6_scale_pick(s: usize) -> [u8; 32] {
    let mut pick = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        let scale = 2 * s + i / 16;
        pick[i] = (2 * scale + i % 2) as u8;
        i += 1;
    }
    pick
}

pub(super) const Q6_SCALE_PICK: [[u8; 32]; 4] = [
    q6_scale_pick(0),
    q6_scale_pick(1),
    q6_scale_pick(2),
    q6_scale_pick(3),
];

/// Half `h` (0 or 1) of the Q6_K block at `w`: its scales 8h..8h + 8 in both 128-bit lanes (from
/// `scales`, the block's 16 scales widened to i16) and its quants, 32s..32s + 32 of the group of
/// 128 in `quants[s]`: the low (s < 2) or high nibbles of the low bytes 32 (s % 2).., with bits
/// 2s, 2s + 1 of the high bytes moved to bits 4-5 (16-bit shifts of at most 4 bring nothing
/// across bytes into those bits). Each quant is below 64, not yet offset by -32.
#[inline(always)]
pub(super) unsafe fn q6_k_half(w: *const u8, scales: __m256i, h: usize) -> (__m256i, [__m256i; 4]) {
    let (m4, m30) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
    let lane_scales = if h == 0 {
        _mm256_permute2x128_si256::<0x00>(scales, scales)
    } else {
        _mm256_permute2x128_si256::<0x11>(scales, scales)
    };
    let ql0 = _mm256_loadu_si256(w.add(64 * h).cast());
    let ql1 = _mm256_loadu_si256(w.add(64 * h + 32).cast());
    let hb = _mm256_loadu_si256(w.add(q6_k::QH + 32 * h).cast());
    let parts = [
        (_mm256_and_si256(ql0, m4), _mm256_slli_epi16::<4>(hb)),
        (_mm256_and_si256(ql1, m4), _mm256_slli_epi16::<2>(hb)),
        (_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4), hb),
        (
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
            _mm256_srli_epi16::<2>(hb),
        ),
    ];
    // (A loop, not `map`: a closure would not inherit the caller's target features.)
    let mut quants = [_mm256_setzero_si256(); 4];
    for (q, (nibbles, top)) in quants.iter_mut().zip(parts) {
        *q = _mm256_or_si256(nibbles, _mm256_and_si256(top, m30));
    }
    (lane_scales, quants)
}

struct Q6K;

impl BlockKernel for Q6K {
    const W_BYTES: usize = q6_k::BYTES;
    const A_BYTES: usize = Q8K_BYTES;
    const PREPARE: bool = false;
    type Shared = Q6Shared;
    type Acc = __m256;

    #[inline(always)]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }

    #[inline(always)]
    unsafe fn shared(a: *const u8) -> Q6Shared {
        let a = &*a.cast::<BlockQ8K>();
        let y = a.qs().as_ptr();
        // (Not `array::from_fn`: a closure would not inherit the caller's target features.)
        let mut offset = [_mm256_setzero_si256(); 8];
        for (i, offset) in offset.iter_mut().enumerate() {
            let y = _mm256_loadu_si256(y.add(32 * i).cast());
            *offset = _mm256_maddubs_epi16(_mm256_set1_epi8(32), y);
        }
        Q6Shared {
            y,
            da: _mm_set1_ps(a.d()),
            offset,
        }
    }

    #[inline(always)]
    unsafe fn block(w: *const u8, s: &Q6Shared, acc: &mut __m256) {
        let scales = _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(q6_k::SCALES).cast()));
        let mut sum = _mm256_setzero_si256();
        for h in 0..2 {
            let (lane_scales, quants) = q6_k_half(w, scales, h);
            for (q_s, q) in quants.into_iter().enumerate() {
                // Quants below 64: |q y + q' y'| <= 63 · 127 · 2 fits i16, and so does
                // (q - 32) y + (q' - 32) y'.
                let y = _mm256_loadu_si256(s.y.add(128 * h + 32 * q_s).cast());
                let prod = _mm256_sub_epi16(_mm256_maddubs_epi16(q, y), s.offset[4 * h + q_s]);
                let scale = _mm256_shuffle_epi8(lane_scales, load_const(&Q6_SCALE_PICK[q_s]));
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(prod, scale));
            }
        }
        let scale = _mm256_broadcastss_ps(f16_times(w.add(q6_k::D), s.da));
        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, *acc);
    }

    #[inline(always)]
    unsafe fn merge(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }

    #[inline(always)]
    unsafe fn total(acc: __m256) -> f32 {
        hsum_256(acc)
    }
}

/// Q6_K weight rows · a Q8_K activation row into `out` (safety: see the module documentation).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q6_k(w: &[u8], a: &[BlockQ8K], out: &mut [f32]) {
    dot_rows::<Q6K, 1>(w, a.as_ptr().cast(), a.len(), out)
}
