//! The control socket: how `app status` and `app reload` talk to a running master.
//!
//! A Unix stream socket, mode 0600 in a directory only its owner can enter, and every peer
//! is checked with `SO_PEERCRED`: only the master's own uid and root get an answer. The
//! protocol is one JSON line each way. A client that sends garbage gets an error reply; one
//! that sends nothing, or too much, is dropped after [`REQUEST_TIMEOUT`] / [`MAX_REQUEST`];
//! none of it reaches the master loop, which only ever sees well-formed requests.
//!
//! Where the socket lives: `control_socket` from the configuration if set, else
//! `$RUNTIME_DIRECTORY/control.sock` (systemd's `RuntimeDirectory=app` gives
//! `/run/app/control.sock`), else `$XDG_RUNTIME_DIR/app/control.sock`, else
//! `/tmp/app-<uid>/control.sock`. The client looks in the same places, and also at
//! `/run/app/control.sock`, so `app status` works from an operator's shell.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::exit;

pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_REQUEST: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Reload,
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

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusReport {
    pub master_pid: u32,
    pub state: String,
    pub generation: u64,
    pub target_workers: usize,
    pub serving_workers: usize,
    pub uptime_secs: f64,
    pub requests_total: u64,
    pub restarts_in_window: u32,
    pub restart_limit: u32,
    pub restart_window_secs: u64,
    pub listeners: Vec<String>,
    pub last_reload: Option<ReloadReport>,
    pub workers: Vec<WorkerReport>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    pub id: usize,
    pub pid: i32,
    pub cpu: usize,
    pub generation: u64,
    pub state: String,
    pub uptime_secs: f64,
    pub requests: u64,
    pub connections: u64,
    pub rss_bytes: u64,
    pub pss_bytes: Option<u64>,
    pub restarts: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReloadReport {
    pub generation: u64,
    pub ok: bool,
    pub message: String,
    pub duration_ms: u64,
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

/// Where a client looks when not told: the server's default, else the unit's location.
fn client_path() -> PathBuf {
    let p = default_path();
    let unit = PathBuf::from("/run/app/control.sock");
    if !p.exists() && std::env::var_os("RUNTIME_DIRECTORY").is_none() && unit.exists() {
        return unit;
    }
    p
}

/// Binds the socket and serves it until the runtime ends; requests go to `tx`.
pub fn serve(path: &Path, tx: mpsc::UnboundedSender<Incoming>) -> std::io::Result<()> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    // A stale socket from a previous run would make bind fail; a live one means another
    // master is running with the same path.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another master already answers on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
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
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64 + 1));
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
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
        Ok(Ok(_)) => match parse_request(&line) {
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
}

/// Parses one request line; the error is the reply text.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let wire: WireRequest =
        serde_json::from_str(line.trim()).map_err(|e| format!("bad request: {e}"))?;
    match wire.cmd.as_str() {
        "status" => Ok(Request::Status),
        "reload" => Ok(Request::Reload),
        other => Err(format!(
            "bad request: unknown command {other:?} (expected status or reload)"
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

/// Sends one request and waits for the reply (no timeout: a reload may take as long as the
/// drain). Errors are (exit code, message).
pub fn call(path: Option<&Path>, request: &Request) -> Result<Reply, (i32, String)> {
    use std::io::{BufRead, Write};
    let path = path.map(Path::to_path_buf).unwrap_or_else(client_path);
    let mut stream = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        (
            exit::UNAVAILABLE,
            format!(
                "cannot reach the master at {}: {e} (is the service running? see --control-socket)",
                path.display()
            ),
        )
    })?;
    let mut line = serde_json::to_string(request).expect("requests serialise");
    line.push('\n');
    // A master that refuses us may answer and close before our request is written; its
    // answer says why, so read it even when the write failed.
    let written = stream.write_all(line.as_bytes());
    let mut reply = String::new();
    let read = std::io::BufReader::new(&stream).read_line(&mut reply);
    if reply.is_empty() {
        let why = match (written, read) {
            (Err(e), _) => format!("control socket write failed: {e}"),
            (_, Err(e)) => format!("control socket read failed: {e}"),
            _ => "the master closed the connection without a reply".into(),
        };
        return Err((exit::UNAVAILABLE, why));
    }
    serde_json::from_str(&reply).map_err(|e| {
        (
            exit::SOFTWARE,
            format!("unreadable reply from the master: {e}"),
        )
    })
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
    if let Some(r) = &s.last_reload {
        let _ = writeln!(
            out,
            "last reload: generation {} {} in {} ms: {}",
            r.generation,
            if r.ok { "succeeded" } else { "FAILED" },
            r.duration_ms,
            r.message
        );
    }
    let _ = writeln!(
        out,
        "{:>3} {:>8} {:>4} {:>4} {:<10} {:>9} {:>10} {:>6} {:>9} {:>9} {:>8}",
        "ID", "PID", "CPU", "GEN", "STATE", "UPTIME", "REQUESTS", "CONNS", "RSS", "PSS", "RESTARTS"
    );
    for w in &s.workers {
        let _ = writeln!(
            out,
            "{:>3} {:>8} {:>4} {:>4} {:<10} {:>9} {:>10} {:>6} {:>9} {:>9} {:>8}",
            w.id,
            w.pid,
            w.cpu,
            w.generation,
            w.state,
            human_secs(w.uptime_secs),
            w.requests,
            w.connections,
            human_bytes(w.rss_bytes),
            w.pss_bytes.map(human_bytes).unwrap_or_else(|| "-".into()),
            w.restarts
        );
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
        for junk in [
            "",
            "status",
            "{\"cmd\":\"rm -rf\"}",
            "{\"cmd\":\"status\",\"x\":1}",
            "\u{0}",
        ] {
            assert!(parse_request(junk).is_err(), "{junk:?}");
        }
    }
}
