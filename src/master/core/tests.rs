//! Every decision of the supervisor, tested without processes or clocks: a [`Harness`]
//! plays the shell (it answers spawns with made-up pids, loads with a given configuration)
//! and well-behaved workers (they answer heartbeats), and moves a fake clock in 50 ms
//! ticks, as the master's loop does.

use std::time::{Duration, Instant};

use super::worker::{Life, Retire};
use super::*;
use crate::ipc::{ToMaster, ToWorker};

const TICK: Duration = Duration::from_millis(50);

fn config(workers: usize) -> Config {
    let mut c = Config::load(&crate::config::ServeArgs::default(), workers, |_| Ok(()))
        .expect("the defaults are a valid configuration");
    c.workers = workers;
    c.heartbeat_interval = Duration::from_secs(1);
    c.heartbeat_misses = 3;
    c.ready_timeout = Duration::from_secs(10);
    c.drain_timeout = Duration::from_secs(5);
    c.shutdown_timeout = Duration::from_secs(8);
    c.drain_delay = Duration::ZERO;
    c.min_uptime = Duration::from_secs(1);
    c.restart_limit = 5;
    c.restart_window = Duration::from_secs(60);
    c.max_requests = 0;
    c.max_memory = 0;
    c
}

struct Harness {
    sup: Supervisor,
    now: Instant,
    next_pid: i32,
    /// What the next [`Action::Load`] is answered with.
    next_load: Option<Result<Box<Config>, String>>,
    /// Workers that do not answer heartbeats (hung, or stopped).
    mute: Vec<i32>,
    /// Every action so far, in order.
    log: Vec<Action>,
    /// Spawns to answer with a failure: (error, host_resource).
    fail_spawns: Vec<(String, bool)>,
}

impl Harness {
    fn new(config: Config) -> Harness {
        Harness::with_facts(
            config,
            Facts {
                cpus: vec![0, 1],
                bound_by_hand: false,
                control_path: crate::control::default_path(),
                watchdog: None,
            },
        )
    }

    fn with_facts(config: Config, facts: Facts) -> Harness {
        let now = Instant::now();
        Harness {
            sup: Supervisor::new(config, facts, now).with_seed(7),
            now,
            next_pid: 100,
            next_load: None,
            mute: Vec::new(),
            log: Vec::new(),
            fail_spawns: Vec::new(),
        }
    }

    /// Hands `event` over and plays the shell and the workers; returns every action it led
    /// to.
    fn on(&mut self, event: Event) -> Vec<Action> {
        let mut all = Vec::new();
        let mut queue = std::collections::VecDeque::from([event]);
        while let Some(event) = queue.pop_front() {
            for action in self.sup.on(event, self.now) {
                match &action {
                    Action::Spawn {
                        generation, slot, ..
                    } => {
                        queue.push_back(match self.fail_spawns.pop() {
                            Some((error, host_resource)) => Event::SpawnFailed {
                                generation: *generation,
                                slot: *slot,
                                error,
                                host_resource,
                            },
                            None => {
                                self.next_pid += 1;
                                Event::Spawned {
                                    generation: *generation,
                                    slot: *slot,
                                    pid: self.next_pid,
                                }
                            }
                        });
                    }
                    Action::Load { generation } => queue.push_back(Event::Loaded {
                        generation: *generation,
                        result: self.next_load.take().expect("a load was expected"),
                    }),
                    Action::Send(pid, ToWorker::Ping { seq }) if !self.mute.contains(pid) => {
                        let requests = self.sup.worker(*pid).map_or(0, |w| w.requests);
                        queue.push_back(Event::Message(
                            *pid,
                            ToMaster::Pong {
                                seq: *seq,
                                requests,
                                connections: 0,
                            },
                        ));
                    }
                    _ => {}
                }
                all.push(action);
            }
        }
        self.log.extend(all.iter().cloned());
        all
    }

    /// Lets `d` pass in ticks; returns the actions meanwhile.
    fn run(&mut self, d: Duration) -> Vec<Action> {
        let end = self.now + d;
        let mut all = Vec::new();
        while self.now < end {
            self.now += TICK.min(end - self.now);
            all.extend(self.on(Event::Tick));
        }
        all
    }

    fn tick(&mut self) -> Vec<Action> {
        self.run(TICK)
    }

    fn pids(&self, pred: impl Fn(&Worker) -> bool) -> Vec<i32> {
        self.sup
            .pool()
            .workers
            .values()
            .filter(|w| pred(w))
            .map(|w| w.pid)
            .collect()
    }

    fn starting(&self) -> Vec<i32> {
        self.pids(|w| w.life == Life::Starting)
    }

    /// Every starting worker says it is ready.
    fn ready_all(&mut self) -> Vec<Action> {
        let mut all = Vec::new();
        for pid in self.starting() {
            all.extend(self.on(Event::Message(pid, ToMaster::Ready { version: None })));
        }
        all
    }

    /// Boots the first generation to READY=1.
    fn boot(config: Config) -> Harness {
        let mut h = Harness::new(config);
        h.tick();
        h.ready_all();
        h.tick();
        assert!(matches!(h.sup.phase(), Phase::Serving));
        h
    }

    /// SIGTERM: a graceful stop.
    fn sigterm(&mut self) -> Vec<Action> {
        self.on(Event::Stop {
            why: "SIGTERM",
            fast: false,
        })
    }

    fn exit(&mut self, pid: i32, status: ExitStatus) -> Vec<Action> {
        self.on(Event::Exited(pid, status))
    }

    /// Every worker told to drain (or killed) exits.
    fn exit_drained(&mut self) -> Vec<Action> {
        let gone = self.pids(|w| matches!(w.life, Life::Draining { .. } | Life::Killed { .. }));
        let mut all = Vec::new();
        for pid in gone {
            let status = if self.sup.worker(pid).is_some_and(Worker::is_killed) {
                killed()
            } else {
                ExitStatus::Code(0)
            };
            all.extend(self.exit(pid, status));
        }
        all
    }

    fn generation(&self) -> u64 {
        self.sup.pool().generation
    }
}

fn killed() -> ExitStatus {
    ExitStatus::Signal {
        signal: nix::sys::signal::Signal::SIGKILL,
        core_dumped: false,
    }
}

fn spawns(actions: &[Action]) -> Vec<(u64, usize)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Spawn {
                generation, slot, ..
            } => Some((*generation, *slot)),
            _ => None,
        })
        .collect()
}

fn kills(actions: &[Action]) -> Vec<i32> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Kill(pid) => Some(*pid),
            _ => None,
        })
        .collect()
}

fn drained(actions: &[Action]) -> Vec<i32> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(pid, ToWorker::Drain { .. }) => Some(*pid),
            _ => None,
        })
        .collect()
}

fn notified(actions: &[Action]) -> Vec<&Notify> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Notify(n) => Some(n),
            _ => None,
        })
        .collect()
}

fn readied(actions: &[Action]) -> usize {
    notified(actions)
        .iter()
        .filter(|n| matches!(n, Notify::Ready(_)))
        .count()
}

fn replies(actions: &[Action]) -> Vec<(ReplyTo, Reply)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Reply(to, r) => Some((*to, (**r).clone())),
            _ => None,
        })
        .collect()
}

fn counted(actions: &[Action]) -> Vec<Count> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Count(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

fn exit_code(actions: &[Action]) -> Option<i32> {
    actions.iter().find_map(|a| match a {
        Action::Exit(c) => Some(*c),
        _ => None,
    })
}

// ---- boot -----------------------------------------------------------------------------

#[test]
fn boot_starts_one_worker_per_slot_and_is_ready_only_when_all_are() {
    let mut h = Harness::new(config(3));
    let first = h.tick();
    assert_eq!(spawns(&first), vec![(1, 0), (1, 1), (1, 2)]);
    assert_eq!(h.sup.readiness(), crate::loadboard::Readiness::Starting);
    let pids = h.starting();
    h.on(Event::Message(pids[0], ToMaster::Ready { version: None }));
    h.on(Event::Message(pids[1], ToMaster::Ready { version: None }));
    assert_eq!(
        readied(&h.tick()),
        0,
        "READY=1 with a worker still starting"
    );
    h.on(Event::Message(pids[2], ToMaster::Ready { version: None }));
    let after = h.tick();
    assert_eq!(readied(&after), 1);
    // Probes say ready before systemd hears READY=1.
    let readiness = after
        .iter()
        .position(|a| matches!(a, Action::Readiness(crate::loadboard::Readiness::Ready)));
    let ready = after
        .iter()
        .position(|a| matches!(a, Action::Notify(Notify::Ready(_))));
    assert!(readiness < ready, "{after:?}");
    assert_eq!(readied(&h.run(Duration::from_secs(3))), 0, "READY=1 twice");
}

#[test]
fn a_slot_being_started_is_not_started_twice() {
    let mut h = Harness::new(config(2));
    h.tick();
    let again = h.run(Duration::from_secs(2));
    assert!(spawns(&again).is_empty(), "{again:?}");
}

// ---- exits ----------------------------------------------------------------------------

#[test]
fn a_crash_after_min_uptime_is_replaced_at_once_and_counted() {
    let mut h = Harness::boot(config(2));
    h.run(Duration::from_secs(2));
    let pid = h.pids(|w| w.slot == 1)[0];
    let out = h.exit(
        pid,
        ExitStatus::Signal {
            signal: nix::sys::signal::Signal::SIGSEGV,
            core_dumped: true,
        },
    );
    assert_eq!(counted(&out), vec![Count::Restart(Cause::Crash)]);
    assert_eq!(spawns(&h.tick()), vec![(1, 1)]);
    assert_eq!(h.sup.pool().slots[1].restarts, 1);
    assert_eq!(h.sup.budget_used(h.now), 1);
}

#[test]
fn a_worker_dying_young_backs_off_exponentially() {
    let mut h = Harness::boot(config(1));
    let mut delays = Vec::new();
    for _ in 0..3 {
        let pid = h.pids(|w| w.holds_slot())[0];
        h.exit(pid, ExitStatus::Code(1));
        let died = h.now;
        let mut waited = Duration::ZERO;
        while spawns(&h.tick()).is_empty() {
            waited = h.now - died;
            assert!(waited < Duration::from_secs(2), "never restarted");
        }
        delays.push(waited);
        h.ready_all();
    }
    // 100 ms, 200 ms, 400 ms, each with jitter over its upper half.
    assert!(delays[0] >= Duration::from_millis(0) && delays[0] <= Duration::from_millis(100));
    assert!(delays[1] >= Duration::from_millis(50) && delays[1] <= Duration::from_millis(200));
    assert!(delays[2] >= Duration::from_millis(150) && delays[2] <= Duration::from_millis(400));
    assert!(delays[2] > delays[0], "{delays:?}");
}

#[test]
fn the_restart_budget_spent_stops_everything_with_exit_code_69() {
    let mut c = config(2);
    c.restart_limit = 2;
    c.min_uptime = Duration::ZERO;
    let mut h = Harness::boot(c);
    let mut failed = false;
    for _ in 0..3 {
        let pid = h.pids(|w| w.slot == 0 && w.holds_slot())[0];
        let out = h.exit(pid, ExitStatus::Code(1));
        failed |= notified(&out)
            .iter()
            .any(|n| matches!(n, Notify::Failed(_)));
        h.tick();
        h.ready_all();
    }
    assert!(failed, "no giving up after 3 restarts with restart_limit 2");
    assert!(h.sup.is_stopping());
    assert!(
        h.pids(|w| w.holds_slot()).is_empty(),
        "workers left serving"
    );
    let out = h.exit_drained();
    assert_eq!(
        exit_code(&[out, h.tick()].concat()),
        Some(crate::exit::UNAVAILABLE)
    );
}

#[test]
fn exits_at_shutdown_or_of_retired_workers_do_not_touch_the_budget() {
    let mut h = Harness::boot(config(2));
    h.sigterm();
    let out = h.exit_drained();
    assert!(counted(&out).is_empty(), "{out:?}");
    assert_eq!(h.sup.budget_used(h.now), 0);
}

#[test]
fn an_ipc_protocol_error_kills_the_worker() {
    let mut h = Harness::boot(config(2));
    let pid = h.pids(|w| w.slot == 0)[0];
    let out = h.on(Event::ChannelClosed {
        pid,
        error: Some("undecodable IPC frame".into()),
    });
    assert_eq!(kills(&out), vec![pid]);
    let out = h.exit(pid, killed());
    assert_eq!(counted(&out), vec![Count::Restart(Cause::Crash)]);
}

#[test]
fn a_plain_channel_close_is_not_a_fault() {
    let mut h = Harness::boot(config(2));
    let pid = h.pids(|w| w.slot == 0)[0];
    let out = h.on(Event::ChannelClosed { pid, error: None });
    assert!(kills(&out).is_empty());
}

#[test]
fn a_last_heartbeat_answer_read_after_the_reap_corrects_the_request_total() {
    let mut h = Harness::boot(config(1));
    let pid = h.pids(|_| true)[0];
    h.on(Event::Message(
        pid,
        ToMaster::Pong {
            seq: 1,
            requests: 10,
            connections: 0,
        },
    ));
    h.exit(pid, ExitStatus::Code(0));
    assert_eq!(h.sup.pool().requests_total(), 10);
    h.on(Event::Message(
        pid,
        ToMaster::Pong {
            seq: 2,
            requests: 15,
            connections: 0,
        },
    ));
    assert_eq!(h.sup.pool().requests_total(), 15);
}

// ---- hangs ----------------------------------------------------------------------------

#[test]
fn a_silent_worker_is_killed_after_the_silence_limit_and_not_before() {
    let mut h = Harness::boot(config(2));
    let pid = h.pids(|w| w.slot == 0)[0];
    h.mute.push(pid);
    // Silent since the last answer: misses (3) × interval (1 s) + half an interval.
    let mut waited = Duration::ZERO;
    loop {
        let out = h.tick();
        waited += TICK;
        if kills(&out).contains(&pid) {
            // Its replacement starts at once, not when the killed one is reaped.
            assert_eq!(spawns(&out), vec![(1, 0)]);
            break;
        }
        assert!(waited < Duration::from_secs(5), "hung worker never killed");
    }
    assert!(
        waited >= Duration::from_millis(3000) && waited <= Duration::from_millis(3600),
        "killed after {waited:?}"
    );
    let out = h.exit(pid, killed());
    assert_eq!(counted(&out), vec![Count::Restart(Cause::Hang)]);
    assert!(spawns(&h.tick()).is_empty(), "replaced twice");
}

#[test]
fn a_master_stall_is_not_blamed_on_the_workers() {
    let mut h = Harness::boot(config(2));
    // The master itself is stopped for 10 s: nothing could have been heard.
    h.now += Duration::from_secs(10);
    let out = h.on(Event::Tick);
    assert!(kills(&out).is_empty(), "{out:?}");
    // Heartbeats go out at once, and answered ones keep the workers alive.
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Send(_, ToWorker::Ping { .. })))
    );
    assert!(kills(&h.run(Duration::from_secs(5))).is_empty());
}

#[test]
fn a_worker_never_ready_is_killed_at_ready_timeout() {
    let mut h = Harness::new(config(1));
    h.tick();
    let pid = h.starting()[0];
    let out = h.run(Duration::from_millis(9900));
    assert!(kills(&out).is_empty());
    let out = h.run(Duration::from_millis(200));
    assert_eq!(kills(&out), vec![pid]);
    let out = h.exit(pid, killed());
    assert_eq!(counted(&out), vec![Count::Restart(Cause::Hang)]);
}

#[test]
fn a_draining_worker_that_answers_then_falls_silent_is_hung() {
    let mut c = config(2);
    c.drain_timeout = Duration::from_secs(30);
    let mut h = Harness::boot(c);
    let pid = h.pids(|w| w.slot == 1)[0];
    h.on(Event::ScaleBy(-1));
    assert!(matches!(
        h.sup.worker(pid).unwrap().life,
        Life::Draining { .. }
    ));
    // It answers during the drain, then stops answering.
    h.run(Duration::from_secs(2));
    h.mute.push(pid);
    let out = h.run(Duration::from_secs(4));
    assert_eq!(kills(&out), vec![pid], "hung draining worker not killed");
}

#[test]
fn a_draining_worker_that_never_answers_while_draining_waits_for_its_deadline() {
    let mut c = config(2);
    c.drain_timeout = Duration::from_secs(5);
    let mut h = Harness::boot(c);
    let pid = h.pids(|w| w.slot == 1)[0];
    // It answers the heartbeat sent with the drain, then no more (busy finishing).
    h.on(Event::ScaleBy(-1));
    h.mute.push(pid);
    let out = h.run(Duration::from_secs(5));
    assert!(kills(&out).is_empty(), "killed before its drain deadline");
    let out = h.run(Duration::from_millis(1100));
    assert_eq!(kills(&out), vec![pid]);
}

// ---- recycling ------------------------------------------------------------------------

#[test]
fn max_requests_starts_the_replacement_then_drains_the_old_worker() {
    let mut c = config(1);
    c.max_requests = 100;
    c.max_requests_jitter = 0;
    let mut h = Harness::boot(c);
    let old = h.pids(|_| true)[0];
    let out = h.on(Event::Message(
        old,
        ToMaster::Pong {
            seq: 1,
            requests: 100,
            connections: 1,
        },
    ));
    assert!(drained(&out).is_empty());
    let out = h.tick();
    assert_eq!(spawns(&out), vec![(1, 0)], "no replacement");
    assert!(
        drained(&out).is_empty(),
        "drained before its replacement serves"
    );
    assert_eq!(
        h.sup.pool().serving(),
        0,
        "a retiring worker is not counted"
    );
    let out = h.ready_all();
    assert_eq!(drained(&out), vec![old]);
    let out = h.exit_drained();
    assert_eq!(counted(&out), vec![Count::Restart(Cause::Requests)]);
    assert_eq!(h.sup.budget_used(h.now), 0);
}

#[test]
fn max_requests_jitter_spreads_the_limits() {
    let mut c = config(2);
    c.max_requests = 1000;
    c.max_requests_jitter = 50;
    let h = Harness::boot(c);
    for w in h.sup.pool().workers.values() {
        assert!(
            (1000..=1050).contains(&w.request_limit),
            "{}",
            w.request_limit
        );
    }
}

#[test]
fn memory_over_max_memory_recycles_a_serving_worker() {
    let mut c = config(2);
    c.max_memory = 100 << 20;
    let mut h = Harness::boot(c);
    let pid = h.pids(|w| w.slot == 1)[0];
    h.on(Event::Memory {
        pid,
        charged: 99 << 20,
    });
    assert!(spawns(&h.tick()).is_empty());
    h.on(Event::Memory {
        pid,
        charged: 101 << 20,
    });
    assert_eq!(spawns(&h.tick()), vec![(1, 1)]);
    assert_eq!(drained(&h.ready_all()), vec![pid]);
    let out = h.exit_drained();
    assert_eq!(counted(&out), vec![Count::Restart(Cause::Memory)]);
}

#[test]
fn a_panicking_worker_is_replaced_and_charged_a_planned_departure_is_not() {
    let mut h = Harness::boot(config(2));
    let a = h.pids(|w| w.slot == 0)[0];
    let b = h.pids(|w| w.slot == 1)[0];
    h.on(Event::Message(
        a,
        ToMaster::Leaving {
            reason: "panic".into(),
            planned: false,
        },
    ));
    h.on(Event::Message(
        b,
        ToMaster::Leaving {
            reason: "request limit".into(),
            planned: true,
        },
    ));
    assert_eq!(h.sup.budget_used(h.now), 1);
    let out = h.tick();
    assert_eq!(spawns(&out), vec![(1, 0), (1, 1)]);
    // They drain by themselves: no drain message.
    assert!(drained(&out).is_empty());
    let out = [
        h.exit(a, ExitStatus::Code(0)),
        h.exit(b, ExitStatus::Code(0)),
    ]
    .concat();
    assert_eq!(
        counted(&out),
        vec![
            Count::Restart(Cause::Panic),
            Count::Restart(Cause::Requests)
        ]
    );
}

// ---- spawn failures ----------------------------------------------------------------------

#[test]
fn a_start_the_host_had_no_resources_for_is_retried_off_the_budget() {
    let mut h = Harness::new(config(1));
    h.fail_spawns = vec![("EMFILE".into(), true); 3];
    let mut starts = 0;
    for _ in 0..200 {
        starts += spawns(&h.tick()).len();
    }
    assert!(starts >= 4, "retried {starts} times");
    assert_eq!(h.sup.budget_used(h.now), 0);
    assert_eq!(h.sup.spawn_failures().0, 3);
    assert_eq!(
        h.sup.pool().slots[0].spawn_failures_in_row,
        0,
        "a success resets it"
    );
}

#[test]
fn a_start_that_fails_otherwise_is_charged() {
    let mut h = Harness::new(config(1));
    h.fail_spawns = vec![("exec format error".into(), false)];
    h.tick();
    assert_eq!(h.sup.budget_used(h.now), 1);
    assert_eq!(
        h.sup.spawn_failures().1,
        Some("worker 0: exec format error")
    );
}

// ---- rollover ---------------------------------------------------------------------------

/// Asks for a reload with `reply` and answers the load with `config`.
fn reload(h: &mut Harness, config: Config, reply: u64) -> Vec<Action> {
    h.next_load = Some(Ok(Box::new(config)));
    h.on(Event::Reload(Some(ReplyTo(reply))))
}

#[test]
fn a_reload_starts_a_generation_promotes_it_when_ready_and_drains_the_old_one() {
    let mut h = Harness::boot(config(2));
    let old = h.pids(|_| true);
    let out = reload(&mut h, config(2), 1);
    assert!(matches!(notified(&out)[0], Notify::Reloading));
    assert_eq!(spawns(&out), vec![(2, 0), (2, 1)]);
    assert_eq!(h.generation(), 1, "promoted before ready");
    assert!(drained(&h.tick()).is_empty());
    let out = [h.ready_all(), h.tick()].concat();
    assert_eq!(h.generation(), 2);
    let mut d = drained(&out);
    d.sort();
    assert_eq!(d, old);
    assert!(
        replies(&out).is_empty(),
        "answered before the old generation left"
    );
    let out = [h.exit_drained(), h.tick()].concat();
    assert_eq!(readied(&out), 1);
    let r = replies(&out);
    assert_eq!(r.len(), 1);
    assert!(r[0].1.ok, "{:?}", r[0].1);
    let report = h.sup.last_reload().unwrap();
    assert!(report.ok);
    assert_eq!(
        (report.generation, report.workers, report.connections_cut),
        (2, 2, 0)
    );
    assert!(matches!(h.sup.phase(), Phase::Serving));
    assert!(counted(&out).contains(&Count::Restart(Cause::Reload)));
}

#[test]
fn a_broken_configuration_fails_the_reload_and_keeps_the_generation_serving() {
    let mut h = Harness::boot(config(2));
    h.next_load = Some(Err("config error: workers: not a number".into()));
    let out = h.on(Event::Reload(Some(ReplyTo(1))));
    assert!(spawns(&out).is_empty());
    let r = replies(&out);
    assert!(!r[0].1.ok);
    assert_eq!(readied(&out), 1, "systemd must leave 'reloading'");
    assert_eq!(h.generation(), 1);
    assert_eq!(h.sup.pool().serving(), 2);
    assert!(!h.sup.last_reload().unwrap().ok);
    assert!(counted(&out).contains(&Count::Reload {
        ok: false,
        took: Duration::ZERO
    }));
    // The next reload gets a new number, not the failed one's.
    reload(&mut h, config(2), 2);
    h.ready_all();
    h.tick();
    assert_eq!(h.generation(), 3);
}

#[test]
fn a_new_worker_that_dies_rolls_the_reload_back() {
    let mut h = Harness::boot(config(2));
    let old = h.pids(|_| true);
    reload(&mut h, config(2), 1);
    let new = h.starting();
    h.on(Event::Message(new[0], ToMaster::Ready { version: None }));
    let out = [h.exit(new[1], ExitStatus::Code(3)), h.tick()].concat();
    let r = replies(&out);
    assert_eq!(r.len(), 1);
    assert!(!r[0].1.ok);
    assert_eq!(
        drained(&out),
        vec![new[0]],
        "the ready new worker drains away"
    );
    assert_eq!(h.generation(), 1);
    assert_eq!(h.pids(|w| w.is_serving() && w.generation == 1), old);
    assert_eq!(
        h.sup.budget_used(h.now),
        0,
        "a failed reload is not a crash"
    );
    assert!(spawns(&h.run(Duration::from_secs(1))).is_empty());
}

#[test]
fn a_generation_not_ready_in_time_rolls_back() {
    let mut h = Harness::boot(config(2));
    reload(&mut h, config(2), 1);
    let new = h.starting();
    let out = h.run(Duration::from_millis(10_100));
    let mut k = kills(&out);
    k.sort();
    assert_eq!(
        k, new,
        "starting workers of a rolled-back generation are killed"
    );
    assert!(!replies(&out)[0].1.ok);
    assert_eq!(h.generation(), 1);
}

#[test]
fn reloads_during_a_rollover_coalesce_into_one_follow_up() {
    let mut h = Harness::boot(config(2));
    reload(&mut h, config(2), 1);
    h.on(Event::Reload(Some(ReplyTo(2))));
    h.on(Event::Reload(Some(ReplyTo(3))));
    h.on(Event::Reload(None));
    // The first finishes; one follow-up serves the three others.
    h.next_load = Some(Ok(Box::new(config(2))));
    let out = [h.ready_all(), h.tick(), h.exit_drained(), h.tick()].concat();
    assert_eq!(replies(&out).len(), 1);
    assert_eq!(
        out.iter()
            .filter(|a| matches!(a, Action::Load { .. }))
            .count(),
        1
    );
    let out = [h.ready_all(), h.tick(), h.exit_drained(), h.tick()].concat();
    let r = replies(&out);
    assert_eq!(r.iter().map(|(to, _)| to.0).collect::<Vec<_>>(), vec![2, 3]);
    assert!(r.iter().all(|(_, r)| r.ok));
    assert_eq!(h.generation(), 3);
}

#[test]
fn a_reload_during_boot_follows_the_boot() {
    let mut h = Harness::new(config(1));
    h.tick();
    h.on(Event::Reload(Some(ReplyTo(1))));
    h.next_load = Some(Ok(Box::new(config(1))));
    let out = [h.ready_all(), h.tick()].concat();
    assert_eq!(readied(&out), 1);
    assert_eq!(spawns(&out), vec![(2, 0)]);
}

#[test]
fn a_stop_during_a_rollover_answers_its_waiters_and_drains_everything() {
    let mut h = Harness::boot(config(2));
    reload(&mut h, config(2), 1);
    h.on(Event::Reload(Some(ReplyTo(2))));
    let out = h.sigterm();
    let r = replies(&out);
    assert_eq!(r.len(), 2);
    assert!(r.iter().all(|(_, r)| !r.ok));
    assert_eq!(drained(&out).len(), 4, "old and new workers drain");
    assert!(h.pids(|w| w.holds_slot()).is_empty());
    let out = [h.exit_drained(), h.tick()].concat();
    assert!(spawns(&out).is_empty());
    assert_eq!(exit_code(&out), Some(crate::exit::OK));
}

#[test]
fn an_old_worker_overrunning_its_drain_is_killed_and_its_connections_reported_cut() {
    let mut h = Harness::boot(config(1));
    let old = h.pids(|_| true)[0];
    h.on(Event::Message(
        old,
        ToMaster::Pong {
            seq: 1,
            requests: 5,
            connections: 4,
        },
    ));
    h.mute.push(old);
    reload(&mut h, config(1), 1);
    h.ready_all();
    h.tick();
    let out = h.run(Duration::from_secs(7));
    assert_eq!(kills(&out), vec![old]);
    let out = [h.exit(old, killed()), h.tick()].concat();
    assert!(
        replies(&out)[0].1.ok,
        "a reload that cut connections still succeeds"
    );
    assert_eq!(h.sup.last_reload().unwrap().connections_cut, 4);
    // systemd was told to wait longer meanwhile.
    assert!(
        h.log
            .iter()
            .any(|a| matches!(a, Action::Notify(Notify::ExtendTimeout(_))))
    );
}

#[test]
fn a_new_worker_that_leaves_before_promotion_is_replaced_in_its_generation() {
    let mut h = Harness::boot(config(2));
    reload(&mut h, config(2), 1);
    let new = h.starting();
    h.ready_all();
    // Leaves between ready and the promotion (its request limit).
    h.on(Event::Message(
        new[0],
        ToMaster::Leaving {
            reason: "request limit".into(),
            planned: true,
        },
    ));
    let out = h.tick();
    assert_eq!(spawns(&out), vec![(2, 0)]);
    assert_eq!(h.generation(), 1, "promoted with a slot empty");
    h.ready_all();
    h.tick();
    assert_eq!(h.generation(), 2);
}

#[test]
fn workers_changed_in_the_file_size_the_new_generation_else_a_runtime_scale_holds() {
    let mut h = Harness::boot(config(2));
    h.on(Event::ScaleBy(1));
    h.tick();
    h.ready_all();
    h.exit_drained();
    assert_eq!(h.sup.pool().slots.len(), 3);
    // Unchanged in the file: the pool keeps its runtime size.
    let out = reload(&mut h, config(2), 1);
    assert_eq!(spawns(&out).len(), 3);
    h.ready_all();
    h.tick();
    h.exit_drained();
    h.tick();
    // Changed in the file: the file wins.
    let out = reload(&mut h, config(4), 2);
    assert_eq!(spawns(&out).len(), 4);
    h.ready_all();
    h.tick();
    assert_eq!(h.sup.pool().slots.len(), 4);
}

#[test]
fn keys_fixed_for_the_masters_life_are_kept_and_named() {
    let mut h = Harness::boot(config(1));
    let mut c = config(1);
    c.accept = crate::config::AcceptStrategy::RoundRobin;
    c.heartbeat_misses = 5;
    reload(&mut h, c, 1);
    h.ready_all();
    h.tick();
    h.exit_drained();
    h.tick();
    assert_eq!(h.sup.config().accept, crate::config::AcceptStrategy::Shared);
    assert_eq!(h.sup.config().heartbeat_misses, 5, "the rest applies");
    let report = h.sup.last_reload().unwrap();
    assert!(report.ok);
    assert_eq!(report.restart_needed.len(), 1);
    assert!(report.restart_needed[0].starts_with("accept"));
    assert_eq!(h.sup.restart_needed().len(), 1);
}

// ---- stop, drain ------------------------------------------------------------------------

#[test]
fn a_graceful_stop_drains_kills_at_the_deadline_and_exits_when_all_are_gone() {
    let mut h = Harness::boot(config(2));
    let out = h.sigterm();
    assert!(matches!(out[0], Action::StopAccepting));
    assert!(
        notified(&out)
            .iter()
            .any(|n| matches!(n, Notify::Stopping(_)))
    );
    assert_eq!(drained(&out).len(), 2);
    assert_eq!(h.sup.readiness(), crate::loadboard::Readiness::Stopping);
    let pids = h.pids(|_| true);
    h.exit(pids[0], ExitStatus::Code(0));
    let out = h.run(Duration::from_secs(7));
    assert!(kills(&out).is_empty(), "killed before shutdown_timeout");
    let out = h.run(Duration::from_millis(1100));
    assert_eq!(kills(&out), vec![pids[1]]);
    assert_eq!(exit_code(&out), None);
    let out = [h.exit(pids[1], killed()), h.tick()].concat();
    assert_eq!(exit_code(&out), Some(crate::exit::OK));
    assert!(spawns(&out).is_empty());
}

#[test]
fn sigquit_or_a_second_signal_kills_at_once() {
    let mut h = Harness::boot(config(2));
    let out = h.on(Event::Stop {
        why: "SIGQUIT",
        fast: true,
    });
    assert_eq!(kills(&out).len(), 2);
    let mut h = Harness::boot(config(2));
    h.sigterm();
    let out = h.sigterm();
    assert_eq!(kills(&out).len(), 2);
}

#[test]
fn drain_delay_keeps_serving_while_probes_say_draining_then_stops() {
    let mut c = config(2);
    c.drain_delay = Duration::from_secs(3);
    let mut h = Harness::boot(c);
    let out = h.sigterm();
    assert!(drained(&out).is_empty());
    assert_eq!(h.sup.readiness(), crate::loadboard::Readiness::Draining);
    // A reload now is refused: the service is on its way out.
    let out = h.on(Event::Reload(Some(ReplyTo(1))));
    assert!(!replies(&out)[0].1.ok);
    let out = h.run(Duration::from_millis(2900));
    assert!(drained(&out).is_empty());
    let out = h.run(Duration::from_millis(200));
    assert_eq!(drained(&out).len(), 2);
    assert!(h.sup.is_stopping());
}

#[test]
fn a_second_signal_during_the_drain_delay_stops_now() {
    let mut c = config(1);
    c.drain_delay = Duration::from_secs(3);
    let mut h = Harness::boot(c);
    h.sigterm();
    let out = h.sigterm();
    assert_eq!(drained(&out).len(), 1);
}

#[test]
fn a_manual_drain_is_undone_by_undrain_but_a_stop_is_not() {
    let mut c = config(1);
    c.drain_delay = Duration::from_secs(3);
    let mut h = Harness::boot(c);
    let out = h.on(Event::Drain(ReplyTo(1)));
    assert!(replies(&out)[0].1.ok);
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Readiness(crate::loadboard::Readiness::Draining)))
    );
    let out = h.on(Event::Undrain(ReplyTo(2)));
    assert!(replies(&out)[0].1.ok);
    assert_eq!(h.sup.readiness(), crate::loadboard::Readiness::Ready);
    // Drained for longer than drain_delay: a stop is immediate.
    h.on(Event::Drain(ReplyTo(3)));
    h.run(Duration::from_secs(4));
    let out = [
        h.on(Event::Stop {
            why: "SIGTERM",
            fast: false,
        }),
        h.tick(),
    ]
    .concat();
    assert_eq!(drained(&out).len(), 1);
    let out = h.on(Event::Undrain(ReplyTo(4)));
    assert!(!replies(&out)[0].1.ok);
}

// ---- scale ------------------------------------------------------------------------------

#[test]
fn scaling_adds_and_drains_slots_but_never_during_a_reload_or_below_one() {
    let mut h = Harness::boot(config(2));
    h.on(Event::ScaleBy(1));
    assert_eq!(spawns(&h.tick()), vec![(1, 2)]);
    h.ready_all();
    let third = h.pids(|w| w.slot == 2)[0];
    let out = h.on(Event::ScaleBy(-1));
    assert_eq!(drained(&out), vec![third]);
    let out = h.on(Event::Scale {
        to: Some(0),
        by: None,
        reply: ReplyTo(1),
    });
    assert!(!replies(&out)[0].1.ok);
    h.on(Event::ScaleBy(-1));
    h.on(Event::ScaleBy(-1));
    assert_eq!(h.sup.pool().slots.len(), 1);
    reload(&mut h, config(2), 2);
    let out = h.on(Event::Scale {
        to: None,
        by: Some(1),
        reply: ReplyTo(3),
    });
    assert!(!replies(&out)[0].1.ok);
}

// ---- watchdog -----------------------------------------------------------------------------

#[test]
fn the_watchdog_is_pinged_only_while_a_serving_worker_answers() {
    let mut h = Harness::with_facts(
        config(2),
        Facts {
            cpus: vec![0, 1],
            bound_by_hand: false,
            control_path: "/run/app/control.sock".into(),
            watchdog: Some(Duration::from_millis(400)),
        },
    );
    h.tick();
    h.ready_all();
    let pings = |a: &[Action]| {
        notified(a)
            .iter()
            .filter(|n| matches!(n, Notify::Watchdog))
            .count()
    };
    let out = h.run(Duration::from_secs(1));
    assert!((4..=6).contains(&pings(&out)), "{} pings", pings(&out));
    // Every worker falls silent: fresh for two intervals, then no more pings.
    h.mute = h.pids(|_| true);
    let out = h.run(Duration::from_millis(2100));
    assert!(pings(&out) > 0);
    let out = h.run(Duration::from_millis(500));
    assert_eq!(pings(&out), 0, "pinged while no worker answered");
}

#[test]
fn status_changes_are_sent_once() {
    let mut h = Harness::boot(config(1));
    let out = h.run(Duration::from_secs(2));
    assert!(
        notified(&out)
            .iter()
            .all(|n| !matches!(n, Notify::Status(_))),
        "{out:?}"
    );
    let pid = h.pids(|_| true)[0];
    let out = [h.exit(pid, ExitStatus::Code(1)), h.tick()].concat();
    assert_eq!(
        notified(&out)
            .iter()
            .filter(|n| matches!(n, Notify::Status(_)))
            .count(),
        1
    );
}

#[test]
fn the_lifecycle_decides_slot_service_and_status_names() {
    let now = Instant::now();
    let mut w = Worker::new(1, 0, 1, 0, now);
    assert!(w.holds_slot() && !w.is_serving() && !w.is_pinged());
    w.life = Life::Ready;
    assert!(w.holds_slot() && w.is_serving() && w.is_pinged());
    w.retire_later(Retire::ScaledDown);
    assert!(!w.holds_slot() && !w.is_serving() && w.is_pinged());
    assert_eq!(w.life.name(), "retiring");
    let mut out = Vec::new();
    w.drain(Retire::Shutdown, Duration::from_secs(1), now, &mut out);
    assert_eq!(
        w.retire(),
        Some(&Retire::ScaledDown),
        "the first reason stays"
    );
    assert_eq!(out.len(), 2, "a heartbeat, then the drain");
    assert!(w.kill("test".into()));
    assert!(!w.kill("again".into()));
    assert_eq!(w.life.name(), "draining");
    assert!(!w.is_pinged());
}
