//! The shell's side of one worker: starting it ([`Master::spawn_worker`]: the boot message,
//! the descriptors, the generation's TLS ticket key), its channel, its hand-off socket, its
//! load-board entry, and what the master reads of it from `/proc` for `app status` and the
//! metrics. The
//! supervisor's view of the same worker (its life, its heartbeats) is
//! [`core::worker::Worker`](super::core::worker::Worker); the two share the pid.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tracing::{info, warn};

use super::memory::Memory;
use super::rates::Rates;
use super::spawn::{self, SpawnRequest};
use super::{ChannelEvent, Master};
use crate::ipc::{self, ToMaster, ToWorker, WorkerSetup};

pub struct Process {
    pub pid: i32,
    pub slot: usize,
    pub generation: u64,
    pub tx: mpsc::UnboundedSender<ToWorker>,
    /// The master's end of the connection hand-off channel.
    pub handoff: Arc<OwnedFd>,
    /// Its entry on the load board.
    pub board_index: usize,
    /// CPU % and requests/s for `app status`.
    pub rates: Rates,
    pub memory: Memory,
    /// The latest heartbeat sent: its seq and when (for the round trip in the metrics).
    pub ping: Option<(u64, Instant)>,
    /// The CPUs it may run on now, and how it got them.
    pub mask: Vec<usize>,
    pub affinity: super::balance::Placement,
}

impl Process {
    pub fn send(&mut self, msg: ToWorker, now: Instant) {
        if let ToWorker::Ping { seq } = msg {
            self.ping = Some((seq, now));
        }
        // A closed channel means the worker is exiting; the reaper will see it.
        let _ = self.tx.send(msg);
    }

    /// The round trip of the heartbeat a `Pong { seq }` answers, if it answers the latest.
    pub fn round_trip(&self, seq: u64, now: Instant) -> Option<Duration> {
        match self.ping {
            Some((sent_seq, at)) if sent_seq == seq && seq > 0 => {
                Some(now.saturating_duration_since(at))
            }
            _ => None,
        }
    }
}

/// Wires a worker's channel into the loop: a reader task forwarding decoded messages,
/// a writer task draining an unbounded queue (so the loop never waits on a worker).
///
/// `first` (the boot message) is written before this returns, not queued: the writer
/// task runs only when the loop yields, and a reload of hundreds of workers spawns them
/// all in one turn, which on a loaded host outlasts the worker's wait for its setup. The
/// socket pair is new and empty, so the write fits its buffer; the timeout only bounds a
/// message larger than the buffer that a dead worker never reads. A failed write is not
/// a failed spawn: a worker that is already gone (a binary that exits at once) is judged
/// by its exit like any other, and one left without its setup gives up on its own.
pub fn attach_channel(
    pid: i32,
    mut stream: std::os::unix::net::UnixStream,
    first: &ToWorker,
    events: mpsc::UnboundedSender<ChannelEvent>,
) -> std::io::Result<mpsc::UnboundedSender<ToWorker>> {
    {
        use std::io::Write;
        use tokio_util::codec::Encoder;
        let mut frame = bytes::BytesMut::new();
        ipc::codec().encode(ipc::encode(first), &mut frame)?;
        stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        if let Err(e) = stream.write_all(&frame) {
            tracing::debug!(pid, "boot message not delivered: {e}");
        }
    }
    stream.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(stream)?;
    let (mut sink, mut frames) = Framed::new(stream, ipc::codec()).split();
    tokio::spawn(async move {
        let error = loop {
            match frames.next().await {
                None => break None,
                Some(Err(e)) => break Some(e.to_string()),
                Some(Ok(frame)) => match ipc::decode::<ToMaster>(&frame) {
                    Ok(msg) => {
                        if events.send(ChannelEvent::Message { pid, msg }).is_err() {
                            return;
                        }
                    }
                    Err(e) => break Some(e),
                },
            }
        };
        let _ = events.send(ChannelEvent::Closed { pid, error });
    });
    let (tx, mut rx) = mpsc::unbounded_channel::<ToWorker>();
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if sink.send(ipc::encode(&msg)).await.is_err() {
                break;
            }
        }
    });
    Ok(tx)
}

impl Master {
    /// The generation's ticket key, made on its first worker; keys of generations without
    /// workers are dropped then. `None` (resumption on one worker only) if the host has no
    /// randomness to give.
    fn ticket_key(&mut self, generation: u64) -> Option<crate::tls::TicketKey> {
        if !self.ticket_keys.contains_key(&generation) {
            let alive = self.core.pool().live_generations();
            self.ticket_keys.retain(|g, _| alive.contains(g));
            match crate::tls::TicketKey::generate() {
                Ok(k) => {
                    self.ticket_keys.insert(generation, k);
                }
                Err(e) => {
                    warn!("{e}: TLS sessions resume only on the worker that began them");
                    return None;
                }
            }
        }
        let key = self.ticket_keys.get_mut(&generation)?;
        key.forget_before_last_period();
        Some(key.clone())
    }

    /// Keeps the master's copies of the ticket keys no older than its workers' (a key held
    /// here unchanged for days would open every ticket issued since).
    pub(super) fn ratchet_ticket_keys(&mut self) {
        for key in self.ticket_keys.values_mut() {
            key.forget_before_last_period();
        }
    }

    /// [`Action::Spawn`]: starts one worker of `generation` in `slot`, homed on `cpu`.
    pub(super) fn spawn_worker(
        &mut self,
        generation: u64,
        slot: usize,
        cpu: usize,
        request_limit: u64,
    ) -> std::io::Result<i32> {
        let config = self.core.config_of(generation).clone();
        let tls_tickets = if config.tls.is_some() {
            self.ticket_key(generation)
        } else {
            None
        };
        let exe = self
            .exes
            .range(..=generation)
            .next_back()
            .map(|(_, e)| e)
            .ok_or_else(|| std::io::Error::other("no binary for this generation"))?;
        let board_index = self.board.assign().ok_or_else(|| {
            // Entries come free as old workers exit: a resource shortage, not a failure.
            std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "no free load-board entry: too many workers alive at once",
            )
        })?;
        let (mask, affinity) = self.balance.initial(cpu);
        let mempolicy = self.numa.policy_for(config.numa, cpu);
        let spawned = spawn::spawn(SpawnRequest {
            exe,
            listeners: &self.listeners,
            board: self.board.fd().as_raw_fd(),
            mask: &mask,
            mempolicy: mempolicy.as_ref(),
            argv: &self.argv,
        });
        let spawned = match spawned {
            Ok(s) => s,
            Err(e) => {
                self.board.release(board_index);
                return Err(e);
            }
        };
        let pid = spawned.pid;
        let setup = WorkerSetup {
            slot,
            generation,
            cpu,
            listeners: self.listeners.iter().map(|l| l.name.clone()).collect(),
            board_index,
            log_level: config.log_level.clone(),
            http: config.http.clone(),
            service: config.service.clone(),
            max_requests: request_limit,
            chaos: config.chaos,
            accept: config.accept,
            drain_timeout_ms: config.drain_timeout.as_millis() as u64,
            crash_on_boot: config.chaos_boot_crash,
            tls: config.tls.clone(),
            tls_tickets,
            ready_path: config.http.ready_path(),
        };
        let tx = attach_channel(
            pid,
            spawned.channel,
            &ToWorker::Setup(Box::new(setup)),
            self.channel_tx.clone(),
        )?;
        let handoff = Arc::new(spawned.handoff);
        if let Some(rr) = &self.round_robin {
            rr.watch(pid, handoff.clone());
        }
        let p = Process {
            pid,
            slot,
            generation,
            tx,
            handoff,
            board_index,
            rates: Default::default(),
            memory: Default::default(),
            ping: None,
            mask,
            affinity,
        };
        self.metrics_spawned(&p);
        self.processes.insert(pid, p);
        info!(
            worker_id = slot,
            worker_pid = pid,
            generation,
            cpu,
            "worker {slot} (pid {pid}) started on CPU {cpu}, generation {generation}"
        );
        Ok(pid)
    }
}

/// A start that failed because the host is short of something (descriptors, processes,
/// memory), not because of the worker or its binary.
pub(super) fn host_resource_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::EAGAIN | libc::ENOMEM | libc::ENOBUFS)
    ) || matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::OutOfMemory
    )
}
