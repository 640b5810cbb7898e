//! The service's own metrics: counters, gauges and histograms a worker defines, summed
//! across workers on the pool's metrics endpoint.
//!
//! A name is registered in a directory on the shared page the first time any worker asks
//! for it; the directory says where the name's words are in every worker's area, so all
//! workers (and later generations) count the same name into the same place, whatever order
//! they register in. Limits: [`MAX_METRICS`] names, [`USER_WORDS`](super::USER_WORDS) words
//! per worker in all (a counter or gauge takes 1, a histogram its buckets + 3), names up to
//! 127 bytes, help up to 191 bytes, at most 16 histogram buckets, no labels.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{A_USER, DIR, ENTRY_WORDS, H_USER_NEXT, Page, USER_ENTRIES, USER_WORDS};

/// How many metrics the service may define (over all its workers and generations).
pub const MAX_METRICS: usize = USER_ENTRIES;
const MAX_BUCKETS: usize = 16;
const NAME_WORDS: usize = 16;
const HELP_WORDS: usize = 24;

const E_STATE: usize = 0;
const E_KIND: usize = 1;
const E_OFFSET: usize = 2;
const E_LEN: usize = 3;
const E_BUCKETS: usize = 4;
const E_NAME: usize = 8;
const E_HELP: usize = E_NAME + NAME_WORDS;
const E_BOUNDS: usize = E_HELP + HELP_WORDS;

const FREE: u64 = 0;
const WRITING: u64 = 1;
const READY: u64 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Counter = 1,
    Gauge = 2,
    Histogram = 3,
}

impl Kind {
    fn from(v: u64) -> Option<Kind> {
        match v {
            1 => Some(Kind::Counter),
            2 => Some(Kind::Gauge),
            3 => Some(Kind::Histogram),
            _ => None,
        }
    }
}

/// A metric the service could not define: a bad name, a name already defined as another
/// kind or with other buckets, or no room left on the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricError(String);

impl std::fmt::Display for MetricError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MetricError {}

/// Defines the service's own metrics (from [`crate::Worker::metrics`]). Values are summed
/// across workers on the pool's metrics endpoint; counters and histograms keep the counts of
/// workers that have exited (a reload or a crash never makes them go backwards), gauges
/// are the sum over the workers alive now.
///
/// Every worker runs the same factory, so define metrics there (or anywhere, in any order:
/// names, not positions, decide where they are counted). Updating a metric is one relaxed
/// atomic add on a shared page: no lock, no allocation, usable from any thread.
#[derive(Clone, Debug, Default)]
pub struct Metrics(());

impl Metrics {
    pub(crate) fn new() -> Metrics {
        Metrics(())
    }

    /// A counter. `name` follows Prometheus' rules (`[a-zA-Z_:][a-zA-Z0-9_:]*`); the
    /// endpoint shows it with `_total` appended (a trailing `_total` given here is dropped).
    pub fn counter(&self, name: &str, help: &str) -> Result<Counter, MetricError> {
        let name = name.strip_suffix("_total").unwrap_or(name);
        Ok(Counter(&register(name, help, Kind::Counter, &[])?[0]))
    }

    /// A gauge, summed over the workers alive.
    pub fn gauge(&self, name: &str, help: &str) -> Result<Gauge, MetricError> {
        Ok(Gauge(&register(name, help, Kind::Gauge, &[])?[0]))
    }

    /// A histogram with these upper bounds (increasing, at most 16; `+Inf` is implied).
    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        buckets: &[f64],
    ) -> Result<Histogram, MetricError> {
        if buckets.is_empty()
            || buckets.len() > MAX_BUCKETS
            || buckets
                .windows(2)
                .any(|w| w[0].partial_cmp(&w[1]) != Some(std::cmp::Ordering::Less))
            || buckets.iter().any(|b| !b.is_finite())
        {
            return Err(MetricError(format!(
                "{name}: buckets must be 1 to {MAX_BUCKETS} finite, increasing bounds"
            )));
        }
        let words = register(name, help, Kind::Histogram, buckets)?;
        Ok(Histogram {
            words,
            bounds: buckets.into(),
        })
    }
}

/// A counter of the service's, summed across workers.
#[derive(Clone, Copy, Debug)]
pub struct Counter(&'static AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Adds `n`.
    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// This worker's count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gauge of the service's: each worker sets its own value, the endpoint shows the sum.
#[derive(Clone, Copy, Debug)]
pub struct Gauge(&'static AtomicU64);

impl Gauge {
    /// Sets this worker's value.
    pub fn set(&self, v: i64) {
        self.0.store(v as u64, Ordering::Relaxed);
    }
    /// Adds `v` (may be negative).
    pub fn add(&self, v: i64) {
        self.0.fetch_add(v as u64, Ordering::Relaxed);
    }
    /// Adds one.
    pub fn inc(&self) {
        self.add(1)
    }
    /// Subtracts one.
    pub fn dec(&self) {
        self.add(-1)
    }
    /// This worker's value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed) as i64
    }
}

/// A histogram of the service's, summed across workers.
#[derive(Clone, Debug)]
pub struct Histogram {
    /// Bucket counts (one per bound, then +Inf), the sum (f64 bits), the count.
    words: &'static [AtomicU64],
    bounds: Arc<[f64]>,
}

impl Histogram {
    /// Records one value.
    pub fn observe(&self, v: f64) {
        let n = self.bounds.len();
        let b = self.bounds.iter().position(|&le| v <= le).unwrap_or(n);
        self.words[b].fetch_add(1, Ordering::Relaxed);
        let sum = &self.words[n + 1];
        let mut cur = sum.load(Ordering::Relaxed);
        loop {
            let new = (f64::from_bits(cur) + v).to_bits();
            match sum.compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        self.words[n + 2].fetch_add(1, Ordering::Relaxed);
    }

    /// Records the time since `start`, in seconds.
    pub fn observe_since(&self, start: Instant) {
        self.observe(start.elapsed().as_secs_f64())
    }

    /// Records a duration, in seconds.
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64())
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn hash(s: &str) -> usize {
    // FNV-1a: stable across processes and builds, unlike std's hasher.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h as usize
}

fn put_str(page: &Page, at: usize, words: usize, s: &str) {
    let mut bytes = s.as_bytes().to_vec();
    bytes.truncate(words * 8 - 1);
    bytes.resize(words * 8, 0);
    for (i, chunk) in bytes.chunks(8).enumerate() {
        let v = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        page.w(at + i).store(v, Ordering::Relaxed);
    }
}

fn get_str(page: &Page, at: usize, words: usize) -> String {
    let mut bytes = Vec::with_capacity(words * 8);
    for i in 0..words {
        bytes.extend_from_slice(&page.w(at + i).load(Ordering::Relaxed).to_le_bytes());
    }
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// One entry of the directory, as a scrape or the master reads it.
#[derive(Debug)]
pub(crate) struct Entry {
    pub name: String,
    pub help: String,
    pub kind: Kind,
    pub offset: usize,
    pub len: usize,
    pub bounds: Vec<f64>,
}

fn read_entry(page: &Page, i: usize) -> Option<Entry> {
    let e = DIR + i * ENTRY_WORDS;
    if page.w(e + E_STATE).load(Ordering::Acquire) != READY {
        return None;
    }
    let kind = Kind::from(page.w(e + E_KIND).load(Ordering::Relaxed))?;
    let offset = page.w(e + E_OFFSET).load(Ordering::Relaxed) as usize;
    let len = page.w(e + E_LEN).load(Ordering::Relaxed) as usize;
    let nb = (page.w(e + E_BUCKETS).load(Ordering::Relaxed) as usize).min(MAX_BUCKETS);
    if offset + len > USER_WORDS {
        return None;
    }
    Some(Entry {
        name: get_str(page, e + E_NAME, NAME_WORDS),
        help: get_str(page, e + E_HELP, HELP_WORDS),
        kind,
        offset,
        len,
        bounds: (0..nb)
            .map(|b| f64::from_bits(page.w(e + E_BOUNDS + b).load(Ordering::Relaxed)))
            .collect(),
    })
}

/// Every defined metric.
pub(crate) fn entries(page: &Page) -> Vec<Entry> {
    (0..USER_ENTRIES)
        .filter_map(|i| read_entry(page, i))
        .collect()
}

/// (offset, len, is a gauge) of every defined metric, for the master's fold.
pub(crate) fn layout(page: &Page) -> Vec<(usize, usize, bool)> {
    entries(page)
        .into_iter()
        .map(|e| (e.offset, e.len, e.kind == Kind::Gauge))
        .collect()
}

/// Finds or claims `name` in the directory; returns this worker's words for it.
fn register(
    name: &str,
    help: &str,
    kind: Kind,
    bounds: &[f64],
) -> Result<&'static [AtomicU64], MetricError> {
    if !valid_name(name) || name.len() >= NAME_WORDS * 8 {
        return Err(MetricError(format!(
            "{name:?} is not a metric name ([a-zA-Z_:][a-zA-Z0-9_:]*, at most 127 bytes)"
        )));
    }
    if name.starts_with("app_") || name.starts_with("process_") {
        return Err(MetricError(format!(
            "{name}: the app_ and process_ prefixes are the server's own"
        )));
    }
    let len = match kind {
        Kind::Histogram => bounds.len() + 3,
        _ => 1,
    };
    let (Some(page), Some(area)) = (super::page(), super::local()) else {
        // Not in a worker (a unit test of the service, say): count locally, shown nowhere.
        let words: Vec<AtomicU64> = (0..len).map(|_| AtomicU64::new(0)).collect();
        return Ok(Box::leak(words.into_boxed_slice()));
    };
    let start = hash(name);
    for probe in 0..USER_ENTRIES {
        let i = (start + probe) % USER_ENTRIES;
        let e = DIR + i * ENTRY_WORDS;
        let state = page.w(e + E_STATE);
        let mut claimed = false;
        let waited = Instant::now();
        loop {
            match state.load(Ordering::Acquire) {
                FREE => {
                    if state
                        .compare_exchange(FREE, WRITING, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                    {
                        claimed = true;
                        break;
                    }
                }
                WRITING if waited.elapsed() < Duration::from_millis(100) => {
                    std::thread::yield_now()
                }
                _ => break,
            }
        }
        if claimed {
            let offset = page.w(H_USER_NEXT).fetch_add(len as u64, Ordering::Relaxed) as usize;
            if offset + len > USER_WORDS {
                // No room: the entry stays claimed but unusable (never READY).
                return Err(MetricError(format!(
                    "{name}: no room left for the service's metrics ({USER_WORDS} words per worker)"
                )));
            }
            page.w(e + E_KIND).store(kind as u64, Ordering::Relaxed);
            page.w(e + E_OFFSET).store(offset as u64, Ordering::Relaxed);
            page.w(e + E_LEN).store(len as u64, Ordering::Relaxed);
            page.w(e + E_BUCKETS)
                .store(bounds.len() as u64, Ordering::Relaxed);
            put_str(page, e + E_NAME, NAME_WORDS, name);
            put_str(page, e + E_HELP, HELP_WORDS, help);
            for (b, v) in bounds.iter().enumerate() {
                page.w(e + E_BOUNDS + b)
                    .store(v.to_bits(), Ordering::Relaxed);
            }
            state.store(READY, Ordering::Release);
            return Ok(words_of(area, offset, len));
        }
        if let Some(found) = read_entry(page, i)
            && found.name == name
        {
            if found.kind != kind || found.bounds != bounds {
                return Err(MetricError(format!(
                    "{name}: already defined as another kind or with other buckets"
                )));
            }
            return Ok(words_of(area, found.offset, found.len));
        }
    }
    Err(MetricError(format!(
        "{name}: the service may define at most {MAX_METRICS} metrics"
    )))
}

fn words_of(area: super::Area<'static>, offset: usize, len: usize) -> &'static [AtomicU64] {
    let first = area.w(A_USER + offset) as *const AtomicU64;
    // The words are contiguous within the area, which lives (mapped, never unmapped) for
    // the life of the worker process.
    assert!(A_USER + offset + len <= super::AREA_WORDS);
    // SAFETY: `len` consecutive AtomicU64 of the mapping, checked in bounds above.
    unsafe { std::slice::from_raw_parts(first, len) }
}
