//! The command line: `serve` (the master), the operator's clients `status` and `reload`, and
//! `completions` / `man` (generated from these definitions, see `manual`).
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
    version,
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
    /// Show the running pool.
    Status {
        /// How to reach the master.
        #[command(flatten)]
        client: ClientArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
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

/// `app status`: the pool as a table, or JSON.
pub fn status(c: ClientArgs, json: bool) -> i32 {
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
