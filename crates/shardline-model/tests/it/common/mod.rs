//! What the multi-rank tests share: ranks as threads of this process, with a [`Reduce`] that
//! sums the partials in rank order (so every rank gets the same bits), rounding them to the type
//! they would travel in as the comm crate's collectives do, and counts the exchanges.
//! The comm crate's collectives between processes are tested by the CLI's distributed tests.

pub mod checkpoint;

use std::sync::{Arc, Barrier, Mutex};

use half::{bf16, f16};
use shardline_model::{ModelError, Pending, Reduce, Result, SumDType};

/// Partials of every rank, summed in rank order by each rank.
struct Slots {
    parts: Mutex<Vec<Vec<f32>>>,
    barrier: Barrier,
}

/// One thread-rank's side of the exchanges.
pub struct ThreadReduce {
    pub rank: usize,
    shared: Arc<Slots>,
    /// All-to-all exchanges run (expert dispatch).
    pub all_to_alls: usize,
    /// All-gathers run (logits, and rows after dispatch).
    pub all_gathers: usize,
    /// Elements all-reduced.
    pub sum_elems: usize,
    /// The bytes those elements take between ranks, in the type each all-reduce asked for.
    pub sum_bytes: usize,
}

/// `x` rounded to the nearest values of `dtype` (round to nearest even, as `half` converts).
fn round(dtype: SumDType, x: &mut [f32]) {
    match dtype {
        SumDType::F32 => {}
        SumDType::BF16 => x.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32()),
        SumDType::F16 => x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
    }
}

impl ThreadReduce {
    /// Publishes this rank's `x`, waits for every rank's, and reads them in rank order.
    fn exchange<T>(&mut self, x: &[f32], read: impl FnOnce(&[Vec<f32>]) -> T) -> T {
        self.shared.parts.lock().unwrap()[self.rank] = x.to_vec();
        self.shared.barrier.wait();
        let r = read(&self.shared.parts.lock().unwrap());
        self.shared.barrier.wait();
        r
    }
}

impl Reduce for ThreadReduce {
    fn world(&self) -> usize {
        self.shared.parts.lock().unwrap().len()
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn barrier(&mut self) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }

    fn broadcast_u32(&mut self, buf: &mut [u32]) -> Result<()> {
        let words: Vec<f32> = buf.iter().map(|&w| f32::from_bits(w)).collect();
        self.exchange(&words, |parts| {
            for (b, w) in buf.iter_mut().zip(&parts[0]) {
                *b = w.to_bits();
            }
        });
        Ok(())
    }

    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()> {
        self.all_gathers += 1;
        self.exchange(local, |parts| {
            for (o, p) in out.chunks_exact_mut(local.len()).zip(parts) {
                o.copy_from_slice(p);
            }
        });
        Ok(())
    }

    /// As the comm crate's direct all-reduce: each part rounded to `dtype`, summed in f32 in rank
    /// order, the sum rounded once.
    fn all_reduce_sum(&mut self, x: &mut [f32], dtype: SumDType) -> Result<()> {
        self.sum_elems += x.len();
        self.sum_bytes += x.len() * dtype.size();
        let mut own = x.to_vec();
        round(dtype, &mut own);
        self.exchange(&own, |parts| {
            x.fill(0.0);
            for p in parts {
                for (o, v) in x.iter_mut().zip(p) {
                    *o += v;
                }
            }
        });
        round(dtype, x);
        Ok(())
    }

    /// Each rank publishes its send counts, then its floats; each reads its block of every
    /// rank's, checked against the count it expects.
    fn all_to_all_v(
        &mut self,
        send: Vec<f32>,
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Pending> {
        self.all_to_alls += 1;
        let (me, world) = (self.rank, send_counts.len());
        let mut published: Vec<f32> = send_counts.iter().map(|&n| n as f32).collect();
        published.extend(send);
        self.exchange(&published, |parts| {
            let mut received = Vec::new();
            for (from, part) in parts.iter().enumerate() {
                let (counts, data) = part.split_at(world);
                let start: usize = counts[..me].iter().map(|&c| c as usize).sum();
                let n = counts[me] as usize;
                if n != recv_counts[from] {
                    return Err(ModelError::Invalid(format!(
                        "rank {from} sent rank {me} {n} floats, {} expected",
                        recv_counts[from]
                    )));
                }
                received.extend_from_slice(&data[start..start + n]);
            }
            Ok(Pending::ready(received))
        })
    }
}

/// Runs `f` on `world` threads, each given its rank's [`ThreadReduce`]; returns each rank's
/// result, in rank order. A rank that fails mid-exchange leaves the others waiting: `f` should
/// collect what it checks and leave the asserting to the caller.
pub fn on_threads<T: Send>(world: usize, f: impl Fn(ThreadReduce) -> T + Sync) -> Vec<T> {
    let shared = Arc::new(Slots {
        parts: Mutex::new(vec![Vec::new(); world]),
        barrier: Barrier::new(world),
    });
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (shared, f) = (shared.clone(), &f);
                s.spawn(move || {
                    f(ThreadReduce {
                        rank,
                        shared,
                        all_to_alls: 0,
                        all_gathers: 0,
                        sum_elems: 0,
                        sum_bytes: 0,
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
