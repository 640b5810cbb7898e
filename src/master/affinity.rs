//! Adaptive CPU affinity (`cpu_affinity = "auto"`): the decision alone, without any I/O.
//!
//! Pinning one worker per CPU is right on an idle, dedicated host and costs about 30 % of
//! throughput as soon as one CPU is shared with something else (a sidecar, a log shipper, the
//! load generator): the worker pinned there keeps its share of connections but gets half a
//! CPU, while the other CPUs' idle time cannot be used. So under `auto` workers start pinned,
//! and the master (in `balance.rs`) feeds this [`Policy`] a [`Sample`] about once a second:
//! each worker's cumulative run time and run-queue wait (`/proc/<pid>/schedstat`) and each
//! CPU's busy and total time (`/proc/stat`). The policy answers with [`Decision`]s:
//!
//! * **widen** a pinned worker to every allowed CPU when it *waited* for its CPU for at least
//!   [`Tuning::widen_wait`] of the interval while another allowed CPU was at least
//!   [`Tuning::idle_min`] idle and the workers pinned there waited at most
//!   [`Tuning::asymmetry`] of what it waited (contention on every CPU alike, such as a
//!   load generator spread over all of them, is no reason to move) — three times in a row
//!   ([`Tuning::widen_after`]), or once if it waited [`Tuning::widen_wait_strong`];
//! * one contended CPU widens **the whole pool**: a worker left pinned would compete on its
//!   own CPU with the widened one while the foreign load moves between CPUs (a load
//!   generator, a sidecar), and the scheduler balances best when it may move every worker;
//! * **pin again** the pool once every worker has been widened for its hold time and, for
//!   [`Tuning::calm_after`] samples in a row, the load that is not ours on its home CPU
//!   (its busy time less the run time of the workers pinned there and of every widened
//!   worker; at most the host's whole foreign load) stayed under [`Tuning::foreign_low`] of
//!   a CPU, and the host's whole foreign load (every CPU's busy time less our run time,
//!   exact) under [`Tuning::foreign_low`] per 8 CPUs;
//! * a worker widened again within [`Tuning::rewiden_window`] of being pinned again holds
//!   twice as long (up to [`Tuning::max_hold`]): a contention that comes and goes costs at
//!   most one wrong re-pin per hold time;
//! * when no other CPU is idle (every CPU busy), nothing is widened: there is no idle
//!   capacity to gain, and a pinned worker still gets its fair share of its own CPU with warm
//!   caches. A worker already widened stays widened while its home CPU is still busy with
//!   foreign load.
//!
//! Without `/proc/stat` (`ProcSubset=pid` hides it under systemd) a CPU's idle time is
//! estimated from our own workers (one minus what the workers pinned there ran and waited),
//! and a re-pin after the hold time is a probe: if the contention is still there, the worker
//! is widened again, with a doubled hold.

use std::collections::BTreeMap;
use std::time::Duration;

/// The thresholds of the policy (fractions are of one CPU over the sample interval).
#[derive(Debug, Clone, PartialEq)]
pub struct Tuning {
    /// Run-queue wait of a pinned worker that counts as contention.
    pub widen_wait: f64,
    /// A wait this large widens on the first sample.
    pub widen_wait_strong: f64,
    /// Another allowed CPU must be at least this idle for widening to gain anything.
    pub idle_min: f64,
    /// ...and the workers pinned to it must have waited at most this fraction of what the
    /// contended worker waited (the contention is on its CPU, not everywhere).
    pub asymmetry: f64,
    /// Contended samples in a row before widening.
    pub widen_after: u32,
    /// Foreign load on the home CPU below which the contention counts as gone.
    pub foreign_low: f64,
    /// Calm samples in a row before pinning again.
    pub calm_after: u32,
    /// Shortest time a worker stays widened.
    pub min_hold: Duration,
    /// Longest hold after repeated re-widening.
    pub max_hold: Duration,
    /// Widening again this soon after a re-pin doubles the hold.
    pub rewiden_window: Duration,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            widen_wait: 0.10,
            widen_wait_strong: 0.20,
            idle_min: 0.15,
            asymmetry: 0.5,
            widen_after: 3,
            foreign_low: 0.20,
            calm_after: 3,
            min_hold: Duration::from_secs(5),
            max_hold: Duration::from_secs(160),
            rewiden_window: Duration::from_secs(30),
        }
    }
}

/// Cumulative times of one CPU, in any unit (`/proc/stat` gives clock ticks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    pub cpu: usize,
    /// Everything but idle and iowait.
    pub busy: u64,
    pub total: u64,
}

/// Cumulative scheduler times of one worker (`/proc/<pid>/schedstat`, nanoseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskTimes {
    pub pid: i32,
    /// The CPU its slot is pinned to.
    pub home: usize,
    /// Time spent running.
    pub run_ns: u64,
    /// Time spent runnable, waiting on a run queue.
    pub wait_ns: u64,
}

/// One observation of the host and the workers under `auto`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// When it was taken (any fixed origin: only differences count).
    pub at: Duration,
    /// Per-CPU times, `None` when `/proc/stat` cannot be read.
    pub cpus: Option<Vec<CpuTimes>>,
    pub tasks: Vec<TaskTimes>,
    /// The master's own cumulative run time (ns): ours, not foreign load.
    pub own_run_ns: u64,
}

/// What to do to one worker.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Let it run on every CPU of `mask`.
    Widen {
        pid: i32,
        home: usize,
        mask: Vec<usize>,
        why: String,
    },
    /// Pin it to its home CPU again.
    Pin { pid: i32, cpu: usize, why: String },
}

/// Where a worker under `auto` stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pinned,
    Widened,
}

#[derive(Debug, Clone)]
struct Track {
    mode: Mode,
    contended: u32,
    calm: u32,
    widened_at: Duration,
    hold: Duration,
    repinned_at: Option<Duration>,
}

/// The adaptive affinity policy: samples in, decisions out.
#[derive(Debug)]
pub struct Policy {
    allowed: Vec<usize>,
    tuning: Tuning,
    prev: Option<Sample>,
    tracks: BTreeMap<i32, Track>,
}

/// One worker's figures over the last interval, as fractions of a CPU.
struct Delta {
    pid: i32,
    home: usize,
    /// Widened when the interval began.
    widened: bool,
    run: f64,
    wait: f64,
}

impl Policy {
    /// A policy over the CPUs workers may use (the master's own affinity).
    pub fn new(allowed: Vec<usize>, tuning: Tuning) -> Policy {
        Policy {
            allowed,
            tuning,
            prev: None,
            tracks: BTreeMap::new(),
        }
    }

    /// The worker's current mode; `None` for a worker never seen in a sample.
    #[cfg(test)]
    pub fn mode(&self, pid: i32) -> Option<Mode> {
        self.tracks.get(&pid).map(|t| t.mode)
    }

    /// Takes the next sample and decides. A worker seen for the first time is assumed
    /// pinned (as it starts); one missing from the sample is forgotten.
    pub fn observe(&mut self, sample: Sample) -> Vec<Decision> {
        let prev = self.prev.replace(sample.clone());
        self.tracks
            .retain(|pid, _| sample.tasks.iter().any(|t| t.pid == *pid));
        for t in &sample.tasks {
            self.tracks.entry(t.pid).or_insert(Track {
                mode: Mode::Pinned,
                contended: 0,
                calm: 0,
                widened_at: Duration::ZERO,
                hold: self.tuning.min_hold,
                repinned_at: None,
            });
        }
        let Some(prev) = prev else {
            return Vec::new();
        };
        let dt = sample.at.saturating_sub(prev.at).as_nanos() as f64;
        if dt <= 0.0 || self.allowed.len() < 2 {
            return Vec::new();
        }
        let frac = |now: u64, before: u64| now.saturating_sub(before) as f64 / dt;
        let deltas: Vec<Delta> = sample
            .tasks
            .iter()
            .filter_map(|t| {
                let p = prev.tasks.iter().find(|p| p.pid == t.pid)?;
                Some(Delta {
                    pid: t.pid,
                    home: t.home,
                    widened: self.tracks[&t.pid].mode == Mode::Widened,
                    run: frac(t.run_ns, p.run_ns),
                    wait: frac(t.wait_ns, p.wait_ns),
                })
            })
            .collect();
        let ours =
            deltas.iter().map(|d| d.run).sum::<f64>() + frac(sample.own_run_ns, prev.own_run_ns);
        let busy = match (&sample.cpus, &prev.cpus) {
            (Some(now), Some(before)) => Some(cpu_busy(&self.allowed, now, before)),
            _ => None,
        };
        let foreign_total = busy
            .as_ref()
            .map(|b| (b.values().sum::<f64>() - ours).max(0.0));
        let idle: BTreeMap<usize, f64> = self
            .allowed
            .iter()
            .map(|&c| {
                let i = match &busy {
                    Some(b) => 1.0 - b.get(&c).copied().unwrap_or(1.0),
                    None => {
                        // Estimated from our own workers: what those pinned there ran and
                        // waited, and an even share of what the widened ones ran.
                        let widened = deltas
                            .iter()
                            .filter(|d| self.tracks[&d.pid].mode == Mode::Widened)
                            .map(|d| d.run)
                            .sum::<f64>();
                        let pinned = deltas
                            .iter()
                            .filter(|d| d.home == c && self.tracks[&d.pid].mode == Mode::Pinned)
                            .map(|d| d.run + d.wait)
                            .sum::<f64>();
                        1.0 - pinned - widened / self.allowed.len() as f64
                    }
                };
                (c, i.clamp(0.0, 1.0))
            })
            .collect();

        let t = self.tuning.clone();
        let at = sample.at;
        let secs = dt / 1e9;
        let mut out = Vec::new();
        // The pool is pinned again only together, when the foreign load is gone from every
        // widened worker's home CPU and from the host as a whole (up to foreign_low per 8
        // CPUs). Without /proc/stat: always (the re-pin is a probe).
        let mut trigger: Option<(usize, usize)> = None;
        let pool_calm = match &busy {
            None => true,
            Some(b) => {
                let scale = self.allowed.len().div_ceil(8) as f64;
                foreign_total.is_none_or(|f| f < t.foreign_low * scale)
                    && deltas.iter().filter(|d| d.widened).all(|d| {
                        let ours: f64 = deltas
                            .iter()
                            .filter(|o| o.widened || o.home == d.home)
                            .map(|o| o.run)
                            .sum();
                        b.get(&d.home).copied().unwrap_or(1.0) - ours < t.foreign_low
                    })
            }
        };
        for d in &deltas {
            // Our run time that may have been on d.home: the workers pinned there, and every
            // widened worker in full (so the foreign load is a lower bound: an error there
            // costs one re-pin, widened again with a doubled hold).
            let ours_home: f64 = deltas
                .iter()
                .filter(|o| o.widened || o.home == d.home)
                .map(|o| o.run)
                .sum();
            let track = self.tracks.get_mut(&d.pid).expect("tracked above");
            match track.mode {
                Mode::Pinned => {
                    // The idlest other CPU whose own pinned workers are not waiting as much.
                    let best = idle
                        .iter()
                        .filter(|(c, i)| {
                            **c != d.home
                                && **i >= t.idle_min
                                && deltas
                                    .iter()
                                    .filter(|o| o.home == **c && !o.widened)
                                    .all(|o| o.wait <= d.wait * t.asymmetry)
                        })
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map(|(c, i)| (*c, *i));
                    let contended =
                        d.wait >= t.widen_wait && best.is_some() && self.allowed.contains(&d.home);
                    if !contended {
                        track.contended = 0;
                        continue;
                    }
                    track.contended += 1;
                    if track.contended < t.widen_after && d.wait < t.widen_wait_strong {
                        continue;
                    }
                    track.hold = match track.repinned_at {
                        Some(r) if at.saturating_sub(r) <= t.rewiden_window => {
                            (track.hold * 2).min(t.max_hold)
                        }
                        _ => t.min_hold,
                    };
                    track.mode = Mode::Widened;
                    track.widened_at = at;
                    track.contended = 0;
                    track.calm = 0;
                    let (c, i) = best.expect("contended implies an idle CPU");
                    trigger.get_or_insert((d.home, c));
                    out.push(Decision::Widen {
                        pid: d.pid,
                        home: d.home,
                        mask: self.allowed.clone(),
                        why: format!(
                            "waited {:.0}% of the last {secs:.1}s for CPU {} while CPU {c} was {:.0}% idle; holding at least {}s",
                            d.wait * 100.0,
                            d.home,
                            i * 100.0,
                            track.hold.as_secs()
                        ),
                    });
                }
                Mode::Widened => {
                    let foreign = busy.as_ref().map(|b| {
                        let home = (b.get(&d.home).copied().unwrap_or(1.0) - ours_home).max(0.0);
                        home.min(foreign_total.unwrap_or(home))
                    });
                    let calm = pool_calm;
                    track.calm = if calm { track.calm + 1 } else { 0 };
                    if track.calm >= t.calm_after
                        && at.saturating_sub(track.widened_at) >= track.hold
                    {
                        track.mode = Mode::Pinned;
                        track.repinned_at = Some(at);
                        track.calm = 0;
                        track.contended = 0;
                        out.push(Decision::Pin {
                            pid: d.pid,
                            cpu: d.home,
                            why: match foreign {
                                Some(f) => format!(
                                    "contention on CPU {} is gone (foreign load {:.0}% of it, {:.0}% of a CPU on the host)",
                                    d.home,
                                    f * 100.0,
                                    foreign_total.unwrap_or(0.0) * 100.0
                                ),
                                None => format!(
                                    "widened for {}s; pinning again to CPU {} as a probe (no /proc/stat)",
                                    at.saturating_sub(track.widened_at).as_secs(),
                                    d.home
                                ),
                            },
                        });
                    }
                }
            }
        }
        // One contended CPU widens the whole pool: a worker left pinned would compete with
        // the widened one on its own CPU while the foreign load (a load generator, a
        // sidecar) moves from CPU to CPU, and the scheduler balances best when it may move
        // every worker.
        if let Some((home, idle_cpu)) = trigger {
            for d in &deltas {
                let track = self.tracks.get_mut(&d.pid).expect("tracked above");
                if track.mode != Mode::Pinned {
                    continue;
                }
                track.hold = match track.repinned_at {
                    Some(r) if at.saturating_sub(r) <= t.rewiden_window => {
                        (track.hold * 2).min(t.max_hold)
                    }
                    _ => t.min_hold,
                };
                track.mode = Mode::Widened;
                track.widened_at = at;
                track.contended = 0;
                track.calm = 0;
                out.push(Decision::Widen {
                    pid: d.pid,
                    home: d.home,
                    mask: self.allowed.clone(),
                    why: format!(
                        "with the pool: CPU {home} is contended while CPU {idle_cpu} idles; holding at least {}s",
                        track.hold.as_secs()
                    ),
                });
            }
        }
        out
    }
}

/// Busy fraction of each allowed CPU between two `/proc/stat` readings.
fn cpu_busy(allowed: &[usize], now: &[CpuTimes], before: &[CpuTimes]) -> BTreeMap<usize, f64> {
    allowed
        .iter()
        .filter_map(|&c| {
            let n = now.iter().find(|x| x.cpu == c)?;
            let b = before.iter().find(|x| x.cpu == c)?;
            let total = n.total.saturating_sub(b.total);
            if total == 0 {
                return None;
            }
            Some((
                c,
                (n.busy.saturating_sub(b.busy) as f64 / total as f64).min(1.0),
            ))
        })
        .collect()
}

/// Per-CPU lines of `/proc/stat` (`cpuN user nice system idle iowait irq softirq steal ...`).
pub fn parse_proc_stat(text: &str) -> Vec<CpuTimes> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let cpu: usize = f.next()?.strip_prefix("cpu")?.parse().ok()?;
            // guest and guest_nice are already counted in user and nice.
            let v: Vec<u64> = f.take(8).map_while(|x| x.parse().ok()).collect();
            if v.len() < 4 {
                return None;
            }
            let total: u64 = v.iter().sum();
            let idle = v[3] + v.get(4).copied().unwrap_or(0);
            Some(CpuTimes {
                cpu,
                busy: total - idle,
                total,
            })
        })
        .collect()
}

/// `/proc/<pid>/schedstat`: run time, wait time (ns), timeslices.
pub fn parse_schedstat(text: &str) -> Option<(u64, u64)> {
    let mut f = text.split_whitespace();
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

/// "0,2-3" → [0, 2, 3]. Sorted, without duplicates; an empty list is an error.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let bad = || format!("{s:?} is not a CPU list (write e.g. \"0,2-3\")");
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: usize = a.parse().map_err(|_| bad())?;
        let b: usize = b.parse().map_err(|_| bad())?;
        if a > b || b >= libc::CPU_SETSIZE as usize {
            return Err(bad());
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// [0, 2, 3] → "0,2-3" (the kernel's `Cpus_allowed_list` form).
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut v = cpus.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}-{}", v[i], v[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Builds cumulative samples from per-interval figures, one second apart.
    struct Host {
        at: Duration,
        cpus: Vec<CpuTimes>,
        tasks: Vec<TaskTimes>,
        own: u64,
        stat: bool,
    }

    impl Host {
        fn new(ncpu: usize, workers: &[(i32, usize)]) -> Host {
            Host {
                at: Duration::from_secs(100),
                cpus: (0..ncpu)
                    .map(|cpu| CpuTimes {
                        cpu,
                        busy: 0,
                        total: 0,
                    })
                    .collect(),
                tasks: workers
                    .iter()
                    .map(|&(pid, home)| TaskTimes {
                        pid,
                        home,
                        run_ns: 0,
                        wait_ns: 0,
                    })
                    .collect(),
                own: 0,
                stat: true,
            }
        }

        fn sample(&self) -> Sample {
            Sample {
                at: self.at,
                cpus: self.stat.then(|| self.cpus.clone()),
                tasks: self.tasks.clone(),
                own_run_ns: self.own,
            }
        }

        /// One second passes: `busy[c]` percent of each CPU busy (of 100 ticks), each
        /// worker ran and waited the given milliseconds.
        fn tick(&mut self, busy: &[u64], tasks: &[(u64, u64)]) -> Sample {
            self.at += Duration::from_secs(1);
            for (c, b) in self.cpus.iter_mut().zip(busy) {
                c.busy += b;
                c.total += 100;
            }
            for (t, (run, wait)) in self.tasks.iter_mut().zip(tasks) {
                t.run_ns += run * MS;
                t.wait_ns += wait * MS;
            }
            self.own += MS / 2;
            self.sample()
        }
    }

    fn policy(ncpu: usize) -> Policy {
        Policy::new((0..ncpu).collect(), Tuning::default())
    }

    fn widened(d: &[Decision]) -> Vec<i32> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Widen { pid, .. } => Some(*pid),
                _ => None,
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    fn pinned(d: &[Decision]) -> Vec<i32> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Pin { pid, .. } => Some(*pid),
                _ => None,
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    #[test]
    fn idle_host_with_symmetric_load_stays_pinned() {
        let mut h = Host::new(2, &[(10, 0), (11, 1)]);
        let mut p = policy(2);
        assert!(p.observe(h.sample()).is_empty());
        for _ in 0..60 {
            // Both workers busy, a little queueing among their own threads, CPUs at 95 %.
            let d = p.observe(h.tick(&[95, 95], &[(900, 20), (900, 20)]));
            assert!(d.is_empty(), "{d:?}");
        }
        assert_eq!(p.mode(10), Some(Mode::Pinned));
        assert_eq!(p.mode(11), Some(Mode::Pinned));
    }

    #[test]
    fn hog_on_a_cpu_widens_the_pool_at_once() {
        let mut h = Host::new(2, &[(10, 0), (11, 1)]);
        let mut p = policy(2);
        p.observe(h.sample());
        // A hog on CPU 1: worker 11 runs half the time and waits 45 %; CPU 0 is 50 % idle.
        let d = p.observe(h.tick(&[50, 100], &[(450, 5), (500, 450)]));
        assert_eq!(widened(&d), vec![10, 11], "{d:?}");
        match &d[0] {
            Decision::Widen {
                mask, home, why, ..
            } => {
                assert_eq!(mask, &vec![0, 1]);
                assert_eq!(*home, 1);
                assert!(why.contains("for CPU 1 while CPU 0 was 50% idle"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(&d[1], Decision::Widen { pid: 10, why, .. } if why.starts_with("with the pool: CPU 1 is contended")),
            "{d:?}"
        );
        assert_eq!(p.mode(11), Some(Mode::Widened));
        assert_eq!(p.mode(10), Some(Mode::Widened));
    }

    #[test]
    fn mild_contention_widens_only_when_it_lasts() {
        let mut h = Host::new(2, &[(10, 0), (11, 1)]);
        let mut p = policy(2);
        p.observe(h.sample());
        // 15 % wait: contended, but not strongly; an interruption resets the streak.
        assert!(
            p.observe(h.tick(&[40, 90], &[(300, 0), (600, 150)]))
                .is_empty()
        );
        assert!(
            p.observe(h.tick(&[40, 90], &[(300, 0), (600, 10)]))
                .is_empty()
        );
        for _ in 0..2 {
            assert!(
                p.observe(h.tick(&[40, 90], &[(300, 0), (600, 150)]))
                    .is_empty()
            );
        }
        let d = p.observe(h.tick(&[40, 90], &[(300, 0), (600, 150)]));
        assert_eq!(widened(&d), vec![10, 11]);
    }

    #[test]
    fn contention_on_every_cpu_alike_is_no_reason_to_widen() {
        let mut h = Host::new(2, &[(10, 0), (11, 1)]);
        let mut p = policy(2);
        p.observe(h.sample());
        // A load generator spread over both CPUs: both workers wait (12 % and 9 %), and
        // bursts leave CPU 1 28 % idle now and then: symmetric, so both stay pinned.
        for _ in 0..30 {
            let d = p.observe(h.tick(&[90, 72], &[(500, 120), (450, 90)]));
            assert!(d.is_empty(), "{d:?}");
        }
        // The same with worker 11 waiting little: the contention is CPU 0's own.
        p.observe(h.tick(&[90, 72], &[(500, 120), (450, 20)]));
        p.observe(h.tick(&[90, 72], &[(500, 120), (450, 20)]));
        let d = p.observe(h.tick(&[90, 72], &[(500, 120), (450, 20)]));
        assert_eq!(widened(&d), vec![10, 11]);
    }

    #[test]
    fn every_cpu_busy_means_no_widening() {
        let mut h = Host::new(2, &[(10, 0), (11, 1)]);
        let mut p = policy(2);
        p.observe(h.sample());
        // Both CPUs saturated (hogs on both, or more load than CPUs): both workers wait a
        // lot, but no CPU has idle time to give.
        for _ in 0..30 {
            let d = p.observe(h.tick(&[100, 99], &[(500, 500), (500, 500)]));
            assert!(d.is_empty(), "{d:?}");
        }
    }

    #[test]
    fn re_pins_after_the_hold_once_the_foreign_load_is_gone() {
        let mut h = Host::new(2, &[(10, 0), (11, 1)]);
        let mut p = policy(2);
        p.observe(h.sample());
        let hog = |h: &mut Host| h.tick(&[70, 100], &[(500, 0), (500, 300)]);
        assert_eq!(widened(&p.observe(hog(&mut h))), vec![10, 11]);
        // The hog stays: CPU 1 busy 100 %, worker 11 (now widened) ran 500 ms in all, so at
        // least 50 % of CPU 1 is foreign: no re-pin, however long.
        for _ in 0..20 {
            assert!(p.observe(hog(&mut h)).is_empty());
        }
        // The hog stops: CPU 1 runs only worker 11 (light load).
        let calm = |h: &mut Host| h.tick(&[20, 25], &[(200, 0), (230, 0)]);
        assert!(p.observe(calm(&mut h)).is_empty());
        assert!(p.observe(calm(&mut h)).is_empty());
        let d = p.observe(calm(&mut h));
        assert_eq!(pinned(&d), vec![10, 11], "third calm second pins again");
        assert!(
            d.iter()
                .any(|d| matches!(d, Decision::Pin { cpu: 1, why, .. } if why.contains("gone")))
        );
        assert_eq!(p.mode(11), Some(Mode::Pinned));
    }

    #[test]
    fn two_widened_workers_both_pin_again_when_the_hog_stops() {
        let mut h = Host::new(2, &[(10, 0), (11, 1)]);
        let mut p = policy(2);
        p.observe(h.sample());
        // A hog on CPU 1: the pool is widened.
        assert_eq!(
            widened(&p.observe(h.tick(&[60, 100], &[(400, 0), (500, 400)]))),
            vec![10, 11]
        );
        // While the hog runs, at least 40 % of a CPU is provably not ours: both stay widened.
        // (Were our workers running 90 % of the two CPUs, the hog's share could not be
        // placed: the re-pin after the hold would be a probe, undone within a second.)
        for _ in 0..10 {
            assert!(
                p.observe(h.tick(&[100, 100], &[(300, 50), (300, 50)]))
                    .is_empty()
            );
        }
        // The hog stops: each CPU now runs our two widened workers (60 % in all per CPU,
        // which ones where unknown) and nothing else; both are pinned again together.
        let calm = |h: &mut Host| h.tick(&[60, 60], &[(600, 0), (600, 0)]);
        assert!(p.observe(calm(&mut h)).is_empty());
        assert!(p.observe(calm(&mut h)).is_empty());
        assert_eq!(pinned(&p.observe(calm(&mut h))), vec![10, 11]);
    }

    #[test]
    fn hold_time_is_respected_even_when_calm_at_once() {
        let mut h = Host::new(2, &[(10, 0), (11, 1)]);
        let mut p = policy(2);
        p.observe(h.sample());
        assert_eq!(
            widened(&p.observe(h.tick(&[50, 100], &[(400, 0), (500, 400)]))),
            vec![10, 11]
        );
        // Calm right away: still 5 s (min_hold) before pinning again.
        for s in 1..5 {
            assert!(
                p.observe(h.tick(&[10, 10], &[(50, 0), (50, 0)])).is_empty(),
                "second {s}"
            );
        }
        assert_eq!(
            pinned(&p.observe(h.tick(&[10, 10], &[(50, 0), (50, 0)]))),
            vec![10, 11]
        );
    }

    #[test]
    fn flapping_contention_doubles_the_hold_up_to_the_cap() {
        let t = Tuning::default();
        let mut h = Host::new(2, &[(10, 0), (11, 1)]);
        let mut p = policy(2);
        p.observe(h.sample());
        let mut holds = Vec::new();
        for _ in 0..7 {
            let d = p.observe(h.tick(&[50, 100], &[(400, 0), (500, 400)]));
            assert_eq!(widened(&d), vec![10, 11]);
            let mut secs = 0;
            loop {
                secs += 1;
                let d = p.observe(h.tick(&[10, 10], &[(50, 0), (50, 0)]));
                if !d.is_empty() {
                    assert_eq!(pinned(&d), vec![10, 11]);
                    break;
                }
                assert!(secs < 1000);
            }
            holds.push(secs);
        }
        // Re-widened each time within rewiden_window: 5, 10, 20, ... capped at max_hold.
        assert_eq!(holds[0], 5);
        assert_eq!(holds[1], 10);
        assert_eq!(holds[2], 20);
        assert_eq!(*holds.last().unwrap(), t.max_hold.as_secs());
        // A contention long after the last re-pin starts again from min_hold.
        for _ in 0..t.rewiden_window.as_secs() + 1 {
            p.observe(h.tick(&[10, 10], &[(50, 0), (50, 0)]));
        }
        p.observe(h.tick(&[50, 100], &[(400, 0), (500, 400)]));
        let mut secs = 0;
        while p.observe(h.tick(&[10, 10], &[(50, 0), (50, 0)])).is_empty() {
            secs += 1;
        }
        assert_eq!(secs + 1, 5);
    }

    #[test]
    fn without_proc_stat_idle_is_estimated_and_re_pin_is_a_probe() {
        let mut h = Host::new(2, &[(10, 0), (11, 1)]);
        h.stat = false;
        let mut p = policy(2);
        p.observe(h.sample());
        // Worker 10 ran and waited 30 %: CPU 0 is about 70 % idle; worker 11 waited 40 %.
        let d = p.observe(h.tick(&[0, 0], &[(300, 0), (500, 400)]));
        assert_eq!(widened(&d), vec![10, 11]);
        // No way to see the foreign load: pinned again after the hold, as a probe.
        let mut n = 0;
        while p.observe(h.tick(&[0, 0], &[(300, 0), (500, 0)])).is_empty() {
            n += 1;
            assert!(n < 10);
        }
        assert_eq!(n + 1, 5);
        // Both workers saturating their CPUs (run + wait = 1): no idle estimated.
        for _ in 0..5 {
            assert!(
                p.observe(h.tick(&[0, 0], &[(700, 300), (600, 400)]))
                    .is_empty()
            );
        }
    }

    #[test]
    fn workers_come_and_go() {
        let mut h = Host::new(2, &[(10, 0), (11, 1)]);
        let mut p = policy(2);
        p.observe(h.sample());
        assert_eq!(
            widened(&p.observe(h.tick(&[50, 100], &[(400, 0), (500, 400)]))),
            vec![10, 11]
        );
        // Worker 11 is replaced by 12: the new one starts pinned, no decision on its first
        // sample (no interval yet), and 11 is forgotten.
        h.tasks[1] = TaskTimes {
            pid: 12,
            home: 1,
            run_ns: 0,
            wait_ns: 0,
        };
        assert!(p.observe(h.sample()).is_empty());
        assert_eq!(p.mode(11), None);
        assert_eq!(p.mode(12), Some(Mode::Pinned));
        // Same instant again (no time passed): nothing is decided.
        assert!(p.observe(h.sample()).is_empty());
    }

    #[test]
    fn one_allowed_cpu_never_widens() {
        let mut h = Host::new(1, &[(10, 0)]);
        let mut p = policy(1);
        p.observe(h.sample());
        for _ in 0..5 {
            assert!(p.observe(h.tick(&[100], &[(500, 500)])).is_empty());
        }
    }

    #[test]
    fn parses_proc_stat_and_schedstat() {
        let text = "cpu  210216 5361 44293 248189 916 0 3668 1341 0 0\n\
                    cpu0 100 0 50 800 50 0 0 0 0 0\n\
                    cpu1 300 0 100 500 100 0 0 0 0 0\n\
                    intr 1 2 3\n";
        assert_eq!(
            parse_proc_stat(text),
            vec![
                CpuTimes {
                    cpu: 0,
                    busy: 150,
                    total: 1000
                },
                CpuTimes {
                    cpu: 1,
                    busy: 400,
                    total: 1000
                }
            ]
        );
        assert_eq!(parse_schedstat("87714 8102374 2\n"), Some((87714, 8102374)));
        assert_eq!(parse_schedstat("garbage"), None);
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0,2-3"), Ok(vec![0, 2, 3]));
        assert_eq!(parse_cpu_list(" 3, 1 ,1-2"), Ok(vec![1, 2, 3]));
        for bad in ["", "a", "3-1", "1-", "-1", "99999"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_cpu_list(&[0, 2, 3]), "0,2-3");
        assert_eq!(format_cpu_list(&[5, 1, 0, 2]), "0-2,5");
        assert_eq!(format_cpu_list(&[]), "");
    }
}
