//! The drain protocol a load balancer understands: the readiness endpoint answered by the
//! worker layer (`[http] ready_path`), the `drain_delay` before a graceful stop, `app drain` /
//! `app undrain`, readiness only after `READY=1`, and HAProxy's agent-check on the socket
//! named `agent`. Everything is judged by HTTP statuses, agent answers, `app status --json`
//! and the notify socket, never by log text.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

const READY: &str = "/.well-known/ready";

fn program(name: &str) -> PathBuf {
    let p = Path::new(APP).parent().unwrap().join("examples").join(name);
    assert!(p.exists(), "example program {} not built", p.display());
    p
}

fn status_of(port: u16, path: &str) -> Option<(u16, String)> {
    get(port, path).ok().map(|r| (r.status, r.body))
}

/// One agent-check: connect, read everything until the agent closes (bounded).
fn try_agent(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn agent(port: u16) -> String {
    try_agent(port).expect("the agent socket did not answer")
}

/// The `app_ready` gauge of the metrics endpoint.
fn app_ready(port: u16) -> f64 {
    let r = get(port, "/metrics").unwrap();
    r.body
        .lines()
        .find_map(|l| l.strip_prefix("app_ready "))
        .and_then(|v| v.trim().parse().ok())
        .expect("no app_ready in the metrics")
}

fn readiness(srv: &Server) -> String {
    srv.report().readiness.as_str().to_string()
}

#[test]
fn stop_answers_503_on_the_ready_path_for_drain_delay_while_every_other_request_is_served() {
    let _heavy = common::heavy();
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::new(dir.path());
    let mut srv = Server::spawn(
        Launch {
            socket_activate: true,
            notify: Some(notify.path.clone()),
            dir: Some(dir),
            ..Default::default()
        }
        .args(&["--workers", "2", "--drain-delay", "2s"]),
    );
    // systemd-socket-activate starts the program on the first connection.
    srv.wait_serving();
    assert!(
        notify
            .wait_for("READY=1", Duration::from_secs(10))
            .is_some()
    );
    assert_eq!(status_of(srv.port, READY), Some((200, "ready\n".into())));
    let r = get(srv.port, READY).unwrap();
    assert_eq!(r.header("cache-control"), Some("no-store"));

    let stop = Arc::new(AtomicBool::new(false));
    let load = load(srv.port, 2, 1, stop.clone());
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    srv.signal(libc::SIGTERM);
    assert!(
        notify
            .wait_for("STOPPING=1", Duration::from_secs(2))
            .is_some()
    );
    // Within the delay: the probe says draining, everything else is served.
    let mut probes = 0;
    while t0.elapsed() < Duration::from_millis(1500) {
        assert_eq!(
            status_of(srv.port, READY),
            Some((503, "draining\n".into())),
            "at {:?}",
            t0.elapsed()
        );
        assert_eq!(status_of(srv.port, "/healthz").map(|r| r.0), Some(200));
        probes += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(probes >= 10);
    let s = srv.report();
    assert_eq!(s.readiness, app::Readiness::Draining);
    let drain = s.drain.expect("a drain under way");
    assert!(!drain.manual);
    let left = drain.stop_in_secs.expect("a stop waiting");
    assert!(left > 0.0 && left < 0.7, "stop_in_secs {left}");
    stop.store(true, Ordering::Relaxed);
    let stats = join_load(load);
    assert_eq!(
        stats.failed, 0,
        "failed during the drain delay: {:?}",
        stats.errors
    );
    assert!(stats.ok > 100, "only {} requests", stats.ok);
    // Then the stop itself, as before: a clean exit soon after the delay.
    let st = srv.wait_exit(Duration::from_secs(10)).expect("no exit");
    let took = t0.elapsed();
    assert!(st.success(), "{st:?}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
        "exited after {took:?}"
    );
}

#[test]
fn without_drain_delay_a_stop_is_immediate_and_a_second_signal_skips_the_delay() {
    let _heavy = common::heavy();
    let mut srv = Server::start(Launch::default().args(&["--workers", "1"]));
    let t0 = Instant::now();
    srv.signal(libc::SIGTERM);
    assert!(srv.wait_exit(Duration::from_secs(5)).unwrap().success());
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());

    let mut srv =
        Server::start(Launch::default().args(&["--workers", "1", "--drain-delay", "20s"]));
    srv.signal(libc::SIGTERM);
    let drained = wait_until(Duration::from_secs(2), || {
        (status_of(srv.port, READY)?.0 == 503).then_some(())
    });
    assert!(drained.is_some());
    let t0 = Instant::now();
    srv.signal(libc::SIGTERM);
    assert!(srv.wait_exit(Duration::from_secs(5)).unwrap().success());
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}

#[test]
fn readiness_answers_200_only_after_ready() {
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let mut notify = NotifySocket::new(dir.path());
    let srv = Server::spawn(
        Launch {
            socket_activate: true,
            notify: Some(notify.path.clone()),
            binary: Some(program("slow_start")),
            env: vec![("SLOW_START_GATE".into(), gate.to_str().unwrap().to_string())],
            dir: Some(dir),
            ..Default::default()
        }
        .args(&["--workers", "2"]),
    );
    // Worker 0 serves; worker 1 waits for the gate: the pool is not ready.
    let served = wait_until(Duration::from_secs(10), || {
        (status_of(srv.port, "/")?.0 == 200).then_some(())
    });
    assert!(served.is_some(), "log:\n{}", srv.log_text());
    for _ in 0..10 {
        assert_eq!(status_of(srv.port, READY), Some((503, "starting\n".into())));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(readiness(&srv), "starting");
    assert!(
        notify
            .wait_for("READY=1", Duration::from_millis(100))
            .is_none()
    );
    std::fs::write(&gate, b"").unwrap();
    assert!(
        notify
            .wait_for("READY=1", Duration::from_secs(10))
            .is_some()
    );
    let ready = wait_until(Duration::from_secs(2), || {
        (status_of(srv.port, READY)?.0 == 200).then_some(())
    });
    assert!(ready.is_some());
    assert_eq!(readiness(&srv), "ready");
}

#[test]
fn app_drain_and_undrain_and_a_reload_keeps_the_drain() {
    let _heavy = common::heavy();
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let mut srv = Server::start(Launch::default().args(&[
        "--workers",
        "2",
        "--drain-delay",
        "1s",
        "--metrics",
        &metrics,
    ]));
    assert_eq!(readiness(&srv), "ready");
    assert_eq!(app_ready(metrics_port), 1.0);
    let out = srv.client(&["drain"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(status_of(srv.port, READY).unwrap().0, 503);
    for _ in 0..20 {
        assert_eq!(status_of(srv.port, "/").unwrap().0, 200);
    }
    let s = srv.report();
    assert_eq!(s.readiness, app::Readiness::Draining);
    let drain = s.drain.expect("a drain under way");
    assert!(drain.manual);
    assert!(drain.stop_in_secs.is_none());
    assert_eq!(app_ready(metrics_port), 0.0);
    // A new generation is still drained.
    let out = srv.client(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(srv.report().generation, 2);
    assert_eq!(status_of(srv.port, READY).unwrap().0, 503);

    let out = srv.client(&["undrain"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(status_of(srv.port, READY), Some((200, "ready\n".into())));
    let s = srv.report();
    assert_eq!(s.readiness, app::Readiness::Ready);
    assert!(s.drain.is_none());
    assert_eq!(app_ready(metrics_port), 1.0);
    // Undraining what is not drained is harmless.
    assert!(srv.client(&["undrain"]).status.success());

    // Drained for longer than drain_delay already: a stop need not wait again.
    assert!(srv.client(&["drain"]).status.success());
    std::thread::sleep(Duration::from_millis(1100));
    let t0 = Instant::now();
    srv.signal(libc::SIGTERM);
    assert!(srv.wait_exit(Duration::from_secs(5)).unwrap().success());
    assert!(
        t0.elapsed() < Duration::from_millis(800),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn undrain_cannot_cancel_a_stop() {
    let srv = Server::start(Launch::default().args(&["--workers", "1", "--drain-delay", "5s"]));
    srv.signal(libc::SIGTERM);
    let drained = wait_until(Duration::from_secs(2), || {
        (status_of(srv.port, READY)?.0 == 503).then_some(())
    });
    assert!(drained.is_some());
    let out = srv.client(&["undrain"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let r = srv.control("{\"cmd\":\"reload\"}").unwrap();
    assert_eq!(r["ok"], false);
    assert_eq!(status_of(srv.port, READY).unwrap().0, 503);
}

#[test]
fn agent_check_answers_ready_drain_and_maint() {
    let dir = tempfile::tempdir().unwrap();
    let (mut srv, ports) = spawn_named_sockets(
        Path::new(APP),
        &["http", "agent"],
        &["--workers", "2", "--drain-delay", "3s"],
        dir,
    );
    srv.wait_serving();
    let agent_port = ports[1];
    assert_eq!(agent(agent_port), "ready\n");
    assert!(srv.client(&["drain"]).status.success());
    assert_eq!(agent(agent_port), "drain\n");
    assert!(srv.client(&["undrain"]).status.success());
    assert_eq!(agent(agent_port), "ready\n");
    // Probes are not traffic: the agent's connections are not requests.
    let before = srv.report().requests_total;
    for _ in 0..5 {
        agent(agent_port);
    }
    std::thread::sleep(Duration::from_millis(100));
    let after = srv.report().requests_total;
    assert_eq!(before, after);
    srv.signal(libc::SIGTERM);
    let drained = wait_until(Duration::from_secs(2), || {
        (agent(agent_port) == "drain\n").then_some(())
    });
    assert!(drained.is_some());
    srv.signal(libc::SIGQUIT);
    assert!(srv.wait_exit(Duration::from_secs(5)).is_some());
}

#[test]
fn agent_by_hand_with_a_flag_and_maint_while_starting() {
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let agent_port = free_port();
    let agent_addr = format!("127.0.0.1:{agent_port}");
    let srv = Server::spawn(
        Launch {
            binary: Some(program("slow_start")),
            env: vec![("SLOW_START_GATE".into(), gate.to_str().unwrap().to_string())],
            dir: Some(dir),
            ..Default::default()
        }
        .args(&["--workers", "2", "--agent", &agent_addr]),
    );
    let maint = wait_until(Duration::from_secs(10), || {
        (try_agent(agent_port)? == "maint\n").then_some(())
    });
    assert!(maint.is_some(), "log:\n{}", srv.log_text());
    std::fs::write(&gate, b"").unwrap();
    let ready = wait_until(Duration::from_secs(10), || {
        (agent(agent_port) == "ready\n").then_some(())
    });
    assert!(ready.is_some());
}

#[test]
fn ready_path_is_configurable_and_can_be_turned_off() {
    let srv = Server::with_config("workers = 1\n[http]\nready_path = \"/lb/ready\"\n", &[]);
    assert_eq!(
        status_of(srv.port, "/lb/ready"),
        Some((200, "ready\n".into()))
    );
    // The default path is the service's again (the demo has no such route).
    assert_eq!(status_of(srv.port, READY).unwrap().0, 404);
    drop(srv);

    let srv = Server::with_config("workers = 1\n[http]\nready_path = \"\"\n", &[]);
    assert_eq!(status_of(srv.port, READY).unwrap().0, 404);
    drop(srv);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.toml");
    for bad in ["\"ready\"", "\"/a?b\"", "\"/a b\""] {
        std::fs::write(&file, format!("[http]\nready_path = {bad}\n")).unwrap();
        let mut cmd = std::process::Command::new(APP);
        cmd.arg("check").arg("--config").arg(&file);
        let (code, err) = run_to_exit(cmd);
        assert_eq!(code, 78, "{bad}: {err}");
    }
    std::fs::write(&file, "drain_delay = \"25h\"\n").unwrap();
    let mut cmd = std::process::Command::new(APP);
    cmd.arg("check").arg("--config").arg(&file);
    assert_eq!(run_to_exit(cmd).0, 78);
}
