//! `tasman topology ...`: the operator's tools on topology files. `validate` lives here; other
//! subcommands (`route`, `diff`) add a variant to [`TopologyCmd`] and reuse [`load_file`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};

use ::topology::{Diagnostic, Loaded};

mod diff;
mod route;

#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  tasman topology validate examples/apac.yaml
  tasman topology route examples/apac.yaml --from syd-edge-1 --service llm-chat
  tasman topology diff examples/apac.yaml new-apac.yaml

The file format is documented in docs/topology.md.")]
pub struct TopologyArgs {
    #[command(subcommand)]
    pub command: TopologyCmd,
}

#[derive(Subcommand, Debug)]
pub enum TopologyCmd {
    /// Check topology files: every problem is reported as FILE:LINE:COL.
    #[command(after_help = VALIDATE_HELP)]
    Validate(ValidateArgs),
    /// Print the topology in force at the controller (as applied, comments intact).
    Get(super::topology_admin::GetArgs),
    /// Validate, show the impact plan and apply a topology file through the controller.
    Apply(super::topology_admin::ApplyArgs),
    /// List the controller's topology versions, newest first.
    History(super::topology_admin::HistoryArgs),
    /// Apply the text of an earlier version as a new version.
    Rollback(super::topology_admin::RollbackArgs),
    /// Edit the controller's topology in $EDITOR, see the plan, confirm, apply.
    Edit(super::topology_admin::EditArgs),
    /// The ranked candidate sites, with paths and costs, for one node and service.
    Route(route::RouteArgs),
    /// Structural changes between two topology files, and which edges change their choice.
    Diff(diff::DiffArgs),
}

/// `-o table|json` for commands that print results.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// Aligned text for people.
    Table,
    /// One JSON document for programs.
    Json,
}

const VALIDATE_HELP: &str = "\
Exit status: 0 all files valid (warnings are printed but do not fail), 1 a file is invalid,
2 a file is unreadable (missing, not UTF-8, or over the 16 MiB limit).

Example:
  $ tasman topology validate examples/apac.yaml
  examples/apac.yaml: valid: 21 nodes, 27 links, 4 services, 1 pool
  $ tasman topology validate broken.yaml
  broken.yaml:6:24: error: unknown node \"mel-site-9\" in link 1 (known: mel-edge-1, mel-site-1)
  broken.yaml: invalid: 1 error, 0 warnings

The format is documented in docs/topology.md.";

#[derive(Args, Debug)]
pub struct ValidateArgs {
    /// Topology YAML files (format version 1).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

pub fn run(args: TopologyArgs) -> ExitCode {
    match args.command {
        TopologyCmd::Validate(a) => validate(&a),
        TopologyCmd::Get(a) => super::topology_admin::get(a),
        TopologyCmd::Apply(a) => super::topology_admin::apply(a),
        TopologyCmd::History(a) => super::topology_admin::history(a),
        TopologyCmd::Rollback(a) => super::topology_admin::rollback(a),
        TopologyCmd::Edit(a) => super::topology_admin::edit(a),
        TopologyCmd::Route(a) => route::run(a),
        TopologyCmd::Diff(a) => diff::run(a),
    }
}

/// Why a topology file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadFileError {
    /// Missing, not a file, not UTF-8, over the size limit: exit status 2.
    #[error("{0}")]
    Unreadable(String),
    /// Read, but not a valid topology: exit status 1.
    #[error("invalid topology ({} problems)", { let (e, w) = ::topology::tally(.0); e + w })]
    Invalid(Vec<Diagnostic>),
}

impl LoadFileError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            LoadFileError::Unreadable(_) => ExitCode::from(2),
            LoadFileError::Invalid(_) => ExitCode::from(1),
        }
    }
}

/// [`crate::topology_file::read`], with the file name in the error: exit status 2.
pub fn read_text(path: &Path) -> Result<String, LoadFileError> {
    crate::topology_file::read(path).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::InvalidData => e.to_string(),
            _ => format!("cannot read: {e}"),
        };
        LoadFileError::Unreadable(format!("{}: {why}", path.display()))
    })
}

/// [`read_text`] for commands that send or keep the text itself: prints why on failure and
/// returns exit status 2.
pub fn read_text_or_report(path: &Path) -> Result<String, ExitCode> {
    read_text(path).map_err(|e| {
        eprintln!("tasman: {e}");
        e.exit_code()
    })
}

/// Reads and loads one topology file (see [`read_text`]).
pub fn load_file(path: &Path) -> Result<Loaded, LoadFileError> {
    load_file_with(path, ::topology::load)
}

/// [`load_file`] with `load`'s rules ([`::topology::load`] or [`::topology::load_stored`]).
fn load_file_with(
    path: &Path,
    load: fn(&str) -> Result<Loaded, Vec<::topology::Diagnostic>>,
) -> Result<Loaded, LoadFileError> {
    load(&read_text(path)?).map_err(LoadFileError::Invalid)
}

/// Prints a load result's diagnostics (warnings too) to stderr as FILE:LINE:COL.
fn report(file: &str, result: &Result<Loaded, LoadFileError>) {
    match result {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("{}", w.display(file));
            }
        }
        Err(LoadFileError::Unreadable(why)) => eprintln!("tasman: {why}"),
        Err(LoadFileError::Invalid(diags)) => {
            for d in diags {
                eprintln!("{}", d.display(file));
            }
        }
    }
}

/// [`load_file`] for commands that need one topology: prints every diagnostic (and warnings on
/// success) to stderr, and returns the exit code to use on failure.
pub fn load_or_report(path: &Path) -> Result<Loaded, ExitCode> {
    report_load(path, load_file(path))
}

/// [`load_or_report`] for a text that may be one a controller stored under an earlier build
/// (the topology in force, as `tasman topology get` prints it): the rules this build added
/// since are warnings ([`::topology::load_stored`]), as the controller reads it.
pub fn load_stored_or_report(path: &Path) -> Result<Loaded, ExitCode> {
    report_load(path, load_file_with(path, ::topology::load_stored))
}

fn report_load(path: &Path, result: Result<Loaded, LoadFileError>) -> Result<Loaded, ExitCode> {
    report(&path.display().to_string(), &result);
    result.map_err(|e| e.exit_code())
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn validate(args: &ValidateArgs) -> ExitCode {
    let (mut valid, mut invalid, mut unreadable) = (0usize, 0usize, 0usize);
    let (mut errors, mut warnings) = (0usize, 0usize);
    for path in &args.files {
        let file = path.display().to_string();
        let result = load_file(path);
        report(&file, &result);
        match result {
            Ok(loaded) => {
                valid += 1;
                // As for an invalid one: a capped list's last line counts those not listed.
                let (_, w) = topology::tally(&loaded.warnings);
                warnings += w;
                let t = &loaded.topology;
                let w = if w == 0 {
                    String::new()
                } else {
                    format!(" ({})", plural(w, "warning", "warnings"))
                };
                println!(
                    "{file}: valid: {}, {}, {}, {}{w}",
                    plural(t.nodes.len(), "node", "nodes"),
                    plural(t.links.len(), "link", "links"),
                    plural(t.services.len(), "service", "services"),
                    plural(t.pools.len(), "pool", "pools"),
                );
            }
            Err(LoadFileError::Invalid(d)) => {
                // The document's numbers: a capped list's last line counts those not listed.
                let (e, w) = topology::tally(&d);
                invalid += 1;
                errors += e;
                warnings += w;
                println!(
                    "{file}: invalid: {}, {}",
                    plural(e, "error", "errors"),
                    plural(w, "warning", "warnings")
                );
            }
            Err(LoadFileError::Unreadable(_)) => {
                unreadable += 1;
                println!("{file}: unreadable");
            }
        }
    }
    if args.files.len() > 1 {
        println!(
            "{} checked: {valid} valid, {invalid} invalid, {unreadable} unreadable; {}, {}",
            plural(args.files.len(), "file", "files"),
            plural(errors, "error", "errors"),
            plural(warnings, "warning", "warnings")
        );
    }
    if unreadable > 0 {
        ExitCode::from(2)
    } else if invalid > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
