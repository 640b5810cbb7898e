//! Reading a worker's memory from /proc: RSS, and PSS where the kernel offers it.
//!
//! RSS counts every shared page (the binary's text, shared libraries) in full in every
//! process; PSS (`/proc/PID/smaps_rollup`) divides shared pages among their users, so it is
//! the honest figure for "how much does this worker cost" and the one limits compare
//! against when present.

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    pub rss: u64,
    pub pss: Option<u64>,
}

impl Memory {
    /// The figure `max_memory` is compared with.
    pub fn charged(&self) -> u64 {
        self.pss.unwrap_or(self.rss)
    }
}

pub fn read(pid: i32) -> Option<Memory> {
    if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
        let rss = field_kib(&text, "Rss:");
        let pss = field_kib(&text, "Pss:");
        if let Some(rss) = rss {
            return Some(Memory { rss, pss });
        }
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(Memory {
        rss: field_kib(&text, "VmRSS:")?,
        pss: None,
    })
}

/// "Pss:   1234 kB" → bytes.
fn field_kib(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_memory() {
        let m = super::read(std::process::id() as i32).unwrap();
        assert!(m.rss > 0);
        assert!(m.charged() > 0);
    }
}
