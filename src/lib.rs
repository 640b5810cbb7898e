//! A systemd-native, socket-activated prefork server for any tower service.
//!
//! What Node's `cluster` and PM2 give JavaScript, and what gunicorn and nginx do with a
//! master and workers, fitted to systemd: systemd owns the listening socket, a master
//! inherits it and starts one worker process per CPU, pinned, each serving your service on
//! its own single-threaded tokio runtime. The master never serves a request; it supervises
//! (heartbeats, crash and panic recovery, a restart budget, memory and request recycling)
//! and rolls a new generation of workers out on `systemctl reload` with no failed request.
//!
//! The smallest complete program (an axum `Router`; any `tower::Service` over
//! `http::Request<RequestBody>` works, as does a tonic server):
//!
//! ```no_run
//! use axum::{Router, routing::get};
//!
//! fn main() -> std::process::ExitCode {
//!     app::Server::new()
//!         .http(|worker: app::Worker<app::NoSettings>| async move {
//!             let hello = format!("hello from worker {}\n", worker.id);
//!             Ok::<_, std::convert::Infallible>(
//!                 Router::new().route("/", get(move || async move { hello })),
//!             )
//!         })
//!         .main()
//! }
//! ```
//!
//! `main` gives the program the command line `serve | check | status | reload | scale`; a program with a
//! command line of its own embeds [`Command`] or [`ServeArgs`] in it and calls
//! [`Server::run_command`] or [`Server::serve`]. Workers run the same program with the same
//! arguments and are recognised by an environment marker, so nothing else changes.
//!
//! What a factory gets and may do:
//!
//! * it runs once per worker process, and may `await` (open a database pool, warm a cache);
//! * it receives your `[service]` settings as your own serde type ([`Settings`]), validated
//!   by the master on start and on every reload, and the worker's identity ([`Worker`]);
//! * the service it returns need not be `Send`: each worker is one thread, so `Rc` and
//!   `RefCell` state is fine, and cheaper than locks. In-memory state is per worker process.
//!
//! Around every service the worker adds: HTTP/1.1 and HTTP/2 (h2c) on the same socket,
//! upgrades (WebSockets), `X-Worker`, request head/body/connection limits and timeouts, a
//! 500 and a replacement worker for a panicking handler, and graceful drain.

#![warn(missing_docs)]

mod cli;
mod config;
mod contract;
mod control;
mod exit;
#[cfg(test)]
mod fuzz;
mod handoff;
mod ipc;
mod listen;
mod loadboard;
mod logging;
mod manual;
mod master;
mod metrics;
mod notify;
mod server;
mod shutdown;
mod tls;
mod version;
mod worker;

pub use cli::{Cli, ClientArgs, Command};
pub use config::ServeArgs;
/// What `app status --json` prints, typed: a program (or a test) reads it back with serde.
pub use control::{
    DrainReport, GenerationReport, ReloadReport, StatusReport, TlsReport, WorkerReport,
};
pub use loadboard::Readiness;
pub use metrics::user::{Counter, Gauge, Histogram, MetricError, Metrics};
pub use server::{BoxError, NoSettings, Server, Settings, Worker};
pub use shutdown::Shutdown;
pub use worker::{BodyError, Connection, RequestBody};
