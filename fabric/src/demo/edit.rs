//! The demo's live edit: which link's declared latency to raise so that an edge's path changes,
//! and the operator's YAML text with that one value changed.

use topology::route::Hysteresis;
use topology::{Graph, Latency, LinkId, LiveState, NodeId, RoutingTable, Topology};

/// An edge's current choice for a service, as its routing table has it, with the live state
/// the table was built from.
#[derive(Debug, Clone)]
pub struct EdgeChoice {
    pub edge: NodeId,
    pub live: LiveState,
    pub site: NodeId,
    pub path: Vec<NodeId>,
}

/// Raise `link` from `from` to `to`: `edge` then reaches `service` at `after` instead of
/// `before` (predicted with the router's own rules: declared latency as the floor of measured
/// weights, and the anti-flap hysteresis against the incumbent site).
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyEdit {
    pub edge: NodeId,
    pub service: String,
    pub link: LinkId,
    pub from: Latency,
    pub to: Latency,
    pub before: (NodeId, Vec<NodeId>),
    pub after: (NodeId, Vec<NodeId>),
}

/// `topo` with `link`'s declared latency set to `latency` (None if there is no such link).
pub fn with_latency(topo: &Topology, link: &LinkId, latency: Latency) -> Option<Topology> {
    let mut t = topo.clone();
    let l = t.links.iter_mut().find(|l| &l.id() == link)?;
    l.latency = latency;
    Some(t)
}

/// What `edge` would use for `service` on `topo`, with `incumbent` as its current site.
fn predict(
    topo: &Topology,
    choice: &EdgeChoice,
    service: &str,
    hysteresis: Hysteresis,
) -> Option<(NodeId, Vec<NodeId>)> {
    let graph = Graph::new(topo);
    let table = RoutingTable::build(topo, &graph, &choice.edge, &choice.live.floored(topo)).ok()?;
    hysteresis
        .select(Some(&choice.site), table.candidates(service))
        .map(|c| (c.site.clone(), c.path.clone()))
}

/// Rounds up to a value an operator would type: whole ms, and multiples of 5 ms above 20 ms.
fn round_up(ms: u64) -> u64 {
    if ms <= 20 { ms } else { ms.div_ceil(5) * 5 }
}

/// Over `choices` (tried in order) and every link on each current path, the smallest raise,
/// relative to the link's latency, that moves the edge to another path under the router's
/// rules, with a margin (25 %, at least 2 ms). None when no raise up to 20× (or 1 s) changes any path.
pub fn choose_latency_edit(
    topo: &Topology,
    service: &str,
    choices: &[EdgeChoice],
    hysteresis: Hysteresis,
) -> Option<LatencyEdit> {
    let mut best: Option<(f64, LatencyEdit)> = None;
    for c in choices {
        let moves = |link: &LinkId, ms: u64| -> Option<(NodeId, Vec<NodeId>)> {
            let t = with_latency(topo, link, Latency::from_micros(ms * 1000))?;
            predict(&t, c, service, hysteresis).filter(|(_, path)| *path != c.path)
        };
        for hop in c.path.windows(2) {
            let link = LinkId::new(&hop[0], &hop[1]);
            let Some(from) = topo.link(&link).map(|l| l.latency) else {
                continue;
            };
            let from_ms = from.as_millis_f64();
            let (mut lo, mut hi) = (
                from_ms.floor() as u64 + 1,
                ((from_ms * 20.0) as u64).max(1000),
            );
            if moves(&link, hi).is_none() {
                continue;
            }
            // The smallest whole-ms latency that moves the path (more latency never moves it back).
            while lo < hi {
                let mid = (lo + hi) / 2;
                if moves(&link, mid).is_some() {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            // A margin over measurement noise: a quarter, at least 2 ms.
            let to_ms = round_up(hi + hi.div_ceil(4).max(2));
            let Some(after) = moves(&link, to_ms) else {
                continue;
            };
            let ratio = to_ms as f64 / from_ms.max(0.001);
            if best.as_ref().is_none_or(|(r, _)| ratio < *r) {
                best = Some((
                    ratio,
                    LatencyEdit {
                        edge: c.edge.clone(),
                        service: service.to_string(),
                        link,
                        from,
                        to: Latency::from_micros(to_ms * 1000),
                        before: (c.site.clone(), c.path.clone()),
                        after,
                    },
                ));
            }
        }
    }
    best.map(|(_, e)| e)
}

/// `text` with the declared latency of `link` set to `latency`, changing only that value when
/// the link is written in flow style on one line (`- {a: X, b: Y, latency: 52ms, ...}`), so the
/// operator's comments and layout survive; else the whole topology re-rendered
/// ([`topology::to_yaml`], comments lost). Either way the result loads to exactly `topo` with
/// that one change. The bool says whether the text was kept.
pub fn set_link_latency(
    text: &str,
    topo: &Topology,
    link: &LinkId,
    latency: Latency,
) -> Option<(String, bool)> {
    let want = with_latency(topo, link, latency)?;
    let value = latency.to_string();
    let (a, b) = (link.0.as_str(), link.1.as_str());
    let mut out = Vec::new();
    let mut edited = 0;
    for line in text.split_inclusive('\n') {
        let has = |k: &str, v: &str| {
            line.contains(&format!("{k}: {v},")) || line.contains(&format!("{k}: {v}}}"))
        };
        let ours = (has("a", a) && has("b", b)) || (has("a", b) && has("b", a));
        match line.find("latency:").filter(|_| ours) {
            Some(at) => {
                let start = at + "latency:".len();
                let rest = &line[start..];
                let end = rest
                    .find([',', '}'])
                    .map(|i| start + i)
                    .unwrap_or(line.len());
                out.push(format!("{} {value}{}", &line[..start], &line[end..]));
                edited += 1;
            }
            None => out.push(line.to_string()),
        }
    }
    let edited_text = out.concat();
    if edited == 1 && topology::load(&edited_text).is_ok_and(|l| l.topology == want) {
        return Some((edited_text, true));
    }
    Some((topology::to_yaml(&want), false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use topology::NodeKind;
    use topology::builder::ms;

    fn apac() -> (String, Topology) {
        let text = super::super::APAC_YAML.to_string();
        let t = topology::load(&text).expect("apac loads").topology;
        (text, t)
    }

    fn choice(t: &Topology, edge: &str, service: &str, live: LiveState) -> EdgeChoice {
        let edge = NodeId::new(edge);
        let g = Graph::new(t);
        let table = RoutingTable::build(t, &g, &edge, &live).unwrap();
        let c = table.best(service).unwrap().clone();
        EdgeChoice {
            edge,
            live,
            site: c.site,
            path: c.path,
        }
    }

    #[test]
    fn apac_with_sydney_site_down_picks_the_smallest_raise_that_moves_a_path() {
        let (_, t) = apac();
        let mut live = LiveState::default();
        live.down_nodes.insert(NodeId::new("syd-site-1"));
        let choices: Vec<EdgeChoice> = [
            "syd-edge-1",
            "akl-edge-1",
            "sin-edge-1",
            "tyo-edge-1",
            "lax-edge-1",
        ]
        .iter()
        .map(|e| choice(&t, e, "llm-chat", live.clone()))
        .collect();
        // Sydney (failed over to Melbourne) reaches mel-site-1 through its transit, and the
        // only other way there crossed the Melbourne edge, which does not relay: no small
        // raise moves it. The cheapest move is Los Angeles off the trans-Pacific link to Tokyo,
        // a site change large enough to beat the hysteresis.
        let e = choose_latency_edit(&t, "llm-chat", &choices, Hysteresis::default()).unwrap();
        assert_eq!(e.edge.as_str(), "lax-edge-1");
        assert_eq!(e.link.to_string(), "lax-transit-1--tyo-transit-1");
        assert_eq!((e.from, e.to), (ms(52.0), ms(145.0)));
        let names = |p: &[NodeId]| p.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(e.before.0.as_str(), "tyo-site-1");
        assert_eq!(
            names(&e.before.1),
            ["lax-edge-1", "lax-transit-1", "tyo-transit-1", "tyo-site-1"]
        );
        assert_eq!(e.after.0.as_str(), "mel-site-1");
        assert_eq!(
            names(&e.after.1),
            ["lax-edge-1", "lax-transit-1", "syd-transit-1", "mel-site-1"]
        );
        // No path of the chosen edit relays through an edge or a site.
        for p in [&e.before.1, &e.after.1] {
            for n in &p[1..p.len() - 1] {
                assert_eq!(t.node(n.as_str()).unwrap().kind, NodeKind::Transit, "{p:?}");
            }
        }
        // The prediction holds on the edited topology; a raise that leaves Tokyo cheaper than
        // Melbourne by more than the hysteresis margin does not move the path.
        let c = &choices[4];
        assert_eq!(c.edge.as_str(), "lax-edge-1");
        let edited = with_latency(&t, &e.link, e.to).unwrap();
        assert_eq!(
            predict(&edited, c, "llm-chat", Hysteresis::default()),
            Some(e.after.clone())
        );
        let short = with_latency(&t, &e.link, ms(60.0)).unwrap();
        assert_eq!(
            predict(&short, c, "llm-chat", Hysteresis::default()).map(|p| p.1),
            Some(c.path.clone())
        );
    }

    #[test]
    fn no_edit_when_no_other_path_exists() {
        use topology::builder::TopologyBuilder;
        let mut b = TopologyBuilder::new();
        b.node("edge", NodeKind::Edge)
            .node("t", NodeKind::Transit)
            .node("s", NodeKind::Site)
            .link("edge", "t", ms(5.0))
            .link("t", "s", ms(1.0))
            .service("chat")
            .serve("s", "chat", 100);
        let t = b.build();
        let c = choice(&t, "edge", "chat", LiveState::default());
        assert_eq!(
            choose_latency_edit(&t, "chat", &[c], Hysteresis::default()),
            None
        );
    }

    #[test]
    fn set_link_latency_changes_one_value_and_keeps_comments() {
        let (text, t) = apac();
        let link = LinkId::new(&NodeId::new("tyo-transit-1"), &NodeId::new("lax-transit-1"));
        let (edited, kept) =
            set_link_latency(&text, &t, &link, Latency::from_micros(145_000)).unwrap();
        assert!(kept);
        assert!(edited.contains("# [W] Trans-Pacific. TYO-LAX 104ms RTT."));
        assert!(
            edited.contains(
                "- {a: tyo-transit-1, b: lax-transit-1, latency: 145ms, capacity: 100Gbps}"
            )
        );
        let diff: Vec<&str> = text
            .lines()
            .zip(edited.lines())
            .filter(|(a, b)| a != b)
            .map(|(a, _)| a)
            .collect();
        assert_eq!(diff.len(), 1, "{diff:?}");
        let loaded = topology::load(&edited).unwrap().topology;
        assert_eq!(
            loaded.link(&link).unwrap().latency,
            Latency::from_micros(145_000)
        );
    }

    #[test]
    fn set_link_latency_falls_back_to_a_rendered_topology_for_block_style() {
        let (_, t) = apac();
        let block = topology::to_yaml(&t);
        let link = LinkId::new(&NodeId::new("tyo-transit-1"), &NodeId::new("lax-transit-1"));
        let (edited, _) =
            set_link_latency(&block, &t, &link, Latency::from_micros(90_000)).unwrap();
        let loaded = topology::load(&edited).unwrap().topology;
        assert_eq!(
            loaded,
            with_latency(&t, &link, Latency::from_micros(90_000)).unwrap()
        );
    }
}
