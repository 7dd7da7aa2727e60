//! What handshakes that never complete (a flood of Initials, no certificate needed) make a router
//! hold, measured with a counting global allocator (`common/counting.rs`).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use router::Snapshot;

use common::{ca_dir, echo_backend, edge_and_near, spawn_node, wait_until};

#[path = "common/counting.rs"]
mod counting;

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

/// Held by each test of this binary for its whole run: the allocator counts the process's heap,
/// so a second test allocating meanwhile (a router's receive buffers, 13 MB) would be counted
/// against the handshakes measured.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A UDP relay in front of `to` that passes what it is sent on to `to` and drops every answer,
/// as for a client that sent its Initial and went away (or forged its source address). Returns
/// its address and the count of answers dropped.
async fn black_hole(to: SocketAddr) -> (SocketAddr, Arc<AtomicU64>) {
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let at = front.local_addr().unwrap();
    let answers = Arc::new(AtomicU64::new(0));
    let counted = answers.clone();
    let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = front.recv_from(&mut a) => {
                    let Ok((n, _)) = r else { return };
                    let _ = back.send_to(&a[..n], to).await;
                }
                r = back.recv(&mut b) => {
                    if r.is_err() {
                        return;
                    }
                    counted.fetch_add(1, Relaxed);
                }
            }
        }
    });
    (at, answers)
}

/// Starts `n` handshakes to the QUIC server at `to` from one client endpoint (with a
/// certificate of a CA that server does not trust), each behind its own [`black_hole`], and
/// waits until the server has answered every one (it has taken them in). Returns how much the
/// process's heap grew per handshake, client and server side together, and the client. One
/// handshake first, not measured, has both endpoints allocate what they allocate once.
async fn held_handshakes(to: SocketAddr, n: usize) -> (isize, quinn::Endpoint) {
    let other_ca = ca_dir();
    router::pki::issue(other_ca.path(), "mallory").unwrap();
    let id = router::tls::TlsIdentity::load(other_ca.path(), "mallory").unwrap();
    let peers = router::tls::PeerNames::new(["edge".to_string()]);
    // Grants the server no stream, so that the client side costs little.
    let transport = Arc::new(router::transport::dial_transport_config());
    let client = router::tls::client_config(&id, &peers, transport).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(client);
    let mut holes = Vec::new();
    for _ in 0..=n {
        holes.push(black_hole(to).await);
    }
    let answered = |holes: &[(SocketAddr, Arc<AtomicU64>)]| {
        holes.iter().all(|(_, answers)| answers.load(Relaxed) > 0)
    };
    let mut before = 0;
    for round in [&holes[..1], &holes[1..]] {
        before = counting::live();
        for (at, _) in round {
            tokio::spawn(ep.connect(*at, "edge").unwrap());
        }
        wait_until(
            Duration::from_secs(10),
            || answered(round),
            || "the server did not answer every handshake".into(),
        )
        .await;
    }
    let grown = counting::live() - before;
    (grown / n as isize, ep)
}

/// A router holds little for a handshake that has not shown a certificate yet: it grants a
/// peer its streams (whose state quinn allocates at once, for each stream id granted) only once
/// the peer's certificate names a node. 16 handshakes that never complete, each through a
/// relay that drops the router's answers: less than 256 KiB each. The control: the same
/// handshakes held by an endpoint that grants its 16,384 streams at the handshake (as the
/// router did) cost more than 1 MiB each, which, with the 1,024 handshakes a router admits at
/// once, was over a GiB held by anyone who can send Initials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_in_progress_holds_no_stream_state() {
    let _one = ONE_AT_A_TIME.lock().await;
    const N: usize = 16;
    let dir = ca_dir();
    let t = edge_and_near(echo_backend().await);
    let snap = Arc::new(Snapshot::new(1, Arc::new(t.clone())));
    let (edge, _) = spawn_node(&snap, dir.path(), "edge", |_| {}).await;
    let (per_handshake, _clients) = held_handshakes(t.node("edge").unwrap().address, N).await;
    assert!(
        per_handshake < 256 * 1024,
        "the router held {per_handshake} bytes per handshake in progress"
    );

    // The control: an endpoint that grants its streams at the handshake.
    let id = router::tls::TlsIdentity::load(dir.path(), "edge").unwrap();
    let peers = router::tls::PeerNames::new(["edge".to_string(), "near".to_string()]);
    let server =
        router::tls::server_config(&id, &peers, router::transport::shared_transport()).unwrap();
    let control = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
    let accepting = control.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            tokio::spawn(incoming.into_future());
        }
    });
    let (granting, _clients) = held_handshakes(control.local_addr().unwrap(), N).await;
    assert!(
        granting > 1024 * 1024,
        "the control held only {granting} bytes per handshake: the measure is not telling"
    );
    println!(
        "per handshake in progress: router {per_handshake} B, granting at the handshake {granting} B"
    );
    edge.shutdown().await;
}

/// A handshake that never completes is dropped after the handshake timeout however often its
/// peer sends its Initial again (a client with no idle timeout of its own resends it at each
/// probe timeout, 1, 2, 4 and 8 s apart), and counted as a refused peer. (quinn bounds a
/// handshake only by the idle timeout, which each of those Initials restarted: such peers kept
/// their slots of the handshake gate for as long as they liked, and 1,024 of them turned every
/// new peer away.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_kept_alive_by_its_initials_is_dropped_after_the_timeout() {
    let _one = ONE_AT_A_TIME.lock().await;
    use router::transport::HANDSHAKE_TIMEOUT;
    let dir = ca_dir();
    let t = edge_and_near(echo_backend().await);
    let snap = Arc::new(Snapshot::new(1, Arc::new(t.clone())));
    let (edge, _) = spawn_node(&snap, dir.path(), "edge", |_| {}).await;
    let other_ca = ca_dir();
    router::pki::issue(other_ca.path(), "mallory").unwrap();
    let id = router::tls::TlsIdentity::load(other_ca.path(), "mallory").unwrap();
    let peers = router::tls::PeerNames::new(["edge".to_string()]);
    let mut transport = router::transport::dial_transport_config();
    transport.max_idle_timeout(None);
    let client = router::tls::client_config(&id, &peers, Arc::new(transport)).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(client);
    let (at, answers) = black_hole(t.node("edge").unwrap().address).await;
    let refused = || {
        common::metric(
            &edge.metrics_text(),
            "tasman_refused_peers_total{node=\"edge\"}",
        )
        .unwrap_or(0)
    };
    assert_eq!(refused(), 0);
    let started = std::time::Instant::now();
    let _connecting = tokio::spawn(ep.connect(at, "edge").unwrap());
    wait_until(
        Duration::from_secs(40),
        || refused() >= 1,
        || "the handshake was never dropped".into(),
    )
    .await;
    assert!(answers.load(Relaxed) > 0, "the router never answered");
    // Its Initials kept the idle timer going until about 25 s.
    assert!(
        started.elapsed() < HANDSHAKE_TIMEOUT + Duration::from_secs(5),
        "dropped {:?} after it began",
        started.elapsed()
    );
    edge.shutdown().await;
}
