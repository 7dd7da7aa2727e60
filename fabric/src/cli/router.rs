//! `tasman router`: run one node of the fabric in the role its kind in the topology gives.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use router::{ProbeConfig, Router, RouterConfig, RouterHandle, Snapshot};
use topology::{Latency, NodeId};

#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Examples:\n  tasman pki init --dir pki && tasman pki issue syd-edge-1 --dir pki\n  \
tasman router --topology examples/apac.yaml --node syd-edge-1 --tls-dir pki --metrics 127.0.0.1:9100\n  \
tasman router --topology t.yaml --node syd-edge-1 --dial syd-transit-1=127.0.0.1:17001\n  \
tasman router --controller 10.0.0.1:7400 --node syd-edge-1 --tls-dir pki --state-dir /var/lib/tasman-router\n\n\
With --controller the topology comes from the controller (versioned snapshots, acknowledged);\n\
the last good snapshot is kept in --state-dir and used after a restart while the controller is\n\
unreachable. Past --max-stale without word from the controller the router logs STALE SNAPSHOT\n\
(and keeps forwarding)."
)]
pub struct RouterArgs {
    /// Topology YAML file (file mode).
    #[arg(
        long,
        required_unless_present = "controller",
        conflicts_with = "controller"
    )]
    pub topology: Option<PathBuf>,
    /// The controller's QUIC address (controller mode).
    #[arg(long)]
    pub controller: Option<SocketAddr>,
    /// Controller mode: where the last good snapshot is kept.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Controller mode: say so loudly after this long without word from the controller
    /// (e.g. 24h, 90m, 600s).
    #[arg(long, default_value = "24h", value_parser = parse_stale)]
    pub max_stale: std::time::Duration,
    /// This node's id in the topology (also its certificate name).
    #[arg(long)]
    pub node: String,
    /// Directory with ca.pem, NODE.pem and NODE.key (see `tasman pki`).
    #[arg(long, default_value = "pki")]
    pub tls_dir: PathBuf,
    /// Serve Prometheus /metrics (and /telemetry JSON) on this address.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Probe interval per neighbour.
    #[arg(long, default_value = "100ms")]
    pub probe_interval: Latency,
    /// Missed probes in a row before a neighbour is declared down (a missed probe is re-sent at once).
    #[arg(long, default_value_t = 3)]
    pub probe_misses: u32,
    /// Minimum time a neighbour or site stays down before it is used again.
    #[arg(long, default_value = "1s")]
    pub hold_down: Latency,
    /// Reset a proxied connection on which no byte moved either way for this long (the client
    /// and the backend get a TCP reset; the site frees its capacity slot). A duration
    /// (e.g. 1h, 30m, 340s, 1h 30m); `off` or 0 never times out.
    #[arg(long, default_value = "1h", value_parser = parse_duration_or_off, value_name = "DURATION")]
    pub idle_timeout: std::time::Duration,
    /// On SIGTERM or Ctrl-C, let open connections finish for up to this long before closing
    /// them (new ones go to other sites at once; a second signal stops without waiting). A
    /// duration (e.g. 30s, 10m); 0 does not wait.
    #[arg(long, default_value = "30s", value_parser = parse_long_duration, value_name = "DURATION")]
    pub drain_timeout: std::time::Duration,
    /// Trade CPU for latency: while bytes moved through this router within DURATION, keep cores
    /// out of their idle halt with spinning threads at the kernel's idle priority (they take no
    /// CPU from real work, but the cores show busy). Lowers the latency each request through
    /// the router sees on hosts whose idle cores are slow to wake (virtual machines, deep power
    /// states); see the operator guide. A duration (e.g. 2ms, 1s); `off` or 0: off.
    #[arg(long, default_value = "off", value_parser = parse_duration_or_off, value_name = "DURATION")]
    pub keep_awake: std::time::Duration,
    /// Spinning threads for --keep-awake.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub keep_awake_threads: u16,
    /// Runtime worker threads (default: one per core). On a host whose few cores are shared with
    /// other busy processes, 1 spares the hand-offs between the router's threads (more
    /// throughput per stream there; see the operator guide); a router alone on many cores
    /// should keep the default.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// Dial neighbour NODE at ADDR instead of its topology address (e.g. a link emulator).
    #[arg(long = "dial", value_name = "NODE=ADDR", value_parser = parse_dial)]
    pub dial: Vec<(String, SocketAddr)>,
}

/// A duration for the flags that go past the topology's latencies (those stop at 60 s):
/// `humantime` syntax, e.g. 24h, 90m, 340s, 500ms, 1h 30m.
fn parse_long_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?}: {e} (expected e.g. 24h, 90m, 340s or 500ms)"))
}

/// `--max-stale`: a duration greater than zero.
fn parse_stale(s: &str) -> Result<std::time::Duration, String> {
    match parse_long_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?} must be greater than zero")),
        d => Ok(d),
    }
}

/// `--idle-timeout`, `--keep-awake`: a duration; `off` or zero is `Duration::ZERO` (none).
fn parse_duration_or_off(s: &str) -> Result<std::time::Duration, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(std::time::Duration::ZERO);
    }
    parse_long_duration(s)
}

fn parse_dial(s: &str) -> Result<(String, SocketAddr), String> {
    let (n, a) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NODE=ADDR"))?;
    let addr = a.parse().map_err(|e| format!("{a:?}: {e}"))?;
    Ok((n.to_string(), addr))
}

/// Loads and validates a topology file, printing diagnostics. Exit code on failure: 2 when the
/// file cannot be read, 1 when it is invalid.
pub fn load_topology(path: &std::path::Path) -> Result<topology::Topology, ExitCode> {
    super::topology::load_or_report(path).map(|l| l.topology)
}

impl RouterArgs {
    /// The router's tokio runtime (`--worker-threads`).
    fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = self.worker_threads {
            b.worker_threads(usize::from(n));
        }
        b.enable_all().build()
    }

    /// The router configuration for these arguments, fed by `snapshots`. (Controller mode builds
    /// the same config with a different snapshot source.)
    pub fn config(
        &self,
        snapshots: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    ) -> Result<RouterConfig, ExitCode> {
        let tls = router::tls::TlsIdentity::load(&self.tls_dir, &self.node).map_err(|e| {
            eprintln!(
                "error: {e} (make certificates with `tasman pki init` and `tasman pki issue {}`)",
                self.node
            );
            ExitCode::from(2)
        })?;
        let mut cfg = RouterConfig::new(NodeId::new(&self.node), tls, snapshots);
        cfg.metrics_addr = self.metrics;
        cfg.probe = ProbeConfig {
            interval: self.probe_interval.as_duration(),
            misses: self.probe_misses.max(1),
            hold_down: self.hold_down.as_duration(),
        };
        cfg.idle_timeout = Some(self.idle_timeout).filter(|t| !t.is_zero());
        cfg.drain_timeout = self.drain_timeout;
        cfg.keep_awake = (!self.keep_awake.is_zero()).then_some(router::keep_awake::Config {
            window: self.keep_awake,
            threads: usize::from(self.keep_awake_threads),
        });
        cfg.dial_overrides = self
            .dial
            .iter()
            .map(|(n, a)| (NodeId::new(n), *a))
            .collect::<HashMap<_, _>>();
        Ok(cfg)
    }
}

pub fn run(args: RouterArgs) -> ExitCode {
    super::init_tracing();
    if let Some(controller) = args.controller {
        return run_with_controller(&args, controller);
    }
    let Some(topology_file) = args.topology.clone() else {
        eprintln!("error: give --topology FILE or --controller ADDR");
        return ExitCode::from(2);
    };
    let topo = match load_topology(&topology_file) {
        Ok(t) => t,
        Err(code) => return code,
    };
    if topo.node(&args.node).is_none() {
        eprintln!(
            "error: node {:?} is not in {}",
            args.node,
            topology_file.display()
        );
        return ExitCode::from(1);
    }
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(Snapshot::new(1, Arc::new(topo))));
    let cfg = match args.config(rx) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let rt = match args.runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        let handle = match Router::spawn(cfg).await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        };
        if let Some(addr) = handle.quic_addr() {
            println!("router {} listening on {addr}", args.node);
        }
        drain_on_signal(handle).await;
        ExitCode::SUCCESS
    })
}

/// Controller mode: the control client feeds the router's snapshots and ships its telemetry.
fn run_with_controller(args: &RouterArgs, controller: SocketAddr) -> ExitCode {
    let tls = match router::tls::TlsIdentity::load(&args.tls_dir, &args.node) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match args.runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        // One resolver for the control connection and the router: a reloaded certificate is
        // presented on both.
        let cert = match router::tls::CertResolver::new(&tls) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        let mut ccfg = router::control::ClientConfig::new(controller, NodeId::new(&args.node), tls);
        ccfg.cert = Some(cert.clone());
        ccfg.state_dir = args.state_dir.clone();
        ccfg.max_stale = args.max_stale;
        let client = match router::control::ControlClient::start(ccfg).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        };
        let mut cfg = match args.config(client.snapshots()) {
            Ok(c) => c,
            Err(code) => return code,
        };
        cfg.cert_resolver = Some(cert);
        let handle = match Router::spawn(cfg).await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        };
        client.set_telemetry(handle.telemetry_source());
        if let Some(addr) = handle.quic_addr() {
            println!(
                "router {} listening on {addr} (controller {controller})",
                args.node
            );
        }
        // The control session stays up while the router drains: the controller sees it draining
        // (its telemetry says so) and routes around it too.
        drain_on_signal(handle).await;
        drop(client);
        ExitCode::SUCCESS
    })
}

/// Waits for SIGINT or SIGTERM, then drains the router ([`RouterHandle::shutdown_or`]); a second
/// signal stops it without waiting for open connections.
async fn drain_on_signal(handle: RouterHandle) {
    wait_for_signal().await;
    tracing::info!("signal received: draining (a second signal stops at once)");
    handle.shutdown_or(wait_for_signal()).await;
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn idle_timeout_takes_hours_minutes_seconds_and_off() {
        let p = |s| parse_duration_or_off(s);
        assert_eq!(p("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(p("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(p("2min"), Ok(Duration::from_secs(120)));
        assert_eq!(p("340s"), Ok(Duration::from_secs(340)));
        assert_eq!(p("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(p("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(p("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(p("300ms"), Ok(Duration::from_millis(300)));
        for off in ["off", "OFF", "0", "0s", " 0ms "] {
            assert_eq!(p(off), Ok(Duration::ZERO), "{off}");
        }
        for bad in ["", "1", "-5s", "soon", "nan s", "infh"] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn max_stale_takes_durations_past_a_minute() {
        let p = |s| parse_stale(s);
        assert_eq!(p("24h"), Ok(Duration::from_secs(24 * 3600)));
        assert_eq!(p("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(p("600s"), Ok(Duration::from_secs(600)));
        assert_eq!(p("500ms"), Ok(Duration::from_millis(500)));
        for bad in ["", "0", "0s", "off", "-1h", "soon"] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// `tasman router --topology t.yaml --node n` and `extra`, parsed.
    fn parse(extra: &[&str]) -> Result<RouterArgs, clap::Error> {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            router: RouterArgs,
        }
        let base = ["tasman", "--topology", "t.yaml", "--node", "n"];
        Cli::try_parse_from(base.iter().chain(extra)).map(|c| c.router)
    }

    #[test]
    fn idle_and_drain_timeout_flags_default_to_one_hour_and_30_s() {
        let args = |extra: &[&str]| parse(extra).unwrap();
        assert_eq!(args(&[]).idle_timeout, Duration::from_secs(3600));
        assert_eq!(
            args(&["--idle-timeout", "340s"]).idle_timeout,
            Duration::from_secs(340)
        );
        assert_eq!(
            args(&["--idle-timeout", "off"]).idle_timeout,
            Duration::ZERO
        );
        assert_eq!(args(&[]).drain_timeout, Duration::from_secs(30));
        assert_eq!(
            args(&["--drain-timeout", "10m"]).drain_timeout,
            Duration::from_secs(600)
        );
        assert_eq!(
            args(&["--drain-timeout", "0s"]).drain_timeout,
            Duration::ZERO
        );
    }

    #[test]
    fn keep_awake_and_worker_threads_are_off_unless_given() {
        let off = parse(&[]).unwrap();
        assert_eq!(off.worker_threads, None, "one worker per core by default");
        assert_eq!(
            parse(&["--worker-threads", "1"]).unwrap().worker_threads,
            Some(1)
        );
        assert!(parse(&["--worker-threads", "0"]).is_err());
        assert_eq!(
            (off.keep_awake, off.keep_awake_threads),
            (Duration::ZERO, 1)
        );
        let on = parse(&["--keep-awake", "2ms", "--keep-awake-threads", "2"]).unwrap();
        assert_eq!(
            (on.keep_awake, on.keep_awake_threads),
            (Duration::from_millis(2), 2)
        );
        assert_eq!(
            parse(&["--keep-awake", "off"]).unwrap().keep_awake,
            Duration::ZERO
        );
        for bad in [
            &["--keep-awake", "soon"][..],
            &["--keep-awake-threads", "0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
