//! Property tests of circuit placement and VIP allocation over random create/delete sequences.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use proptest::prelude::*;
use topology::circuit::{
    BEnd, CircuitId, PlacementError, PlacementRequest, PoolError, Reservation, Shortfall,
    allocate_vip, headroom, place,
};
use topology::*;

fn node(id: &str, kind: NodeKind) -> Node {
    Node {
        id: NodeId::new(id),
        kind,
        region: Region::new("au-east"),
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

const LINKS: [(&str, &str); 9] = [
    ("e1", "t1"),
    ("e1", "t2"),
    ("e2", "t2"),
    ("e2", "t3"),
    ("t1", "t2"),
    ("t2", "t3"),
    ("t1", "s1"),
    ("t2", "s2"),
    ("t3", "s3"),
];

/// Two edges, three transits, three sites; capacities (in units of 100 Mbit/s) and latencies
/// chosen by proptest.
fn topo(caps: &[u64], lat: &[u64], pool: &str) -> Topology {
    let mut nodes = vec![node("e1", NodeKind::Edge), node("e2", NodeKind::Edge)];
    for t in ["t1", "t2", "t3"] {
        nodes.push(node(t, NodeKind::Transit));
    }
    for s in ["s1", "s2", "s3"] {
        nodes.push(node(s, NodeKind::Site));
    }
    let links = LINKS
        .iter()
        .enumerate()
        .map(|(i, (a, b))| Link {
            a: NodeId::new(a),
            b: NodeId::new(b),
            latency: Latency::from_micros(lat[i] * 100),
            capacity: Bandwidth::from_mbps(caps[i] * 100),
            state: AdminState::Up,
        })
        .collect();
    Topology {
        nodes,
        links,
        services: vec![Service {
            name: ServiceName::new("llm"),
            port: Some(1),
            vips: vec![],
            clients: vec![],
            residency: Residency::default(),
            requires_circuit: true,
            affinity: Default::default(),
        }],
        pools: vec![Pool {
            name: PoolName::new("p"),
            prefix: pool.parse().unwrap(),
        }],
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Create from edge e1 (false) or e2 (true) at rate n x 50 Mbit/s.
    Create(bool, u64),
    /// Delete the live circuit at this index (mod the number live).
    Delete(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<bool>(), 1u64..12).prop_map(|(e, r)| Op::Create(e, r)),
        2 => (0usize..64).prop_map(Op::Delete),
    ]
}

struct Live {
    vip: IpAddr,
    res: Reservation,
}

fn request(e2: bool, r: u64) -> PlacementRequest {
    PlacementRequest {
        edge: NodeId::new(if e2 { "e2" } else { "e1" }),
        b_end: BEnd::service("llm"),
        rate: Bandwidth::from_mbps(r * 50),
    }
}

fn reservations(live: &BTreeMap<u64, Live>) -> Vec<Reservation> {
    live.values().map(|l| l.res.clone()).collect()
}

/// Every simple path from `edge` to a site relayed by transits only, found by walking
/// [`LINKS`]: an oracle of its own, not `place`'s view of the graph.
fn simple_paths(edge: &str) -> Vec<Vec<&'static str>> {
    fn walk(path: &mut Vec<&'static str>, out: &mut Vec<Vec<&'static str>>) {
        let at = *path.last().unwrap();
        for (a, b) in LINKS {
            let next = if a == at {
                b
            } else if b == at {
                a
            } else {
                continue;
            };
            if path.contains(&next) || next.starts_with('e') {
                continue;
            }
            path.push(next);
            if next.starts_with('s') {
                out.push(path.clone());
            } else {
                walk(path, out);
            }
            path.pop();
        }
    }
    let edge = LINKS
        .iter()
        .flat_map(|(a, b)| [*a, *b])
        .find(|n| *n == edge)
        .unwrap();
    let mut out = Vec::new();
    walk(&mut vec![edge], &mut out);
    out
}

/// Whether `rate` fits on every link of `path` beside the reservations `rs`, by a ledger summed
/// here (capacity less the rates of the reservations crossing each link).
fn room_on(t: &Topology, rs: &[Reservation], path: &[&str], rate: Bandwidth) -> bool {
    path.windows(2).all(|w| {
        let crosses = |p: &[NodeId]| {
            p.windows(2).any(|x| {
                (x[0].as_str(), x[1].as_str()) == (w[0], w[1])
                    || (x[0].as_str(), x[1].as_str()) == (w[1], w[0])
            })
        };
        let held: u64 = rs
            .iter()
            .filter(|r| crosses(&r.path))
            .map(|r| r.rate.bps())
            .sum();
        let cap = t
            .links
            .iter()
            .find(|l| {
                (l.a.as_str(), l.b.as_str()) == (w[0], w[1])
                    || (l.a.as_str(), l.b.as_str()) == (w[1], w[0])
            })
            .unwrap()
            .capacity
            .bps();
        cap.saturating_sub(held) >= rate.bps()
    })
}

/// Runs the ops as the controller would: place, allocate a VIP, record both; delete releases both.
fn run(t: &Topology, ops: &[Op]) -> BTreeMap<u64, Live> {
    let mut live: BTreeMap<u64, Live> = BTreeMap::new();
    let mut next = 0u64;
    for op in ops {
        match op {
            Op::Create(e, r) => {
                let rs = reservations(&live);
                let req = request(*e, *r);
                // A refusal is allowed only for the reason it gives, and only when it is true:
                // a placement that refused everything, or a pool that ran dry early, fails here.
                // Whether some path has room, by a ledger of this test's own (the shortfall's
                // numbers are `place`'s: a view of the graph hiding a path would agree with them).
                let fits = simple_paths(req.edge.as_str())
                    .iter()
                    .any(|p| room_on(t, &rs, p, req.rate));
                let p = match place(t, &rs, &req) {
                    Ok(p) => p,
                    Err(PlacementError::InsufficientCapacity(s)) => {
                        assert!(s.free < req.rate && s.max_available < req.rate, "{s}");
                        assert!(!fits, "refused ({s}) though a path has room");
                        continue;
                    }
                    Err(PlacementError::ExceedsCapacity { capacity, .. }) => {
                        assert!(capacity < req.rate, "refused {} under {capacity}", req.rate);
                        assert!(!fits, "refused under {capacity} though a path has room");
                        continue;
                    }
                    Err(e) => panic!("unexpected refusal: {e}"),
                };
                let path: Vec<&str> = p.path.iter().map(NodeId::as_str).collect();
                assert!(
                    room_on(t, &rs, &path, req.rate),
                    "placed on {path:?} without room"
                );
                let used: BTreeSet<IpAddr> = live.values().map(|l| l.vip).collect();
                let vip = match allocate_vip(t, None, t.pools[0].prefix, &used) {
                    Ok((_, vip)) => vip,
                    Err(PoolError::Exhausted { usable, .. }) => {
                        assert_eq!(usable, used.len() as u128, "pool called full too early");
                        continue;
                    }
                    Err(e) => panic!("unexpected pool refusal: {e}"),
                };
                assert!(t.pools[0].prefix.contains(vip), "{vip} outside the pool");
                next += 1;
                let id = CircuitId::new(format!("c{next}"));
                live.insert(
                    next,
                    Live {
                        vip,
                        res: Reservation {
                            circuit: id,
                            path: p.path,
                            rate: request(*e, *r).rate,
                        },
                    },
                );
            }
            Op::Delete(i) => {
                if let Some(k) = live.keys().nth(i % live.len().max(1)).copied() {
                    live.remove(&k);
                }
            }
        }
        // Invariants after every step.
        let vips: BTreeSet<IpAddr> = live.values().map(|l| l.vip).collect();
        assert_eq!(vips.len(), live.len(), "a VIP was allocated twice");
        for (link, h) in headroom(t, &reservations(&live)) {
            assert!(
                h.reserved <= h.capacity,
                "link {link} over-committed: {} > {}",
                h.reserved,
                h.capacity
            );
        }
    }
    live
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_vip_allocated_twice_and_no_link_over_committed(
        caps in proptest::collection::vec(1u64..20, 9),
        lat in proptest::collection::vec(1u64..50, 9),
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        // A /28 has 14 usable addresses: sequences exhaust and reuse it.
        run(&topo(&caps, &lat, "10.1.0.0/28"), &ops);
    }

    #[test]
    fn vips_never_repeat_in_a_tiny_v6_pool(
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        run(&topo(&[100; 9], &[1; 9], "fd00::/125"), &ops);
    }

    #[test]
    fn a_refused_circuit_fits_after_enough_others_are_deleted(
        caps in proptest::collection::vec(1u64..20, 9),
        lat in proptest::collection::vec(1u64..50, 9),
        ops in proptest::collection::vec(op(), 1..60),
        e2 in any::<bool>(),
        r in 1u64..12,
    ) {
        let t = topo(&caps, &lat, "10.2.0.0/16");
        let mut live = run(&t, &ops);
        let req = request(e2, r);
        match place(&t, &reservations(&live), &req) {
            Ok(p) => {
                // Whatever was placed fits on every link of its path.
                let h = headroom(&t, &reservations(&live));
                for l in p.links() {
                    prop_assert!(h[&l].free >= req.rate);
                }
            }
            Err(PlacementError::InsufficientCapacity(s)) => {
                let Shortfall { bottleneck, free, max_available, .. } = *s;
                prop_assert!(free < req.rate);
                prop_assert!(max_available < req.rate);
                prop_assert!(t.link(&bottleneck).is_some());
                // Delete circuits one by one (oldest first): it must fit at the latest when none is left.
                let mut fitted = false;
                while let Some(k) = live.keys().next().copied() {
                    live.remove(&k);
                    if place(&t, &reservations(&live), &req).is_ok() {
                        fitted = true;
                        break;
                    }
                }
                prop_assert!(fitted, "still refused with no other circuit left");
            }
            Err(PlacementError::ExceedsCapacity { capacity, .. }) => {
                // Refused even on an empty fabric: it never fits.
                prop_assert!(capacity < req.rate);
                prop_assert!(place(&t, &[], &req).is_err());
            }
            Err(e) => prop_assert!(false, "unexpected refusal: {e}"),
        }
    }
}
