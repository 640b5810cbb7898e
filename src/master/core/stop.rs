//! Stopping the pool, and the drain protocol a load balancer understands.
//!
//! A graceful stop (SIGTERM, SIGINT), a fast one (SIGQUIT, or a second signal), and giving
//! up when the restart budget is spent all end in [`Phase::Stopping`], which each turn
//! advances until no worker is left.
//!
//! A graceful stop with a `drain_delay` first marks the pool draining and keeps serving
//! everything for that long: the readiness endpoint answers 503 and the agent says `drain`,
//! so the load balancer's next checks take the host out while no request is refused; only
//! then do the workers stop accepting and finish what they hold. `app drain` marks the pool
//! draining until `app undrain`; a manual drain that has already lasted `drain_delay` makes
//! a later stop immediate.

use std::time::Instant;

use tracing::{error, info};

use super::worker::Retire;
use super::{Action, Drain, Notify, Phase, Supervisor};
use crate::control::{DrainReport, Reply};
use crate::exit;
use crate::loadboard::Readiness;

impl Supervisor {
    /// SIGTERM / SIGINT (graceful) or SIGQUIT (fast): with a `drain_delay`, a graceful stop
    /// first drains for that long; a second signal during the delay stops now.
    pub(super) fn request_stop(&mut self, why: &'static str, fast: bool, now: Instant) {
        let delay = self.config.drain_delay;
        let serving = matches!(self.phase, Phase::Serving | Phase::Rolling(_));
        if fast || delay.is_zero() || !serving {
            return self.stop(why, fast, now);
        }
        if self.stop_pending() {
            info!("{why} again during the drain delay: stopping now");
            return self.stop(why, false, now);
        }
        let d = self.drain.get_or_insert(Drain {
            since: now,
            manual: false,
            stop: None,
        });
        let at = (d.since + delay).max(now);
        d.stop = Some((at, why));
        let left = at.saturating_duration_since(now);
        // Probes answer "draining" before anyone is told that the stop began.
        self.publish_readiness();
        info!(
            "{why}: draining for {:.1}s before stopping (the readiness endpoint answers 503, every request is still served)",
            left.as_secs_f64()
        );
        self.last_status = format!(
            "stopping ({why}): draining for {:.1}s, still serving",
            left.as_secs_f64()
        );
        self.out
            .push(Action::Notify(Notify::Stopping(self.last_status.clone())));
    }

    /// Stops now: every worker drains (`fast`: is killed).
    pub(super) fn stop(&mut self, why: &str, fast: bool, now: Instant) {
        let already = self.is_stopping();
        if already && !fast {
            info!("{why} again: stopping now");
            return self.stop(why, true, now);
        }
        if !already {
            self.out.push(Action::StopAccepting);
            self.abort_rollover_for_stop();
            let n = self.pool.workers.len();
            let timeout = self.config.shutdown_timeout;
            info!("{why}: stopping, draining {n} worker(s) for up to {timeout:?}");
            self.last_status = format!("stopping ({why}): draining {n} worker(s)");
            self.out
                .push(Action::Notify(Notify::Stopping(self.last_status.clone())));
            self.phase = Phase::Stopping {
                deadline: now + timeout,
                code: exit::OK,
                killed: false,
            };
            self.publish_readiness();
            for w in self.pool.workers.values_mut() {
                w.drain(Retire::Shutdown, timeout, now, &mut self.out);
            }
        }
        if fast {
            for w in self.pool.workers.values_mut() {
                if w.kill(format!("fast stop ({why})")) {
                    self.out.push(Action::Kill(w.pid));
                }
            }
            if let Phase::Stopping { killed, .. } = &mut self.phase {
                *killed = true;
            }
        }
    }

    /// The restart budget is spent: stop everything and exit so that systemd decides.
    pub(super) fn give_up(&mut self, last: String, now: Instant) {
        if self.is_stopping() {
            return;
        }
        let msg = format!(
            "giving up: {} worker restarts within {}s exceed restart_limit {} (last: {last})",
            self.budget.used(now),
            self.budget.window().as_secs(),
            self.budget.limit()
        );
        error!("{msg}");
        self.last_status = msg.clone();
        self.out.push(Action::Notify(Notify::Failed(msg)));
        self.out.push(Action::StopAccepting);
        self.abort_rollover_for_stop();
        let timeout = self.config.drain_timeout;
        for w in self.pool.workers.values_mut() {
            w.drain(Retire::Shutdown, timeout, now, &mut self.out);
        }
        self.phase = Phase::Stopping {
            deadline: now + timeout,
            code: exit::UNAVAILABLE,
            killed: false,
        };
    }

    /// The end of a stop's drain delay; while stopping, kill what overran the deadline, and
    /// exit once everything is gone (true then).
    pub(super) fn advance_stop(&mut self, now: Instant) -> bool {
        if let Some(d) = &mut self.drain
            && let Some((at, why)) = d.stop
            && now >= at
        {
            // Once: the stop is under way, a later turn must not take it for a second signal.
            d.stop = None;
            self.stop(why, false, now);
        }
        let Phase::Stopping {
            deadline,
            code,
            killed,
        } = &mut self.phase
        else {
            return false;
        };
        if self.pool.workers.is_empty() {
            info!("all workers gone; master exiting with code {code}");
            self.out.push(Action::Exit(*code));
            return true;
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
                if w.kill("shutdown timeout".into()) {
                    self.out.push(Action::Kill(w.pid));
                }
            }
        }
        false
    }

    /// A stop is waiting for its drain delay.
    pub(super) fn stop_pending(&self) -> bool {
        self.drain.as_ref().is_some_and(|d| d.stop.is_some())
    }

    /// `app drain`.
    pub(super) fn drain_request(&mut self, now: Instant) -> Reply {
        let message = match (&self.phase, &mut self.drain) {
            (Phase::Stopping { .. }, _) => "already stopping".to_string(),
            (_, Some(d)) => {
                d.manual = true;
                format!(
                    "already draining for {:.1}s",
                    now.duration_since(d.since).as_secs_f64()
                )
            }
            (_, None) => {
                self.drain = Some(Drain {
                    since: now,
                    manual: true,
                    stop: None,
                });
                info!("app drain: the readiness endpoint answers 503 until app undrain");
                "draining: the readiness endpoint answers 503 (every request is still served) until app undrain".to_string()
            }
        };
        self.publish_readiness();
        Reply {
            ok: true,
            message: Some(message),
            ..Default::default()
        }
    }

    /// `app undrain`: reverses a manual drain; a stop under way cannot be undone.
    pub(super) fn undrain_request(&mut self, now: Instant) -> Reply {
        if self.is_stopping() || self.stop_pending() {
            return Reply::error("the service is stopping: a stop cannot be undrained");
        }
        let message = match self.drain.take() {
            None => "not draining".to_string(),
            Some(d) => {
                info!(
                    "app undrain after {:.1}s of drain",
                    now.duration_since(d.since).as_secs_f64()
                );
                match self.readiness() {
                    Readiness::Ready => "undrained: ready".to_string(),
                    other => format!(
                        "undrained: {} (ready once every worker serves)",
                        other.as_str()
                    ),
                }
            }
        };
        self.publish_readiness();
        Reply {
            ok: true,
            message: Some(message),
            ..Default::default()
        }
    }

    /// For `app status`.
    pub fn drain_report(&self, now: Instant) -> Option<DrainReport> {
        self.drain.as_ref().map(|d| DrainReport {
            manual: d.manual,
            secs: now.duration_since(d.since).as_secs_f64(),
            stop_in_secs: d
                .stop
                .map(|(at, _)| at.saturating_duration_since(now).as_secs_f64()),
        })
    }

    /// For `STATUS=`: the drain, when there is one. No countdown: the line is sent again
    /// whenever it changes, and a countdown would change it on every turn of the loop.
    pub(super) fn drain_status(&self) -> Option<&'static str> {
        let d = self.drain.as_ref()?;
        Some(match d.stop {
            Some(_) => "draining before the stop: ",
            None => "drained (app drain): ",
        })
    }
}
