//! Exit codes and the one error type that carries one.
//!
//! The codes follow `sysexits.h`, which systemd also understands (`systemctl status` names
//! them, and `RestartPreventExitStatus=` can refer to them). Every fatal path in the program
//! ends in a [`Fatal`]: one line for the operator, one documented code for the service manager.

use std::fmt;

/// Clean exit, including a graceful shutdown.
pub const OK: i32 = 0;
/// A command-line flag or environment variable could not be parsed.
pub const USAGE: i32 = 64;
/// Workers keep dying: the restart budget is spent and the master gave up, so that
/// systemd's `Restart=` and start limits decide what happens next. Also: the client
/// commands found no master to talk to.
pub const UNAVAILABLE: i32 = 69;
/// A bug: an invariant of the program itself did not hold.
pub const SOFTWARE: i32 = 70;
/// The operating system refused something we need (bind, fork, a socket pair).
pub const OSERR: i32 = 71;
/// The configuration is wrong: a bad value, an unreadable or malformed config file,
/// or a socket-activation environment (`LISTEN_*`) that does not describe listening sockets
/// meant for this process. Restarting cannot fix these.
pub const CONFIG: i32 = 78;

/// A fatal error: what to tell the operator, and which code to exit with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fatal {
    pub code: i32,
    pub message: String,
}

impl Fatal {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Fatal {
            code,
            message: message.into(),
        }
    }

    pub fn config(message: impl Into<String>) -> Self {
        Self::new(CONFIG, message)
    }

    pub fn os(message: impl Into<String>) -> Self {
        Self::new(OSERR, message)
    }
}

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Fatal {}
