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
            None => name != crate::worker::METRICS_SOCKET,
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

/// The server configuration a worker serves: ALPN `h2` first, then `http/1.1`.
pub fn server_config(loaded: &Loaded) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            loaded.key.clone(),
        )));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
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
