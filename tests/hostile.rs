//! Hostile input and resource faults: every bad input gets a clear answer, no worker dies,
//! nothing is lost.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use common::*;

/// The workers that served before still serve: none died of the abuse.
fn assert_same_workers(srv: &Server, before: &[i32]) {
    let now: Vec<i32> = srv.workers().iter().map(|w| w.1).collect();
    assert_eq!(before, now.as_slice(), "a worker died:\n{}", srv.log_text());
    assert_eq!(srv.report().restarts_in_window, 0);
    assert_eq!(get(srv.port, "/").unwrap().status, 200);
}

fn raw(port: u16, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).to_string()
}

#[test]
fn malformed_and_oversized_requests_get_4xx_and_workers_live() {
    let srv = Server::with_config(
        "[http]\nmax_header_bytes = 4096\nmax_body_bytes = 1024\n",
        &[],
    );
    let before: Vec<i32> = srv.workers().iter().map(|w| w.1).collect();

    let big = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(8000)
    );
    assert!(raw(srv.port, big.as_bytes()).starts_with("HTTP/1.1 431"));
    for junk in [
        &b"BLAH\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost t\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ] {
        let r = raw(srv.port, junk);
        assert!(r.starts_with("HTTP/1.1 400"), "{junk:?} -> {r:?}");
    }
    let body = "x".repeat(2000);
    let r = raw(
        srv.port,
        format!("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2000\r\n\r\n{body}").as_bytes(),
    );
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    // A chunked body gives no length up front: the limit still holds while reading it.
    let chunk = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let r = raw(
        srv.port,
        format!("POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{chunk}").as_bytes(),
    );
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    let r = raw(
        srv.port,
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("hello"), "{r}");
    assert_same_workers(&srv, &before);
}

#[test]
fn slowloris_is_cut_off_without_slowing_anyone() {
    let _heavy = common::heavy();
    let srv = Server::with_config("[http]\nheader_read_timeout = \"2s\"\n", &[]);
    let before: Vec<i32> = srv.workers().iter().map(|w| w.1).collect();
    let n = 300;
    let mut slow: Vec<TcpStream> = (0..n)
        .map(|_| {
            let s = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
            s
        })
        .collect();
    let port = srv.port;
    let measure = std::thread::spawn(move || {
        let mut c = Conn::open(port).unwrap();
        let mut lat = Vec::new();
        for _ in 0..400 {
            let t = Instant::now();
            let r = c.get("/").unwrap();
            assert_eq!(r.status, 200);
            lat.push(t.elapsed());
            std::thread::sleep(Duration::from_millis(2));
        }
        lat
    });
    // Dribble a header byte at a time, slower than any real client.
    let line = b"GET / HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let t0 = Instant::now();
    let mut i = 0;
    while t0.elapsed() < Duration::from_millis(1500) {
        for s in &mut slow {
            let _ = s.write_all(&line[i % line.len()..i % line.len() + 1]);
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut lat = measure.join().unwrap();
    lat.sort();
    let p99 = lat[lat.len() * 99 / 100];
    eprintln!(
        "FIGURES slowloris {n} conns: normal client p50 {:?} p99 {p99:?}",
        lat[lat.len() / 2]
    );
    assert!(p99 < Duration::from_millis(10), "p99 {p99:?}");
    // After the timeout every slow connection is closed by the server.
    std::thread::sleep(Duration::from_millis(1200));
    let mut closed = 0;
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut b = [0u8; 16];
        if matches!(s.read(&mut b), Ok(0)) || s.write_all(b"x").is_err() {
            closed += 1;
        }
    }
    assert_eq!(closed, n, "slow connections left open");
    assert_same_workers(&srv, &before);
}

#[test]
fn idle_keepalive_connections_are_closed_after_the_idle_timeout() {
    let _heavy = common::heavy();
    let srv = Server::with_config(
        "[http]\nkeepalive_timeout = \"500ms\"\nheader_read_timeout = \"5s\"\n",
        &[],
    );
    let mut c = Conn::open(srv.port).unwrap();
    assert_eq!(c.get("/").unwrap().status, 200);
    let t0 = Instant::now();
    let mut b = [0u8; 1];
    c.set_timeout(Duration::from_secs(3));
    let n = c.read_some(&mut b);
    assert!(matches!(n, Ok(0)), "{n:?}");
    let idle = t0.elapsed();
    assert!(
        idle >= Duration::from_millis(450) && idle < Duration::from_millis(1500),
        "{idle:?}"
    );
}

#[test]
fn max_connections_makes_a_worker_wait_not_fail() {
    let _heavy = common::heavy();
    let srv = Server::with_config("[http]\nmax_connections = 2\n", &["--workers", "1"]);
    let before: Vec<i32> = srv.workers().iter().map(|w| w.1).collect();
    let mut a = Conn::open(srv.port).unwrap();
    let mut b = Conn::open(srv.port).unwrap();
    assert_eq!(a.get("/").unwrap().status, 200);
    assert_eq!(b.get("/").unwrap().status, 200);
    // The third waits in the backlog instead of being refused...
    let port = srv.port;
    let third = std::thread::spawn(move || {
        let t = Instant::now();
        let r = get(port, "/");
        (r, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !third.is_finished(),
        "third connection served above max_connections"
    );
    // ...and is served as soon as a place frees up.
    drop(a);
    let (r, waited) = third.join().unwrap();
    assert_eq!(r.unwrap().status, 200);
    assert!(waited >= Duration::from_millis(450));
    assert_eq!(b.get("/").unwrap().status, 200);
    assert_same_workers(&srv, &before);
}

fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn descriptor_exhaustion_backs_off_and_recovers() {
    let _heavy = common::heavy();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = dir.path().join("log");
    let mut cmd = std::process::Command::new(APP);
    cmd.args([
        "serve",
        "--workers",
        "1",
        "--bind",
        &format!("127.0.0.1:{port}"),
    ])
    .env("APP_CONTROL_SOCKET", dir.path().join("c.sock"))
    .env_remove("JOURNAL_STREAM")
    .stderr(std::fs::File::create(&log).unwrap())
    .process_group(0);
    unsafe {
        cmd.pre_exec(|| {
            // Low enough that the worker's own cap on connections (the limit less a
            // reserve, at least 16) still runs it out of descriptors.
            let lim = libc::rlimit {
                rlim_cur: 24,
                rlim_max: 24,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let guard = scopeguard(child.id() as i32);
    wait_until(Duration::from_secs(5), || get(port, "/healthz").ok()).expect("serving");
    let worker = children(child.id() as i32)[0];
    // Hold far more connections than the worker has descriptors for.
    let held: Vec<TcpStream> = (0..80)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = cpu_ticks(worker);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(worker) - t0; // clock ticks, 100 per second
    eprintln!("FIGURES EMFILE: worker used {used} ticks of CPU in 2 s while exhausted");
    assert!(
        used < 20,
        "worker spins while out of descriptors: {used} ticks in 2s"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("Too many open files").count(),
        1,
        "logged once per episode:\n{text}"
    );
    drop(held);
    let r =
        wait_until(Duration::from_secs(5), || get(port, "/").ok()).expect("service did not resume");
    assert_eq!(r.status, 200);
    assert_eq!(
        children(child.id() as i32),
        vec![worker],
        "the worker survived"
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("accepting again")
    );
    drop(guard);
    let _ = child.wait();
}

struct KillGroup(i32);
impl Drop for KillGroup {
    fn drop(&mut self) {
        unsafe { libc::kill(-self.0, libc::SIGKILL) };
    }
}
fn scopeguard(pid: i32) -> KillGroup {
    KillGroup(pid)
}

#[test]
fn missing_notify_socket_warns_once_and_serves() {
    let srv = Server::start(Launch {
        env: vec![("NOTIFY_SOCKET".into(), "/nonexistent/notify.sock".into())],
        ..Default::default()
    });
    std::thread::sleep(Duration::from_millis(1200)); // several STATUS updates attempted
    get(srv.port, "/").unwrap();
    let log = srv.log_text();
    assert_eq!(log.matches("cannot notify systemd").count(), 1, "{log}");
    assert_eq!(get(srv.port, "/").unwrap().status, 200);
}

#[test]
fn abstract_notify_socket_is_supported() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("app-test-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _srv = Server::spawn(Launch {
        env: vec![("NOTIFY_SOCKET".into(), format!("@{name}"))],
        ..Default::default()
    });
    let mut buf = [0u8; 4096];
    let got = wait_until(Duration::from_secs(10), || {
        let n = sock.recv(&mut buf).ok()?;
        String::from_utf8_lossy(&buf[..n])
            .contains("READY=1")
            .then_some(())
    });
    assert!(got.is_some(), "no READY=1 on the abstract socket");
}

/// Duplicates descriptor `fd` of process `pid` into this process (pidfd_getfd, Linux 5.6+).
fn steal_fd(pid: i32, fd: i32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        if pidfd < 0 {
            return None;
        }
        let got = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
        libc::close(pidfd);
        (got >= 0).then(|| std::os::fd::OwnedFd::from_raw_fd(got))
    }
}

#[test]
fn garbage_on_a_worker_channel_gets_that_worker_replaced() {
    let srv = Server::start(Launch::default().args(&["--workers", "2"]));
    for (k, payload) in [
        // An oversized frame header.
        (0usize, u32::MAX.to_be_bytes().to_vec()),
        // A well-framed message that is not one.
        (1, {
            let body = b"{\"type\":\"launch_missiles\"}";
            let mut v = (body.len() as u32).to_be_bytes().to_vec();
            v.extend_from_slice(body);
            v
        }),
    ] {
        let ws = srv.workers();
        let victim = ws[k % ws.len()].clone();
        let channel = worker_channel_fd(victim.1).expect("a worker names its IPC channel");
        let Some(fd) = steal_fd(victim.1, channel) else {
            // Root has CAP_SYS_PTRACE: there, pidfd_getfd must work.
            assert!(
                unsafe { libc::geteuid() } != 0,
                "pidfd_getfd failed as root: {}",
                std::io::Error::last_os_error()
            );
            return cannot_run(
                "garbage on a worker's IPC channel (pidfd_getfd needs CAP_SYS_PTRACE)",
            );
        };
        let mut s = std::os::unix::net::UnixStream::from(fd);
        s.write_all(&payload).unwrap();
        drop(s);
        assert!(
            srv.wait_replaced_all(victim.1, 2, Duration::from_secs(3)),
            "{:?}\n{}",
            srv.workers(),
            srv.log_text()
        );
    }
    // Each was killed by the master as faulty: an unplanned restart, counted.
    assert_eq!(srv.report().restarts_in_window, 2);
    assert!(alive(srv.pid()));
    assert_eq!(get(srv.port, "/").unwrap().status, 200);
}

#[test]
fn control_socket_survives_broken_clients() {
    let srv = Server::start(Launch::default());
    // Disconnect mid-request.
    {
        let mut s = std::os::unix::net::UnixStream::connect(&srv.control).unwrap();
        s.write_all(b"{\"cmd\":").unwrap();
    }
    // An over-long request.
    {
        let mut s = std::os::unix::net::UnixStream::connect(&srv.control).unwrap();
        let _ = s.write_all(&vec![b'a'; 10_000]);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.contains("request too long"), "{out}");
    }
    // Binary junk.
    let r = srv.control("\u{1}\u{2}\u{3}").unwrap();
    assert_eq!(r["ok"], false);
    assert_eq!(srv.report().state, "serving");
    assert!(alive(srv.pid()));
}
