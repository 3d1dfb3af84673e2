//! Errors of the communication layer: each says what failed and which peer (by world rank) was
//! involved, so that a failed collective can be traced to the rank that caused it.

use std::io;

/// Everything that can go wrong in `shardline-comm`.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// A setting (flag or environment variable) is missing or malformed.
    #[error("configuration: {0}")]
    Config(String),
    /// The caller passed arguments that cannot work (checked before anything is sent).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A peer died or closed its connection.
    #[error("peer rank {rank} is gone: {detail}")]
    PeerLost {
        /// World rank of the lost peer.
        rank: usize,
        /// How the loss showed (closed connection, exited process, transport error).
        detail: String,
    },
    /// A peer sent nothing, not even a heartbeat, for the liveness budget (`SHARDLINE_HEARTBEAT`):
    /// it is stopped, hung, or cut off from this rank.
    #[error("rank {rank} sent nothing for {secs:.1} s {what}")]
    Silent {
        /// World rank of the silent peer.
        rank: usize,
        /// How long it has been silent, in seconds.
        secs: f64,
        /// What this rank was doing, and what is known of the peer's state.
        what: String,
    },
    /// A deadline passed.
    #[error("timed out after {secs:.1} s {what}")]
    Timeout {
        /// The wait that ran out, with the ranks still pending where they are known.
        what: String,
        /// The deadline it ran under, in seconds.
        secs: f64,
    },
    /// A transport call failed in a way that retrying cannot mend (the peer may still live).
    #[error("transport failure with rank {rank} at {address}: {detail}")]
    Transport {
        /// World rank of the peer the call was for.
        rank: usize,
        /// Where that peer is (its listener's address, process id and host).
        address: String,
        /// The call and its status.
        detail: String,
    },
    /// A peer sent bytes that are not a valid frame.
    #[error("malformed frame from rank {rank}: {detail}")]
    Protocol {
        /// World rank of the peer that sent the bytes.
        rank: usize,
        /// What is wrong with them.
        detail: String,
    },
    /// A peer called a different collective, dtype or length than this rank.
    #[error("mismatch with rank {rank}: {detail}")]
    Mismatch {
        /// World rank of the peer whose frame disagreed.
        rank: usize,
        /// What this rank expected and what the peer sent.
        detail: String,
    },
    /// The rendezvous failed.
    #[error("bootstrap: {0}")]
    Bootstrap(String),
    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What this rank was doing when the call failed.
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// An earlier failure left the group's streams out of step; the group cannot be used again.
    #[error("the group is unusable after an earlier error: {0}")]
    Poisoned(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, CommError>;

impl CommError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> CommError {
        CommError::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether the error happened before anything was exchanged, so the group is still usable.
    pub(crate) fn leaves_group_usable(&self) -> bool {
        matches!(self, CommError::InvalidArgument(_))
    }
}
