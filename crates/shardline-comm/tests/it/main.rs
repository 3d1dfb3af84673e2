//! The integration tests, one module per area, in one test binary: one link instead of one per
//! file, and the helpers in `common` compiled once. Select an area by its module path, e.g.
//! `cargo test -p shardline-comm --test it -- liveness::`.

mod common;

mod bootstrap;
mod collectives;
mod faults;
mod fuzz;
mod hostile;
mod liveness;
