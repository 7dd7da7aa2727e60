//! Mutual TLS for every QUIC connection of the fabric (router to router, router to controller).
//!
//! A peer is accepted only when both hold: its certificate chains to a CA of the fabric's trust
//! bundle in force (`ca.pem`: every CA in it, see [`pki`] on rotating the CA), and
//! the certificate is valid for a name in the current [`PeerNames`] set (the node ids of the
//! current topology, plus `controller` where the caller adds it). The set is swapped on every
//! snapshot, so a node removed from the topology is refused at its next handshake.
//!
//! The certificate and key a node presents come from a [`CertResolver`] (the server and client
//! configs share it). [`CertResolver::reload`] re-reads the node's files and swaps in a new pair
//! only if it is for this node, chains to a CA of the bundle in force and is valid now; new
//! handshakes then present it, while established connections keep going.
//!
//! The bundle is re-read too, on the same tick and before the certificate
//! ([`CertResolver::reload_trust`]): a new `ca.pem` is adopted whole if it parses
//! ([`pki::parse_ca_bundle`]) and the certificate the node presents still chains to a CA of it
//! (a bundle that drops the node's own issuer would cut it off from its peers: refused, the
//! bundle in force stays). A CA rotation thus needs no restart.
//!
//! Revocation: a certificate on a revocation list in force is refused too. The lists come from
//! `ca.crl.pem` in the same directory ([`pki::CA_CRL`], written by [`pki::revoke`]), read at start
//! and at every reload tick ([`CertResolver::reload_crl`]); a list is adopted only if it is signed
//! by a CA of the bundle in force and is not older than the one in force for that CA, so a
//! list can only narrow trust, never widen it, and a corrupt or foreign file changes nothing. A
//! list stays attached to its CA (by certificate) when the bundle changes, and leaves force with
//! it. The verifiers (one pair per CA, each with that CA's list: see `Trust`) are swapped whole,
//! read lock-free at each handshake, and [`close_when_untrusted`] closes the established
//! connections whose peer a change of trust (a newly adopted list, a CA gone from the bundle)
//! no longer accepts.
//!
//! Neither 0-RTT nor resumption is enabled: 0-RTT data is replayable and the first bytes of a
//! stream here are a client's (non-idempotent) inference request; resumption would skip the
//! client-certificate check, and connections are long-lived and pooled (one handshake per
//! neighbour per reconnect), so it would buy almost nothing.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};

use crate::pki;

/// ALPN of the fabric's QUIC protocol; bumped with incompatible wire changes.
pub const ALPN: &[u8] = b"tasman/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC crypto: {0}")]
    Quic(String),
}

/// A node's certificate chain and key, and the CAs it trusts. Loaded from a PKI directory.
pub struct TlsIdentity {
    pub name: String,
    /// The trust bundle: every CA of `ca.pem` (more than one while the CA is rotated).
    pub cas: Vec<CertificateDer<'static>>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The directory it was loaded from (where a [`CertResolver`] reloads it); `None`: built in
    /// memory.
    pub dir: Option<PathBuf>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            name: self.name.clone(),
            cas: self.cas.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            dir: self.dir.clone(),
        }
    }
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// Loads `ca.pem` (every CA in it), `<name>.pem` and `<name>.key` from `dir` (as written by
    /// [`pki`]).
    pub fn load(dir: &Path, name: &str) -> Result<Self, TlsError> {
        let file_err = |path: &Path, reason: String| TlsError::File {
            path: path.to_path_buf(),
            reason,
        };
        let ca_path = dir.join(pki::CA_CERT);
        let text =
            std::fs::read_to_string(&ca_path).map_err(|e| file_err(&ca_path, e.to_string()))?;
        let cas = pki::parse_ca_bundle(&text)
            .map_err(|e| file_err(&ca_path, e))?
            .into_iter()
            .map(|c| c.der)
            .collect();
        let (chain, key, staged) = Self::read_pair(dir, name)?;
        // Start-up, before anything of this process writes the files: finish the install a
        // crash cut between its renames, so that the files agree again (a reload on every tick
        // would otherwise take the staged certificate again, and other readers of `NAME.pem`
        // would see the old one).
        if let Some(staged) = staged {
            let cert_path = dir.join(format!("{name}.pem"));
            match pki::rename_synced(&staged, &cert_path) {
                Ok(()) => tracing::warn!(node = %name,
                    "finished an interrupted certificate install: {} -> {}",
                    staged.display(), cert_path.display()),
                Err(e) => tracing::warn!(node = %name,
                    "presenting the staged certificate {} (the key is newer than {}); could not \
                     move it into place: {e}", staged.display(), cert_path.display()),
            }
        }
        Ok(TlsIdentity {
            name: name.to_string(),
            cas,
            chain,
            key,
            dir: Some(dir.to_path_buf()),
        })
    }

    /// Loads `<name>.pem` (the chain) and `<name>.key` from `dir`, without `ca.pem` (what a
    /// certificate reload reads: the bundle is reloaded on its own).
    pub fn load_pair(
        dir: &Path,
        name: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        Self::read_pair(dir, name).map(|(chain, key, _)| (chain, key))
    }

    /// [`Self::load_pair`], and the staged certificate's path when it was taken.
    #[allow(clippy::type_complexity)]
    fn read_pair(
        dir: &Path,
        name: &str,
    ) -> Result<
        (
            Vec<CertificateDer<'static>>,
            PrivateKeyDer<'static>,
            Option<std::path::PathBuf>,
        ),
        TlsError,
    > {
        let file_err = |path: &Path, reason: String| TlsError::File {
            path: path.to_path_buf(),
            reason,
        };
        let cert_path = dir.join(format!("{name}.pem"));
        let staged = dir.join(format!("{name}.pem.{}", pki::STAGED));
        // `None`: no certificate file, only a staged one.
        let chain = match CertificateDer::pem_file_iter(&cert_path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        {
            Ok(chain) if chain.is_empty() => {
                return Err(file_err(&cert_path, "no certificate in file".into()));
            }
            Ok(chain) => Some(chain),
            // A first pair cut off between its two renames: the key in place, its certificate
            // still staged (there was no certificate before it). Checked against the key below
            // like any chain, and adopted as a staged one.
            Err(e) if !cert_path.exists() && staged.exists() => {
                tracing::debug!(node = %name, path = %staged.display(), "no {}: trying the staged certificate ({e})", cert_path.display());
                None
            }
            Err(e) => return Err(file_err(&cert_path, e.to_string())),
        };
        let key_path = dir.join(format!("{name}.key"));
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| file_err(&key_path, e.to_string()))?;
        // A new pair renamed in halfway (a crash between `write_node_files`' two renames): the
        // new key beside the old certificate, the new certificate still staged.
        let for_key = |chain: &[CertificateDer<'_>]| {
            rcgen::KeyPair::try_from(&key)
                .ok()
                .and_then(|k| pki::is_for_key(chain.first()?, &k))
        };
        if chain.as_deref().is_none_or(|c| for_key(c) == Some(false))
            && let Some(next) = CertificateDer::pem_file_iter(&staged)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .ok()
                .filter(|next| for_key(next) == Some(true))
        {
            tracing::debug!(node = %name, path = %staged.display(),
                "the key is newer than {}: taking the staged certificate for it", cert_path.display());
            return Ok((next, key, Some(staged)));
        }
        match chain {
            Some(chain) => Ok((chain, key, None)),
            None => Err(file_err(
                &cert_path,
                format!(
                    "missing, and {} is not a certificate for {name}.key",
                    staged.display()
                ),
            )),
        }
    }
}

/// The expiry (`notAfter`, unix seconds) of a DER certificate.
pub fn not_after(cert: &CertificateDer<'_>) -> Result<i64, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    Ok(parsed.validity().not_after.timestamp())
}

/// The DNS names a DER certificate is for (its subject alternative names).
pub fn dns_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("unreadable subject alternative names: {e}"))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The start of validity (`notBefore`, unix seconds) of a DER certificate.
pub fn not_before(cert: &CertificateDer<'_>) -> Result<i64, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    Ok(parsed.validity().not_before.timestamp())
}

/// Whether the first certificate of `chain_pem` is for `key` (its public key). `None`: there is
/// no certificate to read, which [`install`] reports.
pub fn certifies(chain_pem: &str, key: &rcgen::KeyPair) -> Option<bool> {
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()?
        .ok()?;
    pki::is_for_key(&leaf, key)
}

/// How a renewal through the controller ended, for `tasman_tls_cert_renewals_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// A new certificate is presented now.
    Renewed,
    /// The controller refused (no CA, rate limit, bad key).
    Refused,
    /// A certificate came back but could not be installed (the old pair stays).
    Invalid,
    /// No answer before the next attempt was due, or the connection went first.
    NoAnswer,
}

impl Renewal {
    pub const ALL: [Renewal; 4] = [
        Renewal::Renewed,
        Renewal::Refused,
        Renewal::Invalid,
        Renewal::NoAnswer,
    ];
    pub fn label(self) -> &'static str {
        match self {
            Renewal::Renewed => "renewed",
            Renewal::Refused => "refused",
            Renewal::Invalid => "invalid",
            Renewal::NoAnswer => "no_answer",
        }
    }
}

/// What a [`CertResolver::reload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The files hold the certificate already presented.
    Unchanged,
    /// A new pair is presented now; it expires at this unix time.
    Reloaded { not_after: i64 },
    /// The files were refused (the old pair stays): why.
    Refused(String),
}

/// What one [`CertResolver::reload_tick`] did, in its order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadTick {
    pub trust: TrustReload,
    pub cert: Reload,
    pub crl: CrlReload,
}

/// What a [`CertResolver::reload_crl`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrlReload {
    /// No file, the same file, or no list newer than the ones in force.
    Unchanged,
    /// A newer list is in force now.
    Adopted,
    /// The file was refused (the lists in force stay): why.
    Refused(String),
}

/// Where the text of a `ca.crl.pem` came from. The reload tick reads the node's file while
/// [`install_crl`] takes lists from elsewhere (a router's controller; the controller's own
/// `--ca-dir`, every tick, when that is not its TLS directory), so the two sources are judged
/// in turn: each is remembered apart, or each would make the other's refusal new again, logged
/// and counted at every tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CrlSource {
    /// `ca.crl.pem` in the node's directory ([`CertResolver::reload_crl`]).
    File,
    /// Lists handed to [`install_crl`].
    Installed,
}

/// A `ca.crl.pem` text judged (its bytes) and why it was refused, if it was.
type CrlJudged = (Vec<u8>, Option<String>);

/// What a [`CertResolver::reload_trust`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustReload {
    /// No directory, the same file, or a file with the CAs in force (in the same order).
    Unchanged,
    /// The bundle of the file is in force now: this many CAs.
    Adopted { cas: usize },
    /// The file was refused (the bundle in force stays): why.
    Refused(String),
}

/// The certificate and key this node presents, as a server and as a client: swapped whole by
/// [`CertResolver::reload`] (lock-free reads at each handshake), and what the node trusts: the
/// bundle of `ca.pem` in force ([`CertResolver::reload_trust`]: read at start and re-read at each
/// reload tick), narrowed by the revocation lists it adopts ([`CertResolver::reload_crl`]). A new
/// certificate must chain to a CA of the bundle in force; the handshake verifiers of the configs
/// built from it read the bundle and lists in force at each handshake.
pub struct CertResolver {
    name: String,
    dir: Option<PathBuf>,
    current: ArcSwap<CertifiedKey>,
    /// What the node trusts now (the bundle and its lists): swapped whole when a bundle or a CRL
    /// is adopted (lock-free reads at each handshake).
    trust: Arc<ArcSwap<Trust>>,
    provider: Arc<CryptoProvider>,
    /// Bumped at each change of trust (a CRL or a bundle adopted): [`close_when_untrusted`]
    /// rechecks live connections then.
    trust_changes: tokio::sync::watch::Sender<u64>,
    crl_updates: AtomicU64,
    crl_failures: AtomicU64,
    revoked_closed: AtomicU64,
    /// Per [`CrlSource`] (by its index), the last text of a `ca.crl.pem` judged and why it was
    /// refused, if it was: the same text is neither re-checked nor logged twice
    /// until the trust it was judged against changes (a bundle adopted: a list refused against
    /// one bundle may check out against the next; a list adopted from another source).
    last_crl: Mutex<[Option<CrlJudged>; 2]>,
    /// The last lists from the controller ([`install_crl`]) if they were refused: tried again
    /// after the bundle changes (the controller sends them once, and they may be for a CA the
    /// node did not trust yet).
    refused_push: Mutex<Option<String>>,
    /// The lists the controller sent are in force but the last write of them failed (a full
    /// disk, a read-only directory): the same push again writes them ([`install_crl`]), or a
    /// restart would read the older file and trust a certificate revoked since.
    crls_unsaved: AtomicBool,
    /// The lists of CAs that left the bundle, by CA certificate: put back in force if that CA
    /// comes back (so putting a retired CA back into `ca.pem` does not un-revoke anything).
    retired_crls: Mutex<Vec<(CertificateDer<'static>, pki::CheckedCrl)>>,
    trust_reloads: AtomicU64,
    trust_failures: AtomicU64,
    untrusted_closed: AtomicU64,
    /// The last `ca.pem` read (its bytes) and whether it was refused: the same file adopted is
    /// not checked again, the same file refused is checked again (the certificate it was judged
    /// against may change) but logged and counted once.
    last_bundle: Mutex<Option<(Vec<u8>, bool)>>,
    /// Held through each adoption (of a bundle, a list or a certificate): the reload tick and
    /// the control client may adopt at the same time, and the later store must not undo what the
    /// other just put in force (a newer list, a bundle, a certificate checked against another
    /// bundle).
    adopting: Mutex<()>,
    not_before: AtomicI64,
    not_after: AtomicI64,
    reloads: AtomicU64,
    failures: AtomicU64,
    /// Renewals through the controller by [`Renewal`]; rendered once one was attempted.
    renewals: [AtomicU64; 4],
    renewing: std::sync::atomic::AtomicBool,
    /// The last refusal (leaf DER, reason): the same bad files are counted and logged once.
    last_refusal: Mutex<Option<(Vec<u8>, String)>>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver")
            .field("name", &self.name)
            .field("not_after", &self.not_after.load(Relaxed))
            .finish_non_exhaustive()
    }
}

/// A refusal's reason without its numbers, to tell one refusal from the next: an expired or
/// not-yet-valid certificate's reason carries the time of the check, which made every reload a
/// new refusal (counted and logged every 10 s, where the promise is once per set of files).
fn refusal_kind(reason: &str) -> String {
    reason.chars().filter(|c| !c.is_ascii_digit()).collect()
}

impl CertResolver {
    /// Presents `id`'s certificate (its key must match); reloads come from `id.dir`.
    pub fn new(id: &TlsIdentity) -> Result<Arc<Self>, TlsError> {
        let provider = provider();
        // Errors name the files they are about, when the identity came from a directory (a key
        // that is not its certificate's said only `KeyMismatch`).
        let trust = Trust::build(&id.cas, vec![None; id.cas.len()], &provider).map_err(|e| {
            match &id.dir {
                Some(dir) => TlsError::File {
                    path: dir.join(crate::pki::CA_CERT),
                    reason: e.to_string(),
                },
                None => e,
            }
        })?;
        let ck = CertifiedKey::from_der(id.chain.clone(), id.key.clone_key(), &provider).map_err(
            |e| match &id.dir {
                Some(dir) => TlsError::File {
                    path: dir.join(format!("{}.pem", id.name)),
                    reason: format!(
                        "{e}: is {} the key of this certificate?",
                        dir.join(format!("{}.key", id.name)).display()
                    ),
                },
                None => e.into(),
            },
        )?;
        let not_after = not_after(&id.chain[0]).unwrap_or(0);
        let not_before = not_before(&id.chain[0]).unwrap_or(0);
        Ok(Arc::new(CertResolver {
            name: id.name.clone(),
            dir: id.dir.clone(),
            current: ArcSwap::from_pointee(ck),
            trust: Arc::new(ArcSwap::from_pointee(trust)),
            provider,
            trust_changes: tokio::sync::watch::Sender::new(0),
            crl_updates: AtomicU64::new(0),
            crl_failures: AtomicU64::new(0),
            revoked_closed: AtomicU64::new(0),
            last_crl: Mutex::new([None, None]),
            refused_push: Mutex::new(None),
            crls_unsaved: AtomicBool::new(false),
            retired_crls: Mutex::new(Vec::new()),
            trust_reloads: AtomicU64::new(0),
            trust_failures: AtomicU64::new(0),
            untrusted_closed: AtomicU64::new(0),
            last_bundle: Mutex::new(None),
            adopting: Mutex::new(()),
            not_before: AtomicI64::new(not_before),
            not_after: AtomicI64::new(not_after),
            reloads: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            renewals: Default::default(),
            renewing: Default::default(),
            last_refusal: Mutex::new(None),
        })
        .with_crl_loaded())
    }

    /// Takes the directory's `ca.crl.pem` at start, if there is one and it checks out (a refused
    /// one is logged and counted, and the node starts without a list rather than not at all).
    fn with_crl_loaded(self: Arc<Self>) -> Arc<Self> {
        let _ = self.reload_crl();
        self
    }

    /// The node name the certificate is for.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The CAs this node trusts: the bundle in force (loaded at start, or adopted since by
    /// [`CertResolver::reload_trust`]), in file order.
    pub fn trusted(&self) -> Vec<CertificateDer<'static>> {
        self.trust.load().cas.clone()
    }
    /// The pair presented now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
    /// Unix time the presented certificate expires.
    pub fn not_after(&self) -> i64 {
        self.not_after.load(Relaxed)
    }
    /// Unix time the presented certificate became valid.
    pub fn not_before(&self) -> i64 {
        self.not_before.load(Relaxed)
    }
    /// The directory the node's files are re-read from; `None`: built in memory.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }
    /// Counts a renewal through the controller that ended so.
    pub fn count_renewal(&self, r: Renewal) {
        self.renewing.store(true, Relaxed);
        self.renewals[r as usize].fetch_add(1, Relaxed);
    }
    /// Renewals through the controller that ended so, since start.
    pub fn renewals(&self, r: Renewal) -> u64 {
        self.renewals[r as usize].load(Relaxed)
    }
    /// New pairs swapped in since start.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Relaxed)
    }
    /// Distinct sets of files refused since start.
    pub fn reload_failures(&self) -> u64 {
        self.failures.load(Relaxed)
    }

    /// Whether `id` may replace the presented pair: its key matches its certificate, and the
    /// certificate chains to a CA of the bundle in force, is valid now and is for our name (for
    /// both server and client use). The checked pair on success.
    pub fn check(&self, id: &TlsIdentity) -> Result<CertifiedKey, String> {
        self.check_with(id, &self.trust.load())
    }

    /// [`CertResolver::check`] against `trust` (a bundle about to be adopted).
    fn check_with(&self, id: &TlsIdentity, trust: &Trust) -> Result<CertifiedKey, String> {
        id.chain.first().ok_or("no certificate in file")?;
        let ck = CertifiedKey::from_der(id.chain.clone(), id.key.clone_key(), &self.provider)
            .map_err(|e| format!("key does not match the certificate: {e}"))?;
        ck.keys_match()
            .map_err(|e| format!("key does not match the certificate: {e}"))?;
        self.verify_chain(&id.chain, trust)?;
        Ok(ck)
    }

    /// Whether `chain` is this node's, valid now, and chains to a CA of `trust`, for both ends
    /// of a connection.
    fn verify_chain(&self, chain: &[CertificateDer<'static>], trust: &Trust) -> Result<(), String> {
        let leaf = chain.first().ok_or("no certificate in file")?;
        let now = UnixTime::now();
        let sn = ServerName::try_from(self.name.as_str())
            .map_err(|e| format!("node name {:?}: {e}", self.name))?;
        trust
            .verify_server(leaf, &chain[1..], &sn, now)
            .map_err(|e| format!("certificate refused: {e}"))?;
        trust
            .verify_client(leaf, &chain[1..], now)
            .map_err(|e| format!("certificate refused for client use: {e}"))?;
        Ok(())
    }

    /// The presented certificate, judged at start. `Err`: it is not for this node (another
    /// node's files copied in): no reload or renewal makes it so, and every neighbour refuses
    /// it, so the node does not start. `Ok(Some(why))`: the reload's check refuses it for
    /// another reason (expired, not yet valid, a CA outside the bundle): the node starts with it
    /// (a re-issued pair is taken up by a reload; the controller renews only a node it can
    /// reach), and says why. (It started on either without a word; the same files copied in
    /// while it ran were refused with a warning.)
    pub fn at_start(&self) -> Result<Option<String>, String> {
        let ck = self.current.load_full();
        let leaf = ck.cert.first().ok_or("no certificate in file")?;
        let names = dns_names(leaf)?;
        if !names.iter().any(|n| n == &self.name) {
            return Err(format!(
                "the certificate is for {}, not for node {} (another node's files?)",
                if names.is_empty() {
                    "no name".to_string()
                } else {
                    names.join(", ")
                },
                self.name
            ));
        }
        Ok(self.verify_chain(&ck.cert, &self.trust.load()).err())
    }

    /// Where the presented certificate was read (`NAME.pem` in the directory), for messages.
    pub fn cert_path(&self) -> PathBuf {
        let file = format!("{}.pem", self.name);
        self.dir
            .as_ref()
            .map_or_else(|| PathBuf::from(&file), |d| d.join(&file))
    }

    /// Re-reads `<name>.pem` and `<name>.key` from the directory the identity came from and
    /// swaps them in if they changed and pass [`CertResolver::check`] (against the bundle in
    /// force); otherwise keeps the presented pair (logging why, once per distinct set of refused
    /// files).
    pub fn reload(&self) -> Reload {
        let Some(dir) = &self.dir else {
            return Reload::Unchanged;
        };
        // Checked and swapped under the adoption lock: a bundle adopted in between would not
        // have been checked against this certificate, nor this certificate against it.
        let _one_at_a_time = self.adopting.lock();
        let loaded = self.load_own(dir);
        if let Ok(id) = &loaded
            && self.current.load().cert.first() == id.chain.first()
        {
            return Reload::Unchanged;
        }
        // The refused leaf (empty when the files did not load) tells one bad set of files from
        // the next.
        let leaf = loaded
            .as_ref()
            .ok()
            .and_then(|id| id.chain.first().map(|c| c.to_vec()))
            .unwrap_or_default();
        let checked = loaded
            .map_err(|e| e.to_string())
            .and_then(|id| self.check(&id));
        match checked {
            Ok(ck) => self.present(ck),
            Err(reason) => {
                let seen = (leaf, refusal_kind(&reason));
                let new = match self.last_refusal.lock() {
                    Ok(l) if l.as_ref() == Some(&seen) => false,
                    Ok(mut l) => {
                        *l = Some(seen);
                        true
                    }
                    Err(_) => true,
                };
                if new {
                    self.failures.fetch_add(1, Relaxed);
                    tracing::warn!(node = %self.name, dir = %dir.display(),
                        "new node certificate refused, keeping the current one: {reason}");
                }
                Reload::Refused(reason)
            }
        }
    }

    /// The node's pair as its files hold it now (not its `ca.pem`, reloaded on its own: the
    /// identity carries the bundle in force).
    fn load_own(&self, dir: &Path) -> Result<TlsIdentity, TlsError> {
        let (chain, key) = TlsIdentity::load_pair(dir, &self.name)?;
        Ok(TlsIdentity {
            name: self.name.clone(),
            cas: self.trusted(),
            chain,
            key,
            dir: Some(dir.to_path_buf()),
        })
    }

    /// Presents `ck` (checked) from now on; `adopting` held by the caller.
    fn present(&self, ck: CertifiedKey) -> Reload {
        let na = not_after(&ck.cert[0]).unwrap_or(0);
        let nb = not_before(&ck.cert[0]).unwrap_or(0);
        self.current.store(Arc::new(ck));
        self.not_before.store(nb, Relaxed);
        self.not_after.store(na, Relaxed);
        self.reloads.fetch_add(1, Relaxed);
        if let Ok(mut l) = self.last_refusal.lock() {
            *l = None;
        }
        tracing::info!(node = %self.name, not_after = na, expires = %fmt_unix(na),
            "reloaded the node certificate");
        Reload::Reloaded { not_after: na }
    }

    /// Re-reads `ca.pem` from the directory the identity came from and, if it holds another
    /// bundle than the one in force, adopts it whole when both hold:
    ///
    /// - it parses as a non-empty bundle of CA certificates ([`pki::parse_ca_bundle`]);
    /// - the certificate this node presents now chains to a CA of it (a bundle without the
    ///   node's own issuer is almost surely a mistake, and would cut the node off from every peer
    ///   on that CA; a certificate from a CA the bundle adds is taken after it, by
    ///   [`CertResolver::reload`]).
    ///
    /// Otherwise the whole file is refused and the bundle in force stays (logged and counted once
    /// per distinct file; a refused file is checked again at each call, since the certificate it
    /// was judged against may change). On adoption, each revocation list in force stays with its
    /// CA (matched by certificate, wherever the CA sits in the new bundle, its number still the
    /// floor for the next list of that CA); the lists of CAs that left the bundle leave force
    /// with them (and come back with their CA). New handshakes use the new bundle at once and
    /// [`close_when_untrusted`] closes the live connections whose peer no CA in force accepts.
    pub fn reload_trust(&self) -> TrustReload {
        let Some(dir) = &self.dir else {
            return TrustReload::Unchanged;
        };
        let path = dir.join(pki::CA_CERT);
        let _one_at_a_time = self.adopting.lock();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                let why = e.to_string();
                return self.bundle_refused(why.clone().into_bytes(), why);
            }
        };
        if let Ok(l) = self.last_bundle.lock()
            && let Some((seen, false)) = l.as_ref()
            && *seen == bytes
        {
            return TrustReload::Unchanged;
        }
        match self.adopt_bundle(&bytes) {
            Ok(got) => {
                if let Ok(mut l) = self.last_bundle.lock() {
                    *l = Some((bytes, false));
                }
                got
            }
            Err(why) => self.bundle_refused(bytes, why),
        }
    }

    /// [`CertResolver::reload_trust`] on the contents of a `ca.pem`, `adopting` held by the
    /// caller. Why it is refused, on error.
    fn adopt_bundle(&self, bytes: &[u8]) -> Result<TrustReload, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not a PEM file".to_string())?;
        let cas: Vec<CertificateDer<'static>> = pki::parse_ca_bundle(text)?
            .into_iter()
            .map(|c| c.der)
            .collect();
        let cur = self.trust.load_full();
        if cas == cur.cas {
            return Ok(TrustReload::Unchanged);
        }
        let mut retired = self
            .retired_crls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Each CA's list: the one in force for that CA certificate, or the one it had when it
        // left the bundle; at the CA's new position.
        let crls: Vec<Option<pki::CheckedCrl>> = cas
            .iter()
            .enumerate()
            .map(|(i, ca)| {
                let in_force = cur
                    .cas
                    .iter()
                    .position(|c| c == ca)
                    .and_then(|j| cur.crls[j].clone());
                let kept = in_force.or_else(|| {
                    retired
                        .iter()
                        .find(|(c, _)| c == ca)
                        .map(|(_, crl)| crl.clone())
                });
                kept.map(|mut crl| {
                    crl.ca = i;
                    crl
                })
            })
            .collect();
        let next = Trust::build(&cas, crls, &self.provider).map_err(|e| e.to_string())?;
        // Revoked is fine here: the question is whether the node's issuer stays trusted. A
        // bundle that does not is refused even when the node's pair on disk chains to it (a
        // foreign CA's files copied in by mistake would cut the node off from every peer), but
        // then the refusal says so: a node that missed a rotation's first step, given the final
        // bundle and its new pair, takes both at a restart.
        if let Standing::Untrusted(e) = next.standing(&self.current.load().cert) {
            let pair_chains = self.dir.as_deref().is_some_and(|d| {
                self.load_own(d)
                    .map_err(|e| e.to_string())
                    .and_then(|id| self.check_with(&id, &next))
                    .is_ok()
            });
            let hint = if pair_chains {
                "; the node's certificate file does chain to it: if this node missed the first \
                 step of a CA rotation, restart it to take both"
            } else {
                ""
            };
            return Err(format!(
                "the certificate this node presents does not chain to a CA of it ({e}): it would \
                 cut this node off from its peers on that CA (give the node a certificate from \
                 a CA of both bundles first){hint}"
            ));
        }
        let gone: Vec<usize> = (0..cur.cas.len())
            .filter(|&j| !cas.contains(&cur.cas[j]))
            .collect();
        let added = cas.iter().filter(|c| !cur.cas.contains(c)).count();
        for &j in &gone {
            if let Some(crl) = &cur.crls[j] {
                retired.retain(|(c, _)| *c != cur.cas[j]);
                retired.push((cur.cas[j].clone(), crl.clone()));
            }
        }
        retired.retain(|(c, _)| !cas.contains(c));
        drop(retired);
        self.trust.store(Arc::new(next));
        self.trust_reloads.fetch_add(1, Relaxed);
        // A list refused against the old bundle may check out against this one.
        if let Ok(mut l) = self.last_crl.lock() {
            *l = Default::default();
        }
        tracing::info!(node = %self.name, cas = cas.len(), added, removed = gone.len(),
            "adopted a new trust bundle ({})", pki::CA_CERT);
        self.trust_changes.send_modify(|g| *g += 1);
        Ok(TrustReload::Adopted { cas: cas.len() })
    }

    fn bundle_refused(&self, mut bytes: Vec<u8>, why: String) -> TrustReload {
        // Told again when the reason changes for the same file (the node's pair on disk came
        // to chain to it: the refusal then says a restart takes both).
        bytes.extend_from_slice(why.as_bytes());
        let new = match self.last_bundle.lock() {
            Ok(mut l) => {
                let new = !matches!(l.as_ref(), Some((seen, true)) if *seen == bytes);
                *l = Some((bytes, true));
                new
            }
            Err(_) => true,
        };
        if new {
            self.trust_failures.fetch_add(1, Relaxed);
            tracing::warn!(node = %self.name, dir = ?self.dir,
                "{} refused, keeping the trust bundle in force: {why}", pki::CA_CERT);
        }
        TrustReload::Refused(why)
    }

    /// New trust bundles adopted since start.
    pub fn trust_reloads(&self) -> u64 {
        self.trust_reloads.load(Relaxed)
    }
    /// Distinct `ca.pem` files refused since start (a file refused again for another reason counts
    /// again).
    pub fn trust_reload_failures(&self) -> u64 {
        self.trust_failures.load(Relaxed)
    }
    /// Live connections closed because no CA of the bundle in force accepts their peer any more.
    pub fn untrusted_closed(&self) -> u64 {
        self.untrusted_closed.load(Relaxed)
    }

    /// Re-reads `ca.crl.pem` from the directory the identity came from and adopts the lists in
    /// it that are newer than the ones in force ([`pki::parse_crls`]: each signed by a CA of the
    /// bundle in force). A file that does not check out, or that holds a list with a lower
    /// number than the one in force for its CA (a rollback), or the same number with other
    /// contents, is refused whole: the lists in force stay (logged and counted once per distinct
    /// file). A CA's list missing from the file stays in force too, and so does everything when
    /// the file is gone: a list is only ever replaced by a newer one (or leaves force with its CA,
    /// [`CertResolver::reload_trust`]). On adoption, new handshakes check the new lists at once
    /// and [`close_when_untrusted`] closes live connections whose peer is now revoked.
    pub fn reload_crl(&self) -> CrlReload {
        let Some(dir) = &self.dir else {
            return CrlReload::Unchanged;
        };
        let path = dir.join(pki::CA_CRL);
        // Read under the adoption lock: an install from the controller writes the file under it
        // too, so the tick never reads a file older than the lists in force (a false refusal).
        let _one_at_a_time = self.adopting.lock();
        match std::fs::read(&path) {
            Ok(bytes) => self.adopt_crl(bytes, CrlSource::File),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => CrlReload::Unchanged,
            Err(e) => self.crl_refused(CrlSource::File, e.to_string().into_bytes(), e.to_string()),
        }
    }

    /// [`CertResolver::reload_crl`] on the contents of a `ca.crl.pem` (from the file, or from
    /// the controller: [`install_crl`]), `adopting` held by the caller.
    fn adopt_crl(&self, bytes: Vec<u8>, source: CrlSource) -> CrlReload {
        if let Ok(l) = self.last_crl.lock()
            && let Some((seen, refused)) = l[source as usize].as_ref()
            && *seen == bytes
        {
            return match refused {
                Some(why) => CrlReload::Refused(why.clone()),
                None => CrlReload::Unchanged,
            };
        }
        // The bundle in force: it changes only under `adopting`, which the caller holds.
        let trust = self.trust.load_full();
        let parsed = std::str::from_utf8(&bytes)
            .map_err(|_| "not a PEM file".to_string())
            .and_then(|text| pki::parse_crls(text, &trust.cas));
        let crls = match parsed {
            Ok(c) => c,
            Err(why) => return self.crl_refused(source, bytes, why),
        };
        let mut next = trust.crls.clone();
        let mut changed = false;
        for crl in crls {
            let ca = crl.ca;
            match &trust.crls[ca] {
                Some(cur) if crl.number < cur.number => {
                    let why = format!(
                        "the list of CA {} has number {}, lower than the one in force ({}): \
                         refused (no rollback)",
                        ca + 1,
                        crl.number,
                        cur.number
                    );
                    return self.crl_refused(source, bytes, why);
                }
                Some(cur) if crl.number == cur.number => {
                    if crl.der != cur.der {
                        let why = format!(
                            "the list of CA {} reuses number {} with other contents",
                            ca + 1,
                            crl.number
                        );
                        return self.crl_refused(source, bytes, why);
                    }
                }
                _ => {
                    next[ca] = Some(crl);
                    changed = true;
                }
            }
        }
        if !changed {
            self.crl_seen(source, bytes, None);
            return CrlReload::Unchanged;
        }
        // webpki parses the lists again when the verifiers are built: refused there too, the
        // lists in force stay.
        let built = match Trust::build(&trust.cas, next, &self.provider) {
            Ok(t) => t,
            Err(e) => return self.crl_refused(source, bytes, e.to_string()),
        };
        let summary: Vec<String> = built
            .crls
            .iter()
            .flatten()
            .map(|c| {
                format!(
                    "CA {}: number {}, {} revoked",
                    c.ca + 1,
                    c.number,
                    c.entries.len()
                )
            })
            .collect();
        self.trust.store(Arc::new(built));
        self.crl_updates.fetch_add(1, Relaxed);
        // What the other source's text was judged against has changed: judged again next time.
        if let Ok(mut l) = self.last_crl.lock() {
            *l = Default::default();
        }
        self.crl_seen(source, bytes, None);
        self.trust_changes.send_modify(|g| *g += 1);
        tracing::info!(node = %self.name, lists = %summary.join("; "),
            "adopted a new certificate revocation list");
        CrlReload::Adopted
    }

    fn crl_seen(&self, source: CrlSource, bytes: Vec<u8>, refused: Option<String>) {
        if let Ok(mut l) = self.last_crl.lock() {
            l[source as usize] = Some((bytes, refused));
        }
    }

    /// Refuses `bytes` from `source`: logged and counted unless it is the refusal remembered for
    /// that source (a file that cannot be read, read again at each tick).
    fn crl_refused(&self, source: CrlSource, bytes: Vec<u8>, why: String) -> CrlReload {
        let new = match self.last_crl.lock() {
            Ok(l) => !matches!(&l[source as usize], Some((seen, Some(_))) if *seen == bytes),
            Err(_) => true,
        };
        if new {
            self.crl_failures.fetch_add(1, Relaxed);
            let from = match source {
                CrlSource::File => "the node's directory",
                CrlSource::Installed => "installed (from the controller, or its --ca-dir)",
            };
            tracing::warn!(node = %self.name, dir = ?self.dir, from,
                "{} refused, keeping the revocation lists in force: {why}", pki::CA_CRL);
        }
        self.crl_seen(source, bytes, Some(why.clone()));
        CrlReload::Refused(why)
    }

    /// The revocation lists in force, one per CA of the bundle that has one.
    pub fn crls(&self) -> Vec<pki::CheckedCrl> {
        self.trust.load().crls.iter().flatten().cloned().collect()
    }
    /// Whether the controller's lists in force are not saved yet: their last write failed
    /// ([`install_crl`] writes them at the next push).
    pub fn crls_unsaved(&self) -> bool {
        self.crls_unsaved.load(SeqCst)
    }
    /// Revocation lists adopted since start (at start included).
    pub fn crl_updates(&self) -> u64 {
        self.crl_updates.load(Relaxed)
    }
    /// Distinct `ca.crl.pem` texts refused since start, each source's (the node's file, lists
    /// installed by [`install_crl`]) counted apart: a text refused again is not counted again
    /// until it or the trust it was judged against changes.
    pub fn crl_failures(&self) -> u64 {
        self.crl_failures.load(Relaxed)
    }
    /// Live connections closed because their peer's certificate was revoked.
    pub fn revoked_closed(&self) -> u64 {
        self.revoked_closed.load(Relaxed)
    }
    /// Changes (a counter) at each change of trust: a revocation list or a bundle adopted.
    pub fn trust_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.trust_changes.subscribe()
    }

    /// Whether the lists in force revoke this peer chain (leaf first): a chain that verifies but
    /// for a revocation (judged at a time its certificate is valid: expiry is no revocation).
    pub fn revoked(&self, chain: &[CertificateDer<'_>]) -> bool {
        matches!(self.trust.load().standing(chain), Standing::Revoked)
    }

    /// One reload tick: the bundle (`ca.pem`) first, so that a certificate from a CA it adds is
    /// taken in the same tick, then the node's certificate, then the revocation lists (checked
    /// against the bundle just adopted). After a bundle change, lists from the controller that
    /// were refused against the previous bundle are tried again.
    pub fn reload_tick(&self) -> ReloadTick {
        let trust = self.reload_trust();
        let cert = self.reload();
        let crl = self.reload_crl();
        if matches!(trust, TrustReload::Adopted { .. })
            && let Some(pem) = self.refused_push.lock().ok().and_then(|mut p| p.take())
        {
            install_crl(self, &pem);
        }
        ReloadTick { trust, cert, crl }
    }

    /// Calls [`CertResolver::reload_tick`] every `interval`, until its task is aborted (as the
    /// router and the controller abort their tasks at shutdown).
    pub async fn reload_every(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            // File reads and signature checks: keep them off the async workers.
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.reload_tick()).await;
        }
    }

    /// The `tasman_tls_cert_*` series for `/metrics`.
    pub fn render_metrics(&self, node: &str, s: &mut String) {
        use std::fmt::Write as _;
        // One series each, labelled with the node: (name, type, help, value).
        let single: [(&str, &str, &str, String); 10] = [
            (
                "tasman_tls_cert_not_after_seconds",
                "gauge",
                "Unix time the presented node certificate expires.",
                self.not_after().to_string(),
            ),
            (
                "tasman_tls_cert_reloads_total",
                "counter",
                "New node certificates swapped in since start.",
                self.reloads().to_string(),
            ),
            (
                "tasman_tls_cert_reload_failures_total",
                "counter",
                "New node certificate files refused (the old pair kept).",
                self.reload_failures().to_string(),
            ),
            (
                "tasman_tls_crl_updates_total",
                "counter",
                "Certificate revocation lists adopted since start.",
                self.crl_updates().to_string(),
            ),
            (
                "tasman_tls_crl_refused_total",
                "counter",
                "ca.crl.pem files refused (the lists in force kept).",
                self.crl_failures().to_string(),
            ),
            (
                "tasman_tls_revoked_closed_total",
                "counter",
                "Live connections closed because the peer's certificate was revoked.",
                self.revoked_closed().to_string(),
            ),
            (
                "tasman_tls_trusted_cas",
                "gauge",
                "CA certificates in the trust bundle (ca.pem) in force.",
                self.trust.load().cas.len().to_string(),
            ),
            (
                "tasman_tls_trust_reloads_total",
                "counter",
                "New trust bundles (ca.pem) adopted since start.",
                self.trust_reloads().to_string(),
            ),
            (
                "tasman_tls_trust_reload_failures_total",
                "counter",
                "ca.pem files refused (the bundle in force kept).",
                self.trust_reload_failures().to_string(),
            ),
            (
                "tasman_tls_untrusted_closed_total",
                "counter",
                "Live connections closed because no CA of the trust bundle in force accepts the peer's certificate any more.",
                self.untrusted_closed().to_string(),
            ),
        ];
        for (name, kind, help, value) in single {
            crate::metrics::series(s, node, name, kind, help, value);
        }
        let crls = self.crls();
        if !crls.is_empty() {
            let _ = writeln!(
                s,
                "# HELP tasman_tls_crl_number CRL number of the revocation list in force, by CA (position in ca.pem).\n# TYPE tasman_tls_crl_number gauge"
            );
            for c in &crls {
                let _ = writeln!(
                    s,
                    "tasman_tls_crl_number{{node=\"{node}\",ca=\"{}\"}} {}",
                    c.ca + 1,
                    c.number
                );
            }
            let _ = writeln!(
                s,
                "# HELP tasman_tls_crl_revoked Certificates on the revocation list in force, by CA (position in ca.pem).\n# TYPE tasman_tls_crl_revoked gauge"
            );
            for c in &crls {
                let _ = writeln!(
                    s,
                    "tasman_tls_crl_revoked{{node=\"{node}\",ca=\"{}\"}} {}",
                    c.ca + 1,
                    c.entries.len()
                );
            }
        }
        if self.renewing.load(Relaxed) {
            let _ = writeln!(
                s,
                "# HELP tasman_tls_cert_renewals_total Renewals of the node certificate through the controller, by result.\n# TYPE tasman_tls_cert_renewals_total counter"
            );
            for r in Renewal::ALL {
                let _ = writeln!(
                    s,
                    "tasman_tls_cert_renewals_total{{node=\"{node}\",result=\"{}\"}} {}",
                    r.label(),
                    self.renewals(r)
                );
            }
        }
    }
}

/// Installs revocation lists from the controller: adopted as if read from `ca.crl.pem`
/// ([`CertResolver::reload_crl`]'s checks: against the bundle in force, no rollback), then, when
/// a newer list was adopted, the lists in force written to that file (by rename) so that the node
/// starts with them, those of a CA the `ca.pem` on disk has dropped left out
/// ([`pki::save_crls_in_force`]). The lists in force, not `pem`: a list `pem` leaves out (another CA's) stays
/// in force, and must stay in the file too or a restart would drop it. A push that changes
/// nothing writes nothing: the file may be newer than what is in force (`retire-ca` pruned it,
/// and the tick has not adopted the pruned bundle yet), and must not be written back over. The
/// adoption lock is held through the write, so two installs cannot leave an older file over a
/// newer one. A refused list leaves the file and the lists in force alone, and is tried again
/// after the next change of bundle ([`CertResolver::reload_tick`]: it may be a list of a CA the
/// node does not trust yet, and the controller sends it only once). Lists put in force whose
/// write failed are written by the next push, the same one included ([`crls_unsaved`]: the
/// control client tries it again until the write succeeds).
///
/// [`crls_unsaved`]: CertResolver::crls_unsaved
pub fn install_crl(cert: &CertResolver, pem: &str) -> CrlReload {
    let _one_at_a_time = cert.adopting.lock();
    let got = cert.adopt_crl(pem.as_bytes().to_vec(), CrlSource::Installed);
    if let Ok(mut p) = cert.refused_push.lock() {
        *p = matches!(got, CrlReload::Refused(_)).then(|| pem.to_string());
    }
    // Lists in force whose write failed are written by any push after, refused ones included
    // (one of a CA not trusted yet, which the control client then tries again: waiting for an
    // adopted one, the unsaved lists stayed unsaved until the bundle changed).
    if got != CrlReload::Adopted && !cert.crls_unsaved() {
        return got;
    }
    let in_force: Vec<_> = {
        let trust = cert.trust.load();
        trust
            .crls
            .iter()
            .zip(&trust.cas)
            .filter_map(|(crl, ca)| Some((ca.clone(), crl.clone()?)))
            .collect()
    };
    if let Some(dir) = cert.dir() {
        let saved = pki::save_crls_in_force(dir, &in_force);
        if let Err(e) = &saved {
            tracing::warn!(node = %cert.name, "revocation lists in force but not saved (tried again): {e}");
        }
        cert.crls_unsaved.store(saved.is_err(), SeqCst);
    }
    got
}

/// Most certificates [`install`] takes in a chain (a node's is its leaf and its CA).
pub const MAX_CHAIN_CERTS: usize = 4;
/// Most bytes of PEM [`install`] takes for a chain.
pub const MAX_CHAIN_PEM: usize = 32 * 1024;

/// Installs a renewed certificate: checks `chain_pem` with `key` as `cert` would on a reload
/// (against the bundle in force), writes them to the node's files (its certificate blocks only,
/// [`pki::write_node_files`]) and
/// has `cert` reload them. The new expiry. Used by a router's control client and by the controller
/// for its own certificate.
pub fn install(cert: &CertResolver, key: &rcgen::KeyPair, chain_pem: &str) -> Result<i64, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let dir = cert
        .dir()
        .ok_or("the certificate was not loaded from files")?;
    // Only the certificate blocks are kept (and written): the leaf and its issuers, a few
    // hundred bytes each. Anything else, or a chain too long to present in a handshake, is
    // refused before the files are touched.
    let blocks = pki::pem_blocks(chain_pem, "CERTIFICATE")?;
    if blocks.len() > MAX_CHAIN_CERTS
        || blocks.iter().map(String::len).sum::<usize>() > MAX_CHAIN_PEM
    {
        return Err(format!(
            "a chain of {} certificates in {} bytes (at most {MAX_CHAIN_CERTS} in {MAX_CHAIN_PEM})",
            blocks.len(),
            blocks.iter().map(String::len).sum::<usize>()
        ));
    }
    let chain_pem = blocks.concat();
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let leaf = chain
        .first()
        .cloned()
        .ok_or("no certificate in the answer")?;
    let id = TlsIdentity {
        name: cert.name().to_string(),
        cas: cert.trusted(),
        chain,
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        dir: Some(dir.to_path_buf()),
    };
    // Under the adoption lock, which the reload tick reads the pair under: it never reads half
    // of this swap (the old certificate with the new key), which it refused and counted as a
    // failed reload, for an alert to fire on. Checked before the files are touched, written,
    // and presented, all under the lock: a bad answer leaves the files as they are, and no
    // bundle or revocation list is adopted between the check and the write or between the
    // write and the swap (the files would hold a pair the node then refused, the old key gone,
    // and it would present that pair after a restart).
    let _one_at_a_time = cert.adopting.lock();
    let ck = cert.check(&id)?;
    crate::pki::write_node_files(dir, cert.name(), &key.serialize_pem(), &chain_pem)
        .map_err(|e| e.to_string())?;
    #[cfg(test)]
    tests::AFTER_INSTALL_WRITE.with(|h| h.borrow().as_ref().map(|h| h()));
    cert.present(ck);
    debug_assert_eq!(cert.current().cert.first(), Some(&leaf));
    Ok(cert.not_after())
}

fn fmt_unix(t: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

impl rustls::server::ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl rustls::client::ResolvesClientCert for CertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// The names a peer may present: shared, swapped whole on each snapshot (lock-free reads).
#[derive(Clone, Default)]
pub struct PeerNames(Arc<ArcSwap<BTreeSet<String>>>);

impl fmt::Debug for PeerNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PeerNames").field(&*self.0.load()).finish()
    }
}

impl PeerNames {
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        PeerNames(Arc::new(ArcSwap::from_pointee(names.into_iter().collect())))
    }
    pub fn set(&self, names: impl IntoIterator<Item = String>) {
        self.0.store(Arc::new(names.into_iter().collect()));
    }
    pub fn contains(&self, name: &str) -> bool {
        self.0.load().contains(name)
    }
    /// The allowed name for which `cert` is valid, if any.
    pub fn identify(&self, cert: &CertificateDer<'_>) -> Option<String> {
        let parsed = ParsedCertificate::try_from(cert).ok()?;
        let names = self.0.load();
        names
            .iter()
            .find(|n| {
                ServerName::try_from(n.as_str())
                    .is_ok_and(|sn| rustls::client::verify_server_name(&parsed, &sn).is_ok())
            })
            .cloned()
    }
}

/// The node name a connected peer proved (its certificate is valid for it and it is allowed now).
pub fn peer_name(conn: &quinn::Connection, peers: &PeerNames) -> Option<String> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    peers.identify(chain.first()?)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a node trusts: every CA of the bundle in force, each narrowed by its revocation list if
/// it has one. One pair of WebPKI verifiers per CA, with that CA as its only root and
/// that CA's list: CAs made by `pki` share a distinguished name, and webpki takes the first list
/// whose issuer name matches a certificate's issuer and then fails on its signature if another
/// CA of that name signed it, so one verifier over the whole bundle and every list would refuse
/// every certificate of the other CAs during a rotation. A chain is accepted when one CA's
/// verifier accepts it (the one whose key signed it; webpki tries each anchor of a name, so a
/// single-CA verifier refuses the others' chains on their signatures).
#[derive(Debug)]
struct Trust {
    /// The bundle, in file order.
    cas: Vec<CertificateDer<'static>>,
    per_ca: Vec<CaVerifiers>,
    /// The list in force for each CA of the bundle (same positions).
    crls: Vec<Option<pki::CheckedCrl>>,
}

/// Where a chain stands with a [`Trust`] ([`Trust::standing`]).
#[derive(Debug)]
enum Standing {
    Trusted,
    /// It chains to a CA of the bundle, whose list revokes it.
    Revoked,
    /// No CA of the bundle accepts it (why, from the most telling CA).
    Untrusted(rustls::Error),
}

#[derive(Debug)]
struct CaVerifiers {
    server: Arc<rustls::client::WebPkiServerVerifier>,
    client: Arc<dyn ClientCertVerifier>,
}

impl Trust {
    /// Verifiers for `cas` (the bundle) and their lists. Revocation is checked for the leaf
    /// only (the chain's CA is the trust anchor itself), a certificate of a CA without a list
    /// is not revoked (unknown status allowed), and a list's `nextUpdate` is not enforced: a
    /// list stays in force until a newer one replaces it, so a CA that stops publishing never
    /// cuts the fabric off.
    fn build(
        cas: &[CertificateDer<'static>],
        crls: Vec<Option<pki::CheckedCrl>>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let per_ca = cas
            .iter()
            .zip(&crls)
            .map(|(ca, crl)| {
                let mut roots = RootCertStore::empty();
                roots.add(ca.clone())?;
                let roots = Arc::new(roots);
                let list: Vec<_> = crl.iter().map(|c| c.der.clone()).collect();
                let server = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots.clone(),
                    provider.clone(),
                )
                .with_crls(list.clone())
                .only_check_end_entity_revocation()
                .allow_unknown_revocation_status()
                .build()?;
                let client = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                    .with_crls(list)
                    .only_check_end_entity_revocation()
                    .allow_unknown_revocation_status()
                    .build()?;
                Ok(CaVerifiers { server, client })
            })
            .collect::<Result<Vec<_>, TlsError>>()?;
        Ok(Trust {
            cas: cas.to_vec(),
            per_ca,
            crls,
        })
    }

    /// Whether `chain` (leaf first) is accepted, revoked or chains to no CA of this bundle,
    /// judged at a time its leaf is valid (now, clamped into its validity window): the question
    /// is what a change of bundle or lists did to it, not whether it expired.
    fn standing(&self, chain: &[CertificateDer<'_>]) -> Standing {
        let Some((leaf, rest)) = chain.split_first() else {
            return Standing::Untrusted(rustls::Error::NoCertificatesPresented);
        };
        let now = UnixTime::now().as_secs() as i64;
        let at = match (not_before(leaf), not_after(leaf)) {
            (Ok(nb), Ok(na)) if nb <= na => now.clamp(nb, na),
            _ => now,
        };
        let at = UnixTime::since_unix_epoch(Duration::from_secs(at.max(0) as u64));
        match self.verify_client(leaf, rest, at) {
            Ok(_) => Standing::Trusted,
            Err(rustls::Error::InvalidCertificate(CertificateError::Revoked)) => Standing::Revoked,
            Err(e) => Standing::Untrusted(e),
        }
    }

    fn verify_server(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        first_accepting(self.per_ca.iter().map(|v| {
            v.server
                .verify_server_cert(end_entity, intermediates, server_name, &[], now)
        }))
    }

    fn verify_client(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        first_accepting(
            self.per_ca
                .iter()
                .map(|v| v.client.verify_client_cert(end_entity, intermediates, now)),
        )
    }
}

/// The first acceptance of `results`; otherwise the most telling refusal: a revocation, then
/// whatever is not just "another CA's chain" (unknown issuer, bad signature), then the first.
fn first_accepting<T>(
    results: impl Iterator<Item = Result<T, rustls::Error>>,
) -> Result<T, rustls::Error> {
    let rank = |e: &rustls::Error| match e {
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => 0,
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => 2,
        _ => 1,
    };
    let mut refusal: Option<rustls::Error> = None;
    for r in results {
        match r {
            Ok(v) => return Ok(v),
            Err(e) => {
                if refusal.as_ref().is_none_or(|best| rank(&e) < rank(best)) {
                    refusal = Some(e);
                }
            }
        }
    }
    Err(refusal.unwrap_or(rustls::Error::InvalidCertificate(
        CertificateError::UnknownIssuer,
    )))
}

/// Runs [`close_when_untrusted`] on `conn` in a task of its own, until the returned guard is
/// dropped. Hold the guard where `conn` is held: the task holds a handle of the connection too,
/// and quinn closes a connection only when its last handle goes, so a task left running after
/// its owner let go would keep the connection open for good (keep-alives defeat the idle
/// timeout).
pub fn watch_trust(cert: Arc<CertResolver>, conn: quinn::Connection) -> TrustWatch {
    TrustWatch(tokio::spawn(close_when_untrusted(cert, conn)))
}

/// Stops the task of [`watch_trust`] when dropped.
#[derive(Debug)]
pub struct TrustWatch(tokio::task::JoinHandle<()>);

impl Drop for TrustWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Closes `conn` as soon as what `cert` trusts no longer accepts the certificate its peer
/// presented: with [`close::REVOKED`](crate::codes::close::REVOKED) when a list in force revokes
/// it, with [`close::UNTRUSTED`](crate::codes::close::UNTRUSTED) when it chains to no CA of the
/// bundle in force any more (its CA left the bundle). Checked at once (a change during the
/// handshake) and again at every change of trust, at a time the certificate is valid (a
/// certificate that expires during a connection is not a reason to close it here: the next
/// handshake refuses it). Returns when the connection closes, for whatever reason. Run next to
/// every established connection (neighbours both ways, the controller's sessions and a router's
/// control connection) through [`watch_trust`], so a revoked key's or a retired CA's live
/// sessions end too, not only their next handshakes.
pub async fn close_when_untrusted(cert: Arc<CertResolver>, conn: quinn::Connection) {
    let Some(chain) = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
    else {
        return;
    };
    let mut changed = cert.trust_changes();
    loop {
        changed.borrow_and_update();
        match cert.trust.load().standing(&chain) {
            Standing::Trusted => {}
            Standing::Revoked => {
                cert.revoked_closed.fetch_add(1, Relaxed);
                tracing::warn!(node = %cert.name, remote = %conn.remote_address(),
                    "closing a connection: the peer's certificate is revoked");
                conn.close(
                    quinn::VarInt::from_u32(crate::codes::close::REVOKED),
                    b"certificate revoked",
                );
                return;
            }
            Standing::Untrusted(e) => {
                cert.untrusted_closed.fetch_add(1, Relaxed);
                tracing::warn!(node = %cert.name, remote = %conn.remote_address(),
                    "closing a connection: the peer's certificate chains to no CA of the trust bundle in force ({e})");
                conn.close(
                    quinn::VarInt::from_u32(crate::codes::close::UNTRUSTED),
                    b"certificate no longer trusted",
                );
                return;
            }
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            _ = conn.closed() => return,
        }
    }
}

/// Both verifiers add a name check on top of WebPKI and leave signature checks to the provider
/// (as WebPKI's verifiers do).
macro_rules! delegate_signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Server side: the chain must verify against one of our CAs (and not be revoked), then the name
/// must be allowed.
#[derive(Debug)]
struct NodeClientVerifier {
    trust: Arc<ArcSwap<Trust>>,
    provider: Arc<CryptoProvider>,
    peers: PeerNames,
}

impl ClientCertVerifier for NodeClientVerifier {
    /// No CA names are hinted: the bundle changes while the config lives (a hint list would go
    /// stale), and a node presents its one certificate whatever the hints say.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .trust
            .load()
            .verify_client(end_entity, intermediates, now)?;
        match self.peers.identify(end_entity) {
            Some(_) => Ok(ok),
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            )),
        }
    }
    delegate_signature_checks!();
}

/// Client side: standard WebPKI checks against our CAs (and their lists) for the name we
/// dialled, which must also be an allowed peer now.
#[derive(Debug)]
struct NodeServerVerifier {
    trust: Arc<ArcSwap<Trust>>,
    provider: Arc<CryptoProvider>,
    peers: PeerNames,
}

impl ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self
            .trust
            .load()
            .verify_server(end_entity, intermediates, server_name, now)?;
        let allowed = match server_name {
            ServerName::DnsName(d) => self.peers.contains(d.as_ref()),
            _ => false,
        };
        if allowed {
            Ok(ok)
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ))
        }
    }
    delegate_signature_checks!();
}

/// The rustls server config (TLS 1.3 only, client certificates required) presenting what `cert`
/// holds at each handshake and trusting its CAs (through the resolver's own WebPKI verifier).
pub fn rustls_server_config_with(
    cert: &Arc<CertResolver>,
    peers: &PeerNames,
) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = Arc::new(NodeClientVerifier {
        trust: cert.trust.clone(),
        provider: cert.provider.clone(),
        peers: peers.clone(),
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(cert.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert.clone());
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.max_early_data_size = 0;
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(cfg)
}

/// The rustls client config (TLS 1.3 only, presents our certificate, no resumption) presenting
/// what `cert` holds at each handshake and trusting its CAs (through the resolver's own WebPKI
/// verifier).
pub fn rustls_client_config_with(
    cert: &Arc<CertResolver>,
    peers: &PeerNames,
) -> Result<rustls::ClientConfig, TlsError> {
    let verifier = Arc::new(NodeServerVerifier {
        trust: cert.trust.clone(),
        provider: cert.provider.clone(),
        peers: peers.clone(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(cert.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(cert.clone());
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.enable_early_data = false;
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// quinn server config with mutual TLS and the given transport tuning (a fixed certificate).
pub fn server_config(
    id: &TlsIdentity,
    peers: &PeerNames,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, TlsError> {
    server_config_with(&CertResolver::new(id)?, peers, transport)
}

/// quinn server config presenting what `cert` holds at each handshake.
pub fn server_config_with(
    cert: &Arc<CertResolver>,
    peers: &PeerNames,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, TlsError> {
    let crypto = QuicServerConfig::try_from(rustls_server_config_with(cert, peers)?)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport);
    Ok(cfg)
}

/// quinn client config with mutual TLS and the given transport tuning (a fixed certificate).
pub fn client_config(
    id: &TlsIdentity,
    peers: &PeerNames,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, TlsError> {
    client_config_with(&CertResolver::new(id)?, peers, transport)
}

/// quinn client config presenting what `cert` holds at each handshake.
pub fn client_config_with(
    cert: &Arc<CertResolver>,
    peers: &PeerNames,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = QuicClientConfig::try_from(rustls_client_config_with(cert, peers)?)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport);
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::time::SystemTime;

    fn leaf_in(dir: &Path, name: &str) -> CertificateDer<'static> {
        TlsIdentity::load(dir, name).unwrap().chain[0].clone()
    }

    /// A CA in a temporary directory, `n1` issued, and a resolver presenting it.
    fn setup() -> (tempfile::TempDir, Arc<CertResolver>) {
        let d = tempfile::tempdir().unwrap();
        pki::init(d.path()).unwrap();
        pki::issue(d.path(), "n1").unwrap();
        let r = CertResolver::new(&TlsIdentity::load(d.path(), "n1").unwrap()).unwrap();
        (d, r)
    }

    #[test]
    fn certifies_tells_an_answer_for_this_key_from_one_for_an_earlier_key() {
        let d = tempfile::tempdir().unwrap();
        pki::init(d.path()).unwrap();
        let ca = pki::CaSigner::load(d.path()).unwrap();
        let validity = pki::Validity::for_duration(Duration::from_secs(3600)).unwrap();
        let (earlier, now) = (
            rcgen::KeyPair::generate().unwrap(),
            rcgen::KeyPair::generate().unwrap(),
        );
        let answer = ca.sign("n1", validity, &now).unwrap().chain_pem;
        assert_eq!(certifies(&answer, &now), Some(true));
        assert_eq!(certifies(&answer, &earlier), Some(false));
        assert_eq!(certifies("no certificate here", &now), None);
    }

    /// Puts `from_dir`'s `from` pair in place of `dir`'s `n1` pair.
    fn replace_n1(dir: &Path, from_dir: &Path, from: &str) {
        for ext in ["pem", "key"] {
            fs::copy(
                from_dir.join(format!("{from}.{ext}")),
                dir.join(format!("n1.{ext}")),
            )
            .unwrap();
        }
    }

    fn assert_refused(r: &CertResolver, old: &CertificateDer<'_>, why: &str) {
        let failures = r.reload_failures();
        match r.reload() {
            Reload::Refused(reason) => assert!(reason.contains(why), "{reason}"),
            other => panic!("expected a refusal ({why}), got {other:?}"),
        }
        assert_eq!(&r.current().cert[0], old, "the old certificate must stay");
        assert_eq!(r.reload_failures(), failures + 1);
        assert_eq!(r.reloads(), 0);
        // The same files again: refused, but counted once.
        assert!(matches!(r.reload(), Reload::Refused(_)));
        assert_eq!(r.reload_failures(), failures + 1);
    }

    /// A renewal's answer for `n1` of `d`'s CA, with its new key.
    fn renewal(d: &Path) -> (rcgen::KeyPair, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let v = pki::Validity::for_duration(Duration::from_secs(30 * 86_400)).unwrap();
        let chain = pki::CaSigner::load(d)
            .unwrap()
            .sign("n1", v, &key)
            .unwrap()
            .chain_pem;
        (key, chain)
    }

    thread_local! {
        /// Run by [`install`] once it has written the new pair, on the installing thread.
        pub(super) static AFTER_INSTALL_WRITE: std::cell::RefCell<Option<Box<dyn Fn()>>> =
            std::cell::RefCell::new(None);
    }

    /// A renewal is checked, written and presented under one hold of the adoption lock: a
    /// bundle the reload tick adopts as the files are written (here one without the renewal's
    /// CA, the node's current certificate still chaining to it) cannot leave them holding a
    /// pair the node refuses, its old key gone (and presented after a restart). The tick's
    /// adoption waits for the swap, and is then refused (it would not trust what the node
    /// presents).
    #[test]
    fn a_bundle_adopted_as_an_install_writes_never_leaves_a_refused_pair_on_disk() {
        let d = tempfile::tempdir().unwrap();
        pki::init(d.path()).unwrap();
        let old_ca = pki::CaSigner::load(d.path()).unwrap();
        pki::rotate_ca(d.path()).unwrap();
        pki::issue(d.path(), "n1").unwrap();
        let r = CertResolver::new(&TlsIdentity::load(d.path(), "n1").unwrap()).unwrap();
        let ca_pem = d.path().join(pki::CA_CERT);
        let bundle = pki::read_ca_bundle(&ca_pem).unwrap();
        assert_eq!(bundle.len(), 2, "the new CA and the old");
        // An old-CA renewal (a controller not restarted after the rotation), installed as the
        // operator's next step takes the old CA out of ca.pem and the tick reads it.
        let key = rcgen::KeyPair::generate().unwrap();
        let v = pki::Validity::for_duration(Duration::from_secs(30 * 86_400)).unwrap();
        let chain = old_ca.sign("n1", v, &key).unwrap().chain_pem;
        fs::write(&ca_pem, &bundle[0].pem).unwrap();
        let tick = r.clone();
        let adopted = Arc::new(Mutex::new(None));
        let seen = adopted.clone();
        AFTER_INSTALL_WRITE.with(|h| {
            *h.borrow_mut() = Some(Box::new(move || {
                let (tick, seen) = (tick.clone(), seen.clone());
                let t = std::thread::spawn(move || {
                    *seen.lock().unwrap() = Some(tick.reload_trust());
                });
                // Given time to run, if nothing holds it back.
                let until = std::time::Instant::now() + Duration::from_millis(300);
                while !t.is_finished() && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }))
        });
        let installed = install(&r, &key, &chain);
        AFTER_INSTALL_WRITE.with(|h| h.borrow_mut().take());
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while adopted.lock().unwrap().is_none() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        let on_disk = TlsIdentity::load(d.path(), "n1").unwrap();
        assert_eq!(
            on_disk.chain[0],
            r.current().cert[0],
            "the files hold another pair than the one presented (install: {installed:?}, the \
             tick: {:?})",
            adopted.lock().unwrap()
        );
        assert!(installed.is_ok(), "{installed:?}");
        assert!(
            matches!(*adopted.lock().unwrap(), Some(TrustReload::Refused(_))),
            "{:?}",
            adopted.lock().unwrap()
        );
    }

    /// A renewal that cannot write its certificate (a full disk; here a directory where its
    /// temporary file would go) leaves the old pair whole: the router still starts.
    #[test]
    fn an_install_that_cannot_write_the_certificate_leaves_a_pair_that_loads() {
        let (d, r) = setup();
        let old = r.current().cert[0].clone();
        let (key, chain) = renewal(d.path());
        for blocked in [format!("n1.pem.{}", pki::STAGED), "n1.pem".to_string()] {
            fs::create_dir(
                d.path()
                    .join(format!("{blocked}.{}.tmp", std::process::id())),
            )
            .unwrap();
        }
        assert!(install(&r, &key, &chain).is_err());
        assert_eq!(r.current().cert[0], old);
        let id = TlsIdentity::load(d.path(), "n1").unwrap();
        CertResolver::new(&id).expect("the pair on disk still matches");
        assert_eq!(id.chain[0], old);
    }

    /// A crash between the two renames of a new pair leaves the new key beside the old
    /// certificate, the new certificate staged: the router starts with the new pair, and
    /// finishes the install (the files agree again; a reload does not take the staged file
    /// again on every tick).
    #[test]
    fn a_pair_renamed_in_halfway_loads_with_the_staged_certificate() {
        let (d, _) = setup();
        let (pem, staged) = (
            d.path().join("n1.pem"),
            d.path().join(format!("n1.pem.{}", pki::STAGED)),
        );
        let old = fs::read_to_string(&pem).unwrap();
        let (key, chain) = renewal(d.path());
        fs::write(&staged, &chain).unwrap();
        fs::write(d.path().join("n1.key"), key.serialize_pem()).unwrap();
        let id = TlsIdentity::load(d.path(), "n1").unwrap();
        let r = CertResolver::new(&id).expect("the new key with its staged certificate");
        let new = CertificateDer::pem_slice_iter(chain.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(r.current().cert[0], new);
        assert_eq!(
            fs::read_to_string(&pem).unwrap(),
            chain,
            "the install was finished"
        );
        assert!(!staged.exists());
        assert_eq!(r.reload(), Reload::Unchanged);
        // A staged certificate for another key is not taken, nor moved into place.
        fs::write(&pem, &old).unwrap();
        let (_, other) = renewal(d.path());
        fs::write(&staged, &other).unwrap();
        let id = TlsIdentity::load(d.path(), "n1").unwrap();
        assert!(CertResolver::new(&id).is_err());
        assert_eq!(fs::read_to_string(&pem).unwrap(), old);
        // A first pair cut off the same way (no certificate before it): loaded, and finished.
        // (The missing `n1.pem` failed the load before the staged one was looked at.)
        let (key, chain) = renewal(d.path());
        fs::remove_file(&pem).unwrap();
        fs::write(&staged, &chain).unwrap();
        fs::write(d.path().join("n1.key"), key.serialize_pem()).unwrap();
        let id = TlsIdentity::load(d.path(), "n1").expect("the staged first certificate");
        CertResolver::new(&id).expect("the key with its staged certificate");
        assert_eq!(fs::read_to_string(&pem).unwrap(), chain);
        assert!(!staged.exists());
        // With neither a certificate nor a staged one for the key: refused, naming the file.
        fs::remove_file(&pem).unwrap();
        let (_, other) = renewal(d.path());
        fs::write(&staged, &other).unwrap();
        let e = TlsIdentity::load(d.path(), "n1").unwrap_err().to_string();
        assert!(
            e.contains("n1.pem") && e.contains("not a certificate for n1.key"),
            "{e}"
        );
    }

    /// What a renewal writes is its certificate blocks, and only a chain a handshake can carry.
    #[test]
    fn install_writes_only_a_bounded_chain_of_certificates() {
        let (d, r) = setup();
        let (key, chain) = renewal(d.path());
        let ca = fs::read_to_string(d.path().join(pki::CA_CERT)).unwrap();
        let long = format!("{chain}{}", ca.repeat(MAX_CHAIN_CERTS));
        assert!(install(&r, &key, &long).unwrap_err().contains("at most"));
        let big = format!("{chain}{}", "junk\n".repeat(10_000));
        install(&r, &key, &big).unwrap();
        let written = fs::read_to_string(d.path().join("n1.pem")).unwrap();
        assert!(!written.contains("junk"), "{written}");
        assert_eq!(written.matches("BEGIN CERTIFICATE").count(), 2);
        assert_eq!(r.current().cert.len(), 2);
    }

    #[test]
    fn reload_swaps_in_a_new_valid_certificate() {
        let (d, r) = setup();
        let old = r.current().cert[0].clone();
        assert_eq!(r.reload(), Reload::Unchanged);
        let v = pki::Validity::for_duration(Duration::from_secs(30 * 86_400)).unwrap();
        pki::issue_with(d.path(), "n1", v).unwrap();
        let new = leaf_in(d.path(), "n1");
        assert_ne!(old, new);
        let want = not_after(&new).unwrap();
        assert_eq!(r.reload(), Reload::Reloaded { not_after: want });
        assert_eq!(r.current().cert[0], new);
        assert_eq!(r.not_after(), want);
        assert_eq!((r.reloads(), r.reload_failures()), (1, 0));
        assert_eq!(r.reload(), Reload::Unchanged);
        let mut m = String::new();
        r.render_metrics("n1", &mut m);
        assert!(m.contains(&format!(
            "tasman_tls_cert_not_after_seconds{{node=\"n1\"}} {want}"
        )));
        assert!(
            m.contains("tasman_tls_cert_reloads_total{node=\"n1\"} 1"),
            "{m}"
        );
    }

    #[test]
    fn reload_refuses_a_certificate_for_another_name() {
        let (d, r) = setup();
        let old = r.current().cert[0].clone();
        pki::issue(d.path(), "n2").unwrap();
        replace_n1(d.path(), d.path(), "n2");
        assert_refused(&r, &old, "certificate refused");
    }

    #[test]
    fn reload_refuses_a_certificate_from_another_ca() {
        let (d, r) = setup();
        let old = r.current().cert[0].clone();
        let other = tempfile::tempdir().unwrap();
        pki::init(other.path()).unwrap();
        pki::issue(other.path(), "n1").unwrap();
        replace_n1(d.path(), other.path(), "n1");
        // Even with the other CA's ca.pem next to it: that bundle is refused (it does not trust
        // the certificate presented now), and the bundle in force is what counts.
        fs::copy(other.path().join(pki::CA_CERT), d.path().join(pki::CA_CERT)).unwrap();
        assert!(matches!(r.reload_trust(), TrustReload::Refused(_)));
        assert_refused(&r, &old, "certificate refused");
    }

    #[test]
    fn reload_refuses_an_expired_certificate() {
        let (d, r) = setup();
        let old = r.current().cert[0].clone();
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let past = pki::Validity::between(now - 10 * day, now - day).unwrap();
        pki::issue_with(d.path(), "n1", past).unwrap();
        assert_refused(&r, &old, "certificate refused");
    }

    /// The same expired certificate refused a second later is the same refusal (counted and
    /// logged once): its reason differs only in the time of the check.
    #[test]
    fn an_expired_certificate_is_one_refusal_whatever_the_time() {
        let (d, r) = setup();
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let past = pki::Validity::between(now - 10 * day, now - day).unwrap();
        pki::issue_with(d.path(), "n1", past).unwrap();
        let id = TlsIdentity::load(d.path(), "n1").unwrap();
        let reason = r.check(&id).unwrap_err();
        assert!(reason.contains("certificate refused"), "{reason}");
        let later = reason
            .split(|c: char| !c.is_ascii_digit())
            .filter(|n| n.len() >= 9)
            .fold(reason.clone(), |t, n| {
                t.replace(n, &(n.parse::<u64>().unwrap() + 1).to_string())
            });
        assert_ne!(later, reason, "the reason carries the time: {reason}");
        assert_eq!(refusal_kind(&later), refusal_kind(&reason));
        assert_ne!(
            refusal_kind(&reason),
            refusal_kind("key does not match the certificate")
        );
    }

    /// At start, a key that is not its certificate's is refused naming both files (it said
    /// only `keys may not be consistent: KeyMismatch`).
    #[test]
    fn a_key_that_is_not_the_certificates_is_refused_at_start_naming_the_files() {
        let d = tempfile::tempdir().unwrap();
        pki::init(d.path()).unwrap();
        pki::issue(d.path(), "n1").unwrap();
        let old_key = fs::read(d.path().join("n1.key")).unwrap();
        pki::issue(d.path(), "n1").unwrap();
        fs::write(d.path().join("n1.key"), old_key).unwrap();
        let Err(e) = CertResolver::new(&TlsIdentity::load(d.path(), "n1").unwrap()) else {
            panic!("a key that is not the certificate's was taken");
        };
        let e = e.to_string();
        assert!(e.contains("n1.pem") && e.contains("n1.key"), "{e}");
    }

    #[test]
    fn reload_refuses_a_key_that_does_not_match() {
        let (d, r) = setup();
        let old = r.current().cert[0].clone();
        let old_key = fs::read(d.path().join("n1.key")).unwrap();
        pki::issue(d.path(), "n1").unwrap();
        fs::write(d.path().join("n1.key"), old_key).unwrap();
        assert_refused(&r, &old, "key does not match");
    }

    /// A node `n1` in its own directory trusting the bundle `cas` (each a PKI directory, in that
    /// order), with its certificate from `from`'s CA.
    fn node_trusting(cas: &[&Path], from: &Path) -> (tempfile::TempDir, TlsIdentity) {
        let d = tempfile::tempdir().unwrap();
        let bundle: String = cas
            .iter()
            .map(|c| fs::read_to_string(c.join(pki::CA_CERT)).unwrap())
            .collect();
        fs::write(d.path().join(pki::CA_CERT), bundle).unwrap();
        pki::issue(from, "n1").unwrap();
        replace_n1(d.path(), from, "n1");
        let id = TlsIdentity::load(d.path(), "n1").unwrap();
        (d, id)
    }

    #[test]
    fn a_bundle_of_two_cas_loads_as_two_roots() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        pki::init(a.path()).unwrap();
        pki::init(b.path()).unwrap();
        let (_d, id) = node_trusting(&[a.path(), b.path()], a.path());
        assert_eq!(id.cas.len(), 2);
        assert_ne!(id.cas[0], id.cas[1]);
        let r = CertResolver::new(&id).unwrap();
        assert_eq!(r.trusted(), id.cas);
        assert_eq!(r.trust.load().per_ca.len(), 2);
    }

    /// Every CA `pki::init` makes has the same distinguished name: a node trusting two of them
    /// must still verify a leaf from either against the right key (webpki tries each anchor of
    /// that name), in either order of the bundle, and refuse a leaf from a third CA of the same
    /// name. Checked with the verifiers a handshake uses, for server and client use.
    #[test]
    fn two_cas_with_one_name_each_verify_their_own_leaves() {
        let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        for d in &dirs {
            pki::init(d.path()).unwrap();
        }
        let subject = |d: &tempfile::TempDir| {
            let text = fs::read_to_string(d.path().join(pki::CA_CERT)).unwrap();
            let c = pki::parse_ca_bundle(&text).unwrap().remove(0).der;
            let (_, x) = x509_parser::parse_x509_certificate(c.as_ref()).unwrap();
            x.subject().as_raw().to_vec()
        };
        assert_eq!(subject(&dirs[0]), subject(&dirs[1]), "same name");
        assert_eq!(subject(&dirs[0]), subject(&dirs[2]), "same name");
        let (a, b, c) = (dirs[0].path(), dirs[1].path(), dirs[2].path());
        for order in [[a, b], [b, a]] {
            let (_d, me) = node_trusting(&order, a);
            let r = CertResolver::new(&me).unwrap();
            for (from, want) in [(a, true), (b, true), (c, false)] {
                let (_p, peer) = node_trusting(&[from], from);
                let got = r.check(&peer);
                assert_eq!(got.is_ok(), want, "{got:?}");
            }
        }
        // Trusting only one of them, the other's leaf is refused (the key decides, not the name).
        let (_d, me) = node_trusting(&[a], a);
        let r = CertResolver::new(&me).unwrap();
        let (_p, peer) = node_trusting(&[b], b);
        assert!(r.check(&peer).is_err());
    }

    /// Whether `r`'s verifiers accept `name`'s chain in `dir`, as a server (dialled by that
    /// name) and as a client: both answers, which must agree.
    fn accepts(r: &CertResolver, dir: &Path, name: &str) -> Result<(), rustls::Error> {
        let chain = TlsIdentity::load(dir, name).unwrap().chain;
        let trust = r.trust.load();
        let now = UnixTime::now();
        let sn = ServerName::try_from(name.to_string()).unwrap();
        let server = trust
            .verify_server(&chain[0], &chain[1..], &sn, now)
            .map(|_| ());
        let client = trust.verify_client(&chain[0], &chain[1..], now).map(|_| ());
        assert_eq!(server, client, "server and client verifiers disagree");
        server
    }

    const REVOKED: Result<(), rustls::Error> =
        Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));

    fn revoke(dir: &Path, name: &str) {
        let target = pki::RevokeTarget::Node(name.into());
        pki::revoke(dir, &target, pki::RevokeReason::KeyCompromise).unwrap();
    }

    /// A CA listed twice in `ca.pem` (an operator appending a CA the file already had) is
    /// trusted once, so its revocation list covers every certificate it signed. (Each copy
    /// had a verifier of its own and the list went to the first only: the second accepted a
    /// revoked certificate.)
    #[test]
    fn a_ca_listed_twice_is_trusted_once_and_its_list_revokes() {
        let d = tempfile::tempdir().unwrap();
        pki::init(d.path()).unwrap();
        let ca = d.path().join(pki::CA_CERT);
        let once = std::fs::read_to_string(&ca).unwrap();
        std::fs::write(&ca, format!("{once}{once}")).unwrap();
        pki::issue(d.path(), "n1").unwrap();
        pki::issue(d.path(), "n2").unwrap();
        let r = CertResolver::new(&TlsIdentity::load(d.path(), "n1").unwrap()).unwrap();
        assert_eq!(accepts(&r, d.path(), "n2"), Ok(()));
        revoke(d.path(), "n2");
        assert_eq!(r.reload_crl(), CrlReload::Adopted);
        assert_eq!(accepts(&r, d.path(), "n2"), REVOKED);
        assert_eq!(accepts(&r, d.path(), "n1"), Ok(()));
    }

    #[test]
    fn a_revoked_certificate_is_refused_by_both_verifiers_once_the_list_is_adopted() {
        let (d, r) = setup();
        pki::issue(d.path(), "n2").unwrap();
        pki::issue(d.path(), "n3").unwrap();
        assert_eq!(accepts(&r, d.path(), "n2"), Ok(()));
        let n2 = TlsIdentity::load(d.path(), "n2").unwrap().chain;
        let adopted = r.trust_changes();
        revoke(d.path(), "n2");
        // Not before the file is read: live connections and handshakes go on until then.
        assert_eq!(accepts(&r, d.path(), "n2"), Ok(()));
        assert_eq!(r.reload_crl(), CrlReload::Adopted);
        assert!(adopted.has_changed().unwrap());
        assert_eq!(accepts(&r, d.path(), "n2"), REVOKED);
        assert!(r.revoked(&n2));
        assert_eq!(
            accepts(&r, d.path(), "n3"),
            Ok(()),
            "only n2 is on the list"
        );
        assert_eq!(r.reload_crl(), CrlReload::Unchanged);
        assert_eq!((r.crl_updates(), r.crl_failures()), (1, 0));
        // Re-issued, with a new serial: accepted again.
        pki::issue(d.path(), "n2").unwrap();
        assert_eq!(accepts(&r, d.path(), "n2"), Ok(()));
        let mut m = String::new();
        r.render_metrics("n1", &mut m);
        assert!(
            m.contains("tasman_tls_crl_number{node=\"n1\",ca=\"1\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("tasman_tls_crl_revoked{node=\"n1\",ca=\"1\"} 1"),
            "{m}"
        );
        // A resolver started with the file in place takes it at once.
        let again = CertResolver::new(&TlsIdentity::load(d.path(), "n1").unwrap()).unwrap();
        assert_eq!(again.crls(), r.crls());
        assert!(again.revoked(&n2));
    }

    #[test]
    fn a_list_signed_by_a_foreign_ca_is_refused_and_the_old_list_kept() {
        let (d, r) = setup();
        pki::issue(d.path(), "n2").unwrap();
        revoke(d.path(), "n2");
        assert_eq!(r.reload_crl(), CrlReload::Adopted);
        let before = r.crls();
        // Another CA (same name, other key) revoking nothing of ours, and garbage.
        let other = tempfile::tempdir().unwrap();
        pki::init(other.path()).unwrap();
        pki::issue(other.path(), "x").unwrap();
        revoke(other.path(), "x");
        fs::copy(other.path().join(pki::CA_CRL), d.path().join(pki::CA_CRL)).unwrap();
        match r.reload_crl() {
            CrlReload::Refused(why) => assert!(why.contains("not signed by a CA"), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(r.crls(), before, "the list in force stays");
        assert_eq!(accepts(&r, d.path(), "n2"), REVOKED);
        assert!(matches!(r.reload_crl(), CrlReload::Refused(_)));
        assert_eq!(r.crl_failures(), 1, "the same file counted once");
        fs::write(
            d.path().join(pki::CA_CRL),
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        )
        .unwrap();
        assert!(matches!(r.reload_crl(), CrlReload::Refused(_)));
        assert_eq!(r.crl_failures(), 2);
        // Gone: the list stays in force (a list is only replaced by a newer one).
        fs::remove_file(d.path().join(pki::CA_CRL)).unwrap();
        assert_eq!(r.reload_crl(), CrlReload::Unchanged);
        assert_eq!(accepts(&r, d.path(), "n2"), REVOKED);
        assert_eq!(accepts(&r, d.path(), "n1"), Ok(()));
    }

    /// A `ca.crl.pem` that cannot be read is refused (the lists in force stay) and counted and
    /// logged once, not at every tick; once readable and good, it is adopted.
    #[test]
    fn an_unreadable_list_file_is_counted_once() {
        let (d, r) = setup();
        let path = d.path().join(pki::CA_CRL);
        fs::create_dir(&path).unwrap();
        for _ in 0..3 {
            assert!(matches!(r.reload_crl(), CrlReload::Refused(_)));
        }
        assert_eq!(r.crl_failures(), 1);
        fs::remove_dir(&path).unwrap();
        pki::issue(d.path(), "n2").unwrap();
        revoke(d.path(), "n2");
        assert_eq!(r.reload_crl(), CrlReload::Adopted);
        assert_eq!(r.crl_failures(), 1);
    }

    #[test]
    fn a_list_with_a_lower_number_is_refused() {
        let (d, r) = setup();
        pki::issue(d.path(), "n2").unwrap();
        pki::issue(d.path(), "n3").unwrap();
        revoke(d.path(), "n2");
        let first = fs::read(d.path().join(pki::CA_CRL)).unwrap();
        revoke(d.path(), "n3");
        assert_eq!(r.reload_crl(), CrlReload::Adopted);
        assert_eq!(r.crls()[0].number, 2);
        fs::write(d.path().join(pki::CA_CRL), first).unwrap();
        match r.reload_crl() {
            CrlReload::Refused(why) => assert!(why.contains("lower"), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(r.crls()[0].number, 2);
        assert_eq!(accepts(&r, d.path(), "n3"), REVOKED, "no rollback");
    }

    /// CAs made by `pki` share a name, so webpki would take the issuing CA's list as the
    /// authority for the old CA's certificates too and refuse them all (its signature does not
    /// verify with the old CA's key). Each CA's verifier has only its own list.
    #[test]
    fn during_a_ca_rotation_the_new_cas_list_leaves_the_old_cas_certificates_alone() {
        let d = tempfile::tempdir().unwrap();
        pki::init(d.path()).unwrap();
        pki::issue(d.path(), "n1").unwrap();
        pki::issue(d.path(), "old").unwrap();
        pki::rotate_ca(d.path()).unwrap();
        pki::issue(d.path(), "new").unwrap();
        pki::issue(d.path(), "leaked").unwrap();
        let r = CertResolver::new(&TlsIdentity::load(d.path(), "n1").unwrap()).unwrap();
        revoke(d.path(), "leaked");
        assert_eq!(r.reload_crl(), CrlReload::Adopted);
        assert_eq!(accepts(&r, d.path(), "leaked"), REVOKED);
        assert_eq!(accepts(&r, d.path(), "new"), Ok(()));
        assert_eq!(accepts(&r, d.path(), "old"), Ok(()), "old CA's leaf");
        assert_eq!(accepts(&r, d.path(), "n1"), Ok(()), "old CA's leaf");
        // Why one verifier per CA: a single one over the whole bundle and the list refuses the
        // old CA's leaf (the list is taken as authoritative by name, its signature then fails).
        let id = TlsIdentity::load(d.path(), "n1").unwrap();
        let mut roots = RootCertStore::empty();
        for ca in &id.cas {
            roots.add(ca.clone()).unwrap();
        }
        let one = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .with_crls(r.crls().into_iter().map(|c| c.der))
            .allow_unknown_revocation_status()
            .build()
            .unwrap();
        let old = TlsIdentity::load(d.path(), "old").unwrap().chain;
        assert!(
            one.verify_client_cert(&old[0], &old[1..], UnixTime::now())
                .is_err()
        );
    }

    /// A pushed list put in force whose write failed (a full disk; here a directory where its
    /// temporary goes) is written by the same push sent again: `crls_unsaved` says so until
    /// then, and the control client tries the push again on that word. (The push was said done:
    /// never written, a restart read the older file and accepted the revoked certificate.)
    #[test]
    fn a_pushed_list_whose_write_failed_is_written_when_tried_again() {
        let ca = tempfile::tempdir().unwrap();
        pki::init(ca.path()).unwrap();
        pki::issue(ca.path(), "n1").unwrap();
        pki::issue(ca.path(), "x").unwrap();
        let node = tempfile::tempdir().unwrap();
        for f in [pki::CA_CERT, "n1.pem", "n1.key"] {
            fs::copy(ca.path().join(f), node.path().join(f)).unwrap();
        }
        let r = CertResolver::new(&TlsIdentity::load(node.path(), "n1").unwrap()).unwrap();
        revoke(ca.path(), "x");
        let pushed = fs::read_to_string(ca.path().join(pki::CA_CRL)).unwrap();
        let tmp = node
            .path()
            .join(format!("{}.{}.tmp", pki::CA_CRL, std::process::id()));
        fs::create_dir(&tmp).unwrap();
        assert_eq!(install_crl(&r, &pushed), CrlReload::Adopted);
        assert!(r.crls_unsaved(), "a failed write said done");
        assert!(!node.path().join(pki::CA_CRL).exists());
        // Still failing: still unsaved.
        assert_eq!(install_crl(&r, &pushed), CrlReload::Unchanged);
        assert!(r.crls_unsaved());
        fs::remove_dir(&tmp).unwrap();
        // The next push is refused (a list of a CA this node does not trust yet): the lists in
        // force are written all the same.
        let other = tempfile::tempdir().unwrap();
        pki::init(other.path()).unwrap();
        pki::issue(other.path(), "y").unwrap();
        revoke(other.path(), "y");
        let foreign = fs::read_to_string(other.path().join(pki::CA_CRL)).unwrap();
        assert!(matches!(install_crl(&r, &foreign), CrlReload::Refused(_)));
        assert!(!r.crls_unsaved());
        let again = CertResolver::new(&TlsIdentity::load(node.path(), "n1").unwrap()).unwrap();
        assert_eq!(
            accepts(&again, ca.path(), "x"),
            REVOKED,
            "a restart trusts x again"
        );
    }

    /// A controller's text that leaves out a list in force (another CA's) changes nothing in
    /// force, and must not take that list out of the node's file either: the node would start
    /// without it after a restart, and accept again what it revoked.
    #[test]
    fn install_crl_keeps_every_list_in_force_in_the_file() {
        let d = tempfile::tempdir().unwrap();
        pki::init(d.path()).unwrap();
        pki::issue(d.path(), "n1").unwrap();
        pki::issue(d.path(), "old").unwrap();
        revoke(d.path(), "old");
        pki::rotate_ca(d.path()).unwrap();
        pki::issue(d.path(), "new").unwrap();
        revoke(d.path(), "new");
        let r = CertResolver::new(&TlsIdentity::load(d.path(), "n1").unwrap()).unwrap();
        assert_eq!(r.crls().len(), 2);
        // The issuing CA's list only (`revoke` writes it first).
        let text = fs::read_to_string(d.path().join(pki::CA_CRL)).unwrap();
        let end = "-----END X509 CRL-----\n";
        let only_new = &text[..text.find(end).unwrap() + end.len()];
        assert_eq!(pki::parse_crls(only_new, &r.trusted()).unwrap().len(), 1);
        assert_eq!(install_crl(&r, only_new), CrlReload::Unchanged);
        assert_eq!(r.crls().len(), 2);
        let again = CertResolver::new(&TlsIdentity::load(d.path(), "n1").unwrap()).unwrap();
        assert_eq!(again.crls(), r.crls(), "a restart keeps both lists");
        assert_eq!(accepts(&again, d.path(), "old"), REVOKED);
        assert_eq!(accepts(&again, d.path(), "new"), REVOKED);
        // A newer list of the new CA alone, adopted: the node's file is written with it and
        // the old CA's list, which stays in force. (Above, nothing was adopted, so nothing was
        // written: a save of the pushed lists only would have passed.)
        let before = fs::read_to_string(d.path().join(pki::CA_CRL)).unwrap();
        pki::issue(d.path(), "new2").unwrap();
        revoke(d.path(), "new2");
        let text = fs::read_to_string(d.path().join(pki::CA_CRL)).unwrap();
        let newer = &text[..text.find(end).unwrap() + end.len()];
        fs::write(d.path().join(pki::CA_CRL), &before).unwrap();
        assert_eq!(install_crl(&r, newer), CrlReload::Adopted);
        let after = CertResolver::new(&TlsIdentity::load(d.path(), "n1").unwrap()).unwrap();
        assert_eq!(after.crls().len(), 2, "a restart keeps both lists");
        assert_eq!(accepts(&after, d.path(), "old"), REVOKED);
        assert_eq!(accepts(&after, d.path(), "new2"), REVOKED);
    }

    /// A CA directory whose old CA (which revoked `old`) was rotated out and retired
    /// (`retire-ca`: both files pruned), and a node `n1` of the new CA (which revoked `new`)
    /// that still has both lists in force (its next tick would adopt the pruned files).
    fn retired_with_the_old_list_in_force() -> (tempfile::TempDir, Arc<CertResolver>) {
        let d = tempfile::tempdir().unwrap();
        pki::init(d.path()).unwrap();
        pki::issue(d.path(), "old").unwrap();
        revoke(d.path(), "old");
        pki::rotate_ca(d.path()).unwrap();
        pki::issue(d.path(), "n1").unwrap();
        pki::issue(d.path(), "new").unwrap();
        revoke(d.path(), "new");
        let r = CertResolver::new(&TlsIdentity::load(d.path(), "n1").unwrap()).unwrap();
        assert_eq!(r.crls().len(), 2);
        pki::retire_ca(d.path()).unwrap();
        (d, r)
    }

    /// A rotation whose old CA alone had revoked anything: once `retire-ca` ran and the node
    /// took its pruned files (both, as the guide says), the node refuses nothing, at its next
    /// tick or a restart. (`retire-ca` removed the list file: there was none to copy, the
    /// node's own copy kept the retired CA's list, and that was refused at every reload and
    /// start.)
    #[test]
    fn a_node_takes_the_files_of_a_retire_ca_whose_old_ca_alone_revoked() {
        let ca = tempfile::tempdir().unwrap();
        pki::init(ca.path()).unwrap();
        pki::issue(ca.path(), "old").unwrap();
        revoke(ca.path(), "old");
        pki::rotate_ca(ca.path()).unwrap();
        pki::issue(ca.path(), "n1").unwrap();
        let node = tempfile::tempdir().unwrap();
        for f in [pki::CA_CERT, pki::CA_CRL, "n1.pem", "n1.key"] {
            fs::copy(ca.path().join(f), node.path().join(f)).unwrap();
        }
        let r = CertResolver::new(&TlsIdentity::load(node.path(), "n1").unwrap()).unwrap();
        assert_eq!(r.crls().len(), 1);
        pki::retire_ca(ca.path()).unwrap();
        for f in [pki::CA_CRL, pki::CA_CERT] {
            fs::copy(ca.path().join(f), node.path().join(f)).expect("the file to copy");
        }
        let tick = r.reload_tick();
        assert!(!matches!(tick.crl, CrlReload::Refused(_)), "{:?}", tick.crl);
        assert_eq!(r.crl_failures(), 0);
        let again = CertResolver::new(&TlsIdentity::load(node.path(), "n1").unwrap()).unwrap();
        assert_eq!(again.crl_failures(), 0);
        assert_eq!(again.trusted().len(), 1);
    }

    /// `retire-ca` writes the pruned files while the node still has the retired CA's list in
    /// force (it adopts the pruned bundle at its next tick): a controller's push that changes
    /// nothing must not write that list back over the pruned file (it would be refused at the
    /// tick against the pruned bundle, and `tasman pki revoke` would fail on the directory).
    #[test]
    fn a_push_that_changes_nothing_leaves_the_file_alone() {
        let (d, r) = retired_with_the_old_list_in_force();
        let pruned = fs::read_to_string(d.path().join(pki::CA_CRL)).unwrap();
        assert_eq!(install_crl(&r, &pruned), CrlReload::Unchanged);
        assert_eq!(
            fs::read_to_string(d.path().join(pki::CA_CRL)).unwrap(),
            pruned,
            "the pruned file was written over"
        );
        let _ = r.reload_tick();
        assert_eq!(
            (r.trusted().len(), r.crls().len()),
            (1, 1),
            "pruned in force"
        );
    }

    /// A push that adopts a newer list while the node still has a retired CA's list in force
    /// (`retire-ca` pruned both files, the node has not adopted them yet) saves only the lists
    /// of the CAs in the `ca.pem` on disk. (It wrote the retired CA's list back: the file was
    /// refused at each tick after, a restart dropped every list, and `tasman pki revoke`
    /// failed on the directory.)
    #[test]
    fn a_push_adopted_after_retire_ca_leaves_the_retired_list_out_of_the_file() {
        let (d, r) = retired_with_the_old_list_in_force();
        // A revocation before the node's next tick: the push adopts a newer list.
        pki::issue(d.path(), "n2").unwrap();
        revoke(d.path(), "n2");
        let text = fs::read_to_string(d.path().join(pki::CA_CRL)).unwrap();
        assert_eq!(install_crl(&r, &text), CrlReload::Adopted);
        pki::read_crls(d.path()).expect("the file reads against the bundle on disk");
        revoke(d.path(), "n1");
        let tick = r.reload_tick();
        assert!(!matches!(tick.crl, CrlReload::Refused(_)), "{:?}", tick.crl);
        let fresh = CertResolver::new(&TlsIdentity::load(d.path(), "n1").unwrap()).unwrap();
        assert_eq!(fresh.crls().len(), 1, "a restart keeps the list in force");
    }

    /// A push adopted late (a newer list was written to the CA directory the node keeps its
    /// files in since the pushed one was read) leaves the newer list in the file. (It wrote the
    /// older list over it: the later revocation was lost from the file, undone at a restart.)
    #[test]
    fn a_push_adopted_late_does_not_write_an_older_list_over_a_newer_one() {
        let d = tempfile::tempdir().unwrap();
        pki::init(d.path()).unwrap();
        pki::issue(d.path(), "n1").unwrap();
        for n in ["x", "y", "z"] {
            pki::issue(d.path(), n).unwrap();
        }
        revoke(d.path(), "x");
        let r = CertResolver::new(&TlsIdentity::load(d.path(), "n1").unwrap()).unwrap();
        revoke(d.path(), "y");
        let second = fs::read_to_string(d.path().join(pki::CA_CRL)).unwrap();
        revoke(d.path(), "z");
        assert_eq!(install_crl(&r, &second), CrlReload::Adopted);
        let on_disk = pki::read_crls(d.path()).unwrap();
        assert_eq!(on_disk.len(), 1);
        assert_eq!(on_disk[0].number, 3, "the newer list was written over");
    }

    /// An endpoint for each of `certs` (`a`, then `b`) and a connection from `a` to `b`: both
    /// endpoints, `a`'s end and `b`'s end.
    async fn connect_pair(
        certs: &[Arc<CertResolver>],
        peers: &PeerNames,
    ) -> (Vec<quinn::Endpoint>, quinn::Connection, quinn::Connection) {
        let eps: Vec<quinn::Endpoint> = certs
            .iter()
            .map(|cert| {
                let t = crate::transport::shared_transport();
                let server = server_config_with(cert, peers, t.clone()).unwrap();
                let client = client_config_with(cert, peers, t).unwrap();
                let addr = "127.0.0.1:0".parse().unwrap();
                crate::transport::endpoint(addr, server, client).unwrap()
            })
            .collect();
        let b_addr = eps[1].local_addr().unwrap();
        let (a, b) = tokio::join!(
            async { eps[0].connect(b_addr, "b").unwrap().await.unwrap() },
            async { eps[1].accept().await.unwrap().await.unwrap() }
        );
        (eps, a, b)
    }

    /// Watching a connection for a change of trust must not keep it open once its owner lets go
    /// of it (a control session that ended, a dialer aborted when its neighbour left the
    /// topology): quinn closes a connection when its last handle goes.
    #[tokio::test]
    async fn watching_a_connection_for_trust_changes_does_not_keep_it_open() {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path()).unwrap();
        let peers = PeerNames::new(["a".to_string(), "b".to_string()]);
        let mut certs = Vec::new();
        for name in ["a", "b"] {
            pki::issue(dir.path(), name).unwrap();
            let cert = CertResolver::new(&TlsIdentity::load(dir.path(), name).unwrap()).unwrap();
            certs.push(cert);
        }
        let (_eps, a, b) = connect_pair(&certs, &peers).await;
        let watch = watch_trust(certs[0].clone(), a.clone());
        stays_open(&b, Duration::from_millis(50), "not revoked: left open").await;
        drop(a);
        drop(watch);
        tokio::time::timeout(Duration::from_secs(3), b.closed())
            .await
            .expect("the connection closes once its owner dropped it");
    }

    /// Writes the bundle of `cas` (PKI directories, in that order) as `dir`'s `ca.pem`.
    fn write_bundle(dir: &Path, cas: &[&Path]) {
        let bundle: String = cas
            .iter()
            .map(|c| fs::read_to_string(c.join(pki::CA_CERT)).unwrap())
            .collect();
        fs::write(dir.join(pki::CA_CERT), bundle).unwrap();
    }

    /// The `ca.pem` of a PKI directory as certificates (its bundle).
    fn bundle_of(dir: &Path) -> Vec<CertificateDer<'static>> {
        let bundle = pki::read_ca_bundle(&dir.join(pki::CA_CERT)).unwrap();
        bundle.into_iter().map(|c| c.der).collect()
    }

    fn metric(r: &CertResolver, series: &str) -> String {
        let mut m = String::new();
        r.render_metrics("n1", &mut m);
        m.lines()
            .find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')
                    .map(str::to_string)
            })
            .unwrap_or_else(|| panic!("no {series} in\n{m}"))
    }

    #[test]
    fn a_new_bundle_is_adopted_at_the_next_reload_and_trusts_its_cas_at_once() {
        let (d, r) = setup();
        let own = fs::read_to_string(d.path().join(pki::CA_CERT)).unwrap();
        let other = tempfile::tempdir().unwrap();
        pki::init(other.path()).unwrap();
        pki::issue(other.path(), "n2").unwrap();
        assert!(accepts(&r, other.path(), "n2").is_err(), "not trusted yet");
        assert_eq!(
            r.reload_trust(),
            TrustReload::Unchanged,
            "the file loaded at start"
        );
        let changes = r.trust_changes();

        write_bundle(d.path(), &[d.path(), other.path()]);
        assert_eq!(r.reload_trust(), TrustReload::Adopted { cas: 2 });
        assert_eq!(r.trusted(), bundle_of(d.path()));
        assert!(changes.has_changed().unwrap(), "live connections rechecked");
        assert_eq!(accepts(&r, other.path(), "n2"), Ok(()));
        assert_eq!(accepts(&r, d.path(), "n1"), Ok(()));
        assert_eq!(r.reload_trust(), TrustReload::Unchanged);
        // The same CAs in other bytes (a comment added): nothing to adopt.
        let text = fs::read_to_string(d.path().join(pki::CA_CERT)).unwrap();
        fs::write(d.path().join(pki::CA_CERT), format!("# bundle\n{text}")).unwrap();
        assert_eq!(r.reload_trust(), TrustReload::Unchanged);
        assert_eq!((r.trust_reloads(), r.trust_reload_failures()), (1, 0));
        assert_eq!(metric(&r, "tasman_tls_trusted_cas{node=\"n1\"}"), "2");
        assert_eq!(
            metric(&r, "tasman_tls_trust_reloads_total{node=\"n1\"}"),
            "1"
        );
        assert_eq!(
            metric(&r, "tasman_tls_trust_reload_failures_total{node=\"n1\"}"),
            "0"
        );
        // Narrowed back: the other CA's certificates are refused again.
        fs::write(d.path().join(pki::CA_CERT), own).unwrap();
        assert_eq!(r.reload_trust(), TrustReload::Adopted { cas: 1 });
        assert!(accepts(&r, other.path(), "n2").is_err());
        assert_eq!(r.trust_reloads(), 2);
    }

    #[test]
    fn a_bundle_without_the_nodes_own_issuer_is_refused_and_the_bundle_in_force_kept() {
        let (d, r) = setup();
        let before = r.trusted();
        let own = fs::read_to_string(d.path().join(pki::CA_CERT)).unwrap();
        let other = tempfile::tempdir().unwrap();
        pki::init(other.path()).unwrap();
        pki::issue(other.path(), "n2").unwrap();
        write_bundle(d.path(), &[other.path()]);
        match r.reload_trust() {
            TrustReload::Refused(why) => assert!(why.contains("does not chain"), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(r.trusted(), before, "the bundle in force stays");
        assert_eq!(accepts(&r, d.path(), "n1"), Ok(()));
        assert!(accepts(&r, other.path(), "n2").is_err());
        assert_eq!(r.trust_reload_failures(), 1);
        // The same file again: refused, counted once.
        assert!(matches!(r.reload_trust(), TrustReload::Refused(_)));
        assert_eq!(r.trust_reload_failures(), 1);
        assert_eq!(r.trust_reloads(), 0);
        // Other bad files: each refused and counted once, the bundle in force kept.
        let leaf_only = fs::read_to_string(d.path().join("n1.pem")).unwrap();
        let leaf_only = &leaf_only[..leaf_only.find("-----END CERTIFICATE-----").unwrap() + 26];
        for (bad, why) in [
            ("no PEM here".to_string(), "no certificate"),
            (leaf_only.to_string(), "not a CA certificate"),
        ] {
            fs::write(d.path().join(pki::CA_CERT), bad).unwrap();
            match r.reload_trust() {
                TrustReload::Refused(got) => assert!(got.contains(why), "{got}"),
                other => panic!("expected a refusal ({why}), got {other:?}"),
            }
        }
        fs::remove_file(d.path().join(pki::CA_CERT)).unwrap();
        assert!(matches!(r.reload_trust(), TrustReload::Refused(_)));
        assert_eq!(r.trust_reload_failures(), 4);
        assert_eq!(r.trusted(), before);
        assert_eq!(
            metric(&r, "tasman_tls_trust_reload_failures_total{node=\"n1\"}"),
            "4"
        );
        // The bundle of both CAs trusts the node's issuer: taken.
        let theirs = fs::read_to_string(other.path().join(pki::CA_CERT)).unwrap();
        fs::write(d.path().join(pki::CA_CERT), theirs + &own).unwrap();
        assert_eq!(r.reload_trust(), TrustReload::Adopted { cas: 2 });
    }

    /// A CA rotation over one node's resolver, no restart: the old CA's lists stay with it while
    /// it moves in the bundle (their number still the floor), and leave force with it at
    /// `retire-ca`; putting that CA back brings its list back.
    #[test]
    fn revocation_lists_stay_with_their_ca_across_bundle_changes_and_leave_with_it() {
        let d = tempfile::tempdir().unwrap();
        pki::init(d.path()).unwrap();
        let old_ca = fs::read_to_string(d.path().join(pki::CA_CERT)).unwrap();
        for n in ["n1", "old1", "old2"] {
            pki::issue(d.path(), n).unwrap();
        }
        revoke(d.path(), "old1");
        let first = fs::read(d.path().join(pki::CA_CRL)).unwrap();
        revoke(d.path(), "old2");
        let second = fs::read(d.path().join(pki::CA_CRL)).unwrap();
        let r = CertResolver::new(&TlsIdentity::load(d.path(), "n1").unwrap()).unwrap();
        assert_eq!(r.crls()[0].number, 2);

        // Step 1: the new CA first in the bundle, the old one (and its list) second.
        pki::rotate_ca(d.path()).unwrap();
        assert_eq!(r.reload_trust(), TrustReload::Adopted { cas: 2 });
        let crls = r.crls();
        assert_eq!(crls.len(), 1);
        assert_eq!((crls[0].ca, crls[0].number), (1, 2), "moved with its CA");
        assert_eq!(accepts(&r, d.path(), "old1"), REVOKED);
        assert_eq!(accepts(&r, d.path(), "old2"), REVOKED);
        assert_eq!(
            metric(&r, "tasman_tls_crl_number{node=\"n1\",ca=\"2\"}"),
            "2"
        );
        // The file's list of the old CA, unchanged, is nothing new; an older one is a rollback.
        assert_eq!(r.reload_crl(), CrlReload::Unchanged);
        fs::write(d.path().join(pki::CA_CRL), &first).unwrap();
        match r.reload_crl() {
            CrlReload::Refused(why) => assert!(why.contains("lower"), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(accepts(&r, d.path(), "old2"), REVOKED, "no rollback");
        fs::write(d.path().join(pki::CA_CRL), &second).unwrap();

        // Step 2 and 3: the node on the new CA, then the old CA retired (with its list).
        pki::issue(d.path(), "n1").unwrap();
        assert!(matches!(r.reload(), Reload::Reloaded { .. }));
        pki::issue(d.path(), "new").unwrap();
        pki::retire_ca(d.path()).unwrap();
        let left = pki::read_crls(d.path()).unwrap();
        assert!(
            left.len() == 1 && left[0].entries.is_empty(),
            "retire-ca left an empty list of the issuing CA: {left:?}"
        );
        assert_eq!(r.reload_trust(), TrustReload::Adopted { cas: 1 });
        assert!(
            r.crls().iter().all(|c| c.entries.is_empty()),
            "the old CA's list left with it: {:?}",
            r.crls()
        );
        assert!(accepts(&r, d.path(), "old1").is_err());
        assert_eq!(accepts(&r, d.path(), "new"), Ok(()));
        assert_eq!(metric(&r, "tasman_tls_trusted_cas{node=\"n1\"}"), "1");

        // The old CA put back (a retire-ca undone): its list comes back with it, floor included.
        let mut back = fs::read_to_string(d.path().join(pki::CA_CERT)).unwrap();
        back.push_str(&old_ca);
        fs::write(d.path().join(pki::CA_CERT), back).unwrap();
        assert_eq!(r.reload_trust(), TrustReload::Adopted { cas: 2 });
        assert_eq!(accepts(&r, d.path(), "old1"), REVOKED);
        assert_eq!(r.crls()[0].number, 2);
        fs::write(d.path().join(pki::CA_CRL), &first).unwrap();
        assert!(matches!(r.reload_crl(), CrlReload::Refused(_)));
    }

    /// Rotation step 1 and 2 reaching a node at once (the bundle with the new CA and the node's
    /// certificate from it, and a list of the new CA): one tick takes all three, in that order.
    #[test]
    fn a_new_ca_certificate_arriving_with_its_bundle_is_taken_in_the_same_tick() {
        let d = tempfile::tempdir().unwrap();
        pki::init(d.path()).unwrap();
        pki::issue(d.path(), "n1").unwrap();
        let r = CertResolver::new(&TlsIdentity::load(d.path(), "n1").unwrap()).unwrap();
        pki::rotate_ca(d.path()).unwrap();
        pki::issue(d.path(), "n1").unwrap();
        pki::issue(d.path(), "leaked").unwrap();
        revoke(d.path(), "leaked");
        let new = leaf_in(d.path(), "n1");
        let tick = r.reload_tick();
        assert_eq!(tick.trust, TrustReload::Adopted { cas: 2 });
        assert!(matches!(tick.cert, Reload::Reloaded { .. }), "{tick:?}");
        assert_eq!(tick.crl, CrlReload::Adopted);
        assert_eq!(r.current().cert[0], new);
        assert_eq!(accepts(&r, d.path(), "leaked"), REVOKED);
        assert_eq!(
            (
                r.reload_failures(),
                r.crl_failures(),
                r.trust_reload_failures()
            ),
            (0, 0, 0)
        );
        let again = r.reload_tick();
        assert_eq!(
            (again.trust, again.cert, again.crl),
            (
                TrustReload::Unchanged,
                Reload::Unchanged,
                CrlReload::Unchanged
            )
        );
    }

    /// Lists from the controller for a CA the node does not trust yet are refused, and taken
    /// once the bundle with that CA is (the controller sends them only once).
    #[test]
    fn lists_from_the_controller_refused_before_the_bundle_are_taken_after_it() {
        let ca = tempfile::tempdir().unwrap();
        pki::init(ca.path()).unwrap();
        pki::issue(ca.path(), "n1").unwrap();
        let node = tempfile::tempdir().unwrap();
        for f in [pki::CA_CERT, "n1.pem", "n1.key"] {
            fs::copy(ca.path().join(f), node.path().join(f)).unwrap();
        }
        let r = CertResolver::new(&TlsIdentity::load(node.path(), "n1").unwrap()).unwrap();
        pki::rotate_ca(ca.path()).unwrap();
        pki::issue(ca.path(), "leaked").unwrap();
        revoke(ca.path(), "leaked");
        let pushed = fs::read_to_string(ca.path().join(pki::CA_CRL)).unwrap();
        assert!(matches!(install_crl(&r, &pushed), CrlReload::Refused(_)));
        assert!(r.crls().is_empty());
        fs::copy(ca.path().join(pki::CA_CERT), node.path().join(pki::CA_CERT)).unwrap();
        assert_eq!(r.reload_tick().trust, TrustReload::Adopted { cas: 2 });
        assert_eq!(r.crls().len(), 1, "taken after the bundle");
        assert_eq!(accepts(&r, ca.path(), "leaked"), REVOKED);
        assert_eq!(
            fs::read_to_string(node.path().join(pki::CA_CRL)).unwrap(),
            pushed,
            "and saved"
        );
    }

    /// A node that missed a rotation's first step (its bundle still the old CA alone), given the
    /// final state (the pruned bundle, the new CA alone, and its pair from the new CA), refuses
    /// the bundle, which does not trust the certificate it presents (as it would a foreign CA's
    /// files copied in by mistake), but says that a restart takes both, and a restart does.
    /// (The refusal said only to give the node a certificate from a CA of both bundles, which
    /// the node, given one, refused for not chaining to the bundle in force.)
    #[test]
    fn a_node_that_missed_a_rotation_is_told_a_restart_takes_the_final_state() {
        let ca = tempfile::tempdir().unwrap();
        pki::init(ca.path()).unwrap();
        pki::issue(ca.path(), "n1").unwrap();
        let node = tempfile::tempdir().unwrap();
        let sync = || {
            for f in [pki::CA_CERT, "n1.pem", "n1.key"] {
                fs::copy(ca.path().join(f), node.path().join(f)).unwrap();
            }
        };
        sync();
        let r = CertResolver::new(&TlsIdentity::load(node.path(), "n1").unwrap()).unwrap();
        let old_leaf = leaf_in(node.path(), "n1");
        pki::rotate_ca(ca.path()).unwrap();
        pki::issue(ca.path(), "n1").unwrap();
        pki::retire_ca(ca.path()).unwrap();
        // The pruned bundle alone: refused, no hint (the pair on disk is the old CA's).
        fs::copy(ca.path().join(pki::CA_CERT), node.path().join(pki::CA_CERT)).unwrap();
        match r.reload_tick().trust {
            TrustReload::Refused(why) => assert!(!why.contains("restart"), "{why}"),
            t => panic!("{t:?}"),
        }
        assert_eq!(r.trust_reload_failures(), 1);
        // With its new pair: refused, and told (logged, counted: the same file refused for
        // another reason).
        sync();
        let tick = r.reload_tick();
        match &tick.trust {
            TrustReload::Refused(why) => assert!(why.contains("restart it to take both"), "{why}"),
            t => panic!("{t:?}"),
        }
        assert_eq!(r.trust_reload_failures(), 2);
        r.reload_tick();
        assert_eq!(r.trust_reload_failures(), 2, "told once");
        assert_eq!(r.current().cert[0], old_leaf);
        // A restart takes both.
        let restarted = CertResolver::new(&TlsIdentity::load(node.path(), "n1").unwrap()).unwrap();
        assert_eq!(restarted.current().cert[0], leaf_in(ca.path(), "n1"));
    }

    /// Two endpoints, `a` dialling `b`, each with its own TLS directory: `a` on a certificate of
    /// the new CA, trusting the new and the old CA; `b` still on the old CA's certificate.
    async fn rotation_pair() -> (
        tempfile::TempDir,
        [Arc<CertResolver>; 2],
        quinn::Connection,
        quinn::Connection,
        [quinn::Endpoint; 2],
    ) {
        let d = tempfile::tempdir().unwrap();
        pki::init(d.path()).unwrap();
        pki::issue(d.path(), "b").unwrap();
        pki::rotate_ca(d.path()).unwrap();
        pki::issue(d.path(), "a").unwrap();
        let peers = PeerNames::new(["a".to_string(), "b".to_string()]);
        let mut certs = Vec::new();
        for name in ["a", "b"] {
            let own = d.path().join(name);
            fs::create_dir(&own).unwrap();
            for f in [
                pki::CA_CERT.to_string(),
                format!("{name}.pem"),
                format!("{name}.key"),
            ] {
                fs::copy(d.path().join(&f), own.join(&f)).unwrap();
            }
            let cert = CertResolver::new(&TlsIdentity::load(&own, name).unwrap()).unwrap();
            certs.push(cert);
        }
        let (eps, a, b) = connect_pair(&certs, &peers).await;
        let eps: [quinn::Endpoint; 2] = eps.try_into().unwrap();
        let certs: [Arc<CertResolver>; 2] = certs.try_into().unwrap();
        (d, certs, a, b, eps)
    }

    /// `b`'s side of a connection stays open for `window` (no close from `a`).
    async fn stays_open(b: &quinn::Connection, window: Duration, why: &str) {
        let closed = tokio::time::timeout(window, b.closed()).await;
        assert!(closed.is_err(), "{why}: {closed:?}");
    }

    #[tokio::test]
    async fn a_live_connection_whose_peer_ca_leaves_the_bundle_is_closed_as_untrusted() {
        let (d, [a_cert, _b_cert], a, b, _eps) = rotation_pair().await;
        let _watch = watch_trust(a_cert.clone(), a.clone());
        let a_dir = d.path().join("a");
        stays_open(&b, Duration::from_millis(300), "trusted at the handshake").await;

        // Widened (a third CA added): nothing closes.
        let third = tempfile::tempdir().unwrap();
        pki::init(third.path()).unwrap();
        write_bundle(&a_dir, &[d.path(), third.path()]);
        assert_eq!(a_cert.reload_trust(), TrustReload::Adopted { cas: 3 });
        stays_open(&b, Duration::from_millis(500), "a CA added closes nothing").await;

        // Narrowed to the new CA (retire-ca): b's old-CA certificate no longer chains.
        pki::retire_ca(d.path()).unwrap();
        fs::copy(d.path().join(pki::CA_CERT), a_dir.join(pki::CA_CERT)).unwrap();
        assert_eq!(a_cert.reload_trust(), TrustReload::Adopted { cas: 1 });
        let why = tokio::time::timeout(Duration::from_secs(10), b.closed())
            .await
            .expect("a closes the connection");
        match why {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(
                    c.error_code.into_inner(),
                    u64::from(crate::codes::close::UNTRUSTED)
                )
            }
            other => panic!("expected an application close, got {other}"),
        }
        assert_eq!((a_cert.untrusted_closed(), a_cert.revoked_closed()), (1, 0));
        let mut m = String::new();
        a_cert.render_metrics("a", &mut m);
        assert!(
            m.contains("tasman_tls_untrusted_closed_total{node=\"a\"} 1"),
            "{m}"
        );
        // And refused at the next handshake.
        assert!(accepts(&a_cert, &d.path().join("b"), "b").is_err());
    }
    #[test]
    fn reload_refuses_missing_files() {
        let (d, r) = setup();
        let old = r.current().cert[0].clone();
        fs::remove_file(d.path().join("n1.pem")).unwrap();
        assert_refused(&r, &old, "n1.pem");
    }
}
