//! Settings of a job: rank, world size, coordinator, token, timeout, heartbeat budget, transport
//! and listen address. Built by hand
//! (from command-line flags) or from the environment: SHARDLINE_* variables first, then what
//! mpirun (OMPI_COMM_WORLD_*), PMI launchers (PMI_*) and srun (SLURM_*) set.

use std::net::IpAddr;
use std::time::Duration;

use crate::error::{CommError, Result};
use crate::transport::TransportChoice;

/// Default deadline of every blocking call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Default liveness budget: a peer that sends nothing (data or heartbeat) for this long fails the
/// group, at any phase.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(2);
/// The shortest liveness budget accepted (heartbeats go out every quarter of it).
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(100);

/// Everything `Group::init` needs.
#[derive(Clone, Debug)]
pub struct Config {
    /// This process's rank in the world group, `0..world_size`.
    pub rank: usize,
    /// Number of ranks in the job; 1 needs no coordinator.
    pub world_size: usize,
    /// host:port where rank 0 listens for the rendezvous.
    pub coordinator: String,
    /// Shared secret every rank must present. Without one (empty), a job of several ranks may
    /// only listen on loopback.
    pub token: String,
    /// Deadline of every blocking call (bootstrap and each collective).
    pub timeout: Duration,
    /// Liveness budget (`SHARDLINE_HEARTBEAT`): a peer that sends nothing for this long, not even
    /// a heartbeat, fails the group naming it, whether this rank is in the rendezvous, connecting,
    /// inside a collective or idle between them. Heartbeats go out on a link that has been quiet
    /// for a quarter of it. Zero turns heartbeats off (then only `timeout` catches a silent peer).
    pub heartbeat: Duration,
    /// Which transport connects this rank to its peers (`SHARDLINE_TRANSPORT`).
    pub transport: TransportChoice,
    /// Where this rank's peer listener binds (`SHARDLINE_LISTEN_ADDR`, an IP such as `0.0.0.0`).
    /// By default the address its peers are told about: the coordinator's for rank 0, the one
    /// each other rank reaches the coordinator from (loopback for a job on one host).
    pub listen: Option<IpAddr>,
}

impl Config {
    /// A config with the default timeout and transport.
    pub fn new(
        rank: usize,
        world_size: usize,
        coordinator: impl Into<String>,
        token: impl Into<String>,
    ) -> Config {
        Config {
            rank,
            world_size,
            coordinator: coordinator.into(),
            token: token.into(),
            timeout: DEFAULT_TIMEOUT,
            heartbeat: DEFAULT_HEARTBEAT,
            transport: TransportChoice::Auto,
            listen: None,
        }
    }

    /// Reads the environment (see the module documentation).
    pub fn from_env() -> Result<Config> {
        Config::from_lookup(|k| std::env::var(k).ok())
    }

    /// Like [`Config::from_env`] with any lookup (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let first = |names: &[&str]| -> Result<Option<(String, usize)>> {
            for n in names {
                if let Some(v) = get(n) {
                    let parsed = v.trim().parse::<usize>().map_err(|_| {
                        CommError::Config(format!("{n}='{v}' is not a non-negative integer"))
                    })?;
                    return Ok(Some((n.to_string(), parsed)));
                }
            }
            Ok(None)
        };
        let rank = first(&[
            "SHARDLINE_RANK",
            "OMPI_COMM_WORLD_RANK",
            "PMI_RANK",
            "SLURM_PROCID",
        ])?;
        let size = first(&[
            "SHARDLINE_WORLD_SIZE",
            "OMPI_COMM_WORLD_SIZE",
            "PMI_SIZE",
            "SLURM_NTASKS",
        ])?;
        let (rank, world_size) = match (rank, size) {
            (None, None) => (0, 1),
            (Some((_, r)), Some((_, s))) => (r, s),
            (Some((n, _)), None) => {
                return Err(CommError::Config(format!(
                    "{n} is set but no world size (SHARDLINE_WORLD_SIZE)"
                )))
            }
            (None, Some((n, _))) => {
                return Err(CommError::Config(format!(
                    "{n} is set but no rank (SHARDLINE_RANK)"
                )))
            }
        };
        let coordinator = get("SHARDLINE_COORDINATOR").unwrap_or_default();
        if world_size > 1 && coordinator.is_empty() {
            return Err(CommError::Config(
                "SHARDLINE_COORDINATOR (host:port of rank 0) is required when the world size is above 1".into(),
            ));
        }
        let timeout = match get("SHARDLINE_TIMEOUT") {
            None => DEFAULT_TIMEOUT,
            Some(v) => {
                let secs: f64 = v.trim().trim_end_matches('s').parse().map_err(|_| {
                    CommError::Config(format!(
                        "SHARDLINE_TIMEOUT='{v}' is not a number of seconds"
                    ))
                })?;
                if !(secs > 0.0 && secs < 1e7) {
                    return Err(CommError::Config(format!(
                        "SHARDLINE_TIMEOUT='{v}' must be positive"
                    )));
                }
                Duration::from_secs_f64(secs)
            }
        };
        let heartbeat = match get("SHARDLINE_HEARTBEAT") {
            None => DEFAULT_HEARTBEAT,
            Some(v) => {
                let secs: f64 = v.trim().trim_end_matches('s').parse().map_err(|_| {
                    CommError::Config(format!(
                        "SHARDLINE_HEARTBEAT='{v}' is not a number of seconds"
                    ))
                })?;
                if secs == 0.0 {
                    Duration::ZERO
                } else if secs >= MIN_HEARTBEAT.as_secs_f64() && secs < 1e7 {
                    Duration::from_secs_f64(secs)
                } else {
                    return Err(CommError::Config(format!(
                        "SHARDLINE_HEARTBEAT='{v}' must be 0 (off) or at least {} s",
                        MIN_HEARTBEAT.as_secs_f64()
                    )));
                }
            }
        };
        let transport = match get("SHARDLINE_TRANSPORT") {
            None => TransportChoice::Auto,
            Some(v) => TransportChoice::parse(v.trim())?,
        };
        let listen = match get("SHARDLINE_LISTEN_ADDR") {
            None => None,
            Some(v) => Some(v.trim().parse::<IpAddr>().map_err(|_| {
                CommError::Config(format!(
                    "SHARDLINE_LISTEN_ADDR='{v}' is not an IP address (e.g. 0.0.0.0 or 10.0.0.5)"
                ))
            })?),
        };
        let cfg = Config {
            rank,
            world_size,
            coordinator,
            token: get("SHARDLINE_JOB_TOKEN").unwrap_or_default(),
            timeout,
            heartbeat,
            transport,
            listen,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks rank against world size, and the heartbeat budget.
    pub fn validate(&self) -> Result<()> {
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(CommError::Config(format!(
                "rank {} is not within a world of {} ranks",
                self.rank, self.world_size
            )));
        }
        if !self.heartbeat.is_zero() && self.heartbeat < MIN_HEARTBEAT {
            return Err(CommError::Config(format!(
                "a heartbeat budget of {:?} is below the {:?} minimum (0 turns heartbeats off)",
                self.heartbeat, MIN_HEARTBEAT
            )));
        }
        Ok(())
    }

    /// The liveness budget, `None` when heartbeats are off.
    pub(crate) fn liveness(&self) -> Option<Duration> {
        (!self.heartbeat.is_zero()).then_some(self.heartbeat)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn launchers_are_recognised_in_order() {
        let c = cfg(&[
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("SHARDLINE_COORDINATOR", "h:1"),
        ])
        .unwrap();
        assert_eq!((c.rank, c.world_size), (2, 4));
        let c = cfg(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "3"),
            ("SHARDLINE_RANK", "0"),
            ("SHARDLINE_WORLD_SIZE", "3"),
            ("SHARDLINE_COORDINATOR", "h:1"),
            ("SHARDLINE_TIMEOUT", "2.5"),
        ])
        .unwrap();
        assert_eq!(
            (c.rank, c.world_size, c.timeout),
            (0, 3, Duration::from_millis(2500))
        );
        let c = cfg(&[]).unwrap();
        assert_eq!((c.rank, c.world_size, c.timeout), (0, 1, DEFAULT_TIMEOUT));
        assert_eq!(c.heartbeat, DEFAULT_HEARTBEAT);
        let c = cfg(&[("SHARDLINE_HEARTBEAT", "0")]).unwrap();
        assert_eq!(c.liveness(), None);
        let c = cfg(&[("SHARDLINE_HEARTBEAT", "0.5s")]).unwrap();
        assert_eq!(c.liveness(), Some(Duration::from_millis(500)));
    }

    #[test]
    fn bad_settings_name_the_variable() {
        let e = cfg(&[("SHARDLINE_RANK", "x"), ("SHARDLINE_WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("SHARDLINE_RANK"), "{e}");
        let e = cfg(&[
            ("SHARDLINE_RANK", "2"),
            ("SHARDLINE_WORLD_SIZE", "2"),
            ("SHARDLINE_COORDINATOR", "h:1"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("rank 2"), "{e}");
        let e = cfg(&[("PMI_RANK", "0"), ("PMI_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("SHARDLINE_COORDINATOR"), "{e}");
        let e = cfg(&[("SHARDLINE_TIMEOUT", "-1")]).unwrap_err().to_string();
        assert!(e.contains("SHARDLINE_TIMEOUT"), "{e}");
        for bad in ["-1", "0.01", "soon"] {
            let e = cfg(&[("SHARDLINE_HEARTBEAT", bad)])
                .unwrap_err()
                .to_string();
            assert!(e.contains("SHARDLINE_HEARTBEAT"), "{e}");
        }
        let e = cfg(&[("SHARDLINE_LISTEN_ADDR", "everywhere")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("SHARDLINE_LISTEN_ADDR"), "{e}");
        let c = cfg(&[("SHARDLINE_LISTEN_ADDR", "0.0.0.0")]).unwrap();
        assert_eq!(c.listen, Some(IpAddr::from([0, 0, 0, 0])));
    }
}
