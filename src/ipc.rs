//! The master⇄worker channel: typed messages, framed on a Unix stream socket pair.
//!
//! Each frame is a 4-byte big-endian length followed by one JSON-encoded message
//! (`tokio-util`'s length-delimited codec). Frames are small and rare (a heartbeat a second),
//! so JSON's cost does not matter and its readability does. A frame over [`MAX_FRAME`] or one
//! that does not decode is a protocol error: the reader reports it and the channel is closed;
//! the master then kills that worker. Nothing a worker sends can panic the master.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::codec::LengthDelimitedCodec;

use crate::config::{AcceptStrategy, HttpLimits};

/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 64 * 1024;

/// Everything a worker needs to serve; the first message on every channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerSetup {
    /// The worker's slot (0..N): stable across restarts and reloads.
    pub slot: usize,
    pub generation: u64,
    /// The CPU the slot is pinned to.
    pub cpu: usize,
    /// The `FileDescriptorName=` of each listening socket at fd 3.., in order.
    pub listeners: Vec<String>,
    /// This worker's entry on the load board.
    pub board_index: usize,
    pub log_level: String,
    pub http: HttpLimits,
    /// The `[service]` table, for the user's settings type to deserialize.
    pub service: toml::Value,
    /// Requests after which the worker stops accepting and asks to be replaced (the
    /// `max_requests` limit with this worker's jitter applied); 0 = no limit.
    pub max_requests: u64,
    pub chaos: bool,
    pub accept: AcceptStrategy,
    /// How long to drain when the worker decides to leave on its own (SIGTERM, a panic).
    pub drain_timeout_ms: u64,
    /// For `--chaos-boot-crash`: exit before reporting ready.
    pub crash_on_boot: bool,
    /// TLS for the sockets it names; the worker reads the pair itself, once.
    #[serde(default)]
    pub tls: Option<crate::tls::TlsSettings>,
    /// The generation's session-ticket key, shared by its workers so that a session begun
    /// on one resumes on any.
    #[serde(default)]
    pub tls_tickets: Option<crate::tls::TicketKey>,
    /// `[http] ready_path`, when on. Absent from a master older than the readiness
    /// endpoint (a binary upgrade runs new workers under the old master until a restart):
    /// such a master publishes no readiness, so its workers do not answer the path.
    #[serde(default)]
    pub ready_path: Option<String>,
}

/// Master → worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker {
    Setup(Box<WorkerSetup>),
    /// Heartbeat; answered with [`ToMaster::Pong`] carrying the same `seq`.
    Ping {
        seq: u64,
    },
    /// Stop accepting, finish in-flight requests within `timeout_ms`, exit.
    Drain {
        timeout_ms: u64,
    },
}

/// Worker → master.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToMaster {
    /// Listening sockets registered; serving from now on.
    Ready {
        /// The build this worker runs (see [`crate::version::VERSION`]); absent from
        /// workers built before it existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
    },
    Pong {
        seq: u64,
        requests: u64,
        connections: u64,
    },
    /// The worker is going away on its own (a panic) and has begun draining: start the
    /// replacement now.
    Leaving {
        reason: String,
        /// A planned departure (its request limit), not a fault: not charged to the restart
        /// budget.
        #[serde(default)]
        planned: bool,
    },
}

pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

pub fn encode<T: Serialize>(msg: &T) -> Bytes {
    // Serialising these plain enums cannot fail.
    Bytes::from(serde_json::to_vec(msg).expect("IPC messages always serialise"))
}

pub fn decode<'a, T: Deserialize<'a>>(frame: &'a [u8]) -> Result<T, String> {
    serde_json::from_slice(frame).map_err(|e| format!("undecodable IPC frame: {e}"))
}

impl ToWorker {
    pub fn drain(timeout: Duration) -> Self {
        ToWorker::Drain {
            timeout_ms: timeout.as_millis() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use tokio_util::codec::{Decoder, Encoder};

    #[test]
    fn roundtrip() {
        let mut c = codec();
        let mut buf = BytesMut::new();
        let msg = ToMaster::Pong {
            seq: 7,
            requests: 3,
            connections: 1,
        };
        c.encode(encode(&msg), &mut buf).unwrap();
        let frame = c.decode(&mut buf).unwrap().unwrap();
        assert_eq!(decode::<ToMaster>(&frame).unwrap(), msg);
    }

    #[test]
    fn oversized_frame_is_an_error() {
        let mut c = codec();
        let mut buf = BytesMut::from(&((MAX_FRAME as u32 + 1).to_be_bytes())[..]);
        assert!(c.decode(&mut buf).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for junk in [&b"{"[..], b"null", b"{\"type\":\"nope\"}", b"\xff\xfe"] {
            assert!(decode::<ToMaster>(junk).is_err());
        }
    }
}
