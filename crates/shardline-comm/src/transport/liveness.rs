//! Whether a peer process on this host is still alive, for transports that cannot see a peer's
//! death on their own (shared memory has no connection to break).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Watches whether a process is alive: a pidfd where the kernel has them, else `kill(pid, 0)`.
pub(crate) struct PidWatch {
    pid: u32,
    fd: Option<OwnedFd>,
}

impl PidWatch {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn new(pid: u32) -> PidWatch {
        // SAFETY: plain syscall; a non-negative result is a new fd we own.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        let fd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) });
        PidWatch { pid, fd }
    }

    pub fn alive(&self) -> bool {
        match &self.fd {
            Some(fd) => {
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, zero timeout.
                let r = unsafe { libc::poll(&mut pfd, 1, 0) };
                !(r > 0 && pfd.revents != 0)
            }
            // SAFETY: signal 0 only checks existence.
            None => unsafe { libc::kill(self.pid as libc::pid_t, 0) == 0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_an_exited_unreaped_child_is_not() {
        assert!(PidWatch::new(std::process::id()).alive());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let watch = PidWatch::new(child.id());
        // Not reaped yet: a zombie must already count as dead.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while watch.alive() {
            assert!(
                std::time::Instant::now() < deadline,
                "exited child still looks alive"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.wait().unwrap();
    }
}
