//! What each event means: a worker's message, its channel closing, its exit, the answer to
//! a spawn, a memory reading, a scale request. (Reloads are in [`super::rollover`], stops
//! and drains in [`super::stop`].)

use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::worker::{self, Life, Recycle, Retire, Worker};
use super::{Action, Cause, Count, ExitStatus, Phase, Supervisor, budget};
use crate::ipc::ToMaster;

impl Supervisor {
    pub(super) fn on_message(&mut self, pid: i32, msg: ToMaster, now: Instant) {
        let drain_timeout = self.config.drain_timeout;
        let Some(w) = self.pool.workers.get_mut(&pid) else {
            // A worker reaped before its channel was read to the end: a last heartbeat
            // answer (or a final count) corrects the request total.
            if let ToMaster::Pong { requests, .. } = msg
                && let Some(counted) = self.pool.exited.get_mut(&pid)
                && requests > *counted
            {
                self.pool.requests_retired += requests - *counted;
                *counted = requests;
            }
            return;
        };
        match msg {
            ToMaster::Ready { version } => {
                if w.life != Life::Starting {
                    return;
                }
                w.version = version;
                w.life = Life::Ready;
                w.ready_at = Some(now);
                w.last_pong = now;
                let (slot, generation) = (w.slot, w.generation);
                about!(
                    info,
                    w,
                    "ready in {:.1} ms",
                    now.duration_since(w.started).as_secs_f64() * 1e3
                );
                // A replacement is serving: the worker it replaces may now drain.
                for old in self.pool.workers.values_mut() {
                    if old.slot == slot
                        && old.generation == generation
                        && old.pid != pid
                        && matches!(old.life, Life::Retiring(Retire::Recycle { .. }))
                    {
                        // Retiring already: it drains for the reason it was retired.
                        old.drain(Retire::Superseded, drain_timeout, now, &mut self.out);
                    }
                }
            }
            ToMaster::Pong {
                seq,
                requests,
                connections,
            } => {
                w.last_pong = now;
                w.pong_seq = w.pong_seq.max(seq);
                w.requests = requests;
                w.connections = connections;
                self.check_limits(pid);
            }
            ToMaster::Leaving { reason, planned } => {
                if w.is_killed() {
                    return;
                }
                let why = if planned {
                    about!(info, w, "is leaving: {reason}; starting its replacement");
                    Retire::Recycle {
                        why: reason,
                        cause: Recycle::Requests,
                    }
                } else {
                    about!(warn, w, "is leaving: {reason}; starting its replacement");
                    Retire::Leaving(reason)
                };
                // It drains by itself: no `Drain` message, and no heartbeat before it.
                w.life = Life::Draining {
                    why,
                    deadline: worker::drain_deadline(now, drain_timeout),
                    last_ping: w.ping_seq,
                    pinged: false,
                };
                let (slot, generation) = (w.slot, w.generation);
                if !planned && generation == self.pool.generation && !self.budget.record(now) {
                    self.give_up(format!("worker {slot} left after a panic"), now);
                }
            }
        }
    }

    pub(super) fn on_channel_closed(&mut self, pid: i32, error: Option<String>) {
        // Reaped already: its last words, if any, have been read.
        self.pool.exited.remove(&pid);
        let Some(w) = self.pool.workers.get_mut(&pid) else {
            return;
        };
        w.channel_closed = true;
        if let Some(e) = error {
            // A worker speaking garbage cannot be trusted to be healthy.
            about!(warn, w, "sent an IPC protocol error: {e}; killing it");
            if w.kill(format!("IPC protocol error: {e}")) {
                self.out.push(Action::Kill(pid));
            }
        }
    }

    pub(super) fn on_spawned(&mut self, generation: u64, slot: usize, pid: i32, now: Instant) {
        let Some(request_limit) = self.pool.pending.remove(&(generation, slot)) else {
            return;
        };
        let cpu = self.slot_cpu(slot);
        let mut w = Worker::new(pid, slot, generation, cpu, now);
        w.request_limit = request_limit;
        if let Some(s) = self.pool.slots.get_mut(slot)
            && generation == self.pool.generation
        {
            s.spawn_failures_in_row = 0;
        }
        self.pool.workers.insert(pid, w);
    }

    pub(super) fn on_spawn_failed(
        &mut self,
        generation: u64,
        slot: usize,
        error: String,
        host_resource: bool,
        now: Instant,
    ) {
        self.pool.pending.remove(&(generation, slot));
        if let Phase::Rolling(r) = &mut self.phase
            && r.generation == generation
        {
            r.failed
                .get_or_insert(format!("cannot start new worker {slot}: {error}"));
            return;
        }
        if generation != self.pool.generation {
            return;
        }
        let Some(s) = self.pool.slots.get_mut(slot) else {
            return;
        };
        s.last_spawn_error = Some(error.clone());
        self.last_spawn_error = Some(format!("worker {slot}: {error}"));
        if host_resource {
            // The host is short of descriptors, processes or memory: nothing the worker
            // did. Retry with its own backoff, off the restart budget.
            s.spawn_failures += 1;
            s.spawn_failures_in_row = s.spawn_failures_in_row.saturating_add(1);
            let delay = budget::spawn_retry_delay(s.spawn_failures_in_row);
            s.next_start = now + delay;
            self.spawn_failures += 1;
            // One line per failure; the backoff (up to 5 s) bounds how often.
            warn!(
                slot,
                "cannot start worker for want of a host resource: {error}; retrying in {} ms (not counted against restart_limit)",
                delay.as_millis()
            );
        } else {
            error!(slot, "cannot start worker: {error}");
            s.next_start = now + s.backoff.after_exit(Duration::ZERO, self.config.min_uptime);
            if !self.budget.record(now) {
                self.give_up(format!("cannot start worker {slot}: {error}"), now);
            }
        }
    }

    /// A worker was reaped: decide what its exit means.
    pub(super) fn reap(&mut self, pid: i32, status: ExitStatus, now: Instant) {
        let Some(w) = self.pool.workers.remove(&pid) else {
            return;
        };
        self.pool.requests_retired += w.requests;
        if !w.channel_closed {
            self.pool.exited.insert(pid, w.requests);
        }
        if let Some(cause) = restart_cause(&w, self.is_stopping()) {
            self.out.push(Action::Count(Count::Restart(cause)));
        }
        let uptime = w.uptime(now);
        let cause = match w.killed() {
            Some(why) => format!("{status}, killed by the master: {why}"),
            None => status.to_string(),
        };
        if let Some(retire) = w.retire() {
            // An old-generation worker that drained until its own timeout ran out cut what
            // it still held (its latest heartbeat answer says how much; at least one).
            if let Phase::Rolling(r) = &mut self.phase
                && !w.is_killed()
                && *retire == Retire::Superseded
                && w.drained_to_its_timeout(now)
            {
                r.count_cut(w.generation, w.connections.max(1));
            }
            about!(
                info,
                w,
                "exited ({cause}) after {:.1}s, retired: {retire:?}",
                uptime.as_secs_f64()
            );
            return;
        }
        if self.is_stopping() {
            about!(info, w, "exited ({cause}) during shutdown");
            return;
        }
        if let Phase::Rolling(r) = &mut self.phase
            && w.generation == r.generation
        {
            r.failed.get_or_insert(format!(
                "new worker {} (pid {}) exited while starting: {cause}",
                w.slot, w.pid
            ));
            about!(warn, w, "(new generation) exited ({cause})");
            return;
        }
        if w.generation != self.pool.generation {
            about!(info, w, "(old generation) exited ({cause})");
            return;
        }
        let lived = if w.ready_at.is_some() {
            uptime
        } else {
            Duration::ZERO
        };
        about!(
            warn,
            w,
            "exited unexpectedly ({cause}) after {:.1}s{}; replacing it",
            uptime.as_secs_f64(),
            if w.ready_at.is_none() {
                " while booting"
            } else {
                ""
            }
        );
        if let Some(slot) = self.pool.slots.get_mut(w.slot) {
            slot.restarts += 1;
            let delay = slot.backoff.after_exit(lived, self.config.min_uptime);
            slot.next_start = now + delay;
            if !delay.is_zero() {
                about!(info, w, "restarting in {} ms (backoff)", delay.as_millis());
            }
        }
        if !self.budget.record(now) {
            self.give_up(format!("worker {} exited ({cause})", w.slot), now);
        }
    }

    /// A memory reading.
    pub(super) fn on_memory(&mut self, pid: i32, charged: u64) {
        if let Some(w) = self.pool.workers.get_mut(&pid) {
            w.memory = charged;
            self.check_limits(pid);
        }
    }

    /// The limits, in one place: a serving worker that has served its `max_requests` (with
    /// jitter), or uses more than `max_memory`, is recycled: its replacement starts, and it
    /// drains once that one is ready. Checked whenever a figure changes: a heartbeat answer
    /// brings the request count, the shell's memory sweep the memory.
    fn check_limits(&mut self, pid: i32) {
        let max_memory = self.config.max_memory;
        let Some(w) = self.pool.workers.get_mut(&pid) else {
            return;
        };
        if w.life != Life::Ready {
            return;
        }
        let requests = w.requests;
        if w.request_limit > 0 && requests >= w.request_limit {
            about!(
                info,
                w,
                "served {requests} requests (max_requests): recycling it"
            );
            w.retire_later(Retire::Recycle {
                why: format!("served {requests} requests"),
                cause: Recycle::Requests,
            });
        } else if max_memory > 0 && w.memory > max_memory {
            let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
            about!(
                info,
                w,
                "uses {:.1} MiB > max_memory {:.1} MiB: recycling it",
                mib(w.memory),
                mib(max_memory)
            );
            w.retire_later(Retire::Recycle {
                why: format!("memory {:.1} MiB over max_memory", mib(w.memory)),
                cause: Recycle::Memory,
            });
        }
    }

    /// SIGTTIN / SIGTTOU: one worker more or less, never below 1.
    pub(super) fn scale_by(&mut self, delta: i32, now: Instant) {
        let new = (self.pool.slots.len() as i64 + delta as i64).max(1);
        if new == self.pool.slots.len() as i64 {
            info!("scale request ignored: the pool never goes below 1 worker");
            return;
        }
        if let Err(e) = self.scale_to(new, now) {
            warn!("{e}");
        }
    }

    /// Resizes the serving pool to `new` workers, until a reload that changes `workers` in
    /// the configuration file (see [`rollover`]).
    pub(super) fn scale_to(&mut self, new: i64, now: Instant) -> Result<(), String> {
        if !matches!(self.phase, Phase::Serving | Phase::Booting) {
            return Err(
                "cannot scale during a reload or shutdown; try again when it is over".into(),
            );
        }
        let max = crate::loadboard::MAX_WORKERS;
        if !(1..=max as i64).contains(&new) {
            return Err(format!(
                "workers must be between 1 and {max} (asked for {new})"
            ));
        }
        let new = new as usize;
        let old = self.pool.slots.len();
        if new == old {
            return Ok(());
        }
        self.pool.resize(new, &self.facts.cpus, now);
        let generation = self.pool.generation;
        let timeout = self.config.drain_timeout;
        for w in self.pool.workers.values_mut() {
            if w.generation == generation && w.slot >= new && w.holds_slot() {
                w.drain(Retire::ScaledDown, timeout, now, &mut self.out);
            }
        }
        info!(
            "pool scaled from {old} to {new} workers (workers = {} in the configuration; a reload that changes it applies the file)",
            self.config.workers
        );
        if new > self.facts.cpus.len() {
            info!(
                "{new} workers on {} CPUs: workers share CPUs round-robin",
                self.facts.cpus.len()
            );
        }
        Ok(())
    }
}

/// Why a reaped worker is replaced, for the metrics (none at shutdown).
fn restart_cause(w: &Worker, stopping: bool) -> Option<Cause> {
    match w.retire() {
        Some(Retire::Recycle {
            cause: Recycle::Memory,
            ..
        }) => Some(Cause::Memory),
        Some(Retire::Recycle {
            cause: Recycle::Requests,
            ..
        }) => Some(Cause::Requests),
        Some(Retire::Leaving(_)) => Some(Cause::Panic),
        Some(Retire::Superseded | Retire::RolledBack) => Some(Cause::Reload),
        Some(Retire::ScaledDown) => Some(Cause::Scale),
        Some(Retire::Shutdown) => None,
        None if stopping => None,
        None => match w.killed() {
            Some(why) if why.starts_with("hung") || why.starts_with("not ready") => {
                Some(Cause::Hang)
            }
            _ => Some(Cause::Crash),
        },
    }
}
