//! `app`: the template's program — the library's supervisor around the demo service in
//! [`service`]. Replace the service with yours (README, "Make it yours"); this file stays
//! three lines.

mod service;

fn main() -> std::process::ExitCode {
    app::Server::<service::Settings>::with_settings()
        .http(service::make)
        .main()
}
