//! `tasman demo`: the local Asia-Pacific fabric, measured, with a live failover.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use topology::{Latency, LinkId, NodeId, NodeKind, Topology};

use crate::demo::client::{self, Reply};
use crate::demo::{APAC_YAML, DemoFabric, DemoOptions};

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    tasman demo                      # start the APAC fabric, measure, fail a site over, exit\n  \
    tasman demo --keep               # ... then keep it up and print curl commands (Ctrl-C stops)\n  \
    tasman demo --edges syd-edge-1,lax-edge-1 --fail syd-site-1\n  \
    scripts/demo                     # the same as the first, in a release build")]
pub struct DemoArgs {
    /// Topology file (default: the built-in examples/apac.yaml).
    #[arg(long, value_name = "FILE")]
    topology: Option<PathBuf>,
    /// Keep the fabric running after the tour and print curl commands to try (Ctrl-C stops).
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
    /// Site to stop for the failover (default: the first edge's nearest site for the first service).
    #[arg(long, value_name = "SITE")]
    fail: Option<String>,
    /// Use free ports instead of the topology's fixed ones (to run beside another fabric; tests use this).
    #[arg(long)]
    ephemeral_ports: bool,
}

pub fn run(args: DemoArgs) -> ExitCode {
    let text = match &args.topology {
        None => APAC_YAML.to_string(),
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", p.display());
                return ExitCode::from(2);
            }
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
                eprintln!(
                    "{source}:{}:{}: {:?}: {}",
                    d.line, d.column, d.severity, d.message
                );
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
    match rt.block_on(tour(args, topo, &source)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
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

fn median(mut v: Vec<Duration>) -> Option<Duration> {
    v.sort();
    v.get(v.len() / 2).copied()
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
    site: String,
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
    source: &str,
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

    println!(
        "Tasman demo: {source}: {} nodes, {} links, {} services, all on loopback.",
        topo.nodes.len(),
        topo.links.len(),
        topo.services.len()
    );
    println!(
        "Every inter-node link runs through a link emulator with its declared one-way latency;"
    );
    println!(
        "every node is a router with its own certificate from a temporary CA (mutual TLS over QUIC)."
    );
    let t = Instant::now();
    let options = DemoOptions {
        ephemeral_ports: args.ephemeral_ports,
        ..DemoOptions::default()
    };
    let mut fabric = DemoFabric::start(topo, options).await?;
    println!(
        "Started {} routers, {} link emulators and a demo backend per site and service; all neighbours up after {}.\n",
        fabric.topology().nodes.len(),
        fabric.topology().links.len() * 2,
        fmt_ms(t.elapsed())
    );
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
    for edge in &edges {
        let node = fabric.topology().node(edge.as_str()).cloned();
        if let Some(node) = node {
            println!("{} ({}, {})", edge, node.region, node.country);
        }
        let mut rows = Vec::new();
        for s in &services {
            let (row, ok) = measure(&fabric, edge, s, n).await;
            all_ok &= ok;
            rows.push(row);
        }
        print_rows(&rows);
        println!();
    }

    // Failover.
    let (Some(first_edge), Some(first_service)) = (edges.first(), services.first()) else {
        fabric.shutdown().await;
        return Ok(all_ok);
    };
    let victim = match &args.fail {
        Some(s) => NodeId::new(s),
        None => match preferred(&fabric, first_edge, first_service) {
            Some((site, _)) => site,
            None => {
                eprintln!("error: {first_edge} has no route for {first_service}");
                fabric.shutdown().await;
                return Ok(false);
            }
        },
    };
    if !fabric.is_running(&victim) {
        eprintln!("error: {victim} is not a running node");
        fabric.shutdown().await;
        return Ok(false);
    }
    let before: BTreeMap<(NodeId, String), (NodeId, Vec<NodeId>)> = all_edges
        .iter()
        .flat_map(|e| services.iter().map(move |s| (e.clone(), s.clone())))
        .filter_map(|(e, s)| preferred(&fabric, &e, &s).map(|p| ((e, s), p)))
        .collect();
    println!("Failover: {victim} goes dark now (its links drop everything, as in a power cut).");
    println!("Every 10 ms a new client connection asks {first_edge} for {first_service}.");
    let t0 = Instant::now();
    fabric.isolate_node(&victim);
    let addr = fabric.service_addr(first_edge, first_service);
    let detect = async {
        let deadline = t0 + Duration::from_secs(10);
        while Instant::now() < deadline {
            if preferred(&fabric, first_edge, first_service).is_some_and(|(s, _)| s != victim) {
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
        let give_up = t0 + Duration::from_secs(10);
        while first.is_none() {
            tokio::select! {
                _ = tick.tick(), if Instant::now() < give_up => {
                    tried += 1;
                    set.spawn(async move { client::complete(addr, 8, Duration::from_secs(10)).await });
                }
                Some(done) = set.join_next() => match done {
                    Ok(Ok(r)) if r.site != victim.as_str() => first = Some((t0.elapsed(), r)),
                    Ok(Ok(_)) => {}
                    _ => failed += 1,
                },
                else => break,
            }
        }
        // Connections still in flight finish too: none may hang.
        while let Some(done) = set.join_next().await {
            if !matches!(done, Ok(Ok(_))) {
                failed += 1;
            }
        }
        first.map(|f| (f, tried, failed))
    };
    let (detected, first) = tokio::join!(detect, first_new);
    let failover_ok = match (&detected, &first) {
        (Some(d), Some(((at, r), tried, failed))) => {
            println!(
                "  {first_edge}'s routing table moved {first_service} away from {victim} after {} (probes every {} ms, down after {} misses).",
                fmt_ms(*d),
                DemoOptions::default().probe.interval.as_millis(),
                DemoOptions::default().probe.misses
            );
            println!(
                "  First new connection served by {} {} after the stop (TTFB {}); {tried} connections tried, {failed} failed.",
                r.site,
                fmt_ms(*at),
                fmt_ms(r.ttfb)
            );
            true
        }
        _ => {
            println!(
                "  no failover within 10 s: detection {detected:?}, first response from another site {:?}",
                first.map(|f| f.0.0)
            );
            false
        }
    };
    fabric.stop_node(&victim).await?;
    // Other edges learn of the loss through their neighbours' probes; give them a moment.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline
        && before.iter().any(|((e, s), (site, _))| {
            *site == victim && preferred(&fabric, e, s).is_some_and(|(now, _)| now == victim)
        })
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("\nRoutes that moved (every edge, every service):");
    for ((e, s), (site, _)) in &before {
        if *site != victim {
            continue;
        }
        match preferred(&fabric, e, s) {
            Some((now, path)) => println!("  {e:12} {s:12} {site} ⇒ {now}  ({})", path_str(&path)),
            None => println!("  {e:12} {s:12} {site} ⇒ no site left"),
        }
    }
    println!("\n{first_edge} after the failover");
    let mut rows = Vec::new();
    for s in &services {
        let (row, ok) = measure(&fabric, first_edge, s, n).await;
        all_ok &= ok
            || fabric
                .topology()
                .sites_serving(s)
                .all(|(site, _)| site.id == victim);
        rows.push(row);
    }
    print_rows(&rows);

    if args.keep {
        println!("\nRestarting {victim}...");
        fabric.start_node(&victim).await?;
        fabric.wait_converged(Duration::from_secs(30)).await?;
        println!("The fabric is up. Try (Ctrl-C stops it):");
        for e in &edges {
            if let Some(a) = fabric.service_addr(e, first_service) {
                println!(
                    "  curl -sN -D - 'http://{a}/v1/completions?tokens=20&delay_ms=50'   # via {e}"
                );
            }
        }
        let _ = tokio::signal::ctrl_c().await;
        println!("stopping");
    }
    fabric.shutdown().await;
    println!(
        "\n{}",
        if all_ok && failover_ok {
            "Demo complete."
        } else {
            "Demo finished with errors (see above)."
        }
    );
    Ok(all_ok && failover_ok)
}
