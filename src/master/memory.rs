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
    use super::*;

    fn vm_rss() -> u64 {
        let text = std::fs::read_to_string("/proc/self/status").unwrap();
        field_kib(&text, "VmRSS:").unwrap()
    }

    #[test]
    fn reads_own_memory_and_sees_it_grow() {
        let me = std::process::id() as i32;
        let before = read(me).unwrap();
        // The same figure the kernel reports in /proc/self/status, give or take what the
        // test harness's other threads do between the two reads.
        let rss = vm_rss();
        assert!(
            before.rss.abs_diff(rss) < rss / 4 + (4 << 20),
            "{before:?} vs VmRSS {rss}"
        );
        if let Some(pss) = before.pss {
            assert!(pss <= before.rss, "{before:?}");
        }
        // 64 MiB touched page by page is 64 MiB more resident.
        let mut block = vec![0u8; 64 << 20];
        for i in (0..block.len()).step_by(4096) {
            block[i] = 1;
        }
        let after = read(me).unwrap();
        std::hint::black_box(&block);
        assert!(
            after.rss >= before.rss + (60 << 20),
            "{before:?} -> {after:?}"
        );
        assert!(after.charged() >= before.charged() + (60 << 20));
    }
}
