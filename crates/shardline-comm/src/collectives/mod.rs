//! Collective algorithms over an [`Engine`](crate::engine::Engine): each one builds the frames of
//! its steps and hands them to the progress engine. They work on byte buffers tagged with a dtype;
//! the typed API lives in `group.rs`.

mod copy;
mod reduce;
mod sync;

use smallvec::SmallVec;
use std::ops::Range;

/// A shared view of range `a` and a mutable view of range `b` of one buffer (they must not overlap).
pub(crate) fn split2(buf: &mut [u8], a: Range<usize>, b: Range<usize>) -> (&[u8], &mut [u8]) {
    if a.end <= b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.len()])
    } else {
        assert!(b.end <= a.start, "overlapping ranges {a:?} and {b:?}");
        let (lo, hi) = buf.split_at_mut(a.start);
        (&hi[..a.len()], &mut lo[b])
    }
}

/// Cuts `buf` into consecutive blocks of the given byte lengths (which must add up to its length).
pub(crate) fn blocks_mut(
    mut buf: &mut [u8],
    lens: impl Iterator<Item = usize>,
) -> SmallVec<[&mut [u8]; 16]> {
    let mut out = SmallVec::new();
    for n in lens {
        let (head, rest) = std::mem::take(&mut buf).split_at_mut(n);
        out.push(head);
        buf = rest;
    }
    debug_assert!(buf.is_empty());
    out
}

/// Byte range of chunk `c` of `n` elements of `esize` bytes cut into `parts` near-equal chunks.
pub(crate) fn chunk(n: usize, parts: usize, c: usize, esize: usize) -> Range<usize> {
    (c * n / parts) * esize..((c + 1) * n / parts) * esize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_everything_even_when_shorter_than_parts() {
        for n in [0, 1, 2, 7, 100] {
            for parts in 1..6 {
                let mut next = 0;
                for c in 0..parts {
                    let r = chunk(n, parts, c, 2);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, n * 2);
            }
        }
    }

    #[test]
    fn split2_handles_empty_and_either_order() {
        let mut buf = [0u8, 1, 2, 3, 4, 5];
        let (a, b) = split2(&mut buf, 4..6, 0..2);
        assert_eq!((a, &*b), (&[4u8, 5][..], &[0u8, 1][..]));
        let (a, b) = split2(&mut buf, 2..2, 2..4);
        assert_eq!((a.len(), &*b), (0, &[2u8, 3][..]));
        let blocks = blocks_mut(&mut buf, [1, 0, 5].into_iter());
        assert_eq!(
            blocks.iter().map(|b| b.len()).collect::<Vec<_>>(),
            [1, 0, 5]
        );
    }
}
