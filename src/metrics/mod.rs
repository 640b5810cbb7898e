//! Metrics for the whole pool: a shared page every worker counts into, summed by whichever
//! worker answers a scrape.
//!
//! The page lives in the load board's memfd, after the board (so it reaches every worker
//! with the descriptor the board already uses). It holds, in 64-bit words:
//!
//! * a header the master writes: the seqlock word, its start time, generation, restart
//!   budget, reloads, restarts by cause and whether the pool is ready;
//! * a directory of the service's own metrics ([`user`]): name, help, kind, buckets and
//!   where their words are, claimed by whichever worker registers a name first, so every
//!   worker (of every generation) counts a name into the same words;
//! * one *live area* per load-board entry: the worker holding that entry counts its requests,
//!   bytes, connections and the service's metrics there (each word has one writer: plain
//!   relaxed loads and stores on the hot path, no locks, no read-modify-write, no allocation);
//!   the master writes the worker's identity, heartbeat round trip, PSS and CPU time there;
//! * one *retired area* per slot: when the master reaps a worker, it adds the counters of its
//!   live area into its slot's retired area and zeroes the live area, inside a seqlock, so a
//!   scrape sees either before or after the move, never both or neither. Counters therefore
//!   never go backwards across crashes, SIGKILL, recycling and reloads; only a new master
//!   (a new page) starts them at zero, which `process_start_time_seconds` tells.
//!
//! The scrape sums retired and live areas and encodes them with `prometheus-client` (the
//! Prometheus project's crate) as OpenMetrics text.

mod encode;
pub mod user;

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::time::Duration;

use crate::loadboard::{ENTRIES, MAX_WORKERS};

pub use encode::{CONTENT_TYPE, scrape};

/// Where the page starts in the board's memfd (page-aligned, after the board).
const OFFSET: usize = 16 * 1024;

// ---- header ----------------------------------------------------------------------------
const H_SEQ: usize = 0;
const H_START_TIME: usize = 1;
const H_GENERATION: usize = 2;
const H_BUDGET_USED: usize = 3;
const H_BUDGET_LIMIT: usize = 4;
const H_RELOADS_OK: usize = 5;
const H_RELOADS_FAILED: usize = 6;
/// Reload duration histogram: [`RELOAD_BUCKETS`] + 1 counts, then the sum in µs.
const H_RELOAD_HIST: usize = 8;
const H_RESTARTS: usize = 24;
const H_AREAS_SEEN: usize = 40;
const H_SLOTS_SEEN: usize = 41;
const H_USER_NEXT: usize = 42;
const H_TARGET_WORKERS: usize = 43;
/// The serving certificate's end of validity (Unix seconds), 0 without TLS.
const H_TLS_NOT_AFTER: usize = 44;
/// 1 while the readiness endpoint answers 200 (see [`crate::master`]'s drain), else 0.
const H_READY: usize = 45;
const HEADER_WORDS: usize = 64;

pub const RELOAD_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Why a worker was replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Crash,
    Hang,
    Panic,
    Memory,
    Requests,
    Reload,
    Scale,
}

pub const CAUSES: [(&str, Cause); 7] = [
    ("crash", Cause::Crash),
    ("hang", Cause::Hang),
    ("panic", Cause::Panic),
    ("memory", Cause::Memory),
    ("requests", Cause::Requests),
    ("reload", Cause::Reload),
    ("scale", Cause::Scale),
];

// ---- directory of the service's metrics --------------------------------------------------
pub(crate) const USER_ENTRIES: usize = 64;
const ENTRY_WORDS: usize = 64;
const DIR: usize = HEADER_WORDS;

// ---- areas ------------------------------------------------------------------------------
pub(crate) const AREA_WORDS: usize = 512;
const LIVE: usize = DIR + USER_ENTRIES * ENTRY_WORDS;
const RETIRED: usize = LIVE + ENTRIES * AREA_WORDS;
const WORDS: usize = RETIRED + MAX_WORKERS * AREA_WORDS;
const BYTES: usize = WORDS * 8;

// Master-written words of an area.
pub(crate) const A_SLOT: usize = 0; // slot + 1; 0 = free
pub(crate) const A_PID: usize = 1;
pub(crate) const A_GENERATION: usize = 2;
pub(crate) const A_RTT_NS: usize = 3;
pub(crate) const A_PSS: usize = 4;
pub(crate) const A_CPU_NS: usize = 5; // counter, folded
pub(crate) const A_RPS: usize = 6; // f64 bits
pub(crate) const A_P99: usize = 7; // f64 bits, seconds
// Worker-written words.
pub(crate) const A_CONN_H1: usize = 8;
pub(crate) const A_CONN_H2: usize = 9;
pub(crate) const A_CONN_UPGRADED: usize = 10;
pub(crate) const A_ACCEPTED: usize = 11;
pub(crate) const A_BYTES_IN: usize = 12;
pub(crate) const A_BYTES_OUT: usize = 13;
pub(crate) const A_REQ: usize = 16;
pub(crate) const A_DUR: usize = A_REQ + METHODS.len() * CLASSES.len(); // 64
pub(crate) const A_DUR_SUM: usize = A_DUR + DURATION_BUCKETS.len() + 1;
pub(crate) const A_DUR_COUNT: usize = A_DUR_SUM + 1;
/// Counters folded on retirement: everything from here to the end of the durations.
const FOLD_FROM: usize = A_ACCEPTED;
const FOLD_TO: usize = A_DUR_COUNT + 1;
pub(crate) const A_USER: usize = 128;
pub(crate) const USER_WORDS: usize = AREA_WORDS - A_USER;

/// Request methods with a label of their own; the rest count as `other`.
pub const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "other",
];
/// Status classes: 1xx..5xx, and anything else.
pub const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];
/// Request duration buckets (seconds): resolve answers from 100 µs up.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
const DURATION_BUCKETS_NS: [u64; 16] = {
    let mut out = [0u64; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = (DURATION_BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    out
};

/// The shared page, mapped.
pub struct Page {
    base: *const AtomicU64,
}

// SAFETY: the mapping is only accessed through atomics and is never unmapped while a
// `Page` exists (worker pages are leaked; the master's lives as long as the master).
unsafe impl Send for Page {}
// SAFETY: as above.
unsafe impl Sync for Page {}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.base as *mut libc::c_void, BYTES) };
    }
}

impl Page {
    /// Grows the board's memfd to hold the page and maps it (master). The new bytes are
    /// zero; memory is only used for the parts that are touched.
    pub fn create(board: BorrowedFd<'_>) -> std::io::Result<Page> {
        // SAFETY: ftruncate on the master's own memfd.
        if unsafe { libc::ftruncate(board.as_raw_fd(), (OFFSET + BYTES) as libc::off_t) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let page = Self::map(board)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        page.w(H_START_TIME).store(now.to_bits(), Ordering::Relaxed);
        Ok(page)
    }

    /// Maps the page of an inherited board descriptor (worker), after checking its size.
    pub fn map(board: BorrowedFd<'_>) -> std::io::Result<Page> {
        let st = nix::sys::stat::fstat(board)?;
        if (st.st_size as usize) < OFFSET + BYTES {
            return Err(std::io::Error::other(
                "the board's memfd holds no metrics page",
            ));
        }
        let ptr = crate::loadboard::map_shared(board, BYTES, OFFSET)?;
        Ok(Page {
            base: ptr as *const AtomicU64,
        })
    }

    pub(crate) fn w(&self, i: usize) -> &AtomicU64 {
        assert!(i < WORDS);
        // SAFETY: in bounds of the mapping, which lives as long as self; only ever accessed
        // atomically.
        unsafe { &*self.base.add(i) }
    }

    pub(crate) fn live(&self, index: usize) -> Area<'_> {
        assert!(index < ENTRIES);
        Area {
            page: self,
            base: LIVE + index * AREA_WORDS,
        }
    }

    pub(crate) fn retired(&self, slot: usize) -> Area<'_> {
        assert!(slot < MAX_WORKERS);
        Area {
            page: self,
            base: RETIRED + slot * AREA_WORDS,
        }
    }

    fn get(&self, i: usize) -> u64 {
        self.w(i).load(Ordering::Relaxed)
    }

    fn set(&self, i: usize, v: u64) {
        self.w(i).store(v, Ordering::Relaxed)
    }

    fn add(&self, i: usize, v: u64) {
        self.w(i).fetch_add(v, Ordering::Relaxed);
    }

    // ---- the master's side ---------------------------------------------------------------

    /// A new worker holds board entry `index` (its area was zeroed when the last one left).
    pub fn attach(&self, index: usize, slot: usize, pid: i32, generation: u64) {
        let a = self.live(index);
        a.set(A_PID, pid as u64);
        a.set(A_GENERATION, generation);
        a.set(A_SLOT, slot as u64 + 1);
        self.w(H_AREAS_SEEN)
            .fetch_max(index as u64 + 1, Ordering::Relaxed);
        self.w(H_SLOTS_SEEN)
            .fetch_max(slot as u64 + 1, Ordering::Relaxed);
    }

    /// The worker at `index` has exited: its counters move to its slot's retired area and
    /// its area is zeroed for the next worker, atomically for readers (seqlock).
    pub fn fold(&self, index: usize) {
        let live = self.live(index);
        let slot = live.get(A_SLOT);
        let seq = self.w(H_SEQ);
        seq.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::Release);
        if slot > 0 && (slot as usize) <= MAX_WORKERS {
            let retired = self.retired(slot as usize - 1);
            let fold = |i: usize| retired.set(i, retired.get(i) + live.get(i));
            fold(A_CPU_NS);
            (FOLD_FROM..FOLD_TO).for_each(fold);
            for (off, len, gauge) in user::layout(self) {
                if !gauge {
                    (A_USER + off..A_USER + off + len).for_each(fold);
                }
            }
        }
        for i in 0..AREA_WORDS {
            live.set(i, 0);
        }
        seq.fetch_add(1, Ordering::Release);
    }

    pub fn set_generation(&self, generation: u64) {
        self.set(H_GENERATION, generation);
    }

    /// The serving certificate's end of validity (Unix seconds); 0 without TLS.
    pub fn set_tls_not_after(&self, not_after: u64) {
        self.set(H_TLS_NOT_AFTER, not_after);
    }

    pub fn set_ready(&self, ready: bool) {
        self.set(H_READY, u64::from(ready));
    }

    pub fn set_budget(&self, used: u32, limit: u32, target: usize) {
        self.set(H_BUDGET_USED, used as u64);
        self.set(H_BUDGET_LIMIT, limit as u64);
        self.set(H_TARGET_WORKERS, target as u64);
    }

    pub fn count_restart(&self, cause: Cause) {
        let i = CAUSES.iter().position(|(_, c)| *c == cause).unwrap_or(0);
        self.add(H_RESTARTS + i, 1);
    }

    pub fn count_reload(&self, ok: bool, took: Duration) {
        self.add(if ok { H_RELOADS_OK } else { H_RELOADS_FAILED }, 1);
        let secs = took.as_secs_f64();
        let b = RELOAD_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(RELOAD_BUCKETS.len());
        self.add(H_RELOAD_HIST + b, 1);
        self.add(
            H_RELOAD_HIST + RELOAD_BUCKETS.len() + 1,
            took.as_micros() as u64,
        );
    }

    /// Requests answered since the page was created: exited workers' and live ones'.
    pub fn requests_total(&self) -> u64 {
        let retired: u64 = (0..self.slots_seen())
            .map(|s| self.retired(s).requests())
            .sum();
        let live: u64 = (0..self.areas_seen())
            .map(|i| self.live(i))
            .filter(|a| a.get(A_SLOT) > 0)
            .map(|a| a.requests())
            .sum();
        retired + live
    }

    /// How many live areas have ever been used (scrapes and the master read no further).
    pub(crate) fn areas_seen(&self) -> usize {
        (self.get(H_AREAS_SEEN) as usize).min(ENTRIES)
    }

    pub(crate) fn slots_seen(&self) -> usize {
        (self.get(H_SLOTS_SEEN) as usize).min(MAX_WORKERS)
    }
}

/// One worker's (or one slot's retired) words.
#[derive(Clone, Copy)]
pub struct Area<'a> {
    page: &'a Page,
    base: usize,
}

impl Area<'_> {
    pub(crate) fn w(&self, i: usize) -> &AtomicU64 {
        assert!(i < AREA_WORDS);
        self.page.w(self.base + i)
    }
    pub(crate) fn get(&self, i: usize) -> u64 {
        self.w(i).load(Ordering::Relaxed)
    }
    pub(crate) fn set(&self, i: usize, v: u64) {
        self.w(i).store(v, Ordering::Relaxed)
    }
    pub(crate) fn get_f64(&self, i: usize) -> f64 {
        f64::from_bits(self.get(i))
    }
    pub(crate) fn set_f64(&self, i: usize, v: f64) {
        self.set(i, v.to_bits())
    }
    /// Requests in this area, all methods and classes.
    pub(crate) fn requests(&self) -> u64 {
        (A_REQ..A_DUR).map(|i| self.get(i)).sum()
    }
    /// The duration histogram's bucket counts (not cumulative) and count.
    pub(crate) fn durations(&self) -> ([u64; DURATION_BUCKETS.len() + 1], u64) {
        let mut b = [0u64; DURATION_BUCKETS.len() + 1];
        for (i, v) in b.iter_mut().enumerate() {
            *v = self.get(A_DUR + i);
        }
        (b, self.get(A_DUR_COUNT))
    }
}

// ---- the worker's side ---------------------------------------------------------------------

/// This worker's page and the index of its own area, once the worker has mapped it.
struct Local {
    page: Page,
    index: usize,
}

static LOCAL: OnceLock<Local> = OnceLock::new();

/// Maps the page of the board descriptor this worker inherited, for the life of the process.
pub(crate) fn init_worker(board: BorrowedFd<'_>, index: usize) -> std::io::Result<()> {
    let page = Page::map(board)?;
    let _ = LOCAL.set(Local { page, index });
    Ok(())
}

pub(crate) fn page() -> Option<&'static Page> {
    LOCAL.get().map(|l| &l.page)
}

/// This worker's own area, if it has one.
pub(crate) fn local() -> Option<Area<'static>> {
    LOCAL.get().map(|l| l.page.live(l.index))
}

/// Single-writer increment: this worker is the only writer of its words, so a load and a
/// store (not an atomic read-modify-write) is enough, and costs a plain `mov` each.
#[inline]
fn bump(w: &AtomicU64, n: u64) {
    w.store(w.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

#[inline]
pub(crate) fn bytes_in(n: u64) {
    if let Some(a) = local() {
        bump(a.w(A_BYTES_IN), n);
    }
}

#[inline]
pub(crate) fn accepted() {
    if let Some(a) = local() {
        bump(a.w(A_ACCEPTED), 1);
    }
}

/// Which open-connections gauge a connection counts in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Proto {
    Http1,
    Http2,
    Upgraded,
}

/// Counts one connection in a protocol's gauge while it lives.
pub(crate) struct OpenAs(Option<usize>);

impl OpenAs {
    pub(crate) fn new(p: Proto) -> OpenAs {
        let i = match p {
            Proto::Http1 => A_CONN_H1,
            Proto::Http2 => A_CONN_H2,
            Proto::Upgraded => A_CONN_UPGRADED,
        };
        match local() {
            Some(a) => {
                bump(a.w(i), 1);
                OpenAs(Some(i))
            }
            None => OpenAs(None),
        }
    }
}

impl Drop for OpenAs {
    fn drop(&mut self) {
        if let (Some(i), Some(a)) = (self.0, local()) {
            bump(a.w(i), u64::MAX); // -1
        }
    }
}

fn method_index(m: &http::Method) -> usize {
    match *m {
        http::Method::GET => 0,
        http::Method::POST => 1,
        http::Method::PUT => 2,
        http::Method::DELETE => 3,
        http::Method::HEAD => 4,
        http::Method::PATCH => 5,
        http::Method::OPTIONS => 6,
        _ => 7,
    }
}

/// One finished request: its method, status, response body bytes and duration (ns).
#[inline]
pub(crate) fn request_done(method: u8, status: u16, bytes_out: u64, ns: u64) {
    let Some(a) = local() else { return };
    let class = match status {
        100..=599 => (status / 100 - 1) as usize,
        _ => 5,
    };
    bump(a.w(A_REQ + method as usize * CLASSES.len() + class), 1);
    let b = DURATION_BUCKETS_NS
        .iter()
        .position(|&le| ns <= le)
        .unwrap_or(DURATION_BUCKETS_NS.len());
    bump(a.w(A_DUR + b), 1);
    bump(a.w(A_DUR_SUM), ns);
    bump(a.w(A_DUR_COUNT), 1);
    if bytes_out > 0 {
        bump(a.w(A_BYTES_OUT), bytes_out);
    }
}

pub(crate) fn method_code(m: &http::Method) -> u8 {
    method_index(m) as u8
}

// ---- the master's view over an interval (requests/s, p99) ------------------------------

/// p-quantile of a histogram (non-cumulative counts over [`DURATION_BUCKETS`] + +Inf), by
/// linear interpolation within the bucket, as Prometheus' `histogram_quantile` does.
pub fn quantile(q: f64, counts: &[u64]) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        if c > 0 && (seen + c) as f64 >= rank {
            if i >= DURATION_BUCKETS.len() {
                // In +Inf: the highest finite bound, as histogram_quantile answers.
                return Some(DURATION_BUCKETS[DURATION_BUCKETS.len() - 1]);
            }
            let lo = if i == 0 { 0.0 } else { DURATION_BUCKETS[i - 1] };
            let hi = DURATION_BUCKETS[i];
            return Some(lo + (hi - lo) * ((rank - seen as f64) / c as f64));
        }
        seen += c;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_moves_counters_to_the_slot_and_keeps_gauges_out() {
        let board = crate::loadboard::LoadBoard::create().unwrap();
        let page = Page::create(std::os::fd::AsFd::as_fd(board.fd())).unwrap();
        let other = Page::map(std::os::fd::AsFd::as_fd(board.fd())).unwrap();
        page.attach(3, 1, 42, 1);
        let a = other.live(3);
        bump(a.w(A_REQ), 5);
        bump(a.w(A_CONN_H1), 2);
        bump(a.w(A_DUR), 5);
        bump(a.w(A_DUR_COUNT), 5);
        page.fold(3);
        let r = other.retired(1);
        assert_eq!(r.requests(), 5);
        assert_eq!(r.get(A_DUR_COUNT), 5);
        assert_eq!(r.get(A_CONN_H1), 0);
        assert_eq!(other.live(3).requests(), 0);
        assert_eq!(other.live(3).get(A_SLOT), 0);
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let mut c = [0u64; 17];
        c[3] = 100; // (0.5 ms, 1 ms]
        let p99 = quantile(0.99, &c).unwrap();
        assert!((p99 - 0.000995).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(0.5, &[0; 17]), None);
    }
}
