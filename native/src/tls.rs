//! The TLS listener's configuration (rustls with the ring provider, ALPN h2), swapped whole
//! by a reload, and what a handshake tells of the client (gRPC's `auth_context()`).

use crate::x509;
use std::sync::{Arc, RwLock};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, HandshakeKind, NamedGroup, ProtocolVersion, RootCertStore};
use tokio_rustls::rustls::{ServerConfig, ServerConnection};
use tokio_rustls::TlsAcceptor;

/// The configuration new connections of a TLS listener get. A reload replaces it; a
/// connection keeps the one it was accepted with.
pub struct Reloadable {
    config: RwLock<Arc<ServerConfig>>,
    require_client_auth: bool,
}

impl Reloadable {
    pub fn new(
        cert_chain: &[u8],
        private_key: &[u8],
        client_ca: Option<&[u8]>,
        require_client_auth: bool,
    ) -> Result<Self, String> {
        let config = config(cert_chain, private_key, client_ca, require_client_auth)?;
        Ok(Reloadable {
            config: RwLock::new(config),
            require_client_auth,
        })
    }

    /// New material for the connections accepted from now on; the error says which part
    /// is unusable, and the configuration in use stays.
    pub fn reload(
        &self,
        cert_chain: &[u8],
        private_key: &[u8],
        client_ca: Option<&[u8]>,
    ) -> Result<(), String> {
        let config = config(cert_chain, private_key, client_ca, self.require_client_auth)?;
        *self.config.write().unwrap() = config;
        Ok(())
    }

    /// An acceptor with the configuration in use now: a lock and a reference count per
    /// connection, nothing per message.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.read().unwrap().clone())
    }
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no certificate in the PEM"));
    }
    Ok(certs)
}

/// A configuration for the PEM certificate chain and private key the runtime read, asking
/// clients for a certificate from `client_ca` when given (mTLS); the error says which part
/// is unusable.
fn config(
    cert_chain: &[u8],
    private_key: &[u8],
    client_ca: Option<&[u8]>,
    require_client_auth: bool,
) -> Result<Arc<ServerConfig>, String> {
    let certs = certificates(cert_chain, "certificate chain")?;
    let key =
        PrivateKeyDer::from_pem_slice(private_key).map_err(|e| format!("private key: {e}"))?;
    // ring rather than aws-lc-rs: it builds with cargo alone (no cmake, no C toolchain
    // beyond cc) and quickly; its lack of post-quantum key exchange is what rustls warns of.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(pem, "client CA")? {
                roots.add(cert).map_err(|e| format!("client CA: {e}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if require_client_auth {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier.build().map_err(|e| format!("client CA: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

pub type AuthContext = Vec<(&'static str, Vec<Vec<u8>>)>;

/// What gRPC reports for a plaintext connection.
pub fn insecure() -> AuthContext {
    vec![
        ("transport_security_type", vec![b"insecure".to_vec()]),
        ("security_level", vec![b"TSI_SECURITY_NONE".to_vec()]),
    ]
}

/// What gRPC reports for a TLS connection, with the verified client certificate's
/// identity when the client presented one. Computed once, when the handshake completes.
pub fn auth_context(connection: &ServerConnection) -> AuthContext {
    let mut out = vec![("transport_security_type", vec![b"ssl".to_vec()])];
    if let Some([leaf, ..]) = connection.peer_certificates() {
        out.extend(x509::properties(leaf));
    }
    out.push((
        "security_level",
        vec![b"TSI_PRIVACY_AND_INTEGRITY".to_vec()],
    ));
    let resumed = matches!(connection.handshake_kind(), Some(HandshakeKind::Resumed));
    out.push((
        "ssl_session_reused",
        vec![if resumed {
            b"true".to_vec()
        } else {
            b"false".to_vec()
        }],
    ));
    if let Some(name) = connection.server_name() {
        out.push(("ssl_requested_server_name", vec![name.as_bytes().to_vec()]));
    }
    let version = match connection.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => Some("TLSv1.3"),
        Some(ProtocolVersion::TLSv1_2) => Some("TLSv1.2"),
        _ => None,
    };
    if let Some(version) = version {
        out.push(("ssl_tls_version", vec![version.as_bytes().to_vec()]));
    }
    // BoringSSL's names for the groups, as gRPC reports them.
    let group = connection
        .negotiated_key_exchange_group()
        .map(|group| match group.name() {
            NamedGroup::X25519 => "X25519".to_owned(),
            NamedGroup::secp256r1 => "P-256".to_owned(),
            NamedGroup::secp384r1 => "P-384".to_owned(),
            NamedGroup::secp521r1 => "P-521".to_owned(),
            other => format!("{other:?}"),
        });
    if let Some(group) = group {
        out.push((
            "ssl_negotiated_key_exchange_group",
            vec![group.into_bytes()],
        ));
    }
    // gRPC lists the SPIFFE ID last.
    if let Some(at) = out.iter().position(|(key, _)| *key == "peer_spiffe_id") {
        let spiffe = out.remove(at);
        out.push(spiffe);
    }
    out
}
