//! Route selection: for one node (normally an edge) and every service, the ranked list of
//! candidate sites with their paths and costs, precomputed into a [`RoutingTable`] so that a
//! connection's lookup does no graph work.
//!
//! # How a table is built
//! One Dijkstra run (binary heap) from `from` over the [`Graph`], with:
//! - link weight = the measured one-way latency from [`LiveState::link_latency`] if present,
//!   else the declared latency (both clamped to at least 1 ns);
//! - down nodes and links (admin `down`, or listed in the live state) never entered;
//! - only transits relay: the search does not continue from an edge or a site other than
//!   `from`, so paths are `from`, transits, then the site (the rule circuits follow too);
//! - drained nodes and links (admin `drain`) usable, but the path cost is lexicographic
//!   `(drained elements on the path, latency)`: a path with a drained element is chosen only
//!   when the site cannot be reached without one, and such a candidate has `drained: true`;
//! - ties between equal-cost paths resolved by the fewest links, then the smallest predecessor
//!   id at each hop (node indices are in id order), so the result depends on ids and numbers
//!   only, never on the order of the YAML, and a path within [`MAX_PATH_NODES`] is not lost to
//!   an equally fast longer one.
//!
//! Then, per service, every serving site that is allowed by the service's residency, not down,
//! reachable by a path of at most [`MAX_PATH_NODES`] nodes, and eligible by load ([`SiteLoad::penalty`]) becomes a [`Candidate`]. Candidates
//! are ranked by `(drained, cost, site id, path)`: every drain-free candidate comes before
//! every drained one, then lower cost (latency + load penalty) wins.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::graph::{Graph, weight_ns};
use crate::model::{AdminState, FULL_DIAL, LinkId, NodeId, NodeKind, ServiceName, Topology};
use crate::units::Latency;

/// What the router or controller knows beyond the YAML. Entries naming nodes or links that the
/// topology does not have are ignored (telemetry may lag a topology change).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LiveState {
    pub down_nodes: BTreeSet<NodeId>,
    pub down_links: BTreeSet<LinkId>,
    /// Measured one-way latency (RTT/2: links are declared one-way); replaces the declared one.
    pub link_latency: BTreeMap<LinkId, Latency>,
    /// A site's load summed over its services: what routing uses for a service that has no
    /// entry of its own in [`Self::service_load`] (a controller or site of an older version).
    pub site_load: BTreeMap<NodeId, SiteLoad>,
    /// A site's load per service, as routing reads it ([`Self::load_of`]): one service full
    /// does not hide behind another idle one on the same site. Absent from older senders.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service_load: BTreeMap<NodeId, BTreeMap<ServiceName, SiteLoad>>,
}

impl LiveState {
    /// The same state with every measured link latency raised to at least the link's declared
    /// latency in `topo`, as routers treat it: the declared value is the propagation floor, so
    /// a measurement can only raise a link's weight. Used where one live state meets another
    /// topology (an apply's impact plan, the controller's published weights).
    pub fn floored(&self, topo: &Topology) -> LiveState {
        let mut out = self.clone();
        if out.link_latency.is_empty() {
            return out;
        }
        // One pass over the links (`Topology::link` scans them all: per measured weight, that
        // was measured weights x links, seconds on a large fabric).
        let declared: std::collections::HashMap<LinkId, Latency> =
            topo.links.iter().map(|l| (l.id(), l.latency)).collect();
        for (id, lat) in out.link_latency.iter_mut() {
            if let Some(l) = declared.get(id) {
                *lat = (*lat).max(*l);
            }
        }
        out
    }

    /// The same state with each reported capacity replaced by the one `topo` gives the site's
    /// service (a site reports the capacity it runs with: the topology's it has applied), as
    /// the sites will report once they run `topo`. Used where one live state meets another
    /// topology (an apply's impact plan): a capacity the change cuts (100 to 10, 50 streams
    /// open) makes the site full under it. A capacity not reported (0) stays so; a site's summed
    /// load is summed again from its services'.
    pub fn with_capacities_of(&self, topo: &Topology) -> LiveState {
        let mut out = self.clone();
        if out.site_load.is_empty() && out.service_load.is_empty() {
            return out;
        }
        // By id, not a scan of the nodes per site reported.
        let nodes: std::collections::HashMap<&NodeId, &crate::model::Node> =
            topo.nodes.iter().map(|n| (&n.id, n)).collect();
        let declared = |site: &NodeId, service: &ServiceName| {
            nodes.get(site).and_then(|n| {
                n.serves
                    .iter()
                    .find(|s| &s.service == service)
                    .map(|s| s.capacity)
            })
        };
        for (site, services) in out.service_load.iter_mut() {
            for (service, load) in services.iter_mut() {
                if load.capacity > 0
                    && let Some(c) = declared(site, service)
                {
                    load.capacity = c;
                }
            }
            if let Some(sum) = out.site_load.get_mut(site)
                && sum.capacity > 0
            {
                sum.capacity = services
                    .values()
                    .fold(0u32, |acc, l| acc.saturating_add(l.capacity));
            }
        }
        for (site, load) in out.site_load.iter_mut() {
            if load.capacity > 0
                && !out.service_load.contains_key(site)
                && let Some(n) = nodes.get(site)
            {
                load.capacity = n
                    .serves
                    .iter()
                    .fold(0u32, |acc, s| acc.saturating_add(s.capacity));
            }
        }
        out
    }

    /// The load that decides whether `site` may take a new stream of `service`, and its
    /// penalty: the service's own entry; the site's summed entry only for a site with no
    /// per-service entries at all (an older sender); else none (no telemetry yet: healthy and
    /// unloaded). A site that reports per service but not this one (it has not applied the
    /// version that gives it the service yet, or its entry was cut) has not reported it: its
    /// other services' sum does not speak for it.
    pub fn load_of(&self, site: &str, service: &str) -> Option<&SiteLoad> {
        match self.service_load.get(site) {
            Some(per_service) => per_service.get(service),
            None => self.site_load.get(site),
        }
    }
}

/// A site's reported load. A site with no entry in [`LiveState::site_load`] counts as healthy
/// and unloaded (no telemetry yet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteLoad {
    pub active_streams: u32,
    /// Concurrent streams the site accepts; 0 means "not reported": the service's declared
    /// capacity at that site is used instead.
    pub capacity: u32,
    pub healthy: bool,
}

/// Penalty per unit of the load curve (see [`SiteLoad::penalty`]).
pub const LOAD_PENALTY_SCALE: Latency = Latency::from_micros(10_000);
/// Upper bound of the load penalty.
pub const LOAD_PENALTY_MAX: Latency = Latency::from_micros(1_000_000);

impl SiteLoad {
    /// The cost added to a site's path latency for its load, or `None` when the site is not
    /// eligible: unhealthy, or at/over capacity.
    ///
    /// With utilisation `u = active / capacity`, the penalty is `0` for `u <= 0.5` and
    /// `LOAD_PENALTY_SCALE * (u - 0.5) / (1 - u)` above, capped at `LOAD_PENALTY_MAX`. This is the
    /// shape of an M/M/1 queue's expected wait (`u / (1 - u)`), shifted so that a half-loaded site
    /// costs nothing: 10 ms at 75 %, 40 ms at 90 %, 490 ms at 99 %. A nearby site therefore keeps
    /// its traffic until it is genuinely busy, then sheds it smoothly to the next one.
    /// `declared_capacity` is used when the report has `capacity == 0`.
    pub fn penalty(&self, declared_capacity: u32) -> Option<Latency> {
        if !self.healthy {
            return None;
        }
        let capacity = if self.capacity > 0 {
            self.capacity
        } else {
            declared_capacity
        };
        load_penalty(self.active_streams, capacity)
    }
}

/// The load curve of [`SiteLoad::penalty`], for a healthy site. `None` when `active >= capacity`
/// (a site with capacity 0 is always full).
pub fn load_penalty(active: u32, capacity: u32) -> Option<Latency> {
    if active >= capacity {
        return None;
    }
    let (a, c) = (u64::from(active), u64::from(capacity));
    if 2 * a <= c {
        return Some(Latency::ZERO);
    }
    // SCALE * (a/c - 1/2) / (1 - a/c) = SCALE * (2a - c) / (2 (c - a)); all in u64 ns, no overflow:
    // SCALE is 1e7 ns and 2a - c < 2^33.
    let ns = LOAD_PENALTY_SCALE.as_nanos().saturating_mul(2 * a - c) / (2 * (c - a));
    Some(Latency::from_nanos(ns.min(LOAD_PENALTY_MAX.as_nanos())))
}

/// One way to serve a service: a site and the path to it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub site: NodeId,
    /// `from..=site`; just `[from]` when the node is itself the site.
    pub path: Vec<NodeId>,
    /// Sum of the (measured or declared) one-way link latencies along the path.
    pub latency: Latency,
    /// The site's load penalty.
    pub penalty: Latency,
    /// `latency + penalty`: the ranking key (after `drained`).
    pub cost: Latency,
    /// The path crosses a drained node or link (or the site is drained): used only because no
    /// drain-free path to this site exists.
    pub drained: bool,
    /// The service's `weight` at this site: its share of new connections among the sites that
    /// are equally near ([`Spread`]).
    #[serde(default = "crate::model::default_weight")]
    pub weight: u32,
    /// The service's traffic dial at this site, in percent: the share of the new connections
    /// offered to it first that it takes ([`TryOrder::dialled`]). Left out of the serialised
    /// form at 100 (no dial), as in the model.
    #[serde(
        default = "crate::model::default_dial",
        skip_serializing_if = "crate::model::is_full_dial"
    )]
    pub dial: u8,
}

impl Candidate {
    /// The first hop after `from`, or `None` when `from` is the site.
    pub fn next_hop(&self) -> Option<&NodeId> {
        self.path.get(1)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("unknown node {node:?} (known: {})", list(node, known))]
    UnknownNode { node: String, known: Vec<String> },
    #[error("unknown service {service:?} (known: {})", list(service, known))]
    UnknownService { service: String, known: Vec<String> },
    #[error("unknown link {link:?} (known: {})", list(link, known))]
    UnknownLink { link: String, known: Vec<String> },
    #[error(
        "the graph does not belong to this topology ({graph_nodes} nodes and {graph_links} links \
         in the graph, {topology_nodes} and {topology_links} in the topology)"
    )]
    GraphMismatch {
        graph_nodes: usize,
        graph_links: usize,
        topology_nodes: usize,
        topology_links: usize,
    },
}

impl RouteError {
    /// `UnknownNode` for `id`, listing the graph's nodes.
    pub fn unknown_node(graph: &Graph, id: &str) -> Self {
        RouteError::UnknownNode {
            node: id.to_string(),
            known: graph.ids().iter().map(|i| i.to_string()).collect(),
        }
    }
    /// `UnknownService` for `name`, listing the graph's services.
    pub fn unknown_service(graph: &Graph, name: &str) -> Self {
        RouteError::UnknownService {
            service: name.to_string(),
            known: graph
                .services()
                .iter()
                .map(|s| s.name.to_string())
                .collect(),
        }
    }
    /// `UnknownLink` for `link` (as the user wrote it), listing the graph's links.
    pub fn unknown_link(graph: &Graph, link: &str) -> Self {
        RouteError::UnknownLink {
            link: link.to_string(),
            known: graph
                .link_ids()
                .into_iter()
                .map(|l| l.to_string())
                .collect(),
        }
    }
}

/// "a, b, c" for error messages. A long list is cut to the names most like `asked` (longest
/// common prefix, so `syd-edge-9` shows the `syd-` nodes), in sorted order, with a count.
fn list(asked: &str, items: &[String]) -> String {
    const SHOWN: usize = 20;
    if items.is_empty() {
        return "none".to_string();
    }
    let mut shown: Vec<&str> = items.iter().map(String::as_str).collect();
    if shown.len() > SHOWN {
        let common = |s: &str| {
            s.bytes()
                .zip(asked.bytes())
                .take_while(|(a, b)| a == b)
                .count()
        };
        shown.sort_by(|a, b| common(b).cmp(&common(a)).then(a.cmp(b)));
        shown.truncate(SHOWN);
    }
    shown.sort_unstable();
    let mut s = shown.join(", ");
    if items.len() > SHOWN {
        let _ = write!(s, ", ... and {} more", items.len() - SHOWN);
    }
    s
}

/// A node's ranked candidates for every service, from one shortest-path run.
///
/// Compact: service names are stored once (sorted, for a binary search), every candidate of
/// every service lives in one `Vec`, and each service owns a range of it.
///
/// ```
/// use topology::builder::{TopologyBuilder, ms};
/// use topology::{Graph, LiveState, NodeId, NodeKind, RoutingTable};
///
/// let topo = TopologyBuilder::new()
///     .node("syd-edge-1", NodeKind::Edge)
///     .node("syd-site-1", NodeKind::Site)
///     .node("mel-site-1", NodeKind::Site)
///     .link("syd-edge-1", "syd-site-1", ms(0.8))
///     .link("syd-edge-1", "mel-site-1", ms(6.5))
///     .service("llm-chat")
///     .serve("syd-site-1", "llm-chat", 512)
///     .serve("mel-site-1", "llm-chat", 256)
///     .build();
/// let graph = Graph::new(&topo); // once per topology version
/// let mut live = LiveState::default();
/// let edge = NodeId::new("syd-edge-1");
/// let table = RoutingTable::build(&topo, &graph, &edge, &live).unwrap();
/// assert_eq!(table.best("llm-chat").unwrap().site.as_str(), "syd-site-1");
///
/// // Sydney fails: rebuild from the new live state; connections just read the new table.
/// live.down_nodes.insert(NodeId::new("syd-site-1"));
/// let table = RoutingTable::build(&topo, &graph, &edge, &live).unwrap();
/// let c = &table.candidates("llm-chat")[0];
/// assert_eq!((c.site.as_str(), c.cost), ("mel-site-1", ms(6.5)));
/// assert_eq!(c.next_hop().map(|n| n.as_str()), Some("mel-site-1"));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingTable {
    from: NodeId,
    /// Sorted by name; `(name, start, end)` into `candidates`.
    services: Vec<(ServiceName, u32, u32)>,
    candidates: Vec<Candidate>,
}

/// The search key packs the lexicographic cost `(drained elements, latency ns)` into one `u64`
/// (one compare per heap step): the drained count in the top 8 bits, saturating at 255, the
/// latency in the low 56 bits, saturating at 2^56 ns (2.3 years). `u64::MAX` means unreached.
const LATENCY_BITS: u32 = 56;
const LATENCY_MASK: u64 = (1 << LATENCY_BITS) - 1;
const UNREACHED: u64 = u64::MAX;

/// The most nodes a path may name, its origin and its site included: a stream's header names
/// the hops after the first, at most 16 (the router's `header::MAX_HOPS`). A site whose best
/// path is longer takes its best path that fits (a hop-bounded search), and is no candidate when none
/// does, as if unreachable; a reserved path longer is refused.
/// Bounding the path also bounds a table's size: at most this many names per candidate,
/// whatever the depth of the graph.
pub const MAX_PATH_NODES: usize = 18;
const NO_PREV: u32 = u32::MAX;

fn key_add(key: u64, drained: u8, weight_ns: u64) -> u64 {
    let d = ((key >> LATENCY_BITS) + u64::from(drained)).min(255);
    let l = (key & LATENCY_MASK)
        .saturating_add(weight_ns)
        .min(LATENCY_MASK);
    (d << LATENCY_BITS) | l
}

impl RoutingTable {
    /// Builds `from`'s table. `graph` must be `Graph::new(topo)`. If `from` is itself down,
    /// every service has no candidates.
    pub fn build(
        topo: &Topology,
        graph: &Graph,
        from: &NodeId,
        live: &LiveState,
    ) -> Result<RoutingTable, RouteError> {
        if graph.link_count() != topo.links.len() || graph.node_count() > topo.nodes.len() {
            return Err(RouteError::GraphMismatch {
                graph_nodes: graph.node_count(),
                graph_links: graph.link_count(),
                topology_nodes: topo.nodes.len(),
                topology_links: topo.links.len(),
            });
        }
        let Some(origin) = graph.index(from.as_str()) else {
            return Err(RouteError::unknown_node(graph, from.as_str()));
        };
        let n = graph.node_count();
        let m = graph.link_count();

        let mut node_blocked: Vec<bool> = (0..n as u32)
            .map(|i| graph.node_state(i) == AdminState::Down)
            .collect();
        for id in &live.down_nodes {
            if let Some(i) = graph.index(id.as_str()) {
                node_blocked[i as usize] = true;
            }
        }
        let mut link_blocked: Vec<bool> = (0..m as u32)
            .map(|l| graph.link_state(l) == AdminState::Down)
            .collect();
        for id in &live.down_links {
            if let Some(l) = graph.link_index(id) {
                link_blocked[l as usize] = true;
            }
        }
        let overrides: Option<Vec<u64>> = (!live.link_latency.is_empty()).then(|| {
            let mut w: Vec<u64> = (0..m as u32).map(|l| graph.link_latency_ns(l)).collect();
            for (id, lat) in &live.link_latency {
                if let Some(l) = graph.link_index(id) {
                    w[l as usize] = weight_ns(*lat);
                }
            }
            w
        });

        let open = Open {
            node_blocked: &node_blocked,
            link_blocked: &link_blocked,
            overrides: overrides.as_deref(),
        };
        // Dijkstra over (drained count, latency ns), lexicographic, packed (see `key_add`).
        // No decrease-key: stale heap entries are skipped when popped.
        let mut dist = vec![UNREACHED; n];
        let mut prev = vec![NO_PREV; n];
        // Links on each node's chosen path (saturating: only `<= MAX_PATH_NODES` matters).
        let mut links = vec![0u16; n];
        let mut heap = BinaryHeap::with_capacity(n);
        if !node_blocked[origin as usize] {
            dist[origin as usize] = 0;
            heap.push(Reverse((0u64, origin)));
        }
        while let Some(Reverse((key, u))) = heap.pop() {
            if key > dist[u as usize] {
                continue;
            }
            for (to, cand) in open.steps(graph, origin, u, key) {
                let v = to as usize;
                if cand < dist[v] {
                    dist[v] = cand;
                    prev[v] = u;
                    links[v] = links[u as usize].saturating_add(1);
                    heap.push(Reverse((cand, to)));
                } else if cand == dist[v]
                    && (links[u as usize].saturating_add(1), u) < (links[v], prev[v])
                {
                    // Weights are >= 1 ns, so every equal-cost predecessor is settled before
                    // `v` is (its links final), and this rule cannot create a cycle.
                    prev[v] = u;
                    links[v] = links[u as usize].saturating_add(1);
                }
            }
        }

        // A site whose best path names more nodes than a stream's header can carry takes its
        // best path within that bound (searched only when some site needs it): a path through
        // a drained element rather than none (the search ranks drained elements first, so a
        // long drain-free detour hid a short drained path), and a slower path that fits rather
        // than none.
        let too_long = graph.services().iter().flat_map(|s| &s.sites).any(|site| {
            dist[site.node as usize] != UNREACHED
                && usize::from(links[site.node as usize]) >= MAX_PATH_NODES
        });
        let bounded = too_long.then(|| Bounded::search(graph, origin, &open));

        let mut services = Vec::with_capacity(graph.services().len());
        let mut candidates = Vec::new();
        for svc in graph.services() {
            let start = candidates.len();
            for site in &svc.sites {
                let mut key = dist[site.node as usize];
                if key == UNREACHED {
                    continue;
                }
                let mut path = None;
                if usize::from(links[site.node as usize]) >= MAX_PATH_NODES {
                    match bounded
                        .as_ref()
                        .and_then(|b| b.best(graph, origin, site.node))
                    {
                        Some((k, p)) => {
                            key = k;
                            path = Some(p);
                        }
                        None => continue,
                    }
                }
                let (drained, latency_ns) = (key >> LATENCY_BITS, key & LATENCY_MASK);
                let id = graph.id(site.node);
                let penalty = match live.load_of(id.as_str(), svc.name.as_str()) {
                    None => Latency::ZERO,
                    Some(load) => match load.penalty(site.capacity) {
                        Some(p) => p,
                        None => continue,
                    },
                };
                let latency = Latency::from_nanos(latency_ns);
                candidates.push(Candidate {
                    site: id.clone(),
                    path: path.unwrap_or_else(|| path_to(graph, &prev, origin, site.node)),
                    latency,
                    penalty,
                    cost: latency.saturating_add(penalty),
                    drained: drained > 0,
                    weight: site.weight,
                    dial: site.dial,
                });
            }
            candidates[start..].sort_by(|a, b| {
                (a.drained, a.cost, &a.site, &a.path).cmp(&(b.drained, b.cost, &b.site, &b.path))
            });
            services.push((svc.name.clone(), start as u32, candidates.len() as u32));
        }
        Ok(RoutingTable {
            from: from.clone(),
            services,
            candidates,
        })
    }

    /// The ranked candidates for `service`, best first; empty for an unknown service or when no
    /// site is eligible. Hot path: a binary search over the service names, no allocation.
    pub fn candidates(&self, service: &str) -> &[Candidate] {
        match self
            .services
            .binary_search_by(|(name, _, _)| name.as_str().cmp(service))
        {
            Ok(i) => {
                let (_, start, end) = &self.services[i];
                &self.candidates[*start as usize..*end as usize]
            }
            Err(_) => &[],
        }
    }

    /// The best candidate for `service`, if any.
    pub fn best(&self, service: &str) -> Option<&Candidate> {
        self.candidates(service).first()
    }

    /// The node this table routes from.
    pub fn from(&self) -> &NodeId {
        &self.from
    }

    /// Every service of the topology (sorted by name) with its candidates.
    pub fn services(&self) -> impl Iterator<Item = (&ServiceName, &[Candidate])> + '_ {
        self.services
            .iter()
            .map(|(name, s, e)| (name, &self.candidates[*s as usize..*e as usize]))
    }
}

/// The candidate for `service` along the fixed `path` (a circuit's reserved path: its edge
/// first, its site last), when every part of it can carry a stream now: each node known, not
/// down (declared or in `live`) and on it once, each node between the ends a transit, a link between each
/// pair and none down, and the site one that may serve `service` (residency included) and not
/// full, and the path at most [`MAX_PATH_NODES`] long. Its latency and penalty are reckoned as [`RoutingTable::build`] does (measured
/// latencies in `live` replace declared ones); `drained` when it crosses a drained link or node.
/// `None` when any part cannot: a reserved path is taken as it is or not at all.
pub fn on_path(
    graph: &Graph,
    live: &LiveState,
    service: &str,
    path: &[NodeId],
) -> Option<Candidate> {
    if path.len() < 2 || path.len() > MAX_PATH_NODES {
        return None;
    }
    let svc = graph.service(service)?;
    let nodes: Vec<u32> = path
        .iter()
        .map(|id| graph.index(id.as_str()))
        .collect::<Option<_>>()?;
    let last = nodes.len() - 1;
    for (k, &i) in nodes.iter().enumerate() {
        if graph.node_state(i) == AdminState::Down || live.down_nodes.contains(graph.id(i)) {
            return None;
        }
        // A node twice: the stream would loop through it (and its latency count twice).
        if nodes[..k].contains(&i) {
            return None;
        }
        if k > 0 && k < last && graph.node_kind(i) != NodeKind::Transit {
            return None;
        }
    }
    let site = svc.sites.iter().find(|s| s.node == nodes[last])?;
    let mut latency_ns = 0u64;
    let mut drained = false;
    for pair in nodes.windows(2) {
        let (u, v) = (pair[0], pair[1]);
        // By the link's id, not a scan of `u`'s neighbours: a hub may have thousands.
        let id = LinkId::new(graph.id(u), graph.id(v));
        let l = graph.link_index(&id)?;
        if graph.link_state(l) == AdminState::Down || live.down_links.contains(&id) {
            return None;
        }
        let w = live
            .link_latency
            .get(&id)
            .map_or(graph.link_latency_ns(l), |l| weight_ns(*l));
        latency_ns = latency_ns.saturating_add(w);
        drained |= graph.drain_entering(l, v) > 0;
    }
    let site_id = graph.id(site.node);
    let penalty = match live.load_of(site_id.as_str(), service) {
        None => Latency::ZERO,
        Some(load) => load.penalty(site.capacity)?,
    };
    let latency = Latency::from_nanos(latency_ns.min(LATENCY_MASK));
    Some(Candidate {
        site: site_id.clone(),
        path: path.to_vec(),
        latency,
        penalty,
        cost: latency.saturating_add(penalty),
        drained,
        weight: site.weight,
        dial: site.dial,
    })
}

/// What a table's searches may cross (the live state's down nodes and links among them) and
/// the link weights in force (the live state's measured ones, where it has them).
struct Open<'a> {
    node_blocked: &'a [bool],
    link_blocked: &'a [bool],
    overrides: Option<&'a [u64]>,
}

impl Open<'_> {
    /// One step from `u`, reached with `key`: each node its open links lead to, with the key
    /// of the path through `u`. None unless `u` relays: only the origin and transits do (an
    /// edge or a site is an end of a path, never a hop in its middle, as for circuits).
    fn steps<'g>(
        &'g self,
        graph: &'g Graph,
        origin: u32,
        u: u32,
        key: u64,
    ) -> impl Iterator<Item = (u32, u64)> + 'g {
        let relays = u == origin || graph.node_kind(u) == NodeKind::Transit;
        let (links, drains) = if relays {
            (graph.neighbours(u), graph.neighbour_drain(u))
        } else {
            (&[][..], &[][..])
        };
        links
            .iter()
            .zip(drains)
            .filter(|(e, _)| {
                !self.link_blocked[e.link as usize] && !self.node_blocked[e.to as usize]
            })
            .map(move |(e, &drained)| {
                let w = self.overrides.map_or(e.latency_ns, |o| o[e.link as usize]);
                (e.to, key_add(key, drained, w))
            })
    }
}

/// The best paths of at most [`MAX_PATH_NODES`] nodes from one origin, by the table's key
/// (drained elements, then latency): a Bellman-Ford of `MAX_PATH_NODES - 1` rounds, round `k`
/// the best over paths of at most `k` links, each round relaxing from the round before only
/// (so that a path never has more links than its round). O(`MAX_PATH_NODES` x links) time and
/// `MAX_PATH_NODES` x nodes predecessors: run only when some site's best path is longer.
struct Bounded {
    /// The best key over paths of at most `MAX_PATH_NODES - 1` links.
    keys: Vec<u64>,
    /// Per round, the predecessor of each node improved in that round (`NO_PREV`: carried
    /// from the round before).
    prevs: Vec<Vec<u32>>,
}

impl Bounded {
    fn search(graph: &Graph, origin: u32, open: &Open<'_>) -> Bounded {
        let n = graph.node_count();
        let mut cur = vec![UNREACHED; n];
        if !open.node_blocked[origin as usize] {
            cur[origin as usize] = 0;
        }
        let mut prevs = vec![vec![NO_PREV; n]];
        for _ in 1..MAX_PATH_NODES {
            let mut next = cur.clone();
            let mut prev = vec![NO_PREV; n];
            for u in 0..n as u32 {
                let key = cur[u as usize];
                if key == UNREACHED {
                    continue;
                }
                for (to, cand) in open.steps(graph, origin, u, key) {
                    let v = to as usize;
                    if cand < next[v] {
                        next[v] = cand;
                        prev[v] = u;
                    }
                }
            }
            prevs.push(prev);
            cur = next;
        }
        Bounded { keys: cur, prevs }
    }

    /// `site`'s best key within the bound and its path, if it has one.
    fn best(&self, graph: &Graph, origin: u32, site: u32) -> Option<(u64, Vec<NodeId>)> {
        let key = self.keys[site as usize];
        if key == UNREACHED {
            return None;
        }
        let mut rev = vec![site];
        let (mut at, mut round) = (site, self.prevs.len() - 1);
        while at != origin {
            let p = self.prevs[round][at as usize];
            if p != NO_PREV {
                rev.push(p);
                at = p;
            }
            // Carried or improved, the path to `at` so far is one of the round before.
            round = round.checked_sub(1)?;
        }
        Some((
            key,
            rev.iter().rev().map(|&i| graph.id(i).clone()).collect(),
        ))
    }
}

/// The path from `origin` to `site` along `prev`. A path has at most one step per node: should
/// `prev` ever hold a cycle, the walk stops there (a short path, never a hang).
fn path_to(graph: &Graph, prev: &[u32], origin: u32, site: u32) -> Vec<NodeId> {
    let mut rev = vec![site];
    let mut at = site;
    while at != origin && rev.len() <= graph.node_count() {
        at = prev[at as usize];
        if at == NO_PREV {
            // Unreachable for a settled node; an empty-ended path is better than a hang.
            break;
        }
        rev.push(at);
    }
    rev.iter().rev().map(|&i| graph.id(i).clone()).collect()
}

/// Convenience for one-off questions (the CLI, tests): builds the graph and `from`'s table and
/// returns the candidates for `service`, best first. Routers keep a [`RoutingTable`] instead.
pub fn route(
    topo: &Topology,
    from: &NodeId,
    service: &str,
    live: &LiveState,
) -> Result<Vec<Candidate>, RouteError> {
    let graph = Graph::new(topo);
    if graph.service(service).is_none() {
        return Err(RouteError::unknown_service(&graph, service));
    }
    let table = RoutingTable::build(topo, &graph, from, live)?;
    Ok(table.candidates(service).to_vec())
}

/// Anti-flap rule for changing an established preference (Tailscale's DERP home rule): switch
/// only if the challenger is better by at least `absolute` **and** costs less than `relative`
/// times the incumbent. Defaults: 10 ms and 2/3.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hysteresis {
    pub absolute: Latency,
    pub relative: f64,
}

impl Default for Hysteresis {
    fn default() -> Self {
        Hysteresis {
            absolute: Latency::from_micros(10_000),
            relative: 2.0 / 3.0,
        }
    }
}

impl Hysteresis {
    /// Whether to move from the incumbent to the challenger. Only for a live incumbent: when the
    /// incumbent is no longer a candidate at all, the caller switches regardless.
    pub fn should_switch(&self, incumbent_cost: Latency, challenger_cost: Latency) -> bool {
        let (inc, ch) = (incumbent_cost.as_nanos(), challenger_cost.as_nanos());
        ch.saturating_add(self.absolute.as_nanos()) <= inc
            && (ch as f64) < self.relative * inc as f64
    }

    /// Picks from ranked `candidates`, keeping `incumbent` (a site id) while it is still a
    /// candidate and the best one does not beat it by the margins. A drained incumbent yields
    /// to any drain-free best.
    pub fn select<'a>(
        &self,
        incumbent: Option<&NodeId>,
        candidates: &'a [Candidate],
    ) -> Option<&'a Candidate> {
        let best = candidates.first()?;
        let Some(current) = incumbent.and_then(|id| candidates.iter().find(|c| &c.site == id))
        else {
            return Some(best);
        };
        if current.drained && !best.drained {
            return Some(best);
        }
        if self.should_switch(current.cost, best.cost) {
            Some(best)
        } else {
            Some(current)
        }
    }

    /// [`Hysteresis::select`] for a choice made again: `was_candidate` tells whether a site has
    /// been on offer long enough for its cost to count (a router: for its settling time; the
    /// apply plan: among the old topology's candidates). The margins keep the incumbent against
    /// noise in the measured costs of sites that were both on offer; a best candidate whose
    /// site was not (it has just come up, been added, or come back within reach) is taken at
    /// once, as if there were no incumbent. Without this, whichever site came up first kept the service
    /// against a nearer one that came up a moment later (8 ms against 2 ms, say: within the
    /// margins), for as long as both stayed up.
    pub fn select_since<'a>(
        &self,
        incumbent: Option<&NodeId>,
        candidates: &'a [Candidate],
        was_candidate: impl Fn(&NodeId) -> bool,
    ) -> Option<&'a Candidate> {
        let best = candidates.first()?;
        if was_candidate(&best.site) {
            self.select(incumbent, candidates)
        } else {
            Some(best)
        }
    }
}

/// How much more than the nearest site (the cheapest candidate of the preferred site's drain
/// class) another site may cost and still share new connections ([`Spread`]). Differences this small are measurement noise on a wide-area path
/// (the controller publishes a measured link weight only when it is 2 ms above the declared
/// one, for the same reason), so such sites count as equally near.
pub const SPREAD_WITHIN: Latency = Latency::from_micros(2_000);

/// A member of a [`Spread`] group stays in it until it costs more than this above the nearest
/// site ([`Spread::sticky`]); a site joins only within [`SPREAD_WITHIN`]. The band between is the
/// group's anti-flap: a site whose measured cost hovers around the join threshold (RTT noise on
/// a busy host, a path whose jitter is a millisecond or two) does not move in and out of the
/// group with each table rebuild, and the split of new connections does not wander with it.
pub const SPREAD_LEAVE: Latency = Latency::from_micros(4_000);

/// One site's expected share of an edge's first tries for a service: dealt by weight among the
/// equally near sites ([`Spread`]), then moved by traffic dials ([`TryOrder::dialled`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Share {
    pub site: NodeId,
    /// In `[0, 1]`: 0 only for a member of the group that its dial keeps from taking any.
    pub share: f64,
}

/// `ranked` as an edge holds it: the site hysteresis keeps (`preferred`) first, the others in
/// rank order. Unchanged when `preferred` is not among them.
pub fn preferred_first(mut ranked: Vec<Candidate>, preferred: &NodeId) -> Vec<Candidate> {
    if let Some(pos) = ranked.iter().position(|c| &c.site == preferred) {
        let c = ranked.remove(pos);
        ranked.insert(0, c);
    }
    ranked
}

/// The affinity key of a client address: the same for an IPv4 address and its IPv4-mapped IPv6
/// form, and the same on every edge and across restarts.
pub fn client_key(ip: std::net::IpAddr) -> u64 {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => mix(u64::from(u32::from(v4))),
        std::net::IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            mix((bits >> 64) as u64 ^ mix(bits as u64))
        }
    }
}

/// FNV-1a over `bytes`, then [`mix`]ed: stable across processes and Rust versions (unlike
/// `std`'s `DefaultHasher`), which affinity needs so that every edge and every restart agrees.
fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// The splitmix64 finaliser: every input bit affects every output bit.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// 2^64 / φ: consecutive multiples of it, taken mod 2^64, are the Weyl sequence `{n φ}`, which
/// fills `[0, 1)` more evenly than random draws do.
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Weighted spreading of new connections over the sites that are equally near.
///
/// The group is the first candidate (the preferred site, after [`Hysteresis`]) and the
/// candidates ranked right after it that are in the same drain class and cost at most
/// [`SPREAD_WITHIN`] more than the cheapest of that class (the preferred site itself, unless
/// hysteresis keeps it though it costs more); a router that had a site in its last group keeps
/// it until it costs more than [`SPREAD_LEAVE`] above ([`Spread::sticky`]). Each member takes new connections in proportion to its
/// [`Candidate::weight`]; a site outside the group takes none while the group can serve. Open
/// connections never move.
///
/// Connections are dealt by ticket: [`Spread::pick`] maps ticket `n` to the member whose slice
/// of the total weight holds `{n φ}` (a Weyl sequence). Any run of consecutive tickets gives
/// each member its share to within a few connections (tested below), with no state beyond one
/// counter per service and no lock.
///
/// ```
/// use topology::route::{Candidate, Spread};
/// use topology::{Latency, NodeId};
///
/// let cand = |site: &str, ms: u64, weight: u32| Candidate {
///     site: NodeId::new(site),
///     path: vec![NodeId::new("edge"), NodeId::new(site)],
///     latency: Latency::from_micros(ms * 1000),
///     penalty: Latency::ZERO,
///     cost: Latency::from_micros(ms * 1000),
///     drained: false,
///     weight,
///     dial: 100,
/// };
/// // Two Sydney sites 1 ms apart share 3:1; Melbourne (12 ms) is the failover only.
/// let ranked = [cand("syd-1", 1, 300), cand("syd-2", 2, 100), cand("mel-1", 12, 100)];
/// let spread = Spread::new(&ranked);
/// assert_eq!(spread.members(), 2);
/// assert_eq!((spread.share(0), spread.share(1), spread.share(2)), (0.75, 0.25, 0.0));
/// let to_syd_1 = (0..1000).filter(|&t| spread.pick(t) == 0).count();
/// assert!((745..=755).contains(&to_syd_1));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spread {
    /// Running sums of the members' weights (members are a prefix of the candidates); the last
    /// is the total. Empty when there is no candidate.
    cumulative: Vec<u64>,
    /// Each member's site id, hashed ([`stable_hash`]), for [`Spread::pick_affine`].
    sites: Vec<u64>,
}

impl Spread {
    /// The group of ranked `candidates` (preferred first) that share new connections, with no
    /// earlier group to stick to (a first table, or a one-off question).
    pub fn new(candidates: &[Candidate]) -> Spread {
        Spread::sticky(candidates, |_| false)
    }

    /// The group of ranked `candidates` (preferred first) when `was_member` names the sites of
    /// the previous group: such a site stays while it costs at most [`SPREAD_LEAVE`] more than
    /// the cheapest candidate of the first one's drain class, any other joins only within
    /// [`SPREAD_WITHIN`]; the first candidate is always in it. The group stays a prefix of the
    /// ranked list: it ends at the first candidate that does not qualify.
    ///
    /// The bands are measured from the cheapest, not from the first: a preferred site that
    /// hysteresis keeps though its load penalty made it dearer would otherwise carry the band
    /// up with it, and a busy Sydney site at 4.7 ms would share with Melbourne at 6.5 ms while
    /// the other Sydney site, at 1.5 ms, sat idle.
    pub fn sticky(candidates: &[Candidate], was_member: impl Fn(&NodeId) -> bool) -> Spread {
        let Some(first) = candidates.first() else {
            return Spread::default();
        };
        let nearest = candidates
            .iter()
            .filter(|c| c.drained == first.drained)
            .map(|c| c.cost)
            .min()
            .unwrap_or(first.cost);
        let qualifies = |c: &Candidate| {
            let within = if was_member(&c.site) {
                SPREAD_LEAVE
            } else {
                SPREAD_WITHIN
            };
            c.drained == first.drained && c.cost <= nearest.saturating_add(within)
        };
        let members =
            std::iter::once(first).chain(candidates[1..].iter().take_while(|c| qualifies(c)));
        let mut spread = Spread::default();
        let mut total = 0u64;
        for c in members {
            // Validation keeps weights at 1 or more; a 0 from elsewhere still takes a turn
            // rather than making the total 0.
            total += u64::from(c.weight.max(1));
            spread.cumulative.push(total);
            spread.sites.push(stable_hash(c.site.as_str().as_bytes()));
        }
        spread
    }

    /// How many leading candidates share new connections (0 only without candidates).
    pub fn members(&self) -> usize {
        self.cumulative.len()
    }

    /// The share of new connections candidate `i` takes: in `[0, 1]`, 0 outside the group.
    pub fn share(&self, i: usize) -> f64 {
        let (Some(&total), Some(&upto)) = (self.cumulative.last(), self.cumulative.get(i)) else {
            return 0.0;
        };
        let before = if i == 0 { 0 } else { self.cumulative[i - 1] };
        (upto - before) as f64 / total as f64
    }

    /// Each member of the group (a prefix of `candidates`, the list this was built from) and
    /// each other candidate that dials send connections to, with its expected share of first
    /// tries ([`Spread::expected`]); empty when one site takes every new connection.
    ///
    /// Without dials this is the group with its weight shares.
    pub fn shares(&self, candidates: &[Candidate]) -> Vec<Share> {
        let shares: Vec<Share> = self
            .first_tries(candidates)
            .map(|(c, share)| Share {
                site: c.site.clone(),
                share,
            })
            .collect();
        if shares.len() < 2 { Vec::new() } else { shares }
    }

    /// Each member of the group and each other candidate that dials send connections to, with
    /// its expected share of first tries ([`Spread::expected`]), in rank order.
    pub fn first_tries<'a>(
        &self,
        candidates: &'a [Candidate],
    ) -> impl Iterator<Item = (&'a Candidate, f64)> + use<'a> {
        let members = self.members();
        candidates
            .iter()
            .zip(self.expected(candidates))
            .enumerate()
            .filter(move |&(i, (_, share))| i < members || share > 0.0)
            .map(|(_, pair)| pair)
    }

    /// The expected share of first tries of each of `candidates` (the list this was built
    /// from), by index: the sum, over the members the spread may deal a connection to, of that
    /// member's share times the chance that the dial walk from it ([`TryOrder::dialled`]) starts
    /// on the candidate. Each dial is taken as an independent chance of `dial / 100`, as the
    /// walk's per-site sequences (or, with affinity, per-site hashes) make it over many
    /// connections. Sums to 1 when there is a candidate; without dials it is [`Spread::share`].
    pub fn expected(&self, candidates: &[Candidate]) -> Vec<f64> {
        let n = candidates.len();
        let mut out = vec![0.0; n];
        // A group of one (or none built: then the first candidate) takes every turn.
        let dealers = if n == 0 {
            0
        } else {
            self.members().clamp(1, n)
        };
        for dealt in 0..dealers {
            let base = TryOrder::new(n, dealt);
            let mut rest = if self.members() > 1 {
                self.share(dealt)
            } else {
                1.0
            };
            for i in base.iter() {
                let take = rest * dial_fraction(walk_dial(candidates, i));
                out[i] += take;
                rest -= take;
            }
            // Every site declined: the order is unchanged, and its first site is tried first.
            out[base.first()] += rest;
        }
        out
    }

    /// The member that the client with `key` ([`client_key`]) starts on: weighted rendezvous
    /// hashing. Each member scores `weight / -ln(u)`, with `u` in (0, 1) a hash of the key and the
    /// member's site id, and the highest score wins; a member wins for a share of keys equal to
    /// its share of the weight. The score of a (client, site) pair does not depend on the other
    /// members, so when a site leaves only its clients move, and a site that joins takes clients
    /// only from the others, in proportion.
    pub fn pick_affine(&self, key: u64) -> usize {
        if self.cumulative.len() < 2 {
            return 0;
        }
        let mut best = (0, f64::NEG_INFINITY);
        let mut before = 0;
        for (i, (&upto, &site)) in self.cumulative.iter().zip(&self.sites).enumerate() {
            let weight = (upto - before) as f64;
            before = upto;
            let score = weight / -unit_open(mix(key ^ site)).ln();
            if score > best.1 {
                best = (i, score);
            }
        }
        best.0
    }

    /// The candidate (an index into the ranked list) that the connection with `ticket` tries
    /// first.
    pub fn pick(&self, ticket: u64) -> usize {
        match self.cumulative.as_slice() {
            [] | [_] => 0,
            [.., total] => {
                let point = ((u128::from(ticket.wrapping_mul(GOLDEN_GAMMA)) * u128::from(*total))
                    >> 64) as u64;
                self.cumulative.partition_point(|&c| c <= point)
            }
        }
    }
}

/// A hash as a number in (0, 1), never 0 or 1: its top 52 bits, centred in their interval
/// (every such value is exact in an `f64`). With 53 bits the top one, `2^53 - 0.5`, rounded to
/// `2^53`, so a hash of all ones gave 1, and rendezvous hashing a score of minus infinity for
/// the member that should have won (a client can pick its address to get it).
fn unit_open(hash: u64) -> f64 {
    ((hash >> 12) as f64 + 0.5) / (1u64 << 52) as f64
}

/// The dial candidate `i` of the ranked `candidates` walks with ([`TryOrder::dialled`]): its
/// own, or 0 (it declines every connection) when it is drained and a candidate is not (the
/// first: drain-free candidates rank first). A drained site is used only when no drain-free
/// site can serve, dial or not: its dial took the first tries that the drain-free sites' dials
/// declined, ahead of those sites.
pub fn walk_dial(candidates: &[Candidate], i: usize) -> u8 {
    let c = &candidates[i];
    if c.drained && !candidates[0].drained {
        0
    } else {
        c.dial
    }
}

/// `dial` as a chance in `[0, 1]`.
fn dial_fraction(dial: u8) -> f64 {
    f64::from(dial.min(FULL_DIAL)) / f64::from(FULL_DIAL)
}

/// Whether a site with `dial` (percent) takes the connection offered to it as its `turn`-th
/// (counting from 0, per service and site). Turn `t` is taken when `(t mod 100) · dial mod 100 <
/// dial`: a Beatty sequence, so turn 0 is taken (a canary gets its first connection at once) and
/// the turns taken in any run of consecutive turns number `run · dial / 100` rounded up or down,
/// never further off (the count of turns `0..t`, for `t` from 1 to 100, is
/// `⌊(t - 1) · dial / 100⌋ + 1`). 0 never takes one, 100
/// (or more) always does. The counter wraps after 2^64 turns with one uneven run.
pub fn dial_takes_turn(dial: u8, turn: u64) -> bool {
    match u64::from(dial) {
        0 => false,
        d if d >= u64::from(FULL_DIAL) => true,
        d => (turn % 100) * d % 100 < d,
    }
}

/// The per-site key of [`dial_takes_client`]: the site id's stable hash, salted so that it is
/// independent of the hash that rendezvous hashing ([`Spread::pick_affine`]) scores the site by.
pub fn dial_site_key(site: &NodeId) -> u64 {
    mix(stable_hash(site.as_str().as_bytes()) ^ 0x6469_616c_6469_616c) // "dialdial"
}

/// With `affinity: source_ip`: whether a site with `dial` (percent) and key `site`
/// ([`dial_site_key`]) takes the connections of the client with `key` ([`client_key`]). The
/// same client gets the same answer from the same site on every edge and after restarts, and
/// `dial` percent of clients get a yes. Raising a dial only adds clients, lowering it only
/// removes some: each client has a fixed threshold per site.
pub fn dial_takes_client(dial: u8, key: u64, site: u64) -> bool {
    match dial {
        0 => false,
        d if d >= FULL_DIAL => true,
        d => (u128::from(mix(key ^ site)) * u128::from(FULL_DIAL)) >> 64 < u128::from(d),
    }
}

/// The order in which one new connection tries the candidates of its service (indices into the
/// ranked list), built without allocating.
///
/// The base order is the site the spread dealt (or a circuit's reserved path) first, then the
/// other candidates in rank order (the failover order). The dial walk ([`TryOrder::dialled`])
/// then asks each site in that order, until one says yes, whether it takes the connection as
/// its first try; a site that declines moves to the end of the order, and the declined sites
/// keep their relative order. Since every site before the first that accepts declined, the
/// result is the base order rotated to start at that site, which is all this stores.
///
/// ```
/// use topology::route::TryOrder;
///
/// // Dealt to candidate 2 of 4: 2, 0, 1, 3. Site 2 declines, site 0 accepts.
/// let base = TryOrder::new(4, 2);
/// assert_eq!(base.iter().collect::<Vec<_>>(), [2, 0, 1, 3]);
/// let walked = base.dialled(|i| i != 2);
/// assert_eq!(walked.iter().collect::<Vec<_>>(), [0, 1, 3, 2]);
/// // Every site declines: the base order stands (a dial never refuses a connection).
/// assert_eq!(base.dialled(|_| false), base);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TryOrder {
    len: usize,
    /// The candidate the base order starts with.
    dealt: usize,
    /// The position in the base order the walk starts the tries at.
    start: usize,
}

impl TryOrder {
    /// `dealt`, then the other `len - 1` candidates in rank order. A `dealt` out of range is
    /// rank order.
    pub fn new(len: usize, dealt: usize) -> TryOrder {
        TryOrder {
            len,
            dealt: if dealt < len { dealt } else { 0 },
            start: 0,
        }
    }

    /// The candidate at `pos` of the base order.
    fn at(&self, pos: usize) -> usize {
        match pos {
            0 => self.dealt,
            p if p <= self.dealt => p - 1,
            p => p,
        }
    }

    /// The dial walk: `takes(i)` is asked for candidate `i`, in the base order, until it says
    /// yes (at most once per candidate); the tries start there, and the sites that declined
    /// follow the others. When no site takes it, the base order stands.
    pub fn dialled(self, mut takes: impl FnMut(usize) -> bool) -> TryOrder {
        let start = (0..self.len).find(|&pos| takes(self.at(pos))).unwrap_or(0);
        TryOrder { start, ..self }
    }

    /// The candidate tried first (0 when there is none).
    pub fn first(&self) -> usize {
        if self.len == 0 {
            0
        } else {
            self.at(self.start)
        }
    }

    /// Every candidate, in the order tried.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        self.tries(usize::MAX)
    }

    /// The candidates a connection tries when it may try at most `budget` sites before giving
    /// up: up to `budget` from the start of the order, then every site that declined. Without
    /// the declined sites (the first of the base order, up to the one that accepted) counted
    /// against the budget, every site that the base order would have tried is still tried: a
    /// dial adds tries, it never leaves a connection without one it would have had. Without a
    /// dial that declined, exactly the first `budget`.
    pub fn tries(self, budget: usize) -> impl Iterator<Item = usize> {
        self.tries_past(budget, |_| false)
    }

    /// [`TryOrder::tries`] past the candidates already `tried`: up to `budget` of the others
    /// from the start of the order, then every other site that declined. (An edge going on in
    /// a newer table after a try failed on its own first hop.)
    pub fn tries_past(
        self,
        budget: usize,
        tried: impl Fn(usize) -> bool + Copy,
    ) -> impl Iterator<Item = usize> {
        let at = move |pos| self.at(pos);
        let untried = move |i: &usize| !tried(*i);
        (self.start..self.len)
            .map(at)
            .filter(untried)
            .take(budget)
            .chain((0..self.start).map(at).filter(untried))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A latency too large for any link (from the wire: the controller's snapshot or live state
    /// reads any value up to `u64::MAX` ns) leaves every path ending at its origin: a path
    /// whose cost reached the key's ceiling added nothing per link, two transits tied, each
    /// became the other's predecessor, and `path_to` pushed onto its path until memory ran out.
    /// A hash of all ones is below 1 and one of zeros above 0 (a hash of all ones gave exactly
    /// 1: a winning member of rendezvous hashing scored minus infinity and lost).
    #[test]
    fn a_hash_as_a_unit_number_is_never_0_or_1() {
        for h in [0, 1, 1 << 11, u64::MAX >> 1, u64::MAX - 1, u64::MAX] {
            let u = unit_open(h);
            assert!(u > 0.0 && u < 1.0, "{h:#x}: {u}");
            assert!((-u.ln()).is_finite() && -u.ln() > 0.0, "{h:#x}");
        }
    }

    /// The count of turns taken among `0..t` is what `dial_takes_turn`'s doc says.
    #[test]
    fn dial_turns_taken_follow_their_formula() {
        for dial in 1..100u64 {
            for t in 1..=100u64 {
                let taken = (0..t).filter(|&n| dial_takes_turn(dial as u8, n)).count() as u64;
                assert_eq!(taken, (t - 1) * dial / 100 + 1, "dial {dial}, {t} turns");
            }
        }
    }
    #[test]
    fn a_latency_past_any_limit_still_gives_paths_that_end_at_the_origin() {
        use crate::builder::{TopologyBuilder, ms};
        let mut b = TopologyBuilder::new();
        b.node("z", NodeKind::Edge)
            .node("c", NodeKind::Transit)
            .node("b", NodeKind::Transit)
            .node("a", NodeKind::Transit)
            .node("s", NodeKind::Site)
            .link("z", "c", ms(1.0))
            .link("c", "b", ms(1.0))
            .link("b", "a", ms(1.0))
            .link("a", "s", ms(1.0))
            .service("chat")
            .serve("s", "chat", 10);
        let declared = b.build();
        let mut huge_declared = declared.clone();
        huge_declared.links[0].latency = Latency::from_nanos(1 << 57);
        let mut huge_live = LiveState::default();
        huge_live.link_latency.insert(
            LinkId::new(&NodeId::new("b"), &NodeId::new("c")),
            Latency::from_nanos(u64::MAX),
        );
        for (topo, live) in [(huge_declared, LiveState::default()), (declared, huge_live)] {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(route(&topo, &NodeId::new("z"), "chat", &live));
            });
            let got = rx
                .recv_timeout(std::time::Duration::from_secs(20))
                .expect("routing returns")
                .unwrap();
            let path: Vec<&str> = got[0].path.iter().map(|n| n.as_str()).collect();
            assert_eq!(path, ["z", "c", "b", "a", "s"]);
            // Each link counts at most `Latency::MAX` (60 s), the limit of any declared one.
            assert!(got[0].latency <= Latency::from_nanos(Latency::MAX.as_nanos() + 3_000_000));
        }
    }
    use crate::builder::{TopologyBuilder, country, ms};
    use crate::model::{NodeKind, Region, Residency};

    fn ids(c: &[Candidate]) -> Vec<&str> {
        c.iter().map(|c| c.site.as_str()).collect()
    }
    fn path(c: &Candidate) -> Vec<&str> {
        c.path.iter().map(|n| n.as_str()).collect()
    }
    fn nid(s: &str) -> NodeId {
        NodeId::new(s)
    }

    /// A comb: a chain of 4,000 transits from the edge, a site serving one service on each.
    /// Only the sites whose path fits a stream's header (at most `MAX_PATH_NODES` names) are
    /// candidates: every site was one before, its path naming up to 4,002 nodes, the table
    /// holding ~8 million names (quadratic in the chain's length), all of which routers then
    /// threw away. A reserved path too long is refused by `on_path` as well.
    #[test]
    fn sites_beyond_the_path_limit_are_no_candidates_and_the_table_stays_small() {
        const TEETH: usize = 4000;
        let mut b = TopologyBuilder::new();
        b.node("e", NodeKind::Edge).service("x");
        let mut prev = "e".to_string();
        for k in 1..=TEETH {
            let (t, s) = (format!("t{k:04}"), format!("s{k:04}"));
            b.node(&t, NodeKind::Transit)
                .node(&s, NodeKind::Site)
                .link(&prev, &t, ms(1.0))
                .link(&t, &s, ms(1.0))
                .serve(&s, "x", 1);
            prev = t;
        }
        let t = b.build();
        let c = route(&t, &nid("e"), "x", &LiveState::default()).unwrap();
        // e, t0001..t00kk, s00kk: k + 2 nodes, so k <= MAX_PATH_NODES - 2.
        assert_eq!(c.len(), MAX_PATH_NODES - 2, "{} candidates", c.len());
        assert!(c.iter().all(|c| c.path.len() <= MAX_PATH_NODES));
        assert_eq!(c.last().unwrap().path.len(), MAX_PATH_NODES);
        assert_eq!(c[0].site.as_str(), "s0001");

        let g = Graph::new(&t);
        let live = LiveState::default();
        let fits: Vec<NodeId> = c.last().unwrap().path.clone();
        assert!(on_path(&g, &live, "x", &fits).is_some());
        let mut too_long: Vec<NodeId> = fits[..fits.len() - 1].to_vec();
        too_long.push(nid(&format!("t{:04}", MAX_PATH_NODES - 1)));
        too_long.push(nid(&format!("s{:04}", MAX_PATH_NODES - 1)));
        assert_eq!(too_long.len(), MAX_PATH_NODES + 1);
        assert!(on_path(&g, &live, "x", &too_long).is_none());
    }

    /// A site whose best path names more nodes than a header carries takes its best path that
    /// fits: a slower direct link (50 ms) rather than none when its fastest path is a chain of
    /// 17 transits (19 nodes, 18 ms); a short path over a drained link when its drain-free
    /// path is that chain. (It was dropped, as if unreachable: draining a link there acted as
    /// `down` for the site.)
    #[test]
    fn a_site_whose_best_path_is_too_long_takes_its_best_path_that_fits() {
        let chain = |direct: Option<(f64, AdminState)>| {
            let mut b = TopologyBuilder::new();
            b.node("e", NodeKind::Edge)
                .node("s", NodeKind::Site)
                .service("x")
                .serve("s", "x", 1);
            let mut prev = "e".to_string();
            for k in 1..=17 {
                let t = format!("t{k:02}");
                b.node(&t, NodeKind::Transit).link(&prev, &t, ms(1.0));
                prev = t;
            }
            b.link(&prev, "s", ms(1.0));
            let mut t = b.build();
            if let Some((latency, state)) = direct {
                let mut b2 = TopologyBuilder::new();
                b2.node("e", NodeKind::Edge)
                    .node("s", NodeKind::Site)
                    .link("e", "s", ms(latency));
                let mut link = b2.build().links.remove(0);
                link.state = state;
                t.links.push(link);
            }
            t
        };
        let live = LiveState::default();
        // The chain alone: 19 nodes, no candidate.
        assert!(
            route(&chain(None), &nid("e"), "x", &live)
                .unwrap()
                .is_empty()
        );
        // A slower direct link: taken.
        let c = route(&chain(Some((50.0, AdminState::Up))), &nid("e"), "x", &live).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(path(&c[0]), ["e", "s"]);
        assert_eq!(c[0].latency, Latency::from_micros(50_000));
        assert!(!c[0].drained);
        // A faster drained direct link: taken, as drained.
        let c = route(
            &chain(Some((1.0, AdminState::Drain))),
            &nid("e"),
            "x",
            &live,
        )
        .unwrap();
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(path(&c[0]), ["e", "s"]);
        assert!(c[0].drained);
    }

    /// Two equally fast paths to one site: 17 transits `a01`..`a17` (lower ids, 19 nodes with
    /// the ends) and 8 transits `b01`..`b08`, 36 ms each. Ties go to the fewest links, so the
    /// site is a candidate along the path a stream can name; by the smallest predecessor alone
    /// (`a17` before `b08`) it took the 19-node path and was left out.
    #[test]
    fn an_equally_fast_path_with_fewer_links_wins_the_tie() {
        let mut b = TopologyBuilder::new();
        b.node("e", NodeKind::Edge)
            .node("s", NodeKind::Site)
            .service("x")
            .serve("s", "x", 1);
        let mut prev = "e".to_string();
        for k in 1..=17 {
            let t = format!("a{k:02}");
            b.node(&t, NodeKind::Transit).link(&prev, &t, ms(1.0));
            prev = t;
        }
        b.link(&prev, "s", ms(19.0));
        let mut prev = "e".to_string();
        for k in 1..=8 {
            let t = format!("b{k:02}");
            b.node(&t, NodeKind::Transit).link(&prev, &t, ms(4.0));
            prev = t;
        }
        b.link(&prev, "s", ms(4.0));
        let c = route(&b.build(), &nid("e"), "x", &LiveState::default()).unwrap();
        assert_eq!(ids(&c), ["s"]);
        assert_eq!(c[0].path.len(), 10, "{:?}", path(&c[0]));
        assert_eq!(c[0].latency, ms(36.0));
    }

    /// edge -- t1 (5) -- s1 (1); edge -- t2 (2) -- s2 (20); t1 -- t2 (1)
    fn small() -> TopologyBuilder {
        let mut b = TopologyBuilder::new();
        b.node("edge", NodeKind::Edge)
            .node("t1", NodeKind::Transit)
            .node("t2", NodeKind::Transit)
            .node("s1", NodeKind::Site)
            .node("s2", NodeKind::Site)
            .link("edge", "t1", ms(5.0))
            .link("t1", "s1", ms(1.0))
            .link("edge", "t2", ms(2.0))
            .link("t2", "s2", ms(20.0))
            .link("t1", "t2", ms(1.0))
            .service("chat")
            .serve("s1", "chat", 100)
            .serve("s2", "chat", 100);
        b
    }

    /// A fixed path's candidate: its own latency (measured where measured), `None` as soon as
    /// any part of it cannot carry a stream.
    #[test]
    fn a_fixed_path_is_a_candidate_while_every_part_of_it_is_usable() {
        let t = small().build();
        let g = Graph::new(&t);
        let p = |ns: &[&str]| ns.iter().map(|n| nid(n)).collect::<Vec<_>>();
        let long = p(&["edge", "t1", "s1"]);
        let live = LiveState::default();
        let c = on_path(&g, &live, "chat", &long).unwrap();
        assert_eq!(
            (c.site.as_str(), c.latency, c.cost),
            ("s1", ms(6.0), ms(6.0))
        );
        assert_eq!(c.path, long);
        // Not the table's path to s1 (edge-t2-t1-s1, 4 ms).
        assert_ne!(
            route(&t, &nid("edge"), "chat", &live).unwrap()[0].path,
            long
        );

        let mut measured = LiveState::default();
        measured
            .link_latency
            .insert(LinkId::new(&nid("edge"), &nid("t1")), ms(7.0));
        assert_eq!(
            on_path(&g, &measured, "chat", &long).unwrap().latency,
            ms(8.0)
        );

        let mut down = LiveState::default();
        down.down_links.insert(LinkId::new(&nid("t1"), &nid("s1")));
        assert!(on_path(&g, &down, "chat", &long).is_none(), "a link down");
        let mut down = LiveState::default();
        down.down_nodes.insert(nid("t1"));
        assert!(on_path(&g, &down, "chat", &long).is_none(), "a node down");
        let mut full = LiveState::default();
        full.site_load.insert(
            nid("s1"),
            SiteLoad {
                active_streams: 100,
                capacity: 100,
                healthy: true,
            },
        );
        assert!(on_path(&g, &full, "chat", &long).is_none(), "the site full");
        assert!(
            on_path(&g, &live, "nope", &long).is_none(),
            "an unknown service"
        );
        assert!(
            on_path(&g, &live, "chat", &p(&["edge", "t1", "t2", "s2"])).is_some(),
            "transits in the middle"
        );
        assert!(
            on_path(&g, &live, "chat", &p(&["edge", "s1"])).is_none(),
            "no link edge--s1"
        );
        assert!(
            on_path(&g, &live, "chat", &p(&["edge", "t1", "s1", "t1", "s1"])).is_none(),
            "a site in the middle"
        );
        assert!(
            on_path(&g, &live, "chat", &p(&["edge", "t1"])).is_none(),
            "not a site"
        );
        assert!(
            on_path(&g, &live, "chat", &p(&["edge", "t1", "t2", "t1", "s1"])).is_none(),
            "a transit twice (a loop)"
        );
        assert!(on_path(&g, &live, "chat", &p(&["edge"])).is_none());
    }

    #[test]
    fn ranks_sites_by_shortest_path_latency() {
        let t = small().build();
        let c = route(&t, &nid("edge"), "chat", &LiveState::default()).unwrap();
        assert_eq!(ids(&c), ["s1", "s2"]);
        // edge-t2-t1-s1 = 4ms beats edge-t1-s1 = 6ms.
        assert_eq!(path(&c[0]), ["edge", "t2", "t1", "s1"]);
        assert_eq!(c[0].latency, ms(4.0));
        assert_eq!(c[0].cost, ms(4.0));
        assert_eq!(c[0].next_hop().map(|n| n.as_str()), Some("t2"));
        assert_eq!(c[1].latency, ms(22.0));
        assert!(!c[0].drained && !c[1].drained);
    }

    #[test]
    fn measured_latency_replaces_declared() {
        let t = small().build();
        let mut live = LiveState::default();
        live.link_latency
            .insert(LinkId::new(&nid("t1"), &nid("t2")), ms(10.0));
        let c = route(&t, &nid("edge"), "chat", &live).unwrap();
        assert_eq!(path(&c[0]), ["edge", "t1", "s1"]);
        assert_eq!(c[0].latency, ms(6.0));
    }

    #[test]
    fn floored_raises_measured_latency_to_the_declared_one_only() {
        let t = small().build();
        let t1t2 = LinkId::new(&nid("t1"), &nid("t2"));
        let declared = t.link(&t1t2).unwrap().latency;
        let mut live = LiveState::default();
        live.link_latency.insert(t1t2.clone(), Latency::ZERO);
        live.link_latency
            .insert(LinkId::parse("ghost--s1").unwrap(), ms(1.0));
        let above = declared.saturating_add(ms(7.0));
        let f = live.floored(&t);
        assert_eq!(f.link_latency[&t1t2], declared);
        assert_eq!(
            f.link_latency[&LinkId::parse("ghost--s1").unwrap()],
            ms(1.0)
        );
        live.link_latency.insert(t1t2.clone(), above);
        assert_eq!(live.floored(&t).link_latency[&t1t2], above);
    }

    #[test]
    fn down_nodes_and_links_are_never_crossed() {
        let t = small().build();
        let mut live = LiveState::default();
        live.down_nodes.insert(nid("t2"));
        let c = route(&t, &nid("edge"), "chat", &live).unwrap();
        assert_eq!(path(&c[0]), ["edge", "t1", "s1"]);
        assert!(c.iter().all(|c| !c.path.contains(&nid("t2"))));
        assert_eq!(ids(&c), ["s1"]);

        let mut live = LiveState::default();
        live.down_links.insert(LinkId::parse("t1--s1").unwrap());
        let c = route(&t, &nid("edge"), "chat", &live).unwrap();
        assert_eq!(ids(&c), ["s2"]);

        let mut b = small();
        b.node_state("s1", AdminState::Down);
        let c = route(&b.build(), &nid("edge"), "chat", &LiveState::default()).unwrap();
        assert_eq!(ids(&c), ["s2"]);
    }

    #[test]
    fn drained_link_is_used_only_when_nothing_else_exists() {
        let mut b = small();
        // Drain t2--t1: s1 is still reachable drain-free via edge--t1 (6ms > 4ms drained path).
        let mut t = b.build();
        t.links[4].state = AdminState::Drain;
        let c = route(&t, &nid("edge"), "chat", &LiveState::default()).unwrap();
        assert_eq!(path(&c[0]), ["edge", "t1", "s1"]);
        assert!(!c[0].drained);

        // Drain t1--s1 as well: s1 is only reachable over a drained link; s2 (22ms) wins.
        t.links[1].state = AdminState::Drain;
        let c = route(&t, &nid("edge"), "chat", &LiveState::default()).unwrap();
        assert_eq!(ids(&c), ["s2", "s1"]);
        assert!(!c[0].drained);
        assert!(c[1].drained);
        assert_eq!(path(&c[1]), ["edge", "t1", "s1"]);

        // A drained site ranks after every drain-free one.
        b.node_state("s1", AdminState::Drain);
        let c = route(&b.build(), &nid("edge"), "chat", &LiveState::default()).unwrap();
        assert_eq!(ids(&c), ["s2", "s1"]);
        assert!(c[1].drained);
    }

    #[test]
    fn residency_excludes_sites_outside_allowed_countries_and_regions() {
        let mut b = TopologyBuilder::new();
        b.node_in("edge", NodeKind::Edge, "au-east", country("AU"))
            .node_in("sg", NodeKind::Site, "ap-se", country("SG"))
            .node_in("nz", NodeKind::Site, "nz", country("NZ"))
            .node_in("mel", NodeKind::Site, "au-south", country("AU"))
            .link("edge", "sg", ms(1.0))
            .link("edge", "nz", ms(12.0))
            .link("edge", "mel", ms(6.0))
            .service_with(
                "anz",
                Residency {
                    regions: vec![],
                    countries: vec![country("AU"), country("NZ")],
                },
            )
            .service_with(
                "east",
                Residency {
                    regions: vec![Region::new("au-east"), Region::new("nz")],
                    countries: vec![],
                },
            )
            .service("any");
        for s in ["sg", "nz", "mel"] {
            b.serve(s, "anz", 10)
                .serve(s, "east", 10)
                .serve(s, "any", 10);
        }
        let t = b.build();
        let live = LiveState::default();
        assert_eq!(
            ids(&route(&t, &nid("edge"), "anz", &live).unwrap()),
            ["mel", "nz"]
        );
        assert_eq!(
            ids(&route(&t, &nid("edge"), "east", &live).unwrap()),
            ["nz"]
        );
        assert_eq!(
            ids(&route(&t, &nid("edge"), "any", &live).unwrap()),
            ["sg", "mel", "nz"]
        );
    }

    #[test]
    fn load_penalty_is_zero_to_half_then_grows_like_a_queue() {
        assert_eq!(load_penalty(0, 100), Some(Latency::ZERO));
        assert_eq!(load_penalty(50, 100), Some(Latency::ZERO));
        assert_eq!(load_penalty(75, 100), Some(ms(10.0)));
        assert_eq!(load_penalty(90, 100), Some(ms(40.0)));
        assert_eq!(load_penalty(99, 100), Some(ms(490.0)));
        assert_eq!(load_penalty(9_999, 10_000), Some(LOAD_PENALTY_MAX));
        assert_eq!(load_penalty(100, 100), None);
        assert_eq!(load_penalty(0, 0), None);
        assert_eq!(load_penalty(u32::MAX - 1, u32::MAX), Some(LOAD_PENALTY_MAX));
        let mut last = Latency::ZERO;
        for a in 0..100 {
            let p = load_penalty(a, 100).unwrap();
            assert!(p >= last, "monotone at {a}");
            last = p;
        }
    }

    #[test]
    fn site_load_makes_sites_ineligible_or_penalised() {
        let t = small().build();
        let mut live = LiveState::default();
        // s1 at 90 % of its reported capacity: 4ms + 40ms > s2's 22ms.
        live.site_load.insert(
            nid("s1"),
            SiteLoad {
                active_streams: 90,
                capacity: 100,
                healthy: true,
            },
        );
        let c = route(&t, &nid("edge"), "chat", &live).unwrap();
        assert_eq!(ids(&c), ["s2", "s1"]);
        assert_eq!(c[1].penalty, ms(40.0));
        assert_eq!(c[1].cost, ms(44.0));
        assert_eq!(c[1].latency, ms(4.0));

        // capacity 0 in the report: the declared capacity (100) applies; full -> ineligible.
        live.site_load.insert(
            nid("s1"),
            SiteLoad {
                active_streams: 100,
                capacity: 0,
                healthy: true,
            },
        );
        assert_eq!(
            ids(&route(&t, &nid("edge"), "chat", &live).unwrap()),
            ["s2"]
        );

        live.site_load.insert(
            nid("s1"),
            SiteLoad {
                active_streams: 0,
                capacity: 100,
                healthy: false,
            },
        );
        assert_eq!(
            ids(&route(&t, &nid("edge"), "chat", &live).unwrap()),
            ["s2"]
        );
    }

    /// A site's load is read per service: `chat` full on s1 leaves it out of `chat`'s
    /// candidates even though the site's summed load (`chat` + an idle `embed`) is at 50 %,
    /// and `embed` still takes s1 first. The summed one applies only to a site with no
    /// per-service entries (an older sender).
    #[test]
    fn a_full_service_is_not_hidden_by_an_idle_one_on_the_same_site() {
        let mut b = small();
        b.service("embed")
            .serve("s1", "embed", 100)
            .serve("s2", "embed", 100);
        let t = b.build();
        let load = |active_streams, capacity| SiteLoad {
            active_streams,
            capacity,
            healthy: true,
        };
        let mut live = LiveState::default();
        live.site_load.insert(nid("s1"), load(100, 200));
        live.service_load.insert(
            nid("s1"),
            [
                (ServiceName::new("chat"), load(100, 100)),
                (ServiceName::new("embed"), load(0, 100)),
            ]
            .into(),
        );
        let chat = route(&t, &nid("edge"), "chat", &live).unwrap();
        assert_eq!(ids(&chat), ["s2"]);
        let embed = route(&t, &nid("edge"), "embed", &live).unwrap();
        assert_eq!(ids(&embed), ["s1", "s2"]);
        assert_eq!(embed[0].penalty, Latency::ZERO);
        let g = Graph::new(&t);
        let path = [nid("edge"), nid("t1"), nid("s1")];
        assert!(on_path(&g, &live, "chat", &path).is_none());
        assert!(on_path(&g, &live, "embed", &path).is_some());
        // A site that reports per service but not `embed` (it has not applied the version
        // that gives it `embed` yet) has not reported `embed`: the sum of its other services
        // (`chat` full) does not speak for it. (It did: `embed` was left out as full.)
        live.service_load.get_mut("s1").unwrap().remove("embed");
        let embed = route(&t, &nid("edge"), "embed", &live).unwrap();
        assert_eq!(ids(&embed), ["s1", "s2"]);
        assert_eq!(embed[0].penalty, Latency::ZERO);
        // No per-service entries at all (an older sender): the summed one (90 %) gives
        // `embed` its penalty.
        live.service_load.remove("s1");
        live.site_load.insert(nid("s1"), load(180, 200));
        let embed = route(&t, &nid("edge"), "embed", &live).unwrap();
        assert_eq!(ids(&embed), ["s2", "s1"]);
        assert_eq!(embed[1].penalty, ms(40.0));
    }

    #[test]
    fn from_a_site_itself_costs_zero_and_down_origin_has_no_candidates() {
        let t = small().build();
        let c = route(&t, &nid("s2"), "chat", &LiveState::default()).unwrap();
        assert_eq!(ids(&c), ["s2", "s1"]);
        assert_eq!(c[0].cost, Latency::ZERO);
        assert_eq!(path(&c[0]), ["s2"]);
        assert_eq!(c[0].next_hop(), None);

        let mut live = LiveState::default();
        live.down_nodes.insert(nid("edge"));
        assert!(route(&t, &nid("edge"), "chat", &live).unwrap().is_empty());
    }

    #[test]
    fn equal_costs_break_ties_by_site_id_then_smallest_predecessor() {
        let mut b = TopologyBuilder::new();
        b.node("e", NodeKind::Edge)
            .node("tb", NodeKind::Transit)
            .node("ta", NodeKind::Transit)
            .node("zs", NodeKind::Site)
            .node("as", NodeKind::Site)
            .link("e", "tb", ms(1.0))
            .link("e", "ta", ms(1.0))
            .link("tb", "zs", ms(1.0))
            .link("ta", "zs", ms(1.0))
            .link("e", "as", ms(2.0))
            .service("x")
            .serve("zs", "x", 1)
            .serve("as", "x", 1);
        let t = b.build();
        let c = route(&t, &nid("e"), "x", &LiveState::default()).unwrap();
        assert_eq!(ids(&c), ["as", "zs"]);
        assert_eq!(path(&c[1]), ["e", "ta", "zs"]);
        // Same answer whatever the declaration order.
        let mut rev = t.clone();
        rev.nodes.reverse();
        rev.links.reverse();
        assert_eq!(
            route(&rev, &nid("e"), "x", &LiveState::default()).unwrap(),
            c
        );
    }

    #[test]
    fn table_lookup_and_errors() {
        let t = small().build();
        let g = Graph::new(&t);
        let table = RoutingTable::build(&t, &g, &nid("edge"), &LiveState::default()).unwrap();
        assert_eq!(table.from().as_str(), "edge");
        assert_eq!(ids(table.candidates("chat")), ["s1", "s2"]);
        assert!(table.candidates("nope").is_empty());
        assert_eq!(table.best("chat").map(|c| c.site.as_str()), Some("s1"));
        assert_eq!(table.services().count(), 1);

        let err = RoutingTable::build(&t, &g, &nid("mars"), &LiveState::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"unknown node "mars" (known: edge, s1, s2, t1, t2)"#
        );
        let err = route(&t, &nid("edge"), "video", &LiveState::default()).unwrap_err();
        assert_eq!(err.to_string(), r#"unknown service "video" (known: chat)"#);
        let other = TopologyBuilder::new().build();
        assert!(matches!(
            RoutingTable::build(&other, &g, &nid("edge"), &LiveState::default()),
            Err(RouteError::GraphMismatch { .. })
        ));
        // Live entries for things the topology lacks are ignored.
        let mut live = LiveState::default();
        live.down_nodes.insert(nid("ghost"));
        live.down_links
            .insert(LinkId::parse("ghost--edge").unwrap());
        live.link_latency
            .insert(LinkId::parse("ghost--s1").unwrap(), ms(1.0));
        assert_eq!(
            RoutingTable::build(&t, &g, &nid("edge"), &live).unwrap(),
            table
        );
    }

    #[test]
    fn long_known_lists_show_the_names_most_like_the_unknown_one() {
        let mut known: Vec<String> = (0..30).map(|i| format!("a-{i:02}")).collect();
        known.push("syd-edge-1".into());
        known.push("syd-site-1".into());
        let e = RouteError::UnknownNode {
            node: "syd-edge-9".into(),
            known,
        };
        let msg = e.to_string();
        assert!(
            msg.starts_with(r#"unknown node "syd-edge-9" (known: a-00, "#),
            "{msg}"
        );
        assert!(
            msg.contains("syd-edge-1, syd-site-1, ... and 12 more)"),
            "{msg}"
        );
    }

    #[test]
    fn hysteresis_needs_both_absolute_and_relative_margins() {
        let h = Hysteresis::default();
        // 30 -> 15: better by 15ms and 15 < 20: switch.
        assert!(h.should_switch(ms(30.0), ms(15.0)));
        // 30 -> 21: better by 9ms: stay.
        assert!(!h.should_switch(ms(30.0), ms(21.0)));
        // 100 -> 70: better by 30ms but 70 >= 66.7: stay.
        assert!(!h.should_switch(ms(100.0), ms(70.0)));
        // 100 -> 66: both margins met.
        assert!(h.should_switch(ms(100.0), ms(66.0)));
        // Exactly 10ms better and under 2/3: switch (">= absolute").
        assert!(h.should_switch(ms(30.0), ms(19.999)));
        assert!(
            !h.should_switch(ms(30.0), ms(20.0)),
            "20 is not < 2/3 of 30"
        );
        assert!(!h.should_switch(ms(5.0), ms(0.0)), "never for a 5ms gain");
        assert!(!h.should_switch(ms(10.0), ms(10.0)));
    }

    #[test]
    fn hysteresis_select_keeps_a_live_incumbent_within_margins() {
        let t = small().build();
        let c = route(&t, &nid("edge"), "chat", &LiveState::default()).unwrap();
        let h = Hysteresis::default();
        // s1 (4ms) vs s2 (22ms): 18ms better and 4 < 14.7: move to s1.
        assert_eq!(h.select(Some(&nid("s2")), &c).unwrap().site.as_str(), "s1");
        assert_eq!(h.select(None, &c).unwrap().site.as_str(), "s1");
        assert_eq!(
            h.select(Some(&nid("gone")), &c).unwrap().site.as_str(),
            "s1"
        );
        let mut close = c.clone();
        close[1].cost = ms(9.0);
        assert_eq!(
            h.select(Some(&nid("s2")), &close).unwrap().site.as_str(),
            "s2"
        );
        let mut drained_inc = close.clone();
        drained_inc[1].drained = true;
        assert_eq!(
            h.select(Some(&nid("s2")), &drained_inc)
                .unwrap()
                .site
                .as_str(),
            "s1"
        );
        assert!(h.select(None, &[]).is_none());
    }

    #[test]
    fn a_best_site_new_to_the_candidates_is_taken_past_the_margins() {
        let t = small().build();
        let mut c = route(&t, &nid("edge"), "chat", &LiveState::default()).unwrap();
        c[1].cost = ms(9.0);
        let h = Hysteresis::default();
        let inc = Some(nid("s2"));
        // s1 (4 ms) was on offer at the last choice: the margins keep s2 (9 ms).
        let was = |_: &NodeId| true;
        assert_eq!(
            h.select_since(inc.as_ref(), &c, was).unwrap().site.as_str(),
            "s2"
        );
        // s1 was not (it just came up): taken at once.
        let only_s2 = |s: &NodeId| s.as_str() == "s2";
        assert_eq!(
            h.select_since(inc.as_ref(), &c, only_s2)
                .unwrap()
                .site
                .as_str(),
            "s1"
        );
        // New but not the best: the margins decide as before.
        let only_s1 = |s: &NodeId| s.as_str() == "s1";
        assert_eq!(
            h.select_since(inc.as_ref(), &c, only_s1)
                .unwrap()
                .site
                .as_str(),
            "s2"
        );
        let mut s2_best = c.clone();
        s2_best.swap(0, 1);
        s2_best[0].cost = ms(3.0);
        assert_eq!(
            h.select_since(Some(&nid("s1")), &s2_best, only_s1)
                .unwrap()
                .site
                .as_str(),
            "s2"
        );
        let s1_kept = |s: &NodeId| s.as_str() != "nobody";
        assert_eq!(
            h.select_since(Some(&nid("s1")), &s2_best, s1_kept)
                .unwrap()
                .site
                .as_str(),
            "s1"
        );
        assert!(h.select_since(None, &[], was).is_none());
    }

    fn spread_of(costs_ms: &[f64], weights: &[u32]) -> (Vec<Candidate>, Spread) {
        let ranked: Vec<Candidate> = costs_ms
            .iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (&cost, &weight))| Candidate {
                site: nid(&format!("s{i}")),
                path: vec![nid("edge"), nid(&format!("s{i}"))],
                latency: ms(cost),
                penalty: Latency::ZERO,
                cost: ms(cost),
                drained: false,
                weight,
                dial: 100,
            })
            .collect();
        let spread = Spread::new(&ranked);
        (ranked, spread)
    }

    /// A member stays until it is 4 ms beyond the preferred site, a newcomer joins within 2 ms:
    /// a site hovering between the two does not change the group.
    #[test]
    fn a_member_keeps_its_place_in_the_band_between_joining_and_leaving() {
        let was = |ids: &'static [&'static str]| move |id: &NodeId| ids.contains(&id.as_str());
        for (second, members_before, want) in [
            (7.0, &[][..], 2),           // 2 ms: joins
            (7.5, &[][..], 1),           // 2.5 ms: does not join
            (7.5, &["s0", "s1"][..], 2), // 2.5 ms: a member stays
            (9.0, &["s1"][..], 2),       // 4 ms: still stays
            (9.1, &["s0", "s1"][..], 1), // beyond 4 ms: leaves
        ] {
            let (ranked, _) = spread_of(&[5.0, second], &[1, 1]);
            let g = Spread::sticky(&ranked, was(members_before));
            assert_eq!(
                g.members(),
                want,
                "second at {second} ms, members {members_before:?}"
            );
        }
        // The group stays a prefix: a newcomer beyond 2 ms ranked before a member ends it.
        let (ranked, _) = spread_of(&[5.0, 7.5, 8.0], &[1, 1, 1]);
        assert_eq!(Spread::sticky(&ranked, was(&["s2"])).members(), 1);
        assert_eq!(Spread::sticky(&ranked, was(&["s1", "s2"])).members(), 3);
        // Stickiness does not cross drain classes.
        let (mut ranked, _) = spread_of(&[5.0, 5.5], &[1, 1]);
        ranked[1].drained = true;
        assert_eq!(Spread::sticky(&ranked, was(&["s1"])).members(), 1);
    }

    #[test]
    fn spread_groups_the_sites_within_two_ms_of_the_preferred_one() {
        assert_eq!(Spread::new(&[]).members(), 0);
        assert_eq!(Spread::new(&[]).pick(7), 0);
        let (_, one) = spread_of(&[5.0, 7.5], &[100, 100]);
        assert_eq!(one.members(), 1);
        assert_eq!((one.share(0), one.share(1)), (1.0, 0.0));
        assert!((0..100).all(|t| one.pick(t) == 0));
        // Exactly 2 ms more is still equally near; the list is cut at the first site beyond.
        let (_, three) = spread_of(&[5.0, 6.0, 7.0, 7.1, 7.0], &[1, 1, 2, 1, 1]);
        assert_eq!(three.members(), 3);
        assert_eq!(
            (0..4).map(|i| three.share(i)).collect::<Vec<_>>(),
            [0.25, 0.25, 0.5, 0.0]
        );
        // A preferred site kept by hysteresis may cost more than the sites after it: it stays
        // in the group, whose band is measured from the cheapest (8 ms: 10.5 is beyond it).
        let (_, sticky) = spread_of(&[9.0, 8.0, 10.5, 11.5], &[1, 1, 1, 1]);
        assert_eq!(sticky.members(), 2);
        let (_, sticky) = spread_of(&[9.0, 8.0, 9.9, 11.5], &[1, 1, 1, 1]);
        assert_eq!(sticky.members(), 3);
        // The operator guide's case: syd-1 (0.8 ms, now 4.7 with its load penalty, kept by
        // hysteresis), syd-2 at 1.5 and mel at 6.5. Melbourne takes no share while syd-2 is
        // idle (it did: within 2 ms of syd-1's 4.7), member before or not.
        let (ranked, _) = spread_of(&[4.7, 1.5, 6.5], &[300, 100, 100]);
        assert_eq!(Spread::new(&ranked).members(), 2);
        let was = |ids: &'static [&'static str]| move |n: &NodeId| ids.contains(&n.as_str());
        assert_eq!(Spread::sticky(&ranked, was(&["s0", "s1"])).members(), 2);
        // A member too: 6.5 is beyond 1.5 + 4.
        assert_eq!(Spread::sticky(&ranked, was(&["s2"])).members(), 2);
        // Drained sites do not share with drain-free ones, nor the other way round.
        let (mut ranked, _) = spread_of(&[5.0, 5.0, 5.0], &[1, 1, 1]);
        ranked[2].drained = true;
        assert_eq!(Spread::new(&ranked).members(), 2);
        ranked[0].drained = true;
        assert_eq!(Spread::new(&ranked).members(), 1);
        // A weight of 0 (validation refuses it) still takes a turn.
        let (_, zero) = spread_of(&[5.0, 5.0], &[0, 1]);
        assert_eq!((zero.share(0), zero.share(1)), (0.5, 0.5));
    }

    /// Any run of consecutive tickets, wherever it starts (the counter wraps), gives each member
    /// its share to within a few connections.
    #[test]
    fn spread_deals_shares_evenly_over_any_run_of_tickets() {
        let cases: [&[u32]; 5] = [
            &[300, 100],
            &[1, 1, 1],
            &[100, 100, 100, 100, 100, 100, 100],
            &[1, 1_000_000],
            &[5, 3, 2],
        ];
        for weights in cases {
            let costs = vec![1.0; weights.len()];
            let (_, spread) = spread_of(&costs, weights);
            assert_eq!(spread.members(), weights.len());
            for start in [0u64, 1, 12_345, 1 << 40, u64::MAX - 700] {
                for run in [10u64, 100, 1000, 10_000] {
                    let mut got = vec![0u64; weights.len()];
                    for k in 0..run {
                        got[spread.pick(start.wrapping_add(k))] += 1;
                    }
                    for (i, &n) in got.iter().enumerate() {
                        let want = spread.share(i) * run as f64;
                        assert!(
                            (n as f64 - want).abs() <= 3.0,
                            "weights {weights:?}, tickets {start}+{run}: member {i} got {n}, \
                             share {want:.1}"
                        );
                    }
                }
            }
        }
    }

    /// Client keys for `n` distinct addresses (10.0.0.0 + i).
    fn keys(n: u32) -> Vec<u64> {
        (0..n)
            .map(|i| client_key(std::net::Ipv4Addr::from(0x0a00_0000 + i).into()))
            .collect()
    }

    #[test]
    fn affinity_keeps_a_client_on_one_site_and_shares_hold_over_clients() {
        let (ranked, spread) = spread_of(&[1.0, 1.5, 2.0], &[300, 100, 100]);
        let keys = keys(20_000);
        let mut got = [0u32; 3];
        for &k in &keys {
            let i = spread.pick_affine(k);
            assert_eq!(spread.pick_affine(k), i, "the same client, the same site");
            got[i] += 1;
        }
        for (i, &n) in got.iter().enumerate() {
            let share = n as f64 / keys.len() as f64;
            assert!(
                (share - spread.share(i)).abs() < 0.02,
                "member {i}: {share:.3} of clients, weight share {:.3}",
                spread.share(i)
            );
        }
        // An IPv4 client is the same client over an IPv4-mapped IPv6 socket.
        let v4: std::net::Ipv4Addr = "192.0.2.7".parse().unwrap();
        assert_eq!(
            client_key(v4.into()),
            client_key(v4.to_ipv6_mapped().into())
        );
        // The choice depends on the site ids, not on their rank: the same group in another
        // order gives every client the same site.
        let reordered = [ranked[2].clone(), ranked[0].clone(), ranked[1].clone()];
        let other = Spread::new(&reordered);
        for &k in keys.iter().take(2000) {
            assert_eq!(
                reordered[other.pick_affine(k)].site,
                ranked[spread.pick_affine(k)].site
            );
        }
        let (_, alone) = spread_of(&[1.0], &[5]);
        assert!(keys.iter().all(|&k| alone.pick_affine(k) == 0));
    }

    /// Rendezvous hashing: a site leaving moves only its own clients; a site joining takes
    /// clients from the others and moves no client between them.
    #[test]
    fn affinity_moves_only_the_clients_of_a_site_that_leaves_or_joins() {
        let (three, spread3) = spread_of(&[1.0, 1.0, 1.0], &[100, 100, 200]);
        let two: Vec<Candidate> = vec![three[0].clone(), three[2].clone()];
        let spread2 = Spread::new(&two);
        let keys = keys(10_000);
        let (mut moved_leave, mut joined) = (0, 0);
        for &k in &keys {
            let with3 = &three[spread3.pick_affine(k)].site;
            let with2 = &two[spread2.pick_affine(k)].site;
            if with3 != &three[1].site {
                // Not a client of the site that leaves: it must stay where it was.
                assert_eq!(with2, with3, "a client of a staying site moved");
            } else {
                moved_leave += 1;
            }
            // The other way round: s1 joins the two-site group.
            if with3 != with2 {
                assert_eq!(with3, &three[1].site, "a join moved a client elsewhere");
                joined += 1;
            }
        }
        // s1 has a quarter of the weight: about a quarter of the clients move.
        assert!((2_200..=2_800).contains(&moved_leave), "{moved_leave}");
        assert_eq!(moved_leave, joined);
    }

    /// `spread_of`, then `dials` (percent) set on the candidates in order.
    fn dialled(costs_ms: &[f64], weights: &[u32], dials: &[u8]) -> (Vec<Candidate>, Spread) {
        let (mut ranked, spread) = spread_of(costs_ms, weights);
        for (c, &d) in ranked.iter_mut().zip(dials) {
            c.dial = d;
        }
        (ranked, spread)
    }

    fn close(got: &[f64], want: &[f64]) -> bool {
        got.len() == want.len() && got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-12)
    }

    /// The expected share of first tries: the spread's pick, then the dial walk. A near site
    /// dialled to 30 keeps 30 % and spills the rest to the next site, though that one is
    /// outside the equally near group.
    #[test]
    fn expected_shares_follow_the_dial_walk() {
        // No dials: the weight shares, exactly.
        let (ranked, spread) = spread_of(&[1.0, 1.5, 20.0], &[300, 100, 100]);
        assert_eq!(spread.expected(&ranked), [0.75, 0.25, 0.0]);

        /// Costs (ms), weights, dials, expected shares.
        type Case = (
            &'static [f64],
            &'static [u32],
            &'static [u8],
            &'static [f64],
        );
        let cases: [Case; 8] = [
            // near 30 + far: near 0.3, far 0.7.
            (&[1.0, 20.0], &[100, 100], &[30, 100], &[0.3, 0.7]),
            // near 0: far takes every first try.
            (&[1.0, 20.0], &[100, 100], &[0, 100], &[0.0, 1.0]),
            // near 30, far 50, farther 100: 0.3, 0.7 * 0.5, the rest.
            (
                &[1.0, 20.0, 40.0],
                &[1, 1, 1],
                &[30, 50, 100],
                &[0.3, 0.35, 0.35],
            ),
            // Every site declines: the order stands, near first.
            (&[1.0, 20.0], &[100, 100], &[0, 0], &[1.0, 0.0]),
            // A far site's dial matters only for what reaches it.
            (
                &[1.0, 20.0, 40.0],
                &[1, 1, 1],
                &[100, 0, 100],
                &[1.0, 0.0, 0.0],
            ),
            (
                &[1.0, 20.0, 40.0],
                &[1, 1, 1],
                &[50, 0, 100],
                &[0.5, 0.0, 0.5],
            ),
            // Two sharing sites, one dialled to 50: its declines go to the other member (next
            // in the order), not to the far site.
            (
                &[1.0, 1.5, 20.0],
                &[100, 100, 100],
                &[50, 100, 100],
                &[0.25, 0.75, 0.0],
            ),
            // Both dialled to 50: from each pick, the pick, the other member, then far.
            (
                &[1.0, 1.5, 20.0],
                &[100, 100, 100],
                &[50, 50, 100],
                &[0.375, 0.375, 0.25],
            ),
        ];
        for (costs, weights, dials, want) in cases {
            let (ranked, spread) = dialled(costs, weights, dials);
            let got = spread.expected(&ranked);
            assert!(close(&got, want), "dials {dials:?}: {got:?}, want {want:?}");
            assert!((got.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        assert!(Spread::new(&[]).expected(&[]).is_empty());
        let (one, spread) = dialled(&[1.0], &[1], &[0]);
        assert_eq!(
            spread.expected(&one),
            [1.0],
            "a lone site takes all, dial or not"
        );
    }

    /// `shares` lists the group and every site dials send first tries to, with expected shares;
    /// without dials, exactly the group by weight (nothing when one site takes all).
    #[test]
    fn shares_list_the_sites_dials_send_first_tries_to() {
        let list = |ranked: &[Candidate], spread: &Spread| {
            spread
                .shares(ranked)
                .into_iter()
                .map(|s| (s.site.to_string(), (s.share * 1000.0).round() / 1000.0))
                .collect::<Vec<_>>()
        };
        let (ranked, spread) = dialled(&[1.0, 20.0], &[100, 100], &[100, 100]);
        assert!(list(&ranked, &spread).is_empty());
        let (ranked, spread) = dialled(&[1.0, 20.0], &[100, 100], &[30, 100]);
        assert_eq!(
            list(&ranked, &spread),
            [("s0".to_string(), 0.3), ("s1".to_string(), 0.7)]
        );
        // A member dialled to 0 is listed with 0 %: the group is still its group.
        let (ranked, spread) = dialled(&[1.0, 20.0], &[100, 100], &[0, 100]);
        assert_eq!(
            list(&ranked, &spread),
            [("s0".to_string(), 0.0), ("s1".to_string(), 1.0)]
        );
        // Sites nothing reaches first are left out.
        let (ranked, spread) = dialled(
            &[1.0, 1.5, 20.0, 40.0],
            &[300, 100, 1, 1],
            &[100, 60, 100, 100],
        );
        assert_eq!(
            list(&ranked, &spread),
            [("s0".to_string(), 0.85), ("s1".to_string(), 0.15)]
        );
    }

    #[test]
    fn a_drained_site_takes_no_first_try_while_a_drain_free_one_can() {
        // A canary at dial 5, the old site drained for the move at dial 100: every first try
        // starts on the canary (its dial declining falls back to the base order, which starts
        // there), none on the drained site. (95 % started on the drained site.)
        let (mut ranked, _) = spread_of(&[5.0, 6.0], &[1, 1]);
        ranked[0].dial = 5;
        ranked[1].drained = true;
        let spread = Spread::new(&ranked);
        assert_eq!(spread.expected(&ranked), [1.0, 0.0]);
        assert_eq!(walk_dial(&ranked, 1), 0);
        assert_eq!(walk_dial(&ranked, 0), 5);
        // Every site drained: the dials stand.
        ranked[0].drained = true;
        assert_eq!(walk_dial(&ranked, 1), 100);
        let spread = Spread::new(&ranked);
        // Both drained share the connections (a group of two): half start on s0's turn, which
        // takes 5 % of them, the rest go to s1 (dial 100).
        assert_eq!(spread.expected(&ranked), [0.025, 0.975]);
    }

    #[test]
    fn the_dial_walk_moves_declined_sites_to_the_end() {
        let order = |o: TryOrder| o.iter().collect::<Vec<_>>();
        assert_eq!(order(TryOrder::new(4, 0)), [0, 1, 2, 3]);
        assert_eq!(order(TryOrder::new(4, 3)), [3, 0, 1, 2]);
        assert_eq!(
            order(TryOrder::new(4, 9)),
            [0, 1, 2, 3],
            "out of range: rank order"
        );
        assert_eq!(order(TryOrder::new(0, 0)), Vec::<usize>::new());
        assert_eq!(TryOrder::new(0, 0).dialled(|_| true).first(), 0);

        // Dealt 1: base 1, 0, 2, 3. Sites 1 and 0 decline, 2 accepts: 2, 3, then 1, 0.
        let mut asked = Vec::new();
        let walked = TryOrder::new(4, 1).dialled(|i| {
            asked.push(i);
            i == 2 || i == 3
        });
        assert_eq!(
            asked,
            [1, 0, 2],
            "asked in the base order, until one accepts"
        );
        assert_eq!(walked.first(), 2);
        assert_eq!(order(walked), [2, 3, 1, 0]);
        // The first site accepts: the base order.
        assert_eq!(order(TryOrder::new(3, 2).dialled(|_| true)), [2, 0, 1]);
        // Only the last accepts: it goes first, the declined follow in their order.
        assert_eq!(order(TryOrder::new(3, 0).dialled(|i| i == 2)), [2, 0, 1]);
        // Nobody accepts: every site declined, so every site moved, in order: the base order.
        assert_eq!(order(TryOrder::new(3, 1).dialled(|_| false)), [1, 0, 2]);

        // A budget of tries counts from the start; the declined sites come after it anyway, so
        // every site the base order would have tried within the budget is tried.
        let tries = |o: TryOrder, budget| o.tries(budget).collect::<Vec<_>>();
        assert_eq!(tries(TryOrder::new(5, 0), 3), [0, 1, 2]);
        assert_eq!(tries(TryOrder::new(5, 0).dialled(|_| true), 3), [0, 1, 2]);
        assert_eq!(tries(TryOrder::new(5, 0).dialled(|_| false), 3), [0, 1, 2]);
        let walked = TryOrder::new(5, 0).dialled(|i| i >= 2);
        assert_eq!(order(walked), [2, 3, 4, 0, 1]);
        assert_eq!(tries(walked, 3), [2, 3, 4, 0, 1]);
        assert_eq!(tries(walked, 1), [2, 0, 1]);
        assert_eq!(tries(TryOrder::new(5, 0).dialled(|i| i == 1), 2), [1, 2, 0]);
        // Past the tried ones: the budget counts only the others, and the declined sites not
        // tried still follow it.
        let past = |o: TryOrder, budget, tried: fn(usize) -> bool| {
            o.tries_past(budget, tried).collect::<Vec<_>>()
        };
        assert_eq!(past(walked, 2, |i| i == 2), [3, 4, 0, 1]);
        assert_eq!(past(walked, 1, |i| i == 2 || i == 0), [3, 1]);
        assert_eq!(past(walked, 0, |i| i == 0), [1]);
        assert_eq!(past(TryOrder::new(4, 0), 2, |i| i == 0), [1, 2]);
    }

    /// A site takes its dial's share of the connections offered to it over any run of
    /// consecutive turns, wherever the run starts (the counter is carried across tables), to
    /// within one connection; the first turn is taken.
    #[test]
    fn dial_turns_take_their_share_over_any_run() {
        for dial in 1u8..100 {
            assert!(
                dial_takes_turn(dial, 0),
                "dial {dial}: the first turn is taken"
            );
            for start in [0u64, 1, 7, 99, 12_345, 1 << 40, u64::MAX - 20_000] {
                for run in [1u64, 2, 3, 7, 10, 33, 100, 101, 1000, 10_007] {
                    let taken = (0..run)
                        .filter(|&k| dial_takes_turn(dial, start + k))
                        .count() as f64;
                    let want = run as f64 * f64::from(dial) / 100.0;
                    assert!(
                        (taken - want).abs() < 1.0,
                        "dial {dial}, turns {start}+{run}: took {taken}, want {want:.2}"
                    );
                }
            }
        }
        assert!((0..1000).all(|t| dial_takes_turn(100, t) && !dial_takes_turn(0, t)));
        assert!(
            (0..1000).all(|t| dial_takes_turn(200, t)),
            "over 100 is 100"
        );
    }

    /// With affinity: a client gets the same answer from a site every time; `dial` percent of
    /// clients are taken; raising a dial keeps every client it took; sites decide independently.
    #[test]
    fn dial_takes_a_stable_share_of_clients() {
        let keys = keys(20_000);
        let (a, b) = (dial_site_key(&nid("syd-1")), dial_site_key(&nid("syd-2")));
        assert_ne!(a, b);
        assert_eq!(a, dial_site_key(&nid("syd-1")));
        for dial in [10u8, 25, 50, 90] {
            let taken = keys
                .iter()
                .filter(|&&k| dial_takes_client(dial, k, a))
                .count();
            let share = taken as f64 / keys.len() as f64;
            assert!(
                (share - f64::from(dial) / 100.0).abs() < 0.02,
                "dial {dial}: {share}"
            );
        }
        for &k in &keys {
            assert_eq!(dial_takes_client(30, k, a), dial_takes_client(30, k, a));
            if dial_takes_client(30, k, a) {
                assert!(
                    dial_takes_client(31, k, a),
                    "raising a dial took a client away"
                );
            }
        }
        assert!(
            keys.iter()
                .all(|&k| dial_takes_client(100, k, a) && !dial_takes_client(0, k, a))
        );
        // Independent of each other and of the rendezvous pick: both 50 %, a quarter take both.
        let both = keys
            .iter()
            .filter(|&&k| dial_takes_client(50, k, a) && dial_takes_client(50, k, b))
            .count() as f64
            / keys.len() as f64;
        assert!((both - 0.25).abs() < 0.02, "{both}");
        let (_, spread) = spread_of(&[1.0, 1.0], &[100, 100]);
        let picked_and_taken = keys
            .iter()
            .filter(|&&k| {
                spread.pick_affine(k) == 0 && dial_takes_client(50, k, dial_site_key(&nid("s0")))
            })
            .count() as f64
            / keys.len() as f64;
        assert!((picked_and_taken - 0.25).abs() < 0.02, "{picked_and_taken}");
    }

    /// What an edge does per connection (the spread's ticket, then the walk with one turn
    /// counter per site), run over many connections, lands on the expected shares.
    #[test]
    fn dealt_and_dialled_connections_land_on_the_expected_shares() {
        let cases: [(&[f64], &[u32], &[u8]); 5] = [
            (&[1.0, 20.0], &[100, 100], &[25, 100]),
            (&[1.0, 20.0, 40.0], &[1, 1, 1], &[30, 50, 100]),
            (&[1.0, 1.5, 20.0], &[100, 100, 100], &[50, 100, 100]),
            (&[1.0, 1.5, 20.0], &[300, 100, 100], &[50, 50, 100]),
            (
                &[1.0, 1.5, 2.0, 30.0],
                &[100, 200, 100, 100],
                &[10, 70, 0, 40],
            ),
        ];
        for (costs, weights, dials) in cases {
            let (ranked, spread) = dialled(costs, weights, dials);
            let want = spread.expected(&ranked);
            let n = 20_000u64;
            let mut turns = vec![0u64; ranked.len()];
            let mut got = vec![0u64; ranked.len()];
            for ticket in 0..n {
                let dealt = spread.pick(ticket);
                let order = TryOrder::new(ranked.len(), dealt).dialled(|i| {
                    turns[i] += 1;
                    dial_takes_turn(ranked[i].dial, turns[i] - 1)
                });
                got[order.first()] += 1;
            }
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                let share = g as f64 / n as f64;
                assert!(
                    (share - w).abs() < 0.01,
                    "dials {dials:?}: site {i} took {share:.4} of first tries, expected {w:.4}"
                );
            }
        }
        // One site, fixed order: its count is within 1 of its dial over any prefix.
        let (ranked, _) = dialled(&[1.0, 20.0], &[1, 1], &[25, 100]);
        let mut turn = 0u64;
        let mut near = 0u64;
        for k in 1..=1000u64 {
            let order = TryOrder::new(2, 0).dialled(|i| {
                let t = turn;
                if i == 0 {
                    turn += 1;
                }
                dial_takes_turn(ranked[i].dial, t)
            });
            near += u64::from(order.first() == 0);
            assert!((near as f64 - k as f64 * 0.25).abs() < 1.0, "{near} of {k}");
        }
    }
}
