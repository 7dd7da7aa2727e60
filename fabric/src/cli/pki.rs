//! `tasman pki`: make the fabric's CA and the per-node certificates.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use router::pki::{self, PkiError};

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  tasman pki init --dir pki\n  tasman pki issue syd-edge-1 syd-transit-1 syd-site-1 --dir pki"
)]
pub struct PkiArgs {
    #[command(subcommand)]
    pub command: PkiCommand,
}

#[derive(Subcommand, Debug)]
pub enum PkiCommand {
    /// Create a new CA (ca.pem, ca.key) in DIR. Refuses to overwrite an existing one.
    #[command(after_help = "Example:\n  tasman pki init --dir pki")]
    Init {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
    },
    /// Issue a certificate (NODE.pem, NODE.key) for each NODE, signed by the CA in DIR. The node id
    /// is the certificate's name (DNS SAN); use `controller` for the controller.
    #[command(
        after_help = "Example:\n  tasman pki issue syd-edge-1 syd-site-1 controller --dir pki"
    )]
    Issue {
        #[arg(required = true)]
        nodes: Vec<String>,
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
    },
}

fn exit_for(e: &PkiError) -> ExitCode {
    match e {
        PkiError::Io { .. } | PkiError::BadKey { .. } => ExitCode::from(2),
        _ => ExitCode::from(1),
    }
}

pub fn run(args: PkiArgs) -> ExitCode {
    match args.command {
        PkiCommand::Init { dir } => match pki::init(&dir) {
            Ok(()) => {
                println!("{}", dir.join(pki::CA_CERT).display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                exit_for(&e)
            }
        },
        PkiCommand::Issue { nodes, dir } => {
            for n in &nodes {
                match pki::issue(&dir, n) {
                    Ok((cert, _key)) => println!("{}", cert.display()),
                    Err(e) => {
                        eprintln!("error: {n}: {e}");
                        return exit_for(&e);
                    }
                }
            }
            ExitCode::SUCCESS
        }
    }
}
