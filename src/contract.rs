//! The contract between a master and the workers it starts, in one place both sides use.
//!
//! A worker is the same program started again with [`WORKER_ENV`] set to the number of its
//! IPC channel; nothing else in its command line or environment tells it who it is. It
//! inherits exactly these descriptors ([`Layout`]), and checks each one before adopting it
//! (a wrong one is a clear error and exit code, never a SIGBUS or a read from the wrong
//! socket):
//!
//! | fd | what | checked |
//! |---|---|---|
//! | 3 .. 3+N | the N listening sockets, in the order the boot message names them | a listening stream socket |
//! | 3+N | the IPC channel: length-prefixed JSON, [`crate::ipc`] | a Unix socket |
//! | 3+N+1 | the round-robin connection hand-off channel ([`crate::handoff`]) | a Unix socket |
//! | 3+N+2 | the load board and metrics page (one memfd) | a regular file at least as long as what is mapped |
//!
//! The first message on the channel is the boot message ([`crate::ipc::WorkerSetup`]): the
//! worker's identity (slot, generation, home CPU), its limits, its socket names and its
//! service's settings. Everything after is [`crate::ipc::ToWorker`] and
//! [`crate::ipc::ToMaster`]. A drain's timeout travels with each `Drain` (a stop drains for
//! `shutdown_timeout`, a reload for `drain_timeout`); the boot message's `drain_timeout` is
//! for drains the worker begins itself (SIGTERM, a panic, its request limit).

use std::os::fd::RawFd;

use crate::listen::LISTEN_FDS_START;

/// Set in a worker's environment to its IPC channel's descriptor number. The worker role is
/// an environment marker rather than an argument, so it never touches the user's command
/// line (a worker runs the master's own, so that a program with its own command-line
/// interface reaches the library's entry point unchanged).
pub const WORKER_ENV: &str = "APP_WORKER_FD";

/// Where a worker's inherited descriptors sit, for `listeners` listening sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    listeners: usize,
}

impl Layout {
    pub fn new(listeners: usize) -> Layout {
        Layout { listeners }
    }

    /// The layout whose IPC channel is at `channel` (what [`WORKER_ENV`] says), if any.
    pub fn from_channel(channel: RawFd) -> Option<Layout> {
        (channel >= LISTEN_FDS_START).then(|| Layout {
            listeners: (channel - LISTEN_FDS_START) as usize,
        })
    }

    pub fn listeners(&self) -> usize {
        self.listeners
    }

    /// Listening socket `i`.
    pub fn listener(&self, i: usize) -> RawFd {
        LISTEN_FDS_START + i as RawFd
    }

    pub fn channel(&self) -> RawFd {
        LISTEN_FDS_START + self.listeners as RawFd
    }

    pub fn handoff(&self) -> RawFd {
        self.channel() + 1
    }

    pub fn board(&self) -> RawFd {
        self.channel() + 2
    }

    /// One past the highest inherited descriptor: the spawner stages copies above it.
    pub fn end(&self) -> RawFd {
        self.board() + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_follows_the_listeners() {
        let one = Layout::new(1);
        assert_eq!(
            (one.listener(0), one.channel(), one.handoff(), one.board()),
            (3, 4, 5, 6)
        );
        let three = Layout::new(3);
        assert_eq!((three.listener(2), three.channel(), three.end()), (5, 6, 9));
        assert_eq!(Layout::from_channel(6), Some(three));
        assert_eq!(Layout::from_channel(2), None);
    }
}
