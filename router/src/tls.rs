//! Mutual TLS for every QUIC connection of the fabric (router to router, router to controller).
//!
//! A peer is accepted only when both hold: its certificate chains to the fabric CA (`ca.pem`), and
//! the certificate is valid for a name in the current [`PeerNames`] set (the node ids of the
//! current topology, plus `controller` where the caller adds it). The set is swapped on every
//! snapshot, so a node removed from the topology is refused at its next handshake.
//!
//! Neither 0-RTT nor resumption is enabled: 0-RTT data is replayable and the first bytes of a
//! stream here are a client's (non-idempotent) inference request; resumption would skip the
//! client-certificate check, and connections are long-lived and pooled (one handshake per
//! neighbour per reconnect), so it would buy almost nothing.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
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

/// A node's certificate chain and key, and the CA it trusts. Loaded from a PKI directory.
pub struct TlsIdentity {
    pub name: String,
    pub ca: CertificateDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            name: self.name.clone(),
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
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
    /// Loads `ca.pem`, `<name>.pem` and `<name>.key` from `dir` (as written by [`pki`]).
    pub fn load(dir: &Path, name: &str) -> Result<Self, TlsError> {
        let file_err = |path: &Path, reason: String| TlsError::File {
            path: path.to_path_buf(),
            reason,
        };
        let ca_path = dir.join(pki::CA_CERT);
        let ca = CertificateDer::from_pem_file(&ca_path)
            .map_err(|e| file_err(&ca_path, e.to_string()))?;
        let cert_path = dir.join(format!("{name}.pem"));
        let chain = CertificateDer::pem_file_iter(&cert_path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| file_err(&cert_path, e.to_string()))?;
        if chain.is_empty() {
            return Err(file_err(&cert_path, "no certificate in file".into()));
        }
        let key_path = dir.join(format!("{name}.key"));
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| file_err(&key_path, e.to_string()))?;
        Ok(TlsIdentity {
            name: name.to_string(),
            ca,
            chain,
            key,
        })
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

fn roots(id: &TlsIdentity) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(id.ca.clone())?;
    Ok(Arc::new(roots))
}

/// Both verifiers add a name check on top of WebPKI and leave signature checks to it.
macro_rules! delegate_signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    };
}

/// Server side: the chain must verify against our CA, then the name must be allowed.
#[derive(Debug)]
struct NodeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    peers: PeerNames,
}

impl ClientCertVerifier for NodeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match self.peers.identify(end_entity) {
            Some(_) => Ok(ok),
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            )),
        }
    }
    delegate_signature_checks!();
}

/// Client side: standard WebPKI checks against our CA for the name we dialled, which must also be
/// an allowed peer now.
#[derive(Debug)]
struct NodeServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    peers: PeerNames,
}

impl ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
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

/// The rustls server config (TLS 1.3 only, client certificates required).
pub fn rustls_server_config(
    id: &TlsIdentity,
    peers: &PeerNames,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let inner =
        WebPkiClientVerifier::builder_with_provider(roots(id)?, provider.clone()).build()?;
    let verifier = Arc::new(NodeClientVerifier {
        inner,
        peers: peers.clone(),
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.max_early_data_size = 0;
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(cfg)
}

/// The rustls client config (TLS 1.3 only, presents our certificate, no resumption).
pub fn rustls_client_config(
    id: &TlsIdentity,
    peers: &PeerNames,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots(id)?, provider.clone())
            .build()
            .map_err(TlsError::Verifier)?;
    let verifier = Arc::new(NodeServerVerifier {
        inner,
        peers: peers.clone(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.enable_early_data = false;
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// quinn server config with mutual TLS and the given transport tuning.
pub fn server_config(
    id: &TlsIdentity,
    peers: &PeerNames,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, TlsError> {
    let crypto = QuicServerConfig::try_from(rustls_server_config(id, peers)?)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport);
    Ok(cfg)
}

/// quinn client config with mutual TLS and the given transport tuning.
pub fn client_config(
    id: &TlsIdentity,
    peers: &PeerNames,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = QuicClientConfig::try_from(rustls_client_config(id, peers)?)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport);
    Ok(cfg)
}
