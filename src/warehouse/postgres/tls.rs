//! TLS for PostgreSQL-protocol warehouses through rustls, with libpq's `sslmode` meanings.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::crd::{ErrorClass, SslMode};
use crate::warehouse::WarehouseError;

/// A verifier for `prefer`/`require` (encryption without authentication, as libpq does) and
/// `verify-ca` (the chain is checked, the host name is not). Signatures are always checked.
#[derive(Debug)]
struct Relaxed {
    inner: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let Some(inner) = &self.inner else {
            return Ok(ServerCertVerified::assertion());
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(Error::InvalidCertificate(CertificateError::NotValidForName))
            | Err(Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
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
    ) -> Result<HandshakeSignatureValid, Error> {
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
}

/// The system's CA certificates, and those of `extra` (PEM) when given.
fn roots(extra: Option<&str>) -> Result<RootCertStore, WarehouseError> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(pem) = extra {
        let bad = |reason: String| {
            WarehouseError::new(
                ErrorClass::Connection,
                format!("the CA certificate of the credentials Secret (caCertKey) {reason}"),
            )
        };
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| bad(format!("is not valid PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| bad(format!("is not a usable certificate: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(bad("holds no PEM certificate".into()));
        }
    }
    Ok(roots)
}

/// The TLS connector for `mode` (not called for `disable`), trusting the PEM certificates of
/// `ca_cert` besides the system's for `verify-ca` and `verify-full`.
pub fn connector(
    mode: SslMode,
    ca_cert: Option<&str>,
) -> Result<MakeRustlsConnect, WarehouseError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| WarehouseError::internal(format!("TLS setup: {e}")))?;
    let config = match mode {
        SslMode::VerifyFull => builder
            .with_root_certificates(roots(ca_cert)?)
            .with_no_client_auth(),
        SslMode::VerifyCa | SslMode::Prefer | SslMode::Require | SslMode::Disable => {
            let inner = if mode == SslMode::VerifyCa {
                Some(
                    WebPkiServerVerifier::builder_with_provider(
                        Arc::new(roots(ca_cert)?),
                        provider.clone(),
                    )
                    .build()
                    .map_err(|e| WarehouseError::internal(format!("TLS setup: {e}")))?,
                )
            } else {
                None
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Relaxed { inner, provider }))
                .with_no_client_auth()
        }
    };
    Ok(MakeRustlsConnect::new(config))
}
