//! What a router reports about itself: to the controller (shipped by `router::control`), on
//! `/telemetry`, and in the Prometheus metrics.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use topology::{NodeId, ServiceName};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryReport {
    pub node: NodeId,
    /// The version of the snapshot this router applies now.
    pub snapshot_version: u64,
    pub neighbours: Vec<NeighbourReport>,
    /// Services this node serves as a site (empty for edges and transits).
    pub sites: Vec<SiteReport>,
    /// Edge only: service -> preferred site now.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub preferred: BTreeMap<String, String>,
    /// The router is draining before it stops: it takes no new stream, and reports its links
    /// down and its services unhealthy so that new connections go around it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    /// Edge only: the anti-flap margins it picks its preferred sites with (`--hysteresis-*`),
    /// so that the controller's apply plan predicts its moves as it makes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hysteresis: Option<HysteresisReport>,
}

/// An edge's anti-flap margins: a cheaper site takes over only if it is at least `margin_us`
/// cheaper and below `ratio` times the cost of the site in use.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HysteresisReport {
    pub margin_us: u64,
    pub ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeighbourReport {
    pub id: NodeId,
    /// The link's RTT as routing takes it, in microseconds (0 when never connected): the lowest
    /// sampled over the last 10 s (probe round trips, QUIC's smoothed RTT), so that a queue the
    /// link's own traffic builds does not count.
    pub rtt_us: u64,
    pub up: bool,
    /// QUIC's smoothed RTT of our connection to it, queueing included, in microseconds (0 when
    /// never connected).
    #[serde(default)]
    pub srtt_us: u64,
    /// Largest UDP payload the connection has confirmed (path MTU discovery), bytes; 0 when
    /// there is no connection.
    #[serde(default)]
    pub path_mtu: u16,
    /// Packets QUIC declared lost to the neighbour since the router started, over all its
    /// connections (never lower than an earlier report).
    #[serde(default)]
    pub lost_packets: u64,
    /// Dial attempts to it that ended without a usable connection (none, or one closed before it
    /// answered a probe: e.g. it refused our certificate), since this router started.
    #[serde(default)]
    pub dial_failures: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteReport {
    pub service: ServiceName,
    pub healthy: bool,
    pub active_streams: u32,
    pub capacity: u32,
}

/// What [`TelemetryReport::trim_to`] left out of a report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trimmed {
    pub preferred: usize,
    pub neighbours_up: usize,
    pub neighbours_down: usize,
    pub sites: usize,
}

/// Bytes of `,"preferred":{}`: what the first preferred entry adds besides its own.
const PREFERRED_FIELD: usize = 15;

impl TelemetryReport {
    /// The length of its JSON, counted without building it.
    pub fn json_len(&self) -> usize {
        json_len(self)
    }

    /// Leaves entries out until its JSON takes at most `max` bytes (a router reports to a
    /// controller that refuses a larger frame, and a router's neighbours are bounded only by the
    /// topology's links). What carries the most news is kept first: entries are taken in this
    /// order until one does not fit: the site entries, the neighbours that are down, those that
    /// are up, the preferred sites (each group in its order). So a report over `max` loses its
    /// preferred sites first, then neighbours that are up, then those that are down, site
    /// entries last. What is kept keeps its order. Returns what was left out (nothing when it
    /// fit already).
    pub fn trim_to(&mut self, max: usize) -> Trimmed {
        if self.json_len() <= max {
            return Trimmed::default();
        }
        let bare = TelemetryReport {
            node: self.node.clone(),
            snapshot_version: self.snapshot_version,
            neighbours: Vec::new(),
            sites: Vec::new(),
            preferred: BTreeMap::new(),
            draining: self.draining,
            hysteresis: self.hysteresis,
        };
        // Entries are taken in that order while they fit; the first that does not ends it (a
        // smaller one further on does not jump the queue). Each costs its JSON and a comma, but
        // a list's first entry none; the first preferred site brings the field itself.
        let mut budget = Budget {
            used: bare.json_len(),
            max,
            full: false,
        };
        let mut first = true;
        let mut sites = vec![false; self.sites.len()];
        for (i, site) in self.sites.iter().enumerate() {
            sites[i] = budget.take(json_len(site) + usize::from(!first));
            first &= !sites[i];
        }
        let mut neighbours = vec![false; self.neighbours.len()];
        let mut first = true;
        for up in [false, true] {
            for (i, n) in self.neighbours.iter().enumerate() {
                if n.up == up {
                    neighbours[i] = budget.take(json_len(n) + usize::from(!first));
                    first &= !neighbours[i];
                }
            }
        }
        let mut first = true;
        let preferred: Vec<bool> = self
            .preferred
            .iter()
            .map(|(service, site)| {
                let extra = if first { PREFERRED_FIELD } else { 1 };
                let kept = budget.take(json_len(service) + 1 + json_len(site) + extra);
                first &= !kept;
                kept
            })
            .collect();

        let mut out = Trimmed::default();
        let before = self.sites.len();
        let mut keep = sites.into_iter();
        self.sites.retain(|_| keep.next().unwrap_or(false));
        out.sites = before - self.sites.len();
        let mut keep = neighbours.into_iter();
        self.neighbours.retain(|n| {
            let kept = keep.next().unwrap_or(false);
            if !kept {
                if n.up {
                    out.neighbours_up += 1;
                } else {
                    out.neighbours_down += 1;
                }
            }
            kept
        });
        let before = self.preferred.len();
        let mut keep = preferred.into_iter();
        self.preferred.retain(|_, _| keep.next().unwrap_or(false));
        out.preferred = before - self.preferred.len();
        out
    }
}

/// Bytes of a report's JSON: taken by its entries, in order, until one does not fit.
struct Budget {
    used: usize,
    max: usize,
    /// An entry did not fit: none after it is taken.
    full: bool,
}

impl Budget {
    /// Whether an entry of `n` bytes is kept (and counted).
    fn take(&mut self, n: usize) -> bool {
        self.full = self.full || self.used + n > self.max;
        if !self.full {
            self.used += n;
        }
        !self.full
    }
}

/// Bytes of `v`'s JSON (0 if it does not serialise, which the report's types always do).
fn json_len<T: Serialize + ?Sized>(v: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    serde_json::to_writer(&mut c, v).map_or(0, |()| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neighbour(i: usize, up: bool) -> NeighbourReport {
        NeighbourReport {
            id: NodeId::new(format!("n{i:04}")),
            rtt_us: 1_000 + i as u64,
            up,
            srtt_us: 1_500 + i as u64,
            path_mtu: 1452,
            lost_packets: 0,
            dial_failures: 0,
        }
    }

    /// Two sites, 100 neighbours (every fourth down), two preferred sites.
    fn report() -> TelemetryReport {
        TelemetryReport {
            node: NodeId::new("hub"),
            snapshot_version: 7,
            neighbours: (0..100).map(|i| neighbour(i, i % 4 != 0)).collect(),
            sites: ["chat", "embed"]
                .map(|s| SiteReport {
                    service: ServiceName::new(s),
                    healthy: true,
                    active_streams: 3,
                    capacity: 10,
                })
                .to_vec(),
            preferred: [("chat", "syd"), ("embed", "mel")]
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .into(),
            draining: false,
            hysteresis: Some(HysteresisReport {
                margin_us: 10_000,
                ratio: 2.0 / 3.0,
            }),
        }
    }

    fn len(r: &TelemetryReport) -> usize {
        serde_json::to_vec(r).unwrap().len()
    }

    #[test]
    fn a_report_that_fits_is_left_as_it_is() {
        let mut r = report();
        let whole = r.clone();
        assert_eq!(r.json_len(), len(&r));
        assert_eq!(r.trim_to(len(&r)), Trimmed::default());
        assert_eq!(r, whole);
    }

    /// Preferred sites go first, then neighbours that are up, then those that are down, site
    /// entries last; what is kept keeps its order and its values, and the JSON fits.
    #[test]
    fn a_report_loses_preferred_then_up_then_down_neighbours_then_sites() {
        let whole = report();
        let fits = |r: &TelemetryReport, max: usize| {
            assert!(len(r) <= max, "{} bytes for {max}", len(r));
            let ids: Vec<&NodeId> = r.neighbours.iter().map(|n| &n.id).collect();
            let mut sorted = ids.clone();
            sorted.sort();
            assert_eq!(ids, sorted, "order kept");
            for n in &r.neighbours {
                assert!(whole.neighbours.contains(n), "{n:?}");
            }
        };
        let one = json_len(&neighbour(0, true)) + 1;

        // A little short: a preferred site goes (the last), nothing else.
        let max = len(&whole) - 10;
        let mut r = whole.clone();
        let t = r.trim_to(max);
        fits(&r, max);
        assert_eq!(
            t,
            Trimmed {
                preferred: 1,
                ..Trimmed::default()
            }
        );
        assert_eq!(r.preferred.keys().collect::<Vec<_>>(), ["chat"]);
        assert_eq!(r.neighbours, whole.neighbours);
        // Room for all but the preferred sites: they all go, nothing else.
        let mut unpreferred = whole.clone();
        unpreferred.preferred.clear();
        let max = len(&unpreferred);
        let mut r = whole.clone();
        let t = r.trim_to(max);
        fits(&r, max);
        assert_eq!(
            t,
            Trimmed {
                preferred: 2,
                ..Trimmed::default()
            }
        );
        assert_eq!(r, unpreferred);

        // Room for the sites and about half the neighbours: every down one is kept.
        let mut bare = whole.clone();
        bare.neighbours.clear();
        bare.preferred.clear();
        let max = len(&bare) + 50 * one;
        let mut r = whole.clone();
        let t = r.trim_to(max);
        fits(&r, max);
        assert_eq!(r.sites, whole.sites);
        assert_eq!(t.neighbours_down, 0, "{t:?}");
        assert_eq!(r.neighbours.iter().filter(|n| !n.up).count(), 25);
        assert!((48..=50).contains(&r.neighbours.len()), "{t:?}");
        assert_eq!(t.neighbours_up + r.neighbours.len(), 100);
        assert_eq!(t.preferred, 2);

        // Room for the sites and 10 neighbours: 10 of the down ones.
        let max = len(&bare) + 10 * one;
        let mut r = whole.clone();
        let t = r.trim_to(max);
        fits(&r, max);
        assert_eq!(r.sites, whole.sites);
        assert!(r.neighbours.iter().all(|n| !n.up));
        assert_eq!(t.neighbours_up, 75);
        assert!((9..=10).contains(&r.neighbours.len()), "{t:?}");

        // Not even room for the sites: the bare report, node and version.
        bare.sites.clear();
        let max = len(&bare) + 5;
        let mut r = whole.clone();
        let t = r.trim_to(max);
        fits(&r, max);
        assert_eq!(r, bare);
        assert_eq!(
            t,
            Trimmed {
                preferred: 2,
                neighbours_up: 75,
                neighbours_down: 25,
                sites: 2
            }
        );
    }
}
