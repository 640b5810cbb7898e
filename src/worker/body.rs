//! The request body every service receives: hyper's body, with the worker's limits on it.
//!
//! * **Size**: more than `http.max_body_bytes` fails the body with http-body-util's
//!   `LengthLimitError` (axum, for one, answers that with 413); a declared `Content-Length`
//!   over the limit never reaches the service (the worker answers 413 itself).
//! * **Time**: the service waiting for body data waits at most `http.body_read_timeout`
//!   between two reads (this also ends `Expect: 100-continue` without a body), and once a
//!   body has been read for that long its average rate must reach `http.min_body_rate`, so a
//!   body trickled a byte every few seconds is cut instead of holding a connection forever.
//! * **Memory**: the bytes of bodies still arriving count against the worker's
//!   `http.max_pending_body_bytes` ([`BodyBudget`]); a declared length is reserved up front,
//!   a chunked body as it arrives, and everything is given back when the body is dropped. So
//!   stalled uploads cannot pin more than that much of a worker's memory.
//!
//! tower-http's `RequestBodyLimitLayer` and `TimeoutBody` each wrap the body in a type of
//! their own; the service must see one body type, and the budget has no layer, so the three
//! live in this one wrapper (the size limit still is http-body-util's `Limited`).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Limited;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::stats::BodyBudget;
use crate::config::HttpLimits;
use crate::server::BoxError;

/// Why the worker ended a request body early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// No body data for `http.body_read_timeout`.
    Timeout,
    /// Slower on average than `http.min_body_rate`.
    TooSlow,
    /// The worker's `http.max_pending_body_bytes` is in use by other bodies.
    Busy,
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BodyError::Timeout => "request body timed out (http.body_read_timeout)",
            BodyError::TooSlow => "request body too slow (http.min_body_rate)",
            BodyError::Busy => "too many request body bytes pending (http.max_pending_body_bytes)",
        })
    }
}

impl std::error::Error for BodyError {}

/// The body of a request as the service sees it: `Send`, data as [`Bytes`], errors boxed
/// (a [`BodyError`], http-body-util's `LengthLimitError`, or hyper's error).
pub struct RequestBody {
    inner: Limited<Incoming>,
    budget: &'static BodyBudget,
    /// Bytes of the budget this body holds.
    held: u64,
    /// Reserved up front for a declared length; frames use it before taking more.
    reserved_unused: u64,
    read: u64,
    /// When the service first waited for data, and when data last came: set lazily, so a
    /// request whose body is never waited for (most GETs) reads no clock.
    started: Option<Instant>,
    last_data: Option<Instant>,
    read_timeout: Duration,
    min_rate: u64,
    timer: Option<Pin<Box<Sleep>>>,
    failed: bool,
}

impl RequestBody {
    /// Wraps `inner`, which holds `declared` bytes (a `Content-Length`) of the budget: the
    /// caller took them with [`BodyBudget::take`] first, and answered 503 if it could not
    /// (so the request is never taken apart and put together again for this).
    pub(crate) fn holding(
        inner: Incoming,
        limits: &HttpLimits,
        budget: &'static BodyBudget,
        declared: u64,
    ) -> RequestBody {
        RequestBody {
            inner: Limited::new(
                inner,
                usize::try_from(limits.max_body_bytes).unwrap_or(usize::MAX),
            ),
            budget,
            held: declared,
            reserved_unused: declared,
            read: 0,
            started: None,
            last_data: None,
            read_timeout: limits.body_read_timeout,
            min_rate: limits.min_body_rate,
            timer: None,
            failed: false,
        }
    }

    /// When the body must have delivered more: the next read's deadline, or the moment its
    /// average rate would fall below the minimum.
    fn deadline(&mut self) -> Instant {
        let now = Instant::now();
        let started = *self.started.get_or_insert(now);
        let last = *self.last_data.get_or_insert(now);
        let stall = last + self.read_timeout;
        if self.min_rate == 0 {
            return stall;
        }
        let for_rate = Duration::from_secs_f64(self.read as f64 / self.min_rate as f64);
        stall.min(started + for_rate.max(self.read_timeout))
    }

    fn fail(&mut self, e: BodyError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.failed = true;
        self.timer = None;
        Poll::Ready(Some(Err(Box::new(e))))
    }

    fn account(&mut self, n: u64) -> Result<(), BodyError> {
        let from_reserve = n.min(self.reserved_unused);
        self.reserved_unused -= from_reserve;
        let extra = n - from_reserve;
        if extra > 0 {
            if !self.budget.take(extra) {
                return Err(BodyError::Busy);
            }
            self.held += extra;
        }
        self.read += n;
        if self.started.is_some() {
            // Only a body that has been waited for runs its clocks.
            self.last_data = Some(Instant::now());
        }
        Ok(())
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && !data.is_empty()
                {
                    let n = data.len() as u64;
                    crate::metrics::bytes_in(n);
                    if let Err(e) = self.account(n) {
                        return self.fail(e);
                    }
                    self.timer = None;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.failed = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                self.timer = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let deadline = self.deadline();
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    let now = Instant::now();
                    let last = self.last_data.unwrap_or(now);
                    let e = if now >= last + self.read_timeout {
                        BodyError::Timeout
                    } else {
                        BodyError::TooSlow
                    };
                    return self.fail(e);
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.budget.give_back(self.held);
    }
}
