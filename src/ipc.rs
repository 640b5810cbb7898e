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
    #[serde(with = "http_wire")]
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

/// `[http]` on the channel. The configuration writes durations as text ("10s"); the channel
/// has always carried these four timeouts as whole milliseconds, and keeps doing so: a binary
/// upgrade runs new workers under the old master (and a rollback, old workers under a new
/// one). A key added to `[http]` since crosses in the configuration's own form, which an older
/// worker ignores and a newer one, under an older master, takes as its default.
mod http_wire {
    use serde::de::Error as _;
    use serde::ser::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::Value;

    use crate::config::HttpLimits;

    /// Frozen: the timeouts of the first channel.
    const IN_MS: [&str; 4] = [
        "header_read_timeout",
        "keepalive_timeout",
        "body_read_timeout",
        "send_timeout",
    ];

    pub fn serialize<S: Serializer>(http: &HttpLimits, s: S) -> Result<S::Ok, S::Error> {
        let mut v = serde_json::to_value(http).map_err(S::Error::custom)?;
        for (key, d) in IN_MS.iter().zip([
            http.header_read_timeout,
            http.keepalive_timeout,
            http.body_read_timeout,
            http.send_timeout,
        ]) {
            v[key] = Value::from(d.as_millis() as u64);
        }
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<HttpLimits, D::Error> {
        let mut v = Value::deserialize(d)?;
        for key in IN_MS {
            if let Some(ms) = v.get(key).and_then(Value::as_u64) {
                let text = humantime::format_duration(std::time::Duration::from_millis(ms));
                v[key] = Value::from(text.to_string());
            }
        }
        serde_json::from_value(v).map_err(D::Error::custom)
    }
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

    /// `[http]` crosses exactly as the first channel carried it (plus keys added since), and
    /// what an older master sends still reads.
    #[test]
    fn http_limits_keep_their_wire_form() {
        let first = serde_json::json!({
            "header_read_timeout": 10000, "keepalive_timeout": 75000,
            "max_header_bytes": 16384, "max_body_bytes": 1048576, "max_connections": 10000,
            "max_headers": 100, "body_read_timeout": 15000, "min_body_rate": 240,
            "max_pending_body_bytes": 67108864, "send_timeout": 30000,
            "access_log": false, "access_log_sample": 1.0
        });
        let mut sent =
            http_wire::serialize(&HttpLimits::default(), serde_json::value::Serializer).unwrap();
        sent.as_object_mut().unwrap().remove("ready_path");
        assert_eq!(sent, first);
        let mut read = http_wire::deserialize(first).unwrap();
        assert_eq!(read, HttpLimits::default());
        read.send_timeout = Duration::from_millis(1500);
        let sent = http_wire::serialize(&read, serde_json::value::Serializer).unwrap();
        assert_eq!(sent["send_timeout"], 1500);
        assert_eq!(http_wire::deserialize(sent).unwrap(), read);
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
