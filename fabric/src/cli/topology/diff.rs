//! `tasman topology diff`: structural changes between two topology files and their impact on
//! routing.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;
use serde_json::Value;
use topology::diff::{
    ImpactEntry, ImpactKind, Incumbents, Margins, TopologyDiff, diff, impact_with,
};
use topology::route::{Candidate, LiveState};

use super::{OutputFormat, load_or_report};

const DIFF_EXAMPLES: &str = "\
Examples:
  tasman topology diff examples/apac.yaml new-apac.yaml
  tasman topology diff examples/apac.yaml new-apac.yaml -o json | jq '.impact[] | select(.kind == \"site_changed\")'

The impact lists every edge and service whose site, path, cost or shares of new connections
change (kinds: lost, gained, site_changed, path_changed, cost_changed, shares_changed: the same
site, path and cost, but equally near sites, weights or traffic dials split the edge's new
connections differently), with the old and new candidate: each edge is taken to use its
cheapest site on the old file, and keeps it on the new one unless another site wins by the
anti-flap margins (by default the routers' own: >= 10 ms and under 2/3 of its cost;
give the --hysteresis-* flags your edges run with). The controller's apply plan predicts each
edge's moves with the margins it reports, from the sites edges report in use. JSON output:
{\"old\":FILE,\"new\":FILE,\"changes\":{\"nodes\"|\"links\"|\"services\"|\"pools\":{\"added\":[{\"id\",\"value\"}],
\"removed\":[..],\"changed\":[{\"id\",\"fields\":[{\"field\",\"old\",\"new\"}]}]}},\"impact\":[{\"edge\",\"service\",
\"kind\",\"old\",\"new\",\"old_shares\",\"new_shares\"}]} (the shares, [{\"site\",\"share\"}], only where sites share).
Exit status: 0 compared (with or without differences), 1 an invalid topology, 2 an unreadable file.";

#[derive(clap::Args, Debug)]
#[command(after_help = DIFF_EXAMPLES)]
pub struct DiffArgs {
    /// The current topology file (read as the controller reads its stored text: rules added
    /// since an older build stored it are warnings).
    pub old: PathBuf,
    /// The proposed topology file.
    pub new: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// The anti-flap margins every edge is taken to run with.
    #[command(flatten)]
    pub hysteresis: crate::cli::router::HysteresisArgs,
}

#[derive(Serialize)]
struct DiffJson<'a> {
    old: String,
    new: String,
    changes: &'a TopologyDiff,
    impact: &'a [ImpactEntry],
}

pub fn run(args: DiffArgs) -> ExitCode {
    // Report problems in both files before giving up. The old one is often the text in force
    // (`tasman topology get`): read as the controller reads its stored text, the rules this
    // build added since as warnings, so that its diff with a fixed text can be seen.
    let old = super::load_stored_or_report(&args.old);
    let new = load_or_report(&args.new);
    let (old, new) = match (old, new) {
        (Ok(o), Ok(n)) => (o.topology, n.topology),
        (Err(a), Err(b)) => {
            return if a == ExitCode::from(2) || b == ExitCode::from(2) {
                ExitCode::from(2)
            } else {
                a
            };
        }
        (Err(c), _) | (_, Err(c)) => return c,
    };
    let changes = diff(&old, &new);
    // Every edge with the margins given (as `tasman router` takes them).
    let h = args.hysteresis.hysteresis();
    let margins: Margins = old
        .nodes
        .iter()
        .chain(&new.nodes)
        .map(|n| (n.id.clone(), h))
        .collect();
    let live = LiveState::default();
    let impact = impact_with(&old, &live, &new, &live, &Incumbents::new(), &margins);
    match args.output {
        OutputFormat::Json => {
            let out = DiffJson {
                old: args.old.display().to_string(),
                new: args.new.display().to_string(),
                changes: &changes,
                impact: &impact,
            };
            match serde_json::to_string_pretty(&out) {
                Ok(s) => println!("{s}"),
                Err(e) => {
                    eprintln!("error: cannot encode JSON: {e}");
                    return ExitCode::from(1);
                }
            }
        }
        OutputFormat::Table => print!("{}", table_text(&changes, &impact)),
    }
    ExitCode::SUCCESS
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(57).collect::<String>())
    } else {
        s
    }
}

fn candidate(c: &Option<Candidate>) -> String {
    match c {
        None => "none".to_string(),
        Some(c) => format!(
            "{} {} via {}{}",
            c.site,
            c.cost,
            c.path
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(">"),
            if c.drained { " (drained)" } else { "" }
        ),
    }
}

fn table_text(changes: &TopologyDiff, impact: &[ImpactEntry]) -> String {
    let mut s = String::new();
    if changes.is_empty() {
        s.push_str("no structural changes\n");
    }
    for (name, section) in changes.sections() {
        if section.is_empty() {
            continue;
        }
        let _ = writeln!(s, "{name}:");
        for i in &section.added {
            let _ = writeln!(s, "  + {}", i.id);
        }
        for i in &section.removed {
            let _ = writeln!(s, "  - {}", i.id);
        }
        for c in &section.changed {
            for f in &c.fields {
                // Cut, two values that differ past the cut would read the same: then whole.
                let (old, new) = match (short(&f.old), short(&f.new)) {
                    (o, n) if o == n => (f.old.to_string(), f.new.to_string()),
                    cut => cut,
                };
                let _ = writeln!(s, "  ~ {} {}: {} -> {}", c.id, f.field, old, new);
            }
        }
    }
    if impact.is_empty() {
        s.push_str("impact: no edge changes its choice for any service\n");
        return s;
    }
    let _ = writeln!(s, "impact ({} edge/service pairs change):", impact.len());
    for e in impact {
        let kind = match e.kind {
            ImpactKind::Lost => "lost",
            ImpactKind::Gained => "gained",
            ImpactKind::SiteChanged => "site changed",
            ImpactKind::PathChanged => "path changed",
            ImpactKind::CostChanged => "cost changed",
            ImpactKind::SharesChanged => "shares changed",
        };
        let _ = writeln!(
            s,
            "  {} {}: {kind}: {} -> {}{}",
            e.edge,
            e.service,
            candidate(&e.old),
            candidate(&e.new),
            crate::plan::shares_line(e)
        );
    }
    s
}
