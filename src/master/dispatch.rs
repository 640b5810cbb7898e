//! The master's side of the `round-robin` accept strategy: its accept tasks, which worker
//! gets the next connection, and what happens to connections a worker never took.
//!
//! Every connection stays held here (the master's own descriptor) until the worker it went
//! to acknowledges it; a worker that dies first gives its unacknowledged connections back,
//! and they go to the next worker. A connection that no worker can take right now (all
//! queues full, or none ready) waits in a backlog and is offered again each turn.
//!
//! What the master holds is bounded: every connection it holds is a [`HeldConn`], counted
//! in a shared [`ConnBudget`], and the accept tasks stop accepting while the count is at the
//! cap, so further clients wait in the kernel's listen backlog instead of in the master's
//! descriptor table. The cap is [`MAX_HELD`] or what the descriptor limit leaves after a
//! reserve for starting workers and answering the control socket, whichever is lower (see
//! [`Master::update_conn_cap`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::core::Event;
use super::{ChannelEvent, Master};
use crate::handoff;
use crate::listen::{AsyncListener, Stream};

/// The most connections the master holds at once (accepted, not yet taken by a worker),
/// whatever the descriptor limit allows.
pub const MAX_HELD: usize = 4096;
/// Descriptors kept free for everything but held connections: starting a worker (socket
/// pairs, exec's pipe), control-socket clients, /proc and config reads.
pub const FD_RESERVE: usize = 64;
/// Descriptors kept per worker the pool may have (its channel, its hand-off pair, margin),
/// counted for two generations so that a reload can always start.
pub const FD_PER_WORKER: usize = 3;

/// How many connections the master holds, and how many it may.
#[derive(Debug)]
pub struct ConnBudget {
    held: AtomicUsize,
    cap: AtomicUsize,
    room: tokio::sync::Notify,
}

impl ConnBudget {
    pub fn new(cap: usize) -> Arc<ConnBudget> {
        Arc::new(ConnBudget {
            held: AtomicUsize::new(0),
            cap: AtomicUsize::new(cap),
            room: tokio::sync::Notify::new(),
        })
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    pub fn cap(&self) -> usize {
        self.cap.load(Ordering::Relaxed)
    }

    pub fn set_cap(&self, cap: usize) {
        if self.cap.swap(cap, Ordering::Relaxed) < cap {
            self.room.notify_waiters();
        }
    }

    fn full(&self) -> bool {
        self.held() >= self.cap()
    }
}

/// A connection the master holds; counted in its [`ConnBudget`] until dropped.
#[derive(Debug)]
pub struct HeldConn {
    fd: OwnedFd,
    budget: Arc<ConnBudget>,
}

impl HeldConn {
    pub fn new(fd: OwnedFd, budget: &Arc<ConnBudget>) -> HeldConn {
        budget.held.fetch_add(1, Ordering::Relaxed);
        HeldConn {
            fd,
            budget: budget.clone(),
        }
    }
}

impl AsRawFd for HeldConn {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for HeldConn {
    fn drop(&mut self) {
        let before = self.budget.held.fetch_sub(1, Ordering::Relaxed);
        if before == self.budget.cap() {
            self.budget.room.notify_waiters();
        }
    }
}

/// At most one log line per `every`, saying how many were held back meanwhile.
#[derive(Debug)]
pub struct RateLimit {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(every: Duration) -> RateLimit {
        RateLimit {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// Some(number suppressed since the last line) when a line may be logged now.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[derive(Default)]
pub struct Dispatcher {
    backlog: VecDeque<HeldConn>,
    next_id: u64,
    cursor: usize,
    held: HashMap<i32, BTreeMap<u64, HeldConn>>,
    /// Connections given back by a worker that died before taking them.
    pub redispatched: u64,
}

impl Dispatcher {
    /// Queues a freshly accepted connection and hands out what it can.
    pub fn offer(&mut self, conn: HeldConn, targets: &[(i32, RawFd)]) {
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
    ///
    /// Each task pauses while the master holds as many connections as it may
    /// ([`ConnBudget`]); the kernel's listen backlog holds the rest meanwhile. Accept errors
    /// (EMFILE and friends) back off, doubling up to a second, and are logged at most every
    /// 10 s.
    pub(super) fn start_acceptors(&mut self) {
        self.update_conn_cap();
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
            let budget = self.conn_budget.clone();
            self.acceptors.push(tokio::spawn(async move {
                let listener = match AsyncListener::from_fd(fd) {
                    Ok(a) => a,
                    Err(e) => return error!("cannot accept on {description}: {e}"),
                };
                let mut errors = RateLimit::new(Duration::from_secs(10));
                let mut pauses = RateLimit::new(Duration::from_secs(10));
                let mut error_delay = Duration::ZERO;
                let mut paused = false;
                loop {
                    while budget.full() {
                        if !paused {
                            paused = true;
                            if let Some(n) = pauses.allow(Instant::now()) {
                                warn!(
                                    "master holds {} connection(s) no worker has taken (cap {}): \
                                     not accepting on {description} until workers take some; \
                                     new clients wait in the kernel's listen backlog{}",
                                    budget.held(),
                                    budget.cap(),
                                    suppressed(n)
                                );
                            }
                        }
                        tokio::select! {
                            _ = budget.room.notified() => {}
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        }
                    }
                    paused = false;
                    match listener.accept().await.and_then(Stream::into_fd) {
                        Ok(conn) => {
                            error_delay = Duration::ZERO;
                            let conn = HeldConn::new(conn, &budget);
                            if events.send(ChannelEvent::Accepted(conn)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            // EMFILE and friends: back off rather than spin, and say so
                            // once in a while, not at every attempt.
                            error_delay = (error_delay * 2)
                                .clamp(Duration::from_millis(50), Duration::from_secs(1));
                            if let Some(n) = errors.allow(Instant::now()) {
                                warn!(
                                    "master accept on {description} failed: {e}; retrying in up to {} ms{}",
                                    error_delay.as_millis(),
                                    suppressed(n)
                                );
                            }
                            tokio::time::sleep(error_delay).await;
                        }
                    }
                }
            }));
        }
        info!(
            "accept strategy round-robin: the master hands connections to workers in turn (holding at most {})",
            self.conn_budget.cap()
        );
    }

    /// Sets how many connections the master may hold: [`MAX_HELD`], or less when the
    /// descriptor limit leaves less after what the master has open besides connections,
    /// [`FD_RESERVE`], and [`FD_PER_WORKER`] for each worker of two full generations.
    pub(super) fn update_conn_cap(&mut self) {
        let limit = fd_limit();
        let held = self.conn_budget.held();
        let others = open_fds().map_or(0, |n| n.saturating_sub(held));
        let reserve = FD_RESERVE + FD_PER_WORKER * 2 * self.core.pool().slots.len();
        let cap = limit
            .saturating_sub(others)
            .saturating_sub(reserve)
            .clamp(1, MAX_HELD);
        if cap != self.conn_budget.cap() {
            if cap < 64.min(MAX_HELD) {
                warn!(
                    "descriptor limit {limit} leaves room for only {cap} connection(s) held by the master; raise LimitNOFILE="
                );
            }
            self.conn_budget.set_cap(cap);
        }
    }

    pub(super) fn stop_acceptors(&mut self) {
        for a in self.acceptors.drain(..) {
            a.abort();
        }
    }

    /// Before workers are told to drain: connections already accepted (still queued as
    /// events) go to workers while they still take them, rather than die with the master.
    /// Returns the supervision events read on the way, for the core.
    pub(super) fn hand_out_accepted(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        while let Ok(ev) = self.channel_rx.try_recv() {
            events.extend(self.on_channel(ev));
        }
        events
    }

    /// Each turn: what waits for a worker goes to one if it can.
    pub(super) fn flush_handoffs(&mut self) {
        if self.dispatcher.waiting() > 0 {
            let targets = self.handoff_targets();
            self.dispatcher.flush(&targets);
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
        self.core
            .pool()
            .serving_workers()
            .filter_map(|w| self.processes.get(&w.pid))
            .map(|p| (p.pid, p.handoff.as_raw_fd()))
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

fn suppressed(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} similar message(s) suppressed)")
    }
}

/// The soft descriptor limit (what `open` checks against).
pub fn fd_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } < 0 {
        return 1024;
    }
    usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
}

/// Descriptors this process has open (None if /proc cannot be read, e.g. at the limit).
pub fn open_fds() -> Option<usize> {
    Some(
        std::fs::read_dir("/proc/self/fd")
            .ok()?
            .count()
            .saturating_sub(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_connections_are_counted_until_dropped() {
        let budget = ConnBudget::new(2);
        let a = HeldConn::new(std::fs::File::open("/dev/null").unwrap().into(), &budget);
        assert!(!budget.full());
        let b = HeldConn::new(std::fs::File::open("/dev/null").unwrap().into(), &budget);
        assert!(budget.full());
        drop(a);
        assert_eq!(budget.held(), 1);
        drop(b);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn rate_limit_counts_what_it_held_back() {
        let mut r = RateLimit::new(Duration::from_secs(10));
        let t = Instant::now();
        assert_eq!(r.allow(t), Some(0));
        assert_eq!(r.allow(t + Duration::from_secs(1)), None);
        assert_eq!(r.allow(t + Duration::from_secs(2)), None);
        assert_eq!(r.allow(t + Duration::from_secs(11)), Some(2));
    }

    #[test]
    fn round_robin_and_give_back_on_death() {
        let (m1, w1) = handoff::channel_pair().unwrap();
        let (m2, w2) = handoff::channel_pair().unwrap();
        let targets = [(1, m1.as_raw_fd()), (2, m2.as_raw_fd())];
        let mut d = Dispatcher::default();
        let budget = ConnBudget::new(10);
        for _ in 0..4 {
            let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
            d.offer(HeldConn::new(fd, &budget), &targets);
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
