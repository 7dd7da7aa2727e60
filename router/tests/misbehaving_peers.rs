//! Routers next to a misbehaving neighbour: a real QUIC peer on loopback, with a certificate for
//! a node of the topology, that answers probes (so it is up) but then withholds streams or
//! floods made-up evidence; and a router's control client next to a controller that opens streams
//! of its own. Routers are spawned in-process, as in `inprocess.rs`.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use router::probe::{Entry, NeighbourState, Probe};
use router::{RouterHandle, Snapshot};
use testkit::bytes_taken;
use topology::builder::{TopologyBuilder, ms};
use topology::{NodeId, NodeKind, Topology};

use common::{
    addressed, ca_dir, echo_backend, echo_roundtrip, free_tcp_port, metric, serve, spawn_node,
    wait_until,
};

/// A QUIC peer posing as node `name` of `topo` (certificate issued in `dir`), listening on the
/// node's address with `transport`. Each connection is handed to `serve`; streams are never
/// accepted. Returns the count of pings received over all connections.
fn fake_neighbour<F, Fut>(
    dir: &std::path::Path,
    topo: &Topology,
    name: &str,
    transport: quinn::TransportConfig,
    serve: F,
) -> (quinn::Endpoint, Arc<AtomicU64>)
where
    F: Fn(quinn::Connection, Arc<AtomicU64>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    router::pki::issue(dir, name).unwrap();
    let id = router::tls::TlsIdentity::load(dir, name).unwrap();
    let peers = router::tls::PeerNames::new(topo.nodes.iter().map(|n| n.id.to_string()));
    let transport = Arc::new(transport);
    let server = router::tls::server_config(&id, &peers, transport.clone()).unwrap();
    let client = router::tls::client_config(&id, &peers, transport).unwrap();
    let addr = topo.node(name).unwrap().address;
    let ep = router::transport::endpoint(addr, server, client).unwrap();
    let pings = Arc::new(AtomicU64::new(0));
    let (accepting, count) = (ep.clone(), pings.clone());
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            if let Ok(conn) = incoming.await {
                tokio::spawn(serve(conn, count.clone()));
            }
        }
    });
    (ep, pings)
}

/// The fake's own probe entry: no neighbours, no services.
fn own_entry(name: &str, generation: u64) -> Entry {
    Entry {
        origin: NodeId::new(name),
        generation,
        neighbours: Vec::new(),
        services: Vec::new(),
    }
}

/// Near site `near` (1 ms from the edge, directly or behind `transit`) and far site `far` (30 ms,
/// directly): the edge prefers the near one.
fn two_sites(backend: SocketAddr, port: u16, via_transit: bool) -> Topology {
    let mut b = TopologyBuilder::new();
    b.node("edge", NodeKind::Edge)
        .node("near", NodeKind::Site)
        .node("far", NodeKind::Site)
        .link("edge", "far", ms(30.0))
        .service("echo");
    if via_transit {
        b.node("transit", NodeKind::Transit)
            .link("edge", "transit", ms(0.5))
            .link("transit", "near", ms(0.5));
    } else {
        b.link("edge", "near", ms(1.0));
    }
    let mut t = addressed(b.build(), port);
    serve(&mut t, "near", "echo", backend);
    serve(&mut t, "far", "echo", backend);
    t
}

/// A transit that answers probes, and between them floods pongs as fast as it can: duplicates of
/// the last ping's answer and answers to pings not sent yet, each with new content (its link to
/// the near site flapping), and in every pong made-up origins with made-up links. The edge takes
/// one answer per ping (its table rebuilds follow its probe rate, not the flood) and none of the
/// made-up names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neighbour_cannot_flood_unsolicited_or_made_up_evidence() {
    let dir = ca_dir();
    let backend = echo_backend().await;
    let t = two_sites(backend, free_tcp_port(), true);
    let snap = Arc::new(Snapshot::new(1, Arc::new(t.clone())));
    let transport = router::transport::transport_config();
    let (_transit, pings) = fake_neighbour(
        dir.path(),
        &t,
        "transit",
        transport,
        |conn, pings| async move {
            let generation = AtomicU64::new(0);
            let last_ping = AtomicU64::new(0);
            let rotation = AtomicU64::new(0);
            let pong = |seq: u64| {
                let g = generation.fetch_add(1, Relaxed) + 1;
                let mut own = own_entry("transit", g);
                own.neighbours.push(NeighbourState {
                    id: NodeId::new("near"),
                    up: g.is_multiple_of(2),
                    rtt_us: 100,
                });
                let mut entries = vec![own];
                entries.extend((0..63).map(|i| Entry {
                    neighbours: vec![NeighbourState {
                        id: NodeId::new("edge"),
                        up: false,
                        rtt_us: 0,
                    }],
                    ..own_entry(&format!("ghost-{i}"), g)
                }));
                let max = conn.max_datagram_size().unwrap_or(1200);
                let start = rotation.load(Relaxed) as usize;
                let (b, next) = Probe::encode_pong(seq, &entries, start, max);
                rotation.store(next as u64, Relaxed);
                b
            };
            let answer = async {
                while let Ok(d) = conn.read_datagram().await {
                    if let Ok(Probe::Ping { seq }) = Probe::decode(d) {
                        last_ping.store(seq, Relaxed);
                        pings.fetch_add(1, Relaxed);
                        let _ = conn.send_datagram(pong(seq));
                    }
                }
            };
            let flood = async {
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                for n in 0u64.. {
                    tick.tick().await;
                    let last = last_ping.load(Relaxed);
                    let seq = if n.is_multiple_of(2) {
                        last
                    } else {
                        last + 1000
                    };
                    if conn.send_datagram(pong(seq)).is_err() {
                        return;
                    }
                }
            };
            tokio::join!(answer, flood);
        },
    );
    let (edge, _) = spawn_node(&snap, dir.path(), "edge", |_| {}).await;
    let up = || {
        edge.telemetry()
            .neighbours
            .iter()
            .any(|n| n.id.as_str() == "transit" && n.up)
    };
    wait_until(Duration::from_secs(20), up, || {
        format!("transit never up: {:?}", edge.telemetry())
    })
    .await;

    let rebuilds = || {
        let m = edge.metrics_text();
        let series = "tasman_table_rebuilds_total{node=\"edge\"}";
        metric(&m, series).unwrap_or_else(|| panic!("no {series} in {m}"))
    };
    let (rebuilds0, pings0, t0) = (rebuilds(), pings.load(Relaxed), Instant::now());
    wait_until(
        Duration::from_secs(20),
        || pings.load(Relaxed) >= pings0 + 20,
        || "the edge stopped probing".into(),
    )
    .await;
    let (rebuilt, probed) = (rebuilds() - rebuilds0, pings.load(Relaxed) - pings0);
    // One rebuild per answered ping at most, plus the once-a-second one and some slack.
    let bound = probed + t0.elapsed().as_secs() + 3;
    assert!(
        rebuilt <= bound,
        "{rebuilt} table rebuilds for {probed} pings: the flood drives the rebuilds"
    );
    let live = edge.routes().live.clone();
    let made_up: Vec<String> = live
        .down_links
        .iter()
        .chain(live.link_latency.keys())
        .map(|l| l.to_string())
        .filter(|l| l.contains("ghost"))
        .collect();
    assert!(made_up.is_empty(), "made-up links learned: {made_up:?}");
}

/// Answers every ping with a pong carrying the fake's own entry, as a router does.
async fn answer_pings(name: &'static str, conn: quinn::Connection, pings: Arc<AtomicU64>) {
    let mut generation = 0;
    while let Ok(d) = conn.read_datagram().await {
        if let Ok(Probe::Ping { seq }) = Probe::decode(d) {
            pings.fetch_add(1, Relaxed);
            generation += 1;
            let (pong, _) = Probe::encode_pong(seq, &[own_entry(name, generation)], 0, 1200);
            let _ = conn.send_datagram(pong);
        }
    }
}

/// How the fake first hop withholds what a stream needs.
#[derive(Debug, Clone, Copy)]
enum Withhold {
    /// No stream may be opened at all (as with all of `MAX_CONCURRENT_STREAMS` in use).
    Streams,
    /// One stream may be opened, with no flow-control window for its header.
    Window,
}

fn withholding(w: Withhold) -> quinn::TransportConfig {
    let mut t = router::transport::transport_config();
    match w {
        Withhold::Streams => {
            t.max_concurrent_bidi_streams(0u32.into());
        }
        Withhold::Window => {
            t.max_concurrent_bidi_streams(1u32.into())
                .stream_receive_window(0u32.into());
        }
    }
    t
}

async fn edge_prefers_near_with_far_as_fallback(edge: &RouterHandle) {
    wait_until(
        Duration::from_secs(20),
        || {
            let r = edge.routes();
            r.preferred("echo")
                .is_some_and(|c| c.site.as_str() == "near")
                && r.candidates("echo").is_some_and(|c| c.len() == 2)
        },
        || {
            format!(
                "edge never preferred near with far behind it: {:?}",
                edge.telemetry()
            )
        },
    )
    .await;
}

/// The edge's first hop (the near site itself) answers probes but never lets the stream through:
/// the client connection moves to the far site within the reply timeout instead of hanging.
async fn edge_fails_over_from_a_first_hop_that_withholds(w: Withhold) {
    let dir = ca_dir();
    let backend = echo_backend().await;
    let port = free_tcp_port();
    let t = two_sites(backend, port, false);
    let snap = Arc::new(Snapshot::new(1, Arc::new(t.clone())));
    let _near = fake_neighbour(dir.path(), &t, "near", withholding(w), |c, p| {
        answer_pings("near", c, p)
    });
    let reply_timeout = Duration::from_secs(1);
    let (edge, _) = spawn_node(&snap, dir.path(), "edge", |c| {
        c.reply_timeout = reply_timeout
    })
    .await;
    let (_far, _) = spawn_node(&snap, dir.path(), "far", |_| {}).await;
    edge_prefers_near_with_far_as_fallback(&edge).await;

    let started = Instant::now();
    let back = echo_roundtrip(port, b"withheld", Duration::from_secs(15)).await;
    assert_eq!(
        back.as_deref().ok(),
        Some(&b"withheld"[..]),
        "{w:?}: the client connection did not move to the far site: {back:?}"
    );
    assert!(
        started.elapsed() < reply_timeout + Duration::from_secs(3),
        "{w:?}: failover took {:?}",
        started.elapsed()
    );
    let m = edge.metrics_text();
    assert!(m.contains("tasman_failovers_total{node=\"edge\"} 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_fails_over_from_a_first_hop_that_grants_no_stream() {
    edge_fails_over_from_a_first_hop_that_withholds(Withhold::Streams).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_fails_over_from_a_first_hop_that_grants_no_flow_control_window() {
    edge_fails_over_from_a_first_hop_that_withholds(Withhold::Window).await;
}

/// A transit's next hop answers probes but grants no stream: the transit resets the relayed
/// stream with `next_hop_unreachable` within its header timeout, before the edge's reply timeout,
/// so the edge retries the far site instead of failing the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transit_hands_back_a_stream_its_next_hop_will_not_take() {
    let dir = ca_dir();
    let backend = echo_backend().await;
    let port = free_tcp_port();
    let t = two_sites(backend, port, true);
    let snap = Arc::new(Snapshot::new(1, Arc::new(t.clone())));
    let _near = fake_neighbour(
        dir.path(),
        &t,
        "near",
        withholding(Withhold::Streams),
        |c, p| answer_pings("near", c, p),
    );
    let (edge, _) = spawn_node(&snap, dir.path(), "edge", |c| {
        c.reply_timeout = Duration::from_secs(6)
    })
    .await;
    let (transit, _) = spawn_node(&snap, dir.path(), "transit", |c| {
        c.header_timeout = Duration::from_millis(500)
    })
    .await;
    let (_far, _) = spawn_node(&snap, dir.path(), "far", |_| {}).await;
    edge_prefers_near_with_far_as_fallback(&edge).await;

    let back = echo_roundtrip(port, b"handed back", Duration::from_secs(15)).await;
    assert_eq!(
        back.as_deref().ok(),
        Some(&b"handed back"[..]),
        "the client connection did not move to the far site: {back:?}"
    );
    let m = transit.metrics_text();
    assert!(
        m.contains("tasman_stream_errors_total{node=\"transit\",code=\"next_hop_unreachable\"} 1"),
        "{m}"
    );
    let m = edge.metrics_text();
    assert!(m.contains("tasman_failovers_total{node=\"edge\"} 1"), "{m}");
}

/// A draining edge waits for a client connection that is still being set up (its site has not
/// answered yet) instead of closing under it: the site answers during the drain, the connection
/// works, and the shutdown ends once it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_edge_waits_for_a_connection_still_being_set_up() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = ca_dir();
    let backend = echo_backend().await;
    let port = free_tcp_port();
    let t = two_sites(backend, port, false);
    let snap = Arc::new(Snapshot::new(1, Arc::new(t.clone())));
    // `near` answers probes, takes the first stream and its header, and answers it (then echoes)
    // only once released.
    let release = Arc::new(tokio::sync::Notify::new());
    let gate = release.clone();
    let _near = fake_neighbour(
        dir.path(),
        &t,
        "near",
        router::transport::transport_config(),
        move |conn, pings| {
            let gate = gate.clone();
            async move {
                tokio::spawn(answer_pings("near", conn.clone(), pings));
                let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                    return;
                };
                let mut prefix = [0u8; router::header::PREFIX_LEN];
                if recv.read_exact(&mut prefix).await.is_err() {
                    return;
                }
                let Ok(n) = router::header::Header::body_len(prefix) else {
                    return;
                };
                let mut body = vec![0u8; n];
                if recv.read_exact(&mut body).await.is_err() {
                    return;
                }
                gate.notified().await;
                let _ = send.write_all(&router::header::REPLY_OK).await;
                let _ = tokio::io::copy(&mut recv, &mut send).await;
                let _ = send.finish();
            }
        },
    );
    let (edge, _) = spawn_node(&snap, dir.path(), "edge", |c| {
        c.reply_timeout = Duration::from_secs(30)
    })
    .await;
    let (_far, _) = spawn_node(&snap, dir.path(), "far", |_| {}).await;
    edge_prefers_near_with_far_as_fallback(&edge).await;

    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    client.write_all(b"set-up").await.unwrap();
    let gauge = |h: &RouterHandle, name: &str| {
        metric(
            &h.metrics_text(),
            &format!("tasman_{name}{{node=\"edge\"}}"),
        )
        .unwrap_or(0)
    };
    wait_until(
        Duration::from_secs(10),
        || gauge(&edge, "streams_starting") == 1,
        || "the connection is not being set up".into(),
    )
    .await;
    edge.begin_drain();
    assert_eq!(gauge(&edge, "router_draining"), 1);
    let stopping = tokio::spawn(edge.shutdown());
    // Given a second to end (it must not: a connection is still being set up).
    let end = Instant::now() + Duration::from_secs(1);
    while !stopping.is_finished() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !stopping.is_finished(),
        "the drain ended with a connection still being set up"
    );
    release.notify_one();
    let mut back = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut back))
        .await
        .expect("no echo through the draining edge")
        .expect("the connection was cut during the drain");
    assert_eq!(&back, b"set-up");
    drop(client);
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the drain did not end when the connection closed")
        .unwrap();
}

/// A router reads only the bidirectional streams of connections its neighbours dialled. Any
/// other stream a neighbour could open (unidirectional ones, or any on a connection the router
/// dialled) nothing ever reads: each took up to a stream window (32 MiB), 128 MiB a connection,
/// held until the connection ended, with no header timeout and no reset. So the router grants
/// none: a neighbour cannot open them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neighbour_cannot_open_streams_the_router_never_reads() {
    let dir = ca_dir();
    let backend = echo_backend().await;
    let t = two_sites(backend, free_tcp_port(), true);
    let snap = Arc::new(Snapshot::new(1, Arc::new(t.clone())));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (transit, _pings) = fake_neighbour(
        dir.path(),
        &t,
        "transit",
        router::transport::transport_config(),
        move |conn, pings| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(conn.clone());
                answer_pings("transit", conn, pings).await;
            }
        },
    );
    let (edge, _) = spawn_node(&snap, dir.path(), "edge", |_| {}).await;
    // The edge dials the transit.
    let dialled = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("the edge did not dial the transit")
        .unwrap();
    // And the transit dials the edge.
    let edge_addr = t.node("edge").unwrap().address;
    let incoming = tokio::time::timeout(
        Duration::from_secs(20),
        transit.connect(edge_addr, "edge").unwrap(),
    )
    .await
    .expect("the transit's dial timed out")
    .expect("the edge refused the transit");
    let taken = [
        (
            "bidirectional, on the connection the edge dialled",
            bytes_taken(&dialled, false).await,
        ),
        (
            "unidirectional, on the connection the edge dialled",
            bytes_taken(&dialled, true).await,
        ),
        (
            "unidirectional, on the connection the transit dialled",
            bytes_taken(&incoming, true).await,
        ),
    ];
    for (what, n) in taken {
        assert_eq!(
            n, 0,
            "a {what} stream had the edge buffer {n} bytes it never reads"
        );
    }
    drop(edge);
}

/// A controller that answers a router's hello with a snapshot and then opens streams of its own
/// on the control connection. The router reads only the control stream it opened there (renewals
/// go over it too): it grants the controller no stream. (Its control client used quinn's default
/// transport: 100 bidirectional and 100 unidirectional streams the controller could open, none
/// ever accepted, each holding up to a stream window of bytes until the connection ended.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_cannot_open_streams_the_router_never_reads() {
    use router::control::proto::{self, FromRouter, ToRouter};
    use router::control::{ClientConfig, ControlClient};
    use router::tls::{PeerNames, TlsIdentity};

    let dir = ca_dir();
    let mut b = TopologyBuilder::new();
    b.node("edge", NodeKind::Edge)
        .node("site", NodeKind::Site)
        .link("edge", "site", ms(1.0))
        .service("echo");
    let topology = Arc::new(addressed(b.build(), free_tcp_port()));
    router::pki::issue(dir.path(), "edge").unwrap();
    router::pki::issue(dir.path(), router::control::client::CONTROLLER_NAME).unwrap();
    // The controller: mutual TLS as the real one, quinn's default transport.
    let id = TlsIdentity::load(dir.path(), router::control::client::CONTROLLER_NAME).unwrap();
    let server = router::tls::server_config(
        &id,
        &PeerNames::new(["edge".to_string()]),
        Arc::new(quinn::TransportConfig::default()),
    )
    .unwrap();
    let controller = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = controller.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let snapshot = proto::encode(&ToRouter::Snapshot {
        version: 1,
        topology_version: 1,
        topology,
        live: Default::default(),
        circuits: Arc::default(),
    })
    .unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = controller.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let (tx, snapshot) = (tx.clone(), snapshot.clone());
            tokio::spawn(async move {
                let (mut send, mut recv) = conn.accept_bi().await.ok()?;
                let hello = proto::read_frame(&mut recv, proto::MAX_FROM_ROUTER)
                    .await
                    .ok()??;
                let FromRouter::Hello { .. } = proto::decode(&hello).ok()? else {
                    return None;
                };
                send.write_all(&snapshot).await.ok()?;
                tx.send(conn.clone()).ok()?;
                // Keep the session (and drain the router's acknowledgement and reports).
                while let Ok(Some(_)) = proto::read_frame(&mut recv, proto::MAX_FROM_ROUTER).await {
                }
                Some(())
            });
        }
    });
    let id = TlsIdentity::load(dir.path(), "edge").unwrap();
    let client = tokio::time::timeout(
        Duration::from_secs(20),
        ControlClient::start(ClientConfig::new(addr, NodeId::new("edge"), id)),
    )
    .await
    .expect("no snapshot from the controller within 20 s")
    .unwrap();
    let conn = rx.recv().await.unwrap();
    for (what, uni) in [("bidirectional", false), ("unidirectional", true)] {
        let n = bytes_taken(&conn, uni).await;
        assert_eq!(
            n, 0,
            "a {what} stream the controller opened had the router buffer {n} bytes it never reads"
        );
    }
    assert!(client.is_connected(), "the control session carries on");
    assert_eq!(client.connects(), 1);
    drop(client);
}
