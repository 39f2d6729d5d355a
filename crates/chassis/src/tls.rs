//! Outbound TLS: every connection a service opens verifies who it talks to.
//!
//! # The standard
//!
//! A service reaches other services, its identity provider's key set and
//! token endpoint over the network. Every `https://` connection it opens:
//!
//! * **verifies the server's certificate chain and host name**, always.
//!   There is no setting that turns verification off: a test that needs a
//!   private CA gives the CA, never a switch;
//! * trusts the **platform's roots** (the system store, read through
//!   `rustls-native-certs`, which honours `SSL_CERT_FILE` and
//!   `SSL_CERT_DIR`) **plus** the PEM bundle in `CHASSIS_TLS_CA_FILE`, for
//!   private PKIs (a corporate CA, a mesh's CA, a test CA);
//! * speaks TLS 1.3 or 1.2 through rustls on the aws-lc-rs provider, the same
//!   crypto library that verifies tokens;
//! * offers **HTTP/2 by ALPN** and falls back to HTTP/1.1 when the server
//!   does not take it.
//!
//! `http://` stays available, and is right in two places only: loopback
//! (tests, a sidecar on `127.0.0.1`) and a service mesh whose sidecar
//! terminates mutual TLS for the service (Linkerd, Istio). Anywhere else the
//! path between two services is not trusted: a key set fetched over plain
//! HTTP can be swapped by anyone on the path, who can then mint tokens for
//! any user, and a client secret sent over it can be read. The chassis logs
//! a warning at start-up when a key set or token endpoint is reached over
//! plain HTTP on a host that is not loopback.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `CHASSIS_TLS_CA_FILE` | none | a PEM file of extra CA certificates trusted next to the platform's |
//!
//! A `CHASSIS_TLS_CA_FILE` that cannot be read or holds no certificate
//! stops start-up with the other configuration problems (exit 78): the
//! service builder reads it with [`Config`](crate::Config) and installs the
//! result as [`ClientTls::global`].
//!
//! # How the chassis does it
//!
//! One [`ClientTls`] (a rustls client configuration) serves every outbound
//! connection: the [`client`](crate::client) downstreams, the
//! [`TokenSource`](crate::client::TokenSource), and the key sets and OpenID
//! discovery of [`auth`](crate::auth). Each takes the process-wide
//! [`ClientTls::global`] unless given one, so a test can trust a CA it made
//! without touching the process environment.
//!
//! This module is the `tls` feature, which `jwt` and `client` enable.
//!
//! # Example
//!
//! ```
//! use chassis::tls::ClientTls;
//!
//! // The platform's roots plus nothing else; `CHASSIS_TLS_CA_FILE` is read
//! // by `ClientTls::global()` and by the service builder's configuration.
//! let tls = ClientTls::new(None).unwrap();
//! assert!(format!("{tls:?}").contains("ClientTls"));
//!
//! // A PEM that holds no certificate is refused, with the reason.
//! let err = ClientTls::new(Some(b"not a certificate")).unwrap_err();
//! assert!(err.to_string().contains("no certificate"));
//! ```

#![cfg_attr(
    not(any(feature = "jwt", feature = "client")),
    allow(
        dead_code,
        reason = "with `tls` alone nothing opens a connection: the connector and its helpers serve `jwt` and `client`"
    )
)]

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::Duration,
};

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, pem::PemObject};

/// The environment variable naming extra trusted CA certificates.
pub const CA_FILE_VAR: &str = "CHASSIS_TLS_CA_FILE";

/// Why a TLS client configuration could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The CA file could not be read.
    #[error("cannot read CA file {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The PEM holds no usable certificate, or a malformed one.
    #[error("{0}")]
    Pem(String),
}

/// The TLS settings of every outbound connection: trusted roots, protocol
/// versions and ALPN. See the [module docs](self).
///
/// Cheap to clone (an `Arc`).
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    /// The trusted certificates, for clients that take roots one by one.
    certificates: Arc<[CertificateDer<'static>]>,
    roots: usize,
    extra: usize,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("roots", &self.roots)
            .field("extra_roots", &self.extra)
            .finish_non_exhaustive()
    }
}

/// The platform's roots, read once per process.
fn platform_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "a platform root certificate could not be loaded");
        }
        found.certs
    })
}

impl ClientTls {
    /// The platform's roots, plus the CA certificates in `extra_ca_pem`
    /// when given.
    ///
    /// # Errors
    ///
    /// A PEM that holds no certificate, or a malformed one.
    pub fn new(extra_ca_pem: Option<&[u8]>) -> Result<Self, TlsError> {
        let extra = match extra_ca_pem {
            Some(pem) => parse_pem(pem)?,
            None => Vec::new(),
        };
        let mut roots = RootCertStore::empty();
        let mut certificates = Vec::new();
        for cert in platform_roots() {
            if roots.add(cert.clone()).is_ok() {
                certificates.push(cert.clone());
            }
        }
        let extra_count = extra.len();
        for (i, cert) in extra.into_iter().enumerate() {
            roots.add(cert.clone()).map_err(|e| {
                TlsError::Pem(format!("CA certificate {} is not usable: {e}", i + 1))
            })?;
            certificates.push(cert);
        }
        if roots.is_empty() {
            tracing::warn!(
                "no trusted root certificates (none on the platform, {CA_FILE_VAR} unset): every https:// connection will fail"
            );
        }
        Ok(Self::with_roots(roots, certificates, extra_count))
    }

    fn with_roots(
        roots: RootCertStore,
        certificates: Vec<CertificateDer<'static>>,
        extra: usize,
    ) -> Self {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let n = roots.len();
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("aws-lc-rs supports TLS 1.2 and 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self {
            config: Arc::new(config),
            certificates: certificates.into(),
            roots: n,
            extra,
        }
    }

    /// The platform's roots plus the CA certificates in the PEM file at
    /// `path`, when given.
    ///
    /// # Errors
    ///
    /// The file cannot be read, or holds no usable certificate.
    pub fn from_ca_file(path: Option<&Path>) -> Result<Self, TlsError> {
        match path {
            None => Self::new(None),
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| TlsError::Read {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?;
                Self::new(Some(&pem)).map_err(|e| match e {
                    TlsError::Pem(m) => TlsError::Pem(format!("{}: {m}", path.display())),
                    other => other,
                })
            }
        }
    }

    /// The platform's roots only.
    fn platform() -> Self {
        let mut roots = RootCertStore::empty();
        let mut certificates = Vec::new();
        for cert in platform_roots() {
            if roots.add(cert.clone()).is_ok() {
                certificates.push(cert.clone());
            }
        }
        Self::with_roots(roots, certificates, 0)
    }

    /// The process-wide settings: those the service builder installed from
    /// its configuration, or else read from `CHASSIS_TLS_CA_FILE` on first
    /// use (an unusable file is logged, and only the platform's roots are
    /// trusted: nothing extra is trusted by mistake).
    pub fn global() -> Self {
        GLOBAL
            .get_or_init(|| {
                let path = std::env::var_os(CA_FILE_VAR).map(PathBuf::from);
                Self::from_ca_file(path.as_deref()).unwrap_or_else(|e| {
                    tracing::error!(error = %e, "{CA_FILE_VAR} is unusable; trusting the platform's roots only");
                    Self::platform()
                })
            })
            .clone()
    }

    /// Makes `self` the process-wide settings, unless some were installed or
    /// used already. Returns whether it did.
    pub fn install_global(self) -> bool {
        GLOBAL.set(self).is_ok()
    }

    /// How many root certificates are trusted.
    pub fn root_count(&self) -> usize {
        self.roots
    }

    /// How many of them came from `CHASSIS_TLS_CA_FILE` (or the PEM given).
    pub fn extra_root_count(&self) -> usize {
        self.extra
    }

    /// The trusted root certificates, for a client that takes them one by
    /// one (lettre's STARTTLS, for example).
    pub fn root_certificates(&self) -> &[CertificateDer<'static>] {
        &self.certificates
    }

    /// The rustls client configuration (roots, versions, aws-lc-rs), for a
    /// client the chassis does not build, such as implicit TLS on a
    /// service's own socket. Its ALPN list is empty; set one on a copy if
    /// the protocol needs it.
    pub fn rustls_config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
    }

    /// A connector for hyper-util's client: TLS for `https://`, plain TCP
    /// for `http://`, HTTP/2 offered by ALPN.
    pub(crate) fn connector(
        &self,
        connect_timeout: Option<Duration>,
    ) -> HttpsConnector<HttpConnector> {
        self.connector_for(connect_timeout, None)
    }

    /// A connector whose TLS connections verify the server as
    /// `server_name` when given (a downstream whose URIs name the resolved
    /// address of a host name), or as the URI's host otherwise.
    pub(crate) fn connector_for(
        &self,
        connect_timeout: Option<Duration>,
        server_name: Option<&str>,
    ) -> HttpsConnector<HttpConnector> {
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(connect_timeout);
        tcp.enforce_http(false);
        let builder = HttpsConnectorBuilder::new()
            .with_tls_config((*self.config).clone())
            .https_or_http();
        let builder = match server_name
            .and_then(|name| rustls_pki_types::ServerName::try_from(name.to_owned()).ok())
        {
            Some(name) => {
                builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
            }
            None => builder,
        };
        builder.enable_all_versions().wrap_connector(tcp)
    }
}

static GLOBAL: OnceLock<ClientTls> = OnceLock::new();

fn parse_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(format!("malformed PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Pem(
            "no certificate in the PEM (expected -----BEGIN CERTIFICATE-----)".to_owned(),
        ));
    }
    Ok(certs)
}

/// An error and its sources, `: `-separated: a TLS failure shows its cause
/// (for example `invalid peer certificate: UnknownIssuer`), never a secret.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    message
}

/// Whether `uri` is plain `http://` to a host that is not loopback: a
/// connection anyone on the path can read and change.
pub(crate) fn is_plain_remote(uri: &http::Uri) -> bool {
    if uri.scheme() != Some(&http::uri::Scheme::HTTP) {
        return false;
    }
    let host = uri.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !loopback
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_remote_is_told_apart_from_loopback() {
        let p = |s: &str| is_plain_remote(&s.parse().unwrap());
        assert!(p("http://auth.internal/jwks"));
        assert!(p("http://10.0.0.1:8080/"));
        assert!(!p("http://127.0.0.1:8081/jwks"));
        assert!(!p("http://localhost:8081/jwks"));
        assert!(!p("http://[::1]:8081/jwks"));
        assert!(!p("https://auth.internal/jwks"));
    }

    #[test]
    fn bad_ca_files_are_refused_with_the_reason() {
        let err = ClientTls::from_ca_file(Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read CA file /nonexistent/ca.pem"),
            "{err}"
        );
        let err = ClientTls::new(Some(
            b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        ))
        .unwrap_err();
        assert!(matches!(err, TlsError::Pem(_)), "{err}");
    }
}
