//! Connection hand-off for the `round-robin` accept strategy: the master accepts and passes
//! each connection to a worker over a `SOCK_SEQPACKET` pair with `SCM_RIGHTS`, as Node's
//! `SCHED_RR` does.
//!
//! Node and PM2 lose a connection handed to a worker that dies before taking it. Here every
//! hand-off carries an id, the worker acknowledges the id as soon as it holds the descriptor
//! (before reading a byte), and the master keeps its own copy of the descriptor until then.
//! If the worker's channel closes first, the master hands the same connection to another
//! worker, so the client never notices.
//!
//! Wire format: master → worker, 8 bytes of id (little endian) with one descriptor attached;
//! worker → master, the same 8 bytes back.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// A new hand-off channel: (master's end, worker's end), both close-on-exec.
pub fn channel_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(std::io::Error::from)
}

/// Sends `conn` with `id`. `Err(EAGAIN)` means the worker's queue is full; `EPIPE`/
/// `ECONNRESET` that it is gone.
pub fn send(channel: RawFd, id: u64, conn: RawFd) -> Result<(), Errno> {
    let bytes = id.to_le_bytes();
    let fds = [conn];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(
        channel,
        &[IoSlice::new(&bytes)],
        &cmsg,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map(|_| ())
}

/// What a worker reads from its hand-off channel.
pub enum Received {
    Conn {
        id: u64,
        fd: OwnedFd,
    },
    /// The master closed the channel.
    Closed,
}

/// Receives one hand-off; `Err(EAGAIN)` when none is waiting.
pub fn recv(channel: RawFd) -> Result<Received, Errno> {
    let mut bytes = [0u8; 8];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let (n, fd) = {
        let mut iov = [IoSliceMut::new(&mut bytes)];
        let msg = recvmsg::<()>(
            channel,
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fd = None;
        for c in msg.cmsgs().map_err(|_| Errno::ENOBUFS)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for raw in fds {
                    // SAFETY: the kernel just installed this descriptor for us; extra ones
                    // (never sent by the master) are closed by dropping them.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
        }
        (msg.bytes, fd)
    };
    match (n, fd) {
        (0, None) => Ok(Received::Closed),
        (8, Some(fd)) => Ok(Received::Conn {
            id: u64::from_le_bytes(bytes),
            fd,
        }),
        _ => Err(Errno::EBADMSG),
    }
}

/// The worker's acknowledgement.
pub fn ack(channel: RawFd, id: u64) -> Result<(), Errno> {
    let n = nix::sys::socket::send(
        channel,
        &id.to_le_bytes(),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
    )?;
    if n == 8 { Ok(()) } else { Err(Errno::EMSGSIZE) }
}

/// Reads one acknowledgement: `Ok(None)` when the worker closed its end.
pub fn read_ack(channel: &OwnedFd) -> Result<Option<u64>, Errno> {
    let mut bytes = [0u8; 8];
    let n = nix::sys::socket::recv(channel.as_raw_fd(), &mut bytes, MsgFlags::MSG_DONTWAIT)?;
    match n {
        0 => Ok(None),
        8 => Ok(Some(u64::from_le_bytes(bytes))),
        _ => Err(Errno::EBADMSG),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_crosses_and_is_acknowledged() {
        let (m, w) = channel_pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        send(m.as_raw_fd(), 7, file.as_raw_fd()).unwrap();
        match recv(w.as_raw_fd()).unwrap() {
            Received::Conn { id, fd } => {
                assert_eq!(id, 7);
                assert_ne!(fd.as_raw_fd(), file.as_raw_fd());
            }
            Received::Closed => panic!("closed"),
        }
        ack(w.as_raw_fd(), 7).unwrap();
        assert_eq!(read_ack(&m).unwrap(), Some(7));
        assert_eq!(recv(w.as_raw_fd()).err(), Some(Errno::EAGAIN));
        drop(m);
        assert!(matches!(recv(w.as_raw_fd()), Ok(Received::Closed)));
    }

    #[test]
    fn sending_to_a_dead_worker_fails_so_the_master_can_retry() {
        let (m, w) = channel_pair().unwrap();
        drop(w);
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(send(m.as_raw_fd(), 1, file.as_raw_fd()).is_err());
    }
}
