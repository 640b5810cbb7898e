//! A scrape: one consistent read of the page (seqlock against the master's folds), summed,
//! and encoded as OpenMetrics text by `prometheus-client`.

use std::sync::atomic::{Ordering, fence};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::user::{self, Kind};
use super::*;

/// The content type of [`scrape`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Default, Clone)]
struct SlotSnap {
    seen: bool,
    live: u32,
    requests: u64,
    accepted: u64,
    cpu_ns: u64,
    pss: u64,
    rtt_ns: u64,
    generation: u64,
    conns: [u64; 3],
    rps: f64,
    p99: f64,
}

#[derive(Debug, Default)]
struct Snapshot {
    start_time: f64,
    generation: u64,
    tls_not_after: u64,
    ready: u64,
    target: u64,
    budget_used: u64,
    budget_limit: u64,
    reloads: [u64; 2],
    reload_hist: Vec<u64>,
    reload_sum_us: u64,
    restarts: Vec<u64>,
    slots: Vec<SlotSnap>,
    req: Vec<u64>,
    dur: Vec<u64>,
    dur_sum_ns: u64,
    dur_count: u64,
    bytes_in: u64,
    bytes_out: u64,
    user: Vec<(user::Entry, Vec<u64>)>,
}

fn read(page: &Page) -> Snapshot {
    let g = |i| page.get(i);
    let mut s = Snapshot {
        start_time: f64::from_bits(g(H_START_TIME)),
        generation: g(H_GENERATION),
        tls_not_after: g(H_TLS_NOT_AFTER),
        ready: g(H_READY),
        target: g(H_TARGET_WORKERS),
        budget_used: g(H_BUDGET_USED),
        budget_limit: g(H_BUDGET_LIMIT),
        reloads: [g(H_RELOADS_OK), g(H_RELOADS_FAILED)],
        reload_hist: (0..=RELOAD_BUCKETS.len())
            .map(|i| g(H_RELOAD_HIST + i))
            .collect(),
        reload_sum_us: g(H_RELOAD_HIST + RELOAD_BUCKETS.len() + 1),
        restarts: (0..CAUSES.len()).map(|i| g(H_RESTARTS + i)).collect(),
        slots: vec![SlotSnap::default(); page.slots_seen()],
        req: vec![0; METHODS.len() * CLASSES.len()],
        dur: vec![0; DURATION_BUCKETS.len() + 1],
        ..Default::default()
    };
    let entries = user::entries(page);
    let mut user: Vec<Vec<u64>> = entries.iter().map(|e| vec![0; e.len]).collect();
    let mut add = |s: &mut Snapshot, a: Area<'_>, live: bool| {
        for (i, v) in s.req.iter_mut().enumerate() {
            *v += a.get(A_REQ + i);
        }
        for (i, v) in s.dur.iter_mut().enumerate() {
            *v += a.get(A_DUR + i);
        }
        s.dur_sum_ns += a.get(A_DUR_SUM);
        s.dur_count += a.get(A_DUR_COUNT);
        s.bytes_in += a.get(A_BYTES_IN);
        s.bytes_out += a.get(A_BYTES_OUT);
        for (e, sums) in entries.iter().zip(user.iter_mut()) {
            if e.kind == Kind::Gauge && !live {
                continue;
            }
            for (k, v) in sums.iter_mut().enumerate() {
                let w = a.get(A_USER + e.offset + k);
                *v = if e.kind == Kind::Histogram && k == e.bounds.len() + 1 {
                    // The sum is an f64.
                    (f64::from_bits(*v) + f64::from_bits(w)).to_bits()
                } else {
                    v.wrapping_add(w)
                };
            }
        }
    };
    for slot in 0..s.slots.len() {
        let r = page.retired(slot);
        let snap = &mut s.slots[slot];
        snap.requests += r.requests();
        snap.accepted += r.get(A_ACCEPTED);
        snap.cpu_ns += r.get(A_CPU_NS);
        snap.seen = true;
        add(&mut s, r, false);
    }
    for index in 0..page.areas_seen() {
        let a = page.live(index);
        let slot = a.get(A_SLOT) as usize;
        if slot == 0 {
            continue;
        }
        let slot = slot - 1;
        if slot >= s.slots.len() {
            s.slots.resize(slot + 1, SlotSnap::default());
        }
        let snap = &mut s.slots[slot];
        snap.seen = true;
        snap.live += 1;
        snap.requests += a.requests();
        snap.accepted += a.get(A_ACCEPTED);
        snap.cpu_ns += a.get(A_CPU_NS);
        snap.pss += a.get(A_PSS);
        snap.rtt_ns = snap.rtt_ns.max(a.get(A_RTT_NS));
        snap.generation = snap.generation.max(a.get(A_GENERATION));
        snap.conns[0] += a.get(A_CONN_H1);
        snap.conns[1] += a.get(A_CONN_H2);
        snap.conns[2] += a.get(A_CONN_UPGRADED);
        snap.rps += a.get_f64(A_RPS);
        snap.p99 = snap.p99.max(a.get_f64(A_P99));
        add(&mut s, a, true);
    }
    s.user = entries.into_iter().zip(user).collect();
    s
}

/// Reads the page consistently: retried while the master is moving an exited worker's
/// counters (which takes microseconds).
fn snapshot(page: &Page) -> Snapshot {
    let seq = page.w(H_SEQ);
    loop {
        let before = seq.load(Ordering::Acquire);
        if before & 1 == 1 {
            std::thread::yield_now();
            continue;
        }
        let s = read(page);
        fence(Ordering::Acquire);
        if seq.load(Ordering::Relaxed) == before {
            return s;
        }
    }
}

/// The pool's metrics as OpenMetrics text, or `None` outside a worker with a page.
pub fn scrape() -> Option<String> {
    let page = super::page()?;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot(page)));
    let mut out = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut out, &registry).ok()?;
    Some(out)
}

type Labels = Vec<(&'static str, String)>;

fn family<V>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    samples: impl IntoIterator<Item = (Labels, V)>,
    put: impl Fn(&mut prometheus_client::encoding::MetricEncoder, &V) -> std::fmt::Result,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, v) in samples {
        if labels.is_empty() {
            put(&mut m, &v)?;
        } else {
            let mut f = m.encode_family(&labels)?;
            put(&mut f, &v)?;
        }
    }
    Ok(())
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, f64)>,
) -> std::fmt::Result {
    family(enc, name, help, MetricType::Counter, samples, |m, v| {
        m.encode_counter::<NoLabelSet, f64, f64>(v, None)
    })
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, f64)>,
) -> std::fmt::Result {
    family(enc, name, help, MetricType::Gauge, samples, |m, v| {
        m.encode_gauge(v)
    })
}

/// (upper bound, count) pairs, not cumulative (the encoder accumulates); +Inf last, which
/// prometheus-client spells `f64::MAX`.
fn pairs(bounds: &[f64], counts: &[u64]) -> Vec<(f64, u64)> {
    counts
        .iter()
        .enumerate()
        .map(|(i, c)| (bounds.get(i).copied().unwrap_or(f64::MAX), *c))
        .collect()
}

fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    bounds: &[f64],
    counts: &[u64],
    sum: f64,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    let buckets = pairs(bounds, counts);
    let count = counts.iter().sum();
    m.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
}

fn worker(slot: usize) -> Labels {
    vec![("worker", slot.to_string())]
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let e = &mut enc;
        let one = |v: f64| [(Labels::new(), v)];
        gauge(
            e,
            "process_start_time_seconds",
            "Start time of the master (Unix seconds): counters start at zero with a new master",
            one(self.start_time),
        )?;
        gauge(
            e,
            "app_generation",
            "The generation of workers serving (one more with every successful reload)",
            one(self.generation as f64),
        )?;
        if self.tls_not_after > 0 {
            // An expiry timestamp, as blackbox_exporter's `probe_ssl_earliest_cert_expiry`:
            // alert on `app_tls_certificate_not_after_seconds - time() < 14 * 86400`.
            gauge(
                e,
                "app_tls_certificate_not_after_seconds",
                "End of validity of the serving TLS certificate (Unix seconds)",
                one(self.tls_not_after as f64),
            )?;
        }
        gauge(
            e,
            "app_ready",
            "1 while the readiness endpoint answers 200; 0 while starting, draining or stopping",
            one(self.ready as f64),
        )?;
        gauge(
            e,
            "app_workers_target",
            "Workers the pool should have",
            one(self.target as f64),
        )?;
        counter(
            e,
            "app_http_requests",
            "HTTP requests answered, by method and status class",
            METHODS.iter().enumerate().flat_map(|(m, method)| {
                CLASSES.iter().enumerate().filter_map(move |(c, class)| {
                    let v = self.req[m * CLASSES.len() + c];
                    (v > 0 || (m == 0 && c == 1)).then(|| {
                        (
                            vec![
                                ("method", method.to_string()),
                                ("status", class.to_string()),
                            ],
                            v as f64,
                        )
                    })
                })
            }),
        )?;
        let dur_buckets: Vec<u64> = self.dur.clone();
        histogram(
            e,
            "app_http_request_duration_seconds",
            "Time from the request head to the end of the response body",
            &DURATION_BUCKETS,
            &dur_buckets,
            self.dur_sum_ns as f64 / 1e9,
        )?;
        counter(
            e,
            "app_http_request_body_bytes",
            "Request body bytes read",
            one(self.bytes_in as f64),
        )?;
        counter(
            e,
            "app_http_response_body_bytes",
            "Response body bytes sent",
            one(self.bytes_out as f64),
        )?;
        let live = || self.slots.iter().enumerate().filter(|(_, s)| s.live > 0);
        gauge(
            e,
            "app_http_connections_open",
            "Open connections by worker and protocol",
            live().flat_map(|(i, s)| {
                ["http1", "http2", "upgraded"]
                    .iter()
                    .zip(s.conns)
                    .map(move |(p, n)| {
                        let mut l = worker(i);
                        l.push(("protocol", p.to_string()));
                        (l, n as f64)
                    })
            }),
        )?;
        let seen = || self.slots.iter().enumerate().filter(|(_, s)| s.seen);
        counter(
            e,
            "app_worker_requests",
            "Requests answered by each worker slot (including its exited workers)",
            seen().map(|(i, s)| (worker(i), s.requests as f64)),
        )?;
        counter(
            e,
            "app_worker_accepted_connections",
            "Connections accepted by each worker slot (fairness)",
            seen().map(|(i, s)| (worker(i), s.accepted as f64)),
        )?;
        counter(
            e,
            "app_worker_cpu_seconds",
            "CPU time (user + system) of each worker slot, sampled once a second",
            seen().map(|(i, s)| (worker(i), s.cpu_ns as f64 / 1e9)),
        )?;
        gauge(
            e,
            "app_worker_pss_bytes",
            "Proportional set size of each worker slot's processes",
            live().map(|(i, s)| (worker(i), s.pss as f64)),
        )?;
        gauge(
            e,
            "app_worker_heartbeat_rtt_seconds",
            "The latest heartbeat round trip, master to worker and back",
            live().map(|(i, s)| (worker(i), s.rtt_ns as f64 / 1e9)),
        )?;
        gauge(
            e,
            "app_worker_generation",
            "The newest generation serving in each slot",
            live().map(|(i, s)| (worker(i), s.generation as f64)),
        )?;
        gauge(
            e,
            "app_worker_requests_per_second",
            "Requests per second over the last heartbeat interval (what app status shows)",
            live().map(|(i, s)| (worker(i), s.rps)),
        )?;
        gauge(
            e,
            "app_worker_request_duration_p99_seconds",
            "99th percentile request duration over the last heartbeat interval (what app status shows)",
            live().map(|(i, s)| (worker(i), s.p99)),
        )?;
        counter(
            e,
            "app_worker_restarts",
            "Workers replaced, by cause",
            CAUSES
                .iter()
                .zip(&self.restarts)
                .map(|((c, _), n)| (vec![("cause", c.to_string())], *n as f64)),
        )?;
        counter(
            e,
            "app_reloads",
            "Reloads, by outcome",
            [("ok", self.reloads[0]), ("failed", self.reloads[1])]
                .into_iter()
                .map(|(o, n)| (vec![("outcome", o.to_string())], n as f64)),
        )?;
        histogram(
            e,
            "app_reload_duration_seconds",
            "Reload duration, request to the old generation gone",
            &RELOAD_BUCKETS,
            &self.reload_hist,
            self.reload_sum_us as f64 / 1e6,
        )?;
        gauge(
            e,
            "app_restart_budget_used",
            "Unplanned restarts in the current restart_window",
            one(self.budget_used as f64),
        )?;
        gauge(
            e,
            "app_restart_budget_limit",
            "restart_limit: past it the master gives up",
            one(self.budget_limit as f64),
        )?;
        for (entry, v) in &self.user {
            match entry.kind {
                Kind::Counter => counter(e, &entry.name, &entry.help, one(v[0] as f64))?,
                Kind::Gauge => gauge(e, &entry.name, &entry.help, one(v[0] as i64 as f64))?,
                Kind::Histogram => {
                    let n = entry.bounds.len();
                    histogram(
                        e,
                        &entry.name,
                        &entry.help,
                        &entry.bounds,
                        &v[..=n],
                        f64::from_bits(v[n + 1]),
                    )?
                }
            }
        }
        Ok(())
    }
}
