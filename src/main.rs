//! `app`: a systemd-native, socket-activated prefork service.
//!
//! One binary, four roles: `serve` (the master), `worker` (started by the master, hidden),
//! and the operator's clients `status` and `reload`. See README.md for the picture.

mod config;
mod control;
mod exit;
#[cfg(test)]
mod fuzz;
mod handoff;
mod ipc;
mod listen;
mod loadboard;
mod logging;
mod master;
mod notify;
mod service;
mod shutdown;
mod worker;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use config::{Config, ServeArgs};
use exit::Fatal;

#[derive(Debug, Parser)]
#[command(
    name = "app",
    version,
    about = "A systemd-native, socket-activated prefork service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the master: take or bind the socket, start and supervise the workers.
    Serve(Box<ServeArgs>),
    /// Ask the running master for a graceful rollover and wait until it is done.
    Reload(ClientArgs),
    /// Show the running pool.
    Status {
        #[command(flatten)]
        client: ClientArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct ClientArgs {
    /// Control socket of the master [default: see README, "Control socket"].
    #[arg(long, env = "APP_CONTROL_SOCKET", value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Give up waiting for the master's reply after this long [default: 10s for status, 5m for reload].
    #[arg(long, env = "APP_CONTROL_TIMEOUT", value_name = "DURATION", value_parser = control::parse_timeout)]
    timeout: Option<std::time::Duration>,
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                std::process::exit(exit::OK);
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
            std::process::exit(exit::USAGE);
        }
    };
    let code = match cli.command {
        Command::Serve(args) => match serve(*args) {
            Ok(code) => code,
            Err(f) => {
                eprintln!("app: {f}");
                f.code
            }
        },
        Command::Worker(args) => worker::run(args),
        Command::Reload(c) => client_reload(c),
        Command::Status { client, json } => client_status(client, json),
    };
    std::process::exit(code);
}

fn serve(args: ServeArgs) -> Result<i32, Fatal> {
    let cpus = master::spawn::allowed_cpus();
    let config = Config::load(&args, cpus.len())?;
    logging::init(&config.log_level, logging::Identity::Master);
    // Both read and scrub the environment, so they run before any thread exists.
    let (listeners, activated) = listen::take_or_bind(config.bind)?;
    let notifier = notify::Notifier::from_env();
    tracing::info!(
        "master {} starting {} worker(s) on CPUs {:?}; {}",
        std::process::id(),
        config.workers,
        cpus,
        if activated {
            "sockets from systemd"
        } else {
            "socket bound by hand"
        }
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Fatal::os(format!("cannot build runtime: {e}")))?;
    let master = master::Master::new(args, config, cpus, listeners, notifier)?;
    Ok(rt.block_on(master.run()))
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

fn client_reload(c: ClientArgs) -> i32 {
    match ask(&c, control::Request::Reload, "reload") {
        Ok(r) => {
            println!("{}", r.message.unwrap_or_else(|| "reloaded".into()));
            exit::OK
        }
        Err(code) => code,
    }
}

fn client_status(c: ClientArgs, json: bool) -> i32 {
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
    exit::OK
}
