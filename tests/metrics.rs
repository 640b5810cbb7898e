//! The pool's metrics endpoint, parsed with a real OpenMetrics parser (Python's
//! `prometheus_client.openmetrics.parser`, Debian's python3-prometheus-client): exact totals
//! after the pool is idle, counters that never go backwards across SIGKILL, `max_requests`
//! recycling and 10 reloads under load, and the service's own metrics summed across workers.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;

/// Samples by series (`name{labels}` with labels sorted), as the parser read them.
type Samples = BTreeMap<String, f64>;

const PARSER: &str = r#"
import sys, json
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append([fam.type, s.name, sorted(s.labels.items()), s.value])
print(json.dumps(out))
"#;

fn python() -> String {
    std::env::var("APP_TEST_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into())
}

/// Fails (never skips) when the parser is missing, saying what to install.
fn require_parser() {
    let ok = Command::new(python())
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "these tests parse the endpoint with Python's prometheus_client: install python3-prometheus-client (apt) or set APP_TEST_PYTHON to a python with prometheus_client"
    );
}

fn parse(text: &str) -> Samples {
    let mut child = Command::new(python())
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser rejected the endpoint: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut m = Samples::new();
    for s in v.as_array().unwrap() {
        let labels: Vec<String> = s[2]
            .as_array()
            .unwrap()
            .iter()
            .map(|kv| format!("{}={}", kv[0].as_str().unwrap(), kv[1].as_str().unwrap()))
            .collect();
        let key = format!("{}{{{}}}", s[1].as_str().unwrap(), labels.join(","));
        let value = s[3].as_f64().unwrap_or(f64::NAN);
        m.insert(key, value);
    }
    m
}

fn scrape_text(port: u16) -> String {
    let r = get(port, "/metrics").expect("scrape");
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "content type: {:?}",
        r.header("content-type")
    );
    r.body
}

fn scrape(port: u16) -> Samples {
    parse(&scrape_text(port))
}

fn sum(s: &Samples, prefix: &str) -> f64 {
    s.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

fn one(s: &Samples, key: &str) -> f64 {
    *s.get(key)
        .unwrap_or_else(|| panic!("no series {key}; have {:?}", s.keys().collect::<Vec<_>>()))
}

/// Counter-like series only: totals, histogram counts, buckets and sums of counters.
fn counters(s: &Samples) -> impl Iterator<Item = (&String, &f64)> {
    s.iter().filter(|(k, _)| {
        (k.contains("_total{") || k.contains("_count{") || k.contains("_bucket{"))
            && !k.starts_with("app_worker_requests_per_second")
    })
}

fn start(args: &[&str]) -> (Server, u16) {
    let mport = free_port();
    let maddr = format!("127.0.0.1:{mport}");
    let mut all = vec!["--metrics", maddr.as_str()];
    all.extend_from_slice(args);
    let srv = Server::start(Launch::default().args(&all));
    (srv, mport)
}

fn wait_full(srv: &Server) {
    let full = wait_until(Duration::from_secs(10), || {
        let s: app::StatusReport = serde_json::from_value(srv.status().ok()?).ok()?;
        (s.serving_workers == s.target_workers && s.state == "serving").then_some(())
    });
    assert!(full.is_some(), "pool never full; log:\n{}", srv.log_text());
}

#[test]
fn endpoint_parses_and_totals_equal_the_requests_sent() {
    let _heavy = common::heavy();
    require_parser();
    let (srv, mport) = start(&["--workers", "2"]);
    wait_full(&srv);
    // wait_serving sent some requests already: start from what the endpoint says.
    let before = scrape(mport);
    let base = sum(&before, "app_http_requests_total");
    let mut conn = Conn::open(srv.port).unwrap();
    let (mut gets, mut posts, mut missing) = (0, 0, 0);
    let mut body_bytes = 0u64;
    for i in 0..300 {
        match i % 3 {
            0 => {
                assert_eq!(get(srv.port, "/").unwrap().status, 200);
                gets += 1;
            }
            1 => {
                let body = "x".repeat(i);
                let raw = format!(
                    "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                assert_eq!(conn.request(&raw).unwrap().status, 200);
                body_bytes += body.len() as u64;
                posts += 1;
            }
            _ => {
                assert_eq!(conn.get("/no/such/path").unwrap().status, 404);
                missing += 1;
            }
        }
    }
    drop(conn);
    std::thread::sleep(Duration::from_millis(300));
    let s = scrape(mport);
    // Scraping does not count itself.
    let again = scrape(mport);
    let total = sum(&s, "app_http_requests_total") - base;
    eprintln!("FIGURES metrics: {total} requests counted of 300 sent");
    assert_eq!(total, 300.0);
    assert_eq!(sum(&again, "app_http_requests_total") - base, 300.0);
    assert_eq!(
        one(&s, "app_http_requests_total{method=POST,status=2xx}"),
        posts as f64
    );
    assert_eq!(
        one(&s, "app_http_requests_total{method=GET,status=4xx}"),
        missing as f64
    );
    assert!(one(&s, "app_http_requests_total{method=GET,status=2xx}") >= gets as f64);
    assert_eq!(
        one(&s, "app_http_request_duration_seconds_count{}") - base,
        300.0
    );
    assert_eq!(
        one(&s, "app_http_request_duration_seconds_bucket{le=+Inf}") - base,
        300.0
    );
    assert_eq!(sum(&s, "app_worker_requests_total") - base, 300.0);
    assert_eq!(
        one(&s, "app_http_request_body_bytes_total{}"),
        body_bytes as f64
    );
    // Sub-millisecond answers land in sub-millisecond buckets.
    assert!(one(&s, "app_http_request_duration_seconds_bucket{le=0.001}") > 0.0);
    for w in ["0", "1"] {
        assert!(s.contains_key(&format!("app_worker_pss_bytes{{worker={w}}}")));
        assert!(s.contains_key(&format!("app_worker_heartbeat_rtt_seconds{{worker={w}}}")));
        assert!(s.contains_key(&format!(
            "app_http_connections_open{{protocol=http1,worker={w}}}"
        )));
    }
    assert!(one(&s, "process_start_time_seconds{}") > 1.6e9);
    assert_eq!(one(&s, "app_generation{}"), 1.0);
    // app status reads the same page.
    assert_eq!(
        srv.report().requests_total as f64,
        sum(&s, "app_http_requests_total")
    );
}

#[test]
fn counters_never_go_backwards_across_kill_recycling_and_reloads() {
    let _heavy = common::heavy();
    require_parser();
    let (srv, mport) = start(&["--workers", "2", "--max-requests", "150"]);
    wait_full(&srv);
    let base = sum(&scrape(mport), "app_http_requests_total");
    let scraping = Arc::new(AtomicBool::new(false));
    let scrapes: Arc<std::sync::Mutex<Vec<Samples>>> = Default::default();
    let scraper = {
        let (stop, out) = (scraping.clone(), scrapes.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) = get(mport, "/metrics")
                    && r.status == 200
                {
                    out.lock().unwrap().push(parse(&r.body));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let answered = |st: &LoadStats| {
        st.ok + st.errors.iter().filter(|e| e.starts_with("status")).count() as u64
    };

    // Phase 1: 10 reloads and max_requests recycling under load; every request is answered.
    let stop = Arc::new(AtomicBool::new(false));
    let h = load(srv.port, 4, 0, stop.clone());
    // Long enough for several workers to reach max_requests between the reloads.
    std::thread::sleep(Duration::from_millis(700));
    for i in 0..10 {
        std::thread::sleep(Duration::from_millis(50));
        let r = srv.control("{\"cmd\":\"reload\"}").unwrap();
        assert_eq!(r["ok"], true, "reload {i}: {r}");
    }
    stop.store(true, Ordering::Relaxed);
    let st1 = join_load(h);
    wait_full(&srv);
    std::thread::sleep(Duration::from_millis(300));
    let s1 = scrape(mport);
    let counted1 = sum(&s1, "app_http_requests_total") - base;
    eprintln!(
        "FIGURES metrics: reloads+recycling: {} answered, {counted1} counted, restarts {:?}",
        answered(&st1),
        s1.iter()
            .filter(|(k, _)| k.starts_with("app_worker_restarts"))
            .collect::<Vec<_>>()
    );
    assert_eq!(counted1, answered(&st1) as f64);
    assert_eq!(
        st1.failed,
        0,
        "{:?}",
        &st1.errors[..st1.errors.len().min(5)]
    );
    assert_eq!(one(&s1, "app_reloads_total{outcome=ok}"), 10.0);
    assert_eq!(one(&s1, "app_generation{}"), 11.0);
    // Each reload replaces both workers; one already leaving at its request limit counts
    // as `requests` instead.
    assert!(one(&s1, "app_worker_restarts_total{cause=reload}") >= 10.0);
    assert_eq!(
        one(&s1, "app_worker_restarts_total{cause=crash}"),
        0.0,
        "log:\n{}",
        srv.log_text()
    );
    assert!(
        one(&s1, "app_worker_restarts_total{cause=requests}") >= 1.0,
        "no max_requests recycling happened ({} requests)",
        counted1
    );
    assert_eq!(one(&s1, "app_reload_duration_seconds_count{}"), 10.0);

    // Phase 2: SIGKILL a worker under load. Requests in flight on it may be counted
    // (the count is taken as the response is handed to the socket) yet never reach the
    // client, so the total is at least what was answered and at most one more per client
    // and kill.
    let stop = Arc::new(AtomicBool::new(false));
    let h = load(srv.port, 4, 0, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    // A serving worker, not one already on its way out at its request limit (that one's
    // replacement is started already: its death is counted as `requests`). Under this
    // load a worker reaches its limit every few milliseconds, so `app status` may still
    // call one ready that has just decided to leave: kill again until one dies a crash.
    let mut kills = 0;
    for _ in 0..5 {
        let victim = srv
            .workers()
            .into_iter()
            .find(|w| w.4 == "ready")
            .expect("a ready worker")
            .1;
        unsafe { libc::kill(victim, libc::SIGKILL) };
        kills += 1;
        std::thread::sleep(Duration::from_millis(300));
        if one(&scrape(mport), "app_worker_restarts_total{cause=crash}") >= 1.0 {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let st2 = join_load(h);
    wait_full(&srv);
    std::thread::sleep(Duration::from_millis(300));
    let s2 = scrape(mport);
    let counted = sum(&s2, "app_http_requests_total") - base;
    let sent = (answered(&st1) + answered(&st2)) as f64;
    eprintln!("FIGURES metrics: after SIGKILL: {sent} answered, {counted} counted");
    // At most one more per client for each kill.
    assert!(
        counted >= sent && counted <= sent + 4.0 * kills as f64,
        "{counted} vs {sent} after {kills} kill(s)"
    );
    assert!(
        one(&s2, "app_worker_restarts_total{cause=crash}") >= 1.0,
        "log:\n{}",
        srv.log_text()
    );

    scraping.store(true, Ordering::Relaxed);
    scraper.join().unwrap();
    let all = scrapes.lock().unwrap();
    assert!(all.len() >= 10, "only {} scrapes", all.len());
    let mut checked = 0;
    for pair in all.windows(2) {
        for (k, v) in counters(&pair[0]) {
            if let Some(after) = pair[1].get(k) {
                assert!(
                    after >= v,
                    "{k} went backwards: {v} then {after} (scrape {checked})"
                );
                checked += 1;
            }
        }
    }
    eprintln!(
        "FIGURES metrics: {} scrapes during kill/recycle/reloads, {checked} counter comparisons, none went backwards",
        all.len()
    );
}

fn program(name: &str) -> std::path::PathBuf {
    let p = std::path::Path::new(APP)
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(p.exists(), "example program {} not built", p.display());
    p
}

#[test]
fn the_services_own_metrics_appear_summed_across_workers() {
    let _heavy = common::heavy();
    require_parser();
    let mport = free_port();
    let maddr = format!("127.0.0.1:{mport}");
    let srv = Server::spawn(
        Launch {
            binary: Some(program("metrics_counter")),
            ..Default::default()
        }
        .args(&["--workers", "2", "--metrics", &maddr]),
    );
    let up = wait_until(Duration::from_secs(10), || get(srv.port, "/count").ok());
    assert!(up.is_some(), "log:\n{}", srv.log_text());
    wait_full(&srv);
    let before = one(&scrape(mport), "demo_counted_total{}");
    let mut by_worker = BTreeMap::new();
    for _ in 0..100 {
        let r = get(srv.port, "/count").unwrap();
        assert_eq!(r.status, 200);
        *by_worker
            .entry(r.header("x-worker").unwrap_or("?").to_string())
            .or_insert(0) += 1;
    }
    let s = scrape(mport);
    eprintln!("FIGURES metrics: /count per worker {by_worker:?}");
    assert_eq!(one(&s, "demo_counted_total{}") - before, 100.0);
    assert_eq!(one(&s, "demo_in_flight{}"), 0.0);
    let hist = one(&s, "demo_job_size_count{}");
    assert_eq!(hist, before + 100.0);
    assert_eq!(one(&s, "demo_job_size_bucket{le=10.0}"), hist);
    assert_eq!(one(&s, "demo_job_size_bucket{le=1.0}"), 0.0);
    assert_eq!(one(&s, "demo_job_size_sum{}"), 5.0 * hist);
    // Each worker's own counter only knows its share; the endpoint shows the sum, and keeps
    // it across a reload (the old workers' counts are folded into the pool's).
    let r = srv.control("{\"cmd\":\"reload\"}").unwrap();
    assert_eq!(r["ok"], true, "{r}");
    for _ in 0..10 {
        assert_eq!(get(srv.port, "/count").unwrap().status, 200);
    }
    let s = scrape(mport);
    assert_eq!(one(&s, "demo_counted_total{}") - before, 110.0);
}

#[test]
fn every_series_the_shipped_dashboard_queries_is_on_the_endpoint() {
    let _heavy = common::heavy();
    require_parser();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/grafana-dashboard.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut queried = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            // Metric names are the identifiers with our prefixes; PromQL functions and
            // label names have none.
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("app_") || word.starts_with("process_") {
                    queried.insert(word.to_string());
                }
            }
        }
    }
    assert!(queried.len() >= 15, "{queried:?}");
    let (srv, mport) = start(&["--workers", "2"]);
    wait_full(&srv);
    get(srv.port, "/").unwrap();
    let samples = scrape(mport);
    let names: std::collections::BTreeSet<&str> = samples
        .keys()
        .map(|k| k.split('{').next().unwrap())
        .collect();
    let missing: Vec<&String> = queried
        .iter()
        .filter(|q| !names.contains(q.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries series the endpoint does not have: {missing:?}; it has {names:?}"
    );
}
