//! The control socket under attack (issue 11): where the master may put it, what it may
//! replace or remove, a second master on the same path, and a client facing a fake,
//! silent, slow or flooding "master".
//!
//! Real processes and real sockets throughout. `APP_TEST_BIN` runs the same tests against
//! another build of the binary (how these were checked to fail before the fix).
//! Some checks need root (to own a directory as another user, or to be another user); they
//! say so on stderr and return early when not root. CI runs as root.

mod common;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const NOBODY: u32 = 65534;

fn app() -> PathBuf {
    std::env::var_os("APP_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(APP))
}

fn root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn skip_unless_root(what: &str) -> bool {
    if root() {
        return false;
    }
    cannot_run(&format!("{what} (needs root)"));
    true
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(uid)).unwrap();
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// What a bounded run of the binary did.
struct Ran {
    /// None: still running at the limit (then killed).
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
    took: Duration,
}

/// Runs `cmd` (its own process group, stdout/stderr to files) for at most `limit`.
fn run_bounded(mut cmd: Command, limit: Duration) -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .env_remove("JOURNAL_STREAM")
        .env_remove("RUST_LOG")
        .process_group(0);
    let t0 = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let status = wait_until(limit, || child.try_wait().ok().flatten());
    let took = t0.elapsed();
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.wait();
    Ran {
        code: status.and_then(|s| s.code()),
        stdout: std::fs::read(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
        took,
    }
}

/// `app serve` by hand on a free port, one worker, with no control-socket environment but
/// `env`: exits (with its code) or is still serving after `limit` (None, then killed).
fn serve(env: &[(&str, &OsStr)], limit: Duration) -> Ran {
    let mut cmd = Command::new(app());
    cmd.arg("serve")
        .arg("--bind")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--workers")
        .arg("1");
    for k in [
        "RUNTIME_DIRECTORY",
        "XDG_RUNTIME_DIR",
        "APP_CONTROL_SOCKET",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_bounded(cmd, limit)
}

fn serve_at(control: &Path) -> Ran {
    serve(
        &[("APP_CONTROL_SOCKET", control.as_os_str())],
        Duration::from_secs(5),
    )
}

fn assert_refused(r: &Ran, control: &Path) {
    assert_eq!(
        r.code,
        Some(78),
        "expected exit 78 for {}; stderr:\n{}",
        control.display(),
        r.stderr
    );
    assert!(
        r.stderr
            .contains(&format!("control socket: {}", control.display())),
        "{}",
        r.stderr
    );
}

/// `app <args> --control-socket <path>`, at most `limit`.
fn client(path: &Path, args: &[&str], env: &[(&str, &str)], limit: Duration) -> Ran {
    let mut cmd = Command::new(app());
    cmd.args(args).arg("--control-socket").arg(path);
    cmd.env_remove("APP_CONTROL_TIMEOUT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_bounded(cmd, limit)
}

fn start_master() -> Server {
    Server::start(
        Launch {
            binary: Some(app()),
            ..Default::default()
        }
        .args(&["--workers", "1"]),
    )
}

// ---- 1: the control directory -----------------------------------------------------------

#[test]
fn control_dir_open_to_others_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("ctl");
    std::fs::create_dir(&d).unwrap();
    chmod(&d, 0o777);
    let control = d.join("control.sock");
    let r = serve_at(&control);
    assert_refused(&r, &control);
    assert!(
        !control.exists(),
        "no socket may be made in a 0777 directory"
    );
    assert_eq!(mode(&d), 0o777, "the directory is not the master's to fix");
}

#[test]
fn control_dir_that_is_a_symlink_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let real = t.path().join("elsewhere");
    std::fs::create_dir(&real).unwrap();
    chmod(&real, 0o700);
    let d = t.path().join("ctl");
    std::os::unix::fs::symlink(&real, &d).unwrap();
    let control = d.join("control.sock");
    let r = serve_at(&control);
    assert_refused(&r, &control);
    assert!(
        std::fs::read_dir(&real).unwrap().next().is_none(),
        "nothing may be created through the link"
    );
}

#[test]
fn control_dir_owned_by_another_user_is_refused() {
    if skip_unless_root("a control directory owned by uid 65534") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    // The victim a planted directory would aim at.
    let victim = t.path().join("victim");
    std::fs::write(&victim, "secret").unwrap();
    chmod(&victim, 0o644);
    for m in [0o700, 0o777] {
        let d = t.path().join(format!("ctl{m:o}"));
        std::fs::create_dir(&d).unwrap();
        chmod(&d, m);
        chown(&d, NOBODY);
        let control = d.join("control.sock");
        let r = serve_at(&control);
        assert_refused(&r, &control);
        assert!(!control.exists());
    }
    assert_eq!(mode(&victim), 0o644);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "secret");
}

/// The default location (here `$XDG_RUNTIME_DIR/app`, the same checks as the `/tmp/app-<uid>`
/// fallback, which a test cannot plant on a shared machine) is not trusted either.
#[test]
fn default_control_dir_planted_by_another_user_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("app");
    std::fs::create_dir(&d).unwrap();
    if root() {
        chmod(&d, 0o700);
        chown(&d, NOBODY);
    } else {
        eprintln!("not root: planting a 0777 directory instead of another user's");
        chmod(&d, 0o777);
    }
    let control = d.join("control.sock");
    let r = serve(
        &[("XDG_RUNTIME_DIR", t.path().as_os_str())],
        Duration::from_secs(5),
    );
    assert_refused(&r, &control);
    assert!(!control.exists());
}

#[test]
fn control_dir_in_a_parent_writable_by_others_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("shared");
    std::fs::create_dir(&p).unwrap();
    chmod(&p, 0o777);
    let control = p.join("ctl").join("control.sock");
    let r = serve_at(&control);
    assert_refused(&r, &control);
    assert!(!p.join("ctl").exists(), "nothing may be created there");

    // With the sticky bit (like /tmp) nobody else can move our directory away: accepted,
    // and the directory is made 0700, the socket 0600.
    chmod(&p, 0o1777);
    let r = serve(
        &[("APP_CONTROL_SOCKET", control.as_os_str())],
        Duration::from_secs(2),
    );
    assert_eq!(
        r.code, None,
        "a sticky parent must be accepted:\n{}",
        r.stderr
    );
    assert_eq!(mode(&p.join("ctl")), 0o700);

    if skip_unless_root("a parent directory owned by uid 65534") {
        return;
    }
    let q = t.path().join("theirs");
    std::fs::create_dir(&q).unwrap();
    chmod(&q, 0o755);
    chown(&q, NOBODY);
    let control = q.join("ctl").join("control.sock");
    // Root can create in it; the master must not.
    let r = serve_at(&control);
    assert_refused(&r, &control);
    assert!(!q.join("ctl").exists());
}

// ---- 4: what the master replaces and removes -----------------------------------------------

#[test]
fn control_socket_naming_a_file_is_refused_and_the_file_kept() {
    let t = tempfile::tempdir().unwrap();
    let config = t.path().join("app.toml");
    std::fs::write(&config, "workers = 1\n").unwrap();
    let r = serve_at(&config);
    assert_refused(&r, &config);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), "workers = 1\n");
}

#[test]
fn control_socket_naming_a_symlink_is_refused_and_both_kept() {
    let t = tempfile::tempdir().unwrap();
    let victim = t.path().join("victim");
    std::fs::write(&victim, "keep me").unwrap();
    let control = t.path().join("control.sock");
    std::os::unix::fs::symlink(&victim, &control).unwrap();
    let r = serve_at(&control);
    assert_refused(&r, &control);
    assert!(std::fs::symlink_metadata(&control).unwrap().is_symlink());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
}

#[test]
fn a_stale_socket_is_replaced() {
    let t = tempfile::tempdir().unwrap();
    let control = t.path().join("control.sock");
    drop(UnixListener::bind(&control).unwrap()); // the file stays, nobody listens
    let mut srv = Server::start(
        Launch {
            binary: Some(app()),
            dir: Some(t),
            ..Default::default()
        }
        .args(&["--workers", "1"]),
    );
    assert_eq!(srv.report().state, "serving");
    srv.signal(libc::SIGTERM);
    assert_eq!(
        srv.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
    assert!(
        !control.exists(),
        "the master removes its own socket at exit"
    );
}

// ---- 10: two masters, one path -------------------------------------------------------------

#[test]
fn second_master_on_the_same_path_refuses_and_the_first_keeps_its_socket() {
    let mut a = start_master();
    let ino = std::fs::symlink_metadata(&a.control).unwrap().ino();
    let r = serve_at(&a.control);
    assert_refused(&r, &a.control);
    assert_eq!(
        std::fs::symlink_metadata(&a.control).unwrap().ino(),
        ino,
        "the first master's socket must be untouched"
    );
    let s = client(
        &a.control,
        &["status", "--json"],
        &[],
        Duration::from_secs(10),
    );
    assert_eq!(s.code, Some(0), "{}", s.stderr);
    let v: serde_json::Value = serde_json::from_slice(&s.stdout).unwrap();
    assert_eq!(v["master_pid"], a.pid());

    a.signal(libc::SIGTERM);
    assert_eq!(
        a.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
    assert!(
        !a.control.exists(),
        "a master removes its own socket at exit"
    );
}

#[test]
fn master_does_not_unlink_a_socket_it_did_not_create() {
    let mut a = start_master();
    // Someone else's socket now sits at the path (ours was removed by hand).
    std::fs::remove_file(&a.control).unwrap();
    let _other = UnixListener::bind(&a.control).unwrap();
    let ino = std::fs::symlink_metadata(&a.control).unwrap().ino();
    a.signal(libc::SIGTERM);
    assert_eq!(
        a.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
    let md = std::fs::symlink_metadata(&a.control).expect("the other socket must survive");
    assert_eq!(md.ino(), ino);
}

// ---- minor: the server's answer to bytes that are not UTF-8 ---------------------------------

#[test]
fn request_that_is_not_utf8_gets_a_json_error() {
    let srv = start_master();
    let mut s = UnixStream::connect(&srv.control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(b"{\"cmd\":\"st\xff\xfeatus\"}\n").unwrap();
    let mut line = String::new();
    let _ = BufReader::new(&s).read_line(&mut line);
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("no JSON reply ({e}): {line:?}"));
    assert_eq!(v["ok"], false, "{v}");
    assert!(v["error"].is_string(), "{v}");
    assert_eq!(srv.report().state, "serving");
}

// ---- 2: the client against what answers ---------------------------------------------------

/// A fake master in this process (so with this uid): `behave` gets each connection.
fn fake_master(path: &Path, behave: fn(UnixStream)) {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || behave(s));
        }
    });
}

fn read_request(s: &UnixStream) {
    let mut line = String::new();
    let _ = BufReader::new(s).read_line(&mut line);
}

const PWNED: &str = "{\"ok\":true,\"message\":\"\\u001b[31mpwned\\u0007\",\"status\":{\"master_pid\":1,\"state\":\"\\u001b]0;title\\u0007serving\",\"generation\":1,\"target_workers\":1,\"serving_workers\":1,\"uptime_secs\":1.0,\"requests_total\":0,\"restarts_in_window\":0,\"restart_limit\":1,\"restart_window_secs\":1,\"listeners\":[\"\\u009b2J\"],\"last_reload\":null,\"workers\":[]}}\n";

#[test]
fn client_escapes_control_characters_from_the_reply() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("control.sock");
    fake_master(&path, |mut s| {
        read_request(&s);
        let _ = s.write_all(PWNED.as_bytes());
    });
    for args in [&["reload"][..], &["status"], &["status", "--json"]] {
        let r = client(&path, args, &[], Duration::from_secs(10));
        assert_eq!(r.code, Some(0), "{args:?}: {}", r.stderr);
        let out = String::from_utf8_lossy(&r.stdout);
        assert!(
            !r.stdout
                .iter()
                .any(|&b| b == 0x1b || b == 0x07 || b == 0x9b)
                && !out.contains('\u{9b}'),
            "{args:?}: control characters reached the terminal: {out:?}"
        );
        assert!(out.contains("pwned") || out.contains("serving"), "{out:?}");
    }
}

#[test]
fn client_gives_up_on_a_silent_master() {
    let _heavy = common::heavy();
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("control.sock");
    fake_master(&path, |s| {
        read_request(&s);
        std::thread::sleep(Duration::from_secs(60));
    });
    let r = client(
        &path,
        &["status"],
        &[("APP_CONTROL_TIMEOUT", "1s")],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(75), "status: {}", r.stderr);
    assert!(r.took < Duration::from_secs(5), "{:?}", r.took);
    let r = client(
        &path,
        &["reload", "--timeout", "1s"],
        &[],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(75), "reload: {}", r.stderr);
    assert!(r.took < Duration::from_secs(5), "{:?}", r.took);
    assert!(
        r.stderr.contains(&path.display().to_string()),
        "{}",
        r.stderr
    );
}

#[test]
fn client_gives_up_on_a_master_that_drips() {
    let _heavy = common::heavy();
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("control.sock");
    fake_master(&path, |mut s| {
        read_request(&s);
        for _ in 0..600 {
            if s.write_all(b" ").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let r = client(
        &path,
        &["status", "--timeout", "2s"],
        &[],
        Duration::from_secs(15),
    );
    assert_eq!(r.code, Some(75), "{}", r.stderr);
    assert!(r.took < Duration::from_secs(6), "{:?}", r.took);
}

#[test]
fn client_caps_an_endless_reply() {
    let _heavy = common::heavy();
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("control.sock");
    fake_master(&path, |mut s| {
        read_request(&s);
        let junk = vec![b'a'; 64 * 1024];
        while s.write_all(&junk).is_ok() {}
    });
    // The default status timeout is 10 s; the size cap must stop it long before.
    let r = client(&path, &["status"], &[], Duration::from_secs(20));
    assert_eq!(r.code, Some(76), "{}", r.stderr);
    assert!(r.took < Duration::from_secs(5), "{:?}", r.took);
}

#[test]
fn client_reports_a_stale_socket_and_a_missing_one_with_69() {
    let t = tempfile::tempdir().unwrap();
    let stale = t.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let missing = t.path().join("missing.sock");
    for p in [&stale, &missing] {
        let r = client(p, &["status"], &[], Duration::from_secs(10));
        assert_eq!(r.code, Some(69), "{}", r.stderr);
        assert!(r.stderr.contains(&p.display().to_string()), "{}", r.stderr);
    }
}

#[test]
fn client_without_permission_exits_77() {
    if skip_unless_root("connecting as uid 65534 to root's master") {
        return;
    }
    let srv = start_master();
    chmod(srv.dir.path(), 0o755); // the socket itself stays 0600
    let mut cmd = Command::new(app());
    cmd.args(["status", "--control-socket"])
        .arg(&srv.control)
        .uid(NOBODY)
        .gid(NOBODY);
    let r = run_bounded(cmd, Duration::from_secs(10));
    assert_eq!(r.code, Some(77), "{}", r.stderr);
    assert!(
        r.stderr.contains(&srv.control.display().to_string()),
        "{}",
        r.stderr
    );
}

/// A fake master run by uid 65534 (a Python script: the test itself runs as root), saying
/// `{"ok":true,"message":"\u001b[31mpwned"}` to everyone. Killed on drop.
struct FakeOfAnotherUid(Child);

impl FakeOfAnotherUid {
    /// None (and a printed reason) when it cannot run here.
    fn start(path: &Path) -> Option<FakeOfAnotherUid> {
        let python = Path::new("/usr/bin/python3");
        if !python.exists() {
            cannot_run("/usr/bin/python3 is missing (the fake master is a Python script)");
            return None;
        }
        let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1]); s.listen(8)
while True:
    c, _ = s.accept()
    try:
        c.recv(4096)
        c.sendall(b'{"ok":true,"message":"\\u001b[31mpwned"}\n')
    except OSError:
        pass
    c.close()
"#;
        let fake = FakeOfAnotherUid(
            Command::new(python)
                .arg("-c")
                .arg(script)
                .arg(path)
                .uid(NOBODY)
                .gid(NOBODY)
                .spawn()
                .unwrap(),
        );
        assert!(
            wait_until(Duration::from_secs(5), || path.exists().then_some(())).is_some(),
            "the fake master did not start"
        );
        Some(fake)
    }
}

impl Drop for FakeOfAnotherUid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A directory of uid 65534's own, as an attacker would plant `/tmp/app-0`.
fn nobodys_dir(parent: &Path, name: &str) -> PathBuf {
    chmod(parent, 0o755);
    let d = parent.join(name);
    std::fs::create_dir(&d).unwrap();
    chmod(&d, 0o755);
    chown(&d, NOBODY);
    d
}

/// A fake master run by another user, in a directory of its own, is not believed by root's
/// client, whatever it says.
#[test]
fn client_does_not_believe_a_master_of_another_uid() {
    if skip_unless_root("a fake master running as uid 65534") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let path = nobodys_dir(t.path(), "app-0").join("control.sock");
    let Some(_fake) = FakeOfAnotherUid::start(&path) else {
        return;
    };
    for cmd in ["reload", "status"] {
        let r = client(&path, &[cmd], &[], Duration::from_secs(10));
        assert_eq!(r.code, Some(69), "{cmd}: {}", r.stderr);
        let out = String::from_utf8_lossy(&r.stdout);
        assert!(!out.contains("pwned"), "{cmd}: believed the fake: {out:?}");
        assert!(
            r.stderr.contains("65534"),
            "{cmd}: say who answered: {}",
            r.stderr
        );
    }
}

/// A master of another uid is believed when root handed it its directory (systemd's
/// `RuntimeDirectory=` for a `DynamicUser=`: `/run/app` owned by the service's uid, in
/// root-only `/run`), but a symbolic link to it from a place anyone can write lends it
/// nothing.
#[test]
fn client_believes_a_master_in_a_directory_root_gave_it_but_not_through_a_link() {
    if skip_unless_root("a master running as uid 65534 in a root-made directory") {
        return;
    }
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    chmod(base.path(), 0o755);
    let root_only = base.path().ancestors().all(|a| {
        let m = std::fs::symlink_metadata(a).unwrap();
        m.is_dir() && m.uid() == 0 && m.mode() & 0o022 == 0
    });
    if !root_only {
        return skipped(&format!(
            "{} is not in directories only root can write",
            base.path().display()
        ));
    }
    let run_app = base.path().join("run-app");
    std::fs::create_dir(&run_app).unwrap();
    chmod(&run_app, 0o700);
    chown(&run_app, NOBODY);
    let path = run_app.join("control.sock");
    let Some(_fake) = FakeOfAnotherUid::start(&path) else {
        return;
    };
    let r = client(&path, &["reload"], &[], Duration::from_secs(10));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(!r.stdout.contains(&0x1b), "{:?}", r.stdout);

    let t = tempfile::tempdir().unwrap();
    let link = nobodys_dir(t.path(), "app-0").join("control.sock");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let r = client(&link, &["reload"], &[], Duration::from_secs(10));
    assert_eq!(r.code, Some(69), "believed through a link: {}", r.stderr);
}

#[test]
fn socket_is_0600_even_with_an_open_umask() {
    let t = tempfile::tempdir().unwrap();
    let control = t.path().join("ctl").join("control.sock");
    let mut cmd = Command::new(app());
    cmd.arg("serve")
        .arg("--bind")
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(["--workers", "1"])
        .env("APP_CONTROL_SOCKET", &control);
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let up = wait_until(Duration::from_secs(5), || control.exists().then_some(()));
    let modes = up.map(|()| (mode(&control), mode(&t.path().join("ctl"))));
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.wait();
    assert_eq!(modes, Some((0o600, 0o700)));
}

/// Without `--control-socket`, the client finds the master at the service's path before
/// the by-hand ones: here `$RUNTIME_DIRECTORY` (the unit's, as `ExecReload=` sees it) wins
/// over a stale socket at `$XDG_RUNTIME_DIR/app`. (`/run/app/control.sock`, which wins for
/// `sudo app status`, cannot be planted on a shared test machine.) The master, for its part,
/// makes its default directory 0700.
#[test]
fn client_prefers_the_service_path_to_a_stale_by_hand_one() {
    let run = tempfile::tempdir().unwrap();
    chmod(run.path(), 0o700); // as systemd's RuntimeDirectoryMode=0700 makes it
    let xdg = tempfile::tempdir().unwrap();
    let stale_dir = xdg.path().join("app");
    std::fs::create_dir(&stale_dir).unwrap();
    chmod(&stale_dir, 0o700);
    drop(UnixListener::bind(stale_dir.join("control.sock")).unwrap());

    let mut cmd = Command::new(app());
    cmd.arg("serve")
        .arg("--bind")
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(["--workers", "1"])
        .env_remove("APP_CONTROL_SOCKET")
        .env("RUNTIME_DIRECTORY", run.path())
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    let mut master = cmd.spawn().unwrap();
    let sock = run.path().join("control.sock");
    let up = wait_until(Duration::from_secs(5), || sock.exists().then_some(()));

    let mut c = Command::new(app());
    c.args(["status", "--json"])
        .env_remove("APP_CONTROL_SOCKET")
        .env("RUNTIME_DIRECTORY", run.path())
        .env("XDG_RUNTIME_DIR", xdg.path());
    let r = run_bounded(c, Duration::from_secs(10));
    unsafe { libc::kill(-(master.id() as i32), libc::SIGKILL) };
    let _ = master.wait();
    assert!(up.is_some(), "the master never made its socket");
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["master_pid"], master.id());
}
