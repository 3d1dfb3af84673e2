//! The integration tests, one module per area, in one test binary: one link instead of one per
//! file, and the helpers in `common` compiled once. Select an area by its module path, e.g.
//! `cargo test -p shardline-tensor --test it -- matvec::`.
//! (`tests/pool.rs` stays a binary of its own: the pool it sizes is process-wide.)

mod common;

mod attention;
mod matvec;
mod quant_kernels;
mod quant_matmul;
mod quant_vectors;
mod vector_kernels;
