//! Test support: tokens a service under test accepts, without an identity
//! provider.
//!
//! # The standard
//!
//! A service's API tests go through the real authentication and
//! authorization path: real signed tokens, the real verifier, the real
//! permission check. [`TestIssuer`] signs EdDSA tokens with a fixed test key
//! (published in this crate, so it protects nothing) and builds the
//! [`Verifier`] that trusts exactly that key, to hand to
//! [`ServiceBuilder::verifier`](crate::ServiceBuilder::verifier).
//!
//! Outbound TLS is tested the same way: [`TestPki`] makes a private CA at
//! test time, issues server certificates (valid, expired, for other names),
//! serves a router over HTTPS on loopback, and gives the
//! [`ClientTls`](crate::tls::ClientTls) that trusts it, as
//! `CHASSIS_TLS_CA_FILE` does in production.
//!
//! A service's API is tested through a real socket with [`TestServer`]:
//! its builder served in the test's process on a loopback port. Its own
//! binary is tested as operators run it:
//! [`ServiceProcess`] starts it on a free loopback port with a temporary
//! data directory, waits for `/health/ready`, and stops it with SIGTERM,
//! asserting exit 0 and handing back its JSON log lines; [`ProcessCheck`]
//! is the check every service's binary must pass (the standard endpoints,
//! a refused call's access line and audit event with its correlation id, a
//! clean stop), in one call. [`TempDir`], [`eventually`] and [`refusal`]
//! are the small pieces every service's tests need. [`TcpProxy`] stands
//! between a service and a real server (a broker, a database) so that a
//! test can cut the connection and restore it. [`Browser`]
//! runs headless Chromium on a page (the docs page, see
//! [`api::docs_ui`](crate::api::docs_ui)) and reports its rendered DOM,
//! its console and every request that tried to leave loopback. With the
//! `contract` feature, [`contract`] records what a consumer's driver client relies on
//! and checks it against the provider's document (consumer-driven
//! contracts).
//! [`Schemathesis`] runs property-based tests of a running service against
//! its own OpenAPI document: every check, a fixed seed, a bounded number
//! of cases.
//!
//! Enable with the `testing` feature, in `[dev-dependencies]` only; it
//! enables `jwt`, `tls` and `client`.
//!
//! # Example
//!
//! ```
//! use chassis::testing::TestIssuer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let issuer = TestIssuer::new();
//! let token = issuer.user_token("alice", &["ticketing:acme:view:ticket"]);
//! let principal = issuer.verifier().verify_token(&token).await.unwrap();
//! assert_eq!(principal.subject(), "alice");
//!
//! // The same key as a JWKS document, for a verifier that fetches keys.
//! let jwks = serde_json::to_vec(&issuer.jwks()).unwrap();
//! let keys = chassis::auth::KeySet::from_jwks(&jwks, &[jsonwebtoken::Algorithm::EdDSA]).unwrap();
//! assert!(keys.contains_kid("chassis-test-key"));
//! # }
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::auth::{Key, Verifier};

mod browser;
#[cfg(feature = "contract")]
#[cfg_attr(docsrs, doc(cfg(feature = "contract")))]
pub mod contract;
#[cfg(feature = "postgres")]
mod database;
#[cfg(feature = "nats")]
mod nats;
mod openapi;
mod otlp;
mod pki;
mod process;
mod proxy;
mod schemathesis;
mod server;
mod support;
mod token_endpoint;

pub use browser::{BROWSER_WITHIN, Browser, CHROMIUM_VAR, Loaded};
#[cfg(feature = "postgres")]
pub use database::{
    BACKEND_VAR, DEFAULT_POSTGRES, POSTGRES_VAR, TestDatabase, TestPostgres, test_backend,
};
#[cfg(feature = "nats")]
pub use nats::{DEFAULT_NATS, NATS_VAR, TestNats};
pub use openapi::{Documented, OPENAPI_DIR_VAR, assert_documents, fetch_openapi};
pub use otlp::{OtlpReceiver, ReceivedEvent, ReceivedSpan};
pub use pki::{TestCert, TestPki};
pub use process::{
    ProcessCheck, READY_WITHIN, ServiceProcess, ServiceProcessBuilder, parse_lines,
    refused_settings,
};
pub use proxy::TcpProxy;
pub use schemathesis::{
    SCHEMATHESIS_MAX_EXAMPLES, SCHEMATHESIS_MAX_EXAMPLES_VAR, SCHEMATHESIS_SEED,
    SCHEMATHESIS_SEED_VAR, SCHEMATHESIS_VAR, SCHEMATHESIS_WITHIN, Schemathesis,
};
pub use server::TestServer;
pub use support::{
    EVENTUALLY_WITHIN, REQUIRE_VAR, TempDir, eventually, eventually_within, refusal,
};

const PRIVATE_PEM: &[u8] = include_bytes!("testing/test-ed25519.pem");
const PUBLIC_PEM: &[u8] = include_bytes!("testing/test-ed25519.pub.pem");
const KID: &str = "chassis-test-key";

/// Signs test tokens and builds the verifier that accepts them.
#[derive(Clone)]
pub struct TestIssuer {
    issuer: String,
    audience: String,
    key: EncodingKey,
}

impl std::fmt::Debug for TestIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestIssuer")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl Default for TestIssuer {
    fn default() -> Self {
        Self::new()
    }
}

impl TestIssuer {
    /// Issuer `https://issuer.test`, audience `chassis-test`.
    pub fn new() -> Self {
        Self::with("https://issuer.test", "chassis-test")
    }

    /// A test issuer with the given `iss` and `aud`.
    pub fn with(issuer: &str, audience: &str) -> Self {
        Self {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            key: EncodingKey::from_ed_pem(PRIVATE_PEM).expect("the test key is valid"),
        }
    }

    /// The verifier trusting this issuer's key, and only it.
    pub fn verifier(&self) -> Verifier {
        self.verifier_builder()
            .build()
            .expect("a verifier over fixed keys builds")
    }

    /// A builder of the verifier trusting this issuer's key, for tests that
    /// set its leeway or clock.
    ///
    /// ```
    /// let verifier = chassis::testing::TestIssuer::new()
    ///     .verifier_builder()
    ///     .leeway(std::time::Duration::ZERO)
    ///     .build()
    ///     .unwrap();
    /// # let _ = verifier;
    /// ```
    pub fn verifier_builder(&self) -> crate::auth::VerifierBuilder {
        let key =
            Key::from_pem(Some(KID), Algorithm::EdDSA, PUBLIC_PEM).expect("the test key is valid");
        Verifier::builder()
            .keys(&self.issuer, &self.audience, vec![key])
            .algorithms(&[Algorithm::EdDSA])
    }

    /// The JWKS document publishing this issuer's key, for tests that
    /// serve it to a verifier configured with a JWKS URL.
    pub fn jwks(&self) -> Value {
        use base64::Engine as _;
        // The SPKI of an Ed25519 key ends with the 32 bytes of the key.
        let der: Vec<u8> = {
            let body: String = std::str::from_utf8(PUBLIC_PEM)
                .expect("the test key is ASCII")
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect();
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .expect("the test key is valid base64")
        };
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&der[der.len() - 32..]);
        json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": KID, "alg": "EdDSA", "use": "sig"}]})
    }

    /// A user's token with `perms`, valid for 15 minutes.
    pub fn user_token(&self, subject: &str, perms: &[&str]) -> String {
        self.token(subject, "user", perms)
    }

    /// The context of a call made on behalf of user `subject` holding
    /// `perms`: this issuer's token for them, verified, as a handler's
    /// [`CallContext`](crate::client::CallContext) carries it. Hand it to a
    /// driver client's `on_behalf_of` to call a service as that user.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let cx = chassis::testing::TestIssuer::new().user_context("alice", &["ticketing:acme:*:*"]).await;
    /// assert_eq!(cx.principal().unwrap().subject(), "alice");
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// Never for the issuer's own tokens (a panic is the test's failure).
    pub async fn user_context(&self, subject: &str, perms: &[&str]) -> crate::client::CallContext {
        let principal = self
            .verifier()
            .verify_token(&self.user_token(subject, perms))
            .await
            .expect("the test issuer's tokens verify");
        crate::client::CallContext::background().with_principal(principal)
    }

    /// A service's token with `perms`, valid for 15 minutes.
    pub fn service_token(&self, subject: &str, perms: &[&str]) -> String {
        self.token(subject, "service", perms)
    }

    fn token(&self, subject: &str, kind: &str, perms: &[&str]) -> String {
        let now = now();
        self.sign(&json!({
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "iat": now,
            "nbf": now,
            "exp": now + Duration::from_secs(900).as_secs(),
            "kind": kind,
            "perms": perms,
        }))
    }

    /// A [`TokenSource`](crate::client::TokenSource) for the service
    /// `client_id` holding `perms`, from a token endpoint this issuer serves
    /// on loopback until the runtime ends: the client-credentials grant
    /// (with `audience`, else this issuer's audience) and RFC 8693 token
    /// exchange (the subject token's `sub`, `kind` and `perms`, the audience
    /// asked for, `act` naming the client). Service-identity calls are then
    /// tested in-process, through the real client and verifier.
    ///
    /// ```
    /// use chassis::testing::TestIssuer;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let issuer = TestIssuer::new();
    /// let tokens = issuer.token_source("orders", &["ticketing:*:reserve:ticket"]).await;
    /// let header = tokens.authorization().await.unwrap();
    /// let token = header.to_str().unwrap().strip_prefix("Bearer ").unwrap();
    /// let principal = issuer.verifier().verify_token(token).await.unwrap();
    /// assert_eq!(principal.subject(), "orders");
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// If no loopback port can be bound (a test helper: the panic is the
    /// test's failure).
    pub async fn token_source(
        &self,
        client_id: &str,
        perms: &[&str],
    ) -> crate::client::TokenSource {
        token_endpoint::serve(self.clone(), client_id, perms).await
    }

    fn public_key(&self) -> jsonwebtoken::DecodingKey {
        jsonwebtoken::DecodingKey::from_ed_pem(PUBLIC_PEM).expect("the test key is valid")
    }

    /// Signs any claims (for tests of expired or malformed tokens).
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(KID.to_owned());
        jsonwebtoken::encode(&header, claims, &self.key).expect("claims serialize")
    }
}

/// Seconds since the epoch.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
