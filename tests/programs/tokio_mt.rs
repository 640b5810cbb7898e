//! Bench anchor (`scripts/bench/pinning.sh`): the demo's `GET /` and `/healthz` as a plain
//! axum service on tokio's multi-thread runtime, `axum::serve` on one listener — what a Rust
//! team deploys without a prefork supervisor. No pinning, no supervision.
//!
//! `tokio_mt ADDR [THREADS]` (THREADS defaults to the CPUs this process may use).

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

async fn hello(State(body): State<Arc<Bytes>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Bytes::clone(&body),
    )
        .into_response()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8080".into());
    let threads = args
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let app = Router::new()
            .route("/", get(hello))
            .route("/healthz", get(|| async { "ok\n" }))
            .with_state(Arc::new(Bytes::from_static(b"hello from worker 0\n")));
        let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
        eprintln!("tokio_mt: {threads} threads on {addr}");
        axum::serve(listener, app).await.unwrap();
    });
}
