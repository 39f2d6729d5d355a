//! The authenticated caller: [`Principal`] and [`PrincipalKind`].

use std::{fmt, sync::Arc};

use crate::permission::Grants;

/// Whether a principal is a person or a service acting as itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalKind {
    /// A user (the default, or claim `kind: "user"`).
    User,
    /// A service client (claim `kind: "service"`).
    Service,
}

impl PrincipalKind {
    /// `user` or `service`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Service => "service",
        }
    }
}

/// The authenticated caller. Cheap to clone. Its `Debug` never shows the
/// token.
#[derive(Clone)]
pub struct Principal {
    inner: Arc<PrincipalInner>,
}

struct PrincipalInner {
    subject: Arc<str>,
    issuer: Box<str>,
    kind: PrincipalKind,
    grants: Grants,
    expires_at: u64,
    token: Box<str>,
}

impl Principal {
    #[cfg_attr(
        not(feature = "jwt"),
        allow(dead_code, reason = "only the verifier (and tests) make principals")
    )]
    pub(crate) fn new(
        subject: &str,
        issuer: &str,
        kind: PrincipalKind,
        grants: Grants,
        expires_at: u64,
        token: &str,
    ) -> Self {
        Self {
            inner: Arc::new(PrincipalInner {
                subject: subject.into(),
                issuer: issuer.into(),
                kind,
                grants,
                expires_at,
                token: token.into(),
            }),
        }
    }

    /// `sub`.
    pub fn subject(&self) -> &str {
        &self.inner.subject
    }

    /// `sub`, shared.
    pub fn subject_arc(&self) -> Arc<str> {
        self.inner.subject.clone()
    }

    /// `iss`.
    pub fn issuer(&self) -> &str {
        &self.inner.issuer
    }

    /// User or service.
    pub fn kind(&self) -> PrincipalKind {
        self.inner.kind
    }

    /// The grants of `perms`.
    pub fn grants(&self) -> &Grants {
        &self.inner.grants
    }

    /// `exp`, seconds since the epoch.
    pub fn expires_at(&self) -> u64 {
        self.inner.expires_at
    }

    /// The raw token, to call another service on the caller's behalf. Never
    /// log it.
    pub fn bearer_token(&self) -> &str {
        &self.inner.token
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Principal")
            .field("subject", &self.inner.subject)
            .field("issuer", &self.inner.issuer)
            .field("kind", &self.inner.kind)
            .field("grants", &self.inner.grants.len())
            .field("expires_at", &self.inner.expires_at)
            .field("token", &"[redacted]")
            .finish()
    }
}
