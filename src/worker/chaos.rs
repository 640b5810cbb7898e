//! Demo routes that misbehave on purpose, so supervision can be seen working. Present only
//! with `--chaos`; they live here, beside the server setup, not in the user's service.
//!
//! * `/chaos/hang`: spins the worker's only thread forever. Heartbeats stop; the master
//!   kills and replaces the worker.
//! * `/chaos/panic`: panics in the handler. The client gets a 500; the worker says it is
//!   leaving, drains, and is replaced.
//! * `/chaos/leak?mb=N`: allocates N MiB and keeps it, to trip `max_memory`.

use std::cell::RefCell;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

use crate::service::{ServiceRequest, ServiceResponse, query_u64};

thread_local! {
    static LEAKED: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

pub async fn handle(req: ServiceRequest) -> ServiceResponse {
    match req.uri().path() {
        "/chaos/hang" => loop {
            std::hint::spin_loop();
        },
        "/chaos/panic" => panic!("chaos: a panic was requested"),
        "/chaos/leak" => {
            let mb = query_u64(req.uri().query(), "mb").unwrap_or(16).min(4096) as usize;
            // Touch every page so it counts in RSS/PSS, not just address space.
            let block = vec![0xA5u8; mb << 20];
            let total = LEAKED.with(|l| {
                let mut l = l.borrow_mut();
                l.push(block);
                l.iter().map(Vec::len).sum::<usize>() >> 20
            });
            Response::new(Full::new(Bytes::from(format!(
                "leaked {mb} MiB, {total} MiB held\n"
            ))))
        }
        _ => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"no such chaos\n")));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    }
}
