//! Shardline's communication layer: transports (shared memory and TCP) that connect pairs of
//! ranks, a bootstrap rendezvous that forms a [`Group`], and collectives over it (all_reduce,
//! all_gather, reduce_scatter, broadcast, all_to_all(v), barrier, send/recv) on f32, f16 and bf16
//! slices. See DESIGN.md, "Communication".
//!
//! ```no_run
//! use shardline_comm::{Group, ReduceOp};
//! let group = Group::from_env()?; // SHARDLINE_RANK, SHARDLINE_WORLD_SIZE, SHARDLINE_COORDINATOR, ...
//! let mut hidden = vec![1.0f32; 2048];
//! group.all_reduce(&mut hidden, ReduceOp::Sum)?;
//! # Ok::<(), shardline_comm::CommError>(())
//! ```

mod bootstrap;
mod collectives;
pub mod config;
mod elem;
mod engine;
pub mod error;
mod group;
mod progress;
pub mod transport;
mod wire;

pub use config::Config;
pub use elem::{DType, Elem, ReduceOp};
pub use engine::{Algo, DIRECT_MAX_BYTES};
pub use error::{CommError, Result};
pub use group::{Group, Handle};
pub use transport::TransportChoice;
