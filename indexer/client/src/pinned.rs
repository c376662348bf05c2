//! Trusting a pool member's TLS certificate by the SHA-256 it registered with the indexer
//! (relays' self-signed QUIC certificates): render nodes pin the pool's relays this way,
//! and a relay pulling a stream from another pins that one.

use crate::api::cert_sha256;
use std::collections::HashSet;
use std::sync::Arc;

/// Trusts a server certificate only if its SHA-256 is pinned, whatever name it carries;
/// the handshake's signature is checked against that certificate's key as usual. TLS 1.3
/// only (QUIC).
#[derive(Debug)]
pub struct PinnedVerifier {
    pinned: HashSet<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedVerifier {
    /// Trusts exactly the certificates whose SHA-256 (lowercase hex) is in `pinned`.
    pub fn new(pinned: impl IntoIterator<Item = String>, provider: Arc<rustls::crypto::CryptoProvider>) -> Self {
        Self { pinned: pinned.into_iter().collect(), provider }
    }

    /// A TLS 1.3 client configuration trusting exactly `pinned` (ring's provider, no
    /// client certificate).
    pub fn client_config(pinned: impl IntoIterator<Item = String>) -> Result<rustls::ClientConfig, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(Self::new(pinned, provider.clone()));
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth())
    }
}

impl rustls::client::danger::ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if self.pinned.contains(&cert_sha256(end_entity)) {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
