//! Everything said to systemd: READY, RELOADING (+MONOTONIC_USEC), STATUS, WATCHDOG,
//! STOPPING, EXTEND_TIMEOUT_USEC, ERRNO. Only the master talks to systemd (the unit says
//! `NotifyAccess=main`, and workers never see `NOTIFY_SOCKET`).
//!
//! Messages are spelled by `sd-notify`'s [`NotifyState`]; the transport is ours because
//! `sd-notify` connects to the path literally and so cannot reach an abstract-namespace socket
//! (`NOTIFY_SOCKET=@name`), and because a missing socket must be a warning said once, not an
//! error on every status update.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

pub use sd_notify::NotifyState;

pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr, String)>,
    warned: bool,
    last_status: String,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and the watchdog settings; removes them from the environment so
    /// no child inherits them. Must run before any thread starts.
    pub fn from_env() -> Notifier {
        let watchdog = sd_notify::watchdog_enabled();
        let path = std::env::var("NOTIFY_SOCKET").ok();
        // SAFETY: called from main before the runtime or any other thread exists.
        unsafe {
            std::env::remove_var("NOTIFY_SOCKET");
            std::env::remove_var("WATCHDOG_USEC");
            std::env::remove_var("WATCHDOG_PID");
        }
        let mut n = Notifier {
            target: None,
            warned: false,
            last_status: String::new(),
            watchdog,
        };
        if let Some(path) = path.filter(|p| !p.is_empty()) {
            match Self::address(&path).and_then(|addr| Ok((UnixDatagram::unbound()?, addr))) {
                Ok((sock, addr)) => {
                    let _ = sock.set_nonblocking(true);
                    n.target = Some((sock, addr, path));
                }
                Err(e) => {
                    tracing::warn!(
                        "NOTIFY_SOCKET={path:?} is unusable ({e}); not notifying systemd"
                    );
                    n.warned = true;
                }
            }
        }
        n
    }

    fn address(path: &str) -> std::io::Result<SocketAddr> {
        match path.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
            None => SocketAddr::from_pathname(path),
        }
    }

    /// The watchdog period systemd expects pings within, if it set one for us.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    pub fn send(&mut self, states: &[NotifyState]) {
        let Some((sock, addr, path)) = &self.target else {
            return;
        };
        let mut msg = String::new();
        for s in states {
            msg.push_str(&s.to_string());
            msg.push('\n');
        }
        match sock.send_to_addr(msg.as_bytes(), addr) {
            Ok(_) => self.warned = false,
            Err(e) if !self.warned => {
                self.warned = true;
                tracing::warn!(
                    "cannot notify systemd at NOTIFY_SOCKET={path:?}: {e}; serving on, will retry silently"
                );
            }
            Err(_) => {}
        }
    }

    /// Sends `STATUS=` only when the text changed.
    pub fn status(&mut self, text: &str) {
        if text != self.last_status {
            self.last_status = text.to_string();
            self.send(&[NotifyState::Status(text)]);
        }
    }

    pub fn ready(&mut self, status: &str) {
        self.last_status = status.to_string();
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn reloading(&mut self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping(&mut self, status: &str) {
        self.last_status = status.to_string();
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    pub fn watchdog_ping(&mut self) {
        self.send(&[NotifyState::Watchdog]);
    }

    pub fn extend_timeout(&mut self, by: Duration) {
        let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
        self.send(&[NotifyState::ExtendTimeoutUsec(usec)]);
    }

    pub fn failed(&mut self, status: &str, errno: u32) {
        self.last_status = status.to_string();
        self.send(&[NotifyState::Status(status), NotifyState::Errno(errno)]);
    }
}
