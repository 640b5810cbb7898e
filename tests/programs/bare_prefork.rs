//! Bench anchor (`scripts/bench/pinning.sh`): the floor of what supervision may cost — bind
//! one socket, fork N processes, each serving the demo's `GET /` with axum on its own
//! single-threaded tokio runtime, all accepting on that socket. No pinning, no heartbeats,
//! no restarts, no load board.
//!
//! `bare_prefork ADDR N`; N = 0 serves in this process without forking (one worker that
//! `callgrind_control` can reach, for `scripts/bench/instructions.sh --bare`).

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

fn serve(listener: std::net::TcpListener, id: usize) -> ! {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let app = Router::new()
            .route("/", get(hello))
            .route("/healthz", get(|| async { "ok\n" }))
            .with_state(Arc::new(Bytes::from(format!("hello from worker {id}\n"))));
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        axum::serve(listener, app).await.unwrap();
    });
    std::process::exit(0)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8080".into());
    let n: usize = args.next().and_then(|t| t.parse().ok()).unwrap_or(2);
    let listener = std::net::TcpListener::bind(&addr).unwrap();
    if n == 0 {
        serve(listener, 0);
    }
    let parent = std::process::id() as i32;
    for id in 0..n {
        // SAFETY: no thread exists yet; the child only builds its own runtime.
        match unsafe { libc::fork() } {
            0 => {
                unsafe {
                    libc::prctl(
                        libc::PR_SET_PDEATHSIG,
                        libc::SIGKILL as libc::c_ulong,
                        0,
                        0,
                        0,
                    )
                };
                if unsafe { libc::getppid() } != parent {
                    std::process::exit(1);
                }
                serve(listener, id);
            }
            pid if pid < 0 => panic!("fork: {}", std::io::Error::last_os_error()),
            _ => {}
        }
    }
    eprintln!("bare_prefork: {n} processes on {addr}");
    // Children die with us (PDEATHSIG); we only wait.
    loop {
        let mut status = 0;
        if unsafe { libc::wait(&mut status) } < 0 {
            break;
        }
    }
}
