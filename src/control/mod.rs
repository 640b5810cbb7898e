//! The control socket: how `app status` and `app reload` talk to a running master.
//!
//! A Unix stream socket, mode 0600 in a directory only its owner can enter, and every peer
//! is checked with `SO_PEERCRED`: only the master's own uid and root get an answer. The
//! protocol is one JSON line each way. A client that sends garbage (including bytes that are
//! not UTF-8) gets an error reply; one that sends nothing, or too much, is dropped after
//! [`REQUEST_TIMEOUT`] / [`MAX_REQUEST`]; none of it reaches the master loop, which only ever
//! sees well-formed requests.
//!
//! Where the socket lives: `control_socket` from the configuration if set, else
//! `$RUNTIME_DIRECTORY/control.sock` (systemd's `RuntimeDirectory=app` gives
//! `/run/app/control.sock`), else `$XDG_RUNTIME_DIR/app/control.sock`, else
//! `/tmp/app-<uid>/control.sock`. What the master checks before binding there, and what it
//! removes at exit, is in [`place`]; how the client finds and checks the master is in
//! [`client`].

mod client;
mod place;

pub use client::{call, parse_timeout};
pub use place::remove_own_socket;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::exit::Fatal;

pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_REQUEST: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Reload,
    /// Answer readiness probes with "draining" until [`Request::Undrain`] (`app drain`).
    Drain,
    Undrain,
    /// Resize the serving pool now (`app scale N|+N|-N`): exactly one of `to` (an absolute
    /// size) or `by` (a change). Holds until a reload that changes `workers` in the file.
    Scale {
        #[serde(skip_serializing_if = "Option::is_none")]
        to: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        by: Option<i64>,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusReport>,
}

impl Reply {
    pub fn error(e: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(e.into()),
            ..Default::default()
        }
    }
}

/// `app status`: the pool as the master sees it (`app status --json` prints it).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusReport {
    /// The master's pid (systemd's `MainPID`).
    pub master_pid: u32,
    /// `starting`, `serving`, `reloading` or `stopping`.
    pub state: String,
    /// The generation that serves.
    pub generation: u64,
    /// Workers the pool is kept at now.
    pub target_workers: usize,
    /// Ready workers of the serving generation.
    pub serving_workers: usize,
    /// Since the master started.
    pub uptime_secs: f64,
    /// Requests answered since the master started, across reloads and restarts.
    pub requests_total: u64,
    /// Unplanned restarts within the restart window.
    pub restarts_in_window: u32,
    /// `restart_limit`: more restarts than this within the window and the master gives up.
    pub restart_limit: u32,
    /// `restart_window`, in seconds.
    pub restart_window_secs: u64,
    /// The listening sockets, described.
    pub listeners: Vec<String>,
    /// The latest reload, successful or not.
    pub last_reload: Option<ReloadReport>,
    /// Every live worker, of every generation.
    pub workers: Vec<WorkerReport>,
    /// Worker starts that failed for want of a host resource (descriptors, processes,
    /// memory): retried with backoff, not counted against `restart_limit`.
    #[serde(default)]
    pub spawn_failures: u64,
    /// The latest failed worker start, of either kind, with its slot.
    #[serde(default)]
    pub last_spawn_error: Option<String>,
    /// Round-robin: connections the master holds that no worker has taken yet, and how
    /// many it may hold before it stops accepting.
    #[serde(default)]
    pub master_connections: u64,
    /// Round-robin: the most connections the master holds before it stops accepting.
    #[serde(default)]
    pub master_connection_cap: u64,
    /// The master's own build (it keeps running the binary it started from until a
    /// restart; each generation of workers runs the binary on disk when it started).
    #[serde(default)]
    pub version: String,
    /// `workers` in the configuration; `target_workers` differs after a runtime scale.
    #[serde(default)]
    pub configured_workers: usize,
    /// Each generation still alive, with the build its workers run.
    #[serde(default)]
    pub generations: Vec<GenerationReport>,
    /// Keys whose new value in the configuration file is not in effect until a restart.
    #[serde(default)]
    pub restart_needed: Vec<String>,
    /// The serving generation's TLS certificate, when `[tls]` is on.
    #[serde(default)]
    pub tls: Option<TlsReport>,
    /// What the readiness endpoint and the agent-check say.
    #[serde(default)]
    pub readiness: crate::loadboard::Readiness,
    /// The drain under way (`app drain`, or a stop's `drain_delay`).
    #[serde(default)]
    pub drain: Option<DrainReport>,
}

/// A drain under way.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DrainReport {
    /// Asked for with `app drain` (lasts until `app undrain`).
    pub manual: bool,
    /// How long it has lasted.
    pub secs: f64,
    /// A stop waits for the end of the drain delay: how long until it begins.
    pub stop_in_secs: Option<f64>,
}

/// The serving certificate.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TlsReport {
    /// The leaf certificate's serial number (hex).
    pub serial: String,
    /// Whole days until it expires.
    pub days_left: i64,
    /// Its end of validity, Unix seconds.
    pub not_after: i64,
}

/// A generation with live workers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GenerationReport {
    /// Its number: 1 at start, one more per reload.
    pub generation: u64,
    /// What its workers reported when they became ready; `None` before any did.
    pub version: Option<String>,
    /// Its live workers.
    pub workers: usize,
}

/// One worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Its slot (`WORKER_ID` in the journal).
    pub id: usize,
    /// Its process.
    pub pid: i32,
    /// Its slot's home CPU.
    pub cpu: usize,
    /// The generation it belongs to.
    pub generation: u64,
    /// `starting`, `ready`, `retiring` (serving while its replacement starts) or
    /// `draining`.
    pub state: String,
    /// Since it started.
    pub uptime_secs: f64,
    /// Requests it served, as of its latest heartbeat answer.
    pub requests: u64,
    /// Connections it holds, as of its latest heartbeat answer.
    pub connections: u64,
    /// Resident memory, every shared page counted in full.
    pub rss_bytes: u64,
    /// Proportional memory (shared pages divided among their users), where the kernel
    /// offers it: what `max_memory` is compared with.
    pub pss_bytes: Option<u64>,
    /// Unplanned restarts of its slot since the master started.
    pub restarts: u32,
    /// The build this worker runs, as it reported when ready.
    #[serde(default)]
    pub version: Option<String>,
    /// CPU time (user + system) over wall time between the master's last two samples
    /// (`/proc/<pid>/stat`, about once a second); 100 = one whole CPU.
    #[serde(default)]
    pub cpu_percent: f64,
    /// Requests per second between the worker's last two heartbeat answers.
    #[serde(default)]
    pub requests_per_sec: f64,
    /// Requests per second over the last heartbeat interval, from the metrics page (the
    /// endpoint's `app_worker_requests_per_second`).
    #[serde(default)]
    pub rps_last_interval: f64,
    /// 99th percentile request duration over that interval, in ms (the endpoint's
    /// `app_worker_request_duration_p99_seconds`); 0 without requests.
    #[serde(default)]
    pub p99_ms_last_interval: f64,
    /// `pinned` (to `cpu`), `widened` (by `cpu_affinity = auto`, its CPU being
    /// contended), `none` or `list` (a fixed mask).
    #[serde(default)]
    pub affinity: String,
    /// The CPUs it may run on, e.g. `0-3`.
    #[serde(default)]
    pub cpus_allowed: String,
}

/// A reload's outcome.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReloadReport {
    /// The generation it started.
    pub generation: u64,
    /// Whether that generation now serves.
    pub ok: bool,
    /// What happened, or why it failed.
    pub message: String,
    /// From the request to `READY=1`.
    pub duration_ms: u64,
    /// Connections of the old generation that were cut: their workers were still busy at
    /// `drain_timeout` (or hung while draining) and were killed.
    #[serde(default)]
    pub connections_cut: u64,
    /// Workers of the new generation (0 when the reload failed before starting any).
    #[serde(default)]
    pub workers: usize,
    /// The build the new generation runs.
    #[serde(default)]
    pub version: Option<String>,
    /// Keys changed in the file that need a restart: not applied, everything else was.
    #[serde(default)]
    pub restart_needed: Vec<String>,
}

/// A request from a client, and where its reply goes.
pub struct Incoming {
    pub request: Request,
    pub reply: oneshot::Sender<Reply>,
}

/// The default socket path for this process (see the module docs).
pub fn default_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") {
        // systemd may pass several, colon-separated; ours is the first.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        if !first.is_empty() {
            return Path::new(&first).join("control.sock");
        }
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&dir).join("app").join("control.sock");
    }
    PathBuf::from(format!("/tmp/app-{}/control.sock", nix::unistd::geteuid()))
}

/// Binds the socket (see [`place`] for what is refused: exit 78, one line) and serves it
/// until the runtime ends; requests go to `tx`. Call [`remove_own_socket`] at exit.
pub fn serve(path: &Path, tx: mpsc::UnboundedSender<Incoming>) -> Result<(), Fatal> {
    // A default location is the master's own and must be 0700; a configured one may be
    // readable by others (see `place`).
    let listener = place::bind(path, path == default_path())?;
    let listener = listener
        .set_nonblocking(true)
        .and_then(|()| UnixListener::from_std(listener))
        .map_err(|e| Fatal::os(format!("control socket: {}: {e}", path.display())))?;
    let me = nix::unistd::geteuid().as_raw();
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let tx = tx.clone();
                    tokio::spawn(async move { handle_client(stream, me, tx).await });
                }
                Err(e) => {
                    tracing::warn!("control socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

async fn handle_client(stream: UnixStream, me: u32, tx: mpsc::UnboundedSender<Incoming>) {
    let uid = match stream.peer_cred() {
        Ok(c) => c.uid(),
        Err(_) => return,
    };
    let (read, mut write) = stream.into_split();
    if uid != me && uid != 0 {
        tracing::warn!(
            peer_uid = uid,
            "control socket: refused a client with another uid"
        );
        let _ = write_reply(
            &mut write,
            &Reply::error(format!("permission denied for uid {uid}")),
        )
        .await;
        return;
    }
    let mut line = Vec::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64 + 1));
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let request = match read {
        Err(_) => {
            let _ = write_reply(&mut write, &Reply::error("timed out waiting for a request")).await;
            return;
        }
        Ok(Err(_)) | Ok(Ok(0)) => return,
        Ok(Ok(_)) if line.len() > MAX_REQUEST => {
            let _ = write_reply(&mut write, &Reply::error("request too long")).await;
            return;
        }
        Ok(Ok(_)) => match std::str::from_utf8(&line)
            .map_err(|_| "bad request: not UTF-8".to_string())
            .and_then(parse_request)
        {
            Ok(r) => r,
            Err(e) => {
                let _ = write_reply(&mut write, &Reply::error(e)).await;
                return;
            }
        },
    };
    let (reply_tx, reply_rx) = oneshot::channel();
    if tx
        .send(Incoming {
            request,
            reply: reply_tx,
        })
        .is_err()
    {
        return;
    }
    if let Ok(reply) = reply_rx.await {
        let _ = write_reply(&mut write, &reply).await;
    }
}

/// The request as it arrives; a struct so that unknown fields are refused (serde ignores
/// them on tagged unit variants).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRequest {
    cmd: String,
    #[serde(default)]
    to: Option<u64>,
    #[serde(default)]
    by: Option<i64>,
}

/// Parses one request line; the error is the reply text.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let wire: WireRequest =
        serde_json::from_str(line.trim()).map_err(|e| format!("bad request: {e}"))?;
    match (wire.cmd.as_str(), wire.to, wire.by) {
        ("status", None, None) => Ok(Request::Status),
        ("reload", None, None) => Ok(Request::Reload),
        ("drain", None, None) => Ok(Request::Drain),
        ("undrain", None, None) => Ok(Request::Undrain),
        ("scale", Some(to), None) => Ok(Request::Scale {
            to: Some(to),
            by: None,
        }),
        ("scale", None, Some(by)) => Ok(Request::Scale {
            to: None,
            by: Some(by),
        }),
        ("scale", _, _) => Err("bad request: scale takes exactly one of \"to\" or \"by\"".into()),
        ("status" | "reload" | "drain" | "undrain", _, _) => {
            Err(format!("bad request: {} takes no arguments", wire.cmd))
        }
        (other, _, _) => Err(format!(
            "bad request: unknown command {other:?} (expected status, reload, scale, drain or undrain)"
        )),
    }
}

async fn write_reply(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    reply: &Reply,
) -> std::io::Result<()> {
    let mut text = serde_json::to_string(reply).unwrap_or_else(|_| "{\"ok\":false}".into());
    text.push('\n');
    w.write_all(text.as_bytes()).await
}

// ---- client side -------------------------------------------------------------------------

/// `s` with every control character (C0, DEL, C1) and bidirectional override escaped as
/// `\u{..}`, so text from a socket cannot drive the terminal it is printed on.
pub fn printable(s: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let bidi = matches!(c, '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// `app status` as a table.
pub fn render_table(s: &StatusReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "master pid {}  state {}  generation {}  workers {}/{}  uptime {}  requests {}  restarts {}/{} in {}s",
        s.master_pid,
        s.state,
        s.generation,
        s.serving_workers,
        s.target_workers,
        human_secs(s.uptime_secs),
        s.requests_total,
        s.restarts_in_window,
        s.restart_limit,
        s.restart_window_secs
    );
    let _ = writeln!(out, "listening on {}", s.listeners.join(", "));
    let _ = match &s.drain {
        None => writeln!(out, "readiness {}", s.readiness.as_str()),
        Some(d) => writeln!(
            out,
            "readiness {} for {}{}{}",
            s.readiness.as_str(),
            human_secs(d.secs),
            if d.manual { " (app drain)" } else { "" },
            d.stop_in_secs
                .map(|t| format!(", stop begins in {}", human_secs(t)))
                .unwrap_or_default()
        ),
    };
    if !s.version.is_empty() {
        let _ = writeln!(out, "master version {}", s.version);
    }
    if s.configured_workers != 0 && s.configured_workers != s.target_workers {
        let _ = writeln!(
            out,
            "scaled to {} workers at run time (configuration: {}; a reload that changes workers applies the file)",
            s.target_workers, s.configured_workers
        );
    }
    for g in &s.generations {
        let _ = writeln!(
            out,
            "generation {}: {} worker(s), version {}",
            g.generation,
            g.workers,
            g.version.as_deref().unwrap_or("not reported yet")
        );
    }
    if let Some(t) = &s.tls {
        let _ = writeln!(
            out,
            "TLS certificate serial {}: {} day(s) left",
            t.serial, t.days_left
        );
    }
    if !s.restart_needed.is_empty() {
        let _ = writeln!(
            out,
            "restart needed to apply: {} (systemctl restart app)",
            s.restart_needed.join("; ")
        );
    }
    if let Some(r) = &s.last_reload {
        if r.ok {
            let _ = writeln!(
                out,
                "last reload: generation {} succeeded in {} ms: {}",
                r.generation, r.duration_ms, r.message
            );
        } else {
            let _ = writeln!(
                out,
                "last reload failed: {} (generation {}, after {} ms; the previous generation still serves)",
                r.message, r.generation, r.duration_ms
            );
        }
    }
    let _ = writeln!(
        out,
        "{:>3} {:>8} {:>4} {:>4} {:<10} {:>9} {:>6} {:>8} {:>8} {:>10} {:>6} {:>9} {:>9} {:>8}",
        "ID",
        "PID",
        "CPU",
        "GEN",
        "STATE",
        "UPTIME",
        "CPU%",
        "REQ/S",
        "P99",
        "REQUESTS",
        "CONNS",
        "RSS",
        "PSS",
        "RESTARTS"
    );
    for w in &s.workers {
        let _ = writeln!(
            out,
            "{:>3} {:>8} {:>4} {:>4} {:<10} {:>9} {:>6.1} {:>8.0} {:>8} {:>10} {:>6} {:>9} {:>9} {:>8}",
            w.id,
            w.pid,
            w.cpu,
            w.generation,
            w.state,
            human_secs(w.uptime_secs),
            w.cpu_percent,
            w.requests_per_sec,
            format!("{:.2}ms", w.p99_ms_last_interval),
            w.requests,
            w.connections,
            human_bytes(w.rss_bytes),
            w.pss_bytes.map(human_bytes).unwrap_or_else(|| "-".into()),
            w.restarts
        );
    }
    if s.workers.iter().any(|w| !w.affinity.is_empty()) {
        let list: Vec<String> = s
            .workers
            .iter()
            .map(|w| format!("{} {} {}", w.id, w.affinity, w.cpus_allowed))
            .collect();
        let _ = writeln!(out, "affinity (ID MODE CPUS): {}", list.join(", "));
    }
    out
}

fn human_secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1}GiB", b as f64 / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.1}MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{}KiB", b >> 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_and_rejects_garbage() {
        assert_eq!(parse_request("{\"cmd\":\"status\"}\n"), Ok(Request::Status));
        assert_eq!(parse_request("{\"cmd\":\"reload\"}"), Ok(Request::Reload));
        assert_eq!(parse_request("{\"cmd\":\"drain\"}"), Ok(Request::Drain));
        assert_eq!(parse_request("{\"cmd\":\"undrain\"}"), Ok(Request::Undrain));
        assert!(parse_request("{\"cmd\":\"drain\",\"to\":1}").is_err());
        assert_eq!(
            parse_request("{\"cmd\":\"scale\",\"to\":3}"),
            Ok(Request::Scale {
                to: Some(3),
                by: None
            })
        );
        assert_eq!(
            parse_request("{\"cmd\":\"scale\",\"by\":-1}"),
            Ok(Request::Scale {
                to: None,
                by: Some(-1)
            })
        );
        for junk in [
            "{\"cmd\":\"scale\"}",
            "{\"cmd\":\"scale\",\"to\":3,\"by\":1}",
            "{\"cmd\":\"status\",\"to\":3}",
            "",
            "status",
            "{\"cmd\":\"rm -rf\"}",
            "{\"cmd\":\"status\",\"x\":1}",
            "\u{0}",
        ] {
            assert!(parse_request(junk).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn printable_escapes_control_and_bidi_characters() {
        assert_eq!(printable("ok: reloaded"), "ok: reloaded");
        assert_eq!(printable("\u{1b}[31mred\n"), "\\u{1b}[31mred\\u{a}");
        assert_eq!(
            printable("a\u{9b}b\u{7f}\u{202e}"),
            "a\\u{9b}b\\u{7f}\\u{202e}"
        );
        assert_eq!(printable("généré"), "généré");
    }
}
