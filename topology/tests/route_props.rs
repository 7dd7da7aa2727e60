//! Property tests for route selection on random graphs, against a Bellman-Ford reference.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use topology::builder::{TopologyBuilder, ms};
use topology::route::{Candidate, LiveState, RoutingTable, SiteLoad};
use topology::{AdminState, Graph, Latency, LinkId, NodeId, NodeKind, Topology, route};

#[derive(Debug, Clone)]
struct Case {
    topo: Topology,
    live: LiveState,
}

const FROM: &str = "n00";

fn state() -> impl Strategy<Value = AdminState> {
    prop_oneof![8 => Just(AdminState::Up), 1 => Just(AdminState::Drain), 1 => Just(AdminState::Down)]
}

fn name(i: usize) -> String {
    format!("n{i:02}")
}

fn arb_case() -> impl Strategy<Value = Case> {
    (2usize..12)
        .prop_flat_map(|n| {
            (
                Just(n),
                prop::collection::vec(
                    (
                        any::<bool>(),
                        state(),
                        any::<bool>(),
                        prop::bool::weighted(0.1),
                        prop::bool::weighted(0.25),
                    ),
                    n,
                ),
                prop::collection::vec((0..n, 0..n, 1u64..20, state()), 0..n * 3),
                prop::collection::vec(
                    (
                        prop::bool::weighted(0.1),
                        prop::option::weighted(0.3, 0u64..20),
                    ),
                    n * 3,
                ),
                prop::collection::vec(
                    prop::option::weighted(0.4, (0u32..12, 0u32..12, prop::bool::weighted(0.85))),
                    n,
                ),
            )
        })
        .prop_map(|(_, nodes, links, live_links, loads)| {
            let mut b = TopologyBuilder::new();
            let mut live = LiveState::default();
            b.service("svc").service("other");
            for (i, &(is_site, st, serves, live_down, is_edge)) in nodes.iter().enumerate() {
                // FROM may itself be a site (cost 0 to itself). Other edges are ends, like sites.
                let kind = if is_site {
                    NodeKind::Site
                } else if i == 0 || is_edge {
                    NodeKind::Edge
                } else {
                    NodeKind::Transit
                };
                b.node(&name(i), kind).node_state(&name(i), st);
                if kind == NodeKind::Site {
                    b.serve(&name(i), if serves { "svc" } else { "other" }, 8);
                    if i % 3 == 0 {
                        b.serve(&name(i), if serves { "other" } else { "svc" }, 8);
                    }
                }
                if live_down {
                    live.down_nodes.insert(NodeId::new(name(i)));
                }
                if let Some((active, cap, healthy)) = loads[i] {
                    live.site_load.insert(
                        NodeId::new(name(i)),
                        SiteLoad {
                            active_streams: active,
                            capacity: cap,
                            healthy,
                        },
                    );
                }
            }
            let mut seen = BTreeSet::new();
            for (k, &(a, bb, us, st)) in links.iter().enumerate() {
                if a == bb || !seen.insert((a.min(bb), a.max(bb))) {
                    continue;
                }
                // Whole milliseconds: equal-cost ties are common, which exercises tie-breaking.
                b.link_with(&name(a), &name(bb), Latency::from_micros(us * 1000), st);
                let id = LinkId::new(&NodeId::new(name(a)), &NodeId::new(name(bb)));
                let (down, measured) = live_links[k];
                if down {
                    live.down_links.insert(id.clone());
                }
                if let Some(us) = measured {
                    // 0 is allowed: a measured 0 is clamped to 1ns like in the router.
                    live.link_latency
                        .insert(id, Latency::from_micros(us * 1000));
                }
            }
            Case {
                topo: b.build(),
                live,
            }
        })
}

/// Per-link facts as the reference sees them: (a, b, weight ns, blocked, drained).
fn reference_links(c: &Case) -> Vec<(String, String, u64, bool, bool)> {
    c.topo
        .links
        .iter()
        .map(|l| {
            let id = l.id();
            let w = c
                .live
                .link_latency
                .get(&id)
                .copied()
                .unwrap_or(l.latency)
                .as_nanos()
                .max(1);
            let blocked = l.state == AdminState::Down || c.live.down_links.contains(&id);
            (
                l.a.to_string(),
                l.b.to_string(),
                w,
                blocked,
                l.state == AdminState::Drain,
            )
        })
        .collect()
}

fn node_blocked(c: &Case, id: &str) -> bool {
    c.topo.node(id).is_none_or(|n| n.state == AdminState::Down) || c.live.down_nodes.contains(id)
}

/// Whether a path may continue from `id`: only FROM and transits relay.
fn relays(c: &Case, id: &str) -> bool {
    id == FROM || c.topo.node(id).is_some_and(|n| n.kind == NodeKind::Transit)
}

fn node_drained(c: &Case, id: &str) -> bool {
    c.topo
        .node(id)
        .is_some_and(|n| n.state == AdminState::Drain)
}

/// Bellman-Ford over the lexicographic cost (drained elements, latency ns) from FROM.
fn bellman_ford(c: &Case) -> BTreeMap<String, (u32, u64)> {
    let mut dist: BTreeMap<String, (u32, u64)> = BTreeMap::new();
    if node_blocked(c, FROM) {
        return dist;
    }
    dist.insert(FROM.to_string(), (0, 0));
    let links = reference_links(c);
    for _ in 0..c.topo.nodes.len() {
        let mut changed = false;
        for (a, b, w, blocked, drained) in &links {
            if *blocked {
                continue;
            }
            for (u, v) in [(a, b), (b, a)] {
                if node_blocked(c, v) || !relays(c, u) {
                    continue;
                }
                let Some(&(d, l)) = dist.get(u) else { continue };
                let cand = (
                    d + u32::from(*drained) + u32::from(node_drained(c, v)),
                    l + w,
                );
                if dist.get(v).is_none_or(|cur| cand < *cur) {
                    dist.insert(v.clone(), cand);
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    dist
}

/// Sites reachable from FROM using no drained element at all.
fn reachable_drain_free(c: &Case) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    if node_blocked(c, FROM) {
        return seen;
    }
    seen.insert(FROM.to_string());
    let links = reference_links(c);
    loop {
        let before = seen.len();
        for (a, b, _, blocked, drained) in &links {
            if *blocked || *drained {
                continue;
            }
            for (u, v) in [(a, b), (b, a)] {
                if seen.contains(u) && relays(c, u) && !node_blocked(c, v) && !node_drained(c, v) {
                    seen.insert(v.clone());
                }
            }
        }
        if seen.len() == before {
            return seen;
        }
    }
}

fn candidates(c: &Case, service: &str) -> Vec<Candidate> {
    route(&c.topo, &NodeId::new(FROM), service, &c.live).expect("FROM and the services exist")
}

/// The link between two consecutive path nodes, as the reference sees it.
fn hop<'a>(
    links: &'a [(String, String, u64, bool, bool)],
    u: &str,
    v: &str,
) -> Option<&'a (String, String, u64, bool, bool)> {
    links
        .iter()
        .find(|(a, b, ..)| (a == u && b == v) || (a == v && b == u))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn costs_equal_bellman_ford_reference(c in arb_case()) {
        let dist = bellman_ford(&c);
        for service in ["svc", "other"] {
            let got = candidates(&c, service);
            // Exactly the eligible sites: serving, not down, reachable, healthy and not full.
            let mut expected: Vec<(bool, Latency, String)> = c
                .topo
                .sites_serving(service)
                .filter(|(n, _)| !node_blocked(&c, n.id.as_str()))
                .filter_map(|(n, s)| {
                    let &(d, l) = dist.get(n.id.as_str())?;
                    let penalty = match c.live.site_load.get(&n.id) {
                        None => Latency::ZERO,
                        Some(load) => load.penalty(s.capacity)?,
                    };
                    Some((d > 0, Latency::from_nanos(l).saturating_add(penalty), n.id.to_string()))
                })
                .collect();
            expected.sort();
            let got_keys: Vec<(bool, Latency, String)> =
                got.iter().map(|k| (k.drained, k.cost, k.site.to_string())).collect();
            prop_assert_eq!(&got_keys, &expected);
            for k in &got {
                let (d, l) = dist[k.site.as_str()];
                prop_assert_eq!(k.latency, Latency::from_nanos(l));
                prop_assert_eq!(k.cost, k.latency.saturating_add(k.penalty));
                prop_assert_eq!(k.drained, d > 0);
            }
        }
    }

    #[test]
    fn paths_are_real_and_never_cross_down_nodes_or_links(c in arb_case()) {
        let links = reference_links(&c);
        for service in ["svc", "other"] {
            for k in candidates(&c, service) {
                prop_assert_eq!(k.path.first().map(|n| n.as_str()), Some(FROM));
                prop_assert_eq!(k.path.last(), Some(&k.site));
                let mut sum = 0u64;
                let mut drained = 0u32;
                for n in &k.path {
                    prop_assert!(!node_blocked(&c, n.as_str()), "path {:?} crosses down node {}", k.path, n);
                }
                for n in &k.path[..k.path.len() - 1] {
                    prop_assert!(relays(&c, n.as_str()), "path {:?} relays through {}, not a transit", k.path, n);
                }
                for w in k.path.windows(2) {
                    let l = hop(&links, w[0].as_str(), w[1].as_str());
                    prop_assert!(l.is_some(), "no link {}--{}", w[0], w[1]);
                    let (_, _, ns, blocked, dr) = l.unwrap();
                    prop_assert!(!blocked, "path {:?} crosses down link {}--{}", k.path, w[0], w[1]);
                    sum += ns;
                    drained += u32::from(*dr) + u32::from(node_drained(&c, w[1].as_str()));
                }
                prop_assert_eq!(Latency::from_nanos(sum), k.latency);
                prop_assert_eq!(drained > 0, k.drained);
            }
        }
    }

    #[test]
    fn marking_the_best_site_down_promotes_the_second(c in arb_case()) {
        let before = candidates(&c, "svc");
        prop_assume!(!before.is_empty());
        let best = before[0].site.clone();
        let mut live = c.live.clone();
        live.down_nodes.insert(best.clone());
        let after = route(&c.topo, &NodeId::new(FROM), "svc", &live).unwrap();
        prop_assert!(after.iter().all(|k| k.site != best && !k.path.contains(&best)));
        if before[1..].iter().all(|k| !k.path.contains(&best)) {
            // Nobody else's path went through the removed site: the rest of the ranking stands.
            prop_assert_eq!(&after[..], &before[1..]);
        } else {
            // Otherwise nothing gets better: no path becomes drain-free, and a drain-free path
            // cannot get cheaper. (A drained path's latency can drop when it must cross more
            // drained elements: the search minimises (drained count, latency).)
            for k in &after {
                let old = before.iter().find(|o| o.site == k.site).unwrap();
                prop_assert!(!old.drained || k.drained, "a drained path cannot become drain-free");
                if !k.drained {
                    prop_assert!(k.cost >= old.cost);
                }
            }
        }
    }

    #[test]
    fn same_inputs_same_table_whatever_the_declaration_order(c in arb_case(), seed in any::<u64>()) {
        let graph = Graph::new(&c.topo);
        let from = NodeId::new(FROM);
        let a = RoutingTable::build(&c.topo, &graph, &from, &c.live).unwrap();
        let b = RoutingTable::build(&c.topo, &graph, &from, &c.live).unwrap();
        prop_assert_eq!(&a, &b);
        let mut shuffled = c.topo.clone();
        // A cheap deterministic shuffle: rotate and reverse by the seed.
        let nodes = shuffled.nodes.len();
        shuffled.nodes.rotate_left((seed as usize) % nodes.max(1));
        if seed & 1 == 1 {
            shuffled.links.reverse();
        }
        let links = shuffled.links.len();
        shuffled.links.rotate_left((seed as usize >> 8) % links.max(1));
        let g2 = Graph::new(&shuffled);
        let s = RoutingTable::build(&shuffled, &g2, &from, &c.live).unwrap();
        prop_assert_eq!(&a, &s);
        for (name, cands) in a.services() {
            prop_assert_eq!(cands, &route(&c.topo, &from, name.as_str(), &c.live).unwrap()[..]);
        }
    }

    #[test]
    fn drained_elements_are_used_only_when_no_drain_free_path_exists(c in arb_case()) {
        let free = reachable_drain_free(&c);
        for service in ["svc", "other"] {
            let cands = candidates(&c, service);
            for k in &cands {
                prop_assert_eq!(k.drained, !free.contains(k.site.as_str()),
                    "site {} drained={} but drain-free reachable={}", k.site, k.drained, free.contains(k.site.as_str()));
            }
            // Every drain-free candidate ranks before every drained one.
            let first_drained = cands.iter().position(|k| k.drained).unwrap_or(cands.len());
            prop_assert!(cands[first_drained..].iter().all(|k| k.drained));
        }
    }
}

#[test]
fn reference_sanity_on_a_fixed_graph() {
    // Guards the reference itself: a hand-checked case.
    let t = TopologyBuilder::new()
        .node(FROM, NodeKind::Edge)
        .node("n01", NodeKind::Transit)
        .node("n02", NodeKind::Site)
        .link(FROM, "n01", ms(1.0))
        .link("n01", "n02", ms(2.0))
        .link(FROM, "n02", ms(5.0))
        .service("svc")
        .serve("n02", "svc", 10)
        .build();
    let c = Case {
        topo: t,
        live: LiveState::default(),
    };
    assert_eq!(bellman_ford(&c)["n02"], (0, 3_000_000));
    let k = candidates(&c, "svc");
    assert_eq!(k[0].latency, ms(3.0));
}
