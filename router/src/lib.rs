//! Tasman's data plane: one router daemon whose role (edge, transit, site) comes from its node's
//! kind in the topology.
//!
//! A router is driven by a `watch::Receiver<Arc<Snapshot>>` (a topology file sends one; the
//! controller client feeds new ones). It owns one QUIC endpoint (server and client), dials every
//! neighbour (one pooled connection each, reused by all streams), probes them, and on every
//! snapshot or local-health change rebuilds its [`routes::Routes`] off the data path and swaps it
//! in. Client connections read that table with one atomic load.
//!
//! Embedding (the demo runs many routers in one process):
//! ```no_run
//! # async fn f(cfg: router::RouterConfig) -> Result<(), router::RouterError> {
//! let handle = router::Router::spawn(cfg).await?;
//! println!("{:?}", handle.telemetry());
//! handle.shutdown().await;
//! # Ok(()) }
//! ```

pub mod alloc;
pub mod backend;
pub mod circuits;
pub mod codes;
pub mod control;
pub mod durable;
mod edge;
pub mod header;
pub mod http_serve;
mod inbound;
pub mod keep_awake;
pub mod limits;
pub mod metrics;
mod neighbours;
pub mod netem;
pub mod orig_dst;
pub mod pki;
pub mod probe;
pub mod ratelimit;
pub mod routes;
mod site;
pub mod snapshot;
mod splice;
pub mod telemetry;
pub mod tls;
pub mod transport;
mod udp;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use topology::NodeId;
use topology::route::Hysteresis;

pub use snapshot::Snapshot;
pub use telemetry::TelemetryReport;

/// Probe timing (BFD-style). A neighbour is down after `misses` probes in a row went unanswered
/// (after a miss the next probe goes out at once), or after `interval * misses` plus a slack
/// (`max(interval / 2, 4 x RTT variation)`) without any sign of life, whichever comes first (see
/// `neighbours::Liveness`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeConfig {
    /// Probe every this often (default 100 ms).
    pub interval: Duration,
    /// Declare a neighbour down after this many missed probes in a row (default 3).
    pub misses: u32,
    /// A neighbour (or site service) that went down stays down at least this long (default 1 s).
    pub hold_down: Duration,
}

impl ProbeConfig {
    /// The shortest interval (a neighbour answers 250 pings a second at most,
    /// [`probe::PONG_EVERY`]); `tasman router --probe-interval` takes the same bounds.
    pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
    /// The longest interval.
    pub const MAX_INTERVAL: Duration = Duration::from_secs(60);
    /// The most misses before a down verdict (`--probe-misses`).
    pub const MAX_MISSES: u32 = 100;

    /// The bounds a router takes: an interval from [`Self::MIN_INTERVAL`] to
    /// [`Self::MAX_INTERVAL`], 1 to [`Self::MAX_MISSES`] misses, a hold-down of at most an hour
    /// (the CLI takes 60 s at most). A zero interval made every neighbour's dialer task panic
    /// (tokio's `interval`), leaving a router that never had a neighbour up and said nothing; a
    /// huge one overflowed its deadlines; one under 10 ms outran the neighbours' pong budget,
    /// and they flapped.
    pub fn check(&self) -> Result<(), String> {
        if !(Self::MIN_INTERVAL..=Self::MAX_INTERVAL).contains(&self.interval) {
            return Err(format!(
                "probe interval {:?}: must be from {:?} to {:?}",
                self.interval,
                Self::MIN_INTERVAL,
                Self::MAX_INTERVAL
            ));
        }
        if !(1..=Self::MAX_MISSES).contains(&self.misses) {
            return Err(format!(
                "probe misses {}: must be from 1 to {}",
                self.misses,
                Self::MAX_MISSES
            ));
        }
        if self.hold_down > Duration::from_secs(3600) {
            return Err(format!(
                "hold-down {:?}: must be at most 1h",
                self.hold_down
            ));
        }
        Ok(())
    }
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            interval: Duration::from_millis(100),
            misses: 3,
            hold_down: Duration::from_secs(1),
        }
    }
}

/// Everything a router needs. Build with [`RouterConfig::new`] and adjust the public fields.
pub struct RouterConfig {
    pub node: NodeId,
    pub tls: tls::TlsIdentity,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Dial a neighbour through this address instead of its topology address (the link
    /// emulator sits there).
    pub dial_overrides: HashMap<NodeId, SocketAddr>,
    pub probe: ProbeConfig,
    pub metrics_addr: Option<SocketAddr>,
    /// Anti-flap margins for the preferred site per service.
    pub hysteresis: Hysteresis,
    /// Candidates an edge tries for one client connection before giving up (default 3).
    pub max_tries: usize,
    /// A site's TCP connect timeout to its backend (default 2 s: above one SYN retransmit).
    pub backend_connect_timeout: Duration,
    /// Bound on how long a stream may take to send its header (default 5 s), and on how long a
    /// transit's next hop may take to take the stream and its header; past that the transit resets
    /// it with `next_hop_unreachable`, which the edge retries if this is below `reply_timeout`.
    pub header_timeout: Duration,
    /// Streams a neighbour may have open at once on its connection to this router (default
    /// 16,384, [`transport::MAX_CONCURRENT_STREAMS`]; quinn allocates their state when it grants
    /// them, 1.45 MB a connection at the default). A router whose next hop's connection has none
    /// left to give moves the stream on after [`splice::STREAM_GRANT_WAIT`] (`stream_limit`).
    pub peer_streams: u32,
    /// Bound on how long an edge waits for a site's reply, from opening the stream on, before
    /// failing the attempt (default 10 s) and retrying on the next candidate (`upstream_lost`;
    /// each try has its own: `max_tries` of them, plus one per site a traffic dial declined,
    /// which are tried last). It bounds the
    /// whole attempt: client bytes waiting for the stream's flow control (a site still
    /// connecting to its backend reads none) or for a circuit's rate do not hold it past this.
    pub reply_timeout: Duration,
    /// A proxied connection on which no byte moved either way for this long is reset with
    /// `idle_timeout`: the client's or the backend's TCP connection gets an RST (a lingering
    /// close instead for a side sent everything and a FIN already), the stream a reset, and a
    /// site frees its capacity slot (default 1 h; `None`: never). Edge and site each
    /// enforce it on their side; it ends between one and 1.5 times this after the last byte.
    pub idle_timeout: Option<Duration>,
    /// A proxied connection whose TCP side takes no byte for this long while bytes wait to be
    /// written to it (a client that stopped reading a response, a backend that stopped reading
    /// a request) is reset with `write_stalled` (default 30 s; `None`: never). Its stream would
    /// otherwise hold up to a stream window of its neighbour connection's flow-control window,
    /// which every stream on that connection shares: a few such streams would stop them all.
    /// Edge and site each enforce it on their side; it ends between one and two times this after
    /// the last byte written.
    pub write_stall_timeout: Option<Duration>,
    /// QUIC receive windows of its connections (default: `transport::Windows::default()`,
    /// sized for long fat links; tests use small ones).
    pub windows: transport::Windows,
    /// Client bytes an edge keeps to replay on the next candidate (default 64 KiB).
    pub replay_limit: usize,
    /// Client connections an edge holds at once; more are reset at accept. `None` (the
    /// default): the open-file limit less [`RESERVED_DESCRIPTORS`] (at least 64), so that
    /// clients cannot take the descriptors the router needs for itself.
    pub max_client_connections: Option<usize>,
    /// Client connections an edge holds at once from one source (an IPv4 address, or an IPv6
    /// /64); more from it are reset at accept, so that one client cannot take the whole
    /// `max_client_connections` (default [`SourceCap::Auto`]).
    pub max_client_connections_per_source: SourceCap,
    /// Extra names a peer may present besides the topology's node ids (e.g. `controller`).
    pub extra_peer_names: Vec<String>,
    /// What this router presents (share one with the control client so both present the same,
    /// reloaded certificate); `None`: one made from `tls`.
    pub cert_resolver: Option<Arc<tls::CertResolver>>,
    /// Re-read the node's certificate and key from their directory this often and present a new
    /// pair that passes the checks of [`tls::CertResolver::check`] (default 10 s; `None`: never).
    pub cert_reload_interval: Option<Duration>,
    /// How long [`RouterHandle::shutdown`] lets open connections finish before it closes them
    /// (default 20 s: with the close, 0.5 s, and a controller-mode router's snapshot store, 5 s
    /// at most, within the 30 s grace period an orchestrator such as Kubernetes gives by
    /// default before its SIGKILL).
    pub drain_timeout: Duration,
    /// Keep cores out of their idle halt while traffic flows (trades CPU for latency; see
    /// [`keep_awake`]). Default `None`: off.
    pub keep_awake: Option<keep_awake::Config>,
}

impl RouterConfig {
    pub fn new(
        node: NodeId,
        tls: tls::TlsIdentity,
        snapshots: watch::Receiver<Arc<Snapshot>>,
    ) -> Self {
        RouterConfig {
            node,
            tls,
            snapshots,
            dial_overrides: HashMap::new(),
            probe: ProbeConfig::default(),
            metrics_addr: None,
            hysteresis: Hysteresis::default(),
            max_tries: 3,
            backend_connect_timeout: Duration::from_secs(2),
            header_timeout: Duration::from_secs(5),
            peer_streams: transport::MAX_CONCURRENT_STREAMS,
            reply_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(3600)),
            write_stall_timeout: Some(Duration::from_secs(30)),
            windows: transport::Windows::default(),
            replay_limit: 64 * 1024,
            max_client_connections: None,
            max_client_connections_per_source: SourceCap::Auto,
            extra_peer_names: Vec::new(),
            cert_resolver: None,
            cert_reload_interval: Some(Duration::from_secs(10)),
            drain_timeout: Duration::from_secs(20),
            keep_awake: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("node {0:?} is not in the topology")]
    UnknownNode(NodeId),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("starting the keep-awake threads: {0}")]
    KeepAwake(std::io::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The metrics listener's bind (`--metrics`), told apart from the node's own address's.
    #[error("bind the metrics address {addr} (--metrics): {source}")]
    MetricsBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// State shared by all tasks of one router. Data-path reads are lock-free (`ArcSwap` loads);
/// the few `std::sync::Mutex`es guard control-path maps and are never held across `.await`.
pub(crate) struct Shared {
    pub node: NodeId,
    pub probe: ProbeConfig,
    pub hysteresis: Hysteresis,
    pub max_tries: usize,
    pub backend_connect_timeout: Duration,
    pub header_timeout: Duration,
    pub peer_streams: u32,
    pub reply_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub write_stall_timeout: Option<Duration>,
    pub replay_limit: usize,
    /// [`RouterConfig::max_client_connections`], resolved at start.
    pub max_clients: usize,
    /// The open client connections per source, against
    /// [`RouterConfig::max_client_connections_per_source`] (resolved at start).
    pub sources: edge::SourceCounts,
    pub endpoint: quinn::Endpoint,
    pub peers: tls::PeerNames,
    /// The certificate and key presented (reloaded in place).
    pub cert: Arc<tls::CertResolver>,
    pub extra_peer_names: Vec<String>,
    pub dial_overrides: HashMap<NodeId, SocketAddr>,
    pub snapshot: ArcSwap<Snapshot>,
    /// The snapshot's topology as a graph: id lookups for checking what peers relay.
    pub graph: ArcSwap<topology::graph::Graph>,
    pub routes: ArcSwap<routes::Routes>,
    /// This edge's circuits (classification and rate limiters); empty on other roles.
    pub circuits: ArcSwap<circuits::CircuitTable>,
    pub vip_listeners: circuits::VipListeners,
    /// Bounds the incoming handshakes in progress.
    pub handshakes: transport::HandshakeGate,
    /// The authenticated incoming connections, by peer (at most
    /// [`inbound::MAX_CONNECTIONS_PER_PEER`] each).
    pub inbound: inbound::PeerConnections,
    pub neighbours: ArcSwap<HashMap<NodeId, Arc<neighbours::Neighbour>>>,
    pub sites: ArcSwap<HashMap<topology::ServiceName, Arc<site::SiteService>>>,
    pub evidence: routes::Evidence,
    /// Local evidence changed: rebuild the routing table.
    pub changed: Notify,
    /// The routing table was stored anew (`routes::Control::rebuild`): wakes a client
    /// connection whose try failed on this router's own first hop, waiting for the table that
    /// the hop's down verdict brings (`edge::newer_table`).
    pub rebuilt: Notify,
    /// Shared with the keep-awake spinners, which watch its byte counters.
    pub metrics: Arc<metrics::Metrics>,
    pub keep_awake: Option<keep_awake::KeepAwake>,
    /// True from the start of [`RouterHandle::shutdown`]: the router is draining (it takes no
    /// new stream, and tells its neighbours so in its probe replies).
    pub shutdown: watch::Receiver<bool>,
    pub drain_timeout: Duration,
    pub started: Instant,
    /// The control session feeding this router, if one is attached
    /// ([`control::ControlClient::attach`]; the last one attached): its series on the metrics
    /// page.
    pub control: arc_swap::ArcSwapOption<control::client::ControlStatus>,
}

/// Descriptors an edge keeps for itself beyond its clients (its QUIC socket, listeners, the
/// metrics endpoint's clients, certificate and snapshot files): the default cap on client
/// connections is the open-file limit less this.
pub const RESERVED_DESCRIPTORS: usize = 256;

/// The default [`RouterConfig::max_client_connections`]: the soft open-file limit less
/// [`RESERVED_DESCRIPTORS`], at least 64.
pub fn default_max_clients() -> usize {
    let files = match limits::nofile() {
        Ok(lim) if lim.rlim_cur != libc::RLIM_INFINITY => {
            usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
        }
        _ => 1 << 20,
    };
    files.saturating_sub(RESERVED_DESCRIPTORS).max(64)
}

/// [`RouterConfig::max_client_connections_per_source`]: the most client connections an edge
/// holds at once from one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourceCap {
    /// A quarter of the resolved `max_client_connections`, at least
    /// [`SourceCap::AUTO_MIN`]. Not less: many users can share one address (a NAT, an
    /// enterprise's egress), and they are one source here; not more: one source must leave
    /// room for the others.
    #[default]
    Auto,
    /// No per-source cap (only `max_client_connections`).
    Off,
    /// At most this many (at least 1).
    At(usize),
}

impl SourceCap {
    /// The least [`SourceCap::Auto`] resolves to.
    pub const AUTO_MIN: usize = 64;

    /// The cap for an edge whose overall cap is `max_clients`; `None`: none.
    pub fn resolve(self, max_clients: usize) -> Option<usize> {
        match self {
            SourceCap::Auto => Some((max_clients / 4).max(Self::AUTO_MIN)),
            SourceCap::Off => None,
            SourceCap::At(n) => Some(n.max(1)),
        }
    }
}

impl Shared {
    /// `write`, a stream's QUIC write before its splice (a site's answer), for the idle
    /// timeout at most: `None` if it took longer. No splice timer
    /// runs yet, and a peer that withholds its flow-control window would otherwise hold the
    /// stream (a client's slot, or a site's capacity slot and its backend connection) for ever.
    /// The idle timeout, as the splice gives its own QUIC writes, not the write-stall one: the
    /// window such a write waits for is shared with the connection's other streams, and one
    /// that others' stopped readers filled is freed by their write-stall resets, up to two
    /// write-stall timeouts later.
    pub async fn bounded_write<T>(&self, write: impl std::future::Future<Output = T>) -> Option<T> {
        match self.idle_timeout {
            Some(d) => tokio::time::timeout(d, write).await.ok(),
            None => Some(write.await),
        }
    }

    /// Prometheus text: the counters, then the presented certificate's series.
    pub fn render_metrics(&self, t: &TelemetryReport) -> String {
        let mut s = self.metrics.render(t, &self.routes.load());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            metrics::series(
                &mut s,
                self.node.as_str(),
                "tasman_runtime_workers",
                "gauge",
                "Worker threads of the runtime the router runs on.",
                rt.metrics().num_workers(),
            );
        }
        if let Some(k) = &self.keep_awake {
            k.render_metrics(self.node.as_str(), &mut s);
        }
        self.cert.render_metrics(self.node.as_str(), &mut s);
        if let Some(c) = self.control.load().as_ref() {
            c.render_metrics(self.node.as_str(), &mut s);
        }
        s
    }

    /// Whether [`RouterHandle::shutdown`] has begun.
    pub fn draining(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// What this router tells others (probe replies, telemetry) of a neighbour link or a
    /// service that is `up` here: a draining router says down, so that new connections go
    /// around it. The one place that rule lives.
    pub fn advertised(&self, up: bool) -> bool {
        up && !self.draining()
    }

    /// Connections this router carries now: client or backend streams (edge, site) open or being
    /// set up, and relayed streams (transit). An edge's client counts in `clients_open` from its
    /// accept, before its task runs and counts it as starting (`edge::accept_loop`), and until
    /// its lingering close ends: those streams are the larger of the two counts.
    fn open_streams(&self) -> u64 {
        use std::sync::atomic::Ordering::{Acquire, Relaxed};
        let m = &self.metrics;
        // A stream counts as active before it stops counting as starting (`Held`'s release
        // pairs with this acquire): read in the other order, one moving between the two reads
        // counted in neither, and a drain could end (closing the endpoint) as it began.
        let starting = m.streams_starting.load(Acquire);
        // Likewise a lingering socket counts as such before it stops counting as active.
        let active = m.streams_active.load(Acquire);
        let streams = starting + active + m.lingering.load(Relaxed);
        streams.max(m.clients_open.load(Relaxed)) + m.relays_active.load(Relaxed)
    }

    /// What the router reports (to the controller, on `/telemetry`). Draining, it reports its
    /// links down and its services unhealthy, as its probe replies do.
    pub fn telemetry(&self) -> TelemetryReport {
        self.advertise(self.observed())
    }

    /// `t` (this router's [`Self::observed`] state) as it tells others of it ([`Self::advertised`]).
    fn advertise(&self, mut t: TelemetryReport) -> TelemetryReport {
        for n in &mut t.neighbours {
            n.up = self.advertised(n.up);
        }
        for s in &mut t.sites {
            s.healthy = self.advertised(s.healthy);
        }
        t
    }

    /// The router's state as it sees it, a drain not applied: what its metrics show (while it
    /// drains, its links are still up and its backends still healthy, and it still probes
    /// them; a drain showed every neighbour down and every service unhealthy on `/metrics`, an
    /// alert at every rolling restart).
    pub fn observed(&self) -> TelemetryReport {
        let mut neighbours: Vec<_> = self
            .neighbours
            .load()
            .values()
            .map(|n| {
                let (path, lost_packets) = n.path(self.inbound.lost_packets(n.id.as_str()));
                telemetry::NeighbourReport {
                    id: n.id.clone(),
                    rtt_us: n.rtt_us(),
                    up: n.is_up(),
                    srtt_us: n.srtt_us(),
                    path_mtu: path.map_or(0, |p| p.current_mtu),
                    lost_packets,
                    dial_failures: n.dial_failures(),
                }
            })
            .collect();
        neighbours.sort_by(|a, b| a.id.cmp(&b.id));
        let mut sites: Vec<_> = self.sites.load().values().map(|s| s.report()).collect();
        sites.sort_by(|a, b| a.service.cmp(&b.service));
        let snapshot = self.snapshot.load();
        let edge = snapshot
            .topology
            .node(self.node.as_str())
            .is_some_and(|n| n.kind == topology::NodeKind::Edge);
        TelemetryReport {
            node: self.node.clone(),
            snapshot_version: snapshot.version,
            neighbours,
            sites,
            preferred: routes::preferred_sites(&self.routes.load()),
            draining: self.draining(),
            hysteresis: edge.then(|| telemetry::HysteresisReport {
                margin_us: self.hysteresis.absolute.as_micros(),
                ratio: self.hysteresis.relative,
            }),
        }
    }
}

pub struct Router;

/// How a router's drain ended ([`RouterHandle::shutdown_or`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Its last stream ended this long after the drain began.
    Emptied(Duration),
    /// `drain_timeout` passed with streams still open; they were cut.
    TimedOut,
    /// Stopped before either (`stop` resolved).
    Stopped,
}

/// A running router. Dropping it does not stop it; call [`RouterHandle::shutdown`].
pub struct RouterHandle {
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    /// Stopped when the drain begins.
    tasks: Vec<JoinHandle<()>>,
    /// The control task (`routes::Control::run`): its dialers probe the neighbours until the
    /// end of a drain, for the streams still open.
    control_task: JoinHandle<()>,
    /// Served until the end of a drain, so that it can be watched.
    metrics_task: Option<JoinHandle<()>>,
    /// The certificate, trust and revocation-list reload: kept until the end of a drain, which
    /// can last `--drain-timeout`, so that a list or certificate copied in meanwhile still acts
    /// on the connections the drain keeps.
    reload_task: Option<JoinHandle<()>>,
}

impl Router {
    /// Starts a router on the current tokio runtime: takes the snapshot `cfg.snapshots` holds now
    /// as its first (the caller waits for one first: `tasman router` for the controller's, or the
    /// one on disk), binds the QUIC endpoint on the node's address, the edge listeners and the metrics endpoint, and returns
    /// once everything is bound (so callers can connect right away).
    pub async fn spawn(mut cfg: RouterConfig) -> Result<RouterHandle, RouterError> {
        cfg.probe.check().map_err(RouterError::Config)?;
        let first = cfg.snapshots.borrow_and_update().clone();
        let me = first
            .topology
            .node(cfg.node.as_str())
            .ok_or_else(|| RouterError::UnknownNode(cfg.node.clone()))?
            .clone();
        let mut names: Vec<String> = first
            .topology
            .nodes
            .iter()
            .map(|n| n.id.to_string())
            .collect();
        names.extend(cfg.extra_peer_names.iter().cloned());
        let peers = tls::PeerNames::new(names);
        let transport = Arc::new(transport::accept_transport_config_with(cfg.windows));
        let cert = match &cfg.cert_resolver {
            Some(c) => c.clone(),
            None => tls::CertResolver::new(&cfg.tls)?,
        };
        match cert.at_start() {
            Ok(None) => {}
            Ok(Some(why)) => tracing::warn!(node = %cfg.node, path = %cert.cert_path().display(),
                "starting with a certificate neighbours will refuse: {why} (a re-issued pair is \
                 taken up when it is copied in)"),
            Err(why) => {
                return Err(tls::TlsError::File {
                    path: cert.cert_path(),
                    reason: why,
                }
                .into());
            }
        }
        let server = tls::server_config_with(&cert, &peers, transport)?;
        let dial = Arc::new(transport::dial_transport_config_with(cfg.windows));
        let client = tls::client_config_with(&cert, &peers, dial)?;
        let endpoint = transport::endpoint(me.address, server, client).map_err(|source| {
            RouterError::Bind {
                addr: me.address,
                source,
            }
        })?;
        let (shutdown_tx, shutdown) = watch::channel(false);
        let metrics = Arc::new(metrics::Metrics::default());
        let keep_awake = match cfg.keep_awake {
            Some(c) => Some(
                keep_awake::KeepAwake::start(metrics.activity(), c.window, c.threads)
                    .map_err(RouterError::KeepAwake)?,
            ),
            None => None,
        };
        let max_clients = cfg
            .max_client_connections
            .unwrap_or_else(default_max_clients);
        let shared = Arc::new(Shared {
            node: cfg.node.clone(),
            probe: cfg.probe,
            hysteresis: cfg.hysteresis,
            max_tries: cfg.max_tries.max(1),
            backend_connect_timeout: cfg.backend_connect_timeout,
            header_timeout: cfg.header_timeout,
            peer_streams: cfg.peer_streams,
            reply_timeout: cfg.reply_timeout,
            idle_timeout: cfg.idle_timeout,
            write_stall_timeout: cfg.write_stall_timeout,
            replay_limit: cfg.replay_limit,
            max_clients,
            sources: edge::SourceCounts::new(
                cfg.max_client_connections_per_source.resolve(max_clients),
            ),
            endpoint,
            peers,
            cert: cert.clone(),
            extra_peer_names: cfg.extra_peer_names.clone(),
            dial_overrides: cfg.dial_overrides.clone(),
            snapshot: ArcSwap::new(first.clone()),
            graph: ArcSwap::from_pointee(topology::graph::Graph::new(&first.topology)),
            routes: ArcSwap::from_pointee(routes::Routes::default()),
            circuits: ArcSwap::from_pointee(circuits::CircuitTable::default()),
            vip_listeners: circuits::VipListeners::default(),
            handshakes: transport::HandshakeGate::new(transport::HandshakeGate::ROUTER),
            inbound: Default::default(),
            neighbours: ArcSwap::from_pointee(HashMap::new()),
            sites: ArcSwap::from_pointee(HashMap::new()),
            evidence: routes::Evidence::default(),
            changed: Notify::new(),
            rebuilt: Notify::new(),
            metrics,
            keep_awake,
            shutdown,
            drain_timeout: cfg.drain_timeout,
            started: Instant::now(),
            control: Default::default(),
        });
        // The metrics port (the one whose bind fails the start; the QUIC socket is bound
        // already) is bound before any task starts: a start that fails leaves nothing running
        // (a task spawned here and not handed back would serve on, detached).
        let metrics_listener = match cfg.metrics_addr {
            Some(addr) => Some(
                metrics::bind(addr)
                    .await
                    .map_err(|source| RouterError::MetricsBind { addr, source })?,
            ),
            None => None,
        };
        let mut tasks = Vec::new();
        // Apply the first snapshot synchronously so that routes and sites exist before return.
        // It binds the client listeners: one that cannot be bound (its port held by another
        // program, its address not on the host yet) is logged, counted
        // (`tasman_edge_listeners_unbound`) and tried again every second, as after the start; it
        // does not fail the start, which would keep every other service of the edge down, at
        // every restart, for as long as the snapshot names it.
        let mut control = routes::Control::new(shared.clone());
        control.apply_snapshot(first.clone());
        let control_task = tokio::spawn(control.run(cfg.snapshots));
        tasks.push(tokio::spawn(inbound::accept_loop(shared.clone())));
        let reload_task = cfg
            .cert_reload_interval
            .filter(|d| !d.is_zero())
            .map(|every| tokio::spawn(cert.clone().reload_every(every)));
        let mut metrics_task = None;
        if let Some(listener) = metrics_listener {
            let s = shared.clone();
            let report = Arc::new(move || {
                // One look at the router's state for both.
                let seen = s.observed();
                let json =
                    serde_json::to_string_pretty(&s.advertise(seen.clone())).unwrap_or_default();
                (s.render_metrics(&seen), json)
            });
            metrics_task = Some(tokio::spawn(metrics::serve(listener, report)));
        }
        if me.kind == topology::NodeKind::Edge {
            // What `auto` came to, so an operator need not work it out from the open-file limit.
            let per_source = cfg.max_client_connections_per_source.resolve(max_clients);
            tracing::info!(
                node = %cfg.node,
                max_client_connections = max_clients,
                max_client_connections_per_source = per_source.map_or("off".to_string(), |n| n.to_string()),
                "client connection caps"
            );
        }
        tracing::info!(node = %cfg.node, kind = %me.kind, addr = %me.address, "router started");
        Ok(RouterHandle {
            shared,
            shutdown_tx,
            tasks,
            control_task,
            metrics_task,
            reload_task,
        })
    }
}

impl RouterHandle {
    pub fn telemetry(&self) -> TelemetryReport {
        self.shared.telemetry()
    }
    /// This router's telemetry as the control client asks for it. It holds the router weakly:
    /// the client never keeps a router alive, and the handle stays owned (its `shutdown` needs
    /// no `Arc` unwrapping).
    pub fn telemetry_source(&self) -> control::client::TelemetrySource {
        let weak = Arc::downgrade(&self.shared);
        Arc::new(move || weak.upgrade().map(|s| s.telemetry()))
    }
    /// Client listeners (service and transparent) this edge could not bind and retries
    /// (`tasman_edge_listeners_unbound`).
    pub fn listeners_unbound(&self) -> u64 {
        self.shared
            .metrics
            .listeners_unbound
            .load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Prometheus text of this router's metrics.
    pub fn metrics_text(&self) -> String {
        self.shared.render_metrics(&self.shared.observed())
    }
    /// What this router presents in its handshakes (and reloads).
    pub fn cert(&self) -> Arc<tls::CertResolver> {
        self.shared.cert.clone()
    }
    /// The QUIC endpoint's bound address.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.shared.endpoint.local_addr().ok()
    }
    /// The current routing table (for tests, the demo and `path explain`-style output).
    pub fn routes(&self) -> Arc<routes::Routes> {
        self.shared.routes.load_full()
    }
    /// Starts draining (the first step of [`RouterHandle::shutdown_or`]) and returns at once:
    /// from here on the router takes no new stream and tells its neighbours so. Calling it again,
    /// or shutting down afterwards, is fine.
    pub fn begin_drain(&self) {
        let _ = self.shutdown_tx.send(true);
        self.shared
            .metrics
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // The accept loop refuses every new connection from here on (it sees the drain: a
        // neighbour that dials is told at once, and no handshake waits in quinn's queue, where
        // the handshake gate no longer bounds it; with the loop aborted, nothing answered them),
        // the control task closes the client listeners (it sees the drain) and applies no more
        // snapshots; streams in flight and the connections they use keep running, and so do the
        // tasks answering probes, the dialers probing the neighbours and the certificate reload.
        self.shared.vip_listeners.close_all();
    }

    /// Drains, then stops: see [`RouterHandle::shutdown_or`] (no early stop).
    pub async fn shutdown(self) -> Drain {
        self.shutdown_or(std::future::pending()).await
    }

    /// Drains, then stops. Draining: the edge's client listeners close, no new peer connection
    /// is accepted, a new stream is refused with `shutting_down` (an edge retries it on its next
    /// candidate), and every probe reply says that this node's links are down and its services
    /// unhealthy, so neighbours route new connections around it within a probe interval, without
    /// waiting for the controller. Open connections carry on, and are still probed and relayed.
    /// Once none is left, or after `drain_timeout`, or when `stop` resolves (a second signal),
    /// every QUIC connection is closed and what is still open is cut.
    pub async fn shutdown_or(self, stop: impl std::future::Future<Output = ()>) -> Drain {
        // The control task (dialers, health checks) ends with the drain, also when this future
        // is dropped before the drain ends.
        struct AbortOnDrop(tokio::task::AbortHandle);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _control = AbortOnDrop(self.control_task.abort_handle());
        self.begin_drain();
        let sh = &self.shared;
        let timeout = sh.drain_timeout;
        tracing::info!(node = %sh.node, open = sh.open_streams(), ?timeout, "draining");
        let began = tokio::time::Instant::now();
        let drained = async {
            while sh.open_streams() > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let drain = tokio::select! {
            () = drained => Drain::Emptied(began.elapsed()),
            _ = tokio::time::sleep(timeout) => {
                tracing::warn!(node = %sh.node, open = sh.open_streams(), ?timeout, "drain timeout: closing what is still open");
                Drain::TimedOut
            }
            () = stop => {
                tracing::warn!(node = %sh.node, open = sh.open_streams(), "stopping without waiting for the drain");
                Drain::Stopped
            }
        };
        self.control_task.abort();
        sh.vip_listeners.close_all();
        sh.endpoint
            .close(quinn::VarInt::from_u32(codes::close::NORMAL), b"shutdown");
        for t in &self.tasks {
            t.abort();
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), sh.endpoint.wait_idle()).await;
        for t in self.metrics_task.iter().chain(&self.reload_task) {
            t.abort();
        }
        if let Some(k) = &sh.keep_awake {
            k.stop();
        }
        tracing::info!(node = %self.shared.node, "router stopped");
        drain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Probe settings out of bounds are refused at start, naming the setting (a zero interval
    /// panicked every neighbour's dialer task, and the router ran on with no neighbour up).
    #[tokio::test]
    async fn probe_settings_out_of_bounds_are_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path()).unwrap();
        pki::issue(dir.path(), "edge").unwrap();
        let text = "version: 1\nnodes:\n\
             - {id: edge, kind: edge, region: r, country: AU, location: {lat: 0, lon: 0}, address: \"127.0.0.1:1\", client_address: \"127.0.0.1\"}\n\
             - {id: site, kind: site, region: r, country: AU, location: {lat: 0, lon: 0}, address: \"127.0.0.1:2\", serves: [{service: chat, backend: \"127.0.0.1:3\", capacity: 10}]}\n\
             links:\n\
             - {a: edge, b: site, latency: 1ms, capacity: 1Gbps}\n\
             services:\n\
             - {name: chat, port: 4}\n";
        let t = Arc::new(topology::load(text).expect("valid topology").topology);
        type Set = fn(&mut ProbeConfig);
        let bad: [(&str, Set); 6] = [
            ("interval", |p| p.interval = Duration::ZERO),
            ("interval", |p| p.interval = Duration::from_millis(5)),
            ("interval", |p| p.interval = Duration::from_secs(61)),
            ("misses", |p| p.misses = 0),
            ("misses", |p| p.misses = 101),
            ("hold-down", |p| p.hold_down = Duration::MAX),
        ];
        for (what, set) in bad {
            let (_tx, rx) = tokio::sync::watch::channel(Arc::new(Snapshot::new(1, t.clone())));
            let tls = tls::TlsIdentity::load(dir.path(), "edge").unwrap();
            let mut cfg = RouterConfig::new(topology::NodeId::new("edge"), tls, rx);
            set(&mut cfg.probe);
            match Router::spawn(cfg).await {
                Err(RouterError::Config(e)) => assert!(e.contains(what), "{what}: {e}"),
                Err(e) => panic!("{what}: {e}"),
                Ok(_) => panic!("{what}: started"),
            }
        }
        assert_eq!(ProbeConfig::default().check(), Ok(()));
    }

    /// A node whose certificate is another node's (its files copied in under this node's name)
    /// does not start, the error naming the file and both names; one from a CA outside the
    /// bundle starts (a reload takes a re-issued pair), with a warning. (Both started without a
    /// word, and every neighbour refused them.)
    #[tokio::test]
    async fn a_certificate_for_another_node_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path()).unwrap();
        pki::issue(dir.path(), "site").unwrap();
        for ext in ["pem", "key"] {
            std::fs::copy(
                dir.path().join(format!("site.{ext}")),
                dir.path().join(format!("edge.{ext}")),
            )
            .unwrap();
        }
        let quic = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let text = format!(
            "version: 1\nnodes:\n\
             - {{id: edge, kind: edge, region: r, country: AU, location: {{lat: 0, lon: 0}}, address: \"{quic}\", client_address: \"127.0.0.1\"}}\n\
             - {{id: site, kind: site, region: r, country: AU, location: {{lat: 0, lon: 0}}, address: \"127.0.0.1:2\", serves: [{{service: chat, backend: \"127.0.0.1:3\", capacity: 10}}]}}\n\
             links:\n\
             - {{a: edge, b: site, latency: 1ms, capacity: 1Gbps}}\n\
             services:\n\
             - {{name: chat, vips: [\"10.9.9.9:443\"]}}\n"
        );
        let t = Arc::new(topology::load(&text).expect("valid topology").topology);
        let spawn = || {
            let (_tx, rx) = tokio::sync::watch::channel(Arc::new(Snapshot::new(1, t.clone())));
            let tls = tls::TlsIdentity::load(dir.path(), "edge").unwrap();
            Router::spawn(RouterConfig::new(topology::NodeId::new("edge"), tls, rx))
        };
        match spawn().await {
            Err(e) => {
                let e = e.to_string();
                assert!(
                    e.contains("edge.pem") && e.contains("is for site, not for node edge"),
                    "{e}"
                );
            }
            Ok(_) => panic!("started with the site's certificate"),
        }
        // Another fabric's CA: refused by every neighbour, but fixed by a reload.
        let other = tempfile::tempdir().unwrap();
        pki::init(other.path()).unwrap();
        pki::issue(other.path(), "edge").unwrap();
        for ext in ["pem", "key"] {
            std::fs::copy(
                other.path().join(format!("edge.{ext}")),
                dir.path().join(format!("edge.{ext}")),
            )
            .unwrap();
        }
        let h = spawn().await.expect("starts, with a warning");
        h.shutdown().await;
    }

    /// A router whose start fails (here its metrics port is taken) leaves nothing running: its
    /// client listener and its QUIC socket are free again. (The control task and the QUIC accept
    /// loop were spawned before the metrics bind, and kept serving, detached.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_start_that_fails_leaves_nothing_running() {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path()).unwrap();
        pki::issue(dir.path(), "edge").unwrap();
        let local = std::net::Ipv4Addr::LOCALHOST;
        let free_udp = || {
            std::net::UdpSocket::bind((local, 0))
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let free_tcp = || {
            std::net::TcpListener::bind((local, 0))
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let (quic, client) = (free_udp(), free_tcp());
        let text = format!(
            "version: 1\nnodes:\n\
             - {{id: edge, kind: edge, region: r, country: AU, location: {{lat: 0, lon: 0}}, address: \"{quic}\", client_address: \"{local}\"}}\n\
             - {{id: site, kind: site, region: r, country: AU, location: {{lat: 0, lon: 0}}, address: \"{}\", serves: [{{service: chat, backend: \"{}\", capacity: 10}}]}}\n\
             links:\n\
             - {{a: edge, b: site, latency: 1ms, capacity: 1Gbps}}\n\
             services:\n\
             - {{name: chat, port: {}}}\n",
            free_udp(),
            free_tcp(),
            client.port()
        );
        let t = topology::load(&text).expect("valid topology").topology;
        let taken = std::net::TcpListener::bind((local, 0)).unwrap();
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(Snapshot::new(1, Arc::new(t))));
        let tls = tls::TlsIdentity::load(dir.path(), "edge").unwrap();
        let mut cfg = RouterConfig::new(topology::NodeId::new("edge"), tls, rx);
        cfg.metrics_addr = Some(taken.local_addr().unwrap());
        // Named as the metrics address's bind (it read as the node's own address's).
        match Router::spawn(cfg).await {
            Err(e @ RouterError::MetricsBind { .. }) => {
                assert!(e.to_string().contains("--metrics"), "{e}")
            }
            Err(e) => panic!("expected the metrics bind to fail, got {e}"),
            Ok(_) => panic!("expected the metrics bind to fail"),
        }
        // Whatever was started is let go within a moment (aborted tasks drop their sockets).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let refused = std::net::TcpStream::connect(client).is_err();
            let unbound = std::net::UdpSocket::bind(quic).is_ok();
            if refused && unbound {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "still running after a failed start: client port accepting {}, QUIC port bound {}",
                !refused,
                !unbound
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn the_auto_source_cap_is_a_quarter_of_the_overall_cap_at_least_64() {
        assert_eq!(SourceCap::Auto.resolve(1_048_320), Some(262_080));
        assert_eq!(SourceCap::Auto.resolve(65_280), Some(16_320));
        assert_eq!(SourceCap::Auto.resolve(256), Some(64));
        assert_eq!(SourceCap::Auto.resolve(64), Some(64));
        assert_eq!(
            SourceCap::Auto.resolve(3),
            Some(64),
            "above the overall cap: no harm"
        );
        assert_eq!(SourceCap::Off.resolve(1000), None);
        assert_eq!(SourceCap::At(3).resolve(1000), Some(3));
        assert_eq!(
            SourceCap::At(0).resolve(1000),
            Some(1),
            "never 0: no source served"
        );
    }
}
