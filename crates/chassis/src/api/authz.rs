//! What a handler is given of the guard's decision: [`Authz`] for
//! resource-level checks through the same decision and audit path, the
//! [`Forbidden`] 403 naming the permission, and the [`AccountId`]
//! extractor. The route-level check itself is the [guard](super::guard).

use axum::{
    extract::FromRequestParts,
    response::{IntoResponse, Response},
};
use http::{StatusCode, request::Parts};

use crate::{
    auth::{Principal, Reason},
    context::{AuditDecision, AuditNote, authorized},
    permission::{AccountId, Permission},
    problem::Problem,
};

/// The 403 of a permission that is not granted; names the permission.
#[derive(Debug, Clone)]
pub struct Forbidden {
    permission: Permission,
}

impl Forbidden {
    /// The 403 of `permission`.
    pub(crate) fn new(permission: Permission) -> Self {
        Self { permission }
    }

    /// The permission that was required.
    pub fn permission(&self) -> &Permission {
        &self.permission
    }
}

impl IntoResponse for Forbidden {
    fn into_response(self) -> Response {
        Problem::new(StatusCode::FORBIDDEN)
            .with_detail(format!(
                "The caller lacks the permission `{}`.",
                self.permission
            ))
            .with_member("reason", Reason::Forbidden.code())
            .with_member("permission", self.permission.as_str())
            .into_response()
    }
}

/// Resource-level authorization inside a handler, through the same decision
/// and audit path as the route's own check.
#[derive(Debug, Clone)]
pub struct Authz {
    principal: Principal,
    note: Option<AuditNote>,
}

impl Authz {
    /// The caller.
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// Allows when the caller's grants allow `permission`; otherwise records
    /// the denial in the call's audit event and returns the 403.
    ///
    /// # Errors
    ///
    /// [`Forbidden`] naming the permission.
    pub fn check(&self, permission: &Permission) -> Result<(), Forbidden> {
        if self.principal.grants().decide(permission).is_allowed() {
            return Ok(());
        }
        self.deny(permission);
        Err(Forbidden {
            permission: permission.clone(),
        })
    }

    /// Records a denial decided by the handler itself (e.g. the caller is
    /// not the owner) and returns the 403.
    pub fn deny(&self, permission: &Permission) -> Forbidden {
        if let Some(note) = &self.note {
            note.update(|n| {
                n.permission = Some(permission.clone());
                n.decision = Some((AuditDecision::Deny, Some(Reason::Forbidden.code())));
            });
        }
        Forbidden {
            permission: permission.clone(),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Authz {
    type Rejection = crate::auth::AuthError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let principal = Principal::from_request_parts(parts, state).await?;
        Ok(Self {
            principal,
            note: AuditNote::of(&parts.extensions).cloned(),
        })
    }
}

/// Extracts the account the chassis validated and authorised; 404 on a route
/// without an account.
impl<S: Send + Sync> FromRequestParts<S> for AccountId {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        authorized(&parts.extensions)
            .and_then(|(_, account)| account)
            .ok_or_else(Problem::not_found)
    }
}
