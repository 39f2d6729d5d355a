//! What the steps decided about a request, for its audit event and its
//! handler: the principal slot and the decision.

use std::sync::{Arc, Mutex};

use super::{Principal, RequestContext};
use crate::permission::{AccountId, Permission};

/// The outcome recorded for a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditDecision {
    /// Allowed (or a public route).
    Allow,
    /// Authenticated but not allowed.
    Deny,
    /// No valid token.
    Unauthenticated,
    /// Refused before authorization: bad input, overload, no such method.
    Rejected,
}

impl AuditDecision {
    /// `allow`, `deny`, `unauthenticated` or `rejected`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Unauthenticated => "unauthenticated",
            Self::Rejected => "rejected",
        }
    }
}

/// What the steps inside learned about a call: who called, for which account
/// and permission, and what was decided.
#[derive(Debug, Default)]
pub(crate) struct Note {
    pub(crate) principal: Option<Principal>,
    pub(crate) account: Option<AccountId>,
    pub(crate) permission: Option<Permission>,
    pub(crate) decision: Option<(AuditDecision, Option<&'static str>)>,
}

/// The note of one request, shared by the steps that decide (the guard, a
/// handler's [`Authz`](crate::api::Authz)) and the one that records it (the
/// audit step), which reads it after the request has moved on.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuditNote(Arc<Mutex<Note>>);

impl AuditNote {
    /// The note of a request, when a step opened one.
    pub(crate) fn of(extensions: &http::Extensions) -> Option<&Self> {
        extensions.get::<RequestContext>()?.note.as_ref()
    }

    /// Changes the note.
    pub(crate) fn update(&self, f: impl FnOnce(&mut Note)) {
        f(&mut self.lock());
    }

    /// Records `decision` for `reason`.
    pub(crate) fn decide(&self, decision: AuditDecision, reason: &'static str) {
        self.update(|n| n.decision = Some((decision, Some(reason))));
    }

    /// Takes what was noted, leaving the note empty.
    pub(crate) fn take(&self) -> Note {
        std::mem::take(&mut *self.lock())
    }

    /// The caller and account the guard recorded.
    pub(crate) fn authorized(&self) -> Option<(Principal, Option<AccountId>)> {
        let note = self.lock();
        let principal = note.principal.clone()?;
        Some((principal, note.account.clone()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Note> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The caller and account an authorized call was checked for, as the guard
/// recorded them in the request's note; read by the
/// [`Principal`](crate::auth::Principal) and
/// [`AccountId`](crate::permission::AccountId) extractors and the outgoing
/// client.
pub(crate) fn authorized(extensions: &http::Extensions) -> Option<(Principal, Option<AccountId>)> {
    AuditNote::of(extensions)?.authorized()
}
