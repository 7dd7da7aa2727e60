//! In-process fabric: routers spawned with `Router::spawn` on one runtime (as the demo does),
//! real QUIC and TCP on loopback.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use router::{Router, RouterConfig, RouterHandle, Snapshot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use topology::builder::{TopologyBuilder, ms};
use topology::{NodeId, NodeKind, ServiceName, SiteService, Topology};

fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn echo_backend() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

fn topo(backend: SocketAddr, port: u16) -> Topology {
    let mut b = TopologyBuilder::new();
    b.node("edge", NodeKind::Edge)
        .node("transit", NodeKind::Transit)
        .node("site", NodeKind::Site)
        .link("edge", "transit", ms(1.0))
        .link("transit", "site", ms(1.0))
        .service("echo");
    let mut t = b.build();
    for n in &mut t.nodes {
        n.address = free_udp();
        if n.kind == NodeKind::Edge {
            n.client_address = Some(Ipv4Addr::LOCALHOST.into());
        }
        if n.kind == NodeKind::Site {
            n.serves.push(SiteService {
                service: ServiceName::new("echo"),
                backend,
                capacity: 100,
                weight: 100,
            });
        }
    }
    t.services[0].port = Some(port);
    t
}

type Source = tokio::sync::watch::Sender<Arc<Snapshot>>;

/// Starts node `id` on `snap` with a certificate issued in `dir`; `hold_down` overrides the
/// default.
async fn spawn_node(
    snap: &Arc<Snapshot>,
    dir: &std::path::Path,
    id: &str,
    hold_down: Option<Duration>,
) -> (RouterHandle, Source) {
    router::pki::issue(dir, id).unwrap();
    let tls = router::tls::TlsIdentity::load(dir, id).unwrap();
    let (tx, rx) = tokio::sync::watch::channel(snap.clone());
    let mut cfg = RouterConfig::new(NodeId::new(id), tls, rx);
    if let Some(h) = hold_down {
        cfg.probe.hold_down = h;
    }
    (Router::spawn(cfg).await.unwrap(), tx)
}

async fn start(t: &Topology, dir: &std::path::Path) -> (Vec<RouterHandle>, Vec<Source>) {
    let snap = Arc::new(Snapshot::new(1, Arc::new(t.clone())));
    let mut hs = Vec::new();
    let mut txs = Vec::new();
    for n in &t.nodes {
        let (h, tx) = spawn_node(&snap, dir, n.id.as_str(), None).await;
        hs.push(h);
        txs.push(tx);
    }
    (hs, txs)
}

/// Polls `cond` every 20 ms until it holds; fails with `why()` once `within` has passed.
async fn wait_until(within: Duration, mut cond: impl FnMut() -> bool, why: impl Fn() -> String) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "{}", why());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn echo_roundtrip(port: u16, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    c.write_all(msg).await?;
    c.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut back)).await??;
    Ok(back)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_through_edge_transit_site_in_process() {
    let dir = tempfile::tempdir().unwrap();
    router::pki::init(dir.path()).unwrap();
    let backend = echo_backend().await;
    let port = free_tcp_port();
    let t = topo(backend, port);
    let (hs, txs) = start(&t, dir.path()).await;
    wait_until(
        Duration::from_secs(10),
        || hs[0].routes().preferred("echo").is_some(),
        || format!("edge never got a route: {:?}", hs[0].telemetry()),
    )
    .await;
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let msg = vec![7u8; 300_000];
    c.write_all(&msg).await.unwrap();
    c.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back.len(), msg.len());
    assert!(back == msg);
    let m = hs[0].metrics_text();
    assert!(m.contains("tasman_streams_total{node=\"edge\"} 1"), "{m}");

    // A new snapshot moves the service to another port: the edge binds it and closes the old one.
    let new_port = free_tcp_port();
    let mut t2 = t.clone();
    t2.services[0].port = Some(new_port);
    let snap2 = Arc::new(Snapshot::new(2, Arc::new(t2)));
    for tx in &txs {
        tx.send(snap2.clone()).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let moved = hs.iter().all(|h| h.telemetry().snapshot_version == 2)
            && echo_roundtrip(new_port, b"v2")
                .await
                .is_ok_and(|b| b == b"v2")
            && tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err();
        if moved {
            break;
        }
        assert!(Instant::now() < deadline, "snapshot 2 not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for h in hs {
        h.shutdown().await;
    }
}

/// A neighbour that starts after this router (its first dials fail) is up at its first answered
/// probe: the hold-down is for neighbours that were up and went down, not for late starters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neighbour_that_starts_late_is_up_without_a_hold_down() {
    let dir = tempfile::tempdir().unwrap();
    router::pki::init(dir.path()).unwrap();
    let backend = echo_backend().await;
    let port = free_tcp_port();
    let t = topo(backend, port);
    let snap = Arc::new(Snapshot::new(1, Arc::new(t)));
    // A hold-down far longer than the test may take: were it applied, the edge would stay
    // without a route until the deadline below.
    let long = Some(Duration::from_secs(600));
    let (edge, _edge_tx) = spawn_node(&snap, dir.path(), "edge", long).await;
    let failures = |h: &RouterHandle| {
        h.telemetry()
            .neighbours
            .iter()
            .find(|n| n.id.as_str() == "transit")
            .map_or(0, |n| n.dial_failures)
    };
    wait_until(
        Duration::from_secs(20),
        || failures(&edge) > 0,
        || "no failed dial to the transit yet".into(),
    )
    .await;
    assert!(
        edge.metrics_text()
            .contains("tasman_neighbour_dial_failures_total{node=\"edge\",neighbour=\"transit\"} ")
    );
    assert!(edge.routes().preferred("echo").is_none());

    let (_transit, _ttx) = spawn_node(&snap, dir.path(), "transit", None).await;
    let (_site, _stx) = spawn_node(&snap, dir.path(), "site", None).await;
    wait_until(
        Duration::from_secs(20),
        || edge.routes().preferred("echo").is_some(),
        || {
            format!(
                "the edge held its late neighbour down: {:?}",
                edge.telemetry()
            )
        },
    )
    .await;
    assert_eq!(echo_roundtrip(port, b"late").await.unwrap(), b"late");
}
