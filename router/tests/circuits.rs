//! Circuits in the data plane, in process: real routers (edge -> transit -> site over mutual-TLS
//! QUIC), real TCP clients bound to distinct loopback source addresses, a real TCP backend.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use router::{Router, RouterConfig, RouterHandle, Snapshot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use topology::builder::{TopologyBuilder, ms};
use topology::circuit::{CircuitId, ProvisionedCircuit};
use topology::{Bandwidth, NodeId, NodeKind, ServiceName, SiteService, Topology};

use common::{free_tcp_port, free_udp};

/// Per connection: the tag (first byte), and (time, bytes so far) samples.
type Received = Arc<Mutex<Vec<(u8, Vec<(Instant, u64)>)>>>;

/// A backend that reads everything and records, per connection, when bytes arrived.
async fn sink_backend() -> (SocketAddr, Received) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let got: Received = Arc::default();
    let g = got.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let g = g.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0u64;
                let mut samples = Vec::new();
                let mut tag = 0u8;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if total == 0 {
                        tag = buf[0];
                    }
                    total += n as u64;
                    samples.push((Instant::now(), total));
                }
                // Health checks connect and close without data: not transfers.
                if total > 0 {
                    g.lock().unwrap().push((tag, samples));
                }
            });
        }
    });
    (addr, got)
}

/// Steady-state rate of one connection in Mbit/s: bytes after the first `skip`, over the time
/// from then to the last byte (which must be at least `min`).
fn steady_mbps(samples: &[(Instant, u64)], skip: Duration, min: Duration) -> f64 {
    let t0 = samples[0].0 + skip;
    let start = samples.iter().find(|(t, _)| *t >= t0).expect("long enough");
    let (t_end, end) = *samples.last().unwrap();
    let d = t_end - start.0;
    assert!(d >= min, "measured over {d:?} only");
    (end - start.1) as f64 * 8.0 / d.as_secs_f64() / 1e6
}

fn topo(backend: SocketAddr, port: u16) -> Topology {
    let mut b = TopologyBuilder::new();
    b.node("edge", NodeKind::Edge)
        .node("transit", NodeKind::Transit)
        .node("site", NodeKind::Site)
        .link("edge", "transit", ms(1.0))
        .link("transit", "site", ms(1.0))
        .service("llm");
    let mut t = b.build();
    for n in &mut t.nodes {
        n.address = free_udp();
        if n.kind == NodeKind::Edge {
            n.client_address = Some(Ipv4Addr::LOCALHOST.into());
        }
        if n.kind == NodeKind::Site {
            n.serves.push(SiteService {
                service: ServiceName::new("llm"),
                backend,
                capacity: 100,
                weight: 100,
            });
        }
    }
    t.services[0].port = Some(port);
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

async fn start(snap: Arc<Snapshot>, dir: &std::path::Path) -> Vec<RouterHandle> {
    let mut hs = Vec::new();
    for n in &snap.topology.nodes {
        router::pki::issue(dir, n.id.as_str()).unwrap();
        let tls = router::tls::TlsIdentity::load(dir, n.id.as_str()).unwrap();
        let (tx, rx) = tokio::sync::watch::channel(snap.clone());
        std::mem::forget(tx);
        hs.push(
            Router::spawn(RouterConfig::new(n.id.clone(), tls, rx))
                .await
                .unwrap(),
        );
    }
    hs
}

async fn connect_from(src: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(src.into(), 0))?;
    s.connect(to).await
}

/// The edge must refuse a client from `src` to `to`: reset or closed, no reply.
async fn assert_refused(src: Ipv4Addr, to: SocketAddr) {
    let Ok(mut c) = connect_from(src, to).await else {
        return;
    };
    let _ = c.write_all(b"hello").await;
    let mut b = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
        .await
        .expect("refusal is prompt");
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "{src} -> {to} was carried: {r:?}"
    );
}

/// Writes `tag` bytes as fast as the path takes them for `dur`, then half-closes.
async fn blast(mut s: TcpStream, tag: u8, dur: Duration) {
    let buf = vec![tag; 64 * 1024];
    let end = Instant::now() + dur;
    while Instant::now() < end {
        if s.write_all(&buf).await.is_err() {
            return;
        }
    }
    let _ = s.shutdown().await;
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
}

/// Circuit 1 (100 Mbit/s, reached at its VIP) and circuit 2 (40 Mbit/s, reached at the service
/// listener by its source prefix) on the same edge, each carrying a bulk transfer at once: each
/// gets 90-100 % of its own rate over more than 5 s of steady state. A client from a prefix with
/// no circuit is refused, because the service requires circuits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuits_on_one_edge_carry_their_own_rates_and_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    router::pki::init(dir.path()).unwrap();
    let (backend, got) = sink_backend().await;
    let port = free_tcp_port();
    let t = topo(backend, port);
    let vip: IpAddr = Ipv4Addr::new(127, 77, 0, 1).into();
    let mut snap = Snapshot::new(1, Arc::new(t));
    snap.circuits = Arc::new(vec![
        circuit("c-000001", "127.0.0.2/32", Some(vip), port, 100),
        circuit("c-000002", "127.0.0.3/32", None, port, 40),
    ]);
    let hs = start(Arc::new(snap), dir.path()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while hs[0].routes().preferred("llm").is_none() {
        assert!(Instant::now() < deadline, "edge never got a route");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

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
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.lock().unwrap().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "backend did not see both transfers end"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = got.lock().unwrap().clone();
    assert_eq!(
        got.len(),
        2,
        "only the two circuits' connections reached the backend"
    );
    let rate = |tag: u8| {
        let (_, s) = got
            .iter()
            .find(|(t, _)| *t == tag)
            .expect("tagged transfer");
        steady_mbps(s, Duration::from_millis(500), Duration::from_secs(5))
    };
    let (r1, r2) = (rate(1), rate(2));
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
