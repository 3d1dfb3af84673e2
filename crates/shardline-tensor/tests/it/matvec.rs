//! matvec and matmul against the f64 reference, on every SIMD path, every dtype, odd shapes and
//! unaligned weights.

use crate::common;

use common::{abs_dot, assert_close, isas, sum_tol, values, Weight};
use proptest::prelude::*;
use shardline_tensor::kernels::{
    matmul_many_on, matmul_on, matvec_many_on, matvec_on, MatmulJob, MatvecJob,
};
use shardline_tensor::{reference, DType, Isa};

fn check_matvec(isa: Isa, dtype: DType, n: usize, k: usize, seed: u64, offset: usize) {
    let w = Weight::new(dtype, n, k, seed, offset);
    let x = values(k, seed + 1);
    let mut y = vec![f32::NAN; n];
    matvec_on(isa, &w.view(), &x, &mut y);
    let want = reference::matvec(&w.view(), &x);
    let tol: Vec<f32> = abs_dot(&w.view(), &x)
        .iter()
        .map(|&s| sum_tol(k, s))
        .collect();
    assert_close(&format!("matvec {isa} {dtype} {n}x{k}"), &y, &want, &tol);
}

fn check_matmul(isa: Isa, dtype: DType, m: usize, n: usize, k: usize, seed: u64) {
    check_matmul_at(isa, dtype, m, n, k, seed, 1);
}

fn check_matmul_at(isa: Isa, dtype: DType, m: usize, n: usize, k: usize, seed: u64, offset: usize) {
    let w = Weight::new(dtype, n, k, seed, offset);
    let x = values(m * k, seed + 1);
    let mut y = vec![f32::NAN; m * n];
    matmul_on(isa, &w.view(), &x, m, &mut y);
    let want = reference::matmul(&w.view(), &x, m);
    let tol: Vec<f32> = x
        .chunks_exact(k)
        .flat_map(|xr| abs_dot(&w.view(), xr))
        .map(|s| sum_tol(k, s))
        .collect();
    assert_close(
        &format!("matmul {isa} {dtype} {m}x{n}x{k}"),
        &y,
        &want,
        &tol,
    );
}

#[test]
fn matvec_odd_shapes() {
    for isa in isas() {
        for dtype in DType::ALL {
            for n in [1, 3, 4, 5, 17] {
                for k in [1, 7, 15, 16, 17, 33, 100, 257] {
                    check_matvec(isa, dtype, n, k, (n * 1000 + k) as u64, 1);
                }
            }
        }
    }
}

/// Large enough to be split over the worker pool, with a row count that leaves partial chunks.
#[test]
fn matvec_parallel() {
    for isa in isas() {
        for dtype in DType::ALL {
            check_matvec(isa, dtype, 301, 1003, 7, 3);
        }
    }
}

#[test]
fn matvec_empty() {
    for isa in isas() {
        let w = Weight::new(DType::BF16, 5, 0, 1, 0);
        let mut y = vec![f32::NAN; 5];
        matvec_on(isa, &w.view(), &[], &mut y);
        assert_eq!(y, [0.0; 5], "{isa}: a product over K = 0 is zero");
    }
}

#[test]
#[should_panic(expected = "matvec job 0: weight shape")]
fn matvec_rejects_wrong_shape() {
    let w = Weight::new(DType::F32, 4, 8, 1, 0);
    matvec_on(Isa::Scalar, &w.view(), &[0.0; 7], &mut [0.0; 4]);
}

/// Jobs of different dtypes and shapes in one call, small (on the calling thread) and large
/// (shared over the pool), each equal to its own matvec.
#[test]
fn matvec_many_matches_single_products() {
    for isa in isas() {
        for scale in [1, 200] {
            let shapes = [(3 * scale, 50), (17 * scale, 33), (scale, 1000), (0, 10)];
            let weights: Vec<Weight> = shapes
                .iter()
                .enumerate()
                .map(|(i, &(n, k))| Weight::new(DType::ALL[i % 3], n, k, i as u64, i % 2))
                .collect();
            let xs: Vec<Vec<f32>> = shapes.iter().map(|&(_, k)| values(k, k as u64)).collect();
            let mut ys: Vec<Vec<f32>> = shapes.iter().map(|&(n, _)| vec![f32::NAN; n]).collect();
            let views: Vec<_> = weights.iter().map(|w| w.view()).collect();
            let mut jobs: Vec<MatvecJob> = views
                .iter()
                .zip(&xs)
                .zip(ys.iter_mut())
                .map(|((w, x), y)| MatvecJob { w: *w, x, y })
                .collect();
            matvec_many_on(isa, &mut jobs);
            for (i, (w, (x, y))) in views.iter().zip(xs.iter().zip(&ys)).enumerate() {
                let mut want = vec![0.0; y.len()];
                matvec_on(isa, w, x, &mut want);
                assert_eq!(y, &want, "{isa} job {i} of scale {scale}");
            }
        }
    }
}

#[test]
#[should_panic(expected = "matvec job 1: weight shape")]
fn matvec_many_names_the_bad_job() {
    let w = Weight::new(DType::F32, 4, 8, 1, 0);
    let (x, mut y0, mut y1) = ([0.0; 8], [0.0; 4], [0.0; 3]);
    let mut jobs = [
        MatvecJob {
            w: w.view(),
            x: &x,
            y: &mut y0,
        },
        MatvecJob {
            w: w.view(),
            x: &x,
            y: &mut y1,
        },
    ];
    matvec_many_on(Isa::Scalar, &mut jobs);
}

#[test]
fn matmul_shapes() {
    for isa in isas() {
        for dtype in DType::ALL {
            // Several blocks of weight rows (a partial last one), every register-tile remainder.
            check_matmul(isa, dtype, 37, 70, 300, 11);
            check_matmul(isa, dtype, 5, 9, 17, 12);
            check_matmul(isa, dtype, 1, 9, 17, 13);
            // Columns over several panels of the K blocking, the last one partial.
            check_matmul(isa, dtype, 7, 9, 2100, 14);
        }
    }
}

/// Batched decode's row counts on both sides of where matmul changes method (2 rows for scalar
/// code; 8 and 16 for f32 weights on AVX2 and AVX-512; 32 for f16/bf16), with partial register
/// tiles of x rows and weight rows and partial vectors.
#[test]
fn matmul_decode_rows() {
    for isa in isas() {
        for dtype in DType::ALL {
            for m in [2, 3, 5, 8, 9, 16, 17, 31, 32, 33] {
                check_matmul(isa, dtype, m, 7, 45, m as u64);
            }
        }
    }
}

/// A few rows of x against a weight large enough to be split over the worker pool, in chunks of
/// weight rows whose outputs are columns of every row of y; the last chunk partial.
#[test]
fn matmul_decode_rows_parallel() {
    for isa in isas() {
        for dtype in DType::ALL {
            for m in [2, 4, 7] {
                check_matmul_at(isa, dtype, m, 301, 1003, 21, 3);
            }
        }
    }
}

/// Products of 0 to 20 rows (on both sides of where matmul changes method on every path) of
/// every dtype and odd shapes in one call, small (on the calling thread) and large (shared over
/// the pool): each bit for bit equal to its own matmul.
#[test]
fn matmul_many_matches_single_products() {
    for isa in isas() {
        for scale in [1, 60] {
            let ms: Vec<usize> = (0..=20).rev().collect();
            let shapes: Vec<(usize, usize)> = ms
                .iter()
                .map(|&m| ((2 * m + 3) * scale + m % 4, [45, 17, 130, 1, 33][m % 5]))
                .collect();
            let weights: Vec<Weight> = shapes
                .iter()
                .enumerate()
                .map(|(i, &(n, k))| Weight::new(DType::ALL[i % 3], n, k, i as u64, i % 4))
                .collect();
            let xs: Vec<Vec<f32>> = ms
                .iter()
                .zip(&shapes)
                .map(|(&m, &(_, k))| values(m * k, (m * k) as u64))
                .collect();
            let mut ys: Vec<Vec<f32>> = ms
                .iter()
                .zip(&shapes)
                .map(|(&m, &(n, _))| vec![f32::NAN; m * n])
                .collect();
            let views: Vec<_> = weights.iter().map(|w| w.view()).collect();
            let mut jobs: Vec<MatmulJob> = views
                .iter()
                .zip(&ms)
                .zip(&xs)
                .zip(ys.iter_mut())
                .map(|(((w, &m), x), y)| MatmulJob { w: *w, x, m, y })
                .collect();
            matmul_many_on(isa, &mut jobs);
            for (i, ((w, &m), (x, y))) in views.iter().zip(&ms).zip(xs.iter().zip(&ys)).enumerate()
            {
                let mut want = vec![f32::NAN; y.len()];
                matmul_on(isa, w, x, m, &mut want);
                let (got, want): (Vec<u32>, Vec<u32>) = (
                    y.iter().map(|v| v.to_bits()).collect(),
                    want.iter().map(|v| v.to_bits()).collect(),
                );
                assert_eq!(
                    got,
                    want,
                    "{isa} job {i} ({m} rows, {}) of scale {scale}",
                    w.dtype()
                );
            }
        }
    }
}

#[test]
#[should_panic(expected = "matmul job 1: y length")]
fn matmul_many_names_the_bad_job() {
    let w = Weight::new(DType::F32, 4, 8, 1, 0);
    let (x, mut y0, mut y1) = ([0.0; 16], [0.0; 8], [0.0; 7]);
    let mut jobs = [
        MatmulJob {
            w: w.view(),
            x: &x,
            m: 2,
            y: &mut y0,
        },
        MatmulJob {
            w: w.view(),
            x: &x,
            m: 2,
            y: &mut y1,
        },
    ];
    matmul_many_on(Isa::Scalar, &mut jobs);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn matvec_matches_reference(
        n in 1usize..40, k in 1usize..300, d in 0usize..3, seed in any::<u64>(), offset in 0usize..4,
    ) {
        for isa in isas() {
            check_matvec(isa, DType::ALL[d], n, k, seed, offset);
        }
    }

    /// Batched decode: 1 to 16 rows of x, odd weight shapes (tails everywhere), unaligned
    /// weights.
    #[test]
    fn matmul_few_rows_matches_reference(
        m in 1usize..=16, half_n in 0usize..20, half_k in 0usize..150, d in 0usize..3,
        seed in any::<u64>(), offset in 0usize..4,
    ) {
        for isa in isas() {
            check_matmul_at(isa, DType::ALL[d], m, 2 * half_n + 1, 2 * half_k + 1, seed, offset);
        }
    }

    #[test]
    fn matmul_matches_reference(
        m in 1usize..12, n in 1usize..24, k in 1usize..120, d in 0usize..3, seed in any::<u64>(),
    ) {
        for isa in isas() {
            check_matmul(isa, DType::ALL[d], m, n, k, seed);
        }
    }
}
