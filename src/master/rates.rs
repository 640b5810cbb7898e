//! Per-worker rates for `app status`: CPU % from `/proc/<pid>/stat` (utime + stime) and
//! requests per second from the counts in heartbeat answers, each over the span between two
//! samples, so they say what the worker does now rather than what it did since it started.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Two samples closer than this do not make a rate (too noisy): the older one is kept.
const MIN_SPAN: Duration = Duration::from_millis(250);

#[derive(Debug, Default)]
pub struct Rates {
    cpu: Option<(Instant, u64)>,
    /// The latest CPU time read, in clock ticks (also what the metrics page reports).
    cpu_latest: Option<u64>,
    /// 100 = one whole CPU.
    pub cpu_percent: f64,
    requests: Option<(Instant, u64)>,
    pub requests_per_sec: f64,
}

impl Rates {
    /// The worker's request count as of `now` (a heartbeat answer).
    pub fn requests(&mut self, now: Instant, total: u64) {
        if let Some(rate) = step(&mut self.requests, now, total) {
            self.requests_per_sec = rate;
        }
    }

    /// Samples the worker's CPU time; cheap (one small read of `/proc`).
    pub fn sample_cpu(&mut self, now: Instant, pid: i32) {
        let Some(ticks) = cpu_ticks(pid) else {
            return;
        };
        self.cpu_latest = Some(ticks);
        if let Some(rate) = step(&mut self.cpu, now, ticks) {
            self.cpu_percent = rate * 100.0 / clock_ticks() as f64;
        }
    }
}

impl Rates {
    /// The worker's CPU time as of the latest sample, in nanoseconds.
    pub fn cpu_ns(&self) -> Option<u64> {
        self.cpu_latest
            .map(|ticks| ticks * 1_000_000_000 / clock_ticks())
    }
}

/// Advances `sample` to (`now`, `value`) and returns the rate per second since the previous
/// one, when they are at least [`MIN_SPAN`] apart.
fn step(sample: &mut Option<(Instant, u64)>, now: Instant, value: u64) -> Option<f64> {
    match *sample {
        None => {
            *sample = Some((now, value));
            None
        }
        Some((t, v)) => {
            let span = now.saturating_duration_since(t);
            if span < MIN_SPAN {
                return None;
            }
            *sample = Some((now, value));
            Some(value.saturating_sub(v) as f64 / span.as_secs_f64())
        }
    }
}

/// utime + stime of `pid`, in clock ticks (fields 14 and 15 of `/proc/<pid>/stat`, counted
/// after the command name, which may itself contain spaces and parentheses).
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    // After ")": state (3), ppid (4), ... utime (14), stime (15).
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 { t as u64 } else { 100 }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_need_two_samples_far_enough_apart() {
        let t0 = Instant::now();
        let mut r = Rates::default();
        r.requests(t0, 100);
        assert_eq!(r.requests_per_sec, 0.0);
        r.requests(t0 + Duration::from_millis(100), 150);
        assert_eq!(r.requests_per_sec, 0.0);
        r.requests(t0 + Duration::from_millis(500), 300);
        assert!((r.requests_per_sec - 400.0).abs() < 1e-6);
    }

    #[test]
    fn reads_its_own_cpu_time() {
        let pid = std::process::id() as i32;
        let before = cpu_ticks(pid).unwrap();
        let until = Instant::now() + Duration::from_millis(60);
        while Instant::now() < until {
            std::hint::black_box(0u64);
        }
        assert!(cpu_ticks(pid).unwrap() >= before);
    }
}
