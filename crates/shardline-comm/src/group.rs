//! [`Group`]: the public face of the crate. It is formed by the bootstrap rendezvous (or split
//! from a parent), checks arguments, and runs the typed collectives on its engine. Sync calls run
//! on the caller's thread; `*_async` calls run in order on the group's progress thread and return
//! a [`Handle`]; a sync call first waits for the async ones before it, so every rank sees the same
//! order of collectives. With heartbeats on (`SHARDLINE_HEARTBEAT`), the progress thread starts
//! with the group and, while no collective runs, pulses them (see `heartbeat`): a peer that falls
//! silent breaks the group, and the next call, or [`Group::check`], fails naming it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bootstrap::rendezvous;
use crate::config::Config;
use crate::elem::{DType, Elem, ReduceOp};
use crate::engine::{Algo, Engine, Identity, Local};
use crate::error::{CommError, Result};
use crate::transport::take_u32;

type Job = Box<dyn FnOnce(&mut Engine) + Send>;

/// Per-rank byte counts of an all_to_all_v.
type ByteCounts = smallvec::SmallVec<[usize; 16]>;

/// A set of ranks that run collectives together.
pub struct Group {
    engine: Arc<Mutex<Engine>>,
    rank: usize,
    size: usize,
    timeout: Duration,
    worker: Mutex<Option<Worker>>,
    inflight: Arc<Inflight>,
    /// Why the group is unusable, once it is (the engine's poison).
    broken: Arc<OnceLock<String>>,
}

/// Count of async jobs not yet finished, and a way to wait for zero.
#[derive(Default)]
struct Inflight {
    count: AtomicUsize,
    lock: Mutex<()>,
    zero: Condvar,
}

struct Worker {
    jobs: mpsc::Sender<Job>,
    thread: JoinHandle<()>,
}

impl Worker {
    /// Starts the progress thread: it runs the queued jobs in order and, every `tick` that
    /// passes without one, pulses the heartbeats unless a collective holds the engine (which
    /// pulses them itself).
    fn spawn(engine: Arc<Mutex<Engine>>, tick: Option<Duration>) -> std::io::Result<Worker> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("shardline-comm-progress".into())
            .spawn(move || loop {
                let next = match tick {
                    Some(t) => queue.recv_timeout(t),
                    None => queue
                        .recv()
                        .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                };
                match next {
                    Ok(job) => job(&mut engine.lock().unwrap_or_else(|p| p.into_inner())),
                    Err(mpsc::RecvTimeoutError::Timeout) => match engine.try_lock() {
                        Ok(mut e) => e.idle_pulse(),
                        Err(TryLockError::Poisoned(p)) => p.into_inner().idle_pulse(),
                        Err(TryLockError::WouldBlock) => {}
                    },
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            })?;
        Ok(Worker { jobs, thread })
    }
}

/// The result of an async collective, available once the progress thread has run it.
pub struct Handle<T> {
    rx: mpsc::Receiver<Result<T>>,
    timeout: Duration,
}

impl<T> Handle<T> {
    /// Waits for the collective (bounded by the group's timeout plus the queue ahead of it).
    pub fn wait(self) -> Result<T> {
        self.rx
            .recv_timeout(self.timeout)
            .map_err(|_| CommError::Timeout {
                what: "waiting for an async collective".into(),
                secs: self.timeout.as_secs_f64(),
            })?
    }
}

fn bytes_of<T: Elem>(s: &[T]) -> &[u8] {
    bytemuck::cast_slice(s)
}

fn bytes_of_mut<T: Elem>(s: &mut [T]) -> &mut [u8] {
    bytemuck::cast_slice_mut(s)
}

impl Group {
    /// Joins the job described by `cfg` (rendezvous, then a connection to every peer).
    pub fn init(cfg: &Config) -> Result<Group> {
        cfg.validate()?;
        let listen = crate::bootstrap::listen_ip(cfg)?;
        crate::bootstrap::check_exposure(cfg, listen)?;
        let local = Local::bind(cfg.world_size, cfg.transport, listen)?;
        let table = rendezvous(cfg, local.endpoint(cfg.rank))?;
        let id = Identity {
            endpoints: table.endpoints,
            token: cfg.token.clone(),
            nonce: table.nonce,
            choice: cfg.transport,
            listen,
            liveness: cfg.liveness(),
        };
        let engine = Engine::connect(cfg.rank, local, id, cfg.timeout);
        drop(table.keep);
        Ok(Group::wrap(engine?))
    }

    /// [`Group::init`] with [`Config::from_env`].
    pub fn from_env() -> Result<Group> {
        Group::init(&Config::from_env()?)
    }

    fn wrap(engine: Engine) -> Group {
        let tick = engine.links.heart.tick().filter(|_| engine.size > 1);
        let group = Group {
            rank: engine.rank,
            size: engine.size,
            timeout: engine.links.timeout,
            broken: engine.poison(),
            engine: Arc::new(Mutex::new(engine)),
            worker: Mutex::new(None),
            inflight: Arc::default(),
        };
        if tick.is_some() {
            // Heartbeats go out while the rank is idle too: the progress thread starts now.
            match Worker::spawn(group.engine.clone(), tick) {
                Ok(w) => *group.worker.lock().unwrap_or_else(|p| p.into_inner()) = Some(w),
                Err(e) => tracing::warn!(
                    "cannot start the progress thread ({e}): no heartbeats while this rank is idle"
                ),
            }
        }
        group
    }

    /// Fails once the group is unusable: after a collective failed, or once a peer has been
    /// silent for the liveness budget (`SHARDLINE_HEARTBEAT`) while no collective ran, which the
    /// progress thread notices. It never waits: an idle rank (a server's between requests) can
    /// call it as often as it likes to learn that a peer is gone or stopped.
    pub fn check(&self) -> Result<()> {
        match self.broken.get() {
            Some(why) => Err(CommError::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    /// [`Group::check`] for a wait outside the group, such as a GPU stream's collectives between
    /// the same ranks: `None` while the group is usable, why once it is not (a peer silent for the
    /// liveness budget while the group is idle, which its progress thread notices). Never waits.
    pub fn watcher(&self) -> impl Fn() -> Option<String> + Send + Sync + 'static {
        let broken = Arc::clone(&self.broken);
        move || broken.get().cloned()
    }

    /// How long a collective may take before it fails (`SHARDLINE_TIMEOUT`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// This rank in the group, `0..size()`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks in the group.
    pub fn size(&self) -> usize {
        self.size
    }

    /// This rank's rank in the world group.
    pub fn world_rank(&self) -> usize {
        self.lock().world_rank()
    }

    fn lock(&self) -> MutexGuard<'_, Engine> {
        // A panic inside a collective leaves the engine consistent enough to report errors.
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for earlier async collectives, then runs `f` on this thread.
    fn sync<R>(&self, f: impl FnOnce(&mut Engine) -> Result<R>) -> Result<R> {
        if self.inflight.count.load(Ordering::Acquire) != 0 {
            let deadline = Instant::now() + self.timeout;
            let mut g = self.inflight.lock.lock().unwrap_or_else(|p| p.into_inner());
            while self.inflight.count.load(Ordering::Acquire) != 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(CommError::Timeout {
                        what: "waiting for earlier async collectives".into(),
                        secs: self.timeout.as_secs_f64(),
                    });
                }
                g = self
                    .inflight
                    .zero
                    .wait_timeout(g, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        self.lock().guarded(f)
    }

    fn check_peer(&self, what: &str, peer: usize) -> Result<()> {
        if peer >= self.size || peer == self.rank {
            return Err(CommError::InvalidArgument(format!(
                "{what}: peer {peer} is not another rank of this group of {}",
                self.size
            )));
        }
        Ok(())
    }

    /// In-place all-reduce of `buf` over the group.
    pub fn all_reduce<T: Elem>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.sync(|e| e.all_reduce(bytes_of_mut(buf), T::DTYPE, op, None))
    }

    /// [`Group::all_reduce`] with a fixed algorithm (tests and benchmarks).
    pub fn all_reduce_with<T: Elem>(&self, buf: &mut [T], op: ReduceOp, algo: Algo) -> Result<()> {
        self.sync(|e| e.all_reduce(bytes_of_mut(buf), T::DTYPE, op, Some(algo)))
    }

    /// `output` (size × `input.len()`) = every rank's `input` in rank order.
    pub fn all_gather<T: Elem>(&self, input: &[T], output: &mut [T]) -> Result<()> {
        if output.len() != input.len() * self.size {
            return Err(CommError::InvalidArgument(format!(
                "all_gather: output has {} elements, expected {} ({} ranks × {})",
                output.len(),
                input.len() * self.size,
                self.size,
                input.len()
            )));
        }
        self.sync(|e| e.all_gather(bytes_of(input), bytes_of_mut(output), T::DTYPE))
    }

    /// `output` = op over ranks of block `rank` of `input` (size × `output.len()` elements).
    pub fn reduce_scatter<T: Elem>(
        &self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        if input.len() != output.len() * self.size {
            return Err(CommError::InvalidArgument(format!(
                "reduce_scatter: input has {} elements, expected {} ({} ranks × {})",
                input.len(),
                output.len() * self.size,
                self.size,
                output.len()
            )));
        }
        self.sync(|e| e.reduce_scatter(bytes_of(input), bytes_of_mut(output), T::DTYPE, op))
    }

    /// Every rank's `buf` = rank `root`'s.
    pub fn broadcast<T: Elem>(&self, buf: &mut [T], root: usize) -> Result<()> {
        if root >= self.size {
            return Err(CommError::InvalidArgument(format!(
                "broadcast: root {root} is not in this group of {}",
                self.size
            )));
        }
        self.sync(|e| e.broadcast(bytes_of_mut(buf), root, T::DTYPE))
    }

    /// Block p (of `input.len() / size` elements) goes to rank p; block p of `output` comes from it.
    pub fn all_to_all<T: Elem>(&self, input: &[T], output: &mut [T]) -> Result<()> {
        if !input.len().is_multiple_of(self.size) || output.len() != input.len() {
            return Err(CommError::InvalidArgument(format!(
                "all_to_all: {} input and {} output elements must be equal and divisible by {} ranks",
                input.len(), output.len(), self.size
            )));
        }
        let counts = vec![input.len() / self.size; self.size];
        self.all_to_all_v(input, &counts, output, &counts)
    }

    /// `send_counts[p]` elements (consecutive in `input`) go to rank p; `recv_counts[p]` elements
    /// come from rank p into consecutive blocks of `output`.
    pub fn all_to_all_v<T: Elem>(
        &self,
        input: &[T],
        send_counts: &[usize],
        output: &mut [T],
        recv_counts: &[usize],
    ) -> Result<()> {
        let (s, r) =
            self.v_byte_counts::<T>(input.len(), send_counts, output.len(), recv_counts)?;
        self.sync(|e| e.all_to_all_v(bytes_of(input), &s, bytes_of_mut(output), &r, T::DTYPE))
    }

    /// The byte counts of an all_to_all_v, once the element counts are checked against the
    /// group and the buffers.
    fn v_byte_counts<T: Elem>(
        &self,
        input: usize,
        send_counts: &[usize],
        output: usize,
        recv_counts: &[usize],
    ) -> Result<(ByteCounts, ByteCounts)> {
        let ok = send_counts.len() == self.size
            && recv_counts.len() == self.size
            && send_counts.iter().sum::<usize>() == input
            && recv_counts.iter().sum::<usize>() == output;
        if !ok {
            return Err(CommError::InvalidArgument(format!(
                "all_to_all_v: counts must have one entry per rank ({}) and add up to the buffers \
                 ({input} sent, {output} received)",
                self.size,
            )));
        }
        let esize = T::DTYPE.size();
        let to_bytes = |c: &[usize]| c.iter().map(|&n| n * esize).collect::<ByteCounts>();
        Ok((to_bytes(send_counts), to_bytes(recv_counts)))
    }

    /// Returns once every rank of the group has called it.
    pub fn barrier(&self) -> Result<()> {
        self.sync(|e| e.barrier())
    }

    /// Sends `data` to `peer`; its `recv` must use the same `tag` and length.
    pub fn send<T: Elem>(&self, peer: usize, data: &[T], tag: u32) -> Result<()> {
        self.check_peer("send", peer)?;
        self.sync(|e| e.send_recv(Some((peer, bytes_of(data))), None, T::DTYPE, tag))
    }

    /// Receives exactly `buf.len()` elements from `peer`.
    pub fn recv<T: Elem>(&self, peer: usize, buf: &mut [T], tag: u32) -> Result<()> {
        self.check_peer("recv", peer)?;
        self.sync(|e| e.send_recv(None, Some((peer, bytes_of_mut(buf))), T::DTYPE, tag))
    }

    /// Sends to `dst` and receives from `src` at the same time.
    pub fn send_recv<T: Elem>(
        &self,
        dst: usize,
        data: &[T],
        src: usize,
        buf: &mut [T],
        tag: u32,
    ) -> Result<()> {
        self.check_peer("send_recv", dst)?;
        self.check_peer("send_recv", src)?;
        self.sync(|e| {
            e.send_recv(
                Some((dst, bytes_of(data))),
                Some((src, bytes_of_mut(buf))),
                T::DTYPE,
                tag,
            )
        })
    }

    /// Queues `job` on the progress thread (started on first use).
    fn submit<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Engine) -> Result<R> + Send + 'static,
    ) -> Handle<R> {
        let (tx, rx) = mpsc::channel();
        let inflight = self.inflight.clone();
        inflight.count.fetch_add(1, Ordering::AcqRel);
        let job: Job = Box::new(move |e: &mut Engine| {
            let _ = tx.send(e.guarded(job));
            if inflight.count.fetch_sub(1, Ordering::AcqRel) == 1 {
                let _g = inflight.lock.lock().unwrap_or_else(|p| p.into_inner());
                inflight.zero.notify_all();
            }
        });
        let mut worker = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        if worker.is_none() {
            match Worker::spawn(self.engine.clone(), None) {
                Ok(w) => *worker = Some(w),
                Err(e) => {
                    // Out of threads or memory: this call fails, the group stays usable.
                    drop(job);
                    if self.inflight.count.fetch_sub(1, Ordering::AcqRel) == 1 {
                        let _g = self.inflight.lock.lock().unwrap_or_else(|p| p.into_inner());
                        self.inflight.zero.notify_all();
                    }
                    let (tx, rx) = mpsc::channel();
                    let _ = tx.send(Err(CommError::io("cannot start the progress thread", e)));
                    return Handle {
                        rx,
                        timeout: self.timeout,
                    };
                }
            }
        }
        let w = worker.as_ref().expect("started above");
        w.jobs
            .send(job)
            .expect("the progress thread is running while the group lives");
        let queued = self.inflight.count.load(Ordering::Relaxed) as u32;
        Handle {
            rx,
            timeout: self.timeout * queued.max(1),
        }
    }

    /// [`Group::all_reduce`] on the progress thread; the handle gives the buffer back.
    pub fn all_reduce_async<T: Elem>(&self, mut buf: Vec<T>, op: ReduceOp) -> Handle<Vec<T>> {
        self.submit(move |e| {
            e.all_reduce(bytes_of_mut(&mut buf), T::DTYPE, op, None)
                .map(|_| buf)
        })
    }

    /// [`Group::all_gather`] on the progress thread; the handle gives the gathered buffer.
    pub fn all_gather_async<T: Elem>(&self, input: Vec<T>) -> Handle<Vec<T>> {
        let size = self.size;
        self.submit(move |e| {
            let mut out = vec![T::zeroed(); input.len() * size];
            e.all_gather(bytes_of(&input), bytes_of_mut(&mut out), T::DTYPE)
                .map(|_| out)
        })
    }

    /// [`Group::all_to_all_v`] on the progress thread; the handle gives the received buffer
    /// (`recv_counts` added up). Bad counts come back as the handle's error.
    pub fn all_to_all_v_async<T: Elem>(
        &self,
        input: Vec<T>,
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Handle<Vec<T>> {
        let output = recv_counts.iter().sum();
        let counts = self.v_byte_counts::<T>(input.len(), send_counts, output, recv_counts);
        self.submit(move |e| {
            let (s, r) = counts?;
            let mut out = vec![T::zeroed(); output];
            e.all_to_all_v(bytes_of(&input), &s, bytes_of_mut(&mut out), &r, T::DTYPE)
                .map(|_| out)
        })
    }

    /// Splits the group: ranks passing the same `color` form a new group, ordered by `key` (ties
    /// by their rank here); `None` joins no group and gets `None`. Every rank must call it.
    pub fn split(&self, color: Option<u32>, key: i64) -> Result<Option<Group>> {
        let engine = self.sync(|e| split(e, color, key))?;
        Ok(engine.map(Group::wrap))
    }
}

/// The longest endpoint record a rank may publish in a split.
const MAX_ENDPOINT_RECORD: usize = 4096;

fn split(e: &mut Engine, color: Option<u32>, key: i64) -> Result<Option<Engine>> {
    let size = e.size;
    // Taken by every rank, member or not, so sequence numbers stay in step.
    let split_tag = u64::from(e.next_tag());
    let mut mine = [0u8; 16];
    mine[..8].copy_from_slice(&color.map_or(u64::MAX, u64::from).to_le_bytes());
    mine[8..].copy_from_slice(&key.to_le_bytes());
    let mut all = vec![0u8; 16 * size];
    e.all_gather(&mine, &mut all, DType::U8)?;
    let entry = |r: usize| {
        let c = u64::from_le_bytes(all[16 * r..16 * r + 8].try_into().unwrap());
        let k = i64::from_le_bytes(all[16 * r + 8..16 * r + 16].try_into().unwrap());
        (c, k)
    };
    let mut members: Vec<usize> = (0..size)
        .filter(|&r| color.is_some() && entry(r).0 == entry(e.rank).0)
        .collect();
    members.sort_by_key(|&r| (entry(r).1, r));
    // Members bind fresh transports and publish their endpoints through the parent.
    let local = match color {
        Some(_) => Some(Local::bind(members.len(), e.id.choice, e.id.listen)?),
        None => None,
    };
    let mut record = Vec::new();
    if let Some(l) = &local {
        let mut ep = l.endpoint(e.world_rank());
        if let Ok(port) = ep.tcp.parse::<u16>() {
            // Listening everywhere: at the IP the parent's table has for this rank.
            let ip = e.id.endpoints[e.rank]
                .tcp
                .parse::<std::net::SocketAddr>()
                .map(|a| a.ip())
                .unwrap_or([127, 0, 0, 1].into());
            ep.tcp = std::net::SocketAddr::new(ip, port).to_string();
        }
        ep.encode(&mut record);
    }
    let mut lens = vec![0u8; 4 * size];
    e.all_gather(&(record.len() as u32).to_le_bytes(), &mut lens, DType::U8)?;
    let recv_counts: Vec<usize> = lens
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as usize)
        .collect();
    // An endpoint record is a few addresses: a longer one is refused before anything is sized
    // by it.
    if let Some(r) = (0..size).find(|&r| recv_counts[r] > MAX_ENDPOINT_RECORD) {
        return Err(CommError::Protocol {
            rank: e.links.ranks[r],
            detail: format!(
                "a split record of {} bytes (at most {MAX_ENDPOINT_RECORD})",
                recv_counts[r]
            ),
        });
    }
    let mut records = vec![0u8; recv_counts.iter().sum()];
    e.all_to_all_v(
        &record.repeat(size),
        &vec![record.len(); size],
        &mut records,
        &recv_counts,
        DType::U8,
    )?;
    let Some(local) = local else { return Ok(None) };
    let mut starts = vec![0usize];
    for c in &recv_counts {
        starts.push(starts.last().unwrap() + c);
    }
    let endpoints = members
        .iter()
        .map(|&r| {
            let mut b = &records[starts[r]..starts[r + 1]];
            crate::transport::Endpoint::decode(&mut b).map_err(|why| CommError::Protocol {
                rank: e.links.ranks[r],
                detail: format!("split record: {why}"),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let rank = members
        .iter()
        .position(|&r| r == e.rank)
        .expect("a member is in its own group");
    let mut seed = &all[..];
    let salt = take_u32(&mut seed).unwrap_or(0) as u64;
    let id = Identity {
        endpoints,
        token: e.id.token.clone(),
        nonce: e.id.nonce ^ (split_tag << 32) ^ salt.rotate_left(17) ^ color.map_or(0, u64::from),
        choice: e.id.choice,
        listen: e.id.listen,
        liveness: e.id.liveness,
    };
    Engine::connect(rank, local, id, e.links.timeout).map(Some)
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(w) = self
            .worker
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            drop(w.jobs);
            let _ = w.thread.join();
        }
        // A closing barrier, so that no rank closes its connections while another still reads
        // (a closed connection is how a dead peer shows). Bounded, and skipped after errors.
        let mut e = self.lock();
        if !e.is_poisoned() && e.size > 1 {
            e.links.timeout = e.links.timeout.min(Duration::from_secs(10));
            let _ = e.guarded(|e| e.barrier());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_can_be_shared_across_threads_and_a_single_rank_works_alone() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Group>();
        let g = Group::init(&Config::new(0, 1, "", "")).unwrap();
        let mut v = [1.0f32, 2.0];
        g.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        let mut out = [0.0f32; 2];
        g.all_gather(&v, &mut out).unwrap();
        assert_eq!(out, [1.0, 2.0]);
        let e = g.send(0, &v, 0).unwrap_err();
        assert!(matches!(e, CommError::InvalidArgument(_)), "{e}");
        let e = g.all_gather(&v, &mut [0.0f32; 3]).unwrap_err();
        assert!(e.to_string().contains("expected 2"), "{e}");
        // Argument errors leave the group usable.
        g.barrier().unwrap();
    }
}
