//! A load client for new TLS connections with session resumption, which wrk and h2load never
//! attempt: `--conns` clients at once (spread over `--threads` threads, one single-threaded
//! runtime each, like wrk's), for `--duration` seconds, each client connecting again and again:
//! a handshake (resuming the session its last connection left in its own cache), one
//! `GET / HTTP/1.1` with `Connection: close`, and the response read to its end. A cache per
//! client, as 64 browsers would have: one cache for all would hold at most 8 TLS 1.3 tickets
//! for the server (rustls's limit), fewer than 64 connections in flight take, and a burst of
//! connections would start without one whatever the server does.
//! Prints one line of `key=value`: completed requests, requests per second, the fraction of
//! handshakes that resumed (rustls's `handshake_kind`), and errors.
//!
//!   cargo build --release --example tls_load
//!   target/release/examples/tls_load --addr 127.0.0.1:8443 --ca ca.crt --tls 1.3 --conns 64
//!
//! `--no-resume` turns the client's cache off (every handshake full), to compare like with
//! like. Used by scripts/bench/tls-bench.sh against the app and nginx alike.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use rustls::client::{ClientSessionMemoryCache, Resumption};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, HandshakeKind, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    /// The server's address.
    #[arg(long)]
    addr: SocketAddr,
    /// The CA certificate (PEM) the server's chain is checked against.
    #[arg(long)]
    ca: std::path::PathBuf,
    /// The name the certificate is checked for (and sent as SNI).
    #[arg(long, default_value = "localhost")]
    name: String,
    /// TLS version: 1.2 or 1.3.
    #[arg(long, default_value = "1.3")]
    tls: String,
    /// Connections at once.
    #[arg(long, default_value_t = 64)]
    conns: usize,
    /// Threads (each a single-threaded runtime with its share of the connections).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// No client session cache: every handshake is a full one.
    #[arg(long)]
    no_resume: bool,
}

#[derive(Default)]
struct Counts {
    done: AtomicU64,
    resumed: AtomicU64,
    errors: AtomicU64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let version = match args.tls.as_str() {
        "1.2" => &rustls::version::TLS12,
        "1.3" => &rustls::version::TLS13,
        other => {
            eprintln!("tls_load: --tls {other}: 1.2 or 1.3");
            return std::process::ExitCode::from(64);
        }
    };
    let mut roots = RootCertStore::empty();
    let ca = match CertificateDer::from_pem_file(&args.ca) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tls_load: {}: {e}", args.ca.display());
            return std::process::ExitCode::from(66);
        }
    };
    roots.add(ca).expect("a CA certificate");
    let mut cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[version])
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.resumption = Resumption::disabled();
    let cfg = Arc::new(cfg);
    let resume = !args.no_resume;
    let name = ServerName::try_from(args.name.clone()).expect("a server name");
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let threads = args.threads.clamp(1, args.conns.max(1));
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let conns = args.conns / threads + usize::from(t < args.conns % threads);
            let (cfg, name, counts, stop) =
                (cfg.clone(), name.clone(), counts.clone(), stop.clone());
            let addr = args.addr;
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    let tasks: Vec<_> = (0..conns)
                        .map(|_| {
                            let (cfg, name, counts, stop) = (
                                client(&cfg, resume),
                                name.clone(),
                                counts.clone(),
                                stop.clone(),
                            );
                            tokio::task::spawn_local(async move {
                                let connector = tokio_rustls::TlsConnector::from(cfg);
                                while !stop.load(Ordering::Relaxed) {
                                    match one(&connector, addr, name.clone()).await {
                                        Ok(resumed) => {
                                            counts.done.fetch_add(1, Ordering::Relaxed);
                                            if resumed {
                                                counts.resumed.fetch_add(1, Ordering::Relaxed);
                                            }
                                        }
                                        Err(_) => {
                                            counts.errors.fetch_add(1, Ordering::Relaxed);
                                        }
                                    }
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        let _ = t.await;
                    }
                });
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(args.duration));
    stop.store(true, Ordering::Relaxed);
    // Requests finished after the deadline do not count toward the rate's numerator but
    // their time does: read the counts at the deadline.
    let elapsed = started.elapsed().as_secs_f64();
    let done = counts.done.load(Ordering::Relaxed);
    let resumed = counts.resumed.load(Ordering::Relaxed);
    let errors = counts.errors.load(Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    println!(
        "requests={done} seconds={elapsed:.2} rps={:.0} resumed={:.3} errors={errors}",
        done as f64 / elapsed,
        if done > 0 {
            resumed as f64 / done as f64
        } else {
            0.0
        },
    );
    std::process::ExitCode::SUCCESS
}

/// One client's configuration: its own session cache (one server: up to 8 TLS 1.3 tickets, or
/// a TLS 1.2 session), or none.
fn client(base: &ClientConfig, resume: bool) -> Arc<ClientConfig> {
    let mut c = base.clone();
    if resume {
        c.resumption = Resumption::store(Arc::new(ClientSessionMemoryCache::new(8)));
    }
    Arc::new(c)
}

/// One connection: handshake, one request, the whole response. Whether it resumed.
async fn one(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    name: ServerName<'static>,
) -> std::io::Result<bool> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut tls = connector.connect(name, tcp).await?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = Vec::with_capacity(512);
    // A server may close without close_notify after `Connection: close`; what was read
    // counts if it is a 200 response.
    match tls.read_to_end(&mut response).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e),
    }
    if !response.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other("not a 200 response"));
    }
    Ok(resumed)
}
