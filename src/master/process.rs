//! The shell's side of one worker: its channel, its hand-off socket, its load-board entry,
//! and what the master reads of it from `/proc` for `app status` and the metrics. The
//! supervisor's view of the same worker (its life, its heartbeats) is
//! [`core::worker::Worker`](super::core::worker::Worker); the two share the pid.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

use super::ChannelEvent;
use super::memory::Memory;
use super::rates::Rates;
use crate::ipc::{self, ToMaster, ToWorker};

pub struct Process {
    pub pid: i32,
    pub slot: usize,
    pub generation: u64,
    pub tx: mpsc::UnboundedSender<ToWorker>,
    /// The master's end of the connection hand-off channel.
    pub handoff: Arc<OwnedFd>,
    /// Its entry on the load board.
    pub board_index: usize,
    /// CPU % and requests/s for `app status`.
    pub rates: Rates,
    pub memory: Memory,
    /// The latest heartbeat sent: its seq and when (for the round trip in the metrics).
    pub ping: Option<(u64, Instant)>,
    /// The CPUs it may run on now, and how it got them.
    pub mask: Vec<usize>,
    pub affinity: super::balance::Placement,
}

impl Process {
    pub fn send(&mut self, msg: ToWorker, now: Instant) {
        if let ToWorker::Ping { seq } = msg {
            self.ping = Some((seq, now));
        }
        // A closed channel means the worker is exiting; the reaper will see it.
        let _ = self.tx.send(msg);
    }

    /// The round trip of the heartbeat a `Pong { seq }` answers, if it answers the latest.
    pub fn round_trip(&self, seq: u64, now: Instant) -> Option<Duration> {
        match self.ping {
            Some((sent_seq, at)) if sent_seq == seq && seq > 0 => {
                Some(now.saturating_duration_since(at))
            }
            _ => None,
        }
    }
}

/// Wires a worker's channel into the loop: a reader task forwarding decoded messages,
/// a writer task draining an unbounded queue (so the loop never waits on a worker).
///
/// `first` (the boot message) is written before this returns, not queued: the writer
/// task runs only when the loop yields, and a reload of hundreds of workers spawns them
/// all in one turn, which on a loaded host outlasts the worker's wait for its setup. The
/// socket pair is new and empty, so the write fits its buffer; the timeout only bounds a
/// message larger than the buffer that a dead worker never reads. A failed write is not
/// a failed spawn: a worker that is already gone (a binary that exits at once) is judged
/// by its exit like any other, and one left without its setup gives up on its own.
pub fn attach_channel(
    pid: i32,
    mut stream: std::os::unix::net::UnixStream,
    first: &ToWorker,
    events: mpsc::UnboundedSender<ChannelEvent>,
) -> std::io::Result<mpsc::UnboundedSender<ToWorker>> {
    {
        use std::io::Write;
        use tokio_util::codec::Encoder;
        let mut frame = bytes::BytesMut::new();
        ipc::codec().encode(ipc::encode(first), &mut frame)?;
        stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        if let Err(e) = stream.write_all(&frame) {
            tracing::debug!(pid, "boot message not delivered: {e}");
        }
    }
    stream.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(stream)?;
    let (mut sink, mut frames) = Framed::new(stream, ipc::codec()).split();
    tokio::spawn(async move {
        let error = loop {
            match frames.next().await {
                None => break None,
                Some(Err(e)) => break Some(e.to_string()),
                Some(Ok(frame)) => match ipc::decode::<ToMaster>(&frame) {
                    Ok(msg) => {
                        if events.send(ChannelEvent::Message { pid, msg }).is_err() {
                            return;
                        }
                    }
                    Err(e) => break Some(e),
                },
            }
        };
        let _ = events.send(ChannelEvent::Closed { pid, error });
    });
    let (tx, mut rx) = mpsc::unbounded_channel::<ToWorker>();
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if sink.send(ipc::encode(&msg)).await.is_err() {
                break;
            }
        }
    });
    Ok(tx)
}
