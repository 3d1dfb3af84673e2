//! `shardline launch`: starts a job's ranks on several hosts over ssh, with the `SHARDLINE_*`
//! environment and a fresh job token, shows rank 0's output, and fails (naming the rank) when
//! any rank fails. Ctrl-C reaches the ssh clients (same process group), which end their remote
//! commands.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;

use crate::dist::{self, JobEnv};

#[derive(clap::Args)]
pub struct LaunchArgs {
    /// Hosts to run on, comma-separated (as ssh reaches them).
    #[arg(
        long,
        env = "SHARDLINE_HOSTS",
        value_delimiter = ',',
        conflicts_with = "hostfile"
    )]
    hosts: Vec<String>,
    /// A file with one host per line (blank lines and `#` comments ignored).
    #[arg(long, env = "SHARDLINE_HOSTFILE")]
    hostfile: Option<PathBuf>,
    /// Ranks on each host (ranks are numbered host by host).
    #[arg(long, default_value_t = 1, env = "SHARDLINE_RANKS_PER_HOST")]
    ranks_per_host: usize,
    /// Where rank 0 listens, host:port, reachable from every host (default: the first host,
    /// port 29500).
    #[arg(long, env = "SHARDLINE_COORDINATOR")]
    coordinator: Option<String>,
    /// Transport between ranks: auto (shm within a host, tcp across), shm, tcp or ucx.
    #[arg(long, default_value = "auto", env = "SHARDLINE_TRANSPORT")]
    transport: String,
    /// Path of the shardline binary on the hosts (default: this binary's path).
    #[arg(long, env = "SHARDLINE_REMOTE_BIN")]
    remote_bin: Option<String>,
    /// How to run a command on a host: this program, then the host, then the command line.
    #[arg(long, default_value = "ssh -o BatchMode=yes", env = "SHARDLINE_SSH")]
    ssh: String,
    /// The shardline command every rank runs, after `--` (e.g. `-- verify --model DIR --tp 4`).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// `word` quoted for a POSIX shell.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn hosts(args: &LaunchArgs) -> anyhow::Result<Vec<String>> {
    let hosts: Vec<String> = match &args.hostfile {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the hostfile {}", path.display()))?
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
            .filter(|l| !l.is_empty())
            .collect(),
        None => args.hosts.iter().map(|h| h.trim().to_string()).collect(),
    };
    anyhow::ensure!(
        !hosts.is_empty() && hosts.iter().all(|h| !h.is_empty()),
        "give the hosts with --hosts a,b or --hostfile FILE"
    );
    anyhow::ensure!(
        args.ranks_per_host > 0,
        "--ranks-per-host must be at least 1"
    );
    Ok(hosts)
}

pub fn run(args: LaunchArgs) -> anyhow::Result<()> {
    let hosts = hosts(&args)?;
    let world = hosts.len() * args.ranks_per_host;
    let coordinator = args
        .coordinator
        .clone()
        .unwrap_or_else(|| format!("{}:29500", hosts[0]));
    let bin = match &args.remote_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .context("cannot find this program's path for the hosts")?
            .display()
            .to_string(),
    };
    let mut ssh = args.ssh.split_whitespace();
    let ssh_program = ssh.next().context("--ssh is empty")?.to_string();
    let ssh_args: Vec<&str> = ssh.collect();
    let job = JobEnv::new(world, coordinator, &args.transport);
    let command: Vec<String> = args.command.iter().map(|w| quote(w)).collect();
    dist::start_ranks(world, |rank| {
        let env: Vec<String> = job
            .vars(rank)
            .iter()
            .map(|(k, v)| format!("{k}={}", quote(v)))
            .collect();
        let line = format!(
            "env {} {} {}",
            env.join(" "),
            quote(&bin),
            command.join(" ")
        );
        let mut c = Command::new(&ssh_program);
        c.args(&ssh_args)
            .arg(&hosts[rank / args.ranks_per_host])
            .arg(line);
        c
    })
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn quoting_survives_the_shell() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
