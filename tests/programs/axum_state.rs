//! A program a team would write with the library: its own axum `Router` with shared state,
//! its own settings type, and a raw line-echo protocol on a second socket named `line`.
//! It uses only the library's public API (the integration tests drive it).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Settings {
    prefix: String,
}

impl app::Settings for Settings {
    fn validate(&self) -> Result<(), String> {
        if self.prefix.len() > 16 {
            return Err("prefix must be at most 16 bytes".into());
        }
        Ok(())
    }
}

struct Counter {
    prefix: String,
    worker: usize,
    hits: AtomicU64,
}

async fn hit(State(c): State<Arc<Counter>>) -> String {
    let n = c.hits.fetch_add(1, Ordering::Relaxed) + 1;
    format!("{}worker {} hit {n}\n", c.prefix, c.worker)
}

fn main() -> std::process::ExitCode {
    app::Server::<Settings>::with_settings()
        .http(|w: app::Worker<Settings>| async move {
            // An async factory: stands in for opening a pool before serving.
            tokio::task::yield_now().await;
            let state = Arc::new(Counter {
                prefix: w.settings.prefix.clone(),
                worker: w.id,
                hits: AtomicU64::new(0),
            });
            Ok::<_, Infallible>(Router::new().route("/hit", get(hit)).with_state(state))
        })
        .tcp_on("line", |w: app::Worker<Settings>| async move {
            let id = w.id;
            Ok::<_, Infallible>(tower::service_fn(move |conn: app::Connection| async move {
                let mut lines = BufReader::new(conn);
                let mut line = String::new();
                while lines.read_line(&mut line).await? > 0 {
                    let reply = format!("worker {id}: {line}");
                    lines.get_mut().write_all(reply.as_bytes()).await?;
                    line.clear();
                }
                Ok::<_, std::io::Error>(())
            }))
        })
        .main()
}
