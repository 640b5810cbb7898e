//! Property-based fuzzing of everything that parses outside input: the IPC frame decoder, the
//! control protocol parser, the configuration loader and the `LISTEN_*` parser.
//!
//! Each target replays its committed corpus (`tests/corpus/<target>/`, seeds for known edge
//! cases and any input that once broke something) and then runs proptest-generated inputs:
//! 256 cases per target in a normal `cargo test`, more with `PROPTEST_CASES=N` (CI runs a
//! bounded longer pass). The property is the same everywhere: no input panics, and whatever
//! is accepted satisfies the parser's invariants. (`cargo fuzz` needs a nightly toolchain,
//! which these machines cannot fetch; proptest runs on stable under `cargo test`.)

use std::path::PathBuf;

use bytes::BytesMut;
use proptest::prelude::*;
use tokio_util::codec::Decoder;

use crate::config;
use crate::control;
use crate::ipc::{self, ToMaster, ToWorker};
use crate::listen;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(!out.is_empty(), "empty corpus {}", dir.display());
    out.sort();
    out
}

// ---- IPC frames ---------------------------------------------------------------------------

/// Feeds bytes through the codec as the master's reader does; returns decoded messages
/// until the first error.
fn ipc_feed(bytes: &[u8]) -> Vec<ToMaster> {
    let mut codec = ipc::codec();
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        assert!(frame.len() <= ipc::MAX_FRAME);
        match ipc::decode::<ToMaster>(&frame) {
            Ok(m) => out.push(m),
            Err(_) => break,
        }
        // The worker side decodes the other direction with the same framing.
        let _ = ipc::decode::<ToWorker>(&frame);
    }
    out
}

#[test]
fn fuzz_ipc_frame_corpus() {
    for input in corpus("ipc_frame") {
        ipc_feed(&input);
    }
}

fn any_to_master() -> impl Strategy<Value = ToMaster> {
    prop_oneof![
        Just(ToMaster::Ready { version: None }),
        Just(ToMaster::Ready {
            version: Some("0.1.0 (commit unknown)".into())
        }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(seq, requests, connections)| {
            ToMaster::Pong {
                seq,
                requests,
                connections,
            }
        }),
        ".{0,200}".prop_map(|reason| ToMaster::Leaving {
            reason,
            planned: false
        }),
    ]
}

proptest! {
    #[test]
    fn fuzz_ipc_frame_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        ipc_feed(&bytes);
    }

    #[test]
    fn fuzz_ipc_frame_roundtrip(msgs in proptest::collection::vec(any_to_master(), 1..8), cut in any::<prop::sample::Index>()) {
        use tokio_util::codec::Encoder;
        let mut codec = ipc::codec();
        let mut buf = BytesMut::new();
        for m in &msgs {
            codec.encode(ipc::encode(m), &mut buf).unwrap();
        }
        prop_assert_eq!(&ipc_feed(&buf), &msgs);
        // Any prefix decodes to a prefix of the messages, never to something else.
        let n = cut.index(buf.len() + 1);
        let got = ipc_feed(&buf[..n]);
        prop_assert_eq!(&got[..], &msgs[..got.len()]);
    }
}

// ---- control requests -----------------------------------------------------------------------

fn control_parse(bytes: &[u8]) {
    let line = String::from_utf8_lossy(bytes);
    if let Ok(r) = control::parse_request(&line) {
        // Only these commands exist, and only in their exact form.
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        match r {
            control::Request::Status => assert_eq!(v, serde_json::json!({ "cmd": "status" })),
            control::Request::Reload => assert_eq!(v, serde_json::json!({ "cmd": "reload" })),
            control::Request::Drain => assert_eq!(v, serde_json::json!({ "cmd": "drain" })),
            control::Request::Undrain => assert_eq!(v, serde_json::json!({ "cmd": "undrain" })),
            control::Request::Scale { to, by } => {
                assert_eq!(v["cmd"], "scale");
                assert_eq!(to.is_some(), by.is_none());
                assert_eq!(v.get("to").and_then(|t| t.as_u64()), to);
                assert_eq!(v.get("by").and_then(|b| b.as_i64()), by);
            }
        }
    }
}

#[test]
fn fuzz_control_request_corpus() {
    for input in corpus("control_request") {
        control_parse(&input);
    }
}

proptest! {
    #[test]
    fn fuzz_control_request_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        control_parse(&bytes);
    }

    #[test]
    fn fuzz_control_request_jsonish(s in r#"\{("cmd"|"x"|"cmd ")?:?("status"|"reload"|"stop"|1|null|\[\])?(,"[a-z]{0,3}":[0-9]{0,3})?\}"#) {
        control_parse(s.as_bytes());
    }
}

// ---- configuration ---------------------------------------------------------------------------

fn config_load(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    if let Ok(c) = config::from_text(&text, 2) {
        // Whatever validates is usable: the master does deadline arithmetic with these.
        assert!((1..=1024).contains(&c.workers));
        let now = std::time::Instant::now();
        let _ = now + c.shutdown_timeout + c.drain_timeout + c.ready_timeout + c.restart_window;
        let _ = now
            + c.heartbeat_interval * c.heartbeat_misses
            + c.http.header_read_timeout
            + c.http.keepalive_timeout
            + c.http.body_read_timeout
            + c.http.send_timeout;
        assert!(c.service.is_table());
    }
}

#[test]
fn fuzz_config_file_corpus() {
    for input in corpus("config_file") {
        config_load(&input);
    }
    let full = String::from_utf8(
        std::fs::read(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/config_file/full.toml"),
        )
        .unwrap(),
    )
    .unwrap();
    config::from_text(&full, 2).expect("the full example config is valid");
}

/// Every key of the schema (from [`config::keys`], so a new key is fuzzed as soon as it
/// exists): a key of a table comes with its `[table]` header as another line, so a sequence
/// of lines writes it in its table or, out of place, at the top level. Plus the user's
/// `[service]` table and a key no table has.
fn config_keys() -> Vec<String> {
    let mut out: Vec<String> = vec!["[service]".into(), "greeting".into(), "bogus".into()];
    for key in config::keys() {
        let (table, name) = match key.split_once('.') {
            Some((table, name)) => (Some(format!("[{table}]")), name.to_string()),
            None => (None, key),
        };
        for line in table.into_iter().chain([name]) {
            if !out.contains(&line) {
                out.push(line);
            }
        }
    }
    out
}

/// The fuzzer writes every key of the schema, each in its table.
#[test]
fn fuzz_config_keys_are_the_schemas() {
    let lines = config_keys();
    for key in config::keys() {
        let (table, name) = key.split_once('.').unwrap_or(("", &key));
        assert!(lines.iter().any(|l| l == name), "{key}");
        assert!(
            table.is_empty() || lines.contains(&format!("[{table}]")),
            "{key}"
        );
    }
}

fn config_line() -> impl Strategy<Value = String> {
    let key = proptest::sample::select(config_keys());
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        "[0-9]{1,25}(\\.[0-9])?( ?)(ms|s|m|h|d|y|KiB|MiB|GiB|KB|MB|GB|K|M|x)?"
            .prop_map(|s| format!("\"{s}\"")),
        "\"[ -~]{0,20}\"",
        Just("true".to_string()),
        Just("[1, 2]".to_string()),
    ];
    (key, value).prop_map(|(k, v)| {
        if k.starts_with('[') {
            k
        } else {
            format!("{k} = {v}")
        }
    })
}

proptest! {
    #[test]
    fn fuzz_config_file_lines(lines in proptest::collection::vec(config_line(), 0..12)) {
        config_load(lines.join("\n").as_bytes());
    }

    #[test]
    fn fuzz_config_file_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        config_load(&bytes);
    }
}

// ---- LISTEN_* environment -----------------------------------------------------------------

fn listen_parse(fds: Option<&str>, pid: Option<&str>, names: Option<&str>, me: u32) {
    match listen::parse_env(fds, pid, names, me) {
        Ok(None) => assert!(fds.is_none()),
        Ok(Some(a)) => {
            assert!(!a.fds.is_empty());
            assert_eq!(a.fds.len(), a.names.len());
            assert_eq!(a.fds[0], listen::LISTEN_FDS_START);
            assert_eq!(pid.unwrap().trim().parse::<u32>().unwrap(), me);
        }
        Err(e) => {
            assert!(!e.is_empty() && !e.contains('\n'), "one line: {e:?}");
        }
    }
}

#[test]
fn fuzz_listen_env_corpus() {
    for input in corpus("listen_env") {
        let text = String::from_utf8_lossy(&input);
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_string)
        };
        listen_parse(
            get("LISTEN_FDS").as_deref(),
            get("LISTEN_PID").as_deref(),
            get("LISTEN_FDNAMES").as_deref(),
            42,
        );
    }
}

proptest! {
    #[test]
    fn fuzz_listen_env(
        fds in proptest::option::of(prop_oneof!["[0-9]{0,22}", ".{0,8}"]),
        pid in proptest::option::of(prop_oneof![Just("42".to_string()), "[0-9+ -]{0,12}", ".{0,8}"]),
        names in proptest::option::of("[a-z:]{0,20}"),
    ) {
        listen_parse(fds.as_deref(), pid.as_deref(), names.as_deref(), 42);
    }
}
