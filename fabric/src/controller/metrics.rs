//! The controller's Prometheus text, served by `tasman controller --metrics ADDR`: the versions in
//! force, each router's control session, topology changes, the router connections it closed,
//! circuits by state and the certificate the controller presents.
//!
//! It has a listener of its own, without authentication, as a router's `/metrics` has, rather than
//! a route on the admin API: every admin route is behind the bearer token by construction (see
//! [`crate::admin`]), and a scraper should not hold a token that can also change the topology.
//! The text tells no more than node ids, versions, counts and the certificate's expiry.
//!
//! Series are bounded by the nodes of the topology in force (routers of earlier topologies the
//! controller still remembers are left out) and the circuit states; the text's size does not grow
//! with traffic, circuits or history. A scrape reads the in-memory state and one store read
//! transaction (the whole circuits table, so its cost grows with it), on the blocking pool, as an
//! admin `GET` does (`router::metrics::serve_metrics` renders it there).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Instant;

use router::tls::CertResolver;

use super::distribute::SessionCloses;
use super::{ChangeCount, Controller, RouterLive};
use crate::circuits::CircuitState;
use crate::store;

/// The whole text of one scrape (Prometheus text exposition 0.0.4).
pub fn render(ctl: &Controller, cert: &CertResolver) -> String {
    let mut s = String::with_capacity(4096);
    let cur = ctl.current();
    let topology = &cur.topology;
    gauge(
        &mut s,
        "topology_version",
        "Topology version in force.",
        cur.record.version,
    );
    gauge(
        &mut s,
        "snapshot_version",
        "Snapshot version distributed now (a router's tasman_snapshot_version once it applied it).",
        ctl.published().version,
    );
    gauge(
        &mut s,
        "topology_nodes",
        "Nodes (routers) in the topology in force.",
        topology.nodes.len(),
    );
    // The topology's routers, in its order; one the controller has not heard of yet as new.
    let mut known: HashMap<String, RouterLive> = ctl
        .routers()
        .into_iter()
        .map(|r| (r.record.node.clone(), r))
        .collect();
    let routers: Vec<RouterLive> = topology
        .nodes
        .iter()
        .map(|n| {
            known
                .remove(n.id.as_str())
                .unwrap_or_else(|| RouterLive::unrecorded(n.id.as_str(), false))
        })
        .collect();
    gauge(
        &mut s,
        "routers_connected",
        "Routers of the topology with a control session open now.",
        routers.iter().filter(|r| r.connected).count(),
    );
    per_router(&mut s, &routers);
    changes(&mut s, "applies", "Topology applies", ctl.applies());
    changes(&mut s, "rollbacks", "Topology rollbacks", ctl.rollbacks());
    sessions_closed(&mut s, ctl);
    handshakes_turned(&mut s, ctl);
    circuits(&mut s, ctl);
    cert.render_metrics(cert.name(), &mut s);
    s
}

/// `tasman_controller_{name}`'s HELP and TYPE lines.
fn header(s: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(
        s,
        "# HELP tasman_controller_{name} {help}\n# TYPE tasman_controller_{name} {kind}"
    );
}

/// One unlabelled gauge.
fn gauge(s: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    header(s, name, "gauge", help);
    let _ = writeln!(s, "tasman_controller_{name} {value}");
}

/// One series per router, labelled `node`; the telemetry age only for routers that reported.
fn per_router(s: &mut String, routers: &[RouterLive]) {
    type Value = fn(&RouterLive, Instant) -> Option<String>;
    let now = Instant::now();
    let series: [(&str, &str, &str, Value); 8] = [
        (
            "router_connected",
            "gauge",
            "1 while the router has a control session open.",
            |r, _| Some(u8::from(r.connected).to_string()),
        ),
        (
            "router_draining",
            "gauge",
            "1 while the router reports that it drains before it stops.",
            |r, _| Some(u8::from(r.connected && r.draining).to_string()),
        ),
        (
            "router_applied_snapshot_version",
            "gauge",
            "Snapshot version the router last acknowledged (0: none known).",
            |r, _| Some(r.record.applied_version.to_string()),
        ),
        (
            "router_applied_topology_version",
            "gauge",
            "Topology version of the snapshot the router last acknowledged (0: none known).",
            |r, _| Some(r.record.applied_topology.to_string()),
        ),
        (
            "router_telemetry_age_seconds",
            "gauge",
            "Seconds since the router's last telemetry report (routers send one a second; only reports merged count, not those over the rate or naming another node; no series before its first report since the controller started).",
            |r, now| {
                r.last_telemetry
                    .map(|t| format!("{:.3}", now.saturating_duration_since(t).as_secs_f64()))
            },
        ),
        (
            "router_reports_dropped_total",
            "counter",
            "Telemetry reports of the router dropped for coming too fast, since the controller started.",
            |r, _| Some(r.reports_dropped.to_string()),
        ),
        (
            "router_reports_misnamed_total",
            "counter",
            "Telemetry reports of the router dropped for naming another node, since the controller started.",
            |r, _| Some(r.reports_misnamed.to_string()),
        ),
        (
            "router_samples_refused_total",
            "counter",
            "Neighbour samples of the router's telemetry refused as implausible, since the controller started.",
            |r, _| Some(r.samples_refused.to_string()),
        ),
    ];
    for (name, kind, help, value) in series {
        header(s, name, kind, help);
        for r in routers {
            if let Some(v) = value(r, now) {
                let node = &r.record.node;
                let _ = writeln!(s, "tasman_controller_{name}{{node=\"{node}\"}} {v}");
            }
        }
    }
}

/// `tasman_controller_topology_{kind}_total{result="accepted|rejected"}`.
fn changes(s: &mut String, kind: &str, what: &str, n: ChangeCount) {
    let name = format!("topology_{kind}_total");
    header(
        s,
        &name,
        "counter",
        &format!(
            "{what} since the controller started: accepted (committed and distributed), or rejected (invalid, conflicting, failed, or committed but not distributed); dry runs are not counted."
        ),
    );
    for (result, v) in [("accepted", n.accepted), ("rejected", n.rejected)] {
        let _ = writeln!(s, "tasman_controller_{name}{{result=\"{result}\"}} {v}");
    }
}

/// `tasman_controller_sessions_closed_total{reason}`, every reason (0 when none).
fn sessions_closed(s: &mut String, ctl: &Controller) {
    let name = "sessions_closed_total";
    header(
        s,
        name,
        "counter",
        "Router connections the controller closed since it started, by reason: not_allowed (a topology change removed the node), refused (unknown node or name mismatch), protocol (a frame over its limit, undecodable, or an answer to a version the session did not send), hello_timeout, write_stalled (the router took no byte of its control stream for the write-stall bound), superseded (a newer session of the same node took over).",
    );
    for code in SessionCloses::REASONS {
        let (v, reason) = (ctl.session_closes.get(code), SessionCloses::reason(code));
        let _ = writeln!(s, "tasman_controller_{name}{{reason=\"{reason}\"}} {v}");
    }
}

/// `tasman_controller_handshakes_{retried,refused,timed_out}_total`.
fn handshakes_turned(s: &mut String, ctl: &Controller) {
    let (validate_above, max) = router::transport::HandshakeGate::CONTROLLER;
    let t = &ctl.handshakes_turned;
    for (name, help, v) in [
        (
            "handshakes_retried_total",
            format!(
                "Incoming router handshakes sent a Retry to prove their address first (more than {validate_above} in progress)."
            ),
            &t.retried,
        ),
        (
            "handshakes_refused_total",
            format!("Incoming router handshakes refused: {max} were in progress."),
            &t.refused,
        ),
        (
            "handshakes_timed_out_total",
            format!(
                "Incoming router handshakes dropped unfinished {}s after they began.",
                router::transport::HANDSHAKE_TIMEOUT.as_secs()
            ),
            &t.timed_out,
        ),
    ] {
        header(s, name, "counter", &help);
        let _ = writeln!(
            s,
            "tasman_controller_{name} {}",
            v.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
}

/// `tasman_controller_circuits{state}`, every state (0 when none is in it), of the live circuits
/// table: a circuit archived after the retention period (`--circuit-retention`) is no longer
/// counted, so `decommissioned` counts those of that period. Left out, with a warning, when the
/// store cannot be read: the other series still tell what they know.
fn circuits(s: &mut String, ctl: &Controller) {
    let all = match store::read(&**ctl.store(), |tx| crate::circuits::all(tx)) {
        Ok(all) => all,
        Err(e) => {
            tracing::warn!("metrics: reading circuits: {e}");
            return;
        }
    };
    header(s, "circuits", "gauge", "Circuits by lifecycle state.");
    for state in CircuitState::ALL {
        let n = all.iter().filter(|c| c.state == state).count();
        let _ = writeln!(s, "tasman_controller_circuits{{state=\"{state}\"}} {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::records::Origin;
    use crate::store::redb::RedbStore;
    use router::transport::Turned;
    use std::sync::Arc;

    const YAML: &str = "version: 1\nnodes:\n  - {id: e, kind: edge, region: r, country: AU, location: {lat: 0, lon: 0}, address: \"127.0.0.1:7000\", client_address: \"127.0.0.1\"}\n  - {id: s, kind: site, region: r, country: AU, location: {lat: 0, lon: 0}, address: \"127.0.0.2:7000\", serves: [{service: chat, backend: \"127.0.0.9:9001\", capacity: 10}]}\nlinks:\n  - {a: e, b: s, latency: 1ms, capacity: 1Gbps}\nservices:\n  - {name: chat, port: 8080}\n";

    /// The text parsed back: `name{labels}` -> value; every series must have HELP and TYPE lines.
    fn parse(text: &str) -> HashMap<String, f64> {
        let mut typed = std::collections::HashSet::new();
        let mut out = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("series value");
            let name = series.split('{').next().unwrap();
            assert!(typed.contains(name), "no TYPE line before {line:?}");
            out.insert(series.to_string(), value.parse().expect(line));
        }
        out
    }

    #[tokio::test]
    async fn every_router_of_the_topology_has_its_series_and_changes_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, Some((YAML, "t.yaml"))).unwrap();
        crate::controller::daemon::ensure_pki(&dir.path().join("pki")).unwrap();
        let id = router::tls::TlsIdentity::load(&dir.path().join("pki"), "controller").unwrap();
        let cert = CertResolver::new(&id).unwrap();
        // A router the topology no longer has stays out of the text.
        let (e, _) = ctl.router_session_start("e");
        let _gone = ctl.router_session_start("gone");
        assert!(ctl.router_ack(&e, ctl.published().version, 1));
        ctl.router_seen(&e);
        let bad = ctl
            .apply("nodes: [", "t", "broken", Origin::Apply, false, None)
            .await;
        assert!(bad.is_err());
        ctl.apply(YAML, "t", "dry", Origin::Apply, true, None)
            .await
            .unwrap();
        // A rollback to the version in force changes nothing and is not counted; a real one
        // (to 1 from 2, a comment added) is.
        assert_eq!(
            ctl.rollback(1, "t", "", false, None).await.unwrap().version,
            None
        );
        let commented = format!("# two\n{YAML}");
        ctl.apply(&commented, "t", "comment", Origin::Apply, false, None)
            .await
            .unwrap();
        assert_eq!(
            ctl.rollback(1, "t", "", false, None).await.unwrap().version,
            Some(3)
        );
        assert!(ctl.rollback(99, "t", "", false, None).await.is_err());

        ctl.handshakes_turned.count(Turned::Retried);
        ctl.handshakes_turned.count(Turned::Retried);
        ctl.handshakes_turned.count(Turned::Refused);
        let text = render(&ctl, &cert);
        let m = parse(&text);
        let v = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in\n{text}"));
        assert_eq!(v("tasman_controller_topology_version"), 3.0);
        assert_eq!(
            v("tasman_controller_snapshot_version"),
            ctl.published().version as f64
        );
        assert_eq!(v("tasman_controller_topology_nodes"), 2.0);
        assert_eq!(v("tasman_controller_routers_connected"), 1.0);
        assert_eq!(v("tasman_controller_router_connected{node=\"e\"}"), 1.0);
        assert_eq!(v("tasman_controller_router_connected{node=\"s\"}"), 0.0);
        assert_eq!(
            v("tasman_controller_router_applied_topology_version{node=\"e\"}"),
            1.0
        );
        assert_eq!(
            v("tasman_controller_router_applied_snapshot_version{node=\"s\"}"),
            0.0
        );
        assert!(v("tasman_controller_router_telemetry_age_seconds{node=\"e\"}") < 60.0);
        assert!(
            !text.contains("telemetry_age_seconds{node=\"s\"}"),
            "{text}"
        );
        assert!(!text.contains("\"gone\""), "{text}");
        assert_eq!(
            v("tasman_controller_topology_applies_total{result=\"accepted\"}"),
            1.0
        );
        assert_eq!(
            v("tasman_controller_topology_applies_total{result=\"rejected\"}"),
            1.0
        );
        assert_eq!(
            v("tasman_controller_topology_rollbacks_total{result=\"accepted\"}"),
            1.0
        );
        assert_eq!(
            v("tasman_controller_topology_rollbacks_total{result=\"rejected\"}"),
            1.0
        );
        assert_eq!(v("tasman_controller_handshakes_retried_total"), 2.0);
        assert_eq!(v("tasman_controller_handshakes_refused_total"), 1.0);
        assert_eq!(v("tasman_controller_handshakes_timed_out_total"), 0.0);
        for reason in SessionCloses::REASONS.map(SessionCloses::reason) {
            assert_eq!(
                v(&format!(
                    "tasman_controller_sessions_closed_total{{reason=\"{reason}\"}}"
                )),
                0.0
            );
        }
        for state in CircuitState::ALL {
            assert_eq!(
                v(&format!("tasman_controller_circuits{{state=\"{state}\"}}")),
                0.0
            );
        }
        assert_eq!(
            v("tasman_tls_cert_not_after_seconds{node=\"controller\"}"),
            cert.not_after() as f64
        );
        assert_eq!(v("tasman_tls_cert_reloads_total{node=\"controller\"}"), 0.0);
    }
}
