//! The integration tests, one module per area, in one test binary: one link instead of one per
//! file, and the helpers in `common` compiled once. Select an area by its module path, e.g.
//! `cargo test -p shardline-cuda --test it -- nccl_gpu::`.

mod common;

mod kernels_compile;
mod nccl_gpu;
