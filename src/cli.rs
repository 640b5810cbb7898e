//! The command line: `serve` (the master), `check` (the configuration, without a master),
//! the operator's clients `status`, `reload`, `scale`, `drain` and `undrain`, and `completions` / `man`
//! (generated from these definitions, see `manual`).
//!
//! [`crate::Server::main`] parses it for a program that has no command line of its own. A
//! program that has one embeds [`Command`] (or just [`ServeArgs`](crate::ServeArgs)) in its
//! own clap definitions and hands the parsed value to
//! [`Server::run_command`](crate::Server::run_command).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::ServeArgs;
use crate::control;
use crate::exit;

/// The command line of a program with no CLI of its own.
#[derive(Debug, Parser)]
#[command(
    name = "app",
    version = crate::version::VERSION,
    about = "A systemd-native, socket-activated prefork service"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// What the library's command line can do; embed it in your own clap `Subcommand` with
/// `#[command(flatten)]`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the master: take or bind the socket, start and supervise the workers.
    Serve(Box<ServeArgs>),
    /// Ask the running master for a graceful rollover and wait until it is done.
    Reload(ClientArgs),
    /// Take this host out of a load balancer's rotation: the readiness endpoint answers 503
    /// and the agent-check `drain`, while every request is still served, until `undrain`.
    Drain(ClientArgs),
    /// Reverse `app drain`: ready again (once every worker serves).
    Undrain(ClientArgs),
    /// Show the running pool.
    Status {
        /// How to reach the master.
        #[command(flatten)]
        client: ClientArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh until interrupted (in place on a terminal; one report after another
        /// otherwise, one JSON object a line with --json).
        #[arg(long)]
        watch: bool,
        /// How often --watch refreshes.
        #[arg(long, value_name = "DURATION", default_value = "1s", requires = "watch", value_parser = crate::config::parse_duration)]
        interval: std::time::Duration,
    },
    /// Check the configuration as the master would (like `nginx -t`) and show every
    /// effective value with where it came from; exit 0, or 78 when it is invalid.
    Check {
        /// The same flags as `serve`; APP_* variables apply too.
        #[command(flatten)]
        serve: Box<ServeArgs>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Resize the running pool now: N workers, or N more (+N) or fewer (-N). Holds until a
    /// reload that changes `workers` in the configuration file.
    Scale {
        /// N, +N or -N.
        #[arg(value_name = "N|+N|-N", allow_hyphen_values = true, value_parser = parse_scale)]
        workers: String,
        /// How to reach the master.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a shell completion script for `app` (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the man page app(1) as roff, or write app.1 and one page per subcommand to DIR.
    #[command(hide = true)]
    Man {
        /// Write app.1, app-serve.1, ... into this directory instead of printing app.1.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

/// `N`, `+N` or `-N` for `app scale`.
fn parse_scale(s: &str) -> Result<String, String> {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if !digits.is_empty() && digits.len() <= 9 && digits.bytes().all(|b| b.is_ascii_digit()) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?}: expected N, +N or -N"))
    }
}

/// How a client finds the master.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Control socket of the master [default: see README, "Control socket"].
    #[arg(long, env = "APP_CONTROL_SOCKET", value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Give up waiting for the master's reply after this long [default: 10s for status, 5m for reload].
    #[arg(long, env = "APP_CONTROL_TIMEOUT", value_name = "DURATION", value_parser = control::parse_timeout)]
    pub timeout: Option<std::time::Duration>,
}

/// Parses the process's arguments; a usage error is one line and exit 64.
pub fn parse() -> Result<Cli, i32> {
    match Cli::try_parse() {
        Ok(c) => Ok(c),
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return Err(exit::OK);
            }
            // One line: clap's first line names the flag and the reason.
            let text = e.render().to_string();
            eprintln!(
                "app: {}",
                text.lines()
                    .next()
                    .unwrap_or("usage error")
                    .trim_start_matches("error: ")
            );
            Err(exit::USAGE)
        }
    }
}

/// Asks the master; a refusal or an unreachable master is reported here, as one line with
/// its exit code, so callers only handle the successful reply.
fn ask(c: &ClientArgs, request: control::Request, what: &str) -> Result<control::Reply, i32> {
    match control::call(c.control_socket.as_deref(), c.timeout, &request) {
        Ok(r) if r.ok => Ok(r),
        Ok(r) => {
            eprintln!(
                "app: {}",
                r.error.unwrap_or_else(|| format!("{what} failed"))
            );
            Err(1)
        }
        Err((code, msg)) => {
            eprintln!("app: {msg}");
            Err(code)
        }
    }
}

/// `app reload`: exit 0 once the new generation serves, 1 with the reason when it failed.
pub fn reload(c: ClientArgs) -> i32 {
    match ask(&c, control::Request::Reload, "reload") {
        Ok(r) => {
            println!("{}", r.message.unwrap_or_else(|| "reloaded".into()));
            exit::OK
        }
        Err(code) => code,
    }
}

/// `app drain` / `app undrain`: the master's answer, exit 0; 1 when refused.
pub fn drain(c: ClientArgs, on: bool) -> i32 {
    let (request, what) = if on {
        (control::Request::Drain, "drain")
    } else {
        (control::Request::Undrain, "undrain")
    };
    match ask(&c, request, what) {
        Ok(r) => {
            println!(
                "{}",
                control::printable(&r.message.unwrap_or_else(|| what.into()))
            );
            exit::OK
        }
        Err(code) => code,
    }
}

/// `app status`: the pool as a table, or JSON; with `watch`, again every `interval`.
pub fn status(c: ClientArgs, json: bool, watch: Option<std::time::Duration>) -> i32 {
    let Some(interval) = watch else {
        let s = match ask(&c, control::Request::Status, "status") {
            Ok(control::Reply {
                status: Some(s), ..
            }) => s,
            Ok(_) => {
                eprintln!("app: the master sent no status");
                return 1;
            }
            Err(code) => return code,
        };
        if json {
            println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
        } else {
            print!("{}", control::render_table(&s));
        }
        return exit::OK;
    };
    watch_status(
        &c,
        json,
        interval.max(std::time::Duration::from_millis(100)),
    )
}

/// `app status --watch`, like `pm2 monit`: on a terminal the screen is redrawn in place,
/// otherwise reports follow each other. Each request is bounded by `--timeout`; an error is
/// shown and the next refresh tries again. Ends on Ctrl-C (or when stdout goes away).
fn watch_status(c: &ClientArgs, json: bool, interval: std::time::Duration) -> i32 {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stdout().is_terminal();
    loop {
        let started = std::time::Instant::now();
        let reply = control::call(
            c.control_socket.as_deref(),
            c.timeout,
            &control::Request::Status,
        );
        let mut frame = String::new();
        if tty {
            // Home, clear the screen: redrawn in place.
            frame.push_str("\x1b[H\x1b[2J");
            frame.push_str(&format!(
                "app status, every {}  (Ctrl-C to quit)\n\n",
                humantime::format_duration(interval)
            ));
        }
        match reply {
            Ok(control::Reply {
                ok: true,
                status: Some(s),
                ..
            }) => {
                if json {
                    frame.push_str(&serde_json::to_string(&s).unwrap_or_default());
                    frame.push('\n');
                } else {
                    frame.push_str(&control::render_table(&s));
                }
            }
            Ok(r) => frame.push_str(&format!(
                "app: {}\n",
                r.error
                    .unwrap_or_else(|| "the master sent no status".into())
            )),
            Err((_, msg)) => frame.push_str(&format!("app: {msg}\n")),
        }
        if !tty && !json {
            frame.push('\n');
        }
        let mut out = std::io::stdout().lock();
        if out
            .write_all(frame.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            return exit::OK;
        }
        drop(out);
        std::thread::sleep(interval.saturating_sub(started.elapsed()));
    }
}

/// `app scale N|+N|-N`.
pub fn scale(c: ClientArgs, workers: &str) -> i32 {
    let request = match workers.as_bytes().first() {
        Some(b'+' | b'-') => control::Request::Scale {
            to: None,
            by: workers.parse().ok(),
        },
        _ => control::Request::Scale {
            to: workers.parse().ok(),
            by: None,
        },
    };
    match ask(&c, request, "scale") {
        Ok(r) => {
            println!("{}", r.message.unwrap_or_else(|| "scaled".into()));
            exit::OK
        }
        Err(code) => code,
    }
}

/// `app check`: loads the configuration as `serve` would, through the program's settings
/// type, and prints every effective value with its source; 0, or 78 (`EX_CONFIG`).
pub fn check(args: &ServeArgs, json: bool, settings: crate::config::SettingsCheck) -> i32 {
    let default_workers = crate::master::spawn::allowed_cpus().len();
    let file = args.config.as_ref().map(|p| p.display().to_string());
    match crate::config::Config::explain(args, default_workers, settings) {
        Ok((_, entries)) => {
            if json {
                let settings: serde_json::Map<String, serde_json::Value> = entries
                    .iter()
                    .map(|e| {
                        (
                            e.key.to_string(),
                            serde_json::json!({ "value": e.value, "source": e.source }),
                        )
                    })
                    .collect();
                let out =
                    serde_json::json!({ "ok": true, "config_file": file, "settings": settings });
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            } else {
                println!(
                    "configuration {}: ok",
                    file.as_deref()
                        .unwrap_or("(no file: defaults, environment and flags)")
                );
                println!("{:<28} {:<24} SOURCE", "KEY", "VALUE");
                for e in &entries {
                    let value = match &e.value {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Null => "-".into(),
                        v => v.to_string(),
                    };
                    let source = serde_json::to_value(e.source).unwrap_or_default();
                    println!(
                        "{:<28} {:<24} {}",
                        e.key,
                        control::printable(&value),
                        source.as_str().unwrap_or("")
                    );
                }
            }
            exit::OK
        }
        Err(f) => {
            if json {
                let out =
                    serde_json::json!({ "ok": false, "config_file": file, "error": f.message });
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            }
            eprintln!("app: {f}");
            f.code
        }
    }
}
