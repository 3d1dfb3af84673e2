//! Vector reductions on f32 slices (dot product, sum) with several accumulators, for the
//! kernels whose inner loop is a reduction (the compiler does not vectorise float reductions by
//! itself: that would reorder the additions).

use super::lanes::Simd;
use super::{run, Isa, WithSimd};

/// Independent accumulators: enough to hide the add/FMA latency.
const ACC: usize = 4;

/// `sum_i a[i] * b[i]` over the shorter of the two slices.
pub(crate) fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    run(isa, Dot(a, b))
}

/// `sum_i x[i]`.
pub(crate) fn sum(isa: Isa, x: &[f32]) -> f32 {
    run(isa, Sum(x))
}

struct Dot<'a>(&'a [f32], &'a [f32]);

impl WithSimd for Dot<'_> {
    type Output = f32;
    #[inline(always)]
    fn run<S: Simd>(self) -> f32 {
        dot_lanes::<S>(self.0, self.1)
    }
}

/// [`dot`] inside a body already running on `S` (no dispatch per call).
#[inline(always)]
pub(crate) fn dot_lanes<S: Simd>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (a.as_ptr(), b.as_ptr());
    // SAFETY: every index read is below n, the length of both slices.
    unsafe {
        let mut acc = [S::zero(); ACC];
        let step = S::LANES * ACC;
        let mut i = 0;
        while i + step <= n {
            for (j, c) in acc.iter_mut().enumerate() {
                let o = i + j * S::LANES;
                *c = S::fma(S::load(a.add(o)), S::load(b.add(o)), *c);
            }
            i += step;
        }
        while i + S::LANES <= n {
            acc[0] = S::fma(S::load(a.add(i)), S::load(b.add(i)), acc[0]);
            i += S::LANES;
        }
        let v = S::add(S::add(acc[0], acc[1]), S::add(acc[2], acc[3]));
        let mut s = S::reduce_sum(v);
        for j in i..n {
            s += *a.add(j) * *b.add(j);
        }
        s
    }
}

/// `y += alpha * x` over the shorter of the two slices, inside a body running on `S`.
#[inline(always)]
pub(crate) fn axpy_lanes<S: Simd>(alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (x, y) = (x.as_ptr(), y.as_mut_ptr());
    // SAFETY: every index read or written is below n, the length of both slices.
    unsafe {
        let a = S::splat(alpha);
        let mut i = 0;
        while i + S::LANES <= n {
            S::store(y.add(i), S::fma(a, S::load(x.add(i)), S::load(y.add(i))));
            i += S::LANES;
        }
        for j in i..n {
            *y.add(j) += alpha * *x.add(j);
        }
    }
}

struct Sum<'a>(&'a [f32]);

impl WithSimd for Sum<'_> {
    type Output = f32;
    #[inline(always)]
    fn run<S: Simd>(self) -> f32 {
        sum_lanes::<S>(self.0)
    }
}

/// [`sum`] inside a body already running on `S`.
#[inline(always)]
pub(crate) fn sum_lanes<S: Simd>(x: &[f32]) -> f32 {
    let n = x.len();
    let a = x.as_ptr();
    // SAFETY: every index read is below n.
    unsafe {
        let mut acc = [S::zero(); ACC];
        let step = S::LANES * ACC;
        let mut i = 0;
        while i + step <= n {
            for (j, c) in acc.iter_mut().enumerate() {
                *c = S::add(S::load(a.add(i + j * S::LANES)), *c);
            }
            i += step;
        }
        let v = S::add(S::add(acc[0], acc[1]), S::add(acc[2], acc[3]));
        let mut s = S::reduce_sum(v);
        for j in i..n {
            s += *a.add(j);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both reductions on every supported path, at lengths around the vector and unroll widths.
    #[test]
    fn dot_and_sum_on_every_path() {
        let a: Vec<f32> = (0..300)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let b: Vec<f32> = (0..300)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 5.0)
            .collect();
        for isa in Isa::ALL {
            if !isa.is_supported() {
                eprintln!("not testing the {isa} path: this CPU does not support it");
                continue;
            }
            for n in [0, 1, 7, 8, 15, 16, 17, 63, 64, 65, 300] {
                let (a, b) = (&a[..n], &b[..n]);
                let want_dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
                let want_sum: f64 = a.iter().map(|x| *x as f64).sum();
                let scale_dot: f64 = a.iter().zip(b).map(|(x, y)| (x * y).abs() as f64).sum();
                let scale_sum: f64 = a.iter().map(|x| x.abs() as f64).sum();
                let tol = |scale: f64| (n as f64 + 2.0) * f32::EPSILON as f64 * scale + 1e-30;
                let got = dot(isa, a, b) as f64;
                assert!(
                    (got - want_dot).abs() <= tol(scale_dot),
                    "{isa} dot n={n}: {got} vs {want_dot}"
                );
                let got = sum(isa, a) as f64;
                assert!(
                    (got - want_sum).abs() <= tol(scale_sum),
                    "{isa} sum n={n}: {got} vs {want_sum}"
                );
            }
        }
    }
}
