//! A worker process: serves connections and answers its master; knows nothing of supervision.
//!
//! The master starts it by running the same program with the same command line, plus
//! [`WORKER_ENV`](crate::contract::WORKER_ENV) naming its IPC channel; the library's
//! entry point sees the marker and comes here instead of parsing the command line. What it
//! inherits, where, and how each descriptor is checked is [`crate::contract`]. It waits for its
//! [`WorkerSetup`] (identity, limits, the `[service]` table), builds one single-threaded
//! tokio runtime (so a handler that blocks the thread also stops heartbeat answers, which is
//! how the master notices), asks the user's factories for their services, reports `Ready`,
//! then serves until told to drain, until SIGTERM, until a request panics, or until its
//! request limit. EOF on the channel means the master is gone: the worker exits at once
//! rather than hold the port as an orphan (with `PR_SET_PDEATHSIG` as the first line of that
//! defence).

mod body;
mod chaos;
mod http;
mod raw;
mod ready;
pub(crate) mod routes;
mod stats;
mod timeouts;

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use futures_util::future::LocalBoxFuture;
use futures_util::{SinkExt, StreamExt};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::codec::Framed;
use tracing::{error, info, warn};

use crate::config::AcceptStrategy;
use crate::contract::Layout;
use crate::ipc::{self, ToMaster, ToWorker, WorkerSetup};
use crate::loadboard::LoadBoard;
use crate::logging;
use crate::shutdown::{self, Shutdown, Stage};

pub use body::{BodyError, RequestBody};
pub use http::METRICS_SOCKET;
pub use raw::Connection;
pub use ready::AGENT_SOCKET;
use routes::Routes;
use stats::Stats;

/// How long a draining worker keeps idle keep-alive connections open, so that a client
/// already sending its next request on one gets an answer (with `Connection: close`)
/// instead of a reset.
const IDLE_CLOSE_GRACE: Duration = Duration::from_millis(500);

/// How long a worker waits for its setup message before giving up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds the worker's routes from its setup: the user's factories, type-erased by
/// [`crate::Server`], so this module never names the user's types.
pub(crate) type BuildRoutes =
    Box<dyn FnOnce(Rc<WorkerSetup>, Shutdown) -> LocalBoxFuture<'static, Result<Routes, String>>>;

/// The worker role: `ipc_fd` is the descriptor named by the environment marker.
pub(crate) fn run(ipc_fd: RawFd, build: BuildRoutes) -> i32 {
    // A local runtime: the current-thread scheduler itself runs `!Send` tasks (services
    // holding `Rc`s, hyper's HTTP/2 streams), where a `LocalSet` on a current-thread runtime
    // adds a second scheduler turn to every wake-up (about 2.4 % of a keep-alive request's
    // instructions, callgrind).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build_local(tokio::runtime::LocalOptions::default())
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("worker: cannot build runtime: {e}");
            return crate::exit::OSERR;
        }
    };
    // `serve` runs as a task of its own, not as the future `block_on` drives: that future is
    // polled on every wake-up of the runtime, i.e. once per request, and its select over
    // the master's channel, the signals and the leave notice cost about 4 % of a
    // keep-alive request's instructions (callgrind); a task is polled only when woken.
    rt.block_on(async move {
        match tokio::task::spawn_local(serve(ipc_fd, build)).await {
            Ok(code) => code,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => crate::exit::SOFTWARE,
        }
    })
}

fn set_process_name(slot: usize) {
    // Workers run the master's command line, which would make `top` show the same name
    // for every process.
    let _ = nix::sys::prctl::set_name(
        &std::ffi::CString::new(format!("app-worker-{slot}")).unwrap_or_default(),
    );
}

async fn serve(ipc_fd: RawFd, build: BuildRoutes) -> i32 {
    let Some(layout) = Layout::from_channel(ipc_fd) else {
        eprintln!("worker: fd {ipc_fd} is not an IPC channel from a master");
        return crate::exit::SOFTWARE;
    };
    if crate::listen::check_socket_pair_end(ipc_fd).is_err() {
        eprintln!("worker: fd {ipc_fd} is not an IPC channel from a master");
        return crate::exit::SOFTWARE;
    }
    // SAFETY: checked above to be an open Unix stream socket, which the master placed here
    // for this process alone; nothing else in the process owns it.
    let channel = std::os::unix::net::UnixStream::from(unsafe { OwnedFd::from_raw_fd(ipc_fd) });
    if channel.set_nonblocking(true).is_err() {
        return crate::exit::OSERR;
    }
    let Ok(channel) = tokio::net::UnixStream::from_std(channel) else {
        return crate::exit::OSERR;
    };
    let (mut to_master, mut from_master) = Framed::new(channel, ipc::codec()).split();

    let mut setup: WorkerSetup = match tokio::time::timeout(SETUP_TIMEOUT, from_master.next()).await
    {
        Ok(Some(Ok(frame))) => match ipc::decode::<ToWorker>(&frame) {
            Ok(ToWorker::Setup(s)) => *s,
            _ => {
                eprintln!("worker: first IPC message was not the setup");
                return crate::exit::SOFTWARE;
            }
        },
        _ => {
            eprintln!("worker: no setup from the master");
            return crate::exit::SOFTWARE;
        }
    };
    // The ticket key lives on in the TLS configuration only, which ratchets it forward; a copy
    // left in the setup would keep the boot-time secret for the worker's whole life.
    let tls_tickets = setup.tls_tickets.take();
    let setup = Rc::new(setup);
    set_process_name(setup.slot);
    // The access log is asked for explicitly: a quieter `log_level` must not hide it.
    let level = if setup.http.access_log {
        format!("{},access=info", setup.log_level)
    } else {
        setup.log_level.clone()
    };
    logging::init(
        &level,
        logging::Identity::Worker {
            id: setup.slot,
            pid: std::process::id(),
            cpu: setup.cpu,
            generation: setup.generation,
        },
    );
    std::panic::set_hook(Box::new(|info| error!("panic: {info}")));
    if setup.crash_on_boot {
        error!("crashing while booting, as asked (--chaos-boot-crash)");
        return 3;
    }
    if layout.listeners() != setup.listeners.len() {
        error!(
            "IPC channel at fd {ipc_fd} but {} listening socket(s) announced",
            setup.listeners.len()
        );
        return crate::exit::SOFTWARE;
    }

    let listeners = match http::take_listeners(layout, &setup.listeners) {
        Ok(l) => l,
        Err(e) => {
            error!("{e}");
            return crate::exit::OSERR;
        }
    };
    let board = match LoadBoard::adopt(layout.board()) {
        Ok(b) => Some((b, setup.board_index)),
        Err(e) => {
            warn!("load board unavailable ({e}): accepting without balancing");
            None
        }
    };
    if let Some((b, i)) = &board
        && let Err(e) = crate::metrics::init_worker(std::os::fd::AsFd::as_fd(b.fd()), *i)
    {
        warn!("metrics page unavailable ({e}): this worker's counts are not published");
    }
    let stats = Rc::new(Stats::new(board, setup.max_requests));
    let (trigger, shutdown) = shutdown::channel();
    let routes = match build(setup.clone(), shutdown.clone()).await {
        Ok(r) => r,
        Err(e) => {
            error!("the service could not be built: {e}");
            return crate::exit::SOFTWARE;
        }
    };
    let server = match http::Server::new(&setup, tls_tickets, routes, stats.clone()) {
        Ok(s) => Rc::new(s),
        Err(e) => {
            error!("{e}");
            return crate::exit::CONFIG;
        }
    };
    if crate::listen::check_socket_pair_end(layout.handoff()).is_err() {
        error!(
            "fd {} is not the connection hand-off channel",
            layout.handoff()
        );
        return crate::exit::SOFTWARE;
    }
    // SAFETY: checked above to be a Unix socket, placed here by the master for this process.
    let handoff = unsafe { OwnedFd::from_raw_fd(layout.handoff()) };
    match setup.accept {
        AcceptStrategy::Shared => {
            drop(handoff);
            for (index, l) in listeners.into_iter().enumerate() {
                tokio::task::spawn_local(http::accept_loop(
                    l,
                    index,
                    server.clone(),
                    shutdown.clone(),
                ));
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
    if to_master
        .send(ipc::encode(&ToMaster::Ready {
            version: Some(crate::version::VERSION.to_string()),
        }))
        .await
        .is_err()
    {
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
                    if to_master.send(ipc::encode(&stats.pong(seq))).await.is_err() {
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
                let (reason, planned) = stats.leaving.borrow().clone().unwrap_or_default();
                let _ = to_master.send(ipc::encode(&ToMaster::Leaving { reason, planned })).await;
                break setup.drain_timeout();
            }
        }
    };
    drain(
        trigger,
        &stats,
        drain_timeout,
        &mut to_master,
        &mut from_master,
    )
    .await
}

/// Stops accepting, lets in-flight requests finish within `timeout`, then returns the exit
/// code. Keeps answering heartbeats, so the master can tell a draining worker that is alive
/// from one that hangs, and watches the channel so a dead master still ends the worker.
async fn drain<W, R>(
    trigger: shutdown::Trigger,
    stats: &Stats,
    timeout: Duration,
    to_master: &mut W,
    from_master: &mut R,
) -> i32
where
    W: futures_util::Sink<bytes::Bytes> + Unpin,
    R: futures_util::Stream<Item = Result<bytes::BytesMut, std::io::Error>> + Unpin,
{
    let start = tokio::time::Instant::now();
    trigger.advance(Stage::Draining);
    stats.draining();
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
            // The final counts, so the pool's totals include every request this worker served.
            let _ = to_master.send(ipc::encode(&stats.pong(0))).await;
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
            let _ = to_master.send(ipc::encode(&stats.pong(0))).await;
            return crate::exit::OK;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            frame = from_master.next() => match frame.map(|f| f.map_err(|e| e.to_string()).and_then(|f| ipc::decode::<ToWorker>(&f))) {
                None => {
                    warn!("master gone while draining: exiting");
                    return crate::exit::OK;
                }
                Some(Ok(ToWorker::Ping { seq })) => {
                    let _ = to_master.send(ipc::encode(&stats.pong(seq))).await;
                }
                _ => {}
            },
        }
    }
}

impl WorkerSetup {
    fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}
