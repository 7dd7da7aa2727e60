//! `tasman-bench`: Tasman's whole-system benchmarks, measured in one run and written to
//! `docs/benchmarks.md`. Run it through `bench/run` (release build, HAProxy installed).
//!
//! Routers run as separate processes (`tasman-bench serve-router`, the same `router::Router` the
//! `tasman` binary runs) so that their memory is measured alone and a site can be SIGKILLed.

mod net;
mod proc_stat;
mod procs;
mod quic;
mod stats;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use rand::Rng;
use topology::builder::{TopologyBuilder, ms};
use topology::{NodeKind, Topology};

#[derive(Parser, Debug)]
#[command(name = "tasman-bench", about = "Tasman's whole-system benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run every benchmark once and write the report.
    #[command(
        after_help = "Example:\n  bench/run                      # builds release, then:\n  \
                            target/release/tasman-bench all --out docs/benchmarks.md"
    )]
    All(AllArgs),
    /// Internal: an echo server in its own process (the 10,000-connection run needs its own
    /// file-descriptor budget), printing `ready ADDR`.
    #[command(hide = true)]
    ServeEcho {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Internal: run one router of a benchmark fabric in this process until killed.
    #[command(hide = true)]
    ServeRouter {
        #[arg(long)]
        topology: PathBuf,
        #[arg(long)]
        node: String,
        #[arg(long)]
        tls_dir: PathBuf,
        /// As `tasman router --metrics`.
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// As `tasman router --keep-awake` (one thread).
        #[arg(long, value_parser = humantime::parse_duration)]
        keep_awake: Option<Duration>,
        /// As `tasman router --worker-threads`.
        #[arg(long)]
        worker_threads: Option<usize>,
    },
    /// Internal: one side of the minimal quinn proxy pair in this process until killed, printing
    /// `ready ADDR`.
    #[command(hide = true)]
    ServeQuinnProxy {
        #[arg(long, value_enum)]
        role: ProxyRole,
        /// The pair's certificates (`quic::proxy_pki`).
        #[arg(long)]
        tls_dir: PathBuf,
        /// Entry: its TCP listener (its UDP endpoint takes the same IP); exit: its UDP endpoint.
        #[arg(long)]
        listen: SocketAddr,
        /// Entry: the exit's UDP endpoint; exit: the TCP server it connects each stream to.
        #[arg(long)]
        target: SocketAddr,
    },
    /// Internal: spin on `threads` threads until killed (run under `chrt --idle 0` by
    /// `procs::Spinner`).
    #[command(hide = true)]
    Spin {
        #[arg(long)]
        threads: usize,
    },
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum ProxyRole {
    Entry,
    Exit,
}

#[derive(clap::Args, Debug, Clone)]
struct AllArgs {
    /// Where to write the Markdown report ("-" for stdout only).
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: String,
    /// MiB sent in each throughput run.
    #[arg(long, default_value_t = 2048)]
    mib: u64,
    /// Ping-pongs per latency run (a multiple of the 5 latency rounds).
    #[arg(long, default_value_t = 10_000, value_parser = pings_per_run)]
    pings: usize,
    /// Concurrent proxied connections for the memory measurement.
    #[arg(long, default_value_t = 10_000)]
    conns: usize,
    /// Throughput rounds (each path once per round, interleaved; the median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    rounds: u16,
    /// Kill-and-failover runs.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..))]
    failovers: u16,
    /// Run only these parts (comma-separated) and print their figures to stderr; no report is
    /// written (it needs every part: run without `--only`).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Throughput,
    Latency,
    Memory,
    Failover,
}

fn main() -> ExitCode {
    // The same allocator tuning as the `tasman` binary (routers run in this binary here).
    router::alloc::tune();
    let cli = Cli::parse();
    if let Cmd::Spin { threads } = cli.cmd {
        procs::spin(threads);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Cmd::ServeRouter {
        worker_threads: Some(n),
        ..
    } = cli.cmd
    {
        builder.worker_threads(n.max(1));
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let r = match cli.cmd {
        Cmd::All(args) => rt.block_on(all(args)),
        Cmd::ServeEcho { listen } => rt.block_on(async move {
            let addr = net::echo_server(listen).await?;
            println!("ready {addr}");
            std::future::pending::<anyhow::Result<()>>().await
        }),
        Cmd::ServeRouter {
            topology,
            node,
            tls_dir,
            metrics,
            keep_awake,
            ..
        } => rt.block_on(procs::serve_router(
            topology, node, tls_dir, metrics, keep_awake,
        )),
        Cmd::ServeQuinnProxy {
            role,
            tls_dir,
            listen,
            target,
        } => rt.block_on(async move {
            match role {
                ProxyRole::Entry => quic::proxy_entry(&tls_dir, listen, target).await,
                ProxyRole::Exit => quic::proxy_exit(&tls_dir, listen, target).await,
            }
        }),
        Cmd::Spin { .. } => unreachable!("handled before the runtime is built"),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn ip(a: u8, b: u8, c: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, a, b, c))
}

/// Raises the open-file limit (children inherit it) for the 10,000-connection run.
fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: want.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            // Not privileged: go as high as the hard limit allows.
            let soft = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// Fills in loopback addresses for every node: QUIC on 127.77.1.N, edge clients on 127.77.2.N.
fn place(t: &mut Topology) -> anyhow::Result<()> {
    for (i, n) in t.nodes.iter_mut().enumerate() {
        let i = u8::try_from(i + 1)?;
        let quic = ip(77, 1, i);
        n.address = SocketAddr::new(quic, net::free_udp_port(quic)?);
        if n.kind == NodeKind::Edge {
            n.client_address = Some(ip(77, 2, i));
        }
    }
    for s in &mut t.services {
        s.port = Some(net::free_tcp_port(ip(77, 2, 1))?);
    }
    Ok(())
}

fn service_addr(t: &Topology, edge: &str, service: &str) -> anyhow::Result<SocketAddr> {
    let e = t.node(edge).context("edge")?;
    let port = t
        .service(service)
        .and_then(|s| s.port)
        .context("service port")?;
    Ok(SocketAddr::new(
        e.client_address.context("client address")?,
        port,
    ))
}

fn set_backend(t: &mut Topology, site: &str, service: &str, backend: SocketAddr) {
    if let Some(n) = t.nodes.iter_mut().find(|n| n.id.as_str() == site) {
        for s in &mut n.serves {
            if s.service.as_str() == service {
                s.backend = backend;
            }
        }
    }
}

/// Polls until a connection through `addr` completes one echo (the fabric is up end to end).
async fn wait_echo(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout(Duration::from_secs(2), net::ping_pong(addr, 1, 8)).await {
            Ok(Ok(_)) => return Ok(()),
            _ if Instant::now() > deadline => bail!("no echo through {addr} within 20 s"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

struct Rate {
    name: &'static str,
    /// The median of the rounds' times (halfway between the two middle ones for an even count).
    elapsed: Duration,
    /// Every round, in the order they ran.
    all: Vec<Duration>,
    /// CPU seconds per GiB of every process on the path (the median of the rounds').
    cpu_per_gib: f64,
    /// UDP datagrams the kernel dropped on full receive buffers, all rounds.
    drops: u64,
}

struct Lat {
    name: &'static str,
    hops: u32,
    p50: f64,
    p99: f64,
    p999: f64,
    mean: f64,
    /// CPU (user + system) of every process on the path per round trip, µs.
    cpu_us: f64,
}

/// `--pings`: at least one per latency round and a multiple of [`LAT_ROUNDS`], so that the
/// report's count is the count run.
fn pings_per_run(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if n == 0 || !n.is_multiple_of(LAT_ROUNDS) {
        return Err(format!(
            "{n} is not a positive multiple of {LAT_ROUNDS} (the latency rounds)"
        ));
    }
    Ok(n)
}

/// Latency rounds (each path once per round).
const LAT_ROUNDS: usize = 5;
/// The window of the latency row measured with `--keep-awake`.
const KEEP_AWAKE: &str = "2ms";

fn lat(name: &'static str, hops: u32, mut ns: Vec<u64>) -> Lat {
    ns.sort_unstable();
    let mean = ns.iter().sum::<u64>() as f64 / ns.len().max(1) as f64 / 1000.0;
    Lat {
        name,
        hops,
        p50: net::percentile_us(&ns, 0.5),
        p99: net::percentile_us(&ns, 0.99),
        p999: net::percentile_us(&ns, 0.999),
        mean,
        cpu_us: f64::NAN,
    }
}

/// The failover runs kill the near site after a random delay of 0 to this (uniform, µs): one
/// default probe interval.
const KILL_JITTER_US: u64 = 100_000;

struct Failover {
    /// Kill to the first response served by the next site.
    total: Duration,
    /// The random delay added before the kill ([`KILL_JITTER_US`]).
    offset: Duration,
    attempts: usize,
    failed: usize,
    slowest_attempt: Duration,
}

async fn all(args: AllArgs) -> anyhow::Result<()> {
    let started_at = std::process::Command::new("date").arg("-u").output().ok();
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let nofile = raise_nofile(200_000);
    let bytes = args.mib * 1024 * 1024;
    let want = |p: Part| args.only.is_empty() || args.only.contains(&p);

    // The fabric: e1 -- s1 (one QUIC hop), e2 -- t1 -- s1 (two), services `tput` and `echo`;
    // e3 -- s3 (one hop, `echo` only), both routers with `--keep-awake`; e4 -- s4 (one hop), both
    // routers with `--worker-threads 1`.
    let mut b = TopologyBuilder::new();
    b.node("e1", NodeKind::Edge)
        .node("e2", NodeKind::Edge)
        .node("t1", NodeKind::Transit)
        .node("s1", NodeKind::Site)
        .node("e3", NodeKind::Edge)
        .node("s3", NodeKind::Site)
        .node("e4", NodeKind::Edge)
        .node("s4", NodeKind::Site)
        .link("e1", "s1", ms(0.05))
        .link("e2", "t1", ms(0.05))
        .link("t1", "s1", ms(0.05))
        .link("e3", "s3", ms(0.05))
        .link("e4", "s4", ms(0.05))
        .service("tput")
        .service("echo")
        .serve("s1", "tput", 1_000_000)
        .serve("s1", "echo", 1_000_000)
        .serve("s3", "echo", 1_000_000)
        .serve("s4", "tput", 1_000_000)
        .serve("s4", "echo", 1_000_000);
    let mut topo = b.build();
    place(&mut topo)?;
    let sink = net::count_sink(SocketAddr::new(ip(77, 3, 1), 0)).await?;
    let echo_proc = procs::EchoProc::start(SocketAddr::new(ip(77, 3, 1), 0))?;
    let echo = echo_proc.addr();
    set_backend(&mut topo, "s1", "tput", sink);
    set_backend(&mut topo, "s1", "echo", echo);
    set_backend(&mut topo, "s3", "echo", echo);
    set_backend(&mut topo, "s4", "tput", sink);
    set_backend(&mut topo, "s4", "echo", echo);
    let mut fabric = procs::ProcFabric::new(&topo)?;
    for n in ["s1", "t1", "e1", "e2"] {
        fabric.start(n)?;
    }
    for n in ["s3", "e3"] {
        fabric.start_with(n, &["--keep-awake", KEEP_AWAKE])?;
    }
    for n in ["s4", "e4"] {
        fabric.start_with(n, &["--worker-threads", "1"])?;
    }
    let e1_tput = service_addr(&topo, "e1", "tput")?;
    let e2_tput = service_addr(&topo, "e2", "tput")?;
    let e1_echo = service_addr(&topo, "e1", "echo")?;
    let e2_echo = service_addr(&topo, "e2", "echo")?;
    let e3_echo = service_addr(&topo, "e3", "echo")?;
    let e4_echo = service_addr(&topo, "e4", "echo")?;
    let e4_tput = service_addr(&topo, "e4", "tput")?;
    wait_echo(e1_echo).await?;
    wait_echo(e2_echo).await?;
    wait_echo(e3_echo).await?;
    wait_echo(e4_echo).await?;
    let hap_tput_addr = SocketAddr::new(ip(77, 4, 1), net::free_tcp_port(ip(77, 4, 1))?);
    let hap_echo_addr = SocketAddr::new(ip(77, 4, 2), net::free_tcp_port(ip(77, 4, 2))?);
    let hap_tput = procs::Haproxy::start(hap_tput_addr, sink)?;
    let hap_echo = procs::Haproxy::start(hap_echo_addr, echo)?;
    // Two HAProxys in series: the same number of proxy processes as edge -> site.
    let hap_chain_addr = SocketAddr::new(ip(77, 4, 3), net::free_tcp_port(ip(77, 4, 3))?);
    let hap_chain = procs::Haproxy::start(hap_chain_addr, hap_echo_addr)?;
    // The minimal quinn proxy pair: two processes joined by one QUIC connection, as edge -> site.
    let qpair_tput = procs::QuinnProxyPair::start(ip(77, 5, 1), sink)?;
    let qpair_echo = procs::QuinnProxyPair::start(ip(77, 5, 2), echo)?;
    wait_echo(qpair_echo.addr()).await?;

    // 1. Throughput: one TCP stream.
    let rounds = if want(Part::Throughput) {
        args.rounds
    } else {
        0
    };
    eprintln!("throughput: {} MiB per run", args.mib);
    // Three rounds, the paths interleaved in each, so that a burst of load from elsewhere on the
    // machine does not land on one path only; the table shows each path's median round.
    const NAMES: [&str; 8] = [
        "direct TCP (client -> sink)",
        "HAProxy 2-thread `mode tcp`",
        "bare quinn stream (same TLS + transport config)",
        "minimal quinn proxy pair (two processes, same TLS + transport config)",
        "Tasman edge -> site (1 QUIC hop)",
        "Tasman edge -> transit -> site (2 QUIC hops)",
        "bare quinn stream (same TLS, quinn's default transport config)",
        "Tasman edge -> site, both routers with `--worker-threads 1` (opt-in)",
    ];
    // Rows of NAMES the report and the summary refer to.
    const T_QUINN: usize = 2;
    const T_QPAIR: usize = 3;
    const T_EDGE_SITE: usize = 4;
    const T_TRANSIT: usize = 5;
    const T_QUINN_DEFAULTS: usize = 6;
    const T_ONE_WORKER: usize = 7;
    let mut runs: Vec<Vec<Duration>> = vec![Vec::new(); NAMES.len()];
    let mut cpus: Vec<Vec<f64>> = vec![Vec::new(); NAMES.len()];
    let mut udp_drops = vec![0u64; NAMES.len()];
    for round in 0..rounds {
        for (f, name) in NAMES.iter().enumerate() {
            let routers: &[&str] = match f {
                T_EDGE_SITE => &["e1", "s1"],
                T_TRANSIT => &["e2", "t1", "s1"],
                T_ONE_WORKER => &["e4", "s4"],
                _ => &[],
            };
            // CPU of every process on the path: the routers (or the quinn proxy pair), and this
            // one (client and sink, or both bare quinn endpoints) with HAProxy on its path.
            let (router_pids, proxies) = if f == T_QPAIR {
                (qpair_tput.pids(), "proxies")
            } else {
                let pids = routers
                    .iter()
                    .map(|n| fabric.pid(n))
                    .collect::<anyhow::Result<Vec<u32>>>()?;
                (pids, "routers")
            };
            let mut other_pids = vec![std::process::id()];
            if f == 1 {
                other_pids.push(hap_tput.pid());
            }
            // A path whose neighbour was declared down during an earlier run (CPU starvation
            // here) is in its hold-down for up to a second: start when it carries traffic.
            match f {
                T_EDGE_SITE => wait_echo(e1_echo).await?,
                T_TRANSIT => wait_echo(e2_echo).await?,
                T_ONE_WORKER => wait_echo(e4_echo).await?,
                _ => {}
            }
            // A bare quinn connection is made and warmed first, out of the measurement, as
            // the routers' connections are up and warm before their rows.
            let warm = match f {
                T_QUINN => Some(quic::Warm::new(quic::Tuning::Fabric).await?),
                T_QUINN_DEFAULTS => Some(quic::Warm::new(quic::Tuning::QuinnDefaults).await?),
                _ => None,
            };
            let router_before = procs::cpu_ms_of(&router_pids)?;
            let other_before = procs::cpu_ms_of(&other_pids)?;
            let drops_before = procs::udp_rcvbuf_errors();
            let elapsed = match f {
                0 => net::push(sink, bytes).await?,
                1 => net::push(hap_tput_addr, bytes).await?,
                T_QUINN | T_QUINN_DEFAULTS => match warm {
                    Some(w) => w.push(bytes).await?,
                    None => unreachable!("made above for the bare quinn rows"),
                },
                T_QPAIR => net::push(qpair_tput.addr(), bytes).await?,
                T_EDGE_SITE => net::push(e1_tput, bytes).await?,
                T_TRANSIT => net::push(e2_tput, bytes).await?,
                T_ONE_WORKER => net::push(e4_tput, bytes).await?,
                _ => unreachable!("every throughput path has its arm"),
            };
            let per_gib = |ms: u64| ms as f64 / 1000.0 / (bytes as f64 / (1u64 << 30) as f64);
            let router_ms = procs::cpu_ms_of(&router_pids)? - router_before;
            let other_ms = procs::cpu_ms_of(&other_pids)? - other_before;
            let cpu_used = per_gib(router_ms + other_ms);
            let router_used = per_gib(router_ms);
            let drops = procs::udp_rcvbuf_errors().saturating_sub(drops_before);
            eprintln!(
                "  round {}: {name}: {:.2} Gbit/s, CPU {cpu_used:.2} s per GiB, \
                 UDP datagrams dropped (receive buffer full) {drops}{}",
                round + 1,
                gbps(bytes, elapsed),
                if router_pids.is_empty() {
                    String::new()
                } else {
                    format!(" ({proxies}: {router_used:.2})")
                }
            );
            cpus[f].push(cpu_used);
            udp_drops[f] += drops;
            runs[f].push(elapsed);
        }
    }
    let rates: Vec<Rate> = NAMES
        .iter()
        .zip(runs.into_iter().zip(cpus).zip(udp_drops))
        .map(|(name, ((v, mut c), drops))| {
            let mut sorted = v.clone();
            sorted.sort();
            c.sort_by(f64::total_cmp);
            Rate {
                name,
                elapsed: stats::median(&sorted).unwrap_or(Duration::MAX),
                all: v,
                cpu_per_gib: stats::median(&c).unwrap_or(f64::NAN),
                drops,
            }
        })
        .collect();
    if rounds > 0 {
        let of = |a: usize, b: usize| {
            100.0 * rates[b].elapsed.as_secs_f64() / rates[a].elapsed.as_secs_f64()
        };
        eprintln!(
            "  median: edge -> site {:.2} Gbit/s = {:.0} % of bare quinn ({:.2} Gbit/s; {:.0} % of quinn with its defaults, {:.2} Gbit/s); \
             minimal quinn proxy pair {:.2} Gbit/s = {:.0} % of bare quinn (edge -> site: {:.0} % of the pair)",
            gbps(bytes, rates[T_EDGE_SITE].elapsed),
            of(T_EDGE_SITE, T_QUINN),
            gbps(bytes, rates[T_QUINN].elapsed),
            of(T_EDGE_SITE, T_QUINN_DEFAULTS),
            gbps(bytes, rates[T_QUINN_DEFAULTS].elapsed),
            gbps(bytes, rates[T_QPAIR].elapsed),
            of(T_QPAIR, T_QUINN),
            of(T_EDGE_SITE, T_QPAIR),
        );
    }

    // 2. Latency: 64-byte ping-pongs on one connection.
    eprintln!("latency: {} ping-pongs of 64 B per run", args.pings);
    let paths = [
        ("direct TCP (client -> echo)", 0, Some(echo)),
        ("HAProxy `mode tcp`", 0, Some(hap_echo_addr)),
        ("Tasman edge -> site", 1, Some(e1_echo)),
        ("Tasman edge -> transit -> site", 2, Some(e2_echo)),
        (
            "HAProxy -> HAProxy (two proxy processes, as edge -> site)",
            0,
            Some(hap_chain_addr),
        ),
        (
            "minimal quinn proxy pair (two processes, as edge -> site)",
            1,
            Some(qpair_echo.addr()),
        ),
        (
            "bare quinn stream (same TLS + transport config; echo in the client's process)",
            0,
            None,
        ),
        (
            "Tasman edge -> site, both routers with `--worker-threads 1` (opt-in)",
            1,
            Some(e4_echo),
        ),
        (
            "Tasman edge -> site, both routers with `--keep-awake 2ms` (opt-in)",
            1,
            Some(e3_echo),
        ),
        (
            "direct TCP (client -> echo), 2 idle-priority spinner threads running (the `--keep-awake` row's baseline)",
            0,
            Some(echo),
        ),
    ];
    // Rows of `paths` the report and the summary refer to.
    const L_DIRECT: usize = 0;
    const L_EDGE_SITE: usize = 2;
    const L_TRANSIT: usize = 3;
    const L_HAPROXY_PAIR: usize = 4;
    const L_QPAIR: usize = 5;
    const L_QUINN: usize = 6;
    const L_ONE_WORKER: usize = 7;
    const L_KEEP_AWAKE: usize = 8;
    // Direct TCP while as many idle-priority threads spin as the `--keep-awake` routers run (one
    // set per router, two routers): they keep the cores out of their halt for every process of
    // the host, the client and the echo server too, so the routers' added latency is the
    // keep-awake row less this one, not less direct TCP with idle cores.
    const L_DIRECT_SPIN: usize = 9;
    let keep_awake_spinners = 2 * procs::KEEP_AWAKE_THREADS;
    // The baseline each row's added latency is measured from.
    let baseline = |i: usize| {
        if i == L_KEEP_AWAKE {
            L_DIRECT_SPIN
        } else {
            L_DIRECT
        }
    };
    let lat_paths = if want(Part::Latency) { paths.len() } else { 0 };
    // The processes each path's round trips run through (their CPU is counted per round trip).
    let me = std::process::id();
    let (echo_pid, hap_pid, chain_pid) = (echo_proc.pid(), hap_echo.pid(), hap_chain.pid());
    let (e1, e2, t1, s1, e3, s3, e4, s4) = (
        fabric.pid("e1")?,
        fabric.pid("e2")?,
        fabric.pid("t1")?,
        fabric.pid("s1")?,
        fabric.pid("e3")?,
        fabric.pid("s3")?,
        fabric.pid("e4")?,
        fabric.pid("s4")?,
    );
    let mut qpair = qpair_echo.pids();
    qpair.extend([me, echo_pid]);
    // Not the spinners': they are on no path, and stand for other work on the host.
    let pids: [Vec<u32>; 10] = [
        vec![me, echo_pid],
        vec![me, echo_pid, hap_pid],
        vec![me, echo_pid, e1, s1],
        vec![me, echo_pid, e2, t1, s1],
        vec![me, echo_pid, chain_pid, hap_pid],
        qpair,
        vec![me],
        vec![me, echo_pid, e4, s4],
        vec![me, echo_pid, e3, s3],
        vec![me, echo_pid],
    ];
    // Interleaved: every path gets one connection per round, so a slow stretch of the machine
    // falls on all of them alike.
    // Each round runs every path twice: with idle cores (the headline), then with an idle-priority
    // spinner keeping both cores busy (`procs::Spinner`), to show what the idle vCPUs' wake-ups cost.
    let mut samples: [Vec<Vec<u64>>; 2] =
        [vec![Vec::new(); lat_paths], vec![Vec::new(); lat_paths]];
    let mut cpu_ms = [[0u64; 10]; 2];
    let per_round = args.pings.div_ceil(LAT_ROUNDS);
    for _ in 0..LAT_ROUNDS {
        for busy in [0, 1] {
            let _spinner = if busy == 1 && lat_paths > 0 {
                Some(procs::Spinner::per_core()?)
            } else {
                None
            };
            for (i, (_, _, addr)) in paths.iter().take(lat_paths).enumerate() {
                let _path_spinner = if i == L_DIRECT_SPIN {
                    Some(procs::Spinner::start(keep_awake_spinners)?)
                } else {
                    None
                };
                let before = procs::cpu_ms_of(&pids[i])?;
                samples[busy][i].extend(match addr {
                    Some(a) => net::ping_pong(*a, per_round, 64).await?,
                    None => quic::ping_pong(per_round, 64, quic::Tuning::Fabric).await?,
                });
                cpu_ms[busy][i] += procs::cpu_ms_of(&pids[i])? - before;
            }
        }
    }
    // Warm-up round trips (and, for bare quinn, the handshake) are in the CPU figure too.
    let trips = (LAT_ROUNDS * (per_round + net::WARM_UP)) as f64;
    let paths_len = paths.len();
    let [idle_samples, busy_samples] = samples;
    let mut lat_sets: [Vec<Lat>; 2] = [Vec::new(), Vec::new()];
    for (busy, set) in [idle_samples, busy_samples].into_iter().enumerate() {
        eprintln!(
            "  {}:",
            if busy == 1 {
                "cores kept busy"
            } else {
                "idle cores"
            }
        );
        for (i, ((name, hops, _), ns)) in paths.iter().zip(set).enumerate() {
            let mut l = lat(name, *hops, ns);
            l.cpu_us = cpu_ms[busy][i] as f64 * 1000.0 / trips;
            eprintln!(
                "  {name}: p50 {:.1} us, p99 {:.1} us, CPU {:.1} us per round trip",
                l.p50, l.p99, l.cpu_us
            );
            lat_sets[busy].push(l);
        }
        let lats = &lat_sets[busy];
        if lats.len() == paths_len {
            let added = |i: usize| lats[i].p50 - lats[baseline(i)].p50;
            eprintln!(
                "  added p50: edge -> site {:.1} us, transit {:.1} us more; minimal quinn proxy pair \
                 {:.1} us; two HAProxys {:.1} us; quinn over TCP {:.1} us; edge -> site with \
                 --keep-awake {:.1} us (over direct TCP with {keep_awake_spinners} spinner threads); \
                 edge -> site with --worker-threads 1 {:.1} us",
                added(L_EDGE_SITE),
                lats[L_TRANSIT].p50 - lats[L_EDGE_SITE].p50,
                added(L_QPAIR),
                added(L_HAPROXY_PAIR),
                added(L_QUINN),
                added(L_KEEP_AWAKE),
                added(L_ONE_WORKER),
            );
        }
    }
    let [lats, busy_lats] = lat_sets;

    // 3. Memory per proxied connection.
    let conns = if want(Part::Memory) { args.conns } else { 0 };
    eprintln!("memory: {conns} connections");
    if conns > 0 {
        // Fresh routers: memory the allocator kept from the runs above (freed, but still
        // resident) would otherwise absorb the new connections and hide them from RSS.
        for n in ["e1", "s1"] {
            fabric.kill(n)?;
        }
        for n in ["s1", "e1"] {
            fabric.start(n)?;
        }
        wait_echo(e1_echo).await?;
        // Every neighbour connection made again (each router dials each of its neighbours: e1
        // and s1 each other, s1 and t1 each other) before "before": one still being made
        // would land inside the measurement. Then as long a settle as "after" gets.
        let t = Instant::now();
        fabric.wait_neighbours_up(Duration::from_secs(20)).await?;
        eprintln!(
            "  every neighbour up {:.0} ms after the first echo through the restarted routers",
            t.elapsed().as_secs_f64() * 1000.0
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let e1_before = fabric.rss_kib("e1")?;
    let s1_before = fabric.rss_kib("s1")?;
    let t0 = Instant::now();
    let held = net::hold(e1_echo, conns, 256).await?;
    let open_time = t0.elapsed();
    // Let the routers settle (buffers allocated on first use are counted).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let e1_after = fabric.rss_kib("e1")?;
    let s1_after = fabric.rss_kib("s1")?;
    drop(held);
    let hap_pid = hap_echo.pid();
    let hap_before = proc_stat::rss_kib(hap_pid)?;
    // HAProxy holds both sides of each connection and the file limit is 20,000 per process here.
    let hap_conns = conns.min(procs::HAPROXY_MAX_CONNS);
    let held = net::hold(hap_echo_addr, hap_conns, 256).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hap_after = proc_stat::rss_kib(hap_pid)?;
    drop(held);
    eprintln!(
        "  Tasman: +{} KiB (edge) +{} KiB (site); HAProxy: +{} KiB",
        e1_after.saturating_sub(e1_before),
        s1_after.saturating_sub(s1_before),
        hap_after.saturating_sub(hap_before)
    );
    drop(hap_tput);
    drop(hap_chain);
    drop(hap_echo);
    drop(qpair_tput);
    drop(qpair_echo);
    drop(fabric);

    // 4. Failover after SIGKILL of the nearest site, with the default probes.
    let failovers = if want(Part::Failover) {
        args.failovers
    } else {
        0
    };
    eprintln!("failover: {failovers} runs");
    let mut fails = Vec::new();
    for run in 0..failovers {
        // A run the harness refuses (the fabric never settled, the edge left the near site
        // before the kill, a far site served faster than any detection) is made again on a fresh fabric, twice at most: one refusal threw the
        // whole benchmark away, its other parts measured for minutes. A failover that fails
        // (no answer after the kill) fails the benchmark, as before.
        let mut tries = 0;
        let f = loop {
            tries += 1;
            match failover_once().await {
                Ok(f) => break f,
                Err(e) if tries < 3 && e.downcast_ref::<HarnessRefused>().is_some() => {
                    eprintln!("  run {}: refused ({e:#}); made again", run + 1);
                }
                Err(e) => return Err(e).with_context(|| format!("failover run {}", run + 1)),
            }
        };
        eprintln!(
            "  run {}: {:.0} ms (random delay before the kill {:.0} ms)",
            run + 1,
            f.total.as_secs_f64() * 1000.0,
            f.offset.as_secs_f64() * 1000.0
        );
        fails.push(f);
    }

    if !args.only.is_empty() {
        let mut ms: Vec<f64> = fails
            .iter()
            .map(|f| f.total.as_secs_f64() * 1000.0)
            .collect();
        ms.sort_by(f64::total_cmp);
        if let (Some(min), Some(med), Some(max)) = (ms.first(), stats::median(&ms), ms.last()) {
            eprintln!("  failover: min {min:.0} ms, median {med:.0} ms, max {max:.0} ms");
        }
        eprintln!("(--only: no report written)");
        return Ok(());
    }

    // The report.
    let mut md = String::new();
    let cmd = format!(
        "bench/run   # = cargo run --release -p tasman-bench -- all --mib {} --rounds {} --pings {} --conns {} --failovers {}",
        args.mib, args.rounds, args.pings, args.conns, args.failovers
    );
    writeln!(md, "## Data plane: whole system\n")?;
    writeln!(
        md,
        "Measured in one run by `tasman-bench all` (release build). Regenerate with:\n"
    )?;
    writeln!(md, "```sh\n{cmd}\n```\n")?;
    writeln!(md, "### Machine\n")?;
    writeln!(md, "| | |\n|---|---|")?;
    writeln!(
        md,
        "| date | {} |",
        started_at
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    )?;
    writeln!(
        md,
        "| CPU | {} ({} cores visible) |",
        cpu_model(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    )?;
    writeln!(md, "| memory | {} |", mem_total())?;
    writeln!(md, "| kernel | {} |", cmd_line("uname", &["-sr"]))?;
    writeln!(md, "| rustc | {} |", cmd_line("rustc", &["-V"]))?;
    writeln!(md, "| HAProxy | {} |", procs::Haproxy::version())?;
    writeln!(
        md,
        "| load average at start | {} |",
        loadavg
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )?;
    writeln!(md, "| open-file limit | {nofile} |\n")?;
    writeln!(
        md,
        "Everything runs on loopback on this one machine: the client, the sink or echo server, and each\n\
         router in its own process (`tasman-bench serve-router`, the same `router::Router` that `tasman router`\n\
         runs, default configuration plus a `--metrics` endpoint, from which the benchmark reads neighbour\n\
         state, and no per-source connection cap: the 10,000 connections come from one address). The machine's cores are shared by the client, the servers and the routers, so a proxy's\n\
         figures include competition for CPU with its own load generator.\n\n\
         The minimal quinn proxy pair is the simplest form of two proxy processes joined by QUIC: an entry\n\
         process carries each client TCP connection on one bidirectional stream of its one QUIC connection\n\
         to an exit process, which connects TCP to the sink or echo server (`tasman-bench serve-quinn-proxy`,\n\
         the routers' runtime, TLS and transport configuration). Each side moves the bytes without copying\n\
         them, as the routers do: TCP -> QUIC reads into 256 KiB blocks (the routers' largest TCP read) and\n\
         hands quinn the frozen bytes (`write_chunk`); QUIC -> TCP takes quinn's own chunks (`read_chunks`,\n\
         16 at a time) and writes them with vectored writes. It passes half-closes on and sets TCP_NODELAY;\n\
         no header, routing, metrics or health.\n\n\
         The bare quinn stream runs two endpoints in the benchmark's process, on a connection made and\n\
         warmed (a first, untimed 64 MiB stream) before its row is measured, as the routers' connections are\n\
         up and warm before theirs; its sender hands quinn one shared buffer without copying it\n\
         (`write_chunk`), and its receiver counts quinn's chunks (`read_chunk`).\n"
    )?;

    writeln!(md, "### Throughput of one TCP stream\n")?;
    writeln!(
        md,
        "{} MiB written on one connection, half-closed, until the receiver's byte count comes back; {} rounds,\n\
         every path once per round (interleaved): the median round, and every round in the order run.\n\
         CPU: user + system time of every process on the path (the benchmark process, which holds the\n\
         client, the sink and both bare quinn endpoints; the routers; the quinn proxy pair; HAProxy)\n\
         during the run, per GiB moved. UDP drops: datagrams the kernel discarded because a socket's\n\
         receive buffer was full (`RcvbufErrors`, whole machine, during the path's runs).\n",
        args.mib, args.rounds
    )?;
    writeln!(
        md,
        "| path | time (median) | Gbit/s (median) | Gbit/s, rounds in the order run | vs bare quinn | CPU s per GiB, all processes | UDP drops, all rounds |\n|---|---:|---:|---:|---:|---:|---:|"
    )?;
    let quinn_rate = gbps(bytes, rates[T_QUINN].elapsed);
    for r in &rates {
        let g = gbps(bytes, r.elapsed);
        let all: Vec<String> = r
            .all
            .iter()
            .map(|d| format!("{:.2}", gbps(bytes, *d)))
            .collect();
        writeln!(
            md,
            "| {} | {:.2} s | {:.2} | {} | {:.0} % | {:.2} | {} |",
            r.name,
            r.elapsed.as_secs_f64(),
            g,
            all.join(", "),
            100.0 * g / quinn_rate,
            r.cpu_per_gib,
            r.drops
        )?;
    }
    let edge_site_rate = gbps(bytes, rates[T_EDGE_SITE].elapsed);
    let pair_rate = gbps(bytes, rates[T_QPAIR].elapsed);
    let fabric_ratio = edge_site_rate / quinn_rate;
    let default_ratio = edge_site_rate / gbps(bytes, rates[T_QUINN_DEFAULTS].elapsed);
    writeln!(
        md,
        "\nTarget: edge -> site at least 80 % of the bare quinn stream. Judged against the bare stream with\n\
         the same transport configuration (the stricter reading): **{:.0} %** ({}). Against a bare quinn stream\n\
         with quinn's default configuration: {:.0} %. The minimal quinn proxy pair (two processes, the same\n\
         configuration) reaches **{:.0} %** of the bare quinn stream, and edge -> site {:.0} % of the pair.\n",
        fabric_ratio * 100.0,
        if fabric_ratio >= 0.8 { "met" } else { "missed" },
        default_ratio * 100.0,
        100.0 * pair_rate / quinn_rate,
        100.0 * edge_site_rate / pair_rate
    )?;
    let one_worker_ratio = gbps(bytes, rates[T_ONE_WORKER].elapsed) / quinn_rate;
    writeln!(
        md,
        "With `tasman router --worker-threads 1` on both routers (opt-in; the default is one worker per\n\
         core), edge -> site reaches **{:.0} %** of the bare quinn stream ({}): on two cores shared with the\n\
         load generator, one worker per router spares the hand-offs between a router's threads.\n",
        one_worker_ratio * 100.0,
        if one_worker_ratio >= 0.8 {
            "met"
        } else {
            "missed"
        },
    )?;

    writeln!(md, "### Request latency\n")?;
    writeln!(
        md,
        "{} round trips of 64 bytes per path (TCP_NODELAY), in {LAT_ROUNDS} rounds with every path once per round\n\
         (interleaved), each round on a new connection after {} warm-up round trips. CPU: user + system time\n\
         of every process the round trips pass through (client, echo server, proxies or routers; for bare\n\
         quinn the one process), warm-up included, per round trip. Added p50 per hop: over direct TCP in\n\
         the same table, except for the `--keep-awake` row: over its baseline, the last row (see below).\n",
        args.pings,
        net::WARM_UP
    )?;
    writeln!(
        md,
        "| path | QUIC hops | p50 µs | p99 µs | p99.9 µs | mean µs | added p50 per hop µs | CPU µs per round trip, all processes |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    let direct_p50 = lats[L_DIRECT].p50;
    for (i, l) in lats.iter().enumerate() {
        let per_hop = if l.hops == 0 {
            "".to_string()
        } else {
            format!("{:.1}", (l.p50 - lats[baseline(i)].p50) / l.hops as f64)
        };
        writeln!(
            md,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} |",
            l.name, l.hops, l.p50, l.p99, l.p999, l.mean, per_hop, l.cpu_us
        )?;
    }
    let one_hop = lats[L_EDGE_SITE].p50 - direct_p50;
    let transit = lats[L_TRANSIT].p50 - lats[L_EDGE_SITE].p50;
    let haproxy_pair = lats[L_HAPROXY_PAIR].p50 - direct_p50;
    let qpair = lats[L_QPAIR].p50 - direct_p50;
    let quic_leg = lats[L_QUINN].p50 - direct_p50;
    writeln!(
        md,
        "\nAdded p50 for edge -> site (one QUIC hop, two routers): **{one_hop:.1} µs** (target < 100 µs per hop: {}).\n\
         A transit router adds {transit:.1} µs more at p50. For scale, the same two proxy processes as\n\
         HAProxy in `mode tcp` (no encryption, no QUIC) add {haproxy_pair:.1} µs, and a bare quinn round trip\n\
         costs {quic_leg:.1} µs more than a TCP one (with both quinn endpoints in one process, which spares\n\
         it the cross-process wake-ups the TCP pair pays); summed, {:.1} µs estimates what two proxy\n\
         processes joined by a QUIC leg add. Measured directly, the minimal quinn proxy pair adds\n\
         **{qpair:.1} µs**: Tasman edge -> site adds {:.1} µs {} than the pair.\n",
        if one_hop < 100.0 { "met" } else { "missed" },
        haproxy_pair + quic_leg,
        (one_hop - qpair).abs(),
        if one_hop >= qpair { "more" } else { "less" }
    )?;
    let one_worker = lats[L_ONE_WORKER].p50 - direct_p50;
    writeln!(
        md,
        "With `tasman router --worker-threads 1` on both routers (opt-in), edge -> site adds **{one_worker:.1} µs**\n\
         at p50 (target < 100 µs per hop: {}): each router's tasks (its QUIC endpoint and connection\n\
         drivers, the splice tasks) then run on one thread, so no hand-off between them wakes another\n\
         thread.\n",
        if one_worker < 100.0 { "met" } else { "missed" },
    )?;
    let spin_direct = lats[L_DIRECT_SPIN].p50;
    let keep_awake = lats[L_KEEP_AWAKE].p50 - spin_direct;
    writeln!(
        md,
        "With `tasman router --keep-awake {KEEP_AWAKE}` on both routers (opt-in, off by default: an idle-priority\n\
         thread in each router spins while traffic moved within the window, so the cores stay out of their\n\
         halt; their spinning is in the CPU column), a round trip through edge -> site takes {:.1} µs at p50\n\
         ({:.1} with the default). Those {keep_awake_spinners} spinning threads keep every process on the host out of the\n\
         halt, the client and the echo server too, so the routers' share is measured against direct TCP\n\
         with {keep_awake_spinners} idle-priority spinner threads running (the table's last row, right after the\n\
         `--keep-awake` row in each round: {spin_direct:.1} µs instead of {direct_p50:.1} with idle cores; the\n\
         spinners' own CPU is not in its CPU column). Not the \"cores kept busy\" direct figure below: that\n\
         spinner runs one thread per core, as many as these only on a 2-core machine. Edge -> site with\n\
         `--keep-awake` adds **{keep_awake:.1} µs** at p50 (target < 100 µs per hop: {}); counted from direct\n\
         TCP with idle cores, as before, it would seem to add {:.1} µs, crediting the routers with the\n\
         client's and the echo server's faster wake-ups.\n",
        lats[L_KEEP_AWAKE].p50,
        lats[L_EDGE_SITE].p50,
        if keep_awake < 100.0 { "met" } else { "missed" },
        lats[L_KEEP_AWAKE].p50 - direct_p50,
    )?;
    writeln!(
        md,
        "The same round trips with both cores kept busy (measured in the same rounds, right after the idle\n\
         ones): an idle-priority spinner (`chrt --idle 0`, one thread per core) runs only when nothing\n\
         else wants a core, so a woken process preempts it at once instead of waiting for an idle vCPU to\n\
         leave its halt. It stands for a host kept busy by other work; the table above is the headline.\n"
    )?;
    writeln!(
        md,
        "| path, cores kept busy | p50 µs | p99 µs | added p50 per hop µs | CPU µs per round trip, all processes |\n|---|---:|---:|---:|---:|"
    )?;
    let busy_direct = busy_lats[L_DIRECT].p50;
    for (i, l) in busy_lats.iter().enumerate() {
        let per_hop = if l.hops == 0 {
            "".to_string()
        } else {
            format!(
                "{:.1}",
                (l.p50 - busy_lats[baseline(i)].p50) / l.hops as f64
            )
        };
        writeln!(
            md,
            "| {} | {:.1} | {:.1} | {} | {:.1} |",
            l.name, l.p50, l.p99, per_hop, l.cpu_us
        )?;
    }
    let busy_one_hop = busy_lats[L_EDGE_SITE].p50 - busy_direct;
    writeln!(
        md,
        "\nWith the cores kept busy, edge -> site adds **{busy_one_hop:.1} µs** at p50 (direct TCP {busy_direct:.1} µs \
         instead of {direct_p50:.1}); the minimal quinn proxy pair adds {:.1} µs and two HAProxys {:.1} µs.\n",
        busy_lats[L_QPAIR].p50 - busy_direct,
        busy_lats[L_HAPROXY_PAIR].p50 - busy_direct,
    )?;

    writeln!(md, "### Failure detection and failover\n")?;
    let probes = router::ProbeConfig::default();
    let interval_ms = probes.interval.as_secs_f64() * 1000.0;
    let misses = f64::from(probes.misses);
    writeln!(
        md,
        "An edge with two sites (`near` 1 ms, `far` 12 ms declared; loopback, no emulated delay). The near\n\
         site's router process is killed with SIGKILL (it sends nothing to its neighbours) after a random\n\
         delay of 0 to {:.0} ms (uniform), so that the kills land at different points of the edge's probe\n\
         cycle; from that instant a new client connection starts every 5 ms (HTTP GET to the demo backend,\n\
         5 s timeout each). Failover time is from the kill to the first complete response served by the\n\
         far site. Default probes: every {interval_ms:.0} ms, down after {misses:.0} misses.\n",
        KILL_JITTER_US as f64 / 1000.0,
    )?;
    writeln!(
        md,
        "A probe is missed when unanswered for max(3 x RTT, 30 ms) (`probe_timeout` in\n\
         router/src/neighbours.rs), and after a miss the next probe goes out at once, so a dead neighbour\n\
         is down within interval + {misses:.0} x max(3 x RTT, 30 ms) of its death: sooner if it dies just\n\
         before a probe goes out, that long if just after one was answered. On loopback the timeout sits at\n\
         its 30 ms floor: at most {:.0} ms. Over a near link of RTT r above 10 ms it is {interval_ms:.0} +\n\
         {:.0} x r ms, so detection alone stays under 300 ms for near links up to about {:.0} ms of RTT,\n\
         less the time the first response through the next site takes.\n",
        interval_ms + misses * 30.0,
        misses * 3.0,
        (300.0 - interval_ms) / (misses * 3.0),
    )?;
    writeln!(
        md,
        "| run | random delay before the kill | kill -> first response from next site | connections tried | failed | slowest attempt |\n|---:|---:|---:|---:|---:|---:|"
    )?;
    for (i, f) in fails.iter().enumerate() {
        writeln!(
            md,
            "| {} | {:.0} ms | {:.0} ms | {} | {} | {:.0} ms |",
            i + 1,
            f.offset.as_secs_f64() * 1000.0,
            f.total.as_secs_f64() * 1000.0,
            f.attempts,
            f.failed,
            f.slowest_attempt.as_secs_f64() * 1000.0
        )?;
    }
    let mut totals: Vec<f64> = fails
        .iter()
        .map(|f| f.total.as_secs_f64() * 1000.0)
        .collect();
    totals.sort_by(f64::total_cmp);
    if let (Some(min), Some(med), Some(max)) =
        (totals.first(), stats::median(&totals), totals.last())
    {
        writeln!(
            md,
            "\nMin {min:.0} ms, median **{med:.0} ms**, max {max:.0} ms (target < 300 ms: {}).\n",
            if *max < 300.0 {
                "met"
            } else if med < 300.0 {
                "met at the median, missed in the slowest run"
            } else {
                "missed"
            }
        )?;
    }

    writeln!(md, "### Memory per open proxied connection\n")?;
    let per =
        |before: u64, after: u64| after.saturating_sub(before) as f64 * 1024.0 / args.conns as f64;
    writeln!(
        md,
        "{} client connections held open through edge -> site to an echo server (each proven by one echoed\n\
         byte; opened in {:.1} s, 256 at a time). Resident memory (VmRSS) of each router process before and\n\
         after (0.5 s after the last connection opened). The edge and the site are restarted first, so that\n\
         memory their allocator kept from the runs above does not absorb the connections; \"before\" is taken\n\
         once every router reports each of its neighbours up (the neighbour connections the restart cut,\n\
         in both directions, made again) and 0.5 s more have passed.\n",
        args.conns,
        open_time.as_secs_f64()
    )?;
    writeln!(
        md,
        "| process | RSS before | RSS after | bytes per connection |\n|---|---:|---:|---:|"
    )?;
    writeln!(
        md,
        "| Tasman edge | {e1_before} KiB | {e1_after} KiB | {:.0} |",
        per(e1_before, e1_after)
    )?;
    writeln!(
        md,
        "| Tasman site | {s1_before} KiB | {s1_after} KiB | {:.0} |",
        per(s1_before, s1_after)
    )?;
    writeln!(
        md,
        "| **Tasman edge + site** | {} KiB | {} KiB | **{:.0}** |",
        e1_before + s1_before,
        e1_after + s1_after,
        per(e1_before + s1_before, e1_after + s1_after)
    )?;
    writeln!(
        md,
        "| HAProxy (reference, one process, {hap_conns} connections) | {hap_before} KiB | {hap_after} KiB | {:.0} |\n",
        hap_after.saturating_sub(hap_before) as f64 * 1024.0 / hap_conns as f64
    )?;

    print!("{md}");
    if args.out != "-" {
        splice_report(&args.out, &md)?;
        eprintln!("wrote the data-plane section of {}", args.out);
    }
    Ok(())
}

/// A failover run the harness gave up (the fabric not in the state the run needs before its
/// kill, or a far site served faster than any detection): made again, unlike a failover that
/// failed.
#[derive(Debug)]
struct HarnessRefused(String);

impl std::fmt::Display for HarnessRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HarnessRefused {}

/// One failover measurement on a fresh three-router fabric.
async fn failover_once() -> anyhow::Result<Failover> {
    let mut b = TopologyBuilder::new();
    b.node("edge", NodeKind::Edge)
        .node("near", NodeKind::Site)
        .node("far", NodeKind::Site)
        .link("edge", "near", ms(1.0))
        // 11 ms apart: beyond the hysteresis margin (10 ms), so the edge settles on `near` even
        // if its first choice was made on handshake-inflated RTTs.
        .link("edge", "far", ms(12.0))
        .service("fo")
        .serve("near", "fo", 10_000)
        .serve("far", "fo", 10_000);
    let mut topo = b.build();
    place(&mut topo)?;
    let near = router::backend::DemoBackend::spawn(
        SocketAddr::new(ip(77, 3, 2), 0),
        router::backend::BackendConfig::new("near", "fo"),
    )
    .await?;
    let far = router::backend::DemoBackend::spawn(
        SocketAddr::new(ip(77, 3, 3), 0),
        router::backend::BackendConfig::new("far", "fo"),
    )
    .await?;
    set_backend(&mut topo, "near", "fo", near.local_addr());
    set_backend(&mut topo, "far", "fo", far.local_addr());
    let mut fabric = procs::ProcFabric::new(&topo)?;
    for n in ["near", "far", "edge"] {
        fabric.start(n)?;
    }
    let addr = service_addr(&topo, "edge", "fo")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    // 20 new connections in a row served by `near`: the edge has settled on it alone (while
    // start-up RTTs are inflated, `far` can be within the band of sites sharing new connections,
    // and a connection dealt to it would make the "failover" instant).
    let mut in_a_row = 0;
    while in_a_row < 20 {
        match net::which_site(addr, Duration::from_secs(2)).await {
            Ok(site) if site == "near" => in_a_row += 1,
            _ => {
                in_a_row = 0;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if Instant::now() > deadline {
            return Err(HarnessRefused("the edge never settled on the near site".into()).into());
        }
    }
    // Both neighbour connections warm and probed for a while, then a random part of a probe
    // interval more: detection depends on where in the probe cycle the kill lands (just before a
    // probe goes out, or just after one was answered), and every run would otherwise kill at
    // about the same offset.
    let offset = Duration::from_micros(rand::rng().random_range(0..=KILL_JITTER_US));
    tokio::time::sleep(Duration::from_millis(500) + offset).await;
    // Still on `near` at the kill: a move to `far` in the wait would make the "failover" the
    // first attempt's own few milliseconds.
    let last = net::which_site(addr, Duration::from_secs(2)).await;
    if !matches!(&last, Ok(site) if site == "near") {
        return Err(HarnessRefused(format!(
            "the edge left the near site before the kill: {last:?}"
        ))
        .into());
    }

    let t0 = Instant::now();
    fabric.kill("near")?;
    let mut set = tokio::task::JoinSet::new();
    let mut attempts = 0;
    let mut failed = 0;
    let mut slowest = Duration::ZERO;
    let mut total = None;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let give_up = t0 + Duration::from_secs(10);
    while total.is_none() {
        tokio::select! {
            _ = tick.tick(), if Instant::now() < give_up => {
                attempts += 1;
                set.spawn(async move {
                    let start = Instant::now();
                    let r = net::which_site(addr, Duration::from_secs(5)).await;
                    (start.elapsed(), r)
                });
            }
            Some(done) = set.join_next() => {
                let (took, r) = done?;
                slowest = slowest.max(took);
                match r {
                    Ok(site) if site == "far" => total = Some(t0.elapsed()),
                    Ok(_) => {}
                    Err(_) => failed += 1,
                }
            }
            else => bail!("no response from the far site within 10 s of the kill"),
        }
    }
    // Attempts still in flight must finish too (none may hang).
    while let Some(done) = set.join_next().await {
        let (took, r) = done?;
        slowest = slowest.max(took);
        if r.is_err() {
            failed += 1;
        }
    }
    let total = total.context("no failover")?;
    // Detection takes at least three probe timeouts (3 x 30 ms: a kill just before a probe
    // goes out); far less is a far site served without one: refused rather than reported (and
    // the run made again, as a run refused before its kill).
    if total < Duration::from_millis(50) {
        return Err(HarnessRefused(format!(
            "a failover of {total:?}: faster than any detection"
        ))
        .into());
    }
    Ok(Failover {
        total,
        offset,
        attempts,
        failed,
        slowest_attempt: slowest,
    })
}

const BEGIN: &str =
    "<!-- tasman-bench: begin (generated by bench/run; edit the generator, not this) -->";
const END: &str = "<!-- tasman-bench: end -->";

/// Replaces this tool's section of a shared benchmarks document (between its markers), or appends
/// it; other sections are left as they are.
fn splice_report(path: &str, section: &str) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{BEGIN}\n{section}{END}\n");
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if e > b => format!(
            "{}{block}{}",
            &old[..b],
            old[e + END.len()..].trim_start_matches('\n')
        ),
        _ if old.is_empty() => format!("# Benchmarks\n\n{block}"),
        _ => format!("{}\n{block}", old.trim_end_matches('\n').to_string() + "\n"),
    };
    std::fs::write(path, new).with_context(|| format!("write {path}"))
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown".into())
}

fn mem_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        })
        .unwrap_or_else(|| "unknown".into())
}

fn cmd_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}
