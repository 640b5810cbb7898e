//! The master: supervises workers and never serves a request.
//!
//! One loop on a single-threaded runtime, in the manner of gunicorn's arbiter. It wakes on a
//! signal, a message from a worker or the control socket, or a 50 ms tick, handles that one
//! thing, and then every turn runs the same named steps:
//!
//! 1. [`reap`](Master::reap) exited workers and decide what each exit means;
//! 2. [`murder_hung`](Master::murder_hung) workers that stopped answering heartbeats, and
//!    send the next heartbeat;
//! 3. [`check_limits`](Master::check_limits): memory, once a second;
//! 4. [`advance_rollover`](Master::advance_rollover) when a reload is under way;
//! 5. [`spawn_to_target`](Master::spawn_to_target): refill every empty slot whose backoff
//!    has run out;
//! 6. [`report`](Master::report): READY=1 once, STATUS= when it changed, WATCHDOG=1 when the
//!    pool is healthy.
//!
//! The master knows nothing of requests; workers know nothing of supervision. They meet only
//! on the IPC channel ([`crate::ipc`]).

pub mod budget;
mod dispatch;
pub mod memory;
pub mod pool;
mod report;
mod rollover;
pub mod spawn;
mod stop;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tracing::{error, info, warn};

use crate::config::{AcceptStrategy, Config, ServeArgs};
use crate::control::{self, Reply, Request};
use crate::exit;
use crate::ipc::{self, ToMaster, ToWorker, WorkerSetup};
use crate::listen::Listener;
use crate::loadboard::LoadBoard;
use crate::notify::Notifier;

use budget::RestartBudget;
use dispatch::Dispatcher;
use pool::{Pool, Retire, Slot, Worker, WorkerState};
use rollover::Rollover;
use spawn::{Executable, SpawnRequest};

const TICK: Duration = Duration::from_millis(50);
const MEMORY_CHECK: Duration = Duration::from_secs(1);

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
    Accepted(OwnedFd),
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
    last_reload: Option<control::ReloadReport>,
    channel_tx: mpsc::UnboundedSender<ChannelEvent>,
    channel_rx: mpsc::UnboundedReceiver<ChannelEvent>,
    started: Instant,
    next_heartbeat: Instant,
    next_memory_check: Instant,
    next_watchdog: Instant,
    control_path: std::path::PathBuf,
    dispatcher: Dispatcher,
    board: LoadBoard,
    acceptors: Vec<tokio::task::JoinHandle<()>>,
}

impl Master {
    pub fn new(
        args: ServeArgs,
        config: Config,
        cpus: Vec<usize>,
        listeners: Vec<Listener>,
        notifier: Notifier,
    ) -> Result<Master, exit::Fatal> {
        let exe = Executable::current()
            .map_err(|e| exit::Fatal::os(format!("cannot open own executable: {e}")))?;
        let board = LoadBoard::create()
            .map_err(|e| exit::Fatal::os(format!("cannot create the load board: {e}")))?;
        let (channel_tx, channel_rx) = mpsc::unbounded_channel();
        let now = Instant::now();
        let control_path = config
            .control_socket
            .clone()
            .unwrap_or_else(control::default_path);
        let mut pool = Pool::new();
        resize_slots(&mut pool, config.workers, &cpus, now);
        Ok(Master {
            budget: RestartBudget::new(config.restart_limit, config.restart_window),
            args,
            config,
            cpus,
            listeners,
            exe,
            pool,
            notifier,
            phase: Phase::Booting,
            reload_queue: None,
            last_generation: 1,
            last_reload: None,
            channel_tx,
            channel_rx,
            started: now,
            next_heartbeat: now,
            next_memory_check: now,
            next_watchdog: now,
            control_path,
            dispatcher: Dispatcher::default(),
            board,
            acceptors: Vec::new(),
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
            tokio::select! {
                biased;
                _ = chld.recv() => {}
                _ = term.recv() => self.stop("SIGTERM", false),
                _ = int.recv() => self.stop("SIGINT", false),
                _ = quit.recv() => self.stop("SIGQUIT", true),
                _ = hup.recv() => self.request_reload(None),
                _ = ttin.recv() => self.scale(1),
                _ = ttou.recv() => self.scale(-1),
                Some(ev) = self.channel_rx.recv() => {
                    // Connection hand-offs are traffic, not supervision events: they skip
                    // the turn's steps.
                    if !self.on_channel(ev) {
                        continue;
                    }
                }
                Some(req) = control_rx.recv() => self.on_control(req),
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            self.reap(now);
            self.murder_hung(now);
            self.check_limits(now);
            self.advance_rollover(now);
            self.spawn_to_target(now);
            if let Some(code) = self.advance_stop(now) {
                control::remove_own_socket();
                return code;
            }
            self.report(now);
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
                if let Some(w) = self.pool.workers.get_mut(&pid)
                    && let Some(e) = error
                {
                    // A worker speaking garbage cannot be trusted to be healthy.
                    warn!(
                        slot = w.slot,
                        pid, "IPC protocol error from worker: {e}; killing it"
                    );
                    w.kill(format!("IPC protocol error: {e}"));
                }
            }
        }
        true
    }

    fn on_message(&mut self, pid: i32, msg: ToMaster, now: Instant) {
        let drain_timeout = self.config.drain_timeout;
        let Some(w) = self.pool.workers.get_mut(&pid) else {
            return;
        };
        match msg {
            ToMaster::Ready => {
                if w.state == WorkerState::Starting {
                    w.state = WorkerState::Ready;
                    w.ready_at = Some(now);
                    w.last_pong = now;
                    let (slot, generation) = (w.slot, w.generation);
                    info!(
                        slot,
                        pid,
                        generation,
                        "worker ready in {:.1} ms",
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
                seq: _,
                requests,
                connections,
            } => {
                w.last_pong = now;
                w.requests = requests;
                w.connections = connections;
                if w.request_limit > 0 && requests >= w.request_limit && w.retire.is_none() {
                    info!(
                        slot = w.slot,
                        pid, "worker served {requests} requests (max_requests): recycling it"
                    );
                    w.retire = Some(Retire::Recycle(format!("served {requests} requests")));
                }
            }
            ToMaster::Leaving { reason } => {
                warn!(
                    slot = w.slot,
                    pid, "worker is leaving: {reason}; starting its replacement"
                );
                w.retire = Some(Retire::Leaving(reason));
                w.state = WorkerState::Draining {
                    deadline: now + drain_timeout + Duration::from_secs(1),
                };
                let (slot, generation) = (w.slot, w.generation);
                if generation == self.pool.generation && !self.budget.record(now) {
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
        }
    }

    fn scale(&mut self, delta: i32) {
        if !matches!(self.phase, Phase::Serving | Phase::Booting) {
            warn!("ignoring a scale request during a reload or shutdown");
            return;
        }
        let now = Instant::now();
        let old = self.pool.slots.len();
        let new = (old as i64 + delta as i64).clamp(1, 1024) as usize;
        if new == old {
            info!("scale request ignored: the pool never goes below 1 worker");
            return;
        }
        resize_slots(&mut self.pool, new, &self.cpus, now);
        let generation = self.pool.generation;
        for w in self.pool.workers.values_mut() {
            if w.generation == generation && w.slot >= new && w.retire.is_none() {
                w.retire = Some(Retire::ScaledDown);
                w.drain(self.config.drain_timeout, now);
            }
        }
        info!("pool scaled from {old} to {new} workers");
        if new > self.cpus.len() {
            info!(
                "{new} workers on {} CPUs: workers share CPUs round-robin",
                self.cpus.len()
            );
        }
    }

    // ---- the steps of every turn ---------------------------------------------------------

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
            self.pool.requests_retired += w.requests;
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
            info!(
                slot = w.slot,
                pid = w.pid,
                generation = w.generation,
                "worker exited ({cause}) after {:.1}s, retired: {retire:?}",
                uptime.as_secs_f64()
            );
            return;
        }
        if matches!(self.phase, Phase::Stopping { .. }) {
            info!(
                slot = w.slot,
                pid = w.pid,
                "worker exited ({cause}) during shutdown"
            );
            return;
        }
        if let Phase::Rolling(r) = &mut self.phase
            && w.generation == r.generation
        {
            r.failed.get_or_insert(format!(
                "new worker {} (pid {}) exited while starting: {cause}",
                w.slot, w.pid
            ));
            warn!(
                slot = w.slot,
                pid = w.pid,
                "new-generation worker exited ({cause})"
            );
            return;
        }
        if w.generation != self.pool.generation {
            info!(
                slot = w.slot,
                pid = w.pid,
                "old-generation worker exited ({cause})"
            );
            return;
        }
        let lived = if w.ready_at.is_some() {
            uptime
        } else {
            Duration::ZERO
        };
        warn!(
            slot = w.slot,
            pid = w.pid,
            generation = w.generation,
            "worker exited unexpectedly ({cause}) after {:.1}s{}; replacing it",
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
                info!(
                    slot = w.slot,
                    "restarting in {} ms (backoff)",
                    delay.as_millis()
                );
            }
        }
        if !self.budget.record(now) {
            self.give_up(format!("worker {} exited ({cause})", w.slot));
        }
    }

    /// Kills workers that stopped answering heartbeats, or never became ready, or overran
    /// their drain; then sends the next heartbeat.
    fn murder_hung(&mut self, now: Instant) {
        let interval = self.config.heartbeat_interval;
        let misses = self.config.heartbeat_misses;
        // `misses` pings unanswered, the last of them given half an interval to answer.
        let silence_limit = interval * misses + interval / 2;
        let ready_timeout = self.config.ready_timeout;
        for w in self.pool.workers.values_mut() {
            if w.killed.is_some() {
                continue;
            }
            match w.state {
                WorkerState::Ready if now.duration_since(w.last_pong) > silence_limit => {
                    let silent = now.duration_since(w.last_pong);
                    warn!(
                        slot = w.slot,
                        pid = w.pid,
                        "worker missed {misses} heartbeats (silent for {} ms): killing it",
                        silent.as_millis()
                    );
                    w.kill(format!(
                        "hung, no heartbeat answer for {} ms",
                        silent.as_millis()
                    ));
                }
                WorkerState::Starting if now.duration_since(w.started) > ready_timeout => {
                    warn!(
                        slot = w.slot,
                        pid = w.pid,
                        "worker not ready after {ready_timeout:?}: killing it"
                    );
                    w.kill(format!(
                        "not ready within ready_timeout ({ready_timeout:?})"
                    ));
                }
                WorkerState::Draining { deadline } if now > deadline => {
                    warn!(
                        slot = w.slot,
                        pid = w.pid,
                        "worker still draining at its deadline: killing it, cutting {} connection(s)",
                        w.connections
                    );
                    w.kill(format!(
                        "drain timeout, {} connection(s) cut",
                        w.connections
                    ));
                }
                _ => {}
            }
        }
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + interval;
            for w in self.pool.workers.values_mut() {
                if w.state == WorkerState::Ready && w.killed.is_none() {
                    w.ping_seq += 1;
                    w.send(ToWorker::Ping { seq: w.ping_seq });
                }
            }
        }
    }

    /// Memory limits, checked once a second; over-limit workers are recycled.
    fn check_limits(&mut self, now: Instant) {
        if now < self.next_memory_check {
            return;
        }
        self.next_memory_check = now + MEMORY_CHECK;
        let max = self.config.max_memory;
        for w in self.pool.workers.values_mut() {
            if let Some(m) = memory::read(w.pid) {
                w.memory = m;
            }
            if max > 0
                && w.memory.charged() > max
                && w.retire.is_none()
                && w.state == WorkerState::Ready
            {
                let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
                info!(
                    slot = w.slot,
                    pid = w.pid,
                    "worker uses {:.1} MiB > max_memory {:.1} MiB: recycling it",
                    mib(w.memory.charged()),
                    mib(max)
                );
                w.retire = Some(Retire::Recycle(format!(
                    "memory {:.1} MiB over max_memory",
                    mib(w.memory.charged())
                )));
            }
        }
    }

    /// Starts a worker in every empty slot of the serving generation whose backoff is over.
    fn spawn_to_target(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Stopping { .. }) {
            return;
        }
        let generation = self.pool.generation;
        for slot in 0..self.pool.slots.len() {
            if self.pool.holder(generation, slot).is_some()
                || now < self.pool.slots[slot].next_start
            {
                continue;
            }
            if let Err(e) = self.spawn_worker(slot, generation, None) {
                error!(slot, "cannot start worker: {e}");
                let s = &mut self.pool.slots[slot];
                s.next_start = now + s.backoff.after_exit(Duration::ZERO, self.config.min_uptime);
                if !self.budget.record(now) {
                    self.give_up(format!("cannot start worker {slot}: {e}"));
                    return;
                }
            }
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
        let (config, exe) = with.unwrap_or((&self.config, &self.exe));
        let cpu = self.pool.slots[slot].cpu;
        let board_index = self
            .board
            .assign()
            .ok_or_else(|| std::io::Error::other("no free load-board entry: too many workers"))?;
        let spawned = spawn::spawn(SpawnRequest {
            exe,
            listeners: &self.listeners,
            board: self.board.fd().as_raw_fd(),
            board_index,
            slot,
            generation,
            cpu,
        });
        let spawned = match spawned {
            Ok(s) => s,
            Err(e) => {
                self.board.release(board_index);
                return Err(e);
            }
        };
        let pid = spawned.pid;
        let setup = WorkerSetup {
            log_level: config.log_level.clone(),
            http: config.http.clone(),
            service: config.service.clone(),
            chaos: config.chaos,
            accept: config.accept,
            drain_timeout_ms: config.drain_timeout.as_millis() as u64,
            crash_on_boot: config.chaos_boot_crash,
        };
        let request_limit = if config.max_requests > 0 {
            config
                .max_requests
                .saturating_add(fastrand::u64(0..=config.max_requests_jitter))
        } else {
            0
        };
        let tx = self.attach_channel(pid, spawned.channel)?;
        let handoff = Arc::new(spawned.handoff);
        if config.accept == AcceptStrategy::RoundRobin {
            self.watch_handoff(pid, handoff.clone())?;
        }
        let _ = tx.send(ToWorker::Setup(Box::new(setup)));
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
                requests: 0,
                connections: 0,
                request_limit,
                memory: Default::default(),
                retire: None,
                killed: None,
                tx,
                handoff,
                board_index,
            },
        );
        info!(slot, pid, generation, cpu, "worker started");
        Ok(pid)
    }

    /// Wires a worker's channel into the loop: a reader task forwarding decoded messages,
    /// a writer task draining an unbounded queue (so the loop never waits on a worker).
    fn attach_channel(
        &self,
        pid: i32,
        stream: std::os::unix::net::UnixStream,
    ) -> std::io::Result<mpsc::UnboundedSender<ToWorker>> {
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
            Phase::Serving => self.begin_rollover(reply.into_iter().collect()),
            Phase::Booting | Phase::Rolling(_) => {
                info!("reload requested while busy: it will follow the current one");
                self.reload_queue.get_or_insert_with(Vec::new).extend(reply);
            }
        }
    }
}

/// Grows or shrinks the slot table; slot `i` is pinned to `cpus[i % cpus.len()]`.
fn resize_slots(pool: &mut Pool, n: usize, cpus: &[usize], now: Instant) {
    pool.slots.truncate(n);
    while pool.slots.len() < n {
        let i = pool.slots.len();
        pool.slots.push(Slot {
            cpu: cpus[i % cpus.len()],
            restarts: 0,
            backoff: Default::default(),
            next_start: now,
        });
    }
}
