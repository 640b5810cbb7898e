//! The worker's HTTP server setup around the user's [`Service`]: accepting, limits,
//! `X-Worker`, panics turned into 500s, and graceful drain of each connection.
//!
//! Limits live here, not in the service, so that every service built on the template gets
//! them: header read timeout (slowloris), header size (431, by hyper), malformed requests
//! (400, by hyper), body size (413), and a cap on concurrent connections per worker above
//! which the worker simply stops accepting (the kernel's backlog holds the rest, and other
//! workers take them) instead of failing them.

use std::convert::Infallible;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::{Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONNECTION, CONTENT_LENGTH, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tracing::{debug, error, warn};

use super::Stats;
use super::chaos;
use super::timeouts::{ConnClock, Expired, Watched};
use crate::config::HttpLimits;
use crate::handoff::{self, Received};
use crate::ipc::WorkerSetup;
use crate::listen::{AsyncListener, LISTEN_FDS_START, Stream, check_listening_stream};
use crate::service::Service;
use crate::shutdown::{Shutdown, Stage};

/// How long a busier-than-its-peers worker waits before accepting (shared strategy): about
/// the time an idle peer needs to wake from epoll and call accept.
const ACCEPT_YIELD: Duration = Duration::from_micros(50);

/// Wraps the inherited descriptors 3.. as tokio listeners.
pub fn take_listeners(n: usize) -> Result<Vec<AsyncListener>, String> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let fd = LISTEN_FDS_START + i as RawFd;
        check_listening_stream(fd).map_err(|e| format!("inherited fd {fd} {e}"))?;
        // SAFETY: the master placed this listening socket here for us; nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let l = AsyncListener::from_fd(owned).map_err(|e| format!("inherited fd {fd}: {e}"))?;
        out.push(l);
    }
    Ok(out)
}

pub struct Server {
    service: Service,
    limits: HttpLimits,
    chaos: bool,
    worker_header: HeaderValue,
    stats: Rc<Stats>,
    shutdown: Shutdown,
}

impl Server {
    pub fn new(setup: &WorkerSetup, slot: usize, stats: Rc<Stats>, shutdown: Shutdown) -> Server {
        Server {
            service: Service::new(setup.service.clone(), slot),
            limits: setup.http.clone(),
            chaos: setup.chaos,
            worker_header: HeaderValue::from(slot),
            stats,
            shutdown,
        }
    }

    /// One request: limits, the service (or a chaos route), panic containment, headers.
    async fn handle(
        self: Rc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        self.stats.requests.set(self.stats.requests.get() + 1);
        let too_large = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > self.limits.max_body_bytes);
        let mut resp = if too_large {
            let mut r = plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
            // The unread body would otherwise be parsed as the next request.
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            r
        } else {
            let req = req.map(|b| Limited::new(b, self.limits.max_body_bytes as usize));
            let fut = async {
                if self.chaos && req.uri().path().starts_with("/chaos/") {
                    chaos::handle(req).await
                } else {
                    self.service.call(req).await
                }
            };
            match AssertUnwindSafe(fut).catch_unwind().await {
                Ok(r) => r,
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    error!(
                        "request handler panicked: {what}; this worker will drain and be replaced"
                    );
                    self.stats
                        .leave(format!("request handler panicked: {what}"));
                    let mut r = plain(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n");
                    r.headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                    r
                }
            }
        };
        resp.headers_mut()
            .insert("x-worker", self.worker_header.clone());
        if self.shutdown.is_draining() {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(resp)
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

/// Accepts until the drain starts. Above `max_connections` it waits for a free place
/// instead of accepting; on descriptor exhaustion it backs off instead of spinning.
pub async fn accept_loop(listener: AsyncListener, server: Rc<Server>, mut shutdown: Shutdown) {
    let permits = Arc::new(Semaphore::new(server.limits.max_connections));
    let mut backoff = Duration::ZERO;
    let mut capped_logged = false;
    loop {
        if permits.available_permits() == 0 && !capped_logged {
            capped_logged = true;
            warn!(
                "max_connections ({}) reached: not accepting until a connection closes",
                server.limits.max_connections
            );
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = shutdown.reached(Stage::Draining) => return,
        };
        if server.stats.should_yield_accept() {
            // Give a less busy worker, woken by the same connection, time to take it: a
            // short spin (serving this worker's other connections meanwhile), not a timer
            // sleep, which at 1 ms granularity would starve short-lived connections.
            let until = std::time::Instant::now() + ACCEPT_YIELD;
            while std::time::Instant::now() < until && server.stats.should_yield_accept() {
                tokio::task::yield_now().await;
            }
        }
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.reached(Stage::Draining) => return,
        };
        match accepted {
            Ok(conn) => {
                if !backoff.is_zero() {
                    warn!("accepting again after descriptor exhaustion");
                    backoff = Duration::ZERO;
                }
                if permits.available_permits() > 0 {
                    capped_logged = false;
                }
                spawn_conn(conn, server.clone(), shutdown.clone(), permit);
            }
            Err(e) if is_resource_exhaustion(&e) => {
                if backoff.is_zero() {
                    warn!("accept failed: {e}; backing off until descriptors free up");
                    backoff = Duration::from_millis(10);
                } else {
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.reached(Stage::Draining) => return,
                }
            }
            Err(e) => debug!("accept failed: {e}"),
        }
    }
}

fn spawn_conn(
    conn: Stream,
    server: Rc<Server>,
    shutdown: Shutdown,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    // Counted at once, not when the task first runs: during a burst the accept loop takes
    // many connections before any task runs, and the load board must see them.
    server.stats.connection_opened();
    tokio::task::spawn_local(async move {
        let _permit = permit;
        match conn {
            Stream::Tcp(s) => serve_connection(s, server, shutdown).await,
            Stream::Unix(s) => serve_connection(s, server, shutdown).await,
        }
    });
}

/// Takes connections the master hands over (round-robin strategy); each is acknowledged
/// before a byte of it is read, so the master can give it to another worker if this one dies
/// first. When the drain starts, the master has already stopped handing this worker
/// anything (it marks a worker draining before telling it so), so whatever is still queued
/// on the channel is taken in one last sweep, and nothing handed over is stranded.
pub async fn handoff_loop(channel: OwnedFd, server: Rc<Server>, mut shutdown: Shutdown) {
    use std::os::fd::AsRawFd;
    let _swept = SweptOnDrop(server.stats.clone());
    if nix::fcntl::fcntl(
        &channel,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .is_err()
    {
        return;
    }
    // SAFETY: the AsyncFd owns the descriptor for its whole lifetime.
    let Ok(channel) = (unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(channel, tokio::io::Interest::READABLE)
    }) else {
        return;
    };
    let raw = channel.get_ref().as_raw_fd();
    let permits = Arc::new(Semaphore::new(server.limits.max_connections));
    let for_conns = shutdown.clone();
    let take = |received: Result<Received, nix::errno::Errno>, permit| match received {
        Ok(Received::Conn { id, fd }) => {
            let _ = handoff::ack(raw, id);
            match Stream::from_fd(fd) {
                Ok(conn) => spawn_conn(conn, server.clone(), for_conns.clone(), permit),
                Err(e) => warn!("handed-over connection unusable: {e}"),
            }
            true
        }
        Ok(Received::Closed) => false,
        Err(nix::errno::Errno::EAGAIN) => false,
        Err(e) => {
            warn!("bad hand-off message: {e}");
            true
        }
    };
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = shutdown.reached(Stage::Draining) => break,
        };
        let received = loop {
            let mut guard = tokio::select! {
                g = channel.readable() => match g { Ok(g) => g, Err(_) => return },
                _ = shutdown.reached(Stage::Draining) => break None,
            };
            match handoff::recv(raw) {
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                other => break Some(other),
            }
        };
        match received {
            Some(r) => {
                if matches!(r, Ok(Received::Closed)) {
                    return;
                }
                take(r, permit);
            }
            None => break,
        }
    }
    // The last sweep: served even above max_connections, since nobody else will take them.
    let spare = Arc::new(Semaphore::new(Semaphore::MAX_PERMITS));
    loop {
        let permit = spare.clone().try_acquire_owned().expect("unbounded");
        if !take(handoff::recv(raw), permit) {
            break;
        }
    }
}

/// Tells the drain that no hand-off is left behind, however the hand-off loop ends.
struct SweptOnDrop(Rc<super::Stats>);

impl Drop for SweptOnDrop {
    fn drop(&mut self) {
        self.0.handoff_swept();
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Serves one connection (counted open by [`spawn_conn`], closed here). Its own clock enforces the head and keep-alive timeouts; when the
/// drain reaches [`Stage::CloseIdle`], hyper is asked to close it after the request in
/// flight (or at once when idle).
async fn serve_connection<IO>(io: IO, server: Rc<Server>, mut shutdown: Shutdown)
where
    IO: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let stats = server.stats.clone();
    let limits = server.limits.clone();
    let clock = ConnClock::new(limits.header_read_timeout, limits.keepalive_timeout);
    let svc = {
        let clock = clock.clone();
        service_fn(move |req| {
            let server = server.clone();
            let clock = clock.clone();
            async move {
                clock.request_started();
                let r = server.handle(req).await;
                clock.request_finished();
                r
            }
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .header_read_timeout(None)
        .max_header_size(limits.max_header_bytes)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(Watched::new(io, clock.clone())), svc);
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = shutdown.reached(Stage::CloseIdle), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(clock.next_check()), if !closing => match clock.expired() {
                Some(Expired::Head) => {
                    debug!("client sent no complete request head within {:?}: closing", limits.header_read_timeout);
                    break Ok(());
                }
                Some(Expired::Idle) => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                None => {}
            },
        }
    };
    if let Err(e) = result {
        debug!("connection ended with an error: {e}");
    }
    stats.connection_closed();
}
