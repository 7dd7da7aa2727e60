//! Shared by the router's in-process tests: free loopback ports, topologies on loopback, routers
//! spawned in this process, an echo backend and round trip, metric values, and a deadline-bounded
//! wait. `traffic` has the bulk-traffic helpers of the circuit tests.
#![allow(dead_code)]

pub mod traffic;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use router::{Router, RouterConfig, RouterHandle, Snapshot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use topology::builder::{TopologyBuilder, ms};
use topology::{NodeId, NodeKind, ServiceName, SiteService, Topology};

/// A free UDP address on loopback, outside the kernel's ephemeral range (see `testkit`).
pub fn free_udp() -> SocketAddr {
    testkit::free_udp(Ipv4Addr::LOCALHOST.into())
}

/// A free TCP port on loopback, outside the kernel's ephemeral range (see `testkit`).
pub fn free_tcp_port() -> u16 {
    testkit::free_tcp_port(Ipv4Addr::LOCALHOST.into())
}

/// A temporary directory with a new CA in it, where [`spawn_node`] issues certificates.
pub fn ca_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    router::pki::init(dir.path()).unwrap();
    dir
}

/// Gives every node a free loopback address, every edge the client address 127.0.0.1, and the
/// first service `port`.
pub fn addressed(mut t: Topology, port: u16) -> Topology {
    for n in &mut t.nodes {
        n.address = free_udp();
        if n.kind == NodeKind::Edge {
            n.client_address = Some(Ipv4Addr::LOCALHOST.into());
        }
    }
    t.services[0].port = Some(port);
    t
}

/// Site `site` serves `service` from `backend` (capacity 100, weight 100).
pub fn serve(t: &mut Topology, site: &str, service: &str, backend: SocketAddr) {
    let n = t
        .nodes
        .iter_mut()
        .find(|n| n.id.as_str() == site)
        .unwrap_or_else(|| panic!("no node {site}"));
    n.serves.push(SiteService {
        service: ServiceName::new(service),
        backend,
        capacity: 100,
        weight: 100,
        dial: 100,
        health_check: None,
        health: Default::default(),
    });
}

/// Edge -> transit -> site (1 ms links) on loopback: `service` on `port`, served by `backend`.
pub fn line_topology(service: &str, backend: SocketAddr, port: u16) -> Topology {
    let mut b = TopologyBuilder::new();
    b.node("edge", NodeKind::Edge)
        .node("transit", NodeKind::Transit)
        .node("site", NodeKind::Site)
        .link("edge", "transit", ms(1.0))
        .link("transit", "site", ms(1.0))
        .service(service);
    let mut t = addressed(b.build(), port);
    serve(&mut t, "site", service, backend);
    t
}

/// Where a router gets its snapshots: keep it to send new ones; dropped, the router keeps the last.
pub type Source = tokio::sync::watch::Sender<Arc<Snapshot>>;

/// Starts node `id` on `snap` with a certificate issued in `dir`; `tune` adjusts the default
/// config.
pub async fn spawn_node(
    snap: &Arc<Snapshot>,
    dir: &std::path::Path,
    id: &str,
    tune: impl FnOnce(&mut RouterConfig),
) -> (RouterHandle, Source) {
    router::pki::issue(dir, id).unwrap();
    spawn_issued(snap, dir, id, tune).await
}

/// Like [`spawn_node`], with the certificate already issued in `dir` (e.g. with a chosen
/// validity).
pub async fn spawn_issued(
    snap: &Arc<Snapshot>,
    dir: &std::path::Path,
    id: &str,
    tune: impl FnOnce(&mut RouterConfig),
) -> (RouterHandle, Source) {
    let tls = router::tls::TlsIdentity::load(dir, id).unwrap();
    let (tx, rx) = tokio::sync::watch::channel(snap.clone());
    let mut cfg = RouterConfig::new(NodeId::new(id), tls, rx);
    tune(&mut cfg);
    (Router::spawn(cfg).await.unwrap(), tx)
}

/// Starts every node of `snap` with [`spawn_node`], `tune(node id, config)` applied to each.
pub async fn spawn_all(
    snap: &Arc<Snapshot>,
    dir: &std::path::Path,
    tune: impl Fn(&str, &mut RouterConfig),
) -> (Vec<RouterHandle>, Vec<Source>) {
    let mut hs = Vec::new();
    let mut txs = Vec::new();
    for n in &snap.topology.nodes {
        let id = n.id.as_str();
        let (h, tx) = spawn_node(snap, dir, id, |cfg| tune(id, cfg)).await;
        hs.push(h);
        txs.push(tx);
    }
    (hs, txs)
}

/// A TCP echo server on loopback (each connection echoes until EOF, then closes).
pub async fn echo_backend() -> SocketAddr {
    tracked_echo_backend().await.addr
}

/// An [`echo_backend`] that keeps when each connection opened and ended. A site's health checks
/// connect to it too, every 500 ms, and close at once.
pub struct TrackedBackend {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<Lifetime>>>,
}

/// When a connection opened and, once it did, ended.
type Lifetime = (Instant, Option<Instant>);

/// Long enough apart from the health checks' connections, which close at once.
pub const HELD: Duration = Duration::from_millis(100);

impl TrackedBackend {
    /// Connections open now for longer than [`HELD`] (the site's proxied ones).
    pub fn held(&self) -> usize {
        let conns = self.conns.lock().unwrap();
        conns
            .iter()
            .filter(|(at, end)| end.is_none() && at.elapsed() > HELD)
            .count()
    }

    /// Connections that were open for longer than [`HELD`] and have ended.
    pub fn ended_after_held(&self) -> usize {
        let conns = self.conns.lock().unwrap();
        conns
            .iter()
            .filter(|(at, end)| end.is_some_and(|e| e - *at > HELD))
            .count()
    }
}

/// Starts a [`TrackedBackend`] on loopback.
pub async fn tracked_echo_backend() -> TrackedBackend {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(Mutex::new(Vec::new()));
    let list = conns.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let list = list.clone();
            let i = {
                let mut l = list.lock().unwrap();
                l.push((Instant::now(), None));
                l.len() - 1
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
                list.lock().unwrap()[i].1 = Some(Instant::now());
            });
        }
    });
    TrackedBackend { addr, conns }
}

/// Sends `msg` to 127.0.0.1:`port`, half-closes, and returns all that came back within `within`.
pub async fn echo_roundtrip(port: u16, msg: &[u8], within: Duration) -> std::io::Result<Vec<u8>> {
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    c.write_all(msg).await?;
    c.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(within, c.read_to_end(&mut back)).await??;
    Ok(back)
}

/// The value of `series` (a metric name with its labels, as printed) in Prometheus text `m`;
/// `None` when absent, a panic when its value is not a whole number.
pub fn metric(m: &str, series: &str) -> Option<u64> {
    m.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|e| panic!("{series} {v:?}: {e}"))
        })
}

/// Polls `cond` every 20 ms until it holds; fails with `why()` once `within` has passed.
pub async fn wait_until(
    within: Duration,
    mut cond: impl FnMut() -> bool,
    why: impl Fn() -> String,
) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "{}", why());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (up to `within`) until `h` has a route for `service`; fails with `what` and `h`'s
/// telemetry.
pub async fn wait_for_route(h: &RouterHandle, service: &str, within: Duration, what: &str) {
    wait_until(
        within,
        || h.routes().preferred(service).is_some(),
        || format!("{what}: {:?}", h.telemetry()),
    )
    .await;
}

/// Opens a stream on `conn` (to a site) and writes a data stream's header for `service` with no
/// hops left, as the last hop before the site does.
pub async fn open_data_stream(
    conn: &quinn::Connection,
    service: &str,
) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let header = router::header::Header {
        kind: router::header::Kind::Data,
        service: ServiceName::new(service),
        hops: Vec::new(),
        client: None,
        circuit: None,
    };
    let mut buf = bytes::BytesMut::new();
    header.encode(&mut buf).unwrap();
    send.write_all(&buf).await.unwrap();
    (send, recv)
}

/// A QUIC connection to `addr` (expected to present `name`) with `as_node`'s certificate.
pub async fn connect_as(
    dir: &std::path::Path,
    as_node: &str,
    addr: SocketAddr,
    name: &str,
) -> (quinn::Endpoint, quinn::Connection) {
    connect_as_with(dir, as_node, addr, name, quinn::TransportConfig::default()).await
}

/// [`connect_as`] with the client's `transport`.
pub async fn connect_as_with(
    dir: &std::path::Path,
    as_node: &str,
    addr: SocketAddr,
    name: &str,
    transport: quinn::TransportConfig,
) -> (quinn::Endpoint, quinn::Connection) {
    let id = router::tls::TlsIdentity::load(dir, as_node).unwrap();
    let peers = router::tls::PeerNames::new([name.to_string()]);
    let cfg = router::tls::client_config(&id, &peers, Arc::new(transport)).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    let conn = tokio::time::timeout(Duration::from_secs(5), ep.connect(addr, name).unwrap())
        .await
        .expect("handshake timed out")
        .expect("handshake failed");
    (ep, conn)
}

/// An edge whose one neighbour is `near` (a site serving echo at `backend`), on loopback.
/// Whether `h` has neighbour `id` up (its telemetry).
pub fn neighbour_up(h: &RouterHandle, id: &str) -> bool {
    h.telemetry()
        .neighbours
        .iter()
        .any(|n| n.id.as_str() == id && n.up)
}

pub fn edge_and_near(backend: SocketAddr) -> Topology {
    let mut b = TopologyBuilder::new();
    b.node("edge", NodeKind::Edge)
        .node("near", NodeKind::Site)
        .link("edge", "near", ms(1.0))
        .service("echo");
    let mut t = addressed(b.build(), free_tcp_port());
    serve(&mut t, "near", "echo", backend);
    t
}
