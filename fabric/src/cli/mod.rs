//! The `tasman` command line. Each area has its own module; this one only dispatches.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod pki;
pub mod router;
pub mod topology;

#[derive(Parser, Debug)]
#[command(
    name = "tasman",
    version,
    about = "Tasman: a latency-aware interconnect fabric for AI inference traffic"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Work with topology files: validate, route, diff.
    Topology(topology::TopologyArgs),
    /// Run one router (edge, transit or site, from its node's kind in the topology).
    Router(router::RouterArgs),
    /// Make the fabric CA and node certificates.
    Pki(pki::PkiArgs),
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Entry point of the binary. Exit codes: 0 success, 1 a domain failure (invalid input,
/// refused request), 2 unreadable input or usage error.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Topology(args) => topology::run(args),
        Command::Router(args) => router::run(args),
        Command::Pki(args) => pki::run(args),
    }
}
