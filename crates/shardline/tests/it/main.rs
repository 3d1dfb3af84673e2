//! The integration tests, one module per area, in one test binary: one link instead of one per
//! file, and the helpers in `common` compiled once. Select an area by its module path, e.g.
//! `cargo test -p shardline --test it -- serve::`.

mod common;

mod bench_comm;
mod bench_serve;
mod distributed;
mod launch;
mod model_cli;
mod netns;
mod serve;
