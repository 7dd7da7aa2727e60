//! `tasman pki`: make the fabric's CA and the per-node certificates.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use router::pki::{self, PkiError};

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  tasman pki init --dir pki\n  tasman pki issue syd-edge-1 syd-transit-1 syd-site-1 --dir pki\n  tasman pki issue syd-edge-1 --valid-for 90d --dir pki   # rotate: routers reload it\n  tasman pki rotate-ca --dir pki   # new CA; ca.pem trusts old and new\n  tasman pki retire-ca --dir pki   # later: ca.pem trusts the new CA only"
)]
pub struct PkiArgs {
    #[command(subcommand)]
    pub command: PkiCommand,
}

#[derive(Subcommand, Debug)]
pub enum PkiCommand {
    /// Create a new CA (ca.pem, ca.key) in DIR, valid until 2124. Refuses to overwrite an existing
    /// one.
    #[command(after_help = "Example:\n  tasman pki init --dir pki")]
    Init {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
    },
    /// Issue a certificate (NODE.pem, NODE.key) for each NODE, signed by the CA in DIR, with a new
    /// key. The node id is the certificate's name (DNS SAN); use `controller` for the controller.
    /// Re-issuing rotates it: a running router presents the new files within its reload interval
    /// (10 s), once they pass its checks.
    #[command(
        after_help = "Examples:\n  tasman pki issue syd-edge-1 syd-site-1 controller --dir pki\n  tasman pki issue syd-edge-1 --valid-for 90d --dir pki"
    )]
    Issue {
        #[arg(required = true)]
        nodes: Vec<String>,
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// How long the certificates are valid from now: a duration (e.g. 365d, 90d, 12h), more
        /// than zero and at most 3650d.
        #[arg(long, default_value = "365d", value_parser = parse_valid_for, value_name = "DURATION")]
        valid_for: std::time::Duration,
    },
    /// Start a CA rotation in DIR: a new CA becomes the issuing CA (ca.key; the old key is kept
    /// as ca.key.old) and ca.pem becomes the trust bundle of the new CA and every CA it held.
    /// Then: distribute ca.pem to every node and restart them one by one, re-issue every node
    /// certificate, and finally `retire-ca`. See the operator guide, "Rotating the CA".
    #[command(
        name = "rotate-ca",
        after_help = "Example:\n  tasman pki rotate-ca --dir pki"
    )]
    RotateCa {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
    },
    /// End a CA rotation in DIR: ca.pem keeps only the issuing CA (the one for ca.key). Only once
    /// every node holds a certificate from it: nodes restarted with this ca.pem refuse every
    /// other CA's certificates.
    #[command(
        name = "retire-ca",
        after_help = "Example:\n  tasman pki retire-ca --dir pki"
    )]
    RetireCa {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
    },
}

/// `--valid-for`: a `humantime` duration, more than zero and at most [`pki::MAX_VALIDITY`].
fn parse_valid_for(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?}: {e} (expected e.g. 365d, 90d or 12h)"))?;
    pki::Validity::for_duration(d)
        .map(|_| d)
        .map_err(|e| format!("--valid-for {s:?}: {e}"))
}

fn exit_for(e: &PkiError) -> ExitCode {
    match e {
        PkiError::Io { .. }
        | PkiError::BadKey { .. }
        | PkiError::BadCert { .. }
        | PkiError::NoIssuingCa { .. } => ExitCode::from(2),
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
        PkiCommand::Issue {
            nodes,
            dir,
            valid_for,
        } => {
            for n in &nodes {
                let issued = pki::Validity::for_duration(valid_for)
                    .and_then(|v| pki::issue_with(&dir, n, v));
                match issued {
                    Ok((cert, _key)) => println!("{}", cert.display()),
                    Err(e) => {
                        eprintln!("error: {n}: {e}");
                        return exit_for(&e);
                    }
                }
            }
            ExitCode::SUCCESS
        }
        PkiCommand::RotateCa { dir } => match pki::rotate_ca(&dir) {
            Ok(n) => {
                println!("{}", dir.join(pki::CA_CERT).display());
                eprintln!(
                    "a new CA issues certificates from now on; {} now trusts {n} CAs. Next: \
                     distribute it to every node and restart them one by one, then re-issue \
                     every node certificate, then `tasman pki retire-ca`.",
                    pki::CA_CERT
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                exit_for(&e)
            }
        },
        PkiCommand::RetireCa { dir } => match pki::retire_ca(&dir) {
            Ok(dropped) => {
                println!("{}", dir.join(pki::CA_CERT).display());
                if dropped == 0 {
                    eprintln!("{} already holds only the issuing CA", pki::CA_CERT);
                } else {
                    eprintln!(
                        "dropped {dropped} CA(s) from {}: distribute it and restart every node \
                         one by one; {} can be deleted (or kept offline)",
                        pki::CA_CERT,
                        pki::CA_KEY_OLD
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                exit_for(&e)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn valid_for_takes_days_and_refuses_zero_and_absurd() {
        assert_eq!(
            parse_valid_for("365d"),
            Ok(Duration::from_secs(365 * 86_400))
        );
        assert_eq!(parse_valid_for("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_valid_for("12h"), Ok(Duration::from_secs(12 * 3600)));
        for bad in ["0", "0s", "3651d", "100y", "soon", ""] {
            let e = parse_valid_for(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad:?}");
        }
        assert!(parse_valid_for("0d").unwrap_err().contains("--valid-for"));
        assert!(parse_valid_for("100y").unwrap_err().contains("--valid-for"));
    }
}
