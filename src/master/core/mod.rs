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
mod events;
pub mod pool;
mod rollover;
mod stop;
#[cfg(test)]
mod tests;
mod turn;
pub mod worker;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::control::{ReloadReport, Reply};
use crate::ipc::{ToMaster, ToWorker};
use crate::loadboard::Readiness;
use crate::metrics::Cause;

use budget::RestartBudget;
use pool::Pool;
use rollover::Rollover;
use worker::{Liveness, Worker};

/// A gap this long between two turns (the loop wakes at least every 50 ms, and every wake
/// ends with a turn) means the master itself stalled: it was stopped, or a turn took that
/// long (starting hundreds of workers, say) while no worker could be heard.
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
    Stop {
        why: &'static str,
        fast: bool,
    },
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
    ChannelClosed {
        pid: i32,
        error: Option<String>,
    },
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
    Memory {
        pid: i32,
        charged: u64,
    },
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
    Load {
        generation: u64,
    },
    Notify(Notify),
    /// Boxed: a reply may carry a whole status report.
    Reply(ReplyTo, Box<Reply>),
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
    /// When the last turn ended, to notice that the loop stalled.
    last_tick: Instant,
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
            last_tick: now,
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
    #[cfg(test)]
    pub fn with_seed(mut self, seed: u64) -> Supervisor {
        self.rng = fastrand::Rng::with_seed(seed);
        self
    }

    /// Handles one event at `now`; returns what to do, in order.
    pub fn on(&mut self, event: Event, now: Instant) -> Vec<Action> {
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
                self.reply(reply_to, reply);
            }
            Event::Drain(reply) => {
                let r = self.drain_request(now);
                self.reply(reply, r);
            }
            Event::Undrain(reply) => {
                let r = self.undrain_request(now);
                self.reply(reply, r);
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
            Event::Memory { pid, charged } => self.on_memory(pid, charged),
        }
        std::mem::take(&mut self.out)
    }

    fn turn(&mut self, now: Instant) {
        self.check_stall(now);
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

    pub fn spawn_failures(&self) -> (u64, Option<&str>) {
        (self.spawn_failures, self.last_spawn_error.as_deref())
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn is_stopping(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. })
    }

    fn reply(&mut self, to: ReplyTo, reply: Reply) {
        self.out.push(Action::Reply(to, Box::new(reply)));
    }

    fn liveness(&self) -> Liveness {
        Liveness {
            interval: self.config.heartbeat_interval,
            misses: self.config.heartbeat_misses,
        }
    }
}
