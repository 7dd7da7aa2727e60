//! A small private PKI for a fabric: one CA per fabric, one certificate per node.
//!
//! `init(dir)` writes `ca.pem` and `ca.key` (valid 2024..2124); `issue(dir, name)` writes
//! `<name>.pem` (the leaf, then the CA) and `<name>.key`, signed by that CA, with the name as the
//! only DNS SAN, valid for [`DEFAULT_VALIDITY`] from now (`issue_with` takes another
//! [`Validity`]). A node's identity is that name: it must be a node id of the topology (or
//! `controller`). Files are written to a temporary name and renamed into place, so a router
//! reloading them (see `tls::CertResolver`) never reads a half-written file.
//!
//! The CA's issuer parameters are deterministic (same distinguished name and key usages every
//! time), so `issue` rebuilds the issuer from `ca.key` alone and never parses `ca.pem`. Two CAs
//! made by two `init` runs share a name but not a key: a leaf from one fails signature checks
//! against the other.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// File names inside a PKI directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists (refusing to overwrite a CA; remove it first)")]
    Exists { path: PathBuf },
    #[error("{name:?} is not a valid node name (letters, digits, '-', '.', at most 63 bytes)")]
    BadName { name: String },
    #[error("{path}: not a usable key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("invalid validity period: {0}")]
    BadValidity(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether `name` can be a node identity (a DNS name label sequence, no wildcards).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
        && !name.contains("..")
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
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    time::OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|e| PkiError::BadValidity(e.to_string()))
}

/// Writes `path` through a temporary file renamed into place (readers see the old or the new
/// file, never a partial one).
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let _ = secret;
    let mut f = opts.open(&tmp).map_err(io_err(&tmp))?;
    f.write_all(contents.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Creates `dir` (if needed) and writes a new CA into it. Refuses to overwrite an existing CA.
pub fn init(dir: &Path) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(PkiError::Exists { path: p.clone() });
        }
    }
    let key = KeyPair::generate()?;
    let cert = ca_params().self_signed(&key)?;
    write_file(&key_path, &key.serialize_pem(), true)?;
    write_file(&cert_path, &cert.pem(), false)?;
    Ok(())
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
    if !valid_name(name) {
        return Err(PkiError::BadName {
            name: name.to_string(),
        });
    }
    let key_path = dir.join(CA_KEY);
    let ca_pem_path = dir.join(CA_CERT);
    let ca_key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
    let ca_pem = fs::read_to_string(&ca_pem_path).map_err(io_err(&ca_pem_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::BadKey {
        path: key_path.clone(),
        reason: e.to_string(),
    })?;
    let issuer = Issuer::new(ca_params(), ca_key);

    let mut params = CertificateParams::new(vec![name.to_string()])?;
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
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;

    let cert_path = dir.join(format!("{name}.pem"));
    let leaf_key_path = dir.join(format!("{name}.key"));
    write_file(&leaf_key_path, &key.serialize_pem(), true)?;
    let mut chain = cert.pem();
    chain.push_str(&ca_pem);
    write_file(&cert_path, &chain, false)?;
    Ok((cert_path, leaf_key_path))
}

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
}
