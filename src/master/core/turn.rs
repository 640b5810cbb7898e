//! The steps every turn of the master's loop ends with ([`super::Event::Tick`]), in order:
//! the master's own stall, hung workers, the rollover (in [`super::rollover`]), refilling slots, the end of the
//! boot, the stop (in [`super::stop`]), and what systemd and load balancers are told.

use std::time::Instant;

use tracing::{info, warn};

use super::worker::{Heard, Life};
use super::{Action, Notify, Phase, STALL, Supervisor};
use crate::ipc::ToWorker;
use crate::loadboard::Readiness;

impl Supervisor {
    /// Notices that the loop itself stalled (the master was stopped, or something blocked
    /// it): the workers could not be heard meanwhile, so they are not blamed for it. Every
    /// heartbeat clock restarts (each worker gets a full silence window from now, and is
    /// pinged at once), and drain and rollover deadlines move by the stall.
    pub(super) fn check_stall(&mut self, now: Instant) {
        let gap = now.saturating_duration_since(self.last_tick);
        self.last_tick = self.last_tick.max(now);
        if gap <= STALL {
            return;
        }
        warn!(
            "master loop stalled for {} ms (stopped or blocked): restarting heartbeat clocks instead of blaming workers",
            gap.as_millis()
        );
        self.excused_at = now;
        self.next_heartbeat = now;
        for w in self.pool.workers.values_mut() {
            if let Life::Draining { deadline, .. } = &mut w.life {
                *deadline += gap;
            }
        }
        if let Phase::Rolling(r) = &mut self.phase {
            r.postpone(gap);
        }
    }

    /// Kills workers that stopped answering heartbeats (serving or draining), or never
    /// became ready, or overran their drain; then sends the next heartbeat.
    pub(super) fn murder_hung(&mut self, now: Instant) {
        let liveness = self.liveness();
        let misses = liveness.misses;
        let ready_timeout = self.config.ready_timeout;
        let excused_at = self.excused_at;
        let mut cut = Vec::new();
        for w in self.pool.workers.values_mut() {
            // Silence the master could not have heard (its own stall) does not count.
            let silent = now.saturating_duration_since(w.last_pong.max(excused_at));
            let hung = liveness.judge(silent) == Heard::Hung;
            let why = match &w.life {
                Life::Ready | Life::Retiring(_) if hung => {
                    about!(
                        warn,
                        w,
                        "missed {misses} heartbeats (silent for {} ms): killing it",
                        silent.as_millis()
                    );
                    format!("hung, no heartbeat answer for {} ms", silent.as_millis())
                }
                Life::Starting
                    if now.saturating_duration_since(w.started.max(excused_at)) > ready_timeout =>
                {
                    about!(warn, w, "not ready after {ready_timeout:?}: killing it");
                    format!("not ready within ready_timeout ({ready_timeout:?})")
                }
                Life::Draining { deadline, .. } if now > *deadline => {
                    about!(
                        warn,
                        w,
                        "still draining at its deadline: killing it, cutting {} connection(s)",
                        w.connections
                    );
                    cut.push((w.generation, w.connections));
                    format!("drain timeout, {} connection(s) cut", w.connections)
                }
                Life::Draining { .. } if hung && w.silent_while_draining() => {
                    about!(
                        warn,
                        w,
                        "missed {misses} heartbeats while draining (silent for {} ms): killing it, cutting {} connection(s)",
                        silent.as_millis(),
                        w.connections
                    );
                    cut.push((w.generation, w.connections));
                    format!(
                        "hung while draining, no heartbeat answer for {} ms, {} connection(s) cut",
                        silent.as_millis(),
                        w.connections
                    )
                }
                _ => continue,
            };
            if w.kill(why) {
                self.out.push(Action::Kill(w.pid));
            }
        }
        if let Phase::Rolling(r) = &mut self.phase {
            for (generation, n) in cut {
                r.count_cut(generation, n);
            }
        }
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + liveness.interval;
            for w in self.pool.workers.values_mut() {
                // Draining workers too: one that stops answering is as hung as a serving
                // one (see `Worker::silent_while_draining`).
                if w.is_pinged() {
                    w.ping_seq += 1;
                    self.out
                        .push(Action::Send(w.pid, ToWorker::Ping { seq: w.ping_seq }));
                }
            }
        }
    }

    /// Starts a worker in every empty slot of the serving generation whose backoff is over.
    pub(super) fn spawn_to_target(&mut self, now: Instant) {
        if self.is_stopping() {
            return;
        }
        let generation = self.pool.generation;
        let due: Vec<usize> = (self.pool.held_slots(generation).into_iter())
            .zip(&self.pool.slots)
            .enumerate()
            .filter(|(_, (held, s))| !held && now >= s.next_start)
            .map(|(slot, _)| slot)
            .collect();
        for slot in due {
            self.spawn(generation, slot);
        }
    }

    /// Asks for a worker in `slot` of `generation`; it holds the slot until the answer.
    pub(super) fn spawn(&mut self, generation: u64, slot: usize) {
        let config = self.config_of(generation);
        let request_limit = if config.max_requests > 0 {
            let jitter = config.max_requests_jitter;
            config.max_requests.saturating_add(self.rng.u64(0..=jitter))
        } else {
            0
        };
        self.pool.pending.insert((generation, slot), request_limit);
        self.out.push(Action::Spawn {
            generation,
            slot,
            cpu: self.slot_cpu(slot),
            request_limit,
        });
    }

    /// Slot `slot`'s home CPU (a reload may start more workers than the pool has slots).
    pub(super) fn slot_cpu(&self, slot: usize) -> usize {
        self.pool
            .slots
            .get(slot)
            .map_or(self.facts.cpus[slot % self.facts.cpus.len()], |s| s.cpu)
    }

    /// The first generation serves: `READY=1`, and any reload asked for meanwhile starts.
    pub(super) fn finish_boot(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Booting)
            || !self
                .pool
                .generation_full(self.pool.generation, self.pool.slots.len())
        {
            return;
        }
        self.phase = Phase::Serving;
        let status = self.status_line(now);
        info!(
            "all {} workers serving after {:.1} ms: READY=1",
            self.pool.slots.len(),
            now.duration_since(self.started).as_secs_f64() * 1e3
        );
        // Probes answer "ready" by the time systemd (and a test) hears READY=1.
        self.publish_readiness();
        self.notify_ready(status);
        if let Some(queued) = self.reload_queue.take() {
            self.begin_rollover(queued, now);
        }
    }

    /// `STATUS=` when it changed, the readiness, and `WATCHDOG=1` while the pool is healthy.
    pub(super) fn report(&mut self, now: Instant) {
        if !self.is_stopping() {
            let status = self.status_line(now);
            if status != self.last_status {
                self.last_status = status.clone();
                self.out.push(Action::Notify(Notify::Status(status)));
            }
        }
        self.publish_readiness();
        if let Some(period) = self.facts.watchdog
            && now >= self.next_watchdog
            && self.pool_is_healthy(now)
        {
            self.out.push(Action::Notify(Notify::Watchdog));
            self.next_watchdog = now + period / 2;
        }
    }

    /// At least one serving worker answered heartbeats recently (see [`Liveness`]).
    pub fn pool_is_healthy(&self, now: Instant) -> bool {
        let liveness = self.liveness();
        self.pool
            .workers
            .values()
            .any(|w| w.is_healthy(liveness, now))
    }

    pub(super) fn notify_ready(&mut self, status: String) {
        self.last_status = status.clone();
        self.out.push(Action::Notify(Notify::Ready(status)));
    }

    /// The `STATUS=` line.
    pub fn status_line(&mut self, now: Instant) -> String {
        let phase = match &self.phase {
            Phase::Booting => "starting: ",
            Phase::Rolling(_) => "reloading: ",
            _ => "",
        };
        let drain = self.drain_status().unwrap_or_default();
        let mut line = format!(
            "{drain}{phase}{}/{} workers serving, generation {}, {} requests, {} restarts in {}s",
            self.pool.serving(),
            self.pool.slots.len(),
            self.pool.generation,
            self.pool.requests_total(),
            self.budget.used(now),
            self.budget.window().as_secs()
        );
        // Said until the next reload succeeds: `systemctl status` shows it meanwhile.
        if let Some(r) = self.last_reload.as_ref().filter(|r| !r.ok) {
            line.push_str(&format!("; last reload failed: {}", r.message));
        }
        if !self.restart_needed.is_empty() {
            let keys: Vec<&str> = self
                .restart_needed
                .iter()
                .map(|k| k.split(' ').next().unwrap_or(k))
                .collect();
            line.push_str(&format!("; restart needed for {}", keys.join(", ")));
        }
        line
    }

    /// What a load balancer is told now.
    pub fn readiness(&self) -> Readiness {
        match self.phase {
            Phase::Stopping { .. } => Readiness::Stopping,
            Phase::Booting => Readiness::Starting,
            Phase::Serving | Phase::Rolling(_) if self.drain.is_some() => Readiness::Draining,
            Phase::Serving | Phase::Rolling(_) => Readiness::Ready,
        }
    }

    pub(super) fn publish_readiness(&mut self) {
        let r = self.readiness();
        if self.last_readiness != Some(r) {
            self.last_readiness = Some(r);
            self.out.push(Action::Readiness(r));
        }
    }
}
