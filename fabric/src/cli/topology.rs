//! `tasman topology ...`.

use std::process::ExitCode;

use clap::Subcommand;

use super::topology_admin;

#[derive(Debug, Subcommand)]
pub enum TopologyCmd {
    /// Print the topology in force (as applied, comments intact).
    Get(topology_admin::GetArgs),
    /// Validate, show the impact plan and apply a topology file.
    Apply(topology_admin::ApplyArgs),
    /// List applied versions, newest first.
    History(topology_admin::HistoryArgs),
    /// Apply the text of an earlier version as a new version.
    Rollback(topology_admin::RollbackArgs),
    /// Edit the topology in $EDITOR, see the plan, confirm, apply.
    Edit(topology_admin::EditArgs),
}

pub fn run(cmd: TopologyCmd) -> ExitCode {
    match cmd {
        TopologyCmd::Get(a) => topology_admin::get(a),
        TopologyCmd::Apply(a) => topology_admin::apply(a),
        TopologyCmd::History(a) => topology_admin::history(a),
        TopologyCmd::Rollback(a) => topology_admin::rollback(a),
        TopologyCmd::Edit(a) => topology_admin::edit(a),
    }
}
