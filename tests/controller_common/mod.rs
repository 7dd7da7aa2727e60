//! Helpers for the controller's end-to-end tests: generated fabrics, a PKI, an in-process
//! controller and lightweight routers (the real control client over real QUIC), telemetry
//! reports, and control sessions made by hand.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use fabric::controller::daemon::{self, Daemon, DaemonConfig};
use fabric::controller::records::Origin;
use fabric::controller::{ApplyOutcome, RouterLive};
use router::control::{ClientConfig, ControlClient};
use router::telemetry::{NeighbourReport, TelemetryReport};
use router::tls::TlsIdentity;
use topology::NodeId;

/// Polls `cond` every 10 ms until it holds or `limit` passes.
pub async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Checks `cond` every 10 ms for `window`, failing with `what` the first time it does not hold.
pub async fn stays(window: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < window {
        assert!(cond(), "after {:?}: {what}", start.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The ports of the fabrics [`fabric_yaml`] makes on loopback network 127.<net>: free when
/// first asked for (a fixed port that some process of the host holds on the wildcard address
/// would keep a test's routers from binding theirs), then the same for the rest of the test
/// binary, so that every version of a net's fabric has the same addresses.
#[derive(Debug, Clone, Copy)]
pub struct FabricPorts {
    /// Every node's QUIC port.
    pub quic: u16,
    /// The service's port (the edges' client listeners).
    pub service: u16,
    /// The sites' backends' port.
    pub backend: u16,
}

/// [`FabricPorts`] of network 127.<net>.
pub fn fabric_ports(net: u8) -> FabricPorts {
    static PORTS: std::sync::Mutex<std::collections::BTreeMap<u8, FabricPorts>> =
        std::sync::Mutex::new(std::collections::BTreeMap::new());
    let mut ports = PORTS.lock().unwrap_or_else(|p| p.into_inner());
    *ports.entry(net).or_insert_with(|| {
        let ip = |c, d| std::net::IpAddr::from([127, net, c, d]);
        FabricPorts {
            quic: testkit::free_udp(ip(0, 1)).port(),
            service: testkit::free_tcp_port(ip(251, 1)),
            backend: testkit::free_tcp_port(ip(250, 1)),
        }
    })
}

/// A fabric of `edges` edge routers, `transits` transit PoPs in a ring and two sites, in the
/// topology YAML format. Addresses are 127.<net>.x.y, with the ports of [`fabric_ports`]
/// (nothing listens unless a test starts real routers). `latency_ms` is the declared one-way
/// latency of the transit ring links.
pub fn fabric_yaml(net: u8, edges: usize, transits: usize, ring_latency_ms: u32) -> String {
    let ports = fabric_ports(net);
    let mut y = String::from("# generated test fabric\nversion: 1\nnodes:\n");
    let addr = |i: usize| format!("127.{net}.{}.{}:{}", i / 250, i % 250 + 1, ports.quic);
    let mut i = 0;
    let mut node = |y: &mut String, id: &str, kind: &str, extra: &str| {
        let _ = writeln!(
            y,
            "  - id: {id}\n    kind: {kind}\n    region: au-east\n    country: AU\n    location: {{lat: -33.8, lon: 151.2}}\n    address: {}{extra}",
            addr(i)
        );
        i += 1;
    };
    for t in 0..transits {
        node(&mut y, &format!("transit-{t}"), "transit", "");
    }
    for s in 0..2 {
        node(
            &mut y,
            &format!("site-{s}"),
            "site",
            &format!(
                "\n    serves:\n      - {{service: llm-chat, backend: 127.{net}.250.{}:{}, capacity: 100}}",
                s + 1,
                ports.backend
            ),
        );
    }
    for e in 0..edges {
        node(
            &mut y,
            &format!("edge-{e}"),
            "edge",
            &format!(
                "\n    client_address: 127.{net}.{}.{}",
                251 + e / 250,
                e % 250 + 1
            ),
        );
    }
    y.push_str("links:\n");
    for t in 0..transits {
        if transits > 1 && (transits > 2 || t == 0) {
            let _ = writeln!(
                y,
                "  - {{a: transit-{t}, b: transit-{}, latency: {ring_latency_ms}ms, capacity: 10Gbps}}",
                (t + 1) % transits
            );
        }
    }
    let _ = writeln!(
        y,
        "  - {{a: site-0, b: transit-0, latency: 1ms, capacity: 10Gbps}}"
    );
    let _ = writeln!(
        y,
        "  - {{a: site-1, b: transit-{}, latency: 1ms, capacity: 10Gbps}}",
        transits / 2
    );
    for e in 0..edges {
        let _ = writeln!(
            y,
            "  - {{a: edge-{e}, b: transit-{}, latency: 2ms, capacity: 10Gbps}}",
            e % transits
        );
    }
    let _ = write!(
        y,
        "services:\n  - name: llm-chat\n    port: {}\n",
        ports.service
    );
    y
}

/// Node ids of a fabric made by [`fabric_yaml`].
pub fn fabric_nodes(edges: usize, transits: usize) -> Vec<String> {
    let mut v: Vec<String> = (0..transits).map(|t| format!("transit-{t}")).collect();
    v.extend((0..2).map(|s| format!("site-{s}")));
    v.extend((0..edges).map(|e| format!("edge-{e}")));
    v
}

/// A PKI directory with the CA, the controller's and every node's certificate.
pub fn pki(dir: &Path, nodes: &[String]) {
    daemon::ensure_pki(dir).expect("pki");
    for n in nodes {
        router::pki::issue(dir, n).expect("issue");
    }
}

/// The controller's config: state in `state`, PKI in `tls`, control listener on `listen`, admin
/// API on a free port, no metrics listener, no topology file.
pub fn daemon_config(state: &Path, tls: &Path, listen: SocketAddr) -> DaemonConfig {
    DaemonConfig {
        topology_file: None,
        state_dir: state.to_path_buf(),
        listen,
        admin: "127.0.0.1:0".parse().unwrap(),
        metrics: None,
        tls_dir: Some(tls.to_path_buf()),
        admin_token_file: None,
        cert_reload_interval: daemon::CERT_RELOAD_INTERVAL,
        ca_dir: None,
        issue_valid_for: fabric::controller::renew::DEFAULT_VALIDITY,
        write_stall_timeout: fabric::controller::distribute::WRITE_STALL_TIMEOUT,
        circuit_retention: Some(fabric::circuits::DEFAULT_RETENTION),
    }
}

/// An in-process controller with its state in `state` and PKI in `tls`, importing `yaml`.
pub async fn start_controller(state: &Path, tls: &Path, yaml: &str) -> Daemon {
    daemon::start(import_config(state, tls, yaml))
        .await
        .expect("controller starts")
}

/// [`daemon_config`] (control listener on a free port) that imports `yaml`, written beside
/// `state`, on first start. The port is below the ephemeral range ([`testkit::free_udp`]): a
/// controller restarted on it ([`restart_controller`]) binds it again, which a kernel-chosen
/// one, handed meanwhile to another endpoint of the process, could refuse (`AddrInUse`).
pub fn import_config(state: &Path, tls: &Path, yaml: &str) -> DaemonConfig {
    let file = state.with_extension("import.yaml");
    std::fs::write(&file, yaml).expect("write topology");
    DaemonConfig {
        topology_file: Some(file),
        ..daemon_config(state, tls, testkit::free_udp([127, 0, 0, 1].into()))
    }
}

/// A PKI in `dir/pki` for `nodes`, and a controller on `yaml` with its state in `dir/state`;
/// returns the controller and the PKI directory.
pub async fn controller_with_pki(dir: &Path, nodes: &[String], yaml: &str) -> (Daemon, PathBuf) {
    let tls = dir.join("pki");
    pki(&tls, nodes);
    let d = start_controller(&dir.join("state"), &tls, yaml).await;
    (d, tls)
}

/// The controller started again from its state in `state`, its control listener on `listen`
/// (the address routers know).
pub async fn restart_controller(state: &Path, tls: &Path, listen: SocketAddr) -> Daemon {
    daemon::start(daemon_config(state, tls, listen))
        .await
        .expect("controller restarts from its state")
}

/// Applies `yaml` through the controller's own API as author "test" with `message` (no dry run,
/// no base version).
pub async fn apply(d: &Daemon, yaml: &str, message: &str) -> ApplyOutcome {
    d.ctl
        .apply(yaml, "test", message, Origin::Apply, false, None)
        .await
        .expect("apply")
}

/// What the controller knows about router `node` now, if it knows it.
pub fn router_status(d: &Daemon, node: &str) -> Option<RouterLive> {
    d.ctl.routers().into_iter().find(|r| r.record.node == node)
}

/// The output of `tasman status` (the real binary) against `d`. The controller runs in this
/// process, so the command runs off the runtime's workers.
pub async fn status_text(d: &Daemon) -> String {
    let env = Env::of(d);
    let out = tokio::task::spawn_blocking(move || tasman(&env, &["status"], &[], ""))
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `node`'s line in `tasman status` output `text` (empty when there is none).
pub fn status_line<'a>(text: &'a str, node: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(node) && l[node.len()..].starts_with(' '))
        .unwrap_or_default()
}

/// How many routers the controller saw acknowledge snapshot `version` or a later one.
pub fn routers_acknowledged(d: &Daemon, version: u64) -> usize {
    d.ctl
        .routers()
        .iter()
        .filter(|r| r.record.applied_version >= version)
        .count()
}

/// A control client of `node` (certificate in `tls`) with its snapshot stored in `state`.
pub async fn start_client(
    ctl: SocketAddr,
    node: &str,
    tls: &Path,
    state: Option<PathBuf>,
) -> ControlClient {
    start_client_with(ctl, node, tls, |cfg| cfg.state_dir = state).await
}

/// A control client of `node` (certificate in `tls`), its default config adjusted by `tune`.
pub async fn start_client_with(
    ctl: SocketAddr,
    node: &str,
    tls: &Path,
    tune: impl FnOnce(&mut ClientConfig),
) -> ControlClient {
    try_start_client_with(ctl, node, tls, tune)
        .await
        .expect("client starts")
}

/// [`start_client_with`], for a start that may be refused.
pub async fn try_start_client_with(
    ctl: SocketAddr,
    node: &str,
    tls: &Path,
    tune: impl FnOnce(&mut ClientConfig),
) -> Result<ControlClient, router::control::ControlError> {
    let id = TlsIdentity::load(tls, node).expect("identity");
    let mut cfg = ClientConfig::new(ctl, NodeId::new(node), id);
    tune(&mut cfg);
    ControlClient::start(cfg).await
}

/// A control connection made by hand with `node`'s certificate (no control client), for tests
/// that speak the protocol wrongly, too fast or not at all. Keep the endpoint while the
/// connection is in use.
pub async fn raw_control(
    ctl: std::net::SocketAddr,
    tls: &Path,
    node: &str,
) -> (quinn::Endpoint, quinn::Connection) {
    raw_control_with(ctl, tls, node, |_| {}).await
}

/// [`raw_control`] with its QUIC transport (1 s keep-alive, 30 s idle timeout) adjusted by `tune`.
pub async fn raw_control_with(
    ctl: std::net::SocketAddr,
    tls: &Path,
    node: &str,
    tune: impl FnOnce(&mut quinn::TransportConfig),
) -> (quinn::Endpoint, quinn::Connection) {
    use fabric::controller::distribute::CONTROLLER_NAME;
    let id = TlsIdentity::load(tls, node).expect("identity");
    let peers = router::tls::PeerNames::new([CONTROLLER_NAME.to_string()]);
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    transport.max_idle_timeout(Some(Duration::from_secs(30).try_into().unwrap()));
    tune(&mut transport);
    let cfg = router::tls::client_config(&id, &peers, std::sync::Arc::new(transport))
        .expect("client config");
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("endpoint");
    ep.set_default_client_config(cfg);
    let conn = ep
        .connect(ctl, CONTROLLER_NAME)
        .expect("connect")
        .await
        .expect("handshake");
    (ep, conn)
}

/// A control session made by hand ([`raw_control`]) whose control stream is open and has sent
/// a hello. Keep `ep` while the connection is in use.
pub struct RawSession {
    pub ep: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

impl RawSession {
    /// Sends `msg` on the control stream.
    pub async fn say(&mut self, msg: &router::control::proto::FromRouter) {
        let frame = router::control::proto::encode(msg).expect("encode");
        self.send.write_all(&frame).await.expect("send");
    }
}

/// A connection with `cert`'s certificate that opens its control stream and says hello as `node`.
pub async fn raw_hello(ctl: SocketAddr, tls: &Path, cert: &str, node: &str) -> RawSession {
    raw_hello_with(ctl, tls, cert, node, |_| {}).await
}

/// [`raw_hello`] over a transport adjusted by `tune` (see [`raw_control_with`]).
pub async fn raw_hello_with(
    ctl: SocketAddr,
    tls: &Path,
    cert: &str,
    node: &str,
    tune: impl FnOnce(&mut quinn::TransportConfig),
) -> RawSession {
    let (ep, conn) = raw_control_with(ctl, tls, cert, tune).await;
    let (mut send, recv) = conn.open_bi().await.expect("control stream");
    send.write_all(&hello_frame(node))
        .await
        .expect("send the hello");
    RawSession {
        ep,
        conn,
        send,
        recv,
    }
}

/// Reads what the controller sends on a control stream made by hand (so it never waits on the
/// test) until the stream ends; the value is the topology version of the last snapshot or delta
/// (0 before the first).
pub fn topology_versions(
    mut recv: quinn::RecvStream,
) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
    use router::control::proto::{self, ToRouter};
    use std::sync::atomic::{AtomicU64, Ordering};
    let version = std::sync::Arc::new(AtomicU64::new(0));
    let v = version.clone();
    tokio::spawn(async move {
        let mut frames = proto::FrameReader::new(proto::MAX_TO_ROUTER);
        while let Ok(Some(payload)) = frames.next(&mut recv).await {
            match proto::decode::<ToRouter>(&payload) {
                Ok(ToRouter::Snapshot {
                    topology_version, ..
                })
                | Ok(ToRouter::Delta {
                    topology_version, ..
                }) => v.store(topology_version, Ordering::Relaxed),
                _ => {}
            }
        }
    });
    version
}

/// An encoded hello from `node`, holding no snapshot.
pub fn hello_frame(node: &str) -> bytes::Bytes {
    use router::control::proto::{FromRouter, encode};
    encode(&FromRouter::Hello {
        node: node.into(),
        have_version: None,
        crl: false,
    })
    .expect("encode")
}

/// A neighbour in a telemetry report: up at `rtt_us`, 1452-byte path MTU, no loss, no failed
/// dials.
pub fn neighbour(id: &str, rtt_us: u64) -> NeighbourReport {
    NeighbourReport {
        id: NodeId::new(id),
        rtt_us,
        up: true,
        srtt_us: rtt_us,
        path_mtu: 1452,
        lost_packets: 0,
        dial_failures: 0,
    }
}

/// A telemetry report of `node` with `neighbours`, no sites and no preferred sites.
pub fn telemetry_report(node: &str, neighbours: Vec<NeighbourReport>) -> TelemetryReport {
    TelemetryReport {
        node: NodeId::new(node),
        snapshot_version: 0,
        neighbours,
        sites: Vec::new(),
        preferred: Default::default(),
        draining: false,
        hysteresis: None,
    }
}

/// One encoded telemetry report of `node` with one neighbour at `rtt_us`.
pub fn telemetry_frame(node: &str, neighbour_id: &str, rtt_us: u64) -> bytes::Bytes {
    use router::control::proto::{FromRouter, encode};
    let report = telemetry_report(node, vec![neighbour(neighbour_id, rtt_us)]);
    encode(&FromRouter::Telemetry(report)).expect("encode")
}

/// A real router (data plane) fed by the real control client, as `tasman router --controller`.
pub struct LiveRouter {
    pub client: ControlClient,
    pub handle: router::RouterHandle,
}

impl LiveRouter {
    /// Starts `node`'s control client and data plane; `dial` overrides neighbour addresses.
    pub async fn start(
        ctl: std::net::SocketAddr,
        node: &str,
        tls: &Path,
        state: Option<PathBuf>,
        dial: &[(&str, std::net::SocketAddr)],
    ) -> LiveRouter {
        Self::try_start(ctl, node, tls, state, dial)
            .await
            .expect("router starts")
    }

    /// [`LiveRouter::start`], returning the data plane's error instead of panicking.
    pub async fn try_start(
        ctl: std::net::SocketAddr,
        node: &str,
        tls: &Path,
        state: Option<PathBuf>,
        dial: &[(&str, std::net::SocketAddr)],
    ) -> Result<LiveRouter, router::RouterError> {
        let client = start_client(ctl, node, tls, state).await;
        let id = TlsIdentity::load(tls, node).expect("identity");
        let mut cfg = router::RouterConfig::new(NodeId::new(node), id, client.snapshots());
        cfg.dial_overrides = dial.iter().map(|(n, a)| (NodeId::new(n), *a)).collect();
        let handle = router::Router::spawn(cfg).await?;
        client.attach(&handle);
        Ok(LiveRouter { client, handle })
    }

    /// Stops the control client, then shuts the data plane down.
    pub async fn stop(self) {
        drop(self.client);
        self.handle.shutdown().await;
    }

    /// The path the router prefers for `service` now.
    pub fn path(&self, service: &str) -> Vec<String> {
        self.handle
            .routes()
            .preferred(service)
            .map(|c| c.path.iter().map(|n| n.to_string()).collect())
            .unwrap_or_default()
    }
}

/// A TCP echo backend.
pub async fn echo_backend(addr: std::net::SocketAddr) -> tokio::task::JoinHandle<()> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .expect("bind backend");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    })
}

/// One client connection through `edge_client`: sends a line, expects it back.
pub async fn echo_through(edge_client: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(edge_client).await.ok()?;
        s.write_all(b"hello tasman\n").await.ok()?;
        let mut buf = [0u8; 13];
        s.read_exact(&mut buf).await.ok()?;
        (&buf == b"hello tasman\n").then_some(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), attempt).await,
        Ok(Some(()))
    )
}

/// Where the real `tasman` CLI finds the controller: its admin address and token.
#[derive(Clone)]
pub struct Env {
    pub admin: String,
    pub token: String,
}

impl Env {
    /// The admin address and token of controller `d`.
    pub fn of(d: &Daemon) -> Env {
        Env {
            admin: d.admin_addr.to_string(),
            token: d.token.clone(),
        }
    }
}

/// Runs the real `tasman` binary against `env`'s controller, `stdin` fed to it.
pub fn tasman(env: &Env, args: &[&str], extra_env: &[(&str, &str)], stdin: &str) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tasman"));
    cmd.args(args)
        .env("TASMAN_CONTROLLER", &env.admin)
        .env("TASMAN_TOKEN", &env.token)
        .env("TASMAN_AUTHOR", "tester")
        .env_remove("TASMAN_REQUEST_TIMEOUT")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run tasman");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}
