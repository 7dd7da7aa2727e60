//! Renewal of node certificates through the controller (opt-in: `tasman controller --ca-dir`).
//!
//! A router whose certificate is due ([`router::pki::renew_at`]) sends `Renew` with the raw
//! public key of a key it just made and a signature by that key over the session's TLS binding
//! ([`pki::prove_possession`]: proof that it holds the key); the controller answers with a certificate over that key
//! for the node its session authenticated (never a name the router states), signed by the
//! fabric CA, valid for [`NodeIssuer`]'s lifetime, or with `RenewRefused` and why. The
//! certificate the session presented must be due for renewal ([`pki::renew_at`], with
//! [`due_slack`]) and not revoked in the CA directory's list, so a stolen key renews no faster
//! than its certificate's schedule and not at all once revoked; every certificate issued is
//! recorded in the CA directory ([`pki::ISSUED`]), where `tasman pki revoke NODE` finds it. A
//! node gets at most one answer per [`MIN_INTERVAL`], across its sessions (requests in between
//! are refused). With the CA, the controller renews its own certificate on the same schedule
//! ([`NodeIssuer::renew_own`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;

use router::control::proto::ToRouter;
use router::pki::{self, CaSigner, RawP256PublicKey, Validity};
use router::tls::{self, CertResolver, Renewal};
use tokio::sync::watch;

/// A `Renew` as its session read it: the raw public key asked for, the router's proof that it
/// holds its private half ([`pki::prove_possession`]), and the binding of the session it came
/// on, which the proof must sign (`None`: the session's TLS exported none).
#[derive(Debug, Clone)]
pub struct Request {
    pub public_key: Vec<u8>,
    pub proof: Vec<u8>,
    pub binding: Option<pki::SessionBinding>,
}

/// A node may ask for a certificate at most this often (over all its sessions).
pub const MIN_INTERVAL: Duration = Duration::from_secs(10);
/// The most a renewal may come before the presented certificate is due ([`due_slack`]).
pub const MAX_DUE_SLACK: Duration = Duration::from_secs(300);

/// How early (seconds) a renewal of a certificate valid from `not_before` to `not_after` may
/// come before [`pki::renew_at`]: a tenth of its lifetime, at most [`MAX_DUE_SLACK`] (clocks
/// of the router and the controller disagree a little; a 24 h certificate may renew 5 minutes
/// early, one of the shortest, 10 minutes and the 5 minutes of backdating, 90 s early).
pub fn due_slack(not_before: i64, not_after: i64) -> i64 {
    (not_after.saturating_sub(not_before) / 10).clamp(0, MAX_DUE_SLACK.as_secs() as i64)
}
/// How long an issued certificate is valid by default (Linkerd's workload certificates: 24 h).
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// The shortest validity `tasman controller --issue-valid-for` accepts.
pub const MIN_VALIDITY: Duration = Duration::from_secs(600);

/// Signs renewed node certificates, or refuses to (no CA given).
#[derive(Debug)]
pub struct NodeIssuer {
    ca: Option<CaSigner>,
    valid_for: Duration,
    /// The CA directory, whose `ca.crl.pem` routers get ([`NodeIssuer::watch_crl`]).
    ca_dir: Option<PathBuf>,
    /// The revocation lists routers get now (PEM), once the controller adopted them itself.
    crl: watch::Sender<Option<Arc<str>>>,
    /// What the controller trusts now ([`NodeIssuer::sign_within`]): the signing CA must stay in
    /// its bundle in force.
    trust: std::sync::OnceLock<Arc<CertResolver>>,
    /// When each node last asked ([`MIN_INTERVAL`]): per node, not per session, so that
    /// reconnecting does not reset it.
    last_asked: Mutex<HashMap<String, Instant>>,
    /// One answer at a time off the async workers ([`NodeIssuer::signing`]): a CA directory that
    /// hangs (a hung mount, a `tasman pki` command suspended holding its lock) holds one
    /// blocking thread, not one more for every request.
    signing: Arc<tokio::sync::Semaphore>,
}

/// How long a renewal's answer may take, waiting for the one before it included, before it is
/// refused as busy: a session answers it in its loop, which sends nothing meanwhile (past the
/// router's 20 s of silence, the router drops the session).
pub const SIGN_WAIT: Duration = Duration::from_secs(5);

impl NodeIssuer {
    /// The permit to answer a request off the async workers, by `deadline`; `None`: the
    /// answer before it still runs (the CA directory hangs).
    pub async fn signing(
        &self,
        deadline: tokio::time::Instant,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        tokio::time::timeout_at(deadline, self.signing.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }

    /// Refuses every request: the controller holds no CA.
    pub fn disabled() -> Self {
        NodeIssuer {
            ca: None,
            valid_for: DEFAULT_VALIDITY,
            ca_dir: None,
            crl: watch::Sender::new(None),
            trust: std::sync::OnceLock::new(),
            last_asked: Mutex::default(),
            signing: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }

    /// Issues certificates valid for `valid_for` from the CA in `ca_dir` (`ca.pem`, `ca.key`).
    pub fn load(ca_dir: &Path, valid_for: Duration) -> Result<Self, pki::PkiError> {
        // The same bounds as `tasman pki issue --valid-for` (zero and over 10 years refused).
        Validity::for_duration(valid_for)?;
        Ok(NodeIssuer {
            ca: Some(CaSigner::load(ca_dir)?),
            valid_for,
            ca_dir: Some(ca_dir.to_path_buf()),
            crl: watch::Sender::new(None),
            trust: std::sync::OnceLock::new(),
            last_asked: Mutex::default(),
            signing: Arc::new(tokio::sync::Semaphore::new(1)),
        })
    }

    /// Signs only while the issuing CA is in the bundle `cert` has in force. The CA key is read
    /// once at start, but the bundle is re-read live: after `tasman pki retire-ca` removed the CA
    /// this controller started with, every certificate it signed would be refused, so it refuses
    /// to sign instead (routers keep their certificates and ask again), and says to restart it
    /// with the rotated `--ca-dir`.
    pub fn sign_within(&self, cert: Arc<CertResolver>) {
        let _ = self.trust.set(cert);
    }

    /// Why signing is off now, if it is: the signing CA left the bundle in force.
    fn untrusted_ca(&self) -> Option<String> {
        let (ca, cert) = (self.ca.as_ref()?, self.trust.get()?);
        (!cert.trusted().contains(ca.ca_cert())).then(|| {
            "the controller's signing CA (--ca-dir, read at start) is no longer in its trust \
             bundle (ca.pem, e.g. after `tasman pki retire-ca`): restart it with the rotated \
             --ca-dir"
                .to_string()
        })
    }

    /// The issuing CA certificate signing renewals, if any.
    pub fn ca_cert(&self) -> Option<&rustls::pki_types::CertificateDer<'static>> {
        self.ca.as_ref().map(|c| c.ca_cert())
    }

    /// The answer to `req` on `node`'s session, which presented `presented`, at `now` (the rate
    /// limit's clock: every request that passes the checks before it counts, answered or
    /// refused after). Blocking (the CA directory's lock, its list and the record's write).
    pub fn answer(
        &self,
        node: &str,
        req: &Request,
        presented: &CertificateDer<'_>,
        now: Instant,
    ) -> ToRouter {
        let refuse = |reason: String| {
            tracing::warn!(node, "certificate renewal refused: {reason}");
            ToRouter::RenewRefused { reason }
        };
        if node.eq_ignore_ascii_case(router::control::client::CONTROLLER_NAME) {
            // Only a stored topology from before the rule that reserves the id can have such a
            // node: its certificate would be a controller identity to every router.
            return refuse(format!(
                "{node:?} is the controller's certificate name, reserved: rename the node in the \
                 topology"
            ));
        }
        let Some(ca) = &self.ca else {
            return refuse(
                "certificate renewal is not enabled on this controller (it runs without \
                 --ca-dir); issue certificates with `tasman pki issue`"
                    .into(),
            );
        };
        if let Some(why) = self.untrusted_ca() {
            return refuse(why);
        }
        let (Some(serial), Ok(nb), Ok(na)) = (
            pki::serial_of(presented),
            tls::not_before(presented),
            tls::not_after(presented),
        ) else {
            return refuse("the certificate this session presented does not parse".into());
        };
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        // A session outlives the certificate it presented. Expired, it proves nothing any more
        // (a revocation lists unexpired certificates only): the router reconnects with the
        // certificate it holds now, and asks on that session.
        if unix_now >= na {
            let at = UNIX_EPOCH + Duration::from_secs(na.max(0) as u64);
            return refuse(format!(
                "the certificate this session presented (serial {serial}) expired at {}: \
                 reconnect with the current one",
                humantime::format_rfc3339_seconds(at)
            ));
        }
        // The router asks once its certificate is due: asked earlier, it is not the router's
        // schedule, and a stolen key must not renew itself faster than that.
        let due = pki::renew_at(nb, na);
        if unix_now + due_slack(nb, na) < due {
            let at = UNIX_EPOCH + Duration::from_secs(due.max(0) as u64);
            return refuse(format!(
                "not due: the certificate presented (serial {serial}) is due for renewal at {} \
                 (70 % of its lifetime, at most 24 h after it became valid), ask then",
                humantime::format_rfc3339_seconds(at)
            ));
        }
        // The node's turn is spent only by a request that got this far: one refused above (not
        // due, reserved name, no CA) costs nothing, so a stolen key asking early cannot spend the
        // real router's turn.
        if let Err(wait) = self.take_turn(node, now) {
            return refuse(format!(
                "too soon: one renewal per {}s per node (ask again in {}s)",
                MIN_INTERVAL.as_secs(),
                wait.as_secs().max(1)
            ));
        }
        let key = match RawP256PublicKey::new(&req.public_key) {
            Ok(k) => k,
            Err(e) => return refuse(e),
        };
        // The router holds the key: else its name could be certified over another's key (read
        // from that node's certificate), which would then present the certificate as it.
        let Some(binding) = &req.binding else {
            return refuse("this session's TLS exports no binding to check a proof on".into());
        };
        if let Err(e) = key.verify_possession(binding, &req.proof) {
            return refuse(e);
        }
        let validity = match Validity::for_duration(self.valid_for) {
            Ok(v) => v,
            Err(e) => return refuse(e.to_string()),
        };
        match ca.sign_renewal(node, validity, &key, &serial) {
            Ok(pki::Signed { chain_pem, serial }) => {
                let not_after = humantime::format_rfc3339_seconds(validity.not_after);
                tracing::info!(node, %serial, %not_after, "issued a renewed node certificate");
                ToRouter::Certificate { chain_pem }
            }
            Err(e @ pki::PkiError::Revoked { .. }) => refuse(e.to_string()),
            Err(e) => refuse(format!("signing failed: {e}")),
        }
    }

    /// Whether `node` may ask at `now` (and spends its turn); else how long until it may.
    fn take_turn(&self, node: &str, now: Instant) -> Result<(), Duration> {
        let mut last = self.last_asked.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = last.get(node) {
            let since = now.saturating_duration_since(*t);
            if since < MIN_INTERVAL {
                return Err(MIN_INTERVAL - since);
            }
        }
        last.insert(node.to_string(), now);
        Ok(())
    }
}

impl NodeIssuer {
    /// The revocation lists to send routers (PEM; `None`: none yet), changing when they do.
    pub fn crl(&self) -> watch::Receiver<Option<Arc<str>>> {
        self.crl.subscribe()
    }

    /// Reads the CA directory's `ca.crl.pem` (where `tasman pki revoke` writes) at once and then
    /// every `every` (zero: only at start). A new file is adopted by the controller first, as a
    /// router adopts one ([`tls::install_crl`] on `cert`: checked against the controller's bundle,
    /// no rollback, written to its TLS directory), and only then handed to routers' sessions: a
    /// list the controller refuses never reaches a router. Returns at once without a CA
    /// directory; otherwise runs until aborted.
    pub async fn watch_crl(self: Arc<Self>, cert: Arc<CertResolver>, every: Duration) {
        let Some(dir) = self.ca_dir.clone() else {
            return;
        };
        let path = dir.join(pki::CA_CRL);
        let mut last: Option<String> = None;
        loop {
            self.send_if_new(&cert, &path, &mut last).await;
            if every.is_zero() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    }

    /// One look of [`NodeIssuer::watch_crl`] at `path`: a text other than `last` (the last one
    /// sent) is adopted by the controller and, unless refused, sent to routers.
    async fn send_if_new(&self, cert: &Arc<CertResolver>, path: &Path, last: &mut Option<String>) {
        let text = match tokio::fs::read_to_string(path).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot read the revocation lists: {e}");
                return;
            }
        };
        if last.as_deref() == Some(text.as_str()) {
            return;
        }
        // The CA directory is the controller's TLS directory (`--tls-dir pki --ca-dir pki`, or
        // `<state>/pki`): the file is the controller's own list, judged as its reload tick
        // judges it (one memory of a refusal: judged as lists installed as well, a refused file
        // was counted and logged twice).
        let own = cert.dir().is_some_and(|d| same_dir(d, path.parent()));
        let (c, t) = (cert.clone(), text.clone());
        let got = tokio::task::spawn_blocking(move || match own {
            true => c.reload_crl(),
            false => tls::install_crl(&c, &t),
        })
        .await;
        match got {
            // Looked at again next time (logged and counted once): refused against the bundle
            // in force, it may check out once the controller adopts the next `ca.pem` (a list
            // of a CA it does not trust yet).
            Ok(tls::CrlReload::Refused(_)) | Err(_) => {}
            Ok(_) => {
                *last = Some(text.clone());
                tracing::info!(path = %path.display(), "sending the revocation lists to routers");
                self.crl.send_replace(Some(text.into()));
            }
        }
    }
}

/// Whether `a` and `b` are one directory (by their canonical paths; as written when either
/// cannot be resolved).
fn same_dir(a: &Path, b: Option<&Path>) -> bool {
    let Some(b) = b else { return false };
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The first wait after the controller failed to renew its own certificate; it doubles up to
/// [`OWN_RETRY_MAX`].
pub const OWN_RETRY_MIN: Duration = Duration::from_secs(30);
/// The longest wait between attempts to renew the controller's own certificate.
pub const OWN_RETRY_MAX: Duration = Duration::from_secs(600);

impl NodeIssuer {
    /// Renews the controller's own certificate (`cert`, loaded from its TLS directory) with the
    /// CA, on the routers' schedule ([`pki::renew_at`]: at 70 % of its lifetime, but 10 s to 24 h
    /// after it became valid), for [`NodeIssuer`]'s lifetime. Returns at once without a CA or when the
    /// certificate was not loaded from files; otherwise runs until aborted.
    pub async fn renew_own(self: Arc<Self>, cert: Arc<CertResolver>) {
        if self.ca.is_none() || cert.dir().is_none() {
            return;
        }
        let mut backoff = OWN_RETRY_MIN;
        // No attempt before this: a renewal holds the next back by OWN_RETRY_MIN, as on a router,
        // so a lifetime so short that a fresh certificate is due at once (under ~128 s, with the
        // 5 min backdating) cannot make this loop renew without pause.
        let mut not_before: Option<tokio::time::Instant> = None;
        loop {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let wait = pki::renew_at(cert.not_before(), cert.not_after()) - now;
            if wait > 0 {
                // Looked at again at least every minute: a reload may bring another certificate.
                let wait = Duration::from_secs(wait as u64).min(Duration::from_secs(60));
                tokio::time::sleep(wait).await;
                continue;
            }
            if let Some(t) = not_before.take()
                && t > tokio::time::Instant::now()
            {
                tokio::time::sleep_until(t).await;
                continue;
            }
            let (me, c) = (self.clone(), cert.clone());
            let res = tokio::task::spawn_blocking(move || me.renew_own_now(&c))
                .await
                .unwrap_or_else(|e| Err((Renewal::Invalid, e.to_string())));
            match res {
                Ok(not_after) => {
                    cert.count_renewal(Renewal::Renewed);
                    let not_after = UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64);
                    tracing::info!(not_after = %humantime::format_rfc3339_seconds(not_after),
                        "renewed the controller's own certificate");
                    backoff = OWN_RETRY_MIN;
                    not_before = Some(tokio::time::Instant::now() + OWN_RETRY_MIN);
                }
                Err((how, e)) => {
                    cert.count_renewal(how);
                    tracing::warn!(retry_in = ?backoff, "could not renew the controller's own certificate: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(OWN_RETRY_MAX);
                }
            }
        }
    }

    /// One renewal of the controller's own certificate; an error says how it ended (`Refused`:
    /// nothing signed; `Invalid`: signed but not installed) and why.
    fn renew_own_now(&self, cert: &CertResolver) -> Result<i64, (Renewal, String)> {
        let refused = |e: String| (Renewal::Refused, e);
        let signer = self.ca.as_ref().ok_or_else(|| refused("no CA".into()))?;
        if let Some(why) = self.untrusted_ca() {
            return Err(refused(why));
        }
        let validity =
            Validity::for_duration(self.valid_for).map_err(|e| refused(e.to_string()))?;
        signer.renew(cert, validity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> (tempfile::TempDir, NodeIssuer) {
        let d = tempfile::tempdir().unwrap();
        pki::init(d.path()).unwrap();
        let i = NodeIssuer::load(d.path(), DEFAULT_VALIDITY).unwrap();
        (d, i)
    }

    /// The binding of the session tests' requests come on.
    const BINDING: [u8; 32] = [7; 32];

    /// A request for a new key, with its proof of possession on [`BINDING`].
    fn raw_key() -> Request {
        let key = rcgen::KeyPair::generate().unwrap();
        let binding = pki::SessionBinding::new(BINDING);
        Request {
            public_key: key.public_key_raw().to_vec(),
            proof: pki::prove_possession(&key, &binding).unwrap(),
            binding: Some(binding),
        }
    }

    fn refused(m: &ToRouter) -> &str {
        match m {
            ToRouter::RenewRefused { reason } => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// `node`'s certificate, issued from the CA in `dir` for `validity` (what its session
    /// presented).
    fn presented(dir: &Path, node: &str, validity: Validity) -> CertificateDer<'static> {
        pki::issue_with(dir, node, validity).unwrap();
        router::tls::TlsIdentity::load(dir, node).unwrap().chain[0].clone()
    }

    /// A validity due for renewal since 90 s (70 % of 1300 s), valid for 5 more minutes.
    fn due_validity() -> Validity {
        let now = SystemTime::now();
        Validity::between(
            now - Duration::from_secs(1000),
            now + Duration::from_secs(300),
        )
        .unwrap()
    }

    /// `node`'s certificate from `dir`'s CA, due for renewal.
    fn due(dir: &Path, node: &str) -> CertificateDer<'static> {
        presented(dir, node, due_validity())
    }

    fn is_certificate(m: &ToRouter) -> bool {
        matches!(m, ToRouter::Certificate { .. })
    }

    #[test]
    fn a_good_key_gets_a_certificate_for_the_session_node() {
        let (d, i) = issuer();
        let ToRouter::Certificate { chain_pem } = i.answer(
            "edge-1",
            &raw_key(),
            &due(d.path(), "edge-1"),
            Instant::now(),
        ) else {
            panic!("expected a certificate");
        };
        use rustls::pki_types::pem::PemObject;
        let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let names = |n: &str| router::tls::PeerNames::new([n.to_string()]);
        assert_eq!(names("edge-1").identify(&leaf).as_deref(), Some("edge-1"));
        assert_eq!(names("edge-2").identify(&leaf), None);
        let life = router::tls::not_after(&leaf).unwrap() - router::tls::not_before(&leaf).unwrap();
        // 24 h, plus the 5 minutes a new certificate is backdated.
        assert_eq!(life, 24 * 3600 + 300);
        // Recorded in the CA directory, where `tasman pki revoke edge-1` finds it.
        let (records, _) = pki::read_issued(d.path()).unwrap();
        let last = records.last().unwrap();
        assert_eq!(
            (last.node.as_str(), Some(&last.serial)),
            ("edge-1", pki::serial_of(&leaf).as_ref())
        );
    }

    /// A controller not restarted after `retire-ca` removed its signing CA from the bundle in
    /// force refuses to sign (its certificates would be refused everywhere), and says why.
    #[test]
    fn no_certificate_is_signed_once_the_signing_ca_left_the_bundle_in_force() {
        let d = tempfile::tempdir().unwrap();
        pki::init(d.path()).unwrap();
        pki::issue(d.path(), "controller").unwrap();
        let i = NodeIssuer::load(d.path(), DEFAULT_VALIDITY).unwrap();
        let cert =
            CertResolver::new(&router::tls::TlsIdentity::load(d.path(), "controller").unwrap())
                .unwrap();
        i.sign_within(cert.clone());
        let now = Instant::now();
        let edge = due(d.path(), "edge-1");
        assert!(is_certificate(&i.answer("edge-1", &raw_key(), &edge, now)));
        // The rotation goes on without this controller being restarted: the new CA signs the
        // controller's certificate, and the old one (this controller's signing CA) is retired.
        pki::rotate_ca(d.path()).unwrap();
        let _ = cert.reload_tick();
        pki::issue(d.path(), "controller").unwrap();
        let _ = cert.reload_tick();
        pki::retire_ca(d.path()).unwrap();
        let _ = cert.reload_tick();
        assert_eq!(cert.trusted().len(), 1, "the pruned bundle is in force");
        let later = now + MIN_INTERVAL;
        let why = refused(&i.answer("edge-1", &raw_key(), &edge, later)).to_string();
        assert!(why.contains("no longer in its trust bundle"), "{why}");
        let (how, why) = i.renew_own_now(&cert).unwrap_err();
        assert!(why.contains("restart it"), "{why}");
        assert_eq!(
            how,
            Renewal::Refused,
            "nothing was signed: counted as refused"
        );
    }

    /// With a rotated CA directory (the bundle of the new and the old CA), an answer carries the
    /// leaf and the new (issuing) CA only: what trusts the bundle, or just the new CA, accepts it.
    #[test]
    fn a_rotated_ca_answers_with_the_leaf_and_the_issuing_ca_only() {
        use rustls::pki_types::pem::PemObject;
        let d = tempfile::tempdir().unwrap();
        pki::init(d.path()).unwrap();
        pki::rotate_ca(d.path()).unwrap();
        let bundle = pki::read_ca_bundle(&d.path().join(pki::CA_CERT)).unwrap();
        let i = NodeIssuer::load(d.path(), DEFAULT_VALIDITY).unwrap();
        assert_eq!(i.ca_cert(), Some(&bundle[0].der));
        let ToRouter::Certificate { chain_pem } = i.answer(
            "edge-1",
            &raw_key(),
            &due(d.path(), "edge-1"),
            Instant::now(),
        ) else {
            panic!("expected a certificate");
        };
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(chain.len(), 2, "the leaf and one CA");
        assert_eq!(chain[1], bundle[0].der);
    }

    /// The leaf's serial of an answer.
    fn serial_of(m: &ToRouter) -> pki::Serial {
        use rustls::pki_types::pem::PemObject;
        let ToRouter::Certificate { chain_pem } = m else {
            panic!("expected a certificate, got {m:?}");
        };
        let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        pki::serial_of(&leaf).unwrap()
    }

    /// A request is answered only with a proof that the router holds the key: a router
    /// cannot have its name certified over a key it only read (another node's, from that
    /// node's certificate), nor reuse a proof made on another session, nor send none.
    #[test]
    fn a_renewal_without_proof_of_possession_is_refused() {
        let (d, i) = issuer();
        let t0 = Instant::now();
        let edge = due(d.path(), "edge-1");
        let mine = raw_key();
        let theirs = raw_key();
        let cases = [
            (
                "another's key, my proof",
                Request {
                    public_key: theirs.public_key.clone(),
                    ..mine.clone()
                },
                "does not verify",
            ),
            (
                "a proof made on another session",
                Request {
                    binding: Some(pki::SessionBinding::new([8; 32])),
                    ..mine.clone()
                },
                "does not verify",
            ),
            (
                "no proof (a router from before proofs)",
                Request {
                    proof: Vec::new(),
                    ..mine.clone()
                },
                "no proof of possession",
            ),
            (
                "a session without a binding",
                Request {
                    binding: None,
                    ..mine.clone()
                },
                "exports no binding",
            ),
        ];
        for (n, (what, req, why)) in cases.into_iter().enumerate() {
            let m = i.answer("edge-1", &req, &edge, t0 + MIN_INTERVAL * n as u32);
            assert!(refused(&m).contains(why), "{what}: {m:?}");
        }
        let m = i.answer("edge-1", &mine, &edge, t0 + MIN_INTERVAL * 9);
        assert!(is_certificate(&m), "{m:?}");
    }

    /// Two renewals over one public key, of one node or of two (a node sending another's key),
    /// get certificates with different serials: revoking one does not revoke the other.
    #[test]
    fn two_renewals_with_one_key_get_different_serials() {
        let (d, i) = issuer();
        let key = raw_key();
        let t0 = Instant::now();
        let (e1, e2) = (due(d.path(), "edge-1"), due(d.path(), "edge-2"));
        let a = serial_of(&i.answer("edge-1", &key, &e1, t0));
        let b = serial_of(&i.answer("edge-1", &key, &e1, t0 + MIN_INTERVAL));
        let c = serial_of(&i.answer("edge-2", &key, &e2, t0));
        assert!(a != b && b != c && a != c, "{a} {b} {c}");
    }

    /// A node `controller` (possible only in a stored topology from before the id was
    /// reserved) gets no certificate: it would be a controller identity to every router.
    #[test]
    fn no_certificate_is_signed_for_the_controllers_name() {
        let (d, i) = issuer();
        let m = i.answer(
            "controller",
            &raw_key(),
            &due(d.path(), "controller"),
            Instant::now(),
        );
        assert!(refused(&m).contains("reserved"), "{m:?}");
    }

    /// A renewal asked before the presented certificate is due (70 % of its lifetime, with a
    /// tenth of it, at most 5 minutes, of slack) is refused: a stolen key renews no faster
    /// than the legitimate schedule (a fresh 24 h certificate was renewed at once, again and
    /// again). Once due, it is answered.
    #[test]
    fn a_renewal_before_the_presented_certificate_is_due_is_refused() {
        let (d, i) = issuer();
        let t0 = Instant::now();
        let fresh = presented(
            d.path(),
            "edge-1",
            Validity::for_duration(DEFAULT_VALIDITY).unwrap(),
        );
        let m = i.answer("edge-1", &raw_key(), &fresh, t0);
        assert!(refused(&m).contains("not due"), "{m:?}");
        // Due in 4 minutes, within the 5 minutes of slack of a 24 h certificate: answered.
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let soon = Validity::between(
            now - day * 7 / 10 + Duration::from_secs(240),
            now + day * 3 / 10 + Duration::from_secs(240),
        )
        .unwrap();
        let soon = presented(d.path(), "edge-2", soon);
        assert!(is_certificate(&i.answer("edge-2", &raw_key(), &soon, t0)));
        // Due in 10 minutes: refused.
        let later = Validity::between(
            now - day * 7 / 10 + Duration::from_secs(600),
            now + day * 3 / 10 + Duration::from_secs(600),
        )
        .unwrap();
        let later = presented(d.path(), "edge-3", later);
        let m = i.answer("edge-3", &raw_key(), &later, t0);
        assert!(refused(&m).contains("not due"), "{m:?}");
        assert_eq!(due_slack(0, 86_400), 300);
        assert_eq!(due_slack(0, 900), 90);
    }

    /// A session whose certificate has expired since its handshake gets no renewal: a session
    /// outlives its certificate, and a revocation lists unexpired certificates only, so a
    /// stolen key on a long session renewed itself after its node was revoked. (Refused now,
    /// the router reconnects with the certificate it holds.)
    #[test]
    fn a_renewal_on_a_session_whose_certificate_expired_is_refused() {
        let (d, i) = issuer();
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let expired = Validity::between(now - hour * 25, now - hour).unwrap();
        let expired = presented(d.path(), "edge-1", expired);
        let m = i.answer("edge-1", &raw_key(), &expired, Instant::now());
        assert!(refused(&m).contains("expired"), "{m:?}");
        // Its turn is not spent: a reconnected session asks at once.
        let m = i.answer(
            "edge-1",
            &raw_key(),
            &due(d.path(), "edge-1"),
            Instant::now(),
        );
        assert!(is_certificate(&m), "{m:?}");
    }

    /// The holder of a certificate revoked in the CA directory's list gets no renewal, even
    /// before the controller has read the list (it enforces it at handshakes only then).
    #[test]
    fn a_renewal_for_a_revoked_certificate_is_refused() {
        let (d, i) = issuer();
        let edge = due(d.path(), "edge-1");
        let serial = pki::serial_of(&edge).unwrap();
        let revoke = pki::RevokeTarget::Serial(serial.clone());
        pki::revoke(d.path(), &revoke, pki::RevokeReason::KeyCompromise).unwrap();
        let m = i.answer("edge-1", &raw_key(), &edge, Instant::now());
        let why = refused(&m);
        assert!(
            why.contains("revoked") && why.contains(&serial.to_string()),
            "{why}"
        );
    }

    #[test]
    fn bad_public_key_bytes_are_refused_not_signed() {
        let (d, i) = issuer();
        let now = Instant::now();
        let good = raw_key();
        let mut compressed = good.public_key.clone();
        compressed[0] = 0x03;
        let edge = due(d.path(), "edge-1");
        for (n, bad) in [vec![], vec![0x04; 64], vec![0x04; 66], compressed]
            .into_iter()
            .enumerate()
        {
            let bad = Request {
                public_key: bad,
                ..good.clone()
            };
            // Each past the rate limit: it is not what refuses these.
            let m = i.answer("edge-1", &bad, &edge, now + MIN_INTERVAL * n as u32);
            assert!(refused(&m).contains("public key"), "{m:?}");
        }
    }

    /// One answer per node per 10 s, whichever session asks: a node reconnecting does not get
    /// a new allowance (it did, per session). Another node has its own.
    #[test]
    fn one_renewal_per_node_per_10s_across_sessions() {
        let (d, i) = issuer();
        let t0 = Instant::now();
        let (n, m) = (due(d.path(), "n"), due(d.path(), "m"));
        assert!(is_certificate(&i.answer("n", &raw_key(), &n, t0)));
        // The same node, a session later (as after a reconnect).
        let r = i.answer("n", &raw_key(), &n, t0 + S(9));
        assert!(refused(&r).contains("too soon"), "{r:?}");
        assert!(is_certificate(&i.answer("n", &raw_key(), &n, t0 + S(10))));
        let r = i.answer("n", &raw_key(), &n, t0 + S(19));
        assert!(refused(&r).contains("too soon"), "{r:?}");
        assert!(is_certificate(&i.answer("m", &raw_key(), &m, t0 + S(19))));
    }

    /// A request refused as not due (a stolen key asking early) does not spend the node's
    /// turn: the real router, due, renews right after it.
    #[test]
    fn a_refused_early_request_does_not_spend_the_nodes_turn() {
        let (d, i) = issuer();
        let t0 = Instant::now();
        let early = presented(d.path(), "n", Validity::for_duration(S(86_400)).unwrap());
        let r = i.answer("n", &raw_key(), &early, t0);
        assert!(refused(&r).contains("not due"), "{r:?}");
        let n = due(d.path(), "n");
        assert!(is_certificate(&i.answer("n", &raw_key(), &n, t0 + S(1))));
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    /// A TLS directory with a controller certificate due for renewal since 90 s (70 % of
    /// 1300 s) and valid for 5 more minutes, and the controller's resolver on it.
    fn due_controller() -> (tempfile::TempDir, Arc<CertResolver>) {
        let d = tempfile::tempdir().unwrap();
        pki::init(d.path()).unwrap();
        issue_due(d.path());
        let id = router::tls::TlsIdentity::load(d.path(), "controller").unwrap();
        (d, CertResolver::new(&id).unwrap())
    }

    fn issue_due(dir: &Path) {
        let now = SystemTime::now();
        let due = Validity::between(now - S(1000), now + S(300)).unwrap();
        pki::issue_with(dir, "controller", due).unwrap();
    }

    /// Sleeps (paused clock) until `at` after `t0`, then checks the failed (refused: nothing
    /// signed, or invalid: not installed) and the successful renewals counted so far.
    async fn at(t0: tokio::time::Instant, at: u64, cert: &CertResolver, failed: u64, ok: u64) {
        tokio::time::sleep_until(t0 + S(at)).await;
        let got = (
            cert.renewals(Renewal::Invalid) + cert.renewals(Renewal::Refused),
            cert.renewals(Renewal::Renewed),
        );
        assert_eq!(got, (failed, ok), "(failed, renewed) at {at} s");
    }

    /// The controller's own certificate, signed by a CA it does not trust: every attempt fails
    /// (the new pair is checked before it is installed) and they come 30 s, 1, 2, 4 and 8
    /// minutes apart, then every 10 minutes.
    #[tokio::test(start_paused = true)]
    async fn own_renewal_failures_back_off_from_30s_doubling_to_10_minutes() {
        let (_d, cert) = due_controller();
        let other = tempfile::tempdir().unwrap();
        pki::init(other.path()).unwrap();
        let issuer = Arc::new(NodeIssuer::load(other.path(), DEFAULT_VALIDITY).unwrap());
        let t0 = tokio::time::Instant::now();
        let task = tokio::spawn(issuer.renew_own(cert.clone()));
        let attempts = [0, 30, 90, 210, 450, 930, 1530, 2130, 2730];
        for (n, &a) in attempts.iter().enumerate() {
            let n = n as u64;
            if a > 0 {
                at(t0, a - 1, &cert, n, 0).await;
            }
            at(t0, a + 1, &cert, n + 1, 0).await;
        }
        task.abort();
    }

    /// Failures back off; a renewal starts the back-off again from 30 s.
    #[tokio::test(start_paused = true)]
    async fn own_renewal_starts_the_backoff_again_after_a_success() {
        let (d, cert) = due_controller();
        let issuer = Arc::new(NodeIssuer::load(d.path(), DEFAULT_VALIDITY).unwrap());
        // The TLS directory is away: the new files cannot be written.
        let away = d.path().with_extension("away");
        let hide = || std::fs::rename(d.path(), &away).unwrap();
        let restore = || std::fs::rename(&away, d.path()).unwrap();
        hide();
        let t0 = tokio::time::Instant::now();
        let task = tokio::spawn(issuer.renew_own(cert.clone()));
        at(t0, 1, &cert, 1, 0).await;
        at(t0, 31, &cert, 2, 0).await;
        at(t0, 91, &cert, 3, 0).await;
        // Back: the next attempt, 2 minutes later, succeeds.
        restore();
        at(t0, 209, &cert, 3, 0).await;
        at(t0, 211, &cert, 3, 1).await;
        // The renewed certificate is replaced by a due one and the directory goes away again.
        // The loop looks at the certificate again a minute after the renewal (270 s) and fails:
        // the next attempt is 30 s later, not the 4 minutes the back-off had reached.
        issue_due(d.path());
        assert!(
            matches!(cert.reload(), router::tls::Reload::Reloaded { .. }),
            "the due certificate is presented"
        );
        hide();
        at(t0, 269, &cert, 3, 1).await;
        at(t0, 271, &cert, 4, 1).await;
        at(t0, 299, &cert, 4, 1).await;
        at(t0, 301, &cert, 5, 1).await;
        at(t0, 359, &cert, 5, 1).await;
        at(t0, 361, &cert, 6, 1).await;
        task.abort();
        restore();
    }

    /// A lifetime so short that a fresh certificate is due at once (60 s: renewal at 70 % of
    /// it plus the 5 min backdating is in the past): renewals come 30 s apart, not back to back.
    #[tokio::test(start_paused = true)]
    async fn own_renewals_of_a_certificate_due_at_once_come_30s_apart() {
        let (d, cert) = due_controller();
        let issuer = Arc::new(NodeIssuer::load(d.path(), S(60)).unwrap());
        // Renewing back to back, the loop always has a signature in flight, so the paused clock
        // never advances and `at` never returns: fail the run instead of hanging it.
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watch = (done.clone(), cert.clone());
        std::thread::spawn(move || {
            std::thread::sleep(S(60));
            if !watch.0.load(std::sync::atomic::Ordering::Relaxed) {
                eprintln!(
                    "own_renewals_of_a_certificate_due_at_once_come_30s_apart: stuck after {} \
                     renewals in 60 s of real time (renewing back to back?)",
                    watch.1.renewals(Renewal::Renewed)
                );
                std::process::exit(101);
            }
        });
        let t0 = tokio::time::Instant::now();
        let task = tokio::spawn(issuer.renew_own(cert.clone()));
        at(t0, 1, &cert, 0, 1).await;
        at(t0, 29, &cert, 0, 1).await;
        at(t0, 31, &cert, 0, 2).await;
        at(t0, 59, &cert, 0, 2).await;
        at(t0, 61, &cert, 0, 3).await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        task.abort();
    }

    #[test]
    fn without_a_ca_every_request_is_refused_with_the_reason() {
        let i = NodeIssuer::disabled();
        let d = tempfile::tempdir().unwrap();
        pki::init(d.path()).unwrap();
        let m = i.answer("n", &raw_key(), &due(d.path(), "n"), Instant::now());
        assert!(refused(&m).contains("--ca-dir"), "{m:?}");
    }

    /// Its `--ca-dir` being its TLS directory (the default), `rotate-ca` then `revoke` in it
    /// give the controller a list of the new CA before its tick adopts the bundle with that CA:
    /// refused then, and sent to routers once the bundle is in force (not never, for want of a
    /// change of the file).
    #[tokio::test]
    async fn a_list_refused_before_the_controller_trusts_its_ca_is_sent_once_it_does() {
        let (d, i) = issuer();
        pki::issue(d.path(), "controller").unwrap();
        let id = router::tls::TlsIdentity::load(d.path(), "controller").unwrap();
        let cert = CertResolver::new(&id).unwrap();
        pki::rotate_ca(d.path()).unwrap();
        pki::issue(d.path(), "leaked").unwrap();
        let leaked = pki::RevokeTarget::Node("leaked".into());
        pki::revoke(d.path(), &leaked, pki::RevokeReason::KeyCompromise).unwrap();
        let path = d.path().join(pki::CA_CRL);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut last = None;
        i.send_if_new(&cert, &path, &mut last).await;
        assert!(i.crl().borrow().is_none(), "refused: nothing sent");
        assert_eq!(cert.crl_failures(), 1);
        assert_eq!(
            cert.reload_trust(),
            router::tls::TrustReload::Adopted { cas: 2 }
        );
        i.send_if_new(&cert, &path, &mut last).await;
        assert_eq!(i.crl().borrow().as_deref(), Some(text.as_str()));
        assert_eq!(cert.crls().len(), 1);
        assert_eq!(cert.crl_failures(), 1, "counted once");
    }

    /// With its `--ca-dir` apart from its TLS directory, the controller judges two lists in
    /// turn: the TLS directory's at each reload tick, the `--ca-dir`'s at each look of
    /// `watch_crl`. Each one refused is counted (and logged) once, not at every tick: they had
    /// one memory, so each look made the other's refusal new again.
    #[tokio::test]
    async fn a_refused_list_is_counted_once_when_the_ca_dir_is_not_the_tls_dir() {
        let revoke = |dir: &Path, node: &str| {
            let target = pki::RevokeTarget::Node(node.into());
            pki::revoke(dir, &target, pki::RevokeReason::KeyCompromise).unwrap();
        };
        // The TLS directory: the CA, the controller's certificate and a list of that CA.
        let tls_dir = tempfile::tempdir().unwrap();
        pki::init(tls_dir.path()).unwrap();
        pki::issue(tls_dir.path(), "controller").unwrap();
        pki::issue(tls_dir.path(), "leaked").unwrap();
        revoke(tls_dir.path(), "leaked");
        // The CA directory: the same CA, and a list signed by another CA.
        let ca_dir = tempfile::tempdir().unwrap();
        for f in [pki::CA_CERT, pki::CA_KEY] {
            std::fs::copy(tls_dir.path().join(f), ca_dir.path().join(f)).unwrap();
        }
        let other = tempfile::tempdir().unwrap();
        pki::init(other.path()).unwrap();
        pki::issue(other.path(), "x").unwrap();
        revoke(other.path(), "x");
        let foreign = ca_dir.path().join(pki::CA_CRL);
        std::fs::copy(other.path().join(pki::CA_CRL), &foreign).unwrap();

        let i = NodeIssuer::load(ca_dir.path(), DEFAULT_VALIDITY).unwrap();
        let id = router::tls::TlsIdentity::load(tls_dir.path(), "controller").unwrap();
        let cert = CertResolver::new(&id).unwrap();
        assert_eq!(
            cert.crls().len(),
            1,
            "the TLS directory's list, taken at start"
        );
        let in_force = cert.crls();
        let mut last = None;
        for _ in 0..5 {
            i.send_if_new(&cert, &foreign, &mut last).await;
            cert.reload_tick();
        }
        assert!(
            i.crl().borrow().is_none(),
            "refused: nothing sent to routers"
        );
        assert_eq!(cert.crl_failures(), 1, "the --ca-dir's list counted once");
        assert_eq!(cert.crls(), in_force);

        // The TLS directory's list refused too: each counted once.
        std::fs::write(
            tls_dir.path().join(pki::CA_CRL),
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        )
        .unwrap();
        for _ in 0..5 {
            i.send_if_new(&cert, &foreign, &mut last).await;
            cert.reload_tick();
        }
        assert_eq!(cert.crl_failures(), 2, "each refused list counted once");
        assert_eq!(cert.crls(), in_force, "the list in force stays");
    }

    /// With the CA directory as its TLS directory (`--tls-dir pki --ca-dir pki`, the
    /// recommended set-up), a refused `ca.crl.pem` is the controller's own file: counted and
    /// logged once, and sent to no router; an adopted one is sent. (It was judged twice, as the
    /// node's file and as lists installed: counted 2.)
    #[tokio::test]
    async fn a_refused_list_is_counted_once_when_the_ca_dir_is_the_tls_dir() {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path()).unwrap();
        pki::issue(dir.path(), "controller").unwrap();
        let other = tempfile::tempdir().unwrap();
        pki::init(other.path()).unwrap();
        pki::issue(other.path(), "x").unwrap();
        let revoke = |d: &Path, node: &str| {
            let target = pki::RevokeTarget::Node(node.into());
            pki::revoke(d, &target, pki::RevokeReason::KeyCompromise).unwrap();
        };
        revoke(other.path(), "x");
        let file = dir.path().join(pki::CA_CRL);
        std::fs::copy(other.path().join(pki::CA_CRL), &file).unwrap();
        let i = NodeIssuer::load(dir.path(), DEFAULT_VALIDITY).unwrap();
        let id = router::tls::TlsIdentity::load(dir.path(), "controller").unwrap();
        let cert = CertResolver::new(&id).unwrap();
        let mut last = None;
        for _ in 0..5 {
            i.send_if_new(&cert, &file, &mut last).await;
            cert.reload_tick();
        }
        assert_eq!(cert.crl_failures(), 1, "the refused file counted once");
        assert!(i.crl().borrow().is_none(), "refused: nothing sent");
        // A list of the fabric's own CA is adopted and sent.
        pki::issue(dir.path(), "leaked").unwrap();
        std::fs::remove_file(&file).unwrap();
        revoke(dir.path(), "leaked");
        i.send_if_new(&cert, &file, &mut last).await;
        assert_eq!(cert.crls().len(), 1, "adopted");
        assert!(i.crl().borrow().is_some(), "sent to routers");
        assert_eq!(cert.crl_failures(), 1);
    }
}
