//! The control protocol between a router and the controller: length-prefixed JSON frames on one
//! bidirectional QUIC stream of a mutual-TLS connection that the router opens.
//!
//! ```text
//! router                                   controller
//!   Hello{node, have_version}  ───────────▶
//!                              ◀─────────── Snapshot{version, topology_version, topology, live}   (full)
//!   Ack{version} | Nack{version, reason} ─▶
//!                              ◀─────────── Live{version, base_version, live}   (delta: topology unchanged)
//!   Resync{have_version}       ───────────▶   (delta did not apply: send a full snapshot)
//!   Telemetry(report)          ───────────▶   (every second)
//!                              ◀─────────── Heartbeat{version}   (refreshes the router's staleness clock)
//! ```
//!
//! Each frame is a 4-byte big-endian length and that many bytes of JSON. A reader refuses a
//! frame over its limit ([`MAX_TO_ROUTER`], [`MAX_FROM_ROUTER`]) before reading it. The
//! controller encodes each version once ([`encode`]) and writes the same `Bytes` to every
//! router (go-control-plane #238: per-connection serialisation dominates at scale).

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use topology::Topology;
use topology::circuit::ProvisionedCircuit;
use topology::route::LiveState;

use crate::telemetry::TelemetryReport;

/// Largest frame the controller sends: a full snapshot of a large fabric.
pub const MAX_TO_ROUTER: usize = 64 << 20;
/// Largest frame a router sends (a telemetry report of a router with many neighbours).
pub const MAX_FROM_ROUTER: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToRouter {
    /// A full snapshot. Always the first message of a connection (unless the controller's
    /// current version is one this router rejected).
    Snapshot {
        version: u64,
        topology_version: u64,
        topology: Arc<Topology>,
        live: LiveState,
        /// Provisioned circuits (a change of circuits is always sent in full).
        #[serde(default)]
        circuits: Arc<Vec<ProvisionedCircuit>>,
    },
    /// Only the live state changed since `base_version`: apply it on top of that version's
    /// topology and circuits.
    Live {
        version: u64,
        base_version: u64,
        topology_version: u64,
        live: LiveState,
    },
    /// Sent when nothing changed for a while; the router's staleness clock restarts.
    Heartbeat { version: u64 },
    /// The controller refuses this router (unknown node, name mismatch); it closes after this.
    Refused { reason: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromRouter {
    /// First message: who the router is and which snapshot version it already has (from disk).
    Hello {
        node: String,
        have_version: Option<u64>,
    },
    Ack {
        version: u64,
    },
    /// The router rejected `version` and keeps its previous snapshot. The controller records
    /// it and does not send that version to this router again.
    Nack {
        version: u64,
        reason: String,
    },
    /// A delta arrived for a base the router does not hold: send the current version in full.
    Resync {
        have_version: Option<u64>,
    },
    Telemetry(TelemetryReport),
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` as one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Bytes, ProtoError> {
    let mut buf = BytesMut::with_capacity(256);
    buf.put_u32(0);
    serde_json::to_writer((&mut buf).writer(), msg)?;
    let len = buf.len() - 4;
    let len32 = u32::try_from(len).map_err(|_| ProtoError::TooLarge {
        size: len,
        max: u32::MAX as usize,
    })?;
    buf[..4].copy_from_slice(&len32.to_be_bytes());
    Ok(buf.freeze())
}

pub fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, ProtoError> {
    Ok(serde_json::from_slice(payload)?)
}

/// Reads one frame's payload; `None` at a clean end of stream before a frame starts.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, ProtoError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let size = u32::from_be_bytes(len) as usize;
    if size > max {
        return Err(ProtoError::TooLarge { size, max });
    }
    let mut payload = vec![0u8; size];
    r.read_exact(&mut payload).await?;
    Ok(Some(payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frame_round_trip_and_oversized_frame_is_refused_before_reading() {
        let msg = FromRouter::Nack {
            version: 7,
            reason: "node not in topology".into(),
        };
        let bytes = encode(&msg).unwrap();
        let mut r = &bytes[..];
        let payload = read_frame(&mut r, MAX_FROM_ROUTER).await.unwrap().unwrap();
        assert_eq!(decode::<FromRouter>(&payload).unwrap(), msg);
        assert!(read_frame(&mut r, MAX_FROM_ROUTER).await.unwrap().is_none());

        let mut huge = Vec::from(((MAX_FROM_ROUTER + 1) as u32).to_be_bytes());
        huge.extend_from_slice(b"{}");
        let mut r = &huge[..];
        assert!(matches!(
            read_frame(&mut r, MAX_FROM_ROUTER).await,
            Err(ProtoError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode::<ToRouter>(b"\xff\x00not json").is_err());
        assert!(decode::<ToRouter>(br#"{"type":"snapshot","version":"x"}"#).is_err());
    }
}
