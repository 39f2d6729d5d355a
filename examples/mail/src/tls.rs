//! TLS to the SMTP relay: the chassis' outbound TLS settings
//! ([`chassis::tls`]: the platform's roots, honouring `SSL_CERT_FILE` and
//! `SSL_CERT_DIR`, plus `CHASSIS_TLS_CA_FILE`, on aws-lc-rs), and errors an
//! operator can act on. The relay's certificate chain and host name are
//! always verified: there is no switch to turn either off.

use chassis::tls::ClientTls;

/// The chassis' TLS settings (the platform's roots plus
/// `CHASSIS_TLS_CA_FILE`), checked to trust at least one root: without one,
/// no relay could ever be reached over TLS.
pub(crate) fn trust(tls: &ClientTls) -> Result<ClientTls, String> {
    if tls.root_count() == 0 {
        return Err(format!(
            "no trusted root certificates for TLS: none in the platform store \
             (SSL_CERT_FILE, SSL_CERT_DIR) and {} is not set",
            chassis::tls::CA_FILE_VAR
        ));
    }
    tracing::info!(
        roots = tls.root_count(),
        extra_roots = tls.extra_root_count(),
        "TLS roots for the SMTP relay"
    );
    Ok(tls.clone())
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
