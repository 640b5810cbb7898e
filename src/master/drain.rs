//! The drain protocol a load balancer understands: the pool's readiness, `app drain` /
//! `app undrain`, and the `drain_delay` before a graceful stop.
//!
//! A stop (SIGTERM from `systemctl stop`, SIGINT) with a `drain_delay` first marks the pool
//! draining and keeps serving everything for that long: the readiness endpoint answers 503
//! and the agent says `drain`, so the load balancer's next checks take the host out while no
//! request is refused; only then do the workers stop accepting and finish what they hold
//! (see [`super::stop`]). A manual drain that has already lasted `drain_delay` makes a later
//! stop immediate. The master publishes the state on the load board each turn; workers read
//! it when asked (see [`crate::loadboard`]).

use std::time::Instant;

use tracing::info;

use super::{Master, Phase};
use crate::control::{DrainReport, Reply};
use crate::loadboard::Readiness;

/// A drain under way.
pub(super) struct Drain {
    pub since: Instant,
    /// `app drain` (until `app undrain`), rather than the delay before a stop.
    pub manual: bool,
    /// A stop waiting for the end of the delay: when, and which signal asked for it.
    pub stop: Option<(Instant, &'static str)>,
}

impl Master {
    /// What a load balancer is told now.
    pub(super) fn readiness(&self) -> Readiness {
        match self.phase {
            Phase::Stopping { .. } => Readiness::Stopping,
            Phase::Booting => Readiness::Starting,
            Phase::Serving | Phase::Rolling(_) if self.drain.is_some() => Readiness::Draining,
            Phase::Serving | Phase::Rolling(_) => Readiness::Ready,
        }
    }

    pub(super) fn publish_readiness(&self) {
        let r = self.readiness();
        self.board.set_readiness(r);
        if let Some(p) = &self.metrics {
            p.set_ready(r == Readiness::Ready);
        }
    }

    /// SIGTERM / SIGINT (graceful) or SIGQUIT (fast): with a `drain_delay`, a graceful stop
    /// first drains for that long; a second signal during the delay stops now.
    pub(super) fn request_stop(&mut self, why: &'static str, fast: bool) {
        let delay = self.config.drain_delay;
        let serving = matches!(self.phase, Phase::Serving | Phase::Rolling(_));
        if fast || delay.is_zero() || !serving {
            return self.stop(why, fast);
        }
        let now = Instant::now();
        if self.drain.as_ref().is_some_and(|d| d.stop.is_some()) {
            info!("{why} again during the drain delay: stopping now");
            return self.stop(why, false);
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
        self.notifier.stopping(&format!(
            "stopping ({why}): draining for {:.1}s, still serving",
            left.as_secs_f64()
        ));
    }

    /// The end of a stop's drain delay.
    pub(super) fn advance_drain(&mut self, now: Instant) {
        if let Some(d) = &mut self.drain
            && let Some((at, why)) = d.stop
            && now >= at
        {
            // Once: the stop is under way, a later turn must not take it for a second signal.
            d.stop = None;
            self.stop(why, false);
        }
    }

    /// A stop is waiting for its drain delay.
    pub(super) fn stop_pending(&self) -> bool {
        self.drain.as_ref().is_some_and(|d| d.stop.is_some())
    }

    /// `app drain`.
    pub(super) fn drain_request(&mut self) -> Reply {
        let now = Instant::now();
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
    pub(super) fn undrain_request(&mut self) -> Reply {
        if matches!(self.phase, Phase::Stopping { .. }) || self.stop_pending() {
            return Reply::error("the service is stopping: a stop cannot be undrained");
        }
        let message = match self.drain.take() {
            None => "not draining".to_string(),
            Some(d) => {
                info!(
                    "app undrain after {:.1}s of drain",
                    d.since.elapsed().as_secs_f64()
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

    pub(super) fn drain_report(&self, now: Instant) -> Option<DrainReport> {
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
