//! `GET /v1/status`: routers (applied version, last seen, behind/NACK), per service the site
//! and path each edge uses in the controller's live view, and the RTT matrix.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use topology::NodeKind;
use topology::graph::Graph;
use topology::route::RoutingTable;

use super::{AdminState, ApiError, NoQuery, off_workers};
use crate::controller::live::RttEntry;
use crate::controller::records::Nack;

pub fn routes() -> axum::Router<AdminState> {
    axum::Router::new()
        .route("/v1/status", get(status))
        .route("/v1/rtt", get(rtt))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub topology_version: u64,
    pub snapshot_version: u64,
    pub routers: Vec<RouterStatus>,
    pub services: Vec<ServiceStatus>,
    pub rtt: Vec<RttRow>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RouterStatus {
    pub node: String,
    pub kind: String,
    pub connected: bool,
    pub applied_version: u64,
    pub applied_topology: u64,
    /// Milliseconds since the controller last heard from it (None: never).
    pub last_seen_ms_ago: Option<u64>,
    /// Not running the current snapshot version.
    pub behind: bool,
    pub last_nack: Option<Nack>,
    /// Neighbour samples of its telemetry refused as implausible since the controller started.
    #[serde(default)]
    pub samples_refused: u64,
    /// Telemetry reports dropped for coming too fast since the controller started.
    #[serde(default)]
    pub reports_dropped: u64,
    /// Telemetry reports dropped for naming another node than the router's own.
    #[serde(default)]
    pub reports_misnamed: u64,
    /// It is draining before it stops: new connections go around it.
    #[serde(default)]
    pub draining: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub service: String,
    pub edges: Vec<EdgeChoice>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EdgeChoice {
    pub edge: String,
    /// None: no eligible site.
    pub site: Option<String>,
    pub path: Vec<String>,
    pub cost_ms: Option<f64>,
    /// The edge reported this site in use (its telemetry); false: no fresh report names an
    /// eligible site, and the controller shows the cheapest one.
    #[serde(default)]
    pub reported: bool,
    /// The sites the edge's new connections try first, with their expected shares: the equally
    /// near sites that share them with `site` by weight (`site` first), and the sites traffic
    /// dials send some to; empty when `site` takes them all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<topology::route::Share>,
    /// Some candidate of the edge has a traffic dial (under 100 %) for the service.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dialled: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RttRow {
    pub link: String,
    pub a: String,
    pub b: String,
    pub rtt_ms: Option<f64>,
    /// QUIC's smoothed RTT, queueing included (absent from an older controller's answer).
    #[serde(default)]
    pub srtt_ms: Option<f64>,
    pub declared_one_way_ms: f64,
    pub weight_ms: f64,
    pub up: bool,
    pub age_ms: Option<u64>,
}

impl From<RttEntry> for RttRow {
    fn from(e: RttEntry) -> Self {
        RttRow {
            link: e.link,
            a: e.a,
            b: e.b,
            rtt_ms: e.rtt_ms,
            srtt_ms: e.srtt_ms,
            declared_one_way_ms: e.declared_one_way_ms,
            weight_ms: e.weight_ms,
            up: e.up,
            age_ms: e.age_ms,
        }
    }
}

/// Whether the router of `record` is behind: not on the snapshot published (`snapshot`), or not
/// on the topology in force (`in_force`) when no snapshot could carry it yet (an apply answered
/// `not_distributed`: every router on the last snapshot read as current under the new
/// version's header).
fn behind(record: &crate::controller::records::RouterRecord, snapshot: u64, in_force: u64) -> bool {
    record.applied_version != snapshot || record.applied_topology != in_force
}

/// The status now. Heavy: a routing table (a shortest-path search) per edge, seconds for a
/// fabric of thousands of nodes, so the handler runs it off the runtime's workers.
pub fn build(st: &AdminState) -> Status {
    #[cfg(test)]
    st.status_gate.pass();
    let ctl = &st.ctl;
    let cur = ctl.current();
    let published = ctl.published();
    let now_ms = crate::controller::records::now_unix_ms();
    let live = published.live.clone();
    let topo = &cur.topology;
    let known: HashMap<String, _> = ctl
        .routers()
        .into_iter()
        .map(|r| (r.record.node.clone(), r))
        .collect();
    let routers = topo
        .nodes
        .iter()
        .map(|n| {
            let r = known.get(n.id.as_str());
            RouterStatus {
                node: n.id.to_string(),
                kind: n.kind.to_string(),
                connected: r.is_some_and(|r| r.connected),
                applied_version: r.map_or(0, |r| r.record.applied_version),
                applied_topology: r.map_or(0, |r| r.record.applied_topology),
                // By the record's wall-clock time, which a restart keeps: the in-memory instant
                // of a router loaded from the store is the controller's start (a router silent
                // for a week showed as seen seconds ago), and an instant cannot reach back past
                // the host's boot.
                last_seen_ms_ago: r
                    .filter(|r| r.record.last_seen_unix_ms != 0)
                    .map(|r| now_ms.saturating_sub(r.record.last_seen_unix_ms)),
                behind: r.is_none_or(|r| behind(&r.record, published.version, cur.record.version)),
                last_nack: r.and_then(|r| r.record.last_nack.clone()),
                samples_refused: r.map_or(0, |r| r.samples_refused),
                reports_dropped: r.map_or(0, |r| r.reports_dropped),
                reports_misnamed: r.map_or(0, |r| r.reports_misnamed),
                draining: r.is_some_and(|r| r.connected && r.draining),
            }
        })
        .collect();
    let graph = Graph::new(topo);
    let incumbents = ctl.incumbents();
    let mut services: Vec<ServiceStatus> = topo
        .services
        .iter()
        .map(|s| ServiceStatus {
            service: s.name.to_string(),
            edges: Vec::new(),
        })
        .collect();
    for edge in topo.nodes.iter().filter(|n| n.kind == NodeKind::Edge) {
        let Ok(table) = RoutingTable::build(topo, &graph, &edge.id, &live) else {
            continue;
        };
        for s in &mut services {
            let ranked = table.candidates(&s.service);
            let (choice, reported) =
                topology::diff::in_use(&incumbents, &edge.id, &s.service, ranked);
            let shares = topology::diff::shares_of(ranked, choice, &[]);
            s.edges.push(EdgeChoice {
                edge: edge.id.to_string(),
                site: choice.map(|c| c.site.to_string()),
                path: choice
                    .map(|c| c.path.iter().map(|n| n.to_string()).collect())
                    .unwrap_or_default(),
                cost_ms: choice.map(|c| c.cost.as_millis_f64()),
                reported,
                shares,
                dialled: ranked.iter().any(|c| !topology::is_full_dial(&c.dial)),
            });
        }
    }
    Status {
        topology_version: cur.record.version,
        snapshot_version: published.version,
        routers,
        services,
        rtt: ctl.rtt_matrix().into_iter().map(RttRow::from).collect(),
    }
}

/// A status build's answer: the JSON body with its share of the answers' budget, or the
/// status and reason there is none.
type Answer = Result<super::SharedAnswer, (StatusCode, String)>;

/// The build running: its number, the topology version it started at, and its answer.
type Running = (u64, u64, watch::Receiver<Option<Answer>>);

/// The `GET /v1/status` build in progress, which calls share: a call that arrives while one
/// runs waits for its answer instead of starting another. Each build is a routing table per
/// edge, seconds of CPU on a large fabric, on a blocking thread: a dashboard refreshed by many
/// operators at once, or a client retrying, would otherwise run as many builds as calls
/// (threads from the blocking pool, up to its 512, and the cores the routers' sessions need).
/// A shared answer is at most one build older than the call that joined it, and of the same
/// topology version.
#[derive(Default)]
pub struct StatusBuilds {
    running: Mutex<Option<Running>>,
    /// Builds started.
    started: AtomicU64,
    /// Calls that have a build to wait for (started or joined).
    #[cfg(test)]
    pub(crate) calls: AtomicU64,
}

impl StatusBuilds {
    /// Builds started since the controller started.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }
}

/// [`build`] on tokio's blocking pool ([`off_workers`]): on a runtime worker it would stall the
/// routers' control sessions and every other request that worker serves while it runs. Calls
/// at the same time share one build ([`StatusBuilds`]).
async fn status(State(st): State<AdminState>, _: Query<NoQuery>) -> Response {
    let builds = st.status_builds.clone();
    // A build started at another topology version is not joined: a call made after an apply
    // shows the applied version.
    let version = st.ctl.current().record.version;
    let mut answer = {
        let mut running = builds.running.lock().unwrap_or_else(|p| p.into_inner());
        match &*running {
            Some((_, at, answer)) if *at == version => answer.clone(),
            _ => {
                let (tx, answer) = watch::channel(None);
                let number = builds.started.fetch_add(1, Ordering::Relaxed) + 1;
                *running = Some((number, version, answer.clone()));
                let builds = builds.clone();
                // A task of its own: the build finishes, and is shared, even when the call
                // that started it goes away.
                tokio::spawn(async move {
                    let built = off_workers(move || {
                        serde_json::to_vec(&build(&st)).map_err(|e| {
                            ApiError::new(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                format!("encoding the status: {e}"),
                            )
                        })
                    })
                    .await
                    .and_then(|body| super::SharedAnswer::new(Bytes::from(body)))
                    .map_err(|e| (e.status, e.error));
                    // Cleared before the answer goes (unless a newer build took the place): a
                    // call from now on starts a new build.
                    let mut running = builds.running.lock().unwrap_or_else(|p| p.into_inner());
                    if running.as_ref().is_some_and(|(n, _, _)| *n == number) {
                        *running = None;
                    }
                    drop(running);
                    tx.send_replace(Some(built));
                });
                answer
            }
        }
    };
    #[cfg(test)]
    builds.calls.fetch_add(1, Ordering::SeqCst);
    let built = match answer.wait_for(Option::is_some).await {
        Ok(built) => built.clone(),
        Err(_) => None,
    };
    match built {
        // Held against the answers' budget once per build: the calls that share it share one
        // allocation.
        Some(Ok(answer)) => answer.response(),
        Some(Err((status, error))) => ApiError::new(status, error).into_response(),
        None => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal: the status build ended without an answer",
        )
        .into_response(),
    }
}

/// The RTT matrix, built and encoded off the runtime's workers (a row per link of the topology,
/// up to 250,000: it was built on a worker, under the controller's lock, for every call).
async fn rtt(State(st): State<AdminState>, _: Query<NoQuery>) -> Result<Response, ApiError> {
    let ctl = st.ctl.clone();
    let body = super::off_workers(move || {
        let rows: Vec<RttRow> = ctl.rtt_matrix().into_iter().map(RttRow::from).collect();
        serde_json::to_vec(&rows)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
    })
    .await?;
    super::held_body(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A router on the snapshot published is behind when that snapshot does not carry the
    /// topology in force (an apply not distributed). (Only the snapshot's version was compared.)
    #[test]
    fn a_router_on_a_snapshot_without_the_topology_in_force_is_behind() {
        let record = |applied_version, applied_topology| crate::controller::records::RouterRecord {
            node: "e".into(),
            applied_version,
            applied_topology,
            last_seen_unix_ms: 0,
            last_nack: None,
        };
        assert!(!behind(&record(7, 2), 7, 2));
        assert!(behind(&record(6, 2), 7, 2));
        assert!(
            behind(&record(7, 1), 7, 2),
            "version 2 in force, not distributed"
        );
    }
}
