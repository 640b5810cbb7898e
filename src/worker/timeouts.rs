//! Per-connection clocks: how long a client may take to send a request head, and how long a
//! keep-alive connection may sit idle between requests.
//!
//! hyper's own `header_read_timeout` starts when the server begins waiting for a head, so
//! on a keep-alive connection it also caps the idle time between requests: one number for
//! two jobs (a slowloris guard wants seconds, a keep-alive pool wants a minute). Here the two
//! are separate: [`Watched`] sees the first byte of each request arrive, the service
//! wrapper marks requests in flight, and the connection's loop asks [`ConnClock::expired`].

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// A request head did not arrive in time (slow or silent client): drop the connection.
    Head,
    /// Idle between requests for too long: close it gracefully.
    Idle,
}

pub struct ConnClock {
    head_timeout: Duration,
    idle_timeout: Duration,
    /// Waiting for a request head since then (from accept, or from its first byte).
    head_since: Cell<Option<Instant>>,
    /// Idle between requests since then.
    idle_since: Cell<Option<Instant>>,
    in_flight: Cell<u32>,
}

impl ConnClock {
    pub fn new(head_timeout: Duration, idle_timeout: Duration) -> Rc<ConnClock> {
        Rc::new(ConnClock {
            head_timeout,
            idle_timeout,
            head_since: Cell::new(Some(Instant::now())),
            idle_since: Cell::new(None),
            in_flight: Cell::new(0),
        })
    }

    fn on_bytes_read(&self) {
        if self.in_flight.get() == 0 && self.head_since.get().is_none() {
            self.head_since.set(Some(Instant::now()));
            self.idle_since.set(None);
        }
    }

    pub fn request_started(&self) {
        self.in_flight.set(self.in_flight.get() + 1);
        self.head_since.set(None);
        self.idle_since.set(None);
    }

    pub fn request_finished(&self) {
        let n = self.in_flight.get().saturating_sub(1);
        self.in_flight.set(n);
        if n == 0 {
            self.idle_since.set(Some(Instant::now()));
        }
    }

    /// When to look again: the running deadline, or at the latest one short period from now
    /// (a request may finish meanwhile and start the idle clock).
    pub fn next_check(&self) -> Instant {
        let now = Instant::now();
        let period = self.head_timeout.min(self.idle_timeout);
        let deadline = match (self.head_since.get(), self.idle_since.get()) {
            (Some(h), _) => h + self.head_timeout,
            (None, Some(i)) => i + self.idle_timeout,
            (None, None) => now + period,
        };
        deadline.min(now + period)
    }

    pub fn expired(&self) -> Option<Expired> {
        let now = Instant::now();
        if let Some(h) = self.head_since.get()
            && now >= h + self.head_timeout
        {
            return Some(Expired::Head);
        }
        if let Some(i) = self.idle_since.get()
            && now >= i + self.idle_timeout
        {
            return Some(Expired::Idle);
        }
        None
    }
}

/// An I/O stream that tells its [`ConnClock`] when request bytes arrive.
pub struct Watched<IO> {
    inner: IO,
    clock: Rc<ConnClock>,
}

impl<IO> Watched<IO> {
    pub fn new(inner: IO, clock: Rc<ConnClock>) -> Self {
        Watched { inner, clock }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.on_bytes_read();
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
