//! The demo service: **the file you edit to make this template yours.**
//!
//! It is an ordinary axum application. The supervisor around it (the `app` library) imports
//! nothing from it, and it imports nothing of the supervisor but the two types it is handed:
//!
//! * [`Settings`] is the `[service]` table of the config file, validated by the master on
//!   start and on every reload (`systemctl reload app`), which brings new settings to a new
//!   generation of workers.
//! * [`make`] runs once in each worker process, before it serves, and may `await` (open a
//!   database pool, warm a cache). It returns the `Router`.
//!
//! Handlers run on the worker's single-threaded runtime: await I/O freely, but do not block
//! the thread (a blocked thread misses heartbeats and the master replaces the worker, which
//! is the point). State built in `make` belongs to this worker process alone.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use futures_util::stream::{self, Stream};
use serde::{Deserialize, Serialize};

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

impl app::Settings for Settings {
    fn validate(&self) -> Result<(), String> {
        if self.greeting.is_empty() || self.greeting.len() > 256 {
            return Err("greeting must be 1 to 256 bytes".into());
        }
        if self.greeting.chars().any(char::is_control) {
            return Err("greeting must not contain control characters".into());
        }
        Ok(())
    }
}

/// What every handler of this worker shares.
struct Demo {
    /// The answer to `GET /`, built once: it only changes with the settings, which only
    /// change with a new generation of workers.
    hello: Bytes,
}

/// Builds this worker's service.
pub async fn make(worker: app::Worker<Settings>) -> Result<Router, Infallible> {
    let demo = Arc::new(Demo {
        hello: Bytes::from(format!(
            "{} from worker {}\n",
            worker.settings.greeting, worker.id
        )),
    });
    Ok(Router::new()
        .route("/", get(hello))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/sleep", get(sleep))
        .route("/echo", post(echo))
        .route("/stream", get(chunks))
        .route("/sse", get(sse))
        .route("/ws", get(ws))
        .route("/users/{id}", get(user))
        .with_state(demo))
}

async fn hello(State(demo): State<Arc<Demo>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        demo.hello.clone(),
    )
        .into_response()
}

#[derive(Deserialize)]
struct Pace {
    ms: Option<u64>,
    chunks: Option<u64>,
    events: Option<u64>,
}

/// A slow request on demand: shows that stop and reload let it finish.
async fn sleep(Query(p): Query<Pace>) -> String {
    let ms = p.ms.unwrap_or(1000).min(600_000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    format!("slept {ms}ms\n")
}

/// The body back, as sent (the worker caps its size at `http.max_body_bytes`).
async fn echo(body: Bytes) -> Bytes {
    body
}

/// `N` chunks, `M` ms apart, as they are produced (chunked transfer encoding).
async fn chunks(Query(p): Query<Pace>) -> Response {
    let n = p.chunks.unwrap_or(5).min(1_000_000);
    let gap = Duration::from_millis(p.ms.unwrap_or(200).min(60_000));
    Body::from_stream(paced(n, gap, |i| Bytes::from(format!("chunk {i}\n")))).into_response()
}

/// Server-Sent Events: `N` events, `M` ms apart.
async fn sse(Query(p): Query<Pace>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let n = p.events.unwrap_or(5).min(10_000);
    let gap = Duration::from_millis(p.ms.unwrap_or(200).min(60_000));
    Sse::new(paced(n, gap, |i| {
        Event::default()
            .id(i.to_string())
            .data(format!("event {i}"))
    }))
}

/// `n` items made by `item`, the first at once and then one every `gap`.
fn paced<T: Send + 'static>(
    n: u64,
    gap: Duration,
    item: fn(u64) -> T,
) -> impl Stream<Item = Result<T, Infallible>> + Send + 'static {
    stream::unfold(0, move |i| async move {
        if i >= n {
            return None;
        }
        if i > 0 && !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        Some((Ok(item(i)), i + 1))
    })
}

/// A WebSocket that echoes every text and binary message.
async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(echo_socket)
}

async fn echo_socket(mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        let reply = match msg {
            Message::Text(_) | Message::Binary(_) => msg,
            Message::Close(_) => break,
            _ => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}

#[derive(Serialize)]
struct User {
    id: u64,
    name: &'static str,
}

/// JSON for a known id, a JSON 404 otherwise.
async fn user(Path(id): Path<u64>) -> Response {
    const USERS: [&str; 3] = ["ada", "grace", "edsger"];
    match usize::try_from(id)
        .ok()
        .and_then(|i| USERS.get(i.checked_sub(1)?))
    {
        Some(name) => Json(User { id, name }).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": "no such user", "id": id })),
        )
            .into_response(),
    }
}
