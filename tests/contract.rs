//! The master–worker contract (`src/contract.rs`) from the worker's side: a process started
//! as a worker whose inherited descriptors are not what a master hands over refuses with a
//! clear exit code (EX_SOFTWARE, 70) instead of crashing or serving on the wrong thing.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Starts `app` as a worker whose fd 3 is `fd3` (or nothing), with `APP_WORKER_FD=channel`;
/// returns its exit code and stderr.
fn as_worker(fd3: Option<std::fs::File>, channel: &str) -> (i32, String) {
    let mut cmd = Command::new(APP);
    cmd.env("APP_WORKER_FD", channel)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(f) = fd3 {
        use std::os::fd::IntoRawFd;
        let raw = f.into_raw_fd();
        // SAFETY: dup2 and close are async-signal-safe; `raw` is ours.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = cmd.spawn().unwrap();
    let out = wait_output(child, Duration::from_secs(10));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn wait_output(child: std::process::Child, limit: Duration) -> std::process::Output {
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("a worker with a wrong descriptor did not exit within {limit:?}");
        }
    }
}

#[test]
fn a_plain_file_where_the_channel_should_be_is_refused() {
    let file = tempfile::tempfile().unwrap();
    let (code, err) = as_worker(Some(file), "3");
    assert_eq!(code, 70, "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_channel_number_below_the_listeners_is_refused() {
    for fd in ["0", "2", "-1"] {
        let (code, err) = as_worker(None, fd);
        assert_ne!(code, 0, "APP_WORKER_FD={fd}: {err}");
        assert!(!err.contains("panicked"), "APP_WORKER_FD={fd}: {err}");
    }
}

#[test]
fn a_closed_channel_number_is_refused() {
    let (code, err) = as_worker(None, "40");
    assert_eq!(code, 70, "{err}");
}
