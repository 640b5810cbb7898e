//! Resource limits a hostile or broken client must not get around: trickled and stalled
//! request bodies, clients that stop reading, too many header fields, answers to oversized
//! requests that must reach the client, and an exact request limit per worker.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;

fn example(name: &str) -> PathBuf {
    std::path::Path::new(APP)
        .parent()
        .unwrap()
        .join("examples")
        .join(name)
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads until EOF, an error or `limit`, and returns what came and when it ended.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let t0 = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    (String::from_utf8_lossy(&out).to_string(), t0.elapsed())
}

fn worker_memory(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

#[test]
fn a_trickled_body_is_cut_at_the_minimum_rate() {
    let _heavy = common::heavy();
    let srv = Server::with_config(
        "workers = 1\n[http]\nbody_read_timeout = \"2s\"\nmin_body_rate = 100\n",
        &[],
    );
    let mut s = connect(srv.port);
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
        .unwrap();
    // One byte every 400 ms: never silent for the read timeout, far below 100 bytes/s.
    let t0 = Instant::now();
    let mut cut = None;
    s.set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    let mut buf = [0u8; 1024];
    while t0.elapsed() < Duration::from_secs(8) {
        if s.write_all(b"x").is_err() {
            cut = Some(t0.elapsed());
            break;
        }
        match s.read(&mut buf) {
            Ok(_) => {
                cut = Some(t0.elapsed());
                break;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                cut = Some(t0.elapsed());
                break;
            }
        }
    }
    let cut = cut.expect("a body trickled at 2.5 bytes/s was never cut");
    eprintln!("FIGURES trickled body cut after {cut:?} (body_read_timeout 2s, min_body_rate 100)");
    assert!(cut < Duration::from_secs(4), "cut only after {cut:?}");
    assert_eq!(srv.report().restarts_in_window, 0);
}

#[test]
fn expect_100_continue_without_a_body_is_cut() {
    let _heavy = common::heavy();
    let srv = Server::with_config("workers = 1\n[http]\nbody_read_timeout = \"1s\"\n", &[]);
    let mut s = connect(srv.port);
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let (text, took) = read_until_closed(&mut s, Duration::from_secs(6));
    eprintln!("FIGURES Expect: 100-continue without a body ended after {took:?}");
    assert!(took < Duration::from_secs(4), "held for {took:?}: {text:?}");
}

#[test]
fn stalled_uploads_cannot_pin_worker_memory() {
    let srv = Server::with_config(
        "workers = 1\n[http]\nmax_body_bytes = \"1MiB\"\nmax_pending_body_bytes = \"16MiB\"\nbody_read_timeout = \"30s\"\nmin_body_rate = 0\n",
        &[],
    );
    let pid = srv.workers()[0].1;
    let before = worker_memory(pid);
    let body = vec![b'x'; (1 << 20) - 1];
    let mut conns = Vec::new();
    let mut refused = 0;
    for _ in 0..80 {
        let mut s = connect(srv.port);
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1048576\r\n\r\n")
            .unwrap();
        // The whole body but its last byte: the upload stalls there.
        let _ = s.write_all(&body);
        conns.push(s);
    }
    std::thread::sleep(Duration::from_millis(1500));
    for s in &mut conns {
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut buf = [0u8; 64];
        if let Ok(n) = s.read(&mut buf)
            && buf[..n].starts_with(b"HTTP/1.1 503")
        {
            refused += 1;
        }
    }
    let after = worker_memory(pid);
    let grew = after.saturating_sub(before);
    eprintln!(
        "FIGURES 80 stalled 1 MiB uploads: worker RSS {:.1} -> {:.1} MiB, {refused} refused with 503",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    assert!(grew < 40 << 20, "worker memory grew by {} MiB", grew >> 20);
    assert!(refused >= 60, "only {refused} of 80 uploads were refused");
    // The worker still serves everyone else.
    assert_eq!(get(srv.port, "/").unwrap().status, 200);
    assert_eq!(srv.workers()[0].1, pid);
}

#[test]
fn a_client_that_stops_reading_is_cut_after_the_send_timeout() {
    let srv = Server::with_config("workers = 1\n[http]\nsend_timeout = \"1s\"\n", &[]);
    let mut s = connect(srv.port);
    // About 10 MB of chunks, produced as fast as the socket takes them; never read.
    s.write_all(b"GET /stream?chunks=1000000&ms=0 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let open = |srv: &Server| srv.report().workers.first().map(|w| w.connections);
    // Counts reach the master with heartbeats: first see it held, then released.
    let held = wait_until(Duration::from_secs(3), || (open(&srv)? == 1).then_some(()));
    assert!(held.is_some(), "the stalled connection was never counted");
    let released = wait_until(Duration::from_secs(6), || (open(&srv)? == 0).then_some(()));
    let took = t0.elapsed();
    eprintln!("FIGURES a client that stopped reading was cut after {took:?} (send_timeout 1s)");
    assert!(
        released.is_some(),
        "the connection is still held after {took:?}"
    );
    // What the client gets when it reads at last: some data, then the end.
    let (_, _) = read_until_closed(&mut s, Duration::from_secs(5));
    assert_eq!(get(srv.port, "/").unwrap().status, 200);
}

#[test]
fn broken_chunked_encoding_is_a_bad_request_not_too_large() {
    let srv = Server::with_config("workers = 1\n", &[]);
    let mut s = connect(srv.port);
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
        .unwrap();
    let (text, _) = read_until_closed(&mut s, Duration::from_secs(5));
    assert!(text.starts_with("HTTP/1.1 400"), "{text:?}");
}

#[test]
fn too_many_header_fields_get_431() {
    let srv = Server::with_config("workers = 1\n[http]\nmax_headers = 10\n", &[]);
    let mut req = String::from("GET / HTTP/1.1\r\nHost: t\r\n");
    for i in 0..20 {
        req.push_str(&format!("X-H{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let mut s = connect(srv.port);
    s.write_all(req.as_bytes()).unwrap();
    let (text, _) = read_until_closed(&mut s, Duration::from_secs(5));
    assert!(text.starts_with("HTTP/1.1 431"), "{text:?}");
    // Under the limit: served.
    let mut s = connect(srv.port);
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nX-A: 1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (text, _) = read_until_closed(&mut s, Duration::from_secs(5));
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
}

#[test]
fn an_oversized_upload_reads_its_413_not_a_reset() {
    let srv = Server::with_config("[http]\nmax_body_bytes = 1024\n", &[]);
    let mut ok = 0;
    for _ in 0..20 {
        let mut s = connect(srv.port);
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4000000\r\n\r\n")
            .unwrap();
        // Keep sending body while the server answers: unread data at close would reset.
        let _ = s.write_all(&[b'x'; 256 * 1024]);
        let (text, _) = read_until_closed(&mut s, Duration::from_secs(5));
        if text.starts_with("HTTP/1.1 413") {
            ok += 1;
        }
    }
    assert_eq!(ok, 20, "only {ok} of 20 clients read their 413");
}

#[test]
fn the_request_limit_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.toml");
    std::fs::write(
        &file,
        "workers = 1\nmax_requests = 20\nmax_requests_jitter = 0\n",
    )
    .unwrap();
    let srv = Server::start(
        Launch {
            binary: Some(example("local_state")),
            dir: Some(dir),
            ..Default::default()
        }
        .args(&["--config", file.to_str().unwrap()]),
    );
    // `local_state` answers "worker N saw K request(s)", counting in the worker process.
    let mut seen = Vec::new();
    for _ in 0..70 {
        let r = wait_until(Duration::from_secs(5), || {
            let mut s = TcpStream::connect(("127.0.0.1", srv.port)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            s.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            let body = out.split("\r\n\r\n").nth(1)?;
            let k: u64 = body.split_whitespace().nth(3)?.parse().ok()?;
            Some(k)
        })
        .expect("no answer");
        seen.push(r);
    }
    eprintln!("FIGURES per-process request counts seen: {seen:?}");
    // Requests (/healthz) made while starting count too, so the first worker may have
    // fewer left; no worker process may ever pass 20.
    assert!(
        seen.iter().all(|&k| k <= 20),
        "a worker passed its limit: {seen:?}"
    );
    assert!(
        seen.windows(2).filter(|w| w[1] < w[0]).count() >= 3,
        "workers were not recycled at their limit: {seen:?}"
    );
    assert_eq!(srv.report().restarts_in_window, 0);
}
