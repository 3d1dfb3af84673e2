//! AVX-512 dot-product kernels with VNNI, one weight row after another (see `group`).
//!
//! Q4_0 and Q8_0 blocks (32 elements) take one `vpdpbusd` (unsigned × signed bytes summed in
//! fours into i32): Q8_0's signed weights are offset by 128 (`x ^ 0x80`) and Q4_0's nibbles are
//! unsigned, and the offset's share, `128 Σ y` or `8 Σ y` over the same four bytes, starts each
//! lane's sum. K-quant super-blocks (256 elements) take 64 elements per step: `vpmaddubsw`
//! (unsigned quants × signed activations to i16 pairs, which cannot saturate for quants below
//! 64), then `vpdpwssd` with the sub-block scales spread over the lanes by a byte shuffle (Q4_K,
//! Q5_K) or a word permutation (Q6_K), accumulated in i32. Q4_K/Q5_K read 64 bytes of nibbles at a
//! time, whose low and high nibbles hold sub-blocks `4h, 4h + 2` and `4h + 1, 4h + 3`: the
//! activation quants are rearranged to match once per call. Their scales and mins are unpacked in
//! word arithmetic ([`kscale::unpack_words`]) and their min terms come from the activation sums of
//! 32 (`vpmaddwd` of the mins with the pairs of Q8_K's sums of 16). Q6_K's offset of 32 is taken
//! off each product of i16 pairs (`32 y + 32 y'`).
//!
//! Every block's integer sums are exact, and each lane's holds products of its own elements only
//! (with their offsets). They are converted to f32 in their lanes and added into the row's f32
//! vector with `(weight scale × activation scale)` (fused multiply-add), and a row's lanes are
//! summed once at its end: the result differs from the scalar reference only in the order of the
//! f32 roundings (see the tolerance in the quant tests).
//!
//! Callers must run these only where the CPU has AVX-512F/BW/VL, AVX-512 VNNI and AVX2/FMA/F16C,
//! and pass rows of whole blocks with as many elements as the activation row.

use std::arch::x86_64::*;

use super::dot_avx2::{f16_times, hsum_128, hsum_256, k_scales, Q8K_BYTES};
use super::group::{dot_rows, BlockKernel};
use super::kscale;
use super::layout::{q4_0, q4_k, q5_k, q6_k, q8_0};
use super::BlockQ8K;

/// What a Q4_0/Q8_0 block takes from its Q8_0 activation block: the quants, the offset's share
/// negated (`-offset · Σ y` in the lanes where `vpdpbusd` sums the same bytes), and the scale in
/// every lane. (Computed for every weight block: a buffer of them for all the rows measured
/// slower from memory.)
struct Q8Shared {
    y: __m256i,
    start: __m256i,
    da: __m128,
}

/// [`Q8Shared`] for weights stored with `offset` added to each quant.
#[inline(always)]
unsafe fn q8_shared(a: *const u8, offset: i8) -> Q8Shared {
    let y = _mm256_loadu_si256(a.add(q8_0::QS).cast());
    let zero = _mm256_setzero_si256();
    let offset_sum = _mm256_dpbusd_epi32(zero, _mm256_set1_epi8(offset), y);
    let da = _mm_cvtph_ps(_mm_set1_epi16(a.cast::<i16>().read_unaligned()));
    Q8Shared {
        y,
        start: _mm256_sub_epi32(zero, offset_sum),
        da,
    }
}

/// A 32-element block's lane sums `sum` scaled by its weight scale (the f16 at `w`) and the
/// activation scale into `acc`.
#[inline(always)]
unsafe fn add_block(w: *const u8, sum: __m256i, s: &Q8Shared, acc: &mut __m256) {
    let scale = _mm256_broadcastss_ps(f16_times(w, s.da));
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
        // Σ x y = Σ (x + 128) y - 128 Σ y, with x + 128 an unsigned byte: exact for every byte.
        q8_shared(a, i8::MIN)
    }

    #[inline(always)]
    unsafe fn block(w: *const u8, s: &Q8Shared, acc: &mut __m256) {
        let x = _mm256_loadu_si256(w.add(q8_0::QS).cast());
        let biased = _mm256_xor_si256(x, _mm256_set1_epi8(i8::MIN));
        add_block(w, _mm256_dpbusd_epi32(s.start, biased, s.y), s, acc);
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

struct Q4;

impl BlockKernel for Q4 {
    const W_BYTES: usize = q4_0::BYTES;
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
        // Σ (q - 8) y = Σ q y - 8 Σ y.
        q8_shared(a, 8)
    }

    #[inline(always)]
    unsafe fn block(w: *const u8, s: &Q8Shared, acc: &mut __m256) {
        // The 16 bytes in both halves, shifted right by 0 and 4: elements 0..16 in the low
        // nibbles, 16..32 in the high ones.
        let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(w.add(q4_0::QS).cast()));
        let shift = _mm256_set_epi64x(0x0004_0004_0004_0004, 0x0004_0004_0004_0004, 0, 0);
        let q = _mm256_and_si256(_mm256_srlv_epi16(v, shift), _mm256_set1_epi8(0x0F));
        add_block(w, _mm256_dpbusd_epi32(s.start, q, s.y), s, acc);
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
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q8_0(w: &[u8], a: &[u8], out: &mut [f32]) {
    dot_rows::<Q8, 4>(w, a.as_ptr(), a.len() / q8_0::BYTES, out)
}

/// Q4_0 weight rows · a Q8_0 activation row into `out` (safety: see the module documentation).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q4_0(w: &[u8], a: &[u8], out: &mut [f32]) {
    dot_rows::<Q4, 4>(w, a.as_ptr(), a.len() / q8_0::BYTES, out)
}

/// The byte shuffle that spreads the scales of the two sub-blocks of a product of 64 elements
/// over its 16-bit lanes (from a u64 of the eight scales broadcast to every 128-bit lane): the
/// lower 16 lanes (32 elements) get byte `lower`, the upper 16 byte `lower + 2`, zero-extended.
const fn k_scale_pick(lower: usize) -> [u8; 64] {
    let mut pick = [0x80u8; 64];
    let mut i = 0;
    while i < 64 {
        pick[i] = (lower + 2 * (i / 32)) as u8;
        i += 2;
    }
    pick
}

/// [`k_scale_pick`] for the products of sub-blocks `(0, 2)`, `(1, 3)`, `(4, 6)` and `(5, 7)`.
const K_SCALE_PICK: [[u8; 64]; 4] = [
    k_scale_pick(0),
    k_scale_pick(1),
    k_scale_pick(4),
    k_scale_pick(5),
];

#[inline(always)]
unsafe fn load_const(bytes: &[u8; 64]) -> __m512i {
    _mm512_loadu_si512(bytes.as_ptr().cast())
}

/// What a Q4_K/Q5_K block takes from its Q8_K block: the quants in the order the nibbles come in
/// (64 bytes of weight quants hold sub-blocks `4h` and `4h + 2` in their low nibbles and
/// `4h + 1`, `4h + 3` in their high ones), the scale, and the sums of 32.
struct KShared {
    y: [__m512i; 4],
    da: __m128,
    pairs: __m128i,
}

/// The 32 quants of sub-block `j` at `q`, then those of sub-block `k`.
#[inline(always)]
unsafe fn sub_blocks(q: *const i8, j: usize, k: usize) -> __m512i {
    let low = _mm256_loadu_si256(q.add(32 * j).cast());
    _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(low),
        _mm256_loadu_si256(q.add(32 * k).cast()),
    )
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
    let q = a.qs().as_ptr();
    KShared {
        y: [
            sub_blocks(q, 0, 2),
            sub_blocks(q, 1, 3),
            sub_blocks(q, 4, 6),
            sub_blocks(q, 5, 7),
        ],
        da: _mm_set1_ps(a.d()),
        pairs,
    }
}

/// 16-bit lanes of `low` in the lower 256 bits and `high` in the upper 256.
#[inline(always)]
unsafe fn halves_i16(low: i16, high: i16) -> __m512i {
    _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_set1_epi16(low)),
        _mm256_set1_epi16(high),
    )
}

/// A Q4_K block (`Q5` false) or a Q5_K block (`Q5` true; its high bytes at `w + qh_at`), whose f16
/// `d` and `dmin` are at `w`, its packed scales at `w + scales_at` and its nibbles at `w + qs_at`:
/// `d · da · Σ_j scale_j Σ q·y` into `acc.0` and `dmin · da · Σ_j min_j Σ y` into `acc.1`.
#[inline(always)]
unsafe fn k_block<const Q5: bool>(
    w: *const u8,
    scales_at: usize,
    qh_at: usize,
    qs_at: usize,
    s: &KShared,
    acc: &mut (__m512, __m128),
) {
    let (scales, mins) = kscale::unpack_words(&*w.add(scales_at).cast::<[u8; 12]>());
    let scales = _mm512_set1_epi64(scales as i64);
    let (mask, fifth) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x10));
    let high = if Q5 {
        _mm512_broadcast_i64x4(_mm256_loadu_si256(w.add(qh_at).cast()))
    } else {
        _mm512_setzero_si512()
    };
    let mut sum = _mm512_setzero_si512();
    for h in 0..2 {
        let v = _mm512_loadu_si512(w.add(qs_at + 64 * h).cast());
        let mut quants = [
            _mm512_and_si512(v, mask),
            _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask),
        ];
        if Q5 {
            // Sub-block j's fifth bits are bit j of the high bytes (in both halves): moved to
            // bit 4 by 16-bit shifts of at most 4 left or 3 right, which bring nothing across
            // bytes into that bit.
            let bits = if h == 0 {
                [
                    _mm512_sllv_epi16(high, halves_i16(4, 2)),
                    _mm512_sllv_epi16(high, halves_i16(3, 1)),
                ]
            } else {
                [
                    _mm512_srlv_epi16(high, halves_i16(0, 2)),
                    _mm512_srlv_epi16(high, halves_i16(1, 3)),
                ]
            };
            for (q, bits) in quants.iter_mut().zip(bits) {
                // q | (bits & 0x10).
                *q = _mm512_ternarylogic_epi32::<0xF8>(*q, bits, fifth);
            }
        }
        for (i, q) in quants.into_iter().enumerate() {
            // Quants below 32: |q y + q' y'| <= 31 · 127 · 2 fits i16.
            let prod = _mm512_maddubs_epi16(q, s.y[2 * h + i]);
            let scale = _mm512_shuffle_epi8(scales, load_const(&K_SCALE_PICK[2 * h + i]));
            sum = _mm512_dpwssd_epi32(sum, prod, scale);
        }
    }
    let mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mins as i64));
    let min_sum = _mm_madd_epi16(mins, s.pairs);
    let dd = k_scales(w, s.da);
    acc.0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_broadcastss_ps(dd), acc.0);
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
    type Acc = (__m512, __m128);

    #[inline(always)]
    unsafe fn zero() -> (__m512, __m128) {
        (_mm512_setzero_ps(), _mm_setzero_ps())
    }

    #[inline(always)]
    unsafe fn shared(a: *const u8) -> KShared {
        k_shared(a)
    }

    #[inline(always)]
    unsafe fn block(w: *const u8, s: &KShared, acc: &mut (__m512, __m128)) {
        k_block::<false>(w, q4_k::SCALES, 0, q4_k::QS, s, acc)
    }

    #[inline(always)]
    unsafe fn merge(a: (__m512, __m128), b: (__m512, __m128)) -> (__m512, __m128) {
        (_mm512_add_ps(a.0, b.0), _mm_add_ps(a.1, b.1))
    }

    #[inline(always)]
    unsafe fn total(acc: (__m512, __m128)) -> f32 {
        _mm512_reduce_add_ps(acc.0) - hsum_128(acc.1)
    }
}

struct Q5K;

impl BlockKernel for Q5K {
    const W_BYTES: usize = q5_k::BYTES;
    const A_BYTES: usize = Q8K_BYTES;
    const PREPARE: bool = true;
    type Shared = KShared;
    type Acc = (__m512, __m128);

    #[inline(always)]
    unsafe fn zero() -> (__m512, __m128) {
        (_mm512_setzero_ps(), _mm_setzero_ps())
    }

    #[inline(always)]
    unsafe fn shared(a: *const u8) -> KShared {
        k_shared(a)
    }

    #[inline(always)]
    unsafe fn block(w: *const u8, s: &KShared, acc: &mut (__m512, __m128)) {
        k_block::<true>(w, q5_k::SCALES, q5_k::QH, q5_k::QS, s, acc)
    }

    #[inline(always)]
    unsafe fn merge(a: (__m512, __m128), b: (__m512, __m128)) -> (__m512, __m128) {
        (_mm512_add_ps(a.0, b.0), _mm_add_ps(a.1, b.1))
    }

    #[inline(always)]
    unsafe fn total(acc: (__m512, __m128)) -> f32 {
        _mm512_reduce_add_ps(acc.0) - hsum_128(acc.1)
    }
}

/// Q4_K weight rows · a Q8_K activation row into `out` (safety: see the module documentation).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q4_k(w: &[u8], a: &[BlockQ8K], out: &mut [f32]) {
    dot_rows::<Q4K, 1>(w, a.as_ptr().cast(), a.len(), out)
}

/// Q5_K weight rows · a Q8_K activation row into `out` (safety: see the module documentation).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
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
    offset: [__m512i; 4],
}

/// The 16-bit lane indices that spread the scales of 64 elements `64p..` over a product's lanes:
/// lane `i` covers elements `64p + 2i, 64p + 2i + 1`, under scale `4p + i / 8`.
const fn q6_scale_index(p: usize) -> [u8; 64] {
    let mut index = [0u8; 64];
    let mut i = 0;
    while i < 32 {
        index[2 * i] = (4 * p + i / 8) as u8;
        i += 1;
    }
    index
}

const Q6_SCALE_INDEX: [[u8; 64]; 4] = [
    q6_scale_index(0),
    q6_scale_index(1),
    q6_scale_index(2),
    q6_scale_index(3),
];

struct Q6K;

impl BlockKernel for Q6K {
    const W_BYTES: usize = q6_k::BYTES;
    const A_BYTES: usize = Q8K_BYTES;
    const PREPARE: bool = false;
    type Shared = Q6Shared;
    type Acc = __m512;

    #[inline(always)]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }

    #[inline(always)]
    unsafe fn shared(a: *const u8) -> Q6Shared {
        let a = &*a.cast::<BlockQ8K>();
        let y = a.qs().as_ptr();
        // (Not `array::from_fn`: a closure would not inherit the caller's target features.)
        let mut offset = [_mm512_setzero_si512(); 4];
        for (p, offset) in offset.iter_mut().enumerate() {
            let y = _mm512_loadu_si512(y.add(64 * p).cast());
            *offset = _mm512_maddubs_epi16(_mm512_set1_epi8(32), y);
        }
        Q6Shared {
            y,
            da: _mm_set1_ps(a.d()),
            offset,
        }
    }

    #[inline(always)]
    unsafe fn block(w: *const u8, s: &Q6Shared, acc: &mut __m512) {
        let scales = _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(q6_k::SCALES).cast()));
        let scales = _mm512_castsi256_si512(scales);
        let mut sum = _mm512_setzero_si512();
        let (m4, m30) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
        for h in 0..2 {
            // Elements 128h + 0..64 (quants s = 0, 1: the low nibbles of the 64 low bytes, bits
            // 0-1 and 2-3 of the 32 high bytes), then 128h + 64..128 (s = 2, 3: the high
            // nibbles, bits 4-5 and 6-7). The high bits are moved to bits 4-5 by 16-bit shifts of
            // at most 4, which bring nothing across bytes into those bits.
            let low = _mm512_loadu_si512(w.add(64 * h).cast());
            let high = _mm512_broadcast_i64x4(_mm256_loadu_si256(w.add(q6_k::QH + 32 * h).cast()));
            let quants = [
                (
                    _mm512_and_si512(low, m4),
                    _mm512_sllv_epi16(high, halves_i16(4, 2)),
                ),
                (
                    _mm512_and_si512(_mm512_srli_epi16::<4>(low), m4),
                    _mm512_srlv_epi16(high, halves_i16(0, 2)),
                ),
            ];
            for (part, (nibbles, top)) in quants.into_iter().enumerate() {
                // nibbles | (top & 0x30).
                let q = _mm512_ternarylogic_epi32::<0xF8>(nibbles, top, m30);
                // Quants below 64: |q y + q' y'| <= 63 · 127 · 2 fits i16, and so does
                // (q - 32) y + (q' - 32) y'.
                let y = _mm512_loadu_si512(s.y.add(128 * h + 64 * part).cast());
                let prod = _mm512_sub_epi16(_mm512_maddubs_epi16(q, y), s.offset[2 * h + part]);
                let index = load_const(&Q6_SCALE_INDEX[2 * h + part]);
                sum = _mm512_dpwssd_epi32(sum, prod, _mm512_permutexvar_epi16(index, scales));
            }
        }
        let scale = _mm512_broadcastss_ps(f16_times(w.add(q6_k::D), s.da));
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, *acc);
    }

    #[inline(always)]
    unsafe fn merge(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }

    #[inline(always)]
    unsafe fn total(acc: __m512) -> f32 {
        _mm512_reduce_add_ps(acc)
    }
}

/// Q6_K weight rows · a Q8_K activation row into `out` (safety: see the module documentation).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q6_k(w: &[u8], a: &[BlockQ8K], out: &mut [f32]) {
    dot_rows::<Q6K, 1>(w, a.as_ptr().cast(), a.len(), out)
}
