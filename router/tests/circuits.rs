//! Circuits in the data plane, in process: real routers (edge -> transit -> site over mutual-TLS
//! QUIC), real TCP clients bound to distinct loopback source addresses, a real TCP backend.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use router::Snapshot;
use topology::circuit::{CircuitId, ProvisionedCircuit};
use topology::{Bandwidth, NodeId, ServiceName, Topology};

use common::traffic::{assert_refused, blast, connect_from, sink_backend, steady_mbps};
use common::{ca_dir, free_tcp_port, line_topology, spawn_all, wait_until};

fn topo(backend: SocketAddr, port: u16) -> Topology {
    let mut t = line_topology("llm", backend, port);
    t.services[0].requires_circuit = true;
    t
}

fn circuit(
    id: &str,
    prefix: &str,
    vip: Option<IpAddr>,
    port: u16,
    mbps: u64,
) -> ProvisionedCircuit {
    ProvisionedCircuit {
        id: CircuitId::new(id),
        edge: NodeId::new("edge"),
        prefix: prefix.parse().unwrap(),
        service: ServiceName::new("llm"),
        vip,
        port: Some(port),
        rate: Bandwidth::from_mbps(mbps),
        path: ["edge", "transit", "site"]
            .into_iter()
            .map(NodeId::new)
            .collect(),
    }
}

/// Circuit 1 (100 Mbit/s, reached at its VIP) and circuit 2 (40 Mbit/s, reached at the service
/// listener by its source prefix) on the same edge, each carrying a bulk transfer at once: each
/// gets 90-100 % of its own rate over more than 5 s of steady state. A client from a prefix with
/// no circuit is refused, because the service requires circuits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuits_on_one_edge_carry_their_own_rates_and_others_are_refused() {
    let dir = ca_dir();
    let (backend, got) = sink_backend().await;
    let port = free_tcp_port();
    let t = topo(backend, port);
    let vip: IpAddr = Ipv4Addr::new(127, 77, 0, 1).into();
    let mut snap = Snapshot::new(1, Arc::new(t));
    snap.circuits = Arc::new(vec![
        circuit("c-000001", "127.0.0.2/32", Some(vip), port, 100),
        circuit("c-000002", "127.0.0.3/32", None, port, 40),
    ]);
    let (hs, _txs) = spawn_all(&Arc::new(snap), dir.path(), |_, _| {}).await;
    wait_until(
        Duration::from_secs(10),
        || hs[0].routes().preferred("llm").is_some(),
        || "edge never got a route".into(),
    )
    .await;

    // No circuit for 127.0.0.4: refused (reset, possibly before connect() even returns).
    let listener = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
    assert_refused(Ipv4Addr::new(127, 0, 0, 4), listener).await;
    // Nor may 127.0.0.3 use circuit 1's VIP.
    assert_refused(Ipv4Addr::new(127, 0, 0, 3), SocketAddr::new(vip, port)).await;

    let dur = Duration::from_millis(6500);
    let c1 = connect_from(Ipv4Addr::new(127, 0, 0, 2), SocketAddr::new(vip, port))
        .await
        .unwrap();
    let c2 = connect_from(Ipv4Addr::new(127, 0, 0, 3), listener)
        .await
        .unwrap();
    tokio::join!(blast(c1, 1, dur), blast(c2, 2, dur));
    wait_until(
        Duration::from_secs(10),
        || got.lock().unwrap().len() >= 2,
        || "backend did not see both transfers end".into(),
    )
    .await;
    let got = got.lock().unwrap().clone();
    assert_eq!(
        got.len(),
        2,
        "only the two circuits' connections reached the backend"
    );
    let (r1, r2) = (steady_mbps(&got, 1), steady_mbps(&got, 2));
    eprintln!(
        "circuit 1: {r1:.2} Mbit/s of 100; circuit 2: {r2:.2} Mbit/s of 40 (concurrently, same edge)"
    );
    assert!(
        (90.0..=100.5).contains(&r1),
        "circuit 1 carried {r1:.2} Mbit/s"
    );
    assert!(
        (36.0..=40.2).contains(&r2),
        "circuit 2 carried {r2:.2} Mbit/s"
    );
    let m = hs[0].metrics_text();
    assert!(m.contains("circuit_refused"), "refusals are counted: {m}");
    for h in hs {
        h.shutdown().await;
    }
}
