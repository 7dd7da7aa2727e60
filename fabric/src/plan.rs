//! The impact plan shown before an apply: what changes in the topology
//! ([`topology::diff::diff`]) and which edges change the site, path or cost they use for a
//! service, by how much ([`topology::diff::impact`], under the controller's live state).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use topology::Topology;
use topology::diff::{ImpactEntry, ImpactKind, TopologyDiff, shares_text};
use topology::route::{Candidate, LiveState};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Plan {
    pub changed: bool,
    pub diff: TopologyDiff,
    pub impact: Vec<ImpactEntry>,
    /// The same, one change per line, as `tasman topology apply` prints it.
    pub text: String,
    /// Circuits the change would hurt: links over-committed, nodes or links removed or down
    /// under a circuit's reserved path, sites no longer serving (or allowed for) a circuit's
    /// service ([`crate::circuits::check`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub circuits: Vec<topology::circuit::ReservationIssue>,
}

fn cand(c: &Option<Candidate>) -> String {
    match c {
        Some(c) => format!(
            "{} ({:.2} ms via {})",
            c.site,
            c.cost.as_millis_f64(),
            c.path
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(" > ")
        ),
        None => "no site".into(),
    }
}

/// `; shared: a 50% + b 50% -> one site` when either side shares the edge's new connections
/// between equally near sites.
pub(crate) fn shares_line(e: &ImpactEntry) -> String {
    if e.old_shares.is_empty() && e.new_shares.is_empty() {
        return String::new();
    }
    format!(
        "; shared: {} -> {}",
        shares_text(&e.old_shares),
        shares_text(&e.new_shares)
    )
}

fn render(diff: &TopologyDiff, impact: &[ImpactEntry]) -> String {
    let mut s = String::new();
    for (section, d) in diff.sections() {
        let kind = section.trim_end_matches('s');
        for i in &d.added {
            let _ = writeln!(s, "+ {kind} {}", i.id);
        }
        for i in &d.removed {
            let _ = writeln!(s, "- {kind} {}", i.id);
        }
        for c in &d.changed {
            for f in &c.fields {
                let _ = writeln!(s, "~ {kind} {}: {} {} -> {}", c.id, f.field, f.old, f.new);
            }
        }
    }
    if !impact.is_empty() {
        let _ = writeln!(
            s,
            "impact on routing ({} edge/service choice(s) change):",
            impact.len()
        );
    }
    for e in impact {
        let what = match e.kind {
            ImpactKind::Lost => "LOST",
            ImpactKind::Gained => "gained",
            ImpactKind::SiteChanged => "site changes",
            ImpactKind::PathChanged => "path changes",
            ImpactKind::CostChanged => "cost changes",
            ImpactKind::SharesChanged => "shares change",
        };
        let delta = match (&e.old, &e.new) {
            (Some(o), Some(n)) => format!(
                " [{:+.2} ms]",
                n.cost.as_millis_f64() - o.cost.as_millis_f64()
            ),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "  {} {}: {what}: {} -> {}{delta}{}",
            e.edge,
            e.service,
            cand(&e.old),
            cand(&e.new),
            shares_line(e)
        );
    }
    s
}

impl Plan {
    /// `old_live` and `new_live`: the live state under each topology (the controller's
    /// telemetry merged against its declared latencies and sites: `LiveAggregator::merged`
    /// and `merged_for`); `incumbents`: the sites edges report in use, `margins`: the
    /// anti-flap margins they report (see [`topology::diff::impact_with`]).
    pub fn compute(
        old: &Topology,
        new: &Topology,
        old_live: &LiveState,
        new_live: &LiveState,
        incumbents: &topology::diff::Incumbents,
        margins: &topology::diff::Margins,
    ) -> Plan {
        let diff = topology::diff::diff(old, new);
        // Measured weights never go below a link's declared latency (routers treat it as the
        // propagation floor), so a raised declared latency counts even where it was measured lower.
        let impact = topology::diff::impact_with(
            old,
            &old_live.floored(old),
            new,
            &new_live.floored(new),
            incumbents,
            margins,
        );
        let text = render(&diff, &impact);
        Plan {
            changed: !diff.is_empty(),
            diff,
            impact,
            text,
            circuits: Vec::new(),
        }
    }

    /// Flags what the new topology does to the circuits' reservations (the apply goes ahead:
    /// the operator decides; circuits whose path breaks become `failed`).
    pub fn with_circuits(mut self, new: &Topology, circuits: &[crate::circuits::Circuit]) -> Plan {
        self.circuits = crate::circuits::check(new, circuits);
        if !self.circuits.is_empty() {
            let _ = writeln!(self.text, "circuits ({} problem(s)):", self.circuits.len());
            for i in &self.circuits {
                let _ = writeln!(self.text, "  ! {i}");
            }
        }
        self
    }
}
