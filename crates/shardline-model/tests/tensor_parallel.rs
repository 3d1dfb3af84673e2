//! Every repo fixture split over ranks (TP 2, TP 4, EP 2, TP 4 with EP 2) reproduces the
//! reference logits to the single-rank tolerance. The ranks are threads of this process whose
//! reduce sums the partials in rank order, so the test checks the sharding itself; the comm
//! crate's all-reduce between processes is tested by the CLI's distributed tests.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, Mutex};

use shardline_model::load::load_model_for;
use shardline_model::safetensors_dir::SafetensorsDir;
use shardline_model::{verify, CpuBackend, Engine, ModelSpec, Plan, Reduce, Reference};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// Partials of every rank, summed in rank order by each rank (so every rank gets the same bits).
struct Slots {
    parts: Mutex<Vec<Vec<f32>>>,
    barrier: Barrier,
}

struct ThreadReduce {
    rank: usize,
    shared: Arc<Slots>,
}

impl ThreadReduce {
    /// Publishes this rank's `x`, waits for every rank's, and reads them in rank order.
    fn exchange(&mut self, x: &[f32], read: impl FnOnce(&[Vec<f32>])) {
        self.shared.parts.lock().unwrap()[self.rank] = x.to_vec();
        self.shared.barrier.wait();
        read(&self.shared.parts.lock().unwrap());
        self.shared.barrier.wait();
    }
}

impl Reduce for ThreadReduce {
    fn world(&self) -> usize {
        self.shared.parts.lock().unwrap().len()
    }

    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> shardline_model::Result<()> {
        self.exchange(local, |parts| {
            for (o, p) in out.chunks_exact_mut(local.len()).zip(parts) {
                o.copy_from_slice(p);
            }
        });
        Ok(())
    }

    fn all_reduce_sum(&mut self, x: &mut [f32]) -> shardline_model::Result<()> {
        let own = x.to_vec();
        self.exchange(&own, |parts| {
            x.fill(0.0);
            for p in parts {
                for (o, v) in x.iter_mut().zip(p) {
                    *o += v;
                }
            }
        });
        Ok(())
    }
}

/// Verifies `dir` with `world` thread-ranks and `ep` expert groups; returns each rank's
/// (prefill, decode) max difference.
fn verify_split(dir: &Path, world: usize, ep: usize) -> Vec<(f32, f32)> {
    let spec = ModelSpec::from_file(&dir.join("config.json")).unwrap();
    let reference = Reference::from_file(&dir.join("reference.json"), spec.vocab).unwrap();
    let shared = Arc::new(Slots {
        parts: Mutex::new(vec![Vec::new(); world]),
        barrier: Barrier::new(world),
    });
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (spec, reference, shared) = (spec.clone(), &reference, shared.clone());
                s.spawn(move || {
                    let plan = Plan::new(world, ep, rank).unwrap();
                    let files = SafetensorsDir::open(dir).unwrap();
                    let weights = load_model_for(&spec, &files, &plan).unwrap();
                    let backend = CpuBackend::new(spec, weights, 0);
                    let mut engine = Engine::new(backend, ThreadReduce { rank, shared });
                    let r = verify(&mut engine, reference).unwrap();
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
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
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
            let diffs = verify_split(dir, world, ep);
            // Every rank holds the same residual stream, so the same logits.
            assert!(diffs.windows(2).all(|w| w[0] == w[1]), "{diffs:?}");
        }
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
