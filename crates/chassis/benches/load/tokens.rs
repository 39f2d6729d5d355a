//! Tokens for the load: signed with the test fixtures' keys, valid for an
//! hour, granting `ticketing:acme:view:ticket`.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::variants::{AUD, ISS};

const RSA_PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/rsa1.pem");
const ED_PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/ed.pem");

/// The account every request is for.
pub(crate) const ACCOUNT: &str = "acme";

/// Signs tokens with one algorithm.
pub(crate) struct Signer {
    header: Header,
    key: EncodingKey,
}

impl Signer {
    pub(crate) fn new(alg: Algorithm) -> Self {
        let (kid, key) = match alg {
            Algorithm::EdDSA => ("ed", EncodingKey::from_ed_pem(ED_PRIVATE)),
            _ => ("rsa", EncodingKey::from_rsa_pem(RSA_PRIVATE)),
        };
        Self {
            header: Header {
                kid: Some(kid.to_owned()),
                ..Header::new(alg)
            },
            key: key.expect("the fixture key is valid"),
        }
    }

    /// A token for subject `sub`.
    pub(crate) fn token(&self, sub: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let claims = json!({
            "iss": ISS, "aud": AUD, "sub": sub, "iat": now, "exp": now + 3600,
            "perms": [format!("ticketing:{ACCOUNT}:view:ticket")],
        });
        jsonwebtoken::encode(&self.header, &claims, &self.key).expect("the token signs")
    }

    /// `n` distinct tokens.
    pub(crate) fn pool(&self, n: usize) -> Vec<String> {
        (0..n).map(|i| self.token(&format!("user-{i}"))).collect()
    }
}
