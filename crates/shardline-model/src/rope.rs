//! Rope inverse frequencies for a [`ModelSpec`]: the base frequencies, then the scaling the config
//! asks for (`linear`, `llama3`), then rounded to `spec.rope_freq_dtype`.

use serde_json::Value;
use shardline_tensor::kernels::Rope;
use shardline_tensor::DType;

use crate::config::ModelSpec;

/// A config's `rope_type` and its parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// The base frequencies unchanged (`default`).
    None,
    /// Positions divided by `factor` (every frequency divided by it).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 {
        /// The divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original_max_positions / low_freq_factor` are divided.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_positions / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was trained at (`original_max_position_embeddings`).
        original_max_positions: f64,
    },
}

impl RopeScaling {
    /// Reads a `rope_parameters` / `rope_scaling` object; `Err` holds the reason.
    pub fn from_json(rp: &Value) -> Result<RopeScaling, String> {
        let kind = rp
            .get("rope_type")
            .or_else(|| rp.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |key: &str| -> Result<f64, String> {
            rp.get(key)
                .and_then(Value::as_f64)
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| format!("rope_type `{kind}` needs a positive number `{key}`"))
        };
        match kind {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear {
                factor: num("factor")?,
            }),
            "llama3" => {
                let s = RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_positions: num("original_max_position_embeddings")?,
                };
                match s {
                    RopeScaling::Llama3 {
                        low_freq_factor: lo,
                        high_freq_factor: hi,
                        ..
                    } if hi <= lo => Err(format!(
                        "rope high_freq_factor ({hi}) must exceed low_freq_factor ({lo})"
                    )),
                    s => Ok(s),
                }
            }
            other => Err(format!(
                "rope_type `{other}` is not supported (default, linear, llama3)"
            )),
        }
    }

    fn apply(&self, f: f64) -> f64 {
        match *self {
            RopeScaling::None => f,
            RopeScaling::Linear { factor } => f / factor,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen < original_max_positions / high_freq_factor {
                    f
                } else if wavelen > original_max_positions / low_freq_factor {
                    f / factor
                } else {
                    let smooth = (original_max_positions / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            }
        }
    }
}

/// The inverse frequencies `spec`'s attention rotates by.
pub fn inv_freq(spec: &ModelSpec) -> Vec<f32> {
    Rope::inv_freq(spec.head_dim, spec.rope_theta)
        .into_iter()
        .map(|f| {
            let f = spec.rope_scaling.apply(f as f64) as f32;
            match spec.rope_freq_dtype {
                DType::BF16 => half::bf16::from_f32(f).to_f32(),
                DType::F16 => half::f16::from_f32(f).to_f32(),
                DType::F32 | DType::Quant(_) => f,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn llama3_keeps_high_divides_low_and_blends_between() {
        let s = RopeScaling::from_json(&json!({
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
        }))
        .unwrap();
        // Wavelength 2π < 2048: kept. Wavelength 2π·10^5 > 8192: divided by 8.
        assert_eq!(s.apply(1.0), 1.0);
        assert!((s.apply(1e-5) - 1e-5 / 8.0).abs() < 1e-15);
        // Wavelength 4096 sits between 2048 and 8192: smooth = (8192/4096 - 1)/3 = 1/3.
        let f = 2.0 * std::f64::consts::PI / 4096.0;
        let expected = (2.0 / 3.0) * f / 8.0 + (1.0 / 3.0) * f;
        assert!((s.apply(f) - expected).abs() < 1e-15);
    }

    #[test]
    fn linear_and_unsupported() {
        let s = RopeScaling::from_json(&json!({"type": "linear", "factor": 2.0})).unwrap();
        assert_eq!(s.apply(0.5), 0.25);
        let e = RopeScaling::from_json(&json!({"rope_type": "yarn", "factor": 4.0})).unwrap_err();
        assert!(e.contains("yarn"), "{e}");
        let e = RopeScaling::from_json(&json!({"rope_type": "llama3", "factor": 8.0})).unwrap_err();
        assert!(e.contains("low_freq_factor"), "{e}");
    }
}
