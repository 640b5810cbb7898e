//! The master's part in the pool's metrics ([`crate::metrics`]): it names each worker's
//! area when it starts, moves an exited worker's counters to its slot's retired area when it
//! reaps it, counts restarts by cause and reloads, and once per heartbeat interval writes
//! what only it knows (heartbeat round trip, PSS, CPU time) and what `app status` shows
//! (requests per second and p99 per worker over that interval), so the CLI and the endpoint
//! read the same numbers. The master never serves the endpoint.

use std::time::{Duration, Instant};

use super::pool::{Retire, Worker};
use super::{Master, Phase};
use crate::metrics::{self, Cause};

/// What the master remembers of a worker's histogram at the start of an interval.
#[derive(Default)]
pub struct Interval {
    pub prev: std::collections::HashMap<i32, (Instant, Vec<u64>, u64)>,
    pub next: Option<Instant>,
}

impl Master {
    pub(super) fn metrics_spawned(&self, w: &Worker) {
        if let Some(p) = &self.metrics {
            p.attach(w.board_index, w.slot, w.pid, w.generation);
        }
    }

    /// Called for every reaped worker, before its board entry is given out again.
    pub(super) fn metrics_reaped(&mut self, w: &Worker) {
        self.interval.prev.remove(&w.pid);
        let Some(p) = &self.metrics else { return };
        // Its CPU time as last sampled (at most one interval old): the process is gone.
        p.fold(w.board_index);
        if let Some(cause) = cause(w, matches!(self.phase, Phase::Stopping { .. })) {
            p.count_restart(cause);
        }
    }
}

/// A heartbeat answer came back after `rtt`.
pub(super) fn pong(p: &metrics::Page, board_index: usize, rtt: Duration) {
    p.live(board_index)
        .set(metrics::A_RTT_NS, rtt.as_nanos() as u64);
}

impl Master {
    pub(super) fn metrics_reload(&self, ok: bool, took: Duration) {
        if let Some(p) = &self.metrics {
            p.count_reload(ok, took);
        }
    }

    /// Every turn: generation and budget; every heartbeat interval: per-worker figures.
    pub(super) fn metrics_turn(&mut self, now: Instant) {
        let Some(p) = &self.metrics else { return };
        p.set_generation(self.pool.generation);
        p.set_tls_not_after(
            self.config
                .tls
                .as_ref()
                .map_or(0, |t| t.not_after.max(0) as u64),
        );
        p.set_budget(
            self.budget.used(now),
            self.budget.limit(),
            self.pool.slots.len(),
        );
        if self.interval.next.is_some_and(|t| now < t) {
            return;
        }
        self.interval.next = Some(now + self.config.heartbeat_interval);
        for w in self.pool.workers.values() {
            let a = p.live(w.board_index);
            // Read by the memory sweep (about once a second), not read again here.
            if let Some(cpu) = w.rates.cpu_ns() {
                a.set(metrics::A_CPU_NS, cpu);
            }
            a.set(metrics::A_PSS, w.memory.pss.unwrap_or(w.memory.rss));
            let (buckets, count) = a.durations();
            let buckets = buckets.to_vec();
            if let Some((then, before, before_count)) = self.interval.prev.get(&w.pid) {
                let dt = now.duration_since(*then).as_secs_f64().max(1e-3);
                let delta: Vec<u64> = buckets
                    .iter()
                    .zip(before)
                    .map(|(a, b)| a.saturating_sub(*b))
                    .collect();
                a.set_f64(
                    metrics::A_RPS,
                    count.saturating_sub(*before_count) as f64 / dt,
                );
                a.set_f64(
                    metrics::A_P99,
                    metrics::quantile(0.99, &delta).unwrap_or(0.0),
                );
            }
            self.interval.prev.insert(w.pid, (now, buckets, count));
        }
    }

    /// (requests/s, p99 in ms) over the last interval, as the endpoint shows them.
    pub(super) fn metrics_rates(&self, w: &Worker) -> (f64, f64) {
        match &self.metrics {
            Some(p) => {
                let a = p.live(w.board_index);
                (a.get_f64(metrics::A_RPS), a.get_f64(metrics::A_P99) * 1e3)
            }
            None => (0.0, 0.0),
        }
    }

    /// Requests answered by the pool since the master started, as the endpoint counts them.
    pub(super) fn metrics_requests_total(&self) -> Option<u64> {
        let p = self.metrics.as_ref()?;
        Some(p.requests_total())
    }
}

/// Why a reaped worker is replaced, if it is (not at shutdown, nor a planned scale-down's
/// last worker).
fn cause(w: &Worker, stopping: bool) -> Option<Cause> {
    match &w.retire {
        Some(Retire::Recycle(why)) if why.contains("memory") => Some(Cause::Memory),
        Some(Retire::Recycle(_)) => Some(Cause::Requests),
        Some(Retire::Leaving(_)) => Some(Cause::Panic),
        Some(Retire::Superseded | Retire::RolledBack) => Some(Cause::Reload),
        Some(Retire::ScaledDown) => Some(Cause::Scale),
        Some(Retire::Shutdown) => None,
        None if stopping => None,
        None => match &w.killed {
            Some(why) if why.contains("hung") || why.contains("not ready") => Some(Cause::Hang),
            _ => Some(Cause::Crash),
        },
    }
}
