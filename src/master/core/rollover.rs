//! Graceful rollover: replacing the serving generation with a new one, without dropping a
//! request, on SIGHUP or `app reload`.
//!
//! 1. `RELOADING=1` + `MONOTONIC_USEC`; re-read and validate the configuration; open the
//!    binary now on disk. Either failing ends the reload at once, nothing touched.
//! 2. Start a full new generation beside the old one. Both accept on the same socket, so
//!    no connection waits.
//! 3. When every new worker is ready, the new generation becomes the serving one and the
//!    old one drains (`Connection: close` on its next responses, idle connections closed
//!    after a short grace, in-flight requests finish).
//! 4. When the old workers are gone (or killed at `drain_timeout`), `READY=1`. The reload
//!    still succeeds when old workers had to be killed, but its result says how many
//!    connections were cut (the count each reported in its latest heartbeat answer).
//!
//! Every key of the re-read configuration applies to the new generation, but for those
//! fixed for the life of the master: `accept`, `bind` (when the master bound the socket
//! itself; under systemd the socket unit decides) and `control_socket`. A change to one of
//! those does not fail the reload: everything else is applied, the running value is kept,
//! and the reload's result (`app reload`, the journal, `app status`, `STATUS=`) names
//! what needs a restart.
//!
//! The new generation has `workers` workers from the file when the file changed `workers`
//! (compared with the configuration the serving generation was started with); otherwise
//! it keeps the current pool size, so a runtime scale (SIGTTIN/SIGTTOU, `app scale`)
//! survives reloads that do not touch `workers`.
//!
//! A new worker that exits, or a generation not ready within `ready_timeout`, rolls back:
//! the new workers drain away, the old generation never stopped serving, and the reload
//! fails loudly — `STATUS=` says why, `app reload` exits non-zero — while still ending with
//! `READY=1` so the unit leaves "reloading". Reloads never interleave: one requested during
//! a rollover is queued, and all queued requests share a single follow-up rollover.
//!
//! Here are the decisions; the master's shell reads the file and opens the binary when told
//! ([`Action::Load`]), and starts the workers ([`Action::Spawn`]).

use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::worker::{Life, Retire, drain_deadline};
use super::{Action, Count, Notify, Phase, ReplyTo, Supervisor};
use crate::config::{AcceptStrategy, Config};
use crate::control::{ReloadReport, Reply};

#[derive(Debug)]
pub struct Rollover {
    pub generation: u64,
    /// Size of the new generation.
    workers: usize,
    /// Keys changed in the file that only a restart applies (kept at their running value).
    restart_needed: Vec<String>,
    /// The new generation's configuration, once loaded and until it is promoted.
    pub config: Option<Box<Config>>,
    waiters: Vec<ReplyTo>,
    started: Instant,
    step: Step,
    /// Set when a worker of the new generation exits, or cannot start, before it is promoted.
    pub failed: Option<String>,
    last_extend: Instant,
    /// Connections of old-generation workers killed while draining (deadline or hung).
    cut: u64,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    /// Waiting for [`super::Event::Loaded`].
    Loading,
    Starting {
        deadline: Instant,
    },
    Draining {
        deadline: Instant,
    },
}

impl Rollover {
    /// The master stalled for `gap`: the current step's deadline moves by as much.
    pub fn postpone(&mut self, gap: Duration) {
        match &mut self.step {
            Step::Starting { deadline } | Step::Draining { deadline } => *deadline += gap,
            Step::Loading => {}
        }
    }

    /// A worker of `generation` was killed with `connections` open: counted when it belonged
    /// to a generation this rollover replaces.
    pub fn count_cut(&mut self, generation: u64, connections: u64) {
        if generation < self.generation {
            self.cut += connections;
        }
    }
}

impl Supervisor {
    /// SIGHUP or `app reload`: a rollover now, or after the one under way.
    pub(super) fn request_reload(&mut self, reply: Option<ReplyTo>, now: Instant) {
        match &self.phase {
            Phase::Stopping { .. } => {
                if let Some(r) = reply {
                    self.reply(r, Reply::error("the service is shutting down"));
                }
            }
            _ if self.stop_pending() => {
                if let Some(r) = reply {
                    self.reply(
                        r,
                        Reply::error("the service is shutting down (draining before the stop)"),
                    );
                }
            }
            Phase::Serving => self.begin_rollover(reply.into_iter().collect(), now),
            Phase::Booting | Phase::Rolling(_) => {
                info!("reload requested while busy: it will follow the current one");
                self.reload_queue.get_or_insert_with(Vec::new).extend(reply);
            }
        }
    }

    /// Step 1: `RELOADING=1`, then ask for the configuration and the binary.
    pub(super) fn begin_rollover(&mut self, waiters: Vec<ReplyTo>, now: Instant) {
        self.out.push(Action::Notify(Notify::Reloading));
        self.last_generation += 1;
        let generation = self.last_generation;
        info!("reload: starting generation {generation}");
        self.phase = Phase::Rolling(Box::new(Rollover {
            generation,
            workers: 0,
            restart_needed: Vec::new(),
            config: None,
            waiters,
            started: now,
            step: Step::Loading,
            failed: None,
            last_extend: now,
            cut: 0,
        }));
        self.out.push(Action::Load { generation });
    }

    /// Step 2: the configuration and binary are loaded (or not): start the new generation.
    pub(super) fn on_loaded(
        &mut self,
        generation: u64,
        result: Result<Box<Config>, String>,
        now: Instant,
    ) {
        let Phase::Rolling(r) = &self.phase else {
            return;
        };
        if r.generation != generation || !matches!(r.step, Step::Loading) {
            return;
        }
        let mut config = match result {
            Ok(c) => c,
            Err(why) => return self.roll_back(why, now),
        };
        let restart_needed = self.keep_fixed_keys(&mut config);
        for key in &restart_needed {
            warn!(
                "reload: {key}: needs a restart (systemctl restart app); applying the rest of the configuration"
            );
        }
        let current = self.pool.slots.len();
        let workers = if config.workers != self.config.workers {
            info!(
                "reload: workers changed in the configuration from {} to {}: the new generation has {} worker(s)",
                self.config.workers, config.workers, config.workers
            );
            config.workers
        } else {
            if current != config.workers {
                info!(
                    "reload: workers unchanged in the configuration ({}): keeping the pool scaled at run time to {current}",
                    config.workers
                );
            }
            current
        };
        let ready_timeout = config.ready_timeout;
        if let Phase::Rolling(r) = &mut self.phase {
            r.workers = workers;
            r.restart_needed = restart_needed;
            r.config = Some(config);
            r.step = Step::Starting {
                deadline: now + ready_timeout,
            };
        }
        for slot in 0..workers {
            self.spawn(generation, slot);
        }
    }

    /// Moves a rollover along; see the module docs for the steps.
    pub(super) fn advance_rollover(&mut self, now: Instant) {
        let Phase::Rolling(r) = &mut self.phase else {
            return;
        };
        match r.step {
            Step::Loading => {}
            Step::Starting { deadline } => {
                let problem = r.failed.clone().or_else(|| {
                    (now > deadline).then(|| {
                        format!(
                            "generation {} not ready within ready_timeout ({:?})",
                            r.generation,
                            r.config
                                .as_ref()
                                .map(|c| c.ready_timeout)
                                .unwrap_or_default()
                        )
                    })
                });
                if let Some(why) = problem {
                    return self.roll_back(why, now);
                }
                // A new worker that left already (its request limit, a panic) is replaced
                // in the new generation, as a serving one would be: otherwise the slot stays
                // empty and the reload fails at ready_timeout.
                let (g, n) = (r.generation, r.workers);
                let empty: Vec<usize> = (0..n).filter(|&s| !self.pool.is_held(g, s)).collect();
                for slot in &empty {
                    self.spawn(g, *slot);
                }
                if empty.is_empty() && self.pool.generation_full(g, n) {
                    self.promote(now);
                }
            }
            Step::Draining { deadline } => {
                let g = r.generation;
                if !self.pool.workers.values().any(|w| w.generation < g) {
                    return self.finish_ok(now);
                }
                if now > deadline {
                    for w in self.pool.workers.values_mut().filter(|w| w.generation < g) {
                        let connections = w.connections;
                        if w.kill(format!(
                            "still draining at drain_timeout, {connections} connection(s) cut"
                        )) {
                            r.cut += connections;
                            self.out.push(Action::Kill(w.pid));
                        }
                    }
                }
                // A long drain would otherwise run into systemd's reload timeout.
                if now.duration_since(r.last_extend) >= Duration::from_secs(1) {
                    r.last_extend = now;
                    let left = deadline.saturating_duration_since(now);
                    self.out.push(Action::Notify(Notify::ExtendTimeout(
                        left + Duration::from_secs(5),
                    )));
                }
            }
        }
    }

    /// Step 3: every new worker is ready: they serve now, the old generation drains.
    fn promote(&mut self, now: Instant) {
        let Phase::Rolling(r) = &mut self.phase else {
            return;
        };
        let Some(config) = r.config.take() else {
            return;
        };
        let new = r.generation;
        self.config = *config;
        let drain = self.config.drain_timeout;
        self.budget
            .reconfigure(self.config.restart_limit, self.config.restart_window);
        let old = self.pool.generation;
        self.pool.generation = new;
        self.pool.resize(r.workers, &self.facts.cpus, now);
        for slot in &mut self.pool.slots {
            slot.backoff.reset();
        }
        let mut n = 0;
        for w in self
            .pool
            .workers
            .values_mut()
            .filter(|w| w.generation < new)
        {
            w.drain(Retire::Superseded, drain, now, &mut self.out);
            n += 1;
        }
        info!(
            "reload: generation {new} serving after {:.1} ms; draining {n} worker(s) of generation {old}",
            now.duration_since(r.started).as_secs_f64() * 1e3
        );
        r.step = Step::Draining {
            deadline: drain_deadline(now, drain),
        };
    }

    /// The new generation failed: it goes away, the serving one never stopped.
    fn roll_back(&mut self, why: String, now: Instant) {
        let Phase::Rolling(r) = std::mem::replace(&mut self.phase, Phase::Serving) else {
            return;
        };
        let drain = self.config.drain_timeout;
        for w in self
            .pool
            .workers
            .values_mut()
            .filter(|w| w.generation == r.generation)
        {
            if w.life == Life::Starting {
                w.life = Life::Retiring(Retire::RolledBack);
                if w.kill("reload rolled back".into()) {
                    self.out.push(Action::Kill(w.pid));
                }
            } else {
                w.life = match std::mem::replace(&mut w.life, Life::Ready) {
                    // Already on its way out for another reason: that reason stays.
                    l @ (Life::Draining { .. } | Life::Killed { .. }) => l,
                    _ => Life::Ready,
                };
                w.drain(Retire::RolledBack, drain, now, &mut self.out);
            }
        }
        self.pool.pending.retain(|&(g, _), _| g != r.generation);
        self.finish_failed(r.waiters, r.started, r.generation, why, now);
    }

    /// Step 4: the old generation is gone: `READY=1`, and the answer to whoever asked.
    fn finish_ok(&mut self, now: Instant) {
        let Phase::Rolling(r) = std::mem::replace(&mut self.phase, Phase::Serving) else {
            return;
        };
        let took = now.duration_since(r.started);
        let ms = took.as_millis() as u64;
        self.out
            .push(Action::Count(Count::Reload { ok: true, took }));
        let version = self
            .pool
            .workers
            .values()
            .find(|w| w.generation == r.generation && w.version.is_some())
            .and_then(|w| w.version.clone());
        let mut message = format!(
            "generation {} serving: {} worker(s), version {}",
            r.generation,
            r.workers,
            version.as_deref().unwrap_or("unknown")
        );
        if !r.restart_needed.is_empty() {
            message.push_str(&format!(
                "; NOT applied until a restart (systemctl restart app): {}",
                r.restart_needed.join("; ")
            ));
        }
        self.restart_needed = r.restart_needed.clone();
        if r.cut > 0 {
            message.push_str(&format!(
                "; {} connection(s) of the old generation cut (still busy at drain_timeout, or hung)",
                r.cut
            ));
            warn!("reload finished in {ms} ms: {message}");
        } else if !r.restart_needed.is_empty() {
            warn!("reload finished in {ms} ms: {message}");
        } else {
            info!("reload finished in {ms} ms: {message}");
        }
        self.last_reload = Some(ReloadReport {
            generation: r.generation,
            ok: true,
            message: message.clone(),
            duration_ms: ms,
            connections_cut: r.cut,
            workers: r.workers,
            version,
            restart_needed: r.restart_needed,
        });
        let status = self.status_line(now);
        self.notify_ready(status);
        for w in r.waiters {
            self.reply(
                w,
                Reply {
                    ok: true,
                    message: Some(format!("{message} (reload took {ms} ms)")),
                    ..Default::default()
                },
            );
        }
        self.follow_up(now);
    }

    /// Ends a failed reload: the serving generation is untouched.
    fn finish_failed(
        &mut self,
        waiters: Vec<ReplyTo>,
        started: Instant,
        generation: u64,
        why: String,
        now: Instant,
    ) {
        self.phase = Phase::Serving;
        let took = now.duration_since(started);
        self.out
            .push(Action::Count(Count::Reload { ok: false, took }));
        let msg = format!(
            "reload failed: {why}; still serving generation {}",
            self.pool.generation
        );
        error!("{msg}");
        self.notify_ready(msg.clone());
        self.last_reload = Some(ReloadReport {
            generation,
            ok: false,
            message: why,
            duration_ms: took.as_millis() as u64,
            ..Default::default()
        });
        for w in waiters {
            self.reply(w, Reply::error(msg.clone()));
        }
        self.follow_up(now);
    }

    /// Keys of `config` fixed for the life of the master: each one the file changed is set
    /// back to its running value and named in the result.
    fn keep_fixed_keys(&self, config: &mut Config) -> Vec<String> {
        let mut changed = Vec::new();
        if config.accept != self.config.accept {
            changed.push(format!(
                "accept (running {}, the file says {})",
                accept_name(self.config.accept),
                accept_name(config.accept)
            ));
            config.accept = self.config.accept;
        }
        if self.facts.bound_by_hand && config.bind != self.config.bind {
            changed.push(format!(
                "bind (listening on {}, the file says {})",
                self.config.bind, config.bind
            ));
        }
        config.bind = self.config.bind;
        let path = config
            .control_socket
            .clone()
            .unwrap_or_else(crate::control::default_path);
        if path != self.facts.control_path {
            changed.push(format!(
                "control_socket (at {}, the file says {})",
                self.facts.control_path.display(),
                path.display()
            ));
        }
        config.control_socket = self.config.control_socket.clone();
        changed
    }

    /// Starts the one rollover that serves every reload requested meanwhile.
    fn follow_up(&mut self, now: Instant) {
        if let Some(queued) = self.reload_queue.take() {
            info!(
                "reload: running the {} queued request(s) as one follow-up",
                queued.len().max(1)
            );
            self.begin_rollover(queued, now);
        }
    }

    /// A stop during a rollover: tell the waiters; the stop drains every worker anyway.
    pub(super) fn abort_rollover_for_stop(&mut self) {
        let queued = self.reload_queue.take().unwrap_or_default();
        let waiters = match std::mem::replace(&mut self.phase, Phase::Serving) {
            Phase::Rolling(r) => r.waiters,
            other => {
                self.phase = other;
                Vec::new()
            }
        };
        for w in waiters.into_iter().chain(queued) {
            warn!("reload abandoned: the service is stopping");
            self.reply(w, Reply::error("reload abandoned: the service is stopping"));
        }
    }
}

fn accept_name(a: AcceptStrategy) -> &'static str {
    match a {
        AcceptStrategy::Shared => "shared",
        AcceptStrategy::RoundRobin => "round-robin",
    }
}
