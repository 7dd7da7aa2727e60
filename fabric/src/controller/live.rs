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
//! it is measured more than `max(abs_threshold, rel_threshold × declared)` above its declared
//! latency (the weight in force without one), and loses it (the declared value applies) once it
//! is back within half of that.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use topology::diff::{Incumbents, Margins};
use topology::route::{LiveState, SiteLoad};
use topology::{Hysteresis, Latency, LinkId, NodeId, NodeKind, ServiceName, Topology};

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
    /// A site's own health and load, summed over its services.
    pub site: Option<SiteLoad>,
    /// A site's load per service (what routing reads, `LiveState::load_of`).
    pub services: BTreeMap<ServiceName, SiteLoad>,
    /// An edge's site in use per service (the impact plan's starting point).
    pub preferred: BTreeMap<ServiceName, NodeId>,
    /// An edge's anti-flap margins, when it reported them (the plan assumes the defaults
    /// otherwise).
    pub margins: Option<Hysteresis>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NeighbourSample {
    pub neighbour: NodeId,
    /// The link's RTT as the router routes on it (the lowest of its last 10 s).
    pub rtt: Option<Duration>,
    pub up: bool,
    /// QUIC's smoothed RTT of the router's connection to it, queueing included (shown, not
    /// published: routing leaves a link's own queue out).
    pub srtt: Option<Duration>,
}

#[derive(Debug, Default)]
struct LinkObs {
    ewma_rtt_ns: Option<f64>,
    rtt_updated: Option<Instant>,
    /// The smoothed RTT of the newest report from either end that had one.
    srtt: Option<Duration>,
    /// Per reporting end: link up?, when.
    ends: BTreeMap<NodeId, (bool, Instant)>,
}

/// One row of the live RTT matrix.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RttEntry {
    pub link: String,
    pub a: String,
    pub b: String,
    /// Round-trip time as routing takes it (an EWMA of what the ends report: each the lowest of
    /// its last 10 s), if measured.
    pub rtt_ms: Option<f64>,
    /// QUIC's smoothed RTT in the newest report from either end, queueing included: above
    /// `rtt_ms` while traffic queues on the link (None: never reported).
    pub srtt_ms: Option<f64>,
    pub declared_one_way_ms: f64,
    /// The one-way weight in force (published), ms.
    pub weight_ms: f64,
    pub up: bool,
    /// Age of `rtt_ms`'s newest sample, ms (None: never measured).
    pub age_ms: Option<u64>,
}

/// The topology the aggregator matches reports against, indexed by id: every report is looked
/// up link by link under the controller's lock, and `Topology::link` scans every link (a
/// transit's report times the fabric's links, every second, per router). Built off the
/// controller's lock for [`LiveAggregator::merged_for`]: it costs the topology's size.
#[derive(Debug, Default)]
pub struct Index {
    topology: Arc<Topology>,
    /// Declared latency per link.
    links: HashMap<LinkId, Latency>,
    nodes: HashMap<NodeId, NodeKind>,
    /// Per site node, the services it serves and their declared capacities.
    serves: HashMap<NodeId, HashMap<ServiceName, u32>>,
}

impl Index {
    /// Whether the topology has node `id` (`Topology::node` scans every node).
    pub fn has_node(&self, id: &str) -> bool {
        self.nodes.contains_key(id)
    }

    pub fn new(topology: Arc<Topology>) -> Index {
        Index {
            links: topology.links.iter().map(|l| (l.id(), l.latency)).collect(),
            nodes: topology
                .nodes
                .iter()
                .map(|n| (n.id.clone(), n.kind))
                .collect(),
            serves: topology
                .nodes
                .iter()
                .filter(|n| n.kind == NodeKind::Site)
                .map(|n| {
                    (
                        n.id.clone(),
                        n.serves
                            .iter()
                            .map(|s| (s.service.clone(), s.capacity))
                            .collect(),
                    )
                })
                .collect(),
            topology,
        }
    }

    /// Whether `site` is a site node that serves `service`.
    fn serves(&self, site: &NodeId, service: &ServiceName) -> bool {
        self.serves
            .get(site)
            .is_some_and(|s| s.contains_key(service))
    }

    /// A site's report as this topology takes it: from a site node only, for the services it
    /// serves only (a router's report is its word: one that names services the site does not
    /// serve, or a node that is no site, would otherwise have them published to every router).
    /// The summed load is the reported one when nothing was left out, else the sum of what is
    /// kept (None when nothing is).
    fn site_report(
        &self,
        node: &NodeId,
        load: SiteLoad,
        services: &BTreeMap<ServiceName, SiteLoad>,
    ) -> Option<SiteView> {
        if self.nodes.get(node) != Some(&NodeKind::Site) {
            return None;
        }
        let kept: BTreeMap<ServiceName, SiteLoad> = services
            .iter()
            .filter(|(service, _)| self.serves(node, service))
            .map(|(service, load)| (service.clone(), *load))
            .collect();
        if kept.len() == services.len() {
            return Some((load, kept));
        }
        Some((summed(&kept)?, kept))
    }
}

/// A site's load summed over its services: streams and capacity add up (saturating: the
/// numbers are the router's word), and the site counts as healthy while any of its services is
/// (None: no service).
pub fn summed(services: &BTreeMap<ServiceName, SiteLoad>) -> Option<SiteLoad> {
    services.values().copied().reduce(|a, b| SiteLoad {
        active_streams: a.active_streams.saturating_add(b.active_streams),
        capacity: a.capacity.saturating_add(b.capacity),
        healthy: a.healthy || b.healthy,
    })
}

/// What a site last reported about itself.
#[derive(Debug)]
struct SiteObs {
    load: SiteLoad,
    services: BTreeMap<ServiceName, SiteLoad>,
    at: Instant,
}

/// A site's published view: its summed load and its load per service.
type SiteView = (SiteLoad, BTreeMap<ServiceName, SiteLoad>);

/// What a telemetry report changed in the live state to publish ([`LiveAggregator::observe`]),
/// least first. The controller throttles each kind with a back-off of its own: loads and RTTs
/// of a busy fabric move every few seconds and keep theirs in its long wait (5 s), which must
/// not delay a site filling up; and a site hovering at its capacity (full, then one stream
/// short, at every report of an overloaded service) keeps the sites' back-off in its long wait,
/// which must not delay a link going down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    None,
    /// Only costs move: a link's measured weight, a site's load within its room.
    Gradual,
    /// Where traffic may go at a site: a site or service healthy or not, full or not.
    Urgent,
    /// Where traffic may go over the links: a link up or down.
    Link,
}

/// What routing reads of a site's view for `service` (as [`LiveState::load_of`]): the service's
/// own entry, or the summed one for a site with no per-service entries; `None`: no entry.
fn view_load<'a>(view: Option<&'a SiteView>, service: &ServiceName) -> Option<&'a SiteLoad> {
    let (sum, per) = view?;
    if per.is_empty() {
        Some(sum)
    } else {
        per.get(service)
    }
}

/// Whether routing may send `service`'s streams to a site whose load it reads as `load`
/// (`declared`: the service's declared capacity there): no entry counts as healthy and
/// unloaded, and an entry as [`SiteLoad::penalty`] says (unhealthy or full: no).
fn eligible(load: Option<&SiteLoad>, declared: u32) -> bool {
    load.is_none_or(|l| l.penalty(declared).is_some())
}

/// What an edge last reported about its choices.
#[derive(Debug)]
struct EdgeChoice {
    sites: BTreeMap<ServiceName, NodeId>,
    margins: Option<Hysteresis>,
    at: Instant,
}

#[derive(Debug, Default)]
pub struct LiveAggregator {
    params: LiveParams,
    index: Index,
    links: BTreeMap<LinkId, LinkObs>,
    sites: BTreeMap<NodeId, SiteObs>,
    /// Per edge: its site in use per service and its anti-flap margins, when reported.
    preferred: BTreeMap<NodeId, EdgeChoice>,
    published: LiveState,
}

impl LiveAggregator {
    pub fn new(params: LiveParams, topology: Arc<Topology>) -> Self {
        LiveAggregator {
            params,
            index: Index::new(topology),
            ..Default::default()
        }
    }

    /// The topology in force, indexed.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The topology reports are matched against from now on (after an apply). Observations of
    /// links and nodes it no longer has are dropped: the state kept is bounded by the topology
    /// in force, however many ids come and go.
    /// What sites reported is kept as the new topology takes it ([`Index::site_report`]), and
    /// edges' sites in use only where the site still serves the service. `index` is of the new
    /// topology, built by the caller (off the controller's lock).
    pub fn set_topology(&mut self, index: Index) {
        self.index = index;
        let index = &self.index;
        self.links.retain(|id, _| index.links.contains_key(id));
        self.sites.retain(
            |id, obs| match index.site_report(id, obs.load, &obs.services) {
                Some((load, services)) => {
                    (obs.load, obs.services) = (load, services);
                    true
                }
                None => false,
            },
        );
        self.preferred.retain(|id, c| {
            c.sites.retain(|service, site| index.serves(site, service));
            index.nodes.get(id) == Some(&NodeKind::Edge)
        });
    }

    pub fn published(&self) -> &LiveState {
        &self.published
    }

    /// Merges one report. Returns true when it moves the fabric's live state beyond the
    /// anti-flap thresholds (a recomputation is then worth scheduling).
    ///
    /// A report is the router's word, and what is published goes to every router: a load is
    /// taken from a site node only, for the services it serves in the topology in force (what
    /// else it names is dropped, and the summed load is then the sum of what is kept), and an
    /// edge's sites in use only where the site serves the service. Links are those of the
    /// topology.
    ///
    /// The cost is the report's size, not the fabric's: only the links and the site it reports
    /// are compared with what is published (observations ageing out elsewhere are the
    /// recompute loop's business, through [`Self::expired`]).
    pub fn observe(&mut self, s: Sample, now: Instant) -> Change {
        let mut touched = Vec::with_capacity(s.neighbours.len());
        for n in &s.neighbours {
            let id = LinkId::new(&s.node, &n.neighbour);
            if !self.index.links.contains_key(&id) {
                continue;
            }
            let obs = self.links.entry(id.clone()).or_default();
            obs.ends.insert(s.node.clone(), (n.up, now));
            if let Some(rtt) = n.rtt.filter(|_| n.up) {
                let x = rtt.as_nanos() as f64;
                // A stale average is not revived: samples resuming after a gap (the link was
                // down, or left the topology and came back) start afresh.
                let fresh = obs
                    .rtt_updated
                    .is_some_and(|t| now.saturating_duration_since(t) <= self.params.fresh);
                obs.ewma_rtt_ns = Some(match obs.ewma_rtt_ns {
                    Some(prev) if fresh => prev + self.params.alpha * (x - prev),
                    _ => x,
                });
                obs.rtt_updated = Some(now);
                if let Some(srtt) = n.srtt {
                    obs.srtt = Some(srtt);
                }
            }
            touched.push(id);
        }
        let kind = self.index.nodes.get(&s.node).copied();
        let site = s
            .site
            .and_then(|load| self.index.site_report(&s.node, load, &s.services));
        let site_reported = match site {
            Some((load, services)) => {
                let obs = SiteObs {
                    load,
                    services,
                    at: now,
                };
                self.sites.insert(s.node.clone(), obs);
                true
            }
            None => false,
        };
        let site_change = site_reported.then(|| self.site_change(&s.node, now));
        let changed = touched
            .iter()
            .map(|id| self.link_change(id, now))
            .chain(site_change)
            .max()
            .unwrap_or(Change::None);
        if kind == Some(NodeKind::Edge) {
            // Only sites that serve the service in this topology: the plan starts from them.
            let mut sites = s.preferred;
            sites.retain(|service, site| self.index.serves(site, service));
            let choice = EdgeChoice {
                sites,
                margins: s.margins,
                at: now,
            };
            self.preferred.insert(s.node, choice);
        }
        changed
    }

    /// True when stale observations (ageing out) change what is published.
    pub fn expired(&self, now: Instant) -> bool {
        self.merged(now) != self.published
    }

    fn fresh(&self, t: Instant, now: Instant) -> bool {
        now.saturating_duration_since(t) <= self.params.fresh
    }

    /// What [`Self::merged`] says of one observed link: down?, and its own weight, if any.
    fn link_view(
        &self,
        id: &LinkId,
        obs: &LinkObs,
        declared: Latency,
        now: Instant,
    ) -> (bool, Option<Latency>) {
        let down = obs.ends.values().any(|(up, t)| !*up && self.fresh(*t, now));
        let (Some(rtt), Some(t)) = (obs.ewma_rtt_ns, obs.rtt_updated) else {
            return (down, None);
        };
        if !self.fresh(t, now) {
            return (down, None);
        }
        // RTT/2: links are declared one-way. The declared latency is the floor (the
        // propagation delay, as routers treat it): a measurement only raises a weight.
        // Latency::MAX is the ceiling: routers refuse a snapshot with a larger latency.
        let measured = Latency::from_nanos((rtt / 2.0).max(1.0) as u64)
            .max(declared)
            .min(Latency::MAX);
        let excess = measured
            .as_duration()
            .saturating_sub(declared.as_duration());
        // The weight in force without a published one is the declared latency: a weight of
        // its own is a move from it, by the same rule as any move (`moved`).
        let band = self
            .params
            .abs_threshold
            .max(declared.as_duration().mul_f64(self.params.rel_threshold));
        let value = match self.published.link_latency.get(id).copied() {
            // Back at the floor (within half the band): the declared value applies again,
            // rather than an old excess (e.g. RTTs inflated while the fabric started) being
            // kept by the anti-flap rule below.
            Some(_) if excess <= band / 2 => None,
            // Kept only at or above the declared latency: an apply that raised it past the
            // value published must not leave a weight under the propagation floor (routers
            // take a snapshot's weights as they are).
            Some(p) if p >= declared && !self.moved(p, measured) => Some(p),
            // Only an excess beyond the band is worth a weight of its own.
            None if excess <= band => None,
            _ => Some(measured),
        };
        (down, value)
    }

    /// What [`Self::merged`] says of one site's reported load, summed and per service (None:
    /// stale). Each load keeps its published value while it moves by no more than 5 % of its
    /// capacity (at least one stream) with the same health and capacity.
    fn site_view(&self, site: &NodeId, obs: &SiteObs, now: Instant) -> Option<SiteView> {
        if !self.fresh(obs.at, now) {
            return None;
        }
        Some(self.held_site(&self.index, site, &obs.load, &obs.services))
    }

    /// A site's load, summed and per service, with the anti-flap band of [`Self::site_view`].
    /// A reported capacity of 0 is the declared one (`index`'s), as routing reads it
    /// ([`SiteLoad::penalty`]): judged against 0, every such load was full and its band one
    /// stream, and a service filling up its declared capacity was held with room.
    fn held_site(
        &self,
        index: &Index,
        site: &NodeId,
        load: &SiteLoad,
        services: &BTreeMap<ServiceName, SiteLoad>,
    ) -> SiteView {
        let held = |published: Option<&SiteLoad>, load: &SiteLoad, declared: u32| {
            let capacity = |l: &SiteLoad| if l.capacity > 0 { l.capacity } else { declared };
            // Never across the line where a site is full (no candidate: `load_penalty` is
            // None): a site that filled up within the band was published with room, and one
            // published full stayed so with room again.
            let full = |l: &SiteLoad| l.active_streams >= capacity(l);
            let keep = published.copied().filter(|p| {
                p.healthy == load.healthy
                    && p.capacity == load.capacity
                    && full(p) == full(load)
                    && p.active_streams.abs_diff(load.active_streams)
                        <= (capacity(load) / 20).max(1)
            });
            keep.unwrap_or(*load)
        };
        let declared = |service: &ServiceName| {
            index
                .serves
                .get(site)
                .and_then(|s| s.get(service))
                .copied()
                .unwrap_or(0)
        };
        let published = self.published.service_load.get(site);
        let services: BTreeMap<ServiceName, SiteLoad> = services
            .iter()
            .map(|(service, load)| {
                let p = published.and_then(|m| m.get(service));
                (service.clone(), held(p, load, declared(service)))
            })
            .collect();
        let declared_sum = index
            .serves
            .get(site)
            .map_or(0, |s| s.values().fold(0u32, |a, c| a.saturating_add(*c)));
        let sum = held(self.published.site_load.get(site), load, declared_sum);
        (sum, services)
    }

    /// What is published for one site, in [`SiteView`] form (None: nothing).
    fn published_site(&self, site: &NodeId) -> Option<SiteView> {
        let load = *self.published.site_load.get(site)?;
        let services = self
            .published
            .service_load
            .get(site)
            .cloned()
            .unwrap_or_default();
        Some((load, services))
    }

    /// How [`Self::merged`] differs from what is published for this link (of the topology):
    /// up or down is [`Change::Link`], a weight [`Change::Gradual`].
    fn link_change(&self, id: &LinkId, now: Instant) -> Change {
        let (down, weight) = match (self.links.get(id), self.index.links.get(id)) {
            (Some(obs), Some(declared)) => self.link_view(id, obs, *declared, now),
            _ => (false, None),
        };
        if down != self.published.down_links.contains(id) {
            Change::Link
        } else if weight != self.published.link_latency.get(id).copied() {
            Change::Gradual
        } else {
            Change::None
        }
    }

    /// How [`Self::merged`] differs from what is published for this site (of the topology):
    /// [`Change::Urgent`] when routing may now send one of its services' streams there where it
    /// could not, or the other way round ([`eligible`]: healthy and with room, or no entry),
    /// [`Change::Gradual`] for a load that only moves costs.
    fn site_change(&self, site: &NodeId, now: Instant) -> Change {
        let view = self
            .sites
            .get(site)
            .and_then(|obs| self.site_view(site, obs, now));
        let published = self.published_site(site);
        if view == published {
            return Change::None;
        }
        let served = self.index.serves.get(site).into_iter().flatten();
        let moved = served.into_iter().any(|(service, declared)| {
            eligible(view_load(published.as_ref(), service), *declared)
                != eligible(view_load(view.as_ref(), service), *declared)
        });
        if moved {
            Change::Urgent
        } else {
            Change::Gradual
        }
    }

    /// How what would be published now ([`Self::merged`]) differs from what is: the kind of
    /// change observations ageing out make (a link's down report expiring brings it back up: an
    /// urgent change, as the report that took it down was).
    pub fn pending_change(&self, now: Instant) -> Change {
        let merged = self.merged(now);
        if merged == self.published {
            return Change::None;
        }
        if merged.down_links != self.published.down_links {
            return Change::Link;
        }
        // The sites by the rule of the reports' ([`Self::site_change`]); anything else (weights)
        // only moves costs.
        self.index
            .serves
            .keys()
            .map(|site| self.site_change(site, now))
            .max()
            .filter(|c| *c == Change::Urgent)
            .unwrap_or(Change::Gradual)
    }

    /// The live state that would be published now: fresh observations, with the anti-flap
    /// thresholds applied against what is currently published.
    pub fn merged(&self, now: Instant) -> LiveState {
        self.merged_in(&self.index, now)
    }

    /// The live state that would be published now if `topology` (indexed) were in force: what
    /// [`Self::set_topology`] then [`Self::merged`] would give, without changing the aggregator
    /// (the impact plan's new side). Measurements are floored at, and compared with, the new
    /// declared latencies: a link whose declared latency is lowered below its measured one keeps
    /// its measurement, which under the old declared latency was no excess, and so not merged.
    pub fn merged_for(&self, topology: &Index, now: Instant) -> LiveState {
        self.merged_in(topology, now)
    }

    fn merged_in(&self, index: &Index, now: Instant) -> LiveState {
        let mut out = LiveState::default();
        for (id, obs) in &self.links {
            let Some(declared) = index.links.get(id) else {
                continue;
            };
            let (down, weight) = self.link_view(id, obs, *declared, now);
            if down {
                out.down_links.insert(id.clone());
            }
            if let Some(v) = weight {
                out.link_latency.insert(id.clone(), v);
            }
        }
        for (site, obs) in &self.sites {
            if !self.fresh(obs.at, now) {
                continue;
            }
            let Some((load, services)) = index.site_report(site, obs.load, &obs.services) else {
                continue;
            };
            let (load, services) = self.held_site(index, site, &load, &services);
            out.site_load.insert(site.clone(), load);
            if !services.is_empty() {
                out.service_load.insert(site.clone(), services);
            }
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
        self.fresh_choices(now)
            .map(|(edge, c)| (edge.clone(), c.sites.clone()))
            .collect()
    }

    /// The anti-flap margins of the edges that reported theirs recently (the others are taken
    /// to run with the defaults).
    pub fn margins(&self, now: Instant) -> Margins {
        self.fresh_choices(now)
            .filter_map(|(edge, c)| Some((edge.clone(), c.margins?)))
            .collect()
    }

    fn fresh_choices(&self, now: Instant) -> impl Iterator<Item = (&NodeId, &EdgeChoice)> {
        self.preferred
            .iter()
            .filter(move |(_, c)| now.saturating_duration_since(c.at) <= self.params.fresh)
    }

    /// Makes `live` the published state (after a recomputation pushed it).
    pub fn publish(&mut self, live: LiveState) {
        self.published = live;
    }

    /// The RTT matrix between neighbours, for `tasman status`.
    pub fn rtt_matrix(&self, now: Instant) -> Vec<RttEntry> {
        self.index
            .topology
            .links
            .iter()
            .map(|l| {
                let id = l.id();
                let obs = self.links.get(&id);
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
                    srtt_ms: obs.and_then(|o| o.srtt).map(|d| d.as_secs_f64() * 1e3),
                    declared_one_way_ms: l.latency.as_millis_f64(),
                    weight_ms: weight.as_millis_f64(),
                    up,
                    // The RTT's own age: a link reported down keeps its last RTT, ageing.
                    age_ms: obs
                        .and_then(|o| o.rtt_updated)
                        .map(|t| now.saturating_duration_since(t).as_millis() as u64),
                }
            })
            .collect()
    }
}

#[cfg(test)]
impl Sample {
    /// A report of `node` about one neighbour, and nothing else.
    pub(crate) fn one_link(node: &str, neighbour: &str, rtt: Option<Duration>, up: bool) -> Sample {
        Sample {
            node: NodeId::new(node),
            neighbours: vec![NeighbourSample {
                neighbour: NodeId::new(neighbour),
                rtt,
                up,
                srtt: None,
            }],
            site: None,
            services: BTreeMap::new(),
            preferred: BTreeMap::new(),
            margins: None,
        }
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
    fn step(agg: &mut LiveAggregator, rtt_ms: f64, now: Instant) -> Option<f64> {
        for (me, peer) in [("e", "t"), ("t", "e")] {
            let rtt = Duration::from_secs_f64(rtt_ms / 1000.0);
            agg.observe(Sample::one_link(me, peer, Some(rtt), true), now);
        }
        let m = agg.merged(now);
        agg.publish(m.clone());
        m.link_latency
            .get(&LinkId::new(&NodeId::new("e"), &NodeId::new("t")))
            .map(|l| l.as_millis_f64())
    }

    /// A healthy load of `active` streams of `capacity` (0: not reported).
    fn chat_load(active_streams: u32, capacity: u32) -> SiteLoad {
        SiteLoad {
            active_streams,
            capacity,
            healthy: true,
        }
    }

    /// Site `s`'s report of service `chat` alone, [`chat_load`], summed and per service.
    fn chat_report(active: u32, capacity: u32) -> Sample {
        let load = chat_load(active, capacity);
        Sample {
            node: NodeId::new("s"),
            neighbours: Vec::new(),
            site: Some(load),
            services: [(ServiceName::new("chat"), load)].into(),
            preferred: BTreeMap::new(),
            margins: None,
        }
    }

    /// A long link gets a weight of its own only past 10 % of its declared latency (the weight
    /// in force without one), as any weight moves: 2 ms above a 100 ms link is no news. (Past
    /// 2 ms it was published, and cleared within 1 ms: a link hovering 1-2 ms above its
    /// declared 100 ms was pushed to every router at each swing.)
    #[test]
    fn a_long_link_gets_a_weight_only_past_ten_percent_of_its_latency() {
        let mut b = TopologyBuilder::new();
        b.node("e", NodeKind::Edge)
            .node("t", NodeKind::Transit)
            .link("e", "t", ms(100.0));
        let params = LiveParams {
            alpha: 1.0,
            ..LiveParams::default()
        };
        let mut agg = LiveAggregator::new(params, Arc::new(b.build()));
        let t0 = Instant::now();
        let mut swings = 0;
        for i in 0..10 {
            let rtt = if i % 2 == 0 { 204.2 } else { 201.8 };
            if step(&mut agg, rtt, t0).is_some() {
                swings += 1;
            }
        }
        assert_eq!(swings, 0, "weights published for moves within 10 %");
        // Past 10 % (110 ms one way): a weight; back within 5 ms of the floor: none.
        assert_eq!(step(&mut agg, 224.0, t0), Some(112.0));
        assert_eq!(
            step(&mut agg, 212.0, t0),
            Some(112.0),
            "a move under the band"
        );
        assert_eq!(step(&mut agg, 209.0, t0), None, "back within half the band");
    }

    /// A link's measured weight moving is a gradual change; the link going down or up again is
    /// an urgent one.
    #[test]
    fn a_link_down_or_up_is_urgent_and_its_weight_gradual() {
        let t0 = Instant::now();
        let mut agg = LiveAggregator::new(LiveParams::default(), Arc::new(topo()));
        step(&mut agg, 80.0, t0);
        let rtt = |ms: u64| Some(Duration::from_millis(ms));
        let t1 = t0 + Duration::from_secs(1);
        let up = |agg: &mut LiveAggregator, ms| {
            agg.observe(Sample::one_link("e", "t", rtt(ms), true), t1)
        };
        assert_eq!(up(&mut agg, 200), Change::Gradual);
        assert_eq!(
            agg.observe(Sample::one_link("e", "t", None, false), t1),
            Change::Link
        );
        agg.publish(agg.merged(t1));
        let t2 = t1 + Duration::from_secs(30);
        assert_eq!(
            agg.observe(Sample::one_link("e", "t", rtt(80), true), t2),
            Change::Link,
            "up again"
        );
    }

    /// A site's report of capacity 0 is read against the service's declared capacity, as
    /// routing reads it: filling that up is urgent. A down link's reports ageing out bring it
    /// back: an urgent change too.
    #[test]
    fn urgency_follows_what_routing_reads() {
        let mut b = TopologyBuilder::new();
        b.node("s", NodeKind::Site)
            .node("t", NodeKind::Transit)
            .link("s", "t", ms(1.0))
            .service("chat")
            .serve("s", "chat", 10);
        let mut agg = LiveAggregator::new(LiveParams::default(), Arc::new(b.build()));
        let report = |active| chat_report(active, 0);
        let t0 = Instant::now();
        assert_eq!(agg.observe(report(2), t0), Change::Gradual);
        agg.publish(agg.merged(t0));
        assert_eq!(
            agg.observe(report(9), t0),
            Change::Gradual,
            "moved past a one-stream band"
        );
        agg.publish(agg.merged(t0));
        assert_eq!(
            agg.observe(report(10), t0),
            Change::Urgent,
            "full at 10 declared"
        );
        agg.publish(agg.merged(t0));
        assert_eq!(agg.pending_change(t0), Change::None);
        // The link goes down; its reports stop, and age out.
        assert_eq!(
            agg.observe(Sample::one_link("t", "s", None, false), t0),
            Change::Link
        );
        agg.publish(agg.merged(t0));
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            agg.pending_change(later),
            Change::Link,
            "back up as it ages out"
        );
    }

    /// A link reported down by both ends for a minute still shows its last measured RTT, but
    /// aged a minute: the age is that of the RTT shown, not of the newest report (an up/down
    /// word refreshed it every second, so a dead link's last RTT looked fresh).
    #[test]
    fn the_rtt_matrix_ages_the_rtt_it_shows() {
        let t0 = Instant::now();
        let mut agg = LiveAggregator::new(LiveParams::default(), Arc::new(topo()));
        step(&mut agg, 80.0, t0);
        let later = t0 + Duration::from_secs(60);
        for (me, peer) in [("e", "t"), ("t", "e")] {
            agg.observe(Sample::one_link(me, peer, None, false), later);
        }
        let row = &agg.rtt_matrix(later)[0];
        assert_eq!(row.rtt_ms, Some(80.0));
        assert_eq!(row.age_ms, Some(60_000), "{row:?}");
    }

    /// A router's report carries both RTTs of a link: the one it routes on (the lowest of its
    /// last 10 s, which the weight follows) and QUIC's smoothed one, queueing included; the RTT
    /// matrix shows both, so that an operator sees a link's queue that routing leaves out.
    #[test]
    fn the_rtt_matrix_shows_the_smoothed_rtt_beside_the_routing_one() {
        use router::telemetry::{NeighbourReport, TelemetryReport};
        let t0 = Instant::now();
        let mut agg = LiveAggregator::new(LiveParams::default(), Arc::new(topo()));
        let report = |node: &str, peer: &str, srtt_us: u64| TelemetryReport {
            node: NodeId::new(node),
            snapshot_version: 1,
            neighbours: vec![NeighbourReport {
                id: NodeId::new(peer),
                rtt_us: 1_000,
                up: true,
                srtt_us,
                path_mtu: 1452,
                lost_packets: 0,
                dial_failures: 0,
            }],
            sites: Vec::new(),
            preferred: BTreeMap::new(),
            draining: false,
            hysteresis: None,
        };
        let (sample, _) = super::super::distribute::sample_of(&report("e", "t", 41_500));
        agg.observe(sample, t0);
        let row = &agg.rtt_matrix(t0)[0];
        assert_eq!(row.rtt_ms, Some(1.0));
        assert_eq!(row.srtt_ms, Some(41.5), "{row:?}");
        // An older router's report (no smoothed RTT) leaves the last one shown.
        let (older, _) = super::super::distribute::sample_of(&report("t", "e", 0));
        agg.observe(older, t0 + Duration::from_secs(1));
        assert_eq!(agg.rtt_matrix(t0)[0].srtt_ms, Some(41.5));
    }

    /// A report costs its own size, not the fabric's: the same 200-neighbour report takes about
    /// as long against 200 links as against 4,200 links that are all observed. (Looking links up
    /// by scanning the topology, and comparing the whole merged state after each report, made a
    /// report cost its neighbours times the fabric's links, under the controller's lock.)
    #[test]
    fn a_report_costs_its_own_size_not_the_fabrics() {
        fn hub(b: &mut TopologyBuilder, hub: &str, prefix: &str, n: usize) -> Sample {
            b.node(hub, NodeKind::Transit);
            for i in 0..n {
                let e = format!("{prefix}{i}");
                b.node(&e, NodeKind::Edge).link(hub, &e, ms(1.0));
            }
            Sample {
                node: NodeId::new(hub),
                neighbours: (0..n)
                    .map(|i| NeighbourSample {
                        neighbour: NodeId::new(format!("{prefix}{i}")),
                        rtt: Some(Duration::from_millis(9)),
                        up: true,
                        srtt: None,
                    })
                    .collect(),
                site: None,
                services: BTreeMap::new(),
                preferred: BTreeMap::new(),
                margins: None,
            }
        }
        let now = Instant::now();
        // The fastest of a few runs: the machine is shared, and only the trend matters here.
        let cost = |agg: &mut LiveAggregator, s: &Sample| {
            (0..5)
                .map(|_| {
                    let s = s.clone();
                    let t = Instant::now();
                    agg.observe(s, now);
                    t.elapsed()
                })
                .min()
                .unwrap()
        };
        let mut b = TopologyBuilder::new();
        let report = hub(&mut b, "t0", "a", 200);
        let mut agg = LiveAggregator::new(LiveParams::default(), Arc::new(b.build()));
        let small = cost(&mut agg, &report);
        let big = hub(&mut b, "t1", "b", 4000);
        let mut agg = LiveAggregator::new(LiveParams::default(), Arc::new(b.build()));
        agg.observe(big, now);
        agg.publish(agg.merged(now));
        let large = cost(&mut agg, &report);
        assert!(
            large < small * 10 + Duration::from_millis(2),
            "200 neighbours cost {small:?} against 200 links, {large:?} against 4,200"
        );
    }

    /// A site's report is published per service as well as summed, each with its own
    /// anti-flap band: routing reads a service's own load (`LiveState::load_of`).
    #[test]
    fn a_sites_load_is_published_per_service() {
        let mut b = TopologyBuilder::new();
        b.node("s", NodeKind::Site)
            .service("chat")
            .service("embed")
            .serve("s", "chat", 100)
            .serve("s", "embed", 100);
        let mut agg = LiveAggregator::new(LiveParams::default(), Arc::new(b.build()));
        let load = |active_streams, capacity| SiteLoad {
            active_streams,
            capacity,
            healthy: true,
        };
        let report = |chat, embed| Sample {
            node: NodeId::new("s"),
            neighbours: Vec::new(),
            site: Some(load(chat + embed, 200)),
            services: [
                (ServiceName::new("chat"), load(chat, 100)),
                (ServiceName::new("embed"), load(embed, 100)),
            ]
            .into(),
            preferred: BTreeMap::new(),
            margins: None,
        };
        let now = Instant::now();
        // A first report, healthy and with room: routing read the site so before it.
        assert_eq!(agg.observe(report(90, 0), now), Change::Gradual);
        agg.publish(agg.merged(now));
        let per = |agg: &LiveAggregator, s: &str| agg.published().service_load["s"][s];
        assert_eq!(per(&agg, "chat"), load(90, 100));
        assert_eq!(per(&agg, "embed"), load(0, 100));
        assert_eq!(agg.published().site_load["s"], load(90, 200));
        // Within 5 % of a service's capacity: nothing moves, nothing to push.
        assert_eq!(agg.observe(report(87, 3), now), Change::None);
        assert_eq!(agg.merged(now), *agg.published());
        // One service moving past its band is a change, though the sum stays within its own.
        // Only a cost moves: a gradual change.
        assert_eq!(agg.observe(report(84, 0), now), Change::Gradual);
        agg.publish(agg.merged(now));
        assert_eq!(per(&agg, "chat"), load(84, 100));
        assert_eq!(agg.published().site_load["s"], load(90, 200));
    }

    /// The load band never holds a load across the line where the site is full: reaching its
    /// capacity within the band is published (routers then take it off their candidates), and
    /// so is room again. (96 of 100 stayed published while the site was at 100 of 100.)
    #[test]
    fn a_site_filling_up_within_the_band_is_published_full() {
        let mut b = TopologyBuilder::new();
        b.node("s", NodeKind::Site)
            .service("chat")
            .serve("s", "chat", 100);
        let mut agg = LiveAggregator::new(LiveParams::default(), Arc::new(b.build()));
        let load = |active| chat_load(active, 100);
        let report = |active| chat_report(active, 100);
        let now = Instant::now();
        let chat = |agg: &LiveAggregator| agg.published().service_load["s"]["chat"];
        agg.observe(report(96), now);
        agg.publish(agg.merged(now));
        assert_eq!(chat(&agg), load(96));
        assert_eq!(
            agg.observe(report(100), now),
            Change::Urgent,
            "full is an urgent change"
        );
        agg.publish(agg.merged(now));
        assert_eq!(chat(&agg), load(100));
        assert_eq!(chat(&agg).penalty(100), None, "no candidate while full");
        assert_eq!(agg.published().site_load["s"], load(100));
        assert_eq!(
            agg.observe(report(98), now),
            Change::Urgent,
            "room again is an urgent change"
        );
        agg.publish(agg.merged(now));
        assert_eq!(chat(&agg), load(98));
        // Within the band on the same side of the line: held.
        assert_eq!(agg.observe(report(95), now), Change::None);
        // Below the band: a gradual change; unhealthy: an urgent one.
        assert_eq!(agg.observe(report(90), now), Change::Gradual);
        let mut sick = report(90);
        for l in sick.site.iter_mut().chain(sick.services.values_mut()) {
            l.healthy = false;
        }
        assert_eq!(agg.observe(sick, now), Change::Urgent);
    }

    /// Only a site's report of the services it serves is published: a site naming a service
    /// it does not serve, an edge or a transit reporting a site's load, or an edge reporting a
    /// site in use that does not serve the service, is left out (every name a router reported
    /// was published to every router, every time). A topology that stops a site serving a
    /// service drops that service's load at once.
    #[test]
    fn only_what_sites_serve_is_published() {
        let mut b = TopologyBuilder::new();
        b.node("e", NodeKind::Edge)
            .node("t", NodeKind::Transit)
            .node("s", NodeKind::Site)
            .node("s2", NodeKind::Site)
            .service("chat")
            .service("embed")
            .serve("s", "chat", 100)
            .serve("s", "embed", 100)
            .serve("s2", "embed", 100);
        let mut agg = LiveAggregator::new(LiveParams::default(), Arc::new(b.build()));
        let load = |active_streams| SiteLoad {
            active_streams,
            capacity: 100,
            healthy: true,
        };
        let report = |node: &str, services: &[(&str, u32)]| {
            let services: BTreeMap<ServiceName, SiteLoad> = services
                .iter()
                .map(|(s, n)| (ServiceName::new(s), load(*n)))
                .collect();
            Sample {
                node: NodeId::new(node),
                neighbours: Vec::new(),
                site: summed(&services),
                services,
                preferred: BTreeMap::new(),
                margins: None,
            }
        };
        let now = Instant::now();
        agg.observe(report("s", &[("chat", 10), ("invented", 50)]), now);
        agg.observe(report("e", &[("chat", 1)]), now);
        agg.observe(report("t", &[("made-up", 1)]), now);
        // A site that reports only what it does not serve reports nothing.
        agg.observe(report("s2", &[("chat", 7)]), now);
        let mut choices = report("e", &[]);
        choices.preferred = BTreeMap::from([
            (ServiceName::new("chat"), NodeId::new("s")),
            (ServiceName::new("embed"), NodeId::new("t")),
            (ServiceName::new("invented"), NodeId::new("s")),
        ]);
        agg.observe(choices, now);
        let merged = agg.merged(now);
        assert_eq!(
            merged.service_load,
            BTreeMap::from([(
                NodeId::new("s"),
                BTreeMap::from([(ServiceName::new("chat"), load(10))])
            )]),
        );
        assert_eq!(
            merged.site_load,
            BTreeMap::from([(NodeId::new("s"), load(10))]),
            "summed over what is kept"
        );
        assert_eq!(
            agg.incumbents(now),
            BTreeMap::from([(
                NodeId::new("e"),
                BTreeMap::from([(ServiceName::new("chat"), NodeId::new("s"))])
            )])
        );
        // s stops serving chat: its load for chat goes with it.
        let mut b = TopologyBuilder::new();
        b.node("s", NodeKind::Site)
            .service("embed")
            .serve("s", "embed", 100);
        agg.set_topology(Index::new(Arc::new(b.build())));
        assert_eq!(agg.merged(now), LiveState::default());
    }

    /// Samples resuming after a gap start a new average: an 80 ms RTT seen before the link
    /// went quiet does not drag the first fresh 1 ms samples up (it gave 59 ms, published as
    /// a 29.5 ms weight, and took ~10 samples to fade).
    #[test]
    fn a_stale_average_is_not_revived() {
        let mut agg = LiveAggregator::new(LiveParams::default(), Arc::new(topo()));
        let t0 = Instant::now();
        for _ in 0..20 {
            step(&mut agg, 80.0, t0);
        }
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            step(&mut agg, 1.0, later),
            None,
            "the declared 0.5 ms applies"
        );
    }

    /// Observations of links and nodes that a new topology no longer has are dropped.
    #[test]
    fn a_new_topology_drops_what_it_no_longer_has() {
        let mut agg = LiveAggregator::new(LiveParams::default(), Arc::new(topo()));
        let now = Instant::now();
        step(&mut agg, 1.0, now);
        assert_eq!(agg.links.len(), 1);
        let mut b = TopologyBuilder::new();
        b.node("e", NodeKind::Edge);
        agg.set_topology(Index::new(Arc::new(b.build())));
        assert!(agg.links.is_empty());
    }

    #[test]
    fn weights_publish_clear_excess_and_fall_back_to_declared_at_the_floor() {
        let mut agg = LiveAggregator::new(
            LiveParams {
                alpha: 1.0, // no smoothing: each step is the measurement
                ..LiveParams::default()
            },
            Arc::new(topo()),
        );
        let now = Instant::now();
        // Measured at the declared latency (RTT 1 ms, one-way 0.5 ms) or a little above it:
        // nothing published, the declared value applies.
        assert_eq!(step(&mut agg, 1.0, now), None);
        assert_eq!(
            step(&mut agg, 4.0, now),
            None,
            "1.5 ms excess is under 2 ms"
        );
        // Startup inflation, then back: the excess goes away with it (no sticky 2.6 ms).
        assert_eq!(step(&mut agg, 5.2, now), Some(2.6));
        assert_eq!(step(&mut agg, 4.6, now), Some(2.6), "anti-flap keeps 2.6");
        assert_eq!(step(&mut agg, 1.2, now), None, "back at the floor");
        // Never below the declared latency.
        assert_eq!(step(&mut agg, 0.1, now), None);
        assert_eq!(step(&mut agg, 80.0, now), Some(40.0));
    }

    /// A weight held by the anti-flap band is not kept under a declared latency that an apply
    /// raised past it: the measurement, floored at the new declared value, goes out instead.
    /// (9.6 ms stayed published for a link declared at 10 ms: routers take snapshot weights
    /// as they are, so they routed on less than the link's propagation delay.)
    #[test]
    fn a_held_weight_never_stays_under_a_raised_declared_latency() {
        let mut agg = LiveAggregator::new(
            LiveParams {
                alpha: 1.0,
                ..LiveParams::default()
            },
            Arc::new(topo()),
        );
        let now = Instant::now();
        assert_eq!(step(&mut agg, 19.2, now), Some(9.6));
        // 11.5 ms one way: within the 2 ms band of 9.6.
        assert_eq!(
            step(&mut agg, 23.0, now),
            Some(9.6),
            "held: within the band"
        );
        let mut raised = topo();
        raised.links[0].latency = topology::Latency::from_micros(10_000);
        agg.set_topology(Index::new(Arc::new(raised)));
        // 1.5 ms above the new floor: a weight of its own, the measurement.
        let weight = step(&mut agg, 23.0, now);
        assert_eq!(weight, Some(11.5), "not held under the declared 10 ms");
    }
}
