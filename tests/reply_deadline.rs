//! The edge's first attempt is bounded by the reply deadline and the first hop's down verdict
//! even while the client's bytes wait to go out: a site that does not read its stream yet (its
//! backend's accept queue is full, so it is still connecting) stops the edge's writes once the
//! stream window is full, and the attempt must still end at the deadline, or move to the next
//! candidate at the down verdict, rather than when the site's backend connect gives up.
//!
//! Most tests run the routers in this process, with the deadline and the site's backend
//! connect timeout set in their `RouterConfig`; the last one runs `tasman router` processes
//! given the same settings as flags (`--reply-timeout`, `--backend-connect-timeout`).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use router::netem::{LinkEmulator, LinkProfile};
use router::transport::STREAM_RECEIVE_WINDOW;
use router::{Router, RouterConfig, RouterHandle, Snapshot};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use topology::{Latency, NodeId};

/// The site's backend connect timeout: far longer than anything the tests wait for.
const BACKEND_CONNECT: Duration = Duration::from_secs(60);
/// The client's connection must have ended by then where the edge's reply deadline is short
/// (2 s in process, `--reply-timeout 3s` for `tasman router`): well below the default reply
/// deadline (10 s), so that only the configured one explains the end, and well above the
/// configured one on 2 busy cores.
const WITHIN_SHORT: Duration = Duration::from_secs(7);
/// What the client sends before any reply: a stream window's worth and more, so the edge's
/// write waits for the site's flow control.
const CLIENT_BYTES: usize = STREAM_RECEIVE_WINDOW as usize + 8 * 1024 * 1024;
/// Well below [`BACKEND_CONNECT`]: the attempt must have ended by then.
const WITHIN: Duration = Duration::from_secs(20);

/// A backend on loopback whose accept queue is full: it listens with a backlog of 0 and never
/// accepts, and the connections that filled its queue are held, so a further connect gets no
/// answer (the kernel drops its SYN) and hangs in SYN retries.
struct FullBackend {
    addr: SocketAddr,
    _listener: TcpListener,
    _queued: Vec<TcpStream>,
}

async fn full_backend() -> FullBackend {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind((LOCAL, 0).into()).unwrap();
    let listener = sock.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    loop {
        assert!(queued.len() < 64, "the accept queue of {addr} never filled");
        match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => queued.push(s),
            Ok(Err(e)) => panic!("connect to {addr}: {e}"),
            Err(_) => break,
        }
    }
    assert!(!queued.is_empty(), "no connection queued on {addr}");
    FullBackend {
        addr,
        _listener: listener,
        _queued: queued,
    }
}

/// The topology of `y`, version 1.
fn snapshot(y: &TopoYaml) -> Arc<Snapshot> {
    let text = y.render();
    let t = topology::load(&text)
        .unwrap_or_else(|d| panic!("test topology invalid: {d:?}\n{text}"))
        .topology;
    Arc::new(Snapshot::new(1, Arc::new(t)))
}

/// Starts node `id` on `snap` with a certificate issued in `pki`, `tune` applied to its config.
/// The sender is its snapshot source (kept so that it stays open).
async fn spawn(
    snap: &Arc<Snapshot>,
    pki: &Path,
    id: &str,
    tune: impl FnOnce(&mut RouterConfig),
) -> (RouterHandle, tokio::sync::watch::Sender<Arc<Snapshot>>) {
    router::pki::issue(pki, id).unwrap();
    let tls = router::tls::TlsIdentity::load(pki, id).unwrap();
    let (tx, rx) = tokio::sync::watch::channel(snap.clone());
    let mut cfg = RouterConfig::new(NodeId::new(id), tls, rx);
    tune(&mut cfg);
    (Router::spawn(cfg).await.unwrap(), tx)
}

/// A counter or gauge of `h` (sum over the series of `name` whose labels contain `filter`).
fn metric(h: &RouterHandle, name: &str, filter: &str) -> u64 {
    metric_sum(&h.metrics_text(), name, filter)
}

/// [`eventually`] from inside the runtime the routers run on (its worker is handed over).
fn wait(what: &str, cond: impl FnMut() -> bool) {
    tokio::task::block_in_place(|| eventually(DEADLINE, what, cond));
}

/// Connects to the edge's service `port` and sends `bytes` from a task of its own (it stops at
/// the first failed write). The read half, and where the writer puts the error that stopped it.
async fn sending_client(
    port: u16,
    bytes: usize,
) -> (
    tokio::net::tcp::OwnedReadHalf,
    Arc<std::sync::Mutex<Option<std::io::ErrorKind>>>,
) {
    let (r, mut w) = TcpStream::connect((LOCAL, port))
        .await
        .unwrap()
        .into_split();
    let failed = Arc::new(std::sync::Mutex::new(None));
    let failed_w = failed.clone();
    tokio::spawn(async move {
        let block = vec![0x5a_u8; 1024 * 1024];
        let mut sent = 0;
        while sent < bytes {
            if let Err(e) = w.write_all(&block).await {
                *failed_w.lock().unwrap() = Some(e.kind());
                return;
            }
            sent += block.len();
        }
        // Held open (no FIN): the attempt waits for the site, not for the client.
        std::future::pending::<()>().await;
    });
    (r, failed)
}

/// The edge (reply deadline 2 s) and one site whose backend's accept queue is full (backend
/// connect timeout 60 s). A client sends more than a stream window before any reply: the site
/// does not read its stream while it connects, so the edge's write waits for flow control, and
/// the edge must still fail the attempt at its deadline: the client's connection is reset
/// (`upstream_lost`) long before the site's backend connect would give up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reply_deadline_ends_an_attempt_whose_client_bytes_wait_for_flow_control() {
    let backend = full_backend().await;
    let port = free_tcp_port(LOCAL);
    let mut y = TopoYaml::default();
    y.edge("edge", free_udp(LOCAL), LOCAL, None)
        .site("site", free_udp(LOCAL), &[("chat", backend.addr, 100)])
        .link("edge", "site", "1ms")
        .service("chat", port, &[]);
    let snap = snapshot(&y);
    let pki = tempfile::tempdir().unwrap();
    router::pki::init(pki.path()).unwrap();
    let (site, _s) = spawn(&snap, pki.path(), "site", |c| {
        c.backend_connect_timeout = BACKEND_CONNECT;
    })
    .await;
    let (edge, _e) = spawn(&snap, pki.path(), "edge", |c| {
        c.reply_timeout = Duration::from_secs(2);
    })
    .await;
    wait("the edge routes chat to the site", || {
        edge.routes().preferred("chat").is_some()
    });

    let started = Instant::now();
    let (mut r, write_failed) = sending_client(port, CLIENT_BYTES).await;
    let mut buf = [0u8; 64];
    let end = tokio::time::timeout(WITHIN, r.read(&mut buf)).await;
    let took = started.elapsed();
    let up = metric(&edge, "tasman_bytes_up_total", "");
    println!("client connection ended after {took:?}: {end:?}; {up} bytes handed to the stream");
    match end {
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        // The socket reports a reset once: to the writer, if its write came first.
        Ok(Ok(0)) => wait("the client's writer to see the reset", || {
            *write_failed.lock().unwrap() == Some(std::io::ErrorKind::ConnectionReset)
        }),
        Ok(Ok(n)) => panic!("the client got {n} bytes from a site that never connected"),
        Ok(Err(e)) => panic!("the client connection ended with {e}, not a reset"),
        Err(_) => panic!(
            "the client connection was still open after {WITHIN:?} (reply deadline 2 s); \
             the edge handed {up} bytes to the stream"
        ),
    }
    assert!(
        took < WITHIN_SHORT,
        "the client connection ended after {took:?}, not within {WITHIN_SHORT:?} (reply deadline \
         2 s; the default is 10 s)"
    );
    assert_eq!(
        metric(
            &edge,
            "tasman_stream_errors_total",
            "code=\"upstream_lost\""
        ),
        1,
        "the attempt ended at the reply deadline"
    );
    // The site was still connecting to its backend: the edge gave up, not the site.
    assert_eq!(
        metric(
            &site,
            "tasman_stream_errors_total",
            "code=\"backend_refused\""
        ),
        0
    );
    drop(backend);
}

/// The edge reaches site-near (1 ms, backend accept queue full) through a link emulator and
/// site-far (20 ms) directly, with a reply deadline of 60 s and a replay limit above what the
/// client sends. Once the client's bytes fill the stream window to site-near (the edge's write
/// waits), the link is cut: at the down verdict the attempt moves to site-far
/// (`next_hop_unreachable`), which gets the bytes replayed and greets the client, instead of
/// waiting for the dead connection to close (`upstream_lost`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_hop_declared_down_while_client_bytes_wait_moves_the_attempt() {
    let backend = full_backend().await;
    let far_backend = echo_backend("SITE=site-far\n");
    let port = free_tcp_port(LOCAL);
    let near_addr = free_udp(LOCAL);
    let mut y = TopoYaml::default();
    y.edge("edge", free_udp(LOCAL), LOCAL, None)
        .site("site-near", near_addr, &[("chat", backend.addr, 100)])
        .site("site-far", free_udp(LOCAL), &[("chat", far_backend, 100)])
        .link("edge", "site-near", "1ms")
        .link("edge", "site-far", "20ms")
        .service("chat", port, &[]);
    let snap = snapshot(&y);
    let pki = tempfile::tempdir().unwrap();
    router::pki::init(pki.path()).unwrap();
    let link = LinkEmulator::spawn(
        (LOCAL, 0).into(),
        near_addr,
        LinkProfile::delay(Latency::ZERO),
    )
    .await
    .unwrap();
    let (_near, _n) = spawn(&snap, pki.path(), "site-near", |c| {
        c.backend_connect_timeout = BACKEND_CONNECT;
    })
    .await;
    let (_far, _f) = spawn(&snap, pki.path(), "site-far", |_| {}).await;
    let (edge, _e) = spawn(&snap, pki.path(), "edge", |c| {
        c.reply_timeout = BACKEND_CONNECT;
        c.replay_limit = CLIENT_BYTES + 8 * 1024 * 1024;
        c.dial_overrides = HashMap::from([(NodeId::new("site-near"), link.local_addr())]);
    })
    .await;
    wait("the edge prefers site-near, site-far next", || {
        edge.routes()
            .preferred("chat")
            .is_some_and(|c| c.site.as_str() == "site-near")
            && metric(&edge, "tasman_service_candidates", "service=\"chat\"") == 2
            && metric(&edge, "tasman_neighbour_up", "") == 2
    });

    let (r, _) = sending_client(port, CLIENT_BYTES).await;
    // The window to site-near is full (less the header): the edge's write now waits.
    let window = STREAM_RECEIVE_WINDOW as u64;
    wait(
        "the client's bytes fill the stream window to site-near",
        || metric(&edge, "tasman_bytes_up_total", "") >= window - 1024 * 1024,
    );
    link.set_profile(LinkProfile::cut());
    let cut = Instant::now();

    let mut r = tokio::io::BufReader::new(r);
    let mut greeting = String::new();
    let got = tokio::time::timeout(WITHIN, r.read_line(&mut greeting)).await;
    println!("greeted after the cut in {:?}: {got:?}", cut.elapsed());
    assert!(
        matches!(got, Ok(Ok(n)) if n > 0),
        "no greeting within {WITHIN:?} of the cut: {got:?}"
    );
    assert_eq!(greeting, "SITE=site-far\n");
    assert_eq!(metric(&edge, "tasman_failovers_total", ""), 1);
    assert_eq!(
        metric(
            &edge,
            "tasman_stream_errors_total",
            "code=\"next_hop_unreachable\""
        ),
        1,
        "the attempt moved at the down verdict"
    );
    assert_eq!(
        metric(
            &edge,
            "tasman_stream_errors_total",
            "code=\"upstream_lost\""
        ),
        0,
        "the attempt did not wait for the dead connection to close"
    );
    drop(backend);
}

/// An edge (service `chat` on `port`, its config tuned by `tune`), site-near at 1 ms whose
/// backend's accept queue is full (backend connect timeout [`BACKEND_CONNECT`]: it keeps
/// connecting) and site-far at 20 ms, whose echo backend greets with `SITE=site-far`. Made once
/// the edge prefers site-near, site-far next; the rest is kept for the test's length.
struct NearFullFarEcho {
    edge: RouterHandle,
    port: u16,
    _kept: (
        FullBackend,
        [RouterHandle; 2],
        [tokio::sync::watch::Sender<Arc<Snapshot>>; 3],
        tempfile::TempDir,
    ),
}

async fn near_full_far_echo(tune: impl FnOnce(&mut RouterConfig)) -> NearFullFarEcho {
    let backend = full_backend().await;
    let far_backend = echo_backend("SITE=site-far\n");
    let port = free_tcp_port(LOCAL);
    let mut y = TopoYaml::default();
    y.edge("edge", free_udp(LOCAL), LOCAL, None)
        .site("site-near", free_udp(LOCAL), &[("chat", backend.addr, 100)])
        .site("site-far", free_udp(LOCAL), &[("chat", far_backend, 100)])
        .link("edge", "site-near", "1ms")
        .link("edge", "site-far", "20ms")
        .service("chat", port, &[]);
    let snap = snapshot(&y);
    let pki = tempfile::tempdir().unwrap();
    router::pki::init(pki.path()).unwrap();
    let (near, n) = spawn(&snap, pki.path(), "site-near", |c| {
        c.backend_connect_timeout = BACKEND_CONNECT;
    })
    .await;
    let (far, f) = spawn(&snap, pki.path(), "site-far", |_| {}).await;
    let (edge, e) = spawn(&snap, pki.path(), "edge", tune).await;
    wait("the edge prefers site-near, site-far next", || {
        edge.routes()
            .preferred("chat")
            .is_some_and(|c| c.site.as_str() == "site-near")
            && metric(&edge, "tasman_service_candidates", "service=\"chat\"") == 2
            && metric(&edge, "tasman_neighbour_up", "") == 2
    });
    NearFullFarEcho {
        edge,
        port,
        _kept: (backend, [near, far], [n, f, e], pki),
    }
}

/// The edge prefers site-near (1 ms), whose backend's accept queue is full (backend connect
/// timeout 60 s), over site-far (20 ms), with a reply deadline of 2 s. A client that sends a
/// request and waits: nothing comes back from site-near by the deadline, so the attempt is
/// retried on site-far (`upstream_lost`, one failover), which gets the request replayed and
/// answers, instead of the client's connection being reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_unanswered_at_the_reply_deadline_moves_to_the_next_site() {
    let f = near_full_far_echo(|c| c.reply_timeout = Duration::from_secs(2)).await;
    let (edge, port) = (&f.edge, f.port);

    let started = Instant::now();
    let mut c = TcpStream::connect((LOCAL, port)).await.unwrap();
    c.write_all(b"hello\n").await.unwrap();
    let mut r = tokio::io::BufReader::new(c);
    let mut greeting = String::new();
    let got = tokio::time::timeout(WITHIN, r.read_line(&mut greeting)).await;
    println!("answered after {:?}: {got:?}", started.elapsed());
    assert!(
        matches!(got, Ok(Ok(n)) if n > 0),
        "no answer within {WITHIN:?}: {got:?}"
    );
    assert_eq!(greeting, "SITE=site-far\n");
    // The request went to site-far too (the echo backend sends it back after its greeting).
    let mut echoed = String::new();
    tokio::time::timeout(WITHIN, r.read_line(&mut echoed))
        .await
        .expect("no echo of the replayed request")
        .unwrap();
    assert_eq!(echoed, "hello\n");
    assert_eq!(metric(edge, "tasman_failovers_total", ""), 1);
    assert_eq!(
        metric(edge, "tasman_stream_errors_total", "code=\"upstream_lost\""),
        1,
        "the first attempt ended at the reply deadline"
    );
    // A slow answer is no proof of a dead site: site-near stays the edge's choice.
    assert!(
        edge.routes()
            .preferred("chat")
            .is_some_and(|c| c.site.as_str() == "site-near")
    );
}

/// A backend that greets at once, then reads slowly (16 KiB every 100 ms, its receive buffer
/// small) for `slow`, then as fast as it can: a site that answered at once but takes the
/// request's bytes slowly. The number of connections that brought it bytes (the site's health
/// checks bring none).
fn greet_then_slow_reader(
    greeting: &'static str,
    slow: Duration,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(16 * 1024).unwrap();
    sock.bind((LOCAL, 0).into()).unwrap();
    let l = sock.listen(16).unwrap().into_std().unwrap();
    l.set_nonblocking(false).unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let count = count.clone();
            std::thread::spawn(move || {
                let _ = s.write_all(greeting.as_bytes());
                let start = Instant::now();
                let mut buf = vec![0u8; 256 * 1024];
                let mut counted = false;
                loop {
                    let slow_now = start.elapsed() < slow;
                    let want = if slow_now { 16 * 1024 } else { buf.len() };
                    let read = s.read(&mut buf[..want]);
                    if !counted && matches!(read, Ok(n) if n > 0) {
                        counted = true;
                        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    match read {
                        Ok(0) | Err(_) => break,
                        Ok(_) if slow_now => std::thread::sleep(Duration::from_millis(100)),
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// A retry whose replay is larger than the stream window still reads the site's answer while
/// it writes: site-far answers at once, and the edge carries the connection on to it, though
/// the replay waits on site-far's flow control past the reply deadline. (The replay was written
/// before the answer was read: at the deadline the edge gave up a site whose backend had the
/// request, and reset the client.) The first path crosses a transit, so that the first try
/// takes more than one stream window of the client's bytes before its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_reads_the_answer_while_its_replay_waits_for_flow_control() {
    let backend = full_backend().await;
    let (far_backend, far_requests) =
        greet_then_slow_reader("SITE=site-far\n", Duration::from_secs(6));
    let port = free_tcp_port(LOCAL);
    let mut y = TopoYaml::default();
    y.edge("edge", free_udp(LOCAL), LOCAL, None)
        .transit("transit", free_udp(LOCAL))
        .site("site-near", free_udp(LOCAL), &[("chat", backend.addr, 100)])
        .site("site-far", free_udp(LOCAL), &[("chat", far_backend, 100)])
        .link("edge", "transit", "1ms")
        .link("transit", "site-near", "1ms")
        .link("edge", "site-far", "20ms")
        .service("chat", port, &[]);
    let snap = snapshot(&y);
    let pki = tempfile::tempdir().unwrap();
    router::pki::init(pki.path()).unwrap();
    let (_near, _n) = spawn(&snap, pki.path(), "site-near", |c| {
        c.backend_connect_timeout = BACKEND_CONNECT;
    })
    .await;
    let (_transit, _t) = spawn(&snap, pki.path(), "transit", |_| {}).await;
    let (_far, _f) = spawn(&snap, pki.path(), "site-far", |_| {}).await;
    // The client sends 1.5 stream windows: the first try (edge -> transit -> site-near)
    // takes them all (a window to the transit, a window from it to site-near), and its
    // deadline moves them, replayed, to site-far.
    let client_bytes = STREAM_RECEIVE_WINDOW as usize * 3 / 2;
    let (edge, _e) = spawn(&snap, pki.path(), "edge", |c| {
        c.reply_timeout = Duration::from_secs(3);
        c.replay_limit = client_bytes + 8 * 1024 * 1024;
    })
    .await;
    wait("the edge prefers site-near, site-far next", || {
        edge.routes()
            .preferred("chat")
            .is_some_and(|c| c.site.as_str() == "site-near")
            && metric(&edge, "tasman_service_candidates", "service=\"chat\"") == 2
            && metric(&edge, "tasman_neighbour_up", "") == 2
    });
    let (r, _) = sending_client(port, client_bytes).await;
    let mut r = tokio::io::BufReader::new(r);
    let mut greeting = String::new();
    let got = tokio::time::timeout(Duration::from_secs(60), r.read_line(&mut greeting)).await;
    assert!(
        matches!(got, Ok(Ok(n)) if n > 0),
        "no answer from site-far: {got:?}; edge: {}",
        edge.metrics_text()
    );
    assert_eq!(greeting, "SITE=site-far\n");
    assert_eq!(
        metric(
            &edge,
            "tasman_stream_errors_total",
            "code=\"upstream_lost\""
        ),
        1,
        "only the first try ended at its deadline"
    );
    assert_eq!(metric(&edge, "tasman_failovers_total", ""), 1);
    assert_eq!(far_requests.load(std::sync::atomic::Ordering::Relaxed), 1);
    drop(backend);
}

/// The same as the first test with `tasman router` processes: an edge started with
/// `--reply-timeout 3s` in front of a site started with `--backend-connect-timeout 60s`, whose
/// backend's accept queue is full. The client's connection ends at the edge's deadline, well
/// within the default one (10 s), counted as `upstream_lost` on the edge's /metrics: the site
/// is still waiting for its backend (at the default 2 s its connect would have failed first,
/// `backend_refused`). Each router warns that its values do not fit the other roles' defaults.
#[test]
fn the_reply_and_backend_connect_timeout_flags_reach_the_routers() {
    // The backend's sockets are tokio's: made on a runtime of their own, alive while they are.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let backend = rt.block_on(full_backend());
    let port = free_tcp_port(LOCAL);
    let mut y = TopoYaml::default();
    y.edge("edge", free_udp(LOCAL), LOCAL, None)
        .site("site", free_udp(LOCAL), &[("chat", backend.addr, 100)])
        .link("edge", "site", "1ms")
        .service("chat", port, &[]);
    let mut f = Fabric::new(&y);
    f.start_with("site", &["--backend-connect-timeout", "60s"]);
    f.start_with("edge", &["--reply-timeout", "3s"]);
    f.wait_preferred("edge", "chat", "site");

    let started = Instant::now();
    let mut c = std::net::TcpStream::connect((LOCAL, port)).unwrap();
    c.set_read_timeout(Some(WITHIN)).unwrap();
    std::io::Write::write_all(&mut c, b"hello\n").unwrap();
    let mut buf = [0u8; 64];
    let end = std::io::Read::read(&mut c, &mut buf);
    let took = started.elapsed();
    println!("client connection ended after {took:?}: {end:?}");
    match end {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(0) => panic!("the client connection ended with a FIN, not a reset"),
        Ok(n) => panic!("the client got {n} bytes from a site that never connected"),
        Err(e) => panic!("the client connection was still open after {took:?}: {e}"),
    }
    assert!(
        took < WITHIN_SHORT,
        "the client connection ended after {took:?}, not within {WITHIN_SHORT:?} (--reply-timeout \
         3s; the default is 10 s)\nedge log:\n{}",
        f.log("edge")
    );
    // Counted before the client's reset went out. The site was still connecting to its backend:
    // the edge gave up, not the site.
    let errors = |node: &str, code: &str| {
        f.metric(
            node,
            "tasman_stream_errors_total",
            &format!("code=\"{code}\""),
        )
    };
    assert_eq!(
        (
            errors("edge", "upstream_lost"),
            errors("edge", "backend_refused"),
            errors("site", "backend_refused")
        ),
        (1, 0, 0),
        "edge upstream_lost, edge and site backend_refused; site log:\n{}",
        f.log("site")
    );
    for (node, warning) in [
        (
            "edge",
            "--header-timeout 5s is not below --reply-timeout 3s",
        ),
        (
            "site",
            "--backend-connect-timeout 1m is not below --reply-timeout 10s",
        ),
    ] {
        let log = f.log(node);
        assert!(
            log.contains(warning),
            "{node} did not warn {warning:?}:\n{log}"
        );
    }
    drop(backend);
    drop(rt);
}

/// A client that sends its request a byte at a time makes a kept chunk of each read of its
/// socket, and each counts 128 bytes beyond its byte against the replay limit: 200 one-byte
/// pieces (200 bytes, ~26 KB in memory) pass a 16 KiB limit, so when the near site does not
/// answer by the reply deadline the connection is not retried (counted as bytes alone they
/// were kept, and replayed to the far site: ~100x the limit held per connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_a_byte_at_a_time_counts_its_pieces_against_the_replay_limit() {
    const PIECES: u64 = 200;
    let f = near_full_far_echo(|c| {
        // Ample for the pieces to go out one by one, well below `WITHIN`.
        c.reply_timeout = Duration::from_secs(8);
        c.replay_limit = 16 * 1024;
    })
    .await;
    let (edge, port) = (&f.edge, f.port);

    let c = TcpStream::connect((LOCAL, port)).await.unwrap();
    c.set_nodelay(true).unwrap();
    let (r, mut w) = c.into_split();
    // One byte, then the next once the edge has forwarded it: one read, one chunk, each.
    let deadline = Instant::now() + DEADLINE;
    for i in 1..=PIECES {
        if w.write_all(b"x").await.is_err() {
            break;
        }
        while metric(edge, "tasman_bytes_up_total", "") < i {
            assert!(Instant::now() < deadline, "byte {i} not forwarded");
            // The connection ended (its reply deadline passed on a starved machine): the
            // assertions below say how.
            if metric(edge, "tasman_edge_clients_open", "") == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let mut r = tokio::io::BufReader::new(r);
    let mut greeting = String::new();
    let got = tokio::time::timeout(WITHIN, r.read_line(&mut greeting)).await;
    assert!(
        matches!(got, Ok(Ok(0)) | Ok(Err(_))),
        "the connection was retried (greeted {greeting:?}): {got:?}"
    );
    assert_eq!(metric(edge, "tasman_failovers_total", ""), 0);
}
