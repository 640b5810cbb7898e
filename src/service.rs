//! The service: **the one file you edit to make this template yours.**
//!
//! Everything else in the crate is the supervisor (socket activation, workers, heartbeats,
//! reloads, systemd). This module knows nothing of it and imports nothing from it: it gets
//! a request and answers it. The contract is small:
//!
//! * [`Settings`] is the `[service]` table of the config file. It is validated by the master
//!   before anything starts and pushed to every worker; a reload (`systemctl reload app`)
//!   brings new settings to a new generation of workers.
//! * [`Service::new`] runs once per worker process, before it serves.
//! * [`Service::call`] answers one request. It runs on the worker's single-threaded runtime:
//!   await I/O freely, but do not block the thread (a blocked thread misses heartbeats and
//!   the master replaces the worker, which is the point).
//!
//! Around it, the worker already provides: `X-Worker` on every response, request limits
//! (header size and time, body size, connection count), a 500 for a panicking handler, and
//! graceful drain.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

/// The request type handed to [`Service::call`]: the body is already capped at the
/// configured `http.max_body_bytes`, so reading it cannot exhaust memory.
pub type ServiceRequest = Request<Limited<Incoming>>;
/// The response type: a complete body.
pub type ServiceResponse = Response<Full<Bytes>>;

/// The `[service]` table of the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// First word of the answer to `GET /`.
    pub greeting: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            greeting: "hello".into(),
        }
    }
}

impl Settings {
    /// Called by the master on start and on every reload; an error fails the reload and
    /// keeps the running workers.
    pub fn validate(&self) -> Result<(), String> {
        if self.greeting.is_empty() || self.greeting.len() > 256 {
            return Err("greeting must be 1 to 256 bytes".into());
        }
        if self.greeting.chars().any(char::is_control) {
            return Err("greeting must not contain control characters".into());
        }
        Ok(())
    }
}

/// One per worker process.
pub struct Service {
    /// The answer to `GET /`, built once: it only changes with the settings, which only
    /// change with a new generation of workers.
    hello: Bytes,
}

impl Service {
    /// `worker_id` is the worker's slot (0..N); it is stable across restarts and reloads.
    pub fn new(settings: Settings, worker_id: usize) -> Self {
        Service {
            hello: Bytes::from(format!("{} from worker {worker_id}\n", settings.greeting)),
        }
    }

    pub async fn call(&self, req: ServiceRequest) -> ServiceResponse {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/") => text(StatusCode::OK, self.hello.clone()),
            (&Method::GET, "/healthz") => text(StatusCode::OK, Bytes::from_static(b"ok\n")),
            (&Method::GET, "/sleep") => {
                // A slow request on demand: shows that stop and reload let it finish.
                let ms = query_u64(req.uri().query(), "ms")
                    .unwrap_or(1000)
                    .min(600_000);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                text(StatusCode::OK, format!("slept {ms}ms\n").into())
            }
            (&Method::POST, "/echo") => match req.into_body().collect().await {
                Ok(body) => Response::new(Full::new(body.to_bytes())),
                Err(_) => text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    Bytes::from_static(b"body too large\n"),
                ),
            },
            (_, "/" | "/healthz" | "/sleep" | "/echo") => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n".into(),
            ),
            _ => text(StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
        }
    }
}

fn text(status: StatusCode, body: Bytes) -> ServiceResponse {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// `?ms=250` style lookups without pulling in a URL crate.
pub fn query_u64(query: Option<&str>, key: &str) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}
