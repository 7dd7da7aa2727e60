//! A small private PKI for a fabric: one issuing CA per fabric, one certificate per node.
//!
//! `init(dir)` writes `ca.pem` and `ca.key` (valid 2024..2124); `issue(dir, name)` writes
//! `<name>.pem` (the leaf, then the issuing CA) and `<name>.key`, signed by that CA, with the name
//! as the only DNS SAN, valid for [`DEFAULT_VALIDITY`] from now (`issue_with` takes another
//! [`Validity`]). A node's identity is that name: it must be a node id of the topology (or
//! `controller`). Files are written to a temporary name and renamed into place, so a router
//! reloading them (see `tls::CertResolver`) never reads a half-written file.
//!
//! `ca.pem` is a trust bundle: one or more CA certificates, all of which a node trusts. The
//! issuing CA is the one whose public key is `ca.key`'s; an issued chain carries only that one.
//! The bundle holds more than one CA while the CA is rotated without a flag day (as Linkerd
//! rotates its trust anchor): [`rotate_ca`] makes a new issuing CA and keeps the old one in the
//! bundle, so nodes with certificates from either are accepted everywhere the bundle is
//! trusted; once every node holds a certificate from the new CA, [`retire_ca`] drops the rest.
//!
//! A leaf's issuer (name, key identifier) is taken from the issuing CA certificate itself
//! ([`CaSigner`]). Two CAs made by two `init` (or `rotate_ca`) runs share a name but not a key:
//! a leaf from one fails signature checks against the other, and a node trusting both still
//! finds the right one (webpki tries every anchor whose name matches; see the test
//! `two_cas_with_one_name_each_verify_their_own_leaves`).
//!
//! Every certificate signed here ([`CaSigner::sign`]: `tasman pki issue`, the controller's
//! renewals) has a random serial and is recorded in [`ISSUED`] before it is handed out.
//! [`revoke`] puts certificates of the issuing CA (a node's: every one recorded for it) on that
//! CA's revocation list (an X.509 CRL
//! signed by `ca.key`, its issuer the issuing certificate's subject byte for byte, as webpki
//! matches it; the CRL number one higher each time) in [`CA_CRL`]; [`parse_crls`] checks such a
//! file against a bundle (the key that signed each list decides, not the shared name) for
//! `tasman pki crl` and for routers (`tls::CertResolver::reload_crl`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::durable::{self, sync_dir};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};

/// File names inside a PKI directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
/// Where [`rotate_ca`] keeps the key of the CA it replaced (mode 0600, like `ca.key`).
pub const CA_KEY_OLD: &str = "ca.key.old";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists (refusing to overwrite a CA; remove it first)")]
    Exists { path: PathBuf },
    #[error(
        "{path} already exists: the node has a key (its certificate renews through the \
         controller); remove it first to make a new one"
    )]
    KeyExists { path: PathBuf },
    #[error("{name:?} is not a valid node name: {why}")]
    BadName { name: String, why: &'static str },
    #[error("{path}: not a usable key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    BadCert { path: PathBuf, reason: String },
    #[error("{dir} holds no CA (ca.pem and ca.key): create one with `tasman pki init --dir {dir}`")]
    NoCa { dir: PathBuf },
    /// `ca.pem` without `ca.key`: a node's TLS directory, or a CA directory whose key is gone
    /// (`tasman pki init` there would refuse, `ca.pem` being there: removed to follow that
    /// advice, the fabric's CA would be replaced by a foreign one).
    #[error(
        "{dir} holds ca.pem but not ca.key, the CA's private key: a node's TLS directory is not \
         the CA's; give the directory `tasman pki init` made (it holds ca.key)"
    )]
    NoCaKey { dir: PathBuf },
    #[error(
        "{cert}: no CA certificate in it matches the key in {key} (the bundle must hold the \
         issuing CA's certificate)"
    )]
    NoIssuingCa { cert: PathBuf, key: PathBuf },
    #[error(
        "{path} already exists (the key of the CA an earlier rotate-ca replaced): move it \
         somewhere safe or delete it, then rotate again"
    )]
    OldKeyExists { path: PathBuf },
    #[error("{path}: not a usable revocation list: {reason}")]
    BadCrl { path: PathBuf, reason: String },
    #[error("invalid validity period: {0}")]
    BadValidity(String),
    #[error("the certificate presented (serial {serial}) is revoked in {path}")]
    Revoked { serial: Serial, path: PathBuf },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether `name` can be a node identity (a DNS name label sequence, no wildcards, not one
/// whose files would be the CA's: [`name_problem`]).
pub fn valid_name(name: &str) -> bool {
    name_problem(name).is_none()
}

/// What is wrong with `name` as a node identity, if anything. A node's files are `NAME.pem` and
/// `NAME.key` (and `.next`, `.tmp` beside them) in the directory that holds the CA's files, so
/// `ca` (whose files are `ca.pem` and `ca.key`) and every name under `ca.` (`ca.crl` is
/// `ca.crl.pem`) are the CA's, in any case (a case-insensitive file system or DNS name match
/// makes `CA` the same). `controller` is a valid name: `tasman pki issue controller` is how the
/// controller's own certificate is made (topology validation keeps it off every node, and the
/// controller never renews a certificate for it).
pub fn name_problem(name: &str) -> Option<&'static str> {
    let syntax = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
        && !name.contains("..");
    if !syntax {
        return Some("letters, digits, '-', '.', at most 63 bytes");
    }
    let lower = name.to_ascii_lowercase();
    if lower == "ca" || lower.starts_with("ca.") {
        return Some(
            "`ca` and names under `ca.` are reserved (its files would replace the CA's: ca.pem, \
             ca.key, ca.crl.pem)",
        );
    }
    None
}

/// [`name_problem`] as an error.
fn check_name(name: &str) -> Result<(), PkiError> {
    match name_problem(name) {
        None => Ok(()),
        Some(why) => Err(PkiError::BadName {
            name: name.to_string(),
            why,
        }),
    }
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Tasman fabric CA");
    dn.push(DnType::OrganizationName, "Tasman");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    p
}

/// How long a node certificate issued by [`issue`] is valid: 365 days.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// The longest validity [`Validity::for_duration`] accepts: 10 years.
pub const MAX_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// How far back a new certificate's `not_before` is set, for peers whose clocks run behind.
const BACKDATE: Duration = Duration::from_secs(300);

/// A node certificate's validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// Valid from a few minutes ago (clock skew) until `d` from now. Refuses zero and more than
    /// [`MAX_VALIDITY`].
    pub fn for_duration(d: Duration) -> Result<Self, PkiError> {
        if d.is_zero() {
            return Err(PkiError::BadValidity("must be longer than zero".into()));
        }
        if d > MAX_VALIDITY {
            return Err(PkiError::BadValidity(format!(
                "{} is longer than the maximum of {} (3650 days)",
                humanize(d),
                humanize(MAX_VALIDITY)
            )));
        }
        let now = SystemTime::now();
        Ok(Validity {
            not_before: now - BACKDATE,
            not_after: now + d,
        })
    }

    /// An explicit window (e.g. one in the past, for tests of expiry). `not_after` must be after
    /// `not_before`.
    pub fn between(not_before: SystemTime, not_after: SystemTime) -> Result<Self, PkiError> {
        if not_after <= not_before {
            return Err(PkiError::BadValidity(
                "not_after must be after not_before".into(),
            ));
        }
        Ok(Validity {
            not_before,
            not_after,
        })
    }
}

fn humanize(d: Duration) -> String {
    format!("{}d", d.as_secs() / 86_400)
}

fn offset(t: SystemTime) -> Result<time::OffsetDateTime, PkiError> {
    // X.509 times stop at 9999-12-31; anything inside MAX_VALIDITY (or a sane past) fits.
    time::OffsetDateTime::from_unix_timestamp(unix(t))
        .map_err(|e| PkiError::BadValidity(e.to_string()))
}

/// Writes `path` through a temporary file renamed into place (readers see the old or the new
/// file, never a partial one), the file synced before the rename and the directory after it
/// ([`durable::write`]).
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    // Named for this process: two processes writing one file never write the same temporary.
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    durable::write(path, &tmp, contents.as_bytes(), secret).map_err(|e| io_err(&e.path)(e.source))
}

/// Renames `from` to `to`, then syncs `to`'s directory so that the rename survives a power
/// loss. Every change of a name in a PKI or TLS directory goes through here: a rename left in the page cache can be rolled back by a crash after the
/// command reported success, e.g. `ca.crl.pem` back to a list without the certificate just
/// revoked, whose CRL number the next `revoke` would then reuse for another list.
pub(crate) fn rename_synced(from: &Path, to: &Path) -> Result<(), PkiError> {
    durable::rename(from, to).map_err(io_err(to))
}

/// The file whose lock the commands that read, change and write a CA directory's files
/// ([`rotate_ca`], [`retire_ca`], [`revoke`], and [`CaSigner::sign`] to record a certificate)
/// hold, one at a time: two `tasman pki revoke` runs at once would otherwise both sign list
/// number N + 1, and one revocation would be lost.
pub const LOCK: &str = ".tasman-pki.lock";

/// Waits for and holds `dir`'s [`LOCK`] until the file is dropped. `None`: there is no such
/// directory (and so no CA to change).
fn lock_dir(dir: &Path) -> Result<Option<fs::File>, PkiError> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let path = dir.join(LOCK);
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    f.lock().map_err(io_err(&path))?;
    Ok(Some(f))
}

/// Creates `dir` (if needed) and writes a new CA into it. Refuses to overwrite an existing CA.
pub fn init(dir: &Path) -> Result<(), PkiError> {
    // The new directories' entries in their parents, as for a rename.
    durable::create_dir_all(dir).map_err(io_err(dir))?;
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    if cert_path.exists() {
        return Err(PkiError::Exists { path: cert_path });
    }
    // The key is written first: a key without its certificate is an init cut off between the
    // two (a crash), which this one completes with a certificate for that key (nothing can
    // have been issued without the certificate), instead of refusing until the key is removed
    // by hand.
    let key = if key_path.exists() {
        let pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        KeyPair::from_pem(&pem).map_err(|e| PkiError::BadKey {
            path: key_path.clone(),
            reason: e.to_string(),
        })?
    } else {
        let key = KeyPair::generate()?;
        write_file(&key_path, &key.serialize_pem(), true)?;
        key
    };
    let cert = ca_params().self_signed(&key)?;
    write_file(&cert_path, &cert.pem(), false)?;
    Ok(())
}

/// Writes a secret file (mode 0600) through a temporary file renamed into place, synced: a
/// crash leaves the old file or the whole new one, never an empty or partial one.
pub fn write_secret(path: &Path, contents: &str) -> Result<(), PkiError> {
    write_file(path, contents, true)
}

/// One CA certificate of a trust bundle: its DER, and its PEM block as found in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleCert {
    pub der: CertificateDer<'static>,
    pub pem: String,
}

/// The CA certificates of a trust bundle (the text of a `ca.pem`: one or more PEM
/// certificates), in file order. Refuses a bundle without a certificate, and any certificate
/// that does not parse or is not a CA (a leaf pasted into `ca.pem` by mistake would otherwise
/// become a trust anchor). Text outside the certificate blocks is ignored.
pub fn parse_ca_bundle(text: &str) -> Result<Vec<BundleCert>, String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut certs: Vec<BundleCert> = Vec::new();
    // Each kept certificate's place in the file (1-based) and its CA (subject and key).
    let mut cas: Vec<(usize, Vec<u8>, Vec<u8>)> = Vec::new();
    let mut n = 0;
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        n += 1;
        let after = &rest[start..];
        let end = after
            .find(END)
            .ok_or_else(|| format!("certificate {n} has no end line"))?;
        let pem = format!("{}\n", &after[..end + END.len()]);
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| format!("certificate {n}: {e}"))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| format!("certificate {n}: unparsable: {e}"))?;
        if !parsed.is_ca() {
            return Err(format!(
                "certificate {n} ({}) is not a CA certificate",
                parsed.subject()
            ));
        }
        rest = &after[end + END.len()..];
        // A CA listed twice would get two verifiers, and a revocation list only the first:
        // the second would accept what the list revokes. The same certificate again is
        // dropped (an operator appending a CA the file already had); another certificate of
        // the same CA (subject and key) is refused.
        if certs.iter().any(|c| c.der == der) {
            continue;
        }
        let (subject, key) = (parsed.subject().as_raw(), parsed.public_key().raw);
        if let Some((first, ..)) = cas.iter().find(|(_, s, k)| s == subject && k == key) {
            return Err(format!(
                "certificates {first} and {n} are two certificates of the same CA ({}, the \
                 same key): list each CA once",
                parsed.subject()
            ));
        }
        cas.push((n, subject.to_vec(), key.to_vec()));
        certs.push(BundleCert { der, pem });
    }
    if certs.is_empty() {
        return Err("no certificate in file".into());
    }
    Ok(certs)
}

/// [`parse_ca_bundle`] on the file at `path`.
pub fn read_ca_bundle(path: &Path) -> Result<Vec<BundleCert>, PkiError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    parse_ca_bundle(&text).map_err(|reason| PkiError::BadCert {
        path: path.to_path_buf(),
        reason,
    })
}

/// Whether `cert`'s public key is `key`'s; `None`: the certificate does not parse.
pub fn is_for_key(cert: &CertificateDer<'_>, key: &KeyPair) -> Option<bool> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(x.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
}

/// The position in `bundle` of the certificate whose public key is `key`'s: the issuing CA.
fn issuing_index(bundle: &[BundleCert], key: &KeyPair) -> Option<usize> {
    bundle
        .iter()
        .position(|c| is_for_key(&c.der, key) == Some(true))
}

/// A PKI directory's CA files, read and checked: the key, the bundle, and which certificate of
/// the bundle is the key's.
struct CaFiles {
    key_pem: String,
    key: KeyPair,
    bundle: Vec<BundleCert>,
    issuing: usize,
}

impl CaFiles {
    fn read(dir: &Path) -> Result<Self, PkiError> {
        let key_path = dir.join(CA_KEY);
        let cert_path = dir.join(CA_CERT);
        if !key_path.exists() || !cert_path.exists() {
            let dir = dir.to_path_buf();
            return Err(if cert_path.exists() {
                PkiError::NoCaKey { dir }
            } else {
                PkiError::NoCa { dir }
            });
        }
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::BadKey {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        let bundle = read_ca_bundle(&cert_path)?;
        let issuing = issuing_index(&bundle, &key).ok_or(PkiError::NoIssuingCa {
            cert: cert_path,
            key: key_path,
        })?;
        Ok(CaFiles {
            key_pem,
            key,
            bundle,
            issuing,
        })
    }
}

/// Starts a CA rotation in `dir`: a new CA key and certificate become the issuing CA (`ca.key`),
/// the old key is kept as [`CA_KEY_OLD`], and `ca.pem` becomes the bundle of the new CA then
/// every CA it held. Nodes must trust the new bundle (copied to them: they adopt it at their next
/// reload tick) before they meet certificates from the new CA. Refuses a directory without a CA,
/// and one where an earlier rotation's old key is still in place (never overwrites a key). The
/// number of CAs in the new bundle.
pub fn rotate_ca(dir: &Path) -> Result<usize, PkiError> {
    let _turn = lock_dir(dir)?;
    let ca = CaFiles::read(dir)?;
    let old_key_path = dir.join(CA_KEY_OLD);
    if old_key_path.exists() {
        return Err(PkiError::OldKeyExists { path: old_key_path });
    }
    let key = KeyPair::generate()?;
    let cert = ca_params().self_signed(&key)?;
    let mut bundle = cert.pem();
    for c in &ca.bundle {
        bundle.push_str(&c.pem);
    }
    // In this order, a crash in between leaves a usable directory: the old key saved, then a
    // bundle that still holds the old issuing CA (so `ca.key` still finds its certificate), then
    // the new key.
    write_file(&old_key_path, &ca.key_pem, true)?;
    write_file(&dir.join(CA_CERT), &bundle, false)?;
    write_file(&dir.join(CA_KEY), &key.serialize_pem(), true)?;
    Ok(ca.bundle.len() + 1)
}

/// Ends a CA rotation in `dir`: `ca.pem` keeps only the issuing CA (the one whose key is
/// `ca.key`). Nodes that adopt it refuse certificates from every other CA (and close the
/// connections those authenticated), so every node must hold a certificate from the issuing CA
/// first. The retired CAs' revocation lists leave
/// [`CA_CRL`] too (first: a crash in between leaves a file that checks out against either
/// bundle), since a list whose CA is not in the bundle makes the whole file fail its check.
/// Leaves [`CA_KEY_OLD`] alone (delete it or keep it offline). The number of CAs dropped (zero:
/// the bundle held only the issuing CA).
pub fn retire_ca(dir: &Path) -> Result<usize, PkiError> {
    let _turn = lock_dir(dir)?;
    let ca = CaFiles::read(dir)?;
    let dropped = ca.bundle.len() - 1;
    if dropped > 0 {
        let crls = crls_in(dir, &ca.bundle)?;
        if crls.iter().any(|c| c.ca != ca.issuing) {
            let kept: String = crls
                .iter()
                .filter(|c| c.ca == ca.issuing)
                .map(|c| c.pem.as_str())
                .collect();
            // Only retired CAs had lists: the file holds an empty list of the issuing CA, not
            // nothing. Removed, it left every node with the retired CA's list in its own copy,
            // refused at each reload and start once the pruned bundle was adopted (and the
            // controller went on pushing that list), with no file to copy over it.
            let kept = match kept.is_empty() {
                true => sign_crl(dir, &ca, &[], 1, SystemTime::now())?,
                false => kept,
            };
            write_crl(dir, &kept)?;
        }
        write_file(&dir.join(CA_CERT), &ca.bundle[ca.issuing].pem, false)?;
    }
    Ok(dropped)
}

/// Issues a certificate for `name` signed by the CA in `dir`, valid for [`DEFAULT_VALIDITY`];
/// writes `<name>.pem` (leaf then CA) and `<name>.key`. Overwrites an earlier certificate for the
/// same name (re-issue, with a new key).
pub fn issue(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), PkiError> {
    issue_with(dir, name, Validity::for_duration(DEFAULT_VALIDITY)?)
}

/// [`issue`] with the given validity window. The key is written before the certificate: a
/// router reloading in between still sees its old certificate (and ignores the key until the
/// matching certificate arrives).
pub fn issue_with(
    dir: &Path,
    name: &str,
    validity: Validity,
) -> Result<(PathBuf, PathBuf), PkiError> {
    let ca = CaSigner::load(dir)?;
    let key = KeyPair::generate()?;
    let signed = ca.sign(name, validity, &key)?;
    write_node_files(dir, name, &key.serialize_pem(), &signed.chain_pem)
}

/// The file `tasman pki keygen` writes a node's public key to, beside its key: `<name>.pub`
/// (a PEM `PUBLIC KEY`, SubjectPublicKeyInfo). No node's files end in `.pub`.
pub fn public_key_file(name: &str) -> String {
    format!("{name}.pub")
}

/// Makes a node's key where the node runs: `<name>.key` (readable by its owner only) and its
/// public key, `<name>.pub` ([`public_key_file`]), in `dir`. The CA's host then certifies the
/// public key ([`issue_for_key`]): the private key never leaves the node. Refuses when
/// `<name>.key` exists (the node has a key; its certificate renews through the controller).
/// The two paths (key, public key).
pub fn keygen(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), PkiError> {
    check_name(name)?;
    let key_path = dir.join(format!("{name}.key"));
    if key_path.exists() {
        return Err(PkiError::KeyExists { path: key_path });
    }
    durable::create_dir_all(dir).map_err(io_err(dir))?;
    let key = KeyPair::generate()?;
    let pub_path = dir.join(public_key_file(name));
    write_file(&key_path, &key.serialize_pem(), true)?;
    write_file(&pub_path, &key.public_key_pem(), false)?;
    Ok((key_path, pub_path))
}

/// A P-256 public key from a PEM `PUBLIC KEY` (SubjectPublicKeyInfo) text, as `openssl pkey
/// -pubout` or [`keygen`] writes it. `path` names it in errors.
pub fn read_public_key(path: &Path, pem: &str) -> Result<RawP256PublicKey, PkiError> {
    use rustls::pki_types::SubjectPublicKeyInfoDer;
    use rustls::pki_types::pem::PemObject;
    use x509_parser::prelude::FromDer;
    let bad = |reason: String| PkiError::BadKey {
        path: path.to_path_buf(),
        reason,
    };
    let der = SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| bad(format!("no PEM PUBLIC KEY in it ({e})")))?;
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(der.as_ref())
        .map_err(|e| bad(format!("not a SubjectPublicKeyInfo: {e}")))?;
    let ec = x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY;
    let p256 = x509_parser::oid_registry::OID_EC_P256;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != ec || curve.as_ref() != Some(&p256) {
        return Err(bad(
            "not a P-256 (prime256v1) EC key: nodes use ECDSA P-256".into(),
        ));
    }
    RawP256PublicKey::new(&spki.subject_public_key.data).map_err(bad)
}

/// Issues `<name>.pem` in `dir` (the CA directory) for the public key `key` (made on the node
/// by [`keygen`]), valid for `validity`: the certificate only, no key. Copy it to the node's
/// TLS directory, beside its `<name>.key`. The certificate's path.
pub fn issue_for_key(
    dir: &Path,
    name: &str,
    validity: Validity,
    key: &RawP256PublicKey,
) -> Result<PathBuf, PkiError> {
    check_name(name)?;
    let ca = CaSigner::load(dir)?;
    let signed = ca.sign(name, validity, key)?;
    let cert_path = dir.join(format!("{name}.pem"));
    write_file(&cert_path, &signed.chain_pem, false)?;
    Ok(cert_path)
}

/// What a new pair's files are called while they are staged: `<name>.key.next`,
/// `<name>.pem.next` ([`write_node_files`]).
pub const STAGED: &str = "next";

/// Writes `<name>.key` then `<name>.pem` (the chain) into `dir`. Both are staged first
/// (`<name>.key.next`, `<name>.pem.next`, each written whole and synced), then renamed over the
/// old pair, key first: a write that fails (a full disk) leaves the old pair as it was, and a
/// router reloading in between still sees its old certificate. A crash between the two renames
/// leaves the new key beside the old certificate with the new one still staged, which
/// [`crate::tls::TlsIdentity::load_pair`] takes. The two paths (certificate, key).
pub fn write_node_files(
    dir: &Path,
    name: &str,
    key_pem: &str,
    chain_pem: &str,
) -> Result<(PathBuf, PathBuf), PkiError> {
    check_name(name)?;
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    let cert_next = dir.join(format!("{name}.pem.{STAGED}"));
    let key_next = dir.join(format!("{name}.key.{STAGED}"));
    write_file(&key_next, key_pem, true)?;
    write_file(&cert_next, chain_pem, false)?;
    rename_synced(&key_next, &key_path)?;
    rename_synced(&cert_next, &cert_path)?;
    Ok((cert_path, key_path))
}

/// Bytes of a serial number [`random_serial`] makes.
pub const SERIAL_BYTES: usize = 16;

/// A new certificate's serial number: [`SERIAL_BYTES`] from a cryptographic random number
/// generator, the top bit clear (a positive DER integer of at most 16 bytes), never zero. rcgen's
/// default, a hash of the certified public key, gave two certificates over one key the same
/// serial: a node asking twice with one key (or for another node's key) got a certificate whose
/// serial was already another's, and revoking one revoked both (RFC 5280 wants serials unique
/// per CA).
pub fn random_serial() -> Serial {
    use rand::Rng;
    loop {
        let mut b = [0u8; SERIAL_BYTES];
        rand::rng().fill(&mut b);
        b[0] &= 0x7f;
        let s = Serial::from_der_content(&b);
        if !s.0.is_empty() {
            return s;
        }
    }
}

/// The parameters of every node certificate: the name as the only DNS SAN and the common name,
/// not a CA, digital signatures, server and client authentication, the given window, a new
/// [`random_serial`].
fn node_params(name: &str, validity: Validity) -> Result<CertificateParams, PkiError> {
    check_name(name)?;
    let mut params = CertificateParams::new(vec![name.to_string()])?;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(random_serial().as_bytes()));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // A node is both a QUIC server (accepts neighbours) and a client (dials them).
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = offset(validity.not_before)?;
    params.not_after = offset(validity.not_after)?;
    Ok(params)
}

/// The fabric's issuing CA, loaded from a PKI directory (`ca.key`, and the certificate in the
/// `ca.pem` bundle with that key, appended to every chain): signs node certificates for
/// [`issue_with`] and for the controller's renewals.
pub struct CaSigner {
    issuer: Issuer<'static, KeyPair>,
    ca: BundleCert,
    /// The CA directory, where each certificate signed is recorded ([`ISSUED`]).
    dir: PathBuf,
    /// [`ca_id`] of the issuing CA.
    ca_id: String,
}

/// A certificate [`CaSigner::sign`] issued, recorded in its directory's [`ISSUED`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The leaf, then the issuing CA, in PEM.
    pub chain_pem: String,
    pub serial: Serial,
}

impl std::fmt::Debug for CaSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaSigner").finish_non_exhaustive()
    }
}

impl CaSigner {
    /// Reads `ca.key` and `ca.pem` from `dir` (as written by [`init`] or [`rotate_ca`]); the
    /// issuing CA is the bundle's certificate for `ca.key`. Refuses a directory without a CA and
    /// a bundle without the key's certificate.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let CaFiles {
            key,
            mut bundle,
            issuing,
            ..
        } = CaFiles::read(dir)?;
        let ca = bundle.swap_remove(issuing);
        // The issuer's name, key identifier and key usages come from the issuing certificate
        // itself, so a leaf's issuer (and a CRL's, see [`revoke`]) is byte for byte that
        // certificate's subject, whatever parameters it was made with.
        let ca_id = ca_id(&key);
        let issuer = Issuer::from_ca_cert_der(&ca.der, key).map_err(|e| PkiError::BadCert {
            path: dir.join(CA_CERT),
            reason: format!("the issuing CA certificate: {e}"),
        })?;
        // A signer that could not record what it signs must not start signing.
        open_issued(dir)?;
        Ok(CaSigner {
            issuer,
            ca,
            dir: dir.to_path_buf(),
            ca_id,
        })
    }

    /// The issuing CA certificate.
    pub fn ca_cert(&self) -> &CertificateDer<'static> {
        &self.ca.der
    }

    /// A certificate for `name` over `public_key`, valid for `validity`: the chain in PEM (the
    /// leaf, then the issuing CA; never the rest of the bundle, which a peer trusts or not on
    /// its own), and its serial. Recorded in the directory's [`ISSUED`] (written and synced,
    /// under the directory's [`LOCK`]) before it is returned, so that `revoke NODE` finds every
    /// certificate of the node, whoever holds it. Nothing is returned when the record fails.
    pub fn sign(
        &self,
        name: &str,
        validity: Validity,
        public_key: &impl PublicKeyData,
    ) -> Result<Signed, PkiError> {
        self.sign_checked(name, validity, public_key, None)
    }

    /// [`CaSigner::sign`] for a renewal by the holder of the certificate with serial
    /// `presented`: refused ([`PkiError::Revoked`]) when a list of the directory's [`CA_CRL`]
    /// revokes it. Checked under the directory's [`LOCK`], with the record: a `revoke` either
    /// came first (and this is refused) or reads the record after this certificate is in it.
    /// (The lists the controller enforces at handshakes reach it at its next look at the file:
    /// in between, the holder of a key just revoked could otherwise get a certificate no
    /// revocation had seen.)
    pub fn sign_renewal(
        &self,
        name: &str,
        validity: Validity,
        public_key: &impl PublicKeyData,
        presented: &Serial,
    ) -> Result<Signed, PkiError> {
        self.sign_checked(name, validity, public_key, Some(presented))
    }

    fn sign_checked(
        &self,
        name: &str,
        validity: Validity,
        public_key: &impl PublicKeyData,
        presented: Option<&Serial>,
    ) -> Result<Signed, PkiError> {
        let params = node_params(name, validity)?;
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| Serial::from_der_content(&s.to_bytes()))
            .ok_or_else(|| PkiError::BadValidity("no serial number".into()))?;
        let cert = params.signed_by(public_key, &self.issuer)?;
        let mut chain_pem = cert.pem();
        chain_pem.push_str(&self.ca.pem);
        let record = IssuedRecord {
            serial: serial.clone(),
            node: name.to_string(),
            not_after: unix(validity.not_after),
            ca: self.ca_id.clone(),
        };
        let _turn = lock_dir(&self.dir)?;
        if let Some(presented) = presented {
            let bundle = read_ca_bundle(&self.dir.join(CA_CERT))?;
            if crls_in(&self.dir, &bundle)?
                .iter()
                .any(|c| c.revokes(presented))
            {
                return Err(PkiError::Revoked {
                    serial: presented.clone(),
                    path: self.dir.join(CA_CRL),
                });
            }
        }
        append_issued(&self.dir, &record)?;
        Ok(Signed { chain_pem, serial })
    }
}

/// The record of every certificate issued from a CA directory ([`CaSigner::sign`]: `tasman pki
/// issue` and a controller's renewals with `--ca-dir`), one line each, appended and synced before
/// the certificate is handed out: `serial=HEX node=NAME not_after=UNIX ca=HEX` (`ca`: the
/// signing CA, [`ca_id`]). [`revoke`] of a node revokes every unexpired certificate of it in
/// here: after a renewal through the controller, `NODE.pem` in the CA directory is no longer the
/// certificate the node (or whoever holds its key) presents.
pub const ISSUED: &str = "ca.issued.log";

/// One line of [`ISSUED`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedRecord {
    pub serial: Serial,
    pub node: String,
    /// Unix time the certificate expires.
    pub not_after: i64,
    /// [`ca_id`] of the CA that signed it.
    pub ca: String,
}

impl IssuedRecord {
    fn line(&self) -> String {
        format!(
            "serial={} node={} not_after={} ca={}\n",
            self.serial, self.node, self.not_after, self.ca
        )
    }

    fn parse(line: &str) -> Option<Self> {
        let (mut serial, mut node, mut not_after, mut ca) = (None, None, None, None);
        for field in line.split_ascii_whitespace() {
            let (k, v) = field.split_once('=')?;
            match k {
                "serial" => serial = Some(v.parse::<Serial>().ok()?),
                "node" => node = Some(v.to_string()),
                "not_after" => not_after = Some(v.parse::<i64>().ok()?),
                "ca" => ca = Some(v.to_string()),
                _ => {}
            }
        }
        Some(IssuedRecord {
            serial: serial?,
            node: node?,
            not_after: not_after?,
            ca: ca?,
        })
    }
}

/// The identifier of a CA in [`ISSUED`]: the hex of the first 20 bytes of the SHA-256 of its
/// public key (as rcgen derives a subject key identifier). CAs share their name, not their key.
/// [`ca_id`] of the CA certificate `der` (from its public key), `None` when it does not parse.
fn spki_ca_id(der: &CertificateDer<'_>) -> Option<String> {
    let (_, x) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let spki = rcgen::SubjectPublicKeyInfo::from_der(x.tbs_certificate.subject_pki.raw).ok()?;
    Some(key_id(&spki))
}

fn ca_id(key: &KeyPair) -> String {
    key_id(key)
}

/// The key identifier of a public key, in hex (what [`ISSUED`] records as a CA's id).
fn key_id(key: &impl rcgen::PublicKeyData) -> String {
    CertificateParams::default()
        .key_identifier(key)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Unix seconds of `t` (negative before 1970).
fn unix(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// `dir`'s [`ISSUED`], opened to append (created when missing: its name synced into `dir`).
fn open_issued(dir: &Path) -> Result<fs::File, PkiError> {
    let path = dir.join(ISSUED);
    let existed = path.exists();
    let f = fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(&path)
        .map_err(io_err(&path))?;
    if !existed {
        durable::changed(&path);
        sync_dir(dir).map_err(io_err(dir))?;
    }
    Ok(f)
}

/// Appends `rec` to `dir`'s [`ISSUED`] and syncs it; the caller holds the directory's [`LOCK`].
/// A last line left unfinished by a crash (its certificate was never handed out) is ended
/// first, so that the new line is whole on its own.
fn append_issued(dir: &Path, rec: &IssuedRecord) -> Result<(), PkiError> {
    use std::io::{Read, Seek, SeekFrom};
    let path = dir.join(ISSUED);
    let mut f = open_issued(dir)?;
    let len = f.metadata().map_err(io_err(&path))?.len();
    let mut line = rec.line();
    if len > 0 {
        let mut last = [0u8; 1];
        f.seek(SeekFrom::Start(len - 1))
            .and_then(|_| f.read_exact(&mut last))
            .map_err(io_err(&path))?;
        if last[0] != b'\n' {
            line.insert(0, '\n');
        }
    }
    f.write_all(line.as_bytes()).map_err(io_err(&path))?;
    f.sync_all().map_err(io_err(&path))
}

/// The certificates recorded in `dir`'s [`ISSUED`] (none when there is no such file), and how
/// many of its lines could not be read (skipped: a line cut short by a crash, or edited).
pub fn read_issued(dir: &Path) -> Result<(Vec<IssuedRecord>, usize), PkiError> {
    let path = dir.join(ISSUED);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let mut records = Vec::new();
    let mut unreadable = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match IssuedRecord::parse(line) {
            Some(r) => records.push(r),
            None => unreadable += 1,
        }
    }
    Ok((records, unreadable))
}

/// A P-256 public key as raw bytes (the uncompressed point, as
/// [`KeyPair::public_key_raw`] gives for [`KeyPair::generate`]): what a router sends to have
/// its new key certified, without a CSR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawP256PublicKey(Vec<u8>);

impl RawP256PublicKey {
    /// Length of an uncompressed P-256 point: 0x04, then 32 bytes of x and 32 of y.
    pub const LEN: usize = 65;

    /// Refuses anything but 65 bytes starting with 0x04 (an uncompressed point) that is a point
    /// of the curve (checked by an ECDH with a throwaway key, which validates the peer's point):
    /// a CA certifies no key that cannot exist.
    pub fn new(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() != Self::LEN {
            return Err(format!(
                "public key of {} bytes: expected {} (an uncompressed P-256 point)",
                bytes.len(),
                Self::LEN
            ));
        }
        if bytes[0] != 0x04 {
            return Err(format!(
                "public key starts with {:#04x}: expected 0x04 (an uncompressed P-256 point)",
                bytes[0]
            ));
        }
        use ring::agreement;
        let rng = ring::rand::SystemRandom::new();
        let mine = agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, &rng)
            .map_err(|_| "no random key for checking the public key".to_string())?;
        let theirs = agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, bytes);
        agreement::agree_ephemeral(mine, &theirs, |_| ())
            .map_err(|_| "public key is not a point of the P-256 curve".to_string())?;
        Ok(RawP256PublicKey(bytes.to_vec()))
    }

    /// Checks `proof` ([`prove_possession`]): a signature by this key's private half over
    /// `binding`, which the asking session's TLS exported ([`session_binding`]). Without it a
    /// router could have its name certified over a key it does not hold (another node's, read
    /// from that node's certificate), and the holder of that key present the certificate as it.
    pub fn verify_possession(&self, binding: &SessionBinding, proof: &[u8]) -> Result<(), String> {
        if proof.is_empty() {
            return Err(
                "no proof of possession of the key (a router from before proofs were asked: \
                 upgrade it, or issue its certificate with `tasman pki issue`)"
                    .into(),
            );
        }
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, &self.0)
            .verify(&possession_message(binding, &self.0), proof)
            .map_err(|_| {
                "the proof of possession does not verify: not signed by the key asked for, or \
                 not for this session"
                    .to_string()
            })
    }
}

/// Keying material both ends of one TLS session export alike (RFC 5705, under
/// [`BINDING_LABEL`]) and no other session has: what a proof of possession signs, so that
/// a proof made for one session proves nothing on another.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SessionBinding([u8; 32]);

impl SessionBinding {
    /// A binding of these bytes: what [`session_binding`] exported (tests make their own).
    pub fn new(bytes: [u8; 32]) -> SessionBinding {
        SessionBinding(bytes)
    }
}

/// The exporter label of a [`SessionBinding`].
pub const BINDING_LABEL: &[u8] = b"EXPORTER-tasman-renewal-proof-v1";

impl std::fmt::Debug for SessionBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionBinding(..)")
    }
}

/// The [`SessionBinding`] of `conn` (`None`: its TLS exports nothing, which a QUIC connection
/// past its handshake always does).
pub fn session_binding(conn: &quinn::Connection) -> Option<SessionBinding> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, BINDING_LABEL, b"")
        .ok()
        .map(|()| SessionBinding(out))
}

/// What a proof of possession signs: a context string, the session's binding and the raw
/// public key asked for.
fn possession_message(binding: &SessionBinding, public_key: &[u8]) -> Vec<u8> {
    const CONTEXT: &[u8] = b"tasman certificate renewal: proof of possession\0";
    [CONTEXT, &binding.0, public_key].concat()
}

/// The proof a `Renew` carries that the router holds `key`: an ECDSA P-256 SHA-256 signature
/// (ASN.1 DER) by it over the session's `binding` and its public key
/// ([`RawP256PublicKey::verify_possession`]).
pub fn prove_possession(key: &KeyPair, binding: &SessionBinding) -> Result<Vec<u8>, PkiError> {
    use rcgen::SigningKey;
    Ok(key.sign(&possession_message(binding, key.public_key_raw()))?)
}

impl PublicKeyData for RawP256PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl CaSigner {
    /// Renews `cert`'s certificate with this CA directly (the controller's own, when it holds
    /// the CA): a new key, a certificate for `cert`'s name valid for `validity`, installed as a
    /// renewal from the controller is ([`crate::tls::install`], checked against what `cert`
    /// trusts). The new expiry.
    ///
    /// An error says how it ended for `tasman_tls_cert_renewals_total{result}`: `Refused` when
    /// nothing was signed, `Invalid` when the signed pair could not be installed.
    pub fn renew(
        &self,
        cert: &crate::tls::CertResolver,
        validity: Validity,
    ) -> Result<i64, (crate::tls::Renewal, String)> {
        use crate::tls::Renewal;
        let refused = |e: String| (Renewal::Refused, e);
        let key = KeyPair::generate().map_err(|e| refused(e.to_string()))?;
        let presented = cert
            .current()
            .cert
            .first()
            .and_then(serial_of)
            .ok_or_else(|| refused("the certificate presented does not parse".into()))?;
        let signed = self
            .sign_renewal(cert.name(), validity, &key, &presented)
            .map_err(|e| refused(e.to_string()))?;
        crate::tls::install(cert, &key, &signed.chain_pem).map_err(|e| (Renewal::Invalid, e))
    }
}

/// The revocation list file of a PKI directory (and of a router's TLS directory): one CRL (PEM
/// `X509 CRL`) per CA of the bundle that revoked anything. [`revoke`] writes the issuing CA's.
pub const CA_CRL: &str = "ca.crl.pem";

/// How long a CRL written by [`revoke`] says it is current (`nextUpdate`). Routers ignore it (a
/// CRL stays in force until a newer one replaces it), so it is only there because RFC 5280 asks
/// for it: longer than any node certificate lives.
const CRL_NEXT_UPDATE: Duration = MAX_VALIDITY;

/// Why a certificate was revoked: the RFC 5280 reason codes that apply to a node certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeReason {
    Unspecified,
    KeyCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
}

impl RevokeReason {
    pub const ALL: [RevokeReason; 5] = [
        RevokeReason::Unspecified,
        RevokeReason::KeyCompromise,
        RevokeReason::AffiliationChanged,
        RevokeReason::Superseded,
        RevokeReason::CessationOfOperation,
    ];

    /// The name on the command line and in listings.
    pub fn label(self) -> &'static str {
        match self {
            RevokeReason::Unspecified => "unspecified",
            RevokeReason::KeyCompromise => "key-compromise",
            RevokeReason::AffiliationChanged => "affiliation-changed",
            RevokeReason::Superseded => "superseded",
            RevokeReason::CessationOfOperation => "cessation-of-operation",
        }
    }

    fn rcgen(self) -> rcgen::RevocationReason {
        match self {
            RevokeReason::Unspecified => rcgen::RevocationReason::Unspecified,
            RevokeReason::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
            RevokeReason::AffiliationChanged => rcgen::RevocationReason::AffiliationChanged,
            RevokeReason::Superseded => rcgen::RevocationReason::Superseded,
            RevokeReason::CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
        }
    }

    /// The reason with RFC 5280 code `code`, if it is one of these.
    fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.rcgen() as u8 == code)
    }
}

impl std::fmt::Display for RevokeReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl std::str::FromStr for RevokeReason {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.label() == s)
            .ok_or_else(|| {
                let all: Vec<&str> = Self::ALL.iter().map(|r| r.label()).collect();
                format!("unknown reason {s:?} (expected one of: {})", all.join(", "))
            })
    }
}

/// A certificate serial number: its magnitude, big-endian, without leading zero bytes (what
/// webpki compares, once DER has put back the sign byte). Printed and parsed as hex.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// At most 20 bytes (RFC 5280), as found in a certificate.
    pub const MAX_LEN: usize = 20;

    /// The serial whose DER integer content is `bytes` (a leading sign byte is dropped).
    pub fn from_der_content(bytes: &[u8]) -> Self {
        let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        Serial(bytes[start..].to_vec())
    }

    /// The magnitude, big-endian.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Display for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("00");
        }
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Serial {
    type Err = String;
    /// Hex digits, optionally with `0x` in front and `:` between bytes (as `openssl x509
    /// -serial` and `tasman pki crl` print them).
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let t = t.strip_prefix("0x").unwrap_or(t);
        let digits: String = t.chars().filter(|c| *c != ':').collect();
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "serial {s:?}: expected hex digits (e.g. 1f:a3:09 or 1fa309)"
            ));
        }
        let padded = if digits.len() % 2 == 1 {
            format!("0{digits}")
        } else {
            digits
        };
        let bytes: Vec<u8> = (0..padded.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&padded[i..i + 2], 16).unwrap_or(0))
            .collect();
        let serial = Serial::from_der_content(&bytes);
        if serial.0.is_empty() {
            return Err(format!("serial {s:?}: a serial number is never zero"));
        }
        if serial.0.len() > Self::MAX_LEN {
            return Err(format!("serial {s:?}: longer than {} bytes", Self::MAX_LEN));
        }
        Ok(serial)
    }
}

/// The serial number of a certificate (DER); `None`: it does not parse.
pub fn serial_of(cert: &CertificateDer<'_>) -> Option<Serial> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(Serial::from_der_content(x.raw_serial()))
}

/// One revoked certificate of a CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedEntry {
    pub serial: Serial,
    /// Unix time of the revocation.
    pub revoked_at: i64,
    /// `None`: no reason code, or one not in [`RevokeReason`].
    pub reason: Option<RevokeReason>,
}

/// A CRL read from a `ca.crl.pem` and checked against a trust bundle ([`parse_crls`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedCrl {
    /// The position in the bundle of the CA that signed it.
    pub ca: usize,
    /// Its CRL number (a newer list of the same CA has a higher one).
    pub number: u64,
    pub entries: Vec<RevokedEntry>,
    pub der: rustls::pki_types::CertificateRevocationListDer<'static>,
    /// Its PEM block as found in the file.
    pub pem: String,
}

impl CheckedCrl {
    /// Whether the certificate with this serial is on the list.
    pub fn revokes(&self, serial: &Serial) -> bool {
        self.entries.iter().any(|e| &e.serial == serial)
    }
}

/// The PEM blocks labelled `label` in `text`, in order (text outside them is ignored).
pub(crate) fn pem_blocks(text: &str, label: &str) -> Result<Vec<String>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end_line = format!("-----END {label}-----");
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&begin) {
        let after = &rest[start..];
        let end = after
            .find(&end_line)
            .ok_or_else(|| format!("{label} {} has no end line", blocks.len() + 1))?;
        blocks.push(format!("{}\n", &after[..end + end_line.len()]));
        rest = &after[end + end_line.len()..];
    }
    Ok(blocks)
}

/// The CRLs of `text` (a `ca.crl.pem`: one or more PEM `X509 CRL` blocks), each checked against
/// the CAs of `bundle`: its issuer is the subject of a CA of the bundle whose key verifies its
/// signature (CAs made by [`init`] share a name: the key decides), that CA may sign CRLs, it
/// carries a CRL number, and no CA has two. Any failure refuses the whole text: a list that
/// cannot be trusted is not half taken.
pub fn parse_crls(text: &str, bundle: &[CertificateDer<'_>]) -> Result<Vec<CheckedCrl>, String> {
    use rustls::pki_types::CertificateRevocationListDer;
    let cas = bundle
        .iter()
        .enumerate()
        .map(|(i, c)| {
            x509_parser::parse_x509_certificate(c.as_ref())
                .map(|(_, x)| x)
                .map_err(|e| format!("CA certificate {}: unparsable: {e}", i + 1))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let blocks = pem_blocks(text, "X509 CRL")?;
    if blocks.is_empty() {
        return Err("no CRL in file".into());
    }
    let mut crls: Vec<CheckedCrl> = Vec::new();
    for (i, pem) in blocks.into_iter().enumerate() {
        let n = i + 1;
        let der = CertificateRevocationListDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| format!("CRL {n}: {e}"))?;
        let (rest, crl) = x509_parser::parse_x509_crl(der.as_ref())
            .map_err(|e| format!("CRL {n}: unparsable: {e}"))?;
        if !rest.is_empty() {
            return Err(format!("CRL {n}: trailing bytes after the list"));
        }
        let ca = cas
            .iter()
            .position(|c| {
                c.subject().as_raw() == crl.issuer().as_raw()
                    && crl.verify_signature(c.public_key()).is_ok()
            })
            .ok_or_else(|| {
                format!(
                    "CRL {n} (issuer {}) is not signed by a CA of the trust bundle",
                    crl.issuer()
                )
            })?;
        // A key usage that cannot be read says nothing it may do: refused, like one without
        // cRLSign (webpki does not look at a trust anchor's key usage for lists).
        match cas[ca].key_usage() {
            Ok(Some(ku)) if ku.value.crl_sign() => {}
            Ok(None) => {}
            Ok(Some(_)) => {
                return Err(format!(
                    "CRL {n}: its CA ({}) may not sign CRLs (no cRLSign key usage)",
                    cas[ca].subject()
                ));
            }
            Err(e) => {
                return Err(format!(
                    "CRL {n}: its CA's ({}) key usage cannot be read ({e}): it may not sign CRLs",
                    cas[ca].subject()
                ));
            }
        }
        let number = crl
            .crl_number()
            .ok_or_else(|| format!("CRL {n}: no CRL number"))?
            .to_bytes_be();
        let number = Serial::from_der_content(&number);
        if number.0.len() > 8 {
            return Err(format!("CRL {n}: CRL number {number} is too large"));
        }
        let number = number
            .0
            .iter()
            .fold(0u64, |acc, b| acc << 8 | u64::from(*b));
        if let Some(j) = crls.iter().position(|c| c.ca == ca) {
            return Err(format!(
                "CRLs {} and {n} are both from CA {} of the bundle (at most one list per CA)",
                j + 1,
                ca + 1
            ));
        }
        let entries = crl
            .iter_revoked_certificates()
            .map(|r| RevokedEntry {
                serial: Serial::from_der_content(r.raw_serial()),
                revoked_at: r.revocation_date.timestamp(),
                reason: r
                    .reason_code()
                    .and_then(|(_, code)| RevokeReason::from_code(code.0)),
            })
            .collect();
        crls.push(CheckedCrl {
            ca,
            number,
            entries,
            der,
            pem,
        });
    }
    Ok(crls)
}

/// The CRLs of `dir`'s [`CA_CRL`], checked against its `ca.pem` ([`parse_crls`]); none when
/// there is no such file. Works on a PKI directory and on a router's TLS directory.
pub fn read_crls(dir: &Path) -> Result<Vec<CheckedCrl>, PkiError> {
    crls_in(dir, &read_ca_bundle(&dir.join(CA_CERT))?)
}

/// The CRLs of `dir`'s [`CA_CRL`], checked against `bundle` (`dir`'s, already read); none when
/// there is no such file.
fn crls_in(dir: &Path, bundle: &[BundleCert]) -> Result<Vec<CheckedCrl>, PkiError> {
    let path = dir.join(CA_CRL);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let bundle: Vec<_> = bundle.iter().map(|c| c.der.clone()).collect();
    parse_crls(&text, &bundle).map_err(|reason| PkiError::BadCrl { path, reason })
}

/// Writes `text` (revocation lists, checked by the caller) to `dir`'s [`CA_CRL`] by rename. Its
/// path.
pub fn write_crl(dir: &Path, text: &str) -> Result<PathBuf, PkiError> {
    let path = dir.join(CA_CRL);
    write_file(&path, text, false)?;
    Ok(path)
}

/// Saves the revocation lists a node has in force (`lists`: each, checked, with its CA's
/// certificate) as `dir`'s [`CA_CRL`], keeping only those of a CA in `dir`'s [`CA_CERT`] as it
/// is on disk now (and, per CA, the file's own list when it is newer): the bundle a restart,
/// and the next reload, check the file against. (The lists in force can
/// hold a list of a CA the file's bundle has dropped, `retire-ca` having pruned both files
/// before the node adopted them; written back, that list made the file unreadable: refused at
/// each reload, dropped whole at a restart, which then ran with no list at all, and `tasman pki
/// revoke` and renewals refused on a CA directory.) Under the directory's [`LOCK`] when it
/// holds a CA key (a controller's `--ca-dir`, which those commands write under it). Whether it
/// wrote: not when nothing is left to write, or the file holds it already.
pub fn save_crls_in_force(
    dir: &Path,
    lists: &[(CertificateDer<'static>, CheckedCrl)],
) -> Result<bool, PkiError> {
    let _lock = if dir.join(CA_KEY).exists() {
        lock_dir(dir)?
    } else {
        None
    };
    let bundle = read_ca_bundle(&dir.join(CA_CERT))?;
    // What the file holds now, as a restart would read it: a list written there since this
    // node adopted its own (`pki revoke` of the CA directory the node keeps its files in) is
    // newer than the one in force, and is kept over it; a file that does not read is replaced.
    let on_disk = crls_in(dir, &bundle).unwrap_or_default();
    let text: String = bundle
        .iter()
        .enumerate()
        .filter_map(|(i, ca)| {
            let mine = lists.iter().find(|(der, _)| *der == ca.der).map(|(_, c)| c);
            let theirs = on_disk.iter().find(|c| c.ca == i);
            match (mine, theirs) {
                (Some(m), Some(t)) if t.number > m.number => Some(t),
                (Some(m), _) => Some(m),
                (None, t) => t,
            }
        })
        .map(|c| c.pem.as_str())
        .collect();
    if text.is_empty() || fs::read(dir.join(CA_CRL)).ok().as_deref() == Some(text.as_bytes()) {
        return Ok(false);
    }
    write_crl(dir, &text)?;
    Ok(true)
}

/// What [`revoke`] revokes: a node's certificates (every unexpired one recorded in the
/// directory's [`ISSUED`], and its `<name>.pem` there), or a certificate by serial number (one
/// neither names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeTarget {
    Node(String),
    Serial(Serial),
}

/// What [`revoke`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The serials it put on the list (none: all were on it already, and nothing was written).
    pub added: Vec<Serial>,
    /// The target's serials that were on the list already.
    pub already: Vec<Serial>,
    /// Unexpired certificates of the node signed by another CA than the issuing one (a CA being
    /// rotated out): the issuing CA's list cannot revoke them.
    pub other_ca: Vec<Serial>,
    /// Lines of [`ISSUED`] that could not be read (skipped).
    pub unreadable: usize,
    /// The issuing CA's list now: its number and length.
    pub number: u64,
    pub entries: usize,
    pub path: PathBuf,
}

/// The serials `revoke` of node `name` takes from `dir` (the issuing CA's, in the order found:
/// `<name>.pem`'s, then [`ISSUED`]'s unexpired ones for the name), the other CAs' unexpired ones,
/// and the number of unreadable lines of [`ISSUED`]. Refuses when the issuing CA has none.
fn node_serials(
    dir: &Path,
    name: &str,
    ca: &CaFiles,
) -> Result<(Vec<Serial>, Vec<Serial>, usize), PkiError> {
    check_name(name)?;
    let issuing_der = &ca.bundle[ca.issuing].der;
    let path = dir.join(format!("{name}.pem"));
    let bad = |reason: String| PkiError::BadCert {
        path: path.clone(),
        reason,
    };
    let not_issuing = || {
        bad(format!(
            "not issued by the issuing CA (the one for {CA_KEY}); revocation lists are per CA \
             and this one can only revoke its own certificates: a certificate of a CA being \
             rotated out stops being accepted at `tasman pki retire-ca` (re-issue the node from \
             the issuing CA, then finish the rotation)"
        ))
    };
    let (mut mine, mut others) = (Vec::new(), Vec::new());
    // `<name>.pem`: the certificate `tasman pki issue` wrote last (maybe before the record was
    // kept), expired or not.
    let from_file = (|| {
        let pem = fs::read(&path).map_err(|e| {
            bad(format!(
                "no certificate of {name} to revoke here ({e}, and no unexpired one recorded in {ISSUED}); \
                 revoke one held elsewhere with --serial"
            ))
        })?;
        let leaf = CertificateDer::pem_slice_iter(&pem)
            .next()
            .ok_or_else(|| bad("no certificate in file".into()))?
            .map_err(|e| bad(e.to_string()))?;
        let (_, x) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| bad(format!("unparsable: {e}")))?;
        let (_, issuing) = x509_parser::parse_x509_certificate(issuing_der.as_ref())
            .map_err(|e| bad(format!("the issuing CA certificate: {e}")))?;
        let serial = Serial::from_der_content(x.raw_serial());
        // Of another CA still in the bundle (else of one retired: accepted nowhere).
        let of_bundle = || {
            ca.bundle.iter().any(|c| {
                x509_parser::parse_x509_certificate(c.der.as_ref())
                    .is_ok_and(|(_, b)| x.verify_signature(Some(b.public_key())).is_ok())
            })
        };
        Ok((
            serial,
            x.verify_signature(Some(issuing.public_key())).is_ok(),
            of_bundle(),
        ))
    })();
    let file_problem = match from_file {
        Ok((serial, true, _)) => {
            mine.push(serial);
            None
        }
        Ok((serial, false, of_bundle)) => {
            if of_bundle {
                others.push(serial);
            }
            Some(not_issuing())
        }
        Err(e) => Some(e),
    };
    // Every certificate issued for the name since: renewals through the controller included,
    // which `<name>.pem` here never holds.
    let (records, unreadable) = read_issued(dir)?;
    let issuing_id = ca_id(&ca.key);
    // The other CAs still in the bundle: a certificate of a CA retired since is accepted
    // nowhere any more (it was reported as staying accepted until `retire-ca`, long after it).
    let bundle_ids: Vec<String> = ca
        .bundle
        .iter()
        .filter_map(|c| spki_ca_id(&c.der))
        .collect();
    let now = unix(SystemTime::now());
    for r in records {
        if !r.node.eq_ignore_ascii_case(name) || r.not_after <= now {
            continue;
        }
        let list = if r.ca == issuing_id {
            &mut mine
        } else if bundle_ids.contains(&r.ca) {
            &mut others
        } else {
            continue;
        };
        if !list.contains(&r.serial) {
            list.push(r.serial);
        }
    }
    match file_problem {
        Some(e) if mine.is_empty() => Err(e),
        _ => Ok((mine, others, unreadable)),
    }
}

/// Adds certificates of the issuing CA of `dir` (the one for `ca.key`) to that CA's revocation
/// list and writes [`CA_CRL`] (by rename): the previous entries kept, the CRL number one higher,
/// signed by `ca.key`, the issuer exactly the issuing certificate's subject (as in every leaf it
/// signed). Lists of the bundle's other CAs in the file are kept as they are. A node's
/// certificates are its `<name>.pem` and every unexpired one recorded for it in [`ISSUED`] (one
/// list number for all); only the issuing CA's are revoked (one from a CA being rotated out ends
/// with [`retire_ca`]), and at least one must be. A serial is taken as the issuing CA's (it does
/// nothing to another CA's certificate of that serial). Refuses a directory without a CA and a
/// [`CA_CRL`] that does not check out against the bundle. Holds the directory's [`LOCK`]
/// throughout, as [`CaSigner::sign`] does to record a certificate: a certificate is either in
/// the record this revocation read, or signed after it.
pub fn revoke(
    dir: &Path,
    target: &RevokeTarget,
    reason: RevokeReason,
) -> Result<Revoked, PkiError> {
    let _turn = lock_dir(dir)?;
    let ca = CaFiles::read(dir)?;
    let (serials, other_ca, unreadable) = match target {
        RevokeTarget::Serial(s) => (vec![s.clone()], Vec::new(), 0),
        RevokeTarget::Node(name) => node_serials(dir, name, &ca)?,
    };
    let path = dir.join(CA_CRL);
    let existing = crls_in(dir, &ca.bundle)?;
    let (mine, others): (Vec<_>, Vec<_>) = existing.into_iter().partition(|c| c.ca == ca.issuing);
    let mine = mine.into_iter().next();
    let (already, added): (Vec<Serial>, Vec<Serial>) = serials
        .into_iter()
        .partition(|s| mine.as_ref().is_some_and(|m| m.revokes(s)));
    if added.is_empty() {
        return Ok(Revoked {
            added,
            already,
            other_ca,
            unreadable,
            number: mine.as_ref().map_or(0, |m| m.number),
            entries: mine.as_ref().map_or(0, |m| m.entries.len()),
            path,
        });
    }
    let now = SystemTime::now();
    let mut entries = mine.as_ref().map(|m| m.entries.clone()).unwrap_or_default();
    for serial in &added {
        entries.push(RevokedEntry {
            serial: serial.clone(),
            revoked_at: unix(now).max(0),
            reason: Some(reason),
        });
    }
    let number = mine.as_ref().map_or(0, |m| m.number) + 1;
    let mut text = sign_crl(dir, &ca, &entries, number, now)?;
    for o in &others {
        text.push_str(&o.pem);
    }
    write_file(&path, &text, false)?;
    Ok(Revoked {
        added,
        already,
        other_ca,
        unreadable,
        number,
        entries: entries.len(),
        path,
    })
}

/// The issuing CA's revocation list (PEM) of `entries`, numbered `number`, made at `now`:
/// signed by `ca.key`, its issuer exactly the issuing certificate's subject (as in every leaf
/// it signed).
fn sign_crl(
    dir: &Path,
    ca: &CaFiles,
    entries: &[RevokedEntry],
    number: u64,
    now: SystemTime,
) -> Result<String, PkiError> {
    let issuing_der = ca.bundle[ca.issuing].der.clone();
    let revoked_certs = entries
        .iter()
        .map(|e| {
            Ok(rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(e.serial.as_bytes()),
                revocation_time: time::OffsetDateTime::from_unix_timestamp(e.revoked_at)
                    .map_err(|e| PkiError::BadValidity(e.to_string()))?,
                reason_code: e.reason.map(RevokeReason::rcgen),
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>, PkiError>>()?;
    let params = rcgen::CertificateRevocationListParams {
        this_update: offset(now)?,
        next_update: offset(now + CRL_NEXT_UPDATE)?,
        crl_number: rcgen::SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: key_id_method(&issuing_der),
    };
    let issuer =
        Issuer::from_ca_cert_der(&issuing_der, &ca.key).map_err(|e| PkiError::BadCert {
            path: dir.join(CA_CERT),
            reason: format!("the issuing CA certificate: {e}"),
        })?;
    Ok(params.signed_by(&issuer)?.pem()?)
}

/// The CRL's authority key identifier: the issuing certificate's subject key identifier when
/// it has one (what rcgen derived from the key with SHA-256 when it made the CA).
fn key_id_method(ca: &CertificateDer<'_>) -> rcgen::KeyIdMethod {
    use x509_parser::extensions::ParsedExtension;
    x509_parser::parse_x509_certificate(ca.as_ref())
        .ok()
        .and_then(|(_, x)| {
            x.iter_extensions()
                .find_map(|e| match e.parsed_extension() {
                    ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                    _ => None,
                })
        })
        .map_or(rcgen::KeyIdMethod::Sha256, rcgen::KeyIdMethod::PreSpecified)
}

/// Unix time (seconds) at which a certificate valid from `not_before` to `not_after` should be
/// renewed: after 70 % of its lifetime, but at least [`RENEW_MIN_AFTER`] and at most
/// [`RENEW_MAX_AFTER`] after it became valid (as Linkerd's proxies refresh their identity), and
/// never after it expires. A certificate issued by hand for a year is so replaced after a day,
/// by one whose key the router made, instead of on its last day, when one day of the
/// controller away would let it expire.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    let life = not_after.saturating_sub(not_before).max(0);
    let after = (life * 7 / 10).clamp(
        RENEW_MIN_AFTER.as_secs() as i64,
        RENEW_MAX_AFTER.as_secs() as i64,
    );
    not_before.saturating_add(after).min(not_after)
}

/// The least time after it became valid that a certificate is due for renewal ([`renew_at`]).
pub const RENEW_MIN_AFTER: Duration = Duration::from_secs(10);
/// The most time after it became valid that a certificate is due for renewal ([`renew_at`]).
pub const RENEW_MAX_AFTER: Duration = Duration::from_secs(24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn init_then_issue_writes_files_and_refuses_second_init() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        assert!(matches!(init(d.path()), Err(PkiError::Exists { .. })));
        let (c, k) = issue(d.path(), "syd-edge-1").unwrap();
        assert!(
            fs::read_to_string(c)
                .unwrap()
                .matches("BEGIN CERTIFICATE")
                .count()
                == 2
        );
        assert!(fs::read_to_string(k).unwrap().contains("PRIVATE KEY"));
    }

    /// An init cut off after writing the CA key (the certificate is written second) is completed
    /// by the next: a certificate for that key, which then issues. (The next init refused, the
    /// key being there, and a controller's first start failed until the key was removed by hand.)
    #[test]
    fn an_init_cut_off_after_its_key_is_completed_by_the_next() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        let key = fs::read_to_string(d.path().join(CA_KEY)).unwrap();
        fs::remove_file(d.path().join(CA_CERT)).unwrap();
        init(d.path()).unwrap();
        assert_eq!(fs::read_to_string(d.path().join(CA_KEY)).unwrap(), key);
        issue(d.path(), "syd-edge-1").expect("the new certificate is the key's");
    }

    fn bundle(dir: &Path) -> Vec<BundleCert> {
        read_ca_bundle(&dir.join(CA_CERT)).unwrap()
    }

    /// The certificates of `<name>.pem` in `dir`.
    fn chain(dir: &Path, name: &str) -> Vec<CertificateDer<'static>> {
        let pem = fs::read(dir.join(format!("{name}.pem"))).unwrap();
        CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    }

    #[test]
    fn a_bundle_of_two_cas_parses_to_both_in_file_order() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        init(a.path()).unwrap();
        init(b.path()).unwrap();
        let (ca_a, ca_b) = (bundle(a.path()), bundle(b.path()));
        let text = format!("# comment\n{}\n{}", ca_a[0].pem, ca_b[0].pem);
        let both = parse_ca_bundle(&text).unwrap();
        assert_eq!(both.len(), 2);
        assert_eq!((&both[0].der, &both[1].der), (&ca_a[0].der, &ca_b[0].der));
        assert_ne!(both[0].der, both[1].der);
    }

    /// A CA listed twice is kept once; two certificates of one CA (its key, its subject) are
    /// refused naming both places: either way each CA has one verifier, which its revocation
    /// list reaches.
    #[test]
    fn a_ca_twice_in_a_bundle_is_kept_once_or_refused() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        let first = bundle(d.path()).remove(0);
        let other = tempfile::tempdir().unwrap();
        init(other.path()).unwrap();
        let b = bundle(other.path()).remove(0);
        let text = format!("{}{}{}", first.pem, b.pem, first.pem);
        let kept = parse_ca_bundle(&text).unwrap();
        assert_eq!(
            kept.iter().map(|c| &c.der).collect::<Vec<_>>(),
            [&first.der, &b.der]
        );
        // The same key certified again (`init` completes a directory whose ca.pem is gone).
        fs::remove_file(d.path().join(CA_CERT)).unwrap();
        init(d.path()).unwrap();
        let again = bundle(d.path()).remove(0);
        assert_ne!(again.der, first.der);
        let e = parse_ca_bundle(&format!("{}{}{}", first.pem, b.pem, again.pem)).unwrap_err();
        assert!(
            e.contains("certificates 1 and 3") && e.contains("same CA"),
            "{e}"
        );
    }

    #[test]
    fn a_bundle_without_certificates_or_with_a_leaf_is_refused() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        issue(d.path(), "n1").unwrap();
        assert!(parse_ca_bundle("").unwrap_err().contains("no certificate"));
        // A node's chain (leaf first) is not a bundle of CAs.
        let leaf = fs::read_to_string(d.path().join("n1.pem")).unwrap();
        let e = parse_ca_bundle(&leaf).unwrap_err();
        assert!(e.contains("certificate 1") && e.contains("not a CA"), "{e}");
    }

    #[test]
    fn an_issued_chain_carries_only_the_issuing_ca_of_the_bundle() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        let old = bundle(d.path());
        rotate_ca(d.path()).unwrap();
        let both = bundle(d.path());
        assert_eq!(both.len(), 2);
        issue(d.path(), "n1").unwrap();
        let c = chain(d.path(), "n1");
        assert_eq!(c.len(), 2, "the leaf and one CA, not the whole bundle");
        assert_eq!(c[1], both[0].der, "the new CA, whose key is ca.key");
        assert_ne!(c[1], old[0].der);
        // Wherever the issuing CA is in the bundle: here last, after the old one.
        let reordered = format!("{}{}", both[1].pem, both[0].pem);
        fs::write(d.path().join(CA_CERT), reordered).unwrap();
        issue(d.path(), "n2").unwrap();
        assert_eq!(chain(d.path(), "n2")[1], both[0].der);
        let signer = CaSigner::load(d.path()).unwrap();
        assert_eq!(signer.ca_cert(), &both[0].der);
        assert_eq!(signer.ca.pem, both[0].pem);
    }

    #[test]
    fn a_bundle_without_the_keys_certificate_is_refused_for_issuing() {
        let (d, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        init(d.path()).unwrap();
        init(other.path()).unwrap();
        fs::copy(other.path().join(CA_CERT), d.path().join(CA_CERT)).unwrap();
        let e = issue(d.path(), "n1").unwrap_err();
        assert!(matches!(e, PkiError::NoIssuingCa { .. }), "{e}");
        assert!(e.to_string().contains("ca.key"), "{e}");
    }

    #[test]
    fn rotate_ca_makes_a_new_issuing_ca_and_keeps_the_old_one_trusted() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        let old_key = fs::read_to_string(d.path().join(CA_KEY)).unwrap();
        let old = bundle(d.path());
        assert_eq!(rotate_ca(d.path()).unwrap(), 2);
        let new_key = fs::read_to_string(d.path().join(CA_KEY)).unwrap();
        assert_ne!(new_key, old_key);
        assert_eq!(
            fs::read_to_string(d.path().join(CA_KEY_OLD)).unwrap(),
            old_key
        );
        #[cfg(unix)]
        for f in [CA_KEY, CA_KEY_OLD] {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(d.path().join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let both = bundle(d.path());
        assert_eq!(both.len(), 2);
        assert_eq!(both[1], old[0], "the old CA follows the new one, unchanged");
        let key = KeyPair::from_pem(&new_key).unwrap();
        assert_eq!(issuing_index(&both, &key), Some(0));
        // A second rotation would overwrite the saved key: refused, nothing changed.
        let e = rotate_ca(d.path()).unwrap_err();
        assert!(matches!(e, PkiError::OldKeyExists { .. }), "{e}");
        assert_eq!(bundle(d.path()), both);
        assert_eq!(fs::read_to_string(d.path().join(CA_KEY)).unwrap(), new_key);
        // Once the saved key is moved away, the bundle grows to three.
        fs::remove_file(d.path().join(CA_KEY_OLD)).unwrap();
        assert_eq!(rotate_ca(d.path()).unwrap(), 3);
        assert_eq!(bundle(d.path())[1..], both[..]);
    }

    #[test]
    fn retire_ca_keeps_only_the_issuing_ca() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        rotate_ca(d.path()).unwrap();
        let both = bundle(d.path());
        // The issuing CA last in the bundle: still the one kept.
        fs::write(
            d.path().join(CA_CERT),
            format!("{}{}", both[1].pem, both[0].pem),
        )
        .unwrap();
        assert_eq!(retire_ca(d.path()).unwrap(), 1);
        assert_eq!(bundle(d.path()), vec![both[0].clone()]);
        assert_eq!(retire_ca(d.path()).unwrap(), 0, "nothing left to drop");
        assert_eq!(bundle(d.path()), vec![both[0].clone()]);
        assert!(
            d.path().join(CA_KEY_OLD).exists(),
            "the old key is left alone"
        );
        issue(d.path(), "n1").unwrap();
        assert_eq!(chain(d.path(), "n1")[1], both[0].der);
    }

    #[test]
    fn rotate_and_retire_refuse_a_directory_without_a_ca() {
        let d = tempfile::tempdir().unwrap();
        for e in [rotate_ca(d.path()), retire_ca(d.path())] {
            let e = e.unwrap_err();
            assert!(matches!(e, PkiError::NoCa { .. }), "{e}");
            assert!(e.to_string().contains("tasman pki init"), "{e}");
        }
        assert!(!d.path().join(CA_CERT).exists() && !d.path().join(CA_KEY).exists());
    }

    /// A node's TLS directory (`ca.pem`, no `ca.key`) given where the CA's is wanted is told
    /// apart: the error names the missing key, not `tasman pki init`, which would refuse there
    /// (`ca.pem` exists) and, `ca.pem` removed to follow it, make a foreign CA.
    #[test]
    fn a_directory_with_the_ca_certificate_but_not_its_key_is_named_so() {
        let ca = tempfile::tempdir().unwrap();
        init(ca.path()).unwrap();
        let node = tempfile::tempdir().unwrap();
        fs::copy(ca.path().join(CA_CERT), node.path().join(CA_CERT)).unwrap();
        let e = issue(node.path(), "n1").unwrap_err();
        assert!(matches!(e, PkiError::NoCaKey { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("not ca.key") && !msg.contains("pki init --dir"),
            "{msg}"
        );
    }

    fn leaf_serial(dir: &Path, name: &str) -> Serial {
        let c = chain(dir, name);
        let (_, x) = x509_parser::parse_x509_certificate(c[0].as_ref()).unwrap();
        Serial::from_der_content(x.raw_serial())
    }

    fn node(name: &str) -> RevokeTarget {
        RevokeTarget::Node(name.into())
    }

    #[test]
    fn revoke_numbers_each_list_one_higher_and_keeps_earlier_entries() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        issue(d.path(), "n1").unwrap();
        issue(d.path(), "n2").unwrap();
        let (s1, s2) = (leaf_serial(d.path(), "n1"), leaf_serial(d.path(), "n2"));
        let r = revoke(d.path(), &node("n1"), RevokeReason::KeyCompromise).unwrap();
        assert_eq!((r.number, r.entries), (1, 1));
        assert_eq!((r.added, r.already), (vec![s1.clone()], vec![]));
        let first = read_crls(d.path()).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(
            first[0].entries[0].reason,
            Some(RevokeReason::KeyCompromise)
        );
        let r = revoke(
            d.path(),
            &RevokeTarget::Serial(s2.clone()),
            RevokeReason::Superseded,
        )
        .unwrap();
        assert_eq!((r.number, r.entries), (2, 2));
        let crls = read_crls(d.path()).unwrap();
        assert_eq!(crls.len(), 1);
        assert_eq!(crls[0].number, 2);
        assert!(crls[0].revokes(&s1) && crls[0].revokes(&s2));
        assert_eq!(crls[0].entries[0], first[0].entries[0], "kept as it was");
        // Again: nothing written, the number stays.
        let text = fs::read_to_string(d.path().join(CA_CRL)).unwrap();
        let r = revoke(d.path(), &node("n1"), RevokeReason::Unspecified).unwrap();
        assert_eq!((r.added, r.already), (vec![], vec![s1.clone()]));
        assert_eq!(r.number, 2);
        assert_eq!(fs::read_to_string(d.path().join(CA_CRL)).unwrap(), text);
        // A re-issued node has a new serial, not on the list.
        issue(d.path(), "n1").unwrap();
        assert!(!crls[0].revokes(&leaf_serial(d.path(), "n1")));
    }

    /// A certificate over a new key for `name`, signed by the CA in `dir` as the controller
    /// signs a renewal (recorded, not written to `<name>.pem`); its serial.
    fn renewed(dir: &Path, name: &str, validity: Validity) -> Serial {
        let key = KeyPair::generate().unwrap();
        let raw = RawP256PublicKey::new(key.public_key_raw()).unwrap();
        CaSigner::load(dir)
            .unwrap()
            .sign(name, validity, &raw)
            .unwrap()
            .serial
    }

    fn hours(h: u64) -> Validity {
        Validity::for_duration(Duration::from_secs(h * 3600)).unwrap()
    }

    /// `revoke NODE` after renewals through the controller: the certificates the node (or
    /// whoever has its key) presents are the renewed ones, recorded in `ca.issued.log` and never
    /// written to `NODE.pem` in the CA directory. All of them go on the list with `NODE.pem`'s,
    /// in one list number; another node's and expired ones do not. (Only `NODE.pem`'s serial
    /// was revoked: the renewed certificates stayed valid, and renewed themselves forever.)
    #[test]
    fn revoking_a_node_revokes_every_unexpired_certificate_recorded_for_it() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        issue(d.path(), "n1").unwrap();
        let file = leaf_serial(d.path(), "n1");
        let (r1, r2) = (
            renewed(d.path(), "n1", hours(24)),
            renewed(d.path(), "n1", hours(24)),
        );
        let other = renewed(d.path(), "n2", hours(24));
        let now = SystemTime::now();
        let past = Validity::between(
            now - Duration::from_secs(7200),
            now - Duration::from_secs(60),
        );
        let expired = renewed(d.path(), "n1", past.unwrap());
        let (records, unreadable) = read_issued(d.path()).unwrap();
        assert_eq!(unreadable, 0);
        let recorded: Vec<_> = records
            .iter()
            .map(|r| (r.node.as_str(), &r.serial))
            .collect();
        assert_eq!(
            recorded,
            [
                ("n1", &file),
                ("n1", &r1),
                ("n1", &r2),
                ("n2", &other),
                ("n1", &expired)
            ]
        );

        let r = revoke(d.path(), &node("n1"), RevokeReason::KeyCompromise).unwrap();
        assert_eq!(r.added, [file.clone(), r1.clone(), r2.clone()]);
        assert!(r.already.is_empty() && r.other_ca.is_empty());
        assert_eq!((r.number, r.entries), (1, 3));
        let crl = read_crls(d.path()).unwrap().remove(0);
        for s in [&file, &r1, &r2] {
            assert!(crl.revokes(s), "{s}");
        }
        assert!(!crl.revokes(&other) && !crl.revokes(&expired));

        // Renewed again before the list reached the controller: the next revoke adds that one.
        let r3 = renewed(d.path(), "n1", hours(24));
        let r = revoke(d.path(), &node("n1"), RevokeReason::KeyCompromise).unwrap();
        assert_eq!((r.added, r.already.len(), r.number), (vec![r3], 3, 2));
        // A node without a NODE.pem here: the record alone names its certificates.
        assert!(!d.path().join("n2.pem").exists());
        let r = revoke(d.path(), &node("n2"), RevokeReason::Unspecified).unwrap();
        assert_eq!(r.added, [other]);
    }

    /// A renewal by the holder of a revoked certificate is refused, as soon as the list is in
    /// the CA directory (the controller enforces it at handshakes only once it has read it), and
    /// nothing is recorded; another certificate's holder still renews.
    #[test]
    fn a_renewal_for_a_revoked_certificate_is_refused() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        issue(d.path(), "n1").unwrap();
        issue(d.path(), "n2").unwrap();
        let (s1, s2) = (leaf_serial(d.path(), "n1"), leaf_serial(d.path(), "n2"));
        let ca = CaSigner::load(d.path()).unwrap();
        let key = KeyPair::generate().unwrap();
        revoke(d.path(), &node("n1"), RevokeReason::KeyCompromise).unwrap();
        let recorded = read_issued(d.path()).unwrap().0.len();
        let e = ca.sign_renewal("n1", hours(1), &key, &s1).unwrap_err();
        assert!(matches!(e, PkiError::Revoked { .. }), "{e}");
        assert!(e.to_string().contains(&s1.to_string()), "{e}");
        assert_eq!(read_issued(d.path()).unwrap().0.len(), recorded);
        ca.sign_renewal("n2", hours(1), &key, &s2).unwrap();
        assert_eq!(read_issued(d.path()).unwrap().0.len(), recorded + 1);
    }

    /// A record cut short by a crash (its certificate was never handed out) is skipped and
    /// counted, and the next record is whole on a line of its own.
    #[test]
    fn a_record_cut_short_is_skipped_and_the_next_one_is_whole() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        let first = renewed(d.path(), "n1", hours(1));
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(d.path().join(ISSUED))
            .unwrap();
        f.write_all(b"serial=7f0a node=n1 not_af").unwrap();
        drop(f);
        let next = renewed(d.path(), "n1", hours(1));
        let (records, unreadable) = read_issued(d.path()).unwrap();
        let serials: Vec<_> = records.iter().map(|r| &r.serial).collect();
        assert_eq!((serials, unreadable), (vec![&first, &next], 1));
        let r = revoke(d.path(), &node("n1"), RevokeReason::Unspecified).unwrap();
        assert_eq!((r.added, r.unreadable), (vec![first, next], 1));
    }

    /// During a CA rotation, a node's recorded certificates of the CA being rotated out (a
    /// controller not restarted yet signs with it) cannot go on the issuing CA's list: they are
    /// reported, and the issuing CA's are revoked.
    #[test]
    fn recorded_certificates_of_another_ca_are_reported_not_listed() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        issue(d.path(), "n1").unwrap();
        let old_file = leaf_serial(d.path(), "n1");
        let old_signer = CaSigner::load(d.path()).unwrap();
        rotate_ca(d.path()).unwrap();
        let key = KeyPair::generate().unwrap();
        let old_renewal = old_signer.sign("n1", hours(1), &key).unwrap().serial;
        // Only the old CA's: refused, as before.
        let e = revoke(d.path(), &node("n1"), RevokeReason::Unspecified).unwrap_err();
        assert!(
            e.to_string().contains("not issued by the issuing CA"),
            "{e}"
        );
        let new = renewed(d.path(), "n1", hours(1));
        let r = revoke(d.path(), &node("n1"), RevokeReason::Unspecified).unwrap();
        assert_eq!(r.added, [new]);
        assert_eq!(r.other_ca, [old_file, old_renewal]);
        // Once the old CA is retired, its certificates are accepted nowhere: not reported as
        // staying accepted until `retire-ca`.
        retire_ca(d.path()).unwrap();
        let r = revoke(d.path(), &node("n1"), RevokeReason::Unspecified).unwrap();
        assert!(r.other_ca.is_empty(), "{:?}", r.other_ca);
    }

    /// webpki matches a list to a certificate by issuer name, byte for byte: the list's issuer
    /// must be the issuing certificate's subject, as in the leaves it signed.
    #[test]
    fn a_revocation_list_names_its_issuer_exactly_as_the_leaves_do() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        issue(d.path(), "n1").unwrap();
        revoke(d.path(), &node("n1"), RevokeReason::Unspecified).unwrap();
        let c = chain(d.path(), "n1");
        let (_, leaf) = x509_parser::parse_x509_certificate(c[0].as_ref()).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(c[1].as_ref()).unwrap();
        // Straight from the file (read_crls would check the very things asserted here).
        let der =
            rustls::pki_types::CertificateRevocationListDer::from_pem_file(d.path().join(CA_CRL))
                .unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(der.as_ref()).unwrap();
        assert_eq!(crl.issuer().as_raw(), ca.subject().as_raw());
        assert_eq!(leaf.issuer().as_raw(), ca.subject().as_raw());
        crl.verify_signature(ca.public_key()).unwrap();
    }

    /// `retire-ca` drops every CA but the issuing one from `ca.pem`: a list of a retired CA
    /// left in `ca.crl.pem` would make the whole file fail its check against the new bundle
    /// (refused by `revoke`, by the controller and by every node with the new bundle in force,
    /// which keeps the lists it had or, restarted, starts with no list at all).
    #[test]
    fn retire_ca_drops_the_retired_cas_lists_and_keeps_the_issuing_cas() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        issue(d.path(), "old").unwrap();
        revoke(d.path(), &node("old"), RevokeReason::KeyCompromise).unwrap();
        rotate_ca(d.path()).unwrap();
        issue(d.path(), "new").unwrap();
        revoke(d.path(), &node("new"), RevokeReason::KeyCompromise).unwrap();
        assert_eq!(read_crls(d.path()).unwrap().len(), 2);
        let new = leaf_serial(d.path(), "new");
        assert_eq!(retire_ca(d.path()).unwrap(), 1);
        let crls = read_crls(d.path()).unwrap();
        assert_eq!(crls.len(), 1);
        assert_eq!((crls[0].ca, crls[0].number), (0, 1));
        assert!(crls[0].revokes(&new));
        issue(d.path(), "n3").unwrap();
        let r = revoke(d.path(), &node("n3"), RevokeReason::Unspecified).unwrap();
        assert_eq!((r.number, r.entries), (2, 2));
        // Only the retired CA had a list: the file holds an empty list of the issuing CA (one
        // a node copies over its own, whose retired list the pruned bundle refuses), and the
        // next revocation follows it.
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        issue(d.path(), "old").unwrap();
        revoke(d.path(), &node("old"), RevokeReason::KeyCompromise).unwrap();
        rotate_ca(d.path()).unwrap();
        retire_ca(d.path()).unwrap();
        let crls = read_crls(d.path()).unwrap();
        assert_eq!(crls.len(), 1);
        assert_eq!(
            (crls[0].ca, crls[0].number, crls[0].entries.len()),
            (0, 1, 0)
        );
        issue(d.path(), "n3").unwrap();
        let r = revoke(d.path(), &node("n3"), RevokeReason::Unspecified).unwrap();
        assert_eq!((r.number, r.entries), (2, 1));
    }

    /// Leaves signed before `CaSigner` took its issuer from the CA certificate (it rebuilt it
    /// from `ca_params`) name their issuer byte for byte as a list signed now does, so a list
    /// revokes them too.
    #[test]
    fn a_list_revokes_leaves_signed_by_the_old_fixed_params_issuer() {
        use rustls::server::WebPkiClientVerifier;
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        let ca = CaFiles::read(d.path()).unwrap();
        let ca_pem = ca.bundle[ca.issuing].pem.clone();
        let ca_der = ca.bundle[ca.issuing].der.clone();
        let old_issuer = Issuer::new(ca_params(), ca.key);
        let key = KeyPair::generate().unwrap();
        let leaf = node_params("old", Validity::for_duration(DEFAULT_VALIDITY).unwrap())
            .unwrap()
            .signed_by(&key, &old_issuer)
            .unwrap();
        write_node_files(
            d.path(),
            "old",
            &key.serialize_pem(),
            &format!("{}{ca_pem}", leaf.pem()),
        )
        .unwrap();
        revoke(d.path(), &node("old"), RevokeReason::KeyCompromise).unwrap();
        let crl = read_crls(d.path()).unwrap().remove(0).der;
        let (_, parsed) = x509_parser::parse_x509_crl(crl.as_ref()).unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(leaf.der().as_ref()).unwrap();
        assert_eq!(parsed.issuer().as_raw(), x.issuer().as_raw());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_der.clone()).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let v = WebPkiClientVerifier::builder_with_provider(std::sync::Arc::new(roots), provider)
            .with_crls([crl])
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
            .build()
            .unwrap();
        let got = v.verify_client_cert(leaf.der(), &[ca_der], rustls::pki_types::UnixTime::now());
        assert!(
            matches!(
                got,
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Revoked
                ))
            ),
            "{got:?}"
        );
    }

    /// Revocations from several threads at once (as from several `tasman pki revoke` runs):
    /// each takes its turn, so none is lost and the numbers count every one.
    #[test]
    fn concurrent_revocations_are_all_kept() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        let threads: Vec<_> = (0u8..4)
            .map(|t| {
                let dir = d.path().to_path_buf();
                std::thread::spawn(move || {
                    for i in 0u8..5 {
                        let serial =
                            RevokeTarget::Serial(Serial::from_der_content(&[t + 1, i + 1]));
                        revoke(&dir, &serial, RevokeReason::Unspecified).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let crls = read_crls(d.path()).unwrap();
        assert_eq!(crls.len(), 1);
        assert_eq!(crls[0].entries.len(), 20, "every revocation kept");
        assert_eq!(crls[0].number, 20);
    }

    #[test]
    fn revoke_refuses_a_directory_without_a_ca_and_a_foreign_certificate() {
        let d = tempfile::tempdir().unwrap();
        let e = revoke(d.path(), &node("n1"), RevokeReason::Unspecified).unwrap_err();
        assert!(matches!(e, PkiError::NoCa { .. }), "{e}");
        assert!(!d.path().join(CA_CRL).exists());
        // A certificate of the CA being rotated out is not the issuing CA's to revoke.
        init(d.path()).unwrap();
        issue(d.path(), "n1").unwrap();
        rotate_ca(d.path()).unwrap();
        let e = revoke(d.path(), &node("n1"), RevokeReason::Unspecified).unwrap_err();
        assert!(
            e.to_string().contains("not issued by the issuing CA"),
            "{e}"
        );
        assert!(!d.path().join(CA_CRL).exists());
        let e = revoke(d.path(), &node("n9"), RevokeReason::Unspecified).unwrap_err();
        assert!(e.to_string().contains("no certificate of n9"), "{e}");
    }

    #[test]
    fn crls_signed_outside_the_bundle_or_twice_for_one_ca_are_refused() {
        let (d, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for x in [&d, &other] {
            init(x.path()).unwrap();
            issue(x.path(), "n1").unwrap();
            revoke(x.path(), &node("n1"), RevokeReason::Unspecified).unwrap();
        }
        let ours = fs::read_to_string(d.path().join(CA_CRL)).unwrap();
        let theirs = fs::read_to_string(other.path().join(CA_CRL)).unwrap();
        let bundle: Vec<_> = bundle(d.path()).into_iter().map(|c| c.der).collect();
        assert_eq!(parse_crls(&ours, &bundle).unwrap().len(), 1);
        // Same CA name, other key: the signature decides.
        let e = parse_crls(&theirs, &bundle).unwrap_err();
        assert!(e.contains("not signed by a CA of the trust bundle"), "{e}");
        let e = parse_crls(&format!("{ours}{ours}"), &bundle).unwrap_err();
        assert!(e.contains("at most one list per CA"), "{e}");
        assert!(parse_crls("", &bundle).unwrap_err().contains("no CRL"));
        let mangled = ours.replacen("MII", "MIJ", 1);
        assert!(parse_crls(&mangled, &bundle).is_err());
        // And `revoke` will not sign over a file it cannot trust.
        fs::write(d.path().join(CA_CRL), &theirs).unwrap();
        let e = revoke(d.path(), &node("n1"), RevokeReason::Unspecified).unwrap_err();
        assert!(matches!(e, PkiError::BadCrl { .. }), "{e}");
    }

    /// Every public writer of a CA directory syncs the directory after each name it changed
    /// (a rename or a removal), before it returns: a power cut after `revoke` reported success
    /// could otherwise bring back the list without that certificate.
    #[test]
    fn every_writer_syncs_the_directory_after_each_rename() {
        use crate::durable::record::{assert_every_change_synced as check, take};
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("pki");
        take();
        init(&dir).unwrap();
        check("init");
        issue(&dir, "n1").unwrap();
        check("issue");
        revoke(&dir, &node("n1"), RevokeReason::KeyCompromise).unwrap();
        check("revoke");
        let crl = fs::read_to_string(dir.join(CA_CRL)).unwrap();
        write_crl(&dir, &crl).unwrap();
        check("write_crl");
        rotate_ca(&dir).unwrap();
        check("rotate_ca");
        issue(&dir, "n2").unwrap();
        revoke(&dir, &node("n2"), RevokeReason::KeyCompromise).unwrap();
        take();
        // The retired CA's list goes, the issuing CA's is written again.
        retire_ca(&dir).unwrap();
        check("retire_ca");
        // Only the retired CA had a list: the file holds an empty list of the issuing CA.
        fs::remove_file(dir.join(CA_KEY_OLD)).unwrap();
        rotate_ca(&dir).unwrap();
        take();
        retire_ca(&dir).unwrap();
        check("retire_ca (an empty list)");
        let crls = read_crls(&dir).unwrap();
        assert_eq!((crls.len(), crls[0].entries.len()), (1, 0));
    }

    #[test]
    fn serials_parse_from_hex_with_or_without_colons() {
        let s: Serial = "0x00:1f:a3".parse().unwrap();
        assert_eq!(s.as_bytes(), &[0x1f, 0xa3]);
        assert_eq!(s.to_string(), "1fa3");
        assert_eq!("1fa3".parse::<Serial>().unwrap(), s);
        assert_eq!("fa3".parse::<Serial>().unwrap().as_bytes(), &[0x0f, 0xa3]);
        for bad in ["", "00", "xyz", &"ff".repeat(21)] {
            assert!(bad.parse::<Serial>().is_err(), "{bad:?}");
        }
        assert_eq!(
            "key-compromise".parse::<RevokeReason>(),
            Ok(RevokeReason::KeyCompromise)
        );
        assert!(
            "lost"
                .parse::<RevokeReason>()
                .unwrap_err()
                .contains("key-compromise")
        );
    }

    #[test]
    fn validity_refuses_zero_absurd_and_backwards() {
        assert!(Validity::for_duration(Duration::ZERO).is_err());
        assert!(Validity::for_duration(MAX_VALIDITY + Duration::from_secs(1)).is_err());
        let v = Validity::for_duration(Duration::from_secs(90 * 86_400)).unwrap();
        assert!(v.not_before < SystemTime::now() && v.not_after > SystemTime::now());
        let now = SystemTime::now();
        assert!(Validity::between(now, now).is_err());
    }

    #[test]
    fn issued_certificate_carries_the_validity() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        let day = Duration::from_secs(86_400);
        let v = Validity::for_duration(30 * day).unwrap();
        let (c, _) = issue_with(d.path(), "n1", v).unwrap();
        let pem = fs::read(c).unwrap();
        let leaf = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
            .next()
            .unwrap()
            .unwrap();
        let got = crate::tls::not_after(&leaf).unwrap();
        let want = v
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert_eq!(got, want);
    }

    #[test]
    fn bad_names_are_refused() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        for n in ["", "../x", "a b", "*.x", "-a", &"x".repeat(64)] {
            assert!(
                matches!(issue(d.path(), n), Err(PkiError::BadName { .. })),
                "{n}"
            );
        }
    }

    /// `ca`'s files are the CA's (`ca.pem`, `ca.key`), `ca.crl`'s its list (`ca.crl.pem`):
    /// issuing, revoking or installing for such a name is refused and leaves every CA file as
    /// it was (`issue ca` renamed a new key over `ca.key`: the CA was gone).
    #[test]
    fn names_whose_files_are_the_cas_are_refused_and_the_ca_is_untouched() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        issue(d.path(), "n1").unwrap();
        revoke(d.path(), &node("n1"), RevokeReason::KeyCompromise).unwrap();
        let ca_files = [CA_CERT, CA_KEY, CA_CRL];
        let read = || ca_files.map(|f| fs::read(d.path().join(f)).unwrap());
        let before = read();
        for n in ["ca", "CA", "ca.crl", "Ca.Crl", "ca.key", "ca.x"] {
            let e = issue(d.path(), n).unwrap_err();
            assert!(matches!(e, PkiError::BadName { .. }), "{n}: {e}");
            assert!(e.to_string().contains("reserved"), "{n}: {e}");
            let e = revoke(d.path(), &node(n), RevokeReason::Unspecified).unwrap_err();
            assert!(matches!(e, PkiError::BadName { .. }), "{n}: {e}");
            let e = write_node_files(d.path(), n, "key", "chain").unwrap_err();
            assert!(matches!(e, PkiError::BadName { .. }), "{n}: {e}");
            assert_eq!(read(), before, "{n}: the CA's files are untouched");
        }
        // Still the CA it was: it signs, and its key verifies what it signed before.
        CaSigner::load(d.path()).unwrap();
        issue(d.path(), "n2").unwrap();
        assert_eq!(chain(d.path(), "n2")[1], chain(d.path(), "n1")[1]);
        // Names that merely start with the letters are nodes like any other.
        for n in ["cab", "ca-1", "controller"] {
            issue(d.path(), n).unwrap();
        }
    }

    /// A node's key made where it runs: the CA's host certifies its public key and writes the
    /// certificate only; the node's directory, with the CA's certificate, is an identity.
    #[test]
    fn a_key_made_on_the_node_is_certified_without_leaving_it() {
        let (ca_dir, node_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        init(ca_dir.path()).unwrap();
        let (key, public) = keygen(node_dir.path(), "n1").unwrap();
        assert_eq!(key, node_dir.path().join("n1.key"));
        assert_eq!(public, node_dir.path().join("n1.pub"));
        assert!(matches!(
            keygen(node_dir.path(), "n1"),
            Err(PkiError::KeyExists { .. })
        ));
        let text = std::fs::read_to_string(&public).unwrap();
        let raw = read_public_key(&public, &text).unwrap();
        let v = Validity::for_duration(Duration::from_secs(3600)).unwrap();
        let cert = issue_for_key(ca_dir.path(), "n1", v, &raw).unwrap();
        assert!(
            !ca_dir.path().join("n1.key").exists(),
            "no key on the CA's host"
        );
        std::fs::copy(&cert, node_dir.path().join("n1.pem")).unwrap();
        std::fs::copy(ca_dir.path().join(CA_CERT), node_dir.path().join(CA_CERT)).unwrap();
        let id = crate::tls::TlsIdentity::load(node_dir.path(), "n1").unwrap();
        assert!(crate::tls::CertResolver::new(&id).is_ok());
        // Not a P-256 public key: refused, naming the file.
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let e = read_public_key(&public, &p384.public_key_pem()).unwrap_err();
        assert!(e.to_string().contains("P-256"), "{e}");
        assert!(e.to_string().contains("n1.pub"), "{e}");
        let e = read_public_key(&public, &KeyPair::generate().unwrap().serialize_pem());
        assert!(matches!(e, Err(PkiError::BadKey { .. })), "{e:?}");
    }

    #[test]
    fn a_raw_public_key_is_certified_for_the_given_name_only() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        let ca = CaSigner::load(d.path()).unwrap();
        let key = KeyPair::generate().unwrap();
        let raw = RawP256PublicKey::new(key.public_key_raw()).unwrap();
        let v = Validity::for_duration(Duration::from_secs(3600)).unwrap();
        let chain = ca.sign("n1", v, &raw).unwrap().chain_pem;
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
        // The key the router kept and the certificate it got back make a pair a resolver takes.
        write_node_files(d.path(), "n1", &key.serialize_pem(), &chain).unwrap();
        let id = crate::tls::TlsIdentity::load(d.path(), "n1").unwrap();
        let r = crate::tls::CertResolver::new(&id).unwrap();
        assert!(r.check(&id).is_ok());
        assert!(matches!(
            ca.sign("../n1", v, &raw),
            Err(PkiError::BadName { .. })
        ));
    }

    /// Two certificates over one public key (a router asking twice with one key, or a node
    /// asking with another's) have different serials, each positive and at most 16 bytes: the
    /// serial was a hash of the key, so revoking one revoked the other.
    #[test]
    fn two_certificates_over_one_key_have_different_serials() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        let ca = CaSigner::load(d.path()).unwrap();
        let key = KeyPair::generate().unwrap();
        let raw = RawP256PublicKey::new(key.public_key_raw()).unwrap();
        let v = Validity::for_duration(Duration::from_secs(3600)).unwrap();
        let serial = |chain: &str| {
            let leaf = CertificateDer::pem_slice_iter(chain.as_bytes())
                .next()
                .unwrap()
                .unwrap();
            let (_, x) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
            x.raw_serial().to_vec()
        };
        let a = serial(&ca.sign("n1", v, &raw).unwrap().chain_pem);
        let b = serial(&ca.sign("n1", v, &raw).unwrap().chain_pem);
        let c = serial(&ca.sign("n2", v, &raw).unwrap().chain_pem);
        assert!(a != b && b != c && a != c, "{a:?} {b:?} {c:?}");
        for s in [a, b, c] {
            // The DER integer's content: no sign byte (the top bit is clear), 16 bytes at most.
            assert!(s.len() <= SERIAL_BYTES && s[0] < 0x80, "{s:?}");
        }
    }

    #[test]
    fn bad_public_key_bytes_are_refused() {
        let key = KeyPair::generate().unwrap();
        let good = key.public_key_raw().to_vec();
        assert!(RawP256PublicKey::new(&good).is_ok());
        let mut compressed = good.clone();
        compressed[0] = 0x02;
        for bad in [
            Vec::new(),
            vec![0x04],
            good[..64].to_vec(),
            [good.clone(), vec![0]].concat(),
            compressed,
            key.subject_public_key_info(),
            // 65 bytes, 0x04 first, off the curve (the certificate was signed).
            [vec![0x04], vec![0x01; 64]].concat(),
            [&good[..64], &[good[64] ^ 1]].concat(),
        ] {
            assert!(RawP256PublicKey::new(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn renewal_is_due_at_70_percent_of_the_lifetime_clamped_to_10s_and_24h_after_its_start() {
        let day = 86_400;
        // 30 days: 70 % is 21 days in, more than 24 h: after 24 h (it renewed on day 29).
        assert_eq!(renew_at(0, 30 * day), day);
        assert_eq!(renew_at(0, 365 * day), day);
        // 24 h (Linkerd's default lifetime): at 70 %.
        assert_eq!(renew_at(1_000, 1_000 + day), 1_000 + day * 7 / 10);
        // One minute: at 42 s.
        assert_eq!(renew_at(100, 160), 142);
        // 12 s: 70 % would be 8.4 s in: 10 s in.
        assert_eq!(renew_at(100, 112), 110);
        // Shorter than 10 s, or backwards: at expiry (already due).
        assert_eq!(renew_at(100, 105), 105);
        assert_eq!(renew_at(100, 50), 50);
    }
}
