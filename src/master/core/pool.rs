//! The pool: worker slots, the workers that fill them, and their generations.
//!
//! A *slot* is a place in the pool (worker id 0..N, homed on one CPU); it outlives the
//! processes that fill it. A *worker* ([`Worker`]) is one process in one slot of one
//! *generation*; a reload starts a new generation in every slot. A worker retired on
//! purpose gives up its slot, which is refilled first; only then is it told to drain.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use super::budget::Backoff;
use super::worker::Worker;

#[derive(Debug, Clone)]
pub struct Slot {
    pub cpu: usize,
    pub restarts: u32,
    pub backoff: Backoff,
    pub next_start: Instant,
    /// Starts that failed for want of a host resource (descriptors, processes, memory):
    /// retried with their own backoff, not charged to the restart budget.
    pub spawn_failures: u64,
    /// Failures of that kind in a row, for the retry backoff; reset by a successful start.
    pub spawn_failures_in_row: u32,
    pub last_spawn_error: Option<String>,
}

#[derive(Debug, Default)]
pub struct Pool {
    pub workers: BTreeMap<i32, Worker>,
    pub slots: Vec<Slot>,
    /// The generation that serves (or, before the first READY=1, that is starting).
    pub generation: u64,
    /// Starts asked for and not yet reported, as (generation, slot) → the request limit it
    /// was started with: they hold their slot.
    pub pending: BTreeMap<(u64, usize), u64>,
    /// Requests served by workers that have exited, so totals do not drop.
    pub requests_retired: u64,
    /// Workers reaped before their channel closed, with the request count folded into
    /// `requests_retired`: a final heartbeat answer still on the channel corrects it.
    pub exited: HashMap<i32, u64>,
}

impl Pool {
    pub fn new() -> Pool {
        Pool {
            generation: 1,
            ..Default::default()
        }
    }

    /// Grows or shrinks the slot table; slot `i` is homed on `cpus[i % cpus.len()]`.
    pub fn resize(&mut self, n: usize, cpus: &[usize], now: Instant) {
        self.slots.truncate(n);
        while self.slots.len() < n {
            let i = self.slots.len();
            self.slots.push(Slot {
                cpu: cpus[i % cpus.len()],
                restarts: 0,
                backoff: Default::default(),
                next_start: now,
                spawn_failures: 0,
                spawn_failures_in_row: 0,
                last_spawn_error: None,
            });
        }
    }

    /// For each slot, whether a worker of `generation` holds it, or is being started in it.
    pub fn held_slots(&self, generation: u64) -> Vec<bool> {
        // One pass over the workers, not one per slot: this runs every turn, and with
        // hundreds of workers a lookup per slot made each turn quadratic.
        let mut held = vec![false; self.slots.len()];
        for w in self.workers.values() {
            if w.generation == generation && w.holds_slot() && w.slot < held.len() {
                held[w.slot] = true;
            }
        }
        for &(g, s) in self.pending.keys() {
            if g == generation && s < held.len() {
                held[s] = true;
            }
        }
        held
    }

    /// Whether slot `slot` of `generation` is held, or being started.
    pub fn is_held(&self, generation: u64, slot: usize) -> bool {
        self.pending.contains_key(&(generation, slot)) || self.holder(generation, slot).is_some()
    }

    /// The worker holding `slot` in `generation`, if any.
    pub fn holder(&self, generation: u64, slot: usize) -> Option<&Worker> {
        self.workers
            .values()
            .find(|w| w.generation == generation && w.slot == slot && w.holds_slot())
    }

    /// True when slots `0..n` of `generation` are each held by a ready worker (a reload
    /// may size the new generation differently from the serving one).
    pub fn generation_full(&self, generation: u64, n: usize) -> bool {
        (0..n).all(|s| self.holder(generation, s).is_some_and(Worker::is_serving))
    }

    /// Ready workers of the serving generation.
    pub fn serving(&self) -> usize {
        self.serving_workers().count()
    }

    pub fn serving_workers(&self) -> impl Iterator<Item = &Worker> {
        self.workers
            .values()
            .filter(|w| w.generation == self.generation && w.is_serving())
    }

    pub fn requests_total(&self) -> u64 {
        self.requests_retired + self.workers.values().map(|w| w.requests).sum::<u64>()
    }

    /// Generations that still have workers.
    pub fn live_generations(&self) -> BTreeSet<u64> {
        self.workers.values().map(|w| w.generation).collect()
    }
}
