//! `shardline launch`: starts a job's ranks on several hosts over ssh, with the `SHARDLINE_*`
//! environment and a fresh job token, shows rank 0's output, and fails (naming the rank) when
//! any rank fails.
//!
//! Each rank is `ssh [OPTIONS] -- HOST 'sh -s'`, and the launcher writes the rank's script on the
//! ssh client's standard input: `export` lines with its `SHARDLINE_*` variables (the job token
//! among them, so it never shows in `ps` on this host or the remote one), then `exec` of the
//! shardline binary. The pipe stays open and nothing more is sent on it: the remote rank, told so
//! by `SHARDLINE_WATCH_STDIN=1`, exits when its standard input ends, which happens when its ssh
//! connection drops (the ssh client or the launcher dies, or the network goes). No pseudo-terminal
//! is needed for that (`ssh -tt` would mangle the output and SIGHUP is not sent without one). The
//! ssh clients are ranks of [`dist::start_ranks`]: they die with the launcher, and SIGINT or
//! SIGTERM to the launcher is passed on to them.

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
    /// How to run a command on a host: this program and its options; `launch` adds `--`, the
    /// host and `sh -s`, and writes the rank's script on its standard input.
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
    dist::start_ranks(world, |rank| {
        let mut c = Command::new(&ssh_program);
        c.args(&ssh_args)
            .arg("--")
            .arg(&hosts[rank / args.ranks_per_host])
            .arg("sh -s");
        dist::RankCommand {
            command: c,
            stdin: Some(script(&job.vars(rank), &bin, &args.command)),
        }
    })
}

/// The script a remote `sh -s` runs for one rank: its variables, then the shardline binary in
/// the shell's place (so that it inherits the ssh connection as its standard input).
fn script(vars: &[(&str, String)], bin: &str, command: &[String]) -> String {
    let mut out = String::from("export");
    for (k, v) in vars {
        out.push_str(&format!(" {k}={}", quote(v)));
    }
    out.push_str(&format!(" {}=1\nexec {}", dist::WATCH_STDIN, quote(bin)));
    for w in command {
        out.push(' ');
        out.push_str(&quote(w));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::{quote, script};

    #[test]
    fn quoting_survives_the_shell() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn a_script_sets_the_variables_then_runs_the_binary_in_the_shells_place() {
        let vars = [
            ("SHARDLINE_RANK", "1".to_string()),
            ("SHARDLINE_JOB_TOKEN", "s3cr'et".to_string()),
        ];
        let text = script(
            &vars,
            "/opt/shard line",
            &["run".into(), "-p".into(), "a b".into()],
        );
        assert_eq!(
            text,
            "export SHARDLINE_RANK='1' SHARDLINE_JOB_TOKEN='s3cr'\\''et' SHARDLINE_WATCH_STDIN=1\n\
             exec '/opt/shard line' 'run' '-p' 'a b'\n"
        );
        let out = std::process::Command::new("sh")
            .args([
                "-c",
                &text.replace(
                    "exec '/opt/shard line'",
                    "printenv SHARDLINE_JOB_TOKEN; echo",
                ),
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "s3cr'et\nrun -p a b\n"
        );
    }
}
