//! A certificate authority made at test time, and HTTPS servers on loopback
//! that present its certificates.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::Router;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::tls::ClientTls;

/// A private certificate authority made at test time (a fresh key each
/// time): it issues server certificates, and gives the [`ClientTls`] that
/// trusts it, as `CHASSIS_TLS_CA_FILE` would.
///
/// ```
/// use chassis::testing::TestPki;
///
/// let pki = TestPki::new("test CA");
/// assert!(pki.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
/// let cert = pki.server_cert(&["localhost", "127.0.0.1"]);
/// assert!(cert.chain_pem().contains("BEGIN CERTIFICATE"));
/// ```
pub struct TestPki {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki").finish_non_exhaustive()
    }
}

/// A server certificate and its key, issued by a [`TestPki`].
#[derive(Clone)]
pub struct TestCert {
    chain: Vec<CertificateDer<'static>>,
    chain_pem: String,
    key: Arc<PrivatePkcs8KeyDer<'static>>,
}

impl std::fmt::Debug for TestCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCert").finish_non_exhaustive()
    }
}

impl TestPki {
    /// A new CA named `name` and a random suffix, so that two CAs never
    /// share a subject (a verifier would then find the other CA by name and
    /// report a bad signature instead of an unknown issuer).
    ///
    /// # Panics
    ///
    /// If key generation fails (a test helper: the panic is the test's
    /// failure).
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(
            DnType::CommonName,
            format!("{name} {:016x}", fastrand::u64(..)),
        );
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("a CA key");
        let cert = params.self_signed(&key).expect("a CA certificate");
        Self {
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate in PEM form: what goes in `CHASSIS_TLS_CA_FILE`.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// Client TLS settings trusting this CA (and the platform's roots).
    ///
    /// # Panics
    ///
    /// Never for a CA made by [`TestPki::new`].
    pub fn client_tls(&self) -> ClientTls {
        ClientTls::new(Some(self.ca_pem.as_bytes())).expect("the test CA is a valid PEM")
    }

    /// A server certificate for `names` (DNS names or IP addresses), valid
    /// from a day ago for a year.
    pub fn server_cert(&self, names: &[&str]) -> TestCert {
        self.issue(names, Duration::ZERO)
    }

    /// A server certificate for `names` whose validity ended 35 days ago.
    pub fn expired_server_cert(&self, names: &[&str]) -> TestCert {
        self.issue(names, Duration::from_secs(400 * 86_400))
    }

    fn issue(&self, names: &[&str], age: Duration) -> TestCert {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("valid names");
        params
            .distinguished_name
            .push(DnType::CommonName, "test server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = std::time::SystemTime::now();
        let day = Duration::from_secs(86_400);
        params.not_before = (now - age - day).into();
        params.not_after = (now - age + Duration::from_secs(365 * 86_400)).into();
        let key = KeyPair::generate().expect("a server key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("a server certificate");
        TestCert {
            chain_pem: format!("{}{}", cert.pem(), self.ca_pem),
            chain: vec![cert.der().clone()],
            key: Arc::new(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }
}

impl TestCert {
    /// The certificate followed by its CA's, in PEM form.
    pub fn chain_pem(&self) -> String {
        self.chain_pem.clone()
    }

    /// A rustls server configuration presenting this certificate, offering
    /// `alpn` (e.g. `[b"h2", b"http/1.1"]`).
    ///
    /// # Panics
    ///
    /// Never for a certificate made by [`TestPki`].
    pub fn server_config(&self, alpn: &[&[u8]]) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_single_cert(
                self.chain.clone(),
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )
            .expect("a matching key");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }

    /// Serves `router` over HTTPS on a free loopback port, offering HTTP/2
    /// and HTTP/1.1 by ALPN (HTTP/1.1 only when `http2` is false), until the
    /// runtime ends. Handshakes that fail are dropped.
    ///
    /// # Panics
    ///
    /// If no loopback port can be bound.
    pub async fn serve(&self, router: Router, http2: bool) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        self.serve_on(listener, router, http2)
    }

    /// [`serve`](Self::serve) on a listener bound already, for servers whose
    /// documents name their own address.
    ///
    /// # Panics
    ///
    /// If the listener has no local address.
    pub fn serve_on(
        &self,
        listener: tokio::net::TcpListener,
        router: Router,
        http2: bool,
    ) -> SocketAddr {
        let alpn: &[&[u8]] = if http2 {
            &[b"h2", b"http/1.1"]
        } else {
            &[b"http/1.1"]
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(self.server_config(alpn)));
        let addr = listener.local_addr().expect("bound");
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, router) = (acceptor.clone(), router.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = TowerToHyperService::new(router);
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        addr
    }
}
