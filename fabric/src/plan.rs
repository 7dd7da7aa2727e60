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
    /// service ([`crate::circuits::check`]), that the topology in force does not cause already.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub circuits: Vec<topology::circuit::ReservationIssue>,
    /// The circuits' problems under the topology in force that the change leaves as they are
    /// (a circuit failed by an earlier change, say): not this change's doing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub circuits_already: Vec<topology::circuit::ReservationIssue>,
}

/// `site (1.00 ms via e > s)`, and `, drained` inside the brackets when the path crosses a drained
/// element (a drain alone changes nothing else the line shows: `tasman topology diff` says so too).
fn cand(c: &Option<Candidate>) -> String {
    match c {
        Some(c) => format!(
            "{} ({:.2} ms via {}{})",
            c.site,
            c.cost.as_millis_f64(),
            c.path
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(" > "),
            if c.drained { ", drained" } else { "" }
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
        // Sites report the capacity of the topology they run: under the new one, its own.
        let impact = topology::diff::impact_with(
            old,
            &old_live.floored(old),
            new,
            &new_live.floored(new).with_capacities_of(new),
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
            circuits_already: Vec::new(),
        }
    }

    /// Flags what the new topology does to the circuits' reservations (the apply goes ahead:
    /// the operator decides; circuits whose path breaks become `failed`): the problems the
    /// change causes apart from those the old topology has already, listed on their own.
    pub fn with_circuits(
        mut self,
        old: &Topology,
        new: &Topology,
        circuits: &[crate::circuits::Circuit],
    ) -> Plan {
        let before = crate::circuits::check(old, circuits);
        let (already, caused): (Vec<_>, Vec<_>) = crate::circuits::check(new, circuits)
            .into_iter()
            .partition(|i| was_there(i, &before, new));
        (self.circuits, self.circuits_already) = (caused, already);
        if !self.circuits.is_empty() {
            let _ = writeln!(
                self.text,
                "circuits: this change causes {} problem(s):",
                self.circuits.len()
            );
            for i in &self.circuits {
                let _ = writeln!(self.text, "  ! {i}");
            }
        }
        if !self.circuits_already.is_empty() {
            let _ = writeln!(
                self.text,
                "circuits: {} problem(s) already there before this change, not caused by it:",
                self.circuits_already.len()
            );
            for i in &self.circuits_already {
                let _ = writeln!(self.text, "    {i}");
            }
        }
        self
    }
}

/// Whether the old topology has `issue` already. An over-committed link counts when the change
/// does not lower its capacity (the circuits' reservations are the same on both sides; a lower
/// capacity makes the over-commitment worse, and that is the change's doing). A link or node
/// removed counts when the circuit was cut there already: the link down, or (for a link) either
/// of its ends down or gone; a node down, for a node (a decommission in two applies, down then
/// removed: the second was said to cause the problems of a circuit the first had failed).
fn was_there(
    issue: &topology::circuit::ReservationIssue,
    before: &[topology::circuit::ReservationIssue],
    new: &Topology,
) -> bool {
    // A node still down, or gone, in the new topology (a link removed where its end was down
    // is the change's doing when the change brings that end back up).
    let still_cut = |n: &topology::NodeId| {
        new.node(n.as_str())
            .is_none_or(|node| node.state == topology::AdminState::Down)
    };
    use topology::circuit::ReservationIssue::{
        LinkDown, LinkRemoved, NodeDown, NodeRemoved, OverCommitted,
    };
    match issue {
        OverCommitted { link, capacity, .. } => before.iter().any(|b| {
            matches!(b, OverCommitted { link: l, capacity: c, .. } if l == link && c <= capacity)
        }),
        LinkRemoved { circuit, link } => before.iter().any(|b| match b {
            LinkRemoved { circuit: c, link: l } | LinkDown { circuit: c, link: l } => {
                c == circuit && l == link
            }
            NodeDown { circuit: c, node: n } | NodeRemoved { circuit: c, node: n } => {
                c == circuit && (&link.0 == n || &link.1 == n) && still_cut(n)
            }
            _ => false,
        }),
        NodeRemoved { circuit, node } => before.iter().any(|b| {
            matches!(b, NodeRemoved { circuit: c, node: n } | NodeDown { circuit: c, node: n }
                if c == circuit && n == node)
        }),
        _ => before.contains(issue),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::circuits::{AEnd, Circuit, CircuitState};
    use topology::builder::{TopologyBuilder, ms};
    use topology::circuit::{BEnd, CircuitId, ReservationIssue};
    use topology::{AdminState, Bandwidth, LinkId, NodeId, NodeKind, ServiceName};

    fn circuit(id: &str, path: &[&str], state: CircuitState, mbps: u64) -> Circuit {
        Circuit {
            id: CircuitId::new(id),
            name: id.to_string(),
            a_end: AEnd {
                edge: NodeId::new(path[0]),
                prefix: "10.1.0.0/24".parse().unwrap(),
            },
            b_end: BEnd {
                service: ServiceName::new("chat"),
                regions: Vec::new(),
                sites: Vec::new(),
            },
            requested_rate: Bandwidth::from_mbps(mbps),
            assigned_rate: None,
            pool: None,
            vip: None,
            port: None,
            site: Some(NodeId::new(path[path.len() - 1])),
            path: path.iter().map(|n| NodeId::new(*n)).collect(),
            latency: None,
            held: None,
            state,
            reason: None,
            idempotency_key: None,
            created_with: None,
            created_by: "test".into(),
            created_unix_ms: 0,
            updated_unix_ms: 0,
            revision: 1,
        }
    }

    /// e > t > s, and s2 behind t; t--s at `capacity` Mbps, up or down.
    fn topo(capacity: u64, t_s: AdminState) -> Topology {
        let mut b = TopologyBuilder::new();
        b.node("e", NodeKind::Edge)
            .node("t", NodeKind::Transit)
            .node("s", NodeKind::Site)
            .node("s2", NodeKind::Site)
            .service("chat")
            .serve("s", "chat", 10)
            .serve("s2", "chat", 10)
            .link("e", "t", ms(1.0))
            .link_with("t", "s", ms(1.0), t_s)
            .link("t", "s2", ms(1.0));
        let mut t = b.build();
        let t_s = LinkId::new(&NodeId::new("t"), &NodeId::new("s"));
        for l in t.links.iter_mut().filter(|l| l.id() == t_s) {
            l.capacity = Bandwidth::from_mbps(capacity);
        }
        t
    }

    fn plan(old: &Topology, new: &Topology, circuits: &[Circuit]) -> Plan {
        Plan::compute(
            old,
            new,
            &LiveState::default(),
            &LiveState::default(),
            &Default::default(),
            &Default::default(),
        )
        .with_circuits(old, new, circuits)
    }

    /// Draining the only path to a site: the edge's new connections still cross it (nothing
    /// else reaches the site), and the plan says so. (It printed "cost changes: s (1.00 ms via
    /// e > s) -> s (1.00 ms via e > s) [+0.00 ms]", nothing visibly different.)
    #[test]
    fn a_drain_the_edge_cannot_avoid_is_shown_in_the_plan() {
        use topology::builder::{TopologyBuilder, ms};
        let build = |state: topology::AdminState| {
            let mut b = TopologyBuilder::new();
            b.node("e", topology::NodeKind::Edge)
                .node("s", topology::NodeKind::Site)
                .link_with("e", "s", ms(1.0), state)
                .service("chat")
                .serve("s", "chat", 100);
            b.build()
        };
        let (old, new) = (
            build(topology::AdminState::Up),
            build(topology::AdminState::Drain),
        );
        let live = LiveState::default();
        let p = Plan::compute(
            &old,
            &new,
            &live,
            &live,
            &Default::default(),
            &Default::default(),
        );
        assert!(
            p.text.contains(
                "e chat: cost changes: s (1.00 ms via e > s) -> s (1.00 ms via e > s, drained)"
            ),
            "{}",
            p.text
        );
    }

    /// A cut of a busy site's capacity (100 to 10, 50 streams open) makes it full under the
    /// new topology: the plan moves its edge to the next site, as routers will once the site
    /// reports the capacity it then runs with. (The plan read the capacity the site reported
    /// under the old topology, and predicted no change.)
    #[test]
    fn a_capacity_cut_under_the_open_streams_moves_the_edge() {
        use topology::builder::{TopologyBuilder, ms};
        let build = |cap: u32| {
            let mut b = TopologyBuilder::new();
            b.node("edge", topology::NodeKind::Edge)
                .node("s1", topology::NodeKind::Site)
                .node("s2", topology::NodeKind::Site)
                .link("edge", "s1", ms(2.0))
                .link("edge", "s2", ms(9.0))
                .service("chat")
                .serve("s1", "chat", cap)
                .serve("s2", "chat", 100);
            b.build()
        };
        let (old, new) = (build(100), build(10));
        let mut live = LiveState::default();
        let load = topology::route::SiteLoad {
            active_streams: 50,
            capacity: 100,
            healthy: true,
        };
        live.site_load.insert(NodeId::new("s1"), load);
        live.service_load.insert(
            NodeId::new("s1"),
            [(topology::ServiceName::new("chat"), load)].into(),
        );
        let p = Plan::compute(
            &old,
            &new,
            &live,
            &live,
            &Default::default(),
            &Default::default(),
        );
        let moves: Vec<(String, String)> = p
            .impact
            .iter()
            .map(|e| {
                let site = |c: &Option<topology::route::Candidate>| {
                    c.as_ref().map_or("-".to_string(), |c| c.site.to_string())
                };
                (site(&e.old), site(&e.new))
            })
            .collect();
        assert_eq!(moves, [("s1".to_string(), "s2".to_string())], "{}", p.text);
    }

    /// The plan tells the circuits' problems a change causes from those the topology in force
    /// has already: a circuit failed long ago by a removed node, and a link over-committed
    /// before, are no problem of a change that leaves them so (they were listed as the
    /// problems of every change, a comment-only one too).
    #[test]
    fn the_plan_tells_the_circuit_problems_a_change_causes_from_those_already_there() {
        let circuits = [
            // Failed when transit gone, on its path, was removed.
            circuit("c-1", &["e", "gone", "s2"], CircuitState::Failed, 10),
            // 150 Mbps reserved on t--s.
            circuit("c-2", &["e", "t", "s"], CircuitState::Active, 150),
        ];
        let removed = |i: &ReservationIssue| matches!(i, ReservationIssue::NodeRemoved { circuit, .. } if circuit.as_str() == "c-1");
        let over = |i: &ReservationIssue| matches!(i, ReservationIssue::OverCommitted { .. });

        // No change at all: nothing caused, c-1's old problems set apart.
        let v1 = topo(1000, AdminState::Up);
        let p = plan(&v1, &v1, &circuits);
        assert!(p.circuits.is_empty(), "{:?}", p.circuits);
        assert!(
            p.circuits_already.iter().any(removed),
            "{:?}",
            p.circuits_already
        );
        assert!(!p.text.contains("this change causes"), "{}", p.text);
        assert!(
            p.text
                .contains("already there before this change, not caused by it")
                && p.text.contains("circuit c-1 is reserved through node gone"),
            "{}",
            p.text
        );

        // t--s down: c-2's problem is this change's; c-1's still are not.
        let down = topo(1000, AdminState::Down);
        let p = plan(&v1, &down, &circuits);
        assert_eq!(
            p.circuits,
            vec![ReservationIssue::LinkDown {
                circuit: CircuitId::new("c-2"),
                link: LinkId::new(&NodeId::new("t"), &NodeId::new("s")),
            }]
        );
        assert!(p.circuits_already.iter().all(|i| !over(i)));
        assert!(p.circuits_already.iter().any(removed));
        assert!(
            p.text
                .contains("this change causes 1 problem(s):\n  ! circuit c-2"),
            "{}",
            p.text
        );

        // Over-committed at 100 Mbps already: raising the capacity to 120 leaves it so (not
        // caused), lowering it to 50 makes it worse (caused).
        let small = topo(100, AdminState::Up);
        let p = plan(&small, &topo(120, AdminState::Up), &circuits);
        assert!(p.circuits.is_empty(), "{:?}", p.circuits);
        assert!(p.circuits_already.iter().any(over));
        let p = plan(&small, &topo(50, AdminState::Up), &circuits);
        assert!(p.circuits.iter().any(over), "{:?}", p.circuits);
        assert!(!p.circuits_already.iter().any(over));
        // And from 1000 Mbps to 100: caused.
        let p = plan(&v1, &small, &circuits);
        assert!(p.circuits.iter().any(over), "{:?}", p.circuits);
    }

    /// A decommission in two applies, the element set down first (the circuit over it failed
    /// then), removed next: the removal causes no problem of that circuit. (A link down, then
    /// removed, gave "this change causes 1 problem(s)"; a node, three: the node's and each of
    /// its links'.)
    #[test]
    fn removing_what_was_down_already_causes_no_circuit_problem() {
        let circuits = [circuit("c-2", &["e", "t", "s"], CircuitState::Failed, 10)];
        let t_s = LinkId::new(&NodeId::new("t"), &NodeId::new("s"));
        // The link t--s: down, then removed.
        let down = topo(1000, AdminState::Down);
        let mut removed = down.clone();
        removed.links.retain(|l| l.id() != t_s);
        let p = plan(&down, &removed, &circuits);
        assert!(p.circuits.is_empty(), "{}", p.text);
        assert!(
            p.circuits_already
                .iter()
                .any(|i| matches!(i, ReservationIssue::LinkRemoved { link, .. } if *link == t_s)),
            "{}",
            p.text
        );
        // The node t: down, then removed with its links.
        let mut t_down = topo(1000, AdminState::Up);
        for n in t_down.nodes.iter_mut().filter(|n| n.id.as_str() == "t") {
            n.state = AdminState::Down;
        }
        let mut t_gone = t_down.clone();
        t_gone.nodes.retain(|n| n.id.as_str() != "t");
        t_gone
            .links
            .retain(|l| l.a.as_str() != "t" && l.b.as_str() != "t");
        let p = plan(&t_down, &t_gone, &circuits);
        assert!(p.circuits.is_empty(), "{}", p.text);
        assert!(!p.circuits_already.is_empty(), "{}", p.text);
        // The node t brought back up and its link to s removed in one change: the removal,
        // which keeps the circuit cut, is the change's doing.
        let mut back = t_down.clone();
        for n in back.nodes.iter_mut().filter(|n| n.id.as_str() == "t") {
            n.state = AdminState::Up;
        }
        back.links.retain(|l| l.id() != t_s);
        let p = plan(&t_down, &back, &circuits);
        assert!(
            p.circuits
                .iter()
                .any(|i| matches!(i, ReservationIssue::LinkRemoved { link, .. } if *link == t_s)),
            "{}",
            p.text
        );
        // Removing what was up is still the change's doing.
        let up = topo(1000, AdminState::Up);
        let mut gone = up.clone();
        gone.links.retain(|l| l.id() != t_s);
        let p = plan(&up, &gone, &circuits);
        assert!(
            p.circuits
                .iter()
                .any(|i| matches!(i, ReservationIssue::LinkRemoved { .. })),
            "{}",
            p.text
        );
    }
}
