//! Operating the service as nginx, PM2 and gunicorn users expect: `app check` (nginx -t),
//! reloads that apply `workers`, runtime scaling that holds until the file changes it,
//! `app scale`, which build serves (`--version`, per worker and generation), CPU % and
//! requests/s per worker, `app status --watch`, and a failed reload shown until a good one.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// `app check --json` with `args` and extra environment: (exit code, JSON on stdout).
fn check(args: &[&str], env: &[(&str, &str)]) -> (i32, Value) {
    let mut cmd = Command::new(APP);
    cmd.arg("check").arg("--json").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.env_remove("APP_CONTROL_SOCKET").output().unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

#[test]
fn check_validates_and_shows_where_each_value_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.toml");
    let f = file.to_str().unwrap();
    std::fs::write(
        &file,
        "workers = 3\n[http]\nmax_headers = 50\n[service]\ngreeting = \"hi\"\n",
    )
    .unwrap();
    let (code, j) = check(
        &["--config", f, "--drain-timeout", "2s"],
        &[("APP_MAX_REQUESTS", "500")],
    );
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["ok"], true);
    let s = &j["settings"];
    let is = |key: &str, value: Value, source: &str| {
        assert_eq!(s[key]["value"], value, "{key}: {j}");
        assert_eq!(s[key]["source"], source, "{key}: {j}");
    };
    is("workers", 3.into(), "file");
    is("http.max_headers", 50.into(), "file");
    is("drain_timeout", "2s".into(), "flag");
    is("max_requests", 500.into(), "env");
    is("bind", "127.0.0.1:8080".into(), "default");
    is("shutdown_timeout", "30s".into(), "default");
    is("service", serde_json::json!({"greeting": "hi"}), "file");

    // A bad value, an unknown key, and a [service] table the program's settings type
    // refuses: exit 78 (EX_CONFIG), ok: false, naming the key.
    for (text, key) in [
        ("workers = 0\n", "workers"),
        ("wrokers = 3\n", "wrokers"),
        ("[service]\ngreeting = 3\n", "service"),
        ("[service]\nnope = 1\n", "nope"),
    ] {
        std::fs::write(&file, text).unwrap();
        let (code, j) = check(&["--config", f], &[]);
        assert_eq!(code, 78, "{text}: {j}");
        assert_eq!(j["ok"], false, "{text}");
        assert!(j["error"].as_str().unwrap().contains(key), "{text}: {j}");
    }

    // The shipped file is valid and sets nothing but the (empty) tables and drain_delay.
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/app.toml");
    let (code, j) = check(&["--config", shipped], &[]);
    assert_eq!(code, 0, "{j}");
    for (key, v) in j["settings"].as_object().unwrap() {
        if key == "drain_delay" {
            assert_eq!(v["source"], "file", "{key}: {v}");
        } else if key != "service" {
            assert_eq!(v["source"], "default", "{key}: {v}");
        }
    }
    // The table form exits the same way.
    let out = Command::new(APP)
        .args(["check", "--config", shipped])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}

fn reload(srv: &Server) -> (i32, String) {
    let out = srv.client(&["reload"]);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Waits until the pool is `n` ready workers of one generation, all serving.
fn wait_pool(srv: &Server, n: usize) -> app::StatusReport {
    wait_until(Duration::from_secs(10), || {
        let s = srv.report();
        (s.target_workers == n
            && s.serving_workers == n
            && s.workers.len() == n
            && s.workers.iter().all(|w| w.state == "ready"))
        .then_some(s)
    })
    .unwrap_or_else(|| panic!("pool never {n}: {:?}", srv.report()))
}

#[test]
fn reload_applies_workers_from_the_file() {
    let srv = Server::with_config("workers = 2\n", &[]);
    wait_pool(&srv, 2);
    std::fs::write(srv.config_path(), "workers = 3\n").unwrap();
    let (code, text) = reload(&srv);
    assert_eq!(code, 0, "{text}");
    let s = wait_pool(&srv, 3);
    assert_eq!(s.configured_workers, 3);
    assert_eq!(s.generation, 2);
    let last = s.last_reload.clone().unwrap();
    assert!(last.ok);
    assert_eq!(last.workers, 3);
    for w in &s.workers {
        assert_eq!(w.generation, 2, "{s:?}");
    }
    // And down again.
    std::fs::write(srv.config_path(), "workers = 1\n").unwrap();
    assert_eq!(reload(&srv).0, 0);
    wait_pool(&srv, 1);
    assert_eq!(get(srv.port, "/").unwrap().status, 200);
}

#[test]
fn runtime_scale_holds_until_a_reload_changes_workers() {
    let srv = Server::with_config("workers = 2\n", &[]);
    wait_pool(&srv, 2);
    srv.signal(libc::SIGTTIN);
    wait_pool(&srv, 3);
    // A reload that leaves `workers` alone keeps the scaled pool.
    std::fs::write(srv.config_path(), "workers = 2\ndrain_timeout = \"4s\"\n").unwrap();
    let (code, text) = reload(&srv);
    assert_eq!(code, 0, "{text}");
    let s = wait_pool(&srv, 3);
    assert_eq!(s.generation, 2);
    assert_eq!(s.configured_workers, 2);
    assert_eq!(s.last_reload.unwrap().workers, 3);
    // A reload that changes it applies the file.
    std::fs::write(srv.config_path(), "workers = 1\n").unwrap();
    let (code, text) = reload(&srv);
    assert_eq!(code, 0, "{text}");
    let s = wait_pool(&srv, 1);
    assert_eq!(s.generation, 3);
    assert_eq!(s.configured_workers, 1);
}

#[test]
fn scale_command_resizes_the_pool() {
    let srv = Server::start(Launch::default().args(&["--workers", "2"]));
    let code = |args: &[&str]| srv.client(args).status.code();
    assert_eq!(code(&["scale", "+1"]), Some(0));
    wait_pool(&srv, 3);
    assert_eq!(code(&["scale", "2"]), Some(0));
    wait_pool(&srv, 2);
    assert_eq!(code(&["scale", "-1"]), Some(0));
    let s = wait_pool(&srv, 1);
    assert_eq!(s.configured_workers, 2);
    // Refused by the master: the pool stays as it is.
    assert_eq!(code(&["scale", "0"]), Some(1));
    assert_eq!(code(&["scale", "-5"]), Some(1));
    assert_eq!(code(&["scale", "99999"]), Some(1));
    // Refused by the command line.
    assert_eq!(code(&["scale", "many"]), Some(64));
    assert_eq!(srv.report().target_workers, 1);
    // A reload that does not change `workers` keeps it.
    assert_eq!(srv.client(&["reload"]).status.code(), Some(0));
    wait_pool(&srv, 1);
}

/// `app --version`: "app <crate version> (commit <12 hex digits or unknown>, built <time>)".
fn version() -> String {
    let out = Command::new(APP).arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    text.trim().strip_prefix("app ").unwrap().to_string()
}

#[test]
fn version_names_the_commit_or_unknown() {
    let v = version();
    assert!(v.starts_with(env!("CARGO_PKG_VERSION")), "{v}");
    let commit = v
        .split("(commit ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or_else(|| panic!("no commit in {v:?}"));
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{v}"
    );
    assert!(v.contains(", built "), "{v}");
    // Built from a git checkout, it is the checked-out commit.
    let head = Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short=12",
            "HEAD",
        ])
        .output();
    if let Some(h) = head.ok().filter(|h| h.status.success()) {
        assert_eq!(commit, String::from_utf8_lossy(&h.stdout).trim(), "{v}");
    }
}

#[test]
fn status_shows_versions_cpu_and_request_rates_under_load() {
    let _heavy = common::heavy();
    let srv =
        Server::start(Launch::default().args(&["--workers", "2", "--heartbeat-interval", "250ms"]));
    let v = version();
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let h = load(srv.port, 2, 0, stop.clone());
    std::thread::sleep(Duration::from_millis(2500));
    let s = srv.report();
    stop.store(true, Ordering::Relaxed);
    let stats = join_load(h);
    let measured = stats.ok as f64 / t0.elapsed().as_secs_f64();
    assert_eq!(s.version, v);
    assert_eq!(s.generations.len(), 1, "{s:?}");
    assert_eq!(s.generations[0].version.as_deref(), Some(v.as_str()));
    assert_eq!(s.generations[0].workers, 2);
    let mut cpu = Vec::new();
    let mut rps = 0.0;
    for w in &s.workers {
        assert_eq!(w.version.as_deref(), Some(v.as_str()), "{w:?}");
        let c = w.cpu_percent;
        // Each worker is one thread pinned to one CPU.
        assert!((0.0..=110.0).contains(&c), "{w:?}");
        cpu.push(c);
        rps += w.requests_per_sec;
    }
    eprintln!(
        "FIGURES status under load: cpu% {cpu:?}, requests/s by status {rps:.0}, by the clients {measured:.0}"
    );
    assert!(cpu.iter().sum::<f64>() > 5.0, "{s:?}");
    assert!(
        rps > measured * 0.3 && rps < measured * 3.0,
        "status says {rps:.0} req/s, clients measured {measured:.0}: {s:?}"
    );
    // Idle again, the rates fall to zero (they are rates, not totals).
    let idle = wait_until(Duration::from_secs(5), || {
        srv.report()
            .workers
            .iter()
            .all(|w| w.requests_per_sec == 0.0 && w.cpu_percent < 5.0)
            .then_some(())
    });
    assert!(idle.is_some(), "{:?}", srv.report());
}

#[test]
fn failed_reload_is_shown_until_a_reload_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::new(dir.path());
    let file = dir.path().join("app.toml");
    std::fs::write(&file, "workers = 1\n").unwrap();
    let f = file.to_str().unwrap().to_string();
    let srv = Server::start(
        Launch {
            notify: Some(notify.path.clone()),
            dir: Some(dir),
            ..Default::default()
        }
        .args(&["--config", &f]),
    );
    notify.wait_for("READY=1", Duration::from_secs(5)).unwrap();
    std::fs::write(&file, "workers = 0\n").unwrap();
    let (code, _) = reload(&srv);
    assert_eq!(code, 1);
    notify.clear();
    // Still said a while later, in `app status` and in STATUS= (systemctl status).
    std::thread::sleep(Duration::from_millis(300));
    let s = srv.report();
    assert!(!s.last_reload.as_ref().unwrap().ok, "{s:?}");
    assert_eq!(s.state, "serving");
    srv.signal(libc::SIGTTIN); // any change makes the master send a fresh STATUS=
    let status = notify
        .wait_for("STATUS=", Duration::from_secs(3))
        .expect("a STATUS= update");
    assert!(status.contains("last reload failed"), "{status}");
    // Fixed: the next reload succeeds and the failure is gone.
    std::fs::write(&file, "workers = 1\n").unwrap();
    let (code, text) = reload(&srv);
    assert_eq!(code, 0, "{text}");
    let s = srv.report();
    assert!(s.last_reload.as_ref().unwrap().ok, "{s:?}");
    notify.clear();
    srv.signal(libc::SIGTTIN);
    let status = notify
        .wait_for("STATUS=", Duration::from_secs(3))
        .expect("a STATUS= update");
    assert!(!status.contains("failed"), "{status}");
}

#[test]
fn restart_only_keys_are_named_and_the_rest_applies() {
    let srv = Server::with_config("accept = \"shared\"\nworkers = 1\n", &[]);
    std::fs::write(srv.config_path(), "accept = \"round-robin\"\nworkers = 2\n").unwrap();
    let (code, text) = reload(&srv);
    assert_eq!(code, 0, "{text}");
    let s = wait_pool(&srv, 2);
    assert_eq!(s.restart_needed.len(), 1, "{s:?}");
    assert!(s.restart_needed[0].starts_with("accept"), "{s:?}");
    assert_eq!(
        s.last_reload.as_ref().unwrap().restart_needed,
        s.restart_needed
    );
    assert_eq!(s.master_connection_cap, 0, "still shared: {s:?}");
    // Put back, the next reload clears it.
    std::fs::write(srv.config_path(), "accept = \"shared\"\nworkers = 2\n").unwrap();
    assert_eq!(reload(&srv).0, 0);
    assert!(srv.report().restart_needed.is_empty());
}

#[test]
fn status_watch_repeats_until_stopped() {
    let _heavy = common::heavy();
    let srv = Server::start(Launch::default().args(&["--workers", "1"]));
    let mut child = Command::new(APP)
        .args([
            "status",
            "--watch",
            "--interval",
            "200ms",
            "--json",
            "--control-socket",
        ])
        .arg(&srv.control)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let t0 = Instant::now();
    for _ in 0..3 {
        let line = lines.next().unwrap().unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["master_pid"], srv.pid());
    }
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(350), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Ctrl-C ends it.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let st = wait_until(Duration::from_secs(2), || child.try_wait().ok().flatten());
    assert!(st.is_some(), "still running after SIGINT");
}
