//! The controller's Prometheus endpoint (`tasman controller --metrics`), scraped over real HTTP
//! while real control clients connect, acknowledge and report, a topology change is applied (and
//! a broken one refused), a circuit is created through the real CLI and the controller's
//! certificate is re-issued; and the CLI flag on the real binary.

mod controller_common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use controller_common::*;
use fabric::controller::daemon::{self, DaemonConfig};
use fabric::controller::records::Origin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(30);

/// e1 -- t1 -- s1 with a service that only circuits reach and a VIP pool; `ms` is the declared
/// latency of e1--t1. Nothing listens at the addresses: only control clients run.
fn topology(ms: u32) -> String {
    let node = |id: &str, kind: &str, n: u8, extra: &str| {
        format!(
            "  - id: {id}\n    kind: {kind}\n    region: au-east\n    country: AU\n    location: {{lat: -33.9, lon: 151.2}}\n    address: \"127.0.67.{n}:7000\"\n{extra}"
        )
    };
    format!(
        "version: 1\nnodes:\n{}{}{}links:\n  - {{a: e1, b: t1, latency: {ms}ms, capacity: 1Gbps}}\n  - {{a: t1, b: s1, latency: 1ms, capacity: 1Gbps}}\nservices:\n  - name: llm\n    port: 8443\n    requires_circuit: true\npools:\n  - {{name: vips, prefix: 127.79.0.0/28}}\n",
        node("e1", "edge", 1, "    client_address: \"127.0.0.1\"\n"),
        node("t1", "transit", 2, ""),
        node(
            "s1",
            "site",
            3,
            "    serves:\n      - {service: llm, backend: \"127.0.67.9:9001\", capacity: 100}\n"
        ),
    )
}

/// One `GET /metrics`: (status line and headers, body).
async fn scrape(addr: SocketAddr) -> (String, String) {
    let mut c = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to /metrics");
    c.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut back = String::new();
    tokio::time::timeout(DEADLINE, c.read_to_string(&mut back))
        .await
        .expect("the scrape is answered")
        .unwrap();
    let (head, body) = back.split_once("\r\n\r\n").expect("a response");
    (head.to_string(), body.to_string())
}

/// The text's series, `name{labels}` -> value; every series name has HELP and TYPE lines first.
fn series(text: &str) -> HashMap<String, f64> {
    let mut described = std::collections::HashSet::new();
    let mut out = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            described.insert(format!("{} help", rest.split(' ').next().unwrap()));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            described.insert(format!("{} type", rest.split(' ').next().unwrap()));
        } else {
            let (s, v) = line.rsplit_once(' ').expect("`series value`");
            let name = s.split('{').next().unwrap();
            assert!(
                described.contains(&format!("{name} help"))
                    && described.contains(&format!("{name} type")),
                "{name} has no HELP or TYPE line"
            );
            let v = v.parse().unwrap_or_else(|_| panic!("value of {line:?}"));
            assert!(out.insert(s.to_string(), v).is_none(), "{s} twice");
        }
    }
    out
}

/// The series once `cond` holds of them; fails with the last text after [`DEADLINE`].
async fn scrape_until(
    addr: SocketAddr,
    what: &str,
    cond: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let start = Instant::now();
    loop {
        let (_, text) = scrape(addr).await;
        let s = series(&text);
        if cond(&s) {
            return s;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for: {what}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of `series` (panics when it is missing).
fn v(s: &HashMap<String, f64>, series: &str) -> f64 {
    *s.get(series)
        .unwrap_or_else(|| panic!("no {series} in {s:?}"))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Issues the controller a certificate valid for `days` from now; returns the bounds its expiry
/// must fall within (whole seconds, as X.509 stores it).
fn issue_controller(tls: &std::path::Path, days: u64) -> (u64, u64) {
    let d = days * 86_400;
    let before = unix_now();
    let v = router::pki::Validity::for_duration(Duration::from_secs(d)).unwrap();
    router::pki::issue_with(tls, "controller", v).unwrap();
    (before + d, unix_now() + d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_versions_routers_changes_circuits_and_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<String> = ["e1", "t1", "s1"].map(String::from).to_vec();
    let tls = dir.path().join("pki");
    pki(&tls, &nodes);
    let (earliest, latest) = issue_controller(&tls, 30);
    let d = daemon::start(DaemonConfig {
        metrics: Some("127.0.0.1:0".parse().unwrap()),
        cert_reload_interval: Duration::from_millis(50),
        ..import_config(&dir.path().join("state"), &tls, &topology(2))
    })
    .await
    .expect("controller starts");
    let addr = d.metrics_addr.expect("a metrics listener");

    // Before any router: no token needed, Prometheus text, every router of the topology listed.
    let (head, text) = scrape(addr).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let s = series(&text);
    assert_eq!(v(&s, "tasman_controller_topology_version"), 1.0);
    assert_eq!(
        v(&s, "tasman_controller_snapshot_version"),
        d.ctl.published().version as f64
    );
    assert_eq!(v(&s, "tasman_controller_topology_nodes"), 3.0);
    assert_eq!(v(&s, "tasman_controller_routers_connected"), 0.0);
    for n in &nodes {
        assert_eq!(
            v(
                &s,
                &format!("tasman_controller_router_connected{{node=\"{n}\"}}")
            ),
            0.0
        );
        assert_eq!(
            v(
                &s,
                &format!("tasman_controller_router_applied_snapshot_version{{node=\"{n}\"}}")
            ),
            0.0
        );
    }
    assert!(!text.contains("telemetry_age_seconds{"), "{text}");
    for result in ["accepted", "rejected"] {
        for kind in ["applies", "rollbacks"] {
            let k = format!("tasman_controller_topology_{kind}_total{{result=\"{result}\"}}");
            assert_eq!(v(&s, &k), 0.0);
        }
    }
    for state in fabric::circuits::CircuitState::ALL {
        assert_eq!(
            v(
                &s,
                &format!("tasman_controller_circuits{{state=\"{state}\"}}")
            ),
            0.0
        );
    }
    // The expiry of the certificate the controller presents, as issued.
    let not_after = v(&s, "tasman_tls_cert_not_after_seconds{node=\"controller\"}") as u64;
    assert!(
        (earliest.saturating_sub(1)..=latest + 1).contains(&not_after),
        "not_after {not_after} not within [{earliest}, {latest}]"
    );
    assert_eq!(
        v(&s, "tasman_tls_cert_reloads_total{node=\"controller\"}"),
        0.0
    );
    assert_eq!(
        v(
            &s,
            "tasman_tls_cert_reload_failures_total{node=\"controller\"}"
        ),
        0.0
    );

    // One router connects, acknowledges the snapshot and reports telemetry.
    let e1 = start_client(d.quic_addr, "e1", &tls, None).await;
    let report = telemetry_report("e1", vec![neighbour("t1", 2_000)]);
    e1.set_telemetry(Arc::new(move || Some(report.clone())));
    let snapshot = d.ctl.published().version as f64;
    let s = scrape_until(addr, "e1 connected, acknowledged and reporting", |s| {
        s.get("tasman_controller_routers_connected") == Some(&1.0)
            && s.get("tasman_controller_router_applied_snapshot_version{node=\"e1\"}")
                == Some(&snapshot)
            && s.contains_key("tasman_controller_router_telemetry_age_seconds{node=\"e1\"}")
    })
    .await;
    assert_eq!(
        v(&s, "tasman_controller_router_connected{node=\"e1\"}"),
        1.0
    );
    assert_eq!(
        v(&s, "tasman_controller_router_connected{node=\"t1\"}"),
        0.0
    );
    assert_eq!(
        v(
            &s,
            "tasman_controller_router_applied_topology_version{node=\"e1\"}"
        ),
        1.0
    );
    let age = v(
        &s,
        "tasman_controller_router_telemetry_age_seconds{node=\"e1\"}",
    );
    assert!((0.0..DEADLINE.as_secs_f64()).contains(&age), "{age}");

    // An apply is accepted; a broken one and an edit of a stale version are rejected; a dry run
    // is not counted. e1 acknowledges the new version.
    let out = apply(&d, &topology(5), "raise e1--t1").await;
    assert_eq!(out.version, Some(2));
    let refused = async |text: &str, base: Option<u64>, dry_run: bool| {
        d.ctl
            .apply(text, "test", "refused", Origin::Apply, dry_run, base)
            .await
            .is_err()
    };
    assert!(refused("nodes: [", None, false).await);
    assert!(
        refused(&topology(7), Some(1), false).await,
        "version 1 is stale"
    );
    assert!(refused("nodes: [", None, true).await);
    let snapshot = d.ctl.published().version as f64;
    let s = scrape_until(addr, "version 2 in force and acknowledged by e1", |s| {
        s.get("tasman_controller_router_applied_topology_version{node=\"e1\"}") == Some(&2.0)
            && s.get("tasman_controller_router_applied_snapshot_version{node=\"e1\"}")
                == Some(&snapshot)
    })
    .await;
    assert_eq!(v(&s, "tasman_controller_topology_version"), 2.0);
    assert_eq!(v(&s, "tasman_controller_snapshot_version"), snapshot);
    assert_eq!(
        v(
            &s,
            "tasman_controller_topology_applies_total{result=\"accepted\"}"
        ),
        1.0
    );
    assert_eq!(
        v(
            &s,
            "tasman_controller_topology_applies_total{result=\"rejected\"}"
        ),
        2.0
    );

    // A circuit through the CLI: provisioning while t1 and s1 have not acknowledged it...
    let env = Env::of(&d);
    let out = tokio::task::spawn_blocking(move || {
        tasman(
            &env,
            &[
                "circuit",
                "create",
                "--name",
                "acme",
                "--edge",
                "e1",
                "--prefix",
                "10.9.0.0/24",
                "--service",
                "llm",
                "--rate",
                "10Mbps",
            ],
            &[],
            "",
        )
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, text) = scrape(addr).await;
    let s = series(&text);
    assert_eq!(
        v(&s, "tasman_controller_circuits{state=\"provisioning\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(v(&s, "tasman_controller_circuits{state=\"active\"}"), 0.0);
    // ... active once every router on its path did.
    let t1 = start_client(d.quic_addr, "t1", &tls, None).await;
    let s1 = start_client(d.quic_addr, "s1", &tls, None).await;
    let s = scrape_until(addr, "three routers connected, the circuit active", |s| {
        s.get("tasman_controller_routers_connected") == Some(&3.0)
            && s.get("tasman_controller_circuits{state=\"active\"}") == Some(&1.0)
    })
    .await;
    assert_eq!(
        v(&s, "tasman_controller_circuits{state=\"provisioning\"}"),
        0.0
    );

    // A re-issued certificate: one reload, and the new expiry.
    let (earliest, latest) = issue_controller(&tls, 60);
    let s = scrape_until(addr, "the controller reloaded its certificate", |s| {
        s.get("tasman_tls_cert_reloads_total{node=\"controller\"}") == Some(&1.0)
    })
    .await;
    let not_after = v(&s, "tasman_tls_cert_not_after_seconds{node=\"controller\"}") as u64;
    assert!(
        (earliest.saturating_sub(1)..=latest + 1).contains(&not_after),
        "not_after {not_after} not within [{earliest}, {latest}]"
    );

    // A router that goes away is counted out.
    drop(e1);
    let s = scrape_until(addr, "e1 disconnected", |s| {
        s.get("tasman_controller_routers_connected") == Some(&2.0)
    })
    .await;
    assert_eq!(
        v(&s, "tasman_controller_router_connected{node=\"e1\"}"),
        0.0
    );
    drop((t1, s1));
    d.shutdown().await;
}

/// A control session closed for a newer one of its node is counted under `superseded`, and the
/// node is counted connected once, through its newer session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_session_is_counted_under_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("pki");
    pki(&tls, &["e1", "t1", "s1"].map(String::from));
    let d = daemon::start(DaemonConfig {
        metrics: Some("127.0.0.1:0".parse().unwrap()),
        ..import_config(&dir.path().join("state"), &tls, &topology(2))
    })
    .await
    .expect("controller starts");
    let addr = d.metrics_addr.expect("a metrics listener");
    let superseded = "tasman_controller_sessions_closed_total{reason=\"superseded\"}";
    let (_, text) = scrape(addr).await;
    assert_eq!(v(&series(&text), superseded), 0.0, "{text}");

    let old = raw_hello(d.quic_addr, &tls, "e1", "e1").await;
    scrape_until(addr, "e1's first session", |s| {
        s.get("tasman_controller_router_connected{node=\"e1\"}") == Some(&1.0)
    })
    .await;
    let new = raw_hello(d.quic_addr, &tls, "e1", "e1").await;
    let s = scrape_until(addr, "the older session counted as superseded", |s| {
        s.get(superseded) == Some(&1.0)
    })
    .await;
    assert_eq!(v(&s, "tasman_controller_routers_connected"), 1.0);
    assert_eq!(
        v(&s, "tasman_controller_router_connected{node=\"e1\"}"),
        1.0
    );
    for reason in ["refused", "protocol", "hello_timeout", "write_stalled"] {
        let k = format!("tasman_controller_sessions_closed_total{{reason=\"{reason}\"}}");
        assert_eq!(v(&s, &k), 0.0, "{k}");
    }
    tokio::time::timeout(DEADLINE, old.conn.closed())
        .await
        .expect("the older session is closed");
    assert!(new.conn.close_reason().is_none());
    d.shutdown().await;
}

/// A `tasman controller` process, killed when dropped.
struct Controller(std::process::Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `tasman controller` on `topology` with its state in `state` and `extra` flags; returns
/// it and the line it prints once it listens.
fn run_controller(
    topology: &std::path::Path,
    state: &std::path::Path,
    extra: &[&str],
) -> (Controller, String) {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_tasman"))
        .args(["controller", "--topology"])
        .arg(topology)
        .arg("--state")
        .arg(state)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run tasman controller");
    let stdout = child.stdout.take().unwrap();
    let child = Controller(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

/// `tasman controller --metrics 127.0.0.1:0` says where it serves them; without the flag it
/// serves none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_cli_serves_metrics_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("topology.yaml");
    std::fs::write(&file, topology(2)).unwrap();
    let (f, a, b) = (file.clone(), dir.path().join("a"), dir.path().join("b"));
    let ((_with, line), (_without, plain)) = tokio::task::spawn_blocking(move || {
        (
            run_controller(&f, &a, &["--metrics", "127.0.0.1:0"]),
            run_controller(&f, &b, &[]),
        )
    })
    .await
    .unwrap();
    assert!(line.starts_with("controller listening "), "{line:?}");
    let metrics = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("metrics="))
        .unwrap_or_else(|| panic!("no metrics= in {line:?}"));
    let (head, text) = scrape(metrics.parse().unwrap()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(v(&series(&text), "tasman_controller_topology_version"), 1.0);
    assert!(plain.starts_with("controller listening "), "{plain:?}");
    assert!(!plain.contains("metrics="), "{plain:?}");
}
