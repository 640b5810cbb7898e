//! The listening sockets: taken from systemd (`LISTEN_FDS`) or, run by hand, bound here.
//!
//! The `LISTEN_*` parser is our own rather than `listenfd`'s or `sd-notify`'s: both silently
//! ignore a `LISTEN_PID` meant for another process and give no reason when a value is
//! malformed, and we owe the operator one line that says exactly what is wrong. It is a pure
//! function ([`parse_env`]) so it can be tested and fuzzed without touching descriptors.
//!
//! Whatever their origin, the master moves the sockets to high descriptor numbers with
//! close-on-exec set, so that nothing leaks into workers by accident; the spawner places
//! them at fd 3.. in each worker on purpose.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{SockType, getsockopt, sockopt};

use crate::exit::Fatal;

/// First descriptor systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;
/// More than this many inherited sockets is refused as implausible.
const MAX_FDS: usize = 64;
/// Sockets are moved to descriptors at or above this number (see the module docs).
pub const HIGH_FD_FLOOR: RawFd = 100;

/// A listening socket the master owns and hands to every worker.
#[derive(Debug)]
pub struct Listener {
    pub fd: OwnedFd,
    pub name: String,
    pub description: String,
}

/// What `LISTEN_*` say, before any descriptor is looked at.
#[derive(Debug, PartialEq, Eq)]
pub struct Activation {
    pub fds: Vec<RawFd>,
    pub names: Vec<String>,
}

/// Parses the socket-activation variables. `Ok(None)` means: not socket-activated.
/// Errors are complete one-line messages.
pub fn parse_env(
    listen_fds: Option<&str>,
    listen_pid: Option<&str>,
    listen_fdnames: Option<&str>,
    my_pid: u32,
) -> Result<Option<Activation>, String> {
    let Some(fds) = listen_fds else {
        if listen_pid.is_some() || listen_fdnames.is_some() {
            return Err(
                "LISTEN_PID or LISTEN_FDNAMES is set but LISTEN_FDS is not: \
                        the socket-activation environment is incomplete"
                    .into(),
            );
        }
        return Ok(None);
    };
    let count: usize = fds.trim().parse().map_err(|_| {
        format!("LISTEN_FDS={fds:?} is not a number of descriptors (expected e.g. LISTEN_FDS=1)")
    })?;
    if count == 0 {
        return Err("LISTEN_FDS=0: socket activation passed no sockets to listen on".into());
    }
    if count > MAX_FDS {
        return Err(format!(
            "LISTEN_FDS={count}: more than {MAX_FDS} sockets is not plausible"
        ));
    }
    match listen_pid {
        None => {
            return Err(
                "LISTEN_FDS is set but LISTEN_PID is not: cannot tell whether the sockets are meant for this process"
                    .into(),
            );
        }
        Some(p) => {
            let pid: u32 = p
                .trim()
                .parse()
                .map_err(|_| format!("LISTEN_PID={p:?} is not a process ID"))?;
            if pid != my_pid {
                return Err(format!(
                    "LISTEN_PID={pid} but this process is {my_pid}: the sockets were passed to another process"
                ));
            }
        }
    }
    let names: Vec<String> = match listen_fdnames {
        None => vec!["unknown".to_string(); count],
        Some(n) => {
            let names: Vec<String> = n.split(':').map(str::to_string).collect();
            if names.len() != count {
                return Err(format!(
                    "LISTEN_FDNAMES={n:?} names {} socket(s) but LISTEN_FDS={count}",
                    names.len()
                ));
            }
            names
        }
    };
    let fds = (0..count as RawFd).map(|i| LISTEN_FDS_START + i).collect();
    Ok(Some(Activation { fds, names }))
}

/// Takes the sockets systemd passed in, or binds `bind` when there are none.
///
/// Must run before any thread is started: it removes `LISTEN_*` from the environment.
pub fn take_or_bind(bind: SocketAddr) -> Result<(Vec<Listener>, bool), Fatal> {
    let var = |k: &str| std::env::var(k).ok();
    let parsed = parse_env(
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    );
    // SAFETY: called from main before the runtime or any other thread exists.
    unsafe {
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    match parsed.map_err(|e| Fatal::config(format!("socket activation error: {e}")))? {
        Some(act) => {
            let mut out = Vec::with_capacity(act.fds.len());
            for (fd, name) in act.fds.iter().zip(act.names) {
                let description = check_listening_stream(*fd).map_err(|e| {
                    Fatal::config(format!("socket activation error: fd {fd} ({name}): {e}"))
                })?;
                // SAFETY: systemd passed us this descriptor and nothing else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(*fd) };
                out.push(Listener {
                    fd: move_high(owned)?,
                    name,
                    description,
                });
            }
            Ok((out, true))
        }
        None => {
            let l = bind_tcp(bind)?;
            Ok((vec![l], false))
        }
    }
}

/// Checks that `fd` is an open, listening stream socket; returns a description of it.
pub fn check_listening_stream(fd: RawFd) -> Result<String, String> {
    // SAFETY: only used for the duration of this function; validity is checked by fstat.
    let stat = nix::sys::stat::fstat(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
        .map_err(|e| format!("is not an open descriptor ({e})"))?;
    let kind = stat.st_mode & libc::S_IFMT;
    if kind != libc::S_IFSOCK {
        let what = match kind {
            libc::S_IFREG => "a regular file",
            libc::S_IFDIR => "a directory",
            libc::S_IFIFO => "a pipe",
            libc::S_IFCHR => "a character device",
            _ => "not a socket",
        };
        return Err(format!("is {what}, expected a listening stream socket"));
    }
    // SAFETY: as above.
    let bfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let ty =
        getsockopt(&bfd, sockopt::SockType).map_err(|e| format!("getsockopt(SO_TYPE): {e}"))?;
    if ty != SockType::Stream {
        let what = match ty {
            SockType::Datagram => "a datagram (UDP) socket",
            SockType::SeqPacket => "a seqpacket socket",
            _ => "not a stream socket",
        };
        return Err(format!("is {what}, expected a listening stream socket"));
    }
    let listening = getsockopt(&bfd, sockopt::AcceptConn)
        .map_err(|e| format!("getsockopt(SO_ACCEPTCONN): {e}"))?;
    if !listening {
        return Err(
            "is a stream socket that is not listening (a connection, not a listener)".into(),
        );
    }
    Ok(describe(fd))
}

/// A listening socket registered with the running tokio runtime: TCP, or a Unix socket
/// (`ListenStream=/run/app.sock` behind a proxy).
pub enum AsyncListener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// An accepted (or handed-over) connection.
pub enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl AsyncListener {
    pub fn from_fd(fd: OwnedFd) -> std::io::Result<AsyncListener> {
        if is_unix(fd.as_raw_fd()) {
            let l = std::os::unix::net::UnixListener::from(fd);
            l.set_nonblocking(true)?;
            Ok(AsyncListener::Unix(tokio::net::UnixListener::from_std(l)?))
        } else {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)?;
            Ok(AsyncListener::Tcp(tokio::net::TcpListener::from_std(l)?))
        }
    }

    pub async fn accept(&self) -> std::io::Result<Stream> {
        match self {
            AsyncListener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                // Small responses must not wait for Nagle.
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
            AsyncListener::Unix(l) => Ok(Stream::Unix(l.accept().await?.0)),
        }
    }
}

impl Stream {
    pub fn from_fd(fd: OwnedFd) -> std::io::Result<Stream> {
        if is_unix(fd.as_raw_fd()) {
            let s = std::os::unix::net::UnixStream::from(fd);
            s.set_nonblocking(true)?;
            Ok(Stream::Unix(tokio::net::UnixStream::from_std(s)?))
        } else {
            let s = std::net::TcpStream::from(fd);
            s.set_nonblocking(true)?;
            let s = tokio::net::TcpStream::from_std(s)?;
            let _ = s.set_nodelay(true);
            Ok(Stream::Tcp(s))
        }
    }

    /// The local address, described as [`describe`] does for listeners.
    pub fn local_description(&self) -> String {
        match self {
            Stream::Tcp(s) => describe(s.as_raw_fd()),
            Stream::Unix(s) => describe(s.as_raw_fd()),
        }
    }

    pub fn into_fd(self) -> std::io::Result<OwnedFd> {
        Ok(match self {
            Stream::Tcp(s) => s.into_std()?.into(),
            Stream::Unix(s) => s.into_std()?.into(),
        })
    }
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Checks that `fd` is an open Unix-domain socket (a worker's end of a channel from its
/// master), before the worker adopts it.
pub fn check_socket_pair_end(fd: RawFd) -> Result<(), String> {
    if fd < 0 {
        return Err("negative descriptor".into());
    }
    // SAFETY: borrowed only for this call; fstat on a closed or foreign number fails
    // cleanly (EBADF) rather than touching memory.
    let bfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let stat = nix::sys::stat::fstat(bfd).map_err(|e| format!("fd {fd}: {e}"))?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK || !is_unix(fd) {
        return Err(format!("fd {fd} is not a Unix socket"));
    }
    Ok(())
}

/// True for a Unix-domain socket (listening or connected).
pub fn is_unix(fd: RawFd) -> bool {
    use nix::sys::socket::{AddressFamily, SockaddrLike, SockaddrStorage, getsockname};
    getsockname::<SockaddrStorage>(fd)
        .map(|a| a.family() == Some(AddressFamily::Unix))
        .unwrap_or(false)
}

/// "127.0.0.1:8080" or "unix:/run/app.sock", for logs.
pub fn describe(fd: RawFd) -> String {
    use nix::sys::socket::{SockaddrIn, SockaddrIn6, UnixAddr, getsockname};
    if let Ok(a) = getsockname::<SockaddrIn>(fd) {
        return a.to_string();
    }
    if let Ok(a) = getsockname::<SockaddrIn6>(fd) {
        return a.to_string();
    }
    match getsockname::<UnixAddr>(fd) {
        Ok(u) => match (u.path(), u.as_abstract()) {
            (Some(p), _) => format!("unix:{}", p.display()),
            (None, Some(a)) => format!("unix:@{}", String::from_utf8_lossy(a)),
            _ => "unix:(unnamed)".into(),
        },
        Err(e) => format!("(unknown address: {e})"),
    }
}

pub(crate) fn bind_tcp(addr: SocketAddr) -> Result<Listener, Fatal> {
    // std sets SO_REUSEADDR and a backlog of 128; a socket unit would give a larger one, so
    // raise it to the kernel's maximum with a second listen().
    let l = TcpListener::bind(addr).map_err(|e| Fatal::os(format!("cannot bind {addr}: {e}")))?;
    // SAFETY: plain listen(2) on our own socket.
    unsafe { libc::listen(l.as_raw_fd(), libc::SOMAXCONN) };
    let fd: OwnedFd = l.into();
    let description = describe(fd.as_raw_fd());
    Ok(Listener {
        fd: move_high(fd)?,
        name: "bound".into(),
        description,
    })
}

/// Duplicates `fd` with close-on-exec, preferably to a number >= [`HIGH_FD_FLOOR`] (out of
/// the way of the low numbers workers receive), closing the original. Under a descriptor
/// limit below the floor it takes the lowest free number instead.
pub fn move_high(fd: OwnedFd) -> Result<OwnedFd, Fatal> {
    let dup = |floor: RawFd| {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor) }
    };
    let mut new = dup(HIGH_FD_FLOOR);
    if new < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        new = dup(0);
    }
    if new < 0 {
        return Err(Fatal::os(format!(
            "fcntl(F_DUPFD_CLOEXEC): {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `new` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_activated() {
        assert_eq!(parse_env(None, None, None, 7), Ok(None));
    }

    #[test]
    fn activated_with_names() {
        let a = parse_env(Some("2"), Some("7"), Some("http:admin"), 7)
            .unwrap()
            .unwrap();
        assert_eq!(a.fds, vec![3, 4]);
        assert_eq!(a.names, vec!["http", "admin"]);
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = parse_env(Some("two"), Some("7"), None, 7).unwrap_err();
        assert!(e.contains("LISTEN_FDS=\"two\" is not a number"), "{e}");
        let e = parse_env(Some("1"), Some("8"), None, 7).unwrap_err();
        assert!(e.contains("LISTEN_PID=8 but this process is 7"), "{e}");
        let e = parse_env(Some("1"), None, None, 7).unwrap_err();
        assert!(e.contains("LISTEN_PID is not"), "{e}");
        let e = parse_env(Some("2"), Some("7"), Some("a"), 7).unwrap_err();
        assert!(e.contains("names 1 socket(s) but LISTEN_FDS=2"), "{e}");
        let e = parse_env(Some("0"), Some("7"), None, 7).unwrap_err();
        assert!(e.contains("LISTEN_FDS=0"), "{e}");
        let e = parse_env(None, Some("7"), None, 7).unwrap_err();
        assert!(e.contains("LISTEN_FDS is not"), "{e}");
    }

    #[test]
    fn rejects_non_listening_descriptors() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = check_listening_stream(f.as_raw_fd()).unwrap_err();
        assert!(e.contains("character device"), "{e}");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = check_listening_stream(udp.as_raw_fd()).unwrap_err();
        assert!(e.contains("datagram"), "{e}");
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(
            check_listening_stream(tcp.as_raw_fd())
                .unwrap()
                .starts_with("127.0.0.1:")
        );
    }
}
