//! Renewal of node certificates through the controller (`--ca-dir`): a router whose certificate
//! is past 70 % of its lifetime gets a new one over real mutual-TLS QUIC, installs it in its
//! files and presents it; a controller without a CA refuses, and the router keeps its old one; a
//! controller that does not answer is asked again after the back-off, and the router keeps its
//! certificate meanwhile; a late answer to an earlier request is ignored.
//!
//! Each test has a loopback net of its own (`127.N.0.0/16`, the `net` argument): libtest runs as
//! many tests at once as the machine has cores, and two on one net bind the same addresses.

mod controller_common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use controller_common::*;
use fabric::controller::daemon::{self, Daemon};
use router::control::ClientConfig;
use router::control::proto::{self, FromRouter, ToRouter};
use router::pki::{self, Validity};
use router::tls::{CertResolver, PeerNames, Reload, Renewal, TlsIdentity};
use topology::NodeId;

const NODE: &str = "edge-0";

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A PKI for the fabric's nodes in `dir/pki`, `edge-0` re-issued with `validity`, and a
/// controller on it (`ca_dir`: renewals signed with that PKI's CA, valid for an hour).
async fn setup(
    dir: &Path,
    net: u8,
    validity: Validity,
    renew: bool,
) -> (Daemon, std::path::PathBuf) {
    let tls = dir.join("pki");
    pki(&tls, &fabric_nodes(1, 1));
    pki::issue_with(&tls, NODE, validity).expect("short certificate");
    let d = daemon::start(daemon::DaemonConfig {
        ca_dir: renew.then(|| tls.clone()),
        issue_valid_for: Duration::from_secs(3600),
        ..import_config(&dir.join("state"), &tls, &fabric_yaml(net, 1, 1, 10))
    })
    .await
    .expect("controller starts");
    (d, tls)
}

/// `edge-0`'s control client and data plane, sharing one certificate resolver (as
/// `tasman router --controller` does).
async fn start_router(d: &Daemon, tls: &Path) -> (LiveRouter, Arc<CertResolver>) {
    start_router_with(d.quic_addr, tls, |_| {}).await
}

/// [`start_router`] with the controller at `ctl` and the client's config adjusted by `tune`.
async fn start_router_with(
    ctl: SocketAddr,
    tls: &Path,
    tune: impl FnOnce(&mut ClientConfig),
) -> (LiveRouter, Arc<CertResolver>) {
    let id = TlsIdentity::load(tls, NODE).expect("identity");
    let cert = CertResolver::new(&id).expect("resolver");
    let c = cert.clone();
    let client = start_client_with(ctl, NODE, tls, move |cfg| {
        cfg.cert = Some(c);
        tune(cfg);
    })
    .await;
    let mut cfg = router::RouterConfig::new(NodeId::new(NODE), id, client.snapshots());
    cfg.cert_resolver = Some(cert.clone());
    let handle = router::Router::spawn(cfg).await.expect("router starts");
    client.attach(&handle);
    (LiveRouter { client, handle }, cert)
}

fn files(tls: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(tls.join(format!("{NODE}.pem"))).unwrap(),
        std::fs::read(tls.join(format!("{NODE}.key"))).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_renews_its_certificate_through_the_controller() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    // 80 s of lifetime, 50 s of them gone: due at 70 % (56 s), in about 6 s; expires in 30 s.
    let short =
        Validity::between(now - Duration::from_secs(50), now + Duration::from_secs(30)).unwrap();
    let (d, tls) = setup(dir.path(), 91, short, true).await;
    let (r, cert) = start_router(&d, &tls).await;
    let old_files = files(&tls);
    let old_leaf = cert.current().cert[0].clone();
    let old_not_after = cert.not_after();
    assert!(old_not_after <= unix_now() + 30);

    eventually(
        Duration::from_secs(40),
        "the router renewed its certificate",
        || cert.renewals(Renewal::Renewed) == 1,
    )
    .await;
    let new_files = files(&tls);
    assert_ne!(new_files.0, old_files.0, "a new certificate in the file");
    assert_ne!(new_files.1, old_files.1, "a new key in the file");
    assert_ne!(
        cert.current().cert[0],
        old_leaf,
        "the new certificate is presented"
    );
    assert_eq!(
        TlsIdentity::load(&tls, NODE).unwrap().chain[0],
        cert.current().cert[0],
        "what is presented is what the files hold"
    );
    // Valid for the controller's hour from when it was issued.
    let want = unix_now() + 3600;
    assert!(
        (want - 60..=want + 1).contains(&cert.not_after()),
        "not_after {} ~ {want}",
        cert.not_after()
    );
    assert!(cert.reloads() >= 1);
    assert_eq!(cert.renewals(Renewal::Refused), 0);
    // The control session reconnects to present the renewed certificate: the controller renews
    // only what a session presents, and refuses an expired one, so a session kept on the old
    // certificate could not renew again. (It stayed on the old one.)
    eventually(
        Duration::from_secs(20),
        "the router reconnects with its renewed certificate",
        || r.client.connects() >= 2 && r.client.is_connected(),
    )
    .await;
    let m = r.handle.metrics_text();
    assert!(
        m.contains(&format!(
            "tasman_tls_cert_renewals_total{{node=\"{NODE}\",result=\"renewed\"}} 1"
        )),
        "{m}"
    );

    // Past the old certificate's expiry, the controller restarts: the router's new handshake
    // works only with the renewed certificate.
    let connects = r.client.connects();
    let expired = old_not_after + 2;
    let wait = Duration::from_secs((expired - unix_now()).max(0) as u64);
    tokio::time::sleep(wait).await;
    assert!(
        r.client.is_connected(),
        "connected past the old certificate"
    );
    let addr = d.quic_addr;
    d.shutdown().await;
    let d2 = restart_controller(&dir.path().join("state"), &tls, addr).await;
    eventually(
        Duration::from_secs(30),
        "the router reconnects to the restarted controller",
        || r.client.connects() > connects && r.client.is_connected(),
    )
    .await;
    assert_eq!(cert.renewals(Renewal::Renewed), 1, "not renewed again");
    r.stop().await;
    d2.shutdown().await;
}

/// A certificate re-issued by hand and taken up from the files while the control session is
/// open (the reload, every 10 s) is renewed when due: the session reconnects to present it, since
/// the controller judges what the session presented. (It asked on the session still presenting
/// the certificate before, and was refused for as long as that session lived: "not due" here,
/// "expired" once that one had.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_reloaded_during_a_session_is_renewed_when_due() {
    let dir = tempfile::tempdir().unwrap();
    let hour = Validity::for_duration(Duration::from_secs(3600)).unwrap();
    let (d, tls) = setup(dir.path(), 90, hour, true).await;
    let (r, cert) = start_router(&d, &tls).await;
    eventually(Duration::from_secs(20), "the router connected", || {
        r.client.is_connected()
    })
    .await;
    let connects = r.client.connects();
    pki::issue_with(&tls, NODE, due_now()).expect("due certificate");
    assert!(
        matches!(cert.reload(), Reload::Reloaded { .. }),
        "the re-issued certificate was not taken up"
    );
    eventually(
        Duration::from_secs(20),
        "the reloaded certificate renewed",
        || cert.renewals(Renewal::Renewed) == 1,
    )
    .await;
    assert_eq!(cert.renewals(Renewal::Refused), 0);
    assert!(r.client.connects() > connects, "no new session");
    d.shutdown().await;
}

/// A CA directory that does not answer (its lock held: a `tasman pki` command suspended with
/// Ctrl-Z, a hung mount) gets a renewal refused after the controller's wait, on a session that
/// goes on. (The session answered the request in its loop without a bound: it sent nothing,
/// the router dropped it at 20 s of silence and reconnected, and every later request held
/// another blocking thread until the controller had none left.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_directory_that_hangs_gets_renewals_refused_on_a_session_that_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (d, tls) = setup(dir.path(), 95, due_now(), true).await;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(tls.join(".tasman-pki.lock"))
        .unwrap();
    lock.lock().unwrap();
    let (r, cert) = start_router(&d, &tls).await;
    eventually(Duration::from_secs(15), "the renewal is refused", || {
        cert.renewals(Renewal::Refused) == 1
    })
    .await;
    assert_eq!(r.client.connects(), 1, "the session was dropped");
    assert!(r.client.is_connected());
    assert_eq!(cert.renewals(Renewal::Renewed), 0);
    drop(lock);
    r.stop().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_without_a_ca_refuses_and_the_router_keeps_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    // 300 s of lifetime, 200 s gone: due at 210 s, in about 10 s; valid through the test.
    let short = Validity::between(
        now - Duration::from_secs(200),
        now + Duration::from_secs(100),
    )
    .unwrap();
    let (d, tls) = setup(dir.path(), 92, short, false).await;
    let (r, cert) = start_router(&d, &tls).await;
    let old_files = files(&tls);
    let old_leaf = cert.current().cert[0].clone();
    let old_not_after = cert.not_after();

    eventually(
        Duration::from_secs(40),
        "the controller refused the renewal",
        || cert.renewals(Renewal::Refused) == 1,
    )
    .await;
    assert_eq!(files(&tls), old_files, "the files are untouched");
    assert_eq!(cert.current().cert[0], old_leaf);
    assert_eq!(cert.not_after(), old_not_after);
    assert_eq!(cert.reloads(), 0);
    assert_eq!(cert.renewals(Renewal::Renewed), 0);
    // Still in session: heartbeats keep coming and nothing reconnects.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(r.client.is_connected());
    assert_eq!(r.client.connects(), 1);
    assert_eq!(
        cert.renewals(Renewal::Refused),
        1,
        "no retry before the back-off"
    );
    r.stop().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_refuses_to_start_with_a_ca_it_does_not_trust() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("pki");
    pki(&tls, &fabric_nodes(1, 1));
    let other = dir.path().join("other-ca");
    pki::init(&other).unwrap();
    let res = daemon::start(daemon::DaemonConfig {
        ca_dir: Some(other),
        ..import_config(&dir.path().join("state"), &tls, &fabric_yaml(102, 1, 1, 10))
    })
    .await;
    refused_ca_mismatch(res);
}

/// Fails unless the controller refused to start because its `--ca-dir` CA is not one it trusts.
fn refused_ca_mismatch<T>(res: Result<T, daemon::DaemonError>) {
    match res {
        Err(e @ daemon::DaemonError::CaMismatch { .. }) => {
            assert!(
                e.to_string()
                    .contains("not one of the CAs the controller trusts"),
                "{e}"
            )
        }
        Err(e) => panic!("expected a CA mismatch, got {e}"),
        Ok(_) => panic!("expected a CA mismatch, the controller started"),
    }
}

/// During a CA rotation the `--ca-dir` check looks for the issuing CA (the bundle's certificate
/// for `ca.key`) among every CA the controller trusts, wherever it is in either bundle: a
/// controller that trusts only the old CA is refused a rotated CA directory (even one listing the
/// old CA first), and one that trusts the old and the new CA starts with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_dir_check_looks_for_the_issuing_ca_in_the_trust_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("pki");
    pki(&tls, &fabric_nodes(1, 1));
    let ca_dir = dir.path().join("ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    for f in [pki::CA_CERT, pki::CA_KEY] {
        std::fs::copy(tls.join(f), ca_dir.join(f)).unwrap();
    }
    pki::rotate_ca(&ca_dir).unwrap();
    let rotated = std::fs::read_to_string(ca_dir.join(pki::CA_CERT)).unwrap();
    let b = pki::parse_ca_bundle(&rotated).unwrap();
    let (new, old) = (&b[0].pem, &b[1].pem);
    let start = |net: u8, state: &str| {
        daemon::start(daemon::DaemonConfig {
            ca_dir: Some(ca_dir.clone()),
            ..import_config(&dir.path().join(state), &tls, &fabric_yaml(net, 1, 1, 10))
        })
    };

    // The controller trusts only the old CA; the CA directory lists the old CA first.
    std::fs::write(ca_dir.join(pki::CA_CERT), format!("{old}{new}")).unwrap();
    refused_ca_mismatch(start(100, "state-1").await);

    // The controller trusts the old then the new CA; the CA directory as rotate-ca wrote it.
    std::fs::write(ca_dir.join(pki::CA_CERT), &rotated).unwrap();
    std::fs::write(tls.join(pki::CA_CERT), format!("{old}{new}")).unwrap();
    let d = start(101, "state-2")
        .await
        .expect("the controller starts with a CA it trusts");
    d.shutdown().await;
}

/// With the CA, the controller renews its own certificate on the routers' schedule: a
/// short-lived controller certificate is replaced in its files and in what it presents before it
/// expires, and routers connect to it afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_renews_its_own_certificate_with_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("pki");
    pki(&tls, &fabric_nodes(1, 1));
    let now = SystemTime::now();
    // Due at 70 % of 80 s (56 s after not_before), in about 6 s; expires in 30 s.
    let short =
        Validity::between(now - Duration::from_secs(50), now + Duration::from_secs(30)).unwrap();
    pki::issue_with(&tls, "controller", short).unwrap();
    let own = |tls: &Path| std::fs::read(tls.join("controller.pem")).unwrap();
    let old_file = own(&tls);
    let d = daemon::start(daemon::DaemonConfig {
        ca_dir: Some(tls.clone()),
        issue_valid_for: Duration::from_secs(3600),
        ..import_config(&dir.path().join("state"), &tls, &fabric_yaml(94, 1, 1, 10))
    })
    .await
    .expect("controller starts");
    let old_not_after = d.cert.not_after();
    assert!(old_not_after <= unix_now() + 30);

    eventually(
        Duration::from_secs(40),
        "the controller renewed its own certificate",
        || d.cert.renewals(Renewal::Renewed) == 1,
    )
    .await;
    // Before it expired, at the first try: a renewal that failed and came after the expiry
    // (the retry is 30 s on) passed the 40 s wait above.
    assert!(
        unix_now() < old_not_after,
        "renewed only after the old certificate expired"
    );
    assert_eq!(
        d.cert.renewals(Renewal::Invalid) + d.cert.renewals(Renewal::Refused),
        0,
        "a renewal failed first"
    );
    assert_ne!(own(&tls), old_file, "a new certificate in the file");
    assert_eq!(
        TlsIdentity::load(&tls, "controller").unwrap().chain[0],
        d.cert.current().cert[0],
        "what is presented is what the files hold"
    );
    let want = unix_now() + 3600;
    assert!(
        (want - 60..=want + 1).contains(&d.cert.not_after()),
        "not_after {} ~ {want}",
        d.cert.not_after()
    );
    // A router's new handshake sees the renewed certificate and its session comes up.
    let c = start_client(d.quic_addr, NODE, &tls, None).await;
    assert!(c.is_connected());
    drop(c);
    d.shutdown().await;
}

/// A stand-in for the controller: the real control protocol over mutual-TLS QUIC with the
/// controller's certificate. It sends one snapshot to each router that says hello, notes when
/// each `Renew` arrives, and answers as its [`Answers`] say.
struct StubController {
    addr: SocketAddr,
    renews: Arc<Mutex<Vec<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StubController {
    async fn start(tls: &Path, yaml: &str, answers: Answers) -> StubController {
        let ca = Arc::new(pki::CaSigner::load(tls).expect("the CA"));
        let id = TlsIdentity::load(tls, "controller").expect("the controller's identity");
        let peers = PeerNames::new(fabric_nodes(1, 1));
        let cfg = router::tls::server_config(&id, &peers, Default::default()).expect("config");
        let ep = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).expect("endpoint");
        let addr = ep.local_addr().unwrap();
        let topology = Arc::new(topology::yaml::load(yaml).expect("topology").topology);
        let snapshot = proto::encode(&ToRouter::Snapshot {
            version: 1,
            topology_version: 1,
            topology,
            live: Default::default(),
            circuits: Default::default(),
        })
        .unwrap();
        let renews: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let seen = renews.clone();
        let task = tokio::spawn(async move {
            let mut sessions = tokio::task::JoinSet::new();
            while let Some(incoming) = ep.accept().await {
                let (snapshot, seen, ca) = (snapshot.clone(), seen.clone(), ca.clone());
                sessions.spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                        return;
                    };
                    let mut frames = proto::FrameReader::new(proto::MAX_FROM_ROUTER);
                    let Ok(Some(_hello)) = frames.next(&mut recv).await else {
                        return;
                    };
                    if send.write_all(&snapshot).await.is_err() {
                        return;
                    }
                    let mut keys = Vec::new();
                    while let Ok(Some(frame)) = frames.next(&mut recv).await {
                        if let Ok(FromRouter::Renew { public_key, .. }) = proto::decode(&frame) {
                            seen.lock().unwrap().push(Instant::now());
                            keys.push(public_key);
                            // A certificate for a request's key, signed as the controller would.
                            let certify = |key: &[u8]| {
                                let key = pki::RawP256PublicKey::new(key).unwrap();
                                let validity =
                                    Validity::for_duration(Duration::from_secs(3600)).unwrap();
                                let chain_pem = ca.sign(NODE, validity, &key).unwrap().chain_pem;
                                ToRouter::Certificate { chain_pem }
                            };
                            let replies = match answers {
                                Answers::CloseSession => {
                                    conn.close(0u32.into(), b"unexpected message");
                                    return;
                                }
                                Answers::SecondAfterFirst if keys.len() == 2 => {
                                    keys.iter().map(|k| certify(k)).collect()
                                }
                                Answers::RefuseFirstThenCertifySecond if keys.len() == 2 => vec![
                                    ToRouter::RenewRefused {
                                        reason: "the first request, refused late".into(),
                                    },
                                    certify(&keys[1]),
                                ],
                                _ => Vec::new(),
                            };
                            for reply in replies {
                                let frame = proto::encode(&reply).unwrap();
                                if send.write_all(&frame).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        StubController { addr, renews, task }
    }

    /// When each `Renew` arrived.
    fn renews(&self) -> Vec<Instant> {
        self.renews.lock().unwrap().clone()
    }
}

/// How a [`StubController`] answers `Renew`.
#[derive(Debug, Clone, Copy)]
enum Answers {
    /// Never.
    None,
    /// It closes the connection instead, as a controller that predates renewal does.
    CloseSession,
    /// The first request is answered late: only after the second came, right before the
    /// second's answer.
    SecondAfterFirst,
    /// As `SecondAfterFirst`, the late answer to the first a refusal.
    RefuseFirstThenCertifySecond,
}

impl Drop for StubController {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A validity due for renewal since 90 s (70 % of 1300 s), valid for 5 more minutes.
fn due_now() -> Validity {
    let now = SystemTime::now();
    Validity::between(
        now - Duration::from_secs(1000),
        now + Duration::from_secs(300),
    )
    .unwrap()
}

/// A PKI in `dir` whose `edge-0` certificate is [`due_now`].
fn pki_due_now(dir: &Path) {
    pki(dir, &fabric_nodes(1, 1));
    pki::issue_with(dir, NODE, due_now()).expect("due certificate");
}

/// Asserts that the gaps between `times` are `want` (seconds), within what a loaded machine
/// adds or takes. Each request goes a back-off after the one before it went (a timer never fires
/// early), but may reach the stub late, which shortens the gap after it: so the time since the
/// first request is checked from below (not 500 ms short of the sum of the gaps wanted: only the
/// first request's own lateness counts there), and each gap from above (not 1.5 s longer).
fn assert_gaps(times: &[Instant], want: &[f64]) {
    let gaps: Vec<f64> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    assert_eq!(gaps.len(), want.len(), "gaps {gaps:?}, want {want:?}");
    let (mut since_first, mut wanted) = (0.0, 0.0);
    for (g, w) in gaps.iter().zip(want) {
        since_first += g;
        wanted += w;
        assert!(
            since_first > wanted - 0.5 && *g < w + 1.5,
            "gaps between requests {gaps:?}, want {want:?}"
        );
    }
}

/// The router keeps its files and the certificate it presents.
fn assert_kept(tls: &Path, cert: &CertResolver, old_files: &(Vec<u8>, Vec<u8>), old_leaf: &[u8]) {
    assert_eq!(&files(tls), old_files, "the files are untouched");
    assert_eq!(cert.current().cert[0].as_ref(), old_leaf);
    assert_eq!(cert.reloads(), 0);
    for r in [Renewal::Renewed, Renewal::Refused, Renewal::Invalid] {
        assert_eq!(cert.renewals(r), 0, "{r:?}");
    }
}

/// A PKI whose `edge-0` certificate is [`due_now`] (in `dir/pki`), a [`StubController`] answering
/// as `answers` (its topology on loopback network `net`), and the router with its renewal back-off shortened
/// to 1 s doubling to 2 s.
async fn stub_and_router(
    net: u8,
    answers: Answers,
) -> (
    tempfile::TempDir,
    StubController,
    LiveRouter,
    Arc<CertResolver>,
) {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("pki");
    pki_due_now(&tls);
    let stub = StubController::start(&tls, &fabric_yaml(net, 1, 1, 10), answers).await;
    let (r, cert) = start_router_with(stub.addr, &tls, |cfg| {
        cfg.renew_backoff_min = Duration::from_secs(1);
        cfg.renew_backoff_max = Duration::from_secs(2);
    })
    .await;
    (dir, stub, r, cert)
}

/// A controller that never answers `Renew`: the router counts each request the next one
/// replaces as unanswered, asks again only after the back-off (here 1 s doubling to 2 s; by
/// default 30 s to 10 minutes), keeps its session and its certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_that_does_not_answer_is_asked_again_after_the_backoff() {
    let (dir, stub, r, cert) = stub_and_router(97, Answers::None).await;
    let tls = dir.path().join("pki");
    let old_files = files(&tls);
    let old_leaf = cert.current().cert[0].to_vec();

    eventually(Duration::from_secs(60), "five renewal requests", || {
        stub.renews().len() >= 5
    })
    .await;
    let no_answer = cert.renewals(Renewal::NoAnswer);
    let times = stub.renews();
    assert_eq!(
        no_answer as usize,
        times.len() - 1,
        "each request after the first counts the one before as unanswered"
    );
    assert_gaps(&times[..5], &[1.0, 2.0, 2.0, 2.0]);
    assert_kept(&tls, &cert, &old_files, &old_leaf);
    assert!(r.client.is_connected());
    assert_eq!(
        r.client.connects(),
        1,
        "an unanswered request keeps the session"
    );
    let m = r.handle.metrics_text();
    assert!(
        m.contains(&format!(
            "tasman_tls_cert_renewals_total{{node=\"{NODE}\",result=\"no_answer\"}} {no_answer}"
        )),
        "{m}"
    );
    r.stop().await;
}

/// A controller that closes the session on `Renew` (one that predates renewal): the request
/// lost with its session counts as unanswered, and the next session asks again only after the
/// back-off, which carries over from session to session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_lost_with_its_session_counts_as_unanswered_and_waits_the_backoff() {
    let (dir, stub, r, cert) = stub_and_router(98, Answers::CloseSession).await;
    let tls = dir.path().join("pki");
    let old_files = files(&tls);
    let old_leaf = cert.current().cert[0].to_vec();

    eventually(
        Duration::from_secs(60),
        "four renewal requests, each lost with its session and counted",
        || stub.renews().len() >= 4 && cert.renewals(Renewal::NoAnswer) >= 4,
    )
    .await;
    let times = stub.renews();
    // The reconnections (100 ms doubling) come sooner than the back-off lets a request go.
    assert_gaps(&times[..4], &[1.0, 2.0, 2.0]);
    assert!(r.client.connects() >= 4, "one session per request");
    assert_kept(&tls, &cert, &old_files, &old_leaf);
    r.stop().await;
}

/// A controller without a CA, the router's back-off shortened to 1 s doubling to 2 s: each
/// refusal is counted once (never also as unanswered) and the next request waits the back-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_asked_again_after_the_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let (d, tls) = setup(dir.path(), 99, due_now(), false).await;
    let (r, cert) = start_router_with(d.quic_addr, &tls, |cfg| {
        cfg.renew_backoff_min = Duration::from_secs(1);
        cfg.renew_backoff_max = Duration::from_secs(2);
    })
    .await;
    let old_files = files(&tls);
    // When each refusal was counted.
    let mut refused = Vec::new();
    let start = Instant::now();
    while refused.len() < 4 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for four refusals, saw {}",
            refused.len()
        );
        let n = cert.renewals(Renewal::Refused) as usize;
        refused.resize(n.max(refused.len()), Instant::now());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_gaps(&refused[..4], &[1.0, 2.0, 2.0]);
    assert_eq!(
        cert.renewals(Renewal::NoAnswer),
        0,
        "a refusal is an answer"
    );
    assert_eq!(cert.renewals(Renewal::Renewed), 0);
    assert_eq!(files(&tls), old_files, "the files are untouched");
    assert_eq!(r.client.connects(), 1, "a refusal keeps the session");
    r.stop().await;
    d.shutdown().await;
}

/// The answer to a request that timed out (and was asked again with a new key) arrives after
/// all: it is ignored, and the answer to the request still waiting is installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answer_to_an_earlier_request_does_not_spoil_the_current_one() {
    let (_dir, stub, r, cert) = stub_and_router(96, Answers::SecondAfterFirst).await;
    let old_leaf = cert.current().cert[0].to_vec();

    eventually(
        Duration::from_secs(60),
        "the second request's answer installed",
        || cert.renewals(Renewal::Renewed) == 1,
    )
    .await;
    assert_eq!(stub.renews().len(), 2);
    assert_eq!(
        cert.renewals(Renewal::NoAnswer),
        1,
        "the first, when the second went"
    );
    assert_eq!(
        cert.renewals(Renewal::Invalid),
        0,
        "the late answer is not taken for the second request's"
    );
    assert_ne!(cert.current().cert[0].as_ref(), old_leaf.as_slice());
    r.stop().await;
}

/// A late refusal of a request that timed out (and was asked again with a new key) answers that
/// request, not the one still waiting: the certificate that follows for the second is installed.
/// (The refusal took the second request's key, and its certificate was then ignored as one no
/// renewal asked for.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_refusal_of_an_earlier_request_does_not_use_up_the_current_one() {
    let (_dir, stub, r, cert) = stub_and_router(103, Answers::RefuseFirstThenCertifySecond).await;
    let old_leaf = cert.current().cert[0].to_vec();
    eventually(
        Duration::from_secs(60),
        "the second request's answer installed",
        || cert.renewals(Renewal::Renewed) == 1,
    )
    .await;
    assert_eq!(stub.renews().len(), 2);
    assert_eq!(
        cert.renewals(Renewal::NoAnswer),
        1,
        "the first, when the second went"
    );
    assert_eq!(
        cert.renewals(Renewal::Refused),
        0,
        "the first was counted already; the second was not refused"
    );
    assert_ne!(cert.current().cert[0].as_ref(), old_leaf.as_slice());
    r.stop().await;
}

/// Revocation lists through the controller: the `ca.crl.pem` that `tasman pki revoke` writes in
/// the controller's `--ca-dir` reaches a router with its own TLS directory over the control
/// channel, at connect and at each change (checked against the router's bundle, adopted, written
/// to its directory). Revoking the router's own certificate ends its live session: the
/// controller adopts the list first and closes the session that presented it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_lists_reach_routers_through_the_controller() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("pki");
    pki(&ca, &fabric_nodes(1, 1));
    let serial = |s: &str| pki::RevokeTarget::Serial(s.parse().unwrap());
    let reason = pki::RevokeReason::KeyCompromise;
    // A list before the router connects: it gets it with its first session.
    pki::revoke(&ca, &serial("0badc0de"), reason).unwrap();
    let d = daemon::start(daemon::DaemonConfig {
        ca_dir: Some(ca.clone()),
        cert_reload_interval: Duration::from_millis(200),
        ..import_config(&dir.path().join("state"), &ca, &fabric_yaml(93, 1, 1, 10))
    })
    .await
    .expect("controller starts");
    let own = own_tls_dir(&ca, &dir.path().join("router-tls"));
    let (r, cert) = start_router(&d, &own).await;
    // In force, and saved in the router's directory (written just after it is adopted).
    let took = |n: u64| {
        cert.crls().first().map(|l| l.number) == Some(n)
            && std::fs::read(own.join(pki::CA_CRL)).ok() == std::fs::read(ca.join(pki::CA_CRL)).ok()
    };
    eventually(Duration::from_secs(10), "the router took list 1", || {
        took(1)
    })
    .await;

    // A change: the controller reads its --ca-dir again and sends the new lists.
    pki::revoke(&ca, &serial("0badc0df"), reason).unwrap();
    eventually(Duration::from_secs(10), "the router took list 2", || {
        took(2)
    })
    .await;
    assert!(r.client.is_connected());
    assert_eq!(cert.crl_failures(), 0);

    // The router's own certificate: its session is closed, and its reconnects are refused.
    pki::revoke(&ca, &pki::RevokeTarget::Node(NODE.into()), reason).unwrap();
    eventually(
        Duration::from_secs(10),
        "the controller closed the session",
        || d.cert.revoked_closed() >= 1,
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the router is disconnected",
        || !r.client.is_connected(),
    )
    .await;
    // It goes on trying (from 100 ms apart): the controller takes no session of it again,
    // refusing its handshake.
    stays(
        Duration::from_secs(3),
        "no new session of the revoked router",
        || router_status(&d, NODE).is_some_and(|s| !s.connected),
    )
    .await;
    assert_handshake_revoked(&d, &own).await;
}

/// A leaked key after renewals through the controller: the router (on a TLS directory of its
/// own, as on a real host) renews, so the certificate it presents is one the CA directory's
/// `edge-0.pem` never held. `tasman pki revoke edge-0` still revokes it: the controller closes
/// the session that presented it with the revoked code, and handshakes with it are refused from
/// then on. (Only the serial of the CA directory's `edge-0.pem` was revoked: the
/// renewed certificate stayed valid, and went on renewing itself.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_node_revokes_the_certificate_it_renewed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("pki");
    pki(&ca, &fabric_nodes(1, 1));
    let now = SystemTime::now();
    // 80 s of lifetime, 50 s of them gone: due at 70 % (56 s), in about 6 s.
    let short =
        Validity::between(now - Duration::from_secs(50), now + Duration::from_secs(30)).unwrap();
    pki::issue_with(&ca, NODE, short).unwrap();
    let d = daemon::start(daemon::DaemonConfig {
        ca_dir: Some(ca.clone()),
        issue_valid_for: Duration::from_secs(3600),
        cert_reload_interval: Duration::from_millis(200),
        ..import_config(&dir.path().join("state"), &ca, &fabric_yaml(89, 1, 1, 10))
    })
    .await
    .expect("controller starts");
    let own = own_tls_dir(&ca, &dir.path().join("router-tls"));
    let (r, cert) = start_router(&d, &own).await;
    eventually(
        Duration::from_secs(40),
        "the router renewed its certificate",
        || cert.renewals(Renewal::Renewed) == 1,
    )
    .await;
    let renewed = cert.current().cert[0].clone();
    let renewed_serial = pki::serial_of(&renewed).unwrap();
    let on_file = TlsIdentity::load(&ca, NODE).unwrap().chain[0].clone();
    assert_ne!(
        pki::serial_of(&on_file).unwrap(),
        renewed_serial,
        "the CA directory's {NODE}.pem is not what the router presents"
    );
    // The router's control client again, started on its files: its session presents the
    // renewed certificate (the first one's presented the certificate it renewed).
    r.stop().await;
    assert_eq!(TlsIdentity::load(&own, NODE).unwrap().chain[0], renewed);
    let client = start_client(d.quic_addr, NODE, &own, None).await;
    assert!(client.is_connected());
    assert_eq!(d.cert.revoked_closed(), 0);

    let revoked = pki::revoke(
        &ca,
        &pki::RevokeTarget::Node(NODE.into()),
        pki::RevokeReason::KeyCompromise,
    )
    .unwrap();
    assert!(
        revoked.added.contains(&renewed_serial),
        "{renewed_serial} among {:?}",
        revoked.added
    );
    eventually(
        Duration::from_secs(10),
        "the controller closed the session that presented the renewed certificate",
        || d.cert.revoked_closed() >= 1,
    )
    .await;
    assert!(
        d.cert
            .revoked(&[renewed.clone(), d.cert.trusted()[0].clone()])
    );
    eventually(
        Duration::from_secs(10),
        "the router is disconnected",
        || !client.is_connected(),
    )
    .await;
    drop(client);
    // A handshake with the renewed certificate (the router's files): refused.
    assert_eq!(
        TlsIdentity::load(&own, NODE).unwrap().chain[0],
        renewed,
        "the router's files hold the renewed certificate"
    );
    assert_handshake_revoked(&d, &own).await;
    d.shutdown().await;
}

/// A handshake with the controller `d` on `NODE`'s files in `tls` is refused with TLS's
/// certificate_revoked alert (44). With TLS 1.3 the client may take its handshake as done
/// before the controller has checked its certificate: the refusal then closes it.
async fn assert_handshake_revoked(d: &Daemon, tls: &Path) {
    use fabric::controller::distribute::CONTROLLER_NAME;
    let id = TlsIdentity::load(tls, NODE).unwrap();
    let peers = PeerNames::new([CONTROLLER_NAME.to_string()]);
    let cfg = router::tls::client_config(&id, &peers, Default::default()).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    let attempt = async {
        match ep.connect(d.quic_addr, CONTROLLER_NAME).unwrap().await {
            Err(e) => e,
            Ok(conn) => conn.closed().await,
        }
    };
    let refused = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .expect("refused within 10 s");
    match &refused {
        quinn::ConnectionError::ConnectionClosed(c) => assert_eq!(
            c.error_code,
            quinn::TransportErrorCode::crypto(44),
            "{refused}"
        ),
        other => panic!("expected a close with the certificate_revoked alert, got {other}"),
    }
}

/// A TLS directory of the router's own at `own`: the CA bundle and `NODE`'s pair copied from the
/// CA directory `ca` (so that what the router installs is not the CA directory's files).
fn own_tls_dir(ca: &Path, own: &Path) -> PathBuf {
    std::fs::create_dir_all(own).unwrap();
    for f in [
        pki::CA_CERT.to_string(),
        format!("{NODE}.pem"),
        format!("{NODE}.key"),
    ] {
        std::fs::copy(ca.join(&f), own.join(&f)).unwrap();
    }
    own.to_path_buf()
}
