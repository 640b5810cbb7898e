//! The smallest HTTP service: `GET /` answers a fixed text with a plain `service_fn` (no
//! router), as the pre-library demo did. The benchmarks use it to measure the library's own
//! per-request cost apart from any framework's (`scripts/bench.sh --bin hello`).

use std::convert::Infallible;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;

fn main() -> std::process::ExitCode {
    app::Server::new()
        .http(|w: app::Worker<app::NoSettings>| async move {
            let hello = Bytes::from(format!("hello from worker {}\n", w.id));
            Ok::<_, Infallible>(tower::service_fn(move |req: Request<app::RequestBody>| {
                let (status, body) = match (req.method(), req.uri().path()) {
                    (&Method::GET, "/") => (StatusCode::OK, hello.clone()),
                    _ => (StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
                };
                async move {
                    let mut resp = Response::new(Full::new(body));
                    *resp.status_mut() = status;
                    resp.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; charset=utf-8"),
                    );
                    Ok::<_, Infallible>(resp)
                }
            }))
        })
        .main()
}
