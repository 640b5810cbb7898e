//! Starting one worker process: fork+exec of the service's own binary.
//!
//! Never a bare `fork()` of the master: the child execs at once, so it starts with a clean
//! address space and its own runtime. Between fork and exec (`pre_exec`) the child only makes
//! async-signal-safe system calls into memory prepared beforehand:
//!
//! * the inherited descriptors land where [`crate::contract::Layout`] says (the listening
//!   sockets, the worker's end of its IPC socket pair, its end of the connection hand-off
//!   pair, the load board); every other descriptor stays close-on-exec, so no earlier
//!   generation's channel or the control socket leaks into a worker;
//! * the CPU affinity is set to the worker's mask (its one CPU when pinned), and its NUMA
//!   memory policy when `numa` asks for one;
//! * `PR_SET_PDEATHSIG(SIGKILL)`, then a check that the master did not die before that call
//!   (the documented race), so no orphan ever holds the port.
//!
//! Workers run the binary each generation opened ([`Executable`]): a reload picks up a binary
//! replaced on disk, while replacements in a running generation keep using that
//! generation's binary, even if a broken one was installed meanwhile.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

use crate::contract::{Layout, WORKER_ENV};
use crate::listen::{Listener, move_high};

/// The binary a generation's workers run, held open so that it survives being replaced.
#[derive(Debug)]
pub struct Executable {
    fd: OwnedFd,
    pub path: PathBuf,
}

impl Executable {
    /// The binary this master runs (via /proc/self/exe, so even one already replaced on disk).
    pub fn current() -> std::io::Result<Executable> {
        let path = std::env::current_exe()?;
        let path = strip_deleted(path);
        let file = std::fs::File::open("/proc/self/exe")?;
        Ok(Executable {
            fd: move_high(file.into()).map_err(std::io::Error::other)?,
            path,
        })
    }

    /// Whatever is at `path` now (a reload after installing a new binary).
    pub fn open(path: &std::path::Path) -> std::io::Result<Executable> {
        let file = std::fs::File::open(path)?;
        Ok(Executable {
            fd: move_high(file.into()).map_err(std::io::Error::other)?,
            path: path.to_path_buf(),
        })
    }

    fn proc_path(&self) -> String {
        format!("/proc/self/fd/{}", self.fd.as_raw_fd())
    }
}

fn strip_deleted(path: PathBuf) -> PathBuf {
    let s = path.to_string_lossy();
    match s.strip_suffix(" (deleted)") {
        Some(p) => PathBuf::from(p),
        None => path,
    }
}

/// What the master keeps of a freshly started worker.
pub struct Spawned {
    pub pid: i32,
    pub channel: std::os::unix::net::UnixStream,
    /// The master's end of the connection hand-off channel (round-robin strategy).
    pub handoff: OwnedFd,
}

pub struct SpawnRequest<'a> {
    pub exe: &'a Executable,
    pub listeners: &'a [Listener],
    /// The load board's memfd.
    pub board: RawFd,
    /// The CPUs it may run on (`[cpu]` when pinned).
    pub mask: &'a [usize],
    /// `set_mempolicy` before exec, when `numa` is not `local`.
    pub mempolicy: Option<&'a super::numa::MemPolicy>,
    /// The master's own command line: the worker runs the same one, so that a program with
    /// its own command-line interface reaches the library's entry point unchanged, where
    /// [`WORKER_ENV`] turns it into a worker.
    pub argv: &'a [std::ffi::OsString],
}

/// Environment a worker must not inherit: it would make it think it is the one systemd
/// talks to.
const SCRUBBED_ENV: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

pub fn spawn(req: SpawnRequest<'_>) -> std::io::Result<Spawned> {
    let (master_end, worker_end) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let worker_end = move_high(worker_end).map_err(std::io::Error::other)?;
    // Only used by the round-robin strategy, but always present so the layout is fixed.
    let (handoff_master, handoff_worker) = crate::handoff::channel_pair()?;

    // Source → target descriptor moves, decided before fork (no allocation after it).
    let layout = Layout::new(req.listeners.len());
    let mut moves: Vec<(RawFd, RawFd)> = req
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| (l.fd.as_raw_fd(), layout.listener(i)))
        .collect();
    moves.push((worker_end.as_raw_fd(), layout.channel()));
    moves.push((handoff_worker.as_raw_fd(), layout.handoff()));
    moves.push((req.board, layout.board()));
    let staging_floor = layout.end();
    let mut staged: Vec<RawFd> = vec![-1; moves.len()];
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks the index.
    let mut cpuset: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in req.mask {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::other(format!("CPU {cpu} out of range")));
        }
        unsafe { libc::CPU_SET(cpu, &mut cpuset) };
    }
    let mempolicy = req.mempolicy.cloned();
    let master_pid = std::process::id() as i32;

    let mut cmd = Command::new(req.exe.proc_path());
    let mut argv = req.argv.iter();
    cmd.arg0(argv.next().map(|a| a.as_os_str()).unwrap_or("app".as_ref()))
        .args(argv)
        .env(WORKER_ENV, layout.channel().to_string())
        .stdin(Stdio::null());
    for k in SCRUBBED_ENV {
        cmd.env_remove(k);
    }
    // SAFETY: the closure only calls async-signal-safe functions (dup2, fcntl,
    // sched_setaffinity, set_mempolicy, prctl, getppid, kill) on data prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            // Two phases, so that no move clobbers a source still to be moved: first copy
            // every source above the highest target (close-on-exec, so the copies vanish
            // at exec), then put each copy in place; dup2 clears close-on-exec there.
            for (i, &(src, _)) in moves.iter().enumerate() {
                staged[i] = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, staging_floor);
                if staged[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &(_, dst)) in moves.iter().enumerate() {
                if libc::dup2(staged[i], dst) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &cpuset) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(m) = &mempolicy {
                m.apply()?;
            }
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != master_pid {
                // The master died between fork and prctl: PDEATHSIG will never fire.
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    let pid = child.id() as i32;
    // The master reaps with waitpid(-1) itself; `Child` is only dropped (no wait, no kill).
    drop(child);
    drop(worker_end);
    drop(handoff_worker);
    let channel = std::os::unix::net::UnixStream::from(master_end);
    Ok(Spawned {
        pid,
        channel,
        handoff: handoff_master,
    })
}

/// The CPUs this process may run on (respects cgroup cpusets and `CPUAffinity=`).
pub fn allowed_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..nix::sched::CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => vec![0],
    }
}
