//! `tasman controller` as a library: open the store, import on first start, bind the QUIC, admin
//! and (optional) metrics endpoints, spawn the background loops. Tests and benchmarks run it in-process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::task::JoinHandle;

use super::{Controller, ControllerError, distribute, metrics};
use crate::admin::{self, AdminState};
use crate::store::redb::RedbStore;

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Imported on first start only (when the store holds no topology).
    pub topology_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// Where to serve Prometheus `GET /metrics` ([`metrics`]), without authentication as a
    /// router's; `None`: not served.
    pub metrics: Option<SocketAddr>,
    /// PKI directory with `ca.pem`, `controller.pem`, `controller.key`. Default `<state>/pki`,
    /// created (CA + controller certificate) when missing. A directory given here must hold
    /// `ca.pem` ([`DaemonError::NoCa`]); a missing controller certificate is issued from it.
    pub tls_dir: Option<PathBuf>,
    /// The admin bearer token. Default `<state>/admin-token`, generated when missing.
    pub admin_token_file: Option<PathBuf>,
    /// How often the controller re-reads its certificate and key from `tls_dir` and presents a
    /// new valid pair to new router connections ([`router::tls::CertResolver`]); zero: never.
    pub cert_reload_interval: Duration,
    /// PKI directory holding the fabric CA (`ca.pem`, `ca.key`) with which the controller signs
    /// routers' renewed certificates ([`super::renew`]); `None`: renewals are refused.
    pub ca_dir: Option<PathBuf>,
    /// How long a renewed certificate is valid ([`super::renew::DEFAULT_VALIDITY`]).
    pub issue_valid_for: Duration,
    /// How long a write to a router's control stream may take no byte before the controller
    /// closes that router's connection ([`distribute::WRITE_STALL_TIMEOUT`]; no flag sets it,
    /// tests shorten it).
    pub write_stall_timeout: Duration,
    /// How long a decommissioned circuit stays in the live circuits table before the retention
    /// sweep moves it to the archive (`--circuit-retention`, default
    /// [`crate::circuits::DEFAULT_RETENTION`]); `None`: never.
    pub circuit_retention: Option<Duration>,
}

/// The controller's default [`DaemonConfig::cert_reload_interval`] (as a router's).
pub const CERT_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Controller(#[from] ControllerError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("PKI: {0}")]
    Pki(#[from] router::pki::PkiError),
    #[error("TLS: {0}")]
    Tls(#[from] router::tls::TlsError),
    #[error(transparent)]
    Distribute(#[from] distribute::DistributeError),
    #[error("admin API on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("circuits: {0}")]
    Circuits(#[from] crate::circuits::service::ServiceError),
    #[error(
        "--ca-dir {dir}: its issuing CA (the certificate in its ca.pem for its ca.key) is not \
         one of the CAs the controller trusts ({tls_dir}/ca.pem): certificates it signed would \
         be refused everywhere"
    )]
    CaMismatch { dir: PathBuf, tls_dir: PathBuf },
    #[error("{path} is empty: an admin token is required")]
    EmptyToken { path: PathBuf },
    #[error(
        "{path}: the admin token has a character no client can send in a request header (a \
         byte-order mark, a letter outside ASCII or a control character): use printable ASCII \
         only"
    )]
    UnsendableToken { path: PathBuf },
    #[error(
        "--tls-dir {}: no {} there (a CA is created only in <state>/pki, without --tls-dir; \
         make one with `tasman pki init --dir {}`)",
        dir.display(),
        router::pki::CA_CERT,
        dir.display()
    )]
    NoCa { dir: PathBuf },
    /// The state directory held a controller's store ([`STORE_MADE`] is there) but holds none
    /// now: a new one would start from epoch 1 and the `--topology` file again, reusing version
    /// numbers the fabric has seen, with no circuits.
    #[error(
        "{}: a controller's store was made in this state directory (its {} is there) but the \
         store, {}, is missing: restore it from a backup; a new store would number versions \
         from the start again and publish no circuits (to start afresh on purpose, use an \
         empty directory)",
        dir.display(),
        STORE_MADE,
        crate::store::redb::FILE
    )]
    StoreMissing { dir: PathBuf },
}

pub struct Daemon {
    pub ctl: Arc<Controller>,
    pub quic_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Where `/metrics` is served, if it is.
    pub metrics_addr: Option<SocketAddr>,
    /// The certificate the controller presents to routers (reloaded from `tls_dir`).
    pub cert: Arc<router::tls::CertResolver>,
    pub token: String,
    /// The read-only admin token ([`READ_TOKEN_FILE`]).
    pub read_token: String,
    pub tls_dir: PathBuf,
    endpoint: quinn::Endpoint,
    tasks: Vec<JoinHandle<()>>,
}

/// How long the shutdown waits for the routers' last records to be stored ([`Daemon::shutdown`]).
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

impl Daemon {
    /// Stops serving (routers see the connection close; admin requests are refused).
    pub async fn shutdown(self) {
        self.endpoint
            .close(0u32.into(), b"controller shutting down");
        for t in &self.tasks {
            t.abort();
        }
        // The routers' last applied versions: lost to a failed write (a restart shows them
        // older until each router answers again), which is said, as the flush loop says it.
        // Bounded: a store that does not answer (a hung disk, a flush cut off holding its
        // lock) held the exit for ever, every later SIGTERM caught and ignored.
        self.ctl.note_connected_routers();
        match tokio::time::timeout(SHUTDOWN_FLUSH, self.ctl.flush_routers()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!("could not store the routers' last records at shutdown: {e}")
            }
            Err(_) => tracing::error!(
                "the store did not take the routers' last records within {SHUTDOWN_FLUSH:?} at \
                 shutdown: stopping without them"
            ),
        }
        self.endpoint.wait_idle().await;
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Makes sure `dir` holds a CA and a `controller` certificate.
pub fn ensure_pki(dir: &Path) -> Result<(), DaemonError> {
    if !dir.join(router::pki::CA_CERT).exists() {
        router::pki::init(dir)?;
    }
    if !dir
        .join(format!("{}.pem", distribute::CONTROLLER_NAME))
        .exists()
    {
        router::pki::issue(dir, distribute::CONTROLLER_NAME)?;
    }
    Ok(())
}

fn token(cfg: &DaemonConfig) -> Result<String, DaemonError> {
    let path = cfg
        .admin_token_file
        .clone()
        .unwrap_or_else(|| cfg.state_dir.join("admin-token"));
    token_at(path, cfg.admin_token_file.is_none())
}

/// The read-only admin token: `<state>/admin-read-token` ([`READ_TOKEN_FILE`]), generated when
/// missing. It serves GET and HEAD requests only ([`crate::admin`]).
fn read_token(cfg: &DaemonConfig) -> Result<String, DaemonError> {
    token_at(cfg.state_dir.join(READ_TOKEN_FILE), true)
}

/// The read-only token's file in the state directory.
pub const READ_TOKEN_FILE: &str = "admin-read-token";

/// Written in the state directory once its store exists: a start that finds it and no store is
/// refused ([`DaemonError::StoreMissing`]).
pub const STORE_MADE: &str = "store-made";

/// The token in the file at `path`; one is generated there when the file is missing and
/// `generate` (a default path) says so.
fn token_at(path: PathBuf, generate: bool) -> Result<String, DaemonError> {
    match crate::admin::read_token_file(&path) {
        Ok(t) if t.trim().is_empty() => Err(DaemonError::EmptyToken { path }),
        // Refused at start rather than answering every request 401: a header carries printable
        // ASCII only (an editor's byte-order mark is no white space to `trim`).
        Ok(t) if !crate::admin::sendable_token(t.trim()) => {
            Err(DaemonError::UnsendableToken { path })
        }
        Ok(t) => Ok(t.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && generate => {
            let mut bytes = [0u8; 24];
            rand::rng().fill(&mut bytes);
            let t: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            // Whole or not at all: a crash mid-write left an empty file, which every later
            // start refused (`EmptyToken`) until it was removed by hand.
            router::pki::write_secret(&path, &t)?;
            tracing::info!(path = %path.display(), "generated a token");
            Ok(t)
        }
        Err(e) => Err(DaemonError::Io { path, source: e }),
    }
}

pub async fn start(cfg: DaemonConfig) -> Result<Daemon, DaemonError> {
    // An explicit --tls-dir names the fabric's existing PKI: one without a CA is a wrong path,
    // and a new CA there would be trusted by no router. Refused before anything is written.
    if let Some(dir) = &cfg.tls_dir
        && !dir.join(router::pki::CA_CERT).exists()
    {
        return Err(DaemonError::NoCa { dir: dir.clone() });
    }
    let made = cfg.state_dir.join(STORE_MADE);
    if !cfg.state_dir.join(crate::store::redb::FILE).exists() && made.exists() {
        return Err(DaemonError::StoreMissing {
            dir: cfg.state_dir.clone(),
        });
    }
    // The store makes its directory (durably) if it is new.
    let store = Arc::new(RedbStore::open(&cfg.state_dir)?);
    // Said once the store is there, for a later start to tell a used directory whose store
    // went missing from a new one ([`DaemonError::StoreMissing`]).
    if !made.exists() {
        router::durable::write(
            &made,
            &cfg.state_dir.join(format!("{STORE_MADE}.tmp")),
            b"this directory holds a Tasman controller's store (state.redb): a start without it is refused\n",
            false,
        )
        .map_err(|e| DaemonError::Io {
            path: e.path,
            source: e.source,
        })?;
    }
    let tls_dir = cfg
        .tls_dir
        .clone()
        .unwrap_or_else(|| cfg.state_dir.join("pki"));
    ensure_pki(&tls_dir)?;
    let id = router::tls::TlsIdentity::load(&tls_dir, distribute::CONTROLLER_NAME)?;
    let issuer = match &cfg.ca_dir {
        Some(dir) => {
            let issuer = super::renew::NodeIssuer::load(dir, cfg.issue_valid_for)?;
            // The issuing CA must be one the controller trusts (any CA of its bundle, so a
            // rotated --ca-dir works while the bundle holds the old and the new CA): the
            // certificates it signs must be accepted by nodes trusting the same bundle.
            if !issuer.ca_cert().is_some_and(|ca| id.cas.contains(ca)) {
                return Err(DaemonError::CaMismatch {
                    dir: dir.clone(),
                    tls_dir: tls_dir.clone(),
                });
            }
            tracing::info!(ca_dir = %dir.display(), valid_for = %humantime::format_duration(cfg.issue_valid_for),
                "renewing routers' certificates");
            issuer
        }
        None => super::renew::NodeIssuer::disabled(),
    };
    let cert = router::tls::CertResolver::new(&id)?;
    let token = token(&cfg)?;
    let read_token = read_token(&cfg)?;
    if read_token == token {
        tracing::warn!(
            "the read-only token ({}) is the admin token: it can change everything",
            cfg.state_dir.join(READ_TOKEN_FILE).display()
        );
    }
    let listener = admin::bind(cfg.admin)
        .await
        .map_err(|source| DaemonError::Admin {
            addr: cfg.admin,
            source,
        })?;
    let admin_addr = listener.local_addr().map_err(|source| DaemonError::Admin {
        addr: cfg.admin,
        source,
    })?;
    let metrics_listener = match cfg.metrics {
        Some(addr) => {
            let bound = async {
                let l = router::metrics::bind(addr).await?;
                let local = l.local_addr()?;
                Ok::<_, std::io::Error>((l, local))
            };
            Some(
                bound
                    .await
                    .map_err(|source| DaemonError::Metrics { addr, source })?,
            )
        }
        None => None,
    };
    // The routers' QUIC socket is bound here, before the import: everything a first start can
    // fail on (the PKI, the CA directory, the tokens, the three addresses) is checked before
    // `Controller::open` commits `--topology` as version 1. (A start that failed after the
    // import stored the file as it then was, and every later start served that text, ignoring a
    // corrected file, with one info line.)
    let quic_socket = std::net::UdpSocket::bind(cfg.listen).map_err(|source| {
        DaemonError::from(distribute::DistributeError::Bind {
            addr: cfg.listen,
            source,
        })
    })?;
    // The file is read only for the first import: afterwards the store is the truth, and the
    // file may be gone.
    let stored = crate::store::read(&*store, |tx| super::records::current(tx))?.is_some();
    let import = match &cfg.topology_file {
        Some(f) if !stored => Some((
            crate::topology_file::read(f).map_err(io(f))?,
            f.display().to_string(),
        )),
        Some(f) => {
            tracing::info!(file = %f.display(), "the store holds a topology: --topology not read");
            None
        }
        None => None,
    };
    let ctl = Controller::open(
        store,
        import.as_ref().map(|(t, f)| (t.as_str(), f.as_str())),
    )?;
    let endpoint = distribute::endpoint_on(&ctl, &cert, quic_socket)?;
    let quic_addr = endpoint.local_addr().map_err(|source| DaemonError::Admin {
        addr: cfg.listen,
        source,
    })?;
    let circuits = crate::circuits::service::CircuitService::with_retention(
        ctl.clone(),
        crate::circuits::service::DEFAULT_PROVISION_TIMEOUT,
        cfg.circuit_retention,
    )?;
    let state = AdminState::new(ctl.clone(), &token, circuits.clone()).with_read_token(&read_token);
    let mut tasks = Vec::new();
    if !cfg.cert_reload_interval.is_zero() {
        let (cert, every) = (cert.clone(), cfg.cert_reload_interval);
        tasks.push(tokio::spawn(cert.reload_every(every)));
    }
    issuer.sign_within(cert.clone());
    let issuer = Arc::new(issuer);
    tasks.extend([
        tokio::spawn(issuer.clone().renew_own(cert.clone())),
        tokio::spawn(
            issuer
                .clone()
                .watch_crl(cert.clone(), cfg.cert_reload_interval),
        ),
        tokio::spawn(circuits.clone().sweep_loop()),
        tokio::spawn(circuits.settle_loop()),
        tokio::spawn(distribute::serve(
            ctl.clone(),
            endpoint.clone(),
            issuer,
            cert.clone(),
            cfg.write_stall_timeout,
        )),
        tokio::spawn(ctl.clone().recompute_loop()),
        tokio::spawn(ctl.clone().flush_loop()),
        tokio::spawn(admin::serve(listener, state)),
    ]);
    let metrics_addr = metrics_listener.as_ref().map(|(_, addr)| *addr);
    if let Some((listener, _)) = metrics_listener {
        let (ctl, cert) = (ctl.clone(), cert.clone());
        let render = Arc::new(move || metrics::render(&ctl, &cert));
        tasks.push(tokio::spawn(router::metrics::serve_metrics(
            listener, render,
        )));
    }
    tracing::info!(%quic_addr, %admin_addr, ?metrics_addr, version = ctl.current().record.version, "controller running");
    Ok(Daemon {
        ctl,
        quic_addr,
        admin_addr,
        metrics_addr,
        token,
        read_token,
        tls_dir,
        cert,
        endpoint,
        tasks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "version: 1\nnodes:\n  - {id: e, kind: edge, region: r, country: AU, location: {lat: 0, lon: 0}, address: \"127.0.0.1:7000\", client_address: \"127.0.0.1\"}\n  - {id: s, kind: site, region: r, country: AU, location: {lat: 0, lon: 0}, address: \"127.0.0.2:7000\", serves: [{service: chat, backend: \"127.0.0.9:9001\", capacity: 10}]}\nlinks:\n  - {a: e, b: s, latency: 1ms, capacity: 1Gbps}\nservices:\n  - {name: chat, port: 8080}\n";

    fn config(state: &Path, tls_dir: Option<PathBuf>) -> DaemonConfig {
        let topology_file = state.with_file_name("t.yaml");
        std::fs::write(&topology_file, YAML).unwrap();
        DaemonConfig {
            topology_file: Some(topology_file),
            state_dir: state.to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            metrics: None,
            tls_dir,
            admin_token_file: None,
            cert_reload_interval: Duration::ZERO,
            ca_dir: None,
            issue_valid_for: super::super::renew::DEFAULT_VALIDITY,
            write_stall_timeout: distribute::WRITE_STALL_TIMEOUT,
            circuit_retention: Some(crate::circuits::DEFAULT_RETENTION),
        }
    }

    /// An explicit --tls-dir without a CA (a mistyped or empty directory) is refused, naming
    /// the flag and the path, and nothing is created there or in the state directory; without
    /// --tls-dir the CA is still created in <state>/pki. (A new CA was made there silently, one
    /// no router trusts.)
    #[tokio::test]
    async fn an_explicit_tls_dir_without_a_ca_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (state, pki) = (dir.path().join("state"), dir.path().join("pki"));
        std::fs::create_dir(&pki).unwrap();
        let err = match start(config(&state, Some(pki.clone()))).await {
            Ok(d) => {
                d.shutdown().await;
                panic!("a --tls-dir without ca.pem was accepted");
            }
            Err(e) => e,
        };
        assert!(matches!(err, DaemonError::NoCa { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("--tls-dir {}: no ca.pem there", pki.display())),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
        assert_eq!(std::fs::read_dir(&pki).unwrap().count(), 0);
        assert!(!state.exists());

        let d = start(config(&state, None)).await.unwrap();
        assert!(state.join("pki").join(router::pki::CA_CERT).is_file());
        d.shutdown().await;
    }

    /// A token file no client could present (an editor's byte-order mark before the token, a
    /// letter outside ASCII) is refused at start naming the file. (The controller started, and
    /// answered every request 401.)
    #[tokio::test]
    async fn an_admin_token_no_client_can_send_is_refused() {
        for token in ["\u{feff}s3cret\n", "sécret", "s3\u{7}cret"] {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("token");
            std::fs::write(&file, token).unwrap();
            let mut cfg = config(&dir.path().join("state"), None);
            cfg.admin_token_file = Some(file.clone());
            let err = match start(cfg).await {
                Ok(d) => {
                    d.shutdown().await;
                    panic!("token {token:?} was accepted");
                }
                Err(e) => e,
            };
            assert!(
                matches!(err, DaemonError::UnsendableToken { .. }),
                "{token:?}: {err:?}"
            );
            assert!(err.to_string().starts_with(&file.display().to_string()));
        }
    }

    /// A token file over 4 KiB (a log file named by mistake, `/dev/zero`) is refused at start
    /// naming it, read no further. (Read whole: `/dev/zero` grew the controller until it was
    /// killed, and a megabyte of letters was the admin token.)
    #[tokio::test]
    async fn a_token_file_over_its_bound_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "a".repeat(1 << 20)).unwrap();
        for path in [file, std::path::PathBuf::from("/dev/zero")] {
            let mut cfg = config(&dir.path().join("state"), None);
            cfg.admin_token_file = Some(path.clone());
            let err = match start(cfg).await {
                Ok(d) => {
                    d.shutdown().await;
                    panic!("{} was accepted", path.display());
                }
                Err(e) => e,
            };
            assert!(
                err.to_string().contains(&path.display().to_string())
                    && err.to_string().contains("over 4096 bytes"),
                "{err}"
            );
        }
    }

    /// A first start that fails (here its token file is missing) imports nothing: the next
    /// start imports `--topology` as it is then, corrected meanwhile. (The import was committed
    /// before the start's other steps, so every later start served the text of the one that
    /// failed and ignored the file.)
    #[tokio::test]
    async fn a_failed_first_start_imports_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let file = dir.path().join("token");
        let mut cfg = config(&state, None);
        cfg.admin_token_file = Some(file.clone());
        assert!(
            start(cfg.clone()).await.is_err(),
            "started without its token file"
        );
        let corrected = YAML.replace("latency: 1ms", "latency: 2ms");
        assert_ne!(corrected, YAML);
        std::fs::write(cfg.topology_file.as_ref().unwrap(), &corrected).unwrap();
        std::fs::write(&file, "s3cret\n").unwrap();
        let d = start(cfg).await.expect("starts");
        assert_eq!(d.ctl.current().record.text, corrected);
        d.shutdown().await;
    }

    /// A store that does not answer (a flush holding its lock on a hung disk) does not hold the
    /// shutdown for ever: it gives up on the routers' last records after its bound. (It waited
    /// for the lock without end, every later SIGTERM ignored.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shutdown_does_not_wait_for_ever_on_a_store_that_hangs() {
        let dir = tempfile::tempdir().unwrap();
        let d = start(config(&dir.path().join("state"), None))
            .await
            .unwrap();
        let ctl = d.ctl.clone();
        let (held, holding) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _flush = ctl.flushing.lock().unwrap();
            held.send(()).unwrap();
            std::thread::sleep(Duration::from_secs(15));
        });
        holding.recv().unwrap();
        let bound = SHUTDOWN_FLUSH + Duration::from_secs(7);
        tokio::time::timeout(bound, d.shutdown())
            .await
            .expect("the shutdown waited for the hung store");
    }
}
