//! The loop the SIMD kernels share: weight rows one after another against one activation row,
//! each row's sums kept in SIMD registers across its blocks and added up once at its end.
//!
//! Rows run one at a time, each read front to back: dotting two or four rows at once (sharing
//! each activation block between them) computes faster from cache, but interleaving the rows'
//! reads measured about half as fast from memory on a 2-core Zen 4 (Q4_K at 4096 columns, one
//! thread: 6-8 GB/s for 2 or 4 rows, with or without software prefetch 8 blocks ahead, against
//! 16-18 GB/s for one), and decode reads its weights from memory.

use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};

/// A format's SIMD dot product, block by block.
pub(super) trait BlockKernel {
    /// Bytes per weight block.
    const W_BYTES: usize;
    /// Bytes per activation block (a Q8_0 block, or a [`super::BlockQ8K`]).
    const A_BYTES: usize;
    /// Whether [`BlockKernel::shared`] runs once per activation block for all the rows (kept in
    /// a buffer), or once per block of every row (where the buffer would cost more than it saves).
    const PREPARE: bool;
    /// What a weight block takes from its activation block.
    type Shared;
    /// A row's running sums.
    type Acc: Copy;

    /// The sums of a row before its first block.
    ///
    /// Safety: the CPU has the kernel's features.
    unsafe fn zero() -> Self::Acc;

    /// What a weight block needs of the activation block at `a`.
    ///
    /// Safety: `a` points at one whole activation block, on a CPU with the kernel's features.
    unsafe fn shared(a: *const u8) -> Self::Shared;

    /// Adds the weight block at `w` times the activation block of `s` to `acc`.
    ///
    /// Safety: `w` points at one whole weight block, on a CPU with the kernel's features.
    unsafe fn block(w: *const u8, s: &Self::Shared, acc: &mut Self::Acc);

    /// Two sets of a row's sums (of different blocks) added together.
    ///
    /// Safety: the CPU has the kernel's features.
    unsafe fn merge(a: Self::Acc, b: Self::Acc) -> Self::Acc;

    /// The dot product from a row's sums.
    ///
    /// Safety: the CPU has the kernel's features.
    unsafe fn total(acc: Self::Acc) -> f32;
}

/// `out[r]` = weight row `r` of the `out.len()` rows of `blocks` blocks in `w` times the
/// activation row of `blocks` blocks at `a`. Block `b` goes to the row's sums number `b % N`,
/// which are added pairwise at the end: `N` independent chains of additions, for blocks whose
/// work is shorter than an addition's latency.
///
/// Safety: the CPU has `K`'s features; `w` holds `out.len()` rows of `blocks` whole `K` weight
/// blocks and `a` points at `blocks` whole activation blocks; `N` is 1, 2 or 4.
#[inline(always)]
pub(super) unsafe fn dot_rows<K: BlockKernel, const N: usize>(
    w: &[u8],
    a: *const u8,
    blocks: usize,
    out: &mut [f32],
) {
    let row_bytes = blocks * K::W_BYTES;
    debug_assert_eq!(w.len(), row_bytes * out.len());
    // What the weight blocks need of the activation blocks, once for all the rows. (A loop, not
    // `map`: a closure would not inherit the caller's target features.)
    let mut prepared = Vec::new();
    if K::PREPARE {
        prepared.reserve_exact(blocks);
        for b in 0..blocks {
            prepared.push(K::shared(a.add(b * K::A_BYTES)));
        }
    }
    let wp = w.as_ptr();
    for (r, out) in out.iter_mut().enumerate() {
        let row = wp.add(r * row_bytes);
        let mut acc = [K::zero(); N];
        let mut b = 0;
        while b + N <= blocks {
            for (i, acc) in acc.iter_mut().enumerate() {
                block::<K>(row, a, &prepared, b + i, acc);
            }
            b += N;
        }
        for (i, acc) in acc.iter_mut().enumerate().take(blocks - b) {
            block::<K>(row, a, &prepared, b + i, acc);
        }
        let mut n = N;
        while n > 1 {
            n /= 2;
            for i in 0..n {
                acc[i] = K::merge(acc[i], acc[i + n]);
            }
        }
        *out = K::total(acc[0]);
    }
}

/// How far ahead of the block being read its row's bytes are prefetched (and the rows after it:
/// a matrix's rows follow one another). The hardware prefetcher alone kept a decode step's Q8_0
/// matrix-vector products at about 8 GB/s of weights on a 2-core Sapphire Rapids, where bf16
/// weights stream at 17: a Q8_0 block of 34 bytes takes a dozen instructions, so the
/// out-of-order window holds too few bytes of misses. 2 KiB ahead took Q8_0 to about 14 GB/s and
/// Q4_K from 10 to 13 (docs/performance.md, quantized decode on the CPU).
const PREFETCH_AHEAD: usize = 2048;

/// Adds block `b` of the weight row at `row` times activation block `b` (at `a`, or prepared in
/// `prepared`) to `acc`, prefetching the block [`PREFETCH_AHEAD`] bytes on (every cache line of
/// it; a prefetch past the matrix's end is harmless: it never faults).
///
/// Safety: as [`dot_rows`], for a block of the row; `prepared` holds block `b` if `K::PREPARE`.
#[inline(always)]
unsafe fn block<K: BlockKernel>(
    row: *const u8,
    a: *const u8,
    prepared: &[K::Shared],
    b: usize,
    acc: &mut K::Acc,
) {
    let w = row.add(b * K::W_BYTES);
    let mut line = 0;
    while line < K::W_BYTES {
        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(PREFETCH_AHEAD + line).cast());
        line += 64;
    }
    if K::PREPARE {
        K::block(w, prepared.get_unchecked(b), acc)
    } else {
        K::block(w, &K::shared(a.add(b * K::A_BYTES)), acc)
    }
}
