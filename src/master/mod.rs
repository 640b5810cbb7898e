//! The master: supervises workers and never serves a request.
//!
//! This file is the master's shell: one loop on a single-threaded runtime that waits for
//! the next thing to happen (a signal, a message from a worker or the control socket, an
//! exited child, a 50 ms tick), hands it to the supervisor core ([`core::Supervisor`],
//! which decides everything and does no I/O), and carries out what the core asks for
//! ([`core::Action`]: start or kill a worker, send it a message, tell systemd, answer a
//! client). Every turn ends the same way:
//!
//! 1. the event that woke the loop goes to the core;
//! 2. [`read_last_words`](Master::read_last_words) and [`reap`](Master::reap): exited
//!    workers, each an [`Event::Exited`];
//! 3. [`read_memory`](Master::read_memory): memory, read from `/proc` and handed to the
//!    core, once a second (every 150 ms for a worker near its limit or growing fast);
//! 4. [`balance_affinity`](Master::balance_affinity): under `cpu_affinity = auto`;
//! 5. [`Event::Tick`]: the core's own steps (hung workers, rollover, refill, stop, report);
//! 6. [`metrics_turn`](Master::metrics_turn): what only the master knows, for the endpoint.
//!
//! The master knows nothing of requests; workers know nothing of supervision. They meet only
//! on the IPC channel ([`crate::ipc`]). Under round-robin, client connections are handed
//! out by a task of their own ([`dispatch`]): they never reach this loop.

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
pub mod core;
mod dispatch;
pub mod memory;
mod metrics;
mod numa;
mod process;
mod rates;
pub mod spawn;
mod status;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::config::{AcceptStrategy, Config, ServeArgs, SettingsCheck};
use crate::control::{self, Reply, Request};
use crate::exit;
use crate::ipc::ToMaster;
use crate::listen::Listener;
use crate::loadboard::{LoadBoard, Readiness};
use crate::notify::Notifier;

use self::core::{Action, Event, ExitStatus, Facts, Notify, ReplyTo, Supervisor};
use dispatch::{ConnBudget, RoundRobin};
use process::Process;
use spawn::Executable;

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

/// What a worker's channel reports.
enum ChannelEvent {
    Message { pid: i32, msg: ToMaster },
    Closed { pid: i32, error: Option<String> },
}

pub struct Master {
    core: Supervisor,
    args: ServeArgs,
    /// The command line workers are started with (see [`spawn::SpawnRequest::argv`]).
    argv: Vec<std::ffi::OsString>,
    /// Checks the `[service]` table on every reload.
    check: SettingsCheck,
    /// CPUs this process may use (or `cpu_affinity`'s list): sizes `workers = "auto"`.
    cpus: Vec<usize>,
    listeners: Vec<Listener>,
    /// The binary each generation runs (the serving one's, and one being rolled out).
    exes: BTreeMap<u64, Executable>,
    processes: BTreeMap<i32, Process>,
    notifier: Notifier,
    /// Control clients waiting for the core's answer.
    replies: HashMap<ReplyTo, oneshot::Sender<Reply>>,
    next_reply: u64,
    /// The TLS session-ticket key of each generation with workers (see [`crate::tls`]).
    ticket_keys: BTreeMap<u64, crate::tls::TicketKey>,
    channel_tx: mpsc::UnboundedSender<ChannelEvent>,
    channel_rx: mpsc::UnboundedReceiver<ChannelEvent>,
    next_memory_check: Instant,
    /// Workers still to be read in the current memory sweep (see [`MEMORY_READS_PER_TURN`]),
    /// and whether one read so far was close to the limit.
    memory_sweep: Vec<i32>,
    memory_sweep_hot: bool,
    memory_sweep_started: Instant,
    control_path: std::path::PathBuf,
    board: LoadBoard,
    /// The round-robin task, under `accept = "round-robin"`.
    round_robin: Option<RoundRobin>,
    /// Connections the master holds for round-robin, and how many it may.
    conn_budget: Arc<ConnBudget>,
    next_cap_update: Instant,
    /// The pool's metrics page (in the load board's memfd), if it could be made.
    metrics: Option<crate::metrics::Page>,
    interval: metrics::Interval,
    /// `cpu_affinity` (as set at start) and, under `auto`, its policy.
    balance: balance::Balance,
    /// NUMA nodes, for `numa`.
    numa: numa::Topology,
    /// Set by [`Action::Exit`].
    exit: Option<i32>,
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
        bound_by_hand: bool,
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
        let numa = numa::Topology::read();
        if let Some(why) = numa.no_effect(config.numa) {
            info!("{why}");
        }
        let facts = Facts {
            cpus: cpus.clone(),
            bound_by_hand,
            control_path: control_path.clone(),
            watchdog: notifier.watchdog(),
        };
        Ok(Master {
            balance: balance::Balance::new(config.cpu_affinity.clone(), cpus.clone(), now),
            core: Supervisor::new(config, facts, now),
            numa,
            args,
            argv: std::env::args_os().collect(),
            check,
            cpus,
            listeners,
            exes: BTreeMap::from([(1, exe)]),
            processes: BTreeMap::new(),
            notifier,
            replies: HashMap::new(),
            next_reply: 0,
            ticket_keys: BTreeMap::new(),
            channel_tx,
            channel_rx,
            next_memory_check: now,
            memory_sweep: Vec::new(),
            memory_sweep_hot: false,
            memory_sweep_started: now,
            control_path,
            board,
            round_robin: None,
            conn_budget: ConnBudget::new(dispatch::MAX_HELD),
            next_cap_update: now,
            metrics,
            interval: Default::default(),
            exit: None,
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
        let workers = self.core.config().workers;
        if workers > self.cpus.len() {
            info!(
                "{workers} workers on {} CPUs: workers share CPUs round-robin",
                self.cpus.len()
            );
        }
        if self.core.config().accept == AcceptStrategy::RoundRobin {
            dispatch::update_cap(&self.conn_budget, self.core.pool().slots.len());
            self.round_robin = Some(RoundRobin::start(&self.listeners, self.conn_budget.clone()));
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
            let event = match wake {
                Wake::Child => None,
                Wake::Tick => {
                    self.ratchet_ticket_keys();
                    None
                }
                Wake::Stop(why, fast) => Some(Event::Stop { why, fast }),
                Wake::Reload => Some(Event::Reload(None)),
                Wake::Scale(d) => Some(Event::ScaleBy(d)),
                Wake::Channel(ev) => Some(self.on_channel(ev)),
                Wake::Control(req) => self.on_control(req),
            };
            if let Some(event) = event {
                self.step(event).await;
            }
            self.read_last_words().await;
            self.reap().await;
            let now = Instant::now();
            self.read_memory(now).await;
            self.update_conn_cap(now);
            self.balance_affinity(now);
            self.step(Event::Tick).await;
            if let Some(code) = self.exit {
                control::remove_own_socket();
                return code;
            }
            self.update_handoff_targets();
            self.prune_generations();
            self.metrics_turn(Instant::now());
        }
    }

    /// Hands `event` to the core and carries out what it decides, including what the
    /// answers to those actions (a spawn's pid, a loaded configuration) decide in turn.
    async fn step(&mut self, event: Event) {
        let mut todo: VecDeque<Action> = self.core.on(event, Instant::now()).into();
        while let Some(action) = todo.pop_front() {
            let answer = self.carry_out(action).await;
            for event in answer {
                todo.extend(self.core.on(event, Instant::now()));
            }
        }
    }

    /// Does what the core asked; returns the events that answer it.
    async fn carry_out(&mut self, action: Action) -> Vec<Event> {
        let now = Instant::now();
        match action {
            Action::Spawn {
                generation,
                slot,
                cpu,
                request_limit,
            } => {
                return vec![
                    match self.spawn_worker(generation, slot, cpu, request_limit) {
                        Ok(pid) => Event::Spawned {
                            generation,
                            slot,
                            pid,
                        },
                        Err(e) => Event::SpawnFailed {
                            generation,
                            slot,
                            host_resource: process::host_resource_error(&e),
                            error: e.to_string(),
                        },
                    },
                ];
            }
            Action::Kill(pid) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            Action::Send(pid, msg) => {
                if let Some(p) = self.processes.get_mut(&pid) {
                    p.send(msg, now);
                }
            }
            Action::Load { generation } => {
                return vec![Event::Loaded {
                    generation,
                    result: self.load(generation),
                }];
            }
            Action::Notify(n) => match n {
                Notify::Ready(status) => self.notifier.ready(&status),
                Notify::Reloading => self.notifier.reloading(),
                Notify::Status(status) => self.notifier.status(&status),
                Notify::Stopping(status) => self.notifier.stopping(&status),
                Notify::Watchdog => self.notifier.watchdog_ping(),
                Notify::ExtendTimeout(by) => self.notifier.extend_timeout(by),
                Notify::Failed(status) => self.notifier.failed(&status, libc::ECHILD as u32),
            },
            Action::Reply(to, reply) => {
                if let Some(tx) = self.replies.remove(&to) {
                    let _ = tx.send(*reply);
                }
            }
            Action::Readiness(r) => {
                self.board.set_readiness(r);
                if let Some(p) = &self.metrics {
                    p.set_ready(r == Readiness::Ready);
                }
            }
            Action::StopAccepting => {
                if let Some(rr) = &self.round_robin {
                    rr.stop().await;
                }
            }
            Action::Count(c) => self.metrics_count(c),
            Action::Exit(code) => self.exit = Some(code),
        }
        Vec::new()
    }

    // ---- events ------------------------------------------------------------------------

    /// The core's event for what a channel reported, after the shell took its figures.
    fn on_channel(&mut self, ev: ChannelEvent) -> Event {
        match ev {
            ChannelEvent::Message { pid, msg } => {
                let now = Instant::now();
                if let (ToMaster::Pong { seq, requests, .. }, Some(p)) =
                    (&msg, self.processes.get_mut(&pid))
                {
                    p.rates.requests(now, *requests);
                    if let (Some(page), Some(rtt)) = (&self.metrics, p.round_trip(*seq, now)) {
                        metrics::pong(page, p.board_index, rtt);
                    }
                }
                Event::Message(pid, msg)
            }
            ChannelEvent::Closed { pid, error } => Event::ChannelClosed { pid, error },
        }
    }

    /// `app status` is answered here (it needs `/proc` and the metrics page); everything
    /// else is the core's.
    fn on_control(&mut self, req: control::Incoming) -> Option<Event> {
        // A status is answered at once from the shell's view; everything else is a decision
        // for the core, answered through `Action::Reply` when it is done.
        let reply = ReplyTo(self.next_reply + 1);
        let event = match req.request {
            Request::Status => {
                let status = self.status_report();
                let _ = req.reply.send(Reply {
                    ok: true,
                    status: Some(status),
                    ..Default::default()
                });
                return None;
            }
            Request::Reload => Event::Reload(Some(reply)),
            Request::Drain => Event::Drain(reply),
            Request::Undrain => Event::Undrain(reply),
            Request::Scale { to, by } => Event::Scale { to, by, reply },
        };
        self.next_reply = reply.0;
        self.replies.insert(reply, req.reply);
        Some(event)
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
            let event = self.on_channel(ev);
            self.step(event).await;
        }
    }

    /// Collects every exited child; the core decides what each exit means.
    async fn reap(&mut self) {
        loop {
            let (pid, status) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(WaitStatus::Exited(pid, code)) => (pid.as_raw(), ExitStatus::Code(code)),
                Ok(WaitStatus::Signaled(pid, signal, core_dumped)) => (
                    pid.as_raw(),
                    ExitStatus::Signal {
                        signal,
                        core_dumped,
                    },
                ),
                Ok(_) => continue,
            };
            if let Some(p) = self.processes.remove(&pid) {
                self.metrics_reaped(&p);
                self.board.release(p.board_index);
                if let Some(rr) = &self.round_robin {
                    rr.gone(pid);
                }
            }
            self.step(Event::Exited(pid, status)).await;
        }
    }

    /// Memory, read once a second, or every [`MEMORY_CHECK_FAST`] while a worker is above
    /// half the limit or grew by more than an eighth of it since the last check; the core
    /// recycles what is over.
    async fn read_memory(&mut self, now: Instant) {
        if self.memory_sweep.is_empty() {
            if now < self.next_memory_check {
                return;
            }
            self.memory_sweep = self.processes.keys().rev().copied().collect();
            self.memory_sweep_hot = false;
            self.memory_sweep_started = now;
        }
        let max = self.core.config().max_memory;
        let take = self.memory_sweep.len().min(MEMORY_READS_PER_TURN);
        let batch = self.memory_sweep.split_off(self.memory_sweep.len() - take);
        for pid in batch {
            let Some(p) = self.processes.get_mut(&pid) else {
                continue;
            };
            let before = p.memory.charged();
            if let Some(m) = memory::read(pid) {
                p.memory = m;
            }
            p.rates.sample_cpu(now, pid);
            let charged = p.memory.charged();
            let retiring = self.core.worker(pid).is_some_and(|w| w.retire().is_some());
            if max > 0
                && !retiring
                && (charged > max / 2 || charged.saturating_sub(before) > max / 8)
            {
                self.memory_sweep_hot = true;
            }
            self.step(Event::Memory { pid, charged }).await;
        }
        if self.memory_sweep.is_empty() {
            let every = if self.memory_sweep_hot {
                MEMORY_CHECK_FAST
            } else {
                MEMORY_CHECK
            };
            self.next_memory_check = self.memory_sweep_started + every;
        }
    }

    // ---- carrying out ----------------------------------------------------------------------

    /// Round-robin: the connection cap follows the descriptor limit, once a second.
    fn update_conn_cap(&mut self, now: Instant) {
        if self.round_robin.is_some() && now >= self.next_cap_update {
            self.next_cap_update = now + MEMORY_CHECK;
            dispatch::update_cap(&self.conn_budget, self.core.pool().slots.len());
        }
    }

    /// [`Action::Load`]: the configuration file re-read and the binary now on disk opened.
    fn load(&mut self, generation: u64) -> Result<Box<Config>, String> {
        let config =
            Config::load(&self.args, self.cpus.len(), self.check).map_err(|e| e.message)?;
        let serving = self.core.pool().generation;
        let path = self.exes[&serving].path.clone();
        let exe =
            Executable::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        self.exes.insert(generation, exe);
        Ok(Box::new(config))
    }

    /// Round-robin: the workers that take connections now (the serving generation's ready
    /// workers), for the round-robin task.
    fn update_handoff_targets(&mut self) {
        let Some(rr) = &mut self.round_robin else {
            return;
        };
        let targets = self
            .core
            .pool()
            .serving_workers()
            .filter_map(|w| self.processes.get(&w.pid))
            .map(|p| (p.pid, p.handoff.clone()))
            .collect();
        rr.set_targets(targets);
    }

    /// Drops the binaries of generations that can start no more workers.
    fn prune_generations(&mut self) {
        let serving = self.core.pool().generation;
        let rolling = match self.core.phase() {
            core::Phase::Rolling(r) => Some(r.generation),
            _ => None,
        };
        if self.exes.len() > 1 {
            self.exes
                .retain(|g, _| *g == serving || Some(*g) == rolling);
        }
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
    // The metrics endpoint: systemd's socket named `metrics`, else `--metrics ADDR`; HAProxy's
    // agent-check: systemd's socket named `agent`, else `--agent ADDR`.
    for (addr, name) in [
        (config.metrics, crate::worker::METRICS_SOCKET),
        (config.agent, crate::worker::AGENT_SOCKET),
    ] {
        if let Some(addr) = addr
            && !listeners.iter().any(|l| l.name == name)
        {
            let mut l = crate::listen::bind_tcp(addr)?;
            l.name = name.to_string();
            listeners.push(l);
        }
    }
    for (i, l) in listeners.iter().enumerate() {
        // The library serves `metrics` and `agent` itself unless the program registers a
        // handler.
        if [crate::worker::METRICS_SOCKET, crate::worker::AGENT_SOCKET].contains(&l.name.as_str()) {
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
    let master = Master::new(args, config, cpus, listeners, notifier, check, !activated)?;
    Ok(rt.block_on(master.run()))
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
