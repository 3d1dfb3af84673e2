//! The persistent worker pool kernels run on.
//!
//! A decode op lasts microseconds, so threads are never spawned per op: all kernels share one
//! pool of long-lived workers (rayon's, whose idle workers spin briefly and then sleep). The pool's
//! size defaults to the number of cores and can be set once, with `SHARDLINE_THREADS` or [`init`]
//! before the first kernel runs.

use std::sync::OnceLock;

use crate::TensorError;

static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();

/// The shared pool, created on first use.
pub fn pool() -> &'static rayon::ThreadPool {
    POOL.get_or_init(|| {
        let threads = std::env::var("SHARDLINE_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
        build(threads)
    })
}

/// Starts the shared pool with `threads` workers. Fails when `threads` is 0 or the pool is
/// already running with another size (it starts on the first kernel call).
pub fn init(threads: usize) -> Result<(), TensorError> {
    if threads == 0 {
        return Err(TensorError::PoolSize {
            requested: 0,
            running: None,
        });
    }
    let running = POOL.get_or_init(|| build(threads)).current_num_threads();
    if running != threads {
        return Err(TensorError::PoolSize {
            requested: threads,
            running: Some(running),
        });
    }
    Ok(())
}

fn build(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("shardline-worker-{i}"))
        .build()
        .expect("failed to start the worker pool")
}

/// Number of workers in the shared pool.
pub fn num_threads() -> usize {
    pool().current_num_threads()
}

/// Runs `f` inside the shared pool (so nested parallel iterators use its workers).
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    pool().install(f)
}
