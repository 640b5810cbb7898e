//! The library's front door: what a program hands the supervisor, and how it starts it.
//!
//! A program builds one [`Server`], registers a *factory* per kind of socket (an HTTP
//! service for the default socket, and optionally handlers for sockets named with systemd's
//! `FileDescriptorName=`), and calls [`Server::main`]. The same program runs in every process:
//! in the master, the factories are never called (the master only validates settings and
//! supervises); in each worker — recognised by an environment marker, not by its arguments,
//! so the program's own command line is untouched — they are called once, after the worker
//! has its settings and identity, and what they return serves that worker's connections.
//!
//! Everything here is type-erased at the boundary, so the rest of the crate never names the
//! user's types: settings travel as a TOML table and are checked through a function pointer
//! ([`crate::config::SettingsCheck`]); services become `Rc<dyn Fn>` in [`crate::worker`].

use std::collections::BTreeMap;
use std::future::Future;
use std::process::ExitCode;
use std::rc::Rc;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::LocalBoxFuture;
use http::{Request, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tower::{Service, ServiceExt};

use crate::cli::{self, Command};
use crate::config::ServeArgs;
use crate::contract::WORKER_ENV;
use crate::exit;
use crate::ipc::WorkerSetup;
use crate::shutdown::Shutdown;
use crate::worker::routes::{BoxHttp, BoxTcp, Handler, ResponseBody, Routes};
use crate::worker::{Connection, RequestBody};

/// The error type services and factories may return: anything that converts into it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The `[service]` table of the configuration file, as your own serde type.
///
/// The master deserializes and validates it before the first worker starts and on every
/// reload (a bad table fails the reload and keeps the running workers); each worker receives
/// it in its [`Worker`] context. Use `#[serde(deny_unknown_fields, default)]` so a misspelt
/// key is an error and a missing one takes its default.
pub trait Settings: Serialize + DeserializeOwned + Default + Clone + 'static {
    /// Checks values serde cannot (ranges, non-empty strings). The error is one line; the
    /// master prefixes it with `config error: service:`.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Settings for a program without a `[service]` table: any key there is an error.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoSettings {}

impl Settings for NoSettings {}

/// What a factory knows about the worker it builds a service for.
///
/// In-memory state you build from it (a cache, a counter, a connection pool) belongs to this
/// worker process alone: other workers have their own, and a reload starts fresh ones.
#[derive(Clone)]
pub struct Worker<S> {
    /// The validated `[service]` table.
    pub settings: S,
    /// The worker's slot, `0..workers`: stable across restarts and reloads.
    pub id: usize,
    /// The generation: 1 at start, one more with every successful reload.
    pub generation: u64,
    /// The CPU the worker is pinned to.
    pub cpu: usize,
    /// Resolves when the worker starts draining: end long-lived streams (SSE, WebSockets)
    /// here to let the worker exit before `drain_timeout`.
    pub shutdown: Shutdown,
}

impl<S> Worker<S> {
    /// Defines the service's own metrics (counters, gauges, histograms), shown summed
    /// across workers on the pool's metrics endpoint (`--metrics ADDR`, or the socket named
    /// `metrics`). See [`Metrics`](crate::Metrics) for the limits.
    pub fn metrics(&self) -> crate::Metrics {
        crate::Metrics::new()
    }
}

type MakeHandler<S> = Box<dyn Fn(Worker<S>) -> LocalBoxFuture<'static, Result<Handler, BoxError>>>;

/// The supervisor, configured with your handlers. See the crate documentation for a
/// complete program.
pub struct Server<S: Settings = NoSettings> {
    default: Option<MakeHandler<S>>,
    named: BTreeMap<String, MakeHandler<S>>,
}

impl Server<NoSettings> {
    /// A server whose configuration has no `[service]` table.
    pub fn new() -> Self {
        Self::with_settings()
    }
}

impl Default for Server<NoSettings> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Settings> Server<S> {
    /// A server whose `[service]` table deserializes into `S`
    /// (`Server::<MySettings>::with_settings()`).
    pub fn with_settings() -> Self {
        Server {
            default: None,
            named: BTreeMap::new(),
        }
    }

    /// The HTTP service for every socket not claimed by name (all of them, when there is
    /// only one, or when the sockets have no names).
    ///
    /// `make` runs once in each worker and may await (open a database pool, warm a cache).
    /// It returns any [`tower::Service`] over `http::Request<RequestBody>` — an axum
    /// `Router`, a tonic server, a `service_fn` — whose response body is any
    /// [`http_body::Body`] of [`Bytes`]. Neither the service nor its futures need be `Send`:
    /// each worker is one thread. HTTP/1.1 and HTTP/2 (h2c) are served on the same socket,
    /// and upgrades (WebSockets) work.
    pub fn http<F, Fut, Svc, E, B>(mut self, make: F) -> Self
    where
        F: Fn(Worker<S>) -> Fut + 'static,
        Fut: Future<Output = Result<Svc, E>> + 'static,
        E: Into<BoxError>,
        Svc: Service<Request<RequestBody>, Response = Response<B>> + Clone + 'static,
        Svc::Error: Into<BoxError>,
        Svc::Future: 'static,
        B: http_body::Body<Data = Bytes> + 'static,
        B::Error: Into<BoxError>,
    {
        self.default = Some(make_http(make));
        self
    }

    /// An HTTP service for the socket named `name` (`FileDescriptorName=name` in the socket
    /// unit); see [`Server::http`].
    pub fn http_on<F, Fut, Svc, E, B>(mut self, name: &str, make: F) -> Self
    where
        F: Fn(Worker<S>) -> Fut + 'static,
        Fut: Future<Output = Result<Svc, E>> + 'static,
        E: Into<BoxError>,
        Svc: Service<Request<RequestBody>, Response = Response<B>> + Clone + 'static,
        Svc::Error: Into<BoxError>,
        Svc::Future: 'static,
        B: http_body::Body<Data = Bytes> + 'static,
        B::Error: Into<BoxError>,
    {
        self.named.insert(name.to_string(), make_http(make));
        self
    }

    /// A raw connection handler for the socket named `name`, for a protocol that is not
    /// HTTP: each accepted [`Connection`] (TCP or Unix stream) is handed to the service `make`
    /// returned, in a task of its own. The connection counts in `app status`, and a draining
    /// worker waits for it until `drain_timeout`.
    pub fn tcp_on<F, Fut, Svc, E>(mut self, name: &str, make: F) -> Self
    where
        F: Fn(Worker<S>) -> Fut + 'static,
        Fut: Future<Output = Result<Svc, E>> + 'static,
        E: Into<BoxError>,
        Svc: Service<Connection, Response = ()> + Clone + 'static,
        Svc::Error: Into<BoxError>,
        Svc::Future: 'static,
    {
        let make = Rc::new(make);
        self.named.insert(
            name.to_string(),
            Box::new(move |w| {
                let make = make.clone();
                async move {
                    let svc = make(w).await.map_err(Into::into)?;
                    Ok(Handler::Tcp(erase_tcp(svc)))
                }
                .boxed_local()
            }),
        );
        self
    }

    /// Runs the program: as a worker when started by a master, otherwise the command line
    /// `serve | check | status | reload | scale` (see [`crate::Cli`]). Returns the exit code (sysexits).
    pub fn main(self) -> ExitCode {
        if let Some(fd) = worker_marker() {
            return self.run_worker(fd);
        }
        match cli::parse() {
            Ok(c) => self.run_command(c.command),
            Err(code) => code_of(code),
        }
    }

    /// Runs one parsed [`Command`], for a program that embeds it in its own command line.
    pub fn run_command(self, command: Command) -> ExitCode {
        match command {
            Command::Serve(args) => self.serve(*args),
            Command::Reload(c) => code_of(cli::reload(c)),
            Command::Drain(c) => code_of(cli::drain(c, true)),
            Command::Undrain(c) => code_of(cli::drain(c, false)),
            Command::Status {
                client,
                json,
                watch,
                interval,
            } => code_of(cli::status(client, json, watch.then_some(interval))),
            Command::Check { serve, json } => {
                code_of(cli::check(&serve, json, check_settings::<S>))
            }
            Command::Scale { workers, client } => code_of(cli::scale(client, &workers)),
            Command::Completions { shell } => code_of(crate::manual::completions(shell)),
            Command::Man { out } => code_of(crate::manual::man(out.as_deref())),
        }
    }

    /// Runs the master with `args` — or the worker, when this process was started as one
    /// (so a program with its own command line may call this from its own `serve`
    /// subcommand: workers run the master's command line).
    pub fn serve(self, args: ServeArgs) -> ExitCode {
        if let Some(fd) = worker_marker() {
            return self.run_worker(fd);
        }
        let handlers = crate::master::Handlers {
            named: self.named.keys().cloned().collect(),
            default: self.default.is_some(),
        };
        match crate::master::serve(args, check_settings::<S>, handlers) {
            Ok(code) => code_of(code),
            Err(f) => {
                eprintln!("app: {f}");
                code_of(f.code)
            }
        }
    }

    fn run_worker(self, fd: Result<i32, String>) -> ExitCode {
        match fd {
            Ok(fd) => code_of(crate::worker::run(fd, self.into_build())),
            Err(e) => {
                eprintln!("app: {e}");
                code_of(exit::SOFTWARE)
            }
        }
    }

    /// The worker's side: deserializes the settings and calls every factory.
    fn into_build(self) -> crate::worker::BuildRoutes {
        Box::new(move |setup: Rc<WorkerSetup>, shutdown: Shutdown| {
            async move {
                let settings: S =
                    S::deserialize(setup.service.clone()).map_err(|e| format!("[service]: {e}"))?;
                let worker = Worker {
                    settings,
                    id: setup.slot,
                    generation: setup.generation,
                    cpu: setup.cpu,
                    shutdown,
                };
                let mut routes = Routes::default();
                if let Some(make) = &self.default {
                    routes.default = Some(make(worker.clone()).await.map_err(|e| e.to_string())?);
                }
                for (name, make) in &self.named {
                    // Only sockets this process actually has need a handler built.
                    if setup.listeners.iter().any(|l| l == name) {
                        let h = make(worker.clone())
                            .await
                            .map_err(|e| format!("{name}: {e}"))?;
                        routes.named.insert(name.clone(), h);
                    }
                }
                Ok(routes)
            }
            .boxed_local()
        })
    }
}

/// The worker role's marker, if this process has it (the IPC descriptor, or why the value
/// is unusable). It is removed from the environment at once, so processes the service
/// starts do not inherit it.
fn worker_marker() -> Option<Result<i32, String>> {
    let value = std::env::var_os(WORKER_ENV)?;
    // SAFETY: the worker role starts here, before the worker builds its runtime or any
    // thread of the library's exists (the program's own `main` is documented to call the
    // library before starting threads of its own).
    unsafe { std::env::remove_var(WORKER_ENV) };
    Some(
        value
            .to_str()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{WORKER_ENV}={value:?} is not a descriptor number")),
    )
}

fn code_of(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// The master's check of the `[service]` table, through `S`.
fn check_settings<S: Settings>(table: &toml::Value) -> Result<(), String> {
    let s = S::deserialize(table.clone()).map_err(|e| e.message().trim().replace('\n', " "))?;
    s.validate()
}

fn make_http<S, F, Fut, Svc, E, B>(make: F) -> MakeHandler<S>
where
    S: Settings,
    F: Fn(Worker<S>) -> Fut + 'static,
    Fut: Future<Output = Result<Svc, E>> + 'static,
    E: Into<BoxError>,
    Svc: Service<Request<RequestBody>, Response = Response<B>> + Clone + 'static,
    Svc::Error: Into<BoxError>,
    Svc::Future: 'static,
    B: http_body::Body<Data = Bytes> + 'static,
    B::Error: Into<BoxError>,
{
    let make = Rc::new(make);
    Box::new(move |w| {
        let make = make.clone();
        async move {
            let svc = make(w).await.map_err(Into::into)?;
            Ok(Handler::Http(erase_http(svc)))
        }
        .boxed_local()
    })
}

fn erase_http<Svc, B>(svc: Svc) -> BoxHttp
where
    Svc: Service<Request<RequestBody>, Response = Response<B>> + Clone + 'static,
    Svc::Error: Into<BoxError>,
    Svc::Future: 'static,
    B: http_body::Body<Data = Bytes> + 'static,
    B::Error: Into<BoxError>,
{
    use std::task::{Context, Poll, Waker};
    fn respond<B>(
        r: Result<Response<B>, impl Into<BoxError>>,
    ) -> Result<Response<ResponseBody>, BoxError>
    where
        B: http_body::Body<Data = Bytes> + 'static,
        B::Error: Into<BoxError>,
    {
        r.map(|resp| resp.map(ResponseBody::new))
            .map_err(Into::into)
    }
    // One instance, called in place: a worker is one thread and `call` returns before the
    // next request can start, so no clone per request is needed. A service that is ready
    // at once (routers, `service_fn`: nearly all) is called directly; one that is not gets a
    // clone driven by `oneshot`, which waits for readiness with the task's real waker.
    let spare = svc.clone();
    let shared = std::cell::RefCell::new(svc);
    Rc::new(move |req| {
        let mut svc = match shared.try_borrow_mut() {
            Ok(svc) => svc,
            Err(_) => {
                // Reentered from the service's own `call`: serve from a clone instead.
                return spare.clone().oneshot(req).map(respond).boxed_local();
            }
        };
        match svc.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => svc.call(req).map(respond).boxed_local(),
            Poll::Ready(Err(e)) => futures_util::future::ready(Err(e.into())).boxed_local(),
            Poll::Pending => svc.clone().oneshot(req).map(respond).boxed_local(),
        }
    })
}

fn erase_tcp<Svc>(svc: Svc) -> BoxTcp
where
    Svc: Service<Connection, Response = ()> + Clone + 'static,
    Svc::Error: Into<BoxError>,
    Svc::Future: 'static,
{
    Rc::new(move |conn| {
        let svc = svc.clone();
        async move { svc.oneshot(conn).await.map_err(Into::into) }.boxed_local()
    })
}
