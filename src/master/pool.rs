//! The pool: worker slots, the workers that fill them, and their generations.
//!
//! A *slot* is a place in the pool (worker id 0..N, pinned to one CPU); it outlives the
//! processes that fill it. A *worker* is one process in one slot of one *generation*; a
//! reload starts a new generation in every slot. A worker's life is
//! `Starting → Ready → Draining → (reaped)`. A worker marked with a [`Retire`] reason is on
//! its way out on purpose: its slot is refilled first, and only then is it told to drain.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::ipc::ToWorker;
use crate::master::budget::Backoff;
use crate::master::memory::Memory;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Starting,
    Ready,
    Draining { deadline: Instant },
}

/// Why a worker is being retired on purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retire {
    /// Over `max_memory` or `max_requests`: replaced, then drained.
    Recycle(String),
    /// It said it is leaving (a panic); it drains by itself.
    Leaving(String),
    /// Its generation was superseded by a reload.
    Superseded,
    /// Its generation failed to become ready during a reload.
    RolledBack,
    /// The pool shrank (SIGTTOU).
    ScaledDown,
    /// The master is stopping.
    Shutdown,
}

pub struct Worker {
    pub pid: i32,
    pub slot: usize,
    pub generation: u64,
    pub cpu: usize,
    pub state: WorkerState,
    pub started: Instant,
    pub ready_at: Option<Instant>,
    pub last_pong: Instant,
    pub ping_seq: u64,
    /// The `seq` of the latest heartbeat answer.
    pub pong_seq: u64,
    /// The last heartbeat sent before it began draining, and whether that one went just
    /// before the `Drain` message (every worker answers that one: it precedes the drain on
    /// the channel, so a draining worker that leaves it unanswered is hung).
    pub drain_seq: Option<(u64, bool)>,
    /// Its channel reported end of file: nothing more will come from it.
    pub channel_closed: bool,
    pub requests: u64,
    pub connections: u64,
    pub request_limit: u64,
    pub memory: Memory,
    pub retire: Option<Retire>,
    /// Set when the master SIGKILLed it, with the reason, for the exit log line.
    pub killed: Option<String>,
    pub tx: UnboundedSender<ToWorker>,
    /// The master's end of the connection hand-off channel.
    pub handoff: std::sync::Arc<std::os::fd::OwnedFd>,
    /// Its entry on the load board.
    pub board_index: usize,
    /// The build it runs, as it said when ready.
    pub version: Option<String>,
    /// CPU % and requests/s for `app status`.
    pub rates: super::rates::Rates,
    /// When the latest heartbeat went out (for the round trip in the metrics).
    pub ping_sent: Option<Instant>,
    /// The CPUs it may run on now, and how it got them (`pinned`, `widened`, `none`,
    /// `list`).
    pub mask: Vec<usize>,
    pub affinity: &'static str,
}

impl Worker {
    pub fn send(&self, msg: ToWorker) {
        // A closed channel means the worker is exiting; the reaper will see it.
        let _ = self.tx.send(msg);
    }

    pub fn kill(&mut self, reason: String) {
        if self.killed.is_none() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            self.killed = Some(reason);
        }
    }

    /// Tells it to stop accepting and finish within `timeout`; the master kills it a little
    /// after that if it has not exited.
    ///
    /// A heartbeat goes just before the drain: its answer carries the worker's request count
    /// as of the drain, and a worker that does not answer it is hung (see
    /// [`Worker::silent_while_draining`]).
    pub fn drain(&mut self, timeout: Duration, now: Instant) {
        if !matches!(self.state, WorkerState::Draining { .. }) {
            let pinged = self.state == WorkerState::Ready && self.killed.is_none();
            if pinged {
                self.ping_seq += 1;
                self.ping_sent = Some(now);
                self.send(ToWorker::Ping { seq: self.ping_seq });
            }
            self.drain_seq = Some((self.ping_seq, pinged));
            self.send(ToWorker::drain(timeout));
            self.state = WorkerState::Draining {
                deadline: now + timeout + Duration::from_secs(1),
            };
        }
    }

    /// Whether a draining worker is held to the heartbeat silence limit: when it left the
    /// heartbeat sent just before its drain unanswered, or when it has answered a heartbeat
    /// sent during the drain (so it answers them all, and silence means it hangs). A worker
    /// that answered up to its drain and then stopped answering is one that does not answer
    /// while draining; its drain deadline still bounds it.
    pub fn silent_while_draining(&self) -> bool {
        match self.drain_seq {
            Some((seq, pinged)) => (pinged && self.pong_seq < seq) || self.pong_seq > seq,
            None => true,
        }
    }

    pub fn uptime(&self, now: Instant) -> Duration {
        now.duration_since(self.started)
    }

    /// Counts toward its slot being filled: alive and not on its way out.
    pub fn holds_slot(&self) -> bool {
        self.retire.is_none() && self.killed.is_none()
    }
}

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

pub struct Pool {
    pub workers: BTreeMap<i32, Worker>,
    pub slots: Vec<Slot>,
    /// The generation that serves (or, before the first READY=1, that is starting).
    pub generation: u64,
    /// Requests served by workers that have exited, so totals do not drop.
    pub requests_retired: u64,
    /// Workers reaped before their channel closed, with the request count folded into
    /// `requests_retired`: a final heartbeat answer still on the channel corrects it.
    pub exited: std::collections::HashMap<i32, u64>,
}

impl Pool {
    pub fn new() -> Pool {
        Pool {
            workers: BTreeMap::new(),
            slots: Vec::new(),
            generation: 1,
            requests_retired: 0,
            exited: Default::default(),
        }
    }

    /// For each slot, whether a worker of `generation` holds it (see [`Pool::holder`]).
    pub fn held_slots(&self, generation: u64) -> Vec<bool> {
        let mut held = vec![false; self.slots.len()];
        for w in self.workers.values() {
            if w.generation == generation && w.holds_slot() && w.slot < held.len() {
                held[w.slot] = true;
            }
        }
        held
    }

    /// The worker holding `slot` in `generation`, if any.
    pub fn holder(&self, generation: u64, slot: usize) -> Option<&Worker> {
        self.workers
            .values()
            .find(|w| w.generation == generation && w.slot == slot && w.holds_slot())
    }

    /// True when every slot of `generation` is held by a ready worker.
    pub fn generation_ready(&self, generation: u64) -> bool {
        self.generation_full(generation, self.slots.len())
    }

    /// True when slots `0..n` of `generation` are each held by a ready worker (a reload
    /// may size the new generation differently from the serving one).
    pub fn generation_full(&self, generation: u64, n: usize) -> bool {
        (0..n).all(|s| {
            self.holder(generation, s)
                .is_some_and(|w| w.state == WorkerState::Ready)
        })
    }

    pub fn serving(&self) -> usize {
        self.workers
            .values()
            .filter(|w| {
                w.generation == self.generation && w.state == WorkerState::Ready && w.holds_slot()
            })
            .count()
    }

    pub fn requests_total(&self) -> u64 {
        self.requests_retired + self.workers.values().map(|w| w.requests).sum::<u64>()
    }
}
