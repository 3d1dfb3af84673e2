//! ggml's quantized block formats on the CPU, the base for reading GGUF weights: the formats
//! and their sizes ([`QuantFormat`]), dequantization bit-identical to ggml and gguf-py
//! ([`dequantize_row`]), quantization of weights to Q8_0 and Q4_K and of activations to Q8_0 and
//! Q8_K ([`quantize_row_q8_0`], [`quantize_row_q4_k`], [`quantize_row_q8_k`]), and dot products of
//! a quantized weight row with a quantized activation row on scalar, AVX2 and AVX-512 VNNI paths
//! ([`dot`]), and the same over many weight rows with an activation row quantized once
//! ([`dot_rows`], [`QuantizedRow`]), as decode uses them, and the matrix product of many weight
//! rows with several activation rows quantized once ([`gemm`], [`QuantizedRows`]), register-tiled
//! on AVX2 and AVX-512 VNNI, as prefill and batched decode use it.
//!
//! Every function checks its lengths and returns a [`QuantError`] rather than panicking.

mod accumulate;
mod dequantize;
mod dot;
#[cfg(target_arch = "x86_64")]
mod dot_avx2;
#[cfg(target_arch = "x86_64")]
mod dot_avx512;
mod dot_scalar;
mod error;
mod format;
mod gemm;
#[cfg(target_arch = "x86_64")]
mod group;
mod kscale;
mod layout;
#[cfg(target_arch = "x86_64")]
mod packed;
mod q4_k;
mod q8_0;
mod q8_k;
mod rows;
#[cfg(target_arch = "x86_64")]
mod tile;

pub use dequantize::dequantize_row;
pub use dot::{dot, Activations};
pub use error::QuantError;
pub use format::QuantFormat;
pub use gemm::{gemm, QuantizedRows};
pub use q4_k::quantize_row_q4_k;
pub use q8_0::quantize_row_q8_0;
pub use q8_k::{quantize_row_q8_k, BlockQ8K};
pub use rows::{dot_rows, QuantizedRow};
