//! TLS to the SMTP relay: which certificate authorities are trusted, the
//! rustls client configuration (aws-lc-rs), and errors an operator can act
//! on.
//!
//! Trusted: the platform's roots (through `rustls-native-certs`, which
//! honours `SSL_CERT_FILE` and `SSL_CERT_DIR`) plus every certificate of the
//! PEM bundle in `CHASSIS_TLS_CA_FILE`, for private PKIs. The relay's
//! certificate chain and host name are always verified: there is no switch
//! to turn either off.

use std::{fmt, path::PathBuf, sync::Arc};

use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, pem::PemObject as _},
};

/// The variable naming a PEM bundle of extra certificate authorities.
pub(crate) const CA_FILE_VAR: &str = "CHASSIS_TLS_CA_FILE";

/// The certificate authorities of `CHASSIS_TLS_CA_FILE`, read and checked
/// at start-up.
#[derive(Clone)]
pub struct CaBundle {
    path: PathBuf,
    certs: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaBundle")
            .field("path", &self.path)
            .field("certificates", &self.certs.len())
            .finish()
    }
}

impl CaBundle {
    /// Reads the PEM bundle at `path`: one or more `CERTIFICATE` blocks,
    /// each a certificate rustls accepts as a trust anchor.
    ///
    /// # Errors
    ///
    /// A message for the configuration report when the file cannot be
    /// read, holds no certificate, or holds one that cannot be parsed.
    pub fn read(path: impl Into<PathBuf>) -> Result<Self, String> {
        let path = path.into();
        let pem = std::fs::read(&path)
            .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{} is not a PEM bundle: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ));
        }
        let mut store = RootCertStore::empty();
        for (i, cert) in certs.iter().enumerate() {
            store.add(cert.clone()).map_err(|e| {
                format!(
                    "certificate {} of {} is not a usable CA certificate: {e}",
                    i + 1,
                    path.display()
                )
            })?;
        }
        Ok(Self { path, certs })
    }

    /// The file it was read from.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// How many certificates it holds.
    pub fn len(&self) -> usize {
        self.certs.len()
    }

    /// Whether it holds none (never, once read).
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }
}

/// The trust anchors of outgoing TLS: platform roots plus the CA bundle,
/// as DER (for lettre's STARTTLS) and as a rustls client configuration
/// (for implicit TLS), so both ways trust exactly the same authorities.
#[derive(Clone)]
pub(crate) struct Trust {
    pub(crate) roots: Vec<CertificateDer<'static>>,
    pub(crate) config: Arc<ClientConfig>,
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trust")
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl Trust {
    /// The platform's roots and `extra`.
    ///
    /// # Errors
    ///
    /// When no root at all is trusted (every handshake would fail), or
    /// rustls refuses the configuration.
    pub(crate) fn load(extra: Option<&CaBundle>) -> Result<Self, String> {
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!(error = %e, "cannot load some platform root certificates");
        }
        let mut store = RootCertStore::empty();
        let mut roots = Vec::new();
        for cert in native.certs {
            // Platform stores hold the odd certificate rustls cannot use;
            // skip those rather than refuse to start.
            if store.add(cert.clone()).is_ok() {
                roots.push(cert);
            }
        }
        let platform = roots.len();
        for cert in extra.map(|b| b.certs.as_slice()).unwrap_or_default() {
            store
                .add(cert.clone())
                .map_err(|e| format!("{CA_FILE_VAR}: {e}"))?;
            roots.push(cert.clone());
        }
        if roots.is_empty() {
            return Err(format!(
                "no trusted root certificates for TLS: none in the platform store \
                 (SSL_CERT_FILE, SSL_CERT_DIR) and {CA_FILE_VAR} is not set"
            ));
        }
        tracing::info!(
            platform_roots = platform,
            extra_roots = roots.len() - platform,
            "TLS roots for the SMTP relay loaded"
        );
        let config = ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_root_certificates(store)
        .with_no_client_auth();
        Ok(Self {
            roots,
            config: Arc::new(config),
        })
    }
}

/// A hint for a TLS failure anywhere in `err`'s source chain (lettre's
/// errors and `io::Error`s both wrap rustls' own), or `None` when the chain
/// holds no rustls error.
pub(crate) fn hint(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    use rustls::{CertificateError, Error};
    let mut next = Some(err);
    while let Some(e) = next {
        let found = e.downcast_ref::<Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<Error>())
        });
        if let Some(tls) = found {
            let advice = match tls {
                Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
                    "the relay's certificate is not signed by a trusted CA; \
                     add the CA to the platform store or to CHASSIS_TLS_CA_FILE"
                }
                Error::InvalidCertificate(CertificateError::BadSignature) => {
                    "the relay's certificate does not verify against the trusted CA \
                     of its issuer's name (another key?)"
                }
                Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                ) => "the relay's certificate does not name the host in MAIL_SMTP_URL",
                Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. },
                ) => "the relay's certificate has expired",
                _ => "the TLS handshake with the relay failed",
            };
            return Some(format!("TLS: {advice} ({tls})"));
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_ca_files_are_explained() {
        let dir = std::env::temp_dir().join(format!("mail-ca-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = CaBundle::read(dir.join("missing.pem")).unwrap_err();
        assert!(missing.starts_with("cannot read the CA file"), "{missing}");

        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").unwrap();
        let err = CaBundle::read(&empty).unwrap_err();
        assert!(err.contains("holds no PEM certificate"), "{err}");

        let garbage = dir.join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = CaBundle::read(&garbage).unwrap_err();
        assert!(err.contains("not a usable CA certificate"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
