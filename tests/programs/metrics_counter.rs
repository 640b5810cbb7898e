//! A service that defines its own metrics through the library: a counter incremented on
//! every `/count`, a gauge of requests in flight, and a histogram of a made-up job size.
//! The integration tests scrape the pool's endpoint and expect them summed across workers.

use std::convert::Infallible;

use axum::Router;
use axum::routing::get;

fn main() -> std::process::ExitCode {
    app::Server::new()
        .http(|w: app::Worker<app::NoSettings>| async move {
            let m = w.metrics();
            let counted = m
                .counter("demo_counted", "Requests to /count")
                .expect("counter");
            let in_flight = m
                .gauge("demo_in_flight", "Requests to /count in flight")
                .expect("gauge");
            let sizes = m
                .histogram("demo_job_size", "Made-up job sizes", &[1.0, 10.0, 100.0])
                .expect("histogram");
            let count = get(move || async move {
                in_flight.inc();
                counted.inc();
                sizes.observe(5.0);
                in_flight.dec();
                format!("counted {}\n", counted.get())
            });
            Ok::<_, Infallible>(Router::new().route("/count", count))
        })
        .main()
}
