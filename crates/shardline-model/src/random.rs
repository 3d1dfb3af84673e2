//! [`RandomWeights`]: deterministic random weights for any tensor name and shape, for the built-in
//! demo model and the decode benchmark presets (no download needed).
//!
//! Each tensor's values depend only on (seed, tensor name), so a rank that later loads only its
//! slice sees the same numbers as a single rank would.

use half::{bf16, f16};
use rayon::prelude::*;
use shardline_tensor::{pool, DType, Tensor};

use crate::error::{ModelError, Result};
use crate::weights::{TensorSource, Weight};

/// Elements generated per independently seeded chunk (lets generation run in parallel).
const CHUNK: usize = 1 << 16;

/// Random weights of one dtype: matrices uniform with variance `1/cols` (so activations keep
/// unit scale through the layers), vectors (norm weights) near 1.
pub struct RandomWeights {
    seed: u64,
    dtype: DType,
}

impl RandomWeights {
    /// Weights of `dtype` drawn from `seed` (each tensor from `seed` and its name).
    pub fn new(seed: u64, dtype: DType) -> RandomWeights {
        RandomWeights { seed, dtype }
    }
}

/// FNV-1a, to turn a tensor name into a seed (stable across runs and platforms).
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl TensorSource for RandomWeights {
    fn get(&self, name: &str, expected: &[usize]) -> Result<Weight> {
        if let DType::Quant(format) = self.dtype {
            // The same values as f32 weights, quantized as a quantized model's would be.
            let dense = RandomWeights::new(self.seed, DType::F32).get(name, expected)?;
            return crate::quantize::quantized(name, dense, format);
        }
        let mut t = Tensor::zeros(self.dtype, expected)
            .map_err(|e| ModelError::Invalid(format!("random tensor `{name}`: {e}")))?;
        let (center, half_width) = match expected {
            [_, cols] => (0.0, (3.0 / (*cols).max(1) as f32).sqrt()),
            _ => (1.0, 0.05),
        };
        let base = self.seed ^ name_hash(name);
        let es = self.dtype.size_in_bytes();
        let dtype = self.dtype;
        pool::install(|| {
            t.bytes_mut()
                .par_chunks_mut(CHUNK * es)
                .enumerate()
                .for_each(|(ci, chunk)| {
                    let mut rng = fastrand::Rng::with_seed(base.wrapping_add(ci as u64));
                    for el in chunk.chunks_exact_mut(es) {
                        let v = center + (rng.f32() * 2.0 - 1.0) * half_width;
                        match dtype {
                            DType::F32 => el.copy_from_slice(&v.to_le_bytes()),
                            DType::F16 => el.copy_from_slice(&f16::from_f32(v).to_le_bytes()),
                            DType::BF16 => el.copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
                            DType::Quant(_) => unreachable!("made from f32 weights above"),
                        }
                    }
                })
        });
        Ok(Weight::Owned(t))
    }

    fn contains(&self, _name: &str) -> bool {
        true
    }
}
