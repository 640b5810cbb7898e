//! The one settings struct, where its values come from, and what makes them valid.
//!
//! Sources, lowest to highest precedence (documented in the README):
//!
//! 1. built-in defaults;
//! 2. the TOML file named by `--config` / `APP_CONFIG` (re-read on every reload);
//! 3. environment variables `APP_<KEY>`;
//! 4. command-line flags.
//!
//! Environment and flags are fixed for the life of the master, so on reload only the file can
//! change anything; a flag or variable keeps overriding it. Everything is merged into
//! [`Config`] and validated before a single worker starts: a bad value is one line naming the
//! key, and exit code 78 (`EX_CONFIG`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::exit::Fatal;

/// `[http] ready_path` unless configured: under `.well-known/` (RFC 8615) so that it does
/// not take a path a service is likely to use.
pub const DEFAULT_READY_PATH: &str = "/.well-known/ready";

/// Validates the `[service]` table through the user's settings type (see
/// [`crate::Settings`]); the supervisor itself never names that type.
pub type SettingsCheck = fn(&toml::Value) -> Result<(), String>;

/// Accepts any `[service]` table: for tests of the supervisor's own keys.
#[cfg(test)]
pub fn any_settings(_: &toml::Value) -> Result<(), String> {
    Ok(())
}

/// How workers get their connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AcceptStrategy {
    /// Every worker accepts on the one inherited listening socket.
    Shared,
    /// The master accepts and hands each connection to the next worker in turn.
    RoundRobin,
}

/// Where workers may run (`cpu_affinity`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CpuAffinity {
    /// Pinned one CPU per worker while that is free; a worker whose CPU is contended while
    /// another CPU idles is allowed on every CPU until the contention is gone.
    #[default]
    Auto,
    /// One CPU per worker, always.
    Pin,
    /// Every worker on every CPU the master may use (the scheduler decides).
    None,
    /// Every worker on exactly these CPUs.
    List(Vec<usize>),
}

impl std::str::FromStr for CpuAffinity {
    type Err = String;
    fn from_str(s: &str) -> Result<CpuAffinity, String> {
        match s.trim() {
            "auto" => Ok(CpuAffinity::Auto),
            "pin" => Ok(CpuAffinity::Pin),
            "none" => Ok(CpuAffinity::None),
            list => crate::master::affinity::parse_cpu_list(list)
                .map(CpuAffinity::List)
                .map_err(|e| format!("{e}, or \"auto\", \"pin\", \"none\"")),
        }
    }
}

impl std::fmt::Display for CpuAffinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CpuAffinity::Auto => f.write_str("auto"),
            CpuAffinity::Pin => f.write_str("pin"),
            CpuAffinity::None => f.write_str("none"),
            CpuAffinity::List(l) => f.write_str(&crate::master::affinity::format_cpu_list(l)),
        }
    }
}

/// Each worker's NUMA memory policy (`numa`), set with `set_mempolicy(2)` before exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum NumaPolicy {
    /// The kernel's default: memory from the node of the CPU that touches it first.
    #[default]
    Local,
    /// Pages spread round-robin over every node with memory (`numactl --interleave=all`).
    Interleave,
    /// Memory only from the node of the worker's home CPU (`numactl --membind`).
    Bind,
}

/// HTTP limits applied by the worker's server setup, around the user's service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpLimits {
    /// A client must finish sending request headers within this time.
    #[serde(with = "duration_ms")]
    pub header_read_timeout: Duration,
    /// A keep-alive connection idle this long between requests is closed.
    #[serde(with = "duration_ms")]
    pub keepalive_timeout: Duration,
    /// Largest request head (request line + headers) in bytes; larger gets 431.
    pub max_header_bytes: usize,
    /// Largest request body in bytes; larger gets 413.
    pub max_body_bytes: u64,
    /// Concurrent connections one worker serves; above it the worker stops accepting.
    pub max_connections: usize,
    /// Most header fields in one request head; more gets 431.
    pub max_headers: usize,
    /// A request body the service is waiting for must deliver data within this time, and
    /// `Expect: 100-continue` with no body is cut after it too.
    #[serde(with = "duration_ms")]
    pub body_read_timeout: Duration,
    /// Once a body has been read for `body_read_timeout`, its average rate must be at least
    /// this many bytes per second (a trickle is cut); 0 turns the check off.
    pub min_body_rate: u64,
    /// Body bytes a worker holds for requests whose bodies are still arriving, summed over
    /// its connections; a body that would pass it fails (503), so stalled uploads cannot pin
    /// memory.
    pub max_pending_body_bytes: u64,
    /// A connection whose peer accepts no bytes for this long is closed (a client that
    /// stops reading its responses).
    #[serde(with = "duration_ms")]
    pub send_timeout: Duration,
    /// Log every request (method, path, status, bytes, duration) as the `access` target.
    pub access_log: bool,
    /// The fraction of requests the access log records, 0.0 to 1.0.
    pub access_log_sample: f64,
}

/// Everything the master and its workers need, merged and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub config_file: Option<PathBuf>,
    pub workers: usize,
    pub bind: SocketAddr,
    /// Where to serve the pool's metrics when systemd passes no socket named `metrics`.
    pub metrics: Option<SocketAddr>,
    /// Where to answer HAProxy's `agent-check` when systemd passes no socket named `agent`.
    pub agent: Option<SocketAddr>,
    pub log_level: String,
    pub accept: AcceptStrategy,
    pub shutdown_timeout: Duration,
    /// On a graceful stop, how long the readiness endpoint answers 503 (and the agent
    /// `drain`) while everything else is still served, before the workers stop accepting.
    pub drain_delay: Duration,
    pub drain_timeout: Duration,
    pub ready_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub heartbeat_misses: u32,
    pub restart_limit: u32,
    pub restart_window: Duration,
    pub min_uptime: Duration,
    pub max_memory: u64,
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    pub control_socket: Option<PathBuf>,
    pub chaos: bool,
    pub chaos_boot_crash: bool,
    pub cpu_affinity: CpuAffinity,
    pub numa: NumaPolicy,
    pub http: HttpLimits,
    /// `[http] ready_path`: the path the worker layer answers with the pool's readiness;
    /// `None` when set to `""` (off).
    pub ready_path: Option<String>,
    /// The `[service]` table as written (an empty table when absent), checked by the
    /// user's settings type and handed to every worker.
    pub service: toml::Value,
    /// The `[tls]` table, its pair checked (see [`crate::tls`]); `None`: plain HTTP.
    pub tls: Option<crate::tls::TlsSettings>,
}

/// Flags of `app serve`. Every value also reads from `APP_<KEY>`; all are optional so that
/// the file and the defaults can fill what is not given.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML configuration file (re-read on reload).
    #[arg(long, env = "APP_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Number of workers [default: the CPUs this process may run on].
    #[arg(long, env = "APP_WORKERS", value_name = "N")]
    pub workers: Option<usize>,
    /// Address to bind when no socket is passed in by systemd [default: 127.0.0.1:8080].
    #[arg(long, env = "APP_BIND", value_name = "ADDR")]
    pub bind: Option<SocketAddr>,
    /// Serve the pool's Prometheus/OpenMetrics endpoint on ADDR (bound by the master,
    /// served by the workers); under systemd, a socket named `metrics` does the same.
    #[arg(long, env = "APP_METRICS", value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Answer HAProxy's agent-check (`ready`, `drain`, `maint`) on ADDR; under systemd, a
    /// socket named `agent` does the same.
    #[arg(long, env = "APP_AGENT", value_name = "ADDR")]
    pub agent: Option<SocketAddr>,
    /// Log level or filter (RUST_LOG syntax) [default: info; RUST_LOG also works].
    #[arg(long, env = "APP_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// How workers get connections.
    #[arg(long, env = "APP_ACCEPT", value_enum)]
    pub accept: Option<AcceptStrategy>,
    /// Grace period for in-flight requests on stop [default: 30s].
    #[arg(long, env = "APP_SHUTDOWN_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub shutdown_timeout: Option<Duration>,
    /// On stop, answer the readiness endpoint with 503 for this long before draining [default: 0s].
    #[arg(long, env = "APP_DRAIN_DELAY", value_parser = parse_duration, value_name = "DURATION")]
    pub drain_delay: Option<Duration>,
    /// Grace period for a retiring worker's in-flight requests [default: 5s].
    #[arg(long, env = "APP_DRAIN_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub drain_timeout: Option<Duration>,
    /// How long a new generation may take to become ready on reload [default: 10s].
    #[arg(long, env = "APP_READY_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub ready_timeout: Option<Duration>,
    /// Interval between heartbeats to each worker [default: 1s].
    #[arg(long, env = "APP_HEARTBEAT_INTERVAL", value_parser = parse_duration, value_name = "DURATION")]
    pub heartbeat_interval: Option<Duration>,
    /// Missed heartbeats in a row after which a worker is killed [default: 3].
    #[arg(long, env = "APP_HEARTBEAT_MISSES", value_name = "N")]
    pub heartbeat_misses: Option<u32>,
    /// Worker restarts allowed within --restart-window before the master gives up [default: 10].
    #[arg(long, env = "APP_RESTART_LIMIT", value_name = "N")]
    pub restart_limit: Option<u32>,
    /// Window for --restart-limit [default: 60s].
    #[arg(long, env = "APP_RESTART_WINDOW", value_parser = parse_duration, value_name = "DURATION")]
    pub restart_window: Option<Duration>,
    /// A worker up this long resets its slot's backoff [default: 1s].
    #[arg(long, env = "APP_MIN_UPTIME", value_parser = parse_duration, value_name = "DURATION")]
    pub min_uptime: Option<Duration>,
    /// Recycle a worker whose memory (PSS, else RSS) passes this, e.g. 256MiB; 0 = off [default: 0].
    #[arg(long, env = "APP_MAX_MEMORY", value_parser = parse_size, value_name = "SIZE")]
    pub max_memory: Option<u64>,
    /// Recycle a worker after this many requests; 0 = off [default: 0].
    #[arg(long, env = "APP_MAX_REQUESTS", value_name = "N")]
    pub max_requests: Option<u64>,
    /// Random extra requests (0..=N) added to --max-requests per worker [default: 0].
    #[arg(long, env = "APP_MAX_REQUESTS_JITTER", value_name = "N")]
    pub max_requests_jitter: Option<u64>,
    /// Control socket path [default: $RUNTIME_DIRECTORY/control.sock, see README].
    #[arg(long, env = "APP_CONTROL_SOCKET", value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Enable the /chaos/* demo routes (hang, panic, leak) used to show supervision.
    #[arg(long, env = "APP_CHAOS")]
    pub chaos: bool,
    /// Make every worker crash while booting (demonstrates the restart budget).
    #[arg(long, hide = true)]
    pub chaos_boot_crash: bool,
    /// Where workers run: auto, pin, none, or a CPU list like 0,2-3 [default: auto].
    #[arg(long, env = "APP_CPU_AFFINITY", value_name = "POLICY")]
    pub cpu_affinity: Option<CpuAffinity>,
    /// Workers' NUMA memory policy [default: local].
    #[arg(long, env = "APP_NUMA", value_enum)]
    pub numa: Option<NumaPolicy>,
}

/// The file's shape: the one list of the keys a file may hold ([`file_keys`] reads it off
/// for the tests that keep the README's table and the fuzz targets in step). Every key is
/// optional; unknown keys are an error.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    workers: Option<usize>,
    bind: Option<String>,
    metrics: Option<String>,
    agent: Option<String>,
    log_level: Option<String>,
    accept: Option<AcceptStrategy>,
    shutdown_timeout: Option<String>,
    drain_delay: Option<String>,
    drain_timeout: Option<String>,
    ready_timeout: Option<String>,
    heartbeat_interval: Option<String>,
    heartbeat_misses: Option<u32>,
    restart_limit: Option<u32>,
    restart_window: Option<String>,
    min_uptime: Option<String>,
    max_memory: Option<SizeValue>,
    max_requests: Option<u64>,
    max_requests_jitter: Option<u64>,
    control_socket: Option<PathBuf>,
    chaos: Option<bool>,
    cpu_affinity: Option<String>,
    numa: Option<NumaPolicy>,
    #[serde(default)]
    http: FileHttp,
    #[serde(default)]
    service: Option<toml::Table>,
    tls: Option<FileTls>,
}

/// The `[tls]` table as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert: String,
    key: String,
    sockets: Option<Vec<String>>,
}

impl FileTls {
    /// Resolves `credential:` paths and checks the pair, as the master does on every load.
    fn check(&self) -> Result<crate::tls::TlsSettings, Fatal> {
        let cert = crate::tls::resolve_path(&self.cert).map_err(|e| invalid("tls.cert", e))?;
        let key = crate::tls::resolve_path(&self.key).map_err(|e| invalid("tls.key", e))?;
        if self.sockets.as_ref().is_some_and(Vec::is_empty) {
            return Err(invalid(
                "tls.sockets",
                "is empty: name the sockets that speak TLS, or leave it out for all",
            ));
        }
        let loaded = crate::tls::load(&cert, &key, crate::tls::now_unix())
            .map_err(|e| Fatal::config(format!("config error: tls: {e}")))?;
        Ok(crate::tls::TlsSettings {
            cert,
            key,
            sockets: self.sockets.clone(),
            not_after: loaded.not_after,
            serial: loaded.serial,
        })
    }
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileHttp {
    header_read_timeout: Option<String>,
    keepalive_timeout: Option<String>,
    max_header_bytes: Option<SizeValue>,
    max_body_bytes: Option<SizeValue>,
    max_connections: Option<usize>,
    max_headers: Option<usize>,
    body_read_timeout: Option<String>,
    min_body_rate: Option<SizeValue>,
    max_pending_body_bytes: Option<SizeValue>,
    send_timeout: Option<String>,
    access_log: Option<bool>,
    access_log_sample: Option<f64>,
    ready_path: Option<String>,
}

/// A size written either as a number of bytes or as a string with a unit ("64KiB").
#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    fn resolve(&self, key: &str) -> Result<u64, Fatal> {
        match self {
            SizeValue::Bytes(n) => Ok(*n),
            SizeValue::Text(s) => parse_size(s).map_err(|e| invalid(key, e)),
        }
    }
}

/// Every key a configuration file may hold, read off [`FileConfig`] itself: `key` at the top
/// level, `table.key` inside `[http]` and `[tls]`, and `service` for the service's own table
/// (whose keys belong to the program's settings type).
#[cfg(test)]
pub fn file_keys() -> Vec<String> {
    let every_table = FileConfig {
        tls: Some(FileTls::default()),
        service: Some(Default::default()),
        ..Default::default()
    };
    let serde_json::Value::Object(top) =
        serde_json::to_value(&every_table).expect("the file's schema serialises")
    else {
        unreachable!("a struct serialises to an object")
    };
    let mut keys = Vec::new();
    for (key, value) in top {
        match value {
            serde_json::Value::Object(table) if key != "service" => {
                keys.extend(table.keys().map(|k| format!("{key}.{k}")));
            }
            _ => keys.push(key),
        }
    }
    keys.sort();
    keys
}

fn invalid(key: &str, reason: impl std::fmt::Display) -> Fatal {
    Fatal::config(format!("config error: {key}: {reason}"))
}

/// Parses "250ms", "5s", "1m 30s" (humantime syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?} ({e}); write e.g. \"500ms\" or \"5s\""))
}

/// Parses a size: a number of bytes ("65536"), or a number with a unit read by `bytesize`:
/// binary units are powers of 1024 ("64KiB", "256MiB", "1GiB"), decimal ones powers of 1000
/// ("500KB", "100MB" = 100 000 000 bytes; "K", "M", "G" alone are decimal too). A size too
/// large for 64 bits is an error, not the largest size.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let err = || {
        format!(
            "invalid size {s:?}; write e.g. \"65536\", \"64KiB\", \"256MiB\" or \"100MB\" (MiB = 2^20 bytes, MB = 10^6)"
        )
    };
    if !t.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(err());
    }
    let size: bytesize::ByteSize = t.parse().map_err(|_| err())?;
    // bytesize saturates; the one legitimate way to write u64::MAX is its digits.
    if size.0 == u64::MAX && t != u64::MAX.to_string() {
        return Err(err());
    }
    Ok(size.0)
}

fn file_duration(v: &Option<String>, key: &str) -> Result<Option<Duration>, Fatal> {
    v.as_deref()
        .map(|s| parse_duration(s).map_err(|e| invalid(key, e)))
        .transpose()
}

/// Largest config file read.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Reads and parses the config file; errors name the file, the line and the key.
///
/// The master reads it on its loop at every reload, so the read must not block: the file is
/// opened with `O_NONBLOCK` (opening a FIFO for reading would otherwise wait for a writer),
/// must be a regular file, and is read up to [`MAX_FILE_BYTES`].
fn read_file(path: &Path) -> Result<FileConfig, Fatal> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let cannot = |e: &dyn std::fmt::Display| {
        Fatal::config(format!(
            "config error: cannot read {}: {}",
            path.display(),
            e
        ))
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| cannot(&e))?;
    let meta = file.metadata().map_err(|e| cannot(&e))?;
    if !meta.file_type().is_file() {
        return Err(cannot(&"not a regular file"));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(cannot(&format!("larger than {} KiB", MAX_FILE_BYTES >> 10)));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| cannot(&e))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(cannot(&format!("larger than {} KiB", MAX_FILE_BYTES >> 10)));
    }
    let text = String::from_utf8(bytes).map_err(|_| cannot(&"not valid UTF-8"))?;
    parse_file(&text).map_err(|e| Fatal::config(format!("config error: {}: {e}", path.display())))
}

fn parse_file(text: &str) -> Result<FileConfig, String> {
    toml::from_str::<FileConfig>(text).map_err(|e| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        let msg = e.message().trim().replace('\n', " ");
        match line {
            Some(line) => format!("line {line}: {msg}"),
            None => msg,
        }
    })
}

impl Config {
    /// Merges defaults, file, environment and flags (see the module docs) and validates.
    /// `default_workers` is the number of CPUs the process may run on.
    pub fn load(
        args: &ServeArgs,
        default_workers: usize,
        check: SettingsCheck,
    ) -> Result<Config, Fatal> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::merge(args, file, default_workers, check)
    }

    fn merge(
        args: &ServeArgs,
        f: FileConfig,
        default_workers: usize,
        check: SettingsCheck,
    ) -> Result<Config, Fatal> {
        let bind = match (&args.bind, &f.bind) {
            (Some(b), _) => *b,
            (None, Some(s)) => s
                .parse()
                .map_err(|e| invalid("bind", format!("{s:?} is not an address:port ({e})")))?,
            (None, None) => SocketAddr::from(([127, 0, 0, 1], 8080)),
        };
        let metrics =
            match (&args.metrics, &f.metrics) {
                (Some(m), _) => Some(*m),
                (None, Some(s)) => Some(s.parse().map_err(|e| {
                    invalid("metrics", format!("{s:?} is not an address:port ({e})"))
                })?),
                (None, None) => None,
            };
        let agent = match (&args.agent, &f.agent) {
            (Some(m), _) => Some(*m),
            (None, Some(s)) => Some(
                s.parse()
                    .map_err(|e| invalid("agent", format!("{s:?} is not an address:port ({e})")))?,
            ),
            (None, None) => None,
        };
        let ready_path = match f.http.ready_path.as_deref() {
            None => Some(DEFAULT_READY_PATH.to_string()),
            Some("") => None,
            Some(p) => Some(p.to_string()),
        };
        let http = HttpLimits {
            header_read_timeout: file_duration(
                &f.http.header_read_timeout,
                "http.header_read_timeout",
            )?
            .unwrap_or(Duration::from_secs(10)),
            keepalive_timeout: file_duration(&f.http.keepalive_timeout, "http.keepalive_timeout")?
                .unwrap_or(Duration::from_secs(75)),
            max_header_bytes: match &f.http.max_header_bytes {
                Some(v) => usize::try_from(v.resolve("http.max_header_bytes")?)
                    .map_err(|_| invalid("http.max_header_bytes", "too large"))?,
                None => 16 * 1024,
            },
            max_body_bytes: match &f.http.max_body_bytes {
                Some(v) => v.resolve("http.max_body_bytes")?,
                None => 1 << 20,
            },
            max_connections: f.http.max_connections.unwrap_or(10_000),
            max_headers: f.http.max_headers.unwrap_or(100),
            body_read_timeout: file_duration(&f.http.body_read_timeout, "http.body_read_timeout")?
                .unwrap_or(Duration::from_secs(15)),
            min_body_rate: match &f.http.min_body_rate {
                Some(v) => v.resolve("http.min_body_rate")?,
                None => 240,
            },
            max_pending_body_bytes: match &f.http.max_pending_body_bytes {
                Some(v) => v.resolve("http.max_pending_body_bytes")?,
                None => 64 << 20,
            },
            send_timeout: file_duration(&f.http.send_timeout, "http.send_timeout")?
                .unwrap_or(Duration::from_secs(30)),
            access_log: f.http.access_log.unwrap_or(false),
            access_log_sample: f.http.access_log_sample.unwrap_or(1.0),
        };
        let max_memory = match (args.max_memory, &f.max_memory) {
            (Some(v), _) => v,
            (None, Some(v)) => v.resolve("max_memory")?,
            (None, None) => 0,
        };
        let cpu_affinity = match (&args.cpu_affinity, &f.cpu_affinity) {
            (Some(a), _) => a.clone(),
            (None, Some(s)) => s.parse().map_err(|e| invalid("cpu_affinity", e))?,
            (None, None) => CpuAffinity::Auto,
        };
        // An explicit CPU list sizes the default pool like the CPUs the master may use.
        let default_workers = match &cpu_affinity {
            CpuAffinity::List(l) => l.len(),
            _ => default_workers,
        };
        let cfg = Config {
            config_file: args.config.clone(),
            workers: args.workers.or(f.workers).unwrap_or(default_workers),
            bind,
            metrics,
            agent,
            log_level: args
                .log_level
                .clone()
                .or(f.log_level)
                .unwrap_or_else(|| "info".into()),
            accept: args.accept.or(f.accept).unwrap_or(AcceptStrategy::Shared),
            shutdown_timeout: pick(
                args.shutdown_timeout,
                &f.shutdown_timeout,
                "shutdown_timeout",
                30_000,
            )?,
            drain_delay: pick(args.drain_delay, &f.drain_delay, "drain_delay", 0)?,
            drain_timeout: pick(args.drain_timeout, &f.drain_timeout, "drain_timeout", 5_000)?,
            ready_timeout: pick(
                args.ready_timeout,
                &f.ready_timeout,
                "ready_timeout",
                10_000,
            )?,
            heartbeat_interval: pick(
                args.heartbeat_interval,
                &f.heartbeat_interval,
                "heartbeat_interval",
                1_000,
            )?,
            heartbeat_misses: args.heartbeat_misses.or(f.heartbeat_misses).unwrap_or(3),
            restart_limit: args.restart_limit.or(f.restart_limit).unwrap_or(10),
            restart_window: pick(
                args.restart_window,
                &f.restart_window,
                "restart_window",
                60_000,
            )?,
            min_uptime: pick(args.min_uptime, &f.min_uptime, "min_uptime", 1_000)?,
            max_memory,
            max_requests: args.max_requests.or(f.max_requests).unwrap_or(0),
            max_requests_jitter: args
                .max_requests_jitter
                .or(f.max_requests_jitter)
                .unwrap_or(0),
            control_socket: args.control_socket.clone().or(f.control_socket),
            chaos: args.chaos || f.chaos.unwrap_or(false),
            chaos_boot_crash: args.chaos_boot_crash,
            cpu_affinity,
            numa: args.numa.or(f.numa).unwrap_or_default(),
            http,
            ready_path,
            service: toml::Value::Table(f.service.unwrap_or_default()),
            tls: f.tls.as_ref().map(FileTls::check).transpose()?,
        };
        cfg.validate()?;
        check(&cfg.service).map_err(|e| invalid("service", e))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), Fatal> {
        let check = |ok: bool, key: &str, reason: String| {
            if ok {
                Ok(())
            } else {
                Err(invalid(key, reason))
            }
        };
        check(
            (1..=crate::loadboard::MAX_WORKERS).contains(&self.workers),
            "workers",
            format!(
                "must be between 1 and {} (got {})",
                crate::loadboard::MAX_WORKERS,
                self.workers
            ),
        )?;
        self.log_level
            .parse::<tracing_subscriber::filter::Targets>()
            .map_err(|e| {
                invalid(
                    "log_level",
                    format!("{:?} is not a level or filter ({e})", self.log_level),
                )
            })?;
        // Bounded so that deadline arithmetic (now + timeout) can never overflow.
        const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
        for (key, d) in [
            ("heartbeat_interval", self.heartbeat_interval),
            ("min_uptime", self.min_uptime),
            ("shutdown_timeout", self.shutdown_timeout),
            ("drain_delay", self.drain_delay),
            ("drain_timeout", self.drain_timeout),
            ("ready_timeout", self.ready_timeout),
            ("restart_window", self.restart_window),
            ("http.header_read_timeout", self.http.header_read_timeout),
            ("http.keepalive_timeout", self.http.keepalive_timeout),
            ("http.body_read_timeout", self.http.body_read_timeout),
            ("http.send_timeout", self.http.send_timeout),
        ] {
            check(
                d <= MAX_DURATION,
                key,
                format!("must be at most 24h (got {d:?})"),
            )?;
        }
        for (key, d) in [
            ("shutdown_timeout", self.shutdown_timeout),
            ("drain_timeout", self.drain_timeout),
            ("ready_timeout", self.ready_timeout),
            ("restart_window", self.restart_window),
            ("http.header_read_timeout", self.http.header_read_timeout),
            ("http.keepalive_timeout", self.http.keepalive_timeout),
            ("http.body_read_timeout", self.http.body_read_timeout),
            ("http.send_timeout", self.http.send_timeout),
        ] {
            check(!d.is_zero(), key, "must be greater than zero".into())?;
        }
        check(
            self.heartbeat_interval >= Duration::from_millis(10),
            "heartbeat_interval",
            format!("must be at least 10ms (got {:?})", self.heartbeat_interval),
        )?;
        check(
            (1..=1000).contains(&self.heartbeat_misses),
            "heartbeat_misses",
            format!("must be between 1 and 1000 (got {})", self.heartbeat_misses),
        )?;
        check(
            self.restart_limit >= 1,
            "restart_limit",
            "must be at least 1".into(),
        )?;
        check(
            self.http.max_header_bytes >= 1024,
            "http.max_header_bytes",
            format!("must be at least 1024 (got {})", self.http.max_header_bytes),
        )?;
        check(
            (1..=1_000_000).contains(&self.http.max_connections),
            "http.max_connections",
            format!(
                "must be between 1 and 1000000 (got {})",
                self.http.max_connections
            ),
        )?;
        check(
            (0.0..=1.0).contains(&self.http.access_log_sample),
            "http.access_log_sample",
            format!(
                "must be between 0.0 and 1.0 (got {})",
                self.http.access_log_sample
            ),
        )?;
        check(
            (1..=10_000).contains(&self.http.max_headers),
            "http.max_headers",
            format!(
                "must be between 1 and 10000 (got {})",
                self.http.max_headers
            ),
        )?;
        check(
            self.http.max_pending_body_bytes >= self.http.max_body_bytes.min(1 << 20),
            "http.max_pending_body_bytes",
            format!(
                "must be at least max_body_bytes or 1MiB, whichever is smaller (got {})",
                self.http.max_pending_body_bytes
            ),
        )?;
        if let Some(p) = &self.ready_path {
            // Compared with the request's path as is: no query, nothing to normalise.
            check(
                p.starts_with('/')
                    && p.len() <= 256
                    && !p.contains(['?', '#'])
                    && p.bytes().all(|b| b.is_ascii_graphic()),
                "http.ready_path",
                format!(
                    "must be \"\" (off) or a path starting with / of at most 256 printable ASCII characters, without ? or # (got {p:?})"
                ),
            )?;
        }
        check(
            self.max_memory == 0 || self.max_memory >= 1 << 20,
            "max_memory",
            format!(
                "must be 0 (off) or at least 1MiB (got {} bytes)",
                self.max_memory
            ),
        )?;
        Ok(())
    }
}

/// Where an effective value came from (`app check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Default,
    File,
    Env,
    Flag,
}

/// One key of the effective configuration, for `app check`.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub key: &'static str,
    pub value: serde_json::Value,
    pub source: Source,
}

impl Config {
    /// [`Config::load`], and for every key its effective value and where it came from.
    ///
    /// A value given in `ServeArgs` is a flag when the process's own arguments name the
    /// flag, else an environment variable (clap fills both into the same field).
    pub fn explain(
        args: &ServeArgs,
        default_workers: usize,
        check: SettingsCheck,
    ) -> Result<(Config, Vec<Entry>), Fatal> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let f = &file;
        let h = &file.http;
        let in_file: Vec<(&'static str, bool)> = vec![
            ("workers", f.workers.is_some()),
            ("bind", f.bind.is_some()),
            ("log_level", f.log_level.is_some()),
            ("accept", f.accept.is_some()),
            ("agent", f.agent.is_some()),
            ("shutdown_timeout", f.shutdown_timeout.is_some()),
            ("drain_delay", f.drain_delay.is_some()),
            ("drain_timeout", f.drain_timeout.is_some()),
            ("ready_timeout", f.ready_timeout.is_some()),
            ("heartbeat_interval", f.heartbeat_interval.is_some()),
            ("heartbeat_misses", f.heartbeat_misses.is_some()),
            ("restart_limit", f.restart_limit.is_some()),
            ("restart_window", f.restart_window.is_some()),
            ("min_uptime", f.min_uptime.is_some()),
            ("max_memory", f.max_memory.is_some()),
            ("max_requests", f.max_requests.is_some()),
            ("max_requests_jitter", f.max_requests_jitter.is_some()),
            ("control_socket", f.control_socket.is_some()),
            ("chaos", f.chaos.is_some()),
            ("http.header_read_timeout", h.header_read_timeout.is_some()),
            ("http.keepalive_timeout", h.keepalive_timeout.is_some()),
            ("http.max_header_bytes", h.max_header_bytes.is_some()),
            ("http.max_headers", h.max_headers.is_some()),
            ("http.max_body_bytes", h.max_body_bytes.is_some()),
            ("http.body_read_timeout", h.body_read_timeout.is_some()),
            ("http.min_body_rate", h.min_body_rate.is_some()),
            (
                "http.max_pending_body_bytes",
                h.max_pending_body_bytes.is_some(),
            ),
            ("http.send_timeout", h.send_timeout.is_some()),
            ("http.max_connections", h.max_connections.is_some()),
            ("http.ready_path", h.ready_path.is_some()),
            ("service", f.service.is_some()),
        ];
        let a = args;
        let given: Vec<(&'static str, bool)> = vec![
            ("workers", a.workers.is_some()),
            ("bind", a.bind.is_some()),
            ("log_level", a.log_level.is_some()),
            ("accept", a.accept.is_some()),
            ("agent", a.agent.is_some()),
            ("shutdown_timeout", a.shutdown_timeout.is_some()),
            ("drain_delay", a.drain_delay.is_some()),
            ("drain_timeout", a.drain_timeout.is_some()),
            ("ready_timeout", a.ready_timeout.is_some()),
            ("heartbeat_interval", a.heartbeat_interval.is_some()),
            ("heartbeat_misses", a.heartbeat_misses.is_some()),
            ("restart_limit", a.restart_limit.is_some()),
            ("restart_window", a.restart_window.is_some()),
            ("min_uptime", a.min_uptime.is_some()),
            ("max_memory", a.max_memory.is_some()),
            ("max_requests", a.max_requests.is_some()),
            ("max_requests_jitter", a.max_requests_jitter.is_some()),
            ("control_socket", a.control_socket.is_some()),
            ("chaos", a.chaos),
        ];
        let cfg = Self::merge(args, file, default_workers, check)?;
        let argv: Vec<String> = std::env::args_os()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        let source = |key: &'static str| -> Source {
            if given.iter().any(|(k, g)| *k == key && *g) {
                let flag = format!("--{}", key.replace('_', "-"));
                let named = argv
                    .iter()
                    .any(|a| *a == flag || a.starts_with(&format!("{flag}=")));
                let env = std::env::var_os(format!("APP_{}", key.to_ascii_uppercase())).is_some();
                if named || !env {
                    Source::Flag
                } else {
                    Source::Env
                }
            } else if in_file.iter().any(|(k, g)| *k == key && *g) {
                Source::File
            } else {
                Source::Default
            }
        };
        use serde_json::json;
        let d = |d: Duration| json!(humantime::format_duration(d).to_string());
        let c = &cfg;
        let values: Vec<(&'static str, serde_json::Value)> = vec![
            ("workers", json!(c.workers)),
            ("bind", json!(c.bind.to_string())),
            ("log_level", json!(c.log_level)),
            ("accept", json!(c.accept)),
            ("agent", json!(c.agent.map(|a| a.to_string()))),
            ("shutdown_timeout", d(c.shutdown_timeout)),
            ("drain_delay", d(c.drain_delay)),
            ("drain_timeout", d(c.drain_timeout)),
            ("ready_timeout", d(c.ready_timeout)),
            ("heartbeat_interval", d(c.heartbeat_interval)),
            ("heartbeat_misses", json!(c.heartbeat_misses)),
            ("restart_limit", json!(c.restart_limit)),
            ("restart_window", d(c.restart_window)),
            ("min_uptime", d(c.min_uptime)),
            ("max_memory", json!(c.max_memory)),
            ("max_requests", json!(c.max_requests)),
            ("max_requests_jitter", json!(c.max_requests_jitter)),
            ("control_socket", json!(c.control_socket)),
            ("chaos", json!(c.chaos)),
            ("http.header_read_timeout", d(c.http.header_read_timeout)),
            ("http.keepalive_timeout", d(c.http.keepalive_timeout)),
            ("http.max_header_bytes", json!(c.http.max_header_bytes)),
            ("http.max_headers", json!(c.http.max_headers)),
            ("http.max_body_bytes", json!(c.http.max_body_bytes)),
            ("http.body_read_timeout", d(c.http.body_read_timeout)),
            ("http.min_body_rate", json!(c.http.min_body_rate)),
            (
                "http.max_pending_body_bytes",
                json!(c.http.max_pending_body_bytes),
            ),
            ("http.send_timeout", d(c.http.send_timeout)),
            ("http.max_connections", json!(c.http.max_connections)),
            (
                "http.ready_path",
                json!(c.ready_path.as_deref().unwrap_or("")),
            ),
            (
                "service",
                serde_json::to_value(&c.service).unwrap_or(serde_json::Value::Null),
            ),
        ];
        let entries = values
            .into_iter()
            .map(|(key, value)| Entry {
                key,
                value,
                source: source(key),
            })
            .collect();
        Ok((cfg, entries))
    }
}

fn pick(
    flag: Option<Duration>,
    file: &Option<String>,
    key: &str,
    default_ms: u64,
) -> Result<Duration, Fatal> {
    match flag {
        Some(d) => Ok(d),
        None => Ok(file_duration(file, key)?.unwrap_or(Duration::from_millis(default_ms))),
    }
}

/// Durations cross the IPC channel as whole milliseconds.
mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// The file's text alone (no flags, no environment) through the same merge and validation.
#[cfg(test)]
pub fn from_text(text: &str, default_workers: usize) -> Result<Config, Fatal> {
    let f = parse_file(text).map_err(Fatal::config)?;
    Config::merge(&ServeArgs::default(), f, default_workers, any_settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, args: ServeArgs) -> Result<Config, Fatal> {
        let f = parse_file(toml).map_err(Fatal::config)?;
        Config::merge(&args, f, 2, any_settings)
    }

    #[test]
    fn defaults_are_valid() {
        let c = load("", ServeArgs::default()).unwrap();
        assert_eq!(c.workers, 2);
        assert_eq!(c.drain_timeout, Duration::from_secs(5));
        assert_eq!(c.bind.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn flags_override_file() {
        let args = ServeArgs {
            workers: Some(3),
            ..Default::default()
        };
        let c = load("workers = 5\ndrain_timeout = \"2s\"\n", args).unwrap();
        assert_eq!(c.workers, 3);
        assert_eq!(c.drain_timeout, Duration::from_secs(2));
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = load("workers = 2\nwrokers = 3\n", ServeArgs::default()).unwrap_err();
        assert_eq!(e.code, crate::exit::CONFIG);
        assert!(e.message.contains("line 2"), "{}", e.message);
        assert!(e.message.contains("wrokers"), "{}", e.message);
    }

    #[test]
    fn bad_values_name_the_key() {
        for (toml, key) in [
            ("workers = 0", "workers"),
            ("drain_timeout = \"soon\"", "drain_timeout"),
            ("max_memory = \"12 parsecs\"", "max_memory"),
            ("bind = \"nowhere\"", "bind"),
            ("heartbeat_interval = \"1ms\"", "heartbeat_interval"),
            ("[http]\nmax_header_bytes = 10", "http.max_header_bytes"),
        ] {
            let e = load(toml, ServeArgs::default()).unwrap_err();
            assert!(
                e.message.starts_with(&format!("config error: {key}:")),
                "{toml}: {}",
                e.message
            );
        }
    }

    /// The shipped `systemd/app.toml` documents the defaults and sets only `drain_delay`
    /// (a stop under systemd first leaves the load balancer): it parses, and uncommenting
    /// every `# key = value` line gives the same configuration as no file at all but for
    /// that key. (`workers` and `control_socket` are examples: their defaults depend on the
    /// machine and the environment.)
    #[test]
    fn shipped_config_documents_the_defaults() {
        let shipped = include_str!("../systemd/app.toml");
        let mut defaults = from_text("", 2).unwrap();
        assert_eq!(defaults.drain_delay, Duration::ZERO);
        defaults.drain_delay = Duration::from_secs(3);
        assert_eq!(from_text(shipped, 2).unwrap(), defaults);
        let mut uncommented = 0;
        let text: String = shipped
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest)
                    if rest.split_once(" = ").is_some_and(|(k, _)| {
                        !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    }) && !rest.starts_with("workers ")
                        && !rest.starts_with("control_socket ") =>
                {
                    uncommented += 1;
                    format!("{rest}\n")
                }
                _ => format!("{line}\n"),
            })
            .collect();
        assert!(uncommented >= 25, "only {uncommented} keys uncommented");
        let c = from_text(&text, 2).unwrap_or_else(|e| panic!("{}\n{text}", e.message));
        let mut expected = defaults;
        // The demo's own table is the service's business, not app's default.
        expected.service = c.service.clone();
        assert_eq!(c, expected);
        assert_eq!(
            c.service.get("greeting").and_then(|g| g.as_str()),
            Some("hello")
        );
        let last_table = shipped.lines().rfind(|l| l.starts_with('[')).unwrap();
        assert_eq!(
            last_table, "[service]",
            "[service] must stay the last table"
        );
    }

    #[test]
    fn affinity_and_numa_keys() {
        let c = load("", ServeArgs::default()).unwrap();
        assert_eq!(c.cpu_affinity, CpuAffinity::Auto);
        assert_eq!(c.numa, NumaPolicy::Local);
        let c = load(
            "cpu_affinity = \"0,2-3\"\nnuma = \"interleave\"",
            ServeArgs::default(),
        )
        .unwrap();
        assert_eq!(c.cpu_affinity, CpuAffinity::List(vec![0, 2, 3]));
        assert_eq!(c.workers, 3, "a CPU list sizes the default pool");
        assert_eq!(c.numa, NumaPolicy::Interleave);
        let args = ServeArgs {
            cpu_affinity: Some(CpuAffinity::Pin),
            ..Default::default()
        };
        assert_eq!(
            load("cpu_affinity = \"none\"", args).unwrap().cpu_affinity,
            CpuAffinity::Pin
        );
        for (bad, word) in [
            (
                "cpu_affinity = \"sometimes\"",
                "cpu_affinity: \"sometimes\"",
            ),
            ("numa = \"far\"", "line 1: unknown variant `far`"),
        ] {
            let e = load(bad, ServeArgs::default()).unwrap_err();
            assert!(e.message.contains(word), "{}", e.message);
        }
        assert_eq!(CpuAffinity::List(vec![0, 1, 3]).to_string(), "0-1,3");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("10"), Ok(10));
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert!(parse_size("99999999999GiB").is_err());
        // Decimal units are powers of 1000, binary ones of 1024.
        assert_eq!(parse_size("100MB"), Ok(100_000_000));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
        assert_eq!(parse_size("4KB"), Ok(4000));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("12 parsecs").is_err());
    }

    /// The README's configuration table names exactly the keys of the file's schema: a key
    /// added to [`FileConfig`] without a row (or a row left for a key removed) fails here.
    #[test]
    fn the_readme_table_lists_every_key_of_the_schema() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
            .expect("README.md");
        let section = readme
            .split("\n## Configuration\n")
            .nth(1)
            .expect("a Configuration section")
            .split("\n## ")
            .next()
            .unwrap();
        let mut documented: Vec<String> = section
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .map(|cell| match cell.split_once("] ") {
                // `[http] max_headers` -> http.max_headers; `[service] greeting` -> service.
                Some(("[service", _)) => "service".to_string(),
                Some((table, key)) => format!("{}.{key}", &table[1..]),
                None => cell.to_string(),
            })
            .collect();
        documented.sort();
        documented.dedup();
        assert_eq!(documented, file_keys());
    }
}
