//! The access log: off by default, one entry per request when on (with its fields), sampled
//! when asked, and not hidden by a quieter `log_level`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

/// The access entries in the log, as field maps (`http_status=404 ...` after the message).
fn entries(srv: &Server) -> Vec<BTreeMap<String, String>> {
    srv.log_text()
        .lines()
        .filter(|l| l.contains("http_status="))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .filter(|(k, _)| k.starts_with("http_"))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

#[test]
fn access_log_records_each_request_with_its_fields() {
    let srv = Server::with_config(
        "workers = 1\nlog_level = \"warn\"\n[http]\naccess_log = true\n",
        &[],
    );
    let before = entries(&srv).len();
    assert_eq!(get(srv.port, "/users/2").unwrap().status, 200);
    assert_eq!(get(srv.port, "/users/99").unwrap().status, 404);
    let got = wait_until(Duration::from_secs(3), || {
        let e = entries(&srv);
        (e.len() >= before + 2).then_some(e)
    })
    .expect("no access entries");
    let mine: Vec<_> = got
        .iter()
        .filter(|e| e["http_path"].starts_with("/users/"))
        .collect();
    assert_eq!(mine.len(), 2, "{got:?}");
    assert_eq!(mine[0]["http_method"], "GET");
    assert_eq!(mine[0]["http_status"], "200");
    assert_eq!(mine[1]["http_status"], "404");
    assert!(mine[0]["http_bytes"].parse::<u64>().unwrap() > 10);
    assert!(mine[0]["http_duration_us"].parse::<u64>().is_ok());
}

#[test]
fn access_log_is_off_by_default_and_sampled_when_asked() {
    let srv = Server::with_config("workers = 1\n", &[]);
    for _ in 0..20 {
        assert_eq!(get(srv.port, "/").unwrap().status, 200);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(entries(&srv).len(), 0);

    let srv = Server::with_config(
        "workers = 1\n[http]\naccess_log = true\naccess_log_sample = 0.25\n",
        &[],
    );
    let before = entries(&srv).len();
    for _ in 0..400 {
        assert_eq!(get(srv.port, "/").unwrap().status, 200);
    }
    std::thread::sleep(Duration::from_millis(300));
    let n = entries(&srv).len() - before;
    eprintln!("FIGURES access_log_sample 0.25: {n} of 400 requests logged");
    assert!(
        (50..=150).contains(&n),
        "{n} of 400 logged at a 0.25 sample"
    );
}
