//! The impact plan shown before an apply: what changes in the topology and which edges change
//! the site or path they use for a service, by how much. Computed by `topology::diff`.

use serde::{Deserialize, Serialize};
use topology::Topology;
use topology::route::LiveState;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Plan {
    /// Human-readable plan, one change per line.
    pub text: String,
    /// Structured diff and impact (as `topology::diff` produces them).
    pub diff: serde_json::Value,
    pub impact: serde_json::Value,
    pub changed: bool,
}

impl Plan {
    pub fn compute(old: &Topology, new: &Topology, _live: &LiveState) -> Plan {
        // Replaced by topology::diff::{diff, impact} once they land on main.
        Plan { changed: old != new, ..Default::default() }
    }
}
