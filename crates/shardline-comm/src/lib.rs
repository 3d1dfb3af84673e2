#![warn(missing_docs)]

//! Shardline's communication layer: transports (shared memory and TCP) that connect pairs of
//! ranks, a bootstrap rendezvous that forms a [`Group`], and collectives over it (all_reduce,
//! all_gather, reduce_scatter, broadcast, all_to_all(v), barrier, send/recv) on f32, f16 and bf16
//! slices. See docs/architecture.md, "Collectives and transports" and "Bootstrap and launch".
//!
//! ```no_run
//! use shardline_comm::{Group, ReduceOp};
//! let group = Group::from_env()?; // SHARDLINE_RANK, SHARDLINE_WORLD_SIZE, SHARDLINE_COORDINATOR, ...
//! let mut hidden = vec![1.0f32; 2048];
//! group.all_reduce(&mut hidden, ReduceOp::Sum)?;
//! # Ok::<(), shardline_comm::CommError>(())
//! ```
//!
//! Environment (all optional for a single rank):
//! - `SHARDLINE_RANK`, `SHARDLINE_WORLD_SIZE` (or `OMPI_COMM_WORLD_RANK/SIZE`, `PMI_RANK/SIZE`,
//!   `SLURM_PROCID/NTASKS`), `SHARDLINE_COORDINATOR` (host:port of rank 0),
//!   `SHARDLINE_JOB_TOKEN`, `SHARDLINE_TIMEOUT` (seconds, default 60), `SHARDLINE_HEARTBEAT`
//!   (seconds a peer may stay silent before the group fails naming it, default 2; 0: off): see
//!   [`Config`].
//! - `SHARDLINE_TRANSPORT`: `auto` (shm on one host, tcp across hosts), `shm`, `tcp` or `ucx`.
//! - `SHARDLINE_LISTEN_ADDR`: the IP a rank's peer listener binds (default: the address its peers
//!   are told about, loopback for a job on one host). A job without a token may only listen on
//!   loopback.
//! - `SHARDLINE_ALLREDUCE_ALGO`: `auto` (direct up to [`DIRECT_MAX_BYTES`], ring above; ring
//!   at every size when more than two ranks outnumber this host's CPUs), `direct` or `ring`.
//! - `SHARDLINE_SHM_RING_BYTES` (default 2 MiB per peer), `SHARDLINE_SPIN_US` (default 20; no
//!   spinning when the ranks on this host outnumber its CPUs).

mod bootstrap;
mod collectives;
pub mod config;
mod elem;
mod engine;
pub mod error;
#[cfg(test)]
mod fuzz;
mod group;
mod heartbeat;
mod progress;
pub mod transport;
mod wire;

pub use config::Config;
pub use elem::{DType, Elem, ReduceOp};
pub use engine::{Algo, DIRECT_MAX_BYTES};
pub use error::{CommError, Result};
pub use group::{Group, Handle};
pub use transport::TransportChoice;
