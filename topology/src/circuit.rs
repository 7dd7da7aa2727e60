//! Circuit maths: placement with capacity admission (constrained shortest path), per-link
//! headroom, make-before-break resizing, checks of existing reservations against a new
//! topology, and VIP allocation from the topology's pools.
//!
//! Pure like the rest of this crate: the controller hands in the topology, the reservations of
//! the circuits it already holds and the addresses already allocated; these functions hand back
//! a placement (or a refusal an operator can act on) and never remember anything themselves.
//!
//! Rules of placement:
//! - a path starts at the A-end edge, relays only through transit nodes, and ends at a site that
//!   serves the B-end service, is allowed by the service's residency and the circuit's regions,
//!   and (when the circuit pins sites) is one of the pinned sites;
//! - nodes and links whose admin state is `down` are never used; `drain` ones only when no other
//!   path fits (they carry a large cost penalty);
//! - every link of the path must have the circuit's rate free: capacity minus the rates of the
//!   circuits already reserved on it. Links are full duplex and a circuit reserves its rate in
//!   both directions, so one number per link is enough;
//! - among the paths that fit, the one with the lowest declared latency wins;
//! - a path names at most [`MAX_PATH_NODES`] nodes: a site whose lowest-latency path with room
//!   is longer is passed over (as routing passes over a site whose best path is), and the
//!   capacity figures of a refusal count only paths within that limit.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::graph::Graph;
use crate::model::{
    AdminState, LinkId, NodeId, NodeKind, Pool, PoolName, Region, ServiceName, Topology,
};
use crate::route::MAX_PATH_NODES;
use crate::units::{Bandwidth, Latency};

/// A circuit's id, e.g. `c-000042`. Assigned by the controller, never reused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CircuitId(Arc<str>);

impl CircuitId {
    pub fn new(s: impl AsRef<str>) -> Self {
        CircuitId(Arc::from(s.as_ref()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl fmt::Display for CircuitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The B-end of a circuit: a service, optionally restricted to regions or pinned to sites.
/// Empty lists mean "no restriction beyond the service's own residency".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BEnd {
    pub service: ServiceName,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<Region>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<NodeId>,
}

/// What to place: from an edge to a service, at a rate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementRequest {
    pub edge: NodeId,
    pub b_end: BEnd,
    pub rate: Bandwidth,
}

/// A placed path: the site chosen and the nodes from the edge to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub site: NodeId,
    /// Nodes from the A-end edge to `site`, both included.
    pub path: Vec<NodeId>,
    /// Sum of the declared one-way latencies of the path's links.
    pub latency: Latency,
}

impl BEnd {
    /// A B-end with no restriction beyond the service's residency.
    pub fn service(service: impl AsRef<str>) -> Self {
        BEnd {
            service: ServiceName::new(service),
            regions: Vec::new(),
            sites: Vec::new(),
        }
    }
}

impl Placement {
    /// The links the path crosses, in order.
    pub fn links(&self) -> Vec<LinkId> {
        path_links(&self.path)
    }
}

/// The links along a node path, in order.
pub fn path_links(path: &[NodeId]) -> Vec<LinkId> {
    path.windows(2).map(|w| LinkId::new(&w[0], &w[1])).collect()
}

/// A circuit as the data plane needs it, in every snapshot the controller distributes: the
/// edge classifies clients by `prefix` (and `vip`) and enforces `rate` both ways; transits and
/// sites only need to know the circuit exists on their path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProvisionedCircuit {
    pub id: CircuitId,
    pub edge: NodeId,
    /// The customer's source prefix.
    pub prefix: IpNetwork,
    pub service: ServiceName,
    /// The circuit's VIP: clients reach the service through it at the service's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Enforced in each direction, on the aggregate of the circuit's connections.
    pub rate: Bandwidth,
    /// The reserved path, edge first, site last.
    pub path: Vec<NodeId>,
}

/// Bandwidth held by one circuit along its path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub circuit: CircuitId,
    pub path: Vec<NodeId>,
    pub rate: Bandwidth,
}

/// One link's capacity, what circuits hold on it and what is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkHeadroom {
    pub capacity: Bandwidth,
    pub reserved: Bandwidth,
    /// `capacity - reserved`, zero when over-committed.
    pub free: Bandwidth,
    /// How many circuits hold a reservation on this link (a circuit holding two, during a
    /// resize, counts once).
    pub circuits: usize,
}

/// Per-link capacity, reservations and free bandwidth, for every link of `topo`. Reservations
/// that name links the topology no longer has are ignored here (see [`check_reservations`]).
///
/// What one circuit holds on a link: its reservations on one path add up (a shrink holds the
/// old rate's excess on the path it keeps); of its reservations on different paths (a move
/// holds the old path until the new one is acknowledged) the largest counts, since the edge
/// enforces one rate limiter per circuit: a link both paths cross carries at most that.
pub fn headroom(topo: &Topology, reservations: &[Reservation]) -> BTreeMap<LinkId, LinkHeadroom> {
    let mut by_path: BTreeMap<(&CircuitId, &[NodeId]), Bandwidth> = BTreeMap::new();
    for r in reservations {
        let rate = by_path.entry((&r.circuit, r.path.as_slice())).or_default();
        *rate = rate.saturating_add(r.rate);
    }
    let mut held: BTreeMap<LinkId, BTreeMap<&CircuitId, Bandwidth>> = BTreeMap::new();
    for ((circuit, path), rate) in by_path {
        for id in path_links(path) {
            let h = held.entry(id).or_default().entry(circuit).or_default();
            *h = (*h).max(rate);
        }
    }
    let mut out: BTreeMap<LinkId, LinkHeadroom> = topo
        .links
        .iter()
        .map(|l| {
            (
                l.id(),
                LinkHeadroom {
                    capacity: l.capacity,
                    reserved: Bandwidth::ZERO,
                    free: l.capacity,
                    circuits: 0,
                },
            )
        })
        .collect();
    for (id, circuits) in held {
        if let Some(h) = out.get_mut(&id) {
            h.reserved = circuits
                .values()
                .fold(Bandwidth::ZERO, |sum, r| sum.saturating_add(*r));
            h.free = h.capacity.saturating_sub(h.reserved);
            h.circuits = circuits.len();
        }
    }
    out
}

/// Why a circuit cannot be placed. Every variant says what was asked and what would be valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("unknown edge node \"{node}\" (edges: {})", list(known))]
    UnknownEdge { node: NodeId, known: Vec<NodeId> },
    #[error(
        "node \"{node}\" is a {kind} node; a circuit's A-end must be an edge (edges: {})",
        list(known)
    )]
    NotAnEdge {
        node: NodeId,
        kind: NodeKind,
        known: Vec<NodeId>,
    },
    #[error("edge \"{node}\" is administratively down; no circuit can start there")]
    EdgeDown { node: NodeId },
    #[error("unknown service \"{service}\" (services: {})", list(known))]
    UnknownService {
        service: ServiceName,
        known: Vec<ServiceName>,
    },
    #[error(
        "pinned site \"{site}\" does not serve \"{service}\" (sites serving it: {})",
        list(serving)
    )]
    SiteDoesNotServe {
        site: NodeId,
        service: ServiceName,
        serving: Vec<NodeId>,
    },
    /// The request pins sites and names regions, and no pinned site is in those regions: it
    /// contradicts itself, whatever the fabric's state.
    #[error(
        "no pinned site is in the requested regions ({}): {}",
        list(regions),
        pinned.iter().map(|(s, r)| format!("{s} is in region {r}")).collect::<Vec<_>>().join("; ")
    )]
    PinnedOutsideRegions {
        pinned: Vec<(NodeId, Region)>,
        regions: Vec<Region>,
    },
    #[error("no site serving \"{service}\" is allowed{}: {reason}", constraint_suffix(.regions, .sites))]
    NoEligibleSite {
        service: ServiceName,
        regions: Vec<Region>,
        sites: Vec<NodeId>,
        reason: String,
    },
    #[error(
        "no path from \"{edge}\" to any eligible site serving \"{service}\" over links and nodes that are not down, relayed by transits only (edges and sites never relay)"
    )]
    Unreachable { edge: NodeId, service: ServiceName },
    /// Sites can be reached, but only along paths longer than a stream can name: the
    /// lowest-latency path to each is longer whatever the rate, or the rate fits on a path
    /// within the limit but the lowest-latency path with room to that site is longer. When the
    /// paths within the limit are too narrow, capacity is the reason given instead
    /// ([`PlacementError::ExceedsCapacity`], [`PlacementError::InsufficientCapacity`]), also
    /// when a longer path would have the room.
    #[error(
        "no path from \"{edge}\" to a site serving \"{service}\" within {max} nodes: the lowest-latency path to site \"{site}\" has {nodes} nodes (a stream's header names at most {} hops)",
        .max - 2
    )]
    TooFar {
        edge: NodeId,
        service: ServiceName,
        site: NodeId,
        nodes: usize,
        max: usize,
    },
    /// No path within [`MAX_PATH_NODES`] nodes has the rate's capacity, reservations aside:
    /// `bottleneck` limits the widest of them.
    #[error(
        "rate {asked} exceeds the capacity of every path from \"{edge}\" to \"{service}\": the widest path is limited by link {bottleneck} with capacity {capacity}"
    )]
    ExceedsCapacity {
        asked: Bandwidth,
        edge: NodeId,
        service: ServiceName,
        bottleneck: LinkId,
        capacity: Bandwidth,
    },
    #[error("{0}")]
    InsufficientCapacity(Box<Shortfall>),
    #[error("unknown circuit {0}")]
    UnknownCircuit(CircuitId),
}

impl PlacementError {
    /// The link that blocks the request, when capacity is the reason.
    pub fn bottleneck(&self) -> Option<&LinkId> {
        match self {
            PlacementError::ExceedsCapacity { bottleneck, .. } => Some(bottleneck),
            PlacementError::InsufficientCapacity(s) => Some(&s.bottleneck),
            _ => None,
        }
    }
}

/// Why a circuit that would fit on an empty fabric does not fit now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot place {asked} from \"{edge}\" to \"{service}\": link {bottleneck} has only {free} free (capacity {capacity}, {reserved} reserved by other circuits) on the best path {}; at most {max_available} fits on any path now",
    arrows(best_path)
)]
pub struct Shortfall {
    pub asked: Bandwidth,
    pub edge: NodeId,
    pub service: ServiceName,
    /// The tightest link lacking room on the lowest-latency path (ignoring capacity).
    pub bottleneck: LinkId,
    pub free: Bandwidth,
    pub capacity: Bandwidth,
    pub reserved: Bandwidth,
    pub best_path: Vec<NodeId>,
    /// The largest rate that would fit on some path of at most [`MAX_PATH_NODES`] nodes right
    /// now.
    pub max_available: Bandwidth,
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "none".to_string();
    }
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A path as operators read it, `a -> b -> c` (messages, the CLI, circuit history).
pub fn arrows(path: &[NodeId]) -> String {
    path.iter()
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(" -> ")
}

fn constraint_suffix(regions: &[Region], sites: &[NodeId]) -> String {
    let mut parts = Vec::new();
    if !regions.is_empty() {
        parts.push(format!("in regions {}", list(regions)));
    }
    if !sites.is_empty() {
        parts.push(format!("among pinned sites {}", list(sites)));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" {}", parts.join(" and "))
    }
}

/// Finds the lowest-latency path from the request's edge to an eligible site with `rate` free on
/// every link, given the reservations already held. On failure, names the link that blocks.
pub fn place(
    topo: &Topology,
    reservations: &[Reservation],
    req: &PlacementRequest,
) -> Result<Placement, PlacementError> {
    let room = headroom(topo, reservations);
    place_with(topo, &room, req)
}

/// Re-places circuit `id` at `new_rate`, make-before-break: the circuit keeps its current path
/// when every link of it has room for the new rate (its own old reservation counts as its own),
/// and always when the new rate is no larger than the one it holds there and the path is still
/// usable and eligible (a shrink frees capacity, also on an over-committed link); otherwise a
/// new path is placed against the other circuits' reservations only. The old path
/// keeps working until the controller switches over and releases it, but its reservation is
/// not charged to the new one: the edge enforces one limiter per circuit, so a link both paths
/// cross carries the larger rate, not their sum ([`headroom`] counts it so).
pub fn resize(
    topo: &Topology,
    reservations: &[Reservation],
    id: &CircuitId,
    req: &PlacementRequest,
) -> Result<Placement, PlacementError> {
    let own = reservations
        .iter()
        .find(|r| &r.circuit == id)
        .ok_or_else(|| PlacementError::UnknownCircuit(id.clone()))?;
    // The circuit's pinned sites as they were when it was made: one that has stopped serving
    // the service since (an apply) is left out, not a reason to refuse a change of rate. None
    // left: the list stays whole, and the error names them.
    let req = &{
        let mut req = req.clone();
        if let Some(service) = topo.service(req.b_end.service.as_str()) {
            let serving: Vec<&NodeId> = topo
                .sites_serving(service.name.as_str())
                .map(|(n, _)| &n.id)
                .collect();
            let still: Vec<NodeId> = req
                .b_end
                .sites
                .iter()
                .filter(|s| serving.contains(s))
                .cloned()
                .collect();
            if !still.is_empty() {
                req.b_end.sites = still;
            }
        }
        req
    };
    let others: Vec<Reservation> = reservations
        .iter()
        .filter(|r| &r.circuit != id)
        .cloned()
        .collect();
    let room_without_self = headroom(topo, &others);
    // In place: the old path, if it is still usable and has room for the new rate. A shrink
    // needs no room: it only lowers what the circuit holds, so it stays even on a link an
    // apply left over-committed (where nothing is free), rather than being refused or moved
    // off a path it already holds more than enough on.
    if let Some(site) = own.path.last() {
        let eligible = eligible_sites(topo, &req.edge, &req.b_end)?;
        let usable = own.path.first() == Some(&req.edge)
            && eligible.contains(site)
            && path_usable(topo, &own.path);
        let fits = req.rate <= own.rate
            || path_links(&own.path)
                .iter()
                .all(|l| room_without_self.get(l).is_some_and(|h| h.free >= req.rate));
        // A path through a drained element stays only when no drain-free one has room: drained
        // elements are used only when unavoidable, on a resize as on a create. (A grow or
        // shrink kept the circuit on a drained transit, its reservation held there while its
        // traffic went elsewhere.)
        if usable
            && fits
            && path_drained(topo, &own.path)
            && let Ok(p) = place_with(topo, &room_without_self, req)
            && !path_drained(topo, &p.path)
        {
            return Ok(p);
        }
        if usable && fits {
            return Ok(Placement {
                site: site.clone(),
                path: own.path.clone(),
                latency: path_latency(topo, &own.path),
            });
        }
    }
    // Elsewhere: against the others' reservations. The old one stays held until the switch
    // (make before break), but the circuit's own two reservations are never both in use on a
    // link: the new path may share links with the old one.
    place_with(topo, &room_without_self, req)
}

/// A problem a topology change would cause to circuits already placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReservationIssue {
    #[error(
        "link {link} would be over-committed: {reserved} reserved by circuits {} but capacity {capacity}",
        list(circuits)
    )]
    OverCommitted {
        link: LinkId,
        capacity: Bandwidth,
        reserved: Bandwidth,
        circuits: Vec<CircuitId>,
    },
    #[error("circuit {circuit} is reserved on link {link}, which the topology no longer has")]
    LinkRemoved { circuit: CircuitId, link: LinkId },
    #[error("circuit {circuit} is reserved on link {link}, which would be down")]
    LinkDown { circuit: CircuitId, link: LinkId },
    #[error("circuit {circuit} is reserved through node {node}, which the topology no longer has")]
    NodeRemoved { circuit: CircuitId, node: NodeId },
    #[error("circuit {circuit} is reserved through node {node}, which would be down")]
    NodeDown { circuit: CircuitId, node: NodeId },
    /// The node's kind no longer fits its place on the path (an edge first, transits between,
    /// a site last): it would not play that part.
    #[error(
        "circuit {circuit} is reserved through node {node}, which would be a {node_kind} where the path needs a {needed}"
    )]
    NodeRole {
        circuit: CircuitId,
        node: NodeId,
        node_kind: NodeKind,
        needed: NodeKind,
    },
    #[error("circuit {circuit} is for service {service}, which the topology no longer has")]
    ServiceRemoved {
        circuit: CircuitId,
        service: ServiceName,
    },
    #[error("circuit {circuit} ends at site {site}, which would no longer serve {service}")]
    SiteNotServing {
        circuit: CircuitId,
        site: NodeId,
        service: ServiceName,
    },
    /// A service VIP of the new topology covers the circuit's VIP and port: the edge classifies
    /// those connections as the circuit's first, so the service's other clients there would be
    /// refused. Shown in the plan; the circuit itself is not failed (its VIP is its customer's
    /// address): change the service's VIP, or delete the circuit.
    #[error(
        "circuit {circuit}'s VIP {vip} is inside service {service}'s VIP {service_vip}: the edge would take those connections for the circuit"
    )]
    VipShadowed {
        circuit: CircuitId,
        vip: SocketAddr,
        service: ServiceName,
        service_vip: String,
    },
    /// The new topology makes the circuit's VIP its edge's `client_address`, and a service
    /// listens there on the VIP's port: the edge classifies that listener's connections by
    /// their destination, the circuit's VIP, so the service's other clients there would be
    /// refused. Shown in the plan, like [`ReservationIssue::VipShadowed`]; the circuit is not
    /// failed: change the edge's `client_address` or the service's port, or delete the circuit.
    #[error(
        "circuit {circuit}'s VIP {vip} would be edge {edge}'s client_address, where service {service} listens on the same port: the edge would take that service's connections there for the circuit"
    )]
    VipIsClientAddress {
        circuit: CircuitId,
        vip: SocketAddr,
        edge: NodeId,
        service: ServiceName,
    },
    #[error(
        "circuit {circuit} ends at site {site}, which would no longer be allowed for {service}: {reason}"
    )]
    SiteNotAllowed {
        circuit: CircuitId,
        site: NodeId,
        service: ServiceName,
        reason: String,
    },
}

/// Checks existing reservations against a (new) topology: links that would be over-committed,
/// and nodes (the edge, transits and the site) or links removed or down under a circuit. The
/// controller's apply plan shows these. Each problem is listed once, and each over-committed
/// link names each circuit once, also when a circuit holds two reservations on the same links
/// (a resize awaiting acknowledgement). What the site serves is [`check_site`]'s.
pub fn check_reservations(topo: &Topology, reservations: &[Reservation]) -> Vec<ReservationIssue> {
    let mut issues = Vec::new();
    let mut holders: BTreeMap<LinkId, BTreeSet<CircuitId>> = BTreeMap::new();
    // (circuit, node) and (circuit, link) pairs checked: an element's problem is the same for
    // both of a circuit's reservations.
    let mut seen_nodes: BTreeSet<(CircuitId, NodeId)> = BTreeSet::new();
    let mut seen: BTreeSet<(CircuitId, LinkId)> = BTreeSet::new();
    for r in reservations {
        let last = r.path.len().saturating_sub(1);
        for (at, n) in r.path.iter().enumerate() {
            if !seen_nodes.insert((r.circuit.clone(), n.clone())) {
                continue;
            }
            let needed = match at {
                0 => NodeKind::Edge,
                a if a == last => NodeKind::Site,
                _ => NodeKind::Transit,
            };
            match topo.node(n.as_str()) {
                None => issues.push(ReservationIssue::NodeRemoved {
                    circuit: r.circuit.clone(),
                    node: n.clone(),
                }),
                Some(node) if node.state == AdminState::Down => {
                    issues.push(ReservationIssue::NodeDown {
                        circuit: r.circuit.clone(),
                        node: n.clone(),
                    })
                }
                Some(node) if node.kind != needed => issues.push(ReservationIssue::NodeRole {
                    circuit: r.circuit.clone(),
                    node: n.clone(),
                    node_kind: node.kind,
                    needed,
                }),
                Some(_) => {}
            }
        }
        for l in path_links(&r.path) {
            if !seen.insert((r.circuit.clone(), l.clone())) {
                continue;
            }
            let issue = match topo.link(&l) {
                None => ReservationIssue::LinkRemoved {
                    circuit: r.circuit.clone(),
                    link: l,
                },
                Some(link) => {
                    holders
                        .entry(l.clone())
                        .or_default()
                        .insert(r.circuit.clone());
                    if link.state != AdminState::Down {
                        continue;
                    }
                    ReservationIssue::LinkDown {
                        circuit: r.circuit.clone(),
                        link: l,
                    }
                }
            };
            issues.push(issue);
        }
    }
    for (link, h) in headroom(topo, reservations) {
        if h.reserved > h.capacity {
            let circuits = holders
                .remove(&link)
                .map(|s| s.into_iter().collect())
                .unwrap_or_default();
            issues.push(ReservationIssue::OverCommitted {
                link,
                capacity: h.capacity,
                reserved: h.reserved,
                circuits,
            });
        }
    }
    issues
}

/// Checks that no service VIP of `topo` covers a circuit's VIP at `port` ([`ReservationIssue::
/// VipShadowed`]), and that the circuit's `edge` does not listen for a service on that address
/// and port ([`ReservationIssue::VipIsClientAddress`]): a pool moved by an apply no longer keeps
/// them off a live circuit's VIP (allocation skips both only when it hands the VIP out).
pub fn check_vip(
    topo: &Topology,
    circuit: &CircuitId,
    edge: &NodeId,
    vip: IpAddr,
    port: u16,
) -> Option<ReservationIssue> {
    let at = SocketAddr::new(vip.to_canonical(), port);
    let shadowed = topo.services.iter().find_map(|s| {
        let v = s.vips.iter().find(|v| v.contains(at))?;
        Some(ReservationIssue::VipShadowed {
            circuit: circuit.clone(),
            vip: at,
            service: s.name.clone(),
            service_vip: v.to_string(),
        })
    });
    shadowed.or_else(|| {
        let client = topo.node(edge.as_str())?.client_address?.to_canonical();
        if client != at.ip() {
            return None;
        }
        let service = topo.services.iter().find(|s| s.port == Some(port))?;
        Some(ReservationIssue::VipIsClientAddress {
            circuit: circuit.clone(),
            vip: at,
            edge: edge.clone(),
            service: service.name.clone(),
        })
    })
}

/// Checks that the site a circuit ends at may still carry its B-end under `topo`: the service
/// still exists, the site still serves it, and the service's residency and the circuit's regions
/// still allow the site (otherwise routers send the circuit's traffic elsewhere, unreserved). A
/// site removed or down is a problem of the path ([`check_reservations`]). The service's port is
/// not checked: a circuit's VIP keeps the port it was created with.
pub fn check_site(
    topo: &Topology,
    circuit: &CircuitId,
    b_end: &BEnd,
    site: &NodeId,
) -> Option<ReservationIssue> {
    let Some(service) = topo.service(b_end.service.as_str()) else {
        return Some(ReservationIssue::ServiceRemoved {
            circuit: circuit.clone(),
            service: b_end.service.clone(),
        });
    };
    let node = topo.node(site.as_str())?;
    let not_allowed = |reason: String| {
        Some(ReservationIssue::SiteNotAllowed {
            circuit: circuit.clone(),
            site: site.clone(),
            service: service.name.clone(),
            reason,
        })
    };
    if !topo
        .sites_serving(service.name.as_str())
        .any(|(n, _)| &n.id == site)
    {
        Some(ReservationIssue::SiteNotServing {
            circuit: circuit.clone(),
            site: site.clone(),
            service: service.name.clone(),
        })
    } else if !service.residency.allows(node) {
        not_allowed(format!(
            "{} ({}, {}) is outside the service's residency",
            node.id, node.region, node.country
        ))
    } else if !b_end.regions.is_empty() && !b_end.regions.contains(&node.region) {
        not_allowed(format!(
            "{} is in region {}, not among the circuit's regions {}",
            node.id,
            node.region,
            list(&b_end.regions)
        ))
    } else {
        None
    }
}

fn path_usable(topo: &Topology, path: &[NodeId]) -> bool {
    path.iter().all(|n| {
        topo.node(n.as_str())
            .is_some_and(|n| n.state != AdminState::Down)
    }) && path_links(path)
        .iter()
        .all(|l| topo.link(l).is_some_and(|l| l.state != AdminState::Down))
        && (2..=MAX_PATH_NODES).contains(&path.len())
        && path[1..path.len() - 1].iter().all(|n| {
            topo.node(n.as_str())
                .is_some_and(|n| n.kind == NodeKind::Transit)
        })
}

/// Whether `path` crosses a drained node or link past its edge (as placement counts them: the
/// elements it enters).
fn path_drained(topo: &Topology, path: &[NodeId]) -> bool {
    path.iter().skip(1).any(|n| {
        topo.node(n.as_str())
            .is_some_and(|n| n.state == AdminState::Drain)
    }) || path_links(path)
        .iter()
        .any(|l| topo.link(l).is_some_and(|l| l.state == AdminState::Drain))
}

fn path_latency(topo: &Topology, path: &[NodeId]) -> Latency {
    path_links(path)
        .iter()
        .filter_map(|l| topo.link(l))
        .fold(Latency::ZERO, |acc, l| acc.saturating_add(l.latency))
}

/// The sites a circuit's B-end may end at, after checking the request names real things.
fn eligible_sites(
    topo: &Topology,
    edge: &NodeId,
    b: &BEnd,
) -> Result<BTreeSet<NodeId>, PlacementError> {
    let edges: Vec<NodeId> = topo
        .nodes
        .iter()
        .filter(|n| n.kind == NodeKind::Edge)
        .map(|n| n.id.clone())
        .collect();
    match topo.node(edge.as_str()) {
        None => {
            return Err(PlacementError::UnknownEdge {
                node: edge.clone(),
                known: edges,
            });
        }
        Some(n) if n.kind != NodeKind::Edge => {
            return Err(PlacementError::NotAnEdge {
                node: edge.clone(),
                kind: n.kind,
                known: edges,
            });
        }
        Some(_) => {}
    }
    let Some(service) = topo.service(b.service.as_str()) else {
        return Err(PlacementError::UnknownService {
            service: b.service.clone(),
            known: topo.services.iter().map(|s| s.name.clone()).collect(),
        });
    };
    let serving: Vec<NodeId> = topo
        .sites_serving(service.name.as_str())
        .map(|(n, _)| n.id.clone())
        .collect();
    for pinned in &b.sites {
        if !serving.contains(pinned) {
            return Err(PlacementError::SiteDoesNotServe {
                site: pinned.clone(),
                service: service.name.clone(),
                serving: serving.clone(),
            });
        }
    }
    if !b.sites.is_empty() && !b.regions.is_empty() {
        let pinned: Vec<(NodeId, Region)> = b
            .sites
            .iter()
            .filter_map(|id| {
                topo.node(id.as_str())
                    .map(|n| (n.id.clone(), n.region.clone()))
            })
            .collect();
        if !pinned.iter().any(|(_, r)| b.regions.contains(r)) {
            return Err(PlacementError::PinnedOutsideRegions {
                pinned,
                regions: b.regions.clone(),
            });
        }
    }
    // The fabric's state, after the request's own mistakes (an unknown service, a pinned site
    // that does not serve it: 422 whatever the state; behind this, a misspelt service came back
    // as a 409 a client retries for as long as the edge stayed down).
    if topo
        .node(edge.as_str())
        .is_some_and(|n| n.state == AdminState::Down)
    {
        return Err(PlacementError::EdgeDown { node: edge.clone() });
    }
    let no_site = |reason: String| PlacementError::NoEligibleSite {
        service: service.name.clone(),
        regions: b.regions.clone(),
        sites: b.sites.clone(),
        reason,
    };
    if serving.is_empty() {
        return Err(no_site("no site serves it".to_string()));
    }
    let mut out = BTreeSet::new();
    let mut why = Vec::new();
    for (node, _) in topo.sites_serving(service.name.as_str()) {
        if !b.sites.is_empty() && !b.sites.contains(&node.id) {
            continue;
        }
        if node.state == AdminState::Down {
            why.push(format!("{} is down", node.id));
        } else if !service.residency.allows(node) {
            why.push(format!(
                "{} ({}, {}) is outside the service's residency",
                node.id, node.region, node.country
            ));
        } else if !b.regions.is_empty() && !b.regions.contains(&node.region) {
            why.push(format!("{} is in region {}", node.id, node.region));
        } else {
            out.insert(node.id.clone());
        }
    }
    if out.is_empty() {
        return Err(no_site(why.join("; ")));
    }
    Ok(out)
}

/// The searches below run over [`Graph`] (shared with route selection) with two rules of their
/// own: only transit nodes relay (the start is the A-end edge), and a link is crossed only when
/// a caller-given predicate on its id holds (capacity admission). Costs are (drained elements
/// crossed, latency ns), lexicographic, as in `route`: drained elements only when unavoidable.
struct View {
    graph: Graph,
    /// Link index (position in `Topology::links`) -> id.
    link_ids: Vec<LinkId>,
}

impl View {
    fn new(topo: &Topology) -> Self {
        View {
            graph: Graph::new(topo),
            link_ids: topo.links.iter().map(|l| l.id()).collect(),
        }
    }

    fn targets(&self, sites: &BTreeSet<NodeId>) -> Vec<bool> {
        let mut t = vec![false; self.graph.node_count()];
        for s in sites {
            if let Some(i) = self.graph.index(s.as_str()) {
                t[i as usize] = true;
            }
        }
        t
    }

    /// May the search continue from node `u` (reached from `from`)? Only the start and transit
    /// nodes relay; sites and other edges are ends.
    fn relays(&self, u: u32, from: u32) -> bool {
        u == from || self.graph.node_kind(u) == NodeKind::Transit
    }

    /// Usable neighbours of `u`: links and nodes not down.
    fn usable(&self, u: u32) -> impl Iterator<Item = &crate::graph::Edge> + '_ {
        self.graph.neighbours(u).iter().filter(|e| {
            self.graph.link_state(e.link) != AdminState::Down
                && self.graph.node_state(e.to) != AdminState::Down
        })
    }

    /// Dijkstra from `from` over links for which `fits` holds; the best path to any of
    /// `targets` that names at most [`MAX_PATH_NODES`] nodes. Targets whose lowest-latency path
    /// is longer are passed over (the first of them is reported when no target is in reach).
    fn shortest(
        &self,
        from: &NodeId,
        targets: &BTreeSet<NodeId>,
        fits: impl Fn(&LinkId) -> bool,
    ) -> Reach {
        let g = &self.graph;
        let Some(origin) = g.index(from.as_str()) else {
            return Reach::None;
        };
        let is_target = self.targets(targets);
        let n = g.node_count();
        let mut dist = vec![(u32::MAX, u64::MAX); n];
        let mut prev = vec![u32::MAX; n];
        // Links on each node's chosen path.
        let mut links = vec![0usize; n];
        let mut too_far = None;
        let mut heap = BinaryHeap::new();
        dist[origin as usize] = (0, 0);
        heap.push(Reverse(((0u32, 0u64), origin)));
        while let Some(Reverse((d, u))) = heap.pop() {
            if d > dist[u as usize] {
                continue;
            }
            if is_target[u as usize] {
                let nodes = links[u as usize] + 1;
                if nodes > MAX_PATH_NODES {
                    too_far.get_or_insert((g.id(u).clone(), nodes));
                    continue;
                }
                let mut path = vec![g.id(u).clone()];
                let mut cur = u;
                while prev[cur as usize] != u32::MAX {
                    cur = prev[cur as usize];
                    path.push(g.id(cur).clone());
                }
                path.reverse();
                return Reach::Path(path);
            }
            if !self.relays(u, origin) {
                continue;
            }
            for e in self.usable(u) {
                if !fits(&self.link_ids[e.link as usize]) {
                    continue;
                }
                let drained = u32::from(g.drain_entering(e.link, e.to));
                let nd = (
                    d.0.saturating_add(drained),
                    d.1.saturating_add(e.latency_ns),
                );
                let v = e.to as usize;
                if nd < dist[v] {
                    dist[v] = nd;
                    prev[v] = u;
                    links[v] = links[u as usize] + 1;
                    heap.push(Reverse((nd, e.to)));
                } else if nd == dist[v] && (links[u as usize] + 1, u) < (links[v], prev[v]) {
                    // Equal cost: the fewest links, then the smallest predecessor, as routing
                    // ties (`route::RoutingTable::build`). Every equal-cost predecessor is
                    // settled before `v` (weights >= 1 ns), so `v`'s links are final when popped.
                    prev[v] = u;
                    links[v] = links[u as usize] + 1;
                }
            }
        }
        match too_far {
            Some((site, nodes)) => Reach::TooFar { site, nodes },
            None => Reach::None,
        }
    }

    /// Widest path (maximum bottleneck of `width`) from `from` to any of `targets` among the
    /// paths of at most [`MAX_PATH_NODES`] nodes (longer ones placement refuses): the largest
    /// rate that some usable path could carry, with the link that limits it. Ties go to the
    /// path with fewer links, then to the target first in id order.
    ///
    /// Bellman-Ford by number of links: round k extends the paths of k - 1 links by one, from
    /// the nodes whose width rose in the round before. O(`MAX_PATH_NODES` x links).
    fn widest(
        &self,
        from: &NodeId,
        targets: &BTreeSet<NodeId>,
        width: impl Fn(&LinkId) -> u64,
    ) -> Option<(u64, LinkId)> {
        const NONE: u32 = u32::MAX;
        let g = &self.graph;
        let origin = g.index(from.as_str())?;
        let is_target = self.targets(targets);
        // Per node: the best bottleneck width of a path of at most k links (so far) and the
        // link that sets it; 0 is unreached (a link with nothing free carries nothing).
        let mut best: Vec<(u64, u32)> = vec![(0, NONE); g.node_count()];
        best[origin as usize] = (u64::MAX, NONE);
        // The nodes whose width rose in the last round: only their paths are extended (the
        // others' were, in the round after theirs rose).
        let mut risen = vec![origin];
        let mut is_risen = vec![false; g.node_count()];
        let mut answer: Option<(u64, u32)> = None;
        for _ in 1..MAX_PATH_NODES {
            // The widths of the round before, so that a round adds one link, not several.
            let last: Vec<(u32, (u64, u32))> = risen
                .drain(..)
                .map(|u| {
                    is_risen[u as usize] = false;
                    (u, best[u as usize])
                })
                .collect();
            for (u, (w, limit)) in last {
                if !self.relays(u, origin) {
                    continue;
                }
                for e in self.usable(u) {
                    let lw = width(&self.link_ids[e.link as usize]);
                    let next = if lw < w || limit == NONE {
                        (lw, e.link)
                    } else {
                        (w, limit)
                    };
                    let v = e.to as usize;
                    if next.0 > best[v].0 {
                        best[v] = next;
                        if !is_risen[v] {
                            is_risen[v] = true;
                            risen.push(e.to);
                        }
                    }
                }
            }
            if risen.is_empty() {
                break;
            }
            // Targets in id order (node indices are): a tie goes to the first.
            risen.sort_unstable();
            for &v in &risen {
                let (w, limit) = best[v as usize];
                if is_target[v as usize] && answer.is_none_or(|(aw, _)| w > aw) {
                    answer = Some((w, limit));
                }
            }
        }
        answer.map(|(w, l)| (w, self.link_ids[l as usize].clone()))
    }
}

/// What [`View::shortest`] found.
enum Reach {
    /// The best path to a target, at most [`MAX_PATH_NODES`] nodes.
    Path(Vec<NodeId>),
    /// Targets in reach only along longer paths: the nearest, and its path's length in nodes.
    TooFar { site: NodeId, nodes: usize },
    /// No target in reach.
    None,
}

fn place_with(
    topo: &Topology,
    room: &BTreeMap<LinkId, LinkHeadroom>,
    req: &PlacementRequest,
) -> Result<Placement, PlacementError> {
    let sites = eligible_sites(topo, &req.edge, &req.b_end)?;
    let view = View::new(topo);
    let edge = &req.edge;
    let free = |l: &LinkId| room.get(l).map_or(Bandwidth::ZERO, |h| h.free);
    let too_far = |site: NodeId, nodes: usize| PlacementError::TooFar {
        edge: req.edge.clone(),
        service: req.b_end.service.clone(),
        site,
        nodes,
        max: MAX_PATH_NODES,
    };
    // A site reached, over the links with room, only along a path too long to use is not by
    // itself the reason: a shorter path to it (or to another site) may lack the room, and then
    // capacity is. Kept for when the length is (below).
    let long_with_room = match view.shortest(edge, &sites, |l| free(l) >= req.rate) {
        Reach::Path(path) => {
            let site = path.last().cloned().unwrap_or_else(|| req.edge.clone());
            let latency = path_latency(topo, &path);
            return Ok(Placement {
                site,
                path,
                latency,
            });
        }
        Reach::TooFar { site, nodes } => Some(too_far(site, nodes)),
        Reach::None => None,
    };
    // Refused: say why, naming the link that blocks.
    let best = match view.shortest(edge, &sites, |_| true) {
        Reach::Path(path) => path,
        // Too long whatever the rate: the length, not capacity, refuses it.
        Reach::TooFar { site, nodes } => return Err(too_far(site, nodes)),
        Reach::None => {
            return Err(PlacementError::Unreachable {
                edge: req.edge.clone(),
                service: req.b_end.service.clone(),
            });
        }
    };
    let capacity_of = |l: &LinkId| room.get(l).map_or(0, |h| h.capacity.bps());
    if let Some((cap, link)) = view.widest(edge, &sites, capacity_of)
        && cap < req.rate.bps()
    {
        return Err(PlacementError::ExceedsCapacity {
            asked: req.rate,
            edge: req.edge.clone(),
            service: req.b_end.service.clone(),
            bottleneck: link,
            capacity: Bandwidth::from_bps(cap),
        });
    }
    // Both widths count only the paths within the node limit, as placement does.
    let max_available = view
        .widest(edge, &sites, |l| free(l).bps())
        .map_or(0, |(w, _)| w);
    // The rate fits on a path within the limit, but the lowest-latency path with room to its
    // site is longer (sites are reached by their lowest-latency path only, as in routing):
    // the length refuses it, not capacity.
    if max_available >= req.rate.bps()
        && let Some(e) = long_with_room
    {
        return Err(e);
    }
    // The tightest link of the otherwise-best path among those that lack room.
    let bottleneck = path_links(&best)
        .into_iter()
        .filter(|l| free(l) < req.rate)
        .min_by_key(|l| free(l))
        .unwrap_or_else(|| LinkId::new(&req.edge, &req.edge));
    let h = room.get(&bottleneck).copied().unwrap_or(LinkHeadroom {
        capacity: Bandwidth::ZERO,
        reserved: Bandwidth::ZERO,
        free: Bandwidth::ZERO,
        circuits: 0,
    });
    Err(PlacementError::InsufficientCapacity(Box::new(Shortfall {
        asked: req.rate,
        edge: req.edge.clone(),
        service: req.b_end.service.clone(),
        bottleneck,
        free: h.free,
        capacity: h.capacity,
        reserved: h.reserved,
        best_path: best,
        max_available: Bandwidth::from_bps(max_available),
    })))
}

/// Why no VIP could be allocated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error(
        "the topology declares no address pools; add one under `pools:` to allocate circuit VIPs"
    )]
    NoPools,
    #[error("unknown pool \"{name}\" (pools: {})", list(known))]
    UnknownPool { name: String, known: Vec<PoolName> },
    #[error("pool {pool} ({prefix}) is exhausted: all {usable} usable addresses are allocated")]
    Exhausted {
        pool: PoolName,
        prefix: IpNetwork,
        usable: u128,
    },
    /// No pool named, and every pool of the circuit's family is full.
    #[error(
        "every pool of the circuit's address family is exhausted ({}): add a pool under `pools:`",
        list(pools)
    )]
    AllExhausted { pools: Vec<PoolName> },
    /// The pool asked for holds addresses of the other family than the circuit's prefix: its
    /// clients could not reach the VIP (an IPv4 client cannot connect to an IPv6 address, and
    /// an IPv6 one is outside an IPv4 prefix).
    #[error(
        "pool {pool} ({prefix}) holds {} addresses, and the circuit's clients ({clients}) are {}: they could not reach its VIP (name a pool of {} addresses)",
        family(!*.clients_v4), family(*.clients_v4), family(*.clients_v4)
    )]
    Family {
        pool: PoolName,
        prefix: IpNetwork,
        clients: IpNetwork,
        clients_v4: bool,
    },
    /// Pools exist, none of the circuit's prefix's family.
    #[error(
        "the topology declares no pool of {} addresses for the circuit's clients ({clients}); add one under `pools:` (pools: {})",
        family(*.clients_v4), list(known)
    )]
    NoPoolOfFamily {
        clients: IpNetwork,
        clients_v4: bool,
        known: Vec<PoolName>,
    },
}

impl PoolError {
    /// A mistake in the request (a pool the topology does not have, or one of the other family
    /// than the prefix), not the fabric's state (no pools of the family, or none with an
    /// address free): refused as such (422) whatever the fabric's state.
    pub fn in_request(&self) -> bool {
        matches!(
            self,
            PoolError::UnknownPool { .. } | PoolError::Family { .. }
        )
    }
}

/// "IPv4" or "IPv6".
fn family(v4: bool) -> &'static str {
    if v4 { "IPv4" } else { "IPv6" }
}

/// Whether `prefix` is IPv4, an IPv4-mapped IPv6 prefix counted as IPv4 (a pool stored before
/// validation refused them).
fn is_v4(prefix: IpNetwork) -> bool {
    prefix.ip().to_canonical().is_ipv4()
}

/// The usable address range of a pool: for IPv4 the network and broadcast addresses are skipped
/// (except in /31 and /32), for IPv6 the subnet-router anycast address (except in /127, /128).
pub fn usable_range(prefix: IpNetwork) -> (IpAddr, IpAddr) {
    match prefix {
        IpNetwork::V4(n) => {
            let (lo, hi) = (u32::from(n.network()), u32::from(n.broadcast()));
            let (lo, hi) = if n.prefix() < 31 {
                (lo + 1, hi - 1)
            } else {
                (lo, hi)
            };
            (
                IpAddr::V4(Ipv4Addr::from(lo)),
                IpAddr::V4(Ipv4Addr::from(hi)),
            )
        }
        IpNetwork::V6(n) => {
            let lo = u128::from(n.network());
            let hi = lo | (u128::MAX.checked_shr(u32::from(n.prefix())).unwrap_or(0));
            // An IPv4-mapped pool (a stored text's) is IPv4 to routers: its last address is
            // the broadcast address, skipped as in its IPv4 form.
            if let Some(v4) = crate::model::ipv4_mapped(prefix)
                && v4.prefix() < 31
            {
                return (
                    IpAddr::V6(Ipv6Addr::from(lo + 1)),
                    IpAddr::V6(Ipv6Addr::from(hi - 1)),
                );
            }
            let lo = if n.prefix() < 127 { lo + 1 } else { lo };
            (
                IpAddr::V6(Ipv6Addr::from(lo)),
                IpAddr::V6(Ipv6Addr::from(hi)),
            )
        }
    }
}

fn addr_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    }
}

fn addr_from(v4: bool, x: u128) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(x as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(x))
    }
}

/// An address as IPv4 and as IPv4-mapped IPv6 (`10.9.0.1`, `::ffff:10.9.0.1`), whichever it
/// was written as; an IPv6 address that is not IPv4-mapped, twice.
fn both_forms(ip: IpAddr) -> [IpAddr; 2] {
    match ip.to_canonical() {
        IpAddr::V4(v4) => [IpAddr::V4(v4), IpAddr::V6(v4.to_ipv6_mapped())],
        v6 => [v6, v6],
    }
}

/// Allocates the lowest usable address of a pool that is not in `used` (the VIPs of every
/// circuit the controller holds, from any pool; an IPv4 address and its IPv4-mapped form are
/// one) for a circuit whose clients are `clients`. `pool` names the pool, which must be of
/// `clients`' family; `None` takes the first pool of that family with a free address (the VIP of another family
/// would refuse every client: the edge serves a VIP to its circuit's prefix only). Costs
/// O(allocated addresses), whatever the pool's size.
pub fn allocate_vip(
    topo: &Topology,
    pool: Option<&str>,
    clients: IpNetwork,
    used: &BTreeSet<IpAddr>,
) -> Result<(PoolName, IpAddr), PoolError> {
    let clients_v4 = is_v4(clients);
    let p: &Pool = match pool {
        None => {
            // Each pool of the family in turn: a pool added when the first filled up is used
            // (only the first was, and the create refused as long as it stayed full).
            let mut family = topo.pools.iter().filter(|p| is_v4(p.prefix) == clients_v4);
            let Some(first) = family.next() else {
                return Err(match topo.pools.is_empty() {
                    true => PoolError::NoPools,
                    false => PoolError::NoPoolOfFamily {
                        clients,
                        clients_v4,
                        known: topo.pools.iter().map(|p| p.name.clone()).collect(),
                    },
                });
            };
            // Each pool's own refusal; the only one's is the answer as it is.
            let mut full = Vec::new();
            for p in std::iter::once(first).chain(family) {
                match allocate_vip(topo, Some(p.name.as_str()), clients, used) {
                    Err(e @ PoolError::Exhausted { .. }) => full.push((p.name.clone(), e)),
                    r => return r,
                }
            }
            return Err(match full.len() {
                1 => full.remove(0).1,
                _ => PoolError::AllExhausted {
                    pools: full.into_iter().map(|(name, _)| name).collect(),
                },
            });
        }
        Some(name) => topo
            .pools
            .iter()
            .find(|p| p.name.as_str() == name)
            .ok_or_else(|| PoolError::UnknownPool {
                name: name.to_string(),
                known: topo.pools.iter().map(|p| p.name.clone()).collect(),
            })?,
    };
    if is_v4(p.prefix) != clients_v4 {
        return Err(PoolError::Family {
            pool: p.name.clone(),
            prefix: p.prefix,
            clients,
            clients_v4,
        });
    }
    // An edge's client_address is never handed out: a VIP equal to it would take every
    // connection to that edge's service listeners for the circuit. (Validation refuses a pool
    // holding one; a text stored before that rule may still have it.)
    let clients = topo
        .nodes
        .iter()
        .filter(|n| n.kind == NodeKind::Edge)
        .filter_map(|n| n.client_address)
        .filter(|ip| !ip.to_canonical().is_unspecified());
    // Each address taken in both of its forms: an IPv4 address and its IPv4-mapped IPv6 form
    // are one address to routers, and a pool written `::ffff:10.9.0.0/125` (stored before
    // validation refused a mapped prefix) and rewritten `10.9.0.0/29`, or the other way
    // round, keeps the VIPs it handed out in the old form.
    let taken: BTreeSet<IpAddr> = used
        .iter()
        .copied()
        .chain(clients)
        .flat_map(both_forms)
        .collect();
    let (lo, hi) = usable_range(p.prefix);
    // The unspecified and broadcast addresses are never handed out (validation refuses a pool
    // holding one; a text stored before that rule may still have it): taken, as an edge's
    // client address is. They sit at a pool's first or last address.
    let taken: BTreeSet<IpAddr> = taken
        .into_iter()
        .chain([lo, hi].into_iter().filter(|ip| {
            let c = ip.to_canonical();
            c.is_unspecified() || matches!(c, IpAddr::V4(v4) if v4.is_broadcast())
        }))
        .collect();
    let v4 = lo.is_ipv4();
    let mut candidate = addr_u128(lo);
    let end = addr_u128(hi);
    for u in taken.range(lo..=hi) {
        let u = addr_u128(*u);
        if u == candidate {
            if candidate == end {
                return Err(PoolError::Exhausted {
                    pool: p.name.clone(),
                    prefix: p.prefix,
                    usable: end - addr_u128(lo) + 1,
                });
            }
            candidate += 1;
        } else if u > candidate {
            break;
        }
    }
    let vip = addr_from(v4, candidate);
    // A multicast pool (a stored text's) has no address to hand out.
    if vip.to_canonical().is_multicast() {
        return Err(PoolError::Exhausted {
            pool: p.name.clone(),
            prefix: p.prefix,
            usable: 0,
        });
    }
    Ok((p.name.clone(), vip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CountryCode, Link, Location, Node, Residency, Service, SiteService};

    fn node(id: &str, kind: NodeKind, region: &str) -> Node {
        Node {
            id: NodeId::new(id),
            kind,
            region: Region::new(region),
            country: CountryCode::parse("AU").unwrap(),
            location: Location { lat: 0.0, lon: 0.0 },
            address: "127.0.0.1:1".parse().unwrap(),
            state: AdminState::Up,
            client_address: None,
            transparent_port: None,
            serves: if kind == NodeKind::Site {
                vec![SiteService {
                    service: ServiceName::new("llm"),
                    backend: "127.0.0.1:2".parse().unwrap(),
                    capacity: 10,
                    weight: 100,
                    dial: 100,
                    health_check: None,
                    health: Default::default(),
                }]
            } else {
                vec![]
            },
        }
    }

    fn link(a: &str, b: &str, ms: u64, cap: &str) -> Link {
        Link {
            a: NodeId::new(a),
            b: NodeId::new(b),
            latency: Latency::from_micros(ms * 1000),
            capacity: cap.parse().unwrap(),
            state: AdminState::Up,
        }
    }

    /// edge -- t1 -- site-a (fast, 1G), edge -- t2 -- site-b (slow, 10G).
    fn topo() -> Topology {
        Topology {
            nodes: vec![
                node("edge", NodeKind::Edge, "au-east"),
                node("t1", NodeKind::Transit, "au-east"),
                node("t2", NodeKind::Transit, "au-east"),
                node("site-a", NodeKind::Site, "au-east"),
                node("site-b", NodeKind::Site, "au-south"),
            ],
            links: vec![
                link("edge", "t1", 1, "1Gbps"),
                link("t1", "site-a", 1, "1Gbps"),
                link("edge", "t2", 5, "10Gbps"),
                link("t2", "site-b", 5, "400Mbps"),
            ],
            services: vec![Service {
                name: ServiceName::new("llm"),
                port: Some(8080),
                vips: vec![],
                clients: vec![],
                residency: Residency::default(),
                requires_circuit: true,
                affinity: Default::default(),
            }],
            pools: vec![Pool {
                name: PoolName::new("vips"),
                prefix: "10.9.0.0/29".parse().unwrap(),
            }],
        }
    }

    fn req(rate: &str) -> PlacementRequest {
        PlacementRequest {
            edge: NodeId::new("edge"),
            b_end: BEnd::service("llm"),
            rate: rate.parse().unwrap(),
        }
    }

    fn resv(id: &str, p: &Placement, rate: &str) -> Reservation {
        Reservation {
            circuit: CircuitId::new(id),
            path: p.path.clone(),
            rate: rate.parse().unwrap(),
        }
    }

    #[test]
    fn places_on_lowest_latency_path_with_room() {
        let t = topo();
        let p = place(&t, &[], &req("600Mbps")).unwrap();
        assert_eq!(p.site.as_str(), "site-a");
        assert_eq!(p.latency, Latency::from_micros(2000));
        let r = resv("c1", &p, "600Mbps");
        // 600M more does not fit on the fast path (400M free) nor on the slow one (400M cap).
        let err = place(&t, std::slice::from_ref(&r), &req("600Mbps")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot place 600Mbps from \"edge\" to \"llm\": link edge--t1 has only 400Mbps free (capacity 1Gbps, \
             600Mbps reserved by other circuits) on the best path edge -> t1 -> site-a; at most 400Mbps fits on any path now"
        );
        // 300M moves nowhere: still fits on the fast path.
        assert_eq!(
            place(&t, std::slice::from_ref(&r), &req("300Mbps"))
                .unwrap()
                .site
                .as_str(),
            "site-a"
        );
        // 450M only fits... nowhere (slow path capped at 400M): 400M goes to the fast path.
        let r2 = resv(
            "c2",
            &place(&t, std::slice::from_ref(&r), &req("400Mbps")).unwrap(),
            "400Mbps",
        );
        let p3 = place(&t, &[r, r2], &req("100Mbps")).unwrap();
        assert_eq!(
            p3.site.as_str(),
            "site-b",
            "full fast path: the slow one is used"
        );
    }

    #[test]
    fn rate_above_every_path_capacity_names_the_widest_bottleneck() {
        let err = place(&topo(), &[], &req("2Gbps")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rate 2Gbps exceeds the capacity of every path from \"edge\" to \"llm\": the widest path is limited by \
             link edge--t1 with capacity 1Gbps"
        );
        assert_eq!(err.bottleneck().unwrap().to_string(), "edge--t1");
    }

    #[test]
    fn unknown_names_are_refused_with_the_known_ones() {
        let t = topo();
        let mut r = req("1Mbps");
        r.edge = NodeId::new("nope");
        assert_eq!(
            place(&t, &[], &r).unwrap_err().to_string(),
            "unknown edge node \"nope\" (edges: edge)"
        );
        r.edge = NodeId::new("t1");
        assert_eq!(
            place(&t, &[], &r).unwrap_err().to_string(),
            "node \"t1\" is a transit node; a circuit's A-end must be an edge (edges: edge)"
        );
        let mut r = req("1Mbps");
        r.b_end.service = ServiceName::new("video");
        assert_eq!(
            place(&t, &[], &r).unwrap_err().to_string(),
            "unknown service \"video\" (services: llm)"
        );
        let mut r = req("1Mbps");
        r.b_end.sites = vec![NodeId::new("t2")];
        assert_eq!(
            place(&t, &[], &r).unwrap_err().to_string(),
            "pinned site \"t2\" does not serve \"llm\" (sites serving it: site-a, site-b)"
        );
        let mut r = req("1Mbps");
        r.b_end.regions = vec![Region::new("nz")];
        assert_eq!(
            place(&t, &[], &r).unwrap_err().to_string(),
            "no site serving \"llm\" is allowed in regions nz: site-a is in region au-east; site-b is in region au-south"
        );
        // Pins and regions that exclude each other: the request's own contradiction (it was
        // `NoEligibleSite`, which the API answers 409, the fabric's state, and clients retry).
        let mut r = req("1Mbps");
        r.b_end.sites = vec![NodeId::new("site-a")];
        r.b_end.regions = vec![Region::new("au-south")];
        let err = place(&t, &[], &r).unwrap_err();
        assert!(
            matches!(err, PlacementError::PinnedOutsideRegions { .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "no pinned site is in the requested regions (au-south): site-a is in region au-east"
        );
        r.b_end.sites.push(NodeId::new("site-b"));
        assert_eq!(place(&t, &[], &r).unwrap().site.as_str(), "site-b");
    }

    #[test]
    fn regions_pins_and_down_links_constrain_the_path() {
        let mut t = topo();
        let mut r = req("10Mbps");
        r.b_end.regions = vec![Region::new("au-south")];
        assert_eq!(
            place(&t, &[], &r).unwrap().path,
            vec![
                NodeId::new("edge"),
                NodeId::new("t2"),
                NodeId::new("site-b")
            ]
        );
        let mut r = req("10Mbps");
        r.b_end.sites = vec![NodeId::new("site-b")];
        assert_eq!(place(&t, &[], &r).unwrap().site.as_str(), "site-b");
        t.links[0].state = AdminState::Down;
        assert_eq!(
            place(&t, &[], &req("10Mbps")).unwrap().site.as_str(),
            "site-b"
        );
        t.links[2].state = AdminState::Down;
        assert_eq!(
            place(&t, &[], &req("10Mbps")).unwrap_err().to_string(),
            "no path from \"edge\" to any eligible site serving \"llm\" over links and nodes that are not down, relayed by transits only (edges and sites never relay)"
        );
    }

    /// edge -> c01 .. c17 -> `site` (19 nodes), each link `ms` long and 10 Gbps wide.
    fn with_chain(mut t: Topology, site: &str, ms: u64) -> Topology {
        let mut prev = "edge".to_string();
        for k in 1..=17 {
            let c = format!("c{k:02}");
            t.nodes.push(node(&c, NodeKind::Transit, "au-east"));
            t.links.push(link(&prev, &c, ms, "10Gbps"));
            prev = c;
        }
        if t.node(site).is_none() {
            t.nodes.push(node(site, NodeKind::Site, "au-east"));
        }
        t.links.push(link(&prev, site, ms, "10Gbps"));
        t
    }

    /// The path of [`with_chain`]'s chain to `site`.
    fn chain_to(site: &str) -> Vec<NodeId> {
        std::iter::once("edge".to_string())
            .chain((1..=17).map(|k| format!("c{k:02}")))
            .chain(std::iter::once(site.to_string()))
            .map(|n| NodeId::new(&n))
            .collect()
    }

    /// A site nearest by latency but 19 nodes away (17 transits between) cannot carry a
    /// stream: its path is longer than a header names, so a circuit to it would be placed and
    /// never work. The nearest site whose path fits is used; with none, the refusal says why.
    #[test]
    fn a_path_longer_than_a_header_names_is_refused_and_a_nearer_site_used() {
        let mut t = with_chain(topo(), "site-c", 0);

        let p = place(&t, &[], &req("10Mbps")).unwrap();
        assert_eq!(p.site.as_str(), "site-a");
        assert_eq!(p.path.len(), 3);

        // Room for 2 Gbps only on the long path, which no rate may use: the paths that may be
        // used are too narrow, and the refusal says so (it said the long path was too long).
        let err = place(&t, &[], &req("2Gbps")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rate 2Gbps exceeds the capacity of every path from \"edge\" to \"llm\": the widest path is limited by \
             link edge--t1 with capacity 1Gbps"
        );
        // And no other site at all.
        t.links[1].state = AdminState::Down;
        t.links[3].state = AdminState::Down;
        assert!(matches!(
            place(&t, &[], &req("10Mbps")),
            Err(PlacementError::TooFar {
                nodes: 19,
                max: 18,
                ..
            })
        ));
        // A reserved path that long is not kept by a resize either.
        assert!(!path_usable(&t, &chain_to("site-c")));
    }

    /// 2 Gbps to site-a: its lowest-latency path edge -> t1 -> site-a (2 ms) is 1 Gbps wide; a
    /// 10 Gbps chain of 17 transits (18 ms, 19 nodes) reaches it too. Capacity refuses it,
    /// naming edge--t1. (The search among links with room found only the chain and refused
    /// with "the lowest-latency path to site \"site-a\" has 19 nodes", which it has not.)
    #[test]
    fn a_rate_too_wide_for_the_short_path_is_refused_for_capacity_not_for_a_long_path_with_room() {
        let t = with_chain(topo(), "site-a", 1);
        let err = place(&t, &[], &req("2Gbps")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rate 2Gbps exceeds the capacity of every path from \"edge\" to \"llm\": the widest path is limited by \
             link edge--t1 with capacity 1Gbps"
        );
        assert_eq!(err.bottleneck().unwrap().to_string(), "edge--t1");
    }

    /// 500 Mbps fits on edge -> t1 -> site-a (1 Gbps), but site-a is nearer along a 0 ms chain
    /// of 19 nodes with room too, and site-b's path is 400 Mbps wide. A site is reached by its
    /// lowest-latency path with room (as routing reaches it), so the length refuses it, not
    /// capacity: a capacity refusal here would say that at most 1 Gbps fits.
    #[test]
    fn a_site_nearer_along_a_long_path_with_room_is_refused_as_too_far_though_a_short_one_fits() {
        let t = with_chain(topo(), "site-a", 0);
        assert_eq!(
            place(&t, &[], &req("10Mbps")).unwrap().site.as_str(),
            "site-b"
        );
        let err = place(&t, &[], &req("500Mbps")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no path from \"edge\" to a site serving \"llm\" within 18 nodes: the lowest-latency path to site \"site-a\" has 19 nodes (a stream's header names at most 16 hops)"
        );
    }

    /// The topology of `a_path_longer_than_a_header_names_is_refused_and_a_nearer_site_used`,
    /// the 19-node chain (0 ms, 10 Gbps) to site-c; circuits leave
    /// 500 Mbps free on the chain, 100 Mbps on edge -> t1 -> site-a and nothing on t2--site-b.
    /// 600 Mbps is refused, and at most 100 Mbps fits: the chain is longer than a header names.
    /// (It said 500 Mbps, which placement would refuse as too far.)
    #[test]
    fn the_rate_that_fits_now_counts_only_paths_a_header_can_name() {
        let t = with_chain(topo(), "site-c", 0);
        let fast = place(&t, &[], &req("10Mbps")).unwrap();
        assert_eq!(fast.site.as_str(), "site-a");
        let mut r = req("10Mbps");
        r.b_end.sites = vec![NodeId::new("site-b")];
        let slow = place(&t, &[], &r).unwrap();
        let rs = vec![
            resv("c1", &fast, "900Mbps"),
            resv("c2", &slow, "400Mbps"),
            Reservation {
                circuit: CircuitId::new("c3"),
                path: chain_to("site-c"),
                rate: "9500Mbps".parse().unwrap(),
            },
        ];
        let err = place(&t, &rs, &req("600Mbps")).unwrap_err();
        let PlacementError::InsufficientCapacity(s) = &err else {
            panic!("{err}");
        };
        assert_eq!(s.max_available, Bandwidth::from_mbps(100), "{err}");
        assert_eq!(
            err.to_string(),
            "cannot place 600Mbps from \"edge\" to \"llm\": link edge--t1 has only 100Mbps free (capacity 1Gbps, \
             900Mbps reserved by other circuits) on the best path edge -> t1 -> site-a; at most 100Mbps fits on any path now"
        );
    }

    /// Between two equally fast paths, placement takes the one with fewer links, as routing
    /// does: 17 transits at 1 ms then 19 ms (19 nodes, found first) or 8 at 4 ms (10 nodes),
    /// 36 ms both. The first found was kept, and the site refused as too far.
    #[test]
    fn an_equally_fast_path_with_fewer_links_is_placed() {
        let mut t = topo();
        t.links.retain(|l| l.a.as_str() != "edge");
        let mut chain = |name: char, n: usize, each: u64, last: u64| {
            let mut prev = "edge".to_string();
            for k in 1..=n {
                let c = format!("{name}{k:02}");
                t.nodes.push(node(&c, NodeKind::Transit, "au-east"));
                t.links.push(link(&prev, &c, each, "10Gbps"));
                prev = c;
            }
            t.links.push(link(&prev, "site-a", last, "10Gbps"));
        };
        chain('a', 17, 1, 19);
        chain('b', 8, 4, 4);
        t.links
            .retain(|l| l.a.as_str() != "t1" && l.b.as_str() != "t1");
        let p = place(&t, &[], &req("10Mbps")).unwrap();
        assert_eq!(p.site.as_str(), "site-a");
        assert_eq!(p.path.len(), 10, "{:?}", p.path);
        assert_eq!(p.latency, Latency::from_micros(36_000));
    }

    /// A service VIP of IPv6 addresses covering a circuit's VIP is named with its port as the
    /// topology writes it, the prefix in brackets. (`2001:db8::/64:443` was printed.)
    #[test]
    fn a_shadowing_ipv6_service_vip_is_named_in_brackets() {
        let mut t = topo();
        t.services[0].vips = vec![crate::model::Vip {
            prefix: "2001:db8::/64".parse().unwrap(),
            port: 443,
        }];
        let issue = check_vip(
            &t,
            &CircuitId::new("c-000001"),
            &NodeId::new("edge"),
            "2001:db8::7".parse().unwrap(),
            443,
        )
        .expect("shadowed");
        assert!(
            issue
                .to_string()
                .contains("inside service llm's VIP [2001:db8::/64]:443"),
            "{issue}"
        );
    }

    #[test]
    fn sites_and_edges_never_relay() {
        let mut t = topo();
        // A shortcut through site-b to site-a must not be used.
        t.links.push(link("edge", "site-b", 1, "10Gbps"));
        t.links.push(link("site-b", "site-a", 1, "10Gbps"));
        t.links[0].state = AdminState::Down;
        let mut r = req("10Mbps");
        r.b_end.sites = vec![NodeId::new("site-a")];
        let err = place(&t, &[], &r).unwrap_err();
        assert!(matches!(err, PlacementError::Unreachable { .. }), "{err}");
        // The refusal names the relay rule, not only down elements: here the only way left
        // is through a site. (It said every route crossed something down.)
        assert!(
            err.to_string().contains("relayed by transits only"),
            "{err}"
        );
    }

    #[test]
    fn residency_excludes_sites() {
        let mut t = topo();
        t.services[0].residency.regions = vec![Region::new("au-south")];
        assert_eq!(
            place(&t, &[], &req("10Mbps")).unwrap().site.as_str(),
            "site-b"
        );
    }

    /// A circuit pinned to two sites and placed on site-a: once site-b no longer serves the
    /// service (an apply took it away), the circuit is still resized (it was refused, "site-b
    /// does not serve", for a change of rate alone, shrinks included, until deleted with its
    /// VIP); once none of its pinned sites serves, it is refused.
    #[test]
    fn a_resize_ignores_pinned_sites_that_no_longer_serve() {
        let mut t = topo();
        let mut r = req("100Mbps");
        r.b_end.sites = vec![NodeId::new("site-a"), NodeId::new("site-b")];
        let p = place(&t, &[], &r).unwrap();
        assert_eq!(p.site.as_str(), "site-a");
        let rs = vec![resv("c1", &p, "100Mbps")];
        let node = |t: &mut Topology, id: &str| {
            t.nodes
                .iter_mut()
                .find(|n| n.id.as_str() == id)
                .unwrap()
                .serves
                .clear()
        };
        node(&mut t, "site-b");
        let grown = PlacementRequest {
            rate: "200Mbps".parse().unwrap(),
            ..r.clone()
        };
        let g = resize(&t, &rs, &CircuitId::new("c1"), &grown).unwrap();
        assert_eq!(g.path, p.path);
        node(&mut t, "site-a");
        assert!(matches!(
            resize(&t, &rs, &CircuitId::new("c1"), &grown),
            Err(PlacementError::SiteDoesNotServe { .. })
        ));
    }

    #[test]
    fn resize_keeps_path_when_it_fits_and_moves_make_before_break_otherwise() {
        let t = topo();
        let p = place(&t, &[], &req("600Mbps")).unwrap();
        let rs = vec![resv("c1", &p, "600Mbps")];
        // Growing to 900M on the same path fits: its own 600M are its own.
        let g = resize(&t, &rs, &CircuitId::new("c1"), &req("900Mbps")).unwrap();
        assert_eq!(g.path, p.path);
        // 1G also fits in place (exactly the capacity).
        assert_eq!(
            resize(&t, &rs, &CircuitId::new("c1"), &req("1Gbps"))
                .unwrap()
                .path,
            p.path
        );
        // With another 300M circuit on the fast path, 900M cannot stay and cannot move (400M slow path).
        let other = place(&t, &rs, &req("300Mbps")).unwrap();
        let rs2 = vec![rs[0].clone(), resv("c2", &other, "300Mbps")];
        let err = resize(&t, &rs2, &CircuitId::new("c1"), &req("900Mbps")).unwrap_err();
        assert!(
            matches!(err, PlacementError::InsufficientCapacity(_)),
            "{err}"
        );
        // Shrinking c1 to 350M and its path moving is not needed; moving happens when the old path is down.
        let mut t2 = t.clone();
        t2.links[1].state = AdminState::Down;
        let moved = resize(&t2, &rs, &CircuitId::new("c1"), &req("350Mbps")).unwrap();
        assert_eq!(moved.site.as_str(), "site-b");
        assert!(matches!(
            resize(&t, &rs, &CircuitId::new("zz"), &req("1Mbps")),
            Err(PlacementError::UnknownCircuit(_))
        ));
    }

    /// A circuit on a path through a transit drained since moves on a resize when a drain-free
    /// path has room, as a create avoids the drained transit; with no room elsewhere it stays.
    /// (A resize kept the drained path whenever it fit there.)
    #[test]
    fn a_resize_leaves_a_drained_path_for_a_drain_free_one_with_room() {
        let mut t = topo();
        let p = place(&t, &[], &req("300Mbps")).unwrap();
        assert_eq!(p.site.as_str(), "site-a");
        let rs = vec![resv("c1", &p, "300Mbps")];
        t.nodes[1].state = AdminState::Drain;
        for rate in ["200Mbps", "350Mbps"] {
            let r = resize(&t, &rs, &CircuitId::new("c1"), &req(rate)).unwrap();
            assert_eq!(r.site.as_str(), "site-b", "{rate}");
            assert!(!path_drained(&t, &r.path), "{rate}");
        }
        // 500M fits only on the drained path (site-b's link has 400M): it stays.
        let r = resize(&t, &rs, &CircuitId::new("c1"), &req("500Mbps")).unwrap();
        assert_eq!(r.path, p.path);
    }

    /// c1 (600M) and c2 (400M) fill the fast path; an apply lowers t1--site-a to 500M, leaving
    /// it over-committed with nothing free. Shrinking c1 to 200M keeps its path: a shrink only
    /// lowers what it holds. (It looked for 200M free beside c2, found 100M, and placed again:
    /// pinned to site-a it was refused, unpinned it moved to the slow site-b.)
    #[test]
    fn a_shrink_on_an_over_committed_link_keeps_its_path() {
        let mut t = topo();
        let p = place(&t, &[], &req("600Mbps")).unwrap();
        let rs = vec![resv("c1", &p, "600Mbps"), resv("c2", &p, "400Mbps")];
        t.links[1].capacity = "500Mbps".parse().unwrap();
        assert!(matches!(
            check_reservations(&t, &rs)[..],
            [ReservationIssue::OverCommitted { .. }]
        ));
        let shrink = resize(&t, &rs, &CircuitId::new("c1"), &req("200Mbps"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((shrink.site.as_str(), &shrink.path), ("site-a", &p.path));
        let mut pinned = req("200Mbps");
        pinned.b_end.sites = vec![NodeId::new("site-a")];
        let shrink =
            resize(&t, &rs, &CircuitId::new("c1"), &pinned).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(shrink.path, p.path);
        // The same rate stays too (the controller answers it before placing, but the maths
        // agrees).
        assert_eq!(
            resize(&t, &rs, &CircuitId::new("c1"), &req("600Mbps"))
                .unwrap()
                .path,
            p.path
        );
        // A shrink off a path no longer usable still moves.
        let mut down = t.clone();
        down.links[1].state = AdminState::Down;
        assert_eq!(
            resize(&down, &rs, &CircuitId::new("c1"), &req("200Mbps"))
                .unwrap()
                .site
                .as_str(),
            "site-b"
        );
    }

    /// Edges e and e2, transit t, sites s1 (near) and s2; every link 1 Gbps; c-2 holds 300M on
    /// e2 -> t -> s1, c-1 600M on e -> t -> s1. Growing c-1 to 800M cannot stay on t--s1 and
    /// moves to s2: the new path shares e--t with the old one, which carries the larger rate
    /// (one limiter per circuit), not both. (c-1's own 600M was charged against the new path,
    /// and the refusal counted them as "reserved by other circuits".)
    #[test]
    fn a_resize_that_moves_is_not_charged_its_own_old_reservation() {
        let t = Topology {
            nodes: vec![
                node("e", NodeKind::Edge, "au-east"),
                node("e2", NodeKind::Edge, "au-east"),
                node("t", NodeKind::Transit, "au-east"),
                node("s1", NodeKind::Site, "au-east"),
                node("s2", NodeKind::Site, "au-east"),
            ],
            links: vec![
                link("e", "t", 1, "1Gbps"),
                link("e2", "t", 1, "1Gbps"),
                link("t", "s1", 1, "1Gbps"),
                link("t", "s2", 5, "1Gbps"),
            ],
            ..topo()
        };
        let from = |edge: &str, rate: &str| PlacementRequest {
            edge: NodeId::new(edge),
            ..req(rate)
        };
        let c2 = place(&t, &[], &from("e2", "300Mbps")).unwrap();
        let c1 = place(&t, &[], &from("e", "600Mbps")).unwrap();
        assert_eq!((c1.site.as_str(), c2.site.as_str()), ("s1", "s1"));
        let rs = vec![resv("c-2", &c2, "300Mbps"), resv("c-1", &c1, "600Mbps")];
        let moved = resize(&t, &rs, &CircuitId::new("c-1"), &from("e", "800Mbps"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            moved.path,
            [NodeId::new("e"), NodeId::new("t"), NodeId::new("s2")]
        );
        // While the old path is held: e--t carries at most 800M of c-1, not 1.4G.
        let held = vec![rs[0].clone(), rs[1].clone(), resv("c-1", &moved, "800Mbps")];
        let et = &headroom(&t, &held)[&LinkId::parse("e--t").unwrap()];
        assert_eq!(
            (et.reserved, et.free, et.circuits),
            (Bandwidth::from_mbps(800), Bandwidth::from_mbps(200), 1)
        );
        assert_eq!(check_reservations(&t, &held), []);
        // A refusal counts the other circuits only: with c-3 on t--s2, 800M fits nowhere.
        let c3 = place(&t, &rs, &from("e2", "500Mbps")).unwrap();
        assert_eq!(c3.site.as_str(), "s2");
        let rs3 = vec![rs[0].clone(), rs[1].clone(), resv("c-3", &c3, "500Mbps")];
        let err = resize(&t, &rs3, &CircuitId::new("c-1"), &from("e", "800Mbps")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot place 800Mbps from \"e\" to \"llm\": link s1--t has only 700Mbps free \
             (capacity 1Gbps, 300Mbps reserved by other circuits) on the best path e -> t -> s1; \
             at most 700Mbps fits on any path now"
        );
    }

    #[test]
    fn headroom_and_check_reservations_flag_over_commit() {
        let t = topo();
        let p = place(&t, &[], &req("600Mbps")).unwrap();
        let rs = vec![resv("c1", &p, "600Mbps")];
        let h = headroom(&t, &rs);
        let e = &h[&LinkId::parse("edge--t1").unwrap()];
        assert_eq!(
            (e.capacity, e.reserved, e.free, e.circuits),
            (
                Bandwidth::from_mbps(1000),
                Bandwidth::from_mbps(600),
                Bandwidth::from_mbps(400),
                1
            )
        );
        assert!(check_reservations(&t, &rs).is_empty());
        let mut shrunk = t.clone();
        shrunk.links[0].capacity = Bandwidth::from_mbps(500);
        shrunk.links.remove(1);
        let issues = check_reservations(&shrunk, &rs);
        let text: Vec<String> = issues.iter().map(|i| i.to_string()).collect();
        assert_eq!(
            text,
            vec![
                "circuit c1 is reserved on link site-a--t1, which the topology no longer has".to_string(),
                "link edge--t1 would be over-committed: 600Mbps reserved by circuits c1 but capacity 500Mbps".to_string(),
            ]
        );
    }

    /// A circuit holding two reservations on the same links (a rate reduction awaiting
    /// acknowledgement, or a move sharing links with its old path) is one circuit: counted once
    /// per link, named once per over-committed link, each problem of its path listed once.
    #[test]
    fn a_circuit_with_two_reservations_on_a_link_counts_once() {
        let t = topo();
        let p = place(&t, &[], &req("600Mbps")).unwrap();
        // c1 shrunk from 800M to 600M on the same path: it still holds the 200M difference.
        let rs = vec![
            resv("c1", &p, "600Mbps"),
            resv("c1", &p, "200Mbps"),
            resv("c2", &p, "100Mbps"),
        ];
        let h = headroom(&t, &rs);
        let e = &h[&LinkId::parse("edge--t1").unwrap()];
        assert_eq!(
            (e.reserved, e.circuits),
            (Bandwidth::from_mbps(900), 2),
            "two circuits hold edge--t1"
        );
        let mut changed = t.clone();
        changed.links[0].capacity = Bandwidth::from_mbps(500);
        changed.links[1].state = AdminState::Down;
        let text: Vec<String> = check_reservations(&changed, &rs)
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(
            text,
            vec![
                "circuit c1 is reserved on link site-a--t1, which would be down".to_string(),
                "circuit c2 is reserved on link site-a--t1, which would be down".to_string(),
                "link edge--t1 would be over-committed: 900Mbps reserved by circuits c1, c2 but capacity 500Mbps".to_string(),
            ]
        );
    }

    /// A node of the path (edge, transit or site) removed or down breaks the reservation like a
    /// link does; and a site the circuit may no longer use for its service (the service gone,
    /// the site no longer serving it, outside its residency or the circuit's regions) breaks
    /// the circuit.
    #[test]
    fn nodes_down_or_removed_and_sites_no_longer_serving_are_flagged() {
        let t = topo();
        let p = place(&t, &[], &req("100Mbps")).unwrap();
        let rs = vec![resv("c1", &p, "100Mbps")];
        let (id, b, site) = (CircuitId::new("c1"), BEnd::service("llm"), &p.site);
        let texts = |t: &Topology| -> Vec<String> {
            check_reservations(t, &rs)
                .into_iter()
                .chain(check_site(t, &id, &b, site))
                .map(|i| i.to_string())
                .collect()
        };
        assert_eq!(texts(&t), Vec::<String>::new());
        for n in ["edge", "t1", "site-a"] {
            let mut down = t.clone();
            down.nodes
                .iter_mut()
                .find(|x| x.id.as_str() == n)
                .unwrap()
                .state = AdminState::Down;
            assert_eq!(
                texts(&down),
                [format!(
                    "circuit c1 is reserved through node {n}, which would be down"
                )]
            );
        }
        let mut gone = t.clone();
        gone.nodes.retain(|x| x.id.as_str() != "t1");
        gone.links
            .retain(|l| l.a.as_str() != "t1" && l.b.as_str() != "t1");
        assert_eq!(
            texts(&gone),
            [
                "circuit c1 is reserved through node t1, which the topology no longer has",
                "circuit c1 is reserved on link edge--t1, which the topology no longer has",
                "circuit c1 is reserved on link site-a--t1, which the topology no longer has",
            ]
        );
        let mut redeclared = t.clone();
        redeclared
            .nodes
            .iter_mut()
            .find(|x| x.id.as_str() == "t1")
            .unwrap()
            .kind = NodeKind::Site;
        assert_eq!(
            texts(&redeclared),
            [
                "circuit c1 is reserved through node t1, which would be a site where the path needs a transit"
            ]
        );
        let mut no_service = t.clone();
        no_service.services.clear();
        for n in &mut no_service.nodes {
            n.serves.clear();
        }
        assert_eq!(
            texts(&no_service),
            ["circuit c1 is for service llm, which the topology no longer has"]
        );
        let mut not_serving = t.clone();
        not_serving.nodes[3].serves.clear();
        assert_eq!(
            texts(&not_serving),
            ["circuit c1 ends at site site-a, which would no longer serve llm"]
        );
        let mut residency = t.clone();
        residency.services[0].residency.regions = vec![Region::new("au-south")];
        assert_eq!(
            texts(&residency),
            [
                "circuit c1 ends at site site-a, which would no longer be allowed for llm: site-a (au-east, AU) is outside the service's residency"
            ]
        );
        let mut moved = t.clone();
        moved.nodes[3].region = Region::new("au-west");
        let b = BEnd {
            regions: vec![Region::new("au-east")],
            ..BEnd::service("llm")
        };
        assert_eq!(
            check_site(&moved, &id, &b, site).map(|i| i.to_string()),
            Some(
                "circuit c1 ends at site site-a, which would no longer be allowed for llm: site-a is in region au-west, not among the circuit's regions au-east"
                    .to_string()
            )
        );
        // A new port for the service is no problem: the circuit's VIP keeps its port.
        let mut port = t.clone();
        port.services[0].port = Some(9090);
        assert_eq!(texts(&port), Vec::<String>::new());
    }

    /// A pool holding an edge's client_address (a text stored before validation refused it)
    /// never hands that address out, written as IPv4 or as IPv4-mapped IPv6. (It was the
    /// first VIP of such a pool: the circuit then took every connection to the edge's service
    /// listeners.)
    #[test]
    fn vips_skip_edge_client_addresses() {
        let mut t = topo();
        let edge = t
            .nodes
            .iter_mut()
            .find(|n| n.kind == NodeKind::Edge)
            .unwrap();
        edge.client_address = Some("10.9.0.1".parse().unwrap());
        let mut used = BTreeSet::new();
        let (_, first) = allocate_vip(&t, None, v4_clients(), &used).unwrap();
        assert_eq!(first.to_string(), "10.9.0.2");
        used.insert(first);
        let edge = t
            .nodes
            .iter_mut()
            .find(|n| n.kind == NodeKind::Edge)
            .unwrap();
        edge.client_address = Some("::ffff:10.9.0.3".parse().unwrap());
        used.insert("10.9.0.1".parse().unwrap());
        let (_, next) = allocate_vip(&t, None, v4_clients(), &used).unwrap();
        assert_eq!(next.to_string(), "10.9.0.4");
    }

    /// A pool a stored text kept from before validation refused it hands out no unspecified,
    /// broadcast or multicast address (`0.0.0.0` was a wildcard listener no client could dial),
    /// and one stored in IPv4-mapped form skips its broadcast address as its IPv4 form does.
    #[test]
    fn stored_pools_hand_out_only_unicast_vips() {
        let mut t = topo();
        let vip = |t: &Topology, used: &BTreeSet<IpAddr>| {
            allocate_vip(t, None, v4_clients(), used).map(|(_, ip)| ip)
        };
        t.pools[0].prefix = "0.0.0.0/31".parse().unwrap();
        assert_eq!(vip(&t, &BTreeSet::new()).unwrap().to_string(), "0.0.0.1");
        t.pools[0].prefix = "255.255.255.254/31".parse().unwrap();
        let first = vip(&t, &BTreeSet::new()).unwrap();
        assert_eq!(first.to_string(), "255.255.255.254");
        assert!(matches!(
            vip(&t, &BTreeSet::from([first])),
            Err(PoolError::Exhausted { .. })
        ));
        t.pools[0].prefix = "224.0.0.0/30".parse().unwrap();
        assert!(matches!(
            vip(&t, &BTreeSet::new()),
            Err(PoolError::Exhausted { .. })
        ));
        t.pools[0].prefix = "::ffff:10.9.0.0/125".parse().unwrap();
        let mut used = BTreeSet::new();
        for _ in 0..6 {
            used.insert(vip(&t, &used).unwrap());
        }
        assert!(
            matches!(vip(&t, &used), Err(PoolError::Exhausted { .. })),
            "{used:?}"
        );
    }

    /// Clients of a circuit: an IPv4 prefix, an IPv6 one.
    fn v4_clients() -> IpNetwork {
        "203.0.113.0/24".parse().unwrap()
    }
    fn v6_clients() -> IpNetwork {
        "2001:db8::/32".parse().unwrap()
    }

    #[test]
    fn vips_skip_network_and_broadcast_and_fill_gaps() {
        let t = topo();
        let mut used = BTreeSet::new();
        let mut got = Vec::new();
        for _ in 0..6 {
            let (_, ip) = allocate_vip(&t, None, v4_clients(), &used).unwrap();
            used.insert(ip);
            got.push(ip.to_string());
        }
        assert_eq!(
            got,
            [
                "10.9.0.1", "10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"
            ]
        );
        assert_eq!(
            allocate_vip(&t, None, v4_clients(), &used)
                .unwrap_err()
                .to_string(),
            "pool vips (10.9.0.0/29) is exhausted: all 6 usable addresses are allocated"
        );
        used.remove(&"10.9.0.3".parse::<IpAddr>().unwrap());
        assert_eq!(
            allocate_vip(&t, None, v4_clients(), &used)
                .unwrap()
                .1
                .to_string(),
            "10.9.0.3"
        );
        assert_eq!(
            allocate_vip(&t, Some("other"), v4_clients(), &used)
                .unwrap_err()
                .to_string(),
            "unknown pool \"other\" (pools: vips)"
        );
        let mut v6 = t.clone();
        v6.pools = vec![Pool {
            name: PoolName::new("v6"),
            prefix: "fd00::/126".parse().unwrap(),
        }];
        assert_eq!(
            allocate_vip(&v6, None, v6_clients(), &BTreeSet::new())
                .unwrap()
                .1
                .to_string(),
            "fd00::1"
        );
        v6.pools[0].prefix = "10.0.0.4/31".parse().unwrap();
        assert_eq!(
            allocate_vip(&v6, None, v4_clients(), &BTreeSet::new())
                .unwrap()
                .1
                .to_string(),
            "10.0.0.4"
        );
        v6.pools.clear();
        assert_eq!(
            allocate_vip(&v6, None, v4_clients(), &BTreeSet::new()).unwrap_err(),
            PoolError::NoPools
        );
    }

    /// With no pool named, a full pool gives way to the next of the family: a pool added when
    /// the first filled up is used. All full, the refusal names them all. (Only the first was
    /// tried: every create without `--pool` was refused while a pool added for it stood empty.)
    #[test]
    fn a_full_pool_gives_way_to_the_next_of_its_family() {
        let mut t = topo();
        t.pools.push(Pool {
            name: PoolName::new("more"),
            prefix: "10.9.1.0/30".parse().unwrap(),
        });
        let mut used = BTreeSet::new();
        let mut got = Vec::new();
        for _ in 0..8 {
            let (pool, ip) = allocate_vip(&t, None, v4_clients(), &used).unwrap();
            used.insert(ip);
            got.push(format!("{pool} {ip}"));
        }
        assert_eq!(got[5], "vips 10.9.0.6");
        assert_eq!(got[6..], ["more 10.9.1.1", "more 10.9.1.2"]);
        assert_eq!(
            allocate_vip(&t, None, v4_clients(), &used)
                .unwrap_err()
                .to_string(),
            "every pool of the circuit's address family is exhausted (vips, more): add a pool under `pools:`"
        );
        // Named, a full pool is refused as before.
        assert!(matches!(
            allocate_vip(&t, Some("vips"), v4_clients(), &used),
            Err(PoolError::Exhausted { .. })
        ));
    }

    /// A circuit's VIP is of its clients' family: the first pool of that family unless one is
    /// named, and a named pool of the other family refused. (The first pool was taken whatever
    /// its family: an IPv6 VIP for IPv4 clients, which the edge serves only to the circuit's
    /// prefix, refused every client.)
    #[test]
    fn a_vip_is_of_the_family_of_the_circuits_clients() {
        let mut t = topo();
        t.pools.insert(
            0,
            Pool {
                name: PoolName::new("v6"),
                prefix: "fd00:9::/120".parse().unwrap(),
            },
        );
        let none = BTreeSet::new();
        let got = |clients: IpNetwork| {
            allocate_vip(&t, None, clients, &none).map(|(p, ip)| (p.to_string(), ip.to_string()))
        };
        assert_eq!(got(v4_clients()), Ok(("vips".into(), "10.9.0.1".into())));
        assert_eq!(got(v6_clients()), Ok(("v6".into(), "fd00:9::1".into())));
        let err = allocate_vip(&t, Some("v6"), v4_clients(), &none).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pool v6 (fd00:9::/120) holds IPv6 addresses, and the circuit's clients (203.0.113.0/24) are IPv4: they could not reach its VIP (name a pool of IPv4 addresses)"
        );
        t.pools.truncate(1);
        assert_eq!(
            allocate_vip(&t, None, v4_clients(), &none)
                .unwrap_err()
                .to_string(),
            "the topology declares no pool of IPv4 addresses for the circuit's clients (203.0.113.0/24); add one under `pools:` (pools: v6)"
        );
    }

    /// A VIP in use counts in both of its forms: an IPv4 address and its IPv4-mapped IPv6 form
    /// are one address to routers. A pool stored as `::ffff:10.9.0.0/125` (before validation
    /// refused a mapped prefix) and rewritten as `10.9.0.0/29` keeps the VIPs it handed out,
    /// and the other way round. (They were compared as written: the same address went to two
    /// circuits.)
    #[test]
    fn vips_in_use_count_in_their_ipv4_and_ipv4_mapped_forms() {
        let mut t = topo();
        let mapped: BTreeSet<IpAddr> = ["::ffff:10.9.0.1".parse().unwrap()].into();
        let (_, ip) = allocate_vip(&t, None, v4_clients(), &mapped).unwrap();
        assert_eq!(ip.to_string(), "10.9.0.2");
        t.pools[0].prefix = "::ffff:10.9.0.0/125".parse().unwrap();
        let v4: BTreeSet<IpAddr> = ["10.9.0.1".parse().unwrap()].into();
        let (_, ip) = allocate_vip(&t, None, v4_clients(), &v4).unwrap();
        assert_eq!(ip.to_string(), "::ffff:10.9.0.2");
    }
}
