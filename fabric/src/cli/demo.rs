//! `tasman demo`: the local Asia-Pacific fabric run through a controller, measured, with a live
//! failover and a live topology edit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use topology::{Hysteresis, Latency, LinkId, NodeId, NodeKind, ServiceName, Topology};

use super::Signals;
use crate::demo::client::{self, Reply};
use crate::demo::edit::{EdgeChoice, choose_latency_edit, set_link_latency};
use crate::demo::{APAC_YAML, DemoFabric, DemoOptions};

/// The tour's lines on stdout, as `std::println!` writes them, without its panic once the
/// reader is gone (`tasman demo | head`): that stops the demo as Ctrl-C does ([`say`]).
macro_rules! println {
    () => {
        say(format_args!(""))
    };
    ($($arg:tt)*) => {
        say(format_args!($($arg)*))
    };
}

/// Writes one line of the tour. A stdout that no longer takes it (its reader gone) stops the
/// demo as Ctrl-C does, once, unless a signal is stopping it already (raised then, it would be
/// taken for a second one, which stops without the drain): the fabric shut down and its
/// directory removed. (`println!` panicked inside the runtime: the process ended with 101, its
/// directory, the demo CA's key in it, removed while the routers still ran.)
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    static GONE: AtomicBool = AtomicBool::new(false);
    if writeln!(std::io::stdout().lock(), "{line}").is_err()
        && !GONE.swap(true, Ordering::SeqCst)
        && !Signals::received()
    {
        // SAFETY: raise(3) only sends a signal to this process, whose handler (`Signals`) the
        // tour installed before anything was written.
        unsafe {
            libc::raise(libc::SIGTERM);
        }
    }
}

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    tasman demo                      # controller + APAC fabric: measure, fail over, edit live, drain, exit\n  \
    tasman demo --keep               # ... then keep it up; prints curl and `tasman status` commands\n  \
    tasman demo --edges syd-edge-1,lax-edge-1 --fail syd-site-1\n  \
    scripts/demo                     # the same as the first, in a release build")]
pub struct DemoArgs {
    /// Topology file (default: the built-in examples/apac.yaml).
    #[arg(long, value_name = "FILE")]
    topology: Option<PathBuf>,
    /// Keep the fabric running after the tour and print curl commands and the controller's admin
    /// address and token to try (Ctrl-C stops).
    #[arg(long)]
    keep: bool,
    /// Requests per edge and service; the table shows the median time to first byte.
    #[arg(long, default_value_t = 5, value_name = "N")]
    requests: usize,
    /// One request per row (for tests and CI).
    #[arg(long)]
    quick: bool,
    /// Edges to send requests from, comma-separated (default: the Sydney, Auckland, Singapore,
    /// Tokyo and Los Angeles edges when present, else every edge).
    #[arg(long, value_delimiter = ',', value_name = "EDGE,...")]
    edges: Vec<String>,
    /// Site to stop for the failover: the site the first edge uses for the first service (the
    /// default); another is refused, as stopping it would move nothing there.
    #[arg(long, value_name = "SITE")]
    fail: Option<String>,
    /// Use free ports instead of the topology's fixed ones (to run beside another fabric; tests use this).
    #[arg(long)]
    ephemeral_ports: bool,
}

pub fn run(args: DemoArgs) -> ExitCode {
    let ephemeral = args.ephemeral_ports;
    let text = match &args.topology {
        None => APAC_YAML.to_string(),
        Some(p) => match super::topology::read_text_or_report(p) {
            Ok(t) => t,
            Err(code) => return code,
        },
    };
    let source = args
        .topology
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "examples/apac.yaml (built in)".into());
    let topo = match topology::load(&text) {
        Ok(l) => l.topology,
        Err(diags) => {
            for d in diags {
                eprintln!("{}", d.display(&source));
            }
            return ExitCode::from(1);
        }
    };
    if std::env::var_os("RUST_LOG").is_some() {
        // The routers' logs, for debugging; the demo's own output is on stdout.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // Ctrl-C and SIGTERM are caught from here on, before anything is written to disk: they stop
    // the fabric, and its directory (the demo CA's and every node's private key) is removed.
    let signals = match rt.block_on(async { Signals::install_or_exit() }) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let dir = match tempfile::Builder::new().prefix("tasman-demo-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: cannot create a temporary directory: {e}");
            return ExitCode::from(1);
        }
    };
    let outcome = rt.block_on(tour(args, topo, &text, &source, dir.path(), signals));
    // What a cut-short shutdown left running stops with the runtime; only then is the directory
    // removed, so that nothing writes into it after.
    rt.shutdown_timeout(Duration::from_secs(1));
    let path = dir.path().display().to_string();
    if let Err(e) = dir.close() {
        eprintln!("warning: could not remove the demo's directory {path}: {e}");
    }
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            // The demo's fixed addresses (the topology's ports, the controller's 7400 and
            // 7401), one taken by another program: the way around it.
            let text = e.to_string();
            if !ephemeral && text.contains("in use") {
                eprintln!(
                    "hint: another program holds a port the demo uses; `scripts/demo --ephemeral-ports` runs it on free ports"
                );
            }
            ExitCode::from(1)
        }
    }
}

fn fmt_ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

fn path_str(path: &[NodeId]) -> String {
    path.iter()
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(" → ")
}

/// Twice the declared one-way latencies along `path`.
fn declared_rtt(t: &Topology, path: &[NodeId]) -> Latency {
    path.windows(2)
        .filter_map(|w| t.link(&LinkId::new(&w[0], &w[1])).map(|l| l.latency))
        .fold(Latency::ZERO, |acc, l| {
            acc.saturating_add(l).saturating_add(l)
        })
}

/// The middle value, or halfway between the two middle ones for an even count.
fn median(mut v: Vec<Duration>) -> Option<Duration> {
    v.sort();
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some(v[n / 2 - 1] + v[n / 2].saturating_sub(v[n / 2 - 1]) / 2),
    }
}

/// The preferred (site, path) of `edge` for `service`, as its routing table says now.
fn preferred(f: &DemoFabric, edge: &NodeId, service: &str) -> Option<(NodeId, Vec<NodeId>)> {
    let routes = f.router(edge)?.routes();
    routes
        .preferred(service)
        .map(|c| (c.site.clone(), c.path.clone()))
}

struct Row {
    service: String,
    /// The sites that served the requests, as shown (`a×6 b×4` when several did).
    site: String,
    /// The same sites, by name.
    served: Vec<String>,
    path: String,
    declared: String,
    ttfb: String,
}

fn print_rows(rows: &[Row]) {
    let w = |f: fn(&Row) -> &str, h: &str| {
        rows.iter()
            .map(|r| f(r).chars().count())
            .max()
            .unwrap_or(0)
            .max(h.chars().count())
    };
    let (ws, wsite, wp, wd) = (
        w(|r| &r.service, "service"),
        w(|r| &r.site, "site"),
        w(|r| &r.path, "path"),
        w(|r| &r.declared, "declared RTT"),
    );
    println!(
        "  {:ws$}  {:wsite$}  {:wp$}  {:>wd$}  {:>10}",
        "service", "site", "path", "declared RTT", "TTFB"
    );
    for r in rows {
        println!(
            "  {:ws$}  {:wsite$}  {:wp$}  {:>wd$}  {:>10}",
            r.service, r.site, r.path, r.declared, r.ttfb
        );
    }
}

/// Sends `n` requests from `edge` for `service`; one table row. Returns false if any failed.
async fn measure(f: &DemoFabric, edge: &NodeId, service: &str, n: usize) -> (Row, bool) {
    let mut ttfbs = Vec::new();
    let mut sites: BTreeMap<String, usize> = BTreeMap::new();
    let mut error = None;
    if let Some(addr) = f.service_addr(edge, service) {
        for _ in 0..n {
            match client::complete(addr, 8, Duration::from_secs(10)).await {
                Ok(Reply { site, ttfb, .. }) => {
                    *sites.entry(site).or_default() += 1;
                    ttfbs.push(ttfb);
                }
                Err(e) => error = Some(e.to_string()),
            }
        }
    } else {
        error = Some("no listener for this service on this edge".into());
    }
    let (site, path) = match preferred(f, edge, service) {
        Some((s, p)) => (s, p),
        None => (NodeId::new("-"), Vec::new()),
    };
    let served = match sites.len() {
        0 => "-".to_string(),
        1 => sites.keys().next().cloned().unwrap_or_default(),
        _ => sites
            .iter()
            .map(|(s, k)| format!("{s}×{k}"))
            .collect::<Vec<_>>()
            .join(" "),
    };
    // Honesty check: the path shown is the edge's table's; say so when the backend disagrees.
    let path_shown = if served == site.as_str() || sites.is_empty() {
        path_str(&path)
    } else {
        format!("(table: {})", path_str(&path))
    };
    let ok = error.is_none();
    let ttfb = match (median(ttfbs), &error) {
        (_, Some(e)) => format!("error: {e}"),
        (Some(m), None) => fmt_ms(m),
        (None, None) => "-".into(),
    };
    let declared = if path.is_empty() {
        "-".into()
    } else {
        fmt_ms(declared_rtt(f.topology(), &path).as_duration())
    };
    (
        Row {
            service: service.to_string(),
            site: served,
            served: sites.into_keys().collect(),
            path: path_shown,
            declared,
            ttfb,
        },
        ok,
    )
}

async fn tour(
    args: DemoArgs,
    topo: Topology,
    text: &str,
    source: &str,
    dir: &Path,
    mut signals: Signals,
) -> Result<bool, crate::demo::DemoError> {
    let n = if args.quick { 1 } else { args.requests.max(1) };
    let services: Vec<String> = topo
        .services
        .iter()
        .filter(|s| s.port.is_some() && !s.requires_circuit)
        .map(|s| s.name.to_string())
        .collect();
    let all_edges: Vec<NodeId> = topo
        .nodes
        .iter()
        .filter(|n| n.kind == NodeKind::Edge)
        .map(|n| n.id.clone())
        .collect();
    let edges: Vec<NodeId> = if !args.edges.is_empty() {
        args.edges.iter().map(NodeId::new).collect()
    } else {
        let wanted: Vec<NodeId> = [
            "syd-edge-1",
            "akl-edge-1",
            "sin-edge-1",
            "tyo-edge-1",
            "lax-edge-1",
        ]
        .into_iter()
        .map(NodeId::new)
        .filter(|e| all_edges.contains(e))
        .collect();
        if wanted.is_empty() {
            all_edges.clone()
        } else {
            wanted
        }
    };
    for e in &edges {
        if !all_edges.contains(e) {
            eprintln!(
                "error: {e} is not an edge of the topology (edges: {})",
                path_str(&all_edges).replace(" → ", ", ")
            );
            return Ok(false);
        }
    }
    if let Some(site) = &args.fail
        && topo
            .node(site)
            .is_none_or(|node| node.kind != NodeKind::Site)
    {
        let sites: Vec<&str> = topo
            .nodes
            .iter()
            .filter(|n| n.kind == NodeKind::Site)
            .map(|n| n.id.as_str())
            .collect();
        eprintln!(
            "error: --fail {site}: {} (sites: {})",
            if topo.node(site).is_some() {
                "not a site"
            } else {
                "no such node in the topology"
            },
            sites.join(", ")
        );
        return Ok(false);
    }

    println!(
        "Tasman demo: {source}: {} nodes, {} links, {} services, all on loopback.",
        topo.nodes.len(),
        topo.links.len(),
        topo.services.len()
    );
    println!(
        "A controller (in-process, its state in a temporary directory) imports it as topology version 1;"
    );
    println!(
        "every node is a router with its own certificate from a temporary CA that takes its snapshots from"
    );
    println!(
        "the controller (mutual TLS over QUIC), and every inter-node link runs through a link emulator with"
    );
    println!("its declared one-way latency.");
    let t = Instant::now();
    let options = DemoOptions {
        ephemeral_ports: args.ephemeral_ports,
        dir: Some(dir.to_path_buf()),
        ..DemoOptions::default()
    };
    // A signal while the fabric starts drops what has started; the runtime's shutdown stops it.
    let mut fabric = tokio::select! {
        f = DemoFabric::start(text, options) => f?,
        () = signals.next() => {
            println!("\nDemo interrupted while the fabric started.");
            return Ok(false);
        }
    };
    let (admin, _) = fabric.admin();
    println!(
        "Started the controller (routers connect to {}, admin API on {admin}), {} routers, {} link emulators",
        fabric.controller_addr(),
        fabric.topology().nodes.len(),
        fabric.topology().links.len() * 2,
    );
    println!(
        "and a demo backend per site and service; all neighbours up after {}.\n",
        fmt_ms(t.elapsed())
    );

    // The tour, and with --keep the wait after it, until it ends or a signal comes.
    let mut verdict = None;
    let toured = tokio::select! {
        r = steps(&mut fabric, &args, &edges, &all_edges, &services, n, &mut verdict) => Some(r),
        () = signals.next() => None,
    };
    match (&toured, verdict) {
        (None, None) => println!(
            "\nInterrupted: stopping the fabric (a second Ctrl-C stops without waiting for it)."
        ),
        (None, Some(_)) => println!("stopping"),
        (Some(_), _) => {}
    }
    tokio::select! {
        () = fabric.shutdown() => {}
        () = signals.next() => println!("Second signal: not waiting for the fabric to stop."),
    }
    if let Some(Err(e)) = toured {
        return Err(e);
    }
    let Some(ok) = verdict else {
        println!("\nDemo interrupted.");
        return Ok(false);
    };
    println!(
        "\n{}",
        if ok {
            "Demo complete."
        } else {
            "Demo finished with errors (see above)."
        }
    );
    Ok(ok)
}

/// The site the failover stops: the one `edge` sends `service` to now, which `--fail` must name
/// if given (stopping any other would show no failover at all).
fn failover_site(
    fabric: &DemoFabric,
    fail: Option<&str>,
    edge: &NodeId,
    service: &str,
) -> Result<NodeId, String> {
    let Some((site, _)) = preferred(fabric, edge, service) else {
        return Err(format!("{edge} has no route for {service}"));
    };
    match fail {
        Some(f) if f != site.as_str() => Err(format!(
            "--fail {f}: the failover is shown from {edge} (the first edge) for {service}, which \
             {edge} sends to {site}, not {f}: stopping {f} would move nothing there (fail {site}, \
             or put an edge that uses {f} first in --edges)"
        )),
        _ => Ok(site),
    }
}

/// The tour once the fabric runs: the tables, the failover, the live edit, the maintenance, and
/// with `--keep` the restarted fabric left up until a signal (this future then never ends).
/// `verdict` is set once the tour is over: whether all of it went right.
async fn steps(
    fabric: &mut DemoFabric,
    args: &DemoArgs,
    edges: &[NodeId],
    all_edges: &[NodeId],
    services: &[String],
    n: usize,
    verdict: &mut Option<bool>,
) -> Result<(), crate::demo::DemoError> {
    // A --fail that shows nothing is refused before the tables, not after them.
    if let (Some(fail), Some(first_edge), Some(first_service)) =
        (&args.fail, edges.first(), services.first())
        && let Err(e) = failover_site(fabric, Some(fail), first_edge, first_service)
    {
        eprintln!("error: {e}");
        *verdict = Some(false);
        return Ok(());
    }
    let t = Instant::now();
    let off = fabric.wait_settled(Duration::from_secs(3)).await;
    if off.is_empty() {
        println!(
            "Measured link RTTs settled near the declared latencies after {}.\n",
            fmt_ms(t.elapsed())
        );
    } else {
        println!(
            "Measured link RTTs after {}: still above the declared latency: {}\n",
            fmt_ms(t.elapsed()),
            off.join("; ")
        );
    }
    println!(
        "Requests: GET /v1/completions on a new TCP connection to the edge's service listener, {n} per row;"
    );
    println!(
        "TTFB is the median time from connect to the first response byte. \"site\" is the x-tasman-site header"
    );
    println!("the backend answered with; \"path\" is the edge's routing table's preferred path.\n");

    let mut all_ok = true;
    for edge in edges {
        let node = fabric.topology().node(edge.as_str()).cloned();
        if let Some(node) = node {
            println!("{} ({}, {})", edge, node.region, node.country);
        }
        let mut rows = Vec::new();
        for s in services {
            let (row, ok) = measure(fabric, edge, s, n).await;
            all_ok &= ok;
            rows.push(row);
        }
        print_rows(&rows);
        println!();
    }

    // Failover.
    let (Some(first_edge), Some(first_service)) = (edges.first(), services.first()) else {
        *verdict = Some(all_ok);
        return Ok(());
    };
    let victim = match failover_site(fabric, args.fail.as_deref(), first_edge, first_service) {
        Ok(site) => site,
        Err(e) => {
            eprintln!("error: {e}");
            *verdict = Some(false);
            return Ok(());
        }
    };
    if !fabric.is_running(&victim) {
        eprintln!("error: {victim} is not a running node");
        *verdict = Some(false);
        return Ok(());
    }
    // A service with one site for the first edge has nowhere to fail over to: stopping it would
    // show nothing but errors (and leave the live edit and the maintenance nothing either).
    let alternatives = fabric
        .router(first_edge)
        .and_then(|r| r.routes().candidates(first_service))
        .map_or(0, |c| c.len().saturating_sub(1));
    let failover_ok = if alternatives == 0 {
        println!(
            "Failover: {victim} is the only site {first_edge} has for {first_service}: nothing to fail over to (skipped)."
        );
        true
    } else {
        let before: BTreeMap<(NodeId, String), (NodeId, Vec<NodeId>)> = all_edges
            .iter()
            .flat_map(|e| services.iter().map(move |s| (e.clone(), s.clone())))
            .filter_map(|(e, s)| preferred(fabric, &e, &s).map(|p| ((e, s), p)))
            .collect();
        println!(
            "Failover: {victim} goes dark now (its links drop everything, as in a power cut)."
        );
        println!("Every 10 ms a new client connection asks {first_edge} for {first_service}.");
        let t0 = Instant::now();
        fabric.isolate_node(&victim);
        let addr = fabric.service_addr(first_edge, first_service);
        let detect = async {
            let deadline = t0 + Duration::from_secs(10);
            while Instant::now() < deadline {
                if preferred(fabric, first_edge, first_service).is_some_and(|(s, _)| s != victim) {
                    return Some(t0.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            None
        };
        let first_new = async {
            let addr = addr?;
            let mut set = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let (mut tried, mut failed, mut first) = (0usize, 0usize, None);
            // The longest wait for a first byte: a connection dealt to the dark site waits for
            // its failover. (The first one served elsewhere can be one dealt at once to another
            // site that shared the service: its first byte says nothing of the failover.)
            let mut slowest: Option<Reply> = None;
            let mut note = |r: &Reply| {
                if slowest.as_ref().is_none_or(|s| r.ttfb > s.ttfb) {
                    slowest = Some(r.clone());
                }
            };
            let give_up = t0 + Duration::from_secs(10);
            while first.is_none() {
                tokio::select! {
                    _ = tick.tick(), if Instant::now() < give_up => {
                        tried += 1;
                        set.spawn(async move {
                            let started = Instant::now();
                            (started, client::complete(addr, 8, Duration::from_secs(10)).await)
                        });
                    }
                    Some(done) = set.join_next() => match done {
                        // When its first byte came: the connection's start plus its time to it.
                        Ok((started, Ok(r))) if r.site != victim.as_str() => {
                            note(&r);
                            first = Some((started.duration_since(t0) + r.ttfb, r));
                        }
                        Ok((_, Ok(r))) => note(&r),
                        _ => failed += 1,
                    },
                    else => break,
                }
            }
            // Connections still in flight finish too: none may hang.
            while let Some(done) = set.join_next().await {
                match done {
                    Ok((_, Ok(r))) => note(&r),
                    _ => failed += 1,
                }
            }
            first.map(|f| (f, tried, failed, slowest))
        };
        let (detected, first) = tokio::join!(detect, first_new);
        let failover_ok = match (&detected, &first) {
            (Some(d), Some(((at, r), tried, failed, slowest))) => {
                println!(
                    "  {first_edge}'s routing table moved {first_service} away from {victim} after {} (probes every {} ms, down after {} misses).",
                    fmt_ms(*d),
                    DemoOptions::default().probe.interval.as_millis(),
                    DemoOptions::default().probe.misses
                );
                println!(
                    "  First new connection served by {}: its first byte {} after the stop (TTFB {}); {tried} connections tried, {failed} failed.",
                    r.site,
                    fmt_ms(*at),
                    fmt_ms(r.ttfb)
                );
                if let Some(s) = slowest {
                    println!(
                        "  Slowest of them: TTFB {} (served by {}; one whose first try met the dark site waits for the failover).",
                        fmt_ms(s.ttfb),
                        s.site
                    );
                }
                // Every connection started after the stop is served: those waiting on the dark
                // site are tried again elsewhere (their first try handed nothing back). (The count
                // was printed, never checked.)
                if *failed > 0 {
                    println!("  FAILED: {failed} connection(s) were not served.");
                }
                *failed == 0
            }
            _ => {
                println!(
                    "  no failover within 10 s: detection {detected:?}, first byte from another site {:?}",
                    first.map(|f| f.0.0)
                );
                false
            }
        };
        fabric.stop_node(&victim).await?;
        // Other edges learn of the loss through their neighbours' probes; give them a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline
            && before.iter().any(|((e, s), (site, _))| {
                *site == victim && preferred(fabric, e, s).is_some_and(|(now, _)| now == victim)
            })
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!("\nRoutes that moved (every edge, every service; the edges' routing tables):");
        for ((e, s), (site, _)) in &before {
            if *site != victim {
                continue;
            }
            match preferred(fabric, e, s) {
                // Still on the stopped site 10 s on: the loss never reached this edge. (It was
                // printed as a route that moved, `X ⇒ X`, and passed.)
                Some((now, _)) if now == victim => {
                    println!(
                        "  {e:12} {s:12} {site} ⇒ still {now}: FAILED, the loss never reached it"
                    );
                    all_ok = false;
                }
                Some((now, path)) => {
                    println!("  {e:12} {s:12} {site} ⇒ {now}  ({})", path_str(&path))
                }
                None => println!("  {e:12} {s:12} {site} ⇒ no site left"),
            }
        }
        println!("\n{first_edge} after the failover");
        let mut rows = Vec::new();
        for s in services {
            let (row, ok) = measure(fabric, first_edge, s, n).await;
            all_ok &= ok
                || fabric
                    .topology()
                    .sites_serving(s)
                    .all(|(site, _)| site.id == victim);
            rows.push(row);
        }
        print_rows(&rows);
        failover_ok
    };
    let edit_ok = live_edit(fabric, edges, first_service, n).await;
    let (drain_ok, drained) = maintenance(fabric, first_edge, first_service).await;
    let passed = all_ok && failover_ok && edit_ok && drain_ok;
    *verdict = Some(passed);

    if args.keep {
        // Said before the fabric is kept up: a failed tour is not hidden behind "the fabric is
        // up" until Ctrl-C.
        if !passed {
            println!("\nThe tour FAILED (see above); keeping the fabric up anyway.");
        }
        // Stopped only when the failover ran (skipped: nothing to restart).
        if alternatives > 0 {
            println!("\nRestarting {victim}...");
            fabric.start_node(&victim).await?;
        }
        if let Some(site) = &drained {
            fabric.start_node(site).await?;
        }
        fabric.wait_converged(Duration::from_secs(30)).await?;
        let (admin, token) = fabric.admin();
        println!(
            "The controller: admin API on {admin}, state in {} (deleted on exit). Ask it:",
            fabric.state_dir().display()
        );
        // This binary's own path: `scripts/demo` runs it through cargo, so `tasman` may not be
        // on PATH (the hints printed a bare `tasman`, "command not found").
        let exe = std::env::current_exe()
            .ok()
            .and_then(|p| p.to_str().map(str::to_string))
            .filter(|p| !p.contains(|c: char| c.is_whitespace() || "'\"$`\\".contains(c)))
            .unwrap_or_else(|| "tasman".into());
        println!("  export TASMAN_CONTROLLER={admin} TASMAN_TOKEN={token}");
        println!("  {exe} status           # routers, versions, each edge's site, RTT matrix");
        println!("  {exe} topology get     # the text in force; history, rollback VERSION");
        println!("  {exe} topology edit    # $EDITOR, the plan, then applied live");
        println!("The fabric is up. Try (Ctrl-C stops it):");
        for e in edges {
            if let Some(a) = fabric.service_addr(e, first_service) {
                println!(
                    "  curl -sN -D - 'http://{a}/v1/completions?tokens=20&delay_ms=50'   # via {e}"
                );
            }
        }
        // Until Ctrl-C or SIGTERM, which the caller waits for.
        std::future::pending::<()>().await;
    }
    Ok(())
}

/// Planned maintenance: the site `edge` uses for `service` drains (as `tasman router` does on
/// SIGTERM) while a slow completion streams through it, and new client connections keep coming.
/// The stream must finish on that site, every new connection must be served elsewhere, and the
/// drain must end when the stream does. Returns whether it went so, and the drained site.
async fn maintenance(
    fabric: &mut DemoFabric,
    edge: &NodeId,
    service: &str,
) -> (bool, Option<NodeId>) {
    let Some(addr) = fabric.service_addr(edge, service) else {
        return (true, None);
    };
    let sites: Vec<NodeId> = fabric
        .router(edge)
        .and_then(|r| r.routes().candidates(service))
        .map(|c| c.iter().map(|c| c.site.clone()).collect())
        .unwrap_or_default();
    match sites.as_slice() {
        [] => {
            println!("\nPlanned maintenance: {edge} has no site for {service} now (skipped).");
            return (true, None);
        }
        [only] => {
            println!(
                "\nPlanned maintenance: {only} is the only site {edge} has for {service} (skipped)."
            );
            return (true, None);
        }
        _ => {}
    }
    const TOKENS: usize = 100;
    const PACE: Duration = Duration::from_millis(10);
    // The site to drain is the one the completion reached (seen at its backend, nothing else
    // asks them now): sites equally near share an edge's connections, so one asked before it
    // may not be the one it goes to.
    let svc = ServiceName::new(service);
    let requests = |site: &NodeId| fabric.backend(site, &svc).map_or(0, |b| b.requests());
    let before: Vec<u64> = sites.iter().map(requests).collect();
    let long = tokio::spawn(client::complete_paced(
        addr,
        TOKENS,
        Some(PACE),
        Duration::from_secs(15),
    ));
    let deadline = Instant::now() + Duration::from_secs(5);
    let site = loop {
        if let Some(i) = (0..sites.len()).find(|&i| requests(&sites[i]) != before[i]) {
            break sites[i].clone();
        }
        if Instant::now() >= deadline || long.is_finished() {
            println!("\nPlanned maintenance: error: the completion reached no site's backend");
            long.abort();
            return (false, None);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    println!(
        "\nPlanned maintenance: {site} stops the way `tasman router` stops on SIGTERM: it drains."
    );
    println!(
        "A completion streaming {TOKENS} tokens, one every {} ms, runs through {site} when the drain starts;",
        PACE.as_millis()
    );
    println!("meanwhile a new client connection asks {edge} for {service} every 10 ms.");
    let drain = match fabric.drain_node(&site) {
        Ok(d) => d,
        Err(e) => {
            println!("  error: {e}");
            return (false, None);
        }
    };
    let mut set = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut tried = 0usize;
    while !long.is_finished() && tried < 300 {
        tick.tick().await;
        tried += 1;
        set.spawn(client::complete(addr, 8, Duration::from_secs(10)));
    }
    let (mut served, mut failed): (BTreeMap<String, usize>, usize) = (BTreeMap::new(), 0);
    while let Some(done) = set.join_next().await {
        match done {
            Ok(Ok(r)) => *served.entry(r.site).or_default() += 1,
            _ => failed += 1,
        }
    }
    let long = long.await;
    let drained_in = drain.await;
    let mut ok = failed == 0 && !served.contains_key(site.as_str());
    match &long {
        Ok(Ok(r)) => {
            ok &= r.site == site.as_str() && r.tokens == TOKENS;
            println!(
                "  The completion in flight finished on {}: {} of {TOKENS} tokens in {}.",
                r.site,
                r.tokens,
                fmt_ms(r.total)
            );
        }
        other => {
            ok = false;
            println!("  The completion in flight failed: {other:?}");
        }
    }
    let by_site = served
        .iter()
        .map(|(s, k)| format!("{s}×{k}"))
        .collect::<Vec<_>>()
        .join(" ");
    println!("  {tried} new connections during the drain: served by {by_site}; {failed} failed.");
    match drained_in {
        Ok(router::Drain::Emptied(d)) => println!(
            "  {site}'s drain ended {} after it began, when its last connection closed (drain timeout 2 s here, 20 s by default).",
            fmt_ms(d)
        ),
        Ok(d) => {
            ok = false;
            println!("  {site}'s drain did not end by itself: {d:?} (drain timeout 2 s).");
        }
        Err(e) => {
            ok = false;
            println!("  error: the drain task failed: {e}");
        }
    }
    (ok, Some(site))
}

/// The live edit: raise the declared latency of one link on an edge's path through the
/// controller's admin API, show the controller's plan, wait for every router's
/// acknowledgement, and show the edge's new path from real requests. False when it failed.
async fn live_edit(fabric: &mut DemoFabric, edges: &[NodeId], service: &str, n: usize) -> bool {
    // The plan predicts settled edges: past their first seconds, when a site just offered
    // still takes a service past the margins.
    fabric.wait_preferences_settled().await;
    let choices: Vec<EdgeChoice> = edges
        .iter()
        .filter_map(|e| {
            let routes = fabric.router(e)?.routes();
            let c = routes.preferred(service)?;
            Some(EdgeChoice {
                edge: e.clone(),
                live: routes.live.clone(),
                site: c.site.clone(),
                path: c.path.clone(),
            })
        })
        .collect();
    let Some(edit) =
        choose_latency_edit(fabric.topology(), service, &choices, Hysteresis::default())
    else {
        println!(
            "\nLive edit: raising no link's latency moves these edges' {service} paths (skipped)."
        );
        return true;
    };
    let (edge, link) = (&edit.edge, &edit.link);
    println!(
        "\nLive edit through the controller: {edge} reaches {service} at {} via {}.",
        edit.before.0,
        path_str(&edit.before.1)
    );
    println!(
        "Raising the declared one-way latency of {link} from {} to {} (say, the carrier moved it to a",
        edit.from, edit.to
    );
    println!(
        "longer route): one value of the topology text, applied with POST /v1/topology as `tasman topology apply` does."
    );
    let Some((text, kept)) =
        set_link_latency(&fabric.topology_text(), fabric.topology(), link, edit.to)
    else {
        println!("  error: {link} is not in the topology");
        return false;
    };
    if !kept {
        println!("  (the link is not on one flow-style line: the whole topology is re-rendered)");
    }
    let t0 = Instant::now();
    let out = match fabric
        .apply(
            &text,
            &format!("demo: {link} latency {} -> {}", edit.from, edit.to),
        )
        .await
    {
        Ok(o) => o,
        Err(e) => {
            println!("  error: apply: {e}");
            return false;
        }
    };
    let answered = t0.elapsed();
    let Some(version) = out.version else {
        println!(
            "  error: the controller applied nothing (plan: {})",
            out.plan.text.trim()
        );
        return false;
    };
    // The plan: the topology change, then the impact lines of the edge at hand (the whole plan
    // lists every edge and service; `tasman topology apply --dry-run` prints all of it).
    println!("The controller's plan:");
    let lines: Vec<&str> = out.plan.text.lines().collect();
    let ours = format!("  {edge} ");
    let mut others = 0;
    for l in &lines {
        if !l.starts_with("  ") || l.starts_with(&ours) {
            println!("    {l}");
        } else {
            others += 1;
        }
    }
    if others > 0 {
        println!("      ... and {others} more for other edges");
    }
    println!(
        "  (as routers do, the plan keeps the site each edge reports in use unless another wins by >= 10 ms and a third)"
    );
    let acked = match fabric
        .wait_acknowledged(version, Duration::from_secs(15))
        .await
    {
        Ok(_) => t0.elapsed(),
        Err(e) => {
            println!("  error: {e}");
            return false;
        }
    };
    println!(
        "Applied as topology version {version} (was {}): answered after {}; all {} running routers acknowledged it after {}.",
        out.previous_version,
        fmt_ms(answered),
        fabric.running(),
        fmt_ms(acked)
    );
    // The acknowledgement means the snapshot is applied; the edge's table follows at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && preferred(fabric, edge, service).is_some_and(|(_, p)| p == edit.before.1)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("\n{edge} after the edit");
    let mut rows = Vec::new();
    let mut ok = true;
    for s in fabric
        .topology()
        .services
        .iter()
        .filter(|s| s.port.is_some() && !s.requires_circuit)
        .map(|s| s.name.to_string())
        .collect::<Vec<_>>()
    {
        let (row, row_ok) = measure(fabric, edge, &s, n).await;
        // The edited service's requests were served by the predicted site (the table moving
        // alone is no proof: its row would show the old site beside a `(table: ...)` path).
        // (Sites within the spread share the connections: one of them is the predicted one.)
        if s == service && !row.served.iter().any(|p| p == edit.after.0.as_str()) {
            println!(
                "  {edge} {service}: served by {}, not by the predicted {}",
                row.site, edit.after.0
            );
            ok = false;
        }
        // Every service the edge can still reach is served (only the edited one was counted:
        // a failed row of another passed as "Demo complete."), as after the failover: a
        // service whose every site is stopped is forgiven.
        ok &= row_ok
            || fabric
                .topology()
                .sites_serving(&s)
                .all(|(site, _)| !fabric.is_running(&site.id));
        rows.push(row);
    }
    print_rows(&rows);
    let now = preferred(fabric, edge, service);
    let moved = now.as_ref().is_some_and(|(_, p)| *p != edit.before.1);
    match &now {
        Some((site, path)) => println!(
            "\n  {edge} {service}: path before {} ⇒ after {} ({site}){}",
            path_str(&edit.before.1),
            path_str(path),
            if (site, path) == (&edit.after.0, &edit.after.1) {
                ", as predicted"
            } else if moved {
                ", not the predicted one"
            } else {
                ": did NOT move"
            }
        ),
        None => println!("\n  {edge} {service}: no route after the edit"),
    }
    let as_predicted = now
        .as_ref()
        .is_some_and(|(site, path)| (site, path) == (&edit.after.0, &edit.after.1));
    let plan_right = check_plan(fabric, edge, (service, &edit.after), &out.plan.impact);
    ok && moved && as_predicted && plan_right
}

/// Prints, for each of `edge`'s entries in the plan's impact, whether its routing table now
/// holds the predicted site and path: whether all do, and the plan has the edited service's
/// move (`edited`: the service and where the demo's own prediction sends it). (A plan that left
/// the edited service out, predicting no change, passed on the entries it had.)
fn check_plan(
    fabric: &DemoFabric,
    edge: &NodeId,
    edited: (&str, &(NodeId, Vec<NodeId>)),
    impact: &[topology::diff::ImpactEntry],
) -> bool {
    let show = |c: &Option<(NodeId, Vec<NodeId>)>| match c {
        Some((site, path)) => format!("{site} via {}", path_str(path)),
        None => "no site".into(),
    };
    let entries: Vec<_> = impact.iter().filter(|e| &e.edge == edge).collect();
    let mut right = 0;
    for e in &entries {
        let want = e.new.as_ref().map(|c| (c.site.clone(), c.path.clone()));
        let now = preferred(fabric, edge, e.service.as_str());
        if want == now {
            right += 1;
        } else {
            println!(
                "  {edge} {}: the plan predicted {}, the edge uses {}",
                e.service,
                show(&want),
                show(&now)
            );
        }
    }
    println!(
        "  The plan's {} prediction(s) for {edge}: {right} match the edge's routing table now.",
        entries.len()
    );
    let (service, after) = edited;
    let has_edit = entries.iter().any(|e| {
        e.service.as_str() == service
            && e.new.as_ref().map(|c| (&c.site, &c.path)) == Some((&after.0, &after.1))
    });
    if !has_edit {
        println!(
            "  The plan does not predict {edge} {service}'s move to {}.",
            show(&Some(after.clone()))
        );
    }
    right == entries.len() && has_edit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_halfway_between_its_two_middle_values() {
        let ms = Duration::from_millis;
        assert_eq!(median(Vec::new()), None);
        assert_eq!(median(vec![ms(30), ms(10), ms(20)]), Some(ms(20)));
        assert_eq!(median(vec![ms(40), ms(10)]), Some(ms(25)));
        assert_eq!(
            median(vec![ms(1), ms(100), ms(3), ms(2)]),
            Some(ms(2) + ms(1) / 2)
        );
    }
}
