//! Build script (`build = "src/build.rs"`): records which source the binary was built
//! from, for `app --version`, `app status` and `app reload`.
//!
//! Sets `APP_BUILD_COMMIT` (the short git commit, "unknown" without git, e.g. a .deb built
//! from a tarball) and `APP_BUILD_TIME` (UTC, from `SOURCE_DATE_EPOCH` when set, so
//! reproducible builds stay reproducible). It never fails the build.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/build.rs");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-env-changed=APP_BUILD_COMMIT");
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| ".".into()));
    let commit = std::env::var("APP_BUILD_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| git(&dir, &["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    // Rebuild when the checked-out commit moves: HEAD, and the branch it points at (in a
    // worktree, HEAD lives in the worktree's git dir and branches in the common one).
    if let Some(git_dir) = git(&dir, &["rev-parse", "--git-dir"]).map(|d| dir.join(d)) {
        watch(&git_dir.join("HEAD"));
        let common = git(&dir, &["rev-parse", "--git-common-dir"])
            .map(|d| dir.join(d))
            .unwrap_or_else(|| git_dir.clone());
        if let Some(r) = git(&dir, &["symbolic-ref", "-q", "HEAD"]) {
            watch(&common.join(r));
        }
        watch(&common.join("packed-refs"));
    }
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    println!("cargo:rustc-env=APP_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=APP_BUILD_TIME={}", utc(secs));
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty() && !s.contains(char::is_whitespace)).then_some(s)
}

/// Only paths that exist: cargo reruns the script every build for a missing one.
fn watch(p: &Path) {
    if p.exists() {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, Howard Hinnant's algorithm).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
