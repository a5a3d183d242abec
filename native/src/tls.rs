//! The TLS listener's configuration: rustls with the ring provider, ALPN h2.

use std::sync::Arc;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// An acceptor for the PEM certificate chain and private key the runtime read; the error
/// says which of the two is unusable.
pub fn acceptor(cert_chain: &[u8], private_key: &[u8]) -> Result<TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_chain)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate chain: {e}"))?;
    if certs.is_empty() {
        return Err("certificate chain: no certificate in the PEM".into());
    }
    let key =
        PrivateKeyDer::from_pem_slice(private_key).map_err(|e| format!("private key: {e}"))?;
    // ring rather than aws-lc-rs: it builds with cargo alone (no cmake, no C toolchain
    // beyond cc) and quickly; its lack of post-quantum key exchange is what rustls warns of.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
