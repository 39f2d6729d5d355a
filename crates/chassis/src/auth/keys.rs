//! Verification keys: where a token's key comes from, and which algorithms it
//! may verify. The algorithm always comes from the key (its JWK `alg`, its
//! type and curve, the configured allow-list), never from the token header.

use std::{collections::HashMap, fmt, sync::Arc};

use jsonwebtoken::{Algorithm, DecodingKey, jwk::Jwk};

use super::Reason;

/// The algorithms accepted when none are configured: `EdDSA,ES256,RS256`.
pub const DEFAULT_ALGORITHMS: [Algorithm; 3] =
    [Algorithm::EdDSA, Algorithm::ES256, Algorithm::RS256];

/// Shortest HMAC secret accepted (RFC 7518 §3.2: at least the hash size).
pub const MIN_HMAC_SECRET: usize = 32;

/// One verification key.
#[derive(Clone)]
pub struct Key {
    pub(crate) kid: Option<Arc<str>>,
    pub(crate) algorithms: Vec<Algorithm>,
    pub(crate) key: Arc<DecodingKey>,
    /// What the key is (its public parameters), to tell when a key set
    /// changes the key under a `kid`.
    material: Arc<str>,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// Why a configured key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The PEM could not be read as a key of that kind.
    #[error("not a valid {0} public key in PEM form")]
    Pem(&'static str),
    /// The JWK could not be used.
    #[error("unusable JWK: {0}")]
    Jwk(String),
    /// An HMAC secret shorter than 32 bytes.
    #[error("HMAC secrets must be at least {MIN_HMAC_SECRET} bytes")]
    ShortSecret,
    /// The algorithm does not fit the key, or is not allowed.
    #[error("algorithm {0:?} does not fit this key or is not allowed")]
    Algorithm(Algorithm),
}

impl Key {
    /// A public key in PEM form for one algorithm (RSA, EC or Ed25519).
    ///
    /// # Errors
    ///
    /// If the PEM does not hold a key of the algorithm's family.
    pub fn from_pem(kid: Option<&str>, algorithm: Algorithm, pem: &[u8]) -> Result<Self, KeyError> {
        use jsonwebtoken::AlgorithmFamily as F;
        let key = match algorithm.family() {
            F::Rsa => DecodingKey::from_rsa_pem(pem).map_err(|_| KeyError::Pem("RSA"))?,
            F::Ec => DecodingKey::from_ec_pem(pem).map_err(|_| KeyError::Pem("EC"))?,
            F::Ed => DecodingKey::from_ed_pem(pem).map_err(|_| KeyError::Pem("Ed25519"))?,
            _ => return Err(KeyError::Algorithm(algorithm)),
        };
        Ok(Self {
            kid: kid.map(Into::into),
            algorithms: vec![algorithm],
            key: Arc::new(key),
            material: String::from_utf8_lossy(pem).into(),
        })
    }

    /// An HMAC key. Only ever from explicit configuration, and at least 32
    /// bytes long.
    ///
    /// # Errors
    ///
    /// A short secret, or a non-HMAC algorithm.
    pub fn hmac(kid: Option<&str>, algorithm: Algorithm, secret: &[u8]) -> Result<Self, KeyError> {
        if algorithm.family() != jsonwebtoken::AlgorithmFamily::Hmac {
            return Err(KeyError::Algorithm(algorithm));
        }
        if secret.len() < MIN_HMAC_SECRET {
            return Err(KeyError::ShortSecret);
        }
        Ok(Self {
            kid: kid.map(Into::into),
            algorithms: vec![algorithm],
            key: Arc::new(DecodingKey::from_secret(secret).map_err(|_| KeyError::ShortSecret)?),
            // Never compared: fixed keys are never refreshed.
            material: "".into(),
        })
    }

    /// A key from one JWK of a remote set, if it is usable for signatures
    /// with an algorithm in `allowed`: `use` absent or `sig`; `kty` RSA, EC
    /// (P-256, P-384) or OKP (Ed25519), never `oct`; a JWK `alg`, if given,
    /// fitting the key and allowed.
    ///
    /// # Errors
    ///
    /// Why the key is not usable.
    pub fn from_jwk_value(
        value: &serde_json::Value,
        allowed: &[Algorithm],
    ) -> Result<Self, KeyError> {
        let field = |name: &str| value.get(name).and_then(serde_json::Value::as_str);
        if value.get("use").is_some_and(|u| u.as_str() != Some("sig")) {
            return Err(KeyError::Jwk("`use` is not `sig`".to_owned()));
        }
        let candidates: &[Algorithm] = match (field("kty"), field("crv")) {
            (Some("RSA"), _) => &[
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            (Some("EC"), Some("P-256")) => &[Algorithm::ES256],
            (Some("EC"), Some("P-384")) => &[Algorithm::ES384],
            (Some("OKP"), Some("Ed25519")) => &[Algorithm::EdDSA],
            (Some("oct"), _) => {
                return Err(KeyError::Jwk(
                    "symmetric keys are never taken from a key set".to_owned(),
                ));
            }
            (kty, crv) => {
                return Err(KeyError::Jwk(format!(
                    "unsupported key type {kty:?}/{crv:?}"
                )));
            }
        };
        let mut algorithms: Vec<Algorithm> = match value.get("alg") {
            None => candidates.to_vec(),
            Some(alg) => {
                let alg: Algorithm = alg
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(|| KeyError::Jwk("unknown `alg`".to_owned()))?;
                if !candidates.contains(&alg) {
                    return Err(KeyError::Algorithm(alg));
                }
                vec![alg]
            }
        };
        algorithms.retain(|a| allowed.contains(a));
        if algorithms.is_empty() {
            return Err(KeyError::Jwk(
                "no allowed algorithm fits this key".to_owned(),
            ));
        }
        let jwk: Jwk =
            serde_json::from_value(value.clone()).map_err(|e| KeyError::Jwk(e.to_string()))?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| KeyError::Jwk(e.to_string()))?;
        let kid = match value.get("kid") {
            None => None,
            Some(k) => Some(
                k.as_str()
                    .ok_or_else(|| KeyError::Jwk("`kid` is not a string".to_owned()))?
                    .into(),
            ),
        };
        let material = ["kty", "crv", "n", "e", "x", "y"]
            .iter()
            .map(|name| field(name).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("|");
        Ok(Self {
            kid,
            algorithms,
            key: Arc::new(key),
            material: material.into(),
        })
    }

    /// The key id.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The algorithms this key verifies.
    pub fn algorithms(&self) -> &[Algorithm] {
        &self.algorithms
    }
}

/// A set of keys, looked up by `kid`. Keys sharing a `kid` make that `kid`
/// ambiguous: tokens naming it are refused rather than verified with
/// whichever key comes first.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    by_kid: HashMap<Arc<str>, Option<Key>>,
    without_kid: Vec<Key>,
}

impl KeySet {
    /// A set from keys.
    pub fn new(keys: impl IntoIterator<Item = Key>) -> Self {
        let mut set = Self::default();
        for key in keys {
            match key.kid.clone() {
                Some(kid) => match set.by_kid.get_mut(&*kid) {
                    None => {
                        set.by_kid.insert(kid, Some(key));
                    }
                    // `None` marks the kid ambiguous for good.
                    Some(slot) => {
                        if slot.take().is_some() {
                            tracing::error!(kid = %kid, "two keys share one kid; tokens with this kid are refused");
                        }
                    }
                },
                None => set.without_kid.push(key),
            }
        }
        set
    }

    /// Parses a JWKS document, keeping the usable keys. Unusable keys (an
    /// unknown `kty`, `oct`, `use: enc`, a disallowed `alg`) are skipped, so
    /// one odd key cannot stop verification for the whole issuer.
    ///
    /// # Errors
    ///
    /// If the document is not a JSON object with a `keys` array.
    pub fn from_jwks(json: &[u8], allowed: &[Algorithm]) -> Result<Self, KeyError> {
        let doc: serde_json::Value =
            serde_json::from_slice(json).map_err(|_| KeyError::Jwk("not JSON".to_owned()))?;
        let keys = doc
            .get("keys")
            .and_then(serde_json::Value::as_array)
            .ok_or_else(|| KeyError::Jwk("no `keys` array".to_owned()))?;
        let usable = keys
            .iter()
            .filter_map(|k| match Key::from_jwk_value(k, allowed) {
                Ok(key) => Some(key),
                Err(e) => {
                    tracing::debug!(error = %e, "JWKS key skipped");
                    None
                }
            });
        Ok(Self::new(usable))
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.by_kid.values().filter(|k| k.is_some()).count() + self.without_kid.len()
    }

    /// Whether the set has no usable key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `kid` names a key (or an ambiguous pair) in this set.
    pub fn contains_kid(&self, kid: &str) -> bool {
        self.by_kid.contains_key(kid)
    }

    /// Every kid in the set.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.by_kid.keys().map(|k| &**k)
    }

    /// Whether every key of `old` that a token could have been verified
    /// with is in this set unchanged: each unambiguous `kid` names the same
    /// key material with the same algorithms, and each key without a `kid`
    /// is still there. When not, verifications made with `old` must stop
    /// counting.
    pub(crate) fn still_vouches_for(&self, old: &KeySet) -> bool {
        let same = |a: &Key, b: &Key| a.material == b.material && a.algorithms == b.algorithms;
        let kids_kept = old.by_kid.iter().all(|(kid, key)| match key {
            // Ambiguous before: no token was verified with it.
            None => true,
            Some(key) => matches!(self.by_kid.get(kid), Some(Some(now)) if same(key, now)),
        });
        kids_kept
            && old
                .without_kid
                .iter()
                .all(|key| self.without_kid.iter().any(|now| same(key, now)))
    }

    /// The key for a token with `kid` (or none) signed with `alg`.
    pub(crate) fn select(&self, kid: Option<&str>, alg: Algorithm) -> Result<&Key, Reason> {
        match kid {
            Some(kid) => match self.by_kid.get(kid) {
                Some(Some(key)) if key.algorithms.contains(&alg) => Ok(key),
                Some(Some(_)) => Err(Reason::AlgNotAllowed),
                // Ambiguous, or not there.
                Some(None) | None => Err(Reason::UnknownKid),
            },
            None => {
                let fitting: Vec<&Key> = self
                    .without_kid
                    .iter()
                    .chain(self.by_kid.values().flatten())
                    .filter(|k| k.algorithms.contains(&alg))
                    .collect();
                match fitting.as_slice() {
                    [one] => Ok(one),
                    [] if self.is_empty() => Err(Reason::UnknownKid),
                    [] => Err(Reason::AlgNotAllowed),
                    _ => Err(Reason::UnknownKid),
                }
            }
        }
    }
}
