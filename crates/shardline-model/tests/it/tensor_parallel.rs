//! Every repo fixture split over ranks (TP 2, TP 4, EP 2, TP 4 with EP 2) reproduces the
//! reference logits to the single-rank tolerance with its partial sums carried in f32, and to that
//! plus the rounding's share (`sum_tolerance`) carried in the model's own type; a bf16 or f16
//! model's sums travel in 2 bytes an element; and a prompt long enough for several chunks of
//! expert dispatch gives the single-rank logits. The ranks are threads of this process whose
//! reduce sums the partials in rank order, so the test checks the sharding itself; the comm
//! crate's collectives between processes are tested by the CLI's distributed tests.

use crate::common;

use std::path::{Path, PathBuf};

use common::ThreadReduce;

use shardline_model::backend::cpu::dispatch::DISPATCH_CHUNK;
use shardline_model::load::load_model_for;
use shardline_model::reference::{sum_tolerance, tolerance};
use shardline_model::safetensors_dir::SafetensorsDir;
use shardline_model::{
    verify, Backend, CpuBackend, Engine, FfnKind, Logits, ModelSpec, Plan, Reference, SumDType,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// Runs `f` on `world` thread-ranks with `ep` expert groups, each with its engine over its slice
/// of the model in `dir` (config `adjust`ed); returns each rank's result.
fn on_thread_ranks<T: Send>(
    dir: &Path,
    world: usize,
    ep: usize,
    adjust: impl Fn(&mut ModelSpec),
    f: impl Fn(&mut Engine<CpuBackend, ThreadReduce>) -> T + Sync,
) -> Vec<T> {
    let mut spec = ModelSpec::from_file(&dir.join("config.json")).unwrap();
    adjust(&mut spec);
    common::on_threads(world, |reduce| {
        let plan = Plan::new(world, ep, reduce.rank).unwrap();
        let files = SafetensorsDir::open(dir).unwrap();
        let weights = load_model_for(&spec, &files, &plan).unwrap();
        let backend = CpuBackend::new(spec.clone(), weights, 0);
        f(&mut Engine::new(backend, reduce))
    })
}

/// Verifies `dir` with `world` thread-ranks and `ep` expert groups, the partial sums carried in
/// f32 or (`in_f32` false) in the model's type; returns each rank's (prefill, decode) max
/// difference.
fn verify_split(dir: &Path, world: usize, ep: usize, in_f32: bool) -> Vec<(f32, f32)> {
    let spec = ModelSpec::from_file(&dir.join("config.json")).unwrap();
    let reference = Reference::from_file(&dir.join("reference.json"), spec.vocab).unwrap();
    on_thread_ranks(
        dir,
        world,
        ep,
        |_| {},
        |engine| {
            let rank = engine.reduce.rank;
            let weights = engine.backend.weight_dtype();
            engine.sum_dtype = if in_f32 {
                SumDType::F32
            } else {
                SumDType::of_weights(weights)
            };
            let sums = engine.sum_dtype;
            let r = verify(engine, &reference).unwrap();
            // The tolerance widens only by the sums' rounding, and not at all for f32 sums.
            let widened = sum_tolerance(sums, spec.n_layers, reference.logit_rms());
            assert_eq!(r.tolerance, tolerance(weights) + widened);
            assert_eq!(r.sum_dtype, sums);
            assert!(
                r.passed(),
                "{} world {world} ep {ep} rank {rank}: prefill {:.2e} decode {:.2e}, greedy {}/{}",
                dir.display(),
                r.prefill_max_diff,
                r.decode_max_diff,
                r.greedy_agree,
                r.greedy_total
            );
            (r.prefill_max_diff, r.decode_max_diff)
        },
    )
}

#[test]
fn every_fixture_verifies_split_over_ranks() {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("reference.json").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 6, "the repo's fixtures are missing");
    for dir in &dirs {
        let moe = ModelSpec::from_file(&dir.join("config.json"))
            .unwrap()
            .moe
            .is_some();
        let mut plans = vec![(2, 1), (4, 1)];
        if moe {
            plans.extend([(2, 2), (4, 2)]);
        }
        for (world, ep) in plans {
            for in_f32 in [true, false] {
                let diffs = verify_split(dir, world, ep, in_f32);
                // Every rank holds the same residual stream, so the same logits.
                assert!(diffs.windows(2).all(|w| w[0] == w[1]), "{diffs:?}");
            }
        }
    }
}

#[test]
fn half_models_carry_their_sums_in_two_bytes_an_element() {
    for (name, sums) in [
        ("mixtral-tiny", SumDType::F32),
        ("mixtral-tiny-bf16", SumDType::BF16),
        ("mixtral-tiny-f16", SumDType::F16),
    ] {
        let dir = fixtures().join(name);
        let prompt = [3u32, 1, 4, 1, 5];
        // A prefill and a decode step on two ranks; each rank's all-reduced elements and bytes.
        let run = |force_f32: bool| {
            on_thread_ranks(
                &dir,
                2,
                1,
                |_| {},
                |engine| {
                    if !force_f32 {
                        engine.sum_dtype = SumDType::of_weights(engine.backend.weight_dtype());
                    }
                    engine.start(prompt.len() + 1).unwrap();
                    let first = engine.forward_argmax(&prompt).unwrap();
                    let logits = engine.forward(&[first], Logits::Last).unwrap();
                    let r = &engine.reduce;
                    (engine.sum_dtype, r.sum_elems, r.sum_bytes, logits)
                },
            )
        };
        let spec = ModelSpec::from_file(&dir.join("config.json")).unwrap();
        // Two all-reduces a layer, of every row: the prompt's, then the decode step's one.
        let elems = 2 * spec.n_layers * (prompt.len() + 1) * spec.hidden;
        let model = run(false);
        for (rank, (dtype, n, bytes, _)) in model.iter().enumerate() {
            assert_eq!(*dtype, sums, "{name} rank {rank}");
            assert_eq!(*n, elems, "{name} rank {rank}");
            assert_eq!(*bytes, n * sums.size(), "{name} rank {rank}");
        }
        let forced = run(true);
        for (rank, (dtype, n, bytes, _)) in forced.iter().enumerate() {
            assert_eq!(*dtype, SumDType::F32, "{name} rank {rank}");
            assert_eq!(*bytes, 4 * n, "{name} rank {rank}");
        }
        // Rounded sums give other logits than f32 ones exactly where the sums are rounded.
        assert_eq!(model[0].3 == forced[0].3, sums == SumDType::F32, "{name}");
    }
}

#[test]
fn a_dense_model_refuses_expert_parallelism() {
    let spec = ModelSpec::from_file(&fixtures().join("llama-tiny/config.json")).unwrap();
    let err = Plan::new(2, 2, 0)
        .unwrap()
        .check(&spec)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no experts"), "{err}");
}

#[test]
fn a_long_prompt_is_dispatched_to_the_expert_ranks_in_chunks() {
    const PROMPT: usize = 300;
    let longer = |spec: &mut ModelSpec| spec.max_positions = 512;
    for name in ["mixtral-tiny", "qwen2-moe-tiny"] {
        let dir = fixtures().join(name);
        let spec = ModelSpec::from_file(&dir.join("config.json")).unwrap();
        let prompt: Vec<u32> = (0..PROMPT)
            .map(|i| ((i * 37 + 11) % spec.vocab) as u32)
            .collect();
        let moe_layers = (0..spec.n_layers)
            .filter(|&l| matches!(spec.ffn(l), FfnKind::Moe(_)))
            .count();
        let shared = spec.moe.as_ref().unwrap().shared_intermediate.is_some();
        // Prefill logits of every row, and the all-to-alls and all-gathers the rank ran.
        let prefill = |world, ep| {
            on_thread_ranks(&dir, world, ep, longer, |engine| {
                engine.start(PROMPT).unwrap();
                let logits = engine.forward(&prompt, Logits::All).unwrap();
                let r = &engine.reduce;
                (logits, r.all_to_alls, r.all_gathers)
            })
        };
        let one = prefill(1, 1).remove(0);
        assert_eq!(one.1, 0, "one rank exchanges nothing");
        for (world, ep) in [(2, 2), (4, 2), (4, 4)] {
            let chunks = PROMPT.div_ceil(world).div_ceil(DISPATCH_CHUNK);
            assert!(chunks >= 2, "the prompt is too short to test chunking");
            for (rank, (logits, all_to_alls, all_gathers)) in
                prefill(world, ep).into_iter().enumerate()
            {
                // Per MoE layer: the counts, then each chunk's rows out and results back.
                assert_eq!(
                    all_to_alls,
                    moe_layers * (1 + 2 * chunks),
                    "{name} rank {rank}"
                );
                // The logits, and without a shared expert each MoE layer's rows.
                let gathers = 1 + if shared { 0 } else { moe_layers };
                assert_eq!(all_gathers, gathers, "{name} rank {rank}");
                let diff = logits
                    .iter()
                    .zip(&one.0)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    diff < 1e-4,
                    "{name} world {world} ep {ep} rank {rank}: logits differ by {diff:.2e}"
                );
            }
        }
    }
}
