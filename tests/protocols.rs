//! The library's protocols, end to end: streamed bodies and Server-Sent Events as they are
//! produced, WebSockets (echo, connection counts, a reload while one is open), HTTP/2 (curl,
//! many streams on one connection, reloads under HTTP/2 load), the example programs built on
//! the public API (shared and `!Send` state, settings, a raw protocol on a named socket), and
//! bytes that are not HTTP at all.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_tungstenite::tungstenite::Message;

use common::*;

// ---- helpers ---------------------------------------------------------------------------------

/// An example program built by `cargo test` (`tests/programs/<name>.rs`).
fn program(name: &str) -> PathBuf {
    let p = Path::new(APP).parent().unwrap().join("examples").join(name);
    assert!(p.exists(), "example program {} not built", p.display());
    p
}

/// A single-threaded tokio runtime for the async clients.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Waits until the server answers HTTP at all on `path` (any status: the example programs
/// have no `/healthz`) and its pool is full.
fn wait_answering(srv: &Server, path: &str) {
    let ok = wait_until(Duration::from_secs(10), || get(srv.port, path).ok());
    assert!(
        ok.is_some(),
        "server never answered; log:\n{}",
        srv.log_text()
    );
    let full = wait_until(Duration::from_secs(10), || {
        let s: app::StatusReport = serde_json::from_value(srv.status().ok()?).ok()?;
        (s.serving_workers == s.target_workers).then_some(())
    });
    assert!(full.is_some(), "pool never full; log:\n{}", srv.log_text());
}

/// Starts an example program, with `toml` as its config file when given.
fn start_program(name: &str, toml: Option<&str>, args: &[&str], probe: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut all: Vec<String> = Vec::new();
    if let Some(toml) = toml {
        let file = dir.path().join("app.toml");
        std::fs::write(&file, toml).unwrap();
        all.push("--config".into());
        all.push(file.to_str().unwrap().into());
    }
    all.extend(args.iter().map(|s| s.to_string()));
    let srv = Server::spawn(Launch {
        binary: Some(program(name)),
        dir: Some(dir),
        args: all,
        ..Default::default()
    });
    wait_answering(&srv, probe);
    srv
}

/// A response whose chunked body was read chunk by chunk, each with the time it was read
/// (since the request was sent).
struct Timed {
    status: u16,
    headers: Vec<(String, String)>,
    chunks: Vec<(Duration, Vec<u8>)>,
}

impl Timed {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` over a fresh HTTP/1.1 connection, reading the chunked body by hand. A chunk's
/// time is taken when its size line is parsed, which is never before it arrived: a body
/// buffered by the server shows up as chunks read at the same moment.
fn get_chunked_timed(port: u16, path: &str) -> Timed {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_nodelay(true).unwrap();
    let mut r = BufReader::new(s);
    r.get_mut()
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
    let t0 = Instant::now();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    assert!(chunked, "not a chunked response: {headers:?}");
    let mut chunks = Vec::new();
    loop {
        let mut size = String::new();
        r.read_line(&mut size).unwrap();
        let at = t0.elapsed();
        let hex = size.trim().split(';').next().unwrap();
        let n = usize::from_str_radix(hex, 16)
            .unwrap_or_else(|_| panic!("bad chunk size line {size:?}"));
        if n == 0 {
            // Trailers (none expected), then the blank line.
            let mut end = String::new();
            while r.read_line(&mut end).unwrap() > 0 && end.trim_end() != "" {
                end.clear();
            }
            break;
        }
        let mut data = vec![0; n];
        r.read_exact(&mut data).unwrap();
        let mut crlf = [0; 2];
        r.read_exact(&mut crlf).unwrap();
        assert_eq!(&crlf, b"\r\n");
        chunks.push((at, data));
    }
    Timed {
        status,
        headers,
        chunks,
    }
}

fn reload_output(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn pids(srv: &Server) -> Vec<i32> {
    srv.workers().iter().map(|w| w.1).collect()
}

/// `(pid, connections)` of every worker, from the real client's `app status --json`.
fn connections(srv: &Server) -> Vec<(i32, u64)> {
    let out = srv.client(&["status", "--json"]);
    assert!(out.status.success(), "app status: {}", reload_output(&out));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("app status --json: {e}: {}", reload_output(&out)));
    s["workers"]
        .as_array()
        .unwrap_or_else(|| panic!("no workers in {s}"))
        .iter()
        .map(|w| {
            (
                w["pid"].as_i64().unwrap() as i32,
                w["connections"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Starts `app reload` in a thread (it returns only once the old generation is gone) and
/// waits until worker `old` is draining; the thread yields the client's output and the time
/// since `t0` it returned at.
fn reload_beside(
    srv: &Server,
    old: i32,
    t0: Instant,
) -> (
    std::thread::JoinHandle<(std::process::Output, Duration)>,
    Option<()>,
) {
    let control = srv.control.clone();
    let reloader = std::thread::spawn(move || {
        let out = Command::new(APP)
            .args(["reload", "--control-socket"])
            .arg(&control)
            .output()
            .unwrap();
        (out, t0.elapsed())
    });
    let draining = wait_until(Duration::from_secs(5), || {
        srv.workers()
            .iter()
            .any(|w| w.1 == old && w.4 == "draining")
            .then_some(())
    });
    (reloader, draining)
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

// ---- 1. streaming and SSE ------------------------------------------------------------------

#[test]
fn streamed_chunks_arrive_as_they_are_produced() {
    let srv = Server::start(Launch::default());
    let t = get_chunked_timed(srv.port, "/stream?chunks=5&ms=200");
    assert_eq!(t.status, 200);
    assert!(t.header("x-worker").is_some(), "{:?}", t.headers);
    let times: Vec<u128> = t.chunks.iter().map(|(at, _)| ms(*at)).collect();
    eprintln!("FIGURES /stream?chunks=5&ms=200 chunk arrival (ms after request): {times:?}");
    let body: String = t
        .chunks
        .iter()
        .map(|(_, d)| String::from_utf8_lossy(d).to_string())
        .collect();
    assert_eq!(body, "chunk 0\nchunk 1\nchunk 2\nchunk 3\nchunk 4\n");
    assert_eq!(t.chunks.len(), 5, "one chunk per item: {times:?}");
    let first = t.chunks[0].0;
    let last = t.chunks[4].0;
    assert!(
        first < Duration::from_millis(150),
        "first chunk after {first:?}"
    );
    assert!(
        last - first >= Duration::from_millis(700),
        "chunks not spread over time (buffered?): {times:?}"
    );
    for w in t.chunks.windows(2) {
        assert!(
            w[1].0 - w[0].0 >= Duration::from_millis(100),
            "two chunks together: {times:?}"
        );
    }
}

#[test]
fn server_sent_events_arrive_one_by_one() {
    let srv = Server::start(Launch::default());
    let t = get_chunked_timed(srv.port, "/sse?events=4&ms=200");
    assert_eq!(t.status, 200);
    let ct = t.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/event-stream"), "content-type {ct:?}");
    // Events end with a blank line; note when each was complete.
    let mut text = String::new();
    let mut events: Vec<(Duration, String)> = Vec::new();
    for (at, data) in &t.chunks {
        text.push_str(&String::from_utf8_lossy(data));
        while let Some(end) = text.find("\n\n") {
            let ev: String = text.drain(..end + 2).collect();
            events.push((*at, ev));
        }
    }
    assert!(text.trim().is_empty(), "unterminated event: {text:?}");
    let times: Vec<u128> = events.iter().map(|(at, _)| ms(*at)).collect();
    eprintln!("FIGURES /sse?events=4&ms=200 event arrival (ms after request): {times:?}");
    assert_eq!(events.len(), 4, "{events:?}");
    for (i, (_, ev)) in events.iter().enumerate() {
        assert!(
            ev.lines().any(|l| l == format!("data: event {i}")),
            "event {i}: {ev:?}"
        );
        assert!(
            ev.lines().any(|l| l == format!("id: {i}")),
            "event {i}: {ev:?}"
        );
    }
    assert!(
        events[0].0 < Duration::from_millis(150),
        "first event after {:?}",
        events[0].0
    );
    for w in events.windows(2) {
        assert!(
            w[1].0 - w[0].0 >= Duration::from_millis(100),
            "two events together (buffered?): {times:?}"
        );
    }
    assert!(events[3].0 - events[0].0 >= Duration::from_millis(500));
}

#[test]
fn streams_in_flight_finish_across_a_reload() {
    let srv = Server::start(Launch::default());
    let port = srv.port;
    let before = pids(&srv);
    // HTTP/1.1 chunked, read by hand, and HTTP/2 through curl: 10 chunks 100 ms apart each.
    let h1 = std::thread::spawn(move || get_chunked_timed(port, "/stream?chunks=10&ms=100"));
    let h2 = std::thread::spawn(move || {
        Command::new("curl")
            .args(["--http2-prior-knowledge", "-s", "--max-time", "10"])
            .arg(format!("http://127.0.0.1:{port}/stream?chunks=10&ms=100"))
            .output()
            .expect("curl is needed for this test and could not be run")
    });
    std::thread::sleep(Duration::from_millis(250));
    let t0 = Instant::now();
    let out = srv.client(&["reload"]);
    let took = t0.elapsed();
    assert!(out.status.success(), "{}", reload_output(&out));
    let h1 = h1.join().unwrap();
    let h2 = h2.join().unwrap();
    let expected: String = (0..10).map(|i| format!("chunk {i}\n")).collect();
    let body: String = h1
        .chunks
        .iter()
        .map(|(_, d)| String::from_utf8_lossy(d).to_string())
        .collect();
    eprintln!(
        "FIGURES streams across a reload: reload took {} ms; HTTP/1 chunks at {:?} ms",
        ms(took),
        h1.chunks.iter().map(|(at, _)| ms(*at)).collect::<Vec<_>>()
    );
    assert_eq!(h1.status, 200);
    assert_eq!(body, expected, "HTTP/1 stream cut by the reload");
    assert!(h2.status.success(), "curl: {}", reload_output(&h2));
    assert_eq!(
        String::from_utf8_lossy(&h2.stdout),
        expected,
        "HTTP/2 stream cut by the reload"
    );
    for pid in before {
        assert!(!alive(pid), "old worker {pid} still alive after the reload");
    }
}

// ---- 3. WebSockets -------------------------------------------------------------------------

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends `msg` and waits (bounded) for the same message back.
async fn echo(ws: &mut Ws, msg: Message) {
    ws.send(msg.clone()).await.unwrap();
    let back = tokio::time::timeout(Duration::from_secs(2), ws.next())
        .await
        .expect("no echo within 2 s")
        .expect("socket ended instead of echoing")
        .expect("socket error instead of echoing");
    assert_eq!(back, msg);
}

#[test]
fn websocket_echoes_text_and_binary_and_counts_as_a_connection() {
    let srv = Server::start(Launch::default().args(&["--workers", "1"]));
    let pid = pids(&srv)[0];
    runtime().block_on(async {
        let url = format!("ws://127.0.0.1:{}/ws", srv.port);
        let (mut ws, resp) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(url),
        )
        .await
        .expect("handshake within 5 s")
        .expect("WebSocket handshake");
        assert_eq!(resp.status(), 101);
        assert_eq!(
            resp.headers().get("x-worker").map(|v| v.as_bytes()),
            Some(&b"0"[..])
        );
        echo(&mut ws, Message::text("hello")).await;
        echo(&mut ws, Message::binary(vec![0u8, 1, 2, 254, 255])).await;
        let big: String = "x".repeat(100_000);
        echo(&mut ws, Message::text(big)).await;
        for i in 0..20 {
            echo(&mut ws, Message::text(format!("message {i}"))).await;
        }
        // The open socket counts in `app status` (figures come with heartbeats: poll).
        let counted = wait_until(Duration::from_secs(5), || {
            connections(&srv)
                .iter()
                .any(|(p, c)| *p == pid && *c == 1)
                .then_some(())
        });
        assert!(
            counted.is_some(),
            "open WebSocket not counted: {:?}",
            connections(&srv)
        );
        ws.close(None).await.unwrap();
        // The server answers the close handshake, then the stream ends.
        let end = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(m) = ws.next().await {
                if m.is_err() {
                    break;
                }
            }
        })
        .await;
        assert!(end.is_ok(), "socket not closed after the close handshake");
        let uncounted = wait_until(Duration::from_secs(5), || {
            connections(&srv)
                .iter()
                .any(|(p, c)| *p == pid && *c == 0)
                .then_some(())
        });
        assert!(
            uncounted.is_some(),
            "closed WebSocket still counted: {:?}",
            connections(&srv)
        );
    });
    assert!(alive(pid));
}

#[test]
fn websocket_survives_the_drain_grace_of_a_reload_then_is_closed() {
    let drain = Duration::from_secs(1);
    let srv = Server::start(Launch::default().args(&["--workers", "1", "--drain-timeout", "1s"]));
    let old = pids(&srv)[0];
    runtime().block_on(async {
        let url = format!("ws://127.0.0.1:{}/ws", srv.port);
        let (mut ws, _) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(url),
        )
        .await
        .expect("handshake within 5 s")
        .expect("WebSocket handshake");
        echo(&mut ws, Message::text("before the reload")).await;
        let counted = wait_until(Duration::from_secs(5), || {
            connections(&srv)
                .iter()
                .any(|(p, c)| *p == old && *c == 1)
                .then_some(())
        });
        assert!(counted.is_some(), "{:?}", connections(&srv));

        // `app reload` returns once the old generation is gone: run it beside.
        let t0 = Instant::now();
        let (reloader, draining) = reload_beside(&srv, old, t0);
        assert!(
            draining.is_some(),
            "old worker never drained: {:?}",
            srv.workers()
        );
        let t_draining = t0.elapsed();
        // Still usable during the grace.
        echo(&mut ws, Message::text("during the drain")).await;
        echo(&mut ws, Message::binary(vec![7u8; 10])).await;
        let t_echoed = t0.elapsed();
        assert!(alive(old), "old worker gone before the grace ended");
        // Then the server closes it: a close frame, the end of the stream, or an error.
        let ended = tokio::time::timeout(drain + Duration::from_secs(2), ws.next()).await;
        if let Ok(Some(Ok(m))) = &ended {
            assert!(m.is_close(), "unexpected message {m:?}");
        }
        let t_closed = t0.elapsed();
        assert!(ended.is_ok(), "WebSocket still open after {t_closed:?}");
        let gone = wait_until(drain + Duration::from_secs(2), || {
            (!alive(old)).then_some(())
        });
        let t_gone = t0.elapsed();
        assert!(gone.is_some(), "old worker {old} still alive");
        let (out, t_reloaded) = reloader.join().unwrap();
        eprintln!(
            "FIGURES WS during reload (drain_timeout 1s), ms after reload start: draining {} \
             echoed {} closed {} old worker gone {} reload returned {}",
            ms(t_draining),
            ms(t_echoed),
            ms(t_closed),
            ms(t_gone),
            ms(t_reloaded)
        );
        assert!(out.status.success(), "reload: {}", reload_output(&out));
        assert!(
            t_gone <= drain + Duration::from_secs(1),
            "old worker exited {t_gone:?} after the reload started"
        );
        assert!(
            t_closed >= t_echoed,
            "closed before the drain grace was used"
        );
        // The new generation serves WebSockets.
        let ws_now = srv.workers();
        assert!(ws_now.iter().all(|w| w.3 == 2 && w.1 != old), "{ws_now:?}");
        let url = format!("ws://127.0.0.1:{}/ws", srv.port);
        let (mut ws2, _) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(url),
        )
        .await
        .unwrap()
        .unwrap();
        echo(&mut ws2, Message::text("after the reload")).await;
    });
}

// ---- 4. HTTP/2 -----------------------------------------------------------------------------

#[test]
fn curl_speaks_h2c_with_prior_knowledge() {
    let srv = Server::start(Launch::default());
    let out = Command::new("curl")
        .args(["--http2-prior-knowledge", "-si", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{}/", srv.port))
        .output()
        .expect("curl is needed for this test and could not be run (apt-get install curl)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "curl failed: {text}");
    let first = text.lines().next().unwrap_or_default();
    assert!(first.starts_with("HTTP/2 200"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.to_ascii_lowercase().starts_with("x-worker:")),
        "{text}"
    );
    assert!(text.contains("hello from worker"), "{text}");
}

#[test]
fn hundred_concurrent_streams_on_one_http2_connection() {
    let _heavy = common::heavy();
    let srv = Server::start(Launch::default());
    let port = srv.port;
    let (elapsed, workers) = runtime().block_on(async move {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (send, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
            TokioExecutor::new(),
            TokioIo::new(tcp),
        )
        .await
        .expect("HTTP/2 handshake");
        tokio::spawn(conn);
        let t0 = Instant::now();
        let requests = (0..100).map(|i| {
            let mut send = send.clone();
            async move {
                let req = http::Request::get(format!("http://127.0.0.1:{port}/sleep?ms=300&i={i}"))
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let resp = send.send_request(req).await.expect("request");
                let status = resp.status();
                let worker = resp
                    .headers()
                    .get("x-worker")
                    .map(|v| v.to_str().unwrap().to_string());
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                (status, worker, body)
            }
        });
        let all = tokio::time::timeout(
            Duration::from_secs(10),
            futures_util::future::join_all(requests),
        )
        .await
        .expect("100 streams within 10 s");
        let elapsed = t0.elapsed();
        let mut workers = Vec::new();
        for (status, worker, body) in all {
            assert_eq!(status, 200);
            assert_eq!(&body[..], b"slept 300ms\n");
            workers.push(worker.expect("x-worker header"));
        }
        (elapsed, workers)
    });
    eprintln!(
        "FIGURES 100 concurrent /sleep?ms=300 streams on one HTTP/2 connection: {} ms",
        ms(elapsed)
    );
    // One connection, one worker; served concurrently (100 × 300 ms one after another
    // would take 30 s).
    assert!(workers.windows(2).all(|w| w[0] == w[1]), "{workers:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
}

#[test]
fn http2_request_bodies_are_echoed_and_limited() {
    let srv = Server::start(Launch::default());
    let port = srv.port;
    runtime().block_on(async move {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake::<
            _,
            _,
            http_body_util::Full<Bytes>,
        >(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .expect("HTTP/2 handshake");
        tokio::spawn(conn);
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let post = |body: Vec<u8>| {
            http::Request::post(format!("http://127.0.0.1:{port}/echo"))
                .body(http_body_util::Full::new(Bytes::from(body)))
                .unwrap()
        };
        let resp = tokio::time::timeout(Duration::from_secs(10), async {
            let r = send.send_request(post(body.clone())).await.unwrap();
            let status = r.status();
            (status, r.into_body().collect().await.unwrap().to_bytes())
        })
        .await
        .expect("echo within 10 s");
        assert_eq!(resp.0, 200);
        assert_eq!(&resp.1[..], &body[..], "echoed body differs");
        // Above max_body_bytes (1 MiB by default): 413.
        let big = vec![b'x'; 2 * 1024 * 1024];
        let r = tokio::time::timeout(Duration::from_secs(10), send.send_request(post(big)))
            .await
            .expect("answer within 10 s");
        match r {
            Ok(r) => assert_eq!(r.status(), 413),
            // A server may also reset the stream it refuses to read.
            Err(e) => panic!("2 MiB body: no 413 but {e:?}"),
        }
    });
}

#[test]
fn reloads_under_http2_load_fail_no_request() {
    let _heavy = common::heavy();
    let srv = Server::start(Launch::default());
    let port = srv.port;
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            runtime().block_on(async move {
                let mut tasks = Vec::new();
                for i in 0..5 {
                    let stop = stop.clone();
                    // Four fast clients, and one whose requests take 300 ms, so streams
                    // are in flight when the old workers send GOAWAY.
                    let (path, expect): (&str, &[u8]) = if i == 4 {
                        ("/sleep?ms=300", b"slept 300ms\n")
                    } else {
                        ("/", b"hello")
                    };
                    // One client each: its own HTTP/2 connection, replaced after a GOAWAY.
                    let client = Client::builder(TokioExecutor::new())
                        .http2_only(true)
                        .build_http::<Empty<Bytes>>();
                    tasks.push(tokio::spawn(async move {
                        let mut st = LoadStats::default();
                        let uri: http::Uri =
                            format!("http://127.0.0.1:{port}{path}").parse().unwrap();
                        while !stop.load(Ordering::Relaxed) {
                            let r = tokio::time::timeout(Duration::from_secs(10), async {
                                let resp = client.get(uri.clone()).await?;
                                let status = resp.status();
                                let body = resp.into_body().collect().await?.to_bytes();
                                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
                            })
                            .await;
                            match r {
                                Ok(Ok((s, b))) if s == 200 && b.starts_with(expect) => st.ok += 1,
                                Ok(Ok((s, b))) => {
                                    st.failed += 1;
                                    st.errors.push(format!("status {s}: {b:?}"));
                                }
                                Ok(Err(e)) => {
                                    st.failed += 1;
                                    st.errors.push(format!("{e:?}"));
                                }
                                Err(_) => {
                                    st.failed += 1;
                                    st.errors.push("timed out".into());
                                }
                            }
                        }
                        st
                    }));
                }
                let mut total = LoadStats::default();
                for t in tasks {
                    let s = t.await.unwrap();
                    total.ok += s.ok;
                    total.failed += s.failed;
                    total.errors.extend(s.errors);
                }
                total
            })
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut durations = Vec::new();
    for i in 0..4 {
        let before = pids(&srv);
        let t0 = Instant::now();
        let out = srv.client(&["reload"]);
        durations.push(ms(t0.elapsed()));
        assert!(out.status.success(), "reload {i}: {}", reload_output(&out));
        for pid in &before {
            assert!(!alive(*pid), "reload {i}: old worker {pid} still alive");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let stats = load.join().unwrap();
    eprintln!(
        "FIGURES 4 reloads under HTTP/2 load (4 fast + 1 slow h2 clients): {} ok, {} failed; reload durations ms {durations:?}",
        stats.ok, stats.failed
    );
    assert_eq!(
        stats.failed,
        0,
        "failed requests: {:?}",
        &stats.errors[..stats.errors.len().min(10)]
    );
    assert!(stats.ok > 500, "too little load: {}", stats.ok);
    assert_eq!(srv.report().generation, 5);
}

// ---- 5. example programs -------------------------------------------------------------------

/// `n` requests on fresh connections: `(x-worker, body)` of each.
fn hits(port: u16, path: &str, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|_| {
            let r = get(port, path).unwrap();
            assert_eq!(r.status, 200, "{r:?}");
            let w = r.header("x-worker").expect("x-worker header").to_string();
            (w, r.body)
        })
        .collect()
}

/// Checks that every worker's counter (the number `count` finds in its answers) went up by
/// exactly one per request it served: the state is shared by a worker's requests and by no
/// other worker's. Returns how many requests each worker served.
fn assert_counts_per_worker(
    answers: &[(String, String)],
    count: impl Fn(&str) -> u64,
) -> Vec<(String, usize)> {
    let mut last: std::collections::BTreeMap<String, (u64, usize)> = Default::default();
    for (w, body) in answers {
        let n = count(body);
        if let Some((prev, seen)) = last.get_mut(w) {
            assert_eq!(n, *prev + 1, "worker {w}: {answers:?}");
            *prev = n;
            *seen += 1;
        } else {
            last.insert(w.clone(), (n, 1));
        }
    }
    last.into_iter().map(|(w, (_, seen))| (w, seen)).collect()
}

#[test]
fn axum_state_counts_per_worker_with_the_prefix_from_the_config() {
    let srv = start_program(
        "axum_state",
        Some("workers = 2\n[service]\nprefix = \"p-\"\n"),
        &[],
        "/not-found",
    );
    let answers = hits(srv.port, "/hit", 60);
    for (w, body) in &answers {
        assert!(
            body.starts_with(&format!("p-worker {w} hit ")),
            "{w}: {body:?}"
        );
    }
    let per = assert_counts_per_worker(&answers, |b| {
        b.trim().rsplit(' ').next().unwrap().parse().unwrap()
    });
    eprintln!("FIGURES axum_state /hit: requests per worker {per:?}");
    // Nobody else hit the counters: each worker's first answer was its first hit.
    for (w, body) in &answers {
        let first = answers.iter().find(|(x, _)| x == w).unwrap();
        assert!(first.1.trim().ends_with(" hit 1"), "{w}: {body:?}");
    }
    assert!(get(srv.port, "/nope").unwrap().status == 404);
}

#[test]
fn axum_state_rejects_a_long_prefix_at_start_and_on_reload() {
    let _heavy = common::heavy();
    // At start: exit 78, nothing served.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[service]\nprefix = \"seventeen-bytes!!\"\n").unwrap();
    let port = free_port();
    let mut cmd = Command::new(program("axum_state"));
    cmd.arg("serve")
        .arg("--bind")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--config")
        .arg(&file)
        .env("APP_CONTROL_SOCKET", dir.path().join("control.sock"))
        .env_remove("RUST_LOG")
        .stdout(Stdio::null());
    let t0 = Instant::now();
    let (code, stderr) = run_to_exit(cmd);
    assert_eq!(code, 78, "{stderr}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(get(port, "/hit").is_err(), "something serves on {port}");

    // On reload: the reload fails, the old generation keeps serving with its settings.
    let srv = start_program(
        "axum_state",
        Some("[service]\nprefix = \"p-\"\n"),
        &[],
        "/not-found",
    );
    let before = pids(&srv);
    std::fs::write(
        srv.config_path(),
        "[service]\nprefix = \"seventeen-bytes!!\"\n",
    )
    .unwrap();
    let out = srv.client(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", reload_output(&out));
    assert_eq!(pids(&srv), before);
    let s = srv.report();
    assert!(!s.last_reload.as_ref().unwrap().ok, "{s:?}");
    assert_eq!(s.state, "serving");
    let r = get(srv.port, "/hit").unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.starts_with("p-worker "), "{r:?}");
    // Fixed, a reload brings the new prefix to new workers.
    std::fs::write(srv.config_path(), "[service]\nprefix = \"q-\"\n").unwrap();
    let out = srv.client(&["reload"]);
    assert!(out.status.success(), "{}", reload_output(&out));
    let r = get(srv.port, "/hit").unwrap();
    assert!(r.body.starts_with("q-worker "), "{r:?}");
    assert!(r.body.trim().ends_with(" hit 1"), "fresh state: {r:?}");
}

#[test]
fn local_state_serves_a_non_send_service_per_worker() {
    let srv = start_program("local_state", None, &["--workers", "2"], "/probe");
    let before = pids(&srv);
    let answers = hits(srv.port, "/anything", 60);
    for (w, body) in &answers {
        assert!(
            body.starts_with(&format!("worker {w} saw ")) && body.ends_with(" request(s)\n"),
            "{w}: {body:?}"
        );
    }
    let per = assert_counts_per_worker(&answers, |b| b.split(' ').nth(3).unwrap().parse().unwrap());
    eprintln!("FIGURES local_state: requests per worker {per:?}");
    // HTTP/2 reaches the same !Send service.
    let out = Command::new("curl")
        .args(["--http2-prior-knowledge", "-s", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{}/h2", srv.port))
        .output()
        .expect("curl is needed for this test and could not be run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(" saw ") && text.contains(" request(s)"),
        "{text}"
    );
    assert_eq!(pids(&srv), before);
}

/// The benchmarks' plain service (`tests/programs/hello.rs`) answers `GET /` as the
/// pre-library demo did, so the before/after comparison serves the same bytes.
#[test]
fn hello_answers_like_the_pre_library_demo() {
    let srv = start_program("hello", None, &["--workers", "2"], "/");
    for (w, body) in hits(srv.port, "/", 20) {
        assert_eq!(body, format!("hello from worker {w}\n"));
    }
}

// ---- 6. a raw protocol on a second, named socket -------------------------------------------

/// `axum_state` under `systemd-socket-activate` with three sockets named `http`, `line` and
/// `other`: `(server, line port, other port)`; the server's `port` is the `http` one.
fn start_named_sockets(extra: &[&str]) -> (Server, u16, u16) {
    let (srv, ports) = spawn_named_sockets(
        &program("axum_state"),
        &["http", "line", "other"],
        extra,
        tempfile::tempdir().unwrap(),
    );
    let (p_line, p_other) = (ports[1], ports[2]);
    wait_answering(&srv, "/probe");
    (srv, p_line, p_other)
}

/// A line-protocol client: sends `line`, returns the reply line.
fn line_roundtrip(c: &mut BufReader<TcpStream>, line: &str) -> std::io::Result<String> {
    c.get_mut().write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    c.read_line(&mut reply)?;
    Ok(reply)
}

fn line_client(port: u16) -> BufReader<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    BufReader::new(s)
}

#[test]
fn raw_tcp_handler_serves_the_socket_named_line() {
    let (srv, p_line, p_other) = start_named_sockets(&["--workers", "2"]);
    let p_http = srv.port;

    // HTTP on the first socket.
    let r = get(p_http, "/hit").unwrap();
    assert_eq!(r.status, 200);
    assert!(r.header("x-worker").is_some());
    assert!(r.body.starts_with("worker "), "{r:?}");

    // The line protocol on the socket named `line`.
    let s = TcpStream::connect(("127.0.0.1", p_line)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut lines = BufReader::new(s);
    lines.get_mut().write_all(b"hello\n").unwrap();
    let mut reply = String::new();
    lines.read_line(&mut reply).unwrap();
    let worker = reply
        .strip_prefix("worker ")
        .and_then(|r| r.strip_suffix(": hello\n"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("reply {reply:?}"));
    assert!(
        worker == "0" || worker == "1",
        "reply from worker {worker:?}"
    );
    lines.get_mut().write_all(b"again\n").unwrap();
    reply.clear();
    lines.read_line(&mut reply).unwrap();
    assert_eq!(reply, format!("worker {worker}: again\n"));
    // The raw connection counts in `app status`.
    let counted = wait_until(Duration::from_secs(5), || {
        (connections(&srv).iter().map(|c| c.1).sum::<u64>() >= 1).then_some(())
    });
    assert!(counted.is_some(), "{:?}", connections(&srv));
    // The client ends it: the handler returns and the count falls back.
    drop(lines);
    let uncounted = wait_until(Duration::from_secs(5), || {
        (connections(&srv).iter().map(|c| c.1).sum::<u64>() == 0).then_some(())
    });
    assert!(uncounted.is_some(), "{:?}", connections(&srv));

    // Several line clients at once, each answered on its own connection.
    let mut clients: Vec<BufReader<TcpStream>> = (0..8)
        .map(|_| {
            let s = TcpStream::connect(("127.0.0.1", p_line)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            BufReader::new(s)
        })
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.get_mut()
            .write_all(format!("client {i}\n").as_bytes())
            .unwrap();
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mut reply = String::new();
        c.read_line(&mut reply).unwrap();
        assert!(reply.ends_with(&format!(": client {i}\n")), "{reply:?}");
    }

    // A named socket without a handler of its own goes to the default HTTP service.
    let r = get(p_other, "/hit").unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.starts_with("worker "), "{r:?}");
}

#[test]
fn raw_connection_is_served_through_the_drain_grace_of_a_reload() {
    let drain = Duration::from_secs(1);
    let (srv, p_line, _) = start_named_sockets(&["--workers", "1", "--drain-timeout", "1s"]);
    let old = pids(&srv)[0];
    let mut c = line_client(p_line);
    assert_eq!(line_roundtrip(&mut c, "one").unwrap(), "worker 0: one\n");
    let t0 = Instant::now();
    let (reloader, draining) = reload_beside(&srv, old, t0);
    assert!(draining.is_some(), "{:?}", srv.workers());
    // The draining worker still serves the connection it holds...
    assert_eq!(line_roundtrip(&mut c, "two").unwrap(), "worker 0: two\n");
    let t_echoed = t0.elapsed();
    // ...new connections go to the new generation...
    let mut fresh = line_client(p_line);
    assert_eq!(
        line_roundtrip(&mut fresh, "new").unwrap(),
        "worker 0: new\n"
    );
    // ...and at drain_timeout the old worker exits, closing it.
    let mut rest = String::new();
    let closed = c.read_line(&mut rest);
    let t_closed = t0.elapsed();
    // End of stream or a reset; not a read timeout, not more data.
    let ended = match &closed {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    assert!(
        ended,
        "raw connection not closed: {closed:?} {rest:?} after {t_closed:?}"
    );
    let gone = wait_until(drain + Duration::from_secs(2), || {
        (!alive(old)).then_some(())
    });
    assert!(gone.is_some(), "old worker {old} still alive");
    let t_gone = t0.elapsed();
    let (out, t_reloaded) = reloader.join().unwrap();
    eprintln!(
        "FIGURES raw connection during reload (drain_timeout 1s), ms after reload start: \
         echoed {} closed {} old worker gone {} reload returned {}",
        ms(t_echoed),
        ms(t_closed),
        ms(t_gone),
        ms(t_reloaded)
    );
    assert!(out.status.success(), "{}", reload_output(&out));
    assert!(t_gone <= drain + Duration::from_secs(1), "{t_gone:?}");
    assert!(
        t_closed >= Duration::from_millis(900),
        "closed early: {t_closed:?}"
    );
    // The connection opened during the drain is the new generation's, and still served.
    assert_eq!(
        line_roundtrip(&mut fresh, "later").unwrap(),
        "worker 0: later\n"
    );
}

// ---- 7. bytes that are not HTTP ------------------------------------------------------------

/// Sends `bytes` on a fresh connection and reads until the server closes it (bounded):
/// what it answered, if anything.
fn send_and_read_to_close(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The server may close before taking every byte: a write error is an answer too.
    let _ = s.write_all(bytes);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("connection not closed within 5 s ({e}); got {got:?}"),
        }
    }
}

/// The types of the HTTP/2 frames in `bytes`, in order.
fn frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        types.push(bytes[3]);
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    types
}

#[test]
fn garbage_and_tls_bytes_get_400_or_a_close_and_the_worker_lives() {
    let srv = Server::start(Launch::default());
    let before = pids(&srv);
    // The start of a TLS 1.2/1.3 ClientHello.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00, 0x00, 0xc4, 0x03, 0x03,
    ];
    hello.extend((0..32).map(|i| (i * 37 % 251) as u8));
    hello.extend([0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
    let mut noise = Vec::new();
    let mut x: u32 = 12345;
    for _ in 0..4096 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        noise.push((x >> 16) as u8);
    }
    let mut bad_h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bad_h2.extend([0xff; 64]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("TLS ClientHello", hello),
        ("binary noise", noise),
        ("garbage line", b"\x00\x01 hello? \xff\xfe\r\n\r\n".to_vec()),
        ("bad request line", b"GET\r\n\r\n".to_vec()),
        ("HTTP/2 preface then garbage", bad_h2),
    ];
    for (what, bytes) in &cases {
        let mut answers = Vec::new();
        for _ in 0..5 {
            let got = send_and_read_to_close(srv.port, bytes);
            if what.starts_with("HTTP/2") {
                // A SETTINGS frame, then a GOAWAY (type 7) before the close.
                let types = frame_types(&got);
                assert!(types.contains(&7), "{what}: frames {types:?} in {got:?}");
                answers.push(format!("h2 frames {types:?}"));
                continue;
            }
            let text = String::from_utf8_lossy(&got);
            let head = text.lines().next().unwrap_or_default().to_string();
            if got.starts_with(b"HTTP/") {
                assert!(head.starts_with("HTTP/1.1 400"), "{what}: {text}");
            } else {
                assert!(got.is_empty(), "{what}: not HTTP: {got:?}");
            }
            answers.push(if head.is_empty() {
                "closed".into()
            } else {
                head
            });
        }
        answers.dedup();
        eprintln!("FIGURES {what} (5 times): {answers:?}");
    }
    // Same workers, all serving.
    for _ in 0..10 {
        assert_eq!(get(srv.port, "/").unwrap().status, 200);
    }
    assert!(before.iter().all(|p| alive(*p)), "a worker died");
    let s = srv.report();
    assert_eq!(pids(&srv), before, "{s:?}");
    assert_eq!(s.serving_workers, s.target_workers, "{s:?}");
    assert_eq!(s.restarts_in_window, 0, "{s:?}");
}
