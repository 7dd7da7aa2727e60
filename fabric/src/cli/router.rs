//! `tasman router`: run one node of the fabric in the role its kind in the topology gives.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use router::{ProbeConfig, Router, RouterConfig, RouterHandle, Snapshot, SourceCap};
use topology::{Hysteresis, Latency, NodeId};

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
    /// Controller mode: where the last good snapshot is kept. Without it, only in memory: a
    /// restart while the controller is away has nothing to run on.
    #[arg(long, conflicts_with = "topology")]
    pub state_dir: Option<PathBuf>,
    /// Controller mode: say so loudly after this long without word from the controller
    /// (e.g. 24h, 90m, 600s).
    #[arg(long, default_value = "24h", value_parser = parse_stale, conflicts_with = "topology")]
    pub max_stale: std::time::Duration,
    /// This node's id in the topology (also its certificate name).
    #[arg(long)]
    pub node: String,
    /// Directory with ca.pem, NODE.pem and NODE.key (see `tasman pki`); the default is relative
    /// to the working directory.
    #[arg(long, default_value = "pki")]
    pub tls_dir: PathBuf,
    /// Serve Prometheus /metrics (and /telemetry JSON) on this address.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Probe interval per neighbour. A latency as in the topology: a number with ns, us, ms or s
    /// (e.g. 100ms, 0.5s), from 10ms (tokio's timers tick in milliseconds; a shorter interval
    /// only sent more probes than a link needs) to 60s.
    #[arg(long, default_value = "100ms", value_name = "LATENCY", value_parser = parse_probe_interval)]
    pub probe_interval: Latency,
    /// Missed probes in a row before a neighbour is declared down (a missed probe is re-sent at
    /// once). 1 to 100.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=i64::from(::router::ProbeConfig::MAX_MISSES)))]
    pub probe_misses: u32,
    /// Minimum time a neighbour or site stays down before it is used again. A latency as in the
    /// topology: a number with ns, us, ms or s (e.g. 1s, 500ms), above 0 and at most 60s.
    #[arg(long, default_value = "1s", value_name = "LATENCY")]
    pub hold_down: Latency,
    /// Reset a proxied connection on which no byte moved either way for this long (the client
    /// and the backend get a TCP reset, or a lingering close where they were sent everything and
    /// a FIN already; the site frees its capacity slot). A duration
    /// (e.g. 1h, 30m, 340s, 1h 30m; at least 1s, so that a backend a moment slow to its first
    /// byte is not reset); `off` or 0 never times out.
    #[arg(long, default_value = "1h", value_parser = parse_idle_timeout, value_name = "DURATION")]
    pub idle_timeout: std::time::Duration,
    /// Reset a proxied connection whose client (at an edge) or backend (at a site) takes no
    /// byte for this long while bytes wait for it: its stream would otherwise keep holding part
    /// of the flow-control window that every stream to that neighbour shares. A duration (e.g.
    /// 30s, 2m; at least 1s, so that a write held up a moment by congestion is not taken for
    /// a stopped reader); `off` or 0 never resets for it.
    #[arg(long, default_value = "30s", value_parser = parse_stall_timeout, value_name = "DURATION")]
    pub write_stall_timeout: std::time::Duration,
    /// On SIGTERM or Ctrl-C, let open connections finish for up to this long before closing
    /// them (new ones go to other sites at once; a second signal stops without waiting). A
    /// duration (e.g. 30s, 10m); 0 does not wait. The default, 20s, leaves the close and the
    /// stores that follow (5.5 s at most, 5 s more on a hung disk) inside the 30 s an
    /// orchestrator such as Kubernetes waits before it kills.
    #[arg(long, default_value = "20s", value_parser = parse_long_duration, value_name = "DURATION")]
    pub drain_timeout: std::time::Duration,
    /// Re-read this node's certificate, key, CA bundle and revocation list from `--tls-dir` this
    /// often, and adopt what passes the checks (no restart for a re-issued certificate, a CA
    /// rotation or a revocation). A duration (e.g. 10s, 1m; at least 100ms); `off` or 0: read
    /// them at start only.
    #[arg(long, default_value = "10s", value_parser = parse_reload_interval, value_name = "DURATION")]
    pub tls_reload_interval: std::time::Duration,
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
    /// Dial neighbour NODE at ADDR instead of its topology address (e.g. a link emulator);
    /// repeatable. The neighbour is still checked by its certificate name.
    #[arg(long = "dial", value_name = "NODE=ADDR", value_parser = parse_dial)]
    pub dial: Vec<(String, SocketAddr)>,
    /// Edge: sites tried for one client connection before its client gets a TCP reset, 1 to 16
    /// (sites a traffic dial declined are tried after these). Each try has its own
    /// --reply-timeout. Raise it where a service has more sites worth trying when the nearest
    /// fail; lower it to fail fast.
    #[arg(long, default_value_t = 3, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=MAX_TRIES))]
    pub max_tries: u16,
    /// Site: how long it waits for its backend to accept a TCP connection before it refuses
    /// the stream with `backend_refused`, which the edge retries on its next candidate (the
    /// 5th such failure in a row marks the service down), and how long each health check may
    /// take (a connect, or a connect and the status line of a `health_check` GET). The default is above one
    /// retransmitted SYN (1 s). Raise it for backends slow to accept, and the edges'
    /// --reply-timeout above it, else they give up first. 1ms to 10m.
    #[arg(long, default_value = "2s", value_parser = parse_timeout, value_name = "DURATION")]
    pub backend_connect_timeout: std::time::Duration,
    /// How long a peer's stream may take to send its header, and on a transit how long the next
    /// hop may take to take the stream and its header, which the transit then hands back to the
    /// edge (`next_hop_unreachable`) to retry on its next candidate (one whose connection has
    /// no stream to give at all is handed back after 0.5 s). Keep it below the edges'
    /// --reply-timeout, or the edge gives up on the try first (the router warns when it is not
    /// below its own --reply-timeout). 1ms to 10m.
    #[arg(long, default_value = "5s", value_parser = parse_timeout, value_name = "DURATION")]
    pub header_timeout: std::time::Duration,
    /// Edge: how long a try may wait for its site's answer (sent once the site's backend accepted
    /// the connection), from opening its stream on, client bytes waiting to go out included;
    /// then it is counted as `upstream_lost` and retried on the next candidate with the client's
    /// bytes replayed. Lower it to retry sooner where answers come fast; raise it in front of
    /// backends slow to accept (above the sites' --backend-connect-timeout). 1ms to 10m.
    #[arg(long, default_value = "10s", value_parser = parse_timeout, value_name = "DURATION")]
    pub reply_timeout: std::time::Duration,
    /// Edge: client bytes kept per connection until its site answers, to replay on the next
    /// candidate; a connection whose client sent more than this before the answer is not
    /// retried (each piece the bytes came in, one read of the client's socket, also counts 128
    /// bytes, its bookkeeping). Held in memory by every connection waiting for its site, hence
    /// at most 64MiB;
    /// 0 retries only clients that sent nothing yet. Raise it for clients that send large
    /// requests before any answer. A whole number with an optional unit, binary (B, KiB, MiB,
    /// GiB) or decimal (kB, MB, GB), e.g. 256KiB.
    #[arg(long, default_value = "64KiB", value_parser = parse_replay_limit, value_name = "BYTES")]
    pub replay_limit: usize,
    /// Edge: client connections held at once; a client beyond them is reset at accept (it may
    /// try another edge) and counted in tasman_edge_clients_over_cap_total. `auto`: the
    /// open-file limit (raised to its hard limit at start) less 256 descriptors kept for the
    /// router itself, at least 64. A whole number from 1, or auto.
    #[arg(long, default_value = "auto", value_parser = parse_max_clients, value_name = "N")]
    pub max_client_connections: MaxClients,
    /// Edge: client connections held at once from one source (an IPv4 address; an IPv6 /64,
    /// which one host routinely has), so that one client cannot take them all; a client beyond
    /// them is reset at accept and counted in tasman_edge_clients_over_source_cap_total.
    /// Many users can share an address (a NAT, an enterprise's egress, a proxy in front of the
    /// edge that does not keep client addresses): hence `auto`, a quarter of
    /// --max-client-connections, at least 64. A whole number from 1, auto, or off (no
    /// per-source cap).
    #[arg(long, default_value = "auto", value_parser = parse_source_cap, value_name = "N")]
    pub max_client_connections_per_source: SourceCap,
    /// Edge, anti-flap margins (reported to the controller, whose apply plan predicts the
    /// edge's moves with them).
    #[command(flatten)]
    pub hysteresis: HysteresisArgs,
}

/// The anti-flap margins an edge keeps its preferred site with (`tasman router`), or that
/// `tasman topology diff` predicts edges' moves with.
#[derive(clap::Args, Debug, Clone)]
pub struct HysteresisArgs {
    /// Anti-flap: the site in use for a service gives way to a cheaper one (path latency plus
    /// load penalty) only if that one is at least this much cheaper, and below
    /// --hysteresis-ratio of its cost. Raise it if the preferred site flaps on jittery paths.
    /// A latency as in the topology: a number with ns, us, ms or s (e.g. 10ms, 1.5ms), above 0
    /// and at most 60s.
    #[arg(long, default_value = "10ms", value_name = "LATENCY")]
    pub hysteresis_margin: Latency,
    /// Anti-flap: a cheaper site takes over from the site in use only below this fraction of
    /// its cost (and --hysteresis-margin cheaper). Above 0, at most 1 (1: the margin alone
    /// decides); a fraction (2/3) or a decimal (0.5).
    #[arg(long, default_value = "2/3", value_parser = parse_ratio, value_name = "FRACTION")]
    pub hysteresis_ratio: f64,
}

impl HysteresisArgs {
    pub fn hysteresis(&self) -> Hysteresis {
        Hysteresis {
            absolute: self.hysteresis_margin,
            relative: self.hysteresis_ratio,
        }
    }
}

/// How long a stopping router waits for its control client's last writes (the snapshot).
const STORE_ON_EXIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Most `--max-tries`: each try may hold the client for a `--reply-timeout`.
const MAX_TRIES: i64 = 16;

/// Most `--backend-connect-timeout`, `--header-timeout` and `--reply-timeout`: each try may hold
/// a client this long. (A backend connect gives up on its own sooner on Linux's defaults:
/// ~127 s of SYN retries, `net.ipv4.tcp_syn_retries`.)
const MAX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Most `--replay-limit`: every client connection waiting for its site may hold this much.
const MAX_REPLAY_LIMIT: u64 = 64 << 20;

/// A duration for the flags that go past the topology's latencies (those stop at 60 s):
/// `humantime` syntax, e.g. 24h, 90m, 340s, 500ms, 1h 30m.
fn parse_long_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?}: {e} (expected e.g. 24h, 90m, 340s or 500ms)"))
}

/// The shortest `--max-stale` in force: three of the controller's 2 s heartbeats, so that one
/// late by up to 4 s does not make the snapshot stale. (Below one heartbeat a router whose
/// controller was there flipped to stale and back between every two, logging each return at
/// warn; just above one, at every heartbeat a little late.)
const MIN_STALE: std::time::Duration = std::time::Duration::from_secs(6);

/// `--max-stale`: a duration greater than zero ([`max_stale_in_force`] raises a short one).
fn parse_stale(s: &str) -> Result<std::time::Duration, String> {
    match parse_long_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?} must be greater than zero")),
        d => Ok(d),
    }
}

/// The `--max-stale` a router runs with: `given`, raised to [`MIN_STALE`] with a warning to say
/// (refused, a short value taken by earlier builds would stop a router from starting on an
/// upgrade).
fn max_stale_in_force(given: std::time::Duration) -> (std::time::Duration, Option<String>) {
    if given >= MIN_STALE {
        return (given, None);
    }
    let why = format!(
        "--max-stale {}: raised to {} (the controller's heartbeats come every 2 s: a shorter \
         one calls the snapshot stale between two of them)",
        humantime::format_duration(given),
        humantime::format_duration(MIN_STALE)
    );
    (MIN_STALE, Some(why))
}

/// `--idle-timeout`, `--keep-awake`: a duration; `off` or zero is `Duration::ZERO` (none).
fn parse_duration_or_off(s: &str) -> Result<std::time::Duration, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(std::time::Duration::ZERO);
    }
    parse_long_duration(s)
}

/// `--tls-reload-interval` (a router's and the controller's): `off` or 0 (read at start only),
/// else at least 100 ms (each reload reads the files and checks signatures).
pub(super) fn parse_reload_interval(s: &str) -> Result<std::time::Duration, String> {
    match parse_duration_or_off(s)? {
        d if !d.is_zero() && d < std::time::Duration::from_millis(100) => {
            Err(format!("{s:?} must be at least 100ms (or off)"))
        }
        // Bounded as the other durations are: tokio's interval panicked on one past what an
        // `Instant` can add (the reload task died at its first tick, and no re-issued
        // certificate, bundle or revocation list was taken up again, with one panic line).
        d if d > MAX_RELOAD_INTERVAL => Err(format!("{s:?} must be at most 24h (or off)")),
        d => Ok(d),
    }
}

/// Longest `--tls-reload-interval`.
const MAX_RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Shortest `--probe-interval`: the router's own bound.
const MIN_PROBE_INTERVAL: std::time::Duration = ::router::ProbeConfig::MIN_INTERVAL;

/// `--probe-interval`: a latency from [`MIN_PROBE_INTERVAL`] to 60 s.
fn parse_probe_interval(s: &str) -> Result<Latency, String> {
    let l: Latency = s.parse().map_err(|e| format!("{e}"))?;
    if l.as_duration() < MIN_PROBE_INTERVAL {
        return Err(format!(
            "{s:?} must be at least {}",
            humantime::format_duration(MIN_PROBE_INTERVAL)
        ));
    }
    Ok(l)
}

/// `--idle-timeout`: `off` or 0 (none), else at least a second (300 ms would reset every
/// stream whose backend took longer than that to its first byte).
fn parse_idle_timeout(s: &str) -> Result<std::time::Duration, String> {
    match parse_duration_or_off(s)? {
        d if !d.is_zero() && d < std::time::Duration::from_secs(1) => {
            Err(format!("{s:?} must be at least 1s (or off)"))
        }
        d => Ok(d),
    }
}

/// `--write-stall-timeout`: `off` or 0 (none), else at least a second.
fn parse_stall_timeout(s: &str) -> Result<std::time::Duration, String> {
    match parse_duration_or_off(s)? {
        d if !d.is_zero() && d < std::time::Duration::from_secs(1) => {
            Err(format!("{s:?} must be at least 1s (or off)"))
        }
        d => Ok(d),
    }
}

/// `--backend-connect-timeout`, `--header-timeout`, `--reply-timeout`: a duration from 1 ms
/// (tokio's timers tick in milliseconds) to [`MAX_TIMEOUT`].
fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    match parse_long_duration(s)? {
        d if d < std::time::Duration::from_millis(1) => Err(format!("{s:?} must be at least 1ms")),
        d if d > MAX_TIMEOUT => Err(format!("{s:?} must be at most 10m")),
        d => Ok(d),
    }
}

/// A byte count: a whole number with an optional unit, binary (`B`, `KiB`, `MiB`, `GiB`) or
/// decimal (`kB`, `MB`, `GB`), e.g. `65536`, `64KiB`, `1 MiB`. Strict: units are case-sensitive
/// and `K`, `KB` or `k` are refused (1000 or 1024 would be a guess), as are fractions and signs.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let scale: Option<u64> = match unit.trim_start() {
        "" | "B" => Some(1),
        "KiB" => Some(1 << 10),
        "MiB" => Some(1 << 20),
        "GiB" => Some(1 << 30),
        "kB" => Some(1_000),
        "MB" => Some(1_000_000),
        "GB" => Some(1_000_000_000),
        _ => None,
    };
    let Some(scale) = scale.filter(|_| !num.is_empty()) else {
        return Err(format!(
            "{s:?}: expected a whole number with an optional unit B, KiB, MiB, GiB, kB, MB or GB \
             (e.g. 65536, 64KiB, 1MiB)"
        ));
    };
    // Only digits: parsing fails on overflow alone.
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `--max-client-connections`: a count, or `auto` (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxClients(pub Option<usize>);

fn parse_max_clients(s: &str) -> Result<MaxClients, String> {
    if s == "auto" {
        return Ok(MaxClients(None));
    }
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(MaxClients(Some(n))),
        _ => Err(format!("{s:?}: expected a whole number from 1, or auto")),
    }
}

/// `--max-client-connections-per-source`: a count, `auto` or `off`.
fn parse_source_cap(s: &str) -> Result<SourceCap, String> {
    match s {
        "auto" => Ok(SourceCap::Auto),
        "off" => Ok(SourceCap::Off),
        _ => match s.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(SourceCap::At(n)),
            _ => Err(format!(
                "{s:?}: expected a whole number from 1, auto, or off"
            )),
        },
    }
}

/// `--replay-limit`: a byte count ([`parse_bytes`]) up to [`MAX_REPLAY_LIMIT`].
fn parse_replay_limit(s: &str) -> Result<usize, String> {
    match parse_bytes(s)? {
        n if n > MAX_REPLAY_LIMIT => Err(format!(
            "{s:?} must be at most 64MiB (it is held in memory by every client connection \
             waiting for its site)"
        )),
        n => usize::try_from(n).map_err(|_| format!("{s:?} is too large")),
    }
}

/// `--hysteresis-ratio`: a fraction above 0 and at most 1, written `A/B` or as a decimal.
fn parse_ratio(s: &str) -> Result<f64, String> {
    let number = |t: &str| t.trim().parse::<f64>().ok().filter(|x| x.is_finite());
    let r = match s.split_once('/') {
        Some((a, b)) => number(a).zip(number(b)).map(|(a, b)| a / b),
        None => number(s),
    };
    match r {
        Some(r) if r > 0.0 && r <= 1.0 => Ok(r),
        _ => Err(format!(
            "{s:?}: expected a fraction above 0 and at most 1 (e.g. 2/3 or 0.5)"
        )),
    }
}

fn parse_dial(s: &str) -> Result<(String, SocketAddr), String> {
    let (n, a) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NODE=ADDR"))?;
    if !topology::is_valid_id(n) {
        return Err(format!(
            "{n:?} is not a node id (1 to 63 lowercase letters, digits and single hyphens)"
        ));
    }
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

    /// What this router's timeouts get wrong together, for a fabric whose routers all have the
    /// same values. Warned about, not refused: each pair spans two roles (an edge's reply
    /// timeout against a transit's header timeout or a site's backend connect timeout), so one
    /// router's flags say nothing certain about the others', and on this router at most one
    /// value of each pair is in use.
    fn timeout_warnings(&self) -> Vec<String> {
        let reply = humantime::format_duration(self.reply_timeout);
        let mut out = Vec::new();
        if self.header_timeout >= self.reply_timeout {
            out.push(format!(
                "--header-timeout {} is not below --reply-timeout {reply}: an edge with this reply \
                 timeout gives up on a try stuck behind a transit (upstream_lost) before a \
                 transit with this header timeout hands it back (next_hop_unreachable, which \
                 also marks the site down at the edge for the hold-down); give every router a \
                 header timeout below the edges' reply timeout",
                humantime::format_duration(self.header_timeout)
            ));
        }
        if self.backend_connect_timeout >= self.reply_timeout {
            out.push(format!(
                "--backend-connect-timeout {} is not below --reply-timeout {reply}: an edge with \
                 this reply timeout gives up on a site whose backend is slow to accept before \
                 the site's connect does (upstream_lost, the site not marked down); give the \
                 edges a reply timeout above the sites' backend connect timeout",
                humantime::format_duration(self.backend_connect_timeout)
            ));
        }
        out
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
        Ok(self.config_with(snapshots, tls))
    }

    /// [`Self::config`] with `tls` already loaded (controller mode loaded it before its control
    /// client started: loading it again could fail on files being replaced, or finish an
    /// interrupted install while the client's renewal writes them).
    pub fn config_with(
        &self,
        snapshots: tokio::sync::watch::Receiver<Arc<Snapshot>>,
        tls: router::tls::TlsIdentity,
    ) -> RouterConfig {
        let mut cfg = RouterConfig::new(NodeId::new(&self.node), tls, snapshots);
        cfg.metrics_addr = self.metrics;
        cfg.probe = ProbeConfig {
            interval: self.probe_interval.as_duration(),
            misses: self.probe_misses,
            hold_down: self.hold_down.as_duration(),
        };
        cfg.max_tries = usize::from(self.max_tries);
        cfg.backend_connect_timeout = self.backend_connect_timeout;
        cfg.header_timeout = self.header_timeout;
        cfg.reply_timeout = self.reply_timeout;
        cfg.replay_limit = self.replay_limit;
        cfg.max_client_connections = self.max_client_connections.0;
        cfg.max_client_connections_per_source = self.max_client_connections_per_source;
        cfg.hysteresis = self.hysteresis.hysteresis();
        for w in self.timeout_warnings() {
            tracing::warn!(node = %self.node, "{w}");
        }
        cfg.idle_timeout = Some(self.idle_timeout).filter(|t| !t.is_zero());
        cfg.write_stall_timeout = Some(self.write_stall_timeout).filter(|t| !t.is_zero());
        cfg.drain_timeout = self.drain_timeout;
        cfg.cert_reload_interval = Some(self.tls_reload_interval).filter(|t| !t.is_zero());
        cfg.keep_awake = (!self.keep_awake.is_zero()).then_some(router::keep_awake::Config {
            window: self.keep_awake,
            threads: usize::from(self.keep_awake_threads),
        });
        cfg.dial_overrides = self
            .dial
            .iter()
            .map(|(n, a)| (NodeId::new(n), *a))
            .collect::<HashMap<_, _>>();
        cfg
    }
}

pub fn run(args: RouterArgs) -> ExitCode {
    super::init_tracing();
    super::raise_nofile();
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
    // A misspelt node would be dialled at its topology address instead, silently.
    if let Some((n, _)) = args.dial.iter().find(|(n, _)| topo.node(n).is_none()) {
        eprintln!(
            "error: --dial {n:?}: no such node in {}",
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
    let code = rt.block_on(async move {
        let mut signals = match super::Signals::install_or_exit() {
            Ok(s) => s,
            Err(code) => return code,
        };
        let handle = match spawn(cfg, &mut signals).await {
            Ok(h) => h,
            Err(code) => return code,
        };
        if let Some(addr) = handle.quic_addr() {
            // Not `println!`: a stdout that cannot be written (a reader gone, a full disk)
            // made it panic, and the router, serving by then, exit 101 without a drain.
            let _ = writeln!(
                std::io::stdout(),
                "router {} listening on {addr}",
                args.node
            );
        }
        drain_on_signal(handle, &mut signals).await;
        ExitCode::SUCCESS
    });
    // Blocking threads still stuck (a hung disk under a snapshot or certificate write) do
    // not hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    code
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
    let code = rt.block_on(async move {
        let mut signals = match super::Signals::install_or_exit() {
            Ok(s) => s,
            Err(code) => return code,
        };
        // One resolver for the control connection and the router: a reloaded certificate is
        // presented on both.
        let cert = match router::tls::CertResolver::new(&tls) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        // Another node's files are refused before the controller is dialled (it would refuse
        // the session, and the router waited for a first snapshot for ever). One the controller
        // will refuse for another reason (expired, another CA) is said now, not only once a
        // first snapshot came (which that refusal keeps from coming).
        match cert.at_start() {
            Ok(None) => {}
            Ok(Some(why)) => tracing::warn!(node = %args.node, path = %cert.cert_path().display(),
                "starting with a certificate the controller and neighbours will refuse: {why} (a \
                 re-issued pair is taken up when it is copied in)"),
            Err(why) => {
                eprintln!("error: {}: {why}", cert.cert_path().display());
                return ExitCode::from(2);
            }
        }
        // Re-read from now on, not from the router's start: a router the controller refuses
        // (an expired certificate, a bundle without the controller's new CA) gets no first
        // snapshot, and its re-issued files must be taken up without a restart all the same.
        // The router runs no reload task of its own on this resolver (below).
        let reload = (!args.tls_reload_interval.is_zero())
            .then(|| tokio::spawn(cert.clone().reload_every(args.tls_reload_interval)));
        let mut ccfg =
            router::control::ClientConfig::new(controller, NodeId::new(&args.node), tls.clone());
        ccfg.cert = Some(cert.clone());
        ccfg.state_dir = args.state_dir.clone();
        if ccfg.state_dir.is_none() {
            tracing::warn!(
                "no --state-dir: the last good snapshot is kept in memory only, so a restart \
                 while the controller is away has nothing to run on"
            );
        }
        let (max_stale, raised) = max_stale_in_force(args.max_stale);
        if let Some(why) = raised {
            tracing::warn!("{why}");
        }
        ccfg.max_stale = max_stale;
        // It waits for the controller's first snapshot as long as it takes (none on disk).
        let client = match signals
            .unless(router::control::ControlClient::start(ccfg))
            .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
            Err(code) => return code,
        };
        // The identity loaded at start: the resolver, which the router presents and trusts
        // through, has re-read the files since if they changed.
        let mut cfg = args.config_with(client.snapshots(), tls);
        cfg.cert_resolver = Some(cert);
        cfg.cert_reload_interval = None;
        let handle = match spawn(cfg, &mut signals).await {
            Ok(h) => h,
            Err(code) => {
                // The snapshot the client took (and may have acknowledged) is on disk before
                // the process goes, as after a run (dropped, the client's writer was aborted).
                client.close(STORE_ON_EXIT).await;
                return code;
            }
        };
        client.attach(&handle);
        if let Some(addr) = handle.quic_addr() {
            let _ = writeln!(
                std::io::stdout(),
                "router {} listening on {addr} (controller {controller})",
                args.node
            );
        }
        // The control session stays up while the router drains: the controller sees it draining
        // (its telemetry says so) and routes around it too. It applies no version from then on,
        // and acknowledges none (`attach`): the controller shows it behind.
        drain_on_signal(handle, &mut signals).await;
        // The latest snapshot on disk before the process goes (a restart while the controller
        // is away starts from it), unless the disk is stuck.
        client.close(STORE_ON_EXIT).await;
        if let Some(reload) = reload {
            reload.abort();
        }
        ExitCode::SUCCESS
    });
    // Blocking threads still stuck (a hung disk under a snapshot or certificate write) do
    // not hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    code
}

/// Waits for SIGINT or SIGTERM, then drains the router ([`RouterHandle::shutdown_or`]); a second
/// signal stops it without waiting for open connections.
async fn drain_on_signal(handle: RouterHandle, signals: &mut super::Signals) {
    signals.next().await;
    tracing::info!("signal received: draining (a second signal stops at once)");
    handle.shutdown_or(signals.next()).await;
}

/// Spawns the router, unless a signal comes first; `Err`: the exit status (the error said).
async fn spawn(cfg: RouterConfig, signals: &mut super::Signals) -> Result<RouterHandle, ExitCode> {
    signals.unless(Router::spawn(cfg)).await?.map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// `--tls-reload-interval` takes 100ms to 24h, or off; past 24h it is refused (one past
    /// what an `Instant` can add panicked the reload task at its first tick).
    #[test]
    fn the_reload_interval_is_bounded() {
        let p = parse_reload_interval;
        assert_eq!(p("off"), Ok(Duration::ZERO));
        assert_eq!(p("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(p("24h"), Ok(Duration::from_secs(86_400)));
        assert!(p("50ms").unwrap_err().contains("at least 100ms"));
        for long in ["25h", "300000000000y"] {
            assert!(p(long).unwrap_err().contains("at most 24h"), "{long}");
        }
    }

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
        // Shorter than three heartbeats: raised, saying so (a router with its controller there
        // flipped to stale and back between heartbeats, warning at each).
        assert_eq!(MIN_STALE, 3 * crate::controller::distribute::HEARTBEAT);
        let (d, why) = max_stale_in_force(Duration::from_millis(500));
        assert_eq!(d, MIN_STALE);
        assert!(why.is_some_and(|w| w.contains("raised to 6s")));
        assert_eq!(
            max_stale_in_force(Duration::from_secs(6)),
            (Duration::from_secs(6), None)
        );
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

    /// `--dial` names a node by its id: an empty or malformed one is refused naming the flag
    /// (it was taken, and the node it meant dialled at its topology address).
    #[test]
    fn dial_takes_a_node_id_and_an_address() {
        let dial = |v: &str| parse(&["--dial", v]).map(|a| a.dial);
        assert_eq!(
            dial("syd-transit-1=127.0.0.1:9").unwrap(),
            [("syd-transit-1".to_string(), "127.0.0.1:9".parse().unwrap())]
        );
        for bad in ["=127.0.0.1:9", "Syd=127.0.0.1:9", "a b=127.0.0.1:9", "n=x"] {
            let e = dial(bad).unwrap_err().to_string();
            assert!(e.contains("--dial"), "{bad}: {e}");
        }
    }

    #[test]
    fn idle_and_drain_timeout_flags_default_to_one_hour_and_20_s() {
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
        // Under a second is refused naming the flag (300 ms reset every backend slow to its
        // first byte).
        let e = parse(&["--idle-timeout", "300ms"]).unwrap_err().to_string();
        assert!(
            e.contains("--idle-timeout") && e.contains("at least 1s"),
            "{e}"
        );
        assert_eq!(args(&[]).drain_timeout, Duration::from_secs(20));
        assert_eq!(
            args(&["--drain-timeout", "10m"]).drain_timeout,
            Duration::from_secs(600)
        );
        assert_eq!(
            args(&["--drain-timeout", "0s"]).drain_timeout,
            Duration::ZERO
        );
        assert_eq!(args(&[]).tls_reload_interval, Duration::from_secs(10));
        assert_eq!(
            args(&["--tls-reload-interval", "1s"]).tls_reload_interval,
            Duration::from_secs(1)
        );
        assert_eq!(
            args(&["--tls-reload-interval", "off"]).tls_reload_interval,
            Duration::ZERO
        );
        assert!(parse(&["--tls-reload-interval", "10ms"]).is_err());
        assert_eq!(args(&[]).write_stall_timeout, Duration::from_secs(30));
        assert_eq!(
            args(&["--write-stall-timeout", "2m"]).write_stall_timeout,
            Duration::from_secs(120)
        );
        assert_eq!(
            args(&["--write-stall-timeout", "off"]).write_stall_timeout,
            Duration::ZERO
        );
        for short in ["1ms", "999ms", "0.5s"] {
            let e = parse(&["--write-stall-timeout", short])
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("must be at least 1s"), "{short}: {e}");
        }
    }

    /// `--state-dir` and `--max-stale` are controller mode's: with `--topology` they are
    /// refused (exit 2), not ignored (a router run so kept no snapshot
    /// while its operator thought it did).
    #[test]
    fn controller_mode_flags_are_refused_with_a_topology_file() {
        for extra in [&["--state-dir", "st"][..], &["--max-stale", "1h"]] {
            let e = parse(extra).expect_err("refused").to_string();
            assert!(
                e.contains("'--topology <TOPOLOGY>' cannot be used with '") && e.contains(extra[0]),
                "{extra:?}: {e}"
            );
        }
    }

    #[test]
    fn probe_interval_is_from_10ms_to_60s() {
        let interval = |v: &str| parse(&["--probe-interval", v]).map(|r| r.probe_interval);
        assert_eq!(
            parse(&[]).unwrap().probe_interval,
            Latency::from_micros(100_000)
        );
        assert_eq!(interval("10ms").unwrap(), Latency::from_micros(10_000));
        assert_eq!(interval("0.5s").unwrap(), Latency::from_micros(500_000));
        for bad in ["1us", "9ms", "0", "61s", "fast"] {
            let e = interval(bad).unwrap_err().to_string();
            assert!(e.contains("--probe-interval"), "{bad}: {e}");
        }
        let e = interval("1us").unwrap_err().to_string();
        assert!(e.contains("at least 10ms"), "{e}");
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

    #[test]
    fn byte_counts_take_whole_numbers_with_binary_or_decimal_units() {
        let p = |s| parse_bytes(s);
        assert_eq!(p("0"), Ok(0));
        assert_eq!(p("65536"), Ok(65536));
        assert_eq!(p("512B"), Ok(512));
        assert_eq!(p("64KiB"), Ok(64 * 1024));
        assert_eq!(p("64 KiB"), Ok(64 * 1024));
        assert_eq!(p(" 1MiB "), Ok(1 << 20));
        assert_eq!(p("2GiB"), Ok(2 << 30));
        assert_eq!(p("64kB"), Ok(64_000));
        assert_eq!(p("5MB"), Ok(5_000_000));
        assert_eq!(p("1GB"), Ok(1_000_000_000));
        assert_eq!(p("18446744073709551615"), Ok(u64::MAX));
        for bad in [
            "", "KiB", "64K", "64KB", "64k", "64kib", "64 kb", "1.5MiB", "-1", "+1", "1e6",
            "64KiB!", "64 Ki B", "0x10", "1_000", "soon",
        ] {
            let e = p(bad).expect_err(bad);
            assert!(e.contains("expected a whole number"), "{bad:?}: {e}");
        }
        for big in ["18446744073709551616", "17179869184GiB"] {
            assert!(p(big).expect_err(big).contains("too large"), "{big:?}");
        }
    }

    #[test]
    fn max_client_connections_is_a_count_from_one_or_auto() {
        assert_eq!(parse_max_clients("auto"), Ok(MaxClients(None)));
        assert_eq!(parse_max_clients("1"), Ok(MaxClients(Some(1))));
        assert_eq!(parse_max_clients("50000"), Ok(MaxClients(Some(50_000))));
        for bad in ["0", "-1", "1.5", "", "10k"] {
            let e = parse_max_clients(bad).unwrap_err();
            assert!(e.contains("whole number from 1, or auto"), "{bad}: {e}");
        }
    }

    #[test]
    fn max_client_connections_per_source_is_a_count_from_one_auto_or_off() {
        assert_eq!(parse_source_cap("auto"), Ok(SourceCap::Auto));
        assert_eq!(parse_source_cap("off"), Ok(SourceCap::Off));
        assert_eq!(parse_source_cap("1"), Ok(SourceCap::At(1)));
        assert_eq!(parse_source_cap("2000"), Ok(SourceCap::At(2000)));
        for bad in ["0", "-1", "1.5", "", "10k", "none", "Off", "AUTO"] {
            let e = parse_source_cap(bad).unwrap_err();
            assert!(
                e.contains("whole number from 1, auto, or off"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn replay_limit_is_a_byte_count_up_to_64_mib() {
        let p = |s| parse_replay_limit(s);
        assert_eq!(p("0"), Ok(0));
        assert_eq!(p("256KiB"), Ok(256 * 1024));
        assert_eq!(p("64MiB"), Ok(64 << 20));
        assert_eq!(p("67108864"), Ok(64 << 20));
        for bad in ["67108865", "65MiB", "1GiB", "64MB0"] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn timeouts_are_from_1ms_to_10_minutes() {
        let p = |s| parse_timeout(s);
        assert_eq!(p("1ms"), Ok(Duration::from_millis(1)));
        assert_eq!(p("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(p("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(p("600s"), Ok(Duration::from_secs(600)));
        for bad in [
            "", "0", "0s", "off", "999us", "10m 1ms", "1h", "-1s", "soon",
        ] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn hysteresis_ratio_takes_fractions_and_decimals_in_0_to_1() {
        let p = |s| parse_ratio(s);
        assert_eq!(p("2/3"), Ok(2.0 / 3.0));
        assert_eq!(p(" 3 / 4 "), Ok(0.75));
        assert_eq!(p("0.5"), Ok(0.5));
        assert_eq!(p("1"), Ok(1.0));
        assert_eq!(p("1/1"), Ok(1.0));
        for bad in [
            "", "0", "0/3", "-0.5", "4/3", "1.01", "2/0", "0/0", "nan", "inf", "1/inf", "2/3/4",
            "half",
        ] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// A CA and a certificate for node `n` in a temporary directory, and a snapshot source.
    fn tls_dir_and_snapshots() -> (
        tempfile::TempDir,
        tokio::sync::watch::Receiver<Arc<Snapshot>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        router::pki::init(dir.path()).unwrap();
        router::pki::issue(dir.path(), "n").unwrap();
        let topo = Arc::new(topology::builder::TopologyBuilder::new().build());
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(Snapshot::new(1, topo)));
        (dir, rx)
    }

    /// The router configuration `tasman router ... --tls-dir DIR` and `extra` build.
    fn config_with(extra: &[&str]) -> RouterConfig {
        let (dir, rx) = tls_dir_and_snapshots();
        let tls_dir = dir.path().to_str().unwrap();
        let args = parse(&[&["--tls-dir", tls_dir], extra].concat()).unwrap();
        args.config(rx).expect("the config builds")
    }

    #[test]
    fn data_plane_flags_default_to_the_router_configs_defaults() {
        let (dir, rx) = tls_dir_and_snapshots();
        let tls = router::tls::TlsIdentity::load(dir.path(), "n").unwrap();
        let want = RouterConfig::new(NodeId::new("n"), tls, rx);
        let got = config_with(&[]);
        assert_eq!(got.max_tries, want.max_tries);
        assert_eq!(got.backend_connect_timeout, want.backend_connect_timeout);
        assert_eq!(got.header_timeout, want.header_timeout);
        assert_eq!(got.reply_timeout, want.reply_timeout);
        assert_eq!(got.replay_limit, want.replay_limit);
        assert_eq!(got.max_client_connections, want.max_client_connections);
        assert_eq!(
            got.max_client_connections_per_source,
            want.max_client_connections_per_source
        );
        assert_eq!(got.hysteresis.absolute, want.hysteresis.absolute);
        assert_eq!(got.hysteresis.relative, want.hysteresis.relative);
        assert!(
            parse(&[]).unwrap().timeout_warnings().is_empty(),
            "the defaults fit together"
        );
    }

    #[test]
    fn each_data_plane_flag_reaches_the_router_config() {
        let cfg = config_with(&[
            "--max-tries",
            "5",
            "--backend-connect-timeout",
            "30s",
            "--header-timeout",
            "250ms",
            "--reply-timeout",
            "45s",
            "--replay-limit",
            "1MiB",
            "--hysteresis-margin",
            "25ms",
            "--hysteresis-ratio",
            "0.5",
            "--max-client-connections",
            "5000",
            "--max-client-connections-per-source",
            "200",
        ]);
        assert_eq!(cfg.max_client_connections, Some(5000));
        assert_eq!(cfg.max_client_connections_per_source, SourceCap::At(200));
        assert_eq!(cfg.max_tries, 5);
        assert_eq!(cfg.backend_connect_timeout, Duration::from_secs(30));
        assert_eq!(cfg.header_timeout, Duration::from_millis(250));
        assert_eq!(cfg.reply_timeout, Duration::from_secs(45));
        assert_eq!(cfg.replay_limit, 1 << 20);
        assert_eq!(cfg.hysteresis.absolute, Latency::from_micros(25_000));
        assert_eq!(cfg.hysteresis.relative, 0.5);
    }

    #[test]
    fn out_of_range_data_plane_flags_are_refused_naming_the_flag() {
        for (flag, bad) in [
            ("--probe-misses", "0"),
            ("--probe-misses", "101"),
            ("--max-tries", "0"),
            ("--max-tries", "17"),
            ("--max-tries", "-1"),
            ("--backend-connect-timeout", "0s"),
            ("--backend-connect-timeout", "11m"),
            ("--header-timeout", "0"),
            ("--header-timeout", "1h"),
            ("--reply-timeout", "500us"),
            ("--reply-timeout", "601s"),
            ("--replay-limit", "65MiB"),
            ("--replay-limit", "64KB"),
            ("--hysteresis-margin", "0ms"),
            ("--hysteresis-margin", "61s"),
            ("--hysteresis-ratio", "0"),
            ("--hysteresis-ratio", "1.5"),
            ("--max-client-connections-per-source", "0"),
            ("--max-client-connections-per-source", "none"),
        ] {
            let e = match parse(&[&format!("{flag}={bad}")]) {
                Ok(_) => panic!("{flag} {bad} accepted"),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(flag), "{flag} {bad}: {e}");
        }
        // The bounds themselves are in.
        let edge = parse(&["--max-tries", "16", "--replay-limit", "64MiB"]).unwrap();
        assert_eq!((edge.max_tries, edge.replay_limit), (16, 64 << 20));
    }

    #[test]
    fn timeouts_that_defeat_a_retry_are_warned_about() {
        let warnings = |extra: &[&str]| parse(extra).unwrap().timeout_warnings();
        assert!(warnings(&["--reply-timeout", "5001ms"]).is_empty());
        let w = warnings(&["--reply-timeout", "5s"]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("--header-timeout 5s") && w[0].contains("--reply-timeout 5s"),
            "{w:?}"
        );
        let w = warnings(&["--backend-connect-timeout", "60s"]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("--backend-connect-timeout 1m") && w[0].contains("--reply-timeout 10s"),
            "{w:?}"
        );
        assert_eq!(warnings(&["--reply-timeout", "1s"]).len(), 2);
    }
}
