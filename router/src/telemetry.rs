//! What a router reports about itself: to the controller (shipped by `router::control`), on
//! `/telemetry`, and in the Prometheus metrics.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use topology::{NodeId, ServiceName};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryReport {
    pub node: NodeId,
    /// The version of the snapshot this router applies now.
    pub snapshot_version: u64,
    pub neighbours: Vec<NeighbourReport>,
    /// Services this node serves as a site (empty for edges and transits).
    pub sites: Vec<SiteReport>,
    /// Edge only: service -> preferred site now.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub preferred: BTreeMap<String, String>,
    /// The router is draining before it stops: it takes no new stream, and reports its links
    /// down and its services unhealthy so that new connections go around it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    /// Edge only: the anti-flap margins it picks its preferred sites with (`--hysteresis-*`),
    /// so that the controller's apply plan predicts its moves as it makes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hysteresis: Option<HysteresisReport>,
}

/// An edge's anti-flap margins: a cheaper site takes over only if it is at least `margin_us`
/// cheaper and below `ratio` times the cost of the site in use.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HysteresisReport {
    pub margin_us: u64,
    pub ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeighbourReport {
    pub id: NodeId,
    /// Smoothed QUIC RTT of our connection to it, in microseconds (0 when never connected).
    pub rtt_us: u64,
    pub up: bool,
    /// Largest UDP payload the connection has confirmed (path MTU discovery), bytes; 0 when
    /// there is no connection.
    #[serde(default)]
    pub path_mtu: u16,
    /// Packets the current connection declared lost (restarts at 0 with a new connection).
    #[serde(default)]
    pub lost_packets: u64,
    /// Dial attempts to it that ended without a usable connection (none, or one closed before it
    /// answered a probe: e.g. it refused our certificate), since this router started.
    #[serde(default)]
    pub dial_failures: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteReport {
    pub service: ServiceName,
    pub healthy: bool,
    pub active_streams: u32,
    pub capacity: u32,
}
