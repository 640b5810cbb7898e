//! `numa`: each worker's NUMA memory policy, prepared in the master and set with
//! `set_mempolicy(2)` between fork and exec (the policy survives exec, so the whole worker,
//! runtime included, allocates under it).
//!
//! * `local` (default): nothing is set; the kernel allocates on the node of the CPU that
//!   first touches a page, which is right for a worker pinned to one CPU.
//! * `interleave`: pages spread round-robin over every node with memory
//!   (`numactl --interleave=all`): for memory-heavy workers whose data is larger than one
//!   node or is touched from every CPU (a widened worker, big shared caches).
//! * `bind`: memory only from the node of the worker's home CPU (`numactl --membind`):
//!   strict locality; an allocation fails rather than going remote.

use crate::config::NumaPolicy;

/// What a worker's `pre_exec` passes to `set_mempolicy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemPolicy {
    pub mode: libc::c_int,
    pub mask: Vec<libc::c_ulong>,
}

impl MemPolicy {
    /// `maxnode` for the mask: the kernel reads `maxnode - 1` bits.
    pub fn maxnode(&self) -> libc::c_ulong {
        (self.mask.len() * libc::c_ulong::BITS as usize + 1) as libc::c_ulong
    }

    /// Sets it for the calling thread. Async-signal-safe (one raw system call).
    pub fn apply(&self) -> std::io::Result<()> {
        // SAFETY: the mask outlives the call; the kernel reads maxnode - 1 bits of it.
        let r = unsafe {
            libc::syscall(
                libc::SYS_set_mempolicy,
                self.mode,
                self.mask.as_ptr(),
                self.maxnode(),
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// The host's NUMA nodes, read once at start from sysfs.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    /// Nodes with memory; empty when the kernel has no NUMA support.
    pub nodes: Vec<usize>,
    /// (node, its CPUs).
    pub cpus: Vec<(usize, Vec<usize>)>,
}

impl Topology {
    pub fn read() -> Topology {
        let base = std::path::Path::new("/sys/devices/system/node");
        let list = |f: &str| {
            std::fs::read_to_string(base.join(f))
                .ok()
                .and_then(|s| super::affinity::parse_cpu_list(s.trim()).ok())
        };
        let nodes = list("has_memory")
            .or_else(|| list("online"))
            .unwrap_or_default();
        let cpus = list("online")
            .unwrap_or_default()
            .into_iter()
            .filter_map(|n| Some((n, list(&format!("node{n}/cpulist"))?)))
            .collect();
        Topology { nodes, cpus }
    }

    /// Why `policy` does nothing here, if it does nothing.
    pub fn no_effect(&self, policy: NumaPolicy) -> Option<String> {
        match policy {
            NumaPolicy::Local => None,
            _ if self.nodes.is_empty() => Some(format!(
                "numa = {policy:?}: this kernel has no NUMA support (no /sys/devices/system/node): it has no effect"
            )),
            _ if self.nodes.len() == 1 => Some(format!(
                "numa = {policy:?}: this host has a single NUMA node: it is set but has no effect"
            )),
            _ => None,
        }
    }

    /// The policy for a worker whose home CPU is `cpu`; `None` when nothing is to be set.
    pub fn policy_for(&self, policy: NumaPolicy, cpu: usize) -> Option<MemPolicy> {
        if self.nodes.is_empty() {
            return None;
        }
        let nodes: Vec<usize> = match policy {
            NumaPolicy::Local => return None,
            NumaPolicy::Interleave => self.nodes.clone(),
            NumaPolicy::Bind => {
                let node = self
                    .cpus
                    .iter()
                    .find(|(_, cpus)| cpus.contains(&cpu))
                    .map(|(n, _)| *n)
                    .filter(|n| self.nodes.contains(n))
                    // A memoryless CPU node: the first node with memory.
                    .unwrap_or(self.nodes[0]);
                vec![node]
            }
        };
        let bits = libc::c_ulong::BITS as usize;
        let mut mask = vec![0; nodes.iter().max().map_or(0, |m| m / bits) + 1];
        for n in nodes {
            mask[n / bits] |= 1 << (n % bits);
        }
        Some(MemPolicy {
            mode: match policy {
                NumaPolicy::Bind => libc::MPOL_BIND,
                _ => libc::MPOL_INTERLEAVE,
            },
            mask,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_nodes() -> Topology {
        Topology {
            nodes: vec![0, 1],
            cpus: vec![(0, vec![0, 1]), (1, vec![2, 3])],
        }
    }

    #[test]
    fn policies_and_masks() {
        let t = two_nodes();
        assert_eq!(t.policy_for(NumaPolicy::Local, 0), None);
        let i = t.policy_for(NumaPolicy::Interleave, 0).unwrap();
        assert_eq!(
            (i.mode, i.mask.clone()),
            (libc::MPOL_INTERLEAVE, vec![0b11])
        );
        assert_eq!(i.maxnode(), 65);
        let b = t.policy_for(NumaPolicy::Bind, 3).unwrap();
        assert_eq!((b.mode, b.mask), (libc::MPOL_BIND, vec![0b10]));
        assert_eq!(t.no_effect(NumaPolicy::Interleave), None);
        let one = Topology {
            nodes: vec![0],
            cpus: vec![(0, vec![0, 1])],
        };
        assert!(one.no_effect(NumaPolicy::Bind).unwrap().contains("single"));
        assert!(
            Topology::default()
                .no_effect(NumaPolicy::Interleave)
                .unwrap()
                .contains("no NUMA")
        );
        assert_eq!(
            Topology::default().policy_for(NumaPolicy::Interleave, 0),
            None
        );
        let far = Topology {
            nodes: vec![70],
            cpus: vec![],
        };
        let m = far.policy_for(NumaPolicy::Bind, 0).unwrap();
        assert_eq!(m.mask, vec![0, 1 << 6]);
    }
}
