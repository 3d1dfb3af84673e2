//! FP8 checkpoints as published (`fixtures/qwen3-moe-tiny-fp8`, made by
//! `scripts/make_fp8_fixture.py`): e4m3 projections with 128x128 block scales, bf16 for the rest.
//!
//! The reference is the f32 model the checkpoint stands for: the exact f32 products of each fp8
//! value and its scale (`dequantized.safetensors`, computed by the script's numpy decoder) and
//! the checkpoint's bf16 tensors widened to f32, run through this repo's f32 path. The loader
//! rounds each dequantized weight to bf16 once, so the FP8 model differs from the reference by
//! that rounding alone ([`tolerance`] derives the logits' share of it).

use crate::common;
use crate::common::checkpoint::{edit_config, edit_weights};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::bf16;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use shardline_model::fp8::{dequantize, Fp8Blocks};
use shardline_model::load::{load_model, load_model_for};
use shardline_model::reference::tolerance as dtype_tolerance;
use shardline_model::safetensors_dir::SafetensorsDir;
use shardline_model::weights::{TensorSource, Weight};
use shardline_model::{
    load_dir, Backend, CpuBackend, Engine, Logits, ModelError, ModelSpec, Plan, Reduce, Reference,
    Result, SingleRank,
};
use shardline_tensor::{DType, Shape, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn fixture() -> PathBuf {
    fixtures().join("qwen3-moe-tiny-fp8")
}

/// The f32 tensors of `dequantized.safetensors`: name -> (shape, values).
fn exact_weights() -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(fixture().join("dequantized.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype(), Dtype::F32, "{name}");
            let values = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, (t.shape().to_vec(), values))
        })
        .collect()
}

/// The reference's weights, all f32: the exact dequantized matrices, and the checkpoint's other
/// (bf16) tensors widened.
struct Exact {
    fp8: SafetensorsDir,
    exact: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl TensorSource for Exact {
    fn get(&self, name: &str, expected: &[usize]) -> Result<Weight> {
        let (shape, values) = match self.exact.get(name) {
            Some((shape, values)) => (shape.clone(), values.clone()),
            None => {
                let w = self.fp8.get(name, expected)?;
                assert_eq!(w.dtype(), DType::BF16, "{name}");
                (w.view().shape().dims().to_vec(), w.to_f32_vec())
            }
        };
        assert_eq!(shape, expected, "{name}");
        Ok(Weight::Owned(
            Tensor::from_f32(DType::F32, Shape::new(shape), &values).unwrap(),
        ))
    }

    fn contains(&self, name: &str) -> bool {
        self.fp8.contains(name)
    }
}

fn spec() -> ModelSpec {
    ModelSpec::from_file(&fixture().join("config.json")).unwrap()
}

/// The largest logit difference the FP8 model may show against the f32 reference.
///
/// Rounding a weight to bf16 (8 significant bits, `u = 2^-8`) errs by up to `u` of it, with a
/// standard deviation of about `u / sqrt(3)` taken as uniform. A product with such a matrix gains
/// an error of deviation `u / sqrt(3)` of its output's own scale (the errors are independent of
/// the inputs); each of a layer's two residual updates passes through two rounded matrices in a
/// row (v then o, gate/up then down), so over `L` layers the residual stream's relative error
/// is `u sqrt(4 L / 3)`. lm_head (bf16 in both models, not rounded again) carries it into the
/// logits at their scale, `logit_rms`; the largest of the few thousand logits compared lies
/// about 4 deviations out, and a factor 2 covers the later layers' gain:
/// `8 u sqrt(4 L / 3) logit_rms`, plus what a bf16 model may differ by from its own f32
/// reference ([`dtype_tolerance`]).
fn tolerance(layers: usize, logit_rms: f32) -> f32 {
    let u = 2f32.powi(-8);
    8.0 * u * (4.0 * layers as f32 / 3.0).sqrt() * logit_rms + dtype_tolerance(DType::BF16)
}

fn argmax(row: &[f32]) -> u32 {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
        .unwrap() as u32
}

/// The prompt of the source fixture's reference, and its greedy continuation by the reference
/// model: one row of logits per prompt position, then one per decode step.
fn reference() -> Reference {
    let spec = spec();
    let prompt = Reference::from_file(
        &fixtures().join("qwen3-moe-tiny/reference.json"),
        spec.vocab,
    )
    .unwrap()
    .prompt_ids;
    let src = Exact {
        fp8: SafetensorsDir::open(&fixture()).unwrap(),
        exact: exact_weights(),
    };
    let weights = load_model(&spec, &src).unwrap();
    let mut engine = Engine::new(CpuBackend::new(spec.clone(), weights, 0), SingleRank);
    assert_eq!(engine.backend.weight_dtype(), DType::F32);
    let steps = 7;
    engine.start(prompt.len() + steps).unwrap();
    let all = engine.forward(&prompt, Logits::All).unwrap();
    let prefill_logits: Vec<Vec<f32>> = all.chunks_exact(spec.vocab).map(<[f32]>::to_vec).collect();
    let mut greedy_ids = vec![argmax(prefill_logits.last().unwrap())];
    let mut decode_logits = Vec::new();
    for _ in 0..steps {
        let row = engine
            .forward(&[*greedy_ids.last().unwrap()], Logits::Last)
            .unwrap();
        greedy_ids.push(argmax(&row));
        decode_logits.push(row);
    }
    Reference {
        prompt_ids: prompt,
        prefill_logits,
        greedy_ids,
        decode_logits,
    }
}

/// The least by which a greedy choice of `reference` beats the runner-up.
fn greedy_margin(reference: &Reference) -> f32 {
    reference.prefill_logits[reference.prompt_ids.len() - 1..]
        .iter()
        .chain(&reference.decode_logits)
        .map(|row| {
            let best = argmax(row) as usize;
            let second = (0..row.len())
                .filter(|&i| i != best)
                .map(|i| row[i])
                .fold(f32::MIN, f32::max);
            row[best] - second
        })
        .fold(f32::MAX, f32::min)
}

/// Runs `reference`'s prompt and greedy tokens through `engine`; the largest logit difference,
/// and the greedy steps whose choice differs, each with the reference's margin between its own
/// choice and the engine's.
fn compare<B: Backend, R: Reduce>(
    engine: &mut Engine<B, R>,
    reference: &Reference,
) -> (f32, Vec<f32>) {
    let vocab = reference.prefill_logits[0].len();
    engine
        .start(reference.prompt_ids.len() + reference.decode_logits.len())
        .unwrap();
    let prefill = engine.forward(&reference.prompt_ids, Logits::All).unwrap();
    let mut rows: Vec<Vec<f32>> = prefill.chunks_exact(vocab).map(<[f32]>::to_vec).collect();
    for &id in &reference.greedy_ids[..reference.decode_logits.len()] {
        rows.push(engine.forward(&[id], Logits::Last).unwrap());
    }
    let theirs: Vec<&Vec<f32>> = reference
        .prefill_logits
        .iter()
        .chain(&reference.decode_logits)
        .collect();
    let diff = rows
        .iter()
        .zip(&theirs)
        .flat_map(|(a, b)| a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    // The rows that choose a greedy token: the prompt's last, then each decode step's.
    let first = reference.prompt_ids.len() - 1;
    let flips = (first..rows.len())
        .filter_map(|i| {
            let (ours, want) = (argmax(&rows[i]), argmax(theirs[i]));
            (ours != want).then(|| theirs[i][want as usize] - theirs[i][ours as usize])
        })
        .collect();
    (diff, flips)
}

/// Each matrix the loader hands out is the exact f32 product of the script's decoder rounded
/// once to bf16, bit for bit; and the dequantizer, asked for f32, gives those products exactly
/// (one f32 multiplication of the e4m3 value by its scale, as numpy computes it).
#[test]
fn loaded_weights_are_the_exact_products_rounded_to_bf16() {
    let files = SafetensorsDir::open(&fixture()).unwrap();
    let exact = exact_weights();
    let raw = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let raw = SafeTensors::deserialize(&raw).unwrap();
    let blocks = Fp8Blocks {
        rows: 128,
        cols: 128,
    };
    let mut scale_dtypes = Vec::new();
    for (name, (shape, values)) in &exact {
        let w = files.get(name, shape).unwrap();
        assert_eq!(w.dtype(), DType::BF16, "{name}");
        let want: Vec<u8> = values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect();
        assert!(
            w.view().bytes() == want,
            "{name}: not the products rounded to bf16"
        );

        let (codes, scales) = (
            raw.tensor(name).unwrap(),
            raw.tensor(&format!("{name}_scale_inv")).unwrap(),
        );
        assert_eq!(codes.dtype(), Dtype::F8_E4M3, "{name}");
        let scale_dtype = match scales.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::BF16 => DType::BF16,
            d => panic!("{name}: scales of dtype {d:?}"),
        };
        scale_dtypes.push(scale_dtype);
        let scale_shape = Shape::new(scales.shape().to_vec());
        let scales = shardline_tensor::TensorView::new(scale_dtype, &scale_shape, scales.data())
            .unwrap()
            .to_f32_vec();
        let t = dequantize(
            "model.safetensors",
            name,
            codes.data(),
            [shape[0], shape[1]],
            &scales,
            blocks,
            DType::F32,
        )
        .unwrap();
        let got = t.to_f32_vec();
        assert!(
            got.iter()
                .zip(values)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name}: not the decoder's f32 products"
        );
    }
    // Every projection of the two layers; scales stored both ways.
    assert_eq!(exact.len(), 2 * (4 + 8 * 3));
    assert!(scale_dtypes.contains(&DType::F32) && scale_dtypes.contains(&DType::BF16));
}

/// The FP8 model, loaded as `shardline run --model` loads it, against the f32 model of its exact
/// weights: prefill and decode logits within [`tolerance`] (5.7e-2 here; 2.0e-2 measured), the
/// same greedy tokens (the reference's picks win by at least 0.107, five times the measured
/// difference).
#[test]
fn logits_match_the_f32_model_of_the_exact_weights() {
    let reference = reference();
    let spec = spec();
    let tol = tolerance(spec.n_layers, reference.logit_rms());
    let mut engine = load_dir(&fixture()).unwrap();
    assert_eq!(engine.backend.weight_dtype(), DType::BF16);
    let (diff, flips) = compare(&mut engine, &reference);
    eprintln!(
        "fp8: max |logit diff| {diff:.3e}, tolerance {tol:.3e}, logit rms {:.3e}, smallest \
         greedy margin {:.3e}",
        reference.logit_rms(),
        greedy_margin(&reference)
    );
    assert!(diff <= tol, "{diff} > {tol}");
    assert!(flips.is_empty(), "greedy choices differ, margins {flips:?}");
}

/// Split over ranks (tensor and expert parallel), each rank slicing the dequantized weights:
/// the same logits as on one rank, within the same tolerance.
#[test]
fn split_over_ranks_matches_too() {
    let reference = reference();
    let spec = spec();
    let tol = tolerance(spec.n_layers, reference.logit_rms());
    for (world, ep) in [(2, 1), (4, 1), (2, 2), (4, 2)] {
        let results = common::on_threads(world, |reduce| {
            let plan = Plan::new(world, ep, reduce.rank).unwrap();
            let files = SafetensorsDir::open(&fixture()).unwrap();
            let weights = load_model_for(&spec, &files, &plan).unwrap();
            let mut engine = Engine::new(CpuBackend::new(spec.clone(), weights, 0), reduce);
            compare(&mut engine, &reference)
        });
        for (rank, (diff, flips)) in results.into_iter().enumerate() {
            eprintln!("fp8 world {world} ep {ep} rank {rank}: max |logit diff| {diff:.3e}");
            assert!(
                diff <= tol && flips.is_empty(),
                "world {world} ep {ep} rank {rank}: {diff} (tolerance {tol}), flips {flips:?}"
            );
        }
    }
}

// Bad input: a copy of the fixture with one thing broken fails to load, naming the file and the
// tensor or setting.

fn copy_fixture() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture().join(name), tmp.path().join(name)).unwrap();
    }
    tmp
}

fn load_err(dir: &Path) -> String {
    match load_dir(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(err: &str, needles: &[&str]) {
    for n in needles {
        assert!(err.contains(n), "error `{err}` does not mention `{n}`");
    }
}

const Q: &str = "model.layers.1.self_attn.q_proj.weight";
const Q_SCALE: &str = "model.layers.1.self_attn.q_proj.weight_scale_inv";

#[test]
fn missing_scales() {
    let dir = copy_fixture();
    edit_weights(dir.path(), |e| e.0 != Q_SCALE);
    assert_mentions(
        &load_err(dir.path()),
        &[Q, Q_SCALE, "model.safetensors", "F8_E4M3"],
    );
}

#[test]
fn scales_of_the_wrong_shape() {
    let dir = copy_fixture();
    edit_weights(dir.path(), |e| {
        if e.0 == Q_SCALE {
            e.2 = vec![2, 1];
            e.3 = e.3.repeat(2);
        }
        true
    });
    assert_mentions(
        &load_err(dir.path()),
        &[Q_SCALE, "model.safetensors", "[2, 1]", "[1, 1]"],
    );
}

#[test]
fn nan_scales_and_nan_codes() {
    let dir = copy_fixture();
    edit_weights(dir.path(), |e| {
        if e.0 == Q_SCALE {
            // Layer 1's scales are bf16.
            assert_eq!(e.1, Dtype::BF16);
            e.3 = bf16::NAN.to_le_bytes().to_vec();
        }
        true
    });
    assert_mentions(
        &load_err(dir.path()),
        &[Q, Q_SCALE, "NaN", "model.safetensors"],
    );
    let dir = copy_fixture();
    edit_weights(dir.path(), |e| {
        if e.0 == Q {
            e.3[70] = 0xFF;
        }
        true
    });
    assert_mentions(&load_err(dir.path()), &[Q, "NaN", "[1, 6]"]);
}

#[test]
fn fp8_weights_of_the_wrong_shape() {
    let dir = copy_fixture();
    edit_weights(dir.path(), |e| {
        if e.0 == Q {
            e.2[0] -= 1;
            e.3.truncate(e.2[0] * e.2[1]);
        }
        true
    });
    assert_mentions(&load_err(dir.path()), &[Q, "model.safetensors", "shape"]);
}

#[test]
fn unknown_fmt_block_size_or_method() {
    for (key, value, says) in [
        ("fmt", serde_json::json!("e5m2"), "e5m2"),
        (
            "weight_block_size",
            serde_json::json!([128]),
            "weight_block_size",
        ),
        (
            "weight_block_size",
            serde_json::json!([0, 128]),
            "weight_block_size",
        ),
        ("quant_method", serde_json::json!("gptq"), "gptq"),
    ] {
        let dir = copy_fixture();
        edit_config(dir.path(), |c| {
            c["quantization_config"][key] = value.clone();
        });
        assert_mentions(
            &load_err(dir.path()),
            &["config.json", "quantization_config", says],
        );
    }
}

#[test]
fn fp8_weights_without_a_quantization_config() {
    let dir = copy_fixture();
    edit_config(dir.path(), |c| {
        c.remove("quantization_config");
    });
    let err = load_dir(dir.path()).err().unwrap();
    assert!(matches!(err, ModelError::Quantized { .. }), "{err}");
    assert_mentions(
        &err.to_string(),
        &["model.safetensors", "F8_E4M3", "quantization_config"],
    );
}
