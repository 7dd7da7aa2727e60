//! The routing view of a [`Topology`]: a compact, immutable graph built once per topology
//! version and shared by every routing-table build.
//!
//! Nodes get dense `u32` indices in **sorted id order**, so everything derived from the graph
//! (tie-breaks included) depends only on ids, never on the order of the YAML. Adjacency is
//! CSR: `offsets[i]..offsets[i + 1]` indexes `edges`, each edge carrying its neighbour, the
//! link's position in `Topology::links` and the declared one-way latency. The per-service list
//! of serving sites (already filtered by the service's residency) is precomputed too, so a
//! table build does no string work beyond reading the live state.

use std::collections::{BTreeMap, HashMap};

use crate::model::{AdminState, LinkId, NodeId, NodeKind, Service, ServiceName, Topology};

/// One direction of a link in the adjacency array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edge {
    /// The neighbour's node index.
    pub to: u32,
    /// The link's index (its position in `Topology::links`).
    pub link: u32,
    /// Declared one-way latency in nanoseconds (at least 1).
    pub latency_ns: u64,
}

/// A site that serves a service and is allowed by the service's residency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServingSite {
    pub node: u32,
    /// The declared capacity (concurrent streams) of this service at this site.
    pub capacity: u32,
    /// The service's weight at this site (its share among equally near sites).
    pub weight: u32,
    /// The service's traffic dial at this site, in percent (`SiteService::dial`).
    pub dial: u8,
}

/// The sites that may serve one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSites {
    pub name: ServiceName,
    /// Node indices in ascending order (= ascending id order).
    pub sites: Vec<ServingSite>,
}

/// Compact adjacency over a topology. Build with [`Graph::new`]; it never changes afterwards.
#[derive(Debug, Clone)]
pub struct Graph {
    /// Node index -> id, sorted ascending.
    ids: Vec<NodeId>,
    /// Id -> node index (a hash lookup beats a binary search over 10k strings).
    by_id: IdMap<NodeId, u32>,
    /// Node index -> position in `Topology::nodes`.
    topo_index: Vec<u32>,
    node_state: Vec<AdminState>,
    node_kind: Vec<NodeKind>,
    /// CSR row starts, `ids.len() + 1` entries.
    offsets: Vec<u32>,
    edges: Vec<Edge>,
    /// Parallel to `edges`: drained elements entered by taking the edge (the link, the
    /// neighbour), so the search reads no per-link or per-node state for it.
    edge_drain: Vec<u8>,
    /// Link index -> (end a, end b) as node indices.
    link_ends: Vec<(u32, u32)>,
    link_state: Vec<AdminState>,
    link_latency_ns: Vec<u64>,
    /// For `--down a--b` and live-state lookups.
    link_by_id: IdMap<LinkId, u32>,
    /// Sorted by service name. Services no site may serve still appear, with no sites.
    services: Vec<ServiceSites>,
}

/// The graph's maps from names to indices hash with std's keyed SipHash (a random key per
/// map): the names reach a router from the controller's frames, and the Fx hash used before (a
/// multiply and rotate per 8 bytes, unkeyed and invertible) let names be made to share one hash
/// in ~300 tries each, which made every lookup compare with all of them: 8,000 such names took
/// 114 ms to index instead of 1 ms, growing with the square of their number. SipHash costs a
/// few percent of a graph's build (`cargo bench -p tasman-topology --bench route`).
type IdMap<K, V> = HashMap<K, V>;

/// Latencies are kept in nanoseconds, clamped to 1 ns .. [`Latency::MAX`] (60 s): a zero-weight
/// edge would make equal-cost tie-breaking ambiguous (see `route`), and a measured 0 is a
/// measurement artefact. The ceiling is the most a topology may declare; a topology or a live
/// state read from the wire can hold any latency up to `u64::MAX` ns, and a path's cost that
/// reached the search key's ceiling (2^56 ns) added nothing per link, which made two transits
/// each other's predecessor. Capped, a path of fewer than 1.2 million links stays under it.
///
/// [`Latency::MAX`]: crate::units::Latency::MAX
pub(crate) fn weight_ns(l: crate::units::Latency) -> u64 {
    l.min(crate::units::Latency::MAX).as_nanos().max(1)
}

impl Graph {
    /// Builds the graph. The topology is expected to be validated (unique ids, links between
    /// known nodes); a link naming an unknown node is skipped rather than trusted, and of two
    /// nodes with the same id the first wins.
    pub fn new(topo: &Topology) -> Graph {
        let mut order: Vec<u32> = (0..topo.nodes.len() as u32).collect();
        order.sort_by(|&a, &b| {
            topo.nodes[a as usize]
                .id
                .cmp(&topo.nodes[b as usize].id)
                .then(a.cmp(&b))
        });
        order.dedup_by(|b, a| topo.nodes[*a as usize].id == topo.nodes[*b as usize].id);

        let ids: Vec<NodeId> = order
            .iter()
            .map(|&i| topo.nodes[i as usize].id.clone())
            .collect();
        let by_id: IdMap<NodeId, u32> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i as u32))
            .collect();
        let node_state = order
            .iter()
            .map(|&i| topo.nodes[i as usize].state)
            .collect();
        let node_kind = order.iter().map(|&i| topo.nodes[i as usize].kind).collect();
        let lookup = |id: &NodeId| by_id.get(id).copied();

        let mut link_ends = Vec::with_capacity(topo.links.len());
        let mut link_state = Vec::with_capacity(topo.links.len());
        let mut link_latency_ns = Vec::with_capacity(topo.links.len());
        let mut link_by_id = IdMap::with_capacity(topo.links.len());
        let mut degree = vec![0u32; ids.len() + 1];
        for (li, link) in topo.links.iter().enumerate() {
            let ends = match (lookup(&link.a), lookup(&link.b)) {
                (Some(a), Some(b)) if a != b => Some((a, b)),
                _ => None,
            };
            // Keep link indices aligned with `Topology::links` even for skipped links.
            link_ends.push(ends.unwrap_or((u32::MAX, u32::MAX)));
            link_state.push(if ends.is_some() {
                link.state
            } else {
                AdminState::Down
            });
            link_latency_ns.push(weight_ns(link.latency));
            if let Some((a, b)) = ends {
                degree[a as usize] += 1;
                degree[b as usize] += 1;
                // First of duplicated links wins, as everywhere else.
                link_by_id.entry(link.id()).or_insert(li as u32);
            }
        }

        let mut offsets = Vec::with_capacity(ids.len() + 1);
        let mut acc = 0u32;
        for d in &degree[..ids.len()] {
            offsets.push(acc);
            acc += d;
        }
        offsets.push(acc);
        let mut fill: Vec<u32> = offsets[..ids.len()].to_vec();
        let mut edges = vec![
            Edge {
                to: 0,
                link: 0,
                latency_ns: 0
            };
            acc as usize
        ];
        for (li, &(a, b)) in link_ends.iter().enumerate() {
            if a == u32::MAX {
                continue;
            }
            let latency_ns = link_latency_ns[li];
            for (from, to) in [(a, b), (b, a)] {
                edges[fill[from as usize] as usize] = Edge {
                    to,
                    link: li as u32,
                    latency_ns,
                };
                fill[from as usize] += 1;
            }
        }
        // Neighbours in index order: relaxation order (and so every tie) depends on ids only.
        for i in 0..ids.len() {
            edges[offsets[i] as usize..offsets[i + 1] as usize].sort_by_key(|e| (e.to, e.link));
        }
        let edge_drain = edges
            .iter()
            .map(|e| {
                drained_entered(
                    link_state[e.link as usize],
                    topo.nodes[order[e.to as usize] as usize].state,
                )
            })
            .collect();

        // Each service by name, with its sites: one lookup per serves entry (`Topology::service`
        // was a scan of the services for each, 10,000 services on thousands of sites). The
        // first of a name wins, as it did there (an unvalidated topology may repeat one).
        let mut services: BTreeMap<&str, (&Service, Vec<ServingSite>)> = BTreeMap::new();
        for s in &topo.services {
            services.entry(s.name.as_str()).or_insert((s, Vec::new()));
        }
        for (gi, &ti) in order.iter().enumerate() {
            let node = &topo.nodes[ti as usize];
            if node.kind != NodeKind::Site {
                continue;
            }
            for served in &node.serves {
                let Some((svc, list)) = services.get_mut(served.service.as_str()) else {
                    continue;
                };
                if !svc.residency.allows(node) {
                    continue;
                }
                if list.last().is_none_or(|s| s.node != gi as u32) {
                    list.push(ServingSite {
                        node: gi as u32,
                        capacity: served.capacity,
                        weight: served.weight,
                        dial: served.dial,
                    });
                }
            }
        }
        let services = services
            .into_iter()
            .map(|(name, (_, sites))| ServiceSites {
                name: ServiceName::new(name),
                sites,
            })
            .collect();

        Graph {
            ids,
            by_id,
            topo_index: order,
            node_state,
            node_kind,
            offsets,
            edges,
            edge_drain,
            link_ends,
            link_state,
            link_latency_ns,
            link_by_id,
            services,
        }
    }

    pub fn node_count(&self) -> usize {
        self.ids.len()
    }

    /// Number of links, including any skipped because they named an unknown node.
    pub fn link_count(&self) -> usize {
        self.link_ends.len()
    }

    /// The dense index of a node id.
    pub fn index(&self, id: &str) -> Option<u32> {
        self.by_id.get(id).copied()
    }

    /// The id of a node index. Panics on an index not from this graph (a programming error).
    pub fn id(&self, index: u32) -> &NodeId {
        &self.ids[index as usize]
    }

    /// All node ids, sorted (index order).
    pub fn ids(&self) -> &[NodeId] {
        &self.ids
    }

    /// The node's position in `Topology::nodes`.
    pub fn topology_position(&self, index: u32) -> usize {
        self.topo_index[index as usize] as usize
    }

    pub fn node_state(&self, index: u32) -> AdminState {
        self.node_state[index as usize]
    }

    pub fn node_kind(&self, index: u32) -> NodeKind {
        self.node_kind[index as usize]
    }

    /// The edges leaving a node, in neighbour index order.
    pub fn neighbours(&self, index: u32) -> &[Edge] {
        let i = index as usize;
        &self.edges[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }

    /// The number of drained elements (0..=2: the link, the neighbour) entered by each edge of
    /// [`Graph::neighbours`]`(index)`, in the same order.
    pub fn neighbour_drain(&self, index: u32) -> &[u8] {
        let i = index as usize;
        &self.edge_drain[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }

    /// The drained elements (0..=2) entered by taking `link` to node `to`: the one rule
    /// [`Graph::neighbour_drain`] holds for each edge, for a caller that has the link's index.
    pub fn drain_entering(&self, link: u32, to: u32) -> u8 {
        drained_entered(self.link_state(link), self.node_state(to))
    }

    /// The link index of `a--b` (either order).
    pub fn link_index(&self, id: &LinkId) -> Option<u32> {
        self.link_by_id.get(id).copied()
    }

    /// The two ends of a link, or `None` if it was skipped (unknown end).
    pub fn link_ends(&self, link: u32) -> Option<(u32, u32)> {
        self.link_ends
            .get(link as usize)
            .copied()
            .filter(|(a, _)| *a != u32::MAX)
    }

    pub fn link_state(&self, link: u32) -> AdminState {
        self.link_state[link as usize]
    }

    /// Declared one-way latency of a link, in nanoseconds.
    pub fn link_latency_ns(&self, link: u32) -> u64 {
        self.link_latency_ns[link as usize]
    }

    /// All link ids, sorted, as accepted by `--down` (for messages; allocates).
    pub fn link_ids(&self) -> Vec<&LinkId> {
        let mut ids: Vec<&LinkId> = self.link_by_id.keys().collect();
        ids.sort();
        ids
    }

    /// Services, sorted by name, each with the sites that may serve it.
    pub fn services(&self) -> &[ServiceSites] {
        &self.services
    }

    pub fn service(&self, name: &str) -> Option<&ServiceSites> {
        self.services
            .binary_search_by(|s| s.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.services[i])
    }
}

/// How many drained elements a step enters: the link, and the node it leads to.
fn drained_entered(link: AdminState, to: AdminState) -> u8 {
    u8::from(link == AdminState::Drain) + u8::from(to == AdminState::Drain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;
    use std::hash::{BuildHasherDefault, Hasher};

    /// The Fx hash (rustc's), which the graph's maps used before: unkeyed.
    #[derive(Default, Clone, Copy)]
    struct FxHasher(u64);

    impl FxHasher {
        fn add(&mut self, word: u64) {
            self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }

    impl Hasher for FxHasher {
        fn write(&mut self, bytes: &[u8]) {
            let mut chunks = bytes.chunks_exact(8);
            for c in &mut chunks {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                self.add(u64::from_le_bytes(w));
            }
            let rest = chunks.remainder();
            if !rest.is_empty() {
                let mut w = [0u8; 8];
                w[..rest.len()].copy_from_slice(rest);
                self.add(u64::from_le_bytes(w));
            }
        }
        fn write_u8(&mut self, i: u8) {
            self.add(u64::from(i));
        }
        fn write_usize(&mut self, i: usize) {
            self.add(i as u64);
        }
        fn finish(&self) -> u64 {
            self.0
        }
    }

    /// `n` distinct 24-byte printable ASCII ids with one and the same Fx hash: the Fx step is invertible,
    /// so the third word of each is solved for from the first two.
    fn fx_colliding_ids(n: usize) -> Vec<NodeId> {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let add = |h: u64, w: u64| (h.rotate_left(5) ^ w).wrapping_mul(K);
        // K's inverse modulo 2^64 (Newton's iteration).
        let mut k_inv = K;
        for _ in 0..6 {
            k_inv = k_inv.wrapping_mul(2u64.wrapping_sub(K.wrapping_mul(k_inv)));
        }
        let target = 0x0123_4567_89ab_cdef_u64;
        let w1 = u64::from_le_bytes(*b"node-id-");
        let mut out = Vec::with_capacity(n);
        let mut c = 0u64;
        while out.len() < n {
            c += 1;
            let mut w2 = [0u8; 8];
            let mut x = c;
            for b in &mut w2 {
                *b = b'a' + (x % 26) as u8;
                x /= 26;
            }
            let h2 = add(add(0, w1), u64::from_le_bytes(w2));
            let w3 = (target.wrapping_mul(k_inv) ^ h2.rotate_left(5)).to_le_bytes();
            if w3.iter().all(|b| b.is_ascii_graphic()) {
                let id: Vec<u8> = [w1.to_le_bytes(), w2, w3].concat();
                out.push(NodeId::new(std::str::from_utf8(&id).unwrap()));
            }
        }
        out
    }

    /// Node names reach a router from the controller's frames, not only from an operator's
    /// file: names made to share one hash must not share one hash in the graph's maps, or
    /// every lookup compares with all of them (50,000 such names took seconds to index, and
    /// links named by them minutes, on the control task of every router).
    #[test]
    fn names_made_to_collide_do_not_collide_in_the_graph() {
        let ids = fx_colliding_ids(200);
        let fx = BuildHasherDefault::<FxHasher>::default();
        let unkeyed: std::collections::HashSet<u64> = ids.iter().map(|i| fx.hash_one(i)).collect();
        assert_eq!(
            unkeyed.len(),
            1,
            "the names collide under an unkeyed Fx hash"
        );
        let mut b = crate::builder::TopologyBuilder::new();
        for id in &ids {
            b.node(id.as_str(), NodeKind::Transit);
        }
        let g = Graph::new(&b.build());
        assert_eq!(g.node_count(), ids.len());
        let keyed: std::collections::HashSet<u64> =
            ids.iter().map(|i| g.by_id.hasher().hash_one(i)).collect();
        assert!(keyed.len() > 190, "{} distinct hashes of 200", keyed.len());
    }
    use crate::builder::{TopologyBuilder, ms};

    #[test]
    fn indices_follow_sorted_ids_and_adjacency_is_symmetric() {
        let t = TopologyBuilder::new()
            .node("c", NodeKind::Edge)
            .node("a", NodeKind::Site)
            .node("b", NodeKind::Transit)
            .link("c", "b", ms(5.0))
            .link("b", "a", ms(7.0))
            .build();
        let g = Graph::new(&t);
        assert_eq!(
            g.ids().iter().map(|i| i.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(g.index("c"), Some(2));
        assert_eq!(g.index("zz"), None);
        assert_eq!(g.topology_position(0), 1);
        let b = g.index("b").unwrap();
        let n: Vec<_> = g
            .neighbours(b)
            .iter()
            .map(|e| (g.id(e.to).as_str(), e.latency_ns))
            .collect();
        assert_eq!(n, [("a", 7_000_000), ("c", 5_000_000)]);
        assert_eq!(g.neighbours(0).len(), 1);
        let l = g.link_index(&LinkId::parse("a--b").unwrap()).unwrap();
        assert_eq!(l, 1);
        assert_eq!(g.link_index(&LinkId::parse("b--a").unwrap()), Some(1));
        assert_eq!(g.link_index(&LinkId::parse("a--c").unwrap()), None);
    }

    #[test]
    fn links_to_unknown_nodes_are_skipped_not_trusted() {
        let t = TopologyBuilder::new()
            .node("a", NodeKind::Edge)
            .node("b", NodeKind::Site)
            .link("a", "ghost", ms(1.0))
            .link("a", "b", ms(2.0))
            .build();
        let g = Graph::new(&t);
        assert_eq!(g.link_count(), 2);
        assert_eq!(g.link_ends(0), None);
        assert_eq!(g.link_ends(1), Some((0, 1)));
        assert_eq!(g.neighbours(0).len(), 1);
    }
}
