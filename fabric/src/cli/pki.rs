//! `tasman pki`: make the fabric's CA and the per-node certificates.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use router::pki::{self, PkiError};

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  tasman pki init --dir pki\n  tasman pki issue syd-edge-1 syd-transit-1 syd-site-1 --dir pki\n  tasman pki issue syd-edge-1 --valid-for 90d --dir pki   # rotate: routers reload it\n  tasman pki rotate-ca --dir pki   # new CA; ca.pem trusts old and new\n  tasman pki retire-ca --dir pki   # later: ca.pem trusts the new CA only\n  tasman pki revoke syd-edge-1 --reason key-compromise --dir pki   # then re-issue it\n  tasman pki crl --dir pki"
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
    /// (10 s), once they pass its checks. With `--public-key FILE` (one NODE; the file from
    /// `tasman pki keygen` on the node): NODE.pem only, for that key, which never left the node.
    #[command(
        after_help = "Examples:\n  tasman pki issue syd-edge-1 syd-site-1 controller --dir pki\n  tasman pki issue syd-edge-1 --valid-for 90d --dir pki\n  tasman pki issue syd-edge-1 --public-key syd-edge-1.pub --dir pki   # key made on the node"
    )]
    Issue {
        #[arg(required = true)]
        nodes: Vec<String>,
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Certify this public key (PEM `PUBLIC KEY`, P-256, as `tasman pki keygen` writes it)
        /// instead of making a key: writes NODE.pem only. One NODE.
        #[arg(long, value_name = "FILE")]
        public_key: Option<PathBuf>,
        /// How long the certificates are valid from now: a duration (e.g. 365d, 90d, 12h), more
        /// than zero and at most 3650d.
        #[arg(long, default_value = "365d", value_parser = parse_valid_for, value_name = "DURATION")]
        valid_for: std::time::Duration,
    },
    /// Make NODE's key on the node itself: NODE.key (owner-readable only) and its public key
    /// NODE.pub in DIR (the node's TLS directory). Take NODE.pub (not the key) to the CA's host,
    /// `tasman pki issue NODE --public-key NODE.pub`, and bring NODE.pem and ca.pem back: the
    /// private key never leaves the node. Refuses when NODE.key exists.
    #[command(
        after_help = "Example (on the node, then on the CA's host):\n  tasman pki keygen syd-edge-1 --dir /etc/tasman/tls\n  tasman pki issue syd-edge-1 --public-key syd-edge-1.pub --dir pki"
    )]
    Keygen {
        node: String,
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
    },
    /// Start a CA rotation in DIR: a new CA becomes the issuing CA (ca.key; the old key is kept
    /// as ca.key.old) and ca.pem becomes the trust bundle of the new CA and every CA it held.
    /// Then: copy ca.pem to every node (each adopts it within 10 s, no restart), re-issue every
    /// node certificate, and finally `retire-ca`. See the operator guide, "Rotating the CA".
    #[command(
        name = "rotate-ca",
        after_help = "Example:\n  tasman pki rotate-ca --dir pki"
    )]
    RotateCa {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
    },
    /// End a CA rotation in DIR: ca.pem keeps only the issuing CA (the one for ca.key). Only once
    /// every node holds a certificate from it: nodes that adopt this ca.pem close their
    /// connections authenticated by other CAs' certificates and refuse those from then on.
    #[command(
        name = "retire-ca",
        after_help = "Example:\n  tasman pki retire-ca --dir pki"
    )]
    RetireCa {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
    },
    /// Revoke certificates of the issuing CA: every unexpired one of NODE recorded in
    /// ca.issued.log (all that `tasman pki issue` and a controller with `--ca-dir DIR` issued,
    /// renewals included) and NODE.pem in DIR; or the one with serial number HEX. Adds them to
    /// the CA's revocation list and writes ca.crl.pem (signed by ca.key, CRL number one higher,
    /// earlier entries kept). A controller with `--ca-dir DIR`
    /// sends it to its routers; otherwise copy it to every node's TLS directory. Nodes take it
    /// within their reload interval (10 s), refuse the certificate from then on and close the
    /// connections that presented it. Re-issue the node (a new key and serial) to let it back
    /// in. See the operator guide, "Revoking a certificate".
    #[command(
        after_help = "Examples:\n  tasman pki revoke syd-edge-1 --reason key-compromise --dir pki\n  tasman pki revoke --serial 3f:a0:12:9c --dir pki\n  cp pki/ca.crl.pem /etc/tasman/tls/   # on every node"
    )]
    Revoke {
        /// The node whose certificates (every unexpired one recorded, and NODE.pem) are revoked.
        #[arg(required_unless_present = "serial", conflicts_with = "serial")]
        node: Option<String>,
        /// The serial number (hex, `:` between bytes allowed) of the certificate to revoke.
        #[arg(long, value_name = "HEX")]
        serial: Option<pki::Serial>,
        /// Why: unspecified, key-compromise, affiliation-changed, superseded or
        /// cessation-of-operation.
        #[arg(long, default_value = "unspecified")]
        reason: pki::RevokeReason,
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
    },
    /// List the revocation lists of ca.crl.pem in DIR (a PKI directory or a router's TLS
    /// directory), checked against its ca.pem: per CA, the CRL number and every revoked serial.
    #[command(after_help = "Example:\n  tasman pki crl --dir pki")]
    Crl {
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

/// Says what `revoke` did (on stderr; the list's path is on stdout).
fn report_revoked(r: &pki::Revoked, target: &pki::RevokeTarget, reason: pki::RevokeReason) {
    let list = |serials: &[pki::Serial]| {
        serials
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let whose = match target {
        pki::RevokeTarget::Node(n) => format!(" of {n}"),
        pki::RevokeTarget::Serial(_) => String::new(),
    };
    if r.unreadable > 0 {
        eprintln!(
            "warning: {} line(s) of {} could not be read and were skipped (a line cut short by \
             a crash, or edited): check it for certificates of this node",
            r.unreadable,
            pki::ISSUED
        );
    }
    if !r.other_ca.is_empty() {
        eprintln!(
            "warning: {} certificate(s){whose} signed by another CA of the bundle (a CA being \
             rotated out) cannot go on the issuing CA's list: {}. They stay accepted until \
             `tasman pki retire-ca` ends that CA",
            r.other_ca.len(),
            list(&r.other_ca)
        );
    }
    if r.added.is_empty() {
        eprintln!(
            "already revoked: serial(s) {} (list number {}, {} revoked); nothing written",
            list(&r.already),
            r.number,
            r.entries
        );
        return;
    }
    let also = if r.already.is_empty() {
        String::new()
    } else {
        format!(" ({} already on it)", list(&r.already))
    };
    eprintln!(
        "revoked {} certificate(s){whose} ({reason}): serial(s) {}{also}; list number {}, {} \
         revoked. Next: a controller with --ca-dir on this directory sends {} to its routers \
         (otherwise copy it to every node's TLS directory; nodes take it within 10 s){}",
        r.added.len(),
        list(&r.added),
        r.number,
        r.entries,
        pki::CA_CRL,
        match target {
            pki::RevokeTarget::Node(n) =>
                format!(", and re-issue {n} (`tasman pki issue {n}`) to let it back in"),
            pki::RevokeTarget::Serial(_) => String::new(),
        }
    );
}

/// Says what went wrong; the exit code for it.
fn fail(e: &PkiError) -> ExitCode {
    eprintln!("error: {e}");
    exit_for(e)
}

/// Why `name` cannot be a node's certificate name: no certificate name at all
/// ([`pki::name_problem`]: `ca`, names under `ca.`, characters a DNS name cannot hold), or no
/// node id a topology can hold (`controller`, the controller's own, is allowed).
fn not_a_node_id(name: &str) -> Option<String> {
    if let Some(why) = pki::name_problem(name) {
        return Some(format!("not a certificate name: {why}"));
    }
    if name == "controller" {
        return None;
    }
    if topology::is_valid_id(name) {
        // `ca` is refused above, as a certificate name; what is left is a name TLS refuses.
        return topology::reserved_node_id(name).map(|why| format!("not a node id: {why}"));
    }
    Some(format!(
        "not a node id: ids are 1-63 lowercase letters and digits joined by single hyphens \
         (e.g. syd-edge-1), and a router loads its certificate as ID.pem by its id, so no \
         router could use this one{}",
        if name.bytes().any(|b| b.is_ascii_uppercase())
            && topology::is_valid_id(&name.to_ascii_lowercase())
        {
            format!(" (did you mean {}?)", name.to_ascii_lowercase())
        } else {
            String::new()
        }
    ))
}

fn exit_for(e: &PkiError) -> ExitCode {
    match e {
        PkiError::Io { .. }
        | PkiError::BadKey { .. }
        | PkiError::BadCert { .. }
        | PkiError::BadCrl { .. }
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
            Err(e) => fail(&e),
        },
        PkiCommand::Issue {
            nodes,
            dir,
            valid_for,
            public_key,
        } => {
            // Checked before any is issued: a name no topology can give a node would make a
            // certificate no router loads (a router reads ID.pem by its node id).
            if let Some((n, why)) = nodes.iter().find_map(|n| not_a_node_id(n).map(|w| (n, w))) {
                eprintln!("error: {n}: {why}");
                return ExitCode::from(2);
            }
            if let Some(file) = public_key {
                let [n] = nodes.as_slice() else {
                    eprintln!(
                        "error: --public-key certifies one node's key: give one NODE (got {})",
                        nodes.len()
                    );
                    return ExitCode::from(2);
                };
                let issued = std::fs::read_to_string(&file)
                    .map_err(|source| PkiError::Io {
                        path: file.clone(),
                        source,
                    })
                    .and_then(|text| pki::read_public_key(&file, &text))
                    .and_then(|key| {
                        let v = pki::Validity::for_duration(valid_for)?;
                        pki::issue_for_key(&dir, n, v, &key)
                    });
                return match issued {
                    Ok(cert) => {
                        println!("{}", cert.display());
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {n}: {e}");
                        exit_for(&e)
                    }
                };
            }
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
        PkiCommand::Keygen { node, dir } => {
            if let Some(why) = not_a_node_id(&node) {
                eprintln!("error: {node}: {why}");
                return ExitCode::from(2);
            }
            match pki::keygen(&dir, &node) {
                Ok((_key, public)) => {
                    println!("{}", public.display());
                    eprintln!(
                        "{node}.key made in {}; take {} (the public key only) to the CA's host: \
                         tasman pki issue {node} --public-key {}",
                        dir.display(),
                        public.display(),
                        pki::public_key_file(&node)
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {node}: {e}");
                    exit_for(&e)
                }
            }
        }
        PkiCommand::RotateCa { dir } => match pki::rotate_ca(&dir) {
            Ok(n) => {
                println!("{}", dir.join(pki::CA_CERT).display());
                eprintln!(
                    "a new CA issues certificates from now on; {} now trusts {n} CAs. Next: \
                     copy it to every node (each adopts it within 10 s), then re-issue every \
                     node certificate, then `tasman pki retire-ca`.",
                    pki::CA_CERT
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        PkiCommand::RetireCa { dir } => match pki::retire_ca(&dir) {
            Ok(dropped) => {
                println!("{}", dir.join(pki::CA_CERT).display());
                if dropped == 0 {
                    eprintln!("{} already holds only the issuing CA", pki::CA_CERT);
                } else {
                    eprintln!(
                        "dropped {dropped} CA(s) from {}: copy it ({} first) to every node \
                         (each adopts it within 10 s); {} can be deleted (or kept offline)",
                        pki::CA_CERT,
                        pki::CA_CRL,
                        pki::CA_KEY_OLD
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        PkiCommand::Revoke {
            node,
            serial,
            reason,
            dir,
        } => {
            let target = match (node, serial) {
                (_, Some(s)) => pki::RevokeTarget::Serial(s),
                (Some(n), None) => pki::RevokeTarget::Node(n),
                (None, None) => unreachable!("clap requires NODE or --serial"),
            };
            match pki::revoke(&dir, &target, reason) {
                Ok(r) => {
                    println!("{}", r.path.display());
                    report_revoked(&r, &target, reason);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        PkiCommand::Crl { dir } => match pki::read_crls(&dir) {
            Ok(crls) => {
                if crls.is_empty() {
                    eprintln!("{}: no revocation list", dir.join(pki::CA_CRL).display());
                }
                for c in &crls {
                    println!(
                        "CA {} of {}: CRL number {}, {} revoked",
                        c.ca + 1,
                        pki::CA_CERT,
                        c.number,
                        c.entries.len()
                    );
                    for e in &c.entries {
                        let at = std::time::UNIX_EPOCH
                            + std::time::Duration::from_secs(e.revoked_at.max(0) as u64);
                        println!(
                            "  {}  {}  {}",
                            e.serial,
                            humantime::format_rfc3339_seconds(at),
                            e.reason.map_or("-", pki::RevokeReason::label)
                        );
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
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

    /// A name that is no certificate name (`ca`, a name under `ca.`, `syd_edge_1`) among
    /// several is refused before any is issued, exit 2, as the operator guide says: the names
    /// before it were issued, their key and certificate replaced, and the command exited 1.
    #[test]
    fn an_invalid_name_among_several_issues_none() {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path()).unwrap();
        for bad in ["ca", "CA", "ca.x", "syd_edge_1"] {
            let code = run(PkiArgs {
                command: PkiCommand::Issue {
                    nodes: vec!["syd-edge-2".to_string(), bad.to_string()],
                    dir: dir.path().to_path_buf(),
                    public_key: None,
                    valid_for: Duration::from_secs(86_400),
                },
            });
            assert_eq!(code, ExitCode::from(2), "{bad}");
            assert!(
                !dir.path().join("syd-edge-2.pem").exists(),
                "{bad}: syd-edge-2 was issued"
            );
        }
    }

    #[test]
    fn a_certificate_name_must_be_a_node_id_or_controller() {
        for ok in ["controller", "syd-edge-1", "e1"] {
            assert_eq!(not_a_node_id(ok), None, "{ok}");
        }
        let upper = not_a_node_id("SYD-Edge-1").unwrap();
        assert!(upper.contains("did you mean syd-edge-1?"), "{upper}");
        for bad in ["a.b", "a--b"] {
            let why = not_a_node_id(bad).unwrap();
            assert!(
                why.starts_with("not a node id") && !why.contains("did you mean"),
                "{why}"
            );
        }
    }
}
