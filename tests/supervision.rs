//! Supervision with real processes and real signals: crash recovery, hung workers, panics,
//! the restart budget, recycling, the systemd watchdog, scaling, and a chaos run under load.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// Polls the control socket until `slot` is held by a ready worker other than `old`;
/// returns (new pid, time taken).
fn wait_replaced(srv: &Server, slot: u64, old: i32, timeout: Duration) -> Option<(i32, Duration)> {
    let t0 = Instant::now();
    wait_until(timeout, || {
        srv.workers()
            .into_iter()
            .find(|w| w.0 == slot && w.1 != old && w.4 == "ready")
            .map(|w| (w.1, t0.elapsed()))
    })
}

#[test]
fn killed_worker_is_replaced_on_its_cpu() {
    // Workers up longer than min_uptime are replaced at once (no backoff).
    let srv = Server::start(Launch::default().args(&["--min-uptime", "100ms"]));
    let mut latencies = Vec::new();
    let mut killed = Vec::new();
    for round in 0..5 {
        let ws = srv.workers();
        let (slot, pid, cpu, _, _) = ws[round % ws.len()].clone();
        unsafe { libc::kill(pid, libc::SIGKILL) };
        killed.push((slot, pid));
        let (new, took) =
            wait_replaced(&srv, slot, pid, Duration::from_secs(2)).expect("not replaced");
        latencies.push(took);
        assert_eq!(
            cpus_allowed(new),
            cpu.to_string(),
            "replacement pinned to the slot's CPU"
        );
        std::thread::sleep(Duration::from_millis(150));
    }
    latencies.sort();
    eprintln!(
        "FIGURES kill→replacement ready: median {:?}, worst {:?}",
        latencies[latencies.len() / 2],
        latencies.last().unwrap()
    );
    // Each was an unplanned restart, counted pool-wide and per slot.
    let report = srv.report();
    assert_eq!(report.restarts_in_window, 5);
    let per_slot: u32 = report.workers.iter().map(|w| w.restarts).sum();
    assert_eq!(per_slot, 5, "{report:?}");
    // The master's line about each exit carries the worker's journald fields, so
    // `journalctl -u app WORKER_PID=…` finds it beside the worker's own lines.
    let log = srv.log_text();
    for (slot, pid) in killed {
        let fields = [format!("worker_id={slot}"), format!("worker_pid={pid}")];
        assert!(
            log.lines()
                .any(|l| fields.iter().all(|f| l.contains(f.as_str())) && l.contains("WARN")),
            "no warning with {fields:?}:\n{log}"
        );
    }
}

#[test]
fn hung_worker_is_detected_and_replaced_in_time() {
    let _heavy = common::heavy();
    // Silent for 200 ms × 3 misses + 100 ms: killed and replaced. The exact bound is a unit
    // test of the master's core (`a_silent_worker_is_killed_after_the_silence_limit...`);
    // here, that a real hung process is found and replaced, with room for a busy host.
    let srv = Server::start(Launch::default().args(&[
        "--chaos",
        "--workers",
        "1",
        "--heartbeat-interval",
        "200ms",
        "--heartbeat-misses",
        "3",
    ]));
    let old = srv.workers()[0].1;
    let port = srv.port;
    let t0 = Instant::now();
    let hang = std::thread::spawn(move || {
        let mut c = Conn::open(port).unwrap();
        c.set_timeout(Duration::from_secs(5));
        c.get("/chaos/hang")
    });
    let (_, _) =
        wait_replaced(&srv, 0, old, Duration::from_secs(5)).expect("hung worker never replaced");
    let took = t0.elapsed();
    eprintln!("FIGURES hung worker detected and replaced after {took:?} (limit 700 ms)");
    assert!(took <= Duration::from_millis(2000), "took {took:?}");
    assert!(
        hang.join().unwrap().is_err(),
        "the hung request cannot succeed"
    );
    assert!(!alive(old));
    assert_eq!(get(srv.port, "/").unwrap().status, 200);
    // Killed as hung: an unplanned restart.
    assert_eq!(srv.report().restarts_in_window, 1);
}

#[test]
fn panic_gets_500_replacement_starts_before_the_old_worker_drains() {
    let _heavy = common::heavy();
    let srv = Server::start(Launch::default().args(&[
        "--chaos",
        "--workers",
        "1",
        "--drain-timeout",
        "5s",
    ]));
    let old = srv.workers()[0].1;
    let port = srv.port;
    // A slow request in flight on the worker that is about to panic.
    let slow = std::thread::spawn(move || get(port, "/sleep?ms=1000"));
    std::thread::sleep(Duration::from_millis(200));
    let r = get(srv.port, "/chaos/panic").unwrap();
    assert_eq!(r.status, 500);
    assert_eq!(r.header("connection"), Some("close"));
    let (new, took) = wait_replaced(&srv, 0, old, Duration::from_secs(2)).expect("no replacement");
    // The replacement serves while the panicking worker still drains its slow request.
    let report = srv.report();
    let state = |pid: i32| {
        report
            .workers
            .iter()
            .find(|w| w.pid == pid)
            .map(|w| w.state.clone())
    };
    assert_eq!(state(new).as_deref(), Some("ready"), "{report:?}");
    assert_eq!(state(old).as_deref(), Some("draining"), "{report:?}");
    eprintln!("FIGURES panic→replacement ready {took:?} while the old worker drains");
    assert_eq!(get(srv.port, "/").unwrap().header("x-worker"), Some("0"));
    let slow = slow
        .join()
        .unwrap()
        .expect("in-flight request on the panicking worker was cut");
    assert_eq!(slow.status, 200);
    assert!(wait_until(Duration::from_secs(3), || (!alive(old)).then_some(())).is_some());
    assert!(alive(new));
    // A panic is an unplanned departure: counted against the restart budget.
    assert_eq!(srv.report().restarts_in_window, 1);
}

#[test]
fn boot_crash_loop_spends_the_budget_and_exits_69() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::new(dir.path());
    let mut srv = Server::spawn(
        Launch {
            notify: Some(notify.path.clone()),
            dir: Some(dir),
            ..Default::default()
        }
        .args(&[
            "--chaos-boot-crash",
            "--restart-limit",
            "5",
            "--restart-window",
            "60s",
        ]),
    );
    let t0 = Instant::now();
    let status = srv
        .wait_exit(Duration::from_secs(20))
        .expect("master kept restarting");
    eprintln!("FIGURES boot-crash loop gave up after {:?}", t0.elapsed());
    assert_eq!(status.code(), Some(69));
    let msg = notify
        .wait_for("giving up", Duration::from_secs(1))
        .expect("STATUS=giving up");
    assert!(msg.contains("ERRNO="), "{msg}");
    assert!(msg.contains("exceed restart_limit 5"), "{msg}");
    assert!(notify.messages.iter().all(|(_, m)| !m.contains("READY=1")));
    // How the backoff spaces the restarts is a unit test of the core
    // (`a_worker_dying_young_backs_off_exponentially`).
}

#[test]
fn healthy_pool_never_trips_the_budget() {
    let srv = Server::start(Launch::default().args(&["--restart-limit", "1"]));
    for _ in 0..200 {
        assert_eq!(get(srv.port, "/").unwrap().status, 200);
    }
    assert_eq!(srv.report().restarts_in_window, 0);
}

#[test]
fn memory_limit_recycles_gracefully() {
    let _heavy = common::heavy();
    let srv = Server::start(Launch::default().args(&[
        "--chaos",
        "--workers",
        "1",
        "--max-memory",
        "48MiB",
    ]));
    let old = srv.workers()[0].1;
    let r = get(srv.port, "/chaos/leak?mb=64").unwrap();
    assert_eq!(r.status, 200);
    let (new, took) = wait_replaced(&srv, 0, old, Duration::from_secs(5)).expect("not recycled");
    eprintln!("FIGURES over-limit worker recycled after {took:?}");
    assert!(wait_until(Duration::from_secs(3), || (!alive(old)).then_some(())).is_some());
    assert!(alive(new));
    // A planned recycle is not a crash.
    assert_eq!(srv.report().restarts_in_window, 0);
}

#[test]
fn request_limit_recycles_without_failures() {
    let _heavy = common::heavy();
    let srv = Server::start(Launch::default().args(&[
        "--workers",
        "1",
        "--max-requests",
        "50",
        "--max-requests-jitter",
        "10",
        "--heartbeat-interval",
        "100ms",
    ]));
    let first = srv.workers()[0].1;
    let mut pids = std::collections::HashSet::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        let r = get(srv.port, "/").expect("request failed during recycling");
        assert_eq!(r.status, 200);
        pids.insert(srv.workers().iter().find(|w| w.4 == "ready").map(|w| w.1));
        if !alive(first) && pids.len() > 2 {
            break;
        }
    }
    assert!(!alive(first), "worker over max_requests was not recycled");
    assert_eq!(srv.report().restarts_in_window, 0);
}

#[test]
fn watchdog_pings_only_while_the_loop_turns() {
    let _heavy = common::heavy();
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::new(dir.path());
    let srv = Server::start(Launch {
        notify: Some(notify.path.clone()),
        env: vec![("WATCHDOG_USEC".into(), "400000".into())],
        dir: Some(dir),
        ..Default::default()
    });
    notify.wait_for("READY=1", Duration::from_secs(5)).unwrap();
    notify.clear();
    notify.drain_for(Duration::from_millis(1000));
    let pings = notify
        .messages
        .iter()
        .filter(|(_, m)| m.contains("WATCHDOG=1"))
        .count();
    assert!(pings >= 3, "expected a ping every ~200ms, got {pings}");

    // A stopped master sends nothing, so systemd would kill it.
    srv.signal(libc::SIGSTOP);
    notify.clear();
    notify.drain_for(Duration::from_millis(800));
    assert!(
        notify
            .messages
            .iter()
            .all(|(_, m)| !m.contains("WATCHDOG=1"))
    );
    srv.signal(libc::SIGCONT);
    assert!(
        notify
            .wait_for("WATCHDOG=1", Duration::from_secs(2))
            .is_some()
    );

    // A pool with no answering worker sends nothing either.
    let ws = srv.workers();
    for w in &ws {
        unsafe { libc::kill(w.1, libc::SIGSTOP) };
    }
    std::thread::sleep(Duration::from_millis(2100)); // 2 heartbeat intervals: answers are stale
    notify.clear();
    notify.drain_for(Duration::from_millis(500));
    let during = notify
        .messages
        .iter()
        .filter(|(_, m)| m.contains("WATCHDOG=1"))
        .count();
    for w in &ws {
        unsafe { libc::kill(w.1, libc::SIGCONT) };
    }
    assert_eq!(during, 0, "watchdog pinged while no worker answered");
}

#[test]
fn ttin_ttou_scale_the_pool() {
    let srv = Server::start(Launch::default().args(&["--workers", "1"]));
    // Standard signals do not queue: two sent at once may arrive as one.
    for _ in 0..2 {
        srv.signal(libc::SIGTTIN);
        std::thread::sleep(Duration::from_millis(100));
    }
    let three = wait_until(Duration::from_secs(3), || {
        (srv.workers().iter().filter(|w| w.4 == "ready").count() == 3).then_some(())
    });
    assert!(three.is_some(), "{:?}", srv.workers());
    let cpus: Vec<u64> = srv.workers().iter().map(|w| w.2).collect();
    let n = ncpus() as u64;
    for (i, c) in cpus.iter().enumerate() {
        assert_eq!(*c, i as u64 % n, "round-robin CPU assignment");
    }
    for _ in 0..4 {
        srv.signal(libc::SIGTTOU);
        std::thread::sleep(Duration::from_millis(100));
    }
    let one = wait_until(Duration::from_secs(5), || {
        (srv.workers().len() == 1).then_some(())
    });
    assert!(one.is_some(), "never below one worker: {:?}", srv.workers());
    assert_eq!(get(srv.port, "/").unwrap().status, 200);
}

#[test]
fn chaos_under_load_loses_only_in_flight_requests() {
    let _heavy = common::heavy();
    let srv = Server::start(Launch::default());
    let target = srv.workers().len();
    let stop = Arc::new(AtomicBool::new(false));
    let clients_ka = 2;
    let clients_fresh = 2;
    let handles = load(srv.port, clients_ka, clients_fresh, stop.clone());
    let mut kills = 0;
    let mut recoveries = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1000));
        let ws = srv.workers();
        let victim = ws[fastrand::usize(..ws.len())].clone();
        let t = Instant::now();
        unsafe { libc::kill(victim.1, libc::SIGKILL) };
        kills += 1;
        let back = wait_until(Duration::from_secs(1), || {
            let ws = srv.workers();
            (ws.iter()
                .filter(|w| w.4 == "ready" && w.1 != victim.1)
                .count()
                == target)
                .then(|| t.elapsed())
        })
        .expect("pool not back to full size");
        recoveries.push(back);
    }
    stop.store(true, Ordering::Relaxed);
    let stats = join_load(handles);
    recoveries.sort();
    eprintln!(
        "FIGURES chaos: {kills} kills, {} ok, {} failed; back to full size median {:?} worst {:?}; errors {:?}",
        stats.ok,
        stats.failed,
        recoveries[recoveries.len() / 2],
        recoveries.last().unwrap(),
        stats.errors.iter().take(5).collect::<Vec<_>>()
    );
    // Each client has at most one request in flight; a kill can only fail those in flight
    // on the killed worker at that moment.
    let bound = (kills * (clients_ka + clients_fresh)) as u64;
    assert!(
        stats.failed <= bound,
        "{} failed > bound {bound}",
        stats.failed
    );
    assert!(stats.ok > 1000, "too little load: {}", stats.ok);
    assert!(
        *recoveries.last().unwrap() <= Duration::from_millis(100),
        "{recoveries:?}"
    );
}
