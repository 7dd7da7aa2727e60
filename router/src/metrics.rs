//! Counters and the Prometheus `/metrics` endpoint.
//!
//! Counters are relaxed atomics bumped on the data path (one `fetch_add` per chunk, never a lock
//! or a format); the text is rendered only when scraped.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response};

use crate::codes::Code;
use crate::http_serve::{
    self, BODY_READ_TIMEOUT, HEADER_READ_TIMEOUT, Limits, RequestBody, WRITE_TIMEOUT,
};
use crate::telemetry::TelemetryReport;

/// One unit of a gauge for as long as it lives.
pub(crate) struct Held<'a>(&'a AtomicU64);

impl<'a> Held<'a> {
    pub(crate) fn count(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Relaxed);
        Held(gauge)
    }
}

impl Drop for Held<'_> {
    /// Release: what the holder counted elsewhere before letting go (a stream counted active) is
    /// seen by whoever acquires this gauge's new value (`RouterHandle`'s drain).
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Release);
    }
}

#[derive(Default)]
pub struct Metrics {
    /// Client (edge) or backend (site) streams open now, and since start.
    pub streams_active: AtomicU64,
    pub streams_total: AtomicU64,
    /// Streams relayed by this node as a transit.
    pub relayed_total: AtomicU64,
    /// Streams a transit relays now.
    pub relays_active: AtomicU64,
    /// TCP connections whose answer went out whole, read and dropped until their peer has
    /// acknowledged it (`splice::linger`), now.
    pub lingering: AtomicU64,
    /// Client connections (edge) and streams (site) being set up now: from arrival until the
    /// site has its backend connection and the splice starts (`streams_active` from then on).
    pub streams_starting: AtomicU64,
    /// Set when the router starts draining ([`crate::RouterHandle::shutdown`]).
    pub draining: AtomicBool,
    /// Bytes from clients toward sites ("up") and back ("down"), counted where TCP meets QUIC.
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Bytes read from a TCP side and dropped, the far end having stopped taking them (an early
    /// answer at the edge, a client gone at the site): `splice::discard` and `splice::linger`.
    pub bytes_discarded: AtomicU64,
    /// Bytes a transit forwarded between neighbours, both ways.
    pub relayed_bytes: AtomicU64,
    /// Client connections retried on another candidate.
    pub failovers_total: AtomicU64,
    /// Routing table rebuilds.
    pub table_rebuilds: AtomicU64,
    /// Neighbours declared down after missed probes.
    pub neighbour_down_total: AtomicU64,
    /// Probe deadlines met late because this router stalled, which re-probed instead of
    /// judging the neighbour.
    pub probe_stalls_total: AtomicU64,
    /// Pings of neighbours left unanswered, past a connection's budget
    /// ([`crate::probe::PONG_BURST`]).
    pub pings_ignored_total: AtomicU64,
    /// Connections of a peer closed because it opened a newer one past
    /// [`crate::inbound::MAX_CONNECTIONS_PER_PEER`].
    pub peer_connections_superseded_total: AtomicU64,
    /// Incoming connections closed because nothing came on them for
    /// [`crate::inbound::PEER_SILENCE`] (`peer_silent`).
    pub peer_connections_silent_total: AtomicU64,
    /// Incoming connections refused: every failed handshake (a refused certificate, but also
    /// a timeout or a protocol error), a certificate name that is not a node of the topology,
    /// and a connection closed because a snapshot removed its peer.
    pub refused_peers_total: AtomicU64,
    /// Client listeners (service ports and the transparent port) the snapshot asks for that
    /// could not be bound; tried again every second ([`crate::edge::Listeners`]).
    pub listeners_unbound: AtomicU64,
    /// Incoming handshakes sent a Retry (address validation) or refused because too many were
    /// in progress ([`crate::transport::HandshakeGate`]).
    pub handshakes_retried: AtomicU64,
    /// An edge's client connections open now (accepted, not yet ended), those refused
    /// because `--max-client-connections` were open, and those refused because
    /// `--max-client-connections-per-source` were open from their source.
    pub clients_open: AtomicU64,
    pub clients_over_cap: AtomicU64,
    pub clients_over_source_cap: AtomicU64,
    pub handshakes_refused: AtomicU64,
    errors: [AtomicU64; Code::ALL.len()],
}

/// Writes one series labelled only with `node` (`name` in full), with its HELP and TYPE lines.
pub fn series(
    s: &mut String,
    node: &str,
    name: &str,
    kind: &str,
    help: &str,
    value: impl std::fmt::Display,
) {
    let _ = writeln!(
        s,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{node=\"{node}\"}} {value}"
    );
}

impl Metrics {
    /// A value that changes whenever bytes move through the router (edge, site or transit):
    /// what the keep-awake spinners watch.
    pub fn activity(self: &Arc<Self>) -> crate::keep_awake::Activity {
        let m = self.clone();
        Arc::new(move || {
            m.bytes_up
                .load(Relaxed)
                .wrapping_add(m.bytes_down.load(Relaxed))
                .wrapping_add(m.relayed_bytes.load(Relaxed))
        })
    }

    /// Counts a handshake the gate turned away.
    pub fn handshake_turned(&self, turned: crate::transport::Turned) {
        match turned {
            crate::transport::Turned::Retried => &self.handshakes_retried,
            crate::transport::Turned::Refused => &self.handshakes_refused,
        }
        .fetch_add(1, Relaxed);
    }

    pub fn error(&self, code: Code) {
        if let Some(i) = Code::ALL.iter().position(|c| *c == code) {
            self.errors[i].fetch_add(1, Relaxed);
        }
    }
    pub fn errors(&self, code: Code) -> u64 {
        Code::ALL
            .iter()
            .position(|c| *c == code)
            .map_or(0, |i| self.errors[i].load(Relaxed))
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self, t: &TelemetryReport, routes: &crate::routes::Routes) -> String {
        let mut s = String::with_capacity(4096);
        let node = t.node.as_str();
        let counter = |s: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            series(s, node, &format!("tasman_{name}"), kind, help, v);
        };
        counter(
            &mut s,
            "streams_active",
            "Proxied client/backend streams open now.",
            "gauge",
            self.streams_active.load(Relaxed),
        );
        counter(
            &mut s,
            "edge_clients_open",
            "An edge's client connections open now, from accept to their end.",
            "gauge",
            self.clients_open.load(Relaxed),
        );
        counter(
            &mut s,
            "edge_clients_over_cap_total",
            "Client connections an edge reset at once because --max-client-connections were open, or because it was out of file descriptors.",
            "counter",
            self.clients_over_cap.load(Relaxed),
        );
        counter(
            &mut s,
            "edge_clients_over_source_cap_total",
            "Client connections an edge reset at once because --max-client-connections-per-source were open from their source (an IPv4 address, an IPv6 /64).",
            "counter",
            self.clients_over_source_cap.load(Relaxed),
        );
        counter(
            &mut s,
            "handshakes_retried_total",
            "Incoming QUIC handshakes sent a Retry to prove their address first (more than 64 in progress).",
            "counter",
            self.handshakes_retried.load(Relaxed),
        );
        counter(
            &mut s,
            "handshakes_refused_total",
            "Incoming QUIC handshakes refused: 1,024 were in progress.",
            "counter",
            self.handshakes_refused.load(Relaxed),
        );
        counter(
            &mut s,
            "edge_listeners_unbound",
            "Client listeners (service ports, transparent port) the snapshot asks for that could not be bound; tried again every second.",
            "gauge",
            self.listeners_unbound.load(Relaxed),
        );
        counter(
            &mut s,
            "streams_total",
            "Proxied client/backend streams since start.",
            "counter",
            self.streams_total.load(Relaxed),
        );
        counter(
            &mut s,
            "relayed_streams_total",
            "Streams relayed as a transit.",
            "counter",
            self.relayed_total.load(Relaxed),
        );
        counter(
            &mut s,
            "relayed_streams_active",
            "Streams relayed as a transit now.",
            "gauge",
            self.relays_active.load(Relaxed),
        );
        counter(
            &mut s,
            "tcp_lingering",
            "TCP connections whose answer went out whole, waiting for the peer to acknowledge it before they close.",
            "gauge",
            self.lingering.load(Relaxed),
        );
        counter(
            &mut s,
            "streams_starting",
            "Client connections (edge) or streams (site) being set up now, before the site accepted; streams a transit is handing on to its next hop.",
            "gauge",
            self.streams_starting.load(Relaxed),
        );
        counter(
            &mut s,
            "router_draining",
            "1 while the router drains before it stops: it takes no new stream, open ones finish.",
            "gauge",
            u64::from(self.draining.load(Relaxed)),
        );
        counter(
            &mut s,
            "bytes_up_total",
            "Bytes from clients toward sites.",
            "counter",
            self.bytes_up.load(Relaxed),
        );
        counter(
            &mut s,
            "bytes_discarded_total",
            "Bytes read from a client (edge) or backend (site) and dropped: the far end had stopped taking them (an early answer at the edge, a client gone at the site).",
            "counter",
            self.bytes_discarded.load(Relaxed),
        );
        counter(
            &mut s,
            "bytes_down_total",
            "Bytes from sites toward clients.",
            "counter",
            self.bytes_down.load(Relaxed),
        );
        counter(
            &mut s,
            "relayed_bytes_total",
            "Bytes a transit forwarded between neighbours, both ways.",
            "counter",
            self.relayed_bytes.load(Relaxed),
        );
        counter(
            &mut s,
            "failovers_total",
            "Client connections retried on another candidate (once each, however many candidates one moves past).",
            "counter",
            self.failovers_total.load(Relaxed),
        );
        counter(
            &mut s,
            "table_rebuilds_total",
            "Routing table rebuilds: at each new snapshot or local evidence, and at least every second (routers without a table included).",
            "counter",
            self.table_rebuilds.load(Relaxed),
        );
        counter(
            &mut s,
            "neighbour_down_total",
            "Neighbours declared down: after missed probes, or when their connection ended while up.",
            "counter",
            self.neighbour_down_total.load(Relaxed),
        );
        counter(
            &mut s,
            "probe_stalls_total",
            "Probe deadlines met more than a probe timeout late (this router was not running: starved of CPU or paused), which probed again instead of judging the neighbour.",
            "counter",
            self.probe_stalls_total.load(Relaxed),
        );
        counter(
            &mut s,
            "peer_connections_superseded_total",
            "Incoming connections closed because their peer (the same node name) opened a newer one past the cap of 4 at once.",
            "counter",
            self.peer_connections_superseded_total.load(Relaxed),
        );
        counter(
            &mut s,
            "peer_connections_silent_total",
            "Incoming connections of neighbours closed because nothing came on them for 3 s (the neighbour crashed or its path is cut): the streams it opened end then, not at the 10 s idle timeout.",
            "counter",
            self.peer_connections_silent_total.load(Relaxed),
        );
        counter(
            &mut s,
            "pings_ignored_total",
            "Pings of neighbours left unanswered: past a connection's budget of 32 at once and 250 a second.",
            "counter",
            self.pings_ignored_total.load(Relaxed),
        );
        counter(
            &mut s,
            "refused_peers_total",
            "Incoming connections refused: a failed handshake (a certificate refused, among others), a certificate name not in the topology, or a peer a snapshot removed.",
            "counter",
            self.refused_peers_total.load(Relaxed),
        );
        counter(
            &mut s,
            "snapshot_version",
            "Applied snapshot version.",
            "gauge",
            t.snapshot_version,
        );
        let _ = writeln!(
            s,
            "# HELP tasman_stream_errors_total Stream resets by code.\n# TYPE tasman_stream_errors_total counter"
        );
        for (i, c) in Code::ALL.iter().enumerate() {
            let v = self.errors[i].load(Relaxed);
            if v > 0 {
                let _ = writeln!(
                    s,
                    "tasman_stream_errors_total{{node=\"{node}\",code=\"{}\"}} {v}",
                    c.name()
                );
            }
        }
        // One gauge or counter per neighbour: (name, type, help, value).
        type Value = fn(&crate::telemetry::NeighbourReport) -> f64;
        let per_neighbour: [(&str, &str, &str, Value); 6] = [
            ("neighbour_up", "gauge", "Neighbour state (1 up).", |n| {
                f64::from(u8::from(n.up))
            }),
            (
                "neighbour_rtt_seconds",
                "gauge",
                "RTT to the neighbour as this router measures it: the lowest of the last 10 s (routing takes the larger of both ends' figures for the link, at least its declared latency).",
                |n| n.rtt_us as f64 / 1e6,
            ),
            (
                "neighbour_srtt_seconds",
                "gauge",
                "QUIC smoothed RTT of the connection to the neighbour, queueing included.",
                |n| n.srtt_us as f64 / 1e6,
            ),
            (
                "neighbour_path_mtu_bytes",
                "gauge",
                "Largest UDP payload confirmed to the neighbour (0: no connection).",
                |n| f64::from(n.path_mtu),
            ),
            (
                "neighbour_lost_packets_total",
                "counter",
                "Packets QUIC declared lost to the neighbour since the router started (its connections summed, those it dialled and those the neighbour dialled).",
                |n| n.lost_packets as f64,
            ),
            (
                "neighbour_dial_failures_total",
                "counter",
                "Dial attempts to the neighbour that ended without a usable connection (none, or one closed before it answered a probe).",
                |n| n.dial_failures as f64,
            ),
        ];
        for (name, kind, help, value) in per_neighbour {
            let _ = writeln!(
                s,
                "# HELP tasman_{name} {help}\n# TYPE tasman_{name} {kind}"
            );
            for n in &t.neighbours {
                let _ = writeln!(
                    s,
                    "tasman_{name}{{node=\"{node}\",neighbour=\"{}\"}} {}",
                    n.id,
                    value(n)
                );
            }
        }
        // One gauge per service this site serves, each family a group of its own with its HELP
        // and TYPE lines (the text format wants a family's lines together).
        type SiteValue = fn(&crate::telemetry::SiteReport) -> u64;
        let per_site: [(&str, &str, SiteValue); 3] = [
            ("site_healthy", "Site service health (1 healthy).", |x| {
                u64::from(x.healthy)
            }),
            (
                "site_active_streams",
                "Streams holding one of the service's capacity slots at the site now.",
                |x| u64::from(x.active_streams),
            ),
            (
                "site_capacity",
                "Concurrent streams the service's backend accepts (its serves entry's capacity).",
                |x| u64::from(x.capacity),
            ),
        ];
        for (name, help, value) in per_site {
            let _ = writeln!(s, "# HELP tasman_{name} {help}\n# TYPE tasman_{name} gauge");
            for x in &t.sites {
                let _ = writeln!(
                    s,
                    "tasman_{name}{{node=\"{node}\",service=\"{}\"}} {}",
                    x.service,
                    value(x)
                );
            }
        }
        let counts = routes.candidate_counts();
        if !counts.is_empty() {
            let _ = writeln!(
                s,
                "# HELP tasman_service_candidates Sites the edge's routing table holds for the service (the first is in use, the others are its failover order).
# TYPE tasman_service_candidates gauge"
            );
        }
        for (service, n) in counts {
            let _ = writeln!(
                s,
                "tasman_service_candidates{{node=\"{node}\",service=\"{service}\"}} {n}"
            );
        }
        let shares = routes.shares();
        if !shares.is_empty() {
            let _ = writeln!(
                s,
                "# HELP tasman_service_site_share Expected share of the service's new connections the edge tries first at the site (the equally near sites by weight, then traffic dials).
# TYPE tasman_service_site_share gauge"
            );
        }
        for (service, members) in shares {
            for (site, share) in members {
                let _ = writeln!(
                    s,
                    "tasman_service_site_share{{node=\"{node}\",service=\"{service}\",site=\"{site}\"}} {share}"
                );
            }
        }
        s
    }
}

/// Metrics connections served at once; more wait in the listen backlog. A scraper needs one or
/// two; the cap keeps clients that connect and stall from taking descriptors the data path needs.
pub const LIMITS: Limits = Limits {
    header_read_timeout: HEADER_READ_TIMEOUT,
    body_read_timeout: BODY_READ_TIMEOUT,
    write_timeout: WRITE_TIMEOUT,
    max_connections: 64,
    max_per_source: 16,
};

/// The text of a scrape: (Prometheus text, telemetry JSON).
pub type Report = Arc<dyn Fn() -> (String, String) + Send + Sync>;

/// The Prometheus text of a scrape, for a node that serves no telemetry page (the controller).
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The content type of Prometheus text exposition 0.0.4.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

/// Serves `GET /metrics` (and `/telemetry` as JSON) within [`LIMITS`] until the listener task is
/// aborted.
pub async fn serve(listener: tokio::net::TcpListener, report: Report) {
    serve_with(listener, Pages::WithTelemetry(report), LIMITS).await
}

/// Serves `GET /metrics` alone within [`LIMITS`] until the listener task is aborted: the
/// controller's endpoint, on the router's accept loop and limits.
pub async fn serve_metrics(listener: tokio::net::TcpListener, render: Render) {
    serve_with(listener, Pages::MetricsOnly(render), LIMITS).await
}

/// Renders of the controller's page in flight at once, whoever still waits for them: a
/// render handed to the blocking pool runs to its end even if its scraper hung up.
const MAX_RENDERS: usize = 2;

/// What a metrics listener serves; a page is rendered only when it is asked for.
#[derive(Clone)]
enum Pages {
    WithTelemetry(Report),
    MetricsOnly(Render),
}

impl Pages {
    /// The content type and body at `path`; None: not found.
    fn page(&self, path: &str) -> Option<(&'static str, String)> {
        match (path, self) {
            ("/metrics", Pages::WithTelemetry(report)) => Some((PROMETHEUS_TEXT, report().0)),
            ("/metrics", Pages::MetricsOnly(render)) => Some((PROMETHEUS_TEXT, render())),
            ("/telemetry", Pages::WithTelemetry(report)) => Some(("application/json", report().1)),
            _ => None,
        }
    }

    fn not_found(&self) -> &'static str {
        match self {
            Pages::WithTelemetry(_) => "not found: try /metrics or /telemetry\n",
            Pages::MetricsOnly(_) => "not found: try /metrics\n",
        }
    }
}

async fn serve_with(listener: tokio::net::TcpListener, pages: Pages, limits: Limits) {
    // No route reads a body: hyper closes a connection whose request body is left unread.
    let renders = Arc::new(tokio::sync::Semaphore::new(MAX_RENDERS));
    let svc = service_fn(move |req: Request<RequestBody>| {
        let (pages, path) = (pages.clone(), req.uri().path().to_string());
        let renders = renders.clone();
        async move {
            let page = match &pages {
                // The controller's page reads its store: off the runtime's workers, and at
                // most `MAX_RENDERS` at once (the permit goes with the job, which outlives a
                // scraper that hangs up; one that hangs up while waiting takes no turn).
                Pages::MetricsOnly(_) => {
                    let p = pages.clone();
                    match renders.acquire_owned().await {
                        Ok(turn) => tokio::task::spawn_blocking(move || {
                            let _turn = turn;
                            p.page(&path)
                        })
                        .await
                        .map_err(|e| e.to_string()),
                        Err(closed) => Err(closed.to_string()),
                    }
                }
                Pages::WithTelemetry(_) => Ok(pages.page(&path)),
            };
            let (status, ctype, body) = match page {
                Ok(Some((ctype, body))) => (200, ctype, body),
                Ok(None) => (404, "text/plain", pages.not_found().to_string()),
                Err(e) => {
                    tracing::error!("metrics page failed: {e}");
                    (500, "text/plain", "internal error\n".to_string())
                }
            };
            Response::builder()
                .status(status)
                .header("content-type", ctype)
                .body(Full::new(Bytes::from(body)))
        }
    });
    http_serve::serve(listener, "metrics", limits, svc).await
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn report() -> Report {
        Arc::new(|| ("tasman_up 1\n".to_string(), "{}".to_string()))
    }

    async fn start(header_read_timeout: Duration, max_connections: usize) -> SocketAddr {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            header_read_timeout,
            max_connections,
            max_per_source: max_connections,
            ..LIMITS
        };
        tokio::spawn(serve_with(listener, Pages::WithTelemetry(report()), limits));
        addr
    }

    /// Sends one `GET /metrics` (connection: close) and returns the whole response.
    async fn scrape(c: &mut TcpStream) -> std::io::Result<String> {
        c.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await?;
        let mut back = String::new();
        c.read_to_string(&mut back).await?;
        Ok(back)
    }

    /// Reads until the server closes the connection; fails if it is still open after `within`.
    async fn closed_within(c: &mut TcpStream, within: Duration) {
        let mut buf = [0u8; 512];
        let end = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(end.into(), c.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return,
                Ok(Ok(_)) => {}
                Err(_) => panic!("connection still open after {within:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_client_that_sends_no_request_or_stalls_in_its_headers_is_closed() {
        let timeout = Duration::from_millis(300);
        let addr = start(timeout, 8).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled
            .write_all(b"GET /metrics HTTP/1.1\r\nho")
            .await
            .unwrap();
        let mut kept_alive = TcpStream::connect(addr).await.unwrap();
        kept_alive
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 15];
        kept_alive.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200 OK");
        let started = Instant::now();
        for c in [&mut silent, &mut stalled, &mut kept_alive] {
            closed_within(c, Duration::from_secs(10)).await;
        }
        assert!(started.elapsed() >= timeout / 2);
        // A scrape that sends its request goes through.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let back = scrape(&mut c).await.unwrap();
        assert!(back.contains("tasman_up 1"), "{back}");
    }

    /// GET `path` with `connection: close`; the whole response.
    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut back = String::new();
        c.read_to_string(&mut back).await.unwrap();
        back
    }

    #[tokio::test]
    async fn a_metrics_only_listener_serves_prometheus_text_and_no_telemetry() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_metrics(
            listener,
            Arc::new(|| "tasman_up 1\n".to_string()),
        ));
        let back = get(addr, "/metrics").await;
        assert!(back.starts_with("HTTP/1.1 200"), "{back}");
        assert!(
            back.contains("content-type: text/plain; version=0.0.4"),
            "{back}"
        );
        assert!(back.ends_with("tasman_up 1\n"), "{back}");
        let back = get(addr, "/telemetry").await;
        assert!(back.starts_with("HTTP/1.1 404"), "{back}");
        assert!(back.ends_with("not found: try /metrics\n"), "{back}");
    }

    /// The controller's page reads its store (every circuit): rendered off the runtime's
    /// workers, a slow read does not stop the other tasks of a one-thread runtime (a control
    /// session's heartbeats, say). It was rendered on the worker, which it held for as long.
    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_metrics_only_page_does_not_hold_the_runtime() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_metrics(
            listener,
            Arc::new(|| {
                std::thread::sleep(Duration::from_millis(1500));
                "tasman_up 1\n".to_string()
            }),
        ));
        let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let t = ticks.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(50));
            loop {
                every.tick().await;
                t.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let before = ticks.load(std::sync::atomic::Ordering::Relaxed);
        let back = get(addr, "/metrics").await;
        assert!(back.ends_with("tasman_up 1\n"), "{back}");
        let during = ticks.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert!(
            during >= 10,
            "only {during} ticks of 50 ms during a 1.5 s page"
        );
    }

    /// A scraper that hangs up right after its request gives its connection slot back at once,
    /// but a page already handed to the blocking pool cannot be cancelled: a loop of
    /// connect, GET, close (no token needed) ran a render (a read of every circuit) per
    /// connection, all at once, up to the blocking pool's 512 threads, while the admin API's
    /// reads queued behind them. Renders in flight are now bounded, whoever is still waiting.
    #[tokio::test]
    async fn scrapes_that_hang_up_do_not_pile_up_renders() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let (running, peak, done) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (r, p, d) = (running.clone(), peak.clone(), done.clone());
        let render: Render = Arc::new(move || {
            let now = r.fetch_add(1, SeqCst) + 1;
            p.fetch_max(now, SeqCst);
            std::thread::sleep(Duration::from_millis(300));
            r.fetch_sub(1, SeqCst);
            d.fetch_add(1, SeqCst);
            "tasman_up 1\n".to_string()
        });
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_connections: 4,
            max_per_source: 4,
            ..LIMITS
        };
        tokio::spawn(serve_with(listener, Pages::MetricsOnly(render), limits));
        for _ in 0..40 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            // Wait until the server has the request (its render started or waits), then go.
            tokio::time::sleep(Duration::from_millis(5)).await;
            drop(c);
        }
        // A scrape that waits for its page still gets it.
        let back = get(addr, "/metrics").await;
        assert!(back.ends_with("tasman_up 1\n"), "{back}");
        // At the bound, not past it (below it, the scrapes would not have tested it).
        assert_eq!(
            peak.load(SeqCst),
            MAX_RENDERS,
            "renders at once ({} in all)",
            done.load(SeqCst)
        );
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_for_a_free_slot() {
        let addr = start(Duration::from_secs(60), 2).await;
        let mut held: Vec<TcpStream> = Vec::new();
        for _ in 0..2 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        // The listener takes no third connection while two are served: it waits in the backlog.
        let mut third = TcpStream::connect(addr).await.unwrap();
        let scraping = tokio::spawn(async move { scrape(&mut third).await });
        let waited = tokio::time::timeout(Duration::from_millis(500), async {
            while !scraping.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            waited.is_err(),
            "a third connection was served beyond the cap"
        );
        held.pop();
        let back = tokio::time::timeout(Duration::from_secs(10), scraping)
            .await
            .expect("served once a slot was free")
            .unwrap()
            .unwrap();
        assert!(back.contains("tasman_up 1"), "{back}");
    }

    /// Descriptors exhausted: accept fails with EMFILE for as long as a client waits in the
    /// backlog. The loop must pause between tries, not spin. Runs in a child process (this test
    /// binary again), since the descriptor limit is process-wide.
    #[test]
    fn accept_errors_back_off_instead_of_spinning() {
        const CHILD: &str = "TASMAN_TEST_METRICS_EMFILE_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "metrics::tests::accept_errors_back_off_instead_of_spinning",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD, "1")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
            // A child that matched no test (this one renamed or moved) also succeeds.
            assert!(
                stdout.contains("test result: ok. 1 passed;"),
                "the child did not run exactly this test:\n{stdout}\n{stderr}"
            );
            return;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let waiting = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            exhaust_descriptors();
            let limits = Limits {
                max_connections: 8,
                max_per_source: 8,
                ..LIMITS
            };
            let server = tokio::spawn(serve_with(listener, Pages::WithTelemetry(report()), limits));
            let cpu0 = cpu_time();
            let window = Duration::from_secs(1);
            tokio::time::sleep(window).await;
            let busy = cpu_time() - cpu0;
            assert!(
                busy < window / 10,
                "{busy:?} of CPU in {window:?} retrying a failing accept"
            );
            // Quiet because it waits between tries, not because it gave up.
            assert!(
                !server.is_finished(),
                "the server stopped at a failed accept"
            );
            drop(waiting);
        });
    }

    /// Lowers the soft descriptor limit to just above the descriptors open, then takes the rest.
    fn exhaust_descriptors() {
        let highest = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .max()
            .unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain syscalls on a local struct.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
            lim.rlim_cur = highest + 8;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
        let mut taken = Vec::new();
        loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) => taken.push(f),
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{e}");
                    break;
                }
            }
        }
        std::mem::forget(taken);
    }

    /// CPU time this process has used (user + system).
    fn cpu_time() -> Duration {
        // SAFETY: getrusage fills the struct it is given.
        let ru = unsafe {
            let mut ru: libc::rusage = std::mem::zeroed();
            assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut ru), 0);
            ru
        };
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }
}
