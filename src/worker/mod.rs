//! A worker process: serves requests and answers its master; knows nothing of supervision.
//!
//! Started by the master as `app worker --slot N ...` with the listening sockets on fd 3..
//! and its IPC channel right after them. It waits for its [`WorkerSetup`], builds one
//! single-threaded tokio runtime (so a handler that blocks the thread also stops heartbeat
//! answers, which is how the master notices), reports `Ready`, then serves until told to
//! drain, until SIGTERM, or until a request panics. EOF on the channel means the master is
//! gone: the worker exits at once rather than hold the port as an orphan (with
//! `PR_SET_PDEATHSIG` as the first line of that defence).

mod chaos;
mod http;
mod timeouts;

use std::cell::Cell;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio_util::codec::Framed;
use tracing::{error, info, warn};

use crate::config::AcceptStrategy;
use crate::ipc::{self, ToMaster, ToWorker, WorkerSetup};
use crate::listen::LISTEN_FDS_START;
use crate::loadboard::LoadBoard;
use crate::logging;
use crate::shutdown::{self, Stage};

/// How long a draining worker keeps idle keep-alive connections open, so that a client
/// already sending its next request on one gets an answer (with `Connection: close`)
/// instead of a reset.
const IDLE_CLOSE_GRACE: Duration = Duration::from_millis(500);

/// How long a worker waits for its setup message before giving up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    #[arg(long)]
    pub slot: usize,
    #[arg(long)]
    pub generation: u64,
    #[arg(long)]
    pub cpu: usize,
    /// Number of listening sockets at fd 3..; the IPC channel follows them.
    #[arg(long)]
    pub listeners: usize,
    /// This worker's entry on the load board.
    #[arg(long)]
    pub board_index: usize,
}

/// Figures shared by the connections of this worker (one thread, so plain cells).
pub struct Stats {
    pub requests: Cell<u64>,
    connections: Cell<u64>,
    board: Option<(LoadBoard, usize)>,
    /// Round-robin: hand-offs may still be queued for this worker until the hand-off loop
    /// has made its last sweep.
    handoff_pending: Cell<bool>,
    /// Why the worker decided to leave (a panic), once it has.
    pub leaving: std::cell::RefCell<Option<String>>,
    pub leave: Notify,
}

impl Stats {
    fn new(board: Option<(LoadBoard, usize)>) -> Stats {
        if let Some((b, i)) = &board {
            b.publish(*i, 0);
        }
        Stats {
            requests: Cell::new(0),
            connections: Cell::new(0),
            board,
            handoff_pending: Cell::new(false),
            leaving: Default::default(),
            leave: Notify::new(),
        }
    }

    pub fn handoff_swept(&self) {
        self.handoff_pending.set(false);
    }

    pub fn connections(&self) -> u64 {
        self.connections.get()
    }

    pub fn connection_opened(&self) {
        self.set_connections(self.connections.get() + 1);
    }

    pub fn connection_closed(&self) {
        self.set_connections(self.connections.get().saturating_sub(1));
    }

    fn set_connections(&self, n: u64) {
        self.connections.set(n);
        if let Some((b, i)) = &self.board {
            b.publish(*i, n);
        }
    }

    /// True when this worker holds clearly more connections than the least busy peer, so
    /// it should let that peer win the next accept (see [`crate::loadboard`]).
    pub fn should_yield_accept(&self) -> bool {
        let Some((b, i)) = &self.board else {
            return false;
        };
        let mine = self.connections.get();
        b.least_other(*i)
            .is_some_and(|least| mine > least + 2 + least / 8)
    }

    pub fn leave(&self, reason: String) {
        let mut l = self.leaving.borrow_mut();
        if l.is_none() {
            *l = Some(reason);
            self.leave.notify_one();
        }
    }
}

pub fn run(args: WorkerArgs) -> i32 {
    set_process_name(args.slot);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("worker {}: cannot build runtime: {e}", args.slot);
            return crate::exit::OSERR;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, serve(args))
}

fn set_process_name(slot: usize) {
    // Workers are exec'd through /proc/self/fd/N, which would make `ps` show "N".
    let name = format!("app-worker-{slot}");
    if let Ok(c) = std::ffi::CString::new(name) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr() as libc::c_ulong, 0, 0, 0) };
    }
}

async fn serve(args: WorkerArgs) -> i32 {
    let ipc_fd = LISTEN_FDS_START + args.listeners as RawFd;
    // SAFETY: the master placed our end of the channel at this descriptor for us.
    let channel = std::os::unix::net::UnixStream::from(unsafe { OwnedFd::from_raw_fd(ipc_fd) });
    if channel.set_nonblocking(true).is_err() {
        return crate::exit::OSERR;
    }
    let Ok(channel) = tokio::net::UnixStream::from_std(channel) else {
        return crate::exit::OSERR;
    };
    let (mut to_master, mut from_master) = Framed::new(channel, ipc::codec()).split();

    let setup: WorkerSetup = match tokio::time::timeout(SETUP_TIMEOUT, from_master.next()).await {
        Ok(Some(Ok(frame))) => match ipc::decode::<ToWorker>(&frame) {
            Ok(ToWorker::Setup(s)) => *s,
            _ => {
                eprintln!("worker {}: first IPC message was not the setup", args.slot);
                return crate::exit::SOFTWARE;
            }
        },
        _ => {
            eprintln!("worker {}: no setup from the master", args.slot);
            return crate::exit::SOFTWARE;
        }
    };
    logging::init(
        &setup.log_level,
        logging::Identity::Worker {
            id: args.slot,
            pid: std::process::id(),
            cpu: args.cpu,
            generation: args.generation,
        },
    );
    std::panic::set_hook(Box::new(|info| error!("panic: {info}")));
    if setup.crash_on_boot {
        error!("crashing while booting, as asked (--chaos-boot-crash)");
        return 3;
    }

    let listeners = match http::take_listeners(args.listeners) {
        Ok(l) => l,
        Err(e) => {
            error!("{e}");
            return crate::exit::OSERR;
        }
    };
    // SAFETY: the master placed the load board's memfd right after the hand-off channel.
    let board = LoadBoard::map(unsafe { OwnedFd::from_raw_fd(ipc_fd + 2) })
        .map_err(|e| warn!("load board unavailable ({e}): accepting without balancing"))
        .ok()
        .map(|b| (b, args.board_index));
    let stats = Rc::new(Stats::new(board));
    let (trigger, shutdown) = shutdown::channel();
    let server = Rc::new(http::Server::new(
        &setup,
        args.slot,
        stats.clone(),
        shutdown.clone(),
    ));
    // SAFETY: the master placed our end of the hand-off channel right after the IPC channel.
    let handoff = unsafe { OwnedFd::from_raw_fd(ipc_fd + 1) };
    match setup.accept {
        AcceptStrategy::Shared => {
            drop(handoff);
            for l in listeners {
                tokio::task::spawn_local(http::accept_loop(l, server.clone(), shutdown.clone()));
            }
        }
        AcceptStrategy::RoundRobin => {
            // The master accepts; this worker needs no listening socket at all.
            drop(listeners);
            stats.handoff_pending.set(true);
            tokio::task::spawn_local(http::handoff_loop(
                handoff,
                server.clone(),
                shutdown.clone(),
            ));
        }
    }
    if to_master.send(ipc::encode(&ToMaster::Ready)).await.is_err() {
        return crate::exit::OK;
    }
    info!("worker serving");

    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    // Ctrl-C in a terminal reaches the whole process group; the master decides for us.
    let _int = signal(SignalKind::interrupt()).expect("signal handler");
    let drain_timeout = loop {
        tokio::select! {
            frame = from_master.next() => match frame.map(|f| f.map_err(|e| e.to_string()).and_then(|f| ipc::decode::<ToWorker>(&f))) {
                Some(Ok(ToWorker::Ping { seq })) => {
                    let pong = ToMaster::Pong {
                        seq,
                        requests: stats.requests.get(),
                        connections: stats.connections(),
                    };
                    if to_master.send(ipc::encode(&pong)).await.is_err() {
                        return crate::exit::OK;
                    }
                }
                Some(Ok(ToWorker::Drain { timeout_ms })) => break Duration::from_millis(timeout_ms),
                Some(Ok(ToWorker::Setup(_))) => warn!("ignoring a second setup message"),
                Some(Err(e)) => {
                    error!("bad message from the master: {e}; exiting");
                    return crate::exit::SOFTWARE;
                }
                None => {
                    warn!("master gone (IPC channel closed): exiting");
                    return crate::exit::OK;
                }
            },
            _ = term.recv() => {
                info!("SIGTERM: draining");
                break setup.drain_timeout();
            }
            _ = stats.leave.notified() => {
                let reason = stats.leaving.borrow().clone().unwrap_or_default();
                let _ = to_master.send(ipc::encode(&ToMaster::Leaving { reason })).await;
                break setup.drain_timeout();
            }
        }
    };
    drain(trigger, &stats, drain_timeout, &mut from_master).await
}

/// Stops accepting, lets in-flight requests finish within `timeout`, then returns the exit
/// code. Keeps watching the channel so a dead master still ends the worker promptly.
async fn drain<S>(
    trigger: shutdown::Trigger,
    stats: &Stats,
    timeout: Duration,
    from_master: &mut S,
) -> i32
where
    S: futures_util::Stream + Unpin,
{
    let start = tokio::time::Instant::now();
    trigger.advance(Stage::Draining);
    info!(
        "draining {} connection(s) for up to {} ms",
        stats.connections(),
        timeout.as_millis()
    );
    let deadline = start + timeout;
    let grace = (start + IDLE_CLOSE_GRACE).min(deadline);
    loop {
        if stats.connections() == 0 && !stats.handoff_pending.get() {
            info!("drained in {} ms", start.elapsed().as_millis());
            return crate::exit::OK;
        }
        let now = tokio::time::Instant::now();
        if now >= grace {
            trigger.advance(Stage::CloseIdle);
        }
        if now >= deadline {
            warn!(
                "drain timeout: exiting with {} connection(s) still open",
                stats.connections()
            );
            return crate::exit::OK;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            frame = from_master.next() => {
                if frame.is_none() {
                    warn!("master gone while draining: exiting");
                    return crate::exit::OK;
                }
            }
        }
    }
}

impl WorkerSetup {
    fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}
