//! The worker's server around the user's services: accepting, HTTP/1.1 and HTTP/2 on one
//! socket, upgrades, limits, `X-Worker`, panics turned into 500s, and graceful drain of
//! each connection.
//!
//! Limits live here, not in the service, so that every service gets them: header read
//! timeout (slowloris), header size and count (431, by hyper), malformed requests (400, by
//! hyper), body size, time and memory ([`super::body`]), a send timeout for peers that stop
//! reading, and a cap on concurrent connections per worker above which the worker simply
//! stops accepting (the kernel's backlog holds the rest, and other workers take them)
//! instead of failing them.
//!
//! The panic guard, `X-Worker` and the 413 are a few lines here rather than tower-http
//! layers: `CatchPanicLayer` requires `Send` response bodies (a worker's need not be), and
//! the rest would each add a body or future type around a service that is already erased.
//!
//! Each connection's first bytes say which protocol it speaks (the HTTP/2 preface, or not),
//! as hyper-util's `auto` builder decides; that builder is not used because it cannot set
//! HTTP/1's header size limit. HTTP/2 runs on a `LocalExec` (tasks spawned with
//! `spawn_local`), hyper's pattern for single-threaded servers: that is what lets a service
//! and its futures be `!Send`.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::convert::Infallible;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{CONNECTION, HeaderName, HeaderValue, RETRY_AFTER};
use http::{Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::Semaphore;
use tracing::{debug, error, info, warn};

use super::body::RequestBody;
use super::chaos;
use super::raw::Connection;
use super::ready::{self, AGENT_SOCKET};
use super::routes::{BoxHttp, Handler, ResponseBody, Routes};
use super::stats::{BodyBudget, ConnGuard, Stats};
use super::timeouts::{ConnClock, Expired, Watched, now_ns};
use crate::config::HttpLimits;
use crate::handoff::{self, Received};
use crate::ipc::WorkerSetup;
use crate::listen::{AsyncListener, LISTEN_FDS_START, Stream, check_listening_stream};
use crate::shutdown::{Shutdown, Stage};

/// How long a busier-than-its-peers worker waits before accepting (shared strategy): about
/// the time an idle peer needs to wake from epoll and call accept.
const ACCEPT_YIELD: Duration = Duration::from_micros(50);

/// Parsed once: a header name given as a string is validated and lowered on every insert.
const X_WORKER: HeaderName = HeaderName::from_static("x-worker");

/// The socket name (`FileDescriptorName=metrics`, or `--metrics ADDR`) the pool's metrics
/// endpoint is served on, unless the program registers its own handler for it.
pub const METRICS_SOCKET: &str = "metrics";

/// The built-in metrics endpoint: every path answers the pool's metrics (GET/HEAD).
fn metrics_handler() -> Handler {
    Handler::Http(Rc::new(|req: Request<RequestBody>| {
        async move {
            if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
                return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "metrics: GET only\n"));
            }
            let Some(text) = crate::metrics::scrape() else {
                return Ok(plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "metrics page unavailable\n",
                ));
            };
            let mut r = Response::new(ResponseBody::new(Full::new(Bytes::from(text))));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            Ok(r)
        }
        .boxed_local()
    }))
}

/// Wraps the inherited descriptors 3.. as tokio listeners.
pub fn take_listeners(
    layout: crate::contract::Layout,
    names: &[String],
) -> Result<Vec<AsyncListener>, String> {
    let mut out = Vec::with_capacity(names.len());
    for i in 0..names.len() {
        let fd = layout.listener(i);
        check_listening_stream(fd).map_err(|e| format!("inherited fd {fd} {e}"))?;
        // SAFETY: checked above to be an open listening socket, placed here by the master
        // for this process; nothing else in the process owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let l = AsyncListener::from_fd(owned).map_err(|e| format!("inherited fd {fd}: {e}"))?;
        out.push(l);
    }
    Ok(out)
}

/// A request once [`Server::start`] is done with it.
enum Started {
    /// The worker answered it itself (413, 503, a panic in `call`, the readiness probe):
    /// boxed, so that the common case stays a few words; taken when polled.
    Answered(Option<Box<Response<ResponseBody>>>),
    /// The service's future.
    Running(
        futures_util::future::LocalBoxFuture<
            'static,
            Result<Response<ResponseBody>, crate::server::BoxError>,
        >,
    ),
}

/// Runs hyper's connection tasks (HTTP/2 streams) on this thread, so they may be `!Send`.
#[derive(Clone, Copy)]
struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: std::future::Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

pub struct Server {
    handlers: Vec<Handler>,
    /// Per listening socket: whether its requests count in the metrics (all but the
    /// built-in metrics socket's, so a scrape does not count itself or toward max_requests).
    measured: Vec<bool>,
    /// Local address of each listening socket, to route handed-over connections.
    addresses: Vec<String>,
    limits: HttpLimits,
    /// Connections served at once: `max_connections`, or fewer when the descriptor limit
    /// would not hold them (see [`descriptor_budget`]).
    conn_limit: usize,
    worker_header: HeaderValue,
    /// `[http] ready_path`, answered on every measured socket before the service sees it
    /// (see [`ready`]); checked here rather than in a wrapper service, which would move every
    /// request once more.
    ready_path: Option<Box<str>>,
    stats: Rc<Stats>,
    budget: &'static BodyBudget,
    h1: http1::Builder,
    h2: http2::Builder<LocalExec>,
    /// The TLS acceptor, and which listening sockets use it.
    tls: Option<(tokio_rustls::TlsAcceptor, Vec<bool>)>,
    /// Connection error kinds already logged at info (each is logged once, then at debug).
    logged_errors: RefCell<BTreeSet<&'static str>>,
}

impl Server {
    pub fn new(
        setup: &WorkerSetup,
        tls_tickets: Option<crate::tls::TicketKey>,
        routes: Routes,
        stats: Rc<Stats>,
    ) -> Result<Server, String> {
        let mut routes = routes;
        let builtin_metrics = setup.listeners.iter().any(|l| l == METRICS_SOCKET)
            && !routes.named.contains_key(METRICS_SOCKET);
        if builtin_metrics {
            routes
                .named
                .insert(METRICS_SOCKET.to_string(), metrics_handler());
        }
        let builtin_agent = setup.listeners.iter().any(|l| l == AGENT_SOCKET)
            && !routes.named.contains_key(AGENT_SOCKET);
        if builtin_agent {
            routes.named.insert(
                AGENT_SOCKET.to_string(),
                ready::agent_handler(stats.clone()),
            );
        }
        // Probes (scrapes, agent checks) are not traffic: not counted, not max_requests.
        let measured: Vec<bool> = setup
            .listeners
            .iter()
            .map(|l| {
                let probe = (builtin_metrics && l == METRICS_SOCKET)
                    || (builtin_agent && l == AGENT_SOCKET);
                !probe
            })
            .collect();
        let mut handlers = routes.resolve(&setup.listeners)?;
        if setup.chaos {
            for (h, _) in handlers
                .iter_mut()
                .zip(&measured)
                .filter(|(_, m): &(&mut Handler, &bool)| **m)
            {
                if let Handler::Http(svc) = h {
                    *svc = chaos::wrap(svc.clone());
                }
            }
        }
        let limits = setup.http.clone();
        let mut h1 = http1::Builder::new();
        h1.header_read_timeout(None)
            .max_header_size(limits.max_header_bytes)
            .max_headers(limits.max_headers)
            .keep_alive(true);
        let mut h2 = http2::Builder::new(LocalExec);
        h2.max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(256);
        let conn_limit = limits.max_connections.min(descriptor_budget());
        if conn_limit < limits.max_connections {
            info!(
                "serving at most {conn_limit} connections at once: the descriptor limit is lower than max_connections ({})",
                limits.max_connections
            );
        }
        let tls = match &setup.tls {
            None => None,
            Some(t) => {
                // Read once, here: from now on the key lives in this process's memory only.
                let loaded = crate::tls::load(&t.cert, &t.key, crate::tls::now_unix())?;
                let config = crate::tls::server_config(&loaded, tls_tickets)?;
                let on = setup.listeners.iter().map(|n| t.applies_to(n)).collect();
                info!(
                    "TLS with certificate serial {} ({} day(s) left)",
                    loaded.serial,
                    t.days_left(crate::tls::now_unix())
                );
                Some((tokio_rustls::TlsAcceptor::from(config), on))
            }
        };
        Ok(Server {
            tls,
            conn_limit,
            handlers,
            measured,
            addresses: (0..setup.listeners.len())
                .map(|i| crate::listen::describe(LISTEN_FDS_START + i as RawFd))
                .collect(),
            budget: BodyBudget::new(limits.max_pending_body_bytes),
            limits,
            worker_header: HeaderValue::from(setup.slot),
            ready_path: setup.ready_path.as_deref().map(Box::from),
            stats,
            h1,
            h2,
            logged_errors: RefCell::new(BTreeSet::new()),
        })
    }

    /// Starts one request: counts it, applies the body limits, and calls the service (or a
    /// chaos route) at once. Only the service's future is left to await, so the future
    /// hyper keeps per request is small ([`Respond`] completes it); moving a large one
    /// costs a copy of all of it at every layer.
    fn start(&self, svc: &BoxHttp, req: Request<Incoming>, measured: bool) -> Started {
        if measured {
            self.stats.request_started();
        }
        // hyper's own reading of the framing: `Content-Length` when that decides the length
        // (not when chunked encoding overrides it), zero for no body.
        let declared = req.body().size_hint().exact();
        if declared.is_some_and(|n| n > self.limits.max_body_bytes) {
            return Started::Answered(Some(Box::new(closing(plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large\n",
            )))));
        }
        if measured && self.ready_path.as_deref() == Some(req.uri().path()) {
            return Started::Answered(Some(Box::new(ready::answer(self.stats.readiness()))));
        }
        let declared = declared.unwrap_or(0);
        if declared > 0 && !self.budget.take(declared) {
            let mut r = closing(plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many request bodies in flight\n",
            ));
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            return Started::Answered(Some(Box::new(r)));
        }
        let req = req.map(|body| RequestBody::holding(body, &self.limits, self.budget, declared));
        // A service may panic in `call` itself, before it returns its future.
        match std::panic::catch_unwind(AssertUnwindSafe(|| svc(req))) {
            Ok(fut) => Started::Running(fut),
            Err(panic) => Started::Answered(Some(Box::new(self.panicked(panic)))),
        }
    }

    /// The response of a request, with the worker's headers.
    fn finish(&self, resp: &mut Response<ResponseBody>, version: Version, draining: bool) {
        resp.headers_mut()
            .insert(X_WORKER, self.worker_header.clone());
        if draining && version < Version::HTTP_2 {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
    }

    /// What the service's future came to, as a response: its error or its panic is a 500.
    fn response_of(
        &self,
        outcome: std::thread::Result<Result<Response<ResponseBody>, crate::server::BoxError>>,
    ) -> Response<ResponseBody> {
        match outcome {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                warn!("the service returned an error: {e}");
                closing(plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal server error\n",
                ))
            }
            Err(panic) => self.panicked(panic),
        }
    }

    /// A handler panicked: the worker leaves (and is replaced), the client gets a 500.
    fn panicked(&self, panic: Box<dyn std::any::Any + Send>) -> Response<ResponseBody> {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        error!("request handler panicked: {what}; this worker will drain and be replaced");
        self.stats
            .leave(format!("request handler panicked: {what}"), false);
        closing(plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal server error\n",
        ))
    }

    /// Logs a connection-level error (garbage, a protocol the client got wrong) once per
    /// kind at info, then at debug: visible without flooding the journal.
    fn log_conn_error(&self, e: &(dyn std::error::Error + 'static)) {
        let kind = classify(e);
        if self.logged_errors.borrow_mut().insert(kind) {
            info!("connection error ({kind}): {e}; further {kind} errors are logged at debug");
        } else {
            debug!("connection error ({kind}): {e}");
        }
    }

    /// The TLS acceptor for listening socket `index`, if it speaks TLS.
    fn tls_acceptor(&self, index: usize) -> Option<tokio_rustls::TlsAcceptor> {
        self.tls
            .as_ref()
            .filter(|(_, on)| on.get(index).copied().unwrap_or(false))
            .map(|(a, _)| a.clone())
    }

    /// Whether this request goes to the access log.
    fn sample_access(&self) -> bool {
        self.limits.access_log
            && (self.limits.access_log_sample >= 1.0
                || fastrand::f64() < self.limits.access_log_sample)
    }

    fn route_handed_over(&self, conn: &Stream) -> usize {
        if self.handlers.len() < 2 {
            return 0;
        }
        let local = conn.local_description();
        self.addresses.iter().position(|a| *a == local).unwrap_or(0)
    }
}

fn classify(e: &(dyn std::error::Error + 'static)) -> &'static str {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            return if h.is_parse_too_large() {
                "request head too large"
            } else if h.is_parse() || h.is_parse_version_h2() {
                "malformed request"
            } else if h.is_incomplete_message() {
                "incomplete request"
            } else if h.is_timeout() {
                "timeout"
            } else if h.is_user() {
                "service"
            } else {
                "protocol"
            };
        }
        if err.downcast_ref::<io::Error>().is_some() {
            return "i/o";
        }
        cur = err.source();
    }
    "other"
}

fn plain(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::new(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *r.status_mut() = status;
    r
}

fn closing(mut r: Response<ResponseBody>) -> Response<ResponseBody> {
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Accepts until the drain starts (or the worker is leaving). Above `max_connections` it
/// waits for a free place instead of accepting; on descriptor exhaustion it backs off
/// instead of spinning.
pub async fn accept_loop(
    listener: AsyncListener,
    index: usize,
    server: Rc<Server>,
    mut shutdown: Shutdown,
) {
    let permits = Arc::new(Semaphore::new(server.conn_limit));
    let mut stop = server.stats.stop_accepting_watch();
    let mut backoff = Duration::ZERO;
    let mut capped_logged = false;
    loop {
        if !server.stats.accepting() {
            return;
        }
        if permits.available_permits() == 0 && !capped_logged {
            capped_logged = true;
            if server.conn_limit == server.limits.max_connections {
                warn!(
                    "max_connections ({}) reached: not accepting until a connection closes",
                    server.conn_limit
                );
            } else {
                warn!(
                    "{} connections open, as many as the descriptor limit allows: not accepting until one closes",
                    server.conn_limit
                );
            }
        }
        // Waiting (a waiter registered on the drain's channel and the semaphore) only at
        // the cap: below it, per accepted connection, that costs more than the accept.
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = shutdown.reached(Stage::Draining) => return,
            },
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
        // Biased: when a connection and the decision to leave (or drain) are both ready,
        // leaving wins, or a worker at its request limit could take one more.
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            r = listener.accept() => r,
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
                spawn_conn(conn, index, server.clone(), shutdown.clone(), permit);
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
    index: usize,
    server: Rc<Server>,
    shutdown: Shutdown,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    // Counted at once, not when the task first runs: during a burst the accept loop takes
    // many connections before any task runs, and the load board must see them.
    let counted = server.stats.connection_opened();
    let handler = server.handlers[index].clone();
    let measured = server.measured[index];
    if measured {
        crate::metrics::accepted();
    }
    tokio::task::spawn_local(async move {
        let _permit = permit;
        match handler {
            Handler::Http(svc) => match server.tls_acceptor(index) {
                // Boxed: a TLS connection's state (rustls's) is several kilobytes, and the
                // task's future is as large as its largest branch, so every plain
                // connection would pay for copying it (three times as the task is spawned).
                Some(acceptor) => {
                    Box::pin(serve_tls(
                        conn, acceptor, svc, server, shutdown, counted, measured,
                    ))
                    .await
                }
                None => serve_http(conn, None, svc, server, shutdown, counted, measured).await,
            },
            Handler::Tcp(h) => {
                let name = index;
                if let Err(e) = h(Connection::new(conn, counted, name)).await {
                    debug!("connection handler ended with an error: {e}");
                }
            }
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
    let permits = Arc::new(Semaphore::new(server.conn_limit));
    let for_conns = shutdown.clone();
    let take = |received: Result<Received, nix::errno::Errno>, permit| match received {
        Ok(Received::Conn { id, fd }) => {
            let _ = handoff::ack(raw, id);
            match Stream::from_fd(fd) {
                Ok(conn) => {
                    let index = server.route_handed_over(&conn);
                    spawn_conn(conn, index, server.clone(), for_conns.clone(), permit)
                }
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
        if !server.stats.accepting() {
            break;
        }
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
    // A worker leaving at its request limit keeps taking what the master still sends until
    // the master marks it draining.
    shutdown.reached(Stage::Draining).await;
    let spare = Arc::new(Semaphore::new(Semaphore::MAX_PERMITS));
    loop {
        let permit = spare.clone().try_acquire_owned().expect("unbounded");
        if !take(handoff::recv(raw), permit) {
            break;
        }
    }
}

/// Tells the drain that no hand-off is left behind, however the hand-off loop ends.
struct SweptOnDrop(Rc<Stats>);

impl Drop for SweptOnDrop {
    fn drop(&mut self) {
        self.0.handoff_pending.set(false);
    }
}

/// Descriptors left for connections under `RLIMIT_NOFILE`, keeping some for the runtime,
/// the channels and whatever the service opens. A round-robin worker must never reach the
/// limit: a descriptor passed over `SCM_RIGHTS` into a full table is dropped by the kernel,
/// and its client would wait until the master gave up on it.
fn descriptor_budget() -> usize {
    const RESERVE: u64 = 64;
    match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => {
            usize::try_from(soft.saturating_sub(RESERVE).max(16)).unwrap_or(usize::MAX)
        }
        Err(_) => usize::MAX,
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// One access-log entry, filled in as the response goes out and logged when it is done.
struct Access {
    method: http::Method,
    /// The path only: queries often carry tokens, which have no place in a log.
    path: String,
    status: u16,
    bytes: u64,
    /// A [`now_ns`] reading.
    started: u64,
}

impl Access {
    fn log(&self, now: u64) {
        let took = Duration::from_nanos(now.saturating_sub(self.started));
        // Fields become journald fields (HTTP_STATUS=500 filters), named apart from
        // journald's own; the text is what plain `journalctl` and a terminal show.
        info!(
            target: "access",
            http_method = %self.method,
            http_path = %self.path,
            http_status = self.status,
            http_bytes = self.bytes,
            http_duration_us = took.as_micros() as u64,
            "{} {} {} {}B {:.3}ms",
            self.method,
            self.path,
            self.status,
            self.bytes,
            took.as_secs_f64() * 1e3
        );
    }
}

/// A response body that tells the connection's clock when the response has been sent in
/// full (or abandoned): the idle clock starts then, not when the handler returned. It also
/// completes the request's access-log entry, if it has one.
struct Tracked {
    inner: ResponseBody,
    meta: RequestMeta,
}

/// What a request carries from its start to its response's end.
struct RequestMeta {
    clock: Arc<ConnClock>,
    access: Option<Box<Access>>,
    /// For the metrics: method, status, start, response body bytes so far.
    meter: Option<Meter>,
}

/// A request's response, as hyper awaits it: the service's future (or the worker's own
/// answer), then the worker's headers and the [`Tracked`] body. Written out rather than as
/// `async` blocks: each nested block is a state machine holding the next, and hyper moves
/// the whole of it per request; this one is a few words.
struct Respond {
    started: Started,
    server: Rc<Server>,
    meta: Option<RequestMeta>,
    version: Version,
    draining: bool,
}

impl std::future::Future for Respond {
    type Output = Result<Response<Tracked>, Infallible>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = &mut *self;
        let mut resp = match &mut this.started {
            Started::Running(fut) => {
                match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(r)) => this.server.response_of(Ok(r)),
                    Err(panic) => this.server.response_of(Err(panic)),
                }
            }
            Started::Answered(r) => *r.take().expect("Respond polled after it completed"),
        };
        this.server.finish(&mut resp, this.version, this.draining);
        let mut meta = this.meta.take().expect("Respond polled after it completed");
        let status = resp.status().as_u16();
        if let Some(a) = &mut meta.access {
            a.status = status;
        }
        if let Some(m) = &mut meta.meter {
            m.status = status;
            if status == 101 {
                let _ = meta
                    .clock
                    .upgraded
                    .set(crate::metrics::OpenAs::new(crate::metrics::Proto::Upgraded));
            }
        }
        Poll::Ready(Ok(resp.map(|inner| Tracked { inner, meta })))
    }
}

struct Meter {
    method: u8,
    status: u16,
    /// A [`now_ns`] reading.
    started: u64,
    bytes: u64,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = crate::server::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &r
            && let Some(data) = frame.data_ref()
        {
            let n = data.len() as u64;
            let this = &mut self.meta;
            if let Some(a) = &mut this.access {
                a.bytes += n;
            }
            if let Some(m) = &mut this.meter {
                m.bytes += n;
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // One clock reading for the idle clock, the metrics and the log.
        let now = now_ns();
        let meta = &self.meta;
        meta.clock.request_finished(now);
        if let Some(a) = &meta.access {
            a.log(now);
        }
        if let Some(m) = &meta.meter {
            crate::metrics::request_done(
                m.method,
                m.status,
                m.bytes,
                now.saturating_sub(m.started),
            );
        }
    }
}

/// Serves one HTTP connection (counted open by [`spawn_conn`] until `counted` drops, which
/// happens here or, for an upgraded connection, when the user's task lets go of it). Its
/// own clock enforces the head, keep-alive and send timeouts; the drain asks an HTTP/2
/// connection to go away (GOAWAY) at once, and an HTTP/1 connection to close after its
/// request in flight when the drain reaches [`Stage::CloseIdle`] (until then its responses
/// carry `Connection: close`).
async fn serve_http<IO>(
    io: IO,
    alpn_h2: Option<bool>,
    svc: BoxHttp,
    server: Rc<Server>,
    mut shutdown: Shutdown,
    counted: ConnGuard,
    measured: bool,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limits = &server.limits;
    let clock = ConnClock::new(
        limits.header_read_timeout,
        limits.keepalive_timeout,
        limits.send_timeout,
    );
    let service = {
        let clock = clock.clone();
        let server = server.clone();
        service_fn(move |req: Request<Incoming>| {
            clock.request_started();
            let logged = server.sample_access();
            let started = if measured || logged { now_ns() } else { 0 };
            let access = logged.then(|| {
                Box::new(Access {
                    method: req.method().clone(),
                    path: req.uri().path().to_string(),
                    status: 0,
                    bytes: 0,
                    started,
                })
            });
            let meter = measured.then(|| Meter {
                method: crate::metrics::method_code(req.method()),
                status: 0,
                started,
                bytes: 0,
            });
            let version = req.version();
            let started = server.start(&svc, req, measured);
            Respond {
                started,
                draining: server.stats.is_draining(),
                server: server.clone(),
                meta: Some(RequestMeta {
                    clock: clock.clone(),
                    access,
                    meter,
                }),
                version,
            }
        })
    };
    let mut io = Watched::new(io, clock.clone(), counted);
    // One timer for the connection's life (first bytes, then every deadline), reset when it
    // fires: a timer registered and dropped per wait costs more than the request itself.
    let timer = tokio::time::sleep_until(clock.next_check());
    tokio::pin!(timer);
    let h2 = match alpn_h2 {
        Some(h2) => h2,
        None => tokio::select! {
            r = io.sniff_h2() => match r {
                Ok(h2) => h2,
                Err(_) => return,
            },
            // Silent past the head timeout: nothing to answer.
            _ = timer.as_mut() => return,
        },
    };
    let _open = measured.then(|| {
        crate::metrics::OpenAs::new(if h2 {
            crate::metrics::Proto::Http2
        } else {
            crate::metrics::Proto::Http1
        })
    });
    // hyper's connection state is boxed: kept inline, it would make this future (and the
    // connection task holding it) kilobytes large, copied whole whenever the task is moved.
    let result = if h2 {
        let conn = Box::pin(server.h2.serve_connection(TokioIo::new(io), service));
        drive(conn, &clock, timer, &server, &mut shutdown, Stage::Draining).await
    } else {
        let conn = Box::pin(
            server
                .h1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
        );
        drive(
            conn,
            &clock,
            timer,
            &server,
            &mut shutdown,
            Stage::CloseIdle,
        )
        .await
    };
    if let Err(e) = result {
        server.log_conn_error(&e);
    }
}

/// Serves one connection on a TLS socket: the handshake (bounded by the head timeout), then
/// HTTP/2 or HTTP/1.1 as ALPN chose.
async fn serve_tls(
    conn: Stream,
    acceptor: tokio_rustls::TlsAcceptor,
    svc: BoxHttp,
    server: Rc<Server>,
    shutdown: Shutdown,
    counted: ConnGuard,
    measured: bool,
) {
    let handshake = tokio::time::timeout(server.limits.header_read_timeout, acceptor.accept(conn));
    let tls = match handshake.await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            server.log_conn_error(&e);
            return;
        }
        Err(_) => {
            debug!(
                "TLS handshake not done within {:?}: closing",
                server.limits.header_read_timeout
            );
            return;
        }
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    serve_http(tls, Some(h2), svc, server, shutdown, counted, measured).await
}

/// A hyper connection that can be asked to finish gracefully.
trait Graceful: std::future::Future<Output = hyper::Result<()>> {
    fn graceful(self: std::pin::Pin<&mut Self>);
}

impl<I, S, B> Graceful for http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<crate::server::BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: http_body::Body + 'static,
    B::Error: Into<crate::server::BoxError>,
{
    fn graceful(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

impl<I, S, B> Graceful for http2::Connection<I, S, LocalExec>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<crate::server::BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: http_body::Body + 'static,
    B::Error: Into<crate::server::BoxError>,
    LocalExec: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

/// Runs a connection to its end under the connection's clock and the worker's drain:
/// graceful shutdown when the drain reaches `close_at` or the connection idles out, a hard
/// close when the head or a send stalls past its timeout.
///
/// Written as one poll function rather than `select!`, which polls every branch on every
/// wake-up: the connection wakes this task once per request, while the timer and the drain
/// fire once in a connection's life, and re-polling them (registering the same waker again)
/// cost more than a tenth of a small request. Each is polled only when it may have moved:
/// the task's waker differs from the one it holds, the timer has elapsed, or the drain's
/// stage changed. Both are polled outside tokio's cooperative budget: a future polled once
/// the task's budget is spent returns `Pending` without registering the waker (a `Sleep`
/// is not even in the timer wheel until then), and counting it as registered would leave
/// the connection with no timer at all.
async fn drive<C: Graceful>(
    mut conn: std::pin::Pin<Box<C>>,
    clock: &ConnClock,
    mut timer: std::pin::Pin<&mut tokio::time::Sleep>,
    server: &Server,
    shutdown: &mut Shutdown,
    close_at: Stage,
) -> hyper::Result<()> {
    use std::task::Poll;
    use tokio::task::unconstrained;
    let limits = &server.limits;
    let mut closing = false;
    // Cloned before the wait is made, so it sees every change the wait might have missed.
    let stage = shutdown.clone();
    // Made once: a `watch` wait made afresh per wake-up registers and unregisters a waiter.
    let drained = shutdown.reached(close_at);
    tokio::pin!(drained);
    let mut drain_holds = HeldWaker::default();
    let mut timer_holds = HeldWaker::default();
    std::future::poll_fn(|cx| {
        loop {
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            if !closing && (drain_holds.stale(cx) || stage.moved()) {
                if std::pin::pin!(unconstrained(drained.as_mut()))
                    .poll(cx)
                    .is_ready()
                {
                    closing = true;
                    conn.as_mut().graceful();
                    continue;
                }
                drain_holds.set(cx);
            }
            if timer_holds.stale(cx) || timer.is_elapsed() {
                if std::pin::pin!(unconstrained(timer.as_mut()))
                    .poll(cx)
                    .is_pending()
                {
                    timer_holds.set(cx);
                    return Poll::Pending;
                }
                match clock.expired() {
                    Some(Expired::Head) if close_at == Stage::CloseIdle => {
                        debug!(
                            "client sent no complete request head within {:?}: closing",
                            limits.header_read_timeout
                        );
                        return Poll::Ready(Ok(()));
                    }
                    Some(Expired::Send) => {
                        debug!(
                            "client took no response bytes for {:?}: closing",
                            limits.send_timeout
                        );
                        return Poll::Ready(Ok(()));
                    }
                    Some(Expired::Head | Expired::Idle) if !closing => {
                        closing = true;
                        conn.as_mut().graceful();
                    }
                    _ => {}
                }
                timer.as_mut().reset(clock.next_check());
                timer_holds = HeldWaker::default();
                continue;
            }
            return Poll::Pending;
        }
    })
    .await
}

/// The waker a pending future was last polled with. Polling it again with the same waker
/// before it was woken could only register that waker again.
#[derive(Default)]
struct HeldWaker(Option<std::task::Waker>);

impl HeldWaker {
    /// Whether the future must be polled with this context's waker to be woken.
    fn stale(&self, cx: &std::task::Context<'_>) -> bool {
        !self.0.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
    }

    fn set(&mut self, cx: &std::task::Context<'_>) {
        if self.stale(cx) {
            self.0 = Some(cx.waker().clone());
        }
    }
}
