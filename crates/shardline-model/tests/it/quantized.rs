//! Quantized weights end to end on the CPU: a model whose matrices are quantized (Q8_0 on the
//! repo fixtures; Q8_0 and Q4_K on a mixtral-mini-shaped layer, whose rows are whole K-quant
//! blocks) gives the logits of the same model with those weights dequantized to f32, within the
//! tolerance of rounding the activations to 8 bits per block, and the same greedy tokens.
//!
//! The tolerance: Q8_0 and Q8_K activations carry an error of up to half a step, 1/254 of each
//! block's largest value, per element: about 0.6% of a dot product where a block's largest value
//! is three times its typical one, a share that adds up over the layers. Measured on these
//! models (`cargo test -- --nocapture` prints it), the largest logit difference is 1.4-2.4% of
//! the largest logit; [`RELATIVE`] bounds it at 4%.

use std::path::PathBuf;

use shardline_model::load::load_model;
use shardline_model::presets::preset;
use shardline_model::quantize::Quantizing;
use shardline_model::random::RandomWeights;
use shardline_model::safetensors_dir::SafetensorsDir;
use shardline_model::weights::{TensorSource, Weight};
use shardline_model::{CpuBackend, Engine, Logits, ModelSpec, Result, SingleRank};
use shardline_tensor::quant::QuantFormat;
use shardline_tensor::{DType, Tensor};

/// The largest logit difference allowed, as a share of the largest logit.
const RELATIVE: f32 = 0.04;

/// `inner`'s tensors widened back to f32: the values a quantized model computes with, stored as
/// floats.
struct Dequantized<S>(S);

impl<S: TensorSource> TensorSource for Dequantized<S> {
    fn get(&self, name: &str, expected: &[usize]) -> Result<Weight> {
        let w = self.0.get(name, expected)?;
        let v = w.view();
        Ok(Weight::Owned(
            Tensor::from_f32(DType::F32, v.shape().clone(), &v.to_f32_vec()).unwrap(),
        ))
    }

    fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// Every position's logits of `spec` over the weights of `src` for `tokens`.
fn logits(spec: &ModelSpec, src: &dyn TensorSource, tokens: &[u32]) -> Vec<f32> {
    let weights = load_model(spec, src).unwrap();
    let mut engine = Engine::new(CpuBackend::new(spec.clone(), weights, 0), SingleRank);
    engine.start(tokens.len()).unwrap();
    engine.forward(tokens, Logits::All).unwrap()
}

/// Quantized against dequantized logits: the largest difference, and whether every position's
/// most likely token agrees.
fn compare(what: &str, spec: &ModelSpec, q: &dyn TensorSource, d: &dyn TensorSource) {
    let tokens: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % spec.vocab as u32).collect();
    let (lq, ld) = (logits(spec, q, &tokens), logits(spec, d, &tokens));
    let diff = lq
        .iter()
        .zip(&ld)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = ld.iter().map(|a| a.abs()).fold(0f32, f32::max);
    let rms = (ld.iter().map(|a| a * a).sum::<f32>() / ld.len() as f32).sqrt();
    eprintln!("{what}: max |logit diff| {diff:.3e}, max |logit| {scale:.3e}, rms {rms:.3e}, diff/max {:.3e}", diff / scale);
    assert!(
        diff <= RELATIVE * scale,
        "{what}: {diff} > {RELATIVE} x {scale}"
    );
    // The greedy choice agrees, except at a near tie: where it differs, the two tokens' exact
    // logits are closer than the quantized ones can be off.
    for (p, (rq, rd)) in lq
        .chunks_exact(spec.vocab)
        .zip(ld.chunks_exact(spec.vocab))
        .enumerate()
    {
        let best = |r: &[f32]| (0..r.len()).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap();
        let (bq, bd) = (best(rq), best(rd));
        assert!(
            bq == bd || rd[bd] - rd[bq] <= 2.0 * diff,
            "{what}: position {p} chose {bq} over {bd} ({} vs {})",
            rd[bq],
            rd[bd]
        );
    }
}

#[test]
fn quantized_fixtures_match_their_dequantized_weights() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    for name in [
        "llama-tiny",
        "mixtral-tiny",
        "qwen2-moe-tiny",
        "qwen3-moe-tiny",
    ] {
        let dir = fixtures.join(name);
        let spec = ModelSpec::from_file(&dir.join("config.json")).unwrap();
        let files = || SafetensorsDir::open(&dir).unwrap();
        let q = Quantizing::new(files(), QuantFormat::Q8_0);
        let d = Dequantized(Quantizing::new(files(), QuantFormat::Q8_0));
        compare(&format!("{name} q8_0"), &spec, &q, &d);
    }
}

#[test]
fn quantized_presets_match_their_dequantized_weights() {
    for format in [QuantFormat::Q8_0, QuantFormat::Q4K] {
        let dtype = DType::Quant(format);
        // mixtral-mini's layer (rows of whole K-quant blocks) under a smaller vocabulary.
        let mut spec = preset("mixtral-mini", 1, dtype).unwrap();
        spec.vocab = 2048;
        let q = RandomWeights::new(7, dtype);
        let d = Dequantized(RandomWeights::new(7, dtype));
        compare(&format!("mixtral-mini {format:?}"), &spec, &q, &d);
    }
}
