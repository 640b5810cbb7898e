//! TLS: handshakes with TLS 1.2 and 1.3 clients, ALPN, sessions resumed on another worker
//! process, certificates rotated by a reload with no failed request, bad pairs refused while
//! the old certificate keeps serving, and plain and TLS sockets side by side. Certificates are made by the test (rcgen), signed by a CA
//! the clients trust.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SerialNumber, date_time_ymd,
};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "app test CA");
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { params, key, pem }
}

/// A leaf for localhost and 127.0.0.1 with this serial; `expired` puts its validity in 2000.
fn leaf(ca: &Ca, serial: u64, expired: bool) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.serial_number = Some(SerialNumber::from(serial));
    // Its own name: a leaf named like its issuer looks self-signed to OpenSSL (curl).
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    if expired {
        params.not_before = date_time_ymd(2000, 1, 1);
        params.not_after = date_time_ymd(2001, 1, 1);
    }
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write_pair(dir: &Path, pair: &(String, String)) {
    std::fs::write(dir.join("tls.crt"), &pair.0).unwrap();
    std::fs::write(dir.join("tls.key"), &pair.1).unwrap();
}

fn client_config(
    ca: &Ca,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    let der = CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap();
    roots.add(der).unwrap();
    let mut cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

use rustls::pki_types::pem::PemObject;

/// A TLS connection to 127.0.0.1:port, handshake done.
fn connect(
    port: u16,
    cfg: Arc<ClientConfig>,
) -> std::io::Result<StreamOwned<ClientConnection, TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(cfg, name).map_err(std::io::Error::other)?;
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// The serial (hex, as the server reports it) of the certificate the server presented.
fn peer_serial(s: &StreamOwned<ClientConnection, TcpStream>) -> String {
    let cert = &s.conn.peer_certificates().unwrap()[0];
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
    parsed.raw_serial_as_string().replace(':', "")
}

/// GET `path` over a fresh TLS connection (HTTP/1.1, Connection: close); the status code.
fn tls_get(port: u16, cfg: Arc<ClientConfig>, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = connect(port, cfg)?;
    let serial = peer_serial(&s);
    Ok((get_and_close(&mut s, path)?, serial))
}

/// One `GET path` with `Connection: close` on an open TLS stream; the status code.
fn get_and_close(
    s: &mut StreamOwned<ClientConnection, TcpStream>,
    path: &str,
) -> std::io::Result<u16> {
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no response: {text:?}")))
}

/// `app serve` with `toml` as its config in `dir` (holding tls.crt/tls.key), bound by hand;
/// waits until the pool is full (the harness's plain-HTTP probe cannot speak TLS).
fn start(dir: tempfile::TempDir, toml: &str) -> Server {
    let file = dir.path().join("app.toml");
    std::fs::write(&file, toml).unwrap();
    let file = file.to_str().unwrap().to_string();
    let srv = Server::spawn(
        Launch {
            dir: Some(dir),
            ..Default::default()
        }
        .args(&["--config", &file]),
    );
    let full = wait_until(Duration::from_secs(10), || {
        let s: app::StatusReport = serde_json::from_value(srv.status().ok()?).ok()?;
        (s.serving_workers == s.target_workers && s.state == "serving").then_some(())
    });
    assert!(full.is_some(), "never served; log:\n{}", srv.log_text());
    srv
}

fn tls_toml(dir: &Path, extra: &str) -> String {
    format!(
        "workers = 2\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n{extra}",
        dir.join("tls.crt").display(),
        dir.join("tls.key").display()
    )
}

#[test]
fn tls12_and_tls13_handshakes_with_alpn() {
    let ca = ca();
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), &leaf(&ca, 1001, false));
    let toml = tls_toml(dir.path(), "");
    let srv = start(dir, &toml);

    let s13 = connect(
        srv.port,
        client_config(&ca, &[&rustls::version::TLS13], &[b"h2", b"http/1.1"]),
    )
    .unwrap();
    assert_eq!(
        s13.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(s13.conn.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(peer_serial(&s13), "03e9");

    let cfg12 = client_config(&ca, &[&rustls::version::TLS12], &[b"http/1.1"]);
    let s12 = connect(srv.port, cfg12.clone()).unwrap();
    assert_eq!(
        s12.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert_eq!(s12.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(tls_get(srv.port, cfg12, "/healthz").unwrap().0, 200);

    // A real client, both protocols.
    let ca_file = srv.dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    for (flag, want) in [("--http1.1", "HTTP/1.1 200"), ("--http2", "HTTP/2 200")] {
        let out = std::process::Command::new("curl")
            .args(["-sSi", "--max-time", "5", flag, "--cacert"])
            .arg(&ca_file)
            .arg(format!("https://localhost:{}/", srv.port))
            .output()
            .expect("curl is needed for this test");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with(want),
            "curl {flag}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.to_ascii_lowercase().contains("x-worker:"), "{text}");
    }
    let tls = srv.report().tls.expect("TLS in the status");
    assert_eq!(tls.serial, "03e9");
    assert!(tls.days_left > 300);
    // Plain HTTP on a TLS socket is not served.
    let mut plain = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let _ = plain.read_to_end(&mut buf);
    assert!(!buf.starts_with(b"HTTP/1.1 200"));
}

/// One request on a fresh connection with `cfg`'s session cache: whether the handshake
/// resumed, and the status code. The response is read to its end, so the session tickets
/// that arrive after the handshake are in the cache for the next connection.
fn resumed_get(port: u16, cfg: Arc<ClientConfig>) -> (bool, u16) {
    let mut s = connect(port, cfg).unwrap();
    let resumed = s.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    (resumed, get_and_close(&mut s, "/").unwrap_or(0))
}

#[test]
fn sessions_resume_on_another_worker_process_with_tls12_and_tls13() {
    let ca = ca();
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), &leaf(&ca, 1001, false));
    let toml = format!(
        "workers = 1\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        dir.path().join("tls.crt").display(),
        dir.path().join("tls.key").display()
    );
    let srv = start(dir, &toml);
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let mut cfg = (*client_config(&ca, &[version], &[b"http/1.1"])).clone();
        cfg.resumption = rustls::client::Resumption::in_memory_sessions(64);
        let cfg = Arc::new(cfg);
        assert_eq!(resumed_get(srv.port, cfg.clone()), (false, 200));
        // The worker that began the session is gone: its replacement holds no cache of it,
        // only the generation's ticket key.
        let (_, pid, ..) = srv.workers()[0].clone();
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert!(
            srv.wait_replaced_all(pid, 1, Duration::from_secs(10)),
            "{}",
            srv.log_text()
        );
        assert_eq!(
            resumed_get(srv.port, cfg.clone()),
            (true, 200),
            "{version:?}: a session from the killed worker did not resume"
        );
    }
}

#[test]
fn a_reload_rotates_the_certificate_with_no_failed_request() {
    let _heavy = common::heavy();
    let ca = ca();
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), &leaf(&ca, 0x1111, false));
    let toml = tls_toml(dir.path(), "");
    let srv = start(dir, &toml);
    let cfg = client_config(
        &ca,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        &[b"http/1.1"],
    );
    assert_eq!(tls_get(srv.port, cfg.clone(), "/").unwrap().1, "1111");

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (cfg, stop, ok, failed, port) = (
                cfg.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
                srv.port,
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tls_get(port, cfg.clone(), "/") {
                        Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    write_pair(srv.dir.path(), &leaf(&ca, 0x2222, false));
    let out = srv.client(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("FIGURES certificate rotation under load: {ok} TLS requests ok, {failed} failed");
    assert_eq!(failed, 0);
    assert!(ok > 50, "too little load: {ok}");
    assert_eq!(tls_get(srv.port, cfg, "/").unwrap().1, "2222");
    assert_eq!(srv.report().tls.unwrap().serial, "2222");
}

#[test]
fn bad_pairs_fail_the_reload_and_the_old_certificate_keeps_serving() {
    let ca = ca();
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), &leaf(&ca, 0x0a0a, false));
    let toml = tls_toml(dir.path(), "");
    let srv = start(dir, &toml);
    let cfg = client_config(&ca, &[&rustls::version::TLS13], &[b"http/1.1"]);
    let d = srv.dir.path().to_path_buf();
    let good = (
        std::fs::read_to_string(d.join("tls.crt")).unwrap(),
        std::fs::read_to_string(d.join("tls.key")).unwrap(),
    );
    let other = leaf(&ca, 0x0b0b, false);
    type Breaks<'a> = Vec<(&'a str, Box<dyn Fn() + 'a>)>;
    let cases: Breaks = vec![
        (
            "expired",
            Box::new(|| write_pair(&d, &leaf(&ca, 0x0c0c, true))),
        ),
        (
            "does not match",
            Box::new(|| {
                std::fs::write(d.join("tls.crt"), &good.0).unwrap();
                std::fs::write(d.join("tls.key"), &other.1).unwrap();
            }),
        ),
        (
            "no such file",
            Box::new(|| {
                write_pair(&d, &good);
                std::fs::remove_file(d.join("tls.key")).unwrap();
            }),
        ),
        (
            "not a regular file",
            Box::new(|| {
                std::fs::create_dir(d.join("tls.key")).unwrap();
            }),
        ),
    ];
    let workers: Vec<i32> = srv.workers().iter().map(|w| w.1).collect();
    for (why, break_it) in cases {
        break_it();
        let out = srv.client(&["reload"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{why}: {err}");
        assert!(
            err.contains(why) && err.lines().count() == 1,
            "{why}: {err}"
        );
        assert_eq!(
            tls_get(srv.port, cfg.clone(), "/").unwrap(),
            (200, "0a0a".into())
        );
    }
    let now: Vec<i32> = srv.workers().iter().map(|w| w.1).collect();
    assert_eq!(workers, now, "a failed reload touched the workers");
    // A bad pair at start: exit 78, one line.
    let (code, err) = run_to_exit({
        let mut c = std::process::Command::new(APP);
        c.args(["serve", "--bind", "127.0.0.1:1", "--config"])
            .arg(srv.dir.path().join("app.toml"));
        c
    });
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("tls"), "{err}");
}

#[test]
fn certificate_expiry_is_a_metric_on_a_plain_metrics_socket() {
    let ca = ca();
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), &leaf(&ca, 0x55, false));
    let mport = free_port();
    let toml = format!(
        "metrics = \"127.0.0.1:{mport}\"\n{}",
        tls_toml(dir.path(), "")
    );
    let srv = start(dir, &toml);
    let not_after = srv.report().tls.unwrap().not_after;
    // No `sockets` list: the HTTP socket speaks TLS, the metrics socket stays plain.
    let text = wait_until(Duration::from_secs(5), || {
        let r = get(mport, "/metrics").ok()?;
        (r.status == 200).then_some(r.body)
    })
    .expect("metrics answered over plain HTTP");
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix("app_tls_certificate_not_after_seconds "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("app_tls_certificate_not_after_seconds in the scrape");
    assert_eq!(value as i64, not_after);
}

#[test]
fn plain_and_tls_sockets_side_by_side() {
    let ca = ca();
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), &leaf(&ca, 0x77, false));
    let toml = tls_toml(dir.path(), "sockets = [\"https\"]\n");
    std::fs::write(dir.path().join("app.toml"), &toml).unwrap();
    let config = dir.path().join("app.toml");
    let config = config.to_str().unwrap().to_string();
    let (srv, ports) = spawn_named_sockets(
        Path::new(APP),
        &["http", "https"],
        &["--config", &config],
        dir,
    );
    let (p_http, p_https) = (ports[0], ports[1]);
    srv.wait_serving();
    assert_eq!(get(p_http, "/").unwrap().status, 200);
    let cfg = client_config(&ca, &[&rustls::version::TLS13], &[b"http/1.1"]);
    assert_eq!(tls_get(p_https, cfg, "/").unwrap(), (200, "77".into()));
}
