//! Which build is running: the crate version, the git commit and the build time recorded by
//! `src/build.rs` ("unknown" when built without git).

/// `0.1.0 (commit 0123456789ab, built 2025-01-01T00:00:00Z)`: what `app --version` prints
/// after the program name, and what each worker reports to the master when it is ready.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("APP_BUILD_COMMIT"),
    ", built ",
    env!("APP_BUILD_TIME"),
    ")"
);
