//! `app completions SHELL` and `app man [--out DIR]`: shell completions and man pages,
//! generated from the clap definitions of [`Cli`], so they can never disagree with
//! `app --help`. `scripts/install.sh` and `scripts/package.sh` run the built binary to
//! produce what they install.

use std::io::{self, Write};
use std::path::Path;

use clap::CommandFactory;

use crate::cli::Cli;
use crate::exit;

/// `EX_IOERR`: the page or script could not be written.
const IOERR: i32 = 74;

/// Sections of `app(1)` that clap knows nothing of (roff).
const EXTRA_SECTIONS: &str = r#".SH FILES
.TP
\fI/etc/app/app.toml\fR
The configuration file read by the shipped unit (\fBserve \-\-config\fR); re\-read on every reload.
.TP
\fIapp.socket\fR, \fIapp.service\fR
The systemd units: the socket owns the listening socket and starts the service on the first connection.
.TP
\fI/run/app/control.sock\fR
The master's control socket under the shipped unit (\fBapp status\fR, \fBapp reload\fR).
.SH ENVIRONMENT
.TP
\fBAPP_\fR\fIKEY\fR
Every setting of the configuration file, e.g. \fBAPP_WORKERS\fR, \fBAPP_LOG_LEVEL\fR; flags override variables, variables override the file.
.TP
\fBAPP_CONFIG\fR
The configuration file, as \fB\-\-config\fR.
.TP
\fBAPP_CONTROL_SOCKET\fR, \fBAPP_CONTROL_TIMEOUT\fR
Where \fBstatus\fR and \fBreload\fR find the master, and how long they wait.
.TP
\fBLISTEN_FDS\fR, \fBLISTEN_FDNAMES\fR, \fBNOTIFY_SOCKET\fR, \fBWATCHDOG_USEC\fR
Set by systemd: the inherited sockets, readiness and watchdog notifications.
.SH SIGNALS
.TP
\fBTERM\fR, \fBINT\fR
Graceful stop: in\-flight requests finish within shutdown_timeout.
.TP
\fBQUIT\fR
Fast stop.
.TP
\fBHUP\fR
Rollover to a new generation of workers (as \fBapp reload\fR, without waiting).
.TP
\fBTTIN\fR, \fBTTOU\fR
One worker more, one fewer.
.SH "EXIT STATUS"
.TP
\fB0\fR
Clean stop, or the client command succeeded.
.TP
\fB1\fR
\fBapp reload\fR: the reload failed; the old generation still serves.
.TP
\fB64\fR
A flag or APP_* variable could not be parsed.
.TP
\fB69\fR
The restart budget is spent, or the client found no master.
.TP
\fB70\fR
Internal error.
.TP
\fB71\fR
The operating system refused something needed (bind, fork).
.TP
\fB75\fR
Client: no reply within \fB\-\-timeout\fR.
.TP
\fB76\fR
Client: the reply is too long or not JSON.
.TP
\fB77\fR
Client: permission denied on the control socket.
.TP
\fB78\fR
Bad configuration, socket\-activation environment or control\-socket path.
.SH EXAMPLES
.nf
systemctl start app.socket
curl http://127.0.0.1:8080/
systemctl reload app
app status
journalctl \-u app WORKER_ID=0
.fi
.SH "SEE ALSO"
\fBsystemctl\fR(1), \fBjournalctl\fR(1), \fBsystemd.socket\fR(5), \fBsystemd.service\fR(5)
"#;

/// The library's command line, built (subcommands named `app-serve`, ...).
fn command() -> clap::Command {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// `app completions SHELL`: the completion script on stdout.
pub fn completions(shell: clap_complete::Shell) -> i32 {
    let mut cmd = command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "app", &mut out);
    write_stdout(&out)
}

/// `app man`: `app(1)` on stdout, or with `--out DIR` `app.1` and one page per visible
/// subcommand (`app-serve.1`, ...) written into DIR (created if missing).
pub fn man(out: Option<&Path>) -> i32 {
    let result = match out {
        None => main_page().map(|page| write_stdout(&page)),
        Some(dir) => write_pages(dir).map(|()| exit::OK),
    };
    result.unwrap_or_else(|e| {
        let place = out.map_or("stdout".into(), |d| d.display().to_string());
        eprintln!("app: man: {place}: {e}");
        IOERR
    })
}

/// `app(1)`: clap's sections, then [`EXTRA_SECTIONS`], then the version.
fn main_page() -> io::Result<Vec<u8>> {
    let man = clap_mangen::Man::new(command()).manual("app manual");
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    man.render_subcommands_section(&mut page)?;
    page.extend_from_slice(EXTRA_SECTIONS.as_bytes());
    man.render_version_section(&mut page)?;
    Ok(page)
}

fn write_pages(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("app.1"), main_page()?)?;
    let cmd = command();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let mut page = Vec::new();
        let man = clap_mangen::Man::new(sub.clone()).manual("app manual");
        man.render(&mut page)?;
        // every subcommand page points back to the main one
        page.extend_from_slice(b".SH \"SEE ALSO\"\n\\fBapp\\fR(1)\n");
        std::fs::write(dir.join(man.get_filename()), page)?;
    }
    Ok(())
}

/// Writes to stdout; a closed pipe (`app man | head`) is not an error worth a message.
fn write_stdout(bytes: &[u8]) -> i32 {
    let mut stdout = io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => exit::OK,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => exit::OK,
        Err(e) => {
            eprintln!("app: stdout: {e}");
            IOERR
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_cover_every_visible_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        write_pages(dir.path()).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert!(names.contains(&"app.1".to_string()), "{names:?}");
        assert!(names.contains(&"app-serve.1".to_string()), "{names:?}");
        assert!(!names.iter().any(|n| n.starts_with("app-man")), "{names:?}");
        let main = std::fs::read_to_string(dir.path().join("app.1")).unwrap();
        assert!(main.starts_with(".ie \\n(.g .ds Aq") || main.contains(".TH app 1"));
        assert!(main.contains("EXIT STATUS") && main.contains("app\\-reload(1)"));
        assert!(
            !main.contains("app\\-man("),
            "the hidden man command is listed"
        );
    }

    #[test]
    fn completions_name_the_subcommands() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut cmd = command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "app", &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.contains("reload") && text.contains("control-socket"),
                "{shell}"
            );
        }
    }
}
