//! Stopping the pool: a graceful stop (SIGTERM, SIGINT), a fast one (SIGQUIT, or a second
//! signal), and giving up when the restart budget is spent. All of them end in
//! [`Phase::Stopping`], which the loop advances each turn until no worker is left.

use std::time::Instant;

use tracing::{error, info};

use super::pool::Retire;
use super::{Master, Phase};
use crate::exit;

impl Master {
    pub(super) fn stop(&mut self, why: &str, fast: bool) {
        let now = Instant::now();
        let already = matches!(self.phase, Phase::Stopping { .. });
        if already && !fast {
            info!("{why} again: stopping now");
            return self.stop(why, true);
        }
        if !already {
            self.stop_acceptors();
            self.hand_out_accepted();
            self.abort_rollover_for_stop();
            let n = self.pool.workers.len();
            info!(
                "{why}: stopping, draining {n} worker(s) for up to {:?}",
                self.config.shutdown_timeout
            );
            self.notifier
                .stopping(&format!("stopping ({why}): draining {n} worker(s)"));
            self.phase = Phase::Stopping {
                deadline: now + self.config.shutdown_timeout,
                code: exit::OK,
                killed: false,
            };
            self.publish_readiness();
            let timeout = self.config.shutdown_timeout;
            for w in self.pool.workers.values_mut() {
                w.retire.get_or_insert(Retire::Shutdown);
                w.drain(timeout, now);
            }
        }
        if fast {
            for w in self.pool.workers.values_mut() {
                w.kill(format!("fast stop ({why})"));
            }
            if let Phase::Stopping { killed, .. } = &mut self.phase {
                *killed = true;
            }
        }
    }

    /// The restart budget is spent: stop everything and exit so that systemd decides.
    pub(super) fn give_up(&mut self, last: String) {
        if matches!(self.phase, Phase::Stopping { .. }) {
            return;
        }
        let now = Instant::now();
        let msg = format!(
            "giving up: {} worker restarts within {}s exceed restart_limit {} (last: {last})",
            self.budget.used(now),
            self.budget.window().as_secs(),
            self.budget.limit()
        );
        error!("{msg}");
        self.notifier.failed(&msg, libc::ECHILD as u32);
        self.stop_acceptors();
        self.hand_out_accepted();
        self.abort_rollover_for_stop();
        let timeout = self.config.drain_timeout;
        for w in self.pool.workers.values_mut() {
            w.retire.get_or_insert(Retire::Shutdown);
            w.drain(timeout, now);
        }
        self.phase = Phase::Stopping {
            deadline: now + timeout,
            code: exit::UNAVAILABLE,
            killed: false,
        };
    }

    /// While stopping: kill what overran the deadline, and say when everything is gone.
    pub(super) fn advance_stop(&mut self, now: Instant) -> Option<i32> {
        let Phase::Stopping {
            deadline,
            code,
            killed,
        } = &mut self.phase
        else {
            return None;
        };
        if self.pool.workers.is_empty() {
            info!("all workers gone; master exiting with code {code}");
            return Some(*code);
        }
        if now > *deadline && !*killed {
            *killed = true;
            for w in self.pool.workers.values_mut() {
                about!(
                    warn,
                    w,
                    "still busy at the shutdown deadline: killing it, cutting {} connection(s)",
                    w.connections
                );
                w.kill("shutdown timeout".into());
            }
        }
        None
    }
}
