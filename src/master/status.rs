//! `app status`: the core's view of the pool, joined with what the shell reads of each
//! worker from `/proc` and the metrics page.

use std::time::Instant;

use super::Master;
use super::core::Phase;
use super::memory;
use crate::config::AcceptStrategy;
use crate::control::{GenerationReport, StatusReport, WorkerReport};

impl Master {
    pub(super) fn status_report(&mut self) -> StatusReport {
        let now = Instant::now();
        // Fresh figures for the operator, not the last once-a-second sample.
        for p in self.processes.values_mut() {
            if let Some(m) = memory::read(p.pid) {
                p.memory = m;
            }
            p.rates.sample_cpu(now, p.pid);
        }
        let restarts_in_window = self.core.budget_used(now);
        let pool = self.core.pool();
        let mut generations: Vec<GenerationReport> = Vec::new();
        for w in pool.workers.values() {
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
        let state = match self.core.phase() {
            Phase::Booting => "starting",
            Phase::Serving => "serving",
            Phase::Rolling(_) => "reloading",
            Phase::Stopping { .. } => "stopping",
        };
        let workers = pool
            .workers
            .values()
            .filter_map(|w| {
                let p = self.processes.get(&w.pid)?;
                let (rps, p99) = self.metrics_rates(p);
                Some(WorkerReport {
                    id: w.slot,
                    pid: w.pid,
                    cpu: w.cpu,
                    generation: w.generation,
                    state: w.life.name().into(),
                    uptime_secs: w.uptime(now).as_secs_f64(),
                    requests: w.requests,
                    connections: w.connections,
                    rss_bytes: p.memory.rss,
                    pss_bytes: p.memory.pss,
                    restarts: pool.slots.get(w.slot).map_or(0, |s| s.restarts),
                    version: w.version.clone(),
                    cpu_percent: p.rates.cpu_percent,
                    // One number for the CLI and the endpoint: the metrics page's rate when
                    // there is a page, else the heartbeat counts'.
                    requests_per_sec: if self.metrics.is_some() {
                        rps
                    } else {
                        p.rates.requests_per_sec
                    },
                    rps_last_interval: rps,
                    p99_ms_last_interval: p99,
                    affinity: p.affinity.as_str().into(),
                    cpus_allowed: super::affinity::format_cpu_list(&p.mask),
                })
            })
            .collect();
        let config = self.core.config();
        let (spawn_failures, last_spawn_error) = self.core.spawn_failures();
        StatusReport {
            master_pid: std::process::id(),
            state: state.into(),
            generation: pool.generation,
            target_workers: pool.slots.len(),
            serving_workers: pool.serving(),
            uptime_secs: now.duration_since(self.core.started()).as_secs_f64(),
            // The endpoint's count (every answered request, live), else the heartbeats'.
            requests_total: self
                .metrics_requests_total()
                .unwrap_or_else(|| pool.requests_total()),
            restarts_in_window,
            restart_limit: self.core.budget().limit(),
            restart_window_secs: self.core.budget().window().as_secs(),
            listeners: self
                .listeners
                .iter()
                .map(|l| l.description.clone())
                .collect(),
            last_reload: self.core.last_reload().cloned(),
            workers,
            spawn_failures,
            last_spawn_error: last_spawn_error.map(str::to_string),
            master_connections: self.conn_budget.held() as u64,
            master_connection_cap: if config.accept == AcceptStrategy::RoundRobin {
                self.conn_budget.cap() as u64
            } else {
                0
            },
            version: crate::version::VERSION.to_string(),
            configured_workers: config.workers,
            generations,
            restart_needed: self.core.restart_needed().to_vec(),
            readiness: self.core.readiness(),
            drain: self.core.drain_report(now),
            tls: config.tls.as_ref().map(|t| crate::control::TlsReport {
                serial: t.serial.clone(),
                days_left: t.days_left(crate::tls::now_unix()),
                not_after: t.not_after,
            }),
        }
    }
}
