//! Continuous batching: which rows run in the next step. Sequences wait in arrival order until
//! the KV pool holds blocks for their prompt and their whole generation (reserved at admission,
//! so a running sequence never has to be preempted); every step then takes one decode row of
//! each sequence that is generating, and fills the rest of its token budget with the next chunk
//! of the prompts being prefilled, so a long prompt never stalls the others for more than a
//! chunk. A step is a [`StepPlan`] (what every rank runs: tokens, positions, block tables) and,
//! on the rank that schedules, what comes of it ([`Scheduler::finish_step`]).

use std::collections::VecDeque;

use crate::backend::{Backend, PagedRow, Reduce};
use crate::engine::Engine;
use crate::error::{ModelError, Result};
use crate::kv_pool::{blocks_for, BlockTable, KvPool};
use crate::sampler::Sampler;

/// What a request asks of its generation.
#[derive(Clone, Debug)]
pub struct GenParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    pub temperature: f32,
    /// Nucleus mass: sampling keeps the most likely tokens up to this probability.
    pub top_p: f32,
    /// Most tokens sampling keeps; 0: no limit.
    pub top_k: usize,
    /// Seed of the sequence's sampler.
    pub seed: u64,
    /// Token ids that end the generation (the model's EOS unless the request ignores it).
    pub stop_ids: Vec<u32>,
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token (EOS), or a stop string seen by the caller.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// What a step produced for one sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SeqEvent {
    /// A new token (not a stop token).
    Token {
        /// The sequence's id.
        seq: u64,
        /// The token.
        token: u32,
    },
    /// The sequence ended; its blocks are back in the pool.
    Finished {
        /// The sequence's id.
        seq: u64,
        /// Why it ended.
        reason: FinishReason,
    },
}

struct Sequence {
    id: u64,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    table: BlockTable,
    /// Positions already in the KV cache.
    cached: usize,
    sampler: Sampler,
    params: GenParams,
}

impl Sequence {
    /// Prompt tokens not yet in the KV cache.
    fn prompt_left(&self) -> usize {
        self.prompt.len().saturating_sub(self.cached)
    }
}

/// One step as every rank runs it: row `i` is `tokens[i]` at `positions[i]` of sequence
/// `row_seq[i]` (an index into `tables`); `sample` lists the rows whose logits are wanted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// The token of each row.
    pub tokens: Vec<u32>,
    /// The position of each row in its sequence.
    pub positions: Vec<u32>,
    /// The sequence of each row, an index into `tables`.
    pub row_seq: Vec<u32>,
    /// Each sequence's KV block table: the pool blocks holding its positions, in order.
    pub tables: Vec<Vec<u32>>,
    /// The rows whose logits are wanted, in the order they come back.
    pub sample: Vec<u32>,
    /// Whether every sampled row's sequence is greedy: then only each row's greedy token comes
    /// back, not its logits.
    pub greedy: bool,
}

/// What running a [`StepPlan`] gives for its sampled rows.
#[derive(Clone, Debug, PartialEq)]
pub enum StepOutput {
    /// Each sampled row's logits, `[sample.len(), vocab]`.
    Logits(Vec<f32>),
    /// Each sampled row's greedy token (a plan whose sequences are all greedy).
    Greedy(Vec<u32>),
}

impl StepPlan {
    /// Whether the plan runs no rows.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Runs the plan on `engine`: the logits of the sampled rows, or their greedy tokens.
    pub fn run<B: Backend, R: Reduce>(&self, engine: &mut Engine<B, R>) -> Result<StepOutput> {
        let rows: Vec<PagedRow> = self
            .positions
            .iter()
            .zip(&self.row_seq)
            .map(|(&pos, &s)| PagedRow {
                pos: pos as usize,
                blocks: &self.tables[s as usize],
            })
            .collect();
        let sample: Vec<usize> = self.sample.iter().map(|&i| i as usize).collect();
        Ok(if self.greedy {
            StepOutput::Greedy(engine.forward_paged_greedy(&self.tokens, &rows, &sample)?)
        } else {
            StepOutput::Logits(engine.forward_paged(&self.tokens, &rows, &sample)?)
        })
    }

    /// The plan as one list of numbers (to send to the other ranks).
    pub fn encode(&self) -> Vec<u32> {
        let mut v = vec![
            self.tokens.len() as u32,
            self.tables.len() as u32,
            self.sample.len() as u32,
            self.greedy as u32,
        ];
        v.extend(&self.tokens);
        v.extend(&self.positions);
        v.extend(&self.row_seq);
        v.extend(&self.sample);
        for t in &self.tables {
            v.push(t.len() as u32);
            v.extend(t);
        }
        v
    }

    /// The plan [`StepPlan::encode`] made; every count is checked against what is there.
    pub fn decode(v: &[u32]) -> Result<StepPlan> {
        let bad = || ModelError::Invalid("a step plan that does not add up".into());
        let mut it = v.iter().copied();
        let mut take = |n: usize| -> Result<Vec<u32>> {
            let out: Vec<u32> = it.by_ref().take(n).collect();
            if out.len() == n {
                Ok(out)
            } else {
                Err(bad())
            }
        };
        let head = take(4)?;
        let (rows, seqs, sample) = (head[0] as usize, head[1] as usize, head[2] as usize);
        let greedy = match head[3] {
            0 => false,
            1 => true,
            _ => return Err(bad()),
        };
        let tokens = take(rows)?;
        let positions = take(rows)?;
        let row_seq = take(rows)?;
        let sample = take(sample)?;
        let mut tables = Vec::with_capacity(seqs.min(v.len()));
        for _ in 0..seqs {
            let n = take(1)?[0] as usize;
            tables.push(take(n)?);
        }
        if row_seq.iter().any(|&s| s as usize >= seqs) || sample.iter().any(|&i| i as usize >= rows)
        {
            return Err(bad());
        }
        Ok(StepPlan {
            tokens,
            positions,
            row_seq,
            tables,
            sample,
            greedy,
        })
    }
}

/// The scheduler of one engine (on the rank that schedules).
pub struct Scheduler {
    pool: KvPool,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    /// Rows (tokens) one step runs at most.
    step_tokens: usize,
    /// Sequences generating at once at most.
    max_running: usize,
    /// The most positions a sequence may use (the model's context).
    max_positions: usize,
    /// For each sampled row of the step in flight: its sequence's index in `running`.
    in_flight: Vec<usize>,
    /// For each block table of the step in flight: its sequence's index in `running`.
    step_seqs: Vec<usize>,
}

/// How a [`Scheduler`] is sized.
#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Blocks in the KV pool (each `BLOCK_POSITIONS` positions of every layer).
    pub kv_blocks: usize,
    /// Rows (tokens) one step runs at most; at least 1.
    pub step_tokens: usize,
    /// Sequences generating at once at most; at least 1.
    pub max_running: usize,
    /// The most positions a sequence may use (the model's context).
    pub max_positions: usize,
}

impl Scheduler {
    /// A scheduler with an empty queue and a KV pool of `cfg.kv_blocks` free blocks.
    pub fn new(cfg: SchedulerConfig) -> Scheduler {
        Scheduler {
            pool: KvPool::new(cfg.kv_blocks),
            waiting: VecDeque::new(),
            running: Vec::new(),
            step_tokens: cfg.step_tokens.max(1),
            max_running: cfg.max_running.max(1),
            max_positions: cfg.max_positions,
            in_flight: Vec::new(),
            step_seqs: Vec::new(),
        }
    }

    /// Positions a sequence of `prompt` tokens generating `max_tokens` needs: the last token
    /// generated is never fed back.
    fn positions_needed(prompt: usize, max_tokens: usize) -> usize {
        prompt + max_tokens.saturating_sub(1)
    }

    /// Queues a sequence; refused at once when it could never run (an empty prompt, more
    /// positions than the model's context or the whole KV pool).
    pub fn add(&mut self, id: u64, prompt: Vec<u32>, params: GenParams) -> Result<()> {
        if prompt.is_empty() {
            return Err(ModelError::Invalid("the prompt has no tokens".into()));
        }
        let needed = Self::positions_needed(prompt.len(), params.max_tokens);
        if needed > self.max_positions {
            return Err(ModelError::TooLong {
                needed,
                max: self.max_positions,
            });
        }
        if blocks_for(needed) > self.pool.total() {
            return Err(ModelError::KvFull {
                needed,
                capacity: self.pool.total() * crate::kv_pool::BLOCK_POSITIONS,
            });
        }
        let sampler =
            Sampler::new(params.temperature, params.top_p, params.seed).with_top_k(params.top_k);
        self.waiting.push_back(Sequence {
            id,
            prompt,
            generated: Vec::new(),
            table: BlockTable::default(),
            cached: 0,
            sampler,
            params,
        });
        Ok(())
    }

    /// Drops sequence `id` wherever it is, its blocks back in the pool; whether it was there.
    /// Not during a step (between [`Scheduler::plan`] and [`Scheduler::finish_step`]).
    pub fn cancel(&mut self, id: u64) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i);
            return true;
        }
        match self.running.iter().position(|s| s.id == id) {
            Some(i) => {
                let mut s = self.running.remove(i);
                self.pool.release(&mut s.table);
                true
            }
            None => false,
        }
    }

    /// Sequences waiting for room.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences admitted (prefilling or generating).
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// KV blocks held by sequences, and in all.
    pub fn kv_blocks(&self) -> (usize, usize) {
        (self.pool.total() - self.pool.free(), self.pool.total())
    }

    /// Admits what fits, and plans the next step (empty when there is nothing to run).
    pub fn plan(&mut self) -> StepPlan {
        while self.running.len() < self.max_running {
            let Some(next) = self.waiting.front() else {
                break;
            };
            let needed = Self::positions_needed(next.prompt.len(), next.params.max_tokens);
            if blocks_for(needed) > self.pool.free() {
                break;
            }
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            // Cannot fail: the blocks were counted just above.
            if self.pool.reserve(&mut s.table, needed).is_err() {
                self.waiting.push_front(s);
                break;
            }
            self.running.push(s);
        }
        let mut plan = StepPlan::default();
        self.in_flight.clear();
        let mut budget = self.step_tokens;
        // Decode rows first: one for each sequence whose prompt is in the cache.
        for (i, s) in self.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if s.prompt_left() == 0 {
                let last = *s.generated.last().unwrap_or(&s.prompt[s.prompt.len() - 1]);
                push_row(&mut plan, i, last, s.cached, true);
                self.in_flight.push(i);
                budget -= 1;
            }
        }
        // Then prompt chunks, in admission order.
        for (i, s) in self.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            let left = s.prompt_left();
            if left == 0 {
                continue;
            }
            let n = left.min(budget);
            for (k, &t) in s.prompt[s.cached..s.cached + n].iter().enumerate() {
                push_row(&mut plan, i, t, s.cached + k, k + 1 == left);
            }
            if n == left {
                self.in_flight.push(i);
            }
            budget -= n;
        }
        // Tables indexed by running index; keep only those the rows use, renumbered.
        let mut used: Vec<u32> = plan.row_seq.clone();
        used.sort_unstable();
        used.dedup();
        plan.tables = used
            .iter()
            .map(|&i| self.running[i as usize].table.blocks.clone())
            .collect();
        for s in &mut plan.row_seq {
            *s = used.binary_search(s).unwrap_or(0) as u32;
        }
        self.step_seqs = used.iter().map(|&i| i as usize).collect();
        plan.greedy = self
            .in_flight
            .iter()
            .all(|&i| self.running[i].sampler.is_greedy());
        plan
    }

    /// Takes what `plan`'s sampled rows gave: each sequence's rows are now in the cache, and each
    /// sampled sequence draws its next token (or takes its greedy one). Returns what came of it,
    /// finished sequences' blocks back in the pool.
    pub fn finish_step(&mut self, plan: &StepPlan, out: &StepOutput) -> Vec<SeqEvent> {
        for &t in &plan.row_seq {
            self.running[self.step_seqs[t as usize]].cached += 1;
        }
        let mut events = Vec::new();
        let mut done: Vec<usize> = Vec::new();
        for (k, &i) in self.in_flight.iter().enumerate() {
            let s = &mut self.running[i];
            let token = match out {
                StepOutput::Logits(logits) => {
                    let vocab = logits.len() / self.in_flight.len().max(1);
                    s.sampler.sample(&logits[k * vocab..(k + 1) * vocab])
                }
                StepOutput::Greedy(ids) => ids[k],
            };
            if s.params.stop_ids.contains(&token) {
                events.push(SeqEvent::Finished {
                    seq: s.id,
                    reason: FinishReason::Stop,
                });
                done.push(i);
                continue;
            }
            s.generated.push(token);
            events.push(SeqEvent::Token { seq: s.id, token });
            if s.generated.len() >= s.params.max_tokens {
                events.push(SeqEvent::Finished {
                    seq: s.id,
                    reason: FinishReason::Length,
                });
                done.push(i);
            }
        }
        self.in_flight.clear();
        done.sort_unstable();
        for i in done.into_iter().rev() {
            let mut s = self.running.remove(i);
            self.pool.release(&mut s.table);
        }
        events
    }
}

/// Appends a row of sequence `seq` (its index in `running`) to `plan`.
fn push_row(plan: &mut StepPlan, seq: usize, token: u32, pos: usize, last: bool) {
    if last {
        plan.sample.push(plan.tokens.len() as u32);
    }
    plan.tokens.push(token);
    plan.positions.push(pos as u32);
    plan.row_seq.push(seq as u32);
}
