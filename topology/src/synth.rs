//! Deterministic synthetic topologies for benchmarks and property tests: a connected graph of
//! edges, transits and sites with services, as a [`Topology`] and as format-v1 YAML.
//!
//! ```
//! let t = topology::synth::topology(&topology::synth::Params { nodes: 200, links: 1_000, ..Default::default() });
//! let text = topology::to_yaml(&t);
//! assert_eq!(topology::load(&text).unwrap().topology, t);
//! ```

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::model::*;
use crate::units::{Bandwidth, Latency};

/// What to generate. Same parameters, same topology.
#[derive(Debug, Clone)]
pub struct Params {
    pub nodes: usize,
    /// Total links, at least `nodes - 1` (the spanning tree that keeps the graph connected).
    pub links: usize,
    pub services: usize,
    /// One node in `site_every` is a site, one in `transit_every` a transit; the rest are edges.
    pub site_every: usize,
    pub transit_every: usize,
    pub seed: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            nodes: 10_000,
            links: 50_000,
            services: 8,
            site_every: 20,
            transit_every: 5,
            seed: 1,
        }
    }
}

/// splitmix64: tiny, fast and good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

fn ip(base: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(base, (i >> 16) as u8, (i >> 8) as u8, i as u8)
}

/// The node id of the `i`th synthetic node, e.g. `n42-edge`.
pub fn node_id(i: usize, kind: NodeKind) -> NodeId {
    NodeId::new(format!("n{i}-{kind}"))
}

/// A connected synthetic topology: a spanning set of links through the transits (below), then
/// random extra links (no self-links, no duplicates) up to `links`. Latencies 100us..20ms.
pub fn topology(p: &Params) -> Topology {
    let mut rng = Rng::new(p.seed);
    let n = p.nodes.max(2);
    let services: Vec<Service> = (0..p.services.max(1))
        .map(|s| Service {
            name: ServiceName::new(format!("svc-{s}")),
            port: Some(8000 + s as u16),
            vips: vec![Vip {
                prefix: IpAddr::V4(Ipv4Addr::new(198, 18, 0, s as u8)).into(),
                port: 443,
            }],
            clients: Vec::new(),
            residency: Residency::default(),
            requires_circuit: false,
            affinity: Affinity::None,
        })
        .collect();
    let kind_of = |i: usize| {
        if i.is_multiple_of(p.site_every.max(2)) {
            NodeKind::Site
        } else if i.is_multiple_of(p.transit_every.max(2)) {
            NodeKind::Transit
        } else {
            NodeKind::Edge
        }
    };
    let mut nodes: Vec<Node> = (0..n)
        .map(|i| {
            let kind = kind_of(i);
            Node {
                id: node_id(i, kind),
                kind,
                region: Region::new(format!("region-{}", i % 16)),
                country: CountryCode::parse(["AU", "NZ", "SG", "JP", "IN", "US"][i % 6])
                    .unwrap_or_else(|| unreachable!()),
                location: Location {
                    lat: (rng.below(17_000) as f64) / 100.0 - 85.0,
                    lon: (rng.below(35_000) as f64) / 100.0 - 175.0,
                },
                address: SocketAddr::new(IpAddr::V4(ip(10, i)), 7000),
                state: AdminState::Up,
                client_address: (kind == NodeKind::Edge).then(|| IpAddr::V4(ip(100, i))),
                transparent_port: None,
                serves: Vec::new(),
            }
        })
        .collect();
    // Every service has at least one site (node 0 is a site), most sites serve a few.
    for (i, node) in nodes.iter_mut().enumerate() {
        if node.kind != NodeKind::Site {
            continue;
        }
        for (s, svc) in services.iter().enumerate() {
            if i == 0 || rng.below(3) == 0 || (s + i) % services.len() == 0 {
                node.serves.push(SiteService {
                    service: svc.name.clone(),
                    backend: SocketAddr::new(IpAddr::V4(ip(11, i)), 9000 + s as u16),
                    capacity: 64 + rng.below(512) as u32,
                    weight: 100,
                    dial: 100,
                    health_check: None,
                    health: Default::default(),
                });
            }
        }
    }
    let mut seen: HashSet<(usize, usize)> = HashSet::with_capacity(p.links);
    let mut links = Vec::with_capacity(p.links.max(n - 1));
    let mut push = |a: usize, b: usize, rng: &mut Rng, links: &mut Vec<Link>| {
        let key = (a.min(b), a.max(b));
        if a == b || !seen.insert(key) {
            return false;
        }
        links.push(Link {
            a: nodes[a].id.clone(),
            b: nodes[b].id.clone(),
            latency: Latency::from_micros(100 + rng.below(19_900) as u64),
            capacity: Bandwidth::from_mbps([1_000, 10_000, 100_000][rng.below(3)]),
            state: AdminState::Up,
        });
        true
    };
    // Spanning links that keep every site reachable from every edge under the routing rule
    // that only transits relay: each transit links to an earlier transit (the first one is the
    // root), every edge and site to a transit earlier than it (or the root). Without transits,
    // each node links to a random earlier one.
    let transits: Vec<usize> = (0..n)
        .filter(|&i| nodes[i].kind == NodeKind::Transit)
        .collect();
    match transits.first() {
        Some(&root) => {
            for i in (0..n).filter(|&i| i != root) {
                let earlier = transits.partition_point(|&t| t < i);
                let j = if earlier == 0 {
                    root
                } else {
                    transits[rng.below(earlier)]
                };
                push(i, j, &mut rng, &mut links);
            }
        }
        None => {
            for i in 1..n {
                let j = rng.below(i);
                push(i, j, &mut rng, &mut links);
            }
        }
    }
    // Extra links never join two edges or two sites: no path could use them (only transits
    // relay), and validation warns about them.
    let count = |k: NodeKind| nodes.iter().filter(|x| x.kind == k).count();
    let (edges, sites) = (count(NodeKind::Edge), count(NodeKind::Site));
    let pairs = |k: usize| k * k.saturating_sub(1) / 2;
    let max_links = pairs(n) - pairs(edges) - pairs(sites);
    while links.len() < p.links.min(max_links) {
        let (a, b) = (rng.below(n), rng.below(n));
        if nodes[a].kind == nodes[b].kind && nodes[a].kind != NodeKind::Transit {
            continue;
        }
        push(a, b, &mut rng, &mut links);
    }
    Topology {
        nodes,
        links,
        services,
        pools: Vec::new(),
    }
}

/// The YAML text of [`topology`], as an operator would write it.
pub fn yaml(p: &Params) -> String {
    crate::yaml::to_yaml(&topology(p))
}
