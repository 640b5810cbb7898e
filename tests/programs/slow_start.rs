//! A service whose worker in slot 1 of the first generation does not finish starting until a
//! file exists (`SLOW_START_GATE`, waited for at most 30 s): the pool then has a serving
//! worker but is not ready, which the readiness tests need. Uses only the public API.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;

fn main() -> std::process::ExitCode {
    app::Server::new()
        .http(|w: app::Worker<app::NoSettings>| async move {
            if w.id == 1
                && w.generation == 1
                && let Some(gate) = std::env::var_os("SLOW_START_GATE")
            {
                let deadline = Instant::now() + Duration::from_secs(30);
                while !std::path::Path::new(&gate).exists() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let id = w.id;
            Ok::<_, Infallible>(tower::service_fn(
                move |_: Request<app::RequestBody>| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                        "worker {id}\n"
                    )))))
                },
            ))
        })
        .main()
}
