//! Counters and the Prometheus `/metrics` endpoint.
//!
//! Counters are relaxed atomics bumped on the data path (one `fetch_add` per chunk, never a lock
//! or a format); the text is rendered only when scraped.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::codes::Code;
use crate::telemetry::TelemetryReport;

#[derive(Default)]
pub struct Metrics {
    /// Client (edge) or backend (site) streams open now, and since start.
    pub streams_active: AtomicU64,
    pub streams_total: AtomicU64,
    /// Streams relayed by this node as a transit.
    pub relayed_total: AtomicU64,
    /// Bytes from clients toward sites ("up") and back ("down"), counted where TCP meets QUIC.
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Client connections retried on another candidate.
    pub failovers_total: AtomicU64,
    /// Routing table rebuilds.
    pub table_rebuilds: AtomicU64,
    /// Neighbours declared down after missed probes.
    pub neighbour_down_total: AtomicU64,
    /// Incoming connections refused (certificate name not allowed).
    pub refused_peers_total: AtomicU64,
    errors: [AtomicU64; Code::ALL.len()],
}

impl Metrics {
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
        let node = &t.node;
        let counter = |s: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(
                s,
                "# HELP tasman_{name} {help}\n# TYPE tasman_{name} {kind}\ntasman_{name}{{node=\"{node}\"}} {v}"
            );
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
            "bytes_up_total",
            "Bytes from clients toward sites.",
            "counter",
            self.bytes_up.load(Relaxed),
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
            "failovers_total",
            "Client connections retried on another candidate.",
            "counter",
            self.failovers_total.load(Relaxed),
        );
        counter(
            &mut s,
            "table_rebuilds_total",
            "Routing table rebuilds.",
            "counter",
            self.table_rebuilds.load(Relaxed),
        );
        counter(
            &mut s,
            "neighbour_down_total",
            "Neighbours declared down after missed probes.",
            "counter",
            self.neighbour_down_total.load(Relaxed),
        );
        counter(
            &mut s,
            "refused_peers_total",
            "Peers refused for their certificate name.",
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
        let per_neighbour: [(&str, &str, &str, Value); 5] = [
            ("neighbour_up", "gauge", "Neighbour state (1 up).", |n| {
                f64::from(u8::from(n.up))
            }),
            (
                "neighbour_rtt_seconds",
                "gauge",
                "QUIC RTT to the neighbour.",
                |n| n.rtt_us as f64 / 1e6,
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
                "Packets the connection to the neighbour declared lost (resets with the connection).",
                |n| n.lost_packets as f64,
            ),
            (
                "neighbour_dial_failures_total",
                "counter",
                "Dial attempts to the neighbour that ended without a connection.",
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
        let _ = writeln!(
            s,
            "# HELP tasman_site_healthy Site service health (1 healthy).\n# TYPE tasman_site_healthy gauge"
        );
        for x in &t.sites {
            let _ = writeln!(
                s,
                "tasman_site_healthy{{node=\"{node}\",service=\"{}\"}} {}",
                x.service, x.healthy as u8
            );
            let _ = writeln!(
                s,
                "tasman_site_active_streams{{node=\"{node}\",service=\"{}\"}} {}",
                x.service, x.active_streams
            );
            let _ = writeln!(
                s,
                "tasman_site_capacity{{node=\"{node}\",service=\"{}\"}} {}",
                x.service, x.capacity
            );
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
        s
    }
}

/// Serves `GET /metrics` (and `/telemetry` as JSON) until the listener task is aborted.
pub async fn serve(
    listener: tokio::net::TcpListener,
    report: Arc<dyn Fn() -> (String, String) + Send + Sync>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let report = report.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (metrics, json) = report();
                async move {
                    let (status, ctype, body) = match req.uri().path() {
                        "/metrics" => (200, "text/plain; version=0.0.4", metrics),
                        "/telemetry" => (200, "application/json", json),
                        _ => (
                            404,
                            "text/plain",
                            "not found: try /metrics or /telemetry\n".to_string(),
                        ),
                    };
                    Response::builder()
                        .status(status)
                        .header("content-type", ctype)
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
