//! Liveness of a group's peers. A killed peer shows at once (its sockets close, its pidfd fires); a
//! stopped or hung one, or a host that no longer answers, shows only by its silence. So every link
//! that has been quiet for a quarter of the budget (`SHARDLINE_HEARTBEAT`, 2 s by default) gets a
//! heartbeat: over shm a counter beside the ring that the peer reads, over tcp a 32-byte frame
//! between two frames that the receiver drops, over ucx an empty message under a tag of its own.
//! Anything received counts as life, so a busy link carries no heartbeats at all. A peer that
//! shows no life for the whole budget fails the group, named.
//!
//! A pulse (send the heartbeats that are due, look for life) runs from the exchange of a collective
//! (when it starts if one is due, every eighth of the budget while it streams, and every check of
//! a wait, 10 ms) and, while no collective runs, from the group's progress thread every sixteenth
//! of the budget. A pulse costs a few loads and stores, and a `recv` per tcp peer; none runs on the
//! path of a collective that neither waits nor is due one.

use std::time::{Duration, Instant};

use crate::error::{CommError, Result};
use crate::transport::Pair;

/// One peer's heartbeat bookkeeping.
struct Beat {
    /// `Pair::sent` at the last pulse, and when it last changed (or a heartbeat went).
    sent: u64,
    sent_at: Instant,
    /// When the peer last showed life.
    heard_at: Instant,
    /// The peer's process id when it runs on this host (its state goes into the error).
    pid: Option<u32>,
}

/// The heartbeat state of a group's links.
pub(crate) struct Heart {
    budget: Option<Duration>,
    peers: Vec<Option<Beat>>,
    /// When the next pulse is due.
    next: Instant,
    /// When the last pulse ran.
    last: Instant,
}

impl Heart {
    /// Heartbeats with `budget` (none: off) for peers `pids` (by group rank; `None` for this rank
    /// itself, `Some(None)` for a peer on another host).
    pub fn new(budget: Option<Duration>, pids: Vec<Option<Option<u32>>>) -> Heart {
        let now = Instant::now();
        Heart {
            budget,
            peers: pids
                .into_iter()
                .map(|p| {
                    p.map(|pid| Beat {
                        sent: 0,
                        sent_at: now,
                        heard_at: now,
                        pid,
                    })
                })
                .collect(),
            next: now,
            last: now,
        }
    }

    /// How often an idle group pulses (a sixteenth of the budget); `None` when heartbeats are
    /// off.
    pub fn tick(&self) -> Option<Duration> {
        self.budget.map(|b| b / 16)
    }

    /// Whether heartbeats are on.
    pub fn on(&self) -> bool {
        self.budget.is_some()
    }

    /// Whether a pulse is due at `now` (an eighth of the budget after the last one).
    #[inline]
    pub fn due(&self, now: Instant) -> bool {
        self.budget.is_some() && now >= self.next
    }

    /// Sends the heartbeats that are due and fails with [`CommError::Silent`] naming a peer that
    /// showed no life for the whole budget. `half(p)` says whether a frame to group rank `p` is
    /// half sent, and whether one from it is half read (an idle rank's streams are all between
    /// frames). `what` says what this rank is doing, for the error.
    pub fn pulse(
        &mut self,
        pairs: &mut [Option<Box<dyn Pair>>],
        ranks: &[usize],
        now: Instant,
        half: &dyn Fn(usize) -> (bool, bool),
        what: &dyn Fn() -> String,
    ) -> Result<()> {
        let Some(budget) = self.budget else {
            return Ok(());
        };
        // A gap in this rank's own pulses (it was stopped, starved, or held the group's lock
        // elsewhere, as `split` does while it connects the subgroup) is no peer's silence: the
        // peers get a fresh budget from now.
        let away = now.saturating_duration_since(self.last) > budget / 2;
        self.last = now;
        self.next = now + budget / 8;
        for (p, beat) in self.peers.iter_mut().enumerate() {
            let (Some(beat), Some(pair)) = (beat.as_mut(), pairs[p].as_deref_mut()) else {
                continue;
            };
            let (half_sent, half_read) = half(p);
            let sent = pair.sent();
            if sent != beat.sent {
                beat.sent = sent;
                beat.sent_at = now;
            } else if now.saturating_duration_since(beat.sent_at) >= budget / 4
                && pair.beat(!half_sent)?
            {
                beat.sent = pair.sent();
                beat.sent_at = now;
            }
            if pair.heard(!half_read)? || away {
                beat.heard_at = now;
            } else {
                let silent = now.saturating_duration_since(beat.heard_at);
                if silent >= budget {
                    return Err(CommError::Silent {
                        rank: ranks[p],
                        secs: silent.as_secs_f64(),
                        what: format!(
                            "{} ({}; SHARDLINE_HEARTBEAT={} s is the budget)",
                            what(),
                            state(beat.pid),
                            budget.as_secs_f64()
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

/// What is known of a silent peer's process: its state when it runs on this host.
pub(crate) fn state(pid: Option<u32>) -> String {
    let Some(pid) = pid else {
        return "stopped, hung, or its host cut off".into();
    };
    // /proc/PID/stat: "pid (comm) S ...": the state follows the last ')'.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let code = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next());
    match code {
        Some('T') => format!("its process {pid} on this host is stopped"),
        Some('t') => format!("its process {pid} on this host is stopped by a debugger"),
        Some('Z') | Some('X') | None => format!("its process {pid} on this host has exited"),
        Some(_) => format!("its process {pid} on this host runs but is hung or starved"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_process_is_described_as_stopped() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(state(Some(pid)).contains("hung"), "{}", state(Some(pid)));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !state(Some(pid)).contains("stopped") {
            assert!(Instant::now() < deadline, "{}", state(Some(pid)));
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(state(Some(pid)).contains("exited"));
        assert!(state(None).contains("host"));
    }
}
