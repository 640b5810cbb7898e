//! Where the master may put its control socket, and how it binds and removes it without
//! trusting anything another user could have prepared.
//!
//! The rules, checked before the first byte is written:
//!
//! - the socket's directory is a real directory (not a symbolic link), owned by the master's
//!   effective uid and not writable by group or others. It is created with mode 0700 when
//!   missing (only the last component; its parent must exist). A default location (see the
//!   module above) must be exactly that, 0700: no access at all for group or others. A
//!   directory the operator named with `control_socket` may also let group and others read
//!   and search it (0755, say: a directory that also holds other files), since the socket
//!   itself is 0600 and every peer is checked; writable by them, never;
//! - every directory above it (after resolving symbolic links once) is owned by root or the
//!   master's uid, and is not writable by group or others unless it has the sticky bit (as
//!   `/tmp` does), so nobody else can rename the socket's directory away and put another in
//!   its place;
//! - an existing file at the socket's path is replaced only when it is a socket nobody
//!   answers on (`ECONNREFUSED`): a live master there, or anything that is not a socket, is a
//!   refusal;
//! - the socket is created with its final mode (0600, through the umask around `bind`), so
//!   no mode is ever set by path, and the (device, inode) it got is recorded: at exit the
//!   path is unlinked only if it is still that very socket.
//!
//! A refusal is one line for the operator, `control socket: <path>: <reason>`, exit 78.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::exit::Fatal;

/// The socket this process bound, so that only it is ever removed.
struct Bound {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

static BOUND: Mutex<Option<Bound>> = Mutex::new(None);

/// How long to wait, at start-up, for a possible other master on the same path to accept.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn refuse(path: &Path, reason: impl std::fmt::Display) -> Fatal {
    Fatal::config(format!(
        "control socket: {}: {reason}",
        super::printable(&path.display().to_string())
    ))
}

fn show(p: &Path) -> String {
    super::printable(&p.display().to_string())
}

/// Checks (and if needed creates) the socket's directory, refuses an occupied path, binds
/// the socket with mode 0600 and records it. Returns the bound listener.
/// `private_dir`: the directory must be 0700 (a default location); otherwise group and
/// others may read and search it, never write.
pub fn bind(path: &Path, private_dir: bool) -> Result<std::os::unix::net::UnixListener, Fatal> {
    let real = safe_location(path, private_dir).map_err(|r| refuse(path, r))?;
    clear_the_way(&real).map_err(|r| refuse(path, r))?;
    // The socket is born 0600: nothing is ever chmod-ed by path afterwards.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(&real);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(|e| refuse(path, format!("cannot bind {}: {e}", show(&real))))?;
    let md = std::fs::symlink_metadata(&real)
        .map_err(|e| refuse(path, format!("{} vanished after bind: {e}", show(&real))))?;
    if !md.file_type().is_socket() || md.uid() != euid() || md.mode() & 0o077 != 0 {
        return Err(refuse(
            path,
            format!(
                "{} is not the private socket just bound (mode {:04o}, uid {})",
                show(&real),
                md.mode() & 0o7777,
                md.uid()
            ),
        ));
    }
    *BOUND.lock().unwrap_or_else(|e| e.into_inner()) = Some(Bound {
        path: real,
        dev: md.dev(),
        ino: md.ino(),
    });
    Ok(listener)
}

/// Unlinks the control socket at exit, only if the path still holds the socket this process
/// bound (same device and inode, checked with `lstat` just before). Anything else there —
/// a socket another master bound after ours was removed, a file — is left alone.
pub fn remove_own_socket() {
    let Some(b) = BOUND.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    match std::fs::symlink_metadata(&b.path) {
        Ok(md) if md.file_type().is_socket() && md.dev() == b.dev && md.ino() == b.ino => {
            let _ = std::fs::remove_file(&b.path);
        }
        Ok(_) => tracing::warn!(
            "control socket {} was replaced by something else; leaving it",
            b.path.display()
        ),
        Err(_) => {}
    }
}

/// Resolves and checks the socket's directory; returns the path to bind (the directory's
/// parent resolved, so that later steps do not walk symbolic links again).
fn safe_location(path: &Path, private_dir: bool) -> Result<PathBuf, String> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("cannot resolve a relative path: {e}"))?
            .join(path)
    };
    let name = abs
        .file_name()
        .ok_or_else(|| "does not name a socket file".to_string())?;
    let dir = abs.parent().unwrap_or(Path::new("/"));
    let dir_name = dir
        .file_name()
        .ok_or_else(|| "the socket must be in a directory of its own, not / or ..".to_string())?;
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let real_parent =
        std::fs::canonicalize(parent).map_err(|e| format!("{}: {e}", show(parent)))?;
    for a in real_parent.ancestors() {
        let md = std::fs::symlink_metadata(a).map_err(|e| format!("{}: {e}", show(a)))?;
        if md.uid() != 0 && md.uid() != euid() {
            return Err(format!(
                "{} is owned by uid {}, neither root nor the master's uid {}: that user could replace the socket's directory",
                show(a),
                md.uid(),
                euid()
            ));
        }
        if md.mode() & 0o022 != 0 && md.mode() & 0o1000 == 0 {
            return Err(format!(
                "{} is writable by group or others (mode {:04o}) without the sticky bit: anyone could replace the socket's directory",
                show(a),
                md.mode() & 0o7777
            ));
        }
    }
    let real_dir = real_parent.join(dir_name);
    match std::fs::symlink_metadata(&real_dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match std::fs::DirBuilder::new().mode(0o700).create(&real_dir) {
                Ok(()) => {}
                // Someone made it in between: the checks below decide.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("cannot create {}: {e}", show(&real_dir))),
            }
        }
        Err(e) => return Err(format!("{}: {e}", show(&real_dir))),
        Ok(_) => {}
    }
    let md =
        std::fs::symlink_metadata(&real_dir).map_err(|e| format!("{}: {e}", show(&real_dir)))?;
    let hint =
        "set --control-socket (APP_CONTROL_SOCKET) or XDG_RUNTIME_DIR to a directory of yours";
    if md.file_type().is_symlink() {
        return Err(format!(
            "{} is a symbolic link, not a directory; {hint}",
            show(&real_dir)
        ));
    }
    if !md.is_dir() {
        return Err(format!("{} is not a directory", show(&real_dir)));
    }
    if md.uid() != euid() {
        return Err(format!(
            "{} is owned by uid {}, not the master's uid {} (another user may have created it); {hint}",
            show(&real_dir),
            md.uid(),
            euid()
        ));
    }
    if private_dir && md.mode() & 0o077 != 0 {
        return Err(format!(
            "{} has mode {:04o}; it must be 0700 (no access for group or others)",
            show(&real_dir),
            md.mode() & 0o7777
        ));
    }
    if md.mode() & 0o022 != 0 {
        return Err(format!(
            "{} has mode {:04o}; it must not be writable by group or others (0700 is best)",
            show(&real_dir),
            md.mode() & 0o7777
        ));
    }
    Ok(real_dir.join(name))
}

/// Makes sure nothing is at `real`, removing only a stale socket.
fn clear_the_way(real: &Path) -> Result<(), String> {
    let md = match std::fs::symlink_metadata(real) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", show(real))),
        Ok(md) => md,
    };
    if !md.file_type().is_socket() {
        return Err("exists and is not a socket; refusing to replace it".into());
    }
    match super::client::connect(real, PROBE_TIMEOUT) {
        Ok(s) => {
            let who = super::client::peer(&s)
                .map(|(uid, pid)| format!(" (pid {pid}, uid {uid})"))
                .unwrap_or_default();
            Err(format!(
                "another master{who} already answers there; stop it or give this one another --control-socket"
            ))
        }
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            // Stale: a socket nobody listens on, in a directory only we can write.
            std::fs::remove_file(real).map_err(|e| format!("cannot remove the stale socket: {e}"))
        }
        Err(e) => Err(format!(
            "cannot tell whether another master answers there: {e}"
        )),
    }
}
