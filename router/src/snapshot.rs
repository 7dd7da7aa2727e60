//! What drives a router: a versioned topology plus live state, from a file or the controller.

use std::sync::Arc;

use topology::Topology;
use topology::circuit::ProvisionedCircuit;
use topology::route::LiveState;

/// One complete, atomic view of the fabric. A router applies snapshots whole (no partial
/// updates), so there are no ordering hazards between topology and live state.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Increasing per source, except after a controller restored from an older backup (taken
    /// and counted: `version_regressions`); reported back in telemetry as the applied version.
    pub version: u64,
    pub topology: Arc<Topology>,
    /// The source's view of live state (the controller's merged telemetry; empty from a file).
    /// The router's own local evidence is layered on top of it and wins.
    pub live: LiveState,
    /// Provisioned circuits (the controller's; none from a file). Edges classify and rate-limit
    /// their own; every router on a circuit's path acknowledges the snapshot that carries it.
    pub circuits: Arc<Vec<ProvisionedCircuit>>,
}

impl Snapshot {
    pub fn new(version: u64, topology: Arc<Topology>) -> Self {
        Snapshot {
            version,
            topology,
            live: LiveState::default(),
            circuits: Arc::default(),
        }
    }
}
