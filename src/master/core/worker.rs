//! One worker as the supervisor sees it: where it is in its life, and every rule that
//! follows from that.
//!
//! A worker's life is one enum, [`Life`]: `Starting → Ready → (Retiring) → Draining`, or
//! `Killed` from any of them, and then it is reaped (it leaves the pool). Whether it holds
//! its slot, serves, answers heartbeats or counts toward the pool's health is derived from
//! `Life` here and nowhere else. So are the two timing rules: when a silent worker is hung
//! ([`Liveness`]) and when a draining one has overrun ([`drain_deadline`]). To change how a
//! hung worker is detected, this is the file.

use std::time::{Duration, Instant};

use crate::ipc::ToWorker;

use super::Action;

/// How long past its own drain timeout a draining worker is given to exit before the master
/// kills it: the worker stops at its timeout, and exiting takes a moment.
pub const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// When the master kills a worker that began draining `now` with `timeout`.
pub fn drain_deadline(now: Instant, timeout: Duration) -> Instant {
    now + timeout + DRAIN_GRACE
}

/// Why a worker is being retired on purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retire {
    /// Over a limit, or leaving on its own at its request limit: replaced, then drained.
    Recycle { why: String, cause: Recycle },
    /// It said it is leaving after a fault (a panic); it drains by itself.
    Leaving(String),
    /// Its generation was superseded by a reload.
    Superseded,
    /// Its generation failed to become ready during a reload.
    RolledBack,
    /// The pool shrank (SIGTTOU, `app scale`).
    ScaledDown,
    /// The master is stopping.
    Shutdown,
}

/// Which limit a recycled worker reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recycle {
    Memory,
    Requests,
}

/// Where a worker is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Life {
    /// Started; not ready yet.
    Starting,
    /// Serving, and holding its slot.
    Ready,
    /// Still serving, while its replacement starts: told to drain once that one is ready.
    Retiring(Retire),
    /// Told to stop accepting and finish; killed at `deadline`.
    Draining {
        why: Retire,
        deadline: Instant,
        /// The last heartbeat sent before the drain, and whether it went just before the
        /// `Drain` message (see [`Worker::silent_while_draining`]).
        last_ping: u64,
        pinged: bool,
    },
    /// SIGKILLed by the master (why), waiting to be reaped; `was` is what it was doing.
    Killed { why: String, was: Box<Life> },
}

impl Life {
    /// Why it is on its way out on purpose, if it is.
    pub fn retire(&self) -> Option<&Retire> {
        match self {
            Life::Starting | Life::Ready => None,
            Life::Retiring(why) | Life::Draining { why, .. } => Some(why),
            Life::Killed { was, .. } => was.retire(),
        }
    }

    /// The name `app status` shows: a killed worker shows what it was doing until reaped.
    pub fn name(&self) -> &'static str {
        match self {
            Life::Starting => "starting",
            Life::Ready => "ready",
            Life::Retiring(_) => "retiring",
            Life::Draining { .. } => "draining",
            Life::Killed { was, .. } => was.name(),
        }
    }
}

/// How long a worker may be silent: `misses` heartbeats unanswered, the last given half an
/// interval to answer. The one freshness rule: hung detection and the pool's health (which
/// gates `WATCHDOG=1`) both grade silence here.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    pub interval: Duration,
    pub misses: u32,
}

/// How a worker's silence is graded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// It answered within two intervals: its latest heartbeat, or the one before.
    Fresh,
    /// Late, but not yet hung.
    Late,
    /// Silent past the limit: hung.
    Hung,
}

impl Liveness {
    pub fn silence_limit(&self) -> Duration {
        self.interval * self.misses + self.interval / 2
    }

    pub fn judge(&self, silent: Duration) -> Heard {
        if silent > self.silence_limit() {
            Heard::Hung
        } else if silent <= self.interval * 2 {
            Heard::Fresh
        } else {
            Heard::Late
        }
    }
}

/// One worker process of one generation in one slot.
#[derive(Debug, Clone)]
pub struct Worker {
    pub pid: i32,
    pub slot: usize,
    pub generation: u64,
    /// Its slot's home CPU.
    pub cpu: usize,
    pub life: Life,
    pub started: Instant,
    pub ready_at: Option<Instant>,
    pub last_pong: Instant,
    pub ping_seq: u64,
    /// The `seq` of the latest heartbeat answer.
    pub pong_seq: u64,
    pub requests: u64,
    pub connections: u64,
    /// Bytes charged against `max_memory` at the latest reading.
    pub memory: u64,
    /// `max_requests` with its jitter, 0 for none.
    pub request_limit: u64,
    /// Its channel reported end of file: nothing more will come from it.
    pub channel_closed: bool,
    /// The build it runs, as it said when ready.
    pub version: Option<String>,
}

impl Worker {
    pub fn new(pid: i32, slot: usize, generation: u64, cpu: usize, now: Instant) -> Worker {
        Worker {
            pid,
            slot,
            generation,
            cpu,
            life: Life::Starting,
            started: now,
            ready_at: None,
            last_pong: now,
            ping_seq: 0,
            pong_seq: 0,
            requests: 0,
            connections: 0,
            memory: 0,
            request_limit: 0,
            channel_closed: false,
            version: None,
        }
    }

    /// Counts toward its slot being filled: alive and not on its way out.
    pub fn holds_slot(&self) -> bool {
        matches!(self.life, Life::Starting | Life::Ready)
    }

    /// Ready, holding its slot: it takes new connections and counts as serving.
    pub fn is_serving(&self) -> bool {
        self.life == Life::Ready
    }

    /// Sent heartbeats: ready, retiring or draining, and not killed.
    pub fn is_pinged(&self) -> bool {
        matches!(
            self.life,
            Life::Ready | Life::Retiring(_) | Life::Draining { .. }
        )
    }

    pub fn is_killed(&self) -> bool {
        matches!(self.life, Life::Killed { .. })
    }

    pub fn retire(&self) -> Option<&Retire> {
        self.life.retire()
    }

    pub fn uptime(&self, now: Instant) -> Duration {
        now.duration_since(self.started)
    }

    /// Counts toward the pool's health (and so toward `WATCHDOG=1`): serving, and heard
    /// from recently.
    pub fn is_healthy(&self, liveness: Liveness, now: Instant) -> bool {
        matches!(self.life, Life::Ready | Life::Retiring(_))
            && liveness.judge(now.saturating_duration_since(self.last_pong)) == Heard::Fresh
    }

    /// Marks it killed; true if it was not already (the caller sends the SIGKILL).
    pub fn kill(&mut self, why: String) -> bool {
        if self.is_killed() {
            return false;
        }
        let was = std::mem::replace(&mut self.life, Life::Starting);
        self.life = Life::Killed {
            why,
            was: Box::new(was),
        };
        true
    }

    /// The reason it was killed, if it was.
    pub fn killed(&self) -> Option<&str> {
        match &self.life {
            Life::Killed { why, .. } => Some(why),
            _ => None,
        }
    }

    /// Marks it retiring for `why` (unless it already is for another reason), still serving.
    pub fn retire_later(&mut self, why: Retire) {
        if matches!(self.life, Life::Ready | Life::Starting) {
            self.life = Life::Retiring(why);
        }
    }

    /// Tells it to stop accepting and finish within `timeout` (retired for `why`, unless it
    /// already is for another reason); killed at [`drain_deadline`] if still there.
    ///
    /// A heartbeat goes just before the drain: its answer carries the worker's request count
    /// as of the drain, and a worker that leaves it unanswered is hung (see
    /// [`Worker::silent_while_draining`]).
    pub fn drain(&mut self, why: Retire, timeout: Duration, now: Instant, out: &mut Vec<Action>) {
        let why = match &self.life {
            Life::Draining { .. } | Life::Killed { .. } => return,
            Life::Retiring(earlier) => earlier.clone(),
            Life::Starting | Life::Ready => why,
        };
        let pinged = matches!(self.life, Life::Ready | Life::Retiring(_));
        if pinged {
            self.ping_seq += 1;
            out.push(Action::Send(
                self.pid,
                ToWorker::Ping { seq: self.ping_seq },
            ));
        }
        out.push(Action::Send(self.pid, ToWorker::drain(timeout)));
        self.life = Life::Draining {
            why,
            deadline: drain_deadline(now, timeout),
            last_ping: self.ping_seq,
            pinged,
        };
    }

    /// Whether a draining worker is held to the heartbeat silence limit: when it left the
    /// heartbeat sent just before its drain unanswered, or when it has answered a heartbeat
    /// sent during the drain (so it answers them all, and silence means it hangs). A worker
    /// that answered up to its drain and then stopped answering is one that does not answer
    /// while draining; its drain deadline still bounds it.
    pub fn silent_while_draining(&self) -> bool {
        match self.life {
            Life::Draining {
                last_ping, pinged, ..
            } => (pinged && self.pong_seq < last_ping) || self.pong_seq > last_ping,
            _ => true,
        }
    }

    /// A draining worker that exited by itself once its own drain timeout ran out: it cut
    /// whatever it still held.
    pub fn drained_to_its_timeout(&self, now: Instant) -> bool {
        matches!(self.life, Life::Draining { deadline, .. } if now + DRAIN_GRACE >= deadline)
    }
}
