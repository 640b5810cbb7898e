//! Accept strategies: `shared` (every worker accepts on the inherited socket) and
//! `round-robin` (the master accepts and hands connections over with SCM_RIGHTS), including
//! the case Node and PM2 get wrong: a connection handed to a worker that dies before taking
//! it must reach another worker.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

fn jain(counts: &[u64]) -> f64 {
    let sum: f64 = counts.iter().map(|&c| c as f64).sum();
    let sq: f64 = counts.iter().map(|&c| (c as f64).powi(2)).sum();
    sum * sum / (counts.len() as f64 * sq)
}

#[test]
fn round_robin_spreads_connections_evenly() {
    let _heavy = common::heavy();
    let srv = Server::start(Launch::default().args(&["--accept", "round-robin", "--workers", "2"]));
    let mut counts = [0u64; 2];
    for _ in 0..200 {
        let r = get(srv.port, "/").unwrap();
        assert_eq!(r.status, 200);
        counts[r.header("x-worker").unwrap().parse::<usize>().unwrap()] += 1;
    }
    let j = jain(&counts);
    eprintln!("FIGURES round-robin, 200 sequential connections: {counts:?}, Jain {j:.3}");
    assert!(j > 0.99, "{counts:?}");
    // Workers hold no listening socket in this mode; the master does.
    let listen_inode = std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .find(|l| l.contains(&format!(":{:04X} 00000000:0000 0A", srv.port)))
        .map(|l| l.split_whitespace().nth(9).unwrap().to_string())
        .expect("listening socket in /proc/net/tcp");
    let holds = |pid: i32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .any(|p| p.display().to_string() == format!("socket:[{listen_inode}]"))
    };
    assert!(holds(srv.pid()));
    for w in srv.workers() {
        assert!(!holds(w.1), "worker {} holds the listening socket", w.1);
    }
}

#[test]
fn handed_over_connections_survive_a_worker_that_dies_before_taking_them() {
    let _heavy = common::heavy();
    let srv = Server::start(Launch::default().args(&["--accept", "round-robin", "--workers", "2"]));
    let ws = srv.workers();
    let victim = ws[0].1;
    // A stopped worker cannot take what it is handed.
    unsafe { libc::kill(victim, libc::SIGSTOP) };
    let port = srv.port;
    let clients: Vec<_> = (0..6)
        .map(|_| {
            std::thread::spawn(move || {
                let t = Instant::now();
                (get(port, "/"), t.elapsed())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    unsafe { libc::kill(victim, libc::SIGKILL) };
    for c in clients {
        let (r, took) = c.join().unwrap();
        let r = r.expect("a connection handed to the dying worker was lost");
        assert_eq!(r.status, 200, "after {took:?}");
    }
    assert!(
        srv.log_text()
            .contains("never took are handed to another worker"),
        "{}",
        srv.log_text()
    );
}

#[test]
fn round_robin_chaos_under_load_loses_only_in_flight_requests() {
    let _heavy = common::heavy();
    let srv = Server::start(Launch::default().args(&["--accept", "round-robin"]));
    let stop = Arc::new(AtomicBool::new(false));
    let handles = load(srv.port, 2, 2, stop.clone());
    let mut kills = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(500));
        let ws = srv.workers();
        let victim = ws[fastrand::usize(..ws.len())].1;
        unsafe { libc::kill(victim, libc::SIGKILL) };
        kills += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let stats = join_load(handles);
    eprintln!(
        "FIGURES round-robin chaos: {kills} kills, {} ok, {} failed",
        stats.ok, stats.failed
    );
    assert!(
        stats.failed <= (kills * 4) as u64,
        "{} failed",
        stats.failed
    );
    assert!(stats.ok > 500);
}

#[test]
fn round_robin_reload_fails_no_request() {
    let _heavy = common::heavy();
    let srv = Server::start(Launch::default().args(&["--accept", "round-robin"]));
    let stop = Arc::new(AtomicBool::new(false));
    let handles = load(srv.port, 2, 2, stop.clone());
    for _ in 0..5 {
        let out = srv.client(&["reload"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stop.store(true, Ordering::Relaxed);
    let stats = join_load(handles);
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    assert!(stats.ok > 100);
}

#[test]
fn accept_strategy_change_on_reload_waits_for_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.toml");
    std::fs::write(&file, "accept = \"shared\"\n").unwrap();
    let f = file.to_str().unwrap().to_string();
    let srv = Server::start(
        Launch {
            dir: Some(dir),
            ..Default::default()
        }
        .args(&["--config", &f]),
    );
    std::fs::write(&file, "accept = \"round-robin\"\n").unwrap();
    // The reload applies everything else, keeps the running strategy and names the key
    // that needs a restart.
    let out = srv.client(&["reload"]);
    assert!(out.status.success());
    let s = srv.report();
    assert!(s.restart_needed[0].starts_with("accept"), "{s:?}");
    assert_eq!(s.master_connection_cap, 0, "still shared: {s:?}");
}

#[test]
fn shared_accept_spreads_a_burst_of_keepalive_connections() {
    let _heavy = common::heavy();
    let srv = Server::start(Launch::default().args(&["--workers", "2"]));
    // A burst, as a benchmark or a reconnecting proxy opens them: all at once.
    let mut conns: Vec<Conn> = (0..64).map(|_| Conn::open(srv.port).unwrap()).collect();
    let mut counts = [0u64; 2];
    for c in &mut conns {
        let r = c.get("/").unwrap();
        counts[r.header("x-worker").unwrap().parse::<usize>().unwrap()] += 1;
    }
    let j = jain(&counts);
    eprintln!("FIGURES shared accept, burst of 64 keep-alive connections: {counts:?}, Jain {j:.3}");
    assert!(j >= 0.9, "{counts:?}");
}
