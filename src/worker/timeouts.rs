//! Per-connection clocks: how long a client may take to send a request head, how long a
//! keep-alive connection may sit idle between requests, and how long a peer may refuse to
//! take the bytes of its responses.
//!
//! hyper's own `header_read_timeout` starts when the server begins waiting for a head, so
//! on a keep-alive connection it also caps the idle time between requests: one number for
//! two jobs (a slowloris guard wants seconds, a keep-alive pool wants a minute). Here the two
//! are separate: [`Watched`] sees the first byte of each request arrive, the service
//! wrapper marks requests in flight, and the connection's loop asks [`ConnClock::expired`].
//! hyper has no write timeout at all: [`Watched`] also notes when a write could not proceed
//! (the peer's window is full) and since when, so a client that stops reading is cut after
//! `http.send_timeout` instead of holding its buffered responses forever.
//!
//! The clock is shared with the I/O object, which hyper moves into an upgraded connection and
//! requires to be `Send`, so its fields are atomics (one thread: relaxed, uncontended).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::stats::ConnGuard;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// A request head did not arrive in time (slow or silent client): drop the connection.
    Head,
    /// Idle between requests for too long: close it gracefully.
    Idle,
    /// The peer took no response bytes for `send_timeout`: drop the connection.
    Send,
}

/// Now, in nanoseconds of `CLOCK_MONOTONIC` (the clock behind `Instant` on Linux).
///
/// The per-request path reads the clock a few times (a head's first byte, a request's start
/// and end); as a plain number each read is one vDSO call and the arithmetic on it is plain
/// integer arithmetic, where `Instant` and `Duration` cost checked conversions on every
/// step. Only the rare deadline computations convert back ([`instant_at`]).
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// The `Instant` of a [`now_ns`] reading: both come from the same clock, so one pair of
/// readings taken together once maps every other.
fn instant_at(ns: u64) -> Instant {
    static ORIGIN: std::sync::OnceLock<(std::time::Instant, u64)> = std::sync::OnceLock::new();
    let (at, at_ns) = *ORIGIN.get_or_init(|| (std::time::Instant::now(), now_ns()));
    let t = if ns >= at_ns {
        at + Duration::from_nanos(ns - at_ns)
    } else {
        at.checked_sub(Duration::from_nanos(at_ns - ns))
            .unwrap_or(at)
    };
    Instant::from_std(t)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A [`now_ns`] reading in an atomic; 0 is "not set".
struct AtomicInstant(AtomicU64);

impl AtomicInstant {
    fn unset() -> Self {
        AtomicInstant(AtomicU64::new(0))
    }

    fn set(&self, at: u64) {
        self.0.store(at.max(1), Ordering::Relaxed);
    }

    fn clear(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    fn get(&self) -> Option<u64> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            v => Some(v),
        }
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed) != 0
    }
}

pub struct ConnClock {
    head_timeout: u64,
    idle_timeout: u64,
    send_timeout: u64,
    /// Waiting for a request head since then (from accept, or from its first byte).
    head_since: AtomicInstant,
    /// Idle between requests since then.
    idle_since: AtomicInstant,
    /// A write has been refused (the peer's window is full) since then.
    blocked_since: AtomicInstant,
    in_flight: AtomicU32,
    /// Counts the connection as upgraded (metrics) once it answered 101, for as long as the
    /// clock lives, which is as long as the upgraded I/O object holding it.
    pub upgraded: std::sync::OnceLock<crate::metrics::OpenAs>,
}

impl ConnClock {
    pub fn new(head: Duration, idle: Duration, send: Duration) -> Arc<ConnClock> {
        let c = ConnClock {
            head_timeout: nanos(head),
            idle_timeout: nanos(idle),
            send_timeout: nanos(send),
            head_since: AtomicInstant::unset(),
            idle_since: AtomicInstant::unset(),
            blocked_since: AtomicInstant::unset(),
            in_flight: AtomicU32::new(0),
            upgraded: std::sync::OnceLock::new(),
        };
        c.head_since.set(now_ns());
        Arc::new(c)
    }

    fn on_bytes_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0 && !self.head_since.is_set() {
            self.head_since.set(now_ns());
            self.idle_since.clear();
        }
    }

    fn on_write(&self, blocked: bool) {
        if blocked {
            if !self.blocked_since.is_set() {
                self.blocked_since.set(now_ns());
            }
        } else if self.blocked_since.is_set() {
            self.blocked_since.clear();
        }
    }

    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_since.clear();
        self.idle_since.clear();
    }

    /// Called when a response has been sent in full (its body dropped), at `now` (a
    /// [`now_ns`] reading the caller shares with the request's metrics).
    pub fn request_finished(&self, now: u64) {
        let n = self.in_flight.load(Ordering::Relaxed).saturating_sub(1);
        self.in_flight.store(n, Ordering::Relaxed);
        if n == 0 {
            self.idle_since.set(now);
        }
    }

    /// When to look again: the earliest running deadline, or at the latest one short period
    /// from now (a request may finish meanwhile and start the idle clock).
    pub fn next_check(&self) -> Instant {
        let now = now_ns();
        let period = self
            .head_timeout
            .min(self.idle_timeout)
            .min(self.send_timeout);
        let mut next = now.saturating_add(period);
        if let Some(h) = self.head_since.get() {
            next = next.min(h.saturating_add(self.head_timeout));
        } else if let Some(i) = self.idle_since.get() {
            next = next.min(i.saturating_add(self.idle_timeout));
        }
        if let Some(b) = self.blocked_since.get() {
            next = next.min(b.saturating_add(self.send_timeout));
        }
        instant_at(next)
    }

    pub fn expired(&self) -> Option<Expired> {
        let now = now_ns();
        let past = |since: Option<u64>, timeout: u64| {
            since.is_some_and(|t| now >= t.saturating_add(timeout))
        };
        if past(self.blocked_since.get(), self.send_timeout) {
            return Some(Expired::Send);
        }
        if past(self.head_since.get(), self.head_timeout) {
            return Some(Expired::Head);
        }
        if past(self.idle_since.get(), self.idle_timeout) {
            return Some(Expired::Idle);
        }
        None
    }
}

/// How long a closing connection keeps reading (and discarding) what the client still
/// sends after our side is shut down: closing a socket with unread data in it sends a reset,
/// which can destroy the answer (a 413, a 431) before the client reads it. This is nginx's
/// lingering close.
const LINGER: Duration = Duration::from_millis(500);

/// A connection's I/O: tells its [`ConnClock`] when request bytes arrive and when writes
/// stall, closes with a short lingering read, and keeps the connection counted (its guard)
/// for as long as it exists — also after an upgrade, inside the user's WebSocket task.
pub struct Watched<IO> {
    inner: IO,
    clock: Arc<ConnClock>,
    _counted: ConnGuard,
    /// Set once our side is shut down: the end of the lingering read.
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Bytes read while deciding the protocol, handed out again before anything else.
    replay: bytes::Bytes,
}

/// What an HTTP/2 client with prior knowledge sends first (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl<IO> Watched<IO> {
    pub fn new(inner: IO, clock: Arc<ConnClock>, counted: ConnGuard) -> Self {
        Watched {
            inner,
            clock,
            _counted: counted,
            linger: None,
            replay: bytes::Bytes::new(),
        }
    }
}

impl<IO: AsyncRead + Unpin> Watched<IO> {
    /// Reads the connection's first bytes and says whether they are the HTTP/2 preface.
    /// They are kept and read again by the protocol's parser. Usually one read: an
    /// HTTP/1 request line differs from the preface in its first bytes.
    pub async fn sniff_h2(&mut self) -> io::Result<bool> {
        use tokio::io::AsyncReadExt;
        let mut buf = bytes::BytesMut::with_capacity(4096);
        loop {
            if self.inner.read_buf(&mut buf).await? == 0 {
                // Closed before deciding: let the parser see the little there is.
                self.replay = buf.freeze();
                return Ok(false);
            }
            self.clock.on_bytes_read();
            let n = buf.len().min(H2_PREFACE.len());
            if buf[..n] != H2_PREFACE[..n] || buf.len() >= H2_PREFACE.len() {
                let h2 = buf.starts_with(H2_PREFACE);
                self.replay = buf.freeze();
                return Ok(h2);
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.replay.is_empty() {
            let n = self.replay.len().min(buf.remaining());
            let head = self.replay.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.on_bytes_read();
        }
        r
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.clock.on_write(r.is_pending());
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.linger.is_none() {
            if let Err(e) = ready!(Pin::new(&mut self.inner).poll_shutdown(cx)) {
                return Poll::Ready(Err(e));
            }
            self.linger = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        // Uninitialised: zeroing 2 KiB on every poll costs more than the read it is for.
        let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
        loop {
            let mut buf = ReadBuf::uninit(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => continue,
                // End of stream or an error: the client has what it will read.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    let timer = self.linger.as_mut().expect("set above");
                    return match timer.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Ok(())),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.clock.on_write(r.is_pending());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
