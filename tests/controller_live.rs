//! Real routers (data plane + control client, in-process) under a real controller: live link
//! weights from measured RTT, and forwarding while the controller is away (and after a router
//! restart from its snapshot on disk).

mod controller_common;

use std::net::SocketAddr;
use std::time::Duration;

use controller_common::*;
use router::netem::{LinkEmulator, LinkProfile};
use topology::Latency;

/// edge-0 reaches site-0 through transit-1 (declared 5 ms) or transit-2 (declared 10 ms), on
/// 127.<net>.0.x with the free ports of [`fabric_ports`] (the same for each call with `net`).
fn two_path_yaml(net: u8) -> String {
    let FabricPorts {
        quic,
        service,
        backend,
    } = fabric_ports(net);
    format!(
        "# two paths
version: 1
nodes:
  - {{id: edge-0, kind: edge, region: r, country: AU, location: {{lat: 0, lon: 0}}, address: 127.{net}.0.1:{quic}, client_address: 127.{net}.0.1}}
  - {{id: transit-1, kind: transit, region: r, country: AU, location: {{lat: 0, lon: 0}}, address: 127.{net}.0.2:{quic}}}
  - {{id: transit-2, kind: transit, region: r, country: AU, location: {{lat: 0, lon: 0}}, address: 127.{net}.0.3:{quic}}}
  - id: site-0
    kind: site
    region: r
    country: AU
    location: {{lat: 0, lon: 0}}
    address: 127.{net}.0.4:{quic}
    serves:
      - {{service: echo, backend: 127.{net}.0.9:{backend}, capacity: 100}}
links:
  - {{a: edge-0, b: transit-1, latency: 5ms, capacity: 10Gbps}}
  - {{a: edge-0, b: transit-2, latency: 10ms, capacity: 10Gbps}}
  - {{a: transit-1, b: site-0, latency: 1ms, capacity: 10Gbps}}
  - {{a: transit-2, b: site-0, latency: 1ms, capacity: 10Gbps}}
services:
  - name: echo
    port: {service}
"
    )
}

const NODES: [&str; 4] = ["edge-0", "transit-1", "transit-2", "site-0"];

/// [`NODES`] as owned names.
fn nodes() -> Vec<String> {
    NODES.iter().map(|s| s.to_string()).collect()
}

fn addr(net: u8, host: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([127, net, 0, host], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raised_link_latency_moves_the_edge_to_another_path_without_a_topology_edit() {
    let net = 71;
    let dir = tempfile::tempdir().unwrap();
    let (d, tls) = controller_with_pki(dir.path(), &nodes(), &two_path_yaml(net)).await;
    let _backend = echo_backend(addr(net, 9, fabric_ports(net).backend)).await;

    // Both directions of edge-0 <-> transit-1 go through an emulator (each side dials).
    let e_to_t1 = LinkEmulator::spawn(
        addr(net, 1, 0),
        addr(net, 2, fabric_ports(net).quic),
        LinkProfile::delay(Latency::from_micros(500)),
    )
    .await
    .unwrap();
    let t1_to_e = LinkEmulator::spawn(
        addr(net, 2, 0),
        addr(net, 1, fabric_ports(net).quic),
        LinkProfile::delay(Latency::from_micros(500)),
    )
    .await
    .unwrap();
    let mut routers = Vec::new();
    for n in NODES {
        let dial: Vec<(&str, SocketAddr)> = match n {
            "edge-0" => vec![("transit-1", e_to_t1.local_addr())],
            "transit-1" => vec![("edge-0", t1_to_e.local_addr())],
            _ => vec![],
        };
        routers.push(LiveRouter::start(d.quic_addr, n, &tls, None, &dial).await);
    }
    let edge = &routers[0];
    eventually(
        Duration::from_secs(20),
        "edge-0 uses transit-1 (declared and measured fast)",
        || edge.path("echo") == ["edge-0", "transit-1", "site-0"],
    )
    .await;
    assert!(
        echo_through(addr(net, 1, fabric_ports(net).service)).await,
        "traffic flows"
    );
    eventually(
        Duration::from_secs(20),
        "the controller measured edge-0--transit-1",
        || {
            d.ctl
                .rtt_matrix()
                .iter()
                .any(|r| r.link == "edge-0--transit-1" && r.rtt_ms.is_some())
        },
    )
    .await;

    // 40 ms one way on edge-0 <-> transit-1: the measured weight (RTT/2) beats the declared 5 ms.
    e_to_t1.set_profile(LinkProfile::delay(Latency::from_micros(40_000)));
    t1_to_e.set_profile(LinkProfile::delay(Latency::from_micros(40_000)));
    eventually(
        Duration::from_secs(30),
        "edge-0 moves to transit-2 on live weights",
        || edge.path("echo") == ["edge-0", "transit-2", "site-0"],
    )
    .await;
    assert_eq!(
        d.ctl.current().record.version,
        1,
        "no topology edit happened"
    );
    let link = topology::LinkId::new(&"edge-0".into(), &"transit-1".into());
    eventually(
        Duration::from_secs(30),
        "the controller published the measured weight",
        || {
            d.ctl
                .published()
                .live
                .link_latency
                .get(&link)
                .is_some_and(|w| w.as_millis_f64() > 20.0)
        },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the edge runs the snapshot with the live weight",
        || {
            edge.client
                .snapshots()
                .borrow()
                .live
                .link_latency
                .get(&link)
                .is_some_and(|w| w.as_millis_f64() > 20.0)
        },
    )
    .await;
    assert_eq!(edge.path("echo"), ["edge-0", "transit-2", "site-0"]);
    assert!(
        echo_through(addr(net, 1, fabric_ports(net).service)).await,
        "traffic flows on the new path"
    );

    for r in routers {
        r.stop().await;
    }
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_forward_without_the_controller_restart_from_disk_and_resync() {
    let net = 72;
    let dir = tempfile::tempdir().unwrap();
    let (d, tls) = controller_with_pki(dir.path(), &nodes(), &two_path_yaml(net)).await;
    let ctl_addr = d.quic_addr;
    let _backend = echo_backend(addr(net, 9, fabric_ports(net).backend)).await;
    let rstate = |n: &str| Some(dir.path().join(format!("router-{n}")));
    let mut routers = Vec::new();
    for n in NODES {
        routers.push(LiveRouter::start(ctl_addr, n, &tls, rstate(n), &[]).await);
    }
    let v1 = d.ctl.published().version;
    eventually(Duration::from_secs(20), "all routers acknowledged", || {
        routers_acknowledged(&d, v1) == 4
    })
    .await;
    let client_addr = addr(net, 1, fabric_ports(net).service);
    eventually(Duration::from_secs(20), "traffic flows", || {
        routers[0].path("echo").len() == 3
    })
    .await;
    assert!(echo_through(client_addr).await);

    // Controller gone: forwarding continues on the last snapshot.
    d.shutdown().await;
    eventually(
        Duration::from_secs(10),
        "routers notice the controller is gone",
        || routers.iter().all(|r| !r.client.is_connected()),
    )
    .await;
    for _ in 0..3 {
        assert!(
            echo_through(client_addr).await,
            "forwarding without the controller"
        );
    }

    // The edge restarts while the controller is down: it runs from its snapshot on disk.
    let edge = routers.remove(0);
    let last = edge.client.snapshots().borrow().version;
    assert!(last >= v1);
    edge.stop().await;
    // (The old endpoint's UDP port is released once its last connection is gone.)
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let edge = loop {
        match LiveRouter::try_start(ctl_addr, "edge-0", &tls, rstate("edge-0"), &[]).await {
            Ok(r) => break r,
            Err(e) => {
                assert!(format!("{e}").contains("in use"), "{e}");
                assert!(
                    std::time::Instant::now() < deadline,
                    "the restarted edge could not bind for 30 s: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(
        edge.client.snapshots().borrow().version,
        last,
        "the last good snapshot, from disk"
    );
    assert!(!edge.client.is_connected());
    eventually(Duration::from_secs(20), "restarted edge has routes", || {
        edge.path("echo").len() == 3
    })
    .await;
    assert!(
        echo_through(client_addr).await,
        "restarted edge forwards from its on-disk snapshot"
    );
    routers.insert(0, edge);

    // Controller back (same address, same state): every router resyncs to its new version.
    let d2 = restart_controller(&dir.path().join("state"), &tls, ctl_addr).await;
    let v2 = d2.ctl.published().version;
    assert!(v2 > v1, "versions only grow across restarts");
    eventually(Duration::from_secs(30), "every router resynced", || {
        routers
            .iter()
            .all(|r| r.client.snapshots().borrow().version >= v2)
            && routers_acknowledged(&d2, v2) == 4
    })
    .await;
    assert!(echo_through(client_addr).await);
    for r in routers {
        r.stop().await;
    }
    d2.shutdown().await;
}

/// One router reporting an implausible RTT for a real neighbour (200 s: a one-way latency above
/// the 60 s routers decode) must not stop snapshot delivery. Taken in, it became a weight in
/// every snapshot that every router's decoder refused: each control session failed, reconnected,
/// got the same snapshot and failed again, and no change reached any router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_implausible_rtt_report_does_not_stop_snapshot_delivery() {
    use std::sync::Arc;

    let net = 73;
    let dir = tempfile::tempdir().unwrap();
    let (d, tls) = controller_with_pki(dir.path(), &nodes(), &two_path_yaml(net)).await;
    let mut clients = Vec::new();
    for n in NODES {
        clients.push(start_client(d.quic_addr, n, &tls, None).await);
    }
    let report = telemetry_report(
        "edge-0",
        vec![
            neighbour("transit-1", 200_000_000),
            neighbour("transit-2", 4_000),
        ],
    );
    clients[0].set_telemetry(Arc::new(move || Some(report.clone())));
    // The same report carries a plausible sample: once it is merged, so was the bad one.
    eventually(
        Duration::from_secs(10),
        "the controller merged edge-0's report",
        || {
            d.ctl
                .rtt_matrix()
                .iter()
                .any(|r| r.link == "edge-0--transit-2" && r.rtt_ms.is_some())
        },
    )
    .await;

    let raised = two_path_yaml(net).replace("latency: 10ms", "latency: 11ms");
    let out = apply(&d, &raised, "raise edge-0--transit-2").await;
    assert_eq!(out.version, Some(2));
    eventually(
        Duration::from_secs(20),
        "every router runs topology version 2",
        || clients.iter().all(|c| c.topology_version() == 2),
    )
    .await;
    for (n, c) in NODES.iter().zip(&clients) {
        assert_eq!(c.connects(), 1, "{n} lost its control connection");
    }
    let edge = router_status(&d, "edge-0").expect("edge-0 is known");
    assert!(edge.samples_refused > 0, "the refusal is counted");
    assert!(
        !d.ctl
            .published()
            .live
            .link_latency
            .keys()
            .any(|l| l.to_string() == "edge-0--transit-1"),
        "no weight from the implausible sample"
    );
    d.shutdown().await;
}
