//! The spine: socket activation, readiness, pinning, orphan safety, graceful stop, and the
//! errors a bad configuration or a bad socket-activation environment produce.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn socket_activation_serves_and_ready_follows_all_workers() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::new(dir.path());
    let workers = ncpus() + 1; // one more than CPUs: round-robin sharing is exercised too
    let srv = Server::spawn(
        Launch {
            socket_activate: true,
            notify: Some(notify.path.clone()),
            dir: Some(dir),
            ..Default::default()
        }
        .args(&["--workers", &workers.to_string()]),
    );
    // systemd-socket-activate execs the service on the first connection.
    let resp = wait_until(Duration::from_secs(10), || get(srv.port, "/").ok()).expect("no answer");
    assert_eq!(resp.status, 200);
    let worker: usize = resp.header("x-worker").unwrap().parse().unwrap();
    assert!(worker < workers);
    assert_eq!(resp.body, format!("hello from worker {worker}\n"));

    let ready = notify
        .wait_for("READY=1", Duration::from_secs(10))
        .expect("READY=1");
    // READY=1 came with the live status line saying every worker serves...
    assert!(
        ready.contains(&format!("STATUS={workers}/{workers} workers serving")),
        "{ready}"
    );
    // ...and every STATUS before it showed fewer.
    let before: Vec<_> = notify
        .messages
        .iter()
        .take_while(|(_, m)| !m.contains("READY=1"))
        .collect();
    assert!(
        before
            .iter()
            .all(|(_, m)| !m.contains(&format!("{workers}/{workers}")))
    );
    // The master's own view agrees: every worker reported ready over IPC.
    let status = srv.report();
    assert_eq!(status.serving_workers, workers);
    // The socket systemd passed (not one the master bound: `--bind` is not given here).
    assert_eq!(status.listeners.len(), 1, "{:?}", status.listeners);
    assert!(
        status.listeners[0].contains(&format!("127.0.0.1:{}", srv.port)),
        "{:?}",
        status.listeners
    );

    srv.signal(libc::SIGTERM);
    let stop = notify.wait_for("STOPPING=1", Duration::from_secs(5));
    assert!(stop.is_some(), "no STOPPING=1: {:?}", notify.messages);
}

#[test]
fn workers_are_pinned_one_cpu_each() {
    let n = ncpus();
    let srv = Server::start(Launch::default());
    let ws = srv.workers();
    assert_eq!(ws.len(), n, "default worker count is the allowed CPUs");
    let mut seen = Vec::new();
    for (slot, pid, cpu, _, _) in &ws {
        let allowed = cpus_allowed(*pid);
        assert_eq!(allowed, cpu.to_string(), "worker {slot} pid {pid}");
        seen.push(*cpu);
        // Workers must not inherit what only the master may use.
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let env = String::from_utf8_lossy(&env);
        for var in ["LISTEN_FDS", "LISTEN_PID", "NOTIFY_SOCKET", "WATCHDOG_USEC"] {
            assert!(
                !env.contains(&format!("{var}=")),
                "worker {slot} inherited {var}"
            );
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), n, "each worker on a distinct CPU");
}

#[test]
fn affinity_restricted_master_respects_its_cpuset() {
    let _heavy = common::heavy();
    // As under CPUAffinity= or a cgroup cpuset: only CPU 0 allowed.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cmd = Command::new("taskset");
    cmd.args([
        "-c",
        "0",
        APP,
        "serve",
        "--bind",
        &format!("127.0.0.1:{port}"),
    ])
    .env("APP_CONTROL_SOCKET", dir.path().join("c.sock"))
    .stderr(std::process::Stdio::null())
    .process_group(0);
    let mut child = cmd.spawn().unwrap();
    let ws = wait_until(Duration::from_secs(5), || {
        let kids = children(child.id() as i32);
        (!kids.is_empty() && get(port, "/healthz").is_ok()).then_some(kids)
    })
    .expect("serving");
    assert_eq!(ws.len(), 1, "one allowed CPU, one worker");
    assert_eq!(cpus_allowed(ws[0]), "0");
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.wait();
}

#[test]
fn killing_the_master_leaves_no_worker() {
    let srv = Server::start(Launch::default());
    let workers: Vec<i32> = srv.workers().iter().map(|w| w.1).collect();
    assert!(!workers.is_empty());
    unsafe { libc::kill(srv.pid(), libc::SIGKILL) };
    let t0 = Instant::now();
    let gone = wait_until(Duration::from_secs(1), || {
        workers.iter().all(|p| !alive(*p)).then_some(())
    });
    assert!(gone.is_some(), "workers outlived the master: {workers:?}");
    eprintln!("workers gone {:?} after the master's SIGKILL", t0.elapsed());
    // And nobody holds the port any more.
    assert!(get(srv.port, "/").is_err());
}

#[test]
fn sigterm_lets_a_slow_request_finish() {
    let mut srv = Server::start(Launch::default());
    let port = srv.port;
    let slow = std::thread::spawn(move || get(port, "/sleep?ms=1500"));
    std::thread::sleep(Duration::from_millis(300));
    srv.signal(libc::SIGTERM);
    let resp = slow.join().unwrap().expect("slow request cut by SIGTERM");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, "slept 1500ms\n");
    let status = srv
        .wait_exit(Duration::from_secs(10))
        .expect("master did not exit");
    assert_eq!(status.code(), Some(0));
    // Once stopping, no new connections are served.
    assert!(get(port, "/").is_err());
}

#[test]
fn shutdown_timeout_cuts_what_overruns() {
    let _heavy = common::heavy();
    let mut srv = Server::start(Launch::default().args(&["--shutdown-timeout", "300ms"]));
    let port = srv.port;
    let slow = std::thread::spawn(move || get(port, "/sleep?ms=5000"));
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    srv.signal(libc::SIGTERM);
    let status = srv
        .wait_exit(Duration::from_secs(5))
        .expect("master did not exit");
    assert_eq!(status.code(), Some(0));
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t0.elapsed()
    );
    assert!(
        slow.join().unwrap().is_err(),
        "a 5 s request cannot finish in a 300 ms grace"
    );
}

fn serve_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(APP);
    c.arg("serve").args(args);
    c
}

#[test]
fn bad_config_values_exit_78_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = run_to_exit(serve_cmd(&["--workers", "0"]));
    assert_eq!(code, 78, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("workers: must be between 1 and 1024 (got 0)"),
        "{err}"
    );

    let file = dir.path().join("app.toml");
    std::fs::write(&file, "workers = 2\nheartbeat_intervl = \"1s\"\n").unwrap();
    let (code, err) = run_to_exit(serve_cmd(&["--config", file.to_str().unwrap()]));
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("line 2") && err.contains("heartbeat_intervl"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    std::fs::write(&file, "drain_timeout = \"forever\"\n").unwrap();
    let (code, err) = run_to_exit(serve_cmd(&["--config", file.to_str().unwrap()]));
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("drain_timeout: invalid duration \"forever\""),
        "{err}"
    );

    std::fs::write(&file, "this is [not toml\n").unwrap();
    let (code, err) = run_to_exit(serve_cmd(&["--config", file.to_str().unwrap()]));
    assert_eq!(code, 78, "{err}");

    let (code, err) = run_to_exit(serve_cmd(&["--config", "/nonexistent/app.toml"]));
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("cannot read /nonexistent/app.toml"), "{err}");

    let mut env = serve_cmd(&[]);
    env.env("APP_LOG_LEVEL", "loud=[");
    let (code, err) = run_to_exit(env);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("log_level"), "{err}");
}

#[test]
fn unparsable_flags_exit_64_in_one_line() {
    let (code, err) = run_to_exit(serve_cmd(&["--workers", "many"]));
    assert_eq!(code, 64, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--workers"), "{err}");
    let mut env = serve_cmd(&[]);
    env.env("APP_DRAIN_TIMEOUT", "5 parsecs");
    let (code, err) = run_to_exit(env);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("drain-timeout"), "{err}");
    let (code, _) = run_to_exit(serve_cmd(&["--no-such-flag"]));
    assert_eq!(code, 64);
}

/// Runs the service through `sh`, which sets up fds and LISTEN_PID=$$ before exec, so the
/// variables describe exactly the process that reads them.
fn activated(script: &str) -> (i32, String) {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("{script}; exec {APP} serve --bind 127.0.0.1:0"));
    run_to_exit(c)
}

#[test]
fn bad_listen_fds_get_one_clear_line_and_exit_78() {
    let cases: &[(&str, &str)] = &[
        (
            "export LISTEN_FDS=abc LISTEN_PID=$$",
            "LISTEN_FDS=\"abc\" is not a number",
        ),
        (
            "export LISTEN_FDS=1 LISTEN_PID=1",
            "LISTEN_PID=1 but this process is",
        ),
        (
            "export LISTEN_FDS=1",
            "LISTEN_FDS is set but LISTEN_PID is not",
        ),
        ("export LISTEN_FDS=0 LISTEN_PID=$$", "LISTEN_FDS=0"),
        (
            "exec 3</etc/hostname; export LISTEN_FDS=1 LISTEN_PID=$$",
            "fd 3 (unknown): is a regular file",
        ),
        (
            "exec 3<&-; export LISTEN_FDS=1 LISTEN_PID=$$",
            "fd 3 (unknown): is not an open descriptor",
        ),
        (
            "exec 3</etc/hostname 4</etc/hostname; export LISTEN_FDS=2 LISTEN_PID=$$ LISTEN_FDNAMES=http",
            "LISTEN_FDNAMES=\"http\" names 1 socket(s) but LISTEN_FDS=2",
        ),
    ];
    for (script, expected) in cases {
        let (code, err) = activated(script);
        assert_eq!(code, 78, "{script}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{script}: {err}");
        assert!(err.contains("socket activation error"), "{script}: {err}");
        assert!(
            err.contains(expected),
            "{script}: expected {expected:?} in {err}"
        );
    }
}

#[test]
fn udp_socket_from_systemd_socket_activate_is_refused() {
    let port = free_port();
    let mut c = Command::new("systemd-socket-activate");
    c.args([
        "--datagram",
        "-l",
        &format!("127.0.0.1:{port}"),
        APP,
        "serve",
    ])
    .stderr(std::process::Stdio::piped())
    .stdout(std::process::Stdio::null());
    let child = c.spawn().unwrap();
    // A datagram triggers activation.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let out = {
        let start = Instant::now();
        loop {
            let _ = udp.send_to(b"x", ("127.0.0.1", port));
            std::thread::sleep(Duration::from_millis(50));
            if start.elapsed() > Duration::from_secs(1) {
                break;
            }
        }
        child.wait_with_output().unwrap()
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("is a datagram (UDP) socket, expected a listening stream socket"),
        "{err}"
    );
}

#[test]
fn port_in_use_exits_71() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, err) = run_to_exit(serve_cmd(&["--bind", &addr]));
    assert_eq!(code, 71, "{err}");
    assert!(err.contains(&format!("cannot bind {addr}")), "{err}");
}

#[test]
fn serve_to_ready_time_and_idle_memory_are_reported() {
    // Not a timed assertion: the figures go to the test log for the closing note and README.
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::new(dir.path());
    let t0 = Instant::now();
    let srv = Server::spawn(Launch {
        notify: Some(notify.path.clone()),
        dir: Some(dir),
        ..Default::default()
    });
    notify
        .wait_for("READY=1", Duration::from_secs(10))
        .expect("READY=1");
    let ready = t0.elapsed();
    std::thread::sleep(Duration::from_millis(1500));
    let rss: Vec<u64> = srv.report().workers.iter().map(|w| w.rss_bytes).collect();
    let master_rss = std::fs::read_to_string(format!("/proc/{}/status", srv.pid()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap()
        .to_string();
    eprintln!("FIGURES serve→READY=1 {ready:?}; master {master_rss}; worker RSS bytes {rss:?}");
    assert!(rss.iter().all(|r| *r > 0));
}
