//! The local demo fabric: every node of a topology as an in-process router, every inter-node link
//! through a [`LinkEmulator`] with the link's declared one-way latency, and a [`DemoBackend`] per
//! site and service. `tasman demo` drives it; tests and the controller's demo reuse it.
//!
//! ```no_run
//! # async fn f(topo: topology::Topology) -> Result<(), fabric::demo::DemoError> {
//! use fabric::demo::{DemoFabric, DemoOptions};
//! let mut fabric = DemoFabric::start(topo, DemoOptions::default()).await?;
//! let node = topology::NodeId::new("syd-site-1");
//! fabric.stop_node(&node).await?;  // its links go silent, then the router stops
//! fabric.start_node(&node).await?; // and back
//! fabric.shutdown().await;
//! # Ok(()) }
//! ```

pub mod client;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use router::backend::{BackendConfig, BackendHandle, DemoBackend};
use router::netem::{LinkEmulator, LinkHandle, LinkProfile};
use router::{ProbeConfig, Router, RouterConfig, RouterHandle, Snapshot};
use tokio::sync::watch;
use topology::{Latency, NodeId, NodeKind, ServiceName, Topology};

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
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            ephemeral_ports: false,
            probe: ProbeConfig::default(),
            token_delay: Duration::from_millis(2),
            jitter: Latency::ZERO,
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
}

/// A running demo fabric.
pub struct DemoFabric {
    topology: Arc<Topology>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    pki: tempfile::TempDir,
    options: DemoOptions,
    routers: BTreeMap<NodeId, RouterHandle>,
    /// `(from, to)`: the emulator `from` dials to reach `to` (each link has one per direction of
    /// dialling; each carries both directions of its traffic).
    links: BTreeMap<(NodeId, NodeId), LinkHandle>,
    backends: BTreeMap<(NodeId, ServiceName), BackendHandle>,
}

impl DemoFabric {
    /// Starts everything and waits until every router has all its neighbours up.
    pub async fn start(
        mut topology: Topology,
        options: DemoOptions,
    ) -> Result<DemoFabric, DemoError> {
        if options.ephemeral_ports {
            use_free_ports(&mut topology)?;
        }
        let pki = tempfile::tempdir().map_err(|source| DemoError::Io {
            what: "temporary directory".into(),
            source,
        })?;
        router::pki::init(pki.path()).map_err(|e| DemoError::Pki(e.to_string()))?;
        for n in &topology.nodes {
            router::pki::issue(pki.path(), n.id.as_str())
                .map_err(|e| DemoError::Pki(e.to_string()))?;
        }
        let topology = Arc::new(topology);
        let (snapshots, _) = watch::channel(Arc::new(Snapshot::new(1, topology.clone())));

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
                delay: l.latency,
                jitter: options.jitter,
                loss: 0.0,
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
            snapshots,
            pki,
            options,
            routers: BTreeMap::new(),
            links,
            backends,
        };
        // The core (transits and sites) first, until its RTT measurements have settled; then the
        // edges. Every router's first RTT samples come from handshakes made while the whole
        // fabric starts at once, inflated by CPU contention; an edge that chose its preferred site
        // on those numbers would keep it (hysteresis: a better site must win by >= 10 ms).
        for n in topology.nodes.iter().filter(|n| n.kind != NodeKind::Edge) {
            fabric.spawn_router(&n.id).await?;
        }
        fabric.wait_converged(Duration::from_secs(30)).await?;
        fabric.wait_settled(Duration::from_secs(5)).await;
        for n in topology.nodes.iter().filter(|n| n.kind == NodeKind::Edge) {
            fabric.spawn_router(&n.id).await?;
        }
        fabric.wait_converged(Duration::from_secs(30)).await?;
        Ok(fabric)
    }

    async fn spawn_router(&mut self, node: &NodeId) -> Result<(), DemoError> {
        let tls = router::tls::TlsIdentity::load(self.pki.path(), node.as_str())
            .map_err(|e| DemoError::Pki(e.to_string()))?;
        let mut cfg = RouterConfig::new(node.clone(), tls, self.snapshots.subscribe());
        cfg.probe = self.options.probe;
        cfg.dial_overrides = self.dial_overrides(node);
        let handle = Router::spawn(cfg)
            .await
            .map_err(|source| DemoError::Router {
                node: node.clone(),
                source,
            })?;
        self.routers.insert(node.clone(), handle);
        Ok(())
    }

    fn dial_overrides(&self, node: &NodeId) -> HashMap<NodeId, SocketAddr> {
        self.links
            .iter()
            .filter(|((from, _), _)| from == node)
            .map(|((_, to), h)| (to.clone(), h.local_addr()))
            .collect()
    }

    /// Waits until every running router sees all its running neighbours up.
    pub async fn wait_converged(&self, within: Duration) -> Result<(), DemoError> {
        let deadline = Instant::now() + within;
        loop {
            let missing = self.not_converged();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(DemoError::NotConverged(within, missing.join(", ")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
        for (id, r) in &self.routers {
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
    /// `"edge: service"` for every edge without a route to a service that a running site serves.
    fn not_converged(&self) -> Vec<String> {
        let mut missing = Vec::new();
        for (id, r) in &self.routers {
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
                    let served = self
                        .topology
                        .sites_serving(s.name.as_str())
                        .any(|(site, _)| {
                            self.routers.contains_key(&site.id) && s.residency.allows(site)
                        });
                    if served && routes.preferred(s.name.as_str()).is_none() {
                        missing.push(format!("{id}: no route for {}", s.name));
                    }
                }
            }
        }
        missing
    }

    pub fn topology(&self) -> &Arc<Topology> {
        &self.topology
    }

    /// The running router of `node`.
    pub fn router(&self, node: &NodeId) -> Option<&RouterHandle> {
        self.routers.get(node)
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

    /// Publishes a new topology to every router as the next snapshot version.
    pub fn publish(&mut self, topology: Topology) {
        let topology = Arc::new(topology);
        let version = self.snapshots.borrow().version + 1;
        self.topology = topology.clone();
        self.snapshots
            .send_replace(Arc::new(Snapshot::new(version, topology)));
    }

    /// Makes every link of `node` drop everything: to its neighbours it is as if it crashed or
    /// lost power (it keeps running, unreachable). Returns at once.
    pub fn isolate_node(&self, node: &NodeId) {
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

    /// Restarts a stopped node and restores its links' declared profiles.
    pub async fn start_node(&mut self, node: &NodeId) -> Result<(), DemoError> {
        if self.routers.contains_key(node) {
            return Ok(());
        }
        if self.topology.node(node.as_str()).is_none() {
            return Err(DemoError::UnknownNode(node.clone()));
        }
        for l in self.topology.links_of(node) {
            let profile = LinkProfile {
                delay: l.latency,
                jitter: self.options.jitter,
                loss: 0.0,
            };
            self.set_link_profile(&l.a, &l.b, profile);
        }
        self.spawn_router(node).await
    }

    /// Stops every router, emulator and backend.
    pub async fn shutdown(mut self) {
        for (_, r) in std::mem::take(&mut self.routers) {
            r.shutdown().await;
        }
        for h in self.links.values() {
            h.shutdown();
        }
        for b in self.backends.values() {
            b.shutdown();
        }
    }
}

/// Rewrites every port of the topology to a currently free one on the same IP.
fn use_free_ports(t: &mut Topology) -> Result<(), DemoError> {
    let io = |what: String| move |source| DemoError::Io { what, source };
    for n in &mut t.nodes {
        let ip = n.address.ip();
        n.address
            .set_port(free_udp_port(ip).map_err(io(format!("free UDP port on {ip}")))?);
        if let (Some(_), Some(cip)) = (n.transparent_port, n.client_address) {
            let port = free_tcp_port(cip).map_err(io(format!("free TCP port on {cip}")))?;
            n.transparent_port = Some(port);
        }
        for s in &mut n.serves {
            let ip = s.backend.ip();
            s.backend
                .set_port(free_tcp_port(ip).map_err(io(format!("free TCP port on {ip}")))?);
        }
    }
    let client_ips: Vec<IpAddr> = t.nodes.iter().filter_map(|n| n.client_address).collect();
    for s in &mut t.services {
        if s.port.is_some() {
            // Free on every edge's client address.
            let mut port = 0;
            for _ in 0..64 {
                let ip = client_ips
                    .first()
                    .copied()
                    .unwrap_or(IpAddr::from([127, 0, 0, 1]));
                let p = free_tcp_port(ip).map_err(io(format!("free TCP port on {ip}")))?;
                if client_ips
                    .iter()
                    .all(|ip| std::net::TcpListener::bind((*ip, p)).is_ok())
                {
                    port = p;
                    break;
                }
            }
            s.port = Some(port);
        }
    }
    Ok(())
}

fn free_tcp_port(ip: IpAddr) -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

fn free_udp_port(ip: IpAddr) -> std::io::Result<u16> {
    Ok(std::net::UdpSocket::bind((ip, 0))?.local_addr()?.port())
}
