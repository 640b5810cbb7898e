//! TLS: a certificate chain and key, checked before anything serves them, and the rustls
//! server configuration a worker builds from them.
//!
//! The files are named in the `[tls]` table; `credential:NAME` means
//! `$CREDENTIALS_DIRECTORY/NAME`, where systemd's `LoadCredential=` puts a copy readable by the
//! service alone (also with `DynamicUser=`), so the key never lives under the service's user.
//! The master checks the pair on start and on every reload — readable, parseable, the key
//! matching the certificate, the certificate valid now — so a bad pair fails the reload with
//! one line naming the file and the reason while the old generation keeps serving. Each
//! worker reads the pair once when it starts and keeps it in memory only.
//!
//! rustls with the `ring` provider: TLS 1.2 and 1.3 with rustls's default (safe) cipher
//! suites, ALPN `h2` and `http/1.1`, no OpenSSL. Validity dates are read (and printed) with
//! `x509-parser`, as rustls does not expose them.
//!
//! Session resumption works on any worker: the master makes one ticket key per generation
//! ([`TicketKey`]) and hands it to that generation's workers in their boot message, so a
//! ticket one worker issued opens on another (rustls's own ticketer draws a random key per
//! process, and its session cache is per process too, so with N workers a client would
//! resume about once in N). The key ratchets forward every [`TICKET_PERIOD`] (a one-way
//! hash, the previous period's key kept for decryption only), in every process alike and
//! without messages, so a key taken from memory opens no ticket older than two periods; a
//! reload starts a new key, and clients make one full handshake with the new generation.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// Largest certificate or key file read.
const MAX_FILE: u64 = 1 << 20;

/// The `[tls]` table, with paths resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TlsSettings {
    /// The certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The sockets (by `FileDescriptorName=`) that speak TLS; `None`: every socket.
    pub sockets: Option<Vec<String>>,
    /// The leaf certificate's end of validity (Unix seconds), as checked by the master.
    #[serde(default)]
    pub not_after: i64,
    /// The leaf certificate's serial number, in hex (for logs and `app status`).
    #[serde(default)]
    pub serial: String,
}

impl TlsSettings {
    /// Whether the socket named `name` speaks TLS. Without a list, every socket but the
    /// metrics endpoint's does (a loopback scrape target; name it in the list to encrypt it).
    pub fn applies_to(&self, name: &str) -> bool {
        match &self.sockets {
            Some(names) => names.iter().any(|n| n == name),
            None => name != crate::worker::METRICS_SOCKET && name != crate::worker::AGENT_SOCKET,
        }
    }

    /// Whole days until the certificate expires (negative once it has).
    pub fn days_left(&self, now_unix: i64) -> i64 {
        (self.not_after - now_unix).div_euclid(86_400)
    }
}

/// `credential:NAME` → `$CREDENTIALS_DIRECTORY/NAME`; anything else is a path.
pub fn resolve_path(value: &str) -> Result<PathBuf, String> {
    match value.strip_prefix("credential:") {
        Some(name) => {
            if name.is_empty() || name.contains('/') || name == ".." {
                return Err(format!(
                    "{value:?}: a credential name is one path component"
                ));
            }
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                format!("{value:?}: CREDENTIALS_DIRECTORY is not set (LoadCredential= in the unit)")
            })?;
            Ok(Path::new(&dir).join(name))
        }
        None => Ok(PathBuf::from(value)),
    }
}

/// A checked pair: what rustls serves, and what the master reports.
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    pub not_after: i64,
    pub serial: String,
}

/// Reads and checks the pair; the error is one line naming the file and the reason.
pub fn load(cert_path: &Path, key_path: &Path, now_unix: i64) -> Result<Loaded, String> {
    let cert_pem =
        read_bounded(cert_path).map_err(|e| format!("cert {}: {e}", cert_path.display()))?;
    let key_pem = read_bounded(key_path).map_err(|e| format!("key {}: {e}", key_path.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cert {}: not PEM certificates ({e})", cert_path.display()))?;
    let Some(leaf) = chain.first() else {
        return Err(format!(
            "cert {}: no certificate in the file",
            cert_path.display()
        ));
    };
    let v = validity(leaf).map_err(|e| format!("cert {}: {e}", cert_path.display()))?;
    if now_unix < v.not_before {
        return Err(format!(
            "cert {}: not valid before {}",
            cert_path.display(),
            v.not_before_date
        ));
    }
    if now_unix >= v.not_after {
        return Err(format!(
            "cert {}: expired on {}",
            cert_path.display(),
            v.not_after_date
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "key {}: no private key in the file ({e})",
            key_path.display()
        )
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "key {}: does not match the certificate in {}",
            key_path.display(),
            cert_path.display()
        ),
        other => format!("key {}: unusable ({other})", key_path.display()),
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        not_after: v.not_after,
        serial: v.serial,
    })
}

/// The server configuration a worker serves: ALPN `h2` first, then `http/1.1`; session
/// tickets sealed with the generation's key when there is one.
pub fn server_config(
    loaded: &Loaded,
    tickets: Option<TicketKey>,
) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            loaded.key.clone(),
        )));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if let Some(key) = tickets {
        cfg.ticketer = Arc::new(Ticketer::new(key));
    }
    Ok(Arc::new(cfg))
}

/// How long a ticket key seals new tickets before it ratchets; tickets stay readable for
/// one more period.
pub const TICKET_PERIOD: u64 = 3600;

/// A generation's ticket key at a period (`unix time / TICKET_PERIOD`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketKey {
    period: u64,
    secret: [u8; 32],
}

impl std::fmt::Debug for TicketKey {
    // Boot messages are logged with `{:?}` at debug level: never the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TicketKey(period {})", self.period)
    }
}

impl TicketKey {
    /// A fresh random key for the current period.
    pub fn generate() -> Result<TicketKey, String> {
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| "no randomness for a TLS ticket key".to_string())?;
        Ok(TicketKey {
            period: current_period(),
            secret,
        })
    }

    /// Moves the key forward to `period` (never back), forgetting the older secrets.
    pub fn ratchet_to(&mut self, period: u64) {
        while self.period < period {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            ctx.update(b"app tls ticket key ratchet");
            ctx.update(&self.secret);
            self.secret.copy_from_slice(ctx.finish().as_ref());
            self.period += 1;
        }
    }

    /// Forgets every secret older than the last period (the master, before handing the key
    /// to a new worker: the worker still opens the last period's tickets, which other workers
    /// of the generation issued).
    pub fn forget_before_last_period(&mut self) {
        self.ratchet_to(current_period().saturating_sub(1));
    }

    fn aead(&self) -> ring::aead::LessSafeKey {
        let key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &self.secret)
            .expect("a 32-byte AES-256 key");
        ring::aead::LessSafeKey::new(key)
    }
}

/// Seals tickets with the current period's key and opens those of this period and the one
/// before. A ticket is: period (8 bytes, big-endian) | nonce (12) | ciphertext and tag; the
/// period is authenticated as associated data.
struct Ticketer {
    state: std::sync::Mutex<TicketerState>,
}

struct TicketerState {
    key: TicketKey,
    current: ring::aead::LessSafeKey,
    previous: Option<ring::aead::LessSafeKey>,
}

impl Ticketer {
    fn new(key: TicketKey) -> Ticketer {
        let current = key.aead();
        let mut state = TicketerState {
            key,
            current,
            previous: None,
        };
        state.advance(current_period());
        Ticketer {
            state: std::sync::Mutex::new(state),
        }
    }

    /// The state moved to the current period.
    fn now(&self) -> std::sync::MutexGuard<'_, TicketerState> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.advance(current_period());
        s
    }
}

impl TicketerState {
    fn advance(&mut self, period: u64) {
        if period > self.key.period {
            self.key.ratchet_to(period - 1);
            self.previous = Some(self.key.aead());
            self.key.ratchet_to(period);
            self.current = self.key.aead();
        }
    }
}

fn current_period() -> u64 {
    now_unix().max(0) as u64 / TICKET_PERIOD
}

impl std::fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ticketer")
    }
}

const TICKET_HEAD: usize = 8 + ring::aead::NONCE_LEN;

fn seal(key: &ring::aead::LessSafeKey, period: u64, plain: &[u8]) -> Option<Vec<u8>> {
    let mut nonce = [0u8; ring::aead::NONCE_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce).ok()?;
    let mut out = Vec::with_capacity(TICKET_HEAD + plain.len() + 16);
    out.extend_from_slice(&period.to_be_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plain);
    let tag = key
        .seal_in_place_separate_tag(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::from(period.to_be_bytes()),
            &mut out[TICKET_HEAD..],
        )
        .ok()?;
    out.extend_from_slice(tag.as_ref());
    Some(out)
}

impl rustls::server::ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        TICKET_PERIOD as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let s = self.now();
        seal(&s.current, s.key.period, plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < TICKET_HEAD + ring::aead::AES_256_GCM.tag_len() {
            return None;
        }
        let period = u64::from_be_bytes(cipher[..8].try_into().ok()?);
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(&cipher[8..TICKET_HEAD]).ok()?;
        let s = self.now();
        let key = if period == s.key.period {
            &s.current
        } else if period.checked_add(1) == Some(s.key.period) {
            s.previous.as_ref()?
        } else {
            return None;
        };
        let mut buf = cipher[TICKET_HEAD..].to_vec();
        let plain = key
            .open_in_place(nonce, ring::aead::Aad::from(period.to_be_bytes()), &mut buf)
            .ok()?;
        let n = plain.len();
        buf.truncate(n);
        Some(buf)
    }
}

/// A regular file of at most [`MAX_FILE`] bytes, opened without blocking (a FIFO would
/// otherwise hang the master's loop).
fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => "unreadable (permission denied)".to_string(),
            std::io::ErrorKind::NotFound => "no such file".to_string(),
            _ => format!("unreadable ({e})"),
        })?;
    let meta = file.metadata().map_err(|e| format!("unreadable ({e})"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mut out = Vec::new();
    file.take(MAX_FILE + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("unreadable ({e})"))?;
    if out.len() as u64 > MAX_FILE {
        return Err(format!("larger than {MAX_FILE} bytes"));
    }
    Ok(out)
}

/// A certificate's validity and serial.
struct Validity {
    not_before: i64,
    not_after: i64,
    /// The same instants as dates ("2026-11-22"), for error messages.
    not_before_date: String,
    not_after_date: String,
    /// The serial number in hex.
    serial: String,
}

fn validity(cert: &CertificateDer<'_>) -> Result<Validity, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("not an X.509 certificate ({e})"))?;
    let v = parsed.validity();
    Ok(Validity {
        not_before: v.not_before.timestamp(),
        not_after: v.not_after.timestamp(),
        not_before_date: v.not_before.to_datetime().date().to_string(),
        not_after_date: v.not_after.to_datetime().date().to_string(),
        serial: parsed.raw_serial_as_string().replace(':', ""),
    })
}

/// Seconds since the epoch, now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustls::server::ProducesTickets;

    #[test]
    fn tickets_open_with_the_same_key_in_another_process_and_not_with_another_key() {
        let key = TicketKey::generate().unwrap();
        let (a, b) = (Ticketer::new(key.clone()), Ticketer::new(key));
        let t = a.encrypt(b"session").unwrap();
        assert_eq!(b.decrypt(&t).as_deref(), Some(&b"session"[..]));
        let other = Ticketer::new(TicketKey::generate().unwrap());
        assert_eq!(other.decrypt(&t), None);
        let mut bent = t.clone();
        *bent.last_mut().unwrap() ^= 1;
        assert_eq!(b.decrypt(&bent), None);
        assert_eq!(b.decrypt(&t[..10]), None);
    }

    #[test]
    fn tickets_stay_readable_one_period_after_theirs_and_the_ratchet_goes_one_way() {
        let now = TicketKey::generate().unwrap().period;
        let at = |period| {
            let mut k = TicketKey::generate().unwrap();
            k.period = period;
            k
        };
        // A key issued two periods ago, as every worker of its generation holds it.
        let first = at(now - 2);
        let mut second = first.clone();
        second.ratchet_to(now - 1);
        assert_ne!(second.secret, first.secret);
        let old_ticket = seal(&first.aead(), first.period, b"old").unwrap();
        let recent_ticket = seal(&second.aead(), second.period, b"recent").unwrap();
        let reader = Ticketer::new(first);
        assert_eq!(
            reader.decrypt(&recent_ticket).as_deref(),
            Some(&b"recent"[..])
        );
        assert_eq!(reader.decrypt(&old_ticket), None);
        assert_eq!(
            format!("{second:?}"),
            format!("TicketKey(period {})", now - 1)
        );
    }

    #[test]
    fn credential_paths() {
        assert_eq!(
            resolve_path("/etc/x.pem").unwrap(),
            PathBuf::from("/etc/x.pem")
        );
        assert!(resolve_path("credential:a/b").is_err());
        assert!(resolve_path("credential:").is_err());
    }
}
