//! Graceful rollover: reloads under load with zero failed requests, failures that keep the
//! service, coalescing, settings reaching workers, and the control socket's CLI and guard.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

fn reload(srv: &Server) -> (bool, String) {
    let out = srv.client(&["reload"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn twenty_reloads_under_load_fail_no_request() {
    let _heavy = common::heavy();
    let srv = Server::start(Launch::default());
    let stop = Arc::new(AtomicBool::new(false));
    let handles = load(srv.port, 3, 3, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let mut durations = Vec::new();
    for i in 0..20 {
        let before: Vec<i32> = srv.workers().iter().map(|w| w.1).collect();
        let t0 = Instant::now();
        let (ok, text) = reload(&srv);
        durations.push(t0.elapsed());
        assert!(ok, "reload {i} failed: {text}");
        // `app reload` returns only when the old generation is gone.
        for pid in &before {
            assert!(!alive(*pid), "reload {i}: old worker {pid} still alive");
        }
        let ws = srv.workers();
        assert!(ws.iter().all(|w| w.3 == i + 2), "reload {i}: {ws:?}");
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let stats = join_load(handles);
    durations.sort();
    eprintln!(
        "FIGURES 20 reloads under load: {} ok, {} failed; reload duration median {:?} worst {:?}",
        stats.ok,
        stats.failed,
        durations[durations.len() / 2],
        durations.last().unwrap()
    );
    assert_eq!(stats.failed, 0, "failed requests: {:?}", stats.errors);
    assert!(stats.ok > 1000, "too little load: {}", stats.ok);
    assert_eq!(srv.report().generation, 21);
}

#[test]
fn reload_with_idle_workers_is_quick_and_notifies_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::new(dir.path());
    let srv = Server::start(Launch {
        notify: Some(notify.path.clone()),
        dir: Some(dir),
        ..Default::default()
    });
    notify.wait_for("READY=1", Duration::from_secs(5)).unwrap();
    notify.clear();
    srv.signal(libc::SIGHUP);
    let reloading = notify
        .wait_for("RELOADING=1", Duration::from_secs(5))
        .expect("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let t0 = Instant::now();
    let ready = notify
        .wait_for("READY=1", Duration::from_secs(5))
        .expect("READY=1 after reload");
    eprintln!(
        "FIGURES idle reload RELOADING=1 → READY=1 {:?}",
        t0.elapsed()
    );
    assert!(ready.contains("generation 2"), "{ready}");
}

#[test]
fn broken_config_keeps_the_old_generation() {
    let srv = Server::with_config("[service]\ngreeting = \"hi\"\n", &[]);
    let pids: Vec<i32> = srv.workers().iter().map(|w| w.1).collect();
    std::fs::write(
        srv.config_path(),
        "[service]\ngreeting = \"hey\"\nbogus = 1\n",
    )
    .unwrap();
    let (ok, text) = reload(&srv);
    assert!(!ok, "reload with a broken config succeeded: {text}");
    assert!(
        text.contains("reload failed") && text.contains("bogus"),
        "{text}"
    );
    let out = srv.client(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    // Same workers, same greeting, still serving.
    let now: Vec<i32> = srv.workers().iter().map(|w| w.1).collect();
    assert_eq!(pids, now);
    assert!(
        get(srv.port, "/")
            .unwrap()
            .body
            .starts_with("hi from worker")
    );
    let s = srv.report();
    assert!(!s.last_reload.unwrap().ok);
    assert_eq!(s.state, "serving");
    // Fixed, it goes through, and the new greeting reaches the new workers.
    std::fs::write(srv.config_path(), "[service]\ngreeting = \"hey\"\n").unwrap();
    let (ok, text) = reload(&srv);
    assert!(ok, "{text}");
    assert!(
        get(srv.port, "/")
            .unwrap()
            .body
            .starts_with("hey from worker")
    );
}

#[test]
fn invalid_value_on_reload_names_the_key() {
    let srv = Server::with_config("drain_timeout = \"2s\"\n", &[]);
    std::fs::write(srv.config_path(), "drain_timeout = \"0s\"\n").unwrap();
    let (ok, text) = reload(&srv);
    assert!(!ok);
    assert!(
        text.contains("drain_timeout: must be greater than zero"),
        "{text}"
    );
}

/// Copies the binary somewhere the test may replace it.
fn private_binary(dir: &Path) -> std::path::PathBuf {
    let bin = dir.join("app");
    std::fs::copy(APP, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

fn replace_binary(bin: &Path, with: &Path) {
    // Like a package manager: write beside, rename over.
    let tmp = bin.with_extension("new");
    std::fs::copy(with, &tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, bin).unwrap();
}

#[test]
fn binary_that_exits_at_start_fails_the_reload_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let bin = private_binary(dir.path());
    let srv = Server::start(Launch {
        binary: Some(bin.clone()),
        dir: Some(dir),
        ..Default::default()
    });
    let pids: Vec<i32> = srv.workers().iter().map(|w| w.1).collect();
    replace_binary(&bin, Path::new("/bin/false"));
    let (ok, text) = reload(&srv);
    assert!(!ok, "{text}");
    assert!(text.contains("exited while starting"), "{text}");
    let now: Vec<i32> = srv
        .workers()
        .iter()
        .filter(|w| w.4 == "ready")
        .map(|w| w.1)
        .collect();
    assert_eq!(pids, now);
    assert_eq!(get(srv.port, "/").unwrap().status, 200);
    // A crash in the serving generation is replaced from that generation's binary, not the
    // broken one now on disk.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    assert!(
        srv.wait_replaced_all(pids[0], pids.len(), Duration::from_secs(3)),
        "{:?}\n{}",
        srv.workers(),
        srv.log_text()
    );
    // Installing a good binary again makes the next reload succeed.
    replace_binary(&bin, Path::new(APP));
    let (ok, text) = reload(&srv);
    assert!(ok, "{text}");
    // Generation 2 was the failed one; numbers are never reused.
    assert_eq!(srv.report().generation, 3);
}

#[test]
fn back_to_back_reloads_coalesce() {
    let srv = Server::start(Launch::default());
    // A slow request keeps the first rollover draining for about a second, so the other
    // requests certainly arrive while it runs.
    let port = srv.port;
    let slow = std::thread::spawn(move || get(port, "/sleep?ms=1000"));
    std::thread::sleep(Duration::from_millis(100));
    let control = srv.control.clone();
    let reload = move || {
        std::process::Command::new(APP)
            .args(["reload", "--control-socket"])
            .arg(&control)
            .output()
            .unwrap()
    };
    let first = std::thread::spawn(reload.clone());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(srv.report().state, "reloading");
    let rest: Vec<_> = (0..5).map(|_| std::thread::spawn(reload.clone())).collect();
    for c in std::iter::once(first).chain(rest) {
        let out = c.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(slow.join().unwrap().unwrap().status, 200);
    // The running rollover (generation 2) plus one follow-up for all five queued requests.
    assert_eq!(srv.report().generation, 3);
    let ws = srv.workers();
    assert!(ws.iter().all(|w| w.3 == 3), "{ws:?}");
    assert!(
        srv.log_text()
            .contains("running the 5 queued request(s) as one follow-up"),
        "{}",
        srv.log_text()
    );
}

#[test]
fn keepalive_clients_get_connection_close_during_drain() {
    let _heavy = common::heavy();
    let srv = Server::start(Launch::default().args(&["--workers", "1"]));
    let mut c = Conn::open(srv.port).unwrap();
    assert_eq!(c.get("/").unwrap().status, 200);
    assert!(!c.closed);
    let port = srv.port;
    let slow = std::thread::spawn(move || {
        let mut c2 = Conn::open(port).unwrap();
        let r = c2.get("/sleep?ms=800").unwrap();
        (r, c2.closed)
    });
    std::thread::sleep(Duration::from_millis(100));
    let reloader = {
        let control = srv.control.clone();
        std::thread::spawn(move || {
            std::process::Command::new(APP)
                .args(["reload", "--control-socket"])
                .arg(&control)
                .status()
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(150));
    // The idle keep-alive connection still belongs to the old worker, which now drains: its
    // next answer is a success that says Connection: close.
    let r = c
        .get("/")
        .expect("request on a draining keep-alive connection failed");
    assert_eq!(r.status, 200);
    assert!(c.closed, "no Connection: close from a draining worker");
    let (r, closed) = slow.join().unwrap();
    assert_eq!(r.status, 200);
    assert!(closed);
    assert!(reloader.join().unwrap().success());
}

#[test]
fn status_shows_the_pool_as_table_and_json() {
    let srv = Server::start(Launch::default().args(&["--workers", "2"]));
    for _ in 0..10 {
        get(srv.port, "/").unwrap();
    }
    std::thread::sleep(Duration::from_millis(1200)); // a heartbeat brings the counts
    let out = srv.client(&["status"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("state serving") && table.contains("generation 1"),
        "{table}"
    );
    for col in [
        "ID", "PID", "CPU", "STATE", "UPTIME", "REQUESTS", "RSS", "PSS", "RESTARTS",
    ] {
        assert!(table.contains(col), "{col} missing:\n{table}");
    }
    assert_eq!(
        table.lines().filter(|l| l.contains(" ready ")).count(),
        2,
        "{table}"
    );

    let out = srv.client(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["workers"].as_array().unwrap().len(), 2);
    let total: u64 = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["requests"].as_u64().unwrap())
        .sum();
    assert!(total >= 10, "{v}");
    for key in [
        "id",
        "pid",
        "cpu",
        "state",
        "uptime_secs",
        "requests",
        "rss_bytes",
        "restarts",
    ] {
        assert!(v["workers"][0].get(key).is_some(), "{key} missing: {v}");
    }
}

#[test]
fn control_socket_is_private_and_checks_the_peer() {
    let srv = Server::start(Launch::default());
    let meta = std::fs::metadata(&srv.control).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // Garbage and silence get an error or a timeout; the master keeps going.
    let r = srv.control("not json").unwrap();
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("bad request"));
    {
        use std::io::Read;
        let mut s = std::os::unix::net::UnixStream::connect(&srv.control).unwrap();
        let mut buf = String::new();
        let t0 = Instant::now();
        s.read_to_string(&mut buf).unwrap();
        assert!(buf.contains("timed out"), "{buf}");
        assert!(t0.elapsed() >= Duration::from_secs(4));
    }
    assert_eq!(srv.report().state, "serving");

    if unsafe { libc::geteuid() } != 0 {
        return cannot_run("a client of another uid refused by SO_PEERCRED (needs root)");
    }
    // Another uid is refused by SO_PEERCRED even if the file mode were opened up.
    std::fs::set_permissions(&srv.control, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(srv.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(APP)
        .args(["status", "--control-socket"])
        .arg(&srv.control)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("permission denied for uid 65534"), "{err}");
}

use std::os::unix::process::CommandExt;

#[test]
fn client_without_a_master_exits_69() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(APP)
        .args(["status", "--control-socket"])
        .arg(dir.path().join("none.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the master"));
}

#[test]
fn long_drain_extends_the_timeout_and_cuts_what_overruns() {
    let _heavy = common::heavy();
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::new(dir.path());
    let srv = Server::start(
        Launch {
            notify: Some(notify.path.clone()),
            dir: Some(dir),
            ..Default::default()
        }
        .args(&["--drain-timeout", "2500ms"]),
    );
    let port = srv.port;
    let slow = std::thread::spawn(move || get(port, "/sleep?ms=20000"));
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let (ok, text) = reload(&srv);
    let took = t0.elapsed();
    assert!(ok, "{text}");
    assert!(
        took >= Duration::from_millis(2400) && took < Duration::from_secs(6),
        "{took:?}"
    );
    let ext = notify.wait_for("EXTEND_TIMEOUT_USEC=", Duration::from_secs(1));
    assert!(
        ext.is_some(),
        "no EXTEND_TIMEOUT_USEC during a long drain: {:?}",
        notify.messages
    );
    assert!(
        slow.join().unwrap().is_err(),
        "a 20 s request cannot outlive a 2.5 s drain"
    );
    assert!(
        srv.log_text()
            .contains("drain timeout: exiting with 1 connection(s) still open"),
        "{}",
        srv.log_text()
    );
}
