//! The local demo fabric: a real controller (in-process, its state in a temporary directory),
//! every node of a topology as an in-process router that takes its snapshots from that
//! controller (the control client over mutual-TLS QUIC, as `tasman router --controller`), every
//! inter-node link through a [`LinkEmulator`] with the link's declared one-way latency, and a
//! [`DemoBackend`] per site and service. Topology edits go through the controller's admin API,
//! as `tasman topology apply` sends them. `tasman demo` drives it.
//!
//! ```no_run
//! # async fn f() -> Result<(), fabric::demo::DemoError> {
//! use fabric::demo::{APAC_YAML, DemoFabric, DemoOptions};
//! let mut fabric = DemoFabric::start(APAC_YAML, DemoOptions::default()).await?;
//! let node = topology::NodeId::new("syd-site-1");
//! fabric.stop_node(&node).await?;  // its links go silent, then the router stops
//! fabric.start_node(&node).await?; // and back
//! fabric.shutdown().await;
//! # Ok(()) }
//! ```

pub mod client;
pub mod edit;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use router::backend::{BackendConfig, BackendHandle, DemoBackend};
use router::control::{ClientConfig, ControlClient};
use router::netem::{LinkEmulator, LinkHandle, LinkProfile};
use router::{ProbeConfig, Router, RouterConfig, RouterHandle};
use topology::{Latency, NodeId, NodeKind, ServiceName, Topology};

use crate::admin::status::Status;
use crate::admin::topology::ApplyRequest;
use crate::cli::admin_client::{AdminArgs, AdminClient, ClientError, Output};
use crate::controller::ApplyOutcome;
use crate::controller::daemon::{self, Daemon, DaemonConfig, DaemonError};

/// The example topology shipped with Tasman, built into the binary.
pub const APAC_YAML: &str = include_str!("../../../examples/apac.yaml");

/// How to build the demo fabric.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Replace every port of the topology (QUIC, service listeners, backends) with a free one, so
    /// that the demo can run next to another one (tests do this). Addresses keep their IPs.
    pub ephemeral_ports: bool,
    /// Probe timing of every router.
    pub probe: ProbeConfig,
    /// Delay between streamed tokens of the demo backends.
    pub token_delay: Duration,
    /// Extra jitter on every emulated link (none by default: the demo's figures stay readable).
    pub jitter: Latency,
    /// The controller's QUIC (routers) and admin API addresses; with `ephemeral_ports`, or
    /// port 0, free ports are used.
    pub controller_listen: SocketAddr,
    pub controller_admin: SocketAddr,
    /// Where to keep the PKI (the demo CA's and every node's private key) and the controller's
    /// state. `None`: a new temporary directory, removed when the fabric is dropped. A directory
    /// given here is the caller's to remove: `tasman demo` removes its own once its runtime, and
    /// with it every task that could still write there, is gone.
    pub dir: Option<PathBuf>,
}

/// The admin API's usual address (`tasman status` and friends try it by default).
pub const DEFAULT_ADMIN: &str = "127.0.0.1:7401";
/// The controller's usual QUIC address.
pub const DEFAULT_CONTROLLER: &str = "127.0.0.1:7400";

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            ephemeral_ports: false,
            probe: ProbeConfig::default(),
            token_delay: Duration::from_millis(2),
            jitter: Latency::ZERO,
            controller_listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            controller_admin: SocketAddr::from(([127, 0, 0, 1], 7401)),
            dir: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("temporary PKI: {0}")]
    Pki(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("backend for {site}/{service}: {source}")]
    Backend {
        site: NodeId,
        service: ServiceName,
        source: router::backend::BackendError,
    },
    #[error("router {node}: {source}")]
    Router {
        node: NodeId,
        source: router::RouterError,
    },
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    #[error("the fabric did not converge within {0:?}: {1}")]
    NotConverged(Duration, String),
    #[error("invalid topology: {0}")]
    Invalid(String),
    #[error("controller: {0}")]
    Controller(#[from] DaemonError),
    #[error("router {node}'s control client: {source}")]
    Control {
        node: NodeId,
        source: router::control::ControlError,
    },
    #[error("admin API: {0}")]
    Admin(#[from] ClientError),
}

/// One router of the fabric and the control client that feeds it.
struct DemoRouter {
    handle: RouterHandle,
    client: ControlClient,
}

impl DemoRouter {
    async fn shutdown(self) {
        drop(self.client);
        self.handle.shutdown().await;
    }
}

/// A running demo fabric.
pub struct DemoFabric {
    /// The topology in force at the controller (as of the last apply through this handle).
    topology: Arc<Topology>,
    /// `pki/` (CA, every node's and the controller's certificate) and `controller/` (its state).
    dir: PathBuf,
    /// The temporary directory `dir` is, unless the options named one.
    _temp: Option<tempfile::TempDir>,
    controller: Daemon,
    admin: AdminClient,
    options: DemoOptions,
    routers: BTreeMap<NodeId, DemoRouter>,
    /// `(from, to)`: the emulator `from` dials to reach `to` (each link has one per direction of
    /// dialling; each carries both directions of its traffic).
    links: BTreeMap<(NodeId, NodeId), LinkHandle>,
    backends: BTreeMap<(NodeId, ServiceName), BackendHandle>,
    /// When every router had all its neighbours up at the start: each edge's sites were offered
    /// by then ([`DemoFabric::wait_preferences_settled`]).
    converged: Instant,
    /// Nodes whose links [`DemoFabric::isolate_node`] cut (stopped ones included): a restart of
    /// a neighbour leaves its link to them cut.
    isolated: std::sync::Mutex<std::collections::BTreeSet<NodeId>>,
}

impl DemoFabric {
    /// Starts the controller on `text` (imported as version 1, comments and all), then every
    /// router from the controller's snapshot, and waits until every router has all its
    /// neighbours up.
    pub async fn start(text: &str, options: DemoOptions) -> Result<DemoFabric, DemoError> {
        let mut topology = topology::load(text)
            .map_err(|d| {
                DemoError::Invalid(
                    d.iter()
                        .find(|d| d.is_error())
                        .map(|d| d.display("topology"))
                        .unwrap_or_default(),
                )
            })?
            .topology;
        // The controller imports the operator's text as it is, unless the ports were rewritten.
        let import = if options.ephemeral_ports {
            use_free_ports(&mut topology)?;
            topology::to_yaml(&topology)
        } else {
            text.to_string()
        };
        let (dir, temp) = match &options.dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::tempdir().map_err(|source| DemoError::Io {
                    what: "temporary directory".into(),
                    source,
                })?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let pki = dir.join("pki");
        router::pki::init(&pki).map_err(|e| DemoError::Pki(e.to_string()))?;
        daemon::ensure_pki(&pki)?;
        for n in &topology.nodes {
            router::pki::issue(&pki, n.id.as_str()).map_err(|e| DemoError::Pki(e.to_string()))?;
        }
        let state = dir.join("controller");
        let file = dir.join("topology.yaml");
        std::fs::write(&file, &import).map_err(|source| DemoError::Io {
            what: file.display().to_string(),
            source,
        })?;
        let any = |a: SocketAddr| SocketAddr::new(a.ip(), 0);
        let (listen, admin) = if options.ephemeral_ports {
            (
                any(options.controller_listen),
                any(options.controller_admin),
            )
        } else {
            (options.controller_listen, options.controller_admin)
        };
        let controller = daemon::start(DaemonConfig {
            topology_file: Some(file),
            state_dir: state,
            listen,
            admin,
            metrics: None,
            tls_dir: Some(pki.clone()),
            admin_token_file: None,
            cert_reload_interval: daemon::CERT_RELOAD_INTERVAL,
            ca_dir: None,
            issue_valid_for: crate::controller::renew::DEFAULT_VALIDITY,
            write_stall_timeout: crate::controller::distribute::WRITE_STALL_TIMEOUT,
            circuit_retention: Some(crate::circuits::DEFAULT_RETENTION),
        })
        .await?;
        let admin = AdminClient::new(&AdminArgs {
            controller: controller.admin_addr.to_string(),
            token: Some(controller.token.clone()),
            token_file: None,
            output: Output::Text,
            request_timeout: crate::cli::admin_client::DEFAULT_REQUEST_TIMEOUT,
        })?;
        let topology = controller.ctl.current().topology.clone();

        let mut backends = BTreeMap::new();
        for n in topology.nodes.iter().filter(|n| n.kind == NodeKind::Site) {
            for s in &n.serves {
                let mut cfg = BackendConfig::new(n.id.as_str(), s.service.as_str());
                cfg.token_delay = options.token_delay;
                let b = DemoBackend::spawn(s.backend, cfg).await.map_err(|source| {
                    DemoError::Backend {
                        site: n.id.clone(),
                        service: s.service.clone(),
                        source,
                    }
                })?;
                backends.insert((n.id.clone(), s.service.clone()), b);
            }
        }

        let index = topology.node_index();
        let mut links = BTreeMap::new();
        for l in &topology.links {
            let profile = LinkProfile {
                jitter: options.jitter,
                ..LinkProfile::delay(l.latency)
            };
            for (from, to) in [(&l.a, &l.b), (&l.b, &l.a)] {
                let (Some(f), Some(t)) = (index.get(from), index.get(to)) else {
                    continue;
                };
                // The emulator listens on the dialler's IP, so that each link's traffic is visible
                // per node on loopback.
                let listen = SocketAddr::new(f.address.ip(), 0);
                let h = LinkEmulator::spawn(listen, t.address, profile)
                    .await
                    .map_err(|source| DemoError::Io {
                        what: format!("link emulator {from} -> {to}"),
                        source,
                    })?;
                links.insert((from.clone(), to.clone()), h);
            }
        }

        let mut fabric = DemoFabric {
            topology: topology.clone(),
            dir,
            _temp: temp,
            controller,
            admin,
            options,
            routers: BTreeMap::new(),
            links,
            backends,
            converged: Instant::now(),
            isolated: Default::default(),
        };
        // The core (transits and sites) first, until its RTT measurements, and the controller's
        // weights smoothed from them, have settled; then the edges. Every router's first RTT
        // samples come from handshakes made while the whole fabric starts at once, inflated by
        // CPU contention; an edge that chose its preferred site on those numbers would keep it
        // (hysteresis: a better site must win by >= 10 ms).
        for n in topology.nodes.iter().filter(|n| n.kind != NodeKind::Edge) {
            fabric.spawn_router(&n.id).await?;
        }
        fabric.wait_converged(Duration::from_secs(30)).await?;
        fabric.wait_settled(Duration::from_secs(10)).await;
        for n in topology.nodes.iter().filter(|n| n.kind == NodeKind::Edge) {
            fabric.spawn_router(&n.id).await?;
        }
        fabric.wait_converged(Duration::from_secs(30)).await?;
        // An edge that cannot bind a client listener (its port held by another program) logs
        // it and tries again every second: the demo's requests would then fail, or reach the
        // other program. Refused here, naming the edges (and so with the hint for such ports).
        let unbound: Vec<String> = fabric
            .routers
            .iter()
            .filter(|(_, r)| r.handle.listeners_unbound() > 0)
            .map(|(id, _)| id.to_string())
            .collect();
        if !unbound.is_empty() {
            return Err(DemoError::Io {
                what: format!("client listeners of {}", unbound.join(", ")),
                source: std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "a service port is in use by another program",
                ),
            });
        }
        fabric.converged = Instant::now();
        Ok(fabric)
    }

    async fn spawn_router(&mut self, node: &NodeId) -> Result<(), DemoError> {
        let pki = self.dir.join("pki");
        let identity = || {
            router::tls::TlsIdentity::load(&pki, node.as_str())
                .map_err(|e| DemoError::Pki(e.to_string()))
        };
        // The router's topology comes from the controller: the client returns once it holds
        // the first snapshot.
        let ccfg = ClientConfig::new(self.controller.quic_addr, node.clone(), identity()?);
        let within = Duration::from_secs(30);
        let client = tokio::time::timeout(within, ControlClient::start(ccfg))
            .await
            .map_err(|_| {
                DemoError::NotConverged(within, format!("{node}: no snapshot from the controller"))
            })?
            .map_err(|source| DemoError::Control {
                node: node.clone(),
                source,
            })?;
        let mut cfg = RouterConfig::new(node.clone(), identity()?, client.snapshots());
        cfg.probe = self.options.probe;
        // The demo stops nodes as a crash would look (links cut first) and exits on Ctrl-C: a
        // short drain keeps both prompt.
        cfg.drain_timeout = std::time::Duration::from_secs(2);
        cfg.dial_overrides = self.dial_overrides(node);
        let handle = Router::spawn(cfg)
            .await
            .map_err(|source| DemoError::Router {
                node: node.clone(),
                source,
            })?;
        client.attach(&handle);
        self.routers
            .insert(node.clone(), DemoRouter { handle, client });
        Ok(())
    }

    fn dial_overrides(&self, node: &NodeId) -> HashMap<NodeId, SocketAddr> {
        self.links
            .iter()
            .filter(|((from, _), _)| from == node)
            .map(|((_, to), h)| (to.clone(), h.local_addr()))
            .collect()
    }

    /// Waits until every running router sees all its running neighbours up, and the edges'
    /// preferred sites have then held still for `SETTLE` (300 ms): a router's "up" reaches the others in
    /// its next probe reply, so the first instant everything is up an edge may still be routing
    /// around a link that an end reported down while it was dialling.
    pub async fn wait_converged(&self, within: Duration) -> Result<(), DemoError> {
        const SETTLE: Duration = Duration::from_millis(300);
        let deadline = Instant::now() + within;
        let mut stable: Option<(Instant, Vec<BTreeMap<String, String>>)> = None;
        loop {
            let missing = self.not_converged();
            if missing.is_empty() {
                let choice = self.preferred_by_edge();
                match &stable {
                    Some((since, c)) if *c == choice => {
                        if since.elapsed() >= SETTLE {
                            return Ok(());
                        }
                    }
                    _ => stable = Some((Instant::now(), choice)),
                }
            } else {
                stable = None;
            }
            if Instant::now() > deadline {
                return Err(DemoError::NotConverged(within, missing.join(", ")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every running router's preferred site per service (empty for non-edges), in a fixed order.
    fn preferred_by_edge(&self) -> Vec<BTreeMap<String, String>> {
        let mut ids: Vec<_> = self.routers.keys().collect();
        ids.sort();
        ids.iter()
            .map(|id| router::routes::preferred_sites(&self.routers[*id].handle.routes()))
            .collect()
    }

    /// Waits until the edges' sites have been offered for [`router::routes::SETTLING`] (and a
    /// second more) since the fabric converged at its start: before that, a preference still
    /// moves to a newly offered cheapest site past the anti-flap margins, which the
    /// controller's plan (steady state) does not predict.
    pub async fn wait_preferences_settled(&self) {
        let until = self.converged + router::routes::SETTLING + Duration::from_secs(1);
        tokio::time::sleep_until(until.into()).await;
    }

    /// Waits until every edge's routing table sees each link's latency close to the declared
    /// one (measured RTTs start inflated by the handshakes and settle over a few probe rounds).
    /// Returns the links still off when `within` ran out (the fabric works either way; it just
    /// prefers paths by inflated numbers until then).
    pub async fn wait_settled(&self, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            let off = self.unsettled();
            if off.is_empty() || Instant::now() > deadline {
                return off;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn unsettled(&self) -> Vec<String> {
        let mut off = std::collections::BTreeSet::new();
        // The controller's published weights (smoothed from routers' reports) go into every
        // snapshot: a router starting now would see them before its own measurements.
        for (link, w) in &self.controller.ctl.published().live.link_latency {
            let declared = self
                .topology
                .link(link)
                .map(|l| l.latency)
                .unwrap_or(Latency::ZERO);
            if w.as_duration() > declared.as_duration() * 5 / 4 + Duration::from_micros(1500) {
                off.insert(format!(
                    "{link} at {:.1} ms in the controller's weights (declared {declared})",
                    w.as_millis_f64()
                ));
            }
        }
        for (id, r) in &self.routers {
            let r = &r.handle;
            for n in r.telemetry().neighbours.iter().filter(|n| n.up) {
                let declared = self
                    .topology
                    .link(&topology::LinkId::new(id, &n.id))
                    .map(|l| l.latency.as_duration())
                    .unwrap_or_default();
                let rtt = Duration::from_micros(n.rtt_us);
                if rtt > declared * 5 / 2 + Duration::from_millis(3) {
                    off.insert(format!(
                        "{id}->{} RTT {:.1} ms (declared one-way {})",
                        n.id,
                        rtt.as_secs_f64() * 1000.0,
                        Latency::from_duration(declared)
                    ));
                }
            }
            if self
                .topology
                .node(id.as_str())
                .is_none_or(|n| n.kind != NodeKind::Edge)
            {
                continue;
            }
            let routes = r.routes();
            for (link, measured) in &routes.live.link_latency {
                let declared = self
                    .topology
                    .link(link)
                    .map(|l| l.latency)
                    .unwrap_or(Latency::ZERO);
                // A quarter over the declared value plus 1.5 ms (timer granularity and queueing).
                let bound = declared.as_duration() * 5 / 4 + Duration::from_micros(1500);
                if measured.as_duration() > bound {
                    off.insert(format!(
                        "{link} at {:.1} ms (declared {declared})",
                        measured.as_millis_f64()
                    ));
                }
            }
        }
        off.into_iter().collect()
    }

    /// What is not ready yet: `"a -> b"` for every running neighbour pair that is not up, and
    /// `"edge: service"` for every edge without a route to a service that routing gives it over
    /// the running routers (a site `state: down`, one outside the service's residency or one the
    /// edge cannot reach is no route to wait for: a topology validation accepts with a warning
    /// about them waited for ever).
    fn not_converged(&self) -> Vec<String> {
        let mut missing = Vec::new();
        let stopped = topology::route::LiveState {
            down_nodes: self
                .topology
                .nodes
                .iter()
                .filter(|n| !self.routers.contains_key(&n.id))
                .map(|n| n.id.clone())
                .collect(),
            ..Default::default()
        };
        for (id, r) in &self.routers {
            let r = &r.handle;
            let t = r.telemetry();
            for n in &t.neighbours {
                if !n.up && self.routers.contains_key(&n.id) {
                    missing.push(format!("{id} -> {}", n.id));
                }
            }
            if self
                .topology
                .node(id.as_str())
                .is_some_and(|n| n.kind == NodeKind::Edge)
            {
                let routes = r.routes();
                for s in self
                    .topology
                    .services
                    .iter()
                    .filter(|s| !s.requires_circuit)
                {
                    let served =
                        topology::route::route(&self.topology, id, s.name.as_str(), &stopped)
                            .is_ok_and(|c| !c.is_empty());
                    if served && routes.preferred(s.name.as_str()).is_none() {
                        missing.push(format!("{id}: no route for {}", s.name));
                    }
                }
            }
        }
        // The controller's view too: routers report every telemetry interval, so right after a
        // start it may still hold a "down" that an end reported before its neighbour connected
        // (and an apply's impact plan is computed on that view).
        for link in &self.controller.ctl.published().live.down_links {
            if self.routers.contains_key(&link.0) && self.routers.contains_key(&link.1) {
                missing.push(format!("{link} down at the controller"));
            }
        }
        missing
    }

    pub fn topology(&self) -> &Arc<Topology> {
        &self.topology
    }

    /// The running router of `node`.
    pub fn router(&self, node: &NodeId) -> Option<&RouterHandle> {
        self.routers.get(node).map(|r| &r.handle)
    }

    pub fn is_running(&self, node: &NodeId) -> bool {
        self.routers.contains_key(node)
    }

    /// The emulator between `a` and `b` that `a` dials (its profile is the link's).
    pub fn link(&self, a: &NodeId, b: &NodeId) -> Option<&LinkHandle> {
        self.links.get(&(a.clone(), b.clone()))
    }

    /// Changes a link's emulated profile, in both dialling directions, while the fabric runs.
    pub fn set_link_profile(&self, a: &NodeId, b: &NodeId, profile: LinkProfile) -> bool {
        let mut found = false;
        for key in [(a.clone(), b.clone()), (b.clone(), a.clone())] {
            if let Some(h) = self.links.get(&key) {
                h.set_profile(profile);
                found = true;
            }
        }
        found
    }

    /// The demo backend of `site` for `service`.
    pub fn backend(&self, site: &NodeId, service: &ServiceName) -> Option<&BackendHandle> {
        self.backends.get(&(site.clone(), service.clone()))
    }

    /// Where clients of `edge` reach `service` (the edge's client address and the service's port).
    pub fn service_addr(&self, edge: &NodeId, service: &str) -> Option<SocketAddr> {
        let n = self.topology.node(edge.as_str())?;
        let port = self.topology.service(service)?.port?;
        Some(SocketAddr::new(n.client_address?, port))
    }

    /// The controller's admin API address and bearer token.
    pub fn admin(&self) -> (SocketAddr, &str) {
        (self.controller.admin_addr, &self.controller.token)
    }

    /// The controller's QUIC address (where routers connect).
    pub fn controller_addr(&self) -> SocketAddr {
        self.controller.quic_addr
    }

    /// The controller's state directory (deleted when the demo ends).
    pub fn state_dir(&self) -> std::path::PathBuf {
        self.dir.join("controller")
    }

    /// The topology text in force at the controller, as the operator wrote it.
    pub fn topology_text(&self) -> String {
        self.controller.ctl.current().record.text.clone()
    }

    /// Applies `text` through the admin API (`POST /v1/topology`, what `tasman topology apply`
    /// sends): validated, committed durably, distributed; returns the controller's answer with
    /// its impact plan.
    pub async fn apply(&mut self, text: &str, message: &str) -> Result<ApplyOutcome, DemoError> {
        let req = ApplyRequest {
            text: text.to_string(),
            dry_run: false,
            message: message.to_string(),
            author: "tasman demo".into(),
            base_version: None,
        };
        let out: ApplyOutcome = self.admin.post("/v1/topology", &req).await?;
        let cur = self.controller.ctl.current();
        if Some(cur.record.version) == out.version {
            self.topology = cur.topology.clone();
        }
        Ok(out)
    }

    /// The controller's status (`GET /v1/status`, what `tasman status` shows).
    pub async fn status(&self) -> Result<Status, DemoError> {
        Ok(self.admin.get("/v1/status").await?)
    }

    /// Waits until the controller records every running router at topology `version` (each
    /// router acknowledges a version once it applied it). Returns how long that took.
    pub async fn wait_acknowledged(
        &self,
        version: u64,
        within: Duration,
    ) -> Result<Duration, DemoError> {
        let start = Instant::now();
        loop {
            let st = self.status().await?;
            let behind: Vec<String> = self
                .routers
                .keys()
                .filter(|n| {
                    !st.routers
                        .iter()
                        .any(|r| r.node == n.as_str() && r.applied_topology >= version)
                })
                .map(|n| n.to_string())
                .collect();
            if behind.is_empty() {
                return Ok(start.elapsed());
            }
            if start.elapsed() > within {
                return Err(DemoError::NotConverged(
                    within,
                    format!("not at topology version {version}: {}", behind.join(", ")),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Running routers.
    pub fn running(&self) -> usize {
        self.routers.len()
    }

    /// Makes every link of `node` drop everything: to its neighbours it is as if it crashed or
    /// lost power (it keeps running, unreachable). Returns at once.
    pub fn isolate_node(&self, node: &NodeId) {
        self.isolated
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(node.clone());
        for ((from, to), h) in &self.links {
            if from == node || to == node {
                h.set_profile(LinkProfile::cut());
            }
        }
    }

    /// Stops `node` as a crash would look to its neighbours: its links go silent first (nothing
    /// it says on the way out arrives), then its router stops.
    pub async fn stop_node(&mut self, node: &NodeId) -> Result<(), DemoError> {
        let handle = self
            .routers
            .remove(node)
            .ok_or_else(|| DemoError::UnknownNode(node.clone()))?;
        self.isolate_node(node);
        handle.shutdown().await;
        Ok(())
    }

    /// Stops `node` as planned maintenance does (`tasman router` on SIGTERM): its router drains
    /// (no new stream, its neighbours told at once, open connections finish; the demo's drain
    /// timeout is 2 s) while its links stay up. Returns once the router is draining; the task ends
    /// when it has stopped, with how its drain ended ([`router::Drain`]).
    pub fn drain_node(
        &mut self,
        node: &NodeId,
    ) -> Result<tokio::task::JoinHandle<router::Drain>, DemoError> {
        let r = self
            .routers
            .remove(node)
            .ok_or_else(|| DemoError::UnknownNode(node.clone()))?;
        // Draining from this call on: a connection made after it returns is not the router's.
        r.handle.begin_drain();
        Ok(tokio::spawn(async move {
            // The control session stays up while it drains, as `tasman router`'s does.
            let drain = r.handle.shutdown().await;
            drop(r.client);
            drain
        }))
    }

    /// Restarts a stopped node and restores its links' declared profiles.
    pub async fn start_node(&mut self, node: &NodeId) -> Result<(), DemoError> {
        if self.routers.contains_key(node) {
            return Ok(());
        }
        if self.topology.node(node.as_str()).is_none() {
            return Err(DemoError::UnknownNode(node.clone()));
        }
        // Its links back to their declared profiles, but those to a neighbour still isolated
        // (that one is still, to its neighbours, as if it crashed).
        let isolated = {
            let mut i = self
                .isolated
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            i.remove(node);
            i.clone()
        };
        for l in self.topology.links_of(node) {
            if isolated.contains(&l.a) || isolated.contains(&l.b) {
                continue;
            }
            let profile = LinkProfile {
                jitter: self.options.jitter,
                ..LinkProfile::delay(l.latency)
            };
            self.set_link_profile(&l.a, &l.b, profile);
        }
        // The stopped router's UDP socket is released once its endpoint has wound down (its
        // connections' close frames, tasks finishing): retry the bind for a while.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.spawn_router(node).await {
                Err(DemoError::Router {
                    source:
                        router::RouterError::Bind { .. } | router::RouterError::MetricsBind { .. },
                    ..
                }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    /// Stops every router (all at once: each may take up to its drain and close timeouts), the
    /// controller, every emulator and backend. Dropped before its end (a second Ctrl-C), it
    /// leaves what still runs to the runtime's shutdown.
    pub async fn shutdown(mut self) {
        let mut routers = tokio::task::JoinSet::new();
        for (_, r) in std::mem::take(&mut self.routers) {
            routers.spawn(r.shutdown());
        }
        while routers.join_next().await.is_some() {}
        self.controller.shutdown().await;
        for h in self.links.values() {
            h.shutdown();
        }
        for b in self.backends.values() {
            b.shutdown();
        }
    }
}

/// Rewrites every port of the topology to a currently free one on the same IP.
///
/// The ports come from below the kernel's ephemeral range: the link emulators and their flows
/// bind `(node IP, 0)` before and while the routers start, and a port picked from the ephemeral
/// range could be handed to one of them before its router binds it ("Address already in use").
fn use_free_ports(t: &mut Topology) -> Result<(), DemoError> {
    let io = |what: String| move |source| DemoError::Io { what, source };
    let mut ports = FixedPorts::new();
    for n in &mut t.nodes {
        let ip = n.address.ip();
        n.address.set_port(
            ports
                .udp(ip)
                .map_err(io(format!("free UDP port on {ip}")))?,
        );
        if let (Some(_), Some(cip)) = (n.transparent_port, n.client_address) {
            let port = ports
                .tcp(&[cip])
                .map_err(io(format!("free TCP port on {cip}")))?;
            n.transparent_port = Some(port);
        }
        for s in &mut n.serves {
            let ip = s.backend.ip();
            s.backend.set_port(
                ports
                    .tcp(&[ip])
                    .map_err(io(format!("free TCP port on {ip}")))?,
            );
        }
    }
    let client_ips: Vec<IpAddr> = t.nodes.iter().filter_map(|n| n.client_address).collect();
    for s in &mut t.services {
        if s.port.is_some() {
            // Free on every edge's client address.
            let ips = if client_ips.is_empty() {
                vec![IpAddr::from([127, 0, 0, 1])]
            } else {
                client_ips.clone()
            };
            s.port = Some(
                ports
                    .tcp(&ips)
                    .map_err(io("free TCP port on every client address".to_string()))?,
            );
        }
    }
    Ok(())
}

/// Hands out ports below the ephemeral range, each free when checked and never the same twice.
struct FixedPorts {
    next: u16,
    end: u16,
}

impl FixedPorts {
    const FIRST: u16 = 10_000;

    fn new() -> Self {
        let end = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap_or(32_768u16)
            .max(Self::FIRST + 1_000);
        // Start somewhere else in each process, so that demos run side by side rarely probe the
        // same ports first.
        let span = end - Self::FIRST;
        let next = Self::FIRST + (std::process::id() % u32::from(span)) as u16;
        FixedPorts { next, end }
    }

    /// The next port not handed out yet for which `ok` (a bind check) holds.
    fn find(&mut self, ok: impl Fn(u16) -> bool) -> std::io::Result<u16> {
        for _ in Self::FIRST..self.end {
            let p = self.next;
            self.next = if p + 1 >= self.end {
                Self::FIRST
            } else {
                p + 1
            };
            if ok(p) {
                return Ok(p);
            }
        }
        Err(std::io::ErrorKind::AddrInUse.into())
    }

    fn tcp(&mut self, ips: &[IpAddr]) -> std::io::Result<u16> {
        self.find(|p| {
            ips.iter()
                .all(|ip| std::net::TcpListener::bind((*ip, p)).is_ok())
        })
    }

    fn udp(&mut self, ip: IpAddr) -> std::io::Result<u16> {
        self.find(|p| std::net::UdpSocket::bind((ip, p)).is_ok())
    }
}
