//! Ranks on two "hosts": network namespaces joined by a veth pair, talking over tcp (with
//! `tc netem` delay on the link where the kernel has it). `verify` must still match the
//! reference. Needs root and iproute2; where namespaces cannot be made, the test says so and
//! does not run.

use std::path::Path;
use std::process::{Command, Stdio};

/// Two namespaces and the veth pair between them, removed on drop.
struct Hosts {
    names: [String; 2],
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
fn make_hosts() -> Result<(Hosts, bool), String> {
    let tag = std::process::id() % 10_000;
    let names = [format!("sl{tag}a"), format!("sl{tag}b")];
    let veth = [format!("sl{tag}va"), format!("sl{tag}vb")];
    let subnet = format!("10.231.{}", tag % 250);
    ip(&["netns", "add", &names[0]])?;
    let hosts = Hosts {
        names: names.clone(),
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

#[test]
fn verify_over_tcp_between_two_network_namespaces() {
    let (hosts, delay) = match make_hosts() {
        Ok(h) => h,
        Err(why) => {
            eprintln!("SKIPPED verify_over_tcp_between_two_network_namespaces: {why}");
            return;
        }
    };
    if !delay {
        eprintln!("NOTE: this kernel has no netem qdisc; the link between the namespaces has no added delay");
    }
    let tag = std::process::id() % 10_000;
    let coordinator = format!("10.231.{}.1:29500", tag % 250);
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen2-moe-tiny");
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            Command::new("ip")
                .args(["netns", "exec", &hosts.names[rank]])
                .arg(env!("CARGO_BIN_EXE_shardline"))
                .args(["verify", "--model", model.to_str().unwrap(), "--tp", "2"])
                .env("SHARDLINE_RANK", rank.to_string())
                .env("SHARDLINE_WORLD_SIZE", "2")
                .env("SHARDLINE_COORDINATOR", &coordinator)
                .env("SHARDLINE_JOB_TOKEN", "netns-test")
                .env("SHARDLINE_TRANSPORT", "tcp")
                .env("SHARDLINE_TIMEOUT", "30")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = ranks
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for (rank, out) in outputs.iter().enumerate() {
        assert!(
            out.status.success(),
            "rank {rank}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(String::from_utf8_lossy(&outputs[0].stdout).contains("verify passed"));
}
