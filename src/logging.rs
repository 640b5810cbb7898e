//! Where log lines go: natively to journald when stderr is journald's stream, as readable
//! text on stderr otherwise.
//!
//! systemd sets `JOURNAL_STREAM=<dev>:<inode>` for a service whose stderr is connected to
//! the journal; matching it against stderr's own `fstat` (as `sd_journal_stream_fd(3)`
//! advises) tells "running under systemd" apart from "env var inherited into a terminal".
//! Native journald logging keeps structured fields: worker processes stamp every line with
//! `WORKER_ID`, `WORKER_PID`, `CPU` and `GENERATION`, so `journalctl -u app WORKER_ID=1`
//! filters on them. Text mode shows the same facts as a prefix.
//!
//! Levels use `tracing-subscriber`'s `Targets` filter (`info`, `warn,app=debug`): the same
//! syntax as `RUST_LOG` for levels and targets, without the regex engine `EnvFilter` links
//! in, which costs every worker process memory.

use std::os::fd::AsFd;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

/// Who is logging: the master, or one worker.
pub enum Identity {
    Master,
    Worker {
        id: usize,
        pid: u32,
        cpu: usize,
        generation: u64,
    },
}

/// True when stderr is the journal stream systemd set up for us.
pub fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `level`.
pub fn init(level: &str, who: Identity) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<Targets>().ok())
        .or_else(|| level.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));

    if stderr_is_journal()
        && let Ok(layer) = tracing_journald::layer()
    {
        let mut fields: Vec<(&str, String)> = Vec::new();
        if let Identity::Worker {
            id,
            pid,
            cpu,
            generation,
        } = &who
        {
            fields.push(("WORKER_ID", id.to_string()));
            fields.push(("WORKER_PID", pid.to_string()));
            fields.push(("CPU", cpu.to_string()));
            fields.push(("GENERATION", generation.to_string()));
        }
        let layer = layer
            .with_field_prefix(None)
            .with_syslog_identifier("app".into())
            .with_custom_fields(fields);
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(layer)
            .try_init();
        return;
    }

    let prefix = match who {
        Identity::Master => "master".to_string(),
        Identity::Worker {
            id,
            pid,
            cpu,
            generation,
        } => format!("worker {id} (pid {pid}, cpu {cpu}, gen {generation})"),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .event_format(PrefixFormat {
            prefix,
            inner: tracing_subscriber::fmt::format()
                .with_target(false)
                .with_ansi(false),
        });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
}

/// Text format: "<time> <LEVEL> <who>: <message> <fields>".
struct PrefixFormat<F> {
    prefix: String,
    inner: F,
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for PrefixFormat<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "[{}] ", self.prefix)?;
        self.inner.format_event(ctx, writer, event)
    }
}
