//! The integration tests, one module per area, in one test binary: one link instead of one per
//! file, and the helpers in `common` compiled once. Select an area by its module path, e.g.
//! `cargo test -p shardline-model --test it -- gguf::`.

mod common;

mod bad_input;
mod cuda_backend;
mod engine;
mod fixtures;
mod fp8;
mod gguf;
mod paged;
mod quantized;
mod shared_fixtures;
mod tensor_parallel;
