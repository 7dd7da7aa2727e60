//! `tasman topology route`: the ranked candidate sites for one node and service.

use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;
use topology::route::{Candidate, LiveState, RouteError, RoutingTable, SPREAD_WITHIN, Spread};
use topology::{Affinity, Graph, Latency, LinkId, NodeId};

use super::{OutputFormat, load_or_report};

const ROUTE_EXAMPLES: &str = "\
Examples:
  tasman topology route examples/apac.yaml --from syd-edge-1 --service llm-chat
  tasman topology route examples/apac.yaml --from syd-edge-1 --service llm-chat \\
      --down syd-site-1 --down syd-transit-1--mel-site-1 -o json

Ranking: candidates that need no drained node or link first, then by cost = path latency (sum
of the declared one-way link latencies) + load penalty (0 here: a file has no load reports), then
by site id. A site is a candidate when it is up, serves the service, is allowed by the service's
residency, and is reachable without crossing a down node or link, along a lowest-latency path of
at most 18 nodes (a stream's header names at most 16 hops).
Share: the expected share of new connections tried first at the site (the equally near sites
by weight, then traffic dials, which may send a share to sites farther away).
JSON output: {\"from\":..,\"service\":..,\"down\":[..],\"candidates\":[{\"site\":..,\"path\":[..],
\"latency_ms\":..,\"penalty_ms\":..,\"cost_ms\":..,\"drained\":..,\"weight\":..,\"dial\":.. (only when
not 100),\"share\":..}]}, best first.
Exit status: 0 answered (even with no candidates), 1 invalid topology or unknown node, link or
service, 2 unreadable file.";

#[derive(clap::Args, Debug)]
#[command(after_help = ROUTE_EXAMPLES)]
pub struct RouteArgs {
    /// The topology file (YAML, format v1).
    pub file: PathBuf,
    /// The node to route from (normally an edge).
    #[arg(long, value_name = "NODE")]
    pub from: String,
    /// The service to route.
    #[arg(long, value_name = "NAME")]
    pub service: String,
    /// Treat a node (`syd-site-1`) or a link (`syd-edge-1--syd-transit-1`, either order) as down.
    /// Repeatable.
    #[arg(long = "down", value_name = "NODE_OR_LINK")]
    pub down: Vec<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

#[derive(Serialize)]
struct RouteJson<'a> {
    from: &'a str,
    service: &'a str,
    down: &'a [String],
    candidates: Vec<CandidateJson<'a>>,
}

#[derive(Serialize)]
struct CandidateJson<'a> {
    site: &'a str,
    path: Vec<&'a str>,
    latency_ms: f64,
    penalty_ms: f64,
    cost_ms: f64,
    drained: bool,
    weight: u32,
    /// The traffic dial, in percent; left out at 100 (no dial).
    #[serde(skip_serializing_if = "topology::is_full_dial")]
    dial: u8,
    /// Expected share of new connections tried first at this site: dealt by weight among the
    /// equally near group, then moved by dials (0 for a site that neither reaches).
    share: f64,
}

impl<'a> CandidateJson<'a> {
    fn new(c: &'a Candidate, share: f64) -> Self {
        CandidateJson {
            site: c.site.as_str(),
            path: c.path.iter().map(NodeId::as_str).collect(),
            latency_ms: millis(c.latency),
            penalty_ms: millis(c.penalty),
            cost_ms: millis(c.cost),
            drained: c.drained,
            weight: c.weight,
            dial: c.dial,
            share,
        }
    }
}

/// Milliseconds from whole nanoseconds: `46.8`, not the `46.800000000000004` that going
/// through seconds gives.
fn millis(l: Latency) -> f64 {
    l.as_nanos() as f64 / 1e6
}

/// Turns `--down` values into live state, refusing names the topology does not have.
pub(super) fn live_state(graph: &Graph, down: &[String]) -> Result<LiveState, RouteError> {
    let mut live = LiveState::default();
    for d in down {
        if d.contains("--") {
            match LinkId::parse(d).filter(|l| graph.link_index(l).is_some()) {
                Some(l) => live.down_links.insert(l),
                None => return Err(RouteError::unknown_link(graph, d)),
            };
        } else if graph.index(d).is_some() {
            live.down_nodes.insert(NodeId::new(d));
        } else {
            return Err(RouteError::unknown_node(graph, d));
        }
    }
    Ok(live)
}

pub fn run(args: RouteArgs) -> ExitCode {
    let file = args.file.display().to_string();
    let topo = match load_or_report(&args.file) {
        Ok(loaded) => loaded.topology,
        Err(code) => return code,
    };
    let graph = Graph::new(&topo);
    let fail = |flag: &str, e: RouteError| {
        eprintln!("{file}: error: {flag}: {e}");
        ExitCode::from(1)
    };
    if graph.index(&args.from).is_none() {
        return fail("--from", RouteError::unknown_node(&graph, &args.from));
    }
    if graph.service(&args.service).is_none() {
        return fail(
            "--service",
            RouteError::unknown_service(&graph, &args.service),
        );
    }
    let live = match live_state(&graph, &args.down) {
        Ok(l) => l,
        Err(e) => return fail("--down", e),
    };
    let table = match RoutingTable::build(&topo, &graph, &NodeId::new(&args.from), &live) {
        Ok(t) => t,
        Err(e) => return fail("--from", e),
    };
    let candidates = table.candidates(&args.service);
    let spread = Spread::new(candidates);
    let shares = spread.expected(candidates);
    let affinity = topo
        .services
        .iter()
        .find(|s| s.name.as_str() == args.service)
        .map(|s| s.affinity)
        .unwrap_or_default();
    match args.output {
        OutputFormat::Json => {
            let out = RouteJson {
                from: &args.from,
                service: &args.service,
                down: &args.down,
                candidates: candidates
                    .iter()
                    .zip(&shares)
                    .map(|(c, &share)| CandidateJson::new(c, share))
                    .collect(),
            };
            match serde_json::to_string_pretty(&out) {
                Ok(s) => println!("{s}"),
                Err(e) => {
                    eprintln!("error: cannot encode JSON: {e}");
                    return ExitCode::from(1);
                }
            }
        }
        OutputFormat::Table => print!(
            "{}",
            table_text(&args, candidates, &spread, &shares, affinity)
        ),
    }
    ExitCode::SUCCESS
}

fn table_text(
    args: &RouteArgs,
    candidates: &[Candidate],
    spread: &Spread,
    shares: &[f64],
    affinity: Affinity,
) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = write!(s, "route from {} for {}", args.from, args.service);
    if !args.down.is_empty() {
        let _ = write!(s, " (down: {})", args.down.join(", "));
    }
    s.push('\n');
    if candidates.is_empty() {
        s.push_str("no eligible site (none serves it, all are down, full, unhealthy, outside residency, or unreachable through transits)\n");
        return s;
    }
    let site_w = candidates
        .iter()
        .map(|c| c.site.as_str().len())
        .max()
        .unwrap_or(4)
        .max(4);
    // The dial column only when a site has a dial: a file without dials prints as before.
    let dials = candidates.iter().any(|c| !topology::is_full_dial(&c.dial));
    let _ = writeln!(
        s,
        "{:>2}  {:<site_w$}  {:>10}  {:>10}  {:>10}  {:>6}  {}{:>5}  path",
        "#",
        "site",
        "cost",
        "latency",
        "penalty",
        "weight",
        if dials { "dial  " } else { "" },
        "share"
    );
    // As the plan and `tasman status` write them: adding up to 100, `<1%` above nothing.
    let percents = topology::diff::share_percents(shares);
    for (i, c) in candidates.iter().enumerate() {
        let path = c
            .path
            .iter()
            .map(NodeId::as_str)
            .collect::<Vec<_>>()
            .join(" > ");
        let drained = if c.drained { "  (drained)" } else { "" };
        let share = match shares.get(i).copied().unwrap_or(0.0) {
            0.0 => "-".to_string(),
            _ => percents[i].clone(),
        };
        let dial = if dials {
            format!("{:>4}  ", format!("{}%", c.dial))
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "{:>2}  {:<site_w$}  {:>10}  {:>10}  {:>10}  {:>6}  {dial}{share:>5}  {path}{drained}",
            i + 1,
            c.site.as_str(),
            c.cost.to_string(),
            c.latency.to_string(),
            c.penalty.to_string(),
            c.weight,
        );
    }
    if spread.members() > 1 {
        let _ = write!(
            s,
            "new connections are shared by weight among the sites within {} of the first",
            SPREAD_WITHIN
        );
        let _ = writeln!(
            s,
            "{}",
            match affinity {
                Affinity::None => "",
                Affinity::SourceIp => "; each client address keeps to one (affinity: source_ip)",
            }
        );
    }
    if dials {
        let _ = writeln!(
            s,
            "traffic dials: a site takes its dial's percent of the connections offered to it first; \
             the others start on the next site in this order{} (a declined site is still tried, \
             last); share is the expected share of first tries",
            match affinity {
                Affinity::None => "",
                Affinity::SourceIp => ", each client address the same way every time",
            }
        );
    }
    s
}
