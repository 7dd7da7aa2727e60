//! Live link weights and site state from routers' telemetry.
//!
//! Each router reports, per neighbour, the measured RTT and whether the link is up, and a site
//! reports its own health and load. The controller smooths RTTs with an EWMA per link (both
//! ends' samples feed the same estimate), turns them into one-way latencies (RTT/2: links are
//! declared one-way; never below the declared latency, the propagation floor, as routers treat
//! it), and keeps only fresh observations: a link whose samples are older than
//! [`LiveParams::fresh`] falls back to its declared latency.
//!
//! Anti-flap: the published weight of a link changes only when the smoothed value moves by
//! more than `max(abs_threshold, rel_threshold × published)`; smaller wiggles are absorbed, so
//! they trigger neither a recomputation nor a push. A link gets a weight of its own only when
//! it is measured more than `abs_threshold` above its declared latency, and loses it (the
//! declared value applies) once it is back within half of that.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use topology::diff::Incumbents;
use topology::route::{LiveState, SiteLoad};
use topology::{Latency, LinkId, NodeId, NodeKind, ServiceName, Topology};

#[derive(Debug, Clone, Copy)]
pub struct LiveParams {
    /// Weight of a new sample in the EWMA.
    pub alpha: f64,
    /// Observations older than this are ignored (declared values apply).
    pub fresh: Duration,
    pub abs_threshold: Duration,
    pub rel_threshold: f64,
}

impl Default for LiveParams {
    fn default() -> Self {
        LiveParams {
            alpha: 0.3,
            fresh: Duration::from_secs(5),
            abs_threshold: Duration::from_millis(2),
            rel_threshold: 0.10,
        }
    }
}

/// One router's report, in the controller's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub node: NodeId,
    pub neighbours: Vec<NeighbourSample>,
    /// A site's own health and load.
    pub site: Option<SiteLoad>,
    /// An edge's site in use per service (the impact plan's starting point).
    pub preferred: BTreeMap<ServiceName, NodeId>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NeighbourSample {
    pub neighbour: NodeId,
    pub rtt: Option<Duration>,
    pub up: bool,
}

#[derive(Debug, Default)]
struct LinkObs {
    ewma_rtt_ns: Option<f64>,
    rtt_updated: Option<Instant>,
    /// Per reporting end: link up?, when.
    ends: BTreeMap<NodeId, (bool, Instant)>,
}

/// One row of the live RTT matrix.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RttEntry {
    pub link: String,
    pub a: String,
    pub b: String,
    /// Smoothed round-trip time, if measured.
    pub rtt_ms: Option<f64>,
    pub declared_one_way_ms: f64,
    /// The one-way weight in force (published), ms.
    pub weight_ms: f64,
    pub up: bool,
    /// Age of the newest sample, ms (None: never measured).
    pub age_ms: Option<u64>,
}

#[derive(Debug, Default)]
pub struct LiveAggregator {
    params: LiveParams,
    links: BTreeMap<LinkId, LinkObs>,
    sites: BTreeMap<NodeId, (SiteLoad, Instant)>,
    /// Per edge: its site in use per service, when reported.
    preferred: BTreeMap<NodeId, (BTreeMap<ServiceName, NodeId>, Instant)>,
    published: LiveState,
}

impl LiveAggregator {
    pub fn new(params: LiveParams) -> Self {
        LiveAggregator {
            params,
            ..Default::default()
        }
    }

    pub fn published(&self) -> &LiveState {
        &self.published
    }

    /// Merges one report. Returns true when it moves the fabric's live state beyond the
    /// anti-flap thresholds (a recomputation is then worth scheduling).
    pub fn observe(&mut self, topo: &Topology, s: Sample, now: Instant) -> bool {
        for n in &s.neighbours {
            let id = LinkId::new(&s.node, &n.neighbour);
            if topo.link(&id).is_none() {
                continue;
            }
            let obs = self.links.entry(id).or_default();
            obs.ends.insert(s.node.clone(), (n.up, now));
            if let Some(rtt) = n.rtt.filter(|_| n.up) {
                let x = rtt.as_nanos() as f64;
                obs.ewma_rtt_ns = Some(match obs.ewma_rtt_ns {
                    Some(prev) => prev + self.params.alpha * (x - prev),
                    None => x,
                });
                obs.rtt_updated = Some(now);
            }
        }
        let kind = topo.node(s.node.as_str()).map(|n| n.kind);
        if let Some(load) = s.site
            && kind.is_some()
        {
            self.sites.insert(s.node.clone(), (load, now));
        }
        if kind == Some(NodeKind::Edge) {
            self.preferred.insert(s.node, (s.preferred, now));
        }
        self.merged(topo, now) != self.published
    }

    /// True when stale observations (ageing out) change what is published.
    pub fn expired(&self, topo: &Topology, now: Instant) -> bool {
        self.merged(topo, now) != self.published
    }

    /// The live state that would be published now: fresh observations, with the anti-flap
    /// thresholds applied against what is currently published.
    pub fn merged(&self, topo: &Topology, now: Instant) -> LiveState {
        let fresh = |t: Instant| now.saturating_duration_since(t) <= self.params.fresh;
        let mut out = LiveState::default();
        for (id, obs) in &self.links {
            if topo.link(id).is_none() {
                continue;
            }
            if obs.ends.values().any(|(up, t)| !*up && fresh(*t)) {
                out.down_links.insert(id.clone());
            }
            if let (Some(rtt), Some(t)) = (obs.ewma_rtt_ns, obs.rtt_updated)
                && fresh(t)
            {
                // RTT/2: links are declared one-way. The declared latency is the floor (the
                // propagation delay, as routers treat it): a measurement only raises a weight.
                // Latency::MAX is the ceiling: routers refuse a snapshot with a larger latency.
                let declared = topo.link(id).map(|l| l.latency).unwrap_or(Latency::ZERO);
                let measured = Latency::from_nanos((rtt / 2.0).max(1.0) as u64)
                    .max(declared)
                    .min(Latency::MAX);
                let excess = measured
                    .as_duration()
                    .saturating_sub(declared.as_duration());
                let abs = self.params.abs_threshold;
                let value = match self.published.link_latency.get(id).copied() {
                    // Back at the floor (within half the threshold): the declared value
                    // applies again, rather than an old excess (e.g. RTTs inflated while the
                    // fabric started) being kept by the anti-flap rule below.
                    Some(_) if excess <= abs / 2 => None,
                    Some(p) if !self.moved(p, measured) => Some(p),
                    // Only an excess beyond the threshold is worth a weight of its own.
                    None if excess <= abs => None,
                    _ => Some(measured),
                };
                if let Some(v) = value {
                    out.link_latency.insert(id.clone(), v);
                }
            }
        }
        for (site, (load, t)) in &self.sites {
            if !fresh(*t) || topo.node(site.as_str()).is_none() {
                continue;
            }
            let keep = self.published.site_load.get(site).copied().filter(|p| {
                p.healthy == load.healthy
                    && p.capacity == load.capacity
                    && p.active_streams.abs_diff(load.active_streams) <= (load.capacity / 20).max(1)
            });
            out.site_load.insert(site.clone(), keep.unwrap_or(*load));
        }
        out
    }

    fn moved(&self, published: Latency, measured: Latency) -> bool {
        let p = published.as_nanos() as f64;
        let m = measured.as_nanos() as f64;
        let threshold =
            (self.params.abs_threshold.as_nanos() as f64).max(p * self.params.rel_threshold);
        (m - p).abs() > threshold
    }

    /// The sites edges reported in use, per service (fresh reports only).
    pub fn incumbents(&self, now: Instant) -> Incumbents {
        self.preferred
            .iter()
            .filter(|(_, (_, t))| now.saturating_duration_since(*t) <= self.params.fresh)
            .map(|(edge, (sites, _))| (edge.clone(), sites.clone()))
            .collect()
    }

    /// Makes `live` the published state (after a recomputation pushed it).
    pub fn publish(&mut self, live: LiveState) {
        self.published = live;
    }

    /// The RTT matrix between neighbours, for `tasman status`.
    pub fn rtt_matrix(&self, topo: &Topology, now: Instant) -> Vec<RttEntry> {
        topo.links
            .iter()
            .map(|l| {
                let id = l.id();
                let obs = self.links.get(&id);
                let newest = obs.and_then(|o| o.ends.values().map(|(_, t)| *t).max());
                let up = !self.published.down_links.contains(&id);
                let weight = self
                    .published
                    .link_latency
                    .get(&id)
                    .copied()
                    .unwrap_or(l.latency);
                RttEntry {
                    link: id.to_string(),
                    a: id.0.to_string(),
                    b: id.1.to_string(),
                    rtt_ms: obs.and_then(|o| o.ewma_rtt_ns).map(|ns| ns / 1e6),
                    declared_one_way_ms: l.latency.as_millis_f64(),
                    weight_ms: weight.as_millis_f64(),
                    up,
                    age_ms: newest.map(|t| now.saturating_duration_since(t).as_millis() as u64),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use topology::NodeKind;
    use topology::builder::{TopologyBuilder, ms};

    fn topo() -> Topology {
        let mut b = TopologyBuilder::new();
        b.node("e", NodeKind::Edge)
            .node("t", NodeKind::Transit)
            .link("e", "t", ms(0.5));
        b.build()
    }

    /// One report from `e` (and one from `t`) with this RTT; returns the weight to publish.
    fn step(agg: &mut LiveAggregator, t: &Topology, rtt_ms: f64, now: Instant) -> Option<f64> {
        for (me, peer) in [("e", "t"), ("t", "e")] {
            agg.observe(
                t,
                Sample {
                    node: NodeId::new(me),
                    neighbours: vec![NeighbourSample {
                        neighbour: NodeId::new(peer),
                        rtt: Some(Duration::from_secs_f64(rtt_ms / 1000.0)),
                        up: true,
                    }],
                    site: None,
                    preferred: BTreeMap::new(),
                },
                now,
            );
        }
        let m = agg.merged(t, now);
        agg.publish(m.clone());
        m.link_latency
            .get(&LinkId::new(&NodeId::new("e"), &NodeId::new("t")))
            .map(|l| l.as_millis_f64())
    }

    #[test]
    fn weights_publish_clear_excess_and_fall_back_to_declared_at_the_floor() {
        let t = topo();
        let mut agg = LiveAggregator::new(LiveParams {
            alpha: 1.0, // no smoothing: each step is the measurement
            ..LiveParams::default()
        });
        let now = Instant::now();
        // Measured at the declared latency (RTT 1 ms, one-way 0.5 ms) or a little above it:
        // nothing published, the declared value applies.
        assert_eq!(step(&mut agg, &t, 1.0, now), None);
        assert_eq!(
            step(&mut agg, &t, 4.0, now),
            None,
            "1.5 ms excess is under 2 ms"
        );
        // Startup inflation, then back: the excess goes away with it (no sticky 2.6 ms).
        assert_eq!(step(&mut agg, &t, 5.2, now), Some(2.6));
        assert_eq!(
            step(&mut agg, &t, 4.6, now),
            Some(2.6),
            "anti-flap keeps 2.6"
        );
        assert_eq!(step(&mut agg, &t, 1.2, now), None, "back at the floor");
        // Never below the declared latency.
        assert_eq!(step(&mut agg, &t, 0.1, now), None);
        assert_eq!(step(&mut agg, &t, 80.0, now), Some(40.0));
    }
}
