//! Test harness: drives the real `app` binary through its real interfaces — processes,
//! signals, sockets, a `NOTIFY_SOCKET` datagram receiver, the control socket — and speaks
//! plain HTTP/1.1 over TCP so every byte on the wire is the server's own.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const APP: &str = env!("CARGO_BIN_EXE_app");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---- systemd's notify protocol, received for real ----------------------------------------

pub struct NotifySocket {
    pub path: PathBuf,
    sock: UnixDatagram,
    pub messages: Vec<(Instant, String)>,
}

impl NotifySocket {
    pub fn new(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        NotifySocket {
            path,
            sock,
            messages: Vec::new(),
        }
    }

    /// Collects datagrams until one contains `needle` (returns it) or `timeout` passes.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        if let Some((_, m)) = self.messages.iter().find(|(_, m)| m.contains(needle)) {
            return Some(m.clone());
        }
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).to_string();
                self.messages.push((Instant::now(), m.clone()));
                if m.contains(needle) {
                    return Some(m);
                }
            }
        }
        None
    }

    /// Drops what was received so far, including datagrams still queued in the socket.
    pub fn clear(&mut self) {
        self.sock.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4096];
        while self.sock.recv(&mut buf).is_ok() {}
        self.sock.set_nonblocking(false).unwrap();
        self.messages.clear();
    }

    pub fn drain_for(&mut self, d: Duration) {
        let _ = self.wait_for("\u{0}never\u{0}", d);
    }
}

// ---- the service under test ----------------------------------------------------------------

pub struct Server {
    pub child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub control: PathBuf,
    pub log: PathBuf,
    /// Its test's place beside the others (see [`heavy`]); dropped after the process.
    _gate: Light,
}

#[derive(Default)]
pub struct Launch {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub socket_activate: bool,
    pub notify: Option<PathBuf>,
    pub binary: Option<PathBuf>,
    pub dir: Option<tempfile::TempDir>,
}

impl Launch {
    pub fn args(mut self, a: &[&str]) -> Self {
        self.args.extend(a.iter().map(|s| s.to_string()));
        self
    }
}

impl Server {
    /// Starts `app serve` and waits until it answers HTTP.
    pub fn start(l: Launch) -> Server {
        let s = Server::spawn(l);
        s.wait_serving();
        s
    }

    pub fn spawn(l: Launch) -> Server {
        let gate = Light::take();
        let dir = l.dir.unwrap_or_else(|| tempfile::tempdir().unwrap());
        let port = free_port();
        let control = dir.path().join("control.sock");
        let log = dir.path().join("app.log");
        let bin = l.binary.clone().unwrap_or_else(|| PathBuf::from(APP));
        let mut cmd = if l.socket_activate {
            let mut c = Command::new("systemd-socket-activate");
            c.arg("-l").arg(format!("127.0.0.1:{port}"));
            c.arg("--fdname=http");
            if let Some(n) = &l.notify {
                c.arg(format!("--setenv=NOTIFY_SOCKET={}", n.display()));
            }
            c.arg(format!("--setenv=APP_CONTROL_SOCKET={}", control.display()));
            for (k, v) in &l.env {
                c.arg(format!("--setenv={k}={v}"));
            }
            c.arg(&bin).arg("serve");
            c
        } else {
            let mut c = Command::new(&bin);
            c.arg("serve")
                .arg("--bind")
                .arg(format!("127.0.0.1:{port}"));
            c.env("APP_CONTROL_SOCKET", &control);
            if let Some(n) = &l.notify {
                c.env("NOTIFY_SOCKET", n);
            }
            for (k, v) in &l.env {
                c.env(k, v);
            }
            c
        };
        cmd.args(&l.args)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .process_group(0);
        let child = cmd.spawn().unwrap();
        Server {
            child,
            port,
            dir,
            control,
            log,
            _gate: gate,
        }
    }

    /// Starts with `toml` as its config file (`config_path()`), plus `args`.
    pub fn with_config(toml: &str, args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("app.toml");
        std::fs::write(&file, toml).unwrap();
        let file = file.to_str().unwrap().to_string();
        let mut all = vec!["--config", file.as_str()];
        all.extend_from_slice(args);
        Server::start(
            Launch {
                dir: Some(dir),
                ..Default::default()
            }
            .args(&all),
        )
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("app.toml")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn wait_serving(&self) {
        let ok = wait_until(Duration::from_secs(10), || {
            get(self.port, "/healthz").ok().filter(|r| r.status == 200)
        });
        assert!(
            ok.is_some(),
            "server never answered; log:\n{}",
            self.log_text()
        );
        // All workers, not just the first one, must be up.
        let n = wait_until(Duration::from_secs(10), || {
            let s = self.status().ok()?;
            (s["serving_workers"] == s["target_workers"]).then_some(())
        });
        assert!(n.is_some(), "pool never full; log:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for the master to exit; None on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || self.child.try_wait().ok().flatten())
    }

    /// One request over the control socket, without spawning the client binary.
    pub fn control(&self, request: &str) -> std::io::Result<serde_json::Value> {
        let mut s = UnixStream::connect(&self.control)?;
        s.write_all(request.as_bytes())?;
        s.write_all(b"\n")?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        serde_json::from_str(&line).map_err(std::io::Error::other)
    }

    pub fn status(&self) -> std::io::Result<serde_json::Value> {
        let r = self.control("{\"cmd\":\"status\"}")?;
        Ok(r["status"].clone())
    }

    /// `app status`, typed (what `app status --json` prints).
    pub fn report(&self) -> app::StatusReport {
        serde_json::from_value(self.status().unwrap()).expect("a status report")
    }

    /// Live workers as (slot, pid, cpu, generation, state).
    pub fn workers(&self) -> Vec<(u64, i32, u64, u64, String)> {
        self.report()
            .workers
            .into_iter()
            .map(|w| (w.id as u64, w.pid, w.cpu as u64, w.generation, w.state))
            .collect()
    }

    /// Waits until `n` workers are ready and `gone` is not among them (a replacement).
    pub fn wait_replaced_all(&self, gone: i32, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || {
            let ws = self.workers();
            (ws.iter().filter(|w| w.4 == "ready").count() == n && !ws.iter().any(|w| w.1 == gone))
                .then_some(())
        })
        .is_some()
    }

    /// Runs the real client binary: `app <args> --control-socket <ours>`.
    pub fn client(&self, args: &[&str]) -> std::process::Output {
        Command::new(APP)
            .args(args)
            .arg("--control-socket")
            .arg(&self.control)
            .output()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The whole process group: master and every worker, whatever state the test left.
        unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

pub fn alive(pid: i32) -> bool {
    // A zombie is dead for our purposes.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

pub fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| alive(*p))
        .collect()
}

// ---- HTTP/1.1 by hand ------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request on a fresh connection.
pub fn get(port: u16, path: &str) -> std::io::Result<Response> {
    let mut c = Conn::open(port)?;
    c.request(&format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    ))
}

/// A keep-alive connection.
pub struct Conn {
    reader: BufReader<TcpStream>,
    pub closed: bool,
}

impl Conn {
    pub fn open(port: u16) -> std::io::Result<Conn> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_nodelay(true)?;
        Ok(Conn {
            reader: BufReader::new(s),
            closed: false,
        })
    }

    pub fn set_timeout(&self, d: Duration) {
        self.reader.get_ref().set_read_timeout(Some(d)).unwrap();
    }

    /// Reads whatever arrives next; Ok(0) means the server closed the connection.
    pub fn read_some(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reader.read(buf)
    }

    pub fn send_raw(&mut self, raw: &[u8]) -> std::io::Result<()> {
        self.reader.get_mut().write_all(raw)
    }

    pub fn get(&mut self, path: &str) -> std::io::Result<Response> {
        self.request(&format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n"))
    }

    pub fn request(&mut self, raw: &str) -> std::io::Result<Response> {
        self.send_raw(raw.as_bytes())?;
        self.read_response()
    }

    pub fn read_response(&mut self) -> std::io::Result<Response> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before a response",
            ));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body)?;
        let resp = Response {
            status,
            headers,
            body: String::from_utf8_lossy(&body).to_string(),
        };
        if resp
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            self.closed = true;
        }
        Ok(resp)
    }
}

// ---- load --------------------------------------------------------------------------------

#[derive(Debug, Default, Clone)]
pub struct LoadStats {
    pub ok: u64,
    pub failed: u64,
    pub errors: Vec<String>,
}

/// Clients sending `GET /` back to back until `stop` is set: `keepalive` clients reuse their
/// connection (opening a new one when the server says `Connection: close`), the others open
/// one per request. A request fails on any error or non-200 answer.
pub fn load(
    port: u16,
    keepalive: usize,
    fresh: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<LoadStats>> {
    use std::sync::atomic::Ordering;
    let mut handles = Vec::new();
    for i in 0..(keepalive + fresh) {
        let stop = stop.clone();
        let ka = i < keepalive;
        handles.push(std::thread::spawn(move || {
            let mut st = LoadStats::default();
            let mut conn: Option<Conn> = None;
            while !stop.load(Ordering::Relaxed) {
                let result = if ka {
                    if conn.as_ref().is_none_or(|c| c.closed) {
                        conn = Conn::open(port).ok();
                    }
                    match conn.as_mut() {
                        Some(c) => c.get("/"),
                        None => Err(std::io::Error::other("connect failed")),
                    }
                } else {
                    get(port, "/")
                };
                match result {
                    Ok(r) if r.status == 200 => st.ok += 1,
                    Ok(r) => {
                        st.failed += 1;
                        st.errors.push(format!("status {}", r.status));
                    }
                    Err(e) => {
                        st.failed += 1;
                        st.errors.push(e.to_string());
                        conn = None;
                    }
                }
            }
            st
        }));
    }
    handles
}

pub fn join_load(h: Vec<std::thread::JoinHandle<LoadStats>>) -> LoadStats {
    let mut total = LoadStats::default();
    for s in h.into_iter().map(|h| h.join().unwrap()) {
        total.ok += s.ok;
        total.failed += s.failed;
        total.errors.extend(s.errors);
    }
    total
}

pub type Shared<T> = Arc<Mutex<T>>;

pub fn cpus_allowed(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Cpus_allowed_list:"))
        .map(|l| l.split(':').nth(1).unwrap().trim().to_string())
        .unwrap_or_default()
}

pub fn ncpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Runs `app serve ...` to completion (for start-up errors): (exit code, stderr).
pub fn run_to_exit(mut cmd: Command) -> (i32, String) {
    let out = cmd
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Starts `bin serve args...` under `systemd-socket-activate` with one listening socket per
/// name (on free loopback ports, in that order) and the control socket in `dir`; returns the
/// server, whose `port` is the first socket's, and every socket's port. Waits for nothing.
pub fn spawn_named_sockets(
    bin: &Path,
    names: &[&str],
    args: &[&str],
    dir: tempfile::TempDir,
) -> (Server, Vec<u16>) {
    let gate = Light::take();
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let control = dir.path().join("control.sock");
    let log = dir.path().join("app.log");
    let mut cmd = Command::new("systemd-socket-activate");
    for p in &ports {
        cmd.arg("-l").arg(format!("127.0.0.1:{p}"));
    }
    cmd.arg(format!("--fdname={}", names.join(":")))
        .arg(format!("--setenv=APP_CONTROL_SOCKET={}", control.display()))
        .arg(bin)
        .arg("serve")
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .process_group(0);
    let child = cmd
        .spawn()
        .expect("systemd-socket-activate is needed for this test and could not be run");
    let srv = Server {
        child,
        port: ports[0],
        dir,
        control,
        log,
        _gate: gate,
    };
    (srv, ports)
}

/// Tests run side by side (`cargo test` runs each file's tests on one thread per CPU), but
/// those that load the machine, measure fairness or hold a time bound run alone: they take
/// [`heavy`] first, which waits until no other test of the file has a server running, and
/// keeps new servers of other tests from starting until it is done. (Fairness across two
/// workers is what a second test's reload beside it spoils; the exact bounds of supervision —
/// hang detection, backoff, deadlines — are unit tests of the master's core, with a fake
/// clock.)
pub fn heavy() -> Heavy {
    let mut g = GATE.state.lock().unwrap_or_else(|e| e.into_inner());
    while g.heavy || g.light > 0 {
        g = GATE.free.wait(g).unwrap_or_else(|e| e.into_inner());
    }
    g.heavy = true;
    g.owner = Some(std::thread::current().id());
    Heavy
}

/// A heavy test's turn; others' servers start again when it ends.
pub struct Heavy;

impl Drop for Heavy {
    fn drop(&mut self) {
        let mut g = GATE.state.lock().unwrap_or_else(|e| e.into_inner());
        g.heavy = false;
        g.owner = None;
        GATE.free.notify_all();
    }
}

/// Held by every [`Server`] of a test that is not heavy, for the server's life.
pub struct Light(bool);

impl Light {
    fn take() -> Light {
        let mut g = GATE.state.lock().unwrap_or_else(|e| e.into_inner());
        // The heavy test's own servers.
        if g.owner == Some(std::thread::current().id()) {
            return Light(false);
        }
        while g.heavy {
            g = GATE.free.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.light += 1;
        Light(true)
    }
}

impl Drop for Light {
    fn drop(&mut self) {
        if self.0 {
            let mut g = GATE.state.lock().unwrap_or_else(|e| e.into_inner());
            g.light -= 1;
            GATE.free.notify_all();
        }
    }
}

struct Gate {
    state: Mutex<GateState>,
    free: std::sync::Condvar,
}

struct GateState {
    heavy: bool,
    owner: Option<std::thread::ThreadId>,
    light: usize,
}

static GATE: Gate = Gate {
    state: Mutex::new(GateState {
        heavy: false,
        owner: None,
        light: 0,
    }),
    free: std::sync::Condvar::new(),
};

/// A test that cannot run here (it needs root, or a kernel feature) says so where it is
/// seen: straight to stderr, which the test harness does not capture, so the line shows in
/// `cargo test`'s output even though the test passes. Under `APP_TESTS_MUST_RUN=1` (CI, which
/// runs as root) it fails instead: there every such check must really run.
pub fn cannot_run(what: &str) {
    if std::env::var_os("APP_TESTS_MUST_RUN").is_some_and(|v| v == "1") {
        panic!("cannot run here, and APP_TESTS_MUST_RUN=1: {what}");
    }
    skipped(what);
}

/// Says, where it is seen, that a check was not made because of something about this host
/// that no setting fixes (too few CPUs, a checkout in a directory anyone can write, a host
/// too busy to measure): not a failure even in CI, but never silent.
pub fn skipped(what: &str) {
    say(&format!("SKIPPED (cannot run here): {what}"));
}

/// A line on stderr that the test harness does not capture: seen even when the test passes.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr()
        .lock()
        .write_all(format!("\n{line}\n").as_bytes());
}

/// The IPC channel's descriptor number in worker `pid`, as the master told it
/// (`APP_WORKER_FD` in its environment, see `src/contract.rs`).
pub fn worker_channel_fd(pid: i32) -> Option<i32> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"APP_WORKER_FD="))
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
}
