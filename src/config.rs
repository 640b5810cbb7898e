//! The one settings schema, where its values come from, and what makes them valid.
//!
//! [`Config`] (with its `[http]` table, [`HttpLimits`]) *is* the schema: each key is one field,
//! carrying its doc comment, its default (`#[default(..)]`) and how it is written
//! (`#[serde(..)]`). Adding a key is adding a field, plus a line in [`Config::validate`] when
//! its type alone does not bound it. [`keys`] lists the schema's keys; the tests hold the
//! README's configuration table, the flags and the fuzzer's key list to it.
//!
//! Sources, lowest to highest precedence (documented in the README):
//!
//! 1. built-in defaults (the fields' `#[default]`; `workers`: the CPUs the master may use);
//! 2. the TOML file named by `--config` / `APP_CONFIG` (re-read on every reload);
//! 3. environment variables `APP_<KEY>`;
//! 4. command-line flags.
//!
//! Why the layering is done this way: `figment` merges the layers as trees of values and
//! deserializes the result once, into the schema, so a value is parsed and bounded by the
//! same code whichever layer wrote it, and a bad one is reported with its key path. The
//! environment and the flags come from clap ([`ServeArgs`]), not from figment's own `Env`
//! provider: the library's users embed `ServeArgs` in their own command lines, `--help`
//! documents each variable beside its flag, and a variable that does not parse is a usage
//! error (exit 64) exactly like the flag. So the flags are a second, flat struct whose field
//! names are the schema's keys; a test checks that each flag names a key, with the
//! `APP_<KEY>` variable. Each layer's own tree is kept ([`Layers`]) to say where a value came
//! from, for `app check` and for errors: a bad value is one line naming the key and the file
//! and line, the flag or the variable that set it, and exit code 78 (`EX_CONFIG`).
//!
//! Environment and flags are fixed for the life of the master, so on reload only the file can
//! change anything; a flag or variable keeps overriding it. Everything is validated before a
//! single worker starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use figment::Figment;
use figment::providers::Serialized;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use smart_default::SmartDefault;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AcceptStrategy {
    /// Every worker accepts on the one inherited listening socket.
    #[default]
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

/// Written as text, as on the command line ("0,2-3").
impl Serialize for CpuAffinity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CpuAffinity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
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

/// The schema: every key of the file, with its default, merged and validated.
///
/// Durations are written as text ("500ms", see [`duration`]), sizes as bytes or text
/// ("64KiB", see [`size`]). The fields marked `serde(skip)` are not keys: they are filled
/// by [`Config::load`].
#[derive(Debug, Clone, PartialEq, SmartDefault, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The file named by `--config` / `APP_CONFIG`.
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
    /// Pool size, 1..=1024. The default is computed by [`Config::load`]: the CPUs the master
    /// may run on, or the length of a `cpu_affinity` list.
    #[default(1)]
    pub workers: usize,
    /// Address bound when no socket is passed in by systemd.
    #[default(SocketAddr::from(([127, 0, 0, 1], 8080)))]
    #[serde(deserialize_with = "address::deserialize")]
    pub bind: SocketAddr,
    /// Where to serve the pool's metrics when systemd passes no socket named `metrics`.
    #[serde(deserialize_with = "address::deserialize_opt")]
    pub metrics: Option<SocketAddr>,
    /// Where to answer HAProxy's `agent-check` when systemd passes no socket named `agent`.
    #[serde(deserialize_with = "address::deserialize_opt")]
    pub agent: Option<SocketAddr>,
    /// Log level or filter (RUST_LOG syntax).
    #[default("info".to_string())]
    pub log_level: String,
    /// How workers get connections.
    pub accept: AcceptStrategy,
    /// Grace period for in-flight requests on stop.
    #[default(Duration::from_secs(30))]
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
    /// On a graceful stop, how long the readiness endpoint answers 503 (and the agent
    /// `drain`) while everything else is still served, before the workers stop accepting.
    #[serde(with = "duration")]
    pub drain_delay: Duration,
    /// Grace period for a retiring worker's in-flight requests.
    #[default(Duration::from_secs(5))]
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
    /// How long a new worker or generation may take to become ready.
    #[default(Duration::from_secs(10))]
    #[serde(with = "duration")]
    pub ready_timeout: Duration,
    /// Interval between heartbeats to each worker.
    #[default(Duration::from_secs(1))]
    #[serde(with = "duration")]
    pub heartbeat_interval: Duration,
    /// Missed heartbeats in a row after which a worker is killed.
    #[default(3)]
    pub heartbeat_misses: u32,
    /// Unplanned worker restarts allowed within `restart_window` before the master gives up.
    #[default(10)]
    pub restart_limit: u32,
    /// Window for `restart_limit`.
    #[default(Duration::from_secs(60))]
    #[serde(with = "duration")]
    pub restart_window: Duration,
    /// A worker up this long resets its slot's backoff.
    #[default(Duration::from_secs(1))]
    #[serde(with = "duration")]
    pub min_uptime: Duration,
    /// Recycle a worker whose memory (PSS, else RSS) passes this; 0 = off.
    #[serde(with = "size")]
    pub max_memory: u64,
    /// Recycle a worker after this many requests; 0 = off.
    pub max_requests: u64,
    /// Random extra requests (0..=N) added to `max_requests` per worker.
    pub max_requests_jitter: u64,
    /// Control socket path (default: see the README, "Control socket").
    pub control_socket: Option<PathBuf>,
    /// Enable the /chaos/* demo routes (hang, panic, leak).
    pub chaos: bool,
    /// `--chaos-boot-crash`: every worker crashes while booting (a flag only).
    #[serde(skip)]
    pub chaos_boot_crash: bool,
    /// Where workers run: auto, pin, none, or a CPU list like "0,2-3".
    pub cpu_affinity: CpuAffinity,
    /// Workers' NUMA memory policy.
    pub numa: NumaPolicy,
    /// `[http]`: limits of each worker's HTTP server.
    pub http: HttpLimits,
    /// `[tls]` as written; `None`: plain HTTP.
    #[serde(rename = "tls")]
    pub tls_table: Option<TlsTable>,
    /// `[tls]` with its pair checked and its paths resolved (see [`crate::tls`]).
    #[serde(skip)]
    pub tls: Option<crate::tls::TlsSettings>,
    /// The `[service]` table as written, checked by the user's settings type and handed to
    /// every worker.
    #[default(toml::Value::Table(toml::Table::new()))]
    pub service: toml::Value,
}

/// `[http]`: limits applied by the worker's server setup, around the user's service.
///
/// Also sent to every worker (see `crate::ipc`, which keeps the first four timeouts in the
/// form the channel first carried them). `serde(default)` lets a worker read the table from a
/// master that knew fewer keys.
#[derive(Debug, Clone, PartialEq, SmartDefault, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// A client must finish sending request headers within this time.
    #[default(Duration::from_secs(10))]
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// A keep-alive connection idle this long between requests is closed.
    #[default(Duration::from_secs(75))]
    #[serde(with = "duration")]
    pub keepalive_timeout: Duration,
    /// Largest request head (request line + headers) in bytes; larger gets 431.
    #[default(16 * 1024)]
    #[serde(with = "size")]
    pub max_header_bytes: usize,
    /// Largest request body in bytes; larger gets 413.
    #[default(1 << 20)]
    #[serde(with = "size")]
    pub max_body_bytes: u64,
    /// Concurrent connections one worker serves; above it the worker stops accepting.
    #[default(10_000)]
    pub max_connections: usize,
    /// Most header fields in one request head; more gets 431.
    #[default(100)]
    pub max_headers: usize,
    /// A request body the service is waiting for must deliver data within this time, and
    /// `Expect: 100-continue` with no body is cut after it too.
    #[default(Duration::from_secs(15))]
    #[serde(with = "duration")]
    pub body_read_timeout: Duration,
    /// Once a body has been read for `body_read_timeout`, its average rate must be at least
    /// this many bytes per second (a trickle is cut); 0 turns the check off.
    #[default(240)]
    #[serde(with = "size")]
    pub min_body_rate: u64,
    /// Body bytes a worker holds for requests whose bodies are still arriving, summed over
    /// its connections; a body that would pass it fails (503), so stalled uploads cannot pin
    /// memory.
    #[default(64 << 20)]
    #[serde(with = "size")]
    pub max_pending_body_bytes: u64,
    /// A connection whose peer accepts no bytes for this long is closed (a client that
    /// stops reading its responses).
    #[default(Duration::from_secs(30))]
    #[serde(with = "duration")]
    pub send_timeout: Duration,
    /// Log every request (method, path, status, bytes, duration) as the `access` target.
    pub access_log: bool,
    /// The fraction of requests the access log records, 0.0 to 1.0.
    #[default(1.0)]
    pub access_log_sample: f64,
    /// The path the worker layer answers with the pool's readiness; "" turns it off.
    #[default(DEFAULT_READY_PATH.to_string())]
    pub ready_path: String,
}

impl HttpLimits {
    /// `ready_path`, or `None` when it is off.
    pub fn ready_path(&self) -> Option<String> {
        Some(self.ready_path.clone()).filter(|p| !p.is_empty())
    }
}

/// `[tls]` as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsTable {
    /// Certificate chain, PEM, leaf first; `credential:NAME` = `$CREDENTIALS_DIRECTORY/NAME`.
    pub cert: String,
    /// Private key, PEM.
    pub key: String,
    /// `FileDescriptorName=`s of the sockets that speak TLS; absent: every socket.
    pub sockets: Option<Vec<String>>,
}

/// Flags of `app serve`. Every value also reads from `APP_<KEY>`; all are optional so that
/// the file and the defaults can fill what is not given.
///
/// Each field is named after its key in the configuration schema (a test checks), and
/// serializes to the flag layer: what was given, in the file's form.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct ServeArgs {
    /// TOML configuration file (re-read on reload).
    #[arg(long, env = "APP_CONFIG", value_name = "FILE")]
    #[serde(skip)]
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
    #[serde(serialize_with = "duration::serialize_opt")]
    pub shutdown_timeout: Option<Duration>,
    /// On stop, answer the readiness endpoint with 503 for this long before draining [default: 0s].
    #[arg(long, env = "APP_DRAIN_DELAY", value_parser = parse_duration, value_name = "DURATION")]
    #[serde(serialize_with = "duration::serialize_opt")]
    pub drain_delay: Option<Duration>,
    /// Grace period for a retiring worker's in-flight requests [default: 5s].
    #[arg(long, env = "APP_DRAIN_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    #[serde(serialize_with = "duration::serialize_opt")]
    pub drain_timeout: Option<Duration>,
    /// How long a new generation may take to become ready on reload [default: 10s].
    #[arg(long, env = "APP_READY_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    #[serde(serialize_with = "duration::serialize_opt")]
    pub ready_timeout: Option<Duration>,
    /// Interval between heartbeats to each worker [default: 1s].
    #[arg(long, env = "APP_HEARTBEAT_INTERVAL", value_parser = parse_duration, value_name = "DURATION")]
    #[serde(serialize_with = "duration::serialize_opt")]
    pub heartbeat_interval: Option<Duration>,
    /// Missed heartbeats in a row after which a worker is killed [default: 3].
    #[arg(long, env = "APP_HEARTBEAT_MISSES", value_name = "N")]
    pub heartbeat_misses: Option<u32>,
    /// Worker restarts allowed within --restart-window before the master gives up [default: 10].
    #[arg(long, env = "APP_RESTART_LIMIT", value_name = "N")]
    pub restart_limit: Option<u32>,
    /// Window for --restart-limit [default: 60s].
    #[arg(long, env = "APP_RESTART_WINDOW", value_parser = parse_duration, value_name = "DURATION")]
    #[serde(serialize_with = "duration::serialize_opt")]
    pub restart_window: Option<Duration>,
    /// A worker up this long resets its slot's backoff [default: 1s].
    #[arg(long, env = "APP_MIN_UPTIME", value_parser = parse_duration, value_name = "DURATION")]
    #[serde(serialize_with = "duration::serialize_opt")]
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
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub chaos: bool,
    /// Make every worker crash while booting (demonstrates the restart budget).
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub chaos_boot_crash: bool,
    /// Where workers run: auto, pin, none, or a CPU list like 0,2-3 [default: auto].
    #[arg(long, env = "APP_CPU_AFFINITY", value_name = "POLICY")]
    pub cpu_affinity: Option<CpuAffinity>,
    /// Workers' NUMA memory policy [default: local].
    #[arg(long, env = "APP_NUMA", value_enum)]
    pub numa: Option<NumaPolicy>,
}

/// Every key of the schema, `table.key` inside a table, in the schema's order. `service` is
/// one key: its table belongs to the user's settings type.
pub fn keys() -> Vec<String> {
    use serde_aux::serde_introspection::serde_introspect;
    let mut keys = Vec::new();
    for &key in serde_introspect::<Config>() {
        let table = match key {
            "http" => serde_introspect::<HttpLimits>(),
            "tls" => serde_introspect::<TlsTable>(),
            _ => {
                keys.push(key.to_string());
                continue;
            }
        };
        keys.extend(table.iter().map(|k| format!("{key}.{k}")));
    }
    keys
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
    pub key: String,
    pub value: serde_json::Value,
    pub source: Source,
}

/// What the file and the flags each set, kept to say where a value came from.
struct Layers {
    file: Option<FileLayer>,
    /// What clap filled from the flags and the environment.
    flags: serde_json::Map<String, serde_json::Value>,
}

struct FileLayer {
    /// `None` for text given directly (tests).
    path: Option<PathBuf>,
    text: String,
    table: toml::Table,
}

impl Layers {
    /// The file named by `--config`, if any, and the flags.
    fn read(args: &ServeArgs) -> Result<Layers, Fatal> {
        let file = match &args.config {
            Some(path) => {
                let text = read_file(path)?;
                let table = parse_file(&text)
                    .map_err(|e| Fatal::config(format!("config error: {}: {e}", path.display())))?;
                Some(FileLayer {
                    path: Some(path.clone()),
                    text,
                    table,
                })
            }
            None => None,
        };
        Layers::new(args, file)
    }

    fn new(args: &ServeArgs, file: Option<FileLayer>) -> Result<Layers, Fatal> {
        // Fails only for a path that is not UTF-8, which no layer can carry.
        let flags = match serde_json::to_value(args) {
            Ok(serde_json::Value::Object(map)) => map,
            Ok(_) => serde_json::Map::new(),
            Err(e) => return Err(Fatal::config(format!("config error: flags: {e}"))),
        };
        Ok(Layers {
            file,
            // A flag not given is `None`: not part of the layer.
            flags: flags.into_iter().filter(|(_, v)| !v.is_null()).collect(),
        })
    }

    /// Where `key` ("table.key" inside a table) got its value.
    ///
    /// A value in `ServeArgs` is a flag when the process's own arguments name the flag, else
    /// an environment variable (clap fills both into the same field).
    fn source(&self, key: &str) -> Source {
        if self.flags.contains_key(key) {
            let flag = format!("--{}", key.replace('_', "-"));
            let named = std::env::args_os().any(|a| {
                let a = a.to_string_lossy();
                a == flag || a.starts_with(&format!("{flag}="))
            });
            let env = std::env::var_os(env_name(key)).is_some();
            return if named || !env {
                Source::Flag
            } else {
                Source::Env
            };
        }
        let in_file = self.file.as_ref().is_some_and(|f| {
            let mut path = key.split('.');
            let mut value = path.next().and_then(|k| f.table.get(k));
            for k in path {
                value = value.and_then(|v| v.get(k));
            }
            value.is_some()
        });
        if in_file {
            Source::File
        } else {
            Source::Default
        }
    }

    /// A configuration error: the key, the reason, and where the value was written.
    fn invalid(&self, key: &str, reason: impl std::fmt::Display) -> Fatal {
        Fatal::config(format!("config error: {key}: {reason}{}", self.place(key)))
    }

    /// Where `key` was written, as the end of an error: " (flag --workers)",
    /// " (environment APP_WORKERS)", " (/etc/app/app.toml, line 3)"; nothing for a default.
    fn place(&self, key: &str) -> String {
        match self.source(key) {
            Source::Flag => format!(" (flag --{})", key.replace('_', "-")),
            Source::Env => format!(" (environment {})", env_name(key)),
            Source::File => {
                let file = self.file.as_ref().expect("a file set it");
                let line = line_of(&file.text, key).map(|n| format!("line {n}"));
                let path = file.path.as_ref().map(|p| p.display().to_string());
                let parts: Vec<String> = path.into_iter().chain(line).collect();
                format!(" ({})", parts.join(", "))
            }
            Source::Default => String::new(),
        }
    }

    /// A deserialization error, named by its key path.
    fn figment_error(&self, e: figment::Error) -> Fatal {
        use figment::error::Kind;
        let one_of = |names: &[&str]| {
            let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
            quoted.join(", ")
        };
        let key = e.path.join(".");
        match &e.kind {
            // The path names the table; the key is missing from it.
            Kind::MissingField(field) => Fatal::config(format!(
                "config error: {key}.{field}: missing{}",
                self.place(&key)
            )),
            Kind::UnknownField(_, expected) => self.invalid(
                &key,
                format!("unknown key, expected one of {}", one_of(expected)),
            ),
            Kind::UnknownVariant(v, expected) => self.invalid(
                &key,
                format!(
                    "unknown variant `{v}`, expected one of {}",
                    one_of(expected)
                ),
            ),
            kind => self.invalid(&key, kind),
        }
    }
}

fn env_name(key: &str) -> String {
    format!("APP_{}", key.to_ascii_uppercase())
}

/// The line on which `key` ("table.key") is written in `text`.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let root = toml::de::DeTable::parse(text).ok()?;
    let mut table = root.get_ref();
    let mut start = None;
    let mut path = key.split('.').peekable();
    while let Some(name) = path.next() {
        let (k, v) = table.iter().find(|(k, _)| k.get_ref() == name)?;
        start = Some(k.span().start);
        if path.peek().is_some() {
            match v.get_ref() {
                toml::de::DeValue::Table(t) => table = t,
                _ => return None,
            }
        }
    }
    Some(text[..start?.min(text.len())].matches('\n').count() + 1)
}

impl Config {
    /// Merges defaults, file, environment and flags (see the module docs) and validates.
    /// `default_workers` is the number of CPUs the process may run on.
    pub fn load(
        args: &ServeArgs,
        default_workers: usize,
        check: SettingsCheck,
    ) -> Result<Config, Fatal> {
        Self::merge(args, Layers::read(args)?, default_workers, check).map(|(c, _)| c)
    }

    fn merge(
        args: &ServeArgs,
        layers: Layers,
        default_workers: usize,
        check: SettingsCheck,
    ) -> Result<(Config, Layers), Fatal> {
        let defaults = Config {
            workers: default_workers,
            ..Config::default()
        };
        let mut figment = Figment::from(Serialized::defaults(defaults));
        if let Some(file) = &layers.file {
            figment = figment.merge(Serialized::defaults(&file.table));
        }
        let figment = figment.merge(Serialized::defaults(&layers.flags));
        let mut cfg: Config = figment.extract().map_err(|e| layers.figment_error(e))?;
        cfg.config_file = args.config.clone();
        cfg.chaos_boot_crash = args.chaos_boot_crash;
        // An explicit CPU list sizes the default pool like the CPUs the master may use.
        if let (CpuAffinity::List(l), Source::Default) =
            (&cfg.cpu_affinity, layers.source("workers"))
        {
            cfg.workers = l.len();
        }
        cfg.validate(&layers)?;
        if let Some(t) = &cfg.tls_table {
            cfg.tls = Some(t.check(&layers)?);
        }
        check(&cfg.service).map_err(|e| layers.invalid("service", e))?;
        Ok((cfg, layers))
    }

    /// The bounds a key's type does not already give: one `check` per rule.
    fn validate(&self, layers: &Layers) -> Result<(), Fatal> {
        let check = |ok: bool, key: &str, reason: String| {
            if ok {
                Ok(())
            } else {
                Err(layers.invalid(key, reason))
            }
        };
        let http = &self.http;
        check(
            (1..=crate::loadboard::MAX_WORKERS).contains(&self.workers),
            "workers",
            format!(
                "must be between 1 and {} (got {})",
                crate::loadboard::MAX_WORKERS,
                self.workers
            ),
        )?;
        if let Err(e) = self
            .log_level
            .parse::<tracing_subscriber::filter::Targets>()
        {
            let reason = format!("{:?} is not a level or filter ({e})", self.log_level);
            return Err(layers.invalid("log_level", reason));
        }
        for (key, d) in [
            ("shutdown_timeout", self.shutdown_timeout),
            ("drain_timeout", self.drain_timeout),
            ("ready_timeout", self.ready_timeout),
            ("restart_window", self.restart_window),
            ("http.header_read_timeout", http.header_read_timeout),
            ("http.keepalive_timeout", http.keepalive_timeout),
            ("http.body_read_timeout", http.body_read_timeout),
            ("http.send_timeout", http.send_timeout),
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
            self.max_memory == 0 || self.max_memory >= 1 << 20,
            "max_memory",
            format!(
                "must be 0 (off) or at least 1MiB (got {} bytes)",
                self.max_memory
            ),
        )?;
        check(self.service.is_table(), "service", "must be a table".into())?;
        check(
            http.max_header_bytes >= 1024,
            "http.max_header_bytes",
            format!("must be at least 1024 (got {})", http.max_header_bytes),
        )?;
        check(
            (1..=1_000_000).contains(&http.max_connections),
            "http.max_connections",
            format!(
                "must be between 1 and 1000000 (got {})",
                http.max_connections
            ),
        )?;
        check(
            (0.0..=1.0).contains(&http.access_log_sample),
            "http.access_log_sample",
            format!(
                "must be between 0.0 and 1.0 (got {})",
                http.access_log_sample
            ),
        )?;
        check(
            (1..=10_000).contains(&http.max_headers),
            "http.max_headers",
            format!("must be between 1 and 10000 (got {})", http.max_headers),
        )?;
        check(
            http.max_pending_body_bytes >= http.max_body_bytes.min(1 << 20),
            "http.max_pending_body_bytes",
            format!(
                "must be at least max_body_bytes or 1MiB, whichever is smaller (got {})",
                http.max_pending_body_bytes
            ),
        )?;
        // Compared with the request's path as is: no query, nothing to normalise.
        let p = &http.ready_path;
        check(
            p.is_empty()
                || (p.starts_with('/')
                    && p.len() <= 256
                    && !p.contains(['?', '#'])
                    && p.bytes().all(|b| b.is_ascii_graphic())),
            "http.ready_path",
            format!(
                "must be \"\" (off) or a path starting with / of at most 256 printable ASCII characters, without ? or # (got {p:?})"
            ),
        )?;
        Ok(())
    }

    /// [`Config::load`], and for every key its effective value and where it came from.
    pub fn explain(
        args: &ServeArgs,
        default_workers: usize,
        check: SettingsCheck,
    ) -> Result<(Config, Vec<Entry>), Fatal> {
        let (cfg, layers) = Self::merge(args, Layers::read(args)?, default_workers, check)?;
        let all = serde_json::to_value(&cfg).unwrap_or_default();
        let entries = keys()
            .into_iter()
            .map(|key| Entry {
                value: all
                    .pointer(&format!("/{}", key.replace('.', "/")))
                    .cloned()
                    .unwrap_or_default(),
                source: layers.source(&key),
                key,
            })
            .collect();
        Ok((cfg, entries))
    }
}

impl TlsTable {
    /// Resolves `credential:` paths and checks the pair, as the master does on every load.
    fn check(&self, layers: &Layers) -> Result<crate::tls::TlsSettings, Fatal> {
        let cert =
            crate::tls::resolve_path(&self.cert).map_err(|e| layers.invalid("tls.cert", e))?;
        let key = crate::tls::resolve_path(&self.key).map_err(|e| layers.invalid("tls.key", e))?;
        if self.sockets.as_ref().is_some_and(Vec::is_empty) {
            return Err(layers.invalid(
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

/// Parses "250ms", "5s", "1m 30s" (humantime syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?} ({e}); write e.g. \"500ms\" or \"5s\""))
}

/// Parses a number of bytes ("4096") or a size with a unit (`bytesize`'s syntax, e.g.
/// "64KiB", "1.5 GB"): KB, MB, GB are powers of 1000, KiB, MiB, GiB powers of 1024, and
/// a bare K, M, G means KiB, MiB, GiB, as systemd reads them.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let err = || format!("invalid size {s:?}; write e.g. \"65536\", \"64KiB\" or \"256MiB\"");
    let t = s.trim();
    let binary = t.ends_with(['k', 'K', 'm', 'M', 'g', 'G'])
        && t[..t.len() - 1].ends_with(|c: char| c.is_ascii_digit() || c.is_whitespace());
    let t = if binary {
        format!("{t}i")
    } else {
        t.to_string()
    };
    match t.parse::<bytesize::ByteSize>() {
        // bytesize saturates on overflow: no size this large is meant.
        Ok(n) if n.as_u64() < u64::MAX => Ok(n.as_u64()),
        _ => Err(err()),
    }
}

/// Socket addresses: an error quotes the text.
mod address {
    use super::*;

    fn parse<E: serde::de::Error>(s: &str) -> Result<SocketAddr, E> {
        s.parse()
            .map_err(|e| E::custom(format!("{s:?} is not an address:port ({e})")))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        parse(&String::deserialize(d)?)
    }

    pub fn deserialize_opt<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| parse(&s))
            .transpose()
    }
}

/// Durations as the configuration writes them: text ("5s"), at most 24 hours so that deadline
/// arithmetic (now + timeout) can never overflow.
mod duration {
    use super::*;

    const MAX: Duration = Duration::from_secs(24 * 3600);

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn serialize_opt<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = Duration;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a duration like \"500ms\" or \"5s\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Duration, E> {
                let d = parse_duration(s).map_err(E::custom)?;
                if d > MAX {
                    let got = humantime::format_duration(d);
                    return Err(E::custom(format!("must be at most 24h (got {got})")));
                }
                Ok(d)
            }
        }
        d.deserialize_str(Text)
    }
}

/// Sizes as the configuration writes them: a number of bytes, or text (see [`parse_size`]).
mod size {
    use super::*;
    use serde::de::{self, Unexpected, Visitor};

    pub fn serialize<T: Serialize, S: Serializer>(n: &T, s: S) -> Result<S::Ok, S::Error> {
        n.serialize(s)
    }

    pub fn deserialize<'de, T: TryFrom<u64>, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        struct Bytes;
        impl Visitor<'_> for Bytes {
            type Value = u64;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of bytes or a size like \"64KiB\"")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<u64, E> {
                Ok(n)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<u64, E> {
                u64::try_from(n).map_err(|_| E::invalid_value(Unexpected::Signed(n), &self))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<u64, E> {
                parse_size(s).map_err(E::custom)
            }
        }
        let n = d.deserialize_any(Bytes)?;
        T::try_from(n).map_err(|_| de::Error::custom(format!("{n} is too large")))
    }
}

/// Largest config file read.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Reads the config file's text; errors name the file.
///
/// The master reads it on its loop at every reload, so the read must not block: the file is
/// opened with `O_NONBLOCK` (opening a FIFO for reading would otherwise wait for a writer),
/// must be a regular file, and is read up to [`MAX_FILE_BYTES`].
fn read_file(path: &Path) -> Result<String, Fatal> {
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
    String::from_utf8(bytes).map_err(|_| cannot(&"not valid UTF-8"))
}

/// The file's TOML syntax; an error names the line.
fn parse_file(text: &str) -> Result<toml::Table, String> {
    toml::from_str::<toml::Table>(text).map_err(|e| {
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

/// The file's text alone (no flags, no environment) through the same merge and validation.
#[cfg(test)]
pub fn from_text(text: &str, default_workers: usize) -> Result<Config, Fatal> {
    load_text(text, &ServeArgs::default(), default_workers)
}

#[cfg(test)]
fn load_text(text: &str, args: &ServeArgs, default_workers: usize) -> Result<Config, Fatal> {
    let table = parse_file(text).map_err(Fatal::config)?;
    let file = FileLayer {
        path: None,
        text: text.to_string(),
        table,
    };
    let layers = Layers::new(args, Some(file))?;
    Config::merge(args, layers, default_workers, any_settings).map(|(c, _)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, args: ServeArgs) -> Result<Config, Fatal> {
        load_text(toml, &args, 2)
    }

    #[test]
    fn defaults_are_valid() {
        let c = load("", ServeArgs::default()).unwrap();
        assert_eq!(c.workers, 2);
        assert_eq!(c.drain_timeout, Duration::from_secs(5));
        assert_eq!(c.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(c.http.ready_path(), Some(DEFAULT_READY_PATH.to_string()));
    }

    #[test]
    fn flags_override_file() {
        let args = ServeArgs {
            workers: Some(3),
            drain_delay: Some(Duration::from_millis(1500)),
            chaos: false,
            ..Default::default()
        };
        let c = load(
            "workers = 5\ndrain_timeout = \"2s\"\ndrain_delay = \"1s\"\nchaos = true\n",
            args,
        )
        .unwrap();
        assert_eq!(c.workers, 3);
        assert_eq!(c.drain_timeout, Duration::from_secs(2));
        assert_eq!(c.drain_delay, Duration::from_millis(1500));
        assert!(c.chaos, "a flag not given leaves the file's value");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = load("workers = 2\nwrokers = 3\n", ServeArgs::default()).unwrap_err();
        assert_eq!(e.code, crate::exit::CONFIG);
        assert!(e.message.contains("line 2"), "{}", e.message);
        assert!(e.message.contains("wrokers"), "{}", e.message);
        let e = load("[http]\n\nmax_hedaers = 3\n", ServeArgs::default()).unwrap_err();
        assert!(
            e.message
                .starts_with("config error: http.max_hedaers: unknown key")
                && e.message.ends_with("(line 3)"),
            "{}",
            e.message
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        for (toml, key) in [
            ("workers = 0", "workers"),
            ("workers = \"3\"", "workers"),
            ("drain_timeout = \"soon\"", "drain_timeout"),
            ("drain_timeout = 5", "drain_timeout"),
            ("drain_delay = \"25h\"", "drain_delay"),
            ("max_memory = \"12 parsecs\"", "max_memory"),
            ("max_memory = -1", "max_memory"),
            ("bind = \"nowhere\"", "bind"),
            ("heartbeat_interval = \"1ms\"", "heartbeat_interval"),
            ("service = 3", "service"),
            ("[http]\nmax_header_bytes = 10", "http.max_header_bytes"),
            (
                "[http]\nmax_header_bytes = \"1.5x\"",
                "http.max_header_bytes",
            ),
            ("[tls]\ncert = \"a\"", "tls.key"),
        ] {
            let e = load(toml, ServeArgs::default()).unwrap_err();
            let line = toml.lines().count();
            assert!(
                e.message.starts_with(&format!("config error: {key}:"))
                    && (key == "tls.key" || e.message.ends_with(&format!("(line {line})"))),
                "{toml}: {}",
                e.message
            );
        }
    }

    /// A value from a flag or the environment names the flag or the variable.
    #[test]
    fn errors_name_the_flag_or_variable() {
        let args = ServeArgs {
            workers: Some(0),
            ..Default::default()
        };
        let e = load("workers = 2", args).unwrap_err();
        assert!(e.message.starts_with("config error: workers: "), "{e}");
        // The test binary's own arguments name no --workers: the environment's, or a
        // program's own value, reads as a flag unless APP_WORKERS is set.
        assert!(
            e.message.ends_with("(flag --workers)")
                || e.message.ends_with("(environment APP_WORKERS)"),
            "{e}"
        );
    }

    #[test]
    fn sizes_mb_is_decimal_mib_binary() {
        for (text, bytes) in [
            ("0", 0),
            ("10", 10),
            ("10B", 10),
            ("64KiB", 65536),
            ("64 kib", 65536),
            ("256MiB", 256 << 20),
            ("1GiB", 1 << 30),
            ("1KB", 1000),
            ("2MB", 2_000_000),
            ("1GB", 1_000_000_000),
            ("1.5MiB", 3 << 19),
            // A bare K, M, G is binary, as systemd reads it (and as this key always did).
            ("64K", 65536),
            ("2M", 2 << 20),
            ("1 G", 1 << 30),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for bad in [
            "-1",
            "",
            "MiB",
            "12 parsecs",
            "99999999999999999999G",
            "1e3",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        let c = load(
            "max_memory = \"2MB\"\n[http]\nmax_body_bytes = 1000\nmax_pending_body_bytes = \"3MiB\"",
            ServeArgs::default(),
        )
        .unwrap();
        assert_eq!(c.max_memory, 2_000_000);
        assert_eq!(c.http.max_body_bytes, 1000);
        assert_eq!(c.http.max_pending_body_bytes, 3 << 20);
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
            ("numa = \"far\"", "numa: unknown variant `far`"),
        ] {
            let e = load(bad, ServeArgs::default()).unwrap_err();
            assert!(
                e.message.contains(word) && e.message.ends_with("(line 1)"),
                "{}",
                e.message
            );
        }
        assert_eq!(CpuAffinity::List(vec![0, 1, 3]).to_string(), "0-1,3");
    }

    /// `[service]` reaches the settings type as written, TOML dates included.
    #[test]
    fn service_table_is_kept_as_written() {
        let c = load(
            "[service]\nat = 1979-05-27T07:32:00Z\nlist = [1, \"a\"]\n[service.deep]\nx = 1.5\n",
            ServeArgs::default(),
        )
        .unwrap();
        let expected: toml::Value =
            toml::from_str("at = 1979-05-27T07:32:00Z\nlist = [1, \"a\"]\n[deep]\nx = 1.5\n")
                .unwrap();
        assert_eq!(c.service, expected);
    }

    /// Each flag is a key of the schema, spelled `--key-name`, read from `APP_KEY_NAME`.
    #[test]
    fn flags_are_schema_keys() {
        use clap::CommandFactory;
        #[derive(clap::Parser)]
        struct Probe {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let keys = keys();
        let cmd = Probe::command();
        let flags: Vec<_> = cmd
            .get_arguments()
            .filter(|a| !matches!(a.get_id().as_str(), "config" | "chaos_boot_crash"))
            .collect();
        assert!(flags.len() >= 20);
        for a in flags {
            let key = a.get_id().as_str();
            assert!(keys.iter().any(|k| k == key), "--{key} is no key");
            assert_eq!(a.get_long(), Some(key.replace('_', "-").as_str()));
            let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
            assert_eq!(env, Some(env_name(key)), "{key}");
        }
    }

    /// A README default written as a value (`"30s"`, `1MiB`, `false`) is the schema's.
    fn check_default(key: &str, cell: &str, defaults: &serde_json::Value) {
        use serde_json::Value;
        let Some(written) = cell.strip_prefix('`').and_then(|c| c.split('`').next()) else {
            return; // Words: "none", "CPUs allowed", "see below".
        };
        let actual = defaults
            .pointer(&format!("/{}", key.replace('.', "/")))
            .unwrap_or(&Value::Null);
        let same = match actual {
            Value::String(a) => match (parse_duration(a), parse_duration(written)) {
                (Ok(a), Ok(w)) => a == w,
                _ => written.trim_matches('"') == a,
            },
            Value::Number(a) => match (a.as_u64(), a.as_f64()) {
                (Some(a), _) => parse_size(written) == Ok(a),
                (None, Some(a)) => written.parse::<f64>() == Ok(a),
                _ => false,
            },
            other => serde_json::from_str::<Value>(written).ok().as_ref() == Some(other),
        };
        assert!(
            same || key == "service",
            "{key}: README {written}, schema {actual}"
        );
    }

    /// The README's configuration table lists exactly the schema's keys, for each key
    /// exactly the flag (and variable) that sets it, and the schema's default.
    #[test]
    fn readme_table_matches_the_schema() {
        use clap::CommandFactory;
        #[derive(clap::Parser)]
        struct Probe {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let readme = include_str!("../README.md");
        let section = readme
            .split("\n## Configuration\n")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("README has a Configuration section");
        let mut rows = Vec::new();
        for line in section.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells[1].replace('`', "");
            let key = match name.strip_prefix('[').and_then(|n| n.split_once("] ")) {
                // The user's own table: one key of app's.
                Some(("service", _)) => "service".to_string(),
                Some((table, key)) => format!("{table}.{key}"),
                None => name,
            };
            if !rows
                .iter()
                .any(|(k, _, _): &(String, String, String)| *k == key)
            {
                rows.push((key, cells[2].to_string(), cells[3].to_string()));
            }
        }
        let mut listed: Vec<&str> = rows.iter().map(|(k, _, _)| k.as_str()).collect();
        let mut keys = keys();
        listed.sort();
        keys.sort();
        assert_eq!(listed, keys, "README rows vs schema keys");
        let cmd = Probe::command();
        let defaults = serde_json::to_value(Config::default()).unwrap();
        for (key, cell, default) in &rows {
            check_default(key, default, &defaults);
            let flag = cmd.get_arguments().find(|a| a.get_id().as_str() == key);
            let written: Vec<String> = cell
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect();
            match flag {
                None => assert!(written.is_empty(), "{key}: README names {written:?}"),
                Some(a) => {
                    let long = format!("--{}", a.get_long().unwrap());
                    assert_eq!(written.first(), Some(&long), "{key}");
                    if let Some(env) = written.get(1) {
                        assert_eq!(*env, env_name(key), "{key}");
                    }
                }
            }
        }
    }
}
