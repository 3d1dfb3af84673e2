//! Ranks on two "hosts": network namespaces joined by a veth pair, talking over tcp (with
//! `tc netem` delay on the link where the kernel has it). `verify` must still match the
//! reference. Needs root and iproute2; where namespaces cannot be made, the test says so and
//! does not run.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::common;
use common::make_hosts;

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
    let coordinator = format!("{}:29500", hosts.first_addr);
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
