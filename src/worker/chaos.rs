//! Routes that misbehave on purpose, so supervision can be seen working. Present only with
//! `--chaos`, as a wrapper around whatever service the program registered; they know
//! nothing of that service.
//!
//! * `/chaos/hang`: spins the worker's only thread forever. Heartbeats stop; the master
//!   kills and replaces the worker.
//! * `/chaos/panic`: panics in the handler. The client gets a 500; the worker says it is
//!   leaving, drains, and is replaced.
//! * `/chaos/leak?mb=N`: allocates N MiB and keeps it, to trip `max_memory`.

use std::cell::RefCell;
use std::rc::Rc;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Response, StatusCode};
use http_body_util::Full;

use super::routes::{BoxHttp, ResponseBody};

thread_local! {
    static LEAKED: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// `inner`, with `/chaos/*` answered here.
pub fn wrap(inner: BoxHttp) -> BoxHttp {
    Rc::new(move |req| {
        if !req.uri().path().starts_with("/chaos/") {
            return inner(req);
        }
        async move {
            let mb = query_u64(req.uri().query(), "mb");
            Ok(match req.uri().path() {
                "/chaos/hang" => loop {
                    std::hint::spin_loop();
                },
                "/chaos/panic" => panic!("chaos: a panic was requested"),
                "/chaos/leak" => {
                    let mb = mb.unwrap_or(16).min(4096) as usize;
                    // Touch every page so it counts in RSS/PSS, not just address space.
                    let block = vec![0xA5u8; mb << 20];
                    let total = LEAKED.with(|l| {
                        let mut l = l.borrow_mut();
                        l.push(block);
                        l.iter().map(Vec::len).sum::<usize>() >> 20
                    });
                    text(
                        StatusCode::OK,
                        format!("leaked {mb} MiB, {total} MiB held\n"),
                    )
                }
                _ => text(StatusCode::NOT_FOUND, "no such chaos\n".into()),
            })
        }
        .boxed_local()
    })
}

fn text(status: StatusCode, body: String) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::new(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r
}

fn query_u64(query: Option<&str>, key: &str) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}
