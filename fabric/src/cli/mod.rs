//! The `tasman` command line. Each area has its own module; this one only dispatches.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod demo;

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
    /// Run the local Asia-Pacific demo fabric: measure, fail a site over, exit.
    Demo(demo::DemoArgs),
}

/// Entry point of the binary. Exit codes: 0 success, 1 a domain failure (invalid input,
/// refused request), 2 unreadable input or usage error.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => demo::run(args),
    }
}
