//! A raw connection, for a socket served by a non-HTTP handler ([`crate::Server::tcp_on`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::stats::ConnGuard;
use crate::listen::Stream;

/// One accepted connection (TCP or Unix stream) on a socket with a raw handler: read and
/// write it with tokio's `AsyncReadExt`/`AsyncWriteExt`. It counts as open in `app status`
/// until dropped; a draining worker waits for it until `drain_timeout`.
pub struct Connection {
    stream: Stream,
    socket: usize,
    _counted: ConnGuard,
}

impl Connection {
    pub(crate) fn new(stream: Stream, counted: ConnGuard, socket: usize) -> Connection {
        Connection {
            stream,
            socket,
            _counted: counted,
        }
    }

    /// The peer's address (`None` for a Unix socket peer).
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        match &self.stream {
            Stream::Tcp(s) => s.peer_addr().ok(),
            Stream::Unix(_) => None,
        }
    }

    /// Which listening socket (0 = fd 3) it came in on.
    pub fn socket_index(&self) -> usize {
        self.socket
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
