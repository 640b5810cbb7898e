//! What a worker counts about itself: requests, open connections (published on the load
//! board), pending body bytes, and why it is leaving.
//!
//! A worker is one thread, but a connection's guard travels inside the I/O object that hyper
//! hands to an upgraded connection's task, and hyper requires that object to be `Send`; so
//! the connection count and the body budget are atomics (uncontended, relaxed) rather than
//! cells.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::ipc::ToMaster;
use crate::loadboard::LoadBoard;

/// The connection count, shared with every open connection's [`ConnGuard`].
pub struct Connections {
    open: AtomicU64,
    board: Option<(LoadBoard, usize)>,
}

impl Connections {
    fn set(&self, n: u64) {
        self.open.store(n, Ordering::Relaxed);
        if let Some((b, i)) = &self.board {
            b.publish(*i, n);
        }
    }

    pub fn get(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }
}

/// Counts one connection open for as long as it lives, wherever it ends up (in hyper, or in
/// the task of an upgraded connection such as a WebSocket).
pub struct ConnGuard(Arc<Connections>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// Body bytes read for requests still in flight, against `http.max_pending_body_bytes`.
pub struct BodyBudget {
    used: AtomicU64,
    limit: u64,
}

impl BodyBudget {
    /// The worker's budget, for the life of the process: every request body refers to it,
    /// and a plain reference costs none of the two atomic reference-count updates per
    /// request that an `Arc` would.
    pub fn new(limit: u64) -> &'static BodyBudget {
        Box::leak(Box::new(BodyBudget {
            used: AtomicU64::new(0),
            limit,
        }))
    }

    /// Takes `n` bytes; false (and nothing taken) when that would pass the limit.
    pub fn take(&self, n: u64) -> bool {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            if cur.saturating_add(n) > self.limit {
                return false;
            }
            match self.used.compare_exchange_weak(
                cur,
                cur + n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    pub fn give_back(&self, n: u64) {
        if n > 0 {
            self.used.fetch_sub(n, Ordering::Relaxed);
        }
    }
}

pub struct Stats {
    requests: Cell<u64>,
    /// Requests after which the worker stops accepting (0 = none).
    request_limit: u64,
    connections: Arc<Connections>,
    /// Round-robin: hand-offs may still be queued for this worker until the hand-off loop
    /// has made its last sweep.
    pub handoff_pending: Cell<bool>,
    /// Why the worker decided to leave, and whether that was planned, once it has.
    pub leaving: RefCell<Option<(String, bool)>>,
    pub leave: Notify,
    /// Set when the drain starts: read per request (`Connection: close`), where the drain's
    /// own channel would take a lock.
    draining: Cell<bool>,
    /// True from the moment the worker decides to leave or starts draining: accept loops
    /// waiting in `accept` stop at once (a flag read before waiting would let one more
    /// connection in). One channel for both, so an accept waits on one waiter list, not two.
    stop_accepting: tokio::sync::watch::Sender<bool>,
}

impl Stats {
    pub fn new(board: Option<(LoadBoard, usize)>, request_limit: u64) -> Stats {
        let connections = Arc::new(Connections {
            open: AtomicU64::new(0),
            board,
        });
        connections.set(0);
        Stats {
            requests: Cell::new(0),
            request_limit,
            connections,
            handoff_pending: Cell::new(false),
            leaving: RefCell::new(None),
            leave: Notify::new(),
            draining: Cell::new(false),
            stop_accepting: tokio::sync::watch::Sender::new(false),
        }
    }

    pub fn connections(&self) -> u64 {
        self.connections.get()
    }

    /// Counts a connection open until the guard drops.
    pub fn connection_opened(&self) -> ConnGuard {
        self.connections.set(self.connections.get() + 1);
        ConnGuard(self.connections.clone())
    }

    /// Counts a request; at the request limit the worker asks to be replaced (its accept
    /// loops stop at once: see [`Stats::accepting`]).
    pub fn request_started(&self) {
        let n = self.requests.get() + 1;
        self.requests.set(n);
        if self.request_limit > 0 && n == self.request_limit {
            self.leave(format!("served {n} requests (max_requests)"), true);
        }
    }

    /// False once the worker is leaving: a worker at its request limit takes no new
    /// connections, so the limit holds exactly (as gunicorn's worker does).
    pub fn accepting(&self) -> bool {
        self.leaving.borrow().is_none()
    }

    pub fn pong(&self, seq: u64) -> ToMaster {
        ToMaster::Pong {
            seq,
            requests: self.requests.get(),
            connections: self.connections(),
        }
    }

    /// True when this worker holds clearly more connections than the least busy peer, so
    /// it should let that peer win the next accept (see [`crate::loadboard`]).
    pub fn should_yield_accept(&self) -> bool {
        let Some((b, i)) = &self.connections.board else {
            return false;
        };
        let mine = self.connections.get();
        b.least_other(*i)
            .is_some_and(|least| mine > least + 2 + least / 8)
    }

    /// The pool's readiness as the master last published it; `Starting` (not ready) when
    /// this worker could not map the board, so a probe never claims more than it knows.
    pub fn readiness(&self) -> crate::loadboard::Readiness {
        self.connections
            .board
            .as_ref()
            .map(|(b, _)| b.readiness())
            .unwrap_or_default()
    }

    pub fn leave(&self, reason: String, planned: bool) {
        let mut l = self.leaving.borrow_mut();
        if l.is_none() {
            *l = Some((reason, planned));
            self.leave.notify_one();
            self.stop_accepting.send_replace(true);
        }
    }

    /// The drain started: accept loops stop (see [`Stats::stop_accepting_watch`]).
    pub fn draining(&self) {
        self.draining.set(true);
        self.stop_accepting.send_replace(true);
    }

    /// Whether the drain has started ([`Stats::draining`]).
    pub fn is_draining(&self) -> bool {
        self.draining.get()
    }

    /// True once the worker has decided to leave or started draining; see
    /// [`Stats::accepting`].
    pub fn stop_accepting_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stop_accepting.subscribe()
    }
}
