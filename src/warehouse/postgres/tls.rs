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

/// Where the warehouse's extra CA certificates come from, for errors about them.
const SECRET_CA: &str = "the CA certificate of the credentials Secret (caCertKey)";

/// The CA certificates of `extra` (PEM) when given — those alone, as libpq trusts only its
/// `sslrootcert`: with the system's CAs too, `verify-ca` (which checks no host name) would take
/// any publicly trusted certificate, for any name — else the system's; `origin` names where
/// `extra` came from in errors.
fn roots(extra: Option<&str>, origin: &str) -> Result<RootCertStore, WarehouseError> {
    let mut roots = RootCertStore::empty();
    let Some(pem) = extra else {
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        return Ok(roots);
    };
    let bad =
        |reason: String| WarehouseError::new(ErrorClass::Connection, format!("{origin} {reason}"));
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
    Ok(roots)
}

/// The TLS connector for `mode` (not called for `disable`), trusting for `verify-ca` and
/// `verify-full` the PEM certificates of `ca_cert` when given, else the system's CAs.
pub fn connector(
    mode: SslMode,
    ca_cert: Option<&str>,
) -> Result<MakeRustlsConnect, WarehouseError> {
    connector_from(mode, ca_cert, SECRET_CA)
}

/// [`connector`] with `ca_cert` from `origin` (named in its errors: the engine's store reads it
/// from the file its URL's `sslrootcert` names).
pub fn connector_from(
    mode: SslMode,
    ca_cert: Option<&str>,
    origin: &str,
) -> Result<MakeRustlsConnect, WarehouseError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| WarehouseError::internal(format!("TLS setup: {e}")))?;
    let config = match mode {
        SslMode::VerifyFull => builder
            .with_root_certificates(roots(ca_cert, origin)?)
            .with_no_client_auth(),
        SslMode::VerifyCa | SslMode::Prefer | SslMode::Require | SslMode::Disable => {
            let inner = if mode == SslMode::VerifyCa {
                Some(
                    WebPkiServerVerifier::builder_with_provider(
                        Arc::new(roots(ca_cert, origin)?),
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

#[cfg(test)]
mod tests {
    /// With a CA file, its certificates alone are trusted (as libpq trusts its `sslrootcert`):
    /// the system's too would let `verify-ca`, which checks no host name, take any publicly
    /// trusted certificate. Without one, the system's.
    #[test]
    fn a_given_ca_is_trusted_alone() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("ca.crt");
        let out = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=test CA", "-keyout"])
            .arg(dir.path().join("ca.key"))
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pem = std::fs::read_to_string(&cert).unwrap();
        let given = super::roots(Some(&pem), "the test CA").unwrap();
        assert_eq!(given.len(), 1);
        // (The system's CAs, which this machine has, are not among them.)
        assert!(!rustls_native_certs::load_native_certs().certs.is_empty());
        let e = super::roots(Some("no certificate"), "the test CA").unwrap_err();
        assert!(
            e.message
                .starts_with("the test CA holds no PEM certificate"),
            "{}",
            e.message
        );
    }
}
