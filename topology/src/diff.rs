//! What changes between two topologies: the structural [`diff`] (added, removed and changed
//! nodes, links, services and pools, with old and new values per changed field) and the
//! [`impact`] on routing (every edge and service whose chosen site, path or cost changes, chosen
//! the way routers choose: by cost, keeping the site an edge already uses unless another wins by
//! the anti-flap margins).
//!
//! Field values are compared through their serde (JSON) form, so every field of the model is
//! covered without a hand-written comparison that could drift from the model. Values print the
//! way they are written in YAML (`"12ms"`, `"10Gbps"`).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::graph::Graph;
use crate::model::{Link, NodeId, NodeKind, Pool, ServiceName, Topology};
use crate::route::{
    Candidate, Hysteresis, LiveState, RouteError, RoutingTable, Share, Spread, preferred_first,
};

/// The structural difference between two topologies. Every list is sorted by id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TopologyDiff {
    pub nodes: SectionDiff,
    pub links: SectionDiff,
    pub services: SectionDiff,
    pub pools: SectionDiff,
}

/// Changes within one section (nodes, links, services or pools).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SectionDiff {
    pub added: Vec<Item>,
    pub removed: Vec<Item>,
    pub changed: Vec<ChangedItem>,
}

/// A whole added or removed element: its id (a link's is `a--b`) and its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub id: String,
    pub value: Value,
}

/// An element present in both topologies whose fields differ.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangedItem {
    pub id: String,
    pub fields: Vec<FieldChange>,
}

/// One changed field. `field` is a path such as `state`, `location.lat` or
/// `serves[llm-chat].capacity`; `old`/`new` are `null` when the field is absent on that side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldChange {
    pub field: String,
    pub old: Value,
    pub new: Value,
}

impl SectionDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl TopologyDiff {
    pub fn is_empty(&self) -> bool {
        self.sections().iter().all(|(_, s)| s.is_empty())
    }

    /// The sections with their names, in display order.
    pub fn sections(&self) -> [(&'static str, &SectionDiff); 4] {
        [
            ("nodes", &self.nodes),
            ("links", &self.links),
            ("services", &self.services),
            ("pools", &self.pools),
        ]
    }
}

/// Structural diff of `old` -> `new`.
pub fn diff(old: &Topology, new: &Topology) -> TopologyDiff {
    TopologyDiff {
        nodes: section(&old.nodes, &new.nodes, |n| n.id.to_string()),
        links: section(&sorted_ends(&old.links), &sorted_ends(&new.links), |l| {
            l.id().to_string()
        }),
        services: section(&old.services, &new.services, |s| s.name.to_string()),
        pools: section(&ranked(&old.pools), &ranked(&new.pools), |p| {
            p.get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        }),
    }
}

/// The pools, each with its `order`: its place among the pools of its address family (1: the
/// first a circuit that names none tries for its VIP). Pools are matched by name, so without it
/// swapping two pools of a family, which changes where new circuits' VIPs come from, would be
/// no change.
fn ranked(pools: &[Pool]) -> Vec<Value> {
    let (mut v4, mut v6) = (0u32, 0u32);
    pools
        .iter()
        .map(|p| {
            let n = match p.prefix {
                ipnetwork::IpNetwork::V4(_) => &mut v4,
                ipnetwork::IpNetwork::V6(_) => &mut v6,
            };
            *n += 1;
            let mut v = to_value(p);
            if let Value::Object(m) = &mut v {
                m.insert("order".into(), Value::from(*n));
            }
            v
        })
        .collect()
}

/// The lists of the model whose order means something, by field name: a service's `vips` (a
/// circuit to a service with no `port` is reached at its first VIP's port). Every other list is
/// a set.
const ORDERED_LISTS: &[&str] = &["vips"];

fn is_ordered(path: &str) -> bool {
    let last = path.rsplit('.').next().unwrap_or(path);
    ORDERED_LISTS.contains(&last)
}

/// A link's ends in the order its id names them: a link is undirected, so `a: x, b: y` and
/// `a: y, b: x` are the same link, not a change of both ends.
fn sorted_ends(links: &[Link]) -> Vec<Link> {
    links
        .iter()
        .map(|l| {
            let mut l = l.clone();
            if l.a > l.b {
                std::mem::swap(&mut l.a, &mut l.b);
            }
            l
        })
        .collect()
}

fn to_value<T: Serialize>(v: &T) -> Value {
    // The model's Serialize impls are infallible (no maps with non-string keys).
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn section<T: Serialize>(old: &[T], new: &[T], id: impl Fn(&T) -> String) -> SectionDiff {
    // First of a duplicated id wins, as in the graph; validated topologies have none.
    let mut o: BTreeMap<String, Value> = BTreeMap::new();
    for x in old {
        o.entry(id(x)).or_insert_with(|| to_value(x));
    }
    let mut n: BTreeMap<String, Value> = BTreeMap::new();
    for x in new {
        n.entry(id(x)).or_insert_with(|| to_value(x));
    }
    let mut d = SectionDiff::default();
    for (k, ov) in &o {
        match n.get(k) {
            None => d.removed.push(Item {
                id: k.clone(),
                value: ov.clone(),
            }),
            Some(nv) if nv != ov => {
                let mut fields = Vec::new();
                fields_diff(String::new(), ov, nv, &mut fields);
                // Nothing but the order of a list changed (a site's `serves`, a service's
                // `clients`...): a set, as every list of the model but those [`is_ordered`]
                // names (and the pools, whose order [`ranked`] makes a field).
                if !fields.is_empty() {
                    d.changed.push(ChangedItem {
                        id: k.clone(),
                        fields,
                    });
                }
            }
            Some(_) => {}
        }
    }
    for (k, nv) in &n {
        if !o.contains_key(k) {
            d.added.push(Item {
                id: k.clone(),
                value: nv.clone(),
            });
        }
    }
    d
}

/// The key by which elements of a list are matched, when they all have one.
const LIST_KEYS: &[&str] = &["service", "name", "id"];

fn keyed(list: &[Value]) -> Option<(&'static str, BTreeMap<String, &Value>)> {
    'keys: for key in LIST_KEYS {
        let mut map = BTreeMap::new();
        for v in list {
            match v.get(key) {
                Some(Value::String(s)) if !map.contains_key(s) => {
                    map.insert(s.clone(), v);
                }
                _ => continue 'keys,
            }
        }
        return Some((key, map));
    }
    None
}

fn join(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

/// The default of a scalar field the model leaves out of its serialised form at that value, so
/// that files without it serialise as before it existed. Absent on one side of an element present
/// on both, such a field compares (and prints) as its default: a dial set from 100 to 30 is
/// `100 -> 30`, and an affinity set is `"none" -> "source_ip"`, not `null -> ...`. (Lists and
/// optional values left out when empty still print as `null`: absent.)
fn omitted_default(field: &str) -> Option<Value> {
    match field {
        "dial" => Some(Value::from(crate::model::FULL_DIAL)),
        "affinity" => serde_json::to_value(crate::model::Affinity::default()).ok(),
        "health_interval" => {
            serde_json::to_value(crate::model::HealthPolicy::DEFAULT_INTERVAL).ok()
        }
        "unhealthy_after" => Some(Value::from(
            crate::model::HealthPolicy::DEFAULT_UNHEALTHY_AFTER,
        )),
        "healthy_after" => Some(Value::from(
            crate::model::HealthPolicy::DEFAULT_HEALTHY_AFTER,
        )),
        _ => None,
    }
}

fn field_or_default<'a>(
    obj: &'a serde_json::Map<String, Value>,
    key: &str,
    default: &'a Option<Value>,
) -> &'a Value {
    obj.get(key).or(default.as_ref()).unwrap_or(&Value::Null)
}

fn fields_diff(path: String, old: &Value, new: &Value, out: &mut Vec<FieldChange>) {
    if old == new {
        return;
    }
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let keys: BTreeSet<&String> = o.keys().chain(n.keys()).collect();
            for k in keys {
                let default = omitted_default(k);
                let (ov, nv) = (
                    field_or_default(o, k, &default),
                    field_or_default(n, k, &default),
                );
                fields_diff(join(&path, k), ov, nv, out);
            }
        }
        (Value::Array(o), Value::Array(n)) => match (keyed(o), keyed(n)) {
            (Some((ko, om)), Some((kn, nm))) if ko == kn && !om.is_empty() && !nm.is_empty() => {
                let keys: BTreeSet<&String> = om.keys().chain(nm.keys()).collect();
                for k in keys {
                    let ov = om.get(k).copied().unwrap_or(&Value::Null);
                    let nv = nm.get(k).copied().unwrap_or(&Value::Null);
                    fields_diff(format!("{path}[{k}]"), ov, nv, out);
                }
            }
            _ if !is_ordered(&path) && same_set(o, n) => {}
            _ => out.push(FieldChange {
                field: path,
                old: old.clone(),
                new: new.clone(),
            }),
        },
        _ => out.push(FieldChange {
            field: path,
            old: old.clone(),
            new: new.clone(),
        }),
    }
}

/// Whether two lists hold the same elements, in any order (with as many copies of each).
fn same_set(o: &[Value], n: &[Value]) -> bool {
    let sorted = |l: &[Value]| {
        let mut v: Vec<String> = l.iter().map(Value::to_string).collect();
        v.sort_unstable();
        v
    };
    o.len() == n.len() && sorted(o) == sorted(n)
}

/// How one (edge, service) pair's choice changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImpactKind {
    /// Served before, not any more (no eligible site, or the edge or service is gone).
    Lost,
    /// Not served before, served now.
    Gained,
    /// A different site.
    SiteChanged,
    /// Same site, different path.
    PathChanged,
    /// Same site and path, different cost (or drained flag).
    CostChanged,
    /// Same site, path and cost, but the expected shares of first tries change
    /// (`old_shares`, `new_shares`): the equally near sites that share the new connections,
    /// their weights, or the traffic dials that move first tries to the sites after them.
    SharesChanged,
}

/// One edge and service whose choice changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImpactEntry {
    pub edge: NodeId,
    pub service: ServiceName,
    pub kind: ImpactKind,
    pub old: Option<Candidate>,
    pub new: Option<Candidate>,
    /// Before: the sites the edge's new connections for the service try first, with their
    /// expected shares after weights and dials ([`crate::route::Spread::shares`]); empty when
    /// one site takes them all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub old_shares: Vec<Share>,
    /// After, the same.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub new_shares: Vec<Share>,
}

/// `site 75% + site 25%` for shares; `one site` when there are none (one site takes all),
/// each share as [`share_percents`] writes it.
pub fn shares_text(shares: &[Share]) -> String {
    if shares.is_empty() {
        return "one site".to_string();
    }
    let values: Vec<f64> = shares.iter().map(|s| s.share).collect();
    shares
        .iter()
        .zip(share_percents(&values))
        .map(|(s, p)| format!("{} {p}", s.site))
        .collect::<Vec<_>>()
        .join(" + ")
}

/// Shares (each in `[0, 1]`) as whole percents that add up to 100: each share's floor, then a
/// point more to the largest remainders, in millionths of a percent, equal ones to the first
/// listed (rounded one by one, 1, 1, 4 read `17% + 17% + 67%`, 101 %). A share above nothing
/// that rounds to 0 reads `<1%`, not the `0%` of a site that takes nothing.
pub fn share_percents(shares: &[f64]) -> Vec<String> {
    const UNIT: u64 = 1_000_000;
    // In millionths of a percent: float noise (1/6 and 4/6 of 100 differ in their last bits)
    // does not decide which of two equal remainders gets the point.
    let exact: Vec<u64> = shares
        .iter()
        .map(|s| ((s.clamp(0.0, 1.0) * 100.0) * UNIT as f64).round() as u64)
        .collect();
    let mut whole: Vec<u64> = exact.iter().map(|e| e / UNIT).collect();
    let target = (exact.iter().sum::<u64>() + UNIT / 2) / UNIT;
    let mut by_remainder: Vec<usize> = (0..exact.len()).collect();
    by_remainder.sort_by_key(|&i| (std::cmp::Reverse(exact[i] % UNIT), i));
    let short = target.saturating_sub(whole.iter().sum());
    for &i in by_remainder.iter().take(short as usize) {
        whole[i] += 1;
    }
    shares
        .iter()
        .zip(&whole)
        .map(|(&s, &w)| match (w, s > 0.0) {
            (0, true) => "<1%".to_string(),
            _ => format!("{w}%"),
        })
        .collect()
}

/// The expected shares of the edge's first tries ([`Spread::shares`]) when it uses `chosen`
/// among `ranked`, where `before` names the members of the edge's previous group (empty for
/// none; [`Spread::sticky`]).
pub fn shares_of(
    ranked: &[Candidate],
    chosen: Option<&Candidate>,
    before: &[NodeId],
) -> Vec<Share> {
    group_of(ranked, chosen, before)
        .map(|(ordered, spread)| spread.shares(&ordered))
        .unwrap_or_default()
}

/// `ranked` with `chosen` first, and the group that shares its new connections.
fn group_of(
    ranked: &[Candidate],
    chosen: Option<&Candidate>,
    before: &[NodeId],
) -> Option<(Vec<Candidate>, Spread)> {
    let ordered = preferred_first(ranked.to_vec(), &chosen?.site);
    let spread = Spread::sticky(&ordered, |id| before.contains(id));
    Some((ordered, spread))
}

/// The site each edge uses now for each service (edges report it to the controller). Where an
/// edge or service is missing, its cheapest candidate on the old topology is taken instead.
pub type Incumbents = BTreeMap<NodeId, BTreeMap<ServiceName, NodeId>>;

/// The anti-flap margins each edge runs with (edges report them to the controller). An edge
/// missing here is taken to run with [`Hysteresis::default`].
pub type Margins = BTreeMap<NodeId, Hysteresis>;

/// The candidate `edge` uses for `service`: the site it reported while that site is still among
/// `candidates` (then `.1` is true), else the cheapest.
pub fn in_use<'c>(
    incumbents: &Incumbents,
    edge: &NodeId,
    service: &str,
    candidates: &'c [Candidate],
) -> (Option<&'c Candidate>, bool) {
    let reported = incumbents
        .get(edge)
        .and_then(|m| m.get(service))
        .and_then(|site| candidates.iter().find(|c| &c.site == site));
    (reported.or(candidates.first()), reported.is_some())
}

/// Each service's ranked candidates at `edge` (none where the edge does not exist on this side).
fn candidates_per_service(
    table: &Result<RoutingTable, RouteError>,
) -> BTreeMap<&ServiceName, &[Candidate]> {
    match table {
        Ok(table) => table.services().filter(|(_, c)| !c.is_empty()).collect(),
        Err(_) => BTreeMap::new(),
    }
}

/// For every edge node (of either topology) and every service (of either), how its choice
/// changes from `old` to `new` under the same live state; unchanged pairs are left out. Sorted
/// by edge, then service. Choices are made as routers make them, with the default anti-flap
/// margins and each edge on its cheapest old site.
pub fn impact(old: &Topology, new: &Topology, live: &LiveState) -> Vec<ImpactEntry> {
    impact_with(old, live, new, live, &Incumbents::new(), &Margins::new())
}

/// [`impact`] with a live state per side (e.g. the same measurements floored at each side's
/// declared latencies, [`LiveState::floored`]), the sites edges use now and each edge's
/// anti-flap margins (the default for an edge not in `margins`).
///
/// Before: the edge's reported site (with its cheapest path on `old`) while it is still a
/// candidate there, else the cheapest candidate. After: what [`Hysteresis::select_since`] keeps
/// or picks on `new` with that site as the incumbent and `old`'s candidates as the ones on offer
/// before, as the edge's router does.
pub fn impact_with(
    old: &Topology,
    old_live: &LiveState,
    new: &Topology,
    new_live: &LiveState,
    incumbents: &Incumbents,
    margins: &Margins,
) -> Vec<ImpactEntry> {
    let (og, ng) = (Graph::new(old), Graph::new(new));
    let edges_of = |t: &'_ Topology| -> BTreeSet<NodeId> {
        t.nodes
            .iter()
            .filter(|n| n.kind == NodeKind::Edge)
            .map(|n| n.id.clone())
            .collect()
    };
    let (old_edges, new_edges) = (edges_of(old), edges_of(new));
    let mut out = Vec::new();
    for edge in old_edges.union(&new_edges) {
        let hysteresis = margins.get(edge).copied().unwrap_or_default();
        // A node serves clients only on the side where it is an edge (routers build service
        // routes on edges only): one that becomes a transit loses every service, one that
        // becomes an edge gains them. A table built from a transit has candidates all the same.
        let table =
            |t, g, live, is_edge: bool| is_edge.then(|| RoutingTable::build(t, g, edge, live));
        let (old_table, new_table) = (
            table(old, &og, old_live, old_edges.contains(edge)),
            table(new, &ng, new_live, new_edges.contains(edge)),
        );
        let (before, after) = (
            old_table
                .as_ref()
                .map(candidates_per_service)
                .unwrap_or_default(),
            new_table
                .as_ref()
                .map(candidates_per_service)
                .unwrap_or_default(),
        );
        let services: BTreeSet<&ServiceName> = before.keys().chain(after.keys()).copied().collect();
        for service in services {
            let o = before
                .get(service)
                .and_then(|cands| in_use(incumbents, edge, service.as_str(), cands).0);
            // A site that was not on offer before the change is taken if it is the best. A
            // drained one was not on offer (unless every site was drained), as routers hold it
            // (`router::routes`' `selectable`): a site back from a drain is taken at once if it
            // is the best, not weighed against the margins.
            let offered = before.get(service).copied().unwrap_or_default();
            let all_drained = offered.first().is_some_and(|c| c.drained);
            let n = after.get(service).and_then(|cands| {
                hysteresis.select_since(o.map(|c| &c.site), cands, |site| {
                    offered
                        .iter()
                        .any(|c| &c.site == site && (!c.drained || all_drained))
                })
            });
            let old_group = group_of(before.get(service).copied().unwrap_or_default(), o, &[]);
            // Its members, a group of one's lone site included: routers keep each in the
            // wider band (`router::routes` passes the last group's members to
            // `Spread::sticky` whatever their number).
            let (old_shares, old_members) = match &old_group {
                Some((ordered, spread)) => (
                    spread.shares(ordered),
                    ordered[..spread.members()]
                        .iter()
                        .map(|c| c.site.clone())
                        .collect(),
                ),
                None => (Vec::new(), Vec::new()),
            };
            // The edge keeps the members of its group in the band (Spread::sticky); the sites
            // that only dials send connections to are not members.
            let new_shares = shares_of(
                after.get(service).copied().unwrap_or_default(),
                n,
                &old_members,
            );
            let kind = match (o, n) {
                (Some(_), None) => ImpactKind::Lost,
                (None, Some(_)) => ImpactKind::Gained,
                (Some(o), Some(n)) if o.site != n.site => ImpactKind::SiteChanged,
                (Some(o), Some(n)) if o.path != n.path => ImpactKind::PathChanged,
                (Some(o), Some(n)) if (o.cost, o.drained) != (n.cost, n.drained) => {
                    ImpactKind::CostChanged
                }
                (Some(_), Some(_)) if old_shares != new_shares => ImpactKind::SharesChanged,
                _ => continue,
            };
            out.push(ImpactEntry {
                edge: edge.clone(),
                service: service.clone(),
                kind,
                old: o.cloned(),
                new: n.cloned(),
                old_shares,
                new_shares,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::builder::{TopologyBuilder, ms};
    use crate::model::{AdminState, NodeKind, Pool, PoolName};

    /// A nearer site back from a drain takes the service at once, as routers take it (a
    /// drained site was not on offer): the plan predicted the margins keeping the farther site
    /// and the two sharing.
    #[test]
    fn an_undrained_nearer_site_is_taken_as_routers_take_it() {
        let mut b = TopologyBuilder::new();
        b.node("edge", NodeKind::Edge)
            .node("s1", NodeKind::Site)
            .node("s2", NodeKind::Site)
            .link("edge", "s1", ms(2.0))
            .link("edge", "s2", ms(8.0))
            .service("chat")
            .serve("s1", "chat", 100)
            .serve("s2", "chat", 100);
        let new = b.build();
        b.node_state("s1", AdminState::Drain);
        let old = b.build();
        let i = impact(&old, &new, &LiveState::default());
        assert_eq!(i.len(), 1, "{i:#?}");
        assert_eq!(i[0].kind, ImpactKind::SiteChanged, "{i:#?}");
        assert_eq!(i[0].new.as_ref().unwrap().site.as_str(), "s1");
    }

    /// A site that served a service alone keeps the band of a member when a nearer site is
    /// added, as routers keep it: within 4 ms of the new site, the two share. (The plan took a
    /// group of one for no members, and predicted the new site alone.)
    #[test]
    fn a_lone_site_is_a_member_when_a_nearer_one_comes() {
        let mut b = TopologyBuilder::new();
        b.node("edge", NodeKind::Edge)
            .node("s1", NodeKind::Site)
            .link("edge", "s1", ms(8.0))
            .service("chat")
            .serve("s1", "chat", 100);
        let old = b.build();
        b.node("s3", NodeKind::Site)
            .link("edge", "s3", ms(5.0))
            .serve("s3", "chat", 100);
        let new = b.build();
        let i = impact(&old, &new, &LiveState::default());
        assert_eq!(i.len(), 1, "{i:#?}");
        assert_eq!(i[0].kind, ImpactKind::SiteChanged, "{i:#?}");
        let shares: Vec<(&str, f64)> = i[0]
            .new_shares
            .iter()
            .map(|s| (s.site.as_str(), s.share))
            .collect();
        assert_eq!(shares, [("s3", 0.5), ("s1", 0.5)], "{i:#?}");
    }

    fn base() -> TopologyBuilder {
        let mut b = TopologyBuilder::new();
        b.node("edge", NodeKind::Edge)
            .node("t", NodeKind::Transit)
            .node("s1", NodeKind::Site)
            .node("s2", NodeKind::Site)
            .link("edge", "t", ms(2.0))
            .link("t", "s1", ms(3.0))
            .link("edge", "s2", ms(9.0))
            .service("chat")
            .service("embed")
            .serve("s1", "chat", 100)
            .serve("s2", "chat", 100)
            .serve("s2", "embed", 10);
        b
    }

    #[test]
    fn identical_topologies_have_no_diff_and_no_impact() {
        let t = base().build();
        assert!(diff(&t, &t).is_empty());
        assert!(impact(&t, &t, &LiveState::default()).is_empty());
    }

    #[test]
    fn reports_added_removed_and_changed_fields_with_old_and_new_values() {
        let old = base().build();
        let mut b = base();
        b.node("s3", NodeKind::Site)
            .link("t", "s3", ms(1.0))
            .node_state("t", AdminState::Drain);
        let mut new = b.build();
        new.links.retain(|l| l.id().to_string() != "edge--s2");
        new.links[1].latency = ms(4.0); // t--s1
        new.nodes[3].serves[0].capacity = 50; // s2 chat
        new.services.retain(|s| s.name.as_str() != "embed");
        new.pools.push(Pool {
            name: PoolName::new("vips"),
            prefix: "100.64.0.0/24".parse().unwrap(),
        });
        new.nodes[2].location.lat = -33.9;

        let d = diff(&old, &new);
        assert_eq!(
            d.nodes
                .added
                .iter()
                .map(|i| i.id.as_str())
                .collect::<Vec<_>>(),
            ["s3"]
        );
        assert!(d.nodes.removed.is_empty());
        type Fields<'a> = Vec<(&'a str, &'a Value, &'a Value)>;
        let changed: Vec<(&str, Fields)> = d
            .nodes
            .changed
            .iter()
            .map(|c| {
                (
                    c.id.as_str(),
                    c.fields
                        .iter()
                        .map(|f| (f.field.as_str(), &f.old, &f.new))
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            changed,
            [
                ("s1", vec![("location.lat", &json!(0.0), &json!(-33.9))]),
                (
                    "s2",
                    vec![("serves[chat].capacity", &json!(100), &json!(50))]
                ),
                ("t", vec![("state", &json!("up"), &json!("drain"))]),
            ]
        );
        assert_eq!(
            d.links
                .added
                .iter()
                .map(|i| i.id.as_str())
                .collect::<Vec<_>>(),
            ["s3--t"]
        );
        assert_eq!(
            d.links
                .removed
                .iter()
                .map(|i| i.id.as_str())
                .collect::<Vec<_>>(),
            ["edge--s2"]
        );
        assert_eq!(d.links.removed[0].value["latency"], json!("9ms"));
        assert_eq!(d.links.changed.len(), 1);
        assert_eq!(d.links.changed[0].id, "s1--t");
        assert_eq!(
            d.links.changed[0].fields[0],
            FieldChange {
                field: "latency".into(),
                old: json!("3ms"),
                new: json!("4ms")
            }
        );
        assert_eq!(
            d.services
                .removed
                .iter()
                .map(|i| i.id.as_str())
                .collect::<Vec<_>>(),
            ["embed"]
        );
        assert_eq!(d.pools.added[0].id, "vips");
        // JSON round trip: the CLI prints this.
        let text = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<TopologyDiff>(&text).unwrap(), d);
    }

    /// Shares print as whole percents that add up to 100, and one above nothing as `<1%`.
    #[test]
    fn shares_print_as_percents_that_add_up_to_100() {
        let share = |site: &str, share: f64| Share {
            site: NodeId::new(site),
            share,
        };
        let text = shares_text(&[
            share("a", 1.0 / 6.0),
            share("b", 1.0 / 6.0),
            share("c", 4.0 / 6.0),
        ]);
        assert_eq!(text, "a 17% + b 17% + c 66%");
        // Equal remainders take the point in the order listed, whatever the float noise.
        let text = shares_text(&[
            share("a", 4.0 / 6.0),
            share("b", 1.0 / 6.0),
            share("c", 1.0 / 6.0),
        ]);
        assert_eq!(text, "a 67% + b 17% + c 16%");
        let thirds = [
            share("a", 1.0 / 3.0),
            share("b", 1.0 / 3.0),
            share("c", 1.0 / 3.0),
        ];
        assert_eq!(shares_text(&thirds), "a 34% + b 33% + c 33%");
        let text = shares_text(&[share("a", 0.996), share("b", 0.004), share("c", 0.0)]);
        assert_eq!(text, "a 100% + b <1% + c 0%");
        // Below a millionth of a percent (behind several 99 % dials) is still above nothing.
        let text = shares_text(&[share("a", 1.0 - 1e-10), share("b", 1e-10)]);
        assert_eq!(text, "a 100% + b <1%");
        assert_eq!(
            shares_text(&[share("a", 0.75), share("b", 0.25)]),
            "a 75% + b 25%"
        );
    }

    /// The order of the pools of a family (a circuit that names none takes the first with a free address) and of
    /// a service's VIPs (one with no `port` is reached at its first VIP's) is a change; a pool
    /// of the other family added in front is not a change of the others.
    #[test]
    fn reordered_pools_of_a_family_and_reordered_vips_are_changes() {
        let pool = |name: &str, prefix: &str| Pool {
            name: PoolName::new(name),
            prefix: prefix.parse().unwrap(),
        };
        let mut old = base().build();
        old.pools = vec![pool("a", "198.18.0.0/24"), pool("b", "198.18.1.0/24")];
        old.services[0].vips = vec![
            crate::model::Vip {
                prefix: "100.64.0.1/32".parse().unwrap(),
                port: 443,
            },
            crate::model::Vip {
                prefix: "100.64.0.2/32".parse().unwrap(),
                port: 8443,
            },
        ];
        let mut new = old.clone();
        new.pools.reverse();
        new.services[0].vips.reverse();
        let d = diff(&old, &new);
        let orders: Vec<(&str, &str, &Value, &Value)> = d
            .pools
            .changed
            .iter()
            .flat_map(|c| {
                c.fields
                    .iter()
                    .map(|f| (c.id.as_str(), f.field.as_str(), &f.old, &f.new))
            })
            .collect();
        assert_eq!(
            orders,
            [
                ("a", "order", &json!(1), &json!(2)),
                ("b", "order", &json!(2), &json!(1))
            ]
        );
        assert_eq!(d.services.changed.len(), 1, "{d:#?}");
        assert_eq!(d.services.changed[0].fields[0].field, "vips");
        let mut v6_first = old.clone();
        v6_first.pools.insert(0, pool("six", "fd00::/64"));
        let d = diff(&old, &v6_first);
        assert!(d.pools.changed.is_empty(), "{d:#?}");
        assert_eq!(d.pools.added[0].value["order"], json!(1));
    }

    #[test]
    fn swapped_link_ends_and_reordered_sets_are_no_change() {
        let mut b = base();
        b.serve("s1", "embed", 5);
        let old = b.build();
        let mut new = old.clone();
        for l in &mut new.links {
            std::mem::swap(&mut l.a, &mut l.b);
        }
        new.links.reverse();
        new.nodes[2].serves.reverse(); // s1: chat, embed -> embed, chat
        new.services[0].clients = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        let mut newer = new.clone();
        newer.services[0].clients.reverse();
        let d = diff(&old, &new);
        assert!(d.nodes.is_empty() && d.links.is_empty(), "{d:#?}");
        assert_eq!(d.services.changed.len(), 1, "{d:#?}");
        assert!(diff(&new, &newer).is_empty(), "{:#?}", diff(&new, &newer));
        // A real change among reordered entries is still reported, and only it.
        newer.services[0].clients[1] = "192.168.0.0/16".parse().unwrap();
        let d = diff(&new, &newer);
        assert_eq!(d.services.changed[0].fields.len(), 1, "{d:#?}");
        assert_eq!(d.services.changed[0].fields[0].field, "clients");
    }

    #[test]
    fn a_service_added_to_a_site_is_a_keyed_field_change() {
        let old = base().build();
        let mut b = base();
        b.serve("s1", "embed", 5);
        let d = diff(&old, &b.build());
        let f = &d.nodes.changed[0].fields;
        assert_eq!(d.nodes.changed[0].id, "s1");
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].field, "serves[embed]");
        assert_eq!(f[0].old, Value::Null);
        assert_eq!(f[0].new["capacity"], json!(5));
    }

    #[test]
    fn impact_lists_each_edge_and_service_whose_best_choice_changes() {
        let old = base().build();
        let live = LiveState::default();

        // Slower t--s1: chat stays on s1 (8ms < 9ms) but its cost changes; embed unchanged.
        let mut slower = old.clone();
        slower.links[1].latency = ms(6.0);
        let i = impact(&old, &slower, &live);
        assert_eq!(i.len(), 1);
        assert_eq!(
            (i[0].edge.as_str(), i[0].service.as_str(), i[0].kind),
            ("edge", "chat", ImpactKind::CostChanged)
        );
        assert_eq!(i[0].old.as_ref().unwrap().cost, ms(5.0));
        assert_eq!(i[0].new.as_ref().unwrap().cost, ms(8.0));

        // Much slower: chat moves to s2.
        slower.links[1].latency = ms(20.0);
        let i = impact(&old, &slower, &live);
        assert_eq!(i[0].kind, ImpactKind::SiteChanged);
        assert_eq!(i[0].old.as_ref().unwrap().site.as_str(), "s1");
        assert_eq!(i[0].new.as_ref().unwrap().site.as_str(), "s2");

        // A shortcut: same site, new path.
        let mut b = base();
        b.link("edge", "s1", ms(1.0));
        let i = impact(&old, &b.build(), &live);
        assert_eq!(i[0].kind, ImpactKind::PathChanged);
        assert_eq!(i[0].new.as_ref().unwrap().path.len(), 2);

        // s2 down: embed is lost, chat is untouched.
        let mut b = base();
        b.node_state("s2", AdminState::Down);
        let i = impact(&old, &b.build(), &live);
        assert_eq!(i.len(), 1);
        assert_eq!(
            (i[0].service.as_str(), i[0].kind),
            ("embed", ImpactKind::Lost)
        );
        assert!(i[0].new.is_none());

        // A new edge behind the transit gains chat (s1). It does not gain embed: s2 is linked
        // only to the other edge, and edges do not relay.
        let mut b = base();
        b.node("edge2", NodeKind::Edge).link("edge2", "t", ms(1.0));
        let i = impact(&old, &b.build(), &live);
        assert_eq!(
            i.iter()
                .map(|e| (e.edge.as_str(), e.service.as_str(), e.kind))
                .collect::<Vec<_>>(),
            [("edge2", "chat", ImpactKind::Gained)]
        );
    }

    /// A node that stops being an edge loses every service it served, and one that becomes an
    /// edge gains those it can reach: routers build service routes on edges only. (The plan
    /// built a table from the node whatever its kind, so an edge made a transit changed
    /// nothing, and a transit made an edge gained nothing.)
    #[test]
    fn a_node_changing_kind_loses_or_gains_its_services() {
        let old = base().build();
        let live = LiveState::default();
        let kinds = |i: &[ImpactEntry]| {
            i.iter()
                .map(|e| (e.edge.to_string(), e.service.to_string(), e.kind))
                .collect::<Vec<_>>()
        };
        let owned = |v: &[(&str, &str, ImpactKind)]| {
            v.iter()
                .map(|(e, s, k)| (e.to_string(), s.to_string(), *k))
                .collect::<Vec<_>>()
        };
        let mut demoted = old.clone();
        demoted.nodes[0].kind = NodeKind::Transit;
        assert_eq!(demoted.nodes[0].id.as_str(), "edge");
        assert_eq!(
            kinds(&impact(&old, &demoted, &live)),
            owned(&[
                ("edge", "chat", ImpactKind::Lost),
                ("edge", "embed", ImpactKind::Lost)
            ])
        );
        // t made an edge gains chat (s1, its neighbour); the old edge's way to s1 went through
        // t, which relays no more, so it moves to s2.
        let mut promoted = old.clone();
        promoted.nodes[1].kind = NodeKind::Edge;
        assert_eq!(promoted.nodes[1].id.as_str(), "t");
        assert_eq!(
            kinds(&impact(&old, &promoted, &live)),
            owned(&[
                ("edge", "chat", ImpactKind::SiteChanged),
                ("t", "chat", ImpactKind::Gained)
            ])
        );
    }

    /// A health-check field set from its default, or back to it, prints its default on that
    /// side, as `dial` and `affinity` do: the model leaves all three out of its written form
    /// at their defaults. (They printed as `null -> 5`.)
    #[test]
    fn health_check_fields_diff_from_their_defaults() {
        let old = base().build();
        let mut new = old.clone();
        let s1 = new
            .nodes
            .iter_mut()
            .find(|n| n.id.as_str() == "s1")
            .unwrap();
        s1.serves[0].health.unhealthy_after = 5;
        s1.serves[0].health.healthy_after = 4;
        s1.serves[0].health.interval = crate::Latency::from_micros(2_000_000);
        let d = diff(&old, &new);
        let shown: Vec<(String, Value, Value)> = d.nodes.changed[0]
            .fields
            .iter()
            .map(|f| (f.field.clone(), f.old.clone(), f.new.clone()))
            .collect();
        assert_eq!(
            shown,
            [
                (
                    "serves[chat].health_interval".to_string(),
                    json!("500ms"),
                    json!("2s")
                ),
                ("serves[chat].healthy_after".to_string(), json!(2), json!(4)),
                (
                    "serves[chat].unhealthy_after".to_string(),
                    json!(3),
                    json!(5)
                ),
            ]
        );
        let back = diff(&new, &old);
        assert_eq!(back.nodes.changed[0].fields[2].new, json!(3));
    }

    #[test]
    fn impact_keeps_the_site_in_use_unless_another_wins_by_the_anti_flap_margins() {
        let old = base().build();
        let live = LiveState::default();
        let kinds = |i: &[ImpactEntry]| {
            i.iter()
                .map(|e| {
                    let site = |c: &Option<Candidate>| c.as_ref().map(|c| c.site.to_string());
                    (e.service.to_string(), e.kind, site(&e.old), site(&e.new))
                })
                .collect::<Vec<_>>()
        };
        let entry = |svc: &str, kind, old: &str, new: &str| {
            (
                svc.to_string(),
                kind,
                Some(old.to_string()),
                Some(new.to_string()),
            )
        };

        // t--s1 3 -> 12 ms: s1 costs 14, s2 9. s2 is cheaper but not by 10 ms, so the edge
        // keeps s1 (a router would); only the cost changes.
        let mut slower = old.clone();
        slower.links[1].latency = ms(12.0);
        assert_eq!(
            kinds(&impact(&old, &slower, &live)),
            [entry("chat", ImpactKind::CostChanged, "s1", "s1")]
        );

        // `edge` reports it uses `site` for `service`.
        let using = |service: &str, site: &str| -> Incumbents {
            BTreeMap::from([(
                NodeId::new("edge"),
                BTreeMap::from([(ServiceName::new(service), NodeId::new(site))]),
            )])
        };
        let with = |old: &Topology, new: &Topology, incumbents: &Incumbents| {
            impact_with(old, &live, new, &live, incumbents, &Margins::new())
        };

        // The edge reports it uses s2 for chat (s1 is cheaper, but not by the margins): no
        // change on the same topology, and none when s1 gets cheaper still (4 ms vs 9).
        let s2 = using("chat", "s2");
        assert!(with(&old, &old, &s2).is_empty());
        let mut faster = old.clone();
        faster.links[1].latency = ms(2.0);
        assert!(with(&old, &faster, &s2).is_empty());

        // edge--s2 9 -> 30 ms: s1 (5) now beats the s2 in use by both margins.
        let mut far = old.clone();
        far.links[2].latency = ms(30.0);
        let i = with(&old, &far, &s2);
        assert_eq!(
            kinds(&i),
            [
                entry("chat", ImpactKind::SiteChanged, "s2", "s1"),
                entry("embed", ImpactKind::CostChanged, "s2", "s2"),
            ]
        );
        assert_eq!(i[0].old.as_ref().unwrap().cost, ms(9.0));

        // The same change at an edge that runs with wider margins (30 ms): s1 is 25 ms cheaper,
        // not enough, so that edge keeps s2 and only its cost changes. Margins of another node
        // do not apply to this edge.
        let wide = Hysteresis {
            absolute: ms(30.0),
            relative: 1.0,
        };
        let margins = |node: &str| Margins::from([(NodeId::new(node), wide)]);
        assert_eq!(
            kinds(&impact_with(
                &old,
                &live,
                &far,
                &live,
                &s2,
                &margins("edge")
            )),
            [
                entry("chat", ImpactKind::CostChanged, "s2", "s2"),
                entry("embed", ImpactKind::CostChanged, "s2", "s2"),
            ]
        );
        assert_eq!(
            kinds(&impact_with(&old, &live, &far, &live, &s2, &margins("s1")))[0],
            entry("chat", ImpactKind::SiteChanged, "s2", "s1")
        );

        // A reported site that no longer serves the service on the old topology is ignored:
        // the cheapest candidate stands in for it.
        let stale = using("embed", "s1");
        assert!(with(&old, &old, &stale).is_empty());

        // s1 back up (it was `down`): cheaper than the s2 in use, though not by the margins,
        // and new to the edge's candidates, so the edge takes it as its router would.
        let mut b = base();
        b.node_state("s1", AdminState::Down);
        let s1_down = b.build();
        assert_eq!(
            kinds(&with(&s1_down, &old, &s2)),
            [entry("chat", ImpactKind::SiteChanged, "s2", "s1")]
        );
    }

    #[test]
    fn impact_shows_how_equally_near_sites_share_new_connections() {
        let old = base().build();
        let live = LiveState::default();
        let shares = |v: &[Share]| {
            v.iter()
                .map(|s| (s.site.to_string(), s.share))
                .collect::<Vec<_>>()
        };
        // A third site 6 ms from the edge: within 2 ms of s1 (5 ms), so it shares chat with s1;
        // s1 stays the site in use, with the same path and cost.
        let mut b = base();
        b.node("s3", NodeKind::Site)
            .link("edge", "s3", ms(6.0))
            .serve("s3", "chat", 100);
        let added = b.build();
        let i = impact(&old, &added, &live);
        assert_eq!(i.len(), 1, "{i:?}");
        assert_eq!(
            (i[0].service.as_str(), i[0].kind),
            ("chat", ImpactKind::SharesChanged)
        );
        assert!(i[0].old_shares.is_empty());
        assert_eq!(
            shares(&i[0].new_shares),
            [("s1".to_string(), 0.5), ("s3".to_string(), 0.5)]
        );
        assert_eq!(shares_text(&i[0].new_shares), "s1 50% + s3 50%");
        assert_eq!(shares_text(&i[0].old_shares), "one site");

        // Then s3's weight goes to 300: the split moves to 1:3.
        let mut heavier = added.clone();
        let s3 = heavier
            .nodes
            .iter_mut()
            .find(|n| n.id.as_str() == "s3")
            .unwrap();
        s3.serves[0].weight = 300;
        let i = impact(&added, &heavier, &live);
        assert_eq!(i.len(), 1, "{i:?}");
        assert_eq!(i[0].kind, ImpactKind::SharesChanged);
        assert_eq!(
            (shares(&i[0].old_shares), shares(&i[0].new_shares)),
            (
                vec![("s1".to_string(), 0.5), ("s3".to_string(), 0.5)],
                vec![("s1".to_string(), 0.25), ("s3".to_string(), 0.75)]
            )
        );

        // The same change seen by an edge that keeps s3 in use lists s3 first.
        let on_s3: Incumbents = BTreeMap::from([(
            NodeId::new("edge"),
            BTreeMap::from([(ServiceName::new("chat"), NodeId::new("s3"))]),
        )]);
        let i = impact_with(&added, &live, &heavier, &live, &on_s3, &Margins::new());
        assert_eq!(
            shares(&i[0].new_shares),
            [("s3".to_string(), 0.75), ("s1".to_string(), 0.25)]
        );

        // s3's link slows to 8 ms (3 ms more than s1): beyond the 2 ms a site joins within, but
        // inside the 4 ms band a member keeps its place in, so the edge's split stays 1:3 and the
        // plan predicts no change; at 10 ms (5 ms more) s3 leaves the group.
        let slower = |link_ms: f64| {
            let mut t = heavier.clone();
            let l = t
                .links
                .iter_mut()
                .find(|l| l.id() == crate::LinkId::new(&NodeId::new("edge"), &NodeId::new("s3")))
                .unwrap();
            l.latency = ms(link_ms);
            t
        };
        assert!(impact(&heavier, &slower(8.0), &live).is_empty());
        let i = impact(&heavier, &slower(10.0), &live);
        assert_eq!(i.len(), 1, "{i:?}");
        assert_eq!(i[0].kind, ImpactKind::SharesChanged);
        assert!(i[0].new_shares.is_empty(), "{:?}", i[0].new_shares);

        // Weights alone never change a pair whose site takes every connection.
        let mut weighted = old.clone();
        for n in &mut weighted.nodes {
            for s in &mut n.serves {
                s.weight = 7;
            }
        }
        assert!(impact(&old, &weighted, &live).is_empty());
    }

    /// A dial is a field change of its serves entry, printed from and to its value (100 when
    /// absent), and its effect on first tries is a change of shares, though the site in use
    /// stays: a near site dialled to 30 keeps 30 % and the far one gets the rest.
    #[test]
    fn a_dial_change_is_a_field_change_and_moves_shares() {
        let old = base().build();
        let mut b = base();
        b.dial("s1", "chat", 30);
        let new = b.build();
        let d = diff(&old, &new);
        assert_eq!(d.nodes.changed.len(), 1);
        assert_eq!(d.nodes.changed[0].id, "s1");
        assert_eq!(
            d.nodes.changed[0].fields,
            [FieldChange {
                field: "serves[chat].dial".into(),
                old: json!(100),
                new: json!(30)
            }]
        );
        let back = diff(&new, &old);
        assert_eq!(back.nodes.changed[0].fields[0].old, json!(30));
        assert_eq!(back.nodes.changed[0].fields[0].new, json!(100));

        let live = LiveState::default();
        let i = impact(&old, &new, &live);
        assert_eq!(i.len(), 1, "{i:?}");
        assert_eq!(
            (i[0].service.as_str(), i[0].kind),
            ("chat", ImpactKind::SharesChanged)
        );
        assert_eq!(i[0].old.as_ref().unwrap().site.as_str(), "s1");
        assert_eq!(i[0].new.as_ref().unwrap().site.as_str(), "s1");
        assert!(i[0].old_shares.is_empty());
        assert_eq!(shares_text(&i[0].new_shares), "s1 30% + s2 70%");

        // Down to 0: s2 takes every first try; back to 100: one site again.
        let mut b = base();
        b.dial("s1", "chat", 0);
        let zero = b.build();
        let i = impact(&new, &zero, &live);
        assert_eq!(shares_text(&i[0].new_shares), "s1 0% + s2 100%");
        let i = impact(&zero, &old, &live);
        assert_eq!(i[0].kind, ImpactKind::SharesChanged);
        assert_eq!(shares_text(&i[0].new_shares), "one site");

        // A dial on the far site alone changes nothing: s1 takes every connection first.
        let mut b = base();
        b.dial("s2", "chat", 10);
        let far = b.build();
        assert_eq!(diff(&old, &far).nodes.changed.len(), 1);
        assert!(impact(&old, &far, &live).is_empty());
    }

    /// An affinity is left out of the file at its default (`none`), like a dial at 100; setting
    /// or clearing it prints from or to `"none"`, not `null`.
    #[test]
    fn an_affinity_change_prints_from_its_default() {
        let old = base().build();
        let mut new = old.clone();
        new.services[0].affinity = crate::model::Affinity::SourceIp;
        let d = diff(&old, &new);
        assert_eq!(d.services.changed.len(), 1, "{d:?}");
        assert_eq!(
            d.services.changed[0].fields,
            [FieldChange {
                field: "affinity".into(),
                old: json!("none"),
                new: json!("source_ip")
            }]
        );
        let back = diff(&new, &old);
        assert_eq!(back.services.changed[0].fields[0].old, json!("source_ip"));
        assert_eq!(back.services.changed[0].fields[0].new, json!("none"));
    }
}
