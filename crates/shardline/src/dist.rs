//! Running a command over several ranks: the parallel flags, the local launcher (the same binary
//! once per rank on this host, with the `SHARDLINE_*` environment), and the model's all-reduce
//! through a `shardline-comm` group.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use half::{bf16, f16};
use shardline_comm::{Elem, Group, ReduceOp};
use shardline_model::{ModelError, Pending, Plan, Reduce, SumDType};

use crate::engine::{CommTime, ReduceDType};
use crate::gpu_comm::GpuComm;

/// How a command is split over ranks.
#[derive(clap::Args, Clone, Debug)]
pub struct ParallelArgs {
    /// Ranks: attention heads and dense FFNs are split over them (tensor parallelism). With
    /// `--ep E` alone the rank count is E.
    #[arg(long, env = "SHARDLINE_TP")]
    pub tp: Option<usize>,
    /// Expert groups: the experts are split into E groups, each sharded over tp/E ranks.
    #[arg(long, env = "SHARDLINE_EP")]
    pub ep: Option<usize>,
    /// How ranks on this host talk: shm, tcp or ucx (a build with `--features ucx`).
    #[arg(long, default_value = "shm", env = "SHARDLINE_TRANSPORT")]
    pub transport: String,
    /// With --device cuda, how the segments' partial sums are summed across ranks: nccl (on the
    /// GPUs, NCCL on the stream; each rank needs a GPU of its own), host (copied to the host and
    /// all-reduced over --transport), or auto (nccl when there are several ranks, libnccl loads on
    /// every rank and no two ranks share a GPU; host otherwise). Ranks on one host take GPU
    /// (local rank % GPUs there). NCCL is found as libnccl.so.2 or libnccl.so on
    /// LD_LIBRARY_PATH, or at SHARDLINE_NCCL_LIB.
    #[arg(long, value_enum, default_value_t = GpuComm::Auto, env = "SHARDLINE_GPU_COMM")]
    pub gpu_comm: GpuComm,
    /// The type the segments' partial sums travel in between ranks: f32 (never rounded; the
    /// default, within verify's tolerances) or model (bf16 or f16 for a bf16 or f16 model, half
    /// the bytes of f32, the additions done in f32; the rounding moves logits by up to about 2e-2
    /// of a bf16 fixture's, see fixtures/README.md). Where ranks are told differently, rank 0's
    /// choice holds.
    #[arg(long, value_enum, default_value_t = ReduceDType::F32, env = "SHARDLINE_REDUCE_DTYPE")]
    pub reduce_dtype: ReduceDType,
    /// CPU worker threads of each rank (default: the cores, shared out among the ranks this
    /// host starts).
    #[arg(short = 't', long, env = "SHARDLINE_THREADS")]
    pub threads: Option<usize>,
}

impl ParallelArgs {
    pub fn world(&self) -> usize {
        self.tp.or(self.ep).unwrap_or(1)
    }

    pub fn ep(&self) -> usize {
        self.ep.unwrap_or(1)
    }
}

/// What this process is in a (possibly) multi-rank job.
pub enum Role {
    /// The whole job in this process.
    Single,
    /// This process starts the ranks and waits for them.
    Launcher,
    /// One rank of a job, joined to the others.
    Rank { group: Group, plan: Plan },
}

/// Set by `shardline launch` for the ranks it starts over ssh: the rank exits when its standard
/// input ends, that is when its ssh connection (and so the launcher) is gone.
pub const WATCH_STDIN: &str = "SHARDLINE_WATCH_STDIN";

/// With [`WATCH_STDIN`] set, a thread that waits for the end of standard input (nothing is ever
/// sent on it) and then ends this process.
fn watch_stdin() -> anyhow::Result<()> {
    if std::env::var_os(WATCH_STDIN).is_none() {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("launcher-watch".into())
        .spawn(|| {
            let mut buf = [0u8; 512];
            loop {
                // SAFETY: reads into a live buffer of the length given.
                let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
                if n > 0 {
                    continue;
                }
                if n < 0
                    && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                {
                    continue;
                }
                break;
            }
            // Not through `tracing`: with the launcher gone stderr is likely a broken pipe, and
            // a failed write there must not stop this thread before it ends the process.
            let _ = writeln!(
                std::io::stderr(),
                "the launcher's connection closed; this rank stops"
            );
            std::process::exit(1);
        })
        .context("cannot start the thread that watches the launcher")?;
    Ok(())
}

/// Whether this process was started as a rank (by the launcher, mpirun or srun).
fn started_as_rank() -> bool {
    [
        "SHARDLINE_RANK",
        "OMPI_COMM_WORLD_RANK",
        "PMI_RANK",
        "SLURM_PROCID",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

/// This process's role; a rank joins its group here (the plan is checked by the loader before
/// any weight is read).
pub fn role(p: &ParallelArgs) -> anyhow::Result<Role> {
    if let Some(threads) = p.threads {
        anyhow::ensure!(threads > 0, "--threads must be at least 1");
        shardline_tensor::pool::init(threads)?;
    }
    let ep = p.ep();
    if started_as_rank() {
        watch_stdin()?;
        let group = Group::from_env().context("cannot join the job's ranks")?;
        if let Some(tp) = p.tp {
            anyhow::ensure!(
                tp == group.size(),
                "--tp {tp} asks for {tp} ranks, but this job has {} (SHARDLINE_WORLD_SIZE; \
                 `launch` starts --ranks-per-host ranks on each host)",
                group.size()
            );
        }
        let plan = Plan::new(group.size(), ep, group.rank())?;
        return Ok(Role::Rank { group, plan });
    }
    let world = p.world();
    Plan::new(world, ep, 0)?;
    Ok(if world == 1 {
        Role::Single
    } else {
        Role::Launcher
    })
}

/// The model's collectives over the group: the segments' sum all-reduce, the logits' all-gather,
/// and expert dispatch's all-to-all(v), on the group's progress thread. The time of the
/// all-reduces and all-gathers adds up in a [`CommTime`].
pub struct GroupReduce {
    group: Arc<Group>,
    time: CommTime,
}

impl GroupReduce {
    pub fn new(group: Arc<Group>, time: CommTime) -> GroupReduce {
        GroupReduce { group, time }
    }
}

impl Reduce for GroupReduce {
    fn world(&self) -> usize {
        self.group.size()
    }

    fn rank(&self) -> usize {
        self.group.rank()
    }

    fn all_reduce_sum(&mut self, x: &mut [f32], dtype: SumDType) -> shardline_model::Result<()> {
        let group = &self.group;
        self.time
            .add(|| match dtype {
                SumDType::F32 => group.all_reduce(x, ReduceOp::Sum),
                SumDType::BF16 => all_reduce_as::<bf16>(group, x),
                SumDType::F16 => all_reduce_as::<f16>(group, x),
            })
            .map_err(|e| collective("all-reduce", self.group.rank(), e))
    }

    fn barrier(&mut self) -> shardline_model::Result<()> {
        self.group
            .barrier()
            .map_err(|e| collective("barrier", self.group.rank(), e))
    }

    fn broadcast_u32(&mut self, buf: &mut [u32]) -> shardline_model::Result<()> {
        // The collectives move f32s; a broadcast only copies them, so the bits come through.
        let mut words: Vec<f32> = buf.iter().map(|&w| f32::from_bits(w)).collect();
        self.group
            .broadcast(&mut words, 0)
            .map_err(|e| collective("broadcast", self.group.rank(), e))?;
        for (b, w) in buf.iter_mut().zip(words) {
            *b = w.to_bits();
        }
        Ok(())
    }

    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> shardline_model::Result<()> {
        self.time
            .add(|| self.group.all_gather(local, out))
            .map_err(|e| collective("all-gather", self.group.rank(), e))
    }

    fn all_to_all_v(
        &mut self,
        send: Vec<f32>,
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> shardline_model::Result<Pending> {
        let rank = self.group.rank();
        let handle = self
            .group
            .all_to_all_v_async(send, send_counts, recv_counts);
        Ok(Pending::new(move || {
            handle.wait().map_err(|e| collective("all-to-all", rank, e))
        }))
    }
}

/// Sums `x` over the group as `T`: rounded to it, all-reduced (the collective adds in f32 and
/// rounds each sum once) and widened back into `x`.
fn all_reduce_as<T: Elem>(group: &Group, x: &mut [f32]) -> shardline_comm::Result<()> {
    let mut buf: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
    group.all_reduce(&mut buf, ReduceOp::Sum)?;
    for (o, v) in x.iter_mut().zip(buf) {
        *o = v.to_f32();
    }
    Ok(())
}

/// A collective's failure, keeping the transport's error as its source.
fn collective(
    op: &'static str,
    rank: usize,
    e: impl std::error::Error + Send + Sync + 'static,
) -> ModelError {
    ModelError::Collective {
        op,
        rank,
        source: Box::new(e),
    }
}

/// How long the launcher lets the other ranks notice a dead one before it kills them.
const GRACE: Duration = Duration::from_secs(5);

/// Checks the plan of `p` against `spec` once, here (so a plan that cannot work is refused before
/// any rank starts), then starts the ranks on this host with [`launch_local`].
pub fn launch_local_checked(
    p: &ParallelArgs,
    spec: &shardline_model::ModelSpec,
) -> anyhow::Result<()> {
    Plan::new(p.world(), p.ep(), 0)?.check(spec)?;
    launch_local(p.world(), &p.transport)
}

/// Starts `world` ranks of this binary with the same arguments on this host and waits for them.
/// Each rank gets an equal share of the cores (`SHARDLINE_THREADS`, unless already set).
fn launch_local(world: usize, transport: &str) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find this program to start the ranks")?;
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("cannot find a free port for the coordinator")?
        .port();
    let job = JobEnv::new(world, format!("127.0.0.1:{port}"), transport);
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The ranks share this host's cores unless told otherwise.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads =
        std::env::var("SHARDLINE_THREADS").unwrap_or_else(|_| (cores / world).max(1).to_string());
    start_ranks(world, |rank| {
        let mut c = Command::new(&exe);
        c.args(&args).env("SHARDLINE_THREADS", &threads);
        for (k, v) in job.vars(rank) {
            c.env(k, v);
        }
        RankCommand {
            command: c,
            stdin: None,
        }
    })
}

/// The `SHARDLINE_*` settings that make a process rank `rank` of a job.
pub struct JobEnv {
    world: usize,
    coordinator: String,
    token: String,
    transport: String,
}

impl JobEnv {
    /// A job of `world` ranks meeting at `coordinator`, with a fresh token.
    pub fn new(world: usize, coordinator: String, transport: &str) -> JobEnv {
        JobEnv {
            world,
            coordinator,
            token: format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
            transport: transport.to_string(),
        }
    }

    pub fn vars(&self, rank: usize) -> [(&'static str, String); 5] {
        [
            ("SHARDLINE_RANK", rank.to_string()),
            ("SHARDLINE_WORLD_SIZE", self.world.to_string()),
            ("SHARDLINE_COORDINATOR", self.coordinator.clone()),
            ("SHARDLINE_JOB_TOKEN", self.token.clone()),
            ("SHARDLINE_TRANSPORT", self.transport.clone()),
        ]
    }
}

/// How to start one rank: the command, and what to write on its standard input (which then stays
/// open, a pipe, until the rank exits or the launcher dies; without it, standard input is empty).
pub struct RankCommand {
    pub command: Command,
    pub stdin: Option<String>,
}

/// The signal (SIGINT or SIGTERM) the launcher got and has not passed on yet; 0 for none.
static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn note_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    SIGNALLED.store(sig, Ordering::Relaxed);
}

/// From now on SIGINT and SIGTERM are noted for [`wait_all`] to pass on to the ranks, instead of
/// ending the launcher.
fn catch_stop_signals() -> anyhow::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a handler that only stores to an atomic, an emptied mask
        // and SA_RESTART; installing it has no other effect on this process.
        let r = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = note_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot catch SIGINT and SIGTERM");
        }
    }
    Ok(())
}

/// Makes `c` start in process group `group` (a new one, led by this child, for 0) and die by
/// SIGKILL when the launcher dies, whatever ends it.
fn tie_to_launcher(c: &mut Command, group: i32) {
    let launcher = std::process::id() as libc::pid_t;
    c.process_group(group);
    // SAFETY: runs in the child between fork and exec and calls only prctl, getppid and raise,
    // which are async-signal-safe; it touches no memory of the parent. The parent-death signal
    // fires when the thread that spawned the child ends; the launcher spawns its ranks from the
    // thread that then waits for them, so it lasts as long as they do.
    unsafe {
        c.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher may have died before the signal was armed: then no one reaps us.
            if libc::getppid() != launcher {
                libc::raise(libc::SIGKILL);
            }
            Ok(())
        });
    }
}

/// Starts `world` processes (`command(rank)`) and waits for them: rank 0's output is shown, the
/// others' standard output is dropped. The ranks' log lines are passed on as they come; their
/// error reports are held back, so that a failed job is reported once, by the first rank that
/// failed ([`JobFailed`]). No rank is left running: the ranks share a process group of their
/// own and die with the launcher (a parent-death signal), SIGINT and SIGTERM to the launcher are
/// passed on to them (a second one kills them), and a rank that fails gives the others
/// [`GRACE`] before they are killed.
pub fn start_ranks(world: usize, command: impl Fn(usize) -> RankCommand) -> anyhow::Result<()> {
    catch_stop_signals()?;
    let mut children: Vec<Child> = Vec::with_capacity(world);
    let mut stdins: Vec<Option<ChildStdin>> = Vec::with_capacity(world);
    let mut relays = Vec::with_capacity(world);
    let mut group = 0;
    for rank in 0..world {
        let RankCommand { mut command, stdin } = command(rank);
        tie_to_launcher(&mut command, group);
        let child = command
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(if rank == 0 {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped())
            .spawn();
        match child {
            Ok(mut c) => {
                if group == 0 {
                    group = c.id() as i32;
                }
                relays.push(c.stderr.take().map(relay_stderr));
                let mut pipe = c.stdin.take();
                if let (Some(p), Some(text)) = (pipe.as_mut(), &stdin) {
                    // A rank that is already gone shows in its exit status.
                    let _ = p.write_all(text.as_bytes()).and_then(|_| p.flush());
                }
                stdins.push(pipe);
                children.push(c);
            }
            Err(e) => {
                kill_all(&mut children);
                return Err(e).context(format!("cannot start rank {rank}"));
            }
        }
    }
    let outcome = wait_all(children, group, stdins);
    // Every rank has exited (or was killed), so its pipe is closed and its relay ends.
    let reports: Vec<Vec<String>> = relays
        .into_iter()
        .map(|r| r.and_then(|h| h.join().ok()).unwrap_or_default())
        .collect();
    let Outcome {
        mut failed,
        stopped_by,
        all_succeeded,
    } = outcome?;
    if let Some(sig) = stopped_by.filter(|_| !all_succeeded) {
        anyhow::bail!("stopped by {} (passed on to the ranks)", signal_name(sig));
    }
    order_failures(&mut failed, &reports);
    match failed.split_first() {
        None => Ok(()),
        Some((first, later)) => Err(JobFailed {
            rank: first.rank,
            status: first.status.clone(),
            report: reports[first.rank].clone(),
            others: later
                .iter()
                .filter_map(|f| Some((f.rank, summary(&reports[f.rank])?)))
                .collect(),
        }
        .into()),
    }
}

/// Puts failed ranks in the order that says what happened: a rank whose report says it lost
/// another rank that failed failed because of it, so it goes after every rank that lost no
/// failed peer; otherwise, the order in which the launcher saw them end. (That order alone is
/// not enough: it looks every few milliseconds, and a rank that closed its connections on
/// failing may take longer to exit than the peer that noticed.)
fn order_failures(failed: &mut [Failed], reports: &[Vec<String>]) {
    let lost = |rank: usize, other: usize| {
        let (gone, silent) = (
            format!("peer rank {other} is gone"),
            format!("rank {other} sent nothing"),
        );
        reports[rank]
            .iter()
            .any(|l| l.contains(&gone) || l.contains(&silent))
    };
    let ranks: Vec<usize> = failed.iter().map(|f| f.rank).collect();
    failed.sort_by_key(|f| {
        let consequence = ranks.iter().any(|&o| o != f.rank && lost(f.rank, o));
        (consequence, f.look)
    });
}

/// A rank's report in one line: its headline, and its innermost cause when there is one (the
/// cause is where a survivor names the peer it lost).
fn summary(report: &[String]) -> Option<String> {
    let headline = report.first()?;
    Some(match report.last() {
        Some(root) if report.len() > 1 => format!("{headline}: {root}"),
        _ => headline.clone(),
    })
}

/// A failed job: the rank that failed first (by time), how it ended and the error it reported
/// (headline, then causes); and a line from each rank that failed after it.
#[derive(Debug)]
pub struct JobFailed {
    pub rank: usize,
    pub status: String,
    pub report: Vec<String>,
    pub others: Vec<(usize, String)>,
}

impl std::fmt::Display for JobFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.report.first() {
            Some(headline) => write!(f, "rank {} failed: {headline}", self.rank),
            None => write!(f, "rank {} failed ({})", self.rank, self.status),
        }
    }
}

impl std::error::Error for JobFailed {}

impl JobFailed {
    /// The report's lines after the headline: the first rank's causes, then what the others said.
    pub fn detail_lines(&self) -> Vec<String> {
        let causes = self
            .report
            .iter()
            .skip(1)
            .map(|c| format!("  caused by: {c}"));
        let others = self
            .others
            .iter()
            .map(|(r, h)| format!("  then rank {r} failed: {h}"));
        causes.chain(others).collect()
    }
}

/// Passes a rank's stderr on line by line, keeping back its error report (`error: ...` and the
/// `caused by: ...` lines under it, as [`crate::log`] prints them), which it returns without
/// their prefixes.
fn relay_stderr(pipe: std::process::ChildStderr) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut report = Vec::new();
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let body = strip_rank_prefix(&line);
            if let Some(headline) = body.strip_prefix("error: ") {
                if report.is_empty() {
                    report.push(headline.to_string());
                    continue;
                }
            } else if let Some(cause) = body.strip_prefix("  caused by: ") {
                if !report.is_empty() {
                    report.push(cause.to_string());
                    continue;
                }
            }
            eprintln!("{line}");
        }
        report
    })
}

/// `line` without the `rank N: ` that a rank of several puts before its lines.
fn strip_rank_prefix(line: &str) -> &str {
    line.strip_prefix("rank ")
        .and_then(|rest| rest.split_once(": "))
        .filter(|(n, _)| n.parse::<usize>().is_ok())
        .map_or(line, |(_, body)| body)
}

/// Whether local process `pid` is stopped (SIGSTOP, or traced), as /proc says; a rank on another
/// host (an ssh client here) is not.
fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which is in parentheses and may hold spaces.
        stat.rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state == "T" || state == "t")
    })
}

fn kill_all(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// Sends `sig` to the ranks' process group, or to each rank still running if that fails.
fn signal_ranks(
    children: &[Child],
    status: &[Option<std::process::ExitStatus>],
    group: i32,
    sig: i32,
) {
    // SAFETY: kill(2) on the process group this launcher made for its ranks.
    if group > 0 && unsafe { libc::kill(-group, sig) } == 0 {
        return;
    }
    for (c, s) in children.iter().zip(status) {
        if s.is_none() {
            // SAFETY: kill(2) on a child not yet reaped (so its pid is still its own).
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
        }
    }
}

/// A rank that failed: how it ended, and in which of the launcher's looks at its ranks it was
/// seen to have ended.
#[derive(Clone)]
struct Failed {
    rank: usize,
    look: u64,
    status: String,
}

/// How the ranks of a job ended.
struct Outcome {
    /// The ranks that failed, in the order they were seen to.
    failed: Vec<Failed>,
    /// The signal that stopped the job (passed on to the ranks), if one did.
    stopped_by: Option<i32>,
    /// Whether every rank exited with success (none was killed).
    all_succeeded: bool,
}

/// Waits for every rank; after the first failure the others get [`GRACE`] to exit on their own.
/// A SIGINT or SIGTERM to the launcher is passed on to the ranks (a second one kills them);
/// A rank's standard input is closed once it has exited.
fn wait_all(
    mut children: Vec<Child>,
    group: i32,
    mut stdins: Vec<Option<ChildStdin>>,
) -> anyhow::Result<Outcome> {
    let mut status: Vec<Option<std::process::ExitStatus>> = vec![None; children.len()];
    let mut failed: Vec<(usize, u64)> = Vec::new();
    let mut looks = 0u64;
    let mut first_failure: Option<Instant> = None;
    let mut stopped_by: Option<i32> = None;
    loop {
        looks += 1;
        for (rank, c) in children.iter_mut().enumerate() {
            if status[rank].is_none() {
                if let Some(s) = c.try_wait().context("cannot wait for a rank")? {
                    if !s.success() {
                        failed.push((rank, looks));
                        first_failure.get_or_insert_with(Instant::now);
                    }
                    status[rank] = Some(s);
                    stdins[rank] = None;
                }
            }
        }
        if status.iter().all(Option::is_some) {
            break;
        }
        let sig = SIGNALLED.swap(0, Ordering::Relaxed);
        if sig != 0 {
            if stopped_by.is_none() {
                tracing::warn!(
                    "{} received: passing it on to the ranks (again to kill them)",
                    signal_name(sig)
                );
                stopped_by = Some(sig);
                signal_ranks(&children, &status, group, sig);
            } else {
                signal_ranks(&children, &status, group, libc::SIGKILL);
                kill_all(&mut children);
                break;
            }
        }
        // A stopped rank will report nothing: waiting out the grace for it only delays the end.
        let rest_stopped = children
            .iter()
            .zip(&status)
            .filter(|(_, s)| s.is_none())
            .all(|(c, _)| is_stopped(c.id()));
        if first_failure.is_some_and(|since| since.elapsed() > GRACE || rest_stopped) {
            signal_ranks(&children, &status, group, libc::SIGKILL);
            kill_all(&mut children);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Outcome {
        failed: failed
            .into_iter()
            .map(|(rank, look)| Failed {
                rank,
                look,
                status: status[rank].map_or("killed".to_string(), |s| s.to_string()),
            })
            .collect(),
        stopped_by,
        all_succeeded: status.iter().all(|s| s.is_some_and(|s| s.success())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use shardline_comm::{Config, TransportChoice};

    #[test]
    fn group_sums_travel_in_the_type_asked_for() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .to_string();
        // Each pair's f32 sum: 1 + 2^-9, 300.5, 1 + 2^-12. In bf16 (8 significant bits) the first
        // rank's 1 + 2^-10 is 1, 300.5 lies half way between 300 and 302 and goes to the even 300,
        // and 1 + 2^-12 is 1; f16 (11 bits) holds the first two exactly but not the third.
        let parts = [
            [1.0 + 2f32.powi(-10), 300.0, 1.0 + 2f32.powi(-12)],
            [2f32.powi(-10), 0.5, 0.0],
        ];
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                let mut c = Config::new(rank, 2, addr.clone(), "reduce-dtype-test");
                c.timeout = Duration::from_secs(20);
                c.transport = TransportChoice::Tcp;
                std::thread::spawn(move || {
                    let group = Arc::new(Group::init(&c).unwrap());
                    let mut reduce = GroupReduce::new(group, CommTime::default());
                    [SumDType::F32, SumDType::BF16, SumDType::F16].map(|dtype| {
                        let mut x = parts[rank];
                        reduce.all_reduce_sum(&mut x, dtype).unwrap();
                        x
                    })
                })
            })
            .collect();
        let (f32_sum, bf16_sum, f16_sum) = (1.0 + 2f32.powi(-9), 1.0, 1.0 + 2f32.powi(-9));
        for rank in ranks {
            let [in_f32, in_bf16, in_f16] = rank.join().unwrap();
            assert_eq!(in_f32, [f32_sum, 300.5, 1.0 + 2f32.powi(-12)]);
            assert_eq!(in_bf16, [bf16_sum, 300.0, 1.0]);
            assert_eq!(in_f16, [f16_sum, 300.5, 1.0]);
        }
    }

    #[test]
    fn rank_prefix_is_taken_off_only_when_it_is_one() {
        assert_eq!(strip_rank_prefix("rank 3: error: x"), "error: x");
        assert_eq!(strip_rank_prefix("error: x"), "error: x");
        assert_eq!(strip_rank_prefix("rank x: y"), "rank x: y");
    }

    #[test]
    fn a_failed_job_reports_the_first_rank_then_the_others() {
        let job = JobFailed {
            rank: 1,
            status: "exit status: 1".into(),
            report: vec!["cannot load the model".into(), "no such file".into()],
            others: vec![(0, "peer rank 1 is gone".into())],
        };
        assert_eq!(job.to_string(), "rank 1 failed: cannot load the model");
        assert_eq!(
            job.detail_lines(),
            [
                "  caused by: no such file",
                "  then rank 0 failed: peer rank 1 is gone"
            ]
        );
        let killed = JobFailed {
            report: vec![],
            status: "signal: 9 (SIGKILL)".into(),
            ..job
        };
        assert_eq!(killed.to_string(), "rank 1 failed (signal: 9 (SIGKILL))");
    }
}
