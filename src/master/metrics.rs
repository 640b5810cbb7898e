//! The master's part in the pool's metrics ([`crate::metrics`]): it names each worker's
//! area when it starts, moves an exited worker's counters to its slot's retired area when it
//! reaps it, counts restarts by cause and reloads, and once per heartbeat interval writes
//! what only it knows (heartbeat round trip, PSS, CPU time) and what `app status` shows
//! (requests per second and p99 per worker over that interval), so the CLI and the endpoint
//! read the same numbers. The master never serves the endpoint.

use std::time::{Duration, Instant};

use super::Master;
use super::core::Count;
use super::process::Process;
use crate::metrics;

/// What the master remembers of a worker's histogram at the start of an interval.
#[derive(Default)]
pub struct Interval {
    pub prev: std::collections::HashMap<i32, (Instant, Vec<u64>, u64)>,
    pub next: Option<Instant>,
}

impl Master {
    pub(super) fn metrics_spawned(&self, w: &Process) {
        if let Some(p) = &self.metrics {
            p.attach(w.board_index, w.slot, w.pid, w.generation);
        }
    }

    /// Called for every reaped worker, before its board entry is given out again.
    pub(super) fn metrics_reaped(&mut self, w: &Process) {
        self.interval.prev.remove(&w.pid);
        let Some(p) = &self.metrics else { return };
        // Its CPU time as last sampled (at most one interval old): the process is gone.
        p.fold(w.board_index);
    }

    /// [`crate::master::core::Action::Count`]: a restart by cause, or a reload.
    pub(super) fn metrics_count(&self, count: Count) {
        let Some(p) = &self.metrics else { return };
        match count {
            Count::Restart(cause) => p.count_restart(cause),
            Count::Reload { ok, took } => p.count_reload(ok, took),
        }
    }
}

/// A heartbeat answer came back after `rtt`.
pub(super) fn pong(p: &metrics::Page, board_index: usize, rtt: Duration) {
    p.live(board_index)
        .set(metrics::A_RTT_NS, rtt.as_nanos() as u64);
}

impl Master {
    /// Every turn: generation and budget; every heartbeat interval: per-worker figures.
    pub(super) fn metrics_turn(&mut self, now: Instant) {
        let Some(p) = &self.metrics else { return };
        p.set_generation(self.core.pool().generation);
        p.set_tls_not_after(
            self.core
                .config()
                .tls
                .as_ref()
                .map_or(0, |t| t.not_after.max(0) as u64),
        );
        p.set_budget(
            self.core.budget_used(now),
            self.core.budget().limit(),
            self.core.pool().slots.len(),
        );
        if self.interval.next.is_some_and(|t| now < t) {
            return;
        }
        self.interval.next = Some(now + self.core.config().heartbeat_interval);
        for w in self.processes.values() {
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
    pub(super) fn metrics_rates(&self, w: &Process) -> (f64, f64) {
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
