//! `tasman controller`: the daemon.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::controller::daemon::{self, DaemonConfig};
use crate::controller::renew;

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  tasman controller --topology examples/apac.yaml --state /var/lib/tasman \\\n      --listen 0.0.0.0:7400 --admin 127.0.0.1:7401\n\n\
The first start imports --topology into the state directory; afterwards the state directory is the\n\
truth (--topology is ignored; change the topology with `tasman topology apply|edit|rollback`).\n\
Without --tls-dir, <state>/pki holds the fabric CA and the controller's certificate (created when\n\
missing; issue router certificates from it); a --tls-dir without ca.pem is refused. Without\n\
--admin-token-file, the token is <state>/admin-token (generated when missing); the read-only\n\
token <state>/admin-read-token (generated when missing) serves GET and HEAD only. With --metrics\n\
ADDR, GET /metrics serves Prometheus text without a token (bind it where only your scraper\n\
reaches). With --ca-dir DIR (the fabric CA, e.g. <state>/pki), routers renew their certificates\n\
through the controller at 70 % of their lifetime, each new one valid for --issue-valid-for."
)]
pub struct ControllerArgs {
    /// Topology YAML imported on first start.
    #[arg(long)]
    pub topology: Option<PathBuf>,
    /// State directory (the durable store).
    #[arg(long)]
    pub state: PathBuf,
    /// QUIC address routers connect to.
    #[arg(long, default_value = "0.0.0.0:7400")]
    pub listen: SocketAddr,
    /// Admin API (HTTP) address. A loopback address unless --admin-insecure-remote: the API is
    /// plain HTTP, and its bearer token changes the topology and circuits.
    #[arg(long, default_value = "127.0.0.1:7401")]
    pub admin: SocketAddr,
    /// Serve the admin API on a --admin address that is not loopback, its bearer token and
    /// every change crossing the network in clear text (put it behind a TLS proxy or an SSH
    /// tunnel instead where you can).
    #[arg(long)]
    pub admin_insecure_remote: bool,
    /// Serve Prometheus metrics on GET /metrics at this address (no authentication, as a
    /// router's --metrics; off by default).
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// PKI directory (ca.pem, controller.pem, controller.key); it must hold ca.pem (default:
    /// <state>/pki, created when missing).
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// File holding the admin bearer token.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Renew routers' certificates: the PKI directory holding the fabric CA (ca.pem and ca.key,
    /// as written by `tasman pki init`). The controller records every certificate it issues in
    /// its ca.issued.log (so it must be able to write there), where `tasman pki revoke NODE`
    /// finds them. Without it, renewal requests are refused.
    #[arg(long, value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,
    /// How long a renewed certificate is valid (routers renew at 70 % of it): a duration from
    /// 10m to 3650d.
    #[arg(long, default_value = "24h", value_parser = parse_issue_valid_for, value_name = "DURATION")]
    pub issue_valid_for: std::time::Duration,
    /// How long a decommissioned circuit stays listed (`tasman circuit list --all`, the
    /// metrics) before it is archived: found by id only then (`show` says when it was
    /// archived), listed by `tasman circuit list --archived`. A duration (e.g. 30d, 72h); the
    /// sweep runs hourly, or as often as a shorter retention (once a second at most: 0
    /// archives within a second); `off` never archives.
    #[arg(long, default_value = "30d", value_parser = parse_retention, value_name = "DURATION")]
    pub circuit_retention: Retention,
    /// Re-read the controller's own certificate, key and CA bundle from its TLS directory, and
    /// the revocation lists, this often (as a router's `--tls-reload-interval`). A duration
    /// (e.g. 10s, 1m; at least 100ms); `off` or 0: read them at start only.
    #[arg(long, default_value = "10s", value_parser = super::router::parse_reload_interval, value_name = "DURATION")]
    pub tls_reload_interval: std::time::Duration,
}

/// `--circuit-retention`: a duration, or `off` (never archive). A newtype, since clap reads
/// an `Option` field as an optional flag, not as a flag whose value may say "none".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention(pub Option<std::time::Duration>);

fn parse_retention(s: &str) -> Result<Retention, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(Retention(None));
    }
    humantime::parse_duration(s.trim())
        .map(|d| Retention(Some(d)))
        .map_err(|e| format!("{s:?}: {e} (expected e.g. 30d, 72h or 0, or off to never archive)"))
}

/// `--issue-valid-for`: a `humantime` duration from [`renew::MIN_VALIDITY`] to
/// [`router::pki::MAX_VALIDITY`].
fn parse_issue_valid_for(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?}: {e} (expected e.g. 24h, 7d or 90m)"))?;
    if d < renew::MIN_VALIDITY {
        return Err(format!(
            "{s:?} is shorter than the minimum of {}",
            humantime::format_duration(renew::MIN_VALIDITY)
        ));
    }
    router::pki::Validity::for_duration(d)
        .map(|_| d)
        .map_err(|e| format!("{s:?}: {e}"))
}

/// Why `--admin ADDR` is refused, if it is: an address other than loopback without
/// `--admin-insecure-remote` (as Vault refuses a listener without TLS unless `tls_disable`).
fn admin_refusal(addr: SocketAddr, insecure_remote: bool) -> Option<String> {
    (!admin_is_loopback(addr) && !insecure_remote).then(|| {
        format!(
            "--admin {addr}: the admin API is plain HTTP, and its bearer token (which changes the \
             topology and circuits) would cross the network in clear text. Bind it to a loopback \
             address (e.g. 127.0.0.1:{port}) and reach it through an SSH tunnel or a TLS proxy, \
             or pass --admin-insecure-remote to serve it there anyway",
            port = addr.port()
        )
    })
}

/// Whether `--admin ADDR` is a loopback address (an IPv4-mapped one too).
fn admin_is_loopback(addr: SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

pub fn run(args: ControllerArgs) -> ExitCode {
    if let Some(why) = admin_refusal(args.admin, args.admin_insecure_remote) {
        eprintln!("error: {why}");
        return ExitCode::from(2);
    }
    super::init_tracing();
    if !admin_is_loopback(args.admin) {
        tracing::warn!(admin = %args.admin, "--admin-insecure-remote: the admin API is plain HTTP, its bearer token crossing the network in clear text");
    }
    super::raise_nofile();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let code = rt.block_on(async move {
        let mut signals = match super::Signals::install_or_exit() {
            Ok(s) => s,
            Err(code) => return code,
        };
        let cfg = DaemonConfig {
            topology_file: args.topology.clone(),
            state_dir: args.state,
            listen: args.listen,
            admin: args.admin,
            metrics: args.metrics,
            tls_dir: args.tls_dir,
            admin_token_file: args.admin_token_file,
            cert_reload_interval: args.tls_reload_interval,
            ca_dir: args.ca_dir,
            issue_valid_for: args.issue_valid_for,
            write_stall_timeout: crate::controller::distribute::WRITE_STALL_TIMEOUT,
            circuit_retention: args.circuit_retention.0,
        };
        // The start on a blocking thread of its own: it reads files (the store, the token, the
        // PKI) with blocking calls, which on this thread kept the signals from being polled
        // until a stuck file answered (a SIGTERM caught and not heard), and on a runtime worker
        // could take the only one (one CPU) that drives the signals. Stopped while it starts,
        // the thread is left to the runtime's bounded shutdown below.
        let runtime = tokio::runtime::Handle::current();
        let start = tokio::task::spawn_blocking(move || runtime.block_on(daemon::start(cfg)));
        let started = match signals.unless(start).await {
            Ok(Ok(started)) => started,
            Ok(Err(e)) => {
                eprintln!("error: the controller's start failed: {e}");
                return ExitCode::from(1);
            }
            Err(code) => return code,
        };
        let d = match started {
            Ok(d) => d,
            Err(e) => {
                eprintln!("error: {e}");
                // Diagnostics as FILE:LINE:COL: the import file's name, or the stored version.
                use crate::controller::ControllerError as E;
                let (diags, file) = match &e {
                    daemon::DaemonError::Controller(E::Invalid(diags)) => (
                        &diags[..],
                        args.topology
                            .as_ref()
                            .map_or("topology".to_string(), |f| f.display().to_string()),
                    ),
                    daemon::DaemonError::Controller(E::InvalidStored { version, diags }) => {
                        (&diags[..], format!("stored-version-{version}"))
                    }
                    _ => (&[][..], String::new()),
                };
                for d in diags {
                    eprintln!("{}", d.display(&file));
                }
                return ExitCode::from(1);
            }
        };
        // One line on stdout that scripts and tests can wait for.
        let metrics = d
            .metrics_addr
            .map_or(String::new(), |a| format!(" metrics={a}"));
        // Not `println!`: it panics on a stdout that cannot be written.
        let _ = writeln!(
            std::io::stdout(),
            "controller listening quic={} admin={}{metrics}",
            d.quic_addr,
            d.admin_addr
        );
        signals.next().await;
        d.shutdown().await;
        ExitCode::SUCCESS
    });
    // Blocking threads still stuck (a hung disk under a snapshot or certificate write) do
    // not hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_valid_for_is_bounded() {
        let p = parse_issue_valid_for;
        assert_eq!(p("24h"), Ok(std::time::Duration::from_secs(86_400)));
        assert_eq!(p("10m"), Ok(std::time::Duration::from_secs(600)));
        assert!(p("9m").is_err());
        assert!(p("0s").is_err());
        assert!(p("3651d").is_err());
        assert!(p("soon").is_err());
    }

    #[test]
    fn circuit_retention_is_a_duration_or_off() {
        let day = std::time::Duration::from_secs(86_400);
        assert_eq!(parse_retention("30d"), Ok(Retention(Some(30 * day))));
        assert_eq!(
            parse_retention("0"),
            Ok(Retention(Some(std::time::Duration::ZERO)))
        );
        assert_eq!(parse_retention(" OFF "), Ok(Retention(None)));
        let err = parse_retention("30 days please").unwrap_err();
        assert!(err.contains("or off to never archive"), "{err}");
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: ControllerArgs,
        }
        let parsed = <Cli as clap::Parser>::try_parse_from(["tasman", "--state", "s"]).unwrap();
        assert_eq!(
            parsed.args.circuit_retention,
            Retention(Some(crate::circuits::DEFAULT_RETENTION))
        );
        assert_eq!(
            parsed.args.tls_reload_interval,
            daemon::CERT_RELOAD_INTERVAL
        );
        let off = ["tasman", "--state", "s", "--tls-reload-interval", "off"];
        let parsed = <Cli as clap::Parser>::try_parse_from(off).unwrap();
        assert_eq!(parsed.args.tls_reload_interval, std::time::Duration::ZERO);
    }
}
