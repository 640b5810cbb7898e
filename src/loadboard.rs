//! The load board: one shared page where each worker publishes how many connections it
//! holds, so that the `shared` accept strategy stays fair.
//!
//! With one listening socket shared by every worker, the kernel wakes them all for a new
//! connection and the first to call `accept` wins; a worker that happens to be awake grabs a
//! whole burst (all 64 connections of a keep-alive benchmark, say) and the others idle. Here
//! a worker holding clearly more connections than the least-loaded live peer waits a moment
//! before accepting (as nginx's `accept_mutex_delay` does), so a less busy worker wins the
//! race. It only ever delays, never refuses: if no peer takes the connection, the busy worker
//! still does.
//!
//! The page is a memfd the master creates and hands to every worker; entry `i` is
//! `connections + 1` for the worker that holds board index `i`, or 0 when free. The master
//! assigns indexes (lowest free first) and releases a dead worker's entry when it reaps it.
//! The page's last word is how many entries have ever been in use, so the check a worker
//! makes before every accept reads a handful of entries, not the whole page.
//!
//! The word before it is the pool's [`Readiness`], which the master writes and every worker
//! reads when a load balancer asks (the `[http] ready_path` endpoint and the `agent` socket,
//! see [`crate::worker`]). It lives here rather than in an IPC message because every worker,
//! of every generation and however young, already maps this page before it serves its first
//! request: a worker started a millisecond after a drain began can never answer "ready" from
//! a stale copy, and the master changes one word instead of messaging every worker (and
//! waiting for their answers) on each transition. One relaxed store is enough: a load
//! balancer polls, so a probe that races the flip just sees the new state on the next one.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

/// The largest pool (`workers`, and what SIGTTIN may grow it to).
pub const MAX_WORKERS: usize = 1024;
/// Entries on the board, and so the most workers (of all generations) alive at once: two
/// full generations of the largest pool (a reload starts the new one beside the old), plus
/// room for workers still draining from before. The page is 16 KiB. The metrics page keeps
/// one area per entry, so this number is part of the layout a master shares with workers of
/// another build (after a binary upgrade): it does not change.
pub const ENTRIES: usize = 4095;
/// Entries given to workers: the last one holds the pool's [`Readiness`] instead (an entry
/// no master ever reached: it takes 4095 live workers).
const ASSIGNABLE: usize = ENTRIES - 1;
const READINESS: usize = ASSIGNABLE;
/// The word after the entries: how many entries have ever been assigned.
const IN_USE: usize = ENTRIES;
const BYTES: usize = (ENTRIES + 1) * std::mem::size_of::<AtomicU32>();

/// Whether the pool wants new traffic, as a load balancer is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    /// The first generation is still starting (no `READY=1` yet). A fresh board reads so.
    #[default]
    Starting = 0,
    /// Every worker of the first generation served, and nobody asked for a drain.
    Ready = 1,
    /// `app drain`, or the `drain_delay` before a stop: still serving everything, but the
    /// load balancer should send its new requests elsewhere.
    Draining = 2,
    /// The workers stop accepting and finish what they have.
    Stopping = 3,
}

impl Readiness {
    fn from_word(v: u32) -> Readiness {
        match v {
            1 => Readiness::Ready,
            2 => Readiness::Draining,
            3 => Readiness::Stopping,
            _ => Readiness::Starting,
        }
    }

    /// The word probes, the agent and `app status` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Readiness::Starting => "starting",
            Readiness::Ready => "ready",
            Readiness::Draining => "draining",
            Readiness::Stopping => "stopping",
        }
    }
}

pub struct LoadBoard {
    fd: OwnedFd,
    base: *const AtomicU32,
    /// Entries assigned by this process (the master's bookkeeping; empty in workers).
    assigned: std::collections::BTreeSet<usize>,
}

impl LoadBoard {
    /// A fresh, zeroed board (master).
    pub fn create() -> std::io::Result<LoadBoard> {
        // SAFETY: plain system calls; the name is a NUL-terminated literal.
        let raw = unsafe { libc::memfd_create(c"app-load-board".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), BYTES as libc::off_t) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Self::map(fd)
    }

    /// The board a worker inherited.
    pub fn map(fd: OwnedFd) -> std::io::Result<LoadBoard> {
        let ptr = map_shared(fd.as_fd(), BYTES, 0)?;
        Ok(LoadBoard {
            fd,
            base: ptr as *const AtomicU32,
            assigned: Default::default(),
        })
    }

    /// Adopts the board the master placed at `fd` (worker), after checking that it is a
    /// regular file (a memfd) large enough to map, so a wrong descriptor is an error rather
    /// than a SIGBUS on first use.
    pub fn adopt(fd: std::os::fd::RawFd) -> std::io::Result<LoadBoard> {
        // SAFETY: borrowed only for fstat, which fails cleanly on a closed number.
        let st = nix::sys::stat::fstat(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || (st.st_size as usize) < BYTES {
            return Err(std::io::Error::other(format!(
                "fd {fd} is not a load board (not a memfd of {BYTES} bytes)"
            )));
        }
        // SAFETY: checked above; the master placed it here for this process alone.
        Self::map(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    fn entry(&self, i: usize) -> &AtomicU32 {
        assert!(i <= IN_USE);
        // SAFETY: in bounds of the mapping, which lives as long as self; AtomicU32 has the
        // size and alignment of u32 and the page is only ever accessed atomically.
        unsafe { &*self.base.add(i) }
    }

    /// Publishes that worker `i` holds `connections`.
    pub fn publish(&self, i: usize, connections: u64) {
        let v = u32::try_from(connections.saturating_add(1)).unwrap_or(u32::MAX);
        self.entry(i).store(v, Ordering::Relaxed);
    }

    /// Publishes the pool's readiness (master).
    pub fn set_readiness(&self, r: Readiness) {
        self.entry(READINESS).store(r as u32, Ordering::Relaxed);
    }

    pub fn readiness(&self) -> Readiness {
        Readiness::from_word(self.entry(READINESS).load(Ordering::Relaxed))
    }

    /// Gives out the lowest free entry, cleared (master).
    pub fn assign(&mut self) -> Option<usize> {
        let i = (0..ASSIGNABLE).find(|i| !self.assigned.contains(i))?;
        self.assigned.insert(i);
        self.entry(i).store(0, Ordering::Relaxed);
        self.entry(IN_USE)
            .fetch_max(i as u32 + 1, Ordering::Relaxed);
        Some(i)
    }

    /// Frees entry `i` for the next worker (master).
    pub fn release(&mut self, i: usize) {
        self.entry(i).store(0, Ordering::Relaxed);
        self.assigned.remove(&i);
    }

    /// Connections of the least-loaded live worker other than `i`.
    pub fn least_other(&self, i: usize) -> Option<u64> {
        let in_use = (self.entry(IN_USE).load(Ordering::Relaxed) as usize).min(ASSIGNABLE);
        (0..in_use)
            .filter(|&j| j != i)
            .map(|j| self.entry(j).load(Ordering::Relaxed))
            .filter(|&v| v > 0)
            .min()
            .map(|v| u64::from(v - 1))
    }
}

/// Maps `len` bytes of the board's memfd at `offset`, shared and read-write: the board
/// itself, and the metrics page after it ([`crate::metrics`]). The caller checks that the
/// file is that long (a mapping past its end faults on first use).
pub(crate) fn map_shared(
    fd: std::os::fd::BorrowedFd<'_>,
    len: usize,
    offset: usize,
) -> std::io::Result<*mut libc::c_void> {
    // SAFETY: a fresh shared mapping of a descriptor we hold; no existing memory is touched.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ptr)
}

// SAFETY: the mapping is only ever accessed through atomics, and it stays mapped until the
// board is dropped; which thread does either does not matter.
unsafe impl Send for LoadBoard {}
// SAFETY: as above: shared access is atomic loads and stores.
unsafe impl Sync for LoadBoard {}

impl Drop for LoadBoard {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.base as *mut libc::c_void, BYTES) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_of_the_largest_pool_fits_on_the_board() {
        const { assert!(ASSIGNABLE >= 2 * MAX_WORKERS) };
        let mut b = LoadBoard::create().unwrap();
        for i in 0..2 * MAX_WORKERS {
            assert_eq!(b.assign(), Some(i));
        }
        b.publish(2 * MAX_WORKERS - 1, 7);
        assert_eq!(b.least_other(0), Some(7));
    }

    #[test]
    fn entries_are_shared_between_mappings() {
        let mut a = LoadBoard::create().unwrap();
        let b = LoadBoard::map(a.fd().try_clone().unwrap()).unwrap();
        assert_eq!(b.least_other(0), None);
        assert_eq!(
            (a.assign(), a.assign(), a.assign()),
            (Some(0), Some(1), Some(2))
        );
        a.publish(1, 5);
        a.publish(2, 3);
        assert_eq!(b.least_other(0), Some(3));
        assert_eq!(b.least_other(2), Some(5));
        a.release(2);
        assert_eq!(b.least_other(0), Some(5));
        assert_eq!(b.readiness(), Readiness::Starting);
        a.set_readiness(Readiness::Draining);
        assert_eq!(b.readiness(), Readiness::Draining);
        // The readiness word is not an entry: no worker looks that busy.
        assert_eq!(b.least_other(0), Some(5));
        // A released entry is given out again, and starts empty.
        a.publish(0, 9);
        assert_eq!(a.assign(), Some(2));
        assert_eq!(b.least_other(0), Some(5));
    }
}
