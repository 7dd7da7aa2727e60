//! The `tasman` command line. Each area has its own module; this one only dispatches.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod topology;

#[derive(Parser, Debug)]
#[command(name = "tasman", version, about = "Tasman: a latency-aware interconnect fabric for AI inference traffic")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Work with topology files: validate (and, later, route, diff).
    Topology(topology::TopologyArgs),
}

/// Entry point of the binary. Exit codes: 0 success, 1 a domain failure (invalid input,
/// refused request), 2 unreadable input or usage error.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Topology(args) => topology::run(args),
    }
}
