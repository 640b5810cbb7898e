//! The I/O side of `cpu_affinity`: each worker's first mask, and under `auto` the once a
//! second sample of `/proc` fed to [`affinity::Policy`] and its decisions applied with
//! `sched_setaffinity(2)` on the worker's threads (the master may change the affinity of its
//! own uid's processes without any capability; `@system-service` allows the call).

use std::time::{Duration, Instant};

use tracing::info;

use super::Master;
use super::affinity::{self, Decision, Sample, TaskTimes};
use crate::config::CpuAffinity;

/// How often the master samples the workers and the CPUs under `auto`.
pub const SAMPLE_PERIOD: Duration = Duration::from_secs(1);

/// What the master keeps for the affinity policy.
pub struct Balance {
    pub setting: CpuAffinity,
    /// The CPUs the master may use (its own affinity at start).
    pub allowed: Vec<usize>,
    /// `Some` under `auto`.
    pub policy: Option<affinity::Policy>,
    pub next_sample: Instant,
    /// `/proc/stat` could not be read: said once.
    pub stat_missing_logged: bool,
}

/// How a worker got the CPUs it may run on (`affinity` in `app status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// On its slot's home CPU alone (`pin`, and `auto` while that is free).
    Pinned,
    /// `auto` let it onto other CPUs while its own is contended.
    Widened,
    /// `cpu_affinity = "none"`: every CPU the master may use.
    Unpinned,
    /// An explicit list.
    List,
}

impl Placement {
    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Pinned => "pinned",
            Placement::Widened => "widened",
            Placement::Unpinned => "none",
            Placement::List => "list",
        }
    }
}

impl Balance {
    pub fn new(setting: CpuAffinity, allowed: Vec<usize>, now: Instant) -> Balance {
        let policy = (setting == CpuAffinity::Auto)
            .then(|| affinity::Policy::new(allowed.clone(), affinity::Tuning::default()));
        Balance {
            setting,
            allowed,
            policy,
            next_sample: now,
            stat_missing_logged: false,
        }
    }

    /// The mask a new worker of a slot homed on `cpu` starts with, and how it got it.
    pub fn initial(&self, cpu: usize) -> (Vec<usize>, Placement) {
        match &self.setting {
            CpuAffinity::Auto | CpuAffinity::Pin => (vec![cpu], Placement::Pinned),
            CpuAffinity::None => (self.allowed.clone(), Placement::Unpinned),
            CpuAffinity::List(l) => (l.clone(), Placement::List),
        }
    }
}

impl Master {
    /// Under `auto`, once a second: sample, decide, apply.
    pub(super) fn balance_affinity(&mut self, now: Instant) {
        if self.balance.policy.is_none() || now < self.balance.next_sample {
            return;
        }
        self.balance.next_sample = now + SAMPLE_PERIOD;
        let tasks: Vec<TaskTimes> = self
            .core
            .pool()
            .workers
            .values()
            .filter(|w| !w.is_killed())
            .filter_map(|w| {
                let text = std::fs::read_to_string(format!("/proc/{}/schedstat", w.pid)).ok()?;
                let (run_ns, wait_ns) = affinity::parse_schedstat(&text)?;
                Some(TaskTimes {
                    pid: w.pid,
                    home: w.cpu,
                    run_ns,
                    wait_ns,
                })
            })
            .collect();
        let cpus = std::fs::read_to_string("/proc/stat")
            .ok()
            .map(|t| affinity::parse_proc_stat(&t))
            .filter(|c| !c.is_empty());
        if cpus.is_none() && !self.balance.stat_missing_logged {
            self.balance.stat_missing_logged = true;
            info!(
                "cpu_affinity = auto: /proc/stat is not readable (ProcSubset=pid?): CPU idle time is estimated from the workers, and pinning again is a probe"
            );
        }
        let own_run_ns = std::fs::read_to_string("/proc/self/schedstat")
            .ok()
            .and_then(|t| affinity::parse_schedstat(&t))
            .map_or(0, |(run, _)| run);
        let sample = Sample {
            at: now.duration_since(self.core.started()),
            cpus,
            tasks,
            own_run_ns,
        };
        tracing::debug!(
            "affinity sample: tasks {:?}, cpus {:?}",
            sample
                .tasks
                .iter()
                .map(|t| (t.pid, t.home, t.run_ns / 1_000_000, t.wait_ns / 1_000_000))
                .collect::<Vec<_>>(),
            sample.cpus.as_ref().map(|c| c
                .iter()
                .map(|c| (c.cpu, c.busy, c.total))
                .collect::<Vec<_>>())
        );
        let decisions = match &mut self.balance.policy {
            Some(p) => p.observe(sample),
            None => return,
        };
        for d in decisions {
            let (pid, mask, mode, why) = match d {
                Decision::Widen { pid, mask, why, .. } => (pid, mask, Placement::Widened, why),
                Decision::Pin { pid, cpu, why } => (pid, vec![cpu], Placement::Pinned, why),
            };
            let Some(w) = self.processes.get_mut(&pid) else {
                continue;
            };
            let list = affinity::format_cpu_list(&mask);
            match set_affinity(pid, &mask) {
                Ok(()) => {
                    w.mask = mask;
                    w.affinity = mode;
                    about!(info, w, "{} to CPUs {list}: {why}", mode.as_str());
                }
                Err(e) => about!(warn, w, "cannot set its CPU affinity to {list}: {e}"),
            }
        }
    }
}

/// Sets the affinity of every thread of `pid` (a thread created later inherits it from its
/// creator).
pub fn set_affinity(pid: i32, cpus: &[usize]) -> std::io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        set.set(c).map_err(std::io::Error::from)?;
    }
    let tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_else(|_| vec![pid]);
    let mut result = Ok(());
    for tid in tids {
        if let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set)
            && tid == pid
        {
            result = Err(std::io::Error::from(e));
        }
    }
    result
}
