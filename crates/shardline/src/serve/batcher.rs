//! The engine's thread while serving: it owns the engine and the [`Scheduler`], takes requests
//! and cancellations from the HTTP side through a bounded channel, runs one batched step after
//! another while there is work, and sends each request's tokens back on its own channel. It never
//! blocks on a socket: a request whose receiver is gone (the client left) is cancelled and its KV
//! blocks freed at the next step. Over several ranks, rank 0 runs this and sends every step's
//! plan to the other ranks ([`follow`]), which run the same batch.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardline_model::scheduler::{FinishReason, GenParams, Scheduler, SeqEvent, StepPlan};
use shardline_model::Reduce;
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use crate::engine::DynEngine;

/// What a request hears back, in order: tokens, then one end.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Token(u32),
    Finished(FinishReason),
    /// Refused before it ran (the prompt and max_tokens do not fit): a client error.
    Rejected(String),
    /// Refused because this many requests already wait for room: try again later.
    Busy(usize),
    /// The engine failed while it ran: a server error.
    Failed(String),
}

enum Command {
    Submit {
        id: u64,
        prompt: Vec<u32>,
        params: GenParams,
        events: UnboundedSender<Event>,
    },
    Cancel(u64),
}

/// Why a request was not taken.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is busy: {0} requests are queued; try again later")]
    QueueFull(usize),
    #[error("the server is shutting down")]
    Closed,
}

/// The HTTP side's handle on the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Command>,
    queue: usize,
    next_id: Arc<AtomicU64>,
    pub metrics: Arc<Metrics>,
}

impl EngineHandle {
    /// Queues a request; its events arrive on the returned id's channel `events`.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: GenParams,
        events: UnboundedSender<Event>,
    ) -> Result<u64, SubmitError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cmd = Command::Submit {
            id,
            prompt,
            params,
            events,
        };
        match self.tx.try_send(cmd) {
            Ok(()) => Ok(id),
            Err(TrySendError::Full(_)) => Err(SubmitError::QueueFull(self.queue)),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Closed),
        }
    }

    /// Stops request `id` (a client that left); its blocks are freed at the next step.
    pub fn cancel(&self, id: u64) {
        // Best effort: a full queue means the engine will notice the closed channel itself.
        let _ = self.tx.try_send(Command::Cancel(id));
    }
}

/// Sizes of the serving loop.
pub struct BatcherConfig {
    /// Requests waiting for room (or for the engine thread to take them); past it, 503.
    pub queue: usize,
}

/// The engine's end of the serving loop, run on the thread that owns the engine (a backend need
/// not be `Send`: a GPU's context belongs to the thread that made it).
pub struct Batcher {
    scheduler: Scheduler,
    rx: Receiver<Command>,
    metrics: Arc<Metrics>,
    queue: usize,
}

/// The serving loop over `scheduler`: the HTTP side's handle, and the engine's end.
pub fn start(scheduler: Scheduler, cfg: BatcherConfig) -> (EngineHandle, Batcher) {
    let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue.max(1));
    let metrics = Arc::new(Metrics::new(scheduler.kv_blocks().1));
    let handle = EngineHandle {
        tx,
        queue: cfg.queue,
        next_id: Arc::new(AtomicU64::new(1)),
        metrics: metrics.clone(),
    };
    let batcher = Batcher {
        scheduler,
        rx,
        metrics,
        queue: cfg.queue,
    };
    (handle, batcher)
}

impl Batcher {
    /// Runs `engine` until `stop` is set and every admitted request has finished (then it tells
    /// the other ranks to stop too).
    pub fn run(self, engine: DynEngine, stop: &AtomicBool) -> anyhow::Result<()> {
        run(engine, self, stop)
    }
}

/// A request in flight: where its events go, and when it last produced one.
struct Live {
    id: u64,
    events: UnboundedSender<Event>,
    submitted: Instant,
    last: Option<Instant>,
}

fn run(mut engine: DynEngine, batcher: Batcher, stop: &AtomicBool) -> anyhow::Result<()> {
    let Batcher {
        scheduler: mut sched,
        rx,
        metrics,
        queue,
    } = batcher;
    let vocab = engine.backend.spec().vocab;
    let mut live: Vec<Live> = Vec::new();
    let mut last_sent = Instant::now();
    loop {
        let idle = sched.running() == 0 && sched.waiting() == 0;
        if idle && stop.load(Ordering::Relaxed) {
            break;
        }
        // Take what has come; wait a little when there is nothing to run.
        let mut first = if idle {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        } else {
            None
        };
        while let Some(cmd) = first.take().or_else(|| rx.try_recv().ok()) {
            match cmd {
                Command::Submit {
                    id,
                    prompt,
                    params,
                    events,
                } => {
                    if stop.load(Ordering::Relaxed) {
                        let _ = events.send(Event::Rejected("the server is shutting down".into()));
                    } else if let Some(t) = prompt.iter().find(|&&t| t as usize >= vocab) {
                        let _ = events.send(Event::Rejected(format!(
                            "token id {t} is outside the model's vocabulary ({vocab} tokens)"
                        )));
                    } else if sched.waiting() >= queue {
                        let _ = events.send(Event::Busy(queue));
                    } else if let Err(e) = sched.add(id, prompt, params) {
                        let _ = events.send(Event::Rejected(e.to_string()));
                    } else {
                        metrics.requests.fetch_add(1, Ordering::Relaxed);
                        live.push(Live {
                            id,
                            events,
                            submitted: Instant::now(),
                            last: None,
                        });
                    }
                }
                Command::Cancel(id) => {
                    sched.cancel(id);
                    live.retain(|l| l.id != id);
                }
            }
        }
        // Requests whose client left.
        live.retain(|l| {
            let gone = l.events.is_closed();
            if gone {
                sched.cancel(l.id);
            }
            !gone
        });
        let plan = sched.plan();
        metrics.set_load(sched.running(), sched.waiting(), sched.kv_blocks().0);
        if plan.is_empty() {
            // The other ranks wait for plans with the group's deadline: an idle server tells
            // them it is alive.
            if last_sent.elapsed() >= KEEPALIVE {
                keep_alive(&mut engine)?;
                last_sent = Instant::now();
            }
            continue;
        }
        last_sent = Instant::now();
        let out = broadcast_plan(&mut engine, &plan).and_then(|()| Ok(plan.run(&mut engine)?));
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                for l in live.drain(..) {
                    let _ = l.events.send(Event::Failed(format!("{e:#}")));
                }
                return Err(e);
            }
        };
        for ev in sched.finish_step(&plan, &out) {
            let (seq, event) = match ev {
                SeqEvent::Token { seq, token } => (seq, Event::Token(token)),
                SeqEvent::Finished { seq, reason } => (seq, Event::Finished(reason)),
            };
            let Some(i) = live.iter().position(|l| l.id == seq) else {
                continue;
            };
            let now = Instant::now();
            if let Event::Token(_) = event {
                metrics.tokens.fetch_add(1, Ordering::Relaxed);
                match live[i].last {
                    None => metrics.ttft.observe(now - live[i].submitted),
                    Some(t) => metrics.itl.observe(now - t),
                }
                live[i].last = Some(now);
            }
            let finished = matches!(event, Event::Finished(_));
            if live[i].events.send(event).is_err() && !finished {
                sched.cancel(seq);
            }
            if finished || live[i].events.is_closed() {
                live.remove(i);
            }
        }
    }
    // Tell the other ranks there is nothing more.
    broadcast_plan(&mut engine, &StepPlan::default())
}

/// How often an idle rank 0 tells the other ranks it is there (well inside any collective
/// deadline: `SHARDLINE_TIMEOUT` is whole seconds).
const KEEPALIVE: Duration = Duration::from_millis(250);

/// Tells the other ranks that there is no step yet: a plan length of 0.
fn keep_alive(engine: &mut DynEngine) -> anyhow::Result<()> {
    if engine.reduce.world() > 1 {
        engine.reduce.broadcast_u32(&mut [0])?;
    }
    Ok(())
}

/// Sends `plan` from rank 0 to the other ranks (nothing on one rank). An empty plan means stop.
fn broadcast_plan(engine: &mut DynEngine, plan: &StepPlan) -> anyhow::Result<()> {
    if engine.reduce.world() == 1 {
        return Ok(());
    }
    let words = plan.encode();
    let mut len = [words.len() as u32];
    engine.reduce.broadcast_u32(&mut len)?;
    let mut buf = words;
    engine.reduce.broadcast_u32(&mut buf)?;
    Ok(())
}

/// A rank other than 0 while serving: runs every plan rank 0 sends until an empty one (a plan
/// of length 0 is rank 0 saying it is idle).
pub fn follow(mut engine: DynEngine) -> anyhow::Result<()> {
    loop {
        let mut len = [0u32];
        engine.reduce.broadcast_u32(&mut len)?;
        if len[0] == 0 {
            // Rank 0 is idle, and alive.
            continue;
        }
        // A plan is a few words per row and block; bound what one may claim.
        anyhow::ensure!(
            len[0] <= 1 << 24,
            "rank 0 sent a step plan of {} words",
            len[0]
        );
        let mut buf = vec![0u32; len[0] as usize];
        engine.reduce.broadcast_u32(&mut buf)?;
        let plan = StepPlan::decode(&buf)?;
        if plan.is_empty() {
            return Ok(());
        }
        plan.run(&mut engine)?;
    }
}
