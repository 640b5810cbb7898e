//! The master's side of the `round-robin` accept strategy: its accept tasks, which worker
//! gets the next connection, and what happens to connections a worker never took.
//!
//! All of it runs in one task of its own ([`RoundRobin`]), beside the supervision loop and
//! fed by it: the loop says which workers take connections now, which worker is new and
//! which is gone, and when to stop. Client connections never reach the supervision loop,
//! so a flood of them cannot delay a heartbeat or a reap, and the loop cannot stall the
//! hand-off.
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
//! [`update_cap`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::handoff;
use crate::listen::{AsyncListener, Listener, Stream};

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
        n
    }

    pub fn waiting(&self) -> usize {
        self.backlog.len()
    }
}

/// The round-robin task's handle: what the supervision loop tells it.
pub struct RoundRobin {
    tx: mpsc::UnboundedSender<Command>,
    /// The targets last sent, to send only changes.
    targets: Vec<i32>,
}

enum Command {
    /// The workers that take connections now, in order.
    Targets(Vec<(i32, Arc<OwnedFd>)>),
    /// A new worker: read its acknowledgements.
    Watch(i32, Arc<OwnedFd>),
    /// The worker is gone: what it never took goes to another.
    Gone(i32),
    /// Accept no more, hand out what is held, then answer.
    Stop(oneshot::Sender<()>),
}

/// What the accept tasks and acknowledgement readers tell the round-robin task.
enum Traffic {
    Accepted(HeldConn),
    Acked { pid: i32, id: u64 },
    HandoffClosed { pid: i32 },
}

impl RoundRobin {
    /// Starts accepting on every listener, holding at most `budget`'s cap of connections.
    pub fn start(listeners: &[Listener], budget: Arc<ConnBudget>) -> RoundRobin {
        let (tx, rx) = mpsc::unbounded_channel();
        let (traffic_tx, traffic_rx) = mpsc::unbounded_channel();
        let acceptors = listeners
            .iter()
            .filter_map(|l| match l.fd.try_clone() {
                Ok(fd) => Some(accept_task(
                    fd,
                    l.description.clone(),
                    budget.clone(),
                    traffic_tx.clone(),
                )),
                Err(e) => {
                    error!("cannot accept on {}: {e}", l.description);
                    None
                }
            })
            .collect();
        info!(
            "accept strategy round-robin: the master hands connections to workers in turn (holding at most {})",
            budget.cap()
        );
        tokio::spawn(run(rx, traffic_tx, traffic_rx, acceptors));
        RoundRobin {
            tx,
            targets: Vec::new(),
        }
    }

    /// The workers that take connections now; sent on only when they changed.
    pub fn set_targets(&mut self, targets: Vec<(i32, Arc<OwnedFd>)>) {
        let pids: Vec<i32> = targets.iter().map(|t| t.0).collect();
        if pids != self.targets {
            self.targets = pids;
            let _ = self.tx.send(Command::Targets(targets));
        }
    }

    pub fn watch(&self, pid: i32, handoff: Arc<OwnedFd>) {
        let _ = self.tx.send(Command::Watch(pid, handoff));
    }

    pub fn gone(&self, pid: i32) {
        let _ = self.tx.send(Command::Gone(pid));
    }

    /// Before workers are told to drain: stop accepting, and hand connections already
    /// accepted to workers while they still take them, rather than let them die with the
    /// master. Returns once that is done.
    pub async fn stop(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Command::Stop(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

/// The round-robin task: offers each accepted connection to the next worker, keeps what no
/// worker can take yet (offered again every 50 ms and whenever the targets change), and
/// gives a gone worker's unacknowledged connections to the others.
async fn run(
    mut commands: mpsc::UnboundedReceiver<Command>,
    traffic_tx: mpsc::UnboundedSender<Traffic>,
    mut traffic: mpsc::UnboundedReceiver<Traffic>,
    acceptors: Vec<tokio::task::JoinHandle<()>>,
) {
    let mut dispatcher = Dispatcher::default();
    let mut targets: Vec<(i32, Arc<OwnedFd>)> = Vec::new();
    let raw = |t: &[(i32, Arc<OwnedFd>)]| -> Vec<(i32, RawFd)> {
        t.iter().map(|(pid, fd)| (*pid, fd.as_raw_fd())).collect()
    };
    let mut retry = tokio::time::interval(Duration::from_millis(50));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None => break,
                Some(Command::Targets(t)) => {
                    targets = t;
                    dispatcher.flush(&raw(&targets));
                }
                Some(Command::Watch(pid, fd)) => {
                    if let Err(e) = watch_acks(pid, fd, traffic_tx.clone()) {
                        warn!(pid, "cannot read the worker's hand-off acknowledgements: {e}");
                    }
                }
                Some(Command::Gone(pid)) => give_back(&mut dispatcher, pid, &raw(&targets)),
                Some(Command::Stop(done)) => {
                    for a in &acceptors {
                        a.abort();
                    }
                    while let Ok(t) = traffic.try_recv() {
                        on_traffic(&mut dispatcher, t, &raw(&targets));
                    }
                    let _ = done.send(());
                }
            },
            Some(t) = traffic.recv() => on_traffic(&mut dispatcher, t, &raw(&targets)),
            _ = retry.tick(), if dispatcher.waiting() > 0 => dispatcher.flush(&raw(&targets)),
        }
    }
    for a in &acceptors {
        a.abort();
    }
}

fn on_traffic(dispatcher: &mut Dispatcher, t: Traffic, targets: &[(i32, RawFd)]) {
    match t {
        Traffic::Accepted(conn) => dispatcher.offer(conn, targets),
        Traffic::Acked { pid, id } => dispatcher.acked(pid, id),
        Traffic::HandoffClosed { pid } => give_back(dispatcher, pid, targets),
    }
}

/// Connections a gone worker never took go to the others.
fn give_back(dispatcher: &mut Dispatcher, pid: i32, targets: &[(i32, RawFd)]) {
    let n = dispatcher.worker_gone(pid);
    if n > 0 {
        info!(
            pid,
            "{n} connection(s) the worker never took are handed to another worker"
        );
        let others: Vec<(i32, RawFd)> = targets.iter().copied().filter(|t| t.0 != pid).collect();
        dispatcher.flush(&others);
    }
}

/// One task per listening socket accepting for the workers.
///
/// It pauses while the master holds as many connections as it may ([`ConnBudget`]); the
/// kernel's listen backlog holds the rest meanwhile. Accept errors (EMFILE and friends) back
/// off, doubling up to a second, and are logged at most every 10 s.
fn accept_task(
    fd: OwnedFd,
    description: String,
    budget: Arc<ConnBudget>,
    events: mpsc::UnboundedSender<Traffic>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
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
                    if events.send(Traffic::Accepted(conn)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off rather than spin, and say so once in a
                    // while, not at every attempt.
                    error_delay =
                        (error_delay * 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
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
    })
}

/// Reads a worker's hand-off acknowledgements into the round-robin task.
fn watch_acks(
    pid: i32,
    fd: Arc<OwnedFd>,
    events: mpsc::UnboundedSender<Traffic>,
) -> std::io::Result<()> {
    nix::fcntl::fcntl(
        &*fd,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    // SAFETY: the Arc inside the AsyncFd keeps this descriptor open for its lifetime.
    let afd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = afd.readable().await else {
                break;
            };
            match crate::handoff::read_ack(afd.get_ref()) {
                Ok(Some(id)) => {
                    if events.send(Traffic::Acked { pid, id }).is_err() {
                        return;
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Ok(None) | Err(_) => break,
            }
        }
        let _ = events.send(Traffic::HandoffClosed { pid });
    });
    Ok(())
}

/// How many connections the master may hold: [`MAX_HELD`], or less when the descriptor
/// limit leaves less after what the master has open besides connections, [`FD_RESERVE`],
/// and [`FD_PER_WORKER`] for each worker of two full generations.
pub fn update_cap(budget: &ConnBudget, slots: usize) {
    let limit = fd_limit();
    let held = budget.held();
    let others = open_fds().map_or(0, |n| n.saturating_sub(held));
    let reserve = FD_RESERVE + FD_PER_WORKER * 2 * slots;
    let cap = limit
        .saturating_sub(others)
        .saturating_sub(reserve)
        .clamp(1, MAX_HELD);
    if cap != budget.cap() {
        if cap < 64.min(MAX_HELD) {
            warn!(
                "descriptor limit {limit} leaves room for only {cap} connection(s) held by the master; raise LimitNOFILE="
            );
        }
        budget.set_cap(cap);
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
