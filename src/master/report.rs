//! What the master tells systemd and the operator: `READY=1` once, `STATUS=` when it
//! changed, `WATCHDOG=1` only while the pool is healthy, and the `app status` report.

use std::time::Instant;

use tracing::info;

use super::memory;
use super::pool::WorkerState;
use super::{Master, Phase};
use crate::config::AcceptStrategy;
use crate::control::{GenerationReport, StatusReport, WorkerReport};

impl Master {
    pub(super) fn report(&mut self, now: Instant) {
        if self.dispatcher.waiting() > 0 {
            let targets = self.handoff_targets();
            self.dispatcher.flush(&targets);
        }
        if matches!(self.phase, Phase::Booting) && self.pool.generation_ready(self.pool.generation)
        {
            self.phase = Phase::Serving;
            let status = self.status_line(now);
            info!(
                "all {} workers serving after {:.1} ms: READY=1",
                self.pool.slots.len(),
                now.duration_since(self.started).as_secs_f64() * 1e3
            );
            // Probes answer "ready" by the time systemd (and a test) hears READY=1.
            self.publish_readiness();
            self.notifier.ready(&status);
            if let Some(queued) = self.reload_queue.take() {
                self.begin_rollover(queued);
            }
        } else if !matches!(self.phase, Phase::Stopping { .. }) {
            let status = self.status_line(now);
            self.notifier.status(&status);
        }
        self.publish_readiness();
        if let Some(period) = self.notifier.watchdog()
            && now >= self.next_watchdog
            && self.pool_is_healthy(now)
        {
            self.notifier.watchdog_ping();
            self.next_watchdog = now + period / 2;
        }
    }

    /// At least one serving worker answered its latest heartbeat.
    pub(super) fn pool_is_healthy(&self, now: Instant) -> bool {
        let fresh = self.config.heartbeat_interval * 2;
        self.pool.workers.values().any(|w| {
            w.state == WorkerState::Ready
                && w.killed.is_none()
                && now.duration_since(w.last_pong) <= fresh
        })
    }

    pub(super) fn status_line(&mut self, now: Instant) -> String {
        let phase = match &self.phase {
            Phase::Booting => "starting: ",
            Phase::Rolling(_) => "reloading: ",
            _ => "",
        };
        let drain = self.drain_status().unwrap_or_default();
        let mut line = format!(
            "{drain}{phase}{}/{} workers serving, generation {}, {} requests, {} restarts in {}s",
            self.pool.serving(),
            self.pool.slots.len(),
            self.pool.generation,
            self.pool.requests_total(),
            self.budget.used(now),
            self.budget.window().as_secs()
        );
        // Said until the next reload succeeds: `systemctl status` shows it meanwhile.
        if let Some(r) = self.last_reload.as_ref().filter(|r| !r.ok) {
            line.push_str(&format!("; last reload failed: {}", r.message));
        }
        if !self.restart_needed.is_empty() {
            let keys: Vec<&str> = self
                .restart_needed
                .iter()
                .map(|k| k.split(' ').next().unwrap_or(k))
                .collect();
            line.push_str(&format!("; restart needed for {}", keys.join(", ")));
        }
        line
    }

    pub(super) fn status_report(&mut self) -> StatusReport {
        let now = Instant::now();
        // Fresh figures for the operator, not the last once-a-second sample.
        for w in self.pool.workers.values_mut() {
            if let Some(m) = memory::read(w.pid) {
                w.memory = m;
            }
            w.rates.sample_cpu(now, w.pid);
        }
        let mut generations: Vec<GenerationReport> = Vec::new();
        for w in self.pool.workers.values() {
            match generations
                .iter_mut()
                .find(|g| g.generation == w.generation)
            {
                Some(g) => {
                    g.workers += 1;
                    if g.version.is_none() {
                        g.version.clone_from(&w.version);
                    }
                }
                None => generations.push(GenerationReport {
                    generation: w.generation,
                    version: w.version.clone(),
                    workers: 1,
                }),
            }
        }
        generations.sort_by_key(|g| g.generation);
        let state = match &self.phase {
            Phase::Booting => "starting",
            Phase::Serving => "serving",
            Phase::Rolling(_) => "reloading",
            Phase::Stopping { .. } => "stopping",
        };
        let workers = self
            .pool
            .workers
            .values()
            .map(|w| WorkerReport {
                id: w.slot,
                pid: w.pid,
                cpu: w.cpu,
                generation: w.generation,
                state: match (w.state, &w.retire) {
                    (WorkerState::Starting, _) => "starting",
                    (WorkerState::Ready, None) => "ready",
                    (WorkerState::Ready, Some(_)) => "retiring",
                    (WorkerState::Draining { .. }, _) => "draining",
                }
                .into(),
                uptime_secs: w.uptime(now).as_secs_f64(),
                requests: w.requests,
                connections: w.connections,
                rss_bytes: w.memory.rss,
                pss_bytes: w.memory.pss,
                restarts: self.pool.slots.get(w.slot).map_or(0, |s| s.restarts),
                version: w.version.clone(),
                cpu_percent: w.rates.cpu_percent,
                // One number for the CLI and the endpoint: the metrics page's rate when there
                // is a page, else the heartbeat counts'.
                requests_per_sec: if self.metrics.is_some() {
                    self.metrics_rates(w).0
                } else {
                    w.rates.requests_per_sec
                },
                rps_last_interval: self.metrics_rates(w).0,
                p99_ms_last_interval: self.metrics_rates(w).1,
                affinity: w.affinity.into(),
                cpus_allowed: super::affinity::format_cpu_list(&w.mask),
            })
            .collect();
        StatusReport {
            master_pid: std::process::id(),
            state: state.into(),
            generation: self.pool.generation,
            target_workers: self.pool.slots.len(),
            serving_workers: self.pool.serving(),
            uptime_secs: now.duration_since(self.started).as_secs_f64(),
            // The endpoint's count (every answered request, live), else the heartbeats'.
            requests_total: self
                .metrics_requests_total()
                .unwrap_or_else(|| self.pool.requests_total()),
            restarts_in_window: self.budget.used(now),
            restart_limit: self.budget.limit(),
            restart_window_secs: self.budget.window().as_secs(),
            listeners: self
                .listeners
                .iter()
                .map(|l| l.description.clone())
                .collect(),
            last_reload: self.last_reload.clone(),
            workers,
            spawn_failures: self.spawn_failures,
            last_spawn_error: self.last_spawn_error.clone(),
            master_connections: self.conn_budget.held() as u64,
            master_connection_cap: if self.config.accept == AcceptStrategy::RoundRobin {
                self.conn_budget.cap() as u64
            } else {
                0
            },
            version: crate::version::VERSION.to_string(),
            configured_workers: self.config.workers,
            generations,
            restart_needed: self.restart_needed.clone(),
            readiness: self.readiness(),
            drain: self.drain_report(now),
            tls: self.config.tls.as_ref().map(|t| crate::control::TlsReport {
                serial: t.serial.clone(),
                days_left: t.days_left(crate::tls::now_unix()),
                not_after: t.not_after,
            }),
        }
    }
}
