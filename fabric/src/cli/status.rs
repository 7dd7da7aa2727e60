//! `tasman status`: routers, per-service choices and the live RTT matrix, from the controller.

use std::process::ExitCode;

use clap::Args;

use super::admin_client::{AdminArgs, AdminClient, Answer, Output, block_on, report};
use crate::admin::status::Status;

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  tasman status\n  tasman status -o json | jq '.routers[] | select(.behind)'"
)]
pub struct StatusArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
}

fn ago(ms: Option<u64>) -> String {
    match ms {
        None => "never".into(),
        Some(ms) if ms < 10_000 => format!("{:.1}s ago", ms as f64 / 1000.0),
        Some(ms) => format!("{}s ago", ms / 1000),
    }
}

pub fn run(args: StatusArgs) -> ExitCode {
    let c = match AdminClient::new(&args.admin) {
        Ok(c) => c,
        Err(e) => return report(&e, ""),
    };
    let st = match block_on(c.get::<Answer<Status>>("/v1/status")).and_then(|r| r) {
        Ok(s) => s,
        Err(e) => return report(&e, ""),
    };
    if args.admin.output == Output::Json {
        match serde_json::to_string_pretty(&st) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: {e}"),
        }
        return ExitCode::SUCCESS;
    }
    println!(
        "topology version {}  snapshot {}",
        st.topology_version, st.snapshot_version
    );
    println!();
    println!(
        "{:<20} {:<8} {:<10} {:>9} {:>12} {:<14} STATE",
        "ROUTER", "KIND", "CONNECTED", "TOPOLOGY", "SNAPSHOT", "LAST SEEN"
    );
    for r in &st.routers {
        let mut state = if r.behind {
            "behind".to_string()
        } else {
            "current".to_string()
        };
        // A rejection the router has since got past (it runs that version or a later one: a
        // move's port freed, the version offered again) is history, kept in the JSON with its
        // time, not a state: shown beside "current" it sent operators after a solved problem.
        if let Some(n) = r
            .last_nack
            .as_ref()
            .filter(|n| n.version > r.applied_version)
        {
            state.push_str(&format!(
                "; rejected snapshot {} (topology {}): {}",
                n.version, n.topology_version, n.reason
            ));
        }
        if r.draining {
            state.push_str("; draining (stopping: new connections go around it)");
        }
        // Telemetry the controller did not take from this router (see the operator guide).
        if r.reports_dropped > 0 {
            state.push_str(&format!(
                "; {} reports over the rate dropped",
                r.reports_dropped
            ));
        }
        if r.reports_misnamed > 0 {
            state.push_str(&format!(
                "; {} reports naming another node dropped",
                r.reports_misnamed
            ));
        }
        if r.samples_refused > 0 {
            state.push_str(&format!("; {} implausible RTTs refused", r.samples_refused));
        }
        println!(
            "{:<20} {:<8} {:<10} {:>9} {:>12} {:<14} {}",
            r.node,
            r.kind,
            if r.connected { "yes" } else { "no" },
            r.applied_topology,
            r.applied_version,
            ago(r.last_seen_ms_ago),
            state
        );
    }
    for s in &st.services {
        println!();
        println!("service {}", s.service);
        for e in &s.edges {
            match &e.site {
                Some(site) => println!(
                    "  {:<20} -> {:<20} {:>9.2} ms  via {}{}",
                    e.edge,
                    site,
                    e.cost_ms.unwrap_or(0.0),
                    e.path.join(" > "),
                    if e.reported {
                        ""
                    } else {
                        "  (estimate: no report from the edge)"
                    }
                ),
                None => println!("  {:<20} -> no eligible site", e.edge),
            }
            if !e.shares.is_empty() {
                println!(
                    "  {:<20}    shared by weight{}: {}",
                    "",
                    if e.dialled { " and dial" } else { "" },
                    topology::diff::shares_text(&e.shares)
                );
            }
        }
    }
    println!();
    println!(
        "{:<36} {:>10} {:>10} {:>12} {:>10} {:<5} AGE",
        "LINK", "RTT ms", "SRTT ms", "DECLARED ms", "WEIGHT ms", "UP"
    );
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
    for r in &st.rtt {
        println!(
            "{:<36} {:>10} {:>10} {:>12.2} {:>10.2} {:<5} {}",
            r.link,
            ms(r.rtt_ms),
            ms(r.srtt_ms),
            r.declared_one_way_ms,
            r.weight_ms,
            if r.up { "up" } else { "DOWN" },
            ago(r.age_ms)
        );
    }
    ExitCode::SUCCESS
}
