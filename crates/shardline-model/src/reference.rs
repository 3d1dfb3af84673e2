//! Checking the engine against reference logits computed by `transformers` (the
//! `reference.json` format of the fixtures' README): one prefill of `prompt_ids`, then one decode
//! step per entry of `decode_logits`, feeding `greedy_ids`.

use std::path::Path;

use serde::Deserialize;
use shardline_tensor::DType;

use crate::backend::{Backend, Reduce, SumDType};
use crate::engine::{Engine, Logits};
use crate::error::{ModelError, Result};
use crate::sampler::argmax;

/// A `reference.json`: the logits `transformers` computed for a prompt and its greedy
/// continuation.
#[derive(Debug, Deserialize)]
pub struct Reference {
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// One `[vocab]` row of logits per prompt position.
    pub prefill_logits: Vec<Vec<f32>>,
    /// The greedy choice after the prompt and after each decode step (one more than
    /// `decode_logits` has rows, or as many).
    pub greedy_ids: Vec<u32>,
    /// One `[vocab]` row of logits per decode step, step `i` having fed `greedy_ids[i]`.
    pub decode_logits: Vec<Vec<f32>>,
}

impl Reference {
    /// Reads and checks a reference file against a vocabulary of `vocab`.
    pub fn from_file(path: &Path, vocab: usize) -> Result<Reference> {
        let v = crate::files::read_json(path, 1 << 30)?;
        let r: Reference = serde_json::from_value(v)
            .map_err(|e| ModelError::config(path, format!("not a reference file: {e}")))?;
        let bad = |what: String| ModelError::config(path, what);
        if r.prompt_ids.is_empty() || r.prefill_logits.len() != r.prompt_ids.len() {
            return Err(bad(format!(
                "prefill_logits has {} rows for {} prompt_ids (must be equal and non-zero)",
                r.prefill_logits.len(),
                r.prompt_ids.len()
            )));
        }
        let steps = r.decode_logits.len();
        if r.greedy_ids.len() < steps || r.greedy_ids.len() > steps + 1 {
            return Err(bad(format!(
                "greedy_ids has {} entries for {steps} decode_logits rows (expected {steps} or {})",
                r.greedy_ids.len(),
                steps + 1
            )));
        }
        if let Some(row) = r
            .prefill_logits
            .iter()
            .chain(&r.decode_logits)
            .find(|row| row.len() != vocab)
        {
            return Err(bad(format!(
                "a logits row has {} entries, the model's vocab_size is {vocab}",
                row.len()
            )));
        }
        if r.logits().any(|v| !v.is_finite()) {
            return Err(bad("a logit is not a finite number".into()));
        }
        Ok(r)
    }

    /// Every logit, prefill rows then decode rows.
    fn logits(&self) -> impl Iterator<Item = f32> + '_ {
        self.prefill_logits
            .iter()
            .chain(&self.decode_logits)
            .flatten()
            .copied()
    }

    /// The root mean square of every logit (the scale [`sum_tolerance`] works from).
    pub fn logit_rms(&self) -> f32 {
        let (sum, n) = self.logits().fold((0f64, 0usize), |(s, n), v| {
            (s + f64::from(v).powi(2), n + 1)
        });
        (sum / n.max(1) as f64).sqrt() as f32
    }
}

/// The outcome of a verification.
#[derive(Clone, Debug)]
pub struct VerifyReport {
    /// The largest absolute logit difference over the prompt's positions.
    pub prefill_max_diff: f32,
    /// The prompt position with the largest difference.
    pub prefill_worst_position: usize,
    /// The largest absolute logit difference over the decode steps.
    pub decode_max_diff: f32,
    /// The decode step with the largest difference.
    pub decode_worst_step: usize,
    /// The largest difference that passes: the weights' dtype's ([`tolerance`]), plus what
    /// rounding the ranks' partial sums adds ([`sum_tolerance`]).
    pub tolerance: f32,
    /// The dtype of the engine's weights.
    pub weight_dtype: DType,
    /// The type the ranks' partial sums were rounded to between them (f32 on one rank, or where
    /// the device summed them).
    pub sum_dtype: SumDType,
    /// Greedy choices compared with the reference's `greedy_ids`.
    pub greedy_total: usize,
    /// How many of them agree.
    pub greedy_agree: usize,
}

impl VerifyReport {
    /// Whether both differences are within the tolerance and every greedy choice agrees.
    pub fn passed(&self) -> bool {
        self.prefill_max_diff <= self.tolerance
            && self.decode_max_diff <= self.tolerance
            && self.greedy_agree == self.greedy_total
    }
}

/// The logit tolerance of a model with quantized weights against a float reference, for logits
/// up to about 10 in magnitude (the fixtures'): the weights' rounding and the activations' (8 bits
/// per block) together, each a few tenths of a percent per product, add up to a few percent of
/// the largest logit over the layers.
pub const QUANTIZED_TOLERANCE: f32 = 0.3;

/// The absolute logit tolerance for weights of `dtype`.
pub fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 | DType::BF16 => 1e-3,
        // Activations are rounded to 8 bits per block before they meet quantized weights.
        DType::Quant(_) => QUANTIZED_TOLERANCE,
    }
}

/// What rounding the ranks' partial sums to `sums` adds to the logit tolerance, for a model of
/// `layers` layers whose reference logits have root mean square `logit_rms`; 0 for f32 sums.
///
/// Rounding `v` to `p` significant bits (8 for bf16, 11 for f16) errs by up to `u |v|`, `u =
/// 2^-p`; taken as uniform, its standard deviation is `u |v| / sqrt(3)`. An all-reduce rounds each
/// rank's part `p_r` and the sum `s`: with independent parts `sum p_r^2 ~ s^2`, so the residual
/// stream gains an error of deviation `u |s| sqrt(2 / 3)`. The layers' updates are of the residual
/// stream's own scale, so over the `2 layers` all-reduces its relative error is `u sqrt(4 layers /
/// 3)`; the final norm and lm_head carry a relative error of the hidden state into the logits
/// at the logits' own scale, `logit_rms`. The largest of the reference's few thousand logits
/// lies about 4 deviations out, and a factor 2 covers the gain of the later layers and the extra
/// roundings of a ring over more than two ranks: `8 u sqrt(4 layers / 3) logit_rms`. For the
/// fixtures that is 6.1e-2 (bf16, 3 layers) and 6.7e-3 (f16, 2 layers) where at most 2.4e-2 and
/// 4.2e-3 are measured (over TP 2 and 4, EP 2); both stay well under the 0.1 by which every greedy pick wins, and the greedy
/// picks are checked besides.
pub fn sum_tolerance(sums: SumDType, layers: usize, logit_rms: f32) -> f32 {
    let u = match sums {
        SumDType::F32 => return 0.0,
        SumDType::BF16 => 2f32.powi(-8),
        SumDType::F16 => 2f32.powi(-11),
    };
    8.0 * u * (4.0 * layers as f32 / 3.0).sqrt() * logit_rms
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(
            0.0f32,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
}

/// Runs `reference` through `engine` and compares.
pub fn verify<B: Backend, R: Reduce>(
    engine: &mut Engine<B, R>,
    reference: &Reference,
) -> Result<VerifyReport> {
    let vocab = engine.backend.spec().vocab;
    let weight_dtype = engine.backend.weight_dtype();
    // Sums between ranks are rounded to the engine's sum type, on the host or (set through
    // `Backend::set_sum_dtype`) on the device, where a communicator of one rank rounds too.
    let sum_dtype = if engine.reduce.world() > 1 || engine.backend.sums_across_ranks() {
        engine.sum_dtype
    } else {
        SumDType::F32
    };
    let layers = engine.backend.spec().n_layers;
    let steps = reference.decode_logits.len();
    engine.start(reference.prompt_ids.len() + steps)?;
    let prefill = engine.forward(&reference.prompt_ids, Logits::All)?;
    let mut report = VerifyReport {
        prefill_max_diff: 0.0,
        prefill_worst_position: 0,
        decode_max_diff: 0.0,
        decode_worst_step: 0,
        tolerance: tolerance(weight_dtype)
            + sum_tolerance(sum_dtype, layers, reference.logit_rms()),
        weight_dtype,
        sum_dtype,
        greedy_total: 0,
        greedy_agree: 0,
    };
    for (pos, (ours, theirs)) in prefill
        .chunks_exact(vocab)
        .zip(&reference.prefill_logits)
        .enumerate()
    {
        let d = max_abs_diff(ours, theirs);
        if d > report.prefill_max_diff {
            (report.prefill_max_diff, report.prefill_worst_position) = (d, pos);
        }
    }
    let mut last = prefill[prefill.len() - vocab..].to_vec();
    for (i, expected) in reference.greedy_ids.iter().enumerate() {
        report.greedy_total += 1;
        report.greedy_agree += usize::from(argmax(&last) as u32 == *expected);
        if i == steps {
            break;
        }
        last = engine.forward(&[*expected], Logits::Last)?;
        let d = max_abs_diff(&last, &reference.decode_logits[i]);
        if d > report.decode_max_diff {
            (report.decode_max_diff, report.decode_worst_step) = (d, i);
        }
    }
    Ok(report)
}
