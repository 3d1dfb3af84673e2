//! The matrix kernels over quantized weights: every output is the quantized dot product of its
//! weight row with its activation row on the same instruction set for one activation row, and the
//! tiled product's for several (bit for bit, whether the rows run on one thread or many;
//! `quant_kernels` bounds how far the paths and the two products are from each other), close
//! to the product of the dequantized weights, and NaN where an activation row cannot be
//! quantized.

use shardline_tensor::kernels::{embedding, matmul_many_on, matvec_on, MatmulJob};
use shardline_tensor::quant::{dot, gemm, QuantFormat, QuantizedRow, QuantizedRows};
use shardline_tensor::{DType, Isa, Tensor};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| rng.f32() * 2.0 - 1.0).collect()
}

/// The outputs as the quantized kernels define them on `isa`: each computed on its own with the
/// dot product for one activation row, the tiled product of all the rows at once for several.
fn expected(isa: Isa, w: &Tensor, x: &[f32], m: usize) -> Vec<f32> {
    let DType::Quant(q) = w.dtype() else {
        unreachable!()
    };
    let (n, k) = (w.shape().dims()[0], w.shape().dims()[1]);
    let mut y = vec![0f32; m * n];
    if m > 1 {
        let acts = QuantizedRows::for_weights(q, m, x).unwrap();
        gemm(isa, q, w.bytes(), &acts, &mut y).unwrap();
        return y;
    }
    let row_bytes = w.dtype().row_bytes(k).unwrap();
    let act = QuantizedRow::for_weights(q, x).unwrap();
    for (j, y) in y.iter_mut().enumerate() {
        let row = &w.bytes()[j * row_bytes..(j + 1) * row_bytes];
        *y = dot(isa, q, row, act.activations()).unwrap();
    }
    y
}

fn supported() -> impl Iterator<Item = Isa> {
    Isa::ALL.into_iter().filter(|i| i.is_supported())
}

#[test]
fn quantized_products_equal_the_dot_products() {
    for format in [QuantFormat::Q8_0, QuantFormat::Q4K] {
        // 512 x 1024 is past the size below which products run on one thread.
        for (n, k) in [(24, 256), (512, 1024)] {
            let w = Tensor::from_f32(DType::Quant(format), [n, k], &values(n * k, 1)).unwrap();
            for m in [1, 3, 6] {
                let x = values(m * k, 2);
                for isa in supported() {
                    let want = expected(isa, &w, &x, m);
                    let mut y = vec![0f32; m * n];
                    matmul_many_on(
                        isa,
                        &mut [MatmulJob {
                            w: w.view(),
                            x: &x,
                            m,
                            y: &mut y,
                        }],
                    );
                    assert_eq!(y, want, "{format:?} {n}x{k} m={m} {isa}");
                }
            }
        }
    }
}

#[test]
fn quantized_products_are_close_to_the_dequantized_product() {
    let (n, k) = (64, 512);
    for format in [QuantFormat::Q8_0, QuantFormat::Q4K] {
        let w = Tensor::from_f32(DType::Quant(format), [n, k], &values(n * k, 3)).unwrap();
        let dense = Tensor::from_f32(DType::F32, [n, k], &w.to_f32_vec()).unwrap();
        let x = values(k, 4);
        let (mut yq, mut yf) = (vec![0f32; n], vec![0f32; n]);
        matvec_on(Isa::active(), &w.view(), &x, &mut yq);
        matvec_on(Isa::active(), &dense.view(), &x, &mut yf);
        // The activations are rounded to 8 bits per block: at most half a step of each block's
        // scale (max|x| / 127) per element, times |w|, summed.
        for j in 0..n {
            let wrow = &dense.to_f32_vec()[j * k..(j + 1) * k];
            let bound: f32 = wrow.iter().map(|w| w.abs()).sum::<f32>() * 0.5 / 127.0 + 1e-4;
            assert!(
                (yq[j] - yf[j]).abs() <= bound,
                "{format:?} row {j}: {} vs {} (bound {bound})",
                yq[j],
                yf[j]
            );
        }
    }
}

#[test]
fn a_row_that_cannot_be_quantized_gives_nan() {
    let (n, k) = (8, 256);
    let w = Tensor::from_f32(DType::Quant(QuantFormat::Q8_0), [n, k], &values(n * k, 5)).unwrap();
    let mut x = values(2 * k, 6);
    x[k + 3] = f32::INFINITY;
    let mut y = vec![0f32; 2 * n];
    matmul_many_on(
        Isa::active(),
        &mut [MatmulJob {
            w: w.view(),
            x: &x,
            m: 2,
            y: &mut y,
        }],
    );
    assert!(y[..n].iter().all(|v| v.is_finite()));
    assert!(y[n..].iter().all(|v| v.is_nan()));
}

#[test]
fn quantized_embedding_rows_are_dequantized() {
    let (vocab, hidden) = (10, 512);
    let table = Tensor::from_f32(
        DType::Quant(QuantFormat::Q4K),
        [vocab, hidden],
        &values(vocab * hidden, 7),
    )
    .unwrap();
    let all = table.to_f32_vec();
    let mut row = vec![0f32; hidden];
    embedding(&table.view(), 7, &mut row);
    assert_eq!(row, all[7 * hidden..8 * hidden]);
}

#[test]
fn a_block_format_needs_rows_of_whole_blocks() {
    let err = Tensor::zeros(DType::Quant(QuantFormat::Q4K), [4, 100]).unwrap_err();
    assert!(err.to_string().contains("whole blocks of 256"), "{err}");
    assert_eq!(
        "q4_k".parse::<DType>().unwrap(),
        DType::Quant(QuantFormat::Q4K)
    );
}
