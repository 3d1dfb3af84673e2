//! Helpers shared by the kernel tests: repeatable inputs, the SIMD paths this CPU can run, and
//! comparisons with tolerances relative to the magnitude of what was summed.

#![allow(dead_code)] // each test module uses its own subset

use shardline_tensor::{DType, Isa, Shape, Tensor, TensorView};

pub use shardline_tensor::reference::values;

/// Every SIMD path this CPU supports; says on stderr which ones it cannot test here.
pub fn isas() -> Vec<Isa> {
    Isa::ALL
        .into_iter()
        .filter(|isa| {
            let ok = isa.is_supported();
            if !ok {
                eprintln!("not testing the {isa} path: this CPU does not support it");
            }
            ok
        })
        .collect()
}

/// A `[n, k]` weight of `dtype` with values from `seed`, stored `offset` bytes into a byte
/// buffer so that views of it are unaligned (as in a memory-mapped file).
pub struct Weight {
    pub dtype: DType,
    pub shape: Shape,
    buf: Vec<u8>,
    offset: usize,
}

impl Weight {
    pub fn new(dtype: DType, n: usize, k: usize, seed: u64, offset: usize) -> Weight {
        let t = Tensor::from_f32(dtype, [n, k], &values(n * k, seed)).unwrap();
        let mut buf = vec![0xAAu8; offset + t.bytes().len()];
        buf[offset..].copy_from_slice(t.bytes());
        Weight {
            dtype,
            shape: Shape::new([n, k]),
            buf,
            offset,
        }
    }

    pub fn view(&self) -> TensorView<'_> {
        TensorView::new(self.dtype, &self.shape, &self.buf[self.offset..]).unwrap()
    }
}

/// `|w| |x|` summed per row: the scale of a dot product's rounding error.
pub fn abs_dot(w: &TensorView, x: &[f32]) -> Vec<f32> {
    let k = x.len();
    (0..w.shape().dims()[0])
        .map(|r| (0..k).map(|c| (w.get_f32(r * k + c) * x[c]).abs()).sum())
        .collect()
}

/// Asserts `|got[i] - want[i]| <= tol[i]` for every i, naming the first element that is not.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, ((g, w), t)) in got.iter().zip(want).zip(tol).enumerate() {
        assert!(
            (g - w).abs() <= *t,
            "{what}: element {i} is {g}, expected {w} (tolerance {t})"
        );
    }
}

/// Tolerance of a sum of `n` terms of magnitude `scale` accumulated in f32 in any order.
pub fn sum_tol(n: usize, scale: f32) -> f32 {
    (n as f32 + 2.0) * f32::EPSILON * scale + f32::MIN_POSITIVE
}
