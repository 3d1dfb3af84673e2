//! Test hosts: network namespaces joined by a veth pair (needs root and iproute2).

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Distinguishes the hosts of tests running at once in one test binary.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Two namespaces and the veth pair between them, removed on drop.
pub struct Hosts {
    pub names: [String; 2],
    /// The first host's address; the second's ends in .2.
    pub first_addr: String,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Makes the two hosts at 10.231.X.1 and 10.231.X.2; returns them and whether netem delay is on.
pub fn make_hosts() -> Result<(Hosts, bool), String> {
    let tag = (std::process::id() as usize * 8 + NEXT.fetch_add(1, Ordering::Relaxed)) % 10_000;
    let names = [format!("sl{tag}a"), format!("sl{tag}b")];
    let veth = [format!("sl{tag}va"), format!("sl{tag}vb")];
    let subnet = format!("10.231.{}", tag % 250);
    ip(&["netns", "add", &names[0]])?;
    let hosts = Hosts {
        names: names.clone(),
        first_addr: format!("{subnet}.1"),
    };
    ip(&["netns", "add", &names[1]])?;
    ip(&[
        "link", "add", &veth[0], "type", "veth", "peer", "name", &veth[1],
    ])?;
    let mut delay = true;
    for i in 0..2 {
        ip(&["link", "set", &veth[i], "netns", &names[i]])?;
        let addr = format!("{subnet}.{}/24", i + 1);
        ip(&["-n", &names[i], "addr", "add", &addr, "dev", &veth[i]])?;
        ip(&["-n", &names[i], "link", "set", &veth[i], "up"])?;
        ip(&["-n", &names[i], "link", "set", "lo", "up"])?;
        let netem = Command::new("ip")
            .args([
                "netns", "exec", &names[i], "tc", "qdisc", "add", "dev", &veth[i],
            ])
            .args(["root", "netem", "delay", "2ms"])
            .output();
        delay &= netem.is_ok_and(|o| o.status.success());
    }
    Ok((hosts, delay))
}

/// The children (ranks) of process `pid`, with their SHARDLINE_RANK.
pub fn ranks_of(pid: u32) -> Vec<(u32, usize)> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .filter_map(|c| {
            let env = std::fs::read(format!("/proc/{c}/environ")).ok()?;
            let rank = env
                .split(|b| *b == 0)
                .find_map(|kv| kv.strip_prefix(b"SHARDLINE_RANK="))?;
            Some((c, std::str::from_utf8(rank).ok()?.parse().ok()?))
        })
        .collect()
}
