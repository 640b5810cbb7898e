//! The master: supervises workers and never serves a request.
//!
//! One loop on a single-threaded runtime, in the manner of gunicorn's arbiter. It wakes on a
//! signal, a message from a worker or the control socket, or a 50 ms tick, handles that one
//! thing, and then every turn runs the same named steps:
//!
//! 1. [`reap`](Master::reap) exited workers and decide what each exit means;
//! 2. [`murder_hung`](Master::murder_hung) workers that stopped answering heartbeats, and
//!    send the next heartbeat;
//! 3. [`check_limits`](Master::check_limits): memory, once a second, or every 150 ms for
//!    a worker near its limit or growing fast;
//! 4. [`advance_rollover`](Master::advance_rollover) when a reload is under way;
//! 5. [`spawn_to_target`](Master::spawn_to_target): refill every empty slot whose backoff
//!    has run out;
//! 6. [`report`](Master::report): READY=1 once, STATUS= when it changed, WATCHDOG=1 when the
//!    pool is healthy.
//!
//! The master knows nothing of requests; workers know nothing of supervision. They meet only
//! on the IPC channel ([`crate::ipc`]).
//!
//! The master only blames a worker for what it could have observed: when its own loop did
//! not turn for [`STALL`] (the process was stopped, or something blocked it), every
//! heartbeat clock restarts and deadlines move by the stall, instead of every worker being
//! killed as hung the moment the loop resumes.

/// A master log line about one worker: its slot and pid in the text (plain `journalctl`
/// shows only the text), and `WORKER_ID`, `WORKER_PID` and `GENERATION` as journald fields,
/// the same names the worker's own lines carry (`journalctl -u app WORKER_ID=1` shows both).
macro_rules! about {
    ($level:ident, $w:expr, $($arg:tt)+) => {
        tracing::$level!(
            worker_id = $w.slot,
            worker_pid = $w.pid,
            generation = $w.generation,
            "worker {} (pid {}) {}",
            $w.slot,
            $w.pid,
            format_args!($($arg)+)
        )
    };
}

pub mod affinity;
mod balance;
pub mod budget;
mod dispatch;
mod drain;
pub mod memory;
mod metrics;
mod numa;
pub mod pool;
mod rates;
mod report;
mod rollover;
pub mod spawn;
mod stop;

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tracing::{error, info, warn};

use crate::config::{AcceptStrategy, Config, ServeArgs, SettingsCheck};
use crate::control::{self, Reply, Request};
use crate::exit;
use crate::ipc::{self, ToMaster, ToWorker, WorkerSetup};
use crate::listen::Listener;
use crate::loadboard::LoadBoard;
use crate::notify::Notifier;

use budget::RestartBudget;
use dispatch::{ConnBudget, Dispatcher, HeldConn};
use pool::{Pool, Retire, Slot, Worker, WorkerState};
use rollover::Rollover;
use spawn::{Executable, SpawnRequest};

const TICK: Duration = Duration::from_millis(50);
const MEMORY_CHECK: Duration = Duration::from_secs(1);
/// The memory check period while a worker is above half of `max_memory`, or grew by more
/// than an eighth of it since the previous check.
const MEMORY_CHECK_FAST: Duration = Duration::from_millis(150);
/// Workers whose memory is read in one turn of the loop: reading `smaps_rollup` walks a
/// process's page tables (about half a millisecond each), so a sweep of a large pool is
/// spread over turns instead of stalling one (520 workers took 260 ms in one turn, which
/// delayed every event and tripped the loop's own stall detection).
const MEMORY_READS_PER_TURN: usize = 32;
/// A gap this long between two wake-ups of the loop (which wakes at least every [`TICK`])
/// means the master itself stalled.
const STALL: Duration = Duration::from_millis(250);
/// Retry delays for starts that failed for want of a host resource.
const SPAWN_RETRY_BASE: Duration = Duration::from_millis(100);
const SPAWN_RETRY_CAP: Duration = Duration::from_secs(5);

/// What a worker's channels (and, for round-robin, the master's acceptors) report.
enum ChannelEvent {
    Message {
        pid: i32,
        msg: ToMaster,
    },
    Closed {
        pid: i32,
        error: Option<String>,
    },
    /// Round-robin: a connection the master accepted, to hand to a worker.
    Accepted(HeldConn),
    /// Round-robin: the worker holds hand-off `id` now.
    Acked {
        pid: i32,
        id: u64,
    },
    /// Round-robin: the worker's hand-off channel closed.
    HandoffClosed {
        pid: i32,
    },
}

/// Where the master is in its life.
enum Phase {
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

pub struct Master {
    args: ServeArgs,
    /// The command line workers are started with (see [`SpawnRequest::argv`]).
    argv: Vec<std::ffi::OsString>,
    /// Checks the `[service]` table on every reload.
    check: SettingsCheck,
    config: Config,
    cpus: Vec<usize>,
    listeners: Vec<Listener>,
    exe: Executable,
    pool: Pool,
    budget: RestartBudget,
    notifier: Notifier,
    phase: Phase,
    /// Reload requests that arrived during a rollover: one follow-up rollover serves them all.
    reload_queue: Option<Vec<tokio::sync::oneshot::Sender<Reply>>>,
    /// Highest generation number ever started, so a failed reload's number is not reused.
    last_generation: u64,
    /// The TLS session-ticket key of each generation with workers (see [`crate::tls`]).
    ticket_keys: std::collections::BTreeMap<u64, crate::tls::TicketKey>,
    last_reload: Option<control::ReloadReport>,
    channel_tx: mpsc::UnboundedSender<ChannelEvent>,
    channel_rx: mpsc::UnboundedReceiver<ChannelEvent>,
    started: Instant,
    next_heartbeat: Instant,
    next_memory_check: Instant,
    /// Workers still to be read in the current memory sweep (see [`MEMORY_READS_PER_TURN`]),
    /// and whether one read so far was close to the limit.
    memory_sweep: Vec<i32>,
    memory_sweep_hot: bool,
    memory_sweep_started: Instant,
    next_watchdog: Instant,
    control_path: std::path::PathBuf,
    dispatcher: Dispatcher,
    board: LoadBoard,
    acceptors: Vec<tokio::task::JoinHandle<()>>,
    /// Connections the master holds for round-robin, and how many it may.
    conn_budget: Arc<ConnBudget>,
    next_cap_update: Instant,
    /// When the loop last woke, to notice that it stalled.
    last_wake: Instant,
    /// When the loop last recovered from a stall: heartbeat silence and start-up time are
    /// counted from no earlier than this.
    excused_at: Instant,
    /// Starts that failed for want of a host resource, pool-wide, and the latest error.
    spawn_failures: u64,
    last_spawn_error: Option<String>,
    /// The socket was bound by hand (`bind`), not passed in by systemd.
    bound_by_hand: bool,
    /// Keys the configuration file changed that only a restart applies.
    restart_needed: Vec<String>,
    /// The pool's metrics page (in the load board's memfd), if it could be made.
    metrics: Option<crate::metrics::Page>,
    interval: metrics::Interval,
    /// `cpu_affinity` (as set at start) and, under `auto`, its policy.
    balance: balance::Balance,
    /// NUMA nodes, for `numa`.
    numa: numa::Topology,
    /// `app drain`, or a stop's `drain_delay`: the pool answers "draining" to probes.
    drain: Option<drain::Drain>,
}

/// Why the loop woke.
enum Wake {
    Child,
    Stop(&'static str, bool),
    Reload,
    Scale(i32),
    Channel(ChannelEvent),
    Control(control::Incoming),
    Tick,
}

impl Master {
    pub fn new(
        args: ServeArgs,
        config: Config,
        cpus: Vec<usize>,
        listeners: Vec<Listener>,
        notifier: Notifier,
        check: SettingsCheck,
    ) -> Result<Master, exit::Fatal> {
        let exe = Executable::current()
            .map_err(|e| exit::Fatal::os(format!("cannot open own executable: {e}")))?;
        let board = LoadBoard::create()
            .map_err(|e| exit::Fatal::os(format!("cannot create the load board: {e}")))?;
        let metrics = match crate::metrics::Page::create(std::os::fd::AsFd::as_fd(board.fd())) {
            Ok(p) => Some(p),
            Err(e) => {
                warn!("no metrics page ({e}): the metrics endpoint will answer 503");
                None
            }
        };
        let (channel_tx, channel_rx) = mpsc::unbounded_channel();
        raise_fd_limit();
        let now = Instant::now();
        let control_path = config
            .control_socket
            .clone()
            .unwrap_or_else(control::default_path);
        let mut pool = Pool::new();
        resize_slots(&mut pool, config.workers, &cpus, now);
        let numa = numa::Topology::read();
        if let Some(why) = numa.no_effect(config.numa) {
            info!("{why}");
        }
        Ok(Master {
            balance: balance::Balance::new(config.cpu_affinity.clone(), cpus.clone(), now),
            numa,
            budget: RestartBudget::new(config.restart_limit, config.restart_window),
            args,
            argv: std::env::args_os().collect(),
            check,
            config,
            cpus,
            listeners,
            exe,
            pool,
            notifier,
            phase: Phase::Booting,
            reload_queue: None,
            last_generation: 1,
            ticket_keys: std::collections::BTreeMap::new(),
            last_reload: None,
            channel_tx,
            channel_rx,
            started: now,
            next_heartbeat: now,
            next_memory_check: now,
            memory_sweep: Vec::new(),
            memory_sweep_hot: false,
            memory_sweep_started: now,
            next_watchdog: now,
            control_path,
            dispatcher: Dispatcher::default(),
            board,
            acceptors: Vec::new(),
            conn_budget: ConnBudget::new(dispatch::MAX_HELD),
            next_cap_update: now,
            last_wake: now,
            excused_at: now,
            spawn_failures: 0,
            last_spawn_error: None,
            bound_by_hand: false,
            restart_needed: Vec::new(),
            metrics,
            interval: Default::default(),
            drain: None,
        })
    }

    /// Runs until the pool is stopped; returns the exit code.
    pub async fn run(mut self) -> i32 {
        let sig = |k: SignalKind| signal(k).expect("installing a signal handler cannot fail");
        let (mut chld, mut term, mut int, mut quit, mut hup, mut ttin, mut ttou) = (
            sig(SignalKind::child()),
            sig(SignalKind::terminate()),
            sig(SignalKind::interrupt()),
            sig(SignalKind::quit()),
            sig(SignalKind::hangup()),
            sig(SignalKind::from_raw(libc::SIGTTIN)),
            sig(SignalKind::from_raw(libc::SIGTTOU)),
        );
        let (control_tx, mut control_rx) = mpsc::unbounded_channel();
        if let Err(f) = control::serve(&self.control_path, control_tx) {
            eprintln!("app: {f}");
            return f.code;
        }
        info!("control socket at {}", self.control_path.display());
        for l in &self.listeners {
            info!("listening on {} (fd name {})", l.description, l.name);
        }
        if self.config.workers > self.cpus.len() {
            info!(
                "{} workers on {} CPUs: workers share CPUs round-robin",
                self.config.workers,
                self.cpus.len()
            );
        }
        if self.config.accept == AcceptStrategy::RoundRobin {
            self.start_acceptors();
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let wake = tokio::select! {
                biased;
                _ = chld.recv() => Wake::Child,
                _ = term.recv() => Wake::Stop("SIGTERM", false),
                _ = int.recv() => Wake::Stop("SIGINT", false),
                _ = quit.recv() => Wake::Stop("SIGQUIT", true),
                _ = hup.recv() => Wake::Reload,
                _ = ttin.recv() => Wake::Scale(1),
                _ = ttou.recv() => Wake::Scale(-1),
                Some(ev) = self.channel_rx.recv() => Wake::Channel(ev),
                Some(req) = control_rx.recv() => Wake::Control(req),
                _ = tick.tick() => Wake::Tick,
            };
            // Before anything is judged on this turn: did the loop itself stall?
            self.check_stall(Instant::now());
            match wake {
                Wake::Child => {}
                Wake::Tick => self.ratchet_ticket_keys(),
                Wake::Stop(why, fast) => self.request_stop(why, fast),
                Wake::Reload => self.request_reload(None),
                Wake::Scale(d) => self.scale(d),
                Wake::Channel(ev) => {
                    // Connection hand-offs are traffic, not supervision events: they skip
                    // the turn's steps.
                    if !self.on_channel(ev) {
                        continue;
                    }
                }
                Wake::Control(req) => self.on_control(req),
            }
            self.read_last_words().await;
            let now = Instant::now();
            self.reap(now);
            self.murder_hung(now);
            self.check_limits(now);
            self.balance_affinity(now);
            self.advance_rollover(now);
            self.spawn_to_target(now);
            self.advance_drain(now);
            if let Some(code) = self.advance_stop(now) {
                control::remove_own_socket();
                return code;
            }
            self.report(now);
            self.metrics_turn(now);
        }
    }

    // ---- events ------------------------------------------------------------------------

    /// Returns false for round-robin traffic, which needs no supervision step.
    fn on_channel(&mut self, ev: ChannelEvent) -> bool {
        let now = Instant::now();
        match ev {
            ChannelEvent::Accepted(conn) => {
                let targets = self.handoff_targets();
                self.dispatcher.offer(conn, &targets);
                return false;
            }
            ChannelEvent::Acked { pid, id } => {
                self.dispatcher.acked(pid, id);
                return false;
            }
            ChannelEvent::HandoffClosed { pid } => self.give_back(pid),
            ChannelEvent::Message { pid, msg } => self.on_message(pid, msg, now),
            ChannelEvent::Closed { pid, error } => {
                // Reaped already: its last words, if any, have been read.
                self.pool.exited.remove(&pid);
                if let Some(w) = self.pool.workers.get_mut(&pid) {
                    w.channel_closed = true;
                }
                if let Some(w) = self.pool.workers.get_mut(&pid)
                    && let Some(e) = error
                {
                    // A worker speaking garbage cannot be trusted to be healthy.
                    about!(warn, w, "sent an IPC protocol error: {e}; killing it");
                    w.kill(format!("IPC protocol error: {e}"));
                }
            }
        }
        true
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
                if w.state == WorkerState::Starting {
                    w.version = version;
                    w.state = WorkerState::Ready;
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
                            && matches!(old.retire, Some(Retire::Recycle(_)))
                        {
                            old.drain(drain_timeout, now);
                        }
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
                if let (Some(p), Some(sent)) = (&self.metrics, w.ping_sent)
                    && seq == w.ping_seq
                    && seq > 0
                {
                    metrics::pong(p, w.board_index, now.saturating_duration_since(sent));
                }
                w.requests = requests;
                w.connections = connections;
                w.rates.requests(now, requests);
                if w.request_limit > 0 && requests >= w.request_limit && w.retire.is_none() {
                    about!(
                        info,
                        w,
                        "served {requests} requests (max_requests): recycling it"
                    );
                    w.retire = Some(Retire::Recycle(format!("served {requests} requests")));
                }
            }
            ToMaster::Leaving { reason, planned } => {
                if planned {
                    about!(info, w, "is leaving: {reason}; starting its replacement");
                    w.retire = Some(Retire::Recycle(reason));
                } else {
                    about!(warn, w, "is leaving: {reason}; starting its replacement");
                    w.retire = Some(Retire::Leaving(reason));
                }
                w.state = WorkerState::Draining {
                    deadline: now + drain_timeout + Duration::from_secs(1),
                };
                w.drain_seq = Some((w.ping_seq, false));
                let (slot, generation) = (w.slot, w.generation);
                if !planned && generation == self.pool.generation && !self.budget.record(now) {
                    self.give_up(format!("worker {slot} left after a panic"));
                }
            }
        }
    }

    fn on_control(&mut self, req: control::Incoming) {
        match req.request {
            Request::Status => {
                let _ = req.reply.send(Reply {
                    ok: true,
                    status: Some(self.status_report()),
                    ..Default::default()
                });
            }
            Request::Reload => self.request_reload(Some(req.reply)),
            Request::Drain => {
                let _ = req.reply.send(self.drain_request());
            }
            Request::Undrain => {
                let _ = req.reply.send(self.undrain_request());
            }
            Request::Scale { to, by } => {
                let old = self.pool.slots.len() as i64;
                let new = match (to, by) {
                    (Some(n), _) => i64::try_from(n).unwrap_or(i64::MAX),
                    (None, by) => old.saturating_add(by.unwrap_or(0)),
                };
                let reply = match self.scale_to(new) {
                    Ok(()) => Reply {
                        ok: true,
                        message: Some(format!("scaled from {old} to {new} workers")),
                        ..Default::default()
                    },
                    Err(e) => Reply::error(e),
                };
                let _ = req.reply.send(reply);
            }
        }
    }

    /// SIGTTIN / SIGTTOU: one worker more or less, never below 1.
    fn scale(&mut self, delta: i32) {
        let new = (self.pool.slots.len() as i64 + delta as i64).max(1);
        if new == self.pool.slots.len() as i64 {
            info!("scale request ignored: the pool never goes below 1 worker");
            return;
        }
        if let Err(e) = self.scale_to(new) {
            warn!("{e}");
        }
    }

    /// Resizes the serving pool to `new` workers, until a reload that changes `workers` in
    /// the configuration file (see `rollover`).
    fn scale_to(&mut self, new: i64) -> Result<(), String> {
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
        let now = Instant::now();
        let old = self.pool.slots.len();
        if new == old {
            return Ok(());
        }
        resize_slots(&mut self.pool, new, &self.cpus, now);
        let generation = self.pool.generation;
        for w in self.pool.workers.values_mut() {
            if w.generation == generation && w.slot >= new && w.retire.is_none() {
                w.retire = Some(Retire::ScaledDown);
                w.drain(self.config.drain_timeout, now);
            }
        }
        info!(
            "pool scaled from {old} to {new} workers (workers = {} in the configuration; a reload that changes it applies the file)",
            self.config.workers
        );
        if new > self.cpus.len() {
            info!(
                "{new} workers on {} CPUs: workers share CPUs round-robin",
                self.cpus.len()
            );
        }
        Ok(())
    }

    // ---- the steps of every turn ---------------------------------------------------------

    /// A worker that leaves on its own (`Leaving`, e.g. at its request limit) may exit
    /// before its message is read: `biased` takes the signal first, any other wake reaps
    /// too, and a host that descheduled the master delivers everything at once. When a
    /// child waits to be reaped, let the channel readers run once (`yield_now` resumes this
    /// task only after the I/O driver has woken them) and take what they forwarded, so such
    /// an exit is judged as the planned departure it is. One `waitid` per turn otherwise.
    async fn read_last_words(&mut self) {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        if !matches!(
            nix::sys::wait::waitid(nix::sys::wait::Id::All, flags),
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..))
        ) {
            return;
        }
        tokio::task::yield_now().await;
        while let Ok(ev) = self.channel_rx.try_recv() {
            self.on_channel(ev);
        }
    }

    /// Collects every exited child and decides what its exit means.
    fn reap(&mut self, now: Instant) {
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(s) => s,
            };
            let (pid, cause) = match status {
                WaitStatus::Exited(pid, code) => (pid.as_raw(), format!("exit code {code}")),
                WaitStatus::Signaled(pid, sig, core) => (
                    pid.as_raw(),
                    format!("signal {sig}{}", if core { " (core dumped)" } else { "" }),
                ),
                _ => continue,
            };
            let Some(w) = self.pool.workers.remove(&pid) else {
                continue;
            };
            self.metrics_reaped(&w);
            self.pool.requests_retired += w.requests;
            if !w.channel_closed {
                self.pool.exited.insert(pid, w.requests);
            }
            self.board.release(w.board_index);
            self.give_back(pid);
            self.on_exit(w, cause, now);
        }
    }

    fn on_exit(&mut self, w: Worker, cause: String, now: Instant) {
        let uptime = w.uptime(now);
        let cause = match &w.killed {
            Some(why) => format!("{cause}, killed by the master: {why}"),
            None => cause,
        };
        if let Some(retire) = &w.retire {
            // An old-generation worker that drained until its own timeout ran out cut what
            // it still held (its latest heartbeat answer says how much; at least one).
            if let (Phase::Rolling(r), WorkerState::Draining { deadline }) =
                (&mut self.phase, w.state)
                && w.killed.is_none()
                && *retire == Retire::Superseded
                && now + Duration::from_secs(1) >= deadline
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
        if matches!(self.phase, Phase::Stopping { .. }) {
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
            self.give_up(format!("worker {} exited ({cause})", w.slot));
        }
    }

    /// Notices that the loop itself stalled (the master was stopped, or something blocked
    /// it): the workers could not be heard meanwhile, so they are not blamed for it. Every
    /// heartbeat clock restarts (each worker gets a full silence window from now, and is
    /// pinged at once), and drain and rollover deadlines move by the stall.
    fn check_stall(&mut self, now: Instant) {
        let gap = now.duration_since(self.last_wake);
        self.last_wake = now;
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
            if let WorkerState::Draining { deadline } = &mut w.state {
                *deadline += gap;
            }
        }
        if let Phase::Rolling(r) = &mut self.phase {
            r.postpone(gap);
        }
    }

    /// Kills workers that stopped answering heartbeats (serving or draining), or never
    /// became ready, or overran their drain; then sends the next heartbeat.
    fn murder_hung(&mut self, now: Instant) {
        let interval = self.config.heartbeat_interval;
        let misses = self.config.heartbeat_misses;
        // `misses` pings unanswered, the last of them given half an interval to answer.
        let silence_limit = interval * misses + interval / 2;
        let ready_timeout = self.config.ready_timeout;
        let excused_at = self.excused_at;
        let mut cut = Vec::new();
        for w in self.pool.workers.values_mut() {
            if w.killed.is_some() {
                continue;
            }
            // Silence the master could not have heard (its own stall) does not count.
            let silent = now.duration_since(w.last_pong.max(excused_at));
            match w.state {
                WorkerState::Ready if silent > silence_limit => {
                    about!(
                        warn,
                        w,
                        "missed {misses} heartbeats (silent for {} ms): killing it",
                        silent.as_millis()
                    );
                    w.kill(format!(
                        "hung, no heartbeat answer for {} ms",
                        silent.as_millis()
                    ));
                }
                WorkerState::Starting
                    if now.duration_since(w.started.max(excused_at)) > ready_timeout =>
                {
                    about!(warn, w, "not ready after {ready_timeout:?}: killing it");
                    w.kill(format!(
                        "not ready within ready_timeout ({ready_timeout:?})"
                    ));
                }
                WorkerState::Draining { deadline } if now > deadline => {
                    about!(
                        warn,
                        w,
                        "still draining at its deadline: killing it, cutting {} connection(s)",
                        w.connections
                    );
                    w.kill(format!(
                        "drain timeout, {} connection(s) cut",
                        w.connections
                    ));
                    cut.push((w.generation, w.connections));
                }
                WorkerState::Draining { .. }
                    if silent > silence_limit && w.silent_while_draining() =>
                {
                    about!(
                        warn,
                        w,
                        "missed {misses} heartbeats while draining (silent for {} ms): killing it, cutting {} connection(s)",
                        silent.as_millis(),
                        w.connections
                    );
                    w.kill(format!(
                        "hung while draining, no heartbeat answer for {} ms, {} connection(s) cut",
                        silent.as_millis(),
                        w.connections
                    ));
                    cut.push((w.generation, w.connections));
                }
                _ => {}
            }
        }
        if let Phase::Rolling(r) = &mut self.phase {
            for (generation, n) in cut {
                r.count_cut(generation, n);
            }
        }
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + interval;
            for w in self.pool.workers.values_mut() {
                // Draining workers too: one that stops answering is as hung as a serving
                // one (see `Worker::silent_while_draining`).
                if matches!(w.state, WorkerState::Ready | WorkerState::Draining { .. })
                    && w.killed.is_none()
                {
                    w.ping_seq += 1;
                    w.ping_sent = Some(now);
                    w.send(ToWorker::Ping { seq: w.ping_seq });
                }
            }
        }
    }

    /// Memory limits, checked once a second, or every [`MEMORY_CHECK_FAST`] while a worker
    /// is above half the limit or grew by more than an eighth of it since the last check;
    /// over-limit workers are recycled. (Round-robin: the connection cap follows the
    /// descriptor limit at the same pace.)
    fn check_limits(&mut self, now: Instant) {
        if self.config.accept == AcceptStrategy::RoundRobin && now >= self.next_cap_update {
            self.next_cap_update = now + MEMORY_CHECK;
            self.update_conn_cap();
        }
        if self.memory_sweep.is_empty() {
            if now < self.next_memory_check {
                return;
            }
            self.memory_sweep = self.pool.workers.keys().rev().copied().collect();
            self.memory_sweep_hot = false;
            self.memory_sweep_started = now;
        }
        let max = self.config.max_memory;
        let mut hot = false;
        let take = self.memory_sweep.len().min(MEMORY_READS_PER_TURN);
        let batch = self.memory_sweep.split_off(self.memory_sweep.len() - take);
        for pid in batch {
            let Some(w) = self.pool.workers.get_mut(&pid) else {
                continue;
            };
            let before = w.memory.charged();
            if let Some(m) = memory::read(w.pid) {
                w.memory = m;
            }
            w.rates.sample_cpu(now, w.pid);
            let charged = w.memory.charged();
            if max > 0
                && w.retire.is_none()
                && (charged > max / 2 || charged.saturating_sub(before) > max / 8)
            {
                hot = true;
            }
            if max > 0 && charged > max && w.retire.is_none() && w.state == WorkerState::Ready {
                let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
                about!(
                    info,
                    w,
                    "uses {:.1} MiB > max_memory {:.1} MiB: recycling it",
                    mib(charged),
                    mib(max)
                );
                w.retire = Some(Retire::Recycle(format!(
                    "memory {:.1} MiB over max_memory",
                    mib(charged)
                )));
            }
        }
        self.memory_sweep_hot |= hot;
        if self.memory_sweep.is_empty() {
            let every = if self.memory_sweep_hot {
                MEMORY_CHECK_FAST
            } else {
                MEMORY_CHECK
            };
            self.next_memory_check = self.memory_sweep_started + every;
        }
    }

    /// Starts a worker in every empty slot of the serving generation whose backoff is over.
    fn spawn_to_target(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Stopping { .. }) {
            return;
        }
        let generation = self.pool.generation;
        // One pass over the workers, not one per slot: this runs every turn, and with
        // hundreds of workers a lookup per slot made each turn quadratic.
        let held = self.pool.held_slots(generation);
        for slot in 0..self.pool.slots.len() {
            if held.get(slot).copied().unwrap_or(false) || now < self.pool.slots[slot].next_start {
                continue;
            }
            match self.spawn_worker(slot, generation, None) {
                Ok(_) => self.pool.slots[slot].spawn_failures_in_row = 0,
                Err(e) if host_resource_error(&e) => {
                    // The host is short of descriptors, processes or memory: nothing the
                    // worker did. Retry with its own backoff, off the restart budget.
                    let s = &mut self.pool.slots[slot];
                    s.spawn_failures += 1;
                    s.spawn_failures_in_row = s.spawn_failures_in_row.saturating_add(1);
                    s.last_spawn_error = Some(e.to_string());
                    let delay = spawn_retry_delay(s.spawn_failures_in_row);
                    s.next_start = now + delay;
                    self.spawn_failures += 1;
                    self.last_spawn_error = Some(format!("worker {slot}: {e}"));
                    // One line per failure; the backoff (up to 5 s) bounds how often.
                    warn!(
                        slot,
                        "cannot start worker for want of a host resource: {e}; retrying in {} ms (not counted against restart_limit)",
                        delay.as_millis()
                    );
                }
                Err(e) => {
                    error!(slot, "cannot start worker: {e}");
                    let s = &mut self.pool.slots[slot];
                    s.last_spawn_error = Some(e.to_string());
                    s.next_start =
                        now + s.backoff.after_exit(Duration::ZERO, self.config.min_uptime);
                    self.last_spawn_error = Some(format!("worker {slot}: {e}"));
                    if !self.budget.record(now) {
                        self.give_up(format!("cannot start worker {slot}: {e}"));
                        return;
                    }
                }
            }
        }
    }

    /// The generation's ticket key, made on its first worker; keys of generations without
    /// workers are dropped then. `None` (resumption on one worker only) if the host has no
    /// randomness to give.
    fn ticket_key(&mut self, generation: u64) -> Option<crate::tls::TicketKey> {
        if !self.ticket_keys.contains_key(&generation) {
            let alive: std::collections::BTreeSet<u64> =
                self.pool.workers.values().map(|w| w.generation).collect();
            self.ticket_keys.retain(|g, _| alive.contains(g));
            match crate::tls::TicketKey::generate() {
                Ok(k) => {
                    self.ticket_keys.insert(generation, k);
                }
                Err(e) => {
                    warn!("{e}: TLS sessions resume only on the worker that began them");
                    return None;
                }
            }
        }
        let key = self.ticket_keys.get_mut(&generation)?;
        key.forget_before_last_period();
        Some(key.clone())
    }

    /// Keeps the master's copies of the ticket keys no older than its workers' (a key held
    /// here unchanged for days would open every ticket issued since).
    fn ratchet_ticket_keys(&mut self) {
        for key in self.ticket_keys.values_mut() {
            key.forget_before_last_period();
        }
    }

    /// Starts one worker; `with` is the (config, executable) of a generation being rolled
    /// out, `None` for the serving one.
    fn spawn_worker(
        &mut self,
        slot: usize,
        generation: u64,
        with: Option<(&Config, &Executable)>,
    ) -> std::io::Result<i32> {
        let tls_on = with.map_or(self.config.tls.is_some(), |(c, _)| c.tls.is_some());
        let tls_tickets = if tls_on {
            self.ticket_key(generation)
        } else {
            None
        };
        let (config, exe) = with.unwrap_or((&self.config, &self.exe));
        // A reload may start more workers than the serving pool has slots.
        let cpu = self
            .pool
            .slots
            .get(slot)
            .map_or(self.cpus[slot % self.cpus.len()], |s| s.cpu);
        let board_index = self.board.assign().ok_or_else(|| {
            // Entries come free as old workers exit: a resource shortage, not a failure.
            std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "no free load-board entry: too many workers alive at once",
            )
        })?;
        let (mask, affinity) = self.balance.initial(cpu);
        let mempolicy = self.numa.policy_for(config.numa, cpu);
        let spawned = spawn::spawn(SpawnRequest {
            exe,
            listeners: &self.listeners,
            board: self.board.fd().as_raw_fd(),
            mask: &mask,
            mempolicy: mempolicy.as_ref(),
            argv: &self.argv,
        });
        let spawned = match spawned {
            Ok(s) => s,
            Err(e) => {
                self.board.release(board_index);
                return Err(e);
            }
        };
        let pid = spawned.pid;
        let request_limit = if config.max_requests > 0 {
            config
                .max_requests
                .saturating_add(fastrand::u64(0..=config.max_requests_jitter))
        } else {
            0
        };
        let setup = WorkerSetup {
            slot,
            generation,
            cpu,
            listeners: self.listeners.iter().map(|l| l.name.clone()).collect(),
            board_index,
            log_level: config.log_level.clone(),
            http: config.http.clone(),
            service: config.service.clone(),
            max_requests: request_limit,
            chaos: config.chaos,
            accept: config.accept,
            drain_timeout_ms: config.drain_timeout.as_millis() as u64,
            crash_on_boot: config.chaos_boot_crash,
            tls: config.tls.clone(),
            tls_tickets,
            ready_path: config.http.ready_path(),
        };
        let tx = self.attach_channel(pid, spawned.channel, &ToWorker::Setup(Box::new(setup)))?;
        let handoff = Arc::new(spawned.handoff);
        if config.accept == AcceptStrategy::RoundRobin {
            self.watch_handoff(pid, handoff.clone())?;
        }
        let now = Instant::now();
        self.pool.workers.insert(
            pid,
            Worker {
                pid,
                slot,
                generation,
                cpu,
                state: WorkerState::Starting,
                started: now,
                ready_at: None,
                last_pong: now,
                ping_seq: 0,
                pong_seq: 0,
                drain_seq: None,
                channel_closed: false,
                requests: 0,
                connections: 0,
                request_limit,
                memory: Default::default(),
                retire: None,
                killed: None,
                tx,
                handoff,
                board_index,
                version: None,
                rates: Default::default(),
                ping_sent: None,
                mask,
                affinity,
            },
        );
        if let Some(w) = self.pool.workers.get(&pid) {
            self.metrics_spawned(w);
        }
        info!(
            worker_id = slot,
            worker_pid = pid,
            generation,
            cpu,
            "worker {slot} (pid {pid}) started on CPU {cpu}, generation {generation}"
        );
        Ok(pid)
    }

    /// Wires a worker's channel into the loop: a reader task forwarding decoded messages,
    /// a writer task draining an unbounded queue (so the loop never waits on a worker).
    ///
    /// `first` (the boot message) is written before this returns, not queued: the writer
    /// task runs only when the loop yields, and a reload of hundreds of workers spawns them
    /// all in one turn, which on a loaded host outlasts the worker's wait for its setup. The
    /// socket pair is new and empty, so the write fits its buffer; the timeout only bounds a
    /// message larger than the buffer that a dead worker never reads. A failed write is not
    /// a failed spawn: a worker that is already gone (a binary that exits at once) is judged
    /// by its exit like any other, and one left without its setup gives up on its own.
    fn attach_channel(
        &self,
        pid: i32,
        mut stream: std::os::unix::net::UnixStream,
        first: &ToWorker,
    ) -> std::io::Result<mpsc::UnboundedSender<ToWorker>> {
        {
            use std::io::Write;
            use tokio_util::codec::Encoder;
            let mut frame = bytes::BytesMut::new();
            ipc::codec().encode(ipc::encode(first), &mut frame)?;
            stream.set_write_timeout(Some(Duration::from_secs(2)))?;
            if let Err(e) = stream.write_all(&frame) {
                tracing::debug!(pid, "boot message not delivered: {e}");
            }
        }
        stream.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(stream)?;
        let (mut sink, mut frames) = Framed::new(stream, ipc::codec()).split();
        let events = self.channel_tx.clone();
        tokio::spawn(async move {
            let error = loop {
                match frames.next().await {
                    None => break None,
                    Some(Err(e)) => break Some(e.to_string()),
                    Some(Ok(frame)) => match ipc::decode::<ToMaster>(&frame) {
                        Ok(msg) => {
                            if events.send(ChannelEvent::Message { pid, msg }).is_err() {
                                return;
                            }
                        }
                        Err(e) => break Some(e),
                    },
                }
            };
            let _ = events.send(ChannelEvent::Closed { pid, error });
        });
        let (tx, mut rx) = mpsc::unbounded_channel::<ToWorker>();
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                if sink.send(ipc::encode(&msg)).await.is_err() {
                    break;
                }
            }
        });
        Ok(tx)
    }

    // ---- reload --------------------------------------------------------------------------

    fn request_reload(&mut self, reply: Option<tokio::sync::oneshot::Sender<Reply>>) {
        match &self.phase {
            Phase::Stopping { .. } => {
                if let Some(r) = reply {
                    let _ = r.send(Reply::error("the service is shutting down"));
                }
            }
            _ if self.stop_pending() => {
                if let Some(r) = reply {
                    let _ = r.send(Reply::error(
                        "the service is shutting down (draining before the stop)",
                    ));
                }
            }
            Phase::Serving => self.begin_rollover(reply.into_iter().collect()),
            Phase::Booting | Phase::Rolling(_) => {
                info!("reload requested while busy: it will follow the current one");
                self.reload_queue.get_or_insert_with(Vec::new).extend(reply);
            }
        }
    }
}

/// Grows or shrinks the slot table; slot `i` is homed (pinned, under `pin` and `auto`) on
/// `cpus[i % cpus.len()]`.
fn resize_slots(pool: &mut Pool, n: usize, cpus: &[usize], now: Instant) {
    pool.slots.truncate(n);
    while pool.slots.len() < n {
        let i = pool.slots.len();
        pool.slots.push(Slot {
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

/// Which sockets the program has handlers for (names only: the master never builds them).
pub struct Handlers {
    pub named: Vec<String>,
    pub default: bool,
}

/// The master role: configuration, sockets, then the loop until the pool stops.
pub fn serve(
    args: ServeArgs,
    check: SettingsCheck,
    handlers: Handlers,
) -> Result<i32, exit::Fatal> {
    let mut cpus = spawn::allowed_cpus();
    let config = Config::load(&args, cpus.len(), check)?;
    if let crate::config::CpuAffinity::List(list) = &config.cpu_affinity {
        if let Some(c) = list.iter().find(|c| !cpus.contains(c)) {
            return Err(exit::Fatal::config(format!(
                "config error: cpu_affinity: CPU {c} is not one this process may use ({})",
                affinity::format_cpu_list(&cpus)
            )));
        }
        // Slots take their home CPU (logs, `app status`) from the list.
        cpus = list.clone();
    }
    crate::logging::init(&config.log_level, crate::logging::Identity::Master);
    // Both read and scrub the environment, so they run before any thread exists.
    let (mut listeners, activated) = crate::listen::take_or_bind(config.bind)?;
    // The metrics endpoint: systemd's socket named `metrics`, else `--metrics ADDR`.
    let metrics_name = crate::worker::METRICS_SOCKET;
    if let Some(addr) = config.metrics
        && !listeners.iter().any(|l| l.name == metrics_name)
    {
        let mut l = crate::listen::bind_tcp(addr)?;
        l.name = metrics_name.to_string();
        listeners.push(l);
    }
    // HAProxy's agent-check: systemd's socket named `agent`, else `--agent ADDR`.
    let agent_name = crate::worker::AGENT_SOCKET;
    if let Some(addr) = config.agent
        && !listeners.iter().any(|l| l.name == agent_name)
    {
        let mut l = crate::listen::bind_tcp(addr)?;
        l.name = agent_name.to_string();
        listeners.push(l);
    }
    for (i, l) in listeners.iter().enumerate() {
        // The library serves `metrics` and `agent` itself unless the program registers a
        // handler.
        if l.name == metrics_name || l.name == agent_name {
            continue;
        }
        if !handlers.default && !handlers.named.contains(&l.name) {
            return Err(exit::Fatal::config(format!(
                "listening socket {i} ({}, name {:?}) has no handler: the program registers {}",
                l.description,
                l.name,
                if handlers.named.is_empty() {
                    "none".to_string()
                } else {
                    handlers.named.join(", ")
                }
            )));
        }
    }
    let notifier = Notifier::from_env();
    info!(
        "master {} starting {} worker(s) on CPUs {:?}, cpu_affinity = {}, numa = {:?}; {}",
        std::process::id(),
        config.workers,
        cpus,
        config.cpu_affinity,
        config.numa,
        if activated {
            "sockets from systemd"
        } else {
            "socket bound by hand"
        }
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| exit::Fatal::os(format!("cannot build runtime: {e}")))?;
    let mut master = Master::new(args, config, cpus, listeners, notifier, check)?;
    master.bound_by_hand = !activated;
    Ok(rt.block_on(master.run()))
}

/// A start that failed because the host is short of something (descriptors, processes,
/// memory), not because of the worker or its binary.
fn host_resource_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::EAGAIN | libc::ENOMEM | libc::ENOBUFS)
    ) || matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::OutOfMemory
    )
}

/// Exponential from [`SPAWN_RETRY_BASE`], capped at [`SPAWN_RETRY_CAP`], with jitter over
/// the upper half.
fn spawn_retry_delay(failures: u32) -> Duration {
    let exp = SPAWN_RETRY_BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let delay = exp.min(SPAWN_RETRY_CAP);
    let half = delay / 2;
    half + half.mul_f64(fastrand::f64())
}

/// Raises the soft descriptor limit to the hard one (the master's loop uses epoll, so a
/// large table costs nothing); round-robin's connection cap and every worker's
/// `max_connections` are bounded by it.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
