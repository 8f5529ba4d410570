//! HTTPS for the simulated shop: with [`SimTls`] in the config, the shop
//! listener speaks TLS (rustls with the ring provider, the same stack as
//! the daemon's client) with the given certificate chain and key. The
//! control listener stays plain HTTP.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

/// Longest a client may take to finish the TLS handshake.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate chain (leaf first) and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct SimTls {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for SimTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimTls")
            .field("cert_pem", &format!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"****")
            .finish()
    }
}

impl SimTls {
    /// Reads the two PEM files of `cobbyd simulate --tls-cert --tls-key`.
    pub fn from_files(cert: &std::path::Path, key: &std::path::Path) -> io::Result<SimTls> {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
        };
        Ok(SimTls {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        })
    }

    /// A TLS acceptor for this certificate and key.
    pub(super) fn acceptor(&self) -> io::Result<tokio_rustls::TlsAcceptor> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |what: &str, e: &dyn fmt::Display| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("simulator TLS {what}: {e}"),
            )
        };
        let certs = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("certificate", &e))?;
        if certs.is_empty() {
            return Err(bad("certificate", &"no CERTIFICATE in the PEM"));
        }
        let key =
            PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| bad("key", &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("config", &e))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| bad("certificate/key pair", &e))?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}
