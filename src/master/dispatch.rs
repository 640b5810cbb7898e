//! The master's side of the `round-robin` accept strategy: which worker gets the next
//! connection, and what happens to connections a worker never took.
//!
//! Every connection stays held here (the master's own descriptor) until the worker it went
//! to acknowledges it; a worker that dies first gives its unacknowledged connections back,
//! and they go to the next worker. A connection that no worker can take right now (all
//! queues full, or none ready) waits in a backlog and is offered again each turn.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::handoff;

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

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    #[test]
    fn round_robin_and_give_back_on_death() {
        let (m1, w1) = pair();
        let (m2, w2) = pair();
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
