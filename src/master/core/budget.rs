//! Restart throttling: a pool-wide [`RestartBudget`], a per-slot [`Backoff`], and the
//! retry delay of starts the host had no resources for.
//!
//! The budget stops a restart storm: more than `limit` unplanned restarts within `window`
//! and the master gives up, so that systemd's `Restart=` and start limits decide what comes
//! next instead of a loop that crashes forever. The backoff spaces out the restarts of one
//! slot that keeps failing young (exponential from 100 ms, capped at 10 s, with jitter so
//! slots do not restart in lockstep); a worker that stayed up `min_uptime` resets it, so a
//! healthy worker that dies once is replaced at once.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct RestartBudget {
    limit: u32,
    window: Duration,
    recent: VecDeque<Instant>,
}

impl RestartBudget {
    pub fn new(limit: u32, window: Duration) -> Self {
        RestartBudget {
            limit,
            window,
            recent: VecDeque::new(),
        }
    }

    /// Records one unplanned restart at `now`; false when that exceeds the budget.
    pub fn record(&mut self, now: Instant) -> bool {
        self.forget_before(now);
        self.recent.push_back(now);
        self.recent.len() as u32 <= self.limit
    }

    /// Restarts counted in the current window.
    pub fn used(&mut self, now: Instant) -> u32 {
        self.forget_before(now);
        self.recent.len() as u32
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn reconfigure(&mut self, limit: u32, window: Duration) {
        self.limit = limit;
        self.window = window;
    }

    fn forget_before(&mut self, now: Instant) {
        while let Some(&t) = self.recent.front() {
            if now.duration_since(t) > self.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
    }
}

pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
pub const BACKOFF_CAP: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Clone)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The delay before the next start of a slot whose worker lived `uptime`.
    pub fn after_exit(&mut self, uptime: Duration, min_uptime: Duration) -> Duration {
        if uptime >= min_uptime {
            self.failures = 0;
            return Duration::ZERO;
        }
        self.failures = self.failures.saturating_add(1);
        let exp = BACKOFF_BASE.saturating_mul(1u32 << (self.failures - 1).min(16));
        let delay = exp.min(BACKOFF_CAP);
        // Full jitter over the upper half: between delay/2 and delay.
        let half = delay / 2;
        half + half.mul_f64(fastrand::f64())
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Retry delays for starts that failed for want of a host resource.
const SPAWN_RETRY_BASE: Duration = Duration::from_millis(100);
const SPAWN_RETRY_CAP: Duration = Duration::from_secs(5);

/// The delay before retrying a start that failed `failures` times in a row for want of a
/// host resource: exponential from 100 ms, capped at 5 s, with jitter over the upper half.
pub fn spawn_retry_delay(failures: u32) -> Duration {
    let exp = SPAWN_RETRY_BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let delay = exp.min(SPAWN_RETRY_CAP);
    let half = delay / 2;
    half + half.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_limit_then_refuses_and_forgets() {
        let mut b = RestartBudget::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(b.record(t0));
        assert!(b.record(t0));
        assert!(b.record(t0));
        assert!(!b.record(t0 + Duration::from_secs(1)));
        assert_eq!(b.used(t0 + Duration::from_secs(11)), 1);
        assert!(b.record(t0 + Duration::from_secs(11)));
    }

    #[test]
    fn backoff_grows_caps_and_resets() {
        let min_up = Duration::from_secs(1);
        let mut b = Backoff::default();
        let young = Duration::from_millis(10);
        let d1 = b.after_exit(young, min_up);
        assert!(
            d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100),
            "{d1:?}"
        );
        let d2 = b.after_exit(young, min_up);
        assert!(
            d2 >= Duration::from_millis(100) && d2 <= Duration::from_millis(200),
            "{d2:?}"
        );
        for _ in 0..20 {
            assert!(b.after_exit(young, min_up) <= BACKOFF_CAP);
        }
        assert_eq!(b.after_exit(Duration::from_secs(2), min_up), Duration::ZERO);
    }
}
