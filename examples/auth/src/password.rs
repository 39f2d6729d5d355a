//! Password and client-secret hashing: argon2id, stored as PHC strings.
//!
//! A stored hash looks like
//! `$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>` (the PHC string format:
//! salt and hash in base64 without padding). The parameters are read back
//! from each stored string, so raising them later only affects new hashes.
//!
//! Hashing is slow and takes memory on purpose (19 MiB per hash with the
//! defaults, OWASP's recommendation), so it runs on the blocking pool, and
//! a semaphore bounds how many run at once (`AUTH_HASH_CONCURRENCY`, by
//! default half the CPUs): a burst of logins cannot take all the memory, nor
//! every core from the other routes. A check that waits longer than
//! `AUTH_HASH_QUEUE_MS` for its turn gives up with [`HashError::Busy`]
//! (the token endpoint answers 503 with `Retry-After`), so a flood is
//! refused instead of queueing without end.
//!
//! A login for a subject that does not exist is checked against a dummy
//! hash made with the same parameters, so both answers cost the same work.

use std::{sync::Arc, time::Duration};

use argon2::{Algorithm, Argon2, Block, Params, Version};
use base64::{Engine as _, engine::general_purpose::STANDARD_NO_PAD as B64};
use tokio::sync::Semaphore;

/// Salt length in bytes (the PHC format's recommended 16).
const SALT_LEN: usize = 16;
/// Hash output length in bytes.
const OUTPUT_LEN: usize = 32;
/// Largest parameters accepted from a stored string, so that a corrupt or
/// hostile row cannot make one verification take gigabytes.
const MAX_M_COST: u32 = 256 * 1024;
const MAX_T_COST: u32 = 16;
const MAX_P_COST: u32 = 16;

/// Why a hash could not be made or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HashError {
    /// The stored string is not an argon2id PHC string this service reads.
    #[error("not a usable argon2id PHC string: {0}")]
    Format(&'static str),
    /// argon2 refused the inputs or parameters.
    #[error("argon2: {0}")]
    Argon2(String),
    /// No randomness for a salt.
    #[error("no randomness available for a salt")]
    Random,
    /// The hashing task failed.
    #[error("the hashing task failed")]
    Task,
    /// Every hashing slot stayed taken for longer than the queue timeout.
    #[error("every hashing slot is taken")]
    Busy,
}

/// A parsed PHC string.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Phc {
    params: Params,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

impl Phc {
    fn parse(s: &str) -> Result<Self, HashError> {
        let mut parts = s.split('$');
        let (Some(""), Some("argon2id"), Some(version), Some(params), Some(salt), Some(hash), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(HashError::Format(
                "expected $argon2id$v=..$m=..,t=..,p=..$salt$hash",
            ));
        };
        if version != "v=19" {
            return Err(HashError::Format("only version 19 (0x13) is supported"));
        }
        let (mut m, mut t, mut p) = (None, None, None);
        for pair in params.split(',') {
            let (name, value) = pair
                .split_once('=')
                .ok_or(HashError::Format("a parameter without a value"))?;
            let value: u32 = value
                .parse()
                .map_err(|_| HashError::Format("a parameter that is not a number"))?;
            let slot = match name {
                "m" => &mut m,
                "t" => &mut t,
                "p" => &mut p,
                _ => return Err(HashError::Format("an unknown parameter")),
            };
            if slot.replace(value).is_some() {
                return Err(HashError::Format("a repeated parameter"));
            }
        }
        let (Some(m), Some(t), Some(p)) = (m, t, p) else {
            return Err(HashError::Format("m, t and p are all required"));
        };
        if m > MAX_M_COST || t > MAX_T_COST || p > MAX_P_COST {
            return Err(HashError::Format("parameters above this service's limits"));
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| HashError::Format("the salt is not base64"))?;
        let hash = B64
            .decode(hash)
            .map_err(|_| HashError::Format("the hash is not base64"))?;
        let params =
            Params::new(m, t, p, Some(hash.len())).map_err(|e| HashError::Argon2(e.to_string()))?;
        Ok(Self { params, salt, hash })
    }

    fn encode(&self) -> String {
        format!(
            "$argon2id$v=19$m={},t={},p={}${}${}",
            self.params.m_cost(),
            self.params.t_cost(),
            self.params.p_cost(),
            B64.encode(&self.salt),
            B64.encode(&self.hash)
        )
    }
}

/// Whether `stored` is an argon2id PHC string this service can verify.
pub(crate) fn check_phc(stored: &str) -> Result<(), HashError> {
    Phc::parse(stored).map(|_| ())
}

/// Runs argon2id with `params` over `secret` and `salt`.
fn derive(
    params: &Params,
    secret: &[u8],
    salt: &[u8],
    out_len: usize,
) -> Result<Vec<u8>, HashError> {
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let mut out = vec![0u8; out_len];
    let mut memory = vec![Block::default(); params.block_count()];
    argon
        .hash_password_into_with_memory(secret, salt, &mut out, &mut memory)
        .map_err(|e| HashError::Argon2(e.to_string()))?;
    Ok(out)
}

/// Hashes `secret` with a fresh salt and `params`: a PHC string.
fn hash_with(params: &Params, secret: &[u8]) -> Result<String, HashError> {
    let mut salt = [0u8; SALT_LEN];
    aws_lc_rs::rand::fill(&mut salt).map_err(|_| HashError::Random)?;
    let hash = derive(params, secret, &salt, OUTPUT_LEN)?;
    Ok(Phc {
        params: params.clone(),
        salt: salt.to_vec(),
        hash,
    }
    .encode())
}

/// Whether `secret` matches the PHC string `stored`, compared in constant
/// time. A string that cannot be read never matches.
fn verify_with(stored: &str, secret: &[u8]) -> Result<bool, HashError> {
    let phc = Phc::parse(stored)?;
    let computed = derive(&phc.params, secret, &phc.salt, phc.hash.len())?;
    Ok(aws_lc_rs::constant_time::verify_slices_are_equal(&computed, &phc.hash).is_ok())
}

/// Hashes and verifies secrets off the async threads, a bounded number at
/// a time. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Hasher {
    params: Params,
    permits: Arc<Semaphore>,
    queue_timeout: Duration,
    dummy: Arc<str>,
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hasher")
            .field("params", &self.params)
            .field("concurrency", &self.permits.available_permits())
            .field("queue_timeout", &self.queue_timeout)
            .finish_non_exhaustive()
    }
}

impl Hasher {
    /// A hasher making new hashes with `params`, at most `concurrency`
    /// hashes at once; a verification waits at most `queue_timeout` for
    /// its turn.
    pub(crate) async fn with_params(
        params: Params,
        concurrency: usize,
        queue_timeout: Duration,
    ) -> Result<Self, HashError> {
        // The dummy is the hash of a random secret nobody knows.
        let mut unknown = [0u8; 32];
        aws_lc_rs::rand::fill(&mut unknown).map_err(|_| HashError::Random)?;
        let p = params.clone();
        let dummy = tokio::task::spawn_blocking(move || hash_with(&p, &unknown))
            .await
            .map_err(|_| HashError::Task)??;
        Ok(Self {
            params,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            queue_timeout,
            dummy: dummy.into(),
        })
    }

    /// Hashes `secret`: a PHC string to store.
    pub(crate) async fn hash(&self, secret: &str) -> Result<String, HashError> {
        let _permit = self.permits.acquire().await.map_err(|_| HashError::Task)?;
        let params = self.params.clone();
        let secret = secret.as_bytes().to_vec();
        tokio::task::spawn_blocking(move || hash_with(&params, &secret))
            .await
            .map_err(|_| HashError::Task)?
    }

    /// Whether `secret` matches `stored`; with `None` (no such subject) the
    /// same work is done against the dummy hash and the answer is `false`.
    ///
    /// # Errors
    ///
    /// [`HashError::Busy`] when no hashing slot frees up within the queue
    /// timeout.
    pub(crate) async fn verify(
        &self,
        stored: Option<&str>,
        secret: &str,
    ) -> Result<bool, HashError> {
        let _permit = tokio::time::timeout(self.queue_timeout, self.permits.acquire())
            .await
            .map_err(|_| HashError::Busy)?
            .map_err(|_| HashError::Task)?;
        let known = stored.is_some();
        let stored: Arc<str> = stored.map_or_else(|| self.dummy.clone(), Into::into);
        let secret = secret.as_bytes().to_vec();
        let matched = tokio::task::spawn_blocking(move || verify_with(&stored, &secret))
            .await
            .map_err(|_| HashError::Task)??;
        Ok(known && matched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Params {
        Params::new(64, 1, 1, None).unwrap()
    }

    #[test]
    fn round_trips_and_refuses_wrong_secrets() {
        let stored = hash_with(&small(), b"alice-password").unwrap();
        assert!(
            stored.starts_with("$argon2id$v=19$m=64,t=1,p=1$"),
            "{stored}"
        );
        assert!(verify_with(&stored, b"alice-password").unwrap());
        assert!(!verify_with(&stored, b"alice-passwore").unwrap());
        assert!(!verify_with(&stored, b"").unwrap());
        // A fresh salt each time.
        assert_ne!(stored, hash_with(&small(), b"alice-password").unwrap());
    }

    #[test]
    fn reads_strings_made_elsewhere() {
        // A known-answer string of the reference implementation
        // (password "password", salt "somesalt", m = 256 KiB, t = 2).
        let stored =
            "$argon2id$v=19$m=256,t=2,p=1$c29tZXNhbHQ$nf65EOgLrQMR/uIPnA4rEsF5h7TKyQwu9U1bMCHGi/4";
        assert!(verify_with(stored, b"password").unwrap());
        assert!(!verify_with(stored, b"Password").unwrap());
    }

    #[test]
    fn refuses_malformed_and_oversized_strings() {
        for bad in [
            "",
            "plain",
            "$argon2i$v=19$m=64,t=1,p=1$c29tZXNhbHQ$AAAA",
            "$argon2id$v=16$m=64,t=1,p=1$c29tZXNhbHQ$AAAAAAAAAAAAAAAAAAAAAA",
            "$argon2id$v=19$m=64,t=1$c29tZXNhbHQ$AAAAAAAAAAAAAAAAAAAAAA",
            "$argon2id$v=19$m=64,t=1,p=1,m=64$c29tZXNhbHQ$AAAAAAAAAAAAAAAAAAAAAA",
            "$argon2id$v=19$m=4194304,t=1,p=1$c29tZXNhbHQ$AAAAAAAAAAAAAAAAAAAAAA",
            "$argon2id$v=19$m=64,t=1,p=1$!!$AAAAAAAAAAAAAAAAAAAAAA",
            "$argon2id$v=19$m=64,t=1,p=1$c29tZXNhbHQ$AAAAAAAAAAAAAAAAAAAAAA$extra",
        ] {
            assert!(verify_with(bad, b"x").is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn unknown_subjects_never_match() {
        let hasher = Hasher::with_params(small(), 2, Duration::from_secs(1))
            .await
            .unwrap();
        let stored = hasher.hash("s3cret").await.unwrap();
        assert!(hasher.verify(Some(&stored), "s3cret").await.unwrap());
        assert!(!hasher.verify(Some(&stored), "s3creT").await.unwrap());
        assert!(!hasher.verify(None, "s3cret").await.unwrap());
        assert!(!format!("{hasher:?}").contains(&*hasher.dummy));
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_that_waits_too_long_for_a_slot_is_refused() {
        let hasher = Hasher::with_params(small(), 1, Duration::from_millis(500))
            .await
            .unwrap();
        let stored = hasher.hash("s3cret").await.unwrap();
        // Every slot taken (as by a flood of logins hashing).
        let held = hasher.permits.clone().acquire_owned().await.unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(
            hasher.verify(Some(&stored), "s3cret").await,
            Err(HashError::Busy)
        );
        assert_eq!(started.elapsed(), Duration::from_millis(500));
        // A slot that frees up in time is taken.
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(held);
        });
        assert!(hasher.verify(Some(&stored), "s3cret").await.unwrap());
        release.await.unwrap();
    }
}
