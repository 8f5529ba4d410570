//! Extra trusted roots for one shop (`cobbyd shop add --tls-ca-file PATH`):
//! a PEM bundle of CA certificates, or the shop's self-signed certificate,
//! trusted *in addition to* the built-in webpki roots. Verification itself
//! is never switched off.
//!
//! The shop record stores the path, not the certificates: the daemon reads
//! the file when it checks a new shop and whenever it builds the shop's
//! HTTP client (at start, after a reload, after `shop add`), so an operator
//! renews a private CA by replacing the file and sending SIGHUP.

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::{PemObject, SectionKind};
use std::path::Path;

/// Largest CA file read (a bundle of every public root is about 250 KiB).
pub const MAX_CA_FILE: u64 = 1024 * 1024;

/// Reads and checks a CA file: an absolute path, readable, PEM, at least
/// one certificate, each usable as a trust anchor, and no private key.
/// The error names the file, the problem and the fix.
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    if !path.is_absolute() {
        return Err(format!(
            "tls_ca_file {shown:?} is not an absolute path: give the full path (the daemon reads the file, not the command line tool)"
        ));
    }
    let bytes = match crate::bounded::read_file(path, MAX_CA_FILE) {
        Ok(b) => b,
        Err(crate::bounded::ReadError::TooLarge { .. }) => {
            return Err(format!(
                "the CA file {shown} is larger than {MAX_CA_FILE} bytes: give only the CA certificate(s) the shop needs"
            ));
        }
        Err(e) => {
            return Err(format!(
                "cannot read the CA file {shown}: {e}: check the path, and that the daemon's user (cobbyd under systemd) may read it (e.g. keep it in /etc/cobbyd/, mode 0644)"
            ));
        }
    };
    let not_pem = |why: String| {
        format!(
            "the CA file {shown} is not a usable PEM certificate bundle: {why}: give the CA certificate (or the shop's self-signed certificate) in PEM form, starting with -----BEGIN CERTIFICATE-----"
        )
    };
    let mut certs = Vec::new();
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes) {
        let (kind, der) = section.map_err(|e| not_pem(e.to_string()))?;
        match kind {
            SectionKind::Certificate => certs.push(CertificateDer::from(der)),
            SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey => {
                return Err(format!(
                    "the CA file {shown} contains a private key: give only the certificate(s); the key belongs to the shop's web server alone"
                ));
            }
            // CRLs, public keys and the like are not roots: ignored.
            _ => {}
        }
    }
    if certs.is_empty() {
        return Err(not_pem("no certificate found".into()));
    }
    let mut store = rustls::RootCertStore::empty();
    for (i, c) in certs.iter().enumerate() {
        store.add(c.clone()).map_err(|e| {
            not_pem(format!(
                "certificate {} of {} cannot be a trust anchor ({e})",
                i + 1,
                certs.len()
            ))
        })?;
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn refuses_what_is_not_a_ca_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let e = load_ca_file(Path::new("ca.pem")).unwrap_err();
        assert!(e.contains("absolute"), "{e}");
        let missing = dir.path().join("missing.pem");
        let e = load_ca_file(&missing).unwrap_err();
        assert!(
            e.contains("cannot read the CA file") && e.contains("missing.pem"),
            "{e}"
        );
        let p = write(dir.path(), "text.pem", b"hello, not a certificate\n");
        let e = load_ca_file(&p).unwrap_err();
        assert!(e.contains("no certificate found"), "{e}");
        let p = write(
            dir.path(),
            "bad.pem",
            b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        );
        let e = load_ca_file(&p).unwrap_err();
        assert!(e.contains("not a usable PEM"), "{e}");
        let p = write(
            dir.path(),
            "junk.pem",
            b"-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        );
        let e = load_ca_file(&p).unwrap_err();
        assert!(e.contains("trust anchor"), "{e}");
        let p = write(
            dir.path(),
            "key.pem",
            b"-----BEGIN PRIVATE KEY-----\naGVsbG8=\n-----END PRIVATE KEY-----\n",
        );
        let e = load_ca_file(&p).unwrap_err();
        assert!(e.contains("private key"), "{e}");
        assert!(!e.contains("aGVsbG8"), "{e}");
    }
}
