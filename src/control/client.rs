//! The `status` / `reload` client: finds the master, makes sure it is one, and never lets
//! what answers hang it, flood it or write to the operator's terminal.
//!
//! - Which socket: `--control-socket` / `APP_CONTROL_SOCKET` when given, and only that.
//!   Otherwise the first that exists of `$RUNTIME_DIRECTORY/control.sock` (the client runs
//!   inside the unit, as `ExecReload=`), `/run/app/control.sock` (the shipped unit's),
//!   `$XDG_RUNTIME_DIR/app/control.sock` and `/tmp/app-<euid>/control.sock`: the service's
//!   path wins over the by-hand ones, which `sudo` would otherwise point at `/tmp/app-0`.
//! - Who answers: the peer's uid (`SO_PEERCRED`) must be root, the client's own, or the
//!   owner of a socket directory that only root could have handed out (every directory
//!   above it root-owned and not writable by others, like systemd's `/run/app` for a
//!   `DynamicUser=`). Anything else is not believed.
//! - Bounds: the connection must be accepted within [`CONNECT_TIMEOUT`] (or the timeout,
//!   if shorter); the whole reply must arrive within the timeout (`--timeout`, default
//!   [`STATUS_TIMEOUT`] for status and [`RELOAD_TIMEOUT`] for reload, which waits for the
//!   drain) and be at most [`MAX_REPLY`] bytes.
//! - Output: every string in the reply has its control characters (and bidirectional
//!   overrides) escaped before anyone prints it.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Reply, Request, printable};
use crate::exit;

/// The master is busy or stuck: try again later (`sysexits.h` `EX_TEMPFAIL`).
pub const TEMPFAIL: i32 = 75;
/// The reply broke the protocol: too long or not JSON (`EX_PROTOCOL`).
pub const PROTOCOL: i32 = 76;
/// Not allowed to talk to the master (`EX_NOPERM`).
pub const NOPERM: i32 = 77;

pub const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(300);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_REPLY: usize = 1 << 20;

/// The service's socket under the shipped unit (`RuntimeDirectory=app`).
const UNIT_PATH: &str = "/run/app/control.sock";

/// Parses `--timeout` / `APP_CONTROL_TIMEOUT`: a duration such as `30s` or `5m`, above 0.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

/// Sends one request and waits, within the timeout, for the reply. Errors are (exit code,
/// one line naming the socket and the reason).
pub fn call(
    path: Option<&Path>,
    timeout: Option<Duration>,
    request: &Request,
) -> Result<Reply, (i32, String)> {
    let timeout = timeout.unwrap_or(match request {
        Request::Status | Request::Scale { .. } | Request::Drain | Request::Undrain => {
            STATUS_TIMEOUT
        }
        Request::Reload => RELOAD_TIMEOUT,
    });
    let deadline = Instant::now() + timeout;
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => discover()?,
    };
    let shown = printable(&path.display().to_string());
    let stream = connect(&path, timeout.min(CONNECT_TIMEOUT))
        .map_err(|e| connect_error(&path, &shown, e, timeout.min(CONNECT_TIMEOUT)))?;
    trust(&stream, &path, &shown)?;

    let mut line = serde_json::to_string(request).expect("requests serialise");
    line.push('\n');
    let _ = stream.set_write_timeout(Some(timeout.min(CONNECT_TIMEOUT)));
    // A master that refuses us may answer and close before our request is written; its
    // answer says why, so read it even when the write failed.
    let written = (&stream).write_all(line.as_bytes());
    let bytes = match read_line(&stream, deadline) {
        Ok(b) => b,
        Err(ReadError::Timeout) => {
            return Err((
                TEMPFAIL,
                format!(
                    "no reply from the master at {shown} within {} (see --timeout)",
                    humantime::format_duration(timeout)
                ),
            ));
        }
        Err(ReadError::TooLong) => {
            return Err((
                PROTOCOL,
                format!("the reply from {shown} is longer than {MAX_REPLY} bytes; ignoring it"),
            ));
        }
        Err(ReadError::Io(e)) => {
            return Err((
                exit::UNAVAILABLE,
                format!("reading the reply from {shown} failed: {e}"),
            ));
        }
    };
    if bytes.is_empty() {
        let why = match written {
            Err(e) => format!("writing to {shown} failed: {e}"),
            Ok(()) => format!("the master at {shown} closed the connection without a reply"),
        };
        return Err((exit::UNAVAILABLE, why));
    }
    let mut reply: Reply = serde_json::from_slice(&bytes).map_err(|e| {
        (
            PROTOCOL,
            format!("unreadable reply from the master at {shown}: {e}"),
        )
    })?;
    sanitize(&mut reply);
    Ok(reply)
}

/// The default socket, when none was named (see the module docs).
fn discover() -> Result<PathBuf, (i32, String)> {
    let mut candidates = Vec::new();
    if std::env::var_os("RUNTIME_DIRECTORY").is_some() {
        candidates.push(super::default_path());
    }
    candidates.push(PathBuf::from(UNIT_PATH));
    candidates.push(super::default_path());
    candidates.dedup();
    for c in &candidates {
        if std::fs::symlink_metadata(c).is_ok() {
            return Ok(c.clone());
        }
    }
    let tried: Vec<String> = candidates
        .iter()
        .map(|c| printable(&c.display().to_string()))
        .collect();
    Err((
        exit::UNAVAILABLE,
        format!(
            "cannot reach the master: no control socket at {} (is the service running? name one with --control-socket or APP_CONTROL_SOCKET)",
            tried.join(" or ")
        ),
    ))
}

/// Connects with a bound on the wait (a full backlog would otherwise block forever).
pub(super) fn connect(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr, sockopt};
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SO_SNDTIMEO also bounds a blocking connect on a Unix stream socket.
    let tv = nix::sys::time::TimeVal::new(
        timeout.as_secs() as libc::time_t,
        timeout.subsec_micros() as libc::suseconds_t,
    );
    socket::setsockopt(&fd, sockopt::SendTimeout, &tv)?;
    let addr = UnixAddr::new(path)?;
    socket::connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

/// The peer's (uid, pid), from `SO_PEERCRED`.
pub(super) fn peer(s: &UnixStream) -> io::Result<(u32, i32)> {
    let c = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok((c.uid(), c.pid()))
}

fn connect_error(path: &Path, shown: &str, e: io::Error, waited: Duration) -> (i32, String) {
    let not_socket = std::fs::symlink_metadata(path)
        .map(|m| !m.file_type().is_socket())
        .unwrap_or(false);
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => (
            NOPERM,
            format!("cannot reach the master: permission denied on {shown}: try sudo"),
        ),
        Some(libc::ENOENT) => (
            exit::UNAVAILABLE,
            format!(
                "cannot reach the master at {shown}: no such socket (is the service running? see --control-socket)"
            ),
        ),
        Some(libc::ECONNREFUSED) if not_socket => (
            exit::UNAVAILABLE,
            format!("cannot reach the master at {shown}: not a socket"),
        ),
        Some(libc::ECONNREFUSED) => (
            exit::UNAVAILABLE,
            format!(
                "cannot reach the master at {shown}: nothing answers there, a stale socket (is the service running? see --control-socket)"
            ),
        ),
        Some(libc::EAGAIN) => (
            TEMPFAIL,
            format!(
                "cannot reach the master at {shown}: it did not accept within {}",
                humantime::format_duration(waited)
            ),
        ),
        _ => (
            exit::UNAVAILABLE,
            format!("cannot reach the master at {shown}: {e}"),
        ),
    }
}

/// Believes the peer only if it is root, us, or the user root gave the socket's directory.
fn trust(s: &UnixStream, path: &Path, shown: &str) -> Result<(), (i32, String)> {
    let me = nix::unistd::geteuid().as_raw();
    let (uid, pid) = peer(s).map_err(|e| {
        (
            exit::UNAVAILABLE,
            format!("cannot check who answers on {shown}: {e}"),
        )
    })?;
    if uid == 0 || uid == me || handed_out_by_root(path, uid) {
        return Ok(());
    }
    Err((
        exit::UNAVAILABLE,
        format!(
            "refusing to talk to {shown}: it is served by uid {uid} (pid {pid}), neither root nor you (uid {me}), from a directory root did not give it; someone else may have planted it"
        ),
    ))
}

/// True when the socket and its directory belong to `uid` and every directory above is
/// root's and not writable by others: only root (systemd's `RuntimeDirectory=`) could
/// have made that directory that user's. No component may be a symbolic link (a link
/// planted in a directory anyone can write would otherwise lend its target's standing).
fn handed_out_by_root(path: &Path, uid: u32) -> bool {
    let plain = path.is_absolute()
        && !path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir));
    if !plain {
        return false;
    }
    let lstat = |p: &Path| std::fs::symlink_metadata(p).ok();
    let Some(sock) = lstat(path) else {
        return false;
    };
    if !sock.file_type().is_socket() || sock.uid() != uid {
        return false;
    }
    let Some(dir) = path.parent() else {
        return false;
    };
    match lstat(dir) {
        Some(m) if m.is_dir() && m.uid() == uid && m.mode() & 0o022 == 0 => {}
        _ => return false,
    }
    dir.ancestors()
        .skip(1)
        .all(|a| lstat(a).is_some_and(|m| m.is_dir() && m.uid() == 0 && m.mode() & 0o022 == 0))
}

enum ReadError {
    Timeout,
    TooLong,
    Io(io::Error),
}

/// Reads up to the first newline (or EOF), before `deadline`, at most [`MAX_REPLY`] bytes.
fn read_line(mut s: &UnixStream, deadline: Instant) -> Result<Vec<u8>, ReadError> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadError::Timeout);
        }
        s.set_read_timeout(Some(left)).map_err(ReadError::Io)?;
        match s.read(&mut chunk) {
            Ok(0) => return Ok(out),
            Ok(n) => {
                let got = &chunk[..n];
                let end = got.iter().position(|&b| b == b'\n');
                out.extend_from_slice(&got[..end.unwrap_or(n)]);
                if out.len() > MAX_REPLY {
                    return Err(ReadError::TooLong);
                }
                if end.is_some() {
                    return Ok(out);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ReadError::Timeout);
            }
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// Escapes every control character in every string of the reply.
fn sanitize(r: &mut Reply) {
    let fix = |s: &mut String| *s = printable(s);
    r.error.as_mut().map(fix);
    r.message.as_mut().map(fix);
    if let Some(s) = &mut r.status {
        fix(&mut s.state);
        s.listeners.iter_mut().for_each(fix);
        if let Some(l) = &mut s.last_reload {
            fix(&mut l.message);
        }
        for w in &mut s.workers {
            fix(&mut w.state);
        }
    }
}
