//! A node with a certificate from another CA, or with a name not in the topology, is refused;
//! a node of the topology with the fabric CA's certificate is accepted. Both ways: by the router
//! that accepts the connection, and by the router that dials a neighbour (a server at the
//! neighbour's address presenting another CA's certificate, or another name's, is not taken).

mod common;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// The routers re-read their TLS files every second (10 s by default): each reload these tests
/// wait for then takes about a second, not ten.
const FAST_RELOAD: &[&str] = &["--tls-reload-interval", "1s"];
use router::probe::Probe;
use router::tls::{PeerNames, TlsIdentity};

/// Whether a peer with `id` gets a probe answered by `site` (i.e. is accepted).
async fn accepted(id: &TlsIdentity, addr: std::net::SocketAddr) -> bool {
    held(id, addr, "site").await.is_some()
}

/// A connection from a peer with `id` to the router `name` at `addr`, once that router answered a
/// probe on it (it accepted the peer); `None`: refused. The endpoint goes with it.
async fn held(
    id: &TlsIdentity,
    addr: std::net::SocketAddr,
    name: &str,
) -> Option<(quinn::Endpoint, quinn::Connection)> {
    let peers = PeerNames::new([name.to_string()]);
    let cfg =
        router::tls::client_config(id, &peers, router::transport::shared_transport()).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    let connecting = ep.connect(addr, name).ok()?;
    let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .ok()?
        .ok()?;
    answers_probe(&conn, 1).await.then_some((ep, conn))
}

/// Whether the router at the other end of `conn` answers ping `seq`.
async fn answers_probe(conn: &quinn::Connection, seq: u64) -> bool {
    if conn.send_datagram(Probe::encode_ping(seq)).is_err() {
        return false;
    }
    let r = tokio::time::timeout(Duration::from_secs(5), conn.read_datagram()).await;
    matches!(r, Ok(Ok(b)) if matches!(Probe::decode(b.clone()), Ok(Probe::Pong { seq: s, .. }) if s == seq))
}

/// One edge and one site serving `chat`, 1 ms apart, on free loopback ports.
fn edge_and_site() -> TopoYaml {
    let mut y = TopoYaml::default();
    y.edge("edge", free_udp(LOCAL), LOCAL, None)
        .site(
            "site",
            free_udp(LOCAL),
            &[("chat", "127.0.0.1:9".parse().unwrap(), 10)],
        )
        .link("edge", "site", "1ms")
        .service("chat", free_tcp_port(LOCAL), &[]);
    y
}

#[test]
fn foreign_ca_and_names_outside_the_topology_are_refused() {
    let mut f = Fabric::new(&edge_and_site());
    f.start_with("site", FAST_RELOAD);
    let site_addr = topology::load(&std::fs::read_to_string(&f.yaml).unwrap())
        .unwrap()
        .topology
        .node("site")
        .unwrap()
        .address;

    // Same fabric CA, but a name that is not a node of the topology.
    make_pki_issue(&f.pki, "mallory");
    // A different CA issuing a certificate for a real node name.
    let other = tempfile::tempdir().unwrap();
    make_pki(other.path(), &["edge"]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let good = TlsIdentity::load(&f.pki, "edge").unwrap();
        assert!(
            accepted(&good, site_addr).await,
            "a node of the topology with the fabric CA's certificate must be accepted"
        );

        let mallory = TlsIdentity::load(&f.pki, "mallory").unwrap();
        assert!(
            !accepted(&mallory, site_addr).await,
            "a name outside the topology was accepted"
        );

        // Trusts the fabric CA (so the client side is happy) but presents the other CA's chain.
        let mut foreign = TlsIdentity::load(other.path(), "edge").unwrap();
        foreign.cas = good.cas.clone();
        assert!(
            !accepted(&foreign, site_addr).await,
            "a certificate from another CA was accepted"
        );
    });
    eventually(DEADLINE, "refusals counted", || {
        f.metric("site", "tasman_refused_peers_total", "") >= 2
    });
}

/// What an impostor saw of the connections made to it (one record per certificate it presented).
#[derive(Default)]
struct Seen {
    /// Handshakes that completed: the dialler took the certificate.
    handshakes: AtomicU64,
    /// The codes of the handshakes the dialler aborted (a TLS alert is `0x100 + alert`).
    aborted: Mutex<Vec<u64>>,
    /// Bidirectional streams the dialler opened (a client connection carried here).
    streams: AtomicU64,
}

impl Seen {
    fn aborted(&self) -> Vec<u64> {
        self.aborted.lock().unwrap().clone()
    }
}

/// A QUIC server made by the test at a node's address, standing in for that node: mutual TLS
/// with the fabric's protocol (it takes the edge's certificate), presenting the certificate it
/// is given, answering probes as the site serving `chat` would, and taking data streams (echoed
/// behind the site's reply). Each certificate it presents has its own [`Seen`].
struct Impostor {
    ep: quinn::Endpoint,
    /// The record of the certificate presented now; swapped with the server config, under this
    /// lock, which the accept loop holds from taking a connection to starting its handshake.
    seen: Arc<Mutex<Arc<Seen>>>,
}

impl Impostor {
    /// Serves at `addr` presenting `id` (which trusts the fabric's CA, so that it takes the
    /// edge); runs on the current runtime.
    fn start(addr: std::net::SocketAddr, id: &TlsIdentity) -> Impostor {
        let ep = quinn::Endpoint::server(Self::config(id), addr).expect("impostor endpoint");
        let seen: Arc<Mutex<Arc<Seen>>> = Arc::default();
        let (accepting, current) = (ep.clone(), seen.clone());
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                let (seen, connecting) = {
                    let seen = current.lock().unwrap();
                    (seen.clone(), incoming.accept())
                };
                let Ok(connecting) = connecting else { continue };
                tokio::spawn(async move {
                    match connecting.await {
                        Ok(conn) => {
                            seen.handshakes.fetch_add(1, Relaxed);
                            impersonate(conn, seen).await;
                        }
                        Err(quinn::ConnectionError::ConnectionClosed(c)) => {
                            seen.aborted.lock().unwrap().push(u64::from(c.error_code));
                        }
                        Err(_) => {}
                    }
                });
            }
        });
        Impostor { ep, seen }
    }

    fn config(id: &TlsIdentity) -> quinn::ServerConfig {
        let peers = PeerNames::new(["edge".to_string()]);
        router::tls::server_config(id, &peers, router::transport::shared_transport())
            .expect("impostor server config")
    }

    /// Presents `id` from now on; the record of what it sees.
    fn present(&self, id: &TlsIdentity) -> Arc<Seen> {
        let mut seen = self.seen.lock().unwrap();
        self.ep.set_server_config(Some(Self::config(id)));
        *seen = Arc::default();
        seen.clone()
    }
}

/// Plays the site on a connection the dialler accepted: probes answered with the site's entry
/// (`chat` healthy, the edge up), data streams counted and echoed behind the site's reply.
async fn impersonate(conn: quinn::Connection, seen: Arc<Seen>) {
    use router::probe::{Entry, NeighbourState, ServiceState};
    loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((mut send, mut recv)) => {
                    seen.streams.fetch_add(1, Relaxed);
                    tokio::spawn(async move {
                        if router::header::Header::decode(&mut &read_header(&mut recv).await[..]).is_err() {
                            return;
                        }
                        let _ = send.write_all(&router::header::REPLY_OK).await;
                        let mut buf = [0u8; 4096];
                        while let Ok(Some(n)) = recv.read(&mut buf).await {
                            if send.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        let _ = send.finish();
                    });
                }
                Err(_) => return,
            },
            d = conn.read_datagram() => match d {
                Ok(b) => {
                    if let Ok(Probe::Ping { seq }) = Probe::decode(b) {
                        let generation = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap()
                            .as_nanos() as u64;
                        let own = Entry {
                            origin: "site".into(),
                            generation,
                            neighbours: vec![NeighbourState { id: "edge".into(), up: true, rtt_us: 1000 }],
                            services: vec![ServiceState { service: "chat".into(), healthy: true, active: 0, capacity: 10 }],
                            age_ms: 0,
                        };
                        let (pong, _) = Probe::encode_pong(seq, &[own], 0, conn.max_datagram_size().unwrap_or(1200));
                        let _ = conn.send_datagram(pong);
                    }
                }
                Err(_) => return,
            },
        }
    }
}

/// A stream's header as sent (prefix and the body it announces); empty if it does not come.
async fn read_header(recv: &mut quinn::RecvStream) -> Vec<u8> {
    let mut prefix = [0u8; router::header::PREFIX_LEN];
    if recv.read_exact(&mut prefix).await.is_err() {
        return Vec::new();
    }
    let Ok(n) = router::header::Header::body_len(prefix) else {
        return Vec::new();
    };
    let mut h = prefix.to_vec();
    h.resize(prefix.len() + n, 0);
    if recv.read_exact(&mut h[prefix.len()..]).await.is_err() {
        return Vec::new();
    }
    h
}

/// A client connection to the edge's `chat` port that sends `msg`: what came back before the
/// connection ended (reset or closed), or `None` if nothing did.
fn through_edge(port: u16, msg: &[u8]) -> Option<Vec<u8>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect((LOCAL, port)).expect("connect to the edge");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(msg);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the edge neither answered nor ended the connection: {e}"),
    }
    (!got.is_empty()).then_some(got)
}

/// The TLS alerts a dialler aborts a handshake with, as QUIC error codes (RFC 9001, 20.1): a
/// chain from another CA is `unknown_ca`, or `decrypt_error` when that CA has the fabric CA's
/// subject name (as every `tasman pki init` CA has: its signature is then checked against the
/// fabric CA's key, and fails); a certificate for another name is `bad_certificate`.
const FOREIGN_CA: [u64; 2] = [0x100 + 48, 0x100 + 51];
const WRONG_NAME: [u64; 1] = [0x100 + 42];

/// The router that dials refuses too: the edge dials its neighbour `site`, whose address a
/// server made by the test holds, presenting (a) a certificate for `site` from another CA,
/// (b) one from the fabric's CA for `mallory`, a name outside the topology, and (c) one from the
/// fabric's CA for `other`, a node of the topology but not the neighbour dialled. Each time the
/// edge aborts the handshake (the impostor sees the alert, the edge counts failed dials), never
/// brings `site` up, and carries no client connection to it. Then (d) the same impostor with the
/// site's own certificate is taken, and gets the client's bytes: the impostor is convincing, so
/// what the edge refused above it refused for the certificate alone.
#[test]
fn a_router_dialling_a_neighbour_refuses_an_impostor_with_a_foreign_or_wrong_certificate() {
    let mut y = edge_and_site();
    y.transit("other", free_udp(LOCAL))
        .link("other", "site", "1ms");
    let mut f = Fabric::new(&y);
    let topo = topology::load(&std::fs::read_to_string(&f.yaml).unwrap())
        .unwrap()
        .topology;
    let site_addr = topo.node("site").unwrap().address;
    let chat_port = topo
        .services
        .iter()
        .find(|s| s.name.as_str() == "chat")
        .and_then(|s| s.port)
        .expect("chat's port");
    make_pki_issue(&f.pki, "mallory");
    let other_ca = tempfile::tempdir().unwrap();
    make_pki(other_ca.path(), &["site"]);
    let fabric_cas = TlsIdentity::load(&f.pki, "edge").unwrap().cas;
    let mut foreign = TlsIdentity::load(other_ca.path(), "site").unwrap();
    foreign.cas = fabric_cas;
    let mallory = TlsIdentity::load(&f.pki, "mallory").unwrap();
    let wrong_node = TlsIdentity::load(&f.pki, "other").unwrap();
    let real = TlsIdentity::load(&f.pki, "site").unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let impostor = rt.block_on(async { Impostor::start(site_addr, &foreign) });
    f.start_with("edge", FAST_RELOAD);
    let dial_failures = |f: &Fabric| {
        f.metric(
            "edge",
            "tasman_neighbour_dial_failures_total",
            "neighbour=\"site\"",
        )
    };
    for (what, id, alert) in [
        (
            "a certificate for site from another CA",
            &foreign,
            &FOREIGN_CA[..],
        ),
        (
            "a fabric certificate for mallory (not in the topology)",
            &mallory,
            &WRONG_NAME[..],
        ),
        (
            "a fabric certificate for other (not the neighbour dialled)",
            &wrong_node,
            &WRONG_NAME[..],
        ),
    ] {
        let seen = impostor.present(id);
        let failed = dial_failures(&f);
        eventually(DEADLINE, &format!("the edge refuses {what} twice"), || {
            // Taken instead: fail at once, saying so.
            assert_eq!(
                seen.handshakes.load(Relaxed),
                0,
                "{what}: the edge completed a handshake"
            );
            seen.aborted().len() >= 2 && dial_failures(&f) >= failed + 2
        });
        assert!(
            seen.aborted().iter().all(|c| alert.contains(c)),
            "{what}: the edge aborted with {:x?}, expected TLS alerts {alert:x?}",
            seen.aborted()
        );
        assert_eq!(
            seen.handshakes.load(Relaxed),
            0,
            "{what}: a handshake completed"
        );
        assert_eq!(
            f.metric("edge", "tasman_neighbour_up", "neighbour=\"site\""),
            0,
            "{what}: the edge brought site up"
        );
        // A client of `chat` is not carried to it: refused at the edge (it has no route).
        assert_eq!(through_edge(chat_port, b"secret"), None, "{what}");
        assert_eq!(
            seen.streams.load(Relaxed),
            0,
            "{what}: a data stream reached the impostor"
        );
        assert_eq!(
            f.metric("edge", "tasman_streams_total", ""),
            0,
            "{what}: the edge proxied a client"
        );
    }

    // The control: the site's own certificate, at the same address, is taken.
    let seen = impostor.present(&real);
    eventually(DEADLINE, "the edge brings site up", || {
        f.metric("edge", "tasman_neighbour_up", "neighbour=\"site\"") == 1
    });
    f.wait_preferred("edge", "chat", "site");
    assert_eq!(
        through_edge(chat_port, b"secret").as_deref(),
        Some(&b"secret"[..])
    );
    assert_eq!(seen.streams.load(Relaxed), 1);
    assert_eq!(f.metric("edge", "tasman_streams_total", ""), 1);
    assert!(seen.aborted().is_empty(), "{:x?}", seen.aborted());
    drop(impostor);
    drop(rt);
}

fn make_pki_issue(dir: &std::path::Path, name: &str) {
    tasman_pki(dir, &["issue", name]);
}

/// Runs `tasman pki ARGS... --dir DIR` (the real CLI) and checks it succeeded.
fn tasman_pki(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new(tasman())
        .arg("pki")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .expect("run tasman pki");
    assert!(
        out.status.success(),
        "tasman pki {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The CA certificate (second in the chain) of `name`'s certificate file in `dir`.
fn issuer_of(dir: &std::path::Path, name: &str) -> rustls::pki_types::CertificateDer<'static> {
    let chain = TlsIdentity::load(dir, name).unwrap().chain;
    assert_eq!(chain.len(), 2, "{name}: the leaf and its issuing CA");
    chain[1].clone()
}

/// Whether `node`'s router has `neighbour` up (connected and answering probes).
fn up(f: &Fabric, node: &str, neighbour: &str) -> bool {
    let filter = format!("neighbour=\"{neighbour}\"");
    f.metric(node, "tasman_neighbour_up", &filter) == 1
}

/// For 3 s (several redials or probe rounds each way), `edge` and `site` are connected both
/// ways (`connected`) or neither way: checked every 200 ms, failing with `why` at the first
/// sight of anything else.
fn stay(f: &Fabric, connected: bool, why: &str) {
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        assert!(
            up(f, "edge", "site") == connected && up(f, "site", "edge") == connected,
            "{why}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A CA rotation over real routers and real mutual-TLS QUIC. With the bundle of the new and the
/// old CA (`tasman pki rotate-ca`), a router on a certificate from the new CA and one still on
/// the old CA's connect to each other, both ways. After `tasman pki retire-ca`, the router
/// restarted with the pruned bundle refuses the one still on the old CA's certificate, until
/// that one is re-issued from the new CA (and reloads it, without a restart).
#[test]
fn old_and_new_ca_certificates_connect_during_a_rotation_and_not_after_it() {
    let mut f = Fabric::new(&edge_and_site());
    let old_ca = issuer_of(&f.pki, "edge");

    // Step 1: a new issuing CA; ca.pem trusts both (every router starts with it below).
    tasman_pki(&f.pki, &["rotate-ca"]);
    let bundle = TlsIdentity::load(&f.pki, "edge").unwrap().cas;
    assert_eq!(bundle.len(), 2);
    assert_eq!(bundle[1], old_ca, "the old CA stays in the bundle");
    let new_ca = bundle[0].clone();
    // Step 2, halfway: the site is re-issued from the new CA, the edge is not yet.
    tasman_pki(&f.pki, &["issue", "site"]);
    assert_eq!(issuer_of(&f.pki, "site"), new_ca);
    assert_eq!(issuer_of(&f.pki, "edge"), old_ca);

    f.start_with("site", FAST_RELOAD);
    f.start_with("edge", FAST_RELOAD);
    eventually(
        DEADLINE,
        "edge (old CA) and site (new CA) connected both ways",
        || up(&f, "edge", "site") && up(&f, "site", "edge"),
    );
    assert_eq!(f.metric("site", "tasman_refused_peers_total", ""), 0);

    // Step 3 too early: the CA is retired while the edge still holds an old-CA certificate, and
    // the site restarts (gracefully) with the pruned bundle.
    tasman_pki(&f.pki, &["retire-ca"]);
    assert_eq!(
        TlsIdentity::load(&f.pki, "site").unwrap().cas,
        vec![new_ca.clone()]
    );
    f.signal("site", libc::SIGTERM);
    f.wait_exit("site", DEADLINE);
    f.start_with("site", FAST_RELOAD);
    eventually(
        DEADLINE,
        "the site refused the edge's old-CA certificate",
        || f.metric("site", "tasman_refused_peers_total", "") >= 1,
    );
    eventually(DEADLINE, "no connection either way", || {
        !up(&f, "site", "edge") && !up(&f, "edge", "site")
    });
    stay(&f, false, "an old-CA certificate got through");
    assert!(
        f.log("site").contains("incoming connection refused"),
        "{}",
        f.log("site")
    );

    // Step 2 finished: the edge re-issued from the new CA reloads it and is accepted again.
    tasman_pki(&f.pki, &["issue", "edge"]);
    assert_eq!(issuer_of(&f.pki, "edge"), new_ca);
    eventually(DEADLINE, "edge (new CA) and site connected again", || {
        up(&f, "edge", "site") && up(&f, "site", "edge")
    });
}

/// A leaked key, revoked over real routers and real mutual-TLS QUIC. `tasman pki revoke site`
/// writes `ca.crl.pem` into the TLS directory both routers read (they share one here); at its
/// next reload tick the edge adopts it, closes the live connection that presented the site's
/// certificate and refuses the site's reconnects, both ways. A fresh certificate for the site (a
/// new key and serial) is accepted again, without a restart.
#[test]
fn a_revoked_certificate_loses_its_live_connection_and_is_refused_until_reissued() {
    let mut f = Fabric::new(&edge_and_site());
    f.start_with("site", FAST_RELOAD);
    f.start_with("edge", FAST_RELOAD);
    eventually(DEADLINE, "edge and site connected both ways", || {
        up(&f, "edge", "site") && up(&f, "site", "edge")
    });
    assert_eq!(f.metric("edge", "tasman_tls_crl_updates_total", ""), 0);

    tasman_pki(&f.pki, &["revoke", "site", "--reason", "key-compromise"]);
    eventually(DEADLINE, "the edge adopted list number 1", || {
        f.metric("edge", "tasman_tls_crl_number", "ca=\"1\"") == 1
    });
    eventually(
        DEADLINE,
        "the edge closed the site's live connection",
        || f.metric("edge", "tasman_tls_revoked_closed_total", "") >= 1,
    );
    eventually(DEADLINE, "no connection either way", || {
        !up(&f, "edge", "site") && !up(&f, "site", "edge")
    });
    let refused = f.metric("edge", "tasman_refused_peers_total", "");
    eventually(
        DEADLINE,
        "the site's reconnects refused at the edge",
        || f.metric("edge", "tasman_refused_peers_total", "") > refused,
    );
    // It stays out: several of the site's redials and the edge's own dials fail meanwhile.
    stay(&f, false, "a revoked certificate got through");
    assert!(
        f.log("edge").contains("the peer's certificate is revoked"),
        "{}",
        f.log("edge")
    );
    assert_eq!(f.metric("edge", "tasman_tls_crl_refused_total", ""), 0);

    // Re-issued: a new key and serial, not on the list; the site reloads it and is let back in.
    tasman_pki(&f.pki, &["issue", "site"]);
    eventually(DEADLINE, "the re-issued site connected again", || {
        up(&f, "edge", "site") && up(&f, "site", "edge")
    });
}

/// A whole CA rotation over real routers and real mutual-TLS QUIC, with no restart: the edge and
/// the site run throughout, each on a TLS directory of its own (as on hosts of their own), and
/// each step is a file copied there. Step 1's bundle is adopted at the next reload tick, step 2's
/// new-CA certificates are reloaded and new connections made with them are accepted; at step 3
/// the pruned bundle closes a live connection still authenticated by an old-CA certificate (close
/// code 8, `untrusted`) and refuses its reconnect, while a connection made with new-CA
/// certificates stays, and the routers' own link is (again) up on new-CA certificates.
#[test]
fn a_ca_rotation_needs_no_restart() {
    let mut y = edge_and_site();
    // A node that misses step 2: the test holds a connection to the site in its name.
    y.transit("laggard", free_udp(LOCAL))
        .link("laggard", "site", "1ms");
    let mut f = Fabric::new(&y);
    let old_ca = issuer_of(&f.pki, "edge");
    let edge_dir = f.own_tls_dir("edge");
    let site_dir = f.own_tls_dir("site");
    f.start_with("site", FAST_RELOAD);
    f.start_with("edge", FAST_RELOAD);
    eventually(DEADLINE, "edge and site connected both ways", || {
        up(&f, "edge", "site") && up(&f, "site", "edge")
    });
    let site_addr = topology::load(&std::fs::read_to_string(&f.yaml).unwrap())
        .unwrap()
        .topology
        .node("site")
        .unwrap()
        .address;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let laggard = TlsIdentity::load(&f.pki, "laggard").unwrap();
    let (_ep, stale) = rt
        .block_on(held(&laggard, site_addr, "site"))
        .expect("the laggard (old CA) is accepted before the rotation");
    for node in ["edge", "site"] {
        assert_eq!(f.metric(node, "tasman_tls_trusted_cas", ""), 1);
        assert_eq!(f.metric(node, "tasman_tls_trust_reloads_total", ""), 0);
    }

    // Step 1: the bundle of the new and the old CA, copied to each node: adopted live.
    tasman_pki(&f.pki, &["rotate-ca"]);
    for node in ["edge", "site"] {
        f.copy_to(node, "ca.pem");
    }
    eventually(DEADLINE, "both routers trust both CAs", || {
        ["edge", "site"].iter().all(|n| {
            f.metric(n, "tasman_tls_trusted_cas", "") == 2
                && f.metric(n, "tasman_tls_trust_reloads_total", "") == 1
        })
    });
    let new_ca = TlsIdentity::load(&site_dir, "site").unwrap().cas[0].clone();
    assert_ne!(new_ca, old_ca);

    // Step 2: both re-issued from the new CA and copied (key first): reloaded, still connected,
    // and a new connection with a new-CA certificate is accepted.
    for node in ["edge", "site"] {
        tasman_pki(&f.pki, &["issue", node]);
        f.copy_to(node, &format!("{node}.key"));
        f.copy_to(node, &format!("{node}.pem"));
        assert_eq!(issuer_of(f.tls_dir(node), node), new_ca);
    }
    eventually(
        DEADLINE,
        "both routers present their new-CA certificate",
        || {
            ["edge", "site"]
                .iter()
                .all(|n| f.metric(n, "tasman_tls_cert_reloads_total", "") == 1)
        },
    );
    let edge_now = TlsIdentity::load(&edge_dir, "edge").unwrap();
    let (_ep2, fresh) = rt
        .block_on(held(&edge_now, site_addr, "site"))
        .expect("a new connection on new-CA certificates both ways is accepted");
    let site_chain = fresh
        .peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .expect("the site's chain");
    assert_eq!(
        site_chain[1], new_ca,
        "the site presents its new-CA certificate"
    );
    assert!(up(&f, "edge", "site") && up(&f, "site", "edge"));
    assert!(
        rt.block_on(answers_probe(&stale, 2)),
        "the old CA is still trusted"
    );
    let refused = f.metric("site", "tasman_refused_peers_total", "");

    // Step 3: the pruned bundle (the new CA only), copied to each node.
    tasman_pki(&f.pki, &["retire-ca"]);
    for node in ["edge", "site"] {
        f.copy_to(node, "ca.pem");
    }
    eventually(DEADLINE, "both routers trust only the new CA", || {
        ["edge", "site"].iter().all(|n| {
            f.metric(n, "tasman_tls_trusted_cas", "") == 1
                && f.metric(n, "tasman_tls_trust_reloads_total", "") == 2
        })
    });
    let closed = rt
        .block_on(async { tokio::time::timeout(DEADLINE, stale.closed()).await })
        .expect("the site closes the laggard's old-CA connection");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => assert_eq!(
            c.error_code.into_inner(),
            u64::from(router::codes::close::UNTRUSTED),
            "{c:?}"
        ),
        other => panic!("expected an application close, got {other}"),
    }
    assert!(f.metric("site", "tasman_tls_untrusted_closed_total", "") >= 1);
    assert_eq!(f.metric("site", "tasman_tls_revoked_closed_total", ""), 0);
    assert!(
        f.log("site")
            .contains("the peer's certificate chains to no CA of the trust bundle in force"),
        "{}",
        f.log("site")
    );
    // Its reconnect is refused (even trusting the new CA itself).
    let mut laggard_now = TlsIdentity::load(&f.pki, "laggard").unwrap();
    laggard_now.cas = vec![new_ca.clone()];
    assert!(
        rt.block_on(held(&laggard_now, site_addr, "site")).is_none(),
        "an old-CA certificate got through after retire-ca"
    );
    // Counted once the site's side of the handshake has ended, which may be after the laggard
    // saw the refusal.
    eventually(DEADLINE, "the site counted the refusal", || {
        f.metric("site", "tasman_refused_peers_total", "") > refused
    });
    // The connection made on new-CA certificates stays open and answered.
    assert!(
        rt.block_on(answers_probe(&fresh, 2)),
        "a new-CA connection was closed: {:?}",
        fresh.close_reason()
    );
    assert!(fresh.close_reason().is_none());
    // The routers' link: connections made before step 2 reached both ends were authenticated by
    // old-CA certificates, so they may have been closed too; redialled on new-CA certificates,
    // the link is up and stays up.
    eventually(
        DEADLINE,
        "edge and site connected on new-CA certificates",
        || up(&f, "edge", "site") && up(&f, "site", "edge"),
    );
    stay(&f, true, "the link between two new-CA routers went down");
    assert_eq!(
        f.metric("edge", "tasman_tls_trust_reload_failures_total", ""),
        0
    );
    assert_eq!(
        f.metric("site", "tasman_tls_trust_reload_failures_total", ""),
        0
    );
}

/// `tasman pki issue` refuses a name no topology can give a node (uppercase, dots, a doubled
/// hyphen, a number: TLS refuses a server name that reads as one), before issuing any of the names it was given: no router
/// could load such a certificate (a router reads ID.pem by its node id). `controller` and
/// a node id not in any topology yet are issued. (`SYD-EDGE-1` was issued, exit 0.)
#[test]
fn pki_issue_refuses_a_name_that_no_node_can_have() {
    let dir = tempfile::tempdir().unwrap();
    tasman_pki(dir.path(), &["init"]);
    for (bad, hint) in [
        ("SYD-EDGE-1", Some("did you mean syd-edge-1?")),
        ("syd.edge.1", None),
        ("syd--edge", None),
        ("42", None),
        ("0xbeef", None),
    ] {
        let out = std::process::Command::new(tasman())
            .args(["pki", "issue", "good-1", bad, "--dir"])
            .arg(dir.path())
            .output()
            .expect("run tasman pki");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(
            stderr.contains(&format!("error: {bad}: not a node id")),
            "{bad}: {stderr}"
        );
        if let Some(hint) = hint {
            assert!(stderr.contains(hint), "{bad}: {stderr}");
        }
        assert!(
            !dir.path().join("good-1.pem").exists()
                && !dir.path().join(format!("{bad}.pem")).exists(),
            "{bad}: a certificate was issued"
        );
    }
    tasman_pki(dir.path(), &["issue", "controller", "new-node-7"]);
    assert!(dir.path().join("controller.pem").exists());
    assert!(dir.path().join("new-node-7.pem").exists());
}

/// A node's key made on the node (`tasman pki keygen`), its public key certified on the CA's
/// host (`tasman pki issue NODE --public-key`): the CA's directory never holds the node's key,
/// and the node's directory, with the certificate and `ca.pem` copied in, is an identity a
/// router loads. (`pki issue` made every key on the CA's host, to be copied to its node.)
#[test]
fn a_node_key_made_on_the_node_is_certified_without_leaving_it() {
    let (ca, node) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    tasman_pki(ca.path(), &["init"]);
    tasman_pki(node.path(), &["keygen", "syd-edge-1"]);
    let public = node.path().join("syd-edge-1.pub");
    let public_arg = public.to_str().unwrap();
    tasman_pki(
        ca.path(),
        &["issue", "syd-edge-1", "--public-key", public_arg],
    );
    assert!(ca.path().join("syd-edge-1.pem").exists());
    assert!(
        !ca.path().join("syd-edge-1.key").exists(),
        "a key on the CA's host"
    );
    for f in ["syd-edge-1.pem", "ca.pem"] {
        std::fs::copy(ca.path().join(f), node.path().join(f)).unwrap();
    }
    let id = TlsIdentity::load(node.path(), "syd-edge-1").expect("the node's identity");
    assert_eq!(id.chain.len(), 2);
    // Refused: a second key over the first, two nodes for one key, a file that is no key.
    let run = |dir: &std::path::Path, args: &[&str]| {
        std::process::Command::new(tasman())
            .arg("pki")
            .args(args)
            .arg("--dir")
            .arg(dir)
            .output()
            .expect("run tasman pki")
    };
    let out = run(node.path(), &["keygen", "syd-edge-1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = run(
        ca.path(),
        &[
            "issue",
            "syd-edge-1",
            "syd-edge-2",
            "--public-key",
            public_arg,
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("one NODE"));
    let not_a_key = node.path().join("syd-edge-1.pem");
    let out = run(
        ca.path(),
        &[
            "issue",
            "syd-edge-2",
            "--public-key",
            not_a_key.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no PEM PUBLIC KEY"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!ca.path().join("syd-edge-2.pem").exists());
}

/// A router in controller mode that starts with a certificate the controller refuses (here an
/// expired one) and no stored snapshot connects once its `--tls-dir` holds a good one, without a
/// restart, as the guide promises of a re-issued certificate. (Its files were re-read only once
/// the router ran on a first snapshot, which this refusal kept from coming: it waited for ever.)
#[test]
fn a_router_refused_before_its_first_snapshot_takes_up_a_reissued_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, ctl) = fabric_controller(dir.path(), "e1");
    // The router's own directory: the fabric's CA, and an e1 certificate of that CA that expired
    // an hour ago.
    let own = dir.path().join("own");
    std::fs::create_dir(&own).unwrap();
    for f in ["ca.pem", "ca.key"] {
        std::fs::copy(pki.join(f), own.join(f)).unwrap();
    }
    let now = std::time::SystemTime::now();
    let expired = router::pki::Validity::between(
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    )
    .unwrap();
    router::pki::issue_with(&own, "e1", expired).unwrap();
    std::fs::remove_file(own.join("ca.key")).unwrap();
    let metrics = std::net::SocketAddr::new(LOCAL, free_tcp_port(LOCAL));
    let log_path = dir.path().join("e1.log");
    let router = controlled_router(&ctl, "e1", &own, &log_path, |cmd| {
        cmd.args(["--metrics", &metrics.to_string()])
            .args(["--tls-reload-interval", "200ms"]);
    });
    let mut router = router;
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // Said at start, naming the file (not only once a first snapshot came, which the
    // controller's refusal keeps from coming).
    eventually(DEADLINE, "the start-up warning", || {
        log().contains("starting with a certificate the controller and neighbours will refuse")
    });
    assert!(
        log().contains("e1.pem") && log().contains("expired"),
        "{}",
        log()
    );
    eventually(
        DEADLINE,
        "the controller to refuse the expired certificate",
        || {
            if let Ok(Some(status)) = router.child.try_wait() {
                panic!("the router exited ({status}):\n{}", log());
            }
            log().contains("control connection")
        },
    );
    // Not serving: no snapshot yet (the metrics endpoint is bound with the router).
    assert!(http_get(metrics, "/metrics").is_none(), "{}", log());
    // The re-issued pair, each file replaced whole (as `tasman pki issue` and a copy with
    // rename do).
    for f in ["e1.key", "e1.pem"] {
        let tmp = own.join(format!("{f}.new"));
        std::fs::copy(pki.join(f), &tmp).unwrap();
        std::fs::rename(&tmp, own.join(f)).unwrap();
    }
    eventually(
        DEADLINE,
        "the router to take up the new certificate and serve",
        || {
            if let Ok(Some(status)) = router.child.try_wait() {
                panic!("the router exited ({status}):\n{}", log());
            }
            http_get(metrics, "/metrics").is_some()
        },
    );
}

/// A router in controller mode whose `--tls-dir` holds another node's certificate under its own
/// name does not start: exit 2 before the controller is dialled, the error naming the file and
/// both names (the controller would refuse the session, and the router waited for a first
/// snapshot for ever).
#[test]
fn a_router_in_controller_mode_with_another_nodes_certificate_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, ctl) = fabric_controller(dir.path(), "e1");
    let own = dir.path().join("own");
    std::fs::create_dir(&own).unwrap();
    std::fs::copy(pki.join("ca.pem"), own.join("ca.pem")).unwrap();
    for ext in ["pem", "key"] {
        std::fs::copy(
            pki.join(format!("controller.{ext}")),
            own.join(format!("e1.{ext}")),
        )
        .unwrap();
    }
    let log_path = dir.path().join("e1.log");
    let mut router = controlled_router(&ctl, "e1", &own, &log_path, |_| {});
    let mut status = None;
    eventually(DEADLINE, "the router to exit", || {
        status = router.child.try_wait().ok().flatten();
        status.is_some()
    });
    let status = status.expect("exited");
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("e1.pem") && log.contains("is for controller, not for node e1"),
        "{log}"
    );
}
