//! What a load balancer asks a worker: whether the pool wants new traffic.
//!
//! * The readiness endpoint (`[http] ready_path`, `/.well-known/ready` by default), answered
//!   in front of the service on every measured HTTP socket (`Server::start` checks the
//!   path): 200 `ready` when the pool is ready, 503 with the state (`starting`,
//!   `draining`, `stopping`) otherwise.
//!   Every other path still goes to the service, also while draining: a drain only asks the
//!   load balancer to send new requests elsewhere, it refuses nothing.
//! * HAProxy's `agent-check` on the socket named `agent`: one line (`ready`, `drain` or
//!   `maint`) and the connection is closed, which is the whole protocol.
//!
//! The state is the master's, read from the load board on every probe (see
//! [`crate::loadboard`] for why it lives there): a worker has no readiness of its own.

use std::rc::Rc;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{CACHE_CONTROL, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use tokio::io::AsyncWriteExt;

use super::routes::{Handler, ResponseBody};
use super::stats::Stats;
use crate::loadboard::Readiness;

/// The socket name (`FileDescriptorName=agent`, or `--agent ADDR`) answered with HAProxy's
/// agent-check protocol, unless the program registers its own handler for it.
pub const AGENT_SOCKET: &str = "agent";

/// The readiness endpoint's answer in `state`.
pub fn answer(state: Readiness) -> Response<ResponseBody> {
    let (status, body) = match state {
        Readiness::Ready => (StatusCode::OK, "ready\n"),
        other => (StatusCode::SERVICE_UNAVAILABLE, word(other)),
    };
    let mut r = Response::new(ResponseBody::new(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *r.status_mut() = status;
    // A cached "ready" would hide the drain it exists to announce.
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn word(r: Readiness) -> &'static str {
    match r {
        Readiness::Starting => "starting\n",
        Readiness::Ready => "ready\n",
        Readiness::Draining => "draining\n",
        Readiness::Stopping => "stopping\n",
    }
}

/// HAProxy's agent-check: `drain` sets the server's weight to 0 while its health check
/// still counts; `maint` takes it out until the agent says `ready` again, which is what a
/// pool that is not serving yet (or any more) needs.
pub fn agent_word(r: Readiness) -> &'static [u8] {
    match r {
        Readiness::Ready => b"ready\n",
        Readiness::Draining => b"drain\n",
        Readiness::Starting | Readiness::Stopping => b"maint\n",
    }
}

/// The built-in agent-check handler.
pub fn agent_handler(stats: Rc<Stats>) -> Handler {
    Handler::Tcp(Rc::new(move |mut conn| {
        let answer = agent_word(stats.readiness());
        async move {
            // Bounded: a peer that does not read cannot hold the connection past this.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                conn.write_all(answer).await?;
                conn.shutdown().await
            })
            .await;
            Ok(())
        }
        .boxed_local()
    }))
}
