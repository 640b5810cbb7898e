//! The supervisor's decisions, as a pure state machine: events and the time in, actions out.
//!
//! [`Supervisor`] owns the pool, the restart budget, rollovers, the stop and the limits.
//! Its one entry point is [`Supervisor::on`]: given what happened ([`Event`]: a worker
//! exited or spoke, a signal, a control request, the result of an action, or just time
//! passing) and the time, it updates its state and says what to do ([`Action`]: start or
//! kill a worker, send it a message, tell systemd, answer a client, exit). It makes no
//! system call and knows no runtime; the master ([`super`]) is the thin shell that waits
//! for events, hands them over, and carries the actions out. So every decision can be
//! tested with a fake clock and no processes (see the `tests` module), in the manner of
//! `quinn-proto` or `h2`'s state machines. The one side channel is `tracing`: the core logs
//! its decisions, as those crates do.
//!
//! [`Event::Tick`] runs the steps every turn of the master's loop ends with, always the same
//! ones in the same order, as in gunicorn's arbiter:
//!
//! 1. [`murder_hung`](Supervisor::murder_hung): kill workers that stopped answering
//!    heartbeats, never became ready, or overran their drain; send the next heartbeat;
//! 2. [`advance_rollover`](Supervisor::advance_rollover) when a reload is under way;
//! 3. [`spawn_to_target`](Supervisor::spawn_to_target): refill every empty slot whose backoff
//!    has run out;
//! 4. [`finish_boot`](Supervisor::finish_boot): `READY=1` once the first generation serves;
//! 5. [`advance_stop`](Supervisor::advance_stop): the drain delay, the shutdown deadline,
//!    and the exit once no worker is left;
//! 6. [`report`](Supervisor::report): `STATUS=` when it changed, the readiness load
//!    balancers see, `WATCHDOG=1` while the pool is healthy.
//!
//! Everything else happens as its event arrives: an exit is judged when the worker is reaped
//! ([`Event::Exited`]), a recycle when a heartbeat answer or a memory reading crosses a
//! limit. A reload goes request → [`Action::Load`] → [`Event::Loaded`] → spawns → ready →
//! promote → drain → done, all in [`rollover`].
//!
//! The master only blames a worker for what it could have observed: when its own loop did
//! not turn for [`STALL`] (the process was stopped, or something blocked it), every
//! heartbeat clock restarts and deadlines move by the stall, instead of every worker being
//! killed as hung the moment the loop resumes.

pub mod budget;
pub mod pool;
mod rollover;
mod stop;
#[cfg(test)]
mod tests;
pub mod worker;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::config::Config;
use crate::control::{ReloadReport, Reply};
use crate::ipc::{ToMaster, ToWorker};
use crate::loadboard::Readiness;
use crate::metrics::Cause;

use budget::RestartBudget;
use pool::Pool;
use rollover::Rollover;
use worker::{Heard, Life, Liveness, Recycle, Retire, Worker};

/// A gap this long between two events (the loop wakes at least every 50 ms) means the
/// master itself stalled.
pub const STALL: Duration = Duration::from_millis(250);

/// Where a reply to a control client goes: the shell keeps the client's channel under this
/// number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplyTo(pub u64);

/// How a reaped worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal {
        signal: nix::sys::signal::Signal,
        core_dumped: bool,
    },
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal {
                signal,
                core_dumped,
            } => write!(
                f,
                "signal {signal}{}",
                if *core_dumped { " (core dumped)" } else { "" }
            ),
        }
    }
}

/// What happened.
#[derive(Debug)]
pub enum Event {
    /// Time passed: run the steps of the turn.
    Tick,
    /// SIGTERM, SIGINT (graceful) or SIGQUIT (`fast`).
    Stop { why: &'static str, fast: bool },
    /// SIGHUP (no reply) or `app reload`.
    Reload(Option<ReplyTo>),
    /// SIGTTIN / SIGTTOU: one worker more or less.
    ScaleBy(i32),
    /// `app scale`: exactly one of `to` (an absolute size) or `by` (a change).
    Scale {
        to: Option<u64>,
        by: Option<i64>,
        reply: ReplyTo,
    },
    /// `app drain` / `app undrain`.
    Drain(ReplyTo),
    Undrain(ReplyTo),
    /// A worker said something.
    Message(i32, ToMaster),
    /// A worker's channel ended; `error` when it spoke garbage.
    ChannelClosed { pid: i32, error: Option<String> },
    /// A worker was reaped.
    Exited(i32, ExitStatus),
    /// The answer to [`Action::Spawn`].
    Spawned {
        generation: u64,
        slot: usize,
        pid: i32,
    },
    SpawnFailed {
        generation: u64,
        slot: usize,
        error: String,
        /// The host is short of descriptors, processes or memory: nothing the worker did.
        host_resource: bool,
    },
    /// The answer to [`Action::Load`]: the configuration re-read and the binary opened.
    Loaded {
        generation: u64,
        result: Result<Box<Config>, String>,
    },
    /// A worker's memory was read: `charged` bytes count against `max_memory`.
    Memory { pid: i32, charged: u64 },
}

/// What to do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Start a worker; answer with [`Event::Spawned`] or [`Event::SpawnFailed`].
    Spawn {
        generation: u64,
        slot: usize,
        cpu: usize,
        request_limit: u64,
    },
    /// SIGKILL it.
    Kill(i32),
    Send(i32, ToWorker),
    /// Re-read the configuration and open the binary on disk for a new generation; answer
    /// with [`Event::Loaded`].
    Load { generation: u64 },
    Notify(Notify),
    Reply(ReplyTo, Reply),
    /// What readiness probes and the agent answer from now on.
    Readiness(Readiness),
    /// Round-robin: hand out what the master accepted, and accept no more.
    StopAccepting,
    Count(Count),
    /// Every worker is gone: exit with this code.
    Exit(i32),
}

/// A message to systemd (`sd_notify`).
#[derive(Debug, Clone, PartialEq)]
pub enum Notify {
    /// `READY=1` and `STATUS=`.
    Ready(String),
    /// `RELOADING=1` and `MONOTONIC_USEC=`.
    Reloading,
    Status(String),
    /// `STOPPING=1` and `STATUS=`.
    Stopping(String),
    Watchdog,
    ExtendTimeout(Duration),
    /// `STATUS=` and `ERRNO=`: giving up.
    Failed(String),
}

/// For the metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum Count {
    Restart(Cause),
    Reload { ok: bool, took: Duration },
}

/// Facts of the master's life the core needs and cannot change.
#[derive(Debug, Clone)]
pub struct Facts {
    /// Slot `i` is homed on `cpus[i % cpus.len()]`.
    pub cpus: Vec<usize>,
    /// The socket was bound by hand (`bind`), not passed in by systemd.
    pub bound_by_hand: bool,
    pub control_path: PathBuf,
    /// The watchdog period systemd set, if any.
    pub watchdog: Option<Duration>,
}

/// Where the master is in its life.
#[derive(Debug)]
pub enum Phase {
    /// Workers of the first generation are starting; READY=1 not sent yet.
    Booting,
    Serving,
    Rolling(Box<Rollover>),
    /// Draining everything before exiting with `code`.
    Stopping {
        deadline: Instant,
        code: i32,
        killed: bool,
    },
}

/// `app drain`, or a stop's `drain_delay`, under way: the pool answers "draining" to
/// probes while it still serves everything.
#[derive(Debug)]
pub struct Drain {
    pub since: Instant,
    /// `app drain` (until `app undrain`), rather than the delay before a stop.
    pub manual: bool,
    /// A stop waiting for the end of the delay: when, and which signal asked for it.
    pub stop: Option<(Instant, &'static str)>,
}

pub struct Supervisor {
    /// The serving generation's configuration.
    config: Config,
    facts: Facts,
    pool: Pool,
    budget: RestartBudget,
    phase: Phase,
    /// Reload requests that arrived during a rollover: one follow-up rollover serves them all.
    reload_queue: Option<Vec<ReplyTo>>,
    /// Highest generation number ever started, so a failed reload's number is not reused.
    last_generation: u64,
    last_reload: Option<ReloadReport>,
    /// Keys the configuration file changed that only a restart applies.
    restart_needed: Vec<String>,
    drain: Option<Drain>,
    started: Instant,
    next_heartbeat: Instant,
    next_watchdog: Instant,
    /// When the last event arrived, to notice that the loop stalled.
    last_event: Instant,
    /// When the loop last recovered from a stall: heartbeat silence and start-up time are
    /// counted from no earlier than this.
    excused_at: Instant,
    /// Starts that failed for want of a host resource, pool-wide, and the latest error.
    spawn_failures: u64,
    last_spawn_error: Option<String>,
    /// What systemd and the load balancer were last told.
    last_status: String,
    last_readiness: Option<Readiness>,
    /// `max_requests` jitter; seeded in tests.
    rng: fastrand::Rng,
    /// The actions of the event being handled.
    out: Vec<Action>,
}

impl Supervisor {
    pub fn new(config: Config, facts: Facts, now: Instant) -> Supervisor {
        let mut pool = Pool::new();
        pool.resize(config.workers, &facts.cpus, now);
        Supervisor {
            budget: RestartBudget::new(config.restart_limit, config.restart_window),
            config,
            facts,
            pool,
            phase: Phase::Booting,
            reload_queue: None,
            last_generation: 1,
            last_reload: None,
            restart_needed: Vec::new(),
            drain: None,
            started: now,
            next_heartbeat: now,
            next_watchdog: now,
            last_event: now,
            excused_at: now,
            spawn_failures: 0,
            last_spawn_error: None,
            last_status: String::new(),
            last_readiness: None,
            rng: fastrand::Rng::new(),
            out: Vec::new(),
        }
    }

    /// Seeds the `max_requests` jitter, for tests that compare exact limits.
    pub fn with_seed(mut self, seed: u64) -> Supervisor {
        self.rng = fastrand::Rng::with_seed(seed);
        self
    }

    /// Handles one event at `now`; returns what to do, in order.
    pub fn on(&mut self, event: Event, now: Instant) -> Vec<Action> {
        self.check_stall(now);
        match event {
            Event::Tick => self.turn(now),
            Event::Stop { why, fast } => self.request_stop(why, fast, now),
            Event::Reload(reply) => self.request_reload(reply, now),
            Event::ScaleBy(delta) => self.scale_by(delta, now),
            Event::Scale {
                to,
                by,
                reply: reply_to,
            } => {
                let old = self.pool.slots.len() as i64;
                let new = match (to, by) {
                    (Some(n), _) => i64::try_from(n).unwrap_or(i64::MAX),
                    (None, by) => old.saturating_add(by.unwrap_or(0)),
                };
                let reply = match self.scale_to(new, now) {
                    Ok(()) => Reply {
                        ok: true,
                        message: Some(format!("scaled from {old} to {new} workers")),
                        ..Default::default()
                    },
                    Err(e) => Reply::error(e),
                };
                self.out.push(Action::Reply(reply_to, reply));
            }
            Event::Drain(reply) => {
                let r = self.drain_request(now);
                self.out.push(Action::Reply(reply, r));
            }
            Event::Undrain(reply) => {
                let r = self.undrain_request(now);
                self.out.push(Action::Reply(reply, r));
            }
            Event::Message(pid, msg) => self.on_message(pid, msg, now),
            Event::ChannelClosed { pid, error } => self.on_channel_closed(pid, error),
            Event::Exited(pid, status) => self.reap(pid, status, now),
            Event::Spawned {
                generation,
                slot,
                pid,
            } => self.on_spawned(generation, slot, pid, now),
            Event::SpawnFailed {
                generation,
                slot,
                error,
                host_resource,
            } => self.on_spawn_failed(generation, slot, error, host_resource, now),
            Event::Loaded { generation, result } => self.on_loaded(generation, result, now),
            Event::Memory { pid, charged } => self.check_memory(pid, charged),
        }
        std::mem::take(&mut self.out)
    }

    fn turn(&mut self, now: Instant) {
        self.murder_hung(now);
        self.advance_rollover(now);
        self.spawn_to_target(now);
        self.finish_boot(now);
        if self.advance_stop(now) {
            return;
        }
        self.report(now);
    }

    // ---- what the shell may read ----------------------------------------------------------

    /// The serving generation's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The configuration of `generation`: the serving one's, or the one being rolled out.
    pub fn config_of(&self, generation: u64) -> &Config {
        match &self.phase {
            Phase::Rolling(r) if r.generation == generation && r.config.is_some() => {
                r.config.as_deref().unwrap_or(&self.config)
            }
            _ => &self.config,
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn worker(&self, pid: i32) -> Option<&Worker> {
        self.pool.workers.get(&pid)
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn budget_used(&mut self, now: Instant) -> u32 {
        self.budget.used(now)
    }

    pub fn budget(&self) -> &RestartBudget {
        &self.budget
    }

    pub fn last_reload(&self) -> Option<&ReloadReport> {
        self.last_reload.as_ref()
    }

    pub fn restart_needed(&self) -> &[String] {
        &self.restart_needed
    }

    pub fn drain_state(&self) -> Option<&Drain> {
        self.drain.as_ref()
    }

    pub fn spawn_failures(&self) -> (u64, Option<&str>) {
        (self.spawn_failures, self.last_spawn_error.as_deref())
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn is_stopping(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. })
    }

    fn liveness(&self) -> Liveness {
        Liveness {
            interval: self.config.heartbeat_interval,
            misses: self.config.heartbeat_misses,
        }
    }

    // ---- events ---------------------------------------------------------------------------

    /// Notices that the loop itself stalled (the master was stopped, or something blocked
    /// it): the workers could not be heard meanwhile, so they are not blamed for it. Every
    /// heartbeat clock restarts (each worker gets a full silence window from now, and is
    /// pinged at once), and drain and rollover deadlines move by the stall.
    fn check_stall(&mut self, now: Instant) {
        let gap = now.saturating_duration_since(self.last_event);
        self.last_event = self.last_event.max(now);
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

    fn on_message(&mut self, pid: i32, msg: ToMaster, now: Instant) {
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
                if w.request_limit > 0 && requests >= w.request_limit && w.life == Life::Ready {
                    about!(
                        info,
                        w,
                        "served {requests} requests (max_requests): recycling it"
                    );
                    w.retire_later(Retire::Recycle {
                        why: format!("served {requests} requests"),
                        cause: Recycle::Requests,
                    });
                }
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

    fn on_channel_closed(&mut self, pid: i32, error: Option<String>) {
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

    fn on_spawned(&mut self, generation: u64, slot: usize, pid: i32, now: Instant) {
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

    fn on_spawn_failed(
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
    fn reap(&mut self, pid: i32, status: ExitStatus, now: Instant) {
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

    /// A memory reading: over `max_memory`, a serving worker is recycled.
    fn check_memory(&mut self, pid: i32, charged: u64) {
        let max = self.config.max_memory;
        let Some(w) = self.pool.workers.get_mut(&pid) else {
            return;
        };
        if max > 0 && charged > max && w.life == Life::Ready {
            let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
            about!(
                info,
                w,
                "uses {:.1} MiB > max_memory {:.1} MiB: recycling it",
                mib(charged),
                mib(max)
            );
            w.retire_later(Retire::Recycle {
                why: format!("memory {:.1} MiB over max_memory", mib(charged)),
                cause: Recycle::Memory,
            });
        }
    }

    /// SIGTTIN / SIGTTOU: one worker more or less, never below 1.
    fn scale_by(&mut self, delta: i32, now: Instant) {
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
    fn scale_to(&mut self, new: i64, now: Instant) -> Result<(), String> {
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

    // ---- the steps of every turn ------------------------------------------------------------

    /// Kills workers that stopped answering heartbeats (serving or draining), or never
    /// became ready, or overran their drain; then sends the next heartbeat.
    fn murder_hung(&mut self, now: Instant) {
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
                    if now.saturating_duration_since(w.started.max(excused_at))
                        > ready_timeout =>
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
    fn spawn_to_target(&mut self, now: Instant) {
        if self.is_stopping() {
            return;
        }
        let generation = self.pool.generation;
        let held = self.pool.held_slots(generation);
        for slot in 0..self.pool.slots.len() {
            if held[slot] || now < self.pool.slots[slot].next_start {
                continue;
            }
            self.spawn(generation, slot);
        }
    }

    /// Asks for a worker in `slot` of `generation`; it holds the slot until the answer.
    fn spawn(&mut self, generation: u64, slot: usize) {
        let config = self.config_of(generation);
        let request_limit = if config.max_requests > 0 {
            let jitter = config.max_requests_jitter;
            config
                .max_requests
                .saturating_add(self.rng.u64(0..=jitter))
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
    fn slot_cpu(&self, slot: usize) -> usize {
        self.pool
            .slots
            .get(slot)
            .map_or(self.facts.cpus[slot % self.facts.cpus.len()], |s| s.cpu)
    }

    /// The first generation serves: `READY=1`, and any reload asked for meanwhile starts.
    fn finish_boot(&mut self, now: Instant) {
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
    fn report(&mut self, now: Instant) {
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

    fn notify_ready(&mut self, status: String) {
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

    fn publish_readiness(&mut self) {
        let r = self.readiness();
        if self.last_readiness != Some(r) {
            self.last_readiness = Some(r);
            self.out.push(Action::Readiness(r));
        }
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
