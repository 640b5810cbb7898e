//! The master's side of the `round-robin` accept strategy: its accept tasks, which worker
//! gets the next connection, and what happens to connections a worker never took.
//!
//! Every connection stays held here (the master's own descriptor) until the worker it went
//! to acknowledges it; a worker that dies first gives its unacknowledged connections back,
//! and they go to the next worker. A connection that no worker can take right now (all
//! queues full, or none ready) waits in a backlog and is offered again each turn.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use super::pool::WorkerState;
use super::{ChannelEvent, Master};
use crate::handoff;
use crate::listen::{AsyncListener, Stream};

#[derive(Default)]
pub struct Dispatcher {
    backlog: VecDeque<OwnedFd>,
    next_id: u64,
    cursor: usize,
    held: HashMap<i32, BTreeMap<u64, OwnedFd>>,
    /// Connections given back by a worker that died before taking them.
    pub redispatched: u64,
}

impl Dispatcher {
    /// Queues a freshly accepted connection and hands out what it can.
    pub fn offer(&mut self, conn: OwnedFd, targets: &[(i32, RawFd)]) {
        self.backlog.push_back(conn);
        self.flush(targets);
    }

    /// Hands queued connections to `targets` (pid, hand-off channel) in turn.
    pub fn flush(&mut self, targets: &[(i32, RawFd)]) {
        if targets.is_empty() {
            return;
        }
        'conns: while let Some(conn) = self.backlog.pop_front() {
            for k in 0..targets.len() {
                let i = (self.cursor + k) % targets.len();
                let (pid, channel) = targets[i];
                let id = self.next_id;
                // Full (EAGAIN) or gone (EPIPE): either way, the next worker.
                if handoff::send(channel, id, conn.as_raw_fd()).is_ok() {
                    self.next_id += 1;
                    self.cursor = (i + 1) % targets.len();
                    self.held.entry(pid).or_default().insert(id, conn);
                    continue 'conns;
                }
            }
            self.backlog.push_front(conn);
            return;
        }
    }

    /// The worker holds the connection now: the master's copy can go.
    pub fn acked(&mut self, pid: i32, id: u64) {
        if let Some(m) = self.held.get_mut(&pid) {
            m.remove(&id);
        }
    }

    /// The worker is gone: what it never acknowledged goes first in line again.
    /// Returns how many connections were given back.
    pub fn worker_gone(&mut self, pid: i32) -> usize {
        let Some(m) = self.held.remove(&pid) else {
            return 0;
        };
        let n = m.len();
        for (_, conn) in m.into_iter().rev() {
            self.backlog.push_front(conn);
        }
        self.redispatched += n as u64;
        n
    }

    pub fn waiting(&self) -> usize {
        self.backlog.len()
    }
}

/// The master's round-robin duties: accepting, and watching acknowledgements.
impl Master {
    /// One task per listening socket accepting for the workers (round-robin strategy).
    pub(super) fn start_acceptors(&mut self) {
        for l in &self.listeners {
            let fd = match l.fd.try_clone() {
                Ok(fd) => fd,
                Err(e) => {
                    error!("cannot accept on {}: {e}", l.description);
                    continue;
                }
            };
            let events = self.channel_tx.clone();
            let description = l.description.clone();
            self.acceptors.push(tokio::spawn(async move {
                let listener = match AsyncListener::from_fd(fd) {
                    Ok(a) => a,
                    Err(e) => return error!("cannot accept on {description}: {e}"),
                };
                loop {
                    match listener.accept().await.and_then(Stream::into_fd) {
                        Ok(conn) => {
                            if events.send(ChannelEvent::Accepted(conn)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            // EMFILE and friends: back off rather than spin.
                            warn!("master accept on {description} failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }));
        }
        info!("accept strategy round-robin: the master hands connections to workers in turn");
    }

    pub(super) fn stop_acceptors(&mut self) {
        for a in self.acceptors.drain(..) {
            a.abort();
        }
    }

    /// Before workers are told to drain: connections already accepted (still queued as
    /// events) go to workers while they still take them, rather than die with the master.
    pub(super) fn hand_out_accepted(&mut self) {
        while let Ok(ev) = self.channel_rx.try_recv() {
            self.on_channel(ev);
        }
    }

    /// Reads a worker's hand-off acknowledgements into the loop.
    pub(super) fn watch_handoff(&self, pid: i32, fd: Arc<OwnedFd>) -> std::io::Result<()> {
        nix::fcntl::fcntl(
            &*fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        // SAFETY: the Arc inside the AsyncFd keeps this descriptor open for its lifetime.
        let afd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        let events = self.channel_tx.clone();
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = afd.readable().await else {
                    break;
                };
                match crate::handoff::read_ack(afd.get_ref()) {
                    Ok(Some(id)) => {
                        if events.send(ChannelEvent::Acked { pid, id }).is_err() {
                            return;
                        }
                    }
                    Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                    Ok(None) | Err(_) => break,
                }
            }
            let _ = events.send(ChannelEvent::HandoffClosed { pid });
        });
        Ok(())
    }

    /// Workers that may receive connections now, as (pid, hand-off channel).
    pub(super) fn handoff_targets(&self) -> Vec<(i32, std::os::fd::RawFd)> {
        self.pool
            .workers
            .values()
            .filter(|w| {
                w.generation == self.pool.generation
                    && w.state == WorkerState::Ready
                    && w.holds_slot()
            })
            .map(|w| (w.pid, w.handoff.as_raw_fd()))
            .collect()
    }

    /// Connections a gone worker never took go to the others.
    pub(super) fn give_back(&mut self, pid: i32) {
        let n = self.dispatcher.worker_gone(pid);
        if n > 0 {
            info!(
                pid,
                "{n} connection(s) the worker never took are handed to another worker"
            );
            let targets = self.handoff_targets();
            self.dispatcher.flush(&targets);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_and_give_back_on_death() {
        let (m1, w1) = handoff::channel_pair().unwrap();
        let (m2, w2) = handoff::channel_pair().unwrap();
        let targets = [(1, m1.as_raw_fd()), (2, m2.as_raw_fd())];
        let mut d = Dispatcher::default();
        for _ in 0..4 {
            d.offer(std::fs::File::open("/dev/null").unwrap().into(), &targets);
        }
        assert_eq!(d.held[&1].len(), 2);
        assert_eq!(d.held[&2].len(), 2);
        // Worker 1 takes one, then dies: its other connection goes to worker 2.
        d.acked(1, 0);
        drop(w1);
        assert_eq!(d.worker_gone(1), 1);
        d.flush(&targets[1..]);
        assert_eq!(d.held[&2].len(), 3);
        assert_eq!(d.waiting(), 0);
        drop(w2);
    }
}
